"""Boot our guests on /dev/kvm through the CLI and check what they print."""
import re

import pytest

from pykvm.kvm import Kvm

pytestmark = pytest.mark.kvm


def e820_lines(stdout: str):
    return [(int(a, 16), int(s, 16), int(t)) for a, s, t in
            re.findall(r"^e820: 0x([0-9a-f]{16}) 0x([0-9a-f]{16}) (\d+)$", stdout, re.M)]


def test_hello_prints_exactly_what_we_expect(pykvm, guest):
    r = pykvm("run", guest("hello"), "--cmdline", "a b")
    assert r.returncode == 0, r.stderr
    tsc_khz = int(re.search(r"^tsc_khz: (\d+)$", r.stdout.decode(), re.M).group(1))
    entries = e820_lines(r.stdout.decode())
    expected = ("hello from the guest\n"
                "cmdline: a b\n"
                f"tsc_khz: {tsc_khz}\n"
                f"e820: {len(entries)} entries\n"
                + "".join(f"e820: 0x{a:016x} 0x{s:016x} {t}\n" for a, s, t in entries))
    assert r.stdout.decode() == expected
    assert r.stderr == b""


def test_tsc_frequency_reaches_the_guest_through_cpuid(pykvm, guest):
    """Leaf 0x40000010 EAX carries KVM's TSC frequency in kHz."""
    kvm = Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    want = vcpu.get_tsc_khz()
    vcpu.close(), vm.close(), kvm.close()
    r = pykvm("run", guest("hello"))
    got = int(re.search(rb"^tsc_khz: (\d+)$", r.stdout, re.M).group(1))
    assert got == want > 0


def test_long_command_line_arrives_intact(pykvm, guest):
    cmdline = "  ".join(f"key{i}=value with 'quotes' {i}" for i in range(20)) + " end\t!"
    assert len(cmdline) > 400
    r = pykvm("run", guest("hello"), "--cmdline", cmdline)
    assert r.returncode == 0
    assert f"cmdline: {cmdline}\n".encode() in r.stdout


@pytest.mark.parametrize("mem", ["64M", "256M", "3584M"])
def test_e820_map_is_sane(pykvm, guest, mem):
    r = pykvm("run", guest("hello"), "--mem", mem)
    assert r.returncode == 0, r.stderr
    entries = e820_lines(r.stdout.decode())
    count = int(re.search(rb"^e820: (\d+) entries$", r.stdout, re.M).group(1))
    assert count == len(entries) >= 2
    assert entries == sorted(entries)
    for (a, s, _), (b, _, _) in zip(entries, entries[1:]):
        assert a + s <= b, "e820 entries overlap"
    size = int(mem[:-1]) << 20
    ram = [(a, s) for a, s, t in entries if t == 1]
    assert sum(s for _, s in ram) == size - 0x400 - 0x60000  # all RAM but the legacy hole
    assert (0x100000, min(size, 0xC0000000) - 0x100000) in ram
    assert all(a + s <= 0xC0000000 or a >= 1 << 32 for a, s in ram)  # nothing in the device hole
    if size > 0xC0000000:
        assert (1 << 32, size - 0xC0000000) in ram


def test_guest_runs_in_long_mode_at_cpl3(pykvm, guest):
    r = pykvm("run", guest("longmode"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert b"longmode: ok\n" in r.stdout


def test_exit_status_is_the_debug_exit_value(pykvm, tmp_path):
    from tests.helpers.elf import code_elf, exit_code
    for value in (0, 7, 255):
        p = tmp_path / f"exit{value}.elf"
        p.write_bytes(code_elf(exit_code(value)))
        assert pykvm("run", p).returncode == value


def test_trace_exits_prints_each_exit_and_counts(pykvm, guest):
    r = pykvm("run", guest("hello"), "--cmdline", "x", "--trace", "exits")
    assert r.returncode == 0
    err = r.stderr.decode()
    outs = re.findall(r"^exit IO out port=0x3f8 size=1 value=(0x[0-9a-f]+)$", err, re.M)
    # every serial byte is one traced exit (the guest's divisor-latch write comes first)
    assert bytes(int(v, 16) for v in outs).endswith(r.stdout)
    assert re.search(r"^exit IO out port=0x501 size=1 value=0x0$", err, re.M)
    total = int(re.search(r"^exits: (\d+) in all$", err, re.M).group(1))
    io = int(re.search(r"^  IO +(\d+)$", err, re.M).group(1))
    assert total >= io >= len(outs) + 1


def test_stop_from_another_thread_ends_a_spinning_guest(tmp_path):
    """Machine.stop() kicks a vCPU out of KVM_RUN (immediate_exit + signal)."""
    import io
    import threading
    import time

    from pykvm.machine import Machine, MachineConfig
    from tests.helpers.elf import SPIN, code_elf

    p = tmp_path / "spin.elf"
    p.write_bytes(code_elf(SPIN))
    with Machine(MachineConfig(kernel=str(p), serial_out=io.BytesIO())) as m:
        threading.Timer(0.5, m.stop).start()
        start = time.monotonic()
        result = m.run(timeout=60)
        assert time.monotonic() - start < 30
    assert result.status is None and result.stop.kind == "requested"
