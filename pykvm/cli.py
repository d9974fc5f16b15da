"""pykvm's command line: ``pykvm run KERNEL ...``.

Usage errors exit 2 (argparse). Every other failure a user can hit prints one
line on stderr, ``pykvm: <what went wrong>``, and exits non-zero; a guest
fault prints its report first. No traceback reaches the user.
"""
from __future__ import annotations

import argparse
import re
import sys

from .errors import ConfigError, GuestFault, PykvmError

_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str, default_unit: str = "M") -> int:
    """'256M', '1G', '512' (MiB by default, as QEMU's -m) -> bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 256M or 1G)")
    unit = (m.group(2) or default_unit).upper()
    return int(m.group(1)) << {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pykvm", description="A KVM hypervisor harness.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="boot a kernel (PVH ELF) and run it until it exits")
    run.add_argument("kernel", metavar="KERNEL", help="PVH ELF image")
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument("--mem", type=parse_size, default=256 << 20, metavar="SIZE",
                     help="guest RAM (default 256M; a bare number is MiB)")
    run.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs (default 1)")
    run.add_argument("--timeout", type=_positive_float, metavar="S",
                     help="stop the guest after S seconds (exit 124)")
    run.add_argument("--trace", choices=["exits"], action="append", default=[],
                     help="'exits': print every VM exit and a count per reason at the end")
    return p


def cmd_run(args) -> int:
    from .machine import Machine, MachineConfig
    from .vcpu import print_exit_counts

    trace = sys.stderr if "exits" in args.trace else None
    cfg = MachineConfig(kernel=args.kernel, cmdline=args.cmdline, mem_size=args.mem,
                        cpus=args.cpus, trace=trace)
    with Machine(cfg) as machine:
        try:
            result = machine.run(timeout=args.timeout)
        finally:
            if trace:
                print_exit_counts(machine.exit_counts(), trace)
    return result.status


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
    except GuestFault as e:
        print(e.report, file=sys.stderr)
        print(f"pykvm: {e}", file=sys.stderr)
        return e.exit_status
    except ConfigError as e:
        print(f"pykvm: {e}", file=sys.stderr)
        return e.exit_status
    except PykvmError as e:
        print(f"pykvm: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
