"""pykvm img measure against qemu-img measure: the same numbers for empty and
partly allocated sources, raw and qcow2 targets of several cluster sizes,
and what pykvm img convert writes never exceeds the required size."""
import json
import os

import pytest


from .conftest import img, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu
MiB = 1 << 20



def _sources(d):
    """name -> (path, format) of the matrix's source images."""
    out = {}
    p = d / "empty.raw"
    p.write_bytes(b"")
    os.truncate(p, 64 * MiB)
    out["empty-raw"] = (p, "raw")
    p = d / "holey.raw"                      # data here and there, an odd size
    with open(p, "wb") as f:
        f.truncate(37 * MiB + 3 * 512 + 7)
        for off, n in ((0, 4096), (5 * MiB + 12288, 200 * 1024), (20 * MiB - 4096, 8192),
                       (37 * MiB, 1024)):
            f.seek(off)
            f.write(b"\x5a" * n)
    out["holey-raw"] = (p, "raw")
    p = d / "empty.qcow2"
    qemu_img("create", "-f", "qcow2", p, "3G")
    out["big-empty-qcow2"] = (p, "qcow2")
    p = d / "empty-small.qcow2"
    qemu_img("create", "-f", "qcow2", p, "64M")
    out["empty-qcow2"] = (p, "qcow2")
    p = d / "partly.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", p, "100M")
    qemu_io(p, "write -P 0x11 0 1k", "write -z 1M 3M", "write -P 0x22 7M 300k",
            "write -P 0x33 99M 1M")
    out["partly-qcow2"] = (p, "qcow2")
    base = d / "base.raw"
    with open(base, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(b"\x44" * MiB)
    p = d / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", p)
    qemu_io(p, "write -P 0x55 8M 64k", "write -z 1M 512k")
    out["chain-qcow2"] = (p, "qcow2")
    p = d / "bitmaps.qcow2"
    qemu_img("create", "-f", "qcow2", p, "10G")
    qemu_img("bitmap", "--add", p, "b0")
    qemu_img("bitmap", "--add", "-g", "512", p, "a-longer-bitmap-name")
    qemu_io(p, "write -P 1 0 2M")
    out["bitmaps-qcow2"] = (p, "qcow2")
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _sources(tmp_path_factory.mktemp("measure"))


TARGETS = [("raw", ""), ("qcow2", ""), ("qcow2", "cluster_size=512"),
           ("qcow2", "cluster_size=4k,refcount_bits=1"), ("qcow2", "cluster_size=2M"),
           ("qcow2", "refcount_bits=64"), ("qcow2", "extended_l2=on,cluster_size=32k"),
           ("qcow2", "compat=0.10"), ("qcow2", "preallocation=full"),
           ("qcow2", "backing_file=x.qcow2")]


def _both(capsys, args):
    theirs = qemu_img("measure", "--output=json", *args, check=False)
    rc, out, err = img(capsys, "measure", "--output=json", *args)
    assert rc == theirs.returncode, (err, theirs.stderr)
    if rc:              # (a size too large for the cluster size)
        assert out == "" and err.count("\n") == 1 and "too large" in err
        return None, None
    return json.loads(out), json.loads(theirs.stdout)


@pytest.mark.parametrize("out_fmt,opts", TARGETS)
@pytest.mark.parametrize("name", ["empty-raw", "holey-raw", "big-empty-qcow2", "empty-qcow2",
                                  "partly-qcow2", "chain-qcow2", "bitmaps-qcow2"])
def test_measure_image_matches_qemu(capsys, sources, name, out_fmt, opts):
    path, fmt = sources[name]
    args = ["-f", fmt, "-O", out_fmt] + (["-o", opts] if opts else []) + [path]
    ours, theirs = _both(capsys, args)
    assert ours == theirs
    assert list(ours) == list(theirs)           # the same keys, in qemu-img's order


@pytest.mark.parametrize("size", ["0", "1", "512", "1000001", "1G", "100G", "3T"])
@pytest.mark.parametrize("out_fmt,opts", TARGETS[:8])
def test_measure_size_matches_qemu(capsys, size, out_fmt, opts):
    args = ["--size", size, "-O", out_fmt] + (["-o", opts] if opts else [])
    ours, theirs = _both(capsys, args)
    assert ours == theirs


def test_measure_human_output_matches_qemu(capsys, sources):
    path, _ = sources["partly-qcow2"]
    for args in (["-O", "qcow2", path], [path], ["--size", "5G", "-O", "qcow2"]):
        rc, out, _ = img(capsys, "measure", *args)
        assert rc == 0
        assert out == qemu_img("measure", *args).stdout


@pytest.mark.parametrize("opts", ["", "cluster_size=512", "cluster_size=4k", "cluster_size=2M",
                                  "refcount_bits=1,cluster_size=4k"])
@pytest.mark.parametrize("name", ["empty-raw", "holey-raw", "empty-qcow2", "big-empty-qcow2",
                                  "partly-qcow2", "chain-qcow2"])
def test_convert_fits_the_required_size(tmp_path, capsys, sources, name, opts):
    path, fmt = sources[name]
    for out_fmt in ("qcow2", "raw"):
        if out_fmt == "raw" and opts:
            continue
        o = ["-o", opts] if opts else []
        rc, out, err = img(capsys, "measure", "--output=json", "-f", fmt, "-O", out_fmt, *o,
                           path)
        assert rc == 0, err
        required = json.loads(out)["required"]
        dst = tmp_path / f"out.{out_fmt}"
        rc, _, err = img(capsys, "convert", "-f", fmt, "-O", out_fmt, *o, path, dst)
        assert rc == 0, err
        assert os.path.getsize(dst) <= required, (out_fmt, os.path.getsize(dst), required)
        qemu_img("compare", "-f", fmt, "-F", out_fmt, path, dst)


@pytest.mark.parametrize("argv,want", [
    ([], "either --size N or one filename"),
    (["--size", "1G", "IMG"], "cannot be used together with a filename"),
    (["-f", "raw", "--size", "1G"], "require a filename"),
    (["--size", "-5"], "invalid size"),
    (["--size", "1Q"], "invalid size"),
    (["--size", "1G", "-O", "vmdk"], "unknown file format"),
    (["--size", "1G", "-O", "qcow2", "-o", "foo=1"], "invalid option 'foo'"),
    (["--size", "1G", "-O", "raw", "-o", "cluster_size=4k"], "does not support option"),
    (["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"], "power of two"),
    (["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k,extended_l2=on"], "16k"),
    (["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"], "power of two"),
    (["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"], "compat=1.1"),
    (["--size", "1G", "-O", "qcow2", "-o", "compat=2"], "compatibility level"),
    (["--size", "1G", "-O", "qcow2", "-o", "preallocation=bad"], "preallocation"),
    (["--size", "100P", "-O", "qcow2"], "too large"),
    (["--size", "1G", "--output=xml"], "invalid choice"),
    (["NOSUCH"], "No such file"),
])
def test_measure_errors_are_one_line(tmp_path, capsys, sources, argv, want):
    argv = [str(sources["partly-qcow2"][0]) if a == "IMG" else
            str(tmp_path / "nosuch") if a == "NOSUCH" else a for a in argv]
    theirs = qemu_img("measure", *argv, check=False)
    rc, out, err = img(capsys, "measure", *argv)
    assert rc == theirs.returncode == 1
    assert out == ""
    assert err.count("\n") == 1 and want in err, err


@pytest.mark.parametrize("argv", [["measure", "-f", "nosuch", "IMG"],
                                  ["amend", "-f", "nosuch", "-o", "compat=1.1", "IMG"],
                                  ["dd", "-f", "nosuch", "if=IMG", "of=OUT"],
                                  ["bench", "-f", "nosuch", "-c", "1", "IMG"]])
def test_new_commands_refuse_an_unknown_format(tmp_path, capsys, argv):
    p = tmp_path / "u.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    before = p.read_bytes()
    argv = [a.replace("IMG", str(p)).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert qemu_img(*argv, check=False).returncode == 1
    rc, out, err = img(capsys, *argv)
    assert rc == 1 and out == "" and err.count("\n") == 1 and "nosuch" in err, err
    assert p.read_bytes() == before


def test_image_opts_for_measure_amend_and_dd(tmp_path, capsys, sources):
    path, _ = sources["partly-qcow2"]
    node = f"driver=qcow2,file.filename={path}"
    args = ["measure", "--image-opts", "--output=json", "-O", "qcow2", node]
    rc, out, err = img(capsys, *args)
    assert rc == 0, err
    assert json.loads(out) == json.loads(qemu_img(*args).stdout)
    out_raw = tmp_path / "o.raw"
    rc, _, err = img(capsys, "dd", "--image-opts", f"if={node}", f"of={out_raw}")
    assert rc == 0, err
    qemu_img("compare", "-F", "raw", path, out_raw)
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    rc, _, err = img(capsys, "amend", "--image-opts", "-o", "lazy_refcounts=on",
                     f"driver=qcow2,file.filename={p}")
    assert rc == 0, err
    info = json.loads(qemu_img("info", "--output=json", p).stdout)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True


@pytest.mark.parametrize("spec", ["s1", "1", "snapshot.name=s1", "snapshot.id=1",
                                  "snapshot.id=1,snapshot.name=s1", "s2"])
def test_measure_a_snapshot_matches_qemu(tmp_path, capsys, spec):
    p = tmp_path / "sn.qcow2"
    qemu_img("create", "-f", "qcow2", p, "10M")
    qemu_io(p, "write -P 1 0 3M")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_img("resize", p, "40M")
    qemu_io(p, "write -P 2 5M 5M", "write -z 0 1M")
    qemu_img("snapshot", "-c", "s2", p)
    qemu_io(p, "write -P 3 20M 8M")
    ours, theirs = _both(capsys, ["-O", "qcow2", "-l", spec, p])
    assert ours == theirs


@pytest.mark.parametrize("spec,want", [("nosuch", "cannot find snapshot"),
                                       ("snapshot.id=9", "cannot find snapshot"),
                                       ("snapshot.foo=1", "snapshot.foo")])
def test_measure_snapshot_errors(tmp_path, capsys, spec, want):
    p = tmp_path / "sn.qcow2"
    qemu_img("create", "-f", "qcow2", p, "10M")
    qemu_img("snapshot", "-c", "s1", p)
    assert qemu_img("measure", "-l", spec, p, check=False).returncode == 1
    rc, out, err = img(capsys, "measure", "-l", spec, p)
    assert rc == 1 and out == "" and err.count("\n") == 1 and want in err, err
    rc, _, err = img(capsys, "measure", "-l", "s1", "--size", "1M")
    assert rc == 1 and "require a filename" in err
