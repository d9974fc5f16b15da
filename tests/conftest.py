"""Shared fixtures, and the test matrix.

Tests marked ``kvm`` boot guests on /dev/kvm. They skip only on a host without
/dev/kvm; where the device exists they run, and a failure to use it fails.

The matrix: a test that takes one of these fixtures runs once for each of its
values (the test id names the value, ``test_read[native-none-qcow2-pci]``):

  fixture        values                                   what the test gets
  engine         python, threads, native, io_uring        ``Engine``: a factory of fresh AIO
                                                          engines, paired with a cache mode
  cache_mode     writeback, writethrough, none,           the cache mode's name
                 directsync, unsafe
  image_format   raw, qcow2, qcow2-backing                ``MatrixImage``: a 4 MiB image made
                                                          in tmp_path, and what it reads as
  transport      mmio, pci                                the virtio transport's name
  queue_twin     python, c                                the virtqueue class: SplitQueue or
                                                          its C twin fastpath.CQueue

``engine`` is the Python path (aio=python: PythonEngine) or a C engine
(NativeEngine): a VirtioBlk on a C engine is served by the C fast path. An
engine and a cache mode form one pair: a test that takes both runs on every
pair that can work, and no other: aio=native (Linux AIO) needs O_DIRECT, so it
pairs only with cache=none and cache=directsync (ids ``native-none``,
``threads-writethrough``, ...). A test that takes ``engine`` alone runs on
each engine with its own cache mode: writeback, and none for native (ids
``python``, ``threads``, ``native-none``, ``io_uring``).

``@pytest.mark.matrix(engine=[...], cache_mode=[...], ...)`` on a test, a
class or a module (``pytestmark``) narrows a fixture to the values that
apply there: what does not apply is not collected, rather than skipped or
deselected. An engine that cannot open on this machine is a failure, never a
skip.
"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUEST_BUILD = ROOT / "guest" / "build"
HAVE_KVM = os.path.exists("/dev/kvm")

ENGINES = ("python", "threads", "native", "io_uring")
C_ENGINES = ("threads", "native", "io_uring")
CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
DIRECT_CACHE_MODES = ("none", "directsync")
IMAGE_FORMATS = ("raw", "qcow2", "qcow2-backing")
TRANSPORTS = ("mmio", "pci")
QUEUE_TWINS = ("python", "c")
AXES = {"engine": ENGINES, "cache_mode": CACHE_MODES, "image_format": IMAGE_FORMATS,
        "transport": TRANSPORTS, "queue_twin": QUEUE_TWINS}
ENGINE_DEPTH = 256
IMAGE_SIZE = 4 << 20


def pytest_configure(config):
    config.addinivalue_line("markers", "kvm: boots a guest on /dev/kvm")
    config.addinivalue_line("markers", "qemu: runs QEMU for interoperability")
    config.addinivalue_line("markers", "matrix(**axes): the values of the matrix fixtures "
                            "(engine, cache_mode, image_format, transport, queue_twin) "
                            "that apply to a test; see tests/conftest.py")


def pytest_collection_modifyitems(config, items):
    if HAVE_KVM:
        return
    skip = pytest.mark.skip(reason="this host has no /dev/kvm")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


# -- the matrix ------------------------------------------------------------------------------

def engine_cache_valid(engine: str, cache: str) -> bool:
    """aio=native is Linux AIO: asynchronous only with O_DIRECT."""
    return engine != "native" or cache in DIRECT_CACHE_MODES


def default_cache(engine: str) -> str:
    return "none" if engine == "native" else "writeback"


def _matrix_limits(metafunc) -> dict:
    """{axis: values} from the closest ``matrix`` marker naming each axis."""
    limits = {}
    for mark in metafunc.definition.iter_markers("matrix"):
        if mark.args:
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: matrix() takes only "
                                    f"axis=[values] keywords")
        for axis, values in mark.kwargs.items():
            if axis not in AXES:
                raise pytest.UsageError(f"{metafunc.definition.nodeid}: matrix axis {axis!r} "
                                        f"is not one of {', '.join(AXES)}")
            values = (values,) if isinstance(values, str) else tuple(values)
            bad = [v for v in values if v not in AXES[axis]]
            if bad or not values:
                raise pytest.UsageError(f"{metafunc.definition.nodeid}: matrix {axis}: "
                                        f"{bad or 'no values'} (one of {', '.join(AXES[axis])})")
            limits.setdefault(axis, values)      # the closest marker comes first
    return limits


def pytest_generate_tests(metafunc):
    """Parametrise the matrix fixtures a test uses (directly or through other
    fixtures), engine and cache mode as one valid pair."""
    own = {name for mark in metafunc.definition.iter_markers("parametrize")
           for name in ([mark.args[0]] if isinstance(mark.args[0], (list, tuple)) else
                        [a.strip() for a in mark.args[0].split(",")])}
    axes = [a for a in AXES if a in metafunc.fixturenames and a not in own]
    if not axes:
        return
    limits = _matrix_limits(metafunc)
    values = {a: limits.get(a, AXES[a]) for a in axes}
    if "engine" in values and "cache_mode" in values:
        engines, caches = values.pop("engine"), values.pop("cache_mode")
        pairs = [(e, c) for e in engines for c in caches if engine_cache_valid(e, c)]
        if not pairs:
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: matrix: no engine "
                                    f"of {engines} takes the cache modes {caches}")
        metafunc.parametrize(("engine", "cache_mode"), pairs, indirect=True,
                             ids=[f"{e}-{c}" for e, c in pairs])
    elif "engine" in values:
        engines = values.pop("engine")
        ids = [e if default_cache(e) == "writeback" else f"{e}-{default_cache(e)}" for e in engines]
        metafunc.parametrize("engine", engines, indirect=True, ids=ids)
    for axis, vals in values.items():
        metafunc.parametrize(axis, vals, indirect=True)


class Engine:
    """One engine of the matrix: ``name`` (the --disk aio= value) and the cache
    mode it is paired with. ``engine()`` opens a fresh AIO engine (for
    ``cache``, by default its own); whoever gets it closes it (a BlockBackend
    closes its engine). ``engine.backend(image, **kw)`` is a BlockBackend on a
    fresh one, in the paired cache mode unless ``cache=`` says otherwise."""

    def __init__(self, name: str, cache: str):
        assert engine_cache_valid(name, cache), (name, cache)
        self.name = name
        self.cache = cache

    @property
    def c_path(self) -> bool:
        """A VirtioBlk on this engine is served by the C fast path."""
        return self.name in C_ENGINES

    @property
    def direct(self) -> bool:
        """Its cache mode opens images with O_DIRECT."""
        from pykvm.block.backend import CACHE_MODES as MODES
        return MODES[self.cache].direct

    def __call__(self, cache: str | None = None, depth: int = ENGINE_DEPTH):
        from pykvm.aio.native import open_engine
        from pykvm.block.backend import CACHE_MODES as MODES
        # never a skip: an engine that does not open here raises, and the test fails
        return open_engine(self.name, direct=MODES[cache or self.cache].direct, depth=depth)

    def backend(self, image, cache: str | None = None, **kw):
        from pykvm.block import BlockBackend
        cache = cache or self.cache
        return BlockBackend(image if isinstance(image, (str, dict)) else str(image), cache=cache,
                            engine=self(cache), **kw)

    def __repr__(self):
        return f"Engine({self.name!r}, cache={self.cache!r})"


@pytest.fixture
def cache_mode(request):
    return request.param


@pytest.fixture
def engine(request):
    name = request.param
    cache = request.getfixturevalue("cache_mode") if "cache_mode" in request.fixturenames \
        else default_cache(name)
    return Engine(name, cache)


def pattern(n: int, seed: int = 0) -> bytes:
    period = bytes((i * 7 + seed * 13 + 1) & 0xFF for i in range(251))
    return (period * (n // 251 + 1))[:n]


class MatrixImage:
    """An image of the matrix: ``kind`` (the fixture's value), ``path``,
    ``format`` (raw or qcow2), ``size``, ``backing`` (the backing file's path
    or None) and ``content``: what the whole disk reads as before any write
    (for qcow2-backing, the backing file's data under a 64 KiB cluster that
    the overlay holds itself, so reads see both)."""

    def __init__(self, kind: str, path: pathlib.Path, size: int, content: bytes,
                 backing: pathlib.Path | None = None):
        self.kind = kind
        self.path = path
        self.format = "raw" if kind == "raw" else "qcow2"
        self.size = size
        self.content = content
        self.backing = backing

    def __str__(self):
        return str(self.path)

    def __fspath__(self):
        return str(self.path)


OWN_CLUSTER = 1 << 20            # where qcow2-backing's overlay holds data of its own


@pytest.fixture
def image_format(request, tmp_path):
    from pykvm.block.driver import open_image, write_range
    from pykvm.block.qcow2 import Qcow2Driver
    kind = request.param
    size = IMAGE_SIZE
    if kind == "raw":
        path = tmp_path / "disk.raw"
        path.write_bytes(pattern(size, 1))
        return MatrixImage(kind, path, size, pattern(size, 1))
    path = tmp_path / "disk.qcow2"
    if kind == "qcow2":
        Qcow2Driver.create(str(path), size)
        return MatrixImage(kind, path, size, bytes(size))
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(size, 2))
    Qcow2Driver.create(str(path), size, backing_file=base.name, backing_fmt="raw")
    own = pattern(65536, 3)
    drv = open_image(str(path), "qcow2", read_only=False)
    try:
        write_range(drv, OWN_CLUSTER, own)
    finally:
        drv.close()
    content = bytearray(pattern(size, 2))
    content[OWN_CLUSTER:OWN_CLUSTER + len(own)] = own
    return MatrixImage(kind, path, size, bytes(content), backing=base)


@pytest.fixture
def transport(request):
    return request.param


@pytest.fixture
def queue_twin(request):
    """The device's virtqueue: SplitQueue (Python) or fastpath.CQueue (C),
    the same interface."""
    if request.param == "python":
        from pykvm.virtio.queue import SplitQueue
        return SplitQueue
    from pykvm.virtio.fastpath import CQueue
    return CQueue


# -- guests and the CLI ---------------------------------------------------------------------

def guest_path(name: str) -> pathlib.Path:
    path = GUEST_BUILD / f"{name}.elf"
    assert path.exists(), f"{path} is missing: run 'make guests'"
    return path


@pytest.fixture
def guest():
    return guest_path


def run_pykvm(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, capturing stdout (serial) and stderr (VMM)."""
    return subprocess.run([sys.executable, "-m", "pykvm", *map(str, args)], capture_output=True,
                          timeout=timeout, cwd=ROOT, **kw)


@pytest.fixture
def pykvm():
    return run_pykvm


# -- host faults made for real (tests/*/test_host_errors.py) --------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size): a fresh tmpfs of that size (unmounted after the test)."""
    mounted = []

    def mount(size: str):
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                       check=True)
        mounted.append(d)
        return d
    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def loop():
    """attach(path): a loop device over path (detached after the test)."""
    devs = []

    def attach(path):
        dev = subprocess.run(["losetup", "-f", "--show", str(path)], check=True,
                             capture_output=True, text=True).stdout.strip()
        devs.append(dev)
        return dev
    yield attach
    for dev in devs:
        subprocess.run(["losetup", "-d", dev], check=False)
