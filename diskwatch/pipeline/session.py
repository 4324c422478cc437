"""What a running diskwatch is, and the one loop that feeds its sinks.

    server thread --batches--> RequestBuffer (bounded, counts drops)
                  --events---> deque (bounded)
                                  |
    Pump.run_once(now), ~10 Hz, in ONE consumer thread (the headless loop
    or the UI's timer): drain both, look every request up in the block map
    ONCE, then for each sink: on_event(...), feed(batch, pieces), tick(now)

A replay (recording/player.py's Player) drives the same ``Pump`` from a recording
instead of a live server, so sinks never know which it is.

``Session`` is what sinks and the UI read (size, description, command, map,
the pump) and the few controls they call (stop the command, shut down).
The runner (diskwatch/runner.py) builds it; nothing here imports the server.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Protocol

from ..events import Bus, Dropped, Request, RequestBuffer
from ..late import LateNamer
from .sink import Piece, Pieces, Sink, SinkBase  # noqa: F401 - the pump's vocabulary

_OFFSET, _LENGTH = itemgetter(3), itemgetter(4)


class LiveFeed:
    """What a live server hands the pump: its request batches, through a
    bounded ``RequestBuffer`` (``limit`` requests, about 240 bytes each;
    more are dropped and counted), and its low-rate events, through a deque
    of at most 10 000 (connections, command output, map progress)."""

    def __init__(self, bus: Bus, limit: int = 500_000) -> None:
        self.bus = bus
        self.buffer = RequestBuffer(limit)
        self.events: deque[object] = deque(maxlen=10_000)
        bus.on_requests(self.buffer)
        bus.on_event(self.events.append)

    def take(self, now: float) -> tuple[list[object], list[Request], int]:
        """Events, requests and the count of dropped requests since the last call."""
        events = []
        pop = self.events.popleft
        while self.events:
            events.append(pop())
        batch, dropped = self.buffer.drain()
        return events, batch, dropped

    @property
    def total_dropped(self) -> int:
        return self.buffer.total_dropped

    def close(self) -> None:
        self.bus.unsubscribe(self.buffer)
        self.bus.unsubscribe(self.events.append)


class Feed(Protocol):
    """Where the pump's requests come from: a live server or a recording."""

    def take(self, now: float) -> tuple[list[object], list[Request], int]: ...

    def close(self) -> None: ...


class Pump:
    """The one drain loop: ``run_once`` drains the feed, looks each request
    up once in the current block map, and hands the result to every sink."""

    def __init__(self, feed: Feed, blockmap: Callable[[], Any] = lambda: None,
                 look_up: Callable[[Sequence[Request]], Pieces | None] | None = None,
                 maps: Callable[[], dict] | None = None) -> None:
        self.feed = feed
        self.blockmap = blockmap  # called each round: a map may arrive mid-session
        #: a session of several disks: each export's map, the first's
        #: included (called each round); None for one disk
        self.maps = maps
        #: a feed that knows which map named each request (a replay of a
        #: remapped session: recording/player.py) looks its batches up itself
        self._look_up = look_up
        self.sinks: list[Sink] = []
        self.requests = 0
        self.dropped = 0
        self.closed = False

    def add(self, sink: Sink) -> Sink:
        self.sinks.append(sink)
        return sink

    def deliver(self, event: object) -> None:
        """Hand ``event`` to every sink now, in the pump's thread (a map swap's
        ``LateNamed``: before the requests the new map names)."""
        for s in self.sinks:
            s.on_event(event)

    def remove(self, sink: Sink) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)

    def run_once(self, now: float) -> int:
        """One round; returns how many requests it fed."""
        events, batch, dropped = self.feed.take(now)
        sinks = self.sinks
        if dropped:
            self.dropped += dropped
            events.append(Dropped(dropped))
        for event in events:
            for s in sinks:
                s.on_event(event)
        if batch:
            self.requests += len(batch)
            pieces = self.look_up(batch)
            for s in sinks:
                s.feed(batch, pieces)
        for s in sinks:
            s.tick(now)
        return len(batch)

    def look_up(self, batch: Sequence[Request]) -> Pieces | None:
        if self._look_up is not None:
            return self._look_up(batch)
        maps = self.maps() if self.maps is not None else None
        if maps:
            return self._look_up_disks(batch, maps)
        bm = self.blockmap()
        if bm is None:
            return None
        # C-level map: lookup gives [] for a request without a length
        return list(map(bm.lookup, map(_OFFSET, batch), map(_LENGTH, batch)))

    @staticmethod
    def _look_up_disks(batch: Sequence[Request], maps: dict) -> Pieces | None:
        """Each request in its own disk's map (by its export); a disk without
        a map names nothing."""
        if not any(m is not None for m in maps.values()):
            return None
        lookups = {name: m.lookup for name, m in maps.items() if m is not None}
        out = []
        for r in batch:
            lookup = lookups.get(r[1])
            out.append(lookup(r[3], r[4]) if lookup is not None else [])
        return out

    def close(self) -> None:
        """The last round (everything still buffered), then every sink's close.
        The first sink error is raised once all were closed."""
        if self.closed:
            return
        self.closed = True
        first: BaseException | None = None
        try:
            self.run_once(float("inf"))
        except Exception as e:  # noqa: BLE001 - close the sinks first, then raise
            first = e
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # noqa: BLE001
                first = first or e
        self.feed.close()
        if first is not None:
            raise first


