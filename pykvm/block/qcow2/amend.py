"""qcow2 header changes in place (``qemu-img amend``): the version (compat
0.10 <-> 1.1), lazy refcounts, the refcount width, the data file's name.

Every refusal is found before the first write. The changes that move
metadata are crash-safe in the order of the rest of the driver:

- a new refcount width: new refcount blocks and table are allocated through
  the old refcounts (a crash leaves leaks), written and flushed; one write
  of the header's first sector switches to them (rt_offset, rt_clusters and
  refcount_order lie there together); the old blocks and table are freed
  through the new refcounts after;
- a downgrade to version 2, which has no zero clusters: each zero cluster of
  the active image and of every snapshot becomes a cluster of zeroes (a new
  cluster is allocated, zeroed and flushed before its L2 entry points at it;
  over no backing file the entry simply becomes unallocated), then the
  header says version 2.
"""
from __future__ import annotations

import struct

from ..driver import BlockError, fd_datasync, pwrite_full
from .header import (AUTOCLEAR_DATA_RAW, COMPAT_LAZY, COMPRESSED, COPIED, INCOMPAT_COMPRESSION,
                     INCOMPAT_DIRTY, OFFSET_MASK, REFT_MASK, ZERO, be64_bytes, be64_table)
from .refcount import rc_set

CREATE_ONLY = ("cluster_size", "preallocation", "extended_l2", "compression_type", "encryption",
               "encrypt.format", "cluster-size")
AMENDABLE = ("compat", "backing_file", "backing_fmt", "lazy_refcounts", "refcount_bits", "size",
             "data_file", "data_file_raw")


