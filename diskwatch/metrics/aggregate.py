"""The metrics sink: aggregates of the request stream that exporters read.

It is fed by the session's pump like every other sink (``feed`` once per
round with the whole batch and its block-map pieces, looked up once by the
pump), in the pump's thread. Nothing here runs per request in the server's
thread, and no exporter object (prometheus_client, OpenTelemetry) is
touched per request: counting is done per batch with C-level map()/Counter
into plain lists, and the exporters read a ``snapshot()`` when they are
scraped or when they export. A lock makes the snapshot consistent: it is
held once per round and once per scrape.

What is counted (the exported names are in ``diskwatch.metrics``):

- per export and command: requests, bytes (of the data commands), errors by
  errno, a latency histogram (fixed buckets, ``LATENCY_BOUNDS``);
  connections open and in all; requests the pump's buffer dropped;
- with a block map, per op (read, write, trim, zero): requests and bytes
  per partition (at most ``MAX_PARTITIONS``, then "other"), per top-level
  directory and per file (each a ``TopSeries``: the ``top`` busiest, then
  "other"). A request counts once for each object it touches.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter

from ..events import COMMAND_NAMES, Command, ConnectionEvent, Dropped, Request
from ..text import safe_text
from .topn import WIDTH, TopSeries

#: the data operations object metrics count, by their ``op`` label
OPS = ("read", "write", "trim", "zero")
#: per command number: its index in OPS, or -1
_OP_OF_COMMAND = [-1] * len(COMMAND_NAMES)
for _i, _cmd in enumerate((Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)):
    _OP_OF_COMMAND[_cmd] = _i
#: commands whose length is bytes of the disk they act on (block status only asks)
BYTE_COMMANDS = frozenset((Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES,
                           Command.CACHE))
#: upper bounds (seconds) of the latency histogram's buckets; then +Inf
LATENCY_BOUNDS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                  0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: the errors an NBD server can send (the wire values are these errnos)
ERRNO_NAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
               75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}
#: partitions (devices, LVs) with their own series; more go to "other"
MAX_PARTITIONS = 64
OTHER = "other"
UNMAPPED = "unmapped"  # the partition label of bytes no object covers
#: label values (paths, devices: guest text) are cut to this many characters
MAX_LABEL = 256
#: objects whose labels are cached; the cache starts again beyond it
MAX_ROUTES = 1_000_000

_EXPORT, _COMMAND, _LENGTH, _DURATION, _ERROR = (itemgetter(i) for i in (1, 2, 4, 7, 8))


def label_text(text: str) -> str:
    """Guest text (a path, a device name) as a label value: controls and
    undecodable bytes escaped (``safe_text``), at most MAX_LABEL long."""
    text = safe_text(text)
    if len(text) > MAX_LABEL:
        text = text[:MAX_LABEL - 1] + "…"
    return text


def series_bound(top: int, exports: int = 1) -> int:
    """The most series diskwatch exports, whatever the guest does: what
    ``docs`` and the cardinality test hold it to."""
    ncmd = len(COMMAND_NAMES)
    per_export = (ncmd  # requests
                  + len(BYTE_COMMANDS)  # bytes
                  + ncmd * len(ERRNO_NAMES)  # errors
                  + ncmd * (len(LATENCY_BOUNDS) + 3)  # buckets, +Inf, sum, count
                  + 3)  # connections, connections_total, size
    values = 2 * len(OPS)  # requests and bytes per op
    objects = ((MAX_PARTITIONS + 2) + 2 * (top + 1)) * values  # + unmapped, other
    return exports * per_export + 1 + objects  # + dropped


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
    directories: dict[tuple[str, str], list[int]]  # (partition, directory) -> counts
    directories_other: list[int]
    files: dict[tuple[str, str], list[int]]  # (partition, path) -> counts
    files_other: list[int]


class MetricsSink:
    """A session sink (feed/on_event/tick/close) keeping the metrics' aggregates."""

    def __init__(self, exports: dict[str, int] | None = None, *, top: int = 20,
                 refresh: float = 10.0, tracked: int | None = None) -> None:
        self._lock = threading.Lock()
        self._exports = {name: ExportCounters(size) for name, size in (exports or {}).items()}
        self.dropped = 0
        self.mapped = False
        self._partitions: dict[str, list[int]] = {}
        tracked = tracked or max(1024, 50 * top)
        self.directories = TopSeries(top, tracked, refresh, half_life=6 * refresh)
        self.files = TopSeries(top, tracked, refresh, half_life=6 * refresh)
        self._routes: dict[object, tuple[list[int], tuple | None, tuple | None]] = {}

    # --- the Sink protocol (the pump's thread) ---------------------------------

    def feed(self, batch: Sequence[Request], pieces=None) -> None:
        if not batch:
            return
        with self._lock:
            names = set(map(_EXPORT, batch))
            if len(names) == 1:
                self._count(self._export(names.pop()), batch)
            else:
                for name in names:
                    self._count(self._export(name), [r for r in batch if r[1] == name])
            if pieces is not None:
                self.mapped = True
                self._attribute(batch, pieces)

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

    # --- counting ------------------------------------------------------------

    def _export(self, name: str) -> ExportCounters:
        c = self._exports.get(name)
        if c is None:
            c = self._exports[name] = ExportCounters()
        return c

    def _count(self, c: ExportCounters, reqs: Sequence[Request]) -> None:
        commands = Counter(map(_COMMAND, reqs))
        if len(commands) == 1:
            groups = ((next(iter(commands)), reqs),)
        else:
            groups = tuple((cmd, [r for r in reqs if r[2] == cmd]) for cmd in commands)
        for cmd, rs in groups:
            c.ops[cmd] += len(rs)
            c.bytes[cmd] += sum(map(_LENGTH, rs))
            durations = list(map(_DURATION, rs))
            c.seconds[cmd] += sum(durations)
            buckets = c.buckets[cmd]
            if buckets is None:
                buckets = c.buckets[cmd] = [0] * (len(LATENCY_BOUNDS) + 1)
            for i, n in Counter(map(bisect_left, repeat(LATENCY_BOUNDS), durations)).items():
                buckets[i] += n
        errors = list(map(_ERROR, reqs))
        if errors.count(0) != len(errors):
            for r in reqs:
                if r[8]:
                    c.errors[(r[2], ERRNO_NAMES.get(r[8], OTHER))] += 1

    def _attribute(self, batch: Sequence[Request], pieces) -> None:
        """Per request and piece: partition, top-level directory and file."""
        routes = self._routes
        route_of = self._route
        op_of = _OP_OF_COMMAND
        dirs: dict[tuple, list[int]] = {}
        files: dict[tuple, list[int]] = {}
        for r, ps in zip(batch, pieces, strict=True):
            if not ps:
                continue
            op = op_of[r[2]]
            if op < 0:
                continue
            bop = op + 4
            last_part = last_dir = None
            for start, end, obj in ps:
                route = routes.get(obj)
                if route is None:
                    route = route_of(obj)
                part, dkey, fkey = route
                n = end - start
                if part is not last_part:  # a request counts once per object
                    part[op] += 1
                    last_part = part
                part[bop] += n
                if dkey is not None:
                    c = dirs.get(dkey)
                    if c is None:
                        c = dirs[dkey] = [0] * WIDTH
                    if dkey != last_dir:  # equal keys of two files of one directory
                        c[op] += 1
                        last_dir = dkey
                    c[bop] += n
                    if fkey is not None:
                        c = files.get(fkey)
                        if c is None:
                            c = files[fkey] = [0] * WIDTH
                        c[op] += 1  # neighbouring pieces never share an object
                        c[bop] += n
        if dirs:
            self.directories.add(dirs)
        if files:
            self.files.add(files)

    def _route(self, obj) -> tuple[list[int], tuple | None, tuple | None]:
        """(partition counters, directory key, file key) of a map object."""
        if len(self._routes) >= MAX_ROUTES:
            self._routes.clear()
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
                dkey = (label, label_text(top))
                if obj.type == "f":
                    fkey = (label, label_text(path))
        part = self._partitions.get(label)
        if part is None:
            if len(self._partitions) >= MAX_PARTITIONS and label != UNMAPPED:
                label = OTHER
            part = self._partitions.setdefault(label, [0] * WIDTH)
        route = self._routes[obj] = (part, dkey, fkey)
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
                files=files, files_other=files_other)  # type: ignore[arg-type]
