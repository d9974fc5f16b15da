"""A QMP control socket: ``--qmp unix:PATH,server=on,wait=off`` on ``pykvm
run``, ``fio`` and ``serve``, QEMU's spelling and wire protocol.

The server listens on a Unix socket (created 0600) and serves one client at a
time, as QEMU's monitor does: the greeting ``{"QMP": {"version": ...,
"capabilities": []}}``, then ``qmp_capabilities``, then one JSON command
object at a time, each answered ``{"return": ...}`` or ``{"error": {"class":
..., "desc": ...}}`` with the command's ``id`` echoed. ``wait=on`` (QEMU's
default for a server) holds the run until the first client has connected.

Commands, QEMU's where QEMU has them:

- ``query-status``: ``{"running": bool, "status": "running" | "paused"}``
- ``stop``, ``cont``: pause and resume the VM (``pykvm run``/``fio`` only)
- ``quit``: end the run (the VM stops, an export stops serving)
- ``query-version``, ``query-commands``
- ``log-mark`` (pykvm's): ``{"name": NAME, "device": "disk0"}``: a mark in
  the disk's write log (its blklogwrites node), and for the blkdebug rules
  that wait for it (``mark = NAME``: a power cut at a mark happens here);
  ``device`` may be left out when there is one disk. ``pykvm log mark
  --qmp PATH NAME`` sends it.

The target (machine.Machine, serve.NbdExport/VhostUserExport) provides
``qmp_disks()`` (name: BlockBackend), ``qmp_status()``, ``qmp_stop()``,
``qmp_cont()`` and ``qmp_quit()``; a target that cannot pause raises
QmpError.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading

from .errors import ConfigError, PykvmError

log = logging.getLogger("pykvm.qmp")

MAX_COMMAND = 1 << 20          # bytes of one command object (a client past it is dropped)
COMMANDS = ("qmp_capabilities", "query-status", "query-version", "query-commands", "stop",
            "cont", "quit", "log-mark")


class QmpError(PykvmError):
    """A command that failed: its QMP error class and description."""

    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def parse_spec(text: str) -> tuple[str, bool]:
    """``unix:PATH,server=on,wait=off`` (or QEMU's older ``server,nowait``)
    -> (path, wait)."""
    if not text.startswith("unix:"):
        raise ConfigError(f"--qmp {text}: pykvm serves QMP on a Unix socket: "
                          f"unix:PATH,server=on,wait=off")
    path, *opts = text[5:].split(",")
    if not path:
        raise ConfigError(f"--qmp {text}: no socket path")
    server, wait = None, True
    for o in opts:
        key, eq, value = o.partition("=")
        if key in ("server", "wait") and (not eq or value in ("on", "off")):
            on = not eq or value == "on"
            if key == "server":
                server = on
            else:
                wait = on
        elif key == "nowait" and not eq:
            wait = False
        else:
            raise ConfigError(f"--qmp {text}: unknown option '{o}' (server=on, wait=on|off)")
    if server is not True:
        raise ConfigError(f"--qmp {text}: pykvm listens for the QMP client: give server=on "
                          f"(e.g. unix:{path},server=on,wait=off)")
    return path, wait


def _version() -> dict:
    try:
        from importlib.metadata import version
        v = version("pykvm")
    except Exception:
        v = "0.0.0"
    nums = [int(x) if x.isdigit() else 0 for x in (v.split(".") + ["0", "0"])[:3]]
    return {"qemu": {"major": nums[0], "minor": nums[1], "micro": nums[2]},
            "package": f"pykvm {v}"}


class QmpServer:
    """Serves ``target`` on ``path`` from a thread until close()."""

    def __init__(self, target, path: str, wait: bool = False):
        self.target = target
        self.path = path
        try:
            if os.path.exists(path):
                os.unlink(path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                self.sock.bind(path)
            finally:
                os.umask(old)
            self.sock.listen(1)
        except OSError as e:
            raise ConfigError(f"--qmp unix:{path}: {e.strerror}") from None
        self._closing = False
        self._client: socket.socket | None = None
        self._connected = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="qmp", daemon=True)
        self.thread.start()
        if wait:
            log.info("QMP: waiting for a client on %s", path)
            self._connected.wait()

    def close(self) -> None:
        self._closing = True
        for s in (self._client, self.sock):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.sock.close()
        self.thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    # -- the loop ------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._client = conn
            self._connected.set()
            try:
                self._session(conn)
            except OSError:
                pass
            finally:
                self._client = None
                conn.close()

    def _session(self, conn: socket.socket) -> None:
        send = lambda obj: conn.sendall(json.dumps(obj).encode() + b"\r\n")   # noqa: E731
        send({"QMP": {"version": _version(), "capabilities": []}})
        negotiated = False
        buf = ""
        dec = json.JSONDecoder()
        while not self._closing:
            data = conn.recv(65536)
            if not data:
                return
            buf += data.decode(errors="replace")
            while True:
                buf = buf.lstrip()
                if not buf:
                    break
                try:
                    cmd, end = dec.raw_decode(buf)
                except json.JSONDecodeError:
                    if len(buf) > MAX_COMMAND:
                        send({"error": {"class": "GenericError",
                                        "desc": "a command of more than 1 MiB"}})
                        return
                    break       # incomplete: read on
                buf = buf[end:]
                reply, negotiated = self._answer(cmd, negotiated)
                send(reply)

    def _answer(self, cmd, negotiated: bool) -> tuple[dict, bool]:
        ident = cmd.get("id") if isinstance(cmd, dict) else None
        out: dict
        try:
            if not isinstance(cmd, dict) or not isinstance(cmd.get("execute"), str):
                raise QmpError("QMP input must be an object with 'execute'")
            name = cmd["execute"]
            args = cmd.get("arguments", {})
            if not isinstance(args, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
            if name == "qmp_capabilities":
                if negotiated:
                    raise QmpError("Capabilities negotiation is already complete, command "
                                   "ignored", "CommandNotFound")
                out, negotiated = {"return": {}}, True
            elif not negotiated:
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            elif name not in COMMANDS:
                raise QmpError(f"The command {name} has not been found", "CommandNotFound")
            else:
                out = {"return": self._run(name, args)}
        except QmpError as e:
            out = {"error": {"class": e.cls, "desc": e.desc}}
        except PykvmError as e:
            out = {"error": {"class": "GenericError", "desc": str(e)}}
        if ident is not None:
            out["id"] = ident
        return out, negotiated

    def _run(self, name: str, args: dict):
        t = self.target
        if name == "query-status":
            st = t.qmp_status()
            return {"running": st == "running", "status": st}
        if name == "query-version":
            return _version()
        if name == "query-commands":
            return [{"name": c} for c in COMMANDS]
        if name == "stop":
            t.qmp_stop()
            return {}
        if name == "cont":
            t.qmp_cont()
            return {}
        if name == "quit":
            t.qmp_quit()
            return {}
        # log-mark
        unknown = set(args) - {"name", "device"}
        if unknown:
            raise QmpError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
        mark = args.get("name")
        if not isinstance(mark, str):
            raise QmpError("Parameter 'name' is missing" if mark is None else
                           "Invalid parameter type for 'name', expected: string")
        disks = t.qmp_disks()
        device = args.get("device")
        if device is None:
            if len(disks) != 1:
                raise QmpError(f"Parameter 'device' is missing (disks: {', '.join(disks)})")
            device = next(iter(disks))
        if device not in disks:
            raise QmpError(f"Device '{device}' not found", "DeviceNotFound")
        return disks[device].mark(mark)


def command(path: str, execute: str, arguments: dict | None = None, timeout: float = 10):
    """Connect to a QMP socket, negotiate, run one command: its ``return``
    value; PykvmError (one line) for a refused connection or an error reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
        f = s.makefile("rwb")

        def reply():
            line = f.readline()
            if not line:
                raise PykvmError(f"{path}: the QMP server closed the connection")
            return json.loads(line)
        greeting = reply()
        if "QMP" not in greeting:
            raise PykvmError(f"{path}: not a QMP server")
        for cmd in ({"execute": "qmp_capabilities"},
                    {"execute": execute, **({"arguments": arguments} if arguments else {})}):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            r = reply()
            if "error" in r:
                raise PykvmError(f"{execute}: {r['error'].get('desc', r['error'])}")
        return r.get("return")
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise PykvmError(f"{path}: {why}") from None
    finally:
        s.close()
