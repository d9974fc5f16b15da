"""The vhost-user message parser and the back-end's state machine
(pykvm/virtio/transport/vhost_user.py), serving a virtio-blk device.

The bytes are what a front-end sends, message after message:

    [fds][header: request u32, flags u32, size u32][payload: size bytes]...

``fds`` is not on the wire: it says which file descriptors travel with the
message (0: none, 1: an eventfd, 2: 1 + bits 2-4 memfds of 1 MiB, 3: a memfd
of 4 KiB). A payload longer than the input is cut short, as by a front-end that
stops mid-message. The messages go over a Unix socket pair to a
``VhostUserSession`` whose ``serve()`` runs until the input is used up, then
the session is closed. ``serve()`` answers every bad message itself (one log
line, the connection closed), so nothing at all may escape it.
"""
import atexit
import os
import shutil
import socket
import struct
import tempfile

from pykvm.machine import DiskSpec, open_disk
from pykvm.virtio.blk import VirtioBlk
from pykvm.virtio.transport.vhost_user import VhostUserSession

EXPECTED = ()
MAX_FDS = 64
MEMFD_SIZE = 1 << 20

DIR = tempfile.mkdtemp(prefix="fuzz-vhost-user-")
atexit.register(shutil.rmtree, DIR, True)
with open(os.path.join(DIR, "disk.img"), "wb") as f:
    f.truncate(1 << 20)
DEVICE = VirtioBlk(open_disk(DiskSpec.parse(f"file={DIR}/disk.img,aio=python")), serial="fuzz")
atexit.register(DEVICE.close)


def _memfd(size: int) -> int:
    fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _fds(spec: int, budget: int) -> list[int]:
    kind = spec & 3
    if kind == 1 and budget >= 1:
        return [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
    if kind == 2:
        return [_memfd(MEMFD_SIZE) for _ in range(min(1 + (spec >> 2 & 7), budget))]
    if kind == 3 and budget >= 1:
        return [_memfd(4096)]
    return []


def one_input(data: bytes) -> None:
    front, back = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    session = VhostUserSession(DEVICE, back, name="fuzz")
    try:
        pos, budget = 0, MAX_FDS
        while pos < len(data):
            spec = data[pos]
            head = data[pos + 1:pos + 13]
            size = struct.unpack_from("=I", head, 8)[0] if len(head) == 12 else 0
            msg = head + data[pos + 13:pos + 13 + size]
            pos += 13 + size
            fds = _fds(spec, budget)
            budget -= len(fds)
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                front.sendmsg([msg], anc if fds else [])
            finally:
                for fd in fds:
                    os.close(fd)
        front.shutdown(socket.SHUT_WR)
        session.serve()
    finally:
        session.close()
        front.close()
        back.close()
