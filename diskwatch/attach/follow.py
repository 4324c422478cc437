"""A qcow2 guest watched through its image file: what the session names
requests with, and how that follows the guest's allocations.

``Qcow2View`` is what ``diskwatch attach`` hands the runner for a qcow2 disk
(``RunConfig.attach_view``):

- ``open_source()``: the qcow2 file as served (attach/growing.py), the
  session's first disk; ``more_disks``: the raw backing file, read-only,
  as the export ``backing`` on the same socket (its offsets are guest
  offsets), when its reads are watched.
- ``map_source()``: the guest's disk read through the qcow2 mapping
  (``qcow2map.GuestView``): a ``--bmap`` that does not exist is made from
  it, in the mapper process, as for any disk.
- ``views(guest_map)``: the maps the session uses: the image file's, in host
  offsets (``qcow2map.host_map``), and the backing's (the guest map itself).
- ``follower(swap)``: a sink that follows allocations (below).

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

The guest map itself is not remapped while attached to a qcow2 disk (the
remapper reads the disk it names, here the image file): files the guest
creates afterwards are named by their partition, as with --remap off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from ..pipeline.sink import SinkBase
from ..wire import WRITE_COMMANDS
from .growing import GrowingFile, ceiling
from .qcow2map import GuestView, Layout, Qcow2Refused, host_map, read_file_layout

log = logging.getLogger("diskwatch.attach")

#: the backing file's export on diskwatch's socket
BACKING_EXPORT = "backing"
#: seconds between two readings of the tables (a guest allocating without
#: pause does not make the pump read them at every round)
REREAD_EVERY = 0.2
#: written L2 tables remembered between two readings; past it, all are read
MAX_DIRTY = 4096


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

    @property
    def backing_export(self) -> str:
        return BACKING_EXPORT if self.backing else ""

    def open_source(self) -> GrowingFile:
        self.source = GrowingFile(self.image, self.export_size, readonly=self.readonly)
        return self.source

    def map_source(self) -> GuestView:
        return GuestView(self.image, self.layout, self.backing or None)

    def views(self, guest_map) -> tuple:
        """(the image file's map, [the backing's map] or [])."""
        self.guest_map = guest_map
        first = host_map(self.layout, guest_map)
        return first, ([guest_map] if self.backing else [])

    def follower(self, swap: Callable[[object, str], None], export: str = "") -> Qcow2Follower:
        return Qcow2Follower(self, swap, export)


class Qcow2Follower(SinkBase):
    """The sink that follows allocations (the module docstring)."""

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

    def feed(self, batch: Sequence, pieces) -> None:
        lay = self.view.layout
        cs = lay.cluster_size
        for req in batch:
            if req[2] not in WRITE_COMMANDS or req[1] != self.export or req[8]:
                continue
            start, end = req[3], req[3] + req[4]
            if lay.in_data(start, end):
                continue
            self.dirty = True
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

    def tick(self, now: float) -> None:
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
        before = (lay.runs, sorted(lay.structures()))
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
        if (lay.runs, sorted(lay.structures())) == before or self.view.guest_map is None:
            return
        new = sum(n for _, _, n in lay.runs) - sum(n for _, _, n in before[0])
        self.swap(host_map(lay, self.view.guest_map),
                  f"qcow2 tables read again ({new // lay.cluster_size:+d} data clusters)")


def open_view(image: str, readonly: bool, backing: str = "", backing_size: int = 0) -> Qcow2View:
    """The view of a qcow2 image (Qcow2Refused: one line, nothing moved)."""
    return Qcow2View(image, read_file_layout(image), readonly, backing, backing_size)
