"""Live remapping: the block map made again from the disk as it is now.

A guest creates, extends and deletes files while it is watched; the map
made before boot names none of the new ones (their writes show as
``p /dev/sda1``). The ``Remapper`` is a sink of the session's pump that:

- counts **unnamed write bytes**: bytes of writes (WRITE, WRITE_ZEROES,
  TRIM) whose lookup found no file or directory (only a partition, the
  disk, or nothing);
- counts **structure write bytes**: writes to what names things, a
  directory or a filesystem's own structures (``/$Journal``, ``/$InodeTable``,
  ``/$MFT``, ``/$FAT1``, a file's ``:$extents``...): a file was made,
  grown, renamed or deleted, or (ext3/4) a transaction that says so was
  committed, which the mapper reads (``bmap/jbd2.py``);
- remaps **by itself**: once ``threshold`` bytes (``REMAP_THRESHOLD``,
  1 MiB) were written unnamed since the last remap, or once any structure
  was written and the writes have **settled** (``REMAP_SETTLE``, 0.25 s
  without a structure or unnamed write, or ``REMAP_MAX_WAIT``, 1 s after
  the first: a small new file, a resident NTFS file, which never add up to
  a megabyte); at most every ``min_interval`` seconds (``REMAP_MIN_INTERVAL``,
  1 s, start to start), and after a whole walk never sooner than
  ``REMAP_COST_FACTOR`` (4) times its duration after it ended (after a
  whole walk of 2 s the next remap comes 8 s later at the soonest: the
  mapper's share of a core stays under a fifth); after an update, never
  sooner than its own duration (the mapper's share at most half a core,
  in a process of its own);
- remaps **on request**: the UI's ``m`` key calls ``request()``;
- **tries again** (at most ``REMAP_RETRIES`` times in a row, each after
  the same intervals) when the unnamed writes that led to a remap are still
  unnamed by its map: a journalling filesystem writes a new file's data,
  then its journal, and its inode and directory in place only later (ext4
  at its next writeback or checkpoint), so a remap made between the two does
  not see the file yet. The first ``RANGES_KEPT`` unnamed write ranges since
  the last remap are kept to check this (a bound: a client never decides
  how much memory this takes).

``diskwatch IMAGE --remap auto`` (the default: both), ``--remap key`` (only
on the key), ``--remap off`` (never).

The remap runs the metadata mapper (``bmap/metadata.py``) in a **process of
its own** (``bmap/worker.py``: bounded memory, CPU and time, no network,
nothing to write), which reads the **served source** (so a ``--snapshot``
overlay is what is read) through a thread of this process that answers its
reads; the server never waits for it and shares no interpreter with it.
An attached qcow2 disk is served as its image file, not as the guest sees
it: its remapper reads the guest's view instead, and is fed and ticked by
the disk's follower (attach/follow.py), which tells it the writes in guest
offsets (``unknown`` for those it cannot place) and translates its maps.

The process is **kept** from remap to remap (``MapperSession``, started by
the remap thread, which lives as long as the session) with what its last
walk found, and an automatic remap is an **update**: it is handed the byte
ranges written to named structures (and the unnamed ones) since the last
remap, reads again only the directories, inodes, MFT records and journal
those ranges name (``bmap/incremental.py``), and answers a patch that both
processes apply to the same map (``BlockMap.patched``): its cost follows
what changed, not the size of the disk (a new file on a 500,000-object
disk: 0.23 s, where the whole walk takes 6.8 s). The walk updates start
from is made at the session's first round (``prime``). The key's remap
(``m``) is always the whole walk, and so is an update that cannot follow
what was written (a partition table, LVM metadata, a new filesystem, a
geometry change, more than ``DIRTY_KEPT`` ranges, a mapper that ended):
its line says why. When the writes that led to an update stay unnamed
after it, the next remap is the whole walk.

A crash, a hang or a limit reached is one line, and the old map stays. The
old map serves until the new one is complete; the new one is handed over
in the pump's thread, in ``tick``, through one ``swap`` callback (the
runner's ``take_remap``: ``Session.swap_map`` for every sink that holds a
map and late naming, the metrics' names, the recording, which keeps the
map and the journal map for replay and report), so no round of the pump
sees two maps. An automatic remap that changed nothing is not swapped in
nor said (``quiet`` counts them); what the journal's writes carried is
still handed on. What the metadata method does not map (filesystems it
cannot read, which the watch method mapped before) keeps its old entries.
A filesystem caught mid-update gives a partial walk and a warning; its
objects the partial walk missed keep their old entries. A remap never
raises: a failure is told and the old map stays.

The map file given with ``--bmap`` is not rewritten: it describes the disk
as it was (and with ``--snapshot`` the disk goes back to it at exit).

A whole walk answers the new map already resolved, and how it differs
from the old one (which it is handed in the same flat form,
``BlockMap.to_flat``): this process only checks and unpacks it. An update
answers the patch and what it added and removed.

Why no interval tree (the ``intervaltree`` dependency was dropped): the
only sets of intervals a remap needs are the old and new maps, which
``BlockMap`` already resolves into sorted segments, and the unnamed writes,
of which only their total decides anything. A whole walk takes 0.9 s for
10,000 files, 1.9 s for 100,000 and 6.8 s for 500,000, in the mapper process.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bmap.index import BmapObject
from .bmap.worker import MapperFailed, MapperLimits, MapperSession
from .events import Bus, Progress, Request
from .wire import WRITE_COMMANDS

__all__ = ["REMAP_COST_FACTOR", "REMAP_MAX_WAIT", "REMAP_MIN_INTERVAL", "REMAP_MODES",
           "REMAP_SETTLE", "REMAP_THRESHOLD",
           "RemapResult", "Remapper", "remap"]

REMAP_MODES = ("auto", "key", "off")
#: unnamed write bytes since the last remap that make an automatic one
REMAP_THRESHOLD = 1 << 20
#: seconds between the starts of two automatic remaps, at least
REMAP_MIN_INTERVAL = 1.0
#: after a structure write: seconds without writes before the remap...
REMAP_SETTLE = 0.25
#: ...or seconds after the first, whichever comes first
REMAP_MAX_WAIT = 1.0
#: and at least this many times the last remap's duration after it ended
REMAP_COST_FACTOR = 4.0
#: automatic remaps in a row while what triggered them stays unnamed
REMAP_RETRIES = 3
#: unnamed write ranges kept per remap window
RANGES_KEPT = 4096
#: written ranges an incremental remap is handed, at most (more: the whole walk)
DIRTY_KEPT = 4096
#: the why of the first walk (``Remapper.prime``)
PRIME = "first walk"

_NAMED = frozenset("fd")  # the types a write is named by
#: new names said in the one line, at most
_SAY_NAMES = 3


@dataclass
class RemapResult:
    """What one remap made: the new map (None if it failed) and how it differs."""

    why: str  # "key", "auto", "test"...
    blockmap: Any = None
    added: list = field(default_factory=list)  # BmapObjects new in this map
    removed: list = field(default_factory=list)
    changed: int = 0  # objects in both whose ranges differ
    kept: int = 0  # objects kept from the old map (not read by metadata, or a partial walk)
    warnings: list[str] = field(default_factory=list)
    #: journal blocks -> the files and directories whose metadata they carry
    journal_map: Any = None
    elapsed: float = 0.0
    error: str = ""
    #: the mapper cannot run at all (pytsk3 missing): trying again is no use
    fatal: bool = False
    #: an update's counts (directories and inodes read again...), None for a whole walk
    incremental: dict | None = None
    #: why an update became the whole walk ("" if it did not)
    full_because: str = ""

    @property
    def unchanged(self) -> bool:
        """A map was made and it names everything as the old one did."""
        return (self.blockmap is not None and not self.added and not self.removed
                and not self.changed)

    def line(self) -> str:
        """The one line a remap is announced with."""
        if self.blockmap is None:
            return f"remap ({self.why}) failed: {self.error}; the old map stays"
        text = (f"remap ({self.why}): +{len(self.added)} objects, -{len(self.removed)}, "
                f"{self.changed} changed in {self.elapsed:.2f} s")
        if self.incremental is not None:
            inc = self.incremental
            text += (f" (read again: {inc.get('dirs', 0)} directories, "
                     f"{inc.get('inodes', 0)} inodes)")
        elif self.full_because:
            text += f" (whole walk: {self.full_because})"
        # files first: they are what a person looks for
        named = [o.path for t in "fd" for o in self.added if o.type == t and o.path][:_SAY_NAMES]
        if named:
            more = len(self.added) - len(named)
            text += ": new " + ", ".join(named) + (f" and {more} more" if more > 0 else "")
        if self.kept:
            text += f"; {self.kept} kept from the old map"
        if self.warnings:
            text += "; " + "; ".join(self.warnings)
        return text


def remap(source, old, *, why: str = "remap", bus: Bus | None = None,
          cancelled: Callable[[], bool] | None = None, disk: str = "/dev/sda",
          limits: MapperLimits | None = None, session: MapperSession | None = None,
          dirty: list[tuple[int, int]] | None = None) -> RemapResult:
    """Map ``source`` again by metadata, in the mapper's own process
    (``bmap/worker.py``), and compare with ``old`` (a ``BlockMap`` or None).
    With a ``session`` (a ``MapperSession``: the process is kept) whose
    last answer is ``old``, and ``dirty`` (the disk ranges written to named
    structures since), only what those ranges name is read again
    (``bmap/incremental.py``); without, the whole walk. Never raises for
    what the disk holds, nor for how the mapper ends (a crash, a limit):
    that is the result's ``error``, and the old map stays."""
    t0 = time.monotonic()
    result = RemapResult(why)
    own = session is None
    if own:
        session = MapperSession(source, limits=limits)
    update = (dirty is not None and old is not None and session.has_state
              and session.answered is old)
    why_walk = ""
    if dirty is not None and not update and old is not None and session.has_state:
        why_walk = "the map in use is not the disk as the mapper last read it"
    try:
        if update:
            answer = session.run({"kind": "update", "disk": disk, "keep": True,
                                  "dirty": dirty}, bus=bus, cancelled=cancelled)
        else:
            answer = session.run({"kind": "walk", "disk": disk, "keep": not own},
                                 old_flat=None if old is None else old.to_flat(),
                                 bus=bus, cancelled=cancelled)
    except MapperFailed as e:
        result.error = str(e)
        result.fatal = e.fatal
        return result
    finally:
        if own:
            session.close()
    info = answer.info
    blockmap = answer.blockmap if answer.blockmap is not None else old
    if answer.patch is not None:
        try:
            blockmap = old.patched(*answer.patch)
        except (ValueError, TypeError) as e:
            session.close()  # its state and ours differ now: the next is a whole walk
            result.error = f"the mapper's answer is malformed ({e})"
            return result
    result.warnings = [str(w) for w in info.get("warnings", [])]
    result.kept = int(info.get("kept", 0))
    result.incremental = info.get("incremental")
    result.full_because = str(info.get("full_because", why_walk))[:200]
    if old is None:
        result.added = sorted(blockmap.object_table(), key=_object_key)
    else:
        table = blockmap.object_table()
        try:
            if "added_objects" in info:
                result.added = [BmapObject(*o) for o in info["added_objects"]]
            else:
                result.added = [table[i] for i in info["added"]]
            result.removed = [BmapObject(*o) for o in info["removed"]]
            result.changed = int(info["changed"])
        except (KeyError, IndexError, TypeError, ValueError):
            result.error = "the mapper's answer is malformed (its comparison)"
            return result
        result.added.sort(key=_object_key)
    if old is not None and not (result.added or result.removed or result.changed):
        # The same map: the one in use stays the one the mapper's state is
        # (an unchanged map is not swapped in), so the next remap can update it.
        blockmap = old
    result.blockmap = blockmap
    session.answered = blockmap
    result.journal_map = answer.journal
    result.elapsed = time.monotonic() - t0
    return result


