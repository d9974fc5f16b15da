"""throttling.* (pykvm/block/throttle.py and native/throttle.c).

The options as QEMU validates them (and QEMU itself as the oracle where it is
installed), the leaky-bucket maths on an injected clock, the Python and C twins
given the same arrivals (their answers compared exactly), BlockBackend holding
and releasing requests in order, and the C I/O thread holding, releasing and
completing throttled requests. No assertion here is about speed: times come
from an injected clock, or only bound how long a test may wait for completions.
"""
import collections
import os
import random
import select
import shutil
import subprocess
import time

import pytest

from pykvm.aio import READ, WRITE
from pykvm.block import BlockBackend, open_image
from pykvm.block.throttle import (KINDS, ThrottleConfig, ThrottledQueue, ThrottleError,
                                  ThrottleGroup, group_for, throttle_group)
from pykvm.errors import ConfigError
from pykvm.machine import DiskSpec, open_disk
from pykvm.virtio import blk as B
from tests.helpers.virtio_driver import T_IN, T_OUT
from tests.conftest import Engine
from tests.unit.test_virtio_blk import DISK, Rig, pattern

MS = 1_000_000
S = 1_000_000_000

# -- validation --------------------------------------------------------------------

REFUSED = [
    ({"iops-total": -1}, "throttling.iops-total=-1", "from 0 to"),
    ({"iops-total": "-5"}, "throttling.iops-total=-5", "from 0 to"),
    ({"bps-read": 10 ** 15 + 1}, "throttling.bps-read=1000000000000001", "from 0 to"),
    ({"iops-write": "abc"}, "throttling.iops-write=abc", "not a number"),
    ({"iops-total": "1.5"}, "throttling.iops-total=1.5", "not a number"),
    ({"iops-total": ""}, "throttling.iops-total=", "not a number"),
    ({"iops-total": "5K"}, "throttling.iops-total=5K", "not a number"),
    ({"bps-total": "50X"}, "throttling.bps-total=50X", "not a number of bytes"),
    ({"iops-total": 100, "iops-read": 5}, "throttling.iops-total=100, throttling.iops-read=5",
     "cannot be combined"),
    ({"iops-total": 100, "iops-write": 5}, "throttling.iops-write=5", "cannot be combined"),
    ({"bps-total": 100, "bps-read": 5}, "throttling.bps-read=5", "cannot be combined"),
    ({"bps-total": 100, "bps-write": 5, "bps-read": 7},
     "throttling.bps-total=100, throttling.bps-read=7, throttling.bps-write=5",
     "cannot be combined"),
    ({"iops-size": 4096}, "throttling.iops-size=4096", "needs an iops limit"),
    ({"bps-total": 100, "iops-size": 4096}, "throttling.iops-size=4096", "needs an iops limit"),
    ({"iops-total": 10, "iops-total-max": 100, "iops-total-max-length": 0},
     "throttling.iops-total-max-length=0", "at least 1 second"),
    ({"iops-total": 10, "iops-total-max-length": 5}, "throttling.iops-total-max-length=5",
     "needs the burst rate throttling.iops-total-max"),
    ({"iops-total-max": 100}, "throttling.iops-total-max=100", "needs the rate"),
    ({"bps-write-max": 100}, "throttling.bps-write-max=100", "needs the rate"),
    ({"iops-total": 100, "iops-total-max": 50}, "throttling.iops-total-max=50",
     "below throttling.iops-total=100"),
    ({"bps-total": 10 ** 14, "bps-total-max": 10 ** 15, "bps-total-max-length": 2},
     "throttling.bps-total-max-length=2", "exceeds"),
    ({"iops": 5}, "throttling.iops", "unknown option"),
    ({"group": ""}, "throttling.group=", "needs a name"),
]

# accepted by QEMU too (the size suffix below is ours alone)
ACCEPTED = [
    {"iops-total": 0, "iops-read": 5},
    {"iops-total": 100, "iops-total-max-length": 1},
    {"iops-total": "0x64"},
    {"iops-read": 10, "iops-write": 20, "bps-total": 1000, "iops-size": 512},
    {"iops-total": 100, "iops-total-max": 1000, "iops-total-max-length": 60, "group": "g"},
    {"bps-read": 5, "bps-read-max": 5},
]


