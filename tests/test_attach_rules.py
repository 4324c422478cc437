"""The attach refusals that a real QEMU here cannot produce.

test_attach.py drives every refusal it can against a real running QEMU
(7.2). Two cannot be made with it: an older QEMU, and a monitor that hides
commands (QEMU itself has no read-only QMP; a management layer's filtering
proxy has). For those two rules a monitor that answers from a table stands
in; it answers what QEMU 7.2's QMP answered for the same commands.
"""

from __future__ import annotations

import pytest

from diskwatch.attach.disks import COMMANDS, AttachRefused, check_monitor, choose_disk, list_disks
from diskwatch.attach.qmp import Monitor, QmpCommandError


class TableMonitor(Monitor):
    def __init__(self, version, commands, answers=None):
        self.version = version
        self.name = "/run/vm.qmp"
        self.commands = commands
        self.answers = answers or {}

    def execute(self, command, arguments=None):
        if command not in self.commands and command != "query-commands":
            raise QmpCommandError(command, "CommandNotFound", f"The command {command} has not been found")
        if command == "query-commands":
            return [{"name": c} for c in self.commands]
        return self.answers[command]


def test_a_qemu_too_old_is_refused_with_what_it_lacks():
    with pytest.raises(AttachRefused, match=r"QEMU 4\.1\.1 is too old: attach needs QEMU 4\.2"):
        check_monitor(TableMonitor((4, 1, 1), COMMANDS))
    check_monitor(TableMonitor((4, 2, 0), COMMANDS))


def test_a_monitor_without_the_block_commands_is_refused():
    allowed = [c for c in COMMANDS if c not in ("blockdev-add", "blockdev-mirror")]
    with pytest.raises(AttachRefused, match="does not offer blockdev-add, blockdev-mirror: a "
                                            "read-only or filtered monitor"):
        check_monitor(TableMonitor((7, 2, 0), allowed))


# What QEMU 7.2 answered for `-drive file=disk.img,format=raw,if=virtio` plus a
# qcow2 drive with id=spare (trimmed to the fields used).
QUERY_BLOCK = [
    {"device": "virtio0", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
     "inserted": {"node-name": "#block107", "drv": "raw", "file": "disk.img", "ro": False,
                  "detect_zeroes": "off", "image": {"virtual-size": 50331648}}},
    {"device": "spare", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
     "inserted": {"node-name": "#block391", "drv": "qcow2", "file": "/vm/spare.qcow2",
                  "ro": False, "detect_zeroes": "off", "image": {"virtual-size": 16777216}}},
    {"device": "ide1-cd0", "qdev": "/machine/unattached/device[23]"},  # an empty CD-ROM
]
NODES = [
    {"node-name": "#block107", "drv": "raw", "file": "disk.img",
     "cache": {"direct": False, "no-flush": False, "writeback": True}},
    {"node-name": "#block058", "drv": "file", "file": "disk.img"},
    {"node-name": "#block391", "drv": "qcow2", "file": "/vm/spare.qcow2"},
    {"node-name": "#block222", "drv": "file", "file": "/vm/spare.qcow2"},
]


def test_disks_are_listed_and_chosen_by_any_of_their_names():
    m = TableMonitor((7, 2, 0), ["query-block", "query-named-block-nodes"],
                     {"query-block": QUERY_BLOCK, "query-named-block-nodes": NODES})
    disks = list_disks(m)
    assert [(d.name, d.driver, d.protocol) for d in disks] == [
        ("virtio0", "raw", "file"), ("spare", "qcow2", "file")]
    assert choose_disk(disks, "virtio0") is disks[0]
    assert choose_disk(disks, "#block391") is disks[1]
    assert choose_disk(disks, "/machine/peripheral-anon/device[1]/virtio-backend") is disks[1]
    with pytest.raises(AttachRefused, match="2 block devices: virtio0 .* choose one with --device"):
        choose_disk(disks, None)
    with pytest.raises(AttachRefused, match="no block device"):
        choose_disk(disks, "virtio9")


