"""Writing a recording (--record): the ``Recorder``, a sink of the pump
with a writer thread. The format is format.py's; what it costs is said in
its docstring ("Why this and not JSON lines or Parquet")."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import zstandard

from ..events import ConnectionEvent, Dropped, Message, Request
from ..files import open_output
from .format import (
    MAGIC,
    RecordingHeader,
    encode_event,
    encode_map,
    encode_requests,
    frame,
    map_identity,
)


class Recorder:
    """Writes a session's requests and events to a recording (the format
    above). A ``Sink``: the pump feeds it the requests it drains for every
    sink (nothing more runs in the server thread); low-rate events it takes
    from the bus itself, stamped as they happen.

    Memory: at most ``limit`` requests wait for the writer thread (about
    240 bytes each: 120 MB at the default); more are dropped and counted, as
    are those the pump's own buffer dropped (``dropped``: in the closing
    META, and a line at exit). The writer runs every ``INTERVAL`` seconds; at
    fio's full rate (~50 000 requests a second here) it holds about one
    second's worth. A map swapped in (``add_map``) is held until that
    flush writes it, and the last one until the next swap (a reopened file
    starts with it): references to maps the session made anyway."""

    INTERVAL = 1.0

    def __init__(self, path: str, header: RecordingHeader, *, limit: int = 500_000,
                 interval: float | None = None) -> None:
        self.path = path
        self.t0 = header.started_monotonic
        self.interval = self.INTERVAL if interval is None else interval
        self.limit = limit
        self._pending: list[Request] = []
        self.dropped = 0  # here, and upstream in the pump's buffer
        self.events: deque[tuple[float, object]] = deque(maxlen=100_000)
        self.meta: deque[dict] = deque()
        self.requests = 0
        self.bytes_written = 0
        self._accepted = 0  # requests taken into _pending, ever (a map's index counts them)
        self._file_start = 0  # of those, the ones in earlier files (reopen)
        #: maps to write: (_accepted when swapped in, monotonic time, BlockMap, fields)
        self._maps: deque[tuple[int, float, Any, dict]] = deque()
        #: each other disk's last map (DMAP), by export: a new file begins with them
        self._current_disk_maps: dict[str, tuple] = {}
        self.disk_swapped_in = 0
        self._current_map: tuple[int, float, Any, dict] | None = None
        self.maps = 0  # maps written
        #: why the writer thread stopped recording (a full disk: the strerror)
        self.error: str | None = None
        self._bus = None
        self._lock = threading.Lock()  # one flush at a time
        self._pending_lock = threading.Lock()
        self._zstd = zstandard.ZstdCompressor(level=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.header = header
        self._file = open_output(path, binary=True, buffering=0)  # never through a link
        self._fd = self._file.fileno()
        #: maps swapped in (``keep_map``): by a live remap, and by any means
        self.remapped = 0
        self.swapped_in = 0
        self._write_head()

    @classmethod
    def for_session(cls, path: str, session: Any, *, source: str, size: int, export: str,
                    command: str | None, bmap: str | None,
                    exports: list[str] | None = None) -> Recorder:
        """The recorder of a live session (--record FILE): its header names
        the source, the command and the block map file in use (``bmap``,
        when the session has a map), and the session's start on both
        clocks. Not yet attached (``attach``)."""
        return cls(path, RecordingHeader(
            source=source, size=size, exports=exports or [export], command=command,
            bmap=map_identity(bmap) if bmap and session.blockmap else None,
            started_wall=time.time() - (time.monotonic() - session.started),
            started_monotonic=session.started))

    def _write_head(self) -> None:
        head = json.dumps(self.header.to_json(), separators=(",", ":")).encode()
        self._write(MAGIC + frame(b"HEAD", head))

    def reopen(self) -> None:
        """SIGHUP after logrotate moved the file: what came so far goes to
        the old file, then the name is opened again (appending). A new file
        starts with the header (and what META said since), so each file is a
        recording of its own."""
        with self._lock:
            self._flush_locked()
            new = open_output(self.path, binary=True, append=True, buffering=0)
            old, self._file, self._fd = self._file, new, new.fileno()
            old.close()
            if os.fstat(self._fd).st_size == 0:
                with self._pending_lock:  # what is pending now goes to the new file
                    self._file_start = self._accepted - len(self._pending)
                self._write_head()
                current = self._current_map
                if current is not None and not any(m is current for m in self._maps):
                    # A map swapped in before this file began names its first
                    # requests, and the header names only the first map.
                    self._maps.appendleft((self._file_start, *current[1:]))
                for item in self._current_disk_maps.values():  # the other disks' too
                    if not any(m is item for m in self._maps):
                        self._maps.append((self._file_start, *item[1:]))

    def attach(self, bus: Any) -> Recorder:
        """Subscribe to ``bus``'s events and start the writer thread."""
        self._bus = bus
        bus.on_event(self._on_event)
        self._thread = threading.Thread(target=self._run, daemon=True, name="recorder")
        self._thread.start()
        return self

    def _on_event(self, event: object) -> None:
        # stamped on arrival (events carry no time); in the publisher's thread
        if isinstance(event, (ConnectionEvent, Message)):
            self.events.append((time.monotonic(), event))

    def add_map(self, blockmap: Any, why: str, **fields: Any) -> None:
        """A map the live session swapped in (``Runner.swap_map``, in the
        pump's thread between two rounds: every request fed so far was
        named by the map before). Written with the next flush, as a BMAP
        frame at the request it names first; ``fields`` go into its JSON."""
        with self._pending_lock:
            if self.error is not None:  # nothing is written any more: hold nothing
                return
            at = self._accepted
        item = (at, time.monotonic(), blockmap, {"why": why, **fields})
        self._current_map = item
        self._maps.append(item)

    def keep_map(self, blockmap: Any, why: str = "", *, path: str | None = None,
                 remapped: bool = False) -> None:
        """A map the live session swapped in (``Runner.swap_map``: a live
        remap, or SIGHUP's reload of ``path``), kept whole: the header keeps
        naming the first map (by file), and the file this one came from may
        change again. With it, the counts an older diskwatch (which skips
        BMAP) still reads: its replay names everything with the first map
        and can tell."""
        if remapped:
            self.remapped += 1
        identity = {}
        if path is not None:
            try:
                identity = map_identity(path)
            except OSError:
                pass
        self.add_map(blockmap, why or ("remap" if remapped else "reload"), **identity)
        self.swapped_in += 1
        self.set_meta(remaps=self.remapped, maps=self.swapped_in)

    def keep_disk_map(self, export: str, blockmap: Any, why: str = "remap") -> None:
        """A map a live remap of another disk (``export``) swapped in: a
        DMAP frame at the next request, so a replay and the report name
        that disk's requests with it from there, as live did."""
        with self._pending_lock:
            if self.error is not None:
                return
            at = self._accepted
        item = (at, time.monotonic(), blockmap, {"why": why, "export": export}, b"DMAP")
        self._current_disk_maps[export] = item
        self._maps.append(item)
        self.disk_swapped_in += 1
        self.set_meta(disk_maps=self.disk_swapped_in)

    def add_journal_map(self, journal_map: Any) -> None:
        """A remap's journal map (which file each journal block carried,
        ``late.py``), handed to the sinks now: a JMAP frame at the next
        request, so a replay attributes the journal's writes as live did."""
        with self._pending_lock:
            if self.error is not None:
                return
            at = self._accepted
        self._maps.append((at, time.monotonic(), journal_map, {"why": "journal"}, b"JMAP"))

    def set_meta(self, **fields: Any) -> None:
        """Header fields learned later (e.g. ``bmap=map_identity(path)``):
        written with the next flush as a META frame."""
        self.header.update(fields)
        self.meta.append(fields)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except OSError as e:
                self._fail(e)
                return

    def _fail(self, e: OSError) -> None:
        # A full disk (or a gone NFS server) mid-session: the session goes
        # on, unrecorded from now on; what could not be written is counted
        # as dropped, and the person is told (not a thread's traceback).
        with self._pending_lock:
            self.error = e.strerror or str(e)
            self.dropped += len(self._pending)
            self._pending = []
        if self._bus is not None:
            self._bus.publish(Message(f"recording to {self.path} stopped: {self.error}",
                                      level="error"))

    def flush(self) -> None:
        """Write what came since the last flush: one write of whole frames."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        events = []
        pop = self.events.popleft
        while self.events:
            t, ev = pop()
            item = encode_event(t, ev)
            if item is not None:
                events.append(item)
        frames = []
        while self.meta:
            frames.append(frame(b"META", json.dumps(self.meta.popleft()).encode()))
        while self._maps:  # before the requests they name: a torn write keeps the order
            frames.append(self._mapframe(*self._maps.popleft()))
        if events:
            payload = json.dumps(events, separators=(",", ":")).encode()
            frames.append(frame(b"EVTS", self._zstd.compress(payload)))
        if batch:
            payload = encode_requests(batch)
            frames.append(frame(b"REQS", self._zstd.compress(payload)))
        if frames:
            try:
                self._write(b"".join(frames))
            except OSError:
                self.dropped += len(batch)  # (a partial frame reads as cut short)
                raise
        self.requests += len(batch)

    def _mapframe(self, accepted: int, t: float, blockmap: Any, fields: dict,
                   kind: bytes = b"BMAP") -> bytes:
        skipped = [0]
        fields = {"at": accepted - self._file_start, "time": t, **fields,
                  "entries": len(blockmap)}
        payload = encode_map(blockmap, fields, skipped)
        if skipped[0] and self._bus is not None:
            self._bus.publish(Message(
                f"recording: {skipped[0]} entries of the block map swapped in could not be "
                "kept (names the map format cannot carry)", level="warning"))
        if kind == b"BMAP":
            self.maps += 1
        return frame(kind, payload)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.bytes_written += len(data)

    # -- the Sink protocol --

    def feed(self, batch: Sequence[Request], pieces: Any) -> None:
        with self._pending_lock:
            if self.error is not None:
                self.dropped += len(batch)
                return
            room = self.limit - len(self._pending)
            if room >= len(batch):
                self._pending.extend(batch)
                self._accepted += len(batch)
                return
            self._pending.extend(batch[:max(room, 0)])
            self._accepted += max(room, 0)
            self.dropped += len(batch) - max(room, 0)

    def on_event(self, event: object) -> None:
        if isinstance(event, Dropped):  # the pump's buffer overflowed: not recorded either
            self.dropped += event.count

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        """Last flush and the closing META. Call once the server has stopped
        publishing (the runner does: server thread first, then sinks)."""
        if self._fd < 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._bus is not None:
            self._bus.unsubscribe(self._on_event)
        if self.error is not None:  # the writer thread gave up (told then)
            self._file.close()
            self._fd = -1
            return
        try:
            self.flush()
            self.set_meta(ended_wall=time.time(), requests=self.requests, dropped=self.dropped)
            self.flush()
        finally:
            self._file.close()
            self._fd = -1
