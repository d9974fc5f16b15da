"""The block layer: BlockBackend (device-facing), the driver registry, cache modes."""
from . import raw  # noqa: F401  (registers the raw driver)
from .backend import CACHE_MODES, DISCARD_MODES, BlockBackend, CacheMode
from .driver import DRIVERS, BlockDriver, BlockError, Extent, probe_format

__all__ = ["BlockBackend", "CacheMode", "CACHE_MODES", "DISCARD_MODES", "DRIVERS", "BlockDriver",
           "BlockError", "Extent", "probe_format"]
