"""A minimal epoll loop for the server's thread.

The server needs five calls of an event loop: add/remove a reader, add/remove
a writer, and call_soon_threadsafe. asyncio's loop offers them, and the server
runs under it unchanged (``Server.attach``), but each of its wake-ups also
builds Handle objects, walks timer heaps and ready queues: measured, that is
a large part of the cost of a wake-up that carries only a few 4 KiB reads.
This loop does only what the server needs; the server's own thread runs it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque

log = logging.getLogger("diskwatch.server")

_IN = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class EpollLoop:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._readers: dict[int, tuple] = {}
        self._writers: dict[int, tuple] = {}
        self._masks: dict[int, int] = {}
        self._calls: deque = deque()
        self._timers: list = []  # heap of (when, seq, callback, args)
        self._seq = itertools.count()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def _update(self, fd: int) -> None:
        mask = (select.EPOLLIN if fd in self._readers else 0) | \
               (select.EPOLLOUT if fd in self._writers else 0)
        old = self._masks.get(fd)
        if mask == 0:
            if old is not None:
                del self._masks[fd]
                try:
                    self._ep.unregister(fd)
                except OSError:
                    pass  # already closed
        elif old is None:
            self._ep.register(fd, mask)
            self._masks[fd] = mask
        elif old != mask:
            self._ep.modify(fd, mask)
            self._masks[fd] = mask

    def add_reader(self, fd: int, callback, *args) -> None:
        self._readers[fd] = (callback, args)
        self._update(fd)

    def remove_reader(self, fd: int) -> bool:
        found = self._readers.pop(fd, None) is not None
        self._update(fd)
        return found

    def add_writer(self, fd: int, callback, *args) -> None:
        self._writers[fd] = (callback, args)
        self._update(fd)

    def remove_writer(self, fd: int) -> bool:
        found = self._writers.pop(fd, None) is not None
        self._update(fd)
        return found

    def call_soon_threadsafe(self, callback, *args) -> None:
        if self._closed:
            return  # a worker finishing after the server stopped: nobody to tell
        self._calls.append((callback, args))
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        except OSError:
            if not self._closed:
                raise
            # closed by the loop's thread between the check above and now

    def call_later(self, delay: float, callback, *args) -> None:
        """Run callback(*args) on the loop's thread after ``delay`` seconds
        (from the loop's thread only; the server's timeouts use it)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), callback, args))

    def _run_timers(self) -> None:
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, cb, args = heapq.heappop(timers)
            try:
                cb(*args)
            except Exception:  # noqa: BLE001
                log.exception("error in a timer callback")

    def stop(self) -> None:
        self._running = False

    def is_running(self) -> bool:
        return self._running

    def run_forever(self) -> None:
        self._running = True
        self._thread = threading.current_thread()
        poll = self._ep.poll
        readers = self._readers
        writers = self._writers
        wake = self._wake_r
        timers = self._timers
        while self._running:
            try:
                events = poll(max(0.0, timers[0][0] - time.monotonic()) if timers else -1)
            except InterruptedError:
                continue
            if timers and timers[0][0] <= time.monotonic():
                self._run_timers()
            for fd, ev in events:
                # A failing callback is a bug in one connection's handling:
                # it is logged and the loop, with every other connection,
                # goes on (as asyncio's does). The server's own callbacks
                # close their connection before an exception gets here.
                try:
                    if fd == wake:
                        self._run_calls()
                        continue
                    if ev & _IN:
                        r = readers.get(fd)
                        if r is not None:
                            r[0](*r[1])
                    if ev & _OUT:
                        w = writers.get(fd)
                        if w is not None:
                            w[0](*w[1])
                except Exception:  # noqa: BLE001
                    log.exception("error in a callback for fd %d", fd)
                    self.remove_reader(fd)
                    self.remove_writer(fd)

    def _run_calls(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        calls = self._calls
        while calls:
            cb, args = calls.popleft()
            try:
                cb(*args)
            except Exception:  # noqa: BLE001 - one failing call must not drop the rest
                log.exception("error in a call_soon_threadsafe callback")

    def close(self) -> None:
        self._closed = True
        self._ep.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
