"""`pykvm serve --nbd` against real NBD clients: nbdinfo, nbdcopy (libnbd),
qemu-img, qemu-io and fio's nbd engine, on a Unix socket and on 127.0.0.1.

Each test starts the server as a subprocess (port 0 on TCP: the line
``pykvm: serving ... on 127.0.0.1:PORT`` says which port) and stops it after.
No KVM is needed.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

TOOLS = ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "fio")
MiB = 1 << 20


@pytest.fixture(autouse=True, scope="module")
def tools():
    missing = [t for t in TOOLS if not shutil.which(t)]
    assert not missing, f"{missing} missing: `make deps` installs them (APT_PACKAGES)"


def pattern(n: int, seed: int = 1) -> bytes:
    block = bytes((i * 7 + seed) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


class Served:
    def __init__(self, proc, uri, where):
        self.proc = proc
        self.uri = uri
        self.where = where

    def named(self, name: str) -> str:
        """The URI of export ``name``."""
        if self.where.startswith("unix:"):
            return f"nbd+unix:///{name}?socket={self.where[5:]}"
        return f"nbd://{self.where}/{name}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("pykvm serve --nbd did not stop on SIGTERM")
        return self.proc.stderr.read().decode()


@pytest.fixture(params=["unix", "tcp"])
def nbd_transport(request):
    return request.param


@pytest.fixture
def serve(tmp_path):
    """serve(disk_spec, *args, transport="unix") -> Served (persistent unless told)."""
    started = []

    def start(disk, *args, transport="unix", persistent=True):
        if transport == "unix":
            addr = f"unix:{tmp_path}/nbd{len(started)}.sock"
        else:
            addr = "127.0.0.1:0"
        cmd = [sys.executable, "-m", "pykvm", "serve", "--nbd", addr, "--disk", disk, *args]
        if persistent:
            cmd.append("--persistent")
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = proc.stderr.readline().decode()
        m = re.search(r"serving .* on (\S+)$", line.strip())
        assert m, f"no 'serving' line: {line!r} {proc.stderr.read().decode()!r}"
        where = m.group(1)
        if where.startswith("unix:"):
            uri = f"nbd+unix:///?socket={where[5:]}"
        else:
            uri = f"nbd://{where}"
        s = Served(proc, uri, where)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


def run(*cmd, check=True, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       cwd=cwd)
    if check:
        assert r.returncode == 0, (cmd, r.stdout.decode(), r.stderr.decode())
    return r


@pytest.fixture
def sparse_raw(tmp_path):
    p = tmp_path / "sparse.raw"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        f.write(pattern(MiB))
        f.seek(40 * MiB)
        f.write(pattern(64 << 10, 9))
    return p


def nbdinfo_json(uri, *args):
    return json.loads(run("nbdinfo", "--json", *args, uri).stdout)


def data_extents(uri, context="base:allocation"):
    m = json.loads(run("nbdinfo", "--json", f"--map={context}", uri).stdout)
    return [(e["offset"], e["length"]) for e in m if e["type"] == 0]


# -- nbdinfo -----------------------------------------------------------------------------

def test_nbdinfo_size_block_sizes_flags(sparse_raw, serve, nbd_transport):
    s = serve(f"file={sparse_raw}", "--export-name", "vol", transport=nbd_transport)
    info = nbdinfo_json(s.named("vol"))
    (e,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert e["export-name"] == "vol"
    assert e["export-size"] == 64 * MiB
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == \
        (1, 4096, 32 * MiB)
    assert e["can_flush"] and e["can_fua"] and e["can_trim"] and e["can_zero"]
    assert e["can_fast_zero"] and e["can_df"]
    assert not e["is_read_only"] and not e["can_multi_conn"]
    assert set(e["contexts"]) == {"base:allocation", "qemu:allocation-depth"}


def test_nbdinfo_list_and_read_only_flags(sparse_raw, serve):
    s = serve(f"file={sparse_raw}", "--read-only", "-x", "ro")
    info = nbdinfo_json(s.named("ro"))
    (e,) = info["exports"]
    assert e["is_read_only"] and not e["can_multi_conn"]      # --shared 1
    assert not e["can_trim"] and not e["can_zero"]
    listed = run("nbdinfo", "--list", "--json", s.uri)
    assert [x["export-name"] for x in json.loads(listed.stdout)["exports"]] == ["ro"]


def test_nbdinfo_map_of_a_sparse_raw(sparse_raw, serve, nbd_transport):
    s = serve(f"file={sparse_raw},format=raw", transport=nbd_transport)
    assert data_extents(s.uri) == [(8 * MiB, MiB), (40 * MiB, 64 << 10)]
    m = json.loads(run("nbdinfo", "--json", "--map", s.uri).stdout)
    holes = [(e["offset"], e["length"]) for e in m if e["type"] == 3]
    assert holes == [(0, 8 * MiB), (9 * MiB, 31 * MiB), (40 * MiB + (64 << 10),
                                                         24 * MiB - (64 << 10))]


def test_nbdinfo_map_of_a_qcow2_with_unallocated_clusters(tmp_path, serve):
    img = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(img), "32M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 128k", "-c", "write -P 0x22 20M 64k",
        "-c", "write -z 24M 64k", str(img))
    s = serve(f"file={img}")
    assert data_extents(s.uri) == [(MiB, 128 << 10), (20 * MiB, 64 << 10)]
    depth = json.loads(run("nbdinfo", "--json", "--map=qemu:allocation-depth", s.uri).stdout)
    local = [(e["offset"], e["length"]) for e in depth if e["type"] == 1]
    assert local == [(MiB, 128 << 10), (20 * MiB, 64 << 10), (24 * MiB, 64 << 10)]


# -- nbdcopy ------------------------------------------------------------------------------

def test_nbdcopy_both_ways(tmp_path, serve, nbd_transport):
    src = tmp_path / "src.raw"
    data = os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB)
    src.write_bytes(data)
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(len(data))
    s = serve(f"file={target},format=raw", "--shared", "4", transport=nbd_transport)
    run("nbdcopy", str(src), s.uri)                       # into the export (multi-conn)
    back = tmp_path / "back.raw"
    run("nbdcopy", s.uri, str(back))                      # and out of it
    assert back.read_bytes() == data
    assert target.read_bytes() == data


# -- qemu-img, qemu-io -------------------------------------------------------------------

def test_qemu_img_info_map_compare_convert(sparse_raw, tmp_path, serve, nbd_transport):
    s = serve(f"file={sparse_raw}", transport=nbd_transport)
    info = json.loads(run("qemu-img", "info", "--output=json", s.uri).stdout)
    assert info["virtual-size"] == 64 * MiB
    m = json.loads(run("qemu-img", "map", "--output=json", s.uri).stdout)
    assert [(e["start"], e["length"]) for e in m if e["data"]] == \
        [(8 * MiB, MiB), (40 * MiB, 64 << 10)]
    assert run("qemu-img", "compare", "-U", str(sparse_raw), s.uri).returncode == 0
    out = tmp_path / "copy.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", s.uri, str(out))
    assert run("qemu-img", "compare", str(out), str(sparse_raw)).returncode == 0
    other = tmp_path / "other.raw"
    other.write_bytes(sparse_raw.read_bytes()[:-512] + b"\x01" * 512)
    assert run("qemu-img", "compare", "-U", str(other), s.uri, check=False).returncode == 1


def test_qemu_io_write_read_zero_discard(tmp_path, serve, nbd_transport):
    img = tmp_path / "d.raw"
    img.write_bytes(pattern(16 * MiB))
    s = serve(f"file={img},format=raw", transport=nbd_transport)
    r = run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", "-c", "read -P 0x55 0 64k",
            "-c", "write -z 1M 64k", "-c", "read -P 0 1M 64k",
            "-c", "write -z -u 2M 128k", "-c", "read -P 0 2M 128k",
            "-c", "discard 4M 1M", "-c", "write -P 0x66 -f 8M 4k", "-c", "flush", s.uri)
    out = r.stdout.decode()
    assert "Pattern verification failed" not in out and "failed" not in out.lower(), out
    s.stop()
    d = img.read_bytes()
    p = pattern(16 * MiB)
    assert d[:64 << 10] == b"\x55" * (64 << 10)
    assert d[MiB:MiB + (64 << 10)] == bytes(64 << 10)
    assert d[2 * MiB:2 * MiB + (128 << 10)] == bytes(128 << 10)
    assert d[8 * MiB:8 * MiB + 4096] == b"\x66" * 4096
    assert d[12 * MiB:] == p[12 * MiB:]


def test_read_only_export_refuses_writes(sparse_raw, serve):
    before = sparse_raw.read_bytes()
    s = serve(f"file={sparse_raw}", "--read-only")
    r = run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4k", s.uri, check=False)
    # qemu's NBD client sees NBD_FLAG_READ_ONLY and refuses to open it for writing
    err = (r.stdout + r.stderr).decode()
    assert r.returncode != 0 and "Permission denied" in err, err
    r = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4k", s.uri)
    assert "verification failed" not in r.stdout.decode()
    s.stop()
    assert sparse_raw.read_bytes() == before


def test_read_only_export_eperm_on_the_wire(sparse_raw, serve):
    """nbdsh (libnbd's Python binding) writes to a read-only export anyway
    (strict mode off) and gets the server's EPERM."""
    try:
        import nbd
    except ImportError:
        raise AssertionError("libnbd's Python binding is missing: `make deps` installs "
                             "python3-libnbd") from None
    s = serve(f"file={sparse_raw}", "--read-only")
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(s.uri)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"\x55" * 4096, 0)
    assert "Operation not permitted" in str(e.value) and e.value.errno in ("EPERM", 1)
    assert h.pread(4096, 8 * MiB) == pattern(4096)
    h.shutdown()


