"""Machine: builds a VM from a config, owns its threads, runs it, tears it down.

This is the one module that knows every layer; it wires them together:
kvm (VM, irqchip, PIT, memory slots) -> memory -> buses -> devices -> boot ->
vCPUs. ``run()`` starts one thread per vCPU and waits for the first of: the
guest writing to isa-debug-exit, a vCPU stopping on its own (fault, shutdown
event), or the timeout.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import threading

from .boot.acpi import SLEEP_PORT, SLP_TYP_S5, write_acpi
from .boot.e820 import build_e820
from .boot.linux import image_kind, load_bzimage, load_initrd, payload_elf
from .boot.pvh import load_pvh, write_start_info
from .bus import Bus
from .devices import (DEBUG_EXIT_PORT, SERIAL_IRQ, SERIAL_PORT, AcpiSleep, DebugExit,
                      Serial16550)
from .errors import BootError, ConfigError, GuestFault, GuestTimeout, PykvmError
from .kvm import Kvm, lib
from .memory import GuestMemory
from .vcpu import CPUID_1_ECX_CX16, CPUID_1_ECX_XSAVE, CPUID_1_ECX_OSXSAVE, Vcpu, VcpuStop, build_cpuid

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
MIN_MEM = 2 << 20
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_FIRST_GSI = 5
PCI_MMIO_START = 0xE000_0000
MAX_CPUS = 64


def _host_mem_mib() -> int:
    """MemTotal of /proc/meminfo in MiB (0 if unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) >> 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def host_is_pvm() -> bool:
    """True when /dev/kvm is provided by kvm_pvm (CPL 0 emulated; see guest/README.md, "kvm_pvm findings")."""
    return os.path.isdir("/sys/module/kvm_pvm")


