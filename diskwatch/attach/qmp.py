"""A small QMP client: JSON commands to a running QEMU, answers back.

Two ways to reach a monitor:

- ``QmpSocket``: QEMU's own QMP socket (``-qmp unix:PATH,server=on,wait=off``).
  Plain blocking sockets: attach sends a dozen commands, one at a time, and
  waits for each answer; asyncio or the ``qemu.qmp`` package would add a
  dependency and an event loop for nothing. Events that arrive between
  answers are skipped (attach polls ``query-jobs`` instead of waiting for
  events, so the libvirt path, which has no events, works the same way).
- ``VirshMonitor``: a libvirt domain, through ``virsh qemu-monitor-command``
  (libvirt owns the domain's monitor socket and keeps it connected).

A QEMU chardev socket serves one client at a time: while another client
(another diskwatch, a management tool) holds it, a new connection is accepted
by the kernel but QEMU never greets it. ``QmpSocket`` says so instead of
waiting forever.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
from typing import Any

from ..errors import DiskwatchError

#: An answer larger than this is refused: a monitor never controls how much we buffer.
MAX_MESSAGE = 16 * 1024 * 1024


class QmpError(DiskwatchError):
    """The monitor cannot be reached or spoke something else than QMP."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, klass: str, desc: str):
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.klass = klass
        self.desc = desc


class Monitor:
    """What attach needs from a monitor: ``execute`` and ``close``."""

    version: tuple[int, int, int] = (0, 0, 0)
    #: how a person names this monitor in messages
    name: str = ""

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _version(greeting_or_version: dict) -> tuple[int, int, int]:
    q = greeting_or_version.get("qemu", {})
    try:
        return int(q["major"]), int(q["minor"]), int(q["micro"])
    except (KeyError, TypeError, ValueError):
        return (0, 0, 0)


class QmpSocket(Monitor):
    """A QMP connection over QEMU's unix socket (blocking, one command at a time)."""

    def __init__(self, path: str, *, timeout: float = 5.0, command_timeout: float = 60.0):
        self.name = path
        self.command_timeout = command_timeout
        self._buf = b""
        self._id = 0
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise QmpError(f"{path}: no such file (give the path of QEMU's -qmp unix socket)") from None
        except OSError as e:
            raise QmpError(f"{path}: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise QmpError(f"{path} is not a socket (give the path of QEMU's -qmp unix socket)")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
            except ConnectionRefusedError:
                raise QmpError(f"{path}: nothing listens there (is the QEMU still running?)") from None
            except OSError as e:
                raise QmpError(f"{path}: cannot connect: {e.strerror}") from None
            try:
                greeting = self._read_message()
            except TimeoutError:
                raise QmpError(
                    f"{path}: no QMP greeting within {timeout:g} s: another client holds this "
                    "monitor (a diskwatch already attached? a management tool?); QEMU serves "
                    "one QMP client per socket") from None
            if not isinstance(greeting, dict) or "QMP" not in greeting:
                raise QmpError(f"{path} is not a QMP socket (it did not greet with QMP; an HMP "
                               "monitor? use -qmp, not -monitor)")
            self.version = _version(greeting["QMP"].get("version", {}))
            self.sock.settimeout(command_timeout)
            self.execute("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _read_message(self) -> Any:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)  # a timeout raises TimeoutError
            if not chunk:
                raise QmpError(f"{self.name}: QEMU closed the monitor connection")
            self._buf += chunk
            if len(self._buf) > MAX_MESSAGE:
                raise QmpError(f"{self.name}: an answer over {MAX_MESSAGE} bytes: not QMP")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            text = line[:60].decode("ascii", "replace")
            raise QmpError(f"{self.name} is not a QMP socket (it said {text!r})") from None

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self._id += 1
        ident = f"diskwatch-{self._id}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"{self.name}: the monitor connection broke: {e.strerror}") from None
        deadline = time.monotonic() + self.command_timeout
        while True:
            if time.monotonic() > deadline:
                raise QmpError(f"{self.name}: no answer to {command} in {self.command_timeout:g} s")
            try:
                reply = self._read_message()
            except TimeoutError:
                raise QmpError(
                    f"{self.name}: no answer to {command} in {self.command_timeout:g} s") from None
            if not isinstance(reply, dict) or "event" in reply:
                continue  # events are not waited on (see the module docstring)
            if reply.get("id") != ident:
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpCommandError(command, str(err.get("class", "")), str(err.get("desc", "")))
            return reply.get("return")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class VirshMonitor(Monitor):
    """A libvirt domain's QMP, through ``virsh qemu-monitor-command``.

    libvirt keeps the domain's monitor socket connected for itself; this
    is its documented way in for other tools (libvirt then marks the domain
    tainted: ``custom-monitor``). Every command is one virsh run.
    """

    def __init__(self, domain: str, *, connect: str | None = None, timeout: float = 60.0):
        self.virsh = shutil.which("virsh")
        if self.virsh is None:
            raise QmpError("virsh not found: --libvirt needs libvirt's client "
                           "(apt-get install libvirt-clients)")
        self.domain = domain
        self.connect = connect
        self.timeout = timeout
        self.name = f"libvirt domain {domain}"
        version = self.execute("query-version")
        self.version = _version(version)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        argv = [self.virsh]
        if self.connect:
            argv += ["-c", self.connect]
        argv += ["qemu-monitor-command", "--", self.domain, json.dumps(msg)]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise QmpError(f"virsh qemu-monitor-command {command} took over {self.timeout:g} s") from None
        if r.returncode != 0:
            lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
            detail = lines[-1] if lines else f"exit status {r.returncode}"
            raise QmpError(f"virsh: {detail.removeprefix('error: ')}")
        try:
            reply = json.loads(r.stdout)
        except ValueError:
            raise QmpError(f"virsh qemu-monitor-command {command}: not a JSON answer") from None
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(command, str(err.get("class", "")), str(err.get("desc", "")))
        return reply.get("return")


def peer_pid(monitor: Monitor) -> int | None:
    """The QEMU process behind a monitor, where the kernel or libvirt tells it."""
    sock = getattr(monitor, "sock", None)
    if sock is not None:
        import struct
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            return pid or None
        except OSError:
            return None
    domain = getattr(monitor, "domain", None)
    if domain:
        try:
            with open(f"/run/libvirt/qemu/{domain}.pid") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None
    return None


def block_children(monitor: Monitor) -> dict[tuple[str, str], str]:
    """(parent node, child role) -> child node name, from the block graph."""
    graph = monitor.execute("x-debug-query-block-graph") or {}
    names = {n.get("id"): n.get("name", "") for n in graph.get("nodes", [])}
    return {(names.get(e.get("parent"), ""), e.get("name", "")): names.get(e.get("child"), "")
            for e in graph.get("edges", [])}
