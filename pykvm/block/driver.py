"""Block drivers: capability data plus a few methods, and a registry.

A driver opens an image and answers ``map(offset, length)``: where each
piece of a guest range lives (data in a host file at some offset, zeroes,
unallocated, ...). The generic executor in BlockBackend does the I/O; drivers
never see the cache mode or the AIO engine.
"""
from __future__ import annotations

import os

from ..errors import PykvmError


class BlockError(PykvmError):
    """A block-layer failure: what, on which image, why; one line."""

    def __init__(self, path: str, why: str, err: int | None = None):
        self.path = path
        self.errno = err
        super().__init__(f"{path}: {why}" + (f" ({os.strerror(err)})" if err else ""))


class Extent:
    """A piece of a mapped range: ``kind`` 'data' (at ``fd``/``host_offset``),
    'zero' or 'unallocated'."""

    __slots__ = ("kind", "offset", "length", "fd", "host_offset")

    def __init__(self, kind: str, offset: int, length: int, fd: int = -1, host_offset: int = 0):
        self.kind = kind
        self.offset = offset
        self.length = length
        self.fd = fd
        self.host_offset = host_offset

    def __repr__(self) -> str:
        return f"Extent({self.kind}, {self.offset:#x}+{self.length:#x})"


class BlockDriver:
    """Base class. Class attributes are the capability data."""

    format_name = ""
    supports_backing = False
    supports_discard = False

    fd: int
    size: int          # virtual disk size in bytes
    path: str

    @classmethod
    def probe(cls, header: bytes, path: str) -> int:
        """0..100: how sure the driver is that this is its format."""
        return 0

    def map(self, offset: int, length: int) -> list[Extent]:
        raise NotImplementedError

    def flush_metadata(self) -> None:
        """Make format metadata durable (called before an fdatasync)."""

    def close(self) -> None:
        raise NotImplementedError


DRIVERS: dict[str, type[BlockDriver]] = {}


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    DRIVERS[cls.format_name] = cls
    return cls


def probe_format(path: str) -> str:
    """Pick the format whose driver is surest about the file's first bytes."""
    try:
        with open(path, "rb") as f:
            header = f.read(4096)
    except OSError as e:
        raise BlockError(path, "cannot open", e.errno) from None
    best = max(DRIVERS.values(), key=lambda d: d.probe(header, path))
    return best.format_name
