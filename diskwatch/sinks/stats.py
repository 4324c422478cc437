"""Aggregates of the request stream, shared by the Textual UI and headless mode.

Threading: everything here runs in the *consumer's* thread (the session's
pump: the UI's timer, or the headless loop), so the aggregates need no
locks. The pump looks requests up in the block map once and hands the
pieces to ``Stats.add``; nothing here runs in the server thread.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from operator import add as _add
from operator import floordiv, itemgetter
from operator import sub as _sub
from typing import Any

from ..events import (
    COMMAND_NAMES,
    Command,
    ConnectionEvent,
    Dropped,
    JournalCarried,
    LateNamed,
    Request,
)

READ = int(Command.READ)
WRITE = int(Command.WRITE)
BLOCK_STATUS = int(Command.BLOCK_STATUS)
DISC = int(Command.DISC)

# Request fields by position, for C-level map() over a batch
_COMMAND, _OFFSET, _LENGTH, _START, _DURATION, _ERROR = (
    itemgetter(i) for i in (2, 3, 4, 6, 7, 8))

#: a piece of a request: (start, end, object or None), as BlockMap.lookup gives it
Piece = tuple[int, int, Any]


def latency_bucket(seconds: float) -> int:
    """The bucket of a duration: 4 a octave from 1 µs (``LatencyHistogram``'s,
    and each object's in ``ObjectCounts``: one definition)."""
    us = seconds * 1e6
    if us < 1.0:
        return 0
    i = int(math.log2(us) * LatencyHistogram.PER_OCTAVE)
    return i if i < LatencyHistogram.BUCKETS else LatencyHistogram.BUCKETS - 1


def bucket_seconds(i: int) -> float:
    """A bucket's value: the geometric middle of its bounds."""
    return 2 ** ((i + 0.5) / LatencyHistogram.PER_OCTAVE) / 1e6


def bucket_quantile(counts: Iterable[tuple[int, int]], total: int, q: float) -> float | None:
    """The q-quantile (nearest rank) of (bucket, requests) pairs in bucket
    order, ``total`` requests in all: the value of the first bucket at or
    past rank q * total. None if empty."""
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in counts:
        seen += n
        if n and seen >= rank:
            return bucket_seconds(i)
    return None  # pragma: no cover - unreachable: counts sum to total


class LatencyHistogram:
    """Log-bucket histogram of durations: 4 buckets per octave from 1 µs.

    Bucket i holds durations in [2**(i/4), 2**((i+1)/4)) µs, so a quantile is
    within 19 % of the truth, whatever the spread, in a fixed 128 ints."""

    PER_OCTAVE = 4
    BUCKETS = 128  # up to 2**32 µs: over an hour

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.total = 0

    def add(self, seconds: float) -> None:
        self.counts[latency_bucket(seconds)] += 1
        self.total += 1

    #: EDGES[i]: the lower bound of bucket i, in seconds (bucket 0 starts at 0)
    EDGES = [0.0] + [2 ** (i / 4) / 1e6 for i in range(1, 128)]

    def add_many(self, seconds: Iterable[float]) -> None:
        """``add`` each of them: sorted once, then one bisection per bucket
        they span instead of a logarithm each (a flood brings thousands a tick)."""
        values = sorted(seconds)
        if not values:
            return
        edges, counts = self.EDGES, self.counts
        last = self.BUCKETS - 1
        i = max(0, bisect_right(edges, values[0]) - 1)
        done = 0
        n = len(values)
        while done < n:
            end = n if i == last else bisect_left(values, edges[i + 1], done)
            counts[i] += end - done
            done = end
            i += 1
        self.total += n

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds (geometric middle of its bucket), None if empty."""
        return bucket_quantile(enumerate(self.counts), self.total, q)

    @property
    def median(self) -> float | None:
        return self.quantile(0.5)

    @property
    def p99(self) -> float | None:
        return self.quantile(0.99)

    def clear(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.total = 0


class RateSeries:
    """Reads and writes (ops and bytes) per whole second, for the last ``seconds``.

    A ring of slots indexed by ``int(t) % seconds``; a slot whose second is
    stale reads as zero, so nothing needs to run when nothing happens."""

    FIELDS = ("read_ops", "write_ops", "read_bytes", "write_bytes")

    def __init__(self, seconds: int = 60) -> None:
        self.seconds = seconds
        self._sec = [-1] * seconds
        self._vals = [[0, 0, 0, 0] for _ in range(seconds)]

    def add(self, t: float, is_write: bool, nbytes: int) -> None:
        self.add_counts(int(t), is_write, 1, nbytes)

    def add_counts(self, second: int, is_write: bool, ops: int, nbytes: int) -> None:
        """``ops`` requests of ``nbytes`` in all, in the same whole second."""
        i = second % self.seconds
        slot = self._vals[i]
        if self._sec[i] != second:
            self._sec[i] = second
            slot[0] = slot[1] = slot[2] = slot[3] = 0
        if is_write:
            slot[1] += ops
            slot[3] += nbytes
        else:
            slot[0] += ops
            slot[2] += nbytes

    def at(self, second: int) -> tuple[int, int, int, int]:
        i = second % self.seconds
        if self._sec[i] != second:
            return (0, 0, 0, 0)
        v = self._vals[i]
        return (v[0], v[1], v[2], v[3])

    def series(self, now: float, field: str = "read_ops") -> list[int]:
        """The last ``seconds`` values of one field, oldest first, the current
        (incomplete) second last."""
        k = self.FIELDS.index(field)
        end = int(now)
        return [self.at(s)[k] for s in range(end - self.seconds + 1, end + 1)]

    def rate(self, now: float) -> tuple[float, float, float, float]:
        """Per-second rates over the last complete two seconds (steadier than one)."""
        end = int(now)
        a = self.at(end - 1)
        b = self.at(end - 2)
        return tuple((x + y) / 2 for x, y in zip(a, b, strict=True))  # type: ignore[return-value]

    def clear(self) -> None:
        self._sec = [-1] * self.seconds


#: the objects ``Stats.slowest`` ranks: the most requested
SLOWEST_AMONG = 500

class ObjectCounts:
    """Per-object counters: reads, writes, bytes read, bytes written, hits.

    ``hits`` counts requests of any kind touching the object; reads/writes
    count read/write requests (a request spanning three files counts once
    for each of them); bytes count only the piece inside the object."""

    __slots__ = ("reads", "writes", "read_bytes", "write_bytes", "hits", "journal_bytes", "lat")

    def __init__(self) -> None:
        self.reads = self.writes = self.read_bytes = self.write_bytes = self.hits = 0
        #: bytes of journal writes that carried this object's metadata
        self.journal_bytes = 0
        #: its reads' and writes' latencies: None, one request's bucket (an
        #: int, ``latency_bucket``), then {bucket: requests} (a few buckets
        #: each: bounded by the range of latencies, not by the requests)
        self.lat: int | dict[int, int] | None = None

    def latency(self) -> tuple[float, float] | None:
        """(p50, p99) seconds of its reads and writes (nearest rank, within
        19%: ``latency_bucket``), or None."""
        lat = self.lat
        if lat is None:
            return None
        if type(lat) is int:
            v = bucket_seconds(lat)
            return v, v
        items = sorted(lat.items())
        total = sum(n for _, n in items)
        return bucket_quantile(items, total, 0.5), bucket_quantile(items, total, 0.99)

    def __repr__(self) -> str:
        return (
            f"ObjectCounts(reads={self.reads}, writes={self.writes}, "
            f"read_bytes={self.read_bytes}, write_bytes={self.write_bytes}, hits={self.hits})"
        )


class Heat:
    """The disk as ``cells`` equal slices, each with decaying read/write heat.

    Heat is a count of requests touching the cell that halves every
    ``half_life`` seconds; ``ever_read``/``ever_written`` remember which
    cells were touched at all since the last clear."""

    def __init__(self, size: int, cells: int = 1024, half_life: float = 1.5) -> None:
        self.size = max(1, size)
        self.half_life = half_life
        self.resize(cells)

    def resize(self, cells: int) -> None:
        """Re-slice the disk into ``cells`` cells, carrying the heat over
        (each new cell takes the hottest old cell it overlaps)."""
        old = getattr(self, "reads", None)
        if old is not None:
            old_size, old_r, old_w = self.cell_size, self.reads, self.writes
            old_er, old_ew = self.ever_read, self.ever_written
        cells = max(1, cells)
        # ceil, so that `cells` slices cover the disk; fewer may be in use
        self.cell_size = max(1, -(-self.size // cells))
        self.cells = -(-self.size // self.cell_size)
        self.reads = [0.0] * self.cells
        self.writes = [0.0] * self.cells
        self.ever_read = bytearray(self.cells)
        self.ever_written = bytearray(self.cells)
        self._hot = False
        if old is None:
            return
        cs, last = self.cell_size, self.cells - 1
        reads, writes, er, ew = self.reads, self.writes, self.ever_read, self.ever_written
        for i in range(len(old_r)):
            if old_r[i] or old_w[i] or old_er[i] or old_ew[i]:
                first = min(last, i * old_size // cs)
                end = min(last, ((i + 1) * old_size - 1) // cs)
                for j in range(first, end + 1):
                    reads[j] = max(reads[j], old_r[i])
                    writes[j] = max(writes[j], old_w[i])
                    er[j] |= old_er[i]
                    ew[j] |= old_ew[i]
                self._hot = True

    def add(self, offset: int, length: int, is_write: bool) -> None:
        cs = self.cell_size
        first = offset // cs
        last = (offset + max(length, 1) - 1) // cs
        if first >= self.cells:
            return
        if last >= self.cells:
            last = self.cells - 1
        vals = self.writes if is_write else self.reads
        ever = self.ever_written if is_write else self.ever_read
        for i in range(first, last + 1):
            vals[i] += 1.0
            ever[i] = 1
        self._hot = True

    def add_many(self, offsets: list[int], lengths: list[int], is_write: bool) -> None:
        """``add`` each (offset, length) pair (lengths > 0): cells are found
        with C-level map()s and counted once per cell, not once per request."""
        cs = self.cell_size
        firsts = list(map(floordiv, offsets, repeat(cs)))
        lasts = list(map(floordiv, map(_sub, map(_add, offsets, lengths), repeat(1)), repeat(cs)))
        if firsts == lasts:  # the usual case: each request within one cell
            counts = Counter(firsts)
        else:
            counts = Counter()
            cells = self.cells
            for first, last in zip(firsts, lasts, strict=True):
                if first == last:
                    counts[first] += 1
                else:
                    for i in range(first, min(last, cells - 1) + 1):
                        counts[i] += 1
        vals = self.writes if is_write else self.reads
        ever = self.ever_written if is_write else self.ever_read
        cells = self.cells
        for i, k in counts.items():
            if i < cells:
                vals[i] += k
                ever[i] = 1
        self._hot = True

    def decay(self, dt: float) -> None:
        if not self._hot or dt <= 0:
            return
        f = 0.5 ** (dt / self.half_life)
        hot = False
        for vals in (self.reads, self.writes):
            for i, v in enumerate(vals):
                if v:
                    v *= f
                    if v < 0.01:
                        v = 0.0
                    else:
                        hot = True
                    vals[i] = v
        self._hot = hot

    def cell_range(self, i: int) -> tuple[int, int]:
        start = i * self.cell_size
        return start, min(start + self.cell_size, self.size)

    def clear(self) -> None:
        del self.reads
        self.resize(self.cells)


def _heat(heat: Heat, offsets: list[int], lengths: list[int], is_write: bool) -> None:
    if 0 in lengths:
        pairs = [(o, n) for o, n in zip(offsets, lengths, strict=True) if n]
        offsets = [o for o, _ in pairs]
        lengths = [n for _, n in pairs]
    if offsets:
        heat.add_many(offsets, lengths, is_write)


class Stats:
    """Everything the UI and the headless summary show, fed on the consumer side."""

    def __init__(self, size: int, heat_cells: int = 1024, window: int = 60, *,
                 object_latency: bool = True) -> None:
        self.size = size
        #: each object's latencies (the UI's top objects); headless's summary
        #: shows none, and spares the cost (about 0.6 us a request)
        self.object_latency = object_latency
        self.window = window
        self.heat = Heat(size, heat_cells)
        self._heat_cells = heat_cells
        #: with several disks, each disk's heat by export (the first's is
        #: ``heat``); empty: one disk, every request's heat is ``heat``
        self.heats: dict[str, Heat] = {}
        #: with several disks, each disk's reads and writes a second, by export
        self.disk_series: dict[str, RateSeries] = {}
        self.clear()

    def set_disks(self, disks: Sequence[tuple[str, int]]) -> None:
        """The session's disks, (export, size) in order: each gets its own
        heat (the first keeps ``heat``). One disk: every request heats ``heat``."""
        if len(disks) < 2:
            self.heats = {}
            self.disk_series = {}
            return
        self.disk_series = {export: self.disk_series.get(export) or RateSeries(self.window)
                            for export, _ in disks}
        heats = {disks[0][0]: self.heat}
        for export, size in disks[1:]:
            old = self.heats.get(export)
            heats[export] = old if old is not None else Heat(max(1, size), self._heat_cells)
        self.heats = heats

    def decay(self, dt: float) -> None:
        """Every disk's heat cools by ``dt`` seconds."""
        for heat in (self.heats.values() if self.heats else (self.heat,)):
            heat.decay(dt)

    def clear(self) -> None:
        n = len(COMMAND_NAMES)
        self.ops = [0] * n  # per command number
        self.bytes = [0] * n
        self.errors = 0
        self.dropped = 0  # requests the buffer could not hold
        self.latency = LatencyHistogram()
        self.series = RateSeries(self.window)
        self.objects: dict[Any, ObjectCounts] = {}
        self.unmapped = ObjectCounts()  # bytes no object covers
        self.heat.clear()
        for heat in getattr(self, "heats", {}).values():
            heat.clear()
        for series in getattr(self, "disk_series", {}).values():
            series.clear()
        # connections survive a clear: they are state, not history
        if not hasattr(self, "connections"):
            self.connections = 0
            self.connections_total = 0

    @property
    def requests(self) -> int:
        return sum(self.ops)

    def on_event(self, event: object) -> None:
        if isinstance(event, LateNamed):
            self._name_late(event)
        elif isinstance(event, JournalCarried):
            objects = self.objects
            for _t, _cmd, start, end, owner in event.writes:
                c = objects.get(owner)
                if c is None:
                    c = objects[owner] = ObjectCounts()
                c.journal_bytes += end - start
        elif isinstance(event, Dropped):
            self.dropped += event.count
        elif isinstance(event, ConnectionEvent):
            if event.opened:
                self.connections += 1
                self.connections_total += 1
            elif self.connections > 0:
                self.connections -= 1

    def add(
        self, batch: Sequence[Request], blockmap: Any = None,
        pieces: Sequence[list[Piece] | None] | None = None,
    ) -> list[tuple[Request, list[Piece] | None]]:
        """Count a batch; returns each request with its pieces (None without a
        map) so the trace can reuse them. ``pieces``: the batch already looked
        up (what the session's pump hands its sinks); else ``blockmap.lookup``
        is called here.

        Under a flood this runs for thousands of requests a tick in the thread
        that shares the GIL with the server, so the counting is done per
        command over the whole batch with C-level map()/Counter/sorted, not
        with Python code per request; only attribution is per request."""
        if not batch:
            return []
        commands = Counter(map(_COMMAND, batch))
        if len(commands) == 1:
            groups: Iterable[tuple[int, Sequence[Request]]] = ((next(iter(commands)), batch),)
        else:
            groups = [(cmd, [r for r in batch if r[2] == cmd]) for cmd in commands]
        ops, nbytes, series, heat = self.ops, self.bytes, self.series, self.heat
        for cmd, reqs in groups:
            lengths = list(map(_LENGTH, reqs))
            total = sum(lengths)
            ops[cmd] += len(reqs)
            nbytes[cmd] += total
            is_write = cmd != READ
            if cmd == READ or cmd == WRITE:
                seconds = list(map(int, map(_START, reqs)))
                if seconds[0] == seconds[-1] and min(seconds) == max(seconds):
                    series.add_counts(seconds[0], is_write, len(reqs), total)
                else:  # the batch straddles a second
                    per_second: dict[int, list[int]] = {}
                    for sec, length in zip(seconds, lengths, strict=True):
                        slot = per_second.get(sec)
                        if slot is None:
                            per_second[sec] = [1, length]
                        else:
                            slot[0] += 1
                            slot[1] += length
                    for sec, (n, b) in per_second.items():
                        series.add_counts(sec, is_write, n, b)
            # several disks: each request counts in its own disk's rates and heat
            heated = bool(total) and cmd != BLOCK_STATUS
            per_disk = ([(export, [r for r in reqs if r[1] == export]) for export in self.heats]
                        if self.heats and (heated or cmd == READ or cmd == WRITE) else [])
            if cmd == READ or cmd == WRITE:
                for export, mine in per_disk:
                    disk = self.disk_series[export]
                    for r in mine:
                        disk.add(r[6], is_write, r[4])
            if heated:
                if per_disk:
                    for export, mine in per_disk:
                        if mine:
                            _heat(self.heats[export], list(map(_OFFSET, mine)),
                                  list(map(_LENGTH, mine)), is_write)
                else:
                    _heat(heat, list(map(_OFFSET, reqs)), lengths, is_write)
        errors = list(map(_ERROR, batch))
        self.errors += len(errors) - errors.count(0)
        if DISC in commands:
            # A disconnect has no reply: its "latency" would say nothing.
            self.latency.add_many(r[7] for r in batch if r[2] != DISC)
        else:
            self.latency.add_many(map(_DURATION, batch))
        if pieces is None:
            if blockmap is None:
                return list(zip(batch, repeat(None)))
            pieces = list(map(blockmap.lookup, map(_OFFSET, batch), map(_LENGTH, batch)))
        self._attribute(batch, pieces)
        return list(zip(batch, pieces, strict=True))

    def _name_late(self, event: LateNamed) -> None:
        """Written bytes a new map named: moved from what they were counted
        under (a partition, or nothing) to their owner; a request counts as
        one write of each owner it reached."""
        objects = self.objects
        seen: set = set()
        for t, cmd, start, end, old, obj in event.writes:
            if cmd != WRITE:
                continue
            n = end - start
            before = objects.get(old) if old is not None else self.unmapped
            if before is not None:
                before.write_bytes = max(0, before.write_bytes - n)
            c = objects.get(obj)
            if c is None:
                c = objects[obj] = ObjectCounts()
            c.write_bytes += n
            if (t, obj) not in seen:  # a request is known by its start
                seen.add((t, obj))
                c.writes += 1
                c.hits += 1

    def _attribute(self, batch: Sequence[Request], pieces: Sequence[list[Piece] | None]
                   ) -> None:
        objects = self.objects
        unmapped = self.unmapped
        bucket, track = latency_bucket, self.object_latency
        for r, looked_up in zip(batch, pieces, strict=True):
            if not looked_up:
                continue
            cmd = r[2]
            b = bucket(r[7]) if track else -1  # -1: not kept
            for start, end, obj in looked_up:
                c = objects.get(obj) if obj is not None else unmapped
                if c is None:
                    c = objects[obj] = ObjectCounts()
                c.hits += 1
                if cmd == READ:
                    c.reads += 1
                    c.read_bytes += end - start
                elif cmd == WRITE:
                    c.writes += 1
                    c.write_bytes += end - start
                else:
                    continue
                if b < 0:
                    continue
                lat = c.lat
                if lat is None:
                    c.lat = b
                elif type(lat) is int:
                    c.lat = {b: 2} if lat == b else {lat: 1, b: 1}
                else:
                    lat[b] = lat.get(b, 0) + 1

    def slowest(self, n: int = 10, keep: Callable[[Any], bool] | None = None,
                among: int = SLOWEST_AMONG) -> list[tuple[Any, ObjectCounts]]:
        """The n objects whose requests were slowest (p99, then p50), among
        the ``among`` most requested: ranking every object would cost the UI
        a pass over all of them at each refresh, and one slow request of a
        file read once is no pattern."""
        items: Iterable[tuple[Any, ObjectCounts]] = self.objects.items()
        if keep is not None:
            items = [(o, c) for o, c in items if keep(o)]
        busiest = heapq.nlargest(among, ((c.reads + c.writes, i, o, c)
                                         for i, (o, c) in enumerate(items)
                                         if c.lat is not None))
        rows = [(c.latency(), o, c) for _, _, o, c in busiest]
        rows.sort(key=lambda r: (-r[0][1], -r[0][0], str(r[1])))
        return [(o, c) for _, o, c in rows[:n]]

    def top(self, by: str = "reads", n: int = 10,
            keep: Callable[[Any], bool] | None = None) -> list[tuple[Any, ObjectCounts]]:
        """The n objects with the most ``by`` ("reads", "writes", "read_bytes",
        "write_bytes" or "hits"), most first; ties broken by bytes then name."""
        bytes_key = "write_bytes" if by.startswith("write") else "read_bytes"
        items: Iterable[tuple[Any, ObjectCounts]] = self.objects.items()
        if keep is not None:
            items = [(o, c) for o, c in items if keep(o)]
        items = [(o, c) for o, c in items if getattr(c, by)]
        items.sort(key=lambda oc: (-getattr(oc[1], by), -getattr(oc[1], bytes_key), str(oc[0])))
        return items[:n]
