"""pykvm's command line: ``pykvm run``, ``fio``, ``serve`` and ``img``.

Usage errors exit 2 (argparse). Every other failure a user can hit prints one
line on stderr, ``pykvm: <what went wrong>``, and exits non-zero; a guest
fault prints its report first. No traceback reaches the user. Device
messages (a guest's bad request, a device that needs a reset) are log lines
on stderr with the same prefix.
"""
from __future__ import annotations

import io
import os
import sys

from .errors import ConfigError, GuestFault, PykvmError

# argparse, logging and re are imported where used: ``pykvm img`` starts
# without them (its own parser imports argparse when it needs it)
_SIZE = r"^(\d+)([KMGT]?)(i?B)?$"
GUEST_DIR = os.environ.get("PYKVM_GUEST_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guest", "build")


def parse_size(text: str, default_unit: str = "M") -> int:
    """'256M', '1G', '512' (MiB by default, as QEMU's -m) -> bytes."""
    import argparse
    import re
    m = re.match(_SIZE, text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 256M or 1G)")
    unit = (m.group(2) or default_unit).upper()
    return int(m.group(1)) << {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def parse_bytes(text: str) -> int:
    """fio-style sizes: '4k', '1M', '512' (bytes by default)."""
    return parse_size(text, default_unit="")


def _runtime(text: str) -> float:
    import argparse
    v = _positive_float(text)
    if not 0.001 <= v <= 1e6:
        raise argparse.ArgumentTypeError(f"want 0.001 to 1000000 seconds, not {text}")
    return v


def _positive_float(text: str) -> float:
    import argparse
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return v


def _socket_mode(text: str) -> int:
    import argparse
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"want an octal mode from 0000 to 0777, not {text!r}")
    return mode


def _disk(text: str):
    import argparse

    from .machine import DiskSpec
    try:
        return DiskSpec.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _object(text: str):
    """--object TYPE,id=ID,...: QEMU's objects; a throttle group (kept alive by
    the parsed arguments for the whole run)."""
    import argparse

    from .block.graph import split_commas
    from .block.throttle import ThrottleError, group_object
    kind, *items = split_commas(text)
    if kind != "throttle-group":
        raise argparse.ArgumentTypeError(f"--object {text}: unknown object type '{kind}' "
                                         f"(throttle-group)")
    opts = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--object {text}: '{item}' is not KEY=VALUE")
        opts[key] = value
    try:
        return group_object(opts)
    except ThrottleError as e:
        raise argparse.ArgumentTypeError(f"--object {text}: {e}") from None


def _object_arg(p) -> None:
    p.add_argument("--object", type=_object, action="append", default=[], metavar="OBJ",
                   help="throttle-group,id=NAME,limits.iops-total=N,... (QEMU's): limits "
                        "that disks share (throttling.group=NAME, driver=throttle)")


def _common_vm_args(p: argparse.ArgumentParser) -> None:
    _object_arg(p)
    p.add_argument("--mem", type=parse_size, default=256 << 20, metavar="SIZE",
                   help="guest RAM (default 256M; a bare number is MiB)")
    p.add_argument("--timeout", type=_positive_float, metavar="S",
                   help="stop the guest after S seconds (exit 124)")
    p.add_argument("--trace", choices=["exits"], action="append", default=[],
                   help="'exits': print every VM exit and a count per reason at the end")
    p.add_argument("--verbose", "-v", action="count", default=0,
                   help="log each disk's block graph at start (-vv: debug messages)")
    _qmp_arg(p)


def _qmp_arg(p) -> None:
    p.add_argument("--qmp", metavar="unix:PATH,server=on,wait=off",
                   help="a QMP control socket (QEMU's -qmp): query-status, stop, cont, quit, "
                        "log-mark (see 'pykvm log mark')")


