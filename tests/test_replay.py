"""diskwatch replay: a recording of a real session (diskwatch serving an image
to libnbd's Python client, two bursts of requests a second and a half apart)
played back headless gives the live trace again, names it with a map made
afterwards, and under the Pilot pauses, seeks and jumps to the next burst."""

from __future__ import annotations

import asyncio
import re

import pytest
from fixtures_server import IMAGE_SIZE, MiB, run_diskwatch
from pilot_helpers import play_to_end

from diskwatch.events import Command
from diskwatch.recording.reader import open_recording

pytest.importorskip("nbd", reason="Debian's python3-libnbd is needed (make setup)")

# Burst 1: reads of /etc/passwd and writes to the log; burst 2, after a pause
# longer than replay.BURST_GAP: reads of busybox. (The pause makes the gap
# the test is about; nothing waits on it.)
CLIENT = f"""
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(8):
    h.pread(4096, {MiB} + i * 4096)
for i in range(5):
    h.pwrite(b"x" * 512, {3 * MiB} + i * 8192)
h.flush()
time.sleep(1.5)
for i in range(16):
    h.pread(65536, {5 * MiB} + i * 65536)
h.shutdown()
"""
BMAP = f"""\
1 0 {IMAGE_SIZE:x} v /dev/sda
1 0 {16 * MiB:x} p /dev/sda1
1 {MiB:x} {MiB + 32768:x} f /dev/sda1 /etc/passwd
1 {3 * MiB:x} {4 * MiB:x} f /dev/sda1 /var/log/boot log.txt
1 {5 * MiB:x} {6 * MiB:x} f /dev/sda1 /bin/busybox
"""
BURST2 = 5 * MiB


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, server_image):
    """One live session, headless, with --log and --record (and no map: the
    map is made 'afterwards')."""
    import shutil
    d = tmp_path_factory.mktemp("replay")
    image = d / "disk.img"
    shutil.copyfile(server_image.path, image)
    (d / "client.py").write_text(CLIENT)
    (d / "disk.bmap").write_text(BMAP)
    p = run_diskwatch([image, "--headless", "--no-trace", "--log", d / "live.log",
                       "--record", d / "session.dwrec", "--run",
                       f'/usr/bin/python3 {d / "client.py"} "$uri"'])
    assert p.returncode == 0, p.stderr
    return d


def untimed(text: str) -> list[str]:
    """Trace lines without their time column."""
    return [re.sub(r"^\[\s*[0-9.]+\] ", "", ln) for ln in text.splitlines()]


def test_headless_replay_prints_the_live_trace(recorded):
    p = run_diskwatch(["replay", recorded / "session.dwrec", "--headless"])
    assert p.returncode == 0, p.stderr
    live = (recorded / "live.log").read_text()
    assert untimed(p.stdout) == untimed(live)
    assert "read 0x100000-0x108000 32 KiB in 8 requests" in p.stdout
    assert "requests on 1 connection" in p.stderr  # the same summary sink


def test_a_map_made_after_the_recording_names_it(recorded):
    p = run_diskwatch(["replay", recorded / "session.dwrec", "--headless",
                       "--bmap", recorded / "disk.bmap"])
    assert p.returncode == 0, p.stderr
    lines = untimed(p.stdout)
    assert "read f /dev/sda1 /etc/passwd  [0x100000-0x108000] 32 KiB in 8 requests" in lines
    assert any(ln.startswith("write f /dev/sda1 /var/log/boot log.txt  [") for ln in lines)
    assert "most reads: f /dev/sda1 /bin/busybox x16" in p.stderr
    # paced: --speed 8 plays the 1.5 s session in a fraction of it, same lines
    paced = run_diskwatch(["replay", recorded / "session.dwrec", "--headless", "--speed", "8",
                           "--bmap", recorded / "disk.bmap"])
    assert untimed(paced.stdout) == lines


def test_replay_refuses_what_is_not_a_recording(recorded):
    p = run_diskwatch(["replay", recorded / "live.log", "--headless"])
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"diskwatch: {recorded / 'live.log'} is not a diskwatch recording "
        "(made with diskwatch --record FILE)"]


