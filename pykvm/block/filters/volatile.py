"""The ``volatile`` filter node: a disk whose writes since the last durable point
can be lost, as the crash model says a writeback cache may lose them.

``--disk driver=volatile,file.driver=qcow2,file.file.filename=disk.qcow2[,volatile-max=256M]``.
Writes go through to the image at once (so reads, and the C path's reads, see
them); what the node keeps is, for every sector written since its last durable
point, that durable value, and every write since, in order. The model (README,
"Crash testing"): a completed FLUSH makes durable every write completed before
it was submitted; writethrough writes are durable as they complete; under
``cache=unsafe`` nothing ever is. ``power_cut(keep, seed, torn)``, with the disk
stopped, leaves the image in a crash state the model allows:

- ``keep="flushed"``: every sector written since its durable point gets that
  durable value back (all volatile writes lost);
- ``keep="all"``: nothing is lost;
- ``keep="random"``: each volatile write survives or not (seeded); with
  ``torn``, each of its sectors on its own; each sector ends as its durable
  value or the last surviving write to it.

Memory for what it keeps is bounded by ``volatile-max`` (data bytes, default
256 MiB): past it the oldest completed writes are made durable early (still a
legal state: they completed), with one log line.
"""
from __future__ import annotations

import logging
import os
import random

from ..driver import GraphError, read_range, register, write_range
from . import FilterDriver

log = logging.getLogger("pykvm.block")
# cuts the API plans, by name: {"cut": (keep, seed, torn) or None, "result": dict or None}
PLANS: dict[str, dict] = {}


def new_plan() -> str:
    name = f"plan{len(PLANS)}"
    PLANS[name] = {"cut": None, "result": None}
    return name
SECTOR = 512
KEEP = ("flushed", "all", "random")


@register
class VolatileDriver(FilterDriver):
    format_name = "volatile"
    # x-plan: the name of a cut the API plans (pykvm.testing): applied when the
    # disk closes, its outcome written back (QEMU's x- prefix: internal)
    options = {"volatile-max": "size", "x-plan": "str"}

    def __init__(self, file, read_only: bool = False, volatile_max: int = 256 << 20,
                 x_plan: str | None = None):
        super().__init__(file, read_only)
        self.plan = None
        if x_plan is not None:
            self.plan = PLANS.get(x_plan)
            if self.plan is None:
                raise GraphError("", f"no power-cut plan named '{x_plan}'")
        if read_only:
            raise GraphError("", "a volatile node holds writes: it cannot be read-only")
        self.max = volatile_max
        self.durable: dict[int, bytes] = {}     # sector -> its value at its durable point
        self.writes: list = []                  # [seq, offset, data, completed] since then
        self.bytes = 0
        self._seq = 0
        self.applied_early = 0
        self.cut = None                         # (keep, seed, torn): apply at close
        self.last_cut = None                    # what that cut did

    # -- what the backend hands over --------------------------------------------------

    def before_write(self, driver, offset: int, data) -> int:
        """A write is about to be submitted (``data``: its bytes, copied); its seq."""
        first, last = offset // SECTOR, (offset + len(data) - 1) // SECTOR
        missing = [s for s in range(first, last + 1) if s not in self.durable]
        if missing:
            lo, hi = missing[0], missing[-1] + 1
            old = read_range(driver, lo * SECTOR, (hi - lo) * SECTOR)
            for s in missing:
                self.durable[s] = bytes(old[(s - lo) * SECTOR:(s - lo + 1) * SECTOR])
                self.bytes += SECTOR
        self._seq += 1
        self.writes.append([self._seq, offset, bytes(data), False])
        self.bytes += len(data)
        return self._seq

    def completed(self, seq: int, ok: bool, durable: bool) -> None:
        for w in self.writes:
            if w[0] == seq:
                if not ok:
                    self.writes.remove(w)    # failed: it did not change the disk (or tore)
                    self.bytes -= len(w[2])
                else:
                    w[3] = True
                break
        if ok and durable:
            self._make_durable({seq})
        if self.bytes > self.max:
            done = {w[0] for w in self.writes if w[3]}
            self.applied_early += len(done)
            log.warning("volatile node: over volatile-max=%d bytes: %d completed writes made "
                        "durable early", self.max, len(done))
            self._make_durable(done)

    def flush_started(self) -> set:
        return {w[0] for w in self.writes if w[3]}

    def flush_done(self, seqs: set, ok: bool) -> None:
        if ok:
            self._make_durable(seqs)

    def _make_durable(self, seqs: set) -> None:
        """The writes ``seqs`` are on the disk for good: the durable value of
        their sectors moves on; sectors no volatile write touches are dropped."""
        keep = []
        for w in self.writes:
            if w[0] in seqs:
                self._overlay(self.durable, w[1], w[2], only_known=True)
                self.bytes -= len(w[2])
            else:
                keep.append(w)
        self.writes = keep
        touched = set()
        for _seq, offset, data, _done in keep:
            touched.update(range(offset // SECTOR, (offset + len(data)) // SECTOR))
        for s in [s for s in self.durable if s not in touched]:
            del self.durable[s]
            self.bytes -= SECTOR

    @staticmethod
    def _overlay(values: dict, offset: int, data, only_known=False, sectors=None) -> None:
        first = offset // SECTOR
        for k in range(len(data) // SECTOR):
            s = first + k
            if (only_known and s not in values) or (sectors is not None and s not in sectors):
                continue
            values[s] = data[k * SECTOR:(k + 1) * SECTOR]

    # -- the cut --------------------------------------------------------------------------

    def plan_cut(self, keep: str = "flushed", seed: int = 0, torn: bool = False) -> None:
        if keep not in KEEP:
            raise GraphError(self.describe(), f"keep={keep!r} is not one of {', '.join(KEEP)}")
        self.cut = (keep, seed, torn)

    def power_cut(self, driver, keep: str = "flushed", seed: int = 0, torn: bool = False) -> dict:
        """Leave the image in a crash state (the disk is stopped, nothing in flight)."""
        if keep not in KEEP:
            raise GraphError(self.describe(), f"keep={keep!r} is not one of {', '.join(KEEP)}")
        final = dict(self.durable)
        survived = lost = 0
        if keep == "all":
            final = {}
            survived = len(self.writes)
        elif keep == "random":
            rng = random.Random(seed)
            for _seq, offset, data, _done in self.writes:
                n = len(data) // SECTOR
                if torn:
                    part = {offset // SECTOR + k for k in range(n) if rng.random() < 0.5}
                    self._overlay(final, offset, data, sectors=part)
                    survived += bool(part)
                    lost += not part
                elif rng.random() < 0.5:
                    self._overlay(final, offset, data)
                    survived += 1
                else:
                    lost += 1
        else:
            lost = len(self.writes)
        for s in sorted(final):
            write_range(driver, s * SECTOR, final[s])   # (sector by sector: simple, rare)
        driver.flush_metadata()
        for fd in driver.sync_fds:
            os.fsync(fd)
        out = {"keep": keep, "seed": seed, "torn": torn, "writes_lost": lost,
               "writes_kept": survived, "sectors_reset": len(final),
               "applied_early": self.applied_early}
        self.durable, self.writes, self.bytes = {}, [], 0
        log.info("power cut (keep=%s): %d volatile writes lost, %d kept", keep, lost, survived)
        return out
