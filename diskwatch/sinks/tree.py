"""The traffic as a tree (issue 21, item 1): per device (a partition, an LV,
a disk: ``/dev/sda1``, ``/dev/sdb1``...), its directories and files, each
with the requests and bytes read and written by its whole subtree and a
recent rate, for the UI's tree view.

A sink of the pump. ``feed`` only adds each piece's counts to its object
(a dict of the objects of the round); ``tick`` (once a round: 10 Hz under
the UI, never per request) folds them into the tree, walking each object's
chain of nodes once however many requests it had. A node's *rate* is its
bytes a second, decayed exponentially (``HALF_LIFE``): what is busy now.

Bytes of an object that is no file or directory (a partition's own
metadata, a disk's partition table) count on its device's node.
Unmapped bytes are not in the tree.

Bounded whatever the guest has: at most ``MAX_NODES`` nodes; past that a
new file or directory is counted in its deepest known directory's one
``…`` node (its "other"). The UI asks for the busiest children of a node
(``children``), so what it draws is bounded by what fits, not by the
guest's directories.

    tree = TrafficTree()
    pump.add(tree)
    for node in tree.children(tree.root, "rate", 40)[0]: ...
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any

from ..events import Request
from ..pipeline.sink import Pieces, SinkBase
from ..traffic import Traffic
from ..wire import CMD_READ, WRITE_COMMANDS

__all__ = ["HALF_LIFE", "MAX_NODES", "Node", "SORTS", "TrafficTree"]

MAX_NODES = 100_000
#: seconds: the recent rate's half-life
HALF_LIFE = 2.0
#: what the children of a node can be sorted by
SORTS = ("rate", "bytes", "requests")
_RATE = math.log(2) / HALF_LIFE  # a steady r bytes/s keeps level at r / _RATE


class Node(Traffic):
    """A device, directory or file of the tree, with its subtree's traffic.
    ``kind``: "device", "d", "f" or "other" (what the bound folded)."""

    __slots__ = ("name", "kind", "parent", "children", "other", "level", "level_t")
    # a node is itself, not its counts (Traffic, a dataclass, compares by value)
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, name: str, kind: str, parent: Node | None) -> None:
        self.name = name
        self.kind = kind
        self.parent = parent
        self.children: dict[str, Node] = {}
        self.other: Node | None = None
        super().__init__()
        self.level = 0.0
        self.level_t = 0.0

    def rate(self, now: float) -> float:
        """Bytes a second, recently (decayed with HALF_LIFE)."""
        if not self.level:
            return 0.0
        return self.level * 0.5 ** (max(0.0, now - self.level_t) / HALF_LIFE) * _RATE

    def path(self) -> tuple[str, str]:
        """(device, path) of the node ("" path for a device)."""
        parts = []
        node: Node | None = self
        while node is not None and node.kind != "device":
            parts.append(node.name)
            node = node.parent
        device = node.name if node is not None else ""
        return device, "/" + "/".join(reversed(parts)) if parts else ""

    def __repr__(self) -> str:
        device, path = self.path()
        return f"Node({self.kind} {device} {path} reads={self.reads} writes={self.writes})"


class TrafficTree(SinkBase):
    """See the module docstring. ``root``: a node whose children are the devices."""

    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        self.max_nodes = max_nodes
        self.clear()

    def clear(self) -> None:
        self.root = Node("", "root", None)
        self.nodes = 0
        self.now = 0.0
        self._pending: dict[Any, list[int]] = {}
        self._chains: dict[Any, tuple[Node, ...]] = {}

    # -- the sink --

    def feed(self, batch: Sequence[Request], pieces: Pieces | None) -> None:
        if pieces is None:
            return
        pending = self._pending
        for r, looked_up in zip(batch, pieces, strict=True):
            if not looked_up:
                continue
            cmd = r[2]
            if cmd == CMD_READ:
                k = 0
            elif cmd in WRITE_COMMANDS:
                k = 2
            else:
                continue
            for start, end, obj in looked_up:
                if obj is None:
                    continue
                c = pending.get(obj)
                if c is None:
                    c = pending[obj] = [0, 0, 0, 0]
                c[k] += 1
                c[k + 1] += end - start

    def tick(self, now: float) -> None:
        if math.isfinite(now):
            self.now = now
        if self._pending:
            self.fold(self.now)

    def fold(self, now: float) -> None:
        """Add what was fed since the last fold to the nodes."""
        pending, self._pending = self._pending, {}
        for obj, (reads, read_bytes, writes, write_bytes) in pending.items():
            n = read_bytes + write_bytes
            for node in self._chain(obj):
                node.reads += reads
                node.read_bytes += read_bytes
                node.writes += writes
                node.write_bytes += write_bytes
                if node.level_t != now:
                    if node.level:
                        node.level *= 0.5 ** (max(0.0, now - node.level_t) / HALF_LIFE)
                    node.level_t = now
                node.level += n

    # -- the nodes --

    def _chain(self, obj: Any) -> tuple[Node, ...]:
        chain = self._chains.get(obj)
        if chain is not None:
            return chain
        device = self._child(self.root, obj.device, "device")
        nodes = [device]
        path = obj.path if obj.type in "fd" else None
        folded = False
        if path:
            parts = [p for p in path.split("/") if p]
            node = device
            for i, part in enumerate(parts):
                kind = "f" if obj.type == "f" and i == len(parts) - 1 else "d"
                child = self._child(node, part, kind)
                if child.kind == "other":
                    folded = True
                nodes.append(child)
                if folded:
                    break
                node = child
        chain = tuple(nodes)
        if not folded and len(self._chains) < self.max_nodes:
            self._chains[obj] = chain
        return chain

    def _child(self, node: Node, name: str, kind: str) -> Node:
        child = node.children.get(name)
        if child is not None:
            if kind == "d" and child.kind == "f":
                child.kind = "d"  # named a directory since (a path that is both)
            return child
        if self.nodes >= self.max_nodes:
            if node.other is None:
                node.other = Node("…", "other", node)
            return node.other
        self.nodes += 1
        child = node.children[name] = Node(name, kind, node)
        return child

    def devices(self) -> list[Node]:
        return sorted(self.root.children.values(), key=lambda n: n.name)

    def children(self, node: Node, sort: str = "rate", n: int = 50
                 ) -> tuple[list[Node], int]:
        """The ``n`` busiest children of ``node`` by ``sort`` (one of SORTS;
        ties by bytes, then name), and how many more it has (its "other"
        node, past the bound, is one of them)."""
        now = self.now
        kids = list(node.children.values())
        if node.other is not None:
            kids.append(node.other)
        if sort == "rate":
            def key(c: Node) -> tuple:
                return (c.rate(now), c.bytes, c.requests)
        elif sort == "requests":
            def key(c: Node) -> tuple:
                return (c.requests, c.bytes, 0)
        else:
            def key(c: Node) -> tuple:
                return (c.bytes, c.requests, 0)
        # heapq.nlargest keeps ties in their order: sort by name first
        if len(kids) <= n:
            kids.sort(key=lambda c: c.name)
            kids.sort(key=key, reverse=True)
            return kids, 0
        top = heapq.nlargest(n, sorted(kids, key=lambda c: c.name), key=key)
        return top, len(kids) - n
