"""Per-request traces: one JSON object a line, from both paths.

``--disk ...,trace=FILE`` (or the API) writes one line for every request the
device completes. The C I/O threads put fixed records in a lock-free ring each
(native/trace.c) that Python drains every ``DRAIN_SECONDS`` and at the end;
the Python path writes its records directly. The schema (every key, always):

  queue        the virtqueue
  head         the chain's head descriptor
  op           read | write | flush | get-id | discard | write-zeroes | bad (no header)
               | unknown (a type the device does not know)
  sector       the header's sector (0 for flush and get-id)
  length       data bytes (reads and writes; discard and write-zeroes: the range)
  submit_ns    CLOCK_MONOTONIC when the device took the chain
  complete_ns  when it put the used element
  latency_ns   complete_ns - submit_ns
  status       ok | ioerr | unsupp
  path         c | python (which path served it)
  rule         the index of the blkdebug rule that fired on it (in file order), or null

A full ring drops records and counts them (``Trace.dropped``); the summary says so.
"""
from __future__ import annotations

import json
import threading

from .._native import ffi, lib

DRAIN_SECONDS = 0.1
RING_ORDER = 16              # 65536 records per C thread between drains
OPS = {0: "read", 1: "write", 4: "flush", 8: "get-id", 11: "discard", 13: "write-zeroes",
       14: "secure-erase",
       0xFF: "bad"}
STATUSES = {0: "ok", 1: "ioerr", 2: "unsupp"}
PATHS = {1: "c", 2: "python"}


