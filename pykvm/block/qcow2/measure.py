"""How big a qcow2 image gets (``qemu-img measure``'s numbers): the metadata
of a fully allocated image of a given virtual size, and the part of it an
image holding only some data clusters needs.

The arithmetic is pure (no file is opened): the caller says which guest
ranges hold data. Every host cluster is refcounted, the refcount blocks and
table included, so their number is the fixed point of "blocks enough for
everything, themselves too", as docs/interop/qcow2.txt's layout implies.
"""
from __future__ import annotations

import struct

from ..driver import BlockError
from .header import MAX_L1_BYTES

COMPATS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
PREALLOCATIONS = ("off", "metadata", "falloc", "full")


def refcount_metadata_size(clusters: int, cs: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table needed to count ``clusters`` host
    clusters plus the refcount clusters themselves."""
    per_block = cs * 8 >> refcount_order
    per_table_cluster = cs // 8
    blocks = table = 0
    n = -1
    while True:
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        last, n = n, clusters + blocks + table
        if n == last:
            return (blocks + table) * cs


def fully_allocated_size(size: int, cs: int, refcount_order: int, extended_l2: bool) -> int:
    """File size of an image whose every cluster is allocated: header
    cluster, L2 tables, L1 table, refcount structures, data."""
    l2e = 16 if extended_l2 else 8
    data = -(-size // cs) * cs
    meta = cs                                           # the header
    nl2e = data // cs
    nl2e = -(-nl2e // (cs // l2e)) * (cs // l2e)
    meta += nl2e * l2e                                  # the L2 tables
    nl1e = nl2e * l2e // cs
    nl1e = -(-nl1e // (cs // 8)) * (cs // 8)
    meta += nl1e * 8                                    # the L1 table
    meta += refcount_metadata_size((meta + data) // cs, cs, refcount_order)
    return meta + data


def check_options(opts: dict, name: str = "measure") -> tuple[int, int, int, bool, str]:
    """(cluster_size, version, refcount_order, extended_l2, preallocation) of
    ``-o`` options, checked as creating an image would check them."""
    extended_l2 = bool(opts.get("extended_l2", False))
    cs = opts.get("cluster_size", 65536)
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise BlockError(name, f"cluster size {cs} must be a power of two between 512 and 2M")
    if extended_l2 and cs < 16384:
        raise BlockError(name, "extended L2 entries need a cluster size of at least 16k")
    compat = opts.get("compat", "1.1")
    if compat not in COMPATS:
        raise BlockError(name, f"invalid compatibility level {compat!r} (0.10 or 1.1)")
    version = COMPATS[compat]
    bits = opts.get("refcount_bits", 16)
    if bits not in (1, 2, 4, 8, 16, 32, 64):
        raise BlockError(name, f"refcount_bits {bits}: must be a power of two up to 64")
    if version < 3 and bits != 16:
        raise BlockError(name, f"refcount_bits {bits} needs compat=1.1 (0.10 has 16 only)")
    prealloc = opts.get("preallocation", "off")
    if prealloc not in PREALLOCATIONS:
        raise BlockError(name, f"unknown preallocation mode {prealloc!r} "
                         f"({', '.join(PREALLOCATIONS)})")
    return cs, version, bits.bit_length() - 1, extended_l2, prealloc


def measure(opts: dict, size: int | None, src_size: int | None = None,
            data_runs=None, src_bitmaps: list[tuple[str, int]] | None = None) -> dict:
    """qemu-img measure for a qcow2 target: ``{"required", "fully-allocated"}``
    (and ``"bitmaps"`` when both the source and the target keep persistent
    bitmaps). Either ``size`` (no source) or the source's size and the
    (offset, length) runs of it that may hold data (zero and unallocated
    ranges left out); ``src_bitmaps``: (name, granularity) of the source's
    persistent bitmaps, or None when its format has none."""
    cs, version, order, extended_l2, prealloc = check_options(opts)
    virtual = -(-(size or 0) // cs) * cs
    l2e = 16 if extended_l2 else 8
    l2_tables = -(-(virtual // cs) // (cs // l2e))
    if l2_tables * 8 > MAX_L1_BYTES:
        raise BlockError("measure", "the image size is too large (try a larger cluster size)")
    required = 0
    if src_size is not None:
        virtual = -(-src_size // cs) * cs
        if opts.get("backing_file"):
            # what the new backing file shares with the source is unknown:
            # assume nothing
            required = virtual
        else:
            clusters = set()
            for start, length in data_runs:
                clusters.update(range(start // cs, -(-(start + length) // cs)))
            required = len(clusters) * cs
    if prealloc in ("falloc", "full"):
        required = virtual
    full = fully_allocated_size(virtual, cs, order, extended_l2)
    out = {"required": full - virtual + required, "fully-allocated": full}
    if version >= 3 and src_bitmaps is not None:
        out = {"bitmaps": bitmaps_size(src_bitmaps, src_size, cs), **out}
    return out


def bitmaps_size(bitmaps: list[tuple[str, int]], size: int, cs: int) -> int:
    """Bytes the persistent bitmaps (name, granularity) of a ``size``-byte
    disk take in a qcow2 image of ``cs``-byte clusters, all of it allocated:
    the data, each bitmap's table, and the directory."""
    total = directory = 0
    for name, granularity in bitmaps:
        nbytes = -(-(-(-size // granularity)) // 8)
        clusters = -(-nbytes // cs)
        total += clusters * cs + -(-clusters * 8 // cs) * cs
        directory += -(-(24 + len(name.encode())) // 8) * 8
    return total + -(-directory // cs) * cs


def read_bitmaps(drv) -> list[tuple[str, int]]:
    """(name, granularity) of each bitmap in an open qcow2 image's bitmap
    directory (none when the autoclear bit says the extension is stale).
    The directory is image-supplied: its size is bounded by the header
    checks, and each entry is bounds-checked here."""
    from ..driver import fd_pread
    from .header import AUTOCLEAR_BITMAPS, MAX_BITMAP_DIRECTORY, MAX_BITMAPS
    h = drv.h
    if h.bitmaps_ext is None or len(h.bitmaps_ext) < 24 or not h.autoclear & AUTOCLEAR_BITMAPS:
        return []
    nb, _, dsize, doff = struct.unpack(">IIQQ", h.bitmaps_ext[:24])
    if dsize > MAX_BITMAP_DIRECTORY or nb > MAX_BITMAPS:
        raise BlockError(drv.path, f"bitmap directory too large ({nb} bitmaps, {dsize} bytes)")
    buf = fd_pread(drv.mfd, dsize, doff)
    out = []
    pos = 0
    for _ in range(nb):
        if pos + 24 > len(buf):
            raise BlockError(drv.path, "bitmap directory entry past its end")
        _, _, _, _, gbits, nsize, extra = struct.unpack_from(">QIIBBHI", buf, pos)
        end = pos + 24 + extra + nsize
        if end > len(buf) or gbits > 63:
            raise BlockError(drv.path, "bitmap directory entry past its end")
        out.append((bytes(buf[pos + 24 + extra:end]).decode(errors="replace"), 1 << gbits))
        pos += -(-(24 + extra + nsize) // 8) * 8
    return out
