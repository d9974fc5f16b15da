"""blkdebug and the per-request trace with the workload guest under KVM, on the
Python path and the C path: the same rule fails the same request on both, the
trace has one line per request with the rule that fired, and a qcow2
metadata write failing leaves an image qemu-img finds consistent."""
import json
import subprocess

import pytest

pytestmark = pytest.mark.kvm


def run_fio(pykvm, disk, *args):
    r = pykvm("fio", "--disk", disk, "--output-format", "json", *args, timeout=180)
    doc = json.loads(r.stdout)
    return r, doc["jobs"][0], doc.get("pykvm", {}).get("device", {})


def test_error_on_the_fifth_write_is_the_same_request_on_both_paths(pykvm, tmp_path):
    rules = tmp_path / "r.conf"
    rules.write_text('[fault]\nop = "write"\nnth = "5"\naction = "error"\nerrno = "EIO"\n')
    sectors = {}
    for aio in ("python", "io_uring"):
        img = tmp_path / f"d-{aio}.raw"
        img.write_bytes(bytes(8 << 20))
        trace = tmp_path / f"t-{aio}.jsonl"
        r, job, dev = run_fio(pykvm, f"file=blkdebug:{rules}:{img},format=raw,aio={aio},"
                              f"trace={trace}", "--rw", "randwrite", "--bs", "4k", "--size",
                              "4M", "--iodepth", "4", "--ios", "300", "--seed", "11")
        assert dev["injected"] == 1 and dev["errors"] == 1, r.stderr
        records = [json.loads(line) for line in trace.read_text().splitlines()]
        assert len(records) == dev["requests"]      # one line a request
        failed = [x for x in records if x["status"] != "ok"]
        assert len(failed) == 1 and failed[0]["rule"] == 0 and failed[0]["op"] == "write"
        assert failed[0]["path"] == ("python" if aio == "python" else "c")
        writes = sorted((x for x in records if x["op"] == "write"), key=lambda x: x["submit_ns"])
        assert writes[4] == failed[0]               # the 5th write the device took
        assert all(x["rule"] is None for x in records if x is not failed[0])
        sectors[aio] = failed[0]["sector"]
        summary = pykvm("trace", "summary", str(trace), "--output-format", "json")
        s = json.loads(summary.stdout)
        assert s["requests"] == len(records) and s["ops"]["write"]["errors"] == 1
    assert sectors["python"] == sectors["io_uring"]     # the seeded stream's same request


def test_l2_update_error_in_a_running_guest_leaves_qcow2_consistent(pykvm, tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    rules = tmp_path / "r.conf"
    rules.write_text('[inject-error]\nevent = "l2_update"\nerrno = "5"\nonce = "on"\n')
    r, job, dev = run_fio(pykvm, f"file=blkdebug:{rules}:{img},aio=io_uring", "--rw",
                          "randwrite", "--bs", "4k", "--size", "8M", "--iodepth", "8", "--ios",
                          "400")
    assert dev["errors"] == 1, r.stderr
    assert b"l2_update write" in r.stderr and b"(injected)" in r.stderr
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode in (0, 3), check.stdout + check.stderr       # leaks at most
    assert "ERROR" not in check.stdout


def test_a_bad_rules_file_is_one_line_and_the_guest_never_starts(pykvm, tmp_path):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(1 << 20))
    rules = tmp_path / "r.conf"
    rules.write_text("[fault]\naction = error\nprobability = 2\n")
    r = pykvm("fio", "--disk", f"file=blkdebug:{rules}:{img},format=raw", "--ios", "10",
              timeout=60)
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and len(err.splitlines()) == 1, err
    assert f"{rules}:3" in err and "probability" in err


@pytest.mark.parametrize("aio", ["python", "io_uring"])
@pytest.mark.parametrize("keep", ["flushed", "all"])
def test_a_power_cut_rule_stops_the_vm_and_leaves_a_crash_state(pykvm, tmp_path, aio, keep):
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(8 << 20))
    rules = tmp_path / "r.conf"
    rules.write_text(f'[fault]\nop = "write"\nnth = "100"\naction = "power-cut"\n'
                     f'keep = "{keep}"\n')
    r = pykvm("fio", "--disk", f"driver=volatile,file.driver=raw,file.file=blkdebug:{rules}:{img},"
              f"aio={aio}", "--rw", "randwrite", "--ios", "1000", "--iodepth", "8", "--size",
              "4M", timeout=120)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and err[-1].startswith("pykvm: ") and "power cut" in err[-1]
    data = img.read_bytes()
    written = sum(data[i:i + 4096] != bytes(4096) for i in range(0, 4 << 20, 4096))
    if keep == "flushed":
        assert written == 0                 # the guest never flushed: all of it was volatile
    else:
        assert 90 <= written <= 99          # the 99 before the cut (some may overlap)
