"""Move a running guest's disk I/O onto diskwatch's NBD server, and back.

Attach (the guest's device sits on a raw node over the image file; a qcow2
disk instead has its file child moved by blockdev-reopen, see the last
section, ``attach_reopen``):

    blockdev-add     nbd node on diskwatch's socket (diskwatch serves the same file)
    blockdev-mirror  the device's node -> the nbd node, sync none, copy-mode write-blocking
    job-complete     once ready: the device now sits on the nbd node

Detach is the same with the roles swapped: the target is the device's
original node if it still exists (a node made with -blockdev stays open,
unused), else a new raw node over a new file node on the same file, with
the original's cache options; then the nbd node is deleted.

Why the image stays consistent. Source and target are the *same bytes* (the
same file, the same page cache: QEMU's file node and diskwatch's FileSource
open one inode), so there is nothing to copy: ``sync: none`` copies nothing
up front, and any write that reaches only the source is already "in" the
target. The one danger is a *stale* copy: in the default background
copy-mode, a guest write marks its area dirty and the job later reads the
area from the source and writes it to the target. If the guest writes B to
an area while the job is between reading A there and writing A to the
target, A lands on the file after B, and B is lost (the job's re-copy reads
A back). ``copy-mode: write-blocking`` closes that: each guest write goes to
the source and then to the target before it completes, with overlapping
writes (and any background copy) serialised by the job's in-flight list
(mirror.c: active_write_prepare waits for conflicting operations), so both
paths write the same bytes in the same order, and the job has nothing dirty
to copy in the background. Reads go to the source until the pivot; the pivot
(job-complete) drains the device first, so no request is in flight while
the device moves. Flushes: fdatasync on either descriptor flushes the inode,
whichever descriptor wrote the pages; O_DIRECT (cache=none) and buffered I/O
on one inode are coherent for requests that do not overlap in time, which
the drain guarantees at the pivot.

Every step is polled with ``query-jobs`` (no events: the libvirt path has
none), and ``restore`` is idempotent: the watchdog runs it after a crash,
whatever step diskwatch died in.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from ..errors import DiskwatchError
from .disks import PREFIX, AttachRefused, Disk
from .qmp import Monitor, QmpCommandError, QmpError, block_children

#: How long QEMU's NBD client holds the guest's requests while diskwatch's
#: server is gone, waiting for it (or the watchdog's) to come back, before it
#: fails them. The watchdog serves within a second; QEMU retries with a
#: growing pause (about 1, 2, 4 s) before it reconnects.
RECONNECT_DELAY = 60
#: how long a mirror job may take to become ready or to finish
JOB_TIMEOUT = 60.0


class PivotError(DiskwatchError):
    """A step of attach or detach failed; the message says which and what QEMU said."""


@dataclass
class Plan:
    """Names of what attach makes in QEMU, enough to undo it from another process."""

    device: str  # the -drive id, or the qdev path: what query-block calls the device
    qdev: str
    original_node: str  # the node the device sat on before attach
    image: str  # the image file as QEMU names it (for a new file node)
    socket: str  # diskwatch's NBD unix socket
    readonly: bool
    cache_direct: bool
    cache_no_flush: bool
    detect_zeroes: str
    tag: str  # diskwatch-<pid>: prefix of every node and job made
    name: str = ""  # how a person names the device (Disk.name), for messages
    #: "mirror" (a raw disk: the device moves) or "reopen" (a qcow2: its file
    #: child moves, see ``attach_reopen``)
    kind: str = "mirror"
    #: reopen: the qcow2 node's file child before attach, and the size the
    #: socket's export offers (attach/growing.py: the watchdog offers the same)
    file_node: str = ""
    export_size: int = 0
    #: reopen: the backing node (raw) and its file child before attach, its
    #: file, its cache options, and its export (on the same socket) when its
    #: reads are watched too; "" without one
    backing_node: str = ""
    backing_file_node: str = ""
    backing_image: str = ""
    backing_size: int = 0
    backing_cache_direct: bool = False
    backing_cache_no_flush: bool = False
    backing_detect_zeroes: str = "off"
    backing_export: str = ""
    #: the export (on the socket) this disk is: "" the first, "sdb"... the
    #: others of an attach to several disks
    export: str = ""

    @classmethod
    def for_disk(cls, disk: Disk, image: str, socket: str, tag: str | None = None,
                 export: str = "") -> Plan:
        # Every disk's nodes and jobs apart: the first keeps diskwatch-<pid>.
        tag = tag or f"{PREFIX}{os.getpid()}" + (f"-{export}" if export else "")
        return cls(device=disk.device, qdev=disk.qdev, original_node=disk.node, image=image,
                   socket=socket, readonly=disk.readonly,
                   cache_direct=bool(disk.cache.get("direct")),
                   cache_no_flush=bool(disk.cache.get("no-flush")),
                   detect_zeroes=disk.detect_zeroes, tag=tag, name=disk.name, export=export)

    @property
    def nbd_node(self) -> str:
        return f"{self.tag}-nbd"

    @property
    def back_node(self) -> str:
        return f"{self.tag}-back"

    @property
    def nbd_backing_node(self) -> str:
        return f"{self.tag}-nbd-backing"

    @property
    def back_file_node(self) -> str:
        return f"{self.tag}-back-file"

    @property
    def back_backing_node(self) -> str:
        return f"{self.tag}-back-backing-file"

    @property
    def attach_job(self) -> str:
        return f"{self.tag}-attach"

    @property
    def detach_job(self) -> str:
        return f"{self.tag}-detach"

    def to_dict(self) -> dict:
        return asdict(self)


def current_node(monitor: Monitor, plan: Plan) -> str:
    """The node the device sits on now."""
    for dev in monitor.execute("query-block") or []:
        if (plan.device and dev.get("device") == plan.device) or (
                not plan.device and dev.get("qdev") == plan.qdev):
            return (dev.get("inserted") or {}).get("node-name", "")
    raise PivotError(f"the device {plan.device or plan.qdev} is gone from this QEMU")


def node_names(monitor: Monitor) -> set[str]:
    return {n.get("node-name") for n in monitor.execute("query-named-block-nodes") or []}


def _jobs(monitor: Monitor) -> dict[str, dict]:
    return {j.get("id"): j for j in monitor.execute("query-jobs") or []}


def _wait_job(monitor: Monitor, job: str, states: tuple[str, ...],
              timeout: float = JOB_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        info = _jobs(monitor).get(job)
        if info is None:
            raise PivotError(f"the block job {job} vanished")
        if info.get("status") in states or info.get("status") == "concluded":
            return info
        if time.monotonic() > deadline:
            raise PivotError(f"the block job {job} is still {info.get('status')} after "
                             f"{timeout:g} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _mirror(monitor: Monitor, job: str, source: str, target: str) -> None:
    """Mirror ``source`` onto ``target`` (same bytes, see the module docstring) and
    pivot the device onto ``target``."""
    try:
        monitor.execute("blockdev-mirror", {
            "job-id": job, "device": source, "target": target, "sync": "none",
            "copy-mode": "write-blocking", "auto-dismiss": False})
    except QmpCommandError as e:
        if "busy" in e.desc or "in use" in e.desc or "block job" in e.desc:
            raise AttachRefused(f"the disk is busy: {e.desc} (a block job is running on it; "
                                "wait for it to end or cancel it)") from None
        raise
    try:
        info = _wait_job(monitor, job, ("ready",))
        if info.get("status") == "ready":
            monitor.execute("job-complete", {"id": job})
            info = _wait_job(monitor, job, ())
        if info.get("error"):
            raise PivotError(f"the block job {job} failed: {info['error']}")
    except BaseException:
        _cancel(monitor, job)
        raise
    finally:
        _dismiss(monitor, job)


def _cancel(monitor: Monitor, job: str) -> None:
    """Cancel a mirror that has not pivoted: the device stays where it was."""
    try:
        info = _jobs(monitor).get(job)
        if info is None or info.get("status") == "concluded":
            return
        monitor.execute("job-cancel", {"id": job})
        _wait_job(monitor, job, (), timeout=30)
    except (QmpError, PivotError):
        pass


def _dismiss(monitor: Monitor, job: str) -> None:
    try:
        if _jobs(monitor).get(job, {}).get("status") == "concluded":
            monitor.execute("job-dismiss", {"id": job})
    except QmpError:
        pass


def _delete_node(monitor: Monitor, node: str) -> None:
    try:
        if node in node_names(monitor):
            monitor.execute("blockdev-del", {"node-name": node})
    except QmpError:
        pass


def attach(monitor: Monitor, plan: Plan) -> None:
    """Put the device on an nbd node on diskwatch's socket. On failure
    everything made is removed and the device stays where it was."""
    if plan.kind == "reopen":
        attach_reopen(monitor, plan)
        return
    monitor.execute("blockdev-add", {
        "driver": "nbd", "node-name": plan.nbd_node, "export": plan.export,
        "server": {"type": "unix", "path": plan.socket},
        "reconnect-delay": RECONNECT_DELAY, "read-only": plan.readonly})
    try:
        _mirror(monitor, plan.attach_job, plan.original_node, plan.nbd_node)
        now = current_node(monitor, plan)
        if now != plan.nbd_node:
            raise PivotError(f"the device is on {now}, not on {plan.nbd_node}, after the pivot")
    except BaseException:
        _delete_node(monitor, plan.nbd_node)
        raise


def _back_target(monitor: Monitor, plan: Plan) -> str:
    """The node to put the device back on: its original node when it still
    exists (-blockdev nodes stay open), else a new raw node over the file."""
    names = node_names(monitor)
    if plan.original_node in names and not plan.original_node.startswith("#"):
        return plan.original_node
    if plan.back_node in names:
        return plan.back_node
    monitor.execute("blockdev-add", {
        "driver": "raw", "node-name": plan.back_node, "read-only": plan.readonly,
        "detect-zeroes": plan.detect_zeroes,
        "cache": {"direct": plan.cache_direct, "no-flush": plan.cache_no_flush},
        "file": {"driver": "file", "node-name": f"{plan.back_node}-file",
                 "filename": plan.image, "read-only": plan.readonly,
                 "cache": {"direct": plan.cache_direct, "no-flush": plan.cache_no_flush}}})
    return plan.back_node


def restore(monitor: Monitor, plan: Plan) -> bool:
    """Put the device back on a file node and remove the nbd node, from
    whatever state attach or detach reached. True if the device was on
    diskwatch (and is now back)."""
    if plan.kind == "reopen":
        return restore_reopen(monitor, plan)
    jobs = _jobs(monitor)
    # Died in the middle of attach: the device has not moved; cancel.
    if plan.attach_job in jobs:
        _cancel(monitor, plan.attach_job)
        _dismiss(monitor, plan.attach_job)
    # Died in the middle of detach: start that step again from its state.
    if plan.detach_job in jobs:
        info = jobs[plan.detach_job]
        if info.get("status") == "ready":
            monitor.execute("job-complete", {"id": plan.detach_job})
            _wait_job(monitor, plan.detach_job, ())
        else:
            _cancel(monitor, plan.detach_job)
        _dismiss(monitor, plan.detach_job)
    moved = False
    if current_node(monitor, plan) == plan.nbd_node:
        target = _back_target(monitor, plan)
        _mirror(monitor, plan.detach_job, plan.nbd_node, target)
        now = current_node(monitor, plan)
        if now != target:
            raise PivotError(f"the device is on {now}, not on {target}, after the pivot")
        moved = True
    _delete_node(monitor, plan.nbd_node)
    if plan.nbd_node in node_names(monitor):
        raise PivotError(f"the node {plan.nbd_node} could not be removed")
    return moved


# --- a qcow2 disk: its file child moves (blockdev-reopen) -------------------------------
#
# The qcow2 node stays where it is, in QEMU: one qcow2 driver with its own
# metadata caches, never two on one file. Only what it reads and writes its
# image file through changes:
#
#     device -> qcow2 node --file--> file node (top.qcow2)       before
#                          \-backing-> raw node --file--> file node (base.raw)
#     device -> qcow2 node --file--> nbd node -> diskwatch: top.qcow2's bytes      attached
#                          \-backing-> raw node --file--> nbd node -> diskwatch: base.raw
#
# blockdev-reopen (stable since QEMU 6.1) replaces a node's file child; it
# drains the node first, so no request is in flight while the child moves,
# and the qcow2 driver's caches stay valid (the same bytes, through
# diskwatch's descriptor on the same inode). It resets the options it is not
# given, so it gets the node's read-only, cache and detect-zeroes again (and
# keeps its backing child by naming it); discard is kept by QEMU when not
# given (the node's flags). The nodes' driver-specific options (qcow2's cache
# sizes, lazy-refcounts) go back to their defaults, which is what -drive has.


def _qcow2_options(plan: Plan, file: str) -> dict:
    opts = {"driver": "qcow2", "node-name": plan.original_node, "file": file,
            "read-only": plan.readonly, "detect-zeroes": plan.detect_zeroes,
            "cache": {"direct": plan.cache_direct, "no-flush": plan.cache_no_flush}}
    if plan.backing_node:
        opts["backing"] = plan.backing_node  # the child it has: kept as it is
    return opts


def _backing_options(plan: Plan, file: str) -> dict:
    return {"driver": "raw", "node-name": plan.backing_node, "file": file, "read-only": True,
            "detect-zeroes": plan.backing_detect_zeroes,
            "cache": {"direct": plan.backing_cache_direct,
                      "no-flush": plan.backing_cache_no_flush}}


def attach_reopen(monitor: Monitor, plan: Plan) -> None:
    """Put the qcow2 node's file child (and its raw backing's, with a backing
    export) on nbd nodes on diskwatch's socket. On failure everything made is
    removed and the disk stays where it was."""
    made = []
    try:
        monitor.execute("blockdev-add", {
            "driver": "nbd", "node-name": plan.nbd_node, "export": plan.export,
            "server": {"type": "unix", "path": plan.socket},
            "reconnect-delay": RECONNECT_DELAY, "read-only": plan.readonly})
        made.append(plan.nbd_node)
        options = [_qcow2_options(plan, plan.nbd_node)]
        if plan.backing_export:
            monitor.execute("blockdev-add", {
                "driver": "nbd", "node-name": plan.nbd_backing_node,
                "export": plan.backing_export,
                "server": {"type": "unix", "path": plan.socket},
                "reconnect-delay": RECONNECT_DELAY, "read-only": True})
            made.append(plan.nbd_backing_node)
            options.append(_backing_options(plan, plan.nbd_backing_node))
        monitor.execute("blockdev-reopen", {"options": options})
        children = block_children(monitor)
        now = children.get((plan.original_node, "file"))
        if now != plan.nbd_node:
            raise PivotError(f"the qcow2 node's file is {now}, not {plan.nbd_node}, after "
                             "the reopen")
    except BaseException:
        try:
            restore_reopen(monitor, plan)
        except (QmpError, PivotError):
            for node in made:
                _delete_node(monitor, node)
        raise


def _file_target(monitor: Monitor, names: set[str], original: str, back: str, path: str,
                 readonly: bool, direct: bool, no_flush: bool) -> str:
    """A file node on ``path``: the original if it is still there (a -blockdev
    node stays open, unused; a -drive one went with the reopen), else ours."""
    if original and original in names:
        return original
    if back not in names:
        monitor.execute("blockdev-add", {
            "driver": "file", "node-name": back, "filename": path, "read-only": readonly,
            "cache": {"direct": direct, "no-flush": no_flush}})
    return back


def restore_reopen(monitor: Monitor, plan: Plan) -> bool:
    """Put the qcow2 node's file child (and its backing's) back on file nodes
    and remove the nbd nodes, from whatever state attach or detach reached."""
    children = block_children(monitor)
    names = node_names(monitor)
    options = []
    if children.get((plan.original_node, "file")) == plan.nbd_node:
        target = _file_target(monitor, names, plan.file_node, plan.back_file_node, plan.image,
                              plan.readonly, plan.cache_direct, plan.cache_no_flush)
        options.append(_qcow2_options(plan, target))
    if plan.backing_node and children.get((plan.backing_node, "file")) == plan.nbd_backing_node:
        target = _file_target(monitor, names, plan.backing_file_node, plan.back_backing_node,
                              plan.backing_image, True, plan.backing_cache_direct,
                              plan.backing_cache_no_flush)
        options.append(_backing_options(plan, target))
    if options:
        monitor.execute("blockdev-reopen", {"options": options})
        children = block_children(monitor)
        for opts in options:
            now = children.get((opts["node-name"], "file"))
            if now != opts["file"]:
                raise PivotError(f"the node {opts['node-name']}'s file is {now}, not "
                                 f"{opts['file']}, after the reopen")
    for node in (plan.nbd_node, plan.nbd_backing_node):
        _delete_node(monitor, node)
        if node in node_names(monitor):
            raise PivotError(f"the node {node} could not be removed")
    return bool(options)
