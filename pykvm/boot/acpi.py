"""ACPI tables built by the VMM: RSDP, XSDT, FADT, MADT and a DSDT in AML.

A stock Linux kernel finds our machine through these tables only: Debian's
kernels have neither VIRTIO_MMIO_CMDLINE_DEVICES nor MPPARSE, so the MADT is
how it learns of a second CPU and the DSDT how it learns of virtio-mmio.

Where: all tables sit in ``[ACPI_START, ACPI_END)`` = 0xE0000-0xFFFFF, guest
RAM that the e820 map marks reserved. The RSDP is first, 16-byte aligned, so
a loader that passes no RSDP address (or an old kernel that ignores
``boot_params.acpi_rsdp_addr``) still finds it by the legacy scan of that
range. The Linux loader also passes its address in the zero page, and the PVH
loader in ``hvm_start_info.rsdp_paddr``.

The platform is *hardware-reduced* ACPI (FADT flag HW_REDUCED_ACPI, as in
Firecracker and Cloud Hypervisor), a choice, documented here:

- there is no PM1 event/control block, PM timer, GPE block, SCI or FACS to
  emulate; Linux accepts such an FADT on x86 (``acpi_gbl_reduced_hardware``)
  and then skips the legacy PIC and the PIT-driven timer set-up, which suits
  KVM's in-kernel LAPIC timer and kvmclock;
- ISA devices are still reachable through the IOAPIC: the MADT gives it and
  the DSDT describes COM1 (PNP0501, IRQ 4), so the 8250 driver gets its
  interrupt mapped through ACPI;
- power-off works through the FADT's SLEEP_CONTROL_REG (ACPI 5.0+, the
  hardware-reduced way): Linux offers ACPI power-off when the DSDT has
  ``\\_S5`` and both sleep registers are present, then writes
  ``SLP_TYP << 2 | SLP_EN`` to the control register. Both registers are the
  one byte at ``SLEEP_PORT``, served by ``pykvm.devices.AcpiSleep``.

MADT: a local APIC per vCPU (ACPI processor UID = APIC id = vCPU index), the
IOAPIC at 0xFEC00000 with GSIs from 0 and id = number of vCPUs (unique among
APIC ids), local-APIC NMI on LINT1 for all processors, and the ISA interrupt
source overrides that describe how KVM actually routes the ISA IRQs (see
``isa_overrides``).

DSDT: ``\\_S5``, one ACPI0007 processor device per vCPU, COM1, one
``LNRO0005`` device per virtio-mmio window (a Memory32Fixed window and an
edge-triggered, active-high Extended Interrupt: our irqfd delivers a pulse)
and, when there are PCI devices, the PCI host bridge with bus 0, the 0xcf8
configuration ports and the BAR window. It is PNP0A03 (conventional PCI), not
PNP0A08 (PCI Express): configuration goes through ports 0xcf8/0xcfc only, there
is no ECAM window and so no MCFG table, and a PCIe host bridge would send Linux
looking for both (and for _OSC).

The AML encoder below is deliberately small: name strings, package lengths,
integers, strings, packages, buffers, Name/Scope/Device and the resource
descriptors we use; each is tested against ``iasl -d``.
"""
from __future__ import annotations

import struct

# -- where things are -----------------------------------------------------------

ACPI_START = 0xE0000
ACPI_END = 0x100000
LAPIC_ADDR = 0xFEE0_0000
IOAPIC_ADDR = 0xFEC0_0000
IOAPIC_PINS = 24
SLEEP_PORT = 0x600          # FADT SLEEP_CONTROL_REG and SLEEP_STATUS_REG (one byte)
SLP_TYP_S5 = 5              # the \_S5 sleep type our sleep control register powers off on
SLP_EN = 1 << 5             # ACPI: SLEEP_CONTROL_REG bit 5, SLP_EN

OEM_ID = b"PYKVM "
OEM_REVISION = 1
CREATOR_ID = b"PKVM"
CREATOR_REVISION = 1

# -- generic table helpers -----------------------------------------------------

HEADER = struct.Struct("<4sIBB6s8sI4sI")    # the 36-byte System Description Table header


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with it in place of a zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes, table_id: bytes) -> bytes:
    """A System Description Table: header + body, checksummed."""
    length = HEADER.size + len(body)
    raw = HEADER.pack(signature, length, revision, 0, OEM_ID, table_id.ljust(8), OEM_REVISION,
                      CREATOR_ID, CREATOR_REVISION) + body
    return raw[:9] + bytes([checksum(raw)]) + raw[10:]


