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
