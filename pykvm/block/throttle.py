"""I/O limits as QEMU's ``-drive ...,throttling.*`` options define them.

Options (given here without the ``throttling.`` prefix; 0 means no limit):

  iops-total, iops-read, iops-write     operations per second
  bps-total, bps-read, bps-write        bytes per second
  X-max                                 the burst rate of limit X
  X-max-length                          how many seconds a burst may last (default 1)
  iops-size                             a request of more bytes counts as nbytes/iops-size ops
  group                                 disks naming the same group share one budget

Values are plain numbers (decimal, or hexadecimal with 0x), as QEMU takes them;
the byte-valued ones (bps-*, iops-size) also take a size suffix (``50M``: 50 MiB,
K/M/G/T in powers of 1024), which QEMU's -drive refuses.

The rule, a leaky bucket per limit ("leaky bucket as a meter"). A bucket has
a rate (the limit), a burst rate (X-max, or rate/10 when no burst is given),
a burst length in seconds (X-max-length, 1 by default), a level and, only
when the burst length is above 1, a burst level. A group keeps six buckets
(bps and iops; total, read, write) and the time of its last leak.
``admit(is_write, nbytes, now_ns)``, under the group's lock:

1. Leak: if now is after the last leak, each bucket with a rate loses
   ``rate * delta / 1e9`` from its level and, with a burst length above 1,
   ``burst_rate * delta / 1e9`` from its burst level, neither below 0 (delta:
   the nanoseconds since the last leak, which becomes now). An older ``now``
   (another thread read the clock first) leaks nothing.
2. Wait: each bucket the direction uses (bps-total, bps-read or bps-write,
   iops-total, iops-read or iops-write) that has a rate says how long to wait:
   ``over = level - burst_rate * burst_length``; if over > 0, ``over * 1e9 / rate``
   nanoseconds (truncated). Else, with a burst length above 1, ``over =
   burst_level - burst_rate / 10``; if over > 0, ``over * 1e9 / burst_rate``.
   Else 0. The request waits for the longest of them.
3. Fill: a request that need not wait (0) is accounted at once: nbytes into
   its bps buckets, its operations into its iops buckets (1, or
   ``nbytes / iops-size`` when iops-size is set and nbytes is larger), into
   the level and, with a burst length above 1, the burst level.

So a request is admitted while its buckets are not over capacity, and may
take them over it; the next one then waits until they have leaked back. A
request that waits asks again when its time has come (it may have to wait
again if another member of the group went first). Throttled requests wait,
they are never failed; the caller keeps them in order per direction, and no
request passes one waiting in the same direction (``ThrottledQueue`` for the
Python path, native/blk.c for the C one). A drain lets the held requests go
at once (accounted, not asked), as QEMU's does.

The group's state lives in one C struct (native/throttle.h) so that the C I/O
threads of several disks and the Python path share it; ``ThrottleGroup.admit``
is the Python twin of ``pykvm_throttle_admit`` working on that struct under
the same mutex, with the same floating-point operations in the same order.

What QEMU does and this does not: QEMU hands a group's budget to its members
in turn (round robin); here whoever asks first when time has come goes first.
And a request the C thread held that no longer maps in C when it goes (its
qcow2 range left the mapping table meanwhile) is handed to Python, which asks
the group again: it is counted twice.
"""
from __future__ import annotations

import collections
import heapq
import os
import re
import threading
import time
import weakref

from .._native import ffi, lib

VALUE_MAX = 10 ** 15        # QEMU's limit on every rate
KINDS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
# the bucket index of each kind (native/throttle.h)
_INDEX = {"bps-total": lib.PYKVM_THROTTLE_BPS_TOTAL, "bps-read": lib.PYKVM_THROTTLE_BPS_READ,
          "bps-write": lib.PYKVM_THROTTLE_BPS_WRITE, "iops-total": lib.PYKVM_THROTTLE_OPS_TOTAL,
          "iops-read": lib.PYKVM_THROTTLE_OPS_READ, "iops-write": lib.PYKVM_THROTTLE_OPS_WRITE}
