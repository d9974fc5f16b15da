"""Build pykvm._native with cffi in API mode.

Each native/<name>.h is a cffi-parsable header (cdef) and native/<name>.c its
implementation; the C files are included into one extension module so their
static helpers stay private to it. Set PYKVM_SANITIZE=1 to build with
AddressSanitizer and UBSan.
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
UNITS = ["kvm", "memory", "file"]

ffibuilder = FFI()
for unit in UNITS:
    ffibuilder.cdef((HERE / f"{unit}.h").read_text())

extra_compile_args = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function"]
extra_link_args = []
if os.environ.get("PYKVM_SANITIZE"):
    extra_compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_link_args += ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "pykvm._native",
    "#define _GNU_SOURCE\n" + "\n".join(f'#include "{unit}.c"' for unit in UNITS),
    include_dirs=[str(HERE)],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
