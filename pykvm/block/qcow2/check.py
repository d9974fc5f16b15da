"""qcow2 consistency check and repair (as ``qemu-img check``): every host
cluster's references counted from the metadata of docs/interop/qcow2.txt
(header, refcount table and blocks, L1/L2 tables of the image and its
snapshots, snapshot table, the "Bitmaps" directory and tables) against its
refcount; leaks and corruptions repaired. And ``info()``'s format data."""
from __future__ import annotations

import collections
import os
import struct

from ..driver import BlockError, fd_datasync, fd_pread, pwrite_full
from .header import (COMPAT_LAZY, COMPRESSED, COPIED, INCOMPAT_CORRUPT, MAX_BITMAP_DIRECTORY,
                     MAX_BITMAPS, MAX_CHECK_ERRORS, MAX_L1_BYTES, OFFSET_MASK, REFT_MASK, ZERO)


class CheckRepair:
    """check (and repair) of the refcounts against the metadata; info."""

    # -- check and repair --------------------------------------------------------------

    def check(self, repair: str | None = None, progress=None) -> dict:
        """Count references to every host cluster from the metadata and compare
        them with the refcounts. repair: None, 'leaks' or 'all'.
        ``progress(done, total)`` is called as the tables are walked and the
        refcounts compared."""
        cs, cb = self.cluster_size, self.cluster_bits
        h = self.h
        nclusters = -(-self.eof // cs)
        want = collections.Counter()
        errors = []             # at most MAX_CHECK_ERRORS kept; ``more`` counts the rest
        more = 0
        stats = collections.Counter()

        def fail(message: str, times: int = 1) -> None:
            nonlocal more
            keep = max(0, min(times, MAX_CHECK_ERRORS - len(errors)))
            errors.extend([message] * keep)
            more += times - keep

        def ref(off: int, n: int, what: str, times: int = 1) -> bool:
            if off % cs:
                fail(f"{what} at {off:#x} is not cluster-aligned", times)
                return False
            if off + n * cs > nclusters * cs:
                fail(f"{what} at {off:#x} is past the end of the file", times)
                return False
            for k in range(n):
                want[off // cs + k] += times
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
        # Every reference is counted, but each L1 table (snapshots may share one)
        # and each L2 table is read and walked once, its references counted as
        # often as it is referenced: the work is bounded by the distinct tables
        # in the file, not by how often a hostile image points at the same one.
        l1s = collections.Counter()
        for s in self.snapshots:
            if ref(s.l1_offset, -(-s.l1_size * 8 // cs), f"snapshot {s.name!r} L1 table"):
                l1s[s.l1_offset, s.l1_size] += 1
        l2s = collections.Counter()          # L2 table offset -> references to it
        active = set()                       # L2 tables of the active image
        for tree_no, (l1, times) in enumerate(self._check_trees(l1s)):
            for l1e in l1:
                off = l1e & OFFSET_MASK
                if not off:
                    continue
                if not ref(off, 1, "L2 table", times):
                    continue
                l2s[off] += times
                if tree_no == 0:
                    active.add(off)
        work = len(l2s) + nclusters       # (for progress: tables walked, clusters compared)
        for done, (off, times) in enumerate(l2s.items()):
            if progress and done % 64 == 0:
                progress(done, work)
            try:
                table = self._load_l2(off)
            except BlockError as e:
                fail(str(e), times)
                continue
            counted = off in active
            next_host = 0        # QEMU's fragmentation: a data cluster not right after
            for j in range(0, len(table), self.entry_words):   # the last, per L2 table
                e = table[j]
                if not e:
                    continue
                if e & COMPRESSED:
                    if counted:
                        stats["compressed"] += 1
                        stats["allocated"] += 1
                        stats["fragmented"] += 1
                    coff, clen = self._compressed_span(e)
                    for c in range(coff >> cb, (coff + clen - 1 >> cb) + 1):
                        if c >= nclusters:
                            fail(f"compressed cluster at {coff:#x} is past the end", times)
                            break
                        want[c] += times
                    continue
                host = e & OFFSET_MASK
                if counted and _allocated(e, self.extl2, self.data_fd >= 0):
                    stats["allocated"] += 1
                    if next_host and host != next_host:
                        stats["fragmented"] += 1
                    next_host = host + cs
                if host and self.data_fd < 0:
                    ref(host, 1, "data cluster", times)
        if h.bitmaps_ext is not None and len(h.bitmaps_ext) >= 24:
            nb, _, dsize, doff = struct.unpack(">IIQQ", h.bitmaps_ext[:24])
            if dsize > MAX_BITMAP_DIRECTORY or nb > MAX_BITMAPS:
                fail(f"bitmap directory too large ({nb} bitmaps, {dsize} bytes; at most "
                     f"{MAX_BITMAPS}, {MAX_BITMAP_DIRECTORY})")
            elif ref(doff, -(-dsize // cs), "bitmap directory"):
                d = fd_pread(self.mfd, dsize, doff)
                pos = 0
                tables = collections.Counter()      # each distinct table read once
                for _ in range(nb):
                    if pos + 24 > len(d):
                        break
                    toff, tsize, _, _, _, nsize, esize = struct.unpack_from(">QIIBBHI", d, pos)
                    if tsize * 8 <= MAX_L1_BYTES and ref(toff, -(-tsize * 8 // cs), "bitmap table"):
                        tables[toff, tsize] += 1
                    pos += 24 + esize + nsize
                    pos += -pos % 8
                for (toff, tsize), times in tables.items():
                    for be in struct.unpack(f">{tsize}Q", fd_pread(self.mfd, tsize * 8, toff)):
                        if be & OFFSET_MASK:
                            ref(be & OFFSET_MASK, 1, "bitmap data", times)
        # compare
        leaks, corruptions = [], []
        top = max([nclusters] + [c + 1 for c in want])
        bad_blocks = set()
        for ti, boff in enumerate(self.reftable):
            boff &= REFT_MASK
            if boff and (boff % cs or boff + cs > self.eof):
                bad_blocks.add(ti)
                fail(f"refcount block {ti} at {boff:#x} is misaligned or past the end")
        highest = -1          # QEMU's image end: the last cluster in use or referenced
        for c in range(top):
            if progress and c % 4096 == 0:
                progress(len(l2s) + min(c, nclusters), work)
            ti = c // self.rb_entries
            if ti in bad_blocks:
                if repair == "all" and not self.read_only:
                    self.reftable[ti] = 0
                    pwrite_full(self.mfd, bytes(8), h.rt_offset + ti * 8)
                    bad_blocks.discard(ti)
                have = 0
            else:
                have = self.refcount(c)
            w = want.get(c, 0)
            if have or w:
                highest = c
            if have > w:
                leaks.append((c, w))
            elif have < w:
                corruptions.append((c, w))
        for c, w in want.items():
            if w > self.rc_max:
                fail(f"cluster {c} has {w} references; refcounts overflow")
        fixing_copied = repair == "all" and not self.read_only
        if not (repair and not self.read_only):
            n, copied = self._check_copied()      # against the refcounts as they are
            keep = max(0, MAX_CHECK_ERRORS - len(errors))
            errors.extend(copied[:keep])
            more += n - min(len(copied), keep)
        if len(errors) > MAX_CHECK_ERRORS:
            more += len(errors) - MAX_CHECK_ERRORS
            del errors[MAX_CHECK_ERRORS:]
        result = {"leaks": len(leaks), "corruptions": len(corruptions) + len(errors) + more,
                  "errors": errors, "total_clusters": -(-self.size // cs),
                  "allocated_clusters": stats["allocated"], "compressed_clusters":
                  stats["compressed"], "fragmented_clusters": stats["fragmented"],
                  "image_end_offset": (highest + 1) * cs, "leaks_fixed": 0, "corruptions_fixed": 0}
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
            # QEMU's order: COPIED is checked against the repaired refcounts
            n, copied = self._check_copied()
            if n and fixing_copied:
                self._fix_copied()
                result["corruptions_fixed"] += n
            elif n:
                result["corruptions"] += n
                result["errors"].extend(copied[:max(0, MAX_CHECK_ERRORS - len(errors))])
            fd_datasync(self.mfd)
        return result

    def _check_copied(self) -> tuple[int, list[str]]:
        """QEMU's OFLAG_COPIED rule on the active image: COPIED is set on an L1
        entry or on the L2 entry of a data cluster exactly when the refcount of
        the cluster it points at is 1 (a cluster shared by a snapshot or by
        dedup has it clear, so a write copies it first). How many entries break
        it, and up to MAX_CHECK_ERRORS messages in qemu-img check's words. Each
        distinct L2 table is walked once, its findings counted as often as the
        L1 table points at it (as the refcount walk above)."""
        cs, cb = self.cluster_size, self.cluster_bits
        out: list[str] = []
        count = 0
        tables = collections.Counter()

        def say(message: str, times: int = 1) -> None:
            nonlocal count
            count += times
            out.extend([message] * max(0, min(times, MAX_CHECK_ERRORS - len(out))))

        for i, l1e in enumerate(self.l1):
            off = l1e & OFFSET_MASK
            if not off or off % cs or off + cs > self.eof:
                continue                    # reported by the walk
            rc = self.refcount(off // cs)
            if (rc == 1) != bool(l1e & COPIED):
                say(f"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}")
            tables[off] += 1
        for off, times in tables.items():
            try:
                table = self._load_l2(off)
            except BlockError:
                continue                    # reported by the walk
            for j in range(0, len(table), self.entry_words):
                e = table[j]
                host = e & OFFSET_MASK
                if e & COMPRESSED or not _allocated(e, self.extl2, self.data_fd >= 0):
                    continue
                rc = 1 if self.data_fd >= 0 else self.refcount(host >> cb)
                if (rc == 1) != bool(e & COPIED):
                    say(f"OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}", times)
        return count, out

    def _check_trees(self, l1s):
        """(L1 table, how many snapshots share it): the active image's first, then
        each distinct snapshot L1 table, read one at a time."""
        yield self.l1, 1
        for (offset, size), times in l1s.items():
            self._check_table(offset, size * 8, "snapshot L1 table")
            yield list(struct.unpack(f">{size}Q", self._read_meta(offset, size * 8))), times

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


def _allocated(e: int, extl2: bool, data_file: bool) -> bool:
    """A standard L2 entry (not compressed) that points at a host cluster: QEMU's
    NORMAL and ZERO_ALLOC types (a zero entry with an offset keeps its cluster).
    Offset 0 is a cluster only in an external data file, with COPIED set."""
    host = e & OFFSET_MASK
    if e & ZERO and not extl2:
        return bool(host)
    return bool(host) or (data_file and bool(e & COPIED))
