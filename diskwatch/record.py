"""Recordings: every request of a session in an append-only file (--record),
and the reader that replay and report use.

File format (version 1). All integers little-endian.

    file   := MAGIC frame*
    MAGIC  := b"DWREC01\\n"                                  (8 bytes)
    frame  := kind:4s  length:u32  crc32:u32  payload[length]
    kind   := b"HEAD" | b"META" | b"REQS" | b"EVTS"

- ``HEAD`` (the first frame, exactly one): UTF-8 JSON, uncompressed (``head -c
  400 FILE`` shows it): ``format`` (1), ``diskwatch`` (its version),
  ``source`` (description), ``size`` (bytes), ``exports`` (names),
  ``command`` (the --run command or null), ``bmap`` (null or ``{"path",
  "sha256"}``: the map file's SHA-256 is its identity), ``started_wall``
  (Unix time of the session's start), ``started_monotonic`` (the
  ``time.monotonic()`` value request times are relative to).
- ``META``: UTF-8 JSON whose keys update the header as they come: ``bmap``
  once a map generated under the UI is loaded; at the end ``ended_wall``,
  ``requests`` and ``dropped`` (requests the recorder could not hold). A
  file without the closing META was cut short (a crash, kill -9).
- ``REQS``: zstd-compressed (one zstd frame). ``count:u32 n_exports:u16``, then ``n_exports``
  names (``len:u16`` + UTF-8) that the ``export`` column indexes, then one
  column per field, each ``count`` little-endian values, in this order:

      start       f64  arrival, time.monotonic() seconds (minus
                       started_monotonic: seconds since the session began)
      conn        u32  connection number, from 1
      export      u16  index into this chunk's names
      command     u8   NBD command number (diskwatch.events.Command)
      offset      u64
      length      u32
      flags       u16  NBD command flags
      duration    f64  seconds from arrival to the reply queued
      error       u32  errno sent back, 0 for success

  Requests are in the order the server published them (within a
  connection's batch, by arrival), which is the order live sinks saw.
- ``EVTS``: zstd-compressed JSON list of ``[start, kind, fields]`` (start as
  in REQS): ``"conn"``
  (``conn, opened, peer, export, requests``) and ``"message"`` (``text,
  source, level, status``: the captive command's output, untrusted text).

Every frame is independently decodable and written with one ``write`` once a
second (``Recorder.INTERVAL``), so after a crash or kill -9 the file reads
back to the last second flushed; a torn last frame (short, or a CRC that
does not match) ends the reading and sets ``Recording.truncated``.

Why this and not JSON lines or Parquet: nothing may format text per request
(JSON lines cost 44 % of the throughput). The recorder is fed by the
session's pump like every sink, so the server thread does no more work for
it at all: the pump hands it each drained batch (one ``list.extend`` under a
lock); once a second a thread turns what came into columns with C-level
``map(itemgetter)`` into ``array``s (no arithmetic per value: times stay the
floats the server made) and compresses them with zstd level 1 (the
``zstandard`` package): about 17 bytes a request on fio's random reads
instead of 41, for 50 ns of CPU a request where zlib's level 1 took 800 ns
for 16 bytes. Parquet would add pyarrow (~100 MB) for the same columns.

Reading:

    rec = open_recording("boot.dwrec")        # RecordingError if it is not one
    header, batches = rec                       # (it unpacks, too)
    rec.header.source, rec.header.bmap          # the header, META applied
    for batch in rec.batches():                 # lists of events.Request,
        ...                                     # start = seconds since the start
    for t, event in rec.events():               # ConnectionEvent / Message
        ...
    cols = rec.columns()                        # every chunk's columns joined:
    cols.start, cols.offset, ...                # arrays, for reports at C speed
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat
from operator import itemgetter, sub
from typing import Any

import zstandard

from . import __version__
from .errors import DiskwatchError
from .events import ConnectionEvent, Dropped, Message, Request, make_request
from .files import open_output

MAGIC = b"DWREC01\n"
FORMAT = 1
FRAME = struct.Struct("<4sII")  # kind, payload length, crc32 of the payload
COLUMNS = (("start", "d"), ("conn", "I"), ("export", "H"), ("command", "B"),
           ("offset", "Q"), ("length", "I"), ("flags", "H"), ("duration", "d"),
           ("error", "I"))
#: the largest frame a reader accepts (a recorder writes at most ~40 MB)
MAX_FRAME = 1 << 30
_BIG_ENDIAN = sys.byteorder == "big"

for _name, _code in COLUMNS:  # the format needs these sizes; say so if a platform differs
    assert array.array(_code).itemsize == struct.calcsize("<" + _code), _name


class RecordingError(DiskwatchError):
    """Not a recording, or not one this diskwatch reads."""


@dataclass
class RecordingHeader:
    format: int = FORMAT
    diskwatch: str = __version__
    source: str = ""
    size: int = 0
    exports: list[str] = field(default_factory=lambda: [""])
    command: str | None = None
    bmap: dict | None = None  # {"path": ..., "sha256": ...}
    started_wall: float = 0.0
    started_monotonic: float = 0.0
    # from the closing META (absent when the recording was cut short)
    ended_wall: float | None = None
    requests: int | None = None
    dropped: int | None = None
    extra: dict = field(default_factory=dict)  # keys this version does not know

    @property
    def bmap_hash(self) -> str | None:
        return self.bmap.get("sha256") if self.bmap else None

    def update(self, fields: dict) -> None:
        known = set(self.__dataclass_fields__) - {"extra"}
        for k, v in fields.items():
            if k in known:
                setattr(self, k, v)
            else:
                self.extra[k] = v

    def to_json(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}


def map_identity(path: str) -> dict:
    """What a recording keeps of the block map in use: its path and SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": os.path.abspath(path), "sha256": h.hexdigest()}


