"""Debian's cloud kernel booted by pykvm: what it says it found.

The kernel comes from tests/helpers/linux_kernel.py (cached under build/linux/),
booted twice from the same bzImage: by the Linux boot protocol (``--boot=linux``:
its own decompressor unpacks it), and by its PVH note (``--boot=pvh``: pykvm
takes the ELF out of the payload on the host). pykvm boots it with a virtio-mmio
disk, a virtio-pci disk, two vCPUs and an initramfs; the test reads the early
serial console (earlyprintk) and checks the kernel saw what the VMM gave it: the
command line as given, the e820 map as given, the initrd where the loader put
it, every ACPI table at the address and length we wrote, the IOAPIC and
overrides of the MADT, and two CPUs.

The test waits on the guest's own progress, not on a clock: it reads serial
lines until every marker it needs has appeared (then ends the VMM), or until
the VMM ends by itself. How fast this host runs the kernel does not matter; the
one bound, SILENCE, catches a hang (no serial line for that long), not a slow
host. On this machine KVM is kvm_pvm: the kernel's CPL-0 code is emulated
(~1000x slower) and it stops, about a minute of kernel time in, at an
instruction the emulator lacks, after the markers. Measured here (boot to the
last marker, 2 CPUs shared with other work): --boot=linux 176 s, of which the
decompressor, emulated and silent, took 162 s; --boot=pvh 30-38 s. On a VMX/SVM host (no kvm_pvm module) the kernel runs
at speed and the test also waits for it to start the initramfs's /init.
"""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest

from pykvm.boot.acpi import AcpiTables
from pykvm.boot.e820 import build_e820
from pykvm.boot.linux import SetupHeader, place_initrd
from pykvm.machine import host_is_pvm
from pykvm.memory import GuestMemory
from tests.conftest import ROOT
from tests.helpers.linux_kernel import FetchError, fetch_kernel

pytestmark = pytest.mark.kvm

MEM = 512 << 20
CPUS = 2
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 loglevel=8 nokaslr pykvm.test='a b'"
SILENCE = 900   # seconds without a serial line that mean a hang (the silent decompressor: ~80 s)
E820_NAMES = {1: "usable", 2: "reserved", 3: "ACPI data"}


def newc_cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """An initramfs: a cpio 'newc' archive of {name: (mode, data)}."""
    out = b""
    for ino, (name, (mode, data)) in enumerate(list(files.items()) + [("TRAILER!!!", (0, b""))]):
        raw = name.encode() + b"\0"
        fields = [ino + 1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += hdr + raw + b"\0" * (-(len(hdr) + len(raw)) % 4) + data + b"\0" * (-len(data) % 4)
    return out + b"\0" * (-len(out) % 512)


class Boot:
    """One boot of the stock kernel; ``lines`` is its serial output."""

    def __init__(self, kind: str, lines: list[str], cmdline: str, initrd: tuple[int, int],
                 stderr: str, seconds: float, reached_init: bool, markers: list[str],
                 seen: set[str], hung: bool):
        self.kind = kind
        self.lines = lines
        self.text = "\n".join(lines)
        self.cmdline = cmdline
        self.initrd = initrd
        self.stderr = stderr
        self.seconds = seconds
        self.reached_init = reached_init
        self.missing = [m for m in markers if m not in seen]
        self.hung = hung

    def find(self, pattern: str) -> list[re.Match]:
        return [m for m in (re.search(pattern, line) for line in self.lines) if m]

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.lines[-n:]) + "\n--- stderr ---\n" + self.stderr[-2000:]


def expected_markers(cmdline: str, tables: AcpiTables) -> list[str]:
    """Lines (regexes) whose presence means the kernel took in everything early."""
    sig = {b"RSD ": "RSDP", b"XSDT": "XSDT", b"FACP": "FACP", b"APIC": "APIC", b"DSDT": "DSDT"}
    acpi = [rf"ACPI: {sig[blob[:4]]} 0x{addr:016X} {len(blob):06X} "
            for addr, blob in tables.blobs]
    return [re.escape(f"Command line: {cmdline}"), r"BIOS-e820: ", r"RAMDISK: ", *acpi,
            r"ACPI: Using ACPI \(MADT\) for SMP configuration information",
            rf"smpboot: Allowing {CPUS} CPUs, 0 hotplug CPUs"]


