"""Offline deduplication inside standard qcow2 (``pykvm img dedup``).

The format already lets several guest clusters share one host cluster: the
refcount counts the L2 entries that point at it (internal snapshots do this),
and QCOW_OFLAG_COPIED is clear on every entry of a cluster whose refcount is
not 1, so that a write copies it first (docs/interop/qcow2.txt, "Cluster
mapping" and "Host cluster management"). Nothing here changes the format: the
result is an image QEMU reads, writes and checks as any other.

Steps: every normal data cluster of the active image is read once and hashed
(SHA-256, the first 16 bytes: the CPU's SHA instructions make it the
fastest strong hash here); clusters with the same hash are compared byte for byte
before anything is shared (a hash match alone never shares, as FIDEDUPERANGE
compares). All-zero clusters become zero entries (version 3); with ``chain``
a cluster equal to what the backing file shows at its offset becomes
unallocated again. Compressed clusters, subclusters of a partly allocated
cluster (extended L2) and images with an external data file are left alone.

The order of the writes keeps every crash state consistent (at most leaks),
and keeps QEMU's OFLAG_COPIED rule (COPIED set exactly where the refcount is
1) true at every point, so that ``qemu-img check`` after a crash finds leaks
and nothing else. A batch is:

1. the shared copy gets its refcount: a fresh cluster (allocated, the data
   written, its refcount raised to the number of entries that will point at
   it), or an existing cluster whose refcount is already 2 or more (shared
   with a snapshot or by an earlier dedup: its entries have COPIED clear) is
   raised; then fdatasync;
2. the L2 entries are rewritten (the shared copy without COPIED, or zero, or
   unallocated); fdatasync;
3. the refcounts of the clusters they left are lowered (freed clusters are
   punched out of the file); fdatasync.

A crash after 1 leaves the new references' count too high (a leak), during 2
some old clusters with a refcount too high, during 3 the same; never a cluster
in use with a refcount too low.

Internal snapshots are handled, not refused: a cluster moves (or becomes a
zero or unallocated entry) only with all its references and only if they are
all the active image's, so it is freed, and no snapshot's table changes; a
cluster a snapshot holds may be the shared copy the others move onto. An L2
table a snapshot shares therefore never changes (its clusters are all held). Why not make one of the duplicates the shared
copy: it has refcount 1 and its entry COPIED set; raising the one and
clearing the other are two writes, and between them QEMU's check sees COPIED
not matching the refcount (harmless, but counted as a corruption). A fresh
copy has no entries yet, so costs one cluster write per distinct duplicated
content and never shows that state.

The refcount never passes ``(1 << refcount_bits) - 1``: a shared copy that is
full takes no more, and the next duplicates get a new shared copy (with
refcount_bits=1 nothing can be shared; zero and backing clusters still go).
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import os

from ..driver import BlockError, fd_datasync, fd_pread, pread_full, read_into
from ..file import PUNCH, fallocate
from .header import COMPRESSED, COPIED, OFFSET_MASK, ZERO

DIGEST = 16                  # bytes of SHA-256 kept: 2^-64 per pair before the byte compare
READ_CHUNK = 8 << 20         # host bytes read at once while hashing
BATCH = 4096                 # L2 entries changed per batch (bounds the extra space)
ALL_ALLOC = 0xFFFFFFFF       # extended L2: every subcluster allocated
ALL_ZERO = 0xFFFFFFFF << 32  # extended L2: every subcluster reads as zeroes


class DedupResult:
    """What a dedup found and did (or, with dry_run, would do)."""

    def __init__(self):
        self.cluster_size = 0
        self.data_clusters = 0       # guest clusters with normal data, before
        self.host_before = 0         # distinct host clusters they use, before
        self.host_after = 0          # and after
        self.guest_after = 0         # guest clusters with normal data, after
        self.shared = 0              # entries pointed at a shared copy
        self.zeroed = 0              # entries made zero clusters
        self.unallocated = 0         # entries made unallocated (equal to the backing file)
        self.freed = 0               # host clusters freed
        self.allocated = 0           # host clusters allocated (shared copies, L2 copies)
        self.skipped_compressed = 0
        self.skipped_partial = 0     # extended L2: partly allocated clusters
        self.hash_only = 0           # same hash, different bytes (never shared)
        self.copied_fixed = 0        # entries of refcount-1 clusters given COPIED back

    @property
    def saved_bytes(self) -> int:
        return (self.freed - self.allocated) * self.cluster_size

    @property
    def ratio_before(self) -> float:
        return self.data_clusters / self.host_before if self.host_before else 1.0

    @property
    def ratio_after(self) -> float:
        return self.guest_after / self.host_after if self.host_after else 1.0


class _Plan:
    """The changes of one run: per guest cluster its new entry, per shared copy
    its source and the entries that go to it."""

    def __init__(self):
        self.zero: list[int] = []                   # guest clusters -> zero entries
        self.unalloc: list[int] = []                # guest clusters -> unallocated
        self.fresh: list[tuple[int, list[int]]] = []    # (source host cluster, guest clusters)
        self.onto: list[tuple[int, list[int]]] = []     # (existing host cluster, guest clusters)
        self.copied: list[int] = []                 # guest clusters: set COPIED (refcount 1)


def dedup(drv, dry_run: bool = False, min_refs: int = 2, chain: bool = False,
          progress=None) -> DedupResult:
    """Deduplicate the active image of an open qcow2 node (writable unless
    ``dry_run``). ``progress(done, total)`` is called as work proceeds."""
    if drv.data_fd >= 0:
        raise BlockError(drv.path, "cannot deduplicate an image with an external data file "
                         "(its clusters cannot be shared)")
    if chain and drv.backing is None:
        raise BlockError(drv.path, "--chain: the image has no backing file")
    if min_refs < 2:
        raise BlockError(drv.path, f"--min-refs must be at least 2 (not {min_refs})")
    if not dry_run and drv.read_only:
        raise BlockError(drv.path, "image is read-only")
    report = progress or (lambda done, total: None)
    res = DedupResult()
    res.cluster_size = drv.cluster_size
    plan = _Plan()
    entries, by_host, prezero = _scan(drv, res, plan)
    plan.zero.extend(_freed_zero(drv, entries, by_host, prezero))
    groups = _hash(drv, entries, by_host, chain, plan, res, report)
    _share(drv, entries, by_host, groups, min_refs, plan, res, report)
    _account(drv, entries, by_host, plan, res)
    if not dry_run:
        _execute(drv, entries, plan, report)
    report(1, 1)
    return res


# -- scan: the active image's data clusters ------------------------------------------

def _scan(drv, res, plan):
    """(guest cluster -> (entry, bitmap), host cluster -> [guest clusters],
    [preallocated zero clusters]) of every normal data cluster the active image
    maps; compressed and partly allocated clusters are counted and left out."""
    cs, cb, w = drv.cluster_size, drv.cluster_bits, drv.entry_words
    nclusters = -(-drv.size // cs)
    entries: dict[int, tuple[int, int]] = {}
    by_host: dict[int, list[int]] = collections.defaultdict(list)
    prezero: list[int] = []
    for l1i in range(min(len(drv.l1), -(-nclusters // drv.l2_entries))):
        off = drv.l1[l1i] & OFFSET_MASK
        if not off:
            continue
        table = drv._load_l2(off)
        first = l1i << drv.l2_bits
        for j in range(min(drv.l2_entries, nclusters - first)):
            e = table[j * w]
            if not e:
                continue
            if e & COMPRESSED:
                res.skipped_compressed += 1
                continue
            host = e & OFFSET_MASK
            bm = table[j * w + 1] if drv.extl2 else 0
            if not host:
                continue
            if drv.extl2 and (bm & ALL_ALLOC) != ALL_ALLOC:
                res.skipped_partial += 1
                continue
            if host < cs or host + cs > drv.eof:
                raise BlockError(drv.path, f"data cluster at {host:#x} of guest cluster "
                                 f"{first + j} is outside the file")
            if not drv.extl2 and e & ZERO:
                # a preallocated zero cluster: reads zeroes, its cluster can go
                if drv.h.version < 3:
                    continue
                entries[first + j] = (e, bm)
                prezero.append(first + j)
                continue
            entries[first + j] = (e, bm)
            by_host[host >> cb].append(first + j)
            res.data_clusters += 1
    # A cluster that was shared and whose other entries were all written since
    # (each write copied it away) is left with refcount 1 and COPIED still clear
    # on the last entry: neither QEMU nor pykvm can find that entry when they
    # lower the refcount. Harmless (the next write copies once more) but
    # qemu-img check counts it; dedup, reading every entry, sets it back.
    for h, guests in by_host.items():
        if len(guests) == 1 and not entries[guests[0]][0] & COPIED and drv.refcount(h) == 1:
            plan.copied.append(guests[0])
    return entries, by_host, prezero


def _freed_zero(drv, entries, by_host, prezero):
    """The preallocated zero clusters whose host cluster is then freed: every
    reference to it is one of these entries."""
    cb = drv.cluster_bits
    host = {ci: (entries[ci][0] & OFFSET_MASK) >> cb for ci in prezero}
    refs = collections.Counter(host.values())
    return [ci for ci in prezero
            if host[ci] not in by_host and drv.refcount(host[ci]) == refs[host[ci]]]


# -- hash: zero clusters, backing-equal clusters, candidate groups ---------------------

def _digest(data) -> bytes:
    """A cluster's digest: SHA-256 (1.7 GB/s here with the SHA extensions,
    against 0.9 GB/s for blake2b), cut to DIGEST bytes."""
    return hashlib.sha256(data).digest()[:DIGEST]


def _hash(drv, entries, by_host, chain, plan, res, report):
    """Read every host cluster once. Zero clusters (version 3) go to plan.zero,
    guest clusters equal to the backing file (chain) to plan.unalloc; the rest
    are grouped by digest: {digest: [host clusters]}."""
    cs, cb = drv.cluster_size, drv.cluster_bits
    zero = bytes(cs)
    zero_digest = _digest(zero)
    v3 = drv.h.version >= 3
    groups: dict[bytes, list[int]] = collections.defaultdict(list)
    hosts = sorted(by_host)
    per = max(1, READ_CHUNK // cs)
    buf = bytearray(per * cs)
    view = memoryview(buf)
    back = bytearray(cs)
    total = len(hosts)
    i = 0
    while i < total:
        k = 1                               # a run of neighbouring host clusters
        while i + k < total and k < per and hosts[i + k] == hosts[i] + k:
            k += 1
        pread_full(drv.bfd, view[:k * cs], hosts[i] << cb)
        for n in range(k):
            h = hosts[i + n]
            data = view[n * cs:(n + 1) * cs]
            guests = by_host[h]
            # a cluster leaves only with all its references, and only if they are
            # all the active image's (not a snapshot's): then it is freed, and no
            # cluster is left shared by fewer entries than its COPIED flags say
            ours = drv.refcount(h) == len(guests)
            if chain and ours:
                same = True
                for ci in guests:
                    g = ci << cb
                    seen = min(cs, drv.size - g)
                    read_into(drv.backing, g, memoryview(back)[:seen])
                    if bytes(data[:seen]) != bytes(back[:seen]):
                        same = False
                        break
                if same:
                    plan.unalloc.extend(guests)
                    by_host[h] = []
                    continue
            d = _digest(data)
            if v3 and ours and d == zero_digest and bytes(data) == zero:
                plan.zero.extend(guests)
                by_host[h] = []
                continue
            groups[d].append(h)
        i += k
        report(i * 7, total * 10)
    return groups


# -- share: which clusters go where --------------------------------------------------

def _share(drv, entries, by_host, groups, min_refs, plan, res, report):
    """Split each digest group into classes of equal bytes; in each class move
    whole host clusters (all their entries, so that they are freed) onto a
    shared copy, never past the refcount maximum."""
    cs, cb = drv.cluster_size, drv.cluster_bits
    rc_max = drv.rc_max
    multi = [hs for hs in groups.values() if len(hs) > 1 or len(by_host[hs[0]]) > 1]
    done = 0
    for hosts in multi:
        classes: list[tuple[bytes, list[int]]] = []
        for h in hosts:
            data = fd_pread(drv.bfd, cs, h << cb)
            for rep, members in classes:
                if rep == data:
                    members.append(h)
                    break
            else:
                classes.append((data, [h]))
        res.hash_only += len(classes) - 1
        for _, members in classes:
            _place(drv, entries, by_host, members, min_refs, rc_max, plan)
        done += 1
        report(7 * len(multi) + 2 * done, 10 * len(multi))


def _place(drv, entries, by_host, members, min_refs, rc_max, plan):
    """One class of equal clusters: which shared copy each host's entries go to.
    A destination must already be shared (refcount 2 or more, so its entries
    have COPIED clear) with room below the maximum; a host moves only with all
    its entries and only if they are all its references (then it is freed).
    What finds no destination goes, two hosts or more at a time, onto a fresh
    copy."""
    if sum(len(by_host[h]) for h in members) < min_refs:
        return
    rc0 = {h: drv.refcount(h) for h in members}
    rcs = dict(rc0)
    ok = [h for h in members if by_host[h] and rc0[h] >= len(by_host[h])]
    dests = [h for h in ok if rc0[h] >= 2 and rc0[h] < rc_max and
             not any(entries[ci][0] & COPIED for ci in by_host[h])]
    dests.sort(key=lambda h: (rc0[h] == len(by_host[h]), -rc0[h]))  # snapshot-held first
    movers = [h for h in ok if rc0[h] == len(by_host[h]) < rc_max]
    movers.sort(key=lambda h: rc0[h])
    left = []
    for h in movers:
        if rcs[h] != rc0[h]:
            continue                        # it took others' entries: it stays
        need = len(by_host[h])
        for c in dests:
            if c != h and rcs[c] + need <= rc_max:
                rcs[c] += need
                _onto(plan, c, by_host[h])
                if h in dests:              # it is gone: nothing may move onto it
                    dests.remove(h)
                break
        else:
            left.append(h)
    bin_, room = [], rc_max
    for h in left:
        if rcs[h] != rc0[h]:
            continue
        need = len(by_host[h])
        if need > room:
            _fresh(plan, bin_, by_host)
            bin_, room = [], rc_max
        bin_.append(h)
        room -= need
    _fresh(plan, bin_, by_host)


def _onto(plan, host, guests):
    for c, gs in plan.onto:
        if c == host:
            gs.extend(guests)
            return
    plan.onto.append((host, list(guests)))


def _fresh(plan, hosts, by_host):
    """A fresh shared copy for these hosts' entries, if it frees two or more."""
    if len(hosts) >= 2:
        plan.fresh.append((hosts[0], [ci for h in hosts for ci in by_host[h]]))


