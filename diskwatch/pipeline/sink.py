"""What a sink of the pump is: the ``Sink`` protocol, the shape of what it
is fed, and ``SinkBase``, whose methods do nothing, for a sink that needs
only some of them (the pump itself is in ``session.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..events import Request

__all__ = ["Piece", "Pieces", "Sink", "SinkBase"]

#: a piece of a request: (start, end, object or None), as BlockMap.lookup gives it
Piece = tuple[int, int, Any]
#: per request of a batch, its pieces (None: no length, or no map)
Pieces = Sequence[list[Piece] | None]


@runtime_checkable
class Sink(Protocol):
    """Something that consumes the request stream, in the pump's thread.

    ``feed(batch, pieces)``: requests in the order the server published them;
    ``pieces`` is None when there is no block map, else a list parallel to
    ``batch`` of ``BlockMap.lookup`` results (None for requests without a
    length). The lookup is done once, by the pump, for every sink.
    ``on_event(event)``: a ``ConnectionEvent``, ``Message``, ``Progress`` or
    ``Dropped`` (requests the pump's buffer could not hold), before the
    requests drained in the same round; ``LateNamed`` and ``JournalCarried``
    when a new map is swapped in (``Pump.deliver``).
    ``tick(now)``: after every round, even an empty one (``now`` on the
    clock of ``Request.start``; ``float('inf')`` on the last round): a sink
    that holds text back writes it out when things go quiet.
    ``close()``: once, after the last round: write out and flush.

    A sink must not block: it runs in the thread that also drains the
    buffer. Sinks that need every request whatever the pump does (the
    recorder) subscribe to the bus themselves, and are still closed here.
    """

    def feed(self, batch: Sequence[Request], pieces: Pieces | None) -> None: ...

    def on_event(self, event: object) -> None: ...

    def tick(self, now: float) -> None: ...

    def close(self) -> None: ...


class SinkBase:
    """A sink whose every method does nothing: subclass it and override what
    the sink needs."""

    def feed(self, batch: Sequence[Request], pieces: Pieces | None) -> None:
        pass

    def on_event(self, event: object) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass
