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
from groundtruth import ext4_file_ranges, ext4_list, fat_file_ranges, ntfs_object_ranges

from diskwatch.bmap.index import BlockMap, BmapObject
from diskwatch.bmap.metadata import map_metadata
from diskwatch.events import Bus, LateNamed
from diskwatch.pipeline.session import Session
from diskwatch.pipeline.sink import SinkBase
from diskwatch.remap import Remapper
from diskwatch.server import serve_in_thread
from diskwatch.sources.file import FileSource
from diskwatch.wire import WRITE_COMMANDS

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
        # What systemd does for a PrivateTmp= service: a directory with a
        # directory in it, made, then removed whole, and the disk written on.
        g.mkdir_p("/private-x/tmp")
        g.sync()
        _until("the private directories followed",
               lambda: {"/private-x", "/private-x/tmp"} <= names(), said=said)
        g.rm_rf("/private-x")
        g.write("/after.log", b"after the private directory\n" * 2000)
        g.sync()
        _until("the private directories gone, the next file followed",
               lambda: not {"/private-x", "/private-x/tmp"} & names()
               and "/after.log" in names(), said=said)
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
    # a directory deleted with its parent is gone, not an error at every remap
    assert not [s for s in said if "could not be read again" in s], said
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


class _WriteCounter(SinkBase):
    """Bytes written to one device, those a file, directory or structure
    named as they were written (the live lookups), and those a remap named
    afterwards (a new file's data, written before its record)."""

    def __init__(self, device: str):
        self.device = device
        self.written = self.named = self.named_late = 0

    def on_event(self, event) -> None:
        if isinstance(event, LateNamed):
            for _, _, start, end, _, new in event.writes:
                if new.device == self.device and new.type in "fd":
                    self.named_late += end - start

    def feed(self, batch, pieces) -> None:
        if pieces is None:
            return
        for req, ps in zip(batch, pieces, strict=True):
            if req[2] not in WRITE_COMMANDS:
                continue
            for start, end, obj in ps:
                if obj is not None and obj.device == self.device:
                    self.written += end - start
                    self.named += (end - start) if obj.type in "fd" else 0


def test_ntfs_3g_s_creates_appends_and_deletes_are_followed_by_updates(ntfs_image, tmp_path):
    """An "antivirus" through ntfs-3g (libguestfs's appliance): reads its
    DLLs, appends to its log, makes a new small log (resident: its appends
    are writes to its own MFT record), writes and deletes a 300 KB
    quarantine file. Each is named by updates; >= 90% of the bytes it writes
    to the partition are named, as they are written or (a new file's data,
    which comes before its record) as soon as an update names them; the map
    at the end matches ntfsinfo's runlists."""
    guestfs = pytest.importorskip("guestfs")
    if shutil.which("ntfsinfo") is None:
        pytest.skip("ntfs-3g")
    os.environ.update(GUESTFS_ENV)
    disk = tmp_path / "disk.img"
    shutil.copy(ntfs_image.path, disk)
    vol = ntfs_image.volume("/dev/sda2")
    source = FileSource(str(disk))
    with FileSource(str(disk), readonly=True) as s:
        old = BlockMap(map_metadata(s, done_event=False).entries)
    bus = Bus()
    running = serve_in_thread({"": source}, bus)
    session = Session(bus=bus, size=source.size, description="disk.img", blockmap=old)
    said: list[str] = []
    counter = session.pump.add(_WriteCounter("/dev/sda2"))
    remapper = session.pump.add(Remapper(
        source, current=lambda: session.blockmap, say=lambda text, level: said.append(text),
        swap=lambda result: session.swap_map(result.blockmap, "remap", result.journal_map)))
    pump = _Pump(session)
    pump.start()
    g = guestfs.GuestFS(python_return_dict=True)
    quarantine = "/ProgramData/AV/Quarantine/sample.bin"
    try:
        _until("the first walk", lambda: remapper.mapper is not None
               and remapper.mapper.has_state and not remapper.running)
        g.add_drive_opts("", format="raw", protocol="nbd",
                         server=[f"unix:{running.socket_path}"])
        g.launch()
        g.mount("/dev/sda2", "/")
        dlls = [p for p in ntfs_image.files["/dev/sda2"] if p.lower().endswith(".dll")][:4]
        for p in dlls:
            g.read_file(p)
        g.mkdir_p("/ProgramData/AV/Quarantine")
        g.write("/ProgramData/AV/scan.log", b"scan started\r\n")
        g.write("/ProgramData/AV/new.log", b"x")  # small: resident
        for i in range(6):
            g.write_append("/ProgramData/AV/scan.log", b"scanned a file, clean\r\n" * 200)
            g.write_append("/ProgramData/AV/new.log", b"%d\r\n" % i)
            g.sync()
        g.write(quarantine, os.urandom(300 * KiB))
        g.sync()

        def names() -> set[str]:
            return {o.path for o in session.blockmap.object_table() if o.device == "/dev/sda2"}
        _until("the logs and the quarantined file named",
               lambda: {"/ProgramData/AV/scan.log", "/ProgramData/AV/new.log", quarantine}
               <= names(), said=said)
        g.rm(quarantine)
        g.sync()
        _until("the quarantined file gone", lambda: quarantine not in names(), said=said)
        g.umount_all()
        g.shutdown()
    finally:
        g.close()
    try:
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
    print(f"written to /dev/sda2: {counter.written} bytes, named live {counter.named}, "
          f"named late {counter.named_late}")
    assert [s for s in said if "read again:" in s], said
    assert not [s for s in said if "whole walk" in s or "failed" in s], said
    # a directory deleted with its parent is gone, not an error at every remap
    assert not [s for s in said if "could not be read again" in s], said
    assert counter.written > 300 * KiB
    assert counter.named + counter.named_late >= 0.9 * counter.written
    # Ground truth: ntfsinfo on the partition, as the driver left it.
    part = tmp_path / "c.ntfs"
    with open(disk, "rb") as f, open(part, "wb") as out:
        f.seek(vol.offset)
        out.write(f.read(vol.length))
    paths = ["/ProgramData/AV/scan.log", "/ProgramData/AV/new.log", *dlls]
    truth = ntfs_object_ranges(part, vol.offset, paths)
    final = session.blockmap
    for path in paths:
        assert final.ranges_of(BmapObject("f", "/dev/sda2", path)) == truth[path], path
    with pytest.raises(KeyError):
        ntfs_object_ranges(part, vol.offset, [quarantine])


def test_vfat_s_appends_creates_and_deletes_are_followed_by_updates(gpt_fat_image, tmp_path):
    """FAT keeps a file's size and first cluster in its directory entry:
    a directory written has every file of it read again. Linux's vfat
    driver (libguestfs) grows a file, makes a directory and a file, and
    deletes one; the map follows by updates and ends as mtools says."""
    guestfs = pytest.importorskip("guestfs")
    if shutil.which("mshowfat") is None:
        pytest.skip("mtools")
    os.environ.update(GUESTFS_ENV)
    disk = tmp_path / "disk.img"
    shutil.copy(gpt_fat_image.path, disk)
    vol = gpt_fat_image.volume("/dev/sda2")
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
    grown, gone, made = "/readme.txt", "/Docs/Nested/other.dat", "/Logs/new log.txt"
    try:
        _until("the first walk", lambda: remapper.mapper is not None
               and remapper.mapper.has_state and not remapper.running)
        g.add_drive_opts("", format="raw", protocol="nbd",
                         server=[f"unix:{running.socket_path}"])
        g.launch()
        g.mount("/dev/sda2", "/")
        g.write_append(grown, b"one more line of the readme\r\n" * 1000)  # 29 KB more
        g.mkdir("/Logs")
        g.write(made, b"log\r\n" * 2000)
        g.rm(gone)
        g.sync()

        def ranges(path: str) -> list:
            return session.blockmap.ranges_of(BmapObject("f", "/dev/sda2", path))
        _until("the grown, made and deleted files followed",
               lambda: ranges(made) and not ranges(gone)
               and sum(e - s for s, e in ranges(grown)) >= 30000, said=said)
        g.umount_all()
        g.shutdown()
    finally:
        g.close()
    try:
        _until("the last remap", lambda: not remapper.running
               and remapper.structure == 0 and remapper.unnamed == 0, said=said)
    finally:
        pump.stop.set()
        pump.join(10)
        remapper.close()
        running.stop()
        source.close()
    print("\n".join(said))
    assert [s for s in said if "read again:" in s], said
    assert not [s for s in said if "whole walk" in s or "failed" in s], said
    # a directory deleted with its parent is gone, not an error at every remap
    assert not [s for s in said if "could not be read again" in s], said
    truth = fat_file_ranges(disk, vol.offset, [grown, made])
    for path in (grown, made):
        assert sorted(session.blockmap.ranges_of(BmapObject("f", "/dev/sda2", path))) \
            == sorted(truth[path]), path
