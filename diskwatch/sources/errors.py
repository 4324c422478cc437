"""Error injection (``--inject-errors``): a layer that makes calls fail.

nbdkit's error filter is the model. Each rule says which calls fail
(``ops``), how often (``rate``, 0..1, drawn from a seeded generator so a run
can be repeated), with which errno, and optionally only when the call's byte
range overlaps ``range``. A rule is written as comma-separated words:

    rate=1,errno=EIO,ops=pread,range=20M-21M
    rate=0.01,errno=ENOSPC,ops=pwrite+zero
    errno=EIO,ops=pread,after=100          (every pread after the first 100)

Defaults: rate=1, errno=EIO, every op, the whole disk, after=0. Rules are
tried in order; the first that fires raises ``SourceError`` (an OSError with
the errno), which the server turns into the NBD error of that request. The
layer exists for tests and for trying a guest's behaviour under failing I/O;
``enabled`` turns it on and off while serving.
"""

from __future__ import annotations

import errno
import random
import threading
from dataclasses import dataclass

from ..units import parse_size
from .base import Layer, Source, SourceError

OPS = ("pread", "pwrite", "flush", "trim", "zero", "extents", "cache")


@dataclass(frozen=True)
class ErrorRule:
    rate: float = 1.0
    err: int = errno.EIO
    ops: frozenset[str] = frozenset(OPS)
    start: int = 0
    end: int | None = None  # exclusive; None: to the end of the disk
    after: int = 0  # calls of these ops that succeed before the rule may fire

    def covers(self, op: str, offset: int, length: int) -> bool:
        if op not in self.ops:
            return False
        if op == "flush":
            return True
        end = self.end if self.end is not None else offset + length + 1
        return offset < end and offset + length > self.start


def _errno_of(word: str) -> int:
    if word.isdigit():
        return int(word)
    value = getattr(errno, word.upper(), None)
    if not isinstance(value, int):
        raise ValueError(f"unknown errno {word!r} (use a name like EIO or ENOSPC, or a number)")
    return value


def parse_error_rule(text: str, option: str = "--inject-errors") -> ErrorRule:
    """'rate=0.5,errno=EIO,ops=pread+zero,range=1M-2M,after=10' -> ErrorRule.
    Raises ValueError with a message a person can act on, naming ``option``
    (the way the rule was given)."""
    kw: dict = {}
    for word in filter(None, (w.strip() for w in text.split(","))):
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"{option}: {word!r} is not KEY=VALUE "
                             "(keys: rate, errno, ops, range, after)")
        key = key.strip().lower()
        value = value.strip()
        if key == "rate":
            try:
                rate = float(value[:-1]) / 100 if value.endswith("%") else float(value)
            except ValueError:
                rate = -1.0  # said below
            if not 0 <= rate <= 1:  # also refuses nan
                raise ValueError(f"{option}: rate {value!r} is not between 0 and 1")
            kw["rate"] = rate
        elif key == "errno":
            kw["err"] = _errno_of(value)
        elif key == "ops":
            ops = frozenset(o.strip().lower() for o in value.replace("|", "+").split("+"))
            bad = ops - set(OPS)
            if bad:
                raise ValueError(f"{option}: unknown op {sorted(bad)[0]!r} "
                                 f"(ops: {'+'.join(OPS)})")
            kw["ops"] = ops
        elif key == "range":
            lo, dash, hi = value.partition("-")
            if not dash:
                raise ValueError(f"{option}: range {value!r} is not START-END")
            try:
                kw["start"] = parse_size(lo) if lo else 0
                kw["end"] = parse_size(hi) if hi else None
            except ValueError as e:
                raise ValueError(f"{option}: range {value!r}: {e}") from None
            if kw["end"] is not None and kw["end"] <= kw["start"]:
                raise ValueError(f"{option}: range {value!r} is empty")
        elif key == "after":
            if not value.isdigit():
                raise ValueError(f"{option}: after {value!r} is not a number of calls")
            kw["after"] = int(value)
        else:
            raise ValueError(f"{option}: unknown key {key!r} "
                             "(keys: rate, errno, ops, range, after)")
    return ErrorRule(**kw)


class ErrorInjection(Layer):
    """Fails the calls its rules select; passes everything else through.

    ``injected`` counts the errors raised (tests and benchmarks report it).
    Zero-copy views are refused while a rule could fire on reads, so every
    read goes through ``pread`` and can fail."""

    def __init__(self, inner: Source, rules: list[ErrorRule], seed: int = 0):
        super().__init__(inner)
        self.rules = list(rules)
        self.enabled = True
        self.injected = 0
        self._calls = [0] * len(self.rules)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # blocking sources call from worker threads

    @property
    def description(self):  # type: ignore[override]
        return f"{self.next.description} (with injected errors)"

    def _check(self, op: str, offset: int = 0, length: int = 0) -> None:
        if not self.enabled:
            return
        for i, rule in enumerate(self.rules):
            if not rule.covers(op, offset, length):
                continue
            with self._lock:
                self._calls[i] += 1
                if self._calls[i] <= rule.after:
                    continue
                if rule.rate < 1 and self._rng.random() >= rule.rate:
                    continue
                self.injected += 1
            raise SourceError(rule.err, f"injected error: {op} at {offset}+{length}: "
                              f"{errno.errorcode.get(rule.err, rule.err)}")

    def pread(self, offset, length):
        self._check("pread", offset, length)
        return self.next.pread(offset, length)

    def view_for(self, offset, length):
        if self.enabled and any("pread" in r.ops for r in self.rules):
            return None
        return self.next.view_for(offset, length)

    def pwrite(self, offset, data, fua=False):
        self._check("pwrite", offset, len(data))
        return self.next.pwrite(offset, data, fua)

    def flush(self):
        self._check("flush")
        return self.next.flush()

    def trim(self, offset, length, fua=False):
        self._check("trim", offset, length)
        return self.next.trim(offset, length, fua)

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        self._check("zero", offset, length)
        return self.next.zero(offset, length, may_trim, fua, fast)

    def extents(self, offset, length):
        self._check("extents", offset, length)
        return self.next.extents(offset, length)

    def cache(self, offset, length):
        self._check("cache", offset, length)
        return self.next.cache(offset, length)


__all__ = ["ErrorInjection", "ErrorRule", "parse_error_rule", "OPS"]
