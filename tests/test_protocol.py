"""Sans-IO tests of the NBD protocol core (``diskwatch.server.protocol``).

h11-style: a ``ServerConnection`` is driven with bytes and what it wants to
send is checked byte for byte; no sockets, no threads.
"""

from __future__ import annotations

import struct

import pytest

from diskwatch.server import protocol as P

SIZE = 1024 * 1024


def exports() -> dict[str, P.Export]:
    return {
        "": P.Export(name="", size=SIZE, description="the default disk", readonly=False,
                     can_flush=True, can_fua=True, can_trim=True,
                     can_fast_zero=True, block_size=(1, 4096, P.MAX_PAYLOAD)),
        "ro": P.Export(name="ro", size=8192, description="", readonly=True, can_flush=True),
        "plain": P.Export(name="plain", size=SIZE, readonly=False, can_trim=False,
                          can_fast_zero=False),
    }


def new_conn(client_flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES,
             **kw) -> P.ServerConnection:
    c = P.ServerConnection(exports(), **kw)
    greeting = c.data_to_send()
    assert greeting == struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                                   P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
    c.receive_data(struct.pack(">I", client_flags))
    return c


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Option replies as (option, reply type, data)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == P.OPT_REPLY_MAGIC
        pos += 20
        out.append((opt, rtype, data[pos:pos + length]))
        pos += length
    assert pos == len(data)
    return out


def send_option(c: P.ServerConnection, opt: int, data: bytes = b"") -> list[tuple[int, int, bytes]]:
    c.receive_data(option(opt, data))
    return parse_replies(c.data_to_send())


def name_and_requests(name: str, *infos: int) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + struct.pack(
        f">{len(infos)}H", *infos)


def meta_request(name: str, *queries: str) -> bytes:
    n = name.encode()
    body = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q.encode())) + q.encode()
    return body


def info_replies(replies) -> dict[int, bytes]:
    return {struct.unpack_from(">H", d)[0]: d for _, t, d in replies if t == P.REP_INFO}


def in_transmission(export: str = "", structured: bool = False,
                    meta: bool = False) -> P.ServerConnection:
    c = new_conn()
    if structured:
        send_option(c, P.OPT_STRUCTURED_REPLY)
    if meta:
        send_option(c, P.OPT_SET_META_CONTEXT, meta_request(export, P.META_BASE_ALLOCATION))
    replies = send_option(c, P.OPT_GO, name_and_requests(export))
    assert replies[-1][1] == P.REP_ACK
    assert c.phase == P.TRANSMISSION
    return c


# --- handshake ---------------------------------------------------------------

def test_greeting_is_fixed_newstyle_with_no_zeroes():
    c = P.ServerConnection(exports())
    assert c.phase == P.HANDSHAKE_FLAGS
    data = c.data_to_send()
    assert data[:8] == b"NBDMAGIC" and data[8:16] == b"IHAVEOPT"
    assert struct.unpack(">H", data[16:]) == (P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES,)
    assert c.data_to_send() == b""  # said once


def test_client_flags_arrive_in_pieces():
    c = P.ServerConnection(exports())
    c.data_to_send()
    c.receive_data(b"\x00\x00")
    assert c.phase == P.HANDSHAKE_FLAGS
    c.receive_data(b"\x00\x03")
    assert c.phase == P.OPTIONS and c.no_zeroes


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flag_closes(flags):
    c = new_conn(client_flags=flags)
    assert c.phase == P.CLOSED
    assert "client flags" in c.close_reason
    assert c.data_to_send() == b""


@pytest.mark.parametrize("no_zeroes,tail", [(True, 0), (False, 124)])
def test_export_name_known(no_zeroes, tail):
    flags = P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0)
    c = new_conn(client_flags=flags)
    c.receive_data(option(P.OPT_EXPORT_NAME, b"ro"))
    data = c.data_to_send()
    assert len(data) == 10 + tail
    size, tflags = struct.unpack_from(">QH", data)
    assert size == 8192
    assert tflags & P.TF_HAS_FLAGS and tflags & P.TF_READ_ONLY
    assert data[10:] == bytes(tail)
    assert c.phase == P.TRANSMISSION and c.export.name == "ro"


def test_export_name_empty_is_the_default_export():
    c = new_conn(default_export="ro")
    c.receive_data(option(P.OPT_EXPORT_NAME, b""))
    assert c.phase == P.TRANSMISSION and c.export.name == "ro"


def test_export_name_unknown_closes_without_reply():
    c = new_conn()
    c.receive_data(option(P.OPT_EXPORT_NAME, b"nope"))
    assert c.phase == P.CLOSED
    assert "nope" in c.close_reason
    assert c.data_to_send() == b""


def test_abort_is_acked_and_closes():
    c = new_conn()
    replies = send_option(c, P.OPT_ABORT)
    assert replies == [(P.OPT_ABORT, P.REP_ACK, b"")]
    assert c.phase == P.CLOSED


def test_list_names_every_export_then_acks():
    c = new_conn()
    replies = send_option(c, P.OPT_LIST)
    assert replies[-1] == (P.OPT_LIST, P.REP_ACK, b"")
    servers = [d for _, t, d in replies if t == P.REP_SERVER]
    names = []
    for d in servers:
        (n,) = struct.unpack_from(">I", d)
        names.append(d[4:4 + n].decode())
    assert names == ["", "ro", "plain"]
    assert servers[0][4:] == b"the default disk"
    assert c.phase == P.OPTIONS


def test_list_with_data_is_invalid_and_session_goes_on():
    c = new_conn()
    replies = send_option(c, P.OPT_LIST, b"junk")
    assert [t for _, t, _ in replies] == [P.REP_ERR_INVALID]
    assert c.phase == P.OPTIONS
    assert send_option(c, P.OPT_LIST)[-1][1] == P.REP_ACK