class Trace:
    """The trace of one disk, written to ``path`` (JSON lines)."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "w", encoding="utf-8", buffering=1 << 16)
        self._lock = threading.Lock()
        self._rings: list = []
        self._buf = ffi.new("struct pykvm_trace_rec[]", 4096)
        self.records = 0
        self._dropped_before = 0

    def ring(self):
        """A new C ring (one per C I/O thread); drained with the others."""
        r = lib.pykvm_trace_new(RING_ORDER)
        if r == ffi.NULL:
            raise MemoryError("out of memory for a trace ring")
        r = ffi.gc(r, lib.pykvm_trace_free)
        with self._lock:
            self._rings.append(r)
        return r

    def retire(self, ring) -> None:
        """A C thread stopped: its last records, then the ring goes."""
        with self._lock:
            self._drain_one(ring)
            self._dropped_before += lib.pykvm_trace_dropped(ring)
            self._rings.remove(ring)

    def add(self, queue: int, head: int, rtype: int, sector: int, length: int,
            submit_ns: int, complete_ns: int, status: int, rule: int) -> None:
        """A record of the Python path."""
        with self._lock:
            self._write(queue, head, rtype, sector, length, submit_ns, complete_ns, status,
                        2, rule)

    def _write(self, queue, head, rtype, sector, length, t0, t1, status, path, rule) -> None:
        self._f.write(json.dumps({
            "queue": queue, "head": head, "op": OPS.get(rtype, "unknown"), "sector": sector,
            "length": length, "submit_ns": t0, "complete_ns": t1, "latency_ns": t1 - t0,
            "status": STATUSES.get(status, str(status)), "path": PATHS[path],
            "rule": rule if rule >= 0 else None}, separators=(",", ":")) + "\n")
        self.records += 1

    def _drain_one(self, ring) -> None:
        buf = self._buf
        while True:
            n = lib.pykvm_trace_drain(ring, buf, len(buf))
            for i in range(n):
                r = buf[i]
                self._write(r.queue, r.head, r.type, r.sector, r.length, r.submit_ns,
                            r.complete_ns, r.status, r.path, r.rule)
            if n < len(buf):
                return

    def drain(self) -> None:
        with self._lock:
            for ring in self._rings:
                self._drain_one(ring)

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped_before + sum(lib.pykvm_trace_dropped(r) for r in self._rings)

    def close(self) -> None:
        self.drain()
        with self._lock:
            if not self._f.closed:
                self._f.close()


# -- reading traces: pykvm trace summary | plot ---------------------------------------

def read(path: str) -> list[dict]:
    """The records of a trace file; ValueError naming the line if one is not a record."""
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rec["latency_ns"], rec["op"], rec["complete_ns"]    # noqa: B018 (required keys)
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{no}: not a trace record") from None
            out.append(rec)
    return out


def _percentile(sorted_values: list, p: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def summary(records: list[dict]) -> dict:
    """Counts, IOPS, latency percentiles by op, and queue depth (requests in
    flight, sampled at each submission), over the whole trace."""
    if not records:
        return {"requests": 0, "ops": {}}
    t0 = min(r["submit_ns"] for r in records)
    t1 = max(r["complete_ns"] for r in records)
    seconds = max(t1 - t0, 1) / 1e9
    ops: dict = {}
    for r in records:
        ops.setdefault(r["op"], []).append(r)
    out_ops = {}
    for op, rs in sorted(ops.items()):
        lat = sorted(r["latency_ns"] for r in rs)
        out_ops[op] = {
            "count": len(rs), "iops": len(rs) / seconds,
            "errors": sum(r["status"] != "ok" for r in rs),
            "bytes": sum(r["length"] for r in rs if op in ("read", "write")),
            "lat_ns": {"min": lat[0], "p50": _percentile(lat, 50), "p90": _percentile(lat, 90),
                       "p99": _percentile(lat, 99), "max": lat[-1],
                       "mean": sum(lat) / len(lat)}}
    # queue depth: +1 at each submission, -1 at each completion, sampled at submissions
    events = sorted([(r["submit_ns"], 1) for r in records] +
                    [(r["complete_ns"], -1) for r in records], key=lambda e: (e[0], e[1]))
    depth, samples = 0, []
    for _t, d in events:
        depth += d
        if d > 0:
            samples.append(depth)
    samples.sort()
    return {"requests": len(records), "seconds": seconds, "iops": len(records) / seconds,
            "ops": out_ops,
            "queue_depth": {"mean": sum(samples) / len(samples), "p50": _percentile(samples, 50),
                            "max": samples[-1]},
            "paths": {p: sum(r["path"] == p for r in records) for p in ("c", "python")},
            "rules_fired": sum(r.get("rule") is not None for r in records)}


def summary_lines(s: dict) -> list[str]:
    if not s["requests"]:
        return ["no requests"]
    lines = [f"{s['requests']} requests in {s['seconds']:.3f} s: {s['iops']:.0f} IOPS, "
             f"queue depth mean {s['queue_depth']['mean']:.1f} (p50 {s['queue_depth']['p50']}, "
             f"max {s['queue_depth']['max']}); path c {s['paths']['c']}, python "
             f"{s['paths']['python']}; a rule fired on {s['rules_fired']}",
             f"{'op':<13}{'count':>9}{'IOPS':>10}{'errors':>8}{'p50 us':>10}{'p90 us':>10}"
             f"{'p99 us':>10}{'max us':>10}"]
    for op, o in s["ops"].items():
        lat = o["lat_ns"]
        lines.append(f"{op:<13}{o['count']:>9}{o['iops']:>10.0f}{o['errors']:>8}"
                     f"{lat['p50'] / 1e3:>10.1f}{lat['p90'] / 1e3:>10.1f}"
                     f"{lat['p99'] / 1e3:>10.1f}{lat['max'] / 1e3:>10.1f}")
    return lines


def plot(records: list[dict], out: str, bucket_s: float = 0.1) -> None:
    """Latency of every request over time (by op) and IOPS per bucket, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    if records:
        t0 = min(r["submit_ns"] for r in records)
        for op in sorted({r["op"] for r in records}):
            rs = [r for r in records if r["op"] == op]
            ax1.scatter([(r["complete_ns"] - t0) / 1e9 for r in rs],
                        [r["latency_ns"] / 1e3 for r in rs], s=2, label=op)
        ax1.set_yscale("log")
        ax1.legend(loc="upper right")
        buckets: dict = {}
        for r in records:
            k = int((r["complete_ns"] - t0) / 1e9 / bucket_s)
            buckets[k] = buckets.get(k, 0) + 1
        ks = sorted(buckets)
        ax2.plot([k * bucket_s for k in ks], [buckets[k] / bucket_s for k in ks])
    ax1.set_ylabel("latency (us)")
    ax2.set_ylabel("IOPS")
    ax2.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
