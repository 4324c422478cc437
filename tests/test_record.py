"""--record: every request in an append-only file (diskwatch/record.py), read
back with open_recording; a recording cut by kill -9 reads back to the last
second flushed; a torn or foreign file gives one clear error."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import pytest
from fixtures_server import DISKWATCH, IMAGE_SIZE, SUBPROCESS_ENV, MiB, run_diskwatch

from diskwatch.events import Command, ConnectionEvent, Message
from diskwatch.record import MAGIC, RecordingError, open_recording

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
    # Cut anywhere: what is whole before the cut reads back, the rest is dropped.
    for cut in (len(whole) - 1, len(whole) - 20, len(whole) // 2):
        part = tmp_path / f"cut{cut}.dwrec"
        part.write_bytes(whole[:cut])
        r = open_recording(str(part))
        assert r.truncated and not r.complete
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
    from diskwatch.record import Recorder, RecordingHeader

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
    from diskwatch.record import Recorder, RecordingHeader

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
    from diskwatch.record import choose_map, map_identity
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
