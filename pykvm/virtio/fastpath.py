"""The C fast path of virtio-blk (native/blk.c): its control plane in Python.

At DRIVER_OK, a VirtioBlk whose disk uses a C engine (aio=threads, native or
io_uring) starts a ``FastPath`` instead of its Python I/O thread. The C
thread gets the whole contract of a virtio device: the guest memory table, the
activated queues, their kick eventfds, the call eventfds, a mapping table
(virtual disk range -> host fd and offset) and an engine name. It pops,
parses, submits, completes and interrupts without the GIL.

Python keeps one helper thread per device for what C hands back through the
punt queue:

- requests C does not serve (discard, write zeroes, unmapped or misaligned
  ranges, flushes of formats with metadata): served by VirtioBlk's own
  request code against the BlockBackend, then given back to C, which adds
  the used element and decides on the interrupt;
- the log line of a bad request or an I/O error (C wrote the status; the
  used element follows the log line);
- requests the host failed (PUNT_ERROR, with the errno) or did short
  (PUNT_SERVE again): VirtioBlk applies the disk's werror/rerror, or does
  the I/O again; once a flush failed, C gives every later flush to Python
  (the backend fails it: see block/backend.py, host errors);
- fatal errors (a broken ring, a chain without a status byte): ``fail()``,
  i.e. DEVICE_NEEDS_RESET with one log line;
- interrupts for queues without a direct call eventfd (a masked MSI-X vector,
  or virtio-MMIO, whose InterruptStatus bit Python must set): forwarded to
  ``Interrupt.signal_queue``.

``stop()`` stops popping, waits for the engine's requests in flight (their
results are dropped: the queues are being reset) and joins both threads.
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time

from .._native import ffi, lib
from ..errors import PykvmError
from .queue import Chain, QueueError

log = logging.getLogger("pykvm.virtio")

C_ENGINES = ("threads", "native", "io_uring")
# QEMU's default poll-max-ns for an iothread
POLL_MAX_NS = int(os.environ.get("PYKVM_POLL_MAX_NS", "32768"))
COUNTERS = ("requests", "bytes_read", "bytes_written", "errors", "submitted", "flushes",
            "batches", "completions", "completion_batches", "interrupts", "interrupts_suppressed",
            "punts", "poll_hits", "sleeps", "interrupts_deferred", "throttled", "injected")
EXTENT_WRITABLE = lib.PYKVM_BLK_EXTENT_WRITABLE


class FastPathError(PykvmError):
    """The C I/O thread could not start (one line why)."""


class Extent:
    """Virtual disk bytes [offset, offset+length) at ``host_offset`` in ``fd``."""

    __slots__ = ("fd", "host_offset", "length", "offset", "writable")

    def __init__(self, offset: int, length: int, fd: int, host_offset: int, writable: bool):
        self.offset = offset
        self.length = length
        self.fd = fd
        self.host_offset = host_offset
        self.writable = writable


def _extent_table(extents):
    table = ffi.new("struct pykvm_blk_extent[]", max(1, len(extents)))
    for c, e in zip(table, sorted(extents, key=lambda e: e.offset)):
        c.offset, c.length, c.fd, c.host_offset = e.offset, e.length, e.fd, e.host_offset
        c.flags = EXTENT_WRITABLE if e.writable else 0
    return table


def c_queue(mem, q):
    """A C queue (struct pykvm_vq) configured and activated like SplitQueue ``q``;
    raises ValueError with the QueueError text if the C checks refuse it."""
    vq = ffi.new("struct pykvm_vq *")
    if lib.pykvm_vq_init(vq, q.index, q.max_size) < 0:
        raise ValueError(f"virtqueue {q.index}: bad max_size {q.max_size}")
    vq.size = q.size
    vq.desc_table, vq.avail_ring, vq.used_ring = q.desc_table, q.avail_ring, q.used_ring
    vq.ready, vq.event_idx, vq.indirect = q.ready, q.event_idx, q.indirect
    if q.ready:
        cmem = c_mem(mem)
        err = ffi.new("struct pykvm_vq_error *")
        if lib.pykvm_vq_activate(vq, cmem, q.last_avail_idx, q.used_idx, err) < 0:
            raise ValueError(ffi.string(err.message).decode())
    if q.inflight is not None:  # the owner (vhost-user) keeps the region mapped
        vq.inflight = int(ffi.cast("uintptr_t", ffi.from_buffer(q.inflight)))
        vq.inflight_counter = q.inflight_counter
    return vq


def c_mem(mem):
    """GuestMemory as a C queue operation takes it (keeps mem.table alive)."""
    cmem = ffi.new("struct pykvm_vq_mem *")
    cmem.regions = mem.table
    cmem.nregions = len(mem.regions)
    return cmem


class CQueue:
    """native/vq.c behind SplitQueue's interface: the C twin, for the parity
    tests (and any Python code that wants the C walker). Same attributes,
    same methods, same QueueError (check name and message)."""

    _CONFIG = ("size", "desc_table", "avail_ring", "used_ring", "ready", "event_idx", "indirect")

    def __init__(self, index: int, max_size: int):
        vq = ffi.new("struct pykvm_vq *")
        if lib.pykvm_vq_init(vq, index, max_size) < 0:
            raise ValueError(f"virtqueue {index}: max_size {max_size} is not a power of 2 "
                             f"in [1, {lib.PYKVM_VQ_MAX_SIZE}]")
        self.vq = vq
        self._err = ffi.new("struct pykvm_vq_error *")
        self._chain = ffi.new("struct pykvm_vq_chain *")
        self._segs = None
        self._mem_pair = (None, None)  # (GuestMemory, its C view), the last one used
        self._inflight = None

    index = property(lambda self: self.vq.index)
    max_size = property(lambda self: self.vq.max_size)
    last_avail_idx = property(lambda self: self.vq.last_avail_idx)
    used_idx = property(lambda self: self.vq.used_idx)
    in_flight = property(lambda self: self.vq.in_flight)

    def __getattr__(self, name):
        if name in CQueue._CONFIG:
            value = getattr(self.vq, name)
            return bool(value) if name in ("ready", "event_idx", "indirect") else value
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name in CQueue._CONFIG:
            setattr(self.vq, name, int(value))
        else:
            super().__setattr__(name, value)

    def _mem(self, mem):
        if self._mem_pair[0] is not mem:
            self._mem_pair = (mem, c_mem(mem))
        return self._mem_pair[1]

    def _raise(self):
        msg = ffi.string(self._err.message).decode()
        check = ffi.string(lib.pykvm_vq_check_name(self._err.check)).decode()
        prefix = f"virtqueue {self.index}: {check}: "
        raise QueueError(self.index, check, msg.removeprefix(prefix))

    @property
    def inflight(self):
        return self._inflight

    @inflight.setter
    def inflight(self, view) -> None:
        self._inflight = view
        self.vq.inflight = 0 if view is None else \
            int(ffi.cast("uintptr_t", ffi.from_buffer(view, require_writable=True)))

    inflight_counter = property(lambda self: self.vq.inflight_counter,
                                lambda self, v: setattr(self.vq, "inflight_counter", v))

    def reset(self) -> None:
        lib.pykvm_vq_reset(self.vq)
        self._inflight = None

    def activate(self, mem, *, last_avail_idx: int = 0, used_idx: int = 0) -> None:
        if lib.pykvm_vq_activate(self.vq, self._mem(mem), last_avail_idx & 0xFFFF,
                                 used_idx & 0xFFFF, self._err) < 0:
            self._raise()
        cap = lib.pykvm_vq_chain_capacity(self.vq)
        self._segs = ffi.new("struct pykvm_vq_seg[]", cap)
        self._chain.segs = self._segs
        self._chain.cap = cap

    def pop(self, mem) -> Chain | None:
        if self._segs is None:
            return None  # never activated
        rc = lib.pykvm_vq_pop(self.vq, self._mem(mem), self._chain, self._err)
        if rc < 0:
            self._raise()
        if not rc:
            return None
        c, segs = self._chain, self._segs
        return Chain(c.head, [(segs[i].gpa, segs[i].len) for i in range(c.nreadable)],
                     [(segs[i].gpa, segs[i].len) for i in range(c.nreadable, c.nsegs)])

    def resubmit(self, mem, head: int) -> Chain:
        if self._segs is None:
            raise QueueError(self.index, "queue-size", "resubmit on an inactive queue")
        if lib.pykvm_vq_resubmit(self.vq, self._mem(mem), head, self._chain, self._err) < 0:
            self._raise()
        c, segs = self._chain, self._segs
        return Chain(c.head, [(segs[i].gpa, segs[i].len) for i in range(c.nreadable)],
                     [(segs[i].gpa, segs[i].len) for i in range(c.nreadable, c.nsegs)])

    def has_pending(self, mem) -> bool:
        rc = lib.pykvm_vq_has_pending(self.vq, self._mem(mem), self._err)
        if rc < 0:
            self._raise()
        return bool(rc)

    def add_used(self, mem, head: int, length: int) -> None:
        lib.pykvm_vq_add_used(self.vq, self._mem(mem), head, length)

    def needs_notification(self, mem) -> bool:
        return bool(lib.pykvm_vq_needs_notification(self.vq, self._mem(mem)))

    def set_notification(self, mem, enable: bool) -> bool:
        rc = lib.pykvm_vq_set_notification(self.vq, self._mem(mem), int(enable), self._err)
        if rc < 0:
            self._raise()
        return bool(rc)


class _QueueOwnedByC:
    """A queue the C thread owns, as VirtioBlk's request code sees it for a
    punted chain: add_used hands the element back to C, which adds it and
    decides on the interrupt."""

    def __init__(self, fast: FastPath, index: int):
        self._fast = fast
        self.index = index

    def add_used(self, mem, head: int, length: int) -> None:
        self._fast._give_back(self.index, head, length)

    def needs_notification(self, mem) -> bool:
        return False  # the C thread decides, when it adds the element


class FastPath:
    """The C I/O thread(s) of one device and its Python helper thread.

    ``per_queue``: one C thread (with its own engine) per queue, instead of
    one for the whole device. ``punt`` serves what C hands over:
    ``punt.serve(queue, chain)`` starts a request with the Python code
    (``queue.add_used`` gives it back), ``punt.notifier`` is readable when
    ``punt.collect()`` has completions to finish, ``punt.warn(message)`` logs
    a bad request's line. ``fail(message)`` is DEVICE_NEEDS_RESET;
    ``forward(index)`` interrupts for queue ``index`` from Python (for
    ``call_fds[index]`` None). ``throttle``: the disk's ThrottleGroup
    (block/throttle.py) or None; the C threads ask its state before each read
    or write they submit and hold, in order, what must wait (native/blk.c).
    ``wlog``: the disk's blklogwrites node, whose C writer the threads report
    each write and flush to as they publish it (native/writelog.c).
    """

    def __init__(self, mem, queues, kicks, call_fds, backend_fd: int, engine_name: str, *,
                 capacity: int, features: int, punt, fail, forward, read_only: bool = False,
                 write_cache: bool = True, no_flush: bool = False, align: int = 1,
                 serial: bytes = b"", flush_fd: int | None = None, extents=None,
                 poll_max_ns: int = POLL_MAX_NS, irq_coalesce_ns: int = 0, isr=None,
                 isr_bit: int = 1, per_queue: bool = False, throttle=None, inject=None,
                 trace=None, wlog=None, name: str = "virtio-blk", seg_max: int = 0,
                 size_max: int = 0):
        if engine_name not in C_ENGINES:
            raise FastPathError(f"aio={engine_name} is not a C engine")
        self.name = name
        self.mem = mem
        self._punt = punt
        self._fail = fail
        self._forward = forward
        self._queues = [_QueueOwnedByC(self, i) for i in range(len(queues))]
        try:
            self._vqs = [c_queue(mem, q) for q in queues]
        except ValueError as e:  # Python's checks passed: the twins disagree (a bug)
            raise FastPathError(f"{name}: the C queue refused what Python accepted: {e}") from None
        if extents is None:
            extents = [Extent(0, capacity * 512, backend_fd, 0, not read_only)]
        self._map = _extent_table(extents)
        self._engine = ffi.new("char[]", engine_name.encode())
        self.irq_coalesce_ns = irq_coalesce_ns
        # a ThrottleGroup (block/throttle.py) whose C state the threads ask; kept
        # referenced here, so it outlives them
        self._throttle = throttle
        # a blkdebug Injector (block/inject.py) and a block.trace.Trace, each
        # kept referenced here so that they outlive the threads; a trace ring per thread
        self._inject = inject
        self._trace = trace
        # a blklogwrites node: its C writer (``wlog.c``) logs what the threads serve
        self._wlog = wlog
        self._rings = []
        # groups[g]: the queue indices (of ``queues``) C thread g serves, in
        # its own order; where[i]: (g, i's index within group g)
        groups = [[i] for i, q in enumerate(queues) if q.ready] if per_queue else []
        groups = groups or [list(range(len(queues)))]
        self._groups = groups
        self._where = {i: (g, k) for g, group in enumerate(groups) for k, i in enumerate(group)}
        self._cqueues = []  # the C threads read the vqs until stop
        self._blks = []
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._last = dict.fromkeys(COUNTERS, 0)
        for group in groups:
            cqueues = ffi.new("struct pykvm_blk_queue[]", len(group))
            for cq, i in zip(cqueues, group):
                cq.vq = self._vqs[i]
                cq.kick_fd = kicks[queues[i].index]
                fd = call_fds[queues[i].index]
                cq.call_fd = -1 if fd is None else fd
                cq.isr = isr if isr is not None else ffi.NULL
                cq.isr_bit = isr_bit
            cfg = ffi.new("struct pykvm_blk_config *")
            cfg.regions = mem.table
            cfg.nregions = len(mem.regions)
            cfg.queues = cqueues
            cfg.nqueues = len(group)
            cfg.engine = self._engine
            cfg.capacity = capacity
            cfg.features = features
            cfg.align = align
            cfg.flush_fd = backend_fd if flush_fd is None else flush_fd
            cfg.read_only = read_only
            cfg.write_cache = write_cache
            cfg.no_flush = no_flush
            ffi.memmove(cfg.serial, serial[:20].ljust(20, b"\0"), 20)
            cfg.poll_max_ns = poll_max_ns
            cfg.irq_coalesce_ns = irq_coalesce_ns
            cfg.map = self._map
            cfg.nmap = len(extents)
            cfg.throttle = throttle.state if throttle is not None else ffi.NULL
            cfg.inject = inject.c if inject is not None else ffi.NULL
            cfg.wlog = wlog.c if wlog is not None else ffi.NULL
            cfg.seg_max = seg_max
            cfg.size_max = size_max
            if trace is not None:
                self._rings.append(trace.ring())
                cfg.trace = self._rings[-1]
            err = ffi.new("char[256]")
            blk = lib.pykvm_blk_start(cfg, err, len(err))
            if blk == ffi.NULL:
                for b in self._blks:
                    lib.pykvm_blk_stop(b)
                os.close(self._stop_fd)
                self._blks = []
                for ring in self._rings:
                    trace.retire(ring)
                raise FastPathError(f"{name}: the C fast path cannot start: "
                                    f"{ffi.string(err).decode()}")
            self._cqueues.append(cqueues)
            self._blks.append(blk)
        if inject is not None:
            inject.on_release.append(self.release)
        self._helper = threading.Thread(target=self._serve, name=f"{name}-fastpath", daemon=True)
        self.threads = (self._helper,)
        self._helper.start()

    @property
    def c_threads(self) -> int:
        """How many C I/O threads serve the device."""
        return len(self._groups)

    # -- control --------------------------------------------------------------

    def release(self) -> None:
        """blkdebug: requests hung until released (Injector.release moved the
        generation first) and held completions go, on every C thread."""
        with self._lock:
            for blk in self._blks:
                lib.pykvm_blk_release(blk)

    def set_write_cache(self, on: bool) -> None:
        with self._lock:
            for blk in self._blks:
                lib.pykvm_blk_set_write_cache(blk, int(on))

    def pause(self, on: bool) -> None:
        """Park the C threads (no pop, no reap, no used element) or let them
        go on; pausing returns once they are parked, with every request of
        their engines back (the failed ones handed over)."""
        with self._lock:
            for blk in self._blks:
                lib.pykvm_blk_pause(blk, int(on))

    def set_flush_failed(self) -> None:
        """A flush failed in Python: C sends every later flush there too."""
        with self._lock:
            for blk in self._blks:
                if not lib.pykvm_blk_flush_failed(blk):
                    lib.pykvm_blk_set_flush_failed(blk)

    def set_call_fd(self, index: int, fd: int | None) -> None:
        """The interrupt of queue ``index`` changed (MSI-X vector masked,
        unmasked or moved): write ``fd`` from now on, or forward if None."""
        with self._lock:
            if self._blks and index in self._where:
                g, k = self._where[index]
                lib.pykvm_blk_set_call_fd(self._blks[g], k, -1 if fd is None else fd)

    def set_map(self, extents) -> int:
        """Replace the mapping table; returns its generation (see map_generation),
        0 when stopped or out of memory. Every C thread gets every table, in
        the same order, so their generations move together."""
        table = _extent_table(extents)
        with self._lock:
            gens = [lib.pykvm_blk_set_map(blk, table, len(extents)) for blk in self._blks]
            return min(gens, default=0)

    def map_generation(self) -> int:
        """The newest generation all C threads map with and for which no request
        mapped with an older table is still with the engine (blk.h)."""
        with self._lock:
            return min((lib.pykvm_blk_map_generation(blk) for blk in self._blks), default=0)

    def wait_map(self, gen: int, timeout: float = 60.0) -> bool:
        """Block until map_generation() >= gen: the C threads use table ``gen``
        and every request mapped with an older one is done. False on timeout
        (or if the path stopped meanwhile)."""
        deadline = time.monotonic() + timeout
        with self._lock:  # stop() frees the C side under this lock
            for blk in self._blks:  # none left: nothing could use any table
                left = max(0, deadline - time.monotonic())
                if not lib.pykvm_blk_wait_map(blk, gen, int(left * 1000)):
                    return False
            return True

    def publish_map(self, extents, wait: bool) -> None:
        """The block layer's map listener (BlockBackend.set_map_listener):
        install ``extents`` (block.driver.DirectExtent tuples); with ``wait``,
        return only once nothing can still use an older table."""
        gen = self.set_map(extents)
        if not gen:
            if not self._blks:
                return  # stopped: nothing uses any table any more
            raise FastPathError(f"{self.name}: out of memory replacing the mapping table")
        if wait and not self.wait_map(gen):
            raise FastPathError(f"{self.name}: the C thread did not take mapping table "
                                f"{gen} in time")

    def counters(self) -> dict:
        """requests, bytes_read, bytes_written, errors, submitted, flushes, batches,
        completions, completion_batches, interrupts, interrupts_suppressed,
        punts, poll_hits, sleeps, interrupts_deferred, throttled: since start, summed over
        the C threads (final once stopped)."""
        with self._lock:
            if not self._blks:
                return dict(self._last)
            total = dict.fromkeys(COUNTERS, 0)
            c = ffi.new("struct pykvm_blk_counters *")
            for blk in self._blks:
                lib.pykvm_blk_counters(blk, c)
                for k in COUNTERS:
                    total[k] += getattr(c, k)
            return total

    def queue_state(self, index: int) -> tuple[int, int]:
        """(last_avail_idx, used_idx) of queue ``index`` (exact once stopped)."""
        vq = self._vqs[index]
        return vq.last_avail_idx, vq.used_idx

    def quiesce(self, timeout: float) -> bool:
        """Take no more chains; finish the requests taken (the engine's and
        those with Python) and put them in the used ring, interrupts decided.
        True when all were back within ``timeout`` seconds. stop() follows."""
        deadline = time.monotonic() + timeout
        ok = True
        for blk in list(self._blks):
            left = max(0, deadline - time.monotonic())
            ok &= bool(lib.pykvm_blk_quiesce(blk, int(left * 1000)))
        return ok

    def stop(self) -> None:
        """Stop all threads; the engine's requests in flight are waited for
        and dropped, punted ones stay with the backend (drain it next)."""
        if not self._blks:
            return
        os.eventfd_write(self._stop_fd, 1)
        if threading.current_thread() is not self._helper:
            self._helper.join()
        last = self.counters()
        with self._lock:
            blks, self._blks = self._blks, []
            self._last = last
        for blk in blks:
            lib.pykvm_blk_stop(blk)  # joins its C thread (the GIL is released meanwhile)
        os.close(self._stop_fd)
        if self._inject is not None and self.release in self._inject.on_release:
            self._inject.on_release.remove(self.release)
        for ring in self._rings:
            self._trace.retire(ring)
        self._rings = []

    # -- the helper thread -----------------------------------------------------

    def _give_back(self, index: int, head: int, length: int) -> None:
        # only the helper thread gets here, and stop() joins it before freeing
        g, k = self._where[index]
        lib.pykvm_blk_complete(self._blks[g], k, head, length)

    def _serve(self) -> None:
        poller = select.poll()
        punt_fds, forward_fds = {}, {}
        for g, blk in enumerate(self._blks):
            punt_fds[lib.pykvm_blk_punt_fd(blk)] = g
            forward_fds[lib.pykvm_blk_forward_fd(blk)] = g
        for fd in (self._stop_fd, self._punt.notifier, *punt_fds, *forward_fds):
            poller.register(fd, select.POLLIN)
        entry = ffi.new("struct pykvm_blk_punt *")
        timeout = None
        if self._trace is not None:
            from ..block.trace import DRAIN_SECONDS
            timeout = DRAIN_SECONDS * 1000
        try:
            while True:
                ready = poller.poll(timeout)
                if self._trace is not None:
                    self._trace.drain()
                for fd, _ in ready:
                    if fd == self._stop_fd:
                        return
                    if fd in punt_fds:
                        _drain(fd)
                        self._take_punts(punt_fds[fd], entry)
                    elif fd in forward_fds:
                        _drain(fd)
                        g = forward_fds[fd]
                        group = self._groups[g]
                        mask = lib.pykvm_blk_take_forwarded(self._blks[g])
                        for k in range(len(group)):
                            if mask >> k & 1:
                                self._forward(group[k])
                    else:
                        self._punt.collect()
        except Exception as e:  # a VMM bug: the device dies, not the VMM
            log.exception("%s: fast path helper failed", self.name)
            self._fail(f"internal error: {type(e).__name__}: {e}")

    def _take_punts(self, g: int, entry) -> None:
        while lib.pykvm_blk_next_punt(self._blks[g], entry):
            try:
                self._handle(g, entry)
            finally:
                lib.pykvm_blk_punt_release(entry)

    def take_punts(self) -> None:
        """Handle what C has handed over so far, now (the helper thread only:
        a device stopping on an error collects every failure first)."""
        entry = ffi.new("struct pykvm_blk_punt *")
        for g in range(len(self._blks)):
            self._take_punts(g, entry)

    def _handle(self, g: int, entry) -> None:
        kind = entry.kind
        if kind == lib.PYKVM_BLK_PUNT_FATAL:
            self._fail(ffi.string(entry.message).decode(errors="replace"))
        elif kind == lib.PYKVM_BLK_PUNT_POWER:
            rule, keep, torn, seed = (int(x) for x in ffi.string(entry.message).split())
            self._punt.power_cut(rule, keep, bool(torn), seed)
        elif kind == lib.PYKVM_BLK_PUNT_LOG:
            self._punt.warn(ffi.string(entry.message).decode(errors="replace"))
            lib.pykvm_blk_complete(self._blks[g], entry.queue, entry.head, entry.used_len)
        else:
            segs = entry.segs
            readable = [(segs[i].gpa, segs[i].len) for i in range(entry.nreadable)]
            writable = [(segs[i].gpa, segs[i].len) for i in range(entry.nreadable, entry.nsegs)]
            queue = self._queues[self._groups[g][entry.queue]]
            chain = Chain(entry.head, readable, writable)
            if kind == lib.PYKVM_BLK_PUNT_ERROR:
                self._punt.failed(queue, chain, entry.error,
                                  bool(lib.pykvm_blk_flush_failed(self._blks[g])))
            else:
                self._punt.serve(queue, chain)


# -- VirtioBlk's fast path ------------------------------------------------------

def wanted(backend) -> bool:
    """Does this disk's engine ask for the C path (aio=threads|native|io_uring)?"""
    return getattr(backend.engine, "name", "python") in C_ENGINES


