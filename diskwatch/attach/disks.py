"""The block devices of a running QEMU, and which of them diskwatch can attach to.

``list_disks`` reads ``query-block`` (the guest's devices and the node each
one sits on) and ``query-named-block-nodes`` (the nodes' drivers and cache
options). ``check_attachable`` refuses, with one line each, what cannot be
done safely: a QEMU too old, a monitor without the commands, an image that
is not raw or qcow2 over a local file, a device with a block job running, a
device diskwatch is already attached to. ``qcow2_parts`` finds a qcow2
device's file and backing nodes in the block graph, and what of them can
be watched.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

from ..errors import DiskwatchError
from .qmp import Monitor, QmpCommandError, block_children

#: blockdev-mirror's copy-mode and the job-* commands (3.0), the NBD client's
#: reconnect-delay (4.2).
MIN_QEMU = (4, 2)
#: what attach and detach send
COMMANDS = ("query-block", "query-named-block-nodes", "query-jobs", "blockdev-add",
            "blockdev-del", "blockdev-mirror", "job-complete", "job-cancel", "job-dismiss")
#: node names and job ids diskwatch makes start with this
PREFIX = "diskwatch-"


class AttachRefused(DiskwatchError):
    """diskwatch will not attach to this guest: the message says why and what to do."""


@dataclass
class Disk:
    """A guest's block device and the image under it."""

    device: str  # the BlockBackend's name (-drive id, e.g. virtio0); "" with -blockdev
    qdev: str  # the guest device's QOM path, e.g. /machine/peripheral/disk0/virtio-backend
    node: str  # the device's top node (what the guest's I/O goes to)
    driver: str  # that node's driver: raw, qcow2, nbd, throttle...
    filename: str  # the image file as QEMU names it (may be relative to QEMU's cwd)
    size: int  # virtual size, bytes
    readonly: bool
    #: the node's cache options (direct, no-flush) and detect-zeroes, kept for the way back
    cache: dict[str, Any] = field(default_factory=dict)
    detect_zeroes: str = "off"
    #: the driver of the node below the format node (file, host_device, nbd...)
    protocol: str = ""

    @property
    def name(self) -> str:
        """How a person names it: the -drive id, else the -device id."""
        if self.device:
            return self.device
        parts = [p for p in self.qdev.split("/") if p]
        if parts and parts[-1] in ("virtio-backend",):
            parts = parts[:-1]
        return parts[-1] if parts else self.node

    def matches(self, wanted: str) -> bool:
        return wanted in (self.device, self.node, self.qdev, self.name)

    def describe(self) -> str:
        return f"{self.name} ({self.driver}, {self.filename})"


def list_disks(monitor: Monitor) -> list[Disk]:
    """Every guest block device that has an image inserted."""
    nodes = {n.get("node-name"): n for n in monitor.execute("query-named-block-nodes") or []}
    disks = []
    for dev in monitor.execute("query-block") or []:
        ins = dev.get("inserted")
        if not ins:
            continue  # an empty CD-ROM drive
        node = nodes.get(ins.get("node-name"), ins)
        image = ins.get("image", {})
        filename = ins.get("file", "") or image.get("filename", "")
        protocol = ""
        for other in nodes.values():
            if other is not node and other.get("file") == filename and \
                    other.get("drv") not in JOB_FILTERS:
                protocol = other.get("drv", "")
                break
        disks.append(Disk(
            device=dev.get("device", ""), qdev=dev.get("qdev", ""),
            node=ins.get("node-name", ""), driver=ins.get("drv", ""), filename=filename,
            size=int(image.get("virtual-size", 0)), readonly=bool(ins.get("ro")),
            cache=dict(node.get("cache", {})), detect_zeroes=ins.get("detect_zeroes", "off"),
            protocol=protocol))
    return disks


def choose_disk(disks: list[Disk], wanted: str | None) -> Disk:
    if not disks:
        raise AttachRefused("this QEMU has no block device with an image inserted")
    if wanted:
        found = [d for d in disks if d.matches(wanted)]
        if not found:
            raise AttachRefused(f"no block device {wanted!r}; this QEMU has: "
                                + ", ".join(d.describe() for d in disks))
        return found[0]
    if len(disks) > 1:
        raise AttachRefused(f"{len(disks)} block devices: "
                            + ", ".join(d.describe() for d in disks)
                            + "; choose one with --device")
    return disks[0]


