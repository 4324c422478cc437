"""One picture of a session: where on the disk, when, read or written.

seekwatcher and iowatcher draw blktrace this way: time across, disk offset
down, reads and writes in two colours, and under it the throughput. Here
the partitions are bands with their names, and the busiest files are marked
where they lie, so the picture says *what* was read, not only where.

The picture is hand-written SVG (no plotting library: a few hundred lines
of text need none). Its size is bounded whatever the recording's length:
requests are binned into at most ``cols`` x ``rows`` cells (``PictureBins``),
and each row of cells becomes one path per colour and shade, so a million
requests cost no more elements than a thousand.

    +--------------------------------------------------------------+
    | title, legend                                                 |
    | offset |  cells: reads (blue), writes (red)      | partition  |
    | axis   |  over partition bands and file bands    | and file   |
    |        |                                          | labels    |
    |        +------------------------------------------+           |
    |        |  throughput: read and write, MiB/s       |           |
    |        +------------------------------------------+           |
    |           time axis (s, or request # without times)          |
    +--------------------------------------------------------------+
"""

from __future__ import annotations

import math
import shutil
import subprocess
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import compress, repeat
from operator import add, floordiv, itemgetter, mul, sub
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from ..errors import DiskwatchError
from ..events import Request
from ..pipeline.sink import SinkBase
from ..text import safe_text
from ..units import format_bytes
from ..wire import CMD_READ, WRITE_COMMANDS

READ_COLOUR = "#2166ac"
WRITE_COLOUR = "#d6402b"
FILE_BAND_COLOUR = "#f2b701"
PARTITION_FILLS = ("#eef2f6", "#e3e9ef")
SHADES = (0.35, 0.55, 0.78, 1.0)  # opacity by how many requests a cell holds (log scale)

_START, _OFFSET, _LENGTH = itemgetter(6), itemgetter(3), itemgetter(4)


