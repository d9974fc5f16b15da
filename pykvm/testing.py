"""pykvm's experiment API and pytest plugin (registered as ``pytest11``: any
test session with pykvm installed gets the fixtures).

A driver experiment in a few lines::

    def test_eio_on_the_third_write(vm, image):
        disk = Disk(image("raw", "16M"))
        disk.inject("error", op="write", nth=3)
        run = vm(disk).fio(rw="randwrite", ios=100, iodepth=4)
        assert run.device["errors"] == 1
        assert [r["op"] for r in disk.trace() if r["status"] != "ok"] == ["write"]

Fixtures:

- ``image``: ``image(fmt="raw"|"qcow2", size="16M", backing=None, **qemu_img_o)``
  makes an image in the test's temporary folder with qemu-img and returns its path.
- ``vm``: ``vm(disk, **disk_options)`` returns a ``VM`` that boots the workload
  guest (guest/guests/workload.c) on ``disk`` (a ``Disk`` or a path) under
  KVM; ``VM.fio(**options)`` runs it once (``pykvm fio``'s options, as
  keywords) and returns a ``Run``.
- ``linux_guest``: ``linux_guest(disk, script, timeout=300, **disk_options)``
  boots the Linux kit (``make linux-kit``) in QEMU (TCG) with ``disk`` as
  /dev/vda through a vhost-user-blk device whose back-end (``pykvm serve``'s
  VhostUserExport) runs in a thread of the test, runs ``script`` with busybox
  sh, and returns a ``LinuxRun`` (``rc``: the script's exit status,
  ``output``: what it printed, ``console``: the whole console).

A ``Disk`` is an image with a blkdebug node and a trace, both live across
runs: ``inject(action, **keys)`` adds a rule (the rules file's ``[fault]``
keys, ``_`` for ``-``; ``kind="inject-error"`` or ``"set-state"`` for QEMU's
sections), ``release()`` lets hung requests and held completions go (from
another thread while a run blocks), ``mark(name)`` makes a named point of a
live run (a write-log mark; rules with ``mark=name`` wait for it), ``trace()``
the trace records so far, ``rules()`` how often each rule matched and fired,
``counters()`` the device's counters of the last run.

Stability: the names above are the API; anything else here may change.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import tempfile

from .block.filters.volatile import new_plan
from .block.inject import Injector, name_injector, rule_from
from .block.trace import read as read_trace

__all__ = ["Disk", "LinuxRun", "Run", "VM", "image", "linux_guest", "run_linux", "serve_nbd",
           "vm"]


class InjectedRule(int):
    """What ``Disk.inject()`` returns: the rule's index (``disk.rules()[i]``,
    the trace's ``rule``), and ``remove()``: from now on it matches nothing,
    on both paths, also while a run blocks (its counts stay)."""

    def __new__(cls, index: int, injector):
        self = super().__new__(cls, index)
        self._injector = injector
        return self

    def remove(self) -> None:
        self._injector.remove(int(self))


class Disk:
    """An image under a blkdebug node whose rules the test adds (see module doc)."""

    def __init__(self, path, fmt: str | None = None, trace: str | os.PathLike | None = None,
                 volatile: bool = False, volatile_max: str | None = None, log=None):
        self.path = str(path)
        # log: a file for a write log (a blklogwrites node on top; crashtest reads it)
        self.log = str(log) if log is not None else None
        self.format = fmt
        # volatile: a volatile node on top, so that power_cut() may lose writes
        self.volatile = volatile
        self.volatile_max = volatile_max
        self._plan = new_plan() if volatile else None
        self.injector = Injector([])
        self._name = name_injector(self.injector)
        self.trace_path = str(trace) if trace is not None else self.path + ".trace.jsonl"
        open(self.trace_path, "w").close()
        self.last_counters: dict = {}
        self._traces: list[dict] = []

    def spec(self, **options) -> str:
        """The --disk spec that opens this disk (the node under the format)."""
        fmt = f"driver={self.format}," if self.format else ""
        extra = "".join(f",{k.replace('_', '-')}={v}" for k, v in options.items())
        spec = (f"{fmt}file.driver=blkdebug,file.x-injector={self._name},"
                f"file.image.driver=file,file.image.filename={self.path}")
        if self.volatile:   # the same, one level down, under the volatile node
            spec = "driver=volatile," + f"x-plan={self._plan}," + \
                (f"volatile-max={self.volatile_max}," if self.volatile_max else "") + \
                ",".join("file." + item for item in spec.split(","))
        if self.log:        # and under the log on top of all
            spec = f"driver=blklogwrites,log={self.log}," + \
                ",".join("file." + item for item in spec.split(","))
        return f"{spec},trace={self.trace_path}{extra}"

    def power_cut(self, keep: str = "flushed", seed: int = 0, torn: bool = False) -> None:
        """Cut the power at the end of the current (or next) run: when the VM
        stops, its volatile writes are lost as ``keep`` says (flushed: all of
        them; all: none; random: a seeded subset, ``torn``: sector by sector).
        ``cut_result()`` then says what was lost."""
        from .block.filters.volatile import KEEP, PLANS
        if not self.volatile:
            raise ValueError("power_cut needs Disk(..., volatile=True)")
        if keep not in KEEP:
            raise ValueError(f"keep={keep!r} is not one of {', '.join(KEEP)}")
        PLANS[self._plan]["cut"] = (keep, seed, torn)

    def cut_result(self) -> dict | None:
        from .block.filters.volatile import PLANS
        return PLANS[self._plan]["result"] if self._plan else None

    def inject(self, action: str, kind: str = "fault", **keys) -> "InjectedRule":
        """Add a rule now (it applies at once, also during a run); its index,
        as an int whose ``remove()`` takes the rule away again."""
        items = {k.replace("_", "-") if k != "new_state" else k: v for k, v in keys.items()}
        if kind == "fault":
            items["action"] = action
        return InjectedRule(self.injector.add(rule_from(kind, items, "inject()")), self.injector)

    def release(self) -> None:
        self.injector.release()

    def mark(self, name: str) -> dict:
        """A named point of the running VM's (or export's) run: a mark in the
        write log (``log=``), and the rules waiting for it (``mark=NAME``) are
        armed or cut the power. Call it from another thread while a run blocks."""
        from .errors import PykvmError
        hooks = list(self.injector.on_mark)
        if not hooks:
            raise PykvmError(f"{self.path}: mark({name!r}): no run of this disk is live")
        return [fn(name) for fn in hooks][-1]

    def rules(self) -> list[dict]:
        return self.injector.counts()

    def trace(self) -> list[dict]:
        """Every trace record of every run so far, in the order written."""
        return self._traces + (read_trace(self.trace_path)
                               if os.path.getsize(self.trace_path) else [])

    def _keep_trace(self) -> None:
        # each run rewrites the file: keep what the earlier runs wrote
        self._traces = self.trace()
        open(self.trace_path, "w").close()

    def counters(self) -> dict:
        return dict(self.last_counters)


class Run:
    """One boot of the workload guest: ``job`` (fio's JSON job: ``read``,
    ``write``, ``error``, ``verify_errors``), ``device`` (its counters),
    ``status`` (the guest's exit status), ``stderr`` (the VMM's log lines)."""

    def __init__(self, doc: dict, status: int, stderr: str):
        self.doc = doc
        self.job = doc["jobs"][0]
        self.device = doc.get("pykvm", {}).get("device", {})
        self.status = status
        self.stderr = stderr

    @property
    def errors(self) -> int:
        return self.device.get("errors", 0)


class VM:
    """The workload guest on one disk (see module doc)."""

    def __init__(self, disk, **disk_options):
        self.disk = disk if isinstance(disk, Disk) else Disk(disk)
        self.disk_options = disk_options

    def fio(self, cut_after: float | None = None, **options) -> Run:
        """Boot the workload guest once with ``pykvm fio``'s options (``rw=``,
        ``bs=``, ``iodepth=``, ``ios=``, ``runtime=``, ``verify=``, ...).
        ``cut_after``: the power goes after that many seconds (the VM stops
        at once; with a volatile disk, the cut planned by power_cut(), or
        keep="flushed", applies); the Run then has status None."""
        from . import cli
        from .errors import PykvmError
        if cut_after is not None:
            if self.disk.volatile:
                from .block.filters.volatile import PLANS
                plan = PLANS[self.disk._plan]
                plan["cut"] = plan["cut"] or ("flushed", 0, False)
                plan["result"] = None
            options["timeout"] = cut_after
        argv = ["fio", "--disk", self.disk.spec(**self.disk_options), "--output-format", "json"]
        for k, v in options.items():
            flag = "--" + k.replace("_", "-")
            argv += [flag] if v is True else [] if v is False else [flag, str(v)]
        out, err = io.StringIO(), io.StringIO()
        if os.path.getsize(self.disk.trace_path):
            self.disk._keep_trace()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = cli.build_parser().parse_args(argv)
            try:
                status = cli.cmd_fio(args)
            except PykvmError:
                if cut_after is None:
                    raise
                status = None       # cut: the guest printed no result
        if status is None:
            return Run({"jobs": [{}]}, None, err.getvalue())
        doc = json.loads(out.getvalue())
        run = Run(doc, status, err.getvalue())
        self.disk.last_counters = run.device
        return run


class LinuxRun:
    """The Linux kit's run: ``rc``, ``output``, ``console``, ``device`` (counters)."""

    def __init__(self, result, device: dict):
        self.rc = result.rc
        self.output = result.output
        self.console = result.console
        self.device = device