def _object_key(obj) -> tuple:
    return (obj.type, obj.device, obj.path or "")


class Remapper:
    """A pump sink that remaps in the background: a thread that runs and
    serves one mapper process (see the module docstring).

    ``current()`` is the map in use; ``swap(result)`` installs a new one
    (called in the pump's thread); ``say(text, level)`` announces a remap
    in one line. ``bus``: where the mapper's ``Progress`` goes (the UI's
    block-map panel), None for none."""

    def __init__(self, source, *, current: Callable[[], Any],
                 swap: Callable[[RemapResult], None], say: Callable[[str, str], None],
                 mode: str = "auto", bus: Bus | None = None,
                 threshold: int = REMAP_THRESHOLD, min_interval: float = REMAP_MIN_INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 limits: MapperLimits | None = None, export: str | None = None,
                 disk: str = "/dev/sda") -> None:
        if mode not in REMAP_MODES:
            raise ValueError(f"remap mode must be one of {', '.join(REMAP_MODES)}, not {mode!r}")
        self.source = source
        self.current = current
        self.swap = swap
        self.say = say
        self.mode = mode
        self.bus = bus
        self.threshold = threshold
        self.min_interval = min_interval
        self.clock = clock
        self.limits = limits
        #: with several disks, the export this source serves (its writes
        #: only); None: every request's
        self.export = export
        self.disk = disk  # the device its map names (/dev/sdb for a second disk)
        self.unnamed = 0  # unnamed write bytes since the last remap started
        self.structure = 0  # structure write bytes since the last remap started
        self._first_change = self._last_change = 0.0  # of those writes (clock)
        self.remaps = 0  # remaps that changed the map
        self.quiet = 0  # automatic remaps that found the map unchanged (not said)
        self.last: RemapResult | None = None
        self.said: deque[str] = deque(maxlen=20)  # the last remaps' lines
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._busy = False
        self._job: str = ""
        self._done: RemapResult | None = None
        self._closing = False
        self._next_auto = float("-inf")
        self._ranges: list[tuple[int, int]] = []  # unnamed writes since the last remap
        self._window: list[tuple[int, int]] = []  # those that led to the running remap
        self._retries = 0
        #: what the guest wrote to named structures (and unnamed bytes) since
        #: the last remap started: what an incremental one reads again
        self._dirty: list[tuple[int, int]] | None = []
        self._dirty_job: list[tuple[int, int]] | None = None
        self._primed = False
        #: the mapper process, kept from remap to remap (it lives and dies
        #: with the remap thread, which starts it)
        self.mapper: MapperSession | None = None

    @property
    def running(self) -> bool:
        return self._busy

    def request(self, why: str = "key") -> bool:
        """Start a remap unless one is running (or remapping is off); True if
        started. The key's remap (``m``) is always the whole walk; an
        automatic one reads again what was written (``bmap/incremental.py``)."""
        if self.mode == "off" or self._closing or self._busy:
            return False
        self.unnamed = self.structure = 0
        self._window, self._ranges = self._ranges, []
        self._dirty_job = None if why == "key" else self._dirty
        self._dirty = []
        started = self.clock()
        self._next_auto = started + self.min_interval
        self._busy = True
        self._idle.clear()
        self._job = why
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="remap")
            self._thread.start()
        self._wake.set()
        return True

    def prime(self) -> bool:
        """The walk incremental remaps start from, made now (in the mapper
        process) rather than at the first automatic remap, so that the first
        remap the guest's writes call for reads only what they changed. It is
        never swapped in nor said (only a failure is): the map in use stays
        what the person gave until the guest writes. When the walk names the
        disk as that map does, updates start from it; else the first
        automatic remap is the whole walk."""
        return self.mode == "auto" and self.request(PRIME)

    def wait(self, timeout: float | None = None) -> bool:
        """Until the running remap (if any) is done; True if none runs any more.
        The result is swapped in by the next ``tick``."""
        self._idle.wait(timeout)
        return not self._busy

    def _loop(self) -> None:
        self.mapper = MapperSession(self.source, limits=self.limits)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._closing:
                    return
                self._work(self._job)
        finally:
            self.mapper.close()
            self._busy = False
            self._idle.set()

    def _work(self, why: str) -> None:
        quiet = why == PRIME  # no progress nor summary in the block-map panel
        result = remap(self.source, self.current(), why=why,
                       bus=None if quiet else self.bus,
                       cancelled=lambda: self._closing, limits=self.limits,
                       session=self.mapper, dirty=self._dirty_job, disk=self.disk)
        if self.bus is not None and not (quiet and not result.error):
            summary = result.line()
            if self._quiet(result) and self.said:
                # the block-map panel keeps saying what the last remap that
                # changed something found
                summary = self.said[-1]
            self.bus.publish(Progress("done", "", len(result.added), len(result.added), 0.0,
                                      result.elapsed, summary))
        ended = self.clock()
        # A whole walk is followed by a pause of REMAP_COST_FACTOR times its
        # length; an update (cheap, what changed) by its own length; the
        # first walk by none (the updates it makes possible are cheap).
        factor = (0.0 if why == PRIME else 1.0 if result.incremental is not None
                  else REMAP_COST_FACTOR)
        self._next_auto = max(self._next_auto, ended + factor * result.elapsed)
        self._done = result  # taken by tick, in the pump's thread
        self._busy = False
        self._idle.set()

    # -- the sink --

    def feed(self, batch: Sequence[Request], pieces) -> None:
        if pieces is None or self.mode != "auto":
            return
        unnamed = structure = 0
        ranges = self._ranges
        dirty = self._dirty
        export = self.export
        for req, ps in zip(batch, pieces, strict=True):
            if req[2] in WRITE_COMMANDS and ps and (export is None or req[1] == export):
                for start, end, obj in ps:
                    if obj is None or obj.type not in _NAMED:
                        unnamed += end - start
                        if len(ranges) < RANGES_KEPT:
                            ranges.append((start, end))
                    elif obj.type == "d" or obj.is_structure:
                        structure += end - start
                    else:
                        continue  # a file's data: nothing to read again
                    if dirty is not None:
                        if dirty and dirty[-1][1] == start:
                            dirty[-1] = (dirty[-1][0], end)  # sequential: one range
                        elif len(dirty) < DIRTY_KEPT:
                            dirty.append((start, end))
                        else:
                            dirty = self._dirty = None  # too many: the whole walk
        if unnamed or structure:
            self._changed(unnamed, structure)

    def _changed(self, unnamed: int, structure: int) -> None:
        now = self.clock()
        if not (self.unnamed or self.structure):
            self._first_change = now
        self._last_change = now
        self.unnamed += unnamed
        self.structure += structure

    def unknown(self, nbytes: int) -> None:
        """Writes whose disk ranges cannot be told (a qcow2 guest's, past
        what attach/follow.py keeps for it): counted as unnamed bytes, and
        the next remap is the whole walk."""
        if self.mode != "auto" or nbytes <= 0:
            return
        self._dirty = None
        self._changed(nbytes, 0)

    def on_event(self, event: object) -> None:
        pass

    def tick(self, now: float) -> None:
        done, self._done = self._done, None
        if done is not None:
            self.last = done
            if done.why == PRIME:
                if done.blockmap is not None:
                    done = None  # built the mapper's state; the map in use stays
            elif done.blockmap is not None and not self._closing:
                self.swap(done)  # unchanged too: what the journal carried is news
                self.remaps += 0 if done.unchanged else 1
                self._retry_if_still_unnamed(done.blockmap)
            if done is not None and self._quiet(done):
                # A guest's journal commits every few seconds: an automatic
                # remap that found nothing new is counted, not said.
                self.quiet += 1
                done = None
        if done is not None:
            line = done.line()
            if done.fatal and self.mode == "auto" and not self._closing:
                # A mapper that cannot run (pytsk3 missing) would fail again
                # every few seconds: said once, then only the key remaps. A
                # disk caught mid-update may fail once and map the next time.
                self.mode = "key"
                line += " (automatic remapping stopped; m tries again)"
            self.said.append(line)
            self.say(line, "warning" if done.error or done.warnings else "info")
        if self.mode != "auto" or self._closing or now == float("inf"):
            return
        if not self._primed:
            # The session's first round: the walk updates start from, now,
            # unless the guest has written already (then its writes call
            # for a remap, the whole walk, as they would without this).
            self._primed = True
            if not (self.unnamed or self.structure):
                self.prime()
                return
        clock = self.clock()
        settled = self.structure and (clock - self._last_change >= REMAP_SETTLE
                                      or clock - self._first_change >= REMAP_MAX_WAIT)
        if (self.unnamed >= self.threshold or settled) and clock >= self._next_auto:
            self.request("auto")

    @staticmethod
    def _quiet(result: RemapResult) -> bool:
        """An automatic remap that found nothing new: counted, not said."""
        return result.unchanged and result.why == "auto" and not result.warnings

    def _retry_if_still_unnamed(self, blockmap) -> None:
        """The writes that led to this remap, still unnamed by its map (a
        file whose inode is not on the disk yet): count them again, so the
        next automatic remap comes after the usual intervals."""
        lookup = blockmap.lookup
        still = sum(end - start for s, e in self._window for start, end, obj in lookup(s, e - s)
                    if obj is None or obj.type not in _NAMED)
        self._window = []
        if self.mode == "auto" and still >= self.threshold // 2 and self._retries < REMAP_RETRIES:
            self._retries += 1
            self.unnamed = max(self.unnamed, self.threshold)
            # What an update read again did not name them: the next is the
            # whole walk, as every remap was before updates.
            self._dirty = None
        else:
            self._retries = 0

    def close(self) -> None:
        """A running remap is cancelled (the mapper polls between directories)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)
