"""Scans (issue 21, item 2): the detector on its own (``diskwatch/scans.py``)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_guest_e2e import churn_boot, churn_map  # noqa: F401 - the fixtures (session scope)

from diskwatch.bmap.index import BmapObject
from diskwatch.scans import SCAN_GAP, ScanTracker

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))


def f(path: str, device: str = "/dev/sda1") -> BmapObject:
    return BmapObject("f", device, path)


def tree(root: str, dirs: int, files: int) -> list[str]:
    return [f"{root}/d{d:02d}/f{k:03d}.bin" for d in range(dirs) for k in range(files)]


def test_a_sweep_over_a_tree_is_one_scan_with_its_root():
    t = ScanTracker()
    for i, path in enumerate(tree("/opt/app", 12, 30)):
        t.first_read(i * 0.01, f(path), 4096)
    (live,) = t.live()
    assert live.live and live.directory == "/opt/app" and live.files == 360
    t.tick(10.0)
    (scan,) = t.scans()
    assert (scan.directory, scan.files, scan.directories, scan.bytes) == \
        ("/opt/app", 360, 12, 360 * 4096)
    assert abs(scan.duration - 3.59) < 1e-9 and not scan.live


def test_a_depth_first_walk_that_returns_to_each_parent_is_still_a_scan():
    t = ScanTracker()
    n = 0
    for top in range(4):
        for k in range(5):
            t.first_read(n * 0.01, f(f"/srv/t{top}/a{k}"), 1)
            n += 1
        for sub in range(3):
            for k in range(5):
                t.first_read(n * 0.01, f(f"/srv/t{top}/s{sub}/b{k}"), 1)
                n += 1
            t.first_read(n * 0.01, f(f"/srv/t{top}/z{sub}"), 1)  # back in the parent
            n += 1
    t.tick(100)
    (scan,) = t.scans()
    assert scan.directory == "/srv" and scan.files == n


def test_a_boot_hopping_between_a_few_directories_is_no_scan():
    rng = random.Random(7)
    dirs = ["/usr/lib/x86_64-linux-gnu", "/etc", "/usr/bin", "/usr/lib/systemd"]
    t = ScanTracker()
    for i in range(400):
        t.first_read(i * 0.02, f(f"{rng.choice(dirs)}/file{i}"), 8192)
    t.tick(100)
    assert t.scans() == []


def test_a_pause_longer_than_the_gap_ends_a_run_and_small_runs_are_none():
    t = ScanTracker()
    for i, path in enumerate(tree("/data", 2, 15)):
        t.first_read(i * 0.1 + (0 if i < 15 else SCAN_GAP + 1), f(path), 1)
    t.tick(100)
    assert t.scans() == []  # two runs of 15 files in one directory each


def test_interleaved_reads_elsewhere_do_not_break_a_scan():
    t = ScanTracker()
    for i, path in enumerate(tree("/Program Files", 6, 10)):
        t.first_read(i * 0.05, f(path), 10)
        t.first_read(i * 0.05 + 0.01, f(f"/Windows/System32/dll{i}.dll"), 10)
    t.tick(100)
    (scan,) = t.scans()
    assert scan.directory == "/Program Files" and scan.files == 60


def test_runs_are_bounded_whatever_is_read():
    t = ScanTracker()
    for i in range(5000):
        t.first_read(float(i) * 0.001, f(f"/top{i}/x"), 1)
    assert len(t._runs) <= 256
    t.tick(1e9)
    assert t.scans() == []


# --- a real guest's scan, in the report ---------------------------------------------------

@pytest.mark.slow
def test_the_churn_guest_s_antivirus_scan_is_in_the_report(churn_guest_image,
                                                           churn_boot):  # noqa: F811
    """The churn guest's "antivirus" reads every file of a tree of 12
    directories, directory by directory, appending to its log after each:
    the recording's report lists the scan (the tree's root, >= 90% of its
    files) and the log's churn, and no other scan (the boot's reads are none)."""
    guest = churn_guest_image.guest
    r = subprocess.run([DISKWATCH, "report", str(churn_boot["recording"]), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    scans = report["scans"]
    assert [s["directory"] for s in scans] == [guest.scan_root], scans
    (scan,) = scans
    assert scan["device"] == "/dev/sda1" and scan["directories"] == 12
    assert scan["files"] >= 0.9 * len(guest.scan_files), scan
    assert scan["duration"] > 0 and scan["rate"] > 0 and scan["bytes"] > 0
    churned = {c["name"] for c in report["churn"]}
    assert "f /dev/sda1 /var/log/av/scan.log" in churned
    text = subprocess.run([DISKWATCH, "report", str(churn_boot["recording"])],
                          capture_output=True, text=True, timeout=120).stdout
    assert f"/dev/sda1 {guest.scan_root}" in text.split("Scans:", 1)[1].split("\n\n")[0]


# --- the same scan, live: the boot's recording replayed under the Pilot --------------------

@pytest.mark.slow
def test_the_churn_guest_s_scan_and_churn_are_shown_as_they_happen(
        churn_guest_image, churn_map, churn_boot):  # noqa: F811
    """Issue 21 items 1-3, live: the recording of the churn guest's boot
    played back under the real app (the cheapest real live feed: the same
    pump and sinks as live). While the antivirus reads its tree, the
    activity line under the views shows the scan going on (its directory,
    files so far); when it ends, its summary (>= 90% of the tree's files);
    its log, appended to after each directory, is flagged churning; a
    notification tells the scan's start and end; and the tree of the
    traffic holds the scanned tree, its subtree's reads summed."""
    import asyncio

    from diskwatch.bmap.index import BlockMap
    from diskwatch.recording.maps import maps_for
    from diskwatch.recording.player import replay_session
    from diskwatch.recording.reader import open_recording
    from diskwatch.ui.replay import ReplayApp

    guest = churn_guest_image.guest
    rec = open_recording(str(churn_boot["recording"]))
    maps = maps_for(rec, None, BlockMap.load(churn_map), lambda line: None)
    session = replay_session(rec, maps)
    player = session.player
    where = f"/dev/sda1 {guest.scan_root}"
    seen: dict = {"lines": [], "notes": []}

    async def main():
        app = ReplayApp(session)
        notify = app.notify

        def note(message, **kw):
            seen["notes"].append((kw.get("title"), message))
            notify(message, **kw)

        app.notify = note
        async with app.run_test(size=(80, 24)) as pilot:
            # Played 0.1 s of the recording at a time (the ] key's seek, by
            # steps), each step the views refreshed: what a person sees at
            # 10 Hz, whatever the load on this machine.
            player.pause()
            while player.now() < player.duration:
                app.seek_to(min(player.duration, player.now() + 0.1))
                seen["lines"] += [ln for ln in app.activity if ln not in seen["lines"]]
                await pilot.pause()
            assert player.finished
            seen["lines"] += [ln for ln in app.activity if ln not in seen["lines"]]
            seen["ended"] = app.activity_sink.ended_scans()
            await pilot.press("d")
            app._refresh_views(force=True)
            await pilot.pause()
            seen["tree"] = app.traffic.root.children["/dev/sda1"]
            await pilot.press("q")

    asyncio.run(main())
    n = len(guest.scan_files)
    scans = [ln for ln in seen["lines"] if ln.kind == "scan"]
    assert scans and all(ln.name == where for ln in scans), seen["lines"]
    files = [int(ln.detail.split()[0].replace(",", "")) for ln in scans]
    assert min(files) < 0.9 * n  # seen while it went on, not only at its end
    (ended,) = [s for s in seen["ended"] if s.directory == guest.scan_root]
    assert ended.files >= 0.9 * n and ended.directories == 12, ended
    assert any(ln.kind == "ended" and ln.name == where and
               ln.detail.startswith(f"{ended.files:,} files") for ln in seen["lines"])
    churning = {ln.name for ln in seen["lines"] if ln.kind == "churn"}
    assert "/var/log/av/scan.log" in churning, churning
    titles = [t for t, _ in seen["notes"] if t and t.startswith("scan")]
    assert titles[:1] == ["scan started"] and "scan ended" in titles, seen["notes"]
    node = seen["tree"]
    for part in guest.scan_root.strip("/").split("/"):
        node = node.children[part]
    assert node.reads >= ended.files and len(node.children) == 12
    print(f"\nlive scan lines: {len(scans)}, files seen going on: {sorted(set(files))[:5]}...; "
          f"ended: {ended.files} files, {ended.duration:.2f} s; churning: {sorted(churning)}")
