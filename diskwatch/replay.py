"""``diskwatch replay FILE``: a recording played into the same sinks as a live
session (the UI, the text trace, the summary).

    diskwatch replay boot.dwrec [--bmap MAP] [--speed N] [--headless]

The ``Player`` is the pump's feed (diskwatch/pipeline/session.py): instead of draining
a server's buffer, ``take(now)`` hands out the recorded requests and events
whose time has come on a virtual clock that can run at any speed, stop, and
jump. Requests keep the order the live sinks saw them in, so a replayed text
trace has the same lines as the live one. Headless without ``--speed`` the
recording is played as fast as it can be read, the pump's rounds advancing
the virtual clock request by request (never past one a live pump could not
have reached), so where lines break does not depend on how fast it went.

The map: ``--bmap MAP`` names every request, even a map made after the
recording (a note says when it is not the one recorded with, and that it
overrides the maps the session remapped to); without it, the map the
recording was made with, if its file is still there unchanged, and then
each map the live session swapped in (a live remap, a SIGHUP reload: kept
in the recording) from the request it named first: the player looks each
batch up itself (``Player.look_up``, the pump's lookup), splitting it where
the map changed, so a replay names every request as the live trace did.
"""

from __future__ import annotations

import math
import sys
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import itemgetter, sub
from typing import Any

from .events import Bus, Request
from .pipeline.session import Pieces, Pump, Session
from .record import MapSchedule, Recording, maps_for, open_recording
from .record import choose_map as record_choose_map
from .text import safe_text

