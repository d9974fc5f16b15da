"""Fault-injection rules: QEMU's blkdebug config file, extended, and the engine
that evaluates them (native/inject.c) for both paths.

A rules file is QEMU's config format: ``[section]`` lines, then ``key =
"value"`` lines (the quotes may be left out), ``#`` comments. Sections:

``[inject-error]`` (QEMU's): ``event`` (required), ``state``, ``errno``
  (a number or a name: EIO, ENOSPC, ...; default EIO), ``sector``, ``once``,
  ``immediately``, ``iotype`` (read, write, write-zeroes, discard, flush;
  a comma list is ours; default all of them). When ``event`` fires in
  ``state`` (0 or absent: any), the rule becomes active; while active, a
  request of its iotype that covers ``sector`` (absent: any) fails with
  ``errno``; ``once=on`` removes it after it fired once.
``[set-state]`` (QEMU's): ``event``, ``state``, ``new_state``.
``[fault]`` (ours): which requests, then what happens to them.
  Match: ``op`` (read, write, flush, discard, write-zeroes, get-id; a comma
  list; default: what the action applies to), a range ``sector`` +
  ``nsectors`` or ``offset`` + ``length`` (bytes, k/M/G suffixes; a request
  overlapping it matches), ``queue``, ``state``; which of the matching
  requests fire: ``after`` N (skip the first N), ``every`` N (then every
  Nth), ``nth`` N (only the Nth: after N-1, times 1), ``times`` N (at most N
  firings), ``once`` (times 1), ``probability`` P in [0, 1] with ``seed``.
  ``new_state`` N: the state machine moves to N when the rule fires.
  When: ``mark`` NAME (the rule matches nothing until the mark NAME is made:
  the API's ``mark()``, ``pykvm log mark``, QMP's ``log-mark``) or ``time`` T
  (until T after the run starts: the VM runs, the export serves). A
  power-cut rule with a mark or a time and no other match key cuts the power
  at that mark or time itself.
  Action (``action``, required):
    pass      nothing: the rule only counts (and moves the state)
    error     ``errno`` (default EIO): the guest sees IOERR
    status    ``status`` = ioerr | unsupp: that virtio status
    delay     ``delay`` (10ms, 250us, 1s...), ``distribution`` fixed |
              uniform (up to ``delay-max``) | exponential (mean ``delay``)
    hang      until released from the API (``Injector.release``)
    corrupt   reads: ``bits`` (default 1) seeded bit flips in the data
              returned; the image is untouched
    zero      reads: zeroes returned, the image not read
    torn      writes: only the first ``sectors`` (default 1) sectors reach
              the image; success is reported
    short     reads: the host's read returns only the first ``sectors``
              (default 1) sectors, not at the end of the file (as a read cut
              by a signal or by a network file system): the rest must be read
    drop      writes (and flushes): success reported, nothing done
    power-cut the power goes: this request and every later one never land
              nor complete, the VM stops; with a volatile node the image is
              left as ``keep`` = flushed | all | random (``seed``, ``torn``) says
    hold      completions held until ``count`` (default 2) are, or
              ``timeout`` (default 10ms) passed since the first, or
              ``release-after`` = K more requests (not held) completed since
              the first (then count and timeout only when given), then
              released in ``order`` = reverse | random | fifo, or the
              positions given (``2,0,1``: the third held first; 0 is the
              first held; count defaults to how many it names)
A bad file (an unknown section or key, a bad value, an impossible range,
a probability outside [0, 1], an event the node never raises) is one line
naming the file, the line and the key; nothing starts.

Events raised: read_aio, write_aio (every guest read and write), flush_to_os,
flush_to_disk (every guest flush), and qcow2's metadata events (EVENTS).
Where QEMU raises read_aio in the format driver, pykvm raises it for each
guest request, whichever node the rules sit on; sectors are guest sectors
for guest requests and host sectors for qcow2's metadata writes.
"""
from __future__ import annotations

import errno as _errno
import re
import threading
import time

