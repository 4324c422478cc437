"""Name the bytes of a request: offset range -> block-map objects.

A block map's ranges nest and overlap (a file inside a directory's
partition inside the whole disk). Per request we want, for each piece, only
the most specific object, the way bmaplogger printed ``read f /dev/sda1
/Boot/BCD`` rather than ``read p /dev/sda1``. Resolving overlaps per request
would cost an interval-tree query each time; instead ``BlockMap`` resolves
them once, when built, into disjoint segments that tile the whole offset
space (uncovered bytes are segments whose object is None). A lookup is then
one C-level ``bisect`` plus, for most requests, a single tuple.

Precedence where ranges overlap: higher ``TYPE_RANK`` (f > d > l > p > v);
among equal types the shorter range (the more precise statement); then the
entry that comes later in the map.
"""

from __future__ import annotations

import gc
import heapq
import json
import operator
import os
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import compress, islice
from typing import NamedTuple

from .format import (
    TYPE_RANK,
    BmapEntry,
    Record,
    is_structure_path,
    iter_records,
    merge_ranges,
    read_records,
)

__all__ = ["BlockMap", "BmapObject"]

# End of the last segment. NBD offsets are 64-bit, so nothing lies beyond.
_END_OF_SPACE = 1 << 64

_PARTITION_TYPES = frozenset("vpl")


class BmapObject(NamedTuple):
    """What a range belongs to: a device, partition, LV, directory or file.

    A named tuple, not a frozen dataclass: as immutable, hashed in C (the
    sinks count per object in dicts, per request) and made ten times faster
    (a frozen dataclass's ``__init__`` goes through ``object.__setattr__``:
    2.6 us an object, most of the time a map of 250,000 objects took to
    unpack in the server's process). It compares equal to the plain tuple
    ``(type, device, path)``, which no code holds.
    """

    type: str
    device: str
    path: str | None = None

    def __str__(self) -> str:
        # bmaplogger's spelling: "f /dev/sda1 /Boot/BCD", "p /dev/sda1"
        if self.path is None:
            return f"{self.type} {self.device}"
        return f"{self.type} {self.device} {self.path}"

    @property
    def rank(self) -> int:
        return TYPE_RANK[self.type]

    def names_disk(self, disk: str) -> bool:
        """Whether the object's device says it is on ``disk`` (/dev/sdb):
        the disk itself or one of its partitions (/dev/sdb1), not an LV
        or RAID array that may span several (the traces then say the disk)."""
        device = self.device
        return device == disk or (device.startswith(disk) and device[len(disk):].isdigit())

    @property
    def is_structure(self) -> bool:
        """A filesystem's own structure ($MFT, /$Journal...), not a file a
        person made (``format.is_structure_path``)."""
        return self.type == "f" and is_structure_path(self.path)


Piece = tuple[int, int, "BmapObject | None"]