# -- accounting (the dry run's numbers, and the real run's) ----------------------------

def _account(drv, entries, by_host, plan, res):
    """Fill res from the plan: clusters freed and allocated, entries changed."""
    cb = drv.cluster_bits
    moved = collections.Counter()
    for ci in plan.zero + plan.unalloc:
        moved[entries[ci][0] & OFFSET_MASK] += 1
    for _, gs in plan.fresh + plan.onto:
        for ci in gs:
            moved[entries[ci][0] & OFFSET_MASK] += 1
    gained = collections.Counter()
    for c, gs in plan.onto:
        gained[c] += len(gs)
    changed = set(_moved(plan))
    plan.copied = [ci for ci in plan.copied if ci not in changed]
    res.copied_fixed = len(plan.copied)
    res.zeroed = len(plan.zero)
    res.unallocated = len(plan.unalloc)
    res.shared = sum(len(gs) for _, gs in plan.fresh + plan.onto)
    res.freed = sum(1 for off, n in moved.items()
                    if drv.refcount(off >> cb) + gained[off >> cb] == n)
    res.allocated = len(plan.fresh)
    # what the active image maps afterwards
    new_host = {}
    for src, gs in plan.fresh:
        for ci in gs:
            new_host[ci] = ("fresh", src)
    for c, gs in plan.onto:
        for ci in gs:
            new_host[ci] = c
    gone = set(plan.zero) | set(plan.unalloc)
    hosts_after = set()
    guests_after = 0
    for ci, (e, _) in entries.items():
        if ci in gone or (not drv.extl2 and e & ZERO):
            continue
        guests_after += 1
        hosts_after.add(new_host.get(ci, (e & OFFSET_MASK) >> cb))
    res.guest_after = guests_after
    res.host_after = len(hosts_after)
    res.host_before = len({(e & OFFSET_MASK) >> cb for e, _ in entries.values()
                           if drv.extl2 or not e & ZERO})


