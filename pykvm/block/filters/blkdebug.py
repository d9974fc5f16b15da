"""The ``blkdebug`` filter node: QEMU's error injection, and more.

Spelled as in QEMU: ``driver=blkdebug,config=rules.conf,image.filename=disk.qcow2``
(the node at the top: the image's format is probed below it) or
``file=blkdebug:rules.conf:disk.qcow2`` (the node as the protocol under the
format: qcow2's metadata writes go through it). The rules file is QEMU's
blkdebug config format with our ``[fault]`` section (block/inject.py says
every key). The node changes nothing on the data's way itself: the backend
above asks its rule engine (native/inject.c) about each guest request, on the
Python path and in the C I/O thread alike, and a format below raises its
metadata events on it (``debug_event``) and asks before each metadata write
(``meta_error``).
"""
from __future__ import annotations

from ..driver import GraphError, register
from ..inject import Injector, Rule, named_injector, read_rules, rule_from
from . import FilterDriver


@register
class BlkdebugDriver(FilterDriver):
    format_name = "blkdebug"
    child_roles = ("image",)
    # x-injector: the name of an engine the API made (pykvm.testing), which
    # this node then uses instead of one of its own (QEMU's x- prefix: internal)
    options = {"config": "str", "x-injector": "str"}

    def __init__(self, file, read_only: bool = False, config: str | None = None,
                 x_injector: str | None = None):
        super().__init__(file, read_only)
        self.config = config
        if x_injector is not None:
            if config:
                raise GraphError("", "options 'config' and 'x-injector' exclude each other")
            inj = named_injector(x_injector)
            if inj is None:
                raise GraphError("", f"no rule engine named '{x_injector}'")
            self.injector = inj
        else:
            self.injector = Injector(read_rules(config) if config else [])

    @property
    def children(self):
        return [("image", self.file)]

    def c_path_punts(self) -> list[str]:
        return ["discard and write-zeroes rules (those requests are Python's anyway)"] \
            if self.injector.rules else []

    # -- what a format below asks -------------------------------------------------------

    def debug_event(self, name: str) -> None:
        self.injector.event(name)

    def meta_error(self, offset: int, length: int) -> int:
        """The errno a metadata write of the format above must fail with (0: none)."""
        hit = self.injector.check("write", offset, length, guest=False)
        return hit.value if hit is not None else 0


def rule(kind: str = "fault", **keys) -> Rule:
    """A rule from Python values, keys as in the rules file (``-`` or ``_``):
    ``rule(action="error", op="write", nth=3)``."""
    if kind not in ("fault", "inject-error", "set-state"):
        raise GraphError("rule", f"unknown rule kind {kind!r}")
    items = {k.replace("_", "-") if k not in ("new_state",) else k: v for k, v in keys.items()}
    return rule_from(kind, items, "rule")

