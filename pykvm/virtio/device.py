"""The virtio device interface, and the state every transport shares.

``VirtioDevice`` is what a transport talks to and all it may touch: features,
queue sizes, config space, activate, reset. ``VirtioCore`` holds the state
the spec defines for every device whatever the transport (spec 2.1-2.6, 3.1):
the status byte and its state machine, feature negotiation, the queues, the
config generation, and DEVICE_NEEDS_RESET. The MMIO and PCI transports are
register maps over one ``VirtioCore``.

Notifications cross layers as file descriptors, never as Python calls into
the device: each queue has a *kick* eventfd (KVM's ioeventfd writes it when
the guest notifies; a vhost-user front-end holds the same kind of fd), and
the transport's ``Interrupt`` turns "queue N has used buffers" into an irqfd
write. That contract is what the C fast path takes over unchanged.
"""
from __future__ import annotations

import abc
import logging
import os
import threading

from .queue import QueueError, SplitQueue

# the device counters a one-line summary shows (pykvm fio, pykvm serve -v)
SUMMARY_COUNTERS = ("requests", "batches", "interrupts", "interrupts_suppressed", "punts",
                    "errors", "throttled")
# shown only when not 0 (a disk without throttling.* limits never has any)
_IF_ANY = ("throttled",)


def counters_summary(counters: dict) -> str:
    """'requests=N, batches=N, ...' for the SUMMARY_COUNTERS a device keeps."""
    return ", ".join(f"{k}={counters[k]}" for k in SUMMARY_COUNTERS
                     if k in counters and (counters[k] or k not in _IF_ANY))

log = logging.getLogger("pykvm.virtio")

# Device status bits (spec 2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 0x40
FAILED = 0x80

# Transport-independent feature bits (spec 6)
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33

ID_BLOCK = 2


class Interrupt(abc.ABC):
    """How a device tells the driver something: provided by the transport."""

    @abc.abstractmethod
    def signal_queue(self, index: int) -> None:
        """Used buffers were added to queue ``index`` and the driver wants to know."""

    @abc.abstractmethod
    def signal_config(self) -> None:
        """The configuration (or DEVICE_NEEDS_RESET) changed."""

    def call_fd(self, index: int) -> int | None:
        """The eventfd that interrupts for queue ``index`` right now, for code
        (the C fast path) that signals without Python; None if there is none."""
        return None


