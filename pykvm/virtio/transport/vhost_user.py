"""vhost-user, back-end side: our virtio device served to another process's VM.

A vhost-user front-end (QEMU's ``vhost-user-blk-pci``, for one) keeps the
transport (PCI, config space, the driver's status) and hands us, over a Unix
socket, what the device needs to serve its queues (QEMU's
docs/interop/vhost-user.rst): the guest's RAM as file descriptors
(SET_MEM_TABLE), each ring's size, addresses and start index, a *kick* eventfd
that the guest's notifications write and a *call* eventfd that interrupts it.
That is the contract our devices already serve by (ioeventfd in, irqfd out,
a memory table), so the same ``VirtioBlk``, Python or C path, serves it.

One connection at a time; a front-end that disconnects and connects again
gets the device again, with requests that were in flight when we died served
again from the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), which
the front-end keeps for us. Every message is checked: a malformed one gets a
log line and the connection is closed; nothing the front-end sends can crash
the server.

Ring life (vhost-user.rst "Ring states"): a ring starts when its kick fd
arrives, stops at GET_VRING_BASE (once the requests it took are back in the
used ring: the base it reports counts them), and with VHOST_USER_F_PROTOCOL_FEATURES
negotiated starts disabled until SET_VRING_ENABLE. The device runs while every
ring that was set up is started and enabled.
"""
from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import select
import socket
import stat
import struct
import threading

from ...errors import ConfigError, PykvmError
from ...memory import FdMemory
from ..device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, Interrupt, counters_summary
from ..queue import INFLIGHT_DESC, INFLIGHT_HEADER, QueueError, SplitQueue

log = logging.getLogger("pykvm.vhost-user")

# Messages from the front-end (vhost-user.rst, "Front-end message types")
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
RESET_DEVICE = 34

NAMES = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int)
         and k.startswith(("GET_", "SET_", "RESET_"))}

# Header flags
VERSION = 1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

F_PROTOCOL_FEATURES = 1 << 30
F_LOG_ALL = 1 << 26

# Protocol features we implement
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_CONFIG = 1 << 9
PF_INFLIGHT_SHMFD = 1 << 12
PF_RESET_DEVICE = 1 << 13
PROTOCOL_FEATURES = PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_INFLIGHT_SHMFD | PF_RESET_DEVICE

HEADER = struct.Struct("=III")           # request, flags, size
U64 = struct.Struct("=Q")
STATE = struct.Struct("=II")             # index, num
ADDR = struct.Struct("=IIQQQQ")          # index, flags, desc, used, avail, log
REGION = struct.Struct("=QQQQ")          # gpa, size, user address, mmap offset
CONFIG_HDR = struct.Struct("=III")       # offset, size, flags
INFLIGHT = struct.Struct("=QQHH4x")      # mmap size, mmap offset, queues, queue size

MAX_PAYLOAD = 4096
MAX_FDS = 8
MAX_REGIONS = 8
MAX_CONFIG = 256
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8
INFLIGHT_ALIGN = 64
INFLIGHT_VERSION = 1


class ProtocolError(PykvmError):
    """A message we refuse: the connection is closed after one log line."""


