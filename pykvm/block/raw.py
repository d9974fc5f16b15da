"""The raw format: the guest's byte N is the file's byte N."""
from __future__ import annotations

import errno
import os
import stat

from .driver import BlockDriver, BlockError, Extent, register


@register
class RawDriver(BlockDriver):
    format_name = "raw"
    supports_discard = True

    @classmethod
    def probe(cls, header: bytes, path: str) -> int:
        return 1  # anything is a raw image; every other format scores higher

    def __init__(self, path: str, read_only: bool = False, direct: bool = False):
        self.path = path
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            if e.errno == errno.EINVAL and direct:
                raise BlockError(path, "this file system does not support O_DIRECT, which "
                                 "cache=none and cache=directsync need; use cache=writeback "
                                 "or cache=writethrough") from None
            raise BlockError(path, "cannot open", e.errno) from None
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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
