"""qcow2 discard and zeroes: zero clusters (the "all zeroes" flag of
standard cluster descriptors, version 3) and zero subclusters ("Extended L2
Entries") of docs/interop/qcow2.txt, freeing clusters, ``make_empty()``."""
from __future__ import annotations

from ..driver import BlockError, WriteBusy
from .header import COMPRESSED, COPIED, OFFSET_MASK, ZERO


class ZeroDiscard:
    """Discard, write-zeroes (zero clusters and subclusters), make_empty."""

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
