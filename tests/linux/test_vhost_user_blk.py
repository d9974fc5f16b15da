"""A stock Linux kernel's virtio-blk driver, and real fio, against our device model.

QEMU (TCG) boots the Linux kit with guest RAM in a shared memfd and a
vhost-user-blk-pci device whose back-end is `pykvm serve`: Linux's driver
negotiates, sets up the queue and sends requests that our VirtioBlk and block
layer serve (C path by default, the Python path where asked). QEMU missing is
a failure: the Makefile installs it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import linux_kit

pytestmark = pytest.mark.qemu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20


@pytest.fixture(scope="module")
def kit():
    return linux_kit.kit()


class Serve:
    """`pykvm serve` as a process, its stderr in a file for the failure message."""

    def __init__(self, tmp_path, disk_spec: str, queues: int = 1):
        self.sock = str(tmp_path / "vu.sock")
        self.queues = queues
        self.log = tmp_path / "serve.log"
        self.spec = disk_spec
        self.proc = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pykvm", "serve", "--vhost-user-blk", self.sock,
                 "--disk", self.spec, "-v"], stderr=log, cwd=ROOT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, f"pykvm serve died: {self.log.read_text()}"
            assert time.monotonic() < deadline, "pykvm serve did not create its socket"
            time.sleep(0.02)

    def qemu_args(self) -> list[str]:
        return ["-chardev", f"socket,id=vu,path={self.sock},reconnect=1",
                "-device", f"vhost-user-blk-pci,chardev=vu,num-queues={self.queues}"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(10)
        return self.proc.returncode


def boot(kit, serve: Serve, script: str, timeout: float = 240,
         cpus: int = 1) -> linux_kit.Result:
    r = linux_kit.run_tcg(kit, script, qemu_args=serve.qemu_args(), shared_mem=True,
                          timeout=timeout, cpus=cpus)
    assert r.rc == 0, (f"guest script failed ({r.rc}):\n{r.console[-3000:]}\n"
                       f"pykvm serve:\n{serve.log.read_text()[-2000:]}")
    return r


def raw_disk(tmp_path, size=64 * MiB):
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def qcow2_with_backing(tmp_path, size=64 * MiB):
    """A qcow2 overlay on a raw backing file whose every MiB holds a pattern."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        for i in range(size // MiB):
            f.write(bytes([i & 0xFF]) * MiB)
    overlay = tmp_path / "disk.qcow2"
    subprocess.run([sys.executable, "-m", "pykvm", "img", "create", "-f", "qcow2",
                    "-b", "base.raw", "-F", "raw", str(overlay)], check=True, cwd=ROOT)
    return overlay


def qemu_img_check(disk, allowed=(0,)) -> None:
    """qemu-img check's verdict on a qcow2 image (0: clean, 3: leaked clusters only)."""
    chk = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert chk.returncode in allowed, chk.stdout + chk.stderr


def fio_jobs(output: str) -> list[dict]:
    """Every fio JSON document the script printed."""
    docs, depth, start = [], 0, None
    for i, ch in enumerate(output):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                docs.append(json.loads(output[start:i + 1]))
    return [job for d in docs for job in d["jobs"]]


FIO = ("fio --name={name} --filename=/dev/vda --direct=1 --ioengine={engine} --rw=randwrite "
       "--bs={bs} --iodepth=32 --size=16m --verify=crc32c --verify_fatal=1 --do_verify=1 "
       "--randseed={seed} --output-format=json || exit 1\n")


@pytest.mark.parametrize("image, aio", [("raw", "io_uring"), ("raw", "python"),
                                        ("qcow2-backing", "io_uring")])
