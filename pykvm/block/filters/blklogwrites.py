"""The ``blklogwrites`` filter node: QEMU's spelling, dm-log-writes' log.

``driver=blklogwrites,file.driver=qcow2,file.file.filename=disk.qcow2,
log.driver=file,log.filename=disk.log`` (or ``file=disk.qcow2,log=disk.log``)
with QEMU's options ``log-sector-size`` (default 512), ``log-append`` (default
off: a new log) and ``log-super-update-interval`` (default 4096 entries). The
log is in the dm-log-writes format, in its order (block/writelog.py).

The live log has one writer, in C (native/writelog.c), shared by the disk's C
I/O threads, which log what they serve as each used element is published, and
by the backend above, which hands the node what the Python path served as it
completes; one lock orders them. A write completed while no flush is in
flight goes to the log at once; one completed while a flush is in flight is
held (copied, at most HOLD_MAX bytes; past that the held ones go early, with
one log line) until that flush's entry is written. So the C path writes and
flushes a logged disk as it does any other.
"""
from __future__ import annotations

import logging
import os

from ..._native import ffi, lib
from ..driver import GraphError, register
from ..writelog import LogError, open_for_writing
from . import FilterDriver

log = logging.getLogger("pykvm.block")

HOLD_MAX = 64 << 20     # bytes of writes held behind a flush in flight


@register
class BlklogwritesDriver(FilterDriver):
    format_name = "blklogwrites"
    child_roles = ("file", "log")
    opens_children = True
    options = {"log-sector-size": "size", "log-append": "bool",
               "log-super-update-interval": "size"}
    c = None        # the C writer (struct pykvm_wlog *) while the node is open
    _dfd = -1       # the log opened O_DIRECT, for the writer's thread

    def __init__(self, file, opener, read_only: bool = False, log_sector_size: int = 512,
                 log_append: bool = False, log_super_update_interval: int = 4096):
        super().__init__(file, read_only)
        if read_only:
            raise GraphError("", "a blklogwrites node logs writes: it cannot be read-only")
        if not opener.given("log"):
            raise GraphError("", "option 'log' is missing (the file the log goes to)")
        spec = opener.children["log"]
        path = spec if isinstance(spec, str) else spec.get("filename") \
            if isinstance(spec, dict) and spec.get("driver", "file") == "file" else None
        if isinstance(path, str) and not path.startswith("json:") and not os.path.exists(path):
            try:        # a new log may name a file that does not exist yet (beyond QEMU)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o644))
            except OSError as e:
                raise GraphError("", f"cannot create the log '{path}': {e.strerror}") from None
        self.log = opener.child("log", read_only=False, direct=False)
        self._ss = log_sector_size
        try:
            self.c = self._open_writer(log_sector_size, log_append,
                                       max(1, log_super_update_interval))
        except BaseException:
            self.log.close()
            raise

    def _open_writer(self, ss: int, append: bool, interval: int):
        """The C writer, after the entries of the log (log-append) or on an
        emptied one."""
        fd, path = self.log.bfd, self.log.filename
        entries, pos, _ = open_for_writing(fd, path, ss, append)
        try:        # the buffers of entries go to the file O_DIRECT (no page-cache copy)
            self._dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self._dfd = -1          # (tmpfs, say: through the page cache)
        c = lib.pykvm_wlog_new(fd, self._dfd, ss, entries, pos, interval, HOLD_MAX)
        if c == ffi.NULL:
            self._close_dfd()
            raise LogError(path, "out of memory for the log writer")
        return c

    def _close_dfd(self) -> None:
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1

    @property
    def children(self):
        return [("file", self.file), ("log", self.log)]

    def c_path_punts(self) -> list[str]:
        return []       # the C threads log what they serve (native/writelog.c)

    # -- what the backend hands over, as requests complete -----------------------------

    def _check(self, rc: int, what: str) -> None:
        if rc == -22:       # EINVAL: not logged
            raise LogError(self.log.filename, f"{what} is not aligned to "
                           f"log-sector-size={self.stats()['sector_size']}")

    def completed_write(self, offset: int, data, durable: bool) -> None:
        """A write completed; ``durable``: writethrough (it is logged as FUA now)."""
        self._check(lib.pykvm_wlog_write_buf(self.c, offset, ffi.from_buffer(data), len(data),
                                             durable), f"a write at {offset} of {len(data)} bytes")

    def completed_discard(self, offset: int, length: int) -> None:
        self._check(lib.pykvm_wlog_discard(self.c, offset, length), f"a discard at {offset}")

    def completed_zeroes(self, offset: int, length: int, durable: bool) -> None:
        """Write-zeroes: logged as a write of zeroes (a replay must read zeroes)."""
        self._check(lib.pykvm_wlog_zeroes(self.c, offset, length, durable),
                    f"write-zeroes at {offset} of {length} bytes")

    def flush_started(self) -> int:
        """A flush is submitted: its ticket, for flush_done."""
        return lib.pykvm_wlog_flush_start(self.c)

    def flush_done(self, ticket: int, ok: bool) -> None:
        lib.pykvm_wlog_flush_done(self.c, ticket, ok)

    @property
    def sector_size(self) -> int:
        return self._ss

    def mark(self, name: str) -> None:
        if self.c is None:
            raise GraphError(self.describe(), "the write log is closed")
        lib.pykvm_wlog_mark(self.c, name.encode())

    def stats(self) -> dict:
        st = ffi.new("struct pykvm_wlog_stats *")
        lib.pykvm_wlog_stats(self.c, st)
        out = {k: getattr(st, k) for k in ("entries", "log_bytes", "flushes", "held",
                                           "held_bytes", "held_peak", "forced", "waits",
                                           "error")}
        out["sector_size"] = self._ss
        return out

    def close_node(self) -> None:
        if self.c is not None:
            c, self.c = self.c, None
            err = lib.pykvm_wlog_close(c)     # never flushed: last; then the end mark
            self._close_dfd()
            if err:
                log.error("%s: the write log is incomplete: %s", self.log.filename,
                          os.strerror(err))
