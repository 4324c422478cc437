"""Where a qcow2 image keeps each guest cluster: host offsets -> guest offsets.

Attached to a qcow2 guest, diskwatch serves the qcow2 *file* (QEMU's qcow2
driver stays in QEMU and sends diskwatch its file child's requests), so
requests come at host offsets of the image file. This module reads the
image's own tables and turns that around:

    host file:  | header | L1 | refcount table | refblock | L2 | data | data | L2 | data ...
                   \\__________ structures: /$qcow2-* ______/         |      |
                                                                     v      v
    guest disk: | ........ cluster g1 ........ | .... cluster g2 .... | ...

- ``read_layout(read, file_size)``: the header, the L1 table and every L2
  table it points to, read through ``read(offset, length)`` (the file as
  diskwatch serves it). The image is the guest's own: every number is
  checked against the file and against fixed bounds before it is used
  (``Qcow2Refused`` with one line otherwise), and what is read is bounded
  by the file's size (each table is read once, the L2 tables are distinct
  clusters inside the file).
- ``Layout.runs``: sorted (host_start, guest_start, length) of the data
  clusters, contiguous ones merged; ``guest_of(host)``; ``to_guest(start,
  end)``: a host range split into its guest ranges and the host bytes no
  run holds (bounded pieces: the remapper's input, follow.py);
  ``in_structure``: a host range inside the qcow2's own structures.
- ``host_map(layout, guest_map)``: a ``BlockMap`` in host offsets: every data
  run named with the guest map's objects at its guest offsets (the most
  specific ones, plus the partitions that hold them), and the qcow2's own
  structures as ``f /dev/sda /$qcow2-header`` (``-L1``, ``-L2``,
  ``-refcounts``, ``-snapshots``), structures the way bmap/format.py's
  ``is_structure_path`` knows them.
- ``Layout.reread_l2(read, l1_indexes)``: a guest that allocates writes new
  L2 entries (and new L2 tables, and L1 entries): the tables written are
  read again and the runs rebuilt (``Qcow2Follower`` in follow.py decides
  when).
- ``GuestView``: the guest's disk read through the layout as last read
  (unallocated clusters from the raw backing file, zero clusters as zeros):
  what the map made at attach is made from, and what a live remap reads.

Refused with one line each: not qcow2, version other than 2 and 3, absurd
cluster sizes and table sizes, tables outside the file, encryption, an
external data file, extended L2 entries (subclusters), compressed clusters,
the corrupt bit.
"""

from __future__ import annotations

import errno
import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DiskwatchError
from ..sources.base import Source, SourceError

MAGIC = b"QFI\xfb"
#: QEMU's own limits (block/qcow2.h): 512 B to 2 MiB clusters, an L1 table
#: of at most 32 MiB, a refcount table of at most 8 MiB.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
#: a guest disk larger than this (QEMU's QCOW_MAX_... is 2^63 but no guest has it)
MAX_VIRTUAL_SIZE = 1 << 56
#: data runs kept (contiguous clusters merge into one): past this the image is
#: refused rather than held in memory (each run costs about 100 bytes)
MAX_RUNS = 2_000_000
MAX_SNAPSHOTS = 65536
#: data clusters kept (about 130 bytes each in memory)
MAX_CLUSTERS = 4_000_000

#: L1/L2 entry bits (docs/interop/qcow2.txt)
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COMPRESSED = 1 << 62
ZERO_FLAG = 1
#: incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                  | INCOMPAT_EXTL2)

#: the names of the qcow2's own structures in a map (bmap/format.py STRUCTURE_NAMES)
HEADER = "/$qcow2-header"
L1 = "/$qcow2-L1"
L2 = "/$qcow2-L2"
REFCOUNTS = "/$qcow2-refcounts"
SNAPSHOTS = "/$qcow2-snapshots"


class Qcow2Refused(DiskwatchError):
    """The image cannot be mapped: one line says why."""


Read = Callable[[int, int], bytes]