def gas(space: int, bit_width: int, address: int, access_size: int) -> bytes:
    """Generic Address Structure (12 bytes). space 0 = memory, 1 = system I/O."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


GAS_NONE = bytes(12)
GAS_IO = 1
GAS_ACCESS_BYTE = 1

# -- RSDP / XSDT -----------------------------------------------------------------

RSDP = struct.Struct("<8sB6sBIIQB3s")        # 36 bytes, ACPI 2.0+


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2: the 20-byte v1 checksum and the extended checksum over all 36."""
    raw = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP.size, xsdt_addr, 0, bytes(3)))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def xsdt(table_addrs: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in table_addrs), b"PYKVMXSD")


# -- FADT ------------------------------------------------------------------------

FADT_REVISION = 6
FADT_MINOR = 0
FADT_LENGTH = 276
# Flags
FADT_PWR_BUTTON = 1 << 4        # no fixed power button (it is a control method or absent)
FADT_SLP_BUTTON = 1 << 5        # no fixed sleep button
FADT_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5   # no RTC at ports 0x70/0x71: Linux skips rtc_cmos
# (no IAPC_8042 bit: there is no i8042, so Linux does not probe it; no LEGACY_DEVICES:
# every ISA device we have, COM1, is in the namespace)
HYPERVISOR_VENDOR = b"PYKVM\0\0\0"


def fadt(dsdt_addr: int, sleep_port: int = SLEEP_PORT) -> bytes:
    """Hardware-reduced FADT, revision 6 (276 bytes)."""
    body = bytearray(FADT_LENGTH - HEADER.size)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into("<" + fmt, body, offset - HEADER.size, *values)

    put(40, "I", dsdt_addr)                       # DSDT (32-bit) ...
    put(109, "H", IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT)
    put(112, "I", FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    put(131, "B", FADT_MINOR)
    put(140, "Q", dsdt_addr)                      # ... and X_DSDT, the same
    sleep_reg = gas(GAS_IO, 8, sleep_port, GAS_ACCESS_BYTE)
    body[244 - HEADER.size:256 - HEADER.size] = sleep_reg   # SLEEP_CONTROL_REG
    body[256 - HEADER.size:268 - HEADER.size] = sleep_reg   # SLEEP_STATUS_REG
    put(268, "8s", HYPERVISOR_VENDOR)
    return sdt(b"FACP", FADT_REVISION, bytes(body), b"PYKVMFAC")


# -- MADT ------------------------------------------------------------------------

MADT_REVISION = 5
MADT_PCAT_COMPAT = 1            # KVM's in-kernel irqchip has the dual 8259s too
MADT_LAPIC = 0
MADT_IOAPIC = 1
MADT_ISO = 2
MADT_LAPIC_NMI = 4
LAPIC_ENABLED = 1
# MPS INTI flags: polarity bits 0-1 (1 = active high, 3 = active low),
# trigger bits 2-3 (1 = edge, 3 = level)
INTI_HIGH = 0x1
INTI_EDGE = 0x4
INTI_LEVEL = 0xC
ALL_PROCESSORS = 0xFF

#: ISA IRQ -> (GSI, MPS INTI flags). KVM's default GSI routing (which pykvm keeps)
#: connects ISA IRQ n to IOAPIC pin n, the PIT included: so, unlike a PC chipset
#: (and QEMU, which reroutes the PIT to pin 2), there is no IRQ0 -> GSI2 override;
#: declaring one would send the guest's timer set-up to a pin nothing drives.
#: IRQ 9 is the PC's ACPI SCI line and is declared level, active high, as on a PC.
ISA_OVERRIDES = {9: (9, INTI_HIGH | INTI_LEVEL)}


def madt(cpus: int, ioapic_id: int | None = None,
         isa_overrides: dict[int, tuple[int, int]] | None = None) -> bytes:
    if not 1 <= cpus <= 255:
        raise ValueError(f"{cpus} vCPUs: the MADT's xAPIC entries hold 1 to 255")
    if ioapic_id is None:
        ioapic_id = cpus
    overrides = ISA_OVERRIDES if isa_overrides is None else isa_overrides
    body = struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT)
    for i in range(cpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, ioapic_id, 0, IOAPIC_ADDR, 0)
    for irq, (gsi, flags) in sorted(overrides.items()):
        body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, irq, gsi, flags)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS, INTI_HIGH | INTI_EDGE, 1)
    return sdt(b"APIC", MADT_REVISION, body, b"PYKVMAPC")


