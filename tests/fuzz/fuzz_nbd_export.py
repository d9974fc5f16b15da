"""The NBD export's handshake and request parser (pykvm/export/nbd.py, the
server of ``pykvm serve --nbd``), and every reply it sends, checked.

The first byte picks the export: 0 a raw file, 1 a qcow2 image (4 KiB
clusters), 2 a copy of the raw file served read-only; each 1 MiB with data and holes.
Then operations, each an opcode byte and its arguments, become a client's
bytes on the wire:

    0 FLAGS f         client flags: f & 3 (bit 7: four bytes of the input as they are)
    1 OPTION o b ...  an option: o picks it (EXPORT_NAME, ABORT, LIST, STARTTLS,
                      INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT,
                      SET_META_CONTEXT, or a u32 of the input); b: its data
                      (bit 0 a wrong export name, bits 1-2 how many information
                      requests or queries, each one byte of the input; bit 6 a
                      length field of the input instead of the data's; bit 7
                      with other options: b & 0x3f bytes of the input as data)
    2 REQUEST c f o l a request: c the command (READ, WRITE, DISC, FLUSH, TRIM,
                      WRITE_ZEROES, BLOCK_STATUS, 5, or a byte of the input),
                      f its flags (bit 7: a u16 of the input), o and l pick the
                      offset and length from the edges of the export (or a
                      u64 / u32 of the input); a WRITE's payload follows, at
                      most 1 MiB of it
    3 RAW n ...       n bytes of the input as they are
    4 BADMAGIC        a request header with a wrong magic
    5 PUMP            the server runs until idle (the replies so far come back
                      before the next bytes: pipelining varies)
    6 EOF             the client's end of the stream, now

Every cookie is different. The server runs in this thread (``step()``) on a
Unix socket to it; the client side reads everything it sends. At the end of
the input the client shuts down its side; the server must then close the
connection, and its requests complete. Nothing may escape the server (its
_Close is the clean end it logs), and the bytes that came back must parse:
the greeting, option replies to options that were sent (with a correct size
in NBD_INFO_EXPORT), and in transmission only replies with a correct magic to a
cookie that was sent and not yet answered in full (simple replies with the
read's payload; chunks inside the read's range, holes and data covering it
exactly once; block status only for a negotiated context, within the export;
error chunks well formed). A reply may be cut short only where the
connection ends.
"""
import atexit
import os
import shutil
import socket
import struct
import subprocess
import tempfile

from pykvm.block import BlockBackend
from pykvm.export import nbd as N


class ReplyError(AssertionError):
    """The server sent something the protocol does not allow."""


EXPECTED = ()
SIZE = 1 << 20
MAX_PAYLOAD = 1 << 20
MAX_STEPS = 20000

DIR = tempfile.mkdtemp(prefix="fuzz-nbd-export-")
atexit.register(shutil.rmtree, DIR, True)


def _images():
    raw = os.path.join(DIR, "disk.raw")
    with open(raw, "wb") as f:
        f.truncate(SIZE)
        f.seek(64 << 10)
        f.write(b"\x5a" * (64 << 10))
        f.seek(SIZE - 4096)
        f.write(b"\xa5" * 4096)
    qcow2 = os.path.join(DIR, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    qcow2, str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 8k 16k",
                    "-c", "write -z 64k 8k", qcow2], check=True, stdout=subprocess.DEVNULL)
    ro = os.path.join(DIR, "read-only.raw")
    shutil.copy(raw, ro)
    return raw, qcow2, ro


RAW, QCOW2, RO = _images()
SERVERS = []
for _i, (_path, _fmt, _ro) in enumerate(((RAW, "raw", False), (QCOW2, "qcow2", False),
                                         (RO, "raw", True))):
    _backend = BlockBackend(_path, fmt=_fmt, read_only=_ro)
    _sock = os.path.join(DIR, f"nbd{_i}.sock")
    _server = N.NbdServer(_backend, N.listen(f"unix:{_sock}"), read_only=_ro, persistent=True,
                          description="fuzz")
    SERVERS.append((_server, _sock))
    atexit.register(_backend.close)
    atexit.register(_server.close)

OPTIONS = (N.OPT_EXPORT_NAME, N.OPT_ABORT, N.OPT_LIST, N.OPT_STARTTLS, N.OPT_INFO, N.OPT_GO,
           N.OPT_STRUCTURED_REPLY, N.OPT_LIST_META_CONTEXT, N.OPT_SET_META_CONTEXT)
