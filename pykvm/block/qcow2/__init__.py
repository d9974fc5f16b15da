"""qcow2, versions 2 and 3 (QEMU's docs/interop/qcow2.txt).

Layout in one breath: cluster 0 holds the header, its extensions and the
backing file name. Guest clusters map through a two-level table (L1 ->
L2 -> host cluster); host clusters are reference counted through a second
two-level table (refcount table -> refcount blocks, entries 1..64 bits wide).

``map()`` is pure: it reads (cached) tables and says where each piece of a
guest range lives. ``map_for_write()`` allocates: new clusters get their
refcount first, then the copy-on-write data (from the backing file, a
compressed or a shared cluster) is written, the caller writes the guest's
data, and only ``commit()`` makes the L2 entry point at the cluster. A crash
between any two of these steps leaves only leaked clusters.

Metadata is written through to the file as it changes (os.pwrite from the
calling thread), except refcounts with lazy_refcounts=on: those are kept in
memory behind the dirty bit and written at flush and close; an image opened
writable with the dirty bit set has its refcounts rebuilt from the tables.

Header bits and extensions this driver does not understand are kept as they
are; unknown incompatible features refuse the image with one line.

The package follows the spec's parts; ``Qcow2Driver`` here is assembled from
their mixins and holds opening (the header's checks, the tables read),
single-field header updates and close:

- ``header.py``: constants, ``Header`` (the header and its extensions);
- ``cluster.py``: cluster mapping (L1/L2 tables, L2 cache, direct map), ``ClusterMap``;
- ``write.py``: allocation for writes, copy-on-write, commit, ``WriteAllocation``;
- ``discard.py``: discard and zero clusters, ``ZeroDiscard``;
- ``refcount.py``: host cluster management (refcounts), ``Refcounts``;
- ``compress.py``: compressed clusters, ``Compression``;
- ``snapshot.py``: internal snapshots, ``Snapshots``;
- ``check.py``: consistency check and repair, info, ``CheckRepair``;
- ``create.py``: new images and preallocation, ``Create``;
- ``amend.py``: header changes in place (version, lazy refcounts, refcount width), ``Amend``;
- ``measure.py``: the sizes an image needs (qemu-img measure), pure arithmetic.
"""
from __future__ import annotations

import collections
import os
import struct

from ..driver import (BlockDriver, BlockError, GraphError, fd_datasync,
                      fd_pread, pwrite_full, register)
from .amend import Amend
from .check import CheckRepair
from .cluster import ClusterMap, _append, _bit_runs
from .compress import Compression, _zstd
from .create import Create
from .discard import ZeroDiscard
from .header import (AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_RAW, COMPAT_LAZY, COMPRESSED,
                     COMPRESSION_TYPES, COPIED, EXT_BACKING_FMT, EXT_BITMAPS, EXT_CRYPTO,
                     EXT_DATA_FILE, EXT_END, EXT_FEATURES, FEATURE_NAMES, HDR_V2, HDR_V3,
                     INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
                     INCOMPAT_EXTL2, INCOMPAT_KNOWN, L2_CACHE_DEFAULT_MAX, MAGIC, MAX_L1_BYTES,
                     MAX_REFTABLE_BYTES, MAX_SNAPSHOT_TABLE, MAX_SNAPSHOTS, OFFSET_MASK,
                     REFT_MASK, ZERO, Header, be64_table)
from .refcount import Refcounts, rc_get, rc_set, rc_span
from .snapshot import Snapshot, Snapshots
from .write import WriteAllocation, _Alloc

__all__ = [
    "AUTOCLEAR_BITMAPS", "AUTOCLEAR_DATA_RAW", "COMPAT_LAZY", "COMPRESSED", "COMPRESSION_TYPES",
    "COPIED", "EXT_BACKING_FMT", "EXT_BITMAPS", "EXT_CRYPTO", "EXT_DATA_FILE", "EXT_END",
    "EXT_FEATURES", "FEATURE_NAMES", "HDR_V2", "HDR_V3", "INCOMPAT_COMPRESSION",
    "INCOMPAT_CORRUPT", "INCOMPAT_DATA_FILE", "INCOMPAT_DIRTY", "INCOMPAT_EXTL2",
    "INCOMPAT_KNOWN", "MAGIC", "MAX_L1_BYTES", "MAX_REFTABLE_BYTES", "MAX_SNAPSHOTS",
    "MAX_SNAPSHOT_TABLE", "OFFSET_MASK", "REFT_MASK", "ZERO", "CheckRepair", "ClusterMap",
    "Compression", "Create", "Header", "Qcow2Driver", "Refcounts", "Snapshot", "Snapshots",
    "WriteAllocation", "ZeroDiscard", "_Alloc", "_append", "_bit_runs", "_zstd", "rc_get",
    "rc_set", "rc_span",
]


