"""A recording played into the pipeline: the ``Player`` is the pump's feed
(pipeline/session.py): instead of draining a server's buffer,
``take(now)`` hands out the recorded requests and events whose time has
come on a virtual clock that can run at any speed, stop, and jump.
Requests keep the order the live sinks saw them in, so a replayed text
trace has the same lines as the live one. Played as fast as it can be read
(headless without ``--speed``), the pump's rounds advance the virtual clock
request by request (``next_time``: never past one a live pump could not
have reached), so where lines break does not depend on how fast it went.

Each request is named by the map that named it live (maps.py's
``MapSchedule``): the player looks each batch up itself (``Player.look_up``,
the pump's lookup), splitting it where the map changed, and tells the
session when the map in effect changes (``Session.swap_map``, as a live
remap does), and hands on each recorded journal map at its request.
"""

from __future__ import annotations

import math
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate, repeat
from operator import itemgetter, sub
from typing import Any

from ..events import Bus, Request
from ..pipeline.session import Pieces, Pump, Session
from .maps import MapSchedule
from .reader import Recording

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
        #: the other disks' maps their live remaps made (DMAP frames), put in
        #: ``disk_maps`` at their request and told to ``on_disk_map``
        self.disk_recorded = list(maps.disk) if maps is not None else []
        self.disk_at = [m.at for m in self.disk_recorded]
        self.on_disk_map: Callable[[str, Any], None] = lambda export, blockmap: None
        self._dnext = 0
        self._disk_start: dict = {}  # the maps the other disks start with
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
        #: a recording of several disks: the other disks' maps by export
        self.disk_maps: dict = {}
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
            if self._dnext:
                self._dnext = 0
                for export, blockmap in self._disk_start.items():
                    self.disk_maps[export] = blockmap
                    self.on_disk_map(export, blockmap)
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
        for at in (self.maps.at if self.maps is not None else (), self.journal_at,
                   self.disk_at):
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
            # journal maps recorded at this request before the map (an
            # earlier remap's, which swapped nothing in) are handed on
            # before it, as live did: frames are in the file in the order
            # the live session made them
            k = bisect_right(maps.at, first) - 1
            if k >= 0:
                self._journals_until(first, before=maps.recorded[k].frame[1])
            self.blockmap = blockmap
            self.on_map(blockmap)
        self._journals_until(first)
        self._disk_maps_until(first)
        exports = self.recording.header.exports
        if len(exports) > 1:
            # several disks: each request in its own disk's map
            main, disks = exports[0], self.disk_maps
            for i, r in enumerate(batch):
                if r[1] != main:
                    m = disks.get(r[1])
                    pieces[i] = m.lookup(r[3], r[4]) if m is not None else []
        return pieces

    def _disk_maps_until(self, at: int) -> None:
        """The other disks' maps recorded at requests up to ``at``, in effect."""
        while self._dnext < len(self.disk_at) and self.disk_at[self._dnext] <= at:
            recorded = self.disk_recorded[self._dnext]
            if not self._disk_start:
                self._disk_start = dict(self.disk_maps)
            blockmap = self.recording.load_map(recorded)
            self.disk_maps[recorded.export] = blockmap
            self.on_disk_map(recorded.export, blockmap)
            self._dnext += 1

    def _journals_until(self, at: int, before: int | None = None) -> None:
        """Journal maps recorded at requests up to ``at``, not yet handed on
        (``before``: only those written in the file before that offset)."""
        while self._jnext < len(self.journal_at) and self.journal_at[self._jnext] <= at and (
                before is None or self.journal_maps[self._jnext].frame[1] < before):
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


def replay_session(recording: Recording, maps: MapSchedule | None, *, speed: float = 1.0,
                   description: str = "", disks: dict | None = None) -> Session:
    """A session fed by a Player of ``recording``, its requests named by
    ``maps`` (``maps.maps_for``); the session's map (the views') follows
    the map in effect, as a live remap swaps it. ``disks``: a recording
    of several disks, the other disks' maps by export name (the first
    disk's requests are named by ``maps``)."""
    player = Player(recording, speed=speed, maps=maps)
    player.disk_maps = dict(disks or {})
    session = Session(bus=Bus(), size=recording.header.size, started=0.0,
                      blockmap=player.blockmap,
                      description=description or f"replay of {recording.header.source}",
                      pump=Pump(player, look_up=player.look_up), player=player)
    pump = session.pump
    pump.blockmap = lambda: session.blockmap
    exports = recording.header.exports
    if len(exports) > 1:
        from ..bmap.format import device_name
        session.set_disks([(name, recording.header.size if k == 1 else 0, device_name(k))
                           for k, name in enumerate(exports, 1)], player.disk_maps)
    player.on_map = session.swap_map  # as a live remap swaps it
    player.on_journal = session.carry_journal
    player.on_disk_map = lambda export, blockmap: session.swap_disk_map(
        export, blockmap, "remap (recorded)")
    return session


__all__ = ["Player", "replay_session", "BURST_GAP", "SPEEDS"]
