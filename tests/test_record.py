"""--record: every request in an append-only file (diskwatch/recording/), read
back with open_recording; a recording cut by kill -9 reads back to the last
second flushed; a torn or foreign file gives one clear error."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import pytest
from fixtures_server import DISKWATCH, IMAGE_SIZE, SUBPROCESS_ENV, MiB, run_diskwatch

from diskwatch.bmap.index import BmapObject
from diskwatch.events import Command, ConnectionEvent, Message
from diskwatch.recording.format import MAGIC, RecordingError
from diskwatch.recording.reader import open_recording

nbd = pytest.importorskip("nbd", reason="Debian's python3-libnbd is needed (make setup)")

# What the client does, in order: (command, offset, length), the last past the end.
CLIENT = f"""
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)  # let the past-the-end read reach the server
h.connect_uri(sys.argv[1])
h.pread(4096, 8192)
h.pread(512, {MiB} + 512)
h.flush()
try:
    h.pread(4096, {IMAGE_SIZE})
except nbd.Error:
    pass
h.shutdown()
"""
BMAP = f"1 0 {IMAGE_SIZE:x} v /dev/sda\n1 100000 200000 f /dev/sda1 /etc/passwd\n"


def test_recording_holds_every_request_and_the_header(server_image, tmp_path):
    rec = tmp_path / "session.dwrec"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    bmap = tmp_path / "disk.bmap"
    bmap.write_text(BMAP)
    before = time.time()
    p = run_diskwatch([server_image.path, "--headless", "--no-trace", "--bmap", bmap,
                       "--record", rec, "--run", f'/usr/bin/python3 {script} "$uri"'])
    after = time.time()
    assert p.returncode == 0, p.stderr
    r = open_recording(str(rec))
    h = r.header
    assert r.complete and not r.truncated
    assert h.size == IMAGE_SIZE and str(server_image.path) in h.source
    assert h.diskwatch and h.exports == [""] and "client.py" in h.command
    assert before <= h.started_wall <= after and h.ended_wall >= h.started_wall
    assert h.bmap["sha256"] == hashlib.sha256(bmap.read_bytes()).hexdigest()
    requests = list(r.requests())
    assert h.requests == len(requests) and h.dropped == 0
    done = [(q.command, q.offset, q.length) for q in requests
            if q.command != Command.BLOCK_STATUS]
    assert done == [(Command.READ, 8192, 4096), (Command.READ, MiB + 512, 512),
                    (Command.FLUSH, 0, 0), (Command.READ, IMAGE_SIZE, 4096),
                    (Command.DISC, 0, 0)]
    assert [bool(q.error) for q in requests if q.command == Command.READ] == [
        False, False, True]
    assert {q.conn for q in requests} == {1} and {q.export for q in requests} == {""}
    starts = [q.start for q in requests]
    assert starts == sorted(starts) and 0 < starts[0] < after - before
    assert all(0 <= q.duration < 5 for q in requests)
    events = list(r.events())
    conns = [e for _, e in events if isinstance(e, ConnectionEvent)]
    assert [(c.conn, c.opened) for c in conns] == [(1, True), (1, False)]
    assert conns[1].requests == len(requests)
    assert any(isinstance(e, Message) and e.status == 0 for _, e in events)
    # the columns, for reports: the same requests
    cols = r.columns()
    assert len(cols) == len(requests) and cols.offset.tolist()[0] == requests[0].offset


LOOP_CLIENT = """
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(200):  # phase A: offsets 0, 4K, 8K, ...
    h.pread(4096, i * 4096)
print("A", flush=True)
sys.stdin.readline()  # the test says when phase A is on disk
i = 0
while True:  # phase B: until we are killed
    h.pread(512, (1 << 24) + (i % 1000) * 512)
    i += 1