@pytest.mark.parametrize("options,names,why", REFUSED)
def test_refused(options, names, why):
    with pytest.raises(ThrottleError) as e:
        ThrottleConfig(options)
    msg = str(e.value)
    assert names in msg and why in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("options", ACCEPTED)
def test_accepted(options):
    cfg = ThrottleConfig(options)
    assert cfg.enabled


def test_numbers_and_sizes():
    cfg = ThrottleConfig({"bps-total": "50M", "bps-total-max": "1G", "iops-read": "0x10",
                          "iops-size": "4K"})
    assert cfg.rate["bps-total"] == 50 << 20 and cfg.burst["bps-total"] == 1 << 30
    assert cfg.rate["iops-read"] == 16 and cfg.iops_size == 4096
    assert cfg.length["bps-total"] == 1
    assert not ThrottleConfig({}).enabled and not ThrottleConfig({"iops-total": 0}).enabled


def _qemu_drive(options: dict) -> subprocess.CompletedProcess:
    drive = "file=/dev/null,format=raw,if=none,readonly=on," + ",".join(
        f"throttling.{k}={v}" for k, v in options.items())
    return subprocess.run(["qemu-system-x86_64", "-M", "none", "-nodefaults", "-nographic",
                           "-S", "-monitor", "stdio", "-drive", drive],
                          input="quit\n", capture_output=True, text=True, timeout=30)


QEMU_REFUSED = [o for o, names, why in REFUSED
                if why not in ("unknown option", "needs a name", "not a number")
                and not any(str(v).startswith("-") for v in o.values())]


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs QEMU")
@pytest.mark.parametrize("options", QEMU_REFUSED + ACCEPTED)
def test_qemu_agrees(options):
    """QEMU's -drive refuses what we refuse and takes what we take."""
    ours = True
    try:
        ThrottleConfig(options)
    except ThrottleError:
        ours = False
    r = _qemu_drive(options)
    assert (r.returncode == 0) == ours, r.stderr


# -- the bucket maths, on an injected clock ------------------------------------------

def group(options, name="t"):
    return ThrottleGroup(name, ThrottleConfig(options))


def test_iops_bucket_without_burst_holds_a_tenth_of_a_second():
    g = group({"iops-total": 100})          # capacity 100/10 = 10 operations
    waits = [g.admit(False, 4096, 0) for _ in range(12)]
    # admitted while the level is not above 10: 11 requests (levels 0..10)
    assert waits[:11] == [0] * 11
    assert waits[11] == 10 * MS             # (11 - 10) / 100 per second
    assert 0 < g.admit(True, 4096, 10 * MS - 1000) <= 1000   # (truncated to the ns)
    assert g.admit(True, 4096, 10 * MS) == 0   # leaked down to 10 exactly
    assert g.admit(False, 512, 10 * MS) == 10 * MS
    assert g.levels()[KINDS.index("iops-total")][0] == 11.0


def test_bps_bucket():
    g = group({"bps-read": 1 << 20})         # capacity 104857.6 bytes
    n = 0
    while g.admit(False, 4096, 0) == 0:
        n += 1
    assert n == 26                           # 25 * 4096 = 102400 <= capacity
    over = 26 * 4096 - (1 << 20) / 10
    assert g.admit(False, 4096, 0) == int(over * 1e9 / (1 << 20))
    assert g.admit(True, 1 << 30, 0) == 0    # writes are not limited here


def test_leak_and_time_going_backwards():
    g = group({"iops-total": 100})
    for _ in range(11):
        g.admit(False, 1, S)
    assert g.admit(False, 1, S) > 0
    assert g.admit(False, 1, S - 5 * MS) > 0   # an older clock reading leaks nothing
    assert g.levels()[KINDS.index("iops-total")][0] == 11.0
    assert g.admit(False, 1, 2 * S) == 0        # a second later: empty, then one in it
    assert g.levels()[KINDS.index("iops-total")][0] == 1.0


def test_read_and_write_buckets_are_separate():
    g = group({"iops-read": 10, "iops-write": 1000})
    assert [g.admit(False, 1, 0) for _ in range(3)] == [0, 0, 100 * MS]
    assert all(g.admit(True, 1, 0) == 0 for _ in range(50))


