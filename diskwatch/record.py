"""Recordings: every request of a session in an append-only file (--record),
and the reader that replay and report use.

File format (version 1). All integers little-endian.

    file   := MAGIC frame*
    MAGIC  := b"DWREC01\\n"                                  (8 bytes)
    frame  := kind:4s  length:u32  crc32:u32  payload[length]
    kind   := b"HEAD" | b"META" | b"REQS" | b"EVTS" | b"BMAP" | b"JMAP"

- ``HEAD`` (the first frame, exactly one): UTF-8 JSON, uncompressed (``head -c
  400 FILE`` shows it): ``format`` (1), ``diskwatch`` (its version),
  ``source`` (description), ``size`` (bytes), ``exports`` (names),
  ``command`` (the --run command or null), ``bmap`` (null or ``{"path",
  "sha256"}``: the map file's SHA-256 is its identity), ``started_wall``
  (Unix time of the session's start), ``started_monotonic`` (the
  ``time.monotonic()`` value request times are relative to).
- ``META``: UTF-8 JSON whose keys update the header as they come: ``bmap``
  once a map generated under the UI is loaded (the first map: the header's
  ``bmap`` always names the map the session started with); ``remaps`` and
  ``maps`` (live remaps, and maps swapped in by any means, so far); at the
  end ``ended_wall``, ``requests`` and ``dropped`` (requests the recorder
  could not hold). A file without the closing META was cut short (a crash,
  kill -9).
- ``JMAP``: a journal map a live remap made (``late.py``: which file or
  directory each journal block carried metadata of), in a BMAP frame's
  form (``why`` "journal"); from its ``at`` on, a replay gives the journal
  writes it kept to their owners, as the live session did there. Readers
  older than it skip it.
- ``BMAP``: a block map the live session swapped in (a live remap, or the
  ``--bmap`` file read again on SIGHUP), kept whole because the session's
  names changed with it: zstd-compressed (one zstd frame) text in the block
  map format (diskwatch/bmap/format.py; the entries in the map's own order,
  which decides between equal ranges), whose first line is a comment
  ``# diskwatch-recorded-map {JSON}``, so the decompressed payload is itself
  a map file (``zstd -d``). The JSON: ``at`` (the index in this file of the
  first request it named: every request before it was looked up in the
  map before; index counts REQS rows in file order), ``time``
  (``time.monotonic()`` when it took effect, as EVTS), ``why`` ("remap
  (auto)", "remap (key)", "reload"...), ``entries`` (lines that follow),
  ``skipped`` (entries the format cannot carry; 0), and for a reload
  ``path`` and ``sha256`` of the file read.
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

Versions: ``format`` changes only when an older reader would misread a
file. A new frame kind is an addition: readers skip frames of kinds they do
not know (every reader since format 1 indexes all frames and decodes only
its own kinds). BMAP was added that way, so a diskwatch older than it reads
a recording with remaps and names it all with the first map, as before (the
META ``remaps`` count says that names changed), and this one reads every
older recording (no BMAP: one map throughout).

Maps in a replay or report (``maps_for``): the first map is the header's
(``choose_map``: given with ``--bmap``, or the recorded file if it is still
there unchanged); the recorded BMAP frames then take over at their request,
so a replay names each request with the map the live session named it
with. ``--bmap MAP`` overrides them all: the given map names every request
(said in one line). Memory: a recorder holds a swapped-in map only until
its next flush and writes it compressed as it formats it (only the
compressed text is held); a reader keeps frame offsets and decodes one map
at a time, as a stream, when its first request comes.

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
    rec.maps                                    # RecordedMap per BMAP frame
    rec.load_map(rec.maps[0])                   # its BlockMap
    cols = rec.columns()                        # every chunk's columns joined:
    cols.start, cols.offset, ...                # arrays, for reports at C speed
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import os
import struct
import sys
import threading
import time
import zlib
from bisect import bisect_right
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
#: the first line of a BMAP frame's map text (a comment, for map readers)
MAP_HEAD = b"# diskwatch-recorded-map "
#: that line's length at most, JSON included
MAX_MAP_HEAD = 1 << 16
#: zstd level for maps: written once per swap, so smaller beats faster here
MAP_LEVEL = 3
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


def map_lines(blockmap: Any, skipped: list[int] | None = None) -> Iterator[bytes]:
    """A ``BlockMap``'s entries as block-map lines (the format
    ``bmap/format.py``'s ``format_entry`` writes and checks), in the map's
    own order: that order decides between equal ranges, so the lines load
    back into the same map (``write_bmap`` sorts). An entry the format
    cannot carry (a newline in a name, a space in a device: the mappers
    make none) is left out and counted in ``skipped[0]``. Nothing is kept
    per object: a map of files with one range each would double its size."""
    for start, end, obj in blockmap.iter_entries():
        device, path = obj.device, obj.path
        if not device or " " in device or "\n" in device or (
                (path is None) != (obj.type not in "df")) or (path is not None and (
                    not path or "\n" in path)):
            if skipped is not None:
                skipped[0] += 1
            continue
        if path is None:
            line = f"1 {start:x} {end:x} {obj.type} {device}\n"
        else:
            line = f"1 {start:x} {end:x} {obj.type} {device} {path}\n"
        yield line.encode("utf-8", "surrogateescape")


def encode_map(blockmap: Any, fields: dict, skipped: list[int] | None = None) -> bytes:
    """The BMAP payload: the map's text compressed as it is formatted, in
    blocks of 64 KiB (only the compressed bytes are held)."""
    head = MAP_HEAD + json.dumps(fields, separators=(",", ":")).encode() + b"\n"
    compressor = zstandard.ZstdCompressor(level=MAP_LEVEL).compressobj()
    out: list[bytes] = []
    block, size = [head], len(head)
    for line in map_lines(blockmap, skipped):
        block.append(line)
        size += len(line)
        if size >= 1 << 16:
            out.append(compressor.compress(b"".join(block)))
            block, size = [], 0
    out.append(compressor.compress(b"".join(block)))
    out.append(compressor.flush())
    return b"".join(out)


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
                with self._pending_lock:  # what is pending now goes to the new file
                    self._file_start = self._accepted - len(self._pending)
                self._write_head()
                current = self._current_map
                if current is not None and not any(m is current for m in self._maps):
                    # A map swapped in before this file began names its first
                    # requests, and the header names only the first map.
                    self._maps.appendleft((self._file_start, *current[1:]))

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
            item = _encode_event(t, ev)
            if item is not None:
                events.append(item)
        frames = []
        while self.meta:
            frames.append(_frame(b"META", json.dumps(self.meta.popleft()).encode()))
        while self._maps:  # before the requests they name: a torn write keeps the order
            frames.append(self._map_frame(*self._maps.popleft()))
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

    def _map_frame(self, accepted: int, t: float, blockmap: Any, fields: dict,
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
        return _frame(kind, payload)

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


@dataclass
class RecordedMap:
    """A BMAP frame's head: which map named the requests from ``at`` on."""

    at: int  # index (in the file) of the first request it named
    t: float  # seconds since the start when it took effect
    why: str  # "remap (auto)", "reload"...
    entries: int
    path: str | None  # the file a reload read (the recording's text: untrusted)
    sha256: str | None
    frame: tuple[bytes, int, int] = field(repr=False)


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
        #: the maps the live session swapped in, by request (BMAP frames)
        self.maps = sorted((self._map_head(f) for f in self._frames if f[0] == b"BMAP"),
                           key=lambda m: m.at)
        #: the journal maps its remaps made, by request (JMAP frames: late.py)
        self.journal_maps = sorted(
            (self._map_head(f) for f in self._frames if f[0] == b"JMAP"), key=lambda m: m.at)

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

    def _raw(self, frame: tuple[bytes, int, int]) -> bytes:
        _, offset, length = frame
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _map_head(self, frame: tuple[bytes, int, int]) -> RecordedMap:
        """The first line of a BMAP frame (only as much is decompressed)."""
        line = b""
        try:
            with zstandard.ZstdDecompressor().stream_reader(self._raw(frame)) as reader:
                while b"\n" not in line and len(line) < MAX_MAP_HEAD:
                    block = reader.read(4096)
                    if not block:
                        break
                    line += block
            line = line.split(b"\n", 1)[0]
            if not line.startswith(MAP_HEAD):
                raise ValueError("no map header line")
            head = json.loads(line[len(MAP_HEAD):])
            if not isinstance(head, dict):
                raise ValueError("no map header line")
            at, t = head.get("at"), head.get("time")
            if (not isinstance(at, int) or isinstance(at, bool) or at < 0
                    or not isinstance(t, (int, float))):
                raise ValueError("a bad request index or time")
            path, digest = head.get("path"), head.get("sha256")
            return RecordedMap(at, t - self.header.started_monotonic, str(head.get("why", "")),
                               int(head.get("entries", 0)),
                               path if isinstance(path, str) else None,
                               digest if isinstance(digest, str) else None, frame)
        except (zstandard.ZstdError, ValueError, TypeError) as e:
            raise RecordingError(f"{self.path}: a recorded block map is damaged "
                                 f"({str(e)[:200]})") from None

    def load_map(self, recorded: RecordedMap) -> Any:
        """The BlockMap of a BMAP frame, parsed as it is decompressed."""
        from .bmap.format import BmapFormatError
        from .bmap.index import BlockMap
        name = f"the map recorded at request {recorded.at}"
        try:
            with zstandard.ZstdDecompressor().stream_reader(self._raw(recorded.frame)) as raw:
                return BlockMap.from_lines(io.BufferedReader(raw, 1 << 16), name)
        except (zstandard.ZstdError, BmapFormatError, ValueError) as e:
            raise RecordingError(f"{self.path}: a recorded block map is damaged "
                                 f"({str(e)[:200]})") from None

    def _payload(self, frame: tuple[bytes, int, int]) -> bytes:
        kind = frame[0]
        data = self._raw(frame)
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


