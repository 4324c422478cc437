"""Late naming: writes made before the map could name their bytes, given
to their owner once a new map names them.

A guest creates a file, writes it, and only then (at its next commit, or
the next remap) does the map know the file: those first writes were
counted as ``p /dev/sda1``. ``LateNamer`` is a pump sink that keeps the
unnamed write pieces of the last ``LATE_SECONDS`` (at most ``LATE_KEPT``:
a client never decides how much this holds) and, when a new map is swapped
in (a live remap, a replay reaching the map the live session swapped),
looks them up in it: what it names becomes one ``LateNamed`` event, which
the pump hands every sink (``Pump.deliver``). The trace says it in one line
per object, the top objects and the summary move the bytes to their owner,
and the report does the same from the recording (the owner learned later
in the session wins). Live and replay deliver it at the same point of the
request stream: before the first request the new map names.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .events import LateNamed, Request
from .wire import WRITE_COMMANDS

__all__ = ["LATE_KEPT", "LATE_SECONDS", "LateNamer"]

#: unnamed write pieces kept to be named late, at most, and for how long
LATE_KEPT = 8192
LATE_SECONDS = 300.0

_WRITES = frozenset(int(c) for c in WRITE_COMMANDS)
_NAMED = frozenset("fd")


class LateNamer:
    """See the module docstring. ``named_late``: write bytes named late, in all."""

    def __init__(self) -> None:
        self.named_late = 0
        #: (start, command, first byte, end, object or None) of unnamed write pieces
        self._kept: deque[tuple] = deque(maxlen=LATE_KEPT)

    def feed(self, batch: Sequence[Request], pieces) -> None:
        if pieces is None:
            return
        kept = self._kept
        for req, ps in zip(batch, pieces, strict=True):
            if req[2] in _WRITES and ps:
                for start, end, obj in ps:
                    if obj is None or obj.type not in _NAMED:
                        kept.append((req[6], req[2], start, end, obj))

    def name(self, blockmap, why: str = "") -> LateNamed | None:
        """The kept unnamed writes ``blockmap`` names, as one event (None if
        none); the rest stays kept for a later map."""
        kept = self._kept
        if not kept or blockmap is None:
            return None
        horizon = kept[-1][0] - LATE_SECONDS
        lookup = blockmap.lookup
        named, still = [], []
        for t, cmd, start, end, old in kept:
            if t < horizon:
                continue
            for s, e, obj in lookup(start, end - start):
                if obj is not None and obj.type in _NAMED:
                    named.append((t, cmd, s, e, old, obj))
                    self.named_late += e - s
                else:
                    still.append((t, cmd, s, e, old))
        kept.clear()
        kept.extend(still)
        return LateNamed(tuple(named), why) if named else None

    def on_event(self, event: object) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass
