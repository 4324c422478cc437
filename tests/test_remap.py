"""Live remapping (issue 10, item 6): the map made again from the disk as it
is now, through the served source, while a real client (libnbd) writes.

The disk: image A (MBR, one ext4 partition from a tree) is mapped; then a
client writes image B's filesystem (another tree, files A never had) over
it through the server, under a --snapshot overlay. A remap must name B's
files exactly where debugfs says they lie on B, and the trace must name
them from then on. Writing A and B in turn while remapping in a loop gives
filesystems caught mid-update: partial maps and warnings, never a crash.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_images import make_map, write_tree
from fixtures_server import DISKWATCH, wait_until
from groundtruth import ext4_file_ranges
from pilot_helpers import play_to_end

from diskwatch.bmap.index import BlockMap, BmapObject
from diskwatch.demo.guest import MiB, make_partition_table, mkfs_ext4_at
from diskwatch.events import Bus
from diskwatch.pipeline.session import Session
from diskwatch.remap import Remapper, remap
from diskwatch.server import serve_in_thread
from diskwatch.sinks.text_trace import TextTrace
from diskwatch.sources.file import FileSource
from diskwatch.sources.snapshot import Snapshot

nbd = pytest.importorskip("nbd")

DISK_SIZE = 24 * MiB
TREE_A = {"/etc/hostname": 20, "/usr/share/a/old.txt": 50_000, "/var/log/boot.log": 12_000}
TREE_B = {"/etc/hostname": 20, "/var/log/new-after-boot.log": 300_000,
          "/srv/data/fresh file.bin": 700_000, "/srv/data/more/deep.dat": 90_000}
NEW_IN_B = sorted(set(TREE_B) - set(TREE_A))


def _build(path: Path, tree: dict[str, int], work: Path) -> int:
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    ((offset, length),) = make_partition_table(path, "dos", [(None, "83")])
    root = work / (path.name + "-tree")
    write_tree(root, tree)
    mkfs_ext4_at(path, offset, length, root)
    return offset


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """(image A, its map, image B, the partition's offset): the same layout."""
    work = tmp_path_factory.mktemp("remap")
    a, b = work / "a.img", work / "b.img"
    offset = _build(a, TREE_A, work)
    assert _build(b, TREE_B, work) == offset
    return a, make_map(a, work / "a.bmap"), b, offset


def _write_image(h, image: Path, chunk: int = MiB) -> None:
    """Write ``image`` over the served disk, as a client does, chunk by chunk."""
    with open(image, "rb") as f:
        off = 0
        while data := f.read(chunk):
            h.pwrite(data, off)
            off += len(data)


def _expected_b(b: Path, offset: int) -> dict[str, list[tuple[int, int]]]:
    return ext4_file_ranges(b, offset, NEW_IN_B)  # debugfs: the ground truth


def test_remap_names_files_written_after_the_map_through_a_snapshot(disks, tmp_path):
    a, a_map, b, offset = disks
    before = a.read_bytes()
    source = Snapshot(FileSource(str(a)), tmpdir=str(tmp_path))
    bus = Bus()
    running = serve_in_thread({"": source}, bus)
    session = Session(bus=bus, size=source.size, description="a.img",
                      blockmap=BlockMap.load(a_map))
    trace_out = io.StringIO()
    trace = session.pump.add(TextTrace(trace_out, session.blockmap, session.started))
    said: list[str] = []
    swapped: list = []

    def swap(result) -> None:
        swapped.append(result)
        session.blockmap = trace.blockmap = result.blockmap
    remapper = session.pump.add(Remapper(
        source, current=lambda: session.blockmap, swap=swap,
        say=lambda text, level: said.append(text), threshold=MiB))
    h = nbd.NBD()
    try:
        h.connect_uri(running.uri)
        # B's filesystem written over A: most of it lands outside A's files.
        _write_image(h, b)
        h.flush()
        running.thread.call(lambda: None)  # every reply's event published
        session.pump.run_once(time.monotonic())
        assert remapper.unnamed >= MiB or remapper.running  # counted, then started
        assert remapper.running or remapper._done is not None, "no automatic remap"
        assert remapper.wait(30)
        session.pump.run_once(time.monotonic())  # swapped in the pump's thread
        assert len(swapped) == 1 and remapper.remaps == 1
        result = swapped[0]
        new_map = result.blockmap
        # Every new file where debugfs finds it on B, nothing else named there.
        for path, ranges in _expected_b(b, offset).items():
            obj = BmapObject("f", "/dev/sda1", path)
            assert obj in result.added
            assert new_map.ranges_of(obj) == ranges, path
        assert BmapObject("f", "/dev/sda1", "/usr/share/a/old.txt") in result.removed
        assert len(said) == 1 and re.match(
            rf"remap \(auto\): \+{len(result.added)} objects, -{len(result.removed)}, ", said[0])
        assert "/srv/data/fresh file.bin" in said[0] or "/var/log/new-after-boot.log" in said[0]
        # From now on the trace names the new file.
        path = "/var/log/new-after-boot.log"
        start, end = new_map.ranges_of(BmapObject("f", "/dev/sda1", path))[0]
        h.pread(min(end - start, 65536), start)
        running.thread.call(lambda: None)
        session.pump.run_once(time.monotonic())
        session.pump.close()
        assert f"read f /dev/sda1 {path}" in trace_out.getvalue()
    finally:
        h.shutdown()
        running.stop()
        source.close()
    assert a.read_bytes() == before  # --snapshot: the image itself is untouched


def test_remapping_while_a_client_rewrites_the_filesystem_never_crashes(disks, tmp_path):
    """A and B written in turn, the whole partition over and over, while the
    disk is remapped in a loop: each remap is a map (maybe partial, with a
    warning) or a failure told in one line; none raises. The guest's writes
    all succeed, and the last remap, once writing stopped, is exact."""
    a, a_map, b, offset = disks
    work = tmp_path / "rw.img"
    work.write_bytes(a.read_bytes())
    source = FileSource(str(work))
    running = serve_in_thread({"": source}, Bus())
    stop = threading.Event()
    written = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(running.uri)
            while not stop.is_set():
                for image in (b, a):
                    _write_image(h, image, chunk=256 * 1024)
                    written[0] += 1
            _write_image(h, b)
            h.flush()
            h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    t = threading.Thread(target=writer)
    t.start()
    old = BlockMap.load(a_map)
    results = []
    try:
        wait_until(lambda: written[0] >= 1, 60, "the first image written")
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline or len(results) < 10:
            r = remap(source, old, why="test")
            results.append(r)
            assert r.blockmap is not None or r.error
            old = r.blockmap or old
    finally:
        stop.set()
        t.join(120)
        assert not t.is_alive()
    try:
        assert not errors, errors
        assert written[0] >= 2
        final = remap(source, old, why="test")
        assert final.blockmap is not None and not final.warnings, final.line()
        for path, ranges in _expected_b(b, offset).items():
            assert final.blockmap.ranges_of(BmapObject("f", "/dev/sda1", path)) == ranges
    finally:
        running.stop()
        source.close()
    partial = [r for r in results if r.warnings or r.error]
    print(f"\n{len(results)} remaps during {written[0]} rewrites: {len(partial)} partial or "
          f"failed, e.g. {partial[0].line() if partial else '-'}")


CLIENT = """\
import os, sys, time
import nbd
b, err, name = sys.argv[1], sys.argv[2], sys.argv[3]
start, length, old_start, old_length = map(int, sys.argv[4:8])
h = nbd.NBD()
h.connect_uri(os.environ["nbd"])
h.pread(old_length, old_start)  # a file of A, before anything is written
with open(b, "rb") as f:
    off = 0
    while data := f.read(1 << 20):
        h.pwrite(data, off)
        off += len(data)
h.flush()
# Wait for diskwatch to say it remapped (its stderr goes to ERR), then read
# the new file: the trace must name it.
deadline = time.monotonic() + 60
while "remap (auto)" not in open(err).read():
    assert time.monotonic() < deadline, "no remap announced"
    time.sleep(0.05)
h.pread(length, start)
h.pread(old_length, old_start)  # the same bytes again: A's file is gone in B
h.shutdown()
"""


NEW_FILE = "/var/log/new-after-boot.log"
OLD_FILE = "/usr/share/a/old.txt"  # in A only


@pytest.fixture(scope="module")
def headless_remapped(disks, tmp_path_factory):
    """One headless session with --log and --record in which the client
    writes B over A, diskwatch remaps by itself, and the client then reads
    B's new log: (stderr, the --log trace, the recording, the read's range)."""
    a, a_map, b, offset = disks
    work = tmp_path_factory.mktemp("headless-remap")
    start, end = _expected_b(b, offset)[NEW_FILE][0]
    length = min(end - start, 65536)
    ((old_start, old_end), *_) = ext4_file_ranges(a, offset, [OLD_FILE])[OLD_FILE]
    client = work / "client.py"
    client.write_text(CLIENT)
    err = work / "stderr.txt"
    trace, record = work / "trace.log", work / "session.dwrec"
    command = (f"{sys.executable} {client} {b} {err} x {start} {length} {old_start} "
               f"{min(old_end - old_start, 4096)}")
    with open(err, "w") as errf:
        r = subprocess.run([DISKWATCH, str(a), "--snapshot", "--bmap", str(a_map), "--headless",
                            "--log", str(trace), "--record", str(record),
                            "--remap-after", "512K", "--run", command],
                           stdout=subprocess.PIPE, stderr=errf, text=True, timeout=120)
    stderr = err.read_text()
    assert r.returncode == 0, stderr[-2000:]
    return stderr, trace.read_text(), record, (start, length)


def test_headless_remap_is_announced_and_the_trace_names_the_new_file(headless_remapped):
    stderr, trace, record, _ = headless_remapped
    lines = [ln for ln in stderr.splitlines() if "remap (auto)" in ln]
    assert lines and re.match(r"diskwatch: remap \(auto\): \+\d+ objects, -\d+, \d+ changed",
                              lines[0]), stderr
    assert f"read f /dev/sda1 {NEW_FILE}" in trace
    # The recording keeps every map swapped in, at the request it named first.
    from diskwatch.recording.reader import open_recording
    rec = open_recording(str(record))
    assert rec.header.extra.get("remaps", 0) == len(rec.maps) == len(lines) >= 1
    assert all(m.why == "remap (auto)" for m in rec.maps)
    assert [m.at for m in rec.maps] == sorted(m.at for m in rec.maps)
    assert 0 < rec.maps[0].at < len(rec.columns())


def _replay(record, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([DISKWATCH, "replay", str(record), "--headless", *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_replay_of_a_remapped_session_names_what_the_live_trace_named(headless_remapped,
                                                                       disks):
    """The maps the live session remapped to are in the recording: the
    replay names each request with the map that named it live, so its trace
    is the live --log, byte for byte (times included), the new file at the
    same line. --bmap overrides them: then the new file is not named."""
    stderr, live, record, _ = headless_remapped
    _, a_map, _, _ = disks
    r = _replay(record)
    assert r.stdout == live
    # A's file read before the writes, its bytes read again after the remap:
    # the first map named the first read, the remapped one the second
    old_reads = [ln for ln in live.splitlines() if "] read " in ln and NEW_FILE not in ln]
    assert len(old_reads) == 2 and f"read f /dev/sda1 {OLD_FILE}  [" in old_reads[0]
    assert OLD_FILE not in old_reads[1], old_reads
    line = f"read f /dev/sda1 {NEW_FILE}  ["
    assert [i for i, ln in enumerate(r.stdout.splitlines()) if line in ln] == \
        [i for i, ln in enumerate(live.splitlines()) if line in ln] != []
    assert re.search(r"the (\d+ )?block maps? the live session swapped in \(remap \(auto\)\) "
                     r"names? its requests from \d+\.\d+ s on", r.stderr), r.stderr
    # --bmap: one map for every request (said), as before the maps were kept
    first_only = _replay(record, "--bmap", a_map)
    assert "names every request: the " in first_only.stderr
    assert line not in first_only.stdout and first_only.stdout != live
    assert first_only.stdout.count(f"read f /dev/sda1 {OLD_FILE}  [") == 2


def test_report_of_a_remapped_session_gives_the_new_file_its_bytes(headless_remapped, disks):
    import json
    _, _, record, (start, length) = headless_remapped
    _, a_map, _, _ = disks
    r = subprocess.run([DISKWATCH, "report", str(record), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (new,) = [o for o in doc["objects"] if o["name"] == f"f /dev/sda1 {NEW_FILE}"]
    assert new["reads"] == 1 and new["read_bytes"] == length  # the client's one read of it
    # B's files were written before the remap knew them: the last map names
    # those writes (late), and they are no longer the partition's
    assert new["write_bytes"] > 0 and doc["named_late"] >= new["write_bytes"]
    assert doc["maps"] and all(m["why"] == "remap (auto)" for m in doc["maps"])
    assert new["first_read_t"] >= doc["maps"][0]["t"]
    # with the first map alone the file is nowhere
    r = subprocess.run([DISKWATCH, "report", str(record), "--json", "--bmap", str(a_map)],
                       capture_output=True, text=True, timeout=120)
    doc = json.loads(r.stdout)
    assert not [o for o in doc["objects"] if NEW_FILE in o["name"]] and doc["maps"] == []


def test_a_recording_without_its_maps_replays_with_the_first_one(headless_remapped, disks,
                                                                 tmp_path):
    """What the recorder wrote before BMAP frames existed: the same frames
    without them (and META without the new count). It replays, named by
    the first map throughout, as a replay with --bmap of that map."""
    import struct
    import zlib

    from diskwatch.recording.format import FRAME, MAGIC
    _, _, record, _ = headless_remapped
    _, a_map, _, _ = disks
    data = record.read_bytes()
    out, pos = [MAGIC], len(MAGIC)
    while pos < len(data):
        kind, length, _ = FRAME.unpack_from(data, pos)
        payload = data[pos + FRAME.size:pos + FRAME.size + length]
        pos += FRAME.size + length
        if kind == b"BMAP":
            continue
        if kind == b"META":
            meta = json.loads(payload)
            meta.pop("maps", None)
            payload = json.dumps(meta).encode()
        out.append(struct.pack("<4sII", kind, len(payload), zlib.crc32(payload)) + payload)
    old = tmp_path / "old.dwrec"
    old.write_bytes(b"".join(out))
    r = _replay(old)
    assert "swapped in" not in r.stderr
    assert f"naming with the block map it was recorded with: {a_map}" in r.stderr
    assert r.stdout == _replay(record, "--bmap", a_map).stdout


def test_replaying_a_remapped_session_under_the_pilot_names_the_new_file(headless_remapped):
    """The UI's replay: the views follow the map in effect, and the top
    objects and trace show the file only the remapped map names."""
    import asyncio

    from diskwatch.recording.maps import maps_for
    from diskwatch.recording.player import replay_session
    from diskwatch.recording.reader import open_recording
    from diskwatch.replay import choose_map
    from diskwatch.ui.replay import ReplayApp
    from diskwatch.ui.trace import TraceView
    _, _, record, _ = headless_remapped
    rec = open_recording(str(record))
    said: list[str] = []
    maps = maps_for(rec, None, choose_map(rec, None, said.append), said.append)
    session = replay_session(rec, maps, speed=256)
    player = session.player
    seen = {}

    async def main():
        app = ReplayApp(session)
        async with app.run_test(size=(140, 40)) as pilot:
            await play_to_end(app, pilot, player, timeout=60)
            seen["reads"] = {str(o) for o, _ in app.stats.top("reads", 10_000)}
            seen["trace"] = "\n".join(app.query_one(TraceView).lines_text())
            seen["map"] = session.blockmap
            await pilot.press("q")
    asyncio.run(main())
    assert f"f /dev/sda1 {NEW_FILE}" in seen["reads"]
    assert NEW_FILE in seen["trace"]
    assert seen["map"] is maps.last() and seen["map"] is not maps.first


def test_remap_off_and_bad_threshold(disks, tmp_path):
    a, a_map, _, _ = disks
    r = subprocess.run([DISKWATCH, str(a), "--bmap", str(a_map), "--remap-after", "lots"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--remap-after: not a size: 'lots'" in r.stderr
    with pytest.raises(ValueError, match="remap mode"):
        Remapper(None, current=lambda: None, swap=print, say=print, mode="sometimes")


def test_the_m_key_remaps_under_the_ui(disks, tmp_path):
    """Pilot: "m Remap" in the footer; pressing m remaps in the background,
    the block-map panel says what changed, the trace names the new file."""
    import asyncio

    from textual.widgets import Footer

    from diskwatch.events import Message
    from diskwatch.ui.app import DiskwatchApp
    from diskwatch.ui.progress import BmapProgress
    from diskwatch.ui.trace import TraceView
    a, a_map, b, offset = disks
    source = Snapshot(FileSource(str(a)), tmpdir=str(tmp_path))
    bus = Bus()
    running = serve_in_thread({"": source}, bus)
    session = Session(bus=bus, size=source.size, description="a.img", uri=running.uri,
                      blockmap=BlockMap.load(a_map))

    def swap(result) -> None:
        session.blockmap = result.blockmap
    session.remapper = session.pump.add(Remapper(
        source, current=lambda: session.blockmap, swap=swap, mode="key", bus=bus,
        say=lambda text, level: bus.publish(Message(text, level=level))))
    path = "/var/log/new-after-boot.log"
    start, end = _expected_b(b, offset)[path][0]
    seen = {}

    async def until(pilot, app, condition, what):
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            app.pump()
            await pilot.pause(0.02)

    async def main():
        app = DiskwatchApp(session)
        async with app.run_test(size=(140, 40)) as pilot:
            await pilot.pause()
            seen["footer"] = [(k.key, k.description) for k in app.query_one(Footer).query(
                "FooterKey")]
            h = nbd.NBD()
            h.connect_uri(running.uri)
            _write_image(h, b)
            h.flush()
            app.pump()
            assert session.remapper.remaps == 0  # mode "key": writes alone do not remap
            await pilot.press("m")
            await until(pilot, app, lambda: session.remapper.remaps == 1, "the remap")
            panel = app.query_one(BmapProgress)
            seen["panel"] = str(panel.detail.render())
            h.pread(min(end - start, 65536), start)
            await until(pilot, app, lambda: any(
                path in ln for ln in app.query_one(TraceView).lines_text()), "the new file")
            h.shutdown()
            await pilot.press("q")

    try:
        asyncio.run(main())
    finally:
        running.stop()
        source.close()
    assert ("m", "Remap") in seen["footer"], seen["footer"]
    assert "remap (key): +" in seen["panel"] and path in seen["panel"], seen["panel"]


def test_the_m_key_remaps_every_disk_of_the_session(disks, tmp_path):
    """Several disks: m asks each disk's remapper (its own mapper process)
    for a remap, and each says its own line."""
    import asyncio

    from diskwatch.ui.app import DiskwatchApp
    a, a_map, _b, _offset = disks
    sources = [Snapshot(FileSource(str(a)), tmpdir=str(tmp_path)) for _ in range(2)]
    bus = Bus()
    running = serve_in_thread({"": sources[0], "sdb": sources[1]}, bus)
    session = Session(bus=bus, size=sources[0].size, description="a.img", uri=running.uri,
                      blockmap=BlockMap.load(a_map))
    session.set_disks([("", sources[0].size, "/dev/sda"), ("sdb", sources[1].size, "/dev/sdb")],
                      {"sdb": BlockMap.load(a_map)})
    said = []

    def remapper(source, export, disk, current):
        return session.pump.add(Remapper(
            source, current=current, swap=lambda result: None, mode="key", bus=bus,
            export=export, disk=disk,
            say=lambda text, level: said.append((disk, text))))
    session.remapper = remapper(sources[0], "", "/dev/sda", lambda: session.blockmap)
    session.disk_remappers.append(
        remapper(sources[1], "sdb", "/dev/sdb", lambda: session.maps.get("sdb")))
    notes = []

    async def main():
        app = DiskwatchApp(session)
        async with app.run_test(size=(140, 40)) as pilot:
            app.notify = lambda message, **kw: notes.append(message)
            await pilot.press("m")
            deadline = time.monotonic() + 30
            while len(said) < 2:
                assert time.monotonic() < deadline, f"timed out: {said}"
                app.pump()
                await pilot.pause(0.02)
            await pilot.press("q")

    try:
        asyncio.run(main())
    finally:
        for r in (session.remapper, *session.disk_remappers):
            r.close()
        running.stop()
        for s in sources:
            s.close()
    assert notes[0] == "remapping 2 of the 2 disks as they are now", notes
    assert sorted(d for d, _ in said) == ["/dev/sda", "/dev/sdb"], said
    assert all(text.startswith("remap (key): ") for _, text in said), said


def test_a_remap_that_cannot_read_the_disk_is_told_once_and_the_old_map_stays(disks):
    """A source that fails every read: the remap fails in one line, the old
    map stays; automatic remapping goes on (a disk caught mid-update may
    read the next time)."""
    from diskwatch.sources.base import Source

    class Unreadable(Source):
        size = DISK_SIZE

        def pread(self, offset: int, length: int) -> bytes:
            raise OSError(5, "Input/output error")
    _, a_map, _, _ = disks
    old = BlockMap.load(a_map)
    said, swapped = [], []
    remapper = Remapper(Unreadable(), current=lambda: old, swap=swapped.append,
                        say=lambda text, level: said.append((level, text)))
    assert remapper.request("auto") and remapper.wait(30)
    remapper.tick(time.monotonic())
    assert not swapped and remapper.remaps == 0
    assert len(said) == 1 and said[0][0] == "warning", said
    assert said[0][1].startswith("remap (auto) failed: ") and "the old map stays" in said[0][1]
    assert remapper.mode == "auto"
