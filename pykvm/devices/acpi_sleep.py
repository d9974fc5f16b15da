"""The sleep control/status register of a hardware-reduced ACPI platform.

One byte at port 0x600 (``acpi.SLEEP_PORT``), named by the FADT as both
SLEEP_CONTROL_REG and SLEEP_STATUS_REG. A guest powers off by writing
``SLP_TYP << 2 | SLP_EN`` with the sleep type from ``\\_S5`` (acpi.SLP_TYP_S5);
we then stop the VM as a clean shutdown. Other sleep states are not
supported: such a write is ignored, and the guest carries on. Reads return 0
(WAK_STS never set).
"""
from __future__ import annotations

SLP_EN = 1 << 5


class AcpiSleep:
    def __init__(self, on_poweroff, s5_type: int = 5):
        self.on_poweroff = on_poweroff
        self.s5_type = s5_type

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and value & SLP_EN and (value >> 2) & 7 == self.s5_type:
            self.on_poweroff()