from .._native import ffi, lib
from .driver import GraphError

# ids 0..3 are fixed by native/inject.h; the rest are qcow2's (qcow2/*.py raise them)
EVENTS = ("read_aio", "write_aio", "flush_to_os", "flush_to_disk",
          "l1_update", "l1_grow.write_table", "l1_grow.activate_table",
          "l2_update", "l2_alloc.write", "cluster_alloc", "cow_read", "cow_write",
          "refblock_update", "refblock_alloc", "reftable_update", "read_compressed")
EVENT_IDS = {name: i for i, name in enumerate(EVENTS)}
# QEMU's other event names: valid there, never raised here
QEMU_ONLY_EVENTS = ("l2_load", "l2_update_compressed", "l2_alloc.cow_read", "read_backing_aio",
                    "write_compressed", "vmstate_load", "vmstate_save", "reftable_load",
                    "reftable_grow", "refblock_load", "refblock_update_part",
                    "refblock_alloc.hookup", "refblock_alloc.write",
                    "refblock_alloc.write_blocks", "refblock_alloc.write_table",
                    "refblock_alloc.switch_table", "cluster_alloc_bytes", "cluster_free",
                    "pwritev_rmw.head", "pwritev_rmw.after_head", "pwritev_rmw.tail",
                    "pwritev_rmw.after_tail", "pwritev", "pwritev_zero", "pwritev_done",
                    "l1_grow.alloc_table", "cor_write", "cluster_alloc_space", "none")

OPS = {"read": lib.PYKVM_INJ_OP_READ, "write": lib.PYKVM_INJ_OP_WRITE,
       "flush": lib.PYKVM_INJ_OP_FLUSH, "discard": lib.PYKVM_INJ_OP_DISCARD,
       "write-zeroes": lib.PYKVM_INJ_OP_WRITE_ZEROES, "get-id": lib.PYKVM_INJ_OP_GET_ID}
QEMU_IOTYPES = ("read", "write", "write-zeroes", "discard", "flush")
ACTIONS = {"pass": lib.PYKVM_INJ_NONE, "error": lib.PYKVM_INJ_ERROR, "status": lib.PYKVM_INJ_STATUS,
           "delay": lib.PYKVM_INJ_DELAY, "hang": lib.PYKVM_INJ_HANG,
           "corrupt": lib.PYKVM_INJ_CORRUPT, "torn": lib.PYKVM_INJ_TORN,
           "drop": lib.PYKVM_INJ_DROP, "zero": lib.PYKVM_INJ_ZERO, "hold": lib.PYKVM_INJ_HOLD,
           "power-cut": lib.PYKVM_INJ_POWER_CUT, "short": lib.PYKVM_INJ_SHORT}
KEEPS = ("flushed", "all", "random")      # a power cut's, as the volatile node has them
ACTION_NAMES = {v: k for k, v in ACTIONS.items()}     # 0: pass
# the ops an action applies to (the default op list), and may be given
ACTION_OPS = {"corrupt": ("read",), "zero": ("read",), "torn": ("write",), "short": ("read",),
              "drop": ("write", "flush")}
DEFAULT_OPS = ("read", "write")
STATUSES = {"ioerr": 1, "unsupp": 2}
ORDERS = {"fifo": lib.PYKVM_INJ_ORDER_FIFO, "reverse": lib.PYKVM_INJ_ORDER_REVERSE,
          "random": lib.PYKVM_INJ_ORDER_RANDOM}
DISTRIBUTIONS = {"fixed": lib.PYKVM_INJ_DELAY_FIXED, "uniform": lib.PYKVM_INJ_DELAY_UNIFORM,
                 "exponential": lib.PYKVM_INJ_DELAY_EXPONENTIAL}
TIME_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
MAX_RULES = 4096
MAX_BITS = 4096
MAX_DELAY_NS = 3600 * 1_000_000_000
SECTOR = 512

