"""What a person looks for, as it happens: a line per scan going on (or just
ended), for the last file that lived and died in the last minute, and per
file churning now, below the main views and the tree.

The lines are made from the ``sinks.activity.Activity`` sink on the app's
timer (``activity_lines``) and held in the app's ``activity`` reactive; the
widget is bound to it and repaints when a line changed. Names are the
guest's: shown as text (``safe_text``), never markup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ..scans import Scan
from ..sinks.activity import Activity
from ..text import safe_text
from ..units import format_bytes_compact, format_duration_compact
from .styles import part_style
from .trace import fit_left

__all__ = ["ActivityLine", "ActivityPanel", "activity_lines", "lifetime_text", "ENDED_SHOWN"]

#: seconds an ended scan stays in the panel
ENDED_SHOWN = 60.0
#: lines at most (fewer on a short terminal)
MAX_LINES = 4
SHORT_LINES = 2


@dataclass(frozen=True)
class ActivityLine:
    """``kind``: "scan" (going on), "ended" (a scan that ended), "lived" (a
    file created and deleted during the session) or "churn";
    ``name``: untrusted (a directory or file of the guest's)."""

    kind: str
    name: str
    detail: str


def _scan_detail(scan: Scan) -> str:
    return (f"{scan.files:,} files · {scan.directories} dirs · {scan.rate:.0f} files/s · "
            f"{format_bytes_compact(scan.bytes)} · {scan.duration:.1f}s")


def scan_text(scan: Scan) -> str:
    """A scan in a sentence (the notifications)."""
    return f"{scan.device} {scan.directory}: {_scan_detail(scan)}"


def activity_lines(activity: Activity, now: float, n: int = MAX_LINES) -> tuple[ActivityLine, ...]:
    """Live scans (most files first), then the last scan ended in the last
    ENDED_SHOWN seconds, the last file gone in that time after a life in
    the session, then the files churning now; ``n`` at most."""
    lines = [ActivityLine("scan", f"{s.device} {s.directory}", _scan_detail(s))
             for s in sorted(activity.live_scans(), key=lambda s: -s.files)]
    ended = [s for s in activity.ended_scans() if now - s.end <= ENDED_SHOWN]
    if ended:
        s = ended[-1]
        lines.append(ActivityLine("ended", f"{s.device} {s.directory}", _scan_detail(s)))
    lived = activity.lives.recent(now - ENDED_SHOWN)
    if lived:
        life = lived[0]
        lines.append(ActivityLine("lived", life.obj.path or life.obj.device, lifetime_detail(life)))
    for c in activity.churning(now, n):
        obj = c.obj
        lines.append(ActivityLine("churn", obj.path or obj.device, churn_detail(c)))
    return tuple(lines[:n])


def churn_detail(c: Any) -> str:
    """``31 bursts · every 1.20s · 50/min · 124K``"""
    parts = [f"{c.bursts} bursts"]
    if c.period is not None:
        parts.append(f"every {format_duration_compact(c.period)}")
    if c.per_minute is not None:
        parts.append(f"{c.per_minute:.0f}/min")
    parts.append(format_bytes_compact(c.write_bytes))
    return " · ".join(parts)


def lifetime_detail(life: Any) -> str:
    """``≤2.10s · 1.9M written · 3 reads`` (≤: it was gone by the remap
    that found it gone)"""
    parts = [f"≤{format_duration_compact(life.lived)}"]
    if life.write_bytes:
        parts.append(f"{format_bytes_compact(life.write_bytes)} written")
    if life.reads:
        parts.append(f"{life.reads} reads")
    if life.renamed_from is not None:
        parts.append(f"made as {safe_text(life.renamed_from.path or '')}")
    return " · ".join(parts)


def lifetime_text(life: Any) -> str:
    """A lifetime in a sentence (the notifications)."""
    return f"{life.obj.device} {life.obj.path}: lived {lifetime_detail(life)}"


LABELS = {"scan": "scan", "ended": "scanned", "lived": "lived", "churn": "churn"}


class ActivityPanel(Widget):
    """The activity lines; hidden while there are none."""

    COMPONENT_CLASSES = {
        "activity--scan", "activity--ended", "activity--lived", "activity--churn",  # the kind
        "activity--name", "activity--detail",
    }

    DEFAULT_CSS = """
    ActivityPanel { height: auto; max-height: 4; display: none; }
    """

    lines: reactive[tuple[ActivityLine, ...]] = reactive((), layout=True)

    def watch_lines(self, lines: tuple[ActivityLine, ...]) -> None:
        self.display = bool(lines)

    def render(self) -> Text:
        def style(part: str) -> Any:
            return part_style(self, f"activity--{part}")

        width = max(20, self.content_region.width)
        n = SHORT_LINES if self.app.size.height < 30 else MAX_LINES
        text = Text(no_wrap=True, overflow="crop")
        name_style, detail_style = style("name"), style("detail")
        shown = self.lines[:n]
        for i, line in enumerate(shown):
            detail = line.detail
            name = safe_text(line.name)
            # the name first (up to 60% of the line), then what fits of the detail
            room = max(min(len(name), width * 3 // 5), width - 8 - 2 - len(detail))
            name = fit_left(name, room)
            left = width - 8 - len(name) - 2  # what is left for the detail
            if len(detail) > left:
                detail = detail[:max(0, left - 1)] + "…"
            text.append(f"{LABELS[line.kind]:<7} ", style=style(line.kind))
            text.append(f"{name}  ", style=name_style)
            text.append(detail, style=detail_style)
            if i < len(shown) - 1:
                text.append("\n")
        return text
