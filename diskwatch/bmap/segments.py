"""A volume as pieces of the disk: ``Volume`` (its segments, and its
mirrors' where it has copies), ``VolumeSource`` (reading it through them),
``through`` (something inside a volume, onto the disk). What ``volumes.py``
finds and ``md.py``, ``luks.py`` assemble is made of these; nothing here
reads a table.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from ..sources.base import Source

__all__ = ["SECTOR", "Volume", "VolumeSource", "read_at", "through"]

SECTOR = 512


@dataclass
class Volume:
    """A partition, a logical volume, or the whole disk when it holds a
    filesystem with no partition table."""

    device: str  # /dev/sda1, /dev/vg0/root, /dev/sda, /dev/md/md0
    kind: str  # bmap TYPE: "p" partition, "l" logical volume (LV, md array, LUKS), "v" whole disk
    segments: list[tuple[int, int, int]]  # (volume offset, disk offset, length)
    type_hint: str = ""  # from the table: "lvm", "extended" ... ("" unknown)
    notes: list[str] = field(default_factory=list)
    #: other copies of the volume's bytes (a RAID1 array's other members, a
    #: RAID10's other copies): segments like ``segments``, each list maybe
    #: covering part of the volume only. Reads go to ``segments``; a file's
    #: ranges are named on every copy.
    mirrors: list[list[tuple[int, int, int]]] = field(default_factory=list)
    _starts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return sum(n for _, _, n in self.segments)

    @property
    def offset(self) -> int:
        """Disk offset of the volume's first byte."""
        return self.segments[0][1] if self.segments else 0

    def all_segments(self) -> list[tuple[int, int, int]]:
        """Every copy's segments: the volume's own, then its mirrors'."""
        return self.segments + [s for m in self.mirrors for s in m]

    def disk_ranges(self) -> list[tuple[int, int]]:
        return [(d, d + n) for _, d, n in self.all_segments()]

    def to_disk(self, start: int, end: int) -> list[tuple[int, int]]:
        """Volume byte range [start, end) -> disk byte ranges (pieces outside
        the volume are dropped), on the volume's segments then on each of
        its mirrors."""
        out = [(d, d + n) for _, d, n in self.pieces(self.segments, start, end)]
        for m in self.mirrors:
            out += [(d, d + n) for _, d, n in self.pieces(m, start, end)]
        return out

    def read_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Where [start, end) of the volume is read from (its own segments)."""
        return [(d, d + n) for _, d, n in self.pieces(self.segments, start, end)]

    def pieces(self, segs: list[tuple[int, int, int]], start: int,
               end: int) -> list[tuple[int, int, int]]:
        """[start, end) of the volume through ``segs``: (volume offset, disk
        offset, length) of each piece. A long list (a RAID0's chunks, sorted
        by volume offset as they are made) is searched by bisection."""
        if len(segs) <= 8:
            found = segs
        else:
            key = id(segs)
            cached = self._starts.get(key)
            if cached is None or cached[0] != len(segs):
                cached = self._starts[key] = (len(segs), [s[0] for s in segs])
            i = max(bisect_right(cached[1], start) - 1, 0)
            j = bisect_left(cached[1], end, lo=i)
            found = segs[i:j]
        out = []
        for vs, ds, n in found:
            lo, hi = max(start, vs), min(end, vs + n)
            if lo < hi:
                out.append((lo, ds + lo - vs, hi - lo))
        return out


def through(vol: Volume, segs: list[tuple[int, int, int]]
            ) -> tuple[list[tuple[int, int, int]], list[list[tuple[int, int, int]]]]:
    """Segments ``(outer offset, offset in vol, length)`` of something inside
    ``vol`` (an LV on a PV, an md array on its member) -> the same on the
    disk: (its segments, its mirrors' segments)."""
    own = [(o + lo - vo, d, n) for o, vo, k in segs for lo, d, n in vol.pieces(vol.segments, vo, vo + k)]
    mirrors = [[(o + lo - vo, d, n) for o, vo, k in segs for lo, d, n in vol.pieces(m, vo, vo + k)]
               for m in vol.mirrors]
    return own, [m for m in mirrors if m]


def read_at(source: Source, offset: int, length: int) -> bytes:
    """Read what there is of [offset, offset+length): short (or empty) past
    the end of the source, never an error for that."""
    if offset >= source.size or length <= 0:
        return b""
    return source.pread(offset, min(length, source.size - offset))


class VolumeSource(Source):
    """A volume's bytes, read through its segments from the disk's source
    (read-only; reads past the disk's end come back short)."""

    def __init__(self, disk: Source, volume: Volume):
        self.disk = disk
        self.volume = volume
        self.size = volume.size
        self.description = f"{volume.device} of {disk.description}"

    def pread(self, offset: int, length: int) -> bytes:
        out = []
        for s, e in self.volume.read_ranges(offset, offset + length):
            data = read_at(self.disk, s, e - s)
            out.append(data)
            if len(data) < e - s:
                break
        return b"".join(out)
