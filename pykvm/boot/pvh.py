"""Load an ELF by the Xen PVH boot protocol.

The entry point is the 32-bit physical address in the ELF note named "Xen" of
type 18 (XEN_ELFNOTE_PHYS32_ENTRY); ``e_entry`` is not used. PT_LOAD segments
go to their physical addresses (p_paddr), each checked to lie inside guest RAM
and inside the file. The VMM then builds ``struct hvm_start_info`` (version 1)
with the command line, the e820 map, the ACPI RSDP and any modules (an
initrd), at an address no segment covers (including .bss), and starts the
vCPU in 32-bit flat protected mode with paging off and EBX pointing at it.
"""
from __future__ import annotations

import struct

from ..errors import BootError
from ..memory import GuestMemory
from .e820 import E820_RAM, E820Entry
from .elf import EM_386, EM_X86_64, PT_LOAD, ElfFormatError, ElfImage

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_INFO = struct.Struct("<IIII QQQQ II")   # version 1: 56 bytes
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")         # 24 bytes
HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")        # paddr, size, cmdline_paddr, reserved
MAX_CMDLINE = 64 * 1024
BOOT_INFO_SEARCH_START = 0x1000


class LoadedImage:
    def __init__(self, path: str, entry: int):
        self.path = path
        self.entry = entry
        self.segments: list[tuple[int, int]] = []  # (paddr, memsz) of what was loaded
        self.boot_info = 0                          # gpa of hvm_start_info


def find_pvh_entry(elf: ElfImage, path: str) -> int | None:
    for name, ntype, desc in elf.notes():
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(desc) not in (4, 8):
                raise BootError(path, f"PVH entry note has a {len(desc)}-byte descriptor")
            entry = int.from_bytes(desc, "little")
            if entry >> 32:
                raise BootError(path, f"PVH entry {entry:#x} is not a 32-bit address")
            return entry
    return None


def load_pvh(path: str, mem: GuestMemory, data: bytes | None = None) -> LoadedImage:
    """Load the PT_LOAD segments of a PVH ELF into guest memory; ``data``: the ELF
    itself when it is not the file at ``path`` (a bzImage's payload)."""
    if data is None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BootError(path, e.strerror or str(e)) from None
    try:
        elf = ElfImage(data)
        if elf.machine not in (EM_X86_64, EM_386):
            raise BootError(path, f"ELF for machine {elf.machine}, not x86")
        entry = find_pvh_entry(elf, path)
        if entry is None:
            raise BootError(path, 'no PVH entry note (ELF note "Xen", type 18); not a PVH kernel')
        image = LoadedImage(path, entry)
        for seg in elf.segments:
            if seg.type != PT_LOAD:
                continue
            if seg.filesz > seg.memsz:
                raise BootError(path, f"segment at {seg.paddr:#x}: file size {seg.filesz:#x} "
                                f"exceeds memory size {seg.memsz:#x}")
            payload = elf.segment_data(seg)
            if seg.memsz == 0:
                continue
            if not mem.contains(seg.paddr, seg.memsz):
                raise BootError(path, f"segment [{seg.paddr:#x}, {seg.paddr + seg.memsz:#x}) "
                                f"lies outside guest RAM ({mem.size >> 20} MiB)")
            mem.write(seg.paddr, payload)
            mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz, 0)
            image.segments.append((seg.paddr, seg.memsz))
    except ElfFormatError as e:
        raise BootError(path, str(e)) from None
    if not image.segments:
        raise BootError(path, "no loadable segments")
    if not any(p <= entry < p + n for p, n in image.segments):
        raise BootError(path, f"PVH entry {entry:#x} is outside every loaded segment")
    return image


def _free_spot(used: list[tuple[int, int]], size: int, e820: list[E820Entry]) -> int:
    """Lowest page-aligned gpa in e820 RAM where [gpa, gpa+size) overlaps nothing used."""
    for e in e820:
        if e.type != E820_RAM:
            continue
        gpa = (max(e.addr, BOOT_INFO_SEARCH_START) + 0xFFF) & ~0xFFF
        while gpa + size <= e.addr + e.size:
            clash = next(((p, n) for p, n in used if p < gpa + size and gpa < p + n), None)
            if clash is None:
                return gpa
            gpa = (clash[0] + clash[1] + 0xFFF) & ~0xFFF
    raise BootError("hvm_start_info", "no free guest RAM for the boot information")


def write_start_info(mem: GuestMemory, image: LoadedImage, cmdline: str,
                     e820: list[E820Entry], rsdp: int = 0,
                     modules: list[tuple[int, int]] = ()) -> int:
    """Build hvm_start_info v1 + memmap + module list + command line; return its gpa.

    ``rsdp``: the ACPI RSDP's gpa (0: none). ``modules``: (gpa, size) of
    modules already in guest RAM; Linux takes the first as its initrd.
    """
    cmd = cmdline.encode() + b"\0"
    if len(cmd) > MAX_CMDLINE:
        raise BootError(image.path, f"command line of {len(cmd)} bytes exceeds {MAX_CMDLINE}")
    memmap_off = HVM_START_INFO.size
    modlist_off = memmap_off + HVM_MEMMAP_ENTRY.size * len(e820)
    cmd_off = modlist_off + HVM_MODLIST_ENTRY.size * len(modules)
    total = cmd_off + len(cmd)
    base = _free_spot(image.segments + list(modules), total, e820)
    info = HVM_START_INFO.pack(HVM_START_MAGIC, 1, 0, len(modules),
                               base + modlist_off if modules else 0, base + cmd_off, rsdp,
                               base + memmap_off, len(e820), 0)
    memmap = b"".join(HVM_MEMMAP_ENTRY.pack(e.addr, e.size, e.type, 0) for e in e820)
    modlist = b"".join(HVM_MODLIST_ENTRY.pack(gpa, size, 0, 0) for gpa, size in modules)
    mem.write(base, info + memmap + modlist + cmd)
    image.boot_info = base
    return base
