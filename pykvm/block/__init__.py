"""The block layer: BlockBackend (device-facing root), the graph of nodes
below it (graph.py builds it from QEMU's options), the driver registry,
cache modes.

The drivers are imported (and registered) at once; the backend, which pulls in
the AIO engines, only when one of its names is first used (``pykvm img`` never
needs it)."""
from . import file, nbd, qcow2, raw  # noqa: F401  (register the drivers)
from .filters import blkdebug, blklogwrites, throttle, volatile  # noqa: F401
from .driver import (DRIVERS, FORMATS, BlockDriver, BlockError, Extent, GraphError, iov_slice,
                     open_image, probe_format)

__all__ = ["BlockBackend", "CacheMode", "CACHE_MODES", "DETECT_ZEROES_MODES", "DISCARD_MODES",
           "DRIVERS", "FORMATS", "BlockDriver", "BlockError", "Extent", "GraphError",
           "iov_slice", "open_image",
           "probe_format"]

_BACKEND_NAMES = ("BlockBackend", "CacheMode", "CACHE_MODES", "DETECT_ZEROES_MODES",
                  "DISCARD_MODES")


def __getattr__(name: str):
    if name in _BACKEND_NAMES:
        from . import backend
        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
