"""virtio-blk (virtio 1.x section 5.2): the life of an I/O request, in Python.

The device's I/O thread sleeps on the queues' kick eventfds and the block
backend's completion eventfd. Woken by a kick, it pops every available chain,
parses it into a request (checking every guest value once, here), and submits
``(op, offset, iovecs, token)`` to the BlockBackend; the iovecs are views of
guest memory, so data never gets copied. Woken by a completion, it writes the
status byte, adds the used element and interrupts the driver when the queue's
notification rules say so. Requests complete in whatever order the backend
finishes them.

Bad requests (a short header, a sector range past the capacity, a data buffer
the device may not write, an unknown type) complete with IOERR or UNSUPP; a
broken ring (QueueError) or a request with no status byte stops the device
with DEVICE_NEEDS_RESET. Either way: one log line, and the VMM carries on.

Host errors follow the disk's policies, QEMU's ``werror`` (writes, flushes,
discards, write-zeroes) and ``rerror`` (reads): ``report`` completes the
request with IOERR, ``ignore`` with OK, ``stop`` stops the device on any
error of that direction and ``enospc`` (werror only) on ENOSPC, reporting
the rest. A stopped device keeps the failed request, completes nothing more
and calls ``on_stop(device, line)`` (the Machine pauses the VM); resume()
submits the failed requests again, then completes what it held. Requests
the C path served come here when they fail (fastpath.py: PUNT_ERROR).
"""
from __future__ import annotations

import logging
import errno
import os
import select
import struct
import threading
import time

from . import fastpath
from .device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, ID_BLOCK, VirtioDevice
from .queue import QueueError

log = logging.getLogger("pykvm.virtio")

# Feature bits (5.2.3)
F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14
F_SECURE_ERASE = 1 << 16

# Request types and status (5.2.6)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
T_SECURE_ERASE = 14
KNOWN_TYPES = frozenset((T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES,
                         T_SECURE_ERASE))
RANGE_TYPES = (T_DISCARD, T_WRITE_ZEROES, T_SECURE_ERASE)     # a segment in the request
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WRITE_ZEROES_UNMAP = 1

SECTOR = 512
HEADER = struct.Struct("<IIQ")          # type, reserved, sector
SEGMENT = struct.Struct("<QII")         # sector, num_sectors, flags (discard / write zeroes)
ID_BYTES = 20
SIZE_MAX = 4 << 20                      # largest single data segment we advertise
MAX_QUEUES = 16                         # request queues one device may have (VIRTIO_BLK_F_MQ)
IOTHREADS = ("device", "queue")         # the C path: one thread per device, or per queue
# Limits on a guest request (README.md, "Limits"; native/blk.c has the same): past one,
# the request completes with IOERR and a log line, before anything is allocated for it.
MAX_REQUEST_BYTES = 256 << 20           # data bytes of one read or write
MAX_SEGMENTS = 1024                     # its non-empty data buffers (IOV_MAX: one preadv)
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR
MAX_WRITE_ZEROES_SECTORS = (1 << 30) // SECTOR
# a secure erase overwrites what it erases before it completes: a smaller bound
MAX_SECURE_ERASE_SECTORS = (64 << 20) // SECTOR
MAX_BLOCK_SIZE = 32 << 10               # logical_block_size and physical_block_size at most
QUEUE_SIZE_MAX = 1024                   # queue-size at most (QEMU's VIRTQUEUE_MAX_SIZE)


