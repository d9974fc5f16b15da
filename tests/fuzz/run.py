"""Run one fuzz target under atheris (libFuzzer over instrumented Python).

    python -m tests.fuzz.run NAME --seconds N [--keep]

Without ``--keep`` (CI, tests/fuzz/test_fuzz_corpus.py) the target fuzzes a
copy of its committed seeds, corpus and crashers for N seconds and nothing in
the tree changes. With ``--keep`` (``make fuzz``) new corpus entries go to
``corpus/NAME/`` (minimized by a libFuzzer merge afterwards) and crashers to
``crashers/NAME/``. Exit status 0 when the run found nothing; a summary line
either way: executions, coverage (libFuzzer's ``cov`` and ``ft``), corpus size.
The fuzzing itself runs in a child process (libFuzzer ends the process that
runs it).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from tests.fuzz import harness

ROOT = os.path.dirname(os.path.dirname(harness.HERE))
# the per-input bound is harness.MAX_SECONDS (an exception, so a crash); libFuzzer's
# own -timeout only catches an input that never returns
HANG_SECONDS = 20


def child(name: str, args: list[str]) -> None:
    import atheris
    logging.disable(logging.CRITICAL)   # the one line per refused input, times a million
    with atheris.instrument_imports(include=["pykvm"]):
        target = harness.load(name)
    # libFuzzer runs argv[0] again for -merge: the parent's wrapper script
    atheris.Setup([os.environ.get("PYKVM_FUZZ_ARGV0", sys.argv[0]), *args],
                  harness.bounded(target))
    atheris.Fuzz()


def libfuzzer(name: str, args: list[str], tmp: str) -> tuple[int, str]:
    wrapper = os.path.join(tmp, f"fuzz-{name}")
    if not os.path.exists(wrapper):
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\ncd {shlex.quote(ROOT)} && exec {shlex.quote(sys.executable)} '
                    f'-m tests.fuzz.run {name} --child -- "$@"\n')
        os.chmod(wrapper, 0o755)
    p = subprocess.Popen([wrapper, *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, errors="replace",
                         env={**os.environ, "PYKVM_FUZZ_ARGV0": wrapper})
    out = []
    for line in p.stdout:
        out.append(line)
        if os.environ.get("FUZZ_VERBOSE") or not line.startswith("#"):
            sys.stderr.write(line)
    return p.wait(), "".join(out)


def summary(log: str) -> dict:
    stats = {}
    runs = re.findall(r"^#(\d+)\s+\S+\s+cov: (\d+) ft: (\d+)", log, re.M)
    if runs:
        stats["cov"], stats["ft"] = int(runs[-1][1]), int(runs[-1][2])
    m = re.search(r"stat::number_of_executed_units: (\d+)", log)
    if m:
        stats["execs"] = int(m.group(1))
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tests.fuzz.run")
    ap.add_argument("name", choices=harness.targets())
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--keep", action="store_true", help="keep new corpus entries and crashers")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if a.child:
        child(a.name, rest)
        return 0
    seeds = os.path.join(harness.SEEDS, a.name)
    corpus = os.path.join(harness.CORPUS, a.name)
    crashers = os.path.join(harness.CRASHERS, a.name)
    common = [f"-max_total_time={a.seconds}", f"-timeout={HANG_SECONDS}", "-rss_limit_mb=4096",
              "-print_final_stats=1"]
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{a.name}-") as tmp:
        if a.keep:
            os.makedirs(corpus, exist_ok=True)
            os.makedirs(crashers, exist_ok=True)
            artifacts = crashers
            dirs = [corpus] + [d for d in (seeds, crashers) if os.path.isdir(d)]
        else:
            artifacts = os.path.join(tmp, "crashers")
            work = os.path.join(tmp, "corpus")
            os.makedirs(artifacts)
            os.makedirs(work)
            for path in harness.inputs(a.name):
                shutil.copy(path, os.path.join(work, os.path.basename(path)))
            dirs = [work]
        known = set(os.listdir(artifacts))
        t0 = time.monotonic()
        rc, log = libfuzzer(a.name, common + [f"-artifact_prefix={artifacts}/"] + dirs, tmp)
        took = time.monotonic() - t0
        stats = summary(log)
        if a.keep and rc == 0:
            # minimize: only the entries that add coverage stay
            merged = os.path.join(tmp, "merged")
            os.makedirs(merged)
            mrc, _ = libfuzzer(a.name, [f"-timeout={HANG_SECONDS}", "-merge=1", merged, corpus],
                               tmp)
            if mrc == 0 and os.listdir(merged):
                shutil.rmtree(corpus)
                shutil.copytree(merged, corpus)
        found = sorted(set(os.listdir(artifacts)) - known)
        n_corpus = len(os.listdir(corpus)) if os.path.isdir(corpus) else 0
        print(f"fuzz {a.name}: {stats.get('execs', '?')} executions in {took:.0f} s, "
              f"cov {stats.get('cov', '?')}, ft {stats.get('ft', '?')}, "
              f"corpus {n_corpus} entries, "
              + (f"FAILED ({', '.join(found) or f'status {rc}'})" if rc else "no crash"),
              flush=True)
        return 1 if rc else 0


if __name__ == "__main__":
    sys.exit(main())