@dataclass
class Session:
    bus: Bus
    size: int  # bytes of the (first) export
    description: str  # e.g. "file win7.img (read-only, snapshot)"
    uri: str = ""  # the NBD URI clients use
    command: str | None = None  # the captive --run command, if any
    blockmap: object | None = None  # a diskwatch.bmap.index.BlockMap once one is loaded
    started: float = field(default_factory=time.monotonic)
    exit_status: int | None = None  # the captive command's, once it exited
    #: diskwatch attach: ``command`` describes a running guest diskwatch moved
    #: onto itself; quitting puts it back (no question: nothing is stopped)
    attached: bool = False
    interrupted: bool = False  # a signal (SIGINT/SIGTERM/SIGHUP) ended the session
    #: stop the captive command (SIGTERM, then SIGKILL after a grace period)
    stop_command: Callable[[], None] = lambda: None
    #: ask everything to shut down (server, command); the UI calls it on quit
    shutdown: Callable[[], None] = lambda: None
    #: the drain loop; by default fed live from ``bus`` (subscribed at once,
    #: so requests made before a consumer starts are not lost)
    pump: Pump | None = None
    #: a replay's controls (diskwatch.recording.player.Player), None when live
    player: Any = None
    #: live remapping (diskwatch.remap.Remapper), None when off or replaying
    remapper: Any = None
    #: the other disks' remappers, in disk order (several disks)
    disk_remappers: list = field(default_factory=list)
    #: the writes no map named yet (diskwatch.late), a sink of the pump
    late: LateNamer = field(init=False)
    #: the first disk's export name; with several disks, the others' maps
    #: by export name (``blockmap`` stays the first disk's: the heatmap's,
    #: the remapper's, late naming's)
    export: str = ""
    maps: dict = field(default_factory=dict)
    #: every disk as (export, size, device), in order (one disk: empty)
    disks: list = field(default_factory=list)
    #: the other disks' late naming, by export (the first's is ``late``)
    lates: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pump is None:
            self.pump = Pump(LiveFeed(self.bus), lambda: self.blockmap, maps=self.all_maps)
        self.late = self.pump.add(LateNamer())

    def all_maps(self) -> dict | None:
        """Each disk's map by export name, or None for a one-disk session."""
        if len(self.disks) < 2:
            return None
        return {self.export: self.blockmap, **self.maps}

    def devices(self) -> dict[str, str] | None:
        """Each disk's device (/dev/sdb) by export name, which the traces
        say, or None for a one-disk session."""
        if len(self.disks) < 2:
            return None
        return {export: device for export, _, device in self.disks}

    def set_disks(self, disks: list, maps: dict | None = None) -> None:
        """The VM's disks, (export, size, device) in order, and the other
        disks' maps (by export). With several, the first disk's own sinks
        (late naming, the heatmap, the remapper) see its requests only."""
        self.disks = list(disks)
        self.export = self.disks[0][0] if self.disks else ""
        self.maps = dict(maps or {})
        self.late.export = self.export if len(self.disks) > 1 else None
        for name, _, _ in self.disks[1:]:
            if name not in self.lates:
                late = self.lates[name] = self.pump.add(LateNamer())
                late.export = name

    def swap_disk_map(self, export: str, blockmap: Any, why: str = "",
                      journal_map: Any = None, changes: tuple | None = None) -> None:
        """``swap_map`` for any disk: another disk's map replaces its own
        (its late naming hands on the writes it names, before the requests
        it names); the first disk's is ``swap_map``."""
        if export == self.export or export not in self.lates:
            self.swap_map(blockmap, why, journal_map, changes)
            return
        self._map_changed(self.maps.get(export), blockmap, changes)
        self.maps[export] = blockmap
        late = self.lates[export]
        named = late.name(blockmap, why)
        if named is not None:
            self.pump.deliver(named)
        carried = late.carried(journal_map)
        if carried is not None:
            self.pump.deliver(carried)

    def swap_map(self, blockmap: Any, why: str = "", journal_map: Any = None,
                 changes: tuple | None = None) -> None:
        """The one place a new block map replaces the one in use (a live
        remap, SIGHUP's reload, a replay reaching a map the live session
        swapped in), in the pump's thread between two rounds: every sink
        that holds a map gets it, and the writes it names that no map named
        before are handed to every sink (``late.py``), before the requests
        it names. The runner adds what only a live session has (the
        recording keeps the map, the metrics forget old names).
        ``changes``: (added, removed), the objects new and gone (a live
        remap's; computed here when not given), for the sinks that follow
        lifetimes (``map_changed``), told first."""
        self._map_changed(self.blockmap, blockmap, changes)
        self.blockmap = blockmap
        for sink in self.pump.sinks:
            if hasattr(sink, "blockmap"):
                sink.blockmap = blockmap
        named = self.late.name(blockmap, why)
        if named is not None:
            self.pump.deliver(named)
        self.carry_journal(journal_map)

    def _map_changed(self, old: Any, new: Any, changes: tuple | None) -> None:
        told = [s for s in self.pump.sinks if hasattr(s, "map_changed")]
        if not told or old is new:
            return
        if changes is None:
            from ..lifetimes import map_diff
            changes = map_diff(old, new)
        for sink in told:
            sink.map_changed(changes[0], changes[1], new)

    def carry_journal(self, journal_map: Any) -> None:
        """The journal writes ``journal_map`` (a remap's) attributes, handed
        to every sink; also when the remap left the block map as it was."""
        carried = self.late.carried(journal_map)
        if carried is not None:
            self.pump.deliver(carried)

    @property
    def command_running(self) -> bool:
        return self.command is not None and self.exit_status is None
