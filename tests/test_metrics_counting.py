"""How the metrics count: the bounded top-N series (diskwatch/sinks/metrics/topn.py)
-- a fixed number of series whatever the keys, the heavy keys found among many
light ones, every request counted once (members + other + retired) -- and the
sink's batch counting, checked against a plain request-by-request count."""

from __future__ import annotations

import random

from diskwatch.sinks.metrics.topn import WIDTH, TopSeries


def counts(reads: int = 0, writes: int = 0, size: int = 4096) -> list[int]:
    c = [0] * WIDTH
    c[0], c[1], c[4], c[5] = reads, writes, reads * size, writes * size
    return c


def add(top: TopSeries, batch: dict[str, list[int]]) -> None:
    """A batch of 4 KiB requests, key -> counts(reads, writes), as the sink
    hands them: one call per op, one key per request."""
    for op in (0, 1):
        keys = [k for k, c in batch.items() for _ in range(c[op])]
        if keys:
            top.add_requests(op, keys, [4096] * len(keys), 4096)


def totals(top: TopSeries) -> list[int]:
    out = list(top.other)
    for c in [*top.members.values(), top.retired]:
        out = [a + b for a, b in zip(out, c, strict=True)]
    return out


def test_heavy_keys_are_found_among_100000_light_ones_and_counting_is_exact():
    top = TopSeries(exposed=10, tracked=1024, refresh=1.0, half_life=60.0)
    rng = random.Random(7)
    heavy = [f"/var/log/churn{i}.log" for i in range(5)]
    light = [f"/data/f{i:06d}" for i in range(100_000)]
    stream = [(k, 0, 1) for k in heavy for _ in range(400)] + [(k, 1, 0) for k in light]
    rng.shuffle(stream)
    expected = [0] * WIDTH
    now = 0.0
    for start in range(0, len(stream), 2000):  # batches, as the pump hands them
        batch: dict[str, list[int]] = {}
        for key, r, w in stream[start:start + 2000]:
            c = batch.setdefault(key, [0] * WIDTH)
            for i, v in enumerate(counts(r, w)):
                c[i] += v
                expected[i] += v
        add(top, batch)
        assert len(top.sketch) <= 16 * top.tracked
        now += 0.1
        top.tick(now)
        assert len(top.members) <= top.exposed
    top.update_members()
    assert set(heavy) <= set(top.members), sorted(top.members)
    assert totals(top) == expected


def test_a_member_counts_exactly_what_it_gets_while_it_is_one():
    top = TopSeries(exposed=2, tracked=16, refresh=1.0)
    add(top, {"a": counts(writes=50), "b": counts(writes=20), "c": counts(reads=1)})
    top.tick(0.0)
    top.tick(1.0)  # membership decided: the two heaviest
    assert set(top.members) == {"a", "b"}
    add(top, {"a": counts(writes=7), "c": counts(reads=3)})
    assert top.members["a"][1] == 7 and top.members["a"][5] == 7 * 4096
    assert top.other[0] == 1 + 3  # c, before and after
    assert top.other[1] == 70  # a and b before they were members


def test_members_stay_while_near_the_top_and_leave_when_cold():
    top = TopSeries(exposed=2, tracked=64, refresh=1.0, half_life=1.0)
    add(top, {"a": counts(writes=100), "b": counts(writes=90), "c": counts(writes=80)})
    top.tick(0.0)
    top.tick(1.0)
    assert set(top.members) == {"a", "b"}
    # c overtakes b a little: b is still among the 2*2 heaviest, it stays
    add(top, {"c": counts(writes=30)})
    top.tick(2.0)
    assert set(top.members) == {"a", "b"}
    # a and b go quiet for long; new keys take over and the old ones retire
    for t in range(3, 40):
        add(top, {f"n{t % 4}": counts(writes=100)})
        top.tick(float(t))
    assert "a" not in top.members and "b" not in top.members
    assert top.retired[1] >= 0 and len(top.members) == 2


def test_a_heavy_key_takes_the_place_of_a_scan_s_files():
    """An antivirus reads 360 files once each, then churns 3 logs: the
    members (all taken by the scan's files, still near the top by count)
    give way to the logs at the next refresh."""
    top = TopSeries(exposed=20, tracked=1024, refresh=1.0, half_life=6.0)
    add(top, {f"/opt/av-test/f{i:03d}": counts(reads=1) for i in range(360)})
    top.tick(0.0)
    top.tick(1.0)
    assert len(top.members) == 20 and all(k.startswith("/opt") for k in top.members)
    logs = {f"/var/log/av/{n}.log" for n in ("scan", "events", "quarantine")}
    add(top, {log: counts(writes=30) for log in logs})
    top.tick(2.0)
    assert logs <= set(top.members) and len(top.members) == 20


def test_the_last_round_at_exit_changes_nothing():
    top = TopSeries(exposed=2, tracked=16, refresh=1.0)
    add(top, {"a": counts(writes=5)})
    top.tick(0.0)
    top.tick(1.0)
    before = dict(top.members)
    assert top.tick(float("inf")) is False
    assert top.members == before


# --- the sink's batch counting against a plain per-request count ----------------

