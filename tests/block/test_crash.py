"""pykvm crashtest: crash states of a write log per flush epoch, checked by a
command, failures shrunk to a minimal write set, resumable."""
import json
import os
import subprocess
import sys

import pytest

from pykvm.aio import PythonEngine
from pykvm.block import BlockBackend
from pykvm.crash import EXHAUSTIVE, Crashtest, CrashtestError, states_of, Write

MiB = 1 << 20
# consistent unless block 12 holds 'b' while block 10 does not hold 'a'
CHECK = (f"{sys.executable} -c \"import sys; d = open(sys.argv[1], 'rb').read(); "
         f"sys.exit(1 if d[12*4096:12*4096+1] == b'b' and d[10*4096:10*4096+1] != b'a' "
         f"else 0)\" {{image}}")


def logged(tmp_path, writes_before_flush=5, after=((10, b"a"), (11, b"b"), (12, b"c"))):
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(8 * MiB))
    disk = tmp_path / "disk.raw"
    disk.write_bytes(base.read_bytes())
    be = BlockBackend({"driver": "blklogwrites", "file": {"driver": "raw", "file": str(disk)},
                       "log": str(tmp_path / "disk.log")}, engine=PythonEngine())
    t = 0
    for i in range(writes_before_flush):
        t += 1
        be.writev(t, i * 4096, [memoryview(bytearray(bytes([65 + i % 26]) * 4096))])
        be.drain()
    be.flush(1000)
    be.drain()
    for block, byte in after:
        t += 1
        be.writev(t, block * 4096, [memoryview(bytearray(byte * 8192))])
        be.drain()
    be.close()
    return base, tmp_path / "disk.log"


def run(base, log, check=CHECK, **kw):
    t = Crashtest(str(base), str(log), check, **kw)
    try:
        return t.run()
    finally:
        t.close()


def test_every_subset_of_each_epoch_and_the_minimal_failing_write(tmp_path):
    base, log = logged(tmp_path)
    s = run(base, log)
    assert [(e["writes"], e["states"]) for e in s["epochs"]] == [(5, 32), (3, 8)]
    assert s["states"] == 40 and s["failures"] == 1
    f = s["failed"][0]
    assert f["epoch"] == 1 and f["minimal"] == [{"entry": 8, "sector": 88, "sectors": 16}]


def test_a_big_epoch_is_sampled_with_its_seed(tmp_path):
    base, log = logged(tmp_path, writes_before_flush=EXHAUSTIVE + 4, after=())
    a = run(base, log, check="true {image}", max_states=20, seed=1, resume=False)
    assert a["epochs"][0]["states"] == 20
    epoch = [Write(i, i * 4096, b"x" * 4096, 0) for i in range(16)]
    assert states_of(epoch, 20, 1, False) == states_of(epoch, 20, 1, False)
    assert states_of(epoch, 20, 1, False) != states_of(epoch, 20, 2, False)


def test_torn_states_tear_multi_sector_writes(tmp_path):
    base, log = logged(tmp_path)
    s = run(base, log, torn=True)
    torn = [f for f in s["failed"] if f["kind"] == "torn"]
    assert s["states"] > 40 and all(f["torn"] for f in torn)


def test_parallel_jobs_agree(tmp_path):
    base, log = logged(tmp_path)
    one = run(base, log, resume=False)
    two = run(base, log, jobs=2, resume=False)
    assert (one["states"], one["failures"], one["failed"][0]["minimal"]) == \
        (two["states"], two["failures"], two["failed"][0]["minimal"])


def test_an_interrupted_run_resumes(tmp_path):
    base, log = logged(tmp_path)
    counter = tmp_path / "count"
    check = f"echo x >> {counter}; " + CHECK
    run(base, log, check=check)
    first = counter.read_text().count("x")
    run(base, log, check=check)                   # everything was checked: only the shrink
    again = counter.read_text().count("x") - first
    assert first >= 40 and again < 10


def test_a_checker_that_hangs_is_a_failure_with_its_reason(tmp_path):
    base, log = logged(tmp_path, writes_before_flush=1, after=())
    s = run(base, log, check="sleep 5; true {image}", check_timeout=0.3, resume=False)
    assert s["failures"] == s["states"] == 3        # 2 states, and the empty last epoch
    assert s["failed"][0]["why"].startswith("timeout")


def test_a_qcow2_base(tmp_path):
    base, log = logged(tmp_path)
    q = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(base), str(q)], check=True)
    assert run(q, log)["failures"] == 1


@pytest.mark.parametrize("what, words", [
    ("log", "truncated write log"),
    ("base", "past the end of the base image"),
    ("check", "{image}"),
])
def test_bad_input_is_one_line(tmp_path, what, words):
    base, log = logged(tmp_path)
    check = CHECK
    if what == "log":
        log.write_bytes(log.read_bytes()[:10])
    elif what == "base":
        base.write_bytes(bytes(16384))
    else:
        check = "true"
    with pytest.raises(CrashtestError) as e:
        run(base, log, check=check)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_cli_json(tmp_path):
    base, log = logged(tmp_path)
    p = subprocess.run([sys.executable, "-m", "pykvm", "crashtest", "--base", str(base), "--log",
                        str(log), "--check", CHECK, "--json", "--no-resume"],
                       capture_output=True, text=True)
    s = json.loads(p.stdout)
    assert p.returncode == 1 and s["states"] == 40 and s["failures"] == 1
    assert s["failed"][0]["minimal"][0]["entry"] == 8
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".crash-state")]
