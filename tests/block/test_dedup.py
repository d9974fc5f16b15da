"""``pykvm img dedup`` against QEMU's tools: images made by qemu-img and
qemu-io, deduplicated, then ``qemu-img check`` (no errors, no leaks),
``qemu-img compare`` with an untouched copy, the clusters the refcounts hold,
and writes into the shared clusters by qemu-io (QEMU's copy-on-write) and by
pykvm's own driver. And the crash-safe order: every state a crash can leave
is checked."""
import json
import os
import random
import shutil

import pytest

from pykvm.block import open_image
from pykvm.block.driver import BlockError, write_range
from pykvm.block.locking import img_use
from pykvm.block.qcow2 import Qcow2Driver

from .conftest import as_raw, assert_clean, img, needs_qemu, pattern, qemu_img, qemu_io

pytestmark = needs_qemu
K, MiB = 1 << 10, 1 << 20
CS = 64 * K



def make(tmp_path, *cmds, name="a.qcow2", opts="", size="16M", backing=None):
    p = tmp_path / name
    args = ["create", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    qemu_img(*args, p, size)
    if cmds:
        qemu_io(p, *cmds)
    return p


def keep(p):
    """An untouched copy of the image to compare with."""
    orig = p.with_name(p.name + ".orig")
    shutil.copyfile(p, orig)
    return orig


def held(p) -> int:
    """Host clusters with a nonzero refcount."""
    d = open_image(str(p), "qcow2", read_only=True, open_backing=False)
    try:
        return sum(1 for c in range(-(-d.eof // d.cluster_size)) if d.refcount(c))
    finally:
        d.close()


def host_of(p, offset):
    """The host offset qemu-img map gives for a guest offset (None: no data there)."""
    for e in json.loads(qemu_img("map", "--output=json", p).stdout):
        if e["start"] <= offset < e["start"] + e["length"]:
            if not e["data"] or "offset" not in e:
                return None
            return e["offset"] + offset - e["start"]
    return None


def map_entry(p, offset):
    for e in json.loads(qemu_img("map", "--output=json", p).stdout):
        if e["start"] <= offset < e["start"] + e["length"]:
            return e
    raise AssertionError(f"{offset:#x} not in the map")


def same(a, b):
    r = qemu_img("compare", a, b, check=False)
    assert r.returncode == 0, f"qemu-img compare {a} {b}: {r.stdout}{r.stderr}"


def saved(out) -> int:
    line = next(x for x in out.splitlines() if x.startswith(("Saved", "Would save")))
    return int(line.split()[1 if line.startswith("Saved") else 2])


DUPS = ("write -P 0xab 0 64k", "write -P 0xab 1M 64k", "write -P 0xab 2M 64k",
        "write -P 0xcd 3M 128k", "write -P 0xcd 5M 128k", "write -P 0 8M 64k",
        "write -P 0x11 9M 64k")


@pytest.fixture
def dups(tmp_path):
    """0xab three times, 0xcd four times (two 128k writes), an all-zero cluster
    written as data, and one unique cluster."""
    return make(tmp_path, *DUPS)


def test_dedup_shares_frees_and_stays_readable(tmp_path, capsys, dups):
    orig = keep(dups)
    before = held(dups)
    size_before = json.loads(qemu_img("info", "--output=json", dups).stdout)["actual-size"]
    rc, out, err = img(capsys, "dedup", dups)
    assert rc == 0, err
    # 0xab: 3 clusters onto a fresh copy, 0xcd: 4 onto another, the zero cluster
    # becomes a zero entry: 8 freed, 2 allocated
    assert saved(out) == 6 * CS
    assert "7 clusters shared; 1 zero clusters" in out
    assert "dedup ratio 1.00 -> 2.67" in out
    assert held(dups) == before - 6
    size_after = json.loads(qemu_img("info", "--output=json", dups).stdout)["actual-size"]
    # actual-size: the exact count is held()'s; metadata clusters are sparse files
    # in part, and fallocate rounds, so within a cluster
    assert size_before - size_after >= 5 * CS
    assert_clean(dups)
    same(dups, orig)
    assert host_of(dups, 0) == host_of(dups, 1 * MiB) == host_of(dups, 2 * MiB)
    assert host_of(dups, 3 * MiB) == host_of(dups, 3 * MiB + CS) == host_of(dups, 5 * MiB)
    assert host_of(dups, 0) != host_of(dups, 3 * MiB)
    z = map_entry(dups, 8 * MiB)
    assert z["zero"] and not z["data"]
    # a second run finds nothing more and changes nothing
    snap = dups.read_bytes()
    rc, out, _ = img(capsys, "dedup", dups)
    assert rc == 0 and saved(out) == 0
    assert dups.read_bytes() == snap


@pytest.mark.parametrize("opts", ["lazy_refcounts=on", "refcount_bits=64", "compat=0.10"])
def test_image_options(tmp_path, capsys, opts):
    p = make(tmp_path, *DUPS, opts=opts)
    orig = keep(p)
    before = held(p)
    rc, out, err = img(capsys, "dedup", "-q", p)
    assert rc == 0 and out == "", err
    # version 2 has no zero entries: the zero cluster stays, the rest as in version 3
    want = 5 if opts == "compat=0.10" else 6
    assert held(p) == before - want
    assert_clean(p)
    same(p, orig)
    qemu_io(p, "write -P 0x77 1M 4k", "write -P 0x78 3M 4k")
    assert_clean(p)
    qemu_io(p, "read -P 0xab 0 64k", "read -P 0x77 1M 4k", "read -P 0xcd 5M 128k")


def test_writes_into_shared_clusters_copy_them(tmp_path, capsys, dups):
    model = bytearray(as_raw(dups, tmp_path))
    assert img(capsys, "dedup", dups)[0] == 0
    # QEMU's copy-on-write: 0xab 3 -> 2 sharers, 0xcd 4 -> 3
    qemu_io(dups, "write -P 0x77 1M 4k", f"write -P 0x78 {5 * MiB + 60 * K} 4k")
    model[MiB:MiB + 4 * K] = b"\x77" * 4 * K
    model[5 * MiB + 60 * K:5 * MiB + 64 * K] = b"\x78" * 4 * K
    assert_clean(dups)
    assert as_raw(dups, tmp_path) == bytes(model)
    assert host_of(dups, 0) == host_of(dups, 2 * MiB) != host_of(dups, MiB)
    # pykvm's own driver: 0xcd 3 -> 2
    d = open_image(str(dups), "qcow2")
    try:
        write_range(d, 3 * MiB + CS + 512, b"\x56" * 1000)
    finally:
        d.close()
    model[3 * MiB + CS + 512:3 * MiB + CS + 1512] = b"\x56" * 1000
    assert_clean(dups)
    assert as_raw(dups, tmp_path) == bytes(model)
    assert host_of(dups, 3 * MiB) == host_of(dups, 5 * MiB + CS) != host_of(dups, 3 * MiB + CS)
    # the last pair: a write to one leaves the other with refcount 1 and COPIED
    # clear (neither QEMU nor pykvm can find it), which qemu-img check counts
    # as an error; harmless (the next write copies again), and dedup or
    # check -r all sets COPIED back
    d = open_image(str(dups), "qcow2")
    try:
        write_range(d, 2 * MiB + 512, b"\x55" * 1000)
    finally:
        d.close()
    qemu_io(dups, "write -P 0x79 3M 4k")
    model[2 * MiB + 512:2 * MiB + 1512] = b"\x55" * 1000
    model[3 * MiB:3 * MiB + 4 * K] = b"\x79" * 4 * K
    r = qemu_img("check", dups, check=False)
    assert r.returncode == 2 and r.stderr.count("ERROR OFLAG_COPIED data cluster") == 2
    assert as_raw(dups, tmp_path) == bytes(model)
    rc, out, _ = img(capsys, "dedup", dups)
    assert rc == 0 and "COPIED set again on 2 entries" in out and saved(out) == 0
    assert_clean(dups)
    assert as_raw(dups, tmp_path) == bytes(model)
    qemu_io(dups, "write -P 0x7a 0 4k", f"write -P 0x7b {5 * MiB + 64 * K} 4k")
    model[0:4 * K] = b"\x7a" * 4 * K
    model[5 * MiB + 64 * K:5 * MiB + 68 * K] = b"\x7b" * 4 * K
    assert_clean(dups)
    assert as_raw(dups, tmp_path) == bytes(model)


def test_dry_run_changes_nothing(tmp_path, capsys, dups):
    snap = dups.read_bytes()
    rc, out, err = img(capsys, "dedup", "--dry-run", dups)
    assert rc == 0, err
    assert saved(out) == 6 * CS and out.count("Would save") == 1
    assert dups.read_bytes() == snap
    rc, out, _ = img(capsys, "dedup", dups)
    assert rc == 0 and saved(out) == 6 * CS


def test_progress_on_stderr(tmp_path, capsys, dups):
    rc, out, err = img(capsys, "dedup", "-p", dups)
    assert rc == 0
    assert "(100.00/100%)" in err and "/100%" not in out


def test_min_refs(tmp_path, capsys, dups):
    orig = keep(dups)
    rc, out, _ = img(capsys, "dedup", "--min-refs", "4", dups)
    assert rc == 0
    # only 0xcd occurs 4 times: 4 freed, 1 allocated; and the zero cluster
    assert saved(out) == 4 * CS
    assert host_of(dups, 0) != host_of(dups, MiB)
    assert host_of(dups, 3 * MiB) == host_of(dups, 5 * MiB)
    assert_clean(dups)
    same(dups, orig)
    assert img(capsys, "dedup", "--min-refs", "1", dups)[0] == 1


def test_equal_hash_is_not_enough(tmp_path, capsys, dups, monkeypatch):
    """Every cluster gets the same digest: only the byte compare tells them apart."""
    import pykvm.block.qcow2.dedup as dd

    monkeypatch.setattr(dd, "_digest", lambda data: b"\0" * dd.DIGEST)
    orig = keep(dups)
    rc, out, _ = img(capsys, "dedup", dups)
    assert rc == 0 and saved(out) == 6 * CS
    assert_clean(dups)
    same(dups, orig)


def test_v2_zero_clusters_are_shared_not_zero_entries(tmp_path, capsys):
    p = make(tmp_path, "write -P 0 0 64k", "write -P 0 1M 64k", "write -P 0 2M 64k",
             "write -P 1 3M 64k", opts="compat=0.10")
    orig = keep(p)
    rc, out, _ = img(capsys, "dedup", p)
    assert rc == 0
    assert saved(out) == 2 * CS and "zero clusters" not in out
    assert host_of(p, 0) == host_of(p, MiB) == host_of(p, 2 * MiB) is not None
    assert_clean(p)
    same(p, orig)
    qemu_io(p, "write -P 9 1M 4k")
    assert_clean(p)
    qemu_io(p, "read -P 0 0 64k", "read -P 9 1M 4k", "read -P 0 2M 64k")


def test_compressed_clusters_are_left_alone(tmp_path, capsys):
    src = make(tmp_path, "write -P 0xab 0 64k", "write -P 0xab 1M 64k", name="src.qcow2")
    p = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, p)
    qemu_io(p, "write -P 0xab 4M 64k", "write -P 0xab 5M 64k", "write -P 0xab 6M 64k")
    orig = keep(p)
    before = held(p)
    rc, out, _ = img(capsys, "dedup", p)
    assert rc == 0
    assert "skipped: 2 compressed" in out
    assert saved(out) == 2 * CS           # the 3 uncompressed ones onto one fresh copy
    assert held(p) == before - 2
    assert_clean(p)
    same(p, orig)
    check = json.loads(qemu_img("check", "--output=json", p).stdout)
    assert check["compressed-clusters"] == 2


@pytest.mark.parametrize("opts", ["", "extended_l2=on"])
def test_chain_unallocates_what_the_backing_file_shows(tmp_path, capsys, opts):
    base = make(tmp_path, "write -P 0x33 0 4M", "write -P 0x44 8M 1M", name="base.qcow2")
    top = make(tmp_path, "write -P 0x33 0 64k",      # as the backing file: unallocated
               "write -P 0x33 1M 64k",               # as the backing file too
               "write -P 0x55 2M 64k",               # different: stays
               "write -P 0x33 3M 64k", f"write -P 0x99 {3 * MiB + 40 * K} 512",  # nearly
               "write -P 0 8M 64k",                  # zeroes over 0x44: a zero entry
               "write -P 0 12M 64k",                 # zeroes over zeroes: unallocated
               name="top.qcow2", backing="base.qcow2", opts=opts)
    orig = keep(top)
    # without --chain the equal clusters are only shared among themselves
    rc, out, _ = img(capsys, "dedup", "--dry-run", top)
    assert rc == 0 and saved(out) == 3 * CS            # 0x33 x2 -> 1 copy; 2 zero clusters
    rc, out, err = img(capsys, "dedup", "--chain", top)
    assert rc == 0, err
    assert saved(out) == 4 * CS
    assert "3 clusters equal to the backing file unallocated" in out
    assert "1 zero clusters" in out
    assert_clean(top)
    same(top, orig)
    assert map_entry(top, 0)["depth"] == 1 and map_entry(top, 12 * MiB)["depth"] == 1
    z = map_entry(top, 8 * MiB)
    assert z["depth"] == 0 and z["zero"]
    assert map_entry(top, 2 * MiB)["depth"] == 0
    assert map_entry(top, 3 * MiB)["depth"] == 0 and map_entry(top, 3 * MiB)["data"]
    assert base.exists()


def test_chain_needs_a_backing_file(tmp_path, capsys, dups):
    snap = dups.read_bytes()
    rc, out, err = img(capsys, "dedup", "--chain", dups)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "backing" in err
    assert dups.read_bytes() == snap


def test_refcount_bits_1_keeps_every_copy(tmp_path, capsys, dups):
    p = make(tmp_path, *DUPS, name="r1.qcow2", opts="refcount_bits=1")
    orig = keep(p)
    before = held(p)
    rc, out, _ = img(capsys, "dedup", p)
    assert rc == 0
    assert "shared" not in out and saved(out) == CS       # only the zero cluster goes
    assert held(p) == before - 1
    assert len({host_of(p, o) for o in (0, MiB, 2 * MiB)}) == 3
    assert_clean(p)
    same(p, orig)


def test_refcount_cap_starts_a_new_copy(tmp_path, capsys):
    """refcount_bits=2: at most 3 references; 5 equal clusters need 2 copies."""
    p = make(tmp_path, *[f"write -P 0xab {k}M 64k" for k in range(5)], opts="refcount_bits=2")
    orig = keep(p)
    rc, out, _ = img(capsys, "dedup", p)
    assert rc == 0 and saved(out) == 3 * CS
    hosts = [host_of(p, k * MiB) for k in range(5)]
    assert sorted(hosts.count(h) for h in set(hosts)) == [2, 3]
    assert_clean(p)
    same(p, orig)
    qemu_io(p, "write -P 1 0 4k")               # 0 is in the group of 3: 2 sharers left
    assert_clean(p)
    qemu_io(p, "read -P 1 0 4k", "read -P 0xab 1M 64k", "read -P 0xab 4M 64k")


def test_internal_snapshot(tmp_path, capsys):
    p = make(tmp_path, "write -P 0xab 0 64k", "write -P 0xab 1M 64k", "write -P 0xcd 3M 64k",
             "write -P 0 7M 64k")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, "write -P 0xab 2M 64k", "write -P 0xab 4M 64k", "write -P 0xcd 5M 64k",
            "write -P 0 6M 64k", "write -P 0xee 1M 64k")
    orig = keep(p)
    before = held(p)
    rc, out, err = img(capsys, "dedup", p)
    assert rc == 0, err
    # 2M, 4M onto the snapshot's 0xab cluster, 5M onto its 0xcd one, the zero
    # cluster freed; nothing the snapshot holds moves or is freed
    assert saved(out) == 4 * CS
    assert held(p) == before - 4
    assert host_of(p, 0) == host_of(p, 2 * MiB) == host_of(p, 4 * MiB)
    assert host_of(p, 3 * MiB) == host_of(p, 5 * MiB)
    assert map_entry(p, 7 * MiB)["data"]        # zeroes the snapshot holds too: kept
    assert_clean(p)
    same(p, orig)
    for img_path in (p, orig):
        raw = tmp_path / (img_path.name + ".s1.raw")
        qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", img_path, raw)
    assert (tmp_path / (p.name + ".s1.raw")).read_bytes() == \
        (tmp_path / (orig.name + ".s1.raw")).read_bytes()
    qemu_io(p, "write -P 1 2M 4k")
    assert_clean(p)
    qemu_img("snapshot", "-a", "s1", p)
    assert_clean(p)
    qemu_io(p, "read -P 0xab 0 64k", "read -P 0xab 1M 64k", "read -P 0 2M 64k")


def test_extended_l2_skips_partly_allocated_clusters(tmp_path, capsys):
    p = make(tmp_path, "write -P 0xab 0 64k", "write -P 0xab 1M 64k", "write -P 0xab 2M 64k",
             "write -P 0xab 4M 4k", "write -P 0xab 5M 4k", "write -P 0 6M 64k",
             opts="extended_l2=on")
    orig = keep(p)
    rc, out, err = img(capsys, "dedup", p)
    assert rc == 0, err
    assert "skipped: 2 partly allocated" in out
    assert saved(out) == 3 * CS            # 3 onto 1, and the zero cluster
    assert host_of(p, 0) == host_of(p, 2 * MiB)
    assert host_of(p, 4 * MiB) != host_of(p, 5 * MiB)
    assert_clean(p)
    same(p, orig)
    qemu_io(p, f"write -P 3 {MiB + 8 * K} 4k")
    assert_clean(p)
    qemu_io(p, "read -P 0xab 0 64k", f"read -P 3 {MiB + 8 * K} 4k", "read -P 0xab 2M 64k",
            "read -P 0 6M 64k")


def test_refusals(tmp_path, capsys, dups):
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(MiB))
    rc, _, err = img(capsys, "dedup", raw)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "qcow2" in err
    ext = make(tmp_path, "write -P 1 0 64k", "write -P 1 1M 64k", name="ext.qcow2",
               opts=f"data_file={tmp_path / 'ext.data'}")
    rc, _, err = img(capsys, "dedup", ext)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "external data file" in err
    # in use: a writer holds the image locks
    snap = dups.read_bytes()
    holder = open_image(str(dups), "qcow2", use=img_use(writes=True))
    try:
        rc, _, err = img(capsys, "dedup", dups)
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "lock" in err
        rc, _, err = img(capsys, "dedup", "--dry-run", dups)
        assert rc == 1 and "lock" in err
    finally:
        holder.close()
    assert dups.read_bytes() == snap


def test_image_opts(tmp_path, capsys, dups):
    orig = keep(dups)
    rc, out, err = img(capsys, "dedup", "--image-opts", f"driver=qcow2,file.filename={dups}")
    assert rc == 0, err
    assert saved(out) == 6 * CS
    same(dups, orig)


def test_check_reports_shared_clusters_as_qemu(tmp_path, capsys, dups):
    """After dedup (refcounts above 1), and with an internal snapshot, pykvm img
    check says what qemu-img check says, fragmentation included."""
    qemu_img("snapshot", "-c", "s1", dups)
    qemu_io(dups, "write -P 0x12 10M 64k")
    assert img(capsys, "dedup", dups)[0] == 0
    for out_fmt in ("human", "json"):
        q = qemu_img("check", f"--output={out_fmt}", dups).stdout
        rc, ours, _ = img(capsys, "check", f"--output={out_fmt}", dups)
        assert rc == 0
        if out_fmt == "json":
            q, ours = json.loads(q), json.loads(ours)
            q.pop("filename"), ours.pop("filename")
            assert q.get("fragmented-clusters")
        assert ours == q


def test_check_finds_copied_flags_wrong_either_way(tmp_path, capsys, dups):
    assert img(capsys, "dedup", dups)[0] == 0
    d = open_image(str(dups), "qcow2", open_backing=False)
    try:
        l2 = d.l1[0] & 0x00FFFFFFFFFFFE00
        e = d._load_l2(l2)[(2 * MiB) // CS]          # shared: COPIED clear
        u = d._load_l2(l2)[(9 * MiB) // CS]          # unique: COPIED set
        os.pwrite(d.mfd, (e | 1 << 63).to_bytes(8, "big"), l2 + (2 * MiB) // CS * 8)
        os.pwrite(d.mfd, (u & ~(1 << 63)).to_bytes(8, "big"), l2 + (9 * MiB) // CS * 8)
    finally:
        d.close()
    q = qemu_img("check", dups, check=False)
    rc, out, _ = img(capsys, "check", dups)
    assert q.returncode == rc == 2
    assert out.count("ERROR OFLAG_COPIED data cluster") == 2
    assert "2 errors were found" in q.stdout + q.stderr and "2 errors were found" in out
    rc, out, _ = img(capsys, "check", "-r", "all", dups)
    assert rc == 0, out
    assert_clean(dups)


# -- crash safety ---------------------------------------------------------------------

@pytest.fixture
def crashy(tmp_path):
    """Every kind of change: a fresh shared copy, clusters moved onto a cluster a
    snapshot holds, a zero cluster freed."""
    p = make(tmp_path, "write -P 0xcd 7M 64k")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, *DUPS)
    return p


def _cut_ok(state, orig):
    r = qemu_img("check", "--output=json", state, check=False)
    assert r.returncode in (0, 3), f"after a cut: rc={r.returncode} {r.stdout}{r.stderr}"
    assert "ERROR" not in r.stderr, r.stderr
    assert json.loads(r.stdout).get("corruptions", 0) == 0
    same(state, orig)


def test_crash_after_every_metadata_write(tmp_path, capsys, crashy, monkeypatch):
    """The dedup fails at its Nth metadata write, for every N: the image holds
    the writes before it; qemu-img check finds leaks at most, content unchanged."""
    orig = keep(crashy)
    calls = []
    real = Qcow2Driver._meta_write

    def counting(self, *a, **k):
        calls.append(a[0])
        return real(self, *a, **k)
    monkeypatch.setattr(Qcow2Driver, "_meta_write", counting)
    work = tmp_path / "w.qcow2"
    shutil.copyfile(crashy, work)
    assert img(capsys, "dedup", work)[0] == 0
    total = len(calls)
    assert total >= 6 and {"refblock_update", "l2_update", "cow_write"} <= set(calls)
    leaked = 0
    for n in range(total):
        shutil.copyfile(crashy, work)
        count = [0]

        def failing(self, *a, **k):
            count[0] += 1
            if count[0] > n:
                raise BlockError(self.path, "cut", 5)
            return real(self, *a, **k)
        monkeypatch.setattr(Qcow2Driver, "_meta_write", failing)
        rc, _, err = img(capsys, "dedup", work)
        assert rc == 1 and len(err.strip().splitlines()) == 1, (n, err)
        _cut_ok(work, orig)
        leaked += qemu_img("check", work, check=False).returncode == 3
    assert leaked                                # the cuts did land between writes


def test_every_crash_state_is_consistent(tmp_path, capsys, crashy, monkeypatch):
    """The crash model: writes since the last fdatasync may land in any subset.
    Record every write and barrier of a dedup, then rebuild each prefix and
    random subsets of each epoch from the original bytes."""
    import pykvm.block.qcow2 as q2
    import pykvm.block.qcow2.dedup as dd
    import pykvm.block.qcow2.refcount as rcm
    orig = keep(crashy)
    work = tmp_path / "w.qcow2"
    shutil.copyfile(crashy, work)
    log = []                                     # (offset, bytes) or None for a barrier
    real_pw, real_sync, real_fa = q2.pwrite_full, os.fdatasync, dd.fallocate

    def pw(fd, data, offset):
        log.append((offset, bytes(data)))
        real_pw(fd, data, offset)

    def fa(fd, mode, offset, length):
        if mode == dd.PUNCH:
            log.append((offset, bytes(length)))
        return real_fa(fd, mode, offset, length)

    def sync(fd):
        log.append(None)
        real_sync(fd)
    monkeypatch.setattr(q2, "pwrite_full", pw)
    monkeypatch.setattr(rcm, "pwrite_full", pw)
    monkeypatch.setattr(dd, "fallocate", fa)
    monkeypatch.setattr(os, "fdatasync", sync)
    rc, out, err = img(capsys, "dedup", work)
    monkeypatch.undo()
    assert rc == 0, err
    # 0xab x3 onto a fresh copy, 0xcd x4 onto the one the snapshot holds, a zero cluster
    assert saved(out) == 7 * CS
    base = crashy.read_bytes()
    writes = [w for w in log if w is not None]
    assert len(log) - len(writes) >= 3          # the three barriers of a batch
    state = tmp_path / "state.qcow2"

    def apply(applied):
        b = bytearray(base)
        for off, data in applied:
            if off + len(data) > len(b):
                b.extend(bytes(off + len(data) - len(b)))
            b[off:off + len(data)] = data
        return bytes(b)

    done_bytes = work.read_bytes()               # the record holds every write
    assert apply(writes).ljust(len(done_bytes), b"\0") == done_bytes

    def build(applied):
        state.write_bytes(apply(applied))
        _cut_ok(state, orig)

    for n in range(len(writes) + 1):            # every prefix
        build(writes[:n])
    rng = random.Random(7)
    epochs, cur = [], []
    for w in log:
        if w is None:
            epochs.append(cur)
            cur = []
        else:
            cur.append(w)
    epochs.append(cur)
    done = []
    for ep in epochs:                           # subsets of each epoch, in any order
        if len(ep) > 1:
            for _ in range(3):
                sub = [w for w in ep if rng.random() < 0.5]
                rng.shuffle(sub)
                build(done + sub)
        done += ep


@pytest.mark.parametrize("how", ["zero-alloc", "preallocation=metadata"])
def test_allocated_zeroes_are_freed(tmp_path, capsys, how):
    if how == "zero-alloc":     # write -z over data keeps the cluster (QCOW_OFLAG_ZERO and an offset)
        p = make(tmp_path, "write -P 1 0 128k", "write -z 0 64k")
        gone = 1
    else:
        p = make(tmp_path, "write -P 1 0 64k", opts="preallocation=metadata", size="4M")
        gone = 63
    orig = keep(p)
    before = held(p)
    for image in (p, "after"):
        if image == "after":
            rc, out, err = img(capsys, "dedup", p)
            assert rc == 0, err
        # pykvm img check counts allocated zero clusters as qemu-img does
        q = json.loads(qemu_img("check", "--output=json", p).stdout)
        ours = json.loads(img(capsys, "check", "--output=json", p)[1])
        assert q == ours
    assert saved(out) == gone * CS and held(p) == before - gone
    assert map_entry(p, CS if how != "zero-alloc" else 0)["zero"]
    assert_clean(p)
    same(p, orig)
    qemu_io(p, "write -P 2 64k 4k")
    assert_clean(p)
    qemu_io(p, "read -P 1 0 64k" if how != "zero-alloc" else "read -P 0 0 64k",
            "read -P 2 64k 4k")


@pytest.mark.parametrize("event", ["cow_write", "refblock_update", "l2_update"])
def test_blkdebug_failure_leaves_leaks_at_most(tmp_path, capsys, crashy, event):
    """The project's fault machinery: a blkdebug node under the qcow2 node fails
    the first metadata write of a kind (QEMU's inject-error on an event)."""
    orig = keep(crashy)
    rules = tmp_path / "rules.conf"
    rules.write_text(f'[inject-error]\nevent = "{event}"\nerrno = "5"\n')
    rc, _, err = img(capsys, "dedup", "--image-opts",
                     f"driver=qcow2,file.driver=blkdebug,file.config={rules},"
                     f"file.image.filename={crashy}")
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{event} write" in err and "injected" in err
    _cut_ok(crashy, orig)
    # and a run without the fault finishes the job
    rc, out, _ = img(capsys, "dedup", crashy)
    assert rc == 0 and saved(out) > 0
    assert qemu_img("check", "-r", "leaks", crashy, check=False).returncode == 0
    assert_clean(crashy)
    same(crashy, orig)


@pytest.mark.parametrize("cluster_size, want", [("512", 9 * 128 - 3), ("4k", 9 * 16 - 3),
                                                 ("2M", 0)])
def test_cluster_sizes(tmp_path, capsys, cluster_size, want):
    """DUPS in other cluster sizes: its nine 64k of data are 128 or 16 equal clusters
    each (all 0xab ones onto one fresh copy, all 0xcd onto another, the zeroes
    zero entries, the 0x11 ones onto a third); 2 MiB clusters mix the writes:
    nothing is equal."""
    p = make(tmp_path, *DUPS, opts=f"cluster_size={cluster_size}")
    orig = keep(p)
    before = held(p)
    rc, out, err = img(capsys, "dedup", p)
    assert rc == 0, err
    cs = int(cluster_size[:-1]) * (1 << {"k": 10, "M": 20}[cluster_size[-1]]) \
        if cluster_size[-1].isalpha() else int(cluster_size)
    assert saved(out) == want * cs
    assert held(p) == before - want
    assert_clean(p)
    same(p, orig)


def test_many_refcount_blocks_with_a_small_cache(tmp_path, capsys, monkeypatch):
    """512-byte clusters with 64-bit refcounts: 64 clusters per refcount block, so
    one batch touches hundreds of blocks, through a cache of 8 of them."""
    real = Qcow2Driver._open

    def small_cache(self, *a, **k):
        real(self, *a, **k)
        self.rb_cache_max = 8
    monkeypatch.setattr(Qcow2Driver, "_open", small_cache)
    p = make(tmp_path, *[f"write -P {k % 3} {k * 64}k 512" for k in range(0, 256, 1)],
             opts="cluster_size=512,refcount_bits=64")
    orig = keep(p)
    before = held(p)
    rc, out, err = img(capsys, "dedup", p)
    assert rc == 0, err
    # 256 clusters, 3 contents (one of them zeroes): 2 fresh copies
    assert saved(out) == (256 - 2) * 512 and held(p) == before - 254
    assert_clean(p)
    same(p, orig)


@pytest.mark.parametrize("tool", ["qemu-img", "pykvm"])
def test_snapshots_after_dedup(tmp_path, capsys, dups, tool):
    """Snapshot create and delete walk every shared cluster's refcount (QEMU's
    qcow2_update_snapshot_refcount, pykvm's _tree_refs and _fix_copied)."""
    model = bytearray(as_raw(dups, tmp_path))
    assert img(capsys, "dedup", dups)[0] == 0

    def snapshot(*args):
        if tool == "qemu-img":
            qemu_img("snapshot", *args, dups)
        else:
            assert img(capsys, "snapshot", *args, dups)[0] == 0
    snapshot("-c", "s1")
    assert_clean(dups)
    qemu_io(dups, "write -P 0x61 0 4k", "write -P 0x62 5M 4k")
    at_s1 = bytes(model)
    model[0:4 * K] = b"\x61" * 4 * K
    model[5 * MiB:5 * MiB + 4 * K] = b"\x62" * 4 * K
    assert_clean(dups)
    assert as_raw(dups, tmp_path) == bytes(model)
    snapshot("-d", "s1")
    assert_clean(dups)
    assert as_raw(dups, tmp_path) == bytes(model)
    snapshot("-c", "s2")
    qemu_io(dups, "write -P 0x63 1M 64k")
    snapshot("-a", "s2")
    assert_clean(dups)
    assert as_raw(dups, tmp_path) == bytes(model)
    assert at_s1 != bytes(model)
    rc, out, _ = img(capsys, "dedup", dups)         # again, with a snapshot holding clusters
    assert rc == 0
    assert_clean(dups)
    assert as_raw(dups, tmp_path) == bytes(model)
