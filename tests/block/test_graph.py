"""The block graph: QEMU's spellings (dotted options, json: filenames, the
short form), the nodes they build, errors that name the node and the option,
and the protocol node on a host block device."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from pykvm.block import BlockBackend, BlockError, GraphError
from pykvm.block.graph import nest, open_node, parse_json_filename, tree_lines, walk
from pykvm.block.qcow2 import Qcow2Driver
from pykvm.machine import DiskSpec
from pykvm.errors import ConfigError

from .conftest import Disk, needs_qemu, pattern, qemu_img, qemu_io

MiB = 1 << 20


def _digest(*paths) -> list[str]:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


@pytest.fixture
def chain(tmp_path):
    """base.raw <- top.qcow2, both with data."""
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(2 * MiB, 1))
    top = tmp_path / "top.qcow2"
    Qcow2Driver.create(str(top), 2 * MiB, backing_file="base.raw", backing_fmt="raw")
    qemu_io(top, "write -P 0x5a 0 64k")
    return base, top


def test_nest_and_json_agree():
    dotted = nest({"driver": "qcow2", "file.driver": "file", "file.filename": "a.qcow2",
                   "backing.file.filename": "b.raw", "backing.driver": "raw"})
    js = parse_json_filename('json:{"driver": "qcow2", "file": {"driver": "file", '
                             '"filename": "a.qcow2"}, "backing.driver": "raw", '
                             '"backing": {"file.filename": "b.raw"}}')
    assert dotted == js == {"driver": "qcow2",
                            "file": {"driver": "file", "filename": "a.qcow2"},
                            "backing": {"driver": "raw", "file": {"filename": "b.raw"}}}


@pytest.mark.parametrize("text", [
    "{chain}",
    "file={chain}",
    "file={chain},format=qcow2",
    "driver=qcow2,file.driver=file,file.filename={chain}",
    "file={chain},file.locking=auto,format=qcow2",
    'file=json:{{"driver":"qcow2",,"file":{{"driver":"file",,"filename":"{chain}"}}}}',
])
def test_disk_spellings_build_the_same_graph(chain, text):
    base, top = chain
    spec = DiskSpec.parse(text.format(chain=top))
    d = Disk(spec.node, name="disk0")
    b = d.b
    try:
        kinds = [(path, n.format_name, os.path.basename(n.filename)) for path, _r, n in walk(b.root)]
        assert kinds == [("", "qcow2", "top.qcow2"), ("/file", "file", "top.qcow2"),
                         ("/backing", "raw", "base.raw"), ("/backing/file", "file", "base.raw")]
        assert b.root.node_name == "disk0" and b.root.backing.node_name == "disk0/backing"
        assert b.root.backing.read_only and not b.root.read_only
        assert d.read(0, 65536) == b"\x5a" * 65536
        assert d.read(MiB, 4096) == pattern(2 * MiB, 1)[MiB:MiB + 4096]
    finally:
        b.close()


def test_backing_override_and_none(chain, tmp_path):
    base, top = chain
    other = tmp_path / "other.raw"
    other.write_bytes(b"\x11" * (2 * MiB))
    d = Disk({"driver": "qcow2", "file": str(top),
              "backing": {"driver": "raw", "file": {"filename": str(other)}}})
    assert d.read(MiB, 512) == b"\x11" * 512          # the given backing, not the header's
    d.close()
    d = Disk(DiskSpec.parse(f"file={top},backing=").node)
    b = d.b
    assert b.root.backing is None
    assert d.read(MiB, 512) == bytes(512)            # no backing: unallocated reads zeroes
    assert d.read(0, 512) == b"\x5a" * 512
    b.close()


@needs_qemu
def test_raw_offset_and_size_match_qemu(tmp_path):
    img = tmp_path / "whole.raw"
    img.write_bytes(pattern(4 * MiB, 3))
    spec = DiskSpec.parse(f"driver=raw,offset=1M,size=2M,file.filename={img}")
    d = Disk(spec.node)
    b = d.b
    assert b.size == 2 * MiB
    assert d.read(0, 4096) == pattern(4 * MiB, 3)[MiB:MiB + 4096]
    assert d.write(4096, b"\xab" * 4096) == 4096
    assert d.read(2 * MiB - 512, 512) == pattern(4 * MiB, 3)[3 * MiB - 512:3 * MiB]
    b.close()
    data = img.read_bytes()
    assert data[MiB + 4096:MiB + 8192] == b"\xab" * 4096 and data[4096:8192] != b"\xab" * 4096
    # QEMU reads the same window with the same options
    r = subprocess.run(["qemu-io", "--image-opts", "-c", "read -P 0xab 4096 4096",
                        f"driver=raw,offset=1048576,size=2097152,file.filename={img}"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    with pytest.raises(BlockError, match=r"raw node 'w': file '.*whole.raw': offset=1048576 "
                                         r"plus size=4194304 is past the end"):
        open_node({"driver": "raw", "offset": MiB, "size": 4 * MiB, "file": str(img)}, name="w")


@pytest.mark.parametrize("spec, message", [
    ({"driver": "qcow3", "file": "{top}"}, r"^node 'd0': unknown driver 'qcow3'"),
    ({"driver": "qcow2"}, r"^qcow2 node 'd0': option 'file' is missing"),
    ({"driver": "qcow2", "file": "{top}", "lazy": "on"},
     r"^qcow2 node 'd0': option 'lazy' does not apply \(it takes l2-cache-size, file, "),
    ({"driver": "raw", "file": {"driver": "file", "filename": "{top}", "aio": "posix"}},
     r"^file node 'd0/file': option 'aio=posix' is not one of threads, native"),
    ({"driver": "qcow2", "file": "{top}", "l2-cache-size": "lots"},
     r"^qcow2 node 'd0': option 'l2-cache-size=lots' is not a size"),
    ({"driver": "qcow2", "file": "{top}", "data-file": "{top}"},
     r"^qcow2 node 'd0': file '.*top.qcow2': option 'data-file' does not apply"),
    ({"driver": "file"}, r"^file node 'd0': option 'filename' is missing"),
    ({"driver": "qcow2", "file": "{top}", "backing": {"driver": "raw", "file": "{top}"}},
     r"^raw node 'd0/backing': backing file loop"),
])
def test_bad_graph_is_one_line_and_changes_nothing(chain, spec, message):
    base, top = chain
    # a dirty image: a writable open would repair it and rewrite its header
    before = _digest(base, top)
    text = json.dumps(spec).replace("{top}", str(top))
    with pytest.raises(GraphError, match=message) as e:
        open_node(json.loads(text), name="d0")
    assert "\n" not in str(e.value) and e.value.exit_status == 2
    assert _digest(base, top) == before


def test_backing_loop_in_headers_is_refused(tmp_path):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    Qcow2Driver.create(str(a), MiB)
    Qcow2Driver.create(str(b), MiB, backing_file="a.qcow2", backing_fmt="qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a)
    with pytest.raises(GraphError, match=r"node 'disk0/backing/backing': backing file loop"):
        BlockBackend(str(b), name="disk0")


def test_cli_bad_graph_exits_2_with_one_line(chain):
    base, top = chain
    before = _digest(base, top)
    for disk, message in [
        (f"file={top},format=qcow2,offset=1M", "qcow2 node 'disk0': option 'offset' does not "
                                               "apply"),
        (f"driver=nope,file={top}", "node 'disk0': unknown driver 'nope'"),
        (f"file={top},backing.driver=raw,backing.file.filename={top}",
         "raw node 'disk0/backing': backing file loop"),
    ]:
        r = subprocess.run([sys.executable, "-m", "pykvm", "fio", "--disk", disk, "--runtime",
                            "0.1"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("pykvm") and message in r.stderr, r.stderr
    assert _digest(base, top) == before


def test_cli_unknown_disk_option_is_a_usage_error(chain):
    base, top = chain
    r = subprocess.run([sys.executable, "-m", "pykvm", "fio", "--disk", f"file={top},foo=bar"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(
        f"pykvm fio: argument --disk: --disk file={top},foo=bar: unknown option 'foo'")


def test_disk_spec_errors():
    with pytest.raises(ConfigError, match="option 'file' is given both as a value and with"):
        DiskSpec.parse("file=json:{},file.driver=file")
    with pytest.raises(ConfigError, match="no file given"):
        DiskSpec.parse("format=raw")
    with pytest.raises(ConfigError, match=r"unknown option 'transprot' \(the device's: "
                                          r"transport, .*the image's: .*offset"):
        DiskSpec.parse("file=a.img,transprot=pci")
    spec = DiskSpec.parse("file=a.img,file.aio=threads")
    assert spec.aio == "threads" and spec.node == {"file": {"filename": "a.img",
                                                              "aio": "threads"}}


def test_open_error_names_node_and_file(tmp_path):
    with pytest.raises(BlockError, match=r"^qcow2 node 'disk0/backing': file '.*none.qcow2': "):
        bad = tmp_path / "none.qcow2"
        bad.write_bytes(b"QFI\xfb" + bytes(60))
        top = tmp_path / "t.qcow2"
        Qcow2Driver.create(str(top), MiB, backing_file="none.qcow2", backing_fmt="qcow2")
        BlockBackend(str(top), name="disk0")


def test_tree_lines(chain):
    base, top = chain
    b = BlockBackend(str(top), name="disk0")
    try:
        assert tree_lines(b.root) == [
            f"disk0: qcow2 ({top}, {2 * MiB} bytes)", f"  file: file ({top})",
            f"  backing: raw ({base})", f"    file: file ({base})"]
    finally:
        b.close()


def test_fio_verbose_logs_the_graph(chain):
    base, top = chain
    r = subprocess.run([sys.executable, "-m", "pykvm", "fio", "-v", "--disk", f"file={top}",
                        "--ios", "8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"pykvm: disk0: qcow2 ({top}, {2 * MiB} bytes)" in r.stderr.splitlines()
    assert f"pykvm:     file: file ({base})" in r.stderr.splitlines()


@needs_qemu
def test_img_image_opts_and_json(chain):
    base, top = chain
    run = lambda *a: subprocess.run([sys.executable, "-m", "pykvm", "img", *a],
                                    capture_output=True, text=True)
    ours = run("info", "--output=json", "--image-opts", f"driver=qcow2,file.filename={top}")
    assert ours.returncode == 0, ours.stderr
    d = json.loads(ours.stdout)
    theirs = json.loads(qemu_img("info", "--output=json", "--image-opts",
                                 f"driver=qcow2,file.filename={top}").stdout)
    for key in ("virtual-size", "format", "cluster-size", "backing-filename"):
        assert d[key] == theirs[key], key
    assert d["children"][0]["name"] == "file"
    assert d["children"][0]["info"]["format"] == "file"
    js = run("map", "--output=json", f'json:{{"driver":"qcow2","file":"{top}","backing":""}}')
    assert js.returncode == 0, js.stderr
    extents = json.loads(js.stdout)
    assert extents[0]["data"] and extents[0]["length"] == 65536
    assert not any(e["data"] for e in extents[1:])    # no backing: the rest is unallocated
    human = run("info", str(top))
    assert "Child node '/file':\n    filename: " + str(top) in human.stdout
    bad = run("check", "--image-opts", f"driver=qcow2,file.filename={top},x=1")
    assert bad.returncode == 2 and bad.stderr.startswith("pykvm img: qcow2 node: option 'x'")


# -- the protocol node on a host block device -------------------------------------------

@pytest.fixture
def loopdev(tmp_path):
    img = tmp_path / "loop.img"
    img.write_bytes(pattern(8 * MiB, 5))
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    yield dev, img
    subprocess.run(["losetup", "-d", dev], check=True)


def test_host_device_discard_and_zeroes(loopdev):
    dev, img = loopdev
    d = Disk({"driver": "raw", "file": {"driver": "host_device", "filename": dev}},
             cache="none")
    b = d.b
    try:
        assert b.driver.is_block_device and b.size == 8 * MiB
        assert d.read(MiB, 4096) == pattern(8 * MiB, 5)[MiB:MiB + 4096]
        assert d.write_zeroes(MiB, MiB) == 0          # BLKZEROOUT
        assert d.read(MiB, MiB) == bytes(MiB)
        assert d.discard(4 * MiB, MiB) == 0            # BLKDISCARD: a hint, never an error
        assert d.flush() == 0
    finally:
        b.close()
    data = img.read_bytes()
    assert data[MiB:2 * MiB] == bytes(MiB) and data[:MiB] == pattern(8 * MiB, 5)[:MiB]
    with pytest.raises(BlockError, match="'host_device' driver requires a block device"):
        open_node({"driver": "host_device", "filename": str(img)})


def test_c_path_punts_name_the_nodes(chain, tmp_path):
    """What the C path's start logs: what goes to Python, node by node."""
    base, top = chain
    b = BlockBackend(str(top), name="disk0", detect_zeroes="on")
    try:
        punts = b.c_path_punts()
    finally:
        b.close()
    assert punts[0].startswith("discard and write-zeroes")
    assert any(p.startswith("qcow2 node 'disk0': allocating writes") for p in punts)
    assert "qcow2 node 'disk0': reads of clusters it does not hold (from raw node " \
           "'disk0/backing')" in punts
    assert punts[-1].startswith("detect-zeroes=on: every write")
    raw = tmp_path / "plain.img"
    raw.write_bytes(bytes(MiB))
    b = BlockBackend(str(raw), name="disk1")
    try:
        assert b.c_path_punts()[1:] == ["raw node 'disk1': writes to sector 0 (a probed raw "
                                        "image: Python refuses another format's header there)"]
    finally:
        b.close()