@dataclass
class Layout:
    """One qcow2 image's tables, as last read."""

    version: int
    cluster_bits: int
    virtual_size: int
    l1_offset: int
    l1_size: int
    refcount_table_offset: int
    refcount_table_clusters: int
    snapshots_offset: int
    nb_snapshots: int
    backing_file: str
    #: L1 entries: host offset of each L2 table (0: none)
    l1: list[int] = field(default_factory=list)
    #: per L1 index with a table: its (guest_start, host_start) data clusters
    #: (host 0: a zero cluster with no host cluster)
    l2: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: guest offsets of the clusters that read as zeros (the zero flag)
    zeros: dict[int, list[int]] = field(default_factory=dict)
    #: host offsets of the refcount blocks
    refblocks: list[int] = field(default_factory=list)
    #: host size of the file when last read
    file_size: int = 0
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    _run_starts: list[int] = field(default_factory=list)
    #: host offset of each L2 table -> its L1 index (L1 entries are distinct)
    _l2_at: dict[int, int] = field(default_factory=dict)
    #: (l2, zeros) as one value, replaced whole by ``reread``: what another
    #: thread (the mapper's reads, ``GuestView``) takes in one step
    tables: tuple = (None, None)
    #: the structures sorted by start, and their starts (``in_structure``)
    sorted_structures: list[tuple[int, int, str]] = field(default_factory=list)
    _struct_starts: list[int] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    def guest_of(self, host: int) -> int | None:
        """The guest offset of host offset ``host``, or None (not a data cluster)."""
        i = bisect_right(self._run_starts, host) - 1
        if i < 0:
            return None
        h, g, n = self.runs[i]
        return g + (host - h) if host < h + n else None

    def in_data(self, start: int, end: int) -> bool:
        """True if host bytes [start, end) all lie in one known data run."""
        i = bisect_right(self._run_starts, start) - 1
        if i < 0:
            return False
        h, _, n = self.runs[i]
        return end <= h + n

    def in_structure(self, start: int, end: int) -> bool:
        """True if host bytes [start, end) all lie in one of the image's structures."""
        i = bisect_right(self._struct_starts, start) - 1
        return i >= 0 and end <= self.sorted_structures[i][1]

    def to_guest(self, start: int, end: int, most: int = 256
                 ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
        """Host bytes [start, end) split by the data runs: (their guest
        ranges, the host ranges no run holds). At most ``most`` pieces
        (a write over more runs than that: None, the caller treats it as
        unknown); the time is bounded by ``most``, not by the write."""
        starts, runs = self._run_starts, self.runs
        guest: list[tuple[int, int]] = []
        rest: list[tuple[int, int]] = []
        i = max(bisect_right(starts, start) - 1, 0)
        pos = start
        while pos < end:
            if len(guest) + len(rest) >= most:
                return None
            if i < len(runs) and runs[i][0] + runs[i][2] <= pos:
                i += 1
                continue
            if i >= len(runs) or runs[i][0] >= end:
                rest.append((pos, end))
                break
            h, g, n = runs[i]
            if pos < h:
                rest.append((pos, h))
                pos = h
            stop = min(end, h + n)
            guest.append((g + pos - h, g + stop - h))
            pos = stop
            i += 1
        return guest, rest

    def l2_index_of(self, host: int) -> int | None:
        """The L1 index whose L2 table holds host offset ``host``, or None."""
        return self._l2_at.get(host - host % self.cluster_size)

    def structures(self) -> list[tuple[int, int, str]]:
        """(start, end, name) of the image's own structures."""
        cs = self.cluster_size
        out = [(0, cs, HEADER)]
        if self.l1_size:
            out.append((self.l1_offset, self.l1_offset + self.l1_size * 8, L1))
        out.extend((off, off + cs, L2) for off in sorted(set(self.l1)) if off)
        out.append((self.refcount_table_offset,
                    self.refcount_table_offset + self.refcount_table_clusters * cs, REFCOUNTS))
        out.extend((off, off + cs, REFCOUNTS) for off in self.refblocks)
        if self.nb_snapshots and self.snapshots_offset:
            out.append((self.snapshots_offset, self.snapshots_offset + cs, SNAPSHOTS))
        return out

    def data_end(self) -> int:
        """The end of the highest cluster the tables know (data or structure)."""
        end = max(e for _, e, _ in self.structures())
        if self.runs:
            h, _, n = self.runs[-1]
            end = max(end, h + n)
        return end

    # --- reading the tables again ---------------------------------------------------

    def reread(self, read: Read, file_size: int, l1_indexes: set[int] | None = None) -> None:
        """Read the L1 table again, and the L2 tables it now points to that are
        new, moved, or in ``l1_indexes`` (written since); rebuild the runs.
        All or nothing: a table that does not pass the checks (read while
        QEMU rewrote it, say) leaves the layout as it was (Qcow2Refused)."""
        old = self.l1
        l1 = _read_l1(read, self, file_size)
        again = set(l1_indexes or ())
        for i, off in enumerate(l1):
            if off != (old[i] if i < len(old) else 0):
                again.add(i)
        l2 = dict(self.l2)
        zeros = dict(self.zeros)
        clusters = sum(len(t) for i, t in l2.items() if i not in again)
        for i in sorted(again):
            off = l1[i] if 0 <= i < len(l1) else 0
            if off:
                l2[i], zeros[i] = _read_l2(read, self, i, off, file_size)
                clusters += len(l2[i])
                # checked as the tables come: memory stays bounded whatever the L1 says
                _check(clusters <= MAX_CLUSTERS, f"more than {MAX_CLUSTERS} data clusters, "
                                                 "more than diskwatch keeps")
            else:
                l2.pop(i, None)
                zeros.pop(i, None)
        refblocks = _read_refblocks(read, self, file_size)
        runs = _runs(l2, self.cluster_size)
        self.l1, self.l2, self.zeros, self.refblocks = l1, l2, zeros, refblocks
        self.file_size = file_size
        self.runs = runs
        self._run_starts = [r[0] for r in runs]
        self._l2_at = {off: i for i, off in enumerate(l1) if off}
        self.tables = (l2, zeros)
        self.sorted_structures = sorted(self.structures())
        self._struct_starts = [st[0] for st in self.sorted_structures]


def _runs(l2: dict[int, list[tuple[int, int]]], cs: int) -> list[tuple[int, int, int]]:
    """The data clusters sorted by host offset, contiguous ones (in host and
    guest alike) merged."""
    pairs = sorted((h, g) for table in l2.values() for g, h in table if h)
    runs: list[tuple[int, int, int]] = []
    for h, g in pairs:
        if runs:
            rh, rg, rn = runs[-1]
            if rh + rn == h and rg + rn == g:
                runs[-1] = (rh, rg, rn + cs)
                continue
        runs.append((h, g, cs))
    if len(runs) > MAX_RUNS:
        raise Qcow2Refused(f"qcow2 image: {len(runs)} separate data runs, more than "
                           f"{MAX_RUNS} diskwatch keeps")
    return runs


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise Qcow2Refused(f"qcow2 image: {what}; not attaching (the image is refused, "
                           "nothing was moved)")


def _within(offset: int, length: int, file_size: int, cs: int, what: str) -> None:
    _check(offset % cs == 0, f"{what} at {offset:#x} is not cluster-aligned")
    _check(0 < offset and offset + length <= file_size,
           f"{what} ({length} bytes at {offset:#x}) lies outside the file ({file_size} bytes)")


def _read_exact(read: Read, offset: int, length: int) -> bytes:
    data = read(offset, length)
    _check(len(data) == length, f"short read of {length} bytes at {offset:#x}")
    return data


def parse_header(head: bytes, file_size: int) -> Layout:
    """The header (the file's first bytes, at least 104 of them), checked."""
    _check(len(head) >= 72 and head[:4] == MAGIC, "not a qcow2 image (no QFI\\xfb magic)")
    (version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off,
     rt_off, rt_clusters, nb_snap, snap_off) = struct.unpack_from(">IQIIQIIQQIIQ", head, 4)
    _check(version in (2, 3), f"version {version} (only 2 and 3 exist)")
    _check(MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS,
           f"cluster_bits {cluster_bits} (QEMU allows {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS})")
    cs = 1 << cluster_bits
    _check(crypt == 0, "encrypted (attach maps unencrypted images only)")
    _check(size <= MAX_VIRTUAL_SIZE, f"virtual size {size} bytes is absurd")
    header_length = 72
    incompat = 0
    if version == 3:
        _check(len(head) >= 104, "header shorter than version 3's 104 bytes")
        incompat, _compat, _autoclear, refcount_order, header_length = struct.unpack_from(
            ">QQQII", head, 72)
        _check(104 <= header_length <= cs, f"header length {header_length}")
        _check(refcount_order <= 6, f"refcount order {refcount_order} (at most 6)")
        _check(not incompat & ~KNOWN_INCOMPAT,
               f"unknown incompatible features {incompat & ~KNOWN_INCOMPAT:#x}")
        _check(not incompat & INCOMPAT_DATA_FILE,
               "an external data file (data-file=): attach serves images whose data is "
               "in the image file only")
        _check(not incompat & INCOMPAT_EXTL2,
               "extended L2 entries (extended_l2=on, subclusters): not supported by attach")
        _check(not incompat & INCOMPAT_CORRUPT, "marked corrupt (run qemu-img check -r)")
    _check(file_size >= cs, f"the file ({file_size} bytes) is smaller than one cluster")
    l2_entries = cs // 8
    needed_l1 = -(-size // (cs * l2_entries))
    _check(needed_l1 <= l1_size, f"L1 table of {l1_size} entries, fewer than the "
                                 f"{needed_l1} a disk of {size} bytes needs")
    _check(l1_size * 8 <= MAX_L1_BYTES, f"L1 table of {l1_size} entries (at most "
                                        f"{MAX_L1_BYTES // 8})")
    if l1_size:
        _within(l1_off, l1_size * 8, file_size, cs, "L1 table")
    _check(0 < rt_clusters and rt_clusters * cs <= MAX_REFTABLE_BYTES,
           f"refcount table of {rt_clusters} clusters")
    _within(rt_off, rt_clusters * cs, file_size, cs, "refcount table")
    _check(nb_snap <= MAX_SNAPSHOTS, f"{nb_snap} snapshots (at most {MAX_SNAPSHOTS})")
    if nb_snap:
        _check(snap_off % 8 == 0 and 0 < snap_off < file_size, "snapshot table outside the file")
    backing = ""
    if backing_off:
        _check(backing_len <= 1023 and header_length <= backing_off
               and backing_off + backing_len <= min(cs, len(head)),
               "backing file name outside the header cluster")
        backing = head[backing_off:backing_off + backing_len].decode("utf-8", "replace")
    return Layout(version=version, cluster_bits=cluster_bits, virtual_size=size,
                  l1_offset=l1_off, l1_size=l1_size, refcount_table_offset=rt_off,
                  refcount_table_clusters=rt_clusters, snapshots_offset=snap_off,
                  nb_snapshots=nb_snap, backing_file=backing, file_size=file_size)


def _read_l1(read: Read, lay: Layout, file_size: int) -> list[int]:
    if not lay.l1_size:
        return []
    raw = _read_exact(read, lay.l1_offset, lay.l1_size * 8)
    cs = lay.cluster_size
    out = []
    for i, (entry,) in enumerate(struct.iter_unpack(">Q", raw)):
        off = entry & OFFSET_MASK
        if off:
            _within(off, cs, file_size, cs, f"L2 table {i}")
        out.append(off)
    used = [o for o in out if o]
    _check(len(used) == len(set(used)), "two L1 entries point to one L2 table")
    return out


def _read_l2(read: Read, lay: Layout, index: int, offset: int,
             file_size: int) -> tuple[list[tuple[int, int]], list[int]]:
    cs = lay.cluster_size
    raw = _read_exact(read, offset, cs)
    base = index * lay.l2_entries * cs
    out: list[tuple[int, int]] = []
    zeros: list[int] = []
    for j, (entry,) in enumerate(struct.iter_unpack(">Q", raw)):
        if not entry & ~(1 << 63):
            continue  # unallocated: the backing file's (or zeros)
        guest = base + j * cs
        if guest >= lay.virtual_size:
            break  # past the disk's end: never read
        _check(not entry & COMPRESSED,
               "compressed clusters (qemu-img convert -c): attach maps uncompressed images "
               "only (qemu-img convert -O qcow2 makes one)")
        host = entry & OFFSET_MASK
        if entry & ZERO_FLAG and lay.version == 3:
            zeros.append(guest)
        _check(host % cs == 0, f"data cluster of guest offset {guest:#x} at {host:#x} is not "
                               "cluster-aligned")
        if host or entry & ZERO_FLAG:
            out.append((guest, host))
    return out, zeros


def _read_refblocks(read: Read, lay: Layout, file_size: int) -> list[int]:
    cs = lay.cluster_size
    raw = _read_exact(read, lay.refcount_table_offset, lay.refcount_table_clusters * cs)
    out = []
    for (entry,) in struct.iter_unpack(">Q", raw):
        off = entry & ~0x1FF
        if off:
            if off % cs or off + cs > file_size:
                continue  # a refcount block QEMU has not written yet (or nonsense): unnamed
            out.append(off)
    return out


def read_layout(read: Read, file_size: int) -> Layout:
    """Every table of the image (see the module docstring)."""
    head = read(0, min(file_size, 1 << MIN_CLUSTER_BITS))
    if len(head) >= 24 and head[:4] == MAGIC:
        (bits,) = struct.unpack_from(">I", head, 20)
        if MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS and file_size >= 1 << bits:
            head = _read_exact(read, 0, 1 << bits)  # the header cluster, whole
    lay = parse_header(head, file_size)
    lay.reread(read, file_size, set(range(lay.l1_size)))
    return lay


def read_file_layout(path: str) -> Layout:
    """``read_layout`` of a file (a test, ``diskwatch attach`` before the move)."""
    import os
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_layout(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size)
    finally:
        os.close(fd)


# --- naming host offsets ---------------------------------------------------------------


def host_entries(lay: Layout, guest_map, device: str = "/dev/sda",
                 structures: bool = True) -> list:
    """The map entries of the image file (BmapEntry, disk 1), see the module
    docstring; without ``structures``, the qcow2's own are left out (a
    remap's journal map, translated)."""
    from ..bmap.format import BmapEntry
    out: list = []
    add = out.append
    parts = guest_map.partitions() if guest_map is not None else []
    for h, g, n in lay.runs:
        if guest_map is None:
            continue
        for s, e, obj in guest_map.lookup(g, n):
            if obj is not None:
                add(BmapEntry(1, h + s - g, h + e - g, obj.type, obj.device, obj.path))
        for ps, pe, obj in parts:
            s, e = max(ps, g), min(pe, g + n)
            if s < e:
                add(BmapEntry(1, h + s - g, h + e - g, obj.type, obj.device, obj.path))
    if structures:
        for s, e, name in lay.structures():
            add(BmapEntry(1, s, e, "f", device, name))
    return out


def host_map(lay: Layout, guest_map, device: str = "/dev/sda", structures: bool = True):
    """The host-offset ``BlockMap`` (see the module docstring)."""
    from ..bmap.index import BlockMap
    return BlockMap(host_entries(lay, guest_map, device, structures))


# --- the guest's disk, read through the layout -----------------------------------------


class GuestView(Source):
    """The guest's disk as a read-only source: data clusters from the image
    file, unallocated ones from the backing file (raw; zeros past its end or
    without one), zero clusters as zeros. What the map made at attach reads,
    and every live remap (in the mapper process, through this source: the
    parsers of guest data never run here).

    It reads through the layout as it is *now*: the follower reads the
    tables again in the pump's thread while a remap reads here in its own,
    so each read takes the layout's ``tables`` once (one value, replaced
    whole) and looks its clusters up in them; an L2 table's clusters are
    indexed once per version of the table (at most ``CACHED_TABLES`` kept)."""

    #: L2 tables indexed for lookups, at most (past it the index starts over)
    CACHED_TABLES = 4096

    def __init__(self, image: str, lay: Layout, backing: str | None = None):
        import os
        self.lay = lay
        self.size = lay.virtual_size
        self.description = f"qcow2 {image} (the guest's view)"
        self.fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        self.backing_fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC) if backing else None
        self.backing_size = os.fstat(self.backing_fd).st_size if backing else 0
        #: L1 index -> (the table indexed, {guest: host}, zero clusters)
        self._index: dict[int, tuple[list, dict[int, int], set[int]]] = {}

    def _cluster(self, tables: tuple, base: int) -> tuple[int, bool]:
        """(host offset or 0, reads as zeros) of the guest cluster at ``base``."""
        l2, zeros = tables
        lay = self.lay
        i = base // (lay.cluster_size * lay.l2_entries)
        table = l2.get(i)
        if table is None:
            return 0, False
        index = self._index.get(i)
        if index is None or index[0] is not table:
            if len(self._index) >= self.CACHED_TABLES:
                self._index.clear()
            index = self._index[i] = (table, dict(table), set(zeros.get(i, ())))
        return index[1].get(base, 0), base in index[2]

    def pread(self, offset: int, length: int) -> bytes:
        import os
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SourceError(errno.EINVAL, "read past the end of the guest's disk")
        cs = self.lay.cluster_size
        tables = self.lay.tables
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            base = pos - pos % cs
            n = min(end, base + cs) - pos
            host, zero = self._cluster(tables, base)
            if zero:
                data = b""
            elif host:
                data = os.pread(self.fd, n, host + pos - base)
            elif self.backing_fd is not None and pos < self.backing_size:
                data = os.pread(self.backing_fd, min(n, self.backing_size - pos), pos)
            else:
                data = b""
            if len(data) < n:
                data += bytes(n - len(data))
            out += data
            pos += n
        return bytes(out)

    def close(self) -> None:
        import os
        for fd in (self.fd, self.backing_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = -1
        self.backing_fd = None