# the buckets a direction uses: bytes then operations, total then its own
_USED = ((_INDEX["bps-total"], _INDEX["bps-read"], _INDEX["iops-total"], _INDEX["iops-read"]),
         (_INDEX["bps-total"], _INDEX["bps-write"], _INDEX["iops-total"], _INDEX["iops-write"]))
OPTIONS = KINDS + tuple(k + "-max" for k in KINDS) + tuple(k + "-max-length" for k in KINDS) + \
    ("iops-size", "group")
_WAIT_MAX = float(1 << 62)
_SIZE = re.compile(r"(\d+)([KMGT]?)B?", re.IGNORECASE)
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ThrottleError(ValueError):
    """A throttling option that cannot be used; one line naming the option(s)."""


def _number(key: str, value, sizes: bool) -> int:
    if isinstance(value, bool):
        raise ThrottleError(f"throttling.{key}={value}: not a number")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip()
        m = _SIZE.fullmatch(text) if sizes else None
        if m:
            n = int(m.group(1)) * _SUFFIX[m.group(2).upper()]
        elif re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            n = int(text, 16)
        elif re.fullmatch(r"-?\d+", text):
            n = int(text)
        else:
            what = "a number of bytes (a size like 50M is fine)" if sizes else "a number"
            raise ThrottleError(f"throttling.{key}={value}: not {what}")
    return n


class ThrottleConfig:
    """Validated throttling options (``from a dict`` of QEMU's option names
    without the ``throttling.`` prefix, values as strings or ints). Raises
    ThrottleError (a ValueError) with one line naming the option, for: a
    value that is not a number, negative or above 10^15; a total limit with a
    read or write limit of the same kind (rates, or burst rates); iops-size
    without an iops limit; a burst length of 0, or one above 1 without a
    burst rate, or whose burst rate times length exceeds 10^15; a burst rate
    without a rate, or below it. These are the combinations QEMU refuses."""

    def __init__(self, options: dict | None = None):
        options = dict(options or {})
        for key in options:
            if key not in OPTIONS:
                raise ThrottleError(f"throttling.{key}: unknown option (one of "
                                    f"{', '.join(OPTIONS)})")
        self.group = options.pop("group", None)
        if self.group is not None:
            self.group = str(self.group)
            if not self.group:
                raise ThrottleError("throttling.group=: the group needs a name")
        self.given = {}
        for key, value in options.items():
            n = _number(key, value, sizes=key.startswith("bps") and not key.endswith("length")
                        or key == "iops-size")
            if n < 0 or n > VALUE_MAX:
                raise ThrottleError(f"throttling.{key}={value}: must be from 0 to {VALUE_MAX}")
            self.given[key] = n
        g = self.given.get
        self.rate = {k: g(k, 0) for k in KINDS}
        self.burst = {k: g(k + "-max", 0) for k in KINDS}
        self.length = {k: g(k + "-max-length", 1) for k in KINDS}
        self.iops_size = g("iops-size", 0)
        for kind in ("bps", "iops"):
            for table, suffix in ((self.rate, ""), (self.burst, "-max")):
                total = table[f"{kind}-total"]
                rw = [d for d in ("read", "write") if table[f"{kind}-{d}"]]
                if total and rw:
                    both = ", ".join(f"throttling.{kind}-{d}{suffix}={g(f'{kind}-{d}{suffix}')}"
                                     for d in ["total"] + rw)
                    raise ThrottleError(f"{both}: a total limit and a read or write limit "
                                        f"of the same kind cannot be combined")
        if self.iops_size and not any(self.rate[k] for k in KINDS if k.startswith("iops")):
            raise ThrottleError(f"throttling.iops-size={self.iops_size}: needs an iops limit "
                                f"(iops-total, iops-read or iops-write)")
        for k in KINDS:
            rate, burst, length = self.rate[k], self.burst[k], self.length[k]
            if length == 0:
                raise ThrottleError(f"throttling.{k}-max-length=0: a burst lasts at least "
                                    f"1 second")
            if length > 1 and not burst:
                raise ThrottleError(f"throttling.{k}-max-length={length}: needs the burst "
                                    f"rate throttling.{k}-max")
            if burst and length > VALUE_MAX // burst:
                raise ThrottleError(f"throttling.{k}-max={burst}, throttling.{k}-max-length="
                                    f"{length}: the burst (rate times length) exceeds "
                                    f"{VALUE_MAX}")
            if burst and not rate:
                raise ThrottleError(f"throttling.{k}-max={burst}: needs the rate "
                                    f"throttling.{k}")
            if burst and burst < rate:
                raise ThrottleError(f"throttling.{k}-max={burst}: the burst rate is below "
                                    f"throttling.{k}={rate}")

    @property
    def enabled(self) -> bool:
        """Is any limit set? (Without one, a disk is not throttled.)"""
        return any(self.rate.values())

    def key(self) -> tuple:
        return (tuple(self.rate.values()), tuple(self.burst.values()),
                tuple(self.length.values()), self.iops_size)

    def describe(self) -> str:
        return ",".join(f"throttling.{k}={v}" for k, v in self.given.items())

    def fill(self, state) -> None:
        """Write this configuration into a group's C state (levels emptied)."""
        for k in KINDS:
            b = state.buckets[_INDEX[k]]
            rate = float(self.rate[k])
            b.rate = rate
            b.burst_rate = float(self.burst[k]) if self.burst[k] else rate / 10
            b.burst_seconds = float(self.length[k])
            b.level = 0.0
            b.burst_level = 0.0
        state.iops_size = self.iops_size
        state.previous_ns = 0