def check_monitor(monitor: Monitor) -> None:
    """A QEMU new enough, and a monitor that lets us change the block graph."""
    if monitor.version < (*MIN_QEMU, 0):
        have = ".".join(map(str, monitor.version))
        need = ".".join(map(str, MIN_QEMU))
        raise AttachRefused(f"QEMU {have} is too old: attach needs QEMU {need} or newer "
                            "(blockdev-mirror copy-mode, the NBD client's reconnect-delay)")
    try:
        have_commands = {c.get("name") for c in monitor.execute("query-commands") or []}
    except QmpCommandError as e:
        raise AttachRefused(f"{monitor.name}: the monitor does not list its commands ({e.desc}): "
                            "a restricted monitor? attach needs a full QMP") from None
    missing = [c for c in COMMANDS if c not in have_commands]
    if missing:
        raise AttachRefused(f"{monitor.name} does not offer {', '.join(missing)}: a read-only or "
                            "filtered monitor? attach needs QMP with blockdev-add and blockdev-mirror")


def check_attachable(monitor: Monitor, disk: Disk, path: str) -> None:
    """Refuse what cannot be done safely (see the module docstring). ``path``
    is the image file as this process sees it."""
    name = disk.name
    if disk.driver == "nbd" and disk.node.startswith(PREFIX):
        raise AttachRefused(f"{name} is already on diskwatch (node {disk.node}): one diskwatch "
                            "per disk; quit the other one first (it puts the disk back)")
    busy = block_jobs_on(monitor, disk)
    if busy:
        raise AttachRefused(f"{name} has a block job running ({busy}): wait for it to end or "
                            "cancel it, then attach")
    if disk.driver == "qcow2":
        return  # qcow2_parts checked the rest
    if disk.driver != "raw":
        raise AttachRefused(f"{name} is a {disk.driver} image ({disk.filename}): attach serves "
                            "raw and qcow2 images only")
    if disk.protocol and disk.protocol != "file":
        raise AttachRefused(f"{name} is raw on a {disk.protocol} node, not on a local file: "
                            "attach serves raw image files only")
    try:
        st = os.stat(path)
    except OSError as e:
        raise AttachRefused(f"{name}'s image {path}: {e.strerror} (is diskwatch on the same "
                            "host and filesystem view as the QEMU?)") from None
    if not stat.S_ISREG(st.st_mode):
        raise AttachRefused(f"{name}'s image {path} is not a regular file: attach serves raw "
                            "image files only")
    if st.st_size != disk.size:
        raise AttachRefused(f"{name} shows {disk.size} bytes of {path} ({st.st_size} bytes): "
                            "a raw node with offset or size options; attach serves whole files only")


#: the filter nodes block jobs put above the node they work on
JOB_FILTERS = ("mirror_top", "commit_top", "backup-top", "copy-before-write")


def block_jobs_on(monitor: Monitor, disk: Disk) -> str:
    """The block jobs that involve ``disk`` (as 'TYPE job ID'), or ''.

    A job's ``device`` is its id since QEMU 2.7, not the device it works
    on, so the sign is in the graph: a job puts its filter node (mirror_top,
    commit_top, copy-before-write) above the node it works on, and that
    filter shows the same file. Jobs of other devices are not ours to wait for.
    """
    jobs = monitor.execute("query-block-jobs") or []
    if not jobs:
        return ""
    named = [j for j in jobs if j.get("device") in (disk.device, disk.node)]
    filtered = any(n.get("drv") in JOB_FILTERS and n.get("file") == disk.filename
                   for n in monitor.execute("query-named-block-nodes") or [])
    if filtered and not named:
        named = jobs  # which one is on this disk, QEMU does not say; name them all
    return ", ".join(f"{j.get('type', '?')} job {j.get('device', '?')}" for j in named)


def image_path(disk: Disk, pid: int | None) -> str:
    """The image file as this process reaches it, checked to be the very file
    the QEMU process has open (same device and inode), where /proc shows it.

    Serving another file than the guest's would be a disaster after the
    pivot, so a relative name is resolved against QEMU's own working
    directory, and a name QEMU cannot be seen holding is refused.
    """
    path = disk.filename
    if path.startswith(("json:", "nbd:", "nbd+")) or "://" in path:
        raise AttachRefused(f"{disk.name}'s image is not a local file ({path}): attach serves "
                            "raw image files only")
    proc = f"/proc/{pid}" if pid else None
    if not os.path.isabs(path):
        if proc is None:
            raise AttachRefused(f"{disk.name}'s image {path} is a relative name and the QEMU "
                                "process is unknown: start QEMU with an absolute path")
        try:
            path = os.path.join(os.readlink(f"{proc}/cwd"), path)
        except OSError as e:
            raise AttachRefused(f"cannot see QEMU's working directory ({e.strerror}): run "
                                "diskwatch as the QEMU's user or root") from None
    if proc is None:
        return path
    try:
        st = os.stat(path)
    except OSError as e:
        raise AttachRefused(f"{disk.name}'s image {path}: {e.strerror} (is diskwatch on the same "
                            "host and filesystem view as the QEMU?)") from None
    try:
        fds = os.listdir(f"{proc}/fd")
    except OSError:
        return path  # not ours to look at: trust the name
    for fd in fds:
        try:
            fst = os.stat(f"{proc}/fd/{fd}")
        except OSError:
            continue
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
            return path
    raise AttachRefused(f"the QEMU (pid {pid}) does not hold {path} open: another filesystem "
                        "view (a container, a chroot)? run diskwatch where the QEMU runs")


