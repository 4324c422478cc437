"""The text trace of --headless and --log (the exit summary is summary.py).

A ``Sink`` (pipeline/sink.py): the session's pump feeds it drained batches
with the block map already looked up; nothing here runs in the server's
thread.

The text trace writes one line per run: adjacent requests of the same kind
(offset continuing where the last one ended) merge; with a block map, a run
is "the same operation on the same object" and the line has bmaplogger's
form, ``read f /dev/sda1 /Boot/BCD``, followed by the byte ranges it covered.
A run also ends when the next request comes ``idle_flush`` seconds (by the
requests' own clock) after the last one, so where lines break depends on the
requests alone, not on when the pump ran: a replayed recording prints the
same lines as the live run did. Lines are written to the file as they are
made (each batch, and a quiet run after ``2 * idle_flush``), so
``tail -f`` on a --log file follows the session.

A session of several disks: a run is one disk's, and a line whose object
does not name its disk (an LV or RAID array spanning disks, a qcow2's
backing file, no object at all) says which: ``write f /dev/vg/var
/log/syslog on /dev/sdb  [...]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from ..events import JournalCarried, LateNamed, Request
from ..pipeline.sink import Pieces
from ..text import safe_text
from ..units import format_bytes
from ..wire import COMMAND_NAMES, DATA_COMMANDS, Command

# Commands that touch data at an offset (the others are shown once, plainly).
_RANGED = DATA_COMMANDS
MAX_RANGES_SHOWN = 4


class _Run:
    __slots__ = ("op", "obj", "start_t", "ranges", "count", "nbytes", "errors", "export")

    def __init__(self, op: int, obj, t: float, offset: int, length: int, err: int,
                 export: str = ""):
        self.op = op
        self.export = export
        self.obj = obj
        self.start_t = t
        self.ranges = [[offset, offset + length]]
        self.count = 1
        self.nbytes = length
        self.errors = 1 if err else 0


class TextTrace:
    """Formats request events as text lines, merging runs."""

    def __init__(self, out: IO[str], blockmap=None, t0: float = 0.0, idle_flush: float = 0.5,
                 disks: dict[str, str] | None = None):
        """``disks``: export -> device (/dev/sdb), when the session has several."""
        self.out = out
        self.disks = disks
        self.blockmap = blockmap
        self.t0 = t0
        self.idle_flush = idle_flush
        self._run: _Run | None = None
        self._last_t = 0.0
        self.lines = 0
        self._pending: list[str] = []  # written once per batch, not once per line
        self.named = blockmap is not None  # lines name objects (a map is, or was, in use)

    def feed(self, batch: Sequence[Request], pieces: Pieces | None = None) -> None:
        """``pieces``: the batch looked up in the map (the pump does it once
        for all sinks); without it, ``blockmap`` is looked up here, if any."""
        if pieces is None and self.blockmap is not None:
            lookup = self.blockmap.lookup
            pieces = [lookup(r.offset, r.length) for r in batch]
        try:
            self._feed(batch, pieces)
        finally:
            self._flush_pending()

    def on_event(self, event: object) -> None:
        if isinstance(event, LateNamed):
            self._late(event)
        elif isinstance(event, JournalCarried):
            self._journal(event)

    def _journal(self, event: JournalCarried) -> None:
        """One line: the journal writes a remap attributed, by owner."""
        self._emit()
        by_owner: dict = {}
        for _t, _cmd, start, end, owner in event.writes:
            by_owner[owner] = by_owner.get(owner, 0) + end - start
        total = sum(by_owner.values())
        # the guest's files and directories first: the structures (bitmaps,
        # descriptors) are in every transaction
        ranked = sorted(by_owner.items(),
                        key=lambda kv: (kv[0].is_structure, -kv[1], str(kv[0])))
        shown = ", ".join(f"{safe_text(str(o))} ({format_bytes(n)})" for o, n in ranked[:4])
        more = f" and {len(ranked) - 4} more" if len(ranked) > 4 else ""
        self._write(event.writes[-1][0], f"journal: {format_bytes(total)} written to the "
                                         f"journal carried {shown}{more}")
        self._flush_pending()

    def _late(self, event: LateNamed) -> None:
        """One line per object a new map named earlier writes of: when they
        were made, how many, how much (``diskwatch/remap.py``)."""
        self._emit()
        by_obj: dict = {}
        for t, cmd, start, end, _old, obj in event.writes:
            row = by_obj.get((obj, cmd))
            if row is None:
                row = by_obj[obj, cmd] = [t, t, set(), 0, start, end]
            row[1] = t
            row[2].add((t, start))
            row[3] += end - start
            row[4], row[5] = min(row[4], start), max(row[5], end)
        for (obj, cmd), (first, last, requests, nbytes, lo, hi) in by_obj.items():
            n = len(requests)
            when = f"{first - self.t0:.3f}" if n == 1 else f"{first - self.t0:.3f}-{last - self.t0:.3f}"
            op = COMMAND_NAMES[cmd] if 0 <= cmd < len(COMMAND_NAMES) else "write"
            self._write(last, f"named late: {op} {safe_text(str(obj))}  [{lo:#x}-{hi:#x}] "
                              f"{format_bytes(nbytes)}" + (f" in {n} requests" if n > 1 else "")
                        + f", written at {when}")
        self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending:
            self.out.write("".join(self._pending))
            self.lines += len(self._pending)
            self._pending.clear()
            self.out.flush()  # a --log file is followed with tail -f

    def _feed(self, batch: Sequence[Request], pieces: Pieces | None) -> None:
        idle = self.idle_flush
        for i, r in enumerate(batch):
            cmd = r.command
            if self._run is not None and r.start - self._last_t >= idle:
                self._emit()  # quiet for a while: a new line, whatever comes
            if cmd == Command.BLOCK_STATUS:
                # Clients ask before nearly every read (nbdcopy, qemu-img): in
                # a trace of what the disk does it is noise. --record keeps it.
                continue
            if cmd not in _RANGED:
                # flush, disc, unknown commands (block status was skipped
                # above): repeats of one kind make one line
                run = self._run
                if run is not None and run.op == cmd and run.ranges is None \
                        and run.export == r.export:
                    run.count += 1
                    run.errors += 1 if r.error else 0
                else:
                    self._emit()
                    self._run = _Run(cmd, None, r.start, 0, 0, r.error, r.export)
                    self._run.ranges = None
                self._last_t = r.start
                continue
            if pieces is not None:
                self.named = True
                for start, end, obj in pieces[i]:
                    self._add(cmd, obj, r.start, start, end - start, r.error, True, r.export)
            else:
                self._add(cmd, None, r.start, r.offset, r.length, r.error, False, r.export)
            self._last_t = r.start

    def _add(self, cmd, obj, t, offset, length, err, by_object: bool, export: str) -> None:
        run = self._run
        if run is not None and run.op == cmd and run.ranges is not None and run.export == export:
            last = run.ranges[-1]
            if by_object and run.obj == obj:
                if last[1] == offset:
                    last[1] = offset + length
                else:
                    run.ranges.append([offset, offset + length])
                run.count += 1
                run.nbytes += length
                run.errors += 1 if err else 0
                return
            if not by_object and last[1] == offset:
                last[1] = offset + length
                run.count += 1
                run.nbytes += length
                run.errors += 1 if err else 0
                return
        self._emit()
        self._run = _Run(cmd, obj, t, offset, length, err, export)

    def tick(self, now: float) -> None:
        """Called on a timer: a run that has been quiet for a while is written
        out, so the trace never lags behind a paused guest. Twice the split
        gap: a request already running when the tick comes may still
        continue the run, and its line must be the one a replay prints."""
        if self._run is not None and now - self._last_t >= 2 * self.idle_flush:
            self._emit()
            self._flush_pending()

    def _emit(self) -> None:
        run = self._run
        if run is None:
            return
        self._run = None
        op = COMMAND_NAMES[run.op]
        on = self._disk_of(run)
        if run.ranges is None:
            text = (op if run.count == 1 else f"{op} x{run.count}") + on
            if run.errors:
                text += f" ({run.errors} failed)"
            self._write(run.start_t, text)
            return
        ranges = run.ranges
        if len(ranges) == 1:
            shown = f"{ranges[0][0]:#x}-{ranges[0][1]:#x}"
        else:
            shown = ", ".join(f"{s:#x}-{e:#x}" for s, e in ranges[:MAX_RANGES_SHOWN])
        if len(ranges) > MAX_RANGES_SHOWN:
            shown += f", +{len(run.ranges) - MAX_RANGES_SHOWN} more"
        detail = f"{format_bytes(run.nbytes)}"
        if run.count > 1:
            detail += f" in {run.count} requests"
        if run.errors:
            detail += f", {run.errors} failed"
        if self.named:
            # the guest named its files: a name must not steer the terminal
            what = (safe_text(str(run.obj)) if run.obj is not None
                    else "- (no object: metadata or free space)")
            text = f"{op} {what}{on}  [{shown}] {detail}"
        else:
            text = f"{op}{on} {shown} {detail}"
        self._write(run.start_t, text)

    def _disk_of(self, run: _Run) -> str:
        """' on /dev/sdb' where the line's object does not say its disk."""
        if self.disks is None:
            return ""
        device = self.disks.get(run.export)
        if device is None:
            return ""
        if run.obj is not None and run.obj.names_disk(device):
            return ""  # /dev/sdb1, /dev/sdb: the name says the disk
        return f" on {safe_text(device)}"

    def _write(self, t: float, text: str) -> None:
        self._pending.append(f"[{t - self.t0:9.3f}] {text}\n")

    def close(self) -> None:
        self._emit()
        self._flush_pending()
        self.out.flush()
