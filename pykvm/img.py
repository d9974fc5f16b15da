"""``pykvm img``: qemu-img's subcommands, flags, output and exit codes where
they exist, over pykvm's block drivers.

  create   [-f FMT] [-o OPTS] [-b BACKING [-F FMT]] [-u] FILE [SIZE]
  info     [-f FMT] [--output human|json] [--backing-chain] FILE
  check    [-f FMT] [--output human|json] [-r leaks|all] [-p] FILE  (0 clean, 2 corrupt, 3 leaks)
  map      [-f FMT] [--output human|json] FILE
  amend    [-f qcow2] [-p] [--force] -o OPTS FILE
  dd       [-f FMT] [-O FMT] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT
  bench    [-c N] [-d N] [-s SIZE] [-S STEP] [-o OFF] [-t CACHE] [-i AIO] [-n] [-w]
           [--pattern B] [--flush-interval N] [--no-drain] [-f FMT] FILE
  measure  [--output human|json] [-O FMT] [-o OPTS] (--size SIZE | [-f FMT] [-l SN] FILE)
  convert  [-f FMT] [-O FMT] [-o OPTS] [-c] [-p] [-n] [-B BACKING [-F FMT]] SRC DST
  compare  [-f FMT] [-F FMT] [-s] [-p] IMG1 IMG2            (0 same, 1 different, 2 error)
  commit   [-f FMT] [-d] [-p] FILE
  rebase   [-f FMT] [-u] [-p] -b BACKING [-F FMT] FILE
  resize   [-f FMT] [--shrink] FILE [+|-]SIZE
  snapshot [-l | -c NAME | -a NAME | -d NAME] FILE
  dedup    [-f FMT] [-p] [--dry-run] [--min-refs N] [--chain] FILE

Every error is one line, ``pykvm img: <what>``. Images are opened read-only
unless the command writes them, and every check that can refuse a command
runs before anything is written. Each subcommand takes qemu-img's image
locks for it (block/locking.py: ``img_use``); the read-only ones take ``-U``
(force-share) as qemu-img's do. Wherever a FILE is named, a ``json:{...}``
name of the node's options works too, and ``--image-opts`` takes the names
as dotted options (``driver=qcow2,file.filename=a.qcow2``).
"""
from __future__ import annotations

import os
import sys
import time

from .block import qcow2 as _qcow2  # noqa: F401  (registers the driver)
from .block.driver import (FORMATS, ZEROES, BlockError, open_image, pread_full, probe_format,
                           pwrite_full, read_into, write_range, write_zeroes_range)
from .block.locking import img_use
from .block.qcow2 import Qcow2Driver
from .block.file import FALLOC_KEEP_SIZE, fallocate
from .block.raw import RawDriver
from .errors import PykvmError

CHUNK = 2 << 20
_UNITS = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


class ImgError(PykvmError):
    """A user-facing failure of a ``pykvm img`` command (one line)."""

    def __init__(self, msg: str, status: int = 1):
        super().__init__(msg)
        self.exit_status = status


