import pytest

from pykvm.bus import Bus, BusConflict


class Reg:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return 0x11223344_55667788 >> (offset * 8)

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_dispatch_uses_offsets_relative_to_base():
    bus = Bus("pio", 0x10000)
    dev = Reg()
    bus.register(0x3F8, 8, dev)
    bus.write(0x3FB, 1, 0x1FF)
    assert dev.writes == [(3, 1, 0xFF)]  # value truncated to the access size
    assert bus.read(0x3F8, 2) == 0x7788
    assert bus.read(0x3F9, 1) == 0x77


def test_unclaimed_reads_all_ones_and_is_counted():
    bus = Bus("pio", 0x10000)
    assert bus.read(0x80, 1) == 0xFF
    assert bus.read(0x80, 2) == 0xFFFF
    assert bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x80, 1, 0)
    assert bus.unclaimed[0x80] == 3
    assert bus.unclaimed[0x1234] == 1


def test_access_straddling_the_end_of_a_device_is_unclaimed():
    bus = Bus("mmio", 1 << 48)
    dev = Reg()
    bus.register(0x1000, 4, dev)
    assert bus.read(0x1002, 4) == 0xFFFFFFFF
    bus.write(0x1003, 2, 0)
    assert dev.writes == []
    assert bus.find(0x1003, 1) == (0x1000, dev)
    assert bus.find(0x1004, 1) is None
    assert bus.find(0xFFF, 1) is None


@pytest.mark.parametrize("base,size", [(0x3F0, 0x10), (0x3FF, 1), (0x3F0, 9), (0x3F8, 8)])
def test_overlaps_are_refused(base, size):
    bus = Bus("pio", 0x10000)
    bus.register(0x3F8, 8, Reg())
    with pytest.raises(BusConflict):
        bus.register(base, size, Reg())


def test_adjacent_ranges_and_unregister():
    bus = Bus("pio", 0x10000)
    a, b = Reg(), Reg()
    bus.register(0x10, 0x10, a)
    bus.register(0x20, 0x10, b)
    bus.register(0x0, 0x10, Reg())
    assert bus.find(0x1F)[1] is a
    assert bus.find(0x20)[1] is b
    bus.unregister(0x10)
    assert bus.find(0x15) is None
    with pytest.raises(KeyError):
        bus.unregister(0x10)


def test_ranges_outside_the_bus_are_refused():
    bus = Bus("pio", 0x10000)
    with pytest.raises(BusConflict):
        bus.register(0xFFFF, 2, Reg())
    with pytest.raises(BusConflict):
        bus.register(0x10, 0, Reg())
