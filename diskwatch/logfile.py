"""A text file that can be reopened under the same name (SIGHUP, logrotate).

logrotate renames ``trace.log`` to ``trace.log.1`` and sends SIGHUP; a
process that keeps its file object keeps writing into ``trace.log.1``.
``reopen()`` closes the old file and opens the name again (appending, so a
file someone made there meanwhile is not clobbered). Writes and reopen are
called from one thread (the pump's), so no lock is needed.
"""

from __future__ import annotations

from typing import IO

from .files import open_output


class ReopenableFile:
    """Enough of a text file for the trace and the recorder: write, flush, close."""

    def __init__(self, path: str, buffering: int = 1 << 16) -> None:
        self.path = path
        self.buffering = buffering
        # never through a symbolic link someone planted (files.py)
        self._file: IO[str] = open_output(path, buffering=buffering)

    def write(self, text: str) -> int:
        return self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        new = open_output(self.path, append=True, buffering=self.buffering)
        old, self._file = self._file, new
        old.close()  # flushes what was written before the signal into the old file

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def isatty(self) -> bool:
        return False

    def __enter__(self) -> ReopenableFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
