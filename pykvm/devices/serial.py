"""16550A UART, enough of it for our guests and for Linux's 8250 driver.

Registers (offset from the base port, DLAB = LCR bit 7):
  0  RBR (read) / THR (write)          DLL when DLAB=1
  1  IER                               DLM when DLAB=1
  2  IIR (read) / FCR (write)
  3  LCR   4 MCR   5 LSR   6 MSR   7 SCR
Transmission is instantaneous: every byte written to THR goes to ``out`` and
the transmitter is empty again at once (LSR THRE|TEMT always set). Received
bytes (``receive()``) wait in a 16-byte FIFO. In loopback (MCR bit 4) THR
feeds the receiver and the modem-status inputs follow the modem-control
outputs, which is what Linux's autoconfig probes. The interrupt line is driven
through ``irq(level)`` whenever the pending-interrupt state changes.
"""
from __future__ import annotations

import collections
import threading

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDA, IER_THRE, IER_RLS, IER_MS = 0x01, 0x02, 0x04, 0x08
IIR_NONE, IIR_MS, IIR_THRE, IIR_RDA, IIR_RLS = 0x01, 0x00, 0x02, 0x04, 0x06
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80

FIFO_SIZE = 16


class Serial16550:
    """A UART at some base port; ``out`` receives transmitted bytes."""

    def __init__(self, out, irq=None):
        """``out``: a binary file (or None); ``irq(level)``: drives the interrupt line."""
        self.out = out
        self.irq = irq
        self._lock = threading.Lock()
        self.dll, self.dlm = 0x0C, 0x00  # 9600 baud, as after a BIOS
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.lsr_errors = 0
        self.msr_delta = 0
        self.rx: collections.deque[int] = collections.deque()
        self.thre_pending = True  # transmitter empty since reset
        self._irq_level = 0
        self.transmitted = 0
        self.output_error: Exception | None = None

    # -- host side ---------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes arriving on the line (host -> guest)."""
        with self._lock:
            for b in data:
                self._rx_push(b)
            self._update_irq()

    def _rx_push(self, b: int) -> None:
        if len(self.rx) >= (FIFO_SIZE if self.fcr & FCR_ENABLE else 1):
            self.lsr_errors |= LSR_OE
            return
        self.rx.append(b)

    # -- register interface (bus device) -------------------------------------

    def _modem_status(self) -> int:
        if self.mcr & MCR_LOOP:
            s = 0
            if self.mcr & MCR_RTS:
                s |= MSR_CTS
            if self.mcr & MCR_DTR:
                s |= MSR_DSR
            if self.mcr & MCR_OUT1:
                s |= MSR_RI
            if self.mcr & MCR_OUT2:
                s |= MSR_DCD
            return s
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _pending(self) -> int:
        """IIR interrupt identification for the highest-priority pending source."""
        if self.ier & IER_RLS and self.lsr_errors:
            return IIR_RLS
        if self.ier & IER_RDA and self.rx:
            return IIR_RDA
        if self.ier & IER_THRE and self.thre_pending:
            return IIR_THRE
        if self.ier & IER_MS and self.msr_delta:
            return IIR_MS
        return IIR_NONE

    def _update_irq(self) -> None:
        level = 0 if self._pending() == IIR_NONE else 1
        if level != self._irq_level:
            self._irq_level = level
            if self.irq is not None:
                self.irq(level)

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self.dll
            return self.rx.popleft() if self.rx else 0
        if offset == IER:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._pending()
            if iir == IIR_THRE:
                self.thre_pending = False  # reading IIR acknowledges THRE
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT | self.lsr_errors | (LSR_DR if self.rx else 0)
            self.lsr_errors = 0
            return lsr
        if offset == MSR:
            msr = self._modem_status() | self.msr_delta
            self.msr_delta = 0
            return msr
        if offset == SCR:
            return self.scr
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        out = None
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if offset == RBR_THR:
                if dlab:
                    self.dll = value
                elif self.mcr & MCR_LOOP:
                    self._rx_push(value)
                    self.thre_pending = True
                else:
                    out = value
                    self.transmitted += 1
                    self.thre_pending = True
            elif offset == IER:
                if dlab:
                    self.dlm = value
                else:
                    if value & IER_THRE and not self.ier & IER_THRE:
                        self.thre_pending = True  # enabling THRE with an empty THR interrupts
                    self.ier = value & 0x0F
            elif offset == IIR_FCR:
                if value & FCR_CLEAR_RX:
                    self.rx.clear()
                self.fcr = value & 0xC9
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                old = self._modem_status()
                self.mcr = value & 0x1F
                new = self._modem_status()
                changed = old ^ new
                if changed & MSR_CTS:
                    self.msr_delta |= MSR_DCTS
                if changed & MSR_DSR:
                    self.msr_delta |= MSR_DDSR
                if changed & MSR_DCD:
                    self.msr_delta |= MSR_DDCD
                if old & MSR_RI and not new & MSR_RI:
                    self.msr_delta |= MSR_TERI
            elif offset == SCR:
                self.scr = value
            self._update_irq()
        if out is not None and self.out is not None:
            try:
                self.out.write(bytes((out,)))
                if out == 0x0A:
                    self.out.flush()
            except (OSError, ValueError) as e:
                self._lose_output(e)

    def _lose_output(self, err: Exception) -> None:
        """The host side of the line went away (closed pipe, full disk): the
        guest keeps running and its further output is dropped, as on a real
        UART with nothing plugged in."""
        self.out = None
        self.output_error = err

    def flush(self) -> None:
        if self.out is not None:
            try:
                self.out.flush()
            except (OSError, ValueError) as e:
                self._lose_output(e)