"""


def test_kill_9_reads_back_to_the_last_flushed_second(server_image, tmp_path):
    import subprocess
    rec = tmp_path / "killed.dwrec"
    sock = tmp_path / "dw.sock"
    dw = subprocess.Popen([DISKWATCH, server_image.path, "-r", "-U", sock, "--headless",
                           "--no-trace", "--record", rec], env=SUBPROCESS_ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          start_new_session=True)
    client = None
    try:
        assert "serving" in dw.stderr.readline().decode()
        script = tmp_path / "loop.py"
        script.write_text(LOOP_CLIENT)
        client = subprocess.Popen(["/usr/bin/python3", str(script), f"nbd+unix:///?socket={sock}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert client.stdout.readline() == b"A\n"
        # Phase A reaches the file within about a second, while diskwatch runs.
        deadline = time.monotonic() + 20
        while True:
            reads = [q.offset for q in open_recording(str(rec)).requests()
                     if q.command == Command.READ]
            if len(reads) >= 200:
                break
            assert time.monotonic() < deadline, f"phase A not flushed: {len(reads)} reads"
            time.sleep(0.05)
        size_a = os.path.getsize(rec)
        client.stdin.write(b"go\n")
        client.stdin.flush()
        # Phase B runs past a flush, then kill -9 in the middle of it.
        deadline = time.monotonic() + 20
        while os.path.getsize(rec) == size_a:
            assert time.monotonic() < deadline, "phase B was not flushed"
            time.sleep(0.05)
        os.killpg(dw.pid, signal.SIGKILL)
        dw.wait(10)
    finally:
        if client is not None:
            client.kill()
            client.wait()
        if dw.poll() is None:
            os.killpg(dw.pid, signal.SIGKILL)
            dw.wait()
        dw.stderr.close()
    r = open_recording(str(rec))
    assert not r.complete  # no closing META: it was cut short
    reads = [q.offset for q in r.requests() if q.command == Command.READ]
    assert reads[:200] == [i * 4096 for i in range(200)]
    assert len(reads) > 200  # and phase B up to the last flush
    assert all(o >= 1 << 24 for o in reads[200:])


def test_a_torn_or_foreign_file(server_image, tmp_path):
    rec = tmp_path / "whole.dwrec"
    p = run_diskwatch([server_image.path, "-r", "--headless", "--no-trace", "--record", rec,
                       "--run", f'nbdcopy "$uri" {tmp_path / "copy.img"}'])
    assert p.returncode == 0, p.stderr
    whole = rec.read_bytes()
    everything = list(open_recording(str(rec)).requests())
    assert len(everything) > 10
    # Cut anywhere: what is whole before the cut reads back, the rest is
    # dropped (a cut between two frames leaves none torn: not "truncated").
    ends = {offset + length for _, offset, length in open_recording(str(rec))._frames}
    for cut in (len(whole) - 1, len(whole) - 20, len(whole) // 2):
        part = tmp_path / f"cut{cut}.dwrec"
        part.write_bytes(whole[:cut])
        r = open_recording(str(part))
        assert r.truncated == (cut not in ends) and not r.complete
        got = list(r.requests())
        assert got == everything[:len(got)]
    # A flipped byte in the last frame: its CRC stops the reading there.
    bad = bytearray(whole)
    bad[-3] ^= 0xFF
    (tmp_path / "bad.dwrec").write_bytes(bad)
    assert open_recording(str(tmp_path / "bad.dwrec")).truncated
    (tmp_path / "text.log").write_text("read 0x0-0x1000\n")
    with pytest.raises(RecordingError, match="not a diskwatch recording"):
        open_recording(str(tmp_path / "text.log"))
    (tmp_path / "magic.dwrec").write_bytes(MAGIC)
    with pytest.raises(RecordingError, match="no header"):
        open_recording(str(tmp_path / "magic.dwrec"))


def test_reopen_after_logrotate_starts_a_recording_of_its_own(tmp_path):
    """SIGHUP (diskwatch as a service) reopens --record: the moved file keeps
    what came before, the new one starts with the header."""
    from diskwatch.events import make_request
    from diskwatch.recording.format import RecordingHeader
    from diskwatch.recording.writer import Recorder

    path = tmp_path / "svc.dwrec"
    rec = Recorder(str(path), RecordingHeader(source="file x", size=1 << 20,
                                              started_monotonic=100.0))

    def reads(offsets):
        return [make_request((1, "", 0, o, 512, 0, 100.5, 1e-5, 0)) for o in offsets]
    rec.feed(reads([0, 512]), None)
    rec.flush()
    os.rename(path, tmp_path / "svc.dwrec.1")
    rec.feed(reads([1024]), None)
    rec.reopen()
    rec.feed(reads([4096]), None)
    rec.close()
    old = open_recording(str(tmp_path / "svc.dwrec.1"))
    new = open_recording(str(path))
    assert [q.offset for q in old.requests()] == [0, 512, 1024] and not old.complete
    assert [q.offset for q in new.requests()] == [4096] and new.complete
    assert new.header.source == "file x" and new.header.requests == 4
    assert next(new.requests()).start == 0.5


def test_a_full_disk_mid_session_stops_the_recording_and_says_so(tmp_path):
    """The writer thread's write fails (ENOSPC: /dev/full put under its file
    descriptor): no thread traceback, the person is told once on the bus,
    what could not be written is counted as dropped, and close() is quiet."""
    import threading

    from diskwatch.events import Bus, make_request
    from diskwatch.recording.format import RecordingHeader
    from diskwatch.recording.writer import Recorder

    crashed: list = []
    old_hook, threading.excepthook = threading.excepthook, crashed.append
    try:
        bus = Bus()
        told: list = []
        bus.on_event(told.append)
        rec = Recorder(str(tmp_path / "full.dwrec"),
                       RecordingHeader(source="file x", size=1 << 20), interval=0.02)
        rec.attach(bus)
        reads = [make_request((1, "", 0, o * 512, 512, 0, 0.5, 1e-5, 0)) for o in range(100)]
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, rec._fd)
        os.close(full)
        rec.feed(reads, None)
        deadline = time.monotonic() + 20
        while rec.error is None:
            assert time.monotonic() < deadline, "the writer never tried to write"
            time.sleep(0.02)
        rec.feed(reads[:10], None)  # after the failure: counted, not kept
        rec.add_map(object(), "remap (auto)")  # nor a map (a map can be big)
        assert not rec._maps and rec._current_map is None
        rec.close()
    finally:
        threading.excepthook = old_hook
    assert not crashed
    assert rec.error == os.strerror(28)  # ENOSPC
    assert rec.dropped == 110 and rec.requests == 0
    assert [m.text for m in told if isinstance(m, Message)] == [
        f"recording to {tmp_path / 'full.dwrec'} stopped: {os.strerror(28)}"]


def test_choose_map_for_replay_and_report(tmp_path):
    """One rule, for replay and report alike: the map given (told if it is
    not the recorded one), else the recorded one if unchanged (told), else
    none (told why); an unreadable recorded path is 'gone', not an error."""
    from diskwatch.recording.format import map_identity
    from diskwatch.recording.maps import choose_map
    made = tmp_path / "made.bmap"
    made.write_text("1 0 200 v /dev/sda\n")
    other = tmp_path / "other.bmap"
    other.write_text("1 0 400 v /dev/sda\n")
    recorded = map_identity(str(made))
    said: list[str] = []
    assert choose_map(str(made), recorded, said.append) == str(made) and said == []
    assert choose_map(str(other), recorded, said.append) == str(other)
    assert said.pop() == (f"{other} is not the block map the recording was made with "
                          "(another SHA-256, made since?): names may not match")
    assert choose_map(None, recorded, said.append) == str(made)
    assert said.pop() == f"naming with the block map it was recorded with: {made}"
    made.write_text("1 0 300 v /dev/sda\n")  # changed since
    assert choose_map(None, recorded, said.append) is None
    assert said.pop().startswith(f"recorded with the map {made}, which is gone or changed")
    assert choose_map(None, {"path": str(tmp_path), "sha256": "x"}, said.append) is None
    assert "gone or changed" in said.pop()
    assert choose_map(None, None, said.append) is None and said == []


def _reads(offsets, t=100.5):
    from diskwatch.events import make_request
    return [make_request((1, "", 0, o, 512, 0, t, 1e-5, 0)) for o in offsets]


def test_maps_swapped_in_are_kept_as_they_were_in_memory(tmp_path):
    """A map swapped in is written in its own order (which decides between
    equal ranges: two hard links of one file) and loads back into the same
    segments; an object the format cannot carry is left out and counted;
    the frame's text is itself a block map; the schedule names each request
    with the map in effect for it."""
    from diskwatch.bmap.format import BmapEntry, parse_bmap
    from diskwatch.bmap.index import BlockMap
    from diskwatch.recording.format import RecordingHeader, map_lines
    from diskwatch.recording.maps import MapSchedule, maps_for
    from diskwatch.recording.writer import Recorder

    first = BlockMap(parse_bmap(["1 0 100000 p /dev/sda1"]))
    second = BlockMap([BmapEntry(1, 0, 0x100000, "p", "/dev/sda1"),
                       BmapEntry(1, 0x1000, 0x2000, "f", "/dev/sda1", "/z link"),
                       BmapEntry(1, 0x1000, 0x2000, "f", "/dev/sda1", "/a link"),
                       BmapEntry(1, 0x3000, 0x4000, "f", "/dev/sda1", "/bad\nname")])
    third = BlockMap(parse_bmap(["1 0 100000 p /dev/sda2"]))
    skipped = [0]
    assert len(list(map_lines(second, skipped))) == 3 and skipped == [1]
    path = tmp_path / "maps.dwrec"
    rec = Recorder(str(path), RecordingHeader(source="file x", size=1 << 20,
                                              started_monotonic=time.monotonic()))
    rec.feed(_reads([0x1000, 0x1000]), None)
    rec.add_map(second, "remap (auto)")
    rec.feed(_reads([0x1000]), None)
    rec.flush()
    rec.add_map(third, "reload", path="/x.bmap", sha256="0" * 64)
    rec.feed(_reads([0x1000]), None)
    rec.close()
    r = open_recording(str(path))
    assert [(m.at, m.why, m.entries, m.path) for m in r.maps] == [
        (2, "remap (auto)", 4, None), (3, "reload", 1, "/x.bmap")]
    assert 0 <= r.maps[0].t <= r.maps[1].t < 60
    loaded = r.load_map(r.maps[0])
    assert loaded.lookup(0x1000, 16) == second.lookup(0x1000, 16) == [
        (0x1000, 0x1010, BmapObject("f", "/dev/sda1", "/a link"))]  # the later one wins
    assert [e for e in loaded.entries()] == [e for e in second.entries()
                                             if e[2].path != "/bad\nname"]
    said: list[str] = []
    schedule = maps_for(r, None, first, said.append)
    assert said == ["the 2 block maps the live session swapped in (reload, remap (auto)) name "
                    f"its requests from {r.maps[0].t:.3f} s on, as live"]
    names = [str(m.first(0x1000, 1)) for lo, hi, m in schedule.segments(0, 4)
             for _ in range(lo, hi)]
    assert names == ["p /dev/sda1", "p /dev/sda1", "f /dev/sda1 /a link", "p /dev/sda2"]
    assert [(lo, hi) for lo, hi, _ in schedule.segments(1, 3)] == [(1, 2), (2, 3)]
    assert maps_for(r, "given.bmap", first, said.append).recorded == []
    assert said[-1] == ("given.bmap names every request: the 2 block maps the live session "
                        "swapped in (kept in the recording) are not used")
    assert maps_for(r, None, None, said.append).first is not None  # an empty map first
    assert MapSchedule(first).last() is first
    # the frame's text: a map file of its own (its first line a comment)
    import zstandard
    data = path.read_bytes()
    kind, offset, length = r.maps[0].frame
    text = zstandard.ZstdDecompressor().decompress(data[offset:offset + length],
                                                   max_output_size=1 << 20)
    assert text.startswith(b"# diskwatch-recorded-map {") and text.endswith(
        b"1 1000 2000 f /dev/sda1 /a link\n")
    assert BlockMap(parse_bmap(text.splitlines(keepends=True))).entries() == loaded.entries()


def test_a_reopened_recording_starts_with_the_map_in_use(tmp_path):
    """logrotate moved the file after a remap: the new file is a recording
    of its own, so its first requests are named by the remapped map (a
    BMAP frame at its request 0), not by the header's first map."""
    from diskwatch.bmap.format import parse_bmap
    from diskwatch.bmap.index import BlockMap
    from diskwatch.recording.format import RecordingHeader
    from diskwatch.recording.writer import Recorder

    remapped = BlockMap(parse_bmap(["1 0 2000 f /dev/sda1 /new"]))
    path = tmp_path / "svc.dwrec"
    rec = Recorder(str(path), RecordingHeader(source="file x", size=1 << 20,
                                              started_monotonic=100.0))
    rec.feed(_reads([0, 512]), None)
    rec.add_map(remapped, "remap (auto)")
    rec.feed(_reads([1024]), None)
    rec.flush()
    os.rename(path, tmp_path / "svc.dwrec.1")
    rec.feed(_reads([1536]), None)
    rec.reopen()
    rec.feed(_reads([4096]), None)
    rec.close()
    old, new = open_recording(str(tmp_path / "svc.dwrec.1")), open_recording(str(path))
    assert [m.at for m in old.maps] == [2] and len(old.columns()) == 4
    assert [m.at for m in new.maps] == [0] and [q.offset for q in new.requests()] == [4096]
    assert new.load_map(new.maps[0]).entries() == remapped.entries()