class Knobs:
    """The device's guest-visible properties, QEMU's virtio-blk-device names:
    ``logical_block_size`` (blk_size; requests not aligned to it get IOERR),
    ``physical_block_size``, ``min_io_size`` and ``opt_io_size`` (bytes, the
    TOPOLOGY fields), ``seg-max-adjust`` (on: seg_max = queue size - 2; off:
    126, as QEMU before 4.2), ``queue-size``, ``config-wce``, ``discard`` and
    ``write-zeroes`` (the features), ``max-discard-sectors``,
    ``max-write-zeroes-sectors``, ``event_idx`` and ``indirect_desc`` (the
    common virtio properties). ``parse`` takes them as --disk gives them."""

    KEYS = ("logical_block_size", "physical_block_size", "min_io_size", "opt_io_size",
            "seg-max-adjust", "queue-size", "config-wce", "write-zeroes", "max-discard-sectors",
            "max-write-zeroes-sectors", "event_idx", "indirect_desc")

    def __init__(self, logical_block_size: int = SECTOR, physical_block_size: int | None = None,
                 min_io_size: int | None = None, opt_io_size: int = 0,
                 seg_max_adjust: bool = True, queue_size: int = 256, config_wce: bool = True,
                 discard: bool = True, write_zeroes: bool = True,
                 max_discard_sectors: int = MAX_DISCARD_SECTORS,
                 max_write_zeroes_sectors: int = MAX_WRITE_ZEROES_SECTORS,
                 event_idx: bool = True, indirect_desc: bool = True):
        self.logical_block_size = logical_block_size
        self.physical_block_size = physical_block_size or logical_block_size
        self.min_io_size = logical_block_size if min_io_size is None else min_io_size
        self.opt_io_size = opt_io_size
        self.seg_max_adjust = seg_max_adjust
        self.queue_size = queue_size
        self.config_wce = config_wce
        self.discard = discard
        self.write_zeroes = write_zeroes
        self.max_discard_sectors = max_discard_sectors
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.event_idx = event_idx
        self.indirect_desc = indirect_desc

    @classmethod
    def parse(cls, opts: dict) -> "Knobs":
        """From {QEMU name: text}; ValueError naming the key and why."""
        def onoff(key, default):
            v = opts.get(key)
            if v is None:
                return default
            if v not in ("on", "off"):
                raise ValueError(f"{key}={v} is not on or off")
            return v == "on"

        def number(key, default, lo, hi, power2=False, multiple=1):
            v = opts.get(key)
            if v is None:
                return default
            from ..block.graph import parse_size
            try:
                n = parse_size(v)
            except Exception:
                raise ValueError(f"{key}={v} is not a number") from None
            if not lo <= n <= hi or power2 and n & (n - 1) or n % multiple:
                what = "a power of two " if power2 else ""
                mult = f", a multiple of {multiple}" if multiple > 1 else ""
                raise ValueError(f"{key}={v} is not {what}from {lo} to {hi}{mult}")
            return n

        lbs = number("logical_block_size", SECTOR, SECTOR, MAX_BLOCK_SIZE, power2=True)
        k = cls(logical_block_size=lbs,
                physical_block_size=number("physical_block_size", lbs, lbs, MAX_BLOCK_SIZE,
                                           power2=True),
                min_io_size=number("min_io_size", None, 0, 1 << 25, multiple=lbs),
                opt_io_size=number("opt_io_size", 0, 0, 1 << 31, multiple=lbs),
                seg_max_adjust=onoff("seg-max-adjust", True),
                queue_size=number("queue-size", 256, 4, QUEUE_SIZE_MAX, power2=True),
                config_wce=onoff("config-wce", True),
                discard=onoff("discard", True), write_zeroes=onoff("write-zeroes", True),
                max_discard_sectors=number("max-discard-sectors", MAX_DISCARD_SECTORS, 1,
                                           MAX_DISCARD_SECTORS),
                max_write_zeroes_sectors=number("max-write-zeroes-sectors",
                                                MAX_WRITE_ZEROES_SECTORS, 1,
                                                MAX_WRITE_ZEROES_SECTORS),
                event_idx=onoff("event_idx", True), indirect_desc=onoff("indirect_desc", True))
        return k

    size_max = SIZE_MAX     # bytes of one data buffer (config size_max)

    @property
    def seg_max(self) -> int:
        return min(self.queue_size - 2 if self.seg_max_adjust else 126, MAX_SEGMENTS)


WERROR = ("report", "ignore", "stop", "enospc")   # QEMU's -drive werror=, default enospc
RERROR = ("report", "ignore", "stop")             # QEMU's -drive rerror=, default report

# Config space layout (struct virtio_blk_config)
CONFIG = struct.Struct("<QII HBB I BBHI BBH III II B3x III")
CONFIG_WRITEBACK = 32


class _Request:
    __slots__ = ("queue", "head", "status_gpa", "used_len", "rtype", "sector", "nbytes", "t0",
                 "retry")

    def __init__(self, queue, head: int, status_gpa: int, used_len: int, rtype: int = 0,
                 sector: int = 0, nbytes: int = 0, t0: int = 0):
        self.queue = queue
        self.head = head
        self.status_gpa = status_gpa
        self.used_len = used_len
        self.rtype = rtype          # the trace record's fields
        self.sector = sector
        self.nbytes = nbytes
        self.t0 = t0
        self.retry = None           # (backend method, args): to submit it again

    @property
    def is_read(self) -> bool:
        return self.rtype == T_IN


