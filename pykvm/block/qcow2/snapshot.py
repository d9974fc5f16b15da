"""qcow2 internal snapshots: the "Snapshots" section of
docs/interop/qcow2.txt (the snapshot table and its extra data), create,
apply and delete with the refcount and COPIED updates they need."""
from __future__ import annotations

import os
import struct
import time
from array import array

from ..driver import BlockError, fd_datasync, pwrite_full
from .header import (COMPRESSED, COPIED, MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA, MAX_SNAPSHOT_TABLE,
                     OFFSET_MASK, be64_bytes, be64_table)


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


class Snapshots:
    """The snapshot table; create, apply, delete."""

    def _read_snapshots(self) -> list[Snapshot]:
        """The snapshot table, in two passes: the entries' fixed parts first (their
        sizes add up to at most MAX_SNAPSHOT_TABLE, or the image is refused before
        any name or extra data is read), then their variable parts."""
        h = self.h
        heads = []
        pos = h.snapshots_offset
        limit = pos + MAX_SNAPSHOT_TABLE
        for _ in range(h.nb_snapshots):
            if pos + 40 > self.eof:
                raise BlockError(self.path, "snapshot table runs past the end of the file")
            head = struct.unpack(">QIHHIIQII", self._read_meta(pos, 40))
            id_len, name_len, extra_len = head[2], head[3], head[8]
            if extra_len > MAX_SNAPSHOT_EXTRA:
                raise BlockError(self.path, f"snapshot extra data too large ({extra_len} bytes, "
                                 f"at most {MAX_SNAPSHOT_EXTRA})")
            heads.append((pos, head))
            pos += 40 + extra_len + id_len + name_len
            pos += -pos % 8
            if pos > limit:
                raise BlockError(self.path, f"snapshot table too large (more than "
                                 f"{MAX_SNAPSHOT_TABLE} bytes)")
        out = []
        for epos, (l1_off, l1_size, id_len, name_len, sec, nsec, clock, vmsize,
                   extra_len) in heads:
            body = self._read_meta(epos + 40, extra_len + id_len + name_len)
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
        self._snap_len = pos - h.snapshots_offset
        return out

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
            fd_datasync(self.mfd)
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

    def _read_l1(self, s: Snapshot) -> array:
        self._check_table(s.l1_offset, s.l1_size * 8, f"snapshot {s.name!r} L1 table")
        return be64_table(self._read_meta(s.l1_offset, s.l1_size * 8))

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
        data = be64_bytes(array("Q", (e & ~COPIED for e in self.l1)))
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
        fd_datasync(self.mfd)

    def snapshot_load_tmp(self, name: str | None = None, ident: str | None = None) -> None:
        """Make a read-only node show snapshot ``name`` (an id or a name) or the
        one with ``ident`` and/or ``name`` (QEMU's bdrv_snapshot_load_tmp):
        its L1 table, nothing written; the size stays the image's, as QEMU's.
        For qemu-img measure -l."""
        if not self.read_only:
            raise BlockError(self.path, "a snapshot is loaded only into a read-only image")
        for s in self.snapshots:
            if (ident is None and name is not None and name in (s.id, s.name)) or \
                    (ident is not None and s.id == ident and name in (None, s.name)):
                break
        else:
            raise BlockError(self.path, f"cannot find snapshot {ident or name!r}")
        self.l1 = self._read_l1(s)
        self._l2.clear()
        self._dx_changed()

    def snapshot_apply(self, name: str) -> None:
        s = self.find_snapshot(name)
        l1 = self._read_l1(s)
        self._unmapping(0, max(self.size, s.disk_size))
        self._tree_refs(l1, +1)
        old = array("Q", self.l1)
        if len(l1) != len(self.l1):
            self._replace_l1(l1)
        else:
            self.l1 = array("Q", l1)
            self._dx_changed()
            pwrite_full(self.mfd, be64_bytes(l1), self.h.l1_offset)
        if s.disk_size != self.size:
            self._write_header_field(24, ">Q", s.disk_size)
            self.h.size = self.size = s.disk_size
        self._tree_refs(old, -1)
        self._fix_copied()
        fd_datasync(self.mfd)

    def snapshot_delete(self, name: str) -> None:
        s = self.find_snapshot(name)
        l1 = self._read_l1(s)
        self._write_snapshot_table([x for x in self.snapshots if x is not s])
        self._tree_refs(l1, -1)
        cs = self.cluster_size
        for k in range(-(-s.l1_size * 8 // cs)):
            self._unref(s.l1_offset // cs + k)
        self._fix_copied()
        fd_datasync(self.mfd)
