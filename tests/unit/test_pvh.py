"""The PVH loader on crafted ELFs, into plain guest memory (no KVM)."""
import struct

import pytest

from pykvm.boot.e820 import E820_RAM, build_e820
from pykvm.boot.pvh import HVM_START_MAGIC, load_pvh, write_start_info
from pykvm.errors import BootError
from pykvm.memory import GuestMemory
from tests.helpers.elf import code_elf, make_elf, note, pvh_note


@pytest.fixture
def mem():
    m = GuestMemory(8 << 20)
    yield m
    m.close()


def load(tmp_path, mem, image: bytes):
    p = tmp_path / "k.elf"
    p.write_bytes(image)
    return load_pvh(str(p), mem)


@pytest.mark.parametrize("size", [4, 8])
def test_entry_comes_from_the_note_not_e_entry(tmp_path, mem, size):
    image = make_elf([(0x100000, b"\x90" * 32, 32)], pvh_note(0x100010, size), e_entry=0xDEAD)
    img = load(tmp_path, mem, image)
    assert img.entry == 0x100010
    assert mem.read(0x100000, 32) == b"\x90" * 32


def test_other_notes_are_skipped(tmp_path, mem):
    notes = note(b"GNU", 3, b"\1" * 20) + note(b"Xen", 5, b"abc") + pvh_note(0x100000)
    assert load(tmp_path, mem, make_elf([(0x100000, b"\xf4", 1)], notes)).entry == 0x100000


def test_bss_is_zeroed(tmp_path, mem):
    mem.write(0x100000, b"\xaa" * 0x3000)
    load(tmp_path, mem, code_elf(b"\xf4" * 16, bss=0x2000))
    assert mem.read(0x100010, 0x2000) == b"\0" * 0x2000


@pytest.mark.parametrize("image,message", [
    (b"MZ\x90\x00" + b"\0" * 100, "not an ELF file"),
    (b"", "not an ELF file"),
    (make_elf([(0x100000, b"\xf4", 1)], None), "no PVH entry note"),
    (make_elf([(0x100000, b"\xf4", 1)], note(b"Xen", 18, b"\1\2")), "2-byte descriptor"),
    (make_elf([(0x100000, b"\xf4", 1)], pvh_note(0x1_0000_0000, 8)), "not a 32-bit address"),
    (make_elf([(0x100000, b"\xf4", 1)], pvh_note(0x200000)), "outside every loaded segment"),
    (code_elf(b"\xf4\xf4", base=0x7FFFFF), "outside guest RAM"),
    (code_elf(b"\xf4", base=0xC0000000), "outside guest RAM"),
    (make_elf([(0x100000, b"\xf4" * 8, 4)], pvh_note(0x100000)), "exceeds memory size"),
    (make_elf([(0x100000, b"\xf4", 1)], pvh_note(0x100000), machine=183), "not x86"),
    (code_elf(b"\xf4")[:70], "malformed ELF"),
])
def test_bad_images_are_refused_with_one_line(tmp_path, mem, image, message):
    with pytest.raises(BootError) as e:
        load(tmp_path, mem, image)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_segment_past_end_of_file(tmp_path, mem):
    image = code_elf(b"\xf4" * 64)
    with pytest.raises(BootError, match="past the end of the file"):
        load(tmp_path, mem, image[:-32])


def test_start_info_layout_and_placement_avoid_the_image(tmp_path, mem):
    # An image covering the first free page (bss included) pushes start_info past it.
    image = make_elf([(0x1000, b"\xf4" * 16, 0x3000)], pvh_note(0x1000))
    img = load(tmp_path, mem, image)
    e820 = build_e820(mem)
    cmdline = "console=ttyS0  a=' b '" + "x" * 500
    base = write_start_info(mem, img, cmdline, e820)
    assert base >= 0x4000 and base % 0x1000 == 0
    (magic, version, flags, nr_modules, modlist, cmd_pa, rsdp, memmap_pa, entries,
     _) = struct.unpack("<IIIIQQQQII", mem.read(base, 56))
    assert (magic, version, nr_modules) == (HVM_START_MAGIC, 1, 0)
    assert mem.read(cmd_pa, len(cmdline) + 1) == cmdline.encode() + b"\0"
    assert entries == len(e820)
    got = [struct.unpack("<QQII", mem.read(memmap_pa + 24 * i, 24))[:3] for i in range(entries)]
    assert got == [(e.addr, e.size, e.type) for e in e820]


def test_e820_covers_ram_without_overlap(mem):
    e820 = build_e820(mem)
    spans = sorted((e.addr, e.addr + e.size) for e in e820)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    ram = sum(e.size for e in e820 if e.type == E820_RAM)
    assert (8 << 20) - (1 << 20) <= ram <= 8 << 20
    assert any(e.addr == 0x100000 and e.type == E820_RAM for e in e820)


def guest_elfs():
    import pathlib
    return sorted((pathlib.Path(__file__).resolve().parents[2] / "guest" / "build").glob("*.elf"))


@pytest.mark.parametrize("path", guest_elfs(), ids=lambda p: p.name)
def test_elf_reader_agrees_with_pyelftools(path):
    """The loader's own reader sees the same segments and PVH note as pyelftools."""
    from elftools.elf.elffile import ELFFile

    from pykvm.boot.elf import ElfImage
    from pykvm.boot.pvh import find_pvh_entry

    ours = ElfImage(path.read_bytes())
    with open(path, "rb") as f:
        elf = ELFFile(f)
        theirs = [(s["p_type"], s["p_offset"], s["p_paddr"], s["p_filesz"], s["p_memsz"])
                  for s in elf.iter_segments()]
        ptypes = {"PT_LOAD": 1, "PT_NOTE": 4}
        assert [(ptypes.get(t, t), o, p, fs, ms) for t, o, p, fs, ms in theirs if t in ptypes] == \
            [(s.type, s.offset, s.paddr, s.filesz, s.memsz) for s in ours.segments if s.type in (1, 4)]
        notes = [(n["n_name"], n["n_type"]) for seg in elf.iter_segments()
                 if seg["p_type"] == "PT_NOTE" for n in seg.iter_notes()]
    assert ("Xen", 18) in notes
    assert find_pvh_entry(ours, str(path)) == 0x100000
