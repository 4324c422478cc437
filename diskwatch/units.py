"""Sizes, counts and durations: parsed and formatted in this one place.

Two styles of each formatter where both are shown: the plain one for text
that has room (traces, reports, messages: ``1.5 KiB``, ``12.3 ms``) and a
compact one for the UI's narrow columns (``1.5K``, ``12.3ms``). Binary
units throughout (K is 1024), as qemu-img and nbdkit count.
"""

from __future__ import annotations

import re
from functools import lru_cache

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- sizes -----------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.I)


def parse_size(text: str) -> int:
    """'512', '64K', '1.5G', '2GiB' -> bytes (powers of 1024, as qemu-img does)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use a number with an optional K, M, G, T suffix)")
    num, unit = float(m.group(1)), m.group(2).upper()
    return int(num * (1024 ** ("KMGTPE".index(unit) + 1 if unit else 0)))


@lru_cache(maxsize=4096)  # request sizes repeat: 4 KiB, 64 KiB, 256 KiB...
def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB', 16777216 -> '16 MiB', 512 -> '512 B'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return str(n)  # pragma: no cover


def format_bytes_compact(n: float) -> str:
    """1536 -> '1.5K' (binary units, at most 4 characters before the unit)."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.1f}{unit}" if abs(n) < 10 else f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.0f}P"  # pragma: no cover


# --- counts ----------------------------------------------------------------------------

def count(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 request``, ``2 requests``; ``nouns`` when the plural is not +s."""
    return f"{n} {noun}" if n == 1 else f"{n} {nouns or noun + 's'}"


def format_count_compact(n: int) -> str:
    """12345 -> '12.3k': at most 5 characters."""
    if n < 10_000:
        return str(n)
    for unit in ("k", "M", "G"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f}{unit}" if n < 100 else f"{n:.0f}{unit}"
    return f"{n:.0f}T"


# --- durations -------------------------------------------------------------------------

def _duration(seconds: float, sep: str) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}{sep}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}{sep}ms"
    return f"{seconds:.2f}{sep}s"


def format_duration(seconds: float) -> str:
    """0.0123 -> '12.3 ms', 45e-6 -> '45 µs', 2 -> '2.00 s'."""
    return _duration(seconds, " ")


def format_duration_compact(seconds: float | None) -> str:
    """0.0123 -> '12.3ms'; None (nothing measured yet) -> '-'."""
    if seconds is None:
        return "-"
    return _duration(seconds, "")
