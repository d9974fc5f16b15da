"""The C AIO engines (native/aio.c) as AioEngines: threads, native, io_uring.

Same interface as PythonEngine: ``submit(requests)``, a ``notifier``
eventfd, ``reap()`` -> ``[(token, result)]``. The C engine gets plain
integers and host addresses; this wrapper keeps each request's buffers and
I/O vector alive until its token is reaped, and holds back what does not fit
in the engine's depth until completions make room.

``aio=native`` is Linux AIO, which is asynchronous only with O_DIRECT: with a
cached mode it is refused (``check_engine``), as QEMU refuses it.
"""
from __future__ import annotations

import collections
import logging
import os
import threading

from .._native import ffi, lib
from ..errors import ConfigError
from . import FALLOCATE, FLUSH, READ, WRITE, AioEngine

log = logging.getLogger("pykvm.aio")

C_ENGINES = ("threads", "native", "io_uring")
# fastest first, as measured on this machine (bench/); what "the fastest
# engine that works here" means for the default
PREFERENCE = ("io_uring", "native", "threads")
DEFAULT_DEPTH = 1024
_OPS = {READ: lib.PYKVM_AIO_READ, WRITE: lib.PYKVM_AIO_WRITE, FLUSH: lib.PYKVM_AIO_FLUSH,
        FALLOCATE: lib.PYKVM_AIO_FALLOCATE}


class EngineUnavailable(ConfigError):
    """The engine cannot run here (or not with these settings); one line why."""


def check_engine(name: str, direct: bool) -> None:
    """Refuse an engine/cache combination that cannot work (aio=native needs O_DIRECT)."""
    if name not in C_ENGINES:
        raise EngineUnavailable(f"aio={name}: unknown engine (one of {', '.join(C_ENGINES)})")
    if name == "native" and not direct:
        raise EngineUnavailable("aio=native needs cache=none or cache=directsync: Linux AIO "
                                "is asynchronous only with O_DIRECT")


def probe(name: str) -> str | None:
    """None when engine ``name`` opens here, else the one-line reason it does not."""
    err = ffi.new("char[256]")
    aio = lib.pykvm_aio_open(name.encode(), 8, err, len(err))
    if aio == ffi.NULL:
        return ffi.string(err).decode()
    lib.pykvm_aio_close(aio)
    return None


def default_engine(direct: bool) -> str:
    """The fastest engine that works here with this cache mode ("python" at
    worst); one warning line when it is not the first choice, saying why."""
    skipped = []
    for name in PREFERENCE:
        if name == "native" and not direct:
            continue  # not a fallback: Linux AIO does not apply to cached modes
        why = probe(name)
        if why is None:
            break
        skipped.append(why)
    else:
        name = "python"
    if skipped:
        log.warning("%s; using aio=%s", "; ".join(skipped), name)
    return name


class NativeEngine(AioEngine):
    """One C engine. One thread at a time submits and reaps (the device's I/O
    thread, or the fast path's punt handler); a lock makes a stray caller
    (drain from a reset) safe too."""

    def __init__(self, name: str, depth: int = DEFAULT_DEPTH):
        if name not in C_ENGINES:
            raise EngineUnavailable(f"aio={name}: unknown engine (one of "
                                    f"{', '.join(C_ENGINES)})")
        err = ffi.new("char[256]")
        self._aio = lib.pykvm_aio_open(name.encode(), depth, err, len(err))
        if self._aio == ffi.NULL:
            raise EngineUnavailable(ffi.string(err).decode())
        self.name = name
        self.depth = depth
        self.notifier = lib.pykvm_aio_notifier(self._aio)
        self._lock = threading.Lock()
        self._keep: dict[int, tuple] = {}       # token -> what the kernel may still touch
        self._backlog: collections.deque = collections.deque()
        self._failed: list[tuple[int, int]] = []
        self._done = ffi.new("struct pykvm_aio_done[]", 256)

    def _prepare(self, req, creq) -> None:
        creq.token = req.token
        creq.op = _OPS[req.op]
        creq.fd = req.fd
        creq.offset = req.offset
        creq.mode = req.mode
        creq.length = req.length
        keep = ()
        if req.op == READ or req.op == WRITE:
            iov = ffi.new("struct iovec[]", max(1, len(req.iov)))
            bufs = []
            for i, b in enumerate(req.iov):
                cbuf = ffi.from_buffer(b)
                bufs.append(cbuf)
                iov[i].iov_base = cbuf
                iov[i].iov_len = len(cbuf)
            creq.iov = iov
            creq.iovcnt = len(req.iov)
            keep = (iov, bufs, req)
        if req.token in self._keep:
            raise ValueError(f"AIO token {req.token} is already in flight")
        self._keep[req.token] = keep

    def _submit_locked(self) -> None:
        while self._backlog:
            room = self.depth - lib.pykvm_aio_in_flight(self._aio)
            n = min(room, len(self._backlog))
            if n <= 0:
                return
            batch = [self._backlog.popleft() for _ in range(n)]
            creqs = ffi.new("struct pykvm_aio_req[]", n)
            for req, creq in zip(batch, creqs):
                self._prepare(req, creq)
            taken = lib.pykvm_aio_submit(self._aio, creqs, n)
            if taken < 0:  # the engine is broken: these fail, nothing is lost silently
                for req in batch:
                    self._keep.pop(req.token, None)
                    self._failed.append((req.token, taken))
                os.eventfd_write(self.notifier, 1)
                return
            for req in reversed(batch[taken:]):
                self._keep.pop(req.token, None)
                self._backlog.appendleft(req)
            if taken < n:
                return

    def submit(self, requests) -> None:
        with self._lock:
            self._backlog.extend(requests)
            self._submit_locked()

    def reap(self) -> list[tuple[int, int]]:
        with self._lock:
            out, self._failed = self._failed, []
            while True:
                n = lib.pykvm_aio_reap(self._aio, self._done, len(self._done))
                for i in range(n):
                    token = self._done[i].token
                    self._keep.pop(token, None)
                    out.append((token, self._done[i].result))
                if n < len(self._done):
                    break
            if self._backlog:
                self._submit_locked()
        return out

    @property
    def in_flight(self) -> int:
        return lib.pykvm_aio_in_flight(self._aio) + len(self._backlog)

    def close(self) -> None:
        with self._lock:
            if self._aio is not None:
                self._backlog.clear()
                lib.pykvm_aio_close(self._aio)  # waits for what is in flight
                self._aio = None
                self._keep.clear()


def open_engine(name: str, direct: bool = True, depth: int = DEFAULT_DEPTH) -> AioEngine:
    """An engine by its --disk aio= name ("python" included), checked against
    the cache mode; raises EngineUnavailable with the reason."""
    if name == "python":
        from . import PythonEngine
        return PythonEngine()
    check_engine(name, direct)
    return NativeEngine(name, depth)
