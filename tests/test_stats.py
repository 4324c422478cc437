"""stats.py: the aggregates the UI and headless mode share."""

from __future__ import annotations

import threading

import pytest

from diskwatch.bmap.index import BlockMap
from diskwatch.events import Bus, Command, ConnectionEvent, Message, make_request
from diskwatch.sinks.stats import (
    Heat,
    LatencyHistogram,
    RateSeries,
    Stats,
)

MiB = 1 << 20


def req(cmd, offset, length, start=100.0, duration=0.001, error=0, conn=1):
    return make_request((conn, "", int(cmd), offset, length, 0, start, duration, error))


@pytest.fixture
def blockmap(tmp_path):
    path = tmp_path / "small.bmap"
    path.write_text(
        f"1 0 {64 * MiB:x} v /dev/sda\n"
        f"1 {MiB:x} {32 * MiB:x} p /dev/sda1\n"
        f"1 {2 * MiB:x} {2 * MiB + 4096:x} d /dev/sda1 /etc\n"
        f"1 {3 * MiB:x} {3 * MiB + 8192:x} f /dev/sda1 /etc/passwd\n"
        f"1 {3 * MiB + 8192:x} {3 * MiB + 12288:x} f /dev/sda1 /etc/group\n"
        f"1 {4 * MiB:x} {5 * MiB:x} f /dev/sda1 /var/log/boot log.txt\n"
    )
    return BlockMap.load(path)


def test_latency_histogram_quantiles_within_a_bucket():
    h = LatencyHistogram()
    assert h.median is None and h.p99 is None
    for _ in range(98):
        h.add(100e-6)
    h.add(5e-3)
    h.add(5e-3)
    assert h.total == 100
    assert 100e-6 / 1.2 < h.median < 100e-6 * 1.2
    assert 5e-3 / 1.2 < h.p99 < 5e-3 * 1.2
    h.add(0.0)  # under a microsecond lands in the first bucket
    h.add(1e9)  # absurdly long lands in the last
    assert h.counts[0] == 1 and h.counts[-1] == 1


def test_rate_series_keeps_the_last_minute():
    s = RateSeries(60)
    for _ in range(10):
        s.add(1000.5, False, 4096)
    s.add(1001.2, True, 512)
    s.add(1001.3, True, 512)
    reads = s.series(1001.9, "read_ops")
    assert len(reads) == 60 and reads[-2:] == [10, 0]
    assert s.series(1001.9, "write_bytes")[-1] == 1024
    # rate averages the two complete seconds before now
    assert s.rate(1002.0) == (5.0, 1.0, 20480.0, 512.0)
    # a minute later the slots are stale and read as zero, without any cleanup
    assert sum(s.series(1061.9, "read_ops")) == 0
    s.add(1060.0, False, 1)  # same slot as 1000: reset, not added to
    assert s.at(1060) == (1, 0, 1, 0) and s.at(1000) == (0, 0, 0, 0)


def test_heat_cells_decay_and_resize():
    h = Heat(100 * MiB, cells=100)
    assert h.cell_size == MiB and h.cells == 100
    h.add(5 * MiB + 10, 2 * MiB, is_write=False)  # cells 5, 6, 7
    h.add(99 * MiB, 4096, is_write=True)
    assert [i for i, v in enumerate(h.reads) if v] == [5, 6, 7]
    assert h.writes[99] == 1.0 and h.ever_written[99]
    assert h.cell_range(99) == (99 * MiB, 100 * MiB)
    h.decay(h.half_life)
    assert h.reads[5] == pytest.approx(0.5)
    h.decay(100)
    assert h.reads[5] == 0.0 and h.ever_read[5]  # faded, but remembered
    h.add(50 * MiB, 1, is_write=False)
    h.resize(10)  # carried over to the coarser grid
    assert h.cell_size == 10 * MiB and h.reads[5] == 1.0 and h.ever_read[0] and h.ever_written[9]
    h.resize(100)  # and to a finer one: every new cell under a hot old one is hot
    assert [i for i, v in enumerate(h.reads) if v] == list(range(50, 60))
    h.add(200 * MiB, 4096, is_write=False)  # past the end: ignored
    h.clear()
    assert not any(h.reads) and not any(h.ever_read) and h.cells == 100