def test_player_clock_pause_seek_and_bursts(recorded):
    from diskwatch.recording.player import Player
    now = [100.0]
    player = Player(open_recording(str(recorded / "session.dwrec")), clock=lambda: now[0])
    # the second burst starts with the first read at BURST2, after the pause
    # (a loaded machine may make more bursts: the client can stall too)
    burst2 = next(t for t, o in zip(player.times, player.columns.offset, strict=True)
                  if o == BURST2)
    assert burst2 in player.bursts and burst2 - player.bursts[0] > 1.0
    assert player.now() == 0.0
    now[0] += 0.25
    assert player.now() == 0.25
    player.pause()
    now[0] += 10
    assert player.now() == 0.25  # paused: the clock holds
    player.resume()
    player.set_speed(4)
    now[0] += 0.1
    assert player.now() == pytest.approx(0.65)
    # taking up to the first burst's end: the first burst only
    _, batch, _ = player.take(burst2 - 0.1)
    assert batch and all(r.offset < BURST2 for r in batch if r.command == Command.READ)
    assert not player.seek(burst2 - 0.1)  # forward (to what was taken): nothing to redo
    assert player.next_burst() == burst2
    assert not player.seek(burst2)  # forward: nothing to start over
    _, batch, _ = player.take(player.now())
    assert batch[0].offset == BURST2
    gen = player.generation
    assert player.seek(0.0) and player.generation == gen + 1  # back: start over
    _, batch, _ = player.take(player.duration)
    assert len(batch) == len(player)


def test_pilot_pause_seek_next_burst_faster(recorded):
    from diskwatch.bmap.index import BlockMap
    from diskwatch.events import Bus
    from diskwatch.pipeline.session import Pump, Session
    from diskwatch.recording.player import Player
    from diskwatch.ui.replay import ReplayApp
    from diskwatch.ui.timebar import TimeBar
    from diskwatch.ui.top import TopObjects
    from diskwatch.ui.trace import TraceView

    recording = open_recording(str(recorded / "session.dwrec"))
    player = Player(recording)
    session = Session(bus=Bus(), size=IMAGE_SIZE, description="replay", started=0.0,
                      blockmap=BlockMap.load(recorded / "disk.bmap"), pump=Pump(player),
                      player=player)
    session.pump.blockmap = lambda: session.blockmap
    burst2 = next(t for t, o in zip(player.times, player.columns.offset, strict=True)
                  if o == BURST2)
    before_burst2 = sum(1 for t in player.times if t < burst2)

    async def main():
        app = ReplayApp(session)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.press("space", "0")  # pause, back to the start
            assert player.paused and player.now() == 0.0
            await pilot.pause(0.3)
            assert player.now() == 0.0 and "||" in str(app.query_one(TimeBar).render())
            await pilot.press("n")  # the first burst
            assert player.now() == player.bursts[0]
            for _ in range(10):  # on to the second (a stalled client may make more)
                await pilot.press("n")
                if player.now() >= burst2:
                    break
            assert player.now() == burst2
            app.pump()
            assert app.stats.requests >= before_burst2 + 1
            text = "\n".join(app.query_one(TraceView).lines_text())
            assert "/etc/passwd" in text and "/bin/busybox" in text
            await pilot.press("left_square_bracket")  # back 10 s: to the start
            assert player.now() == 0.0 and app.stats.requests == 0
            assert app.query_one(TraceView).lines_text() == []
            bar = app.query_one(TimeBar)  # a click on the bar seeks there
            track = bar.size.width - bar._label_width - 1
            await pilot.click(TimeBar, offset=(bar._label_width + track // 2, 0))
            assert player.now() == pytest.approx(player.duration / 2, abs=player.duration / track)
            assert 0 < app.stats.requests < len(player)
            await pilot.press("plus", "plus")
            assert player.speed == 4
            await pilot.press("space")  # play on to the end
            await play_to_end(app, pilot, player, timeout=30)
            assert app.stats.requests == len(player)
            top = str(app.query_one(TopObjects).render())
            assert "/bin/busybox" in top and "/etc/passwd" in top
            await pilot.press("q")
        return app.return_code

    assert asyncio.run(main()) == 0
