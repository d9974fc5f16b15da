"""The Linux test kit booted in QEMU (TCG) on QEMU's own virtio-blk-pci over a raw
file: no pykvm involved, this validates the kit itself (kernel, modules, busybox,
fio, e2fsprogs, /init, run_tcg). QEMU missing is a failure: the Makefile installs it."""
from __future__ import annotations

import json
import re
import struct

import pytest

from tests.helpers import linux_kit

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@pytest.fixture(scope="module")
def kit():
    return linux_kit.kit()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    return path


def blk(path, serial="kit-disk0"):
    return ["-drive", f"if=none,id=d0,file={path},format=raw,discard=unmap",
            "-device", f"virtio-blk-pci,drive=d0,serial={serial}"]


def test_exit_status_and_output_come_back(kit):
    r = linux_kit.run_tcg(kit, "echo hello from the kit\nexit 3", timeout=120)
    assert r.rc == 3
    assert r.output == "hello from the kit\n"
    assert r.boot_to_init_s is not None and 0 < r.boot_to_init_s < r.wall_s
    r = linux_kit.run_tcg(kit, "true", timeout=120)
    assert r.rc == 0 and r.output == ""


def test_extra_device_args_and_shared_memory(kit, disk):
    script = ("cat /sys/block/vda/serial; echo; cat /sys/block/vda/size\n"
              "grep MemTotal /proc/meminfo\n")
    r = linux_kit.run_tcg(kit, script, qemu_args=blk(disk, serial="kit-serial-7"),
                          mem="384M", shared_mem=True, timeout=120)
    assert r.rc == 0, r.console
    lines = r.output.split("\n")
    assert lines[0] == "kit-serial-7"
    assert int(lines[1]) * 512 == 64 * MiB
    total_kib = int(re.search(r"MemTotal:\s+(\d+) kB", r.output).group(1))
    assert 300 * 1024 < total_kib <= 384 * 1024


def fio_json(output: str) -> dict:
    start, end = output.find("{"), output.rfind("}")
    assert start >= 0 and end > start, output
    return json.loads(output[start:end + 1])


@pytest.mark.parametrize("engine", ["libaio", "io_uring"])
def test_fio_randwrite_verify_crc32c_qd32(kit, disk, engine):
    script = ("fio --enghelp | grep -qw %(e)s || { echo 'no engine %(e)s'; exit 10; }\n"
              "fio --name=kit --filename=/dev/vda --direct=1 --ioengine=%(e)s --rw=randwrite "
              "--bs=4k --iodepth=32 --size=16m --verify=crc32c --verify_fatal=1 "
              "--output-format=json" % {"e": engine})
    r = linux_kit.run_tcg(kit, script, qemu_args=blk(disk), timeout=240)
    assert r.rc == 0, r.console[-3000:]
    job = fio_json(r.output)["jobs"][0]
    assert job["error"] == 0
    assert job["job options"]["ioengine"] == engine
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB      # the verify pass read everything back
    # the blocks are on the host's file, each starting with fio's verify header magic
    data = disk.read_bytes()[:16 * MiB]
    headers = sum(data[o:o + 2] == b"\xca\xac" for o in range(0, len(data), 4096))
    assert headers == 4096


def test_fio_verify_catches_a_corrupted_block(kit, disk):
    """The verify pass is real: one block overwritten between writing and verifying fails it."""
    common = ("--name=kit --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite "
              "--bs=4k --iodepth=32 --size=4m --verify=crc32c --verify_fatal=1")
    script = (f"fio {common} --do_verify=0 >/dev/null || exit 20\n"
              "dd if=/dev/zero of=/dev/vda bs=4k seek=100 count=1 oflag=direct 2>/dev/null\n"
              f"fio {common} --verify_only >/tmp/v.txt 2>&1\n"
              "rc=$?; grep -m1 -i 'verify' /tmp/v.txt; exit $rc")
    r = linux_kit.run_tcg(kit, script, qemu_args=blk(disk), timeout=240)
    assert r.rc not in (0, 20), r.console[-3000:]
    assert re.search(r"verify.*(bad|fail)", r.output, re.I), r.output


