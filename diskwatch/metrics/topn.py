"""A bounded set of per-key counters: the N busiest keys, and "other".

Files and top-level directories come from the guest: it can touch 100,000
files, and a metric with one series per file would grow without bound (in
diskwatch's memory and in every Prometheus that scrapes it). ``TopSeries``
keeps a series for at most ``exposed`` keys at a time; every other key's
traffic is added to one "other" series. Which keys are exposed is decided by
a heavy-hitters sketch:

    sketch: key -> weight (requests), at most ``tracked`` keys, Misra-Gries:
            when a batch leaves more than ``tracked`` keys, the
            (tracked+1)-th largest weight is subtracted from all and the keys
            at or below zero are dropped. A key whose share of the requests
            is above 1/(tracked+1) is never dropped; a weight is an
            underestimate by at most total/(tracked+1). Weights halve every
            ``half_life`` seconds, so "busiest" means lately.

    members: the exposed keys, recomputed every ``refresh`` seconds: a member
            stays while it is among the 2*``exposed`` heaviest (hysteresis:
            a series does not flap at the border), free places go to the
            heaviest others.

Counting is exact and each request counts once: a key's counters are
increased while it is a member, "other" while it is not. A member that
leaves takes its series with it (Prometheus sees the series end); one that
comes back starts again from zero (a counter reset, which ``rate()``
handles). So sum(rate(members)) + rate(other) is the rate of all keys, and
``retired`` (counts of members that left; not exported) keeps the totals
checkable: members + other + retired == everything counted.

Memory: O(tracked + keys in one batch); series: at most ``exposed`` + 1
keys, times the values per key.
"""

from __future__ import annotations

import heapq
from operator import itemgetter

#: counters per key: requests per op, then bytes per op (ops: see aggregate.OPS)
WIDTH = 8
REQUESTS = slice(0, 4)

_weight = itemgetter(1)


def add_into(dst: list[int], src: list[int]) -> None:
    for i in range(WIDTH):
        dst[i] += src[i]


class TopSeries:
    """Exact counters for the (at most) ``exposed`` busiest keys, and "other"."""

    def __init__(self, exposed: int = 20, tracked: int = 1024, refresh: float = 10.0,
                 half_life: float = 60.0) -> None:
        if exposed < 1 or tracked < exposed:
            raise ValueError("need 1 <= exposed <= tracked")
        self.exposed = exposed
        self.tracked = tracked
        self.refresh = refresh
        self.half_life = half_life
        self.sketch: dict[object, float] = {}
        self.members: dict[object, list[int]] = {}
        self.other = [0] * WIDTH
        self.retired = [0] * WIDTH
        self._last_refresh: float | None = None

    def add(self, counts: dict[object, list[int]]) -> None:
        """Count a batch: key -> [requests per op..., bytes per op...]."""
        members = self.members
        sketch = self.sketch
        other = self.other
        get = sketch.get
        for key, c in counts.items():
            m = members.get(key)
            add_into(m if m is not None else other, c)
            sketch[key] = get(key, 0.0) + (c[0] + c[1] + c[2] + c[3])
        if len(sketch) > self.tracked:
            self._shrink()

    def _shrink(self) -> None:
        floor = heapq.nlargest(self.tracked + 1, self.sketch.values())[-1]
        self.sketch = {k: w - floor for k, w in self.sketch.items() if w > floor}

    def tick(self, now: float) -> bool:
        """Decay and recompute the members every ``refresh`` seconds; True if
        they were recomputed."""
        last = self._last_refresh
        if now == float("inf"):  # the last round, at exit: nothing to decide
            return False
        if last is None:
            self._last_refresh = now
            return False
        if now - last < self.refresh:
            return False
        self._last_refresh = now
        factor = 0.5 ** ((now - last) / self.half_life) if self.half_life > 0 else 1.0
        if factor < 1.0:
            self.sketch = {k: w * factor for k, w in self.sketch.items() if w * factor >= 1e-3}
        self.update_members()
        return True

    def update_members(self) -> None:
        ranked = [k for k, _ in heapq.nlargest(2 * self.exposed, self.sketch.items(),
                                               key=_weight)]
        near_top = set(ranked)
        members = self.members
        for key in [k for k in members if k not in near_top]:
            add_into(self.retired, members.pop(key))
        for key in ranked:
            if len(members) >= self.exposed:
                break
            if key not in members:
                members[key] = [0] * WIDTH

    def snapshot(self) -> tuple[dict[object, list[int]], list[int]]:
        """Copies of the members' counters and of "other"."""
        return {k: list(v) for k, v in self.members.items()}, list(self.other)
