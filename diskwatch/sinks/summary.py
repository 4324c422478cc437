"""The exit summary of --headless (a live session or a replay): totals,
latency, the most read and written objects, the journal writes each file
cost, the files made and deleted while watched. A ``Sink`` of the pump; the
UI shows the same ``Stats`` and lifetimes live."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

from ..events import Request
from ..pipeline.sink import Pieces
from ..text import safe_text
from ..units import count, format_bytes, format_duration_compact
from ..wire import COMMAND_NAMES
from .lifetimes import LifetimeFollower
from .stats import Stats

#: lifetimes the summary names, at most (the report lists them all)
LIVES_SAID = 5


class Summary:
    """Headless: the totals printed at exit (the UI shows them live)."""

    def __init__(self, size: int) -> None:
        self.stats = Stats(size, heat_cells=1, object_latency=False)
        self.named = False
        self.lifetimes = LifetimeFollower()

    def feed(self, batch: Sequence[Request], pieces: Pieces | None) -> None:
        self.stats.add(batch, pieces=pieces)
        self.lifetimes.feed(batch, pieces)
        if pieces is not None:
            self.named = True

    def on_event(self, event: object) -> None:
        self.stats.on_event(event)
        self.lifetimes.on_event(event)

    def map_changed(self, added, removed, new) -> None:
        self.lifetimes.map_changed(added, removed, new)

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass

    def print(self, out: IO[str]) -> None:
        st = self.stats
        # the trace's units (2.5 MiB), not the UI's narrow columns' (2.5M)
        parts = [f"{st.ops[i]} {name} ({format_bytes(st.bytes[i])})" if name in
                 ("read", "write", "trim", "zero") else f"{st.ops[i]} {name}"
                 for i, name in enumerate(COMMAND_NAMES) if st.ops[i]]
        conns = st.connections_total
        if not st.requests:
            print("diskwatch: no client connected" if not conns else
                  f"diskwatch: no requests on {count(conns, 'connection')}", file=out)
            return
        print(f"diskwatch: {count(st.requests, 'request')} on {count(conns, 'connection')}"
              + (": " + ", ".join(parts) if parts else "")
              + (f"; {st.errors} failed" if st.errors else ""), file=out)
        if st.latency.total:  # not for disconnects alone: they have no reply
            print(f"diskwatch: latency median {format_duration_compact(st.latency.median)}, "
                  f"p99 {format_duration_compact(st.latency.p99)}", file=out)
        if self.named:
            # The guest's files and directories: what a person looks for (a
            # partition's own count is its free space and metadata). The
            # filesystem's structures a metadata map names (/$Journal...) are
            # written because files are: told apart, as the report does.
            def guests(obj) -> bool:
                return obj.type in ("f", "d") and not obj.is_structure

            def filesystems(obj) -> bool:
                return obj.type == "f" and obj.is_structure
            for by in ("reads", "writes"):
                for label, keep in (("", guests), (" (the filesystem's own)", filesystems)):
                    top = st.top(by, 5, keep=keep)
                    if top:
                        print(f"diskwatch: most {by}{label}: " + "; ".join(
                            f"{safe_text(str(obj))} x{getattr(c, by)}" for obj, c in top),
                            file=out)
            lives = self.lifetimes.lives
            if lives.deaths:
                gone = list(lives.gone)[-LIVES_SAID:]
                more = lives.deaths - len(gone)
                print(f"diskwatch: made and deleted while watched ({lives.deaths}): " + "; ".join(
                    f"{safe_text(str(life.obj))} lived <={format_duration_compact(life.lived)}"
                    + (f", {format_bytes(life.write_bytes)} written" if life.write_bytes else "")
                    for life in gone) + (f"; and {more} more" if more > 0 else ""), file=out)
            journaled = sorted(((c.journal_bytes, obj) for obj, c in st.objects.items()
                                if obj is not None and c.journal_bytes and guests(obj)),
                               key=lambda jc: (-jc[0], str(jc[1])))[:5]
            if journaled:
                # what no other tool shows: the journal writes each file cost
                print("diskwatch: most journal writes carried for: " + "; ".join(
                    f"{safe_text(str(obj))} {format_bytes(n)}" for n, obj in journaled),
                    file=out)