class _BadRequest(Exception):
    """A request to complete with a status (IOERR/UNSUPP) instead of serving it."""

    def __init__(self, status: int, why: str):
        self.status = status
        self.why = why


class VirtioBlk(VirtioDevice):
    device_id = ID_BLOCK

    def __init__(self, backend, serial: str = "", queue_size: int = 256, name: str = "virtio-blk",
                 poll_max_ns: int | None = None, irq_coalesce_ns: int | None = None,
                 num_queues: int = 1, iothread: str = "device", trace=None,
                 werror: str = "enospc", rerror: str = "report", on_stop=None,
                 knobs: Knobs | None = None):
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"{num_queues} queues (1 to {MAX_QUEUES})")
        if iothread not in IOTHREADS:
            raise ValueError(f"iothread={iothread} (one of {', '.join(IOTHREADS)})")
        if werror not in WERROR or rerror not in RERROR:
            raise ValueError(f"werror={werror}, rerror={rerror} (one of {', '.join(WERROR)}; "
                             f"{', '.join(RERROR)})")
        self.werror = werror
        self.rerror = rerror
        self.on_stop = on_stop        # on_stop(device, line): a host error stopped it
        self._paused = False          # stopped: no completion until resume()
        self._resume = False          # resume() asked; the serving thread does it
        self._held: list = []         # completions held while stopped
        self._retry: list = []        # tokens of the requests that stopped it
        self._c_failed = 0            # serving a chain the C path failed with this errno
        self.backend = backend
        self.trace = trace                # a block.trace.Trace, or None
        if trace is not None and backend.inject is not None:
            backend.fired = {}            # the rule that fired on each request, for the trace
        self.num_queues = num_queues
        self.iothread = iothread          # the C path's threads: per device or per queue
        self.poll_max_ns = poll_max_ns    # the C path's polling limit (None: its default)
        self.irq_coalesce_ns = irq_coalesce_ns or 0   # the C path's interrupt spacing
        self.serial = serial.encode()[:ID_BYTES]
        self.knobs = knobs or Knobs(queue_size=queue_size)
        self.queue_size = self.knobs.queue_size
        self.name = name
        self.threads: tuple = ()
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._inflight: dict[int, _Request] = {}
        self._features = 0
        self._warned = 0
        self.stats = {"requests": 0, "bytes_read": 0, "bytes_written": 0, "errors": 0,
                      "interrupts": 0, "interrupts_suppressed": 0}
        self._fast = None                 # the C fast path, while it serves (fastpath.py)
        self._fast_done: dict = {}        # its counters from earlier activations
        self._punted = 0                  # requests it handed over (counted by both sides)

    # -- what the transport sees -------------------------------------------------

    def features(self) -> int:
        k = self.knobs
        f = F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_TOPOLOGY | F_FLUSH
        f |= (F_INDIRECT_DESC if k.indirect_desc else 0) | (F_EVENT_IDX if k.event_idx else 0) \
            | (F_CONFIG_WCE if k.config_wce else 0)
        if self.num_queues > 1:
            f |= F_MQ
        if self.backend.read_only:
            f |= F_RO
        else:
            f |= F_SECURE_ERASE | (F_DISCARD if k.discard else 0) \
                | (F_WRITE_ZEROES if k.write_zeroes else 0)
        return f

    def queue_sizes(self) -> list[int]:
        return [self.queue_size] * self.num_queues

    @property
    def block_size(self) -> int:
        """blk_size: logical_block_size, or what O_DIRECT needs if more."""
        return max(SECTOR, self.backend.align, self.knobs.logical_block_size)

    def _config(self) -> bytes:
        bs = self.block_size
        k = self.knobs
        pbs = max(bs, k.physical_block_size)
        return CONFIG.pack(
            self.backend.size // SECTOR,          # capacity, in 512-byte sectors
            k.size_max, k.seg_max,                # size_max, seg_max
            0, 0, 0,                              # geometry
            bs,                                   # blk_size
            (pbs // bs).bit_length() - 1, 0,      # physical_block_exp, alignment_offset
            k.min_io_size // bs, k.opt_io_size // bs,  # min_io_size, opt_io_size (in blocks)
            int(self.backend.write_cache), 0,     # writeback, unused
            self.num_queues,                      # num_queues
            k.max_discard_sectors, 1, bs // SECTOR,  # max_discard_sectors/_seg, alignment
            k.max_write_zeroes_sectors, 1,        # max_write_zeroes_sectors/_seg
            1,                                    # write_zeroes_may_unmap
            MAX_SECURE_ERASE_SECTORS, 1, bs // SECTOR,  # max_secure_erase_sectors/_seg, alignment
        )

    def read_config(self, offset: int, size: int) -> int:
        data = self._config()
        if offset >= len(data):
            return 0
        return int.from_bytes(data[offset:offset + size].ljust(size, b"\0"), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == CONFIG_WRITEBACK and size == 1 and self._features & F_CONFIG_WCE:
            self.backend.write_cache = bool(value & 1)
            if self._fast is not None:
                self._fast.set_write_cache(bool(value & 1))
            log.info("%s: guest turned its write cache %s", self.name,
                     "on" if value & 1 else "off")

    # -- lifecycle -----------------------------------------------------------------

    def activate(self, mem, queues, features, kicks, interrupt, fail) -> None:
        self._features = features
        if not features & F_FLUSH:
            # 5.2.5.1: without FLUSH the driver cannot flush, so the device
            # must behave as writethrough.
            self.backend.write_cache = False
        self.mem = mem
        self.queues = queues
        self.kicks = kicks
        self.interrupt = interrupt
        self.fail = fail
        if fastpath.wanted(self.backend):
            try:
                self._fast = fastpath.start(self, mem, queues, features, kicks, interrupt, fail)
                self.threads = self._fast.threads
                return
            except fastpath.FastPathError as e:
                log.warning("%s; serving it with the Python path", e)
        _drain(self._stop_fd)
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-io", daemon=True)
        self.threads = (self._thread,)
        self._thread.start()

    def quiesce(self, timeout: float = 30.0) -> bool:
        """Take no more requests, and return the ones taken to the used ring
        (status written, interrupt decided): a vhost-user ring stop reports an
        index that counts them. True when none was left in flight after
        ``timeout`` seconds (the C path; the Python path waits for its I/O).
        reset() follows."""
        if self._fast is not None:
            return self._fast.quiesce(timeout)
        if self._thread is not None:
            self._stop_thread()
            self._complete(self.backend.drain())
        return True

    def _stop_thread(self) -> None:
        os.eventfd_write(self._stop_fd, 1)
        self._thread.join()
        self._thread = None
        self.threads = ()

    def reset(self) -> None:
        """Stop serving. The queues keep their final indices (a vhost-user
        front-end asks for them); requests still in flight are waited for and
        dropped, not returned."""
        if self._fast is not None:
            fastpath.stop(self, self._fast)
            for i, q in enumerate(self.queues):
                if q.ready:
                    q.last_avail_idx, q.used_idx = self._fast.queue_state(i)
            for k, v in self._fast.counters().items():
                self._fast_done[k] = self._fast_done.get(k, 0) + v
            self._fast = None
            self.threads = ()
        if self._thread is not None:
            self._stop_thread()
        # In-flight I/O may still be writing into guest memory: wait for it,
        # and drop the results (the queues are about to be reset).
        self.backend.drain()
        self._inflight.clear()
        # a stop on a host error ends with the reset: its requests are dropped
        self._paused = self._resume = False
        self._retry, self._held = [], []
        self.backend.write_cache = self.backend.cache.writeback

    def close(self) -> None:
        self.reset()
        self.backend.close()
        os.close(self._stop_fd)

    def resubmit(self, mem, queue, chains, interrupt) -> str | None:
        """Before ``activate``: serve ``chains`` of ``queue``, which an earlier
        back-end process took and never returned (vhost-user inflight
        tracking), with the Python path, and wait until they are back in the
        used ring. Returns None, or the one-line reason the device cannot go
        on (a chain with no status byte): the caller fails the device."""
        self.mem = mem
        self.interrupt = interrupt
        try:
            for chain in chains:
                self._submit(queue, chain)
        except _Fatal as e:
            return str(e)
        finally:
            self._complete(self.backend.drain(), notify=False)
            self._notify(queue)
        return None

    # -- the I/O thread -------------------------------------------------------------

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        poller.register(self.backend.notifier, select.POLLIN)
        by_fd = {}
        for q in self.queues:
            if q.ready:
                poller.register(self.kicks[q.index], select.POLLIN)
                by_fd[self.kicks[q.index]] = q
        notifier = self.backend.notifier
        try:
            for fd, q in list(by_fd.items()):
                if not self._process(q):  # chains made available before DRIVER_OK
                    poller.unregister(fd)
                    del by_fd[fd]
            while True:
                for fd, _ in poller.poll():
                    if fd == self._stop_fd:
                        return
                    if fd == notifier:
                        self._complete(self.backend.reap())
                        continue
                    q = by_fd.get(fd)
                    if q is None:
                        continue
                    _drain(fd)
                    if not self._process(q):
                        poller.unregister(fd)
                        del by_fd[fd]
        except Exception as e:  # a VMM bug: the device dies, not the VMM
            log.exception("%s: I/O thread failed", self.name)
            self.fail(f"internal error: {type(e).__name__}: {e}")

    def _process(self, q) -> bool:
        """Pop and submit everything available; False once the queue is broken."""
        mem = self.mem
        touched = False
        try:
            while True:
                chain = q.pop(mem)
                if chain is None:
                    if q.set_notification(mem, True):
                        continue  # more arrived while we were not listening
                    break
                touched |= self._submit(q, chain)
        except QueueError as e:
            self.fail(str(e))
            return False
        except _Fatal as e:
            self.fail(str(e))
            return False
        if touched:
            self._notify(q)
        return True

    def _notify(self, q) -> None:
        if q.needs_notification(self.mem):
            self.stats["interrupts"] += 1
            self.interrupt.signal_queue(q.index)
        else:
            self.stats["interrupts_suppressed"] += 1

    def _complete(self, done, notify: bool = True) -> None:
        mem = self.mem
        touched = set()
        if self._resume:
            done = self._resume_now() + list(done)
        for token, result in done:
            req = self._inflight.get(token)
            if req is None:
                continue
            action = self._error_action(req, -result) if result < 0 else ""
            if action == "stop":        # kept, and submitted again on resume()
                self._stop_on(token, req, -result)
                continue
            if self._paused:
                self._held.append((token, result))
                continue
            status = S_OK
            if result < 0:
                if action == "report":
                    self.stats["errors"] += 1
                    status = S_UNSUPP if result == -errno.EOPNOTSUPP else S_IOERR
                    self._warn(f"I/O error: {os.strerror(-result)}")
                else:
                    self._warn(f"I/O error: {os.strerror(-result)} (ignored: "
                               f"{'rerror' if req.is_read else 'werror'}=ignore)")
            del self._inflight[token]
            mem.write_u(req.status_gpa, 1, status)
            if self.trace is not None:
                self._trace(req, token, status)
            req.queue.add_used(mem, req.head, req.used_len)
            touched.add(req.queue)
        if notify:
            for q in touched:
                self._notify(q)
        if self._fast is not None and self.backend.flush_error:
            self._fast.set_flush_failed()   # a flush Python did failed: C's fail too

    # -- host errors: werror / rerror ------------------------------------------------

    def _error_action(self, req, err: int) -> str:
        policy = self.rerror if req.is_read else self.werror
        if policy == "enospc":
            return "stop" if err == errno.ENOSPC else "report"
        return policy

    def _stop_on(self, token: int, req, err: int) -> None:
        """Stop on a failed request: keep it for resume(), complete nothing more
        (one line and on_stop for the first; those failing meanwhile join it)."""
        self._retry.append(token)
        if self._paused:
            return
        self._paused = True
        # as QEMU drains before it stops: every request in flight comes back
        # first, so those failing now join this one rather than stop the VM
        # again after resume()
        if self._fast is not None:
            self._fast.pause(True)
            self._fast.take_punts()
        self._complete(self.backend.drain(), notify=False)
        key, policy = ("rerror", self.rerror) if req.is_read else ("werror", self.werror)
        line = (f"{self.backend.root.node_name or self.name}: "
                f"{'read' if req.is_read else 'write'} error: {os.strerror(err)} "
                f"({key}={policy})")
        if self.on_stop is not None:
            self.on_stop(self, line)
        else:
            log.error("%s; %s stopped: fix the cause, then resume it", line, self.name)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Complete no request until resume() (the VM pauses: every disk does)."""
        self._paused = True
        if self._fast is not None:
            self._fast.pause(True)

    def resume(self) -> None:
        """Go on: the thread that serves completions submits the requests that
        stopped the device again, then completes what it held. Any thread."""
        self._resume = True
        os.eventfd_write(self.backend.notifier, 1)

    def _resume_now(self) -> list:
        self._resume = False
        self._paused = False
        retry, self._retry = self._retry, []
        held, self._held = self._held, []
        if self._fast is not None:
            self._fast.pause(False)
        for token in retry:
            req = self._inflight.get(token)
            if req is not None and req.retry is not None:
                fn, args = req.retry
                fn(*args)
        return held

    def _start(self, token: int, req, fn, *args) -> None:
        """Submit a parsed request to the backend (or, for a chain the C path
        failed, complete it with that error: the policies decide)."""
        req.retry = (fn, args)
        self._inflight[token] = req
        if self._c_failed:
            self.backend.post(token, -self._c_failed)
        else:
            fn(*args)

    # -- the C fast path's hook: requests it hands over (pykvm/virtio/fastpath.py) --

    def serve_punted(self, q, chain) -> None:
        """Serve a chain the C I/O thread popped and handed over, with the
        request code below. ``q`` stands for the queue C owns: its add_used
        gives the element back to C, which also decides on the interrupt."""
        self._punted += 1
        try:
            self._submit(q, chain)
        except _Fatal as e:
            self.fail(str(e))

    def serve_failed(self, q, chain, err: int, flush_failed: bool) -> None:
        """A chain the C path served and the host failed with ``err``: parse
        it again, and complete it with that error through the policies (a
        retry after a stop is the Python path's). ``flush_failed``: a flush
        failed in C (the backend's flushes fail from now on)."""
        if flush_failed:
            self.backend.flush_failed(errno.EIO)
        self._c_failed = err or errno.EIO
        try:
            self.serve_punted(q, chain)
        finally:
            self._c_failed = 0

    def complete_punted(self) -> None:
        """Finish the handed-over requests the backend has completed."""
        self._complete(self.backend.reap(), notify=False)

    def _trace(self, req: _Request, token: int, status: int) -> None:
        fired = self.backend.fired
        self.trace.add(req.queue.index, req.head, req.rtype, req.sector, req.nbytes, req.t0,
                       time.monotonic_ns(), status, fired.pop(token, -1) if fired else -1)

    def counters(self) -> dict:
        """The device's counters: the Python path's ``stats`` plus, when the C
        path ran, its counters (requests, bytes, batches, interrupts sent and
        suppressed, punts, ...), summed over activations."""
        out = dict(self.stats)
        fast = dict(self._fast_done)
        if self._fast is not None:
            for k, v in self._fast.counters().items():
                fast[k] = fast.get(k, 0) + v
        for k, v in fast.items():
            out[k] = out.get(k, 0) + v
        out["requests"] -= self._punted  # a punted request was counted on both sides
        if self.backend.inject is not None:  # requests a blkdebug rule fired on, both paths
            out["injected"] = out.get("injected", 0) + self.backend.stats["injected"]
        if self.backend.stats["throttled"]:  # requests the Python path held (throttling.*)
            out["throttled"] = out.get("throttled", 0) + self.backend.stats["throttled"]
        return out

    def warn(self, msg: str) -> None:
        """One warning line, the first 10 times (bad requests, I/O errors)."""
        self._warn(msg)

    def interrupts_changed(self) -> None:
        """The transport's interrupts changed (an MSI-X vector masked, unmasked
        or moved): the C path re-reads which queues it may signal directly."""
        if self._fast is not None:
            fastpath.refresh_interrupts(self._fast, self.interrupt, len(self.queues))

    def _warn(self, msg: str) -> None:
        self._warned += 1
        if self._warned <= 10:
            log.warning("%s: %s%s", self.name, msg,
                        " (further such messages suppressed)" if self._warned == 10 else "")

    # -- parsing ------------------------------------------------------------------

    def _submit(self, q, chain) -> bool:
        """Parse and start one request. True if it completed at once (used ring touched)."""
        mem = self.mem
        self.stats["requests"] += 1
        if not chain.writable or not chain.writable[-1][1]:
            raise _Fatal(f"queue {q.index}, chain {chain.head}: no writable status byte")
        if (q.index << 16) | chain.head in self._inflight:
            raise _Fatal(f"queue {q.index}, chain {chain.head}: the driver made it available "
                         f"again while the device still owns it")
        last_gpa, last_len = chain.writable[-1]
        status_gpa = last_gpa + last_len - 1
        win = chain.writable[:-1] + ([(last_gpa, last_len - 1)] if last_len > 1 else [])
        t0 = time.monotonic_ns() if self.trace is not None else 0
        rtype, sector = 0xFF, 0
        try:
            header, rout = _split(chain.readable, HEADER.size)
            if header is None:
                raise _BadRequest(S_IOERR, "request header shorter than 16 bytes")
            if len(header) == 1:    # the usual layout: the header in one buffer
                rtype, _, sector = HEADER.unpack_from(mem.view(header[0][0], HEADER.size))
            else:
                rtype, _, sector = HEADER.unpack(b"".join(mem.read(g, n) for g, n in header))
            token = (q.index << 16) | chain.head
            if rtype not in KNOWN_TYPES:
                raise _BadRequest(S_UNSUPP, f"unsupported request type {rtype:#x}")
            if rtype == T_IN or rtype == T_OUT:
                return self._rw(q, chain.head, token, rtype, sector, rout, win, status_gpa, t0)
            if rout and rtype not in RANGE_TYPES or \
                    win and rtype not in (T_GET_ID,):
                raise _BadRequest(S_IOERR, f"type {rtype} request with unexpected data buffers")
            if rtype == T_FLUSH:
                self._start(token, _Request(q, chain.head, status_gpa, 1, T_FLUSH, sector, 0, t0),
                            self.backend.flush, token, q.index)
                return False
            if rtype == T_GET_ID:
                if self.backend.inject is not None:
                    req = self._inflight[token] = _Request(q, chain.head, status_gpa, 1,
                                                           T_GET_ID, sector, 0, t0)
                    req.retry = (self.backend.get_id_injected, (token, q.index))
                    if self.backend.get_id_injected(token, q.index):
                        return False        # a rule answers it (completes through reap)
                    del self._inflight[token]
                n = min(ID_BYTES, _total(win))
                data = self.serial.ljust(ID_BYTES, b"\0")[:n]
                pos = 0
                for gpa, length in win:
                    chunk = data[pos:pos + length]
                    if chunk:
                        mem.write(gpa, chunk)
                    pos += len(chunk)
                mem.write_u(status_gpa, 1, S_OK)
                if self.trace is not None:
                    self._trace(_Request(q, chain.head, status_gpa, n + 1, T_GET_ID, sector, 0, t0),
                                -1, S_OK)
                q.add_used(mem, chain.head, n + 1)
                return True
            return self._discard(q, chain.head, token, rtype, rout, status_gpa, t0)
        except _BadRequest as bad:
            self.stats["errors"] += 1
            self._warn(f"queue {q.index}, chain {chain.head}: {bad.why}")
            mem.write_u(status_gpa, 1, bad.status)
            if self.trace is not None:
                self._trace(_Request(q, chain.head, status_gpa, 1, rtype, sector, 0, t0), -1,
                            bad.status)
            q.add_used(mem, chain.head, 1)
            return True

    def _check_range(self, sector: int, nbytes: int) -> int:
        if nbytes % SECTOR:
            raise _BadRequest(S_IOERR, f"data length {nbytes} is not a multiple of 512")
        capacity = self.backend.size // SECTOR
        if sector >= capacity and nbytes or sector + nbytes // SECTOR > capacity:
            raise _BadRequest(S_IOERR, f"sectors [{sector}, +{nbytes // SECTOR}) beyond the "
                              f"capacity of {capacity}")
        return sector * SECTOR

    def _rw(self, q, head, token, rtype, sector, rout, win, status_gpa, t0=0) -> bool:
        mem = self.mem
        if rtype == T_IN:
            if rout:
                raise _BadRequest(S_IOERR, "read request with device-readable data buffers")
            data = win
        else:
            if self.backend.read_only:
                raise _BadRequest(S_IOERR, "write to a read-only disk")
            if win:
                raise _BadRequest(S_IOERR, "write request with device-writable data buffers")
            data = rout
        nbytes = _total(data)
        if nbytes > MAX_REQUEST_BYTES:
            raise _BadRequest(S_IOERR, f"request of {nbytes} bytes exceeds {MAX_REQUEST_BYTES}")
        nsegs = sum(1 for _, n in data if n)
        if nsegs > MAX_SEGMENTS:
            raise _BadRequest(S_IOERR, f"request of {nsegs} data buffers exceeds {MAX_SEGMENTS}")
        if nsegs > self.knobs.seg_max:
            raise _BadRequest(S_IOERR, f"request of {nsegs} data buffers exceeds seg_max "
                              f"{self.knobs.seg_max}")
        if any(n > self.knobs.size_max for _, n in data):
            raise _BadRequest(S_IOERR, f"a data buffer of more than size_max "
                              f"{self.knobs.size_max} bytes")
        offset = self._check_range(sector, nbytes)
        bs = self.block_size
        if bs > SECTOR and (offset % bs or nbytes % bs):
            raise _BadRequest(S_IOERR, f"sectors [{sector}, +{nbytes // SECTOR}) not aligned to "
                              f"the {bs}-byte logical block")
        iov = [mem.view(gpa, n) for gpa, n in data if n]
        if rtype == T_IN:
            self.stats["bytes_read"] += nbytes
            self._start(token, _Request(q, head, status_gpa, nbytes + 1, rtype, sector, nbytes,
                                        t0), self.backend.readv, token, offset, iov, q.index)
        else:
            self.stats["bytes_written"] += nbytes
            self._start(token, _Request(q, head, status_gpa, 1, rtype, sector, nbytes, t0),
                        self.backend.writev, token, offset, iov, q.index)
        return False

    def _discard(self, q, head, token, rtype, rout, status_gpa, t0=0) -> bool:
        mem = self.mem
        if self.backend.read_only:
            raise _BadRequest(S_IOERR, "discard, write-zeroes or secure erase on a read-only "
                              "disk")
        feature = {T_DISCARD: F_DISCARD, T_WRITE_ZEROES: F_WRITE_ZEROES,
                   T_SECURE_ERASE: F_SECURE_ERASE}[rtype]
        if not self._features & feature:
            raise _BadRequest(S_UNSUPP, f"type {rtype} without its feature negotiated")
        nraw = _total(rout)     # checked before anything is read: the guest chose it
        if nraw != SEGMENT.size:
            raise _BadRequest(S_IOERR if nraw % SEGMENT.size else S_UNSUPP,
                              f"{nraw} bytes of range segments (exactly one is supported)")
        raw = b"".join(mem.read(g, n) for g, n in rout)
        sector, num, flags = SEGMENT.unpack(raw)
        limit = {T_DISCARD: self.knobs.max_discard_sectors,
                 T_WRITE_ZEROES: self.knobs.max_write_zeroes_sectors,
                 T_SECURE_ERASE: MAX_SECURE_ERASE_SECTORS}[rtype]
        if flags & ~WRITE_ZEROES_UNMAP or (rtype != T_WRITE_ZEROES and flags):
            raise _BadRequest(S_UNSUPP, f"segment flags {flags:#x}")
        if num > limit:
            raise _BadRequest(S_IOERR, f"{num} sectors exceed the limit of {limit}")
        offset = self._check_range(sector, num * SECTOR)
        req = _Request(q, head, status_gpa, 1, rtype, sector, num * SECTOR, t0)
        if rtype == T_DISCARD:
            self._start(token, req, self.backend.discard, token, offset, num * SECTOR, q.index)
        elif rtype == T_SECURE_ERASE:
            self._start(token, req, self.backend.secure_erase, token, offset, num * SECTOR,
                        q.index)
        else:
            self._start(token, req, self.backend.write_zeroes, token, offset, num * SECTOR,
                        bool(flags & WRITE_ZEROES_UNMAP), q.index)
        return False


class _Fatal(Exception):
    """A request the device cannot even answer: DEVICE_NEEDS_RESET."""


def _total(segments) -> int:
    return sum(n for _, n in segments)


def _split(segments, n: int):
    """Split the first ``n`` bytes off a list of (gpa, len): (head or None, rest)."""
    if n and segments and segments[0][1] >= n:  # the first buffer holds them all
        gpa, length = segments[0]
        rest = segments[1:]
        if length > n:
            rest.insert(0, (gpa + n, length - n))
        return [(gpa, n)], rest
    head, rest = [], list(segments)
    while n and rest:
        gpa, length = rest.pop(0)
        if length > n:
            head.append((gpa, n))
            rest.insert(0, (gpa + n, length - n))
            n = 0
        else:
            head.append((gpa, length))
            n -= length
    return (head if n == 0 else None), rest


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
