"""isa-debug-exit: a write of v to the port stops the VM with exit status v.

QEMU's device of the same name exits with (v << 1) | 1; ours exits with v, so
the guest's value is the test's result as written.
"""
from __future__ import annotations


class DebugExit:
    def __init__(self, on_exit):
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self.on_exit(value)
