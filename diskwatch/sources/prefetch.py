"""Prefetch: read a boot's ranges ahead of the guest, in the order a
recording first read them (``--prefetch LIST``, for URL and xz sources).

A remote image store answers each read after a round trip and at a limited
rate, and a boot reads thousands of small pieces one after another: most of
its time is waiting. The list (``diskwatch/prefetch.py``: made from a
recording by ``diskwatch report REC --prefetch-list LIST``) says which
ranges the boot will read, in order; ``FETCHERS`` threads read them through
the source below, in that order, into memory, while the guest starts, and a
read of the guest that lies in a fetched piece is answered from memory. A
read of a piece being fetched waits for it (it would otherwise fetch the
same bytes again); any other read goes to the source below as without the
list.

Bounded: at most ``budget`` bytes (default 256 MiB) are held; a piece is
let go once the guest has read as many bytes of it as it holds (a boot
reads its data once), and the fetchers wait while the budget is full. A
list that does not match the boot costs its budget and the fetchers' reads,
nothing else. A write through the layer drops the pieces it touches first.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterable

from ..prefetch import GRANULE
from .base import Layer, Source

log = logging.getLogger("diskwatch.prefetch")

PIECE = 1 << 20  # a fetch reads at most this much
FETCHERS = 2
DEFAULT_BUDGET = 256 << 20
MAX_THROUGH = 1 << 20  # granules remembered as read through, at most
WAIT = 60.0  # a read waits this long for a piece in flight, at most


class _Piece:
    __slots__ = ("start", "end", "data", "read", "ready")

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.data: bytes | None = None
        self.read = 0  # bytes the guest read of it
        self.ready = threading.Event()


class Prefetch(Layer):
    """The layer; ``ranges``: (offset, length) in the order to fetch."""

    blocking = True  # a read may wait for a piece in flight

    def __init__(self, next: Source, ranges: Iterable[tuple[int, int]],
                 budget: int = DEFAULT_BUDGET, fetchers: int = FETCHERS):
        super().__init__(next)
        size = next.size
        #: the list's ranges, cut at the disk's end; pieces are made from them
        #: one at a time as the fetchers go (``_take``)
        self._ranges = [(o, min(o + n, size)) for o, n in ranges if o < size and n > 0]
        self._range = 0  # the range the next piece is cut from
        self._at = self._ranges[0][0] if self._ranges else 0  # and where in it
        self.budget = max(budget, PIECE)
        self._lock = threading.Condition()
        self._held = 0  # bytes of fetched pieces not let go
        self._starts: list[int] = []  # sorted starts of the pieces fetched or in flight
        self._pieces: dict[int, _Piece] = {}
        self._closing = False
        #: granules the guest read before they were fetched: not fetched any more
        self._through: set[int] = set()
        #: what it did (bytes): fetched, answered from memory, read through
        self.fetched = self.hits = self.misses = 0
        self.done = threading.Event()  # every piece fetched (or the layer closed)
        self._threads = [threading.Thread(target=self._fetch, name=f"prefetch-{i}", daemon=True)
                         for i in range(max(1, fetchers))]
        self._running = len(self._threads)
        if not self._ranges:
            self.done.set()
        for t in self._threads:
            t.start()

    @property
    def description(self):  # type: ignore[override]
        return f"{self.next.description} (prefetching {len(self._ranges):,} ranges)"

    # --- the fetchers -------------------------------------------------------

    def _fetch(self) -> None:
        try:
            while True:
                with self._lock:
                    while (not self._closing and self._range < len(self._ranges)
                           and self._held + PIECE > self.budget):
                        self._lock.wait()
                    p = None if self._closing else self._take()
                    if p is None:
                        return
                    if self._covered(p.start, p.end) or self._read_through(p):
                        continue  # fetched already, or the guest read it without us
                    bisect.insort(self._starts, p.start)
                    self._pieces[p.start] = p
                    self._held += p.end - p.start
                try:
                    data = self.next.pread(p.start, p.end - p.start)
                except Exception as e:  # noqa: BLE001 - a failed fetch is a miss later
                    log.info("prefetch of %d+%d failed: %s", p.start, p.end - p.start, e)
                    data = None
                with self._lock:
                    if data is None or len(data) != p.end - p.start:
                        self._drop(p)
                    else:
                        p.data = bytes(data)
                        self.fetched += len(p.data)
                    p.ready.set()
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self.done.set()

    def _take(self) -> _Piece | None:
        """(lock held) The next piece of the list, at most PIECE; None at its end."""
        if self._range >= len(self._ranges):
            return None
        end = self._ranges[self._range][1]
        p = _Piece(self._at, min(self._at + PIECE, end))
        self._at = p.end
        if self._at >= end:
            self._range += 1
            if self._range < len(self._ranges):
                self._at = self._ranges[self._range][0]
        return p

    def _read_through(self, p: _Piece) -> bool:
        g = GRANULE
        return all(k in self._through for k in range(p.start // g, (p.end - 1) // g + 1))

    def _covered(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._pieces[self._starts[i]].end >= end

    def _drop(self, p: _Piece) -> None:
        """(lock held) let ``p`` go: its bytes leave the budget."""
        if self._pieces.get(p.start) is p:
            del self._pieces[p.start]
            del self._starts[bisect.bisect_left(self._starts, p.start)]
            self._held -= p.end - p.start
            self._lock.notify_all()

    # --- reads --------------------------------------------------------------

    def pread(self, offset, length):
        end = offset + length
        with self._lock:
            i = bisect.bisect_right(self._starts, offset) - 1
            p = self._pieces[self._starts[i]] if i >= 0 else None
            if p is None or p.end < end:
                p = None
        if p is not None and not p.ready.is_set():
            p.ready.wait(WAIT)
        if p is not None:
            with self._lock:
                data = p.data
                if data is not None and self._pieces.get(p.start) is p:
                    p.read += length
                    if p.read >= len(data):
                        self._drop(p)
                    self.hits += length
                    return data[offset - p.start:end - p.start]
        with self._lock:
            self.misses += length
            if len(self._through) < MAX_THROUGH and length:
                g = GRANULE
                self._through.update(range(offset // g, (offset + length - 1) // g + 1))
        return self.next.pread(offset, length)

    def _forget(self, offset: int, length: int) -> None:
        with self._lock:
            for p in [p for p in self._pieces.values()
                      if p.start < offset + length and offset < p.end]:
                self._drop(p)

    def pwrite(self, offset, data, fua=False):
        self._forget(offset, len(data))
        return self.next.pwrite(offset, data, fua)

    def trim(self, offset, length, fua=False):
        self._forget(offset, length)
        return self.next.trim(offset, length, fua)

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        self._forget(offset, length)
        return self.next.zero(offset, length, may_trim, fua, fast)

    def close(self):
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        for t in self._threads:
            t.join(5.0)
        if self.fetched or self.hits:
            log.info("prefetch: %d bytes fetched, %d read from them, %d read through",
                     self.fetched, self.hits, self.misses)
        super().close()
