"""The UI of ``diskwatch replay``: the live app, fed by a Player instead of a
server, with a time bar and the keys of a player (pause, seek, jump to the
next burst, faster, slower)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from textual.binding import Binding
from textual.widgets import Footer

from ..pipeline.session import Session
from .app import DiskwatchApp
from .messages import Seek
from .timebar import TimeBar, speed_text

#: seconds ] and [ move
SEEK_STEP = 10.0


class ReplayApp(DiskwatchApp):
    """``session.player`` is the diskwatch.recording.player.Player the session's pump is fed by."""

    BINDINGS = [
        Binding("space", "pause", "Play/Pause"),
        Binding("n", "next_burst", "Next burst"),
        Binding("left_square_bracket", f"seek({-SEEK_STEP})", f"-{SEEK_STEP:g}s"),
        Binding("right_square_bracket", f"seek({SEEK_STEP})", f"+{SEEK_STEP:g}s"),
        Binding("minus", "slower", "Slower"),
        Binding("plus,equals_sign", "faster", "Faster"),
        Binding("0", "restart", "Restart", show=False),
        Binding("f", "cycle_type", "Files", show=False),
        Binding("r", "cycle_op", "R/W", show=False),
        Binding("slash", "search", "Search", show=False),
    ]

    def __init__(self, session: Session, **kwargs: Any) -> None:
        self.player = session.player
        kwargs.setdefault("clock", self.player.now)
        super().__init__(session, **kwargs)
        self.generation = self.player.generation

    def compose(self) -> Iterable[Any]:
        for widget in super().compose():
            if isinstance(widget, Footer):
                yield TimeBar(self.player, id="timebar")
            yield widget

    def on_mount(self) -> None:
        self.timebar = self.query_one(TimeBar)
        self.timebar.show()

    def pump(self) -> None:
        if self.player.generation != self.generation:
            self._start_over()
        super().pump()
        if self._views_ready:
            self.timebar.show()

    def _start_over(self) -> None:
        """The player went back: count again from the start."""
        self.generation = self.player.generation
        self.clear_counts()
        self.stats.connections = self.stats.connections_total = 0

    def nothing_more(self) -> bool:
        player = self.player  # played to its end
        return player.finished and player.now() >= player.duration

    def seek_to(self, t: float) -> None:
        self.player.seek(t)
        self.pump()
        self._refresh_views(force=True)
        self.trace_view.follow = True
        self.trace_view.scroll_to_end()

    # -- actions --

    def action_pause(self) -> None:
        self.player.toggle_pause()
        self.timebar.show()

    def action_next_burst(self) -> None:
        t = self.player.next_burst()
        if t is None:
            self.notify("no burst of requests after this point")
            return
        self.seek_to(t)

    def action_seek(self, delta: float) -> None:
        self.seek_to(self.player.now() + delta)

    def action_restart(self) -> None:
        self.seek_to(0.0)

    def action_faster(self) -> None:
        self.player.faster()
        self.timebar.show()

    def action_slower(self) -> None:
        self.player.slower()
        self.timebar.show()
        self.notify(f"speed {speed_text(self.player.speed)}", timeout=1)

    def on_seek(self, message: Seek) -> None:
        self.seek_to(message.t)
