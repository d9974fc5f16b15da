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
``BoundExceeded`` (issue 16: no input takes more than
1 s or grows RSS by more than 64 MiB). This module imports nothing of pykvm, so
that the fuzzer instruments pykvm when the target imports it.
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


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def bounded(target):
    """``target.one_input`` with the expected errors swallowed and the bounds checked."""
    one_input, expected = target.one_input, target.EXPECTED

    def run(data: bytes) -> None:
        peak = _peak_rss()
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
        grew = _peak_rss() - peak
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
