"""The objects read or written most: where scans and log churn jump out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.widgets import Static

from ..stats import Stats
from ..text import safe_text
from ..units import format_bytes_compact
from .trace import TYPE_STYLES, fit_left

SORTS = ("reads", "writes")


class TopObjects(Static):
    """A table of objects by read or write count (``sort`` switches)."""

    DEFAULT_CSS = """
    TopObjects { height: 1fr; min-height: 4; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.sort = "reads"
        self.has_map = False
        self._last: tuple[Stats, Callable[[Any], bool] | None] | None = None
        self._shown: tuple = ()

    def on_mount(self) -> None:
        self._title()

    def _title(self) -> None:
        self.border_title = f"top objects by {self.sort}"
        self.border_subtitle = "s: by writes" if self.sort == "reads" else "s: by reads"

    def toggle_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self._title()

    def on_resize(self) -> None:
        if self._last is not None:
            self.update_stats(*self._last)

    def update_stats(self, stats: Stats, keep: Callable[[Any], bool] | None = None) -> None:
        self._last = (stats, keep)
        width = max(20, self.content_region.width)
        rows = max(1, self.content_region.height - 1)
        text = Text(no_wrap=True, overflow="crop")
        if not self.has_map:
            text.append("no block map: objects appear once one is loaded", style="#8a8a8a")
            self._show(text)
            return
        top = stats.top(self.sort, rows, keep)
        num_w = 7 if width >= 60 else 6
        show_bytes = width >= 44
        name_w = max(8, width - (3 if show_bytes else 2) * (num_w + 1) - 2)
        header = f"{'T':<2}{'object':<{name_w}} {'reads':>{num_w}} {'writes':>{num_w}}"
        if show_bytes:
            header += f" {'bytes':>{num_w}}"
        text.append(header[:width] + "\n", style="bold #8a8a8a")
        if not top:
            text.append(f"nothing {'read' if self.sort == 'reads' else 'written'} yet",
                        style="#6c6c6c")
        for i, (obj, c) in enumerate(top):
            style = TYPE_STYLES.get(obj.type, TYPE_STYLES[None])
            name = safe_text(obj.device if obj.path is None else obj.path)
            text.append(f"{obj.type} ", style=style)
            text.append(f"{fit_left(name, name_w):<{name_w}} ", style=style)
            text.append(f"{c.reads:>{num_w},} ",
                        style="#5fd787 bold" if self.sort == "reads" else "#5fd787")
            text.append(f"{c.writes:>{num_w},}",
                        style="#ff5f5f bold" if self.sort == "writes" else "#ff5f5f")
            if show_bytes:
                nbytes = c.read_bytes if self.sort == "reads" else c.write_bytes
                text.append(f" {format_bytes_compact(nbytes):>{num_w}}", style="#8a8a8a")
            if i < len(top) - 1:
                text.append("\n")
        self._show(text)

    def _show(self, text: Text) -> None:
        key = (text.plain, tuple(text.spans))
        if key != self._shown:  # the table's size is set by the layout, not by its text
            self._shown = key
            self.update(text, layout=False)
