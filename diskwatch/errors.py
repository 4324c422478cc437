"""Errors a person can act on: the CLI prints them as one line, no traceback."""


class DiskwatchError(Exception):
    """Bad input or a missing piece: the message says what and what to do."""
