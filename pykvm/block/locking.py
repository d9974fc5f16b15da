"""Image locking as QEMU does it, so that pykvm and QEMU (a VM, qemu-img,
qemu-io, qemu-nbd, qemu-storage-daemon) keep each other off an image in use.

A user of an image file holds *permissions* and *shares* some of them with
other users; QEMU's four (``BLK_PERM_*``, bit i):

  bit  name               what it allows
  0    consistent read    reading a consistent view of the disk
  1    write              changing the visible disk contents
  2    write unchanged    writes that leave the visible contents as they were
  3    resize             changing the size

Each open file carries them as OFD (open file description) read locks on
single bytes: byte 100+i for a permission it holds, byte 200+i for one it does
NOT share (byte 0 is libvirt's). A new user first takes its bytes, then asks
(F_OFD_GETLK for a write lock) whether anyone else holds byte 200+i of a
permission it wants ('Failed to get "write" lock') or byte 100+i of a
permission it will not share ('Failed to get shared "write" lock'). Read locks
never conflict with each other, so taking the bytes only fails on a file
system without locks. Locks belong to the open file description: only the
descriptor they were taken on (and its dups) holds them, closing it drops
them, and a second open of the same file in this process is another user.
QEMU 6.1 and older also lock bytes 104/204 for a fifth permission that newer
versions dropped; nothing here looks at them.

``locking=`` (QEMU's ``file.locking``): ``on`` locks, and falls back to POSIX
locks (which the process loses when it closes any descriptor of the file) with
a warning where the kernel has no OFD locks; ``off`` takes nothing; ``auto``
(the default) locks where the kernel and the file system have OFD locks and
takes nothing elsewhere, with one log line.

What each user holds on a file (QEMU 7.2's rules, measured on its own
processes; disk_use, img_use, file_use and backing_use derive the same). CR
consistent read, W write, WU write unchanged, RS resize:

  user of the file                                       holds     shares
  -----------------------------------------------------  --------  ----------
  a VM's disk, raw, writable                             CR W      CR WU RS
  a VM's disk, raw, read-only                            CR        CR WU RS
  a VM's disk, qcow2, writable: image and data file      CR W RS   CR WU
  a VM's disk, qcow2, read-only: image and data file     CR        CR WU
  any backing file of a VM's disk (raw or qcow2)         CR        CR WU
  qemu-img reading a raw image or raw backing file       CR        everything
  qemu-img reading a qcow2 image or qcow2 backing file   CR        CR WU
  qemu-img info (no I/O): qcow2 / raw                    nothing   CR WU / everything
  qemu-img convert's sources (raw or qcow2)              CR        CR WU
  qemu-img writing a qcow2 image                         CR W RS   CR WU
  qemu-img writing a raw image (resize adds RS)          CR W      everything
  -U / force-share (read-only users only), any file      CR        everything
                                                         (info: nothing)

So a VM writing an image keeps off a second writer ('Failed to get "write"
lock') and every reader that does not share writes: any qcow2 user, a VM's
read-only disk, convert's source ('Failed to get shared "write" lock'); -U
readers get in, and a VM's backing files keep writers off.

Each file of an image gets its own ImageLock, with what its node asks of it.
A writable qcow2 disk over a raw backing file:

  user = disk_use(writable=True)
  use = file_use("qcow2", user, writable=True)         # the image file and its data file
  top.apply(fd, path, use.perms, use.shared)
  below = backing_use(user)                            # then backing_use(below), ...
  use = file_use("raw", below, writable=False)
  base.apply(bfd, bpath, use.perms, use.shared)
"""
from __future__ import annotations

import errno
import logging
from collections import namedtuple

from .._native import lib
from .driver import BlockError

log = logging.getLogger("pykvm.block")

CONSISTENT_READ = "consistent read"
WRITE = "write"
WRITE_UNCHANGED = "write unchanged"
RESIZE = "resize"
PERMS = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE)   # index = QEMU's bit number
ALL = frozenset(PERMS)
PERM_BASE = 100      # byte 100+i: holds permission i
SHARED_BASE = 200    # byte 200+i: does not share permission i
MODES = ("auto", "on", "off")


def perm_names(perms) -> str:
    """QEMU's spelling of a set of permissions: "consistent read, write"."""
    return ", ".join(p for p in PERMS if p in perms)


class Use(namedtuple("Use", "perms shared io force_share")):
    """What a user asks of a node or file: the permissions it holds, those it
    shares, whether it does I/O at all, and whether it forces sharing (-U)."""

    __slots__ = ()

    def __new__(cls, perms, shared, io: bool = True, force_share: bool = False):
        perms, shared = frozenset(perms), frozenset(shared)
        unknown = (perms | shared) - ALL
        if unknown:
            raise ValueError(f"unknown permission(s) {sorted(unknown)} (one of {perm_names(ALL)})")
        return super().__new__(cls, perms, shared, io, force_share)


