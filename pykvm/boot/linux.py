"""Load a Linux bzImage by the x86 boot protocol, and start it at its 64-bit entry.

The protocol (Documentation/arch/x86/boot.rst and zero-page.rst in the kernel):

- The file starts with the real-mode setup: ``setup_sects`` sectors after the
  boot sector (0 means 4), with the setup header at 0x1f1 ("HdrS" at 0x202,
  the protocol version at 0x206). The header ends at 0x202 + the byte at 0x201.
  The protected-mode kernel follows, at (setup_sects + 1) * 512 in the file.
- We require protocol 2.12 or later and ``XLF_KERNEL_64`` in ``xloadflags``:
  2.12 is where xloadflags appeared, and XLF_KERNEL_64 is how a kernel says it
  has the 64-bit entry point (startup_64 = load address + 0x200), the only way
  we start one (we run neither the real-mode setup code nor the 32-bit entry).
  2.12 also guarantees pref_address and init_size (2.10), cmdline_size (2.06)
  and initrd_addr_max (2.03). We require LOADED_HIGH (a bzImage, not a zImage).
- The protected-mode kernel goes to 1 MiB (``code32_start``), where every
  bzImage may be loaded. A relocatable kernel's decompressor then runs at
  max(align_up(1 MiB, kernel_alignment), pref_address) - the kernel clamps to
  its LOAD_PHYSICAL_ADDR, which pref_address is - and a non-relocatable one at
  pref_address; ``init_size`` bytes from there must be RAM, and are checked.
- The zero page (``struct boot_params``, 4 KiB) is all zeroes but for the
  setup header copied from the file and what the loader fills in:
  type_of_loader 0xff (undefined loader), vid_mode 0xffff ("normal"),
  loadflags with QUIET_FLAG clear (print early messages), code32_start,
  cmd_line_ptr, ramdisk_image/ramdisk_size, the e820 map (e820_entries at
  0x1e8, e820_table at 0x2d0, 128 entries at most) and acpi_rsdp_addr (0x070).
  CAN_USE_HEAP is left clear: it tells the real-mode setup code that
  heap_end_ptr is valid, and a 64-bit boot runs no setup code.
- The command line must fit ``cmdline_size`` (without the NUL); longer is an
  error here, not a silent truncation by the kernel.
- The initrd goes as high as it can: below ``initrd_addr_max`` (the highest
  byte it may occupy), below the end of low RAM, page-aligned, above the
  kernel's init_size window.
- 64-bit entry state (boot.rst, "64-bit Boot Protocol"): long mode with paging
  on, identity-mapped page tables covering the kernel's init_size window, the
  zero page and the command line (we map the whole first 4 GiB with 2 MiB
  pages), a GDT with flat __BOOT_CS (0x10, execute/read) and __BOOT_DS (0x18,
  read/write), CS = __BOOT_CS, DS = ES = SS = __BOOT_DS, interrupts off,
  RSI = the zero page. Vcpu.setup_linux64 sets the registers; this module
  writes the GDT and page tables into guest RAM.

Every value read from the file is checked before it is used; a bad image is
one ``BootError`` line naming the file and what is wrong with it.

Low-memory layout (all below the EBDA at 0x9FC00, all e820 RAM):
  0x0500  GDT           0x7000  zero page        0x8FF0  initial stack top
  0x9000  PML4, PDPT, 4 PDs (to 0xEFFF)          0x20000 command line
"""
from __future__ import annotations

import struct

from ..errors import BootError
from ..memory import GuestMemory
from .e820 import EBDA_START, E820Entry

# -- where the loader puts things -----------------------------------------------

GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000
BOOT_STACK = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000                   # four page directories: 0xB000-0xEFFF
CMDLINE_ADDR = 0x20000
CMDLINE_LIMIT = EBDA_START - CMDLINE_ADDR
KERNEL_LOAD_ADDR = 0x100000
IDENTITY_MAP_END = 4 << 30
PAGE = 0x1000

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
GDT = [
    0,
    0,
    0x00AF9B000000FFFF,            # 0x10: __BOOT_CS, 64-bit code, execute/read, flat
    0x00CF93000000FFFF,            # 0x18: __BOOT_DS, data, read/write, flat 4 GiB
    0x00008B0000000067,            # 0x20: 64-bit TSS (busy), base 0, limit 0x67 (low half)
    0,                             #       (high half: base bits 32-63)
]

# -- the setup header ----------------------------------------------------------------

HDR_START = 0x1F1
HDR_MAGIC = b"HdrS"
HDR_MAX_END = 0x290                # the header's room in boot_params ends at edd_mbr_sig_buffer
SECTOR = 512
MIN_VERSION = 0x020C               # 2.12: xloadflags, hence XLF_KERNEL_64