class _BlkPunts:
    """What C hands over, served by VirtioBlk's hook (pykvm/virtio/blk.py)."""

    def __init__(self, dev):
        self._dev = dev
        self.notifier = dev.backend.notifier

    def serve(self, queue, chain) -> None:
        self._dev.serve_punted(queue, chain)

    def failed(self, queue, chain, err: int, flush_failed: bool) -> None:
        self._dev.serve_failed(queue, chain, err, flush_failed)

    def collect(self) -> None:
        self._dev.complete_punted()

    def power_cut(self, rule: int, keep: int, torn: bool, seed: int) -> None:
        self._dev.backend.power_cut_fired(rule, keep, torn, seed)

    def warn(self, message: str) -> None:
        self._dev.warn(message)


def interrupt_plan(interrupt, count: int):
    """(call_fds, isr_word): the eventfd C may write for each queue (None
    where Python must signal), and the status word C must set first, if any.

    MSI-X: each unmasked vector's irqfd. virtio-MMIO: its InterruptStatus
    bit must be set with each interrupt; while that bit is Python state
    (MmioInterrupt.status), Python signals; a transport that keeps it in a
    C word (``isr_word``, a ``uint32_t *`` used with pykvm_isr_set/ack/load)
    lets C set it and write the irqfd itself."""
    if interrupt is None:
        return [None] * count, None
    isr = getattr(interrupt, "isr_word", None)
    if isr is not None:
        return [interrupt.call_fd(i) for i in range(count)], isr
    from .transport.mmio import MmioInterrupt
    if isinstance(interrupt, MmioInterrupt):
        return [None] * count, None
    return [interrupt.call_fd(i) for i in range(count)], None