def build_parser() -> argparse.ArgumentParser:
    import argparse

    class _Parser(argparse.ArgumentParser):
        """Usage errors in one line (the subcommands' parsers are of this class too)."""

        def error(self, message):
            self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")

    p = _Parser(prog="pykvm", description="A KVM hypervisor harness.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="boot a kernel (PVH ELF or Linux bzImage) and run it "
                                     "until it exits")
    run.add_argument("kernel", metavar="KERNEL", help="PVH ELF image or Linux bzImage")
    run.add_argument("--initrd", metavar="FILE", help="initial ramdisk for the kernel")
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    run.add_argument("--boot", choices=["auto", "linux", "pvh"], default="auto",
                     help="auto (default): a PVH ELF by its note, a bzImage by the Linux boot "
                          "protocol; linux: a bzImage by the boot protocol; pvh: the ELF inside "
                          "a bzImage's payload (or an ELF) by its PVH note, decompressed on the "
                          "host")
    run.add_argument("--disk", type=_disk, action="append", default=[], metavar="SPEC",
                     help="a virtio-blk disk: file=PATH[,format=raw][,transport=mmio|pci]"
                          "[,cache=...][,aio=python|threads|native|io_uring][,readonly=on]"
                          "[,discard=ignore|unmap]"
                          "[,detect-zeroes=off|on|unmap][,serial=S][,poll-max-ns=N]"
                          "[,irq-coalesce-ns=N][,queues=N][,iothread=device|queue]"
                          "[,throttling.iops-total|iops-read|iops-write|bps-total|bps-read|"
                          "bps-write[-max[-length]]=N][,throttling.iops-size=N]"
                          "[,throttling.group=NAME] (repeatable)")
    _common_vm_args(run)

    fio = sub.add_parser("fio", help="run the workload guest against a disk, print fio's output")
    fio.add_argument("--disk", type=_disk, required=True, metavar="SPEC", help="as for run")
    fio.add_argument("--rw", default="randread",
                     choices=["read", "write", "randread", "randwrite", "randrw"])
    fio.add_argument("--rwmixread", type=int, default=50, metavar="PCT")
    fio.add_argument("--bs", type=parse_bytes, default=4096, metavar="SIZE")
    fio.add_argument("--iodepth", type=int, default=1, metavar="N",
                     help="requests in flight, spread over the queues")
    fio.add_argument("--queues", type=int, default=1, metavar="N",
                     help="request queues the guest drives (the disk gets at least N)")
    fio.add_argument("--size", type=parse_bytes, metavar="SIZE", help="bytes of the disk to use")
    fio.add_argument("--offset", type=parse_bytes, default=0, metavar="SIZE")
    fio.add_argument("--runtime", type=_runtime, default=5.0, metavar="S",
                     help="seconds to keep issuing, to the millisecond (default 5)")
    fio.add_argument("--ios", type=int, metavar="N", help="a fixed number of I/Os instead")
    fio.add_argument("--seed", type=int, default=1)
    fio.add_argument("--verify", choices=["crc32c", "none"], default="none")
    fio.add_argument("--fsync", type=int, default=0, metavar="N",
                     help="a FLUSH after every N writes (fio's fsync=N; default 0: never)")
    fio.add_argument("--no-refill", action="store_true",
                     help="generate each write buffer once, not for every write (as fio reuses "
                          "its buffers by default); not with --verify")
    fio.add_argument("--output-format", choices=["normal", "json"], default="normal")
    fio.add_argument("--kernel", help="workload guest ELF (default: the built-in one)")
    _common_vm_args(fio)

    serve = sub.add_parser("serve", help="export a disk to a vhost-user front-end (QEMU's "
                                         "vhost-user-blk-pci, for one) or to NBD clients "
                                         "until SIGTERM")
    what = serve.add_mutually_exclusive_group(required=True)
    what.add_argument("--vhost-user-blk", metavar="SOCKET",
                      help="Unix socket to listen on (replaced if a stale one is there)")
    what.add_argument("--nbd", metavar="ADDR",
                      help="serve NBD on unix:PATH or HOST:PORT (as qemu-nbd; 10809 is NBD's "
                           "port)")
    serve.add_argument("--export-name", "-x", default="", metavar="NAME",
                       help="NBD: the export's name (default: \"\")")
    serve.add_argument("--description", "-D", default="", metavar="TEXT",
                       help="NBD: the export's description")
    serve.add_argument("--read-only", "-r", action="store_true",
                       help="NBD: export read-only (as readonly=on)")
    serve.add_argument("--shared", "-e", type=int, default=1, metavar="N",
                       help="NBD: clients served at once (default 1; more wait; 0: no limit)")
    serve.add_argument("--persistent", "-t", action="store_true",
                       help="NBD: keep serving after the last client disconnects")
    serve.add_argument("--socket-mode", type=_socket_mode, default=0o600, metavar="OCTAL",
                       help="permissions of the socket (default 0600: only this user may "
                            "connect; e.g. 0660 for the group too)")
    _object_arg(serve)
    serve.add_argument("--disk", type=_disk, required=True, metavar="SPEC",
                       help="as for run (transport= does not apply)")
    _qmp_arg(serve)
    serve.add_argument("--verbose", "-v", action="count", default=0,
                       help="log connections and restarts (-vv: every message)")

    wlog = sub.add_parser("log", help="write logs (blklogwrites, dm-log-writes format)")
    lsub = wlog.add_subparsers(dest="log_command", metavar="info|replay|mark", required=True)
    linfo = lsub.add_parser("info", help="the log's sector size, entries, flushes and marks")
    linfo.add_argument("log")
    linfo.add_argument("--output-format", choices=["human", "json"], default="human")
    replay = lsub.add_parser("replay", help="apply a log's entries to a raw image "
                                            "(xfstests' replay-log)")
    replay.add_argument("log")
    replay.add_argument("image")
    stop = replay.add_mutually_exclusive_group()
    stop.add_argument("--limit", type=int, metavar="N", help="the first N entries")
    stop.add_argument("--end-mark", metavar="MARK", help="up to and including this mark")
    stop.add_argument("--next-flush", action="store_true", help="up to the next flush")
    replay.add_argument("--start-entry", type=int, default=0, metavar="N",
                        help="begin with entry N (0-based)")
    lmark = lsub.add_parser("mark", help="a mark in a running disk's log, through its QMP "
                                         "socket (rules with mark=NAME wait for it)")
    lmark.add_argument("name", metavar="NAME")
    lmark.add_argument("--qmp", required=True, metavar="PATH",
                       help="the socket of --qmp unix:PATH,server=on")
    lmark.add_argument("--device", metavar="DISK", help="disk0, disk1, ... (default: the "
                       "only disk)")

    crash = sub.add_parser("crashtest", help="check every crash state a write log allows "
                                             "(README, Crash testing)")
    crash.add_argument("--base", required=True, metavar="IMAGE",
                       help="the disk before the logged run (raw or qcow2)")
    crash.add_argument("--base-format", choices=["raw", "qcow2"], metavar="FMT",
                       help="raw: the base file's bytes as they are (a log of a qcow2 file's "
                            "own writes: a qcow2 base is then not read through qcow2); "
                            "default: probed")
    crash.add_argument("--log", required=True, metavar="LOG", help="a write log (blklogwrites, "
                       "dm-log-writes)")
    crash.add_argument("--check", required=True, metavar="'CMD {image}'",
                       help="run for each state, {image} its raw image; exit 0: consistent")
    crash.add_argument("--max-states", type=int, default=256, metavar="N",
                       help="per epoch, past the exhaustive ones (default 256)")
    crash.add_argument("--seed", type=int, default=0)
    crash.add_argument("--torn", action="store_true", help="also tear multi-sector writes")
    crash.add_argument("--jobs", type=int, default=1, metavar="N")
    crash.add_argument("--check-timeout", type=float, default=60.0, metavar="S")
    crash.add_argument("--json", action="store_true", help="one JSON object on stdout")
    crash.add_argument("--no-resume", action="store_true",
                       help="ignore the progress an interrupted run kept (LOG.crashtest.json)")

    trace = sub.add_parser("trace", help="read a per-request trace (--disk ...,trace=FILE)")
    tsub = trace.add_subparsers(dest="trace_command", metavar="summary|plot", required=True)
    summary = tsub.add_parser("summary", help="counts, IOPS, latency percentiles by op, "
                                              "queue depth")
    summary.add_argument("file")
    summary.add_argument("--output-format", choices=["human", "json"], default="human")
    plot = tsub.add_parser("plot", help="latency and IOPS over time, as a PNG (matplotlib)")
    plot.add_argument("file")
    plot.add_argument("-o", "--output", required=True, metavar="PNG")

    # `pykvm img ...` is dispatched in main() before this parser runs, so that
    # `pykvm run` does not pay for importing the image-format code; this entry
    # only lists it in --help.
    img = sub.add_parser("img", add_help=False,
                         help="create, inspect, check, convert and modify disk images")
    img.add_argument("args", nargs=argparse.REMAINDER)
    return p


