"""The dedup suite: `pykvm img dedup` (offline) on a qcow2 image of 64 KiB
clusters, every cluster allocated, half of them copies of the cluster before
(4 GiB; 1 GiB with --quick). The image is made once (a raw file written from
here, then `qemu-img convert -O qcow2`) and read from the page cache: the
target is a rate bound by reading, not hashing (>= 1 GB/s of allocated data).
Samples alternate a `--dry-run` (hash, compare, change nothing) and a real run
on a fresh copy of the image; after the real run `qemu-img check` must be
clean and the image must use half the clusters. The median of each counts.

Run by bench/run.py (``--suite dedup``), or alone:
``.venv/bin/python bench/dedup.py [--quick]``.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYKVM = [str(ROOT / ".venv" / "bin" / "pykvm")]
CLUSTER = 64 << 10
TARGET_GBS = 1.0


def _make(folder: pathlib.Path, size: int) -> pathlib.Path:
    raw, img = folder / "src.raw", folder / "dedup.qcow2"
    with open(raw, "wb") as f:
        f.truncate(size)
        chunk = 16 << 20                 # 256 clusters a write: odd ones copy the one before
        for off in range(0, size, chunk):
            out = bytearray()
            for _ in range(chunk // CLUSTER // 2):
                c = os.urandom(CLUSTER)
                out += c + c
            f.write(out)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o",
                    f"cluster_size={CLUSTER}", str(raw), str(img)], check=True)
    raw.unlink()
    return img


def _run(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(PYKVM + ["img", "dedup", *args], capture_output=True, text=True,
                       timeout=900)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench: pykvm img dedup failed: {p.stderr.strip()[-300:]}")
    return wall, p.stdout


def bench_dedup(size: int, samples: int) -> list[dict]:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="pykvm-bench-dedup-", dir=ROOT / "bench"))
    try:
        img = _make(folder, size)
        allocated = size
        dry, real = [], []
        saved = None
        for _ in range(samples):
            wall, _out = _run(["--dry-run", str(img)])
            dry.append(wall)
            copy = folder / "copy.qcow2"
            shutil.copyfile(img, copy)
            wall, out = _run([str(copy)])
            real.append(wall)
            m = re.search(r"Saved (\d+) bytes", out)
            saved = int(m.group(1)) if m else 0
            chk = subprocess.run(["qemu-img", "check", "-q", str(copy)])
            if chk.returncode != 0 or saved != size // 2:
                raise SystemExit(f"bench: dedup saved {saved} of {size // 2} expected bytes, "
                                 f"qemu-img check exit {chk.returncode}")
            copy.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for name, walls in (("dedup-offline-dry-run", dry), ("dedup-offline", real)):
        wall = statistics.median(walls)
        rows.append({"system": "pykvm", "transport": "-", "workload": name,
                     "image_bytes": size, "wall_s": wall, "wall_s_all": walls,
                     "gb_per_s": allocated / wall / 1e9, "saved_bytes": saved,
                     "target": TARGET_GBS})
    return rows


def dedup_table(runs: list[dict]) -> str:
    rows = [r for r in runs if r["workload"].startswith("dedup-")]
    if not rows:
        return ""
    lines = [f"| {r['workload']} ({r['image_bytes'] >> 30} GiB, half duplicates) | "
             f"{r['wall_s']:.2f} s | {r['gb_per_s']:.2f} GB/s"
             f"{'' if r['gb_per_s'] >= r['target'] else ' (below target)'} | "
             f"{r['saved_bytes'] >> 20} MiB |" for r in rows]
    return ("\n| dedup | time | allocated data read | saved |\n|---|---|---|---|\n" +
            "\n".join(lines) + "\n")


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    runs = bench_dedup((1 if quick else 4) << 30, 1 if quick else 3)
    print(json.dumps(runs, indent=2))
    print(dedup_table(runs), end="")
