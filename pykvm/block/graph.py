"""Building the block graph from QEMU's options.

A node is described as QEMU describes it to ``-blockdev`` and ``-drive``: a
``driver`` and its options, where a child (``file``, ``backing``,
``data-file``) is either a nested description or a filename. Three spellings
give the same nested dict:

  dotted keys   driver=qcow2,file.driver=file,file.filename=a.qcow2,backing.file.filename=b
  json:         json:{"driver": "qcow2", "file": {"driver": "file", "filename": "a.qcow2"}}
  short         a.qcow2   (file=a.qcow2: a file node, the format probed above it)

``open_node`` opens the nodes bottom-up, checking every option against the
driver that takes it: an unknown driver, a missing child, an option that does
not apply, a backing loop are one ``BlockError`` naming the node and the
option, before anything is written. Nodes are named by ``node-name=`` or by
their place in the tree (``disk0``, ``disk0/file``, ``disk0/backing``), and
their errors carry that name: ``qcow2 node 'disk0': file 'a.qcow2': ...``.
"""
from __future__ import annotations

import json
import os

from .driver import (DRIVERS, FORMATS, BlockDriver, BlockError, GraphError, fd_pread,
                     probe_header)

# options every node takes (QEMU's BlockdevOptions base), besides its driver's
COMMON = ("driver", "node-name", "read-only")
# Backing files below an image, at most (README.md, "Limits"; QEMU sets none). Opening
# a node and reading through the chain recurse once a level.
MAX_BACKING_DEPTH = 100
# Nodes from the root to the deepest leaf, and JSON nesting in a json: filename (QEMU's
# JSON parser takes 1024 levels; here each level is a few Python frames).
MAX_GRAPH_DEPTH = MAX_BACKING_DEPTH + 16
MAX_JSON_NESTING = 2 * MAX_GRAPH_DEPTH
SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                 "p": 1 << 50, "e": 1 << 60}


# -- spellings ---------------------------------------------------------------------------

def split_commas(text: str) -> list[str]:
    """Split on commas, where ',,' stands for a literal comma (as in QEMU)."""
    items, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    items.append(cur)
    return items


def nest(flat: dict, what: str = "options") -> dict:
    """{'file.driver': 'file', 'file.filename': 'a'} -> {'file': {'driver': 'file', ...}}."""
    out: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        if not all(parts):
            raise GraphError(what, f"option '{key}' has an empty component")
        d = out
        for i, part in enumerate(parts[:-1]):
            cur = d.get(part)
            if cur is None:
                cur = d[part] = {}
            elif not isinstance(cur, dict):
                # 'file=a.qcow2' and 'file.driver=...' together: QEMU's rule is the same
                raise GraphError(what, f"option '{'.'.join(parts[:i + 1])}' is given both as "
                                 f"a value and with sub-options ('{key}')")
            d = cur
        if isinstance(d.get(parts[-1]), dict):
            raise GraphError(what, f"option '{key}' is given both as a value and with "
                             f"sub-options")
        d[parts[-1]] = value
    return out


def parse_json_filename(text: str) -> dict:
    """A ``json:{...}`` filename: the node's options as one JSON object, whose
    keys may be dotted too (QEMU flattens and nests them again)."""
    if _json_nesting(text[5:]) > MAX_JSON_NESTING:
        raise GraphError(text[:40], f"json: filename nested too deep (more than "
                         f"{MAX_JSON_NESTING} levels)")
    try:
        value = json.loads(text[5:])
    except ValueError as e:
        raise GraphError(text[:40], f"not a valid json: filename ({e})") from None
    if not isinstance(value, dict):
        raise GraphError(text[:40], "a json: filename must hold a JSON object")
    return _nest_json(value, text[:40])


def _json_nesting(text: str) -> int:
    """How deep the objects and arrays of a JSON text nest (brackets in strings
    do not count)."""
    depth = most = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            most = max(most, depth)
        elif ch in "]}":
            depth -= 1
    return most


def _nest_json(value: dict, what: str) -> dict:
    flat = {k: _nest_json(v, what) if isinstance(v, dict) else v for k, v in value.items()}
    dotted = {k: v for k, v in flat.items() if "." in k}
    if not dotted:
        return flat
    plain = {k: v for k, v in flat.items() if "." not in k}
    merged = nest(dotted, what)
    for k, v in merged.items():
        if isinstance(plain.get(k), dict) and isinstance(v, dict):
            plain[k] = {**plain[k], **v}
        elif k in plain:
            raise GraphError(what, f"option '{k}' is given twice")
        else:
            plain[k] = v
    return plain


