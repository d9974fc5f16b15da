"""AIO engines: submit requests, get told by an eventfd, reap completions.

One shape for every engine (pull-based, as in Cloud Hypervisor's block
crate): ``submit(requests)`` hands over a batch, the engine writes its
``notifier`` eventfd when completions are ready, and ``reap()`` returns them
as ``(token, result)`` pairs, where result is the byte count or ``-errno``.
Tokens are plain integers the caller chose; nothing else crosses over.

``PythonEngine`` (aio=python) runs the system calls on a few worker threads:
preadv/pwritev straight into and out of guest memory (the I/O vectors are
memoryviews over it, no copy), fdatasync, fallocate. The C engines (threads,
linux-aio, io_uring) implement the same interface in native/.
"""
from __future__ import annotations

import collections
import errno
import os
import queue
import threading

from .._native import lib

READ, WRITE, FLUSH, FALLOCATE = "read", "write", "flush", "fallocate"

# Descriptors that are not files: every request on one goes to its owner,
# ``route(req) -> bytes done or -errno`` (blocking; an NBD connection, see
# block/nbd.py, whose key descriptor is an eventfd no one reads, so a stray
# system call on it fails instead of reading something else). The C engines
# keep the same table in C (native/nbd.c).
ROUTES: dict = {}


class AioRequest:
    """One operation. ``iov``: list of buffers (memoryviews) for READ/WRITE;
    ``mode``/``length`` for FALLOCATE (FALLOC_FL_* flags)."""

    __slots__ = ("op", "fd", "offset", "iov", "token", "mode", "length")

    def __init__(self, op: str, fd: int, offset: int = 0, iov=None, token: int = 0,
                 mode: int = 0, length: int = 0):
        self.op = op
        self.fd = fd
        self.offset = offset
        self.iov = iov or []
        self.token = token
        self.mode = mode
        self.length = length


def execute(req: AioRequest) -> int:
    """Do one request synchronously; return bytes done or -errno. Short reads
    and writes are continued until done (a read past the end of the file
    returns what it got)."""
    route = ROUTES.get(req.fd)
    if route is not None:
        return route(req)
    try:
        if req.op == READ or req.op == WRITE:
            iov = list(req.iov)
            total = 0
            offset = req.offset
            while iov:
                n = os.preadv(req.fd, iov, offset) if req.op == READ else \
                    os.pwritev(req.fd, iov, offset)
                if n <= 0:
                    if req.op == WRITE:
                        return -errno.EIO
                    break  # end of file
                total += n
                offset += n
                while iov and n >= len(iov[0]):
                    n -= len(iov[0])
                    iov.pop(0)
                if iov and n:
                    iov[0] = iov[0][n:]
            return total
        if req.op == FLUSH:
            os.fdatasync(req.fd)
            return 0
        if req.op == FALLOCATE:
            return lib.pykvm_fallocate(req.fd, req.mode, req.offset, req.length)
        return -errno.EINVAL
    except OSError as e:
        return -(e.errno or errno.EIO)


class AioEngine:
    """The engine interface (see the module docstring)."""

    name = "abstract"
    notifier: int

    def submit(self, requests: list[AioRequest]) -> None:
        raise NotImplementedError

    def reap(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PythonEngine(AioEngine):
    """A pool of worker threads doing the system calls (the GIL is released
    inside each one). Completion order is whatever the kernel gives."""

    name = "python"

    def __init__(self, workers: int = 8):
        self.notifier = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._done_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, name=f"aio-python-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def _worker(self) -> None:
        work, done, lock, notifier = self._work, self._done, self._done_lock, self.notifier
        while True:
            req = work.get()
            if req is None:
                return
            result = execute(req)
            # One notification per batch: only the completion that finds the
            # list empty writes the eventfd; reap() takes everything there is
            # (and reads the eventfd before it looks, so none is missed).
            with lock:
                done.append((req.token, result))
                first = len(done) == 1
            if first:
                os.eventfd_write(notifier, 1)

    def submit(self, requests: list[AioRequest]) -> None:
        put = self._work.put
        for r in requests:
            put(r)

    def reap(self) -> list[tuple[int, int]]:
        try:
            os.eventfd_read(self.notifier)
        except BlockingIOError:
            pass
        with self._done_lock:
            out = list(self._done)
            self._done.clear()
        return out

    def close(self) -> None:
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join()
        os.close(self.notifier)
