"""Modal screens: confirm quitting while the command runs, and help."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmQuit(ModalScreen[bool]):
    """Quitting while the captive command runs stops it: ask first."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes, stop it"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog"):
            yield Static(Text.assemble(
                ("The command is still running:\n", "bold"),
                (f"  {self.command}\n\n", "#d7af5f"),
                "Quit, stopping it (SIGTERM, then SIGKILL)?",
            ))
            with Horizontal(id="confirm-buttons"):
                yield Button("Stop and quit (y)", variant="error", id="yes")
                yield Button("Stay (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


HELP = """\
[b]diskwatch[/b] is serving a disk image over NBD; every request the client
makes shows up here, named through the block map when there is one.

[b]trace[/b]  newest at the bottom: seconds since start, operation, object
       ([#5fafff]p[/] partition, [#5fd7d7]l[/] LV, [#d7af5f]d[/] directory, [#e4e4e4]f[/] file, [#808080]v[/] device;
       [i]@ offsets[/i] where no object covers the bytes), bytes, [#ffd75f]×N[/]
       when the same object is hit again and again. Scroll up to stop
       following; End follows again.
[b]disk[/b]   the whole disk, cells in disk order, left to right, top to bottom;
       [#50eb6e]green[/] = reads, [#ff4632]red[/] = writes, fading over seconds;
       tinted by partition, lighter where ever touched. Hover or use the
       arrow keys to see a cell's byte range and objects. With several
       disks, [b]k[/b] shows the next one (its own heat and partitions).
[b]rates[/b]  ops/s and bytes/s over the last 2 s, latency median and p99,
       connections, totals, sparklines of the last minute.
[b]top[/b]    the objects read (or written, or slowest: [b]s[/b]) most; by writes,
       [b]every[/b]: how often a churning file is written again; [b]p50[/b]/[b]p99[/b]: the
       latency of each one's requests, where there is room.
[b]scan[/b] / [b]churn[/b] / [b]lived[/b]  under the views, as they happen: a sweep of
       reads over many files, directory by directory (files so far,
       files/s), files written in many separate bursts (bursts, period,
       rate), and files made and deleted while watched (how long they lived).
[b]tree[/b]   [b]d[/b]: directories and files per device, with what their whole
       subtree read and wrote and its recent rate; [b]s[/b] sorts, [b]b[/b] opens the
       busiest path, [b]d[/b] or escape comes back.

[b]keys[/b]  space pause · f files only / hide dirs · r reads / writes only
      / search paths · d tree · c clear · s sort top · h heatmap · t top
      o output · a rates · p save a picture (SVG) · k next disk
      m remap the disk as it is now · ctrl+p command palette · q quit
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-dialog"):  # taller than 24 rows: it scrolls there
            yield Static(HELP)
            yield Static("[#8a8a8a]escape closes[/]")

    def on_click(self) -> None:
        self.dismiss()
