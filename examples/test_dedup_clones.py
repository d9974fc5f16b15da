"""The talk's last slide, measured: ten overlays cloned from one base image,
each booted and written by the workload guest (it rewrites the base's 8 MiB as
they were, as a reinstall would, and writes 2 MiB of its own), then
`pykvm img dedup --chain` on each: what a clone shares with its base is given
back, qemu-img still checks and reads the same data."""
import json
import os
import subprocess
import sys

MiB = 1 << 20


def host_bytes(paths):
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def img(*args):
    p = subprocess.run([sys.executable, "-m", "pykvm", "img", *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_ten_clones_give_back_what_they_share_with_the_base(vm, image, tmp_path):
    base = image("qcow2", "32M")
    vm(base).fio(rw="write", bs="64k", size="8M", ios=128, seed=1)
    clones = [image("qcow2", None, backing=base) for _ in range(10)]
    for k, clone in enumerate(clones):
        vm(clone).fio(rw="write", bs="64k", size="8M", ios=128, seed=1)
        vm(clone).fio(rw="write", bs="64k", offset="8M", size="2M", ios=32, seed=k + 2)
    subprocess.run(["qemu-img", "convert", "-O", "raw", clones[3], tmp_path / "before.raw"],
                   check=True)
    before = host_bytes(clones)
    for clone in clones:
        img("dedup", "--chain", clone)
    after = host_bytes(clones)
    print(f"10 clones: {before / MiB:.1f} MiB on the host before, {after / MiB:.1f} MiB after")
    assert before >= 100 * MiB and after <= 25 * MiB
    for clone in clones:
        assert subprocess.run(["qemu-img", "check", "-q", clone]).returncode == 0
    assert subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", clones[3],
                           tmp_path / "before.raw"]).returncode == 0
    info = json.loads(img("info", "--output", "json", clones[3]))
    assert os.path.basename(info["backing-filename"]) == os.path.basename(base) and \
        info["actual-size"] <= 3 * MiB
