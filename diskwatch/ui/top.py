"""The objects read or written most: where scans and log churn jump out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.widgets import Static

from ..sinks.stats import Stats
from ..text import safe_text
from ..units import format_bytes_compact, format_duration_compact
from .styles import OBJECT_TYPE_CLASSES, part_style
from .trace import fit_left

SORTS = ("reads", "writes", "latency")
#: the title's word for each sort
_SORT_TITLE = {"reads": "reads", "writes": "writes",
               "latency": "p99 latency (of the most requested)"}


class TopObjects(Static):
    """A table of objects by read or write count, or by the p99 latency of
    their requests (``sort`` cycles).
    Colours: the component classes, set in app.tcss."""

    COMPONENT_CLASSES = {
        "top-objects--muted",  # no map yet, byte counts
        "top-objects--header",
        "top-objects--empty",  # nothing read or written yet
        "top-objects--reads", "top-objects--writes",  # the counts
        "top-objects--sorted",  # added to the column the table is sorted by
        "top-objects--churn",  # the period of a file churning now
    } | OBJECT_TYPE_CLASSES

    DEFAULT_CSS = """
    TopObjects { height: 1fr; min-height: 4; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.sort = "reads"
        self.has_map = False
        self._last: tuple | None = None
        self._shown: tuple = ()

    def on_mount(self) -> None:
        self._title()

    def _title(self) -> None:
        nxt = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self.border_title = f"top objects by {_SORT_TITLE[self.sort]}"
        self.border_subtitle = f"s: by {'latency' if nxt == 'latency' else nxt}"

    def toggle_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self._title()

    def on_resize(self) -> None:
        if self._last is not None:
            self.update_stats(*self._last)

    def update_stats(self, stats: Stats, keep: Callable[[Any], bool] | None = None,
                     churn: Callable[[Any], Any] | None = None) -> None:
        """``churn(obj)``: its ``sinks.activity.ChurnNow`` if it is churning now
        (by writes, the period of its bursts is shown where there is room)."""
        self._last = (stats, keep, churn)
        width = max(20, self.content_region.width)
        rows = max(1, self.content_region.height - 1)
        def style(part: str) -> Any:
            return part_style(self, part)

        text = Text(no_wrap=True, overflow="crop")
        muted = style("top-objects--muted")
        if not self.has_map:
            text.append("no block map: objects appear once one is loaded", style=muted)
            self._show(text)
            return
        by_latency = self.sort == "latency"
        top = stats.slowest(rows, keep) if by_latency else stats.top(self.sort, rows, keep)
        num_w = 7 if width >= 60 else 6
        show_bytes = width >= 44 and not by_latency
        # By writes, what the journal wrote for each object's metadata (ext3/4,
        # once a remap read the journal): a file's write amplification.
        show_journal = (show_bytes and width >= 56 and self.sort == "writes"
                        and any(c.journal_bytes for _, c in top))
        # By writes, how often a churning file is written again (its bursts' period).
        show_every = (show_bytes and width >= 56 and self.sort == "writes" and churn is not None)
        churning = {o: churn(o) for o, _ in top} if show_every and churn is not None else {}
        show_every = any(churning.values())
        # The latency of its requests where there is room to spare: p99,
        # then p50 too (the names keep 28 columns, 36 with p50).
        columns = 2 + show_bytes + show_journal + show_every
        room = width - columns * (num_w + 1) - 2
        show_p99 = by_latency or (show_bytes and room - (num_w + 1) >= 28)
        show_p50 = show_p99 and (by_latency and width >= 36 or room - 2 * (num_w + 1) >= 36)
        columns += show_p99 + show_p50
        name_w = max(8, width - columns * (num_w + 1) - 2)
        header = f"{'T':<2}{'object':<{name_w}} {'reads':>{num_w}} {'writes':>{num_w}}"
        if show_bytes:
            header += f" {'bytes':>{num_w}}"
        if show_journal:
            header += f" {'journal':>{num_w}}"
        if show_every:
            header += f" {'every':>{num_w}}"
        if show_p50:
            header += f" {'p50':>{num_w}}"
        if show_p99:
            header += f" {'p99':>{num_w}}"
        text.append(header[:width] + "\n", style=style("top-objects--header"))
        if not top:
            done = {"reads": "read", "writes": "written", "latency": "read or written"}
            text.append(f"nothing {done[self.sort]} yet", style=style("top-objects--empty"))
        sorted_ = style("top-objects--sorted")
        reads, writes = style("top-objects--reads"), style("top-objects--writes")
        if self.sort == "reads":
            reads += sorted_
        elif self.sort == "writes":
            writes += sorted_
        p99_style = muted + sorted_ if by_latency else muted
        for i, (obj, c) in enumerate(top):
            kind = obj.type if f"object-type--{obj.type}" in OBJECT_TYPE_CLASSES else "none"
            type_style = style(f"object-type--{kind}")
            name = safe_text(obj.device if obj.path is None else obj.path)
            text.append(f"{obj.type} ", style=type_style)
            text.append(f"{fit_left(name, name_w):<{name_w}} ", style=type_style)
            text.append(f"{c.reads:>{num_w},} ", style=reads)
            text.append(f"{c.writes:>{num_w},}", style=writes)
            if show_bytes:
                nbytes = c.read_bytes if self.sort == "reads" else c.write_bytes
                text.append(f" {format_bytes_compact(nbytes):>{num_w}}", style=muted)
            if show_journal:
                jb = format_bytes_compact(c.journal_bytes) if c.journal_bytes else "-"
                text.append(f" {jb:>{num_w}}", style=muted)
            if show_every:
                ch = churning.get(obj)
                every = format_duration_compact(ch.period) if ch is not None else "-"
                text.append(f" {every:>{num_w}}", style=style("top-objects--churn") if ch
                            else muted)
            if show_p99:
                pct = c.latency()
                p50, p99 = ((format_duration_compact(p) for p in pct) if pct is not None
                            else ("-", "-"))
                if show_p50:
                    text.append(f" {p50:>{num_w}}", style=muted)
                text.append(f" {p99:>{num_w}}", style=p99_style)
            if i < len(top) - 1:
                text.append("\n")
        self._show(text)

    def _show(self, text: Text) -> None:
        key = (text.plain, tuple(text.spans))
        if key != self._shown:  # the table's size is set by the layout, not by its text
            self._shown = key
            self.update(text, layout=False)