@register
class Qcow2Driver(ClusterMap, WriteAllocation, ZeroDiscard, Refcounts, Compression,
                 Snapshots, CheckRepair, Create, Amend, BlockDriver):
    format_name = "qcow2"
    supports_backing = True
    supports_discard = True
    direct_map = True
    child_roles = ("file", "data-file", "backing")
    opens_children = True
    options = {"l2-cache-size": "size"}

    @classmethod
    def probe(cls, header: bytes, path: str) -> int:
        return 100 if header[:4] == MAGIC else 0

    def __init__(self, file: BlockDriver, opener, read_only: bool = False,
                 l2_cache_size: int | None = None, repair: bool = True):
        """A qcow2 node over its ``file`` child; ``opener`` (graph.Opener) opens
        the data file and backing file the header names, or those its options
        give instead. The node opens no file itself."""
        if file.kind == "format":       # its metadata is read through file.bfd
            raise BlockError(file.filename, f"a qcow2 node's file must be a protocol node "
                             f"(driver=file, host_device or nbd) or a filter over one, not a "
                             f"{file.format_name} node")
        self.file = file
        self.data_file = None
        self.path = file.filename
        self.read_only = read_only
        self.backing = None
        self.data_fd = -1
        # file.fd (O_DIRECT with cache=none/directsync) carries the guest's own
        # I/O on aligned buffers; metadata and the driver's synchronous data
        # copies (copy-on-write, zero padding) use file.bfd, a buffered
        # descriptor of the same file, since their buffers are Python objects.
        self.fd = file.fd
        self.bfd = self.mfd = file.bfd
        try:
            self._open(opener, l2_cache_size, repair)
        except BaseException:
            for child in (self.backing, self.data_file):
                if child is not None:
                    child.close()
            raise

    # -- opening -----------------------------------------------------------------------

    def _open(self, opener, l2_cache_size, repair):
        path = self.path
        self.eof = self.file.size
        self._size_at_open = self._grown_to = self.eof
        if not self.file.growable:      # an NBD export: its size is the server's
            self._grown_to = -1
        head = fd_pread(self.mfd, 1 << 21, 0) if self.eof >= 72 else b""
        if len(head) < 72:
            raise BlockError(path, f"truncated qcow2 header ({len(head)} bytes)")
        if head[:4] == MAGIC and len(head) >= 24:
            cb = struct.unpack_from(">I", head, 20)[0]
            if 9 <= cb <= 21:
                head = head[:1 << cb]
        h = self.h = Header.parse(head, path, self.eof)
        self.cluster_bits = cb = h.cluster_bits
        self.cluster_size = cs = 1 << cb
        self.extl2 = bool(h.incompat & INCOMPAT_EXTL2)
        self.entry_words = 2 if self.extl2 else 1
        self.l2_entries = cs // (8 * self.entry_words)
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.sc_size = cs // 32 if self.extl2 else cs
        self.rc_order = h.refcount_order
        self.rc_max = (1 << (1 << self.rc_order)) - 1
        self.rb_entries = cs * 8 >> self.rc_order
        self.size = h.size
        self.compressed_bits = 62 - (cb - 8)
        if h.size > (1 << 62):
            raise BlockError(path, f"absurd virtual size {h.size}")
        need_l1 = -(-h.size // (cs * self.l2_entries))
        if h.l1_size * 8 > MAX_L1_BYTES:
            raise BlockError(path, f"L1 table too large ({h.l1_size} entries, more than "
                             f"{MAX_L1_BYTES} bytes)")
        if h.l1_size < need_l1:
            raise BlockError(path, f"L1 table ({h.l1_size} entries) too small for the virtual "
                             f"size {h.size}")
        self._check_table(h.l1_offset, h.l1_size * 8, "L1 table")
        if h.rt_clusters * cs > MAX_REFTABLE_BYTES:
            raise BlockError(path, f"refcount table too large ({h.rt_clusters} clusters, more "
                             f"than {MAX_REFTABLE_BYTES} bytes)")
        if h.rt_clusters == 0:
            raise BlockError(path, "invalid refcount table size (0 clusters)")
        self._check_table(h.rt_offset, h.rt_clusters * cs, "refcount table")
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise BlockError(path, f"too many snapshots ({h.nb_snapshots}, at most "
                             f"{MAX_SNAPSHOTS})")
        if h.nb_snapshots:
            self._check_table(h.snapshots_offset, 0, "snapshot table")
        read_only = self.read_only
        if not read_only and h.incompat & INCOMPAT_CORRUPT:
            raise BlockError(path, "image is marked corrupt; it can only be opened read-only "
                             "(repair it with 'pykvm img check -r all')")
        self.l1 = be64_table(self._read_meta(h.l1_offset, h.l1_size * 8))
        self.rt_cap = h.rt_clusters * cs // 8
        self.reftable = list(struct.unpack(f">{self.rt_cap}Q",
                                           self._read_meta(h.rt_offset, h.rt_clusters * cs)))
        self.snapshots = self._read_snapshots()
        # QEMU's rule: by default enough for the whole disk, at most 32 MiB; a size
        # given is never more than what covers the whole disk
        cache = min(l2_cache_size, max(1, h.l1_size) * cs) if l2_cache_size is not None else \
            min(L2_CACHE_DEFAULT_MAX, max(1 << 20, need_l1 * cs))
        self.l2_cache_max = max(2, cache // cs)
        self._l2 = collections.OrderedDict()           # L2 offset -> list of entries
        self._rb = collections.OrderedDict()           # refblock offset -> bytearray
        self._rb_dirty: set[int] = set()
        self.rb_cache_max = max(8, (4 << 20) // cs)
        self._busy: set[int] = set()
        self._claimed: set[int] = set()
        self._rc_batch = None
        # Metadata write order across a power cut (docs/interop/qcow2.txt lets a
        # crash leak clusters, never reference a free one): a refcount written
        # must be durable before an L2 or L1 entry that points at its cluster,
        # and an entry's removal durable before the refcount that frees it.
        # _meta_write syncs the file between the two kinds when one is pending.
        self._rc_pending = False        # refcounts written since the file was last synced
        self._pool = (0, 0, False)      # clusters raised ahead: [lo, hi), fresh (alloc_clusters)
        self._unpointed = False         # freeing clusters no entry points at (no sync first)
        self._ref_pending = False       # L1/L2 entries written since then
        self._prealloc: dict[int, int] = {}
        self._stream_end = -1            # where a sequential run of allocating writes goes on
        self._ahead = self.AHEAD_MIN     # and how far it is mapped ahead next time
        self._free_hint = 1
        self._zc = None                                # last decompressed cluster
        self._dx: dict[int, list] = {}                 # direct extents per L2 table span
        self.map_version = 0
        self.lazy = bool(h.compat & COMPAT_LAZY) and h.version >= 3
        self._marked_dirty = bool(h.incompat & INCOMPAT_DIRTY)
        # data file
        if h.incompat & INCOMPAT_DATA_FILE:
            if not h.data_file:
                raise BlockError(path, "external data file feature set but no data file named")
            dpath = self._relative(h.data_file)
            self.data_file = opener.child("data-file", {"driver": "file", "filename": dpath})
            self.data_path = self.data_file.filename
            self.fd = self.data_fd = self.data_file.fd
            self.bfd = self.data_file.bfd
        else:
            if h.data_file:
                raise BlockError(path, "data file named without the external data file feature")
            if opener.given("data-file"):
                raise GraphError(path, "option 'data-file' does not apply: the image has no "
                                 "external data file")
            self.data_path = None
        self.data_raw = bool(h.autoclear & AUTOCLEAR_DATA_RAW) and self.data_fd >= 0
        # backing: the header's, unless the options give another (or none)
        default = None
        if h.backing_file:
            if h.backing_fmt and h.backing_fmt not in ("raw", "qcow2"):
                raise BlockError(path, f"backing file format {h.backing_fmt!r} is not supported")
            default = {"file": {"driver": "file", "filename": self._relative(h.backing_file)}}
            if h.backing_fmt:
                default["driver"] = h.backing_fmt
        self.backing = opener.child("backing", default, read_only=True, direct=False)
        # a writable open: repair after a crash with lazy refcounts, drop autoclear
        # bits for things we do not maintain (the spec asks for that before writing)
        if not read_only:
            if h.incompat & INCOMPAT_DIRTY and repair:
                self.check(repair="all")
                self._set_incompat(h.incompat & ~INCOMPAT_DIRTY)
                self._marked_dirty = False
            keep = h.autoclear & AUTOCLEAR_DATA_RAW
            if h.autoclear != keep:
                h.autoclear = keep
                self._write_header_field(88, ">Q", keep)

    def _relative(self, name: str) -> str:
        if os.path.isabs(name):
            return name
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), name)

    def _check_table(self, offset: int, length: int, what: str) -> None:
        if offset % self.cluster_size:
            raise BlockError(self.path, f"{what} offset {offset:#x} is not cluster-aligned")
        if offset == 0 and length:
            raise BlockError(self.path, f"{what} at offset 0")
        if offset + length > self.eof:
            raise BlockError(self.path, f"{what} at {offset:#x} (+{length:#x}) is past the end "
                             f"of the file ({self.eof:#x})")

    def _read_meta(self, offset: int, length: int) -> bytes:
        data = fd_pread(self.mfd, length, offset)
        if len(data) < length:
            raise BlockError(self.path, f"metadata at {offset:#x} is past the end of the file")
        return data

    # -- header updates (single fields; everything else stays as read) ------------------

    def _write_header_field(self, offset: int, fmt: str, *values) -> None:
        self._meta_write(None, struct.pack(fmt, *values), offset)

    def _meta_write(self, event: str | None, data, offset: int, fd: int | None = None) -> None:
        """One write of metadata (or of copy-on-write data, to ``fd``) at host
        ``offset``: ``event`` is raised on the file node first, as QEMU's
        BLKDBG_EVENT, and a blkdebug node there may fail the write; a failed
        write is a BlockError that names it."""
        what = event or "metadata"
        if fd is None or fd == self.mfd:
            self._order(event)
        if event:
            self.file.debug_event(event)
        if fd is None or fd == self.mfd:
            err = self.file.meta_error(offset, len(data))
            if err:
                raise BlockError(self.path, f"{what} write at {offset:#x} failed (injected)", err)
        try:
            pwrite_full(self.mfd if fd is None else fd, data, offset)
        except OSError as e:
            raise BlockError(self.path, f"{what} write at {offset:#x}", e.errno) from None

    _RC_EVENTS = frozenset(("refblock_update", "refblock_alloc", "reftable_update"))
    _REF_EVENTS = frozenset(("l2_update", "l2_alloc.write", "l1_update"))

    def _order(self, event: str | None) -> None:
        """Before a metadata write: sync the file if an earlier write of the other
        kind must be durable first (see _rc_pending). A refcount write that
        only raises counts needs no sync before it (a leak at most), but which
        way a batch goes is not known here: a decrease is announced by
        _freeing() before it is written."""
        if event in self._REF_EVENTS:
            if self._rc_pending:
                self._sync_for_order()
            self._ref_pending = True
        elif event in self._RC_EVENTS:
            self._rc_pending = True

    def _freeing(self) -> None:
        """A refcount is about to go down: the entries that stopped pointing at
        the cluster must be durable first."""
        if self._ref_pending:
            self._sync_for_order()

    def _sync_for_order(self) -> None:
        if not self.no_flush and not (self.lazy and self._marked_dirty):
            fd_datasync(self.mfd)
        self._rc_pending = self._ref_pending = False

    def _set_incompat(self, value: int) -> None:
        self.h.incompat = value
        self._write_header_field(72, ">Q", value)

    def rewrite_header(self) -> None:
        """Write the whole header area from ``self.h`` (rebase, amend)."""
        data = self.h.pack(self.cluster_size)
        pwrite_full(self.mfd, data + bytes(self.cluster_size - len(data)), 0)

    def c_path_punts(self) -> list[str]:
        out = ["compressed and zero clusters"] if self.read_only else \
            ["allocating writes and writes to shared clusters (they change metadata), "
             "compressed and zero clusters"]
        if self.backing is not None:
            out.append(f"reads of clusters it does not hold (from {self.backing.describe()})")
        return out

    request_alignment = property(lambda self: self.file.request_alignment)

    @property
    def sync_fds(self) -> list[int]:
        return [self.fd, self.mfd] if self.data_fd >= 0 else [self.fd]

    # -- close -------------------------------------------------------------------------

    def close_node(self) -> None:
        """Write back what is cached and cut the file back to what is used; the
        file, data file and backing nodes are closed after (BlockDriver.close)."""
        if self.mfd < 0:
            return
        try:
            if not self.read_only:
                self._release_pool()
                self.flush_metadata()
                if self._grown_to > max(self.eof, self._size_at_open):
                    os.ftruncate(self.mfd, max(self.eof, self._size_at_open))  # _grow_file
                if self._marked_dirty and self.lazy:
                    fd_datasync(self.mfd)
                    self._set_incompat(self.h.incompat & ~INCOMPAT_DIRTY)
                    fd_datasync(self.mfd)
        finally:
            self.fd = self.data_fd = self.bfd = self.mfd = -1
