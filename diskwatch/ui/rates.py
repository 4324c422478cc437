"""Rates and totals: ops/s and bytes/s for reads and writes, latency median
and p99, connections, other commands, totals, sparklines of the last minute."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from ..events import COMMAND_NAMES
from ..stats import Stats
from ..units import format_bytes_compact, format_count_compact, format_duration_compact

MUTED = "#8a8a8a"
BRIGHT = "#e4e4e4"


class Rates(Vertical):
    DEFAULT_CSS = """
    Rates { height: auto; }
    Rates #rates-text { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    Rates Sparkline { height: 1; margin: 0 0; }
    Rates #spark-reads > .sparkline--max-color { color: #5fd787; }
    Rates #spark-reads > .sparkline--min-color { color: #1c4a2c; }
    Rates #spark-writes > .sparkline--max-color { color: #ff5f5f; }
    Rates #spark-writes > .sparkline--min-color { color: #4a1c1c; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # made here, not queried later: the app's timer may run before they mount
        self.text = Static("", id="rates-text")
        self.reads = Sparkline([0.0] * 60, id="spark-reads")
        self.writes = Sparkline([0.0] * 60, id="spark-writes")
        self._shown: tuple = ()  # what the text shows now: skip repaints that change nothing

    def compose(self) -> ComposeResult:
        yield self.text
        yield self.reads
        yield self.writes

    def on_mount(self) -> None:
        self.border_title = "rates"
        self.border_subtitle = "60s: reads / writes"

    def update_stats(self, stats: Stats, now: float) -> None:
        if not (self.text.is_mounted and self.writes.is_mounted):
            return
        rops, wops, rbytes, wbytes = stats.series.rate(now)
        text = Text()
        for name, style, ops, nbytes, total, total_bytes in (
            ("read ", "#5fd787 bold", rops, rbytes, stats.ops[0], stats.bytes[0]),
            ("write", "#ff5f5f bold", wops, wbytes, stats.ops[1], stats.bytes[1]),
        ):
            text.append(name, style=style)
            text.append(f"{ops:5.0f}/s {format_bytes_compact(nbytes):>5}/s", style=BRIGHT)
            text.append(f" Σ{format_count_compact(total):>5} {format_bytes_compact(total_bytes):>5}\n",
                        style=MUTED)
        text.append("lat  ", style="#5fafff bold")
        text.append(f"{format_duration_compact(stats.latency.median):>6}", style=BRIGHT)
        text.append(" med ", style=MUTED)
        text.append(f"{format_duration_compact(stats.latency.p99):>6}", style=BRIGHT)
        text.append(" p99", style=MUTED)
        text.append("  conn ", style=MUTED)
        text.append(f"{stats.connections}", style=BRIGHT)
        if stats.connections_total > stats.connections:
            text.append(f"/{stats.connections_total}", style=MUTED)
        others = [f"{COMMAND_NAMES[i]} {format_count_compact(n)}"
                  for i, n in enumerate(stats.ops) if i > 1 and n]
        if others or stats.errors or stats.dropped:
            text.append("\n")
            text.append("other ", style="#d787ff bold")
            text.append("  ".join(others) or "-", style=MUTED)
            if stats.errors:
                text.append(f"  errors {format_count_compact(stats.errors)}", style="red bold")
            if stats.dropped:
                text.append(f"  dropped {format_count_compact(stats.dropped)}", style="yellow")
        key = (text.plain, tuple(text.spans))
        if key != self._shown:
            # a new line (other commands, errors) changes the height: only then a layout
            layout = not self._shown or text.plain.count("\n") != self._shown[0].count("\n")
            self._shown = key
            self.text.update(text, layout=layout)
        for spark, field in ((self.reads, "read_ops"), (self.writes, "write_ops")):
            data = [float(v) for v in stats.series.series(now, field)]
            if data != spark.data:
                spark.data = data
