"""What a recording says, in the terms a person acts on.

``analyse(recording, blockmap)`` makes one pass over the requests and keeps,
per block-map object, what was read and written, when it was first touched
and when it was written (for churn); per directory the same summed over its
subtree; per object type the request latencies. ``compare(a, b)`` sets two
analyses side by side.

Definitions (the text, the JSON and the tests use these and no others):

- *read*: NBD_CMD_READ. *written*: WRITE, WRITE_ZEROES and TRIM (each
  changes what the disk holds). CACHE and BLOCK_STATUS touch no data and
  count only in the per-command totals; FLUSH and DISC have no range.
- A request spanning several objects counts once for each, with the bytes
  of its piece inside each (as ``Stats`` counts them live).
- *write burst*, *churn*, its *period* and *rate*: as ``diskwatch/churn.py``
  defines them (the live views use the same): writes to one object with no
  FLUSH between them and less than ``BURST_GAP`` apart are one burst; churn
  is an object written in at least ``CHURN_MIN_BURSTS`` bursts; its period
  the median time between bursts, its rate bursts per minute.
- Without a map, requests count in the 1 MiB region where they start.
- *unmapped*: bytes no block-map range covers. *Partition only*: bytes whose
  most specific object is a partition, LV or disk (filesystem metadata,
  journal, free space: named by no file or directory).
- Latency rows are per (type of the most specific object of the request,
  command); percentiles are exact (nearest rank) over the recording.
- A recording of a session remapped live names each request with the map
  that named it live (``maps``: record.MapSchedule); objects of several
  maps with the same type, device and path are one object.
"""

from __future__ import annotations

import math
import random
from array import array
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..bmap.format import TYPE_RANK, is_structure_path
from ..churn import BURST_GAP, CHURN_MIN_BURSTS, new_burst, per_minute, period
from ..late import JOURNAL, LATE_KEPT, LateNamer
from ..lifetimes import Lifetimes, map_diff
from ..scans import Scan, ScanTracker
from ..traffic import Traffic
from ..wire import CMD_FLUSH, CMD_READ, COMMAND_NAMES, WRITE_COMMANDS
from .recording import Recording

REGION_SHIFT = 20  # 1 MiB regions name the busy places when there is no map

#: what a block-map type is called in reports; None: no object covers the bytes
TYPE_NAMES = {"f": "file", "d": "directory", "l": "lv", "p": "partition", "v": "disk",
              None: "unmapped"}

_RANGED = WRITE_COMMANDS | {CMD_READ}


@dataclass(slots=True)
class ObjectTraffic(Traffic):
    """An object's traffic plus when: first access, and each write burst's start."""

    first_t: float = 0.0
    first_op: str = ""
    first_read_t: float | None = None
    last_write_t: float = -math.inf
    last_write_flushes: int = -1  # flushes seen before its last write
    bursts: array = field(default_factory=lambda: array("d"))
    #: bytes of journal writes that carried its metadata (the recording's JMAP frames)
    journal_bytes: int = 0
    #: the latencies (seconds) of the requests that touched it: all of them
    #: up to LATENCY_SAMPLES, then a uniform sample of that many (reservoir)
    latency: array = field(default_factory=lambda: array("f"))
    latency_seen: int = 0  # requests that touched it (the sample's population)
    last_request: int = -1  # the last request counted in ``latency``

    def latency_percentiles(self) -> tuple[float, float] | None:
        """(p50, p99) of its requests' latencies (nearest rank), None without any."""
        if not self.latency:
            return None
        s = sorted(self.latency)
        return _rank(s, 0.5), _rank(s, 0.99)


#: latencies kept per object: 4 KiB each at most, however many requests
LATENCY_SAMPLES = 1024


def is_fs_structure(obj: Any) -> bool:
    """The filesystem's own structures, as the metadata mapper names them:
    ``/$Journal``, ``/$MFT``, ``/$Extend/$UsnJrnl:$J``, ``PATH:$extents``.
    They churn because files are written (every sync commits the journal):
    the report shows them apart, so the files that cause it come first."""
    return is_structure_path(getattr(obj, "path", None))  # one definition: bmap/format.py