class DiskSpec:
    """One --disk, in QEMU's -drive syntax (README.md, "Disks"): the device's
    options (transport, serial, queues, ...), the backend's (cache, aio,
    readonly, discard, detect-zeroes) and the block graph's: ``file=``,
    ``format=`` (or ``driver=``), a format's own options (``offset=``,
    ``l2-cache-size=``, ...) and its children's as dotted options
    (``file.filename=``, ``backing.file.filename=``, ``data-file=``), or a
    ``json:{...}`` filename; ``self.node`` holds them nested (block.graph)."""

    TRANSPORTS = ("mmio", "pci")
    AIO = ("python", "threads", "native", "io_uring")
    KEYS = ("transport", "cache", "aio", "readonly", "discard", "detect-zeroes",
            "serial", "poll-max-ns", "irq-coalesce-ns", "queues", "num-queues", "iothread",
            "trace", "werror", "rerror", "logical_block_size", "physical_block_size",
            "min_io_size", "opt_io_size", "seg-max-adjust", "queue-size", "config-wce",
            "write-zeroes", "max-discard-sectors", "max-write-zeroes-sectors", "event_idx",
            "indirect_desc")

    def __init__(self, file: str = "", format: str | None = None, transport: str = "mmio",
                 cache: str = "writeback", aio: str | None = None, readonly: bool = False,
                 discard: str = "unmap", serial: str = "", detect_zeroes: str = "off",
                 poll_max_ns: int | None = None, irq_coalesce_ns: int | None = None,
                 queues: int = 1, iothread: str = "device", node: dict | None = None,
                 throttling=None, trace: str | None = None, werror: str = "enospc",
                 rerror: str = "report", knobs=None):
        from .block.graph import image_spec
        self.node = node if node is not None else image_spec(file, format)
        self.file = file or _node_filename(self.node)   # for messages
        self.format = format
        self.transport = transport
        self.cache = cache
        self.aio = aio
        self.readonly = readonly
        self.discard = discard
        self.serial = serial
        self.detect_zeroes = detect_zeroes
        self.poll_max_ns = poll_max_ns  # None: the C path's default
        self.irq_coalesce_ns = irq_coalesce_ns  # None: off, as 0
        self.queues = queues  # request queues (VIRTIO_BLK_F_MQ when > 1)
        self.iothread = iothread  # the C path: one I/O thread per "device" or per "queue"
        self.throttling = throttling  # a block.throttle.ThrottleConfig, or None
        self.trace = trace  # a file for the per-request trace (block/trace.py), or None
        self.werror = werror  # host write/flush errors: report|ignore|stop|enospc (QEMU's)
        self.rerror = rerror  # host read errors: report|ignore|stop
        self.knobs = knobs    # a virtio.blk.Knobs (QEMU's device properties), or None: defaults

    @classmethod
    def parse(cls, text: str) -> "DiskSpec":
        """'file=PATH,format=raw,...' or a bare path; raises ConfigError."""
        from .block import CACHE_MODES, DISCARD_MODES, BlockError
        from .block.graph import image_spec, nest, split_commas
        opts: dict[str, str] = {}
        node: dict[str, str] = {}
        throttling: dict[str, str] = {}   # throttling.KEY=VALUE, QEMU's I/O limits
        for i, item in enumerate(split_commas(text)):
            key, eq, value = item.partition("=")
            if not eq:
                if i == 0:
                    key, value = "file", item
                else:
                    raise ConfigError(f"--disk {text}: '{item}' is not KEY=VALUE")
            if key.startswith("throttling."):
                throttling[key.removeprefix("throttling.")] = value
            elif key in cls.KEYS:
                opts[key] = value
            else:
                node["driver" if key == "format" else key] = value
        if not node.get("file") and not any(k.startswith("file.") for k in node):
            raise ConfigError(f"--disk {text}: no file given")
        from .block.graph import node_keys
        known = node_keys()
        for key in node:
            if "." not in key and key not in known:
                raise ConfigError(f"--disk {text}: unknown option '{key}' (the device's: "
                                  f"{', '.join(cls.KEYS)}, throttling.*; the image's: "
                                  f"{', '.join(sorted(known))}, and a child's as "
                                  f"file.*, backing.*, data-file.*)")
        if "file" in node and any(k.startswith("file.") for k in node) and \
                not node["file"].startswith("json:"):
            # -drive file=PATH,file.locking=off: PATH is the file node's filename
            node["file.filename"] = node.pop("file")
        try:
            nested = nest(node, f"--disk {text}")
            file = nested.get("file")
            spec = image_spec(file, None) if isinstance(file, str) and \
                file.startswith("json:") and len(nested) == 1 else nested
        except BlockError as e:
            raise ConfigError(f"--disk {text}: {e.why}") from None

        def choice(key, allowed, default):
            value = opts.get(key, default)
            if value not in allowed:
                raise ConfigError(f"--disk {text}: {key}={value} is not one of "
                                  f"{', '.join(allowed)}")
            return value

        readonly = choice("readonly", ("on", "off"), "off") == "on"
        cache = choice("cache", tuple(CACHE_MODES), "writeback")
        aio = choice("aio", cls.AIO, None) if "aio" in opts else None
        file_aio = spec.get("file", {}).get("aio") if isinstance(spec.get("file"), dict) \
            else None
        if aio is None and file_aio is not None:
            aio = file_aio
            if aio not in cls.AIO:
                raise ConfigError(f"--disk {text}: file.aio={aio} is not one of "
                                  f"{', '.join(cls.AIO)}")
        if aio not in (None, "python"):
            from .aio.native import EngineUnavailable, check_engine
            try:
                check_engine(aio, CACHE_MODES[cache].direct)
            except EngineUnavailable as e:
                raise ConfigError(f"--disk {text}: {e}") from None
        detect_zeroes = choice("detect-zeroes", ("off", "on", "unmap"), "off")

        def nanoseconds(key):
            value = opts.get(key)
            if value is not None and (not value.isdigit() or int(value) > 1_000_000_000):
                raise ConfigError(f"--disk {text}: {key}={value} is not a number of "
                                  f"nanoseconds from 0 to 1000000000")
            return None if value is None else int(value)

        from .virtio.blk import IOTHREADS, MAX_QUEUES, RERROR, WERROR, Knobs
        if "num-queues" in opts and "queues" in opts:
            raise ConfigError(f"--disk {text}: give queues or num-queues, not both")
        queues = opts.get("queues", opts.get("num-queues", "1"))
        device = {k: v for k, v in opts.items() if k in Knobs.KEYS}
        if opts.get("discard") in ("on", "off"):      # the device's feature (QEMU's -device)
            device["discard"] = opts.pop("discard")
        try:
            knobs = Knobs.parse(device)
        except ValueError as e:
            raise ConfigError(f"--disk {text}: {e}") from None
        if not queues.isdigit() or not 1 <= int(queues) <= MAX_QUEUES:
            raise ConfigError(f"--disk {text}: queues={queues} is not a number from 1 to "
                              f"{MAX_QUEUES}")
        from .block.throttle import ThrottleConfig, ThrottleError
        try:
            limits = ThrottleConfig(throttling) if throttling else None
        except ThrottleError as e:
            raise ConfigError(f"--disk {text}: {e}") from None
        return cls(node=spec, format=spec.get("driver"),
                   transport=choice("transport", cls.TRANSPORTS, "mmio"),
                   cache=cache, aio=aio, readonly=readonly,
                   discard=choice("discard", DISCARD_MODES, "unmap"),
                   serial=opts.get("serial", ""), detect_zeroes=detect_zeroes,
                   poll_max_ns=nanoseconds("poll-max-ns"),
                   irq_coalesce_ns=nanoseconds("irq-coalesce-ns"), queues=int(queues),
                   iothread=choice("iothread", IOTHREADS, "device"), throttling=limits,
                   trace=opts.get("trace") or None,
                   werror=choice("werror", WERROR, "enospc"),
                   rerror=choice("rerror", RERROR, "report"), knobs=knobs)


