"""Crash testing a real file system: ext4 in the Linux kit (QEMU, TCG) on a
disk served by pykvm, its writes logged (blklogwrites), then every crash state
the log allows checked with e2fsck after journal recovery (pykvm crashtest)."""
import json
import shutil
import subprocess
import sys

from pykvm.testing import Disk

WORKLOAD = """
mount {opts} /dev/vda /mnt
for i in 1 2 3 4; do
  dd if=/dev/urandom of=/mnt/new$i bs=4k count=3 conv=fsync 2>/dev/null
  mv /mnt/new$i /mnt/file$i; sync
done
rm /mnt/file2; sync; umount /mnt
"""
# journal recovery first (it writes the state: crashtest then starts from a fresh copy)
CHECK = "e2fsck -E journal_only -y {image} >/dev/null 2>&1; e2fsck -fn {image}"


def crashtest(base, log, *args):
    p = subprocess.run([sys.executable, "-m", "pykvm", "crashtest", "--base", base, "--log", log,
                        "--check", CHECK, "--json", "--no-resume", *args],
                       capture_output=True, text=True, timeout=900)
    return json.loads(p.stdout)


def ext4(image):
    base = image("raw", "32M")
    subprocess.run(["mkfs.ext4", "-q", "-F", base], check=True)
    shutil.copy(base, base + ".disk")
    return base


def test_ext4_survives_every_crash_state(linux_guest, image):
    """Default mount (barriers on): every state of every flush epoch passes e2fsck."""
    base = ext4(image)
    disk = Disk(base + ".disk", fmt="raw", log=base + ".log")
    assert linux_guest(disk, WORKLOAD.format(opts="")).rc == 0
    s = crashtest(base, disk.log, "--max-states", "16")
    assert s["states"] > 50 and s["failures"] == 0, s["failed"][:2]


def test_ext4_without_barriers_has_failing_states_that_shrink(linux_guest, image):
    """mount -o nobarrier: no flush reaches the device, so any subset of the
    writes may be on disk after a cut; crashtest finds states e2fsck rejects
    and shrinks one to a handful of writes."""
    base = ext4(image)
    disk = Disk(base + ".disk", fmt="raw", log=base + ".log")
    assert linux_guest(disk, WORKLOAD.format(opts="-o nobarrier")).rc == 0
    s = crashtest(base, disk.log, "--max-states", "64", "--seed", "1")
    assert s["failures"] > 0
    assert min(len(f["minimal"]) for f in s["failed"]) <= 5, s["failed"][0]