KEYS = {
    "inject-error": ("event", "state", "errno", "sector", "once", "immediately", "iotype"),
    "set-state": ("event", "state", "new_state"),
    "fault": ("op", "sector", "nsectors", "offset", "length", "queue", "state", "new_state",
              "after",
              "every", "nth", "times", "once", "probability", "seed", "action", "errno",
              "status", "delay", "delay-max", "distribution", "bits", "sectors", "count",
              "order", "timeout", "release-after", "keep", "torn", "mark", "time"),
}
# [fault] keys that pick requests: a power-cut rule with a mark or a time and
# none of these cuts the power at that mark or time itself, on no request
MATCH_KEYS = ("op", "sector", "nsectors", "offset", "length", "queue", "state", "after",
              "every", "nth", "times", "once", "probability")
MAX_MARK = 64       # bytes of a mark's name (a 512-byte log sector holds 487)


class RulesError(GraphError):
    """A rules file (or rule) that cannot be used: one line, file:line: key."""


class Rule:
    """One rule as plain values (what the file says, checked); ``c`` fills
    its struct pykvm_inject_rule."""

    def __init__(self, kind: str, where: str, **kw):
        self.kind = kind
        self.where = where          # "rules.conf:3" (messages)
        self.event = kw.get("event")
        self.state = kw.get("state", 0)
        self.new_state = kw.get("new_state", 0)
        self.ops = kw.get("ops", ())
        self.offset = kw.get("offset", -1)
        self.length = kw.get("length", 0)
        self.queue = kw.get("queue", -1)
        self.once = kw.get("once", False)
        self.after = kw.get("after", 0)
        self.every = kw.get("every", 1)
        self.times = kw.get("times", 0)
        self.probability = kw.get("probability", 1.0)
        self.seed = kw.get("seed", 0)
        self.action = kw.get("action", "error")
        self.value = kw.get("value", 0)
        self.distribution = kw.get("distribution", "fixed")
        self.delay_ns = kw.get("delay_ns", 0)
        self.delay_max_ns = kw.get("delay_max_ns", 0)
        self.order = kw.get("order", "reverse")
        self.timeout_ns = kw.get("timeout_ns", 10_000_000)
        self.order_value = kw.get("order_value")      # power-cut: torn (in the order field)
        self.order_list = kw.get("order_list", ())    # hold: order given as positions
        self.release_after = kw.get("release_after", 0)
        self.mark = kw.get("mark")                    # armed by the mark of that name
        self.time_ns = kw.get("time_ns")              # armed that long after the run starts
        self.instant = kw.get("instant", False)       # power-cut at the mark or time itself

    def __repr__(self):
        return f"<Rule {self.kind} {self.action} at {self.where}>"

    def c(self, r) -> None:
        r.kind = {"inject-error": lib.PYKVM_INJ_RULE_INJECT_ERROR,
                  "set-state": lib.PYKVM_INJ_RULE_SET_STATE,
                  "fault": lib.PYKVM_INJ_RULE_FAULT}[self.kind]
        r.event = EVENT_IDS.get(self.event, 0xFFFFFFFF) if self.event else 0xFFFFFFFF
        r.state = self.state
        r.new_state = self.new_state
        r.ops = sum(1 << OPS[o] for o in self.ops)
        r.offset = self.offset
        r.length = self.length
        r.queue = self.queue
        r.once = int(self.once)
        r.after = self.after
        r.every = self.every
        r.times = self.times
        r.probability = self.probability
        r.seed = self.seed
        r.action = ACTIONS[self.action] if self.kind != "set-state" else 0
        r.value = self.value
        r.dist = DISTRIBUTIONS[self.distribution]
        r.delay_ns = self.delay_ns
        r.delay_max_ns = self.delay_max_ns
        if self.order_value is not None:
            r.order = self.order_value
        elif self.order_list:
            r.order = lib.PYKVM_INJ_ORDER_GIVEN
        else:
            r.order = ORDERS[self.order]
        r.timeout_ns = self.timeout_ns
        r.order_list = sum(p << 4 * k for k, p in enumerate(self.order_list))
        r.order_n = len(self.order_list)
        r.release_after = self.release_after
        r.waiting = int(self.mark is not None or self.time_ns is not None)