# --- a qcow2 disk ------------------------------------------------------------------------

#: what attach to a qcow2 disk sends besides COMMANDS (blockdev-reopen is stable since 6.1)
QCOW2_COMMANDS = ("blockdev-reopen", "x-debug-query-block-graph")


@dataclass
class Qcow2Parts:
    """The nodes under a qcow2 device, and what of them diskwatch can serve."""

    image: str  # the qcow2 file, as this process reaches it
    file_node: str  # the qcow2 node's file child
    backing_node: str = ""  # its backing child ("" without one)
    backing_file_node: str = ""
    backing_image: str = ""  # the backing's raw file, when its reads can be watched
    backing_size: int = 0
    backing_cache: dict[str, Any] = field(default_factory=dict)
    backing_detect_zeroes: str = "off"
    #: why the backing file's reads are not watched ("" when they are, or without one)
    backing_note: str = ""


def qcow2_parts(monitor: Monitor, disk: Disk, pid: int | None) -> Qcow2Parts:
    """The qcow2 device's file and backing nodes (from the block graph), checked:
    a named qcow2 node (blockdev-reopen cannot reopen a node QEMU named
    itself), on a local file QEMU holds; a raw backing on a local file is
    watched too, anything else is said."""
    name = disk.name
    have = {c.get("name") for c in monitor.execute("query-commands") or []}
    missing = [c for c in QCOW2_COMMANDS if c not in have]
    if missing:
        raise AttachRefused(f"{name} is a qcow2 image and this QEMU lacks {', '.join(missing)}: "
                            "attach to a qcow2 disk needs QEMU 6.1 or newer")
    if disk.node.startswith("#"):
        raise AttachRefused(f"{name}'s qcow2 node is one QEMU named itself ({disk.node}): "
                            "blockdev-reopen reopens named nodes only; start QEMU with -blockdev "
                            "(as libvirt does) or -drive ...,node-name=NAME")
    children = block_children(monitor)
    nodes = {n.get("node-name"): n for n in monitor.execute("query-named-block-nodes") or []}
    file_node = children.get((disk.node, "file"), "")
    file_info = nodes.get(file_node, {})
    if file_info.get("drv") == "nbd" and file_node.startswith(PREFIX):
        raise AttachRefused(f"{name} is already on diskwatch (node {file_node}): one diskwatch "
                            "per disk; quit the other one first (it puts the disk back)")
    if file_info.get("drv") != "file":
        raise AttachRefused(f"{name}'s qcow2 image is on a {file_info.get('drv', '?')} node, not "
                            "on a local file: attach serves image files only")
    if children.get((disk.node, "data-file")):
        raise AttachRefused(f"{name}'s qcow2 image has an external data file: attach serves "
                            "images whose data is in the image file only")
    image = image_path(Disk(disk.device, disk.qdev, file_node, "file", file_info.get("file", ""),
                            0, disk.readonly), pid)
    st = os.stat(image)
    if not stat.S_ISREG(st.st_mode):
        raise AttachRefused(f"{name}'s image {image} is not a regular file")
    parts = Qcow2Parts(image=image, file_node=file_node)
    backing = children.get((disk.node, "backing"), "")
    if not backing:
        return parts
    parts.backing_node = backing
    info = nodes.get(backing, {})
    bfile = children.get((backing, "file"), "")
    binfo = nodes.get(bfile, {})
    if info.get("drv") != "raw" or binfo.get("drv") != "file":
        parts.backing_note = (f"its backing file is {info.get('drv', '?')} on "
                              f"{binfo.get('drv', '?')}, not raw on a file: its reads are not seen")
        return parts
    if backing.startswith("#"):
        parts.backing_note = (f"its backing node is one QEMU named itself ({backing}; "
                              "-blockdev names it): the backing file's reads are not seen")
        return parts
    path = image_path(Disk(disk.device, disk.qdev, bfile, "file", binfo.get("file", ""), 0,
                           True), pid)
    size = int((info.get("image") or {}).get("virtual-size", -1))
    if size != os.stat(path).st_size:
        parts.backing_note = ("its raw backing node has an offset or size: the backing file's "
                              "reads are not seen")
        return parts
    parts.backing_file_node = bfile
    parts.backing_image = path
    parts.backing_size = size
    parts.backing_cache = dict(info.get("cache", {}))
    parts.backing_detect_zeroes = info.get("detect_zeroes", "off")
    return parts
