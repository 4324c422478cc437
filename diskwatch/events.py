"""Events and the bus that fans them out.

The server publishes one ``Request`` per NBD command, in batches (one batch
per wake-up of a connection), *after* the replies are on their way, from the
server's thread. Subscribers must be cheap: they aggregate (counters,
histograms) or copy into a bounded ``RequestBuffer`` that a consumer drains on
a timer, counting what it had to drop. Nobody gets one message per request
across threads, so a slow UI or log never slows the guest.

Low-rate events (connections, block-map progress, command output) go through
``Bus.publish`` to ``Bus.on_event`` subscribers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

# the wire's (diskwatch/wire.py), found here too by the sinks that read a Request
from .wire import COMMAND_NAMES as COMMAND_NAMES
from .wire import Command as Command


class Request(NamedTuple):
    """One NBD command as the server handled it."""

    conn: int  # connection number, from 1
    export: str
    command: int  # a Command value (diskwatch.wire)
    offset: int
    length: int
    flags: int  # NBD command flags (FUA=1, NO_HOLE=2, DF=4, REQ_ONE=8, FAST_ZERO=16)
    start: float  # time.monotonic() when the request arrived
    duration: float  # seconds until its reply was queued
    error: int  # 0, or the errno sent back


# Creating a NamedTuple through its __new__ is a Python-level call; the server
# builds events with this C-level constructor instead: make_request((...)).
_tuple_new = tuple.__new__


def make_request(fields: tuple) -> Request:
    return _tuple_new(Request, fields)


@dataclass(frozen=True)
class ConnectionEvent:
    conn: int
    opened: bool  # False when closed
    peer: str
    export: str = ""
    requests: int = 0  # on close: how many requests it made


@dataclass(frozen=True)
class Dropped:
    """Requests a consumer's bounded buffer could not hold (counted, not queued)."""

    count: int


@dataclass(frozen=True)
class LateNamed:
    """Writes made before the map named their bytes, now named by a new map
    (a live remap): ``writes`` holds ``(start, command, first byte, end,
    old object or None, new object)``, one per piece, in the order written.
    Sinks give those bytes to their owner (``remap.Remapper`` publishes it)."""

    writes: tuple
    why: str = ""


@dataclass(frozen=True)
class JournalCarried:
    """Writes to a filesystem's journal, attributed to the files and
    directories whose metadata they carried (a live remap read the
    journal): ``writes`` holds ``(start, command, first byte, end, owner)``,
    one per piece (``late.py``)."""

    writes: tuple


@dataclass(frozen=True)
class Progress:
    """Progress of a long job (block-map generation)."""

    phase: str  # "launch", "devices", "filesystems", "files", "write", "done"
    current: str  # the object being examined now
    done: int
    total: int
    rate: float  # objects per second
    elapsed: float
    summary: str = ""  # set with phase == "done"


@dataclass(frozen=True)
class Message:
    """A line for the person: warnings, the captive command's output, its exit."""

    text: str
    source: str = "diskwatch"  # "diskwatch", "stdout", "stderr", "exit"
    level: str = "info"  # "info", "warning", "error"
    status: int | None = None  # with source == "exit": the command's exit status


RequestSubscriber = Callable[[list[Request]], None]
EventSubscriber = Callable[[object], None]


@dataclass
class Bus:
    """Fans events out to subscribers, synchronously, in the publisher's thread."""

    _request_subs: list[RequestSubscriber] = field(default_factory=list)
    _event_subs: list[EventSubscriber] = field(default_factory=list)

    def on_requests(self, fn: RequestSubscriber) -> None:
        self._request_subs.append(fn)

    def on_event(self, fn: EventSubscriber) -> None:
        self._event_subs.append(fn)

    def unsubscribe(self, fn: Callable) -> None:
        for subs in (self._request_subs, self._event_subs):
            if fn in subs:
                subs.remove(fn)

    @property
    def has_request_subscribers(self) -> bool:
        return bool(self._request_subs)

    def publish_requests(self, batch: list[Request]) -> None:
        for fn in self._request_subs:
            fn(batch)

    def publish(self, event: object) -> None:
        for fn in self._event_subs:
            fn(event)


class RequestBuffer:
    """A bounded hand-off from the server thread to a consumer on a timer.

    ``buffer(batch)`` is the subscriber; ``drain()`` returns what came since
    the last drain and how many requests did not fit (dropped, not queued:
    memory stays bounded whatever the rate)."""

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self._items: list[Request] = []
        self._dropped = 0
        self.total_dropped = 0  # over the buffer's life
        self._lock = threading.Lock()

    def __call__(self, batch: list[Request]) -> None:
        with self._lock:
            room = self.limit - len(self._items)
            if room >= len(batch):
                self._items.extend(batch)
            else:
                if room > 0:
                    self._items.extend(batch[:room])
                self._dropped += len(batch) - max(room, 0)

    def drain(self) -> tuple[list[Request], int]:
        with self._lock:
            items, self._items = self._items, []
            dropped, self._dropped = self._dropped, 0
        self.total_dropped += dropped
        return items, dropped
