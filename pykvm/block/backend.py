"""BlockBackend: what a device talks to. Maps, executes on an AIO engine,
applies the cache mode.

Cache modes are three booleans, as QEMU defines them:

  mode          writeback  direct  no_flush
  writeback        yes       no       no
  writethrough     no        no       no
  none             yes       yes      no
  directsync       no        yes      no
  unsafe           yes       no       yes

``direct`` opens the image with O_DIRECT. Without ``writeback`` every write is
followed by a flush before it completes (writethrough is done here, once,
for every driver). ``no_flush`` turns guest flushes into no-ops. The guest
may turn its write cache on and off (virtio-blk CONFIG_WCE), which toggles
``writeback`` at run time.

Every request carries an integer token from the device and completes as
``(token, result)``, result >= 0 on success or -errno. With O_DIRECT, a
request whose buffers or offset are not aligned goes through an aligned
bounce buffer.
"""
from __future__ import annotations

import collections
import errno
import mmap
import os

from .._native import ffi, lib
from ..aio import FALLOCATE, FLUSH, READ, WRITE, AioRequest, PythonEngine
from .driver import DRIVERS, BlockError, probe_format

CacheMode = collections.namedtuple("CacheMode", "writeback direct no_flush")
CACHE_MODES = {
    "writeback": CacheMode(True, False, False),
    "writethrough": CacheMode(False, False, False),
    "none": CacheMode(True, True, False),
    "directsync": CacheMode(False, True, False),
    "unsafe": CacheMode(True, False, True),
}
DISCARD_MODES = ("ignore", "unmap")
SECTOR = 512
ZERO_CHUNK = 1 << 20
_ZEROES = bytes(ZERO_CHUNK)


class _Pending:
    """A backend request in flight: the device's token and what is left to do."""

    __slots__ = ("token", "op", "result", "bounce", "iov", "then_flush")

    def __init__(self, token: int, op: str, iov=None, bounce=None, then_flush=False):
        self.token = token
        self.op = op
        self.iov = iov
        self.bounce = bounce
        self.then_flush = then_flush
        self.result = 0


