"""Multiqueue verification run: a virtio-blk device with 4 request queues and
one C I/O thread per queue (``iothread=queue``) on io_uring, driven by the
Python driver of tests/helpers (no KVM) with reads, writes, flushes, discards
and write-zeroes (with and without unmap) mixed on every queue at once, each
read checked against a model of the disk, and at the end the whole disk read
back through the device and the image file compared with the model.

    python -m tests.stress.mq_verify --seconds N [--seed S]
    python -m tests.stress.mq_asan --seconds N    (the same, C under ASan/UBSan)

Each queue owns a quarter of the disk, in 64 KiB slots; a request takes a free
slot of its queue (DEPTH in flight per queue), so requests in flight never
overlap and the model is exact. Exit status 0 when every request succeeded
and every byte read was the model's; one summary line either way.
"""
from __future__ import annotations

import argparse
import os
import random
import select
import struct
import sys
import tempfile
import time

QUEUES = 4
DEPTH = 8
SLOT = 64 << 10
DISK = 64 << 20
SECTOR = 512
T_IN, T_OUT, T_FLUSH, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 11, 13
OPS = (("read", 40), ("write", 35), ("flush", 5), ("discard", 10), ("write-zeroes", 10))


class Mismatch(AssertionError):
    pass


def run(seconds: float, seed: int = 1, image: str | None = None, log=print) -> dict:
    from pykvm.virtio import blk as B
    from tests.conftest import Engine
    from tests.unit.test_virtio_blk import Rig

    rnd = random.Random(seed)
    own = image is None
    if own:
        fd, image = tempfile.mkstemp(prefix="mq-verify-", suffix=".raw")
        os.ftruncate(fd, DISK)
        os.close(fd)
    r = Rig(image, "pci", Engine("io_uring", "writeback"), queue=64, num_queues=QUEUES,
            iothread="queue")
    counts = {op: 0 for op, _ in OPS}
    try:
        assert r.dev._fast is not None and r.dev._fast.c_threads == QUEUES, "not on C threads"
        d, mem = r.drv, r.mem
        model = bytearray(DISK)
        slots_per_queue = DISK // QUEUES // SLOT
        # fixed buffers per (queue, in-flight index): header, data, segment, status
        bufs = {}
        for q in range(QUEUES):
            for i in range(DEPTH):
                bufs[q, i] = (d.vq.arena.alloc(16), d.vq.arena.alloc(SLOT, align=512),
                              d.vq.arena.alloc(16), d.vq.arena.alloc(1))
        free_idx = {q: list(range(DEPTH)) for q in range(QUEUES)}
        free_slots = {q: list(range(slots_per_queue)) for q in range(QUEUES)}
        inflight: dict = {}         # (queue, head) -> (op, idx, slot, offset, length)
        names, weights = zip(*OPS)
        polls = select.poll()
        fds = {d.t.interrupt_fd(q): q for q in range(QUEUES)}
        for fd in fds:
            polls.register(fd, select.POLLIN)

        def submit(q: int) -> None:
            op = rnd.choices(names, weights)[0]
            idx = free_idx[q].pop()
            hdr, data, seg, status = bufs[q, idx]
            slot = None
            if op != "flush":
                slot = free_slots[q].pop(rnd.randrange(len(free_slots[q])))
            base = (q * slots_per_queue + (slot or 0)) * SLOT
            start = rnd.randrange(SLOT // SECTOR) * SECTOR
            length = rnd.randint(1, (SLOT - start) // SECTOR) * SECTOR
            offset = base + start
            mem.write(status, b"\xff")
            if op == "read":
                chain = [(hdr, 16, False), (data, length, True), (status, 1, True)]
                mem.write(hdr, struct.pack("<IIQ", T_IN, 0, offset // SECTOR))
            elif op == "write":
                payload = rnd.randbytes(length)
                mem.write(data, payload)
                model[offset:offset + length] = payload
                mem.write(hdr, struct.pack("<IIQ", T_OUT, 0, offset // SECTOR))
                chain = [(hdr, 16, False), (data, length, False), (status, 1, True)]
            elif op == "flush":
                mem.write(hdr, struct.pack("<IIQ", T_FLUSH, 0, 0))
                chain = [(hdr, 16, False), (status, 1, True)]
            else:
                unmap = op == "discard" or rnd.random() < 0.5
                mem.write(hdr, struct.pack("<IIQ", T_DISCARD if op == "discard"
                                           else T_WRITE_ZEROES, 0, 0))
                mem.write(seg, struct.pack("<QII", offset // SECTOR, length // SECTOR,
                                           int(unmap) if op == "write-zeroes" else 0))
                model[offset:offset + length] = bytes(length)   # raw: a punched hole reads 0
                chain = [(hdr, 16, False), (seg, 16, False), (status, 1, True)]
            head = d.submit(chain, queue=q)
            inflight[q, head] = (op, idx, slot, offset, length)

        done_at: dict = {}          # (queue, head) -> (what it was, completions before it)

        def complete(q: int, head: int) -> None:
            if (q, head) not in inflight:
                was = done_at.get((q, head))
                raise Mismatch(f"queue {q}: a used entry for head {head}, not in flight "
                               + (f"(its last request, {was[0]}, completed "
                                  f"{sum(counts.values()) - was[1]} completions ago)" if was
                                  else "(never submitted)"))
            op, idx, slot, offset, length = inflight.pop((q, head))
            done_at[q, head] = ((op, offset, length), sum(counts.values()))
            hdr, data, seg, status = bufs[q, idx]
            st = mem.read_u(status, 1)
            if st != B.S_OK:
                raise Mismatch(f"queue {q}: {op} [{offset}, +{length}): status {st}")
            if op == "read":
                got = mem.read(data, length)
                want = bytes(model[offset:offset + length])
                if got != want:
                    bad = next(i for i in range(length) if got[i] != want[i])
                    raise Mismatch(f"queue {q}: read [{offset}, +{length}): byte {offset + bad} "
                                   f"is {got[bad]:#x}, the model says {want[bad]:#x}")
            counts[op] += 1
            free_idx[q].append(idx)
            if slot is not None:
                free_slots[q].append(slot)

        t0 = time.monotonic()
        last = t0
        while time.monotonic() - t0 < seconds:
            for q in range(QUEUES):
                while free_idx[q]:
                    submit(q)
            got = 0
            while not got:
                for q, vq in enumerate(d.vqs):
                    for head, _ in vq.reap():
                        complete(q, head)
                        got += 1
                    vq.set_used_event(vq.last_used)
                if got:
                    break
                events = polls.poll(5000)
                if not events:
                    raise Mismatch(f"no completion in 5 s ({len(inflight)} in flight)")
                for fd, _ in events:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
            if log and time.monotonic() - last >= 30:
                last = time.monotonic()
                log(f"mq-verify: {last - t0:.0f} s, {sum(counts.values())} requests", flush=True)
        while inflight:                      # the last ones
            for q, vq in enumerate(d.vqs):
                for head, _ in vq.reap():
                    complete(q, head)
                vq.set_used_event(vq.last_used)
            if inflight and not polls.poll(5000):
                raise Mismatch(f"no completion in 5 s ({len(inflight)} in flight)")
            for fd in fds:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
        # the whole disk through the device, then the file itself
        hdr, data, seg, status = bufs[0, 0]
        for off in range(0, DISK, SLOT):
            mem.write(hdr, struct.pack("<IIQ", T_IN, 0, off // SECTOR))
            st, _ = d.request([(hdr, 16, False), (data, SLOT, True), (status, 1, True)])
            if st != B.S_OK or mem.read(data, SLOT) != model[off:off + SLOT]:
                raise Mismatch(f"final read of [{off}, +{SLOT}): status {st} or data differ")
        c = r.dev.counters()
        if d.needs_reset:
            raise Mismatch("the device needs a reset")
    finally:
        r.close()
    with open(image, "rb") as f:
        if f.read() != model:
            raise Mismatch("the image file differs from the model")
    if own:
        os.unlink(image)
    counts["seconds"] = round(time.monotonic() - t0, 1)
    counts["c_requests"] = c.get("requests", 0)
    counts["punts"] = c.get("punts", 0)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tests.stress.mq_verify")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    try:
        counts = run(a.seconds, a.seed)
    except Mismatch as e:
        print(f"mq-verify: FAILED: {e}", flush=True)
        return 1
    print("mq-verify: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ": ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