def test_fio_verify_through_linux_virtio_blk(kit, tmp_path, image, aio):
    disk = raw_disk(tmp_path) if image == "raw" else qcow2_with_backing(tmp_path)
    serve = Serve(tmp_path, f"file={disk},aio={aio}")
    try:
        script = ("cat /sys/block/vda/size\n"
                  + FIO.format(name="libaio-4k", engine="libaio", bs="4k", seed=1)
                  + FIO.format(name="uring-4k", engine="io_uring", bs="4k", seed=2)
                  + FIO.format(name="uring-mixed", engine="io_uring", bs="4k-64k", seed=3))
        r = boot(kit, serve, script)
        assert int(r.output.split("\n")[0]) * 512 == 64 * MiB
        jobs = fio_jobs(r.output)
        assert [j["jobname"] for j in jobs] == ["libaio-4k", "uring-4k", "uring-mixed"]
        for j in jobs:
            assert j["error"] == 0
            # the verify pass read back all that was written (mixed sizes stop
            # short of 16 MiB once no free range fits the next block)
            assert j["read"]["io_bytes"] == j["write"]["io_bytes"] > 0
        assert jobs[0]["write"]["io_bytes"] == jobs[1]["write"]["io_bytes"] == 16 * MiB
        assert serve.stop() == 0
    finally:
        serve.proc.kill()
    if image == "qcow2-backing":
        qemu_img_check(disk)


@pytest.mark.parametrize("iothread", ["device", "queue"])
def test_two_queues_both_carry_requests(kit, tmp_path, iothread):
    """VIRTIO_BLK_F_MQ with a driver nobody here wrote: two vCPUs, two request
    queues, a fio verify job on each CPU; both queues' interrupts fire, and
    every block reads back as written."""
    disk = raw_disk(tmp_path)
    serve = Serve(tmp_path, f"file={disk},queues=2,iothread={iothread}", queues=2)
    try:
        job = ("fio --name=mq --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite "
               "--bs=4k --iodepth=16 --size=8m --numjobs=2 --offset_increment=8m "
               "--cpus_allowed=0,1 --cpus_allowed_policy=split --verify=crc32c "
               "--verify_fatal=1 --do_verify=1 --output-format=json || exit 1\n")
        r = boot(kit, serve, "ls -1 /sys/block/vda/mq\n" + job
                 + "grep virtio0-req /proc/interrupts\n", cpus=2)
        lines = r.output.splitlines()
        assert lines[:2] == ["0", "1"], r.output[:500]
        jobs = fio_jobs(r.output)
        assert len(jobs) == 2 and all(j["error"] == 0 for j in jobs)
        assert all(j["read"]["io_bytes"] == j["write"]["io_bytes"] == 8 * MiB for j in jobs)
        irqs = {line.split()[-1]: sum(int(x) for x in line.split()[1:3])
                for line in lines if "virtio0-req" in line}
        assert set(irqs) == {"virtio0-req.0", "virtio0-req.1"} and all(irqs.values()), irqs
        assert serve.stop() == 0
    finally:
        serve.proc.kill()


def test_ext4_survives_a_reboot(kit, tmp_path):
    disk = raw_disk(tmp_path)
    serve = Serve(tmp_path, f"file={disk}")
    try:
        boot(kit, serve, "mkfs.ext4 -q /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt &&\n"
                         "dd if=/dev/urandom of=/mnt/a bs=1M count=8 2>/dev/null &&\n"
                         "echo hello > /mnt/b && md5sum /mnt/a /mnt/b > /mnt/sums &&\n"
                         "sync && umount /mnt\n")
        r = boot(kit, serve, "fsck.ext4 -n /dev/vda || exit 1\nmkdir -p /mnt\n"
                             "mount -o ro /dev/vda /mnt && cd /mnt && md5sum -c sums\n")
        assert "a: OK" in r.output and "b: OK" in r.output
        assert serve.stop() == 0
    finally:
        serve.proc.kill()


