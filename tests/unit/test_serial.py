import io

import pytest

from pykvm.devices.serial import (FCR_ENABLE, IER_RDA, IER_THRE, IIR_NONE, IIR_RDA, IIR_THRE,
                                  LCR_DLAB, LSR_DR, LSR_OE, LSR_TEMT, LSR_THRE, MCR_LOOP,
                                  Serial16550)

RBR, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)


@pytest.fixture
def uart():
    levels = []
    u = Serial16550(io.BytesIO(), irq=levels.append)
    u.levels = levels
    return u


def test_transmit_goes_to_output_and_transmitter_is_always_empty(uart):
    for b in b"hi\n":
        assert uart.read(LSR, 1) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
        uart.write(RBR, 1, b)
    assert uart.out.getvalue() == b"hi\n"
    assert uart.levels == []  # no interrupt enabled, the line never moved


def test_dlab_switches_divisor_latch(uart):
    uart.write(LCR, 1, LCR_DLAB | 0x03)
    uart.write(RBR, 1, 0x01)       # DLL
    uart.write(IER, 1, 0x00)       # DLM
    assert uart.read(RBR, 1) == 0x01
    assert uart.read(IER, 1) == 0x00
    uart.write(LCR, 1, 0x03)
    assert uart.read(LCR, 1) == 0x03
    assert uart.out.getvalue() == b""  # the DLL write was not transmitted
    assert uart.read(IER, 1) == 0


def test_scratch_register(uart):
    uart.write(SCR, 1, 0xA5)
    assert uart.read(SCR, 1) == 0xA5


def test_no_interrupt_pending_after_reset(uart):
    assert uart.read(IIR, 1) & 0x0F == IIR_NONE


def test_thre_interrupt_on_enable_and_cleared_by_iir_read(uart):
    uart.write(IER, 1, IER_THRE)
    assert uart.levels == [1]
    assert uart.read(IIR, 1) & 0x0F == IIR_THRE
    assert uart.levels == [1, 0]            # reading IIR acknowledged THRE
    assert uart.read(IIR, 1) & 0x0F == IIR_NONE
    uart.write(RBR, 1, ord("x"))            # transmitting empties THR again
    assert uart.levels == [1, 0, 1]
    uart.write(IER, 1, 0)
    assert uart.levels == [1, 0, 1, 0]


def test_receive_raises_data_ready_and_rda_interrupt(uart):
    uart.write(IIR, 1, FCR_ENABLE)
    uart.write(IER, 1, IER_RDA)
    uart.receive(b"ab")
    assert uart.levels == [1]
    assert uart.read(LSR, 1) & LSR_DR
    assert uart.read(IIR, 1) & 0x0F == IIR_RDA
    assert uart.read(RBR, 1) == ord("a")
    assert uart.read(RBR, 1) == ord("b")
    assert not uart.read(LSR, 1) & LSR_DR
    assert uart.levels == [1, 0]


def test_without_fifo_the_receiver_holds_one_byte(uart):
    uart.receive(b"ab")
    assert uart.read(LSR, 1) & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert uart.read(RBR, 1) == ord("a")


def test_fifo_overrun_sets_oe_once(uart):
    uart.write(IIR, 1, FCR_ENABLE)
    assert uart.read(IIR, 1) & 0xC0 == 0xC0  # FIFOs enabled, as a 16550A reports
    uart.receive(bytes(range(20)))
    lsr = uart.read(LSR, 1)
    assert lsr & LSR_OE and lsr & LSR_DR
    assert not uart.read(LSR, 1) & LSR_OE    # cleared by reading LSR
    assert bytes(uart.read(RBR, 1) for _ in range(16)) == bytes(range(16))


def test_loopback_as_linux_autoconfig_probes_it(uart):
    uart.write(MCR, 1, MCR_LOOP | 0x0A)       # loop, RTS, OUT2
    assert uart.read(MSR, 1) & 0xF0 == 0x90   # CTS (from RTS) and DCD (from OUT2)
    uart.write(RBR, 1, 0x5A)
    assert uart.out.getvalue() == b""         # nothing leaves the chip in loopback
    assert uart.read(RBR, 1) == 0x5A
    uart.write(MCR, 1, 0x0B)
    assert uart.read(MSR, 1) & 0xF0 == 0xB0   # DCD, DSR, CTS from the "cable"
