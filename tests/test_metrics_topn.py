"""The bounded top-N series (diskwatch/metrics/topn.py): a fixed number of
series whatever the keys, the heavy keys found among many light ones, and
every request counted exactly once (members + other + retired)."""

from __future__ import annotations

import random

from diskwatch.metrics.topn import WIDTH, TopSeries


def counts(reads: int = 0, writes: int = 0, size: int = 4096) -> list[int]:
    c = [0] * WIDTH
    c[0], c[1], c[4], c[5] = reads, writes, reads * size, writes * size
    return c


def totals(top: TopSeries) -> list[int]:
    out = list(top.other)
    for c in [*top.members.values(), top.retired]:
        out = [a + b for a, b in zip(out, c, strict=True)]
    return out


def test_heavy_keys_are_found_among_100000_light_ones_and_counting_is_exact():
    top = TopSeries(exposed=10, tracked=1024, refresh=1.0, half_life=60.0)
    rng = random.Random(7)
    heavy = [f"/var/log/churn{i}.log" for i in range(5)]
    light = [f"/data/f{i:06d}" for i in range(100_000)]
    stream = [(k, 0, 1) for k in heavy for _ in range(400)] + [(k, 1, 0) for k in light]
    rng.shuffle(stream)
    expected = [0] * WIDTH
    now = 0.0
    for start in range(0, len(stream), 2000):  # batches, as the pump hands them
        batch: dict[str, list[int]] = {}
        for key, r, w in stream[start:start + 2000]:
            c = batch.setdefault(key, [0] * WIDTH)
            for i, v in enumerate(counts(r, w)):
                c[i] += v
                expected[i] += v
        top.add(batch)
        assert len(top.sketch) <= top.tracked
        now += 0.1
        top.tick(now)
        assert len(top.members) <= top.exposed
    top.update_members()
    assert set(heavy) <= set(top.members), sorted(top.members)
    assert totals(top) == expected


def test_a_member_counts_exactly_what_it_gets_while_it_is_one():
    top = TopSeries(exposed=2, tracked=16, refresh=1.0)
    top.add({"a": counts(writes=50), "b": counts(writes=20), "c": counts(reads=1)})
    top.tick(0.0)
    top.tick(1.0)  # membership decided: the two heaviest
    assert set(top.members) == {"a", "b"}
    top.add({"a": counts(writes=7), "c": counts(reads=3)})
    assert top.members["a"][1] == 7 and top.members["a"][5] == 7 * 4096
    assert top.other[0] == 1 + 3  # c, before and after
    assert top.other[1] == 70  # a and b before they were members


def test_members_stay_while_near_the_top_and_leave_when_cold():
    top = TopSeries(exposed=2, tracked=64, refresh=1.0, half_life=1.0)
    top.add({"a": counts(writes=100), "b": counts(writes=90), "c": counts(writes=80)})
    top.tick(0.0)
    top.tick(1.0)
    assert set(top.members) == {"a", "b"}
    # c overtakes b a little: b is still among the 2*2 heaviest, it stays
    top.add({"c": counts(writes=30)})
    top.tick(2.0)
    assert set(top.members) == {"a", "b"}
    # a and b go quiet for long; new keys take over and the old ones retire
    for t in range(3, 40):
        top.add({f"n{t % 4}": counts(writes=100)})
        top.tick(float(t))
    assert "a" not in top.members and "b" not in top.members
    assert top.retired[1] >= 0 and len(top.members) == 2


def test_the_last_round_at_exit_changes_nothing():
    top = TopSeries(exposed=2, tracked=16, refresh=1.0)
    top.add({"a": counts(writes=5)})
    top.tick(0.0)
    top.tick(1.0)
    before = dict(top.members)
    assert top.tick(float("inf")) is False
    assert top.members == before
