"""PCI: configuration mechanism #1, BAR sizing and moving, the capability list
of a virtio-pci function, and the PCI-cfg access window (no KVM)."""
import struct

import pytest

from pykvm.block import BlockBackend
from pykvm.bus import Bus
from pykvm.devices.pci import CONFIG_ADDRESS, PciHost
from pykvm.memory import GuestMemory
from pykvm.virtio import blk as B
from pykvm.virtio.device import VirtioCore
from pykvm.virtio.transport import pci as P


class Rig:
    def __init__(self, tmp_path):
        img = tmp_path / "d.img"
        img.write_bytes(bytes(1 << 20))
        self.mem = GuestMemory(16 << 20)
        self.mmio = Bus("mmio", 1 << 52)
        self.pio = Bus("pio", 0x10000)
        self.host = PciHost(self.mmio)
        self.pio.register(CONFIG_ADDRESS, 8, self.host)
        self.core = VirtioCore(B.VirtioBlk(BlockBackend(str(img))), self.mem)
        self.fn = P.VirtioPci(self.core)
        self.slot = self.host.attach(self.fn)
        self.fn.set_bar_address(0, 0xE0000000)
        self.fn.enable()

    def cfg_read(self, slot, reg, size=4):
        self.pio.write(0xCF8, 4, 0x80000000 | slot << 11 | (reg & 0xFC))
        return self.pio.read(0xCFC + (reg & 3), size)

    def cfg_write(self, slot, reg, size, value):
        self.pio.write(0xCF8, 4, 0x80000000 | slot << 11 | (reg & 0xFC))
        self.pio.write(0xCFC + (reg & 3), size, value)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.fn.close()
    r.mem.close()


def test_enumeration(rig):
    assert rig.cfg_read(0, 0) == 0x0008_1B36                     # host bridge
    assert rig.cfg_read(0, 0x08) >> 8 == 0x060000                # class: host bridge
    assert rig.cfg_read(rig.slot, 0) == 0x1042_1AF4              # virtio-blk, modern
    assert rig.cfg_read(rig.slot, 0x2C) == 0x1100_1AF4           # subsystem
    assert rig.cfg_read(rig.slot, 0x08) & 0xFF == 1              # revision 1 (modern only)
    assert rig.cfg_read(rig.slot + 1, 0) == 0xFFFFFFFF           # nothing there
    rig.pio.write(0xCF8, 4, 0x80010000)                          # bus 1 does not exist
    assert rig.pio.read(0xCFC, 4) == 0xFFFFFFFF
    assert rig.cfg_read(rig.slot, 0x02, 2) == 0x1042             # 16-bit access at offset 2


def test_bar_sizing_and_moving(rig):
    slot = rig.slot
    assert rig.cfg_read(slot, 0x10) == 0xE0000000 | 0x4          # 64-bit memory BAR
    assert rig.mmio.find(0xE0000000) is not None
    rig.cfg_write(slot, 0x04, 2, 0)                              # decoding off
    assert rig.mmio.find(0xE0000000) is None
    rig.cfg_write(slot, 0x10, 4, 0xFFFFFFFF)
    rig.cfg_write(slot, 0x14, 4, 0xFFFFFFFF)
    assert rig.cfg_read(slot, 0x10) == (~(P.BAR_SIZE - 1) & 0xFFFFFFF0) | 0x4
    assert rig.cfg_read(slot, 0x14) == 0xFFFFFFFF
    rig.cfg_write(slot, 0x10, 4, 0xF0000000)
    rig.cfg_write(slot, 0x14, 4, 0)
    rig.cfg_write(slot, 0x04, 2, 0x6)                            # memory + bus master
    assert rig.mmio.find(0xE0000000) is None
    base, dev = rig.mmio.find(0xF0000000)
    assert base == 0xF0000000
    # the BAR answers at its new place
    assert rig.mmio.read(0xF0000000 + P.COMMON + P.C_NUMQ, 2) == 1