def test_info_gives_export_name_description_block_size_and_stays():
    c = new_conn()
    replies = send_option(c, P.OPT_INFO, name_and_requests(
        "", P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE))
    assert replies[-1][1] == P.REP_ACK
    assert all(o == P.OPT_INFO for o, _, _ in replies)
    infos = info_replies(replies)
    _, size, tflags = struct.unpack(">HQH", infos[P.INFO_EXPORT])
    assert size == SIZE
    assert not tflags & P.TF_READ_ONLY
    for bit in (P.TF_SEND_FLUSH, P.TF_SEND_FUA, P.TF_SEND_TRIM, P.TF_SEND_WRITE_ZEROES,
                P.TF_SEND_FAST_ZERO, P.TF_SEND_CACHE, P.TF_CAN_MULTI_CONN):
        assert tflags & bit, hex(bit)
    assert not tflags & P.TF_SEND_DF  # only with structured replies
    assert infos[P.INFO_NAME] == struct.pack(">H", P.INFO_NAME)  # the name is ""
    assert infos[P.INFO_DESCRIPTION][2:] == b"the default disk"
    assert struct.unpack(">HIII", infos[P.INFO_BLOCK_SIZE]) == (
        P.INFO_BLOCK_SIZE, 1, 4096, P.MAX_PAYLOAD)
    assert c.phase == P.OPTIONS and c.export is None


def test_info_without_requests_still_sends_export_and_block_size():
    c = new_conn()
    infos = info_replies(send_option(c, P.OPT_INFO, name_and_requests("ro")))
    assert set(infos) == {P.INFO_EXPORT, P.INFO_BLOCK_SIZE}
    _, size, tflags = struct.unpack(">HQH", infos[P.INFO_EXPORT])
    assert size == 8192 and tflags & P.TF_READ_ONLY
    assert not tflags & (P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FUA)


def test_go_with_name_enters_transmission():
    c = new_conn()
    replies = send_option(c, P.OPT_GO, name_and_requests("ro", P.INFO_NAME))
    assert replies[-1] == (P.OPT_GO, P.REP_ACK, b"")
    assert info_replies(replies)[P.INFO_NAME][2:] == b"ro"
    assert c.phase == P.TRANSMISSION and c.export.name == "ro"


@pytest.mark.parametrize("opt", [P.OPT_INFO, P.OPT_GO])
def test_info_go_unknown_export_and_session_goes_on(opt):
    c = new_conn()
    replies = send_option(c, opt, name_and_requests("missing"))
    assert [t for _, t, _ in replies] == [P.REP_ERR_UNKNOWN]
    assert b"missing" in replies[0][2]
    assert c.phase == P.OPTIONS
    assert send_option(c, P.OPT_GO, name_and_requests(""))[-1][1] == P.REP_ACK
    assert c.phase == P.TRANSMISSION


@pytest.mark.parametrize("data", [
    b"",  # no name length
    b"\x00\x00\x00\x05ab",  # name longer than the data
    name_and_requests("")[:-1],  # no request count
    name_and_requests("", 1)[:-1],  # a request count larger than what follows
    name_and_requests("", 1) + b"\x00",  # trailing garbage
    struct.pack(">I", 10_000) + b"x" * 10_000 + b"\x00\x00",  # name over 4096 bytes
    struct.pack(">I", 2) + b"\xff\xfe" + b"\x00\x00",  # not UTF-8
])
def test_info_go_malformed_is_invalid(data):
    for opt in (P.OPT_INFO, P.OPT_GO):
        c = new_conn()
        replies = send_option(c, opt, data)
        assert [t for _, t, _ in replies] == [P.REP_ERR_INVALID]
        assert c.phase == P.OPTIONS


def test_structured_reply_negotiation():
    c = new_conn()
    assert send_option(c, P.OPT_STRUCTURED_REPLY) == [(P.OPT_STRUCTURED_REPLY, P.REP_ACK, b"")]
    assert c.structured
    infos = info_replies(send_option(c, P.OPT_GO, name_and_requests("")))
    _, _, tflags = struct.unpack(">HQH", infos[P.INFO_EXPORT])
    assert tflags & P.TF_SEND_DF


def test_structured_reply_with_data_is_invalid():
    c = new_conn()
    assert [t for _, t, _ in send_option(c, P.OPT_STRUCTURED_REPLY, b"x")] == [P.REP_ERR_INVALID]
    assert not c.structured and c.phase == P.OPTIONS


@pytest.mark.parametrize("opt", [P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT])
def test_meta_context_before_structured_is_invalid(opt):
    c = new_conn()
    replies = send_option(c, opt, meta_request("", P.META_BASE_ALLOCATION))
    assert [t for _, t, _ in replies] == [P.REP_ERR_INVALID]
    assert c.meta_contexts == {} and c.phase == P.OPTIONS


@pytest.mark.parametrize("queries", [(), ("base:",), ("base:allocation",),
                                     ("base:allocation", "qemu:dirty-bitmap:x")])
def test_list_meta_context_offers_base_allocation(queries):
    c = new_conn()
    send_option(c, P.OPT_STRUCTURED_REPLY)
    replies = send_option(c, P.OPT_LIST_META_CONTEXT, meta_request("", *queries))
    assert replies[-1][1] == P.REP_ACK
    contexts = [d for _, t, d in replies if t == P.REP_META_CONTEXT]
    assert contexts == [struct.pack(">I", 0) + b"base:allocation"]
    assert c.meta_contexts == {}  # listing selects nothing


def test_list_meta_context_unknown_namespace_lists_nothing():
    c = new_conn()
    send_option(c, P.OPT_STRUCTURED_REPLY)
    replies = send_option(c, P.OPT_LIST_META_CONTEXT, meta_request("", "qemu:dirty-bitmap:a"))
    assert [t for _, t, _ in replies] == [P.REP_ACK]