class ThrottleGroup:
    """A throttle group: one budget (six leaky buckets) shared by its disks,
    kept in C memory (``state``, struct pykvm_throttle) so the C I/O threads
    of its disks share it with the Python path."""

    def __init__(self, name: str, config: ThrottleConfig):
        self.name = name
        raw = lib.pykvm_throttle_new()
        if raw == ffi.NULL:
            raise MemoryError("throttle group")
        self.state = ffi.gc(raw, lib.pykvm_throttle_free)
        self.configure(config)

    def configure(self, config: ThrottleConfig) -> None:
        """New limits for the whole group (the levels start empty again)."""
        lib.pykvm_throttle_lock(self.state)
        try:
            self.config = config
            config.fill(self.state)
        finally:
            lib.pykvm_throttle_unlock(self.state)

    def admit(self, is_write: bool, nbytes: int, now_ns: int) -> int:
        """0: the request goes now and is accounted; else the nanoseconds to
        wait before asking again (the rule in this module's docstring)."""
        t = self.state
        lib.pykvm_throttle_lock(t)
        try:
            _leak(t, now_ns)
            wait = 0
            for i in _USED[bool(is_write)]:
                w = _bucket_wait(t.buckets[i])
                if w > wait:
                    wait = w
            if not wait:
                _fill(t, bool(is_write), nbytes)
            return wait
        finally:
            lib.pykvm_throttle_unlock(t)

    def account(self, is_write: bool, nbytes: int, now_ns: int) -> None:
        """Account a request without asking (a drain releasing held requests)."""
        t = self.state
        lib.pykvm_throttle_lock(t)
        try:
            _leak(t, now_ns)
            _fill(t, bool(is_write), nbytes)
        finally:
            lib.pykvm_throttle_unlock(t)

    def admit_c(self, is_write: bool, nbytes: int, now_ns: int) -> int:
        """The same question asked of the C twin (pykvm_throttle_admit)."""
        return lib.pykvm_throttle_admit(self.state, int(bool(is_write)), nbytes, now_ns)

    def account_c(self, is_write: bool, nbytes: int, now_ns: int) -> None:
        lib.pykvm_throttle_account(self.state, int(bool(is_write)), nbytes, now_ns)

    def levels(self) -> list[tuple[float, float]]:
        """(level, burst_level) of the six buckets, in KINDS order."""
        return [(self.state.buckets[_INDEX[k]].level, self.state.buckets[_INDEX[k]].burst_level)
                for k in KINDS]


