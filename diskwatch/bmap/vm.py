"""The disks of a VM mapped together: one address space, each disk at a base.

A volume group whose physical volumes are on two disks, or an md RAID1
whose members are, is read through pieces of several disks. The mapper
sees the VM's disks end to end, one ``DiskSet``::

    DiskSet offset:  0 ........ size1 | size1 ........ size1+size2 | ...
                     disk 1 (/dev/sda) | disk 2 (/dev/sdb)          | ...
                     base 0            | base size1                 |

so a ``Volume``'s segments, ``VolumeSource`` and every filesystem walker
work unchanged, with offsets in that space; ``split_by_disk`` then gives
each entry its disk's index (virt-bmap's first column) and the disk's own
offsets. Nothing crosses a disk's end: each disk's partitions are found on
that disk alone and cut at its end (a table saying more is the guest's
word), and everything inside them is bounded by them.

The parent serves the mapper's reads from a ``DiskSet`` of the served
sources (``make.py``), so the worker's protocol is the one of one disk:
each read inside the set, at most ``MAX_READ`` (``worker.py``).
"""

from __future__ import annotations

from bisect import bisect_right

from ..sources.base import Source
from .format import BmapEntry
from .volumes import Volume, VolumeSource, assemble, disk_structures, find_partitions

__all__ = ["DiskSet", "disk_of", "find_vm_volumes", "split_by_disk"]


class DiskSet(Source):
    """The VM's disks end to end (read-only): a read is cut at each disk's end."""

    blocking = True

    def __init__(self, disks: list[Source]):
        self.disks = list(disks)
        self.bases: list[int] = []
        base = 0
        for d in self.disks:
            self.bases.append(base)
            base += d.size
        self.size = base
        self.description = " + ".join(d.description or "a disk" for d in self.disks)

    def layout(self, names: list[str]) -> list[tuple[str, int, int]]:
        """(device, base, size) of each disk."""
        return [(n, b, d.size) for n, b, d in zip(names, self.bases, self.disks, strict=True)]

    def pread(self, offset: int, length: int) -> bytes:
        out = []
        end = min(offset + length, self.size)
        i = bisect_right(self.bases, offset) - 1
        while offset < end and 0 <= i < len(self.disks):
            base, disk = self.bases[i], self.disks[i]
            n = min(end, base + disk.size) - offset
            if n > 0:
                out.append(disk.pread(offset - base, n))
                offset += n
            i += 1
        return b"".join(out)


def find_vm_volumes(source: Source, disks: list[tuple[str, int, int]]
                    ) -> tuple[list[Volume], list[str], list[tuple[int, dict]]]:
    """Every disk's partitions (found on that disk alone, cut at its end),
    then what they hold together (``assemble``: md arrays and LVM volume
    groups across the disks, LUKS payloads). ``disks``: (device, base, size)
    in ``source`` (a ``DiskSet``). Returns (volumes, warnings, each disk's
    partition-table structures as (base, ``disk_structures``))."""
    warnings: list[str] = []
    parts: list[Volume] = []
    structures: list[tuple[int, dict]] = []
    for device, base, size in disks:
        disk = VolumeSource(source, Volume(device, "v", [(0, base, size)]))
        found, said = find_partitions(disk, device)
        warnings += said
        structures.append((base, disk_structures(disk, found)))
        for v in found:
            if any(d + n > size for _, d, n in v.segments):
                warnings.append(
                    f"{v.device}: ends past the end of the disk ({size} bytes; a truncated "
                    "image?): what lies beyond cannot be read")
            v.segments = [(o, base + d, min(n, size - d)) for o, d, n in v.segments
                          if 0 <= d < size]
            parts.append(v)
    return parts + assemble(source, parts, warnings), warnings, structures


def split_by_disk(entries: list[BmapEntry], disks: list[tuple[str, int, int]]
                  ) -> list[BmapEntry]:
    """Entries in the ``DiskSet``'s space -> each on its disk (index from 1,
    offsets the disk's own); an entry over a disk's end is cut there."""
    bases = [b for _, b, _ in disks]
    out = []
    for e in entries:
        start, end = e.start, e.end
        i = bisect_right(bases, start) - 1
        while start < end and 0 <= i < len(disks):
            _, base, size = disks[i]
            hi = min(end, base + size)
            if hi > start:
                out.append(BmapEntry(i + 1, start - base, hi - base, e.type, e.device, e.path))
                start = hi
            i += 1
    return out


def disk_of(v: Volume, disks: list[tuple[str, int, int]]) -> list[int]:
    """The disks (indices from 1) ``v``'s bytes are on, every copy's."""
    bases = [b for _, b, _ in disks]
    return sorted({bisect_right(bases, d) for _, d, n in v.all_segments() if n > 0})

