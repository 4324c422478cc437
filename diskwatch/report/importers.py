"""Other servers' logs as recordings: nbd-server, nbdkit, diskwatch's JSON lines.

**nbd-server's transaction log** (``transactionlog = FILE`` in an export's
section; ``nbd-trdump`` prints it) is the wire headers, back to back, in
network byte order, with no times::

    request  magic 0x25609513  u32 type (flags << 16 | command)  u64 cookie  u64 offset  u32 length
    reply    magic 0x67446698  u32 error                          u64 cookie
    option   magic 0x25609514  u32 type  u64 cookie  u64 from (0x4A93BA39A54F31B6)  u32 value

A request is followed by its data when it is a write and data logging is on
(option type 1, ``datalog = true``). Replies are matched to requests by
cookie for the error. With no times in the file, a request's time is its
position (request 0, 1, 2...) and the recording says so (``timed=False``).

**nbdkit's log filter** (``nbdkit --filter=log PLUGIN logfile=FILE``) writes
a line when a call enters and one when it leaves::

    2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...
    2020-08-06 02:07:23.080927 connection=1 ...Read id=1 return=0
    2020-08-06 02:07:23.214417 connection=1 ...Write id=1 return=-1 error=ENOSPC

A request's time is its entry, its duration the time to its exit. Flags
come from the logged booleans (``fua``, Zero's ``trim``/``fast``,
Extents' ``req_one``); nbdkit does not log a read's DF flag. ``Disconnect``
is the connection ending, not a command, so it is not a request.

**JSON lines** are what ``diskwatch --record`` wrote before recordings had
their own format: one object per request with ``t`` (seconds from the
start), ``conn``, ``export``, ``op``, ``offset``, ``length``, ``flags``,
``duration``, ``error``.

All three give requests in memory (a ``Recording``); a malformed file is
one ``ImportFormatError`` line saying where.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shlex
import struct
from collections.abc import Iterator
from datetime import datetime
from typing import BinaryIO

from ..errors import DiskwatchError
from ..events import Request, make_request
from ..wire import (
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    COMMAND_NAMES,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Command,
)
from .recording import Recording

#: nbd-server's own records in its transaction log, beside the wire's request
#: and reply headers (diskwatch/wire.py): not NBD, so defined here
NBD_TRACELOG_MAGIC = 0x25609514
NBD_TRACELOG_SET_DATALOG = 1
NBD_TRACELOG_FROM_MAGIC = 0x4A93BA39A54F31B6

_REQUEST_REST = struct.Struct(">IQQI")  # type, cookie, offset, length (after the magic)
_REPLY_REST = struct.Struct(">IQ")  # error, cookie
_MAGIC = struct.Struct(">I")


class ImportFormatError(DiskwatchError):
    """A log that is not what it claims: ``FILE: where: what``."""


def _command(number: int) -> int:
    return number if 0 <= number < Command.UNKNOWN else int(Command.UNKNOWN)


#: request fields an imported log gives as numbers, and what the recording's
#: columns hold (recording/format.py's REQS: I, Q, I, H, I)
_FIELD_LIMITS = ((0, "connection", 0xFFFF_FFFF), (3, "offset", (1 << 64) - 1),
                 (4, "length", 0xFFFF_FFFF), (5, "flags", 0xFFFF), (8, "error", 0xFFFF_FFFF))


def _check_fields(fields, where: str) -> None:
    """A log from elsewhere may hold any number: one out of range is this
    file's error (not a traceback later, in the recording or the picture)."""
    for i, name, top in _FIELD_LIMITS:
        if not 0 <= fields[i] <= top:
            raise ImportFormatError(f"{where}: {name} {fields[i]} is out of range (0 to {top})")
    if not (math.isfinite(fields[6]) and math.isfinite(fields[7]) and fields[7] >= 0):
        raise ImportFormatError(f"{where}: a time or duration that is not a number of seconds")


# --- nbd-server ----------------------------------------------------------------

