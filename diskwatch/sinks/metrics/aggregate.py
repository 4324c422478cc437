"""The metrics sink: aggregates of the request stream that exporters read.

It is fed by the session's pump like every other sink (``feed`` once per
round with the whole batch and its block-map pieces, looked up once by the
pump), in the pump's thread. Nothing here runs per request in the server's
thread, and no exporter object (prometheus_client, OpenTelemetry) is
touched per request: counting is done per batch with C-level map()/Counter
into plain lists, and the exporters read a ``snapshot()`` when they are
scraped or when they export. A lock makes the snapshot consistent: it is
held once per round and once per scrape.

What is counted (the exported names are in ``diskwatch.sinks.metrics``):

- per export and command: requests, bytes (of the data commands), errors by
  errno, a latency histogram (fixed buckets, ``LATENCY_BOUNDS``);
  connections open and in all; requests the pump's buffer dropped;
- with a block map, per op (read, write, trim, zero): requests and bytes
  per partition (at most ``MAX_PARTITIONS``, then "other"), per top-level
  directory and per file (each a ``TopSeries``: the ``top`` busiest, then
  "other"). A request counts once for each file it touches, and once for a
  partition or directory per run of its pieces there.
"""

from __future__ import annotations

import heapq
import threading
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter

from ...events import ConnectionEvent, Dropped, JournalCarried, Request
from ...text import safe_text
from ...wire import COMMAND_NAMES, DATA_COMMANDS, ERROR_NAMES, Command
from .topn import WIDTH, TopSeries

#: the data operations object metrics count, by their ``op`` label
OPS = ("read", "write", "trim", "zero")
#: per command number: its index in OPS, or -1
_OP_OF_COMMAND = [-1] * len(COMMAND_NAMES)
for _i, _cmd in enumerate((Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)):
    _OP_OF_COMMAND[_cmd] = _i
#: upper bounds (seconds) of the latency histogram's buckets; then +Inf
LATENCY_BOUNDS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                  0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: partitions (devices, LVs) with their own series; more go to "other"
MAX_PARTITIONS = 64
OTHER = "other"
UNMAPPED = "unmapped"  # the partition label of bytes no object covers
#: label values (paths, devices: guest text) are cut to this many characters
MAX_LABEL = 256
#: objects whose labels are cached; the cache starts again beyond it
MAX_ROUTES = 1_000_000

_EXPORT, _COMMAND, _LENGTH, _DURATION, _ERROR = (itemgetter(i) for i in (1, 2, 4, 7, 8))
_FIRST = itemgetter(0)  # a request's first piece
_OBJECT = itemgetter(2)  # a piece's object
_PARTITION, _DIRECTORY, _FILE = (itemgetter(i) for i in range(3))  # of a route


def _by_command(reqs: Sequence[Request], pieces: Sequence | None = None) -> list[tuple]:
    """[(command, its requests[, their pieces])]: one group in the usual batch."""
    commands = Counter(map(_COMMAND, reqs))
    if not commands:
        return []
    if len(commands) == 1:
        cmd = next(iter(commands))
        return [(cmd, reqs)] if pieces is None else [(cmd, reqs, pieces)]
    if pieces is None:
        return [(cmd, [r for r in reqs if r[2] == cmd]) for cmd in commands]
    return [(cmd, [r for r in reqs if r[2] == cmd],
             [p for r, p in zip(reqs, pieces, strict=True) if r[2] == cmd]) for cmd in commands]


def label_text(text: str) -> str:
    """Guest text (a path, a device name) as a label value: controls and
    undecodable bytes escaped (``safe_text``), at most MAX_LABEL long."""
    text = safe_text(text)
    if len(text) > MAX_LABEL:
        text = text[:MAX_LABEL - 1] + "…"
    return text


def series_bound(top: int, exports: int = 1) -> int:
    """The most series diskwatch exports, whatever the guest does (the
    README states it; the 100,000-files test holds the endpoint to it)."""
    ncmd = len(COMMAND_NAMES)
    per_export = (ncmd  # requests
                  + len(DATA_COMMANDS)  # bytes
                  + ncmd * (len(ERROR_NAMES) + 1)  # errors, by errno or 'other'
                  + ncmd * (len(LATENCY_BOUNDS) + 3)  # buckets, +Inf, sum, count
                  + 3)  # connections, connections_total, size
    values = 2 * len(OPS)  # requests and bytes per op
    objects = ((MAX_PARTITIONS + 2) + 2 * (top + 1)) * values  # + unmapped, other
    journal = top + 1  # the journal's bytes by owner, and other
    return exports * per_export + 1 + objects + journal  # + dropped


