"""SVG snapshots of the main views (pytest-textual-snapshot).

Deterministic: requests are published on the bus with fixed times and
durations, the app's clock is fixed, and the terminal size is given. Update
with ``pytest tests/test_ui_snapshots.py --snapshot-update`` after a
deliberate change, and look at the diff report before committing."""

from __future__ import annotations

import pytest

from diskwatch.bmap.index import BlockMap
from diskwatch.events import Bus, ConnectionEvent, Message, Progress, make_request
from diskwatch.pipeline.session import Session
from diskwatch.ui.app import DiskwatchApp

MiB = 1 << 20
SIZE = 256 * MiB
STARTED = 1000.0
NOW = 1012.25  # the fixed clock: 12 s into the session

BMAP = f"""\
1 0 {SIZE:x} v /dev/sda
1 {MiB:x} {200 * MiB:x} p /dev/sda1
1 {200 * MiB:x} {SIZE:x} p /dev/sda2
1 {2 * MiB:x} {2 * MiB + 4096:x} d /dev/sda1 /
1 {2 * MiB + 4096:x} {2 * MiB + 8192:x} d /dev/sda1 /etc
1 {3 * MiB:x} {3 * MiB + 4096:x} f /dev/sda1 /sbin/init
1 {3 * MiB + 4096:x} {3 * MiB + 12288:x} f /dev/sda1 /etc/passwd
1 {4 * MiB:x} {6 * MiB:x} f /dev/sda1 /bin/busybox
1 {20 * MiB:x} {52 * MiB:x} f /dev/sda1 /boot/vmlinuz-6.1.0-18-amd64
1 {90 * MiB:x} {91 * MiB:x} f /dev/sda1 /var/log/boot.log
1 {210 * MiB:x} {240 * MiB:x} f /dev/sda2 /Program Files (x86)/McAfee/Real Time/scan.dat
1 {241 * MiB:x} {242 * MiB:x} f /dev/sda2 /Program Files (x86)/McAfee/Real Time/log0.txt
"""


def req(cmd, offset, length, t, duration=0.00018):
    return make_request((1, "", cmd, offset, length, 0, STARTED + t, duration, 0))


def boot_like() -> list:
    """A boot-shaped workload: MBR, directories, init, busybox, the kernel
    read in 128 KiB pieces, a log written again and again, an AV scan."""
    r = [req(0, 0, 512, 0.01), req(0, 2 * MiB, 8192, 0.05), req(0, 3 * MiB, 12288, 0.2)]
    r += [req(0, 4 * MiB + i * 131072, 131072, 0.3 + i * 0.02) for i in range(16)]
    r += [req(0, 20 * MiB + i * 131072, 131072, 1.0 + i * 0.01, 0.0009) for i in range(200)]
    r += [req(1, 90 * MiB + i * 4096, 4096, 4.0 + i * 0.05, 0.0004) for i in range(60)]
    r += [req(3, 0, 0, 7.5, 0.002)]
    r += [req(0, 210 * MiB + i * 262144, 262144, 8.0 + i * 0.03, 0.0011) for i in range(100)]
    r += [req(1, 241 * MiB + (i % 8) * 4096, 4096, 11.0 + i * 0.01) for i in range(40)]
    r += [req(0, 150 * MiB, 65536, 12.0)]
    return r


def make_app(tmp_path, *, blockmap=True, command="qemu-system-x86_64 -accel tcg -drive file=$nbd",
             bmap=BMAP):
    path = tmp_path / "snap.bmap"
    path.write_text(bmap)
    bus = Bus()
    session = Session(
        bus=bus, size=SIZE, description="file guest.img", uri="nbd+unix:///?socket=/tmp/s",
        command=command, blockmap=BlockMap.load(path) if blockmap else None, started=STARTED,
    )
    return DiskwatchApp(session, clock=lambda: NOW), bus


def feed(app, bus, requests=None, events=()):
    async def run_before(pilot):
        bus.publish(ConnectionEvent(1, True, "unix"))
        bus.publish(Message("SeaBIOS (version 1.16.2-debian-1.16.2-1)", "stdout"))
        bus.publish(Message("Booting from Hard Disk...", "stdout"))
        bus.publish(Message("[    0.000000] Linux version 6.1.0-18-amd64", "stderr"))
        for e in events:
            bus.publish(e)
        bus.publish_requests(boot_like() if requests is None else requests)
        app.pump()
        # every view up to date now, not at the timer's next half second
        app._refresh_views(force=True)
        await pilot.pause()
        await pilot.pause()

    return run_before


def test_snapshot_main_large(snap_compare, tmp_path):
    app, bus = make_app(tmp_path)
    assert snap_compare(app, terminal_size=(140, 42), run_before=feed(app, bus))


def test_snapshot_top_objects_by_latency(snap_compare, tmp_path):
    """`s` twice: the top objects by the p99 of their requests, p50 beside
    (the boot's durations: the kernel's 0.9 ms reads, the scan's 1.1 ms)."""
    app, bus = make_app(tmp_path)
    assert snap_compare(app, terminal_size=(140, 42), press=["s", "s"], run_before=feed(app, bus))


