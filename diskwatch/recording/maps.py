"""Which block map names which request of a recording, in a replay or a
report.

Maps in a replay or report (``maps_for``): the first map is the header's
(``choose_map``: given with ``--bmap``, or the recorded file if it is still
there unchanged); the recorded BMAP frames then take over at their request,
so a replay names each request with the map the live session named it
with. ``--bmap MAP`` overrides them all: the given map names every request
(said in one line). Memory: a recorder holds a swapped-in map only until
its next flush and writes it compressed as it formats it (only the
compressed text is held); a reader keeps frame offsets and decodes one map
at a time, as a stream, when its first request comes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .format import RecordedMap, map_identity
from .reader import Recording


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




class MapSchedule:
    """Which block map names which request of a recording: ``first`` up to
    the first recorded map's request, each recorded map from its own on
    (the last of several at one request wins, as live). Holds ``first`` and
    the map last asked for; a recorded one is decoded again when asked for
    after another (a replay seeking back)."""

    def __init__(self, first: Any, recorded: Sequence[RecordedMap] = (),
                 load: Callable[[RecordedMap], Any] | None = None,
                 journal: Sequence[RecordedMap] = (), disk: Sequence[RecordedMap] = ()) -> None:
        self.first = first
        self.recorded = list(recorded)
        #: the other disks' maps their live remaps made (DMAP frames): none
        #: when a --bmap names every request instead
        self.disk = list(disk)
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
    from ..bmap.index import BlockMap
    recorded = recording.maps
    journal = [] if given else recording.journal_maps
    disk = [] if given else getattr(recording, "disk_maps", [])
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
                       journal, disk)