def test_the_sink_counts_every_batch_exactly_as_request_by_request():
    """MetricsSink counts with C-level passes over a batch; a plain loop over
    requests and pieces (below) is the reference. Random batches mix
    commands, lengths, requests spanning several files and partitions,
    requests without a length, and bytes no object covers."""
    from diskwatch.bmap.format import BmapEntry
    from diskwatch.bmap.index import BlockMap
    from diskwatch.events import Command, make_request
    from diskwatch.sinks.metrics import MetricsSink

    rng = random.Random(13)
    entries = [BmapEntry(1, 0, 1 << 24, "v", "/dev/sda"),
               BmapEntry(1, 1 << 20, 9 << 20, "p", "/dev/sda1"),
               BmapEntry(1, 9 << 20, 15 << 20, "p", "/dev/sda2")]
    pos = 1 << 20
    for i in range(60):
        pos += rng.choice((0, 512, 8192))  # some gaps: the partition's own bytes
        size = rng.choice((4096, 10_000, 65536))
        top = rng.choice(("/var", "/usr", "/home"))
        path = f"{top}/f{i}" if i % 7 else f"/root-file{i}"
        entries.append(BmapEntry(1, pos, pos + size, "f", "/dev/sda1", path))
        pos += size
    entries.append(BmapEntry(1, 9 << 20, 10 << 20, "d", "/dev/sda2", "/data"))
    bm = BlockMap(entries)
    sink = MetricsSink({"": 16 << 20}, top=100, refresh=1.0)
    # every file and directory touched once, then made members: they count exactly
    warm = [make_request((1, "", 0, e.start, e.end - e.start, 0, 0.0, 1e-5, 0))
            for e in entries if e.type in "fd"]
    sink.feed(warm, [bm.lookup(r[3], r[4]) for r in warm])
    sink.tick(0.0)
    sink.tick(1.0)
    before = sink.snapshot()

    commands = [Command.READ] * 5 + [Command.WRITE] * 3 + [
        Command.TRIM, Command.WRITE_ZEROES, Command.FLUSH, Command.BLOCK_STATUS, Command.DISC]
    reqs = []
    for _ in range(3000):
        cmd = rng.choice(commands)
        length = 0 if cmd in (Command.FLUSH, Command.DISC) else rng.choice(
            (512, 4096, 4096, 4096, 65536, 300_000))
        offset = rng.randrange(0, (16 << 20) - 300_000, 512)
        reqs.append(make_request((1, "", int(cmd), offset, length, 0, 2.0,
                                  rng.choice((3e-6, 4e-5, 2e-3)), 0)))
    expected_parts: dict = {}
    expected_objs: dict = {}
    op_of = {Command.READ: 0, Command.WRITE: 1, Command.TRIM: 2, Command.WRITE_ZEROES: 3}
    for r in reqs:
        op = op_of.get(r.command)
        if op is None or not r.length:
            continue
        last_part = last_dir = None
        for start, end, obj in bm.lookup(r.offset, r.length):
            part = obj.device if obj is not None else "unmapped"
            c = expected_parts.setdefault(part, [0] * 8)
            if part != last_part:
                c[op] += 1
                last_part = part
            c[op + 4] += end - start
            if obj is not None and obj.type in "df":
                p = obj.path
                d = "/" + p.split("/")[1] if p.count("/") > 1 or obj.type == "d" else "/"
                c = expected_objs.setdefault(("dir", part, d), [0] * 8)
                if d != last_dir:
                    c[op] += 1
                    last_dir = d
                c[op + 4] += end - start
                if obj.type == "f":
                    c = expected_objs.setdefault(("file", part, p), [0] * 8)
                    c[op] += 1
                    c[op + 4] += end - start
    start = 0
    while start < len(reqs):  # batches of random sizes, as the pump hands them
        n = rng.choice((1, 7, 100, 800))
        batch = reqs[start:start + n]
        sink.feed(batch, [bm.lookup(r.offset, r.length) for r in batch])
        start += n
    after = sink.snapshot()

    def diff(a, b):
        return [x - y for x, y in zip(a, b, strict=True)]
    got_parts = {k: diff(v, before.partitions.get(k, [0] * 8))
                 for k, v in after.partitions.items()}
    assert {k: v for k, v in got_parts.items() if any(v)} == expected_parts
    got_objs = {}
    for kind, now, then in (("dir", after.directories, before.directories),
                            ("file", after.files, before.files)):
        for key, counts in now.items():
            part, name = key.split("\0")
            d = diff(counts, then.get(key, [0] * 8))
            if any(d):
                got_objs[(kind, part, name)] = d
    assert got_objs == expected_objs
    assert after.files_other == before.files_other  # all were members
    ex, bx = after.exports[""], before.exports[""]
    for cmd in Command:
        mine = [r for r in reqs if r.command == cmd]
        assert ex.ops[cmd] - bx.ops[cmd] == len(mine)
        assert ex.bytes[cmd] - bx.bytes[cmd] == sum(r.length for r in mine)
    read_buckets = diff(ex.buckets[0], bx.buckets[0])
    reads = [r for r in reqs if r.command == Command.READ]
    assert sum(read_buckets) == len(reads)
    assert read_buckets[2] == sum(1 for r in reads if 2.5e-5 < r.duration <= 5e-5)
