"""The test guests build deterministically: a second build, elsewhere, is byte-identical."""
import subprocess

from tests.conftest import GUEST_BUILD, ROOT


def test_guest_build_is_reproducible(tmp_path):
    built = sorted(GUEST_BUILD.glob("*.elf"))
    assert len(built) >= 8, "run 'make guests' first"
    out = tmp_path / "build"
    r = subprocess.run(["make", "-s", "-C", str(ROOT / "guest"), f"BUILD={out}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for elf in built:
        again = out / elf.name
        assert again.read_bytes() == elf.read_bytes(), f"{elf.name} differs between builds"