@dataclass
class Churn:
    name: str
    type: str
    fs_structure: bool  # the filesystem's own (is_fs_structure), not a file of the guest's
    bursts: int
    writes: int
    write_bytes: int
    first_t: float
    last_t: float
    period: float | None  # median seconds between bursts
    per_minute: float | None  # bursts per minute between the first and the last


@dataclass
class LatencyRow:
    type: str  # TYPE_NAMES value, or "-" for commands without a range
    op: str
    count: int
    p50: float
    p90: float
    p99: float
    max: float


@dataclass
class Analysis:
    source: str
    origin: str
    timed: bool
    size: int
    mapped: bool
    requests: int = 0
    errors: int = 0
    duration: float = 0.0  # from the recording's start to the end of the last request
    first_t: float | None = None  # the first request's time (firmware, kernel before it)
    by_command: dict[str, list[int]] = field(default_factory=dict)  # name -> [requests, bytes]
    read_bytes: int = 0
    write_bytes: int = 0
    objects: dict[Any, ObjectTraffic] = field(default_factory=dict)
    dirs: dict[tuple[str, str], Traffic] = field(default_factory=dict)
    unmapped: Traffic = field(default_factory=Traffic)
    partition_only: Traffic = field(default_factory=Traffic)
    #: write bytes their own map did not name, named by the session's last map
    named_late: int = 0
    latencies: dict[tuple[str, str], array] = field(default_factory=dict)
    truncated: bool = False
    #: without a map: traffic per REGION_SHIFT-aligned region (its index),
    #: counted where each request starts
    regions: dict[int, Traffic] = field(default_factory=dict)
    #: the maps the live session swapped in that named requests from
    #: ``at`` (request index) on: {"at", "t", "why"}
    maps: list[dict[str, Any]] = field(default_factory=list)
    #: the files and directories created and deleted during the session
    #: (diskwatch/lifetimes.py's definitions, over the maps above)
    lifetimes: Any = None

    # -- views --

    def top_files(self, by: str = "bytes", n: int = 10, fs_structures: bool = False
                  ) -> list[tuple[str, ObjectTraffic]]:
        """Files (type f) with the most ``by`` (a Traffic attribute), most
        first: the guest's files, or (``fs_structures``) the filesystem's own."""
        items = [(str(o), t) for o, t in self.objects.items()
                 if o.type == "f" and getattr(t, by) and is_fs_structure(o) == fs_structures]
        items.sort(key=lambda it: (-getattr(it[1], by), -it[1].bytes, it[0]))
        return items[:n]

    def slowest_files(self, n: int = 10) -> list[tuple[str, ObjectTraffic, float, float]]:
        """The guest's files whose requests were slowest: (name, traffic, p50,
        p99), highest p99 first (then p50, then most requests)."""
        rows = []
        for o, t in self.objects.items():
            if o.type != "f" or is_fs_structure(o):
                continue
            pct = t.latency_percentiles()
            if pct is not None:
                rows.append((str(o), t, *pct))
        rows.sort(key=lambda r: (-r[3], -r[2], -r[1].requests, r[0]))
        return rows[:n]

    def top_dirs(self, by: str = "bytes", n: int = 10) -> list[tuple[str, Traffic]]:
        """Directories by their subtree's ``by`` (the root of a filesystem left out)."""
        items = [(f"d {dev} {path}", t) for (dev, path), t in self.dirs.items()
                 if path != "/" and getattr(t, by)]
        items.sort(key=lambda it: (-getattr(it[1], by), -it[1].bytes, it[0]))
        return items[:n]

    def top_regions(self, by: str = "bytes", n: int = 10) -> list[tuple[int, int, Traffic]]:
        """(start, end, traffic) of the busiest regions (without a map), most first."""
        items = sorted(((i, t) for i, t in self.regions.items() if getattr(t, by)),
                       key=lambda it: (-getattr(it[1], by), it[0]))
        return [(i << REGION_SHIFT, (i + 1) << REGION_SHIFT, t) for i, t in items[:n]]

    def churn(self, n: int | None = None) -> list[Churn]:
        """Files and directories written in CHURN_MIN_BURSTS bursts or more:
        the guest's own first, then the filesystem's structures; most
        bursts first in each."""
        rows = []
        for obj, t in self.objects.items():
            if obj.type not in "fd" or len(t.bursts) < CHURN_MIN_BURSTS:
                continue
            starts = t.bursts
            rows.append(Churn(
                name=str(obj), type=TYPE_NAMES[obj.type], fs_structure=is_fs_structure(obj),
                bursts=len(starts), writes=t.writes,
                write_bytes=t.write_bytes, first_t=starts[0], last_t=starts[-1],
                period=period(starts),
                per_minute=per_minute(len(starts), starts[0], starts[-1])))
        rows.sort(key=lambda c: (c.fs_structure, -c.bursts, -c.writes, c.name))
        return rows if n is None else rows[:n]

    def timeline(self) -> list[tuple[float, str, str]]:
        """(time, "read"/"write", name) of each file and directory's first
        access, in order."""
        rows = [(t.first_t, t.first_op, str(o)) for o, t in self.objects.items()
                if o.type in "fd"]
        rows.sort()
        return rows

    def latency_rows(self) -> list[LatencyRow]:
        rows = []
        for (type_, op), values in self.latencies.items():
            s = sorted(values)
            rows.append(LatencyRow(type_, op, len(s), _rank(s, 0.5), _rank(s, 0.9),
                                   _rank(s, 0.99), s[-1]))
        order = list(TYPE_NAMES.values()) + ["-"]
        rows.sort(key=lambda r: (order.index(r.type) if r.type in order else 99, r.op))
        return rows

    def scans(self) -> list[Scan]:
        """Sweeps of reads over many files, directory by directory
        (``diskwatch/scans.py``): from each file's first read, in order."""
        tracker = ScanTracker()
        firsts = sorted((t.first_read_t, str(o), o, t.read_bytes) for o, t in self.objects.items()
                        if o.type == "f" and t.first_read_t is not None
                        and not is_fs_structure(o))
        for t, _, obj, nbytes in firsts:
            tracker.first_read(t, obj, nbytes)
        tracker.tick(float("inf"))
        return tracker.scans()

    def first_reads(self) -> dict[str, float]:
        """File name -> time of its first read."""
        return {str(o): t.first_read_t for o, t in self.objects.items()
                if o.type == "f" and t.first_read_t is not None}

    def traffic_by_name(self) -> dict[str, Traffic]:
        out: dict[str, Traffic] = {str(o): t for o, t in self.objects.items() if o.type in "fd"}
        return out