# -- fio ------------------------------------------------------------------------------------

def test_fio_nbd_randwrite_then_verify(tmp_path, serve, nbd_transport):
    img = tmp_path / "f.raw"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    s = serve(f"file={img},format=raw", transport=nbd_transport)
    r = run("fio", "--name=v", "--ioengine=nbd", f"--uri={s.uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", "--size=32M", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--output-format=json", timeout=300,
            cwd=tmp_path)                       # (its verify state file goes there)
    text = r.stdout.decode()
    j = json.loads(text[text.index("{"):])
    job = j["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 32 * MiB and job["read"]["io_bytes"] == 32 * MiB


# -- backing chains -------------------------------------------------------------------------

def test_qcow2_over_a_backing_chain_reads_as_its_conversion(tmp_path, serve):
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(16 * MiB, 3))
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(mid))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 256k", "-c", "write -z 5M 1M",
        str(mid))
    run("qemu-img", "create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x88 1M 64k", "-c", "write -P 0x99 9M 12k",
        str(top))
    ref = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-O", "raw", str(top), str(ref))
    s = serve(f"file={top}", "--read-only")
    got = tmp_path / "got.raw"
    run("nbdcopy", s.uri, str(got))
    assert got.read_bytes() == ref.read_bytes()
    assert run("qemu-img", "compare", "-U", str(ref), s.uri).returncode == 0
    depth = json.loads(run("nbdinfo", "--json", "--map=qemu:allocation-depth", s.uri).stdout)
    assert {e["offset"]: e["type"] for e in depth}[MiB] == 1      # top
    assert {e["offset"]: e["type"] for e in depth}[MiB + (64 << 10)] == 2   # mid
    assert {e["offset"]: e["type"] for e in depth}[0] == 3         # base


