"""Issue 20 item 4: diskwatch attach to a running guest's two disks at once.

The loop guest (test_attach.py's harness) boots with a second raw disk, an
MBR and one ext4 partition holding /data/f0..f7, which its init mounts:
every tick it reads those files and writes a record into /data/f3, as it
does on its root disk. One attach moves both disks onto diskwatch (each
its own export on the one socket, /dev/sda and /dev/sdb in the order of
--device), the trace names each disk's files on its own device, detach
puts both back, and so does the watchdog after kill -9. Last, the guest
stops and both filesystems are checked with e2fsck, and no record of the
data disk was lost.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_attach import MAX_STALL, RunningGuest, booted, start_attach, wait_back

from diskwatch.demo.guest import MiB

pytestmark = pytest.mark.slow

PART = MiB  # the data disk's partition starts 1 MiB in


def make_data_disk(work) -> Path:
    """The data disk the loop guest mounts: an MBR, one ext4 partition at
    ``PART`` holding /data/f0..f7 (test_attach_qcow2.py's guest has one too)."""
    tree = work / "tree"
    (tree / "data").mkdir(parents=True)
    for i in range(8):  # f3 takes a record in each of its 16 4 KiB slots: in place
        (tree / f"data/f{i}").write_bytes(bytes([i + 1]) * (65536 if i == 3 else 20000))
    data = work / "data.raw"
    with open(data, "wb") as f:
        f.truncate(17 * MiB)
    subprocess.run(["sfdisk", "-q", str(data)], input=b"start=2048, type=83\n", check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={PART}", "-d", str(tree),
                    str(data), "15M"], check=True)
    return data


def check_data_disk(g: RunningGuest, data) -> None:
    """Once the guest stopped: the data disk's filesystem is clean, and every
    one of the last ticks (15 at most: the slots) left its record in /data/f3."""
    r = subprocess.run(["e2fsck", "-f", "-n", f"{data}?offset={PART}"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["debugfs", "-R", "cat /data/f3", f"{data}?offset={PART}"],
                       capture_output=True)
    f3 = r.stdout.decode("latin-1")
    last = [n for _, n in g.ticks][-15:]
    assert len(last) >= 5
    for n in last:
        slot = n % 15 + 1
        assert f3[slot * 4096:slot * 4096 + 64].startswith(f"loop {n} on the data disk"), \
            (n, slot)


def assert_each_disk_named(log) -> None:
    """The trace names the loop's log on the root disk and its data files on
    the data disk, each on its own device and nowhere else."""
    trace = log.read_text()
    assert "write f /dev/sda1 /var/log/demo.log" in trace, trace[-2000:]
    assert "write f /dev/sdb1 /data/f3" in trace and "read f /dev/sdb1 /data/f0" in trace, \
        trace[-2000:]
    assert not re.search(r"[fd] /dev/sda1 /data/", trace)


@pytest.fixture(scope="module")
def two_disk_guest(guest_image, tmp_path_factory):
    work = tmp_path_factory.mktemp("attach-disks")
    image = work / "running.img"
    shutil.copyfile(guest_image.path, image)
    data = make_data_disk(work)
    with booted(image, guest_image, work, burst=False,
                ready=r"diskwatch-loop: data disk /dev/vd[bc]1",
                extra=["-drive", f"file={data},format=raw,if=virtio,id=data"]) as guest:
        yield guest, data


def attach_both(g: RunningGuest, *args: str) -> tuple[subprocess.Popen, list[str]]:
    return start_attach(g, *args, devices=("virtio0", "data"))


def drivers(g: RunningGuest) -> tuple[str, str]:
    state = g.block_state()
    return state["virtio0"][1], state["data"][1]


def test_one_attach_moves_both_disks_names_each_and_detach_puts_both_back(two_disk_guest,
                                                                         tmp_path):
    g, _ = two_disk_guest
    since = time.monotonic()
    assert drivers(g) == ("raw", "raw")
    log = tmp_path / "trace.txt"
    proc, err = attach_both(g, "--bmap", str(tmp_path / "vm.bmap"), "--log", str(log))
    assert drivers(g) == ("nbd", "nbd")
    said = "".join(err)
    assert "attached: virtio0 and data's I/O goes through diskwatch" in said, said
    g.wait_ticks(3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, "".join(err)
    assert drivers(g) == ("raw", "raw")
    with g.qmp() as q:
        assert not any(n["drv"] == "nbd" for n in q.execute("query-named-block-nodes"))
    said = "".join(err)
    assert re.search(r"detached: virtio0 is back on \S+running\.img; data is back on \S+data\.raw",
                     said), said
    assert_each_disk_named(log)
    g.wait_ticks(2)
    assert g.max_stall(since) < MAX_STALL, g.tail()


def test_kill_9_while_attached_to_both_the_watchdog_puts_both_back(two_disk_guest):
    g, _ = two_disk_guest
    since = time.monotonic()
    proc, err = attach_both(g, "--no-trace")
    assert drivers(g) == ("nbd", "nbd")
    g.wait_ticks(1)
    proc.kill()
    proc.wait()
    wait_back(err, ("virtio0", "data"), lambda: drivers(g), ("raw", "raw"))
    g.wait_ticks(3)
    assert g.max_stall(since) < MAX_STALL, g.tail()
    assert "I/O error" not in g.tail(200)


def test_the_guest_stops_and_both_filesystems_are_clean(two_disk_guest):
    g, data = two_disk_guest
    assert g.stop() == 0
    g.wait_line(r"diskwatch-loop: stopped", 5)
    assert "I/O error" not in "\n".join(line for _, line in g.lines)
    r = subprocess.run(["e2fsck", "-f", "-n", f"{g.image}?offset={g.guest.partition_offset}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    check_data_disk(g, data)