# --- which map named which request --------------------------------------------------

class MapSchedule:
    """Which block map names which request of a recording: ``first`` up to
    the first recorded map's request, each recorded map from its own on
    (the last of several at one request wins, as live). Holds ``first`` and
    the map last asked for; a recorded one is decoded again when asked for
    after another (a replay seeking back)."""

    def __init__(self, first: Any, recorded: Sequence[RecordedMap] = (),
                 load: Callable[[RecordedMap], Any] | None = None,
                 journal: Sequence[RecordedMap] = ()) -> None:
        self.first = first
        self.recorded = list(recorded)
        #: the journal maps (JMAP frames) that go with the recorded maps:
        #: none when a --bmap names every request instead
        self.journal = list(journal)
        self.at = [m.at for m in self.recorded]
        self._load = load
        self._cached: tuple[int, Any] = (-1, first)

    def map(self, k: int) -> Any:
        """Map ``k``: -1 the first, else the k-th recorded one."""
        if self._cached[0] != k:
            self._cached = (k, None)  # the old one goes before the new one is built
            self._cached = (k, self.first if k < 0 else self._load(self.recorded[k]))
        return self._cached[1]

    def last(self) -> Any:
        """The map in effect at the end."""
        return self.map(len(self.recorded) - 1)

    def segments(self, first: int, end: int) -> Iterator[tuple[int, int, Any]]:
        """Requests [first, end) split where the map changes: (from, to, map)."""
        at = self.at
        k = bisect_right(at, first) - 1
        pos = first
        while pos < end:
            hi = min(at[k + 1], end) if k + 1 < len(at) else end
            if hi > pos:
                yield pos, hi, self.map(k)
                pos = hi
            k += 1


def maps_for(recording: Recording, given: str | None, first: Any,
             say: Callable[[str], None]) -> MapSchedule | None:
    """The maps to name ``recording`` with: ``first`` (the loaded map
    ``choose_map`` chose, or None), then the maps the live session swapped
    in, unless a map was ``given`` (--bmap): that one names every request.
    None when nothing names anything. ``say`` gets one line."""
    from .bmap.index import BlockMap
    recorded = recording.maps
    journal = [] if given else recording.journal_maps
    if recorded:
        n = len(recorded)
        maps, verb = (f"{n} block maps", "are") if n > 1 else ("block map", "is")
        if given:
            say(f"{given} names every request: the {maps} the live session swapped in "
                f"(kept in the recording) {verb} not used")
            recorded = []
        else:
            whys = ", ".join(sorted({m.why for m in recorded}))
            say(f"the {maps} the live session swapped in ({whys}) name{'' if n > 1 else 's'} "
                f"its requests from {recorded[0].t:.3f} s on, as live")
    if first is None and not recorded:
        return None
    return MapSchedule(BlockMap([]) if first is None else first, recorded, recording.load_map,
                       journal)
