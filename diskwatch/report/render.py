"""Analyses as text for a person and as JSON for scripts.

JSON schema ``diskwatch-report/1`` (``diskwatch report FILE --json``)::

    {"schema": "diskwatch-report/1",
     "source": str, "origin": "diskwatch"|"jsonl"|"nbd-trdump"|"nbdkit-log",
     "timed": bool,          # false: times are request positions (0, 1, 2...), not seconds
     "size": int,            # bytes of the disk (or the furthest request's end)
     "mapped": bool,         # a block map named the requests
     "truncated": bool,      # the file was cut short (crash, kill -9, still being written)
     "requests": int, "errors": int, "duration": float,
     "read_bytes": int, "write_bytes": int,
     "commands": {NAME: {"requests": int, "bytes": int}},          # read, write, flush, zero...
     "objects": [OBJECT],        # every file and directory touched, most bytes first
     "directories": [SUBTREE],   # every directory, traffic summed over its subtree
     "churn": [CHURN],           # most write bursts first
     "scans": [SCAN],            # sweeps of reads over many files, by start
     "lifetimes": [LIFETIME],    # created and deleted during the session, by "gone_by"
     "lifetime_counts": {"deaths": int, "renames": int, "untracked": int, "alive": int},
     "timeline": [{"t": float, "op": "read"|"write", "name": str}],  # first access, in order
     "unmapped": TRAFFIC,        # bytes no range of the map covers
     "partition_only": TRAFFIC,  # bytes named only by a partition/LV/disk (metadata, free space)
     "named_late": int,          # write bytes their own map did not name, named by the last map
     "latency": [{"type": str, "op": str, "count": int,
                  "p50": float, "p90": float, "p99": float, "max": float}],  # seconds
     "regions": [TRAFFIC + {"start": int, "end": int}],   # without a map: 1 MiB regions,
                                                          # where requests start, most bytes first
     "maps": [{"at": int, "t": float, "why": str}]}   # maps the live session swapped in
                                                      # (kept in the recording), each naming
                                                      # the requests from index "at" on
    TRAFFIC = {"reads": int, "read_bytes": int, "writes": int, "write_bytes": int}
    OBJECT  = TRAFFIC + {"name": str, "type": "f"|"d", "device": str, "path": str,
                         "fs_structure": bool,   # /$Journal, /$MFT, PATH:$extents
                         "first_t": float, "first_op": str, "first_read_t": float|null,
                         "journal_bytes": int,   # journal writes that carried its metadata
                         "latency": {"requests": int, "p50": float, "p99": float}|null}
                         # seconds, of the requests that touched it (at most 1024 sampled)
    SUBTREE = TRAFFIC + {"device": str, "path": str}
    CHURN   = {"name": str, "type": str, "fs_structure": bool,   # /$Journal, /$MFT, PATH:$extents
               "bursts": int, "writes": int, "write_bytes": int,
               "first_t": float, "last_t": float, "period": float|null, "per_minute": float|null}
    # churn: the guest's files and directories first, then the filesystem's structures
    SCAN    = {"device": str, "directory": str,  # the deepest directory holding all its files
               "files": int, "directories": int, # files read, directories they were in
               "bytes": int,                     # what was read of those files
               "start": float, "duration": float, "rate": float}   # rate: files a second
    # a scan: >= 20 files in >= 2 directories first read less than 2 s apart, taken
    # directory by directory (see diskwatch/scans.py)
    LIFETIME = TRAFFIC + {"name": str, "type": "f"|"d", "device": str, "path": str,
               "born": float,        # its first request (or the map that first had it)
               "gone_by": float,     # the first map without it: the guest deleted it before
               "lived": float,       # gone_by - born: an upper bound
               "last_access": float, "renamed_from": str|null}  # the path it was made as
    # created: in a map the session swapped in and not in the one before, its
    # first request a write (see diskwatch/lifetimes.py); "alive": created, still there

``diskwatch report A --against B --json`` gives ``diskwatch-compare/1``::

    {"schema": "diskwatch-compare/1",
     "a": SUMMARY, "b": SUMMARY,     # SUMMARY: the report's top-level scalars above
     "only_a": [TRAFFIC + {"name"}], "only_b": [TRAFFIC + {"name"}],
     "changed": [{"name": str, "a": TRAFFIC, "b": TRAFFIC, "delta_bytes": int}],
     "scans_only_a": [SCAN], "scans_only_b": [SCAN],   # by device and directory
     "milestones": [{"name": str, "a": float|null, "b": float|null, "delta": float|null,
                     # the same counted from each run's first request
                     "a_from_first": float|null, "b_from_first": float|null,
                     "delta_from_first": float|null}]}

Names in JSON are the block map's, unchanged (JSON escapes what it must);
in text and SVG every name goes through ``safe_text`` (diskwatch/text.py)
first: a file name from a guest must not be able to move the cursor or retitle the terminal.
"""

