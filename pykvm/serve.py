"""serve: a device model without a VM, wired here once (DESIGN's "machine/serve").

``VhostUserExport(spec, path)`` opens a ``--disk`` spec's block graph, puts a
virtio-blk device on it (with its trace, if the spec asks for one) and listens
on a vhost-user socket; ``serve_forever()`` serves one front-end at a time
until ``stop()``; ``close()`` takes it all down. ``pykvm serve`` runs one in
the main thread; ``pykvm.testing`` runs one in a thread of the test.
``NbdExport(spec, addr)`` has the same shape for an NBD server (export/nbd.py).
"""
from __future__ import annotations

import logging
import os

from .errors import ConfigError
from .machine import DiskSpec, open_disk


def _stopped(dev, line: str) -> None:
    """werror/rerror=stop|enospc on an export: the device holds its requests
    until resumed (SIGCONT to pykvm serve), as a VM pauses."""
    logging.getLogger("pykvm.virtio").error(
        "%s; export paused: fix the cause, then send SIGCONT to pid %d", line, os.getpid())


class _Export:
    """What both exports share: the run's clock, and a QMP socket's target (qmp.py)."""

    def serve_forever(self) -> None:
        self.backend.start_clock()      # blkdebug rules with a time count from here
        self.server.serve_forever()

    def qmp_disks(self) -> dict:
        return {self.backend.name: self.backend}

    def qmp_status(self) -> str:
        return "running"

    def qmp_stop(self) -> None:
        from .qmp import QmpError
        raise QmpError("an export does not pause (pykvm serve); quit ends it")

    def qmp_cont(self) -> None:
        self.resume()

    def resume(self) -> None:
        pass

    def qmp_quit(self) -> None:
        self.stop()


class VhostUserExport(_Export):
    def __init__(self, spec: DiskSpec, path: str, mode: int = 0o600,
                 name: str = "vhost-user-blk"):
        from .virtio.blk import VirtioBlk
        from .virtio.transport.vhost_user import VhostUserServer
        self.spec = spec
        self.backend = open_disk(spec)
        self.trace = None
        try:
            if spec.trace:
                from .block.trace import Trace
                try:
                    self.trace = Trace(spec.trace)
                except OSError as e:
                    raise ConfigError(f"--disk ...,trace={spec.trace}: {e.strerror}") from None
            # No polling unless asked: the front-end's vCPUs run in another
            # process, most likely on the same host CPUs, and a polling back-end
            # takes CPU time from them (two quick bench runs with QEMU TCG on 2
            # CPUs: 15.6 us of CPU per request without polling, 21.2 us with, and
            # fewer IOPS). qemu-storage-daemon does not poll either unless given
            # an iothread.
            poll = 0 if spec.poll_max_ns is None else spec.poll_max_ns
            self.device = VirtioBlk(self.backend, serial=spec.serial or "pykvm-vhost0", name=name,
                                    poll_max_ns=poll, irq_coalesce_ns=spec.irq_coalesce_ns,
                                    num_queues=spec.queues, iothread=spec.iothread,
                                    trace=self.trace, werror=spec.werror, rerror=spec.rerror,
                                    on_stop=_stopped, knobs=spec.knobs)
        except BaseException:
            self.backend.close()
            if self.trace is not None:
                self.trace.close()
            raise
        try:
            self.server = VhostUserServer(self.device, path, name=name, mode=mode)
        except BaseException:
            self.device.close()
            if self.trace is not None:
                self.trace.close()
            raise

    def stop(self) -> None:
        """Ask serve_forever to return (async-signal-safe)."""
        self.server.stop()

    def resume(self) -> None:
        """After werror/rerror=stop|enospc paused the export (SIGCONT in pykvm serve)."""
        self.device.resume()

    def counters(self) -> dict:
        return self.device.counters()

    def close(self) -> None:
        self.server.close()
        self.device.close()
        if self.trace is not None:
            self.trace.close()


class NbdExport(_Export):
    """``pykvm serve --nbd ADDR``: a ``--disk`` spec's block graph served by the
    NBD server of export/nbd.py on ``addr`` (``unix:PATH`` or ``HOST:PORT``).
    ``name``, ``read_only``, ``shared``, ``persistent`` and ``description``
    are qemu-nbd's -x, -r, -e, -t and -D. ``serve_forever()`` runs the event
    loop in the calling thread until ``stop()`` (or, without ``persistent``,
    until the last client has gone); ``close()`` takes it all down."""

    def __init__(self, spec: DiskSpec, addr: str, name: str = "", read_only: bool = False,
                 shared: int = 1, persistent: bool = False, mode: int = 0o600,
                 description: str = ""):
        import copy

        from .export.nbd import NbdServer, listen, parse_addr
        parse_addr(addr)                 # a bad address is refused before any image is opened
        if shared < 0:
            raise ConfigError(f"--shared {shared}: must be 0 (no limit) or more")
        if read_only and not spec.readonly:
            spec = copy.copy(spec)
            spec.readonly = True         # the image opened (and locked) for reading only
        self.spec = spec
        self.addr = addr
        self.backend = open_disk(spec)
        try:
            self.listener = listen(addr, mode)
        except BaseException:
            self.backend.close()
            raise
        try:
            self.server = NbdServer(self.backend, self.listener, name=name,
                                    read_only=spec.readonly, shared=shared,
                                    persistent=persistent, description=description)
        except BaseException:
            self.listener.close()
            self.backend.close()
            raise

    @property
    def where(self) -> str:
        """Where it listens, spelled as ``addr`` (port 0 given: the port chosen)."""
        name = self.listener.getsockname()
        if isinstance(name, str):
            return f"unix:{name}"
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"

    def stop(self) -> None:
        """Ask serve_forever to return (async-signal-safe)."""
        self.server.stop()

    def counters(self) -> dict:
        return dict(self.server.counters)

    def close(self) -> None:
        from .export.nbd import parse_addr
        self.server.close()
        self.backend.close()
        kind, where = parse_addr(self.addr)
        if kind == "unix":
            try:
                os.unlink(where)
            except OSError:
                pass