def _node_filename(node) -> str:
    """The file at the bottom of a node description (for messages)."""
    while isinstance(node, dict):
        if "filename" in node:
            return str(node["filename"])
        node = node.get("file")
    return str(node or "")


def open_disk(spec: DiskSpec, name: str = "disk0"):
    """The BlockBackend of a --disk: its block graph (root node ``name``),
    cache mode and AIO engine (no aio= given: the fastest engine that works
    here, with one log line when that is not the first choice)."""
    import logging

    from .aio.native import default_engine, open_engine
    from .block import CACHE_MODES, BlockBackend
    from .block.graph import tree_lines
    from .block.throttle import group_for
    direct = CACHE_MODES[spec.cache].direct
    throttle = group_for(spec.throttling, name) if spec.throttling else None
    engine = open_engine(spec.aio or default_engine(direct), direct)
    try:
        backend = BlockBackend(spec.node, cache=spec.cache, read_only=spec.readonly,
                               discard=spec.discard, detect_zeroes=spec.detect_zeroes,
                               engine=engine, name=name, throttle=throttle)
    except BaseException:
        engine.close()
        raise
    log = logging.getLogger("pykvm.block")
    if log.isEnabledFor(logging.INFO):
        for line in tree_lines(backend.root):
            log.info("%s", line)
    return backend


BOOT_MODES = ("auto", "linux", "pvh")