OFF_SETUP_SECTS = 0x1F1
OFF_SYSSIZE = 0x1F4
OFF_VID_MODE = 0x1FA
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PAYLOAD_OFFSET = 0x248          # 2.08: the compressed kernel, from the pm kernel's start
OFF_PAYLOAD_LENGTH = 0x24C
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
HDR_MIN_END = OFF_INIT_SIZE + 4    # every field we read lies below this

LOADED_HIGH = 1 << 0
QUIET_FLAG = 1 << 5
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
BOOT_FLAG = 0xAA55
JUMP_SHORT = 0xEB
LOADER_UNDEFINED = 0xFF
VID_MODE_NORMAL = 0xFFFF

# -- the zero page ---------------------------------------------------------------------

BOOT_PARAMS_SIZE = 0x1000
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
BOOT_E820_ENTRY = struct.Struct("<QQI")


ELF_MAGIC = b"\x7fELF"


def image_kind(path: str) -> str:
    """'elf' (boot by its PVH note) or 'bzimage' (boot by the Linux boot protocol)."""
    try:
        with open(path, "rb") as f:
            head = f.read(OFF_HEADER + 4)
    except OSError as e:
        raise BootError(path, e.strerror or str(e)) from None
    if head[:4] == ELF_MAGIC:
        return "elf"
    if head[OFF_HEADER:OFF_HEADER + 4] == HDR_MAGIC:
        return "bzimage"
    raise BootError(path, 'not an ELF file nor a Linux bzImage (neither "\\x7fELF" at 0 '
                    'nor "HdrS" at 0x202)')


