"""The top line: what is being served, for how long, and what the view shows.

Every part of it is a reactive the app binds (``data_bind`` in the app's
``compose``): the bar repaints when one of them changes, never because a
tick came. Its colours are component classes, set in ``app.tcss``."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..text import safe_text
from ..units import format_bytes_compact
from .styles import part_style


class StatusBar(Widget):
    COMPONENT_CLASSES = {
        "status-bar--name",  # " diskwatch "
        "status-bar--description",  # what is served
        "status-bar--muted",  # its size, the clock
        "status-bar--running",  # "command running"
        "status-bar--ended",  # "command exited 0", "attached (q detaches)", ...
        "status-bar--paused",
        "status-bar--held",  # requests held while paused
        "status-bar--filter",  # one per filter in force
    }

    #: whole seconds since the session started (the bar shows no finer)
    elapsed: reactive[int] = reactive(0)
    paused: reactive[bool] = reactive(False)
    #: requests held back while paused
    held: reactive[int] = reactive(0)
    #: the app's filters: "all" | "files" | "no-dirs", "all" | "reads" |
    #: "writes", and the search text
    type_filter: reactive[str] = reactive("all")
    op_filter: reactive[str] = reactive("all")
    search_text: reactive[str] = reactive("")
    #: the captive command or attached guest, in words ("" without one)
    command: reactive[str] = reactive("")

    def __init__(self, description: str, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.description = description
        self.disk_size = size

    def filter_labels(self) -> list[str]:
        labels = []
        if self.type_filter == "files":
            labels.append("files only")
        elif self.type_filter == "no-dirs":
            labels.append("no dirs")
        if self.op_filter != "all":
            labels.append(f"{self.op_filter} only")
        if self.search_text:
            labels.append(f"/{self.search_text}")
        return labels

    def render(self) -> Text:
        def style(part: str) -> Any:
            return part_style(self, f"status-bar--{part}")

        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(" diskwatch ", style=style("name"))
        text.append(f" {safe_text(self.description)} ",  # holds a file name or URL
                    style=style("description"))
        text.append(f"{format_bytes_compact(self.disk_size)} ", style=style("muted"))
        m, s = divmod(self.elapsed, 60)
        text.append(f"{m:02d}:{s:02d} ", style=style("muted"))
        command = self.command
        if command:
            text.append(f"{command} ",
                        style=style("running" if "running" in command else "ended"))
        if self.paused:
            text.append(" PAUSED ", style=style("paused"))
            if self.held:
                text.append(f" {self.held:,} held ", style=style("held"))
        for label in self.filter_labels():
            text.append(f" {label} ", style=style("filter"))
            text.append(" ")
        return text