def test_set_meta_context_selects_base_allocation():
    c = new_conn()
    send_option(c, P.OPT_STRUCTURED_REPLY)
    replies = send_option(c, P.OPT_SET_META_CONTEXT,
                          meta_request("", "qemu:dirty-bitmap:a", P.META_BASE_ALLOCATION))
    assert replies[-1][1] == P.REP_ACK
    contexts = [d for _, t, d in replies if t == P.REP_META_CONTEXT]
    assert len(contexts) == 1
    (ctx_id,) = struct.unpack_from(">I", contexts[0])
    assert ctx_id != 0 and contexts[0][4:] == b"base:allocation"
    assert c.meta_contexts == {ctx_id: P.META_BASE_ALLOCATION}
    # Setting again with nothing known clears the selection.
    send_option(c, P.OPT_SET_META_CONTEXT, meta_request("", "other:thing"))
    assert c.meta_contexts == {}


def test_meta_context_unknown_export():
    c = new_conn()
    send_option(c, P.OPT_STRUCTURED_REPLY)
    replies = send_option(c, P.OPT_SET_META_CONTEXT, meta_request("nope", "base:allocation"))
    assert [t for _, t, _ in replies] == [P.REP_ERR_UNKNOWN]


@pytest.mark.parametrize("data", [
    b"",
    meta_request("", "base:allocation")[:-3],  # query cut short
    meta_request("", "base:allocation") + b"!",  # trailing bytes
    struct.pack(">I", 0) + struct.pack(">I", 5),  # five queries, none present
])
def test_meta_context_malformed_is_invalid(data):
    c = new_conn()
    send_option(c, P.OPT_STRUCTURED_REPLY)
    assert [t for _, t, _ in send_option(c, P.OPT_SET_META_CONTEXT, data)] == [P.REP_ERR_INVALID]
    assert c.phase == P.OPTIONS


@pytest.mark.parametrize("opt", [4, 11, 99, 0xFFFF, 0x7FFFFFFF])
def test_unknown_option_is_unsupported_and_session_goes_on(opt):
    c = new_conn()
    replies = send_option(c, opt, b"whatever data")
    assert len(replies) == 1
    ropt, rtype, _ = replies[0]
    assert (ropt, rtype) == (opt, P.REP_ERR_UNSUP)
    assert send_option(c, P.OPT_GO, name_and_requests(""))[-1][1] == P.REP_ACK
    assert c.phase == P.TRANSMISSION


def test_starttls_is_refused_and_session_goes_on():
    c = new_conn()
    replies = send_option(c, P.OPT_STARTTLS)
    assert [t for _, t, _ in replies] == [P.REP_ERR_POLICY]
    assert c.phase == P.OPTIONS


def test_over_long_option_closes_before_its_data_arrives():
    c = new_conn()
    c.receive_data(struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, P.MAX_OPTION_LENGTH + 1))
    assert c.phase == P.CLOSED
    assert "too long" in c.close_reason


def test_option_exactly_max_length_is_answered():
    c = new_conn()
    replies = send_option(c, 99, bytes(P.MAX_OPTION_LENGTH))
    assert [t for _, t, _ in replies] == [P.REP_ERR_UNSUP]


def test_bad_option_magic_closes():
    c = new_conn()
    c.receive_data(struct.pack(">QII", 0x1122334455667788, P.OPT_LIST, 0))
    assert c.phase == P.CLOSED
    assert "magic" in c.close_reason
    assert c.data_to_send() == b""


def test_handshake_fed_one_byte_at_a_time():
    stream = (struct.pack(">I", 3) + option(P.OPT_STRUCTURED_REPLY) + option(P.OPT_LIST)
              + option(P.OPT_GO, name_and_requests("ro")))
    whole = P.ServerConnection(exports())
    whole.data_to_send()
    whole.receive_data(stream)
    bytewise = P.ServerConnection(exports())
    bytewise.data_to_send()
    out = b""
    for i in range(len(stream)):
        bytewise.receive_data(stream[i:i + 1])
        out += bytewise.data_to_send()
    assert out == whole.data_to_send()
    assert bytewise.phase == whole.phase == P.TRANSMISSION
    assert bytewise.structured


def test_bytes_after_go_are_left_over_for_transmission():
    c = new_conn()
    req = struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, 7, 0, 512)
    c.receive_data(option(P.OPT_GO, name_and_requests("")) + req)
    assert c.phase == P.TRANSMISSION
    assert c.take_leftover() == req
    assert c.take_leftover() == b""


def test_options_after_abort_are_ignored():
    c = new_conn()
    c.receive_data(option(P.OPT_ABORT) + option(P.OPT_LIST))
    assert parse_replies(c.data_to_send()) == [(P.OPT_ABORT, P.REP_ACK, b"")]
    assert c.phase == P.CLOSED


# --- transmission: parsing requests -------------------------------------------

