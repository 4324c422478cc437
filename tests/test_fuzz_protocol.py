"""Property-based fuzzing of the sans-IO protocol machine (hypothesis).

Arbitrary and mutated byte streams for the handshake, option haggling and
transmission, split at arbitrary points, go into ``ServerConnection``. The
machine must answer per the spec or close: no exception but ProtocolError
(which closes) escapes, everything it sends parses as the replies the spec
defines, and what it buffers stays bounded whatever comes in.

The example budget is fixed and the runs derandomized, so CI's share is
bounded and repeatable; ``make fuzz`` raises it (FUZZ_EXAMPLES).
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskwatch.server import protocol as P

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SIZE = 1 << 20
WIRE_ERRORS = {0, P.NBD_EPERM, P.NBD_EIO, P.NBD_ENOMEM, P.NBD_EINVAL, P.NBD_ENOSPC,
               P.NBD_EOVERFLOW, P.NBD_ENOTSUP, P.NBD_ESHUTDOWN}
OPTION_REPLIES = {P.REP_ACK, P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT, P.REP_ERR_UNSUP,
                  P.REP_ERR_POLICY, P.REP_ERR_INVALID, P.REP_ERR_PLATFORM, P.REP_ERR_TLS_REQD,
                  P.REP_ERR_UNKNOWN, P.REP_ERR_SHUTDOWN, P.REP_ERR_BLOCK_SIZE_REQD,
                  P.REP_ERR_TOO_BIG}


def exports() -> dict[str, P.Export]:
    return {
        "": P.Export(name="", size=SIZE, readonly=False, can_flush=True, can_fua=True,
                     can_trim=True, can_fast_zero=True),
        "ro": P.Export(name="ro", size=8192, readonly=True,
                       block_size=(512, 4096, P.MAX_PAYLOAD)),
    }


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data


def name_and_infos(name: bytes, *infos: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos),
                                                             *infos)


def meta(name: bytes, *queries: bytes) -> bytes:
    body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def request(cmd: int, offset: int, length: int, handle: int = 1, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


def good_session() -> bytes:
    """A valid client stream: flags, options, GO, a few requests, DISC."""
    return (struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
            + option(P.OPT_LIST)
            + option(P.OPT_STRUCTURED_REPLY)
            + option(P.OPT_LIST_META_CONTEXT, meta(b"", b"base:"))
            + option(P.OPT_SET_META_CONTEXT, meta(b"", P.META_BASE_ALLOCATION.encode()))
            + option(P.OPT_INFO, name_and_infos(b"", P.INFO_NAME, P.INFO_BLOCK_SIZE))
            + option(P.OPT_GO, name_and_infos(b""))
            + request(P.CMD_READ, 0, 4096, 1)
            + request(P.CMD_WRITE, 512, 8, 2, P.CMD_FLAG_FUA, b"abcdefgh")
            + request(P.CMD_BLOCK_STATUS, 0, 65536, 3, P.CMD_FLAG_REQ_ONE)
            + request(P.CMD_WRITE_ZEROES, 0, 4096, 4, P.CMD_FLAG_NO_HOLE)
            + request(P.CMD_FLUSH, 0, 0, 5)
            + request(P.CMD_DISC, 0, 0, 6))


class Checked:
    """Feeds a machine, checks every byte it sends and how much it holds."""

    def __init__(self) -> None:
        self.c = P.ServerConnection(exports())
        greeting = self.c.data_to_send()
        assert len(greeting) == 18
        self.out = bytearray()
        self.buf = bytearray()  # the transport's buffer in transmission
        self.requests: list = []
        self.closed = False
        self.fed = 0

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        self.fed += len(data)
        c = self.c
        if c.phase == P.TRANSMISSION:
            self._transmission(data)
            return
        c.receive_data(data)
        while True:
            sent = c.data_to_send()
            # bounded output: at most MAX_PENDING_OUTPUT plus one option's replies
            assert len(sent) <= P.MAX_PENDING_OUTPUT + 8 * P.MAX_STRING + 4096, len(sent)
            self.out += sent
            if not c.stalled:
                break
            c.receive_data(b"")  # the transport goes on once replies are out
        # bounded input: the machine keeps at most one option's worth unread
        # beyond what a stalled call left (the transport stops feeding then)
        assert len(c._in) <= P.MAX_OPTION_LENGTH + 16 + len(data), len(c._in)
        if c.phase == P.CLOSED:
            self.closed = True
        elif c.phase == P.TRANSMISSION:
            left = c.take_leftover()
            self._transmission(left)

    def _transmission(self, data: bytes) -> None:
        self.buf += data
        out: list = []
        try:
            start = self.c.parse_requests(self.buf, 0, len(self.buf), out, 1 << 20)
        except P.ProtocolError:
            self.closed = True
            return
        del self.buf[:start]
        for cmd, _flags, handle, offset, length, pstart, err in out:
            assert err in WIRE_ERRORS, err
            assert cmd in (*range(8), P.CMD_UNKNOWN)
            if err == 0 and cmd != P.CMD_DISC:
                exp = self.c.export
                if cmd != P.CMD_FLUSH:
                    assert 0 < length and offset + length <= exp.size, (cmd, offset, length)
                if cmd == P.CMD_WRITE:
                    assert not exp.readonly and pstart >= 0
            # the replies the transport would build are well-formed
            self.c.reply_error(handle, err or P.NBD_EIO, "x" * 5000)
        self.requests += out
        # bounded: an incomplete request, or a write's payload up to 64 MiB
        assert len(self.buf) < P.REQUEST_SIZE + P.MAX_ACCEPTED

    def check_replies(self) -> None:
        """Everything sent in the handshake parses as option replies (or the
        export-name reply, which ends it)."""
        data = bytes(self.out)
        pos = 0
        while pos + 20 <= len(data):
            magic, _opt, rtype, length = struct.unpack_from(">QIII", data, pos)
            if magic != P.OPT_REPLY_MAGIC:
                # NBD_OPT_EXPORT_NAME's reply: size and flags (and maybe zeroes)
                assert self.c.phase in (P.TRANSMISSION, P.CLOSED)
                assert len(data) - pos in (10, 134), len(data) - pos
                return
            assert rtype in OPTION_REPLIES, hex(rtype)
            pos += 20 + length
            assert pos <= len(data)
        assert pos == len(data) or (self.c.phase != P.OPTIONS and len(data) - pos in (10, 134))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def run(data: bytes, cuts: list[int]) -> Checked:
    m = Checked()
    for piece in split(data, cuts):
        m.feed(piece)
    m.check_replies()
    return m


cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)


@FUZZ
@given(st.binary(max_size=2048), cuts)
def test_arbitrary_bytes(data, cut):
    run(data, cut)


@FUZZ
@given(st.binary(max_size=2048), cuts)
def test_arbitrary_options_after_valid_flags(data, cut):
    run(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE) + data, cut)


option_codes = st.sampled_from([P.OPT_EXPORT_NAME, P.OPT_ABORT, P.OPT_LIST, P.OPT_STARTTLS,
                                P.OPT_INFO, P.OPT_GO, P.OPT_STRUCTURED_REPLY,
                                P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT, 0, 4, 11,
                                0xFFFFFFFF])


@st.composite
def options(draw):
    """Structurally plausible options with hostile contents."""
    opt = draw(option_codes)
    kind = draw(st.integers(0, 3))
    if kind == 0:
        body = draw(st.binary(max_size=64))
    elif kind == 1:
        name = draw(st.sampled_from([b"", b"ro", b"nope", "é".encode(), b"\xff\xfe"]))
        body = name_and_infos(name, *draw(st.lists(st.integers(0, 5), max_size=4)))
    elif kind == 2:
        body = meta(draw(st.sampled_from([b"", b"ro", b"x"])),
                    *draw(st.lists(st.sampled_from([b"base:allocation", b"base:", b"",
                                                    b"qemu:dirty-bitmap:x", b"\xff"]),
                                   max_size=3)))
    else:
        # a lying length field
        body = struct.pack(">I", draw(st.integers(0, 1 << 32 - 1))) + draw(
            st.binary(max_size=16))
    return option(opt, body)


@FUZZ
@given(st.lists(options(), max_size=20), cuts)
def test_option_haggling(opts, cut):
    run(struct.pack(">I", 3) + b"".join(opts), cut)


@st.composite
def requests(draw):
    cmd = draw(st.integers(0, 10) | st.integers(0, 0xFFFF))
    flags = draw(st.integers(0, 0x1F) | st.integers(0, 0xFFFF))
    offset = draw(st.sampled_from([0, 1, 511, 512, SIZE - 512, SIZE, 1 << 63, (1 << 64) - 1])
                  | st.integers(0, (1 << 64) - 1))
    length = draw(st.sampled_from([0, 1, 512, 4096, P.MAX_PAYLOAD + 1, P.MAX_ACCEPTED + 1,
                                   0xFFFFFFFF]) | st.integers(0, 8192))
    payload = b""
    if cmd == P.CMD_WRITE and length <= 8192:
        payload = draw(st.binary(min_size=length, max_size=length))
    return request(cmd, offset, length, draw(st.integers(0, (1 << 64) - 1)), flags, payload)


@FUZZ
@given(st.booleans(), st.sampled_from([b"", b"ro"]), st.lists(requests(), max_size=20), cuts)
def test_transmission(structured, export, reqs, cut):
    hs = struct.pack(">I", 3)
    if structured:
        hs += option(P.OPT_STRUCTURED_REPLY) + option(
            P.OPT_SET_META_CONTEXT, meta(export, P.META_BASE_ALLOCATION.encode()))
    hs += option(P.OPT_GO, name_and_infos(export))
    m = run(hs + b"".join(reqs), cut)
    assert m.c.phase == P.TRANSMISSION or m.closed


@st.composite
def mutated(draw):
    """A valid session, then bit flips, deletions, insertions, truncation."""
    data = bytearray(good_session())
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.integers(0, 3))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == 0 and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == 1 and data:
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[pos:pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0",
                                                      b"\x7f\xff\xff\xff", b"\x80\0\0\0"]))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(mutated(), cuts)
def test_mutated_sessions(data, cut):
    run(data, cut)


def test_the_good_session_is_good():
    m = run(good_session(), [7, 100, 101, 300])
    assert m.c.phase == P.TRANSMISSION and not m.closed
    assert [r[6] for r in m.requests] == [0] * 6