def read_nbd_trdump(path: str) -> Recording:
    """nbd-server's transaction log -> a Recording (times are request order)."""
    with open(path, "rb") as f:
        requests, truncated = _parse_transaction_log(f, path)
    return Recording(requests=requests, source=f"nbd-server transaction log {path}",
                     origin="nbd-trdump", timed=False, path=path, truncated=truncated)


def _parse_transaction_log(f: BinaryIO, path: str) -> tuple[list[Request], bool]:
    # fields of each request, as a list so the reply can set its error
    pending: dict[int, list] = {}
    order: list[list] = []
    datalog = False
    pos = 0
    while True:
        head = f.read(4)
        if not head:
            break
        if len(head) < 4:
            return _finish(order), True
        (magic,) = _MAGIC.unpack(head)
        if magic in (REQUEST_MAGIC, NBD_TRACELOG_MAGIC):
            body = f.read(_REQUEST_REST.size)
            if len(body) < _REQUEST_REST.size:
                return _finish(order), True
            type_, cookie, offset, length = _REQUEST_REST.unpack(body)
            if magic == NBD_TRACELOG_MAGIC:
                if offset == NBD_TRACELOG_FROM_MAGIC and type_ == NBD_TRACELOG_SET_DATALOG:
                    datalog = bool(length)
                pos += 4 + len(body)
                continue
            command = type_ & 0xFFFF
            fields = [1, "", _command(command), offset, length, type_ >> 16,
                      float(len(order)), 0.0, 0]
            order.append(fields)
            pending[cookie] = fields
            pos += 4 + len(body)
            if datalog and command == Command.WRITE:
                skipped = len(f.read(length))
                pos += skipped
                if skipped < length:
                    return _finish(order), True
        elif magic == SIMPLE_REPLY_MAGIC:
            body = f.read(_REPLY_REST.size)
            if len(body) < _REPLY_REST.size:
                return _finish(order), True
            error, cookie = _REPLY_REST.unpack(body)
            fields = pending.pop(cookie, None)
            if fields is not None:
                fields[8] = error
            pos += 4 + len(body)
        else:
            raise ImportFormatError(
                f"{path}: byte {pos}: magic {magic:#010x} is neither an NBD request nor a "
                "reply: not an nbd-server transaction log")
    return _finish(order), False


def _finish(order: list[list]) -> list[Request]:
    return [make_request(tuple(fields)) for fields in order]


# --- nbdkit's log filter -----------------------------------------------------------

_LINE = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (?:connection=(\d+) )?(\.\.\.)?([A-Za-z]+)(.*)")
_FIELD = re.compile(r"""(\w+)=("(?:[^"\\]|\\.)*"|'[^']*'|\S+)""")

_NBDKIT_ACTIONS = {
    "Read": Command.READ, "Write": Command.WRITE, "Flush": Command.FLUSH,
    "Trim": Command.TRIM, "Zero": Command.WRITE_ZEROES, "Extents": Command.BLOCK_STATUS,
    "Cache": Command.CACHE,
}


