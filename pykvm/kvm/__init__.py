"""Thin, typed wrappers over the KVM ioctls: Kvm -> VmFd -> VcpuFd.

Every ioctl number and struct layout comes from <linux/kvm.h> through cffi
(native/kvm.h); nothing is typed in by hand. Each wrapper raises KvmError
naming the ioctl and errno. cffi releases the GIL around every C call, so a
vCPU thread blocked in KVM_RUN never stalls the rest of the VMM.
"""
from __future__ import annotations

import errno
import mmap
import os
import signal
import threading

from .._native import ffi, lib
from ..errors import KvmError, KvmUnavailable, MissingCapability

__all__ = ["Kvm", "VmFd", "VcpuFd", "GsiRouting", "ffi", "lib", "KICK_SIGNAL"]

#: Signal used to kick a vCPU thread out of KVM_RUN (handler installed in C).
KICK_SIGNAL = signal.SIGUSR1

EXIT_REASONS = {
    getattr(lib, name): name[len("KVM_EXIT_"):]
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")
}


def _ioctl(fd: int, request: int, arg, name: str) -> int:
    """ioctl with a pointer argument; retries EINTR only where asked by the caller."""
    ret = lib.pykvm_ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(name, ffi.errno)
    return ret


def _ioctl_val(fd: int, request: int, value: int, name: str) -> int:
    ret = lib.pykvm_ioctl_val(fd, request, value)
    if ret < 0:
        raise KvmError(name, ffi.errno)
    return ret