def test_a_damaged_recorded_map_is_one_line(tmp_path):
    import struct
    import zlib

    import zstandard
    path = tmp_path / "bad.dwrec"
    head = b'{"format":1,"size":1024}'
    bad = zstandard.ZstdCompressor().compress(b"# diskwatch-recorded-map {\"at\": -1}\n")
    path.write_bytes(MAGIC + b"".join(struct.pack("<4sII", k, len(p), zlib.crc32(p)) + p
                                      for k, p in ((b"HEAD", head), (b"BMAP", bad))))
    with pytest.raises(RecordingError) as e:
        open_recording(str(path))
    assert str(e.value) == (f"{path}: a recorded block map is damaged (a bad request index "
                            "or time)")


def test_a_journal_map_recorded_before_a_map_at_one_request_is_replayed_before_it(tmp_path):
    """Two remaps between the same two requests: the first swapped nothing
    in (its journal map alone is kept), the second swapped a map in and kept
    its journal map after it. Live handed them on in that order (the first's
    journal line, then what the swap named late, then the second's journal
    line); the replay does the same (it used to hand both journal maps on
    after the swap)."""
    from diskwatch.bmap.format import parse_bmap
    from diskwatch.bmap.index import BlockMap
    from diskwatch.recording.format import RecordingHeader
    from diskwatch.recording.maps import maps_for
    from diskwatch.recording.player import Player
    from diskwatch.recording.writer import Recorder

    first = BlockMap(parse_bmap(["1 0 100000 p /dev/sda1"]))
    second = BlockMap(parse_bmap(["1 0 100000 p /dev/sda2"]))
    journal_a = BlockMap(parse_bmap(["1 0 1000 f /dev/sda1 /a"]))
    journal_b = BlockMap(parse_bmap(["1 0 1000 f /dev/sda1 /b"]))
    path = tmp_path / "order.dwrec"
    rec = Recorder(str(path), RecordingHeader(source="file x", size=1 << 20,
                                              started_monotonic=time.monotonic()))
    rec.feed(_reads([0x1000, 0x1000]), None)
    rec.add_journal_map(journal_a)
    rec.add_map(second, "remap (auto)")
    rec.add_journal_map(journal_b)
    rec.feed(_reads([0x1000, 0x1000]), None)
    rec.close()
    r = open_recording(str(path))
    order: list[str] = []
    player = Player(r, clock=lambda: 1e9, maps=maps_for(r, None, first, lambda text: None),
                    on_map=lambda m: order.append(f"map {m.first(0, 1)}"),
                    on_journal=lambda m: order.append(f"journal {m.first(0, 1)}"))
    while not player.finished:
        _, batch, _ = player.take(1e9)
        if batch:
            player.look_up(batch)
    assert order == ["journal f /dev/sda1 /a", "map p /dev/sda2", "journal f /dev/sda1 /b"]
