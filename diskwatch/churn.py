"""Churn: an object written in many separate bursts (a log appended to and
synced again and again, an antivirus rewriting its database).

The one definition, for the report (``report/analysis.py``, over a whole
recording) and the live views (``sinks/activity.py``, as requests come):

- a *write burst*: writes (WRITE, WRITE_ZEROES, TRIM) to one object with no
  FLUSH between them and less than ``BURST_GAP`` apart are one burst (one
  append is often a few requests at once; a flush, as ``sync`` sends, ends
  it): ``new_burst``;
- *churn*: an object written in at least ``CHURN_MIN_BURSTS`` bursts;
- its *period*: the median time between bursts (``period``); its *rate*:
  bursts per minute from the first to the last (``per_minute``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BURST_GAP", "CHURN_MIN_BURSTS", "new_burst", "per_minute", "period"]

BURST_GAP = 0.02  # seconds: requests of one append arrive together
CHURN_MIN_BURSTS = 3


def new_burst(t: float, last_write_t: float, last_flushes: int, flushes: int,
              gap: float = BURST_GAP) -> bool:
    """Does a write at ``t`` start a new burst of its object, whose last write
    was at ``last_write_t`` with ``last_flushes`` flushes seen before it
    (``flushes``: seen before this one)?"""
    return t - last_write_t > gap or last_flushes != flushes


def period(starts: Sequence[float]) -> float | None:
    """The median time between consecutive burst starts (None for fewer than two)."""
    gaps = sorted(b - a for a, b in zip(starts, starts[1:], strict=False))
    return gaps[len(gaps) // 2] if gaps else None


def per_minute(bursts: int, first: float, last: float) -> float | None:
    """Bursts a minute from the first burst's start to the last's (None
    when they are at the same time)."""
    span = last - first
    return (bursts - 1) * 60 / span if span > 0 else None
