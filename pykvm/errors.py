"""One shallow error hierarchy.

Each message carries, on one line, everything a user (or a failing test) needs:
what was attempted, on what, and why it failed. The CLI prints ``str(err)``
and exits non-zero; nothing here ever needs a traceback to be understood.
"""
import errno as _errno
import os


class PykvmError(Exception):
    """Base of every error pykvm reports to a user."""

    exit_status = 1


class KvmError(PykvmError):
    """An ioctl or open on /dev/kvm failed."""

    def __init__(self, op: str, err: int, detail: str = ""):
        self.op = op
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        msg = f"{op}: {os.strerror(err)} ({name})"
        super().__init__(msg + (f"; {detail}" if detail else ""))


class KvmUnavailable(PykvmError):
    """/dev/kvm is missing or cannot be opened."""


class MissingCapability(PykvmError):
    """The host KVM lacks a capability pykvm needs."""

    def __init__(self, cap: str, why: str):
        self.cap = cap
        super().__init__(f"KVM lacks capability {cap}, needed for {why}")


class GuestMemoryError(PykvmError):
    """A guest-physical access outside guest RAM."""

    def __init__(self, gpa: int, length: int, why: str = "not inside guest RAM"):
        self.gpa = gpa
        self.length = length
        super().__init__(f"guest memory [{gpa:#x}, {gpa + length:#x}) {why}")



class BootError(PykvmError):
    """The kernel image cannot be loaded (not an ELF, no PVH note, bad segment...)."""

    def __init__(self, path: str, why: str):
        self.path = path
        super().__init__(f"{path}: {why}")


class ConfigError(PykvmError):
    """A user-supplied option is invalid."""

    exit_status = 2


class GuestFault(PykvmError):
    """The guest stopped in a way it cannot recover from (triple fault, ...).

    ``report`` holds the multi-line register/disassembly report; ``str()`` is
    the one-line summary: exit, RIP, symbol and the faulting instruction.
    """

    def __init__(self, exit: str, rip: int, symbol: str, disassembly: str, report: str):
        self.exit = exit
        self.rip = rip
        self.symbol = symbol
        self.disassembly = disassembly
        self.report = report
        where = f" in {symbol}" if symbol else ""
        insn = f": {disassembly}" if disassembly else ""
        super().__init__(f"guest fault ({exit}) at rip={rip:#x}{where}{insn}")


class GuestTimeout(PykvmError):
    """The guest did not stop within --timeout."""

    exit_status = 124
