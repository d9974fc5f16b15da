"""The bzImage loader on crafted images, into plain guest memory (no KVM).

Each crafted image is a boot sector + setup sectors with a setup header, then
a protected-mode part; the tests read back the zero page, the command line,
the initrd, the GDT and the page tables the loader wrote, and check every way
a bad image is refused.
"""
from __future__ import annotations

import struct

import pytest

from pykvm.boot import linux
from pykvm.boot.e820 import build_e820
from pykvm.boot.linux import image_kind, load_bzimage
from pykvm.boot.pvh import HVM_MODLIST_ENTRY, load_pvh, write_start_info
from pykvm.errors import BootError
from pykvm.memory import GuestMemory
from tests.helpers.elf import code_elf

MiB = 1 << 20


def make_bzimage(*, version=0x020F, setup_sects=4, pm=b"\x90" * 0x1000, loadflags=0x01,
                 xloadflags=0x01, relocatable=1, kernel_alignment=0x200000,
                 pref_address=0x1000000, init_size=0x800000, cmdline_size=2047,
                 initrd_addr_max=0x7FFFFFFF, header_end=0x26C, boot_flag=0xAA55,
                 syssize=None) -> bytes:
    setup = bytearray((setup_sects + 1) * 512 if setup_sects else 5 * 512)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, (len(pm) // 16) if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = bytes([0xEB, header_end - 0x202])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    setup[0x264:0x26C] = b"\x11" * 8    # handover_offset, kernel_info_offset: copied as they are
    return bytes(setup) + pm


@pytest.fixture
def mem():
    m = GuestMemory(64 * MiB, hugepages=False)
    yield m
    m.close()


def load(tmp_path, mem, image: bytes, cmdline="console=ttyS0", initrd: bytes | None = None,
         rsdp=0xE0000):
    p = tmp_path / "bzImage"
    p.write_bytes(image)
    rd = None
    if initrd is not None:
        rd = tmp_path / "initrd"
        rd.write_bytes(initrd)
    return load_bzimage(str(p), mem, cmdline, build_e820(mem), initrd=str(rd) if rd else None,
                        rsdp=rsdp)


def u(mem, gpa, size):
    return mem.read_u(gpa, size)


def test_kind_is_told_by_content(tmp_path):
    (tmp_path / "a").write_bytes(make_bzimage())
    (tmp_path / "b").write_bytes(code_elf(b"\xf4"))
    (tmp_path / "c").write_bytes(b"MZ" + b"\0" * 1000)
    (tmp_path / "d").write_bytes(b"")
    assert image_kind(str(tmp_path / "a")) == "bzimage"
    assert image_kind(str(tmp_path / "b")) == "elf"
    for bad in ("c", "d"):
        with pytest.raises(BootError, match="not an ELF file nor a Linux bzImage"):
            image_kind(str(tmp_path / bad))
    with pytest.raises(BootError, match="No such file"):
        image_kind(str(tmp_path / "missing"))


def test_protected_mode_kernel_goes_to_1mib_and_entry_is_startup_64(tmp_path, mem):
    pm = bytes(range(256)) * 64
    img = load(tmp_path, mem, make_bzimage(pm=pm, setup_sects=7))
    assert img.load_addr == 0x100000
    assert img.entry == 0x100200
    assert mem.read(0x100000, len(pm)) == pm
    assert img.runtime == (0x1000000, 0x1000000 + 0x800000)


def test_zero_setup_sects_means_four(tmp_path, mem):
    pm = b"\xcc" * 0x200
    load(tmp_path, mem, make_bzimage(setup_sects=0, pm=pm))
    assert mem.read(0x100000, 0x200) == pm


def test_zero_page(tmp_path, mem):
    image = make_bzimage()
    cmdline = "console=ttyS0 earlyprintk=serial root=/dev/vda  quoted='a b'"
    img = load(tmp_path, mem, image, cmdline=cmdline, rsdp=0xE0000)
    bp = img.boot_params
    assert bp == 0x7000
    zp = mem.read(bp, 4096)
    # the setup header is the file's, but for the fields a loader writes
    written = {0x1FA, 0x1FB, 0x210, 0x211, 0x214, 0x215, 0x216, 0x217, 0x228, 0x229, 0x22A, 0x22B}
    for off in range(0x1F1, 0x26C):
        if off not in written:
            assert zp[off] == image[off], hex(off)
    assert zp[0x26C:0x290] == bytes(0x290 - 0x26C)
    assert zp[0x1EF] == 0, "sentinel"
    assert u(mem, bp + 0x1FA, 2) == 0xFFFF          # vid_mode "normal"
    assert zp[0x210] == 0xFF                         # type_of_loader: undefined
    assert zp[0x211] == 0x01                         # LOADED_HIGH; no QUIET, no CAN_USE_HEAP
    assert u(mem, bp + 0x214, 4) == 0x100000         # code32_start
    cmd = u(mem, bp + 0x228, 4)
    assert cmd == 0x20000 and u(mem, bp + 0xC8, 4) == 0
    assert mem.read(cmd, len(cmdline) + 1) == cmdline.encode() + b"\0"
    assert u(mem, bp + 0x070, 8) == 0xE0000          # acpi_rsdp_addr
    assert u(mem, bp + 0x218, 4) == u(mem, bp + 0x21C, 4) == 0   # no initrd
    e820 = build_e820(mem)
    assert zp[0x1E8] == len(e820)
    got = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(len(e820))]
    assert got == [(e.addr, e.size, e.type) for e in e820]
    assert zp[0x2D0 + 20 * len(e820):0xD00] == bytes(0xD00 - 0x2D0 - 20 * len(e820))


