"""The watch method's arithmetic on ranges: filefrag's extents parsed,
device ranges carried to the disk through an LV's linear segments, and a
window's disk reads split among the files whose extents they fall in.
Pure functions (``generate.py`` calls them; unit tests cover each).
"""

from __future__ import annotations

import re

from .format import merge_ranges


def _inside(merged: list[tuple[int, int]], start: int, end: int) -> bool:
    """True if [start, end) lies within one range of ``merged`` (sorted, disjoint)."""
    import bisect

    i = bisect.bisect_right(merged, (start, float("inf"))) - 1
    return i >= 0 and merged[i][0] <= start and end <= merged[i][1]


_EXTENT = re.compile(rb"^\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*\d+:\s*(\d+):(.*)$")
_FOUND = re.compile(rb": (\d+) extents? found")
#: extents whose physical address is not where the data is read from
_NOT_ON_DISK = (b"unknown_loc", b"delalloc", b"inline", b"encoded", b"encrypted")


def parse_filefrag(output: bytes, paths: list[bytes]) -> list[list[tuple[int, int]] | None]:
    """Extents (device byte ranges, merged) of each of ``paths`` from the
    output of ``filefrag -v -b512 PATHS...``; None for a file filefrag did not
    report (an error) or whose data is not plainly on the device (inline,
    unknown location, encoded)."""
    out: list[list[tuple[int, int]] | None] = []
    pos = 0
    for p in paths:
        head = b"File size of " + p + b" is "
        at = output.find(head, pos)
        if at < 0 or (at > 0 and output[at - 1] != 0x0A):
            out.append(None)
            continue
        end = output.find(b"\nFile size of ", at + len(head))
        end = len(output) if end < 0 else end + 1
        ranges: list[tuple[int, int]] | None = []
        chunk = output[at:end]
        found = _FOUND.findall(chunk)
        for line in chunk.split(b"\n"):
            m = _EXTENT.match(line)
            if m is None:
                continue
            if any(f in m.group(3) for f in _NOT_ON_DISK):
                ranges = None
                break
            start = int(m.group(1)) * 512
            ranges.append((start, start + int(m.group(2)) * 512))
        if ranges is not None and (not found or int(found[-1]) != len(ranges)):
            # No extent table (filefrag -v prints none when it falls back to
            # FIBMAP, as on vfat): where the data lies is unknown.
            ranges = None
        out.append(None if ranges is None else merge_ranges(ranges))
        pos = end
    return out


def to_disk(
    ranges: list[tuple[int, int]], segments: list[tuple[int, int, int]]
) -> list[tuple[int, int]] | None:
    """Device byte ranges -> disk byte ranges through ``segments`` (device
    start, disk start, length; linear pieces); None if some byte lies outside."""
    out = []
    for s, e in ranges:
        while s < e:
            for dev, disk, length in segments:
                if dev <= s < dev + length:
                    n = min(e, dev + length) - s
                    out.append((disk + s - dev, disk + s - dev + n))
                    s += n
                    break
            else:
                return None
    return merge_ranges(out)


def attribute(
    reads: list[tuple[int, int]], extents: list[tuple[int, int, int]]
) -> tuple[dict[int, list[tuple[int, int]]], int]:
    """Split disk ``reads`` (offset, length) among files by their ``extents``
    (start, end, file), sorted by start and disjoint: file -> the pieces of the
    reads inside its extents, and the bytes of the reads in no extent."""
    import bisect

    starts = [x[0] for x in extents]
    per: dict[int, list[tuple[int, int]]] = {}
    unmatched = 0
    for o, n in reads:
        end = o + n
        covered = 0
        i = max(bisect.bisect_right(starts, o) - 1, 0)
        while i < len(extents) and extents[i][0] < end:
            s, e, f = extents[i]
            lo, hi = max(s, o), min(e, end)
            if lo < hi:
                per.setdefault(f, []).append((lo, hi))
                covered += hi - lo
            i += 1
        unmatched += max(0, n - covered)
    return per, unmatched
