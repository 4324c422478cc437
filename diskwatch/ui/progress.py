"""Block-map generation progress: a bar, the object being examined, counts and
rate, from ``Progress`` events; once done, the one-line summary."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import var
from textual.widgets import ProgressBar, Static

from ..events import Progress
from ..text import safe_text
from .styles import part_style


class BmapProgress(Vertical):
    """Hidden until the first ``Progress`` event arrives (``progress``, which
    the app binds)."""

    DEFAULT_CSS = """
    BmapProgress { height: auto; display: none; }
    BmapProgress.-active { display: block; }
    BmapProgress ProgressBar { width: 1fr; }
    BmapProgress ProgressBar Bar { width: 1fr; }
    BmapProgress #bmap-detail { height: auto; text-wrap: nowrap; }
    """

    COMPONENT_CLASSES = {
        "bmap-progress--ready",  # the summary, once done
        "bmap-progress--count",  # objects done (of how many)
        "bmap-progress--muted",  # the rate and the time
        "bmap-progress--current",  # the object being examined
    }

    progress: var[Progress | None] = var(None)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bar = ProgressBar(total=None, show_eta=False, id="bmap-bar")
        self.detail = Static("", id="bmap-detail")

    def compose(self) -> ComposeResult:
        yield self.bar
        yield self.detail

    def on_mount(self) -> None:
        self.border_title = "block map"

    def watch_progress(self, p: Progress | None) -> None:
        if p is None:
            return
        self.add_class("-active")
        bar, detail = self.bar, self.detail
        if p.phase == "done":
            bar.display = False
            self.border_title = "block map ready"
            detail.update(Text(safe_text(p.summary or f"{p.done} objects in {p.elapsed:.1f}s"),
                               style=part_style(self, "bmap-progress--ready")))
            return
        bar.display = True
        self.border_title = Text(f"block map: {safe_text(p.phase)}")  # not markup
        if p.total:
            bar.update(total=p.total, progress=p.done)
        else:
            bar.update(total=None)
        line = Text()
        line.append(f"{p.done}" + (f"/{p.total}" if p.total else ""),
                    style=part_style(self, "bmap-progress--count"))
        line.append(f" objects  {p.rate:.0f}/s  {p.elapsed:.0f}s\n",
                    style=part_style(self, "bmap-progress--muted"))
        width = max(20, self.content_region.width)
        current = safe_text(p.current or "")  # a path in the guest
        if len(current) > width:  # the end of a path says most
            current = "…" + current[len(current) - width + 1:]
        line.append(current, style=part_style(self, "bmap-progress--current"))
        detail.update(line)

    def on_resize(self) -> None:
        if self.progress is not None and self.progress.phase != "done":
            self.watch_progress(self.progress)
