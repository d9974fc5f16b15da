"""qcow2 allocating writes: the write side of the "Cluster mapping" section
of docs/interop/qcow2.txt (standard and extended L2 entries, the COPIED
flag): ``map_for_write()`` with copy-on-write from the backing file, a
compressed or a shared cluster, ``commit()``/``abort()``, allocate-ahead for
sequential fills and ``write_new()`` for whole new clusters."""
from __future__ import annotations

import struct

from ..driver import BlockError, Extent, WriteBusy, WritePlan, pread_full, pwrite_full, read_into
from .cluster import _append
from .header import COMPRESSED, COPIED, OFFSET_MASK, ZERO


class _Alloc:
    """An allocation in flight: guest clusters locked until commit, the L2
    entries to write then, and old host clusters to release after."""

    __slots__ = ("clusters", "updates", "release")

    def __init__(self):
        self.clusters: list[int] = []
        self.updates: list[tuple[int, int, int]] = []   # (guest cluster, entry, bitmap)
        self.release: list[int] = []                     # old L2 entries to unreference


class WriteAllocation:
    """map_for_write (allocation, copy-on-write), commit/abort, allocate-ahead, write_new."""

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
                self.file.debug_event("cluster_alloc")
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
                    self.file.debug_event("cow_read")
                    pread_full(self.bfd, memoryview(data), old_host)
                    self._meta_write("cow_write", data, host, self.bfd)
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
            self.file.debug_event("cow_read")
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
                        self._meta_write("cow_write", bytes(hi - lo), host + lo, self.bfd)
                elif not fresh or any(memoryview(old)[lo:hi]):
                    self._meta_write("cow_write", memoryview(old)[lo:hi], host + lo, self.bfd)
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
                self._meta_write("cow_write", memoryview(old)[a - lo:b - lo], host + a, self.bfd)

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
