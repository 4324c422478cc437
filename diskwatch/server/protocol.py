"""The NBD protocol, server side, as a pure state machine (no sockets).

Modelled on h11: bytes go in (``receive_data`` during the handshake,
``parse_requests`` during transmission), typed requests (``Request``) and
what to send come out, and every corner of the protocol is a plain unit
test. All framing is here: every reply header, simple or structured, data,
hole, block status or error, is built by a ``ServerConnection`` method, and
the transport (``server.py``) reads request headers only through
``write_payload_at``. The transport moves bytes; the request path
(``dispatch.py``) calls sources.

Reference: doc/proto.md of the NetworkBlockDevice/nbd project (fixed newstyle
negotiation, structured replies, base:allocation block status).

Why this module is over 800 lines: it is the whole server side of one
specification, the handshake's phases and the transmission's framing,
which share one connection's state (its options, its export, its structured
replies); its vocabulary (wire.py) and its transport (server.py) are apart.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

# The wire's numbers are defined in diskwatch/wire.py; all of them are also
# found here (the transport and the tests say P.NBD_EIO): those this module
# does not use are re-exported (``X as X``).
from ..wire import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_UNKNOWN,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    META_BASE_ALLOCATION,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EOVERFLOW,
    NBD_EPERM,
    NBD_ESHUTDOWN,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_READ_ONLY,
    TF_ROTATIONAL,
    TF_SEND_CACHE,
    TF_SEND_DF,
    TF_SEND_FAST_ZERO,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
)
from ..wire import NBD_EIO as NBD_EIO
from ..wire import NBD_ENOMEM as NBD_ENOMEM
from ..wire import REP_ERR_BLOCK_SIZE_REQD as REP_ERR_BLOCK_SIZE_REQD
from ..wire import REP_ERR_PLATFORM as REP_ERR_PLATFORM
from ..wire import REP_ERR_SHUTDOWN as REP_ERR_SHUTDOWN
from ..wire import REP_ERR_TOO_BIG as REP_ERR_TOO_BIG
from ..wire import REPLY_TYPE_ERROR_OFFSET as REPLY_TYPE_ERROR_OFFSET
from ..wire import wire_error as wire_error

# --- the server's own choices and limits ------------------------------------------

META_ID_BASE_ALLOCATION = 1

#: largest payload (read reply or write) advertised in NBD_INFO_BLOCK_SIZE
MAX_PAYLOAD = 32 * 1024 * 1024
#: largest payload accepted: clients that negotiate with NBD_OPT_EXPORT_NAME
#: never learn MAX_PAYLOAD and some send more; nbdkit accepts up to 64 MiB.
#: A write beyond it is refused with EINVAL and its payload skipped as it
#: arrives (never buffered), so the connection stays in step.
MAX_ACCEPTED = 64 * 1024 * 1024
#: an option longer than this closes the connection (nothing legitimate is)
MAX_OPTION_LENGTH = 64 * 1024
MAX_STRING = 4096
#: option replies queued (data_to_send not called) before the machine stops
#: reading options: a client that pipelines options without reading the
#: replies (which are larger) cannot make them pile up
MAX_PENDING_OUTPUT = 64 * 1024

_greeting = struct.Struct(">QQH")
_opt_header = struct.Struct(">QII")
_opt_reply = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED = struct.Struct(">IHHQI")
STRUCTURED_DATA = struct.Struct(">IHHQIQ")  # header + offset of OFFSET_DATA
REQUEST_SIZE = REQUEST.size  # 28
#: what parse_requests counts for a request besides its payload: the tuple,
#: its event and its reply header (Python objects, a few hundred bytes)
REQUEST_COST = 512
#: block status answers for at most this much of what it was asked (the
#: client only needs the start; a source's extents of a window stay small)
BLOCK_STATUS_MAX = 1 << 30

#: the message of an error reply for a request the protocol refused
#: (``Request.error``), or one the server refused as a whole
ERROR_TEXT = {
    NBD_EINVAL: "invalid request (range, flags or length)",
    NBD_ENOSPC: "request goes past the end of the disk",
    NBD_EPERM: "export is read-only",
    NBD_EOVERFLOW: "request larger than the maximum payload",
    NBD_ENOTSUP: "not supported",
    NBD_ESHUTDOWN: "server is shutting down",
}


class Request(NamedTuple):
    """One request, as ``parse_requests`` hands it to the transport."""

    command: int  # CMD_*; CMD_UNKNOWN for a number the protocol does not know
    flags: int
    handle: int
    offset: int
    length: int
    #: where a write's payload starts in the buffer parsed (-1: none)
    payload_start: int
    #: an NBD error to answer instead of carrying it out (0: valid)
    error: int


_new_request = tuple.__new__  # Request(...) without the keyword-handling __new__: on the hot path

# proto.md: FUA "is valid for all commands ... the server MUST accept all
# commands with this bit set (even by ignoring the bit)"; old qemu sets it on
# FLUSH. It only has an effect on writes.
COMMAND_FLAGS_ALLOWED = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}


def utf8_prefix(text: str, limit: int = MAX_STRING) -> bytes:
    """``text`` in UTF-8, cut to at most ``limit`` bytes, never inside a
    character (a client decoding the message must not choke on it)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode()