def _moved(plan):
    """Every guest cluster the plan gives a new entry."""
    yield from plan.zero
    yield from plan.unalloc
    for _, gs in plan.fresh + plan.onto:
        yield from gs


def _l2_shared(drv, l1i: int) -> bool:
    """The L2 table at L1 index l1i is shared with a snapshot."""
    e = drv.l1[l1i]
    return not e & COPIED and drv.refcount((e & OFFSET_MASK) >> drv.cluster_bits) != 1


# -- execute, in batches, in the crash-safe order ------------------------------------

def _execute(drv, entries, plan, report):
    drv._unmapping(0, drv.size)
    work = [("copied", ci, None) for ci in plan.copied] + \
        [("zero", ci, None) for ci in plan.zero] + \
        [("unalloc", ci, None) for ci in plan.unalloc]
    for c, gs in plan.onto:             # what frees without allocating, first
        work.append(("onto", c, gs))
    for src, gs in plan.fresh:          # then fresh copies, in what was freed
        work.append(("fresh", src, gs))
    batch, size, done = [], 0, 0
    total = max(1, len(work))
    for item in work:
        batch.append(item)
        size += 1 if item[2] is None else len(item[2])
        if size >= BATCH:
            _batch(drv, entries, batch)
            done += len(batch)
            report(9 * total + done, 10 * total)
            batch, size = [], 0
    if batch:
        _batch(drv, entries, batch)