class Amend:
    """amend() and the two rewrites it may need."""

    def amend(self, opts: dict, progress=None) -> None:
        """Apply ``-o`` options (already typed: compat a string, refcount_bits
        an int, lazy_refcounts a bool, size an int). ``progress(done, total)``
        is called as the rewrites go."""
        h = self.h
        for key in opts:
            if key in CREATE_ONLY:
                raise BlockError(self.path, f"invalid parameter {key!r}: it can only be set "
                                 f"when the image is created")
            if key not in AMENDABLE:
                raise BlockError(self.path, f"invalid parameter {key!r}")
        compat = opts.get("compat")
        if compat is not None and compat not in ("0.10", "v2", "1.1", "v3"):
            raise BlockError(self.path, f"unknown compatibility level {compat} (0.10 or 1.1)")
        version = h.version if compat is None else 2 if compat in ("0.10", "v2") else 3
        bits = opts.get("refcount_bits", 1 << self.rc_order)
        if bits not in (1, 2, 4, 8, 16, 32, 64):
            raise BlockError(self.path, f"refcount width {bits} must be a power of two up to 64")
        lazy = opts.get("lazy_refcounts", self.lazy)
        if "backing_file" in opts or "backing_fmt" in opts:
            if (opts.get("backing_file") or None, opts.get("backing_fmt") or None) != \
                    (h.backing_file, h.backing_fmt if h.backing_file else None):
                raise BlockError(self.path, "cannot amend the backing file (pykvm img rebase "
                                 "changes it)")
        if "data_file" in opts:
            if self.data_fd < 0:
                raise BlockError(self.path, "data_file can only be set for images that use an "
                                 "external data file")
            if not opts["data_file"]:
                raise BlockError(self.path, "data_file cannot be emptied (the image needs it)")
        if opts.get("data_file_raw"):
            raise BlockError(self.path, "data_file_raw cannot be set on existing images")
        if lazy and not self.lazy and version < 3:     # (a downgrade drops them)
            raise BlockError(self.path, "lazy refcounts need compat=1.1")
        if version < 3 and bits != 16:
            if "refcount_bits" in opts:
                raise BlockError(self.path, "refcount widths other than 16 bits need compat=1.1")
        # what a downgrade refuses, before anything is written
        if version < h.version:
            if bits != 16:
                raise BlockError(self.path, "compat=0.10 requires refcount_bits=16")
            if self.data_fd >= 0:
                raise BlockError(self.path, "cannot downgrade an image with a data file")
            if any(s.vm_state_size > 0xFFFFFFFF or s.disk_size != h.size
                   for s in self.snapshots):
                raise BlockError(self.path, "internal snapshots prevent downgrade of the image "
                                 "(one has another size or more than 4 GiB of VM state)")
            other = h.incompat & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION)
            if other:
                raise BlockError(self.path, f"cannot downgrade an image with incompatible "
                                 f"features {other:#x} set")
            if h.incompat & INCOMPAT_COMPRESSION and self._has_compressed():
                raise BlockError(self.path, "cannot downgrade an image with zstd compression "
                                 "type and existing compressed clusters")
        new_rc = None
        if bits != 1 << self.rc_order:
            new_rc = self._refcounts_for(bits)      # (refuses a refcount that does not fit)
        size = opts.get("size")
        if size is not None and size != self.size:
            if size < self.size:
                raise BlockError(self.path, "shrinking a qcow2 image is not supported")
            if self.snapshots:
                raise BlockError(self.path, "cannot resize an image that has snapshots")
        # -- the changes, in qemu-img's order: upgrade first, downgrade last
        if version > h.version:
            self._upgrade()
        if lazy != self.lazy:
            self.flush_metadata()
            fd_datasync(self.mfd)
            if self._marked_dirty:
                self._set_incompat(h.incompat & ~INCOMPAT_DIRTY)
                self._marked_dirty = False
            self.lazy = lazy
            h.compat = (h.compat | COMPAT_LAZY) if lazy else (h.compat & ~COMPAT_LAZY)
            self._write_header_field(80, ">Q", h.compat)
        if new_rc is not None:
            self._change_refcount_order(bits, new_rc, progress)
        if "data_file_raw" in opts and h.autoclear & AUTOCLEAR_DATA_RAW:
            h.autoclear &= ~AUTOCLEAR_DATA_RAW
            self.data_raw = False
            self._write_header_field(88, ">Q", h.autoclear)
        if "data_file" in opts and opts["data_file"] != h.data_file:
            h.data_file = opts["data_file"]
            self.rewrite_header()
        if size is not None and size != self.size:
            self.resize(size)
        if version < h.version:
            self._downgrade(progress)

    # -- version ---------------------------------------------------------------------

    def _upgrade(self) -> None:
        """Version 2 -> 3: the v3 fields (no features) and snapshot entries
        with the 16 bytes of extra data v3 requires."""
        h = self.h
        h.version, h.header_length = 3, 112
        h.incompat &= INCOMPAT_DIRTY
        h.compat = h.autoclear = 0
        h.refcount_order = self.rc_order
        h.compression_type, h.extra = 0, b""
        data = h.pack(self.cluster_size)            # (refuses a header too big for cluster 0)
        if any(len(s.extra) < 16 for s in self.snapshots):
            self._write_snapshot_table(self.snapshots)
            data = h.pack(self.cluster_size)
        pwrite_full(self.mfd, data + bytes(self.cluster_size - len(data)), 0)
        fd_datasync(self.mfd)

    def _downgrade(self, progress) -> None:
        h = self.h
        self.flush_metadata()
        if h.incompat & INCOMPAT_DIRTY:
            fd_datasync(self.mfd)
            self._set_incompat(h.incompat & ~INCOMPAT_DIRTY)
            self._marked_dirty = False
        self.lazy = False
        self._expand_zero_clusters(progress)
        fd_datasync(self.mfd)
        h.version, h.header_length = 2, 72
        h.incompat = h.compat = h.autoclear = 0
        h.compression_type, h.extra = 0, b""
        h.feature_table = None
        self.data_raw = False
        self.rewrite_header()
        fd_datasync(self.mfd)

    def _has_compressed(self) -> bool:
        for l1 in [self.l1] + [self._read_l1(s) for s in self.snapshots]:
            for l2off in {e & OFFSET_MASK for e in l1 if e & OFFSET_MASK}:
                for e in be64_table(self._read_meta(l2off, self.cluster_size)):
                    if e & COMPRESSED:
                        return True
        return False

    def _expand_zero_clusters(self, progress) -> None:
        """Every zero entry of every L2 table (active and snapshots) becomes
        a plain cluster of zeroes, or unallocated where no backing file shows
        through. A zero entry that keeps a host cluster has that cluster
        zeroed in place when every reference to it is a zero entry;
        otherwise (another table reads data there) it gets a new cluster, and
        the old one's refcount is lowered once every table is rewritten. Each
        L2 table is rewritten once, in one write, after the clusters it will
        point at hold their zeroes on disk."""
        cs = self.cluster_size
        tables = {}                                   # L2 offset -> its refcount
        for l1 in [self.l1] + [self._read_l1(s) for s in self.snapshots]:
            for e in l1:
                off = e & OFFSET_MASK
                if off:
                    tables[off] = self.refcount(off // cs)
        zero_refs: dict[int, int] = {}                # host -> references by zero entries
        for l2off, l2rc in tables.items():
            for e in be64_table(self._read_meta(l2off, cs)):
                if e & ZERO and not e & COMPRESSED and e & OFFSET_MASK:
                    zero_refs[e & OFFSET_MASK] = zero_refs.get(e & OFFSET_MASK, 0) + l2rc
        in_place = {host for host, n in zero_refs.items() if self.refcount(host // cs) == n}
        has_backing = bool(self.h.backing_file)
        zero = bytes(cs)
        zeroed, release = set(), []
        for k, (l2off, l2rc) in enumerate(sorted(tables.items())):
            entries = be64_table(self._read_meta(l2off, cs))
            changed = False
            for i, e in enumerate(entries):
                if e & COMPRESSED or not e & ZERO:
                    continue
                host = e & OFFSET_MASK
                if host in in_place:
                    if host not in zeroed:
                        pwrite_full(self.mfd, zero, host)
                        zeroed.add(host)
                    entries[i] = host | (COPIED if self.refcount(host // cs) == 1 else 0)
                else:
                    if host:
                        release.append((host, l2rc))
                    if not has_backing:
                        entries[i] = 0
                    else:
                        new = self.alloc_clusters(1)
                        if l2rc > 1:                  # every sharer of this table points here
                            self._set_refcount(new // cs, l2rc)
                        pwrite_full(self.mfd, zero, new)
                        entries[i] = new | (COPIED if l2rc == 1 else 0)
                changed = True
            if changed:
                fd_datasync(self.mfd)
                self._meta_write("l2_update", be64_bytes(entries), l2off)
            if progress:
                progress(k + 1, len(tables))
        self._l2.clear()
        self._dx_changed()
        if release:
            fd_datasync(self.mfd)
            for host, n in release:
                self._set_refcount(host // cs, self.refcount(host // cs) - n)
            self._fix_copied()          # (a cluster the active image now holds alone)

    # -- refcount width -----------------------------------------------------------------

    def _refcounts_for(self, bits: int) -> list[int]:
        """Every host cluster's refcount, checked against the new width."""
        cs = self.cluster_size
        n = max(-(-self.eof // cs), 1)
        top = (1 << bits) - 1
        counts = [self.refcount(ci) for ci in range(n)]
        for ci, rc in enumerate(counts):
            if rc > top:
                raise BlockError(self.path, f"cannot decrease the refcount width to {bits} "
                                 f"bits: the cluster at {ci * cs:#x} has a refcount of {rc}")
        return counts

    def _change_refcount_order(self, bits: int, counts: list[int], progress) -> None:
        cs = self.cluster_size
        order = bits.bit_length() - 1
        epb = cs * 8 >> order
        blocks: list[int] = []                  # host offsets of the new refcount blocks
        table_off, table_n = 0, 0
        while True:
            # the highest cluster in use, the new ones included
            top = len(counts)
            while top > 0 and counts[top - 1] == 0:
                top -= 1
            need_blocks = max(1, -(-top // epb))
            need_table = max(1, -(-need_blocks * 8 // cs))
            if len(blocks) >= need_blocks and table_n >= need_table:
                break
            while len(blocks) < need_blocks:
                blocks.append(self.alloc_clusters(1))
            if table_n < need_table:
                if table_n:
                    for k in range(table_n):
                        self._unref(table_off // cs + k)
                table_off, table_n = self.alloc_clusters(need_table), need_table
            n = max(-(-self.eof // cs), len(counts))
            counts = [self.refcount(ci) for ci in range(n)]
        top = (1 << bits) - 1
        for ci, rc in enumerate(counts):
            if rc > top:
                raise BlockError(self.path, f"cannot decrease the refcount width to {bits} "
                                 f"bits: the cluster at {ci * cs:#x} has a refcount of {rc}")
        # the old refcounts (now counting the new clusters too) are on disk
        self.flush_metadata()
        fd_datasync(self.mfd)
        table = [0] * (table_n * cs // 8)
        for k, boff in enumerate(blocks):
            blk = bytearray(cs)
            for i, rc in enumerate(counts[k * epb:(k + 1) * epb]):
                if rc:
                    rc_set(blk, i, order, rc)
            self._meta_write("refblock_alloc", blk, boff)
            table[k] = boff
            if progress:
                progress(k + 1, len(blocks) + 1)
        self._meta_write("reftable_grow", struct.pack(f">{len(table)}Q", *table), table_off)
        fd_datasync(self.mfd)
        # the switch: one write inside the header's first sector
        h = self.h
        old = [b & REFT_MASK for b in self.reftable if b & REFT_MASK]
        old_table, old_n = h.rt_offset, h.rt_clusters
        h.rt_offset, h.rt_clusters, h.refcount_order = table_off, table_n, order
        self._meta_write("reftable_update", h.pack(cs)[:104], 0)
        fd_datasync(self.mfd)
        self.rc_order, self.rc_max, self.rb_entries = order, (1 << bits) - 1, epb
        self.reftable, self.rt_cap = table, len(table)
        self._rb.clear()
        self._rb_dirty.clear()
        self._free_hint = 1
        for boff in old:
            self._unref(boff // cs)
        for k in range(old_n):
            self._unref(old_table // cs + k)
        self.flush_metadata()
        fd_datasync(self.mfd)
        if progress:
            progress(1, 1)
