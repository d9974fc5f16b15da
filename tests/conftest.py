"""Shared fixtures.

Tests marked ``kvm`` boot guests on /dev/kvm. They skip only on a host without
/dev/kvm; where the device exists they run, and a failure to use it fails.
"""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUEST_BUILD = ROOT / "guest" / "build"
HAVE_KVM = os.path.exists("/dev/kvm")


def pytest_configure(config):
    config.addinivalue_line("markers", "kvm: boots a guest on /dev/kvm")
    config.addinivalue_line("markers", "qemu: runs QEMU for interoperability")


def pytest_collection_modifyitems(config, items):
    if HAVE_KVM:
        return
    skip = pytest.mark.skip(reason="this host has no /dev/kvm")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


def guest_path(name: str) -> pathlib.Path:
    path = GUEST_BUILD / f"{name}.elf"
    assert path.exists(), f"{path} is missing: run 'make guests'"
    return path


@pytest.fixture
def guest():
    return guest_path


def run_pykvm(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, capturing stdout (serial) and stderr (VMM)."""
    return subprocess.run([sys.executable, "-m", "pykvm", *map(str, args)], capture_output=True,
                          timeout=timeout, cwd=ROOT, **kw)


@pytest.fixture
def pykvm():
    return run_pykvm