def _batch(drv, entries, batch):
    cs, cb = drv.cluster_size, drv.cluster_bits
    ext = drv.extl2
    changed = [ci for kind, x, gs in batch for ci in ([x] if gs is None else gs)]
    # an entry of an L2 table that a snapshot shares points at a cluster the
    # snapshot holds too: such clusters never move (see _hash, _place)
    for l1i in sorted({ci >> drv.l2_bits for ci in changed}):
        if _l2_shared(drv, l1i):
            raise BlockError(drv.path, f"dedup would change the L2 table at L1 index {l1i}, "
                             f"which a snapshot shares (refusing)")
    # 1. the shared copies get their refcounts (fresh ones their data) first
    raise_rc = collections.Counter()
    updates = []
    for kind, x, gs in batch:
        if kind == "copied":
            e, bm = entries[x]
            updates.append((x, e | COPIED, bm if ext else None))
        elif kind == "zero":
            updates.append((x, 0, ALL_ZERO) if ext else (x, ZERO, None))
        elif kind == "unalloc":
            updates.append((x, 0, 0) if ext else (x, 0, None))
        else:
            if kind == "fresh":
                data = bytearray(cs)
                pread_full(drv.bfd, memoryview(data), x << cb)
                target = drv.alloc_clusters(1)          # refcount 1, no entry yet: a leak
                drv._meta_write("cow_write", data, target, drv.bfd)
                raise_rc[target >> cb] += len(gs) - 1
            else:
                target = x << cb
                raise_rc[x] += len(gs)
            for ci in gs:
                updates.append((ci, target, ALL_ALLOC) if ext else (ci, target, None))
    _refcounts(drv, raise_rc)
    fd_datasync(drv.mfd)
    # 2. the entries point at them (COPIED clear: the refcount is 2 or more)
    lower = collections.Counter()
    for ci in (ci for kind, x, gs in batch if kind != "copied"
               for ci in ([x] if gs is None else gs)):
        lower[(entries[ci][0] & OFFSET_MASK) >> cb] -= 1
    drv._set_l2_many(updates)
    fd_datasync(drv.mfd)
    # 3. the clusters they left lose those references (and their space if freed)
    freed = [c for c, d in lower.items() if drv.refcount(c) + d == 0]
    _refcounts(drv, lower)
    for c in freed:
        fallocate(drv.mfd, PUNCH, c * cs, cs)
    fd_datasync(drv.mfd)


def _refcounts(drv, deltas) -> None:
    """Add deltas to refcounts: one refcount block at a time, each with one
    write, so that the block cache (which drops clean blocks) never loses a
    change before it is written."""
    per = drv.rb_entries
    for _, group in itertools.groupby(sorted(deltas.items()), key=lambda kv: kv[0] // per):
        drv._rc_batch = {}
        try:
            for c, d in group:
                if d:
                    drv._set_refcount(c, drv.refcount(c) + d)
        finally:
            batch, drv._rc_batch = drv._rc_batch, None
        for boff, (lo, hi) in batch.items():
            blk = drv._rb[boff]             # just used: still cached
            drv._meta_write("refblock_update", blk[lo:hi], boff + lo)
