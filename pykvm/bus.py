"""Buses: address range -> device, for port I/O and for MMIO.

A device claims ``[base, base+size)`` and gets ``read(offset, size)`` and
``write(offset, size, value)`` calls with offsets relative to its base.
Accesses no device claims read as all-ones and are ignored on write; they are
counted per address (``unclaimed``), never fatal: a guest probing for hardware
we do not model must not stop the VM.
"""
from __future__ import annotations

import bisect
import collections
import threading


class BusConflict(ValueError):
    pass


class Bus:
    """Sorted, non-overlapping ranges; lookup is a binary search."""

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        self._starts: list[int] = []
        self._entries: list[tuple] = []  # (base, size, device)
        self._lock = threading.Lock()
        self.unclaimed: collections.Counter[int] = collections.Counter()

    def register(self, base: int, size: int, device) -> None:
        """Claim [base, base+size) for ``device``: any object with
        ``read(offset, size) -> int`` and ``write(offset, size, value)``."""
        if size <= 0 or base < 0 or base + size > self.limit:
            raise BusConflict(f"{self.name}: range [{base:#x}, {base + size:#x}) is invalid")
        with self._lock:
            i = bisect.bisect_left(self._starts, base)
            if i > 0 and self._entries[i - 1][0] + self._entries[i - 1][1] > base:
                raise BusConflict(f"{self.name}: [{base:#x}, {base + size:#x}) overlaps "
                                  f"{self._entries[i - 1][2]!r}")
            if i < len(self._entries) and self._entries[i][0] < base + size:
                raise BusConflict(f"{self.name}: [{base:#x}, {base + size:#x}) overlaps "
                                  f"{self._entries[i][2]!r}")
            self._starts.insert(i, base)
            self._entries.insert(i, (base, size, device))

    def unregister(self, base: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, base)
            if i == len(self._starts) or self._starts[i] != base:
                raise KeyError(f"{self.name}: nothing registered at {base:#x}")
            del self._starts[i]
            del self._entries[i]

    def find(self, addr: int, size: int = 1):
        """(base, device) of the device whose range holds [addr, addr+size), else None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        base, length, dev = self._entries[i]
        if addr + size <= base + length:
            return base, dev
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr, size)
        if hit is None:
            self.unclaimed[addr] += 1
            return (1 << (8 * size)) - 1
        base, dev = hit
        return dev.read(addr - base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr, size)
        if hit is None:
            self.unclaimed[addr] += 1
            return
        base, dev = hit
        dev.write(addr - base, size, value & ((1 << (8 * size)) - 1))