def test_iops_size_counts_large_requests_as_several():
    g = group({"iops-total": 1000, "iops-size": 4096})
    lv = lambda: g.levels()[KINDS.index("iops-total")][0]   # noqa: E731
    g.admit(False, 512, 0)
    assert lv() == 1.0
    g.admit(False, 4096, 0)
    assert lv() == 2.0
    g.admit(True, 16384, 0)
    assert lv() == 6.0
    g.admit(True, 6144, 0)
    assert lv() == 7.5


def saturate(g, seconds, nbytes=4096, is_write=False, step=None):
    """A request always waiting: the admission times over ``seconds``."""
    now, times = 0, []
    while now < seconds * S:
        wait = g.admit(is_write, nbytes, now)
        if wait:
            now += wait
        else:
            times.append(now)
    return times


def test_steady_rate_is_the_limit():
    times = saturate(group({"iops-total": 500}), 10)
    # the bucket (50) at once, then 500 a second
    assert len(times) == 51 + 5000 - 1 or len(times) == 51 + 5000
    late = [t for t in times if 5 * S <= t < 6 * S]
    assert len(late) in (500, 501)


def test_burst_rate_then_average():
    # 10/s on average; bursts at 100/s for up to 5 s: a bucket of 500
    g = group({"iops-total": 10, "iops-total-max": 100, "iops-total-max-length": 5})
    times = saturate(g, 30)
    first = [t for t in times if t < S]
    # burst level: 100/10 = 10 at once, then 100 a second
    assert 105 <= len(first) <= 112
    # full after about 5.5 s (filling at 100 - 10 per second): then 10 a second
    late = [t for t in times if 20 * S <= t < 30 * S]
    assert 99 <= len(late) <= 101
    assert 500 <= len([t for t in times if t < 6 * S]) <= 580


def test_burst_length_one_is_a_bigger_bucket():
    g = group({"iops-total": 10, "iops-total-max": 100})
    assert sum(1 for _ in range(200) if g.admit(False, 1, 0) == 0) == 101


def test_account_fills_without_asking():
    g = group({"iops-write": 10})
    for _ in range(5):
        g.account(True, 1, 0)
    assert g.levels()[KINDS.index("iops-write")][0] == 5.0
    assert g.admit(True, 1, 0) > 0


# -- the twins: the same arrivals, the same answers ---------------------------------

PARITY_CONFIGS = [
    {"iops-total": 150},
    {"bps-total": "50M"},
    {"iops-read": 300, "iops-write": 100, "bps-write": 1 << 20},
    {"iops-total": 100, "iops-total-max": 300, "iops-total-max-length": 3},
    {"bps-read": 1 << 20, "bps-read-max": 8 << 20, "bps-read-max-length": 4,
     "iops-write": 50, "iops-write-max": 60, "iops-write-max-length": 2},
    {"iops-total": 1000, "iops-size": 4096, "bps-total": 10 << 20, "bps-total-max": 20 << 20},
    {"iops-total": 7, "iops-total-max": 13, "iops-total-max-length": 9, "iops-size": 1000},
]


def simulate(ask, arrivals):
    """Serve ``arrivals`` [(time, member, is_write, nbytes)] as the devices do:
    a FIFO per member and direction, the first of each asking again when its
    wait is over. ``ask(op, is_write, nbytes, now)`` answers; op is "admit" or,
    every 17th request, "account" (a drain). Returns the sequence of answers."""
    queues = collections.defaultdict(collections.deque)
    due = {}
    answers, i, k = [], 0, 0
    while i < len(arrivals) or any(queues.values()):
        nxt = min(due.values(), default=None)
        if i < len(arrivals) and (nxt is None or arrivals[i][0] <= nxt):
            now, member, is_write, nbytes = arrivals[i]
            i += 1
            q = queues[member, is_write]
            q.append(nbytes)
            if len(q) > 1:
                continue
            key = (member, is_write)
        else:
            key = min(due, key=due.get)
            now = due.pop(key)
            member, is_write = key
            q = queues[key]
        while q:
            k += 1
            op = "account" if k % 17 == 0 else "admit"
            wait = ask(op, is_write, q[0], now)
            answers.append((now, wait))
            if wait:
                due[key] = now + wait
                break
            q.popleft()
    return answers


def arrivals_for(seed, members=1, n=600):
    rng = random.Random(seed)
    now, out = 0, []
    for _ in range(n):
        now += rng.choice([0, 0, 0, 1, 1000, 50_000, 2 * MS, 40 * MS])
        out.append((now, rng.randrange(members), rng.random() < 0.4,
                    rng.choice([512, 4096, 4096, 16384, 65536, 1 << 20])))
    return out


