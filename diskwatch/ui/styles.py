"""Colours come from ``app.tcss``: each coloured part of a widget's text is a
component class (``COMPONENT_CLASSES``), and the widget asks for its Rich
style when it builds the text. Only what the .tcss sets is in the style (a
part that sets no background keeps the widget's)."""

from __future__ import annotations

from collections.abc import Iterable

from rich.style import Style
from textual.widget import Widget


def part_style(widget: Widget, part: str) -> Style:
    """The style app.tcss gives component class ``part`` of ``widget``."""
    return widget.get_component_rich_style(part, partial=True)


def part_styles(widget: Widget, prefix: str, parts: Iterable[str]) -> dict[str, Style]:
    """``{part: style}`` of the component classes ``prefix + part``."""
    return {part: part_style(widget, prefix + part) for part in parts}


#: block-map object types (``v p l d f``, ``none`` for offsets without an
#: object): component classes ``object-type--X`` of the trace and the top table
OBJECT_TYPES = ("v", "p", "l", "d", "f", "none")
OBJECT_TYPE_CLASSES = {f"object-type--{t}" for t in OBJECT_TYPES}
