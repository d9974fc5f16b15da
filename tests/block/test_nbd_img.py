"""pykvm img with NBD URIs (and --image-opts driver=nbd,...) as the file
name, as qemu-img takes them: info, map, compare, convert and check against
qemu-nbd and nbdkit, with qemu-img on the same URI as the reference (fields,
output, exit codes)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.nbd_servers import nbd_server  # noqa: F401  (fixture)

MiB = 1 << 20


def pykvm_img(*args):
    return subprocess.run([sys.executable, "-m", "pykvm", "img", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def qemu_img(*args):
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def sparse_raw(tmp_path):
    p = tmp_path / "d.raw"
    with open(p, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\x5a" * (64 << 10))
        f.seek(6 * MiB)
        f.write(b"\xa5" * 4096)
    return p


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_info_of_a_raw_export(nbd_server, sparse_raw, transport):
    srv = nbd_server("qemu-nbd", "-f", "raw", sparse_raw, transport=transport)
    ours = pykvm_img("info", "--output=json", srv.uri)
    assert ours.returncode == 0, ours.stderr
    ours = json.loads(ours.stdout)
    theirs = json.loads(qemu_img("info", "--output=json", srv.uri).stdout)
    # no actual-size (no local file) and no dirty-flag, as qemu-img; "children"
    # is what qemu-img prints from QEMU 8.0 on
    assert set(ours) - {"children"} == set(theirs) == {"virtual-size", "filename", "format"}
    assert ours["virtual-size"] == theirs["virtual-size"] == 8 * MiB
    assert ours["format"] == theirs["format"] == "raw"
    assert ours["filename"] == srv.uri
    child = ours["children"][0]
    assert child["name"] == "file" and child["info"]["format"] == "nbd"
    assert "actual-size" not in child["info"]
    human = pykvm_img("info", srv.uri)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[:4] == [f"image: {srv.uri}", "file format: raw",
                         "virtual size: 8 MiB (8388608 bytes)", "disk size: unavailable"]
    assert "disk size: unavailable" in qemu_img("info", srv.uri).stdout
    assert "    protocol type: nbd" in lines


def test_info_and_check_of_a_qcow2_export(tmp_path, nbd_server):
    q = tmp_path / "d.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", q, "16M").returncode == 0
    srv = nbd_server("qemu-nbd", "-f", "raw", q)       # the qcow2 file, exported as is
    ours = json.loads(pykvm_img("info", "--output=json", srv.uri).stdout)
    theirs = json.loads(qemu_img("info", "--output=json", srv.uri).stdout)
    assert set(ours) - {"children"} == set(theirs)
    for k in set(theirs) - {"filename"}:
        assert ours[k] == theirs[k], k
    assert ours["format"] == "qcow2" and ours["virtual-size"] == 16 * MiB
    r, q_r = pykvm_img("check", srv.uri), qemu_img("check", srv.uri)
    assert r.returncode == q_r.returncode == 0, r.stderr
    assert "No errors were found on the image." in r.stdout
    assert r.stdout.splitlines()[-1] == q_r.stdout.splitlines()[-1]   # Image end offset


def test_map_compare_convert_check_on_a_uri(tmp_path, nbd_server, sparse_raw):
    srv = nbd_server("nbdkit", "file", f"file={sparse_raw}")
    r = pykvm_img("map", "--output=json", srv.uri)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(qemu_img("map", "--output=json", srv.uri).stdout)
    assert [(e["start"], e["length"]) for e in json.loads(r.stdout) if e["data"]] == \
        [(MiB, 64 << 10), (6 * MiB, 4096)]
    human = pykvm_img("map", srv.uri).stdout.splitlines()
    assert human[1:] == [f"{MiB:<#16x}{64 << 10:<#16x}{MiB:<#16x}{srv.uri}",
                         f"{6 * MiB:<#16x}{4096:<#16x}{6 * MiB:<#16x}{srv.uri}"]

    r = pykvm_img("compare", srv.uri, sparse_raw)
    assert (r.returncode, r.stdout.strip()) == (0, "Images are identical."), r.stderr
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"copy.{fmt}"
        r = pykvm_img("convert", "-O", fmt, srv.uri, out)
        assert r.returncode == 0, r.stderr
        assert qemu_img("compare", "-f", fmt, out, sparse_raw).returncode == 0
    assert os.stat(tmp_path / "copy.raw").st_blocks * 512 <= 256 << 10   # holes kept

    other = tmp_path / "other.raw"
    other.write_bytes(sparse_raw.read_bytes())
    with open(other, "r+b") as f:
        f.seek(6 * MiB + 512)
        f.write(b"!")
    r = pykvm_img("compare", srv.uri, other)
    assert r.returncode == qemu_img("compare", srv.uri, other).returncode == 1
    assert r.stdout.strip() == f"Content mismatch at offset {6 * MiB + 512}!"

    r, q_r = pykvm_img("check", srv.uri), qemu_img("check", srv.uri)
    assert r.returncode == q_r.returncode == 63
    assert "This image format does not support checks" in r.stderr


def test_image_opts_name_the_nbd_node(nbd_server, sparse_raw):
    srv = nbd_server("qemu-nbd", "-f", "raw", sparse_raw)
    opts = f"driver=nbd,server.type=unix,server.path={srv.address}"
    ours = json.loads(pykvm_img("info", "--output=json", "--image-opts", opts).stdout)
    theirs = json.loads(qemu_img("info", "--output=json", "--image-opts", opts).stdout)
    assert ours["format"] == theirs["format"] == "nbd"
    assert ours["virtual-size"] == theirs["virtual-size"] == 8 * MiB
    raw = f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={srv.address}"
    r = pykvm_img("map", "--output=json", "--image-opts", raw)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(qemu_img("map", "--output=json", srv.uri).stdout)
    r = pykvm_img("map", "--output=json", "--image-opts", opts)     # the bare protocol node
    assert json.loads(r.stdout) == json.loads(qemu_img("map", "--output=json", srv.uri).stdout)


def test_no_server_is_one_line_and_qemu_img_exit_codes(tmp_path, sparse_raw):
    uri = f"nbd+unix:///?socket={tmp_path}/none.sock"
    for cmd, status in (("info", 1), ("map", 1), ("check", 1), ("compare", 2)):
        args = [cmd, uri] + ([sparse_raw] if cmd == "compare" else [])
        r, q_r = pykvm_img(*args), qemu_img(*args)
        assert r.returncode == q_r.returncode == status, (cmd, r.stderr, q_r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"pykvm img: could not open '{uri}': "
                                                  f"cannot connect to the NBD server"), err


def test_convert_into_an_export(tmp_path, nbd_server, sparse_raw):
    """The target is an NBD export (qemu-img's rule for a protocol that cannot
    create: the image goes into it, which must be big enough): what it held
    before is gone, the image is there."""
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * (8 * MiB))             # old content, everywhere
    srv = nbd_server("qemu-nbd", "-f", "raw", target)
    r = pykvm_img("convert", "-O", "raw", sparse_raw, srv.uri)
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == sparse_raw.read_bytes()
    target.write_bytes(b"\xee" * (8 * MiB))
    r = pykvm_img("convert", "-n", "-O", "raw", sparse_raw, srv.uri)   # -n: the same
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == sparse_raw.read_bytes()

    big = tmp_path / "big.raw"
    big.write_bytes(b"")
    os.truncate(big, 16 * MiB)
    r, q_r = pykvm_img("convert", "-O", "raw", big, srv.uri), \
        qemu_img("convert", "-O", "raw", big, srv.uri)
    assert r.returncode == q_r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and "smaller than the image" in r.stderr
    assert target.read_bytes() == sparse_raw.read_bytes()      # refused before a write

    # -n -O qcow2: into an export that holds a qcow2 image (qemu-img reads it back)
    q = tmp_path / "target.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", q, "8M").returncode == 0
    os.truncate(q, 16 * MiB)                            # room for its clusters
    qsrv = nbd_server("qemu-nbd", "-f", "raw", q)
    r = pykvm_img("convert", "-n", "-O", "qcow2", sparse_raw, qsrv.uri)
    assert r.returncode == 0, r.stderr
    r = qemu_img("compare", "-f", "raw", "-F", "qcow2", sparse_raw, qsrv.uri)
    assert r.returncode == 0, r.stdout + r.stderr
    qsrv.stop()
    assert qemu_img("check", q).returncode == 0