@pytest.mark.parametrize("options", PARITY_CONFIGS)
@pytest.mark.parametrize("seed,members", [(1, 1), (2, 3)])
def test_python_and_c_twins_agree(options, seed, members):
    py, c = group(options, "py"), group(options, "c")

    def ask_py(op, is_write, nbytes, now):
        if op == "account":
            py.account(is_write, nbytes, now)
            return 0
        return py.admit(is_write, nbytes, now)

    def ask_c(op, is_write, nbytes, now):
        if op == "account":
            c.account_c(is_write, nbytes, now)
            return 0
        return c.admit_c(is_write, nbytes, now)

    arrivals = arrivals_for(seed, members)
    a, b = simulate(ask_py, arrivals), simulate(ask_c, arrivals)
    assert len(a) > len(arrivals)            # some requests did wait
    assert a == b
    assert py.levels() == c.levels()         # the same doubles, bit for bit


def test_twins_share_one_state():
    g = group({"iops-total": 100})
    assert g.admit(False, 1, 0) == 0 and g.admit_c(True, 1, 0) == 0
    assert g.levels()[KINDS.index("iops-total")][0] == 2.0


# -- groups ----------------------------------------------------------------------------

def test_a_named_group_is_shared_and_the_last_limits_win():
    cfg = ThrottleConfig({"iops-total": 100, "group": "shared-1"})
    a = throttle_group("shared-1", cfg)
    assert throttle_group("shared-1", ThrottleConfig({"iops-total": 100})) is a
    a.admit(False, 1, 0)
    b = throttle_group("shared-1", ThrottleConfig({"iops-total": 300}))
    assert b is a and a.config.rate["iops-total"] == 300
    assert a.levels()[KINDS.index("iops-total")][0] == 0.0   # reconfigured: empty
    assert throttle_group("shared-2", cfg) is not a


def test_group_for():
    assert group_for(ThrottleConfig({}), "d0") is None
    own1 = group_for(ThrottleConfig({"iops-total": 5}), "d0")
    own2 = group_for(ThrottleConfig({"iops-total": 5}), "d1")
    assert own1 is not own2 and own1.name == "d0"
    g = ThrottleConfig({"iops-total": 5, "group": "gf"})
    assert group_for(g, "d0") is group_for(g, "d1")


# -- the Python path: ThrottledQueue and BlockBackend ------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0

    def __call__(self):
        return self.now


def test_throttled_queue_holds_in_order_per_direction():
    clock, wakes = FakeClock(), []
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        q = ThrottledQueue(group({"iops-read": 100, "iops-write": 100}), fd, clock=clock,
                           waker=lambda due, fn: wakes.append((due, fn)))
        ran = []
        for i in range(14):
            if not q.hold(False, 4096, ran.append, ("r", i)):
                ran.append(("r", i))
        assert ran == [("r", i) for i in range(11)] and q.held == 3
        assert q.stats["throttled"] == 3
        assert [d for d, _ in wakes] == [10 * MS]
        assert not q.hold(True, 4096, ran.append, ("w", 0))   # writes do not wait behind reads
        q.release()                          # not yet due: nothing
        assert len(ran) == 11
        clock.now = 10 * MS
        wakes[0][1]()                        # the wake-up writes the notifier
        assert os.eventfd_read(fd) == 1
        q.release()
        assert ran[11:] == [("r", 11)] and q.held == 2
        assert wakes[-1][0] == 20 * MS
        clock.now = 25 * MS                  # 1.5 requests leaked
        q.release()
        assert ran[12:] == [("r", 12)] and q.held == 1
        clock.now = 10 * S
        q.hold(False, 1, ran.append, ("r", 14))   # behind the one still held
        q.release()
        assert ran[13:] == [("r", 13), ("r", 14)] and q.held == 0
        q.close()
        wakes[-1][1]()                       # closed: writes nothing any more
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)
    finally:
        os.close(fd)


