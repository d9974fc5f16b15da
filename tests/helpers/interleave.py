"""A store that lands between the loads of one read, on purpose: a hardware
watchpoint for tests of code that reads a ring index another thread stores.

A 16-bit ring index the other side stores may be read in one load (what
MappedMemory.load_u16 and native/vq.c do) or in two: copying 2 bytes with
glibc's memcpy (``bytes(memoryview)``, ``int.from_bytes``, so
MappedMemory.read_u) loads byte 0 alone and then the word. A store that falls
between the two, as used->idx goes from 0x00ff to 0x0100, gives 0x01ff:
half of each value. Between two loads a few nanoseconds apart that is rare,
unless the reading thread is preempted there (a busy host), so a test cannot
wait for it. ``store_between`` makes it certain:

    with store_between(mem.hva_of(used_ring + 2, 2), 0x0100) as w:
        idx = read_used_idx()
    assert w.fired == 1 and idx in (0x00ff, 0x0100)

A perf hardware breakpoint (read or write, 2 bytes) on the index traps this
thread after its first instruction that touches them; the SIGTRAP handler
(C: it runs between that instruction and the next) disables the breakpoint
and stores the new value with one 16-bit store. A read done in one load got
the old value whole; a read in two parts gets the old low byte and the new
high byte. The breakpoint is this thread's only: other threads, the C I/O
threads included, run untouched.

The handler is C, compiled with cffi once per process into a temporary
folder. ``available()`` says why not when the host refuses hardware
breakpoints (perf_event_paranoid 3 without CAP_PERFMON, or no debug registers).
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import tempfile

_CDEF = """
int interleave_arm(uintptr_t addr, uint16_t value);
int interleave_disarm(void);
"""

_SOURCE = r"""
#include <errno.h>
#include <linux/hw_breakpoint.h>
#include <linux/perf_event.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int watch_fd = -1;
static uint16_t *watched;
static uint16_t next_value;
static volatile int fired;
static struct sigaction old_trap;

static void on_trap(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)si; (void)uc;
    if (watch_fd < 0 || fired++)
        return;
    ioctl(watch_fd, PERF_EVENT_IOC_DISABLE, 0);
    __atomic_store_n(watched, next_value, __ATOMIC_RELAXED);  /* one 16-bit store */
}

/* 0, or -errno: the next access of this thread to the 2 bytes at addr is
 * followed, before the instruction after it, by storing value there. */
int interleave_arm(uintptr_t addr, uint16_t value)
{
    struct perf_event_attr a;
    struct sigaction sa;
    int fd;

    if (watch_fd >= 0 || addr % 2)
        return -EINVAL;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGTRAP, &sa, &old_trap) < 0)
        return -errno;
    memset(&a, 0, sizeof(a));
    a.type = PERF_TYPE_BREAKPOINT;
    a.size = sizeof(a);
    a.bp_type = HW_BREAKPOINT_RW;   /* x86 has no read-only data breakpoint */
    a.bp_addr = addr;
    a.bp_len = HW_BREAKPOINT_LEN_2;
    a.sample_period = 1;
    a.sigtrap = 1;                  /* SIGTRAP to this thread, synchronously */
    a.remove_on_exec = 1;           /* (sigtrap requires it) */
    a.exclude_kernel = 1;
    a.exclude_hv = 1;
    watched = (uint16_t *)addr;
    next_value = value;
    fired = 0;
    fd = (int)syscall(SYS_perf_event_open, &a, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0) {
        int e = errno;

        sigaction(SIGTRAP, &old_trap, NULL);
        return -e;
    }
    watch_fd = fd;
    return 0;
}

/* How many times the breakpoint fired (1: the store was made). */
int interleave_disarm(void)
{
    if (watch_fd >= 0) {
        close(watch_fd);
        watch_fd = -1;
        sigaction(SIGTRAP, &old_trap, NULL);
    }
    return fired;
}
"""

_mod = None
_refused = None


def _load():
    """The compiled helper (its ``lib`` and ``ffi``)."""
    global _mod
    if _mod is None:
        from cffi import FFI
        ffi = FFI()
        ffi.cdef(_CDEF)
        ffi.set_source("_pykvm_test_interleave", _SOURCE, extra_compile_args=["-O2"])
        so = ffi.compile(tmpdir=tempfile.mkdtemp(prefix="pykvm-interleave-"))
        loader = importlib.machinery.ExtensionFileLoader("_pykvm_test_interleave", so)
        spec = importlib.util.spec_from_file_location("_pykvm_test_interleave", so,
                                                      loader=loader)
        _mod = importlib.util.module_from_spec(spec)
        loader.exec_module(_mod)
    return _mod


def available() -> str | None:
    """None when hardware breakpoints work here, else why not (one line)."""
    global _refused
    if _refused is None:
        mod = _load()
        probe = mod.ffi.new("uint16_t *")
        rc = mod.lib.interleave_arm(int(mod.ffi.cast("uintptr_t", probe)), 0)
        mod.lib.interleave_disarm()
        _refused = "" if rc == 0 else \
            f"perf_event_open of a hardware breakpoint: {os.strerror(-rc)}"
    return _refused or None


class _Watch:
    fired = 0


@contextlib.contextmanager
def store_between(addr: int, value: int):
    """Inside the block, the first access of this thread to the 16 bits at
    host address ``addr`` is followed at once by a store of ``value`` there
    (``.fired`` is 1 afterwards when it happened)."""
    lib = _load().lib
    rc = lib.interleave_arm(addr, value & 0xFFFF)
    if rc:
        raise OSError(-rc, f"hardware breakpoint at {addr:#x}: {os.strerror(-rc)}")
    w = _Watch()
    try:
        yield w
    finally:
        w.fired = lib.interleave_disarm()