class MachineConfig:
    """What to build. ``kernel``: a PVH ELF (our guests, a vmlinux) or a Linux
    bzImage, told apart by content; ``initrd``: a file for the kernel's initrd
    (None: none); ``serial_out``: binary file for the UART (None: stdout);
    ``trace``: text file for per-exit trace lines (None: no trace); ``disks``:
    DiskSpecs, each a virtio-blk device; ``boot``: 'auto' (by content: an ELF by its
    PVH note, a bzImage by the Linux boot protocol), 'linux' (a bzImage by the boot
    protocol) or 'pvh' (an ELF, or the ELF inside a bzImage's payload, by its PVH
    note: the bzImage's decompressor does not run)."""

    def __init__(self, kernel: str, cmdline: str = "", mem_size: int = 256 << 20, cpus: int = 1,
                 serial_out=None, trace=None, hugepages: bool = True, disks=None,
                 initrd: str | None = None, boot: str = "auto"):
        if boot not in BOOT_MODES:
            raise ConfigError(f"--boot={boot}: not one of {', '.join(BOOT_MODES)}")
        self.boot = boot
        self.disks = list(disks or [])
        self.initrd = initrd
        self.kernel = kernel
        self.cmdline = cmdline
        self.mem_size = mem_size
        self.cpus = cpus
        self.serial_out = serial_out
        self.trace = trace
        self.hugepages = hugepages


class RunResult:
    """``status``: the guest's debug-exit value; 0 for a shutdown event; None
    when the host stopped the machine."""

    def __init__(self, status: int | None, stop: VcpuStop | None = None,
                 exit_counts: dict | None = None):
        self.status = status
        self.stop = stop
        self.exit_counts = exit_counts or {}


