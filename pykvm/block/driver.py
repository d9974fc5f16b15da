"""Block drivers: capability data plus a few methods, and a registry.

A driver opens an image and answers ``map(offset, length)``: where each
piece of a guest range lives (data in a host file at some offset, zeroes,
unallocated, compressed). Writes ask ``map_for_write(offset, length)``, which
allocates what is missing (copy-on-write included) and returns data extents
plus an allocation to ``commit`` once the data is written. The generic
executor in BlockBackend does the I/O; drivers never see the cache mode or the
AIO engine.

Also here: ``iov_slice`` (exact sub-ranges of an I/O vector), ``open_image``
(format probing, backing chains) and synchronous helpers that read and write
through any driver (used for copy-on-write and by ``pykvm img``).
"""
from __future__ import annotations

import collections
import os

from ..errors import PykvmError

ZERO_CHUNK = 1 << 20
ZEROES = bytes(ZERO_CHUNK)


class BlockError(PykvmError):
    """A block-layer failure: what, on which image, why; one line."""

    def __init__(self, path: str, why: str, err: int | None = None):
        self.path = path
        self.errno = err
        super().__init__(f"{path}: {why}" + (f" ({os.strerror(err)})" if err else ""))


class WriteBusy(Exception):
    """map_for_write touched a cluster whose allocation is still in flight:
    retry after the next commit (not an error)."""


class Extent:
    """A piece of a mapped range: ``kind`` 'data' (at ``fd``/``host_offset``),
    'zero', 'unallocated' (the backing file's, or zeroes) or 'compressed'
    (``aux`` is the driver's descriptor; ``driver.read_compressed`` decodes)."""

    __slots__ = ("kind", "offset", "length", "fd", "host_offset", "aux")

    def __init__(self, kind: str, offset: int, length: int, fd: int = -1, host_offset: int = 0,
                 aux=None):
        self.kind = kind
        self.offset = offset
        self.length = length
        self.fd = fd
        self.host_offset = host_offset
        self.aux = aux

    def __repr__(self) -> str:
        where = f" @{self.host_offset:#x}" if self.kind == "data" else ""
        return f"Extent({self.kind}, {self.offset:#x}+{self.length:#x}{where})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Extent) and (self.kind, self.offset, self.length, self.fd,
                                              self.host_offset) == \
            (other.kind, other.offset, other.length, other.fd, other.host_offset)


class DirectExtent(collections.namedtuple("DirectExtent",
                                          "offset length fd host_offset writable")):
    """Guest bytes [offset, offset+length) that a device's own I/O thread (the
    C fast path) may read at ``host_offset`` in ``fd`` without asking the
    driver, and write there in place when ``writable`` (no metadata change)."""

    __slots__ = ()


class WritePlan:
    """What ``map_for_write`` returns: data extents covering the range exactly,
    and an allocation (or None) to pass to ``commit`` after the data is down,
    or to ``abort`` if writing it failed."""

    __slots__ = ("extents", "alloc")

    def __init__(self, extents: list[Extent], alloc=None):
        self.extents = extents
        self.alloc = alloc


class BlockDriver:
    """Base class. Class attributes are the capability data."""

    format_name = ""
    supports_backing = False
    supports_discard = False
    identity_mapped = False    # guest byte N is host byte N of ``fd``: the backend's fast path
    # direct_extents() says where plain data lives, so that a device's own I/O
    # thread can serve it; the driver then calls on_unmap (set by the
    # backend) *before* it changes the meaning of any such range
    direct_map = False
    on_unmap = None            # callable(offset, length, writes_only) or None
    map_version = 0            # grows whenever what direct_extents() returns may have changed

    fd: int
    size: int          # virtual disk size in bytes
    path: str
    read_only: bool = True
    backing: "BlockDriver | None" = None

    @classmethod
    def probe(cls, header: bytes, path: str) -> int:
        """0..100: how sure the driver is that this is its format."""
        return 0

    @property
    def sync_fds(self) -> list[int]:
        """File descriptors a flush must fdatasync (data and metadata)."""
        return [self.fd]

    def map(self, offset: int, length: int) -> list[Extent]:
        raise NotImplementedError

    def data_at(self, offset: int, length: int, write: bool = False) -> int:
        """Fast lookup: the host offset in ``fd`` where the whole range lies as
        plain data (writable in place when ``write``), or -1 to go through
        map()/map_for_write(). Never allocates, never does I/O."""
        return -1

    def direct_extents(self) -> list[DirectExtent]:
        """Every range of plain allocated data, sorted, merged where contiguous
        in both guest and host with the same writability (direct_map drivers)."""
        return []

    def _unmapping(self, offset: int, length: int, writes_only: bool = False) -> None:
        """About to change [offset, offset+length): returns once nothing reads or
        writes (``writes_only``: writes) it through an older direct map."""
        if self.on_unmap is not None:
            self.on_unmap(offset, length, writes_only)

    def map_for_write(self, offset: int, length: int) -> WritePlan:
        """Data extents to write [offset, offset+length) to, allocating as needed."""
        return WritePlan(self.map(offset, length))

    def commit(self, alloc) -> None:
        """The data of a WritePlan is written: make the mapping point at it."""

    def abort(self, alloc) -> None:
        """Writing a WritePlan's data failed: forget it (at most a leak)."""

    def read_compressed(self, extent: Extent) -> bytes:
        raise NotImplementedError

    def discard(self, offset: int, length: int, punch: bool) -> None:
        """Drop whole clusters of the range (mapped formats only)."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> list[tuple[int, int]]:
        """Zero what the format can describe; return the ranges left to write as zero data."""
        return [(offset, length)]

    def flush_metadata(self) -> None:
        """Make format metadata durable (called before an fdatasync)."""

    def close(self) -> None:
        raise NotImplementedError


DRIVERS: dict[str, type[BlockDriver]] = {}


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    DRIVERS[cls.format_name] = cls
    return cls


def read_header(path: str, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise BlockError(path, "cannot open", e.errno) from None


def probe_format(path: str) -> str:
    """Pick the format whose driver is surest about the file's first bytes."""
    header = read_header(path)
    best = max(DRIVERS.values(), key=lambda d: d.probe(header, path))
    return best.format_name