# -- AML -------------------------------------------------------------------------

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_PREFIX = 0x5C, 0x5E
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x2E, 0x2F
LEAD_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
NAME_CHARS = LEAD_CHARS | set(b"0123456789")


def pkg_length(payload: int) -> bytes:
    """PkgLength for ``payload`` bytes that follow it (the encoding counts itself)."""
    if payload + 1 < 0x40:
        return bytes([payload + 1])
    for extra in (1, 2, 3):
        total = payload + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            total >>= 4
            for _ in range(extra):
                out.append(total & 0xFF)
                total >>= 8
            return bytes(out)
    raise ValueError(f"AML package of {payload} bytes exceeds the 2^28 PkgLength limit")


def name_seg(seg: str) -> bytes:
    raw = seg.encode("ascii")
    if not 1 <= len(raw) <= 4 or raw[0] not in LEAD_CHARS or any(c not in NAME_CHARS for c in raw):
        raise ValueError(f"{seg!r} is not an AML name segment")
    return raw.ljust(4, b"_")


def name_string(path: str) -> bytes:
    r"""'\_SB.PCI0', '^FOO', '_HID' -> NameString (root/parent prefixes, dual/multi names)."""
    prefix = b""
    while path.startswith(("\\", "^")):
        prefix += bytes([ROOT_CHAR if path[0] == "\\" else PARENT_PREFIX])
        path = path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\0"
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError(f"{path!r}: too many name segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest AML integer encoding (ZeroOp, OneOp, Byte/Word/DWord/QWordConst)."""
    if value < 0 or value >> 64:
        raise ValueError(f"{value} does not fit an AML integer")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value >> (8 * size) == 0:
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\0" in raw or any(c > 0x7F for c in raw):
        raise ValueError(f"{text!r}: AML strings are ASCII without NUL")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisa_id(text: str) -> int:
    """'PNP0A03' -> the compressed EISA id dword (as EisaId() in ASL)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"{text!r} is not an EISA id (three capitals, four hex digits)")
    vendor = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    product = int(text[3:], 16)
    return int.from_bytes(((vendor << 16) | product).to_bytes(4, "big"), "little")


def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes) -> bytes:
    if len(elements) > 255:
        raise ValueError("a Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


# -- resource descriptors (ACPI 6.x, section 6.4) ---------------------------------

def io_port(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length): a fixed 16-bit-decoded port range."""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, 1, length)


def irq_noflags(irq: int) -> bytes:
    """IRQNoFlags () {irq}: ISA, edge-triggered, active high, exclusive."""
    return struct.pack("<BH", 0x22, 1 << irq)


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", 0x86, 9, int(writable), base, length)


def ext_interrupt(gsi: int, edge: bool = True, active_low: bool = False,
                  shared: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|Low, Exclusive|Shared) {gsi}."""
    flags = 1 | (edge << 1) | (active_low << 2) | (shared << 3)
    return struct.pack("<BHBBI", 0x89, 6, flags, 1, gsi)


ADDR_SPACE_MEMORY, ADDR_SPACE_IO, ADDR_SPACE_BUS = 0, 1, 2
ADDR_MIN_FIXED, ADDR_MAX_FIXED = 1 << 2, 1 << 3


def word_address(space: int, lo: int, hi: int, type_flags: int = 0) -> bytes:
    """WordBusNumber / WordIO: a producer range [lo, hi], min and max fixed, positive decode."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, space, ADDR_MIN_FIXED | ADDR_MAX_FIXED,
                       type_flags, 0, lo, hi, 0, hi - lo + 1)


