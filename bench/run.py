#!/usr/bin/env python3
"""pykvm benchmarks: ratios measured against a baseline in the same run.

This machine is shared and noisy, so every comparison alternates the systems
(A, B, A, B, ...) within one run, waits for a quiet machine before each
sample, records how much CPU other tenants used during it, and retakes a
sample that others disturbed. Results: bench/results/latest.json (plus a dated
copy) and bench/results/latest.md, a table of ratios.

Workloads so far:
  boot-hello   wall time of a whole `pykvm run hello.elf` against QEMU microvm
               booting the same ELF (target: pykvm <= 1.0x QEMU)
  pio-exits    PIO exits per second the Python run loop serves (the guest
               times N `out` instructions with the TSC), against QEMU serving
               the same guest
  qcow2        qcow2 against raw (allocated-cluster 4k random reads, same
               engine and content), allocating 1M sequential writes against
               QEMU's qcow2, and `pykvm img convert` against `qemu-img convert`
               of a 1 GiB image with holes
  io           the workload guest on one raw image with cache=none, for each
               workload below: fio on the host (direct=1, io_uring, buffers in huge
               pages as guest RAM is; the limit),
               pykvm (each aio engine, MMIO and PCI) and QEMU (same guest, same
               image, cache=none, aio=io_uring, iothread; microvm virtio-mmio
               and pc virtio-blk-pci), alternated within each workload, the
               median of 3 rounds
  vhost        the Linux kit in QEMU (TCG) running fio on a vhost-user-blk
               disk served by `pykvm serve` and by qemu-storage-daemon, and on
               QEMU's own virtio-blk-pci (target: pykvm >= 1.0x the daemon, at
               less CPU per request); the kit's boot-to-init time
  mq           the workload guest on 2 and 4 request queues (VIRTIO_BLK_F_MQ):
               pykvm's C path with one I/O thread per device against one per
               queue (iothread=device|queue), and QEMU with one iothread
  throttle     throttling.iops-total=500 and 5000, bps-total=50M and a burst
               (iops-total-max) on the C path, the Python path and QEMU's
               -drive throttling.*: the rate each achieves over the run against
               the limit, and against what the rule allows a guest that always
               waits in that time (the first bucket goes at once)
  inject       the blkdebug node and the per-request trace on the C path, 4K
               randread QD32: 16 rules that never fire and the trace, each
               against the same disk without them (target: >= 0.95x), and a
               1 ms delay on every read against QD / 1 ms, or the plain
               disk's rate if that is lower (target: within 5%)
  nbd          both halves of NBD, on a Unix socket and on 127.0.0.1, 4K
               randread and randwrite QD32 and 1M sequential read QD8:
               nbd-client: the workload guest on pykvm's C path (io_uring
               engine, cache=none) on an NBD disk from qemu-nbd, against
               QEMU (microvm, iothread, cache=none) booting the same guest
               with file=nbd://... from the same server (target >= 1.0x);
               nbd-export: fio's nbd engine against `pykvm serve --nbd` and
               qemu-nbd on the same fresh, preallocated 1 GiB raw image
               (targets: >= 0.9x qemu-nbd at 4K, >= 1.0x at 1M;
               bench/nbd_export.py). Each half alone: --suite nbd-client,
               --suite nbd-export
  dedup        `pykvm img dedup` on a 4 GiB qcow2 image, half of its clusters
               duplicates: dry run and real run, GB/s of allocated data read
               (target: >= 1 GB/s; bench/dedup.py)
  crash        crashtest's states per minute on a 256 MiB ext4 image written
               by the Linux kit (e2fsck -fn as the check, and e2fsck after
               journal recovery), the time making a state takes against
               checking it (target: <= 0.1x with e2fsck -fn), and blklogwrites' cost on the C path at 4K randwrite
               QD32 (target: >= 0.9x without it)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from nbd_export import bench_nbd_export, nbd_export_table  # noqa: E402
from dedup import bench_dedup, dedup_table  # noqa: E402
RESULTS = ROOT / "bench" / "results"
GUESTS = ROOT / "guest" / "build"
PYKVM = [str(ROOT / ".venv" / "bin" / "pykvm")]
QEMU = "qemu-system-x86_64"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """Seconds of CPU time the whole machine has spent busy (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def wait_quiet(max_wait: float = 30.0, threshold: float = 0.15) -> float:
    """Wait until the machine's busy fraction over 0.2 s drops below threshold."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_s(), time.monotonic()
        time.sleep(0.2)
        frac = (cpu_busy_s() - b0) / (time.monotonic() - t0) / os.cpu_count()
        if frac < threshold or time.monotonic() > deadline:
            return frac


def measure(cmd: list[str], expect: int | None = None, retries: int = 3) -> dict:
    """Run cmd once on a quiet machine: wall time, its CPU, and the CPU others used."""
    for attempt in range(retries):
        wait_quiet()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, timeout=300)
        wall = time.perf_counter() - t0
        busy = cpu_busy_s() - busy0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if expect is not None and r.returncode != expect:
            raise SystemExit(f"bench: {cmd[0]} exited {r.returncode}, expected {expect}: "
                             f"{r.stderr.decode().strip()[-300:]}")
        others = max(0.0, busy - own)
        # /proc/stat ticks are 10 ms: only a disturbance well above that counts
        if others <= max(0.05, 0.5 * wall) or attempt == retries - 1:
            return {"wall_s": wall, "host_cpu_s": own, "others_cpu_s": others,
                    "stdout": r.stdout.decode(errors="replace"), "retried": attempt}
    raise AssertionError("unreachable")


def machine_info() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.split("\n")[0] \
        if shutil.which(QEMU) else None
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "kvm": "kvm_pvm" if os.path.isdir("/sys/module/kvm_pvm") else "kvm",
            "python": platform.python_version(), "qemu": qemu,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def qemu_microvm_cmd(elf: pathlib.Path, cmdline: str) -> list[str]:
    return [QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "256M",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-kernel", str(elf),
            "-append", cmdline]


def bench_boot(samples: int) -> list[dict]:
    hello = GUESTS / "hello.elf"
    systems = {
        "pykvm": (PYKVM + ["run", str(hello), "--cmdline", "bench"], 0),
        "qemu": (qemu_microvm_cmd(hello, "bench"), 1),
    }
    walls: dict[str, list[dict]] = {k: [] for k in systems}
    for _ in range(samples):
        for name, (cmd, expect) in systems.items():  # alternate A, B, A, B
            walls[name].append(measure(cmd, expect))
    runs = []
    for name, ms in walls.items():
        w = [m["wall_s"] for m in ms]
        runs.append({"system": name, "workload": "boot-hello", "samples": len(w),
                     "wall_s_median": statistics.median(w), "wall_s_min": min(w),
                     "host_cpu_s": statistics.median(m["host_cpu_s"] for m in ms),
                     "others_cpu_s": max(m["others_cpu_s"] for m in ms),
                     "retried": sum(m["retried"] for m in ms)})
    return runs


def host_tsc_khz() -> int:
    sys.path.insert(0, str(ROOT))
    from pykvm.kvm import Kvm
    kvm = Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    khz = vcpu.get_tsc_khz()
    vcpu.close(), vm.close(), kvm.close()
    return khz


def bench_pio(count: int, samples: int) -> list[dict]:
    """Exit rate of a CPL-3 `out` loop; QEMU serves the same guest as the baseline."""
    elf = GUESTS / "pio_loop.elf"
    # QEMU leaves CPUID 0x40000010 empty: hand the guest the TSC frequency.
    cmdline = f"count={count} tsc_khz={host_tsc_khz()}"
    systems = {"pykvm": (PYKVM + ["run", str(elf), "--cmdline", cmdline], 0),
               "qemu": (qemu_microvm_cmd(elf, cmdline), 1)}
    rates: dict[str, list[float]] = {k: [] for k in systems}
    others: dict[str, float] = {k: 0.0 for k in systems}
    for _ in range(samples):
        for name, (cmd, expect) in systems.items():
            m = measure(cmd, expect)
            got = re.search(r"^pio_loop: (\d+) exits in (\d+) ns$", m["stdout"], re.M)
            if not got:
                raise SystemExit(f"bench: pio_loop under {name} printed no result: "
                                 f"{m['stdout'][-300:]}")
            rates[name].append(int(got.group(1)) / (int(got.group(2)) / 1e9))
            others[name] = max(others[name], m["others_cpu_s"])
    return [{"system": name, "workload": "pio-exits", "samples": samples, "exits": count,
             "exits_per_s_median": statistics.median(r), "exits_per_s_max": max(r),
             "others_cpu_s": others[name]} for name, r in rates.items()]


IO_WORKLOADS = {
    # name: (rw, bs, iodepth): the talk's performance slides, plus small blocks
    "seqread-1m-qd8": ("read", 1 << 20, 8),
    "seqwrite-1m-qd8": ("write", 1 << 20, 8),
    "randread-256k-qd8": ("randread", 256 << 10, 8),
    "randread-16k-qd32": ("randread", 16 << 10, 32),
    "randread-4k-qd1": ("randread", 4096, 1),
    "randread-4k-qd32": ("randread", 4096, 32),
    "randwrite-4k-qd32": ("randwrite", 4096, 32),
}
ENGINES = ["python", "threads", "native", "io_uring"]
IMAGE_SIZE = 1 << 30


def make_image(path: pathlib.Path) -> None:
    """A fully written raw image: reads must reach the disk, not a hole."""
    if path.exists() and path.stat().st_size == IMAGE_SIZE and \
            path.stat().st_blocks * 512 >= IMAGE_SIZE:
        return
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(IMAGE_SIZE >> 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def direction_row(d: dict, system: str, transport: str, workload: str, m: dict) -> dict:
    """A result row from one direction of a fio-style job (fio's JSON layout)."""
    return {"system": system, "transport": transport, "workload": workload,
            "iops": d["iops"], "bw_bytes": d["bw_bytes"],
            "lat_ns_p50": d["clat_ns"]["percentile"]["50.000000"],
            "lat_ns_p99": d["clat_ns"]["percentile"]["99.000000"],
            "host_cpu_s": m["host_cpu_s"], "others_cpu_s": m["others_cpu_s"],
            "ios": d["total_ios"]}


def io_result(fields: dict, system: str, transport: str, workload: str, m: dict) -> dict:
    """A result row from the workload guest's result line (QEMU runs)."""
    from pykvm import fio
    d = fio._direction(fields, "read" if fields.get("read_ios") else "write")
    return direction_row(d, system, transport, workload, m)


HUGEPAGES = pathlib.Path("/proc/sys/vm/nr_hugepages")


def reserve_hugepages(n: int) -> int | None:
    """At least ``n`` huge pages reserved (for host fio's buffers); the count to
    restore afterwards, or None when they cannot be had (not root, no memory)."""
    try:
        old = int(HUGEPAGES.read_text())
        if old < n:
            HUGEPAGES.write_text(str(n))
        if int(HUGEPAGES.read_text()) < n:
            HUGEPAGES.write_text(str(old))
            return None
        return old
    except OSError:
        return None


def bench_io(runtime: float, engines: list[str], workloads: dict, rounds: int) -> list[dict]:
    # Host fio's buffers sit in huge pages, as the guests' RAM does (DESIGN.md): from
    # 4 KiB pages, 256K random reads measured 1.3-1.6 GB/s here against 3.3 GB/s from
    # huge pages, for fio on the host and for pykvm alike
    old_huge = reserve_hugepages(16)
    try:
        return _bench_io(runtime, engines, workloads, rounds,
                         ["--iomem=shmhuge"] if old_huge is not None else [])
    finally:
        if old_huge is not None:
            HUGEPAGES.write_text(str(old_huge))


def _bench_io(runtime: float, engines: list[str], workloads: dict, rounds: int,
              iomem: list[str]) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from pykvm import fio

    if not iomem:
        print("bench: no huge pages for host fio's buffers: its large-block results are low",
              file=sys.stderr)
    img = RESULTS.parent / "bench.img"
    make_image(img)
    tsc = host_tsc_khz()
    runs = []
    for wname, (rw, bs, qd) in workloads.items():
        # writes reuse their buffers (only a header is stamped), as host fio does: a
        # guest generating every block would be measuring its own CPU, not the I/O path
        writes = "write" in rw
        guest_opts = f"rw={rw} bs={bs} iodepth={qd} runtime={runtime:g} tsc_khz={tsc}" + \
            (" refill=0" if writes else "")
        systems = {}
        systems[("host", "-")] = (["fio", "--name=host", f"--filename={img}", f"--rw={rw}",
                                   f"--bs={bs}", f"--iodepth={qd}", "--ioengine=io_uring",
                                   "--direct=1", f"--runtime={round(runtime * 1000)}ms", "--time_based",
                                   *iomem, "--output-format=json"], 0)
        for engine in engines:
            for transport in ("mmio", "pci"):
                systems[(f"pykvm-{engine}", transport)] = (PYKVM + [
                    "fio", "--disk", f"file={img},cache=none,aio={engine},transport={transport}",
                    f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--runtime={runtime:g}",
                    "--output-format=json", *(["--no-refill"] if writes else [])], 0)
        for qaio in ("io_uring", "native"):
            for transport in ("mmio", "pci"):
                systems[(f"qemu-{qaio}", transport)] = (
                    qemu_io_cmd(img, qaio, transport, guest_opts), 1)
        got: dict = {key: [] for key in systems}
        for _ in range(rounds):  # alternated: every system once per round
            for (system, transport), (cmd, expect) in systems.items():
                m = measure(cmd, expect)
                if system.startswith("qemu"):
                    row = io_result(fio.parse_result(m["stdout"]), system, transport, wname, m)
                else:  # fio's JSON, from fio itself or from `pykvm fio`
                    row = fio_row(m, system, transport, wname)
                got[(system, transport)].append(row)
                print(f"  {wname:<18} {system:<14} {transport:<4} {row['iops']:>10.0f} IOPS "
                      f"{row['bw_bytes'] / 1e6:>8.1f} MB/s  ({m['wall_s']:.1f} s)", file=sys.stderr)
        runs += [dict(median_row(rows, "iops"), iops_samples=[r["iops"] for r in rows])
                 for rows in got.values()]
    return runs


def qemu_io_cmd(img: pathlib.Path, aio: str, transport: str, guest_opts: str,
                queues: int = 1, fmt: str = "raw", drive_opts: str = "") -> list[str]:
    """QEMU running the workload guest on ``img`` (a file or a URI: format
    ``fmt``, cache=none, ``aio`` unless None, one iothread): microvm with virtio-blk-device for mmio, pc with
    virtio-blk-pci for pci; ``queues`` request queues; ``drive_opts`` more
    -drive options (",throttling.iops-total=500")."""
    drive = f"id=d0,file={img},format={fmt},if=none,cache=none" + \
        (f",aio={aio}" if aio else "") + drive_opts
    common = ["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "256M",
              "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
              "-device", "isa-debug-exit,iobase=0x501,iosize=1",
              "-object", "iothread,id=io0", "-drive", drive,
              "-kernel", str(GUESTS / "workload.elf")]
    dev = f"drive=d0,iothread=io0,num-queues={queues}"
    if transport == "mmio":
        return [QEMU, "-M", "microvm", *common, "-global", "virtio-mmio.force-legacy=false",
                "-device", f"virtio-blk-device,{dev}",
                "-append", "virtio_mmio.device=512@0xfeb02e00:47 " + guest_opts]
    # qboot, not SeaBIOS: SeaBIOS runs at CPL 0, which this host emulates (3.3 s
    # of every boot); firmware plays no part once the guest runs
    return [QEMU, "-M", "pc", "-bios", "qboot.rom", "-vga", "none", "-nic", "none", *common,
            "-device", f"virtio-blk-pci,{dev},disable-legacy=on",
            "-append", "transport=pci " + guest_opts]


NBD_CLIENT_WORKLOADS = {
    "randread-4k-qd32": ("randread", 4096, 32),
    "randwrite-4k-qd32": ("randwrite", 4096, 32),
    "seqread-1m-qd8": ("read", 1 << 20, 8),
}


def bench_nbd_client(runtime: float, rounds: int) -> list[dict]:
    """pykvm's C path and QEMU, the same workload guest on the same NBD export
    (qemu-nbd serving a preallocated 1 GiB raw image), alternated."""
    sys.path.insert(0, str(ROOT))
    from nbd_export import _start as start_server, make_image as make_full_image
    from pykvm import fio

    tsc = host_tsc_khz()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-nbdc-", dir=ROOT / "bench") as d:
        tmp = pathlib.Path(d)
        img = tmp / "disk.raw"
        make_full_image(img)
        for transport in ("unix", "tcp"):
            server, uri = start_server("qemu-nbd", img, transport, tmp, [])
            try:
                for wname, (rw, bs, qd) in NBD_CLIENT_WORKLOADS.items():
                    workload = f"nbd-client-{transport}-{wname}"
                    writes = "write" in rw
                    guest_opts = f"rw={rw} bs={bs} iodepth={qd} runtime={runtime:g} " \
                                 f"tsc_khz={tsc}" + (" refill=0" if writes else "")
                    systems = {
                        "pykvm-io_uring": (PYKVM + [
                            "fio", "--disk", f"driver=raw,file.driver=nbd,file.filename={uri},"
                            f"cache=none,aio=io_uring", f"--rw={rw}", f"--bs={bs}",
                            f"--iodepth={qd}", f"--runtime={runtime:g}", "--output-format=json",
                            *(["--no-refill"] if writes else [])], 0),
                        "qemu": (qemu_io_cmd(uri, None, "mmio", guest_opts), 1),
                    }
                    got: dict = {k: [] for k in systems}
                    for i in range(rounds):   # alternated, who goes first too
                        order = list(systems.items())
                        for system, (cmd, expect) in order[::-1] if i % 2 else order:
                            # the server's page cache written back first: the run after
                            # a write job would pay for its dirty pages
                            os.sync()
                            m = measure(cmd, expect)
                            row = io_result(fio.parse_result(m["stdout"]), system, "mmio",
                                            workload, m) if system == "qemu" else \
                                fio_row(m, system, "mmio", workload)
                            got[system].append(row)
                            print(f"  nbd-client {transport:<4} {wname:<18} {system:<14} "
                                  f"{row['iops']:>10.0f} IOPS", file=sys.stderr)
                    med = {k: dict(median_row(v, "iops"), iops_samples=[r["iops"] for r in v])
                           for k, v in got.items()}
                    q = med["qemu"]["iops"]
                    med["pykvm-io_uring"]["vs_qemu"] = \
                        med["pykvm-io_uring"]["iops"] / q if q else 0.0
                    med["pykvm-io_uring"]["target"] = 1.0
                    runs += list(med.values())
            finally:
                server.terminate()
                server.wait(20)
    return runs


def nbd_client_table(runs: list[dict]) -> str:
    rows = {(r["workload"], r["system"]): r for r in runs
            if r["workload"].startswith("nbd-client-")}
    lines = []
    for (workload, system), r in rows.items():
        q = rows.get((workload, "qemu"))
        if system == "qemu" or q is None:
            continue
        ratio = r.get("vs_qemu", r["iops"] / q["iops"] if q["iops"] else 0.0)
        mark = "" if ratio >= r.get("target", 1.0) else " (below target)"
        lines.append(f"| {workload[len('nbd-client-'):]} | {r['iops']:,.0f} | {q['iops']:,.0f} "
                     f"| {ratio:.2f}x{mark} |")
    if not lines:
        return ""
    return ("\n| NBD client (guest on qemu-nbd) | pykvm IOPS | QEMU IOPS | pykvm/QEMU |\n"
            "|---|---|---|---|\n" + "\n".join(lines) + "\n")


def fio_row(m: dict, system: str, transport: str, workload: str) -> dict:
    """A result row from the output of `pykvm fio --output-format=json` or fio."""
    job = json.loads(m["stdout"])["jobs"][0]
    d = job["read"] if job["read"]["total_ios"] else job["write"]
    return direction_row(d, system, transport, workload, m)


MQ_WORKLOADS = {
    # name: (rw, bs, iodepth over all queues, queues)
    "mq2-randread-4k-qd32": ("randread", 4096, 32, 2),
    "mq4-randread-4k-qd32": ("randread", 4096, 32, 4),
    "mq2-randread-256k-qd8": ("randread", 256 << 10, 8, 2),
    "mq4-randread-256k-qd8": ("randread", 256 << 10, 8, 4),
}


def bench_mq(runtime: float, samples: int) -> list[dict]:
    """Several request queues: pykvm's C path with one I/O thread per device
    against one per queue (io_uring, MMIO and PCI), and QEMU with the same
    number of queues on one iothread; alternated, the median of ``samples``."""
    sys.path.insert(0, str(ROOT))
    from pykvm import fio

    img = RESULTS.parent / "bench.img"
    make_image(img)
    tsc = host_tsc_khz()
    runs = []
    for wname, (rw, bs, qd, nq) in MQ_WORKLOADS.items():
        guest_opts = f"rw={rw} bs={bs} iodepth={qd} queues={nq} runtime={runtime:g} tsc_khz={tsc}"
        systems = {}
        for transport in ("mmio", "pci"):
            for iothread in ("device", "queue"):
                systems[(f"pykvm-iothread-{iothread}", transport)] = PYKVM + [
                    "fio", "--disk", f"file={img},cache=none,aio=io_uring,transport={transport},"
                    f"queues={nq},iothread={iothread}", f"--rw={rw}", f"--bs={bs}",
                    f"--iodepth={qd}", f"--queues={nq}", f"--runtime={runtime:g}",
                    "--output-format=json"]
            systems[("qemu-io_uring", transport)] = qemu_io_cmd(img, "io_uring", transport,
                                                                guest_opts, queues=nq)
        got: dict = {key: [] for key in systems}
        for _ in range(samples):
            for (system, transport), cmd in systems.items():
                if system.startswith("qemu"):
                    m = measure(cmd, 1)
                    row = io_result(fio.parse_result(m["stdout"]), system, transport, wname, m)
                else:
                    row = fio_row(measure(cmd, 0), system, transport, wname)
                got[(system, transport)].append(dict(row, queues=nq))
                print(f"  {wname:<22} {system:<22} {transport:<4} {row['iops']:>10.0f} IOPS",
                      file=sys.stderr)
        runs += [median_row(rows, "iops") for rows in got.values()]
    return runs


def mq_table(runs: list[dict]) -> str:
    get = {(r["system"], r.get("transport"), r["workload"]): r for r in runs}
    lines = []
    for w in MQ_WORKLOADS:
        for t in ("mmio", "pci"):
            dev, per_q, q = (get.get((s, t, w)) for s in (
                "pykvm-iothread-device", "pykvm-iothread-queue", "qemu-io_uring"))
            if not (dev and per_q):
                continue
            cpu = [f"{r['host_cpu_s'] / r['ios'] * 1e6:.1f}" if r and r.get("ios") else "-"
                   for r in (dev, per_q, q)]
            lines.append(
                f"| {w} | {t} | {dev['iops']:,.0f} | {per_q['iops']:,.0f} | "
                f"{per_q['iops'] / dev['iops']:.2f}x | "
                + (f"{q['iops']:,.0f} | {dev['iops'] / q['iops']:.2f}x" if q else "- | -")
                + f" | {' / '.join(cpu)} |")
    if not lines:
        return ""
    return ("\n| several queues | transport | pykvm, thread per device (IOPS) | thread per queue "
            "| per queue / per device | QEMU, one iothread | per device / QEMU "
            "| CPU us/IO (device / queue / QEMU) |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n")


THROTTLE_CASES = {
    # name: (throttling options as --disk spells them, rw, bs, iodepth, the limited unit)
    "throttle-iops500": ({"iops-total": "500"}, "randread", 4096, 32, "iops"),
    "throttle-iops5000": ({"iops-total": "5000"}, "randread", 4096, 32, "iops"),
    "throttle-bps50M": ({"bps-total": "50M"}, "randread", 64 << 10, 8, "bw_bytes"),
    "throttle-burst": ({"iops-total": "500", "iops-total-max": "2000",
                        "iops-total-max-length": "2"}, "randread", 4096, 32, "iops"),
}


def throttle_model(options: dict, bs: int, runtime: float, unit: str) -> float:
    """The rate (IOPS or bytes/s) the rule lets a guest that always has a
    request waiting reach in ``runtime`` seconds (the Python twin, on its
    own clock)."""
    sys.path.insert(0, str(ROOT))
    from pykvm.block.throttle import ThrottleConfig, ThrottleGroup
    g = ThrottleGroup("model", ThrottleConfig(options))
    now, n, end = 0, 0, int(runtime * 1e9)
    while now < end:
        wait = g.admit(False, bs, now)
        if wait:
            now += wait
        else:
            n += 1
    return n / runtime * (bs if unit == "bw_bytes" else 1)


def bench_throttle(runtime: float, samples: int) -> list[dict]:
    """throttling.* on pykvm's C path (io_uring), its Python path and QEMU
    (-drive throttling.*, io_uring, iothread), MMIO, the same workload guest
    and image; alternated, the median of ``samples``."""
    sys.path.insert(0, str(ROOT))
    from pykvm import fio
    from pykvm.block.throttle import ThrottleConfig

    img = RESULTS.parent / "bench.img"
    make_image(img)
    tsc = host_tsc_khz()
    runs = []
    for wname, (options, rw, bs, qd, unit) in THROTTLE_CASES.items():
        cfg = ThrottleConfig(options)
        kind = next(k for k in ("iops-total", "bps-total") if k in options)
        limit = cfg.rate[kind]
        model = throttle_model(options, bs, runtime, unit)
        spec = "".join(f",throttling.{k}={v}" for k, v in options.items())
        # QEMU takes plain numbers only (50M is ours)
        qemu_opts = "".join(f",throttling.{k}={v}" for k, v in cfg.given.items())
        guest_opts = f"rw={rw} bs={bs} iodepth={qd} runtime={runtime:g} tsc_khz={tsc}"
        systems = {}
        for engine in ("io_uring", "python"):
            systems[f"pykvm-{engine}"] = PYKVM + [
                "fio", "--disk", f"file={img},cache=none,aio={engine}{spec}", f"--rw={rw}",
                f"--bs={bs}", f"--iodepth={qd}", f"--runtime={runtime:g}",
                "--output-format=json"]
        systems["qemu-io_uring"] = qemu_io_cmd(img, "io_uring", "mmio", guest_opts,
                                               drive_opts=qemu_opts)
        got: dict = {key: [] for key in systems}
        for _ in range(samples):
            for system, cmd in systems.items():
                if system.startswith("qemu"):
                    m = measure(cmd, 1)
                    row = io_result(fio.parse_result(m["stdout"]), system, "mmio", wname, m)
                else:
                    row = fio_row(measure(cmd, 0), system, "mmio", wname)
                row.update(limit=limit, unit=unit, model=model, achieved=row[unit],
                           vs_limit=row[unit] / limit, vs_model=row[unit] / model,
                           options=qemu_opts.lstrip(","))
                got[system].append(row)
                print(f"  {wname:<18} {system:<14} {row[unit]:>12,.0f} "
                      f"{'IOPS' if unit == 'iops' else 'B/s'}  {row['vs_limit']:.3f}x limit "
                      f"{row['vs_model']:.3f}x model", file=sys.stderr)
        runs += [median_row(rows, "achieved") for rows in got.values()]
    return runs


def throttle_table(runs: list[dict]) -> str:
    get = {(r["system"], r["workload"]): r for r in runs if r.get("suite") == "throttle"}
    lines = []
    for w in THROTTLE_CASES:
        row = [get.get((s, w)) for s in ("pykvm-io_uring", "pykvm-python", "qemu-io_uring")]
        if not any(row):
            continue
        first = next(r for r in row if r)
        if first["unit"] == "iops":
            def fmt(v):
                return f"{v:,.0f} IOPS"
        else:
            def fmt(v):
                return f"{v / 1e6:,.1f} MB/s"
        lines.append(f"| {w} | {first['options']} | {fmt(first['limit'])} | "
                     f"{fmt(first['model'])} | "
                     + " | ".join(f"{fmt(r['achieved'])} ({r['vs_limit']:.3f}x limit, "
                                  f"{r['vs_model']:.3f}x model)" if r else "-" for r in row)
                     + " |")
    if not lines:
        return ""
    return ("\n| throttling | options | limit | model (always waiting) | pykvm C path "
            "| pykvm Python path | QEMU |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n")


def median_row(rows: list[dict], key: str) -> dict:
    """The sample with the median ``key`` (the upper one of an even count)."""
    return dict(sorted(rows, key=lambda r: r[key])[len(rows) // 2], samples=len(rows))


def fresh_qcow2(path: pathlib.Path, size: int = IMAGE_SIZE) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)


def bench_qcow2(runtime: float, samples: int) -> list[dict]:
    """qcow2 against raw on the same engine and content (allocated-cluster
    random reads), allocating sequential writes against QEMU's qcow2, and
    `pykvm img convert` against `qemu-img convert`."""
    sys.path.insert(0, str(ROOT))
    from pykvm import fio

    img = RESULTS.parent / "bench.img"
    make_image(img)
    qimg = RESULTS.parent / "bench.qcow2"
    if not qimg.exists() or qimg.stat().st_mtime < img.stat().st_mtime:
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(img), str(qimg)], check=True)
    tsc = host_tsc_khz()
    runs = []

    def pykvm_fio(disk: str, rw: str, bs: int, qd: int) -> list[str]:
        return PYKVM + ["fio", "--disk", disk, f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
                        f"--runtime={runtime:g}", "--output-format=json"]

    # allocated clusters: same content and engine, raw vs qcow2 (Python path and C
    # path), alternated, the median of up to 3
    for engine in ("python", "io_uring"):
        got: dict[str, list[dict]] = {"raw": [], "qcow2": []}
        for _ in range(min(samples, 3)):
            for fmt, path in (("raw", img), ("qcow2", qimg)):
                disk = f"file={path},format={fmt},cache=none,aio={engine}"
                m = measure(pykvm_fio(disk, "randread", 4096, 32), 0)
                got[fmt].append(fio_row(m, f"pykvm-{engine}-{fmt}", "mmio",
                                        "qcow2-randread-4k-qd32"))
        runs += [median_row(rows, "iops") for rows in got.values()]
    # allocating sequential writes into an empty qcow2, pykvm (its default engine)
    # vs QEMU, alternated, the median of up to 3: one pass over a 4 GiB image
    # (every write allocates; a timed run would wrap around and overwrite), and
    # the guest stamps reused buffers (refill=0, as in the io suite): generating
    # each 1 MiB block would measure the guest's CPU
    target = RESULTS.parent / "bench-alloc.qcow2"
    alloc_size, alloc_ios = (1 << 30, 1024) if runtime < 1 else (4 << 30, 4096)
    cmd = qemu_io_cmd(target, "io_uring", "mmio", f"rw=write bs={1 << 20} iodepth=8 "
                      f"ios={alloc_ios} tsc_khz={tsc} refill=0", fmt="qcow2")
    pykvm_alloc = PYKVM + ["fio", "--disk", f"file={target},format=qcow2,cache=none", "--rw=write",
                           f"--bs={1 << 20}", "--iodepth=8", f"--ios={alloc_ios}", "--no-refill",
                           "--output-format=json"]
    alloc: dict[str, list[dict]] = {"pykvm": [], "qemu": []}
    for _ in range(min(samples, 3)):
        fresh_qcow2(target, alloc_size)
        m = measure(pykvm_alloc, 0)
        alloc["pykvm"].append(fio_row(m, "pykvm", "mmio", "qcow2-alloc-seqwrite-1m-qd8"))
        fresh_qcow2(target, alloc_size)
        m = measure(cmd, 1)
        alloc["qemu"].append(io_result(fio.parse_result(m["stdout"]), "qemu", "mmio",
                                       "qcow2-alloc-seqwrite-1m-qd8", m))
    runs += [median_row(rows, "bw_bytes") for rows in alloc.values()]
    target.unlink(missing_ok=True)
    return runs + bench_convert(samples)


def bench_convert(samples: int) -> list[dict]:
    """`pykvm img convert` against `qemu-img convert` (part of the qcow2 suite)."""
    runs = []
    # image conversion of a 1 GiB image with holes (a quarter data), alternated
    src = RESULTS.parent / "bench-holes.raw"
    if not src.exists():
        with open(src, "wb") as f:
            f.truncate(IMAGE_SIZE)
            chunk = os.urandom(1 << 20)
            for mib in range(0, IMAGE_SIZE >> 20, 4):
                f.seek(mib << 20)
                f.write(chunk)
    out = RESULTS.parent / "bench-convert.out"
    for out_fmt in ("qcow2", "raw"):
        walls: dict[str, list[float]] = {"pykvm": [], "qemu-img": []}
        for _ in range(samples):
            for name, tool in (("pykvm", PYKVM + ["img"]), ("qemu-img", ["qemu-img"])):
                out.unlink(missing_ok=True)
                subprocess.run(["sync"])
                walls[name].append(measure(tool + ["convert", "-O", out_fmt, str(src),
                                                   str(out)], 0)["wall_s"])
        for name, w in walls.items():
            runs.append({"system": name, "workload": f"convert-1g-holes-to-{out_fmt}",
                         "samples": len(w), "wall_s_median": statistics.median(w),
                         "wall_s_min": min(w)})
    out.unlink(missing_ok=True)
    return runs


# -- vhost-user: Linux (QEMU TCG) driving pykvm serve, qemu-storage-daemon, QEMU itself --

VHOST_JOBS = {
    # name: fio options inside the Linux guest (/dev/vda, direct, time based)
    "randread-4k-qd32": "--rw=randread --bs=4k --iodepth=32 --ioengine=io_uring",
    "randwrite-4k-qd32": "--rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring",
    "seqread-1m-qd8": "--rw=read --bs=1m --iodepth=8 --ioengine=io_uring",
}
VHOST_IMAGE = 256 << 20


def _task_cpu_s(pid: int, thread_name: str | None = None) -> float:
    """CPU seconds of process ``pid`` (or only of its threads named ``thread_name``)."""
    total = 0
    tasks = [f"/proc/{pid}"] if thread_name is None else \
        [f"/proc/{pid}/task/{t}" for t in os.listdir(f"/proc/{pid}/task")]
    for t in tasks:
        try:
            if thread_name is not None:
                with open(f"{t}/comm") as f:
                    if f.read().strip() != thread_name:
                        continue
            with open(f"{t}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / CLK_TCK


def _wait_socket(path: pathlib.Path, proc) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: the vhost-user back-end did not start ({proc.args[0]})")
        time.sleep(0.02)


def _pin_vcpu(qemu_pid: int) -> bool:
    """Move QEMU's TCG vCPU thread to CPU 0 (everything else was started on
    CPU 1); True once done."""
    try:
        for t in os.listdir(f"/proc/{qemu_pid}/task"):
            with open(f"/proc/{qemu_pid}/task/{t}/comm") as f:
                if "TCG" in f.read():
                    os.sched_setaffinity(int(t), {0})
                    return True
    except OSError:
        pass
    return False


def bench_vhost(runtime: float, samples: int) -> list[dict]:
    """The Linux kit in QEMU (TCG) running fio on a vhost-user-blk disk served
    by `pykvm serve` and by qemu-storage-daemon, and on QEMU's own
    virtio-blk-pci (aio=io_uring, iothread); alternated, one boot per sample
    running every job. CPU per request: the back-end process (or QEMU's
    iothread) over the requests fio completed.

    The guest's one vCPU (QEMU's TCG thread) runs alone on CPU 0, and the
    back-end and QEMU's other threads (its iothread too) on CPU 1, the same
    for every system: unpinned, the scheduler's placement of these two busy
    threads swung single runs from 9k to 17k IOPS."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import linux_kit

    kit = linux_kit.kit()
    image = ROOT / "bench" / "bench-vhost.img"
    if not image.exists() or image.stat().st_size != VHOST_IMAGE:
        with open(image, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(VHOST_IMAGE >> 20):
                f.write(chunk)
    sock = ROOT / "bench" / "bench-vhost.sock"
    script = "".join(
        f"fio --name={name} --filename=/dev/vda --direct=1 {opts} --time_based "
        f"--runtime={runtime:g} --size={VHOST_IMAGE} --output-format=json || exit 1\n"
        for name, opts in VHOST_JOBS.items())
    vu_args = ["-name", "debug-threads=on",  # names the vCPU thread "CPU 0/TCG"
               "-chardev", f"socket,id=vu,path={sock}",
               "-device", "vhost-user-blk-pci,chardev=vu,num-queues=1"]
    pin = ["taskset", "-c", "1"] if len(os.sched_getaffinity(0)) >= 2 else []
    systems = {
        "pykvm-serve": ([*PYKVM, "serve", "--vhost-user-blk", str(sock),
                         "--disk", f"file={image},cache=none"], vu_args),
        # the same with interrupts held back up to 200 us while more requests
        # are in flight (README.md, "Disks"): the TCG guest is CPU-bound
        "pykvm-serve-coalesced": ([*PYKVM, "serve", "--vhost-user-blk", str(sock), "--disk",
                                   f"file={image},cache=none,irq-coalesce-ns=200000"], vu_args),
        "qemu-storage-daemon": (["qemu-storage-daemon", "--blockdev",
                                 f"driver=file,node-name=f,filename={image},cache.direct=on,"
                                 "aio=io_uring",
                                 "--export", f"type=vhost-user-blk,id=e,node-name=f,"
                                 f"addr.type=unix,addr.path={sock},writable=on"], vu_args),
        "qemu-virtio-blk": (None, ["-name", "debug-threads=on",  # names the thread "IO io0"
                                   "-object", "iothread,id=io0", "-drive",
                                   f"if=none,id=d0,file={image},format=raw,cache=none,"
                                   "aio=io_uring", "-device",
                                   "virtio-blk-pci,drive=d0,iothread=io0,num-queues=1"]),
    }
    got: dict[str, list[dict]] = {k: [] for k in systems}
    for _ in range(samples):
        for name, (backend_cmd, qemu_args) in systems.items():
            wait_quiet()
            backend = None
            if backend_cmd:
                sock.unlink(missing_ok=True)
                backend = subprocess.Popen(pin + backend_cmd, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                _wait_socket(sock, backend)
            cmd = pin + linux_kit.qemu_command(kit, script, qemu_args=qemu_args, shared_mem=True)
            busy0, t0 = cpu_busy_s(), time.monotonic()
            # the console goes to files: nobody reads a pipe while we sample
            with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
                qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f,
                                        stderr=err_f)
                cpu = 0.0
                watched = backend.pid if backend else qemu.pid
                thread = None if backend else "IO io0"
                pinned = not pin
                while qemu.poll() is None:  # sample the iothread's CPU while it exists
                    pinned = pinned or _pin_vcpu(qemu.pid)
                    cpu = max(cpu, _task_cpu_s(watched, thread))
                    if time.monotonic() - t0 > 600:
                        qemu.kill()
                    time.sleep(0.1)
                out_f.seek(0)
                err_f.seek(0)
                out, err = out_f.read(), err_f.read()
            wall = time.monotonic() - t0
            if backend:
                cpu = _task_cpu_s(backend.pid)
                backend.terminate()
                backend.wait(10)
            busy = cpu_busy_s() - busy0
            r = linux_kit.parse_console(out, err, qemu.returncode, wall)
            if r.rc:
                raise SystemExit(f"bench: {name}: the guest's fio failed:\n{r.output[-1500:]}")
            jobs = {}
            text = r.output
            while "{" in text:  # one JSON document per job
                start = text.index("{")
                doc, end = json.JSONDecoder().raw_decode(text[start:])
                for j in doc["jobs"]:
                    jobs[j["jobname"]] = j
                text = text[start + end:]
            ios = sum(j[d]["total_ios"] for j in jobs.values() for d in ("read", "write"))
            got[name].append({"jobs": jobs, "cpu_s": cpu, "ios": ios, "wall_s": wall,
                              "boot_to_init_s": r.boot_to_init_s,
                              "others_cpu_s": max(0.0, busy - cpu)})
    sock.unlink(missing_ok=True)
    runs = []
    for name, samples_ in got.items():
        for job in VHOST_JOBS:
            iops = [s["jobs"][job]["read"]["iops"] + s["jobs"][job]["write"]["iops"]
                    for s in samples_]
            bw = [s["jobs"][job]["read"]["bw_bytes"] + s["jobs"][job]["write"]["bw_bytes"]
                  for s in samples_]
            runs.append({"system": name, "workload": f"vhost-{job}", "samples": len(iops),
                         "iops_median": statistics.median(iops), "iops_samples": iops,
                         "bw_bytes_median": statistics.median(bw)})
        runs.append({"system": name, "workload": "vhost-cpu",
                     "cpu_us_per_io": statistics.median(s["cpu_s"] / s["ios"] * 1e6
                                                        for s in samples_ if s["ios"]),
                     "boot_to_init_s": statistics.median(s["boot_to_init_s"] for s in samples_
                                                         if s["boot_to_init_s"]),
                     "others_cpu_s": max(s["others_cpu_s"] for s in samples_)})
    return runs


def vhost_table(runs: list[dict]) -> str:
    get = {(r["system"], r["workload"]): r for r in runs}
    if ("pykvm-serve", "vhost-cpu") not in get:
        return ""
    lines = ["", "| vhost-user (Linux in QEMU TCG) | pykvm serve | pykvm serve, irq-coalesce-ns=200000 "
             "| qemu-storage-daemon | QEMU virtio-blk | pykvm / qsd | coalesced / qsd |",
             "|---|---|---|---|---|---|---|"]
    names = ("pykvm-serve", "pykvm-serve-coalesced", "qemu-storage-daemon", "qemu-virtio-blk")

    def ratio(a, b, key, suffix=""):
        return f"{a[key] / b[key]:.2f}x{suffix}" if a and b and b[key] else "-"
    for job in VHOST_JOBS:
        row = [get.get((n, f"vhost-{job}")) for n in names]
        cells = [f"{r['iops_median']:,.0f} IOPS" if r else "-" for r in row]
        lines.append(f"| {job} | " + " | ".join(cells) + " | " + " | ".join(
            ratio(r, row[2], "iops_median", " (target >= 1.0x)") for r in row[:2]) + " |")
    cpu = [get.get((n, "vhost-cpu")) for n in names]
    lines.append("| back-end CPU per request | " + " | ".join(
        f"{c['cpu_us_per_io']:.1f} us" if c else "-" for c in cpu) + " | " + " | ".join(
        ratio(c, cpu[2], "cpu_us_per_io") for c in cpu[:2]) + " |")
    lines.append("| kit boot to init | " + " | ".join(
        f"{c['boot_to_init_s']:.2f} s" if c else "-" for c in cpu) + " | - | - |")
    return "\n".join(lines) + "\n"


def qcow2_table(runs: list[dict]) -> str:
    lines = []
    get = {(r["system"], r["workload"]): r for r in runs}
    for engine in ("python", "io_uring"):
        raw = get.get((f"pykvm-{engine}-raw", "qcow2-randread-4k-qd32"))
        q = get.get((f"pykvm-{engine}-qcow2", "qcow2-randread-4k-qd32"))
        if raw and q:
            lines.append(f"| qcow2 allocated randread-4k-qd32, aio={engine} | {q['iops']:,.0f} IOPS "
                         f"vs raw {raw['iops']:,.0f} | {q['iops'] / raw['iops']:.2f}x raw "
                         "(target >= 0.95x) |")
    p, qe = get.get(("pykvm", "qcow2-alloc-seqwrite-1m-qd8")), \
        get.get(("qemu", "qcow2-alloc-seqwrite-1m-qd8"))
    if p and qe:
        lines.append(f"| qcow2 allocating seqwrite-1m-qd8 | {p['bw_bytes'] / 1e6:,.0f} MB/s vs QEMU "
                     f"{qe['bw_bytes'] / 1e6:,.0f} | {p['bw_bytes'] / qe['bw_bytes']:.2f}x QEMU "
                     "(target >= 1.0x) |")
    for fmt in ("qcow2", "raw"):
        a, b = get.get(("pykvm", f"convert-1g-holes-to-{fmt}")), \
            get.get(("qemu-img", f"convert-1g-holes-to-{fmt}"))
        if a and b:
            lines.append(f"| img convert 1 GiB with holes -> {fmt} | {a['wall_s_median']:.2f} s vs "
                         f"qemu-img {b['wall_s_median']:.2f} s | "
                         f"{b['wall_s_median'] / a['wall_s_median']:.2f}x qemu-img's speed "
                         "(target >= 1.0x) |")
    if not lines:
        return ""
    return "\n| block layer | measured | ratio |\n|---|---|---|\n" + "\n".join(lines) + "\n"


def io_table(runs: list[dict]) -> str:
    rows = [r for r in runs if "iops" in r and r.get("suite") not in ("throttle", "nbd-export")
            and not r["workload"].startswith("nbd-")]
    if not rows:
        return ""
    lines = ["", "| workload | system | transport | IOPS | MB/s | p50 us | p99 us | "
             "vs best QEMU (same transport) | vs host | CPU us/IO |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        qemu = max((q for q in rows if q["system"].startswith("qemu")
                    and q["workload"] == r["workload"] and q["transport"] == r["transport"]),
                   key=lambda q: q["iops"], default=None)
        host = next((q for q in rows if q["system"] == "host" and q["workload"] == r["workload"]),
                    None)
        vs_q = f"{r['iops'] / qemu['iops']:.2f}x" if qemu and qemu["iops"] else "-"
        vs_h = f"{r['iops'] / host['iops']:.2f}x" if host and host["iops"] else "-"
        cpu = f"{r['host_cpu_s'] / r['ios'] * 1e6:.1f}" if r.get("ios") else "-"
        lines.append(f"| {r['workload']} | {r['system']} | {r['transport']} | {r['iops']:,.0f} | "
                     f"{r['bw_bytes'] / 1e6:,.1f} | {r['lat_ns_p50'] / 1e3:,.1f} | "
                     f"{r['lat_ns_p99'] / 1e3:,.1f} | {vs_q} | {vs_h} | {cpu} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: pathlib.Path) -> None:
    """IOPS relative to fio on the host, per workload and system (MMIO and PCI)."""
    rows = [r for r in runs if "iops" in r and r["system"] != "host"]
    host = {r["workload"]: r["iops"] for r in runs if r.get("system") == "host"}
    if not rows or not host:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workloads = [w for w in IO_WORKLOADS if w in host]
    series = sorted({(r["system"], r["transport"]) for r in rows if r["workload"] in host})
    fig, ax = plt.subplots(figsize=(14, 6))
    width = 0.8 / max(1, len(series))
    for k, (system, transport) in enumerate(series):
        ys = [next((r["iops"] / host[w] for r in rows if r["workload"] == w
                    and (r["system"], r["transport"]) == (system, transport)), 0)
              for w in workloads]
        ax.bar([i + k * width for i in range(len(workloads))], ys, width,
               label=f"{system} {transport}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))], workloads, rotation=15)
    ax.set_ylabel("IOPS / host fio (same run)")
    ax.set_title("pykvm and QEMU against fio on the host, same image, cache=none")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(runs: list[dict]) -> str:
    lines = ["| workload | system | median | ratio vs baseline | host CPU | others' CPU |",
             "|---|---|---|---|---|---|"]
    boot = {r["system"]: r for r in runs if r["workload"] == "boot-hello"}
    for name in ("pykvm", "qemu"):
        if name in boot:
            r = boot[name]
            ratio = r["wall_s_median"] / boot["qemu"]["wall_s_median"] if "qemu" in boot else None
            lines.append(f"| boot-hello | {name} | {r['wall_s_median'] * 1000:.1f} ms | "
                         + (f"{ratio:.2f}x QEMU" if ratio else "-")
                         + f" | {r['host_cpu_s'] * 1000:.0f} ms | {r['others_cpu_s'] * 1000:.0f} ms |")
    pio = {r["system"]: r for r in runs if r["workload"] == "pio-exits"}
    for name, r in pio.items():
        ratio = (r["exits_per_s_median"] / pio["qemu"]["exits_per_s_median"]) if "qemu" in pio else None
        lines.append(f"| pio-exits | {name} | {r['exits_per_s_median']:,.0f} exits/s | "
                     + (f"{ratio:.2f}x QEMU" if ratio else "-")
                     + f" | - | {r['others_cpu_s'] * 1000:.0f} ms |")
    return "\n".join(lines) + "\n"


INJECT_CASES = {
    # name: (the disk's extra options, the rules file's text or None, what it is compared to)
    "inject-none": ("", None, None),
    "inject-16-rules": ("", "".join(
        f"[fault]\nop = read\noffset = {(1 << 40) + i * 4096}\nlength = 4096\naction = error\n"
        for i in range(15)) + "[inject-error]\nevent = \"l2_update\"\n", "inject-none"),
    "inject-trace": (",trace={trace}", None, "inject-none"),
    "inject-delay-1ms": ("", "[fault]\nop = read\naction = delay\ndelay = 1ms\n", "model"),
}


def bench_inject(runtime: float, samples: int) -> list[dict]:
    """blkdebug and the trace on the C path (io_uring, cache=none), 4K randread
    QD32: the disk without a node, with 16 rules that never fire, with the
    trace on, and with a 1 ms delay on every read (expected: QD / 1 ms, less
    the time a request spends elsewhere); alternated, the median of ``samples``."""
    img = RESULTS.parent / "bench.img"
    make_image(img)
    work = RESULTS.parent / "bench-inject"
    work.mkdir(exist_ok=True)
    systems = {}
    for name, (extra, rules, _base) in INJECT_CASES.items():
        disk = f"file={img}"
        if rules is not None:
            conf = work / f"{name}.conf"
            conf.write_text(rules)
            disk = f"file=blkdebug:{conf}:{img}"
        systems[name] = PYKVM + [
            "fio", "--disk", f"{disk},format=raw,cache=none,aio=io_uring"
            + extra.format(trace=work / "trace.jsonl"), "--rw=randread", "--bs=4096",
            "--iodepth=32", f"--runtime={runtime:g}", "--output-format=json"]
    got: dict = {k: [] for k in systems}
    for _ in range(samples):
        for name, cmd in systems.items():
            row = fio_row(measure(cmd, 0), f"pykvm-{name}", "mmio", name)
            got[name].append(row)
            print(f"  {name:<18} {row['iops']:>10,.0f} IOPS  p50 {row['lat_ns_p50'] / 1e3:.0f} us",
                  file=sys.stderr)
    runs = [median_row(rows, "iops") for rows in got.values()]
    by = {r["workload"]: r for r in runs}
    for r in runs:
        base = INJECT_CASES[r["workload"]][2]
        if base == "model":
            # Little's law: QD / 1 ms, unless the disk without the rule is slower
            r["expected_iops"] = min(32 / 1e-3, by["inject-none"]["iops"])
            r["vs_expected"] = r["iops"] / r["expected_iops"]
        elif base:
            r["vs_baseline"] = r["iops"] / by[base]["iops"]
    return runs


def inject_table(runs: list[dict]) -> str:
    rows = [r for r in runs if r.get("suite") == "inject"]
    if not rows:
        return ""
    lines = []
    for r in rows:
        cmp = f"{r['vs_baseline']:.3f}x without" if "vs_baseline" in r else \
            f"{r['vs_expected']:.3f}x expected ({r['expected_iops']:,.0f})" \
            if "vs_expected" in r else "-"
        lines.append(f"| {r['workload']} | {r['iops']:,.0f} | {cmp} |")
    return ("\n| blkdebug and trace, C path, 4K randread QD32 | IOPS | ratio |\n|---|---|---|\n"
            + "\n".join(lines) + "\n")


def bench_crash(runtime: float, samples: int) -> list[dict]:
    """crashtest's rate on a 256 MiB ext4 image (the Linux kit writes files
    with fsync and renames on a logged pykvm serve disk; the check is e2fsck
    -fn, then e2fsck after journal recovery; a check's verdict is ignored, so
    that no failure is shrunk and every sample checks the same states):
    states per minute, and the share of each state's time spent making it
    against checking it (target: making <= 10% with e2fsck -fn); and the
    write log's cost on the C path at 4K randwrite QD32 (target: <= 10%)."""
    sys.path.insert(0, str(ROOT))
    import shutil
    from pykvm.testing import Disk, run_linux
    work = RESULTS.parent / "bench-crash"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    base = work / "ext4.raw"
    with open(base, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(base)], check=True)
    shutil.copy(base, work / "disk.raw")
    disk = Disk(work / "disk.raw", fmt="raw", log=work / "disk.log")
    script = ("mount /dev/vda /mnt; for i in $(seq 1 12); do dd if=/dev/urandom of=/mnt/n$i "
              "bs=4k count=8 conv=fsync 2>/dev/null; mv /mnt/n$i /mnt/f$i; sync; done; "
              "umount /mnt")
    run_linux(disk, script)
    runs = []
    # e2fsck -fn (the target's checker) reads only: each state is undone in
    # place; with journal recovery first the checker writes, and each state
    # starts from a fresh copy of the base
    for workload, check in (
            ("crash-ext4-256M", "e2fsck -fn {image} >/dev/null"),
            ("crash-ext4-256M-recovery",
             "e2fsck -E journal_only -y {image} >/dev/null 2>&1; e2fsck -fn {image} >/dev/null")):
        rates = []
        for _ in range(samples):
            p = subprocess.run(PYKVM + ["crashtest", "--base", str(base), "--log", disk.log,
                                        "--check", check + "; true", "--max-states", "16",
                                        "--json", "--no-resume"], capture_output=True, text=True)
            s = json.loads(p.stdout)
            rates.append((s["states"] / s["seconds"] * 60, s))
            print(f"  {workload} {s['states']} states in {s['seconds']:.1f} s, making "
                  f"{s['materialise_s']:.2f} s, checking {s['check_s']:.2f} s", file=sys.stderr)
        rate, s = sorted(rates, key=lambda r: r[0])[len(rates) // 2]
        runs.append({"system": "pykvm", "transport": "-", "workload": workload,
                     "states": s["states"], "failures": s["failures"],
                     "states_per_min": rate, "materialise_s": s["materialise_s"],
                     "check_s": s["check_s"],
                     "materialise_share": s["materialise_s"] / max(s["check_s"], 1e-9)})
    img = RESULTS.parent / "bench.img"
    make_image(img)
    got = {"plain": [], "logged": []}
    for _ in range(samples):
        for name in got:
            log = work / "bench.log"
            disk_spec = f"file={img},format=raw" if name == "plain" else \
                f"driver=blklogwrites,file.driver=raw,file.file.filename={img},log={log}"
            m = measure(PYKVM + ["fio", "--disk", f"{disk_spec},aio=io_uring", "--rw=randwrite",
                                 "--bs=4096", "--iodepth=32", f"--runtime={runtime:g}",
                                 "--output-format=json"], 0)
            got[name].append(fio_row(m, f"pykvm-{name}", "mmio", "crash-log-randwrite-4k"))
    plain = median_row(got["plain"], "iops")
    logged = median_row(got["logged"], "iops")
    logged["vs_baseline"] = logged["iops"] / plain["iops"]
    runs += [plain, logged]
    shutil.rmtree(work, ignore_errors=True)
    return runs


def crash_table(runs: list[dict]) -> str:
    rows = [r for r in runs if r.get("suite") == "crash"]
    if not rows:
        return ""
    lines = []
    for r in rows:
        if "states_per_min" in r:
            lines.append(f"| {r['workload']} | {r['states']} states, {r['states_per_min']:,.0f}"
                         f"/min | making a state: {r['materialise_share']:.3f}x checking it |")
        else:
            cmp = f"{r['vs_baseline']:.3f}x without the log" if "vs_baseline" in r else "-"
            lines.append(f"| {r['workload']} ({r['system']}) | {r['iops']:,.0f} IOPS | {cmp} |")
    return ("\n| crash testing | rate | ratio |\n|---|---|---|\n" + "\n".join(lines) + "\n")


def suite_of(workload: str) -> str:
    """The suite a result belongs to (for results written before runs named it)."""
    if workload == "boot-hello":
        return "boot"
    if workload == "pio-exits":
        return "pio"
    if workload.startswith(("qcow2-", "convert-")):
        return "qcow2"
    if workload.startswith("vhost-"):
        return "vhost"
    if workload.startswith("mq"):
        return "mq"
    if workload.startswith("throttle-"):
        return "throttle"
    if workload.startswith("inject-"):
        return "inject"
    if workload.startswith("crash-"):
        return "crash"
    if workload.startswith("dedup-"):
        return "dedup"
    if workload.startswith("nbd-client-"):
        return "nbd-client"
    if workload.startswith("nbd-"):
        return "nbd-export"
    return "io"


SUITES = ["boot", "pio", "io", "qcow2", "vhost", "mq", "throttle", "inject", "crash",
          "nbd-client", "nbd-export", "dedup"]
SUITE_GROUPS = {"nbd": ["nbd-client", "nbd-export"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples, for a smoke check")
    ap.add_argument("--suite", action="append", choices=SUITES + list(SUITE_GROUPS),
                    help="run only these suites (default: all; nbd: nbd-client and "
                         "nbd-export)")
    ap.add_argument("--convert-only", action="store_true",
                    help="time only the qcow2 suite's image conversions and print them "
                         "(no result files are written)")
    ap.add_argument("--engines", help="io suite: only these pykvm aio engines, comma-separated "
                    f"(default: all of {','.join(ENGINES)})")
    ap.add_argument("--workloads", help="io suite: only these workloads, comma-separated "
                    f"(default: all of {','.join(IO_WORKLOADS)})")
    args = ap.parse_args()
    if args.convert_only:
        for r in bench_convert(5 if args.quick else 15):
            print(f"{r['workload']:<28} {r['system']:<9} median {r['wall_s_median'] * 1000:7.1f} ms"
                  f"  min {r['wall_s_min'] * 1000:7.1f} ms  ({r['samples']} samples)")
        return 0
    engines = args.engines.split(",") if args.engines else ENGINES
    names = args.workloads.split(",") if args.workloads else list(IO_WORKLOADS)
    if set(engines) - set(ENGINES) or set(names) - set(IO_WORKLOADS):
        ap.error(f"unknown engine or workload: {sorted(set(engines) - set(ENGINES))} "
                 f"{sorted(set(names) - set(IO_WORKLOADS))}")
    workloads = {w: IO_WORKLOADS[w] for w in names}

    def measured_now(r: dict) -> bool:
        """Whether this run measures again what an older io result measured."""
        return r["workload"] in workloads and (not r["system"].startswith("pykvm-")
                                               or r["system"][len("pykvm-"):] in engines)
    suites = [s for name in args.suite for s in SUITE_GROUPS.get(name, [name])] \
        if args.suite else SUITES
    samples = 3 if args.quick else 15
    for tool in (QEMU, "fio", "qemu-img"):
        if not shutil.which(tool):
            raise SystemExit(f"bench: {tool} not found (make bench installs it)")
    runs = []
    suite_runs = {
        "boot": lambda: bench_boot(samples),
        "pio": lambda: bench_pio(20_000 if args.quick else 100_000, 3 if args.quick else 5),
        # --quick is a smoke check: every system and workload, short runs
        # full: the median of 3 alternated 2 s runs (single 5 s runs here swung by 8%)
        "io": lambda: bench_io(0.5 if args.quick else 2.0, engines, workloads,
                               1 if args.quick else 3),
        "qcow2": lambda: bench_qcow2(0.5 if args.quick else 5.0, 1 if args.quick else 5),
        "vhost": lambda: bench_vhost(1.0 if args.quick else 3.0, 1 if args.quick else 5),
        "mq": lambda: bench_mq(0.5 if args.quick else 3.0, 1 if args.quick else 3),
        # full: the brief's 5 s runs (a limit is a rate over time), median of 3
        "throttle": lambda: bench_throttle(1.0 if args.quick else 5.0, 1 if args.quick else 3),
        "inject": lambda: bench_inject(0.5 if args.quick else 2.0, 1 if args.quick else 5),
        "crash": lambda: bench_crash(0.5 if args.quick else 2.0, 1 if args.quick else 3),
        "nbd-client": lambda: bench_nbd_client(1.0 if args.quick else 4.0,
                                               1 if args.quick else 3),
        "nbd-export": lambda: bench_nbd_export(1.0 if args.quick else 5.0,
                                               1 if args.quick else 3),
        "dedup": lambda: bench_dedup((1 if args.quick else 4) << 30, 1 if args.quick else 3),
    }
    # some suites (or some io engines/workloads) only: the latest results of
    # the others stay, marked as older
    partial = args.suite or args.engines or args.workloads
    older = json.loads((RESULTS / "latest.json").read_text()) \
        if partial and (RESULTS / "latest.json").exists() else None
    for suite in suites:  # results are written after each suite: a later failure keeps them
        t0 = time.monotonic()
        runs += [dict(r, suite=suite) for r in suite_runs[suite]()]
        print(f"bench: {suite} suite: {time.monotonic() - t0:.0f} s", file=sys.stderr)
        save(merge_older(runs, suites, older, measured_now), final=suite == suites[-1])
    return 0


def merge_older(runs, suites, old, measured_now) -> list[dict]:
    """The runs of this invocation plus the older results of what it does not measure."""
    if old is not None:
        kept = [dict(r, suite=r.get("suite") or suite_of(r["workload"]),
                     measured=r.get("measured") or old["machine"].get("date"))
                for r in old.get("runs", [])]
        runs = [r for r in kept if r["suite"] not in suites
                or r["suite"] == "io" and not measured_now(r)] + runs
    return runs


_STAMP = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def save(runs: list[dict], final: bool) -> None:
    result = {"machine": machine_info(), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    (RESULTS / "latest.json").write_text(text)
    (RESULTS / f"{_STAMP}.json").write_text(text)
    md = table(runs) + io_table(runs) + qcow2_table(runs) + vhost_table(runs) + mq_table(runs) + \
        throttle_table(runs) + inject_table(runs) + crash_table(runs) + nbd_client_table(runs) + \
        nbd_export_table(runs) + dedup_table(runs)
    plot(runs, RESULTS / "latest.png")
    (RESULTS / "latest.md").write_text(md)
    if final:
        print(md, end="")
        print(f"results: {RESULTS / 'latest.json'}")


if __name__ == "__main__":
    sys.exit(main())