def request(cmd: int, offset: int = 0, length: int = 512, handle: int = 1, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


def parse(c: P.ServerConnection, data: bytes, start: int = 0):
    buf = bytearray(data)
    out: list = []
    new_start = c.parse_requests(buf, start, len(buf), out)
    return new_start, out, buf


def one(c: P.ServerConnection, data: bytes) -> tuple:
    new_start, out, _ = parse(c, data)
    assert new_start == len(data)
    assert len(out) == 1
    return out[0]


def error_of(c: P.ServerConnection, data: bytes) -> int:
    return one(c, data)[6]


def test_pipelined_requests_in_one_buffer():
    c = in_transmission()
    payload = b"w" * 100
    data = (request(P.CMD_READ, 0, 4096, handle=1) + request(P.CMD_WRITE, 4096, 100, handle=2,
                                                             flags=P.CMD_FLAG_FUA, payload=payload)
            + request(P.CMD_FLUSH, 0, 0, handle=3) + request(P.CMD_DISC, 0, 0, handle=4))
    new_start, out, buf = parse(c, data)
    assert new_start == len(data)
    assert [(r[0], r[2], r[6]) for r in out] == [
        (P.CMD_READ, 1, 0), (P.CMD_WRITE, 2, 0), (P.CMD_FLUSH, 3, 0), (P.CMD_DISC, 4, 0)]
    cmd, flags, handle, offset, length, pstart, err = out[1]
    assert (flags, offset, length) == (P.CMD_FLAG_FUA, 4096, 100)
    assert bytes(buf[pstart:pstart + length]) == payload
    assert out[0][5] == -1  # no payload for a read


def test_requests_are_typed():
    c = in_transmission()
    (req,) = parse(c, request(P.CMD_WRITE, 4096, 3, handle=9, flags=P.CMD_FLAG_FUA,
                              payload=b"abc"))[1]
    assert isinstance(req, P.Request)
    assert req == P.Request(P.CMD_WRITE, P.CMD_FLAG_FUA, 9, 4096, 3, P.REQUEST_SIZE, 0)
    assert (req.command, req.handle, req.payload_start, req.error) == (P.CMD_WRITE, 9, 28, 0)
    (bad,) = parse(c, request(42, 0, 0, handle=2))[1]
    assert (bad.command, bad.error) == (P.CMD_UNKNOWN, P.NBD_EINVAL)


def test_write_payload_at_says_what_the_transport_must_buffer():
    write = request(P.CMD_WRITE, 0, 1000, handle=1)
    assert P.write_payload_at(write, 0, len(write)) == 1000
    assert P.write_payload_at(write, 0, P.REQUEST_SIZE - 1) == -1  # header not all there
    buf = bytearray(b"x" * 5) + write
    assert P.write_payload_at(buf, 5, len(buf)) == 1000
    read = request(P.CMD_READ, 0, 1 << 20)
    assert P.write_payload_at(read, 0, len(read)) == -1  # no payload
    huge = request(P.CMD_WRITE, 0, P.MAX_ACCEPTED + 1)
    assert P.write_payload_at(huge, 0, len(huge)) == -1  # skipped as it arrives, never held


def test_partial_request_header_waits():
    c = in_transmission()
    data = request(P.CMD_READ, 512, 512, handle=9)
    for cut in (1, 10, 27):
        new_start, out, _ = parse(c, data[:cut])
        assert (new_start, out) == (0, [])
    assert one(c, data)[:5] == (P.CMD_READ, 0, 9, 512, 512)


def test_requests_split_across_buffers_resume_where_they_stopped():
    c = in_transmission()
    data = request(P.CMD_READ, 0, 512, handle=1) + request(P.CMD_READ, 512, 512, handle=2)
    buf = bytearray(data)
    out: list = []
    start = c.parse_requests(buf, 0, 40, out)  # one and a bit
    assert start == 28 and [r[2] for r in out] == [1]
    start = c.parse_requests(buf, start, len(buf), out)
    assert start == len(buf) and [r[2] for r in out] == [1, 2]


def test_write_payload_split_across_reads():
    c = in_transmission()
    payload = bytes(range(256)) * 64  # 16 KiB
    data = request(P.CMD_WRITE, 8192, len(payload), handle=5, payload=payload)
    for cut in (28, 29, 28 + 8000, len(data) - 1):
        new_start, out, _ = parse(c, data[:cut])
        assert (new_start, out) == (0, []), cut
    new_start, out, buf = parse(c, data)
    assert new_start == len(data)
    _, _, handle, offset, length, pstart, err = out[0]
    assert (handle, offset, length, err) == (5, 8192, len(payload), 0)
    assert bytes(buf[pstart:pstart + length]) == payload


def test_parse_from_a_nonzero_start():
    c = in_transmission()
    data = b"junk-already-consumed" + request(P.CMD_READ, 0, 1, handle=3)
    new_start, out, _ = parse(c, data, start=len(b"junk-already-consumed"))
    assert new_start == len(data) and out[0][2] == 3


def test_handle_is_passed_through_as_64_bits():
    c = in_transmission()
    assert one(c, request(P.CMD_READ, handle=0xDEADBEEFCAFEF00D))[2] == 0xDEADBEEFCAFEF00D


def test_bad_magic_is_a_protocol_error():
    c = in_transmission()
    bad = struct.pack(">IHHQQI", 0x12345678, 0, P.CMD_READ, 1, 0, 512)
    with pytest.raises(P.ProtocolError, match="magic"):
        parse(c, bad)


def test_valid_requests_before_bad_magic_are_parsed_first():
    c = in_transmission()
    buf = bytearray(request(P.CMD_READ, handle=1) + b"\x00" * 28)
    out: list = []
    with pytest.raises(P.ProtocolError):
        c.parse_requests(buf, 0, len(buf), out)
    assert [r[2] for r in out] == [1]


@pytest.mark.parametrize("cmd,offset,length,expected", [
    (P.CMD_READ, SIZE - 511, 512, P.NBD_EINVAL),  # past the end
    (P.CMD_READ, SIZE, 1, P.NBD_EINVAL),
    (P.CMD_READ, 2**64 - 512, 1024, P.NBD_EINVAL),  # wraps around in 64 bits
    (P.CMD_READ, 0, 0, P.NBD_EINVAL),  # zero length
    (P.CMD_READ, 0, P.MAX_PAYLOAD + 1, P.NBD_EINVAL),  # too large, simple replies
    (P.CMD_READ, 0, SIZE, 0),  # the whole disk
    (P.CMD_READ, SIZE - 1, 1, 0),  # the last byte
    (P.CMD_TRIM, SIZE - 511, 512, P.NBD_EINVAL),
    (P.CMD_TRIM, 0, 0, P.NBD_EINVAL),
    (P.CMD_CACHE, SIZE, 512, P.NBD_EINVAL),
    (P.CMD_CACHE, 0, 4096, 0),
    (P.CMD_WRITE_ZEROES, SIZE - 511, 512, P.NBD_ENOSPC),
    (P.CMD_WRITE_ZEROES, 0, 0, P.NBD_EINVAL),
    (P.CMD_WRITE_ZEROES, 0, SIZE, 0),  # no payload: may exceed MAX_PAYLOAD
    (P.CMD_FLUSH, 0, 0, 0),
    (P.CMD_DISC, 0, 0, 0),
    (8, 0, 512, P.NBD_EINVAL),  # unknown command
    (0xFFFF, 0, 0, P.NBD_EINVAL),
])
def test_validation(cmd, offset, length, expected):
    c = in_transmission()
    assert error_of(c, request(cmd, offset, length)) == expected


def test_too_large_read_is_eoverflow_with_structured_replies():
    c = in_transmission(structured=True)
    assert error_of(c, request(P.CMD_READ, 0, P.MAX_ACCEPTED + 1)) == P.NBD_EOVERFLOW


def test_write_past_end_is_enospc():
    c = in_transmission()
    assert error_of(c, request(P.CMD_WRITE, SIZE - 1, 2, payload=b"ab")) == P.NBD_ENOSPC
    assert error_of(c, request(P.CMD_WRITE, SIZE - 2, 2, payload=b"ab")) == 0


def test_zero_length_write_is_invalid():
    c = in_transmission()
    assert error_of(c, request(P.CMD_WRITE, 0, 0)) == P.NBD_EINVAL


def test_too_large_write_payload_is_skipped_with_einval():
    c = in_transmission()
    length = P.MAX_ACCEPTED + 4096
    data = request(P.CMD_WRITE, 0, length, handle=7, payload=bytes(length)) + request(
        P.CMD_READ, 0, 512, handle=8)
    new_start, out, _ = parse(c, data)
    assert new_start == len(data)
    assert [(r[2], r[6]) for r in out] == [(7, P.NBD_EINVAL), (8, 0)]


def test_a_huge_write_is_skipped_as_it_arrives():
    """A 4 GiB write's payload is thrown away piece by piece: the parser
    never waits for it whole (memory), and the session stays in step."""
    c = in_transmission()
    length = 0xFFFFFFFF
    buf = bytearray(request(P.CMD_WRITE, 0, length, handle=7) + bytes(1000))
    out: list = []
    start = c.parse_requests(buf, 0, len(buf), out)
    assert start == len(buf) and [(r[2], r[6]) for r in out] == [(7, P.NBD_EINVAL)]
    assert c.skip == length - 1000
    c.skip = 10  # as if the rest had come
    buf = bytearray(bytes(10) + request(P.CMD_READ, 0, 512, handle=8))
    out = []
    assert c.parse_requests(buf, 0, len(buf), out) == len(buf)
    assert [(r[2], r[6]) for r in out] == [(8, 0)] and c.skip == 0


def big_export_conn(**export_kw) -> P.ServerConnection:
    kw = dict(name="", size=1 << 30, readonly=False, can_fua=True)
    kw.update(export_kw)
    c = P.ServerConnection({"": P.Export(**kw)})
    c.data_to_send()
    c.receive_data(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
    assert send_option(c, P.OPT_GO, name_and_requests(""))[-1][1] == P.REP_ACK
    return c


def test_a_write_up_to_64_mib_is_accepted():
    c = big_export_conn()
    length = P.MAX_ACCEPTED
    out = parse(c, request(P.CMD_WRITE, 0, length, payload=bytes(length)))[1]
    assert out[0][6] == 0
    assert error_of(c, request(P.CMD_READ, 0, length)) == 0
    assert error_of(c, request(P.CMD_READ, 0, length + 1)) == P.NBD_EINVAL


# --- spec corners the hardening review found -------------------------------------

def test_failed_set_meta_context_clears_the_contexts():
    c = new_conn()
    send_option(c, P.OPT_STRUCTURED_REPLY)
    replies = send_option(c, P.OPT_SET_META_CONTEXT, meta_request("", P.META_BASE_ALLOCATION))
    assert replies[0][1] == P.REP_META_CONTEXT and c.meta_contexts
    replies = send_option(c, P.OPT_SET_META_CONTEXT, meta_request("no-such-export",
                                                                  P.META_BASE_ALLOCATION))
    assert replies[-1][1] == P.REP_ERR_UNKNOWN
    assert c.meta_contexts == {}
    send_option(c, P.OPT_GO, name_and_requests(""))
    assert error_of(c, request(P.CMD_BLOCK_STATUS, 0, 512)) == P.NBD_EINVAL


def test_block_status_only_on_the_export_the_context_was_set_for():
    c = new_conn()
    send_option(c, P.OPT_STRUCTURED_REPLY)
    send_option(c, P.OPT_SET_META_CONTEXT, meta_request("plain", P.META_BASE_ALLOCATION))
    assert send_option(c, P.OPT_GO, name_and_requests(""))[-1][1] == P.REP_ACK
    assert error_of(c, request(P.CMD_BLOCK_STATUS, 0, 512)) == P.NBD_EINVAL
    # the same export by its default name ("") works
    c = new_conn()
    send_option(c, P.OPT_STRUCTURED_REPLY)
    send_option(c, P.OPT_SET_META_CONTEXT, meta_request("", P.META_BASE_ALLOCATION))
    send_option(c, P.OPT_GO, name_and_requests(""))
    assert error_of(c, request(P.CMD_BLOCK_STATUS, 0, 512)) == 0


@pytest.mark.parametrize("cmd,length,payload", [
    (P.CMD_READ, 512, b""), (P.CMD_FLUSH, 0, b""), (P.CMD_CACHE, 512, b"")])
def test_fua_where_not_advertised_is_einval(cmd, length, payload):
    c = in_transmission("ro")  # read-only: SEND_FUA is not advertised
    assert not P.Export(name="ro", size=1).transmission_flags(False) & P.TF_SEND_FUA
    assert error_of(c, request(cmd, 0, length, flags=P.CMD_FLAG_FUA, payload=payload)) == \
        P.NBD_EINVAL
    assert error_of(c, request(cmd, 0, length, payload=payload)) == 0


def test_requests_below_the_minimum_block_size_are_einval():
    c = big_export_conn(block_size=(512, 4096, P.MAX_PAYLOAD))
    assert error_of(c, request(P.CMD_READ, 512, 1024)) == 0
    for cmd, off, n in ((P.CMD_READ, 1, 512), (P.CMD_READ, 0, 100),
                        (P.CMD_WRITE_ZEROES, 0, 513), (P.CMD_TRIM, 10, 512)):
        assert error_of(c, request(cmd, off, n)) == P.NBD_EINVAL, (cmd, off, n)
    assert error_of(c, request(P.CMD_WRITE, 3, 512, payload=bytes(512))) == P.NBD_EINVAL
    assert error_of(c, request(P.CMD_FLUSH, 0, 0)) == 0


def test_export_name_clients_are_not_held_to_a_block_size_they_never_saw():
    c = P.ServerConnection({"": P.Export(name="", size=1 << 20,
                                          block_size=(512, 4096, P.MAX_PAYLOAD))})
    c.data_to_send()
    c.receive_data(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
                   + option(P.OPT_EXPORT_NAME, b""))
    assert c.phase == P.TRANSMISSION
    assert error_of(c, request(P.CMD_READ, 1, 100)) == 0


def test_error_messages_are_never_cut_inside_a_character():
    c = in_transmission(structured=True)
    reply = c.reply_error(5, P.NBD_EIO, "é" * P.MAX_STRING)  # 2 bytes each
    (mlen,) = struct.unpack_from(">H", reply, 24)
    msg = reply[26:26 + mlen]
    assert mlen <= P.MAX_STRING and msg.decode("utf-8") == "é" * (mlen // 2)
    c = new_conn()
    name = "€" * 3000  # 3 bytes each: the error text is over MAX_STRING
    replies = send_option(c, P.OPT_INFO, name_and_requests(name))
    assert replies[-1][1] == P.REP_ERR_UNKNOWN or replies[-1][1] == P.REP_ERR_INVALID
    replies[-1][2].decode("utf-8")  # whole characters only
    assert P.utf8_prefix("a€", 3) == b"a"


@pytest.mark.parametrize("cmd,payload", [
    (P.CMD_WRITE, b"x" * 512), (P.CMD_TRIM, b""), (P.CMD_WRITE_ZEROES, b"")])
def test_writes_to_read_only_export_are_eperm(cmd, payload):
    c = in_transmission("ro")
    assert error_of(c, request(cmd, 0, 512, payload=payload)) == P.NBD_EPERM
    # Reads, flush and cache are fine.
    assert error_of(c, request(P.CMD_READ, 0, 512)) == 0
    assert error_of(c, request(P.CMD_FLUSH, 0, 0)) == 0
    assert error_of(c, request(P.CMD_CACHE, 0, 512)) == 0


def test_read_only_write_past_end_is_still_enospc():
    c = in_transmission("ro")
    assert error_of(c, request(P.CMD_WRITE, 8192, 1, payload=b"x")) == P.NBD_ENOSPC


@pytest.mark.parametrize("cmd,flags", [
    (P.CMD_READ, P.CMD_FLAG_NO_HOLE),
    (P.CMD_READ, P.CMD_FLAG_REQ_ONE),
    (P.CMD_WRITE, P.CMD_FLAG_DF),
    (P.CMD_WRITE, P.CMD_FLAG_NO_HOLE),
    (P.CMD_TRIM, P.CMD_FLAG_NO_HOLE),
    (P.CMD_FLUSH, P.CMD_FLAG_DF),
    (P.CMD_CACHE, P.CMD_FLAG_NO_HOLE),
    (P.CMD_WRITE_ZEROES, P.CMD_FLAG_DF),
    (P.CMD_READ, 1 << 9),
    (P.CMD_WRITE_ZEROES, 1 << 15),
])
def test_bad_flags_are_einval(cmd, flags):
    c = in_transmission(structured=True, meta=True)
    payload = b"x" * 512 if cmd == P.CMD_WRITE else b""
    assert error_of(c, request(cmd, 0, 512, flags=flags, payload=payload)) == P.NBD_EINVAL


@pytest.mark.parametrize("cmd", [P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_CACHE,
                                 P.CMD_WRITE_ZEROES, P.CMD_BLOCK_STATUS])
def test_fua_is_accepted_on_every_command(cmd):
    # proto.md: with NBD_FLAG_SEND_FUA the server MUST accept FUA on all
    # commands, even by ignoring it (old qemu sets it on FLUSH).
    c = in_transmission(structured=True, meta=True)
    payload = b"x" * 512 if cmd == P.CMD_WRITE else b""
    length = 0 if cmd == P.CMD_FLUSH else 512
    assert error_of(c, request(cmd, 0, length, flags=P.CMD_FLAG_FUA, payload=payload)) == 0


def test_write_zeroes_flags():
    c = in_transmission()
    for flags in (P.CMD_FLAG_NO_HOLE, P.CMD_FLAG_FAST_ZERO, P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE):
        assert error_of(c, request(P.CMD_WRITE_ZEROES, 0, 512, flags=flags)) == 0


def test_fast_zero_without_support_is_einval():
    """proto.md: FAST_ZERO only if NBD_FLAG_SEND_FAST_ZERO was advertised;
    otherwise it is an unknown flag (EINVAL). ENOTSUP is for an advertised
    fast zero that cannot be done fast this time."""
    c = in_transmission("plain")
    assert error_of(c, request(P.CMD_WRITE_ZEROES, 0, 512, flags=P.CMD_FLAG_FAST_ZERO)) == \
        P.NBD_EINVAL
    assert error_of(c, request(P.CMD_WRITE_ZEROES, 0, 512)) == 0


def test_trim_without_support_is_einval():
    c = in_transmission("plain")
    assert error_of(c, request(P.CMD_TRIM, 0, 512)) == P.NBD_EINVAL


def test_df_needs_structured_replies():
    assert error_of(in_transmission(), request(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF)) == \
        P.NBD_EINVAL
    assert error_of(in_transmission(structured=True),
                    request(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF)) == 0


def test_block_status_needs_a_meta_context():
    assert error_of(in_transmission(), request(P.CMD_BLOCK_STATUS, 0, 512)) == P.NBD_EINVAL
    assert error_of(in_transmission(structured=True),
                    request(P.CMD_BLOCK_STATUS, 0, 512)) == P.NBD_EINVAL
    c = in_transmission(structured=True, meta=True)
    assert error_of(c, request(P.CMD_BLOCK_STATUS, 0, 512)) == 0
    assert error_of(c, request(P.CMD_BLOCK_STATUS, 0, SIZE, flags=P.CMD_FLAG_REQ_ONE)) == 0
    assert error_of(c, request(P.CMD_BLOCK_STATUS, SIZE, 1)) == P.NBD_EINVAL
    assert error_of(c, request(P.CMD_BLOCK_STATUS, 0, 0)) == P.NBD_EINVAL


def test_invalid_request_does_not_stop_the_ones_after_it():
    c = in_transmission()
    data = (request(P.CMD_READ, SIZE, 512, handle=1) + request(42, 0, 0, handle=2)
            + request(P.CMD_READ, 0, 512, handle=3))
    new_start, out, _ = parse(c, data)
    assert [(r[2], r[6]) for r in out] == [(1, P.NBD_EINVAL), (2, P.NBD_EINVAL), (3, 0)]


# --- replies -------------------------------------------------------------------

def test_simple_replies():
    c = in_transmission()
    assert c.reply_header(0x1122) == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 0, 0x1122)
    assert c.reply_header(5, P.NBD_EIO) == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 5, 5)
    assert c.reply_error(6, P.NBD_EPERM, "ignored in simple replies") == struct.pack(
        ">IIQ", P.SIMPLE_REPLY_MAGIC, P.NBD_EPERM, 6)
    assert c.read_data_header(7, 4096, 512) == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 0, 7)