class ProtocolError(Exception):
    """The peer broke the protocol in a way that ends the connection."""


@dataclass
class Export:
    """What the protocol needs to know of an export (no I/O)."""

    name: str
    size: int
    description: str = ""
    readonly: bool = True
    can_flush: bool = False
    can_fua: bool = False
    can_trim: bool = False
    can_fast_zero: bool = False
    can_cache: bool = True
    can_multi_conn: bool = True
    rotational: bool = False
    block_size: tuple[int, int, int] = (1, 4096, MAX_PAYLOAD)

    def transmission_flags(self, structured: bool) -> int:
        f = TF_HAS_FLAGS
        if self.readonly:
            f |= TF_READ_ONLY
        else:
            if self.can_fua:
                f |= TF_SEND_FUA
            if self.can_trim:
                f |= TF_SEND_TRIM
            f |= TF_SEND_WRITE_ZEROES  # emulated by writing zeroes when need be
            if self.can_fast_zero:
                f |= TF_SEND_FAST_ZERO
        if self.can_flush:
            f |= TF_SEND_FLUSH
        if self.rotational:
            f |= TF_ROTATIONAL
        if structured:
            f |= TF_SEND_DF
        if self.can_multi_conn:
            f |= TF_CAN_MULTI_CONN
        if self.can_cache:
            f |= TF_SEND_CACHE
        return f


