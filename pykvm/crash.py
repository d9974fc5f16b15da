"""Crash-state enumeration over a write log: ``pykvm crashtest``.

From a base image (the disk before the logged run) and a write log (ours or
dm-log-writes'), the log is cut into flush epochs: epoch k holds the writes
logged between flush k-1 and flush k (block/writelog.py logs a write before the
flush that made it durable). A power cut during epoch k leaves, by the crash
model (README, "Crash testing"), every write of the earlier epochs and any
subset of epoch k's writes (with ``torn``: any sector-granular part of each).
For each epoch this checks:

- every subset while the epoch has at most ``EXHAUSTIVE`` writes, else
  ``max_states`` seeded random subsets (the empty and the full one always);
  subsets, not orders: a later write to a sector wins, and an earlier one
  surviving alone is the subset without the later one, so orders add nothing;
- with ``torn``, for each multi-sector write, seeded parts of it on top of the
  other writes (as many states as the epoch has such writes, up to max_states);
- states whose sectors come out the same are checked once.

A state is materialised in a raw working copy per job (made once, from the
base through the block layer, so a qcow2 base works too): the earlier epochs
are applied as the run moves on, a state's writes are written, the check runs
on the copy (``{image}`` in the command), and the sectors are put back; a
checker that changes the copy (its mtime moves) gets a fresh copy. Exit 0 of
the check is a consistent state. A failing state is shrunk by delta debugging
(ddmin) to a minimal set of the epoch's writes that still fails. Progress is
kept in ``LOG.crashtest.json`` (``resume``): an interrupted run goes on where it
stopped.
"""
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import threading
import time

from .block import writelog as W
from .errors import PykvmError

EXHAUSTIVE = 12
SECTOR = 512


class CrashtestError(PykvmError):
    """A crashtest that cannot run (bad log, base, command)."""


