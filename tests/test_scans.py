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