def test_snapshot_main_80x24(snap_compare, tmp_path):
    app, bus = make_app(tmp_path)
    assert snap_compare(app, terminal_size=(80, 24), run_before=feed(app, bus))


def test_snapshot_files_only_top_by_writes(snap_compare, tmp_path):
    app, bus = make_app(tmp_path)
    assert snap_compare(app, terminal_size=(120, 36), press=["f", "s"],
                        run_before=feed(app, bus))


def test_snapshot_generating_a_map(snap_compare, tmp_path):
    app, bus = make_app(tmp_path, blockmap=False, command=None)
    events = [Progress("files", "f /dev/sda1 /usr/share/doc/busybox/README", 1234, 4321,
                       214.0, 5.8)]
    assert snap_compare(app, terminal_size=(100, 30),
                        run_before=feed(app, bus, boot_like()[:40], events))


def test_snapshot_command_exited(snap_compare, tmp_path):
    app, bus = make_app(tmp_path)
    events = [Message("reboot: Power down", "stdout"),
              Message("command exited with status 0", "exit", status=0)]
    app.notify = lambda *a, **k: None  # toasts time out: keep them out of the picture
    assert snap_compare(app, terminal_size=(100, 30), run_before=feed(app, bus, events=events))


@pytest.mark.parametrize("key", ["q", "question_mark"])
def test_snapshot_modals(snap_compare, tmp_path, key):
    app, bus = make_app(tmp_path)
    assert snap_compare(app, terminal_size=(100, 30), press=[key], run_before=feed(app, bus))


def test_snapshot_replay_paused_with_its_time_bar(snap_compare, tmp_path):
    """diskwatch replay: the boot-like workload recorded, played to 9 s, paused."""
    from diskwatch.pipeline.session import Pump
    from diskwatch.recording.format import RecordingHeader
    from diskwatch.recording.player import Player
    from diskwatch.recording.reader import open_recording
    from diskwatch.recording.writer import Recorder
    from diskwatch.ui.replay import ReplayApp

    path = tmp_path / "snap.bmap"
    path.write_text(BMAP)
    rec = Recorder(str(tmp_path / "boot.dwrec"), RecordingHeader(
        source="file guest.img", size=SIZE, started_monotonic=STARTED))
    rec.feed(boot_like(), None)
    rec.close()
    player = Player(open_recording(str(tmp_path / "boot.dwrec")), clock=lambda: 0.0)
    player.seek(9.0)
    player.pause()
    session = Session(bus=Bus(), size=SIZE, description="replay of file guest.img",
                      blockmap=BlockMap.load(path), started=0.0, pump=Pump(player),
                      player=player)
    session.pump.blockmap = lambda: session.blockmap
    app = ReplayApp(session)

    async def run_before(pilot):
        app.pump()
        app._refresh_views(force=True)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 36), run_before=run_before)


# --- issue 21: the tree of the traffic, scans and churn as they happen -------------------

#: an indexer's sweep: 3 directories of 20 files under /usr/share/doc
DOCS = [f"/usr/share/doc/pkg{d}/file{k:02d}" for d in range(3) for k in range(20)]
SCAN_BMAP = BMAP + "".join(
    f"1 {100 * MiB + i * 4096:x} {100 * MiB + (i + 1) * 4096:x} f /dev/sda1 {path}\n"
    for i, path in enumerate(DOCS))


def with_a_scan() -> list:
    """The boot, and the sweep going on at the fixed clock's time."""
    return boot_like() + [req(0, 100 * MiB + i * 4096, 4096, 11.0 + i * 0.015)
                          for i in range(len(DOCS))]


@pytest.mark.parametrize("size", [(80, 24), (140, 42)])
def test_snapshot_tree_of_the_traffic(snap_compare, tmp_path, size):
    """The d key: per partition, directories by recent rate, the busiest
    path opened (b); the scan going on and the churning log under it."""
    from diskwatch.ui.tree import TrafficScreen
    app, bus = make_app(tmp_path, bmap=SCAN_BMAP)
    app.notify = lambda *a, **k: None  # the scan's toast is the panel's line here
    fed = feed(app, bus, with_a_scan())

    async def run_before(pilot):
        await fed(pilot)
        await pilot.press("d")
        # b once the tree's screen is up (pressed at once, under load, it
        # reached the screen before it was mounted: the snapshot's flake)
        for _ in range(200):
            if isinstance(app.screen, TrafficScreen) and app.screen.is_mounted \
                    and getattr(app.screen, "tree_view", None) is not None:
                break
            await pilot.pause(0.01)
        await pilot.press("b")
        await pilot.pause()
        await pilot.pause()
    assert snap_compare(app, terminal_size=size, run_before=run_before)


def test_snapshot_main_with_a_scan_and_churn_80x24(snap_compare, tmp_path):
    app, bus = make_app(tmp_path, bmap=SCAN_BMAP)
    app.notify = lambda *a, **k: None
    assert snap_compare(app, terminal_size=(80, 24), run_before=feed(app, bus, with_a_scan()))
