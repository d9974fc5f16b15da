"""The raw format: the guest's byte N is byte ``offset + N`` of its ``file`` child.

QEMU's ``offset=`` and ``size=`` options expose a window of the file (a
partition of a whole-disk image, say); without them the disk is the whole
file, and the backend serves it on its identity fast path.
"""
from __future__ import annotations

from .driver import BlockDriver, BlockError, DirectExtent, Extent, register
from .file import FileDriver

SECTOR = 512


@register
class RawDriver(BlockDriver):
    format_name = "raw"
    supports_discard = True
    identity_mapped = True
    options = {"offset": "size", "size": "size"}

    @classmethod
    def probe(cls, header: bytes, path: str) -> int:
        return 1  # anything is a raw image; every other format scores higher

    def __init__(self, file: BlockDriver, read_only: bool = False, offset: int = 0,
                 size: int | None = None):
        self.file = file
        self.path = file.path
        self.read_only = read_only
        self.fd = file.fd
        self.base = offset
        avail = file.size - offset
        if offset < 0 or offset > file.size:
            raise BlockError(self.path, f"offset={offset} is past the end of the file "
                             f"({file.size} bytes)")
        if size is not None:
            if size % SECTOR:
                raise BlockError(self.path, f"size={size} is not a multiple of {SECTOR}")
            if size > avail:
                raise BlockError(self.path, f"offset={offset} plus size={size} is past the end "
                                 f"of the file ({file.size} bytes)")
        self.size = avail if size is None else size
        self._window = offset != 0 or size is not None
        # a window is served through data_at/direct_extents; the whole file on
        # the backend's identity fast path
        self.identity_mapped = offset == 0
        self.direct_map = offset != 0

    @property
    def is_block_device(self) -> bool:
        return self.file.is_block_device

    hole_discard = property(lambda self: self.file.hole_discard)
    request_alignment = property(lambda self: self.file.request_alignment)

    @property
    def sync_fds(self) -> list[int]:
        return [self.fd]

    def map(self, offset: int, length: int) -> list[Extent]:
        return [Extent("data", offset, length, self.fd, self.base + offset)]

    def erase_extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return self.file.erase_extents(self.base + offset, length)

    def data_at(self, offset: int, length: int, write: bool = False) -> int:
        return self.base + offset

    def direct_extents(self):
        return [DirectExtent(0, self.size, self.fd, self.base, not self.read_only)]

    def discard(self, offset: int, length: int, punch: bool) -> None:
        self.file.discard(self.base + offset, length, punch)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> list[tuple[int, int]]:
        return [(off - self.base, n)
                for off, n in self.file.write_zeroes(self.base + offset, length, unmap)]

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, has_data) runs of the file under the guest range."""
        return [(off - self.base, n, data)
                for off, n, data in self.file.allocated(self.base + offset, length)]

    def resize(self, size: int) -> None:
        if self._window:
            raise BlockError(self.path, "cannot resize a raw node with offset= or size=")
        self.file.resize(size)
        self.size = size

    def info(self) -> dict:
        return {}

    def close_node(self) -> None:
        self.fd = -1            # the file node below closes it

    @classmethod
    def create(cls, path: str, size: int, preallocation: str = "off", **opts) -> None:
        if opts:
            raise BlockError(path, f"raw does not support option(s) {', '.join(sorted(opts))}")
        FileDriver.create(path, size, preallocation)