class BlockMap:
    """Disjoint, precedence-resolved segments of one disk's block map.

    ``entries`` for other disks than ``disk`` are ignored (virt-bmap only
    ever wrote disk 1). Building costs O(n log n); lookups O(log n) plus the
    number of pieces returned.
    """

    def __init__(self, entries: Iterable[BmapEntry], disk: int = 1) -> None:
        self._build(((e.disk, e.start, e.end, e.type, e.device, e.path) for e in entries), disk)

    @classmethod
    def load(cls, path: str | os.PathLike[str], disk: int = 1) -> BlockMap:
        """Read a virt-bmap file (``BmapFormatError`` if malformed) and index it."""
        self = cls.__new__(cls)
        # plain tuples straight from the parser: no dataclass per line
        self._build(read_records(path), disk)
        return self

    @classmethod
    def from_lines(cls, lines: Iterable[bytes], name: str = "<bmap>", disk: int = 1) -> BlockMap:
        """Index block-map lines as they come (a stream: the text is never
        held whole); ``BmapFormatError`` names ``name`` and the line."""
        self = cls.__new__(cls)
        self._build(iter_records(lines, name), disk)
        return self

    def _build(self, records: Iterable[Record], disk: int) -> None:
        # A million-range build allocates millions of tuples and objects,
        # which would set off full garbage collections over and over; none
        # of it is cyclic garbage, so collection waits until the end.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._build_ungc(records, disk)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _build_ungc(self, records: Iterable[Record], disk: int) -> None:
        interned: dict[tuple[str, str, str | None], BmapObject] = {}
        starts: list[int] = []
        ends: list[int] = []
        objs: list[BmapObject] = []
        partitions: list[tuple[int, int, BmapObject]] = []
        for rdisk, start, end, type_, device, path in records:
            if rdisk != disk:
                continue
            key = (type_, device, path)
            obj = interned.get(key)
            if obj is None:
                if type_ not in TYPE_RANK:
                    raise ValueError(f"unknown block-map type {type_!r} for {device} {path}")
                obj = interned[key] = BmapObject(type_, device, path)
            if type_ in _PARTITION_TYPES:
                partitions.append((start, end, obj))
            if end <= start:
                raise ValueError(f"empty or inverted range {start:#x}-{end:#x} of {obj}")
            starts.append(start)
            ends.append(end)
            objs.append(obj)

        self._interned_dict = interned
        self._bounds, self._seg_objs = _flatten(starts, ends, objs)
        self._shift, self._buckets = _bucket_table(self._bounds)
        # The raw ranges stay, compactly, for ranges_of(); array('Q') is 8
        # bytes an entry where a list of ints would be about 36.
        self._entry_starts = array("Q", starts)
        self._entry_ends = array("Q", ends)
        self._entry_objs = objs
        partitions.sort(key=lambda p: (p[0], p[2].rank, -p[1]))
        self._partitions = partitions
        self._size_hint = max(ends, default=0)
        self._flat: bytes | None = None
        self._order: list[BmapObject] | None = None
        self._containers: list | None = None

    # -- the flat form: how a map crosses from the mapper's process --

    def to_flat(self) -> bytes:
        """The map, resolved, as one ``bytes``: the object table as JSON, then
        the entries, the segments and the bucket table as packed arrays.

        It is what the mapper's process (``worker.py``) answers with, so the
        server's process gets a map without parsing or resolving anything
        (``from_flat`` checks and unpacks it in C-level passes: measured
        0.3 s for 250,000 objects where ``_build`` takes 1.7-1.9 s), and what
        it hands a new mapper as the old map. Computed once per map and kept.
        """
        if self._flat is not None:
            return self._flat
        objects = self._order if self._order is not None else list(self._interned.values())
        index = {id(o): i for i, o in enumerate(objects)}
        entry_objs = array("I", [index[id(o)] for o in self._entry_objs])
        segs = array("i", [-1 if o is None else index[id(o)] for o in self._seg_objs])
        # The object table in columns: one letter each, a device number
        # each, and the paths joined by newlines (no path holds one: the
        # format cannot carry it; "" is no path), so that unpacking it is a
        # split and a map, not a loop over JSON lists.
        devices = sorted({o.device for o in objects})
        device_no = {d: i for i, d in enumerate(devices)}
        paths = "\n".join(o.path or "" for o in objects).encode("utf-8", "surrogateescape")
        header = json.dumps({
            "v": 1, "types": "".join(o.type for o in objects), "devices": devices,
            "paths": len(paths), "entries": len(entry_objs), "segments": len(segs),
            "shift": self._shift, "buckets": len(self._buckets),
            "bucket_type": self._buckets.typecode,
        }).encode()
        self._flat = b"".join((
            struct.pack("<I", len(header)), header,
            array("I", [device_no[o.device] for o in objects]).tobytes(), paths,
            self._entry_starts.tobytes(),
            self._entry_ends.tobytes(), entry_objs.tobytes(),
            array("Q", islice(self._bounds, len(segs))).tobytes(), segs.tobytes(),
            self._buckets.tobytes()))
        return self._flat

    @classmethod
    def from_flat(cls, blob: bytes | bytearray | memoryview) -> BlockMap:
        """A map from ``to_flat``'s bytes. They come from another process
        that parsed what a guest wrote, so nothing in them is trusted: every
        count, index, order and type is checked (``ValueError``), so that a
        map that passes can name wrongly at worst, never make a lookup fail."""
        gc_was_enabled = gc.isenabled()
        gc.disable()  # as in _build: hundreds of thousands of tuples, no cycles
        try:
            return cls._from_flat_ungc(memoryview(blob).cast("B"))
        finally:
            if gc_was_enabled:
                gc.enable()

    @classmethod
    def _from_flat_ungc(cls, mv: memoryview) -> BlockMap:
        try:
            (hlen,) = struct.unpack_from("<I", mv, 0)
            header = json.loads(bytes(mv[4:4 + hlen]))
            types, devices, plen = header["types"], header["devices"], int(header["paths"])
            n, m, nb = int(header["entries"]), int(header["segments"]), int(header["buckets"])
            shift, btype = int(header["shift"]), header["bucket_type"]
        except (struct.error, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"flat block map: bad header ({e})") from None
        if header.get("v") != 1 or not isinstance(types, str) or btype not in ("I", "Q") \
                or not set(types) <= TYPE_RANK.keys() or not isinstance(devices, list) \
                or not all(isinstance(d, str) for d in devices) \
                or min(n, m, nb, plen) < 0 or m < 1 or not 12 <= shift <= 64:
            raise ValueError("flat block map: bad header")
        pos = 4 + hlen

        def take(code: str, count: int) -> array:
            nonlocal pos
            a = array(code)
            size = a.itemsize * count
            if pos + size > len(mv):
                raise ValueError("flat block map: cut short")
            a.frombytes(mv[pos:pos + size])
            pos += size
            return a
        nobj = len(types)
        devs = take("I", nobj)
        if pos + plen > len(mv):
            raise ValueError("flat block map: cut short")
        paths = [p or None for p in
                 bytes(mv[pos:pos + plen]).decode("utf-8", "surrogateescape").split("\n")]
        pos += plen
        if nobj == 0:
            paths = []  # "".split("\n") is [""]
        if len(paths) != nobj or (nobj and max(devs) >= len(devices)):
            raise ValueError("flat block map: bad object table")
        # tuple.__new__ through partial: no Python frame per object
        objects = list(map(partial(tuple.__new__, BmapObject),
                           zip(types, map(devices.__getitem__, devs), paths, strict=True)))
        starts, ends, eobjs = take("Q", n), take("Q", n), take("I", n)
        bounds, segs, buckets = take("Q", m), take("i", m), take(btype, nb)
        if pos != len(mv):
            raise ValueError("flat block map: bytes after its end")
        if n and (max(eobjs) >= nobj or not all(map(operator.lt, starts, ends))):
            raise ValueError("flat block map: bad entries")
        if bounds[0] != 0 or not all(map(operator.lt, bounds, islice(bounds, 1, None))):
            raise ValueError("flat block map: segments out of order")
        if min(segs) < -1 or max(segs) >= nobj or any(map(operator.eq, segs, islice(segs, 1, None))):
            raise ValueError("flat block map: bad segments")
        covered = bounds[-1] if m > 1 else 0
        if nb != (covered >> shift) + 2 or max(buckets) >= m or \
                not all(map(operator.le, buckets, islice(buckets, 1, None))):
            raise ValueError("flat block map: bad bucket table")
        self = cls.__new__(cls)
        self._interned_dict = None  # made when first asked for (ranges_of)
        with_none = objects + [None]  # index -1: an uncovered segment
        self._seg_objs = list(map(with_none.__getitem__, segs))
        self._bounds = bounds.tolist()
        self._bounds.append(_END_OF_SPACE)
        self._shift, self._buckets = shift, buckets
        self._entry_starts, self._entry_ends = starts, ends
        self._entry_objs = list(map(objects.__getitem__, eobjs))
        vpl = list(map(_PARTITION_TYPES.__contains__, types))
        partitions = list(compress(zip(starts, ends, self._entry_objs, strict=True),
                                   map(vpl.__getitem__, eobjs)))
        partitions.sort(key=lambda p: (p[0], p[2].rank, -p[1]))
        self._partitions = partitions
        self._size_hint = max(ends, default=0)
        self._flat = bytes(mv)
        self._order = objects
        self._containers = None
        return self

    @property
    def _interned(self) -> dict[tuple[str, str, str | None], BmapObject]:
        if self._interned_dict is None:
            objects = self._order if self._order is not None else dict.fromkeys(self._entry_objs)
            self._interned_dict = {o: o for o in objects}
        return self._interned_dict

    # -- a patch: the map with some objects' ranges replaced --

    def patched(self, gone: Iterable[BmapObject],
                fresh: Iterable[tuple[int, int, BmapObject]]) -> BlockMap:
        """This map with every range of the objects ``gone`` removed and the
        ranges ``fresh`` ``(start, end, object)`` (files and directories
        only) added, as if built from those entries, at the cost of what
        changed: only the segments the removed and added ranges touch are
        resolved again (``incremental.py``'s remaps of a 500,000-object
        disk). This map is left as it is.

        Exact when no file or directory holds another's ranges inside its
        own unless it is a structure (``/$MFT`` holds resident files' records,
        ``/$InodeTable`` inline data): what a filesystem's map is. Anything
        else still gives a valid map (a lookup never fails), which may name
        a hidden range differently than a build would. ``fresh`` comes from
        the mapper's process: ``ValueError`` for a range or type a map
        cannot hold."""
        gone = set(gone)
        fresh = sorted(fresh, key=operator.itemgetter(0))
        interned = self._interned
        adds: list[tuple[int, int, BmapObject]] = []
        for start, end, obj in fresh:
            if not (0 <= start < end < _END_OF_SPACE) or obj.type not in ("f", "d"):
                raise ValueError(f"a patch cannot hold {start:#x}-{end:#x} {obj}")
            adds.append((start, end, interned.get(obj, obj)))
        drop = list(map(gone.__contains__, self._entry_objs))
        starts, ends, objs = self._entry_starts, self._entry_ends, self._entry_objs
        regions = merge_ranges([*zip(compress(starts, drop), compress(ends, drop), strict=True),
                                *((s, e) for s, e, _ in adds)])
        new = BlockMap.__new__(BlockMap)
        dropped = list(compress(range(len(drop)), drop))
        if len(dropped) <= 256:  # the usual patch: a few objects, deleted in place
            new._entry_starts, new._entry_ends = array("Q", starts), array("Q", ends)
            new._entry_objs = list(objs)
            for i in reversed(dropped):
                del new._entry_starts[i], new._entry_ends[i], new._entry_objs[i]
        else:
            kept = list(map(operator.not_, drop))
            new._entry_starts = array("Q", compress(starts, kept))
            new._entry_ends = array("Q", compress(ends, kept))
            new._entry_objs = list(compress(objs, kept))
        new._entry_starts.extend(s for s, _, _ in adds)
        new._entry_ends.extend(e for _, e, _ in adds)
        new._entry_objs += [o for _, _, o in adds]
        new._partitions = self._partitions
        new._size_hint = max(self._size_hint, max((e for _, e, _ in adds), default=0))
        new._flat = new._order = None
        still = set(new._entry_objs[len(new._entry_objs) - len(adds):])
        new._interned_dict = dict(interned)
        for o in gone:
            if o not in still:
                new._interned_dict.pop(o, None)
        for o in still:
            new._interned_dict.setdefault(o, o)
        new._containers = None
        bounds, segs = list(self._bounds), list(self._seg_objs)
        containers, dirs = self._container_entries()
        cstarts = [c[0] for c in containers]
        dstarts = [d[0] for d in dirs]
        dlong = max((d[1] - d[0] for d in dirs), default=0)
        add_starts = [a[0] for a in adds]
        old_bounds, old_segs = self._bounds, self._seg_objs
        windows: list[tuple[int, int]] = []  # old segments i..k of each region
        for a, b in reversed(regions):
            # Every range that may win somewhere in [a, b), whole (precedence
            # counts a range's length): the volumes and structures there, the
            # old winners that stay (a file's range holds no other's), the
            # ranges added.
            cands = [c for c in containers[:bisect_right(cstarts, b - 1)]
                     if c[1] > a and c[2] not in gone]
            # a directory's range may lie hidden under a structure (an NTFS
            # directory's resident index is in its $MFT record): every one
            cands += [d for d in dirs[bisect_right(dstarts, a - dlong):bisect_right(dstarts, b - 1)]
                      if d[1] > a and d[2] not in gone]
            i = bisect_right(old_bounds, a) - 1
            k = i
            while old_bounds[k] < b:
                o = old_segs[k]
                if o is not None and o not in gone and not _is_container(o) and o.type != "d":
                    cands.append((old_bounds[k], old_bounds[k + 1], o))
                k += 1
            cands += [c for c in adds[:bisect_right(add_starts, b - 1)] if c[1] > a]
            windows.append((i, k))
            sub_bounds, sub_objs = _flatten([c[0] for c in cands], [c[1] for c in cands],
                                            [c[2] for c in cands])
            # Old segments i..k-1 cover [old_bounds[i], old_bounds[k]) ⊇ [a, b):
            # they become their part before a, the new segments, their part after b.
            repl: list[tuple[int, BmapObject | None]] = []
            if old_bounds[i] < a:
                repl.append((old_bounds[i], old_segs[i]))
            j = bisect_right(sub_bounds, a) - 1
            while sub_bounds[j] < b:
                repl.append((max(sub_bounds[j], a), sub_objs[j]))
                j += 1
            if old_bounds[k] > b:
                repl.append((b, old_segs[k - 1]))
            merged: list[tuple[int, BmapObject | None]] = []
            for start, obj in repl:
                if not merged or merged[-1][1] != obj:
                    merged.append((start, obj))
            # Neighbours never share an object: the one before is as it was,
            # the one after is final (regions are spliced from the right).
            if i > 0 and segs[i - 1] == merged[0][1]:
                merged.pop(0)
            bounds[i:k] = [m[0] for m in merged]
            segs[i:k] = [m[1] for m in merged]
            after = i + len(merged)
            if 0 < after < len(segs) and segs[after] == segs[after - 1]:
                del bounds[after]
                del segs[after]
        new._bounds, new._seg_objs = bounds, segs
        new._containers = (
            sorted([c for c in containers if c[2] not in gone]
                   + [x for x in adds if _is_container(x[2])]),
            sorted([d for d in dirs if d[2] not in gone]
                   + [x for x in adds if x[2].type == "d" and not _is_container(x[2])]))
        new._shift = self._shift
        new._buckets = _patched_buckets(self._buckets, self._shift, old_bounds, bounds, windows)
        return new

    def _container_entries(self) -> tuple[list, list]:
        """(volumes and structures, directories): the entries whose ranges
        may hold or hide under others', by start; kept from patch to patch."""
        if self._containers is None:
            containers, dirs = [], []
            for s, e, o in zip(self._entry_starts, self._entry_ends, self._entry_objs,
                                 strict=True):
                if _is_container(o):
                    containers.append((s, e, o))
                elif o.type == "d":
                    dirs.append((s, e, o))
            containers.sort()
            dirs.sort()
            self._containers = (containers, dirs)
        return self._containers

    def object_table(self) -> list[BmapObject]:
        """Every object of the map, once each (in ``to_flat``'s order)."""
        if self._order is None:
            self._order = list(self._interned.values())
        return self._order

    # -- per-request queries (hot path: keep allocation to the result) --

    def lookup(self, offset: int, length: int) -> list[Piece]:
        """Pieces ``(start, end, object)`` of [offset, offset+length), in order.

        Pieces are clipped to the request; neighbours never share an object
        (segments are merged when built); bytes nothing covers have None.
        ``offset`` must be >= 0, as NBD offsets are.
        """
        if length <= 0:
            return []
        end = offset + length
        bounds = self._bounds
        buckets = self._buckets
        b = offset >> self._shift
        try:
            i = bisect_right(bounds, offset, buckets[b], buckets[b + 1] + 1) - 1
        except IndexError:  # beyond the bucket table: past the last range
            i = bisect_right(bounds, offset) - 1
        objs = self._seg_objs
        nxt = bounds[i + 1]
        if end <= nxt:  # the common case: the request sits in one segment
            return [(offset, end, objs[i])]
        pieces = [(offset, nxt, objs[i])]
        while True:
            i += 1
            start = nxt
            nxt = bounds[i + 1]
            if end <= nxt:
                pieces.append((start, end, objs[i]))
                return pieces
            pieces.append((start, nxt, objs[i]))

    def first(self, offset: int, length: int) -> BmapObject | None:
        """The object of the first piece of the request that has one, else None."""
        if length <= 0:
            return None
        bounds = self._bounds
        buckets = self._buckets
        b = offset >> self._shift
        try:
            i = bisect_right(bounds, offset, buckets[b], buckets[b + 1] + 1) - 1
        except IndexError:
            i = bisect_right(bounds, offset) - 1
        obj = self._seg_objs[i]
        if obj is not None:
            return obj
        # Uncovered segments never neighbour each other, so the next one, if
        # the request reaches it, has an object.
        if offset + length > bounds[i + 1]:
            return self._seg_objs[i + 1]
        return None

    def most_specific(self, offset: int, length: int) -> BmapObject | None:
        """The highest-ranked object anywhere in the request (first one on ties).

        This is bmaplogger's choice for its one-line-per-request trace: a read
        touching a directory block and then a file is named by the file.
        """
        best: BmapObject | None = None
        best_rank = -1
        for _, _, obj in self.lookup(offset, length):
            if obj is not None and TYPE_RANK[obj.type] > best_rank:
                best, best_rank = obj, TYPE_RANK[obj.type]
        return best

    def objects(self, offset: int, length: int) -> list[BmapObject]:
        """Distinct objects the request touches, in order of first appearance."""
        seen: list[BmapObject] = []
        for _, _, obj in self.lookup(offset, length):
            # few pieces per request, so a list beats hashing dataclasses
            if obj is not None and obj not in seen:
                seen.append(obj)
        return seen

    # -- whole-map queries --

    def partitions(self) -> list[tuple[int, int, BmapObject]]:
        """The v/p/l ranges as given (not flattened), sorted by start, outer first."""
        return list(self._partitions)

    def ranges_of(self, obj: BmapObject) -> list[tuple[int, int]]:
        """Where ``obj``'s entries lie (as given, overlaps merged), sorted.

        A linear scan (tens of ms on a million entries): meant for a UI
        action such as highlighting one file, not for per-request use.
        """
        interned = self._interned.get((obj.type, obj.device, obj.path))
        if interned is None:
            return []
        starts = self._entry_starts
        ends = self._entry_ends
        return merge_ranges(
            (starts[i], ends[i]) for i, o in enumerate(self._entry_objs) if o is interned
        )

    def entries(self) -> list[tuple[int, int, BmapObject]]:
        """Every entry as given: ``(start, end, object)``, in map order (a
        live remap keeps what a new walk could not read, and compares maps)."""
        return list(self.iter_entries())

    def iter_entries(self) -> Iterator[tuple[int, int, BmapObject]]:
        """``entries()`` one at a time (a recording streams a map out)."""
        return zip(self._entry_starts, self._entry_ends, self._entry_objs, strict=True)

    def __len__(self) -> int:
        """Number of entries (ranges) in the map for this disk."""
        return len(self._entry_objs)

    @property
    def size_hint(self) -> int:
        """The highest END in the map: a lower bound for the disk's size."""
        return self._size_hint

    @property
    def segment_count(self) -> int:
        """Number of disjoint segments after flattening (uncovered gaps included)."""
        return len(self._seg_objs)

    def __repr__(self) -> str:
        return f"<BlockMap {len(self)} entries, {self.segment_count} segments>"


