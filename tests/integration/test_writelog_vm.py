"""blklogwrites under KVM: the workload guest's writes, logged on the Python
path and with the C path serving reads (writes are punted while a log is
kept), replay onto the disk as it was before the run to the disk after it."""
import json

import pytest

from pykvm.block import writelog

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("aio", ["python", "io_uring"])
def test_replaying_the_log_rebuilds_the_disk(pykvm, tmp_path, aio):
    before = bytes(range(256)) * (16 << 12)          # 16 MiB of a pattern
    img, base, log = tmp_path / "d.raw", tmp_path / "base.raw", tmp_path / "d.log"
    img.write_bytes(before)
    base.write_bytes(before)
    r = pykvm("fio", "--disk", f"driver=blklogwrites,file.driver=raw,file.file.filename={img},"
              f"log={log},aio={aio}", "--rw", "randrw", "--bs", "4k", "--iodepth", "8",
              "--ios", "600", "--size", "8M", "--output-format", "json", timeout=180)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    dev = json.loads(r.stdout)["pykvm"]["device"]
    info = writelog.info(str(log))
    assert info["writes"] == json.loads(r.stdout)["jobs"][0]["write"]["total_ios"] > 0
    assert info["marks"][-1]["name"] == writelog.END_MARK
    if aio != "python":
        assert dev["punts"] == info["writes"]        # writes to Python, reads in C
    writelog.replay(str(log), str(base))
    assert base.read_bytes() == img.read_bytes()
