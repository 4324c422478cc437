"""Issue 21 items 1-3, the live sinks on their own: the tree of the traffic
(``sinks/tree.py``) and scans and churn as they happen
(``sinks/activity.py``), fed as the pump feeds them (a batch and its
pieces, looked up in a real block map)."""

from __future__ import annotations

import pytest

from diskwatch.bmap.format import BmapEntry
from diskwatch.bmap.index import BlockMap
from diskwatch.events import Command, make_request
from diskwatch.report.analysis import analyse
from diskwatch.report.inputs import Recording
from diskwatch.sinks import activity as activity_module
from diskwatch.sinks.activity import Activity
from diskwatch.sinks.tree import HALF_LIFE, TrafficTree

MiB = 1 << 20
R, W, FLUSH = int(Command.READ), int(Command.WRITE), int(Command.FLUSH)
SCAN_DIRS, SCAN_FILES = 12, 30


def blockmap() -> BlockMap:
    e = BmapEntry
    entries = [
        e(1, 0, 512 * MiB, "v", "/dev/sda"),
        e(1, MiB, 256 * MiB, "p", "/dev/sda1"),
        e(1, 256 * MiB, 512 * MiB, "p", "/dev/sdb1"),
        e(1, 2 * MiB, 2 * MiB + 4096, "d", "/dev/sda1", "/var/log"),
        e(1, 3 * MiB, 3 * MiB + 65536, "f", "/dev/sda1", "/var/log/scan.log"),
        e(1, 4 * MiB, 6 * MiB, "f", "/dev/sda1", "/bin/busybox"),
        e(1, 300 * MiB, 301 * MiB, "f", "/dev/sdb1", "/data/big.bin"),
    ]
    # the antivirus's tree: 12 directories of 30 files, 4 KiB each
    base = 10 * MiB
    for d in range(SCAN_DIRS):
        for k in range(SCAN_FILES):
            off = base + (d * SCAN_FILES + k) * 4096
            entries.append(e(1, off, off + 4096, "f", "/dev/sda1",
                             f"/opt/av-test/d{d:02d}/f{k:03d}"))
    return BlockMap(entries)


def req(t, cmd, offset, length):
    return make_request((1, "", cmd, offset, length, 0, t, 0.0001, 0))


def feed(sink, bm, requests, now=None):
    pieces = [bm.lookup(r.offset, r.length) for r in requests]
    sink.feed(requests, pieces)
    sink.tick(requests[-1].start if now is None else now)


def scan_requests(t0=1.0, step=0.01):
    return [req(t0 + i * step, R, 10 * MiB + i * 4096, 4096)
            for i in range(SCAN_DIRS * SCAN_FILES)]


def log_appends(t0=0.0, n=10, every=1.5):
    """A log appended ``n`` times, each a write, a write 5 ms later and a flush."""
    out = []
    for i in range(n):
        t = t0 + i * every
        out += [req(t, W, 3 * MiB + i * 512, 512), req(t + 0.005, W, 2 * MiB, 4096),
                req(t + 0.006, FLUSH, 0, 0)]
    return out


# --- the tree ---------------------------------------------------------------------------

def test_the_tree_sums_each_subtree_per_device():
    bm = blockmap()
    tree = TrafficTree()
    feed(tree, bm, [req(0.0, R, 4 * MiB, 2 * MiB), req(0.1, R, 300 * MiB, MiB),
                    req(0.2, W, 3 * MiB, 4096), req(0.3, W, 2 * MiB, 4096),
                    req(0.4, R, 200 * MiB, 4096)])  # the partition's own bytes
    sda1, sdb1 = (d for d in tree.devices() if d.name != "/dev/sda")
    assert (sda1.name, sdb1.name) == ("/dev/sda1", "/dev/sdb1")
    assert (sda1.reads, sda1.read_bytes, sda1.writes, sda1.write_bytes) == \
        (2, 2 * MiB + 4096, 2, 8192)
    var = sda1.children["var"]
    log = var.children["log"]
    assert (log.kind, log.writes, log.write_bytes) == ("d", 2, 8192)  # its own block and its file
    assert log.children["scan.log"].kind == "f"
    assert sdb1.children["data"].children["big.bin"].read_bytes == MiB
    kids, more = tree.children(sda1, "bytes", 10)
    assert [k.name for k in kids] == ["bin", "var"] and more == 0
    assert log.children["scan.log"].path() == ("/dev/sda1", "/var/log/scan.log")