def _is_container(obj: BmapObject) -> bool:
    t = obj.type
    if t in _PARTITION_TYPES:
        return True
    path = obj.path
    # "$" first: most paths have none, and that test is one C call
    return t == "f" and path is not None and "$" in path and is_structure_path(path)


def _flatten(
    starts: list[int], ends: list[int], objs: list[BmapObject]
) -> tuple[list[int], list[BmapObject | None]]:
    """Sweep the ranges into segments tiling [0, 2**64), each with its winner.

    Returns ``bounds`` (len m+1, bounds[0] == 0, bounds[m] == 2**64) and
    ``seg_objs`` (len m): segment k is [bounds[k], bounds[k+1]). Adjacent
    segments always differ in object, so lookups need no merging.

    The active ranges sit in a heap keyed by precedence; ranges that have
    ended are dropped lazily when they reach the top, which keeps each
    boundary point to a few heap operations.
    """
    n = len(starts)
    # One int per entry encodes the whole precedence, so heap comparisons
    # are single int compares: higher rank, then shorter, then later entry.
    # The key also carries the index, making every key unique.
    idx_bits = max(n, 1).bit_length()
    idx_mask = (1 << idx_bits) - 1
    top_rank = max(TYPE_RANK.values())
    order = sorted(range(n), key=starts.__getitem__)
    points = sorted(set(starts).union(ends))

    bounds: list[int] = [0]
    seg_objs: list[BmapObject | None] = [None]
    heap: list[int] = []
    push = heapq.heappush
    pop = heapq.heappop
    j = 0
    for p in points:
        while j < n and starts[order[j]] == p:
            k = order[j]
            j += 1
            key = (((top_rank - TYPE_RANK[objs[k].type]) << 64) | (ends[k] - p)) << idx_bits
            push(heap, key | (idx_mask - k))
        while heap and ends[idx_mask - (heap[0] & idx_mask)] <= p:
            pop(heap)
        winner = objs[idx_mask - (heap[0] & idx_mask)] if heap else None
        if winner is not seg_objs[-1]:
            if p == 0:  # a range starts at 0: no uncovered segment before it
                seg_objs[0] = winner
            else:
                bounds.append(p)
                seg_objs.append(winner)
    # Fresh ints, allocated in order, sit next to each other in memory: a
    # bisect then touches a few cache lines instead of ints scattered among
    # the entries they were parsed with (measured: ~30% faster lookups).
    bounds = array("Q", bounds).tolist()
    bounds.append(_END_OF_SPACE)
    return bounds, seg_objs