def _rank(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q of them at or below."""
    k = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[k]


def analyse(recording: Recording, blockmap: Any = None, burst_gap: float = BURST_GAP, *,
            maps: Any = None, disks: dict | None = None) -> Analysis:
    """One pass over the recording's requests (see the module's definitions).
    ``maps`` (a record.MapSchedule) names each request with its own map
    instead of ``blockmap`` naming them all."""
    switch_at = maps.at if maps is not None else []
    if maps is not None:
        blockmap = maps.first
    a = Analysis(source=recording.source, origin=recording.origin, timed=recording.timed,
                 size=recording.disk_size(), mapped=blockmap is not None,
                 truncated=recording.truncated)
    if maps is not None:
        a.maps = [{"at": m.at, "t": m.t, "why": m.why} for m in maps.recorded]
    by_command = {name: [0, 0] for name in COMMAND_NAMES}
    objects = a.objects
    latencies = a.latencies
    unmapped, partition_only = a.unmapped, a.partition_only
    regions = a.regions
    lookup = blockmap.lookup if blockmap is not None else None
    # A recording of several disks: ``disks`` are the other disks' maps by
    # export (every one but the first's); ``maps`` name the first disk's.
    # Late naming: a write its own map could not name (a file made after
    # that map) is named by the session's last map if that one can (the
    # owner learned later in the session wins), as the live views do.
    last = maps.last() if maps is not None and maps.recorded else None
    late = last.lookup if last is not None else None
    # Journal writes go to the files whose metadata they carried, as the live
    # session gave them: each JMAP frame (a remap's journal map) attributes
    # the journal writes kept since the one before.
    recorded = getattr(recording, "recorded", None)
    jmaps = list(maps.journal) if maps is not None and recorded is not None else []
    jat = [m.at for m in jmaps]
    jnext = 0
    journal = LateNamer()  # as the live session kept the journal's writes
    rng = random.Random(0)  # the latency samples: the same report every run
    # Lifetimes: each map swapped in against the one before; the unnamed
    # writes since (the first disk's) are looked up in it, for the births
    # of the files it adds (as live late naming hands them on).
    lives = a.lifetimes = Lifetimes()
    following = lives.following
    in_use = blockmap
    unnamed: deque = deque(maxlen=LATE_KEPT)
    end = 0.0
    flushes = 0
    flush = CMD_FLUSH
    # the other disks' maps their live remaps made (DMAP frames), in effect
    # from their request on, as live
    disk_recorded = list(maps.disk) if maps is not None and recorded is not None else []
    dat = [m.at for m in disk_recorded]
    dnext = 0
    last_of = {m.export: m for m in disk_recorded}  # (by request: the last wins)
    disk_last = {export: recorded.load_map(m) for export, m in last_of.items()}
    if disk_recorded:
        disks = dict(disks or {})
    k = 0  # the next map to switch to, at request switch_at[k]
    next_switch = switch_at[0] if switch_at else -1
    for i, r in enumerate(recording.requests):
        while jnext < len(jat) and jat[jnext] <= i:
            _carry(journal, recorded.load_map(jmaps[jnext]), objects)
            jnext += 1
        while dnext < len(dat) and dat[dnext] <= i:
            m = disk_recorded[dnext]
            new = disk_last[m.export] if m is last_of[m.export] else recorded.load_map(m)
            _lives_map(lives, disks.get(m.export), new, deque())
            disks[m.export] = new
            dnext += 1
        if i == next_switch:  # the live session swapped maps before this request
            while k < len(switch_at) and switch_at[k] <= i:
                k += 1  # (several at one request: the last one named it)
            new = maps.map(k - 1)
            lookup = new.lookup
            next_switch = switch_at[k] if k < len(switch_at) else -1
            _lives_map(lives, in_use, new, unnamed)
            in_use = new
        cmd = r.command
        name = COMMAND_NAMES[cmd] if 0 <= cmd < len(COMMAND_NAMES) else "unknown"
        counts = by_command[name]
        counts[0] += 1
        counts[1] += r.length
        a.requests += 1
        if r.error:
            a.errors += 1
        t = r.start
        lives.saw(t)
        if a.first_t is None:
            a.first_t = t
        if t + r.duration > end:
            end = t + r.duration
        if cmd == flush:
            flushes += 1
        if cmd not in _RANGED or not r.length:
            _latency(latencies, "-", name, r.duration)
            continue
        is_read = cmd == CMD_READ
        if is_read:
            a.read_bytes += r.length
        else:
            a.write_bytes += r.length
        if lookup is None:
            _latency(latencies, "all", name, r.duration)
            region = regions.get(r.offset >> REGION_SHIFT)
            if region is None:
                region = regions[r.offset >> REGION_SHIFT] = Traffic()
            _count(region, is_read, r.length)
            continue
        best_rank = -1
        best_type = None
        other = disks.get(r.export) if disks else None
        if other is not None:  # another disk: its own map, and its last for late naming
            pieces = other.lookup(r.offset, r.length)
            if not is_read and r.export in disk_last:
                last_map = disk_last[r.export]
                if last_map is not other:
                    pieces = _name_late(pieces, last_map.lookup, a)
        else:
            pieces = lookup(r.offset, r.length)
            if not is_read:  # what its own map did not name: births, at the next map
                unnamed.extend((t, start, stop) for start, stop, obj in pieces
                               if obj is None or obj.type not in "fd")
            if late is not None and not is_read and lookup is not late:
                pieces = _name_late(pieces, late, a)
        for start, stop, obj in pieces:
            n = stop - start
            if obj is None:
                _count(unmapped, is_read, n)
                continue
            if following and obj in following:
                lives.touch(obj, t, is_read, n, start)
            rank = TYPE_RANK[obj.type]
            if rank > best_rank:
                best_rank, best_type = rank, obj.type
            if rank <= TYPE_RANK["l"]:
                _count(partition_only, is_read, n)
            ot = objects.get(obj)
            if ot is None:
                ot = objects[obj] = ObjectTraffic(first_t=t, first_op="read" if is_read
                                                  else "write")
            if ot.last_request != i:  # once per request, however many pieces
                ot.last_request = i
                _sample(ot, r.duration, rng)
            if jmaps and not is_read and obj.path == JOURNAL:
                journal.keep_journal_write(t, cmd, start, stop)
            if is_read:
                ot.reads += 1
                ot.read_bytes += n
                if ot.first_read_t is None:
                    ot.first_read_t = t
            else:
                ot.writes += 1
                ot.write_bytes += n
                if new_burst(t, ot.last_write_t, ot.last_write_flushes, flushes, burst_gap):
                    ot.bursts.append(t)
                ot.last_write_t = t
                ot.last_write_flushes = flushes
        _latency(latencies, TYPE_NAMES[best_type], name, r.duration)
    while jnext < len(jat):  # made after the last request
        _carry(journal, recorded.load_map(jmaps[jnext]), objects)
        jnext += 1
    a.duration = end
    a.by_command = {k: v for k, v in by_command.items() if v[0]}
    a.dirs = _subtrees(objects)
    return a


def _lives_map(lives: Lifetimes, old: Any, new: Any, unnamed: deque) -> None:
    """A map the live session swapped in: what it adds and removes told to
    ``lives``; the writes no map named before, named by it where it names
    what it added (their births)."""
    added, removed = map_diff(old, new)
    lives.map_changed(added, removed, new)
    if added and unnamed:
        following = lives.following
        for t, start, stop in unnamed:
            for s, e, obj in new.lookup(start, stop - start):
                if obj in following:
                    lives.touch(obj, t, False, e - s, s)
    unnamed.clear()


def _carry(journal: LateNamer, journal_map: Any, objects: dict) -> None:
    """The journal writes kept since the last journal map, to their owners."""
    carried = journal.carried(journal_map)
    for t, _cmd, start, end, owner in carried.writes if carried is not None else ():
        ot = objects.get(owner)
        if ot is None:
            ot = objects[owner] = ObjectTraffic(first_t=t, first_op="write")
        ot.journal_bytes += end - start


def _name_late(pieces: list, late, a: Analysis) -> list:
    out = []
    for start, stop, obj in pieces:
        if obj is not None and obj.type in "fd":
            out.append((start, stop, obj))
            continue
        for s, e, named in late(start, stop - start):
            if named is not None and named.type in "fd":
                out.append((s, e, named))
                a.named_late += e - s
            else:
                out.append((s, e, obj))
    return out


def _count(t: Traffic, is_read: bool, n: int) -> None:
    if is_read:
        t.reads += 1
        t.read_bytes += n
    else:
        t.writes += 1
        t.write_bytes += n


def _sample(ot: ObjectTraffic, seconds: float, rng: random.Random) -> None:
    """Reservoir sampling (Algorithm R): each request's latency is kept with
    probability LATENCY_SAMPLES / requests so far."""
    ot.latency_seen += 1
    if len(ot.latency) < LATENCY_SAMPLES:
        ot.latency.append(seconds)
        return
    k = rng.randrange(ot.latency_seen)
    if k < LATENCY_SAMPLES:
        ot.latency[k] = seconds


def _latency(latencies: dict, type_: str, op: str, seconds: float) -> None:
    values = latencies.get((type_, op))
    if values is None:
        values = latencies[(type_, op)] = array("d")
    values.append(seconds)


def _subtrees(objects: dict[Any, ObjectTraffic]) -> dict[tuple[str, str], Traffic]:
    """Each directory's traffic summed over everything under it (its own
    blocks included)."""
    dirs: dict[tuple[str, str], Traffic] = {}
    for obj, t in objects.items():
        if obj.type not in "fd" or not obj.path:
            continue
        path = obj.path.rstrip("/") or "/"
        chain = [path] if obj.type == "d" else []
        while path != "/":
            path = path.rsplit("/", 1)[0] or "/"
            chain.append(path)
        for p in chain:
            d = dirs.get((obj.device, p))
            if d is None:
                d = dirs[(obj.device, p)] = Traffic()
            d.add(t)
    return dirs


# --- two recordings ---------------------------------------------------------------------


@dataclass
class Change:
    name: str
    a: Traffic
    b: Traffic

    @property
    def delta_bytes(self) -> int:
        return self.b.bytes - self.a.bytes


@dataclass
class Milestone:
    name: str
    a: float | None  # time of the first read in A, None if A never read it
    b: float | None
    #: the same, counted from each run's first request: what happened before
    #: the disk was touched (qemu starting, firmware, a kernel under load) left out
    a_from_first: float | None = None
    b_from_first: float | None = None

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def delta_from_first(self) -> float | None:
        if self.a_from_first is None or self.b_from_first is None:
            return None
        return self.b_from_first - self.a_from_first


@dataclass
class Comparison:
    a: Analysis
    b: Analysis
    only_a: list[tuple[str, Traffic]]
    only_b: list[tuple[str, Traffic]]
    changed: list[Change]
    milestones: list[Milestone]
    #: scans one run has and the other has not (same device and directory)
    scans_only_a: list[Scan] = field(default_factory=list)
    scans_only_b: list[Scan] = field(default_factory=list)


def compare(a: Analysis, b: Analysis, milestones: Iterable[str] = ()) -> Comparison:
    """What B touched that A did not (and back), what changed most, and when
    each run first read the files both read (or the named ``milestones``:
    paths or full names, matched against file names)."""
    ta, tb = a.traffic_by_name(), b.traffic_by_name()
    only_a = sorted(((n, t) for n, t in ta.items() if n not in tb), key=_by_bytes)
    only_b = sorted(((n, t) for n, t in tb.items() if n not in ta), key=_by_bytes)
    changed = [Change(n, ta[n], tb[n]) for n in ta.keys() & tb.keys()]
    changed = [c for c in changed if c.a.bytes != c.b.bytes or c.a.requests != c.b.requests]
    changed.sort(key=lambda c: (-abs(c.delta_bytes), c.name))
    fa, fb = a.first_reads(), b.first_reads()
    wanted = list(milestones)
    if wanted:
        names = [_match_name(want, fa.keys() | fb.keys()) or want for want in wanted]
    else:
        names = sorted(fa.keys() & fb.keys(), key=lambda n: (fa[n], n))
    rows = []
    for name in names:
        ta, tb = fa.get(name), fb.get(name)
        rows.append(Milestone(name, ta, tb, _since(ta, a.first_t), _since(tb, b.first_t)))
    sa, sb = a.scans(), b.scans()
    where_a = {(x.device, x.directory) for x in sa}
    where_b = {(x.device, x.directory) for x in sb}
    return Comparison(a, b, only_a, only_b, changed, rows,
                      [x for x in sa if (x.device, x.directory) not in where_b],
                      [x for x in sb if (x.device, x.directory) not in where_a])


def _since(t: float | None, first: float | None) -> float | None:
    return None if t is None or first is None else t - first


def _by_bytes(item: tuple[str, Traffic]) -> tuple[int, int, str]:
    return (-item[1].bytes, -item[1].requests, item[0])


def _match_name(want: str, names: Iterable[str]) -> str | None:
    """A full name ("f /dev/sda1 /etc/motd") or a path ("/etc/motd") -> the
    file's full name, if one matches."""
    names = sorted(names)
    if want in names:
        return want
    for n in names:
        if n.split(" ", 2)[-1] == want:
            return n
    return None
