"""A vCPU: initial state, CPUID, and the run loop that turns exits into bus accesses.

``Vcpu.run()`` loops on KVM_RUN (GIL released) and decodes each exit:
IO and MMIO go to the buses; SHUTDOWN, FAIL_ENTRY, INTERNAL_ERROR and any exit
we do not expect stop the loop with a ``VcpuStop`` that carries what the debug
report needs; SYSTEM_EVENT and HLT stop it cleanly. ``stop()`` may be called
from any thread: it sets immediate_exit and kicks the thread with a signal, so
a vCPU inside KVM_RUN comes back at once. ``pause()`` kicks it the same
way and parks the thread outside KVM_RUN (no guest code runs) until
``resume()`` or ``stop()``.
"""
from __future__ import annotations

import collections
import errno
import signal
import sys
import threading

from .bus import Bus
from .errors import KvmError
from .kvm import KICK_SIGNAL, EXIT_REASONS, VcpuFd, ffi, lib

# CPUID bits
CPUID_1_ECX_CX16 = 1 << 13
CPUID_1_ECX_XSAVE = 1 << 26
CPUID_1_ECX_OSXSAVE = 1 << 27
CPUID_1_ECX_HYPERVISOR = 1 << 31
HYPERVISOR_BASE = 0x40000000
HYPERVISOR_TIMING = 0x40000010
APIC_BUS_KHZ = 1_000_000  # KVM's local APIC timer runs at 1 GHz

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1


class VcpuStop:
    """Why the run loop stopped. ``kind`` is 'requested', 'shutdown' (triple
    fault), 'fail_entry', 'internal_error', 'system_event', 'hlt', 'debug',
    'unexpected' or 'vmm_error'; ``detail`` is a short human description."""

    __slots__ = ("kind", "detail", "exit_reason")

    def __init__(self, kind: str, detail: str = "", exit_reason: int = -1):
        self.kind = kind
        self.detail = detail
        self.exit_reason = exit_reason

    def __repr__(self) -> str:
        return f"VcpuStop({self.kind!r}, {self.detail!r})"


def build_cpuid(supported: list[dict], index: int, tsc_khz: int,
                hide_ecx1: int = 0) -> list[dict]:
    """KVM's supported CPUID, adjusted for one vCPU.

    Leaf 1 gets the vCPU's APIC id and the hypervisor bit, minus ``hide_ecx1``
    (features the host cannot run for the guest); the hypervisor range is
    extended to 0x40000010, whose EAX is the TSC frequency in kHz and EBX the
    local APIC bus frequency in kHz.
    """
    out = []
    for e in supported:
        e = dict(e)
        fn = e["function"]
        if fn == 1:
            e["ebx"] = (e["ebx"] & 0x00FFFFFF) | (index << 24)
            e["ecx"] = (e["ecx"] | CPUID_1_ECX_HYPERVISOR) & ~hide_ecx1
        elif fn == 0xB:
            e["edx"] = index
        elif fn == HYPERVISOR_BASE:
            e["eax"] = max(e["eax"], HYPERVISOR_TIMING)
        elif fn == HYPERVISOR_TIMING:
            continue
        out.append(e)
    if not any(e["function"] == HYPERVISOR_BASE for e in out):
        sig = b"KVMKVMKVM\0\0\0"
        out.append({"function": HYPERVISOR_BASE, "index": 0, "flags": 0, "eax": HYPERVISOR_TIMING,
                    "ebx": int.from_bytes(sig[0:4], "little"),
                    "ecx": int.from_bytes(sig[4:8], "little"),
                    "edx": int.from_bytes(sig[8:12], "little")})
    out.append({"function": HYPERVISOR_TIMING, "index": 0, "flags": 0,
                "eax": tsc_khz, "ebx": APIC_BUS_KHZ, "ecx": 0, "edx": 0})
    return out


def _flat_segment(seg, selector: int, type_: int, long_mode: bool = False) -> None:
    """A present, DPL-0, 4 GiB flat code/data segment (64-bit code if ``long_mode``)."""
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = type_
    seg.present = 1
    seg.dpl = 0
    seg.db = 0 if long_mode else 1
    seg.s = 1
    seg.l = 1 if long_mode else 0
    seg.g = 1
    seg.avl = 0


def _busy_tss(tr, selector: int) -> None:
    """A minimal busy TSS in TR (VM entry wants a usable one; guests load their own)."""
    tr.base = 0
    tr.limit = 0x67
    tr.selector = selector
    tr.type = 0xB
    tr.present = 1
    tr.s = 0
    tr.g = 0
    tr.l = 0
    tr.db = 0