# -- the process ----------------------------------------------------------------------------

def test_exits_after_the_last_client_unless_persistent(sparse_raw, serve):
    s = serve(f"file={sparse_raw}", persistent=False)
    run("qemu-img", "info", s.uri)
    assert s.proc.wait(20) == 0
    s2 = serve(f"file={sparse_raw}")
    run("qemu-img", "info", s2.uri)
    time.sleep(0.5)
    assert s2.proc.poll() is None                        # --persistent: still there
    run("qemu-img", "info", s2.uri)


def test_usage_errors_are_one_line(sparse_raw, tmp_path):
    cases = [
        (["--nbd", "nowhere", "--disk", str(sparse_raw)], "not unix:PATH or HOST:PORT"),
        (["--nbd", "unix:/x", "--vhost-user-blk", "/y", "--disk", str(sparse_raw)],
         "not allowed with argument"),
        (["--vhost-user-blk", str(tmp_path / "v.sock"), "--read-only", "--disk",
          str(sparse_raw)], "--read-only: only with --nbd"),
        (["--nbd", f"unix:{tmp_path}", "--disk", str(sparse_raw)], "exists and is not a socket"),
        (["--nbd", "unix:/x.sock", "--disk", str(tmp_path / "missing.raw")], "missing.raw"),
    ]
    for args, text in cases:
        r = run(sys.executable, "-m", "pykvm", "serve", *args, check=False, timeout=30)
        err = r.stderr.decode().strip()
        assert r.returncode != 0, args
        assert text in err and len(err.splitlines()) == 1, (args, err)

