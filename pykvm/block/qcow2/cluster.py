"""qcow2 cluster mapping: the "Cluster mapping" and "Extended L2 Entries"
sections of docs/interop/qcow2.txt. The L1 table and the L2 cache, ``map()``
and ``data_at()`` (the read side), the direct map of plain data for a
device's own I/O thread, L1/L2 entry updates and growing the L1 table."""
from __future__ import annotations

import os
import struct
from array import array

from ..driver import BlockError, DirectExtent, Extent, fd_datasync
from .header import COMPRESSED, COPIED, MAX_L1_BYTES, OFFSET_MASK, ZERO, be64_bytes


class ClusterMap:
    """L1 and L2 tables: L2 cache, map(), data_at(), direct map, entry updates, resize."""

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

    def erase_extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """The host bytes of [offset, +length) that only this range uses: data
        clusters of refcount 1 (a cluster shared with another offset or a
        snapshot still holds their data; compressed clusters share host
        sectors), in the external data file if there is one."""
        out = []
        cb, cs = self.cluster_bits, self.cluster_size
        for e in self.map(offset, length):
            if e.kind != "data":
                continue
            if self.data_fd >= 0:
                out += self.data_file.erase_extents(e.host_offset, e.length)
                continue
            pos, end = e.host_offset, e.host_offset + e.length
            while pos < end:
                n = min(end - pos, cs - (pos & (cs - 1)))
                if self.refcount(pos >> cb) == 1:
                    out.append((self.bfd, pos, n))
                pos += n
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
        self._meta_write("l2_alloc.write", struct.pack(f">{len(table)}Q", *table), new)
        self._l2[new] = table
        self._set_l1(l1i, new | COPIED)
        if off:
            self._unref(off // cs)
            self._l2.pop(off, None)
        return table, (ci & (self.l2_entries - 1)) * self.entry_words

    def _set_l1(self, i: int, value: int) -> None:
        self._dx_changed(i)
        old, self.l1[i] = self.l1[i], value
        try:
            self._meta_write("l1_update", struct.pack(">Q", value), self.h.l1_offset + i * 8)
        except BlockError:
            self.l1[i] = old      # the table says what the file says
            raise

    def _set_l2(self, ci: int, entry: int, bitmap: int | None = None) -> None:
        l2, idx = self._l2_writable(ci)
        l1e = self.l1[ci >> self.l2_bits] & OFFSET_MASK
        self._dx_changed(ci >> self.l2_bits)
        old = l2[idx:idx + self.entry_words]
        l2[idx] = entry
        try:
            if self.extl2:
                if bitmap is None:
                    bitmap = l2[idx + 1]
                l2[idx + 1] = bitmap
                self._meta_write("l2_update", struct.pack(">QQ", entry, bitmap), l1e + idx * 8)
            else:
                self._meta_write("l2_update", struct.pack(">Q", entry), l1e + idx * 8)
        except BlockError:
            l2[idx:idx + self.entry_words] = old    # the cache says what the file says
            raise

    def _set_l2_many(self, updates) -> None:
        """Several L2 entries; one write per run of neighbours in a table."""
        if len(updates) == 1:
            ci, entry, bitmap = updates[0]
            self._set_l2(ci, entry, bitmap)
            return
        w = self.entry_words
        runs: list = []
        undo: list = []
        for ci, entry, bitmap in sorted(updates):
            l2, idx = self._l2_writable(ci)
            self._dx_changed(ci >> self.l2_bits)
            undo.append((l2, idx, l2[idx:idx + w]))
            l2[idx] = entry
            if w == 2:
                l2[idx + 1] = bitmap if bitmap is not None else l2[idx + 1]
            off = self.l1[ci >> self.l2_bits] & OFFSET_MASK
            if runs and runs[-1][0] == off and runs[-1][2] == idx:
                runs[-1][2] = idx + w
            else:
                runs.append([off, idx, idx + w, l2])
        try:
            for off, lo, hi, l2 in runs:
                self._meta_write("l2_update", struct.pack(f">{hi - lo}Q", *l2[lo:hi]),
                                 off + lo * 8)
        except BlockError:
            for l2, idx, old in reversed(undo):     # the cache says what the file says
                l2[idx:idx + w] = old               # (runs written before stay: a leak at most)
            raise

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
            self._replace_l1(self.l1 + array("Q", bytes(8 * (need - len(self.l1)))))
        self._write_header_field(24, ">Q", size)
        self.h.size = self.size = size
        self._dx_changed()

    def _replace_l1(self, entries) -> None:
        cs = self.cluster_size
        n = -(-len(entries) * 8 // cs) or 1
        new = self.alloc_clusters(n)
        data = be64_bytes(entries)
        self._meta_write("l1_grow.write_table", data + bytes(n * cs - len(data)), new)
        fd_datasync(self.mfd)
        old_off, old_n = self.h.l1_offset, -(-self.h.l1_size * 8 // cs)
        self.file.debug_event("l1_grow.activate_table")
        self._write_header_field(36, ">IQ", len(entries), new)
        self.h.l1_offset, self.h.l1_size = new, len(entries)
        self.l1 = array("Q", entries)
        self._dx_changed()
        if old_off:
            for k in range(old_n):
                self._unref(old_off // cs + k)


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
