"""Structured logging to the systemd journal, by its native protocol.

Under systemd, stderr is a stream into the journal and systemd says so in
``JOURNAL_STREAM`` (``DEV:INODE`` of that stream). A line on it loses its
structure; the native protocol keeps it: one datagram per entry to
``/run/systemd/journal/socket``, each field ``NAME=value\\n``, or, for a
value holding a newline, ``NAME\\n`` + its length (64-bit little endian) +
the value + ``\\n`` (systemd.journal-fields(7), sd_journal_sendv(3)). That is
a few lines of code, so diskwatch writes it itself rather than depend on
python3-systemd (Debian's, not on PyPI, and only in Debian's interpreter).

Entries carry MESSAGE, PRIORITY, SYSLOG_IDENTIFIER=diskwatch, CODE_FILE,
CODE_LINE, CODE_FUNC, and any ``DISKWATCH_*`` fields a caller passes as
``log.info(..., extra={"journal": {"DISKWATCH_URL": ...}})``, so that
``journalctl -u diskwatch DISKWATCH_EVENT=metrics`` finds them.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys

#: where journald listens (``DISKWATCH_JOURNAL_SOCKET`` overrides it, for tests)
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: an entry is cut to this (the datagram limit is ~200 KiB; larger needs memfds)
MAX_ENTRY = 48 * 1024

_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def stderr_is_journal(stream=None) -> bool:
    """True when systemd connected our stderr to the journal (JOURNAL_STREAM
    names the very stream; a child with redirected stderr inherits the
    variable but not the stream)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


def encode_entry(fields: dict[str, object]) -> bytes:
    """One journal entry in the native protocol."""
    out = bytearray()
    for name, value in fields.items():
        if not _FIELD_NAME.fullmatch(name):
            continue  # the journal drops invalid names; do not send them
        data = str(value).encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out[:MAX_ENTRY])


class JournalHandler(logging.Handler):
    """A logging handler sending each record as one journal entry."""

    def __init__(self, path: str | None = None, identifier: str = "diskwatch") -> None:
        super().__init__()
        self.path = path or os.environ.get("DISKWATCH_JOURNAL_SOCKET", JOURNAL_SOCKET)
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            fields: dict[str, object] = {
                "MESSAGE": message,
                "PRIORITY": _PRIORITY.get(record.levelno, 6),
                "SYSLOG_IDENTIFIER": self.identifier,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,
                "CODE_FUNC": record.funcName,
                "DISKWATCH_LOGGER": record.name,
            }
            fields.update(getattr(record, "journal", None) or {})
            self.sock.sendto(encode_entry(fields), self.path)
        except Exception:  # noqa: BLE001 - logging must never take the server down
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


_journal: JournalHandler | None = None
_log = logging.getLogger("diskwatch")


def use_journal(handler: JournalHandler | None) -> None:
    """Send ``notice``s to the journal (the CLI does when stderr is the journal)."""
    global _journal
    _journal = handler


def notice(text: str, priority: str = "info", **fields: object) -> None:
    """A line for the operator: on stderr as ``diskwatch: TEXT``, or, under
    systemd, one journal entry with ``fields`` (``DISKWATCH_*``) beside it."""
    if _journal is not None:
        level = logging.WARNING if priority == "warning" else logging.INFO
        _log.log(level, "%s", text, extra={"journal": fields})
        return
    from .text import safe_text
    print(f"diskwatch: {safe_text(text)}", file=sys.stderr, flush=True)
