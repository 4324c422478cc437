"""The watchdog: puts the guest's disk back if diskwatch dies while attached.

    python -m diskwatch.attach.watchdog     (started by diskwatch attach, never by hand)

diskwatch starts it before it moves the guest, in a session of its own (the
terminal's Ctrl-C does not reach it), and holds the write end of its stdin.
The first line is the plan (JSON: what attach makes in QEMU, the monitor, the
image, the socket). Then the watchdog waits for stdin to end:

- after a line ``detached``: diskwatch put the disk back itself; exit.
- without it: diskwatch is gone (killed, crashed). QEMU's NBD client holds the
  guest's requests for RECONNECT_DELAY seconds and retries the socket; the
  watchdog serves the same file on the same socket path at once (the guest
  goes on after QEMU's next retry, a few seconds), connects to the monitor
  (free now that diskwatch's connection closed), puts the device back on a
  file node (``pivot.restore``), and exits.

It imports the server and the QMP client before it says ``ready``, so taking
over costs no import time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

from ..server import Server, ServerThread
from ..sources.file import FileSource
from ..text import safe_text
from .growing import GrowingFile
from .pivot import Plan, restore
from .qmp import Monitor, QmpError, QmpSocket, VirshMonitor

#: how long to keep trying the monitor after diskwatch died
MONITOR_RETRY = 30.0


def say(text: str) -> None:
    print(f"diskwatch watchdog: {safe_text(text)}", file=sys.stderr, flush=True)


def open_monitor(spec: dict) -> Monitor:
    if spec["kind"] == "virsh":
        return VirshMonitor(spec["domain"], connect=spec.get("connect"))
    return QmpSocket(spec["path"], timeout=2.0)


def serve_as_diskwatch_did(plan: Plan, path: str, exports: dict) -> None:
    """The exports of one disk, as diskwatch served them, into ``exports``:
    a raw disk's file; a qcow2's image file at the same size (QEMU's nbd
    client expects it when it reconnects), growing, and its backing."""
    if plan.kind == "reopen":
        exports[plan.export] = GrowingFile(path, plan.export_size, readonly=plan.readonly)
        if plan.backing_export:
            exports[plan.backing_export] = FileSource(plan.backing_image, readonly=True)
    else:
        exports[plan.export] = FileSource(path, readonly=plan.readonly)


def take_over(config: dict) -> int:
    plan = Plan(**config["plan"])
    exports: dict = {}
    serve_as_diskwatch_did(plan, config["path"], exports)
    try:
        os.unlink(plan.socket)
    except FileNotFoundError:
        pass
    # An attach to several disks: each one's exports, put back too.
    more = [(Plan(**m["plan"]), m["path"]) for m in config.get("more") or ()]
    for p, path in more:
        serve_as_diskwatch_did(p, path, exports)
    server = Server(exports)
    server.listen_unix(plan.socket)
    if config.get("socket_owner"):
        # A QEMU of another user (libvirt-qemu) must be able to connect, as
        # to diskwatch's socket; until then it just retries.
        uid, gid = config["socket_owner"]
        os.chown(plan.socket, uid, gid)
    thread = ServerThread(server).start()
    say(f"diskwatch is gone; serving {config['path']} until the guest's disk is back on it")
    try:
        deadline = time.monotonic() + MONITOR_RETRY
        while True:
            try:
                monitor = open_monitor(config["monitor"])
                break
            except QmpError as e:
                pid = config.get("pid")
                if pid and not os.path.exists(f"/proc/{pid}"):
                    say("the QEMU is gone too: nothing to put back")
                    return 0
                if time.monotonic() > deadline:
                    say(f"cannot reach the monitor: {e}; the guest's disk stays on this "
                        f"server at {plan.socket} while this process lives")
                    signal.pause()
                    return 1
                time.sleep(0.2)
        with monitor:
            for p in [plan, *(p for p, _ in more)]:
                try:
                    moved = restore(monitor, p)
                except Exception as e:  # noqa: BLE001 - told, then we keep serving
                    say(f"could not put the disk back: {e}; the guest's disk stays on this "
                        f"server at {plan.socket} while this process lives")
                    signal.pause()
                    return 1
                if moved:
                    say(f"the guest's disk {p.name or p.device or p.qdev} is back on {p.image}")
        return 0
    finally:
        thread.stop()
        for source in exports.values():
            source.close()
        if config.get("private_dir"):
            shutil.rmtree(config["private_dir"], ignore_errors=True)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    first = sys.stdin.readline()
    if not first:
        return 0
    config = json.loads(first)
    print("ready", flush=True)
    last = ""
    for line in sys.stdin:
        last = line.strip() or last
    if last == "detached":
        return 0
    return take_over(config)


if __name__ == "__main__":
    sys.exit(main())
