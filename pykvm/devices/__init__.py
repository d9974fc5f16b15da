"""Legacy platform devices: the 16550 UART, isa-debug-exit, the ACPI sleep register."""
from .acpi_sleep import AcpiSleep
from .debug_exit import DebugExit
from .serial import Serial16550

SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4
DEBUG_EXIT_PORT = 0x501

__all__ = ["AcpiSleep", "DebugExit", "Serial16550", "SERIAL_PORT", "SERIAL_IRQ",
           "DEBUG_EXIT_PORT"]
