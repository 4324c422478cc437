"""Captive mode (--run): run a command against the server, exit with its status.

As nbdkit does: the command runs under /bin/sh once the server listens, with
``$nbd`` and ``$uri`` (the same URI), ``$unixsocket``, ``$port`` and
``$exportname`` set; when it exits, diskwatch exits with its status (128+N if a signal N killed it).
"""

from __future__ import annotations

import codecs
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from ..events import Bus, Message
from . import nbd_uri

#: the longest line of the command's output passed on in one piece
MAX_LINE = 64 * 1024


def captive_env(kind: str, addr, export: str = "", tls: bool = False,
                exports: list[str] | None = None) -> dict[str, str]:
    """The variables nbdkit sets for --run (under TLS the URIs are nbds:
    the command adds its credentials, e.g. libnbd's ``tls-certificates=DIR``).
    With several disks (``exports``, in order) also ``$nbdN``, ``$uriN`` and
    ``$exportnameN`` for each, from 1; the plain ones name the first."""
    uri = nbd_uri(kind, addr, export, tls)
    env = {
        "uri": uri,
        # nbdkit >= 1.24: $nbd is the same URI (qemu, libnbd and libguestfs
        # all take it; the old nbd:unix:PATH form breaks libnbd's tools).
        "nbd": uri,
        "exportname": export,
        "unixsocket": addr if kind == "unix" else "",
        "port": "" if kind == "unix" else str(addr[1]),
    }
    for i, name in enumerate(exports or [export], 1):
        env[f"nbd{i}"] = env[f"uri{i}"] = nbd_uri(kind, addr, name, tls)
        env[f"exportname{i}"] = name
    return env


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), deepest last."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except (OSError, ValueError):
            kids = []
        out.extend(kids)
        todo.extend(kids)
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is only waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait (bounded) for a process that is not our child to exit: a pidfd
    becomes readable when it does."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        select.select([fd], [], [], max(0.0, timeout))
    finally:
        os.close(fd)


def exit_status(returncode: int) -> int:
    """Popen's returncode as a shell reports it."""
    return 128 - returncode if returncode < 0 else returncode


class Captive:
    """The captive command.

    With ``capture=False`` it shares our terminal and process group, like
    nbdkit's (so an interactive nbdsh works and Ctrl-C reaches it). With
    ``capture=True`` (under the UI) it gets its own session, no terminal
    input, and its output goes line by line to the bus as ``Message`` events
    so it never scribbles over the screen.
    """

    def __init__(self, command: str, env: dict[str, str], *, capture: bool = False,
                 bus: Bus | None = None, on_exit: Callable[[int], None] | None = None):
        self.command = command
        self.env = {**os.environ, **env}
        self.capture = capture
        self.bus = bus
        self.on_exit = on_exit
        self.proc: subprocess.Popen | None = None
        self.status: int | None = None
        self._done = threading.Event()
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        kwargs: dict = {}
        if self.capture:
            kwargs = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, start_new_session=True)
        self.proc = subprocess.Popen(["/bin/sh", "-c", self.command], env=self.env, **kwargs)
        if self.capture:
            for stream, name in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")):
                t = threading.Thread(target=self._pump, args=(stream, name), daemon=True,
                                     name=f"captive-{name}")
                t.start()
                self._readers.append(t)
        threading.Thread(target=self._wait, daemon=True, name="captive-wait").start()

    def _pump(self, stream, name: str) -> None:
        # A console that never sends a newline must not grow a line without
        # bound: longer lines arrive in pieces (a UTF-8 character cut between
        # two pieces is decoded whole). The text is the guest's: the UI makes
        # it safe to show (diskwatch.text.TerminalText).
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for raw in iter(lambda: stream.readline(MAX_LINE), b""):
            line = decoder.decode(raw).rstrip("\r\n")
            if self.bus is not None:
                self.bus.publish(Message(line, source=name))
        stream.close()

    def _wait(self) -> None:
        rc = self.proc.wait()
        for t in self._readers:
            t.join()  # all output is out before the exit is announced
        self.status = exit_status(rc)
        if self.bus is not None:
            self.bus.publish(Message(f"command exited with status {self.status}", source="exit",
                                     level="info" if self.status == 0 else "warning",
                                     status=self.status))
        self._done.set()
        if self.on_exit is not None:
            self.on_exit(self.status)

    @property
    def running(self) -> bool:
        return self.proc is not None and not self._done.is_set()

    def wait(self, timeout: float | None = None) -> int | None:
        self._done.wait(timeout)
        return self.status

    def signal(self, sig: int) -> list[int]:
        if self.proc is None or self._done.is_set():
            return []
        try:
            if self.capture:
                os.killpg(self.proc.pid, sig)  # its own session: the whole group
                return []
        except ProcessLookupError:
            return []
        # Sharing our process group (for the terminal), so no killpg: the
        # shell and what it started. Signalling only the shell left
        # `--run 'cmd; sleep 1000'`'s sleep running after SIGTERM. All are
        # listed first, the shell signalled first: after its child, it could
        # see the child die, end its `wait` with status 0 (as `wait` does)
        # and exit 0 before its own signal came, and a stop looked like success.
        pids = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds.
        Returns once the shell and what it started have gone (or been killed)."""
        if self.proc is None:
            return None
        pids = self.signal(signal.SIGTERM) or []
        deadline = time.monotonic() + grace
        if self.wait(grace) is None:
            pids += self.signal(signal.SIGKILL) or []
            self.wait()
        # The shell is reaped; its children were re-parented: wait until the
        # signal has taken them too, so nothing outlives diskwatch.
        for pid in pids:
            _wait_gone(pid, deadline - time.monotonic())
            if _running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.status
