"""pykvm img amend against qemu-img amend: the same changes and refusals;
after each, qemu-img check is clean, the content is what a copy made before
holds, and qemu-img info shows the change. A refcount width change is cut
at every write and at random subsets of each flush epoch."""
import json
import os
import random
import shutil

import pytest

from pykvm.block.driver import BlockError
from pykvm.block.qcow2 import Qcow2Driver

from .conftest import assert_clean, img, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu



def make(tmp_path, opts="", size="32M", backing=None, snapshot=True, name="a.qcow2"):
    """Data, zero clusters (plain and allocated), a snapshot taken and
    overwritten after, so clusters and L2 tables are shared."""
    p = tmp_path / name
    args = ["create", "-f", "qcow2"] + (["-o", opts] if opts else [])
    if backing:
        args += ["-b", backing, "-F", "raw"]
    qemu_img(*args, p, size)
    qemu_io(p, "write -P 0x11 0 1M", "write -z 2M 256k", "write -P 0x22 5M 64k",
            "write -P 0x23 6M 64k", "write -z 6M 64k")
    if snapshot:
        qemu_img("snapshot", "-c", "s1", p)
        qemu_io(p, "write -P 0x33 0 64k", "write -z 5M 64k", "write -z -u 8M 128k")
    return p


def fmt_specific(p):
    return json.loads(qemu_img("info", "--output=json", p).stdout)["format-specific"]["data"]


CASES = [("", "refcount_bits=1", False), ("", "refcount_bits=64", True),
         ("cluster_size=512", "refcount_bits=64", True), ("cluster_size=4k", "refcount_bits=2",
                                                          True),
         ("refcount_bits=64", "refcount_bits=8", True), ("", "lazy_refcounts=on", True),
         ("lazy_refcounts=on", "lazy_refcounts=off", True), ("", "compat=0.10", True),
         ("lazy_refcounts=on", "compat=0.10", True),
         ("refcount_bits=8", "compat=0.10,refcount_bits=16", True),
         ("compression_type=zstd", "compat=0.10", True),
         ("compat=0.10", "compat=1.1", True),
         ("compat=0.10", "compat=1.1,refcount_bits=4,lazy_refcounts=on", True),
         ("", "size=64M", False), ("", "compat=1.1", True)]


@pytest.mark.parametrize("create,amend,snapshot", CASES)
def test_amend_matches_qemu(tmp_path, capsys, create, amend, snapshot):
    p = make(tmp_path, create, snapshot=snapshot)
    before = tmp_path / "before.qcow2"
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(p, before)
    shutil.copyfile(p, theirs)
    qemu_img("amend", "-o", amend, theirs)
    rc, out, err = img(capsys, "amend", "-o", amend, p)
    assert rc == 0, err
    assert out == "" and err == ""
    assert_clean(p)
    qemu_img("compare", before, p)
    ours = fmt_specific(p)
    assert ours == fmt_specific(theirs)
    want = dict(x.split("=") for x in amend.split(","))
    if "refcount_bits" in want:
        assert ours["refcount-bits"] == int(want["refcount_bits"])
    if "compat" in want:
        assert ours["compat"] == want["compat"]
    if "lazy_refcounts" in want:
        assert ours["lazy-refcounts"] == (want["lazy_refcounts"] == "on")
    if "size" in want:
        assert json.loads(qemu_img("info", "--output=json", p).stdout)["virtual-size"] == \
            64 << 20
    # and it takes writes after: qemu-io's, then ours
    qemu_io(p, "write -P 0x44 3M 200k", "write -z 0 64k")
    assert_clean(p)
    qemu_img("snapshot", "-l", p)


def test_downgrade_over_a_backing_file_keeps_zeroes(tmp_path, capsys):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x77" * (32 << 20))
    p = make(tmp_path, backing="base.raw")
    before = tmp_path / "before.qcow2"
    shutil.copyfile(p, before)
    rc, _, err = img(capsys, "amend", "-o", "compat=0.10", p)
    assert rc == 0, err
    assert fmt_specific(p)["compat"] == "0.10"
    assert_clean(p)
    qemu_img("compare", before, p)
    for name in ("s1",):                       # the snapshot reads as it did
        a, b = tmp_path / "a.raw", tmp_path / "b.raw"
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", before, a)
        qemu_img("convert", "-l", f"snapshot.name={name}", "-O", "raw", p, b)
        assert a.read_bytes() == b.read_bytes()


