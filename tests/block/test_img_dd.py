"""pykvm img dd against qemu-img dd: the same output images (content and
size, qemu-img compare -s) for the same operands, the same exit codes."""
import json

import pytest


from .conftest import img, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu
MiB = 1 << 20



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dd")
    raw = d / "odd.raw"                       # not a whole number of sectors
    raw.write_bytes(bytes(range(256)) * 4096 * 3 + b"tail")
    base = d / "base.raw"
    base.write_bytes(b"\x61" * (2 * MiB))
    q = d / "chain.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", base, "-F", "raw", q,
             "5M")
    qemu_io(q, "write -P 0x62 100k 300k", "write -z 1M 64k", "write -P 0x63 4M 7k")
    return {"raw": (raw, "raw"), "qcow2": (q, "qcow2")}


def virtual_size(p, fmt):
    return json.loads(qemu_img("info", "-f", fmt, "--output=json", p).stdout)["virtual-size"]


@pytest.mark.parametrize("ops", ["", "bs=4k", "bs=4k count=3", "bs=4k count=3 skip=2",
                                 "bs=4k skip=2", "bs=7 count=5 skip=3", "bs=1M skip=1",
                                 "bs=1.5k count=1000 skip=10", "count=0", "bs=64k skip=1k",
                                 "bs=3 count=1000 skip=1"])
@pytest.mark.parametrize("out_fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("name", ["raw", "qcow2"])
def test_dd_matches_qemu(tmp_path, capsys, inputs, name, out_fmt, ops):
    src, fmt = inputs[name]
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    args = ["-f", fmt, "-O", out_fmt] + ops.split()
    t = qemu_img("dd", *args, f"if={src}", f"of={theirs}")
    rc, out, err = img(capsys, "dd", *args, f"if={src}", f"of={ours}")
    assert rc == t.returncode == 0, err
    assert out == ""
    assert ("cannot skip" in err) == ("cannot skip" in t.stderr)
    assert virtual_size(ours, out_fmt) == virtual_size(theirs, out_fmt)
    qemu_img("compare", "-f", out_fmt, "-F", out_fmt, theirs, ours)     # (-s: the sizes above)
    if out_fmt == "qcow2":
        qemu_img("check", ours)


@pytest.mark.parametrize("ops,want", [
    (["bs=0"], "between 1 and"), (["bs=3G"], "between 1 and"), (["bs=x"], "invalid bs"),
    (["bs=-1"], "invalid bs"), (["bs=1k1"], "invalid bs"), (["count=x"], "invalid count"),
    (["count=-1"], "invalid count"), (["skip=-1"], "invalid skip"), (["skip="], "invalid skip"),
    (["foo=1"], "unrecognized operand foo"), (["iflag=skip_bytes"], "unrecognized operand"),
    (["bare"], "unrecognized operand bare"), (["NOOUT"], "both the input and the output"),
    (["-O", "vmdk2"], "unknown output format"), (["IFNOSUCH"], "No such file"),
    (["OFBAD"], "error while creating the output image"),
])
def test_dd_errors_match_qemu(tmp_path, capsys, inputs, ops, want):
    src, _ = inputs["raw"]
    operands = {"if": f"if={src}", "of": f"of={tmp_path / 'o'}"}
    if ops == ["NOOUT"]:
        ops, operands = [], {"if": operands["if"]}
    elif ops == ["IFNOSUCH"]:
        ops, operands["if"] = [], f"if={tmp_path / 'nosuch'}"
    elif ops == ["OFBAD"]:
        ops, operands["of"] = [], f"of={tmp_path / 'no' / 'dir'}"
    args = ops + list(operands.values())
    t = qemu_img("dd", *args, check=False)
    rc, out, err = img(capsys, "dd", *args)
    assert rc == t.returncode == 1, (err, t.stderr)
    assert out == "" and err.count("\n") == 1 and want in err, err
