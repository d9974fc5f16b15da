"""The ``file`` protocol node: a regular file or a host block device.

A protocol node owns the bytes: it opens the file (O_DIRECT when the cache
mode says so, plus a buffered descriptor of the same file for the format
nodes' metadata and synchronous copies), knows its size and alignment, and
gives space back: hole punching and FALLOC_FL_ZERO_RANGE on a regular file,
BLKDISCARD and BLKZEROOUT on a block device. It maps guest byte N to its
byte N, so a format node above it (or the backend, for raw) reads and writes
its descriptors directly.

``host_device`` is the same driver for a block device, as in QEMU.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from .._native import lib
from .driver import BlockDriver, BlockError, Extent, register


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2): 0 or -errno."""
    return lib.pykvm_fallocate(fd, mode, offset, length)


FALLOC_KEEP_SIZE = lib.FALLOC_FL_KEEP_SIZE
PUNCH = lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE
ZERO_RANGE = lib.FALLOC_FL_ZERO_RANGE | lib.FALLOC_FL_KEEP_SIZE


def open_file(path: str, read_only: bool, direct: bool) -> int:
    """Open an image file; O_DIRECT refused by the file system is one clear line."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    if "\0" in path:   # a qcow2 header's backing file name, a json: filename
        raise BlockError(path.replace("\0", "\\0"), "file name holds a NUL byte")
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EINVAL and direct:
            raise BlockError(path, "this file system does not support O_DIRECT, which "
                             "cache=none and cache=directsync need; use cache=writeback "
                             "or cache=writethrough") from None
        raise BlockError(path, "cannot open", e.errno) from None


def _blk_range_ioctl(fd: int, request: int, offset: int, length: int) -> int:
    """BLKDISCARD / BLKZEROOUT on [offset, offset+length): 0 or -errno."""
    try:
        fcntl.ioctl(fd, request, struct.pack("=QQ", offset, length))
        return 0
    except OSError as e:
        return -(e.errno or errno.EIO)


@register
class FileDriver(BlockDriver):
    format_name = "file"
    kind = "protocol"
    supports_discard = True
    identity_mapped = True
    child_roles = ()
    options = {"filename": "str", "aio": ("threads", "native", "io_uring", "python"),
               "locking": ("on", "off", "auto")}

    def __init__(self, filename: str, read_only: bool = False, direct: bool = False,
                 aio: str | None = None, locking: str = "auto"):
        self.path = filename
        self.read_only = read_only
        self.direct = direct
        self.aio = aio              # the AIO engine the user asked for on this file (file.aio=)
        self.locking = locking      # file.locking=: on | off | auto (QEMU's)
        self.image_lock = None
        self.fd = self.bfd = -1
        self.fd = open_file(filename, read_only, direct)
        try:
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
            else:
                raise BlockError(filename, "not a regular file or block device")
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self._check_kind()
            # format metadata and synchronous copies use ordinary (unaligned)
            # Python buffers: a buffered descriptor of the same file
            self.bfd = open_file(filename, read_only, False) if direct else self.fd
        except BaseException:
            self.close_node()
            raise

    growable = property(lambda self: not self.is_block_device)
    hole_discard = property(lambda self: not self.is_block_device)

    def _check_kind(self) -> None:
        """driver=file takes either kind of file; host_device only a block device."""

    def lock(self, use) -> None:
        """Hold what the nodes above ask of this file (locking.Use) as QEMU's
        lock bytes on its descriptor, or refuse in one line naming what
        another user holds."""
        from .locking import ImageLock
        if self.image_lock is None:
            self.image_lock = ImageLock()
        self.image_lock.apply(self.bfd, self.path, use.perms, use.shared, self.locking)

    def map(self, offset: int, length: int) -> list[Extent]:
        return [Extent("data", offset, length, self.fd, offset)]

    def data_at(self, offset: int, length: int, write: bool = False) -> int:
        return offset

    def erase_extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return [(self.bfd, offset, length)]

    def discard(self, offset: int, length: int, punch: bool) -> None:
        """Give the range back: a hole in a file, BLKDISCARD on a device (a hint:
        refused is not an error)."""
        if not punch:
            return
        if self.is_block_device:
            _blk_range_ioctl(self.fd, lib.BLKDISCARD, offset, length)
        else:
            fallocate(self.fd, PUNCH, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> list[tuple[int, int]]:
        """Zero the range without writing data where the file system or device
        can (a hole, FALLOC_FL_ZERO_RANGE, BLKZEROOUT); else it is left to write."""
        if self.is_block_device:
            rc = _blk_range_ioctl(self.fd, lib.BLKZEROOUT, offset, length)
        else:
            rc = fallocate(self.fd, PUNCH if unmap else ZERO_RANGE, offset, length)
        return [] if rc == 0 else [(offset, length)]

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, has_data) runs, from SEEK_DATA/SEEK_HOLE."""
        out = []
        end = offset + length
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                data = end
            data = min(data, end)
            if data > pos:
                out.append((pos, data - pos, False))
            if data >= end:
                break
            try:
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(hole, end)
            out.append((data, hole - data, True))
            pos = hole
        return out

    def resize(self, size: int) -> None:
        if self.is_block_device:
            raise BlockError(self.path, "cannot resize a block device")
        os.ftruncate(self.fd, size)
        self.size = size

    def info(self) -> dict:
        """What qemu-img prints of a protocol child: its type, length, disk size."""
        st = os.fstat(self.fd)
        return {"filename": self.path, "protocol-type": self.format_name,
                "file-length": self.size, "actual-size": st.st_blocks * 512}

    @classmethod
    def create(cls, path: str, size: int, preallocation: str = "off") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise BlockError(path, "cannot create", e.errno) from None
        try:
            os.ftruncate(fd, size)
            preallocate(fd, 0, size, preallocation, path)
        finally:
            os.close(fd)

    def abandon(self) -> None:
        self._closed = True
        self.close_node()

    def close_node(self) -> None:
        if self.image_lock is not None:
            self.image_lock.release()
        for fd in {self.fd, self.bfd} - {-1}:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd = self.bfd = -1


@register
class HostDeviceDriver(FileDriver):
    format_name = "host_device"

    def _check_kind(self) -> None:
        if not self.is_block_device:
            raise BlockError(self.path, "'host_device' driver requires a block device "
                             "(use driver=file for a regular file)")


def preallocate(fd: int, offset: int, length: int, mode: str, path: str) -> None:
    """preallocation=off|metadata|falloc|full over a byte range of a file."""
    if mode in ("off", "metadata") or length <= 0:
        return
    if mode == "falloc":
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as e:
            raise BlockError(path, "preallocation=falloc", e.errno) from None
        return
    if mode == "full":
        chunk = bytes(1 << 20)
        pos = 0
        while pos < length:
            n = min(length - pos, len(chunk))
            os.pwrite(fd, chunk[:n], offset + pos)
            pos += n
        return
    raise BlockError(path, f"unknown preallocation mode {mode!r} (off, metadata, falloc, full)")
