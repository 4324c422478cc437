"""Watch a guest that is already running: attach through QMP, detach, no reboot.

    connect = monitor_opener(qmp="/run/vm.qmp")            # or libvirt="domain"
    with connect() as monitor:
        target = prepare(monitor, device=None)             # refusals happen here
    guest = AttachedGuest(connect, target, socket_path)    # serve target.path on socket_path
    guest.start()   # watchdog up, then the guest's device moves onto the socket
    ...
    guest.stop()    # the device moves back onto the file; the watchdog ends

diskwatch holds the QEMU's monitor only while it moves the disk: a QMP socket
serves one client at a time, and the person (or their tools, or the
watchdog) may need it while diskwatch watches.

``AttachedGuest`` looks to the session runner like a captive command:
``start``, ``stop``, ``wait``, ``running``, ``on_exit`` (called when the
QEMU goes away). See pivot.py for how the device moves and why the image
stays consistent (a qcow2 disk: its file child moves, pivot.attach_reopen),
watchdog.py for what happens if diskwatch dies, follow.py for how a qcow2
disk's requests are named.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import DiskwatchError
from ..text import safe_text
from .disks import (
    AttachRefused,
    Disk,
    Qcow2Parts,
    check_attachable,
    check_monitor,
    choose_disk,
    image_path,
    list_disks,
    qcow2_parts,
)
from .follow import Qcow2View, open_view
from .pivot import PivotError, Plan, attach, restore
from .qmp import Monitor, QmpError, QmpSocket, VirshMonitor, peer_pid

__all__ = ["AttachRefused", "AttachedGuest", "Target", "monitor_opener", "prepare",
           "PivotError", "QmpError"]


def monitor_opener(qmp: str | None = None, libvirt: str | None = None,
                   connect: str | None = None) -> Callable[[], Monitor]:
    """A function that opens a new connection to the monitor each time it is called."""
    if libvirt:
        return lambda: VirshMonitor(libvirt, connect=connect)
    assert qmp is not None
    return lambda: QmpSocket(qmp)


def monitor_spec(monitor: Monitor) -> dict:
    """How the watchdog reaches the same monitor."""
    if isinstance(monitor, VirshMonitor):
        return {"kind": "virsh", "domain": monitor.domain, "connect": monitor.connect}
    return {"kind": "socket", "path": monitor.name}


@dataclass
class Target:
    """The disk chosen, and its image as this process reaches it."""

    disk: Disk
    path: str
    pid: int | None
    #: a qcow2 disk: its nodes, and the view the session names requests with
    qcow2: Qcow2Parts | None = None
    view: Qcow2View | None = None


def prepare(monitor: Monitor, device: str | None = None) -> Target:
    """Choose the device and refuse what cannot be done safely (AttachRefused;
    a qcow2 image whose tables do not pass the checks: Qcow2Refused)."""
    check_monitor(monitor)
    disk = choose_disk(list_disks(monitor), device)
    pid = peer_pid(monitor)
    if disk.driver == "raw":
        path = image_path(disk, pid)
    else:
        path = disk.filename
    check_attachable(monitor, disk, path)
    if disk.driver != "qcow2":
        return Target(disk, path, pid)
    parts = qcow2_parts(monitor, disk, pid)
    view = open_view(parts.image, disk.readonly, parts.backing_image, parts.backing_size)
    return Target(disk, parts.image, pid, parts, view)


def plan_for(target: Target, socket_path: str, export: str = "") -> Plan:
    """What attach makes in QEMU for one disk served as ``export``: a raw
    disk's mirror, a qcow2 disk's reopen of its file child (and its raw
    backing's, onto its backing export)."""
    plan = Plan.for_disk(target.disk, target.path, socket_path, export=export)
    q, view = target.qcow2, target.view
    if q is None or view is None:
        return plan
    plan.kind = "reopen"
    plan.file_node = q.file_node
    plan.export_size = view.export_size
    plan.backing_node = q.backing_node
    if q.backing_image:
        plan.backing_file_node = q.backing_file_node
        plan.backing_image = q.backing_image
        plan.backing_size = q.backing_size
        plan.backing_cache_direct = bool(q.backing_cache.get("direct"))
        plan.backing_cache_no_flush = bool(q.backing_cache.get("no-flush"))
        plan.backing_detect_zeroes = q.backing_detect_zeroes
        plan.backing_export = view.backing_export
    return plan


class AttachedGuest:
    """The running guest whose disk diskwatch serves (see the module docstring)."""

    #: seconds between checks that the QEMU process is still there
    POLL = 0.5

    def __init__(self, connect: Callable[[], Monitor], target: Target, socket_path: str, *,
                 private_dir: str | None = None, say: Callable[[str], None] | None = None,
                 more: list[tuple[Target, str]] = ()):
        """``more``: the guest's other disks watched too, (target, export):
        each its export on the same socket (a qcow2 disk's backing too),
        moved and put back with the first, by the same watchdog."""
        self.connect = connect
        self.target = target
        self.plan = plan_for(target, socket_path)
        self.more = [(t, plan_for(t, socket_path, export)) for t, export in more]
        self.private_dir = private_dir
        # Device and file names come from the QEMU: shown escaped, never raw.
        self.say = say or (lambda text: print(f"diskwatch: {safe_text(text)}", file=sys.stderr,
                                              flush=True))
        self.last_said = ""  # how the session ended for the disk (detached, or why not)
        self.on_exit: Callable[[int], None] = lambda status: None
        self.proc = None  # no command of ours runs (the runner asks)
        self.watchdog: subprocess.Popen | None = None
        self.monitor_name = ""
        self.attached = False
        self.abandoned = False  # detach failed: the watchdog serves the socket and retries
        self.gone = False  # the QEMU went away while attached
        self.failed = False  # start() failed (told, under the UI)
        #: under the UI a failing start is told, not raised (see start)
        self.report_failure = False
        self._stopped = threading.Event()
        self.socket_owner: tuple[int, int] | None = None
        self._give_socket_to_qemu(socket_path)

    def _give_socket_to_qemu(self, socket_path: str) -> None:
        """A QEMU running as another user (libvirt's libvirt-qemu) must reach the
        socket: the private 0700 directory and the 0600 socket become its user's."""
        pid = self.target.pid
        if not pid or os.geteuid() != 0:
            return
        try:
            st = os.stat(f"/proc/{pid}")
        except OSError:
            return
        if st.st_uid == 0:
            return
        self.socket_owner = (st.st_uid, st.st_gid)  # the watchdog's socket too
        for path in filter(None, [self.private_dir, socket_path]):
            try:
                os.chown(path, st.st_uid, st.st_gid)
            except OSError:
                pass  # blockdev-add then says QEMU cannot connect, and nothing moves

    @property
    def running(self) -> bool:
        return self.attached

    @property
    def description(self) -> str:
        names = ", ".join(t.disk.name for t in self._targets())
        return f"attached to {names} of a running QEMU ({self.target.path})"

    def _targets(self) -> list[Target]:
        return [self.target, *(t for t, _ in self.more)]

    def _plans(self) -> list[Plan]:
        return [self.plan, *(p for _, p in self.more)]

    def start(self) -> None:
        """Start the watchdog, then move the guest's device onto the socket.
        Under the UI (``report_failure``) a failure is told in the output
        panel and ends the session (status 1) instead of raising in the
        runner's thread; headless it raises, and is diskwatch's one-line error."""
        try:
            self._start()
        except (DiskwatchError, OSError) as e:
            if not self.report_failure:
                raise
            self.failed = True
            self.last_said = f"could not attach, nothing was moved: {e}"
            self.say(self.last_said)
            self.on_exit(1)

    def _start(self) -> None:
        with self.connect() as monitor:
            self._start_watchdog(monitor)
            moved: list[Plan] = []
            try:
                t0 = time.monotonic()
                for plan in self._plans():
                    attach(monitor, plan)
                    moved.append(plan)
                took = time.monotonic() - t0
            except BaseException:
                # the disks moved already go back: all of them or none
                for plan in reversed(moved):
                    try:
                        restore(monitor, plan)
                    except (QmpError, PivotError, OSError):
                        self._abandon_watchdog()  # it puts them back and serves meanwhile
                        raise
                self._end_watchdog()
                raise
        self.attached = True
        what = ""
        for t, plan in zip(self._targets(), self._plans(), strict=True):
            if plan.kind != "reopen":
                continue
            q = t.qcow2
            of = f" of {t.disk.name}" if self.more else ""
            what += (f"; qcow2{of}: QEMU's qcow2 node reads and writes its image file through "
                     "diskwatch, named through the qcow2 tables"
                     + (f"; the backing file's reads too (export {plan.backing_export})"
                        if plan.backing_export
                        else f"; {q.backing_note}" if q is not None and q.backing_note else ""))
        names = " and ".join(t.disk.name for t in self._targets())
        self.say(f"attached: {names}'s I/O goes through diskwatch (moved in "
                 f"{took * 1000:.0f} ms){what}; quitting (q, Ctrl-C, SIGTERM) puts "
                 f"{'them' if self.more else 'it'} back on "
                 f"{'their files' if self.more else 'its file'}")
        if self.target.pid:
            threading.Thread(target=self._watch_qemu, args=(self.target.pid,), daemon=True,
                             name="qemu-watch").start()

    def stop(self) -> None:
        """Move the device back onto its file (idempotent). If that fails, the
        watchdog is left to do it (it serves the socket and retries)."""
        self._stopped.set()
        if not self.attached:
            return
        self.attached = False
        if self.gone:
            self._end_watchdog()
            return
        try:
            with self.connect() as monitor:
                t0 = time.monotonic()
                for plan in self._plans():
                    restore(monitor, plan)
                took = time.monotonic() - t0
        except (QmpError, PivotError, OSError) as e:
            names = " and ".join(t.disk.name for t in self._targets())
            self.last_said = f"could not put {names} back: {e}; the watchdog takes over"
            self.say(self.last_said)
            self._abandon_watchdog()
            return
        self._end_watchdog()
        back = "; ".join(f"{t.disk.name} is back on {t.path}" for t in self._targets())
        self.last_said = f"detached: {back} (moved in {took * 1000:.0f} ms)"
        self.say(self.last_said)

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def _watch_qemu(self, pid: int) -> None:
        """A QEMU that exits ends the session (there is nothing left to put back)."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
        try:
            while not self._stopped.is_set():
                if fd is not None:
                    ready, _, _ = select.select([fd], [], [], self.POLL)
                    if not ready:
                        continue
                elif os.path.exists(f"/proc/{pid}") or self._stopped.wait(self.POLL):
                    continue
                if self._stopped.is_set():
                    return
                self.gone = True
                self.last_said = "the QEMU exited"
                self.say(self.last_said)
                self.on_exit(0)
                return
        finally:
            if fd is not None:
                os.close(fd)

    # --- the watchdog --------------------------------------------------------------

    def _start_watchdog(self, monitor: Monitor) -> None:
        config = {"plan": self.plan.to_dict(), "monitor": monitor_spec(monitor),
                  "path": self.target.path, "pid": self.target.pid,
                  "more": [{"plan": p.to_dict(), "path": t.path} for t, p in self.more],
                  "socket_owner": self.socket_owner,
                  "private_dir": self.private_dir}
        env = dict(os.environ)
        # The watchdog must import this very diskwatch (a checkout run with PYTHONPATH too).
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "diskwatch.attach.watchdog"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, start_new_session=True, text=True)
        assert self.watchdog.stdin is not None and self.watchdog.stdout is not None
        self.watchdog.stdin.write(json.dumps(config) + "\n")
        self.watchdog.stdin.flush()
        if self.watchdog.stdout.readline().strip() != "ready":
            self.watchdog.wait()
            raise PivotError("the watchdog did not start: not attaching without it")

    def _end_watchdog(self) -> None:
        wd = self.watchdog
        if wd is None:
            return
        self.watchdog = None
        try:
            assert wd.stdin is not None
            wd.stdin.write("detached\n")
            wd.stdin.close()
        except OSError:
            pass
        wd.wait()

    def _abandon_watchdog(self) -> None:
        """Close its stdin without 'detached': it takes over (and outlives us)."""
        wd = self.watchdog
        if wd is None:
            return
        self.watchdog = None
        self.abandoned = True
        try:
            assert wd.stdin is not None
            wd.stdin.close()
        except OSError:
            pass