#: seconds of quiet before a request that make it the start of a burst
BURST_GAP = 1.0
#: requests one round hands the sinks at most (a seek far ahead takes a few rounds)
MAX_BATCH = 50_000
_OFFSET, _LENGTH = itemgetter(3), itemgetter(4)
SPEEDS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class Player:
    """A recording on a virtual clock: the pump's ``Feed`` for a replay.

    Times are seconds since the recording's start. ``now()`` runs at
    ``speed`` times the wall clock from where the last seek or resume left
    it, stops when paused, and stops at the end. ``seek(t)`` moves it; going
    back restarts the feed from the beginning (sinks that count must start
    over: ``generation`` goes up, and ``seek`` says so)."""

    def __init__(self, recording: Recording, *, speed: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 maps: MapSchedule | None = None,
                 on_map: Callable[[Any], None] = lambda blockmap: None,
                 on_journal: Callable[[Any], None] = lambda journal_map: None) -> None:
        self.recording = recording
        #: which map names which request (None: no map); ``on_map`` is told
        #: when the map in effect changes (the session's, for the views)
        self.maps = maps
        self.blockmap = maps.first if maps is not None else None
        self.on_map = on_map
        #: journal maps (JMAP frames), handed to ``on_journal`` at their request
        self.journal_maps = list(maps.journal) if maps is not None else []
        self.journal_at = [m.at for m in self.journal_maps]
        self.on_journal = on_journal
        self._jnext = 0  # the next journal map to hand on
        self.columns = cols = recording.columns()
        self.times = array("d", map(sub, cols.start, repeat(cols.t0)))
        # requests keep the order sinks saw them in, which is not strictly by
        # start time across connections: bisect on the running maximum
        self.reach = list(accumulate(self.times, max))
        self.events = sorted(recording.events(), key=lambda te: te[0])
        self.event_times = [t for t, _ in self.events]
        last_request = max((t + d for t, d in zip(self.times, cols.duration, strict=True)),
                           default=0.0)
        self.duration = max(last_request, self.event_times[-1] if self.events else 0.0)
        times = self.times
        self.bursts = [times[0]] if times else []
        self.bursts += [times[j] for j in range(1, len(times))
                        if times[j] - self.reach[j - 1] >= BURST_GAP]
        self.clock = clock
        self.speed = speed
        self.paused = False
        self.generation = 0  # bumps when a seek goes back
        self._pos = 0.0
        self._anchor = clock()
        self._cursor = 0  # next request to hand out
        self._taken = 0  # the first request of the batch take() handed out last
        self._ecursor = 0  # next event
        self.delivered = 0.0  # the virtual time the last take reached

    def __len__(self) -> int:
        return len(self.times)

    # -- the clock --

    def now(self) -> float:
        if self.paused:
            return self._pos
        return min(self.duration, self._pos + (self.clock() - self._anchor) * self.speed)

    def _rebase(self, pos: float) -> None:
        self._pos = min(max(0.0, pos), self.duration)
        self._anchor = self.clock()

    def pause(self) -> None:
        self._rebase(self.now())
        self.paused = True

    def resume(self) -> None:
        if self.finished and self.now() >= self.duration:
            self.seek(0.0)  # played to the end: play again
        self._rebase(self._pos)
        self.paused = False

    def toggle_pause(self) -> None:
        self.resume() if self.paused else self.pause()

    def set_speed(self, speed: float) -> None:
        self._rebase(self.now())
        self.speed = speed

    def faster(self) -> None:
        i = bisect_right(SPEEDS, self.speed)
        self.set_speed(SPEEDS[min(i, len(SPEEDS) - 1)])

    def slower(self) -> None:
        i = bisect_left(SPEEDS, self.speed) - 1
        self.set_speed(SPEEDS[max(i, 0)])

    def seek(self, t: float) -> bool:
        """Move the clock to ``t``; True if it went back (start counting over)."""
        back = t < self.delivered
        if back:
            self._cursor = self._ecursor = self._jnext = 0
            self.delivered = 0.0
            self.generation += 1
        self._rebase(t)
        return back

    def next_burst(self) -> float | None:
        """The start of the next burst of requests after now, or None."""
        now = self.now()
        i = bisect_right(self.bursts, now + 1e-9)
        if i < len(self.bursts):
            return self.bursts[i]
        return None

    @property
    def finished(self) -> bool:
        return self._cursor >= len(self.times) and self._ecursor >= len(self.events)

    def next_time(self) -> float:
        """How far a round may go when playing as fast as possible: up to
        the ``MAX_BATCH``-th request still to come (or to the end)."""
        if self._cursor >= len(self.reach):
            return self.duration
        return self.reach[min(self._cursor + MAX_BATCH, len(self.reach)) - 1]

    # -- the pump's feed --

    def take(self, now: float) -> tuple[list[object], list[Request], int]:
        if now == math.inf:  # the pump's last round: no further than the clock got
            now = self.now()
        ev_end = bisect_right(self.event_times, now, self._ecursor)
        events = [e for _, e in self.events[self._ecursor:ev_end]]
        self._ecursor = ev_end
        end = min(bisect_right(self.reach, now, self._cursor), self._cursor + MAX_BATCH)
        for at in (self.maps.at if self.maps is not None else (), self.journal_at):
            # A batch never spans a map swap or a journal map: the swap (and
            # what it names late) comes between the same two requests as live.
            k = bisect_right(at, self._cursor)
            if k < len(at):
                end = min(end, max(at[k], self._cursor))
        batch = self.columns.requests(self._cursor, end)
        if not batch and end >= len(self.times):
            self._journals_until(end)  # made after the last request
        self._taken, self._cursor = self._cursor, end
        self.delivered = max(self.delivered, now)
        return events, batch, 0

    def look_up(self, batch: Sequence[Request]) -> Pieces | None:
        """The pump's lookup of the batch ``take`` just handed out: each
        request in the map that named it live (a batch is split where the
        map changed)."""
        maps = self.maps
        if maps is None:
            return None
        first = self._taken
        pieces: list = []
        blockmap = self.blockmap
        for lo, hi, blockmap in maps.segments(first, first + len(batch)):
            part = batch[lo - first:hi - first]
            pieces += map(blockmap.lookup, map(_OFFSET, part), map(_LENGTH, part))
        if blockmap is not self.blockmap:
            self.blockmap = blockmap
            self.on_map(blockmap)
        self._journals_until(first)
        return pieces

    def _journals_until(self, at: int) -> None:
        """Journal maps recorded at requests up to ``at``, not yet handed on."""
        while self._jnext < len(self.journal_at) and self.journal_at[self._jnext] <= at:
            self.on_journal(self.recording.load_map(self.journal_maps[self._jnext]))
            self._jnext += 1

    def close(self) -> None:
        pass

    @property
    def total_dropped(self) -> int:
        return 0

    def density(self, bins: int) -> list[int]:
        """Requests per slice of the timeline, ``bins`` slices (the time bar)."""
        counts = [0] * max(1, bins)
        if not self.times or self.duration <= 0:
            return counts
        scale = bins / self.duration
        last = bins - 1
        for t in self.times:
            counts[min(last, int(t * scale))] += 1
        return counts