# -- parsing --------------------------------------------------------------------------

_SECTION = re.compile(r'^\[\s*([A-Za-z0-9_-]+)(?:\s+"[^"]*")?\s*\]$')
_ITEM = re.compile(r'^([A-Za-z0-9_.-]+)\s*=\s*(.*)$')


def parse_rules(text: str, source: str = "rules") -> list[Rule]:
    """The rules of a blkdebug config file's text; RulesError on anything wrong."""
    sections: list[tuple[str, int, dict]] = []
    cur = None
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = _SECTION.match(s)
        if m:
            name = m.group(1)
            if name not in KEYS:
                raise RulesError(f"{source}:{no}", f"unknown section [{name}] (one of "
                                 f"{', '.join('[' + k + ']' for k in KEYS)})")
            cur = (name, no, {})
            sections.append(cur)
            continue
        m = _ITEM.match(s)
        if not m:
            raise RulesError(f"{source}:{no}", f"cannot parse {s[:40]!r} (a [section] or "
                             f"key = \"value\")")
        if cur is None:
            raise RulesError(f"{source}:{no}", f"key '{m.group(1)}' before any [section]")
        key, value = m.group(1), m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key not in KEYS[cur[0]]:
            raise RulesError(f"{source}:{no}", f"key '{key}' does not apply to [{cur[0]}] "
                             f"(it takes {', '.join(KEYS[cur[0]])})")
        if key in cur[2]:
            raise RulesError(f"{source}:{no}", f"key '{key}' is given twice")
        cur[2][key] = (value, no)
    rules = [rule_from(kind, items, f"{source}:{no}") for kind, no, items in sections]
    if len(rules) > MAX_RULES:
        raise RulesError(source, f"{len(rules)} rules (at most {MAX_RULES})")
    return rules