class PictureBins(SinkBase):
    """Requests counted per (time column, offset row), bounded in memory.

    Columns start ``width`` seconds wide; when a request falls beyond the
    last column, neighbouring columns are merged pairwise (the width
    doubles), so any duration fits in ``cols`` columns without knowing it
    in advance. That is what lets the UI keep one of these for a live
    session and save it at any moment."""

    def __init__(self, size: int, rows: int = 150, cols: int = 320, width: float = 0.05,
                 export: str | None = None):
        self.size = max(1, size)
        #: with several disks, the export (disk) pictured; None: every request
        self.export = export
        self.rows = rows
        self.cols = cols
        self.width = width
        # per column: request counts per row, and bytes for the throughput panel
        self.reads = [array("I", bytes(4 * rows)) for _ in range(cols)]
        self.writes = [array("I", bytes(4 * rows)) for _ in range(cols)]
        self.read_bytes = array("Q", bytes(8 * cols))
        self.write_bytes = array("Q", bytes(8 * cols))
        self.used = 0  # columns in use (index of the last touched column + 1)
        #: time of column 0: the first request's whole second (a boot's
        #: kernel may run for seconds before it touches the disk; that is
        #: not worth half the picture)
        self.origin: float | None = None

    def add(self, t: float, command: int, offset: int, length: int) -> None:
        if command == CMD_READ:
            grid, nbytes = self.reads, self.read_bytes
        elif command in WRITE_COMMANDS:
            grid, nbytes = self.writes, self.write_bytes
        else:
            return
        if length <= 0:
            return
        if self.origin is None:
            self.origin = float(math.floor(t))
        t = max(0.0, t - self.origin)  # requests of other connections may come a bit earlier
        col = int(t / self.width)
        while col >= self.cols:
            self._halve()
            col = int(t / self.width)
        if col >= self.used:
            self.used = col + 1
        nbytes[col] += length
        rows, size = self.rows, self.size
        first = offset * rows // size
        if first >= rows:
            return
        last = min(rows - 1, (offset + length - 1) * rows // size)
        cells = grid[col]
        for row in range(first, last + 1):
            cells[row] += 1

    def add_requests(self, requests: Iterable[Request]) -> None:
        """``add`` each request. Live, this runs in the UI's thread for every
        batch, so the usual case (a request within one row) is counted with
        C-level map()s and a Counter, not Python code per request."""
        batch = [r for r in requests if r[4] > 0 and (r[2] == CMD_READ or r[2] in WRITE_COMMANDS)]
        if self.export is not None:
            batch = [r for r in batch if r[1] == self.export]
        if not batch:
            return
        if self.origin is None:
            self.origin = float(math.floor(batch[0][6]))
        latest = max(map(_START, batch)) - self.origin
        while int(latest / self.width) >= self.cols:
            self._halve()
        origin, per_col, rows, size = self.origin, 1.0 / self.width, self.rows, self.size
        cols = list(map(int, map(mul, map(sub, map(_START, batch), repeat(origin)),
                                 repeat(per_col))))
        if min(cols) < 0:  # requests of other connections may come a bit earlier
            cols = [max(0, c) for c in cols]
        offsets = list(map(_OFFSET, batch))
        lengths = list(map(_LENGTH, batch))
        firsts = list(map(floordiv, map(mul, offsets, repeat(rows)), repeat(size)))
        lasts = list(map(floordiv, map(mul, map(add, offsets, map(sub, lengths, repeat(1))),
                                       repeat(rows)), repeat(size)))
        writes = [r[2] != CMD_READ for r in batch]
        used = max(cols) + 1
        if used > self.used:
            self.used = used
        if cols[0] == used - 1 == min(cols):  # the usual batch: all in one column
            written = sum(compress(lengths, writes))
            self.write_bytes[cols[0]] += written
            self.read_bytes[cols[0]] += sum(lengths) - written
        else:
            for is_write, col, length in zip(writes, cols, lengths, strict=True):
                (self.write_bytes if is_write else self.read_bytes)[col] += length
        counts = Counter(zip(writes, cols, firsts, strict=True))
        if firsts != lasts:  # a request over several rows counts in each
            for is_write, col, first, last in zip(writes, cols, firsts, lasts, strict=True):
                for row in range(first + 1, min(last, rows - 1) + 1):
                    counts[(is_write, col, row)] += 1
        for (is_write, col, row), n in counts.items():
            if row < rows:
                (self.writes if is_write else self.reads)[col][row] += n

    # -- as a session Sink (diskwatch.pipeline.sink.Sink): the UI keeps one, so
    # -- it can save what has been seen so far

    def feed(self, batch: Sequence[Request], pieces: Any = None) -> None:
        self.add_requests(batch)


    def _halve(self) -> None:
        half = self.cols // 2
        for grid in (self.reads, self.writes):
            for i in range(half):
                a, b = grid[2 * i], grid[2 * i + 1]
                grid[i] = array("I", (x + y for x, y in zip(a, b, strict=True)))
            for i in range(half, self.cols):
                grid[i] = array("I", bytes(4 * self.rows))
        for series in (self.read_bytes, self.write_bytes):
            for i in range(half):
                series[i] = series[2 * i] + series[2 * i + 1]
            for i in range(half, self.cols):
                series[i] = 0
        self.width *= 2
        self.used = (self.used + 1) // 2


def busiest_files(traffic: Iterable[tuple[Any, int]], n: int = 6) -> list[tuple[Any, int]]:
    """The files to mark, from (object, bytes) pairs: the guest's busiest
    files, and the busiest of the filesystem's own structures (/$Journal)
    as the last of them, so that what the guest did is named first."""
    from .analysis import is_fs_structure
    files = sorted(((o, b) for o, b in traffic if getattr(o, "type", None) == "f" and b),
                   key=lambda ob: (-ob[1], str(ob[0])))
    guest = [ob for ob in files if not is_fs_structure(ob[0])]
    structures = [ob for ob in files if is_fs_structure(ob[0])]
    if not structures:
        return guest[:n]
    return guest[:n - 1] + structures[:1]


# --- drawing -----------------------------------------------------------------------------

W, H = 1100, 700
LEFT, RIGHT, TOP = 92, 250, 56
MAIN_H, GAP, RATE_H = 430, 34, 110
PLOT_W = W - LEFT - RIGHT


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(1, ticks)
    if raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _byte_step(size: int, ticks: int) -> int:
    raw = size / max(1, ticks)
    step = 1
    while step * 2 <= raw or step < 512:
        step *= 2
    return step


def _t(text: str) -> str:
    return escape(safe_text(text))


def render_svg(bins: PictureBins, *, title: str, blockmap: Any = None,
               files: Iterable[tuple[Any, int]] = (), timed: bool = True,
               max_files: int = 6) -> str:
    """The picture as SVG text. ``files``: (block-map object, bytes) of the
    busiest files, most first; the first ``max_files`` are marked."""
    out: list[str] = []
    o = out.append
    used = max(1, bins.used)
    scale = _TimeScale(bins, used)
    x_of = scale.x
    rh = MAIN_H / bins.rows
    rate_top = TOP + MAIN_H + GAP

    def y_of(offset: int) -> float:
        return TOP + min(1.0, offset / bins.size) * MAIN_H

    o(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
      f'viewBox="0 0 {W} {H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
      f'font-size="12">')
    o(f'<rect width="{W}" height="{H}" fill="white"/>')
    o(f'<text id="title" x="{LEFT}" y="22" font-size="15" font-weight="bold">{_t(title)}</text>')
    lx = LEFT
    for label, colour in (("read", READ_COLOUR), ("written", WRITE_COLOUR),
                          ("busiest files", FILE_BAND_COLOUR)):
        o(f'<rect class="legend" x="{lx}" y="32" width="12" height="12" fill="{colour}"/>'
          f'<text x="{lx + 17}" y="42">{label}</text>')
        lx += 30 + 8 * len(label)

    # partitions: bands behind everything, names at the right
    o('<g id="partitions">')
    labels: list[tuple[float, str, str, str]] = []  # (y, text, class, colour)
    if blockmap is not None:
        parts = [(s, e, obj) for s, e, obj in blockmap.partitions() if obj.type in "pl"]
        for i, (start, end, obj) in enumerate(parts):
            y0, y1 = y_of(start), y_of(end)
            o(f'<rect class="partition" data-name={quoteattr(safe_text(str(obj)))} '
              f'x="{LEFT}" y="{y0:.2f}" width="{PLOT_W}" height="{max(0.5, y1 - y0):.2f}" '
              f'fill="{PARTITION_FILLS[i % 2]}"><title>{_t(str(obj))}</title></rect>')
            labels.append(((y0 + y1) / 2, f"{obj.type} {obj.device}", "partition-label", "#555"))
    o("</g>")

    # busiest files: translucent bands where their blocks lie
    o('<g id="files">')
    for obj, nbytes in list(files)[:max_files] if blockmap is not None else ():
        ranges = _merge_for_pixels(blockmap.ranges_of(obj), bins.size / MAIN_H)
        if not ranges:
            continue
        name = obj.path or str(obj)
        d = "".join(f"M{LEFT},{y_of(s):.2f}h{PLOT_W}v{max(1.2, y_of(e) - y_of(s)):.2f}"
                    f"h-{PLOT_W}z" for s, e in ranges[:64])
        o(f'<path class="file-band" data-name={quoteattr(safe_text(str(obj)))} d="{d}" '
          f'fill="{FILE_BAND_COLOUR}" fill-opacity="0.28"><title>{_t(str(obj))} '
          f'({format_bytes(nbytes)})</title></path>')
        s, e = ranges[0]
        labels.append(((y_of(s) + y_of(e)) / 2, f"{name} ({format_bytes(nbytes)})",
                       "file-label", "#8a6100"))
    o("</g>")

    # the cells: one path per row, colour and shade
    o('<g id="requests">')
    peak = max((max(c) for grid in (bins.reads, bins.writes) for c in grid[:used]), default=0)
    for grid, colour, cls in ((bins.reads, READ_COLOUR, "reads"),
                              (bins.writes, WRITE_COLOUR, "writes")):
        o(f'<g class="{cls}" fill="{colour}">')
        for row in range(bins.rows):
            runs: dict[int, list[str]] = {}
            col = 0
            while col < used:
                level = _shade(grid[col][row], peak)
                if level < 0:
                    col += 1
                    continue
                start = col
                while col + 1 < used and _shade(grid[col + 1][row], peak) == level:
                    col += 1
                col += 1
                x = x_of(start)
                w = x_of(col) - x
                runs.setdefault(level, []).append(
                    f"M{x:.1f},{TOP + row * rh:.1f}h{w:.1f}v{rh:.1f}h{-w:.1f}z")
            for level, parts in runs.items():
                o(f'<path fill-opacity="{SHADES[level]}" d="{"".join(parts)}"/>')
        o("</g>")
    o("</g>")

    # frames and axes
    o(f'<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{MAIN_H}" fill="none" '
      f'stroke="#333"/>')
    o('<g id="offset-axis" class="axis">')
    step = _byte_step(bins.size, 8)
    off = 0
    while off <= bins.size:
        y = y_of(off)
        o(f'<line x1="{LEFT - 5}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" stroke="#333"/>'
          f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{format_bytes(off)}</text>')
        off += step
    o(f'<text transform="translate(14,{TOP + MAIN_H / 2}) rotate(-90)" text-anchor="middle">'
      f'disk offset</text>')
    o("</g>")

    _labels(o, labels)

    # throughput panel
    o(f'<g id="throughput"><rect x="{LEFT}" y="{rate_top}" width="{PLOT_W}" '
      f'height="{RATE_H}" fill="none" stroke="#333"/>')
    per = bins.width  # seconds (or, without times, requests) per column
    unit = "/s" if timed else " per request"
    series = [(bins.read_bytes, READ_COLOUR, "read-rate"),
              (bins.write_bytes, WRITE_COLOUR, "write-rate")]
    top_rate = max((max(s[:used]) for s, _, _ in series), default=0) / per
    if top_rate > 0:
        for s, colour, cls in series:
            pts = []
            for col in scale.visible_columns():
                y = rate_top + RATE_H - (s[col] / per) / top_rate * RATE_H
                pts.append(f"{x_of(col):.1f},{y:.1f} {x_of(col + 1):.1f},{y:.1f}")
            o(f'<polyline class="{cls}" fill="none" stroke="{colour}" stroke-width="1.3" '
              f'points="{" ".join(pts)}"/>')
    for frac in (0.0, 0.5, 1.0):
        y = rate_top + RATE_H - frac * RATE_H
        o(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
          f'{format_bytes(int(top_rate * frac))}{unit}</text>')
    o(f'<text transform="translate(14,{rate_top + RATE_H / 2}) rotate(-90)" '
      f'text-anchor="middle">throughput</text></g>')

    # time axis, under both panels
    o('<g id="time-axis" class="axis">')
    bottom = rate_top + RATE_H
    origin = bins.origin or 0.0
    tstep = _nice_step(scale.shown * bins.width, 10)
    for c0, c1 in scale.segments():
        t0 = origin + c0 * bins.width
        k = math.ceil(t0 / tstep - 1e-9)
        while k * tstep <= origin + c1 * bins.width + 1e-9:
            x = x_of(c0 + (k * tstep - t0) / bins.width)
            for y0 in (TOP + MAIN_H, bottom):
                o(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 5}" stroke="#333"/>')
            o(f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{k * tstep:g}</text>')
            k += 1
    o(f'<text x="{LEFT + PLOT_W / 2}" y="{bottom + 36}" text-anchor="middle">'
      f'{"time (s)" if timed else "request # (this log has no times)"}</text>')
    o("</g>")
    # where idle time was cut out: a gap in both panels, saying how long
    o('<g id="time-breaks">')
    for c0, c1 in scale.breaks:
        x0, x1 = x_of(c0), x_of(c1)
        idle = (c1 - c0) * bins.width
        idle_text = f"{idle:.0f} s idle" if timed else f"{idle:.0f} requests"
        for y0, h in ((TOP, MAIN_H), (rate_top, RATE_H)):
            o(f'<rect class="time-break" x="{x0 + 3:.1f}" y="{y0 - 4}" '
              f'width="{x1 - x0 - 6:.1f}" height="{h + 8}" fill="white"/>'
              f'<path d="M{x0 + 1:.1f},{y0 + h + 6}l6,-12M{x1 - 7:.1f},{y0 + h + 6}l6,-12" '
              f'stroke="#333"/>')
        o(f'<text class="time-break-label" transform="translate({(x0 + x1) / 2 + 4:.1f},'
          f'{TOP + MAIN_H / 2}) rotate(-90)" text-anchor="middle" fill="#555">'
          f'{escape(idle_text)}</text>')
    o("</g>")
    o("</svg>")
    return "\n".join(out) + "\n"


class _TimeScale:
    """Column -> x, with long idle stretches cut out of the time axis.

    A boot reads its disk for seconds after tens of seconds in firmware and
    kernel; drawn to scale, the reading is a sliver at the right. An idle
    run of at least an eighth of the columns (and ``MIN_BREAK`` of them)
    becomes a ``BREAK_PX`` gap, labelled with how long it was."""

    BREAK_PX = 24
    MIN_BREAK = 8  # columns
    MAX_BREAKS = 3

    def __init__(self, bins: PictureBins, used: int) -> None:
        idle = [not (bins.read_bytes[c] or bins.write_bytes[c]) for c in range(used)]
        # Only stretches of a quarter of the whole: a churn's pauses between
        # bursts are its rhythm, and stay.
        longest = max(self.MIN_BREAK, used // 4)
        runs: list[tuple[int, int]] = []
        c = 0
        while c < used:
            if idle[c]:
                start = c
                while c < used and idle[c]:
                    c += 1
                if c - start >= longest and c < used:
                    runs.append((start, c))
            else:
                c += 1
        runs.sort(key=lambda r: r[0] - r[1])
        self.breaks: list[tuple[int, int]] = sorted(runs[:self.MAX_BREAKS])
        self.used = used
        self.shown = used - sum(e - s for s, e in self.breaks)
        self.cw = (PLOT_W - self.BREAK_PX * len(self.breaks)) / max(1, self.shown)

    def x(self, col: float) -> float:
        x, prev = float(LEFT), 0
        for start, end in self.breaks:
            if col <= start:
                break
            if col < end:  # inside a break: across its gap
                return x + (start - prev) * self.cw + self.BREAK_PX * (col - start) / (end - start)
            x += (start - prev) * self.cw + self.BREAK_PX
            prev = end
        return x + (col - prev) * self.cw

    def segments(self) -> list[tuple[int, int]]:
        """The column ranges drawn to scale, between the breaks."""
        out, prev = [], 0
        for start, end in self.breaks:
            out.append((prev, start))
            prev = end
        out.append((prev, self.used))
        return out

    def visible_columns(self) -> Iterable[int]:
        for c0, c1 in self.segments():
            yield from range(c0, c1)


def _shade(count: int, peak: int) -> int:
    if count <= 0:
        return -1
    if peak <= 1:
        return len(SHADES) - 1
    level = int(math.log(count) / math.log(peak) * len(SHADES))
    return min(len(SHADES) - 1, level)


def _merge_for_pixels(ranges: list[tuple[int, int]], bytes_per_px: float
                      ) -> list[tuple[int, int]]:
    """Merge ranges closer than a pixel: a fragmented file is a few bands, not thousands."""
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if out and s - out[-1][1] < bytes_per_px:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _labels(o, labels: list[tuple[float, str, str, str]]) -> None:
    """Names at the right of the plot, pushed apart so none overlap, each
    with a leader to where it belongs."""
    o('<g id="labels">')
    labels.sort()
    placed: list[float] = []
    for y, _, _, _ in labels:
        placed.append(max(y, placed[-1] + 13) if placed else max(y, TOP + 6))
    # if the stack ran off the bottom, push it back up
    overflow = (placed[-1] - (TOP + MAIN_H)) if placed else 0
    if overflow > 0:
        placed = [p - overflow for p in placed]
        for i in range(len(placed) - 2, -1, -1):
            placed[i] = min(placed[i], placed[i + 1] - 13)
    x = LEFT + PLOT_W
    for (y, text, cls, colour), ly in zip(labels, placed, strict=True):
        shown = text if len(text) <= 34 else "…" + text[-33:]
        o(f'<line x1="{x}" y1="{y:.1f}" x2="{x + 12}" y2="{ly:.1f}" stroke="{colour}" '
          f'stroke-width="0.8"/><text class="{cls}" x="{x + 15}" y="{ly + 4:.1f}" '
          f'fill="{colour}">{_t(shown)}</text>')
    o("</g>")


def write_png(svg_path: str, png_path: str) -> None:
    """Convert with rsvg-convert (librsvg2-bin); the PNG is written as the
    SVG is (all at once, never through a planted link)."""
    from ..files import replace_atomically
    tool = shutil.which("rsvg-convert")
    if tool is None:
        raise DiskwatchError("--png needs rsvg-convert: apt-get install librsvg2-bin")
    r = subprocess.run([tool, "-b", "white", svg_path], capture_output=True)
    if r.returncode != 0 or not r.stdout:
        raise DiskwatchError("rsvg-convert failed: "
                             + (r.stderr.decode(errors="replace").strip() or str(r.returncode)))
    with replace_atomically(png_path) as f:
        f.write(r.stdout)
