"""The NBD export against a hostile client speaking raw bytes (export/nbd.py).

The server runs in a thread on a Unix socket in tmp_path, over a real
BlockBackend on a raw (or qcow2) image; each test speaks the protocol byte by
byte (doc/proto.md of the NBD project) and checks what comes back: the error
the protocol names, a disconnect where the framing is broken, and that the
export goes on serving the next client.
"""
import errno
import logging
import os
import socket
import struct
import subprocess
import threading
import time

import pytest

from pykvm.block import BlockBackend
from pykvm.export import nbd

SIZE = 4 << 20
MiB = 1 << 20


def pattern(n: int, seed: int = 7) -> bytes:
    return bytes((i * 31 + seed + (i >> 12)) & 0xFF for i in range(n))


class Server:
    """An NbdServer in a thread on ``path``; ``stop()`` joins it."""

    def __init__(self, image, path, fmt="raw", **kw):
        self.backend = BlockBackend(str(image), fmt=fmt,
                                    read_only=kw.pop("backend_read_only",
                                                     kw.get("read_only", False)))
        self.listener = nbd.listen(f"unix:{path}")
        kw.setdefault("persistent", True)
        self.server = nbd.NbdServer(self.backend, self.listener, **kw)
        self.path = str(path)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.serve_forever()
        except BaseException as e:     # the test sees it: a crash fails the test
            self.error = e

    def stop(self):
        if self.thread is None:
            return
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve_forever did not return"
        self.thread = None
        self.server.close()
        self.backend.close()
        assert self.error is None, repr(self.error)


class Client:
    """Raw bytes over a Unix socket, with helpers for the usual steps."""

    def __init__(self, path, timeout=10):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.structured = False

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.s.recv(n - len(buf))
            if not got:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += got
        return bytes(buf)

    def closed(self) -> bool:
        """True once the server has closed the connection (EOF within the timeout)."""
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def greeting(self, cflags=nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES):
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        assert hflags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
        self.s.sendall(struct.pack(">I", cflags))

    def option(self, opt: int, data: bytes = b"", magic=nbd.IHAVEOPT):
        self.s.sendall(struct.pack(">QII", magic, opt, len(data)) + data)

    def reply(self):
        magic, opt, typ, length = struct.unpack(">QIII", self.recv(20))
        assert magic == nbd.REPLY_MAGIC
        return opt, typ, self.recv(length)

    def replies(self):
        """Option replies up to and including ACK or an error."""
        out = []
        while True:
            opt, typ, data = self.reply()
            out.append((typ, data))
            if typ == nbd.REP_ACK or typ & (1 << 31):
                return out

    def go(self, name=b"", structured=False, contexts=(), info=(nbd.INFO_BLOCK_SIZE,)):
        self.greeting()
        if structured:
            self.option(nbd.OPT_STRUCTURED_REPLY)
            assert self.replies() == [(nbd.REP_ACK, b"")]
            self.structured = True
        if contexts:
            self.option(nbd.OPT_SET_META_CONTEXT, meta_data(b"", contexts))
            got = self.replies()
            assert got[-1][0] == nbd.REP_ACK
            self.contexts = {d[4:].decode(): struct.unpack(">I", d[:4])[0]
                             for t, d in got[:-1]}
        self.option(nbd.OPT_GO, info_data(name, info))
        got = self.replies()
        assert got[-1][0] == nbd.REP_ACK, got
        infos = {}
        for typ, d in got[:-1]:
            assert typ == nbd.REP_INFO
            (kind,) = struct.unpack(">H", d[:2])
            infos[kind] = d[2:]
        self.size, self.flags = struct.unpack(">QH", infos[nbd.INFO_EXPORT])
        return infos

    def request(self, cmd, offset=0, length=0, cookie=1, flags=0, data=b"",
                magic=nbd.REQUEST_MAGIC):
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data)

    def simple(self, length=0):
        """(error, cookie, data) of a simple reply carrying ``length`` bytes on success."""
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC, hex(magic)
        return err, cookie, self.recv(length) if err == 0 and length else b""

    def chunk(self):
        magic, flags, typ, cookie, length = struct.unpack(">IHHQI", self.recv(20))
        if magic == nbd.SIMPLE_REPLY_MAGIC:       # an 8-byte shorter header
            raise AssertionError("simple reply where a structured one was due")
        assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
        return flags, typ, cookie, self.recv(length)

    def chunks(self):
        out = []
        while True:
            c = self.chunk()
            out.append(c)
            if c[0] & nbd.REPLY_FLAG_DONE:
                return out

    def close(self):
        self.s.close()