def rule_from(kind: str, items: dict, where: str) -> Rule:
    """A Rule from a section's ``{key: (text, line)}`` (or ``{key: value}``
    from the API: values may be Python values there)."""
    items = {k: v if isinstance(v, tuple) else (v, None) for k, v in items.items()}
    source = where.rsplit(":", 1)[0]

    def err(key, why):
        line = items[key][1] if key in items and items[key][1] else None
        at = f"{source}:{line}" if line else where
        return RulesError(at, f"key '{key}': {why}")

    def get(key, conv, default=None):
        if key not in items:
            return default
        raw = items[key][0]
        try:
            return conv(raw)
        except (ValueError, TypeError, OverflowError) as e:
            raise err(key, f"{raw!r}: {e}") from None

    kw = {}
    if kind in ("inject-error", "set-state"):
        if "event" not in items:
            raise RulesError(where, f"[{kind}] needs an event")
        kw["event"] = get("event", _event)
        kw["state"] = get("state", _int_range(0, 1 << 31), 0)
        if kind == "set-state":
            kw["new_state"] = get("new_state", _int_range(0, 1 << 31), 0)
            return Rule(kind, where, **kw)
        kw["action"] = "error"
        kw["value"] = get("errno", _errno_value, _errno.EIO)
        sector = get("sector", _int_range(-1, 1 << 54), -1)
        kw["offset"] = -1 if sector == -1 else sector * SECTOR
        kw["once"] = get("once", _bool, False)
        get("immediately", _bool, False)   # completions are always asynchronous here
        kw["ops"] = get("iotype", _ops(QEMU_IOTYPES), QEMU_IOTYPES)
        return Rule(kind, where, **kw)
    # [fault]
    if "action" not in items:
        raise RulesError(where, "[fault] needs an action (one of " + ", ".join(ACTIONS) + ")")
    action = get("action", _choice(ACTIONS))
    kw["action"] = action
    allowed = ACTION_OPS.get(action, tuple(OPS))
    ops = get("op", _ops(tuple(OPS)), ACTION_OPS.get(action, DEFAULT_OPS))
    bad = [o for o in ops if o not in allowed]
    if bad:
        raise err("op", f"action {action} does not apply to {bad[0]} (it applies to "
                  f"{', '.join(allowed)})")
    if "get-id" in ops and action not in ("error", "status"):
        raise err("op", f"get-id takes only the error and status actions, not {action}")
    kw["ops"] = ops
    if ("sector" in items or "nsectors" in items) and ("offset" in items or "length" in items):
        raise err("offset", "give a range as sector/nsectors or as offset/length, not both")
    if "sector" in items or "nsectors" in items:
        start = get("sector", _int_range(0, 1 << 54), 0) * SECTOR
        length = get("nsectors", _int_range(1, 1 << 54), 1) * SECTOR
    elif "offset" in items or "length" in items:
        start = get("offset", _size, 0)
        length = get("length", _size, 0)
        if "length" in items and length == 0:
            raise err("length", "an empty range matches nothing")
        if "length" not in items:
            length = 1
    else:
        start, length = -1, 0
    if start >= 0 and start + length > 1 << 63:
        raise err("length" if "length" in items else "nsectors", "the range ends past 2^63")
    kw["offset"], kw["length"] = start, length
    kw["queue"] = get("queue", _int_range(0, 65535), -1)
    kw["state"] = get("state", _int_range(0, 1 << 31), 0)
    kw["new_state"] = get("new_state", _int_range(0, 1 << 31), 0)
    if "nth" in items and ("after" in items or "every" in items or "times" in items):
        raise err("nth", "nth is after/times in one: give it alone")
    nth = get("nth", _int_range(1, 1 << 62))
    kw["after"] = nth - 1 if nth else get("after", _int_range(0, 1 << 62), 0)
    kw["every"] = get("every", _int_range(1, 1 << 62), 1)
    times = 1 if nth or get("once", _bool, False) else get("times", _int_range(0, 1 << 62), 0)
    kw["times"] = times
    kw["probability"] = get("probability", _probability, 1.0)
    kw["seed"] = get("seed", _int_range(0, (1 << 64) - 1), 0)
    if action == "error":
        kw["value"] = get("errno", _errno_value, _errno.EIO)
    elif action == "status":
        if "status" not in items:
            raise RulesError(where, "action status needs status = ioerr or unsupp")
        kw["value"] = get("status", lambda v: STATUSES[_choice(STATUSES)(v)])
    elif action == "delay":
        if "delay" not in items:
            raise RulesError(where, "action delay needs delay = TIME (e.g. 10ms)")
        kw["delay_ns"] = get("delay", _duration)
        kw["distribution"] = get("distribution", _choice(DISTRIBUTIONS), "fixed")
        if kw["distribution"] == "uniform":
            if "delay-max" not in items:
                raise RulesError(where, "distribution uniform needs delay-max")
            kw["delay_max_ns"] = get("delay-max", _duration)
            if kw["delay_max_ns"] < kw["delay_ns"]:
                raise err("delay-max", "is shorter than delay")
    elif action == "corrupt":
        kw["value"] = get("bits", _int_range(1, MAX_BITS), 1)
    elif action in ("torn", "short"):
        kw["value"] = get("sectors", _int_range(0, 1 << 30), 1)
    elif action == "power-cut":
        kw["value"] = KEEPS.index(get("keep", _choice(KEEPS), "flushed"))
        kw["order_value"] = int(get("torn", _bool, False))
    elif action == "hold":
        order = get("order", _order, "reverse")
        if isinstance(order, tuple):
            kw["order"], kw["order_list"] = "fifo", order
        else:
            kw["order"] = order
        kw["release_after"] = get("release-after", _int_range(1, 1 << 30), 0)
        # release-after: held until that many others completed (count and
        # timeout only when given); an order given: as many as it names
        kw["value"] = get("count", _int_range(1, 65536),
                          65536 if kw["release_after"] else
                          len(kw["order_list"]) if "order_list" in kw else 2)
        kw["timeout_ns"] = get("timeout", _duration, 0 if kw["release_after"] else 10_000_000)
    if "mark" in items and "time" in items:
        raise err("time", "give mark or time, not both")
    kw["mark"] = get("mark", _mark_name)
    kw["time_ns"] = get("time", _duration)
    kw["instant"] = action == "power-cut" and ("mark" in items or "time" in items) and \
        not any(k in items for k in MATCH_KEYS)
    for key, applies in (("errno", "error"), ("status", "status"), ("delay", "delay"),
                         ("distribution", "delay"), ("delay-max", "delay"), ("bits", "corrupt"),
                         ("sectors", ("torn", "short")), ("count", "hold"), ("order", "hold"),
                         ("timeout", "hold"), ("release-after", "hold"), ("keep", "power-cut"),
                         ("torn", "power-cut")):
        if key in items and action not in (applies if isinstance(applies, tuple) else (applies,)):
            raise err(key, f"applies to action {' or '.join(applies) if isinstance(applies, tuple) else applies}, not {action}")
    return Rule("fault", where, **kw)


