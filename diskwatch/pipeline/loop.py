"""Running a session: signals and the one loop that drives the pump, for a
live session (runner.py) and a replay (replay.py) alike.

    run_session(session, headless=True)   # rounds of session.pump until a signal,
                                          # the captive command's exit, or done()
    run_session(session, headless=False)  # the Textual app drives the pump instead

Headless, the loop sleeps on ``Wakeups`` between rounds (``wait`` seconds,
``TICK`` by default; a replay playing as fast as it can waits 0) and asks
``clock()`` where each round reaches (a live session: the monotonic clock; a
replay: its player's virtual clock). Under the UI the app's timer calls the
pump; this module only starts the app, the command, and handles signals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..events import Message
from .session import Session

#: seconds between rounds of the pump (the trace is written at 10 Hz from
#: aggregated batches; the UI's timer has the same period)
TICK = 0.1


class Wakeups:
    """What a loop sleeps on between rounds, and what wakes it early: a
    signal handler (``put(signum)``) or another thread (``put(Wakeups.STOP)``).

    Not a ``threading.Event``: ``Event.set()`` takes the lock that
    ``Event.wait()`` holds around its own bookkeeping, and a Python signal
    handler runs in the main thread between two bytecodes, possibly inside
    that ``wait()``: ``set()`` then waits forever for a lock its own thread
    holds, and the SIGTERM is never obeyed (about one stop in 40 right after
    a SIGHUP's reload). ``SimpleQueue.put`` is reentrant, documented so: a
    handler may interrupt ``get()`` anywhere."""

    STOP = 0  #: not a signal number: ``put`` by a thread that ends the loop

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()

    def put(self, what: int) -> None:
        self._queue.put(what)

    def wait(self, timeout: float) -> int | None:
        """The next wakeup (a signal number or STOP), or None after ``timeout``
        seconds without one (0: do not wait)."""
        try:
            return self._queue.get(timeout > 0, timeout if timeout > 0 else None)
        except queue.Empty:
            return None


@contextlib.contextmanager
def signals_handled(on_signal: Callable[[int], None], signums=(signal.SIGINT, signal.SIGTERM,
                                                               signal.SIGHUP)) -> Iterator[None]:
    old = {s: signal.signal(s, lambda signum, frame: on_signal(signum)) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_session(session: Session, *, headless: bool, captive=None, announce: str = "",
                prepare: Callable[[], None] | None = None,
                clock: Callable[[], float] = time.monotonic,
                on_reload: Callable[[], None] | None = None, app: Any = None,
                done: Callable[[], bool] = lambda: False, wait: float | None = None) -> int:
    """Run until the captive command exits, a signal comes, or (UI) the
    person quits; returns the exit status. ``prepare`` runs in a thread
    before the command starts (under the UI: generating a pending map).
    Headless with no controlling terminal (a service), SIGHUP calls
    ``on_reload`` in the pump's thread instead of ending the session.
    Headless, ``done()`` is asked before each round (a replay: the player
    has handed out everything), ``wait`` is the sleep between rounds (None:
    ``TICK``) and ``clock()`` the time each round reaches.
    ``app``: the Textual app to run (default: a ``DiskwatchApp`` of the session).
    The caller closes the session's pump (its last round, then the sinks)
    once nothing publishes any more."""
    if headless:
        return _run_headless(session, captive, announce, prepare, clock, on_reload, done,
                             TICK if wait is None else wait)
    if announce:
        print(announce, file=sys.stderr)
    return _run_ui(session, captive, prepare, app)


def has_controlling_terminal() -> bool:
    """A hangup (SIGHUP) can only come from a controlling terminal; a service
    (systemd, setsid) has none, and there SIGHUP means "reload", as daemons
    take it."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def _run_headless(session: Session, captive, announce: str, prepare, clock,
                  on_reload: Callable[[], None] | None, done: Callable[[], bool],
                  wait: float) -> int:
    wakeups = Wakeups()
    if on_reload is not None and has_controlling_terminal():
        on_reload = None  # SIGHUP is the terminal hanging up: end, as before

    def stop() -> None:
        wakeups.put(Wakeups.STOP)

    # The handlers only queue the signal; the loop below acts on it, in the
    # pump's thread (a reload included).
    with signals_handled(wakeups.put):
        # Said only once Ctrl-C/SIGTERM are handled: a script that signals us
        # as soon as it reads this line must not kill us before we clean up.
        if announce:
            print(announce, file=sys.stderr, flush=True)
        if prepare is not None:
            prepare()
        if captive is not None:
            captive.on_exit = lambda status: stop()
            captive.start()
        session.shutdown = stop
        pump = session.pump
        while not done():
            woken_by = wakeups.wait(wait)
            if woken_by == signal.SIGHUP and on_reload is not None:
                on_reload()
            elif woken_by is not None:
                if woken_by != Wakeups.STOP:
                    session.interrupted = True
                break
            pump.run_once(clock())
        if captive is not None and session.interrupted:
            # Interrupted: the command goes too (it may already have the
            # terminal's SIGINT), then its status is ours.
            captive.stop()
        if captive is not None:
            return captive.wait() or 0
        return 0