def choose_map(given: str | None, recorded: dict | None,
               say: Callable[[str], None]) -> str | None:
    """The block map to name a recording with (replay and report): ``given``
    (told if the recording was made with another), else the one it was
    recorded with (``recorded``: ``map_identity``'s dict) if that file is
    still there, unchanged (told, and told if not). ``say`` gets one line;
    the recorded path is the recording's text, so ``say`` escapes it."""
    digest = (recorded or {}).get("sha256")
    if given:
        if digest and map_identity(given)["sha256"] != digest:
            say(f"{given} is not the block map the recording was made with (another "
                "SHA-256, made since?): names may not match")
        return given
    path = (recorded or {}).get("path")
    if not digest or not path:
        return None
    try:
        same = map_identity(path)["sha256"] == digest
    except OSError:
        same = False
    if same:
        say(f"naming with the block map it was recorded with: {path}")
        return path
    say(f"recorded with the map {path}, which is gone or changed: give --bmap MAP to name "
        "files")
    return None


# --- writing -------------------------------------------------------------------------

def _frame(kind: bytes, payload: bytes) -> bytes:
    return FRAME.pack(kind, len(payload), zlib.crc32(payload)) + payload


def encode_requests(batch: Sequence[Request]) -> bytes:
    """The REQS payload (before compression)."""
    n = len(batch)
    names: dict[str, int] = {}
    exports = list(map(itemgetter(1), batch))
    for name in set(exports):
        names[name] = len(names)
    parts = [struct.pack("<IH", n, len(names))]
    for name in names:
        b = name.encode("utf-8", "surrogateescape")[:0xFFFF]
        parts.append(struct.pack("<H", len(b)) + b)
    cols = [
        array.array("d", map(itemgetter(6), batch)),
        array.array("I", map(itemgetter(0), batch)),
        array.array("H", map(names.__getitem__, exports)) if len(names) > 1
        else array.array("H", bytes(2 * n)),
        array.array("B", map(itemgetter(2), batch)),
        array.array("Q", map(itemgetter(3), batch)),
        array.array("I", map(itemgetter(4), batch)),
        array.array("H", map(itemgetter(5), batch)),
        array.array("d", map(itemgetter(7), batch)),
        array.array("I", map(itemgetter(8), batch)),
    ]
    for col in cols:
        if _BIG_ENDIAN:
            col.byteswap()
        parts.append(col.tobytes())
    return b"".join(parts)