from __future__ import annotations

import json
from typing import IO, Any

from ..text import safe_text
from ..traffic import Traffic
from ..units import format_bytes, format_duration
from .analysis import Analysis, Comparison, is_fs_structure

SCHEMA = "diskwatch-report/1"
COMPARE_SCHEMA = "diskwatch-compare/1"


def _when(t: float | None, timed: bool) -> str:
    if t is None:
        return "-"
    return f"{t:8.3f} s" if timed else f"#{int(t):<8d}"


def _traffic_cols(t: Traffic) -> str:
    return (f"{format_bytes(t.read_bytes):>10} {t.reads:>7}  "
            f"{format_bytes(t.write_bytes):>10} {t.writes:>7}")


_TRAFFIC_HEAD = f"{'read':>10} {'reqs':>7}  {'written':>10} {'reqs':>7}"


def write_text(a: Analysis, out: IO[str], top: int = 10) -> None:
    w = out.write
    w(f"diskwatch report: {safe_text(a.source)}\n")
    if a.truncated:
        w("  (the file was cut short: a crash, kill -9, or still being written; "
          "read up to its end)\n")
    span = (f"{a.duration:.2f} s" if a.timed
            else "no times in this log: positions are request order")
    cmds = ", ".join(f"{name} {n}" + (f" ({format_bytes(b)})" if name in ("read", "write") else "")
                     for name, (n, b) in a.by_command.items())
    w(f"  {a.requests} requests, {span}: {cmds}" + (f"; {a.errors} failed" if a.errors else "")
      + "\n")
    w(f"  disk {format_bytes(a.size)}; read {format_bytes(a.read_bytes)}, "
      f"written {format_bytes(a.write_bytes)}\n")
    if a.maps:
        whens = ", ".join(f"{m['t']:.2f} s ({safe_text(m['why'])})" for m in a.maps[:5])
        more = f" and {len(a.maps) - 5} more" if len(a.maps) > 5 else ""
        w(f"  named as live: the block map changed at {whens}{more}\n")
    if not a.mapped:
        w("  no block map: give --bmap MAP to name files, directories and partitions\n")
        _regions(a, w, top)
    else:
        _top_tables(a, w, top)
        _slowest(a, w, top)
        _churn(a, w, top)
        _scans(a, w, top)
        _lifetime_rows(a, w, top)
        _timeline(a, w, top)
        _coverage(a, w)
    _latency(a, w)


def _top_tables(a: Analysis, w, top: int) -> None:
    for title, rows in (
        ("Files, most bytes read", a.top_files("read_bytes", top)),
        ("Files, most bytes written", a.top_files("write_bytes", top)),
        ("Files, most requests", a.top_files("requests", top)),
        ("Directories (whole subtree), most bytes read", a.top_dirs("read_bytes", top)),
        ("Directories (whole subtree), most bytes written", a.top_dirs("write_bytes", top)),
        ("The filesystem's own structures (/$Journal, /$MFT...), most bytes",
         a.top_files("bytes", top, fs_structures=True)),
    ):
        if not rows and "own structures" in title:
            continue
        w(f"\n{title}\n")
        if not rows:
            w("  (none)\n")
            continue
        w(f"  {_TRAFFIC_HEAD}  name\n")
        for name, t in rows:
            w(f"  {_traffic_cols(t)}  {safe_text(name)}\n")


def _latency_json(t) -> dict | None:
    pct = t.latency_percentiles()
    if pct is None:
        return None
    return {"requests": t.latency_seen, "p50": pct[0], "p99": pct[1]}


