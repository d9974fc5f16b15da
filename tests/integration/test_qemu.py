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


def qemu_workload(machine: str, image, cmdline: str, timeout: float = 180, queues: int = 1):
    """The workload guest under QEMU: microvm + virtio-mmio, or pc + virtio-blk-pci,
    with ``queues`` request queues."""
    from tests.conftest import guest_path
    common = ["-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "256M", "-nographic",
              "-no-reboot", "-nodefaults", "-serial", "stdio",
              "-device", "isa-debug-exit,iobase=0x501,iosize=1",
              "-drive", f"id=d0,file={image},format=raw,if=none",
              "-kernel", str(guest_path("workload"))]
    if machine == "microvm":
        # microvm puts the first virtio-blk-device's window here; pass it by hand
        args = ["-M", "microvm", *common, "-global", "virtio-mmio.force-legacy=false",
                "-device", f"virtio-blk-device,drive=d0,num-queues={queues}",
                "-append", f"virtio_mmio.device=512@0xfeb02e00:47 {cmdline}"]
    else:  # qboot: SeaBIOS runs emulated on this host (seconds per boot)
        args = ["-M", "pc", "-bios", "qboot.rom", "-vga", "none", "-nic", "none", *common,
                "-device", f"virtio-blk-pci,drive=d0,disable-legacy=on,num-queues={queues}",
                "-append", f"transport=pci {cmdline}"]
    return subprocess.run([QEMU, *args], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("machine", ["microvm", "pc"])
@pytest.mark.parametrize("queues", [1, 4])
def test_workload_guest_drives_qemus_virtio_blk(tmp_path, machine, queues):
    """The same guest driver works against QEMU's device models, on one queue
    or four (VIRTIO_BLK_F_MQ), and what it writes there is what the host-side
    checker computes."""
    import sys
    from tests.conftest import ROOT
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os_truncate(image, 16 << 20)
    tsc = "tsc_khz=1000000"  # QEMU leaves CPUID 0x40000010 empty; any value works for ios=
    r = qemu_workload(machine, image, f"rw=randwrite bs=4k size=4M iodepth=16 ios=2000 seed=5 "
                                      f"queues={queues} {tsc}", queues=queues)
    assert r.returncode == 1, r.stdout.decode()[-1500:]  # (0 << 1) | 1
    assert re.search(rb"^fio-result: .* io_errors=0 verify_errors=0 ", r.stdout, re.M)
    check = subprocess.run([sys.executable, str(ROOT / "guest/tools/check_disk.py"), str(image),
                            "--rw", "randwrite", "--bs", "4096", "--size", str(4 << 20),
                            "--seed", "5", "--ios", "2000", "--zero-unwritten"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    r = qemu_workload(machine, image, f"rw=randread bs=4k size=4M iodepth=8 ios=1000 "
                                      f"verify=crc32c queues={queues} {tsc}", queues=queues)
    assert r.returncode == 1, r.stdout.decode()[-1500:]
    assert re.search(rb" verify_errors=0 ", r.stdout)


def os_truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)