def read_nbdkit_log(path: str) -> Recording:
    """nbdkit's log filter output -> a Recording (times from the log)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        requests, export, size = _parse_nbdkit_log(f, path)
    return Recording(requests=requests, source=f"nbdkit log {path}" + (
        f" (export {export!r})" if export else ""), size=size, origin="nbdkit-log",
        timed=True, path=path)


def _parse_nbdkit_log(lines, path: str) -> tuple[list[Request], str, int | None]:
    open_calls: dict[tuple[int, str], list] = {}  # (connection, id) -> request fields
    exports: dict[int, str] = {}
    order: list[list] = []
    size: int | None = None
    t0: float | None = None
    for lineno, line in enumerate(lines, 1):
        m = _LINE.match(line.rstrip("\n"))
        if m is None:
            if line.strip():
                raise ImportFormatError(
                    f"{path}:{lineno}: not a line of nbdkit's log filter "
                    "(expected 'YYYY-MM-DD HH:MM:SS.ffffff [connection=N] Action ...')")
            continue
        stamp, conn_s, leaving, action, rest = m.groups()
        try:
            t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f" if "." in stamp
                                  else "%Y-%m-%d %H:%M:%S").timestamp()
        except ValueError:
            raise ImportFormatError(f"{path}:{lineno}: not a time: {stamp}") from None
        conn = int(conn_s) if conn_s else 0
        fields = dict(_FIELD.findall(rest))
        if action == "Connect" and not leaving:
            exports[conn] = _unquote(fields.get("export", '""'))
            if "size" in fields and size is None:
                try:
                    size = int(fields["size"], 0)
                except ValueError:
                    raise ImportFormatError(f"{path}:{lineno}: bad size in Connect") from None
                if size < 0:
                    raise ImportFormatError(f"{path}:{lineno}: negative size in Connect")
            continue
        command = _NBDKIT_ACTIONS.get(action)
        if command is None or "id" not in fields:
            continue
        key = (conn, fields["id"])
        if leaving:
            req = open_calls.pop(key, None)
            if req is None:
                continue
            req[7] = max(0.0, t - req[6])
            if fields.get("return", "0") == "-1":
                req[8] = _errno_of(fields.get("error", "EIO"))
            continue
        if t0 is None:
            t0 = t
        try:
            offset = int(fields.get("offset", "0"), 0)
            length = int(fields.get("count", "0"), 0)
        except ValueError:
            raise ImportFormatError(f"{path}:{lineno}: bad offset or count in {action}") from None
        flags = 0
        if fields.get("fua") == "1":
            flags |= CMD_FLAG_FUA
        if command == Command.WRITE_ZEROES:
            if fields.get("trim") == "0":
                flags |= CMD_FLAG_NO_HOLE
            if fields.get("fast") == "1":
                flags |= CMD_FLAG_FAST_ZERO
        if command == Command.BLOCK_STATUS and fields.get("req_one") == "1":
            flags |= CMD_FLAG_REQ_ONE
        req = [conn, exports.get(conn, ""), int(command), offset, length, flags, t, 0.0, 0]
        _check_fields(req, f"{path}:{lineno}")
        open_calls[key] = req
        order.append(req)
    base = t0 or 0.0
    for req in order:
        req[6] -= base
    export = next(iter(exports.values()), "")
    return _finish(order), export, size


def _unquote(text: str) -> str:
    try:
        words = shlex.split(text)
    except ValueError:
        return text
    return words[0] if words else ""


def _errno_of(name: str) -> int:
    value = getattr(errno, name, None)
    if isinstance(value, int):
        return value
    try:
        return int(name)
    except ValueError:
        return errno.EIO


# --- diskwatch's JSON lines -------------------------------------------------------------

_OPS = {name: i for i, name in enumerate(COMMAND_NAMES)}


def read_jsonl(path: str) -> Recording:
    """``diskwatch --record`` JSON lines -> a Recording."""
    # surrogateescape: a byte that is not UTF-8 is the line's error (said
    # with its number), or inside a name kept as that byte, as recordings do
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        requests = list(_parse_jsonl(f, path))
    return Recording(requests=requests, source=f"diskwatch JSON lines {path}",
                     origin="jsonl", timed=True, path=path)


def _parse_jsonl(lines, path: str) -> Iterator[Request]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            op = rec["op"]
            command = _OPS[op] if isinstance(op, str) else _command(int(op))
            fields = (int(rec.get("conn", 1)), str(rec.get("export", "")), command,
                      int(rec["offset"]), int(rec["length"]), int(rec.get("flags", 0)),
                      float(rec["t"]), float(rec.get("duration", 0.0)), int(rec.get("error", 0)))
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            if not line.endswith("\n"):  # the last line of a file still being written
                return
            raise ImportFormatError(f"{path}:{lineno}: not a diskwatch request record ({e})"
                                    ) from None
        _check_fields(fields, f"{path}:{lineno}")
        yield make_request(fields)