# -- the rule, steps 1-3 of the module docstring (native/throttle.c: the same) --

def _leak(t, now_ns: int) -> None:
    if now_ns <= t.previous_ns:
        return
    delta = float(now_ns - t.previous_ns)
    t.previous_ns = now_ns
    for k in t.buckets:
        if k.rate == 0.0:
            continue
        level = k.level - k.rate * delta / 1e9
        k.level = level if level > 0.0 else 0.0
        if k.burst_seconds > 1.0:
            level = k.burst_level - k.burst_rate * delta / 1e9
            k.burst_level = level if level > 0.0 else 0.0


def _ns(units: float, rate: float) -> int:
    wait = units * 1e9 / rate
    return int(wait) if wait < _WAIT_MAX else int(_WAIT_MAX)


def _bucket_wait(k) -> int:
    if k.rate == 0.0:
        return 0
    over = k.level - k.burst_rate * k.burst_seconds
    if over > 0.0:
        return _ns(over, k.rate)
    if k.burst_seconds > 1.0:
        over = k.burst_level - k.burst_rate / 10.0
        if over > 0.0:
            return _ns(over, k.burst_rate)
    return 0


def _fill(t, is_write: bool, nbytes: int) -> None:
    ops = 1.0
    if t.iops_size and nbytes > t.iops_size:
        ops = float(nbytes) / float(t.iops_size)
    for j, i in enumerate(_USED[is_write]):
        k = t.buckets[i]
        if k.rate == 0.0:
            continue
        units = float(nbytes) if j < 2 else ops
        k.level += units
        if k.burst_seconds > 1.0:
            k.burst_level += units


# -- the registry: disks naming the same group share it --------------------------

_GROUPS: "weakref.WeakValueDictionary[str, ThrottleGroup]" = weakref.WeakValueDictionary()
_GROUPS_LOCK = threading.Lock()


def throttle_group(name: str, config: ThrottleConfig) -> ThrottleGroup:
    """The group called ``name``, made with ``config`` if no disk holds it yet.
    A later disk that gives other limits for the group replaces them for all
    its members (QEMU's rule: the last one wins). A group lives as long as a
    disk holds it."""
    with _GROUPS_LOCK:
        group = _GROUPS.get(name)
        if group is None:
            group = _GROUPS[name] = ThrottleGroup(name, config)
        elif group.config.key() != config.key():
            group.configure(config)
        return group


def group_object(options: dict) -> ThrottleGroup:
    """QEMU's ``-object throttle-group,id=NAME,limits.KEY=VALUE,...`` (the
    options after the type): the group, made or given these limits. Raises
    ThrottleError naming the option."""
    options = dict(options)
    name = options.pop("id", "")
    if not name:
        raise ThrottleError("throttle-group: id= is missing (the name throttle nodes and "
                            "throttling.group= use)")
    limits = {}
    for key, value in options.items():
        if not key.startswith("limits."):
            raise ThrottleError(f"throttle-group: unknown option '{key}' (id, limits.KEY)")
        limits[key[len("limits."):]] = value
    if "group" in limits:
        raise ThrottleError("throttle-group: limits.group is not a limit")
    try:
        config = ThrottleConfig(limits)
    except ThrottleError as e:
        raise ThrottleError(str(e).replace("throttling.", "limits.")) from None
    return throttle_group(name, config)


