"""Rates and totals: ops/s and bytes/s for reads and writes, latency median
and p99, connections, other commands, totals, sparklines of the last minute."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Sparkline, Static

from ..events import COMMAND_NAMES
from ..sinks.stats import Stats
from ..units import format_bytes_compact, format_count_compact, format_duration_compact
from .styles import part_styles

#: disks given a line of their own, at most
DISKS_SHOWN = 4


class Rates(Vertical):
    """Colours (of the text and the sparklines): component classes, set in app.tcss."""

    DEFAULT_CSS = """
    Rates { height: auto; }
    Rates #rates-text { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }
    Rates Sparkline { height: 1; margin: 0 0; }
    """

    COMPONENT_CLASSES = {
        "rates--read", "rates--write", "rates--latency", "rates--other",  # the row names
        "rates--value",  # the figures of now
        "rates--muted",  # totals and units
        "rates--errors", "rates--dropped",
    }

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
        style = part_styles(self, "rates--", ("read", "write", "latency", "other", "value",
                                              "muted", "errors", "dropped"))
        bright, muted = style["value"], style["muted"]
        text = Text()
        for name, part, ops, nbytes, total, total_bytes in (
            ("read ", "read", rops, rbytes, stats.ops[0], stats.bytes[0]),
            ("write", "write", wops, wbytes, stats.ops[1], stats.bytes[1]),
        ):
            text.append(name, style=style[part])
            text.append(f"{ops:5.0f}/s {format_bytes_compact(nbytes):>5}/s", style=bright)
            text.append(f" Σ{format_count_compact(total):>5} {format_bytes_compact(total_bytes):>5}\n",
                        style=muted)
        text.append("lat  ", style=style["latency"])
        text.append(f"{format_duration_compact(stats.latency.median):>6}", style=bright)
        text.append(" med ", style=muted)
        text.append(f"{format_duration_compact(stats.latency.p99):>6}", style=bright)
        text.append(" p99", style=muted)
        text.append("  conn ", style=muted)
        text.append(f"{stats.connections}", style=bright)
        if stats.connections_total > stats.connections:
            text.append(f"/{stats.connections_total}", style=muted)
        if stats.disk_series:  # several disks: each one's bytes a second, read and written
            from ..bmap.format import device_name
            disks = list(stats.disk_series.values())
            for k, series in enumerate(disks[:DISKS_SHOWN], 1):
                _, _, dr, dw = series.rate(now)
                text.append("\n")
                text.append(f"{device_name(k)[5:]:<5}", style=style["other"])
                text.append(f" r {format_bytes_compact(dr):>5}/s", style=bright)
                text.append(f" w {format_bytes_compact(dw):>5}/s", style=bright)
            if len(disks) > DISKS_SHOWN:
                text.append(f"\n… {len(disks) - DISKS_SHOWN} more disks", style=muted)
        others = [f"{COMMAND_NAMES[i]} {format_count_compact(n)}"
                  for i, n in enumerate(stats.ops) if i > 1 and n]
        if others or stats.errors or stats.dropped:
            text.append("\n")
            text.append("other ", style=style["other"])
            text.append("  ".join(others) or "-", style=muted)
            if stats.errors:
                text.append(f"  errors {format_count_compact(stats.errors)}",
                            style=style["errors"])
            if stats.dropped:
                text.append(f"  dropped {format_count_compact(stats.dropped)}",
                            style=style["dropped"])
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