def test_the_tree_sorts_by_recent_rate_bytes_or_requests():
    bm = blockmap()
    tree = TrafficTree()
    feed(tree, bm, [req(0.0, R, 4 * MiB, 2 * MiB)])       # busybox: much, long ago
    feed(tree, bm, [req(30.0 + i * 0.01, W, 3 * MiB, 512) for i in range(20)])  # the log: now
    sda1 = tree.root.children["/dev/sda1"]
    assert [k.name for k in tree.children(sda1, "bytes")[0]] == ["bin", "var"]
    assert [k.name for k in tree.children(sda1, "rate")[0]] == ["var", "bin"]
    assert [k.name for k in tree.children(sda1, "requests")[0]] == ["var", "bin"]
    var = sda1.children["var"]
    now = tree.now
    assert var.rate(now + HALF_LIFE) == pytest.approx(var.rate(now) / 2)


def test_the_tree_is_bounded_and_counts_the_rest_under_one_node():
    bm = blockmap()
    tree = TrafficTree(max_nodes=50)
    feed(tree, bm, scan_requests())
    assert tree.nodes <= 50
    sda1 = tree.root.children["/dev/sda1"]
    assert sda1.reads == SCAN_DIRS * SCAN_FILES  # nothing lost: past the bound, in "…"
    av = sda1.children["opt"].children["av-test"]
    kids, more = tree.children(av, "bytes", 2)
    assert len(kids) == 2 and more == len(av.children) + 1 - 2
    assert kids[0] is av.other  # all it holds is more than any one directory
    # a directory's "…" is counted in it too, as its other children are
    assert sum(c.reads for c in av.children.values()) + av.other.reads == \
        SCAN_DIRS * SCAN_FILES


def test_the_tree_folds_at_the_tick_not_per_request():
    bm = blockmap()
    tree = TrafficTree()
    requests = [req(0.0, R, 4 * MiB, 4096)] * 1000
    tree.feed(requests, [bm.lookup(r.offset, r.length) for r in requests])
    assert tree.nodes == 0  # counted per object, not yet in the tree
    tree.tick(0.1)
    assert tree.root.children["/dev/sda1"].children["bin"].reads == 1000


# --- scans and churn as they happen -----------------------------------------------------

def test_a_scan_is_told_when_it_starts_and_when_it_ends():
    bm = blockmap()
    act = Activity()
    reqs = scan_requests()
    feed(act, bm, reqs[:100])
    (live,) = act.live_scans()
    assert live.live and live.directory == "/opt/av-test" and live.files == 100
    assert [k for k, _ in act.news()] == ["started"]
    feed(act, bm, reqs[100:] + reqs[:50])  # files read again are no new files
    feed(act, bm, [req(20.0, R, 4 * MiB, 4096)])  # later, elsewhere: the scan is over
    ((kind, scan),) = act.news()
    assert kind == "ended" and scan.files == SCAN_DIRS * SCAN_FILES and scan.directories == 12
    assert act.live_scans() == [] and act.ended_scans() == [scan]


def test_live_churn_is_the_reports_churn():
    """The same requests: the live sink and the report find the same bursts,
    period and rate (one definition: diskwatch/churn.py)."""
    bm = blockmap()
    act = Activity()
    reqs = log_appends()
    for i in range(0, len(reqs), 4):  # in batches, as the pump feeds them
        feed(act, bm, reqs[i:i + 4])
    rows = {str(c.obj): c for c in act.churning(reqs[-1].start)}
    live = rows["f /dev/sda1 /var/log/scan.log"]
    report = {c.name: c for c in analyse(Recording(reqs, size=512 * MiB), bm).churn()}
    want = report["f /dev/sda1 /var/log/scan.log"]
    assert (live.bursts, live.writes) == (want.bursts, want.writes) == (10, 10)
    assert live.period == pytest.approx(want.period) == pytest.approx(1.5)
    assert live.per_minute == pytest.approx(want.per_minute) == pytest.approx(40)
    assert "d /dev/sda1 /var/log" in rows  # the directory is written in each burst too
    assert act.churn_of(live.obj) == live


def test_churn_now_forgets_files_idle_for_long_and_is_bounded(monkeypatch):
    bm = blockmap()
    act = Activity()
    feed(act, bm, log_appends())
    assert act.churning(14.0)
    assert act.churning(14.0 + activity_module.CHURN_IDLE + 1) == []
    monkeypatch.setattr(activity_module, "MAX_WRITTEN", 1)
    act = Activity()
    feed(act, bm, log_appends())
    assert len(act._written) == 1 and act.untracked > 0
