"""The replay's time bar: where the replay is, how fast it goes, and where
the bursts are (requests per slice of the recording, as a sparkline).
A click on the bar seeks there."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import events
from textual.widgets import Static

from .messages import Seek
from .styles import part_styles

BLOCKS = "▁▂▃▄▅▆▇█"  # the first: no request in that slice (the track)


def clock_text(seconds: float) -> str:
    m, s = divmod(max(0.0, seconds), 60)
    return f"{int(m):02d}:{s:04.1f}"


def speed_text(speed: float) -> str:
    return f"{speed:g}x" if speed >= 1 else f"1/{round(1 / speed)}x"


class TimeBar(Static):
    """``player``: a diskwatch.recording.player.Player (read only; seeks go to the app
    as a ``messages.Seek``)."""

    DEFAULT_CSS = """
    TimeBar { height: 1; }
    """

    #: colours in app.tcss
    COMPONENT_CLASSES = {
        "time-bar--label",  # state, speed, time
        "time-bar--now",  # the slice being played
        "time-bar--quiet",  # a slice without requests
        "time-bar--played", "time-bar--ahead",  # slices with requests
    }

    def __init__(self, player: Any, **kwargs: Any) -> None:
        super().__init__("", **kwargs)
        self.player = player
        self._density: tuple[int, list[int]] = (0, [])
        self._label_width = 0
        self._shown: tuple = ()

    def _bins(self, width: int) -> list[int]:
        if self._density[0] != width:
            self._density = (width, self.player.density(width))
        return self._density[1]

    def show(self) -> None:
        p = self.player
        now = p.now()
        state = "||" if p.paused else ("■ " if p.finished and now >= p.duration else "▶ ")
        label = f" {state} {speed_text(p.speed):>5} {clock_text(now)} / {clock_text(p.duration)} "
        width = max(0, self.size.width - len(label) - 1)
        self._label_width = len(label)
        styles = part_styles(self, "time-bar--", ("label", "now", "quiet", "played", "ahead"))
        text = Text(no_wrap=True, overflow="crop")
        text.append(label, style=styles["label"])
        bins = self._bins(width)
        top = max(bins, default=0) or 1
        at = min(width - 1, int(now / p.duration * width)) if p.duration > 0 else 0
        for i, n in enumerate(bins):
            level = 0 if not n else 1 + (n * (len(BLOCKS) - 2)) // top
            if i == at:
                style = styles["now"]
            elif not n:
                style = styles["quiet"]
            else:
                style = styles["played" if i < at else "ahead"]
            text.append(BLOCKS[level], style=style)
        key = (text.plain, at, state)
        if key != self._shown:
            self._shown = key
            self.update(text, layout=False)

    def on_click(self, event: events.Click) -> None:
        width = self.size.width - self._label_width - 1
        x = event.x - self._label_width
        if width > 0 and 0 <= x < width:
            self.post_message(Seek(x / width * self.player.duration))