def dword_memory(lo: int, hi: int) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite)."""
    return struct.pack("<BHBBBIIIII", 0x87, 23, ADDR_SPACE_MEMORY,
                       ADDR_MIN_FIXED | ADDR_MAX_FIXED, 1, 0, lo, hi, 0, hi - lo + 1)


IO_ENTIRE_RANGE = 3


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {...}: a Buffer of descriptors and the End Tag (checksum 0)."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


# -- DSDT --------------------------------------------------------------------------

PCI_MMIO_WINDOW = (0xE000_0000, 0xFEBF_FFFF)   # PCI BARs: up to the IOAPIC
PCI_CONFIG_PORT = 0xCF8
COM1 = (0x3F8, 8, 4)


def dsdt(cpus: int, virtio_mmio: list[tuple[int, int, int]], pci: bool,
         serial: tuple[int, int, int] | None = COM1) -> bytes:
    """virtio_mmio: (base, size, gsi) per window, in the order of their _UIDs.
    Devices are named C000.. (processors) and V000.. (virtio-mmio windows)."""
    if cpus > 0xFFF or len(virtio_mmio) > 0xFFF:
        raise ValueError("the DSDT names at most 4095 processors and 4095 virtio-mmio windows")
    devices = []
    for i in range(cpus):
        devices.append(device(f"C{i:03X}", name("_HID", string("ACPI0007")),
                              name("_UID", integer(i))))
    if serial is not None:
        port, length, irq = serial
        devices.append(device("COM1", name("_HID", integer(eisa_id("PNP0501"))),
                              name("_UID", integer(0)),
                              name("_CRS", resource_template(io_port(port, length),
                                                             irq_noflags(irq)))))
    for i, (base, size, gsi) in enumerate(virtio_mmio):
        devices.append(device(f"V{i:03X}", name("_HID", string("LNRO0005")),
                              name("_UID", integer(i)),
                              name("_CRS", resource_template(memory32_fixed(base, size),
                                                             ext_interrupt(gsi)))))
    if pci:
        lo, hi = PCI_MMIO_WINDOW
        crs = resource_template(
            word_address(ADDR_SPACE_BUS, 0, 0),
            io_port(PCI_CONFIG_PORT, 8),
            dword_memory(lo, hi))
        devices.append(device("PCI0", name("_HID", integer(eisa_id("PNP0A03"))),
                              name("_SEG", integer(0)), name("_BBN", integer(0)),
                              name("_UID", integer(0)), name("_CRS", crs)))
    aml = name("\\_S5", package(integer(SLP_TYP_S5), integer(SLP_TYP_S5), integer(0), integer(0)))
    aml += scope("\\_SB", *devices)
    return sdt(b"DSDT", 2, aml, b"PYKVMDSD")


# -- all of it -------------------------------------------------------------------------

class AcpiTables:
    """The tables laid out from ``base``: ``blobs`` is [(gpa, bytes)], ``rsdp`` the RSDP's gpa."""

    def __init__(self, cpus: int, virtio_mmio: list[tuple[int, int, int]] = (),
                 pci: bool = False, base: int = ACPI_START, limit: int = ACPI_END,
                 isa_overrides: dict[int, tuple[int, int]] | None = None):
        if base % 16:
            raise ValueError("the RSDP must be 16-byte aligned")
        self.blobs: list[tuple[int, bytes]] = []
        self.rsdp = base
        cursor = base + RSDP.size

        def place(blob: bytes) -> int:
            nonlocal cursor
            cursor = -(-cursor // 16) * 16
            addr = cursor
            self.blobs.append((addr, blob))
            cursor += len(blob)
            return addr

        dsdt_addr = place(dsdt(cpus, list(virtio_mmio), pci))
        fadt_addr = place(fadt(dsdt_addr))
        madt_addr = place(madt(cpus, isa_overrides=isa_overrides))
        xsdt_addr = place(xsdt([fadt_addr, madt_addr]))
        self.blobs.insert(0, (base, rsdp(xsdt_addr)))
        if cursor > limit:
            raise ValueError(f"ACPI tables need {cursor - base:#x} bytes; "
                             f"[{base:#x}, {limit:#x}) holds {limit - base:#x}")
        self.end = cursor

    def write(self, mem) -> int:
        """Zero the ACPI area, write every table; return the RSDP's gpa."""
        start = self.blobs[0][0]
        mem.fill(start, self.end - start, 0)
        for addr, blob in self.blobs:
            mem.write(addr, blob)
        return self.rsdp


def write_acpi(mem, cpus: int, virtio_mmio=(), pci: bool = False) -> int:
    """Build the tables into guest RAM at ACPI_START; return the RSDP's gpa."""
    return AcpiTables(cpus, list(virtio_mmio), pci).write(mem)
