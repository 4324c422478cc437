"""The whole disk as a grid of cells, lit by recent reads (green) and writes (red).

Each character holds two cells, one above the other, with a half block
(``▀``: foreground = upper cell, background = lower cell). Cells run left to
right, top to bottom, in disk order. Unlit cells are tinted by the partition
they belong to, a little lighter once they have been touched at all, so
partition boundaries show and a boot leaves a trail. The last rows are a
legend of the partitions and a line describing the cell under the mouse or
the keyboard cursor (its byte range and the objects in it); moving the
cursor posts a ``messages.CellSelected``.

Cheap under a flood: heat is quantised to ``LEVELS`` steps per cell, each
grid row keeps its rendered strip and the levels it was drawn from, and
``update()`` (the app's timer calls it) re-renders and marks dirty only the
rows whose levels changed; a still disk costs nothing to repaint.
"""

from __future__ import annotations

import math
from typing import Any

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget

from ..sinks.stats import Heat
from ..text import safe_text
from ..units import format_bytes_compact
from .messages import CellSelected
from .styles import part_style

RGB = tuple[int, int, int]

EMPTY: RGB = (18, 18, 18)  # outside the disk (last row's tail)
UNMAPPED: RGB = (34, 34, 34)  # no partition covers it
#: partition tints (dark, so heat stands out) and their legible legend colours
TINTS: list[tuple[RGB, RGB]] = [
    ((22, 44, 74), (95, 175, 255)),
    ((58, 34, 74), (215, 135, 255)),
    ((20, 62, 58), (95, 215, 215)),
    ((70, 52, 22), (215, 175, 95)),
    ((40, 60, 28), (175, 215, 95)),
    ((72, 32, 44), (255, 135, 175)),
]
READ_RGB: RGB = (80, 235, 110)
WRITE_RGB: RGB = (255, 70, 50)
CURSOR_RGB: RGB = (255, 255, 255)
TOUCHED_RGB: RGB = (120, 120, 120)  # mixed into cells touched at all

#: heat is drawn in LEVELS steps of 1 - exp(-heat / 1.5) (0 = cold)
LEVELS = 24
_LEVEL_STEPS = 8  # table entries per unit of heat
_LEVEL_TABLE = bytes(
    max(1, min(LEVELS, round(LEVELS * (1.0 - math.exp(-((i + 0.5) / _LEVEL_STEPS) / 1.5)))))
    for i in range(12 * _LEVEL_STEPS)
)
_LEVEL_MAX_HEAT = len(_LEVEL_TABLE) / _LEVEL_STEPS


def heat_levels(values: list[float]) -> bytes:
    """Quantise heat values: 0 for exactly cold, else 1..LEVELS."""
    table, steps, top = _LEVEL_TABLE, _LEVEL_STEPS, _LEVEL_MAX_HEAT
    return bytes([0 if not v else (table[int(v * steps)] if v < top else LEVELS)
                  for v in values])


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (
        int(a[0] + (b[0] - a[0]) * t),
        int(a[1] + (b[1] - a[1]) * t),
        int(a[2] + (b[2] - a[2]) * t),
    )


