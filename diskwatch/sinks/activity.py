"""Scans, churn and lifetimes as they happen (issue 21, items 2 to 4): a
sink of the pump that the UI reads on its timer.

The detectors are the report's, not copies: a scan is what
``diskwatch/scans.py``'s ``ScanTracker`` says it is (fed here the first read
of each file, as the report feeds it from a recording), and a write burst,
churn, its period and rate are ``diskwatch/churn.py``'s definitions.

    activity = Activity()
    pump.add(activity)
    activity.live_scans()      # scans going on now (Scan, live=True)
    activity.news()            # ("started" | "ended", Scan) since the last call
    activity.churning(now, 3)  # the files churning now, most bursts first
    activity.lives.gone        # files created and deleted (diskwatch/lifetimes.py),
                               # told of each map swapped in (``map_changed``)

Bounded whatever the guest does: the files already read are a set of at
most ``MAX_SEEN`` objects (when full it starts again: a file read before is
then a first read again, which can only lengthen a scan by a file);
``ScanTracker`` bounds its runs itself; write bursts are kept for at most
``MAX_WRITTEN`` objects (more are not followed, and counted in
``untracked``), each with its last ``PERIOD_KEPT`` burst starts (the live
period is their median); the objects churning *now* (a burst in the last
``CHURN_IDLE`` seconds) are a subset of those, dropped when idle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..churn import CHURN_MIN_BURSTS, new_burst, per_minute, period
from ..events import Request
from ..pipeline.sink import Pieces, SinkBase
from ..scans import Scan, ScanTracker
from ..wire import CMD_FLUSH, CMD_READ, WRITE_COMMANDS
from .lifetimes import LifetimeFollower

__all__ = ["Activity", "ChurnNow", "CHURN_IDLE", "MAX_SEEN", "MAX_WRITTEN"]

MAX_SEEN = 1_000_000
MAX_WRITTEN = 100_000
PERIOD_KEPT = 32
#: seconds after its last burst a file is no longer churning *now*
CHURN_IDLE = 30.0
#: news kept for the UI between two of its reads, at most
MAX_NEWS = 100


@dataclass(frozen=True)
class ChurnNow:
    """A file churning now: ``bursts`` so far, ``period`` (median seconds
    between its recent bursts), ``per_minute`` (bursts a minute over them)."""

    obj: Any
    bursts: int
    writes: int
    write_bytes: int
    period: float | None
    per_minute: float | None
    last: float


class _Written:
    __slots__ = ("last_t", "last_flushes", "bursts", "starts", "writes", "write_bytes")

    def __init__(self) -> None:
        self.last_t = float("-inf")
        self.last_flushes = -1
        self.bursts = 0
        self.starts: deque[float] = deque(maxlen=PERIOD_KEPT)
        self.writes = 0
        self.write_bytes = 0


class Activity(SinkBase):
    """First reads of files into a ScanTracker; write bursts per file and
    directory (see the module docstring)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.scans = ScanTracker()
        self._seen: set = set()
        self._written: dict[Any, _Written] = {}
        self._churning: dict[Any, _Written] = {}
        self.untracked = 0
        self._flushes = 0
        self._known: set[tuple[str, float]] = set()  # live scans already told
        self._ended = 0  # of scans.done, already told
        self._news: deque[tuple[str, Scan]] = deque(maxlen=MAX_NEWS)
        self._follower = LifetimeFollower()
        self.lives = self._follower.lives
        self._deaths_told = 0

    # -- the sink --

    def map_changed(self, added, removed, new) -> None:
        self._follower.map_changed(added, removed, new)

    def on_event(self, event: object) -> None:
        self._follower.on_event(event)

    def feed(self, batch: Sequence[Request], pieces: Pieces | None) -> None:
        self._follower.feed(batch, pieces)
        if pieces is None:
            return
        seen, written = self._seen, self._written
        first_read = self.scans.first_read
        for r, looked_up in zip(batch, pieces, strict=True):
            cmd = r[2]
            if cmd == CMD_FLUSH:
                self._flushes += 1
                continue
            if not looked_up:
                continue
            if cmd == CMD_READ:
                for start, end, obj in looked_up:
                    if obj is None or obj.type != "f" or obj in seen or obj.is_structure:
                        continue
                    if len(seen) >= MAX_SEEN:
                        seen.clear()
                    seen.add(obj)
                    first_read(r[6], obj, end - start)
            elif cmd in WRITE_COMMANDS:
                t = r[6]
                for start, end, obj in looked_up:
                    if obj is None or obj.type not in "fd":
                        continue
                    w = written.get(obj)
                    if w is None:
                        if len(written) >= MAX_WRITTEN:
                            self.untracked += 1
                            continue
                        w = written[obj] = _Written()
                    w.writes += 1
                    w.write_bytes += end - start
                    if new_burst(t, w.last_t, w.last_flushes, self._flushes):
                        w.bursts += 1
                        w.starts.append(t)
                        if w.bursts >= CHURN_MIN_BURSTS:
                            self._churning[obj] = w
                    w.last_t = t
                    w.last_flushes = self._flushes

    def tick(self, now: float) -> None:
        scans = self.scans
        scans.tick(now)
        for scan in scans.live():
            key = (scan.device, scan.start)
            if key not in self._known:
                self._known.add(key)
                self._news.append(("started", scan))
        for scan in scans.done[self._ended:]:
            self._known.discard((scan.device, scan.start))
            self._news.append(("ended", scan))
        self._ended = len(scans.done)

    def end(self) -> None:
        """Nothing more will be read (the recording played to its end, the
        guest's command exited): the scans still going on have ended."""
        self.tick(float("inf"))

    # -- what the UI reads --

    def live_scans(self) -> list[Scan]:
        return self.scans.live()

    def ended_scans(self) -> list[Scan]:
        return list(self.scans.done)

    def news(self) -> list[tuple[str, Scan]]:
        """Scans started and ended since the last call, in order."""
        out = list(self._news)
        self._news.clear()
        return out

    def new_lifetimes(self) -> list:
        """The lifetimes ended since the last call, oldest first (at most MAX_NEWS)."""
        lives = self.lives
        n = min(lives.deaths - self._deaths_told, MAX_NEWS, len(lives.gone))
        self._deaths_told = lives.deaths
        return list(lives.gone)[len(lives.gone) - n:] if n > 0 else []

    def churning(self, now: float, n: int = 10, structures: bool = False) -> list[ChurnNow]:
        """The files and directories churning now (a burst in the last
        CHURN_IDLE seconds), most bursts first; the filesystem's own
        structures (its journal...) only if ``structures``."""
        idle = [o for o, w in self._churning.items() if now - w.last_t > CHURN_IDLE]
        for obj in idle:
            del self._churning[obj]
        rows = []
        for obj, w in self._churning.items():
            if not structures and obj.is_structure:
                continue
            starts = list(w.starts)
            rows.append(ChurnNow(obj, w.bursts, w.writes, w.write_bytes, period(starts),
                                 per_minute(len(starts), starts[0], starts[-1]), w.last_t))
        rows.sort(key=lambda c: (-c.bursts, -c.writes, str(c.obj)))
        return rows[:n]

    def churn_of(self, obj: Any) -> ChurnNow | None:
        """``obj``'s row if it is churning now (for a mark beside its name)."""
        w = self._churning.get(obj)
        if w is None:
            return None
        starts = list(w.starts)
        return ChurnNow(obj, w.bursts, w.writes, w.write_bytes, period(starts),
                        per_minute(len(starts), starts[0], starts[-1]), w.last_t)
