"""Watching as a layer: what reaches the layers below this one.

The server publishes what the client asked for. A ``Watch`` layer placed
lower in the stack publishes what arrives there, as requests of the export
``@LABEL`` (connection 0), so one trace or recording shows both:

    client --> server (export "")  --> snapshot --> Watch("image") --> file
               requests of ""                        requests of "@image"

Under --snapshot a client's writes appear on "" and never on "@image"; its
reads of what it wrote never reach "@image" either.

Calls may come from the server's worker threads: the layer collects its
requests under a lock in a bounded list (``LIMIT``; what does not fit is
counted in ``dropped``) and the server takes them after each batch and
publishes them from its own thread, as it does its own.
"""

from __future__ import annotations

import threading
import time

from ..events import Command, make_request
from .base import Layer, Source

LIMIT = 100_000  # requests held between two batches of the server


class Watch(Layer):
    def __init__(self, inner: Source, label: str = "image"):
        super().__init__(inner)
        self.label = label
        self.export = f"@{label}"
        self.dropped = 0
        self._events: list = []
        self._lock = threading.Lock()

    def take_events(self) -> list:
        with self._lock:
            events, self._events = self._events, []
        return events

    def _record(self, cmd: int, offset: int, length: int, start: float, err: int) -> None:
        event = make_request((0, self.export, cmd, offset, length, 0, start,
                              time.monotonic() - start, err))
        with self._lock:
            if len(self._events) < LIMIT:
                self._events.append(event)
            else:
                self.dropped += 1

    def _call(self, cmd: int, offset: int, length: int, fn, *args):
        start = time.monotonic()
        try:
            result = fn(*args)
        except OSError as e:
            self._record(cmd, offset, length, start, e.errno or 5)
            raise
        self._record(cmd, offset, length, start, 0)
        return result

    def view_for(self, offset, length):
        return None  # every read is a call this layer sees

    def pread(self, offset, length):
        return self._call(Command.READ, offset, length, self.next.pread, offset, length)

    def pwrite(self, offset, data, fua=False):
        return self._call(Command.WRITE, offset, len(data), self.next.pwrite, offset, data, fua)

    def flush(self):
        return self._call(Command.FLUSH, 0, 0, self.next.flush)

    def trim(self, offset, length, fua=False):
        return self._call(Command.TRIM, offset, length, self.next.trim, offset, length, fua)

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        return self._call(Command.WRITE_ZEROES, offset, length, self.next.zero, offset, length,
                          may_trim, fua, fast)

    def extents(self, offset, length):
        return self._call(Command.BLOCK_STATUS, offset, length, self.next.extents, offset,
                          length)

    def cache(self, offset, length):
        return self._call(Command.CACHE, offset, length, self.next.cache, offset, length)