def _run_machine(args, kernel: str, cmdline: str, disks, serial_out=None, initrd=None,
                 check=None):
    """Build and run the machine; ``check(machine)``, if given, runs before the guest does
    (it raises for what the guest would only fail on)."""
    from .machine import Machine, MachineConfig
    from .vcpu import print_exit_counts

    trace = sys.stderr if "exits" in args.trace else None
    cfg = MachineConfig(kernel=kernel, cmdline=cmdline, mem_size=args.mem,
                        cpus=getattr(args, "cpus", 1), trace=trace, disks=disks,
                        serial_out=serial_out, initrd=initrd, boot=getattr(args, "boot", "auto"))
    qmp = _qmp_spec(args)
    with Machine(cfg) as machine:
        if check is not None:
            check(machine)
        server = _qmp_server(machine, qmp)
        try:
            result = machine.run(timeout=args.timeout)
        finally:
            if server is not None:
                server.close()
            if trace:
                print_exit_counts(machine.exit_counts(), trace)
        stats = [d.core.device.counters() for d in machine.disks]
    if machine.power_cut is not None:       # (after close: a planned cut has applied)
        raise PykvmError(machine.power_cut)
    return result, stats


def _qmp_spec(args):
    """--qmp's (path, wait), checked before anything is built; None without --qmp."""
    if not getattr(args, "qmp", None):
        return None
    from .qmp import parse_spec
    return parse_spec(args.qmp)