def _encode_event(t: float, event: object) -> list | None:
    if isinstance(event, ConnectionEvent):
        return [t, "conn", {"conn": event.conn, "opened": event.opened, "peer": event.peer,
                               "export": event.export, "requests": event.requests}]
    if isinstance(event, Message):
        return [t, "message", {"text": event.text, "source": event.source,
                                  "level": event.level, "status": event.status}]
    return None


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
    second's worth."""

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
        self._write_head()

    def _write_head(self) -> None:
        head = json.dumps(self.header.to_json(), separators=(",", ":")).encode()
        self._write(MAGIC + _frame(b"HEAD", head))

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
                self._write_head()

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
            item = _encode_event(t, ev)
            if item is not None:
                events.append(item)
        frames = []
        while self.meta:
            frames.append(_frame(b"META", json.dumps(self.meta.popleft()).encode()))
        if events:
            payload = json.dumps(events, separators=(",", ":")).encode()
            frames.append(_frame(b"EVTS", self._zstd.compress(payload)))
        if batch:
            payload = encode_requests(batch)
            frames.append(_frame(b"REQS", self._zstd.compress(payload)))
        if frames:
            try:
                self._write(b"".join(frames))
            except OSError:
                self.dropped += len(batch)  # (a partial frame reads as cut short)
                raise
        self.requests += len(batch)

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
                return
            self._pending.extend(batch[:max(room, 0)])
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


# --- reading -------------------------------------------------------------------------

@dataclass
class Columns:
    """Requests as parallel arrays (see the REQS columns); ``exports`` are
    the names the ``export`` column indexes."""

    start: array.array  # monotonic seconds (see started_monotonic)
    conn: array.array
    export: array.array
    command: array.array
    offset: array.array
    length: array.array
    flags: array.array
    duration: array.array
    error: array.array
    exports: list[str]
    t0: float = 0.0  # started_monotonic: start - t0 is seconds since the session began

    def __len__(self) -> int:
        return len(self.start)

    def requests(self, first: int = 0, end: int | None = None) -> list[Request]:
        """Requests [first, end) as events.Request, ``start`` in seconds
        since the recording's start."""
        end = len(self) if end is None else end
        if end <= first:
            return []
        names = self.exports
        sl = slice(first, end)
        t = map(sub, self.start[sl], repeat(self.t0))
        return list(map(make_request, zip(
            self.conn[sl], map(names.__getitem__, self.export[sl]), self.command[sl],
            self.offset[sl], self.length[sl], self.flags[sl], t, self.duration[sl],
            self.error[sl], strict=True)))


def _decode_requests(payload: bytes, t0: float) -> Columns:
    n, n_exports = struct.unpack_from("<IH", payload)
    pos = 6
    names = []
    for _ in range(n_exports):
        (k,) = struct.unpack_from("<H", payload, pos)
        names.append(payload[pos + 2:pos + 2 + k].decode("utf-8", "surrogateescape"))
        pos += 2 + k
    cols = []
    for _, code in COLUMNS:
        col = array.array(code)
        size = col.itemsize * n
        if pos + size > len(payload):
            raise RecordingError("a request chunk is shorter than it says")
        col.frombytes(payload[pos:pos + size])
        if _BIG_ENDIAN:
            col.byteswap()
        cols.append(col)
        pos += size
    if max(cols[2], default=0) >= max(1, len(names)):
        raise RecordingError("a request chunk names an export it does not list")
    return Columns(*cols, exports=names or [""], t0=t0)