class Machine:
    def __init__(self, config: MachineConfig):
        if config.mem_size < MIN_MEM or config.mem_size % 4096:
            raise ConfigError(f"--mem {config.mem_size}: need at least 2 MiB, a multiple of 4 KiB")
        if not 1 <= config.cpus <= MAX_CPUS:
            raise ConfigError(f"--cpus {config.cpus}: must be between 1 and {MAX_CPUS}")
        self.config = config
        self._closers = []
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.power_cut: str | None = None   # a blkdebug power-cut rule fired: its line
        self._exit_status: int | None = None
        self._stop: VcpuStop | None = None
        self._stopped_vcpu: Vcpu | None = None
        self.blk_devices: list = []        # the VirtioBlk of each --disk
        self._paused = False
        self._pause_lock = threading.Lock()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction --------------------------------------------------------

    def _build(self) -> None:
        cfg = self.config
        self.kvm = Kvm()
        self._closers.append(self.kvm.close)
        self.kvm.require("KVM_CAP_USER_MEMORY", "KVM_CAP_EXT_CPUID", why="running a guest")
        self.kvm.require("KVM_CAP_IRQCHIP", "KVM_CAP_PIT2", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD",
                         why="the in-kernel interrupt controllers and device notifications")
        self.kvm.require("KVM_CAP_IMMEDIATE_EXIT", why="stopping vCPUs cleanly")
        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm.close)
        if self.kvm.check_extension(lib.KVM_CAP_SET_TSS_ADDR):
            self.vm.set_tss_addr(TSS_ADDR)
        if self.kvm.check_extension(lib.KVM_CAP_SET_IDENTITY_MAP_ADDR):
            self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()

        try:
            self.mem = GuestMemory(cfg.mem_size, hugepages=cfg.hugepages)
        except OSError as e:   # ENOMEM: more than the host will map (overcommit rules)
            raise ConfigError(f"--mem {cfg.mem_size >> 20}M: cannot map that much guest RAM "
                              f"({e.strerror}; this host has {_host_mem_mib()} MiB)") from None
        self._closers.append(self.mem.close)
        for slot, r in enumerate(self.mem.regions):
            self.vm.set_user_memory_region(slot, r.gpa, r.size, r.hva)

        self.pio = Bus("pio", 0x10000)
        self.mmio = Bus("mmio", 1 << 52)
        out = cfg.serial_out if cfg.serial_out is not None else sys.stdout.buffer
        self.serial = Serial16550(out, irq=lambda level: self.vm.irq_line(SERIAL_IRQ, level))
        self.pio.register(SERIAL_PORT, 8, self.serial)
        self.pio.register(DEBUG_EXIT_PORT, 1, DebugExit(self._on_debug_exit))
        self.pio.register(SLEEP_PORT, 1, AcpiSleep(lambda: self._on_debug_exit(0), SLP_TYP_S5))

        self.kernel_kind = image_kind(cfg.kernel)
        pvh_data = None
        if cfg.boot == "linux" and self.kernel_kind != "bzimage":
            raise BootError(cfg.kernel, "--boot=linux needs a bzImage; this is an ELF "
                            "(boot it by its PVH note: --boot=pvh or auto)")
        if cfg.boot == "pvh" and self.kernel_kind == "bzimage":
            pvh_data = payload_elf(cfg.kernel)
            self.kernel_kind = "elf"
        self.e820 = build_e820(self.mem)
        self.disks: list = []
        self.mmio_windows: list[tuple[int, int, int]] = []   # (base, size, gsi), for ACPI
        extra = self._add_disks(cfg.disks)
        self.cmdline = " ".join(filter(None, [cfg.cmdline] + extra))
        self.rsdp = write_acpi(self.mem, cfg.cpus, self.mmio_windows,
                               pci=any(d.transport == "pci" for d in self.disks))
        if self.kernel_kind == "bzimage":
            self.image = load_bzimage(cfg.kernel, self.mem, self.cmdline, self.e820,
                                      initrd=cfg.initrd, rsdp=self.rsdp)
        else:
            self.image = load_pvh(cfg.kernel, self.mem, data=pvh_data)
            modules = []
            if cfg.initrd is not None:
                lowest = max(p + n for p, n in self.image.segments)
                modules.append(load_initrd(cfg.initrd, self.mem, lowest, self.mem.regions[0].end))
            start_info = write_start_info(self.mem, self.image, self.cmdline, self.e820,
                                          rsdp=self.rsdp, modules=modules)

        supported = self.kvm.supported_cpuid()
        # On kvm_pvm, CPL-0 guest code runs in KVM's instruction emulator, which
        # lacks cmpxchg16b and the xsave family: hide them. Measured:
        # kvm_pvm honours the CX16 and OSXSAVE clears, but reports the host's XSAVE
        # (and SSE3..AVX-512) whatever this table says, so a stock Linux needs
        # "noxsave" on its command line to keep off xrstor (pykvm/boot/README.md).
        hide = CPUID_1_ECX_CX16 | CPUID_1_ECX_XSAVE | CPUID_1_ECX_OSXSAVE if host_is_pvm() else 0
        self.vcpus: list[Vcpu] = []
        for i in range(cfg.cpus):
            fd = self.vm.create_vcpu(i)
            vcpu = Vcpu(fd, self.pio, self.mmio, trace=cfg.trace)
            self._closers.append(vcpu.close)
            self.tsc_khz = fd.get_tsc_khz()
            vcpu.set_cpuid(build_cpuid(supported, i, self.tsc_khz, hide_ecx1=hide))
            self.vcpus.append(vcpu)
        if self.kernel_kind == "bzimage":
            img = self.image
            self.vcpus[0].setup_linux64(img.entry, img.boot_params, img.gdt, img.cr3, img.stack)
        else:
            self.vcpus[0].setup_pvh(self.image.entry, start_info)
        # vCPUs 1..N-1 are APs: with the in-kernel LAPIC they wait for INIT/SIPI.

    def _add_disks(self, specs: list[DiskSpec]) -> list[str]:
        """Create each disk's backend, device and transport; return the command
        line fragments that announce virtio-mmio devices."""
        if not specs:
            return []  # before the imports: a diskless boot does not pay for them
        from .kvm import GsiRouting
        from .virtio.blk import VirtioBlk
        from .virtio.device import VirtioCore
        from .virtio.transport.mmio import WINDOW_SIZE, VirtioMmio
        from .virtio.transport.pci import VirtioPci

        cmdline = []
        pci_host = None
        next_pci_bar = PCI_MMIO_START
        for i, spec in enumerate(specs):
            backend = open_disk(spec, name=f"disk{i}")
            backend.on_power_cut = self._on_power_cut
            trace = None
            if spec.trace:
                from .block.trace import Trace
                try:
                    trace = Trace(spec.trace)
                except OSError as e:
                    backend.close()
                    raise ConfigError(f"--disk ...,trace={spec.trace}: {e.strerror}") from None
                self._closers.append(trace.close)   # after the device's (closers go last first)
            dev = VirtioBlk(backend, serial=spec.serial or f"pykvm-disk{i}", name=f"virtio-blk{i}",
                            poll_max_ns=spec.poll_max_ns, irq_coalesce_ns=spec.irq_coalesce_ns,
                            num_queues=spec.queues, iothread=spec.iothread, trace=trace,
                            werror=spec.werror, rerror=spec.rerror, on_stop=self._error_stop,
                            knobs=spec.knobs)
            self.blk_devices.append(dev)
            core = VirtioCore(dev, self.mem, name=dev.name)
            if spec.transport == "mmio":
                n = sum(1 for d in self.disks if d.transport == "mmio")
                base, gsi = VIRTIO_MMIO_BASE + n * WINDOW_SIZE, VIRTIO_MMIO_FIRST_GSI + n
                transport = VirtioMmio(core, base, gsi, vm=self.vm)
                self.mmio.register(base, WINDOW_SIZE, transport)
                self.mmio_windows.append((base, WINDOW_SIZE, gsi))
                cmdline.append(transport.cmdline)
            else:
                if pci_host is None:
                    from .devices.pci import CONFIG_ADDRESS, PciHost
                    pci_host = self.pci = PciHost(self.mmio)
                    self.pio.register(CONFIG_ADDRESS, 8, pci_host)
                    self.gsi_routing = GsiRouting(self.vm)
                transport = VirtioPci(core, vm=self.vm, routing=self.gsi_routing)
                pci_host.attach(transport)
                for bar in transport.bars.values():
                    next_pci_bar = -(-next_pci_bar // bar.size) * bar.size
                    transport.set_bar_address(bar.index, next_pci_bar)
                    next_pci_bar += bar.size
                transport.enable()
            self._closers.append(transport.close)
            transport.transport = spec.transport
            self.disks.append(transport)
        return cmdline

    # -- running -------------------------------------------------------------

    def _on_debug_exit(self, value: int) -> None:
        with self._lock:
            if self._exit_status is None:
                self._exit_status = value
        self._request_stop()

    def _on_power_cut(self, message: str) -> None:
        """A disk's blkdebug power-cut rule fired: the VM stops at once."""
        with self._lock:
            if self.power_cut is None:
                self.power_cut = message
        self._request_stop()

    def _request_stop(self) -> None:
        self._done.set()
        for v in self.vcpus:
            v.stop()

    def _vcpu_thread(self, vcpu: Vcpu) -> None:
        try:
            stop = vcpu.run()
        except Exception as e:  # a VMM bug or a KVM error: stop the VM, report it
            stop = VcpuStop("vmm_error", f"vCPU {vcpu.index}: {type(e).__name__}: {e}")
        if stop.kind != "requested":
            with self._lock:
                if self._stop is None and self._exit_status is None:
                    self._stop = stop
                    self._stopped_vcpu = vcpu
        self._request_stop()

    def run(self, timeout: float | None = None) -> RunResult:
        """Run until the guest exits; raise GuestFault or GuestTimeout otherwise."""
        threads = [threading.Thread(target=self._vcpu_thread, args=(v,), name=f"vcpu{v.index}",
                                    daemon=True) for v in self.vcpus]
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(self.RESUME_SIGNAL, lambda *_: self.resume())
        for dev in self.blk_devices:     # rules with a time count from here
            dev.backend.start_clock()
        for t in threads:
            t.start()
        try:
            finished = self._done.wait(timeout)
        finally:
            if old is not None:
                signal.signal(self.RESUME_SIGNAL, old)
            self._request_stop()
            for t in threads:
                t.join()
            self.serial.flush()
        counts = self.exit_counts()
        if self._exit_status is not None:
            return RunResult(self._exit_status, None, dict(counts))
        if not finished:
            raise GuestTimeout(f"guest did not stop within {timeout:g} s")
        stop = self._stop
        if stop is None:  # stop() from the host
            return RunResult(None, VcpuStop("requested", "stopped by the host"), dict(counts))
        if stop.kind == "system_event":
            return RunResult(0, stop, dict(counts))
        if stop.kind == "vmm_error":
            raise PykvmError(f"internal error: {stop.detail}")
        raise self._fault(stop)

    def stop(self) -> None:
        """Stop a running machine from another thread; run() then returns."""
        self._request_stop()

    # -- pause and resume (a disk's werror/rerror=stop|enospc) -----------------

    RESUME_SIGNAL = signal.SIGCONT

    @property
    def paused(self) -> bool:
        return self._paused

    def _error_stop(self, dev, line: str) -> None:
        """A disk stopped on a host error (VirtioBlk's on_stop): pause the VM,
        with one line that says how to go on."""
        self.pause()        # first: a SIGCONT sent on seeing the line finds it paused
        how = f"send SIGCONT to pid {os.getpid()} (or call Machine.resume())"
        logging.getLogger("pykvm.virtio").error("%s; VM paused: fix the cause, then %s",
                                                line, how)

    def pause(self) -> None:
        """Stop the guest: every vCPU leaves KVM_RUN and waits, and no disk
        completes a request, until resume(). Safe from any thread."""
        with self._pause_lock:
            if self._paused:
                return
            self._paused = True
            for v in self.vcpus:
                v.pause()
            for dev in self.blk_devices:
                dev.pause()

    def resume(self) -> None:
        """Go on after pause(): disks retry the requests they stopped on (a
        request that fails again stops the VM again) and complete what they
        held; then the vCPUs run. Safe from any thread, and from a signal
        handler (SIGCONT while run() waits)."""
        with self._pause_lock:
            if not self._paused:
                return
            self._paused = False
            for dev in self.blk_devices:
                dev.resume()
            for v in self.vcpus:
                v.resume()

    # -- a QMP socket's target (qmp.py) -------------------------------------

    def qmp_disks(self) -> dict:
        return {dev.backend.name: dev.backend for dev in self.blk_devices}

    def qmp_status(self) -> str:
        return "paused" if self._paused else "running"

    def qmp_stop(self) -> None:
        self.pause()

    def qmp_cont(self) -> None:
        self.resume()

    def qmp_quit(self) -> None:
        with self._lock:        # as QEMU's quit: a normal end (exit 0)
            if self._exit_status is None:
                self._exit_status = 0
        self.stop()

    def exit_counts(self) -> collections.Counter:
        """VM exits per reason, summed over the vCPUs."""
        total: collections.Counter = collections.Counter()
        for v in self.vcpus:
            total.update(v.exit_counts)
        return total

    def _fault(self, stop: VcpuStop) -> GuestFault:
        from . import debug  # capstone and pyelftools load only when there is a report to make
        vcpu = self._stopped_vcpu or self.vcpus[0]
        try:
            regs = vcpu.fd.get_regs()
            sregs = vcpu.fd.get_sregs()
        except Exception as e:  # the vCPU is unreadable: say so, without a report
            return GuestFault(stop.kind, 0, "", "", f"{stop.detail}; registers unreadable: {e}")
        text, rip, symbol, insn = debug.fault_report(f"vCPU {vcpu.index}: {stop.detail}",
                                                     regs, sregs, self.mem,
                                                     debug.Symbols.from_elf(self.config.kernel))
        return GuestFault(stop.detail, rip, symbol, insn, text)

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
