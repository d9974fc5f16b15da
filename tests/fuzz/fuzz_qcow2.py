"""qcow2 open + map + read + check on a mutated image.

The bytes are the image file, opened read-only as qcow2
(``pykvm.block.open_image``) in a folder that also holds what the seeds name
(``base.raw``, ``base.qcow2`` as backing files, ``data.raw`` as an external
data file; tests/fuzz/make_seeds.py makes them all). Then: the map of
its first 16 MiB, a read of its first 64 KiB and of up to 8 mapped pieces
(64 KiB each, through backing files and compressed clusters), ``check()``.
A BlockError is the driver refusing the image.
"""
import atexit
import os
import shutil
import tempfile

from pykvm.block import BlockError, open_image
from pykvm.block.driver import read_range
from tests.fuzz.harness import SEEDS

EXPECTED = (BlockError,)

DIR = tempfile.mkdtemp(prefix="fuzz-qcow2-")
atexit.register(shutil.rmtree, DIR, True)
FILES = os.path.join(SEEDS, "qcow2-files")
for name in os.listdir(FILES):
    shutil.copy(os.path.join(FILES, name), DIR)
IMAGE = os.path.join(DIR, "image.qcow2")

MAP_WINDOW = 16 << 20
READ = 64 << 10


def one_input(data: bytes) -> None:
    with open(IMAGE, "wb") as f:
        f.write(data)
    drv = open_image(IMAGE, "qcow2", read_only=True)
    try:
        extents = drv.map(0, min(drv.size, MAP_WINDOW))
        read_range(drv, 0, min(drv.size, READ))
        for e in extents[:8]:
            read_range(drv, e.offset, min(e.length, READ))
        drv.check()
    finally:
        drv.close()