def run_linux(disk, script: str, timeout: float = 300, **disk_options) -> LinuxRun:
    """Boot the Linux kit on ``disk`` (see ``linux_guest``)."""
    import threading

    from .machine import DiskSpec
    from .serve import VhostUserExport
    from tests.helpers import linux_kit     # the kit lives with pykvm's tests (make linux-kit)
    disk = disk if isinstance(disk, Disk) else Disk(disk)
    if os.path.getsize(disk.trace_path):
        disk._keep_trace()
    folder = tempfile.mkdtemp(prefix="pykvm-vu-")     # short: a socket path has 108 bytes
    sock = os.path.join(folder, "vu.sock")
    export = VhostUserExport(DiskSpec.parse(disk.spec(**disk_options)), sock)
    thread = threading.Thread(target=export.serve_forever, name="linux-guest-export",
                              daemon=True)
    thread.start()
    try:
        result = linux_kit.run_tcg(linux_kit.kit(), script, shared_mem=True, timeout=timeout,
                                   qemu_args=["-chardev", f"socket,id=vu,path={sock},reconnect=1",
                                              "-device", "vhost-user-blk-pci,chardev=vu,"
                                              "num-queues=1"])
    finally:
        export.stop()
        thread.join(30)
        device = export.counters()
        export.close()
        os.rmdir(folder)
    disk.last_counters = device
    return LinuxRun(result, device)


