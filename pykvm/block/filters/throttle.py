"""The ``throttle`` filter node: QEMU's ``driver=throttle,throttle-group=NAME``.

Its requests obey the limits of a throttle group defined elsewhere (``--object
throttle-group,id=NAME,limits.iops-total=...``, or the ``throttling.group=``
of another disk), shared with every disk and node that names it. The node
changes nothing on the data's way; the backend above it holds what must wait,
on the Python path and in the C I/O thread alike (block/throttle.py).
"""
from __future__ import annotations

from ..driver import GraphError, register
from ..throttle import find_group
from . import FilterDriver


@register
class ThrottleDriver(FilterDriver):
    format_name = "throttle"
    options = {"throttle-group": "str"}

    def __init__(self, file, read_only: bool = False, throttle_group: str | None = None):
        super().__init__(file, read_only)
        if not throttle_group:
            raise GraphError("", "option 'throttle-group' is missing (the group whose limits "
                             "apply)")
        group = find_group(throttle_group)
        if group is None:
            raise GraphError("", f"throttle group '{throttle_group}' does not exist (define it "
                             f"with --object throttle-group,id={throttle_group},"
                             f"limits.iops-total=...)")
        self.group = group