def test_release_all_goes_at_once_and_accounts():
    clock = FakeClock()
    g = group({"iops-total": 10})
    q = ThrottledQueue(g, -1, clock=clock, waker=lambda due, fn: None)
    ran = []
    for i in range(6):
        if not q.hold(i % 2 == 1, 1, ran.append, i):
            ran.append(i)
    assert ran == [0, 1] and q.held == 4
    q.release_all()
    assert sorted(ran) == list(range(6)) and q.held == 0
    assert g.levels()[KINDS.index("iops-total")][0] == 6.0


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(DISK))
    return p


class RecordingEngine:
    """The Python engine, remembering what was submitted, in order."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.notifier = inner.notifier
        self.log = []

    def submit(self, reqs):
        self.log += [(r.op, r.offset, r.length if r.op not in (READ, WRITE) else None)
                     for r in reqs]
        self.inner.submit(reqs)

    def reap(self):
        return self.inner.reap()

    def close(self):
        self.inner.close()


def wait_all(backend, count, timeout=30.0):
    poller = select.poll()
    poller.register(backend.notifier, select.POLLIN)
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"{len(got)} of {count} completed"
        poller.poll(100)
        got += backend.reap()
    return got


def test_backend_holds_reads_and_writes_in_order(image):
    from pykvm.aio import PythonEngine
    eng = RecordingEngine(PythonEngine())
    b = BlockBackend(str(image), fmt="raw", engine=eng,
                     throttle=group({"iops-read": 100, "iops-write": 200}))
    try:
        bufs = [bytearray(512) for _ in range(30)]
        for i in range(30):
            b.readv(i, i * 512, [memoryview(bufs[i])])
        for i in range(30):
            b.writev(100 + i, (64 + i) * 512, [memoryview(bytes([i]) * 512)])
        # 11 reads and 21 writes fit the buckets: 19 + 9 wait (fewer if this
        # thread stalls while the buckets leak)
        assert b.stats["throttled"] >= 10
        got = wait_all(b, 60)
        assert sorted(t for t, _ in got) == list(range(30)) + list(range(100, 130))
        assert all(r >= 0 for _, r in got)         # waited, never failed
        reads = [off for op, off, _ in eng.log if op == READ]
        writes = [off for op, off, _ in eng.log if op == WRITE]
        assert reads == [i * 512 for i in range(30)]
        assert writes == [(64 + i) * 512 for i in range(30)]
        data = image.read_bytes()
        assert all(data[(64 + i) * 512:(65 + i) * 512] == bytes([i]) * 512 for i in range(30))
        assert bufs[3] == pattern(DISK)[3 * 512:4 * 512]
    finally:
        b.close()


def test_backend_throttles_write_zeroes_by_their_length(image):
    g = group({"bps-write": 1 << 20})
    b = BlockBackend(str(image), fmt="raw", throttle=g)
    try:
        b.write_zeroes(1, 0, 64 << 10, False)
        assert g.levels()[KINDS.index("bps-write")][0] == float(64 << 10)
        b.write_zeroes(2, 0, 64 << 10, False)     # the bucket (100K) is over now
        assert b.stats["throttled"] == 0
        b.write_zeroes(3, 0, 64 << 10, False)
        b.write_zeroes(4, 4096, 512, False)
        assert b.stats["throttled"] == 2
        b.discard(5, 0, 4096)                     # discard is not throttled (QEMU's rule)
        assert b.stats["throttled"] == 2
        got = wait_all(b, 5)
        assert sorted(t for t, _ in got) == [1, 2, 3, 4, 5]
        assert all(r >= 0 for _, r in got)
    finally:
        b.close()


def test_detected_zeroes_count_once(image):
    g = group({"iops-write": 1000})
    b = BlockBackend(str(image), fmt="raw", throttle=g, detect_zeroes="on")
    try:
        b.writev(1, 0, [memoryview(bytes(4096))])
        assert g.levels()[KINDS.index("iops-write")][0] == 1.0
        assert wait_all(b, 1)[0][1] >= 0
    finally:
        b.close()


def test_drain_lets_held_requests_go(image):
    b = BlockBackend(str(image), fmt="raw", throttle=group({"iops-total": 1}))
    try:
        bufs = [bytearray(512) for _ in range(5)]
        for i in range(5):       # one a second: 4 s of waiting, without a drain
            b.readv(i, 0, [memoryview(bufs[i])])
        assert b.in_flight == 5
        done = b.drain()
        assert sorted(t for t, _ in done) == list(range(5)) and b.in_flight == 0
    finally:
        b.close()


# -- the C path -------------------------------------------------------------------------

C_ENGINES = ("threads", "io_uring")


def c_rig(image, engine, throttle, transport="mmio", **kw):
    return Rig(image, transport, engine=Engine(engine, "writeback"),
               backend={"throttle": throttle}, **kw)


def reads(d, n, sector=0):
    heads, data = [], []
    for i in range(n):
        buf = d.vq.arena.writable(512)
        status = d.vq.arena.writable(1)
        heads.append(d.submit([d.header(T_IN, sector + i), buf, status], notify=False))
        data.append((buf, status))
    d.t.notify(0)
    return heads, data


@pytest.mark.parametrize("engine", C_ENGINES)
def test_c_path_holds_and_completes_every_request(image, engine):
    r = c_rig(image, engine, group({"iops-total": 200}), queue=128)
    try:
        assert r.dev._fast is not None
        heads, data = reads(r.drv, 40)
        used = r.drv.wait_used(40, timeout=30)
        assert sorted(h for h, _ in used) == sorted(heads)
        content = image.read_bytes()
        for i, (buf, status) in enumerate(data):
            assert r.mem.read_u(status[0], 1) == B.S_OK          # none failed
            assert r.mem.read(buf[0], 512) == content[i * 512:(i + 1) * 512]
        c = r.dev.counters()
        assert c["throttled"] >= 10          # 21 fit the bucket (200/10 + 1); the rest waited
        assert c["punts"] == 0               # all of it served in C
    finally:
        r.close()


@pytest.mark.parametrize("engine", C_ENGINES)
def test_c_path_releases_in_order(image, engine):
    # 10 writes a second: one is let go every 100 ms, long after the one before
    # it has completed, so the used ring shows the order they were let go in
    r = c_rig(image, engine, group({"iops-write": 10}))
    try:
        d = r.drv
        heads = []
        for i in range(5):
            buf = d.vq.arena.readable(bytes([i + 1]) * 512)
            heads.append(d.submit([d.header(T_OUT, 200), buf, d.vq.arena.writable(1)],
                                  notify=False))
        d.t.notify(0)
        used = d.wait_used(5, timeout=30)
        # the first two fit the bucket (capacity 1) and may complete in any order
        assert sorted(h for h, _ in used[:2]) == sorted(heads[:2])
        assert [h for h, _ in used[2:]] == heads[2:]
        assert image.read_bytes()[200 * 512:201 * 512] == bytes([5]) * 512
        assert r.dev.counters()["throttled"] == 3
    finally:
        r.close()


def test_c_path_reads_do_not_wait_behind_held_writes(image):
    r = c_rig(image, "io_uring", group({"iops-write": 1}))
    try:
        d = r.drv
        w = [d.submit([d.header(T_OUT, 300 + i), d.vq.arena.readable(bytes(512)),
                       d.vq.arena.writable(1)]) for i in range(2)]
        # the second write waits about a second; the read goes at once
        read = d.submit([d.header(T_IN, 0), d.vq.arena.writable(512), d.vq.arena.writable(1)])
        order = [h for h, _ in d.wait_used(3, timeout=30)]
        assert sorted(order) == sorted(w + [read])
        assert order.index(read) < order.index(w[1])
    finally:
        r.close()


def test_c_path_quiesce_lets_held_requests_go(image):
    r = c_rig(image, "threads", group({"iops-total": 1}))
    try:
        heads, _ = reads(r.drv, 12)    # one a second: 11 s, without the quiesce
        deadline = time.monotonic() + 30
        while r.dev.counters()["throttled"] < 11 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.dev.counters()["throttled"] == 11
        assert r.dev.quiesce(5.0)
        assert sorted(h for h, _ in r.drv.vq.reap()) == sorted(heads)
    finally:
        r.close()


def test_c_path_maps_a_held_request_again(tmp_path):
    """A read held in C while Python frees its qcow2 cluster, which the next
    allocation then reuses, is mapped again when it goes: it reads what the
    disk holds now (zeroes), not the old host cluster (another range's data)."""
    from pykvm.block.driver import write_range
    from pykvm.block.qcow2 import Qcow2Driver
    from tests.helpers.virtio_driver import T_DISCARD
    mib = 1 << 20
    (tmp_path / "base.raw").write_bytes(pattern(4 * mib, 1))
    top = tmp_path / "top.qcow2"
    Qcow2Driver.create(str(top), 4 * mib, backing_file="base.raw", backing_fmt="raw")
    d0 = open_image(str(top))
    write_range(d0, 0, pattern(mib, 2))             # clusters 0..15 allocated
    d0.close()
    g = group({"iops-read": 1})
    r = c_rig(top, "threads", g)
    try:
        d, drv = r.drv, r.backend.driver
        drv.alloc_ahead_bytes = 0       # the next allocation takes the first free cluster
        for _ in range(10):                         # ten seconds of reads done
            g.account(False, 512, time.monotonic_ns())
        old_host = drv.map(256 << 10, 1)[0].host_offset
        buf = d.vq.arena.writable(4096)
        held = d.submit([d.header(T_IN, (256 << 10) // 512), buf, d.vq.arena.writable(1)])
        deadline = time.monotonic() + 30
        while r.dev.counters()["throttled"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert r.dev.counters()["punts"] == 0       # mapped in C, then held
        # meanwhile (neither discard nor writes are limited here): the cluster
        # is freed, and an allocating write elsewhere takes it
        assert d.ranged(T_DISCARD, (256 << 10) // 512, (64 << 10) // 512) == B.S_OK
        assert d.write(3 * mib // 512, pattern(4096, 6)) == B.S_OK
        assert drv.map(3 * mib, 1)[0].host_offset == old_host
        g.configure(g.config)        # empty again: the punted read need not wait long
        assert r.dev.quiesce(10.0)   # lets the held read go now
        assert [h for h, _ in d.vq.reap()] == [held]
        assert r.mem.read(buf[0], 4096) == bytes(4096)
        assert r.dev.counters()["punts"] >= 3       # the discard, the write, the read
    finally:
        r.close()


# one operation a second, and a bucket of 10 (iops-total-max=10 for one
# second): 11 of the 40 reads below go, 29 wait; with a bucket each, 18 would
SHARED = {"iops-total": 1, "iops-total-max": 10}


def shared_run(r1, r2):
    """20 reads on each device; once both have taken them, the number that
    wait; then a quiesce lets those go, and all 40 must be back."""
    h1, _ = reads(r1.drv, 20)
    h2, _ = reads(r2.drv, 20)
    deadline = time.monotonic() + 30
    while min(r.dev.counters()["requests"] for r in (r1, r2)) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    throttled = sum(r.dev.counters()["throttled"] for r in (r1, r2))
    for r, heads in ((r1, h1), (r2, h2)):
        assert r.dev.quiesce(10.0)
        assert sorted(h for h, _ in r.drv.vq.reap()) == sorted(heads)
    return throttled


def test_c_devices_share_their_group(image, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(pattern(DISK))
    g = throttle_group("c-shared", ThrottleConfig(SHARED))
    r1, r2 = c_rig(image, "threads", g), c_rig(other, "io_uring", g)
    try:
        assert shared_run(r1, r2) >= 27      # 29, less what leaks (1/s) meanwhile
    finally:
        r1.close()
        r2.close()


def test_python_and_c_disks_share_a_group(image, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(pattern(DISK))
    g = throttle_group("mixed", ThrottleConfig(SHARED))
    rc = c_rig(image, "threads", g)
    rp = Rig(other, backend={"throttle": g})
    try:
        assert rc.dev._fast is not None and rp.dev._fast is None
        assert shared_run(rc, rp) >= 27
    finally:
        rc.close()
        rp.close()


# -- --disk ------------------------------------------------------------------------------

def test_disk_spec_takes_throttling_options(image):
    spec = DiskSpec.parse(f"file={image},throttling.iops-total=500,throttling.group=g-spec,"
                          f"throttling.bps-total=50M")
    assert spec.throttling.rate["iops-total"] == 500
    assert spec.throttling.rate["bps-total"] == 50 << 20
    other = image.parent / "other.img"            # two writers of one image lock each other out
    other.write_bytes(image.read_bytes())
    b1 = open_disk(spec)
    b2 = open_disk(DiskSpec.parse(f"file={other},throttling.iops-total=500,"
                                  f"throttling.group=g-spec,throttling.bps-total=50M"))
    try:
        assert b1.throttle is b2.throttle and b1.throttle.name == "g-spec"
    finally:
        b1.close()
        b2.close()
    b3 = open_disk(DiskSpec.parse(f"file={image}"))
    try:
        assert b3.throttle is None
    finally:
        b3.close()


@pytest.mark.parametrize("option,why", [
    ("throttling.iops-total=-1", "throttling.iops-total=-1: must be from 0 to"),
    ("throttling.iops-total=5,throttling.iops-read=1", "cannot be combined"),
    ("throttling.speed=1", "throttling.speed: unknown option"),
])
def test_disk_spec_refuses_bad_throttling(image, option, why):
    with pytest.raises(ConfigError) as e:
        DiskSpec.parse(f"file={image},{option}")
    msg = str(e.value)
    assert msg.startswith(f"--disk file={image},{option}: ") and why in msg and "\n" not in msg


def test_cli_exits_2_on_bad_throttling(image):
    import sys
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "guest/build/hello.elf", "--disk",
                        f"file={image},throttling.iops-total=-1"], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))))
    assert r.returncode == 2
    assert "throttling.iops-total=-1: must be from 0 to" in r.stderr
    assert "Traceback" not in r.stderr


# -- the throttle filter node and --object throttle-group ------------------------------------

def test_throttle_node_holds_by_its_group(image):
    """driver=throttle,throttle-group=NAME over the image: the backend holds by
    that group (the one --object made), and the node shows in the graph."""
    from pykvm.block.graph import tree_lines
    from pykvm.block.throttle import group_object
    g = group_object({"id": "node-g", "limits.iops-read": "100"})
    b = BlockBackend({"driver": "throttle", "throttle-group": "node-g",
                      "file": {"driver": "raw", "file": str(image)}}, name="disk0")
    try:
        assert b.throttle is g and b.format == "raw" and b.root.format_name == "throttle"
        assert tree_lines(b.root)[0].startswith("disk0: throttle (")
        bufs = [bytearray(512) for _ in range(20)]
        for i in range(20):
            b.readv(i, i * 512, [memoryview(bufs[i])])
        assert b.stats["throttled"] >= 5               # 11 fit the bucket
        got = wait_all(b, 20)
        assert sorted(t for t, _ in got) == list(range(20)) and all(r == 512 for _, r in got)
        assert bufs[7] == pattern(DISK)[7 * 512:8 * 512]
    finally:
        b.close()


def test_throttle_node_errors(image):
    from pykvm.block import GraphError
    from pykvm.block.throttle import group_object
    with pytest.raises(GraphError, match=r"^throttle node 'd': throttle group 'absent' does not "
                                         r"exist \(define it with --object throttle-group,"):
        BlockBackend({"driver": "throttle", "throttle-group": "absent", "file": str(image)},
                     name="d")
    with pytest.raises(GraphError, match=r"^throttle node 'd': option 'throttle-group' is "
                                         r"missing"):
        BlockBackend({"driver": "throttle", "file": str(image)}, name="d")
    g = group_object({"id": "twice", "limits.iops-total": "100"})
    with pytest.raises(GraphError, match="a disk takes one throttle group"):
        BlockBackend({"driver": "throttle", "throttle-group": "twice", "file": str(image)},
                     throttle=g)
    with pytest.raises(ThrottleError, match=r"^limits.bps-total=x: not a number"):
        group_object({"id": "bad", "limits.bps-total": "x"})
    with pytest.raises(ThrottleError, match="id= is missing"):
        group_object({"limits.bps-total": "1"})
    assert g.config.enabled


def test_cli_object_and_throttle_node(image):
    """--object throttle-group and a throttle node on the C path: every request
    served in C (no punts), held by the group."""
    import json
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "pykvm", "fio", "--object",
                        "throttle-group,id=g1,limits.iops-total=200", "--disk",
                        f"driver=throttle,throttle-group=g1,file.driver=raw,"
                        f"file.file.filename={image},aio=io_uring", "--iodepth", "8", "--ios",
                        "200", "--output-format", "json"], capture_output=True, text=True,
                       cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr
    dev = json.loads(r.stdout)["pykvm"]["device"]
    assert dev["requests"] >= 200 and dev["punts"] == 0 and dev["throttled"] > 0, dev
    bad = subprocess.run([sys.executable, "-m", "pykvm", "fio", "--object",
                          "throttle-group,id=g1,limits.iops-total=-1", "--disk", str(image)],
                         capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "limits.iops-total=-1: must be from 0 to" in bad.stderr
