"""The Linux test kit's build (no QEMU): the cpio writer read back by our parser and by
busybox's cpio, the initramfs's contents, the module order, and reproducibility."""
from __future__ import annotations

import gzip
import os
import stat
import subprocess

import pytest

from tests.helpers import linux_kit
from tests.helpers.linux_kit import Entry, cpio_newc, gzip_bytes, read_cpio_newc


@pytest.fixture(scope="module")
def kit():
    return linux_kit.kit()


@pytest.fixture(scope="module")
def members(kit):
    return {m.path: m for m in read_cpio_newc(gzip.decompress(kit.initrd.read_bytes()))}


@pytest.fixture(scope="module")
def busybox(kit, members, tmp_path_factory):
    """busybox-static out of the kit (a static binary: it runs on the host too)."""
    path = tmp_path_factory.mktemp("bb") / "busybox"
    path.write_bytes(members["bin/busybox"].data)
    path.chmod(0o755)
    return path


SAMPLE = [
    Entry("z", stat.S_IFDIR | 0o755),
    Entry("a", stat.S_IFDIR | 0o700),
    Entry("a/odd-name.txt", stat.S_IFREG | 0o644, b"x" * 5),      # lengths not multiples of 4
    Entry("a/empty", stat.S_IFREG | 0o600, b""),
    Entry("a/bin", stat.S_IFREG | 0o755, bytes(range(256)) * 3 + b"\0\1"),
    Entry("a/link", stat.S_IFLNK | 0o777, b"../z/target"),
    Entry("z/target", stat.S_IFREG | 0o644, b"the target\n"),
    Entry("dev", stat.S_IFDIR | 0o755),
    Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
]


def test_cpio_reads_back_with_our_parser():
    blob = cpio_newc(SAMPLE)
    assert len(blob) % 4 == 0
    got = read_cpio_newc(blob)
    # sorted by path components, parents first; inode numbers in order
    assert [m.path for m in got] == ["a", "a/bin", "a/empty", "a/link", "a/odd-name.txt",
                                     "dev", "dev/console", "z", "z/target"]
    assert [m.ino for m in got] == list(range(1, len(SAMPLE) + 1))
    by_path = {m.path: m for m in got}
    for e in SAMPLE:
        m = by_path[e.path]
        assert (m.mode, m.data, m.rdev) == (e.mode, e.data, e.rdev), e.path
        assert (m.uid, m.gid, m.mtime) == (0, 0, 0)
    assert cpio_newc(list(reversed(SAMPLE))) == blob  # input order does not matter


def test_cpio_duplicate_paths_are_refused():
    with pytest.raises(linux_kit.KitError, match="duplicate paths a"):
        cpio_newc([Entry("a", stat.S_IFDIR | 0o755), Entry("a", stat.S_IFREG | 0o644)])


def test_cpio_reads_back_with_busybox_cpio(busybox, tmp_path):
    archive = tmp_path / "sample.cpio"
    archive.write_bytes(cpio_newc(SAMPLE))
    listing = subprocess.run([busybox, "cpio", "-t"], stdin=open(archive, "rb"),
                             capture_output=True, text=True, check=True)
    assert sorted(listing.stdout.split()) == sorted(e.path for e in SAMPLE)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([busybox, "cpio", "-i", "-d"], stdin=open(archive, "rb"), cwd=out,
                   capture_output=True, check=True)
    for e in SAMPLE:
        p = out / e.path
        st = os.lstat(p)
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(e.mode), e.path
        if stat.S_ISREG(e.mode):
            assert p.read_bytes() == e.data
            assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(e.mode)
        elif stat.S_ISLNK(e.mode):
            assert os.readlink(p).encode() == e.data
        elif stat.S_ISCHR(e.mode):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == e.rdev
    # busybox's gzip reads our gzip stream too
    gz = tmp_path / "sample.cpio.gz"
    gz.write_bytes(gzip_bytes(archive.read_bytes()))
    r = subprocess.run([busybox, "zcat", gz], capture_output=True, check=True)
    assert r.stdout == archive.read_bytes()


def test_gzip_has_no_name_or_time():
    blob = gzip_bytes(b"abc" * 1000)
    assert blob[:3] == b"\x1f\x8b\x08"
    assert blob[3] & 0x08 == 0                     # FNAME not set
    assert blob[4:8] == b"\0\0\0\0"                # MTIME 0
    assert gzip_bytes(b"abc" * 1000) == blob


def test_initramfs_holds_the_kit(kit, members):
    for m in members.values():
        assert (m.uid, m.gid, m.mtime) == (0, 0, 0), m.path
    init = members["init"]
    assert stat.S_ISREG(init.mode) and init.mode & 0o111
    assert init.data.decode() == linux_kit.INIT
    assert members["bin/sh"].data == b"/bin/busybox" and stat.S_ISLNK(members["bin/sh"].mode)
    assert members["sbin/poweroff"].data == b"/bin/busybox"
    assert members["dev/console"].rdev == (5, 1)
    for path in ("usr/bin/fio", "sbin/mke2fs", "sbin/e2fsck", "lib64/ld-linux-x86-64.so.2",
                 "lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libaio.so.1",
                 "lib/x86_64-linux-gnu/libext2fs.so.2"):
        assert members[path].data[:4] == b"\x7fELF", path
    # the real e2fsprogs, not busybox's applet
    assert members["sbin/mkfs.ext4"].data == b"mke2fs"
    assert stat.S_ISREG(members["sbin/mke2fs"].mode)
    # every module to load is in the archive, and virtio_blk comes after what it needs
    order = members["etc/kit/modules"].data.decode().split()
    assert order, "no modules to load"
    for path in order:
        assert members[path.lstrip("/")].data[:4] == b"\x7fELF", path
    names = [p.rsplit("/", 1)[1].removesuffix(".ko") for p in order]
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_blk")
    assert names.index("virtio_pci_modern_dev") < names.index("virtio_pci")


def test_module_order_against_modinfo(kit):
    from tests.helpers.linux_kernel import fetch_modules
    modules = fetch_modules()
    order, builtin = linux_kit.module_load_order(modules)
    assert "ext4" in builtin and "jbd2" in builtin   # Debian's cloud kernel builds them in
    loaded = set()
    for rel in order:
        deps = linux_kit._modinfo(modules / rel).get("depends", "")
        for d in filter(None, deps.split(",")):
            assert d.replace("-", "_") in loaded | set(builtin), f"{rel} before {d}"
        loaded.add(rel.rsplit("/", 1)[1].removesuffix(".ko").replace("-", "_"))
    with pytest.raises(linux_kit.KitError, match="neither built in nor"):
        linux_kit.module_load_order(modules, ["no_such_module"])


def test_two_builds_are_byte_identical(kit):
    inputs = linux_kit.resolve_inputs()
    assert inputs["key"] == kit.key
    first = linux_kit.build_initrd(inputs)
    assert first == kit.initrd.read_bytes()
    assert linux_kit.build_initrd(inputs) == first


def test_key_changes_with_the_inputs(kit, monkeypatch):
    before = linux_kit.resolve_inputs()["key"]
    monkeypatch.setattr(linux_kit, "_source_hash", lambda: "0" * 64)
    assert linux_kit.resolve_inputs()["key"] != before
