"""Build pykvm._native with cffi in API mode.

Each native/<name>.h is a cffi-parsable header (cdef) and native/<name>.c its
implementation; the C files are included into one extension module so their
static helpers stay private to it. Set PYKVM_SANITIZE=1 to build with
AddressSanitizer and UBSan.

NBD connections (nbd.c) use libnbd's C API (Debian: libnbd-dev).

The io_uring engine uses liburing when its header is installed (Debian:
liburing-dev); without it the engine is built as "unavailable" and the other
engines still work. PYKVM_NO_LIBURING=1 forces that, for testing the fallback.
"""
import os
import pathlib
import sysconfig

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
UNITS = ["kvm", "memory", "file", "vq", "aio", "nbd", "throttle", "inject", "trace", "writelog",
         "blk"]

ffibuilder = FFI()
for unit in UNITS:
    ffibuilder.cdef((HERE / f"{unit}.h").read_text())

extra_compile_args = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function"]
extra_link_args = []
libraries = ["pthread", "m", "nbd"]   # libnbd: Debian's libnbd-dev
define_macros = []


def _have_liburing() -> bool:
    if os.environ.get("PYKVM_NO_LIBURING"):
        return False
    dirs = [sysconfig.get_config_var("INCLUDEDIR") or "/usr/include", "/usr/include",
            "/usr/local/include"]
    return any(os.path.exists(os.path.join(d, "liburing.h")) for d in dirs)


if _have_liburing():
    libraries.append("uring")
    define_macros.append(("PYKVM_HAVE_LIBURING", "1"))
if os.environ.get("PYKVM_SANITIZE"):
    extra_compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_link_args += ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "pykvm._native",
    "#define _GNU_SOURCE\n" + "\n".join(f'#include "{unit}.c"' for unit in UNITS),
    include_dirs=[str(HERE)],
    libraries=libraries,
    define_macros=define_macros,
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