def _compressed(tmp_path):
    p = tmp_path / "z.qcow2"
    raw = tmp_path / "z.raw"
    raw.write_bytes(b"\x5a" * (1 << 20))
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, p)
    return p


def _resized_snapshot(tmp_path):
    p = make(tmp_path, name="r.qcow2")
    qemu_img("resize", p, "64M")
    return p


@pytest.mark.parametrize("create,amend,want", [
    ("extended_l2=on", "compat=0.10", "incompatible features 0x10"),
    ("refcount_bits=8", "compat=0.10", "requires refcount_bits=16"),
    ("data_file=d.raw", "compat=0.10", "data file"),
    ("RESIZED", "compat=0.10", "snapshots prevent downgrade"),
    ("ZSTD", "compat=0.10", "compressed clusters"),
    ("", "refcount_bits=1", "refcount of 2"),
    ("", "refcount_bits=3", "power of two"),
    ("", "compat=1.2", "compatibility level"),
    ("", "compat=0.10,lazy_refcounts=on", "lazy refcounts need compat=1.1"),
    ("", "compat=0.10,refcount_bits=8", "compat=1.1"),
    ("", "cluster_size=4k", "when the image is created"),
    ("", "preallocation=full", "when the image is created"),
    ("", "extended_l2=on", "when the image is created"),
    ("", "compression_type=zstd", "when the image is created"),
    ("", "foo=1", "invalid option 'foo'"),
    ("", "backing_file=x.raw", "cannot amend the backing file"),
    ("", "backing_fmt=raw", "cannot amend the backing file"),
    ("", "data_file=x.raw", "external data file"),
    ("", "data_file_raw=on", "cannot be set on existing images"),
    ("", "lazy_refcounts=maybe", "expected on or off"),
])
def test_refusals_match_qemu_and_change_nothing(tmp_path, capsys, create, amend, want):
    if create == "ZSTD":
        p = _compressed(tmp_path)
    elif create == "RESIZED":
        p = _resized_snapshot(tmp_path)
    else:
        if "data_file" in create:
            create = f"data_file={tmp_path / 'd.raw'}"
        p = make(tmp_path, create, snapshot="data_file" not in create and
                 "extended_l2" not in create)
    before = p.read_bytes()
    theirs = qemu_img("amend", "-o", amend, p, check=False)
    assert theirs.returncode == 1, theirs.stderr
    assert p.read_bytes() == before
    rc, out, err = img(capsys, "amend", "-o", amend, p)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and want in err, err
    assert p.read_bytes() == before


@pytest.mark.parametrize("argv,want", [
    (["IMG"], "options must be given"),
    (["-f", "raw", "-o", "compat=1.1", "RAW"], "does not support option amendment"),
    (["-o", "compat=1.1", "RAW"], "does not support option amendment"),
    (["-o", "compat=1.1", "NOSUCH"], "No such file"),
])
def test_usage_errors(tmp_path, capsys, argv, want):
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(1 << 20))
    p = make(tmp_path, snapshot=False)
    argv = [str(p) if a == "IMG" else str(raw) if a == "RAW" else
            str(tmp_path / "nosuch") if a == "NOSUCH" else a for a in argv]
    assert qemu_img("amend", *argv, check=False).returncode == 1
    rc, out, err = img(capsys, "amend", *argv)
    assert rc == 1 and err.count("\n") == 1 and want in err, err


def test_progress(tmp_path, capsys):
    p = make(tmp_path)
    rc, out, err = img(capsys, "amend", "-p", "-o", "refcount_bits=64", p)
    assert rc == 0, err
    assert "(100.00/100%)" in out
    assert_clean(p)


# -- crash safety of a new refcount width -----------------------------------------------

def _cut_ok(state, before):
    r = qemu_img("check", "--output=json", state, check=False)
    assert r.returncode in (0, 3), f"after a cut: rc={r.returncode} {r.stdout}{r.stderr}"
    assert json.loads(r.stdout).get("corruptions", 0) == 0
    qemu_img("compare", before, state)