NBD_SCHEMES = ("nbd://", "nbd+tcp://", "nbd+unix://", "nbds://", "nbds+tcp://", "nbds+unix://")


def filename_spec(filename: str) -> dict:
    """The node a filename stands for: json: options, a blkdebug node
    (``blkdebug:RULES:IMAGE``, QEMU's spelling), an nbd node (an NBD URI),
    else a file node."""
    if filename.startswith("json:"):
        return parse_json_filename(filename)
    if filename.startswith(NBD_SCHEMES):
        return {"driver": "nbd", "filename": filename}
    if filename.startswith("blkdebug:"):
        config, sep, image = filename[9:].partition(":")
        if not sep or not image:
            raise GraphError(filename[:40], "blkdebug: needs both a rules file and an image "
                             "(blkdebug:RULES:IMAGE)")
        spec = {"driver": "blkdebug", "image": filename_spec(image)}
        if config:
            spec["config"] = config
        return spec
    return {"driver": "file", "filename": filename}


def image_spec(filename, fmt: str | None = None) -> dict:
    """A format node over a filename (``fmt`` None: probed), as -drive file=,format=."""
    if isinstance(filename, dict):
        spec = dict(filename)
    elif filename.startswith("json:"):
        spec = parse_json_filename(filename)
    else:
        spec = {"file": filename}
    if fmt is not None:
        spec.setdefault("driver", fmt)
    return spec


def _error(where: str, why: str) -> GraphError:
    """An error of the node ``where`` (already named: its parents pass it on)."""
    e = GraphError(where, why)
    e.node = where
    return e


def _named(where: str, e: BlockError) -> BlockError:
    """A node's file error, named: "qcow2 node 'disk0': file 'a.qcow2': ..."."""
    err = type(e)(where, f"file '{e.path}': {e.why}" if e.path else e.why, e.errno)
    err.node = where
    return err


# -- option values -----------------------------------------------------------------------

