"""Image locks against QEMU's own processes, both ways: what a VM, qemu-io and
qemu-img hold is what pykvm.block.locking derives; QEMU holding an image
refuses our locks with the holder's use named; our locks held make qemu-img and
qemu-io refuse with their own "Failed to get ... lock" lines."""
import errno
import logging
import os
import select
import shutil
import subprocess
import sys
import uuid

import pytest

from pykvm.block import locking
from pykvm.block.driver import BlockError
from pykvm.block.locking import (ALL, CONSISTENT_READ, PERMS, RESIZE, WRITE, WRITE_UNCHANGED,
                                 ImageLock, Use, backing_use, disk_use, file_use, holders,
                                 img_use)

from .conftest import needs_qemu, qemu_img

MiB = 1 << 20
CR, W, WU, RS = CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE
QEMU_SYSTEM = shutil.which("qemu-system-x86_64")

pytestmark = needs_qemu


@pytest.fixture
def qemu_system():
    """qemu-system-x86_64 is installed by the Makefile (qemu-system-x86): a failure if not."""
    assert QEMU_SYSTEM, "qemu-system-x86_64 missing: run the Makefile (qemu-system-x86)"


def _read_until(proc, marker: str, what: str) -> str:
    """Read the process's output until ``marker`` shows (it is then ready)."""
    out = ""
    while marker not in out:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        chunk = os.read(proc.stdout.fileno(), 4096).decode() if ready else ""
        if not chunk:
            proc.kill()
            raise AssertionError(f"{what} never got ready: {out!r}")
        out += chunk
    return out


@pytest.fixture
def holder():
    """Start a QEMU process that keeps an image open until the test ends (or
    ``stop``): qemu-io reading commands from a pipe, or a stopped VM (-S)
    with its monitor on a pipe. Killed in the finalizer whatever happens."""
    procs = []

    def start(kind, *args):
        if kind == "qemu-io":
            cmd = ["qemu-io", *map(str, args)]
        else:
            cmd = [QEMU_SYSTEM, "-M", "q35", "-accel", "tcg", "-S", "-display", "none",
                   "-nodefaults", "-serial", "none", "-monitor", "stdio", *map(str, args)]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        procs.append(p)
        if kind == "qemu-io":
            p.stdin.write(b"length\n")   # answered once the image is open
            p.stdin.flush()
            _read_until(p, "iB\n", " ".join(cmd))
        else:   # the monitor answers once the machine, its disks included, is set up
            p.stdin.write(b"info status\n")
            p.stdin.flush()
            _read_until(p, "VM status: paused", " ".join(cmd))
        return p

    def stop(p):
        p.stdin.close()                  # qemu-io and the monitor quit at end of input
        assert p.wait(60) == 0
    start.stop = stop
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture
def locks():
    """ImageLocks on their own descriptors, released and closed at the end."""
    made = []

    def make(path, use=None, mode="auto", flags=os.O_RDWR):
        fd = os.open(str(path), flags | os.O_CLOEXEC)
        lk = ImageLock()
        made.append((lk, fd))
        if use is not None:
            lk.apply(fd, str(path), use.perms, use.shared, mode)
        return lk, fd
    yield make
    for lk, fd in made:
        lk.release()
        os.close(fd)