def inflight_queue_bytes(queue_size: int) -> int:
    """Bytes of one queue's inflight region (header + one state per descriptor)."""
    n = INFLIGHT_HEADER + INFLIGHT_DESC * queue_size
    return -(-n // INFLIGHT_ALIGN) * INFLIGHT_ALIGN


class _Message:
    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int]):
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds

    @property
    def name(self) -> str:
        return NAMES.get(self.request, f"request {self.request}")

    def take_fd(self) -> int:
        """The one fd this message must carry (it is ours to close from now on)."""
        if len(self.fds) != 1:
            raise ProtocolError(f"{self.name} carries {len(self.fds)} file descriptors, "
                                f"not 1")
        return self.fds.pop()

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def recv_message(sock: socket.socket) -> _Message | None:
    """The next message, or None when the front-end closed the connection."""
    fds = array.array("i")
    try:
        data, anc, flags, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    except ConnectionResetError:
        return None
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
    fds = list(fds)
    try:
        if not data:
            return None
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise ProtocolError("more file descriptors than a message may carry")
        while len(data) < HEADER.size:
            more = sock.recv(HEADER.size - len(data))
            if not more:
                raise ProtocolError("connection closed inside a message header")
            data += more
        request, hflags, size = HEADER.unpack(data)
        if hflags & 3 != VERSION:
            raise ProtocolError(f"message version {hflags & 3}, not {VERSION}")
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"{NAMES.get(request, request)}: payload of {size} bytes")
        payload = b""
        while len(payload) < size:
            more = sock.recv(size - len(payload))
            if not more:
                raise ProtocolError("connection closed inside a message payload")
            payload += more
        return _Message(request, hflags, payload, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class VhostUserInterrupt(Interrupt):
    """The front-end's call eventfds, one per queue (None: it polls)."""

    def __init__(self, count: int):
        self.calls: list[int | None] = [None] * count

    def signal_queue(self, index: int) -> None:
        fd = self.calls[index]
        if fd is not None:
            os.eventfd_write(fd, 1)

    def signal_config(self) -> None:
        pass  # no back-end channel to the front-end: nothing to signal through

    def call_fd(self, index: int) -> int | None:
        return self.calls[index]


class _Ring:
    """What the front-end told us about one virtqueue."""

    def __init__(self, max_size: int):
        self.size = max_size
        self.addrs = None                 # (desc, used, avail) user addresses
        self.base = 0                     # SET_VRING_BASE: the next avail index
        self.kick: int | None = None      # started while it has one
        self.err: int | None = None
        self.enabled = False


class VhostUserSession:
    """One front-end connection serving ``device`` (a VirtioDevice)."""

    def __init__(self, device, sock: socket.socket, name: str = "vhost-user"):
        self.device = device
        self.sock = sock
        self.name = name
        sizes = device.queue_sizes()
        self.queues = [SplitQueue(i, n) for i, n in enumerate(sizes)]
        self.rings = [_Ring(n) for n in sizes]
        self.interrupt = VhostUserInterrupt(len(sizes))
        self.offered = device.features() | F_PROTOCOL_FEATURES
        self.features = 0
        self.protocol = 0
        self.mem: FdMemory | None = None
        self._uaddr: list[tuple[int, int, int]] = []   # (user address, size, gpa)
        self._inflight = None                           # (mmap, queues, queue size)
        self._retired: list[int] = []                   # call fds replaced while running
        self.active = False
        self.failed = False
        # the error fds are written from the device's threads (_fail) and
        # replaced or closed by the message loop
        self._err_lock = threading.Lock()

    # -- the message loop --------------------------------------------------------

    def serve(self, stop_fd: int | None = None) -> None:
        """Handle messages until the front-end goes away, a message is refused,
        or ``stop_fd`` becomes readable."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        if stop_fd is not None:
            poller.register(stop_fd, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if stop_fd in ready:
                return
            try:
                msg = recv_message(self.sock)
            except ProtocolError as e:
                log.error("%s: %s; closing the connection", self.name, e)
                return
            except OSError as e:
                log.error("%s: reading a message: %s; closing the connection",
                          self.name, e.strerror or e)
                return
            if msg is None:
                log.info("%s: front-end disconnected", self.name)
                return
            try:
                self.handle(msg)
            except ProtocolError as e:
                log.error("%s: %s: %s; closing the connection", self.name, msg.name, e)
                return
            except OSError as e:
                log.error("%s: %s: %s; closing the connection", self.name, msg.name,
                          e.strerror or e)
                return
            finally:
                msg.close_fds()

    def handle(self, msg: _Message) -> None:
        """Act on one message and send its reply, if it has one."""
        handler = _HANDLERS.get(msg.request)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s (%d bytes, %d fds)", self.name, msg.name, len(msg.payload),
                      len(msg.fds))
        if handler is None:
            raise ProtocolError("not supported")
        reply = handler(self, msg)
        if reply is not None:
            data, fds = reply if isinstance(reply, tuple) else (reply, [])
            try:
                self._send(msg.request, data, fds)
            finally:
                for fd in fds:  # the front-end has its own copies now
                    os.close(fd)
        elif msg.flags & FLAG_NEED_REPLY and self.protocol & PF_REPLY_ACK:
            self._send(msg.request, U64.pack(0))

    def _send(self, request: int, payload: bytes, fds=()) -> None:
        data = HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def close(self) -> None:
        """The connection is over: stop the device, unmap, close what we hold."""
        self._stop()
        if log.isEnabledFor(logging.INFO) and hasattr(self.device, "counters"):
            log.info("%s: device counters: %s", self.name,
                     counters_summary(self.device.counters()))
        self.device.reset()
        with self._err_lock:
            for ring in self.rings:
                for fd in (ring.kick, ring.err):
                    if fd is not None:
                        os.close(fd)
                ring.kick = ring.err = None
        for i, fd in enumerate(self.interrupt.calls):
            if fd is not None:
                os.close(fd)
            self.interrupt.calls[i] = None
        self._close_retired()
        self._unmap()
        if self._inflight is not None:
            self._drop_inflight()

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _payload(msg: _Message, fmt: struct.Struct, exact: bool = True) -> tuple:
        if len(msg.payload) < fmt.size or exact and len(msg.payload) != fmt.size:
            raise ProtocolError(f"payload of {len(msg.payload)} bytes, not {fmt.size}")
        return fmt.unpack_from(msg.payload)

    def _ring(self, index: int) -> _Ring:
        if index >= len(self.rings):
            raise ProtocolError(f"vring {index} does not exist (the device has "
                                f"{len(self.rings)})")
        return self.rings[index]

    def _gpa(self, uaddr: int, what: str) -> int:
        for ua, size, gpa in self._uaddr:
            if ua <= uaddr < ua + size:
                return gpa + (uaddr - ua)
        raise ProtocolError(f"{what} at user address {uaddr:#x} is outside every memory region")

    def _close_retired(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired = []

    def _unmap(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None
            self._uaddr = []

    def _drop_inflight(self) -> None:
        for q in self.queues:
            q.inflight = None
        mp, views = self._inflight[0], self._inflight[3]
        for v in views:
            v.release()
        mp.close()
        self._inflight = None

    # -- starting and stopping the device ------------------------------------------

    def _stop(self) -> None:
        """Stop the device if it runs; the queues keep their indices."""
        if self.active:
            self.device.reset()
            self.active = False
            self._close_retired()

    def _restart(self) -> None:
        self._stop()
        self._try_start()

    def _try_start(self) -> None:
        """Start the device once every ring that was set up is started and enabled."""
        if self.active or self.failed or self.mem is None:
            return
        used = [i for i, r in enumerate(self.rings) if r.kick is not None]
        if not used or any(not self.rings[i].enabled for i in used):
            return
        try:
            resubmits = []
            for i in used:
                resubmits.append(self._start_queue(i))
        except QueueError as e:
            self._fail(str(e))
            return
        for i, q in enumerate(self.queues):
            if i not in used:
                q.ready = False
        kicks = [r.kick if r.kick is not None else -1 for r in self.rings]
        features = self.features & ~F_PROTOCOL_FEATURES
        for i, chains in zip(used, resubmits):
            if chains:
                log.info("%s: serving %d request(s) of queue %d again after a restart",
                         self.name, len(chains), i)
                why = self.device.resubmit(self.mem, self.queues[i], chains, self.interrupt)
                if why is not None:
                    self._fail(why)
                    return
        self.active = True
        self.device.activate(self.mem, self.queues, features, kicks, self.interrupt, self._fail)

    def _start_queue(self, i: int) -> list:
        """Configure and activate queue ``i`` from its ring; return the chains
        to serve again (inflight tracking), in the order they were taken."""
        ring, q = self.rings[i], self.queues[i]
        if ring.addrs is None:
            raise QueueError(i, "area-outside-ram", "the ring was started without addresses")
        q.reset()
        q.size = ring.size
        q.desc_table, q.used_ring, q.avail_ring = (
            self._gpa(a, w) for a, w in zip(ring.addrs, ("descriptor table", "used ring",
                                                         "avail ring")))
        q.ready = True
        q.event_idx = bool(self.features & F_EVENT_IDX)
        q.indirect = bool(self.features & F_INDIRECT_DESC)
        # The used index is the guest's: after a restart it is wherever the
        # last back-end left it.
        q.activate(self.mem, last_avail_idx=ring.base, used_idx=0)
        used_idx = self.mem.load_u16(q.used_ring + 2)
        heads = []
        region = self._inflight_view(i, ring.size)
        if region is not None:
            heads, counter = _recover(region, used_idx, ring.size)
            q.inflight = region
            q.inflight_counter = counter
            start = (used_idx + len(heads)) & 0xFFFF
        else:
            start = ring.base
        q.activate(self.mem, last_avail_idx=start, used_idx=used_idx)
        return [q.resubmit(self.mem, h) for h in heads]

    def _inflight_view(self, i: int, size: int):
        if self._inflight is None:
            return None
        _, nqueues, qsize, views = self._inflight
        if i >= nqueues:
            raise QueueError(i, "queue-size", f"the inflight region covers {nqueues} queues")
        if size > qsize:
            raise QueueError(i, "queue-size",
                             f"size {size} is larger than the inflight region's {qsize}")
        return views[i]

    def _fail(self, message: str) -> None:
        """The device cannot go on (a broken ring, a request with no status)."""
        self.failed = True
        log.error("%s: %s; device stopped until the front-end resets it", self.name, message)
        with self._err_lock:
            for ring in self.rings:
                if ring.err is not None:
                    try:
                        os.eventfd_write(ring.err, 1)
                    except OSError:
                        pass

    # -- message handlers ------------------------------------------------------------

    def _get_features(self, msg):
        return U64.pack(self.offered)

    def _set_features(self, msg):
        value, = self._payload(msg, U64)
        if value & ~self.offered:
            raise ProtocolError(f"features {value & ~self.offered:#x} were not offered")
        if not value & F_VERSION_1:
            raise ProtocolError("VERSION_1 is required (no legacy interface)")
        if value != self.features and self.active:
            self._stop()
        self.features = value
        if not value & F_PROTOCOL_FEATURES:
            for ring in self.rings:  # without it rings are enabled from the start
                ring.enabled = True
        self._try_start()

    def _get_protocol_features(self, msg):
        return U64.pack(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg):
        value, = self._payload(msg, U64)
        if value & ~PROTOCOL_FEATURES:
            raise ProtocolError(f"protocol features {value & ~PROTOCOL_FEATURES:#x} were "
                                f"not offered")
        self.protocol = value

    def _set_owner(self, msg):
        pass

    def _reset(self, msg):
        """RESET_OWNER (deprecated) and RESET_DEVICE: every ring back to its
        initial state; the connection and memory table stay."""
        self._stop()
        self.device.reset()
        self.failed = False
        with self._err_lock:
            for i, ring in enumerate(self.rings):
                for fd in (ring.kick, ring.err):
                    if fd is not None:
                        os.close(fd)
                self.rings[i] = _Ring(self.queues[i].max_size)
                self.queues[i].reset()
        self.features = 0

    def _get_queue_num(self, msg):
        return U64.pack(len(self.rings))

    def _set_mem_table(self, msg):
        if len(msg.payload) < 8:
            raise ProtocolError(f"payload of {len(msg.payload)} bytes")
        n, = struct.unpack_from("=I", msg.payload)
        if not 1 <= n <= MAX_REGIONS or len(msg.payload) < 8 + n * REGION.size:
            raise ProtocolError(f"{n} regions in a payload of {len(msg.payload)} bytes")
        if len(msg.fds) != n:
            raise ProtocolError(f"{n} regions but {len(msg.fds)} file descriptors")
        regions = [REGION.unpack_from(msg.payload, 8 + k * REGION.size) for k in range(n)]
        for gpa, size, ua, off in regions:
            if not size or gpa + size > 1 << 64 or ua + size > 1 << 64 or off + size > 1 << 64:
                raise ProtocolError(f"region at {gpa:#x}: size {size:#x}, user address "
                                    f"{ua:#x}, offset {off:#x}")
        try:
            mem = FdMemory([(gpa, size, fd, off)
                            for (gpa, size, _, off), fd in zip(regions, msg.fds)])
        except (OSError, ValueError) as e:
            raise ProtocolError(f"cannot map the memory regions: {e}") from None
        self._stop()
        self._unmap()
        self.mem = mem
        self._uaddr = sorted((ua, size, gpa) for gpa, size, ua, _ in regions)
        msg.close_fds()  # mapped: the fds themselves are not needed
        self._try_start()

    def _set_vring_num(self, msg):
        index, num = self._payload(msg, STATE)
        ring = self._ring(index)
        if not 0 < num <= self.queues[index].max_size or num & (num - 1):
            raise ProtocolError(f"vring {index}: size {num} is not a power of 2 in "
                                f"[1, {self.queues[index].max_size}]")
        ring.size = num

    def _set_vring_addr(self, msg):
        index, flags, desc, used, avail, _ = self._payload(msg, ADDR)
        ring = self._ring(index)
        if self.mem is not None:  # else checked when the ring starts
            for a, what in zip((desc, used, avail), ("descriptor table", "used ring",
                                                      "avail ring")):
                self._gpa(a, what)
        ring.addrs = (desc, used, avail)
        if ring.kick is not None and self.active:
            self._restart()

    def _set_vring_base(self, msg):
        index, num = self._payload(msg, STATE)
        if num > 0xFFFF:
            raise ProtocolError(f"vring {index}: base {num} is not a 16-bit index")
        self._ring(index).base = num

    def _get_vring_base(self, msg):
        index, _ = self._payload(msg, STATE)
        ring = self._ring(index)
        was_active = self.active
        quiesce = getattr(self.device, "quiesce", None)
        if self.active and quiesce is not None and not quiesce():
            log.warning("%s: requests still in flight when ring %d stopped; they are dropped",
                        self.name, index)
        self._stop()
        self.failed = False  # a stopped ring may start afresh
        q = self.queues[index]
        base = q.last_avail_idx if q.ready else ring.base
        ring.base = base
        if ring.kick is not None:  # the ring stops: a new kick fd starts it again
            os.close(ring.kick)
            ring.kick = None
        if was_active:
            self._try_start()  # the other rings, if they still run
        return STATE.pack(index, base)

    def _set_vring_fd(self, msg):
        value, = self._payload(msg, U64)
        index = value & VRING_INDEX_MASK
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise ProtocolError(f"unknown flags in {value:#x}")
        ring = self._ring(index)
        fd = None if value & VRING_NOFD else msg.take_fd()
        if msg.request == SET_VRING_KICK:
            if fd is None:
                raise ProtocolError(f"vring {index}: polling without a kick fd is not supported")
            self._stop()
            if ring.kick is not None:
                os.close(ring.kick)
            ring.kick = fd
            self._try_start()
        elif msg.request == SET_VRING_CALL:
            old = self.interrupt.calls[index]
            self.interrupt.calls[index] = fd
            if self.active:
                self.device.interrupts_changed()
                if old is not None:
                    self._retired.append(old)  # the C thread may be writing it right now
            elif old is not None:
                os.close(old)
        else:
            with self._err_lock:
                if ring.err is not None:
                    os.close(ring.err)
                ring.err = fd

    def _set_vring_enable(self, msg):
        index, num = self._payload(msg, STATE)
        ring = self._ring(index)
        if num > 1:
            raise ProtocolError(f"vring {index}: enable value {num}")
        ring.enabled = bool(num)
        if ring.enabled:
            self._try_start()
        elif self.active:
            self._restart()

    def _get_config(self, msg):
        offset, size, _ = self._payload(msg, CONFIG_HDR, exact=False)
        if size > MAX_CONFIG or len(msg.payload) != CONFIG_HDR.size + size or \
                offset + size > MAX_CONFIG:
            log.warning("%s: GET_CONFIG of %d bytes at %d refused", self.name, size, offset)
            return b""  # an empty payload is the protocol's error reply
        data = bytes(self.device.read_config(offset + k, 1) for k in range(size))
        return CONFIG_HDR.pack(offset, size, 0) + data

    def _set_config(self, msg):
        offset, size, _ = self._payload(msg, CONFIG_HDR, exact=False)
        if size > 8 or len(msg.payload) != CONFIG_HDR.size + size:
            raise ProtocolError(f"SET_CONFIG of {size} bytes in a payload of "
                                f"{len(msg.payload)}")
        value = int.from_bytes(msg.payload[CONFIG_HDR.size:], "little")
        self.device.write_config(offset, size, value)

    def _get_inflight_fd(self, msg):
        _, _, nqueues, qsize = self._payload(msg, INFLIGHT, exact=False)
        if not 1 <= nqueues <= len(self.rings) or not 0 < qsize <= 32768 or qsize & (qsize - 1):
            raise ProtocolError(f"inflight region for {nqueues} queues of {qsize}")
        per = inflight_queue_bytes(qsize)
        fd = os.memfd_create("pykvm-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, per * nqueues)
            self._stop()
            self._map_inflight(fd, per * nqueues, 0, nqueues, qsize)
        except BaseException:
            os.close(fd)
            raise
        return INFLIGHT.pack(per * nqueues, 0, nqueues, qsize), [fd]  # closed once sent

    def _set_inflight_fd(self, msg):
        size, offset, nqueues, qsize = self._payload(msg, INFLIGHT, exact=False)
        fd = msg.take_fd()
        try:
            if not 1 <= nqueues <= len(self.rings) or not 0 < qsize <= 32768 or \
                    qsize & (qsize - 1):
                raise ProtocolError(f"inflight region for {nqueues} queues of {qsize}")
            if size < inflight_queue_bytes(qsize) * nqueues:
                raise ProtocolError(f"inflight region of {size} bytes is too small for "
                                    f"{nqueues} queues of {qsize}")
            self._stop()
            self._map_inflight(fd, size, offset, nqueues, qsize)
        finally:
            os.close(fd)
        self._try_start()

    def _map_inflight(self, fd: int, size: int, offset: int, nqueues: int, qsize: int) -> None:
        if offset % mmap.ALLOCATIONGRANULARITY:
            raise ProtocolError(f"inflight region offset {offset:#x} is not page aligned")
        try:
            if os.fstat(fd).st_size < offset + size:
                raise ProtocolError("the inflight region's file is shorter than the region")
            mp = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=offset)
        except OSError as e:
            raise ProtocolError(f"cannot map the inflight region: {e.strerror}") from None
        if self._inflight is not None:
            self._drop_inflight()
        per = inflight_queue_bytes(qsize)
        whole = memoryview(mp)
        views = [whole[k * per:(k + 1) * per] for k in range(nqueues)]
        whole.release()
        for v in views:
            version, desc_num = struct.unpack_from("=HH", v, 8)
            if version == 0:  # fresh: ours to lay out
                struct.pack_into("=QHHHH", v, 0, 0, INFLIGHT_VERSION, qsize, 0, 0)
            elif version != INFLIGHT_VERSION or desc_num != qsize:
                for w in views:
                    w.release()
                mp.close()
                raise ProtocolError(f"inflight region of version {version} for {desc_num} "
                                    f"descriptors (expected {INFLIGHT_VERSION}, {qsize})")
        self._inflight = (mp, nqueues, qsize, views)


def _recover(region, used_idx: int, size: int) -> tuple[list[int], int]:
    """From a queue's inflight region as an earlier process left it: the heads
    to serve again, oldest first, and the next fetch counter. Repairs the last
    used batch if that process died inside it (vhost-user.rst, "When
    reconnecting")."""
    last_batch_head, recorded_used = struct.unpack_from("=HH", region, 12)
    desc_num = struct.unpack_from("=H", region, 10)[0]
    if recorded_used != used_idx and last_batch_head < desc_num:
        # died after used->idx was stored, before the flags were cleared: the
        # batch's entries are back with the guest
        region[INFLIGHT_HEADER + INFLIGHT_DESC * last_batch_head] = 0
        struct.pack_into("=H", region, 14, used_idx)
    found, top = [], 0
    for i in range(desc_num):
        d = INFLIGHT_HEADER + INFLIGHT_DESC * i
        counter, = struct.unpack_from("=Q", region, d + 8)
        top = max(top, counter)
        if region[d] == 1:
            if i < size:
                found.append((counter, i))
            else:
                region[d] = 0  # a head the ring cannot hold: not a request
        elif region[d]:
            region[d] = 0
    found.sort()
    return [h for _, h in found], top + 1


_HANDLERS = {
    GET_FEATURES: VhostUserSession._get_features,
    SET_FEATURES: VhostUserSession._set_features,
    GET_PROTOCOL_FEATURES: VhostUserSession._get_protocol_features,
    SET_PROTOCOL_FEATURES: VhostUserSession._set_protocol_features,
    SET_OWNER: VhostUserSession._set_owner,
    RESET_OWNER: VhostUserSession._reset,
    RESET_DEVICE: VhostUserSession._reset,
    GET_QUEUE_NUM: VhostUserSession._get_queue_num,
    SET_MEM_TABLE: VhostUserSession._set_mem_table,
    SET_VRING_NUM: VhostUserSession._set_vring_num,
    SET_VRING_ADDR: VhostUserSession._set_vring_addr,
    SET_VRING_BASE: VhostUserSession._set_vring_base,
    GET_VRING_BASE: VhostUserSession._get_vring_base,
    SET_VRING_KICK: VhostUserSession._set_vring_fd,
    SET_VRING_CALL: VhostUserSession._set_vring_fd,
    SET_VRING_ERR: VhostUserSession._set_vring_fd,
    SET_VRING_ENABLE: VhostUserSession._set_vring_enable,
    GET_CONFIG: VhostUserSession._get_config,
    SET_CONFIG: VhostUserSession._set_config,
    GET_INFLIGHT_FD: VhostUserSession._get_inflight_fd,
    SET_INFLIGHT_FD: VhostUserSession._set_inflight_fd,
}


class VhostUserServer:
    """Listen on ``path`` and serve ``device`` to one front-end at a time.

    The socket is created with ``mode`` (default 0600: only this user may connect,
    since a front-end gets the whole disk); it is bound under a umask that leaves
    no moment with wider permissions, then set to ``mode``."""

    def __init__(self, device, path: str, name: str = "vhost-user", mode: int = 0o600):
        self.device = device
        self.path = path
        self.name = name
        self.sessions = 0
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"{path}: exists and is not a socket")
            os.unlink(path)  # a socket left by an earlier server
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o777 & ~(mode & 0o600))   # never wider than mode, nor than 0600
        try:
            self.sock.bind(path)
            os.chmod(path, mode)
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"{path}: cannot listen: {e.strerror}") from None
        finally:
            os.umask(old_umask)
        self.sock.listen(1)

    def stop(self) -> None:
        """Ask serve_forever to return (async-signal-safe: one write)."""
        try:
            os.write(self._stop_w, b"x")
        except BlockingIOError:
            pass

    def serve_forever(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            try:
                ready = {fd for fd, _ in poller.poll()}
            except InterruptedError:
                continue
            if self._stop_r in ready:
                return
            try:
                conn, _ = self.sock.accept()
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED):
                    continue
                raise
            self.sessions += 1
            log.info("%s: front-end connected", self.name)
            session = VhostUserSession(self.device, conn, name=self.name)
            try:
                session.serve(self._stop_r)
            finally:
                session.close()
                conn.close()

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._stop_r)
        os.close(self._stop_w)