# --- the command ------------------------------------------------------------------

@dataclass
class ReplayConfig:
    path: str
    bmap: str | None = None
    speed: float | None = None  # None: 1x under the UI, as fast as possible headless
    headless: bool = False
    no_trace: bool = False
    log: str | None = None


def choose_map(recording: Recording, path: str | None, say: Callable[[str], None]):
    """The block map to name the replay with first (see the module docstring)."""
    from .runner import load_map
    chosen = record_choose_map(path, recording.header.bmap, say)
    return load_map(chosen) if chosen else None


def replay_session(recording: Recording, maps: MapSchedule | None, *, speed: float = 1.0,
                   description: str = "") -> Session:
    """A session fed by a Player of ``recording``, its requests named by
    ``maps`` (``record.maps_for``); the session's map (the views') follows
    the map in effect, as a live remap swaps it."""
    player = Player(recording, speed=speed, maps=maps)
    session = Session(bus=Bus(), size=recording.header.size, started=0.0,
                      blockmap=player.blockmap,
                      description=description or f"replay of {recording.header.source}",
                      pump=Pump(player, look_up=player.look_up), player=player)
    pump = session.pump
    pump.blockmap = lambda: session.blockmap
    player.on_map = session.swap_map  # as a live remap swaps it
    player.on_journal = session.carry_journal
    return session


def replay(cfg: ReplayConfig) -> int:
    import contextlib

    from .files import open_output
    from .pipeline.loop import run_session
    from .sinks import add_text_sinks

    def say(text: str) -> None:
        print(f"diskwatch: {safe_text(text)}", file=sys.stderr)

    recording = open_recording(cfg.path)
    header = recording.header
    if not cfg.headless and not sys.stdout.isatty():
        say("stdout is not a terminal: replaying headless (the trace on stdout)")
        cfg.headless = True
    if not recording.complete:
        say(f"{cfg.path} was cut short (a crash or kill?): replaying what it holds")
    maps = maps_for(recording, cfg.bmap, choose_map(recording, cfg.bmap, say), say)
    speed = cfg.speed if cfg.speed is not None else 1.0
    fast = cfg.headless and cfg.speed is None
    session = replay_session(recording, maps, speed=speed)
    player, pump = session.player, session.pump
    with contextlib.ExitStack() as files:
        log = files.enter_context(open_output(cfg.log)) if cfg.log else None
        summary = add_text_sinks(pump, size=header.size, blockmap=session.blockmap, t0=0.0,
                                 headless=cfg.headless, no_trace=cfg.no_trace, log=log)
        try:
            if not cfg.headless:
                from .ui.replay import ReplayApp
                return run_session(session, headless=False, app=ReplayApp(session))
            run_session(session, headless=True, clock=player.next_time if fast else player.now,
                        done=lambda: player.finished, wait=0 if fast else 0.1)
        finally:
            pump.close()
    if summary is not None:
        summary.print(sys.stderr)
    return 130 if session.interrupted else 0


def replay_main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(
        prog="diskwatch replay",
        description="Play a recording (diskwatch --record FILE) in the UI as if live, or "
                    "print its trace.")
    p.add_argument("file", help="the recording")
    p.add_argument("--bmap", metavar="MAP",
                   help="block map naming every request (default: the one recorded with, if "
                        "unchanged, then the maps the live session remapped to, kept in the "
                        "recording); a map made after the recording works too")
    p.add_argument("--speed", type=_speed, metavar="N",
                   help="play N times as fast (default 1; headless: as fast as it reads)")
    p.add_argument("--headless", action="store_true", help="no UI: print the trace as text")
    p.add_argument("--no-trace", action="store_true",
                   help="with --headless: print only the summary")
    p.add_argument("--log", metavar="FILE", help="write the text trace to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="debug messages and tracebacks")
    args = p.parse_args(argv)
    return replay(ReplayConfig(path=args.file, bmap=args.bmap, speed=args.speed,
                               headless=args.headless, no_trace=args.no_trace, log=args.log))


def _speed(text: str) -> float:
    import argparse
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not 0 < v <= 10_000:
        raise argparse.ArgumentTypeError(f"not a speed: {text!r} (e.g. 0.5, 1, 8)")
    return v


__all__ = ["Player", "ReplayConfig", "replay", "replay_main", "replay_session", "choose_map",
           "BURST_GAP"]