class Write:
    __slots__ = ("entry", "offset", "data", "epoch")

    def __init__(self, entry: int, offset: int, data: bytes, epoch: int):
        self.entry = entry
        self.offset = offset
        self.data = data
        self.epoch = epoch

    def describe(self) -> dict:
        return {"entry": self.entry, "sector": self.offset // SECTOR,
                "sectors": len(self.data) // SECTOR}


def read_epochs(log: str, size: int) -> list[list[Write]]:
    """The log's writes, by flush epoch (the last one: writes never flushed)."""
    try:
        fd, reader = W.open_log(log)
    except W.LogError as e:
        raise CrashtestError(str(e)) from None
    ss = reader.sector_size
    epochs: list[list[Write]] = [[]]
    try:
        for e in reader:
            if e.flags & W.MARK:
                continue
            if e.flags & W.FLUSH and not e.nr_sectors:
                epochs.append([])
                continue
            end = (e.sector + e.nr_sectors) * ss
            if end > size:
                raise CrashtestError(f"{log}: entry {e.index} writes up to byte {end}, past the "
                                     f"end of the base image ({size} bytes): the base or the "
                                     f"log's sector size ({ss}) is not the one logged")
            if e.flags & W.DISCARD:
                data = bytes(e.nr_sectors * ss)      # a discard reads back as zeroes here
            else:
                data = os.pread(fd, e.nr_sectors * ss, e.data_pos)
                if len(data) != e.nr_sectors * ss:
                    raise CrashtestError(f"{log}: entry {e.index}: truncated data")
            epochs[-1].append(Write(e.index, e.sector * ss, data, len(epochs) - 1))
    except W.LogError as e:
        raise CrashtestError(str(e)) from None
    finally:
        os.close(fd)
    return epochs


def states_of(epoch: list[Write], max_states: int, seed: int, torn: bool):
    """(kind, kept indices, torn parts) for one epoch; parts: {index: sector set}."""
    n = len(epoch)
    out = []
    if n <= EXHAUSTIVE and 2 ** n <= max(max_states, 2):
        for mask in range(2 ** n):
            out.append(("subset", tuple(i for i in range(n) if mask >> i & 1), {}))
    else:
        rng = random.Random(seed)
        seen = {(), tuple(range(n))}
        out += [("subset", (), {}), ("subset", tuple(range(n)), {})]
        tries = 0
        while len(out) < max_states and tries < max_states * 4:
            tries += 1
            kept = tuple(i for i in range(n) if rng.random() < 0.5)
            if kept not in seen:
                seen.add(kept)
                out.append(("subset", kept, {}))
    if torn:
        rng = random.Random(seed ^ 0x746F726E)
        multi = [i for i, w in enumerate(epoch) if len(w.data) > SECTOR]
        for i in multi[:max(0, max_states)]:
            k = len(epoch[i].data) // SECTOR
            part = frozenset(s for s in range(k) if rng.random() < 0.5) or frozenset({0})
            if len(part) == k:
                part = frozenset(range(k - 1))
            kept = tuple(j for j in range(n) if j != i and rng.random() < 0.5)
            out.append(("torn", tuple(sorted(kept + (i,))), {i: part}))
    return out


def sectors_of(epoch: list[Write], kept, parts) -> dict[int, bytes]:
    """The sectors a state writes over the durable prefix (log order: later wins)."""
    out: dict[int, bytes] = {}
    for i in kept:
        w = epoch[i]
        first = w.offset // SECTOR
        part = parts.get(i)
        for k in range(len(w.data) // SECTOR):
            if part is None or k in part:
                out[first + k] = w.data[k * SECTOR:(k + 1) * SECTOR]
    return out


class Workspace:
    """A raw working copy of the base with the durable prefix applied."""

    def __init__(self, base_bytes_path: str, path: str, size: int):
        self.master = base_bytes_path
        self.path = path
        self.size = size
        self.fd = -1
        self.applied_epochs = 0
        self.epochs_data: list = []
        self.fresh()

    def fresh(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        _sparse_copy(self.master, self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self.applied_epochs = 0

    def advance_to(self, epochs: list[list[Write]], k: int) -> None:
        """Apply every write of epochs < k."""
        if self.applied_epochs > k:
            self.fresh()
        while self.applied_epochs < k:
            for w in epochs[self.applied_epochs]:
                _pwrite(self.fd, w.data, w.offset)
            self.applied_epochs += 1

    def read(self, sector: int) -> bytes:
        return os.pread(self.fd, SECTOR, sector * SECTOR)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _pwrite(fd, data, offset) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _sparse_copy(src: str, dst: str) -> None:
    """A copy that keeps holes (SEEK_DATA/SEEK_HOLE): the base's data only."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            while data < hole:
                chunk = os.pread(fi.fileno(), min(hole - data, 1 << 20), data)
                _pwrite(fo.fileno(), chunk, data)
                data += len(chunk)
            pos = hole


class Crashtest:
    def __init__(self, base: str, log: str, check: str, max_states: int = 256, seed: int = 0,
                 torn: bool = False, jobs: int = 1, check_timeout: float = 60.0,
                 progress=None, resume: bool = True, base_format: str | None = None):
        if "{image}" not in check:
            raise CrashtestError(f"--check {check!r}: the command must name the state as "
                                 f"{{image}}")
        if max_states < 1 or jobs < 1 or check_timeout <= 0:
            raise CrashtestError("--max-states and --jobs take 1 or more, --check-timeout a "
                                 "positive number of seconds")
        self.base, self.log, self.check = base, log, check
        self.base_format = base_format      # None: probed; "raw": the file's bytes as they are
        self.max_states, self.seed, self.torn = max_states, seed, torn
        self.jobs, self.timeout = jobs, check_timeout
        self.progress = progress
        self.workdir = os.path.dirname(os.path.abspath(log)) or "."
        self.master = os.path.join(self.workdir, f".{os.path.basename(log)}.crash-base.raw")
        self.size = self._raw_base()
        self.epochs = read_epochs(log, self.size)
        self.state_file = log + ".crashtest.json"
        self.done: dict = {}
        key = {"log": _digest(log), "base": _digest(base), "seed": seed, "torn": torn,
               "max_states": max_states, "check": check}
        self.key = key
        if resume and os.path.exists(self.state_file):
            try:
                with open(self.state_file) as f:
                    saved = json.load(f)
                if saved.get("key") == key:
                    self.done = saved.get("done", {})
            except (OSError, ValueError):
                pass
        self._lock = threading.Lock()
        self._local = threading.local()
        self.materialise_s = self.check_s = 0.0
        self._spaces: list[Workspace] = []

    def _raw_base(self) -> int:
        """The base as a raw file (a raw base is used as it is)."""
        from .block.driver import BlockError, probe_format
        if self.base_format not in (None, "raw", "qcow2"):
            raise CrashtestError(f"--base-format {self.base_format}: raw or qcow2")
        try:
            fmt = self.base_format or probe_format(self.base)
            if not os.path.isfile(self.base):
                raise OSError(errno.ENOENT, "No such file or directory")
        except (BlockError, OSError) as e:
            raise CrashtestError(f"--base {self.base}: {e}") from None
        if fmt == "raw":
            self.master = self.base
            return os.path.getsize(self.base)
        from .block.driver import open_image, read_range
        drv = open_image(self.base, fmt, read_only=True)
        try:
            with open(self.master, "wb") as f:
                f.truncate(drv.size)
                for off in range(0, drv.size, 1 << 20):
                    chunk = read_range(drv, off, min(1 << 20, drv.size - off))
                    if any(chunk):
                        _pwrite(f.fileno(), chunk, off)
            return drv.size
        finally:
            drv.close()

    def _space(self) -> Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            with self._lock:
                n = len(self._spaces)
                self._spaces.append(None)
            ws = Workspace(self.master, os.path.join(self.workdir, f".crash-state-{os.getpid()}"
                                                     f"-{n}.raw"), self.size)
            self._local.ws = ws
            with self._lock:
                self._spaces[n] = ws
        return ws

    def _run_check(self, k: int, sectors: dict[int, bytes]) -> tuple[bool, str]:
        """Materialise durable prefix + ``sectors``, check, put the sectors back."""
        t0 = time.monotonic()
        ws = self._space()
        ws.advance_to(self.epochs, k)
        saved = {s: ws.read(s) for s in sectors}
        for s, data in sectors.items():
            _pwrite(ws.fd, data, s * SECTOR)
        before = os.fstat(ws.fd).st_mtime_ns
        t1 = time.monotonic()
        cmd = self.check.replace("{image}", shlex.quote(ws.path))
        p = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=self.timeout)
            ok, why = p.returncode == 0, f"exit {p.returncode}"
            if not ok:
                why += ": " + out.decode(errors="replace").strip()[:300]
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)      # the command and what it started
            p.communicate()
            ok, why = False, f"timeout: the check ran past {self.timeout:g} s"
        t2 = time.monotonic()
        if os.fstat(ws.fd).st_mtime_ns != before:
            ws.fresh()                      # the checker wrote: start from the base again
        else:
            for s, data in saved.items():
                _pwrite(ws.fd, data, s * SECTOR)
        with self._lock:                    # what states cost: making them, checking them
            self.materialise_s += t1 - t0 + time.monotonic() - t2
            self.check_s += t2 - t1
        return ok, why

    def _shrink(self, k: int, kept: tuple, parts: dict) -> list[int]:
        """ddmin over the kept writes: a minimal subset that still fails."""
        epoch = self.epochs[k]
        cur = list(kept)
        n = 2
        while len(cur) >= 2:
            chunk = max(1, len(cur) // n)
            subsets = [cur[i:i + chunk] for i in range(0, len(cur), chunk)]
            reduced = False
            for sub in subsets + [[x for x in cur if x not in s] for s in subsets]:
                if not sub or len(sub) == len(cur):
                    continue
                ok, _ = self._run_check(k, sectors_of(epoch, sub, parts))
                if not ok:
                    cur, n, reduced = sub, max(n - 1, 2), True
                    break
            if not reduced:
                if n >= len(cur):
                    break
                n = min(len(cur), n * 2)
        if len(cur) == 1:
            ok, _ = self._run_check(k, sectors_of(epoch, [], parts))
            if not ok:
                return []                   # the durable prefix alone fails
        return cur

    def run(self) -> dict:
        summary = {"states": 0, "failures": 0, "failed": [], "epochs": [],
                   "skipped_duplicates": 0}
        total = 0
        plans = []
        for k, epoch in enumerate(self.epochs):
            states = states_of(epoch, self.max_states, self.seed + k, self.torn)
            unique, seen = [], set()
            for kind, kept, parts in states:
                sectors = sectors_of(epoch, kept, parts)
                h = hashlib.sha1(b"".join(s.to_bytes(8, "little") + d
                                          for s, d in sorted(sectors.items()))).hexdigest()
                if h in seen:
                    summary["skipped_duplicates"] += 1
                    continue
                seen.add(h)
                unique.append((kind, kept, parts, sectors, f"{k}:{h}"))
            plans.append(unique)
            total += len(unique)
        t0 = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(self.jobs)     # one workspace a thread
        try:
            self._epochs(plans, pool, summary, total, t0)
        finally:
            pool.shutdown()
        summary["seconds"] = time.monotonic() - t0
        summary["materialise_s"] = self.materialise_s
        summary["check_s"] = self.check_s
        return summary

    def _epochs(self, plans, pool, summary, total, t0) -> None:
        checked = 0
        for k, unique in enumerate(plans):
            fails = []

            def one(item, k=k):
                kind, kept, parts, sectors, sid = item
                with self._lock:
                    prior = self.done.get(sid)
                if prior is not None:
                    return item, prior["ok"], prior["why"]
                ok, why = self._run_check(k, sectors)
                with self._lock:
                    self.done[sid] = {"ok": ok, "why": why}
                return item, ok, why
            for item, ok, why in pool.map(one, unique):
                checked += 1
                if not ok:
                    fails.append((item, why))
                if self.progress:
                    self.progress(checked, total, time.monotonic() - t0)
                if checked % 32 == 0:
                    self._save()
            self._save()
            for (kind, kept, parts, _sectors, _sid), why in fails:
                minimal = self._shrink(k, kept, parts)
                summary["failed"].append({
                    "epoch": k, "kind": kind, "why": why,
                    "writes_kept": [self.epochs[k][i].entry for i in kept],
                    "torn": {str(self.epochs[k][i].entry): sorted(p) for i, p in parts.items()},
                    "minimal": [self.epochs[k][i].describe() for i in minimal]})
            summary["epochs"].append({"epoch": k, "writes": len(self.epochs[k]),
                                      "states": len(unique), "failures": len(fails)})
            summary["states"] += len(unique)
            summary["failures"] += len(fails)

    def _save(self) -> None:
        with self._lock:
            tmp = self.state_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"key": self.key, "done": self.done}, f)
            os.replace(tmp, self.state_file)

    def close(self) -> None:
        for ws in self._spaces:
            if ws is not None:
                ws.close()
        if self.master != self.base:
            try:
                os.unlink(self.master)
            except FileNotFoundError:
                pass


def _digest(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def progress_bar(done: int, total: int, seconds: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / seconds * 60 if seconds > 0 else 0
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} states "
                     f"({rate:.0f}/min)")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
