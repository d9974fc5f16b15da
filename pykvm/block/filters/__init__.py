"""Filter nodes: one child (``file``), requests pass through and are changed on
their way.

``FilterDriver`` forwards every part of the node interface to its child, so a
filter that changes nothing is this page; a real filter overrides what it
changes. The backend maps guest ranges through the first node below its
filters (``BlockBackend.driver``) and applies what the filters describe as
plain data (``throttle``: a throttle group the Python and C paths both
enforce), so the fast path keeps serving the disk.
"""
from __future__ import annotations

from ..driver import BlockDriver


class FilterDriver(BlockDriver):
    kind = "filter"
    child_roles = ("file",)

    def __init__(self, file: BlockDriver, read_only: bool = False):
        self.file = file
        self.read_only = read_only or file.read_only
        self.path = file.filename

    # what the node below is, the filter is
    size = property(lambda self: self.file.size)
    fd = property(lambda self: self.file.fd)
    bfd = property(lambda self: self.file.bfd)
    backing = property(lambda self: self.file.backing)
    identity_mapped = property(lambda self: self.file.identity_mapped)
    direct_map = property(lambda self: self.file.direct_map)
    map_version = property(lambda self: self.file.map_version)
    sync_fds = property(lambda self: self.file.sync_fds)
    growable = property(lambda self: self.file.growable)
    hole_discard = property(lambda self: self.file.hole_discard)
    request_alignment = property(lambda self: self.file.request_alignment)

    @property
    def children(self) -> list[tuple[str, BlockDriver]]:
        return [("file", self.file)]

    def map(self, offset, length):
        return self.file.map(offset, length)

    def data_at(self, offset, length, write=False):
        return self.file.data_at(offset, length, write)

    def direct_extents(self):
        return self.file.direct_extents()

    def map_for_write(self, offset, length):
        return self.file.map_for_write(offset, length)

    def commit(self, alloc):
        self.file.commit(alloc)

    def abort(self, alloc):
        self.file.abort(alloc)

    def read_compressed(self, extent):
        return self.file.read_compressed(extent)

    def erase_extents(self, offset, length):
        return self.file.erase_extents(offset, length)

    def discard(self, offset, length, punch):
        self.file.discard(offset, length, punch)

    def write_zeroes(self, offset, length, unmap):
        return self.file.write_zeroes(offset, length, unmap)

    def flush_metadata(self):
        self.file.flush_metadata()

    def debug_event(self, name):
        self.file.debug_event(name)

    def meta_error(self, offset, length):
        return self.file.meta_error(offset, length)
