"""Debian's cloud kernel, taken out of its .deb and cached under build/linux/.

    python -m tests.helpers.linux_kernel     # fetch if needed; print the bzImage's path

The metapackage linux-image-cloud-amd64 names the real package
(linux-image-<abi>-cloud-amd64); we `apt-get download` that one (apt checks it
against the signed archive index), extract it with `dpkg-deb -x` and keep
boot/vmlinuz-* and boot/config-* (and lib/modules/<version>/ as modules/, for
the Linux test kit; ``fetch_modules``). Nothing is installed on the host.

``extract_vmlinux`` takes the uncompressed kernel (an ELF with a PVH note)
out of the bzImage's payload, as ``pykvm run --boot=pvh`` does
(pykvm.boot.linux.payload_elf), and caches it beside it. Debian's kernels use
LZ4, which needs the lz4 tool (Debian package lz4).

The cache is build/linux/<package>_<version>/ and build/linux/current names
the one in use. Once something is cached it is used as it is, with no network
access, so a test run does not change kernels under our feet; `--refresh`
resolves the metapackage again and fetches a newer kernel if there is one.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "linux"
METAPACKAGE = "linux-image-cloud-amd64"


class FetchError(Exception):
    pass


def cached_kernel() -> pathlib.Path | None:
    """The cached bzImage, or None."""
    current = CACHE / "current"
    try:
        name = current.read_text().strip()
    except OSError:
        return None
    found = sorted((CACHE / name / "boot").glob("vmlinuz-*"))
    return found[0] if found else None


def _run(*cmd: str, cwd=None) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} not found: this needs a Debian host (apt, dpkg-deb)") from None
    if r.returncode != 0:
        raise FetchError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def _real_package() -> str:
    """linux-image-cloud-amd64 -> linux-image-6.1.0-NN-cloud-amd64 (what it depends on)."""
    for attempt in range(2):
        try:
            out = _run("apt-cache", "depends", METAPACKAGE)
        except FetchError:
            out = ""
        m = re.search(r"Depends: (linux-image-[0-9][^\s]*-cloud-amd64)\s*$", out, re.M)
        if m:
            return m.group(1)
        if attempt == 0:  # no package lists yet: fetch them once
            _run("apt-get", "update", "-q")
    raise FetchError(f"apt-cache does not know {METAPACKAGE} (is this Debian with main?)")


def current_package() -> tuple[str, str]:
    """(package, version) of the cached kernel named by build/linux/current."""
    try:
        name = (CACHE / "current").read_text().strip()
    except OSError:
        raise FetchError(f"{CACHE / 'current'} is missing: fetch the kernel first") from None
    package, _, version = name.partition("_")
    if not package or not version:
        raise FetchError(f"{CACHE / 'current'} names {name!r}, not <package>_<version>")
    return package, version


def _download_deb(package: str, version: str, tmp: pathlib.Path) -> pathlib.Path:
    """`apt-get download package=version` into ``tmp``; the .deb's path."""
    os.chmod(tmp, 0o755)  # apt's _apt user may download into it
    _run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
         f"{package}={version}", cwd=tmp)
    debs = list(tmp.glob("*.deb"))
    if len(debs) != 1:
        raise FetchError(f"apt-get download {package}={version} left {len(debs)} .deb files")
    return debs[0]


def _keep_modules(tree: pathlib.Path, out: pathlib.Path, deb: pathlib.Path) -> None:
    """Move the extracted lib/modules/<version>/ into out/modules/<version>/."""
    found = sorted((tree / "lib" / "modules").glob("*/modules.builtin"))
    if len(found) != 1:
        raise FetchError(f"{deb.name}: expected one lib/modules/<version>/ with modules.builtin")
    (out / "modules").mkdir(parents=True)
    shutil.move(str(found[0].parent), str(out / "modules" / found[0].parent.name))


def cached_modules() -> pathlib.Path | None:
    """The cached lib/modules/<version>/ of the current kernel, or None."""
    try:
        package, version = current_package()
    except FetchError:
        return None
    found = sorted((CACHE / f"{package}_{version}" / "modules").glob("*/modules.builtin"))
    return found[0].parent if found else None


def fetch_modules() -> pathlib.Path:
    """lib/modules/<version>/ of the current kernel, from the same .deb.

    A kernel cached before modules were kept gets them now: the exact
    package=version named by `current` is downloaded again and only its
    modules are added to the cache directory.
    """
    fetch_kernel()
    found = cached_modules()
    if found is not None:
        return found
    package, version = current_package()
    dest = CACHE / f"{package}_{version}"
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = pathlib.Path(tmp)
        deb = _download_deb(package, version, tmp)
        tree = tmp / "tree"
        _run("dpkg-deb", "-x", str(deb), str(tree))
        _keep_modules(tree, tmp / "out", deb)
        shutil.rmtree(dest / "modules", ignore_errors=True)
        os.replace(tmp / "out" / "modules", dest / "modules")
    found = cached_modules()
    assert found is not None
    return found


def fetch_kernel(refresh: bool = False) -> pathlib.Path:
    """The bzImage path; downloads and extracts it on the first call (or with refresh)."""
    if not refresh:
        cached = cached_kernel()
        if cached is not None:
            return cached
    package = _real_package()
    version = re.search(r"^Version: (\S+)$", _run("apt-cache", "show", "--no-all-versions",
                                                  package), re.M)
    if not version:
        raise FetchError(f"apt-cache show {package}: no Version")
    name = f"{package}_{version.group(1)}"
    dest = CACHE / name
    if not sorted((dest / "boot").glob("vmlinuz-*")):
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            deb = _download_deb(package, version.group(1), pathlib.Path(tmp))
            tree = pathlib.Path(tmp) / "tree"
            _run("dpkg-deb", "-x", str(deb), str(tree))
            staged = pathlib.Path(tmp) / "out" / "boot"
            staged.mkdir(parents=True)
            kept = [f for f in (tree / "boot").glob("*") if f.name.startswith(("vmlinuz-",
                                                                               "config-"))]
            if not any(f.name.startswith("vmlinuz-") for f in kept):
                raise FetchError(f"{deb.name} has no boot/vmlinuz-*")
            for f in kept:
                shutil.copy2(f, staged / f.name)
            _keep_modules(tree, pathlib.Path(tmp) / "out", deb)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(pathlib.Path(tmp) / "out", dest)
    tmp_current = CACHE / "current.tmp"
    tmp_current.write_text(name + "\n")
    os.replace(tmp_current, CACHE / "current")
    found = cached_kernel()
    assert found is not None
    return found


def extract_vmlinux(bzimage: pathlib.Path) -> pathlib.Path:
    """The uncompressed ELF kernel inside ``bzimage`` (pykvm's ``--boot=pvh`` loader
    takes it out), cached as vmlinux beside it."""
    from pykvm.boot.linux import payload_elf
    from pykvm.errors import BootError
    out = bzimage.with_name("vmlinux")
    if out.exists():
        return out
    try:
        elf = payload_elf(str(bzimage))
    except BootError as e:
        raise FetchError(str(e)) from None
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--refresh", action="store_true",
                   help="resolve the metapackage again and fetch a newer kernel if there is one")
    p.add_argument("--vmlinux", action="store_true",
                   help="also extract the uncompressed ELF kernel; print both paths")
    args = p.parse_args(argv)
    try:
        kernel = fetch_kernel(refresh=args.refresh)
        print(kernel)
        if args.vmlinux:
            print(extract_vmlinux(kernel))
    except FetchError as e:
        print(f"fetch-kernel: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