def disk_use(writable: bool) -> Use:
    """A guest's disk (pykvm run, fio, serve), as a QEMU device's: it reads
    (and writes), and lets others read, write unchanged and resize."""
    return Use({CONSISTENT_READ} | ({WRITE} if writable else set()),
               {CONSISTENT_READ, WRITE_UNCHANGED, RESIZE})


def img_use(writes: bool = False, resizes: bool = False, io: bool = True,
            stable: bool = False, force_share: bool = False) -> Use:
    """A ``pykvm img`` command on the image it names, as qemu-img's:
    ``writes`` for commands that change the image, ``resizes`` for resize,
    ``io=False`` for info (reads headers only), ``stable`` for convert's
    sources (nobody may change them meanwhile), ``force_share`` for -U."""
    if force_share and (writes or resizes):
        raise ValueError("force-share (-U) is for read-only users only")
    perms = set()
    if io:
        perms.add(CONSISTENT_READ)
    if writes:
        perms.add(WRITE)
    if resizes:
        perms.add(RESIZE)
    shared = ALL if force_share or not stable else {CONSISTENT_READ, WRITE_UNCHANGED}
    return Use(perms, shared, io, force_share)


def file_use(fmt: str, parent: Use, writable: bool) -> Use:
    """What a format node of ``fmt`` opened ``writable`` asks of its file (and
    of a qcow2 data file) when its users ask ``parent`` of it. raw passes
    requests through; qcow2 keeps metadata there, so it reads it whenever it
    does I/O, writes and resizes it when writable, and shares neither."""
    perms, shared = set(parent.perms), set(parent.shared)
    if fmt != "raw":
        if writable:
            perms |= {WRITE, RESIZE}
        if parent.io:
            perms.add(CONSISTENT_READ)
        shared -= {WRITE, RESIZE}
    if parent.force_share:
        shared = set(ALL)
    return Use(perms, shared, parent.io, parent.force_share)


def backing_use(parent: Use) -> Use:
    """What a node asks of its backing node when its users ask ``parent`` of
    it: consistent reads at most; writes and resizes shared only when the
    users share writes."""
    shared = {CONSISTENT_READ, WRITE_UNCHANGED}
    if WRITE in parent.shared:
        shared |= {WRITE, RESIZE}
    if parent.force_share:
        shared = set(ALL)
    return Use(parent.perms & {CONSISTENT_READ}, shared, parent.io, parent.force_share)


# -- the locks -------------------------------------------------------------------------

def _ofd_supported(fd: int) -> int:
    """0 if OFD locks work on fd, else the errno of asking."""
    r = lib.pykvm_lock_range(fd, lib.F_OFD_GETLK, lib.F_WRLCK, PERM_BASE, 1)
    return -r if r < 0 else 0


