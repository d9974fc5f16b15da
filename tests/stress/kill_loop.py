"""Kill loops: SIGKILL the VMM while the workload guest writes, then check the disk.

For each combination of image (raw, qcow2, qcow2 over a raw backing file) and
path (aio=python, aio=io_uring), each iteration: a fresh image; `pykvm run` of
the workload guest writing at random with a FLUSH every 16 writes and a line
for each completed flush (flush_report=1: "flush-done ios=D", every write
numbered below D durable); after a seeded random number of completed flushes,
SIGKILL to the VMM process; then

- qcow2: `qemu-img check` finds no corruption (leaks allowed); if it finds
  leaks, `qemu-img check -r leaks` repairs them and a second check is clean;
- every block written before the last completed flush's durable point holds
  that write, or a later one (guest/tools/check_disk.py --durable).

    python -m tests.stress.kill_loop [--iterations N] [--seed S] [--only raw-python,...]

prints one line per combination (iterations run and survived) and exits 1 if
any iteration failed, naming it.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKLOAD = os.path.join(ROOT, "guest", "build", "workload.elf")
CHECK_DISK = os.path.join(ROOT, "guest", "tools", "check_disk.py")
IMAGES = ("raw", "qcow2", "qcow2-backing")
PATHS = ("python", "io_uring")
SIZE = 4 << 20          # the area the guest writes
DISK = 16 << 20
IOS = 1_000_000         # the stream's bound (the guest is killed long before)
SEED = 5


def combos():
    return [f"{i}-{p}" for i in IMAGES for p in PATHS]


def make_image(folder: str, kind: str) -> str:
    if kind == "raw":
        path = os.path.join(folder, "disk.raw")
        with open(path, "wb") as f:
            f.truncate(DISK)
        return path
    path = os.path.join(folder, "disk.qcow2")
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
    if kind == "qcow2-backing":
        base = os.path.join(folder, "base.raw")
        with open(base, "wb") as f:
            f.truncate(DISK)
        cmd += ["-b", base, "-F", "raw"]
    subprocess.run(cmd + [path, str(DISK)], check=True)
    return path


def one(folder: str, combo: str, rng: random.Random) -> str | None:
    """One iteration; None, or why it failed."""
    kind, aio = combo.rsplit("-", 1)
    image = make_image(folder, kind)
    flushes_wanted = rng.randint(1, 6)
    cmdline = (f"rw=randwrite bs=4096 iodepth=8 size={SIZE} ios={IOS} seed={SEED} flush=16 "
               f"flush_report=1")
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "run", WORKLOAD, "--cmdline", cmdline,
                          "--disk", f"file={image},aio={aio}"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    durable, seen = None, 0
    deadline = time.monotonic() + 60
    try:
        for line in p.stdout:
            if line.startswith(b"workload: flush-done ios=") and line.endswith(b"\n"):
                durable = int(line.split(b"=")[1])
                seen += 1
                if seen >= flushes_wanted:
                    time.sleep(rng.random() * 0.05)     # somewhere after it
                    break
            if time.monotonic() > deadline:
                break
    finally:
        p.send_signal(signal.SIGKILL)
        rest, err = p.communicate()
    for line in rest.split(b"\n")[:-1]:    # whole lines reported before the kill landed
        if line.startswith(b"workload: flush-done ios="):
            durable = int(line.split(b"=")[1])
    if p.returncode != -signal.SIGKILL:
        return f"the VMM exited with {p.returncode} before the kill: {err.decode()[-300:]}"
    if durable is None:
        return "no flush completed within 60 s"
    raw = image
    if kind != "raw":
        # a killed process's io_uring lets go of its files (and so of the image
        # locks) a moment after the process is gone: wait for that, at most 10 s
        for _ in range(100):
            c = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
            if "Failed to get shared" not in c.stderr:
                break
            time.sleep(0.1)
        if c.returncode not in (0, 3):
            return f"qemu-img check: exit {c.returncode}: {c.stdout[-300:]}{c.stderr[-300:]}"
        if c.returncode == 3:
            r = subprocess.run(["qemu-img", "check", "-r", "leaks", image], capture_output=True,
                               text=True)
            c = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
            if r.returncode not in (0, 3) or c.returncode != 0:
                return f"qemu-img check -r leaks did not repair: {c.stdout[-300:]}"
        raw = image + ".raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", image, raw], check=True)
    v = subprocess.run([sys.executable, CHECK_DISK, raw, "--rw", "randwrite", "--bs", "4096",
                        "--size", str(SIZE), "--seed", str(SEED), "--ios", str(IOS),
                        "--durable", str(durable)], capture_output=True, text=True)
    if v.returncode != 0:
        return f"durable point {durable}: {v.stdout.strip()}{v.stderr.strip()}"
    return None


def run(iterations: int, seed: int = 0, only=None, out=sys.stdout) -> dict:
    results = {}
    for combo in only or combos():
        rng = random.Random(f"{seed}-{combo}")
        ok, failures = 0, []
        for it in range(iterations):
            with tempfile.TemporaryDirectory(prefix="pykvm-kill-") as folder:
                why = one(folder, combo, rng)
            if why is None:
                ok += 1
            else:
                failures.append(f"iteration {it}: {why}")
        results[combo] = (ok, failures)
        print(f"{combo:<22} {ok}/{iterations} survived"
              + "".join(f"\n  {f}" for f in failures), file=out, flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="comma-separated combinations (" + ",".join(combos()) + ")")
    a = ap.parse_args(argv)
    only = a.only.split(",") if a.only else None
    if only and set(only) - set(combos()):
        ap.error(f"unknown combination: {sorted(set(only) - set(combos()))}")
    results = run(a.iterations, a.seed, only)
    return 0 if all(not f for _ok, f in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
