"""Fault reports: registers, CPU mode, RIP's physical address, disassembly, symbol.

The disassembler mode is worked out from CR0, EFER and CS on every call, since
a guest changes mode as it boots. Page walks cover the three x86 paging modes
(32-bit, PAE, 4/5-level long mode) and only ever read guest memory through
GuestMemory's bounds checks.
"""
from __future__ import annotations

import bisect
import collections

from .errors import GuestMemoryError
from .memory import GuestMemory

CR0_PE, CR0_PG = 1 << 0, 1 << 31
CR4_PSE, CR4_PAE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 12
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_P, PTE_PS = 1 << 0, 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000


class Symbols:
    """Function and object symbols of an ELF, for address -> 'name+0xoff'."""

    def __init__(self, entries: list[tuple[int, int, str]]):
        self._entries = sorted(entries)
        self._starts = [e[0] for e in self._entries]

    @classmethod
    def from_elf(cls, path: str) -> "Symbols":
        # pyelftools is only needed once a report is printed: keep it off the boot path.
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection

        entries = []
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                for sec in elf.iter_sections():
                    if not isinstance(sec, SymbolTableSection):
                        continue
                    for sym in sec.iter_symbols():
                        if sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE") \
                                and sym.name and sym["st_shndx"] not in ("SHN_UNDEF", "SHN_ABS") \
                                and not sym.name.startswith("."):
                            entries.append((sym["st_value"], sym["st_size"], sym.name))
        except (OSError, ELFError):
            pass
        return cls(entries)

    def lookup(self, addr: int) -> str:
        i = bisect.bisect_right(self._starts, addr) - 1
        # Prefer a sized symbol that covers addr; fall back to the nearest label.
        best = None
        j = i
        while j >= 0 and self._entries[j][0] == self._entries[i][0]:
            start, size, name = self._entries[j]
            if size and addr < start + size:
                return f"{name}+{addr - start:#x}"
            best = best or (start, size, name)
            j -= 1
        if best is None:
            return ""
        start, size, name = best
        if size == 0 and addr - start < 0x10000:
            return f"{name}+{addr - start:#x}"
        return ""


#: name: "real", "protected-16", "protected-32", "compat" or "long";
#: bits: 16, 32 or 64, for the disassembler
CpuMode = collections.namedtuple("CpuMode", "name bits")


def cpu_mode(sregs) -> CpuMode:
    if not sregs.cr0 & CR0_PE:
        return CpuMode("real", 16)
    if sregs.efer & EFER_LMA:
        if sregs.cs.l:
            return CpuMode("long", 64)
        return CpuMode("compat", 32 if sregs.cs.db else 16)
    return CpuMode("protected-32" if sregs.cs.db else "protected-16", 32 if sregs.cs.db else 16)


def translate(mem: GuestMemory, sregs, linear: int) -> int | None:
    """Guest-physical address of a linear address under the current paging mode."""
    if not sregs.cr0 & CR0_PG:
        return linear & 0xFFFFFFFF if not sregs.efer & EFER_LMA else linear
    try:
        if sregs.efer & EFER_LMA:
            levels = 5 if sregs.cr4 & CR4_LA57 else 4
            table = sregs.cr3 & ADDR_MASK
            for level in range(levels, 0, -1):
                shift = 12 + 9 * (level - 1)
                entry = mem.read_u(table + ((linear >> shift) & 0x1FF) * 8, 8)
                if not entry & PTE_P:
                    return None
                if level in (2, 3) and entry & PTE_PS:
                    return (entry & ADDR_MASK & ~((1 << shift) - 1)) | (linear & ((1 << shift) - 1))
                table = entry & ADDR_MASK
            return table | (linear & 0xFFF)
        if sregs.cr4 & CR4_PAE:
            pdpte = mem.read_u((sregs.cr3 & 0xFFFFFFE0) + ((linear >> 30) & 3) * 8, 8)
            if not pdpte & PTE_P:
                return None
            pde = mem.read_u((pdpte & ADDR_MASK) + ((linear >> 21) & 0x1FF) * 8, 8)
            if not pde & PTE_P:
                return None
            if pde & PTE_PS:
                return (pde & ADDR_MASK & ~0x1FFFFF) | (linear & 0x1FFFFF)
            pte = mem.read_u((pde & ADDR_MASK) + ((linear >> 12) & 0x1FF) * 8, 8)
            return (pte & ADDR_MASK) | (linear & 0xFFF) if pte & PTE_P else None
        pde = mem.read_u((sregs.cr3 & 0xFFFFF000) + ((linear >> 22) & 0x3FF) * 4, 4)
        if not pde & PTE_P:
            return None
        if pde & PTE_PS and sregs.cr4 & CR4_PSE:
            return (pde & 0xFFC00000) | (linear & 0x3FFFFF)
        pte = mem.read_u((pde & 0xFFFFF000) + ((linear >> 12) & 0x3FF) * 4, 4)
        return (pte & 0xFFFFF000) | (linear & 0xFFF) if pte & PTE_P else None
    except GuestMemoryError:
        return None