class Kvm:
    """The /dev/kvm system fd: API version, capabilities, supported CPUID."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: KVM is not available on this host "
                                 "(is the kvm module loaded?)") from None
        except PermissionError:
            raise KvmUnavailable(f"{path}: permission denied (add yourself to the 'kvm' group "
                                 "or run as root)") from None
        except OSError as e:
            raise KvmUnavailable(f"{path}: {e.strerror}") from None
        version = _ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path}: KVM API version {version}, expected {lib.KVM_API_VERSION}")
        self.vcpu_mmap_size = _ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0,
                                         "KVM_GET_VCPU_MMAP_SIZE")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific value."""
        return max(0, lib.pykvm_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    def require(self, *caps: str, why: str) -> None:
        """Raise MissingCapability for the first of ``caps`` (names) the host lacks."""
        for cap in caps:
            if not self.check_extension(getattr(lib, cap)):
                raise MissingCapability(cap, why)

    def supported_cpuid(self) -> list[dict]:
        """KVM_GET_SUPPORTED_CPUID as a list of dicts (function, index, flags, eax..edx)."""
        n = 128
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            ret = lib.pykvm_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if ret == 0:
                break
            if ffi.errno != 7 or n >= 4096:  # E2BIG: grow and retry
                raise KvmError("KVM_GET_SUPPORTED_CPUID", ffi.errno)
            n *= 2
        return [
            {k: getattr(e, k) for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")}
            for e in buf.entries[0:buf.nent]
        ]

    def create_vm(self) -> "VmFd":
        fd = _ioctl_val(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return VmFd(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VmFd:
    """A VM: memory slots, in-kernel irqchip and PIT, IRQ lines, irqfd, ioeventfd."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return max(0, lib.pykvm_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    def set_user_memory_region(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": hva})
        _ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region,
               f"KVM_SET_USER_MEMORY_REGION(slot={slot}, gpa={gpa:#x}, size={size:#x})")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        p = ffi.new("uint64_t *", addr)
        _ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, p, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl_val(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        cfg = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        _ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        arg = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        _ioctl(self.fd, lib.KVM_IRQ_LINE, arg, f"KVM_IRQ_LINE({irq}, {level})")

    def irqfd(self, eventfd: int, gsi: int, deassign: bool = False) -> None:
        arg = ffi.new("struct kvm_irqfd *", {
            "fd": eventfd, "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0})
        _ioctl(self.fd, lib.KVM_IRQFD, arg, f"KVM_IRQFD(gsi={gsi})")

    def ioeventfd(self, eventfd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": length, "fd": eventfd, "flags": flags})
        _ioctl(self.fd, lib.KVM_IOEVENTFD, arg, f"KVM_IOEVENTFD(addr={addr:#x}, len={length})")

    def set_gsi_routing(self, routes: list[dict]) -> None:
        """KVM_SET_GSI_ROUTING. Each route: {"gsi", "type": "irqchip"|"msi", ...}."""
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for i, r in enumerate(routes):
            e = table.entries[i]
            e.gsi = r["gsi"]
            if r["type"] == "irqchip":
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = r["irqchip"]
                e.u.irqchip.pin = r["pin"]
            else:
                e.type = lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r["address_lo"]
                e.u.msi.address_hi = r["address_hi"]
                e.u.msi.data = r["data"]
        _ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def create_vcpu(self, index: int) -> "VcpuFd":
        fd = _ioctl_val(self.fd, lib.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU({index})")
        return VcpuFd(self, fd, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VcpuFd:
    """A vCPU: its mmap'd kvm_run, registers, MSRs, CPUID, and KVM_RUN itself."""

    def __init__(self, vm: VmFd, fd: int, index: int):
        self.vm = vm
        self.fd = fd
        self.index = index
        size = vm.kvm.vcpu_mmap_size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = ffi.from_buffer(self._map)
        self.run_struct = ffi.cast("struct kvm_run *", self._buf)
        #: the whole kvm_run mapping as a buffer: PIO data lives at io.data_offset
        self.run_buffer = ffi.buffer(self._buf, size)

    def run(self) -> int:
        """KVM_RUN (GIL released). Returns the exit reason, or -EINTR when kicked."""
        ret = lib.pykvm_ioctl_val(self.fd, lib.KVM_RUN, 0)
        if ret < 0:
            err = ffi.errno
            if err in (errno.EINTR, errno.EAGAIN):  # a kick (immediate_exit or signal)
                return -errno.EINTR
            raise KvmError("KVM_RUN", err)
        return self.run_struct.exit_reason

    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        _ioctl(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        _ioctl(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, idx in enumerate(indices):
            msrs.entries[i].index = idx
        n = _ioctl(self.fd, lib.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        for i, (idx, val) in enumerate(values.items()):
            msrs.entries[i].index = idx
            msrs.entries[i].data = val
        n = _ioctl(self.fd, lib.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if n != len(values):
            bad = list(values)[n]
            raise KvmError("KVM_SET_MSRS", 22, f"MSR {bad:#x} refused")

    def set_cpuid(self, entries: list[dict]) -> None:
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            for k, v in e.items():
                setattr(buf.entries[i], k, v)
        _ioctl(self.fd, lib.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_tsc_khz(self) -> int:
        return _ioctl_val(self.fd, lib.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def set_guest_debug(self, control: int) -> None:
        dbg = ffi.new("struct kvm_guest_debug *", {"control": control})
        _ioctl(self.fd, lib.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")

    def close(self) -> None:
        if self.fd >= 0:
            self._buf = None
            self.run_struct = None
            self.run_buffer = None
            try:
                self._map.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1


class GsiRouting:
    """The VM's GSI routing table: KVM's default irqchip routes plus MSI routes.

    KVM_SET_GSI_ROUTING replaces the whole table, so whoever adds an MSI route
    must resend the default ones too; this class owns that. GSIs 0-23 are the
    IOAPIC pins (0-15 also the PICs'), as after KVM_CREATE_IRQCHIP; MSI routes
    take GSIs from 24 up.
    """

    FIRST_MSI_GSI = 24
    IOAPIC_PINS = 24

    def __init__(self, vm: VmFd):
        self.vm = vm
        self._msi: dict[int, tuple[int, int]] = {}  # gsi -> (address, data)
        self._next = self.FIRST_MSI_GSI
        self._lock = threading.Lock()

    def allocate(self) -> int:
        with self._lock:
            gsi = self._next
            self._next += 1
            return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        with self._lock:
            if self._msi.get(gsi) == (address, data):
                return
            self._msi[gsi] = (address, data)
            self._commit()

    def _commit(self) -> None:
        routes = []
        for pin in range(self.IOAPIC_PINS):
            if pin < 16:
                chip = lib.KVM_IRQCHIP_PIC_MASTER if pin < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
                routes.append({"gsi": pin, "type": "irqchip", "irqchip": chip, "pin": pin % 8})
            routes.append({"gsi": pin, "type": "irqchip", "irqchip": lib.KVM_IRQCHIP_IOAPIC,
                           "pin": pin})
        for gsi, (address, data) in sorted(self._msi.items()):
            routes.append({"gsi": gsi, "type": "msi", "address_lo": address & 0xFFFFFFFF,
                           "address_hi": address >> 32, "data": data})
        self.vm.set_gsi_routing(routes)