def _patched_buckets(old: array, shift: int, old_bounds: list[int], bounds: list[int],
                     windows: list[tuple[int, int]]) -> array:
    """The bucket table of ``bounds``, which differ from ``old_bounds`` only
    in the old segments ``i..k`` of each window: buckets there (and in the
    segment after, which a splice may merge) are found again by bisection,
    the others are the old ones shifted by the segments added before them.
    With a different coverage the whole table is made again."""
    covered = bounds[-2] if len(bounds) > 2 else 0
    nb = (covered >> shift) + 2
    if nb != len(old) or not windows:
        if nb == len(old) and bounds == old_bounds:
            return array(old.typecode, old)
        steps = range(0, nb << shift, 1 << shift)
        return array(old.typecode if len(bounds) <= 2**32 else "Q",
                     map((-1).__add__, map(partial(bisect_right, bounds), steps)))
    m = len(old_bounds) - 1
    spans: list[list[int]] = []  # [first offset, end offset) to find again, left to right
    for i, k in sorted(windows):
        lo, hi = old_bounds[i], old_bounds[min(k + 1, m)]
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    out = array(old.typecode)
    pos, delta, step = 0, 0, 1 << shift
    find = partial(bisect_right, bounds)
    for lo, hi in spans:
        first = min(-(-lo >> shift), nb)
        out.extend(map(delta.__add__, old[pos:first]))
        last = min(-(-hi >> shift), nb)
        out.extend(map((-1).__add__, map(find, range(first * step, last * step, step))))
        pos = last
        if hi < _END_OF_SPACE:
            delta = (find(hi) - 1) - (bisect_right(old_bounds, hi) - 1)
    out.extend(map(delta.__add__, old[pos:]))
    return out


def _bucket_table(bounds: list[int]) -> tuple[int, array]:
    """A coarse index over ``bounds``: ``buckets[b]`` is the segment holding
    offset ``b << shift``.

    A plain bisect over a million bounds is ~20 probes, each a likely cache
    miss on a scattered int object: that, not the Python around it, is what
    made lookups slow (~300k/s). With about one bucket per segment the
    bisect runs over the one or two segments of the offset's bucket. The
    table is an ``array`` (4 bytes a bucket) so it costs little memory and
    its items need no pointer chase.
    """
    nseg = len(bounds) - 1
    covered = bounds[-2] if nseg > 1 else 0  # start of the final, uncovered segment
    shift = max(12, (covered // max(nseg, 1)).bit_length())
    nbuckets = (covered >> shift) + 2
    buckets = array("I" if nseg < 2**32 else "Q")
    k = 0
    for b in range(nbuckets):
        offset = b << shift
        while bounds[k + 1] <= offset:
            k += 1
        buckets.append(k)
    return shift, buckets
