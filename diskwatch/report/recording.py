"""A recording, whatever wrote it: requests plus what is known of their origin.

The one type the rest of the report package sees. ``inputs.py`` makes one
of any kind of file, through ``importers.py`` for other servers' logs; both
import it from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..events import Request

#: what ``--from`` accepts; "auto" decides by the file's first bytes
KINDS = ("auto", "diskwatch", "jsonl", "nbd-trdump", "nbdkit-log")


@dataclass
class Recording:
    """Requests of one session, ``start`` in seconds from the recording's start.

    ``timed`` is False when the source logs no times (nbd-server): then
    ``start`` is the request's position, 0, 1, 2..., and pictures and
    timelines say "request #" instead of seconds."""

    requests: Iterable[Request]  # a list, or re-read from the file at each pass
    source: str = ""  # what was served, or which log this came from
    size: int | None = None  # bytes of the disk, when known
    origin: str = "diskwatch"  # one of KINDS but "auto"
    timed: bool = True
    path: str = ""
    truncated: bool = False  # the file ended inside a record (a crash, a copy mid-write)
    bmap_hash: str | None = None  # SHA-256 of the block map in use when recorded, if any
    bmap_path: str | None = None  # and where that map was
    #: diskwatch's own recording (record.Recording): the maps a live
    #: session swapped in are kept there; None for other logs
    recorded: Any = None

    @property
    def time_unit(self) -> str:
        return "s" if self.timed else "request #"

    def disk_size(self) -> int:
        """The disk's size if known, else the end of the furthest request."""
        if self.size:
            return self.size
        return max((r.offset + r.length for r in self.requests), default=0)
