"""A qcow2 guest watched through its image file: what the session names
requests with, and how that follows the guest's allocations and files.

``Qcow2View`` is what ``diskwatch attach`` hands the runner for each qcow2
disk (``RunConfig.attach_views``, by the disk's export):

- ``open_source()``: the qcow2 file as served (attach/growing.py), the
  disk's export (``""`` for the first disk, ``sdb``, ``sdc``... for the
  others); ``backing_export``: the raw backing file, read-only, on the
  same socket as ``backing`` for the first disk and ``EXPORT-backing``
  (``sdb-backing``...) for the others (its offsets are guest offsets),
  when its reads are watched.
- ``map_source()``: the guest's disk read through the qcow2 mapping
  (``qcow2map.GuestView``, the layout as it is now): a ``--bmap`` that does
  not exist is made from it, in the mapper process, as for any disk, and
  so is every live remap.
- ``views(guest_map)``: the maps the session uses: the image file's, in host
  offsets (``qcow2map.host_map``), and the backing's (the guest map itself).
- ``follower(swap, export)``: a sink that follows allocations and, given a
  remapper (``remap_with``), the guest's files (below).

Following allocations. The guest's writes land at host offsets; those
inside the data clusters the tables knew are plain data. Any other write
(an L2 table, the L1 table, the header, a refcount block, a cluster past
the known ones: a new allocation) marks the tables to be read again: the
L1 table, and the L2 tables that were written or that the L1 now points to
anew (``Layout.reread``), at most every ``REREAD_EVERY`` seconds, in the
pump's thread; when the runs or the structures changed, the host map is
made again and swapped in (``Session.swap_map``: the writes it names that
were unnamed until then are named late, as after a remap). QEMU writes a
new cluster's data before the L2 entry that points to it (and the entry
often only at the guest's next flush), so the data is unnamed until then,
and named late once the entry is read.

Following the guest's files (the live remap). The remapper
(diskwatch/remap.py, its mapper process) works in the guest's offsets, as
on a raw disk: it reads ``map_source()`` (the newest tables: the follower's
last reading), its map is the guest map, and what it is told was written
is in guest offsets. The follower translates for it:

- a write inside known data clusters: its guest ranges, looked up in the
  guest map, are handed to the remapper at once;
- a write no data run holds yet (a new cluster: its L2 entry comes later)
  is kept (host range, at most ``PENDING_KEPT``, for ``PENDING_SECONDS``)
  and handed on, in guest offsets, once a reading of the tables places it;
  a write into the qcow2's own structures is not the guest's and is not
  handed on; one that cannot be kept or split (more than ``MAX_PIECES``
  runs) is told as unknown (``Remapper.unknown``: the next remap is the
  whole walk);
- a remap's result (a guest map, and the journal map) is translated with
  the tables as they are when it arrives (``views``), swapped in for the
  image file's export (late naming as for any remap) and, as it is, for
  the backing export.

Both swaps happen in the pump's thread, in this sink's ``tick``: the
tables first (then what they place goes to the remapper), then a remap's
result; each translation uses the newest tables and the newest guest map,
so the two never undo each other, and no round sees two maps.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

from ..pipeline.sink import SinkBase
from ..wire import WRITE_COMMANDS
from .growing import GrowingFile, ceiling
from .qcow2map import GuestView, Layout, Qcow2Refused, host_map, read_file_layout

log = logging.getLogger("diskwatch.attach")

#: the first disk's backing file's export on diskwatch's socket (the
#: others': ``backing_export_of``)
BACKING_EXPORT = "backing"
#: seconds between two readings of the tables (a guest allocating without
#: pause does not make the pump read them at every round)
REREAD_EVERY = 0.2
#: written L2 tables remembered between two readings; past it, all are read
MAX_DIRTY = 4096
#: writes no data run held yet, kept until a reading of the tables places
#: them (host ranges: about 100 bytes each), at most, and for how long
PENDING_KEPT = 4096
PENDING_SECONDS = 30.0
#: data runs one write is split into for the remapper, at most
MAX_PIECES = 256


def backing_export_of(export: str) -> str:
    """The backing file's export of the disk served as ``export``: ``backing``
    for the first disk (``""``), ``sdb-backing`` for ``sdb``... (no disk's
    export ends so: theirs are ``sdb``, ``sdc``...)."""
    return f"{export}-backing" if export else BACKING_EXPORT


class Qcow2View:
    """See the module docstring."""

    def __init__(self, image: str, layout: Layout, readonly: bool,
                 backing: str = "", backing_size: int = 0):
        self.image = image
        self.layout = layout
        self.readonly = readonly
        self.backing = backing
        self.backing_size = backing_size
        self.export_size = ceiling(layout.file_size, layout.virtual_size, layout.cluster_size)
        self.source: GrowingFile | None = None
        self.guest_map = None
        #: the image file's map made from ``guest_map`` by the last ``views``
        self.host = None
        #: the disk's export on the socket and its device (``place``)
        self.export = ""
        self.device = "/dev/sda"

    def place(self, export: str, device: str) -> None:
        """The disk is served as ``export`` and named ``device`` (/dev/sdb...)."""
        self.export, self.device = export, device

    @property
    def backing_export(self) -> str:
        return backing_export_of(self.export) if self.backing else ""

    def open_source(self) -> GrowingFile:
        self.source = GrowingFile(self.image, self.export_size, readonly=self.readonly)
        return self.source

    def map_source(self) -> GuestView:
        return GuestView(self.image, self.layout, self.backing or None)

    def views(self, guest_map) -> tuple:
        """(the image file's map, [the backing's map] or []), with the tables
        as they are now; ``guest_map`` becomes the map the follower and a
        remap translate."""
        self.guest_map = guest_map
        self.host = host_map(self.layout, guest_map, self.device)
        return self.host, ([guest_map] if self.backing else [])

    def follower(self, swap: Callable[[object, str], None], export: str | None = None
                 ) -> Qcow2Follower:
        return Qcow2Follower(self, swap, self.export if export is None else export)


class Qcow2Follower(SinkBase):
    """The sink that follows allocations, and hands a remapper the guest's
    writes in guest offsets (the module docstring)."""

    def __init__(self, view: Qcow2View, swap: Callable[[object, str], None], export: str = ""):
        self.view = view
        self.swap = swap
        self.export = export
        # The tables are read once more at the first round: those read before
        # the move may miss what QEMU's qcow2 cache held (blockdev-reopen
        # flushes it through the old file child as the child moves).
        self.dirty = True
        self.l2_written: set[int] | None = None  # None: too many, read them all
        self.last = float("-inf")
        self.rereads = 0
        self.failed = ""
        #: the live remap (``remap_with``): a ``remap.Remapper`` over the
        #: guest's view, fed here in guest offsets
        self.remapper = None
        self._guest_source: GuestView | None = None
        self._take: Callable[[object], None] = lambda result: None
        self._swap_backing: Callable[[object, str], None] | None = None
        #: (time, request, host start, host end) of writes no run held yet
        self.pending: list[tuple[float, object, int, int]] = []
        #: write bytes told to the remapper as unknown (not kept, not split)
        self.unknown = 0

    def remap_with(self, remapper, guest_source: GuestView, take: Callable[[object], None],
                   swap_backing: Callable[[object, str], None] | None = None) -> None:
        """Follow the guest's files too: ``remapper`` (made over
        ``guest_source``, its ``current`` the view's guest map, its ``swap``
        this sink's ``take_remap``) is fed and ticked by this sink; ``take``
        gets each of its results translated to the image file's offsets (the
        runner's, as for a raw disk's remap), ``swap_backing`` its guest map
        for the backing export."""
        self.remapper = remapper
        self._guest_source = guest_source
        self._take = take
        self._swap_backing = swap_backing

    def feed(self, batch: Sequence, pieces) -> None:
        lay = self.view.layout
        cs = lay.cluster_size
        remap = self._remapping()
        out: tuple[list, list] = ([], [])
        for req in batch:
            if req[2] not in WRITE_COMMANDS or req[1] != self.export or req[8]:
                continue
            start, end = req[3], req[3] + req[4]
            if lay.in_data(start, end):
                if remap:
                    g = lay.guest_of(start)
                    self._hand_on(req, [(g, g + end - start)], out)
                continue
            self.dirty = True
            if remap:
                self._translate(req, req[6], start, end, out)
            written = self.l2_written
            if written is None:
                continue
            pos = start - start % cs
            for _ in range(min(64, -(-(end - pos) // cs))):  # bounded: a big write is data
                i = lay.l2_index_of(pos)
                if i is not None:
                    written.add(i)
                pos += cs
            if len(written) > MAX_DIRTY:
                self.l2_written = None
        if out[0]:
            self.remapper.feed(*out)

    def _remapping(self) -> bool:
        r = self.remapper
        return r is not None and r.mode == "auto" and self.view.guest_map is not None

    def _hand_on(self, req, guest: list[tuple[int, int]], out: tuple[list, list]) -> None:
        """A write's guest ranges, looked up in the guest map, for the remapper."""
        lookup = self.view.guest_map.lookup
        ps = [p for g, e in guest for p in lookup(g, e - g)]
        if ps:
            out[0].append(req)
            out[1].append(ps)

    def _translate(self, req, t: float, start: int, end: int, out: tuple[list, list],
                   now: float | None = None) -> None:
        """Hand on what the tables place of host bytes [start, end), keep
        the rest (not the qcow2's structures) until they do."""
        lay = self.view.layout
        split = lay.to_guest(start, end, MAX_PIECES)
        if split is None:
            self._unknown(end - start)
            return
        guest, rest = split
        if guest:
            self._hand_on(req, guest, out)
        for s, e in rest:
            if lay.in_structure(s, e):
                continue
            if now is not None and now - t >= PENDING_SECONDS:
                continue  # never placed: not the guest's data (a refcount block, say)
            if len(self.pending) >= PENDING_KEPT:
                self._unknown(e - s)
            else:
                self.pending.append((t, req, s, e))

    def _unknown(self, nbytes: int) -> None:
        self.unknown += nbytes
        self.remapper.unknown(nbytes)

    def tick(self, now: float) -> None:
        self._read_tables(now)
        if self.remapper is not None:
            self.remapper.tick(now)

    def _read_tables(self, now: float) -> None:
        if not self.dirty or now - self.last < REREAD_EVERY or now == float("inf"):
            return
        self.last = now
        self.dirty = False
        lay = self.view.layout
        written = self.l2_written
        self.l2_written = set()
        source = self.view.source
        if source is None or source.fd < 0:
            return
        before = (lay.runs, lay.sorted_structures)
        fd = source.fd
        try:
            size = os.fstat(fd).st_size
            lay.reread(lambda off, n: source.pread(off, n), size,
                       set(range(lay.l1_size)) if written is None else written)
        except (Qcow2Refused, OSError) as e:
            # Read while QEMU rewrote a table, say: the next write reads again.
            self.failed = str(e)
            self.dirty = True
            log.debug("qcow2 tables not read again: %s", e)
            return
        self.rereads += 1
        self._place_pending(now)
        if (lay.runs, lay.sorted_structures) == before or self.view.guest_map is None:
            return
        new = sum(n for _, _, n in lay.runs) - sum(n for _, _, n in before[0])
        host, _ = self.view.views(self.view.guest_map)
        self.swap(host, f"qcow2 tables read again ({new // lay.cluster_size:+d} data clusters)")

    def _place_pending(self, now: float) -> None:
        """The kept writes the tables now place, to the remapper (those kept
        ``PENDING_SECONDS`` and still not placed are let go)."""
        pending, self.pending = self.pending, []
        if not pending or not self._remapping():
            return
        out: tuple[list, list] = ([], [])
        for t, req, s, e in pending:
            self._translate(req, t, s, e, out, now)
        if out[0]:
            self.remapper.feed(*out)

    def take_remap(self, result) -> None:
        """The remapper's result (a guest map): translated with the tables as
        they are now, for the image file's export; the guest map as it is
        for the backing's."""
        view = self.view
        if result.unchanged:
            host = view.host
        else:
            host, more = view.views(result.blockmap)
            if more and self._swap_backing is not None:
                self._swap_backing(result.blockmap, f"remap ({result.why})")
        journal = result.journal_map
        if journal is not None:
            journal = host_map(view.layout, journal, view.device, structures=False)
        self._take(dataclasses.replace(result, blockmap=host, journal_map=journal))

    def close(self) -> None:
        if self.remapper is not None:
            self.remapper.close()
        if self._guest_source is not None:
            self._guest_source.close()
            self._guest_source = None


def open_view(image: str, readonly: bool, backing: str = "", backing_size: int = 0) -> Qcow2View:
    """The view of a qcow2 image (Qcow2Refused: one line, nothing moved)."""
    return Qcow2View(image, read_file_layout(image), readonly, backing, backing_size)
