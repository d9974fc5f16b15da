"""ACPI tables and the AML encoder, checked against ACPICA's own tools (no KVM).

``iasl -d`` (Debian: acpica-tools) disassembles every table we build; the tests
parse its output and compare it with what we meant: devices, ids, resources,
FADT flags and registers, MADT subtables. The DSDT goes round trip: our AML,
disassembled and compiled again by iasl (without its name optimisation), is
byte for byte what we wrote. ``acpiexec`` loads the tables into ACPICA's
interpreter (the code Linux runs) and evaluates objects. Checksums are checked
in Python, and so is the RSDP (iasl cannot disassemble a bare RSDP).
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from pykvm.boot import acpi
from pykvm.boot.acpi import AcpiTables, write_acpi
from pykvm.boot.e820 import E820_RESERVED, build_e820
from pykvm.memory import GuestMemory

MMIO = [(0xD0000000, 0x1000, 5), (0xD0001000, 0x1000, 6), (0xD0002000, 0x1000, 7)]


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install Debian's acpica-tools (make deps)"
    return path


def tables(t: AcpiTables) -> dict[bytes, tuple[int, bytes]]:
    out = {}
    for addr, blob in t.blobs:
        sig = b"RSDP" if blob.startswith(b"RSD PTR ") else blob[:4]
        out[sig] = (addr, blob)
    return out


def disassemble(tmp_path, blob: bytes, name: str) -> str:
    """``iasl -d`` one table; assert it went cleanly; return the .dsl text."""
    path = tmp_path / f"{name}.dat"
    path.write_bytes(blob)
    r = subprocess.run([tool("iasl"), "-d", path.name], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert not re.search(r"\b(Error|Warning)\b", log.replace("0 Errors", "").replace(
        "0 Warnings", "")), log
    return (tmp_path / f"{name}.dsl").read_text()


def fields(dsl: str) -> list[tuple[str, str]]:
    """'[02Ch 0044   1]  Subtable Type : 00 [Processor Local APIC]' -> (name, value)."""
    return [(m.group(1).strip(), m.group(2).strip())
            for m in re.finditer(r"^\[[0-9A-F]+h \d+ +\d+\] +([^:]+?) : (.*)$", dsl, re.M)]


def decoded(dsl: str) -> dict[str, str]:
    """The bit fields iasl decodes below a flags word: 'Hardware Reduced (V5) : 1'."""
    return {m.group(1).strip(): m.group(2)
            for m in re.finditer(r"^ {10,}([^\[\]:]+?) : (\d+)$", dsl, re.M)}


def devices(dsl: str) -> dict[str, str]:
    """Device name -> its body in the disassembled DSDT (devices do not nest here)."""
    out = {}
    for m in re.finditer(r"Device \((\w+)\)\s*\{", dsl):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(dsl[i], 0)
            i += 1
        out[m.group(1)] = dsl[m.end():i - 1]
    return out


# -- checksums and the RSDP ------------------------------------------------------------

@pytest.mark.parametrize("cpus,mmio,pci", [(1, [], False), (2, MMIO, True), (64, MMIO * 4, True)])
def test_every_table_sums_to_zero_and_has_its_length(cpus, mmio, pci):
    t = AcpiTables(cpus, mmio, pci)
    for sig, (addr, blob) in tables(t).items():
        if sig == b"RSDP":
            assert sum(blob[:20]) % 256 == 0, "RSDP v1 checksum"
            assert sum(blob) % 256 == 0, "RSDP extended checksum"
            assert struct.unpack_from("<I", blob, 20)[0] == len(blob) == 36
        else:
            assert sum(blob) % 256 == 0, sig
            assert struct.unpack_from("<I", blob, 4)[0] == len(blob), sig
        assert addr % 16 == 0
        assert acpi.ACPI_START <= addr and addr + len(blob) <= acpi.ACPI_END


def test_rsdp_points_at_the_xsdt_which_points_at_fadt_and_madt():
    t = AcpiTables(2, MMIO, False)
    tb = tables(t)
    rsdp = tb[b"RSDP"][1]
    sig, _, oem, rev, rsdt, length, xsdt_addr, _, _ = acpi.RSDP.unpack(rsdp)
    assert (sig, oem, rev, rsdt, length) == (b"RSD PTR ", b"PYKVM ", 2, 0, 36)
    assert xsdt_addr == tb[b"XSDT"][0]
    xsdt = tb[b"XSDT"][1]
    entries = struct.unpack_from("<2Q", xsdt, 36)
    assert entries == (tb[b"FACP"][0], tb[b"APIC"][0])
    fadt = tb[b"FACP"][1]
    assert struct.unpack_from("<I", fadt, 40)[0] == tb[b"DSDT"][0]
    assert struct.unpack_from("<Q", fadt, 140)[0] == tb[b"DSDT"][0]


def test_rsdp_is_found_by_the_legacy_scan_of_the_bios_area():
    """What a kernel does without boot_params.acpi_rsdp_addr: 16-byte steps over
    0xE0000-0xFFFFF for "RSD PTR " with a valid checksum."""
    mem = GuestMemory(8 << 20, hugepages=False)
    try:
        mem.fill(0, mem.size, 0xA5)
        rsdp = write_acpi(mem, 2, MMIO, pci=True)
        found = None
        for gpa in range(0xE0000, 0x100000, 16):
            blob = mem.read(gpa, 36)
            if blob[:8] == b"RSD PTR " and sum(blob[:20]) % 256 == 0:
                found = gpa
                break
        assert found == rsdp == acpi.ACPI_START
        reserved = [(e.addr, e.addr + e.size) for e in build_e820(mem) if e.type == E820_RESERVED]
        assert (acpi.ACPI_START, acpi.ACPI_END) in reserved
    finally:
        mem.close()


def test_tables_that_do_not_fit_the_bios_area_are_refused():
    with pytest.raises(ValueError, match="ACPI tables need"):
        AcpiTables(255, [(0xD0000000 + i * 0x1000, 0x1000, 5) for i in range(4000)], True)


# -- iasl: what we meant ---------------------------------------------------------------

def test_dsdt_disassembles_to_our_devices(tmp_path):
    t = AcpiTables(2, MMIO, pci=True)
    dsl = disassemble(tmp_path, tables(t)[b"DSDT"][1], "dsdt")
    assert re.search(r'DefinitionBlock \("", "DSDT", 2, "PYKVM ", "PYKVMDSD", 0x00000001\)', dsl)
    devs = devices(dsl)
    assert list(devs) == ["C000", "C001", "COM1", "V000", "V001", "V002", "PCI0"]
    for i in range(2):
        assert 'Name (_HID, "ACPI0007"' in devs[f"C00{i}"]
        assert f"Name (_UID, {['Zero', 'One'][i]})" in devs[f"C00{i}"]
    for i, (base, size, gsi) in enumerate(MMIO):
        body = devs[f"V{i:03X}"]
        assert 'Name (_HID, "LNRO0005")' in body
        assert re.search(r"Name \(_UID, (Zero|One|0x0*%X)\)" % i, body)
        m = re.search(r"Memory32Fixed \(ReadWrite,\s+0x([0-9A-F]+),[^\n]*\n\s+0x([0-9A-F]+),", body)
        assert m and (int(m.group(1), 16), int(m.group(2), 16)) == (base, size)
        m = re.search(r"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s*"
                      r"\{\s*0x([0-9A-F]+),\s*\}", body)
        assert m and int(m.group(1), 16) == gsi
    com1 = devs["COM1"]
    assert 'EisaId ("PNP0501")' in com1
    assert re.search(r"IO \(Decode16,\s+0x03F8,\s+// Range Minimum\s+0x03F8,", com1)
    assert re.search(r"IRQNoFlags \(\)\s+\{4\}", com1)
    pci = devs["PCI0"]
    assert 'Name (_HID, EisaId ("PNP0A03")' in pci and "_CID" not in pci
    assert "Name (_SEG, Zero)" in pci and "Name (_BBN, Zero)" in pci
    assert re.search(r"WordBusNumber \(ResourceProducer, MinFixed, MaxFixed, PosDecode,\s+"
                     r"0x0000,[^\n]*\n\s+0x0000,[^\n]*\n\s+0x0000,", pci)
    assert re.search(r"IO \(Decode16,\s+0x0CF8,\s+// Range Minimum\s+0x0CF8,[^\n]*\n"
                     r"\s+0x01,[^\n]*\n\s+0x08,", pci)
    assert re.search(r"DWordMemory \(ResourceProducer, PosDecode, MinFixed, MaxFixed, "
                     r"NonCacheable, ReadWrite,\s+0x00000000,[^\n]*\n\s+0xE0000000,[^\n]*\n"
                     r"\s+0xFEBFFFFF,", pci)
    assert re.search(r"Name \(\\_S5, Package \(0x04\)[^{]*\{\s*0x05,\s*0x05,\s*Zero,\s*Zero\s*\}",
                     dsl)


def test_dsdt_without_pci_or_disks_has_no_bridge(tmp_path):
    dsl = disassemble(tmp_path, tables(AcpiTables(1))[b"DSDT"][1], "dsdt")
    assert list(devices(dsl)) == ["C000", "COM1"]


def test_big_dsdt_round_trips_through_iasl_byte_for_byte(tmp_path):
    """64 CPUs and 40 windows: multi-byte PkgLengths, hex _UIDs. Disassemble, compile
    again with name optimisation off (-on): the AML body is ours, byte for byte."""
    mmio = [(0xD0000000 + i * 0x1000, 0x1000, 5 + i % 19) for i in range(40)]
    blob = tables(AcpiTables(64, mmio, pci=True))[b"DSDT"][1]
    assert len(blob) > 0x1000
    dsl = disassemble(tmp_path, blob, "dsdt")
    assert len(devices(dsl)) == 64 + 1 + 40 + 1
    (tmp_path / "again.dsl").write_text(dsl)
    r = subprocess.run([tool("iasl"), "-on", "-p", "again", "again.dsl"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "again.aml").read_bytes()[36:] == blob[36:]


def test_fadt_is_hardware_reduced_with_a_sleep_register(tmp_path):
    t = AcpiTables(2, MMIO)
    dsl = disassemble(tmp_path, tables(t)[b"FACP"][1], "facp")
    f = fields(dsl)
    d = decoded(dsl)

    def get(name):
        return [v for k, v in f if k == name]

    assert get("Revision") == ["06"] and get("Table Length") == ["00000114"]
    assert d["Hardware Reduced (V5)"] == "1"
    assert d["Control Method Power Button (V1)"] == "1"
    assert d["VGA Not Present (V4)"] == "1" and d["CMOS RTC Not Present (V5)"] == "1"
    assert d["8042 Present on ports 60/64 (V2)"] == "0"
    assert get("FACS Address") == ["00000000", "0000000000000000"]
    dsdt = tables(t)[b"DSDT"][0]
    assert get("DSDT Address") == [f"{dsdt:08X}", f"{dsdt:016X}"]
    # Sleep Control and Sleep Status: both the byte at port 0x600
    space = get("Space ID")
    addresses = get("Address")
    assert space[-2:] == ["01 [SystemIO]", "01 [SystemIO]"]
    assert addresses[-2:] == [f"{acpi.SLEEP_PORT:016X}"] * 2
    assert get("Bit Width")[-2:] == ["08", "08"]
    assert get("PM Timer Block Address") == ["00000000"]
    assert get("SCI Interrupt") == ["0000"]


@pytest.mark.parametrize("cpus", [1, 4])
def test_madt_has_a_lapic_per_cpu_the_ioapic_overrides_and_nmi(tmp_path, cpus):
    dsl = disassemble(tmp_path, tables(AcpiTables(cpus))[b"APIC"][1], "apic")
    f = fields(dsl)
    assert ("Local Apic Address", "FEE00000") in f
    subtables = []
    for k, v in f:
        if k == "Subtable Type":
            subtables.append((v, {}))
        elif subtables:
            subtables[-1][1][k] = v
    kinds = [t for t, _ in subtables]
    assert kinds == (["00 [Processor Local APIC]"] * cpus + ["01 [I/O APIC]",
                     "02 [Interrupt Source Override]", "04 [Local APIC NMI]"])
    for i, (_, s) in enumerate(subtables[:cpus]):
        assert (s["Processor ID"], s["Local Apic ID"]) == (f"{i:02X}", f"{i:02X}")
        assert s["Flags (decoded below)"] == "00000001"
    ioapic = subtables[cpus][1]
    assert ioapic == {"Length": "0C", "I/O Apic ID": f"{cpus:02X}", "Reserved": "00",
                      "Address": "FEC00000", "Interrupt": "00000000"}
    iso = subtables[cpus + 1][1]
    assert (iso["Source"], iso["Interrupt"], iso["Flags (decoded below)"]) == \
        ("09", "00000009", "000D")                  # active high, level
    nmi = subtables[cpus + 2][1]
    assert (nmi["Processor ID"], nmi["Interrupt Input LINT"]) == ("FF", "01")


def test_xsdt_lists_fadt_and_madt(tmp_path):
    t = AcpiTables(1)
    tb = tables(t)
    f = fields(disassemble(tmp_path, tb[b"XSDT"][1], "xsdt"))
    assert [v for k, v in f if k.startswith("ACPI Table Address")] == \
        [f"{tb[b'FACP'][0]:016X}", f"{tb[b'APIC'][0]:016X}"]


def test_acpica_interpreter_loads_the_namespace(tmp_path):
    """acpiexec: the tables load into ACPICA (what Linux runs) and _CRS evaluates."""
    t = AcpiTables(2, MMIO, pci=True)
    tb = tables(t)
    for sig in (b"FACP", b"DSDT", b"APIC"):
        (tmp_path / f"{sig.decode().lower()}.dat").write_bytes(tb[sig][1])
    r = subprocess.run([tool("acpiexec"), "-b", r"Evaluate \_SB.V001._CRS; Evaluate \_S5",
                        "facp.dat", "dsdt.dat", "apic.dat"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Evaluation of \\_SB.V001._CRS returned object" in out, out
    crs = acpi.memory32_fixed(0xD0001000, 0x1000) + acpi.ext_interrupt(6) + b"\x79\x00"
    dump = "".join(re.findall(r"^\s+[0-9A-F]{4}: ((?:[0-9A-F]{2} )+)", out, re.M))
    assert crs.hex(" ").upper() in dump
    assert re.search(r"\[Integer\] = 0000000000000005", out)


# -- the AML encoder ---------------------------------------------------------------------

@pytest.mark.parametrize("payload,encoded", [
    (0, b"\x01"), (0x3E, b"\x3f"),
    (0x3F, bytes([0x40 | 1, 0x04])),                 # 0x41 total: two bytes
    (0xFFD, bytes([0x40 | 0xF, 0xFF])),              # 0xFFF total: the last two-byte length
    (0xFFE, bytes([0x81, 0x00, 0x01])),              # 0x1001 total: three bytes
    (0xFFFFC, bytes([0x80 | 0xF, 0xFF, 0xFF])),
    (0xFFFFD, bytes([0xC0 | 0x1, 0x00, 0x00, 0x01])),
])
def test_pkg_length_encodings(payload, encoded):
    assert acpi.pkg_length(payload) == encoded
    lead = encoded[0]
    n = lead >> 6
    total = (lead & 0x3F) if n == 0 else (lead & 0xF) | int.from_bytes(encoded[1:], "little") << 4
    assert total == payload + len(encoded)


def test_pkg_length_limit():
    with pytest.raises(ValueError):
        acpi.pkg_length(1 << 28)


@pytest.mark.parametrize("path,encoded", [
    ("_HID", b"_HID"), ("_SB", b"_SB_"), ("\\_SB", b"\\_SB_"), ("^FOO", b"^FOO_"),
    ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"), ("A.B.C", b"\x2f\x03A___B___C___"), ("\\", b"\\\x00"),
])
def test_name_strings(path, encoded):
    assert acpi.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["", "TOOLONG", "1ABC", "a_b", "AB-C"])
def test_bad_name_segments_are_refused(bad):
    with pytest.raises(ValueError):
        acpi.name_seg(bad)


@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0x10000, b"\x0c\x00\x00\x01\x00"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
])
def test_integer_encodings(value, encoded):
    assert acpi.integer(value) == encoded


def test_integer_range():
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            acpi.integer(bad)


@pytest.mark.parametrize("text,value", [("PNP0A03", 0x030AD041), ("PNP0A08", 0x080AD041),
                                        ("PNP0501", 0x0105D041)])
def test_eisa_ids(text, value):
    assert acpi.eisa_id(text) == value


def test_strings_and_bad_strings():
    assert acpi.string("LNRO0005") == b"\x0dLNRO0005\x00"
    for bad in ("a\0b", "é"):
        with pytest.raises(ValueError):
            acpi.string(bad)


# -- the sleep register the FADT names -------------------------------------------------

def test_sleep_register_powers_off_on_s5_only():
    from pykvm.devices import AcpiSleep
    calls = []
    dev = AcpiSleep(lambda: calls.append(1), acpi.SLP_TYP_S5)
    assert dev.read(0, 1) == 0                            # WAK_STS never set
    dev.write(0, 1, acpi.SLP_TYP_S5 << 2)                 # no SLP_EN: nothing
    dev.write(0, 1, (3 << 2) | acpi.SLP_EN)               # S3: not supported, ignored
    assert calls == []
    dev.write(0, 1, (acpi.SLP_TYP_S5 << 2) | acpi.SLP_EN)
    assert calls == [1]
