"""The nbd node against nbdkit (memory and file plugins, on a Unix socket and
on 127.0.0.1): data both ways, holes seen through block status (pykvm img map
on the URI, against qemu-img map on the same URI), write-zeroes and trim sent
as such (nbdkit's log filter records every request the server got)."""
import json
import os
import re
import subprocess
import sys

import pytest

from pykvm.block import open_image
from pykvm.block.driver import fd_datasync, read_range, write_range, write_zeroes_range
from tests.helpers.nbd_servers import nbd_server  # noqa: F401  (fixture)

MiB = 1 << 20
PAGE = 32 << 10         # nbdkit memory's allocation unit (its sparse array's page)


def pattern(n: int, seed: int = 1) -> bytes:
    block = bytes((i * 13 + seed) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def img_map(*args) -> list:
    r = subprocess.run([sys.executable, "-m", "pykvm", "img", "map", "--output=json", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def qemu_map(*args) -> list:
    r = subprocess.run(["qemu-img", "map", "--output=json", *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def data_runs(m: list) -> list:
    return [(e["start"], e["length"]) for e in m if e["data"]]


def requests(log: str) -> list[tuple[str, int, int, str]]:
    """(command, offset, count, the rest of the line) of each request nbdkit's
    log filter recorded."""
    out = []
    with open(log) as f:
        for line in f:
            m = re.search(r" connection=\d+ (\w+) id=\d+ offset=0x([0-9a-f]+) "
                          r"count=0x([0-9a-f]+)(.*)$", line)
            if m:
                out.append((m.group(1), int(m.group(2), 16), int(m.group(3), 16), m.group(4)))
    return out


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbdkit_memory_data_holes_zeroes_trim(tmp_path, nbd_server, transport):
    log = tmp_path / "requests.log"
    srv = nbd_server("nbdkit", "memory", "size=8M", f"logfile={log}", filters=["log"],
                     transport=transport)
    d = open_image(srv.uri, "raw")
    try:
        flags = d.file.info_flags()
        assert d.size == 8 * MiB
        assert flags["can_trim"] and flags["can_zero"] and flags["can_block_status"]
        write_range(d, MiB, pattern(4 * PAGE))
        assert read_range(d, MiB, 4 * PAGE) == pattern(4 * PAGE)
        assert data_runs(img_map(srv.uri)) == [(MiB, 4 * PAGE)]
        assert img_map(srv.uri) == qemu_map(srv.uri)       # what qemu-img sees there

        write_zeroes_range(d, MiB, 4096)                    # inside a page: zeroes, no hole
        assert read_range(d, MiB, 8192) == bytes(4096) + pattern(8192)[4096:]
        write_zeroes_range(d, MiB + PAGE, PAGE, unmap=True)  # a whole page: a hole
        d.discard(MiB + 2 * PAGE, PAGE, True)               # trim: a hole
        assert read_range(d, MiB + PAGE, 2 * PAGE) == bytes(2 * PAGE)
        assert data_runs(img_map(srv.uri)) == [(MiB, PAGE), (MiB + 3 * PAGE, PAGE)]
        assert img_map(srv.uri) == qemu_map(srv.uri)
        assert read_range(d, MiB + 3 * PAGE, PAGE) == pattern(4 * PAGE)[3 * PAGE:]
        fd_datasync(d.fd)
    finally:
        d.close()
    got = requests(log)
    # every change went to the server as the command it is, not as written zeroes
    assert ("Write", MiB, 4 * PAGE) in [r[:3] for r in got]
    assert [r[:3] for r in got if r[0] == "Write"] == [("Write", MiB, 4 * PAGE)]
    zeroes = [r for r in got if r[0] == "Zero"]
    assert [(o, n) for _, o, n, _ in zeroes] == [(MiB, 4096), (MiB + PAGE, PAGE)]
    assert "trim=0" in zeroes[0][3] and "trim=1" in zeroes[1][3]
    assert [r[:3] for r in got if r[0] == "Trim"] == [("Trim", MiB + 2 * PAGE, PAGE)]
    assert "Flush" in log.read_text()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nbdkit_file_holes_of_the_servers_file(tmp_path, nbd_server, transport):
    img = tmp_path / "d.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(2 * MiB)
        f.write(pattern(MiB, 3))
    srv = nbd_server("nbdkit", "file", f"file={img}", transport=transport)
    # the file's holes (SEEK_HOLE on the server) through block status, as
    # qemu-img sees them in the file itself
    assert data_runs(img_map(srv.uri)) == data_runs(qemu_map("-f", "raw", str(img))) == \
        [(2 * MiB, MiB)]
    assert img_map(srv.uri) == qemu_map(srv.uri)
    d = open_image(srv.uri, "raw")
    try:
        assert read_range(d, 2 * MiB, MiB) == pattern(MiB, 3)
        write_range(d, 9 * MiB, pattern(64 << 10, 5))
        fd_datasync(d.fd)
        with open(img, "rb") as f:                          # in the server's file
            f.seek(9 * MiB)
            assert f.read(64 << 10) == pattern(64 << 10, 5)
        before = os.stat(img).st_blocks
        d.discard(2 * MiB, 512 << 10, True)                 # trim: the file's hole punched
        write_zeroes_range(d, 2 * MiB + (512 << 10), 256 << 10, unmap=True)
        write_zeroes_range(d, 9 * MiB, 4096)                # zeroes in place
        assert read_range(d, 2 * MiB, 768 << 10) == bytes(768 << 10)
        assert read_range(d, 9 * MiB, 8192) == bytes(4096) + pattern(8192, 5)[4096:]
    finally:
        d.close()
    assert os.stat(img).st_blocks <= before - (768 << 10) // 512
    assert data_runs(img_map(srv.uri)) == data_runs(qemu_map("-f", "raw", str(img))) == \
        [(2 * MiB + (768 << 10), 256 << 10), (9 * MiB, 64 << 10)]
    with open(img, "rb") as f:
        f.seek(2 * MiB + (768 << 10))
        assert f.read(256 << 10) == pattern(MiB, 3)[768 << 10:]


def test_the_format_is_probed_through_the_export(tmp_path, nbd_server):
    """file=nbd://... without format=: the export's first bytes, read through
    the nbd node, say which format it holds (a qcow2 file exported raw)."""
    q = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", str(q)],
                   check=True, capture_output=True)
    for plugin, fmt in ((f"file file={q}", "qcow2"), ("memory size=4M", "raw")):
        srv = nbd_server("nbdkit", *plugin.split())
        d = open_image(srv.uri)
        try:
            assert d.format_name == fmt and d.probed
            if fmt == "qcow2":
                assert d.size == 4 * MiB
                assert read_range(d, MiB, 65536) == b"a" * 65536
        finally:
            d.close()
