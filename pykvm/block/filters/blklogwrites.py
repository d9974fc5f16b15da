"""The ``blklogwrites`` filter node: QEMU's spelling, dm-log-writes' log.

``driver=blklogwrites,file.driver=qcow2,file.file.filename=disk.qcow2,
log.driver=file,log.filename=disk.log`` (or ``file=disk.qcow2,log=disk.log``)
with QEMU's options ``log-sector-size`` (default 512), ``log-append`` (default
off: a new log) and ``log-super-update-interval`` (default 4096 entries). The
log is in the dm-log-writes format, in its order (block/writelog.py): the
backend above hands the node every write, discard and flush of the guest as
it completes, and the node appends them to the log as they become durable.
Writes are the Python path's while a log is kept (the C path punts them).
"""
from __future__ import annotations

import os
import threading

from ..driver import GraphError, register

ZERO_CHUNK = 1 << 20
from ..writelog import END_MARK, FUA, LogWriter
from . import FilterDriver


@register
class BlklogwritesDriver(FilterDriver):
    format_name = "blklogwrites"
    child_roles = ("file", "log")
    opens_children = True
    options = {"log-sector-size": "size", "log-append": "bool",
               "log-super-update-interval": "size"}

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
        try:
            self.writer = LogWriter(self.log.bfd, self.log.filename, log_sector_size,
                                    log_append, max(1, log_super_update_interval))
        except BaseException:
            self.log.close()
            raise
        self.unflushed: list = []       # completed, not yet made durable by a flush
        self.flushes = 0
        # the device's I/O thread logs requests, a control channel (QMP's
        # log-mark) may add a mark from its own thread: one entry at a time
        self.lock = threading.RLock()

    @property
    def children(self):
        return [("file", self.file), ("log", self.log)]

    def c_path_punts(self) -> list[str]:
        return ["writes, discards, write-zeroes and flushes (each is logged)"]

    # -- what the backend hands over, as requests complete -----------------------------

    def completed_write(self, offset: int, data, durable: bool) -> None:
        """A write completed; ``durable``: writethrough (it is logged as FUA now)."""
        with self.lock:
            if durable:
                self.writer.write(offset, data, FUA)
            else:
                self.unflushed.append(("w", offset, bytes(data)))

    def completed_discard(self, offset: int, length: int) -> None:
        with self.lock:
            self.unflushed.append(("d", offset, length))

    def completed_zeroes(self, offset: int, length: int, durable: bool) -> None:
        """Write-zeroes: logged as a write of zeroes (a replay must read zeroes)."""
        with self.lock:
            if durable:
                self._log([("z", offset, length)], FUA)
            else:
                self.unflushed.append(("z", offset, length))

    def flush_started(self) -> list:
        """A flush is submitted: the writes completed so far are the ones it makes durable."""
        with self.lock:
            taken, self.unflushed = self.unflushed, []
            return taken

    def flush_done(self, taken: list, ok: bool) -> None:
        with self.lock:
            if not ok:
                self.unflushed = taken + self.unflushed      # not durable after all
                return
            self._log(taken)
            self.writer.flush()
            self.flushes += 1
            self.writer.mark(f"flush-{self.flushes}")

    def mark(self, name: str) -> None:
        with self.lock:
            self.writer.mark(name)

    def _log(self, items, flags: int = 0) -> None:
        for kind, offset, x in items:
            if kind == "w":
                self.writer.write(offset, x, flags)
            elif kind == "z":
                while x:
                    n = min(x, ZERO_CHUNK)
                    self.writer.write(offset, bytes(n), flags)
                    offset += n
                    x -= n
            else:
                self.writer.discard(offset, x)

    def close_node(self) -> None:
        with self.lock:
            if self.writer is not None:
                self._log(self.unflushed)       # never flushed: last, as dm-log-writes does
                self.unflushed = []
                self.writer.mark(END_MARK)
                self.writer.write_super()
                self.writer = None
