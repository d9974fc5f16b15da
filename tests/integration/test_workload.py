"""The workload guest against our virtio-blk, over MMIO and PCI: every rw mode with
verification, the disk's contents checked from the host, the fio output formats, and
the same guest under QEMU (which proves the guest's driver is a standard one)."""
import json
import re
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.kvm

CHECK_DISK = ROOT / "guest" / "tools" / "check_disk.py"
SIZE = 4 << 20


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(16 << 20)
    return p


def fio(pykvm, image, transport, *args, cache="writeback"):
    r = pykvm("fio", "--disk", f"file={image},transport={transport},cache={cache}",
              "--output-format", "json", *args, timeout=180)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    doc = json.loads(r.stdout)
    job = doc["jobs"][0]
    assert job["error"] == 0 and job["verify_errors"] == 0
    job["device"] = doc.get("pykvm", {}).get("device", {})   # the device's counters
    return job


def check_disk(image, *args):
    r = subprocess.run([sys.executable, str(CHECK_DISK), str(image), *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("transport", ["mmio", "pci"])
@pytest.mark.parametrize("rw", ["read", "write", "randread", "randwrite", "randrw"])
def test_every_mode_verifies(pykvm, image, transport, rw):
    # Fill the range first so that reads meet written blocks, then run the mode.
    fio(pykvm, image, transport, "--rw", "write", "--bs", "4k", "--size", str(SIZE),
        "--ios", str(SIZE // 4096), "--iodepth", "16")
    job = fio(pykvm, image, transport, "--rw", rw, "--bs", "4k", "--size", str(SIZE),
              "--iodepth", "8", "--ios", "1500", "--seed", "3", "--verify", "crc32c")
    total = job["read"]["total_ios"] + job["write"]["total_ios"]
    assert total == 1500
    if rw in ("read", "randread"):
        assert job["write"]["total_ios"] == 0 and job["read"]["io_bytes"] == 1500 * 4096
    if rw in ("write", "randwrite"):
        assert job["read"]["total_ios"] == 0
    if rw == "randrw":
        assert 500 < job["read"]["total_ios"] < 1000  # rwmixread=50


@pytest.mark.parametrize("transport,cache", [("mmio", "writeback"), ("pci", "none")])
def test_disk_holds_what_the_host_computes(pykvm, image, transport, cache):
    fio(pykvm, image, transport, "--rw", "randwrite", "--bs", "8k", "--size", str(SIZE),
        "--offset", "1M", "--iodepth", "32", "--ios", "3000", "--seed", "7", cache=cache)
    out = check_disk(image, "--rw", "randwrite", "--bs", 8192, "--size", SIZE, "--offset",
                     1 << 20, "--seed", 7, "--ios", 3000, "--zero-unwritten")
    assert out.startswith("ok:")


def test_fio_json_follows_fios_schema(pykvm, image):
    job = fio(pykvm, image, "mmio", "--rw", "randrw", "--bs", "4k", "--iodepth", "4",
              "--ios", "400")
    for d in ("read", "write"):
        side = job[d]
        for key in ("iops", "bw_bytes", "io_bytes", "total_ios", "runtime"):
            assert key in side
        lat = side["lat_ns"]
        assert lat["min"] <= lat["mean"] <= lat["max"]
        pct = lat["percentile"]
        assert list(pct) == sorted(pct, key=float) and "99.000000" in pct
        assert pct["50.000000"] <= pct["99.000000"]
    assert job["read"]["total_ios"] + job["write"]["total_ios"] == 400


def test_fio_normal_output(pykvm, image):
    r = pykvm("fio", "--disk", str(image), "--rw", "randread", "--ios", "200", "--iodepth", "2")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert "rw=randread, bs=(R) 4096B-4096B" in out
    assert "  read: IOPS=" in out and "clat percentiles (usec):" in out
    assert "verify: errors=0" in out


def test_fio_usage_errors(pykvm, image):
    for args in (["--disk", f"file={image},cache=sometimes"], ["--disk", str(image), "--bs", "100"],
                 ["--disk", str(image), "--iodepth", "0"],
                 ["--disk", str(image), "--runtime", "0.0001"],
                 ["--disk", f"file={image},irq-coalesce-ns=soon"],
                 ["--disk", f"file={image},poll-max-ns=-1"],
                 ["--disk", f"file={image},queues=0"], ["--disk", f"file={image},queues=17"],
                 ["--disk", f"file={image},iothread=vcpu"],
                 ["--disk", str(image), "--queues", "0"],
                 ["--disk", str(image), "--queues", "17", "--iodepth", "32"],
                 ["--disk", str(image), "--queues", "4", "--iodepth", "2"],
                 ["--disk", str(image), "--rw", "write", "--no-refill", "--verify", "crc32c"]):
        r = pykvm("fio", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr.decode()


def test_fractional_runtime(pykvm, image):
    """--runtime takes seconds to the millisecond, and the guest keeps to it."""
    job = fio(pykvm, image, "mmio", "--rw", "randread", "--runtime", "0.25")
    assert 250 <= job["read"]["runtime"] < 1000, job["read"]["runtime"]
    assert job["read"]["total_ios"] > 0


def test_guest_refuses_bad_runtimes(pykvm, guest, image):
    for bad in ("0", "0.0001", "1.2345", "x", ".", "1e3", "-1", "99999999999999999999"):
        r = pykvm("run", guest("workload"), "--disk", str(image),
                  "--cmdline", f"rw=randread runtime={bad}", timeout=60)
        assert r.returncode == 2, (bad, r.stdout)
        assert b"bad value for runtime" in r.stdout, (bad, r.stdout)
    r = pykvm("run", guest("workload"), "--disk", str(image),
              "--cmdline", "rw=randread runtime=0.02", timeout=60)
    assert r.returncode == 0, r.stdout
    ns = int(re.search(rb" time_ns=(\d+) ", r.stdout).group(1))
    assert 20_000_000 <= ns < 500_000_000, ns


def test_no_refill_reuses_buffers_and_stamps_each_write(pykvm, image):
    """--no-refill: every block written carries its own offset and generation
    in its header, over data generated once per buffer."""
    job = fio(pykvm, image, "mmio", "--rw", "write", "--bs", "4k", "--size", str(SIZE),
              "--ios", str(SIZE // 4096), "--iodepth", "4", "--no-refill")
    assert job["write"]["total_ios"] == SIZE // 4096
    data = image.read_bytes()[:SIZE]
    bodies = set()
    for k in range(SIZE // 4096):
        block = data[k * 4096:(k + 1) * 4096]
        magic, _, off, gen = struct.unpack_from("<IIQQ", block)
        assert (magic, off, gen) == (0x42564B50, k * 4096, k)
        bodies.add(block[32:])
    assert len(bodies) <= 4   # one body per buffer: iodepth of them


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_hostile_guest_gets_errors_and_recovers(pykvm, guest, image, transport):
    r = pykvm("run", guest("hostile"), "--disk", f"file={image},transport={transport}",
              "--cmdline", f"transport={transport}", "--timeout", "120", timeout=180)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert "Traceback" not in err
    lines = [ln for ln in out.splitlines()
             if ln.startswith("hostile: ") and " recovered=" in ln]
    assert len(lines) >= 15, out
    for line in lines:
        assert "recovered=1" in line and "status=timeout" not in line, line
    assert r.returncode == 0, out[-2000:]
    outcome = {ln.split(":")[1].strip(): ln for ln in lines}
    assert "status=2 " in outcome["unknown_type"]          # UNSUPP
    for case in ("header_short", "len_unaligned", "sector_beyond_capacity", "sector_overflow",
                 "in_data_readonly"):
        assert "status=1 " in outcome[case] and "needs_reset=0" in outcome[case]  # IOERR
    for case in ("addr_outside_ram", "addr_len_wrap", "len_huge", "next_out_of_range",
                 "desc_loop", "head_out_of_range", "readable_after_writable", "nested_indirect",
                 "indirect_len_bad", "indirect_with_next", "indirect_outside_ram", "avail_ahead",
                 "no_status"):
        assert "needs_reset=1" in outcome[case], outcome[case]
    # every refused request or broken ring left one log line, none a crash
    assert err.count("pykvm: ") >= len(lines) // 2


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_completions_by_interrupt(pykvm, guest, image, transport):
    """irq=1: the guest sleeps on interrupts, delivered through an irqfd on the
    window's IOAPIC line (MMIO) or an MSI-X route (PCI)."""
    r = pykvm("run", guest("workload"), "--disk", f"file={image},transport={transport}",
              "--cmdline", f"transport={transport} rw=randrw bs=4k iodepth=8 ios=1000 irq=1 "
              "verify=crc32c", "--timeout", "120", timeout=180)
    out = r.stdout.decode()
    assert r.returncode == 0, out[-1500:] + r.stderr.decode()[-1500:]
    taken = int(re.search(r"^workload: interrupts taken (\d+)", out, re.M).group(1))
    assert taken > 0
    assert re.search(r" io_errors=0 verify_errors=0 ", out)


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_verify_on_qcow2_with_a_backing_file(pykvm, tmp_path, transport):
    """A raw base written by one run, a qcow2 overlay on it: writes go to the
    overlay (copy-on-write of partial clusters), reads see both, all verified;
    qemu-img then finds the overlay clean and the base untouched."""
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(16 << 20)
    fio(pykvm, base, transport, "--rw", "write", "--bs", "4k", "--size", str(SIZE),
        "--ios", str(SIZE // 4096), "--iodepth", "16", "--seed", "11")
    base_bytes = base.read_bytes()
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(overlay)], check=True)
    fio(pykvm, overlay, transport, "--rw", "randwrite", "--bs", "4k", "--size", str(SIZE),
        "--iodepth", "16", "--ios", "1500", "--seed", "12")
    job = fio(pykvm, overlay, transport, "--rw", "randread", "--bs", "4k", "--size", str(SIZE),
              "--iodepth", "16", "--ios", "3000", "--seed", "13", "--verify", "crc32c")
    assert job["read"]["total_ios"] == 3000
    assert subprocess.run(["qemu-img", "check", "-q", str(overlay)]).returncode == 0
    assert base.read_bytes() == base_bytes
    # what the guest wrote through the overlay is what the host computes
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(flat)], check=True)
    check_disk(flat, "--rw", "randwrite", "--bs", 4096, "--size", SIZE, "--seed", 12,
               "--ios", 1500)


@pytest.mark.parametrize("aio", ["io_uring", "threads"])
def test_verify_on_qcow2_with_a_backing_file_in_c(pykvm, tmp_path, aio):
    """The same on a C engine: allocated overlay clusters are served by the C
    thread from the driver's direct map (fewer punts than requests), the rest
    by Python; verified by the guest, checked by qemu-img and the host."""
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(16 << 20)
    fio(pykvm, base, "pci", "--rw", "write", "--bs", "4k", "--size", str(SIZE),
        "--ios", str(SIZE // 4096), "--iodepth", "16", "--seed", "11")
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(overlay)], check=True)
    disk = f"{overlay},aio={aio}"
    job = fio(pykvm, disk, "pci", "--rw", "randwrite", "--bs", "4k", "--size", str(SIZE),
              "--iodepth", "32", "--ios", "3000", "--seed", "12")
    dev = job["device"]
    assert dev["punts"] < dev["requests"], dev      # rewrites of allocated clusters: C
    job = fio(pykvm, disk, "pci", "--rw", "randrw", "--bs", "4k", "--size", str(SIZE),
              "--iodepth", "32", "--ios", "3000", "--seed", "13", "--verify", "crc32c")
    dev = job["device"]
    assert job["read"]["total_ios"] + job["write"]["total_ios"] == 3000
    assert dev["punts"] < dev["requests"] // 2, dev
    assert subprocess.run(["qemu-img", "check", "-q", str(overlay)]).returncode == 0


@pytest.mark.parametrize("transport", ["mmio", "pci"])
@pytest.mark.parametrize("iothread", ["device", "queue"])
def test_several_queues_write_what_one_queue_writes(pykvm, tmp_path, transport, iothread):
    """--queues 4 spreads the requests over four rings (one C thread each with
    iothread=queue); the stream, and so the disk, is the one a single queue
    writes, and a verified mixed run reads every block back."""
    disks = []
    for queues in (1, 4):
        img = tmp_path / f"q{queues}.img"
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        r = pykvm("fio", "--disk", f"file={img},transport={transport},iothread={iothread}",
                  "--output-format", "json", "--rw", "randrw", "--size", str(SIZE),
                  "--iodepth", "16", "--queues", str(queues), "--ios", "3000", "--seed", "7",
                  "--verify", "crc32c", timeout=180)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        doc = json.loads(r.stdout)
        job = doc["jobs"][0]
        assert job["error"] == 0 and job["verify_errors"] == 0
        assert job["job options"]["queues"] == str(queues)
        assert job["read"]["total_ios"] + job["write"]["total_ios"] == 3000
        assert doc["pykvm"]["device"]["requests"] >= 3000
        disks.append(img.read_bytes())
    assert disks[0] == disks[1]
    assert any(disks[0])


def test_guest_asks_for_more_queues_than_the_disk_has(pykvm, guest, image):
    for disk, why in ((str(image), b"does not offer VIRTIO_BLK_F_MQ"),
                      (f"file={image},queues=2", b"fewer queues than asked for")):
        r = pykvm("run", guest("workload"), "--disk", disk,
                  "--cmdline", "rw=randread queues=4 iodepth=8 ios=10", timeout=60)
        assert r.returncode == 2, r.stdout
        assert why in r.stdout, r.stdout


@pytest.mark.parametrize("aio", ["python", "io_uring"])
def test_raw_window_offset_and_size(pykvm, tmp_path, aio):
    """driver=raw,offset=,size= on both paths: the guest's disk is the window,
    what lies around it in the file is never touched."""
    img = tmp_path / "whole.img"
    img.write_bytes(b"\xee" * (16 << 20))
    disk = f"driver=raw,offset=4M,size=8M,file.filename={img},aio={aio},cache=none"
    for args in (["--rw", "write", "--ios", str((8 << 20) // 4096)],
                 ["--rw", "randrw", "--ios", "2000", "--seed", "5"]):
        r = pykvm("fio", "--disk", disk, "--output-format", "json", "--iodepth", "8",
                  "--verify", "crc32c", *args, timeout=180)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        job = json.loads(r.stdout)["jobs"][0]
        assert job["error"] == 0 and job["verify_errors"] == 0
    data = img.read_bytes()
    assert data[:4 << 20] == b"\xee" * (4 << 20) and data[12 << 20:] == b"\xee" * (4 << 20)
    assert b"\xee" * 512 not in data[4 << 20:12 << 20]     # every block of the window written
