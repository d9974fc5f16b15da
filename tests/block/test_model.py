"""Random sequences of write / write-zeroes / discard / flush through the
backend on our qcow2 (with and without a backing file, several layouts)
agree with a plain byte array after every step; the final image passes
qemu-img check and reads back the same through qemu-img. On every engine of
the matrix (tests/conftest.py; native with cache=none: the operations are in
whole sectors, as a guest's are, which O_DIRECT takes)."""
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.block.qcow2 import Qcow2Driver

from .conftest import Disk, as_raw, assert_clean, needs_qemu, pattern

import pytest

SIZE = 512 * 1024
SECTORS = SIZE // 512

VARIANTS = {
    "plain": dict(cluster_size=4096),
    "backing": dict(cluster_size=4096, backing=True),
    "backing-v2": dict(cluster_size=4096, compat="0.10", backing=True),
    "extl2-backing": dict(cluster_size=32768, extended_l2=True, backing=True),
    "refcount1-lazy": dict(cluster_size=2048, refcount_bits=1, lazy_refcounts=True),
    "backing-64k": dict(cluster_size=65536, backing=True),
}

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SECTORS - 1), st.integers(1, 40),
              st.integers(1, 255)),
    st.tuples(st.just("zeroes"), st.integers(0, SECTORS - 1), st.integers(1, 300),
              st.booleans()),
    st.tuples(st.just("discard"), st.integers(0, SECTORS - 1), st.integers(1, 300),
              st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
)


def apply_model(model, kind, off, n, arg, cs, discard_zeroes):
    if kind == "write":
        model[off:off + n] = bytes([arg]) * n
    elif kind == "zeroes":
        model[off:off + n] = bytes(n)
    elif kind == "discard" and discard_zeroes:
        lo = -(-off // cs) * cs
        hi = (off + n) // cs * cs
        if hi > lo:
            model[lo:hi] = bytes(hi - lo)


@needs_qemu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_random_ops_match_a_byte_array(variant, engine):
    cfg = dict(VARIANTS[variant])
    backing = cfg.pop("backing", False)
    cs = cfg["cluster_size"]
    discard_zeroes = not (backing and cfg.get("compat") == "0.10")

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(op, min_size=1, max_size=14))
    def run(ops):
        tmp = Path(tempfile.mkdtemp(prefix="pykvm-model-"))
        try:
            kw = dict(cfg)
            model = bytearray(SIZE)
            if backing:
                (tmp / "base.raw").write_bytes(pattern(SIZE, 11))
                model[:] = pattern(SIZE, 11)
                kw.update(backing_file="base.raw", backing_fmt="raw")
            p = tmp / "d.qcow2"
            Qcow2Driver.create(str(p), SIZE, **kw)
            d = Disk(p, fmt="qcow2", cache=engine.cache, engine=engine())
            assert d.b.engine.name == engine.name
            try:
                for kind, sector, count, arg in ops:
                    off = sector * 512
                    n = min(count * 512, SIZE - off)
                    if kind == "write":
                        assert d.write(off, bytes([arg]) * n, pieces=3) >= 0
                    elif kind == "zeroes":
                        assert d.write_zeroes(off, n, unmap=arg) >= 0
                    elif kind == "discard":
                        assert d.discard(off, n) >= 0
                    else:
                        assert d.flush() == 0
                    apply_model(model, kind, off, n, arg, cs, discard_zeroes)
                    assert d.read(0, SIZE) == model, f"after {kind} {off:#x}+{n:#x}"
            finally:
                d.close()
            assert_clean(p)
            assert as_raw(p, tmp) == model
        finally:
            shutil.rmtree(tmp)

    run()