def read_linear(mem: GuestMemory, sregs, linear: int, length: int) -> bytes:
    """Read up to ``length`` bytes at a linear address, stopping at the first unmapped page."""
    out = b""
    while len(out) < length:
        phys = translate(mem, sregs, linear + len(out))
        if phys is None:
            break
        n = min(length - len(out), 0x1000 - (phys & 0xFFF))
        try:
            out += mem.read(phys, n)
        except GuestMemoryError:
            break
    return out


def disassemble(code: bytes, address: int, bits: int, count: int = 8) -> list[tuple[int, str]]:
    import capstone  # only a fault needs it; keep it off the boot path

    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[bits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    out = []
    for insn in md.disasm(code, address):
        out.append((insn.address, f"{insn.mnemonic} {insn.op_str}".strip()))
        if len(out) >= count:
            break
    return out


def fault_report(title: str, regs, sregs, mem: GuestMemory, symbols: Symbols | None):
    """Build (report_text, rip, symbol, first_instruction) for a stopped vCPU."""
    mode = cpu_mode(sregs)
    rip = regs.rip
    linear = (sregs.cs.base + rip) if mode.bits != 64 else rip
    if mode.bits != 64:
        linear &= 0xFFFFFFFF
    phys = translate(mem, sregs, linear)
    symbol = symbols.lookup(rip) if symbols else ""
    code = read_linear(mem, sregs, linear, 8 * 15)
    insns = disassemble(code, rip, mode.bits)
    where = f"  phys: {phys:#x}" if phys is not None else "  phys: unmapped"
    lines = [f"=== {title} ===",
             f"mode: {mode.name} ({mode.bits}-bit), CPL {sregs.cs.selector & 3 if mode.name != 'real' else 0}",
             f"rip: {rip:#018x}" + (f"  <{symbol}>" if symbol else "") + where]
    r = regs
    lines += [
        f"rax={r.rax:016x} rbx={r.rbx:016x} rcx={r.rcx:016x} rdx={r.rdx:016x}",
        f"rsi={r.rsi:016x} rdi={r.rdi:016x} rbp={r.rbp:016x} rsp={r.rsp:016x}",
        f"r8 ={r.r8:016x} r9 ={r.r9:016x} r10={r.r10:016x} r11={r.r11:016x}",
        f"r12={r.r12:016x} r13={r.r13:016x} r14={r.r14:016x} r15={r.r15:016x}",
        f"rflags={r.rflags:08x}",
        f"cr0={sregs.cr0:08x} cr2={sregs.cr2:016x} cr3={sregs.cr3:016x} cr4={sregs.cr4:08x} "
        f"efer={sregs.efer:x}",
    ]
    for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr"):
        s = getattr(sregs, name)
        lines.append(f"{name}: sel={s.selector:04x} base={s.base:016x} limit={s.limit:08x} "
                     f"type={s.type:x} dpl={s.dpl} p={s.present} db={s.db} l={s.l}")
    lines.append(f"gdt: base={sregs.gdt.base:016x} limit={sregs.gdt.limit:04x}  "
                 f"idt: base={sregs.idt.base:016x} limit={sregs.idt.limit:04x}")
    if insns:
        lines.append("code:")
        for addr, text in insns:
            sym = symbols.lookup(addr) if symbols else ""
            marker = "=>" if addr == rip else "  "
            lines.append(f"{marker} {addr:#x}" + (f" <{sym}>" if sym else "") + f": {text}")
    else:
        lines.append("code: (not readable at rip)" if not code else
                     f"code: (cannot decode) {code[:16].hex()}")
    first = insns[0][1] if insns and insns[0][0] == rip else ""
    return "\n".join(lines), rip, symbol, first