def _qmp_server(target, spec):
    if spec is None:
        return None
    from .qmp import QmpServer
    return QmpServer(target, *spec)


def cmd_run(args) -> int:
    result, _ = _run_machine(args, args.kernel, args.cmdline, args.disk, initrd=args.initrd)
    return result.status if result.status is not None else 1


def cmd_fio(args) -> int:
    from . import fio
    from .virtio.blk import MAX_QUEUES
    from .virtio.device import counters_summary

    kernel = args.kernel or os.path.join(GUEST_DIR, "workload.elf")
    if not os.path.exists(kernel):
        raise ConfigError(f"{kernel}: workload guest not found (run 'make guests')")
    if args.iodepth < 1 or args.iodepth > 254:
        raise ConfigError(f"--iodepth {args.iodepth}: must be between 1 and 254")
    if args.bs < 512 or args.bs % 512:
        raise ConfigError(f"--bs {args.bs}: must be a multiple of 512")
    if not 1 <= args.queues <= MAX_QUEUES or args.queues > args.iodepth:
        raise ConfigError(f"--queues {args.queues}: must be between 1 and {MAX_QUEUES}, "
                          f"and not more than --iodepth")
    args.disk.queues = max(args.disk.queues, args.queues)
    opts = [f"transport={args.disk.transport}", f"rw={args.rw}", f"bs={args.bs}",
            f"iodepth={args.iodepth}", f"queues={args.queues}", f"offset={args.offset}",
            f"seed={args.seed}",
            f"verify={args.verify}", f"rwmixread={args.rwmixread}"]
    if args.fsync < 0:
        raise ConfigError(f"--fsync {args.fsync}: must be 0 or more")
    if args.fsync:
        opts.append(f"flush={args.fsync}")
    if args.no_refill:
        if args.verify != "none":
            raise ConfigError("--no-refill writes blocks that do not verify: not with --verify")
        opts.append("refill=0")
    if args.size:
        opts.append(f"size={args.size}")
    opts.append(f"ios={args.ios}" if args.ios else f"runtime={args.runtime:.3f}")
    out = io.BytesIO()
    timeout = args.timeout or (args.runtime + 60 if not args.ios else None)
    args.timeout = timeout


    def fits(machine) -> None:
        capacity = machine.disks[0].core.device.backend.size
        end = args.offset + (args.size or 0)
        if args.offset >= capacity or end > capacity:
            what = f"--size {args.size} at " if args.size else ""
            raise ConfigError(f"{what}--offset {args.offset}: does not fit the disk "
                              f"{args.disk.file} ({capacity} bytes)")
    result, stats = _run_machine(args, kernel, " ".join(opts), [args.disk], serial_out=out,
                                 check=fits)
    text = out.getvalue().decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("workload:"):
            print(line, file=sys.stderr)
    try:
        r = fio.parse_result(text)
    except fio.WorkloadError as e:
        raise PykvmError(f"{e}; guest output: {text.strip()[-300:]!r}") from None
    if args.output_format == "json":
        print(fio.to_json(r, {"device": stats[0] if stats else {}}))
    else:
        print(fio.to_normal(r))
        if stats:
            print("  device: " + counters_summary(stats[0]))
    return result.status if result.status is not None else 1