def _event(v) -> str:
    v = str(v)
    if v in EVENT_IDS:
        return v
    dotted = v.replace("_", ".")
    for name in EVENTS:     # l2_alloc_write for l2_alloc.write
        if name.replace("_", ".") == dotted:
            return name
    if v in QEMU_ONLY_EVENTS:
        raise ValueError(f"an event this node never raises (it raises {', '.join(EVENTS)})")
    raise ValueError(f"unknown event (one of {', '.join(EVENTS)})")


def _mark_name(v) -> str:
    v = str(v)
    if not v or len(v.encode()) > MAX_MARK or not v.isprintable():
        raise ValueError(f"a mark's name is 1 to {MAX_MARK} printable bytes")
    return v


def _int_range(lo: int, hi: int):
    def conv(v):
        if isinstance(v, bool):
            raise ValueError("not a number")
        n = v if isinstance(v, int) else int(str(v), 0)
        if not lo <= n <= hi:
            raise ValueError(f"out of range [{lo}, {hi}]")
        return n
    return conv


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise ValueError("takes on or off")


def _choice(options):
    def conv(v):
        if v not in options:
            raise ValueError(f"not one of {', '.join(options)}")
        return v
    return conv


def _ops(allowed):
    def conv(v):
        items = list(v) if isinstance(v, (list, tuple)) else [x.strip() for x in str(v).split(",")]
        for x in items:
            if x not in allowed:
                raise ValueError(f"'{x}' is not one of {', '.join(allowed)}")
        if not items:
            raise ValueError("empty")
        return tuple(dict.fromkeys(items))
    return conv


def _errno_value(v) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif str(v).isdigit():
        n = int(str(v))
    else:
        n = getattr(_errno, str(v).upper(), None)
        if not isinstance(n, int):
            raise ValueError("not an errno (a number, or a name such as EIO or ENOSPC)")
    if not 0 <= n < 4096:
        raise ValueError("out of range")
    return n


def _order(v):
    """hold's order: reverse, random, fifo, or the positions of the held
    completions in the order they go back (0: the first held), comma-separated."""
    if isinstance(v, (list, tuple)):        # from the API: order=[2, 0, 1]
        v = ",".join(str(int(x)) for x in v)
    v = str(v).strip()
    if v in ORDERS:
        return v
    try:
        pos = tuple(int(x) for x in v.split(","))
    except ValueError:
        raise ValueError(f"not one of {', '.join(ORDERS)}, nor positions such as 2,0,1") \
            from None
    if not 1 <= len(pos) <= lib.PYKVM_INJ_MAX_ORDER_LIST or \
            not all(0 <= p < lib.PYKVM_INJ_MAX_ORDER_LIST for p in pos):
        raise ValueError(f"at most {lib.PYKVM_INJ_MAX_ORDER_LIST} positions, each in "
                         f"[0, {lib.PYKVM_INJ_MAX_ORDER_LIST - 1}]")
    if len(set(pos)) != len(pos):
        raise ValueError("a position is named twice")
    return pos


