"""qcow2 refcounts: the "Host cluster management" section of
docs/interop/qcow2.txt (refcount table, refcount blocks with entries of
1..64 bits), allocation of host clusters and growth of the file and the
refcount table, and the dirty bit of lazy refcounts."""
from __future__ import annotations

import errno
import os
import struct

from ..driver import BlockError, fd_datasync, pwrite_full
from ..file import PUNCH, fallocate
from .header import INCOMPAT_DIRTY, MAX_REFTABLE_BYTES, REFT_MASK


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


class Refcounts:
    """Refcount blocks and table, allocation of host clusters, the dirty bit."""

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
        if value < rc_get(blk, bi, self.rc_order) and not self._unpointed:
            self._freeing()
        rc_set(blk, bi, self.rc_order, value)
        if self.lazy and self._marked_dirty:
            self._rb_dirty.add(boff)
        elif self._rc_batch is not None:
            lo, hi = rc_span(bi, self.rc_order)
            span = self._rc_batch.get(boff)
            self._rc_batch[boff] = (min(lo, span[0]), max(hi, span[1])) if span else (lo, hi)
        else:
            lo, hi = rc_span(bi, self.rc_order)
            self._meta_write("refblock_update", blk[lo:hi], boff + lo)
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
            self._meta_write("refblock_alloc", blk, f * cs)
            self._grew(f * cs + cs)
            self._rb[f * cs] = blk
            self.reftable[ti] = f * cs
            self._meta_write("reftable_update", struct.pack(">Q", f * cs),
                             self.h.rt_offset + ti * 8)
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
        fd_datasync(self.mfd)
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
        ``self._fresh`` says whether they lie past anything ever written (read as zeroes).

        With ``alloc_ahead_bytes`` (a guest's disk), clusters come from a run
        whose refcounts were raised together: one refcount write, and one sync
        before the first L2 entry that points into it (see _order), for a run
        of allocations instead of one each. After a crash the run's unused
        clusters are leaks (allowed); close() gives them back."""
        lo, hi, fresh = self._pool
        if hi - lo >= n:
            self._pool = (lo + n, hi, fresh)
            self._fresh = fresh
            return lo * self.cluster_size
        self._release_pool()
        # (not on a file of fixed size, an NBD export: the run might not fit)
        want = max(n, self.alloc_ahead_bytes // self.cluster_size) if self.file.growable else n
        off = self._alloc_run(want)
        ci = off // self.cluster_size
        self._pool = (ci + n, ci + want, self._fresh)
        return off

    def _release_pool(self) -> None:
        """Give back the clusters raised ahead and never used: no entry ever
        pointed at them, so no sync is needed first."""
        lo, hi, _ = self._pool
        self._pool = (0, 0, False)
        if lo >= hi:
            return
        self._unpointed = True
        self._rc_batch = {}
        try:
            for ci in range(lo, hi):
                self._set_refcount(ci, 0)
        finally:
            batch, self._rc_batch = self._rc_batch, None
            self._unpointed = False
            for boff, (a, b) in batch.items():
                blk = self._rb.get(boff) or self._refblock(boff)
                self._meta_write("refblock_update", blk[a:b], boff + a)
        if hi * self.cluster_size == self.eof:      # the end of the file: it ends before them
            self.eof = lo * self.cluster_size

    def _alloc_run(self, n: int) -> int:
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
                self._meta_write("refblock_update", blk[lo:hi], boff + lo)
            self._claimed -= claim
        self._free_hint = ci + n
        self._grew((ci + n) * self.cluster_size)
        return ci * self.cluster_size

    # -- dirty bit (lazy refcounts) ----------------------------------------------------

    def _mark_dirty(self) -> None:
        if self.lazy and not self._marked_dirty:
            self._set_incompat(self.h.incompat | INCOMPAT_DIRTY)
            fd_datasync(self.mfd)
            self._marked_dirty = True

    def flush_metadata(self) -> None:
        for off in sorted(self._rb_dirty):
            blk = self._rb.get(off)
            if blk is not None:
                pwrite_full(self.mfd, blk, off)
        self._rb_dirty.clear()
