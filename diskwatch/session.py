"""What a running diskwatch is, as the sinks and the UI see it.

The CLI builds a ``Session`` (source, server, captive command, block map) and
hands it to a sink (headless trace) or to the Textual app. Sinks and the UI
only read it and call its few control methods; they never import the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .events import Bus


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
    interrupted: bool = False  # a signal (SIGINT/SIGTERM/SIGHUP) ended the session
    #: stop the captive command (SIGTERM, then SIGKILL after a grace period)
    stop_command: Callable[[], None] = lambda: None
    #: ask everything to shut down (server, command); the UI calls it on quit
    shutdown: Callable[[], None] = lambda: None

    @property
    def command_running(self) -> bool:
        return self.command is not None and self.exit_status is None