class ExportCounters:
    """Counters of one export."""

    __slots__ = ("size", "ops", "bytes", "errors", "buckets", "seconds", "connections",
                 "connections_total")

    def __init__(self, size: int = 0) -> None:
        n = len(COMMAND_NAMES)
        self.size = size
        self.ops = [0] * n
        self.bytes = [0] * n
        self.errors: Counter[tuple[int, str]] = Counter()  # (command, errno name)
        self.buckets: list[list[int] | None] = [None] * n  # per command, made on first use
        self.seconds = [0.0] * n
        self.connections = 0
        self.connections_total = 0

    def copy(self) -> ExportCounters:
        c = ExportCounters(self.size)
        c.ops, c.bytes, c.errors = list(self.ops), list(self.bytes), Counter(self.errors)
        c.buckets = [list(b) if b is not None else None for b in self.buckets]
        c.seconds = list(self.seconds)
        c.connections, c.connections_total = self.connections, self.connections_total
        return c


@dataclass
class Snapshot:
    """A consistent copy of everything, for one scrape or export."""

    exports: dict[str, ExportCounters]
    dropped: int
    mapped: bool  # a block map named the requests (object metrics are meaningful)
    partitions: dict[str, list[int]]  # label -> [requests per op..., bytes per op...]
    directories: dict[str, list[int]]  # "partition\0directory" -> counts
    directories_other: list[int]
    files: dict[str, list[int]]  # "partition\0path" -> counts
    files_other: list[int]
    #: "partition\0path" -> journal bytes that carried its metadata (the busiest)
    journal: dict[str, int] = None  # type: ignore[assignment]
    journal_other: int = 0


