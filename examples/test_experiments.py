"""Driver experiments with pykvm.testing: the fixtures ``vm`` and ``image``
come from pykvm's pytest plugin; each test is an experiment a user would run
against a driver (here: our workload guest's, under KVM)."""
import subprocess
import sys
import pathlib
import threading

from pykvm.testing import Disk

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHECK_DISK = ROOT / "guest" / "tools" / "check_disk.py"


def test_eio_on_the_third_write(vm, image):
    """The guest sees exactly the 3rd write fail; the VMM carries on, and the
    next boot on the same disk is clean."""
    disk = Disk(image("raw", "16M"))
    disk.inject("error", op="write", nth=3)
    run = vm(disk).fio(rw="randwrite", ios=200, iodepth=4, size="8M")
    failed = [r for r in disk.trace() if r["status"] != "ok"]
    assert run.errors == 1 and [(r["op"], r["rule"]) for r in failed] == [("write", 0)]
    assert sorted((r for r in disk.trace() if r["op"] == "write"),
                  key=lambda r: r["submit_ns"])[2] == failed[0]
    assert vm(disk).fio(rw="randwrite", ios=200, iodepth=4, size="8M").errors == 0


def test_50ms_on_reads_of_one_range(vm, image):
    """50 ms added to reads of one 1 MiB range: the guest's p99 shows it, and
    the trace shows it on that range only."""
    disk = Disk(image("raw", "16M"))
    disk.inject("delay", op="read", offset="4M", length="1M", delay=0.05)
    run = vm(disk).fio(rw="randread", ios=400, iodepth=8, size="16M")
    slow = [r for r in disk.trace() if 8192 <= r["sector"] < 10240]
    fast = [r for r in disk.trace() if not 8192 - 8 < r["sector"] < 10240]
    assert slow and all(r["latency_ns"] >= 50e6 for r in slow)
    assert max(r["latency_ns"] for r in fast) < 50e6
    assert run.job["read"]["clat_ns"]["percentile"]["99.000000"] > 45e6   # (its histogram
    # buckets are a few percent wide)


def test_completions_out_of_order_still_verify(vm, image):
    """Completions held and released in random order: the guest matches them
    by descriptor head, not by order, so crc32c verification still passes.
    (A driver that assumed order would read the wrong buffer for a request:
    the trace shows the order really changed.)"""
    disk = Disk(image("raw", "16M"))
    vm(disk).fio(rw="write", size="8M", ios=2048, iodepth=16)       # fill it
    disk.inject("hold", op="read", count=8, order="random", timeout=0.01, seed=5)
    run = vm(disk).fio(rw="randread", ios=800, iodepth=8, size="8M", verify="crc32c")
    reads = [r for r in disk.trace() if r["op"] == "read"]
    assert run.job["verify_errors"] == 0 and run.errors == 0
    assert [r["head"] for r in reads] != [r["head"] for r in
                                         sorted(reads, key=lambda r: r["submit_ns"])]


def test_a_torn_write_is_named_in_the_trace(vm, image):
    """The 20th write tears after its first sector (success reported): the
    host's check of the disk finds the torn block, and the trace names it."""
    disk = Disk(image("raw", "16M"))
    disk.inject("torn", op="write", nth=20, sectors=1)
    run = vm(disk).fio(rw="randwrite", bs="4k", ios=50, iodepth=1, size="4M", seed=7)
    torn = [r for r in disk.trace() if r["rule"] == 0]
    check = subprocess.run([sys.executable, CHECK_DISK, disk.path, "--rw", "randwrite", "--bs",
                            "4096", "--size", "4M", "--seed", "7", "--ios", "50"],
                           capture_output=True, text=True)
    assert run.errors == 0 and len(torn) == 1 and check.returncode == 1
    assert f"offset {torn[0]['sector'] * 512}" in check.stdout, check.stdout


def test_a_failing_l2_update_leaves_qcow2_consistent(vm, image, caplog):
    """EIO on qcow2's own L2 table update: the guest's write gets IOERR, and
    qemu-img check finds no corruption afterwards (a leaked cluster at most)."""
    disk = Disk(image("qcow2", "16M"))
    disk.inject("error", kind="inject-error", event="l2_update", once=True)
    run = vm(disk, aio="io_uring").fio(rw="randwrite", ios=300, iodepth=8, size="8M")
    check = subprocess.run(["qemu-img", "check", disk.path], capture_output=True, text=True)
    assert run.errors == 1 and "l2_update write at" in caplog.text
    assert check.returncode in (0, 3) and "ERROR" not in check.stdout, check.stdout


def test_a_hung_request_until_released(vm, image):
    """A read hangs until the test releases it; the guest then completes."""
    disk = Disk(image("raw", "16M"))
    disk.inject("hang", op="read", nth=5)
    threading.Timer(0.5, disk.release).start()
    run = vm(disk).fio(rw="randread", ios=50, iodepth=2, size="4M")
    hung = [r for r in disk.trace() if r["rule"] == 0]
    assert run.errors == 0 and len(hung) == 1 and hung[0]["latency_ns"] >= 0.4e9


EXT4_EIO = """
mkfs.ext4 -q -F /dev/vda 12288                      # 48 MiB of the 64 MiB disk
mount -o errors=remount-ro /dev/vda /mnt
dd if=/dev/vda of=/dev/null bs=4096 skip=14336 count=1 2>/dev/null   # the marker
for i in 1 2 3 4 5 6 7 8; do (echo data$i > /mnt/f$i; sync) 2>/dev/null; done
sleep 1; touch /mnt/after 2>&1; dmesg | grep -E 'I/O error|read-only'
"""


def test_ext4_remounts_read_only_on_eio_at_the_third_write_after_mount(linux_guest, image):
    """Linux's ext4 meets EIO at the 3rd write after mount (a read of a marker
    sector past the file system arms the rule): it logs the I/O error and,
    with errors=remount-ro, goes read-only; the VMM serves on."""
    disk = Disk(image("raw", "64M"))
    disk.inject("pass", op="read", offset="56M", length="4k", new_state=2)
    disk.inject("error", op="write", state=2, nth=3)
    run = linux_guest(disk, EXT4_EIO)
    assert "I/O error, dev vda" in run.output and "Read-only file system" in run.output
    assert "Remounting filesystem read-only" in run.output
    assert disk.rules()[1]["fired"] == 1 and run.device["errors"] == 1


def test_a_power_cut_loses_what_was_never_flushed(vm, image):
    """The talk's point about write caches, measured: the power goes after 1 s
    of writes that no flush made durable; with cache=writeback every one is
    lost, with cache=writethrough (each write durable as it completes) none."""
    back = Disk(image("raw", "16M"), volatile=True)
    run = vm(back).fio(rw="randwrite", runtime=5, size="8M", iodepth=8, cut_after=1.0)
    assert run.status is None and back.cut_result()["writes_lost"] > 100
    assert open(back.path, "rb").read() == bytes(16 << 20)       # as it was before the run
    through = Disk(image("raw", "16M"), volatile=True)
    vm(through, cache="writethrough").fio(rw="randwrite", runtime=5, size="8M", cut_after=1.0)
    assert through.cut_result()["writes_lost"] == 0
    assert open(through.path, "rb").read() != bytes(16 << 20)    # its writes stayed
