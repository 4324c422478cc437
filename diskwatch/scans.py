"""Scans: a sweep of reads over many files, directory by directory.

An antivirus, an indexer, a backup agent or updatedb reads file after file
across a tree; a boot reads many files too, but hopping between a few
directories (a library, then /etc, then the library again). What tells
them apart is **directory locality**: a scan takes a directory's files one
after another and rarely comes back to a directory it left.

``ScanTracker`` is fed the *first read* of each file (``first_read``: its
time, the object, the bytes), in time order, live (a sink) or from a
recording (the report). It keeps one *run* per top-level directory of each
device (so a scan of ``/Program Files`` is not broken by reads in
``/Windows``): a run goes on while its files' first reads come less than
``SCAN_GAP`` seconds apart. A run is a **scan** once it holds at least
``SCAN_MIN_FILES`` files in at least ``SCAN_MIN_DIRS`` directories and came
back to directories it had left at most ``SCAN_MAX_RETURNS`` times per
directory (a depth-first walk returns to a parent once per subdirectory;
a boot returns all the time). Its ``directory`` is the deepest directory
holding all its files.

Bounded whatever the guest reads: a run keeps counts and its directories
(at most ``MAX_DIRS`` kept: beyond, a run stops counting returns), and at
most ``MAX_RUNS`` runs are open (the oldest is closed first); closed scans
kept at most ``MAX_SCANS``.

In the report's JSON (``scans``): ``device``, ``directory``, ``files``,
``directories``, ``bytes`` (what the scan read of those files), ``start``
and ``duration`` (seconds, the recording's clock), ``rate`` (files a second).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCAN_GAP", "SCAN_MIN_DIRS", "SCAN_MIN_FILES", "Scan", "ScanTracker"]

#: seconds between two first reads of one run, at most
SCAN_GAP = 2.0
#: files and directories a run needs to be a scan
SCAN_MIN_FILES = 20
SCAN_MIN_DIRS = 2
#: returns to a directory left before, per directory of the run, at most
SCAN_MAX_RETURNS = 1.0
#: bounds (see the module docstring)
MAX_RUNS = 256
MAX_DIRS = 65536
MAX_SCANS = 1000


@dataclass
class Scan:
    """One sweep (a run that is a scan); ``live``: still going on."""

    device: str
    directory: str
    files: int
    directories: int
    bytes: int
    start: float
    end: float
    live: bool = False

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def rate(self) -> float:
        return self.files / self.duration if self.duration > 0 else float(self.files)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "directory": self.directory, "files": self.files,
                "directories": self.directories, "bytes": self.bytes,
                "start": round(self.start, 6), "duration": round(self.duration, 6),
                "rate": round(self.rate, 3)}


@dataclass
class _Run:
    device: str
    start: float
    last: float
    common: list[str]  # the deepest directory holding every file, as parts
    files: int = 0
    bytes: int = 0
    returns: int = 0
    current: str = ""
    dirs: set[str] = field(default_factory=set)
    ndirs: int = 0

    def add(self, t: float, directory: str, nbytes: int) -> None:
        self.last = t
        self.files += 1
        self.bytes += nbytes
        if directory != self.current:
            if directory in self.dirs:
                self.returns += 1
            elif len(self.dirs) < MAX_DIRS:
                self.dirs.add(directory)
                self.ndirs += 1
            self.current = directory
            parts = directory.split("/")
            common = self.common
            k = 0
            while k < len(common) and k < len(parts) and common[k] == parts[k]:
                k += 1
            del common[k:]

    def is_scan(self) -> bool:
        return (self.files >= SCAN_MIN_FILES and self.ndirs >= SCAN_MIN_DIRS
                and self.returns <= SCAN_MAX_RETURNS * self.ndirs)

    def scan(self, live: bool) -> Scan:
        directory = "/".join(self.common) or "/"
        return Scan(self.device, directory, self.files, self.ndirs, self.bytes, self.start,
                    self.last, live)


class ScanTracker:
    """First reads of files in, scans out (see the module docstring)."""

    def __init__(self, gap: float = SCAN_GAP) -> None:
        self.gap = gap
        self._runs: dict[tuple[str, str], _Run] = {}
        self.done: list[Scan] = []  # scans ended (at most MAX_SCANS; counted beyond)
        self.more = 0

    def first_read(self, t: float, obj: Any, nbytes: int) -> None:
        """The first read of a file (``obj``: a map object of type ``f``)."""
        path = obj.path
        if not path or obj.type != "f":
            return
        directory, _, _ = path.rpartition("/")
        top = directory.split("/", 2)[1] if directory.count("/") >= 1 else ""
        key = (obj.device, top)
        run = self._runs.get(key)
        if run is not None and t - run.last > self.gap:
            self._close(key)
            run = None
        if run is None:
            if len(self._runs) >= MAX_RUNS:
                self._close(min(self._runs, key=lambda k: self._runs[k].last))
            run = self._runs[key] = _Run(obj.device, t, t, (directory or "/").split("/"))
        run.add(t, directory or "/", nbytes)

    def tick(self, now: float) -> None:
        """Close the runs that have been quiet for longer than the gap."""
        for key in [k for k, r in self._runs.items() if now - r.last > self.gap]:
            self._close(key)

    def _close(self, key) -> None:
        run = self._runs.pop(key)
        if run.is_scan():
            if len(self.done) < MAX_SCANS:
                self.done.append(run.scan(live=False))
            else:
                self.more += 1

    def live(self) -> list[Scan]:
        """The scans going on now (runs that are scans already)."""
        return [r.scan(live=True) for r in self._runs.values() if r.is_scan()]

    def scans(self) -> list[Scan]:
        """Every scan, ended or going on, by start."""
        return sorted(self.done + self.live(), key=lambda s: s.start)