def allocated(disk) -> int:
    """Bytes of the image that hold data; read while pykvm serve has it open,
    which its image locks allow only with -U (force-share), as QEMU's do."""
    if str(disk).endswith(".qcow2"):
        out = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(disk)],
                             capture_output=True, text=True, check=True).stdout
        return sum(e["length"] for e in json.loads(out) if e["data"] and e["depth"] == 0)
    return os.stat(disk).st_blocks * 512


@pytest.mark.parametrize("image", ["raw", "qcow2"])
def test_thin_provisioning_fstrim_gives_space_back(kit, tmp_path, image):
    """The talk's demo: write 200 MiB of files, delete them, fstrim: the image
    shrinks by at least 90% of what was written."""
    if image == "raw":
        disk = raw_disk(tmp_path, 512 * MiB)
    else:
        disk = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "512M"], check=True)
    serve = Serve(tmp_path, f"file={disk}")
    try:
        boot(kit, serve, "mkfs.ext4 -q -E nodiscard /dev/vda && mkdir -p /mnt &&\n"
                         "mount /dev/vda /mnt && for i in 1 2 3 4; do\n"
                         "dd if=/dev/urandom of=/mnt/f$i bs=1M count=50 2>/dev/null || exit 1\n"
                         "done && sync && umount /mnt\n", timeout=400)
        full = allocated(disk)
        boot(kit, serve, "mkdir -p /mnt && mount /dev/vda /mnt && rm /mnt/f* && sync &&\n"
                         "fstrim -v /mnt && umount /mnt\n")
        trimmed = allocated(disk)
        assert full - trimmed >= 0.9 * 200 * MiB, (full, trimmed)
        assert serve.stop() == 0
    finally:
        serve.proc.kill()
    if image == "qcow2":
        qemu_img_check(disk)


@pytest.mark.parametrize("image, cache", [("raw", "writethrough"), ("qcow2", "writeback")])
def test_sigkill_and_restart_loses_no_completed_write(kit, tmp_path, image, cache):
    """`pykvm serve` is killed with SIGKILL while the guest writes, and started
    again: QEMU reconnects, the guest's I/O resumes, and fio's verify pass finds
    every block it saw completed (qcow2 metadata included, in writeback mode).
    With writethrough each write waits for its flush, so the kill lands with
    requests in flight, which the new process serves again."""
    if image == "raw":
        disk = raw_disk(tmp_path)
    else:
        disk = tmp_path / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    serve = Serve(tmp_path, f"file={disk},cache={cache}")
    result = {}

    def guest():
        try:
            result["r"] = linux_kit.run_tcg(
                kit, "fio --name=kill --filename=/dev/vda --direct=1 --ioengine=libaio "
                     "--rw=randwrite --bs=4k --iodepth=32 --size=48m --verify=crc32c "
                     "--verify_fatal=1 --do_verify=1 --output-format=json || exit 1\n",
                qemu_args=serve.qemu_args(), shared_mem=True, timeout=300)
        except Exception as e:  # reported below
            result["e"] = e

    t = threading.Thread(target=guest)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while allocated(disk) < 8 * MiB:            # the guest is writing
            assert t.is_alive(), result
            assert time.monotonic() < deadline, "the guest never started writing"
            time.sleep(0.05)
        serve.proc.kill()
        serve.proc.wait()
        time.sleep(0.5)
        serve.start()
        t.join(300)
        assert not t.is_alive()
        assert "e" not in result, result.get("e")
        r = result["r"]
        assert r.rc == 0, (f"{r.console[-3000:]}\npykvm serve:\n{serve.log.read_text()[-2000:]}")
        job = fio_jobs(r.output)[0]
        assert job["error"] == 0 and job["read"]["io_bytes"] >= 48 * MiB
        log = serve.log.read_text()
        assert log.count("front-end connected") >= 2, log
        assert serve.stop() == 0
    finally:
        serve.proc.kill()
        t.join(5)
    if image == "qcow2":
        qemu_img_check(disk, allowed=(0, 3))  # leaked clusters at most