def test_ext4_mkfs_mount_write_fsck(kit, disk):
    script = "\n".join([
        "set -e",
        "mkfs.ext4 -q -F /dev/vda",
        "mount -t ext4 /dev/vda /mnt",
        "echo kit-data-$((6 * 7)) > /mnt/file",
        "dd if=/dev/urandom of=/mnt/big bs=1M count=4 2>/dev/null",
        "sum=$(sha256sum /mnt/big | cut -d' ' -f1)",
        "sync",
        "fstrim -v /mnt",
        "umount /mnt",
        "fsck.ext4 -n -f /dev/vda",
        "mount -t ext4 -o ro /dev/vda /mnt",
        "cat /mnt/file",
        "[ \"$(sha256sum /mnt/big | cut -d' ' -f1)\" = \"$sum\" ] && echo big-file-intact",
        "umount /mnt",
    ])
    r = linux_kit.run_tcg(kit, script, qemu_args=blk(disk), timeout=240)
    assert r.rc == 0, r.console[-3000:]
    assert "kit-data-42\n" in r.output
    assert "big-file-intact\n" in r.output
    assert re.search(r"^/mnt: \d+ bytes trimmed", r.output, re.M), r.output
    assert re.search(r"^/dev/vda: \d+/\d+ files", r.output, re.M), r.output   # fsck's summary
    sb = disk.read_bytes()[1024:2048]
    assert struct.unpack_from("<H", sb, 56)[0] == 0xEF53      # ext4's superblock magic


def test_timeout_kills_qemu_and_reports_the_console(kit):
    with pytest.raises(linux_kit.KitError, match="timed out") as e:
        linux_kit.run_tcg(kit, "echo waiting\nsleep 600", timeout=10)
    assert "KIT-BEGIN" in e.value.console and "waiting" in e.value.console
    assert "KIT-EXIT" not in e.value.console


def test_command_line_limit_is_enforced(kit):
    import os
    noise = os.urandom(3000).hex()   # does not compress
    with pytest.raises(linux_kit.KitError, match="command line is .* bytes"):
        linux_kit.qemu_command(kit, f"echo {noise}")


@pytest.fixture
def vhost_user_export(disk, tmp_path):
    """QEMU's storage daemon exporting ``disk`` as vhost-user-blk on a unix socket."""
    import shutil
    import subprocess
    import time
    qsd = shutil.which("qemu-storage-daemon")
    assert qsd, "qemu-storage-daemon is missing: the Makefile installs qemu-system-x86"
    sock = tmp_path / "vu.sock"
    proc = subprocess.Popen(
        [qsd, "--blockdev", f"driver=file,node-name=f,filename={disk}",
         "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                     "writable=on"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "qemu-storage-daemon did not create its socket"
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(timeout=20)


def test_vhost_user_blk_front_end_with_shared_memory(kit, disk, vhost_user_export):
    """The set-up a vhost-user back-end gets: guest RAM in a shared memfd, QEMU's
    vhost-user-blk-pci on a socket (here served by qemu-storage-daemon)."""
    script = ("cat /sys/block/vda/size\n"
              "fio --name=kit --filename=/dev/vda --direct=1 --ioengine=io_uring --rw=randwrite "
              "--bs=4k --iodepth=32 --size=8m --verify=crc32c --verify_fatal=1 "
              "--output-format=json")
    r = linux_kit.run_tcg(kit, script, shared_mem=True, timeout=240, qemu_args=[
        "-chardev", f"socket,id=vu,path={vhost_user_export},reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=vu"])
    assert r.rc == 0, r.console[-3000:]
    assert int(r.output.split("\n")[0]) * 512 == 64 * MiB
    job = fio_json(r.output)["jobs"][0]
    assert job["error"] == 0 and job["read"]["io_bytes"] == 8 * MiB
    data = disk.read_bytes()[:8 * MiB]
    assert sum(data[o:o + 2] == b"\xca\xac" for o in range(0, len(data), 4096)) == 2048
