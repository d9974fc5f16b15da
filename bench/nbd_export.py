"""The nbd-export suite: fio's nbd engine against `pykvm serve --nbd` and
against `qemu-nbd`, serving the same fresh, preallocated 1 GiB raw image (its
bytes written, so reads meet data, not holes), on a Unix socket and on
127.0.0.1. Both servers use their defaults for a raw file (cache=writeback;
pykvm's fastest aio engine, qemu-nbd's thread pool) and are pinned to the last
CPU, fio to the first, the same for both. Systems alternate (A, B, A, B) within
each transport and job, on a quiet machine; the median of the samples counts,
and the ratio is pykvm over qemu-nbd. Server CPU per request: the server
process's CPU time over the requests fio completed.

Run by bench/run.py (``--suite nbd-export``), or alone:
``.venv/bin/python bench/nbd_export.py [--quick]``.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYKVM = [str(ROOT / ".venv" / "bin" / "pykvm")]
CLK_TCK = os.sysconf("SC_CLK_TCK")
IMAGE_SIZE = 1 << 30

JOBS = {
    # name: (rw, bs, iodepth)
    "randread-4k-qd32": ("randread", "4k", 32),
    "randwrite-4k-qd32": ("randwrite", "4k", 32),
    "seqread-1m-qd8": ("read", "1m", 8),
}
TARGETS = {"randread-4k-qd32": 0.9, "randwrite-4k-qd32": 0.9, "seqread-1m-qd8": 1.0}


def _cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _quiet(max_wait: float = 20.0, threshold: float = 0.15) -> None:
    """Wait until the machine's busy fraction over 0.2 s drops below threshold."""
    def busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        b0, t0 = busy()
        time.sleep(0.2)
        b1, t1 = busy()
        if (b1 - b0) / max(1, t1 - t0) < threshold:
            return


def make_image(path: pathlib.Path) -> None:
    """Fresh and preallocated: every byte written once (random data), then synced."""
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, IMAGE_SIZE)
        chunk = os.urandom(4 << 20)
        for _ in range(IMAGE_SIZE // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _pins():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return [], []
    return ["taskset", "-c", str(cpus[0])], ["taskset", "-c", str(cpus[-1])]


def _start(system: str, image: pathlib.Path, transport: str, tmp: pathlib.Path, pin: list):
    """The server, and the URI fio's nbd engine connects to."""
    if transport == "unix":
        sock = tmp / f"{system}.sock"
        sock.unlink(missing_ok=True)
        addr, uri = f"unix:{sock}", f"nbd+unix:///?socket={sock}"
    else:
        port = 10809 + (1 if system == "qemu-nbd" else 0)
        addr, uri = f"127.0.0.1:{port}", f"nbd://127.0.0.1:{port}/"
    if system == "pykvm":
        cmd = PYKVM + ["serve", "--nbd", addr, "--disk", f"file={image},format=raw",
                       "--persistent"]
    else:
        where = ["-k", str(sock)] if transport == "unix" else ["-b", "127.0.0.1", "-p",
                                                              str(port)]
        cmd = ["qemu-nbd", "-f", "raw", "-t", *where, str(image)]
    proc = subprocess.Popen(pin + cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while True:
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True)
        if r.returncode == 0:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench: {system} did not start: {proc.stderr.read().decode()}")
        time.sleep(0.1)
    return proc, uri


def _fio(uri: str, job: str, runtime: float, pin: list) -> dict:
    rw, bs, qd = JOBS[job]
    r = subprocess.run(pin + ["fio", f"--name={job}", "--ioengine=nbd", f"--uri={uri}",
                              f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
                              f"--size={IMAGE_SIZE}", "--time_based", f"--runtime={runtime:g}",
                              "--ramp_time=0.5", "--randrepeat=0", "--output-format=json"],
                       capture_output=True, timeout=runtime + 120)
    text = r.stdout.decode()
    if r.returncode != 0 or "{" not in text:
        raise SystemExit(f"bench: fio {job} on {uri} failed: {r.stderr.decode()[-400:]}")
    j = json.loads(text[text.index("{"):])["jobs"][0]
    d = j["write"] if rw.endswith("write") else j["read"]
    return {"iops": d["iops"], "bw_bytes": d["bw_bytes"], "ios": d["total_ios"]}


def bench_nbd_export(runtime: float, samples: int) -> list[dict]:
    fio_pin, server_pin = _pins()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-nbd-", dir=ROOT / "bench") as d:
        tmp = pathlib.Path(d)
        image = tmp / "disk.raw"
        make_image(image)
        for transport in ("unix", "tcp"):
            got: dict = {(s, j): [] for s in ("pykvm", "qemu-nbd") for j in JOBS}
            for _ in range(samples):
                for system in ("pykvm", "qemu-nbd"):
                    proc, uri = _start(system, image, transport, tmp, server_pin)
                    try:
                        for job in JOBS:
                            _quiet()
                            cpu0 = _cpu_s(proc.pid)
                            m = _fio(uri, job, runtime, fio_pin)
                            m["cpu_us_per_io"] = (_cpu_s(proc.pid) - cpu0) * 1e6 / max(1, m["ios"])
                            got[(system, job)].append(m)
                    finally:
                        proc.terminate()
                        proc.wait(20)
            for job in JOBS:
                med = {}
                for system in ("pykvm", "qemu-nbd"):
                    ms = got[(system, job)]
                    med[system] = statistics.median(m["iops"] for m in ms)
                    runs.append({"system": system, "workload": f"nbd-{transport}-{job}",
                                 "samples": len(ms), "iops": med[system],
                                 "bw_bytes": statistics.median(m["bw_bytes"] for m in ms),
                                 "cpu_us_per_io": statistics.median(m["cpu_us_per_io"]
                                                                    for m in ms),
                                 "all_iops": [m["iops"] for m in ms]})
                runs[-2]["vs_qemu_nbd"] = med["pykvm"] / med["qemu-nbd"] if med["qemu-nbd"] \
                    else 0.0
                runs[-2]["target"] = TARGETS[job]
    return runs


def nbd_export_table(runs: list[dict]) -> str:
    rows = [r for r in runs if r["workload"].startswith("nbd-")]
    if not rows:
        return ""
    by = {(r["workload"], r["system"]): r for r in rows}
    lines = []
    for (workload, system), r in by.items():
        if system != "pykvm":
            continue
        q = by.get((workload, "qemu-nbd"))
        if q is None:
            continue
        ratio = r.get("vs_qemu_nbd", r["iops"] / q["iops"] if q["iops"] else 0.0)
        mark = "" if ratio >= r.get("target", 0) else " (below target)"
        lines.append(f"| {workload} | {r['iops']:,.0f} | {q['iops']:,.0f} | {ratio:.2f}x"
                     f"{mark} | {r['cpu_us_per_io']:.1f} / {q['cpu_us_per_io']:.1f} |")
    return ("\n| NBD export (fio nbd engine) | pykvm IOPS | qemu-nbd IOPS | pykvm/qemu-nbd | "
            "server CPU us/IO (pykvm / qemu-nbd) |\n|---|---|---|---|---|\n" +
            "\n".join(lines) + "\n")


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    runs = bench_nbd_export(1.0 if quick else 5.0, 1 if quick else 3)
    print(json.dumps(runs, indent=2))
    print(nbd_export_table(runs), end="")
