"""Open a recording, whatever wrote it, as a ``Recording`` (recording.py).

``open_input(path, kind)`` reads any kind the report knows; ``kind="auto"``
looks at the file's first bytes. The rest of the report package only ever
sees a ``Recording``.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import DiskwatchError
from ..events import Request
from ..wire import REQUEST_MAGIC
from . import importers
from .importers import NBD_TRACELOG_MAGIC
from .recording import KINDS, Recording

__all__ = ["KINDS", "Recording", "open_input", "read_diskwatch_recording", "sniff"]


def sniff(path: str) -> str:
    """The kind of a file, by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) >= 4 and int.from_bytes(head[:4], "big") in (REQUEST_MAGIC,
                                                               NBD_TRACELOG_MAGIC):
        return "nbd-trdump"
    if head.startswith(b"DWREC"):
        return "diskwatch"
    if head[:1] == b"{":
        return "jsonl"
    if len(head) >= 11 and head[:4].isdigit() and head[4:5] == b"-" and head[10:11] == b" ":
        return "nbdkit-log"
    if not head:
        raise DiskwatchError(f"{path}: empty file: nothing to report")
    return "diskwatch"


def open_input(path: str, kind: str = "auto") -> Recording:
    """Read a recording or a foreign log into memory."""
    if kind == "auto":
        kind = sniff(path)
    if kind == "nbd-trdump":
        return importers.read_nbd_trdump(path)
    if kind == "nbdkit-log":
        return importers.read_nbdkit_log(path)
    if kind == "jsonl":
        return importers.read_jsonl(path)
    if kind == "diskwatch":
        return read_diskwatch_recording(path)
    raise DiskwatchError(f"unknown input kind {kind!r}: use one of {', '.join(KINDS)}")


def read_diskwatch_recording(path: str) -> Recording:
    """A file written by ``diskwatch --record``, through diskwatch.recording's reader."""
    try:
        from ..recording.reader import open_recording
    except ImportError:
        raise DiskwatchError(
            f"{path}: not a file the report can read (JSON lines, nbd-server transaction "
            "log or nbdkit log); say which with --from") from None
    rec = open_recording(path)
    header = rec.header
    bmap = header.bmap or {}
    # an imported log keeps what it was, and whether it had times
    return Recording(requests=_Reread(rec), source=header.source or path,
                     size=header.size or None,
                     origin=header.extra.get("imported_from", "diskwatch"),
                     timed=bool(header.extra.get("timed", True)), path=path,
                     truncated=rec.truncated or not rec.complete,
                     bmap_hash=bmap.get("sha256"), bmap_path=bmap.get("path"), recorded=rec)


class _Reread:
    """A recording's requests, read from the file again at each pass (a
    chunk of about a second at a time), so a long recording is never all
    in memory: the report makes one pass, the picture another."""

    def __init__(self, rec) -> None:
        self.rec = rec

    def __iter__(self) -> Iterator[Request]:
        return self.rec.requests()
