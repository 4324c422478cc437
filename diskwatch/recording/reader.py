"""Reading a recording (the format: format.py), for replay and report.

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

A torn last frame (a crash, kill -9) ends the reading and sets
``Recording.truncated``; frames of kinds this version does not know are
skipped.
"""

from __future__ import annotations

import array
import io
import json
import os
import zlib
from collections.abc import Iterator
from typing import Any

import zstandard

from ..events import Request
from .format import (
    COLUMNS,
    FORMAT,
    FRAME,
    MAGIC,
    MAP_HEAD,
    MAX_FRAME,
    MAX_MAP_HEAD,
    Columns,
    RecordedMap,
    RecordingError,
    RecordingHeader,
    decode_event,
    decode_requests,
)


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
        #: the other disks' maps their live remaps made (DMAP frames), by request
        self.disk_maps = sorted(
            (self._map_head(f) for f in self._frames if f[0] == b"DMAP"), key=lambda m: m.at)

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
            export = head.get("export")
            if frame[0] == b"DMAP" and not isinstance(export, str):
                raise ValueError("a disk's map without its export")
            return RecordedMap(at, t - self.header.started_monotonic, str(head.get("why", "")),
                               int(head.get("entries", 0)),
                               path if isinstance(path, str) else None,
                               digest if isinstance(digest, str) else None, frame,
                               export if frame[0] == b"DMAP" else None)
        except (zstandard.ZstdError, ValueError, TypeError) as e:
            raise RecordingError(f"{self.path}: a recorded block map is damaged "
                                 f"({str(e)[:200]})") from None

    def load_map(self, recorded: RecordedMap) -> Any:
        """The BlockMap of a BMAP frame, parsed as it is decompressed."""
        from ..bmap.format import BmapFormatError
        from ..bmap.index import BlockMap
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
                yield decode_requests(self._payload(frame), self.header.started_monotonic)

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
                    decoded = decode_event(item, self.header.started_monotonic)
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
