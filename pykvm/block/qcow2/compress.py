"""qcow2 compressed clusters: the "Compressed Clusters Descriptor" of the
"Cluster mapping" section of docs/interop/qcow2.txt, with the header's
compression type (zlib: raw deflate; zstd)."""
from __future__ import annotations

import os
import zlib

from ..driver import BlockError, Extent, fd_pread, pwrite_full
from .header import COMPRESSED


def _zstd():
    """The zstandard module (imported on first use), or None."""
    try:
        import zstandard
    except ImportError:  # pragma: no cover - the dependency is declared
        return None
    return zstandard


def _zstd_cluster(zstandard, raw: bytes, cs: int) -> bytes:
    """At most ``cs`` bytes out of a zstd stream: decoding stops at one cluster
    (as zlib's ``max_length``), so a frame that claims or holds more allocates
    nothing past it."""
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(raw) as r:
        while len(out) < cs:
            chunk = r.read(cs - len(out))
            if not chunk:
                break
            out += chunk
    return bytes(out)


class Compression:
    """Compressed clusters: reading them (zlib, zstd) and writing one (convert -c)."""

    def read_compressed(self, extent: Extent) -> bytes:
        e, gstart = extent.aux
        if self._zc is None or self._zc[0] != e:
            self._zc = (e, self._decompress(e))
        lo = extent.offset - gstart
        return self._zc[1][lo:lo + extent.length]

    def _compressed_span(self, e: int) -> tuple[int, int]:
        x = self.compressed_bits
        coff = e & ((1 << x) - 1)
        nsect = ((e >> x) & ((1 << (62 - x)) - 1)) + 1
        return coff, nsect * 512 - (coff & 511)

    def _decompress(self, e: int) -> bytes:
        coff, clen = self._compressed_span(e)
        if self.data_fd >= 0:
            raise BlockError(self.path, "compressed cluster in an image with an external data file")
        if coff + clen > self.eof + 512:
            raise BlockError(self.path, f"compressed cluster at {coff:#x} is past the end of "
                             f"the file")
        self.file.debug_event("read_compressed")
        raw = fd_pread(self.mfd, clen, coff)
        cs = self.cluster_size
        try:
            if self.h.compression_type == 0:
                d = zlib.decompressobj(-15)
                out = d.decompress(raw, cs)
            else:
                zstandard = _zstd()
                if zstandard is None:
                    raise BlockError(self.path, "zstd-compressed clusters need the 'zstandard' "
                                     "module")
                out = _zstd_cluster(zstandard, raw, cs)
        except (zlib.error, Exception) as exc:
            if isinstance(exc, BlockError):
                raise
            raise BlockError(self.path, f"compressed cluster at {coff:#x} does not decompress: "
                             f"{exc}") from None
        if len(out) < cs:
            raise BlockError(self.path, f"compressed cluster at {coff:#x} decompresses to "
                             f"{len(out)} bytes, not {cs}")
        return out

    def write_compressed(self, ci: int, data: bytes) -> bool:
        """Store one whole guest cluster compressed (pykvm img convert -c);
        False if it does not compress (the caller writes it normally)."""
        cs, cb = self.cluster_size, self.cluster_bits
        if self.h.compression_type == 0:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            comp = c.compress(data) + c.flush()
        else:
            zstandard = _zstd()
            if zstandard is None:
                raise BlockError(self.path, "zstd compression needs the 'zstandard' module")
            comp = zstandard.ZstdCompressor().compress(data)
        if len(comp) >= cs - 512 or self.data_fd >= 0:
            return False
        self._mark_dirty()
        cur = getattr(self, "_ccur", 0)
        if cur and cur + len(comp) <= (cur | (cs - 1)) + 1:
            # pack it behind the previous one, in the same host cluster
            self._set_refcount(cur >> cb, self.refcount(cur >> cb) + 1)
        else:
            cur = self.alloc_clusters(1)
        end = cur + len(comp)
        pwrite_full(self.mfd, comp, cur)
        self._grew(end)
        nsect = (((end - 1) >> 9) - (cur >> 9))
        x = self.compressed_bits
        entry = COMPRESSED | (nsect << x) | cur
        l2, idx = self._l2_writable(ci)
        old = l2[idx]
        self._unmapping(ci << cb, cs)
        self._set_l2(ci, entry, 0)
        if old:
            self._release_entry(old)
        self._ccur = end if end % cs else 0
        return True