def find_group(name: str) -> ThrottleGroup | None:
    """The group called ``name`` if something holds it (a disk, --object)."""
    with _GROUPS_LOCK:
        return _GROUPS.get(name)


def group_for(config: ThrottleConfig, disk_name: str) -> ThrottleGroup | None:
    """The group a disk with ``config`` joins: its throttling.group, else a
    group of its own named after the disk; None when no limit is set."""
    if not config.enabled:
        return None
    if config.group is None:
        return ThrottleGroup(disk_name, config)
    return throttle_group(config.group, config)


# -- the Python path: requests held in order until their time ---------------------

class _Waker:
    """One thread for every throttled backend of the process: at a due time
    it calls the callback given (which writes a notifier eventfd)."""

    def __init__(self):
        self._heap: list = []
        self._cond = threading.Condition()
        self._thread = None
        self._seq = 0

    def at(self, due_ns: int, callback) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="throttle-waker",
                                                daemon=True)
                self._thread.start()
            self._seq += 1
            heapq.heappush(self._heap, (due_ns, self._seq, callback))
            if self._heap[0][1] == self._seq:
                self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                if not self._heap:
                    self._cond.wait()
                    continue
                due = self._heap[0][0]
                now = time.monotonic_ns()
                if due > now:
                    self._cond.wait((due - now) / 1e9)
                    continue
                _, _, callback = heapq.heappop(self._heap)
                callback()


_WAKER = _Waker()


class ThrottledQueue:
    """A BlockBackend's throttled requests: ``hold()`` says whether a read or
    write must wait (and then keeps it, in order per direction); ``release()``
    (from reap) starts the ones whose time has come; a wake-up writes the
    backend's notifier eventfd at that time so its device calls reap.
    ``stats["throttled"]`` counts the requests that had to wait.
    ``clock`` (monotonic nanoseconds) and ``waker`` (``waker(due_ns, fn)``
    calls fn at due_ns) may be injected by tests."""

    def __init__(self, group: ThrottleGroup, notifier: int, stats=None, clock=time.monotonic_ns,
                 waker=None):
        self.group = group
        self.stats = stats if stats is not None else collections.Counter()
        self._notifier = notifier
        self._clock = clock
        self._waker = waker or _WAKER.at
        self._held = (collections.deque(), collections.deque())  # reads, writes
        self._due = [0, 0]          # when the first held request asks again; 0: none held
        self._lock = threading.Lock()
        self._closed = False

    @property
    def held(self) -> int:
        return len(self._held[0]) + len(self._held[1])

    def hold(self, is_write: bool, nbytes: int, fn, *args) -> bool:
        """True: the request waits here (``fn(*args)`` starts it later); False:
        it goes now (accounted)."""
        q = self._held[bool(is_write)]
        if not q:
            now = self._clock()
            wait = self.group.admit(is_write, nbytes, now)
            if not wait:
                return False
            self._arm(bool(is_write), now + wait)
        q.append((nbytes, fn, args))
        self.stats["throttled"] += 1    # requests that had to wait
        return True

    def _arm(self, d: int, due: int) -> None:
        self._due[d] = due
        self._waker(due, self._wake)

    def _wake(self) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self._notifier, 1)

    def release(self) -> None:
        """Start what may go now, in order; arm a wake-up for the rest."""
        for d in (0, 1):
            q = self._held[d]
            if not q:
                continue
            now = self._clock()
            if now < self._due[d]:
                continue
            while q:
                nbytes, fn, args = q[0]
                wait = self.group.admit(d, nbytes, now)
                if wait:
                    self._arm(d, now + wait)
                    break
                q.popleft()
                fn(*args)
            else:
                self._due[d] = 0

    def release_all(self) -> None:
        """Start everything held now (a drain), accounted without waiting."""
        for d in (0, 1):
            q = self._held[d]
            while q:
                nbytes, fn, args = q.popleft()
                self.group.account(d, nbytes, self._clock())
                fn(*args)
            self._due[d] = 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