def refresh_interrupts(fast: FastPath, interrupt, count: int) -> None:
    """After the transport changed its interrupts (an MSI-X vector masked,
    unmasked or moved): tell the C thread which queues it may signal."""
    for i, fd in enumerate(interrupt_plan(interrupt, count)[0]):
        fast.set_call_fd(i, fd)


def disk_extents(backend) -> tuple[list, int]:
    """The mapping table and flush fd of a disk: a raw image is one extent of
    its file (sector 0 not writable in C: writes there go to Python, which
    guards a probed raw image's header; detect-zeroes writes go to Python
    too); a format with a direct map (qcow2) gives its allocated data
    clusters (BlockBackend.direct_extents), kept up to date through the
    backend's map listener (see start); other formats get an empty table
    (everything punts); a flush is done in C only for a raw file."""
    drv = backend.driver
    if not drv.identity_mapped:
        return (backend.direct_extents() if drv.direct_map else []), -1
    size = backend.size // 512 * 512
    writable = backend.c_may_write
    extents = [Extent(0, min(512, size), drv.fd, 0, False)]
    if size > 512:
        extents.append(Extent(512, size - 512, drv.fd, 512, writable))
    flush_fd = drv.fd if list(getattr(drv, "sync_fds", [drv.fd])) == [drv.fd] else -1
    return extents, flush_fd


