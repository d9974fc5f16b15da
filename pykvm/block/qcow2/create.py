"""qcow2 image creation: a new image laid out as in docs/interop/qcow2.txt
(header, one refcount table cluster and block, an empty L1 table), and
preallocation (metadata, falloc, full)."""
from __future__ import annotations

import os
import struct

from ..driver import BlockError, pwrite_full
from ..file import preallocate
from .header import (AUTOCLEAR_DATA_RAW, COMPAT_LAZY, COMPRESSION_TYPES, COPIED,
                     INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, MAX_L1_BYTES,
                     Header)
from .refcount import rc_set


class Create:
    """create() and preallocation."""

    # -- create ------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, size: int, cluster_size: int = 65536, compat: str = "1.1",
               backing_file: str | None = None, backing_fmt: str | None = None,
               lazy_refcounts: bool = False, extended_l2: bool = False, refcount_bits: int = 16,
               compression_type: str = "zlib", preallocation: str = "off",
               data_file: str | None = None, data_file_raw: bool = False) -> None:
        if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
            raise BlockError(path, f"cluster size {cluster_size} must be a power of two "
                             f"between 512 and 2M")
        if compat not in ("0.10", "1.1", "v2", "v3"):
            raise BlockError(path, f"invalid compat {compat!r} (0.10 or 1.1)")
        v3 = compat in ("1.1", "v3")
        if refcount_bits not in (1, 2, 4, 8, 16, 32, 64) or (not v3 and refcount_bits != 16):
            raise BlockError(path, f"refcount_bits {refcount_bits}: must be a power of two up "
                             f"to 64 (and 16 for compat=0.10)")
        if not v3 and (lazy_refcounts or extended_l2 or data_file or compression_type != "zlib"):
            raise BlockError(path, "lazy_refcounts, extended_l2, data_file and zstd need "
                             "compat=1.1")
        if extended_l2 and cluster_size < 16384:
            raise BlockError(path, "extended_l2 needs a cluster size of at least 16k")
        if compression_type not in COMPRESSION_TYPES:
            raise BlockError(path, f"unknown compression type {compression_type!r} (zlib, zstd)")
        if data_file_raw and not data_file:
            raise BlockError(path, "data_file_raw needs data_file")
        if data_file_raw and backing_file:
            raise BlockError(path, "data_file_raw cannot be combined with a backing file")
        if preallocation not in ("off", "metadata", "falloc", "full"):
            raise BlockError(path, f"unknown preallocation mode {preallocation!r}")
        cb = cluster_size.bit_length() - 1
        l2e = cluster_size // (16 if extended_l2 else 8)
        l1_size = -(-size // (cluster_size * l2e))
        if l1_size * 8 > MAX_L1_BYTES:
            raise BlockError(path, f"size {size} is too large for cluster size {cluster_size}")
        h = Header()
        h.version = 3 if v3 else 2
        h.cluster_bits = cb
        h.size = size
        h.refcount_order = refcount_bits.bit_length() - 1
        h.compat = COMPAT_LAZY if lazy_refcounts else 0
        h.incompat = (INCOMPAT_EXTL2 if extended_l2 else 0) | \
            (INCOMPAT_DATA_FILE if data_file else 0)
        h.compression_type = COMPRESSION_TYPES[compression_type]
        if h.compression_type:
            h.incompat |= INCOMPAT_COMPRESSION
        h.autoclear = AUTOCLEAR_DATA_RAW if data_file_raw else 0
        h.header_length = 112 if v3 else 72
        h.backing_file = backing_file
        h.backing_fmt = backing_fmt
        h.data_file = data_file
        l1_clusters = -(-l1_size * 8 // cluster_size)     # (none for an empty disk, as QEMU)
        # an L1 table bigger than one refcount block counts: the image is made
        # empty, and then grows to its size as any image does (the L1 table and
        # the refcount structures allocated through the refcounts)
        grow_to = None
        if 3 + l1_clusters > cluster_size * 8 // refcount_bits:
            grow_to, h.size, l1_size, l1_clusters = size, 0, 0, 0
        h.rt_offset = cluster_size
        h.rt_clusters = 1
        h.l1_offset = 3 * cluster_size if l1_clusters else 0
        h.l1_size = l1_size
        header = h.pack(cluster_size)
        used = 3 + l1_clusters
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise BlockError(path, "cannot create", e.errno) from None
        try:
            blk = bytearray(cluster_size)
            for c in range(used):
                rc_set(blk, c, h.refcount_order, 1)
            pwrite_full(fd, header + bytes(cluster_size - len(header)), 0)
            pwrite_full(fd, struct.pack(">Q", 2 * cluster_size) + bytes(cluster_size - 8),
                        cluster_size)
            pwrite_full(fd, blk, 2 * cluster_size)
            if l1_clusters:
                pwrite_full(fd, bytes(l1_clusters * cluster_size), 3 * cluster_size)
        finally:
            os.close(fd)
        if data_file:
            dpath = data_file if os.path.isabs(data_file) else \
                os.path.join(os.path.dirname(os.path.abspath(path)), data_file)
            try:
                dfd = os.open(dpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                os.ftruncate(dfd, size)
                os.close(dfd)
            except OSError as e:
                raise BlockError(dpath, "cannot create the data file", e.errno) from None
        if preallocation != "off" or grow_to is not None:
            from ..driver import open_image
            d = open_image(path, cls.format_name, open_backing=False)
            try:
                if grow_to is not None:
                    d.resize(grow_to)
                if preallocation != "off":
                    d._preallocate(preallocation)
            finally:
                d.close()

    def _preallocate(self, mode: str) -> None:
        cs, cb = self.cluster_size, self.cluster_bits
        nclusters = -(-self.size // cs)
        ci = 0
        while ci < nclusters:
            # allocate a run of data clusters at once, contiguous in the file
            run = min(nclusters - ci, self.l2_entries - (ci & (self.l2_entries - 1)))
            self._l2_writable(ci)
            host = (ci << cb) if self.data_fd >= 0 else self.alloc_clusters(run)
            if self.data_fd < 0:
                preallocate(self.mfd, host, run * cs, mode, self.path)
            for k in range(run):
                if self.extl2:
                    self._set_l2(ci + k, (host + k * cs) | COPIED, 0xFFFFFFFF)
                else:
                    self._set_l2(ci + k, (host + k * cs) | COPIED)
            ci += run
        if self.data_fd >= 0:
            preallocate(self.data_fd, 0, self.size, mode, self.data_path)
        else:
            os.ftruncate(self.mfd, max(self.eof, os.fstat(self.mfd).st_size))