_kick_installed = False
_kick_lock = threading.Lock()


def _install_kick_handler() -> None:
    global _kick_installed
    with _kick_lock:
        if not _kick_installed:
            err = lib.pykvm_install_kick_handler(KICK_SIGNAL)
            if err < 0:
                raise OSError(-err, "sigaction for the vCPU kick signal")
            _kick_installed = True


class Vcpu:
    def __init__(self, fd: VcpuFd, pio: Bus, mmio: Bus, trace=None):
        self.fd = fd
        self.index = fd.index
        self.pio = pio
        self.mmio = mmio
        self.trace = trace
        self.exit_counts: collections.Counter[str] = collections.Counter()
        self._stopping = False
        self._pausing = False
        self._unpaused = threading.Event()
        self._unpaused.set()
        self.parked = threading.Event()   # set while the thread waits in pause
        self._thread_id: int | None = None
        _install_kick_handler()

    # -- set-up ------------------------------------------------------------

    def set_cpuid(self, entries: list[dict]) -> None:
        self.fd.set_cpuid(entries)

    def setup_pvh(self, entry: int, start_info: int) -> None:
        """32-bit flat protected mode, paging off, EBX = hvm_start_info (PVH ABI)."""
        sregs = self.fd.get_sregs()
        _flat_segment(sregs.cs, 0x08, 0xB)  # execute/read, accessed
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _flat_segment(seg, 0x10, 0x3)  # read/write, accessed
        _busy_tss(sregs.tr, 0x18)
        sregs.cr0 = CR0_PE | CR0_ET
        sregs.cr3 = 0
        sregs.cr4 = 0
        sregs.efer = 0
        self.fd.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        regs.rflags = RFLAGS_RESERVED
        regs.rip = entry
        regs.rbx = start_info
        self.fd.set_regs(regs)

    def setup_linux64(self, entry: int, boot_params: int, gdt: tuple[int, int], cr3: int,
                      stack: int) -> None:
        """The Linux 64-bit boot protocol's entry state: long mode, paging on (CR3 =
        the VMM's identity map), flat __BOOT_CS (0x10) and __BOOT_DS (0x18) from the
        GDT at ``gdt`` = (base, limit), interrupts off, RSI = the zero page."""
        sregs = self.fd.get_sregs()
        _flat_segment(sregs.cs, 0x10, 0xB, long_mode=True)  # execute/read, accessed, 64-bit
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _flat_segment(seg, 0x18, 0x3)                  # read/write, accessed
        _busy_tss(sregs.tr, 0x20)
        sregs.gdt.base, sregs.gdt.limit = gdt
        sregs.idt.base, sregs.idt.limit = 0, 0
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr3 = cr3
        sregs.cr4 = CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
        self.fd.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        regs.rflags = RFLAGS_RESERVED     # IF clear: interrupts off
        regs.rip = entry
        regs.rsi = boot_params
        regs.rsp = stack
        self.fd.set_regs(regs)

    # -- stopping ----------------------------------------------------------

    def stop(self) -> None:
        """Ask the run loop to return; safe from any thread, including this vCPU's."""
        self._stopping = True
        self._unpaused.set()
        self._kick()

    def pause(self) -> None:
        """Leave KVM_RUN and wait outside it until resume() (or stop()); safe
        from any thread. ``parked`` is set once the thread waits."""
        self._unpaused.clear()
        self._pausing = True
        self._kick()

    def resume(self) -> None:
        self._pausing = False
        self._unpaused.set()

    def _kick(self) -> None:
        run = self.fd.run_struct
        if run is not None:
            run.immediate_exit = 1
        tid = self._thread_id
        if tid is not None and tid != threading.get_ident():
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def _park(self) -> None:
        self.parked.set()
        try:
            while self._pausing and not self._stopping:
                self._unpaused.wait(0.5)
        finally:
            self.parked.clear()

    # -- the run loop --------------------------------------------------------

    def run(self) -> VcpuStop:
        """Run until stopped; return why. PIO and MMIO exits are served inline."""
        self._thread_id = threading.get_ident()
        try:
            return self._loop()
        finally:
            self._thread_id = None

    def _loop(self) -> VcpuStop:
        # Everything the hot path touches is bound to a local first: this loop
        # is the VMM's exit rate (see bench: PIO exits per second).
        run = self.fd.run_struct
        io, mmio = run.io, run.mmio
        data = self.fd.run_buffer
        mmio_data = ffi.buffer(mmio.data)
        ioctl, fdno, KVM_RUN = lib.pykvm_ioctl_val, self.fd.fd, lib.KVM_RUN
        counts = self.exit_counts
        trace = self.trace
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        EXIT_IO, EXIT_MMIO, IO_OUT = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_IO_OUT
        n_io = n_mmio = 0
        try:
            while not self._stopping:
                if ioctl(fdno, KVM_RUN, 0) < 0:
                    err = ffi.errno
                    if err not in (errno.EINTR, errno.EAGAIN):
                        raise KvmError("KVM_RUN", err)
                    counts["INTR"] += 1  # kicked: immediate_exit or the kick signal
                    run.immediate_exit = 0
                    if trace:
                        print("exit INTR (kicked)", file=trace)
                    if self._pausing:
                        self._park()
                    continue
                reason = run.exit_reason
                if reason == EXIT_IO:
                    n_io += 1
                    size, port, count, off = io.size, io.port, io.count, io.data_offset
                    end = off + size * count
                    if end > len(data):
                        return VcpuStop("unexpected", f"PIO data at {off:#x} outside kvm_run", reason)
                    out = io.direction == IO_OUT
                    for i in range(off, end, size):
                        if out:
                            value = int.from_bytes(data[i:i + size], "little")
                            pio_write(port, size, value)
                        else:
                            value = pio_read(port, size)
                            data[i:i + size] = value.to_bytes(size, "little")
                        if trace:
                            print(f"exit IO {'out' if out else 'in'} port={port:#x} size={size} "
                                  f"value={value:#x}", file=trace)
                elif reason == EXIT_MMIO:
                    n_mmio += 1
                    addr, length = mmio.phys_addr, mmio.len
                    if length not in (1, 2, 4, 8):
                        return VcpuStop("unexpected", f"MMIO access of {length} bytes at {addr:#x}",
                                        reason)
                    if mmio.is_write:
                        value = int.from_bytes(mmio_data[0:length], "little")
                        mmio_write(addr, length, value)
                    else:
                        value = mmio_read(addr, length)
                        mmio_data[0:length] = value.to_bytes(length, "little")
                    if trace:
                        print(f"exit MMIO {'write' if mmio.is_write else 'read'} addr={addr:#x} "
                              f"len={length} value={value:#x}", file=trace)
                else:
                    stop = self._decode_stop(reason)
                    if stop is not None:
                        return stop
            return VcpuStop("requested")
        finally:
            counts["IO"] += n_io
            counts["MMIO"] += n_mmio
            if not counts["MMIO"]:
                del counts["MMIO"]
            if not counts["IO"]:
                del counts["IO"]

    def _decode_stop(self, reason: int) -> VcpuStop | None:
        run = self.fd.run_struct
        name = EXIT_REASONS.get(reason, f"UNKNOWN({reason})")
        self.exit_counts[name] += 1
        if self.trace:
            print(f"exit {name}", file=self.trace)
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return VcpuStop("shutdown", "triple fault (KVM_EXIT_SHUTDOWN)", reason)
        if reason == lib.KVM_EXIT_HLT:
            return VcpuStop("hlt", "the guest halted", reason)
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            fe = run.fail_entry
            return VcpuStop("fail_entry", f"VM entry failed: hardware reason "
                            f"{fe.hardware_entry_failure_reason:#x} on cpu {fe.cpu}", reason)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            ie = run.internal
            sub = {lib.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
                   lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
                   lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
                   lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
                   }.get(ie.suberror, f"suberror {ie.suberror}")
            n = min(ie.ndata, 16)
            data = " ".join(f"{ie.data[i]:#x}" for i in range(n))
            return VcpuStop("internal_error", f"KVM internal error: {sub}"
                            + (f" (data {data})" if data else ""), reason)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            ev = run.system_event
            kind = {lib.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", lib.KVM_SYSTEM_EVENT_RESET: "reset",
                    lib.KVM_SYSTEM_EVENT_CRASH: "crash"}.get(ev.type, f"type {ev.type}")
            return VcpuStop("system_event", f"system event: {kind}", reason)
        if reason == lib.KVM_EXIT_DEBUG:
            return VcpuStop("debug", "debug exception (KVM_EXIT_DEBUG)", reason)
        if reason in (lib.KVM_EXIT_IRQ_WINDOW_OPEN, lib.KVM_EXIT_IOAPIC_EOI):
            return None
        return VcpuStop("unexpected", f"unexpected exit {name}", reason)

    def close(self) -> None:
        self.fd.close()


def print_exit_counts(counts: collections.Counter, out=sys.stderr) -> None:
    total = sum(counts.values())
    print(f"exits: {total} in all", file=out)
    for name, n in counts.most_common():
        print(f"  {name:<16} {n}", file=out)