def caps(rig):
    out = []
    ptr = rig.cfg_read(rig.slot, 0x34) & 0xFF
    assert rig.cfg_read(rig.slot, 0x04) >> 16 & 0x10             # capability list present
    seen = set()
    while ptr:
        assert ptr not in seen and ptr >= 0x40
        seen.add(ptr)
        word = rig.cfg_read(rig.slot, ptr)
        out.append((ptr, word & 0xFF, rig.fn.config[ptr:ptr + 20]))
        ptr = word >> 8 & 0xFF
    return out


def test_virtio_capabilities(rig):
    found = {}
    for ptr, cap_id, body in caps(rig):
        if cap_id == P.CAP_VENDOR:
            cfg_type, bar, _, off, length = struct.unpack_from("<BBBxxII", body, 3)
            found[cfg_type] = (bar, off, length, body)
        elif cap_id == P.CAP_MSIX:
            ctrl, table, pba = struct.unpack_from("<HII", body, 2)
            assert ctrl & 0x7FF == 1                              # 2 vectors: config + queue 0
            assert (table, pba) == (P.MSIX_TABLE, P.MSIX_PBA)
    assert set(found) == {P.CFG_COMMON, P.CFG_NOTIFY, P.CFG_ISR, P.CFG_DEVICE, P.CFG_PCI}
    assert found[P.CFG_COMMON][:3] == (0, P.COMMON, P.COMMON_SIZE)
    assert found[P.CFG_DEVICE][1] == P.DEVICE_CFG
    notify = found[P.CFG_NOTIFY]
    assert notify[1] == P.NOTIFY and struct.unpack_from("<I", notify[3], 16)[0] == 4


def test_pci_cfg_window_reaches_the_bar(rig):
    cap = rig.fn.pci_cfg_cap
    rig.cfg_write(rig.slot, cap + 4, 1, 0)                        # bar 0
    rig.cfg_write(rig.slot, cap + 8, 4, P.DEVICE_CFG)             # capacity, low word
    rig.cfg_write(rig.slot, cap + 12, 4, 4)
    assert rig.cfg_read(rig.slot, cap + 16) == (1 << 20) // 512


def test_read_only_header_fields_stay(rig):
    rig.cfg_write(rig.slot, 0x00, 4, 0x12345678)
    rig.cfg_write(rig.slot, 0x08, 4, 0)
    assert rig.cfg_read(rig.slot, 0) == 0x1042_1AF4
    assert rig.cfg_read(rig.slot, 0x08) >> 8 == 0x018000


def test_msix_masking_holds_the_interrupt_until_unmasked(rig):
    import os
    import select
    fn = rig.fn
    fn.config_write(fn.msix_cap + 2, 2, P.MSIX_ENABLE | P.MSIX_MASKALL)
    fn.bar_write(P.COMMON + P.C_QSELECT, 2, 0)
    fn.bar_write(P.COMMON + P.C_QMSIX, 2, 1)
    assert fn.bar_read(P.COMMON + P.C_QMSIX, 2) == 1
    fn.bar_write(P.COMMON + P.C_QMSIX, 2, 7)                      # no such vector
    assert fn.bar_read(P.COMMON + P.C_QMSIX, 2) == P.NO_VECTOR
    fn.bar_write(P.COMMON + P.C_QMSIX, 2, 1)
    fn.bar_write(P.MSIX_TABLE + 16 + 12, 4, 0)                    # entry unmasked, function masked
    fn.msix.signal_queue(0)
    p = select.poll()
    p.register(fn.msix.fds[1], select.POLLIN)
    assert not p.poll(0)
    assert fn.bar_read(P.MSIX_PBA, 8) == 0b10                     # pending
    fn.config_write(fn.msix_cap + 2, 2, P.MSIX_ENABLE)            # function unmasked
    assert p.poll(0)
    assert fn.bar_read(P.MSIX_PBA, 8) == 0
    os.eventfd_read(fn.msix.fds[1])
    assert fn.bar_read(P.ISR, 1) == 1 and fn.bar_read(P.ISR, 1) == 0  # read-to-clear