def parse_chunk(data: bytes) -> tuple[int, int, int, bytes, bytes]:
    magic, flags, rtype, handle, length = struct.unpack_from(">IHHQI", data)
    assert magic == P.STRUCTURED_REPLY_MAGIC
    return flags, rtype, handle, data[20:20 + length], data[20 + length:]


def test_structured_none_chunk():
    c = in_transmission(structured=True)
    flags, rtype, handle, payload, rest = parse_chunk(c.reply_header(42))
    assert (flags, rtype, handle, payload, rest) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 42,
                                                      b"", b"")


def test_structured_error_chunk():
    c = in_transmission(structured=True)
    flags, rtype, handle, payload, rest = parse_chunk(c.reply_error(9, P.NBD_ENOSPC, "no room"))
    assert (flags, rtype, handle, rest) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, 9, b"")
    assert struct.unpack_from(">IH", payload) == (P.NBD_ENOSPC, 7)
    assert payload[6:] == b"no room"
    # reply_header with an error is an error chunk too
    assert parse_chunk(c.reply_header(3, P.NBD_EIO))[1] == P.REPLY_TYPE_ERROR


def test_structured_error_message_is_capped():
    c = in_transmission(structured=True)
    _, _, _, payload, _ = parse_chunk(c.reply_error(1, P.NBD_EIO, "x" * 10_000))
    assert struct.unpack_from(">IH", payload)[1] == P.MAX_STRING == len(payload) - 6