@contextlib.contextmanager
def serve_nbd(disk, **disk_options):
    """``disk`` (a ``Disk`` or a path) served over NBD (``pykvm serve --nbd``'s
    NbdExport) from a thread of the test, on a Unix socket: yields the export's
    ``nbd+unix:///?socket=...`` URI; the export stops when the block ends (a
    write log is then complete)."""
    import threading

    from .machine import DiskSpec
    from .serve import NbdExport
    disk = disk if isinstance(disk, Disk) else Disk(disk)
    folder = tempfile.mkdtemp(prefix="pykvm-nbd-")
    sock = os.path.join(folder, "nbd.sock")
    export = NbdExport(DiskSpec.parse(disk.spec(**disk_options)), f"unix:{sock}",
                       persistent=True)
    thread = threading.Thread(target=export.serve_forever, name="nbd-export", daemon=True)
    thread.start()
    try:
        yield f"nbd+unix:///?socket={sock}"
    finally:
        export.stop()
        thread.join(30)
        disk.last_counters = export.counters()
        export.close()
        os.rmdir(folder)


def make_image(folder, fmt: str = "raw", size="16M", backing=None, name=None, **opts) -> str:
    """An image made by qemu-img (``opts``: its -o options, as qemu-img spells them)."""
    make_image.count = getattr(make_image, "count", 0) + 1
    path = os.path.join(str(folder), name or f"disk{make_image.count}.{fmt}")
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    o = [f"{k}={v}" for k, v in opts.items()]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2" if str(backing).endswith(".qcow2") else "raw"]
    if o:
        cmd += ["-o", ",".join(o)]
    subprocess.run(cmd + [path] + ([str(size)] if size is not None else []), check=True)
    return path


# -- the pytest plugin ------------------------------------------------------------------

try:
    import pytest
except ImportError:     # the API works without pytest; the fixtures need it
    pytest = None

if pytest is not None:
    @pytest.fixture
    def image(tmp_path):
        """``image(fmt="raw", size="16M", backing=None, **qemu_img_o)`` -> path."""
        def make(fmt="raw", size="16M", backing=None, **opts):
            return make_image(tmp_path, fmt, size, backing, **opts)
        return make

    @pytest.fixture
    def vm():
        """``vm(disk, **disk_options)`` -> VM (the workload guest under KVM)."""
        return VM

    @pytest.fixture
    def linux_guest():
        """``linux_guest(disk, script, timeout=300, **disk_options)`` -> LinuxRun."""
        return run_linux