def _parser_class():
    """argparse is imported here, not at start-up: ``convert``'s plain
    command lines are parsed without it (see _fast_convert_args)."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit status 1 as qemu-img
            print(f"pykvm img: {self.prog}: {message}", file=sys.stderr)
            sys.exit(1)
    return _Parser


def parse_size(text: str) -> int:
    t = text.strip()
    unit = t[-1:].upper() if t[-1:].isalpha() else ""
    num = t[:-1] if unit else t
    if unit not in _UNITS:
        raise ImgError(f"invalid size {text!r}")
    try:
        value = float(num) if "." in num else int(num)
    except ValueError:
        raise ImgError(f"invalid size {text!r}") from None
    size = int(value * (1 << _UNITS[unit]))
    if size < 0:
        raise ImgError(f"invalid size {text!r}")
    return size


def _onoff(key: str, v: str) -> bool:
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise ImgError(f"option {key}: expected on or off, not {v!r}")


def parse_options(fmt: str, text_list: list[str]) -> dict:
    """``-o key=value,...`` into create() keyword arguments."""
    out: dict = {}
    for text in text_list:
        for item in filter(None, text.split(",")):
            key, _, v = item.partition("=")
            key = key.strip()
            if key in ("cluster_size",):
                out[key] = parse_size(v)
            elif key in ("refcount_bits",):
                try:
                    out[key] = int(v)
                except ValueError:
                    raise ImgError(f"option {key}: not a number: {v!r}") from None
            elif key in ("lazy_refcounts", "extended_l2", "data_file_raw"):
                out[key] = _onoff(key, v)
            elif key in ("compat", "backing_file", "backing_fmt", "compression_type",
                         "preallocation", "data_file"):
                out[key] = v
            elif key == "size":
                out[key] = parse_size(v)
            else:
                raise ImgError(f"invalid option {key!r} for format {fmt!r}")
    allowed = {"raw": {"preallocation", "size"}}.get(fmt)
    if allowed is not None:
        bad = sorted(set(out) - allowed)
        if bad:
            raise ImgError(f"format {fmt!r} does not support option(s) {', '.join(bad)}")
    return out


def _fmt_of(path: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise ImgError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
        return fmt
    if path.startswith("json:"):        # options of a whole node: its driver, or probed
        from .block.graph import parse_json_filename
        spec = parse_json_filename(path)
        if spec.get("driver") in FORMATS:
            return spec["driver"]
        drv = open_image(path, None, read_only=True, open_backing=False)
        try:
            return drv.format_name
        finally:
            drv.close()
    from .block.graph import filename_spec
    if filename_spec(path)["driver"] != "file":
        # an NBD URI, a blkdebug: name: probed through the node it names, as
        # the guest would see it (the server's first bytes)
        try:
            drv = open_image(path, None, read_only=True, open_backing=False)
        except BlockError as e:
            why = e.why.removeprefix(f"file '{path}': ")
            raise ImgError(f"could not open '{path}': {why}", e.exit_status) from None
        try:
            return drv.format_name
        finally:
            drv.close()
    if not os.path.exists(path):
        raise ImgError(f"could not open '{path}': No such file or directory")
    return probe_format(path)


def _leaf(node):
    """The protocol node under a format node (through raw, filters): where its
    bytes are (a file, or an NBD server)."""
    while node.kind != "protocol":
        file = getattr(node, "file", None) or getattr(node, "image", None)
        if file is None:
            break
        node = file
    return node


def _local_size(node) -> int | None:
    """The bytes a node's protocol leaf takes on the host's disks (qemu-img's
    actual-size), or None where it is not a local file (an NBD export:
    "disk size: unavailable")."""
    leaf = _leaf(node)
    if leaf.format_name not in ("file", "host_device") or getattr(leaf, "fd", -1) < 0:
        return None
    return os.fstat(leaf.fd).st_blocks * 512


def _open(path: str, fmt: str | None, writable: bool = False, backing: bool = True, use=None,
          **kw):
    """Open an image for a subcommand, holding the image locks ``use``
    (locking.img_use: what qemu-img takes for the same command)."""
    fmt = _fmt_of(path, fmt)
    if fmt != "qcow2":
        kw.pop("repair", None)
    return open_image(path, fmt, read_only=not writable, open_backing=backing, use=use, **kw)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """``-p``: how far a long command is. On a terminal, a tqdm bar; anywhere
    else, qemu-img's display: ``    (x.xx/100%)`` and a carriage return each
    time the share done grows by a whole percent, 100% and a newline at the
    end. It goes to stdout as qemu-img's does (``stream``: dedup keeps
    stdout for its result). Disabled, it does nothing, so commands call it
    unconditionally: ``progress(done, total)``, then ``progress.close()``."""

    def __init__(self, enabled: bool, stream=None, desc: str = ""):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.bar = None
        self.shown = -1.0
        if enabled and self.stream.isatty():
            import shutil

            from tqdm import tqdm
            # (a terminal that says it is 0 by 0 gets 80 by 24: tqdm would draw nothing)
            cols, rows = shutil.get_terminal_size()
            self.bar = tqdm(total=100.0, file=self.stream, desc=f"{desc}:" if desc else "",
                            leave=True, ncols=cols,
                            nrows=rows,
                            bar_format="{desc}{percentage:7.2f}%|{bar}| [{elapsed}<{remaining}]")

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        pct = min(100.0, 100.0 * done / total) if total else 100.0
        if pct < self.shown + 1.0 and not (pct == 100.0 and self.shown < 100.0):
            return
        if self.bar is not None:
            self.bar.update(pct - self.bar.n)
        else:
            self.stream.write(f"    ({pct:.2f}/100%)\r")
            self.stream.flush()
        self.shown = pct

    def close(self, finished: bool = True) -> None:
        """100% (when ``finished``), and the display ends (a newline)."""
        if not self.enabled or self.shown is None:
            return
        if finished:
            self(1, 1)
        if self.bar is not None:
            self.bar.close()
        else:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(finished=exc_type is None)


# -- create -----------------------------------------------------------------------------

def cmd_create(a) -> int:
    fmt = a.f or "raw"
    opts = parse_options(fmt, a.o)
    if a.b:
        opts["backing_file"] = a.b
    if a.F:
        opts["backing_fmt"] = a.F
    size = parse_size(a.size) if a.size is not None else opts.pop("size", None)
    opts.pop("size", None)
    if fmt not in ("raw", "qcow2"):
        raise ImgError(f"unknown format {fmt!r} (raw or qcow2)")
    if fmt == "raw" and ("backing_file" in opts):
        raise ImgError("raw images cannot have a backing file")
    bf = opts.get("backing_file")
    if bf:
        bpath = bf if os.path.isabs(bf) else os.path.join(os.path.dirname(
            os.path.abspath(a.filename)), bf)
        if os.path.realpath(bpath) == os.path.realpath(a.filename):
            raise ImgError(f"{a.filename}: an image cannot be its own backing file")
        if not a.u or size is None:
            try:
                b = open_image(bpath, opts.get("backing_fmt"), read_only=True)
            except BlockError as e:
                raise ImgError(f"could not open backing file: {e}") from None
            opts.setdefault("backing_fmt", b.format_name)
            if size is None:
                size = b.size
            b.close()
    if size is None:
        raise ImgError("image size must be specified")
    shown = " ".join(f"{k}={({True: 'on', False: 'off'}.get(v, v) if isinstance(v, bool) else v)}"
                     for k, v in sorted(opts.items()))
    print(f"Formatting '{a.filename}', fmt={fmt} {shown + ' ' if shown else ''}size={size}")
    if fmt == "raw":
        RawDriver.create(a.filename, size, **opts)
    else:
        Qcow2Driver.create(a.filename, size, **opts)
    return 0


# -- info -------------------------------------------------------------------------------

def _info_dict(path: str, fmt: str | None, force_share: bool = False) -> dict:
    drv = _open(path, fmt, backing=False, use=img_use(io=False, force_share=force_share))
    try:
        d = {"virtual-size": drv.size, "filename": path, "format": drv.format_name}
        actual = _local_size(drv)
        if actual is not None:          # a local file (qemu-img: its allocated size)
            d["actual-size"] = actual
            d["dirty-flag"] = False     # (QEMU's nbd driver has no get_info: no dirty flag)
        d["children"] = _children_info(drv)
        if isinstance(drv, Qcow2Driver):
            d["cluster-size"] = drv.cluster_size
            d["dirty-flag"] = bool(drv.h.incompat & 1)
            d["format-specific"] = {"type": "qcow2", "data": drv.info()}
            if drv.h.backing_file:
                d["backing-filename"] = drv.h.backing_file
                d["full-backing-filename"] = drv._relative(drv.h.backing_file) \
                    if not os.path.isabs(drv.h.backing_file) and os.path.isabs(path) \
                    else os.path.join(os.path.dirname(path), drv.h.backing_file) \
                    if not os.path.isabs(drv.h.backing_file) else drv.h.backing_file
                if drv.h.backing_fmt:
                    d["backing-filename-format"] = drv.h.backing_fmt
            if drv.snapshots:
                d["snapshots"] = [{"icount": s.icount if s.icount not in (None, (1 << 64) - 1)
                                   else 0, "name": s.name,
                                   "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                                   "vm-clock-sec": s.vm_clock_nsec // 10**9,
                                   "id": s.id, "vm-clock-nsec": s.vm_clock_nsec % 10**9,
                                   "vm-state-size": s.vm_state_size} for s in drv.snapshots]
        return d
    finally:
        drv.close()


def _children_info(node) -> list[dict]:
    """The protocol and format children of a node (not its backing file, which
    --backing-chain describes), as qemu-img lists them: name and info."""
    out = []
    for role, child in node.children:
        if role == "backing":
            continue
        info = {"children": _children_info(child), "virtual-size": child.size,
                "filename": child.filename, "format": child.format_name,
                "format-specific": {"type": child.format_name, "data": {}}}
        actual = _local_size(child)
        if actual is not None:
            info["actual-size"] = actual
            info["dirty-flag"] = False
        out.append({"name": role, "info": info})
    return out


def _children_lines(children: list[dict], prefix: str = "") -> list[str]:
    """qemu-img info's "Child node '/file':" sections."""
    lines = []
    for c in children:
        i = c["info"]
        path = f"{prefix}/{c['name']}"
        lines.append(f"Child node '{path}':")
        lines.append(f"    filename: {i['filename']}")
        if i["format"] in ("file", "host_device", "nbd"):
            lines.append(f"    protocol type: {i['format']}")
            lines.append(f"    file length: {_human(i['virtual-size'])} ({i['virtual-size']} "
                         f"bytes)")
        else:
            lines.append(f"    file format: {i['format']}")
            lines.append(f"    virtual size: {_human(i['virtual-size'])} "
                         f"({i['virtual-size']} bytes)")
        lines.append(f"    disk size: {_disk_size(i)}")
        lines += _children_lines(i["children"], path)
    return lines


def _disk_size(d: dict) -> str:
    return _human(d["actual-size"]) if "actual-size" in d else "unavailable"


def cmd_info(a) -> int:
    import json
    chain = []
    path, fmt = a.filename, a.f
    seen = set()
    while path:
        if os.path.realpath(path) in seen:
            raise ImgError(f"{path}: backing file loop")
        seen.add(os.path.realpath(path))
        d = _info_dict(path, fmt, a.U)
        chain.append(d)
        if not a.backing_chain or "full-backing-filename" not in d:
            break
        path, fmt = d["full-backing-filename"], d.get("backing-filename-format")
    if a.output == "json":
        print(json.dumps(chain if a.backing_chain else chain[0], indent=4))
        return 0
    for i, d in enumerate(chain):
        if i:
            print()
        lines = [f"image: {d['filename']}", f"file format: {d['format']}",
                 f"virtual size: {_human(d['virtual-size'])} ({d['virtual-size']} bytes)",
                 f"disk size: {_disk_size(d)}"]
        if "cluster-size" in d:
            lines.append(f"cluster_size: {d['cluster-size']}")
        if "backing-filename" in d:
            lines.append(f"backing file: {d['backing-filename']}")
            if "backing-filename-format" in d:
                lines.append(f"backing file format: {d['backing-filename-format']}")
        if d.get("snapshots"):
            lines.append("Snapshot list:")
            lines += _snapshot_table(d["snapshots"])
        if "format-specific" in d:
            lines.append("Format specific information:")
            for k, v in d["format-specific"]["data"].items():
                v = str(v).lower() if isinstance(v, bool) else v
                lines.append(f"    {k.replace('-', ' ')}: {v}")
        lines += _children_lines(d["children"])
        print("\n".join(lines))
    return 0


