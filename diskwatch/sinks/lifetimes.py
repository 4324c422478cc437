"""Lifetimes as a pump sink: ``diskwatch/lifetimes.py``'s definitions fed
as the pump feeds (each batch's named pieces, the writes a new map names
late, each map swapped in). The UI's activity sink holds one, and so does
headless's exit summary: one way of following, two places it is told."""

from __future__ import annotations

from collections.abc import Sequence

from ..events import LateNamed, Request
from ..lifetimes import Lifetimes
from ..pipeline.sink import Pieces, SinkBase
from ..wire import CMD_FLUSH, CMD_READ, WRITE_COMMANDS

__all__ = ["LifetimeFollower"]


class LifetimeFollower(SinkBase):
    """``lives``: the Lifetimes followed. ``Session.swap_map`` tells it of
    each map (``map_changed``) before the writes the map names late."""

    def __init__(self) -> None:
        self.lives = Lifetimes()

    def clear(self) -> None:
        self.lives.clear()

    def map_changed(self, added, removed, new) -> None:
        self.lives.map_changed(added, removed, new)

    def on_event(self, event: object) -> None:
        lives = self.lives
        if isinstance(event, LateNamed) and lives.alive:
            # a new file's first writes, named by the map that added it
            # (told just before): its birth, before that map
            touch, alive = lives.touch, lives.following
            for t, cmd, start, end, _old, obj in event.writes:
                if obj in alive and cmd in WRITE_COMMANDS:
                    touch(obj, t, False, end - start, start)

    def feed(self, batch: Sequence[Request], pieces: Pieces | None) -> None:
        lives = self.lives
        if batch:
            lives.saw(batch[-1][6])
        if pieces is None or not lives.alive:
            return
        touch, alive = lives.touch, lives.following
        for r, looked_up in zip(batch, pieces, strict=True):
            if not looked_up or r[2] == CMD_FLUSH:
                continue
            for start, end, obj in looked_up:
                if obj in alive:
                    touch(obj, r[6], r[2] == CMD_READ, end - start, start)
