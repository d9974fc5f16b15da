"""Interop: our guests follow the PVH standard, not just our VMM — QEMU boots them too."""
import re
import shutil
import subprocess

import pytest

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]

QEMU = "qemu-system-x86_64"


def qemu_microvm(elf, cmdline: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # On this nested host plain "-cpu host" aborts on MSR 0x10a (arch-capabilities).
    assert shutil.which(QEMU), f"{QEMU} is missing: the Makefile installs qemu-system-x86"
    return subprocess.run(
        [QEMU, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "256M",
         "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
         "-device", "isa-debug-exit,iobase=0x501,iosize=1",
         "-kernel", str(elf), "-append", cmdline],
        capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_hello_boots_under_qemu_with_the_same_output(pykvm, guest):
    cmdline = "a b  c tsc_khz=1234567 " + "x" * 300
    ours = pykvm("run", guest("hello"), "--cmdline", cmdline)
    theirs = qemu_microvm(guest("hello"), cmdline)
    assert ours.returncode == 0
    assert theirs.returncode == (0 << 1) | 1, theirs.stderr  # QEMU's isa-debug-exit: (v<<1)|1
    head = lambda out: out.decode().split("\n")[:2]  # noqa: E731
    assert head(theirs.stdout) == head(ours.stdout) == ["hello from the guest", f"cmdline: {cmdline}"]
    # QEMU leaves CPUID 0x40000010 empty: the guest falls back to the command line.
    assert re.search(rb"^tsc_khz: 1234567$", theirs.stdout, re.M)
    assert re.search(rb"^e820: 0x0000000000100000 0x[0-9a-f]{16} 1$", theirs.stdout, re.M)


def test_longmode_guest_under_qemu(guest):
    r = qemu_microvm(guest("longmode"), "")
    assert r.returncode == 1, r.stdout
    assert b"longmode: ok\n" in r.stdout


def test_fault_guest_under_qemu_reports_and_stops(guest):
    r = qemu_microvm(guest("fault_pf"), "")
    assert re.search(rb"^guest: exception #PF \(vector 14\) error=0x[0-9a-f]+ rip=0x[0-9a-f]+ "
                     rb"cr2=0x1dead0000 cpl=3$", r.stdout, re.M), r.stdout
    assert r.returncode == 0  # a triple fault with -no-reboot ends QEMU with status 0
