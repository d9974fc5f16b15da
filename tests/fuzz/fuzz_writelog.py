"""Write logs (block/writelog.py): the bytes are a log file in the dm-log-writes
format; it is read (``info``) and replayed onto a 1 MiB raw image, and, when it
reads, enumerated into crash epochs (pykvm.crash.read_epochs). LogError and
CrashtestError are the documented answers to a bad log (one line each)."""
import atexit
import os
import shutil
import tempfile

from pykvm.block.writelog import LogError, info, replay
from pykvm.crash import CrashtestError, read_epochs

EXPECTED = (LogError, CrashtestError)

DIR = tempfile.mkdtemp(prefix="fuzz-writelog-")
atexit.register(shutil.rmtree, DIR, True)
LOG = os.path.join(DIR, "fuzz.log")
IMAGE = os.path.join(DIR, "image.raw")


def one_input(data: bytes) -> None:
    with open(LOG, "wb") as f:
        f.write(data)
    with open(IMAGE, "wb") as f:
        f.truncate(1 << 20)
    info(LOG)
    read_epochs(LOG, 1 << 20)
    replay(LOG, IMAGE)
