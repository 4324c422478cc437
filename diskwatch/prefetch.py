"""A boot's prefetch list: the disk's ranges in the order a recording first
read them, with what they belong to (ureadahead's and e4rat's idea, made
from outside the guest, for any operating system).

The list is text, a line per range, in the order of first access:

    # diskwatch prefetch list 1
    # from: boot.dwrec (export "", 1,234 reads, 96.1 MiB first read)
    # offset length first-read-seconds object
    1048576 65536 0.012 f /dev/sda1 /boot/vmlinuz-6.1.0-28-amd64
    ...

``offset`` and ``length`` are bytes of the disk (``length`` a multiple of
``GRANULE`` except at the disk's end), ``first-read-seconds`` is when the
recording first read the range (seconds since its start), and ``object``
is the block map's name of the range's first byte (``p /dev/sda1`` when only
the partition names it; ``-`` with no map): informative, it is the guest's
text and a reader must not act on it. Lines starting with ``#`` are
comments. A reader (``read_prefetch_list``) takes the first two fields and
refuses a line it cannot parse with its number.

Ranges: the first reads of each GRANULE-sized piece of the disk, in order;
consecutive pieces first read one after another are one range (up to
MAX_RANGE). Writes and reads of data the guest wrote are left out: the
image holds something else there (a snapshot overlay, or the guest's own
write that it then reads back from the same session's cache).

``--prefetch LIST`` (URL and xz sources, ``sources/prefetch.py``) reads the
ranges in that order while the guest boots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import DiskwatchError
from .units import format_bytes
from .wire import CMD_READ, WRITE_COMMANDS

__all__ = ["GRANULE", "PrefetchError", "PrefetchRange", "make_prefetch_list",
           "read_prefetch_list", "write_prefetch_list"]

HEADER = "# diskwatch prefetch list 1"
#: the piece of the disk a first read marks (and the list's unit)
GRANULE = 64 * 1024
#: one range of the list at most (a big sequential read is several)
MAX_RANGE = 4 << 20
#: a disk's pieces a list is made over, at most (a byte each while it is made)
MAX_GRANULES = 1 << 28  # 16 TiB
READ, WRITTEN = 1, 2
#: lines a list may hold (a reader refuses more: it bounds the memory)
MAX_RANGES = 1_000_000


class PrefetchError(DiskwatchError, ValueError):
    """A prefetch list that cannot be made or read."""


@dataclass
class PrefetchRange:
    offset: int
    length: int
    first: float = 0.0  # seconds since the recording's start
    name: str = "-"


def make_prefetch_list(recording: Any, blockmap: Any = None, export: str | None = None
                       ) -> list[PrefetchRange]:
    """The ranges of ``recording`` (``report.recording.Recording``: any log
    the report reads) in order of first read; ``blockmap`` names them (a
    BlockMap). ``export``: the export to take (default: the first one read or written).
    ``start`` of a request is seconds since the recording's start."""
    size = recording.disk_size()
    granules = -(-size // GRANULE)
    if granules > MAX_GRANULES:
        raise PrefetchError(f"a disk of {format_bytes(size)} is more than a prefetch list "
                            f"covers ({format_bytes(MAX_GRANULES * GRANULE)})")
    state = bytearray(granules)  # per granule: READ first, WRITTEN
    out: list[PrefetchRange] = []
    want = export
    for r in recording.requests:
        if r.error:
            continue
        if want is None and (r.command == CMD_READ or r.command in WRITE_COMMANDS):
            want = r.export  # the first export read or written
        if r.export != want:
            continue
        first = r.offset // GRANULE
        last = min((r.offset + max(r.length, 1) - 1) // GRANULE, granules - 1)
        if r.command in WRITE_COMMANDS:
            for g in range(first, last + 1):
                state[g] |= WRITTEN
            continue
        if r.command != CMD_READ:
            continue
        for g in range(first, last + 1):
            if state[g]:
                continue
            state[g] = READ
            prev = out[-1] if out else None
            if (prev is not None and prev.offset + prev.length == g * GRANULE
                    and prev.length < MAX_RANGE):
                prev.length += GRANULE
            else:
                out.append(PrefetchRange(g * GRANULE, GRANULE, round(max(r.start, 0.0), 3)))
    for p in out:  # the disk's last piece may be short
        if p.offset + p.length > size:
            p.length = size - p.offset
    if blockmap is not None:
        for p in out:
            obj = blockmap.most_specific(p.offset, 1)
            if obj is not None:
                p.name = " ".join(str(obj).split())  # one line, whatever the guest named it
    return out


def write_prefetch_list(path: str, ranges: list[PrefetchRange], origin: str) -> None:
    """Write the list (atomically: a reader never sees half of it)."""
    from .files import replace_atomically
    total = sum(r.length for r in ranges)
    lines = [HEADER,
             f"# from: {' '.join(origin.split())} ({len(ranges):,} ranges, "
             f"{format_bytes(total)} first read)",
             "# offset length first-read-seconds object"]
    lines += [f"{r.offset} {r.length} {r.first:.3f} {r.name}" for r in ranges]
    with replace_atomically(path) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))


def read_prefetch_list(path: str, size: int | None = None) -> list[tuple[int, int]]:
    """(offset, length) of each range of the list at ``path``, in order;
    ranges past ``size`` (the disk's) are cut off there. PrefetchError
    (one line) for a file that is not a list."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise PrefetchError(f"{path}: {os.strerror(e.errno) if e.errno else e}") from None
    out: list[tuple[int, int]] = []
    with f:
        first = f.readline(256).rstrip(b"\r\n")
        if first != HEADER.encode():
            raise PrefetchError(f"{path}: not a diskwatch prefetch list "
                                f"(its first line is not {HEADER!r})")
        for n, line in enumerate(f, start=2):
            if line.startswith(b"#") or not line.strip():
                continue
            fields = line.split(None, 2)
            try:
                offset, length = int(fields[0]), int(fields[1])
                if offset < 0 or length <= 0:
                    raise ValueError
            except (ValueError, IndexError):
                raise PrefetchError(f"{path}:{n}: expected 'OFFSET LENGTH ...'") from None
            if size is not None:
                if offset >= size:
                    continue
                length = min(length, size - offset)
            out.append((offset, length))
            if len(out) > MAX_RANGES:
                raise PrefetchError(f"{path}: more than {MAX_RANGES:,} ranges")
    return out
