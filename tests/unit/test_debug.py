"""Page walks, CPU mode and disassembly on hand-built state (no KVM)."""
import pathlib
from types import SimpleNamespace as NS

import pytest

from pykvm import debug
from pykvm.memory import GuestMemory
from pykvm.vcpu import HYPERVISOR_BASE, HYPERVISOR_TIMING, build_cpuid

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sregs(cr0=0x80000011, cr4=0x20, efer=0x500, cr3=0x10000, l=1, db=0, base=0):
    return NS(cr0=cr0, cr4=cr4, efer=efer, cr3=cr3, cs=NS(l=l, db=db, base=base, selector=0x2b))


@pytest.fixture
def mem():
    m = GuestMemory(16 << 20)
    # PML4 @0x10000 -> PDPT @0x11000 -> PD @0x12000: 2 MiB page 0 -> 0x200000,
    # and entry 1 -> PT @0x13000 whose entry 5 maps 0x205000 -> 0x7000.
    m.write_u(0x10000, 8, 0x11000 | 7)
    m.write_u(0x11000, 8, 0x12000 | 7)
    m.write_u(0x12000, 8, 0x200000 | 0x87)
    m.write_u(0x12008, 8, 0x13000 | 7)
    m.write_u(0x13000 + 5 * 8, 8, 0x7000 | 7)
    yield m
    m.close()


def test_long_mode_walk_2m_and_4k_pages(mem):
    s = sregs()
    assert debug.translate(mem, s, 0x1234) == 0x201234
    assert debug.translate(mem, s, 0x205ABC) == 0x7ABC
    assert debug.translate(mem, s, 0x206000) is None        # PTE not present
    assert debug.translate(mem, s, 1 << 39) is None          # PML4 entry 1 not present


def test_paging_off_is_identity(mem):
    assert debug.translate(mem, sregs(cr0=0x11, efer=0), 0x100123) == 0x100123


def test_walk_into_tables_outside_ram_is_unmapped_not_a_crash(mem):
    mem.write_u(0x10000, 8, 0x7_0000_0000 | 7)
    assert debug.translate(mem, sregs(), 0x1000) is None


@pytest.mark.parametrize("s,name,bits", [
    (sregs(cr0=0x10), "real", 16),
    (sregs(cr0=0x11, efer=0, l=0, db=1), "protected-32", 32),
    (sregs(l=1), "long", 64),
    (sregs(l=0, db=1), "compat", 32),
])
def test_cpu_mode(s, name, bits):
    m = debug.cpu_mode(s)
    assert (m.name, m.bits) == (name, bits)


def test_disassembly_follows_the_mode():
    code = bytes.fromhex("4889c3") + bytes.fromhex("0f0b")
    assert debug.disassemble(code, 0x1000, 64) == [(0x1000, "mov rbx, rax"), (0x1003, "ud2")]
    assert debug.disassemble(bytes.fromhex("89c3"), 0, 32) == [(0, "mov ebx, eax")]
    assert debug.disassemble(bytes.fromhex("89c3"), 0, 16) == [(0, "mov bx, ax")]


def test_symbols_from_a_guest_elf():
    elf = ROOT / "guest/build/hello.elf"
    syms = debug.Symbols.from_elf(str(elf))
    from elftools.elf.elffile import ELFFile
    with open(elf, "rb") as f:
        main = next(s for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()
                    if s.name == "main")
    assert syms.lookup(main["st_value"]) == "main+0x0"
    assert syms.lookup(main["st_value"] + 3) == "main+0x3"
    assert syms.lookup(0x10) == ""


def test_cpuid_adds_the_timing_leaf_and_hides_features():
    supported = [
        {"function": 1, "index": 0, "flags": 0, "eax": 0, "ebx": 0xFF000000, "ecx": 0x2000 | 1 << 26,
         "edx": 0},
        {"function": HYPERVISOR_BASE, "index": 0, "flags": 0, "eax": 0x40000001, "ebx": 1, "ecx": 2,
         "edx": 3},
    ]
    out = build_cpuid(supported, index=3, tsc_khz=2_500_000, hide_ecx1=0x2000 | 1 << 26)
    leaf1 = next(e for e in out if e["function"] == 1)
    assert leaf1["ebx"] >> 24 == 3
    assert leaf1["ecx"] & (0x2000 | 1 << 26) == 0
    assert leaf1["ecx"] & 1 << 31  # hypervisor present
    base = next(e for e in out if e["function"] == HYPERVISOR_BASE)
    assert base["eax"] >= HYPERVISOR_TIMING and (base["ebx"], base["ecx"], base["edx"]) == (1, 2, 3)
    timing = [e for e in out if e["function"] == HYPERVISOR_TIMING]
    assert len(timing) == 1 and timing[0]["eax"] == 2_500_000
    assert supported[0]["ebx"] == 0xFF000000  # input untouched
