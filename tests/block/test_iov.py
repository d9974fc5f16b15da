"""iov_slice: exact sub-ranges of an I/O vector, as views over the same memory."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.block.driver import iov_copy_in, iov_is_zero, iov_slice, iov_zero


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.data())
def test_slice_is_exact_and_aliases(sizes, data):
    total = sum(sizes)
    backing = bytearray(range(256)) * (total // 256 + 1)
    view = memoryview(backing)
    iov, pos = [], 0
    for n in sizes:
        iov.append(view[pos:pos + n])
        pos += n
    start = data.draw(st.integers(0, total))
    length = data.draw(st.integers(0, total - start))
    sub = iov_slice(iov, start, length)
    assert b"".join(bytes(b) for b in sub) == bytes(backing[start:start + length])
    assert sum(len(b) for b in sub) == length
    assert all(len(b) > 0 for b in sub)
    for b in sub:                       # views, not copies
        b[:] = bytes(len(b))
    assert bytes(backing[start:start + length]) == bytes(length)


def test_slice_past_the_end_is_an_error():
    buf = memoryview(bytearray(10))
    with pytest.raises(ValueError):
        iov_slice([buf[:4], buf[4:]], 5, 6)


def test_zero_copy_and_is_zero():
    buf = bytearray(b"x" * (3 << 20))
    view = memoryview(buf)
    iov = [view[:5], view[5:(2 << 20) + 7], view[(2 << 20) + 7:]]
    assert not iov_is_zero(iov)
    iov_zero(iov)
    assert iov_is_zero(iov) and buf == bytes(len(buf))
    iov_copy_in(iov, b"ab" * (len(buf) // 2))
    assert buf == b"ab" * (len(buf) // 2)


def test_slice_of_a_bytearray_is_a_view():
    """Reading into a slice of a bytearray vector lands in the bytearray (a
    slice that copied would drop what a read put there)."""
    buf = bytearray(16)
    piece, = iov_slice([buf], 4, 8)
    piece[:] = b"x" * 8
    assert buf == bytes(4) + b"x" * 8 + bytes(4)