def _decode_event(item: list, t0: float) -> tuple[float, object] | None:
    t, kind, f = item
    if kind == "conn":
        return t - t0, ConnectionEvent(f["conn"], f["opened"], f["peer"], f.get("export", ""),
                                           f.get("requests", 0))
    if kind == "message":
        return t - t0, Message(f["text"], f.get("source", "stdout"), f.get("level", "info"),
                                   f.get("status"))
    return None  # a kind a later version added


class Recording:
    """An open recording: the header (with every META applied) and the
    frames, decoded lazily. See the module docstring."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.truncated = False  # the file ends in a torn frame (a crash)
        self._frames: list[tuple[bytes, int, int]] = []  # kind, payload offset, length
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise RecordingError(f"{path} is not a diskwatch recording "
                                     "(made with diskwatch --record FILE)")
            self._index(f)
        if not self._frames or self._frames[0][0] != b"HEAD":
            raise RecordingError(f"{path}: the recording has no header")
        self.header = RecordingHeader()
        self.header.update(json.loads(self._payload(self._frames[0])))
        if self.header.format != FORMAT:
            raise RecordingError(f"{path}: recording format {self.header.format}; this "
                                 f"diskwatch reads format {FORMAT}")
        for frame in self._frames:
            if frame[0] == b"META":
                self.header.update(json.loads(self._payload(frame)))

    def _index(self, f) -> None:
        size = os.fstat(f.fileno()).st_size
        pos = len(MAGIC)
        while pos < size:
            head = f.read(FRAME.size)
            if len(head) < FRAME.size:
                self.truncated = True
                return
            kind, length, crc = FRAME.unpack(head)
            if length > MAX_FRAME or pos + FRAME.size + length > size:
                self.truncated = True
                return
            payload = f.read(length)
            if zlib.crc32(payload) != crc:
                self.truncated = True
                return
            self._frames.append((kind, pos + FRAME.size, length))
            pos += FRAME.size + length

    def _payload(self, frame: tuple[bytes, int, int]) -> bytes:
        kind, offset, length = frame
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if kind in (b"REQS", b"EVTS"):
            try:
                data = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_FRAME)
            except zstandard.ZstdError as e:
                raise RecordingError(f"{self.path}: a damaged chunk ({e})") from None
        return data

    def __iter__(self) -> Iterator[Any]:
        """``header, batches = open_recording(path)`` also works."""
        return iter((self.header, self.batches()))

    @property
    def complete(self) -> bool:
        """The recorder closed it (the closing META is there)."""
        return self.header.ended_wall is not None

    def chunks(self) -> Iterator[Columns]:
        for frame in self._frames:
            if frame[0] == b"REQS":
                yield _decode_requests(self._payload(frame), self.header.started_monotonic)

    def batches(self) -> Iterator[list[Request]]:
        """The requests, one list per chunk (about a second of the session)."""
        for cols in self.chunks():
            yield cols.requests()

    def requests(self) -> Iterator[Request]:
        for batch in self.batches():
            yield from batch

    def events(self) -> Iterator[tuple[float, object]]:
        """(seconds since the start, ConnectionEvent or Message), in order."""
        for frame in self._frames:
            if frame[0] == b"EVTS":
                for item in json.loads(self._payload(frame)):
                    decoded = _decode_event(item, self.header.started_monotonic)
                    if decoded is not None:
                        yield decoded

    def columns(self) -> Columns:
        """All requests as one set of columns (export indexes renumbered)."""
        out = {name: array.array(code) for name, code in COLUMNS}
        names: dict[str, int] = {}
        for cols in self.chunks():
            index = [names.setdefault(n, len(names)) for n in cols.exports]
            for name, _ in COLUMNS:
                src = getattr(cols, name)
                if name == "export" and index != list(range(len(index))):
                    src = array.array("H", map(index.__getitem__, src))
                out[name].extend(src)
        return Columns(**out, exports=list(names) or [""], t0=self.header.started_monotonic)


def open_recording(path: str) -> Recording:
    """Open a recording made with --record (RecordingError if it is not one)."""
    return Recording(path)
