"""Host errors the backend must not hide, made real: a flush that fails
(fdatasync of a loop device whose backing file sits on a full tmpfs: EIO,
and the next fdatasync succeeds although the data is gone) and a short
write (io_uring and linux-aio return what fit on a nearly full tmpfs)."""
import errno
import os
import subprocess

import pytest

from pykvm.aio.native import open_engine
from tests.block.conftest import Disk

ENGINES = ["python", "threads", "io_uring"]




def disk(path, engine, **kw):
    return Disk(str(path), fmt="raw", engine=open_engine(engine, False), **kw)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_flush_fails_every_later_one_until_reopened(tmpfs, loop, engine):
    d = tmpfs("1M")
    backing = d / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    dev = loop(backing)
    disk0 = disk(dev, engine)
    try:
        assert disk0.write(0, b"\x5a" * (4 << 20)) == 4 << 20   # into the page cache
        assert disk0.flush() == -errno.EIO                      # writeback hit ENOSPC
        # room again: the kernel's next fdatasync succeeds, though 3 MiB are gone
        subprocess.run(["mount", "-o", "remount,size=64M", str(d)], check=True)
        fd = os.open(dev, os.O_RDWR)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        assert disk0.flush() == -errno.EIO
        assert disk0.b.flush_error == errno.EIO
        disk0.b.write_cache = False                            # writethrough: its flush fails
        assert disk0.write(1 << 20, b"\x33" * 4096) == -errno.EIO
    finally:
        disk0.close()
    disk1 = disk(dev, engine)                                   # opened again: a fresh start
    try:
        assert disk1.write(0, b"\x11" * 4096) == 4096
        assert disk1.flush() == 0
    finally:
        disk1.close()


@pytest.mark.parametrize("engine", ["io_uring", "native", "threads", "python"])
def test_a_short_write_is_continued_never_reported_whole(tmpfs, engine):
    d = tmpfs("1M")
    with open(d / "ballast", "wb") as f:
        f.write(b"\xaa" * ((1 << 20) - (64 << 10)))
    img = d / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    if engine == "native":
        disk0 = Disk(str(img), fmt="raw", engine=open_engine("native", True), cache="none")
    else:
        disk0 = disk(img, engine)
    try:
        r = disk0.write(0, b"\x77" * (256 << 10))
        assert r == -errno.ENOSPC, r     # part fitted; the rest hit ENOSPC
        used = os.stat(img).st_blocks * 512
        assert 0 < used < 256 << 10
    finally:
        disk0.close()
