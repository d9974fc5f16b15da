"""The nbd node against a server that misbehaves (tests/helpers/nbd_server.py):
a malformed reply, a reply for a handle never sent, a reply that stops half
way, an oversized block-status extent, a bad greeting, an export too small
for its format. Each is one log line and an error for the request (or a
refused open): never a crash, a hang or unbounded memory. The guest's view
of a server going away mid-run is in tests/integration/test_nbd_reconnect.py."""
import time

import pytest

from pykvm.block import BlockError, open_image
from pykvm.block.driver import read_range, write_range
from tests.helpers.nbd_server import HostileServer


@pytest.fixture
def server(tmp_path):
    made = []

    def start(mode="ok", **kw):
        s = HostileServer(str(tmp_path / f"h{len(made)}.sock"), mode=mode, **kw)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def _open(srv, **opts):
    return open_image({"driver": "raw", "file": {"driver": "nbd", "filename": srv.uri,
                                                 **opts}})


def test_the_server_itself_serves(server):
    """The fake server is a working one unless told otherwise (else the tests
    below would pass for the wrong reason)."""
    srv = server("ok", structured=True)
    d = _open(srv)
    try:
        write_range(d, 4096, b"\x5a" * 4096)
        assert read_range(d, 4096, 4096) == b"\x5a" * 4096
        assert d.file.allocated(0, 65536) == [(0, 65536, True)]
    finally:
        d.close()


@pytest.mark.parametrize("mode", ["bad-magic", "wrong-handle"])
def test_malformed_reply_fails_the_request(server, mode, capfd):
    srv = server(mode)
    d = _open(srv)
    try:
        write_range(d, 0, b"\x11" * 512)                 # writes are answered well
        with pytest.raises(OSError):
            read_range(d, 0, 512)
        assert d.file.info_flags()["failed"] >= 1
        # the node comes back on a new connection (once a second), where the
        # next read fails the same way: the server answers every read so
        deadline = time.monotonic() + 10
        while not d.file.info_flags()["connected"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.connections >= 2 and d.file.info_flags()["connected"]
        write_range(d, 512, b"\x22" * 512)
        with pytest.raises(OSError):
            read_range(d, 512, 512)
        assert bytes(srv.data[:1024]) == b"\x11" * 512 + b"\x22" * 512
    finally:
        d.close()
    err = capfd.readouterr().err
    assert "lost the connection" in err
    assert err.count("\n") <= 12                         # a line per loss, not a flood


def test_hang_mid_reply_fails_after_request_timeout(server):
    srv = server("hang-mid-reply")
    d = _open(srv, **{"request-timeout": 1})
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            read_range(d, 0, 65536)
        took = time.monotonic() - t0
        assert 0.9 < took < 10, took
    finally:
        t0 = time.monotonic()
        d.close()                                         # and closing does not hang
        assert time.monotonic() - t0 < 5


def test_hang_with_reconnect_delay_is_retried_then_fails(server):
    """A hung connection is a lost one: retried on a new connection within
    reconnect-delay (which hangs too here), then EIO, never a hang."""
    srv = server("hang-mid-reply")
    d = _open(srv, **{"request-timeout": 1, "reconnect-delay": 3})
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            read_range(d, 0, 4096)
        assert time.monotonic() - t0 < 20
        assert srv.connections >= 2                       # it did try again
    finally:
        d.close()


def test_oversized_extent_is_clipped(server):
    srv = server("huge-extent", structured=True)
    d = _open(srv)
    try:
        runs = d.file.allocated(65536, 8192)
        assert runs == [(65536, 8192, True)]              # clipped to what was asked
        runs = d.file.allocated(0, d.size)
        assert sum(n for _o, n, _h in runs) == d.size
    finally:
        d.close()


def test_bad_greeting_is_a_refused_open(server):
    srv = server("bad-handshake")
    with pytest.raises(BlockError, match="cannot connect to the NBD server"):
        _open(srv)


def test_export_smaller_than_its_format_is_refused(server):
    srv = server("ok")
    srv.data[:] = bytearray(1024)
    srv.data[:4] = b"QFI\xfb"                              # a qcow2 magic, and no header
    with pytest.raises(BlockError):
        open_image({"driver": "qcow2", "file": {"driver": "nbd", "filename": srv.uri}})
