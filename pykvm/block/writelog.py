"""Write logs in the dm-log-writes on-disk format: writing, reading, replaying.

The layout (Linux's drivers/md/dm-log-writes.c; xfstests' replay-log reads it):

- at byte 0 the super block, padded to one log sector: magic (u64
  0x6a736677736872), version (u64 1), nr_entries (u64), sectorsize (u32), all
  little-endian;
- from log sector 1, ``nr_entries`` entries, each one log sector holding
  sector (u64), nr_sectors (u64), flags (u64), data_len (u64), a MARK's name
  after them; then, for a write, its ``nr_sectors`` sectors of data. Sectors
  and counts are in units of the log's sector size.
- flags: FLUSH 1, FUA 2, DISCARD 4 (no data follows), MARK 8, METADATA 16.

The order is dm-log-writes': a write is logged when a flush that was
submitted after it completed has completed (before that flush's own entry),
so the log reads as the order in which data became durable; a FUA write is
logged when it completes; writes never flushed come last, then the mark
``dm-log-writes-end``.
"""
from __future__ import annotations

import os
import struct

from .driver import BlockError

MAGIC = 0x6A736677736872
VERSION = 1
SUPER = struct.Struct("<QQQI")
ENTRY = struct.Struct("<QQQQ")
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16
FLAG_NAMES = ((FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"), (MARK, "MARK"),
              (METADATA, "METADATA"))
END_MARK = "dm-log-writes-end"
SECTOR_SIZES = (512, 1024, 2048, 4096)
MAX_ENTRY_BYTES = 1 << 30        # a write entry larger than this is a corrupt log


class LogError(BlockError):
    """A write log that cannot be used (truncated, corrupt, another format)."""


class Entry:
    __slots__ = ("index", "sector", "nr_sectors", "flags", "mark", "data_pos")

    def __init__(self, index, sector, nr_sectors, flags, mark, data_pos):
        self.index = index          # 0-based, in log order
        self.sector = sector        # in log sectors
        self.nr_sectors = nr_sectors
        self.flags = flags
        self.mark = mark            # the MARK's name, or None
        self.data_pos = data_pos    # byte offset of the data in the log (writes)

    def flag_names(self) -> str:
        return "|".join(n for f, n in FLAG_NAMES if self.flags & f) or "WRITE"


def open_for_writing(fd: int, path: str, sector_size: int,
                     append: bool) -> tuple[int, int, bool]:
    """A log about to be written (``log-sector-size``, ``log-append``): the
    entries it holds, where the next one goes, and whether it was emptied
    (without ``append``, or a file too short to be a log: it then needs its
    super block). LogError for a bad sector size or a
    log of another one."""
    if sector_size not in SECTOR_SIZES:
        raise LogError(path, f"log-sector-size {sector_size} is not one of "
                       f"{', '.join(map(str, SECTOR_SIZES))}")
    if append and os.fstat(fd).st_size >= SUPER.size:
        reader = LogReader(fd, path)
        if reader.sector_size != sector_size:
            raise LogError(path, f"log-append: the log's sector size is "
                           f"{reader.sector_size}, not log-sector-size={sector_size}")
        for _e in reader:
            pass
        return reader.nr_entries, reader.end, False
    os.ftruncate(fd, 0)
    return 0, sector_size, True


class LogWriter:
    """Appends entries to a log through ``fd`` (the log node's buffered fd)."""

    def __init__(self, fd: int, path: str, sector_size: int = 512, append: bool = False,
                 super_update_interval: int = 4096):
        self.fd = fd
        self.path = path
        self.ss = sector_size
        self.interval = super_update_interval
        self.since_super = 0
        self.entries, self.pos, emptied = open_for_writing(fd, path, sector_size, append)
        if emptied:
            self.write_super()

    def _write(self, data, pos: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], pos + done)

    def write_super(self) -> None:
        head = SUPER.pack(MAGIC, VERSION, self.entries, self.ss)
        self._write(head + bytes(self.ss - len(head)), 0)
        self.since_super = 0

    def _entry(self, sector: int, nr: int, flags: int, name: bytes = b"") -> None:
        head = ENTRY.pack(sector, nr, flags, len(name)) + name
        self._write(head + bytes(self.ss - len(head)), self.pos)
        self.pos += self.ss

    def _done(self, flags: int) -> None:
        self.entries += 1
        self.since_super += 1
        if flags & (FUA | MARK) or self.since_super >= self.interval:
            self.write_super()

    def write(self, offset: int, data, flags: int = 0) -> None:
        """A write of ``data`` at byte ``offset`` of the disk (log-sector aligned)."""
        ss = self.ss
        if offset % ss or len(data) % ss:
            raise LogError(self.path, f"a write at {offset} of {len(data)} bytes is not "
                           f"aligned to log-sector-size={ss}")
        self._entry(offset // ss, len(data) // ss, flags)
        self._write(data, self.pos)
        self.pos += len(data)
        self._done(flags)

    def discard(self, offset: int, length: int) -> None:
        ss = self.ss
        self._entry(offset // ss, -(-length // ss), DISCARD)
        self._done(DISCARD)

    def flush(self) -> None:
        self._entry(0, 0, FLUSH)
        self._done(FLUSH)

    def mark(self, name: str) -> None:
        raw = name.encode()[:self.ss - ENTRY.size - 1]
        self._entry(0, 0, MARK, raw)
        self._done(MARK)


class LogReader:
    """The entries of a log, checked as they are read (LogError, one line each)."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path
        self.size = os.fstat(fd).st_size
        head = os.pread(fd, SUPER.size, 0)
        if len(head) < SUPER.size:
            raise LogError(path, f"truncated write log ({len(head)} bytes, no super block)")
        magic, version, self.nr_entries, self.sector_size = SUPER.unpack(head)
        if magic != MAGIC:
            raise LogError(path, f"not a write log (magic {magic:#x}, dm-log-writes' is "
                           f"{MAGIC:#x})")
        if version != VERSION:
            raise LogError(path, f"write log version {version} (only {VERSION} is known)")
        if self.sector_size not in SECTOR_SIZES:
            raise LogError(path, f"write log sector size {self.sector_size} is not one of "
                           f"{', '.join(map(str, SECTOR_SIZES))}")
        if self.nr_entries > self.size // self.sector_size:
            raise LogError(path, f"the super block counts {self.nr_entries} entries; a log of "
                           f"{self.size} bytes holds at most {self.size // self.sector_size}")
        self.end = self.sector_size

    def __iter__(self):
        ss = self.sector_size
        pos = ss
        for i in range(self.nr_entries):
            head = os.pread(self.fd, ss, pos)
            if len(head) < ss:
                raise LogError(self.path, f"entry {i} at byte {pos}: truncated (the super block "
                               f"counts {self.nr_entries} entries)")
            sector, nr, flags, dlen = ENTRY.unpack_from(head)
            if flags & ~(FLUSH | FUA | DISCARD | MARK | METADATA):
                raise LogError(self.path, f"entry {i} at byte {pos}: unknown flags {flags:#x}")
            mark = None
            if flags & MARK:
                if dlen > ss - ENTRY.size:
                    raise LogError(self.path, f"entry {i}: a mark of {dlen} bytes")
                mark = head[ENTRY.size:ENTRY.size + dlen].decode(errors="replace")
            pos += ss
            data_pos = pos
            if not flags & (DISCARD | MARK) and nr:
                if nr * ss > MAX_ENTRY_BYTES:
                    raise LogError(self.path, f"entry {i}: a write of {nr} sectors")
                pos += nr * ss
                if pos > self.size:
                    raise LogError(self.path, f"entry {i}: its data ends at byte {pos}, past the "
                                   f"end of the log ({self.size})")
            self.end = pos
            yield Entry(i, sector, nr, flags, mark, data_pos)


def open_log(path: str) -> tuple[int, LogReader]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise LogError(path, f"cannot open the write log: {e.strerror}") from None
    try:
        return fd, LogReader(fd, path)
    except BaseException:
        os.close(fd)
        raise


def replay(log: str, image: str, limit: int | None = None, end_mark: str | None = None,
           next_flush: bool = False, start: int = 0) -> dict:
    """Apply the log's entries from ``start`` to the raw ``image``: all of them,
    the first ``limit``, those up to and including the mark ``end_mark``, or
    those up to the next flush (replay-log's --limit, --end-mark,
    --next-flush). Returns what was replayed."""
    fd, reader = open_log(log)
    try:
        if end_mark is not None and not any(e.mark == end_mark for e in reader):
            raise LogError(log, f"no mark named '{end_mark}' (the image is unchanged)")
        try:
            out = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise LogError(image, f"cannot open the image: {e.strerror}") from None
        ss = reader.sector_size
        done = {"entries": 0, "writes": 0, "discards": 0, "flushes": 0, "marks": 0,
                "bytes": 0, "last": None}
        found_mark = end_mark is None
        try:
            size = os.fstat(out).st_size
            for e in reader:
                if e.index < start:
                    continue
                if limit is not None and done["entries"] >= limit:
                    break
                done["entries"] += 1
                done["last"] = e.index
                if e.flags & MARK:
                    done["marks"] += 1
                    if end_mark is not None and e.mark == end_mark:
                        found_mark = True
                        break
                    continue
                if e.flags & FLUSH and not e.nr_sectors:
                    done["flushes"] += 1
                    if next_flush:
                        break
                    continue
                if (e.sector + e.nr_sectors) * ss > size:
                    raise LogError(log, f"entry {e.index} writes sectors [{e.sector}, "
                                   f"+{e.nr_sectors}) of {ss} bytes, past the end of {image} "
                                   f"({size} bytes): the log's sector size or the image is "
                                   f"not the one logged")
                if e.flags & DISCARD:
                    done["discards"] += 1
                    _zero(out, e.sector * ss, e.nr_sectors * ss)
                    continue
                _copy(fd, e.data_pos, out, e.sector * ss, e.nr_sectors * ss)
                done["writes"] += 1
                done["bytes"] += e.nr_sectors * ss
                if e.flags & FLUSH and next_flush:      # a write with a flush flag
                    break
            if not found_mark:
                raise LogError(log, f"mark '{end_mark}' comes before entry {start}")
            os.fsync(out)
        finally:
            os.close(out)
        return done
    finally:
        os.close(fd)


def _copy(src: int, spos: int, dst: int, dpos: int, n: int) -> None:
    while n:
        chunk = os.pread(src, min(n, 1 << 20), spos)
        if not chunk:
            raise LogError("log", f"short read at byte {spos}")
        done = 0
        while done < len(chunk):
            done += os.pwrite(dst, chunk[done:], dpos + done)
        spos += len(chunk)
        dpos += len(chunk)
        n -= len(chunk)


def _zero(fd: int, offset: int, n: int) -> None:
    zero = bytes(min(n, 1 << 20))
    while n:
        k = min(n, len(zero))
        os.pwrite(fd, zero[:k], offset)
        offset += k
        n -= k


def info(path: str) -> dict:
    fd, reader = open_log(path)
    try:
        out = {"sector_size": reader.sector_size, "entries": reader.nr_entries, "writes": 0,
               "fua": 0, "discards": 0, "flushes": 0, "marks": [], "bytes": 0}
        for e in reader:
            if e.flags & MARK:
                out["marks"].append({"entry": e.index, "name": e.mark})
            elif e.flags & DISCARD:
                out["discards"] += 1
            elif e.flags & FLUSH and not e.nr_sectors:
                out["flushes"] += 1
            else:
                out["writes"] += 1
                out["fua"] += bool(e.flags & FUA)
                out["bytes"] += e.nr_sectors * reader.sector_size
        out["log_bytes"] = reader.end
        return out
    finally:
        os.close(fd)
