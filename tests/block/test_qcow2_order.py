"""qcow2's metadata order on a guest's disk: an L2 entry that points at a new
cluster is held back until the refcount of that cluster is durable, and goes to
the file at the next flush, before its table leaves the cache, before a
refcount drops, and at close (pykvm/block/qcow2: _deferred, _write_deferred)."""
import os
import struct
import subprocess

from pykvm.block.driver import open_image, read_range, write_range

from .conftest import pattern

MiB = 1 << 20


def l2_entry_on_file(path, drv, guest: int) -> int:
    """What the file (not the cache) says of guest offset ``guest``'s L2 entry."""
    l1e = drv.l1[guest >> (drv.cluster_bits + drv.l2_bits)] & ((1 << 56) - 512)
    idx = (guest >> drv.cluster_bits) & (drv.l2_entries - 1)
    with open(path, "rb") as f:
        f.seek(l1e + 8 * idx)
        return struct.unpack(">Q", f.read(8))[0]


def image(tmp_path, size="2G"):
    p = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), size], check=True)
    return str(p)


def test_an_l2_entry_waits_for_the_flush_and_then_lands(tmp_path):
    p = image(tmp_path)
    drv = open_image(p)
    drv.alloc_ahead_bytes = 128 << 10       # BlockBackend's, for a guest's disk, is 16 MiB
    try:
        write_range(drv, 0, pattern(64 << 10, 1))       # the table's run: synced with it
        write_range(drv, 1 * MiB, pattern(64 << 10, 2))   # a new run, refcounts not durable
        assert drv._deferred                          # the refcounts are not durable yet
        assert l2_entry_on_file(p, drv, 1 * MiB) == 0
        assert read_range(drv, 1 * MiB, 64 << 10) == pattern(64 << 10, 2)   # the cache has it
        drv.flush_metadata()
        assert not drv._deferred and l2_entry_on_file(p, drv, 1 * MiB) != 0
    finally:
        drv.close()
    assert subprocess.run(["qemu-img", "check", "-q", p]).returncode == 0


def test_a_table_leaving_the_cache_takes_its_held_entries_to_the_file(tmp_path):
    p = image(tmp_path)
    for at in ("0", "512M", "1G"):          # three L2 tables on the file
        subprocess.run(["qemu-io", "-c", f"write -P 9 {at} 4k", p], check=True,
                       capture_output=True)
    drv = open_image(p, l2_cache_size=64 << 10)     # the least: two tables
    drv.alloc_ahead_bytes = 128 << 10
    try:
        write_range(drv, 4 * MiB, pattern(4096, 3))
        assert drv._deferred and l2_entry_on_file(p, drv, 4 * MiB) == 0
        read_range(drv, 512 * MiB, 4096)
        read_range(drv, 1024 * MiB, 4096)            # the first table leaves the cache
        assert l2_entry_on_file(p, drv, 4 * MiB) != 0
        assert read_range(drv, 4 * MiB, 4096) == pattern(4096, 3)
    finally:
        drv.close()
    assert subprocess.run(["qemu-img", "check", "-q", p]).returncode == 0
    raw = tmp_path / "d.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", p, str(raw)], check=True)
    with open(raw, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(4096) == pattern(4096, 3)


def test_close_writes_what_is_held_and_gives_back_the_run(tmp_path):
    p = image(tmp_path)
    drv = open_image(p)
    drv.alloc_ahead_bytes = 128 << 10       # two clusters a run: quick refills
    write_range(drv, 0, pattern(64 << 10, 4))
    write_range(drv, 5 * MiB, pattern(64 << 10, 5))
    assert drv._deferred
    drv.close()
    r = subprocess.run(["qemu-img", "check", p], capture_output=True, text=True)
    assert r.returncode == 0 and "leaked" not in r.stdout, r.stdout      # the run given back
    raw = tmp_path / "d.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", p, str(raw)], check=True)
    with open(raw, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(64 << 10) == pattern(64 << 10, 5)
    assert os.path.getsize(p) < 8 * MiB
