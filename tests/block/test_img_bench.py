"""pykvm img bench: qemu-img bench's lines and options, and the I/O really
happens: written patterns are in the image where -o and -S put them, the
Nth read meets a blkdebug rule, flushes land in a write log where
--flush-interval puts them."""
import re

import pytest

from pykvm.block.writelog import FLUSH, open_log

from .conftest import img, needs_qemu, qemu_img

pytestmark = needs_qemu
MiB = 1 << 20



def lines_ok(out, n, op, size, depth, offset, step, flush=None):
    lines = out.splitlines()
    assert lines[0] == (f"Sending {n} {op} requests, {size} bytes each, {depth} in parallel "
                        f"(starting at offset {offset}, step size {step})")
    if flush:
        assert lines[1] == f"Sending flush every {flush} requests"
    assert re.fullmatch(r"Run completed in \d+\.\d{3} seconds\.", lines[-1]), lines[-1]
    assert len(lines) == 2 + bool(flush)


@pytest.mark.parametrize("aio,cache", [("threads", "writeback"), ("python", "writeback"),
                                       ("io_uring", "none"), ("native", "none"),
                                       ("threads", "writethrough")])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_written_pattern_is_in_the_image(tmp_path, capsys, fmt, aio, cache):
    p = tmp_path / f"b.{fmt}"
    qemu_img("create", "-f", fmt, p, "8M")
    # 40 writes of 8 KiB, every 24 KiB from 1 MiB: wraps at the end of the disk
    rc, out, err = img(capsys, "bench", "-w", "-f", fmt, "-i", aio, "-t", cache, "-c", "400",
                       "-d", "8", "-s", "8k", "-S", "24k", "-o", "1M", "--pattern=0xa5", p)
    assert rc == 0, err
    lines_ok(out, 400, "write", 8192, 8, MiB, 24576)
    raw = tmp_path / "b.raw.out"
    qemu_img("convert", "-f", fmt, "-O", "raw", p, raw)
    data = raw.read_bytes()
    want = bytearray(8 * MiB)
    off = MiB
    for _ in range(400):
        want[off:off + 8192] = b"\xa5" * 8192
        off = (off + 24576) % (8 * MiB)
    assert data == bytes(want)
    if fmt == "qcow2":
        qemu_img("check", p)


def test_reads_happen(tmp_path, capsys):
    """A blkdebug rule fails the 300th read: 299 requests pass, 300 fail."""
    p = tmp_path / "r.raw"
    qemu_img("create", "-f", "raw", p, "4M")
    rules = tmp_path / "rules.conf"
    rules.write_text('[fault]\nop = "read"\nnth = "300"\naction = "error"\nerrno = "EIO"\n')
    node = f"driver=blkdebug,config={rules},image.driver=raw,image.file.filename={p}"
    rc, out, err = img(capsys, "bench", "--image-opts", "-c", "299", "-d", "16", node)
    assert rc == 0, err
    rc, out, err = img(capsys, "bench", "--image-opts", "-c", "300", "-d", "16", node)
    assert rc == 1 and err == "pykvm img: failed request: Input/output error\n", err
    assert out.startswith("Sending 300 read requests")


@pytest.mark.parametrize("drain", [True, False])
def test_flush_interval(tmp_path, capsys, drain):
    """With draining, each flush follows exactly 100 more completed writes;
    without, flushes go out among the writes (and once per completion when
    none are left to send, as QEMU's)."""
    p = tmp_path / "f.raw"
    qemu_img("create", "-f", "raw", p, "4M")
    log = tmp_path / "f.log"
    node = f"driver=blklogwrites,file.driver=raw,file.file.filename={p},log={log}"
    rc, out, err = img(capsys, "bench", "--image-opts", "-w", "-c", "1000", "-d", "16",
                       "--flush-interval=100", *([] if drain else ["--no-drain"]), node)
    assert rc == 0, err
    lines_ok(out, 1000, "write", 4096, 16, 0, 4096, flush=100)
    fd, reader = open_log(str(log))
    epochs, cur = [], 0
    for e in reader:
        if e.flags & FLUSH:
            epochs.append(cur)
            cur = 0
        elif e.nr_sectors:
            cur += 1
    if drain:           # (none after the last write: nothing is left to send)
        assert epochs == [100] * 9 and cur == 100, (epochs, cur)
    else:               # 9 on the way, then one a completion when nothing is left to send
        assert len(epochs) == 9 + 16 and sum(epochs) + cur == 1000, (epochs, cur)


def test_defaults_and_reads_of_qcow2(tmp_path, capsys):
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    rc, out, err = img(capsys, "bench", "-c", "500", p)
    assert rc == 0, err
    lines_ok(out, 500, "read", 4096, 64, 0, 4096)


@pytest.mark.parametrize("argv,want", [
    (["-c", "x"], "invalid request count"), (["-c", "-1"], "invalid request count"),
    (["-d", "x"], "invalid queue depth"), (["-s", "3G"], "between 0 and"),
    (["-s", "x"], "invalid buffer size"), (["-S", "-1"], "invalid step size"),
    (["-o", "-1"], "invalid offset"), (["-t", "bogus"], "invalid cache mode"),
    (["-i", "bogus"], "invalid aio option"), (["-n"], "aio=native needs cache=none"),
    (["--pattern=300", "-w"], "invalid pattern byte"), (["--pattern=x"], "invalid pattern"),
    (["--flush-interval=10"], "only available in write tests"),
    (["-w", "-d", "16", "--flush-interval=10"], "can't be smaller than depth"),
    (["--flush-interval=x", "-w"], "invalid flush interval"),
    (["-o", "1G", "-c", "10"], "failed request: Input/output error"),
    (["-f", "qcow2"], "not a qcow2 image"),
])
def test_errors_match_qemu(tmp_path, capsys, argv, want):
    p = tmp_path / "e.raw"
    qemu_img("create", "-f", "raw", p, "1M")
    t = qemu_img("bench", "-c", "100", *argv, p, check=False)
    rc, out, err = img(capsys, "bench", "-c", "100", *argv, p)
    assert rc == t.returncode == 1, (err, t.stderr)
    assert err.count("\n") == 1 and want in err, err


def test_depth_zero_is_refused(tmp_path, capsys):
    """(qemu-img bench -d 0 waits forever; ours says why it will not run)"""
    p = tmp_path / "z.raw"
    qemu_img("create", "-f", "raw", p, "1M")
    rc, _, err = img(capsys, "bench", "-d", "0", p)
    assert rc == 1 and "invalid queue depth" in err