# A qcow2 device as QEMU 7.2 lists it with libvirt's layout (named -blockdev
# nodes), its backing varied; the block graph as x-debug-query-block-graph gives it.
def qcow2_monitor(tmp_path, backing_drv="raw", backing_name="base-fmt", commands=None):
    from diskwatch.attach.disks import QCOW2_COMMANDS
    top, base = tmp_path / "top.qcow2", tmp_path / "base.raw"
    top.write_bytes(b"\0" * 65536)
    base.write_bytes(b"\0" * 65536)
    block = [{"device": "", "qdev": "/machine/peripheral/virtio0/virtio-backend",
              "inserted": {"node-name": "top-fmt", "drv": "qcow2", "file": str(top), "ro": False,
                           "detect_zeroes": "off", "image": {"virtual-size": 65536}}}]
    nodes = [
        {"node-name": "top-fmt", "drv": "qcow2", "file": str(top), "cache": {}},
        {"node-name": "top-file", "drv": "file", "file": str(top)},
        {"node-name": backing_name, "drv": backing_drv, "file": str(base), "cache": {},
         "image": {"virtual-size": 65536}},
        {"node-name": "base-file", "drv": "file", "file": str(base)},
    ]
    names = ["/machine/peripheral/virtio0/virtio-backend", "top-fmt", "top-file", backing_name,
             "base-file"]
    graph = {"nodes": [{"id": i, "name": n} for i, n in enumerate(names)],
             "edges": [{"parent": 0, "child": 1, "name": "root"},
                       {"parent": 1, "child": 2, "name": "file"},
                       {"parent": 1, "child": 3, "name": "backing"},
                       {"parent": 3, "child": 4, "name": "file"}]}
    return TableMonitor((7, 2, 0), commands or [*COMMANDS, *QCOW2_COMMANDS],
                        {"query-block": block, "query-named-block-nodes": nodes,
                         "x-debug-query-block-graph": graph}), base


def test_a_qcow2_disk_finds_its_file_and_backing_nodes(tmp_path):
    from diskwatch.attach.disks import qcow2_parts
    m, base = qcow2_monitor(tmp_path)
    (disk,) = list_disks(m)
    parts = qcow2_parts(m, disk, None)
    assert (parts.file_node, parts.backing_node, parts.backing_file_node) == (
        "top-file", "base-fmt", "base-file")
    assert parts.backing_image == str(base) and parts.backing_note == ""


@pytest.mark.parametrize("drv, name, says", [
    ("qcow2", "base-fmt", "its backing file is qcow2 on file, not raw on a file"),
    ("raw", "#block123", "its backing node is one QEMU named itself"),
])
def test_a_backing_that_cannot_be_served_is_said_not_refused(tmp_path, drv, name, says):
    from diskwatch.attach.disks import qcow2_parts
    m, _ = qcow2_monitor(tmp_path, drv, name)
    parts = qcow2_parts(m, list_disks(m)[0], None)
    assert says in parts.backing_note and parts.backing_image == ""


def test_a_qemu_without_blockdev_reopen_is_refused_for_qcow2(tmp_path):
    from diskwatch.attach.disks import qcow2_parts
    m, _ = qcow2_monitor(tmp_path, commands=[*COMMANDS, "x-blockdev-reopen"])
    with pytest.raises(AttachRefused, match="lacks blockdev-reopen, x-debug-query-block-graph: "
                                            "attach to a qcow2 disk needs QEMU 6.1"):
        qcow2_parts(m, list_disks(m)[0], None)


def test_the_same_device_twice_is_one_line_before_the_monitor_is_touched(tmp_path):
    """attach to several disks: a --device given twice is refused before
    any monitor is opened (this one does not even exist)."""
    import subprocess
    import sys
    from pathlib import Path
    exe = str(Path(sys.executable).with_name("diskwatch"))
    r = subprocess.run([exe, "attach", str(tmp_path / "no.qmp"), "--device", "virtio0",
                        "--device", "virtio0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == "diskwatch: the same --device twice"