def test_stats_counts_and_attributes(blockmap):
    st = Stats(64 * MiB)
    batch = [
        req(Command.READ, 3 * MiB, 8192),  # /etc/passwd
        req(Command.READ, 3 * MiB, 12288),  # passwd + group
        req(Command.WRITE, 4 * MiB, 4096, duration=0.01),  # the log
        req(Command.WRITE, 4 * MiB + 4096, 4096),
        req(Command.FLUSH, 0, 0),
        req(Command.READ, 40 * MiB, 4096, error=5),  # no partition: the v
        req(Command.READ, 2 * MiB + 4096, 4096),  # in sda1, nothing more specific
    ]
    out = st.add(batch, blockmap)
    assert [r for r, _ in out] == batch
    assert st.ops[Command.READ] == 4 and st.ops[Command.WRITE] == 2 and st.ops[Command.FLUSH] == 1
    assert st.bytes[Command.READ] == 8192 + 12288 + 4096 + 4096
    assert st.requests == 7 and st.errors == 1 and st.latency.total == 7
    by_path = {o.path or o.device: c for o, c in st.objects.items()}
    assert by_path["/etc/passwd"].reads == 2 and by_path["/etc/passwd"].read_bytes == 16384
    assert by_path["/etc/group"].reads == 1 and by_path["/etc/group"].read_bytes == 4096
    log = by_path["/var/log/boot log.txt"]
    assert (log.writes, log.write_bytes, log.reads, log.hits) == (2, 8192, 0, 2)
    assert by_path["/dev/sda"].reads == 1 and by_path["/dev/sda1"].reads == 1
    top = st.top("reads", 2)
    assert [o.path for o, _ in top] == ["/etc/passwd", "/etc/group"]
    assert [o.path for o, _ in st.top("writes")] == ["/var/log/boot log.txt"]
    files = st.top("reads", 10, keep=lambda o: o.type == "f")
    assert {o.type for o, _ in files} == {"f"}
    # without a map: no attribution, but everything else counts
    plain = Stats(64 * MiB)
    assert plain.add(batch)[0][1] is None and not plain.objects and plain.ops[0] == 4
    st.clear()
    assert st.requests == 0 and not st.objects and not any(st.heat.reads)


def test_pump_is_the_thread_boundary(blockmap):
    """The session's pump: the server thread only fills a bounded buffer;
    the pump drains it, looks each request up once and feeds every sink."""
    from diskwatch.pipeline.session import LiveFeed, Pump

    class Seen:
        def __init__(self):
            self.batches, self.events, self.ticks, self.closed = [], [], [], False

        def feed(self, batch, pieces):
            self.batches.append((batch, pieces))

        def on_event(self, event):
            self.events.append(event)

        def tick(self, now):
            self.ticks.append(now)

        def close(self):
            self.closed = True

    bus = Bus()
    feed = LiveFeed(bus, limit=1000)
    pump = Pump(feed, lambda: blockmap)
    a, b = pump.add(Seen()), pump.add(Seen())
    stats = Stats(64 * MiB)

    def server_thread():
        bus.publish(ConnectionEvent(1, True, "unix"))
        for i in range(30):
            bus.publish_requests([req(Command.READ, 3 * MiB, 4096, start=100 + i)] * 50)
        bus.publish(Message("hello", "stdout"))

    t = threading.Thread(target=server_thread)
    t.start()
    t.join()
    assert pump.run_once(200.0) == 1000
    # the buffer holds 1000: the rest were dropped and counted, not queued
    assert pump.dropped == 500 and feed.total_dropped == 500
    assert [type(e).__name__ for e in a.events] == ["ConnectionEvent", "Message", "Dropped"]
    (batch, pieces), = a.batches
    assert b.batches[0][1] is pieces  # one lookup, shared by every sink
    assert pieces[0] == blockmap.lookup(3 * MiB, 4096)
    for e in a.events:
        stats.on_event(e)
    stats.add(batch, pieces=pieces)
    assert stats.dropped == 500 and stats.connections == 1
    assert stats.objects[pieces[0][0][2]].reads == 1000
    pump.close()
    assert a.closed and b.closed and a.ticks == [200.0, float("inf")]
    assert not bus.has_request_subscribers


