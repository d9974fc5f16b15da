"""The kernel loaders (pykvm/boot/): a PVH ELF or a bzImage, told apart by content.

The bytes are the kernel file; it is loaded into 64 MiB of guest RAM with a
command line, the e820 map, the PVH start info or the bzImage's zero page, and
for a bzImage an initrd. A BootError is the loader refusing the file.
"""
import os
import tempfile

from pykvm.boot.e820 import build_e820
from pykvm.boot.linux import image_kind, load_bzimage
from pykvm.boot.pvh import load_pvh, write_start_info
from pykvm.errors import BootError
from pykvm.memory import GuestMemory

EXPECTED = (BootError,)

_dir = tempfile.mkdtemp(prefix="fuzz-boot-")
KERNEL = os.path.join(_dir, "kernel")
INITRD = os.path.join(_dir, "initrd")
with open(INITRD, "wb") as f:
    f.write(b"070701" + bytes(506))
MEM = GuestMemory(64 << 20, hugepages=False)
E820 = build_e820(MEM)


def one_input(data: bytes) -> None:
    with open(KERNEL, "wb") as f:
        f.write(data)
    if image_kind(KERNEL) == "elf":
        image = load_pvh(KERNEL, MEM)
        write_start_info(MEM, image, "console=ttyS0", E820, modules=[(0x2000000, 512)])
    else:
        load_bzimage(KERNEL, MEM, "console=ttyS0", E820, initrd=INITRD)
