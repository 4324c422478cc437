"""The top line: what is being served, for how long, and what the view shows."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from ..text import safe_text
from ..units import format_bytes_compact


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; background: $panel; }
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self._shown: tuple = ()

    def show(self, *, description: str, size: int, elapsed: float, paused: bool,
             held: int, filters: list[str], command: str) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(" diskwatch ", style="bold #000000 on #5fafff")
        text.append(f" {safe_text(description)} ", style="bold")  # holds a file name or URL
        text.append(f"{format_bytes_compact(size)} ", style="#8a8a8a")
        m, s = divmod(int(elapsed), 60)
        text.append(f"{m:02d}:{s:02d} ", style="#8a8a8a")
        if command:
            text.append(f"{command} ", style="#d7af5f" if "running" in command else "bold #87d7af")
        if paused:
            text.append(" PAUSED ", style="bold #000000 on #ffd75f")
            if held:
                text.append(f" {held:,} held ", style="#ffd75f")
        for f in filters:
            text.append(f" {f} ", style="bold #000000 on #87d7af")
            text.append(" ")
        key = (text.plain, tuple(text.spans))
        if key != self._shown:  # the clock moves once a second; ticks are 10 Hz
            self._shown = key
            self.update(text, layout=False)
