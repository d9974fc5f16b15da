"""Fault guests: the VMM's report names the faulting instruction and its symbol."""
import re

import pytest

pytestmark = pytest.mark.kvm


def last_line(stderr: bytes) -> str:
    return stderr.decode().rstrip("\n").split("\n")[-1]


@pytest.mark.parametrize("name,symbol,insn,cpl", [
    ("fault_ud", "guest_early+0x0", "ud2", 0),
    ("fault_triple", "guest_early_idt+", "push", 0),
    ("fault_pf", "main+", "mov", 3),
])
def test_fault_report(pykvm, guest, name, symbol, insn, cpl):
    r = pykvm("run", guest(name), "--timeout", "60")
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "Traceback" not in err
    assert "triple fault" in err
    assert f"mode: long (64-bit), CPL {cpl}" in err
    m = re.search(r"^rip: 0x([0-9a-f]{16})  <([^>]+)>  phys: 0x([0-9a-f]+)$", err, re.M)
    assert m, err
    rip, sym, phys = int(m.group(1), 16), m.group(2), int(m.group(3), 16)
    assert sym.startswith(symbol)
    assert phys == rip  # identity-mapped guest
    arrow = re.search(r"^=> 0x([0-9a-f]+) <([^>]+)>: (.+)$", err, re.M)
    assert int(arrow.group(1), 16) == rip and arrow.group(3).startswith(insn)
    assert len(re.findall(r"^(=>|  ) 0x", err, re.M)) == 8  # about eight instructions
    line = last_line(r.stderr)
    assert line.startswith(f"pykvm: guest fault (triple fault (KVM_EXIT_SHUTDOWN)) at rip={rip:#x} "
                           f"in {sym}: {insn}")


def test_page_fault_is_reported_by_the_guest_first(pykvm, guest):
    r = pykvm("run", guest("fault_pf"), "--timeout", "60")
    m = re.search(rb"^guest: exception #PF \(vector 14\) error=0x([0-9a-f]+) rip=0x([0-9a-f]+) "
                  rb"cr2=0x([0-9a-f]+) cpl=3$", r.stdout, re.M)
    assert m, r.stdout
    guest_rip = int(m.group(2), 16)
    assert int(m.group(1), 16) & 0x4  # user-mode access
    vmm_rip = int(re.search(r"^rip: 0x([0-9a-f]+)", r.stderr.decode(), re.M).group(1), 16)
    assert guest_rip == vmm_rip  # both reports point at the same instruction