class ImageLock:
    """The lock bytes one open file holds for its user (QEMU's file-posix
    locking). ``apply`` takes and checks them, and may be called again with
    new permissions (a reopen); ``release`` drops them. Use one ImageLock per
    descriptor, and release it before closing the descriptor."""

    def __init__(self):
        self.fd = -1
        self.path = ""
        self.perms: frozenset = frozenset()      # bytes 100+i held
        self.unshared: frozenset = frozenset()   # bytes 200+i held
        self.setlk = 0                           # 0: not locking
        self.getlk = 0

    @property
    def active(self) -> bool:
        return self.setlk != 0

    def apply(self, fd: int, path: str, perms, shared, mode: str = "auto") -> None:
        """Hold ``perms`` and share ``shared`` on the open file ``fd`` (its
        name ``path`` is for messages), or raise a one-line BlockError naming
        what another user holds, leaving the locks as they were."""
        if mode not in MODES:
            raise BlockError(path, f"locking={mode}: expected one of {', '.join(MODES)}")
        use = Use(perms, shared)
        if self.active and fd != self.fd:
            raise BlockError(path, "this lock is held on another descriptor; release it first")
        if mode == "off":
            self.release()
            return
        if not self.active:
            if not self._choose(fd, path, mode):
                return
            self.fd, self.path = fd, path
        want, unshared = use.perms, ALL - use.shared
        old = (self.perms, self.unshared)
        try:
            self._lock(self.perms | want, self.unshared | unshared)
            self._check(want, unshared)
        except BlockError:
            self._set(*old)
            if not (self.perms or self.unshared):
                self.setlk = self.getlk = 0
                self.fd = -1
            raise
        self._set(want, unshared)

    def release(self) -> None:
        """Drop every lock byte (before the descriptor is closed)."""
        if self.active:
            self._set(frozenset(), frozenset())
            self.setlk = self.getlk = 0
            self.fd = -1

    def holders(self) -> Use:
        """What the other users of the file hold and share, as its lock bytes
        say (all of them together: locks do not say who holds them)."""
        return holders(self.fd, self.getlk, self.path)

    # internals

    def _choose(self, fd: int, path: str, mode: str) -> bool:
        err = _ofd_supported(fd)
        if err == 0:
            self.setlk, self.getlk = lib.F_OFD_SETLK, lib.F_OFD_GETLK
            return True
        if mode == "auto":
            log.info("%s: not locking the image (locking=auto): %s", path,
                     "the kernel has no OFD locks" if err == errno.EINVAL else
                     f"the file system has no OFD locks ({errno.errorcode.get(err, err)})")
            return False
        if err != errno.EINVAL:   # the file system refuses: _lock reports it
            self.setlk, self.getlk = lib.F_OFD_SETLK, lib.F_OFD_GETLK
            return True
        log.warning("%s: locking=on, but the kernel has no OFD locks: falling back to POSIX "
                    "locks, which are lost when this process closes any descriptor of the file",
                    path)
        self.setlk, self.getlk = lib.F_SETLK, lib.F_GETLK
        return True

    def _byte(self, off: int, kind: int) -> None:
        r = lib.pykvm_lock_range(self.fd, self.setlk, kind, off, 1)
        if r < 0:
            err = -r
            verb = "lock" if kind == lib.F_RDLCK else "unlock"
            if err in (errno.EAGAIN, errno.EACCES):
                raise BlockError(self.path, f"Failed to {verb} byte {off}")
            raise BlockError(self.path, f"Failed to {verb} byte {off}", err)

    def _lock(self, perms, unshared) -> None:
        """Take the bytes of ``perms`` and ``unshared`` not yet held."""
        for i, p in enumerate(PERMS):
            if p in perms and p not in self.perms:
                self._byte(PERM_BASE + i, lib.F_RDLCK)
                self.perms |= {p}
        for i, p in enumerate(PERMS):
            if p in unshared and p not in self.unshared:
                self._byte(SHARED_BASE + i, lib.F_RDLCK)
                self.unshared |= {p}

    def _set(self, perms, unshared) -> None:
        """Hold exactly these bytes: take missing ones, drop the rest."""
        self._lock(perms, unshared)
        for i, p in enumerate(PERMS):
            if p in self.perms and p not in perms:
                self._byte(PERM_BASE + i, lib.F_UNLCK)
                self.perms -= {p}
            if p in self.unshared and p not in unshared:
                self._byte(SHARED_BASE + i, lib.F_UNLCK)
                self.unshared -= {p}

    def _check(self, want, unshared) -> None:
        for i, p in enumerate(PERMS):
            if p in want and _taken(self.fd, self.getlk, SHARED_BASE + i, self.path):
                self._refuse(f'Failed to get "{p}" lock')
        for i, p in enumerate(PERMS):
            if p in unshared and _taken(self.fd, self.getlk, PERM_BASE + i, self.path):
                self._refuse(f'Failed to get shared "{p}" lock')

    def _refuse(self, what: str) -> None:
        other = self.holders()
        use = f'for "{perm_names(other.perms)}"' if other.perms else "without permissions"
        shares = "everything" if other.shared == ALL else \
            f'only "{perm_names(other.shared)}"' if other.shared else "nothing"
        raise BlockError(self.path, f"{what}: another user has the image open {use}, "
                         f"sharing {shares}")


def _taken(fd: int, getlk: int, off: int, path: str) -> bool:
    """Does another open file (another process, for POSIX locks) hold byte ``off``?"""
    r = lib.pykvm_lock_range(fd, getlk, lib.F_WRLCK, off, 1)
    if r < 0:
        raise BlockError(path, f"Failed to test lock byte {off}", -r)
    return r != lib.F_UNLCK


def holders(fd: int, getlk: int | None = None, path: str = "") -> Use:
    """What other users hold and share on the file open as ``fd``, from its
    lock bytes (OFD locks unless ``getlk`` says otherwise)."""
    getlk = getlk or lib.F_OFD_GETLK
    held = {p for i, p in enumerate(PERMS) if _taken(fd, getlk, PERM_BASE + i, path)}
    unshared = {p for i, p in enumerate(PERMS) if _taken(fd, getlk, SHARED_BASE + i, path)}
    return Use(held, ALL - unshared)
