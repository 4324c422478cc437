"""A layer that slows calls down (nbdkit's delay filter), for tests: a slow
disk under a guest, requests that overlap in time, timeouts."""

from __future__ import annotations

import time

from .base import Layer, Source


def parse_delays(text: str) -> dict[str, float]:
    """'read=10,write=5,other=1' (milliseconds) -> Delay keyword arguments."""
    out = {}
    for word in filter(None, (w.strip() for w in text.split(","))):
        key, sep, value = word.partition("=")
        if not sep or key not in ("read", "write", "other"):
            raise ValueError(f"{word!r}: expected read=MS, write=MS or other=MS")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0  # said below, with the word
        if not 0 <= ms <= 60_000:  # also refuses nan
            raise ValueError(f"{word!r}: a delay is a number of milliseconds, 0 to 60000")
        out[key] = ms / 1000
    return out


class Delay(Layer):
    """Sleeps before each call: ``read`` for pread, ``write`` for pwrite,
    trim and zero, ``other`` for flush, extents and cache (seconds)."""

    blocking = True  # a sleeping call must not hold the server's loop

    def __init__(self, inner: Source, read: float = 0.0, write: float = 0.0,
                 other: float = 0.0):
        super().__init__(inner)
        self.read, self.write, self.other = read, write, other

    @property
    def description(self):  # type: ignore[override]
        return f"{self.next.description} (delayed)"

    def view_for(self, offset, length):
        return None  # every read goes through pread, and waits

    def pread(self, offset, length):
        time.sleep(self.read)
        return self.next.pread(offset, length)

    def pwrite(self, offset, data, fua=False):
        time.sleep(self.write)
        return self.next.pwrite(offset, data, fua)

    def trim(self, offset, length, fua=False):
        time.sleep(self.write)
        return self.next.trim(offset, length, fua)

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        time.sleep(self.write)
        return self.next.zero(offset, length, may_trim, fua, fast)

    def flush(self):
        time.sleep(self.other)
        return self.next.flush()

    def extents(self, offset, length):
        time.sleep(self.other)
        return self.next.extents(offset, length)

    def cache(self, offset, length):
        time.sleep(self.other)
        return self.next.cache(offset, length)