def cmd_serve(args) -> int:
    import signal

    from .serve import NbdExport, VhostUserExport

    qmp = _qmp_spec(args)
    if args.nbd is not None:
        export = NbdExport(args.disk, args.nbd, name=args.export_name,
                           read_only=args.read_only, shared=args.shared,
                           persistent=args.persistent, mode=args.socket_mode,
                           description=args.description)
        where = export.where            # with port 0: the port it got
    else:
        nbd_only = [o for o, v in (("--export-name", args.export_name != ""),
                                   ("--description", args.description != ""),
                                   ("--read-only", args.read_only),
                                   ("--shared", args.shared != 1),
                                   ("--persistent", args.persistent)) if v]
        if nbd_only:
            raise ConfigError(f"{nbd_only[0]}: only with --nbd")
        export = VhostUserExport(args.disk, args.vhost_user_blk, mode=args.socket_mode)
        where = args.vhost_user_blk
    old = {sig: signal.signal(sig, lambda *_: export.stop())
           for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    if args.nbd is None:
        old[signal.SIGCONT] = signal.signal(signal.SIGCONT, lambda *_: export.resume())
    print(f"pykvm: serving {args.disk.file} on {where}", file=sys.stderr, flush=True)
    server = None
    try:
        server = _qmp_server(export, qmp)
        export.serve_forever()
    finally:
        if server is not None:
            server.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        export.close()
    return 0


def _prefix_formatter():
    import logging

    class _Prefix(logging.Formatter):
        def format(self, record):
            return f"pykvm: {record.getMessage()}"
    return _Prefix()


def cmd_log(args) -> int:
    import json

    from .block import writelog
    if args.log_command == "mark":
        from .qmp import command
        path = args.qmp.removeprefix("unix:").split(",")[0]
        r = command(path, "log-mark", {"name": args.name,
                                       **({"device": args.device} if args.device else {})})
        where = "the write log" if r.get("logged") else "no write log"
        print(f"mark {args.name!r}: {where}, {r.get('rules', 0)} rules waiting for it")
        return 0
    if args.log_command == "info":
        i = writelog.info(args.log)
        if args.output_format == "json":
            print(json.dumps(i, indent=2))
            return 0
        print(f"log: {args.log}\nsector size: {i['sector_size']}\nentries: {i['entries']} "
              f"({i['writes']} writes, {i['fua']} of them FUA, {i['discards']} discards, "
              f"{i['flushes']} flushes, {len(i['marks'])} marks)\ndata: {i['bytes']} bytes\n"
              f"marks: " + (", ".join(f"{m['name']} (entry {m['entry']})" for m in i["marks"])
                            or "none"))
        return 0
    if args.limit is not None and args.limit < 0 or args.start_entry < 0:
        raise PykvmError("--limit and --start-entry take a number of entries (0 or more)")
    done = writelog.replay(args.log, args.image, limit=args.limit, end_mark=args.end_mark,
                           next_flush=args.next_flush, start=args.start_entry)
    print(f"replayed {done['entries']} entries ({done['writes']} writes, {done['discards']} "
          f"discards, {done['flushes']} flushes, {done['marks']} marks; {done['bytes']} bytes)"
          + (f", the last entry {done['last']}" if done["last"] is not None else ""))
    return 0


def cmd_crashtest(args) -> int:
    import json

    from . import crash
    t = crash.Crashtest(args.base, args.log, args.check, max_states=args.max_states,
                        seed=args.seed, torn=args.torn, jobs=args.jobs,
                        check_timeout=args.check_timeout, resume=not args.no_resume,
                        base_format=args.base_format,
                        progress=crash.progress_bar if sys.stderr.isatty() else None)
    try:
        s = t.run()
    finally:
        t.close()
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        for e in s["epochs"]:
            print(f"epoch {e['epoch']}: {e['writes']} writes, {e['states']} states, "
                  f"{e['failures']} failed")
        for f in s["failed"]:
            ws = ", ".join(f"entry {w['entry']} (sector {w['sector']}, {w['sectors']} sectors)"
                           for w in f["minimal"]) or "none: the durable writes alone"
            why = " / ".join(line.strip() for line in f["why"].splitlines() if line.strip())
            print(f"FAILED epoch {f['epoch']} ({f['kind']}, {why[:100]}): minimal write set: {ws}")
        print(f"{s['states']} states checked, {s['failures']} failed, "
              f"{s['skipped_duplicates']} duplicates skipped, in {s['seconds']:.1f} s")
    return 1 if s["failures"] else 0


def cmd_trace(args) -> int:
    import json

    from .block import trace
    try:
        records = trace.read(args.file)
    except OSError as e:
        raise PykvmError(f"{args.file}: {e.strerror}") from None
    except ValueError as e:
        raise PykvmError(str(e)) from None
    if args.trace_command == "summary":
        s = trace.summary(records)
        if args.output_format == "json":
            print(json.dumps(s, indent=2))
        else:
            print("\n".join(trace.summary_lines(s)))
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PykvmError("trace plot needs matplotlib (make bench-deps, or pip install "
                         "matplotlib)") from None
    trace.plot(records, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["img"]:
        from .img import main_img
        return main_img(argv[1:])
    import logging
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_prefix_formatter())
    root = logging.getLogger("pykvm")
    root.addHandler(handler)
    verbose = getattr(args, "verbose", 0)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    root.propagate = False
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "fio":
            return cmd_fio(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "trace":
            return cmd_trace(args)
        if args.command == "log":
            return cmd_log(args)
        if args.command == "crashtest":
            return cmd_crashtest(args)
    except GuestFault as e:
        print(e.report, file=sys.stderr)
        print(f"pykvm: {e}", file=sys.stderr)
        return e.exit_status
    except PykvmError as e:
        print(f"pykvm: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return 130
    finally:
        root.removeHandler(handler)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
