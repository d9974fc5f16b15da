"""``--disk`` and ``json:`` option parsing, and the graph they describe opened.

The bytes are the text of a ``--disk`` (``pykvm.machine.DiskSpec.parse``); text
that starts with ``json:`` is also parsed as a ``json:{...}`` filename
(``graph.parse_json_filename``). Either graph is then opened read-only
(``graph.open_node``) in a folder holding ``a.qcow2`` (backed by ``b.raw``) and
``b.raw``, and closed. ConfigError, GraphError and BlockError are the
documented answers (a usage error, an image that does not open).
"""
import atexit
import os
import shutil
import subprocess
import tempfile

from pykvm.block import BlockError
from pykvm.block.graph import open_node, parse_json_filename
from pykvm.errors import ConfigError
from pykvm.machine import DiskSpec

EXPECTED = (ConfigError, BlockError)

DIR = tempfile.mkdtemp(prefix="fuzz-disk-")
atexit.register(shutil.rmtree, DIR, True)
with open(os.path.join(DIR, "b.raw"), "wb") as f:
    f.truncate(1 << 20)
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                "-b", "b.raw", "-F", "raw", os.path.join(DIR, "a.qcow2")], check=True)


def _open(spec) -> None:
    here = os.getcwd()
    os.chdir(DIR)
    try:
        open_node(spec, read_only=True, name="disk0").close()
    finally:
        os.chdir(here)


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    if text.startswith("json:"):
        try:
            _open(parse_json_filename(text))
        except EXPECTED:
            pass
    _open(DiskSpec.parse(text).node)