# Phases of a connection, and where each may go (h11 keeps its states in
# such a table): the client's flags, then options (haggling, STARTTLS among
# them), then transmission; closed from any of them, and for good.
HANDSHAKE_FLAGS = "client-flags"
OPTIONS = "options"
TRANSMISSION = "transmission"
CLOSED = "closed"
TRANSITIONS = {
    HANDSHAKE_FLAGS: frozenset({OPTIONS, CLOSED}),
    OPTIONS: frozenset({TRANSMISSION, CLOSED}),
    TRANSMISSION: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


@dataclass
class ServerConnection:
    """One NBD connection, server side, without I/O.

    Handshake: feed bytes with ``receive_data``; collect ``data_to_send()``.
    When ``phase`` becomes TRANSMISSION, ``export`` is chosen and the
    transport switches to ``parse_requests`` on its buffer (any bytes left
    over from the handshake are returned by ``take_leftover``).

    TLS (``tls`` "on" or "require", see server/tls.py): when a STARTTLS is
    accepted, ``starttls`` becomes true and nothing more is parsed; the
    transport sends what is queued (the ACK, in the clear), then calls
    ``start_tls()``, which returns the bytes received past the option (the
    start of the client's TLS handshake, if it did not wait) and carries on
    with option haggling over TLS.
    """

    exports: dict[str, Export]
    default_export: str = ""
    phase: str = HANDSHAKE_FLAGS
    export: Export | None = None
    structured: bool = False
    no_zeroes: bool = False
    meta_contexts: dict[int, str] = field(default_factory=dict)
    close_reason: str = ""
    tls: str = "off"  # "off", "on" (the client may upgrade), "require" (it must)
    tls_active: bool = False
    starttls: bool = False  # STARTTLS acknowledged: the transport must switch now
    #: the export the last SET_META_CONTEXT named: BLOCK_STATUS is only
    #: valid if transmission is on that export (proto.md)
    meta_export: str | None = None
    #: bytes of an over-large write's payload still to be thrown away
    skip: int = 0
    #: receive_data stopped with options unread: MAX_PENDING_OUTPUT of
    #: replies wait; call data_to_send, then receive_data(b"") to go on
    stalled: bool = False
    _out_bytes: int = 0
    _in: bytearray = field(default_factory=bytearray)
    _out: list[bytes] = field(default_factory=list)
    #: command -> flags allowed on this export (set on entering transmission)
    _allowed: dict[int, int] = field(default_factory=dict)
    _align: int = 0  # minimum block size - 1, when advertised and above 1

    def __post_init__(self) -> None:
        self._out.append(_greeting.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    # --- handshake ---------------------------------------------------------

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        return data

    def start_tls(self) -> bytes:
        """The transport now speaks TLS: options go on over it. Nothing
        negotiated in the clear is kept (a man in the middle could have
        chosen it). Returns the bytes received after the STARTTLS option."""
        self.starttls = False
        self.tls_active = True
        self.structured = False
        self.meta_contexts = {}
        return self.take_leftover()

    def take_leftover(self) -> bytes:
        data = bytes(self._in)
        self._in.clear()
        return data

    def _to(self, phase: str) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"NBD handshake: no way from {self.phase} to {phase}")  # a bug
        self.phase = phase

    def _close(self, reason: str) -> None:
        self._to(CLOSED)
        self.close_reason = reason

    def receive_data(self, data: bytes) -> None:
        """Feed handshake bytes. Errors the peer caused set phase CLOSED."""
        self._in += data
        read = _HANDSHAKE_READERS.get(self.phase)
        if read is None:  # transmission, or closed: the bytes wait for take_leftover
            return
        self.stalled = False
        while read is not None and not self.starttls:
            if self._out_bytes >= MAX_PENDING_OUTPUT:
                self.stalled = True
                return
            if not read(self):
                return  # more bytes are needed
            read = _HANDSHAKE_READERS.get(self.phase)

    def _read_client_flags(self) -> bool:
        if len(self._in) < 4:
            return False
        (cflags,) = struct.unpack_from(">I", self._in)
        del self._in[:4]
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            self._close(f"unknown client flags {cflags:#x}")
            return False
        self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        if self.tls == "require" and not cflags & FLAG_C_FIXED_NEWSTYLE:
            # proto.md: without fixed newstyle there is no TLS
            self._close("TLS is required and the client cannot start it (no fixed newstyle)")
            return False
        self._to(OPTIONS)
        return True

    def _read_option(self) -> bool:
        if len(self._in) < _opt_header.size:
            return False
        magic, option, length = _opt_header.unpack_from(self._in)
        if magic != IHAVEOPT:
            self._close(f"bad option magic {magic:#x}")
            return False
        if length > MAX_OPTION_LENGTH:
            self._close(f"option {option} of {length} bytes is too long")
            return False
        if len(self._in) < _opt_header.size + length:
            return False
        data = bytes(self._in[_opt_header.size:_opt_header.size + length])
        del self._in[:_opt_header.size + length]
        self._option(option, data)
        return True

    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(_opt_reply.pack(OPT_REPLY_MAGIC, option, rtype, len(data)) + data)
        self._out_bytes += 20 + len(data)

    def _error(self, option: int, rtype: int, message: str) -> None:
        self._reply(option, rtype, utf8_prefix(message))

    def _option(self, option: int, data: bytes) -> None:
        if (self.tls == "require" and not self.tls_active
                and option not in (OPT_STARTTLS, OPT_ABORT)):
            if option == OPT_EXPORT_NAME:  # it cannot be refused: the session ends
                self._close("TLS is required: the client chose an export without it")
            else:
                self._error(option, REP_ERR_TLS_REQD,
                            "TLS is required: send NBD_OPT_STARTTLS first")
            return
        handle = _OPTION_HANDLERS.get(option)
        if handle is None:
            self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")
        else:
            handle(self, option, data)

    def _export_name(self, option: int, data: bytes) -> None:
        name = data.decode("utf-8", "replace")
        exp = self._find_export(name)
        if exp is None:
            # The spec gives no way to say why: the session ends.
            self._close(f"unknown export {name!r}")
            return
        self._out.append(struct.pack(">QH", exp.size, exp.transmission_flags(self.structured)))
        if not self.no_zeroes:
            self._out.append(bytes(124))
        self._enter_transmission(exp, block_size_sent=False)

    def _abort(self, option: int, data: bytes) -> None:
        self._reply(option, REP_ACK)
        self._close("client aborted the handshake")

    def _list(self, option: int, data: bytes) -> None:
        if data:
            self._error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return
        for exp in self.exports.values():
            name = exp.name.encode()
            self._reply(option, REP_SERVER, struct.pack(">I", len(name)) + name
                        + utf8_prefix(exp.description))
        self._reply(option, REP_ACK)

    def _structured_reply(self, option: int, data: bytes) -> None:
        if data:
            self._error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        else:
            self.structured = True
            self._reply(option, REP_ACK)

    def _starttls(self, option: int, data: bytes) -> None:
        if self.tls == "off":
            self._error(option, REP_ERR_POLICY, "TLS is off (diskwatch --tls=on)")
        elif self.tls_active:
            self._error(option, REP_ERR_INVALID, "TLS is already active")
        elif data:
            self._error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        else:
            self._reply(option, REP_ACK)
            self.starttls = True

    def _find_export(self, name: str) -> Export | None:
        if name == "" and self.default_export in self.exports:
            return self.exports[self.default_export]
        return self.exports.get(name)

    def _info_or_go(self, option: int, data: bytes) -> None:
        try:
            (nlen,) = struct.unpack_from(">I", data)
            if nlen > MAX_STRING or 4 + nlen + 2 > len(data):
                raise ValueError
            name = data[4:4 + nlen].decode("utf-8")
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 4 + nlen + 2 + 2 * nreq:
                raise ValueError
            requests = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        except (struct.error, ValueError, UnicodeDecodeError):
            self._error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request")
            return
        exp = self._find_export(name)
        if exp is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        self._reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, exp.size,
                                                  exp.transmission_flags(self.structured)))
        if INFO_NAME in requests:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + exp.name.encode())
        if INFO_DESCRIPTION in requests and exp.description:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION)
                        + utf8_prefix(exp.description))
        # Always sent: clients that ignore it lose nothing, and those that
        # honour it align their requests (nbdkit does the same).
        mn, pref, mx = exp.block_size
        self._reply(option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, mn, pref, mx))
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            self._enter_transmission(exp)

    def _meta_context(self, option: int, data: bytes) -> None:
        if option == OPT_SET_META_CONTEXT:
            # proto.md: a failed SET_META_CONTEXT leaves no context selected
            self.meta_contexts = {}
            self.meta_export = None
        if not self.structured:
            self._error(option, REP_ERR_INVALID, "negotiate structured replies first")
            return
        try:
            (nlen,) = struct.unpack_from(">I", data)
            if nlen > MAX_STRING:
                raise ValueError
            name = data[4:4 + nlen].decode("utf-8")
            pos = 4 + nlen
            (nq,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if qlen > MAX_STRING or pos + qlen > len(data):
                    raise ValueError
                queries.append(data[pos:pos + qlen].decode("utf-8"))
                pos += qlen
            if pos != len(data):
                raise ValueError
        except (struct.error, ValueError, UnicodeDecodeError):
            self._error(option, REP_ERR_INVALID, "malformed meta context request")
            return
        if self._find_export(name) is None:
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if option == OPT_LIST_META_CONTEXT and not queries:
            queries = [META_BASE_ALLOCATION]
        selected = []
        for q in queries:
            if q == META_BASE_ALLOCATION or (option == OPT_LIST_META_CONTEXT and q == "base:"):
                if META_BASE_ALLOCATION not in selected:
                    selected.append(META_BASE_ALLOCATION)
        if option == OPT_SET_META_CONTEXT:
            self.meta_contexts = ({META_ID_BASE_ALLOCATION: META_BASE_ALLOCATION}
                                  if selected else {})
            self.meta_export = self._find_export(name).name
        for c in selected:
            ctx_id = META_ID_BASE_ALLOCATION if option == OPT_SET_META_CONTEXT else 0
            self._reply(option, REP_META_CONTEXT, struct.pack(">I", ctx_id) + c.encode())
        self._reply(option, REP_ACK)

    def _enter_transmission(self, exp: Export, block_size_sent: bool = True) -> None:
        self.export = exp
        self._to(TRANSMISSION)
        # Transmission flags were computed with the final structured state.
        if self.meta_export != exp.name:
            self.meta_contexts = {}  # set for another export: BLOCK_STATUS is EINVAL
        # Flags the client may set are those the transmission flags allow
        # (proto.md: FUA only "provided NBD_FLAG_SEND_FUA has been
        # negotiated"; DF only with structured replies; FAST_ZERO only with
        # SEND_FAST_ZERO). nbdkit answers the others EINVAL, as we do.
        tflags = exp.transmission_flags(self.structured)
        fua = CMD_FLAG_FUA if tflags & TF_SEND_FUA else 0
        self._allowed = {cmd: f & ~CMD_FLAG_FUA | (f & fua)
                         for cmd, f in COMMAND_FLAGS_ALLOWED.items()}
        if not self.structured:
            self._allowed[CMD_READ] &= ~CMD_FLAG_DF
        if not tflags & TF_SEND_FAST_ZERO:
            self._allowed[CMD_WRITE_ZEROES] &= ~CMD_FLAG_FAST_ZERO
        # A minimum block size the client was told (NBD_INFO_BLOCK_SIZE) is
        # enforced, as nbdkit does; with EXPORT_NAME it never heard of one.
        mn = exp.block_size[0]
        self._align = mn - 1 if block_size_sent and mn > 1 and not mn & (mn - 1) else 0

    # --- transmission ------------------------------------------------------

    def parse_requests(self, buf, start: int, end: int, out: list,
                       budget: int = 1 << 62) -> int:
        """Parse complete requests from ``buf[start:end]`` into ``out``.

        Appends ``Request``s (``command, flags, handle, offset, length,
        payload_start, error``) where ``payload_start`` indexes the write
        payload in ``buf`` (-1 when none) and ``error`` is an NBD error to
        reply with instead of doing the request (0 when the request is
        valid). Returns the new start: bytes of an incomplete request stay in
        the buffer.

        ``budget`` bounds what one call lets loose: parsing stops once the
        requests parsed would move that many bytes (read and write lengths,
        plus REQUEST_COST each), after at least one request; the rest stays
        in the buffer for the transport to parse when replies have drained.
        Raises ProtocolError when the connection must close (bad magic).
        """
        if self.skip:  # the rest of an over-large write's payload
            n = min(self.skip, end - start)
            self.skip -= n
            start += n
            if self.skip:
                return start
        exp = self.export
        size = exp.size
        readonly = exp.readonly
        unpack = REQUEST.unpack_from
        allowed = self._allowed or COMMAND_FLAGS_ALLOWED
        align = self._align
        append = out.append
        new = _new_request
        cost = 0
        while end - start >= REQUEST_SIZE and cost < budget:
            magic, flags, cmd, handle, offset, length = unpack(buf, start)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if cmd == CMD_WRITE:
                if length > MAX_ACCEPTED:
                    # Refused, and its payload thrown away as it comes.
                    start += REQUEST_SIZE
                    n = min(length, end - start)
                    start += n
                    self.skip = length - n
                    append(new(Request, (cmd, flags, handle, offset, length, -1, NBD_EINVAL)))
                    if self.skip:
                        return start
                    continue
                if end - start < REQUEST_SIZE + length:
                    return start  # wait for the whole payload
                pstart = start + REQUEST_SIZE
                start = pstart + length
            else:
                pstart = -1
                start += REQUEST_SIZE
            # Fast path: the common valid read/write.
            err = 0
            if cmd == CMD_READ or cmd == CMD_WRITE:
                if flags & ~allowed[cmd]:
                    err = NBD_EINVAL
                elif length == 0 or length > MAX_ACCEPTED:
                    err = NBD_EOVERFLOW if (length and self.structured and cmd == CMD_READ) \
                        else NBD_EINVAL
                elif offset + length > size:
                    err = NBD_ENOSPC if cmd == CMD_WRITE else NBD_EINVAL
                elif cmd == CMD_WRITE and readonly:
                    err = NBD_EPERM
                elif (offset | length) & align:
                    err = NBD_EINVAL
                else:
                    cost += length
            else:
                err = self._validate_other(cmd, flags, offset, length)
                if cmd > CMD_BLOCK_STATUS:
                    cmd = CMD_UNKNOWN  # answered EINVAL; events carry one "unknown" value
            cost += REQUEST_COST
            append(new(Request, (cmd, flags, handle, offset, length, pstart, err)))
        return start

    def _validate_other(self, cmd: int, flags: int, offset: int, length: int) -> int:
        exp = self.export
        if cmd == CMD_DISC:
            # Never answered, whatever its flags: the spec allows no reply to
            # DISC, and a client that sent it has stopped reading.
            return 0
        allowed = self._allowed or COMMAND_FLAGS_ALLOWED
        if cmd not in allowed:
            return NBD_EINVAL
        if flags & ~allowed[cmd]:
            return NBD_EINVAL
        if cmd == CMD_FLUSH:
            return 0
        if length == 0:
            return NBD_EINVAL
        if offset + length > exp.size:
            return NBD_ENOSPC if cmd == CMD_WRITE_ZEROES else NBD_EINVAL
        if (offset | length) & self._align:
            return NBD_EINVAL
        if cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
            if exp.readonly:
                return NBD_EPERM
            if cmd == CMD_TRIM and not exp.can_trim:
                return NBD_EINVAL
        if cmd == CMD_BLOCK_STATUS and not self.meta_contexts:
            return NBD_EINVAL
        return 0

    # --- replies (bytes to send) -------------------------------------------

    def reply_header(self, handle: int, error: int = 0) -> bytes:
        """A reply that carries no data (simple reply, or a structured NONE
        chunk with DONE)."""
        if self.structured:
            if error:
                return self.reply_error(handle, error)
            return STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)

    def reply_refused(self, handle: int, error: int) -> bytes:
        """The answer to a request refused as a whole: ``Request.error`` from
        parse_requests, or NBD_ESHUTDOWN at shutdown (ERROR_TEXT says why)."""
        return self.reply_error(handle, error, ERROR_TEXT.get(error, ""))

    def reply_error(self, handle: int, error: int, message: str = "") -> bytes:
        if not self.structured:
            return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        msg = utf8_prefix(message)
        return (STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                handle, 6 + len(msg))
                + struct.pack(">IH", error, len(msg)) + msg)

    def read_data_header(self, handle: int, offset: int, length: int, done: bool = True) -> bytes:
        """Header to send before ``length`` bytes of read data at ``offset``."""
        if self.structured:
            return STRUCTURED_DATA.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                         REPLY_TYPE_OFFSET_DATA, handle, length + 8, offset)
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)

    def read_chunks(self, handle: int, offset: int, pieces: list) -> list:
        """The chunks of a structured read split where the disk has holes:
        ``pieces`` are ``(length, data)`` in order from ``offset``, data None
        for a range that reads as zeroes (a hole chunk, no payload). Returns
        headers and payloads to send in order, the last chunk marked DONE."""
        out: list = []
        append = out.append
        pos = offset
        last = len(pieces) - 1
        for i, (n, data) in enumerate(pieces):
            if data is None:
                append(self.read_hole_chunk(handle, pos, n, i == last))
            else:
                append(self.read_data_header(handle, pos, n, i == last))
                append(data)
            pos += n
        return out

    def read_hole_chunk(self, handle: int, offset: int, length: int, done: bool) -> bytes:
        return (STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                REPLY_TYPE_OFFSET_HOLE, handle, 12)
                + struct.pack(">QI", offset, length))

    def reply_block_status(self, handle: int, extents: list[tuple[int, int]]) -> bytes:
        """One BLOCK_STATUS chunk per selected context (we have one)."""
        body = b"".join(struct.pack(">II", length, flags) for length, flags in extents)
        chunks = []
        ids = list(self.meta_contexts)
        for i, ctx in enumerate(ids):
            done = REPLY_FLAG_DONE if i == len(ids) - 1 else 0
            chunks.append(STRUCTURED.pack(STRUCTURED_REPLY_MAGIC, done, REPLY_TYPE_BLOCK_STATUS,
                                          handle, 4 + len(body)) + struct.pack(">I", ctx) + body)
        return b"".join(chunks)


