"""Errors a person can act on: the CLI prints them as one line, no traceback;
and, undoing what was made, the first error is the one told."""

from __future__ import annotations

from collections.abc import Callable


class DiskwatchError(Exception):
    """Bad input or a missing piece: the message says what and what to do."""


def closer(close: Callable[[], None]):
    """``close`` as an ``ExitStack.push`` callback: called on the way out, and
    when the way out is an error, its own errors are swallowed (the first
    error is the one to report)."""
    def close_quietly_if_failing(exc_type, exc, tb) -> None:
        if exc_type is None:
            close()
            return
        try:
            close()
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass
    return close_quietly_if_failing