def test_zero_page_is_all_zero_outside_what_we_fill(tmp_path, mem):
    mem.fill(0, 1 * MiB, 0xA5)
    img = load(tmp_path, mem, make_bzimage())
    zp = mem.read(img.boot_params, 4096)
    assert zp[:0x70] == bytes(0x70) and zp[0x78:0x1E8] == bytes(0x1E8 - 0x78)


def test_initrd_goes_high_below_the_limits(tmp_path, mem):
    initrd = bytes(range(256)) * 4000 + b"tail"           # not a page multiple
    img = load(tmp_path, mem, make_bzimage(), initrd=initrd)
    gpa, size = img.initrd
    assert size == len(initrd) and gpa % 4096 == 0
    assert gpa + size <= 64 * MiB and gpa + size > 64 * MiB - 4096 - size
    assert gpa >= img.runtime[1]
    assert mem.read(gpa, size) == initrd
    bp = img.boot_params
    assert (u(mem, bp + 0x218, 4), u(mem, bp + 0x21C, 4)) == (gpa, size)
    assert u(mem, bp + 0xC0, 4) == u(mem, bp + 0xC4, 4) == 0


def test_initrd_respects_initrd_addr_max(tmp_path, mem):
    img = load(tmp_path, mem, make_bzimage(initrd_addr_max=40 * MiB - 1), initrd=b"x" * 5000)
    gpa, size = img.initrd
    assert gpa + size <= 40 * MiB and gpa == 40 * MiB - 8192


