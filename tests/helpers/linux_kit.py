"""The Linux test kit: Debian's cloud kernel and an initramfs that runs a script.

    python -m tests.helpers.linux_kit            # build if needed; print kernel and initrd
    python -m tests.helpers.linux_kit --check    # build again in a temporary folder, compare bytes

Everything comes from Debian packages fetched with `apt-get download` and taken
apart with `dpkg-deb -x` (nothing is installed on the host):

- the kernel and its modules: tests/helpers/linux_kernel.py (build/linux/current);
- busybox from busybox-static, with a link per applet;
- mkfs.ext4, e2fsck/fsck.ext4 and mke2fs.conf from e2fsprogs, and fio; their shared
  libraries (the closure `ldd` reports for the extracted binaries) come from the
  packages that own them (`dpkg -S`), fetched at the archive's candidate version;
- the modules the kit needs (``MODULES``: virtio over PCI and MMIO, virtio-blk, ext4
  and its helpers) unless `modules.builtin` says they are built in, with their
  dependencies from each module's .modinfo, in load order;
- ``INIT``: mounts proc, sysfs and devtmpfs, prints ``KIT-INIT uptime=<s>``, loads the
  modules, decodes ``kit.run=<base64 of gzip of a shell script>`` from the kernel
  command line, prints ``KIT-BEGIN``, runs it, prints ``KIT-EXIT <status>`` and powers
  off; without ``kit.run=`` it starts a shell on the console.

The initramfs is a newc cpio compressed with gzip, reproducible: entries sorted, mtimes
0, owner 0:0, inode numbers in order, gzip header without name or time. It is cached
in build/linux-kit/<key>/initrd.img, where the key hashes every input: the kernel
package and version, the name and version of every package a file comes from, and
this file's text (the init script and the module list live here). The .debs are kept
in build/linux-kit/debs/.

``run_tcg`` boots the kit in QEMU with TCG (a stock kernel cannot run on this
machine's KVM, kvm_pvm) and returns the script's exit status and the console.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

from tests.helpers import linux_kernel
from tests.helpers.linux_kernel import FetchError

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "linux-kit"
DEBS = CACHE / "debs"
QEMU = "qemu-system-x86_64"
COMMAND_LINE_SIZE = 2048  # x86's limit, including the terminating NUL

# Modules to load (with what they depend on) unless built in. virtio_pci_*_dev are
# virtio_pci's helpers; ext4's helpers are listed so that a kernel building them as
# modules still gets them.
MODULES = ("virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_mmio", "virtio_blk",
           "crc16", "crc32c_generic", "mbcache", "jbd2", "ext4")

# Files taken from packages: package -> paths in its tree (installed at the same
# path in the initramfs). Their shared libraries are added by _library_closure.
PROGRAMS = {
    "e2fsprogs": ("sbin/mke2fs", "sbin/e2fsck", "etc/mke2fs.conf"),
    "fio": ("usr/bin/fio",),
}
# Links in the initramfs: path -> target (the programs' Debian names).
LINKS = {
    "sbin/mkfs.ext4": "mke2fs",
    "sbin/fsck.ext4": "e2fsck",
}
BUSYBOX_PACKAGE = "busybox-static"

INIT = r"""#!/bin/sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read up rest < /proc/uptime
echo "KIT-INIT uptime=$up"
while read m; do
    insmod "$m" || echo "kit: insmod $m failed"
done < /etc/kit/modules
run=
for w in $(cat /proc/cmdline); do
    case "$w" in kit.run=*) run="${w#kit.run=}" ;; esac
done
if [ -z "$run" ]; then
    echo "kit: no kit.run= on the command line: starting a shell"
    exec setsid cttyhack sh
