"""The messages the UI's widgets post to the app (Toolong keeps its own in one
``messages.py`` too): what a widget tells, not how the app answers it.

State the app holds flows the other way, as reactive attributes the widgets
bind to (``DiskwatchApp``'s ``compose``)."""

from __future__ import annotations

from typing import Any

from textual.message import Message


class CellSelected(Message):
    """The heatmap's cursor moved to a cell: its byte range and the objects
    in it (``on_cell_selected``)."""

    def __init__(self, index: int, start: int, end: int, objects: list[Any]) -> None:
        super().__init__()
        self.index = index
        self.start = start
        self.end = end
        self.objects = objects


class Seek(Message):
    """The replay's time bar was clicked: play from ``t`` seconds into the
    recording (``on_seek``)."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t