class _MessageHandler(logging.Handler):
    """Log records as Messages on a bus (the UI's output panel)."""

    def __init__(self, bus) -> None:
        super().__init__(logging.WARNING)
        self.bus = bus

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "error" if record.levelno >= logging.ERROR else "warning"
            self.bus.publish(Message(record.getMessage(), level=level))
        except Exception:  # noqa: BLE001 - logging never raises
            self.handleError(record)


@contextlib.contextmanager
def logs_as_messages(bus) -> Iterator[None]:
    """Under the UI the terminal is the app's: log lines from other threads
    (a qemu daemon's complaint, an upstream server lost), which the stderr
    handler would write across the screen, are Messages meanwhile (shown,
    escaped, in the output panel). The journal's handler stays."""
    root = logging.getLogger()
    moved = [h for h in root.handlers if type(h) is logging.StreamHandler]
    if not moved:
        yield
        return
    handler = _MessageHandler(bus)
    for h in moved:
        root.removeHandler(h)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for h in moved:
            root.addHandler(h)


def _run_ui(session: Session, captive, prepare, app=None) -> int:
    if app is None:
        from ..ui.app import DiskwatchApp
        app = DiskwatchApp(session)
    if captive is not None:
        def on_exit(status: int) -> None:
            session.exit_status = status
        captive.on_exit = on_exit
    stop = threading.Event()

    def prepare_and_start() -> None:
        # Under the UI the map is made while the person watches its progress;
        # the command starts once names are known, so the trace has them all.
        if prepare is not None:
            prepare()
        if captive is not None and not stop.is_set():
            captive.start()
    thread = threading.Thread(target=prepare_and_start, daemon=True, name="prepare")
    thread.start()

    # SIGTERM/SIGHUP under the UI: leave as if the person quit (the command
    # is stopped and the socket removed on the way out). The handler runs in
    # the app's own thread, where call_from_thread cannot be used, and must
    # not take a lock (starting a thread does): it only queues the signal
    # for a thread that waits for it (see Wakeups).
    wakeups = Wakeups()

    def exit_on_signal() -> None:
        while wakeups.wait(3600) != Wakeups.STOP:
            # Not before the views are mounted (an exit while the app
            # composes made its on_mount fail with a traceback on the
            # screen): on_mount itself sees session.interrupted and exits.
            if app.is_running and app.views_ready:
                try:
                    app.call_from_thread(app.exit)
                except RuntimeError:
                    pass  # the app ended meanwhile
    watcher = threading.Thread(target=exit_on_signal, daemon=True, name="ui-signals")
    watcher.start()

    def on_signal(signum: int) -> None:
        session.interrupted = True
        wakeups.put(signum)
    try:
        with signals_handled(on_signal, (signal.SIGTERM, signal.SIGHUP)), \
                logs_as_messages(session.bus):
            result = app.run()
    finally:
        stop.set()
        wakeups.put(Wakeups.STOP)
    if captive is not None:
        if captive.running:
            captive.stop()
        status = captive.wait(0) if captive.proc is not None else None
        return status if status is not None else (result if isinstance(result, int) else 0)
    return result if isinstance(result, int) else 0
