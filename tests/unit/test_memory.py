import pytest

from pykvm._native import ffi, lib
from pykvm.errors import GuestMemoryError
from pykvm.memory import HIGH_START, HOLE_START, GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory(16 << 20)
    yield m
    m.close()


def test_read_write_roundtrip_and_views_share_memory(mem):
    mem.write(0x1000, b"hello")
    assert mem.read(0x1000, 5) == b"hello"
    v = mem.view(0x1000, 5)
    v[0:1] = b"j"
    assert mem.read(0x1000, 5) == b"jello"
    mem.write_u(0x2000, 4, 0xDEADBEEF)
    assert mem.read_u(0x2000, 4) == 0xDEADBEEF
    assert mem.read_u(0x2000, 2) == 0xBEEF


@pytest.mark.parametrize("gpa,length", [
    ((16 << 20) - 4, 8),        # crosses the end of RAM
    (16 << 20, 1),              # just past the end
    (HOLE_START, 4),            # in the device hole
    (-1, 1),
    (0, -1),
    (1 << 64, 1),
])
def test_out_of_bounds_is_refused(mem, gpa, length):
    assert not mem.contains(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.view(gpa, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\0" * length)


def test_last_byte_and_empty_range_at_the_end(mem):
    end = 16 << 20
    mem.write(end - 1, b"\x5a")
    assert mem.read(end - 1, 1) == b"\x5a"
    assert mem.read(end, 0) == b""


def test_fill(mem):
    mem.write(0x3000, b"\xff" * 100)
    mem.fill(0x3000 + 10, 50, 0)
    data = mem.read(0x3000, 100)
    assert data == b"\xff" * 10 + b"\0" * 50 + b"\xff" * 40


def test_ram_above_the_hole_goes_to_4g():
    size = HOLE_START + (64 << 20)
    m = GuestMemory(size)  # lazily allocated: nothing is touched
    try:
        assert [(r.gpa, r.size) for r in m.regions] == [(0, HOLE_START), (HIGH_START, 64 << 20)]
        m.write(HIGH_START, b"hi")
        assert m.read(HIGH_START, 2) == b"hi"
        assert m.hva_of(HIGH_START) == m.hva + HOLE_START
        with pytest.raises(GuestMemoryError):
            m.read(HOLE_START - 1, 2)  # no access may span two regions
    finally:
        m.close()


def test_region_table_translates_in_c(mem):
    """The C side's table gives the same answers as the Python checks."""
    t, n = mem.table, len(mem.regions)
    assert lib.pykvm_gpa_to_hva(t, n, 0x1000, 16) == ffi.cast("void *", mem.hva + 0x1000)
    assert lib.pykvm_gpa_to_hva(t, n, (16 << 20) - 8, 8) != ffi.NULL
    assert lib.pykvm_gpa_to_hva(t, n, (16 << 20) - 8, 9) == ffi.NULL
    assert lib.pykvm_gpa_to_hva(t, n, 16 << 20, 0) == ffi.NULL
    assert lib.pykvm_gpa_to_hva(t, n, 0x1000, (1 << 64) - 1) == ffi.NULL
    assert lib.pykvm_gpa_to_hva(t, n, (1 << 64) - 1, 2) == ffi.NULL


def test_size_must_be_page_multiple():
    with pytest.raises(ValueError):
        GuestMemory(4097)


def test_u16_accessors_are_single_aligned_accesses(mem):
    mem.store_u16(0x2002, 0x1234)
    assert mem.read(0x2002, 2) == b"\x34\x12"
    assert mem.load_u16(0x2002) == 0x1234
    with pytest.raises(GuestMemoryError):
        mem.load_u16(0x2003)  # ring indices are 2-byte aligned; refuse anything else
    with pytest.raises(GuestMemoryError):
        mem.store_u16((16 << 20) - 1, 0)