QUERIES = (b"base:allocation", b"qemu:allocation-depth", b"base:", b"qemu:", b"",
           b"bogus:context")
COMMANDS = (N.CMD_READ, N.CMD_WRITE, N.CMD_DISC, N.CMD_FLUSH, N.CMD_TRIM,
            N.CMD_WRITE_ZEROES, N.CMD_BLOCK_STATUS, 5)
OFFSETS = (0, 512, 4096, 64 << 10, SIZE - 4096, SIZE - 512, SIZE, SIZE + 4096, 1 << 63)
LENGTHS = (0, 1, 512, 4096, 64 << 10, 128 << 10, SIZE, N.MAX_BLOCK, N.MAX_BLOCK + 1)


class _In:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def __bool__(self):
        return self.pos < len(self.data)

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    def u(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]


class _Client:
    """What was sent: the options, the requests by cookie."""

    def __init__(self):
        self.options: set[int] = set()
        self.requests: dict[int, tuple] = {}
        self.cookie = 0


def _option(inp: _In, cl: _Client) -> bytes:
    o = inp.byte()
    opt = OPTIONS[o % 10] if o % 10 < 9 else inp.u(">I")
    b = inp.byte()
    name = b"x" if b & 1 else b""
    n = b >> 1 & 3
    if opt in (N.OPT_INFO, N.OPT_GO):
        reqs = [inp.byte() & 7 for _ in range(n)]
        data = struct.pack(">I", len(name)) + name + struct.pack(f">H{n}H", n, *reqs)
    elif opt in (N.OPT_LIST_META_CONTEXT, N.OPT_SET_META_CONTEXT):
        qs = [QUERIES[inp.byte() % len(QUERIES)] for _ in range(n)]
        data = (struct.pack(">I", len(name)) + name + struct.pack(">I", n)
                + b"".join(struct.pack(">I", len(q)) + q for q in qs))
    elif opt == N.OPT_EXPORT_NAME and not b & 0x80:
        data = name
    else:
        data = inp.take(b & 0x3F) if b & 0x80 else b""
    length = inp.u(">I") if b & 0x40 else len(data)
    cl.options.add(opt)
    return struct.pack(">QII", N.IHAVEOPT, opt, length) + data


def _request(inp: _In, cl: _Client) -> bytes:
    c = inp.byte()
    cmd = COMMANDS[c % 9] if c % 9 < 8 else inp.byte()
    f = inp.byte()
    flags = inp.u(">H") if f & 0x80 else f & 0x1F
    o = inp.byte()
    offset = OFFSETS[o % 10] if o % 10 < 9 else inp.u(">Q")
    offset += (o >> 4) * 512 if offset < SIZE else 0
    ln = inp.byte()
    length = LENGTHS[ln % 10] if ln % 10 < 9 else inp.u(">I")
    cl.cookie += 1
    cl.requests[cl.cookie] = (cmd, flags, offset, length)
    wire = struct.pack(">IHHQQI", N.REQUEST_MAGIC, flags, cmd, cl.cookie, offset, length)
    if cmd == N.CMD_WRITE:
        wire += bytes([cl.cookie & 0xFF]) * min(length, MAX_PAYLOAD)
    return wire


def _wire(inp: _In, cl: _Client) -> tuple[list[bytes], bool]:
    """The client's bytes, in pieces (a PUMP between two), and whether it sent EOF."""
    pieces, cur = [], bytearray()
    while inp:
        op = inp.byte() % 7
        if op == 0:
            f = inp.byte()
            cur += inp.take(4) if f & 0x80 else struct.pack(">I", f & 3)
        elif op == 1:
            cur += _option(inp, cl)
        elif op == 2:
            cur += _request(inp, cl)
        elif op == 3:
            cur += inp.take(inp.byte())
        elif op == 4:
            cl.cookie += 1
            cur += struct.pack(">IHHQQI", 0x25609514, 0, 0, cl.cookie, 0, 512)
        elif op == 5:
            pieces.append(bytes(cur))
            cur = bytearray()
        else:
            pieces.append(bytes(cur))
            return pieces, True
    pieces.append(bytes(cur))
    return pieces, False