def _slowest(a: Analysis, w, top: int) -> None:
    rows = a.slowest_files(top)
    if not rows:
        return
    w("\nFiles, slowest requests (latency of the requests that touched each file)\n")
    w(f"  {'p50':>9} {'p99':>9} {'reqs':>7}  name\n")
    for name, t, p50, p99 in rows:
        w(f"  {format_duration(p50):>9} {format_duration(p99):>9} {t.latency_seen:>7}  "
          f"{safe_text(name)}\n")


def _regions(a: Analysis, w, top: int) -> None:
    for title, by in (("Busiest 1 MiB regions, by bytes", "bytes"),
                      ("Busiest 1 MiB regions, by requests", "requests")):
        rows = a.top_regions(by, top)
        if not rows:
            continue
        w(f"\n{title}\n  {_TRAFFIC_HEAD}  region\n")
        for start, end, t in rows:
            w(f"  {_traffic_cols(t)}  {start:#x}-{end:#x}\n")


def _churn(a: Analysis, w, top: int) -> None:
    every_row = a.churn()
    files = [c for c in every_row if not c.fs_structure]
    structures = [c for c in every_row if c.fs_structure]
    w(f"\nChurn: files and directories written again and again (write bursts; "
      f"{len(files)} in all)\n")
    if not files:
        w("  (none written in 3 bursts or more)\n")
    else:
        _churn_rows(a, w, files[:top])
    if structures:
        w(f"\nThe filesystem's own structures written again and again ({len(structures)}; "
          "a consequence of the writes above)\n")
        _churn_rows(a, w, structures[:top])


def _churn_rows(a: Analysis, w, rows) -> None:
    unit = "s" if a.timed else "req"
    w(f"  {'bursts':>6} {'writes':>7} {'written':>10} {'every':>10} {'per min':>8}  name\n")
    for c in rows:
        every = f"{c.period:.3f} {unit}" if c.period is not None else "-"
        rate = f"{c.per_minute:.1f}" if c.per_minute is not None and a.timed else "-"
        w(f"  {c.bursts:>6} {c.writes:>7} {format_bytes(c.write_bytes):>10} {every:>10} "
          f"{rate:>8}  {safe_text(c.name)}\n")


def _scans(a: Analysis, w, top: int) -> None:
    scans = a.scans()
    w(f"\nScans: sweeps of reads over many files, directory by directory ({len(scans)})\n")
    if not scans:
        w("  (none)\n")
        return
    _scan_rows(a, w, scans[:top])


def _scan_rows(a: Analysis, w, scans) -> None:
    unit = "s" if a.timed else "req"
    w(f"  {'start':>10} {'for':>9} {'files':>6} {'dirs':>5} {'read':>10} {'files/s':>8}  "
      "directory\n")
    for x in scans:
        rate = f"{x.rate:.1f}" if a.timed else "-"
        w(f"  {_when(x.start, a.timed):>10} {x.duration:>7.2f} {unit:<1} {x.files:>6} "
          f"{x.directories:>5} {format_bytes(x.bytes):>10} {rate:>8}  "
          f"{safe_text(x.device)} {safe_text(x.directory)}\n")


def _lifetimes(a: Analysis) -> list:
    return list(a.lifetimes.gone) if a.lifetimes is not None else []


def _lifetime_counts(a: Analysis) -> dict[str, int]:
    lives = a.lifetimes
    if lives is None:
        return {"deaths": 0, "renames": 0, "untracked": 0, "alive": 0}
    return {"deaths": lives.deaths, "renames": lives.renames, "untracked": lives.untracked,
            "alive": lives.alive}


def _lifetime_rows(a: Analysis, w, top: int) -> None:
    lives = _lifetimes(a)
    if not a.maps:
        return  # one map named it all: nothing was seen created
    w(f"\nCreated and deleted during the session ({len(lives)}; lived: until the first "
      "map without it)\n")
    if not lives:
        w("  (none)\n")
        return
    w(f"  {'born':>10} {'lived':>9} {'written':>10} {'read':>10}  name\n")
    for life in sorted(lives, key=lambda x: x.born)[:max(top, 20)]:
        made = (f"  (made as {safe_text(life.renamed_from.path or '')})"
                if life.renamed_from is not None else "")
        w(f"  {_when(life.born, a.timed):>10} {'<=' + format_duration(life.lived):>9} "
          f"{format_bytes(life.write_bytes):>10} {format_bytes(life.read_bytes):>10}  "
          f"{safe_text(str(life.obj))}{made}\n")