def test_batch_counting_matches_counting_one_by_one():
    """Stats.add counts a batch with C-level maps; it must agree with the
    per-request methods (Heat.add, RateSeries.add, LatencyHistogram.add)."""
    import random

    rnd = random.Random(4)
    size = 64 * MiB
    batch = []
    for i in range(3000):
        cmd = rnd.choice([Command.READ] * 6 + [Command.WRITE] * 3 + [
            Command.FLUSH, Command.TRIM, Command.WRITE_ZEROES, Command.BLOCK_STATUS])
        length = 0 if cmd == Command.FLUSH else rnd.choice([512, 4096, 65536, 3 * MiB])
        offset = rnd.randrange(0, size + 2 * MiB, 512)  # some past the end
        duration = rnd.choice([0.0, 3e-7, 2 ** (9 / 4) / 1e6, rnd.uniform(1e-6, 0.05), 5e3])
        batch.append(req(cmd, offset, length, start=100.0 + i / 1000, duration=duration,
                         error=5 if i % 97 == 0 else 0))
    st = Stats(size, heat_cells=100)
    st.add(batch[:1], None)
    st.add(batch[1:])  # straddles three seconds, all commands mixed
    heat, series, latency = Heat(size, 100), RateSeries(60), LatencyHistogram()
    for r in batch:
        if r.length and r.command != Command.BLOCK_STATUS:
            heat.add(r.offset, r.length, r.command != Command.READ)
        if r.command in (Command.READ, Command.WRITE):
            series.add(r.start, r.command == Command.WRITE, r.length)
        latency.add(r.duration)
    assert st.requests == 3000 and st.errors == sum(1 for r in batch if r.error)
    assert st.ops[Command.WRITE] == sum(1 for r in batch if r.command == Command.WRITE)
    assert st.bytes[Command.READ] == sum(r.length for r in batch if r.command == Command.READ)
    assert st.heat.reads == heat.reads and st.heat.writes == heat.writes
    assert st.heat.ever_read == heat.ever_read and st.heat.ever_written == heat.ever_written
    assert [st.series.at(s) for s in range(99, 104)] == [series.at(s) for s in range(99, 104)]
    assert st.latency.counts == latency.counts and st.latency.total == 3000


def test_each_object_keeps_its_requests_latency_and_the_slowest_rank_by_p99(blockmap):
    """Issue 21 item 5, live: p50/p99 per object (the rates panel's buckets,
    within 19%), a few buckets each however many requests; ``slowest``
    ranks by p99 among the most requested."""
    from diskwatch.sinks.stats import bucket_seconds, latency_bucket
    st = Stats(64 * MiB)
    batch = [req(Command.READ, 3 * MiB, 4096, duration=0.0002) for _ in range(98)]
    batch += [req(Command.READ, 3 * MiB, 4096, duration=0.050)] * 2  # passwd's slow 2%
    batch += [req(Command.WRITE, 4 * MiB, 4096, duration=0.004) for _ in range(10)]  # the log
    batch += [req(Command.READ, 3 * MiB + 8192, 4096, duration=0.001)]  # group: once
    batch += [req(Command.FLUSH, 0, 0, duration=1.0)]  # no object: not counted
    st.add(batch, blockmap)
    by_path = {o.path: c for o, c in st.objects.items() if o.path}
    p50, p99 = by_path["/etc/passwd"].latency()
    assert 0.0002 / 1.19 < p50 < 0.0002 * 1.19 and 0.050 / 1.19 < p99 < 0.050 * 1.19
    assert len(by_path["/etc/passwd"].lat) == 2  # two buckets for 100 requests
    assert by_path["/etc/group"].latency() == (bucket_seconds(latency_bucket(0.001)),) * 2
    assert [o.path for o, _ in st.slowest(3, keep=lambda o: o.type == "f")] == [
        "/etc/passwd", "/var/log/boot log.txt", "/etc/group"]
    # among the most requested only: group (one request) is left out
    assert [o.path for o, _ in st.slowest(3, keep=lambda o: o.type == "f", among=2)] == [
        "/etc/passwd", "/var/log/boot log.txt"]
