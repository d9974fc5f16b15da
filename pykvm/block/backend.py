"""BlockBackend: what a device talks to. Maps, executes on an AIO engine,
applies the cache mode.

Cache modes are three booleans, as QEMU defines them:

  mode          writeback  direct  no_flush
  writeback        yes       no       no
  writethrough     no        no       no
  none             yes       yes      no
  directsync       no        yes      no
  unsafe           yes       no       yes

``direct`` opens the image with O_DIRECT. Without ``writeback`` every write is
followed by a flush (format metadata, then fdatasync) before it completes
(writethrough is done here, once, for every driver). ``no_flush`` turns guest
flushes into no-ops. The guest may turn its write cache on and off
(virtio-blk CONFIG_WCE), which toggles ``writeback`` at run time.

Every request carries an integer token from the device and completes as
``(token, result)``, result >= 0 on success or -errno. With O_DIRECT, a
request whose buffers or offset are not aligned goes through an aligned
bounce buffer.

Execution (formats map first, then this generic executor does the I/O):
- identity-mapped drivers (raw) take a fast path: one AioRequest per guest
  request, on the guest's own buffers;
- otherwise a read is split along ``driver.map()``: data extents become
  preadv requests on the extent's file, zero and unallocated extents are
  filled here (unallocated ones from the backing chain), compressed ones are
  decoded by the driver; a write asks ``driver.map_for_write()`` for its host
  extents (allocation and copy-on-write happen there), pwritev's them, and
  commits the allocation when all its pieces are down. A write that touches
  a cluster whose allocation is still in flight waits for that commit.
  Discard and write-zeroes on such drivers first wait for in-flight I/O, so
  no freed cluster is reused under a request still writing to it.

Host errors. A short read or write from an engine is continued for the rest
(a read that ends at the end of its file is zero-filled there instead, as a
read past the end is); one that makes no progress fails with EIO. Once a
flush has failed (fdatasync, or the format's metadata), every later flush
and every writethrough write fails with EIO until the image is opened
again: after a failed fdatasync the kernel may have dropped the dirty
pages, so a later fdatasync that succeeds proves nothing (``flush_error``).
"""
from __future__ import annotations

import bisect
import collections
import errno
import logging
import mmap
import os
import select
import time

from .._native import ffi, lib
from ..aio import FALLOCATE, FLUSH, READ, WRITE, AioRequest, PythonEngine
from .driver import (FORMATS, ZERO_CHUNK, BlockError, GraphError, WriteBusy, fd_datasync,
                     iov_copy_in, iov_is_zero, iov_length, iov_slice, iov_zero, pwrite_full)
from .graph import image_spec, open_node
from .locking import disk_use
from .throttle import _WAKER, ThrottledQueue

log = logging.getLogger("pykvm.block")

CacheMode = collections.namedtuple("CacheMode", "writeback direct no_flush")
CACHE_MODES = {
    "writeback": CacheMode(True, False, False),
    "writethrough": CacheMode(False, False, False),
    "none": CacheMode(True, True, False),
    "directsync": CacheMode(False, True, False),
    "unsafe": CacheMode(True, False, True),
}
DISCARD_MODES = ("ignore", "unmap")
DETECT_ZEROES_MODES = ("off", "on", "unmap")
SECTOR = 512
# How far ahead a format may raise the refcounts of new clusters for a guest's
# writes (qcow2: one refcount write and one ordering sync per run, not per
# allocation; after a crash the unused rest of a run is a leak, at most this)
ALLOC_AHEAD = 16 << 20
# Bounce buffers (O_DIRECT, unaligned guest buffers) in flight at once, in bytes
# (README.md, "Limits"): a request that would pass it waits for those before it.
# One request alone always goes (a guest request is at most 256 MiB).
MAX_BOUNCE_BYTES = 256 << 20
# Zeroes written as data go through O_DIRECT too: a page-aligned buffer
# (an anonymous mapping) rather than a bytes object, which is not aligned.
_ZEROES = mmap.mmap(-1, ZERO_CHUNK, prot=mmap.PROT_READ)


class _Pending:
    """A backend request in flight: the device's token and what is left to do.
    Mapped requests fan out into ``remaining`` engine requests."""

    __slots__ = ("token", "op", "result", "bounce", "iov", "then_flush", "remaining", "allocs",
                 "length")

    def __init__(self, token: int, op: str, iov=None, bounce=None, then_flush=False):
        self.token = token
        self.op = op
        self.iov = iov
        self.bounce = bounce
        self.then_flush = then_flush
        self.result = 0
        self.remaining = 0
        self.allocs = None
        self.length = 0