@pytest.fixture(scope="module")
def kernel():
    try:
        return fetch_kernel()
    except FetchError as e:
        pytest.fail(f"cannot get Debian's cloud kernel: {e}")


def read_until(proc, done, silence: float):
    """Serial lines from ``proc`` until ``done(line)`` says enough, the VMM ends, or no
    line came for ``silence`` seconds (a hang). (lines, hung)."""
    fd = proc.stdout.fileno()
    lines: list[str] = []
    buf = b""
    while True:
        ready, _, _ = select.select([fd], [], [], silence)
        if not ready:
            return lines, True
        chunk = os.read(fd, 65536)
        if not chunk:
            if buf:
                lines.append(buf.decode(errors="replace").rstrip("\r"))
            return lines, False
        *complete, buf = (buf + chunk).split(b"\n")
        for raw in complete:
            lines.append(raw.decode(errors="replace").rstrip("\r"))
            if done(lines[-1]):
                return lines, False


@pytest.fixture(scope="module", params=["linux", "pvh"])
def boot(request, kernel, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp("linux")
    initrd = tmp / "initramfs.cpio"
    # /init need not run: "Run /init as init process" is printed once it exists.
    initrd.write_bytes(newc_cpio({"init": (0o100755, b"#!/bin/sh\nexec poweroff -f\n")}))
    disks = []
    for i, transport in enumerate(("mmio", "pci")):
        disk = tmp / f"disk{i}.img"
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        disks += ["--disk", f"file={disk},format=raw,transport={transport}"]
    cmdline = CMDLINE + " virtio_mmio.device=4K@0xd0000000:5"     # what Machine appends
    tables = AcpiTables(CPUS, [(0xD0000000, 0x1000, 5)], pci=True)
    markers = expected_markers(cmdline, tables)
    want_init = not host_is_pvm()
    seen: set[str] = set()
    reached_init = False

    def done(line: str) -> bool:
        nonlocal reached_init
        seen.update(m for m in markers if re.search(m, line))
        reached_init = reached_init or "Run /init as init process" in line
        return len(seen) == len(markers) and (reached_init or not want_init)

    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pykvm", "run", str(kernel), f"--boot={kind}",
         "--cmdline", CMDLINE, "--initrd", str(initrd), "--mem", f"{MEM >> 20}M",
         "--cpus", str(CPUS), *disks],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines, hung = read_until(proc, done, SILENCE)
    finally:
        seconds = time.monotonic() - start
        proc.kill()   # our own child; the guest is ended wherever it is
        _, err = proc.communicate(timeout=60)
    size = initrd.stat().st_size
    hdr = SetupHeader(kernel.read_bytes(), str(kernel))
    low_end = min(MEM, 0xC0000000)
    gpa = place_initrd(str(initrd), size, 0, min(hdr.initrd_addr_max + 1, low_end))
    print(f"{kind}: {seconds:.1f} s to the last marker", file=sys.stderr)
    return Boot(kind, lines, cmdline, (gpa, size), err.decode(errors="replace"), seconds,
                reached_init, markers, seen, hung)


def test_command_line_arrives_as_given(boot):
    got = boot.find(r"Command line: (.*)$")
    assert got, boot.tail()
    assert got[0].group(1) == boot.cmdline


def merged(entries: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Sort and merge touching entries of one type, as Linux's e820 sanitizer does."""
    out: list[tuple[int, int, int]] = []
    for start, end, kind in sorted(entries):
        if out and out[-1][2] == kind and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end), kind)
        else:
            out.append((start, end, kind))
    return out