fi
echo "$run" | base64 -d | gunzip > /tmp/kit-run.sh || echo "kit: cannot decode kit.run="
echo "KIT-BEGIN"
sh /tmp/kit-run.sh
echo "KIT-EXIT $?"
sync
poweroff -f
"""


class KitError(Exception):
    """The kit could not be built, or a run went wrong (the message says how)."""

    def __init__(self, message: str, console: str = ""):
        super().__init__(message)
        self.console = console


# ----------------------------------------------------------------------------
# cpio (newc) and gzip


@dataclasses.dataclass(frozen=True)
class Entry:
    """One cpio member: ``path`` without a leading slash; ``data`` is a symlink's target."""
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def cpio_newc(entries) -> bytes:
    """A newc archive of ``entries``, sorted by path, every time stamp 0, owner 0:0."""
    out = io.BytesIO()
    ordered = sorted(entries, key=lambda e: e.path.split("/"))
    paths = [e.path for e in ordered]
    if len(set(paths)) != len(paths):
        raise KitError("cpio: duplicate paths " + ", ".join(sorted({p for p in paths
                                                                     if paths.count(p) > 1})))

    def member(ino, mode, name, data, nlink, rdev=(0, 0)):
        name = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        out.write(header + name + _pad4(len(header) + len(name)))
        out.write(data + _pad4(len(data)))

    for ino, e in enumerate(ordered, start=1):
        member(ino, e.mode, e.path, e.data, 2 if stat.S_ISDIR(e.mode) else 1, e.rdev)
    member(0, 0, "TRAILER!!!", b"", 1)
    return out.getvalue()


@dataclasses.dataclass(frozen=True)
class Member:
    """A member as read back, with the header fields the writer fixes."""
    path: str
    mode: int
    data: bytes
    rdev: tuple[int, int]
    ino: int
    uid: int
    gid: int
    nlink: int
    mtime: int


