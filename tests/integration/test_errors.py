"""Every failure a user can hit: one clear line on stderr, a non-zero status, no traceback."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.elf import SPIN, code_elf, make_elf
from tests.conftest import ROOT

pytestmark = pytest.mark.kvm


def one_line(r) -> str:
    err = r.stderr.decode()
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("content,message", [
    (os.urandom(4096), "not an ELF file nor a Linux bzImage"),
    (make_elf([(0x100000, b"\xf4", 1)], None), "no PVH entry note"),
    (code_elf(b"\xf4", base=0x20000000), "lies outside guest RAM"),
])
def test_bad_kernels(pykvm, tmp_path, content, message):
    p = tmp_path / "kernel"
    p.write_bytes(content)
    r = pykvm("run", p, "--mem", "256M")
    assert r.returncode == 1
    line = one_line(r)
    assert line.startswith(f"pykvm: {p}: ") and message in line


def test_missing_kernel(pykvm, tmp_path):
    r = pykvm("run", tmp_path / "nope.elf")
    assert r.returncode == 1
    assert "No such file or directory" in one_line(r)


@pytest.mark.parametrize("args", [["--mem", "1M"], ["--mem", "lots"], ["--timeout", "-1"],
                                  ["--cpus", "0"], ["--trace", "everything"]])
def test_usage_errors_exit_2(pykvm, guest, args):
    r = pykvm("run", guest("hello"), *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr.decode()


def test_timeout_stops_a_spinning_guest(pykvm, tmp_path):
    p = tmp_path / "spin.elf"
    p.write_bytes(code_elf(SPIN))
    r = pykvm("run", p, "--timeout", "1", timeout=30)
    assert r.returncode == 124
    assert one_line(r) == "pykvm: guest did not stop within 1 s"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to drop to an unprivileged user")
def test_no_permission_on_dev_kvm(guest):
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is world-accessible here")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "pykvm", "run", str(guest("hello"))],
                       capture_output=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1
    assert one_line(r) == ("pykvm: /dev/kvm: permission denied (add yourself to the 'kvm' group "
                           "or run as root)")


def test_missing_dev_kvm_message():
    from pykvm.errors import KvmUnavailable
    from pykvm.kvm import Kvm
    with pytest.raises(KvmUnavailable, match="does not exist: KVM is not available"):
        Kvm("/nonexistent/kvm")


def test_missing_capability_is_named(monkeypatch):
    from pykvm.errors import MissingCapability
    from pykvm.kvm import Kvm, lib
    kvm = Kvm()
    try:
        real = kvm.check_extension
        monkeypatch.setattr(kvm, "check_extension",
                            lambda cap: 0 if cap == lib.KVM_CAP_IRQFD else real(cap))
        kvm.require("KVM_CAP_USER_MEMORY", why="running a guest")
        with pytest.raises(MissingCapability, match="KVM lacks capability KVM_CAP_IRQFD, needed "
                                                    "for device notifications"):
            kvm.require("KVM_CAP_USER_MEMORY", "KVM_CAP_IRQFD", why="device notifications")
    finally:
        kvm.close()
