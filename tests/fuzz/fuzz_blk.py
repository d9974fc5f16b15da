"""A virtio-blk request on both paths, differential: the Python path
(aio=python) and the C fast path (io_uring, native/blk.c), each a VirtioBlk
over virtio-MMIO on its own copy of a 1 MiB raw image, driven by the test
driver (tests/helpers/virtio_driver.py).

The bytes are one request chain, built the same way on both:

    [type][flags][sector: u64][status length][buffers: (length u16, kind)...]

type picks IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES or an unknown one;
flags: bit 0 the sector as given (else modulo the capacity + 8 sectors),
bit 1 indirect, bit 2 the header in one buffer with the first readable data.
A buffer of kind bit 0 is device-writable; a readable one holds the next
input bytes (DISCARD/WRITE_ZEROES segments, data). The status byte is a
writable buffer of 0-3 bytes at the end. Both paths must give the same used
length, status byte, writable buffer bytes, NEEDS_RESET decision and image
bytes; a device in NEEDS_RESET is reset and set up again.
"""
import atexit
import os
import shutil
import struct
import tempfile
import time

from tests.conftest import Engine
from tests.helpers.virtio_driver import wait_fd
from tests.unit.test_virtio_blk import Rig, pattern

EXPECTED = ()
DISK = 1 << 20
TYPES = (0, 1, 4, 8, 11, 13, 99)
MAX_BUFS = 6
DEADLINE = 0.9          # a request neither completed nor resetting the device: a hang

DIR = tempfile.mkdtemp(prefix="fuzz-blk-")
atexit.register(shutil.rmtree, DIR, True)
RIGS = []
for engine in (Engine("python", "writeback"), Engine("io_uring", "writeback")):
    path = os.path.join(DIR, f"{engine.name}.img")
    with open(path, "wb") as f:
        f.write(pattern(DISK))
    RIGS.append((Rig(path, "mmio", engine, queue=16), path))
    atexit.register(RIGS[-1][0].close)
assert RIGS[1][0].dev._fast is not None, "the C path does not serve the second rig"


def _decode(data: bytes):
    if len(data) < 11:
        return None
    rtype = TYPES[data[0] % len(TYPES)]
    flags = data[1]
    sector = struct.unpack_from("<Q", data, 2)[0]
    if not flags & 1:
        sector %= DISK // 512 + 8
    status_len = data[10] % 4
    bufs, pos = [], 11
    while pos + 3 <= len(data) and len(bufs) < MAX_BUFS:
        length = struct.unpack_from("<H", data, pos)[0] % 9000
        kind = data[pos + 2]
        pos += 3
        if kind & 1:
            bufs.append((True, length, b""))
        else:
            bufs.append((False, length, data[pos:pos + length].ljust(length, b"\0")))
            pos += length
    return rtype, flags, sector, status_len, bufs


def _serve(rig, request):
    rtype, flags, sector, status_len, spec = request
    d = rig.drv
    arena = d.vq.arena
    arena.next = arena.base
    header = struct.pack("<IIQ", rtype, 0, sector)
    bufs = []
    for writable, length, content in spec:
        if writable:
            bufs.append(arena.writable(length))
        elif flags & 4 and not bufs:
            bufs.append(arena.readable(header + content))
        else:
            bufs.append(arena.readable(content))
    if not (flags & 4 and spec and not spec[0][0]):
        bufs.insert(0, arena.readable(header))
    if status_len:
        bufs.append(arena.writable(status_len))
    head = d.submit(bufs, indirect=bool(flags & 2))
    deadline = time.monotonic() + DEADLINE
    used = []
    while not used and not d.needs_reset:
        used = d.vq.reap()
        if used:
            break
        d.vq.set_used_event(d.vq.last_used)
        assert time.monotonic() < deadline, "request neither completed nor NEEDS_RESET"
        wait_fd(d.t.interrupt_fd(0), 0.01)
    out = (used, d.needs_reset, [rig.mem.read(g, n) for g, n, w in bufs if w])
    assert not used or used[0][0] == head
    if d.needs_reset:
        d.t.ack_interrupts()
        d.init()
    return out


def one_input(data: bytes) -> None:
    request = _decode(data)
    if request is None:
        return
    results = [_serve(rig, request) for rig, _ in RIGS]
    assert results[0] == results[1], results
    images = []
    for _, path in RIGS:
        with open(path, "rb") as f:
            images.append(f.read())
    assert images[0] == images[1], "image contents differ"