def _timeline(a: Analysis, w, top: int) -> None:
    rows = a.timeline()
    limit = max(top * 4, 20)
    w(f"\nFirst access: what was touched, in order ({len(rows)} files and directories"
      + (f", the first {limit}" if len(rows) > limit else "") + ")\n")
    for t, op, name in rows[:limit]:
        w(f"  {_when(t, a.timed)}  {op:<5}  {safe_text(name)}\n")


def _coverage(a: Analysis, w) -> None:
    w("\nBytes the map does not name\n")
    w(f"  {_TRAFFIC_HEAD}\n")
    w(f"  {_traffic_cols(a.unmapped)}  not covered by any range of the map\n")
    w(f"  {_traffic_cols(a.partition_only)}  named only by a partition/LV/disk "
      "(filesystem metadata, journal, free space)\n")
    if a.named_late:
        w(f"  {format_bytes(a.named_late)} written before a live remap named them: given to "
          "their files (named late)\n")


def _latency(a: Analysis, w) -> None:
    rows = a.latency_rows()
    if not rows:
        return
    if not any(r.max for r in rows):
        w("\nLatency: not in this log (it has no times)\n")
        return
    w("\nLatency per object type (most specific object of each request)\n")
    w(f"  {'type':<10} {'op':<12} {'count':>7} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}\n")
    for r in rows:
        w(f"  {r.type:<10} {r.op:<12} {r.count:>7} {format_duration(r.p50):>9} {format_duration(r.p90):>9} "
          f"{format_duration(r.p99):>9} {format_duration(r.max):>9}\n")


# --- JSON ------------------------------------------------------------------------------


def _summary(a: Analysis) -> dict[str, Any]:
    return {"source": a.source, "origin": a.origin, "timed": a.timed, "size": a.size,
            "mapped": a.mapped, "truncated": a.truncated, "requests": a.requests,
            "errors": a.errors, "duration": a.duration, "read_bytes": a.read_bytes,
            "write_bytes": a.write_bytes}


def report_json(a: Analysis) -> dict[str, Any]:
    objects = []
    for obj, t in sorted(((o, t) for o, t in a.objects.items() if o.type in "fd"),
                         key=lambda ot: (-ot[1].bytes, str(ot[0]))):
        objects.append({"name": str(obj), "type": obj.type, "device": obj.device,
                        "path": obj.path, "fs_structure": is_fs_structure(obj), **t.as_dict(), "first_t": t.first_t,
                        "first_op": t.first_op, "first_read_t": t.first_read_t,
                        "journal_bytes": t.journal_bytes, "latency": _latency_json(t)})
    dirs = [{"device": dev, "path": path, **t.as_dict()}
            for (dev, path), t in sorted(a.dirs.items(), key=lambda kv: (-kv[1].bytes, kv[0]))]
    return {
        "schema": SCHEMA, **_summary(a),
        "commands": {name: {"requests": n, "bytes": b} for name, (n, b) in a.by_command.items()},
        "objects": objects,
        "directories": dirs,
        "churn": [vars(c) for c in a.churn()],
        "scans": [x.as_dict() for x in a.scans()],
        "lifetimes": [life.as_dict() for life in _lifetimes(a)],
        "lifetime_counts": _lifetime_counts(a),
        "timeline": [{"t": t, "op": op, "name": name} for t, op, name in a.timeline()],
        "unmapped": a.unmapped.as_dict(),
        "partition_only": a.partition_only.as_dict(),
        "named_late": a.named_late,
        "latency": [vars(r) for r in a.latency_rows()],
        "regions": [{"start": start, "end": end, **t.as_dict()}
                    for start, end, t in a.top_regions("bytes", len(a.regions))],
        "maps": a.maps,
    }


