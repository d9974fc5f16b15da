"""The workload guest's result line, turned into fio's output layouts.

The workload guest (guest/guests/workload.c) prints one line
``fio-result: key=value ...`` with counts, latency sums and a log-linear
latency histogram per direction. ``parse_result`` reads it; ``to_json``
follows fio's JSON schema (``jobs[].read|write.{io_bytes, bw_bytes, iops,
lat_ns.{min, max, mean, percentile}}``, ``jobs[].error``) so existing fio
tooling reads it; ``to_normal`` prints fio's human layout.
"""
from __future__ import annotations

import json
import re

PERCENTILES = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5,
               99.9, 99.95, 99.99)
_LINE = re.compile(r"^fio-result: (.*)$", re.M)


class WorkloadError(ValueError):
    pass


def bucket_bounds(idx: int) -> tuple[int, int]:
    """[lo, hi] in ns of histogram bucket ``idx`` (the guest's encoding: exact
    below 16 ns, then 16 linear sub-buckets per power of two)."""
    if idx < 16:
        return idx, idx
    msb = idx // 16 + 3
    width = 1 << (msb - 4)
    lo = (1 << msb) + (idx % 16) * width
    return lo, lo + width - 1


def parse_hist(text: str) -> dict[int, int]:
    if text in ("", "-"):
        return {}
    out = {}
    for item in text.split(","):
        idx, _, count = item.partition(":")
        out[int(idx)] = out.get(int(idx), 0) + int(count)
    return out


def percentiles(hist: dict[int, int], points=PERCENTILES) -> dict[str, int]:
    """fio-style percentiles (keys like '99.900000'), from bucket midpoints."""
    total = sum(hist.values())
    out = {}
    if not total:
        return {f"{p:.6f}": 0 for p in points}
    items = sorted(hist.items())
    for p in points:
        need = p / 100.0 * total
        seen = 0
        for idx, count in items:
            seen += count
            if seen >= need:
                lo, hi = bucket_bounds(idx)
                out[f"{p:.6f}"] = (lo + hi) // 2
                break
    return out


def parse_result(output: str) -> dict:
    """The last ``fio-result:`` line of the guest's output, as a dict of fields."""
    lines = _LINE.findall(output)
    if not lines:
        raise WorkloadError("the workload guest printed no result line")
    fields = {}
    for item in lines[-1].split():
        key, eq, value = item.partition("=")
        if not eq:
            raise WorkloadError(f"malformed result field {item!r}")
        fields[key] = value
    for key, value in fields.items():
        if key.endswith("_hist"):
            fields[key] = parse_hist(value)
        elif re.fullmatch(r"-?\d+", value):
            fields[key] = int(value)
    return fields


def _direction(r: dict, d: str) -> dict:
    ios, nbytes = r.get(f"{d}_ios", 0), r.get(f"{d}_bytes", 0)
    secs = r["time_ns"] / 1e9 if r.get("time_ns") else 0
    hist = r.get(f"{d}_hist", {})
    mean = r.get(f"{d}_lat_sum_ns", 0) / ios if ios else 0.0
    lat = {"min": r.get(f"{d}_lat_min_ns", 0) if ios else 0,
           "max": r.get(f"{d}_lat_max_ns", 0), "mean": mean, "N": ios,
           "percentile": percentiles(hist)}
    return {"io_bytes": nbytes, "io_kbytes": nbytes // 1024,
            "bw_bytes": int(nbytes / secs) if secs else 0,
            "bw": int(nbytes / secs / 1024) if secs else 0,
            "iops": ios / secs if secs else 0.0, "runtime": int(r.get("time_ns", 0) / 1e6),
            "total_ios": ios, "lat_ns": lat, "clat_ns": lat}


JOB_OPTIONS = ("rw", "bs", "iodepth", "queues", "size", "offset", "seed")


def to_json(r: dict, extra: dict | None = None) -> str:
    error = 0 if not r.get("io_errors") and not r.get("verify_errors") else 5  # EIO, as fio
    job = {"jobname": "pykvm", "groupid": 0, "error": error,
           "job options": {k: str(r[k]) for k in JOB_OPTIONS if k in r},
           "read": _direction(r, "read"), "write": _direction(r, "write"),
           "verify_errors": r.get("verify_errors", 0), "first_bad": r.get("first_bad", -1)}
    doc = {"fio version": "pykvm-workload", "jobs": [job]}
    if extra:
        doc["pykvm"] = extra
    return json.dumps(doc, indent=2)


def _si(value: float, unit: str = "") -> str:
    for suffix, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= div:
            return f"{value / div:.1f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def _bin(nbytes: float) -> str:
    for suffix, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= div:
            return f"{nbytes / div:.1f}{suffix}"
    return f"{nbytes:.0f}B"


def to_normal(r: dict) -> str:
    """fio's human-readable summary layout."""
    bs = r.get("bs", 0)
    lines = [f"pykvm: (g=0): rw={r.get('rw')}, bs=(R) {bs}B-{bs}B, (W) {bs}B-{bs}B, "
             f"ioengine=virtio-blk, iodepth={r.get('iodepth')}, queues={r.get('queues', 1)}",
             f"pykvm: (groupid=0, jobs=1): err={0 if not r.get('io_errors') else 5}: "
             f"transport={r.get('transport')}"]
    for d in ("read", "write"):
        j = _direction(r, d)
        if not j["total_ios"]:
            continue
        ms = r["time_ns"] / 1e6
        lines.append(f"  {d}: IOPS={_si(j['iops'])}, BW={_bin(j['bw_bytes'])}/s "
                     f"({_si(j['bw_bytes'], 'B')}/s)({_bin(j['io_bytes'])}/{ms:.0f}msec)")
        lat = j["lat_ns"]
        lines.append(f"    clat (usec): min={lat['min'] / 1e3:.2f}, max={lat['max'] / 1e3:.2f}, "
                     f"avg={lat['mean'] / 1e3:.2f}")
        lines.append("    clat percentiles (usec):")
        pct = list(lat["percentile"].items())
        for i in range(0, len(pct), 4):
            row = ", ".join(f"{float(k):5.2f}th=[{v / 1e3:.1f}]" for k, v in pct[i:i + 4])
            lines.append(f"     | {row}")
    verify = r.get("verify_errors", 0)
    lines.append(f"  verify: errors={verify}" + (f", first bad block at offset {r['first_bad']}"
                                                 if verify else ""))
    lines.append(f"  io errors: {r.get('io_errors', 0)}, flushes: {r.get('flushes', 0)}")
    return "\n".join(lines)
