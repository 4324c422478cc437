"""Lifetimes (issue 21, item 4): the files and directories a session saw
created and deleted, through its maps, with how long they lived and what
their traffic was. One definition for the live views and the report.

    lives = Lifetimes()
    lives.touch(obj, t, is_read, n)            # every named piece, in order
    lives.map_changed(added, removed, new)     # a map swapped in (its objects
                                               # new and gone against the last)
    lives.gone                                 # Lifetime, oldest first

Definitions:

- **created**: an object (a file or directory of the guest's, not one of
  the filesystem's own structures) that a map made during the session has
  and the one before it had not, and whose first request in the session is
  a write. One first *read* means it was there before (the session started
  from an old map): it is not followed.
- **born**: its first request (a write named late counts: live, late
  naming hands those on after the swap; the report names them with the map
  that added it), or the time of the map that added it if it had none.
- **gone by**: the time of the first map without it (the last request seen
  then). The guest deleted it before that: *lived* (gone by - born) is an
  upper bound, as close as the remaps are frequent (a second or so while a
  guest writes).
- **renamed**: an object gone whose first written byte a new object of the
  same map now holds (a temporary file renamed into place, a rotated log)
  did not die: its life goes on under the new name (``renamed_from``).
- A file created and deleted between two remaps is seen by none: it is
  not listed (its writes stay with the partition).

Bounded whatever the guest does: at most ``MAX_ALIVE`` objects followed
(more are counted in ``untracked``), the last ``MAX_GONE`` lifetimes kept
(all counted in ``deaths``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Lifetime", "Lifetimes", "MAX_ALIVE", "MAX_GONE", "followed"]

MAX_ALIVE = 100_000
MAX_GONE = 10_000


def followed(obj: Any) -> bool:
    """A guest's file or directory (not /$Journal, /$MFT, PATH:$extents...)."""
    return obj is not None and obj.type in "fd" and not obj.is_structure


@dataclass(frozen=True)
class Lifetime:
    """A file or directory the session saw created and deleted (see the
    module's definitions). ``obj``'s name is the guest's: untrusted text."""

    obj: Any
    born: float
    gone_by: float
    last: float  # its last request (``born`` without any)
    reads: int
    writes: int
    read_bytes: int
    write_bytes: int
    renamed_from: Any = None  # the name it was created under, if renamed since

    @property
    def lived(self) -> float:
        return max(0.0, self.gone_by - self.born)

    def as_dict(self) -> dict[str, Any]:
        o = self.obj
        return {"name": str(o), "type": o.type, "device": o.device, "path": o.path,
                "born": self.born, "gone_by": self.gone_by, "lived": self.lived,
                "last_access": self.last, "reads": self.reads, "writes": self.writes,
                "read_bytes": self.read_bytes, "write_bytes": self.write_bytes,
                "renamed_from": None if self.renamed_from is None else self.renamed_from.path}


class _Alive:
    __slots__ = ("born", "last", "last_start", "first_offset", "requests", "read_first", "reads", "writes",
                 "read_bytes", "write_bytes", "renamed_from")

    def __init__(self, t: float) -> None:
        self.born = t
        self.last = float("-inf")  # its last request's start
        self.last_start = None  # the start of the last request counted
        self.first_offset = -1
        self.requests = 0
        self.read_first = False
        self.reads = self.writes = self.read_bytes = self.write_bytes = 0
        self.renamed_from = None


class Lifetimes:
    """The objects created during the session and still there (followed),
    and those gone since (``gone``). See the module's definitions."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.following: dict[Any, _Alive] = {}
        self.gone: deque[Lifetime] = deque(maxlen=MAX_GONE)
        self.deaths = 0  # lifetimes ended (``gone`` keeps the last MAX_GONE)
        self.renames = 0
        self.untracked = 0  # created objects not followed (MAX_ALIVE reached)
        self.now: float | None = None  # the last request's time; None before any

    @property
    def alive(self) -> int:
        return len(self.following)

    def touch(self, obj: Any, t: float, is_read: bool, n: int, offset: int = -1) -> None:
        """A piece of a request named ``obj`` (``n`` bytes at disk ``offset``;
        the request is ``t``, its start: its pieces count as one request)."""
        if self.now is None or t > self.now:
            self.now = t
        a = self.following.get(obj)
        if a is None:
            return
        if not a.requests and is_read:
            a.read_first = True  # there before the session: not a creation
        if t < a.born:
            a.born = t  # a write named late, made before the map that added it
        one = a.last_start != t  # a new request (not the next piece of the last)
        if one:
            a.last_start = t
            a.requests += 1
        if t > a.last:
            a.last = t
        if is_read:
            a.reads += one
            a.read_bytes += n
        else:
            a.writes += one
            a.write_bytes += n
            if offset >= 0 and (a.first_offset < 0 or offset < a.first_offset):
                a.first_offset = offset

    def saw(self, t: float) -> None:
        """A request at ``t`` (named or not): the session's clock."""
        if self.now is None or t > self.now:
            self.now = t

    def map_changed(self, added: Iterable[Any], removed: Iterable[Any], new: Any = None) -> None:
        """A map swapped in: ``added`` the objects it has and the last had
        not, ``removed`` the converse; ``new`` (the map) finds renames."""
        t = self.now
        if t is None:
            return  # before any request: the map the session starts from
        alive = self.following
        fresh = [o for o in added if followed(o)]
        fresh_set = set(fresh)
        for obj in fresh:
            if obj in alive:
                continue
            if len(alive) >= MAX_ALIVE:
                self.untracked += 1
                continue
            alive[obj] = _Alive(t)
        for obj in removed:
            a = alive.pop(obj, None)
            if a is None:
                continue
            if a.read_first:
                continue
            heir = self._heir(a, new, fresh_set)
            if heir is not None:
                b = alive.get(heir)
                if b is not None and not b.read_first:
                    _inherit(b, a, obj)
                    self.renames += 1
                    continue
            self.deaths += 1
            self.gone.append(Lifetime(obj, a.born, t, max(a.last, a.born), a.reads, a.writes, a.read_bytes,
                                      a.write_bytes, a.renamed_from))

    @staticmethod
    def _heir(a: _Alive, new: Any, fresh: set) -> Any:
        if new is None or a.first_offset < 0:
            return None
        try:
            heir = new.most_specific(a.first_offset, 1)
        except (AttributeError, ValueError):
            return None
        return heir if heir in fresh else None

    def recent(self, since: float) -> list[Lifetime]:
        """The lifetimes that ended at or after ``since``, the last first."""
        out = []
        for life in reversed(self.gone):
            if life.gone_by < since:
                break
            out.append(life)
        return out


def _inherit(heir: _Alive, a: _Alive, old_name: Any) -> None:
    """``a`` renamed: its life goes on as ``heir`` (born when ``a`` was)."""
    heir.born = min(heir.born, a.born)
    heir.last = max(heir.last, a.last)
    heir.requests += a.requests
    heir.reads += a.reads
    heir.writes += a.writes
    heir.read_bytes += a.read_bytes
    heir.write_bytes += a.write_bytes
    if heir.first_offset < 0:
        heir.first_offset = a.first_offset
    heir.renamed_from = a.renamed_from or old_name


def map_diff(old: Any, new: Any) -> tuple[list, list]:
    """(added, removed): the guest's files and directories ``new`` has and
    ``old`` has not, and the converse (a replay, a reloaded map: a live
    remap says its own)."""
    if old is None or new is None:
        return [], []
    before = {o for o in old.object_table() if followed(o)}
    after = {o for o in new.object_table() if followed(o)}
    return list(after - before), list(before - after)
