"""The captive command's stdout and stderr, diskwatch's own messages, and the
command's exit status: kept in a panel so they never scribble over the UI."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import RichLog

from ..events import Message
from ..text import TerminalText, safe_text
from .styles import part_style


class CommandOutput(RichLog):
    """Colours: the component classes, set in app.tcss."""

    COMPONENT_CLASSES = {
        "command-output--stdout",  # and any other source
        "command-output--stderr",
        "command-output--diskwatch",  # diskwatch's own messages
        "command-output--warning",  # diskwatch's warnings
        "command-output--error",  # errors, whoever said them
        "command-output--exit-ok", "command-output--exit-failed",  # the exit status
    }
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

        def style(part: str) -> Any:
            return part_style(self, f"command-output--{part}")

        if m.source == "exit":
            self.exit_status = m.status
            ok = m.status == 0
            self.border_subtitle = f"exit {m.status}"
            self.write(Text(safe_text(m.text or f"command exited with status {m.status}"),
                            style=style("exit-ok" if ok else "exit-failed")))
            return
        if m.level == "error":
            line_style = style("error")
        elif m.level == "warning" and m.source == "diskwatch":
            line_style = style("warning")
        else:
            line_style = style(m.source if m.source in ("stderr", "diskwatch") else "stdout")
        decoder = self._decoders.get(m.source)
        if decoder is not None:
            text = decoder.line(m.text.rstrip("\n"), line_style)
            if m.source == "stderr":
                text = Text("stderr: ", style=line_style) + text
        else:  # diskwatch's own messages (they may quote names and URLs)
            prefix = "" if m.source == "diskwatch" else f"{safe_text(m.source)}: "
            text = Text(prefix + safe_text(m.text.rstrip("\n")), style=line_style)
        self.write(text)
