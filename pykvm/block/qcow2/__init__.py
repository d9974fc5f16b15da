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
"""
from __future__ import annotations

import collections
import errno
import os
import struct
import time
import zlib

from ..driver import (BlockDriver, BlockError, DirectExtent, Extent, WriteBusy, WritePlan,
                      open_image, pread_full, pwrite_full, read_into, register)
from ..raw import PUNCH, fallocate, open_file, preallocate


def _zstd():
    """The zstandard module (imported on first use), or None."""
    try:
        import zstandard
    except ImportError:  # pragma: no cover - the dependency is declared
        return None
    return zstandard

MAGIC = b"QFI\xfb"
HDR_V2 = struct.Struct(">4sIQIIQIIQQIIQ")      # 72 bytes
HDR_V3 = struct.Struct(">QQQII")                # bytes 72..104

INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY = 1
AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_RAW = 1, 2

EXT_END = 0
EXT_BACKING_FMT = 0xE2792ACA
EXT_FEATURES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_MASK = 0xFFFFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1

MAX_L1_BYTES = 32 << 20        # QEMU's limits: bounded memory on hostile images
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE = 64 << 20
FEATURE_NAMES = [(0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
                 (0, 3, "compression type"), (0, 4, "extended L2 entries"),
                 (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data")]
COMPRESSION_TYPES = {"zlib": 0, "zstd": 1}


# -- refcount entries of any width ---------------------------------------------------

def rc_get(buf, i: int, order: int) -> int:
    if order >= 3:
        w = 1 << (order - 3)
        return int.from_bytes(buf[i * w:(i + 1) * w], "big")
    bits = 1 << order
    per = 8 >> order
    return (buf[i // per] >> ((i % per) * bits)) & ((1 << bits) - 1)


def rc_set(buf, i: int, order: int, value: int) -> None:
    if order >= 3:
        w = 1 << (order - 3)
        buf[i * w:(i + 1) * w] = value.to_bytes(w, "big")
        return
    bits = 1 << order
    per = 8 >> order
    shift = (i % per) * bits
    mask = ((1 << bits) - 1) << shift
    buf[i // per] = (buf[i // per] & ~mask) | (value << shift)


def rc_span(i: int, order: int) -> tuple[int, int]:
    """Byte range of a refcount block holding entry i."""
    if order >= 3:
        w = 1 << (order - 3)
        return i * w, (i + 1) * w
    per = 8 >> order
    return i // per, i // per + 1


class Header:
    """The parsed header plus everything needed to write it back unchanged."""

    def __init__(self):
        self.version = 3
        self.backing_file = None
        self.cluster_bits = 16
        self.size = 0
        self.crypt_method = 0
        self.l1_size = 0
        self.l1_offset = 0
        self.rt_offset = 0
        self.rt_clusters = 0
        self.nb_snapshots = 0
        self.snapshots_offset = 0
        self.incompat = 0
        self.compat = 0
        self.autoclear = 0
        self.refcount_order = 4
        self.header_length = 112
        self.compression_type = 0
        self.extra = b""                # additional header fields past 105 we keep as-is
        self.backing_fmt = None
        self.data_file = None
        self.feature_table = None       # raw bytes of the extension, kept
        self.bitmaps_ext = None
        self.unknown_exts: list[tuple[int, bytes]] = []

    @classmethod
    def parse(cls, buf: bytes, path: str, file_size: int) -> "Header":
        h = cls()
        if len(buf) < 72 or buf[:4] != MAGIC:
            raise BlockError(path, "not a qcow2 image (bad magic)")
        (_, h.version, bf_off, bf_size, h.cluster_bits, h.size, h.crypt_method, h.l1_size,
         h.l1_offset, h.rt_offset, h.rt_clusters, h.nb_snapshots,
         h.snapshots_offset) = HDR_V2.unpack_from(buf)
        if h.version not in (2, 3):
            raise BlockError(path, f"unsupported qcow2 version {h.version} (2 and 3 are)")
        if not 9 <= h.cluster_bits <= 21:
            raise BlockError(path, f"invalid cluster_bits {h.cluster_bits} (9..21)")
        cs = 1 << h.cluster_bits
        if h.version == 2:
            h.header_length = 72
            h.refcount_order = 4
        else:
            if len(buf) < 104:
                raise BlockError(path, "truncated qcow2 header")
            (h.incompat, h.compat, h.autoclear, h.refcount_order,
             h.header_length) = HDR_V3.unpack_from(buf, 72)
            if h.header_length < 104 or h.header_length % 8 or h.header_length > cs \
                    or h.header_length > len(buf):
                raise BlockError(path, f"invalid qcow2 header length {h.header_length}")
            if h.header_length > 104:
                h.compression_type = buf[104]
                h.extra = bytes(buf[105:h.header_length])
        unknown = h.incompat & ~INCOMPAT_KNOWN
        if h.refcount_order > 6:
            raise BlockError(path, f"invalid refcount_order {h.refcount_order} (at most 6)")
        if h.crypt_method:
            raise BlockError(path, "encrypted qcow2 images are not supported")
        if (h.incompat & INCOMPAT_EXTL2) and h.cluster_bits < 14:
            raise BlockError(path, "extended L2 entries need clusters of at least 16 KiB")
        if (h.incompat & INCOMPAT_COMPRESSION) and h.compression_type == 0 or \
                not (h.incompat & INCOMPAT_COMPRESSION) and h.compression_type:
            raise BlockError(path, f"compression type {h.compression_type} does not match the "
                             f"compression type feature bit")
        if h.compression_type not in (0, 1):
            raise BlockError(path, f"unknown compression type {h.compression_type}")
        # header extensions
        pos = h.header_length
        end_of_exts = None
        while pos + 8 <= min(cs, len(buf)):
            etype, elen = struct.unpack_from(">II", buf, pos)
            if etype == EXT_END:
                end_of_exts = pos
                break
            if pos + 8 + elen > min(cs, len(buf)):
                raise BlockError(path, f"header extension {etype:#x} runs past the first cluster")
            data = bytes(buf[pos + 8:pos + 8 + elen])
            if etype == EXT_BACKING_FMT:
                h.backing_fmt = data.decode(errors="replace")
            elif etype == EXT_DATA_FILE:
                h.data_file = data.decode(errors="replace")
            elif etype == EXT_FEATURES:
                h.feature_table = data
            elif etype == EXT_BITMAPS:
                h.bitmaps_ext = data
            else:
                h.unknown_exts.append((etype, data))
            pos += 8 + ((elen + 7) & ~7)
        if end_of_exts is None and h.version == 3:
            raise BlockError(path, "header extensions are not terminated in the first cluster")
        if unknown:
            names = []
            for bit in range(64):
                if unknown >> bit & 1:
                    names.append(h.feature_name(0, bit) or f"bit {bit}")
            raise BlockError(path, f"unsupported incompatible qcow2 feature(s): "
                             f"{', '.join(names)}; refusing to open")
        if bf_off:
            if bf_size > 1023 or bf_off + bf_size > min(cs, file_size):
                raise BlockError(path, f"invalid backing file name (offset {bf_off:#x}, "
                                 f"length {bf_size})")
            h.backing_file = bytes(buf[bf_off:bf_off + bf_size]).decode(errors="replace")
        return h

    def feature_name(self, kind: int, bit: int) -> str | None:
        t = self.feature_table or b""
        for i in range(0, len(t) - 47, 48):
            if t[i] == kind and t[i + 1] == bit:
                return t[i + 2:i + 48].rstrip(b"\0").decode(errors="replace")
        return None

    def pack(self, cluster_size: int) -> bytes:
        """The whole header area (header, extensions, backing name); unknown
        fields and extensions come back as they were read."""
        bf = (self.backing_file or "").encode()
        out = bytearray(HDR_V2.pack(MAGIC, self.version, 0, len(bf), self.cluster_bits,
                                    self.size, self.crypt_method, self.l1_size, self.l1_offset,
                                    self.rt_offset, self.rt_clusters, self.nb_snapshots,
                                    self.snapshots_offset))
        if self.version >= 3:
            out += HDR_V3.pack(self.incompat, self.compat, self.autoclear, self.refcount_order,
                               self.header_length)
            if self.header_length > 104:
                out += bytes([self.compression_type]) + self.extra
                out = out[:self.header_length] + bytes(self.header_length - len(out))
        exts = []
        if self.backing_fmt and self.backing_file:
            exts.append((EXT_BACKING_FMT, self.backing_fmt.encode()))
        if self.data_file:
            exts.append((EXT_DATA_FILE, self.data_file.encode()))
        if self.version >= 3:
            exts.append((EXT_FEATURES, self.feature_table if self.feature_table is not None
                         else b"".join(struct.pack(">BB46s", k, b, n.encode())
                                       for k, b, n in FEATURE_NAMES)))
        if self.bitmaps_ext is not None:
            exts.append((EXT_BITMAPS, self.bitmaps_ext))
        exts += self.unknown_exts
        if self.version >= 3 or exts:
            for etype, data in exts:
                out += struct.pack(">II", etype, len(data)) + data + bytes(-len(data) % 8)
            out += struct.pack(">II", EXT_END, 0)
        if bf:
            struct.pack_into(">Q", out, 8, len(out))
            out += bf
        if len(out) > cluster_size:
            raise BlockError("", "qcow2 header does not fit in the first cluster")
        return bytes(out)


class Snapshot:
    __slots__ = ("l1_offset", "l1_size", "id", "name", "date_sec", "date_nsec", "vm_clock_nsec",
                 "vm_state_size", "extra", "disk_size", "icount")

    def pack(self) -> bytes:
        extra = bytearray(self.extra)
        if len(extra) < 16:
            extra += bytes(16 - len(extra))
        struct.pack_into(">QQ", extra, 0, self.vm_state_size, self.disk_size)
        ident, name = self.id.encode(), self.name.encode()
        b = struct.pack(">QIHHIIQII", self.l1_offset, self.l1_size, len(ident), len(name),
                        self.date_sec, self.date_nsec, self.vm_clock_nsec,
                        min(self.vm_state_size, 0xFFFFFFFF), len(extra)) + bytes(extra) + ident + name
        return b + bytes(-len(b) % 8)


class _Alloc:
    """An allocation in flight: guest clusters locked until commit, the L2
    entries to write then, and old host clusters to release after."""

    __slots__ = ("clusters", "updates", "release")

    def __init__(self):
        self.clusters: list[int] = []
        self.updates: list[tuple[int, int, int]] = []   # (guest cluster, entry, bitmap)
        self.release: list[int] = []                     # old L2 entries to unreference


@register
class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    supports_backing = True
    supports_discard = True
    direct_map = True

    @classmethod
    def probe(cls, header: bytes, path: str) -> int:
        return 100 if header[:4] == MAGIC else 0

    def __init__(self, path: str, read_only: bool = False, direct: bool = False,
                 chain: frozenset = frozenset(), l2_cache_size: int | None = None,
                 open_backing: bool = True, repair: bool = True):
        self.path = path
        self.read_only = read_only
        self.backing = None
        self.data_fd = -1
        self.fd = -1
        self.bfd = -1
        self.mfd = open_file(path, read_only, False)    # metadata: buffered
        try:
            self._open(direct, chain, l2_cache_size, open_backing, repair)
        except BaseException:
            self._close_fds()
            raise

    # -- opening -----------------------------------------------------------------------

    def _open(self, direct, chain, l2_cache_size, open_backing, repair):
        path = self.path
        st = os.fstat(self.mfd)
        self.eof = st.st_size
        self._size_at_open = self._grown_to = st.st_size
        head = os.pread(self.mfd, 1 << 21, 0) if self.eof >= 72 else b""
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
            raise BlockError(path, f"L1 table too large ({h.l1_size} entries)")
        if h.l1_size < need_l1:
            raise BlockError(path, f"L1 table ({h.l1_size} entries) too small for the virtual "
                             f"size {h.size}")
        self._check_table(h.l1_offset, h.l1_size * 8, "L1 table")
        if h.rt_clusters * cs > MAX_REFTABLE_BYTES or h.rt_clusters == 0:
            raise BlockError(path, f"invalid refcount table size ({h.rt_clusters} clusters)")
        self._check_table(h.rt_offset, h.rt_clusters * cs, "refcount table")
        if h.nb_snapshots > MAX_SNAPSHOTS:
            raise BlockError(path, f"too many snapshots ({h.nb_snapshots})")
        if h.nb_snapshots:
            self._check_table(h.snapshots_offset, 0, "snapshot table")
        read_only = self.read_only
        if not read_only and h.incompat & INCOMPAT_CORRUPT:
            raise BlockError(path, "image is marked corrupt; it can only be opened read-only "
                             "(repair it with 'pykvm img check -r all')")
        self.l1 = list(struct.unpack(f">{h.l1_size}Q",
                                     self._read_meta(h.l1_offset, h.l1_size * 8)))
        self.rt_cap = h.rt_clusters * cs // 8
        self.reftable = list(struct.unpack(f">{self.rt_cap}Q",
                                           self._read_meta(h.rt_offset, h.rt_clusters * cs)))
        self.snapshots = self._read_snapshots()
        cache = l2_cache_size if l2_cache_size is not None else \
            min(32 << 20, max(1 << 20, need_l1 * cs))
        self.l2_cache_max = max(2, cache // cs)
        self._l2 = collections.OrderedDict()           # L2 offset -> list of entries
        self._rb = collections.OrderedDict()           # refblock offset -> bytearray
        self._rb_dirty: set[int] = set()
        self.rb_cache_max = max(8, (4 << 20) // cs)
        self._busy: set[int] = set()
        self._claimed: set[int] = set()
        self._rc_batch = None
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
            self.data_fd = open_file(dpath, read_only, direct)
            self.data_path = dpath
            self.fd = self.data_fd
            self.bfd = open_file(dpath, read_only, False) if direct else self.data_fd
        else:
            if h.data_file:
                raise BlockError(path, "data file named without the external data file feature")
            self.data_path = None
            self.fd = open_file(path, read_only, direct) if direct else os.dup(self.mfd)
            self.bfd = self.mfd
        # self.fd (O_DIRECT with cache=none/directsync) carries the guest's own
        # I/O on aligned buffers; the driver's synchronous data copies
        # (copy-on-write, zero padding) use self.bfd, a buffered descriptor of
        # the same file, since their buffers are ordinary Python objects.
        self.data_raw = bool(h.autoclear & AUTOCLEAR_DATA_RAW) and self.data_fd >= 0
        # backing
        if h.backing_file and open_backing:
            bpath = self._relative(h.backing_file)
            if h.backing_fmt and h.backing_fmt not in ("raw", "qcow2"):
                raise BlockError(path, f"backing file format {h.backing_fmt!r} is not supported")
            try:
                self.backing = open_image(bpath, h.backing_fmt, read_only=True, chain=chain)
            except BlockError as e:
                raise BlockError(path, f"backing file: {e}") from None
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
        data = os.pread(self.mfd, length, offset)
        if len(data) < length:
            raise BlockError(self.path, f"metadata at {offset:#x} is past the end of the file")
        return data

    def _read_snapshots(self) -> list[Snapshot]:
        h = self.h
        out = []
        pos = h.snapshots_offset
        limit = pos + MAX_SNAPSHOT_TABLE
        for _ in range(h.nb_snapshots):
            if pos + 40 > min(self.eof, limit):
                raise BlockError(self.path, "snapshot table runs past the end of the file")
            (l1_off, l1_size, id_len, name_len, sec, nsec, clock, vmsize,
             extra_len) = struct.unpack(">QIHHIIQII", self._read_meta(pos, 40))
            if extra_len > 1024:
                raise BlockError(self.path, f"snapshot extra data too large ({extra_len})")
            body = self._read_meta(pos + 40, extra_len + id_len + name_len)
            s = Snapshot()
            s.l1_offset, s.l1_size = l1_off, l1_size
            s.date_sec, s.date_nsec, s.vm_clock_nsec = sec, nsec, clock
            s.extra = body[:extra_len]
            s.vm_state_size = struct.unpack(">Q", s.extra[:8])[0] if extra_len >= 8 else vmsize
            s.disk_size = struct.unpack(">Q", s.extra[8:16])[0] if extra_len >= 16 else h.size
            s.icount = struct.unpack(">Q", s.extra[16:24])[0] if extra_len >= 24 else None
            s.id = body[extra_len:extra_len + id_len].decode(errors="replace")
            s.name = body[extra_len + id_len:].decode(errors="replace")
            if l1_size * 8 > MAX_L1_BYTES or l1_off % self.cluster_size:
                raise BlockError(self.path, f"snapshot {s.name!r} has an invalid L1 table")
            out.append(s)
            pos += 40 + extra_len + id_len + name_len
            pos += -pos % 8
        self._snap_len = pos - h.snapshots_offset
        return out

    # -- header updates (single fields; everything else stays as read) ------------------

    def _write_header_field(self, offset: int, fmt: str, *values) -> None:
        os.pwrite(self.mfd, struct.pack(fmt, *values), offset)

    def _set_incompat(self, value: int) -> None:
        self.h.incompat = value
        self._write_header_field(72, ">Q", value)

    def rewrite_header(self) -> None:
        """Write the whole header area from ``self.h`` (rebase, amend)."""
        data = self.h.pack(self.cluster_size)
        pwrite_full(self.mfd, data + bytes(self.cluster_size - len(data)), 0)

    # -- the L2 cache ------------------------------------------------------------------

    def _load_l2(self, l2_off: int) -> list:
        t = self._l2.get(l2_off)
        if t is not None:
            self._l2.move_to_end(l2_off)
            return t
        if l2_off % self.cluster_size:
            raise BlockError(self.path, f"L2 table offset {l2_off:#x} is not cluster-aligned")
        if l2_off + self.cluster_size > self.eof:
            raise BlockError(self.path, f"L2 table at {l2_off:#x} is past the end of the file")
        t = list(struct.unpack(f">{self.l2_entries * self.entry_words}Q",
                               self._read_meta(l2_off, self.cluster_size)))
        self._l2[l2_off] = t
        if len(self._l2) > self.l2_cache_max:
            self._l2.popitem(last=False)
        return t

    def _l2_for(self, ci: int):
        """(L2 table, index of ci's entry) or (None, 0) when unallocated."""
        l1i = ci >> self.l2_bits
        if l1i >= len(self.l1):
            return None, 0
        l2_off = self.l1[l1i] & OFFSET_MASK
        if not l2_off:
            return None, 0
        return self._load_l2(l2_off), (ci & (self.l2_entries - 1)) * self.entry_words

    # -- map ---------------------------------------------------------------------------

    def map(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        cb, cs = self.cluster_bits, self.cluster_size
        end = offset + length
        fd = self.fd
        while offset < end:
            ci = offset >> cb
            in_c = offset & (cs - 1)
            l2, idx = self._l2_for(ci)
            if l2 is None:   # a whole L2 table's span is unallocated
                span = ((ci >> self.l2_bits) + 1 << self.l2_bits + cb) - offset
                n = min(end - offset, span)
                _append(out, "unallocated", offset, n, -1, 0)
                offset += n
                continue
            n = min(end - offset, cs - in_c)
            e = l2[idx]
            if e & COMPRESSED:
                out.append(Extent("compressed", offset, n, -1, 0, (e, ci << cb)))
            elif self.extl2:
                self._map_sub(out, offset, n, in_c, e, l2[idx + 1])
            elif e & ZERO:
                _append(out, "zero", offset, n, -1, 0)
            else:
                host = e & OFFSET_MASK
                if host or (e & COPIED and self.data_fd >= 0):
                    self._check_data(host, ci)
                    _append(out, "data", offset, n, fd, host + in_c)
                else:
                    _append(out, "unallocated", offset, n, -1, 0)
            offset += n
        return out

    def data_at(self, offset: int, length: int, write: bool = False) -> int:
        cb = self.cluster_bits
        ci = offset >> cb
        if (offset + length - 1) >> cb != ci or self.extl2:
            return -1
        l1i = ci >> self.l2_bits
        if l1i >= len(self.l1):
            return -1
        t = self._l2.get(self.l1[l1i] & OFFSET_MASK)
        if t is None:
            return -1
        e = t[ci & (self.l2_entries - 1)]
        host = e & OFFSET_MASK
        if e & (COMPRESSED | ZERO) or not host or host >= self.eof:
            return -1
        if write and (not e & COPIED or ci in self._busy or self.read_only):
            return -1
        return host + (offset & (self.cluster_size - 1))

    def _map_sub(self, out, offset, n, in_c, e, bitmap):
        host = e & OFFSET_MASK
        sc = self.sc_size
        end = offset + n
        pos_in = in_c
        while offset < end:
            s = pos_in // sc
            k = min(end - offset, (s + 1) * sc - pos_in)
            if bitmap >> s & 1:
                if not host and self.data_fd < 0:
                    raise BlockError(self.path, f"allocated subcluster without a host cluster at "
                                     f"guest offset {offset:#x}")
                _append(out, "data", offset, k, self.fd, host + pos_in)
            elif bitmap >> (32 + s) & 1:
                _append(out, "zero", offset, k, -1, 0)
            else:
                _append(out, "unallocated", offset, k, -1, 0)
            offset += k
            pos_in += k

    def _check_data(self, host: int, ci: int) -> None:
        if self.data_fd >= 0:
            if host != ci << self.cluster_bits:
                raise BlockError(self.path, f"data cluster of guest cluster {ci} is at "
                                 f"{host:#x}, not at its guest offset (external data file)")
        elif host >= self.eof or host < self.cluster_size:
            raise BlockError(self.path, f"data cluster at {host:#x} is outside the file")

    # -- the direct map (a device's own I/O thread serves plain data itself) -----------

    def _dx_changed(self, l1i: int | None = None) -> None:
        """The L2 entries under L1 index l1i (None: any) may have changed."""
        if l1i is None:
            self._dx.clear()
        else:
            self._dx.pop(l1i, None)
        self.map_version += 1

    def direct_extents(self) -> list[DirectExtent]:
        """The allocated data of the active image: normal clusters (not
        compressed, not zero, not unallocated) and, with extended L2 entries,
        allocated subclusters. Writable where an in-place write needs no
        metadata change: COPIED (refcount 1) in a writable image. Anything
        that does not look sound (a host cluster outside the file) is left
        out: the driver's own path reports it. One L2 table's span is
        computed once and kept until an entry in it changes."""
        out: list[DirectExtent] = []
        for l1i in range(min(len(self.l1), -(-self.size >> self.cluster_bits + self.l2_bits)
                         or 1)):
            span = self._dx.get(l1i)
            if span is None:
                span = self._dx[l1i] = self._dx_span(l1i)
            if not span:
                continue
            if out:
                p, e = out[-1], span[0]
                if p.offset + p.length == e.offset and p.fd == e.fd and \
                        p.host_offset + p.length == e.host_offset and p.writable == e.writable:
                    out[-1] = p._replace(length=p.length + e.length)
                    out.extend(span[1:])
                    continue
            out.extend(span)
        return out

    def _dx_span(self, l1i: int) -> list[DirectExtent]:
        off = self.l1[l1i] & OFFSET_MASK
        cs, cb = self.cluster_size, self.cluster_bits
        if not off or off % cs or off + cs > self.eof:
            return []
        table = self._l2.get(off)
        if table is None:   # read it without evicting the cache's tables
            table = struct.unpack(f">{self.l2_entries * self.entry_words}Q",
                                  self._read_meta(off, cs))
        w = self.entry_words
        first = l1i << self.l2_bits
        n = min(self.l2_entries, -(-self.size >> cb) - first)
        fd, size, eof, extl2 = self.fd, self.size, self.eof, self.extl2
        external = self.data_fd >= 0
        may_write = not self.read_only
        sc = self.sc_size
        runs: list[list] = []       # [offset, length, host, writable]
        if not extl2 and not external:
            return self._dx_runs(table, first, n)
        for j in range(n):
            e = table[j * w]
            if not e or e & COMPRESSED or (not extl2 and e & ZERO):
                continue
            ci = first + j
            g = ci << cb
            host = e & OFFSET_MASK
            if external:
                if host != g or not (host or e & COPIED):
                    continue
            elif host < cs or host >= eof:      # as map() (_check_data)
                continue
            writable = may_write and bool(e & COPIED)
            if extl2:
                bm = table[j * w + 1] & 0xFFFFFFFF
                if not bm:
                    continue
                pieces = [(0, cs)] if bm == 0xFFFFFFFF else _bit_runs(bm, sc)
            else:
                pieces = ((0, cs),)
            for lo, length in pieces:
                length = min(length, size - g - lo)
                if length <= 0:
                    continue
                if runs:
                    r = runs[-1]
                    if r[0] + r[1] == g + lo and r[2] + r[1] == host + lo and r[3] == writable:
                        r[1] += length
                        continue
                runs.append([g + lo, length, host + lo, writable])
        return [DirectExtent(o, n_, fd, h, wr) for o, n_, h, wr in runs]

    def _dx_runs(self, table, first: int, n: int) -> list[DirectExtent]:
        """_dx_span without subclusters or an external data file, by runs: a
        run of entries that map neighbouring host clusters with the same flags
        is found by comparing slices of the table with ranges (doubling the
        step), not entry by entry: a table filled in order costs a few dozen
        comparisons instead of a Python loop over thousands of entries."""
        cs, cb = self.cluster_size, self.cluster_bits
        fd, size, eof = self.fd, self.size, self.eof
        may_write = not self.read_only
        seq = type(table)
        out: list[DirectExtent] = []
        j = 0
        while j < n:
            e = table[j]
            host = e & OFFSET_MASK
            if not e or e & (COMPRESSED | ZERO) or host < cs or host >= eof:
                j += 1
                continue
            k, step = 1, 1                  # table[j:j + k] is e, e + cs, ...
            limit = min(n - j, (eof - host) // cs)   # every host cluster inside the file
            while k < limit:
                m = min(step, limit - k)
                if table[j + k:j + k + m] == seq(range(e + k * cs, e + (k + m) * cs, cs)):
                    k += m
                    step *= 2
                elif step > 1:
                    step = 1
                else:
                    break
            g = (first + j) << cb
            length = min(k * cs, size - g)
            writable = may_write and bool(e & COPIED)
            if out and out[-1].offset + out[-1].length == g and \
                    out[-1].host_offset + out[-1].length == host and out[-1].writable == writable:
                last = out.pop()
                out.append(last._replace(length=last.length + length))
            else:
                out.append(DirectExtent(g, length, fd, host, writable))
            j += k
        return out

    def read_compressed(self, extent: Extent) -> bytes:
        e, gstart = extent.aux
        if self._zc is None or self._zc[0] != e:
            self._zc = (e, self._decompress(e))
        lo = extent.offset - gstart
        return self._zc[1][lo:lo + extent.length]

    def _compressed_span(self, e: int) -> tuple[int, int]:
        x = self.compressed_bits
        coff = e & ((1 << x) - 1)
        nsect = ((e >> x) & ((1 << (62 - x)) - 1)) + 1
        return coff, nsect * 512 - (coff & 511)

    def _decompress(self, e: int) -> bytes:
        coff, clen = self._compressed_span(e)
        if self.data_fd >= 0:
            raise BlockError(self.path, "compressed cluster in an image with an external data file")
        if coff + clen > self.eof + 512:
            raise BlockError(self.path, f"compressed cluster at {coff:#x} is past the end of "
                             f"the file")
        raw = os.pread(self.mfd, clen, coff)
        cs = self.cluster_size
        try:
            if self.h.compression_type == 0:
                d = zlib.decompressobj(-15)
                out = d.decompress(raw, cs)
            else:
                zstandard = _zstd()
                if zstandard is None:
                    raise BlockError(self.path, "zstd-compressed clusters need the 'zstandard' "
                                     "module")
                out = zstandard.ZstdDecompressor().decompressobj().decompress(raw)[:cs]
        except (zlib.error, Exception) as exc:
            if isinstance(exc, BlockError):
                raise
            raise BlockError(self.path, f"compressed cluster at {coff:#x} does not decompress: "
                             f"{exc}") from None
        if len(out) < cs:
            raise BlockError(self.path, f"compressed cluster at {coff:#x} decompresses to "
                             f"{len(out)} bytes, not {cs}")
        return out

    # -- refcounts ---------------------------------------------------------------------

    def _refblock(self, off: int) -> bytearray:
        b = self._rb.get(off)
        if b is not None:
            self._rb.move_to_end(off)
            return b
        if off % self.cluster_size or off + self.cluster_size > self.eof:
            raise BlockError(self.path, f"refcount block at {off:#x} is misaligned or past the "
                             f"end of the file")
        b = bytearray(self._read_meta(off, self.cluster_size))
        self._rb[off] = b
        while len(self._rb) > self.rb_cache_max:
            old, blk = self._rb.popitem(last=False)
            if old in self._rb_dirty:
                pwrite_full(self.mfd, blk, old)
                self._rb_dirty.discard(old)
        return b

    def refcount(self, ci: int) -> int:
        ti, bi = divmod(ci, self.rb_entries)
        if ti >= self.rt_cap:
            return 0
        boff = self.reftable[ti] & REFT_MASK
        if not boff:
            return 0
        return rc_get(self._refblock(boff), bi, self.rc_order)

    def _set_refcount(self, ci: int, value: int) -> None:
        if value > self.rc_max or value < 0:
            raise BlockError(self.path, f"refcount of cluster {ci} would be {value} (the image's "
                             f"{1 << self.rc_order}-bit refcounts overflow)")
        ti, bi = divmod(ci, self.rb_entries)
        if ti >= self.rt_cap:
            if value == 0:
                return
            self._grow_reftable(ti)
        boff = self.reftable[ti] & REFT_MASK
        if not boff:
            if value == 0:
                return
            boff = self._alloc_refblock(ti)
        blk = self._refblock(boff)
        rc_set(blk, bi, self.rc_order, value)
        if self.lazy and self._marked_dirty:
            self._rb_dirty.add(boff)
        elif self._rc_batch is not None:
            lo, hi = rc_span(bi, self.rc_order)
            span = self._rc_batch.get(boff)
            self._rc_batch[boff] = (min(lo, span[0]), max(hi, span[1])) if span else (lo, hi)
        else:
            lo, hi = rc_span(bi, self.rc_order)
            os.pwrite(self.mfd, blk[lo:hi], boff + lo)
        if value == 0 and ci < self._free_hint:
            self._free_hint = ci

    def _alloc_refblock(self, ti: int) -> int:
        cs = self.cluster_size
        f = self._find_free(1)
        self._claimed.add(f)
        batch, self._rc_batch = self._rc_batch, None     # this one is written through
        try:
            blk = bytearray(cs)
            if f // self.rb_entries == ti:          # the new block describes itself
                rc_set(blk, f % self.rb_entries, self.rc_order, 1)
            else:
                self._set_refcount(f, 1)
            pwrite_full(self.mfd, blk, f * cs)
            self._grew(f * cs + cs)
            self._rb[f * cs] = blk
            self.reftable[ti] = f * cs
            os.pwrite(self.mfd, struct.pack(">Q", f * cs), self.h.rt_offset + ti * 8)
        finally:
            self._claimed.discard(f)
            self._rc_batch = batch
        return f * cs

    def _grow_reftable(self, need_ti: int) -> None:
        """A bigger refcount table at the end of the file, with refcount blocks
        for itself; the header switches to it in one write; the old one is freed."""
        cs, epb = self.cluster_size, self.rb_entries
        old_cap = self.rt_cap
        entries = max(need_ti + 1, old_cap * 2)
        start = max(-(-self.eof // cs), old_cap * epb, max(self._claimed, default=0) + 1)
        while True:
            nt = -(-entries * 8 // cs)
            first = start // epb
            nb = 0
            while True:
                last = (start + nb + nt - 1) // epb
                if last - first + 1 == nb:
                    break
                nb = last - first + 1
            if last + 1 <= entries:
                break
            entries = last + 1
        entries = nt * cs // 8
        if entries * 8 > MAX_REFTABLE_BYTES:
            raise BlockError(self.path, "refcount table would exceed 8 MiB")
        table = self.reftable + [0] * (entries - old_cap)
        area = range(start, start + nb + nt)
        for k in range(nb):
            ti = first + k
            blk = bytearray(cs)
            for ci in area:
                if ci // epb == ti:
                    rc_set(blk, ci % epb, self.rc_order, 1)
            pwrite_full(self.mfd, blk, (start + k) * cs)
            self._rb[(start + k) * cs] = blk
            table[ti] = (start + k) * cs
        new_off = (start + nb) * cs
        pwrite_full(self.mfd, struct.pack(f">{entries}Q", *table), new_off)
        self._grew(new_off + nt * cs)
        old_off, old_clusters = self.h.rt_offset, self.h.rt_clusters
        os.fdatasync(self.mfd)
        self._write_header_field(48, ">QI", new_off, nt)
        self.h.rt_offset, self.h.rt_clusters = new_off, nt
        self.reftable, self.rt_cap = table, entries
        for k in range(old_clusters):
            self._unref(old_off // cs + k)

    def _unref(self, ci: int, punch: bool = False) -> None:
        rc = self.refcount(ci)
        if rc == 0:
            raise BlockError(self.path, f"freeing cluster {ci}, whose refcount is already 0")
        self._set_refcount(ci, rc - 1)
        if rc == 1 and punch:
            fallocate(self.mfd, PUNCH, ci * self.cluster_size, self.cluster_size)

    def _find_free(self, n: int) -> int:
        epb, order = self.rb_entries, self.rc_order
        i = max(self._free_hint, 1)
        run_start, run = i, 0
        while True:
            ti = i // epb
            if ti >= self.rt_cap:
                # nothing is allocated beyond the table's coverage
                if run == 0:
                    run_start = i
                while any(c in self._claimed for c in range(run_start, run_start + n)):
                    run_start += 1
                return run_start
            boff = self.reftable[ti] & REFT_MASK
            blk = self._refblock(boff) if boff else None
            block_end = (ti + 1) * epb
            while i < block_end:
                if (blk is None or rc_get(blk, i % epb, order) == 0) and i not in self._claimed:
                    if run == 0:
                        run_start = i
                    run += 1
                    if run == n:
                        if n == 1:
                            self._free_hint = i
                        return run_start
                else:
                    run = 0
                i += 1

    def _grew(self, end: int) -> None:
        if end > self.eof:
            self.eof = end

    GROW_STEP = 64 << 20

    def _grow_file(self, end: int) -> None:
        """Make the file reach ``end`` now, in steps of GROW_STEP, with
        fallocate. A data write past the end of the file is an extending write,
        which ext4 runs synchronously under the inode's lock when it is
        O_DIRECT; our metadata writes (and a fallocate, which waits for every
        O_DIRECT write in flight) then queue behind each one. Growing in steps
        makes data writes land inside the file, and a file system that
        allocates at write time does not do it page by page. close() cuts what
        was not used; after a crash, clusters past every refcount are not
        even a leak. Where fallocate is refused, writes grow the file as
        before."""
        if self._grown_to < 0:
            return
        start = max(self._grown_to, self.eof)
        target = -(-end // self.GROW_STEP) * self.GROW_STEP
        rc = fallocate(self.fd, 0, start, target - start)
        if rc == 0:
            self._grown_to = target
        elif rc in (-errno.EOPNOTSUPP, -errno.ENOSYS):
            self._grown_to = -1         # not here: never again
        else:                           # ENOSPC, say: the data write itself will tell
            self._grown_to = max(self._grown_to, self.eof)

    def alloc_clusters(self, n: int) -> int:
        """n contiguous new host clusters, refcount 1 each; their offset.
        ``self._fresh`` says whether they lie past anything ever written (read as zeroes)."""
        ci = self._find_free(n)
        cs = self.cluster_size
        self._fresh = ci * cs >= self.eof
        if (ci + n) * cs > self._grown_to:
            self._grow_file((ci + n) * cs)
        claim = set(range(ci, ci + n))
        self._claimed |= claim
        self._rc_batch = {}              # one write per refcount block touched
        epb, order = self.rb_entries, self.rc_order
        try:
            k = 0
            while k < n:
                self._set_refcount(ci + k, 1)    # makes the block (or a bigger table) if needed
                ti, bi = divmod(ci + k, epb)
                m = min(n - k, epb - bi)
                if m > 1:                        # the rest of the run in this block at once
                    boff = self.reftable[ti] & REFT_MASK
                    blk = self._refblock(boff)
                    if order >= 3:
                        w = 1 << (order - 3)
                        blk[(bi + 1) * w:(bi + m) * w] = (1).to_bytes(w, "big") * (m - 1)
                    else:
                        for b in range(bi + 1, bi + m):
                            rc_set(blk, b, order, 1)
                    if self.lazy and self._marked_dirty:
                        self._rb_dirty.add(boff)
                    else:
                        lo, hi = rc_span(bi + m - 1, order)
                        span = self._rc_batch.get(boff)
                        self._rc_batch[boff] = (min(lo, span[0]), max(hi, span[1])) if span \
                            else (rc_span(bi, order)[0], hi)
                k += m
        finally:
            batch, self._rc_batch = self._rc_batch, None
            for boff, (lo, hi) in batch.items():
                blk = self._rb.get(boff) or self._refblock(boff)
                os.pwrite(self.mfd, blk[lo:hi], boff + lo)
            self._claimed -= claim
        self._free_hint = ci + n
        self._grew((ci + n) * self.cluster_size)
        return ci * self.cluster_size

    # -- dirty bit (lazy refcounts) ----------------------------------------------------

    def _mark_dirty(self) -> None:
        if self.lazy and not self._marked_dirty:
            self._set_incompat(self.h.incompat | INCOMPAT_DIRTY)
            os.fdatasync(self.mfd)
            self._marked_dirty = True

    def flush_metadata(self) -> None:
        for off in sorted(self._rb_dirty):
            blk = self._rb.get(off)
            if blk is not None:
                pwrite_full(self.mfd, blk, off)
        self._rb_dirty.clear()

    @property
    def sync_fds(self) -> list[int]:
        return [self.fd, self.mfd] if self.data_fd >= 0 else [self.fd]

    # -- allocation for writes ---------------------------------------------------------

    def _l2_writable(self, ci: int) -> tuple[list, int]:
        """ci's L2 table, allocated (or copied, if shared with a snapshot) as needed."""
        l1i = ci >> self.l2_bits
        if l1i >= len(self.l1):
            raise BlockError(self.path, f"guest cluster {ci} is past the L1 table")
        e = self.l1[l1i]
        off = e & OFFSET_MASK
        cs = self.cluster_size
        if off and (e & COPIED or self.refcount(off // cs) == 1):
            if not e & COPIED:
                self._set_l1(l1i, off | COPIED)
            return self._load_l2(off), (ci & (self.l2_entries - 1)) * self.entry_words
        new = self.alloc_clusters(1)
        if off:
            table = list(self._load_l2(off))
            if not self.extl2:
                table = [x & ~COPIED for x in table]
            else:
                table = [x & ~COPIED if i % 2 == 0 else x for i, x in enumerate(table)]
        else:
            table = [0] * (self.l2_entries * self.entry_words)
        pwrite_full(self.mfd, struct.pack(f">{len(table)}Q", *table), new)
        self._l2[new] = table
        self._set_l1(l1i, new | COPIED)
        if off:
            self._unref(off // cs)
            self._l2.pop(off, None)
        return table, (ci & (self.l2_entries - 1)) * self.entry_words

    def _set_l1(self, i: int, value: int) -> None:
        self._dx_changed(i)
        self.l1[i] = value
        os.pwrite(self.mfd, struct.pack(">Q", value), self.h.l1_offset + i * 8)

    def _set_l2(self, ci: int, entry: int, bitmap: int | None = None) -> None:
        l2, idx = self._l2_writable(ci)
        l1e = self.l1[ci >> self.l2_bits] & OFFSET_MASK
        self._dx_changed(ci >> self.l2_bits)
        l2[idx] = entry
        if self.extl2:
            if bitmap is None:
                bitmap = l2[idx + 1]
            l2[idx + 1] = bitmap
            os.pwrite(self.mfd, struct.pack(">QQ", entry, bitmap), l1e + idx * 8)
        else:
            os.pwrite(self.mfd, struct.pack(">Q", entry), l1e + idx * 8)

    def _set_l2_many(self, updates) -> None:
        """Several L2 entries; one write per run of neighbours in a table."""
        if len(updates) == 1:
            ci, entry, bitmap = updates[0]
            self._set_l2(ci, entry, bitmap)
            return
        w = self.entry_words
        runs: list = []
        for ci, entry, bitmap in sorted(updates):
            l2, idx = self._l2_writable(ci)
            self._dx_changed(ci >> self.l2_bits)
            l2[idx] = entry
            if w == 2:
                l2[idx + 1] = bitmap if bitmap is not None else l2[idx + 1]
            off = self.l1[ci >> self.l2_bits] & OFFSET_MASK
            if runs and runs[-1][0] == off and runs[-1][2] == idx:
                runs[-1][2] = idx + w
            else:
                runs.append([off, idx, idx + w, l2])
        for off, lo, hi, l2 in runs:
            os.pwrite(self.mfd, struct.pack(f">{hi - lo}Q", *l2[lo:hi]), off + lo * 8)

    def _in_place(self, ci: int, e: int) -> int:
        """Host offset if guest cluster ci's data can be overwritten in place, else 0."""
        if e & COMPRESSED:
            return 0
        host = e & OFFSET_MASK
        if self.data_fd >= 0:
            return host if e & COPIED else 0
        if not host:
            return 0
        if e & COPIED:
            return host
        return host if self.refcount(host >> self.cluster_bits) == 1 else 0

    def map_for_write(self, offset: int, length: int) -> WritePlan:
        if self.read_only:
            raise BlockError(self.path, "image is read-only")
        cb, cs = self.cluster_bits, self.cluster_size
        first, last = offset >> cb, (offset + length - 1) >> cb
        busy = self._busy
        for ci in range(first, last + 1):
            if ci in busy:
                raise WriteBusy(ci)
        self._mark_dirty()
        if last > first and self.data_fd < 0 and not self.extl2:
            fresh = [ci for ci in range(first, last + 1) if self._unallocated(ci)]
            if len(fresh) > 1:       # one contiguous run for the new clusters
                base = self.alloc_clusters(len(fresh))
                self._prealloc = {ci: base + k * self.cluster_size for k, ci in enumerate(fresh)}
        extents: list[Extent] = []
        alloc = None
        end = offset + length
        pos = offset
        fd = self.fd
        while pos < end:
            ci = pos >> cb
            in_c = pos & (cs - 1)
            n = min(end - pos, cs - in_c)
            l2, idx = self._l2_for(ci)
            e = l2[idx] if l2 is not None else 0
            host = self._in_place(ci, e) if e else 0
            if host and not self.extl2 and not e & ZERO:
                if not e & COPIED:
                    self._set_l2(ci, e | COPIED)
                _append(extents, "data", pos, n, fd, host + in_c)
            elif host and self.extl2 and self._subclusters_allocated(l2[idx + 1], in_c, n):
                _append(extents, "data", pos, n, fd, host + in_c)
            else:
                if alloc is None:
                    alloc = _Alloc()
                l2, idx = self._l2_writable(ci)     # the table first: data lands after it
                h = self._allocate(ci, in_c, n, e, l2[idx + 1] if self.extl2 else 0, host, alloc)
                _append(extents, "data", pos, n, fd, h + in_c)
            pos += n
        for ci in self._prealloc:              # not needed after all (cannot happen)
            self._unref(self._prealloc[ci] >> cb)
        self._prealloc = {}
        if alloc is not None:
            busy.update(alloc.clusters)
            sequential = offset == self._stream_end
            self._stream_end = offset + length
            if sequential:
                self._allocate_ahead(last + 1)
            else:
                self._ahead = self.AHEAD_MIN
        return WritePlan(extents, alloc)

    AHEAD_MIN, AHEAD_MAX = 4 << 20, 128 << 20

    def _allocate_ahead(self, ci: int) -> None:
        """An allocating write starts where the last one ended: a sequential
        fill. Map the next bytes of the disk (as far as they are unallocated
        and in this L2 table) to new clusters of the file that read as
        zeroes, as preallocation=metadata does, so the writes that follow are
        plain data writes: the C path serves them, once the backend has
        published a table with them, and no write waits for an allocation.
        How far: 4 MiB, doubled each time the fill goes on, up to 128 MiB, so
        what a fill leaves mapped past its end is at most about what it wrote.
        Only without a backing file (whose data an allocated cluster would
        hide) and only where the new clusters are fresh: past all data,
        fallocated or past the end of the file. Discard frees them as any."""
        cs = self.cluster_size
        if self.backing is not None or self.h.backing_file or self.data_fd >= 0 or self.extl2:
            return
        end = min(ci + max(1, self._ahead // cs), -(-self.size // cs),
                  (ci | (self.l2_entries - 1)) + 1)   # one L2 table: one write below
        l2, idx = self._l2_writable(ci)  # the table first: the data run lands after it
        n = next((k for k, e in enumerate(l2[idx:idx + end - ci]) if e), end - ci)
        n = min([n] + [c - ci for c in self._busy if ci <= c < ci + n])  # up to what is taken
        if n <= 0:
            return
        host = self.alloc_clusters(n)
        if not self._fresh:             # reused clusters hold old data: give them back
            for k in range(n):
                self._unref((host >> self.cluster_bits) + k)
            return
        self._map_run(ci, n, l2, idx, host)
        self._stream_end = (ci + n) * cs
        self._ahead = min(2 * self._ahead, self.AHEAD_MAX)

    def write_new(self, offset: int, data) -> bool:
        """Write whole clusters that are all unallocated (a new image being
        filled, as by ``pykvm img convert``): one run of new host clusters, one
        refcount write per refcount block, one data write, then one L2 write per
        table. The last cluster of the disk may be partial. False, with nothing
        done, when the range does not qualify (then use map_for_write)."""
        cb, cs = self.cluster_bits, self.cluster_size
        n = len(data)
        if self.read_only or self.data_fd >= 0 or not n or offset & (cs - 1) or \
                (n & (cs - 1) and offset + n != self.size) or offset + n > self.size:
            return False
        first = offset >> cb
        end = first + (-(-n >> cb))
        w, per = self.entry_words, self.l2_entries
        runs = []                                     # (first ci, count) per L2 table
        ci = first
        while ci < end:
            k = min(end - ci, per - (ci & (per - 1)))
            l2, idx = self._l2_for(ci)
            if l2 is not None and any(l2[idx:idx + k * w]):
                return False
            runs.append((ci, k))
            ci += k
        if self._busy and any(c in self._busy for c in range(first, end)):
            return False
        self._mark_dirty()
        tables = [(ci, k) + self._l2_writable(ci) for ci, k in runs]  # before the data
        host = self.alloc_clusters(end - first)  # fallocated: the write costs a third less
        try:
            pwrite_full(self.fd, data, host)
        except OSError as e:
            for c in range(end - first):
                self._unref((host >> cb) + c)
            raise BlockError(self.path, f"write at {offset:#x}", e.errno) from None
        for ci, k, l2, idx in tables:
            self._map_run(ci, k, l2, idx, host + ((ci - first) << cb))
        return True

    def _map_run(self, ci: int, k: int, l2: list, idx: int, host: int) -> None:
        """Point guest clusters ci..ci+k-1, all in one L2 table (``l2``, ci's
        entry at ``idx``, writable), at the host clusters from ``host`` on,
        COPIED (all subclusters allocated with extended L2); one table write."""
        cs, w = self.cluster_size, self.entry_words
        h = host | COPIED
        if w == 1:
            l2[idx:idx + k] = range(h, h + k * cs, cs)
        else:
            l2[idx:idx + 2 * k] = [x for c in range(h, h + k * cs, cs) for x in (c, 0xFFFFFFFF)]
        self._dx_changed(ci >> self.l2_bits)
        pwrite_full(self.mfd, struct.pack(f">{k * w}Q", *l2[idx:idx + k * w]),
                    (self.l1[ci >> self.l2_bits] & OFFSET_MASK) + idx * 8)

    def _unallocated(self, ci: int) -> bool:
        l2, idx = self._l2_for(ci)
        return l2 is None or l2[idx] == 0

    def _subclusters_allocated(self, bitmap: int, in_c: int, n: int) -> bool:
        sc = self.sc_size
        for s in range(in_c // sc, (in_c + n - 1) // sc + 1):
            if not bitmap >> s & 1:
                return False
        return True

    def _allocate(self, ci: int, in_c: int, n: int, e: int, bitmap: int, host: int,
                  alloc: _Alloc) -> int:
        """Give guest cluster ci a host cluster ready for a write of [in_c, in_c+n):
        copy-on-write whatever the write does not cover; the L2 update waits for commit."""
        cs = self.cluster_size
        gstart = ci << self.cluster_bits
        reuse = bool(host)
        if not reuse:
            if self.data_fd >= 0:
                host = gstart
            elif e & ZERO and not self.extl2 and (e & OFFSET_MASK) and \
                    self.refcount((e & OFFSET_MASK) >> self.cluster_bits) == 1:
                host = e & OFFSET_MASK           # preallocated zero cluster: reuse it
                reuse = True
            elif ci in self._prealloc:
                host = self._prealloc.pop(ci)
            else:
                host = self.alloc_clusters(1)
        fresh = not reuse and self.data_fd < 0 and self._fresh
        # the old content of this guest cluster, for the part the write does not cover
        if self.extl2 and not e & COMPRESSED:
            sc = self.sc_size
            s0, s1 = in_c // sc, (in_c + n - 1) // sc
            old_host = e & OFFSET_MASK
            new_bitmap = bitmap
            if not reuse and old_host and self.data_fd < 0:
                if bitmap & 0xFFFFFFFF:
                    # shared with a snapshot: copy every allocated subcluster over
                    data = bytearray(cs)
                    pread_full(self.bfd, memoryview(data), old_host)
                    pwrite_full(self.bfd, data, host)
                alloc.release.append(e)
            for s in (s0, s1) if s0 != s1 else (s0,):
                if bitmap >> s & 1:
                    continue                      # already there
                lo, hi = s * sc, (s + 1) * sc
                if lo >= in_c and hi <= in_c + n:
                    continue                      # fully overwritten
                self._cow_sub(gstart, host, lo, hi, in_c, n, bitmap >> (32 + s) & 1, fresh)
            for s in range(s0, s1 + 1):
                new_bitmap |= 1 << s
                new_bitmap &= ~(1 << (32 + s))
            alloc.updates.append((ci, host | COPIED, new_bitmap))
            alloc.clusters.append(ci)
            self._grew(host + cs)
            return host
        # standard entries: fill head [0, in_c) and tail [in_c+n, cs)
        if in_c or in_c + n < cs:
            if e & COMPRESSED:
                old = self._decompress(e)
            elif e & ZERO:
                old = None
            elif e & OFFSET_MASK or (e & COPIED and self.data_fd >= 0):
                old = bytearray(cs)
                pread_full(self.bfd, memoryview(old), e & OFFSET_MASK)
            elif self.backing is not None:
                old = bytearray(cs)
                read_into(self.backing, gstart, memoryview(old))
            else:
                old = None
            for lo, hi in ((0, in_c), (in_c + n, cs)):
                if hi <= lo:
                    continue
                if old is None:
                    if not fresh:
                        pwrite_full(self.bfd, bytes(hi - lo), host + lo)
                elif not fresh or any(memoryview(old)[lo:hi]):
                    pwrite_full(self.bfd, memoryview(old)[lo:hi], host + lo)
        if not reuse and e and (e & COMPRESSED or e & OFFSET_MASK) and self.data_fd < 0:
            alloc.release.append(e)
        alloc.updates.append((ci, host | COPIED, 0xFFFFFFFF if self.extl2 else 0))
        alloc.clusters.append(ci)
        self._grew(host + cs)
        return host

    def _cow_sub(self, gstart, host, lo, hi, in_c, n, zero, fresh):
        """Fill the parts of subcluster [lo, hi) outside the write [in_c, in_c+n)."""
        old = bytearray(hi - lo)
        if not zero and self.backing is not None:
            read_into(self.backing, gstart + lo, memoryview(old))
        for a, b in ((lo, min(hi, in_c)), (max(lo, in_c + n), hi)):
            if b > a and (not fresh or any(old[a - lo:b - lo])):
                pwrite_full(self.bfd, memoryview(old)[a - lo:b - lo], host + a)

    def commit(self, alloc) -> None:
        if alloc is None:
            return
        try:
            cb = self.cluster_bits
            for ci, entry, _ in alloc.updates:
                l2, idx = self._l2_for(ci)
                old = l2[idx] if l2 is not None else 0
                if old & OFFSET_MASK and (old & OFFSET_MASK) != (entry & OFFSET_MASK):
                    # copy-on-write away from a cluster a direct map may show
                    self._unmapping(ci << cb, 1 << cb)
            self._set_l2_many(alloc.updates)
            for e in alloc.release:
                self._release_entry(e)
        finally:
            self._busy.difference_update(alloc.clusters)

    def abort(self, alloc) -> None:
        if alloc is not None:
            self._busy.difference_update(alloc.clusters)

    def _release_entry(self, e: int, punch: bool = False) -> None:
        """Drop one reference to the host cluster(s) an L2 entry points at."""
        if self.data_fd >= 0:
            return
        cb = self.cluster_bits
        if e & COMPRESSED:
            coff, clen = self._compressed_span(e)
            for c in range(coff >> cb, (coff + clen - 1 >> cb) + 1):
                self._unref(c)
        elif e & OFFSET_MASK:
            self._unref((e & OFFSET_MASK) >> cb, punch)

    # -- discard and zeroes ------------------------------------------------------------

    def _whole_clusters(self, offset: int, length: int):
        cs = self.cluster_size
        lo = -(-offset // cs)
        hi = (offset + length) // cs
        if offset + length == self.size:
            hi = -(-self.size // cs)
        return lo, hi

    def discard(self, offset: int, length: int, punch: bool) -> None:
        """Free whole clusters of the range. They read as zeroes afterwards,
        except in a version 2 image with a backing file, where nothing changes."""
        if self.read_only:
            raise BlockError(self.path, "image is read-only")
        lo, hi = self._whole_clusters(offset, length)
        if self.extl2 and not self.data_raw:
            self._zero_clusters(lo, hi, unmap=True, punch=punch)
            return
        if (self.h.version < 3 and self.backing is not None) or self.data_raw:
            return
        self._zero_clusters(lo, hi, unmap=True, punch=punch)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> list[tuple[int, int]]:
        if self.read_only:
            raise BlockError(self.path, "image is read-only")
        cs = self.cluster_size
        end = offset + length
        if self.extl2:
            return self._zero_subclusters(offset, length, unmap)
        lo, hi = self._whole_clusters(offset, length)
        if lo >= hi or (self.h.version < 3 and self.backing is not None) or self.data_raw:
            return [(offset, length)]
        self._zero_clusters(lo, hi, unmap=unmap, punch=unmap)
        rest = []
        if offset < lo * cs:
            rest.append((offset, min(end, lo * cs) - offset))
        if end > hi * cs:
            rest.append((hi * cs, end - hi * cs))
        return rest

    def _zero_clusters(self, lo: int, hi: int, unmap: bool, punch: bool) -> None:
        for ci in range(lo, hi):
            if ci in self._busy:
                raise WriteBusy(ci)
        if hi > lo:
            cb = self.cluster_bits
            self._unmapping(lo << cb, (hi - lo) << cb)
        self._mark_dirty()
        v3 = self.h.version >= 3
        need_zero = self.backing is not None
        ci = lo
        while ci < hi:
            l2, idx = self._l2_for(ci)
            if l2 is None:
                if not need_zero:          # the whole table's span already reads as zeroes
                    ci = ((ci >> self.l2_bits) + 1) << self.l2_bits
                    continue
                e, bm = 0, 0
            else:
                e = l2[idx]
                bm = l2[idx + 1] if self.extl2 else 0
            if self.extl2:
                new_e, new_bm = (e, bm)
                if unmap or e & COMPRESSED:
                    new_e = 0
                new_bm = (0xFFFFFFFF << 32) if need_zero or new_e else 0
                if (new_e, new_bm) != (e, bm):
                    self._set_l2(ci, new_e, new_bm)
                    if new_e != e:
                        self._release_entry(e, punch)
            elif not v3:
                if e:
                    self._set_l2(ci, 0)
                    self._release_entry(e, punch)
            else:
                keep = not unmap and not e & COMPRESSED and e & OFFSET_MASK
                new_e = (e & (OFFSET_MASK | COPIED)) | ZERO if keep else \
                    (ZERO if need_zero else 0)
                if new_e != e:
                    self._set_l2(ci, new_e)
                    if not keep:
                        self._release_entry(e, punch)
            ci += 1

    def _zero_subclusters(self, offset, length, unmap):
        """Extended L2: whole subclusters get the zero bit, the rest is data."""
        sc, cs = self.sc_size, self.cluster_size
        end = offset + length
        a = -(-offset // sc) * sc
        b = end // sc * sc if end != self.size else end
        if a >= b:
            return [(offset, length)]
        rest = []
        if offset < a:
            rest.append((offset, a - offset))
        if end > b:
            rest.append((b, end - b))
        lo, hi = self._whole_clusters(a, b - a)
        for ci in range(a // cs, -(-b // cs)):
            if ci in self._busy:
                raise WriteBusy(ci)
        self._unmapping(a, b - a)
        self._mark_dirty()
        if lo < hi:
            self._zero_clusters(lo, hi, unmap=unmap, punch=unmap)
        for ci in range(a // cs, -(-b // cs)):
            if lo <= ci < hi:
                continue
            c0 = max(a, ci * cs) - ci * cs
            c1 = min(b, (ci + 1) * cs) - ci * cs
            mask = 0
            for s in range(c0 // sc, c1 // sc):
                mask |= 1 << s
            l2, idx = self._l2_for(ci)
            e, bm = (l2[idx], l2[idx + 1]) if l2 is not None else (0, 0)
            if e & COMPRESSED:
                rest.append((ci * cs + c0, c1 - c0))
                continue
            new_bm = (bm & ~mask) | (mask << 32)
            if new_bm != bm:
                self._set_l2(ci, e, new_bm)
        return rest

    def make_empty(self) -> None:
        """Drop every cluster of the active image (after a commit into the backing file)."""
        self._unmapping(0, self.size)
        self._mark_dirty()
        for l1i, l1e in enumerate(self.l1):
            off = l1e & OFFSET_MASK
            if not off:
                continue
            table = self._load_l2(off)
            for j in range(0, len(table), self.entry_words):
                e = table[j]
                if e or (self.extl2 and table[j + 1]):
                    ci = (l1i << self.l2_bits) + j // self.entry_words
                    self._set_l2(ci, 0, 0)
                    self._release_entry(e, punch=True)

    # -- resize ------------------------------------------------------------------------

    def resize(self, size: int) -> None:
        if size < self.size:
            raise BlockError(self.path, "shrinking a qcow2 image is not supported")
        if self.snapshots:
            raise BlockError(self.path, "cannot resize an image that has snapshots")
        cs = self.cluster_size
        need = -(-size // (cs * self.l2_entries))
        if need * 8 > MAX_L1_BYTES:
            raise BlockError(self.path, f"size {size} needs an L1 table over 32 MiB")
        if need > len(self.l1):
            self._replace_l1(self.l1 + [0] * (need - len(self.l1)))
        self._write_header_field(24, ">Q", size)
        self.h.size = self.size = size
        self._dx_changed()

    def _replace_l1(self, entries: list[int]) -> None:
        cs = self.cluster_size
        n = -(-len(entries) * 8 // cs) or 1
        new = self.alloc_clusters(n)
        data = struct.pack(f">{len(entries)}Q", *entries)
        pwrite_full(self.mfd, data + bytes(n * cs - len(data)), new)
        os.fdatasync(self.mfd)
        old_off, old_n = self.h.l1_offset, -(-self.h.l1_size * 8 // cs)
        self._write_header_field(36, ">IQ", len(entries), new)
        self.h.l1_offset, self.h.l1_size = new, len(entries)
        self.l1 = list(entries)
        self._dx_changed()
        if old_off:
            for k in range(old_n):
                self._unref(old_off // cs + k)

    # -- snapshots ---------------------------------------------------------------------

    def _tree_refs(self, l1: list[int], delta: int) -> None:
        """Add ``delta`` to the refcount of every L2 table and data cluster of an L1."""
        cs, cb = self.cluster_size, self.cluster_bits
        for i, l1e in enumerate(l1):
            off = l1e & OFFSET_MASK
            if not off:
                continue
            table = self._load_l2(off)
            for j in range(0, len(table), self.entry_words):
                e = table[j]
                if e & COMPRESSED:
                    coff, clen = self._compressed_span(e)
                    for c in range(coff >> cb, (coff + clen - 1 >> cb) + 1):
                        self._set_refcount(c, self.refcount(c) + delta)
                elif e & OFFSET_MASK and self.data_fd < 0:
                    c = (e & OFFSET_MASK) >> cb
                    self._set_refcount(c, self.refcount(c) + delta)
            self._set_refcount(off // cs, self.refcount(off // cs) + delta)

    def _fix_copied(self) -> None:
        """Recompute the COPIED flags of the active tree from the refcounts."""
        cs, cb = self.cluster_size, self.cluster_bits
        self._dx_changed()
        for i, l1e in enumerate(self.l1):
            off = l1e & OFFSET_MASK
            if not off:
                continue
            one = self.refcount(off // cs) == 1
            want = off | (COPIED if one else 0)
            if want != l1e:
                self._set_l1(i, want)
            table = self._load_l2(off)
            changed = False
            for j in range(0, len(table), self.entry_words):
                e = table[j]
                if e & COMPRESSED or not e & OFFSET_MASK:
                    continue
                w = e | COPIED if (self.data_fd >= 0 or
                                   self.refcount((e & OFFSET_MASK) >> cb) == 1) else e & ~COPIED
                if w != e:
                    table[j] = w
                    changed = True
            if changed:
                pwrite_full(self.mfd, struct.pack(f">{len(table)}Q", *table), off)

    def _write_snapshot_table(self, snaps: list[Snapshot]) -> None:
        cs = self.cluster_size
        data = b"".join(s.pack() for s in snaps)
        new = 0
        if snaps:
            n = -(-len(data) // cs)
            new = self.alloc_clusters(n)
            pwrite_full(self.mfd, data + bytes(n * cs - len(data)), new)
            os.fdatasync(self.mfd)
        old_off, old_len = self.h.snapshots_offset, self._snap_len
        self._write_header_field(60, ">IQ", len(snaps), new)
        self.h.nb_snapshots, self.h.snapshots_offset = len(snaps), new
        self._snap_len = len(data)
        if old_off and old_len:
            for k in range(-(-old_len // cs)):
                self._unref(old_off // cs + k)
        self.snapshots = snaps

    def find_snapshot(self, name: str) -> Snapshot:
        for s in self.snapshots:
            if s.id == name or s.name == name:
                return s
        raise BlockError(self.path, f"snapshot {name!r} not found")

    def _read_l1(self, s: Snapshot) -> list[int]:
        self._check_table(s.l1_offset, s.l1_size * 8, f"snapshot {s.name!r} L1 table")
        return list(struct.unpack(f">{s.l1_size}Q", self._read_meta(s.l1_offset, s.l1_size * 8)))

    def snapshot_create(self, name: str) -> None:
        if self.data_fd >= 0:
            raise BlockError(self.path, "internal snapshots are not possible with an external "
                             "data file")
        if any(s.name == name for s in self.snapshots):
            raise BlockError(self.path, f"a snapshot named {name!r} already exists")
        cs = self.cluster_size
        # every cluster becomes shared: no in-place write may land in one from now on
        self._unmapping(0, self.size, writes_only=True)
        self._tree_refs(self.l1, +1)
        self._fix_copied()
        n = -(-len(self.l1) * 8 // cs) or 1
        l1_off = self.alloc_clusters(n)
        data = struct.pack(f">{len(self.l1)}Q", *[e & ~COPIED for e in self.l1])
        pwrite_full(self.mfd, data + bytes(n * cs - len(data)), l1_off)
        s = Snapshot()
        ids = [int(x.id) for x in self.snapshots if x.id.isdigit()]
        s.id = str(max(ids, default=0) + 1)
        s.name = name
        now = time.time_ns()
        s.date_sec, s.date_nsec = now // 10**9, now % 10**9
        s.vm_clock_nsec = 0
        s.vm_state_size = 0
        s.disk_size = self.size
        s.icount = None
        s.extra = bytes(16) if self.h.version < 3 else bytes(24)
        if len(s.extra) >= 24:
            s.extra = s.extra[:16] + struct.pack(">Q", (1 << 64) - 1)
        s.l1_offset, s.l1_size = l1_off, len(self.l1)
        self._write_snapshot_table(self.snapshots + [s])
        os.fdatasync(self.mfd)

    def snapshot_apply(self, name: str) -> None:
        s = self.find_snapshot(name)
        l1 = self._read_l1(s)
        self._unmapping(0, max(self.size, s.disk_size))
        self._tree_refs(l1, +1)
        old = list(self.l1)
        if len(l1) != len(self.l1):
            self._replace_l1(l1)
        else:
            self.l1 = list(l1)
            self._dx_changed()
            pwrite_full(self.mfd, struct.pack(f">{len(l1)}Q", *l1), self.h.l1_offset)
        if s.disk_size != self.size:
            self._write_header_field(24, ">Q", s.disk_size)
            self.h.size = self.size = s.disk_size
        self._tree_refs(old, -1)
        self._fix_copied()
        os.fdatasync(self.mfd)

    def snapshot_delete(self, name: str) -> None:
        s = self.find_snapshot(name)
        l1 = self._read_l1(s)
        self._write_snapshot_table([x for x in self.snapshots if x is not s])
        self._tree_refs(l1, -1)
        cs = self.cluster_size
        for k in range(-(-s.l1_size * 8 // cs)):
            self._unref(s.l1_offset // cs + k)
        self._fix_copied()
        os.fdatasync(self.mfd)

    # -- check and repair --------------------------------------------------------------

    def check(self, repair: str | None = None) -> dict:
        """Count references to every host cluster from the metadata and compare
        them with the refcounts. repair: None, 'leaks' or 'all'."""
        cs, cb = self.cluster_size, self.cluster_bits
        h = self.h
        nclusters = -(-self.eof // cs)
        want = collections.Counter()
        errors = []
        stats = collections.Counter()

        def ref(off: int, n: int, what: str) -> bool:
            if off % cs:
                errors.append(f"{what} at {off:#x} is not cluster-aligned")
                return False
            if off + n * cs > nclusters * cs:
                errors.append(f"{what} at {off:#x} is past the end of the file")
                return False
            for k in range(n):
                want[off // cs + k] += 1
            return True

        ref(0, 1, "header")
        ref(h.rt_offset, h.rt_clusters, "refcount table")
        for ti, boff in enumerate(self.reftable):
            boff &= REFT_MASK
            if boff:
                ref(boff, 1, f"refcount block {ti}")
        ref(h.l1_offset, -(-h.l1_size * 8 // cs) or 0, "L1 table")
        if self.snapshots:
            ref(h.snapshots_offset, -(-self._snap_len // cs), "snapshot table")
        trees = [self.l1]
        for s in self.snapshots:
            if ref(s.l1_offset, -(-s.l1_size * 8 // cs), f"snapshot {s.name!r} L1 table"):
                trees.append(self._read_l1(s))
        seen_l2 = set()
        for tree_no, l1 in enumerate(trees):
            for l1e in l1:
                off = l1e & OFFSET_MASK
                if not off:
                    continue
                if not ref(off, 1, "L2 table"):
                    continue
                if tree_no == 0 and l1e & COPIED and self.refcount(off // cs) != 1:
                    errors.append(f"L2 table at {off:#x} has COPIED set but refcount "
                                  f"{self.refcount(off // cs)}")
                try:
                    table = self._load_l2(off)
                except BlockError as e:
                    errors.append(str(e))
                    continue
                first_visit = off not in seen_l2
                seen_l2.add(off)
                for j in range(0, len(table), self.entry_words):
                    e = table[j]
                    if not e:
                        continue
                    if e & COMPRESSED:
                        if first_visit and tree_no == 0:
                            stats["compressed"] += 1
                            stats["allocated"] += 1
                        coff, clen = self._compressed_span(e)
                        for c in range(coff >> cb, (coff + clen - 1 >> cb) + 1):
                            if c >= nclusters:
                                errors.append(f"compressed cluster at {coff:#x} is past the end")
                                break
                            want[c] += 1
                        continue
                    host = e & OFFSET_MASK
                    if tree_no == 0 and first_visit and (host or e & COPIED) and \
                            not (e & ZERO and not self.extl2):
                        stats["allocated"] += 1
                    if host and self.data_fd < 0:
                        ref(host, 1, "data cluster")
        if h.bitmaps_ext is not None and len(h.bitmaps_ext) >= 24:
            nb, _, dsize, doff = struct.unpack(">IIQQ", h.bitmaps_ext[:24])
            if dsize <= (1 << 20) and ref(doff, -(-dsize // cs), "bitmap directory"):
                d = os.pread(self.mfd, dsize, doff)
                pos = 0
                for _ in range(min(nb, 65535)):
                    if pos + 24 > len(d):
                        break
                    toff, tsize, _, _, _, nsize, esize = struct.unpack_from(">QIIBBHI", d, pos)
                    if tsize * 8 <= MAX_L1_BYTES and ref(toff, -(-tsize * 8 // cs), "bitmap table"):
                        for be in struct.unpack(f">{tsize}Q", os.pread(self.mfd, tsize * 8, toff)):
                            if be & OFFSET_MASK:
                                ref(be & OFFSET_MASK, 1, "bitmap data")
                    pos += 24 + esize + nsize
                    pos += -pos % 8
        # compare
        leaks, corruptions = [], []
        top = max([nclusters] + [c + 1 for c in want])
        bad_blocks = set()
        for ti, boff in enumerate(self.reftable):
            boff &= REFT_MASK
            if boff and (boff % cs or boff + cs > self.eof):
                bad_blocks.add(ti)
                errors.append(f"refcount block {ti} at {boff:#x} is misaligned or past the end")
        for c in range(top):
            ti = c // self.rb_entries
            if ti in bad_blocks:
                if repair == "all" and not self.read_only:
                    self.reftable[ti] = 0
                    os.pwrite(self.mfd, bytes(8), h.rt_offset + ti * 8)
                    bad_blocks.discard(ti)
                have = 0
            else:
                have = self.refcount(c)
            w = want.get(c, 0)
            if have > w:
                leaks.append((c, w))
            elif have < w:
                corruptions.append((c, w))
        for c, w in want.items():
            if w > self.rc_max:
                errors.append(f"cluster {c} has {w} references; refcounts overflow")
        result = {"leaks": len(leaks), "corruptions": len(corruptions) + len(errors),
                  "errors": errors, "total_clusters": -(-self.size // cs),
                  "allocated_clusters": stats["allocated"], "compressed_clusters":
                  stats["compressed"], "image_end_offset": self.eof,
                  "leaks_fixed": 0, "corruptions_fixed": 0}
        if repair and not self.read_only:
            self._claimed |= set(want)
            try:
                if repair == "all":
                    for c, w in corruptions:
                        self._set_refcount(c, min(w, self.rc_max))
                    result["corruptions_fixed"] = len(corruptions)
                for c, w in leaks:
                    self._set_refcount(c, w)
                result["leaks_fixed"] = len(leaks)
            finally:
                self._claimed.clear()
            self._free_hint = 1
            self.flush_metadata()
            os.fdatasync(self.mfd)
        return result

    # -- info --------------------------------------------------------------------------

    def info(self) -> dict:
        h = self.h
        d = {"compat": "1.1" if h.version >= 3 else "0.10"}
        if h.version >= 3:
            d.update({"compression-type": "zstd" if h.compression_type == 1 else "zlib",
                      "lazy-refcounts": bool(h.compat & COMPAT_LAZY),
                      "refcount-bits": 1 << h.refcount_order,
                      "corrupt": bool(h.incompat & INCOMPAT_CORRUPT),
                      "extended-l2": self.extl2})
            if self.data_path:
                d["data-file"] = h.data_file
                d["data-file-raw"] = self.data_raw
        else:
            d.update({"compression-type": "zlib", "refcount-bits": 16})
        return d

    # -- create ------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, cluster_size: int = 65536, compat: str = "1.1",
               backing_file: str | None = None, backing_fmt: str | None = None,
               lazy_refcounts: bool = False, extended_l2: bool = False, refcount_bits: int = 16,
               compression_type: str = "zlib", preallocation: str = "off",
               data_file: str | None = None, data_file_raw: bool = False) -> None:
        if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
            raise BlockError(path, f"cluster size {cluster_size} must be a power of two "
                             f"between 512 and 2M")
        if compat not in ("0.10", "1.1", "v2", "v3"):
            raise BlockError(path, f"invalid compat {compat!r} (0.10 or 1.1)")
        v3 = compat in ("1.1", "v3")
        if refcount_bits not in (1, 2, 4, 8, 16, 32, 64) or (not v3 and refcount_bits != 16):
            raise BlockError(path, f"refcount_bits {refcount_bits}: must be a power of two up "
                             f"to 64 (and 16 for compat=0.10)")
        if not v3 and (lazy_refcounts or extended_l2 or data_file or compression_type != "zlib"):
            raise BlockError(path, "lazy_refcounts, extended_l2, data_file and zstd need "
                             "compat=1.1")
        if extended_l2 and cluster_size < 16384:
            raise BlockError(path, "extended_l2 needs a cluster size of at least 16k")
        if compression_type not in COMPRESSION_TYPES:
            raise BlockError(path, f"unknown compression type {compression_type!r} (zlib, zstd)")
        if data_file_raw and not data_file:
            raise BlockError(path, "data_file_raw needs data_file")
        if data_file_raw and backing_file:
            raise BlockError(path, "data_file_raw cannot be combined with a backing file")
        if preallocation not in ("off", "metadata", "falloc", "full"):
            raise BlockError(path, f"unknown preallocation mode {preallocation!r}")
        cb = cluster_size.bit_length() - 1
        l2e = cluster_size // (16 if extended_l2 else 8)
        l1_size = -(-size // (cluster_size * l2e))
        if l1_size * 8 > MAX_L1_BYTES:
            raise BlockError(path, f"size {size} is too large for cluster size {cluster_size}")
        h = Header()
        h.version = 3 if v3 else 2
        h.cluster_bits = cb
        h.size = size
        h.refcount_order = refcount_bits.bit_length() - 1
        h.compat = COMPAT_LAZY if lazy_refcounts else 0
        h.incompat = (INCOMPAT_EXTL2 if extended_l2 else 0) | \
            (INCOMPAT_DATA_FILE if data_file else 0)
        h.compression_type = COMPRESSION_TYPES[compression_type]
        if h.compression_type:
            h.incompat |= INCOMPAT_COMPRESSION
        h.autoclear = AUTOCLEAR_DATA_RAW if data_file_raw else 0
        h.header_length = 112 if v3 else 72
        h.backing_file = backing_file
        h.backing_fmt = backing_fmt
        h.data_file = data_file
        l1_clusters = max(1, -(-l1_size * 8 // cluster_size))
        h.rt_offset = cluster_size
        h.rt_clusters = 1
        h.l1_offset = 3 * cluster_size
        h.l1_size = l1_size
        header = h.pack(cluster_size)
        used = 3 + l1_clusters
        rb_entries = cluster_size * 8 // refcount_bits
        if used > rb_entries:
            raise BlockError(path, f"size {size} needs more metadata than one refcount block "
                             f"of refcount_bits={refcount_bits} covers")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise BlockError(path, "cannot create", e.errno) from None
        try:
            blk = bytearray(cluster_size)
            for c in range(used):
                rc_set(blk, c, h.refcount_order, 1)
            pwrite_full(fd, header + bytes(cluster_size - len(header)), 0)
            pwrite_full(fd, struct.pack(">Q", 2 * cluster_size) + bytes(cluster_size - 8),
                        cluster_size)
            pwrite_full(fd, blk, 2 * cluster_size)
            pwrite_full(fd, bytes(l1_clusters * cluster_size), 3 * cluster_size)
        finally:
            os.close(fd)
        if data_file:
            dpath = data_file if os.path.isabs(data_file) else \
                os.path.join(os.path.dirname(os.path.abspath(path)), data_file)
            try:
                dfd = os.open(dpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                os.ftruncate(dfd, size)
                os.close(dfd)
            except OSError as e:
                raise BlockError(dpath, "cannot create the data file", e.errno) from None
        if preallocation != "off":
            d = cls(path, open_backing=False)
            try:
                d._preallocate(preallocation)
            finally:
                d.close()

    def _preallocate(self, mode: str) -> None:
        cs, cb = self.cluster_size, self.cluster_bits
        nclusters = -(-self.size // cs)
        ci = 0
        while ci < nclusters:
            # allocate a run of data clusters at once, contiguous in the file
            run = min(nclusters - ci, self.l2_entries - (ci & (self.l2_entries - 1)))
            self._l2_writable(ci)
            host = (ci << cb) if self.data_fd >= 0 else self.alloc_clusters(run)
            if self.data_fd < 0:
                preallocate(self.mfd, host, run * cs, mode, self.path)
            for k in range(run):
                if self.extl2:
                    self._set_l2(ci + k, (host + k * cs) | COPIED, 0xFFFFFFFF)
                else:
                    self._set_l2(ci + k, (host + k * cs) | COPIED)
            ci += run
        if self.data_fd >= 0:
            preallocate(self.data_fd, 0, self.size, mode, self.data_path)
        else:
            os.ftruncate(self.mfd, max(self.eof, os.fstat(self.mfd).st_size))

    def write_compressed(self, ci: int, data: bytes) -> bool:
        """Store one whole guest cluster compressed (pykvm img convert -c);
        False if it does not compress (the caller writes it normally)."""
        cs, cb = self.cluster_size, self.cluster_bits
        if self.h.compression_type == 0:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            comp = c.compress(data) + c.flush()
        else:
            zstandard = _zstd()
            if zstandard is None:
                raise BlockError(self.path, "zstd compression needs the 'zstandard' module")
            comp = zstandard.ZstdCompressor().compress(data)
        if len(comp) >= cs - 512 or self.data_fd >= 0:
            return False
        self._mark_dirty()
        cur = getattr(self, "_ccur", 0)
        if cur and cur + len(comp) <= (cur | (cs - 1)) + 1:
            # pack it behind the previous one, in the same host cluster
            self._set_refcount(cur >> cb, self.refcount(cur >> cb) + 1)
        else:
            cur = self.alloc_clusters(1)
        end = cur + len(comp)
        pwrite_full(self.mfd, comp, cur)
        self._grew(end)
        nsect = (((end - 1) >> 9) - (cur >> 9))
        x = self.compressed_bits
        entry = COMPRESSED | (nsect << x) | cur
        l2, idx = self._l2_writable(ci)
        old = l2[idx]
        self._unmapping(ci << cb, cs)
        self._set_l2(ci, entry, 0)
        if old:
            self._release_entry(old)
        self._ccur = end if end % cs else 0
        return True

    # -- close -------------------------------------------------------------------------

    def close(self) -> None:
        if self.mfd < 0:
            return
        try:
            if not self.read_only:
                self.flush_metadata()
                if self._grown_to > max(self.eof, self._size_at_open):
                    os.ftruncate(self.mfd, max(self.eof, self._size_at_open))  # _grow_file
                if self._marked_dirty and self.lazy:
                    os.fdatasync(self.mfd)
                    self._set_incompat(self.h.incompat & ~INCOMPAT_DIRTY)
                    os.fdatasync(self.mfd)
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        closed = set()
        for name in ("fd", "data_fd", "bfd", "mfd"):
            fd = getattr(self, name, -1)
            if fd >= 0 and fd not in closed:
                closed.add(fd)
                try:
                    os.close(fd)
                except OSError:
                    pass
            setattr(self, name, -1)


def _bit_runs(bitmap: int, unit: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of set bits of a 32-bit subcluster bitmap."""
    out = []
    s = 0
    while s < 32:
        if bitmap >> s & 1:
            t = s
            while t < 32 and bitmap >> t & 1:
                t += 1
            out.append((s * unit, (t - s) * unit))
            s = t
        else:
            s += 1
    return out


def _append(out: list, kind: str, offset: int, n: int, fd: int, host: int) -> None:
    """Append an extent, merging with the previous one when contiguous."""
    if out:
        p = out[-1]
        if p.kind == kind and p.offset + p.length == offset and \
                (kind != "data" or (p.fd == fd and p.host_offset + p.length == host)):
            p.length += n
            return
    out.append(Extent(kind, offset, n, fd, host))