def start(dev, mem, queues, features: int, kicks, interrupt, fail) -> FastPath:
    """Start the C path for VirtioBlk ``dev`` at DRIVER_OK (raises FastPathError)."""
    backend = dev.backend
    extents, flush_fd = disk_extents(backend)
    call_fds, isr = interrupt_plan(interrupt, len(queues))
    fast = FastPath(
        mem, queues, kicks, call_fds, backend.driver.fd,
        backend.engine.name, capacity=backend.size // 512, features=features,
        punt=_BlkPunts(dev), fail=fail, forward=interrupt.signal_queue,
        read_only=backend.read_only, write_cache=backend.write_cache,
        no_flush=backend.cache.no_flush, align=dev.block_size if dev.block_size > 512
        else backend.align, serial=dev.serial,
        flush_fd=flush_fd, extents=extents, isr=isr, name=dev.name,
        poll_max_ns=POLL_MAX_NS if dev.poll_max_ns is None else dev.poll_max_ns,
        irq_coalesce_ns=dev.irq_coalesce_ns, per_queue=dev.iothread == "queue",
        throttle=backend.throttle, inject=backend.inject, trace=dev.trace,
        wlog=backend.wlog, seg_max=dev.knobs.seg_max, size_max=dev.knobs.size_max)
    if backend.driver.direct_map and not backend.driver.identity_mapped:
        # from now on the backend replaces the table (and waits for the C
        # thread to let go of the old one) before a cluster C may use changes
        backend.set_map_listener(fast.publish_map, extents)
    log.info("%s: served in C, but for: %s", dev.name, "; ".join(backend.c_path_punts()))
    return fast


def stop(dev, fast: FastPath) -> None:
    """Stop the C path of VirtioBlk ``dev``; the backend keeps no listener."""
    fast.stop()
    dev.backend.set_map_listener(None)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
