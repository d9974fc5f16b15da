"""Block drivers and nodes: capability data plus a few methods, and a registry.

As in QEMU, a *driver* is a class (``file``, ``raw``, ``qcow2``, ``throttle``)
and a *node* is an instance of one, with a name and children (``file``,
``backing``, ``data-file``), built by ``graph.open_node`` from QEMU's options.
Three kinds: protocol nodes own the bytes (``file``), format nodes interpret a
child (``raw``, ``qcow2``), filter nodes pass requests to one child and change
them (``throttle``).

A format node answers ``map(offset, length)``: where each
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

from ..aio import READ, ROUTES, WRITE, FLUSH, AioRequest
from ..errors import PykvmError

ZERO_CHUNK = 1 << 20
ZEROES = bytes(ZERO_CHUNK)


class BlockError(PykvmError):
    """A block-layer failure: what, on which image, why; one line."""

    def __init__(self, path: str, why: str, err: int | None = None):
        self.path = path
        self.why = why
        self.errno = err
        super().__init__(f"{path}: {why}" + (f" ({os.strerror(err)})" if err else ""))


class GraphError(BlockError):
    """A block graph that cannot be built from its options (unknown driver, an
    option that does not apply, a bad value, a child missing, a backing loop):
    a usage error, found before any image is changed."""

    exit_status = 2


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
    """Base class. Class attributes are the capability data; an instance is a node."""

    format_name = ""           # the driver's name, as in QEMU's driver=
    kind = "format"            # protocol | format | filter
    options: dict = {}         # its own options: name -> "str" | "size" | "bool" | (choices)
    child_roles: tuple = ("file",)   # the children it takes (protocol drivers: none)
    address_options: tuple = ("filename",)   # protocol nodes: one of these says where
    opens_children = False     # takes graph.Opener (opener=) to open children it names itself
    supports_backing = False
    supports_discard = False
    identity_mapped = False    # guest byte N is host byte N of ``fd``: the backend's fast path
    # direct_extents() says where plain data lives, so that a device's own I/O
    # thread can serve it; the driver then calls on_unmap (set by the
    # backend) *before* it changes the meaning of any such range
    direct_map = False
    on_unmap = None            # callable(offset, length, writes_only) or None
    map_version = 0            # grows whenever what direct_extents() returns may have changed
    growable = False           # a protocol node whose end a write past it extends (a file)
    hole_discard = False       # discard is a hole punched in ``fd`` (the backend's fast path)
    request_alignment = 0      # offsets and lengths the node needs (0: O_DIRECT's, probed)
    no_flush = False           # cache=unsafe above: never sync the file (the backend sets it)
    alloc_ahead_bytes = 0      # a format may raise refcounts this far ahead (the backend sets it)

    fd: int
    size: int          # virtual disk size in bytes
    path: str
    read_only: bool = True
    backing: "BlockDriver | None" = None
    node_name = ""             # set by graph.open_node: given (node-name=) or its path in the tree
    probed = False             # the format was probed, not given (the backend's sector-0 guard)

    @property
    def children(self) -> list[tuple[str, "BlockDriver"]]:
        """(role, node) of each child: file, data-file, backing (graph.open_node's roles)."""
        return [(role, node) for role, node in (("file", getattr(self, "file", None)),
                                                ("data-file", getattr(self, "data_file", None)),
                                                ("backing", self.backing)) if node is not None]

    @property
    def filename(self) -> str:
        """The file this node's bytes come from, as the user named it."""
        return self.path

    def describe(self) -> str:
        """How errors name the node: "qcow2 node 'disk0'"."""
        return f"{self.format_name} node '{self.node_name}'" if self.node_name else \
            f"{self.format_name} node"

    @classmethod
    def probe(cls, header: bytes, path: str) -> int:
        """0..100: how sure the driver is that this is its format."""
        return 0

    def erase_extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """Where the host holds guest bytes [offset, +length) of this node, and
        of nothing else, so that a secure erase may overwrite them in place:
        (fd for synchronous writes, host offset, length) triples. None here;
        protocol nodes give their range, raw its window, qcow2 its clusters of
        refcount 1, filters their child's."""
        return []

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

    def c_path_punts(self) -> list[str]:
        """What of this node's requests a device's own I/O thread (the C path)
        sends to Python, and why: the log line at the thread's start."""
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

    # a format raises its metadata events on its file child and asks it before
    # each metadata write; a blkdebug node below answers (filters pass them down)
    def debug_event(self, name: str) -> None:
        """A format's event (QEMU's BLKDBG_EVENT): l2_update, cow_write, ..."""

    def meta_error(self, offset: int, length: int) -> int:
        """The errno a format's metadata write at ``offset`` must fail with (0: none)."""
        return 0

    _closed = False

    def close(self) -> None:
        """Close this node, then its children (once)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.close_node()
        finally:
            for _role, child in self.children:
                child.close()

    def close_node(self) -> None:
        """What this node itself holds (its children are closed by close())."""

    def lock(self, use) -> None:
        """Take the image locks for users asking ``use`` (locking.Use) of this
        node: its file and data file get what this format asks of them, its
        backing what a backing file is asked (protocol nodes take the locks)."""
        from .locking import backing_use, file_use
        for role, child in self.children:
            child.lock(backing_use(use) if role == "backing" else
                       use if self.kind == "filter" else
                       file_use(self.format_name, use, not self.read_only))

    def abandon(self) -> None:
        """Let go of every file descriptor of the tree without writing anything
        back: what a crash of the process leaves on disk (tests)."""
        self._closed = True
        for _role, child in self.children:
            child.abandon()


DRIVERS: dict[str, type[BlockDriver]] = {}      # every driver, by name
FORMATS: dict[str, type[BlockDriver]] = {}      # the format drivers (format=, probing)


def register(cls: type[BlockDriver]) -> type[BlockDriver]:
    DRIVERS[cls.format_name] = cls
    if cls.kind == "format":
        FORMATS[cls.format_name] = cls
    return cls


def read_header(path: str, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise BlockError(path, "cannot open", e.errno) from None


def probe_header(header: bytes, path: str) -> str:
    """The format whose driver is surest about an image's first bytes."""
    best = max(FORMATS.values(), key=lambda d: d.probe(header, path))
    return best.format_name


def probe_format(path: str) -> str:
    """Pick the format whose driver is surest about the file's first bytes."""
    return probe_header(read_header(path), path)


def open_image(path: str, fmt: str | None = None, read_only: bool = False, direct: bool = False,
               use=None, **opts) -> BlockDriver:
    """Open an image file with its format driver (probing when ``fmt`` is None):
    a format node over a file node, with its backing chain (graph.open_node).
    ``open_backing=False``: without the backing file; ``l2_cache_size``: the
    qcow2 option; ``use``: the image locks to take (locking.Use; None: none);
    other keywords go to the format driver (``repair=False``)."""
    from .graph import image_spec, open_node
    spec = image_spec(path, fmt)
    if opts.pop("open_backing", True) is False:
        spec["backing"] = None
    if opts.get("l2_cache_size") is not None:
        spec["l2-cache-size"] = opts.pop("l2_cache_size")
    opts.pop("l2_cache_size", None)
    return open_node(spec, read_only=read_only, direct=direct, use=use, **opts)


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
            # a view, never a copy: a bytearray's slice would be read into in vain
            out.append(b if (lo == 0 and hi == n) else
                       (b if isinstance(b, memoryview) else memoryview(b))[lo:hi])
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


def _routed(fd: int, op: str, view, offset: int) -> int:
    """A request on a routed descriptor (not a file: block/nbd.py), done now."""
    n = ROUTES[fd](AioRequest(op, fd, offset, [view] if view is not None else []))
    if n < 0:
        raise OSError(-n, os.strerror(-n))
    return n


def pread_full(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` until full or end of file; zero what the file lacks."""
    if fd in ROUTES:
        return _routed(fd, READ, view, offset)
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
    if fd in ROUTES:
        _routed(fd, WRITE, view.cast("B"), offset)
        return
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def fd_pread(fd: int, length: int, offset: int) -> bytes:
    """os.pread for a file or a routed descriptor: at most ``length`` bytes
    (fewer at the end of the file)."""
    if fd in ROUTES:
        buf = bytearray(length)
        n = _routed(fd, READ, memoryview(buf), offset)
        return bytes(buf[:n])
    return os.pread(fd, length, offset)


def fd_datasync(fd: int) -> None:
    """os.fdatasync for a file or a routed descriptor (an NBD flush)."""
    if fd in ROUTES:
        _routed(fd, FLUSH, None, 0)
        return
    os.fdatasync(fd)


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
