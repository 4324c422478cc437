"""A bounded set of per-key counters: the N busiest keys, and "other".

Files and top-level directories come from the guest: it can touch 100,000
files, and a metric with one series per file would grow without bound (in
diskwatch's memory and in every Prometheus that scrapes it). ``TopSeries``
keeps a series for at most ``exposed`` keys at a time; every other key's
traffic is added to one "other" series. Which keys are exposed is decided by
a heavy-hitters sketch:

    sketch: key -> weight (requests), Misra-Gries: once it holds 16*``tracked``
            keys, the (tracked+1)-th largest weight is subtracted from all and
            the keys at or below zero are dropped (back to at most
            ``tracked``). Each such step removes at least tracked+1 times what
            it subtracts, so a weight is an underestimate by at most
            total/(tracked+1), and a key with a larger share of the requests
            is never dropped. Weights halve every ``half_life`` seconds, so
            "busiest" means lately.

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

Memory: O(16 * tracked + keys in one batch); series: at most ``exposed`` + 1
keys, times the values per key.
"""

from __future__ import annotations

import heapq
from collections import Counter
from itertools import compress
from operator import itemgetter

#: counters per key: requests per op, then bytes per op (ops: see aggregate.OPS)
WIDTH = 8

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
        self.sketch: Counter = Counter()  # key -> weight
        # Shrunk back to ``tracked`` once it holds this many: rarely, not per
        # batch (a shrink sorts the weights; its cost per new key is the same
        # whatever the threshold, and a guest touching fewer distinct keys
        # between decays never pays it). 16 * 1024 keys: about 2 MB.
        self._shrink_at = 16 * tracked
        self.members: dict[object, list[int]] = {}
        self.other = [0] * WIDTH
        self.retired = [0] * WIDTH
        self._last_refresh: float | None = None

    def add_requests(self, op: int, keys: list, lengths: list[int], length: int | None) -> None:
        """Count requests of one op: ``keys[i]`` is request i's key (None: it
        has none), ``lengths[i]`` its bytes; ``length`` is their common
        length, or None when they differ. One C-level counting pass over the
        batch (into the sketch); the Python work is per member (at most
        ``exposed``), not per key or per request."""
        keyless = keys.count(None)
        keyed = len(keys) - keyless
        if not keyed:
            return
        sketch = self.sketch
        members = self.members
        # A member's requests in this batch: how much its weight grows (the
        # sketch counts one per request, exactly, even on decayed weights).
        before = [(k, m, sketch.get(k, 0.0)) for k, m in members.items()]
        sketch.update(keys)
        if keyless:
            del sketch[None]
        present = [(k, m, n) for k, m, w in before if (n := round(sketch.get(k, 0.0) - w))]
        bop = op + 4
        member_bytes: dict = {}
        if length is None and present:
            member_bytes = dict.fromkeys((k for k, _, _ in present), 0)
            for k, ln in zip(keys, lengths, strict=True):
                if k in member_bytes:
                    member_bytes[k] += ln
        in_members = bytes_in_members = 0
        for k, m, n in present:
            nbytes = n * length if length is not None else member_bytes[k]
            m[op] += n
            m[bop] += nbytes
            in_members += n
            bytes_in_members += nbytes
        total_bytes = keyed * length if length is not None else (
            sum(compress(lengths, keys)) if keyless else sum(lengths))
        self.other[op] += keyed - in_members
        self.other[bop] += total_bytes - bytes_in_members
        if len(sketch) > self._shrink_at:
            self._shrink()

    def _shrink(self) -> None:
        weights = sorted(self.sketch.values())
        floor = weights[-(self.tracked + 1)]
        self.sketch = Counter({k: w - floor for k, w in self.sketch.items() if w > floor})

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
            self.sketch = Counter({k: w * factor for k, w in self.sketch.items()
                                   if w * factor >= 1e-3})
        self.update_members()
        return True

    def update_members(self) -> None:
        ranked = [k for k, _ in heapq.nlargest(2 * self.exposed, self.sketch.items(),
                                               key=_weight)]
        near_top = set(ranked)
        members = self.members
        for key in [k for k in members if k not in near_top]:
            add_into(self.retired, members.pop(key))
        weight = self.sketch.get
        for key in ranked[:self.exposed]:
            if key in members:
                continue
            if len(members) >= self.exposed:
                # Full of keys still near the top (a scan's files, read once
                # each): the weakest gives way to a key more than twice as
                # heavy (the factor keeps two close keys from taking turns).
                weakest = min(members, key=lambda k: weight(k, 0.0))
                if 2 * weight(weakest, 0.0) >= weight(key, 0.0):
                    break
                add_into(self.retired, members.pop(weakest))
            members[key] = [0] * WIDTH
        for key in ranked[self.exposed:]:
            if len(members) >= self.exposed:
                break
            if key not in members:
                members[key] = [0] * WIDTH

    def snapshot(self) -> tuple[dict[object, list[int]], list[int]]:
        """Copies of the members' counters and of "other"."""
        return {k: list(v) for k, v in self.members.items()}, list(self.other)
