"""The live trace: one line per run of requests to the same object.

``TraceModel`` is plain Python (no Textual): it turns attributed requests into
``TraceLine``s, folding consecutive hits on the same object with the same
operation into one line whose count goes up, and keeps at most ``cap`` lines.
``TraceView`` is a line-API scroll view over the model's *visible* lines (the
ones the current filter lets through); only the rows on screen are rendered.

Under a flood nobody can read thousands of new lines a tick, and making them
is most of the UI thread's work: ``TraceModel.add`` lists at most ``per_add``
requests a call (the newest). Older ones that continue the last line are
still folded into it; the rest become one marker line saying how many
requests (and bytes) were not listed. Counters elsewhere see every request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter
from typing import Any

from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.reactive import var
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..events import COMMAND_NAMES, Request
from ..text import safe_text
from ..units import format_bytes_compact
from .styles import OBJECT_TYPE_CLASSES, OBJECT_TYPES, part_style, part_styles

READ, WRITE = 0, 1

#: the coloured parts of a trace line: component classes ``trace--PART`` of
#: TraceView (colours in app.tcss), an operation's ``trace--op-NAME``, an
#: object type's ``object-type--T`` (shared with the top-objects table)
OPS = ("read", "write", "trim", "zero", "flush", "cache", "block_status", "disc")
PARTS = ("time", "count", "device", "skipped", "error", "dim")


@dataclass(slots=True)
class TraceLine:
    t: float  # seconds since the session started, of the first request
    op: str
    obj: Any  # a BmapObject, or None (offsets only)
    start: int
    end: int
    nbytes: int
    count: int = 1
    error: int = 0
    skipped: int = 0  # a marker line: this many requests were not listed
    #: a session of several disks: the disk (/dev/sdb), where the object's
    #: name does not say it (an LV or array spanning disks, no object)
    disk: str = ""

    @property
    def type(self) -> str | None:
        return self.obj.type if self.obj is not None else None

    def label(self) -> str:
        if self.skipped:
            return f"{self.skipped:,} requests not listed (too many to follow)"
        if self.obj is not None:
            return safe_text(str(self.obj))
        if self.end <= self.start:
            return ""
        return f"@ {self.start:#x}-{self.end:#x}"


#: a predicate over trace lines (None = everything passes)
LineFilter = Callable[[TraceLine], bool] | None


class TraceModel:
    """Folds attributed requests into lines; bounded memory."""

    def __init__(self, started: float = 0.0, cap: int = 5000, per_add: int = 1000,
                 disks: dict[str, str] | None = None) -> None:
        """``disks``: export -> device, when the session has several."""
        self.started = started
        self.disks = disks
        self.cap = cap
        self.per_add = per_add
        self.lines: deque[TraceLine] = deque(maxlen=cap)
        self.visible: deque[TraceLine] = deque(maxlen=cap)
        self.filter: LineFilter = None
        self.requests = 0
        self.skipped = 0  # requests not listed (in marker lines)
        self.version = 0  # bumps whenever lines change, so views know to repaint

    def clear(self) -> None:
        self.lines.clear()
        self.visible.clear()
        self.version += 1

    def set_filter(self, keep: LineFilter) -> None:
        self.filter = keep
        self.visible = deque(
            (ln for ln in self.lines if keep is None or keep(ln)), maxlen=self.cap
        )
        self.version += 1

    def _push(self, line: TraceLine) -> None:
        self.lines.append(line)
        if self.filter is None or self.filter(line):
            self.visible.append(line)

    def add(self, attributed: Sequence[tuple[Request, list | None]]) -> int:
        """Add (request, pieces) pairs as Stats.add returns them; returns how
        many new lines were made (the rest were folded into the last line)."""
        n = len(attributed)
        self.requests += n
        skip = n - self.per_add if self.per_add and n > self.per_add else 0
        made = self._fold(attributed, 0, skip, listing=False) if skip else 0
        made += self._fold(attributed, skip, n, listing=True)
        self.version += 1
        return made

    def _fold(self, attributed: Sequence[tuple[Request, list | None]], first: int, end: int,
              listing: bool) -> int:
        """Fold requests [first, end) into lines. Not listing: fold into the
        last line while they continue it, then put all the rest in a marker."""
        lines = self.lines
        started = self.started
        names = COMMAND_NAMES
        made = 0
        disks = self.disks
        disk = ""
        items = islice(attributed, first, end) if first or end < len(attributed) else attributed
        for k, (r, pieces) in enumerate(items, first):
            cmd = r[2]
            op = names[cmd] if cmd < len(names) else str(cmd)
            if not pieces:  # no map, or no length
                offset, length = r[3], r[4]
                pieces = ((offset, offset + length, None),) if length else ((0, 0, None),)
            if disks is not None:
                device = disks.get(r[1], "")
            for j, (start, end_, obj) in enumerate(pieces):
                if disks is not None:
                    disk = "" if obj is not None and obj.names_disk(device) else device
                last = lines[-1] if lines else None
                if last is not None and last.op == op and last.obj == obj and last.disk == disk and (
                    obj is not None
                    # without an object, fold sequential runs and exact repeats
                    or last.end == start
                    or (last.start == start and last.end == end_)
                ) and not last.skipped:
                    last.count += 1
                    last.nbytes += end_ - start
                    if obj is None:
                        if start < last.start:
                            last.start = start
                        if end_ > last.end:
                            last.end = end_
                    if r[8]:
                        last.error = r[8]
                    continue
                if not listing:
                    rest = islice(attributed, k + 1, end)
                    nbytes = sum(e - s for s, e, _ in pieces[j:]) + sum(
                        map(itemgetter(4), map(itemgetter(0), rest)))
                    self._skip(r[6] - started, end - k, nbytes)
                    return made + 1
                self._push(TraceLine(r[6] - started, op, obj, start, end_, end_ - start,
                                     1, r[8], disk=disk))
                made += 1
        return made

    def _skip(self, t: float, requests: int, nbytes: int) -> None:
        self.skipped += requests
        last = self.lines[-1] if self.lines else None
        if last is not None and last.skipped:
            last.skipped += requests
            last.nbytes += nbytes
            return
        self._push(TraceLine(t, "⋯", None, 0, 0, nbytes, 1, 0, requests))


def fit_left(text: str, width: int) -> str:
    """Trim from the left (paths are most telling at their end)."""
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1:]


def render_trace_line(line: TraceLine, width: int,
                      styles: dict[str, Style] | None = None) -> list[Segment]:
    """`  12.345 read  f /dev/sda1 /etc/passwd          4.0K ×12`

    ``styles``: by part (``PARTS``, ``op-NAME``, ``type-T``), as
    ``TraceView.line_styles`` gives them; without, the segments are plain."""
    style = (styles or {}).get
    null = Style.null()
    dim = style("dim", null)
    t = f"{line.t:8.3f} "
    op = f"{line.op[:5]:<6}"
    tail = f"{format_bytes_compact(line.nbytes):>6}"
    count = f" ×{line.count}" if line.count > 1 else ""
    err = f" E{line.error}" if line.error else ""
    on = f" on {safe_text(line.disk)}" if line.disk else ""
    if on and line.obj is None and not line.label():
        on = on[1:]  # a flush: the op's column already ends in a space
    room = width - len(t) - len(op) - len(tail) - len(count) - len(err) - len(on) - 1
    obj = line.obj
    segs = [Segment(t, style("time", null)), Segment(op, style(f"op-{line.op}", dim))]
    if obj is not None:
        type_style = style(f"type-{obj.type}", dim)
        head = f"{obj.type} "
        dev = safe_text(obj.device)  # names come from the guest's filesystem
        path = obj.path if obj.path is None else safe_text(obj.path)
        if path is None:
            name = fit_left(dev, room - len(head))
            segs += [Segment(head, type_style), Segment(name, type_style)]
            used = len(head) + len(name)
        else:
            dev = dev if len(dev) + 1 + len(head) < room // 2 else ""
            name = fit_left(path, room - len(head) - (len(dev) + 1 if dev else 0))
            segs.append(Segment(head, type_style))
            if dev:
                segs.append(Segment(dev + " ", style("device", null)))
            segs.append(Segment(name, type_style))
            used = len(head) + (len(dev) + 1 if dev else 0) + len(name)
    else:
        name = fit_left(line.label(), room)
        segs.append(Segment(name, style("skipped" if line.skipped else "type-none", null)))
        used = len(name)
    if on:
        segs.append(Segment(on, style("device", null)))
    pad = max(0, room - used) + 1
    segs.append(Segment(" " * pad))
    segs.append(Segment(tail, dim))
    if count:
        segs.append(Segment(count, style("count", null)))
    if err:
        segs.append(Segment(err, style("error", null)))
    return segs


class TraceView(ScrollView, can_focus=True):
    """Scrollable view of a TraceModel; follows the tail unless scrolled up
    (and not while ``paused``, which the app binds)."""

    DEFAULT_CSS = """
    TraceView { scrollbar-size-vertical: 1; overflow-x: hidden; }
    """

    COMPONENT_CLASSES = ({f"trace--{p}" for p in PARTS} | {f"trace--op-{op}" for op in OPS}
                         | OBJECT_TYPE_CLASSES)

    paused: var[bool] = var(False)

    def __init__(self, model: TraceModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.follow = True
        self._version = -1
        self._count = 0
        self._styles: dict[str, Style] | None = None

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles = None  # app.tcss changed (or the theme): ask again

    def line_styles(self) -> dict[str, Style]:
        """The styles of a line's parts, from app.tcss (render_trace_line's keys)."""
        if self._styles is None:
            styles = part_styles(self, "trace--", PARTS)
            styles |= part_styles(self, "trace--", [f"op-{op}" for op in OPS])
            styles |= {f"type-{t}": part_style(self, f"object-type--{t}") for t in OBJECT_TYPES}
            self._styles = styles
        return self._styles

    def on_mount(self) -> None:
        self.border_title = "trace"

    def sync(self) -> None:
        """Called by the app's timer after the model changed."""
        if self.model.version == self._version and self._count == len(self.model.visible):
            return
        at_end = self.scroll_y >= self.max_scroll_y
        self._version = self.model.version
        self._count = len(self.model.visible)
        self.virtual_size = Size(self.scrollable_content_region.width, self._count)
        if self.follow and at_end and not self.paused:
            self.scroll_to_end()
        self.refresh()

    def scroll_to_end(self) -> None:
        # scroll_end() waits for a refresh, and scroll_to() refuses until the
        # scrollbar exists: set the position itself (it is clamped to the max)
        self.scroll_target_y = self.scroll_y = self.max_scroll_y

    def on_resize(self) -> None:
        self.virtual_size = Size(self.scrollable_content_region.width, len(self.model.visible))
        if self.follow:
            self.scroll_to_end()

    def render_line(self, y: int) -> Strip:
        index = int(self.scroll_y) + y
        width = self.scrollable_content_region.width
        visible = self.model.visible
        if index >= len(visible):
            return Strip.blank(width)
        segs = render_trace_line(visible[index], width, self.line_styles())
        return Strip(segs).crop_extend(0, width, None)

    def lines_text(self) -> list[str]:
        """The visible lines as plain text (tests and screenshots use it)."""
        width = max(self.scrollable_content_region.width, 80)
        return ["".join(s.text for s in render_trace_line(ln, width)).rstrip()
                for ln in self.model.visible]