def info_data(name: bytes, info=()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(info)}H", len(info), *info)


def meta_data(name: bytes, queries) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


@pytest.fixture
def raw(tmp_path):
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(pattern(64 << 10))     # data at [1M, 1M+64K); the rest is a hole
    return p


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(image, **kw):
        s = Server(image, tmp_path / f"nbd{len(servers)}.sock", **kw)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


def second_client_served(srv):
    """A fresh client negotiates and reads: the export survived."""
    c = Client(srv.path)
    c.go()
    c.request(nbd.CMD_READ, MiB, 4096, cookie=99)
    err, cookie, data = c.simple(4096)
    assert (err, cookie) == (0, 99)
    assert data == pattern(4096)
    c.close()


# -- handshake ---------------------------------------------------------------------------

def test_go_reports_size_flags_and_block_sizes(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    infos = c.go()
    assert c.size == SIZE
    want = nbd.FLAG_HAS_FLAGS | nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_FUA | nbd.FLAG_SEND_TRIM | \
        nbd.FLAG_SEND_WRITE_ZEROES | nbd.FLAG_SEND_FAST_ZERO
    assert c.flags == want
    assert struct.unpack(">III", infos[nbd.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)


def test_client_without_fixed_newstyle_is_refused(raw, serve, caplog):
    srv = serve(raw)
    c = Client(srv.path)
    with caplog.at_level(logging.WARNING, "pykvm.export"):
        c.greeting(cflags=0)
        assert c.closed()
    assert "fixed newstyle" in caplog.text
    second_client_served(srv)


def test_unknown_client_flags_close(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.greeting(cflags=nbd.FLAG_C_FIXED_NEWSTYLE | 0x80)
    assert c.closed()
    second_client_served(srv)


def test_garbage_instead_of_options(raw, serve, caplog):
    srv = serve(raw)
    c = Client(srv.path)
    c.greeting()
    with caplog.at_level(logging.WARNING, "pykvm.export"):
        c.s.sendall(os.urandom(64))
        assert c.closed()
    assert "bad option magic" in caplog.text
    assert len([r for r in caplog.records if r.name == "pykvm.export"]) == 1
    second_client_served(srv)


def test_unknown_option_is_unsupported_and_negotiation_goes_on(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.greeting()
    for opt in (0xDEAD, nbd.OPT_STARTTLS, 11):
        c.option(opt, b"xyz")
        (typ, _), = c.replies()
        assert typ == nbd.REP_ERR_UNSUP
    c.option(nbd.OPT_GO, info_data(b""))
    assert c.replies()[-1][0] == nbd.REP_ACK


def test_option_too_long_closes(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.greeting()
    c.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 0xFFFFFFFF))
    assert c.closed()
    second_client_served(srv)


def test_list_info_abort_and_names(raw, serve):
    srv = serve(raw, name="disk")
    c = Client(srv.path)
    c.greeting()
    c.option(nbd.OPT_LIST)
    (t1, d1), (t2, _) = c.replies()
    assert t1 == nbd.REP_SERVER and d1 == struct.pack(">I", 4) + b"disk" and t2 == nbd.REP_ACK
    c.option(nbd.OPT_LIST, b"x")
    assert c.replies()[0][0] == nbd.REP_ERR_INVALID
    c.option(nbd.OPT_INFO, info_data(b"other"))
    assert c.replies()[0][0] == nbd.REP_ERR_UNKNOWN
    c.option(nbd.OPT_INFO, info_data(b"disk", (nbd.INFO_NAME,)))
    got = c.replies()
    assert (nbd.REP_INFO, struct.pack(">H", nbd.INFO_NAME) + b"disk") in got
    c.option(nbd.OPT_INFO, info_data(b"disk")[:-1] + b"\x05")   # a count past the data
    assert c.replies()[0][0] == nbd.REP_ERR_INVALID
    c.option(nbd.OPT_ABORT)
    assert c.replies() == [(nbd.REP_ACK, b"")]
    assert c.closed()
    c = Client(srv.path)
    c.greeting()
    c.option(nbd.OPT_EXPORT_NAME, b"nope")       # cannot fail politely: closed
    assert c.closed()
    c = Client(srv.path)
    c.greeting()
    c.option(nbd.OPT_EXPORT_NAME, b"disk")
    size, flags = struct.unpack(">QH", c.recv(10))   # NO_ZEROES: no 124 bytes
    assert size == SIZE and flags & nbd.FLAG_HAS_FLAGS
    c.request(nbd.CMD_READ, MiB, 16)
    assert c.simple(16) == (0, 1, pattern(16))


def test_meta_contexts(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.greeting()
    c.option(nbd.OPT_SET_META_CONTEXT, meta_data(b"", ["base:allocation"]))
    assert c.replies()[0][0] == nbd.REP_ERR_INVALID    # structured replies first
    c.option(nbd.OPT_STRUCTURED_REPLY)
    assert c.replies() == [(nbd.REP_ACK, b"")]
    c.option(nbd.OPT_LIST_META_CONTEXT, meta_data(b"", []))
    names = [d[4:] for t, d in c.replies() if t == nbd.REP_META_CONTEXT]
    assert names == [b"base:allocation", b"qemu:allocation-depth"]
    c.option(nbd.OPT_LIST_META_CONTEXT, meta_data(b"", ["base:"]))
    assert [d[4:] for t, d in c.replies() if t == nbd.REP_META_CONTEXT] == [b"base:allocation"]
    c.option(nbd.OPT_SET_META_CONTEXT, meta_data(b"", ["base:allocation", "x-no:such"]))
    got = c.replies()
    assert [d[4:] for t, d in got if t == nbd.REP_META_CONTEXT] == [b"base:allocation"]
    c.option(nbd.OPT_SET_META_CONTEXT, meta_data(b"x", ["base:allocation"]))
    assert c.replies()[0][0] == nbd.REP_ERR_UNKNOWN
    c.option(nbd.OPT_SET_META_CONTEXT, b"\x00\x00\x00\x00\x00\x00\x00\x05ab")  # truncated
    assert c.replies()[0][0] == nbd.REP_ERR_INVALID


def test_handshake_time_limit(raw, serve, monkeypatch):
    monkeypatch.setattr(nbd, "HANDSHAKE_LIMIT", 0.5)
    srv = serve(raw)
    c = Client(srv.path, timeout=5)
    c.recv(18)                        # and then nothing
    t0 = time.monotonic()
    assert c.closed()
    assert time.monotonic() - t0 < 4
    second_client_served(srv)


# -- transmission: bad requests ------------------------------------------------------------

def test_bad_request_magic_closes_and_others_are_served(raw, serve, caplog):
    srv = serve(raw, shared=2)
    other = Client(srv.path)
    other.go()
    c = Client(srv.path)
    c.go()
    with caplog.at_level(logging.WARNING, "pykvm.export"):
        c.request(nbd.CMD_READ, 0, 512, magic=0x12345678)
        assert c.closed()
    assert "bad request magic 0x12345678" in caplog.text
    other.request(nbd.CMD_READ, MiB, 512, cookie=5)
    assert other.simple(512) == (0, 5, pattern(512))


def test_oversized_read_is_eoverflow(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    c.request(nbd.CMD_READ, 0, (32 << 20) + 1, cookie=3)
    assert c.simple()[:2] == (nbd.NBD_EOVERFLOW, 3)
    c.request(nbd.CMD_READ, MiB, 8, cookie=4)          # still in step
    assert c.simple(8) == (0, 4, pattern(8))


def test_oversized_read_structured_is_an_error_chunk(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go(structured=True)
    c.request(nbd.CMD_READ, 0, 0xFFFFFFFF, cookie=3)
    (flags, typ, cookie, data), = c.chunks()
    assert (typ, cookie) == (nbd.REPLY_TYPE_ERROR, 3)
    assert struct.unpack(">I", data[:4])[0] == nbd.NBD_EOVERFLOW


def test_oversized_write_is_einval_and_its_payload_skipped(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    n = (32 << 20) + 4096
    c.request(nbd.CMD_WRITE, 0, n, cookie=7)
    chunk = b"\xaa" * MiB
    sent = 0
    while sent < n:
        k = min(len(chunk), n - sent)
        c.s.sendall(chunk[:k])
        sent += k
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 7)
    c.request(nbd.CMD_READ, 0, 4096, cookie=8)
    assert c.simple(4096) == (0, 8, bytes(4096))       # nothing was written


def test_past_the_end(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    c.request(nbd.CMD_READ, SIZE - 512, 1024, cookie=1)
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 1)
    c.request(nbd.CMD_WRITE, SIZE, 512, cookie=2, data=b"\x11" * 512)
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 2)
    c.request(nbd.CMD_TRIM, (1 << 64) - 512, 1024, cookie=3)
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 3)
    c.request(nbd.CMD_WRITE_ZEROES, SIZE - 4096, 8192, cookie=4)
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 4)
    c.request(nbd.CMD_READ, SIZE - 512, 512, cookie=5)
    assert c.simple(512) == (0, 5, bytes(512))


def test_zero_length_read_simple_reply_and_the_server_goes_on(raw, serve):
    """A read of 0 bytes with simple replies: its reply, then the next ones (an
    empty payload queued behind the header kept the one server thread sending
    nothing, forever)."""
    srv = serve(raw)
    c = Client(srv.path, timeout=3)
    c.go()
    c.request(nbd.CMD_READ, MiB, 0, cookie=1)
    assert c.simple() == (0, 1, b"")
    c.request(nbd.CMD_READ, MiB, 512, cookie=2)
    assert c.simple(512) == (0, 2, pattern(512))
    c.request(nbd.CMD_DISC)
    assert c.closed()


def test_unknown_command_and_bad_flags_are_einval(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    c.request(42, 0, 512, cookie=1)
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 1)
    c.request(nbd.CMD_FLUSH, flags=0x8000, cookie=2)
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 2)
    c.request(nbd.CMD_READ, 0, 512, flags=nbd.CMD_FLAG_DF, cookie=3)   # DF needs structured
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 3)
    c.request(nbd.CMD_BLOCK_STATUS, 0, 512, cookie=4)                 # no context chosen
    assert c.simple()[:2] == (nbd.NBD_EINVAL, 4)
    c.request(nbd.CMD_FLUSH, cookie=5)
    assert c.simple() == (0, 5, b"")


def test_read_only_refuses_changes_with_eperm(raw, serve):
    before = raw.read_bytes()
    srv = serve(raw, read_only=True)
    c = Client(srv.path)
    c.go()
    assert c.flags & nbd.FLAG_READ_ONLY and not c.flags & nbd.FLAG_CAN_MULTI_CONN
    assert not c.flags & (nbd.FLAG_SEND_TRIM | nbd.FLAG_SEND_WRITE_ZEROES)
    c.request(nbd.CMD_WRITE, 0, 512, cookie=1, data=b"\x55" * 512)
    c.request(nbd.CMD_TRIM, MiB, 4096, cookie=2)
    c.request(nbd.CMD_WRITE_ZEROES, MiB, 4096, cookie=3)
    got = {c.simple()[1]: None for _ in range(3)}
    assert set(got) == {1, 2, 3}
    for cookie in (4,):
        c.request(nbd.CMD_WRITE, MiB, 4, cookie=cookie, data=b"abcd")
        assert c.simple()[:2] == (nbd.NBD_EPERM, cookie)
    c.request(nbd.CMD_READ, MiB, 16, cookie=5)
    assert c.simple(16) == (0, 5, pattern(16))
    srv.stop()
    assert raw.read_bytes() == before


@pytest.mark.parametrize("backend_read_only", [True, False], ids=["ro-image", "rw-image"])
def test_read_only_errors_are_eperm(raw, serve, backend_read_only):
    """The export refuses (rw-image: the image itself would take the write)."""
    before = raw.read_bytes()
    srv = serve(raw, read_only=True, backend_read_only=backend_read_only)
    c = Client(srv.path)
    c.go()
    for cookie, cmd in ((1, nbd.CMD_WRITE), (2, nbd.CMD_TRIM), (3, nbd.CMD_WRITE_ZEROES)):
        c.request(cmd, MiB, 512, cookie=cookie, data=b"\x01" * 512 if cmd == nbd.CMD_WRITE
                  else b"")
        assert c.simple()[:2] == (nbd.NBD_EPERM, cookie)
    srv.stop()
    assert raw.read_bytes() == before


# -- transmission: the data path -----------------------------------------------------------

def test_pipelined_requests_all_answered(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    data = pattern(8192, seed=3)
    batch = b""
    for i in range(64):
        batch += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1000 + i,
                             2 * MiB + i * 8192, 8192) + data
    c.s.sendall(batch)
    got = {c.simple()[1] for _ in range(64)}
    assert got == set(range(1000, 1064))
    c.request(nbd.CMD_FLUSH, cookie=1)
    assert c.simple() == (0, 1, b"")
    for i in range(64):
        c.request(nbd.CMD_READ, 2 * MiB + i * 8192, 8192, cookie=2000 + i)
    for _ in range(64):
        err, cookie, d = c.simple(8192)
        assert err == 0 and 2000 <= cookie < 2064 and d == data


def test_fua_write_and_zeroes(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    c.request(nbd.CMD_WRITE, 0, 4096, flags=nbd.CMD_FLAG_FUA, cookie=1, data=b"\x42" * 4096)
    assert c.simple() == (0, 1, b"")
    assert raw.read_bytes()[:4096] == b"\x42" * 4096
    c.request(nbd.CMD_WRITE_ZEROES, MiB, 8192, flags=nbd.CMD_FLAG_NO_HOLE, cookie=2)
    assert c.simple() == (0, 2, b"")
    c.request(nbd.CMD_TRIM, MiB + 8192, 8192, cookie=3)
    assert c.simple() == (0, 3, b"")
    c.request(nbd.CMD_READ, MiB, 16384, cookie=4)
    assert c.simple(16384) == (0, 4, bytes(16384))
    c.request(nbd.CMD_READ, MiB + 16384, 16, cookie=5)
    assert c.simple(16) == (0, 5, pattern(16384 + 16)[16384:])


def test_structured_read_sends_holes_and_df_one_chunk(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go(structured=True)
    assert c.flags & nbd.FLAG_SEND_DF
    c.request(nbd.CMD_READ, MiB - 128 * 1024, 256 * 1024, cookie=9)   # 128K hole + 64K + 64K hole
    chunks = c.chunks()
    kinds = [(typ, struct.unpack(">Q", d[:8])[0]) for _, typ, _, d in chunks]
    assert kinds == [(nbd.REPLY_TYPE_OFFSET_HOLE, MiB - 128 * 1024),
                     (nbd.REPLY_TYPE_OFFSET_DATA, MiB),
                     (nbd.REPLY_TYPE_OFFSET_HOLE, MiB + 64 * 1024)]
    assert chunks[1][3][8:] == pattern(64 << 10)
    assert struct.unpack(">I", chunks[0][3][8:])[0] == 128 * 1024
    c.request(nbd.CMD_READ, MiB - 128 * 1024, 256 * 1024, cookie=10, flags=nbd.CMD_FLAG_DF)
    (flags, typ, cookie, d), = c.chunks()
    assert typ == nbd.REPLY_TYPE_OFFSET_DATA and len(d) == 8 + 256 * 1024
    assert d[8:] == bytes(128 << 10) + pattern(64 << 10) + bytes(64 << 10)


def test_block_status_base_allocation_and_req_one(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go(structured=True, contexts=["base:allocation", "qemu:allocation-depth"])
    base = c.contexts["base:allocation"]
    c.request(nbd.CMD_BLOCK_STATUS, 0, SIZE, cookie=1)
    got = {}
    for flags, typ, cookie, d in c.chunks():
        assert typ == nbd.REPLY_TYPE_BLOCK_STATUS and cookie == 1
        (ctx,) = struct.unpack(">I", d[:4])
        got[ctx] = [struct.unpack(">II", d[i:i + 8]) for i in range(4, len(d), 8)]
    hz = nbd.STATE_HOLE | nbd.STATE_ZERO
    assert got[base] == [(MiB, hz), (64 << 10, 0), (SIZE - MiB - (64 << 10), hz)]
    assert got[c.contexts["qemu:allocation-depth"]] == [(SIZE, 1)]
    c.request(nbd.CMD_BLOCK_STATUS, 4096, SIZE - 4096, cookie=2, flags=nbd.CMD_FLAG_REQ_ONE)
    for flags, typ, cookie, d in c.chunks():
        assert len(d) == 12                          # one descriptor each
    c.request(nbd.CMD_BLOCK_STATUS, 0, 0, cookie=3)
    (flags, typ, cookie, d), = c.chunks()
    assert typ == nbd.REPLY_TYPE_ERROR and struct.unpack(">I", d[:4])[0] == nbd.NBD_EINVAL


def test_qcow2_block_status_depth_and_fast_zero(tmp_path, serve):
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(SIZE))
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", str(top)],
                   check=True, capture_output=True)
    srv = serve(top, fmt="qcow2")
    c = Client(srv.path)
    c.go(structured=True, contexts=["qemu:allocation-depth", "base:allocation"])
    c.request(nbd.CMD_BLOCK_STATUS, 0, SIZE, cookie=1)
    got = {}
    for flags, typ, cookie, d in c.chunks():
        (ctx,) = struct.unpack(">I", d[:4])
        got[ctx] = [struct.unpack(">II", d[i:i + 8]) for i in range(4, len(d), 8)]
    assert got[c.contexts["qemu:allocation-depth"]] == [(64 << 10, 1), (SIZE - (64 << 10), 2)]
    assert got[c.contexts["base:allocation"]] == [(SIZE, 0)]
    assert c.flags & nbd.FLAG_SEND_FAST_ZERO
    # an unaligned fast zero cannot be a metadata change: ENOTSUP, nothing written
    c.request(nbd.CMD_WRITE_ZEROES, 512, 4096, cookie=2, flags=nbd.CMD_FLAG_FAST_ZERO)
    (flags, typ, cookie, d), = c.chunks()
    assert typ == nbd.REPLY_TYPE_ERROR and struct.unpack(">I", d[:4])[0] == nbd.NBD_ENOTSUP
    c.request(nbd.CMD_WRITE_ZEROES, 128 << 10, 128 << 10, cookie=3, flags=nbd.CMD_FLAG_FAST_ZERO)
    assert c.simple() == (0, 3, b"")
    c.request(nbd.CMD_READ, 0, 512 << 10, cookie=4, flags=nbd.CMD_FLAG_DF)
    (flags, typ, cookie, d), = c.chunks()
    p = pattern(SIZE)
    assert d[8:] == b"\x33" * (64 << 10) + p[64 << 10:128 << 10] + bytes(128 << 10) + \
        p[256 << 10:512 << 10]


def test_bytes_in_flight_are_bounded(raw, serve, monkeypatch):
    """A client that sends reads and never reads the replies: the server stops
    taking requests once its bound is reached, and answers all of them later."""
    monkeypatch.setattr(nbd, "MAX_INFLIGHT_BYTES", 4 * MiB)
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    n = 256                               # 256 MiB of replies asked for
    c.s.setblocking(False)
    reqs = b"".join(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, i, 0, MiB)
                    for i in range(n))
    sent = 0
    deadline = time.monotonic() + 3
    while sent < len(reqs) and time.monotonic() < deadline:
        try:
            sent += c.s.send(reqs[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    time.sleep(0.5)
    (conn,) = srv.server.conns.values()
    held = conn.inflight_bytes + conn.out_bytes
    assert held <= 4 * MiB + MiB, held
    c.s.setblocking(True)
    c.s.sendall(reqs[sent:])
    for _ in range(n):
        err, cookie, d = c.simple(MiB)
        assert err == 0 and len(d) == MiB


def test_disc_ends_after_replies(raw, serve):
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    c.request(nbd.CMD_READ, MiB, 4096, cookie=1)
    c.request(nbd.CMD_DISC, cookie=2)
    assert c.simple(4096) == (0, 1, pattern(4096))
    assert c.closed()


@pytest.mark.parametrize("shared", [3, 0])
def test_multi_conn_only_with_room_for_several(raw, serve, shared):
    srv = serve(raw, shared=shared)
    clients = [Client(srv.path) for _ in range(5 if shared == 0 else 3)]
    for c in clients:                      # all of them at once (0: no limit)
        c.go()
        assert c.flags & nbd.FLAG_CAN_MULTI_CONN
    with pytest.raises(Exception, match="0 .no limit. or more"):
        nbd.NbdServer(srv.backend, srv.listener, shared=-1)


def test_not_persistent_returns_after_the_last_client(raw, tmp_path):
    backend = BlockBackend(str(raw), fmt="raw")
    srv = nbd.NbdServer(backend, nbd.listen(f"unix:{tmp_path}/s.sock"), shared=2)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    a = Client(f"{tmp_path}/s.sock")
    a.go()
    b = Client(f"{tmp_path}/s.sock")
    b.go()
    a.request(nbd.CMD_DISC)
    time.sleep(0.3)
    assert t.is_alive()                   # b is still there
    b.close()
    t.join(5)
    assert not t.is_alive()
    srv.close()
    backend.close()


def test_shared_one_makes_the_next_client_wait(raw, serve):
    srv = serve(raw)
    a = Client(srv.path)
    a.go()
    b = Client(srv.path, timeout=0.5)         # in the listen backlog
    with pytest.raises(socket.timeout):
        b.recv(18)
    a.request(nbd.CMD_DISC)
    b.s.settimeout(5)
    b.go()
    b.request(nbd.CMD_READ, MiB, 4, cookie=3)
    assert b.simple(4) == (0, 3, pattern(4))


def test_listen_refuses_a_file_in_the_way(tmp_path):
    from pykvm.errors import ConfigError
    p = tmp_path / "notasocket"
    p.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        nbd.listen(f"unix:{p}")
    with pytest.raises(ConfigError, match="not unix:PATH or HOST:PORT"):
        nbd.parse_addr("localhost")
    assert nbd.parse_addr("[::1]:10809") == ("tcp", ("::1", 10809))
    assert errno.EROFS in nbd._ERRNO


def test_pooled_buffers_never_mix_replies(raw, serve):
    """Large read and write buffers are reused: pipelined 256K reads of
    different regions, each checked against its own region, while writes of
    the same size go through the same pool."""
    srv = serve(raw)
    c = Client(srv.path)
    c.go()
    k = 256 << 10
    regions = {i: bytes([0x10 + i]) * k for i in range(8)}
    for i, data in regions.items():
        c.request(nbd.CMD_WRITE, i * k, k, cookie=100 + i, data=data)
    assert {c.simple()[1] for _ in regions} == {100 + i for i in regions}
    order = [(n * 5) % 8 for n in range(64)]
    c.s.sendall(b"".join(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 1000 + n,
                                     i * k, k) for n, i in enumerate(order)))
    for _ in order:
        err, cookie, d = c.simple(k)
        assert err == 0 and d == regions[order[cookie - 1000]], cookie
    assert srv.server._pooled > 0                  # the pool was used


def test_direct_io_asks_the_client_for_block_sizes(raw, tmp_path):
    """cache=none: the minimum block size is the O_DIRECT alignment, and a GO
    that did not ask for block sizes gets NBD_REP_ERR_BLOCK_SIZE_REQD."""
    backend = BlockBackend(str(raw), fmt="raw", cache="none")
    srv = nbd.NbdServer(backend, nbd.listen(f"unix:{tmp_path}/d.sock"), persistent=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        c = Client(f"{tmp_path}/d.sock")
        c.greeting()
        c.option(nbd.OPT_GO, info_data(b""))
        assert c.replies()[-1][0] == nbd.REP_ERR_BLOCK_SIZE_REQD
        c.option(nbd.OPT_GO, info_data(b"", (nbd.INFO_BLOCK_SIZE,)))
        got = c.replies()
        assert got[-1][0] == nbd.REP_ACK
        sizes = [struct.unpack(">HIII", d) for t_, d in got if t_ == nbd.REP_INFO
                 and d[:2] == struct.pack(">H", nbd.INFO_BLOCK_SIZE)]
        assert sizes[0][1] == backend.align and backend.align >= 512
        c.request(nbd.CMD_READ, MiB, 4096, cookie=1)
        assert c.simple(4096) == (0, 1, pattern(4096))
    finally:
        srv.stop()
        t.join(5)
        srv.close()
        backend.close()


def test_random_requests_never_crash_the_server(raw, serve):
    """Seeded random streams, before and after the handshake: request headers
    with the right magic and random fields (commands, flags, offsets, lengths),
    random option headers, plain garbage. Whatever each connection gets, the
    server lives and the next client is served."""
    import random
    srv = serve(raw, shared=4)
    for seed in range(40):
        rnd = random.Random(seed)
        c = Client(srv.path, timeout=5)
        stream = b""
        if seed % 4:
            c.go(structured=seed % 2 == 0,
                 contexts=["base:allocation", "qemu:allocation-depth"] if seed % 2 == 0 else ())
            for _ in range(rnd.randrange(1, 40)):
                cmd = rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 99])
                flags = rnd.choice([0, 0, 1, 2, 4, 8, 16, 32, rnd.randrange(1 << 16)])
                offset = rnd.choice([0, MiB, MiB, SIZE - 512, SIZE, rnd.randrange(1 << 64)])
                length = rnd.choice([0, 1, 512, 4096, 4096, 1 << 20, (32 << 20) + 1,
                                     rnd.randrange(1 << 32)])
                stream += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, rnd.randrange(
                    1 << 64), offset, length)
                if cmd == nbd.CMD_WRITE and length <= 4096:
                    stream += rnd.randbytes(length)
        else:
            c.greeting()
            for _ in range(rnd.randrange(1, 10)):
                data = rnd.randbytes(rnd.randrange(0, 64))
                stream += struct.pack(">QII", nbd.IHAVEOPT, rnd.randrange(0, 16), len(data)) + data
        stream += rnd.randbytes(rnd.randrange(0, 256))
        try:
            c.s.sendall(stream)
            c.s.settimeout(0.2)
            while c.s.recv(1 << 20):        # take the replies, so all of it is served
                pass
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        c.close()
    c = Client(srv.path)                    # (the streams wrote anywhere: write, then read)
    c.go()
    c.request(nbd.CMD_WRITE, 2 * MiB, 4096, cookie=1, data=pattern(4096, 5))
    assert c.simple() == (0, 1, b"")
    c.request(nbd.CMD_READ, 2 * MiB, 4096, cookie=2)
    assert c.simple(4096) == (0, 2, pattern(4096, 5))
    assert srv.thread.is_alive() and srv.error is None