#: what reads the handshake in each phase that has one (True: it made
#: progress; False: it needs more bytes, or closed the connection)
_HANDSHAKE_READERS = {
    HANDSHAKE_FLAGS: ServerConnection._read_client_flags,
    OPTIONS: ServerConnection._read_option,
}

#: what answers each option the server knows (the others: REP_ERR_UNSUP)
_OPTION_HANDLERS = {
    OPT_EXPORT_NAME: ServerConnection._export_name,
    OPT_ABORT: ServerConnection._abort,
    OPT_LIST: ServerConnection._list,
    OPT_INFO: ServerConnection._info_or_go,
    OPT_GO: ServerConnection._info_or_go,
    OPT_STRUCTURED_REPLY: ServerConnection._structured_reply,
    OPT_LIST_META_CONTEXT: ServerConnection._meta_context,
    OPT_SET_META_CONTEXT: ServerConnection._meta_context,
    OPT_STARTTLS: ServerConnection._starttls,
}


def write_payload_at(buf, start: int, end: int) -> int:
    """The payload length of the write whose header starts at ``buf[start]``
    when parse_requests will wait for all of it in the buffer (it is at most
    MAX_ACCEPTED); -1 when the header is not all there or it is no such
    write. What the transport needs to know of a request it has not parsed:
    whether it is complete, and how big the buffer must grow to hold it."""
    if end - start < REQUEST_SIZE:
        return -1
    _magic, _flags, cmd, _handle, _offset, length = REQUEST.unpack_from(buf, start)
    return length if cmd == CMD_WRITE and length <= MAX_ACCEPTED else -1