def test_identity_map_and_gdt(tmp_path, mem):
    img = load(tmp_path, mem, make_bzimage())

    def walk(va):
        pml4e = u(mem, img.cr3 + 8 * ((va >> 39) & 511), 8)
        assert pml4e & 1
        pdpte = u(mem, (pml4e & ~0xFFF) + 8 * ((va >> 30) & 511), 8)
        assert pdpte & 1 and not pdpte & 0x80
        pde = u(mem, (pdpte & ~0xFFF) + 8 * ((va >> 21) & 511), 8)
        assert pde & 0x83 == 0x83                        # present, writable, 2 MiB page
        return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)

    for va in (0, 0x7000, 0x100200, 0x1000000 + 0x7FFFFF, 63 * MiB, 0xFEC00000, (4 << 30) - 1):
        assert walk(va) == va
    base, limit = img.gdt
    gdt = [u(mem, base + 8 * i, 8) for i in range((limit + 1) // 8)]

    def desc(d):
        access, flags = (d >> 40) & 0xFF, (d >> 52) & 0xF
        return access, flags

    assert desc(gdt[0x10 >> 3]) == (0x9B, 0xA)      # present code exec/read; G, L
    assert desc(gdt[0x18 >> 3]) == (0x93, 0xC)      # present data read/write; G, D/B
    assert (gdt[0x10 >> 3] & 0xFFFF, gdt[0x18 >> 3] & 0xFFFF) == (0xFFFF, 0xFFFF)
    assert desc(gdt[0x20 >> 3])[0] == 0x8B          # busy 64-bit TSS


def test_nonrelocatable_kernel_runs_at_pref_address(tmp_path, mem):
    img = load(tmp_path, mem, make_bzimage(relocatable=0, pref_address=0x2000000,
                                           init_size=0x100000))
    assert img.runtime == (0x2000000, 0x2100000)


def test_real_kernel_header_is_accepted(tmp_path):
    """Debian's cloud kernel (fetched by `make linux-kernel`): header only."""
    from tests.helpers.linux_kernel import cached_kernel
    path = cached_kernel()
    assert path is not None, "Debian's cloud kernel is not cached: run 'make linux-kernel'"
    hdr = linux.SetupHeader(path.read_bytes(), str(path))
    assert hdr.version >= 0x020C and hdr.relocatable and hdr.init_size > 0
    assert hdr.xloadflags & linux.XLF_KERNEL_64


@pytest.mark.parametrize("kw,message", [
    (dict(version=0x020B), "boot protocol 2.11 is older than 2.12"),
    (dict(version=0x0200), "boot protocol 2.00 is older than 2.12"),
    (dict(loadflags=0), "zImage"),
    (dict(xloadflags=0), "lacks XLF_KERNEL_64"),
    (dict(boot_flag=0x1234), "boot_flag is 0x1234"),
    (dict(header_end=0x300), "setup header ends at 0x300"),
    (dict(header_end=0x250), "setup header ends at 0x250"),
    (dict(syssize=0x10000), "truncated image"),
    (dict(kernel_alignment=0x3000), "not a power of two"),
    (dict(init_size=0x4000000), "needs guest RAM up to 80 MiB"),
    (dict(pref_address=0x4000000), "needs guest RAM up to 72 MiB"),
])
def test_bad_images_are_refused_with_one_line(tmp_path, mem, kw, message):
    with pytest.raises(BootError) as e:
        load(tmp_path, mem, make_bzimage(**kw))
    assert message in str(e.value)
    assert str(tmp_path / "bzImage") in str(e.value)
    assert "\n" not in str(e.value)


def test_truncated_files_are_refused(tmp_path, mem):
    image = make_bzimage()
    for cut in (0x206, 0x250, 5 * 512):
        with pytest.raises(BootError, match="no complete setup header|no protected-mode kernel"):
            load(tmp_path, mem, image[:cut])


def test_setup_longer_than_the_file(tmp_path, mem):
    image = bytearray(make_bzimage())
    image[0x1F1] = 200
    with pytest.raises(BootError, match="setup code of 200 sectors"):
        load(tmp_path, mem, bytes(image))


def test_command_line_longer_than_cmdline_size(tmp_path, mem):
    image = make_bzimage(cmdline_size=16)
    load(tmp_path, mem, image, cmdline="x" * 16)
    with pytest.raises(BootError, match="command line of 17 bytes exceeds the kernel's "
                                        "cmdline_size of 16"):
        load(tmp_path, mem, image, cmdline="x" * 17)
    with pytest.raises(BootError, match="NUL"):
        load(tmp_path, mem, image, cmdline="a\0b")


def test_initrd_that_does_not_fit(tmp_path, mem):
    with pytest.raises(BootError, match="initrd of .* does not fit"):
        load(tmp_path, mem, make_bzimage(), initrd=b"x" * (50 * MiB))
    with pytest.raises(BootError, match="initrd is empty"):
        load(tmp_path, mem, make_bzimage(), initrd=b"")
    with pytest.raises(BootError, match="No such file"):
        load_bzimage(str(tmp_path / "bzImage"), mem, "", build_e820(mem),
                     initrd=str(tmp_path / "missing"))


def test_too_many_e820_entries(tmp_path, mem):
    from pykvm.boot.e820 import E820Entry
    (tmp_path / "bzImage").write_bytes(make_bzimage())
    e820 = [E820Entry(i * 4096, 4096, 1) for i in range(129)]
    with pytest.raises(BootError, match="129 e820 entries"):
        load_bzimage(str(tmp_path / "bzImage"), mem, "", e820)


def test_pvh_start_info_carries_rsdp_and_initrd_module(tmp_path, mem):
    p = tmp_path / "k.elf"
    p.write_bytes(code_elf(b"\xf4" * 16))
    img = load_pvh(str(p), mem)
    e820 = build_e820(mem)
    base = write_start_info(mem, img, "x", e820, rsdp=0xE0000, modules=[(0x2000000, 0x1234)])
    (magic, _, _, nr_modules, modlist, cmd_pa, rsdp, _, _,
     _) = struct.unpack("<IIIIQQQQII", mem.read(base, 56))
    assert (magic, nr_modules, rsdp) == (0x336EC578, 1, 0xE0000)
    assert HVM_MODLIST_ENTRY.unpack(mem.read(modlist, 32)) == (0x2000000, 0x1234, 0, 0)
    assert mem.read(cmd_pa, 2) == b"x\0"
    assert not base <= 0x2000000 < base + 4096


# -- --boot=pvh: the ELF inside the payload -------------------------------------------

def with_payload(elf: bytes, compress, *, trailer: int | None = None, length_delta: int = 0):
    """A bzImage whose protected-mode part is 0x200 bytes of code, then the payload
    (compressed ELF + its uncompressed size as 4 bytes, as the kernel's build appends)."""
    payload = compress(elf) + struct.pack("<I", len(elf) if trailer is None else trailer)
    pm = b"\x90" * 0x200 + payload
    image = bytearray(make_bzimage(pm=pm + b"\0" * (-len(pm) % 16)))
    struct.pack_into("<II", image, 0x248, 0x200, len(payload) + length_delta)
    return bytes(image)


def _lz4(data: bytes) -> bytes:
    import subprocess
    return subprocess.run(["lz4", "-l", "-c"], input=data, capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize("compress", [
    pytest.param(lambda d: __import__("gzip").compress(d), id="gzip"),
    pytest.param(lambda d: __import__("lzma").compress(d), id="xz"),
    pytest.param(lambda d: __import__("bz2").compress(d), id="bzip2"),
    pytest.param(_lz4, id="lz4-legacy"),
])
def test_payload_elf_is_the_compressed_kernel(tmp_path, mem, compress):
    elf = code_elf(b"\xbe\x01\x00\x00\x00\xf4" * 100)
    p = tmp_path / "bzImage"
    p.write_bytes(with_payload(elf, compress))
    assert linux.payload_elf(str(p)) == elf
    image = load_pvh(str(p), mem, data=linux.payload_elf(str(p)))  # and it boots by its note
    assert image.segments and image.entry


@pytest.mark.parametrize("image,why", [
    (lambda elf: with_payload(elf, __import__("gzip").compress, trailer=5),
     "payload decompressed to .* not the ELF of 5 bytes"),
    (lambda elf: with_payload(elf, __import__("gzip").compress, length_delta=1 << 20),
     "does not lie inside the protected-mode kernel"),
    (lambda elf: with_payload(elf, lambda d: b"\x28\xb5" + d),
     "magic 28b5 is not one pykvm decodes"),
    (lambda elf: with_payload(elf, lambda d: b"\x1f\x8b" + d),
     "payload does not decompress"),
    (lambda elf: with_payload(b"not an ELF", __import__("gzip").compress),
     "not the ELF"),
])
def test_payload_elf_refuses_a_bad_payload(tmp_path, image, why):
    p = tmp_path / "bzImage"
    p.write_bytes(image(code_elf(b"\xf4")))
    with pytest.raises(BootError, match=why):
        linux.payload_elf(str(p))