def parse_size(text) -> int:
    """QEMU's sizes: a number of bytes with an optional k/M/G/T/P/E suffix."""
    if isinstance(text, bool):
        raise ValueError("not a size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("negative")
        return text
    t = str(text).strip()
    suffix = t[-1:].lower() if t[-1:].isalpha() else ""
    num = t[:-1] if suffix else t
    if suffix not in SIZE_SUFFIXES or not num:
        raise ValueError("not a size")
    value = float(num) if "." in num else int(num, 10)
    if value < 0:
        raise ValueError("negative")
    return int(value * SIZE_SUFFIXES[suffix])


def _value(kind, key: str, raw, where: str):
    if isinstance(kind, dict):          # sub-options: server.host=, server.port=, ...
        if not isinstance(raw, dict):
            raise _error(where, f"option '{key}' takes sub-options ({key}.{next(iter(kind))}=...)")
        out = {}
        for sub, value in raw.items():
            if sub not in kind:
                raise _error(where, f"option '{key}.{sub}' does not apply (it takes "
                             f"{', '.join(f'{key}.{k}' for k in kind)})")
            out[sub] = _value(kind[sub], f"{key}.{sub}", value, where)
        return out
    if kind == "int":
        try:
            value = raw if isinstance(raw, int) and not isinstance(raw, bool) else int(str(raw), 10)
        except ValueError:
            value = -1
        if value < 0:
            raise _error(where, f"option '{key}={raw}' takes a number (0 or more)")
        return value
    if kind == "str":
        if not isinstance(raw, str):
            raise _error(where, f"option '{key}' takes a string")
        return raw
    if kind == "size":
        try:
            return parse_size(raw)
        except (ValueError, OverflowError):
            raise _error(where, f"option '{key}={raw}' is not a size in bytes (a "
                             f"number, optionally with k, M, G or T)") from None
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if raw in ("on", "yes", "true"):
            return True
        if raw in ("off", "no", "false"):
            return False
        raise _error(where, f"option '{key}={raw}' takes on or off")
    if isinstance(kind, tuple):
        if raw not in kind:
            raise _error(where, f"option '{key}={raw}' is not one of {', '.join(kind)}")
        return raw
    raise AssertionError(kind)


# -- opening -----------------------------------------------------------------------------

class Opener:
    """Opens the children of one node from its options (QEMU's bdrv_open_child):
    a child given in the options (a nested description, a filename, or ''
    / JSON null for none) wins over the default the node itself names (a
    qcow2 header's backing file or data file)."""

    def __init__(self, children: dict, name: str, read_only: bool, direct: bool,
                 chain: frozenset, use=None):
        self.children = children        # role -> spec (dict, str, None) as given
        self.name = name
        self.read_only = read_only
        self.direct = direct
        self.chain = chain              # real paths of the images above (backing loops)
        self.use = use                  # what the node's users ask of it (locking.Use), or None
        self.driver = ""                # the node's driver, once known
        self.file: BlockDriver | None = None
        self.depth = 0                  # nodes above this one (MAX_GRAPH_DEPTH)

    def given(self, role: str) -> bool:
        return role in self.children

    def child(self, role: str, default: dict | None = None, *, read_only: bool | None = None,
              direct: bool | None = None) -> BlockDriver | None:
        """The ``role`` child as a node, or None (none given nor defaulted)."""
        spec = self.children[role] if role in self.children else default
        if spec is None or spec == "":
            return None
        if isinstance(spec, str):
            spec = filename_spec(spec) if role in ("file", "data-file", "log") else \
                image_spec(spec)
        elif role == "image" and "driver" not in spec and "filename" in spec:
            # a filter's image.filename=: the image's format is probed (QEMU's rule)
            spec = {"file": spec}
        chain = self.chain
        use = None
        if role == "backing":
            if self.file is not None:
                chain = chain | {os.path.realpath(self.file.filename)}
            if len(chain) > MAX_BACKING_DEPTH:   # the image's doing, not the options'
                raise BlockError(self.file.filename if self.file is not None else self.name,
                                 f"backing chain too deep (more than {MAX_BACKING_DEPTH} "
                                 f"backing files)")
            if self.use is not None:
                from .locking import backing_use
                use = backing_use(self.use)
        ro = self.read_only if read_only is None else read_only
        node = _open(spec, f"{self.name}/{role}", ro, self.direct if direct is None else direct,
                     chain, {}, use, self.depth + 1)
        if role == "data-file" and self.use is not None:
            try:
                node.lock(self._file_use())
            except BaseException:
                node.close()
                raise
        return node

    def _file_use(self):
        """What this node asks of its file and data file."""
        from .locking import file_use
        return self.use if DRIVERS[self.driver].kind == "filter" else \
            file_use(self.driver, self.use, not self.read_only)


def open_node(spec, *, read_only: bool = False, direct: bool = False, name: str = "",
              chain: frozenset = frozenset(), use=None, **internal) -> BlockDriver:
    """Open the graph ``spec`` describes (a nested dict, a json: filename or
    a plain filename) and return its root. ``direct``: O_DIRECT on the file
    nodes of the image itself (the cache mode's), not on its backing chain.
    ``chain``: real paths of images that would sit above it (a loop through
    them is refused). ``use`` (locking.Use): what its users ask of it, taken
    as QEMU's image locks on every file of the graph before any node writes
    (None: no locks). ``internal``: keyword arguments for the root driver
    beyond QEMU's options (``repair=False`` for pykvm img)."""
    if isinstance(spec, str):
        spec = image_spec(spec)
    return _open(spec, name, read_only, direct, chain, internal, use)


def _open(spec: dict, name: str, read_only: bool, direct: bool, chain: frozenset,
          internal: dict, use=None, depth: int = 0) -> BlockDriver:
    if not isinstance(spec, dict):
        raise _error(f"node '{name}'", f"a node is described by options, not {spec!r}")
    spec = dict(spec)
    driver = spec.pop("driver", None)
    node_name = spec.pop("node-name", None) or name
    if not isinstance(node_name, str):     # json: gives any JSON value
        raise _error(f"node '{name}'", "option 'node-name' takes a string")
    where = f"node '{node_name}'" if node_name else "node"
    if driver is not None and not isinstance(driver, str):
        raise _error(where, "option 'driver' takes a string")
    if "read-only" in spec:
        read_only = _value("bool", "read-only", spec.pop("read-only"), where) or read_only
    probed = False
    if driver is None:
        if "filename" in spec:
            driver = "file"
        elif "file" in spec:
            probed = True
        else:
            raise _error(where, "no driver given (driver=) and no file to probe (file=)")
    elif driver not in DRIVERS:
        raise _error(where, f"unknown driver '{driver}' (one of {', '.join(DRIVERS)})")
    if driver is not None:
        where = f"{driver} {where}"
    cls = DRIVERS.get(driver)
    roles = cls.child_roles if cls is not None else ("file", "data-file", "backing")
    children = {r: spec.pop(r) for r in list(spec) if r in roles}
    if spec.get("backing", 0) is None:
        del spec["backing"]     # "no backing file" holds for any node
    if depth > MAX_GRAPH_DEPTH:
        raise _error(where, f"graph too deep (more than {MAX_GRAPH_DEPTH} nodes from the root)")
    opener = Opener(children, node_name, read_only, direct, chain, use)
    opener.depth = depth
    if cls is not None and cls.kind == "protocol":
        if not any(key in spec for key in cls.address_options):
            raise _error(where, f"option '{cls.address_options[0]}' is missing" +
                         (f" (or {', '.join(cls.address_options[1:])})"
                          if len(cls.address_options) > 1 else ""))
        node = _make(cls, spec, where, node_name, probed, read_only=read_only, direct=direct,
                     **internal)
        if use is not None:
            try:
                node.lock(use)
            except BlockError as e:
                node.close()
                raise _named(where, e) from None
        return node
    primary = roles[0]      # file, or a blkdebug node's image
    if primary not in children or children[primary] in (None, ""):
        raise _error(where, f"option '{primary}' is missing (the node below it)")
    file = opener.child(primary)
    chain_path = os.path.realpath(file.filename)
    try:
        if chain_path in chain:
            raise _error(where, f"backing file loop: '{file.filename}' is its own "
                             f"(indirect) backing file")
        if cls is None:
            try:
                head = fd_pread(file.bfd, 4096, 0) if file.kind != "format" else b""
            except OSError as e:
                raise _error(where, f"cannot read the image's first bytes (to probe its "
                                    f"format): {e.strerror}") from None
            driver = probe_header(head, file.filename)
            cls = FORMATS[driver]
            where = f"{driver} {where}"
            if children.get("backing", 0) is None:
                del children["backing"]     # "no backing file" holds for any format
            bad = set(children) - set(cls.child_roles)
            if bad:
                raise _error(where, f"option '{sorted(bad)[0]}' does not apply (a {driver} "
                             f"image has no such child)")
        opener.file = file
        opener.driver = cls.format_name
        if use is not None:     # locked before the node reads or writes anything
            try:
                file.lock(opener._file_use())
            except BlockError as e:
                raise _named(where, e) from None
        kw = dict(internal)
        if cls.opens_children:
            kw["opener"] = opener
        return _make(cls, spec, where, node_name, probed, file=file, read_only=read_only, **kw)
    except BaseException:
        file.close()
        raise


def _make(cls, spec: dict, where: str, node_name: str, probed: bool, **kw) -> BlockDriver:
    for key, raw in spec.items():
        if key not in cls.options:
            takes = ", ".join(list(cls.options) + list(cls.child_roles)) or "no options"
            raise _error(where, f"option '{key}' does not apply (it takes {takes})")
        kw[key.replace("-", "_")] = _value(cls.options[key], key, raw, where)
    try:
        node = cls(**kw)
    except BlockError as e:
        if getattr(e, "node", None):
            raise
        raise _named(where, e) from None
    node.node_name = node_name
    node.probed = probed
    return node


def node_keys() -> set[str]:
    """Every option some node takes at its own level (COMMON, the drivers'
    options, the child roles)."""
    keys = set(COMMON)
    for cls in DRIVERS.values():
        keys |= set(cls.options) | set(cls.child_roles)
    return keys


# -- what a user sees --------------------------------------------------------------------

def walk(node: BlockDriver, path: str = ""):
    """(path, role, node) of every node, root first: ('', '', root), ('/file', 'file', ...)."""
    yield path, path.rpartition("/")[2], node
    for role, child in node.children:
        yield from walk(child, f"{path}/{role}")


def tree_lines(node: BlockDriver) -> list[str]:
    """The graph, one line a node, indented by depth:
    ``disk0: qcow2 (a.qcow2, 1 GiB)`` then ``  file: file (a.qcow2)``."""
    lines = []
    for path, role, n in walk(node):
        depth = path.count("/")
        label = role or n.node_name or "root"
        extra = f", {n.size} bytes" if depth == 0 else ""
        lines.append(f"{'  ' * depth}{label}: {n.format_name} ({n.filename}{extra})")
    return lines