def test_e820_map_is_ours(boot):
    mem = GuestMemory(MEM, hugepages=False)
    try:
        entries = [(e.addr, e.addr + e.size, e.type) for e in build_e820(mem)]
    finally:
        mem.close()
    if boot.kind == "pvh":   # Linux's PVH entry adds the ISA hole, reserved, then merges
        entries = merged(entries + [(0xA0000, 0x100000, 2)])
    want = [f"[mem {a:#018x}-{b - 1:#018x}] {E820_NAMES[t]}" for a, b, t in entries]
    got = [m.group(1) for m in boot.find(r"BIOS-e820: (\[mem .*)$")]
    assert got == want, boot.tail()


def test_initrd_is_where_the_loader_put_it(boot):
    gpa, size = boot.initrd
    end = -(-(gpa + size) // 4096) * 4096 - 1
    assert boot.find(rf"RAMDISK: \[mem {gpa:#010x}-{end:#010x}\]"), boot.tail()


def test_acpi_tables_are_found_where_we_wrote_them(boot):
    tables = AcpiTables(CPUS, [(0xD0000000, 0x1000, 5)], pci=True)
    line = r"ACPI: (RSDP|XSDT|FACP|DSDT|APIC) 0x([0-9A-F]{16}) ([0-9A-F]{6}) "
    found = {m.group(1): (int(m.group(2), 16), int(m.group(3), 16)) for m in boot.find(line)}
    sigs = {b"RSD ": "RSDP"}
    want = {sigs.get(blob[:4], blob[:4].decode()): (addr, len(blob)) for addr, blob in tables.blobs}
    assert found == want, boot.tail()
    assert boot.find(r"ACPI: RSDP 0x00000000000E0000 000024 \(v02 PYKVM \)")
    assert boot.find(r"ACPI: FACP .*\(v06 PYKVM  PYKVMFAC 00000001 PKVM 00000001\)")


def test_madt_ioapic_and_overrides(boot):
    assert boot.find(r"ACPI: Using ACPI \(MADT\) for SMP configuration information"), boot.tail()
    assert boot.find(rf"IOAPIC\[0\]: apic_id {CPUS}, version \d+, address 0xfec00000, GSI 0-23")
    assert boot.find(r"ACPI: INT_SRC_OVR \(bus 0 bus_irq 9 global_irq 9 high level\)")
    assert boot.find(r"ACPI: LAPIC_NMI \(acpi_id\[0xff\] high edge lint\[0x1\]\)")


def test_cpu_count(boot):
    assert boot.find(rf"smpboot: Allowing {CPUS} CPUs, 0 hotplug CPUs"), boot.tail()


def test_how_far_the_boot_goes(boot):
    """kvm_pvm: every early marker (the kernel stops later, at an instruction the
    emulator lacks). VMX/SVM: the kernel goes on to start /init."""
    assert not boot.hung, f"no serial line for {SILENCE} s:\n" + boot.tail()
    assert not boot.missing, f"never printed: {boot.missing}\n" + boot.tail()
    if not host_is_pvm():
        assert boot.reached_init, boot.tail()


def test_acpi_power_off_stops_the_vm_cleanly(pykvm, tmp_path):
    """What Linux's acpi_power_off writes on this hardware-reduced platform:
    SLP_TYP(S5) << 2 | SLP_EN to the FADT's sleep control register, port 0x600."""
    from pykvm.boot.acpi import SLEEP_PORT, SLP_EN, SLP_TYP_S5
    from tests.helpers.elf import SPIN, code_elf
    value = (SLP_TYP_S5 << 2) | SLP_EN
    code = bytes([0xB0, value, 0x66, 0xBA]) + SLEEP_PORT.to_bytes(2, "little") + b"\xee" + SPIN
    p = tmp_path / "poweroff.elf"
    p.write_bytes(code_elf(code))
    r = pykvm("run", p, "--timeout", "20")
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""


def test_a_truncated_bzimage_is_one_clear_line(pykvm, kernel, tmp_path):
    p = tmp_path / "vmlinuz"
    p.write_bytes(kernel.read_bytes()[:1 << 20])
    r = pykvm("run", p, "--timeout", "20")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"pykvm: {p}: protected-mode kernel is ") and "truncated image" in err