class MetricsSink:
    """A session sink (feed/on_event/tick/close) keeping the metrics' aggregates."""

    def __init__(self, exports: dict[str, int] | None = None, *, top: int = 20,
                 refresh: float = 10.0, tracked: int | None = None) -> None:
        self._lock = threading.Lock()
        self._exports = {name: ExportCounters(size) for name, size in (exports or {}).items()}
        self.dropped = 0
        self.mapped = False
        self._partitions: dict[str, list[int]] = {}
        tracked = tracked or max(1024, 8 * top)  # sketch keys: 16x this at most
        self.directories = TopSeries(top, tracked, refresh, half_life=6 * refresh)
        self.files = TopSeries(top, tracked, refresh, half_life=6 * refresh)
        self._routes: dict[int, tuple[str, str | None, str | None]] = {}  # by id(object)
        self._route_objects: list = []
        self.top = top
        #: journal bytes by the file or directory whose metadata they carried:
        #: exact for the first ``tracked`` keys, the rest counted as other
        self._journal: dict[str, int] = {}
        self._journal_tracked = tracked
        self._journal_other = 0

    # --- the Sink protocol (the pump's thread) ---------------------------------

    def feed(self, batch: Sequence[Request], pieces=None) -> None:
        if not batch:
            return
        with self._lock:
            names = set(map(_EXPORT, batch))
            if len(names) == 1:
                groups = _by_command(batch, pieces)
                self._count(self._export(names.pop()), batch, groups)
            else:
                groups = None
                for name in names:
                    self._count(self._export(name), [r for r in batch if r[1] == name])
            if pieces is not None:
                self.mapped = True
                self._attribute(batch, pieces, groups)

    def on_event(self, event: object) -> None:
        if isinstance(event, ConnectionEvent):
            with self._lock:
                counters = self._export(event.export)
                if event.opened:
                    counters.connections += 1
                    counters.connections_total += 1
                elif counters.connections > 0:
                    counters.connections -= 1
        elif isinstance(event, Dropped):  # the pump's buffer was full: not counted
            with self._lock:
                self.dropped += event.count
        elif isinstance(event, JournalCarried):
            with self._lock:
                journal = self._journal
                for _, _, start, end, owner in event.writes:
                    if owner is None or not owner.path:
                        continue
                    key = f"{label_text(owner.device)}\0{label_text(owner.path)}"
                    if key in journal or len(journal) < self._journal_tracked:
                        journal[key] = journal.get(key, 0) + end - start
                    else:
                        self._journal_other += end - start

    def tick(self, now: float) -> None:
        with self._lock:
            self.directories.tick(now)
            self.files.tick(now)

    def close(self) -> None:
        pass

    def forget_names(self) -> None:
        """A new block map: names are looked up again (counters stay)."""
        with self._lock:
            self._routes.clear()
            self._route_objects.clear()

    # --- counting ------------------------------------------------------------

    def _export(self, name: str) -> ExportCounters:
        c = self._exports.get(name)
        if c is None:
            c = self._exports[name] = ExportCounters()
        return c

    def _count(self, c: ExportCounters, reqs: Sequence[Request], groups=None) -> None:
        for cmd, rs, *_ in groups or _by_command(reqs):
            c.ops[cmd] += len(rs)
            c.bytes[cmd] += sum(map(_LENGTH, rs))
            # Sorted once (C), then one bisection per bucket edge: not one
            # Python-level call per request (a flood brings thousands a round).
            durations = sorted(map(_DURATION, rs))
            c.seconds[cmd] += sum(durations)
            buckets = c.buckets[cmd]
            if buckets is None:
                buckets = c.buckets[cmd] = [0] * (len(LATENCY_BOUNDS) + 1)
            below = 0
            for i, bound in enumerate(LATENCY_BOUNDS):
                upto = bisect_right(durations, bound, below)  # le="bound": d <= bound
                buckets[i] += upto - below
                below = upto
            buckets[-1] += len(durations) - below
        errors = list(map(_ERROR, reqs))
        if errors.count(0) != len(errors):
            for r in reqs:
                if r[8]:
                    c.errors[(r[2], ERROR_NAMES.get(r[8], OTHER))] += 1

    def _attribute(self, batch: Sequence[Request], pieces, groups=None) -> None:
        """Partition, top-level directory and file of every request's pieces.

        The usual request lies in one object (one piece): those are counted
        with C-level passes over the batch (map, Counter, compress), so the
        cost per request does not depend on how many distinct files a round
        touches. Requests spanning several objects are first folded, in a
        Python loop, into items of the same form."""
        try:
            sizes = list(map(len, pieces))
        except TypeError:  # None for a request without a length
            pieces = [ps or () for ps in pieces]
            sizes = list(map(len, pieces))
        if sizes.count(1) != len(sizes):
            several = list(map((1).__lt__, sizes))
            if any(several):
                self._attribute_pieces(list(compress(batch, several)),
                                       list(compress(pieces, several)))
            single = list(map((1).__eq__, sizes))
            batch, pieces, groups = list(compress(batch, single)), list(compress(pieces, single)), None
        for cmd, reqs, pcs in groups or _by_command(batch, pieces):
            op = _OP_OF_COMMAND[cmd]
            if op >= 0:
                self._attribute_single(op, list(map(_OBJECT, map(_FIRST, pcs))),
                                       list(map(_LENGTH, reqs)))

    def _attribute_single(self, op: int, objs: list, lengths: list[int]) -> None:
        """Requests of one op, each inside one object (``objs[i]``)."""
        routes = self._routes
        ids = list(map(id, objs))  # the map's objects are interned: id is cheap and exact
        rts = list(map(routes.get, ids))
        if None in rts:
            route = self._route
            rts = [r if r is not None else route(o) for r, o in zip(rts, objs, strict=True)]
        length = lengths[0] if min(lengths) == max(lengths) else None
        self._add_partitions(op, list(map(_PARTITION, rts)), lengths, length)
        self.directories.add_requests(op, list(map(_DIRECTORY, rts)), lengths, length)
        self.files.add_requests(op, list(map(_FILE, rts)), lengths, length)

    def _add_partitions(self, op: int, labels: list[str], lengths: list[int],
                        length: int | None) -> None:
        parts = self._partitions
        bop = op + 4
        if length is not None:
            first = labels[0]
            # one partition in the whole batch (the usual case): one C-level count
            counted = ({first: len(labels)} if labels.count(first) == len(labels)
                       else Counter(labels))
            for label, n in counted.items():
                p = parts[label]
                p[op] += n
                p[bop] += n * length
            return
        per: dict[str, list[int]] = {}
        for label, ln in zip(labels, lengths, strict=True):
            c = per.get(label)
            if c is None:
                per[label] = [1, ln]
            else:
                c[0] += 1
                c[1] += ln
        for label, (n, nbytes) in per.items():
            p = parts[label]
            p[op] += n
            p[bop] += nbytes

    def _attribute_pieces(self, reqs: list, pieces: list) -> None:
        """Requests spanning several objects, folded into one item per file
        and one per run of pieces in a partition or directory (its bytes
        summed): a request counts once for each file it touches, and once
        for a partition or directory however many of its pieces in a row
        lie there."""
        routes = self._routes
        op_of = _OP_OF_COMMAND
        items: dict[int, tuple[list, ...]] = {}  # op -> labels, their lengths, dirs, ..., files
        for r, ps in zip(reqs, pieces, strict=True):
            op = op_of[r[2]]
            if op < 0:
                continue
            lists = items.get(op)
            if lists is None:
                lists = items[op] = ([], [], [], [], [], [])
            labels, plens, dkeys, dlens, fkeys, flens = lists
            last_part = last_dir = None
            for start, end, obj in ps:
                route = routes.get(id(obj))
                if route is None:
                    route = self._route(obj)
                label, dkey, fkey = route
                n = end - start
                if label == last_part:
                    plens[-1] += n
                else:
                    labels.append(label)
                    plens.append(n)
                    last_part = label
                if dkey is not None:
                    if dkey == last_dir:
                        dlens[-1] += n
                    else:
                        dkeys.append(dkey)
                        dlens.append(n)
                        last_dir = dkey
                    if fkey is not None:  # neighbouring pieces never share an object
                        fkeys.append(fkey)
                        flens.append(n)
        for op, (labels, plens, dkeys, dlens, fkeys, flens) in items.items():
            self._add_partitions(op, labels, plens, None)
            if dkeys:
                self.directories.add_requests(op, dkeys, dlens, None)
            if fkeys:
                self.files.add_requests(op, fkeys, flens, None)

    def _route(self, obj) -> tuple[str, str | None, str | None]:
        """(partition label, directory key, file key) of a map object."""
        if len(self._routes) >= MAX_ROUTES:
            self._routes.clear()
            self._route_objects.clear()
        dkey = fkey = None
        if obj is None:
            label = UNMAPPED
        else:
            label = label_text(obj.device)
            path = obj.path
            if path and obj.type in ("d", "f"):
                parts = path.split("/", 2)
                # "/var/log/x" and "d /var" -> "/var"; "/vmlinuz" and "d /" -> "/"
                top = "/" + parts[1] if len(parts) > 2 or (obj.type == "d" and
                                                           len(parts) == 2) else "/"
                # Keys are strings, "partition\0name" (label_text escapes any
                # NUL): a str caches its hash, a tuple hashes again each time.
                dkey = f"{label}\0{label_text(top)}"
                if obj.type == "f":
                    fkey = f"{label}\0{label_text(path)}"
        if label not in self._partitions:
            if len(self._partitions) >= MAX_PARTITIONS and label != UNMAPPED:
                label = OTHER
            self._partitions.setdefault(label, [0] * WIDTH)
        # Keyed by id: the object stays alive in the map as long as the map
        # does, and a new map (SIGHUP) clears the table (forget_names).
        route = self._routes[id(obj)] = (label, dkey, fkey)
        self._route_objects.append(obj)  # keeps the ids valid until the table is cleared
        return route

    # --- for the exporters (any thread) ----------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            dirs, dirs_other = self.directories.snapshot()
            files, files_other = self.files.snapshot()
            return Snapshot(
                exports={n: c.copy() for n, c in self._exports.items()},
                dropped=self.dropped, mapped=self.mapped,
                partitions={k: list(v) for k, v in self._partitions.items()},
                directories=dirs, directories_other=dirs_other,  # type: ignore[arg-type]
                files=files, files_other=files_other,  # type: ignore[arg-type]
                **self._journal_snapshot())

    def _journal_snapshot(self) -> dict:
        busiest = heapq.nlargest(self.top, self._journal.items(), key=itemgetter(1))
        shown = dict(busiest)
        other = self._journal_other + sum(n for k, n in self._journal.items() if k not in shown)
        return {"journal": shown, "journal_other": other}
