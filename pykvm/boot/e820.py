"""The guest's physical memory map, as e820 entries.

Low RAM leaves out the legacy hole (EBDA, VGA, BIOS area) that Linux and
firmware-era software expect to be reserved; the rest of RAM follows the
regions of GuestMemory (below the device hole, then from 4 GiB). The BIOS
area, 0xE0000-0xFFFFF, is reserved: the VMM's ACPI tables live there (see
acpi.py), where the legacy RSDP scan looks.
"""
from __future__ import annotations

import collections

from ..memory import GuestMemory

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3

EBDA_START = 0x9FC00
LEGACY_END = 0x100000
BIOS_START = 0xE0000


E820Entry = collections.namedtuple("E820Entry", "addr size type")


def build_e820(mem: GuestMemory) -> list[E820Entry]:
    entries = []
    for r in mem.regions:
        if r.gpa == 0:
            if r.size <= LEGACY_END:
                raise ValueError("guest memory must be larger than 1 MiB")
            entries.append(E820Entry(0, EBDA_START, E820_RAM))
            entries.append(E820Entry(EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED))
            entries.append(E820Entry(BIOS_START, LEGACY_END - BIOS_START, E820_RESERVED))
            entries.append(E820Entry(LEGACY_END, r.size - LEGACY_END, E820_RAM))
        else:
            entries.append(E820Entry(r.gpa, r.size, E820_RAM))
    return entries