class Heatmap(Widget, can_focus=True):
    """Renders a ``Heat`` (from stats) over the partitions of a block map."""

    DEFAULT_CSS = """
    Heatmap { height: 3fr; min-height: 5; }
    """

    #: the text's colours, in app.tcss (the cells' are a palette, above: each
    #: cell mixes its partition's tint with its heat, which no CSS rule says)
    COMPONENT_CLASSES = {
        "heatmap--muted",  # the hint, "no object", "+N more", the legend's "…"
        "heatmap--range",  # a cell's byte range
        "heatmap--object",  # the most specific object in it
    }

    BINDINGS = [
        Binding("left", "move(-1, 0)", "cell left", show=False),
        Binding("right", "move(1, 0)", "cell right", show=False),
        Binding("up", "move(0, -1)", "cell up", show=False),
        Binding("down", "move(0, 1)", "cell down", show=False),
    ]

    def __init__(self, heat: Heat, blockmap: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heat = heat
        self.blockmap = blockmap
        self.cursor: int | None = None
        self._cols = 1
        self._grid_rows = 1
        self._bases: list[RGB] = []
        self._partitions: list[tuple[int, int, Any, RGB, RGB]] = []
        self._style_cache: dict[tuple[RGB, RGB], Style] = {}
        self._legend: list[list[Segment]] = []
        # per cell: index into self._palette (partition tint), and per grid
        # row the (levels, strip) it was last drawn with
        self._base_index = b""
        self._base2 = b""
        self._palette: list[RGB] = []
        self._levels: tuple[bytes, bytes, bytes] = (b"", b"", b"")
        self._row_keys: list[Any] = []
        self._row_strips: list[Strip | None] = []
        self._char_cache: dict[tuple[int, int], Segment] = {}
        self._rgb_cache: dict[int, RGB] = {}
        self._width = 0

    #: the title: "disk", or with several disks the one shown
    title = "disk"

    def on_mount(self) -> None:
        self.border_title = self.title
        self._layout()

    def show_disk(self, heat: Heat, blockmap: Any, title: str) -> None:
        """Another disk of the session: its own heat and map (``k`` cycles)."""
        self.heat = heat
        self.title = title
        self.cursor = None
        if self.is_mounted:
            self.border_title = title
        self.set_blockmap(blockmap)

    # -- geometry --

    def set_blockmap(self, blockmap: Any) -> None:
        self.blockmap = blockmap
        self._layout()
        self.refresh()

    def on_resize(self) -> None:
        self._layout()

    def _layout(self) -> None:
        width = max(1, self.content_region.width if self.is_mounted else 40)
        height = max(3, self.content_region.height if self.is_mounted else 10)
        self._partitions = []
        if self.blockmap is not None:
            parts = self.blockmap.partitions()
            inner = [p for p in parts if p[2].type in "pl"] or parts
            for i, (start, end, obj) in enumerate(inner):
                tint, label = TINTS[i % len(TINTS)]
                self._partitions.append((start, end, obj, tint, label))
        self._legend = self._legend_lines(width)
        rows = max(1, height - len(self._legend) - 1)
        cells = width * rows * 2
        if cells != self._cols * self._grid_rows * 2 or self.heat.cells != cells or not self._bases:
            self.heat.resize(cells)
        self._cols, self._grid_rows = width, rows
        self._bases = self._compute_bases()
        if self.cursor is not None and self.cursor >= self.heat.cells:
            self.cursor = None
        self.border_subtitle = f"1 cell = {format_bytes_compact(self.heat.cell_size)}"
        self._invalidate()

    def _compute_bases(self) -> list[RGB]:
        heat = self.heat
        # a byte per cell: 0 unmapped, 1.. a partition's tint, last: past the disk's end
        palette = [UNMAPPED] + [tint for tint, _label in TINTS] + [EMPTY]
        index = bytearray(heat.cells)
        for k, (start, end, _obj, _tint, _label) in enumerate(self._partitions):
            first = start // heat.cell_size
            last = min(heat.cells - 1, (end - 1) // heat.cell_size)
            index[first:last + 1] = bytes([k % len(TINTS) + 1]) * (last + 1 - first)
        index += bytes([len(palette) - 1]) * max(0, 2 * self._cols * self._grid_rows - heat.cells)
        self._palette = palette
        self._base_index = bytes(index)
        self._base2 = bytes(2 * k for k in index)  # the colour code's base part
        self._rgb_cache = {}
        self._char_cache = {}
        return [palette[k] for k in index[:heat.cells]]

    def _invalidate(self) -> None:
        """Forget every row's strip (geometry, cursor or map changed)."""
        self._row_keys = [None] * self._grid_rows
        self._row_strips = [None] * self._grid_rows

    def _legend_lines(self, width: int) -> list[list[Segment]]:
        if not self._partitions:
            return []
        lines: list[list[Segment]] = [[]]
        used = 0
        for start, end, obj, tint, label in self._partitions:
            name = safe_text(obj.device.removeprefix("/dev/"))
            if obj.path is not None:
                name += f" {safe_text(obj.path)}"
            text = f"{name} {format_bytes_compact(end - start)}"
            item = len(text) + 3
            if used and used + item > width:
                if len(lines) == 2:  # keep the grid big: two legend lines at most
                    lines[-1].append(Segment(" …", part_style(self, "heatmap--muted")))
                    break
                lines.append([])
                used = 0
            lines[-1] += [
                Segment("█ ", Style(color=f"rgb{tint}")),
                Segment(text + " ", Style(color=f"rgb{label}")),
            ]
            used += item
        return lines

    # -- colours --

    def cell_rgb(self, i: int) -> RGB:
        """The colour cell ``i`` is drawn in now."""
        heat = self.heat
        if i >= heat.cells:
            return EMPTY
        base = self._base_index[i] if i < len(self._base_index) else 0
        touched = 1 if heat.ever_read[i] or heat.ever_written[i] else 0
        rl, wl = heat_levels([heat.reads[i], heat.writes[i]])
        return self._code_rgb(self._code(base, touched, rl, wl))

    @staticmethod
    def _code(base: int, touched: int, rl: int, wl: int) -> int:
        return ((base * 2 + touched) * (LEVELS + 1) + rl) * (LEVELS + 1) + wl

    def _code_rgb(self, code: int) -> RGB:
        rgb = self._rgb_cache.get(code)
        if rgb is None:
            rest, wl = divmod(code, LEVELS + 1)
            rest, rl = divmod(rest, LEVELS + 1)
            base_i, touched = divmod(rest, 2)
            base = self._palette[base_i] if base_i < len(self._palette) else UNMAPPED
            if base is EMPTY:
                rgb = EMPTY
            else:
                if touched:
                    base = _mix(base, TOUCHED_RGB, 0.18)
                if not rl and not wl:
                    rgb = base
                else:
                    ri, wi = rl / LEVELS, wl / LEVELS
                    hot = _mix(READ_RGB, WRITE_RGB, wi / (ri + wi))
                    rgb = _mix(base, hot, 0.35 + 0.65 * max(ri, wi))
            self._rgb_cache[code] = rgb
        return rgb

    def _style(self, fg: RGB, bg: RGB) -> Style:
        key = (fg, bg)
        style = self._style_cache.get(key)
        if style is None:
            if len(self._style_cache) > 4096:
                self._style_cache.clear()
            style = self._style_cache[key] = Style(color=f"rgb{fg}", bgcolor=f"rgb{bg}")
        return style

    # -- rendering --

    def _sample(self) -> tuple[bytes, bytes, bytes]:
        """Per grid cell (the tail past the disk included): touched at all,
        read levels, write levels."""
        heat = self.heat
        n = heat.cells
        pad = bytes(max(0, 2 * self._cols * self._grid_rows - n))
        touched = (int.from_bytes(heat.ever_read, "little")
                   | int.from_bytes(heat.ever_written, "little")).to_bytes(n, "little")
        return touched + pad, heat_levels(heat.reads) + pad, heat_levels(heat.writes) + pad

    def update(self) -> int:
        """Re-render the rows whose colours changed since they were drawn and
        mark only those dirty; returns how many. The app's timer calls it."""
        if not self.is_mounted or self.heat.cells > 2 * self._cols * self._grid_rows:
            self.refresh()
            return -1
        width = self.content_region.width
        if width != self._width:
            self._width = width
            self._invalidate()
        touched, rl, wl = self._levels = self._sample()
        cols = self._cols
        keys = self._row_keys
        strips = self._row_strips
        dirty = []
        for y in range(self._grid_rows):
            a, b = 2 * y * cols, (2 * y + 2) * cols
            key = (touched[a:b], rl[a:b], wl[a:b])
            if key != keys[y]:
                keys[y] = key
                strips[y] = None
                dirty.append(Region(0, y, width, 1))
        if dirty:
            self.refresh(*dirty)
        return len(dirty)

    def _row_strip(self, y: int, width: int) -> Strip:
        touched, rl, wl = self._levels
        bases = self._base2
        cols = self._cols
        top0 = 2 * y * cols
        if len(touched) < top0 + 2 * cols:  # not sampled for this geometry yet
            touched, rl, wl = self._levels = self._sample()
        bot0 = top0 + cols
        L = LEVELS + 1
        chars = self._char_cache
        cursor = self.cursor if (self.has_focus or self.mouse_hover) else None
        segs = []
        for x in range(min(cols, width)):
            ti, bi = top0 + x, bot0 + x
            key = (((bases[ti] + touched[ti]) * L + rl[ti]) * L + wl[ti],
                   ((bases[bi] + touched[bi]) * L + rl[bi]) * L + wl[bi])
            if cursor == ti or cursor == bi:
                top = CURSOR_RGB if cursor == ti else self._code_rgb(key[0])
                bot = CURSOR_RGB if cursor == bi else self._code_rgb(key[1])
                segs.append(Segment("▀", self._style(top, bot)))
                continue
            seg = chars.get(key)
            if seg is None:
                if len(chars) > 8192:
                    chars.clear()
                seg = chars[key] = Segment(
                    "▀", self._style(self._code_rgb(key[0]), self._code_rgb(key[1])))
            segs.append(seg)
        used = len(segs)
        if used < width:
            segs.append(Segment(" " * (width - used)))
        return Strip(segs, width)

    def render_line(self, y: int) -> Strip:
        width = self.content_region.width
        if y < self._grid_rows:
            if width != self._width:
                self._width = width
                self._invalidate()
            strip = self._row_strips[y] if y < len(self._row_strips) else None
            if strip is None:
                strip = self._row_strip(y, width)
                if y < len(self._row_strips):
                    self._row_strips[y] = strip
            return strip
        y -= self._grid_rows
        if y < len(self._legend):
            return Strip(self._legend[y]).crop_extend(0, width, None)
        if y == len(self._legend):
            return Strip(self._info_line()).crop_extend(0, width, None)
        return Strip.blank(width)

    def _info_line(self) -> list[Segment]:
        dim = part_style(self, "heatmap--muted")
        if self.cursor is None:
            return [Segment("hover or arrows: what is in a cell", dim)]
        start, end = self.heat.cell_range(self.cursor)
        segs = [Segment(f"{start:#x}-{end:#x} ", part_style(self, "heatmap--range"))]
        objs = self.cell_objects(self.cursor)
        if not objs:
            segs.append(Segment("no object" if self.blockmap is not None else "(no block map)", dim))
        else:
            best = sorted(objs, key=lambda o: -o.rank)
            segs.append(Segment(safe_text(str(best[0])), part_style(self, "heatmap--object")))
            if len(best) > 1:
                segs.append(Segment(f" +{len(best) - 1} more", dim))
        return segs

    def cell_objects(self, index: int) -> list[Any]:
        if self.blockmap is None:
            return []
        start, end = self.heat.cell_range(index)
        return list(self.blockmap.objects(start, end - start))

    # -- cursor --

    def cell_at(self, x: int, y: int, lower: bool = False) -> int | None:
        if not (0 <= x < self._cols and 0 <= y < self._grid_rows):
            return None
        index = (2 * y + (1 if lower else 0)) * self._cols + x
        return index if index < self.heat.cells else None

    def select(self, index: int | None) -> None:
        if index == self.cursor:
            return
        self.cursor = index
        self._invalidate()
        self.refresh()
        if index is not None:
            start, end = self.heat.cell_range(index)
            self.post_message(CellSelected(index, start, end, self.cell_objects(index)))

    def on_mouse_move(self, event: events.MouseMove) -> None:
        offset = event.get_content_offset(self)
        if offset is not None:
            index = self.cell_at(offset.x, offset.y)
            if index is not None:
                self.select(index)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        top = self.cell_at(offset.x, offset.y)
        # a second click on the same character picks its lower cell
        self.select(self.cell_at(offset.x, offset.y, lower=self.cursor == top))

    def on_leave(self) -> None:
        self._invalidate()
        self.refresh()

    def on_focus(self) -> None:
        self._invalidate()
        self.refresh()

    def on_blur(self) -> None:
        self._invalidate()
        self.refresh()

    def action_move(self, dx: int, dy: int) -> None:
        cols = self._cols
        if self.cursor is None:
            self.select(0)
            return
        row, col = divmod(self.cursor, cols)
        row = max(0, min(2 * self._grid_rows - 1, row + dy))
        col = max(0, min(cols - 1, col + dx))
        index = min(row * cols + col, self.heat.cells - 1)
        self.select(index)