class VirtioDevice(abc.ABC):
    """A virtio device as its transports see it."""

    device_id: int = 0
    name: str = "virtio"

    @abc.abstractmethod
    def features(self) -> int:
        """Feature bits offered to the driver (VERSION_1 included)."""

    @abc.abstractmethod
    def queue_sizes(self) -> list[int]:
        """Maximum size of each queue; their count is the number of queues."""

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> int:
        """Device-specific configuration space (little-endian); 0 past its end."""

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Driver writes to config space; most fields are read-only."""

    @abc.abstractmethod
    def activate(self, mem, queues: list[SplitQueue], features: int, kicks: list[int],
                 interrupt: Interrupt, fail) -> None:
        """DRIVER_OK: start serving the ready ``queues`` (``kicks[i]`` is queue
        i's kick eventfd). On a fatal guest error the device calls
        ``fail(message)`` (DEVICE_NEEDS_RESET) and stops serving by itself."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Stop serving queues; in-flight requests complete or are dropped
        before this returns (no guest memory is touched afterwards)."""

    def interrupts_changed(self) -> None:
        """The transport's interrupt routing changed (an MSI-X vector masked,
        unmasked or re-assigned): code that signals by eventfd on its own (the
        C fast path) must look again at ``Interrupt.call_fd``."""

    def close(self) -> None:
        """Release host resources (files, threads) for good."""
        self.reset()


class VirtioCore:
    """Status, features, queues and config generation of one device.

    Every value the driver writes is checked here: features outside what the
    device offered are refused at FEATURES_OK (the bit does not stick, as the
    spec asks), status bits may only be added in the spec's order, and queue
    configuration is validated when the driver sets DRIVER_OK.
    """

    def __init__(self, device: VirtioDevice, mem, name: str | None = None):
        self.device = device
        self.mem = mem
        self.name = name or device.name
        self.offered = device.features()
        self.queues = [SplitQueue(i, n) for i, n in enumerate(device.queue_sizes())]
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in self.queues]
        self.interrupt: Interrupt | None = None
        # _lock serialises the driver's writes (vCPU threads) and may be held
        # while the device's I/O thread is joined; the I/O thread itself only
        # ever takes _status_lock, to add DEVICE_NEEDS_RESET.
        self._lock = threading.RLock()
        self._status_lock = threading.Lock()
        self.status = 0
        self.driver_features = 0
        self.config_generation = 0
        self.active = False

    # -- features ------------------------------------------------------------

    def device_features_word(self, select: int) -> int:
        return (self.offered >> (32 * select)) & 0xFFFFFFFF if select < 2 else 0

    def set_driver_features_word(self, select: int, value: int) -> None:
        with self._lock:
            if self.status & FEATURES_OK or not self.status & DRIVER:
                log.warning("%s: driver wrote features outside feature negotiation; ignored",
                            self.name)
                return
            if select > 1:
                return
            shift = 32 * select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | \
                ((value & 0xFFFFFFFF) << shift)

    # -- status --------------------------------------------------------------

    def write_status(self, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if value == 0:
                self.reset()
                return
            old = self.status
            if value & ~old & (DEVICE_NEEDS_RESET):
                value &= ~DEVICE_NEEDS_RESET  # only the device sets NEEDS_RESET
            if old & ~value & ~DEVICE_NEEDS_RESET:
                log.warning("%s: driver cleared status bits %#x without a reset; ignored",
                            self.name, old & ~value)
                return
            new_bits = value & ~old
            if new_bits & FAILED:
                self._set_status(old | FAILED)
                self._stop_device()
                return
            if new_bits & FEATURES_OK:
                bad = self.driver_features & ~self.offered
                if bad or not self.driver_features & F_VERSION_1:
                    why = (f"features {bad:#x} were not offered" if bad
                           else "VERSION_1 is required (no legacy interface)")
                    log.warning("%s: FEATURES_OK refused: %s", self.name, why)
                    value &= ~FEATURES_OK
            if new_bits & DRIVER_OK and not self.active:
                if not value & FEATURES_OK:
                    log.warning("%s: DRIVER_OK without FEATURES_OK; ignored", self.name)
                    value &= ~DRIVER_OK
                else:
                    self._set_status(value)
                    self._activate()
                    return
            self._set_status(value)

    def _set_status(self, value: int) -> None:
        """Store the driver's status value, keeping a NEEDS_RESET the device set."""
        with self._status_lock:
            self.status = (value & ~DEVICE_NEEDS_RESET) | (self.status & DEVICE_NEEDS_RESET)

    def _activate(self) -> None:
        features = self.driver_features
        queues = []
        try:
            for q in self.queues:
                if not q.ready:
                    continue
                q.event_idx = bool(features & F_EVENT_IDX)
                q.indirect = bool(features & F_INDIRECT_DESC)
                q.activate(self.mem)
                queues.append(q)
        except QueueError as e:
            self.fail(str(e))
            return
        self.active = True
        self.device.activate(self.mem, self.queues, features, self.kicks, self.interrupt,
                             self.fail)

    def _stop_device(self) -> None:
        if self.active:
            self.device.reset()
            self.active = False

    def reset(self) -> None:
        """Device reset (status 0 written): everything back to power-on state."""
        with self._lock:
            self._stop_device()
            for q in self.queues:
                q.reset()
            for fd in self.kicks:
                _drain(fd)
            with self._status_lock:
                self.status = 0
            self.driver_features = 0

    def fail(self, message: str) -> None:
        """A fatal guest error: set DEVICE_NEEDS_RESET, log one line, tell the driver.

        Safe from any thread. The caller (the device's I/O thread, usually)
        stops serving the queues itself; the driver's reset then stops the
        device for good.
        """
        with self._status_lock:
            if self.status & DEVICE_NEEDS_RESET:
                return
            self.status |= DEVICE_NEEDS_RESET
        log.error("%s: %s; device needs reset", self.name, message)
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.interrupt is not None:
            self.interrupt.signal_config()

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.interrupt is not None and self.status & DRIVER_OK:
            self.interrupt.signal_config()

    def close(self) -> None:
        with self._lock:
            self._stop_device()
            self.device.close()
            for fd in self.kicks:
                os.close(fd)
            self.kicks = []


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