def compare_json(c: Comparison) -> dict[str, Any]:
    return {
        "schema": COMPARE_SCHEMA, "a": _summary(c.a), "b": _summary(c.b),
        "only_a": [{"name": n, **t.as_dict()} for n, t in c.only_a],
        "only_b": [{"name": n, **t.as_dict()} for n, t in c.only_b],
        "changed": [{"name": ch.name, "a": ch.a.as_dict(), "b": ch.b.as_dict(),
                     "delta_bytes": ch.delta_bytes} for ch in c.changed],
        "scans_only_a": [x.as_dict() for x in c.scans_only_a],
        "scans_only_b": [x.as_dict() for x in c.scans_only_b],
        "milestones": [{"name": m.name, "a": m.a, "b": m.b, "delta": m.delta,
                        "a_from_first": m.a_from_first, "b_from_first": m.b_from_first,
                        "delta_from_first": m.delta_from_first}
                       for m in c.milestones],
    }


def write_json(doc: dict[str, Any], out: IO[str]) -> None:
    json.dump(doc, out, indent=1)
    out.write("\n")


# --- comparison as text ------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    if a == 0:
        return "-" if b == 0 else "new"
    return f"{b / a:.2f}x"


def write_compare_text(c: Comparison, out: IO[str], top: int = 10) -> None:
    w = out.write
    a, b = c.a, c.b
    w(f"diskwatch compare\n  A: {safe_text(a.source)}\n  B: {safe_text(b.source)}\n\n")
    w(f"  {'':<16} {'A':>12} {'B':>12} {'B/A':>8}\n")
    for label, x, y, fmt in (
        ("requests", a.requests, b.requests, str),
        ("bytes read", a.read_bytes, b.read_bytes, format_bytes),
        ("bytes written", a.write_bytes, b.write_bytes, format_bytes),
        ("failed", a.errors, b.errors, str),
    ):
        w(f"  {label:<16} {fmt(x):>12} {fmt(y):>12} {_ratio(x, y):>8}\n")
    if a.timed and b.timed:
        w(f"  {'duration':<16} {a.duration:>10.2f} s {b.duration:>10.2f} s "
          f"{_ratio(a.duration, b.duration):>8}\n")
    if not (a.mapped and b.mapped):
        w("\n  no block map for both: give --bmap (and --against-bmap) to compare objects\n")
        return
    for title, rows in (("Touched by B only", c.only_b), ("Touched by A only", c.only_a)):
        total = Traffic()
        for _, t in rows:
            total.add(t)
        w(f"\n{title}: {len(rows)} files and directories, {format_bytes(total.read_bytes)} "
          f"read, {format_bytes(total.write_bytes)} written\n")
        if rows:
            w(f"  {_TRAFFIC_HEAD}  name\n")
        for name, t in rows[:top]:
            w(f"  {_traffic_cols(t)}  {safe_text(name)}\n")
    for title, scans in (("Scans in B only", c.scans_only_b), ("Scans in A only", c.scans_only_a)):
        w(f"\n{title} ({len(scans)})\n")
        if scans:
            _scan_rows(b if "B" in title else a, w, scans[:top])
    w(f"\nChanged most (bytes read + written, B - A; {len(c.changed)} changed)\n")
    for ch in c.changed[:top]:
        sign = "+" if ch.delta_bytes >= 0 else "-"
        w(f"  {sign}{format_bytes(abs(ch.delta_bytes)):>10}  A {format_bytes(ch.a.bytes):>10} "
          f"in {ch.a.requests:>5}  B {format_bytes(ch.b.bytes):>10} in {ch.b.requests:>5}  "
          f"{safe_text(ch.name)}\n")
    rows = c.milestones
    timed = a.timed and b.timed
    w(f"\nMilestones: first read of the same file ({len(rows)}); B - A, and B - A counted "
      "from each run's first request\n")
    if rows:
        w(f"  {'A':>10}  {'B':>10}  {'B - A':>10}  {'from first':>10}  name\n")
    shown = rows if len(rows) <= top else rows[: top // 2] + [None] + rows[-(top - top // 2):]

    def signed(d: float | None) -> str:
        return "-" if d is None else (f"{d:+.3f} s" if timed else f"{d:+.0f}")
    for m in shown:
        if m is None:
            w(f"  {'...':>10}\n")
            continue
        w(f"  {_when(m.a, a.timed):>10}  {_when(m.b, b.timed):>10}  {signed(m.delta):>10}  "
          f"{signed(m.delta_from_first):>10}  {safe_text(m.name)}\n")