def _probability(v) -> float:
    p = float(v)
    if not 0.0 <= p <= 1.0:
        raise ValueError("a probability is in [0, 1]")
    return p


def _duration(v) -> int:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        ns = int(v * 1_000_000_000)        # the API: seconds
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ns|us|ms|s)\s*", str(v))
        if not m:
            raise ValueError("a time with its unit: ns, us, ms or s (e.g. 10ms)")
        ns = int(float(m.group(1)) * TIME_UNITS[m.group(2)])
    if not 0 <= ns <= MAX_DELAY_NS:
        raise ValueError("at most an hour")
    return ns


def _size(v) -> int:
    from .graph import parse_size
    return parse_size(v)


def read_rules(path: str) -> list[Rule]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RulesError(path, f"cannot read the rules file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RulesError(path, "the rules file is not text (UTF-8)") from None
    return parse_rules(text, path)


# -- the engine ----------------------------------------------------------------------

class Hit:
    """What the engine said about one request (struct pykvm_inject_hit)."""

    __slots__ = ("rule", "action", "value", "order", "delay_ns", "timeout_ns", "seed",
                 "order_list", "release_after")

    def __init__(self, h):
        self.rule = h.rule
        self.action = ACTION_NAMES.get(h.action, "none")
        self.value = h.value
        self.order = h.order
        self.delay_ns = h.delay_ns
        self.timeout_ns = h.timeout_ns
        self.seed = h.seed
        self.order_list = tuple(h.order_list >> 4 * k & 15 for k in range(h.order_n))
        self.release_after = h.release_after


class Injector:
    """A disk's rules and their state (native/inject.c), shared by its
    C I/O threads and its Python path. ``release()`` lets hung requests and
    held completions go, on both paths (``on_release`` callbacks: the
    backend and each running C path register theirs)."""

    def __init__(self, rules: list[Rule]):
        self.rules = list(rules)
        table = ffi.new("struct pykvm_inject_rule[]", max(1, len(self.rules)))
        for r, rule in zip(table, self.rules):
            rule.c(r)
        ptr = lib.pykvm_inject_new(table, len(self.rules))
        if ptr == ffi.NULL:
            raise MemoryError("out of memory for the rule engine")
        self.c = ffi.gc(ptr, lib.pykvm_inject_free)
        self._hit = ffi.new("struct pykvm_inject_hit *")
        self._lock = threading.Lock()
        self.on_release: list = []
        self.on_mark: list = []             # each live disk's BlockBackend.mark (Disk.mark)
        self.removed: set[int] = set()
        self.armed: set[int] = set()        # rules whose mark or time has come
        self._clock = None                  # the run's start (monotonic s), once started
        self._on_cut = None                 # callable(rule): a power cut at a mark or a time
        self._timers: list[threading.Timer] = []

    def add(self, rule: Rule) -> int:
        """Add a rule now (the paths may be serving); its index."""
        r = ffi.new("struct pykvm_inject_rule *")
        rule.c(r)
        with self._lock:
            i = lib.pykvm_inject_add(self.c, r)
            if i < 0:
                raise MemoryError("out of memory for a rule")
            self.rules.append(rule)
            if self._clock is not None and rule.time_ns is not None:
                self._schedule(i)
        return i

    # -- marks and times: rules that wait for them ------------------------------------

    def mark(self, name: str) -> list[int]:
        """The mark ``name`` was made: the rules waiting for it are armed; the
        indexes of those that cut the power at it (the caller stops the disk)."""
        cuts = []
        with self._lock:
            for i, rule in enumerate(self.rules):
                if rule.mark == name and i not in self.armed and i not in self.removed:
                    if self._arm(i):
                        cuts.append(i)
        return cuts

    def start_clock(self, on_cut) -> None:
        """The run starts (the VM runs, the export serves): ``time`` counts
        from now; ``on_cut(rule)`` is called when a rule cuts the power at its
        time (from a timer thread)."""
        with self._lock:
            if self._clock is not None:
                return
            self._clock, self._on_cut = time.monotonic(), on_cut
            for i, rule in enumerate(self.rules):
                if rule.time_ns is not None:
                    self._schedule(i)

    def stop_clock(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, []
        for t in timers:
            t.cancel()

    def _schedule(self, i: int) -> None:
        due = self._clock + self.rules[i].time_ns / 1e9 - time.monotonic()
        t = threading.Timer(max(0.0, due), self._at_time, (i,))
        t.daemon = True
        t.name = f"blkdebug-time-{i}"
        self._timers.append(t)
        t.start()

    def _at_time(self, i: int) -> None:
        with self._lock:
            if i in self.armed or i in self.removed or self._on_cut is None:
                return
            cut = self._arm(i)
        if cut:
            self._on_cut(i)

    def _arm(self, i: int) -> bool:
        """(lock held) Rule i's mark or time came; True when it cuts the power now."""
        self.armed.add(i)
        if self.rules[i].instant:
            return bool(lib.pykvm_inject_cut(self.c, i))
        lib.pykvm_inject_arm(self.c, i)
        return False

    def remove(self, i: int) -> None:
        """Rule ``i`` matches nothing from now on (its counts stay; the other
        rules keep their indexes)."""
        if not 0 <= i < len(self.rules):
            raise IndexError(f"no rule {i}")
        lib.pykvm_inject_remove(self.c, i)
        self.removed.add(i)

    def check(self, op: str, offset: int, length: int, queue: int = 0,
              guest: bool = True) -> Hit | None:
        with self._lock:
            if not lib.pykvm_inject_check(self.c, OPS[op], offset, length, queue,
                                          lib.PYKVM_INJ_GUEST if guest else 0, self._hit):
                return None
            return Hit(self._hit)

    def event(self, name: str) -> None:
        lib.pykvm_inject_event(self.c, EVENT_IDS[name])

    def release(self) -> None:
        lib.pykvm_inject_release(self.c)
        for fn in list(self.on_release):
            fn()

    @property
    def state(self) -> int:
        return lib.pykvm_inject_state(self.c)

    @property
    def release_gen(self) -> int:
        return lib.pykvm_inject_release_gen(self.c)

    def counts(self) -> list[dict]:
        """For each rule: where it was written, its action, how often it
        matched a request and fired."""
        m, f = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        out = []
        for i, rule in enumerate(self.rules):
            lib.pykvm_inject_rule_counts(self.c, i, m, f)
            out.append({"rule": i, "where": rule.where, "kind": rule.kind,
                        "action": rule.action if rule.kind != "set-state" else "set-state",
                        "matched": m[0], "fired": f[0], "removed": i in self.removed})
        return out

    def events(self) -> dict:
        return {name: lib.pykvm_inject_event_count(self.c, i) for i, name in enumerate(EVENTS)}


# Engines the API made (pykvm.testing), for the node option x-injector=NAME:
# rules added and released from a test reach the disk a VM opens.
_NAMED: dict[str, Injector] = {}


def name_injector(inj: Injector) -> str:
    name = f"injector{len(_NAMED)}"
    _NAMED[name] = inj
    return name


def named_injector(name: str) -> Injector | None:
    return _NAMED.get(name)


def flip_positions(seed: int, bits: int, nbytes: int) -> list[int]:
    """The bit positions a corruption flips: those the C path flips for the
    same seed (in runs of 64, the k-th from seed + k)."""
    out = ffi.new("uint64_t[64]")
    positions = []
    k = 0
    while bits > 0:
        n = min(bits, 64)
        lib.pykvm_inject_flip_positions((seed + k) & (1 << 64) - 1, n, nbytes, out)
        positions += list(out)[:n]
        bits -= n
        k += 1
    return positions


def shuffle(seed: int, n: int) -> list[int]:
    idx = ffi.new("uint32_t[]", list(range(n)) or [0])
    lib.pykvm_inject_shuffle(seed, idx, n)
    return list(idx)[:n]