class BlockBackend:
    """The device-facing root of one disk's block graph.

    ``image``: what to open, in QEMU's spellings (graph.py): a filename (the
    format probed unless ``fmt`` is given), a ``json:{...}`` filename, or the
    nested options of the root node. ``name`` names the root node (``disk0``;
    its children are ``disk0/file``, ...). ``self.root`` is the graph's root;
    ``self.driver`` the node that maps guest ranges (the root, or the node
    below the root's filters)."""

    def __init__(self, image, fmt: str | None = None, cache: str = "writeback",
                 read_only: bool = False, discard: str = "unmap", engine=None,
                 detect_zeroes: str = "off", name: str = "", throttle=None):
        what = image if isinstance(image, str) else f"node '{name}'"
        if cache not in CACHE_MODES:
            raise BlockError(what, f"unknown cache mode {cache!r} (one of {', '.join(CACHE_MODES)})")
        if discard not in DISCARD_MODES:
            raise BlockError(what, f"unknown discard mode {discard!r} (ignore or unmap)")
        if detect_zeroes not in DETECT_ZEROES_MODES:
            raise BlockError(what, f"unknown detect-zeroes mode {detect_zeroes!r} "
                             f"(off, on or unmap)")
        if fmt is not None and fmt not in FORMATS:
            raise BlockError(what, f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
        self.cache = CACHE_MODES[cache]
        self.cache_name = cache
        spec = image_spec(image, fmt)
        # the image locks of a VM's disk, as QEMU takes them (block/locking.py)
        self.name = name or "disk0"        # the device's disk (QMP's device argument)
        self.root = open_node(spec, read_only=read_only, direct=self.cache.direct, name=name,
                              use=disk_use(not read_only))
        self.driver = self.root
        groups = []
        while self.driver.kind == "filter":
            if self.driver.format_name == "throttle":
                groups.append(self.driver)
            self.driver = self.driver.file
        if groups and (throttle is not None or len(groups) > 1):
            self.root.close()
            raise GraphError(groups[0].describe(), "a disk takes one throttle group: a "
                             "throttle node and throttling.*, or two throttle nodes, are not "
                             "supported together")
        if groups:
            throttle = groups[0].group
        # a blkdebug node anywhere in the image's graph: its rules apply to the
        # guest's requests, on both paths
        debug = self._one_node("blkdebug", "a disk takes one blkdebug node")
        self.inject = debug.injector if debug else None
        # blklogwrites: the log node, and what each request in flight will log
        # once it completes {token: (kind, offset, data or length, durable)}
        self.wlog = self._one_node("blklogwrites", "a disk takes one blklogwrites node, and "
                                   "not read-only", refused=read_only)
        self._wlog_ops: dict = {}
        # a volatile node (power-cut experiments): what it must learn of each
        # request in flight {token: (kind, seq or flushed set, durable)}
        self.volatile = self._one_node(
            "volatile", "a disk takes one volatile node, not read-only, and with a cache mode "
            "of the page cache (writeback, writethrough or unsafe: it emulates a volatile write "
            "cache)", refused=read_only or self.cache.direct)
        self._vol_ops: dict = {}
        self.format = self.driver.format_name
        self.driver.no_flush = self.cache.no_flush     # (qcow2's own ordering syncs too)
        if not read_only:       # a guest's allocations: a few MiB raised ahead at once
            self.driver.alloc_ahead_bytes = ALLOC_AHEAD
        self.path = self.driver.filename
        self.read_only = read_only
        self.discard_mode = discard
        self.detect_zeroes = detect_zeroes
        self.size = self.driver.size
        self.write_cache = self.cache.writeback
        # A guest must not turn a probed raw image into another format (whose
        # header could name a host file as its backing file): QEMU's rule.
        self._guard_sector0 = self.driver.probed and self.format == "raw"
        self._fast = self.driver.identity_mapped
        # a block device's discard is BLKDISCARD (the node's), not a hole punched
        self._fast_discard = self._fast and self.driver.hole_discard
        self.engine = engine or PythonEngine()
        self.notifier = self.engine.notifier
        self.align = self.driver.request_alignment or \
            (self._probe_alignment() if self.cache.direct else 1)
        self._pending: dict[int, tuple] = {}
        self._deferred: collections.deque = collections.deque()
        self._bounced = 0               # bytes of bounce buffers in flight
        self._next = 1
        self._ready: list[tuple[int, int]] = []
        self.stats = collections.Counter()
        self.flush_error = 0           # errno of the first failed flush (see the module doc)
        # the direct map a device's own I/O thread uses (set_map_listener)
        self._map_listener = None
        self._published: list = []
        self._pub_starts: list[int] = []
        self._pub_version = 0
        self._pub_next = 0.0           # no rebuild before this time.monotonic()
        # throttling.*: a ThrottleGroup (block/throttle.py); reads, writes and
        # write-zeroes that must wait are held in order until their time
        self.throttle = throttle
        self._throttled = ThrottledQueue(throttle, self.notifier, self.stats) if throttle else None
        self._plugged = None           # engine requests held by plug() until unplug()
        # blkdebug on the Python path: requests waiting out a delay or a hang
        # [(due_ns or None, release generation, fn, args)], the hits whose
        # rule acts on the completion {token: (hit, iov)}, completions held
        # [(token, result)] with the first one's hit, and (for a trace) the
        # rule that fired on each request {token: rule}
        self._delayed: list = []
        self._marks: dict = {}
        self._short_reads: dict = {}    # token -> bytes its host read returns (action short)
        self._held_done: list = []
        self._hold_hit = None
        self._hold_due = 0
        self._hold_seen = 0             # release-after: completions since the first held
        self._release_all = False
        self._draining = False
        self._closed = False
        self._cut_held: list = []      # requests after a power cut (dropped at drain)
        self.on_power_cut = None       # callable(message): the VM stops (machine.py)
        self.cut_fired = None          # the message, once a power-cut rule fired
        self.fired: dict | None = None
        if self.inject is not None:
            self.inject.on_release.append(self._released)
            self.inject.on_mark.append(self.mark)

    # -- set-up ------------------------------------------------------------------

    def _one_node(self, driver: str, why: str, refused: bool = False):
        """The graph's one node of ``driver`` (its backing chain aside), or None;
        a second one, or one at all when ``refused``, is a GraphError saying ``why``."""
        from .graph import walk
        nodes = [n for path, _r, n in walk(self.root)
                 if n.format_name == driver and "/backing" not in path]
        if len(nodes) > 1 or (nodes and refused):
            self.root.close()
            raise GraphError(nodes[-1].describe(), why)
        return nodes[0] if nodes else None

    def _probe_alignment(self) -> int:
        """Smallest buffer/offset alignment O_DIRECT accepts on this file (512 or 4096)."""
        buf = mmap.mmap(-1, 8192)
        try:
            view = memoryview(buf)
            for align in (SECTOR, 4096):
                try:
                    os.preadv(self.driver.fd, [view[align:align + align]], 0)
                    return align
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        return 4096
            return 4096
        finally:
            view.release()
            buf.close()

    # -- the direct map ------------------------------------------------------------

    # A rebuild after allocations costs Python time on the thread that serves
    # the punted requests: at least this far apart, and at most 1/20 of the time.
    MAP_REFRESH_MIN = 0.05
    MAP_REFRESH_SHARE = 20

    @property
    def c_may_write(self) -> bool:
        """May a device's own I/O thread write (and flush) without Python? Not
        on a read-only disk, with detect-zeroes, while writes are held volatile
        (its node must see each write). A logged disk's threads log what they
        serve themselves (the node's C writer, ``wlog.c``)."""
        return not self.read_only and self.detect_zeroes == "off" and self.volatile is None

    def direct_extents(self) -> list:
        """The driver's direct extents (driver.DirectExtent) under this backend's
        rules: none writable unless c_may_write (other writes need the backend)."""
        ext = self.driver.direct_extents()
        if not self.c_may_write:
            ext = [e._replace(writable=False) if e.writable else e for e in ext]
        return ext

    def c_path_punts(self) -> list[str]:
        """What a device's own I/O thread sends to Python on this disk, by node
        and why (the graph's nodes, then the backend's own rules)."""
        from .graph import walk
        out = ["discard and write-zeroes (holes and their fallbacks are the backend's)"]
        out += [f"{node.describe()}: {why}" for path, _r, node in walk(self.root)
                if "/backing" not in path for why in node.c_path_punts()]   # (backing: Python's)
        if self.detect_zeroes != "off":
            out.append(f"detect-zeroes={self.detect_zeroes}: every write (Python looks for "
                       f"zeroes)")
        if self._guard_sector0:
            out.append(f"{self.driver.describe()}: writes to sector 0 (a probed raw image: "
                       f"Python refuses another format's header there)")
        return out

    def set_map_listener(self, listener, published=()) -> None:
        """A device's own I/O thread serves what ``published`` (direct_extents())
        maps. ``listener(extents, wait)`` installs a new table; it returns once
        that thread uses it and nothing it mapped with an older table is still
        in flight. From now on, before the driver changes any range it maps
        (discard, write-zeroes, copy-on-write, snapshots), the range leaves the
        table that way; ranges the driver allocates are added after, at most
        every MAP_REFRESH_MIN seconds. None: no listener (the thread stopped)."""
        self._map_listener = listener
        self._published = list(published) if listener else []
        self._pub_starts = [e.offset for e in self._published]
        self._pub_version = self.driver.map_version
        self._pub_next = 0.0
        self.driver.on_unmap = self._unmapping if listener else None

    def _publish(self, extents: list) -> None:
        self._published = extents
        self._pub_starts = [e.offset for e in extents]
        self._map_listener(extents, True)

    def _unmapping(self, offset: int, length: int, writes_only: bool) -> None:
        """The driver's on_unmap: take [offset, offset+length) out of the table
        (``writes_only``: make it read-only there) unless no extent touches it."""
        pub = self._published
        end = offset + length
        i = max(bisect.bisect_right(self._pub_starts, offset) - 1, 0)
        k = i
        hit = False
        while k < len(pub) and pub[k].offset < end:
            e = pub[k]
            if e.offset + e.length > offset and (e.writable or not writes_only):
                hit = True
            k += 1
        if not hit:
            return
        new = pub[:i]
        for e in pub[i:k]:
            e_end = e.offset + e.length
            if e_end <= offset or e.offset >= end:
                new.append(e)
                continue
            if e.offset < offset:
                new.append(e._replace(length=offset - e.offset))
            if writes_only:
                lo, hi = max(e.offset, offset), min(e_end, end)
                new.append(e._replace(offset=lo, length=hi - lo,
                                      host_offset=e.host_offset + lo - e.offset, writable=False))
            if e_end > end:
                new.append(e._replace(offset=end, length=e_end - end,
                                      host_offset=e.host_offset + end - e.offset))
        new.extend(pub[k:])
        self._publish(new)

    def refresh_map(self, force: bool = False) -> bool:
        """Give the listener a table with what the driver allocated since the
        last one (rate-limited unless ``force``); True if it published."""
        if self._map_listener is None or self.driver.map_version == self._pub_version:
            return False
        now = time.monotonic()
        if not force and now < self._pub_next:
            return False
        version = self.driver.map_version
        self._publish(self.direct_extents())
        self._pub_version = version
        done = time.monotonic()
        self._pub_next = done + max(self.MAP_REFRESH_MIN, (done - now) * self.MAP_REFRESH_SHARE)
        return True

    # -- submission ----------------------------------------------------------------

    def _id(self, pending: _Pending, iov=None, expected: int = 0) -> int:
        rid = self._next
        self._next = (self._next + 1) & 0x7FFFFFFFFFFFFFFF or 1
        self._pending[rid] = (pending, iov, expected, None)
        return rid

    def plug(self) -> None:
        """Hold the engine requests of the calls that follow until unplug(),
        which submits them as one batch (one io_uring_enter for a burst of
        requests, as QEMU's blk_io_plug). Anything that waits for I/O unplugs."""
        if self._plugged is None:
            self._plugged = []

    def unplug(self) -> None:
        batch, self._plugged = self._plugged, None
        if batch:
            self.engine.submit(batch)

    def _engine_submit(self, batch: list) -> None:
        """Submit engine requests, each kept with its pending entry (a short
        one is continued from it)."""
        pending = self._pending
        for r in batch:
            e = pending.get(r.token)
            if e is not None:
                if self._short_reads and r.op == READ:
                    keep = self._short_reads.pop(e[0].token, None)
                    if keep is not None and keep < iov_length(r.iov):
                        r.iov = iov_slice(r.iov, 0, keep)   # the pending entry expects all
                pending[r.token] = e[:3] + (r,)
        if self._plugged is not None:
            self._plugged.extend(batch)
            return
        self.engine.submit(batch)

    def post(self, token: int, result: int) -> None:
        """Complete request ``token`` with ``result`` without I/O (a device's
        own path did it, and failed: the device's policies decide)."""
        self._complete_now(token, result)

    def flush_failed(self, err: int) -> None:
        """A flush of this image failed (here, or on a device's own path):
        every later flush fails too, until the image is opened again."""
        if not self.flush_error:
            log.error("%s: flush failed (%s): every later flush of this image fails until "
                      "it is opened again", self.driver.describe(), os.strerror(err))
        self.flush_error = err

    def _complete_now(self, token: int, result: int) -> None:
        self._ready.append((token, result))
        os.eventfd_write(self.notifier, 1)

    def _aligned(self, offset: int, iov) -> bool:
        a = self.align
        if a == 1:
            return True
        if offset % a:
            return False
        for buf in iov:
            if len(buf) % a or int(ffi.cast("uintptr_t", ffi.from_buffer(buf))) % a:
                return False
        return True

    def _warn(self, e: BlockError) -> None:
        """An error of a request, in one line that names the node."""
        log.warning("%s: %s", self.driver.describe(), e)

    def _flush_needed(self) -> bool:
        return not self.write_cache and not self.cache.no_flush

    # -- blkdebug (block/inject.py) on the Python path ------------------------------

    def _injected(self, token: int, op: str, offset: int, length: int, queue: int, iov,
                  fn, *args) -> bool:
        """Ask the rules about a request; True when a rule took care of it
        (completed it, or keeps it waiting; ``fn(*args)`` starts it later)."""
        hit = self.inject.check(op, offset, length, queue)
        if hit is None:
            return False
        self.stats["injected"] += 1
        if self.fired is not None:
            self.fired[token] = hit.rule
        a = hit.action
        if a == "error":
            self._complete_now(token, -(hit.value or errno.EIO))
        elif a == "status":
            self._complete_now(token, -errno.EOPNOTSUPP if hit.value == 2 else -errno.EIO)
        elif a == "drop":
            self._complete_now(token, length)
        elif a == "zero":
            iov_zero(iov)
            self._complete_now(token, length)
        elif a == "torn":
            keep = hit.value * SECTOR // self.align * self.align
            if not keep:
                self._complete_now(token, length)
            elif keep >= length:
                return False
            else:
                fn(token, offset, iov_slice(iov, 0, keep))
        elif a == "short":
            keep = hit.value * SECTOR // self.align * self.align
            if keep and keep < length:
                self._short_reads[token] = keep     # _engine_submit cuts its first piece
            return False
        elif a in ("corrupt", "hold"):
            self._marks[token] = (hit, iov)
            return False
        elif a == "power-cut":
            self._cut_held.append(token)        # never lands, never completes
            self.power_cut_fired(hit.rule, hit.value, bool(hit.order), hit.seed)
        elif a in ("delay", "hang"):
            due = time.monotonic_ns() + hit.delay_ns if a == "delay" else None
            self._delayed.append((due, self.inject.release_gen, fn, args))
            if due is not None:
                _WAKER.at(due, self._wake)
        return True

    def _wake(self) -> None:
        if not self._closed:
            os.eventfd_write(self.notifier, 1)

    def _released(self) -> None:
        """Injector.release(): hung requests and held completions go."""
        self._release_all = True
        self._wake()

    def _run_delayed(self, force: bool = False) -> None:
        now = time.monotonic_ns()
        gen = self.inject.release_gen
        go, keep = [], []
        for item in self._delayed:
            due, g, fn, args = item
            (go if force or (due is not None and due <= now) or (due is None and g != gen)
             else keep).append(item)
        self._delayed = keep
        for _due, _g, fn, args in go:
            fn(*args)

    def _apply_marks(self, done: list) -> list:
        """Completions of requests a corrupt or hold rule fired on."""
        from .inject import flip_positions
        out = []
        for token, result in done:
            mark = self._marks.pop(token, None)
            if mark is None or result < 0:
                out.append((token, result))
                if self._held_done and self._hold_hit.release_after:
                    self._hold_seen += 1        # release-after: one more completed
                    if self._hold_seen >= self._hold_hit.release_after:
                        out += self._release_held()
                continue
            hit, iov = mark
            if hit.action == "corrupt":
                _flip(iov, flip_positions(hit.seed, hit.value, iov_length(iov)))
                out.append((token, result))
            elif self._draining:
                out.append((token, result))
            else:
                if not self._held_done:
                    self._hold_hit = hit
                    self._hold_seen = 0
                    self._hold_due = time.monotonic_ns() + hit.timeout_ns if hit.timeout_ns else 0
                    if self._hold_due:
                        _WAKER.at(self._hold_due, self._wake)
                self._held_done.append((token, result))
                if len(self._held_done) >= max(1, self._hold_hit.value):
                    out += self._release_held()
        return out

    def _release_held(self) -> list:
        from .inject import ORDERS, shuffle
        held, self._held_done = self._held_done, []
        order = self._hold_hit.order
        if self._hold_hit.order_list:
            # the positions named (those past what was held: skipped), then the rest
            first = [p for p in self._hold_hit.order_list if p < len(held)]
            held = [held[p] for p in first] + \
                [h for i, h in enumerate(held) if i not in first]
        elif order == ORDERS["reverse"]:
            held.reverse()
        elif order == ORDERS["random"]:
            held = [held[i] for i in shuffle(self._hold_hit.seed, len(held))]
        self._hold_due = 0
        return held

    def _inject_reap(self, out: list) -> list:
        if self._delayed:
            self._run_delayed(self._draining or self._release_all)
            self._collect()
            out += self._ready
            self._ready = []
        if self._marks or (self._held_done and self._hold_hit.release_after):
            out = self._apply_marks(out)
        if self._held_done and (self._draining or self._release_all or
                                (self._hold_due and time.monotonic_ns() >= self._hold_due)):
            out += self._release_held()
        self._release_all = False
        return out

    def _wlog_reap(self, done: list) -> None:
        """blklogwrites: hand the node what completed (block/filters/blklogwrites.py)."""
        w = self.wlog
        for token, result in done:
            op = self._wlog_ops.pop(token, None)
            if op is None:
                continue
            kind, offset, x, durable = op
            if kind == "f":
                w.flush_done(x, result >= 0)
            elif result < 0:
                continue
            elif kind in ("w", "z") and ((offset | (len(x) if kind == "w" else x)) %
                                         w.sector_size):
                w.completed_write(*self._wlog_widened(offset, len(x) if kind == "w" else x),
                                  durable)
            elif kind == "w":
                w.completed_write(offset, x, durable)
            elif kind == "z":
                w.completed_zeroes(offset, x, durable)
            else:
                w.completed_discard(offset, x)

    def mark(self, name: str) -> dict:
        """A named point of the run (the API's ``mark()``, QMP's ``log-mark``):
        written into the write log, and raised to the rules waiting for it (a
        power cut at a mark happens here). What it reached: ``logged``, and
        ``rules``, how many rules it armed or fired."""
        from .inject import _mark_name
        try:
            _mark_name(name)
        except ValueError as e:
            raise GraphError(self.root.describe(), f"mark {name[:80]!r}: {e}") from None
        waiting = [i for i, r in enumerate(self.inject.rules) if r.mark == name] \
            if self.inject is not None else []
        if self.wlog is None and not waiting:
            raise GraphError(self.root.describe(), f"mark {name!r}: the disk has no "
                             "blklogwrites node and no rule waits for this mark")
        if self.wlog is not None:
            self.wlog.mark(name)
        for i in self.inject.mark(name) if self.inject is not None else []:
            self._cut_by_rule(i)
        return {"logged": self.wlog is not None, "rules": len(waiting)}

    def start_clock(self) -> None:
        """The run starts: rules with a ``time`` count from now."""
        if self.inject is not None:
            self.inject.start_clock(self._cut_by_rule)

    def _cut_by_rule(self, i: int) -> None:
        r = self.inject.rules[i]
        self.power_cut_fired(i, r.value, bool(r.order_value), r.seed)

    def _wlog_widened(self, offset: int, length: int) -> tuple[int, bytes]:
        """A write not aligned to the log's sectors (an NBD client's few bytes of
        qcow2 metadata): the sectors it touches, as they read now that it has
        completed (dm-log-writes sees whole sectors only; QEMU pads such a write
        with a read-modify-write instead). A write to the same sectors in flight
        at the same time may show in them too; qcow2's metadata writes, the
        case this is for, go one at a time."""
        from .driver import fd_pread
        ss = self.wlog.sector_size
        lo, hi = offset // ss * ss, -(-(offset + length) // ss) * ss
        if not self.driver.identity_mapped:
            raise GraphError(self.wlog.describe(), f"a write at {offset} of {length} bytes is "
                             f"not aligned to log-sector-size={ss}")
        data = fd_pread(self.driver.fd, hi - lo, lo)
        return lo, data + bytes(hi - lo - len(data))

    def power_cut_fired(self, rule: int, keep: int, torn: bool, seed: int) -> None:
        """A blkdebug power-cut rule fired (on either path): from now on no request
        lands; the VM is told to stop; a volatile node is left as ``keep`` says."""
        if self.cut_fired is not None:
            return
        from .inject import KEEPS
        where = self.inject.rules[rule].where if self.inject and rule < len(self.inject.rules) \
            else f"rule {rule}"
        self.cut_fired = (f"{self.root.describe()}: power cut by the blkdebug rule at {where}"
                          + (f"; the image is left as keep={KEEPS[keep]} says"
                             if self.volatile is not None else ""))
        if self.volatile is not None:
            self.volatile.cut = (KEEPS[keep], seed, torn)
        if self.on_power_cut is not None:
            self.on_power_cut(self.cut_fired)       # (the VM stops and says so)
        else:
            log.warning("%s", self.cut_fired)

    def _vol_zeroes(self, token: int, offset: int, length: int) -> None:
        """Discard and write-zeroes, for the volatile node: writes of zeroes
        (one legal outcome), held as any write; a range larger than the node
        may hold is made durable at once (one log line)."""
        if length > self.volatile.max:
            log.warning("%s: a %d-byte discard or write-zeroes is more than volatile-max: "
                        "it is durable at once", self.volatile.describe(), length)
            return
        self._vol_ops[token] = (self.volatile.before_write(self.driver, offset, bytes(length)),
                                self._flush_needed())

    def _vol_reap(self, done: list) -> None:
        v = self.volatile
        for token, result in done:
            op = self._vol_ops.pop(token, None)
            if op is None:
                continue
            x, durable = op
            if durable is None:
                v.flush_done(x, result >= 0)
            else:
                v.completed(x, result >= 0, durable)

    def power_cut(self, keep: str = "flushed", seed: int = 0, torn: bool = False) -> dict:
        """The disk loses power (its device stopped): the volatile node leaves
        the image in a crash state the model allows (block/filters/volatile.py)."""
        if self.volatile is None:
            raise GraphError(self.root.describe(), "power_cut needs a volatile node "
                             "(driver=volatile)")
        self.drain()
        return self.volatile.power_cut(self.driver, keep, seed, torn)

    def get_id_injected(self, token: int, queue: int = 0) -> bool:
        """A GET_ID request: True when a rule answers it (an error or a status,
        completing as ``token``); False: the device answers with its serial."""
        return self._injected(token, "get-id", 0, 0, queue, [], None)

    # -- requests ---------------------------------------------------------------------

    def readv(self, token: int, offset: int, iov: list, queue: int = 0) -> None:
        """Read into ``iov``; ``queue``: the device queue it came from (rules match it)."""
        if self.inject is not None and self._injected(token, "read", offset, iov_length(iov),
                                                      queue, iov, self._read, token, offset,
                                                      iov):
            return
        self._read(token, offset, iov)
        if self._short_reads:
            self._short_reads.pop(token, None)  # (one with no host read: nothing to cut)

    def _read(self, token: int, offset: int, iov: list) -> None:
        if self._throttled and self._throttled.hold(False, iov_length(iov), self._readv,
                                                    token, offset, iov):
            return
        self._readv(token, offset, iov)

    def _readv(self, token: int, offset: int, iov: list) -> None:
        self.stats["read"] += 1
        bounce = None
        if not self._aligned(offset, iov):
            total = iov_length(iov)
            if offset % self.align or total % self.align:
                self._complete_now(token, -errno.EINVAL)  # smaller than the advertised block size
                return
            if self._bounce_waits(total, ("read", token, offset, iov)):
                self.stats["read"] -= 1
                return
            bounce = self._bounce(total)
        run = [bounce.view] if bounce else iov
        if self._fast:
            p = _Pending(token, READ, iov=iov, bounce=bounce)
            p.remaining = 1
            p.length = total = iov_length(run)
            self._engine_submit([AioRequest(READ, self.driver.fd, offset, run,
                                           self._id(p, run, total))])
            return
        p = _Pending(token, READ, iov=iov, bounce=bounce)
        p.length = total = iov_length(iov)
        host = self.driver.data_at(offset, total)
        if host >= 0:       # one allocated cluster: a single request, as for raw
            p.remaining = 1
            self._engine_submit([AioRequest(READ, self.driver.fd, host, run,
                                           self._id(p, run, total))])
            return
        reqs: list = []
        try:
            self._map_read(self.driver, offset, run, reqs)
        except BlockError as e:
            self._warn(e)
            if bounce:
                self._unbounce(bounce)
            self._complete_now(token, -errno.EIO)
            return
        self._launch(p, reqs)

    def _map_read(self, drv, offset: int, iov, reqs: list) -> None:
        """Split a read along the driver's map; fill what needs no I/O now and
        collect (fd, host offset, iov) for the rest."""
        length = iov_length(iov)
        inside = max(0, min(length, drv.size - offset))
        if inside < length:
            iov_zero(iov_slice(iov, inside, length - inside))
        if inside <= 0:
            return
        for e in drv.map(offset, inside):
            sub = iov_slice(iov, e.offset - offset, e.length)
            kind = e.kind
            if kind == "data":
                reqs.append((READ, e.fd, e.host_offset, sub))
            elif kind == "compressed":
                iov_copy_in(sub, drv.read_compressed(e))
            elif kind == "unallocated" and drv.backing is not None:
                self._map_read(drv.backing, e.offset, sub, reqs)
            else:
                iov_zero(sub)

    def _launch(self, p: _Pending, reqs: list) -> None:
        """Submit a mapped request's pieces (or complete it if there are none)."""
        p.remaining = len(reqs)
        if not reqs:
            done = self._done(p)
            if done is not None:
                self._ready.append(done)
                os.eventfd_write(self.notifier, 1)
            return
        batch = []
        for op, fd, host, sub in reqs:
            batch.append(AioRequest(op, fd, host, sub, self._id(p, sub, iov_length(sub))))
        self._engine_submit(batch)

    def writev(self, token: int, offset: int, iov: list, queue: int = 0) -> None:
        if self.inject is not None and self._injected(token, "write", offset, iov_length(iov),
                                                      queue, iov, self._writev_go, token,
                                                      offset, iov):
            return
        self._writev_go(token, offset, iov)

    def _writev_go(self, token: int, offset: int, iov: list) -> None:
        if self.wlog is not None:
            self._wlog_ops[token] = ("w", offset, bytes(_joined(iov)), self._flush_needed())
        if self.volatile is not None:
            self._vol_ops[token] = (self.volatile.before_write(self.driver, offset,
                                                               bytes(_joined(iov))),
                                    self._flush_needed())
        if self._throttled and self._throttled.hold(True, iov_length(iov), self._writev,
                                                    token, offset, iov):
            return
        self._writev(token, offset, iov)

    def _writev(self, token: int, offset: int, iov: list) -> None:
        self.stats["write"] += 1
        if self.read_only:
            self._complete_now(token, -errno.EROFS)
            return
        if self._guard_sector0 and offset == 0 and self._writes_foreign_header(iov):
            log.warning("%s: refused a write of another format's header to sector 0 of a "
                        "probed raw image (give format=raw to allow it)", self.path)
            self._complete_now(token, -errno.EPERM)
            return
        if self.detect_zeroes != "off" and iov_is_zero(iov):
            self.stats["write"] -= 1
            self.stats["detected_zeroes"] += 1
            self._write_zeroes(token, offset, iov_length(iov), self.detect_zeroes == "unmap")
            return
        self._write(token, offset, iov)

    def _write(self, token: int, offset: int, iov: list) -> None:
        flush = self._flush_needed()
        bounce = None
        if not self._aligned(offset, iov):
            total = iov_length(iov)
            if offset % self.align or total % self.align:
                self._complete_now(token, -errno.EINVAL)
                return
            if self._bounce_waits(total, ("write", token, offset, iov)):
                return
            bounce = self._bounce(total)
            pos = 0
            for buf in iov:     # piece by piece: no joined copy of a large request
                bounce.view[pos:pos + len(buf)] = buf
                pos += len(buf)
        run = [bounce.view] if bounce else iov
        if self._fast:
            p = _Pending(token, WRITE, bounce=bounce, then_flush=flush)
            p.remaining = 1
            p.length = iov_length(run)
            self._engine_submit([AioRequest(WRITE, self.driver.fd, offset, run,
                                           self._id(p, run, iov_length(run)))])
            return
        p = _Pending(token, WRITE, bounce=bounce, then_flush=flush)
        p.length = total = iov_length(iov)
        host = self.driver.data_at(offset, total, write=True)
        if host >= 0:       # in place, in one allocated cluster
            p.remaining = 1
            self._engine_submit([AioRequest(WRITE, self.driver.fd, host, run,
                                           self._id(p, run, total))])
            return
        try:
            reqs = self._map_write(p, offset, run)
        except WriteBusy:
            if bounce:
                self._unbounce(bounce)
            self._deferred.append(("write", token, offset, iov))
            return
        except BlockError as e:
            self._warn(e)
            if bounce:
                self._unbounce(bounce)
            self._complete_now(token, -errno.EIO)
            return
        self._launch(p, reqs)

    def _map_write(self, p: _Pending, offset: int, iov) -> list:
        plan = self.driver.map_for_write(offset, iov_length(iov))
        if plan.alloc is not None:
            if p.allocs is None:
                p.allocs = []
            p.allocs.append(plan.alloc)
        return [(WRITE, e.fd, e.host_offset, iov_slice(iov, e.offset - offset, e.length))
                for e in plan.extents]

    def _writes_foreign_header(self, iov) -> bool:
        head = bytes(_joined(iov_slice(iov, 0, min(4096, iov_length(iov)))))
        return any(cls.probe(head, self.path) > 1 for name, cls in FORMATS.items()
                   if name != "raw")

    def flush(self, token: int, queue: int = 0) -> None:
        if self.inject is not None and self._injected(token, "flush", 0, 0, queue, [],
                                                      self._flush_go, token):
            return
        self._flush_go(token)

    def _flush_go(self, token: int) -> None:
        if self.wlog is not None and not self.cache.no_flush:   # (unsafe: never durable)
            self._wlog_ops[token] = ("f", 0, self.wlog.flush_started(), False)
        if self.volatile is not None and not self.cache.no_flush:
            self._vol_ops[token] = (self.volatile.flush_started(), None)
        self.stats["flush"] += 1
        if self.cache.no_flush:
            self._complete_now(token, 0)
            return
        p = _Pending(token, FLUSH)
        self._submit_flush(p)

    def _submit_flush(self, p: _Pending) -> None:
        """Format metadata first, then fdatasync every file the driver writes
        (after a failed flush: EIO, see the module doc)."""
        if self.flush_error:
            p.result = -errno.EIO
            p.remaining = 0
            self._ready.append(self._done(p))
            os.eventfd_write(self.notifier, 1)
            return
        try:
            self.driver.flush_metadata()
        except (BlockError, OSError) as e:
            log.warning("%s: flushing metadata: %s", self.driver.describe(), e)
            p.result = -errno.EIO
            self.flush_failed(errno.EIO)
        fds = self.driver.sync_fds
        p.remaining = len(fds)
        self._engine_submit([AioRequest(FLUSH, fd, token=self._id(p)) for fd in fds])

    def discard(self, token: int, offset: int, length: int, queue: int = 0) -> None:
        """Give the range back to the host (discard=unmap); advisory, never fails
        for lack of support."""
        if self.inject is not None and self._injected(token, "discard", offset, length, queue,
                                                      [], self._discard_go, token, offset,
                                                      length):
            return
        self._discard_go(token, offset, length)

    def _discard_go(self, token: int, offset: int, length: int) -> None:
        if self.wlog is not None and self.discard_mode == "unmap":
            self._wlog_ops[token] = ("d", offset, length, False)
        if self.volatile is not None and self.discard_mode == "unmap":
            self._vol_zeroes(token, offset, length)
        self.stats["discard"] += 1
        if self.read_only:
            self._complete_now(token, -errno.EROFS)
            return
        if self.discard_mode == "ignore" or length == 0:
            self._complete_now(token, 0)
            return
        if self._fast_discard:
            p = _Pending(token, "discard")
            p.remaining = 1
            self._engine_submit([AioRequest(FALLOCATE, self.driver.fd, offset, token=self._id(p),
                                           mode=lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE,
                                           length=length)])
            return
        self._quiesce()
        try:
            self.driver.discard(offset, length, punch=True)
            result = 0
        except BlockError as e:
            self._warn(e)
            result = -errno.EIO
        self._complete_now(token, result)

    def secure_erase(self, token: int, offset: int, length: int, queue: int = 0) -> None:
        """VIRTIO_BLK_T_SECURE_ERASE: the range must never read back its old data,
        from the guest or from the host's files. The host bytes that hold only
        this range's data (driver.erase_extents) are overwritten with zeroes and
        synced, then the range is zeroed with unmap: a hole in a raw file, zero
        entries in qcow2 (which a backing file's data does not show through) and
        its clusters freed. A cluster shared with another offset or a snapshot
        is not overwritten: it still holds their data. Rules match it as a
        write-zeroes; done synchronously (the request is at most 64 MiB)."""
        if self.read_only:
            self._complete_now(token, -errno.EROFS)
            return
        if self.inject is not None and self._injected(token, "write-zeroes", offset, length,
                                                      queue, [], self._secure_erase, token,
                                                      offset, length):
            return
        self._secure_erase(token, offset, length)

    def _secure_erase(self, token: int, offset: int, length: int) -> None:
        self.stats["secure_erase"] += 1
        try:
            fds = set()
            for fd, host, n in self.driver.erase_extents(offset, length):
                zero = memoryview(bytes(min(n, ZERO_CHUNK)))
                pos = 0
                while pos < n:
                    k = min(n - pos, len(zero))
                    pwrite_full(fd, zero[:k], host + pos)
                    pos += k
                fds.add(fd)
            if not self.cache.no_flush:
                for fd in fds:
                    fd_datasync(fd)
        except (OSError, BlockError) as e:
            err = e.errno if isinstance(e, OSError) else (e.errno or errno.EIO)
            self._complete_now(token, -(err or errno.EIO))
            return
        self._write_zeroes_go(token, offset, length, True)

    def write_zeroes(self, token: int, offset: int, length: int, unmap: bool,
                     queue: int = 0, no_fallback: bool = False) -> None:
        """Zero a range: punch a hole when the guest allows unmapping and
        discard=unmap, else allocate zeroes (falling back to writing them).
        Mapped formats describe whole clusters as zero and write the rest.
        ``no_fallback`` (NBD's FAST_ZERO, QEMU's BDRV_REQ_NO_FALLBACK): fail
        with EOPNOTSUPP rather than write zeroes as data. Throttled as a write
        of ``length`` bytes, as QEMU does."""
        if self.inject is not None and self._injected(token, "write-zeroes", offset, length,
                                                      queue, [], self._write_zeroes_go, token,
                                                      offset, length, unmap, no_fallback):
            return
        self._write_zeroes_go(token, offset, length, unmap, no_fallback)

    def _write_zeroes_go(self, token: int, offset: int, length: int, unmap: bool,
                         no_fallback: bool = False) -> None:
        if self.wlog is not None:
            self._wlog_ops[token] = ("z", offset, length, self._flush_needed())
        if self.volatile is not None:
            self._vol_zeroes(token, offset, length)
        if self._throttled and self._throttled.hold(True, length, self._write_zeroes,
                                                    token, offset, length, unmap, no_fallback):
            return
        self._write_zeroes(token, offset, length, unmap, no_fallback)

    def _write_zeroes(self, token: int, offset: int, length: int, unmap: bool,
                      no_fallback: bool = False) -> None:
        self.stats["write_zeroes"] += 1
        if self.read_only:
            self._complete_now(token, -errno.EROFS)
            return
        if length == 0:
            self._complete_now(token, 0)
            return
        punch = unmap and self.discard_mode == "unmap"
        flush = self._flush_needed()
        if self._fast:
            mode = (lib.FALLOC_FL_PUNCH_HOLE if punch else lib.FALLOC_FL_ZERO_RANGE) | \
                lib.FALLOC_FL_KEEP_SIZE
            p = _Pending(token, "write_zeroes", then_flush=flush)
            p.iov = (offset, length) if not no_fallback else None  # kept for the write fallback
            p.remaining = 1
            self._engine_submit([AioRequest(FALLOCATE, self.driver.fd, offset, token=self._id(p),
                                           mode=mode, length=length)])
            return
        if offset % self.align or length % self.align:
            # the zeroes it writes as data would fail (O_DIRECT) after the
            # driver changed its metadata: refused first, as readv and writev do
            self._complete_now(token, -errno.EINVAL)
            return
        self._quiesce()
        p = _Pending(token, WRITE, then_flush=flush)
        try:
            reqs = []
            rest = self.driver.write_zeroes(offset, length, punch)
            if rest and no_fallback:
                self._complete_now(token, -errno.EOPNOTSUPP)
                return
            for off, n in rest:
                reqs += self._map_write(p, off, _zero_iov(n))
        except BlockError as e:
            self._warn(e)
            for a in p.allocs or ():
                self.driver.abort(a)
            self._complete_now(token, -errno.EIO)
            return
        p.length = 0
        self._launch(p, reqs)

    # -- completion ------------------------------------------------------------------

    def reap(self) -> list[tuple[int, int]]:
        """Completed requests as (token, result); never blocks (beyond handing a
        device's I/O thread a new direct map, see set_map_listener)."""
        self._collect()
        if self._throttled:
            # held requests whose time has come: after _collect, which reads the
            # notifier, so a wake-up written since is either seen here or polled
            self._throttled.release()
        out, self._ready = self._ready, []
        if self.inject is not None:
            out = self._inject_reap(out)
        if self._wlog_ops:
            self._wlog_reap(out)
        if self._vol_ops:
            self._vol_reap(out)
        if self._map_listener is not None:
            self.refresh_map()
        return out

    def _collect(self) -> None:
        """Take the engine's completions; finished requests go to ``_ready``."""
        ready = self._ready
        for rid, result in self.engine.reap():
            entry = self._pending.pop(rid, None)
            if entry is None:
                continue
            p, iov, expected, req = entry
            if result < 0:
                if p.result >= 0:
                    p.result = result
                if req is not None and req.op == FLUSH:
                    self.flush_failed(-result)
            elif iov is not None and result < expected and req is not None and \
                    req.op in (READ, WRITE) and self._short(p, req, iov, expected, result):
                continue                          # the rest is with the engine
            p.remaining -= 1
            if p.remaining == 0:
                done = self._done(p)
                if done is not None:
                    ready.append(done)

    def _done(self, p: _Pending):
        """All pieces of a request are back: commit, flush, or report it."""
        result = p.result
        if p.op == READ:
            if p.bounce is not None:
                if result >= 0:
                    iov_copy_in(p.iov, p.bounce.view)
                self._unbounce(p.bounce, retry=True)
            return p.token, result if result < 0 else p.length
        if p.op == WRITE:
            if p.bounce is not None:
                self._unbounce(p.bounce, retry=True)
                p.bounce = None
            if p.allocs:
                for a in p.allocs:
                    if result >= 0:
                        try:
                            self.driver.commit(a)
                        except BlockError as e:
                            self._warn(e)
                            result = p.result = -errno.EIO
                    else:
                        self.driver.abort(a)
                p.allocs = None
                self._retry_deferred()
            if result >= 0:
                result = p.length
        elif p.op == "discard" and result in (-errno.EOPNOTSUPP, -errno.ENOSYS):
            result = 0  # discard is a hint
        elif p.op == "write_zeroes" and result in (-errno.EOPNOTSUPP, -errno.ENOSYS,
                                                   -errno.EINVAL) and isinstance(p.iov, tuple):
            offset, length = p.iov
            p.iov = None
            p.op = WRITE
            p.result = 0
            p.remaining = 1
            self._engine_submit([AioRequest(WRITE, self.driver.fd, offset, _zero_iov(length),
                                           self._id(p))])
            return None
        elif p.op == "write_zeroes" and result in (-errno.ENOSYS, -errno.EINVAL):
            result = -errno.EOPNOTSUPP    # no_fallback: the file system cannot zero quickly
        if p.then_flush and result >= 0:
            p.then_flush = False
            p.length = result
            p.op = "flush-after"
            self._submit_flush(p)
            return None
        if p.op == "flush-after":
            result = p.length if result >= 0 else result
        return p.token, result

    def _retry_deferred(self) -> None:
        """Writes that waited for an allocation to commit, and requests that waited
        for bounce buffers: try them again, in order."""
        for _ in range(len(self._deferred)):
            kind, token, offset, iov = self._deferred.popleft()
            if kind == "read":
                self._readv(token, offset, iov)
            else:
                self._write(token, offset, iov)

    def _bounce_waits(self, size: int, request: tuple) -> bool:
        """True (the request is deferred) if a bounce buffer of ``size`` would take
        those in flight past MAX_BOUNCE_BYTES."""
        if self._bounced and self._bounced + size > MAX_BOUNCE_BYTES:
            self._deferred.append(request)
            return True
        return False

    def _bounce(self, size: int) -> "_Bounce":
        self._bounced += size
        return _Bounce(size, self.align)

    def _unbounce(self, bounce: "_Bounce", retry: bool = False) -> None:
        """A bounce buffer is done; with ``retry`` (a completion) the requests that
        waited for one go again."""
        self._bounced -= len(bounce.view)
        bounce.close()
        if retry and self._deferred:
            self._retry_deferred()

    def _quiesce(self) -> None:
        """Wait until no I/O is in flight (completions are kept for reap())."""
        if not self._pending and not self._deferred:
            return
        # unplugged while it waits: what the completions submit (an allocating
        # write's next step) must reach the engine, not a batch held until later
        plugged, self._plugged = self._plugged, None
        if plugged:
            self.engine.submit(plugged)
        try:
            poller = select.poll()
            poller.register(self.notifier, select.POLLIN)
            while self._pending or self._deferred:
                if not self._pending:
                    self._retry_deferred()
                    continue
                poller.poll(1000)
                self._collect()
        finally:
            if plugged is not None:
                self._plugged = []
        if self._ready:
            os.eventfd_write(self.notifier, 1)

    def _short(self, p: _Pending, req, iov, expected: int, done: int) -> bool:
        """A short read or write: submit the rest (True), or zero-fill a read
        that reached the end of its file, or fail one that made no progress."""
        if req.op == READ:
            try:
                end = os.lseek(req.fd, 0, os.SEEK_END)
            except OSError:
                end = 0
            if req.offset + done >= end:
                self._zero_tail(iov, done)        # past the end of the file: zeroes
                return False
        if done <= 0:
            if p.result >= 0:
                p.result = -errno.EIO
            log.warning("%s: %s at %d made no progress (%d of %d bytes)",
                        self.driver.describe(), "read" if req.op == READ else "write",
                        req.offset, done, expected)
            return False
        self.stats["short_" + ("read" if req.op == READ else "write")] += 1
        rest = iov_slice(iov, done, expected - done)
        self._engine_submit([AioRequest(req.op, req.fd, req.offset + done, rest,
                                        self._id(p, rest, expected - done))])
        return True

    @staticmethod
    def _zero_tail(iov, done: int) -> None:
        pos = 0
        for b in iov:
            if pos + len(b) > done:
                start = max(0, done - pos)
                iov_zero([b[start:]])
            pos += len(b)

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._deferred) + len(self._delayed) + \
            len(self._cut_held) + \
            len(self._held_done) + (self._throttled.held if self._throttled else 0)

    def drain(self) -> list[tuple[int, int]]:
        """Wait until nothing is in flight; return what completed meanwhile.
        Throttled requests held go at once (QEMU's drain does the same)."""
        self.unplug()
        if self._throttled:
            self._throttled.release_all()
        self._draining = True       # delayed, hung and held requests go at once
        self._cut_held = []         # (those after a power cut: never)
        try:
            out = self.reap()
            poller = select.poll()
            poller.register(self.notifier, select.POLLIN)
            while self._pending or self._deferred or self._delayed or self._held_done:
                if not self._pending and self._deferred:
                    self._retry_deferred()
                elif self._pending:
                    poller.poll(1000)
                out += self.reap()
            return out
        finally:
            self._draining = False

    def close(self) -> None:
        self.drain()
        v = self.volatile
        if v is not None and v.plan is not None and v.plan["cut"] is not None:
            v.cut, v.plan["cut"] = v.plan["cut"], None
        if v is not None and v.cut is not None:
            v.last_cut = self.power_cut(*v.cut)         # planned: at close
            if v.plan is not None:
                v.plan["result"] = v.last_cut
        self._closed = True
        if self.inject is not None:
            self.inject.stop_clock()
            if self.mark in self.inject.on_mark:
                self.inject.on_mark.remove(self.mark)
        if self.inject is not None and self._released in self.inject.on_release:
            self.inject.on_release.remove(self._released)
        if self._throttled:
            self._throttled.close()
        self.engine.close()
        self.root.close()


def _flip(iov, positions) -> None:
    """Flip the bits at ``positions`` (bit numbers from the start) of an I/O vector."""
    for pos in positions:
        byte = pos // 8
        for b in iov:
            if byte < len(b):
                b[byte] ^= 1 << pos % 8
                break
            byte -= len(b)


def _zero_iov(length: int) -> list:
    iov = []
    while length:
        n = min(length, ZERO_CHUNK)
        iov.append(memoryview(_ZEROES)[:n])
        length -= n
    return iov


def _joined(iov):
    """The bytes of an I/O vector as one buffer (copied only if it has several pieces)."""
    return memoryview(b"".join(bytes(b) for b in iov)) if len(iov) != 1 else iov[0]


class _Bounce:
    """An aligned host buffer for O_DIRECT requests whose guest buffers are not."""

    def __init__(self, size: int, align: int):
        self.map = mmap.mmap(-1, max(size, align))   # page-aligned
        self.view = memoryview(self.map)[:size]

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            # A mapped request's pieces are slices of ``view``; one may still be
            # referenced (the completion being handled, an engine's last
            # request): the mapping goes when the last slice does.
            pass
