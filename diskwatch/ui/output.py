"""The captive command's stdout and stderr, diskwatch's own messages, and the
command's exit status: kept in a panel so they never scribble over the UI."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import RichLog

from ..events import Message
from ..text import TerminalText, safe_text

STYLES = {"stdout": "#d0d0d0", "stderr": "#ffaf5f", "diskwatch": "#5fafff"}


class CommandOutput(RichLog):
    DEFAULT_CSS = """
    CommandOutput { height: 8; overflow-x: hidden; }
    """

    def __init__(self, command: str | None = None, **kwargs: Any) -> None:
        super().__init__(max_lines=2000, wrap=True, markup=False, highlight=False,
                         min_width=20, **kwargs)
        self.command = command
        self.exit_status: int | None = None
        self.lines_seen = 0
        # the command's output is a terminal's: colours kept, the rest made text
        self._decoders = {"stdout": TerminalText(), "stderr": TerminalText()}

    def on_mount(self) -> None:
        # A Text, not a str: a border title is parsed as markup ("[/]" in a
        # command crashed the app; "[@click=...]" made an action of it).
        self.border_title = Text(f"$ {safe_text(self.command)}") if self.command else "messages"
        self.border_subtitle = "running" if self.command else ""

    def add_message(self, m: Message) -> None:
        self.lines_seen += 1
        if m.source == "exit":
            self.exit_status = m.status
            ok = m.status == 0
            self.border_subtitle = f"exit {m.status}"
            self.write(Text(safe_text(m.text or f"command exited with status {m.status}"),
                            style="bold #5fd787" if ok else "bold #ff5f5f"))
            return
        style = STYLES.get(m.source, "#d0d0d0")
        if m.level == "error":
            style = "bold #ff5f5f"
        elif m.level == "warning" and m.source == "diskwatch":
            style = "#ffd75f"
        decoder = self._decoders.get(m.source)
        if decoder is not None:
            text = decoder.line(m.text.rstrip("\n"), style)
            if m.source == "stderr":
                text = Text("stderr: ", style=style) + text
        else:  # diskwatch's own messages (they may quote names and URLs)
            prefix = "" if m.source == "diskwatch" else f"{safe_text(m.source)}: "
            text = Text(prefix + safe_text(m.text.rstrip("\n")), style=style)
        self.write(text)