class _Out:
    """The server's bytes, parsed; a cut only at the end."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int):
        if self.left() < n:
            raise EOFError
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def _check(out: bytes, cl: _Client, size: int) -> None:
    o = _Out(out)
    try:
        _check_stream(o, cl, size)
    except EOFError:
        pass                    # the connection ended inside a reply


def _check_stream(o: _Out, cl: _Client, size: int) -> None:
    magic, ihaveopt, hflags = struct.unpack(">QQH", o.take(18))
    if (magic, ihaveopt, hflags) != (N.NBDMAGIC, N.IHAVEOPT, 3):
        raise ReplyError(f"greeting {magic:#x} {ihaveopt:#x} {hflags:#x}")
    structured, contexts, pending = False, set(), set()
    while True:
        if o.left() == 0:
            return
        if o.left() >= 8 and struct.unpack_from(">Q", o.data, o.pos)[0] == N.REPLY_MAGIC:
            _, opt, typ, ln = struct.unpack(">QIII", o.take(20))
            if opt not in cl.options:
                raise ReplyError(f"a reply to option {opt}, never sent")
            if ln > N.MAX_OPTION:
                raise ReplyError(f"option reply of {ln} bytes")
            data = o.take(ln)
            if typ == N.REP_INFO and len(data) >= 2 and \
                    struct.unpack_from(">H", data)[0] == N.INFO_EXPORT:
                if len(data) != 12 or struct.unpack_from(">Q", data, 2)[0] != size:
                    raise ReplyError(f"NBD_INFO_EXPORT {data.hex()}")
            if opt == N.OPT_STRUCTURED_REPLY and typ == N.REP_ACK:
                structured = True
            if opt == N.OPT_SET_META_CONTEXT:
                if typ == N.REP_META_CONTEXT:
                    pending.add(struct.unpack_from(">I", data)[0])
                elif typ == N.REP_ACK:
                    contexts, pending = pending, set()
                else:
                    pending = set()
            if opt == N.OPT_GO and typ == N.REP_ACK:
                break
            continue
        if N.OPT_EXPORT_NAME not in cl.options:
            raise ReplyError(f"not an option reply: {o.data[o.pos:o.pos + 20].hex()}")
        esize, _ = struct.unpack(">QH", o.take(10))
        if esize != size:
            raise ReplyError(f"export size {esize}")
        if o.left() and o.data[o.pos] == 0:
            if o.take(124) != bytes(124):
                raise ReplyError("NBD_OPT_EXPORT_NAME reply: padding not zeroes")
        break
    _check_transmission(o, cl, size, structured, contexts)


def _check_transmission(o: _Out, cl: _Client, size: int, structured: bool,
                        contexts: set) -> None:
    done: set[int] = set()
    got: dict[int, list] = {}           # cookie -> (offset, length) of read chunks

    def request(cookie):
        if cookie not in cl.requests or cookie in done:
            raise ReplyError(f"a reply to cookie {cookie}: "
                             + ("answered already" if cookie in done else "never sent"))
        cmd = cl.requests[cookie][0]
        if cmd == N.CMD_DISC:
            raise ReplyError(f"a reply to NBD_CMD_DISC (cookie {cookie})")
        return cl.requests[cookie]

    while o.left():
        (magic,) = struct.unpack(">I", o.take(4))
        if magic == N.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", o.take(12))
            cmd, flags, offset, length = request(cookie)
            if err == 0 and cmd == N.CMD_READ:
                if structured:
                    raise ReplyError(f"a simple reply to a read (cookie {cookie}) after "
                                     f"structured replies were negotiated")
                o.take(length)
            if err == 0 and cmd == N.CMD_BLOCK_STATUS:
                raise ReplyError(f"block status answered by a simple reply (cookie {cookie})")
            if structured and err:
                raise ReplyError(f"a simple error reply (cookie {cookie}) after structured "
                                 f"replies were negotiated")
            done.add(cookie)
            continue
        if magic != N.STRUCTURED_REPLY_MAGIC or not structured:
            raise ReplyError(f"reply magic {magic:#x}"
                             + ("" if structured else " (structured replies not negotiated)"))
        rflags, typ, cookie, ln = struct.unpack(">HHQI", o.take(16))
        cmd, flags, offset, length = request(cookie)
        if ln > N.MAX_BLOCK + 8 + 4096:
            raise ReplyError(f"chunk of {ln} bytes")
        body = o.take(ln)
        if typ == N.REPLY_TYPE_ERROR:
            if ln < 6:
                raise ReplyError(f"error chunk of {ln} bytes")
            err, mlen = struct.unpack_from(">IH", body)
            if err == 0 or mlen > ln - 6:
                raise ReplyError(f"error chunk: error {err}, message of {mlen} in {ln}")
        elif typ in (N.REPLY_TYPE_OFFSET_DATA, N.REPLY_TYPE_OFFSET_HOLE):
            if cmd != N.CMD_READ or ln < (8 if typ == N.REPLY_TYPE_OFFSET_DATA else 12):
                raise ReplyError(f"chunk type {typ} of {ln} bytes for command {cmd}")
            (off,) = struct.unpack_from(">Q", body)
            n = ln - 8 if typ == N.REPLY_TYPE_OFFSET_DATA else struct.unpack_from(">I", body, 8)[0]
            if n == 0 or off < offset or off + n > offset + length:
                raise ReplyError(f"chunk [{off}, +{n}) outside the read [{offset}, +{length})")
            got.setdefault(cookie, []).append((off, n))
        elif typ == N.REPLY_TYPE_BLOCK_STATUS:
            if cmd != N.CMD_BLOCK_STATUS or ln < 12 or (ln - 4) % 8:
                raise ReplyError(f"block status chunk of {ln} bytes for command {cmd}")
            (ctx,) = struct.unpack_from(">I", body)
            if ctx not in contexts:
                raise ReplyError(f"block status for context {ctx}, not negotiated")
            descs = [struct.unpack_from(">II", body, p) for p in range(4, ln, 8)]
            if flags & N.CMD_FLAG_REQ_ONE and len(descs) != 1:
                raise ReplyError(f"{len(descs)} extents with NBD_CMD_FLAG_REQ_ONE")
            if any(n == 0 for n, _ in descs) or offset + sum(n for n, _ in descs) > size:
                raise ReplyError(f"extents {descs} from {offset}: empty or past the end")
        elif typ == N.REPLY_TYPE_NONE:
            if ln or not rflags & N.REPLY_FLAG_DONE:
                raise ReplyError(f"NBD_REPLY_TYPE_NONE of {ln} bytes, flags {rflags:#x}")
        else:
            raise ReplyError(f"chunk type {typ}")
        if rflags & N.REPLY_FLAG_DONE:
            done.add(cookie)
            if cmd == N.CMD_READ and typ != N.REPLY_TYPE_ERROR:
                pos = offset
                for off, n in sorted(got.pop(cookie, [])):
                    if off != pos:
                        raise ReplyError(f"read [{offset}, +{length}): chunks leave "
                                         f"[{pos}, {off}) or overlap")
                    pos += n
                if pos != offset + length:
                    raise ReplyError(f"read [{offset}, +{length}): chunks end at {pos}")


def _recv_all(sock, out: bytearray) -> bool:
    """Whatever the server sent so far; False at its end of the stream."""
    while True:
        try:
            b = sock.recv(1 << 20)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False
        if not b:
            return False
        out += b


def one_input(data: bytes) -> None:
    if not data:
        return
    server, path = SERVERS[data[0] % len(SERVERS)]
    cl = _Client()
    pieces, _ = _wire(_In(data[1:]), cl)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    out = bytearray()
    try:
        sock.connect(path)
        sock.setblocking(False)
        open_ = True
        steps = 0
        for piece in pieces:
            view = memoryview(piece)
            while view and open_:
                try:
                    n = sock.send(view)
                    view = view[n:]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    open_ = False
                    break
                server.step(0)
                open_ = _recv_all(sock, out) and open_
                steps += 1
                if steps > MAX_STEPS:
                    raise AssertionError("the server took no more bytes")
            # a PUMP: the server runs until it has nothing more to say
            while open_ and (server.conns or server._reqs) and steps < MAX_STEPS:
                server.step(0.001)
                before = len(out)
                open_ = _recv_all(sock, out)
                steps += 1
                if len(out) == before and not server._reqs:
                    break
        if open_:
            sock.shutdown(socket.SHUT_WR)
        while steps < MAX_STEPS:
            server.step(0.001)
            open_ = _recv_all(sock, out) and open_
            steps += 1
            if not server.conns and not server._reqs:
                break
        if server.conns or server._reqs:
            raise AssertionError(f"after the client's end: {len(server.conns)} connections "
                                 f"and {len(server._reqs)} requests still there")
        _recv_all(sock, out)
    finally:
        sock.close()
    _check(bytes(out), cl, server.size)