def others(path) -> Use:
    """What the other users of a file hold, read from its lock bytes."""
    fd = os.open(str(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        return holders(fd)
    finally:
        os.close(fd)


def qemu(*cmd):
    return subprocess.run([*map(str, cmd)], capture_output=True, text=True)


@pytest.fixture
def images(tmp_path):
    """a.raw, a.qcow2, base.raw <- top.qcow2, and d.qcow2 with its data file d.data."""
    qemu_img("create", "-q", "-f", "raw", tmp_path / "a.raw", "16M")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "16M")
    qemu_img("create", "-q", "-f", "raw", tmp_path / "base.raw", "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'd.data'}",
             tmp_path / "d.qcow2", "16M")
    return tmp_path


def vm_drive(path, fmt, readonly=False):
    ro = ",readonly=on" if readonly else ""
    return ["-drive", f"file={path},format={fmt},if=none,id=d0{ro}",
            "-device", "virtio-blk-pci,drive=d0"]


# -- what QEMU holds is what we derive ---------------------------------------------------

def _vm(fmt, writable):
    return file_use(fmt, disk_use(writable), writable)


VM_CASES = {
    # name: (image, fmt, read-only, {file: the Use we derive for it})
    "raw": ("a.raw", "raw", False, {"a.raw": _vm("raw", True)}),
    "raw-readonly": ("a.raw", "raw", True, {"a.raw": _vm("raw", False)}),
    "qcow2": ("a.qcow2", "qcow2", False, {"a.qcow2": _vm("qcow2", True)}),
    "qcow2-readonly": ("a.qcow2", "qcow2", True, {"a.qcow2": _vm("qcow2", False)}),
    "backing": ("top.qcow2", "qcow2", False, {
        "top.qcow2": _vm("qcow2", True),
        "base.raw": file_use("raw", backing_use(disk_use(True)), False)}),
    "data-file": ("d.qcow2", "qcow2", False, {"d.qcow2": _vm("qcow2", True),
                                              "d.data": _vm("qcow2", True)}),
}


@pytest.mark.parametrize("case", VM_CASES)
def test_a_vm_holds_what_disk_use_says(images, holder, qemu_system, case):
    image, fmt, ro, files = VM_CASES[case]
    holder("vm", *vm_drive(images / image, fmt, ro))
    for name, use in files.items():
        got = others(images / name)
        assert (got.perms, got.shared) == (use.perms, use.shared), name


def test_the_derived_table():
    """The module docstring's table, spelled out once."""
    assert _vm("raw", True)[:2] == ({CR, W}, {CR, WU, RS})
    assert _vm("raw", False)[:2] == ({CR}, {CR, WU, RS})
    assert _vm("qcow2", True)[:2] == ({CR, W, RS}, {CR, WU})
    assert _vm("qcow2", False)[:2] == ({CR}, {CR, WU})
    assert file_use("raw", backing_use(disk_use(True)), False)[:2] == ({CR}, {CR, WU})
    assert file_use("qcow2", img_use(io=False), False)[:2] == (set(), {CR, WU})
    assert file_use("qcow2", img_use(io=False, force_share=True), False)[:2] == (set(), ALL)
    assert file_use("raw", img_use(writes=True, resizes=True), True)[:2] == ({CR, W, RS}, ALL)


@pytest.mark.parametrize("args,image,use", [
    (["-f", "qcow2"], "a.qcow2", file_use("qcow2", img_use(writes=True), True)),
    (["-r", "-f", "qcow2"], "a.qcow2", file_use("qcow2", img_use(), False)),
    (["-r", "-U", "-f", "qcow2"], "a.qcow2", file_use("qcow2", img_use(force_share=True), False)),
    (["-f", "raw"], "a.raw", file_use("raw", img_use(writes=True), True)),
    (["-r", "-U", "-f", "raw"], "a.raw", file_use("raw", img_use(force_share=True), False)),
], ids=["qcow2", "qcow2-r", "qcow2-r-U", "raw", "raw-r-U"])
def test_qemu_io_holds_what_img_use_says(images, holder, args, image, use):
    holder("qemu-io", *args, images / image)
    got = others(images / image)
    assert (got.perms, got.shared) == (use.perms, use.shared)


def _qemu_img_locks(locks, path, cmd):
    """What a qemu-img command takes and does not share on ``path``: it runs
    once with each single lock byte held by us; a lock refusal while we hold
    byte 200+i says it wants permission i, while we hold 100+i that it does
    not share it."""
    takes, unshared = set(), set()
    for p in PERMS:
        for use, out in ((Use((), ALL - {p}), takes), (Use({p}, ALL), unshared)):
            lk, fd = locks(path, use)
            r = qemu(*cmd)
            lk.release()
            if r.returncode and "lock" in r.stderr:
                out.add(p)
                assert "Is another process using the image" in r.stderr, r.stderr
            else:
                assert r.returncode in (0, 2, 3), f"{cmd}: {r.stderr}"   # check: 2, 3 are fine
    return takes, ALL - unshared


IMG_CASES = {
    # name: (qemu-img arguments, file, Use we derive for it)
    "info": (["info", "{d}/top.qcow2"], "top.qcow2", file_use("qcow2", img_use(io=False), False)),
    "info-U": (["info", "-U", "{d}/top.qcow2"], "top.qcow2",
               file_use("qcow2", img_use(io=False, force_share=True), False)),
    "info-raw": (["info", "{d}/a.raw"], "a.raw", file_use("raw", img_use(io=False), False)),
    "check": (["check", "{d}/top.qcow2"], "top.qcow2", file_use("qcow2", img_use(), False)),
    "check-U": (["check", "-U", "{d}/top.qcow2"], "top.qcow2",
                file_use("qcow2", img_use(force_share=True), False)),
    "check-r-all": (["check", "-r", "all", "{d}/top.qcow2"], "top.qcow2",
                    file_use("qcow2", img_use(writes=True), True)),
    "map-backing": (["map", "{d}/top.qcow2"], "base.raw",
                    file_use("raw", backing_use(img_use()), False)),
    "map-U-backing": (["map", "-U", "{d}/top.qcow2"], "base.raw",
                      file_use("raw", backing_use(img_use(force_share=True)), False)),
    "convert-source": (["convert", "-O", "raw", "{d}/a.qcow2", "{d}/out.raw"], "a.qcow2",
                       file_use("qcow2", img_use(stable=True), False)),
    "convert-source-raw": (["convert", "-f", "raw", "-O", "raw", "{d}/a.raw", "{d}/out.raw"],
                           "a.raw", file_use("raw", img_use(stable=True), False)),
    "commit": (["commit", "{d}/top.qcow2"], "top.qcow2",
               file_use("qcow2", img_use(writes=True), True)),
    "resize-raw": (["resize", "-f", "raw", "{d}/a.raw", "32M"], "a.raw",
                   file_use("raw", img_use(writes=True, resizes=True), True)),
    "snapshot-c": (["snapshot", "-c", "s", "{d}/a.qcow2"], "a.qcow2",
                   file_use("qcow2", img_use(writes=True), True)),
}


@pytest.mark.parametrize("case", IMG_CASES)
def test_qemu_img_takes_what_img_use_says(images, locks, case):
    args, name, use = IMG_CASES[case]
    cmd = ["qemu-img", *(a.format(d=images) for a in args)]
    assert _qemu_img_locks(locks, images / name, cmd) == (use.perms, use.shared)


# -- QEMU holds, we are refused ----------------------------------------------------------

def test_a_vm_writing_refuses_a_second_writer_and_stable_readers(images, holder, qemu_system,
                                                                 locks):
    holder("vm", *vm_drive(images / "a.qcow2", "qcow2"))
    path = images / "a.qcow2"
    holding = 'another user has the image open for "consistent read, write, resize", ' \
              'sharing only "consistent read, write unchanged"'
    with pytest.raises(BlockError) as e:
        locks(path, _vm("qcow2", True))
    assert str(e.value) == f'{path}: Failed to get "write" lock: {holding}'
    with pytest.raises(BlockError) as e:
        locks(path, _vm("qcow2", False))
    assert str(e.value) == f'{path}: Failed to get shared "write" lock: {holding}'
    lk, _ = locks(path, file_use("qcow2", img_use(force_share=True), False), flags=os.O_RDONLY)
    assert lk.active and lk.perms == {CR} and not lk.unshared


def test_a_vm_on_an_overlay_keeps_writers_off_its_backing_file(images, holder, qemu_system, locks):
    holder("vm", *vm_drive(images / "top.qcow2", "qcow2"))
    path = images / "base.raw"
    with pytest.raises(BlockError) as e:
        locks(path, _vm("raw", True))
    assert str(e.value) == f'{path}: Failed to get "write" lock: another user has the image ' \
                           'open for "consistent read", sharing only "consistent read, ' \
                           'write unchanged"'
    lk, _ = locks(path, file_use("raw", backing_use(disk_use(True)), False))   # a second reader
    assert lk.perms == {CR}


def test_a_raw_vm_disk_lets_readers_that_share_writes_in(images, holder, qemu_system, locks):
    holder("vm", *vm_drive(images / "a.raw", "raw"))
    path = images / "a.raw"
    with pytest.raises(BlockError, match='Failed to get "write" lock: another user has the image '
                                         'open for "consistent read, write", sharing only '
                                         '"consistent read, write unchanged, resize"$'):
        locks(path, _vm("raw", True))
    with pytest.raises(BlockError, match='Failed to get shared "write" lock'):
        locks(path, _vm("raw", False))          # a disk does not share writes
    lk, _ = locks(path, file_use("raw", img_use(), False))   # as qemu-img info/map on raw
    assert lk.perms == {CR}


def test_a_reader_keeps_writers_off_and_lets_readers_in(images, holder, locks):
    holder("qemu-io", "-r", "-f", "qcow2", images / "a.qcow2")
    path = images / "a.qcow2"
    with pytest.raises(BlockError, match='Failed to get "write" lock: another user has the image '
                                         'open for "consistent read", sharing only "consistent '
                                         'read, write unchanged"$'):
        locks(path, _vm("qcow2", True))
    locks(path, _vm("qcow2", False))


def test_a_refused_apply_keeps_the_locks_it_had(images, holder, locks):
    """A reader that wants to become a writer while another reader is there
    is refused and is still the reader it was, no more, no less."""
    path = images / "a.qcow2"
    reader = _vm("qcow2", False)
    lk, fd = locks(path, reader)
    p = holder("qemu-io", "-r", "-f", "qcow2", path)
    writer = _vm("qcow2", True)
    with pytest.raises(BlockError, match='Failed to get "write" lock'):
        lk.apply(fd, str(path), writer.perms, writer.shared)
    assert (lk.perms, lk.unshared) == (reader.perms, ALL - reader.shared)
    holder.stop(p)
    assert others(path)[:2] == (reader.perms, reader.shared)
    lk.apply(fd, str(path), writer.perms, writer.shared)     # alone now: it may
    assert others(path)[:2] == (writer.perms, writer.shared)
    lk.apply(fd, str(path), reader.perms, reader.shared)     # and back: the extra bytes go
    assert others(path)[:2] == (reader.perms, reader.shared)


def test_two_users_in_one_process_are_two_users(images, locks):
    path = images / "a.qcow2"
    locks(path, _vm("qcow2", True))
    with pytest.raises(BlockError, match='Failed to get "write" lock'):
        locks(path, _vm("qcow2", True))


# -- we hold, QEMU is refused by its own code --------------------------------------------

def test_our_writer_refuses_qemu_writers_and_readers_but_not_force_share(images, locks):
    path = images / "top.qcow2"
    lk, _ = locks(path, _vm("qcow2", True))
    r = qemu("qemu-img", "info", path)
    assert r.returncode == 1 and 'Failed to get shared "write" lock' in r.stderr
    assert f"Is another process using the image [{path}]?" in r.stderr
    for cmd in (["qemu-img", "info", "-U", path], ["qemu-img", "check", "-U", path],
                ["qemu-img", "map", "-U", path]):
        r = qemu(*cmd)
        assert r.returncode == 0, r.stderr
    for cmd in (["qemu-img", "commit", path], ["qemu-img", "resize", path, "32M"],
                ["qemu-img", "check", "-r", "all", path],
                ["qemu-io", "-f", "qcow2", "-c", "write 0 512", path]):
        r = qemu(*cmd)
        assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr, (cmd, r.stderr)
    lk.release()
    r = qemu("qemu-io", "-f", "qcow2", "-c", "write 0 512", path)
    assert r.returncode == 0 and "wrote 512/512" in r.stdout, r.stderr


def test_our_reader_lets_qemu_readers_in_and_keeps_writers_off(images, locks):
    path = images / "a.qcow2"
    locks(path, _vm("qcow2", False), flags=os.O_RDONLY)
    assert qemu("qemu-img", "info", path).returncode == 0
    assert qemu("qemu-img", "check", path).returncode == 0
    r = qemu("qemu-io", "-f", "qcow2", "-c", "write 0 512", path)
    assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr, r.stderr


def test_a_writers_backing_file_refuses_qemu_writers(images, locks):
    base = images / "base.raw"
    locks(base, file_use("raw", backing_use(disk_use(True)), False), flags=os.O_RDONLY)
    r = qemu("qemu-io", "-f", "raw", "-c", "write 0 512", base)
    assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr, r.stderr
    assert qemu("qemu-img", "info", base).returncode == 0


# -- locking=off|auto|on -----------------------------------------------------------------

def test_locking_off_takes_nothing(images, locks):
    path = images / "a.qcow2"
    lk, _ = locks(path, _vm("qcow2", True), mode="off")
    assert not lk.active and others(path)[:2] == (set(), ALL)
    r = qemu("qemu-io", "-f", "qcow2", "-c", "write 0 512", path)
    assert r.returncode == 0 and "wrote 512/512" in r.stdout, r.stderr


def test_locking_off_drops_what_auto_took(images, locks):
    path = images / "a.qcow2"
    lk, fd = locks(path, _vm("qcow2", True))
    assert others(path)[:2] == (_vm("qcow2", True).perms, _vm("qcow2", True).shared)
    lk.apply(fd, str(path), {CR}, ALL, "off")
    assert not lk.active and others(path)[:2] == (set(), ALL)


@pytest.fixture(params=["tmp_path", "/dev/shm"])
def any_fs(request, tmp_path):
    """A folder on the test's file system (ext4 here) and one on tmpfs."""
    if request.param == "tmp_path":
        yield tmp_path
        return
    d = os.path.join(request.param, f"pykvm-locking-{uuid.uuid4().hex}")
    os.mkdir(d)
    yield d
    shutil.rmtree(d)


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_auto_and_on_lock_on_ext4_and_tmpfs(any_fs, locks, mode):
    path = os.path.join(any_fs, "x.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    lk, _ = locks(path, _vm("qcow2", True), mode=mode)
    assert lk.active and lk.setlk == locking.lib.F_OFD_SETLK
    r = qemu("qemu-io", "-f", "qcow2", "-c", "write 0 512", path)
    assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr, r.stderr


class _NoOfd:
    """The native module as on a kernel without OFD locks."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def pykvm_lock_range(self, fd, cmd, kind, start, length):
        if cmd in (self.real.F_OFD_SETLK, self.real.F_OFD_GETLK):
            return -errno.EINVAL
        return self.real.pykvm_lock_range(fd, cmd, kind, start, length)


def test_auto_without_ofd_locks_takes_nothing_and_says_so(images, locks, monkeypatch, caplog):
    monkeypatch.setattr(locking, "lib", _NoOfd(locking.lib))
    path = images / "a.qcow2"
    with caplog.at_level(logging.INFO, logger="pykvm"):
        lk, _ = locks(path, _vm("qcow2", True))
    assert not lk.active
    assert "not locking the image (locking=auto): the kernel has no OFD locks" in caplog.text
    monkeypatch.undo()
    assert others(path)[:2] == (set(), ALL)


def test_on_without_ofd_locks_falls_back_to_posix_locks(images, locks, monkeypatch, caplog):
    """QEMU's OFD locks and POSIX locks conflict, so qemu-io is still refused."""
    monkeypatch.setattr(locking, "lib", _NoOfd(locking.lib))
    path = images / "a.qcow2"
    with caplog.at_level(logging.WARNING, logger="pykvm"):
        lk, _ = locks(path, _vm("qcow2", True), mode="on")
    assert lk.active and lk.setlk == locking.lib.F_SETLK
    assert "falling back to POSIX locks" in caplog.text
    r = qemu("qemu-io", "-f", "qcow2", "-c", "write 0 512", path)
    assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr, r.stderr


def test_a_bad_mode_and_a_bad_permission_are_one_line(images, locks):
    path = images / "a.qcow2"
    lk, fd = locks(path)
    with pytest.raises(BlockError, match=r"locking=maybe: expected one of auto, on, off$"):
        lk.apply(fd, str(path), {CR}, ALL, "maybe")
    with pytest.raises(ValueError, match="unknown permission"):
        lk.apply(fd, str(path), {"graph-mod"}, ALL)
    with pytest.raises(ValueError, match="read-only users only"):
        img_use(writes=True, force_share=True)


# -- the graph takes them: a disk, its backing and data files, pykvm img --------------------

def _pykvm_img(*args):
    return subprocess.run([sys.executable, "-m", "pykvm", "img", *map(str, args)],
                          capture_output=True, text=True)


def test_a_disk_locks_every_file_of_its_graph_as_a_qemu_vm_does(images, holder, qemu_system):
    """What a BlockBackend holds on each file equals what a QEMU VM holds on the
    same graph (read from the lock bytes of each file)."""
    from pykvm.block import BlockBackend
    for image, files in (("top.qcow2", ("top.qcow2", "base.raw")), ("d.qcow2", ("d.qcow2", "d.data")),
                         ("a.raw", ("a.raw",))):
        fmt = "raw" if image.endswith(".raw") else "qcow2"
        vm = holder("vm", *vm_drive(images / image, fmt))
        theirs = {f: others(images / f) for f in files}
        vm.kill()
        vm.wait()
        b = BlockBackend(str(images / image), fmt=fmt)
        try:
            ours = {f: others(images / f) for f in files}
        finally:
            b.close()
        assert ours == theirs, image
        assert all(others(images / f) == Use(set(), ALL) for f in files)   # all dropped at close


def test_a_disk_in_use_refuses_qemu_and_pykvm_img_and_a_second_disk(images, holder):
    from pykvm.block import BlockBackend, BlockError
    top = images / "top.qcow2"
    b = BlockBackend(str(top), name="disk0")
    try:
        r = qemu("qemu-img", "info", top)
        assert r.returncode == 1 and 'Failed to get shared "write" lock' in r.stderr
        assert qemu("qemu-img", "info", "-U", top).returncode == 0
        r = qemu("qemu-io", "-f", "raw", "-c", "write 0 512", images / "base.raw")
        assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr  # its backing file
        ours = _pykvm_img("check", top)
        assert ours.returncode == 1 and ours.stderr.count("\n") == 1
        assert 'Failed to get shared "write" lock: another user has the image open for ' \
               '"consistent read, write, resize"' in ours.stderr, ours.stderr
        assert _pykvm_img("check", "-U", top).returncode == 0
        assert _pykvm_img("info", "-U", top).returncode == 0
        with pytest.raises(BlockError, match=r"^qcow2 node 'disk1': file '.*top.qcow2': Failed "
                                             r"to get \"write\" lock: another user"):
            BlockBackend(str(top), name="disk1")
        # file.locking=off takes and checks nothing, as in QEMU
        BlockBackend({"driver": "qcow2", "file": {"driver": "file", "filename": str(top),
                                                  "locking": "off"}}, read_only=True).close()
    finally:
        b.close()
    assert _pykvm_img("check", top).returncode == 0


def test_a_qemu_writer_keeps_a_disk_off(images, holder):
    from pykvm.block import BlockBackend, BlockError
    proc = holder("qemu-io", "-f", "qcow2", images / "a.qcow2")
    with pytest.raises(BlockError, match=r"Failed to get \"write\" lock"):
        BlockBackend(str(images / "a.qcow2"))
    r = subprocess.run([sys.executable, "-m", "pykvm", "fio", "--disk",
                        f"file={images / 'a.qcow2'}", "--ios", "4"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("pykvm: qcow2 node 'disk0': file ") and "lock" in r.stderr
    holder.stop(proc)
    BlockBackend(str(images / "a.qcow2")).close()