def read_cpio_newc(blob: bytes) -> list[Member]:
    """The members of a newc archive up to its trailer (for tests and --check)."""
    members, pos = [], 0
    while True:
        if blob[pos:pos + 6] != b"070701":
            raise KitError(f"cpio: no newc magic at offset {pos}")
        try:
            f = [int(blob[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise KitError(f"cpio: bad header at offset {pos}") from None
        ino, mode, uid, gid, nlink, mtime, size = f[:7]
        namesize = f[11]
        pos += 110
        name = blob[pos:pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        data = blob[pos:pos + size]
        if len(data) != size:
            raise KitError(f"cpio: {name} is cut short")
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return members
        members.append(Member(name, mode, data, (f[9], f[10]), ino, uid, gid, nlink, mtime))


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no name and time in the header: the same bytes give the same output."""
    return gzip.compress(data, compresslevel=6, mtime=0)


# ----------------------------------------------------------------------------
# Debian packages


def _run(*cmd: str, cwd=None, what: str | None = None) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise KitError(f"{cmd[0]} not found: the kit is built on Debian (apt, dpkg)") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise KitError(f"{what or ' '.join(cmd)} failed ({r.returncode}): {last}")
    return r.stdout


def candidate_versions(packages) -> dict[str, str]:
    """package -> the version `apt-get download` would fetch (amd64 or all)."""
    packages = sorted(set(packages))
    out = _run("apt-cache", "show", "--no-all-versions", *packages,
               what=f"apt-cache show {' '.join(packages)}")
    versions = {}
    for block in out.split("\n\n"):
        p = re.search(r"^Package: (\S+)$", block, re.M)
        v = re.search(r"^Version: (\S+)$", block, re.M)
        if p and v:
            versions.setdefault(p.group(1), v.group(1))
    missing = [p for p in packages if p not in versions]
    if missing:
        raise KitError(f"apt-cache has no version of {', '.join(missing)}")
    return versions


def fetch_deb(package: str, version: str) -> pathlib.Path:
    """The .deb of package=version, downloaded into build/linux-kit/debs/ once."""
    dest = DEBS / f"{package}_{version.replace(':', '%3a')}_amd64.deb"
    alt = dest.with_name(dest.name.replace("_amd64.deb", "_all.deb"))
    for d in (dest, alt):
        if d.exists():
            return d
    DEBS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=DEBS) as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt user may download into it
        _run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
             f"{package}={version}", cwd=tmp, what=f"apt-get download {package}={version}")
        debs = list(pathlib.Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise KitError(f"apt-get download {package}={version} left {len(debs)} .deb files")
        target = dest if debs[0].name.endswith("_amd64.deb") else alt
        os.replace(debs[0], target)
    return target


def _extract(deb: pathlib.Path, into: pathlib.Path) -> pathlib.Path:
    _run("dpkg-deb", "-x", str(deb), str(into))
    return into


def _resolve_in_tree(tree: pathlib.Path, rel: str) -> pathlib.Path | None:
    """``rel`` inside an extracted package, following its symlinks inside the tree."""
    for _ in range(16):
        p = tree / rel
        if p.is_symlink():
            target = os.readlink(p)
            rel = (target.lstrip("/") if target.startswith("/")
                   else os.path.normpath(os.path.join(os.path.dirname(rel), target)))
            continue
        return p if p.is_file() else None
    return None


def _usr_alias(path: str) -> str:
    """/lib/x -> /usr/lib/x and back (Debian 12 is merged-/usr; packages use either)."""
    return path[4:] if path.startswith("/usr/") else "/usr" + path


def _ldd(binary: pathlib.Path) -> list[str]:
    """Absolute paths of the libraries (and the loader) ``binary`` needs, as ldd says."""
    out = _run("ldd", str(binary), what=f"ldd {binary.name}")
    paths = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise KitError(f"ldd {binary.name}: {line} (install the package that has it, "
                           "so the kit can name it)")
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            paths.append(m.group(1))
    return paths


def _owners(paths) -> dict[str, str]:
    """library path -> the Debian package that ships it (`dpkg -S`)."""
    patterns = sorted({"*/" + p.split("/")[-2] + "/" + p.split("/")[-1] for p in paths})
    out = _run("dpkg", "-S", *patterns, what="dpkg -S (owner of fio's and e2fsprogs' libraries)")
    shipped = {}
    for line in out.splitlines():
        if line.startswith("diversion "):
            continue
        pkgs, _, path = line.partition(": ")
        for pkg in pkgs.split(", "):
            shipped.setdefault(path, pkg.split(":")[0])
    owners = {}
    for p in paths:
        pkg = shipped.get(p) or shipped.get(_usr_alias(p))
        if pkg is None:
            raise KitError(f"dpkg -S: no package ships {p}")
        owners[p] = pkg
    return owners


def _library_closure(trees: dict[str, pathlib.Path]) -> dict[str, list[str]]:
    """Library package -> paths its files are installed at, for every ELF in PROGRAMS."""
    needed = set()
    for package, files in PROGRAMS.items():
        for rel in files:
            p = trees[package] / rel
            if p.read_bytes()[:4] == b"\x7fELF":
                needed.update(_ldd(p))
    closure: dict[str, list[str]] = {}
    for path, pkg in _owners(sorted(needed)).items():
        closure.setdefault(pkg, []).append(path)
    return {k: sorted(v) for k, v in sorted(closure.items())}


# ----------------------------------------------------------------------------
# Kernel modules


def _modinfo(ko: pathlib.Path) -> dict[str, str]:
    from elftools.elf.elffile import ELFFile
    with open(ko, "rb") as f:
        section = ELFFile(f).get_section_by_name(".modinfo")
        data = section.data() if section is not None else b""
    info = {}
    for item in data.split(b"\0"):
        key, eq, value = item.decode(errors="replace").partition("=")
        if eq:
            info.setdefault(key, value)
    return info


def module_load_order(modules_dir: pathlib.Path, wanted=MODULES) -> tuple[list[str], list[str]]:
    """(modules to load, dependencies first, as paths under modules_dir; built-in names)."""
    norm = lambda n: n.replace("-", "_")  # noqa: E731
    builtin = {norm(pathlib.Path(line.strip()).name.removesuffix(".ko"))
               for line in (modules_dir / "modules.builtin").read_text().splitlines() if line}
    files = {}
    for ko in sorted((modules_dir / "kernel").rglob("*.ko")):
        files.setdefault(norm(ko.name[:-3]), ko)
    if any((modules_dir / "kernel").rglob("*.ko.*")):
        raise KitError(f"{modules_dir}: compressed modules (.ko.xz/.zst) are not handled")
    order, seen, builtins = [], set(), []

    def visit(name, chain):
        if name in seen:
            return
        if name in chain:
            raise KitError(f"module dependency loop: {' -> '.join(chain + [name])}")
        if name in builtin:
            seen.add(name)
            builtins.append(name)
            return
        ko = files.get(name)
        if ko is None:
            raise KitError(f"kernel module {name} is neither built in nor in {modules_dir}")
        deps = [norm(d) for d in _modinfo(ko).get("depends", "").split(",") if d]
        for d in sorted(deps):
            visit(d, chain + [name])
        seen.add(name)
        order.append(str(ko.relative_to(modules_dir)))

    for name in wanted:
        visit(norm(name), [])
    return order, sorted(builtins)


# ----------------------------------------------------------------------------
# Inputs, key, build


def _source_hash() -> str:
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()


def _closure_file(versions: dict[str, str]) -> pathlib.Path:
    tag = "_".join(f"{p}={versions[p]}" for p in sorted(PROGRAMS))
    return CACHE / "closure" / (hashlib.sha256(tag.encode()).hexdigest()[:16] + ".json")


def resolve_inputs() -> dict:
    """Every input of the build: kernel, package versions, library closure, source hash."""
    linux_kernel.fetch_kernel()
    modules_dir = linux_kernel.fetch_modules()
    kpkg, kver = linux_kernel.current_package()
    top = candidate_versions([BUSYBOX_PACKAGE, *PROGRAMS])
    cfile = _closure_file(top)
    try:
        closure = json.loads(cfile.read_text())
    except (OSError, ValueError):
        with tempfile.TemporaryDirectory() as tmp:
            trees = {p: _extract(fetch_deb(p, top[p]), pathlib.Path(tmp) / p) for p in PROGRAMS}
            closure = _library_closure(trees)
        cfile.parent.mkdir(parents=True, exist_ok=True)
        cfile.write_text(json.dumps(closure, indent=1, sort_keys=True) + "\n")
    libs = candidate_versions(closure)
    inputs = {
        "kernel": {"package": kpkg, "version": kver, "release": modules_dir.name},
        "packages": dict(sorted({**top, **libs}.items())),
        "libraries": closure,
        "source_sha256": _source_hash(),
    }
    inputs["key"] = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return inputs


def build_initrd(inputs: dict) -> bytes:
    """The gzip-compressed initramfs for ``inputs`` (from resolve_inputs)."""
    versions = inputs["packages"]
    modules_dir = linux_kernel.fetch_modules()
    if modules_dir.name != inputs["kernel"]["release"]:
        raise KitError(f"modules are {modules_dir.name}, inputs say {inputs['kernel']['release']}")
    entries: dict[str, Entry] = {}

    def add(e: Entry):
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            entries.setdefault(d, Entry(d, stat.S_IFDIR | 0o755))
        entries[e.path] = e

    def add_file(path: str, src: pathlib.Path):
        mode = 0o755 if os.stat(src).st_mode & 0o111 else 0o644
        add(Entry(path, stat.S_IFREG | mode, src.read_bytes()))

    for d in ("proc", "sys", "dev", "tmp", "mnt", "run", "root", "etc/kit"):
        add(Entry(d, stat.S_IFDIR | (0o1777 if d == "tmp" else 0o755)))
    add(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        bb_tree = _extract(fetch_deb(BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE]), tmp / "bb")
        busybox = bb_tree / "bin" / "busybox"
        applets = _run(str(busybox), "--list-full", what="busybox --list-full").split()
        if "bin/sh" not in applets:
            raise KitError("busybox-static has no sh applet")
        for a in applets:
            if a != "bin/busybox" and "/" in a:
                add(Entry(a, stat.S_IFLNK | 0o777, b"/bin/busybox"))
        add_file("bin/busybox", busybox)

        for package, files in PROGRAMS.items():
            tree = _extract(fetch_deb(package, versions[package]), tmp / package)
            for rel in files:
                src = _resolve_in_tree(tree, rel)
                if src is None:
                    raise KitError(f"{package} {versions[package]} has no {rel}")
                add_file(rel, src)
        for path, target in LINKS.items():
            add(Entry(path, stat.S_IFLNK | 0o777, target.encode()))

        for package, paths in inputs["libraries"].items():
            tree = _extract(fetch_deb(package, versions[package]), tmp / ("lib-" + package))
            for path in paths:
                src = (_resolve_in_tree(tree, path.lstrip("/"))
                       or _resolve_in_tree(tree, _usr_alias(path).lstrip("/")))
                if src is None:
                    raise KitError(f"{package} {versions[package]} has no {path}")
                add_file(path.lstrip("/"), src)
            shutil.rmtree(tree)

    order, _ = module_load_order(modules_dir)
    guest_dir = f"lib/modules/{modules_dir.name}"
    for rel in order:
        add_file(f"{guest_dir}/{rel}", modules_dir / rel)
    add(Entry("etc/kit/modules", stat.S_IFREG | 0o644,
              "".join(f"/{guest_dir}/{rel}\n" for rel in order).encode()))
    add(Entry("etc/kit/inputs.json", stat.S_IFREG | 0o644,
              (json.dumps(inputs, indent=1, sort_keys=True) + "\n").encode()))
    add(Entry("init", stat.S_IFREG | 0o755, INIT.encode()))
    return gzip_bytes(cpio_newc(entries.values()))


@dataclasses.dataclass(frozen=True)
class Kit:
    kernel: pathlib.Path
    initrd: pathlib.Path
    key: str


def kit() -> Kit:
    """The kit for the current inputs, built into build/linux-kit/<key>/ if needed."""
    try:
        inputs = resolve_inputs()
        kernel = linux_kernel.fetch_kernel()
    except FetchError as e:
        raise KitError(str(e)) from None
    dest = CACHE / inputs["key"]
    initrd = dest / "initrd.img"
    if not initrd.exists():
        blob = build_initrd(inputs)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tmp = pathlib.Path(tmp)
            (tmp / "initrd.img").write_bytes(blob)
            (tmp / "inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
            os.chmod(dest, 0o755)
        for old in CACHE.iterdir():  # kits built from other inputs are stale now
            if old != dest and re.fullmatch(r"[0-9a-f]{16}", old.name) and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return Kit(kernel, initrd, inputs["key"])


def check_reproducible() -> tuple[Kit, bool]:
    """Build the initramfs again into a temporary folder; compare it byte for byte."""
    k = kit()
    with tempfile.TemporaryDirectory() as tmp:
        again = pathlib.Path(tmp) / "initrd.img"
        again.write_bytes(build_initrd(resolve_inputs()))
        return k, again.read_bytes() == k.initrd.read_bytes()


# ----------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class Result:
    rc: int                          # the script's exit status (KIT-EXIT)
    console: str                     # the serial console, \r\n -> \n
    boot_to_init_s: float | None     # the kernel's uptime when /init started
    wall_s: float                    # QEMU's run time, start to exit
    output: str = ""                 # what the script printed (between KIT-BEGIN and KIT-EXIT)


def encode_script(script: str) -> str:
    """The kit.run= value: base64 of gzip (no header time) of the script."""
    return base64.b64encode(gzip.compress(script.encode(), 9, mtime=0)).decode()


def kernel_cmdline(script: str | None, extra: str = "") -> str:
    parts = ["console=ttyS0", "quiet", "panic=-1", extra.strip()]
    if script is not None:
        parts.append("kit.run=" + encode_script(script))
    line = " ".join(p for p in parts if p)
    if len(line) >= COMMAND_LINE_SIZE:
        raise KitError(f"kernel command line is {len(line)} bytes (x86 allows "
                       f"{COMMAND_LINE_SIZE - 1}): shorten the script")
    return line


def qemu_command(k: Kit, script: str | None, *, qemu_args=(), mem: str = "512M",
                 shared_mem: bool = False, cpus: int = 1, machine: str = "pc",
                 cmdline_extra: str = "") -> list[str]:
    """The QEMU TCG command line that boots ``k`` and runs ``script`` (console on stdio).

    ``shared_mem`` backs guest RAM with a shared memfd (what vhost-user back-ends need
    to map it); ``qemu_args`` go last (-chardev, -device, -drive, ...).
    """
    if shared_mem:
        mem_args = ["-m", mem, "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
                    "-machine", f"{machine},memory-backend=mem"]
    else:
        mem_args = ["-m", mem, "-machine", machine]
    # maxcpus >= 2 with shared memory: with one possible vCPU, TCG drops the
    # guest's memory barriers (no other vCPU could tell), but a vhost-user
    # back-end in another process can: Linux's smp_mb() between writing
    # used_event and re-reading used->idx then orders nothing, and an
    # interrupt is lost now and then (measured: about 1 boot in 10 hung with
    # 32 requests completed and unseen; none in 48 with maxcpus=2)
    smp = f"{cpus},maxcpus={max(cpus, 2)}" if shared_mem else str(cpus)
    return [QEMU, "-accel", "tcg", *mem_args, "-smp", smp,
            "-nodefaults", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(k.kernel), "-initrd", str(k.initrd),
            "-append", kernel_cmdline(script, cmdline_extra), *map(str, qemu_args)]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def run_tcg(k: Kit, script: str, *, qemu_args=(), mem: str = "512M", shared_mem: bool = False,
            cpus: int = 1, machine: str = "pc", cmdline_extra: str = "",
            timeout: float = 120) -> Result:
    """Boot ``k`` in QEMU (TCG), run ``script`` with busybox sh, return its exit status.

    Raises KitError (with the console tail in the message and .console) when QEMU is
    missing or fails, the timeout passes (QEMU is killed) or no KIT-EXIT line comes.
    """
    if shutil.which(QEMU) is None:
        raise KitError(f"{QEMU} not found: the Makefile installs qemu-system-x86")
    cmd = qemu_command(k, script, qemu_args=qemu_args, mem=mem, shared_mem=shared_mem,
                       cpus=cpus, machine=machine, cmdline_extra=cmdline_extra)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        console = out.decode(errors="replace").replace("\r\n", "\n")
        raise KitError(f"QEMU timed out after {timeout:g} s; console tail:\n{_tail(console)}",
                       console) from None
    wall = time.monotonic() - start
    return parse_console(out, err, proc.returncode, wall)


def parse_console(out: bytes, err: bytes, status: int, wall: float) -> Result:
    """The Result of a finished QEMU run from its stdout (the console) and stderr."""
    console = out.decode(errors="replace").replace("\r\n", "\n")
    exits = list(re.finditer(r"KIT-EXIT (\d+)$", console, re.M))
    m = exits[-1] if exits else None
    if m is None:
        raise KitError(f"no KIT-EXIT line (QEMU status {status}"
                       f"{': ' + err.decode(errors='replace').strip() if err.strip() else ''}); "
                       f"console tail:\n{_tail(console)}", console)
    up = re.search(r"KIT-INIT uptime=([0-9.]+)$", console, re.M)
    begin = console.find("KIT-BEGIN\n")
    output = console[begin + len("KIT-BEGIN\n"):m.start()] if begin >= 0 else ""
    return Result(int(m.group(1)), console, float(up.group(1)) if up else None, wall, output)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="build the initramfs again and compare it byte for byte with the cache")
    args = p.parse_args(argv)
    try:
        if args.check:
            k, same = check_reproducible()
            print(k.kernel)
            print(k.initrd, flush=True)
            if not same:
                print(f"linux-kit: a second build of {k.initrd} differs", file=sys.stderr)
                return 1
            print("linux-kit: reproducible (a second build is byte-identical)", file=sys.stderr)
            return 0
        k = kit()
        print(k.kernel)
        print(k.initrd)
    except KitError as e:
        print(f"linux-kit: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