def test_structured_data_header():
    c = in_transmission(structured=True)
    header = c.read_data_header(11, 65536, 4096, done=False)
    magic, flags, rtype, handle, length, offset = struct.unpack(">IHHQIQ", header)
    assert (magic, flags, rtype, handle, length, offset) == (
        P.STRUCTURED_REPLY_MAGIC, 0, P.REPLY_TYPE_OFFSET_DATA, 11, 4096 + 8, 65536)
    assert struct.unpack(">IHHQIQ", c.read_data_header(11, 0, 1))[1] == P.REPLY_FLAG_DONE


def test_structured_hole_chunk():
    c = in_transmission(structured=True)
    flags, rtype, handle, payload, rest = parse_chunk(c.read_hole_chunk(4, 8192, 1 << 20, True))
    assert (flags, rtype, handle, rest) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_HOLE, 4, b"")
    assert struct.unpack(">QI", payload) == (8192, 1 << 20)
    assert parse_chunk(c.read_hole_chunk(4, 0, 1, False))[0] == 0


def test_refused_requests_get_the_protocols_reason():
    c = in_transmission(structured=True)
    for err, text in P.ERROR_TEXT.items():
        flags, rtype, handle, payload, rest = parse_chunk(c.reply_refused(3, err))
        assert (flags, rtype, handle, rest) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, 3, b"")
        assert struct.unpack_from(">IH", payload) == (err, len(text)) and payload[6:] == text.encode()
    assert in_transmission().reply_refused(4, P.NBD_ESHUTDOWN) == struct.pack(
        ">IIQ", P.SIMPLE_REPLY_MAGIC, P.NBD_ESHUTDOWN, 4)


