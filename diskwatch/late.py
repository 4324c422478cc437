"""Late naming: writes made before the map could name their bytes, given
to their owner once a new map names them.

A guest creates a file, writes it, and only then (at its next commit, or
the next remap) does the map know the file: those first writes were
counted as ``p /dev/sda1``. ``LateNamer`` is a pump sink that keeps the
unnamed write pieces of the last ``LATE_SECONDS`` (at most ``LATE_KEPT``:
a client never decides how much this holds) and, when a new map is swapped
in (a live remap, a replay reaching the map the live session swapped),
looks them up in it: what it names becomes one ``LateNamed`` event, which
the pump hands every sink (``Pump.deliver``). The trace says it in one line
per object, the top objects and the summary move the bytes to their owner,
and the report does the same from the recording (the owner learned later
in the session wins). Live and replay deliver it at the same point of the
request stream: before the first request the new map names.

Writes to an ext3/4 journal are kept the same way, and given to the files
and directories whose metadata they carried when a remap's journal map
says so (``JournalCarried``: the mapper read the log, ``bmap/jbd2.py``).
A recording keeps the journal maps (JMAP frames), so a replay and the
report (``report/analysis.py``, with a LateNamer of its own) attribute them
where the live session did.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .events import JournalCarried, LateNamed, Request
from .pipeline.sink import SinkBase
from .wire import WRITE_COMMANDS

__all__ = ["JOURNAL", "LATE_KEPT", "LATE_SECONDS", "LateNamer"]

#: the object an ext3/4 journal's writes are named by (bmap/metadata.py)
JOURNAL = "/$Journal"

#: unnamed write pieces kept to be named late, at most, and for how long
LATE_KEPT = 8192
LATE_SECONDS = 300.0

_NAMED = frozenset("fd")


class LateNamer(SinkBase):
    """See the module docstring. ``named_late``: write bytes named late, in all."""

    def __init__(self) -> None:
        self.named_late = 0
        #: with several disks, the one export whose writes are kept (its
        #: map is the one ``name`` gets); None: every request's
        self.export: str | None = None
        #: (start, command, first byte, end, object or None) of unnamed write pieces
        self._kept: deque[tuple] = deque(maxlen=LATE_KEPT)
        #: (start, command, first byte, end) of writes to a journal
        self._journal: deque[tuple] = deque(maxlen=LATE_KEPT)

    def feed(self, batch: Sequence[Request], pieces) -> None:
        if pieces is None:
            return
        kept = self._kept
        export = self.export
        for req, ps in zip(batch, pieces, strict=True):
            if req[2] in WRITE_COMMANDS and ps and (export is None or req[1] == export):
                for start, end, obj in ps:
                    if obj is None or obj.type not in _NAMED:
                        kept.append((req[6], req[2], start, end, obj))
                    elif obj.path == JOURNAL:
                        self._journal.append((req[6], req[2], start, end))

    def keep_journal_write(self, t: float, command: int, start: int, end: int) -> None:
        """A write to a journal, for the next ``carried`` (the report's
        pass over a recording, which has no batches)."""
        self._journal.append((t, command, start, end))

    def name(self, blockmap, why: str = "") -> LateNamed | None:
        """The kept unnamed writes ``blockmap`` names, as one event (None if
        none); the rest stays kept for a later map."""
        kept = self._kept
        if not kept or blockmap is None:
            return None
        horizon = kept[-1][0] - LATE_SECONDS
        lookup = blockmap.lookup
        named, still = [], []
        for t, cmd, start, end, old in kept:
            if t < horizon:
                continue
            for s, e, obj in lookup(start, end - start):
                if obj is not None and obj.type in _NAMED:
                    named.append((t, cmd, s, e, old, obj))
                    self.named_late += e - s
                else:
                    still.append((t, cmd, s, e, old))
        kept.clear()
        kept.extend(still)
        return LateNamed(tuple(named), why) if named else None

    def carried(self, journal_map) -> JournalCarried | None:
        """The kept journal writes ``journal_map`` (a remap's: journal blocks
        by owner) attributes, as one event; each write is given once, and
        those it does not cover wait for the next (a transaction written
        while the remap ran)."""
        kept = self._journal
        if not kept or journal_map is None:
            return None
        horizon = kept[-1][0] - LATE_SECONDS
        lookup = journal_map.lookup
        carried, still = [], []
        for t, cmd, start, end in kept:
            if t < horizon:
                continue
            covered = False
            for s, e, owner in lookup(start, end - start):
                if owner is not None:
                    carried.append((t, cmd, s, e, owner))
                    covered = True
            if not covered:
                still.append((t, cmd, start, end))
        kept.clear()
        kept.extend(still)
        return JournalCarried(tuple(carried)) if carried else None