def _snapshot_table(snaps: list[dict]) -> list[str]:
    out = [f"{'ID':<10}{'TAG':<18}{'VM SIZE':>7}{'DATE':>24}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}." \
                f"{s['vm-clock-nsec'] // 1000000:03d}"
        out.append(f"{s['id']:<10}{s['name']:<18}{_human(s['vm-state-size']):>7}{date:>24}"
                   f"{clock:>13}{s['icount']:>11}")
    return out


# -- check ------------------------------------------------------------------------------

def cmd_check(a) -> int:
    import json
    fmt = _fmt_of(a.filename, a.f)
    if fmt != "qcow2":
        print("This image format does not support checks", file=sys.stderr)
        return 63
    if a.U and a.r:
        raise ImgError("force-share (-U) can only be used with read-only images")
    drv = _open(a.filename, fmt, writable=bool(a.r), backing=False, repair=False,
                use=img_use(writes=bool(a.r), force_share=a.U))
    progress = Progress(a.p, stream=sys.stderr, desc="check")    # (stdout: the report)
    try:
        res = drv.check(repair=a.r, progress=progress)
        if a.r:
            dirty = drv.h.incompat & 1
            if dirty:
                drv._set_incompat(drv.h.incompat & ~1)
                drv._marked_dirty = False
            if res["leaks_fixed"] or res["corruptions_fixed"]:
                first = res
                res = drv.check()
                res["leaks_fixed"], res["corruptions_fixed"] = first["leaks_fixed"], \
                    first["corruptions_fixed"]
        progress.close()
    finally:
        progress.close(finished=False)
        drv.close()
    if a.output == "json":
        d = {"image-end-offset": res["image_end_offset"], "total-clusters": res["total_clusters"],
             "check-errors": 0, "allocated-clusters": res["allocated_clusters"],
             "filename": a.filename, "format": "qcow2"}
        for key, name in (("leaks", "leaks"), ("corruptions", "corruptions"),
                          ("leaks_fixed", "leaks-fixed"),
                          ("corruptions_fixed", "corruptions-fixed"),
                          ("compressed_clusters", "compressed-clusters"),
                          ("fragmented_clusters", "fragmented-clusters")):
            if res[key]:
                d[name] = res[key]
        print(json.dumps(d, indent=4))
    else:
        out = []
        if res["leaks_fixed"] or res["corruptions_fixed"]:
            out += ["The following inconsistencies were found and repaired:", "",
                    f"    {res['leaks_fixed']} leaked clusters",
                    f"    {res['corruptions_fixed']} corruptions", "",
                    "Double checking the fixed image now..."]
        for e in res["errors"][:20]:
            out.append(f"ERROR {e}")
        if res["corruptions"]:
            out += [f"{res['corruptions']} errors were found on the image.",
                    "Data may be corrupted, or further writes to the image may corrupt it."]
        if res["leaks"]:
            out += [f"{res['leaks']} leaked clusters were found on the image.",
                    "This means waste of disk space, but no harm to data."]
        if not res["corruptions"] and not res["leaks"]:
            out.append("No errors were found on the image.")
        total = res["total_clusters"] or 1
        alloc = res["allocated_clusters"] or 1     # qemu-img: fragmented and compressed
        if res["allocated_clusters"] and res["total_clusters"]:     # as qemu-img
            out.append(f"{res['allocated_clusters']}/{res['total_clusters']} = "
                       f"{100.0 * res['allocated_clusters'] / total:.2f}% allocated, "
                       f"{100.0 * res['fragmented_clusters'] / alloc:.2f}% fragmented, "
                       f"{100.0 * res['compressed_clusters'] / alloc:.2f}% compressed "
                       f"clusters")
        out.append(f"Image end offset: {res['image_end_offset']}")
        print("\n".join(out))
    if res["corruptions"]:
        return 2
    if res["leaks"]:
        return 3
    return 0


# -- map --------------------------------------------------------------------------------

def _block_status(drv, offset: int, length: int, depth: int = 0):
    """(start, length, depth, present, zero, data, host offset or None, file) runs."""
    end = offset + length
    inside = min(end, drv.size)
    if isinstance(drv, RawDriver) or drv.kind == "protocol":     # (a bare nbd node too)
        for off, n, data in drv.allocated(offset, max(0, inside - offset)):
            yield off, n, depth, True, not data, data, off, drv.path
    else:
        for e in drv.map(offset, max(0, inside - offset)):
            if e.kind == "data":
                yield e.offset, e.length, depth, True, False, True, e.host_offset, \
                    getattr(drv, "data_path", None) or drv.path
            elif e.kind == "compressed":
                yield e.offset, e.length, depth, True, False, True, None, drv.path
            elif e.kind == "zero":
                yield e.offset, e.length, depth, True, True, False, None, drv.path
            elif drv.backing is not None:
                yield from _block_status(drv.backing, e.offset, e.length, depth + 1)
            else:
                yield e.offset, e.length, depth, False, True, False, None, drv.path
    if inside < end:
        yield max(inside, offset), end - max(inside, offset), depth, False, True, False, None, \
            drv.path


def _merged_status(drv):
    runs = []
    pos = 0
    while pos < drv.size:
        n = min(CHUNK * 64, drv.size - pos)
        for r in _block_status(drv, pos, n):
            if runs:
                p = runs[-1]
                if p[2:6] == r[2:6] and p[7] == r[7] and p[0] + p[1] == r[0] and \
                        ((p[6] is None and r[6] is None) or
                         (p[6] is not None and r[6] is not None and p[6] + p[1] == r[6])):
                    runs[-1] = (p[0], p[1] + r[1]) + p[2:]
                    continue
            runs.append(r)
        pos += n
    return runs


def cmd_map(a) -> int:
    import json
    drv = _open(a.filename, a.f, use=img_use(force_share=a.U))
    try:
        runs = _merged_status(drv)
    finally:
        drv.close()
    if a.output == "json":
        lines = []
        for start, n, depth, present, zero, data, off, _ in runs:
            s = (f'{{ "start": {start}, "length": {n}, "depth": {depth}, "present": '
                 f'{json.dumps(present)}, "zero": {json.dumps(zero)}, "data": {json.dumps(data)}')
            if off is not None:
                s += f', "offset": {off}'
            lines.append(s + "}")
        print("[" + ",\n".join(lines) + "]")
    else:
        print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
        for start, n, depth, present, zero, data, off, f in runs:
            if data and off is not None:
                print(f"{start:<#16x}{n:<#16x}{off:<#16x}{f}".replace("0x0 ", "0   "))
    return 0


# -- convert ----------------------------------------------------------------------------

ZERO_BLOCK = bytes(1 << 21)       # one zero block of any granularity up to 2 MiB


def _nonzero_runs(buf: bytearray, n: int, gran: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of buf[:n] left when every all-zero block of
    ``gran`` bytes (aligned to the buffer's start) is taken out. bytearray.find
    looks for a zero block in C; data without one costs a single scan. It looks
    for 4 KiB of zeroes at most (every bigger zero block holds some): long
    needles are slower to look for."""
    zb = ZERO_BLOCK[:gran]
    needle = zb[:4096]
    out = []
    pos = scan = 0
    while True:
        p = buf.find(needle, scan, n)
        if p < 0:
            break
        a = -(-p // gran) * gran           # the first aligned block it may cover
        if a + gran > n:
            break
        if buf.find(zb, a, a + gran) != a:
            scan = a + 1
            continue
        b = a + gran
        while b + gran <= n and buf.find(zb, b, b + gran) == b:
            b += gran
        if a > pos:
            out.append((pos, a - pos))
        pos = scan = b
    if pos < n:
        tail = n - pos
        if tail < gran and n % gran and buf.find(zb[:tail], pos, n) == pos:
            return out                       # the disk's short last block, all zeroes
        out.append((pos, tail))
    return out


def _data_runs(src, size: int) -> list[tuple[int, int]]:
    """(offset, length) of everything in src that may hold data (zero and
    unallocated ranges, through the backing chain, left out), merged."""
    runs: list[tuple[int, int]] = []
    pos = 0
    window = 1 << 30
    while pos < size:
        n = min(window, size - pos)
        for start, length, _, _, zero, _, _, _ in _block_status(src, pos, n):
            if zero:
                continue
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1] = (runs[-1][0], runs[-1][1] + length)
            else:
                runs.append((start, length))
        pos += n
    return runs


def _align_runs(runs, gran: int, size: int) -> list[tuple[int, int]]:
    """Runs widened to whole blocks of ``gran`` bytes (clipped at size), merged."""
    out: list[tuple[int, int]] = []
    for start, length in runs:
        lo = start - start % gran
        hi = min(size, -(-(start + length) // gran) * gran)
        if out and out[-1][0] + out[-1][1] >= lo:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], hi) - out[-1][0])
        else:
            out.append((lo, hi - lo))
    return out


def cmd_convert(a) -> int:
    src = _open(a.src, a.f, use=img_use(stable=True, force_share=a.U))
    try:
        out_fmt = a.O or "raw"
        if out_fmt not in ("raw", "qcow2"):
            raise ImgError(f"unknown output format {out_fmt!r} (raw or qcow2)")
        opts = parse_options(out_fmt, a.o)
        if a.c and out_fmt != "qcow2":
            raise ImgError("compression (-c) needs -O qcow2")
        if a.B:
            opts["backing_file"] = a.B
            if a.F:
                opts["backing_fmt"] = a.F
        if os.path.exists(a.dst) and os.path.realpath(a.dst) == os.path.realpath(a.src):
            raise ImgError("source and destination are the same file")
        size = src.size
        from .block.graph import filename_spec
        # an NBD export (qemu-img's rule for a protocol that cannot create):
        # the image goes into the export as it is, which must be big enough
        exists = a.n or filename_spec(a.dst)["driver"] != "file"
        if not exists:
            if out_fmt == "raw":
                RawDriver.create(a.dst, size, **opts)
            else:
                Qcow2Driver.create(a.dst, size, **opts)
        elif out_fmt != "raw" and not a.n:
            raise ImgError(f"cannot create a {out_fmt} image in '{a.dst}' (make it there, "
                           f"then convert with -n)")
        dst = _open(a.dst, out_fmt, writable=True, use=img_use(writes=True))
        try:
            if exists:
                if dst.size < size:
                    raise ImgError(f"{a.dst}: the target ({dst.size} bytes) is smaller than "
                                   f"the image ({size} bytes): it cannot grow")
                write_zeroes_range(dst, 0, size, unmap=True)  # it holds what it held
            with Progress(a.p, desc="convert") as progress:
                _copy(src, dst, size, a.c, progress, skip_unallocated_in_src=bool(a.B),
                      fresh=not exists)
        finally:
            dst.close()
    finally:
        src.close()
    return 0


COPY_PIECE = 1 << 20


def _copy(src, dst, size: int, compress: bool, progress, skip_unallocated_in_src=False,
          fresh: bool = True):
    """Copy guest content, skipping holes and zeroes (the destination reads
    as zeroes: new, or zeroed; ``fresh``: new, no cluster allocated). The
    source is mapped first; only its data ranges are read, in large pieces;
    all-zero blocks in them are not written (4 KiB for raw, a cluster for
    qcow2, whose clusters stay unallocated). Reader threads
    (two for a raw source, whose preads may run side by side) fill buffers;
    this thread writes them, in order."""
    raw_dst = isinstance(dst, RawDriver)
    cs = getattr(dst, "cluster_size", 65536)
    gran = 4096 if raw_dst else cs
    runs = [(0, size)] if skip_unallocated_in_src else _data_runs(src, size)
    if not raw_dst:
        runs = _align_runs(runs, cs, size)
    piece = max(COPY_PIECE // gran, 1) * gran
    pieces = [(pos, min(piece, start + length - pos))
              for start, length in runs for pos in range(start, start + length, piece)]
    qcow2_new = isinstance(dst, Qcow2Driver) and not compress and fresh
    local_dst = raw_dst and _local_size(dst) is not None     # (else an NBD export's)
    raw_src = isinstance(src, RawDriver)

    def read(pos: int, n: int, buf: bytearray):
        view = memoryview(buf)[:n]
        if raw_src and pos + n <= src.size:
            pread_full(src.fd, view, src.data_at(pos, n))   # (a window: offset=)
        else:
            read_into(src, pos, view)
        return None if compress else _nonzero_runs(buf, n, gran)

    with _Readers(read, pieces, piece, 2 if raw_src and len(pieces) > 2 else 1) as readers:
        for pos, n, buf, nonzero in readers:
            sub = memoryview(buf)[:n]
            if compress:
                _write_compressed(dst, pos, sub, cs)
            else:
                for o, k in nonzero:
                    if raw_dst:
                        if local_dst:       # see Qcow2Driver._grow_file
                            fallocate(dst.fd, FALLOC_KEEP_SIZE, pos + o, k)
                        pwrite_full(dst.fd, sub[o:o + k], pos + o)
                    elif not (qcow2_new and dst.write_new(pos + o, sub[o:o + k])):
                        write_range(dst, pos + o, sub[o:o + k])
            progress(pos + n, size)


class _Readers:
    """Iterates over (pos, n, buf, read(pos, n, buf)) for each piece, in
    order, while ``threads`` reader threads fill buffers ahead (thread k reads
    pieces k, k + threads, ...; two buffers of its own each, a buffer going
    back to its reader when the consumer asks for the next piece). A reader's
    error is raised by the iteration; an error of the consumer stops the
    readers."""

    def __init__(self, read, pieces, piece: int, threads: int):
        import queue
        import threading
        self.read, self.pieces, self.threads = read, pieces, threads
        self.stop = False
        self.free = [queue.SimpleQueue() for _ in range(threads)]
        self.out = [queue.SimpleQueue() for _ in range(threads)]
        for k in range(threads):
            for _ in range(min(2, len(pieces[k::threads]))):
                self.free[k].put(bytearray(piece))
        self.workers = [threading.Thread(target=self._run, args=(k,), name=f"convert-read{k}",
                                         daemon=True) for k in range(threads)]
        for t in self.workers:
            t.start()

    def _run(self, k: int) -> None:
        for pos, n in self.pieces[k::self.threads]:
            buf = self.free[k].get()
            if self.stop:
                return
            try:
                self.out[k].put((pos, n, buf, self.read(pos, n, buf)))
            except BaseException as e:      # noqa: B036  (raised in the consumer)
                self.out[k].put(e)
                return

    def __iter__(self):
        for i in range(len(self.pieces)):
            k = i % self.threads
            item = self.out[k].get()
            if isinstance(item, BaseException):
                raise item
            yield item
            self.free[k].put(item[2])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop = True
        for q in self.free:
            q.put(None)             # wakes a reader waiting for a buffer
        for t in self.workers:
            t.join()


def _write_compressed(dst, start: int, sub: memoryview, cs: int) -> None:
    pos = 0
    n = len(sub)
    while pos < n:
        g = start + pos
        k = min(cs - g % cs, n - pos)
        piece = sub[pos:pos + k]
        if piece != ZEROES[:k]:
            if g % cs == 0 and (k == cs or g + k == dst.size):
                data = bytes(piece) + bytes(cs - k)
                if not dst.write_compressed(g // cs, data):
                    write_range(dst, g, piece)
            else:
                write_range(dst, g, piece)
        pos += k


# -- compare ----------------------------------------------------------------------------

def cmd_compare(a) -> int:
    try:
        one = _open(a.img1, a.f, use=img_use(force_share=a.U))
        two = _open(a.img2, a.F, use=img_use(force_share=a.U))
    except (BlockError, ImgError) as e:
        raise ImgError(str(e), 2) from None
    try:
        if a.s and one.size != two.size:
            print("Strict mode: Image size mismatch!")
            return 1
        common = min(one.size, two.size)
        progress = Progress(a.p, desc="compare")
        b1, b2 = bytearray(CHUNK), bytearray(CHUNK)
        v1, v2 = memoryview(b1), memoryview(b2)
        pos = 0
        while pos < max(one.size, two.size):
            n = min(CHUNK, max(one.size, two.size) - pos)
            if pos < common:
                n = min(n, common - pos)
                read_into(one, pos, v1[:n])
                read_into(two, pos, v2[:n])
                if v1[:n] != v2[:n]:
                    i = next(k for k in range(0, n, 512) if v1[k:k + 512] != v2[k:k + 512])
                    progress.close(finished=False)
                    print(f"Content mismatch at offset {pos + i}!")
                    return 1
            else:
                longer = one if one.size > two.size else two
                read_into(longer, pos, v1[:n])
                if v1[:n] != ZEROES[:n] if n <= len(ZEROES) else any(v1[:n]):
                    i = next(k for k in range(0, n, 512) if any(v1[k:k + 512]))
                    progress.close(finished=False)
                    print(f"Content mismatch at offset {pos + i}!")
                    return 1
            pos += n
            progress(pos, max(one.size, two.size))
        progress.close()
        print("Images are identical.")
        return 0
    except BlockError as e:
        raise ImgError(str(e), 2) from None
    finally:
        one.close()
        two.close()


# -- commit -----------------------------------------------------------------------------

def cmd_commit(a) -> int:
    top = _open(a.filename, a.f, writable=True, backing=False, use=img_use(writes=True))
    try:
        if not isinstance(top, Qcow2Driver) or not top.h.backing_file:
            raise ImgError(f"{a.filename}: image does not have a backing file")
        bpath = top._relative(top.h.backing_file)
        base = open_image(bpath, top.h.backing_fmt, read_only=False, use=img_use(writes=True))
        try:
            if base.size < top.size:
                base.resize(top.size)
            pos = 0
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            progress = Progress(a.p, desc="commit")
            while pos < top.size:
                n = min(CHUNK, top.size - pos)
                for e in top.map(pos, n):
                    if e.kind == "unallocated":
                        continue
                    if e.kind == "zero":
                        write_zeroes_range(base, e.offset, e.length)
                        continue
                    sub = view[:e.length]
                    read_into(top, e.offset, sub)
                    write_range(base, e.offset, sub)
                pos += n
                progress(pos, top.size)
            progress.close()
            base.flush_metadata()
            os.fsync(base.fd)
        finally:
            base.close()
        if not a.d:
            top.make_empty()
    finally:
        top.close()
    print("Image committed.")
    return 0


# -- rebase -----------------------------------------------------------------------------

def cmd_rebase(a) -> int:
    if a.b is None:
        raise ImgError("rebase: -b BACKING is required ('' for no backing file)")
    top = _open(a.filename, a.f, writable=True, backing=not a.u, use=img_use(writes=True))
    try:
        if not isinstance(top, Qcow2Driver):
            raise ImgError(f"{a.filename}: only qcow2 images have a backing file")
        new = None
        new_fmt = a.F
        if a.b:
            npath = a.b if os.path.isabs(a.b) else os.path.join(
                os.path.dirname(os.path.abspath(a.filename)), a.b)
            if os.path.realpath(npath) == os.path.realpath(a.filename):
                raise ImgError(f"{a.filename}: an image cannot be its own backing file")
            try:
                new = open_image(npath, a.F, read_only=True,
                                 chain=frozenset({os.path.realpath(a.filename)}),
                                 use=img_use(force_share=a.U))
            except BlockError as e:
                if not a.u:
                    raise ImgError(f"could not open new backing file: {e}") from None
            if new is not None:
                new_fmt = new_fmt or new.format_name
        try:
            if not a.u:
                with Progress(a.p, desc="rebase") as progress:
                    _rebase_copy(top, new, progress)
        finally:
            if new is not None:
                new.close()
        top.h.backing_file = a.b or None
        top.h.backing_fmt = new_fmt if a.b else None
        top.rewrite_header()
    finally:
        top.close()
    return 0


def _rebase_copy(top: Qcow2Driver, new, progress) -> None:
    """Where the top image is unallocated and the old and new backing chains
    differ, copy the old content into the top image."""
    cs = top.cluster_size
    old_buf, new_buf = bytearray(cs), bytearray(cs)
    ov, nv = memoryview(old_buf), memoryview(new_buf)
    for ci in range(-(-top.size // cs)):
        g = ci * cs
        n = min(cs, top.size - g)
        for e in top.map(g, n):
            if e.kind != "unallocated":
                continue
            o, k = ov[:e.length], nv[:e.length]
            if top.backing is not None:
                read_into(top.backing, e.offset, o)
            else:
                o[:] = ZEROES[:e.length]
            if new is not None:
                read_into(new, e.offset, k)
            else:
                k[:] = ZEROES[:e.length]
            if o != k:
                write_range(top, e.offset, o)
        progress(g + n, top.size)


# -- resize -----------------------------------------------------------------------------

def cmd_resize(a) -> int:
    drv = _open(a.filename, a.f, writable=True, use=img_use(writes=True, resizes=True))
    try:
        text = a.size
        if text.startswith("+"):
            size = drv.size + parse_size(text[1:])
        elif text.startswith("-"):
            size = drv.size - parse_size(text[1:])
        else:
            size = parse_size(text)
        if size < 0:
            raise ImgError("new size would be negative")
        if size < drv.size and not a.shrink:
            raise ImgError("use the --shrink option to shrink an image (data past the new "
                           "end is lost)")
        if not hasattr(drv, "resize"):
            raise ImgError(f"format {drv.format_name} cannot be resized")
        drv.resize(size)
    finally:
        drv.close()
    print("Image resized.")
    return 0


# -- snapshot ---------------------------------------------------------------------------

def cmd_snapshot(a) -> int:
    actions = [x for x in (a.l, a.c, a.a, a.d) if x]
    if len(actions) > 1:
        raise ImgError("snapshot: give one of -l, -c, -a, -d")
    fmt = _fmt_of(a.filename, a.f)
    if fmt != "qcow2":
        raise ImgError(f"{a.filename}: format {fmt} does not support snapshots")
    writing = bool(a.c or a.a or a.d)
    if a.U and writing:
        raise ImgError("force-share (-U) can only be used with read-only images")
    drv = _open(a.filename, fmt, writable=writing, backing=False,
                use=img_use(writes=writing, force_share=a.U))
    try:
        if a.c:
            drv.snapshot_create(a.c)
        elif a.a:
            drv.snapshot_apply(a.a)
        elif a.d:
            drv.snapshot_delete(a.d)
        else:
            if drv.snapshots:
                print("Snapshot list:")
                snaps = [{"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
                          "date-sec": s.date_sec, "vm-clock-sec": s.vm_clock_nsec // 10**9,
                          "vm-clock-nsec": s.vm_clock_nsec % 10**9,
                          "icount": s.icount if s.icount not in (None, (1 << 64) - 1) else 0}
                         for s in drv.snapshots]
                print("\n".join(_snapshot_table(snaps)))
    finally:
        drv.close()
    return 0


# -- dedup ------------------------------------------------------------------------------

def cmd_dedup(a) -> int:
    from .block.qcow2.dedup import dedup
    fmt = _fmt_of(a.filename, a.f)
    if fmt != "qcow2":
        raise ImgError(f"{a.filename}: format {fmt} does not support deduplication (qcow2 "
                       f"does)")
    if a.min_refs < 2:
        raise ImgError(f"--min-refs must be at least 2 (not {a.min_refs})")
    writing = not a.dry_run
    drv = _open(a.filename, fmt, writable=writing, backing=a.chain,
                use=img_use(writes=writing, stable=not writing))
    start = time.monotonic()
    progress = Progress(a.p, stream=sys.stderr, desc="dedup")   # (stdout: the result)
    try:
        res = dedup(drv, dry_run=a.dry_run, min_refs=a.min_refs, chain=a.chain,
                    progress=progress)
        progress.close()
    finally:
        progress.close(finished=False)
        drv.close()
    took = time.monotonic() - start
    if a.q:
        return 0
    cs = res.cluster_size
    verb = "Would save" if a.dry_run else "Saved"
    what = []
    if res.shared:
        what.append(f"{res.shared} clusters shared")
    if res.zeroed:
        what.append(f"{res.zeroed} zero clusters")
    if res.unallocated:
        what.append(f"{res.unallocated} clusters equal to the backing file unallocated")
    if res.copied_fixed:
        what.append(f"COPIED set again on {res.copied_fixed} entries of unshared clusters")
    skipped = []
    if res.skipped_compressed:
        skipped.append(f"{res.skipped_compressed} compressed")
    if res.skipped_partial:
        skipped.append(f"{res.skipped_partial} partly allocated")
    print(f"{res.data_clusters} data clusters of {cs} bytes on {res.host_before} host clusters"
          + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    print(f"{'; '.join(what) or 'nothing to deduplicate'}")
    print(f"{verb} {res.saved_bytes} bytes ({_human(max(0, res.saved_bytes))}): "
          f"{res.freed} clusters freed, {res.allocated} allocated; dedup ratio "
          f"{res.ratio_before:.2f} -> {res.ratio_after:.2f} ({res.guest_after} data clusters on "
          f"{res.host_after} host clusters) in {took:.2f} s")
    return 0


# -- amend ------------------------------------------------------------------------------

def cmd_amend(a) -> int:
    """qemu-img amend: change a qcow2 image's creation options in place
    (block/qcow2/amend.py); every refusal before the first write."""
    if not a.o:
        raise ImgError("amend: options must be given (-o)")
    fmt = _fmt_of(a.filename, a.f)
    if fmt != "qcow2":
        raise ImgError(f"format {fmt!r} does not support option amendment")
    opts = parse_options(fmt, a.o)
    drv = _open(a.filename, fmt, writable=True, backing=False, use=img_use(writes=True,
                                                                             resizes=True))
    progress = Progress(a.p, desc="amend")
    try:
        drv.amend(opts, progress=progress)
        progress.close()
    finally:
        progress.close(finished=False)
        drv.close()
    return 0


# -- dd ---------------------------------------------------------------------------------

_DD_LIMITS = {"bs": (1, (1 << 31) - 1), "count": (0, (1 << 63) - 1), "skip": (0, (1 << 63) - 1)}


def _dd_number(key: str, text: str) -> int:
    try:
        n = parse_size(text)
    except ImgError:
        raise ImgError(f"invalid {key} {text!r} (a number, with k, M, G, T, P or E "
                       f"suffixes)") from None
    lo, hi = _DD_LIMITS[key]
    if not lo <= n <= hi:
        raise ImgError(f"invalid {key} {text!r}: must be between {lo} and {hi}")
    return n


def cmd_dd(a) -> int:
    """qemu-img dd: copy ``count`` blocks of ``bs`` bytes from ``if`` into a
    new image ``of`` of ``-O``'s format, skipping ``skip`` blocks of the
    input. As qemu-img: the input's size is counted in 512-byte sectors,
    ``count`` limits the input from its start (so the output holds
    count - skip blocks), and a skip past the end makes an empty image
    (with a warning, exit 0)."""
    ops: dict = {}
    for item in a.operands:
        key, eq, value = item.partition("=")
        if key not in ("if", "of", "bs", "count", "skip") or not eq:
            raise ImgError(f"unrecognized operand {key}")
        ops[key] = value if key in ("if", "of") else _dd_number(key, value)
    if "if" not in ops or "of" not in ops:
        raise ImgError("both the input and the output must be given (if=, of=)")
    out_fmt = a.O or "raw"
    if out_fmt not in ("raw", "qcow2"):
        raise ImgError(f"unknown output format {out_fmt!r} (raw or qcow2)")
    if not ops["if"]:
        raise ImgError("could not open '': a file name is needed")
    if a.image_opts:                 # (the input is node options, as --image-opts says)
        ns = type(a)(filename=ops["if"], f=None)
        _image_opts(ns)
        ops["if"] = ns.filename
    bs = ops.get("bs", 512)
    src = _open(ops["if"], a.f, use=img_use(stable=True, force_share=a.U))
    try:
        size = -(-src.size // 512) * 512
        if "count" in ops and size > ops["count"] * bs:
            size = ops["count"] * bs
        start = ops.get("skip", 0) * bs
        if start > size:
            out_size, start = 0, size
        else:
            out_size = size - start
        if os.path.exists(ops["of"]) and os.path.realpath(ops["of"]) == \
                os.path.realpath(ops["if"]):
            raise ImgError("the input and the output are the same file")
        out_size = -(-out_size // 512) * 512
        try:
            (RawDriver if out_fmt == "raw" else Qcow2Driver).create(ops["of"], out_size)
        except BlockError as e:
            raise ImgError(f"{ops['of']}: error while creating the output image: "
                           f"{e.why}" + (f" ({os.strerror(e.errno)})" if e.errno else "")) \
                from None
        if ops.get("skip", 0) * bs > size:
            print(f"pykvm img: {ops['if']}: cannot skip to specified offset", file=sys.stderr)
        dst = _open(ops["of"], out_fmt, writable=True, use=img_use(writes=True))
        try:
            buf = bytearray(max(bs, min(CHUNK, bs * max(1, CHUNK // bs))))
            view = memoryview(buf)
            pos = start
            while pos < size:
                n = min(len(buf), size - pos)
                inside = max(0, min(n, src.size - pos))
                read_into(src, pos, view[:inside])
                view[inside:n] = ZEROES[:n - inside]
                for o, k in _nonzero_runs(buf, n, 512):     # (the new image reads as zeroes)
                    write_range(dst, pos - start + o, view[o:o + k])
                pos += n
        finally:
            dst.close()
    finally:
        src.close()
    return 0


# -- bench ------------------------------------------------------------------------------

def _bench_int(text: str, what: str, top: int = (1 << 31) - 1) -> int:
    """A count as qemu-img bench reads it (decimal, 0x hex or 0 octal)."""
    try:
        n = int(text, 0)
    except ValueError:
        n = -1
    if not 0 <= n <= top:
        raise ImgError(f"invalid {what} {text!r}")
    return n


def _bench_size(text: str, what: str, top: int = (1 << 31) - 1) -> int:
    try:
        n = parse_size(text)
    except ImgError:
        raise ImgError(f"invalid {what} {text!r} (a number, with k, M, G, T, P or E "
                       f"suffixes)") from None
    if n > top:
        raise ImgError(f"invalid {what} {text!r}: must be between 0 and {top}")
    return n


def cmd_bench(a) -> int:
    """qemu-img bench: ``-c`` reads (or writes, ``-w``) of ``-s`` bytes, ``-d``
    in flight, from ``-o`` on by ``-S`` (wrapping at the end of the disk),
    through a BlockBackend and an AIO engine (``-i``: threads by default, as
    QEMU's; native, io_uring, python), in the cache mode ``-t``. With
    ``--flush-interval N`` a flush goes out after every N requests, once the
    requests in flight are done (or beside them, ``--no-drain``)."""
    import errno
    import mmap
    import select

    from .aio.native import EngineUnavailable, open_engine
    from .block.backend import CACHE_MODES, BlockBackend
    count = _bench_int(a.c, "request count") if a.c is not None else 75000
    depth = _bench_int(a.d, "queue depth") if a.d is not None else 64
    if depth < 1:
        raise ImgError("invalid queue depth 0 (at least 1 request in flight)")
    bufsize = _bench_size(a.s, "buffer size") if a.s is not None else 4096
    step = _bench_size(a.S, "step size") if a.S is not None else 0
    step = step or bufsize
    offset = _bench_size(a.o, "offset", (1 << 63) - 1) if a.o is not None else 0
    pattern = _bench_int(a.pattern, "pattern byte", 0xFF) if a.pattern is not None else 0
    flush_every = _bench_int(a.flush_interval, "flush interval") \
        if a.flush_interval is not None else 0
    cache = a.t or "writeback"
    if cache not in CACHE_MODES:
        raise ImgError(f"invalid cache mode {cache!r} (one of {', '.join(CACHE_MODES)})")
    aio = "native" if a.n else a.i or "threads"
    if aio not in ("threads", "native", "io_uring", "python"):
        raise ImgError(f"invalid aio option {aio!r} (threads, native, io_uring or python)")
    if flush_every and not a.w:
        raise ImgError("--flush-interval is only available in write tests")
    if flush_every and flush_every < depth:
        raise ImgError("flush interval can't be smaller than depth")
    if a.U and a.w:
        raise ImgError("force-share (-U) can only be used with read-only images")
    if not a.filename.startswith("json:"):     # (a missing image: one line, before the engine)
        _fmt_of(a.filename, a.f)
    try:
        engine = open_engine(aio, CACHE_MODES[cache].direct)
    except EngineUnavailable as e:
        raise ImgError(f"could not open '{a.filename}': {e}") from None
    try:
        b = BlockBackend(a.filename, fmt=a.f, cache=cache, read_only=not a.w, engine=engine)
    except BaseException:
        engine.close()
        raise
    slots = max(1, min(depth, count))
    mem = mmap.mmap(-1, max(slots * bufsize, 1))    # page-aligned: O_DIRECT takes it as it is
    if pattern:
        mem.write(bytes([pattern]) * (slots * bufsize))
    view = memoryview(mem)
    iovs = [[view[k * bufsize:(k + 1) * bufsize]] for k in range(slots)]
    poller = select.poll()
    poller.register(b.notifier, select.POLLIN)
    op = b.writev if a.w else b.readv
    print(f"Sending {count} {'write' if a.w else 'read'} requests, {bufsize} bytes each, "
          f"{depth} in parallel (starting at offset {offset}, step size {step})")
    if flush_every:
        print(f"Sending flush every {flush_every} requests")
    sys.stdout.flush()
    flush_tokens = iter(range(slots, 1 << 62))     # (each request in flight has its own)
    free = list(range(slots - 1, -1, -1))
    # QEMU's bench_cb, completion by completion: ``left`` requests not
    # completed, ``in_flight`` of them submitted; each completion sends what
    # the queue takes, unless a drained flush is due (then nothing goes out
    # until the queue is empty and the flush has completed)
    st = {"left": count, "in_flight": 0, "offset": offset, "draining": False,
          "in_flush": False, "flushes": 0}
    size = b.size

    def fill():
        while st["left"] > st["in_flight"] and st["in_flight"] < depth and \
                not st["draining"]:
            k = free.pop()
            st["in_flight"] += 1
            at = st["offset"]
            st["offset"] = (at + step) % size if size else 0
            if at + bufsize > size:                 # (QEMU's block layer: EIO)
                raise ImgError(f"failed request: {os.strerror(errno.EIO)}")
            op(k, at, iovs[k])

    start = time.monotonic()
    try:
        fill()
        while st["left"] or st["flushes"]:
            poller.poll(1000)
            for token, res in b.reap():
                if res < 0:
                    raise ImgError(f"failed request: {os.strerror(-res)}")
                if token >= slots:
                    st["flushes"] -= 1
                    if st["in_flush"]:
                        st["in_flush"] = st["draining"] = False
                        fill()
                    continue
                remaining = st["left"] - st["in_flight"]     # not sent yet
                st["left"] -= 1
                st["in_flight"] -= 1
                free.append(token)
                if flush_every and remaining % flush_every == 0:
                    if a.no_drain:
                        st["flushes"] += 1
                        b.flush(next(flush_tokens))
                    else:
                        st["draining"] = True
                if st["draining"] and not st["in_flush"] and st["in_flight"] == 0 and \
                        st["left"]:
                    st["in_flush"] = True
                    st["flushes"] += 1
                    b.flush(next(flush_tokens))
                fill()
        took = time.monotonic() - start
    finally:
        b.close()                   # (and its engine)
        del view, iovs
        mem.close()
    print(f"Run completed in {took:.3f} seconds.")
    return 0


# -- measure ----------------------------------------------------------------------------

def cmd_measure(a) -> int:
    """qemu-img measure: the file size an image of ``-O``'s format needs for
    --size bytes, or for the content of an image (its zero and unallocated
    ranges left out, through its backing chain)."""
    import json

    from .block.qcow2.measure import measure, read_bitmaps
    if a.filename is None and (a.image_opts or a.f or a.l):
        raise ImgError("--image-opts, -f and -l require a filename argument")
    if a.filename is not None and a.size is not None:
        raise ImgError("--size N cannot be used together with a filename")
    if a.filename is None and a.size is None:
        raise ImgError("either --size N or one filename must be specified")
    out_fmt = a.O or "raw"
    if out_fmt not in ("raw", "qcow2"):
        if out_fmt in FORMATS:
            raise ImgError(f"format {out_fmt!r} does not support size measurement")
        raise ImgError(f"unknown file format {out_fmt!r}")
    opts = parse_options(out_fmt, a.o)
    opts.pop("size", None)              # (as qemu-img: --size or the image gives it)
    size = parse_size(a.size) if a.size is not None else None
    if size is not None and size >= 1 << 63:
        raise ImgError(f"invalid size {a.size!r}")
    src_size = runs = bitmaps = None
    if a.filename is not None:
        src = _open(a.filename, a.f, use=img_use(force_share=a.U))
        try:
            if a.l is not None:
                _load_snapshot(src, a.l)
            src_size = src.size
            if out_fmt == "qcow2":
                runs = _data_runs(src, src_size) if not opts.get("backing_file") else []
                bitmaps = read_bitmaps(src) if isinstance(src, Qcow2Driver) else None
        finally:
            src.close()
    if out_fmt == "raw":
        n = -(-(src_size if src_size is not None else size) // 512) * 512
        res = {"required": n, "fully-allocated": n}
    else:
        try:
            res = measure(opts, size, src_size, runs, bitmaps)
        except BlockError as e:
            raise ImgError(e.why) from None
    if a.output == "json":
        print(json.dumps(res, indent=4))
    else:
        print(f"required size: {res['required']}")
        print(f"fully allocated size: {res['fully-allocated']}")
        if "bitmaps" in res:
            print(f"bitmaps size: {res['bitmaps']}")
    return 0


def _load_snapshot(drv, text: str) -> None:
    """``-l``: a snapshot's id or name, or ``snapshot.id=ID,snapshot.name=NAME``."""
    if not isinstance(drv, Qcow2Driver):
        raise ImgError(f"format {drv.format_name} has no internal snapshots")
    ident = name = None
    if text.startswith("snapshot."):
        for item in text.split(","):
            k, eq, v = item.partition("=")
            if k == "snapshot.id" and eq:
                ident = v
            elif k == "snapshot.name" and eq:
                name = v
            else:
                raise ImgError(f"-l: {item!r} is not snapshot.id=ID or snapshot.name=NAME")
    else:
        name = text
    try:
        drv.snapshot_load_tmp(name, ident)
    except BlockError as e:
        raise ImgError(f"failed to load snapshot: {e.why}") from None


# -- the parser -------------------------------------------------------------------------

def build_img_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="img_command", required=True, metavar="SUBCOMMAND",
                           parser_class=type(p))

    c = sub.add_parser("create", help="create an image")
    c.add_argument("-f", metavar="FMT")
    c.add_argument("-o", action="append", default=[], metavar="OPTIONS")
    c.add_argument("-b", metavar="BACKING")
    c.add_argument("-F", metavar="BACKING_FMT")
    c.add_argument("-u", action="store_true", help="do not open the backing file")
    c.add_argument("-q", action="store_true")
    c.add_argument("filename")
    c.add_argument("size", nargs="?")
    c.set_defaults(func=cmd_create)

    i = sub.add_parser("info", help="describe an image")
    i.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    i.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    i.add_argument("-f", metavar="FMT")
    i.add_argument("--output", choices=["human", "json"], default="human")
    i.add_argument("--backing-chain", action="store_true")
    i.add_argument("filename")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("check", help="check (and repair) an image's metadata")
    k.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    k.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    k.add_argument("-f", metavar="FMT")
    k.add_argument("--output", choices=["human", "json"], default="human")
    k.add_argument("-r", choices=["leaks", "all"])
    k.add_argument("-p", action="store_true", help="show progress (on stderr; not in "
                   "qemu-img's check)")
    k.add_argument("-q", action="store_true")
    k.add_argument("filename")
    k.set_defaults(func=cmd_check)

    m = sub.add_parser("map", help="show where the data of an image lives")
    m.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    m.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    m.add_argument("-f", metavar="FMT")
    m.add_argument("--output", choices=["human", "json"], default="human")
    m.add_argument("filename")
    m.set_defaults(func=cmd_map)

    v = sub.add_parser("convert", help="copy an image, skipping zeroes and holes")
    v.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    v.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    v.add_argument("-f", metavar="FMT")
    v.add_argument("-O", metavar="OUTPUT_FMT")
    v.add_argument("-o", action="append", default=[], metavar="OPTIONS")
    v.add_argument("-c", action="store_true", help="compress (qcow2)")
    v.add_argument("-p", action="store_true", help="show progress")
    v.add_argument("-q", action="store_true")
    v.add_argument("-n", action="store_true",
                   help="skip creating the target: it exists (an image of -O's format)")
    v.add_argument("-B", metavar="BACKING")
    v.add_argument("-F", metavar="BACKING_FMT")
    v.add_argument("src")
    v.add_argument("dst")
    v.set_defaults(func=cmd_convert)

    q = sub.add_parser("compare", help="compare the content of two images")
    q.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    q.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    q.add_argument("-f", metavar="FMT")
    q.add_argument("-F", metavar="FMT2")
    q.add_argument("-s", action="store_true", help="strict: sizes must match")
    q.add_argument("-p", action="store_true", help="show progress")
    q.add_argument("-q", action="store_true")
    q.add_argument("img1")
    q.add_argument("img2")
    q.set_defaults(func=cmd_compare)

    o = sub.add_parser("commit", help="write an overlay's data into its backing file")
    o.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    o.add_argument("-f", metavar="FMT")
    o.add_argument("-d", action="store_true", help="keep the overlay's data")
    o.add_argument("-p", action="store_true", help="show progress")
    o.add_argument("-q", action="store_true")
    o.add_argument("filename")
    o.set_defaults(func=cmd_commit)

    r = sub.add_parser("rebase", help="change an image's backing file")
    r.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    r.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    r.add_argument("-f", metavar="FMT")
    r.add_argument("-u", action="store_true", help="unsafe: only change the name")
    r.add_argument("-p", action="store_true", help="show progress")
    r.add_argument("-q", action="store_true")
    r.add_argument("-b", metavar="BACKING")
    r.add_argument("-F", metavar="BACKING_FMT")
    r.add_argument("filename")
    r.set_defaults(func=cmd_rebase)

    z = sub.add_parser("resize", help="change an image's virtual size")
    z.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    z.add_argument("-f", metavar="FMT")
    z.add_argument("--shrink", action="store_true")
    z.add_argument("-q", action="store_true")
    z.add_argument("filename")
    z.add_argument("size", metavar="[+|-]SIZE")
    z.set_defaults(func=cmd_resize)

    s = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots")
    s.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    s.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    s.add_argument("-f", metavar="FMT")
    s.add_argument("-l", action="store_true")
    s.add_argument("-c", metavar="NAME")
    s.add_argument("-a", metavar="NAME")
    s.add_argument("-d", metavar="NAME")
    s.add_argument("-q", action="store_true")
    s.add_argument("filename")
    s.set_defaults(func=cmd_snapshot)

    d = sub.add_parser("dedup", help="share duplicate clusters of a qcow2 image (offline)")
    d.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    d.add_argument("-f", metavar="FMT")
    d.add_argument("-p", action="store_true", help="show progress (on stderr)")
    d.add_argument("-q", action="store_true")
    d.add_argument("--dry-run", action="store_true", help="say what it would save, change "
                   "nothing")
    d.add_argument("--min-refs", type=int, default=2, metavar="N",
                   help="share only content that occurs at least N times (default 2)")
    d.add_argument("--chain", action="store_true", help="unallocate clusters equal to what "
                   "the backing file shows there")
    d.add_argument("filename")
    d.set_defaults(func=cmd_dedup)


    n = sub.add_parser("amend", help="change a qcow2 image's creation options in place")
    n.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    n.add_argument("-f", metavar="FMT")
    n.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                   help="compat, lazy_refcounts, refcount_bits, size, data_file, ...")
    n.add_argument("-p", action="store_true", help="show progress")
    n.add_argument("-q", action="store_true")
    n.add_argument("--force", action="store_true",
                   help="(qemu-img's, for encryption changes; nothing here needs it)")
    n.add_argument("filename")
    n.set_defaults(func=cmd_amend)

    y = sub.add_parser("dd", help="copy blocks of an image into a new image, as dd(1)")
    y.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    y.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    y.add_argument("-f", metavar="FMT")
    y.add_argument("-O", metavar="OUTPUT_FMT")
    y.add_argument("operands", nargs="*", metavar="if=INPUT|of=OUTPUT|bs=N|count=N|skip=N")
    y.set_defaults(func=cmd_dd)

    h = sub.add_parser("bench", help="time requests through the block layer (no guest)")
    h.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    h.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    h.add_argument("-f", metavar="FMT")
    h.add_argument("-c", metavar="COUNT", help="requests (75000)")
    h.add_argument("-d", metavar="DEPTH", help="requests in flight (64)")
    h.add_argument("-s", metavar="BUFFER_SIZE", help="bytes a request (4k)")
    h.add_argument("-S", metavar="STEP_SIZE", help="offset step (the buffer size)")
    h.add_argument("-o", metavar="OFFSET", help="the first request's offset (0)")
    h.add_argument("-t", metavar="CACHE", help="cache mode (writeback)")
    h.add_argument("-i", metavar="AIO", help="threads (default), native, io_uring, python")
    h.add_argument("-n", action="store_true", help="-i native")
    h.add_argument("-w", action="store_true", help="write (read by default)")
    h.add_argument("-q", action="store_true")
    h.add_argument("--pattern", metavar="BYTE", help="the byte written (0)")
    h.add_argument("--flush-interval", metavar="N", help="a flush every N requests (-w)")
    h.add_argument("--no-drain", action="store_true",
                   help="flush beside the requests in flight, not after them")
    h.add_argument("filename")
    h.set_defaults(func=cmd_bench)

    e = sub.add_parser("measure", help="the file size an image needs")
    e.add_argument("-U", "--force-share", dest="U", action="store_true",
                   help="open the image even if another process has it in use (read-only)")
    e.add_argument("--image-opts", action="store_true",
                   help="the image names are node options (driver=...,file.filename=...)")
    e.add_argument("-f", metavar="FMT")
    e.add_argument("-O", metavar="OUTPUT_FMT", help="the format to measure for (raw)")
    e.add_argument("-o", action="append", default=[], metavar="OPTIONS",
                   help="creation options of the output format")
    e.add_argument("--size", metavar="SIZE", help="measure an empty image of SIZE bytes")
    e.add_argument("-l", metavar="SNAPSHOT", help="measure this internal snapshot (an id or "
                   "a name, or snapshot.id=ID,snapshot.name=NAME)")
    e.add_argument("--output", choices=["human", "json"], default="human")
    e.add_argument("filename", nargs="?")
    e.set_defaults(func=cmd_measure)

_CONVERT_VALUES = {"-f": "f", "-O": "O", "-o": "o", "-B": "B", "-F": "F"}
_CONVERT_FLAGS = {"-c": "c", "-p": "p", "-q": "q", "-U": "U", "-n": "n"}


def _fast_convert_args(argv: list[str]):
    """The namespace argparse would make for a plain ``convert`` command line
    (separate options, values that do not start with '-', two file names), or
    None for anything else, which argparse then parses (and reports)."""
    if argv[:1] != ["convert"]:
        return None
    import types
    a = types.SimpleNamespace(f=None, O=None, o=[], c=False, p=False, q=False, B=None, F=None,
                              U=False, n=False, image_opts=False,
                              func=cmd_convert, img_command="convert")
    names = []
    i = 1
    while i < len(argv):
        t = argv[i]
        if t in _CONVERT_VALUES:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            key = _CONVERT_VALUES[t]
            if key == "o":
                a.o.append(argv[i + 1])
            else:
                setattr(a, key, argv[i + 1])
            i += 2
            continue
        if t in _CONVERT_FLAGS:
            setattr(a, _CONVERT_FLAGS[t], True)
        elif t.startswith("-") or len(names) == 2:
            return None
        else:
            names.append(t)
        i += 1
    if len(names) != 2:
        return None
    a.src, a.dst = names
    return a


IMAGE_ARGS = ("filename", "src", "img1", "img2")


def _image_opts(args) -> None:
    """--image-opts: each image argument is a node's options in QEMU's dotted
    form (driver=qcow2,file.filename=a.qcow2); they become json: names, which
    every subcommand opens as it opens a file name."""
    import json

    from .block.graph import nest, split_commas
    if getattr(args, "f", None):
        raise ImgError("--image-opts and -f are mutually exclusive (the options name the "
                       "driver)")
    for key in IMAGE_ARGS:
        text = getattr(args, key, None)
        if text is None:
            continue
        flat = {}
        for item in split_commas(text):
            k, eq, v = item.partition("=")
            if not eq:
                raise ImgError(f"--image-opts: '{item}' is not KEY=VALUE")
            flat[k] = v
        spec = nest(flat, f"--image-opts {text}")
        if "filename" in spec and "driver" not in spec:
            spec = {"file": {"driver": "file", "filename": spec.pop("filename")}, **spec}
        setattr(args, key, "json:" + json.dumps(spec))


def cmd_img(args) -> int:
    """Run a parsed ``pykvm img`` command; errors print one line and give the exit code."""
    try:
        if getattr(args, "image_opts", False):
            _image_opts(args)
        return args.func(args)
    except ImgError as e:
        print(f"pykvm img: {e}", file=sys.stderr)
        return e.exit_status
    except BlockError as e:
        print(f"pykvm img: {e}", file=sys.stderr)
        return 2 if args.img_command == "compare" else e.exit_status
    except OSError as e:
        print(f"pykvm img: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2 if args.img_command == "compare" else 1


def main_img(argv: list[str]) -> int:
    """``pykvm img ARGS``, standalone (tests, scripts)."""
    args = _fast_convert_args(argv)
    if args is not None:
        return cmd_img(args)
    if argv[:1] == ["resize"] and len(argv) >= 3 and argv[-1][:1] == "-" and "--" not in argv:
        # qemu-img takes resize's last argument as the size before it parses
        # options, so "-1G" shrinks (with --shrink) rather than being an option
        argv = argv[:-1] + ["--", argv[-1]]
    p = _parser_class()(prog="pykvm img")
    build_img_parser(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:          # a usage error (one line, already printed) or --help
        return int(e.code or 0)
    return cmd_img(args)


if __name__ == "__main__":
    sys.exit(main_img(sys.argv[1:]))