def open_image(path: str, fmt: str | None = None, read_only: bool = False, direct: bool = False,
               chain: frozenset = frozenset(), **opts) -> BlockDriver:
    """Open an image with its driver (probing when ``fmt`` is None). ``chain``
    holds the real paths of the overlays above it, to catch backing loops."""
    real = os.path.realpath(path)
    if real in chain:
        raise BlockError(path, "backing file loop: this image is its own (indirect) backing file")
    fmt = fmt or probe_format(path)
    if fmt not in DRIVERS:
        raise BlockError(path, f"unknown format {fmt!r} (one of {', '.join(DRIVERS)})")
    cls = DRIVERS[fmt]
    if cls.supports_backing:
        return cls(path, read_only=read_only, direct=direct, chain=chain | {real}, **opts)
    return cls(path, read_only=read_only, direct=direct)


# -- I/O vectors -----------------------------------------------------------------------

def iov_length(iov) -> int:
    return sum(map(len, iov))


def iov_slice(iov, start: int, length: int) -> list:
    """The bytes [start, start+length) of an I/O vector, as a new vector of
    views over the same memory (no copy). Exact: never longer or shorter."""
    out = []
    if length <= 0:
        return out
    pos = 0
    end = start + length
    for b in iov:
        n = len(b)
        if n and pos + n > start:
            lo = max(start - pos, 0)
            hi = min(end - pos, n)
            out.append(b if (lo == 0 and hi == n) else b[lo:hi])
            if pos + n >= end:
                return out
        pos += n
    raise ValueError(f"iov_slice({start}, {length}) past the end of a {pos}-byte vector")


def iov_zero(iov) -> None:
    """Fill every buffer of an I/O vector with zero bytes."""
    for b in iov:
        n = len(b)
        pos = 0
        while pos < n:
            k = min(n - pos, ZERO_CHUNK)
            b[pos:pos + k] = ZEROES[:k]
            pos += k


def iov_copy_in(iov, data) -> None:
    """Copy ``data`` (exactly as long as the vector) into the vector."""
    view = memoryview(data)
    pos = 0
    for b in iov:
        n = len(b)
        b[:] = view[pos:pos + n]
        pos += n


def iov_is_zero(iov) -> bool:
    for b in iov:
        n = len(b)
        pos = 0
        while pos < n:
            k = min(n - pos, ZERO_CHUNK)
            if b[pos:pos + k] != ZEROES[:k]:
                return False
            pos += k
    return True


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` until full or end of file; zero what the file lacks."""
    done = 0
    n = len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            iov_zero([view[done:]])
            break
        done += got
    return done


def pwrite_full(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


# -- synchronous reads and writes through any driver (COW, pykvm img) ------------------

def read_into(drv: BlockDriver, offset: int, buf) -> None:
    """Fill ``buf`` with guest bytes [offset, offset+len(buf)) of ``drv``,
    following the backing chain; past the end of the disk reads zeroes."""
    buf = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
    length = len(buf)
    inside = max(0, min(length, drv.size - offset))
    if inside < length:
        iov_zero([buf[inside:]])
    if inside <= 0:
        return
    for e in drv.map(offset, inside):
        sub = buf[e.offset - offset:e.offset - offset + e.length]
        if e.kind == "data":
            pread_full(e.fd, sub, e.host_offset)
        elif e.kind == "compressed":
            sub[:] = drv.read_compressed(e)
        elif e.kind == "unallocated" and drv.backing is not None:
            read_into(drv.backing, e.offset, sub)
        else:
            iov_zero([sub])


def read_range(drv: BlockDriver, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    read_into(drv, offset, memoryview(buf))
    return buf


def write_range(drv: BlockDriver, offset: int, data) -> None:
    """Write guest bytes synchronously: allocate, write the data, commit."""
    view = memoryview(data).cast("B")
    plan = drv.map_for_write(offset, len(view))
    try:
        for e in plan.extents:
            pwrite_full(e.fd, view[e.offset - offset:e.offset - offset + e.length], e.host_offset)
    except OSError as e:
        drv.abort(plan.alloc)
        raise BlockError(drv.path, f"write at {offset:#x}", e.errno) from None
    drv.commit(plan.alloc)


def write_zeroes_range(drv: BlockDriver, offset: int, length: int, unmap: bool = False) -> None:
    """Zero a guest range synchronously (format-level zeroes where it can)."""
    for off, n in drv.write_zeroes(offset, length, unmap):
        pos = 0
        while pos < n:
            k = min(n - pos, ZERO_CHUNK)
            write_range(drv, off + pos, ZEROES[:k])
            pos += k
