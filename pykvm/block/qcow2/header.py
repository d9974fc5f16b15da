"""qcow2 header: the "Header" section of docs/interop/qcow2.txt (version 2
fields, version 3 additional fields, header extensions, the feature name
table) plus the format's constants (feature bits, L1/L2 and refcount table
entry masks, QEMU's size limits)."""
from __future__ import annotations

import struct
import sys
from array import array

from ..driver import BlockError

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

# Limits on what an image may ask for (README.md, "Limits"): past one, the image is
# refused in one line before anything of that size is read or allocated.
MAX_L1_BYTES = 32 << 20         # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20    # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536           # QEMU's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_TABLE = 64 << 20   # QEMU's QCOW_MAX_SNAPSHOTS_SIZE (1 KiB a snapshot)
MAX_SNAPSHOT_EXTRA = 1024       # QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_HEADER_EXTENSIONS = 1024    # QEMU: none (the first cluster bounds them)
MAX_BACKING_NAME = 1023         # QEMU's, in qcow2_do_open
MAX_BACKING_FMT = 15            # QEMU's (BlockDriverState.backing_format[16])
L2_CACHE_DEFAULT_MAX = 32 << 20  # QEMU's DEFAULT_L2_CACHE_MAX_SIZE (Linux)
MAX_BITMAPS = 65535             # QEMU's QCOW2_MAX_BITMAPS (bitmaps are kept, counted by check)
MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS   # QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE
MAX_CHECK_ERRORS = 1000         # messages check() keeps (it counts them all)
FEATURE_NAMES = [(0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
                 (0, 3, "compression type"), (0, 4, "extended L2 entries"),
                 (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data")]
COMPRESSION_TYPES = {"zlib": 0, "zstd": 1}


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
        # they end before the backing file name, or with the first cluster (QEMU's rule)
        pos = h.header_length
        ext_end = min(cs, len(buf), bf_off) if bf_off > pos else min(cs, len(buf))
        end_of_exts = None
        count = 0
        while pos + 8 <= ext_end:
            etype, elen = struct.unpack_from(">II", buf, pos)
            if etype == EXT_END:
                end_of_exts = pos
                break
            if pos + 8 + elen > ext_end:
                raise BlockError(path, f"header extension {etype:#x} too large: runs past the "
                                 f"header area ({ext_end} bytes)")
            count += 1
            if count > MAX_HEADER_EXTENSIONS:
                raise BlockError(path, f"more than {MAX_HEADER_EXTENSIONS} header extensions")
            if etype == EXT_BACKING_FMT and elen > MAX_BACKING_FMT:
                raise BlockError(path, f"backing format name too long ({elen} bytes, at most "
                                 f"{MAX_BACKING_FMT})")
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
            if bf_size > MAX_BACKING_NAME:
                raise BlockError(path, f"backing file name too long ({bf_size} bytes, at most "
                                 f"{MAX_BACKING_NAME})")
            if bf_off + bf_size > min(cs, file_size):
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


def be64_table(data) -> array:
    """A table of big-endian u64 entries (an L1 table) as an array('Q'): 8 bytes
    an entry, where a list of ints costs 40 (4M entries: 32 MiB, not 160)."""
    a = array("Q")
    a.frombytes(data)
    if sys.byteorder == "little":
        a.byteswap()
    return a


def be64_bytes(table) -> bytes:
    """The entries of ``table`` (an array('Q') or a list) big-endian, as on disk."""
    a = array("Q", table)
    if sys.byteorder == "little":
        a.byteswap()
    return a.tobytes()
