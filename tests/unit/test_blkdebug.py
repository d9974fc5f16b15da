"""The blkdebug node: its rules file (QEMU's format, extended), the rule
engine (native/inject.c), and every action on every engine of the matrix (the
Python path and the C I/O thread ask the same engine), through a VirtioBlk.
"""
import struct
import subprocess
import threading
import time

import pytest

from pykvm.block import BlockBackend
from pykvm.block.driver import GraphError
from pykvm.block.graph import open_node, walk
from pykvm.block.inject import Injector, RulesError, flip_positions, parse_rules, shuffle
from pykvm.virtio import blk as B
from tests.helpers.virtio_driver import T_GET_ID, T_IN, wait_fd
from tests.unit.test_virtio_blk import DISK, Rig, pattern


def rules_file(tmp_path, text, name="rules.conf"):
    p = tmp_path / name
    p.write_text(text)
    return p


def debug_rig(tmp_path, image, engine, text, transport="mmio", **kw):
    """A Rig on ``image`` under a blkdebug node holding the rules ``text``."""
    rules = rules_file(tmp_path, text)
    return Rig({"driver": "raw", "file": f"blkdebug:{rules}:{image}"}, transport, engine, **kw)


# -- the rules file -----------------------------------------------------------------------

def test_qemu_config_file_parses_unchanged():
    rules = parse_rules('''
# QEMU's blkdebug format, as its iotests write it
[inject-error]
event = "l2_update"
errno = "5"
once = "on"
immediately = "off"

[set-state]
event = "write_aio"
state = "1"
new_state = "2"

[inject-error]
event = "read_aio"
state = "2"
sector = "8"
iotype = "read"
''', "t.conf")
    assert [r.kind for r in rules] == ["inject-error", "set-state", "inject-error"]
    assert rules[0].event == "l2_update" and rules[0].value == 5 and rules[0].once
    assert rules[1].new_state == 2
    assert rules[2].offset == 8 * 512 and rules[2].ops == ("read",) and rules[2].state == 2


@pytest.mark.parametrize("text, where, words", [
    ("[inject-eror]\nevent = read_aio\n", "t.conf:1", "unknown section"),
    ("[fault]\naction = error\ncolour = red\n", "t.conf:3", "key 'colour'"),
    ("[fault]\naction = error\nprobability = 1.5\n", "t.conf:3", "key 'probability'"),
    ("[fault]\naction = error\noffset = 4096\nlength = 0\n", "t.conf:4", "empty range"),
    ("[fault]\naction = error\nsector = 1\nnsectors = 36028797018963968\n", "t.conf:4",
     "key 'nsectors'"),
    ("[inject-error]\nevent = l2_load\n", "t.conf:2", "never raises"),
    ("[inject-error]\nevent = lunch\n", "t.conf:2", "unknown event"),
    ("[fault]\nop = write\n", "t.conf:1", "needs an action"),
    ("[fault]\naction = corrupt\nop = write\n", "t.conf:3", "does not apply to write"),
    ("[fault]\naction = delay\ndelay = 10\n", "t.conf:3", "with its unit"),
    ("[fault]\naction = error\nerrno = EWHAT\n", "t.conf:3", "not an errno"),
    ("event = read_aio\n", "t.conf:1", "before any [section]"),
    ("[fault]\naction = error\nbits = 3\n", "t.conf:3", "applies to action corrupt"),
])
def test_a_bad_rules_file_is_one_line_naming_file_line_and_key(text, where, words):
    with pytest.raises(RulesError) as e:
        parse_rules(text, "t.conf")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(where) and words in msg, msg


def test_a_bad_rules_file_stops_the_disk_before_it_opens(tmp_path, image):
    rules = rules_file(tmp_path, "[fault]\naction = explode\n")
    with pytest.raises(RulesError) as e:
        BlockBackend({"driver": "raw", "file": f"blkdebug:{rules}:{image}"})
    assert f"{rules}:2" in str(e.value) and "key 'action'" in str(e.value)


