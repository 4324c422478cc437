"""Incremental remaps (issue 18, item 2) against a real ext4 driver.

libguestfs's appliance (a Linux kernel under TCG) mounts the disk that
diskwatch's server serves and makes, grows, renames and deletes files;
its writes go through the server to the session's pump and remapper. The
live map must follow them by **updates** (the mapper reading again what
was written: ``bmap/incremental.py``), not by whole walks, and the map it
ends with must match what debugfs says of the image afterwards (ground
truth from another tool), file by file and directory by directory.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
from fixtures_images import GUESTFS_ENV
from groundtruth import ext4_file_ranges, ext4_list

from diskwatch.bmap.index import BlockMap, BmapObject
from diskwatch.bmap.metadata import map_metadata
from diskwatch.events import Bus
from diskwatch.remap import Remapper
from diskwatch.server import serve_in_thread
from diskwatch.session import Session
from diskwatch.sources.file import FileSource

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("debugfs") is None, reason="e2fsprogs")]

KiB = 1024


def _until(what: str, condition, timeout: float = 90.0, said=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s; said {list(said)}"
        time.sleep(0.05)


class _Pump(threading.Thread):
    """The session's pump at 20 Hz, as a live session runs it."""

    def __init__(self, session: Session):
        super().__init__(daemon=True, name="test-pump")
        self.session = session
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.session.pump.run_once(time.monotonic())


def test_a_kernel_s_creates_appends_renames_and_deletes_are_followed_by_updates(
        ext4_mbr_image, tmp_path):
    guestfs = pytest.importorskip("guestfs")
    os.environ.update(GUESTFS_ENV)
    disk = tmp_path / "disk.img"
    shutil.copy(ext4_mbr_image.path, disk)
    vol = ext4_mbr_image.volume("/dev/sda1")
    source = FileSource(str(disk))
    with FileSource(str(disk), readonly=True) as s:
        old = BlockMap(map_metadata(s, done_event=False).entries)
    bus = Bus()
    running = serve_in_thread({"": source}, bus)
    session = Session(bus=bus, size=source.size, description="disk.img", blockmap=old)
    said: list[str] = []
    remapper = session.pump.add(Remapper(
        source, current=lambda: session.blockmap, say=lambda text, level: said.append(text),
        swap=lambda result: session.swap_map(result.blockmap, "remap", result.journal_map)))
    pump = _Pump(session)
    pump.start()
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        # The walk updates start from, made at the session's first round.
        _until("the first walk", lambda: remapper.mapper is not None
               and remapper.mapper.has_state and not remapper.running)
        g.add_drive_opts("", format="raw", protocol="nbd",
                         server=[f"unix:{running.socket_path}"])
        g.launch()
        g.mount("/dev/sda1", "/")
        victim, moved = sorted(ext4_mbr_image.files["/dev/sda1"])[:2]
        g.mkdir_p("/newdir/deeper")
        g.write("/newdir/created.log", b"started\n" * 4096)  # 32 KiB
        g.write("/newdir/deeper/tiny.txt", b"x" * 300)
        for _ in range(8):
            g.write_append("/newdir/created.log", b"one more line of the log\n" * 400)
        g.rm(victim)
        g.mv(moved, "/renamed.bin")
        g.sync()

        def names() -> set[str]:
            return {o.path for o in session.blockmap.object_table() if o.device == "/dev/sda1"}
        _until("the new, renamed and deleted files followed",
               lambda: {"/newdir/created.log", "/newdir/deeper/tiny.txt", "/renamed.bin"}
               <= names() and victim not in names() and moved not in names(), said=said)
        g.umount_all()
        g.shutdown()
    finally:
        g.close()
    try:
        # What the unmount wrote (the checkpoint, the superblock) is followed too.
        _until("the last remap", lambda: not remapper.running
               and remapper.structure == 0 and remapper.unnamed == 0, said=said)
        assert remapper.request("auto") and remapper.wait(60)
        _until("its swap", lambda: remapper._done is None)
    finally:
        pump.stop.set()
        pump.join(10)
        remapper.close()
        running.stop()
        source.close()

    print("\n".join(said))
    followed = [s for s in said if "read again:" in s]
    assert followed, said
    assert not [s for s in said if "whole walk" in s or "failed" in s], said
    # Ground truth: debugfs on the image, now that the kernel has unmounted it.
    listing = ext4_list(disk, vol.offset)
    assert "/newdir/created.log" in listing and victim not in listing
    truth = ext4_file_ranges(disk, vol.offset, include_dirs=True)
    final = session.blockmap
    wrong = []
    for path, ranges in truth.items():
        kind = "d" if listing[path].kind == "d" else "f"
        mapped = final.ranges_of(BmapObject(kind, "/dev/sda1", path))
        if sorted(mapped) != sorted(ranges):
            wrong.append((path, mapped, ranges))
    assert not wrong, wrong[:5]
    named = {o.path for o in final.object_table()
             if o.device == "/dev/sda1" and o.type in "fd" and not o.path.startswith("/$")
             and ":" not in o.path}
    assert named - set(listing) == set(), "objects the filesystem no longer has"
    assert final.ranges_of(BmapObject("f", "/dev/sda1", "/newdir/created.log"))
