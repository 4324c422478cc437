"""The recording format (--record): every request of a session in an
append-only file. This module is the format and its codec, both ways;
writer.py writes recordings, reader.py reads them, maps.py says which map
names which request, player.py plays one into the pipeline.

File format (version 1). All integers little-endian.

    file   := MAGIC frame*
    MAGIC  := b"DWREC01\\n"                                  (8 bytes)
    frame  := kind:4s  length:u32  crc32:u32  payload[length]
    kind   := b"HEAD" | b"META" | b"REQS" | b"EVTS" | b"BMAP" | b"JMAP" | b"DMAP"

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
- ``DMAP``: a block map a live remap of another disk of the session made
  (the second, third... export), in a BMAP frame's form, whose JSON also
  has ``export`` (the disk's export name): from its ``at`` on it names that
  disk's requests. A kind of its own, so a reader older than it (which
  skips it) never names the first disk with it.
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
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import struct
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat
from operator import itemgetter, sub
from typing import Any

import zstandard

from .. import __version__
from ..errors import DiskwatchError
from ..events import ConnectionEvent, Message, Request, make_request

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
BIG_ENDIAN = sys.byteorder == "big"

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



# --- encoding ------------------------------------------------------------------------

def frame(kind: bytes, payload: bytes) -> bytes:
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
        if BIG_ENDIAN:
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


def encode_event(t: float, event: object) -> list | None:
    if isinstance(event, ConnectionEvent):
        return [t, "conn", {"conn": event.conn, "opened": event.opened, "peer": event.peer,
                               "export": event.export, "requests": event.requests}]
    if isinstance(event, Message):
        return [t, "message", {"text": event.text, "source": event.source,
                                  "level": event.level, "status": event.status}]
    return None


# --- decoding ------------------------------------------------------------------------

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


def decode_requests(payload: bytes, t0: float) -> Columns:
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
        if BIG_ENDIAN:
            col.byteswap()
        cols.append(col)
        pos += size
    if max(cols[2], default=0) >= max(1, len(names)):
        raise RecordingError("a request chunk names an export it does not list")
    return Columns(*cols, exports=names or [""], t0=t0)


def decode_event(item: list, t0: float) -> tuple[float, object] | None:
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
    #: a DMAP frame's: the export (disk) it maps; None: the first disk's
    export: str | None = None


