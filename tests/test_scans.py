"""Scans (issue 21, item 2): the detector on its own (``diskwatch/scans.py``)."""

from __future__ import annotations

import random

from diskwatch.bmap.index import BmapObject
from diskwatch.scans import SCAN_GAP, ScanTracker


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