class SetupHeader:
    """The fields of a bzImage's setup header that the loader reads, checked."""

    def __init__(self, data: bytes, path: str):
        def fail(why: str):
            raise BootError(path, why)

        if len(data) < HDR_MIN_END or data[OFF_HEADER:OFF_HEADER + 4] != HDR_MAGIC:
            fail(f"not a Linux bzImage ({len(data)} bytes, no complete setup header)")

        def u8(off: int) -> int:
            return data[off]

        def u16(off: int) -> int:
            return struct.unpack_from("<H", data, off)[0]

        def u32(off: int) -> int:
            return struct.unpack_from("<I", data, off)[0]

        self.version = u16(OFF_VERSION)
        ver = f"{self.version >> 8}.{self.version & 0xFF:02d}"
        if self.version < MIN_VERSION:
            fail(f"boot protocol {ver} is older than 2.12: no xloadflags, so no 64-bit entry "
                 f"point to start it at")
        if u16(OFF_BOOT_FLAG) != BOOT_FLAG:
            fail(f"setup header boot_flag is {u16(OFF_BOOT_FLAG):#06x}, not 0xaa55")
        if u8(OFF_JUMP) != JUMP_SHORT:
            fail(f"setup header does not start with a short jump (byte {u8(OFF_JUMP):#04x})")
        self.end = OFF_HEADER + u8(OFF_JUMP + 1)
        if not HDR_MIN_END <= self.end <= HDR_MAX_END:
            fail(f"setup header ends at {self.end:#x}, outside [{HDR_MIN_END:#x}, "
                 f"{HDR_MAX_END:#x}] (protocol {ver})")
        self.setup_sects = u8(OFF_SETUP_SECTS) or 4
        self.pm_offset = (self.setup_sects + 1) * SECTOR
        if self.pm_offset >= len(data):
            fail(f"setup code of {self.setup_sects} sectors is as long as the whole file "
                 f"({len(data)} bytes): no protected-mode kernel")
        self.pm_size = len(data) - self.pm_offset
        syssize = u32(OFF_SYSSIZE) * 16
        if syssize > self.pm_size:
            fail(f"protected-mode kernel is {self.pm_size:#x} bytes but syssize says "
                 f"{syssize:#x}: truncated image")
        self.loadflags = u8(OFF_LOADFLAGS)
        if not self.loadflags & LOADED_HIGH:
            fail("is a zImage (loadflags lacks LOADED_HIGH); only bzImages are supported")
        self.xloadflags = u16(OFF_XLOADFLAGS)
        if not self.xloadflags & XLF_KERNEL_64:
            fail(f"has no 64-bit entry point (xloadflags {self.xloadflags:#x} lacks "
                 f"XLF_KERNEL_64): a 32-bit kernel")
        self.initrd_addr_max = u32(OFF_INITRD_ADDR_MAX)
        self.kernel_alignment = u32(OFF_KERNEL_ALIGNMENT)
        self.relocatable = bool(u8(OFF_RELOCATABLE))
        self.cmdline_size = u32(OFF_CMDLINE_SIZE)
        self.pref_address = struct.unpack_from("<Q", data, OFF_PREF_ADDRESS)[0]
        self.init_size = u32(OFF_INIT_SIZE)
        self.payload_offset = u32(OFF_PAYLOAD_OFFSET)
        self.payload_length = u32(OFF_PAYLOAD_LENGTH)
        if self.relocatable and (self.kernel_alignment == 0
                                 or self.kernel_alignment & (self.kernel_alignment - 1)):
            fail(f"kernel_alignment {self.kernel_alignment:#x} is not a power of two")

    def runtime_start(self, load_addr: int) -> int:
        """Where the kernel decompresses and runs (boot.rst, init_size; clamped as the kernel
        clamps to LOAD_PHYSICAL_ADDR = pref_address)."""
        if self.relocatable:
            aligned = -(-load_addr // self.kernel_alignment) * self.kernel_alignment
            return max(aligned, self.pref_address)
        return self.pref_address or load_addr


class LinuxImage:
    """A loaded bzImage: where everything went, and the 64-bit entry state."""

    def __init__(self, path: str, header: SetupHeader):
        self.path = path
        self.header = header
        self.load_addr = KERNEL_LOAD_ADDR
        self.entry = KERNEL_LOAD_ADDR + 0x200       # startup_64
        self.boot_params = BOOT_PARAMS_ADDR
        self.cmdline_addr = CMDLINE_ADDR
        self.initrd: tuple[int, int] | None = None  # (gpa, size)
        self.runtime: tuple[int, int] = (0, 0)      # (start, end) of the init_size window
        self.gdt = (GDT_ADDR, len(GDT) * 8 - 1)      # (base, limit)
        self.cr3 = PML4_ADDR
        self.stack = BOOT_STACK


def _low_ram_end(mem: GuestMemory) -> int:
    return mem.regions[0].end


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BootError(path, e.strerror or str(e)) from None


def place_initrd(path: str, size: int, lowest: int, highest: int) -> int:
    """The page-aligned gpa as high as possible with [gpa, gpa+size) inside [lowest, highest)."""
    if size == 0:
        raise BootError(path, "initrd is empty")
    gpa = (highest - size) & ~(PAGE - 1)
    if gpa < lowest:
        raise BootError(path, f"initrd of {size:#x} bytes does not fit in guest RAM between "
                        f"{lowest:#x} and {highest:#x} (more --mem?)")
    return gpa


def load_initrd(path: str, mem: GuestMemory, lowest: int, highest: int) -> tuple[int, int]:
    """Read an initrd file into the highest free spot below ``highest``; return (gpa, size)."""
    data = _read(path)
    gpa = place_initrd(path, len(data), lowest, highest)
    mem.write(gpa, data)
    return gpa, len(data)


def write_identity_map(mem: GuestMemory) -> int:
    """Identity-map [0, 4 GiB) with 2 MiB pages; return CR3."""
    present_rw = 0x3
    page_size = 0x80
    mem.fill(PML4_ADDR, PD_ADDR + 4 * PAGE - PML4_ADDR, 0)
    mem.write_u(PML4_ADDR, 8, PDPT_ADDR | present_rw)
    for i in range(IDENTITY_MAP_END >> 30):
        pd = PD_ADDR + i * PAGE
        mem.write_u(PDPT_ADDR + 8 * i, 8, pd | present_rw)
        entries = b"".join(struct.pack("<Q", ((i << 30) + (j << 21)) | present_rw | page_size)
                           for j in range(512))
        mem.write(pd, entries)
    return PML4_ADDR


def write_gdt(mem: GuestMemory) -> tuple[int, int]:
    mem.write(GDT_ADDR, b"".join(struct.pack("<Q", d) for d in GDT))
    return GDT_ADDR, len(GDT) * 8 - 1


def load_bzimage(path: str, mem: GuestMemory, cmdline: str, e820: list[E820Entry],
                 initrd: str | None = None, rsdp: int = 0) -> LinuxImage:
    """Load a bzImage, its zero page, command line, initrd, GDT and page tables."""
    data = _read(path)
    hdr = SetupHeader(data, path)
    image = LinuxImage(path, hdr)
    low_end = _low_ram_end(mem)

    def mib(n: int) -> str:
        return f"{n / (1 << 20):.0f} MiB"

    pm_end = image.load_addr + hdr.pm_size
    start = hdr.runtime_start(image.load_addr)
    end = start + hdr.init_size
    image.runtime = (start, end)
    if max(pm_end, end) > low_end:
        raise BootError(path, f"needs guest RAM up to {mib(max(pm_end, end))} (kernel at "
                        f"{start:#x}, init_size {hdr.init_size:#x}) but RAM below the device hole "
                        f"ends at {mib(low_end)}; use a larger --mem")
    cmd = cmdline.encode()
    if b"\0" in cmd:
        raise BootError(path, "command line contains a NUL byte")
    limit = min(hdr.cmdline_size, CMDLINE_LIMIT - 1)
    if len(cmd) > limit:
        raise BootError(path, f"command line of {len(cmd)} bytes exceeds the kernel's "
                        f"cmdline_size of {limit}")
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(path, f"{len(e820)} e820 entries; the zero page holds "
                        f"{E820_MAX_ENTRIES_ZEROPAGE}")

    mem.write(image.load_addr, data[hdr.pm_offset:])
    if initrd is not None:
        highest = min(hdr.initrd_addr_max + 1, low_end)
        image.initrd = load_initrd(initrd, mem, max(pm_end, end), highest)
    mem.write(CMDLINE_ADDR, cmd + b"\0")

    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[HDR_START:hdr.end] = data[HDR_START:hdr.end]
    struct.pack_into("<H", bp, OFF_VID_MODE, VID_MODE_NORMAL)
    bp[OFF_TYPE_OF_LOADER] = LOADER_UNDEFINED
    bp[OFF_LOADFLAGS] = (hdr.loadflags & ~(QUIET_FLAG | CAN_USE_HEAP)) & 0xFF
    struct.pack_into("<I", bp, OFF_CODE32_START, image.load_addr)
    struct.pack_into("<I", bp, OFF_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, CMDLINE_ADDR >> 32)
    if image.initrd is not None:
        gpa, size = image.initrd
        struct.pack_into("<II", bp, OFF_RAMDISK_IMAGE, gpa & 0xFFFFFFFF, size & 0xFFFFFFFF)
        struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, gpa >> 32, size >> 32)
    struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        BOOT_E820_ENTRY.pack_into(bp, BP_E820_TABLE + i * BOOT_E820_ENTRY.size,
                                  e.addr, e.size, e.type)
    mem.write(BOOT_PARAMS_ADDR, bytes(bp))

    write_gdt(mem)
    write_identity_map(mem)
    mem.fill(BOOT_STACK & ~(PAGE - 1), PAGE, 0)
    return image


