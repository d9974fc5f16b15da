"""The block layer: BlockBackend (device-facing), the driver registry, cache modes."""
from . import qcow2, raw  # noqa: F401  (register the drivers)
from .backend import CACHE_MODES, DETECT_ZEROES_MODES, DISCARD_MODES, BlockBackend, CacheMode
from .driver import (DRIVERS, BlockDriver, BlockError, Extent, iov_slice, open_image,
                     probe_format)

__all__ = ["BlockBackend", "CacheMode", "CACHE_MODES", "DETECT_ZEROES_MODES", "DISCARD_MODES",
           "DRIVERS", "BlockDriver", "BlockError", "Extent", "iov_slice", "open_image",
           "probe_format"]