def test_both_of_qemus_spellings_build_the_graph_qemu_builds(tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    rules = rules_file(tmp_path, "")
    # blkdebug:RULES:IMAGE is the protocol under the probed format
    root = open_node({"file": f"blkdebug:{rules}:{img}"})
    try:
        assert [(p, n.format_name) for p, _r, n in walk(root)] == \
            [("", "qcow2"), ("/file", "blkdebug"), ("/file/image", "file")]
    finally:
        root.close()
    # driver=blkdebug,image.filename=: the node on top, the image's format probed
    root = open_node({"driver": "blkdebug", "config": str(rules), "image": {"filename": str(img)}})
    try:
        assert [(p, n.format_name) for p, _r, n in walk(root)] == \
            [("", "blkdebug"), ("/image", "qcow2"), ("/image/file", "file")]
    finally:
        root.close()


def test_blkdebug_without_an_image_is_refused(tmp_path):
    with pytest.raises(Exception) as e:
        open_node({"file": "blkdebug:rules.conf"})
    assert "blkdebug:RULES:IMAGE" in str(e.value)


# -- the engine: QEMU's semantics ---------------------------------------------------------

def test_inject_error_fires_after_its_event_and_once_removes_it():
    inj = Injector(parse_rules('[inject-error]\nevent = "write_aio"\nerrno = "28"\n'
                               'once = "on"\niotype = "read"\n'))
    assert inj.check("read", 0, 512) is None          # no write yet: not active
    assert inj.check("write", 0, 512) is None         # raises write_aio; a write is no read
    hit = inj.check("read", 0, 512)
    assert hit.action == "error" and hit.value == 28
    assert inj.check("read", 0, 512) is None          # once: gone
    inj.check("write", 0, 512)
    assert inj.check("read", 0, 512) is None          # and not activated again


def test_inject_error_sector_must_be_covered():
    inj = Injector(parse_rules('[inject-error]\nevent = "read_aio"\nsector = "10"\n'))
    assert inj.check("read", 0, 10 * 512) is None             # sectors 0-9
    assert inj.check("read", 9 * 512, 1024).value == 5        # sectors 9-10
    assert inj.check("flush", 0, 0) is None                   # a flush covers no sector


def test_set_state_moves_the_state_machine():
    inj = Injector(parse_rules('[set-state]\nevent = "write_aio"\nstate = "1"\nnew_state = "2"\n'
                               '[inject-error]\nevent = "read_aio"\nstate = "2"\n'))
    assert inj.state == 1 and inj.check("read", 0, 512) is None
    inj.check("write", 0, 512)
    assert inj.state == 2
    assert inj.check("read", 0, 512).action == "error"


def test_a_metadata_event_activates_a_rule_for_metadata_writes():
    inj = Injector(parse_rules('[inject-error]\nevent = "l2_update"\nonce = "on"\n'))
    assert inj.check("write", 4096, 8, guest=False) is None
    inj.event("l2_update")
    assert inj.check("write", 4096, 8, guest=False).value == 5
    assert inj.events()["l2_update"] == 1


# -- the engine: [fault] matching ----------------------------------------------------------

def fired(inj, n, op="write", offset=0, length=4096, queue=0):
    return [inj.check(op, offset, length, queue) is not None for _ in range(n)]


@pytest.mark.parametrize("keys, expect", [
    ("nth = 3", [0, 0, 1, 0, 0, 0, 0, 0]),
    ("every = 3", [0, 0, 1, 0, 0, 1, 0, 0]),
    ("after = 2\ntimes = 2", [0, 0, 1, 1, 0, 0, 0, 0]),
    ("after = 1\nevery = 2", [0, 0, 1, 0, 1, 0, 1, 0]),
    ("once = on", [1, 0, 0, 0, 0, 0, 0, 0]),
])
def test_which_matching_requests_fire(keys, expect):
    inj = Injector(parse_rules(f"[fault]\nop = write\naction = error\n{keys}\n"))
    assert fired(inj, 8) == [bool(x) for x in expect]
    assert inj.check("read", 0, 4096) is None         # another op never counts


def test_range_and_queue_match():
    inj = Injector(parse_rules("[fault]\nop = read\noffset = 1M\nlength = 1M\nqueue = 1\n"
                               "action = error\n"))
    assert inj.check("read", 0, 4096, 1) is None
    assert inj.check("read", (1 << 20) - 512, 1024, 0) is None     # another queue
    assert inj.check("read", (1 << 20) - 512, 1024, 1) is not None  # overlaps
    assert inj.check("read", 2 << 20, 4096, 1) is None


def test_probability_is_seeded():
    text = "[fault]\nop = write\naction = error\nprobability = 0.3\nseed = 42\n"
    a = fired(Injector(parse_rules(text)), 400)
    assert a == fired(Injector(parse_rules(text)), 400)
    assert 80 < sum(a) < 160
    assert a != fired(Injector(parse_rules(text.replace("42", "43"))), 400)


def test_delay_distributions():
    uni = Injector(parse_rules("[fault]\naction = delay\ndelay = 1ms\ndistribution = uniform\n"
                               "delay-max = 3ms\n"))
    d = [uni.check("read", 0, 512).delay_ns for _ in range(300)]
    assert 1_000_000 <= min(d) < 1_200_000 and 2_800_000 < max(d) <= 3_000_000
    exp = Injector(parse_rules("[fault]\naction = delay\ndelay = 1ms\n"
                               "distribution = exponential\n"))
    d = [exp.check("read", 0, 512).delay_ns for _ in range(2000)]
    assert 0.85e6 < sum(d) / len(d) < 1.15e6


def test_counts_per_rule():
    inj = Injector(parse_rules("[fault]\nop = write\naction = error\nevery = 2\n"))
    fired(inj, 5)
    assert inj.counts()[0]["matched"] == 5 and inj.counts()[0]["fired"] == 2


# -- every action, on every engine (the matrix), through the device -----------------------

def test_error_on_the_third_write(tmp_path, image, engine, transport):
    r = debug_rig(tmp_path, image, engine, "[fault]\nop = write\nnth = 3\naction = error\n",
                  transport)
    try:
        statuses = [r.drv.write(8 * i, pattern(4096, 10 + i)) for i in range(4)]
        assert statuses == [B.S_OK, B.S_OK, B.S_IOERR, B.S_OK]
        data = image.read_bytes()
        assert data[16 * 512:24 * 512] == pattern(DISK)[16 * 512:24 * 512]   # never written
        assert data[24 * 512:32 * 512] == pattern(4096, 13)
        assert r.dev.counters()["injected"] == 1
    finally:
        r.close()


def test_status_unsupp_on_get_id(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine,
                  "[fault]\nop = get-id\naction = status\nstatus = unsupp\n")
    try:
        d = r.drv
        buf = d.vq.arena.writable(20)
        status, _ = d.request([d.header(T_GET_ID), buf, d.vq.arena.writable(1)])
        assert status == B.S_UNSUPP
        assert r.drv.read(0, 512)[0] == B.S_OK
    finally:
        r.close()


def test_a_dropped_write_reports_success_and_writes_nothing(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\naction = drop\n")
    try:
        assert r.drv.write(64, pattern(4096, 5)) == B.S_OK
        assert image.read_bytes()[64 * 512:72 * 512] == pattern(DISK)[64 * 512:72 * 512]
    finally:
        r.close()


def test_a_stuck_at_zero_read(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\naction = zero\nsector = 8\nnsectors = 8\n")
    try:
        assert r.drv.read(8, 4096)[:2] == (B.S_OK, bytes(4096))
        assert r.drv.read(16, 4096)[1] == pattern(DISK)[16 * 512:24 * 512]
    finally:
        r.close()


def test_a_corrupted_read_flips_bits_in_the_buffer_only(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\naction = corrupt\nbits = 1\nseed = 9\n")
    try:
        status, got, _ = r.drv.read(0, 4096)
        want = pattern(DISK)[:4096]
        diff = sum(bin(a ^ b).count("1") for a, b in zip(got, want))
        assert status == B.S_OK and diff == 1
        assert image.read_bytes()[:4096] == want          # the image is untouched
    finally:
        r.close()


def test_flip_positions_are_seeded_and_in_range():
    a = flip_positions(7, 100, 512)
    assert a == flip_positions(7, 100, 512) and all(0 <= p < 4096 for p in a)
    assert a != flip_positions(8, 100, 512)


def test_a_torn_write_lands_its_first_sectors_only(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\naction = torn\nsectors = 8\n")
    try:
        new = pattern(16384, 77)
        assert r.drv.write(128, new) == B.S_OK
        data = image.read_bytes()[128 * 512:160 * 512]
        assert data[:4096] == new[:4096]
        assert data[4096:] == pattern(DISK)[136 * 512:160 * 512]      # the rest: old
    finally:
        r.close()


def test_a_short_host_read_is_read_to_the_end(tmp_path, image, engine):
    """Every host read returns its first 8 sectors only, far from the end of the
    file: the rest is read (the C path hands the request to Python, which
    continues it), and the guest gets all of the data, never a buffer that
    is partly unread with a success status."""
    r = debug_rig(tmp_path, image, engine, "[fault]\naction = short\nsectors = 8\n")
    try:
        status, data, used = r.drv.read(64, 32768)
        assert (status, used) == (B.S_OK, 32769)
        assert data == pattern(DISK)[64 * 512:64 * 512 + 32768]
        assert r.backend.stats["short_read"] >= 1
        if engine.name != "python":
            assert r.dev.counters()["punts"] >= 1      # C saw it short, Python read on
        assert r.drv.write(0, pattern(4096, 5)) == B.S_OK      # writes are not cut
        assert r.drv.read(0, 4096)[:2] == (B.S_OK, pattern(4096, 5))
    finally:
        r.close()


def test_a_delay_holds_the_request(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\nop = read\naction = delay\ndelay = 150ms\n")
    try:
        t = time.monotonic()
        assert r.drv.read(0, 512)[0] == B.S_OK
        assert time.monotonic() - t >= 0.15
        assert r.drv.write(0, bytes(512)) == B.S_OK      # writes are not delayed
    finally:
        r.close()


def test_a_hang_lasts_until_released(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\nop = read\naction = hang\nonce = on\n")
    try:
        d = r.drv
        buf = d.vq.arena.writable(512)
        d.submit([d.header(T_IN, 0), buf, d.vq.arena.writable(1)])
        assert not wait_fd(d.t.interrupt_fd(0), 0.4) and d.vq.reap() == []
        threading.Timer(0.1, r.backend.inject.release).start()
        assert len(d.wait_used(1, timeout=5)) == 1
        assert r.drv.read(0, 512)[0] == B.S_OK           # once: the next one goes at once
    finally:
        r.close()


def test_held_completions_come_back_together(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine,
                  "[fault]\nop = read\naction = hold\ncount = 3\ntimeout = 10s\n")
    try:
        d = r.drv
        heads = []
        for i in range(2):
            heads.append(d.submit([d.header(T_IN, i), d.vq.arena.writable(512),
                                   d.vq.arena.writable(1)]))
        time.sleep(0.4)
        assert d.vq.reap() == []                          # two of three: still held
        heads.append(d.submit([d.header(T_IN, 2), d.vq.arena.writable(512),
                               d.vq.arena.writable(1)]))
        used = d.wait_used(3)
        assert sorted(h for h, _ in used) == sorted(heads)
    finally:
        r.close()


def test_held_completions_go_after_their_timeout(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine,
                  "[fault]\nop = read\naction = hold\ncount = 8\ntimeout = 100ms\n")
    try:
        t = time.monotonic()
        assert r.drv.read(0, 512)[0] == B.S_OK
        assert 0.1 <= time.monotonic() - t < 3
    finally:
        r.close()


@pytest.mark.matrix(cache_mode="unsafe")     # flushes complete at once, in order
@pytest.mark.parametrize("order", ["reverse", "fifo", "random"])
def test_held_completions_go_back_in_their_order(tmp_path, image, engine, cache_mode, order):
    from tests.helpers.virtio_driver import T_FLUSH
    text = f"[fault]\nop = flush\naction = hold\ncount = 4\norder = {order}\ntimeout = 10s\n"
    r = debug_rig(tmp_path, image, engine, text)
    try:
        d = r.drv
        heads = [d.submit([d.header(T_FLUSH), d.vq.arena.writable(1)], notify=False)
                 for _ in range(4)]
        d.t.notify(0)
        used = [h for h, _ in d.wait_used(4)]
        if order == "reverse":
            assert used == heads[::-1]
        elif order == "fifo":
            assert used == heads
        else:   # the permutation of the first held request's seed (the same engine's)
            seed = Injector(parse_rules(text)).check("flush", 0, 0).seed
            assert used == [heads[i] for i in shuffle(seed, 4)]
    finally:
        r.close()


# -- qcow2's metadata writes ----------------------------------------------------------------

def test_an_l2_update_error_fails_the_write_and_leaves_a_consistent_image(tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    rules = rules_file(tmp_path, '[inject-error]\nevent = "l2_update"\nerrno = "5"\nonce = "on"\n')
    be = BlockBackend(f"blkdebug:{rules}:{img}")
    try:
        assert be.format == "qcow2"
        buf = bytearray(pattern(65536, 3))
        be.writev(1, 0, [memoryview(buf)])
        assert be.drain() == [(1, -5)]
        out = bytearray(65536)
        be.readv(2, 0, [memoryview(out)])
        assert be.drain() == [(2, 65536)] and out == bytes(65536)   # the old (zero) data
        be.writev(3, 0, [memoryview(buf)])                          # once: this one lands
        assert be.drain() == [(3, 65536)]
    finally:
        be.close()
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode in (0, 3), check.stdout       # 3: leaks only
    assert "corrupt" not in check.stdout.lower() and "ERROR" not in check.stdout
    got = subprocess.run(["qemu-io", "-c", "read -P 0 64k 64k", str(img)], capture_output=True,
                         text=True)
    assert "verification failed" not in got.stdout, got.stdout


def test_two_blkdebug_nodes_are_refused(tmp_path, image):
    rules = rules_file(tmp_path, "")
    spec = {"driver": "raw", "file": {"driver": "blkdebug", "config": str(rules),
                                      "image": f"blkdebug:{rules}:{image}"}}
    with pytest.raises(Exception) as e:
        BlockBackend(spec)
    assert "one blkdebug node" in str(e.value)


def test_the_trace_record_layout():
    """trace.h's record is packed as the ring's readers expect (40 bytes)."""
    from pykvm._native import ffi
    assert struct.calcsize("<QQQIIHBBhBB") == ffi.sizeof("struct pykvm_trace_rec")


def test_after_a_power_cut_no_request_lands_nor_completes(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\nop = write\nnth = 2\naction = power-cut\n")
    cut = []
    r.backend.on_power_cut = cut.append
    try:
        d = r.drv
        assert d.write(0, pattern(4096, 1)) == B.S_OK
        for sector in (8, 16):
            d.submit([d.header(B.T_OUT, sector), d.vq.arena.readable(pattern(4096, 2)),
                      d.vq.arena.writable(1)])
        assert not wait_fd(d.t.interrupt_fd(0), 0.5) and d.vq.reap() == []
        assert len(cut) == 1 and "power cut by the blkdebug rule at" in cut[0]
        assert image.read_bytes()[8 * 512:24 * 512] == pattern(DISK)[8 * 512:24 * 512]
    finally:
        r.close()


# -- held completions released in a given order, after K others; rules removed -------------

@pytest.mark.matrix(cache_mode="unsafe")     # flushes complete at once, in order
@pytest.mark.parametrize("order, count, expect", [
    ("2,0,3,1", None, [2, 0, 3, 1]),         # count: as many as the order names
    ("1", "3", [1, 0, 2]),                   # the ones not named go after, as they came
    ("3,1", "2", [1, 0]),                    # a position past those held is skipped
])
def test_held_completions_go_back_in_the_order_given(tmp_path, image, engine, cache_mode,
                                                      order, count, expect):
    from tests.helpers.virtio_driver import T_FLUSH
    text = f"[fault]\nop = flush\naction = hold\norder = {order}\ntimeout = 10s\n" + \
        (f"count = {count}\n" if count else "")
    r = debug_rig(tmp_path, image, engine, text)
    try:
        d = r.drv
        heads = [d.submit([d.header(T_FLUSH), d.vq.arena.writable(1)], notify=False)
                 for _ in range(len(expect))]
        d.t.notify(0)
        assert [h for h, _ in d.wait_used(len(expect))] == [heads[i] for i in expect]
    finally:
        r.close()


def test_a_held_completion_goes_after_k_more_requests_completed(tmp_path, image, engine):
    """release-after = 2: the held read comes back right after the second
    write that completed after it, not before, and with no timeout."""
    r = debug_rig(tmp_path, image, engine,
                  "[fault]\nop = read\naction = hold\nrelease-after = 2\nonce = on\n")
    try:
        d = r.drv
        held = d.submit([d.header(T_IN, 0), d.vq.arena.writable(512), d.vq.arena.writable(1)])
        time.sleep(0.3)
        assert d.vq.reap() == []                          # no timeout: still held
        w1 = d.submit([d.header(B.T_OUT, 8), d.vq.arena.readable(pattern(512, 1)),
                       d.vq.arena.writable(1)])
        assert [h for h, _ in d.wait_used(1)] == [w1]
        time.sleep(0.2)
        assert d.vq.reap() == []                          # one of two: still held
        w2 = d.submit([d.header(B.T_OUT, 16), d.vq.arena.readable(pattern(512, 2)),
                       d.vq.arena.writable(1)])
        assert [h for h, _ in d.wait_used(2)] == [w2, held]
        assert r.drv.read(0, 512)[0] == B.S_OK            # once: the next one goes at once
    finally:
        r.close()


@pytest.mark.parametrize("text, where, words", [
    ("[fault]\naction = hold\norder = 1,1\n", "t.conf:3", "named twice"),
    ("[fault]\naction = hold\norder = 16\n", "t.conf:3", "at most 16 positions"),
    ("[fault]\naction = hold\norder = sideways\n", "t.conf:3", "nor positions"),
    ("[fault]\naction = delay\ndelay = 1ms\nrelease-after = 2\n", "t.conf:4",
     "applies to action hold"),
    ("[fault]\naction = hold\nrelease-after = 0\n", "t.conf:3", "key 'release-after'"),
])
def test_a_bad_hold_order_or_release_after_is_refused(text, where, words):
    with pytest.raises(RulesError) as e:
        parse_rules(text, "t.conf")
    assert str(e.value).startswith(where) and words in str(e.value), str(e.value)


def test_a_rule_added_at_runtime_is_removed_by_its_handle(tmp_path, image, engine):
    from pykvm.testing import Disk
    disk = Disk(image)
    r = Rig({"driver": "raw", "file": {"driver": "blkdebug", "x-injector": disk._name,
                                       "image": {"driver": "file", "filename": str(image)}}},
            "mmio", engine)
    try:
        kept = disk.inject("error", op="read", offset=0, length=4096)
        writes = disk.inject("error", op="write")
        qemu = disk.inject(None, kind="inject-error", event="read_aio", sector=16, errno=5)
        assert (kept, writes, qemu) == (0, 1, 2)
        assert r.drv.write(8, pattern(512, 3)) == B.S_IOERR
        assert r.drv.read(16, 512)[0] == B.S_IOERR        # QEMU's rule, active on read_aio
        writes.remove()
        qemu.remove()
        assert r.drv.write(8, pattern(512, 3)) == B.S_OK
        assert r.drv.read(8, 512)[:2] == (B.S_OK, pattern(512, 3))
        assert r.drv.read(16, 512)[0] == B.S_OK
        assert r.drv.read(0, 512)[0] == B.S_IOERR         # the rule not removed stays
        rules = disk.rules()
        assert [x["removed"] for x in rules] == [False, True, True]
        assert [x["fired"] for x in rules] == [1, 1, 1]
    finally:
        r.close()


def test_hold_order_and_release_after_from_the_api():
    from pykvm.block.inject import rule_from
    r = rule_from("fault", {"action": "hold", "order": [2, 0, 1]}, "inject()")
    assert (r.order_list, r.value, r.timeout_ns) == ((2, 0, 1), 3, 10_000_000)
    r = rule_from("fault", {"action": "hold", "release-after": 3}, "inject()")
    assert (r.release_after, r.value, r.timeout_ns) == (3, 65536, 0)
    r = rule_from("fault", {"action": "hold", "release-after": 3, "count": 5, "timeout": "1s"},
                  "inject()")
    assert (r.release_after, r.value, r.timeout_ns) == (3, 5, 1_000_000_000)


# -- rules that wait for a mark or a time ------------------------------------------------

def test_mark_and_time_parse_and_say_when_a_power_cut_is_instant():
    rules = parse_rules("[fault]\naction = power-cut\nmark = boot-done\n"
                        "[fault]\naction = power-cut\ntime = 250ms\n"
                        "[fault]\naction = power-cut\nop = write\nmark = m\n"
                        "[fault]\naction = error\ntime = 1s\n", "t.conf")
    assert [(r.mark, r.time_ns, r.instant) for r in rules] == [
        ("boot-done", None, True), (None, 250_000_000, True), ("m", None, False),
        (None, 1_000_000_000, False)]
    for text, key in (("mark = a\ntime = 1s\n", "time"), ("mark = \"\"\n", "mark"),
                      ("mark = " + "x" * 65 + "\n", "mark"), ("time = 3h\n", "time")):
        with pytest.raises(RulesError) as e:
            parse_rules("[fault]\naction = error\n" + text, "t.conf")
        assert f"key '{key}'" in str(e.value)


def test_a_rule_waiting_for_a_mark_matches_only_after_it(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\nop = write\nmark = go\naction = error\n")
    try:
        assert r.drv.write(8, pattern(512, 1)) == B.S_OK
        with pytest.raises(GraphError) as e:    # no log, and no rule waits for it
            r.backend.mark("other")
        assert "no rule waits for this mark" in str(e.value)
        assert r.drv.write(8, pattern(512, 2)) == B.S_OK
        assert r.backend.mark("go") == {"logged": False, "rules": 1}
        assert r.drv.write(8, pattern(512, 3)) == B.S_IOERR
        assert r.backend.inject.counts()[0]["fired"] == 1
    finally:
        r.close()


def test_a_power_cut_at_a_mark_needs_no_request(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\naction = power-cut\nmark = cut\n")
    cut = []
    r.backend.on_power_cut = cut.append
    try:
        assert r.drv.write(8, pattern(512, 1)) == B.S_OK
        assert not cut
        r.backend.mark("cut")
        assert len(cut) == 1 and "power cut by the blkdebug rule at" in cut[0]
        d = r.drv
        wait_fd(d.t.interrupt_fd(0), 0.1)       # the first write's interrupt, if still there
        d.submit([d.header(B.T_OUT, 16), d.vq.arena.readable(pattern(512, 2)),
                  d.vq.arena.writable(1)])
        assert not wait_fd(d.t.interrupt_fd(0), 0.3) and d.vq.reap() == []
        assert image.read_bytes()[16 * 512:17 * 512] == pattern(DISK)[16 * 512:17 * 512]
    finally:
        r.close()


def test_a_power_cut_at_a_time_counts_from_the_start_of_the_run(tmp_path, image, engine):
    r = debug_rig(tmp_path, image, engine, "[fault]\naction = power-cut\ntime = 10ms\n")
    cut = threading.Event()
    r.backend.on_power_cut = lambda _line: cut.set()
    try:
        assert not cut.wait(0.3)                 # the clock has not started
        assert r.drv.write(8, pattern(512, 1)) == B.S_OK
        r.backend.start_clock()
        assert cut.wait(10)
        assert r.backend.inject.counts()[0]["fired"] == 1
    finally:
        r.close()
