"""Fixtures of the device tests: ``image`` (a raw disk holding a pattern) and
``rig`` (a VirtioBlk on it behind the matrix's transport, its disk on the
matrix's engine: tests/conftest.py). test_virtio_blk.py runs the device tests
on every engine; test_fastpath_blk.py adds what only the C path has."""
import pytest


@pytest.fixture
def image(tmp_path):
    from tests.unit.test_virtio_blk import DISK, pattern
    p = tmp_path / "disk.img"
    p.write_bytes(pattern(DISK))
    return p


@pytest.fixture
def rig(image, transport, engine):
    from tests.unit.test_virtio_blk import Rig
    r = Rig(image, transport, engine)
    yield r
    r.close()
