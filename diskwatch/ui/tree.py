"""The tree of the traffic (issue 21, item 1): a view the d key switches to.

Per device (``/dev/sda1``, ``/dev/sdb1``...), its directories and files with
the bytes read and written and the requests of their whole subtree, and
their recent rate; the children of each directory sorted by what matters
now (the s key: recent rate, bytes, requests), the busiest
``CHILDREN_SHOWN`` of them shown and the rest counted on one line.

The numbers are the ``sinks.tree.TrafficTree`` sink's, sampled on the app's
timer (``sync``), as the other panels that draw aggregates are: the view
never runs per request, and what it draws is bounded by the children shown
of the directories a person opened, not by the guest's files. Names are
the guest's: ``Text``, never markup (``process_label``).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Footer, Static, Tree
from textual.widgets.tree import TreeNode

from ..sinks.tree import SORTS, Node, TrafficTree
from ..text import safe_text
from ..units import format_bytes_compact, format_count_compact
from .activity import ActivityPanel
from .styles import OBJECT_TYPE_CLASSES, part_style
from .trace import fit_left

__all__ = ["CHILDREN_SHOWN", "TrafficScreen", "TrafficTreeView"]

#: children of one node shown, at most (the rest: one "… N more" line)
CHILDREN_SHOWN = 40
_KIND_CLASS = {"device": "object-type--p", "d": "object-type--d", "f": "object-type--f",
               "other": "object-type--none"}
SORT_NAMES = {"rate": "recent rate", "bytes": "bytes", "requests": "requests"}


class TrafficTreeView(Tree[Node | None]):
    """A Textual ``Tree`` of the ``TrafficTree``'s nodes."""

    COMPONENT_CLASSES = {"traffic-tree--numbers", "traffic-tree--rate",
                         "traffic-tree--more"} | OBJECT_TYPE_CLASSES

    #: one of sinks.tree.SORTS
    sort: reactive[str] = reactive("rate")

    def __init__(self, model: TrafficTree, **kwargs: Any) -> None:
        super().__init__("traffic", **kwargs)
        self.model = model
        self.show_root = False
        self.guide_depth = 2
        self._model_root = model.root
        self._expanded: set[int] = set()  # id() of the model nodes opened

    def process_label(self, label: Any) -> Text:
        # A guest's names are text: never parsed as markup (Tree's default for a str).
        text = Text(label) if isinstance(label, str) else label
        return text.split()[0] if "\n" in text.plain else text

    def on_mount(self) -> None:
        self._title()
        self.sync()

    def watch_sort(self) -> None:
        if self.is_mounted:
            self._title()
            self.sync()

    def _title(self) -> None:
        self.border_title = f"traffic by directory, by {SORT_NAMES[self.sort]}"
        nxt = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self.border_subtitle = f"s: by {SORT_NAMES[nxt]}"

    def cycle_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]

    # -- from the model --

    def sync(self) -> None:
        """Bring the shown nodes up to date with the model (the app's timer)."""
        if self.model.root is not self._model_root:  # cleared: start over
            self._model_root = self.model.root
            self._expanded.clear()
            self.root.remove_children()
        cursor = self.cursor_node.data if self.cursor_node is not None else None
        moved = self._sync_children(self.root, self.model.root, depth=0)
        if moved and cursor is not None:
            self.call_after_refresh(self._restore_cursor, cursor)

    def _sync_children(self, tnode: TreeNode, mnode: Node, depth: int) -> bool:
        kids, more = self.model.children(mnode, self.sort, CHILDREN_SHOWN)
        have = [c.data for c in tnode.children]
        want: list[Node | None] = [*kids, None] if more else list(kids)
        moved = False
        if [id(x) for x in have] != [id(x) for x in want]:
            moved = True
            tnode.remove_children()
            for k in kids:
                expandable = bool(k.children) or k.other is not None
                tnode.add(self._label(k, depth), data=k, allow_expand=expandable,
                          expand=expandable and id(k) in self._expanded)
            if more:
                tnode.add_leaf(self._more(more, depth), data=None)
        else:
            for c in tnode.children:
                c.set_label(self._label(c.data, depth) if c.data is not None
                            else self._more(more, depth))
        for c in tnode.children:
            if c.data is not None and c.is_expanded:
                moved |= self._sync_children(c, c.data, depth + 1)
        return moved

    def _restore_cursor(self, data: Node) -> None:
        node = self._find(self.root, data)
        if node is not None and node is not self.cursor_node:
            self.move_cursor(node)

    def _find(self, tnode: TreeNode, data: Node) -> TreeNode | None:
        for c in tnode.children:
            if c.data is data:
                return c
            if c.is_expanded:
                found = self._find(c, data)
                if found is not None:
                    return found
        return None

    # -- labels --

    def _room(self, depth: int, leaf: bool = False) -> tuple[int, bool]:
        """(cells for the name, whether the requests column fits) at ``depth``."""
        width = max(30, self.scrollable_content_region.width)
        wide = width >= 60
        numbers = 8 + 8 + 9 + (7 if wide else 0)
        # the guides take guide_depth cells a level, a node's expand icon 2
        return max(6, width - numbers - depth * self.guide_depth - (0 if leaf else 2)), wide

    def _label(self, node: Node, depth: int) -> Text:
        def style(part: str) -> Any:
            return part_style(self, part)

        leaf = not (node.children or node.other is not None)
        room, wide = self._room(depth, leaf)
        name = safe_text(node.name) + ("/" if node.kind == "d" else "")
        if node.kind == "other":
            name = "… (past the tree's bound)"
        text = Text(no_wrap=True, overflow="crop")
        text.append(f"{fit_left(name, room):<{room}}", style=style(_KIND_CLASS[node.kind]))
        nums = (f" {format_bytes_compact(node.read_bytes):>7}"
                f" {format_bytes_compact(node.write_bytes):>7}")
        if wide:
            nums += f" {format_count_compact(node.requests):>6}"
        text.append(nums, style=style("traffic-tree--numbers"))
        rate = node.rate(self.model.now)
        shown = f"{format_bytes_compact(rate)}/s" if rate >= 1 else "-"
        text.append(f" {shown:>8}", style=style("traffic-tree--rate"))
        return text

    def _more(self, more: int, depth: int) -> Text:
        return Text(f"… {more:,} more", style=part_style(self, "traffic-tree--more"),
                    no_wrap=True)

    def header(self) -> str:
        """The column names, aligned with the labels (depth 0)."""
        room, wide = self._room(0)
        cols = f" {'read':>7} {'written':>7}" + (f" {'reqs':>6}" if wide else "")
        return f"{'name':<{room + 2}}{cols} {'rate':>8}"

    # -- a person's moves --

    def on_tree_node_expanded(self, event: Tree.NodeExpanded) -> None:
        data = event.node.data
        if data is not None:
            self._expanded.add(id(data))
            depth = 0
            parent = event.node.parent
            while parent is not None and parent is not self.root:
                depth += 1
                parent = parent.parent
            self._sync_children(event.node, data, depth + 1)

    def on_tree_node_collapsed(self, event: Tree.NodeCollapsed) -> None:
        if event.node.data is not None:
            self._expanded.discard(id(event.node.data))

    def open_busiest(self) -> None:
        """Open the busiest child, its busiest child, and so on, down to a
        file; the cursor goes there."""
        tnode: TreeNode = self.root
        while True:
            kids = [c for c in tnode.children if c.data is not None]
            if not kids:
                break
            tnode = kids[0]  # children are shown busiest first
            if not tnode.allow_expand:
                break
            if not tnode.is_expanded:
                tnode.expand()
                self._expanded.add(id(tnode.data))
                depth = 0
                parent = tnode.parent
                while parent is not None and parent is not self.root:
                    depth += 1
                    parent = parent.parent
                self._sync_children(tnode, tnode.data, depth + 1)
        if tnode is not self.root:
            self.call_after_refresh(self.move_cursor, tnode)


