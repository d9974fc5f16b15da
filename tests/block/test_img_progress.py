"""-p on every long pykvm img command: qemu-img's ``    (x.xx/100%)`` lines
where the output is not a terminal, a tqdm bar where it is."""
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


from .conftest import img, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu
MiB = 1 << 20
LINE = re.compile(r" {4}\((\d+\.\d\d)/100%\)\r")



@pytest.fixture
def images(tmp_path):
    """An overlay with data every few MiB over a raw base, a copy of it, and
    a qcow2 with duplicate clusters and a leak."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(64 * MiB)
        for k in range(0, 64, 5):
            f.seek(k * MiB)
            f.write(bytes([k + 1]) * 65536)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", top)
    qemu_io(top, *[f"write -P {k + 7} {k}M 128k" for k in range(0, 64, 3)])
    return {"base": base, "top": top, "tmp": tmp_path}


def shown(text):
    """The percentages of a qemu-img progress display, checked for form."""
    assert text.endswith("\n"), repr(text[-40:])
    body = text[:-1]
    pcts = [float(m.group(1)) for m in LINE.finditer(body)]
    assert LINE.sub("", body) == "", repr(body[:200])
    assert pcts == sorted(pcts) and pcts[-1] == 100.0, pcts
    return pcts


def _run(capsys, images, cmd):
    t = images["tmp"]
    top, base = images["top"], images["base"]
    if cmd == "convert":
        return img(capsys, "convert", "-p", "-O", "qcow2", top, t / "c.qcow2"), "out"
    if cmd == "compare":
        shutil.copyfile(top, t / "copy.qcow2")
        return img(capsys, "compare", "-p", top, t / "copy.qcow2"), "out"
    if cmd == "commit":
        return img(capsys, "commit", "-p", top), "out"
    if cmd == "rebase":
        other = t / "other.raw"
        other.write_bytes(bytes(64 * MiB))
        return img(capsys, "rebase", "-p", "-b", other, "-F", "raw", top), "out"
    if cmd == "amend":
        return img(capsys, "amend", "-p", "-o", "refcount_bits=64", top), "out"
    if cmd == "dedup":
        qemu_io(top, *[f"write -P 9 {k}M 64k" for k in range(1, 64, 4)])
        return img(capsys, "dedup", "-p", top), "err"
    if cmd == "check":
        qemu_io(top, *[f"write -P 9 {k}M 64k" for k in range(1, 64, 4)])
        return img(capsys, "check", "-p", "-r", "all", top), "err"
    raise AssertionError(cmd)


COMMANDS = ["convert", "compare", "commit", "rebase", "amend", "dedup", "check"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_progress_lines(capsys, images, cmd):
    (rc, out, err), where = _run(capsys, images, cmd)
    assert rc == 0, err
    text = out if where == "out" else err
    start = text.index("    (")
    end = text.index("100.00/100%)\r\n") + len("100.00/100%)\r\n")
    pcts = shown(text[start:end])
    assert len(pcts) >= 2
    rest = text[:start] + text[end:]
    assert "/100%" not in rest + (err if where == "out" else out)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_no_progress_without_p(capsys, images, cmd, monkeypatch):
    import pykvm.img as m
    real = m.main_img

    def no_p(argv):
        return real([a for a in argv if a != "-p"])
    monkeypatch.setattr(m, "main_img", no_p)       # (conftest.img calls it)
    (rc, out, err), _ = _run(capsys, images, cmd)
    assert rc == 0, err
    assert "/100%" not in out + err


def test_terminal_gets_a_bar(images):
    """On a terminal: tqdm's bar, none of qemu-img's lines."""
    exe = Path(sys.executable).parent / "pykvm"
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(exe), "img", "convert", "-p", "-O", "raw", images["top"],
                             images["tmp"] / "t.raw"], stdout=slave, stderr=slave,
                            stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 65536)
        except OSError:
            break
        if not b:
            break
        chunks.append(b)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "100.00%|" in text and "\u2588" in text, repr(text[-300:])
    assert "/100%)" not in text