def test_read_chunks_frame_data_and_holes_in_order():
    c = in_transmission(structured=True)
    out = c.read_chunks(8, 4096, [(512, b"a" * 512), (1024, None), (256, b"b" * 256)])
    assert out[1] == b"a" * 512 and out[4] == b"b" * 256
    assert struct.unpack(">IHHQIQ", out[0]) == (P.STRUCTURED_REPLY_MAGIC, 0,
                                                P.REPLY_TYPE_OFFSET_DATA, 8, 512 + 8, 4096)
    flags, rtype, handle, payload, _ = parse_chunk(out[2])
    assert (flags, rtype, handle) == (0, P.REPLY_TYPE_OFFSET_HOLE, 8)
    assert struct.unpack(">QI", payload) == (4096 + 512, 1024)
    assert struct.unpack(">IHHQIQ", out[3]) == (P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                                P.REPLY_TYPE_OFFSET_DATA, 8, 256 + 8,
                                                4096 + 512 + 1024)
    assert len(out) == 5
    # a hole at the end carries DONE
    assert parse_chunk(c.read_chunks(8, 0, [(512, None)])[0])[0] == P.REPLY_FLAG_DONE


def test_block_status_chunk():
    c = in_transmission(structured=True, meta=True)
    (ctx_id,) = c.meta_contexts
    flags, rtype, handle, payload, rest = parse_chunk(
        c.reply_block_status(77, [(4096, 0), (8192, 3)]))
    assert (flags, rtype, handle, rest) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, 77, b"")
    assert struct.unpack(">IIIII", payload) == (ctx_id, 4096, 0, 8192, 3)