def clip_extents(extents, offset: int, length: int, req_one: bool,
                 fill: bool = False) -> list[tuple[int, int]]:
    """Turn a source's (offset, length, flags) extents into block-status
    descriptors (length, flags) that start at ``offset``, are contiguous,
    never go past ``offset + length``, and merge neighbours with equal flags.
    Block status may answer for less than was asked; with ``fill`` (a read
    split into chunks must cover all of it) a tail the source left out is
    data."""
    out: list[list[int]] = []
    pos = offset
    end = offset + length
    for eoff, elen, eflags in extents:
        if eoff + elen <= pos:
            continue
        if eoff > pos:  # a gap the source left: call it data
            n = min(eoff, end) - pos
            if out and out[-1][1] == 0:
                out[-1][0] += n
            else:
                out.append([n, 0])
            pos += n
            if pos >= end:
                break
        n = min(eoff + elen, end) - pos
        if n <= 0:
            continue
        f = eflags & 3
        if out and out[-1][1] == f:
            out[-1][0] += n
        else:
            out.append([n, f])
        pos += n
        if pos >= end:
            break
    if not out:
        out.append([length, 0])
        pos = end
    if fill and pos < end:  # the source said nothing of the tail: call it data
        if out and out[-1][1] == 0:
            out[-1][0] += end - pos
        else:
            out.append([end - pos, 0])
    if req_one:
        out = out[:1]
    # 32-bit descriptor lengths: a 4 GiB request is split.
    result: list[tuple[int, int]] = []
    for n, f in out:
        while n > 0xFFFFFFFF:
            result.append((0xFFFFF000, f))
            n -= 0xFFFFF000
        result.append((n, f))
    return result
