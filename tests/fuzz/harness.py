"""What every fuzz target shares: the per-input bounds and the rule for errors.

A target is a module ``tests/fuzz/fuzz_NAME.py`` with

- ``EXPECTED``: the exception types that are documented answers to a bad input
  (a ``BlockError``, a ``ConfigError``, a virtio ``QueueError`` that puts the
  device in NEEDS_RESET, ...); any other exception is a crash;
- ``one_input(data: bytes)``: build the state, feed the bytes;
- state it needs across inputs (guest memory, a tmp folder) built at import.

``bounded(target)`` wraps ``one_input``: an expected error is swallowed; an input
that takes more than ``MAX_SECONDS`` of CPU (or ``MAX_WALL_SECONDS`` in all), or
grows the process's peak RSS by more than ``MAX_RSS_GROWTH``, raises
``BoundExceeded``: no input may take more than 1 s or 64 MiB. The peak is reset
before each input where Linux allows it (``/proc/self/clear_refs``), so the peak
of an earlier input hides nothing. This module imports nothing of pykvm, so that
the fuzzer instruments pykvm when the target imports it.
"""
from __future__ import annotations

import importlib
import os
import resource
import time

MAX_SECONDS = 1.0          # of CPU time, all threads: what the input costs
MAX_WALL_SECONDS = 5.0     # in all: an input that waits (a 2-core host shared with others)
MAX_RSS_GROWTH = 64 << 20

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
CRASHERS = os.path.join(HERE, "crashers")
SEEDS = os.path.join(HERE, "seeds")       # hand-made inputs, never rewritten by a run


class BoundExceeded(Exception):
    """An input took too long or too much memory."""


def targets() -> list[str]:
    return sorted(f[len("fuzz_"):-3] for f in os.listdir(HERE)
                  if f.startswith("fuzz_") and f.endswith(".py"))


def load(name: str):
    return importlib.import_module(f"tests.fuzz.fuzz_{name}")


def _reset_peak_rss() -> bool:
    """Start a new peak (Linux: 5 to /proc/self/clear_refs resets VmHWM), so that an
    input is measured from where it starts, not against the highest peak of the
    inputs before it. False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss(reset: bool = False) -> int:
    """The process's peak RSS in bytes: VmHWM since the last reset where there is
    one, else the lifetime peak (getrusage)."""
    if reset:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def bounded(target):
    """``target.one_input`` with the expected errors swallowed and the bounds checked."""
    one_input, expected = target.one_input, target.EXPECTED

    def run(data: bytes) -> None:
        reset = _reset_peak_rss()
        peak = _rss() if reset else _peak_rss()
        t0, c0 = time.monotonic(), time.process_time()
        try:
            one_input(data)
        except expected:
            pass
        took, cpu = time.monotonic() - t0, time.process_time() - c0
        if cpu > MAX_SECONDS or took > MAX_WALL_SECONDS:
            raise BoundExceeded(f"input of {len(data)} bytes took {cpu:.2f} s of CPU, "
                                f"{took:.2f} s in all (bounds {MAX_SECONDS} s, "
                                f"{MAX_WALL_SECONDS} s)")
        grew = _peak_rss(reset) - peak
        if grew > MAX_RSS_GROWTH:
            raise BoundExceeded(f"input of {len(data)} bytes grew peak RSS by {grew >> 20} MiB "
                                f"(bound {MAX_RSS_GROWTH >> 20} MiB)")
    return run


def inputs(name: str) -> list[str]:
    """The committed seeds, corpus and crashers of a target (file paths)."""
    out = []
    for base in (SEEDS, CORPUS, CRASHERS):
        d = os.path.join(base, name)
        if os.path.isdir(d):
            out += sorted(os.path.join(d, f) for f in os.listdir(d) if not f.startswith("."))
    return out
