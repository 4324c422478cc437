"""``diskwatch report``: the command line of the report package.

    diskwatch report FILE [--bmap MAP] [--json] [--svg OUT] [--png OUT]
    diskwatch report A --against B [--bmap MAP] [--against-bmap MAP]
    diskwatch report --from nbd-trdump|nbdkit-log|jsonl FILE ...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from itertools import islice

from ..errors import DiskwatchError
from ..text import safe_text
from .inputs import KINDS


def _positive(what: str):
    """An argparse type: a whole number, 1 or more, or a one-line error."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise argparse.ArgumentTypeError(f"expected {what} (1 or more), not {text!r}")
        return n
    return parse


def build_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskwatch report",
        description="What a recorded session read and wrote: top files and directories, "
                    "churn, first accesses, unmapped bytes, latency; compare two; draw one.")
    p.add_argument("file", help="a recording (diskwatch --record), or another server's log "
                                "(see --from)")
    p.add_argument("--bmap", metavar="MAP", help="block map naming the recording's offsets")
    p.add_argument("--from", dest="kind", choices=KINDS, default="auto",
                   help="what FILE is: diskwatch's recording, its JSON lines, nbd-server's "
                        "transaction log (nbd-trdump), nbdkit's log filter output "
                        "(default: decided by its first bytes)")
    p.add_argument("--against", metavar="B", help="compare with this recording: what B "
                                                  "touched that FILE did not, and back")
    p.add_argument("--against-bmap", metavar="MAP", help="block map of B (default: --bmap)")
    p.add_argument("--against-from", choices=KINDS, default="auto", help="what B is")
    p.add_argument("--milestone", action="append", default=[], metavar="PATH",
                   help="with --against: compare the time of the first read of this file "
                        "(repeatable; default: every file both read)")
    p.add_argument("--json", action="store_true",
                   help="JSON for scripts (schema diskwatch-report/1 or diskwatch-compare/1)")
    p.add_argument("--svg", metavar="OUT", help="draw offset over time, with partitions, the "
                                                "busiest files and throughput, into OUT")
    p.add_argument("--png", metavar="OUT", help="the same picture as PNG (needs rsvg-convert)")
    p.add_argument("--disk", type=_positive("a disk number"), default=1, metavar="K",
                   help="a recording of several disks: the disk --svg/--png draws (1, 2, ...; "
                        "default 1)")
    p.add_argument("--prefetch-list", metavar="LIST", help="write the ranges the recording "
                   "read, in order of first read, with their files (a boot's prefetch list "
                   "for --prefetch; the format: diskwatch/prefetch.py)")
    p.add_argument("--top", type=_positive("a number of rows"), default=10, metavar="N", help="rows per table (default 10)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    return p


def report_main(argv: list[str]) -> int:
    from ..bmap.index import BlockMap
    from .analysis import analyse, compare
    from .inputs import open_input
    from .render import compare_json, report_json, write_compare_text, write_json, write_text

    args = build_report_parser().parse_args(argv)
    recording = open_input(args.file, args.kind)
    exports = recording.recorded.header.exports if recording.recorded is not None else [""]
    if args.disk > len(exports):
        raise DiskwatchError(f"--disk {args.disk}: the recording has "
                             f"{len(exports)} disk{'s' if len(exports) > 1 else ''}")
    bmap_path = choose_map(recording, args.bmap)
    maps = recorded_maps(recording, args.bmap,
                         BlockMap.load(bmap_path) if bmap_path else None)
    if args.prefetch_list:
        return _write_prefetch_list(recording, maps, args.file, args.prefetch_list)
    analysis = analyse(recording, maps=maps, disks=_disk_maps(recording, bmap_path))
    out = sys.stdout
    if args.against:
        other = open_input(args.against, args.against_from)
        other_given = args.against_bmap or args.bmap
        other_path = choose_map(other, other_given)
        other_maps = recorded_maps(other, other_given,
                                   BlockMap.load(other_path) if other_path else None)
        comparison = compare(analysis, analyse(other, maps=other_maps,
                                               disks=_disk_maps(other, other_path)),
                             args.milestone)
        if args.json:
            write_json(compare_json(comparison), out)
        else:
            write_compare_text(comparison, out, args.top)
    elif args.json:
        write_json(report_json(analysis), out)
    elif not (args.svg or args.png):
        write_text(analysis, out, args.top)
    if args.svg or args.png:
        blockmap = _PictureMap(maps) if maps is not None else None
        disk = None
        if len(exports) > 1:
            from ..bmap.format import device_name
            export = exports[args.disk - 1]
            if args.disk > 1:
                blockmap = _disk_maps(recording, bmap_path).get(export)
            device = device_name(args.disk)
            disk = (export, f"disk {args.disk} of {len(exports)} ({device})", device)
        draw(recording, analysis, blockmap, args.svg, args.png, disk=disk)
    return 0


def build_import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diskwatch import",
        description="Turn another server's log into a diskwatch recording, for "
                    "diskwatch replay and report.")
    p.add_argument("kind", choices=[k for k in KINDS if k not in ("auto", "diskwatch")],
                   help="nbd-trdump: nbd-server's transaction log; nbdkit-log: nbdkit's log "
                        "filter output; jsonl: diskwatch's JSON lines")
    p.add_argument("file", help="the log to read")
    p.add_argument("-o", "--output", required=True, help="the recording to write")
    p.add_argument("--size", type=_positive("a size in bytes"), metavar="BYTES",
                   help="the disk's size, if the log does not say (default: the end of the "
                        "furthest request)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    return p


def import_main(argv: list[str]) -> int:
    """A foreign log as a recording: the same requests, the same columns.
    nbd-server logs no times: its requests are a second apart, in order,
    and the header says so (``extra.timed`` false)."""
    import time

    from ..recording.format import RecordingHeader
    from ..recording.writer import Recorder
    from .inputs import open_input

    args = build_import_parser().parse_args(argv)
    rec = open_input(args.file, args.kind)
    requests = rec.requests
    header = RecordingHeader(
        source=rec.source, size=args.size or rec.disk_size(),
        exports=sorted({r.export for r in requests}) or [""],
        started_wall=time.time(), started_monotonic=0.0,
        extra={"imported_from": rec.origin, "timed": rec.timed})
    recorder = Recorder(args.output, header)
    count = 0
    stream = iter(requests)
    # a frame each, as the recorder writes about a second of a flood
    while chunk := list(islice(stream, 50_000)):
        recorder.feed(chunk, None)
        recorder.flush()
        count += len(chunk)
    recorder.close()
    print(safe_text(f"diskwatch: {count} requests from {args.file} written to {args.output}"),
          file=sys.stderr)
    return 0


def _write_prefetch_list(recording, maps, origin: str, path: str) -> int:
    from ..prefetch import make_prefetch_list, write_prefetch_list
    ranges = make_prefetch_list(recording, maps.last() if maps is not None else None)
    write_prefetch_list(path, ranges, origin)
    total = sum(r.length for r in ranges)
    print(safe_text(f"diskwatch: {len(ranges):,} ranges ({total:,} bytes) written to {path}"),
          file=sys.stderr)
    return 0


def choose_map(recording, given: str | None) -> str | None:
    """The block map to name ``recording`` with (record.choose_map), told on stderr."""
    if not recording.bmap_hash:
        return given
    try:
        from ..recording.maps import choose_map as record_choose_map
    except ImportError:
        return given

    return record_choose_map(given, {"path": recording.bmap_path,
                                     "sha256": recording.bmap_hash}, _say)


def _say(text: str) -> None:
    # the recorded path is the recording's (someone else's file, perhaps): text, not escapes
    print(safe_text(f"diskwatch: {text}"), file=sys.stderr)


def recorded_maps(recording, given: str | None, first):
    """The maps naming ``recording``'s requests (record.maps_for): ``first``
    (the loaded map choose_map chose), then the maps the live session
    swapped in, unless a map was given; a MapSchedule, or None for no map."""
    if recording.recorded is None:  # another server's log: one map, if any
        if first is None:
            return None
        from ..recording.maps import MapSchedule
        return MapSchedule(first)
    from ..recording.maps import maps_for
    return maps_for(recording.recorded, given, first, _say)


class _PictureMap:
    """What the picture asks of a map, for a session that changed maps: the
    partitions of the last one, and a file's ranges from the last map that
    has it, else the first (a file the session deleted)."""

    def __init__(self, maps) -> None:
        self.first, self.last = maps.first, maps.last()

    def partitions(self):
        return self.last.partitions() or self.first.partitions()

    def ranges_of(self, obj):
        return self.last.ranges_of(obj) or self.first.ranges_of(obj)


def draw(recording, analysis, blockmap, svg_path: str | None, png_path: str | None,
         disk: tuple[str, str, str] | None = None) -> None:
    """``disk``: (export, words, device) of the disk pictured, a recording of several."""
    from ..units import format_bytes
    from .svg import PictureBins, busiest_files, render_svg, write_png

    size = recording.disk_size()
    export = None
    if disk is not None:
        export = disk[0]
        if export != recording.recorded.header.exports[0]:  # the header has the first's size
            size = _disk_extent(recording, export, blockmap)
    bins = PictureBins(size, width=0.05 if recording.timed else 1.0, export=export)
    requests = iter(recording.requests)
    while chunk := list(islice(requests, 65536)):  # bounded memory, C-level counting per chunk
        bins.add_requests(chunk)
    files = busiest_files((o, t.bytes) for o, t in analysis.objects.items()
                          if disk is None or _on_device(o.device, disk[2]))
    span = f"{analysis.duration:.1f} s" if recording.timed else "no times"
    title = (f"{recording.source}{', ' + disk[1] if disk else ''}: "
             f"{analysis.requests} requests, {span}, "
             f"read {format_bytes(analysis.read_bytes)}, "
             f"written {format_bytes(analysis.write_bytes)}")
    text = render_svg(bins, title=title, blockmap=blockmap, files=files, timed=recording.timed)
    if svg_path:
        _write_text_file(svg_path, text)
    if png_path:
        with tempfile.TemporaryDirectory(prefix="diskwatch-png-") as tmp:
            src = svg_path or os.path.join(tmp, "picture.svg")
            if not svg_path:
                _write_text_file(src, text)
            write_png(src, png_path)


def _on_device(device: str, disk: str) -> bool:
    """``/dev/sdb1`` is on ``/dev/sdb`` (an LV or md array of the VM: on every disk)."""
    return device.startswith(disk) or not device.startswith("/dev/sd")


def _disk_extent(recording, export: str, blockmap) -> int:
    """Another disk's size: its map's extent, else its furthest request."""
    ends = [end for _, end, _ in blockmap.partitions()] if blockmap is not None else []
    if ends:
        return max(ends)
    return max((r.offset + r.length for r in recording.requests if r.export == export),
               default=1)


def _write_text_file(path: str, text: str) -> None:
    from ..files import replace_atomically
    with replace_atomically(path) as f:  # never half-written, never through a planted link
        f.write(text.encode("utf-8", errors="replace"))


def _disk_maps(recording, bmap_path: str | None) -> dict:
    """A recording of several disks (its exports, in order): the other
    disks' maps from the same file, by their DISK index."""
    from ..bmap.index import BlockMap
    recorded = getattr(recording, "recorded", None)  # diskwatch's own recordings
    exports = recorded.header.exports if recorded is not None else [""]
    if not bmap_path or len(exports) < 2:
        return {}
    return {name: BlockMap.load(bmap_path, disk=k) for k, name in enumerate(exports[1:], 2)}
