"""The raw format: the guest's byte N is the file's byte N."""
from __future__ import annotations

import errno
import os
import stat

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
    try:
        return os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EINVAL and direct:
            raise BlockError(path, "this file system does not support O_DIRECT, which "
                             "cache=none and cache=directsync need; use cache=writeback "
                             "or cache=writethrough") from None
        raise BlockError(path, "cannot open", e.errno) from None


@register
class RawDriver(BlockDriver):
    format_name = "raw"
    supports_discard = True
    identity_mapped = True

    @classmethod
    def probe(cls, header: bytes, path: str) -> int:
        return 1  # anything is a raw image; every other format scores higher

    def __init__(self, path: str, read_only: bool = False, direct: bool = False):
        self.path = path
        self.read_only = read_only
        self.fd = open_file(path, read_only, direct)
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(self.fd)
            raise BlockError(path, "not a regular file or block device")
        self.is_block_device = stat.S_ISBLK(st.st_mode)

    def map(self, offset: int, length: int) -> list[Extent]:
        return [Extent("data", offset, length, self.fd, offset)]

    def discard(self, offset: int, length: int, punch: bool) -> None:
        if punch:
            fallocate(self.fd, PUNCH, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> list[tuple[int, int]]:
        if fallocate(self.fd, PUNCH if unmap else ZERO_RANGE, offset, length) == 0:
            return []
        return [(offset, length)]

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
        os.ftruncate(self.fd, size)
        self.size = size

    @classmethod
    def create(cls, path: str, size: int, preallocation: str = "off", **opts) -> None:
        if opts:
            raise BlockError(path, f"raw does not support option(s) {', '.join(sorted(opts))}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise BlockError(path, "cannot create", e.errno) from None
        try:
            os.ftruncate(fd, size)
            preallocate(fd, 0, size, preallocation, path)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