def describe(node: Node, now: float) -> str:
    """The whole name of a node and its figures (the detail line)."""
    device, path = node.path()
    rate = node.rate(now)
    return (f"{device} {path}".rstrip() + f": read {format_bytes_compact(node.read_bytes)} "
            f"in {node.reads:,} requests, wrote {format_bytes_compact(node.write_bytes)} in "
            f"{node.writes:,}" + (f", {format_bytes_compact(rate)}/s now" if rate >= 1 else ""))


class TrafficScreen(Screen[None]):
    """The tree view, with the activity lines and a detail line under it."""

    BINDINGS = [
        Binding("d,escape", "back", "Back"),
        Binding("s", "sort", "Sort"),
        Binding("b", "busiest", "Busiest"),
    ]

    def __init__(self, model: TrafficTree) -> None:
        super().__init__()
        self.model = model
        #: set once mounted (the app's timer may call sync before: nothing to do yet)
        self.tree_view: TrafficTreeView | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="tree-header")
        yield TrafficTreeView(self.model, id="tree")
        yield Static("", id="tree-detail")
        yield ActivityPanel(id="tree-activity")
        yield Footer()

    def on_mount(self) -> None:
        self.tree_view = self.query_one(TrafficTreeView)
        self.detail = self.query_one("#tree-detail", Static)
        activity = self.query_one(ActivityPanel)
        # the app's activity lines, as the main screen's panel is bound to them
        self.watch(self.app, "activity", lambda lines: setattr(activity, "lines", lines))
        self.tree_view.focus()

    def on_resize(self) -> None:
        self.sync()

    def sync(self) -> None:
        """The app's timer: the tree, its header and the detail line from the model."""
        if self.tree_view is None:  # pushed, not mounted yet
            return
        self.query_one("#tree-header", Static).update(Text(self.tree_view.header()))
        self.tree_view.sync()
        self._detail()

    def _detail(self) -> None:
        if self.tree_view is None:
            return
        node = self.tree_view.cursor_node
        data = node.data if node is not None else None
        self.detail.update(Text(safe_text(describe(data, self.model.now)) if data else
                                "enter or space opens a directory; b opens the busiest path",
                                no_wrap=True, overflow="ellipsis"))

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        self._detail()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_sort(self) -> None:
        if self.tree_view is not None:
            self.tree_view.cycle_sort()

    def action_busiest(self) -> None:
        if self.tree_view is not None:
            self.tree_view.open_busiest()