class BlockBackend:
    def __init__(self, path: str, fmt: str | None = None, cache: str = "writeback",
                 read_only: bool = False, discard: str = "unmap", engine=None):
        if cache not in CACHE_MODES:
            raise BlockError(path, f"unknown cache mode {cache!r} (one of {', '.join(CACHE_MODES)})")
        if discard not in DISCARD_MODES:
            raise BlockError(path, f"unknown discard mode {discard!r} (ignore or unmap)")
        self.cache = CACHE_MODES[cache]
        self.cache_name = cache
        fmt = fmt or probe_format(path)
        if fmt not in DRIVERS:
            raise BlockError(path, f"unknown format {fmt!r} (one of {', '.join(DRIVERS)})")
        self.driver = DRIVERS[fmt](path, read_only=read_only, direct=self.cache.direct)
        self.format = fmt
        self.path = path
        self.read_only = read_only
        self.discard_mode = discard
        self.size = self.driver.size
        self.write_cache = self.cache.writeback
        self.engine = engine or PythonEngine()
        self.notifier = self.engine.notifier
        self.align = self._probe_alignment() if self.cache.direct else 1
        self._pending: dict[int, _Pending] = {}
        self._next = 1
        self._ready: list[tuple[int, int]] = []
        self.stats = collections.Counter()

    # -- set-up ------------------------------------------------------------------

    def _probe_alignment(self) -> int:
        """Smallest buffer/offset alignment O_DIRECT accepts on this file (512 or 4096)."""
        buf = mmap.mmap(-1, 8192)
        try:
            view = memoryview(buf)
            for align in (SECTOR, 4096):
                try:
                    os.preadv(self.driver.fd, [view[align:align + align]], 0)
                    return align
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        return 4096
            return 4096
        finally:
            view.release()
            buf.close()

    # -- submission ----------------------------------------------------------------

    def _id(self, pending: _Pending) -> int:
        rid = self._next
        self._next = (self._next + 1) & 0x7FFFFFFFFFFFFFFF or 1
        self._pending[rid] = pending
        return rid

    def _complete_now(self, token: int, result: int) -> None:
        self._ready.append((token, result))
        os.eventfd_write(self.notifier, 1)

    def _aligned(self, offset: int, iov) -> bool:
        a = self.align
        if a == 1:
            return True
        if offset % a:
            return False
        for buf in iov:
            if len(buf) % a or int(ffi.cast("uintptr_t", ffi.from_buffer(buf))) % a:
                return False
        return True

    def readv(self, token: int, offset: int, iov: list) -> None:
        self.stats["read"] += 1
        if self._aligned(offset, iov):
            rid = self._id(_Pending(token, READ, iov=iov))
            self.engine.submit([AioRequest(READ, self.driver.fd, offset, iov, rid)])
            return
        total = sum(len(b) for b in iov)
        if offset % self.align or total % self.align:
            self._complete_now(token, -errno.EINVAL)  # smaller than the advertised block size
            return
        bounce = _Bounce(total, self.align)
        rid = self._id(_Pending(token, READ, iov=iov, bounce=bounce))
        self.engine.submit([AioRequest(READ, self.driver.fd, offset, [bounce.view], rid)])

    def writev(self, token: int, offset: int, iov: list) -> None:
        self.stats["write"] += 1
        if self.read_only:
            self._complete_now(token, -errno.EROFS)
            return
        flush = not self.write_cache and not self.cache.no_flush
        if self._aligned(offset, iov):
            rid = self._id(_Pending(token, WRITE, then_flush=flush))
            self.engine.submit([AioRequest(WRITE, self.driver.fd, offset, iov, rid)])
            return
        total = sum(len(b) for b in iov)
        if offset % self.align or total % self.align:
            self._complete_now(token, -errno.EINVAL)
            return
        bounce = _Bounce(total, self.align)
        pos = 0
        for b in iov:
            bounce.view[pos:pos + len(b)] = b
            pos += len(b)
        rid = self._id(_Pending(token, WRITE, bounce=bounce, then_flush=flush))
        self.engine.submit([AioRequest(WRITE, self.driver.fd, offset, [bounce.view], rid)])

    def flush(self, token: int) -> None:
        self.stats["flush"] += 1
        if self.cache.no_flush:
            self._complete_now(token, 0)
            return
        self.driver.flush_metadata()
        rid = self._id(_Pending(token, FLUSH))
        self.engine.submit([AioRequest(FLUSH, self.driver.fd, token=rid)])

    def discard(self, token: int, offset: int, length: int) -> None:
        """Give the range back to the host (discard=unmap); advisory, never fails
        for lack of support."""
        self.stats["discard"] += 1
        if self.read_only:
            self._complete_now(token, -errno.EROFS)
            return
        if self.discard_mode == "ignore" or length == 0:
            self._complete_now(token, 0)
            return
        rid = self._id(_Pending(token, "discard"))
        self.engine.submit([AioRequest(FALLOCATE, self.driver.fd, offset, token=rid,
                                       mode=lib.FALLOC_FL_PUNCH_HOLE | lib.FALLOC_FL_KEEP_SIZE,
                                       length=length)])

    def write_zeroes(self, token: int, offset: int, length: int, unmap: bool) -> None:
        """Zero a range: punch a hole when the guest allows unmapping and
        discard=unmap, else allocate zeroes (falling back to writing them)."""
        self.stats["write_zeroes"] += 1
        if self.read_only:
            self._complete_now(token, -errno.EROFS)
            return
        if length == 0:
            self._complete_now(token, 0)
            return
        punch = unmap and self.discard_mode == "unmap"
        mode = (lib.FALLOC_FL_PUNCH_HOLE if punch else lib.FALLOC_FL_ZERO_RANGE) | \
            lib.FALLOC_FL_KEEP_SIZE
        flush = not self.write_cache and not self.cache.no_flush
        pending = _Pending(token, "write_zeroes", then_flush=flush)
        pending.iov = (offset, length)  # kept for the write fallback
        rid = self._id(pending)
        self.engine.submit([AioRequest(FALLOCATE, self.driver.fd, offset, token=rid, mode=mode,
                                       length=length)])

    # -- completion ------------------------------------------------------------------

    def reap(self) -> list[tuple[int, int]]:
        """Completed requests as (token, result); never blocks."""
        out, self._ready = self._ready, []
        for rid, result in self.engine.reap():
            p = self._pending.pop(rid, None)
            if p is None:
                continue
            done = self._finish(p, result)
            if done is not None:
                out.append(done)
        return out

    def _finish(self, p: _Pending, result: int):
        if p.op == READ and p.bounce is not None:
            if result >= 0:
                pos = 0
                for b in p.iov:
                    b[:] = p.bounce.view[pos:pos + len(b)]
                    pos += len(b)
            p.bounce.close()
        elif p.op == READ and result >= 0:
            expected = sum(len(b) for b in p.iov)
            if result < expected:  # past the end of the file: zeroes
                self._zero_tail(p.iov, result)
                result = expected
        elif p.op == WRITE and p.bounce is not None:
            p.bounce.close()
            p.bounce = None
        elif p.op == "discard" and result in (-errno.EOPNOTSUPP, -errno.ENOSYS):
            result = 0  # discard is a hint
        elif p.op == "write_zeroes" and result in (-errno.EOPNOTSUPP, -errno.ENOSYS,
                                                   -errno.EINVAL) and isinstance(p.iov, tuple):
            offset, length = p.iov
            p.iov = None
            p.op = WRITE
            rid = self._id(p)
            self.engine.submit([AioRequest(WRITE, self.driver.fd, offset, _zero_iov(length), rid)])
            return None
        if p.then_flush and result >= 0:
            p.then_flush = False
            p.result = result
            p.op = "flush-after"
            rid = self._id(p)
            self.engine.submit([AioRequest(FLUSH, self.driver.fd, token=rid)])
            return None
        if p.op == "flush-after":
            result = p.result if result >= 0 else result
        return p.token, result

    @staticmethod
    def _zero_tail(iov, done: int) -> None:
        pos = 0
        for b in iov:
            if pos + len(b) > done:
                start = max(0, done - pos)
                b[start:] = bytes(len(b) - start)
            pos += len(b)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def drain(self) -> list[tuple[int, int]]:
        """Wait until nothing is in flight; return what completed meanwhile."""
        import select
        out = self.reap()
        poller = select.poll()
        poller.register(self.notifier, select.POLLIN)
        while self._pending:
            poller.poll(1000)
            out += self.reap()
        return out

    def close(self) -> None:
        self.drain()
        self.engine.close()
        self.driver.close()


def _zero_iov(length: int) -> list:
    iov = []
    while length:
        n = min(length, ZERO_CHUNK)
        iov.append(memoryview(_ZEROES)[:n])
        length -= n
    return iov


class _Bounce:
    """An aligned host buffer for O_DIRECT requests whose guest buffers are not."""

    def __init__(self, size: int, align: int):
        self.map = mmap.mmap(-1, max(size, align))   # page-aligned
        self.view = memoryview(self.map)[:size]

    def close(self) -> None:
        self.view.release()
        self.map.close()