@pytest.mark.parametrize("opts,amend", [("cluster_size=4k", "refcount_bits=64"),
                                        ("", "refcount_bits=2"),
                                        ("", "compat=0.10")])
def test_crash_after_every_metadata_write(tmp_path, capsys, monkeypatch, opts, amend):
    """The amend fails at its Nth metadata write, for every N: qemu-img check
    finds leaks at most, and the content is unchanged."""
    p = make(tmp_path, opts, backing=None)
    before = tmp_path / "before.qcow2"
    shutil.copyfile(p, before)
    calls = []
    real = Qcow2Driver._meta_write

    def counting(self, *a, **k):
        calls.append(a[0])
        return real(self, *a, **k)
    monkeypatch.setattr(Qcow2Driver, "_meta_write", counting)
    assert img(capsys, "amend", "-o", amend, p)[0] == 0
    total = len(calls)
    assert total >= 3
    leaked = 0
    for n in range(total):
        shutil.copyfile(before, p)
        count = [0]

        def failing(self, *a, **k):
            count[0] += 1
            if count[0] > n:
                raise BlockError(self.path, "cut", 5)
            return real(self, *a, **k)
        monkeypatch.setattr(Qcow2Driver, "_meta_write", failing)
        rc, _, err = img(capsys, "amend", "-o", amend, p)
        assert rc == 1 and err.count("\n") == 1, (n, err)
        _cut_ok(p, before)
        leaked += qemu_img("check", p, check=False).returncode == 3
    assert leaked


@pytest.mark.parametrize("opts,amend", [("cluster_size=4k", "refcount_bits=64"),
                                        ("refcount_bits=64", "refcount_bits=4"),
                                        ("", "compat=0.10")])
def test_every_crash_state_is_consistent(tmp_path, capsys, monkeypatch, opts, amend):
    """Writes since the last fdatasync may land in any subset: every prefix
    of the recorded writes, and random subsets of each flush epoch."""
    import pykvm.block.qcow2 as q2
    import pykvm.block.qcow2.amend as am
    import pykvm.block.qcow2.refcount as rcm
    base_dir = tmp_path / "b"
    base_dir.mkdir()
    shutil.copyfile(make(tmp_path, opts), base_dir / "orig.qcow2")
    orig = base_dir / "orig.qcow2"
    work = tmp_path / "w.qcow2"
    shutil.copyfile(orig, work)
    log = []
    real_pw, real_sync = q2.pwrite_full, os.fdatasync

    def pw(fd, data, offset):
        log.append((offset, bytes(data)))
        real_pw(fd, data, offset)

    def sync(fd):
        log.append(None)
        real_sync(fd)
    import pykvm.block.qcow2.snapshot as sn
    for mod in (q2, rcm, am, sn):
        monkeypatch.setattr(mod, "pwrite_full", pw)
    monkeypatch.setattr(os, "fdatasync", sync)
    rc, _, err = img(capsys, "amend", "-o", amend, work)
    monkeypatch.undo()
    assert rc == 0, err
    base = orig.read_bytes()
    writes = [w for w in log if w is not None]
    assert len(log) - len(writes) >= 3

    def apply(applied):
        b = bytearray(base)
        for off, data in applied:
            if off + len(data) > len(b):
                b.extend(bytes(off + len(data) - len(b)))
            b[off:off + len(data)] = data
        return bytes(b)
    done_bytes = work.read_bytes()
    assert apply(writes).ljust(len(done_bytes), b"\0")[:len(done_bytes)] == done_bytes
    state = tmp_path / "state.qcow2"

    def build(applied):
        state.write_bytes(apply(applied))
        _cut_ok(state, orig)
    step = max(1, len(writes) // 60)             # (a cluster_size=4k image: many writes)
    for n in list(range(0, len(writes) + 1, step)) + [len(writes)]:
        build(writes[:n])
    rng = random.Random(3)
    epochs, cur = [], []
    for w in log:
        if w is None:
            epochs.append(cur)
            cur = []
        else:
            cur.append(w)
    epochs.append(cur)
    done = []
    for ep in epochs:
        if len(ep) > 1:
            for _ in range(2):
                sub = [w for w in ep if rng.random() < 0.5]
                rng.shuffle(sub)
                build(done + sub)
        done += ep