# --- clip_extents ----------------------------------------------------------------

@pytest.mark.parametrize("extents,offset,length,req_one,expected", [
    # exactly covering
    ([(0, 100, 0)], 0, 100, False, [(100, 0)]),
    # clipped at both ends
    ([(0, 100, 3), (100, 100, 0)], 50, 100, False, [(50, 3), (50, 0)]),
    # neighbours with equal flags merge
    ([(0, 10, 0), (10, 10, 0), (20, 10, 3)], 0, 30, False, [(20, 0), (10, 3)]),
    # extents before the offset are skipped
    ([(0, 10, 3), (10, 10, 0)], 10, 10, False, [(10, 0)]),
    # a gap the source left counts as data
    ([(0, 10, 3), (20, 10, 3)], 0, 30, False, [(10, 3), (10, 0), (10, 3)]),
    # a gap at the start
    ([(20, 10, 3)], 0, 30, False, [(20, 0), (10, 3)]),
    # extents past the range are ignored
    ([(0, 10, 1), (10, 1000, 0)], 0, 15, False, [(10, 1), (5, 0)]),
    # nothing known: data
    ([], 0, 4096, False, [(4096, 0)]),
    # only the first with REQ_ONE
    ([(0, 10, 3), (10, 10, 0)], 0, 20, True, [(10, 3)]),
    # flags beyond base:allocation's two bits are dropped
    ([(0, 10, 0xFF)], 0, 10, False, [(10, 3)]),
    # source extents shorter than the request: the rest is not described
    ([(0, 10, 3)], 0, 100, False, [(10, 3)]),
])
def test_clip_extents(extents, offset, length, req_one, expected):
    assert P.clip_extents(extents, offset, length, req_one) == expected


def test_clip_extents_splits_descriptors_over_4_gib():
    got = P.clip_extents([(0, 10 << 30, 3)], 0, 10 << 30, False)
    assert all(n <= 0xFFFFFFFF for n, _ in got)
    assert sum(n for n, _ in got) == 10 << 30
    assert {f for _, f in got} == {3}


def test_clip_extents_is_contiguous_from_offset():
    exts = [(0, 4096, 3), (4096, 4096, 0), (8192, 100, 3), (9000, 5000, 0)]
    got = P.clip_extents(exts, 1000, 12000, False)
    assert sum(n for n, _ in got) == 12000
    assert all(n > 0 for n, _ in got)
    assert all(a[1] != b[1] for a, b in zip(got, got[1:], strict=False))


def test_wire_error_mapping():
    import errno
    assert P.wire_error(errno.EROFS) == P.NBD_EPERM
    assert P.wire_error(errno.EFBIG) == P.NBD_ENOSPC
    assert P.wire_error(errno.ENOENT) == P.NBD_EIO
    assert P.wire_error(None) == P.NBD_EIO


def test_phases_follow_the_transition_table():
    c = P.ServerConnection(exports())
    seen = [c.phase]
    c.receive_data(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
    seen.append(c.phase)
    c.receive_data(option(P.OPT_GO, name_and_requests("")))
    seen.append(c.phase)
    assert seen == [P.HANDSHAKE_FLAGS, P.OPTIONS, P.TRANSMISSION]
    assert all(b in P.TRANSITIONS[a] for a, b in zip(seen, seen[1:], strict=False))
    # closed is for good: bytes after it wait, nothing more is parsed or sent
    c = P.ServerConnection(exports())
    c.data_to_send()
    c.receive_data(struct.pack(">I", 1 << 7))
    assert c.phase == P.CLOSED and P.TRANSITIONS[P.CLOSED] == frozenset()
    c.receive_data(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE) + option(P.OPT_LIST))
    assert c.phase == P.CLOSED and c.data_to_send() == b""
    with pytest.raises(RuntimeError, match="no way from closed to options"):
        c._to(P.OPTIONS)