# -- the payload: the kernel ELF inside a bzImage --------------------------------------

def _decompress(path: str, payload: bytes) -> bytes:
    """The payload by its magic (boot.rst, payload_offset); the build appends the
    uncompressed size as 4 bytes, which the formats' own readers do not want."""
    body, magic = payload[:-4], payload[:2]
    try:
        if magic == b"\x02\x21":                        # LZ4 legacy frame (Debian's kernels)
            import subprocess
            try:
                r = subprocess.run(["lz4", "-dc"], input=body, capture_output=True)
            except FileNotFoundError:
                raise BootError(path, "payload is LZ4-compressed and the lz4 tool is not "
                                "installed (Debian package lz4)") from None
            if r.returncode != 0:
                raise BootError(path, f"lz4 -dc: {r.stderr.decode(errors='replace').strip()}")
            return r.stdout
        if magic in (b"\x1f\x8b", b"\x1f\x9e"):
            import gzip
            return gzip.decompress(body)
        if magic in (b"\xfd\x37", b"\x5d\x00"):
            import lzma
            fmt = lzma.FORMAT_XZ if magic == b"\xfd\x37" else lzma.FORMAT_ALONE
            return lzma.decompress(body, format=fmt)
        if magic == b"\x42\x5a":
            import bz2
            return bz2.decompress(body)
    except (OSError, EOFError, ValueError) as e:        # gzip, lzma and bz2 say why here
        raise BootError(path, f"payload does not decompress: {e}") from None
    raise BootError(path, f"payload compression with magic {magic.hex()} is not one pykvm "
                    f"decodes (gzip, xz, lzma, bzip2, lz4)")


def payload_elf(path: str) -> bytes:
    """The uncompressed kernel (an ELF, with a PVH note if the kernel has one) that a
    bzImage's decompressor would unpack: ``payload_length`` bytes at ``payload_offset``
    into the protected-mode kernel, decompressed here on the host."""
    data = _read(path)
    hdr = SetupHeader(data, path)
    start = hdr.pm_offset + hdr.payload_offset
    payload = data[start:start + hdr.payload_length]
    if hdr.payload_length < 8 or len(payload) != hdr.payload_length:
        raise BootError(path, f"payload [{hdr.payload_offset:#x}, +{hdr.payload_length:#x}) "
                        f"does not lie inside the protected-mode kernel ({hdr.pm_size:#x} bytes)")
    size = struct.unpack("<I", payload[-4:])[0]
    elf = _decompress(path, payload)
    if elf[:4] != b"\x7fELF" or len(elf) != size:
        raise BootError(path, f"payload decompressed to {len(elf)} bytes, not the ELF of {size} "
                        f"bytes its trailer names")
    return elf
