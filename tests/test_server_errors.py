"""Error paths: every bad request gets the error the spec asks for, every
broken connection closes alone, and the server and the other connections go
on. libnbd (with its client-side checks off) sends what it can; raw sockets
send the rest. Every socket read has a timeout, so nothing here can hang."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from fixtures_server import (
    IMAGE_SIZE,
    RANDOM,
    MiB,
    nbd_handle,
    raw_handshake,
    raw_request,
    raw_simple_reply,
    read_at,
    recv_exact,
    recv_until_closed,
    wait_until,
)

from diskwatch.server import protocol as P

nbd = pytest.importorskip("nbd")
pytestmark = pytest.mark.usefixtures("no_loop_errors")


def still_serves(served, image_path, h=None) -> None:
    """The server answers: an existing connection (if given) and a new one
    both read correct data."""
    off = RANDOM[0] + 4096
    expect = read_at(image_path, off, 8192)
    if h is not None:
        assert h.pread(8192, off) == expect
    h2 = nbd_handle(served.uri)
    assert h2.pread(8192, off) == expect
    h2.shutdown()


def nbd_errno(excinfo) -> int:
    return excinfo.value.errnum


# --- errors libnbd can send (strict mode off) -------------------------------------

@pytest.mark.parametrize("structured", [True, False])
def test_read_out_of_range_is_einval(ro_server, server_image, structured):
    h = nbd_handle(ro_server.uri, strict=False, structured=structured)
    for offset, length in ((IMAGE_SIZE, 512), (IMAGE_SIZE - 511, 512), (2**63, 512)):
        with pytest.raises(nbd.Error) as e:
            h.pread(length, offset)
        assert nbd_errno(e) == errno.EINVAL
    still_serves(ro_server, server_image.path, h)
    h.shutdown()


def test_write_past_end_is_enospc(rw_server, rw_image):
    h = nbd_handle(rw_server.uri, strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 1024, IMAGE_SIZE - 512)
    assert nbd_errno(e) == errno.ENOSPC
    with pytest.raises(nbd.Error) as e:
        h.zero(1024, IMAGE_SIZE - 512)
    assert nbd_errno(e) == errno.ENOSPC
    assert read_at(rw_image, IMAGE_SIZE - 512, 512) == bytes(512)  # nothing written
    h.pwrite(b"y" * 512, IMAGE_SIZE - 512)  # the last sector is fine
    assert read_at(rw_image, IMAGE_SIZE - 512, 512) == b"y" * 512
    h.shutdown()


@pytest.mark.parametrize("structured,expected", [(True, {errno.EOVERFLOW, errno.EINVAL}),
                                                 (False, {errno.EINVAL})])
def test_too_large_read(ro_server, server_image, structured, expected):
    h = nbd_handle(ro_server.uri, strict=False, structured=structured)
    with pytest.raises(nbd.Error) as e:
        h.pread(P.MAX_PAYLOAD + 4096, 0)
    assert nbd_errno(e) in expected
    still_serves(ro_server, server_image.path, h)
    h.shutdown()


def test_write_over_the_advertised_maximum_up_to_64_mib_is_served(serve, tmp_path):
    """Above NBD_INFO_BLOCK_SIZE's 32 MiB and up to nbdkit's 64 MiB, a write
    is served (clients that used NBD_OPT_EXPORT_NAME never saw the 32);
    beyond, see test_a_huge_write_is_refused_and_skipped_as_it_arrives."""
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(64 * MiB)
    served = serve(big)
    h = nbd_handle(served.uri, strict=False)
    h.pwrite(b"z" * (P.MAX_PAYLOAD + 4096), 0)
    assert read_at(big, P.MAX_PAYLOAD, 4096) == b"z" * 4096
    h.pwrite(b"ok", 10)
    assert h.pread(2, 10) == b"ok"
    h.shutdown()


@pytest.mark.parametrize("op", ["pwrite", "trim", "zero"])
def test_read_only_export_is_eperm(ro_server, server_image, op):
    h = nbd_handle(ro_server.uri, strict=False)
    with pytest.raises(nbd.Error) as e:
        if op == "pwrite":
            h.pwrite(b"x" * 512, 0)
        elif op == "trim":
            h.trim(512, 0)
        else:
            h.zero(512, 0)
    assert nbd_errno(e) == errno.EPERM
    still_serves(ro_server, server_image.path, h)
    h.shutdown()


def test_bad_flags_from_libnbd_are_einval(ro_server):
    h = nbd_handle(ro_server.uri, strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE)
    assert nbd_errno(e) == errno.EINVAL
    assert h.pread(512, 0)
    h.shutdown()


# --- raw sockets: what libnbd will not send --------------------------------------

@pytest.fixture
def bystander(ro_server):
    """A connection opened before the misbehaving one, checked afterwards."""
    h = nbd_handle(ro_server.uri)
    assert h.pread(512, 0)
    yield h
    h.shutdown()


def test_unknown_command_gets_einval_and_the_session_goes_on(ro_server, server_image):
    with ro_server.connect_raw() as s:
        raw_handshake(s)
        s.sendall(raw_request(42, 0, 512, handle=1) + raw_request(P.CMD_READ, 0, 512, handle=2))
        assert raw_simple_reply(s)[:2] == (P.NBD_EINVAL, 1)
        err, handle, data = raw_simple_reply(s, 512)
        assert (err, handle, data) == (0, 2, read_at(server_image.path, 0, 512))


def test_unknown_command_event_is_safe_for_every_consumer(ro_server):
    """The event of an unknown command must not break the stats or the trace."""
    import io

    from diskwatch.events import COMMAND_NAMES, Command
    from diskwatch.recording.format import encode_requests
    from diskwatch.sinks.stats import Stats
    from diskwatch.sinks.text_trace import TextTrace
    with ro_server.connect_raw() as s:
        raw_handshake(s)
        s.sendall(raw_request(9, 0, 512, handle=1) + raw_request(0xFFFF, 0, 512, handle=2))
        assert raw_simple_reply(s)[:2] == (P.NBD_EINVAL, 1)
        assert raw_simple_reply(s)[:2] == (P.NBD_EINVAL, 2)
    ro_server.events.wait_for(lambda log: sum(1 for e in log.requests if e.error) >= 2)
    events = [e for e in ro_server.events.requests if e.error]
    assert {e.command for e in events} == {Command.UNKNOWN}
    stats = Stats(IMAGE_SIZE)
    stats.add(events)
    assert stats.ops[Command.UNKNOWN] == 2 and stats.errors == 2
    out = io.StringIO()
    trace = TextTrace(out)
    trace.feed(events)
    trace.close()
    assert COMMAND_NAMES[Command.UNKNOWN] in out.getvalue()
    assert encode_requests(events)  # the recorder packs it too


def test_connect_and_close_at_once_many_times(ro_server, server_image, bystander):
    """Peers that go before the greeting is sent: the server thread survives."""
    for _ in range(500):
        s = socket.socket(socket.AF_UNIX)
        s.connect(ro_server.socket_path)
        s.close()
    still_serves(ro_server, server_image.path, bystander)


def test_structured_error_chunk_on_the_wire(ro_server):
    with ro_server.connect_raw() as s:
        raw_handshake(s, structured=True)
        s.sendall(raw_request(P.CMD_READ, IMAGE_SIZE, 512, handle=77))
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", recv_exact(s, 20))
        assert (magic, flags, rtype, handle) == (P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                                 P.REPLY_TYPE_ERROR, 77)
        body = recv_exact(s, length)
        err, mlen = struct.unpack_from(">IH", body)
        assert err == P.NBD_EINVAL and len(body) == 6 + mlen


def test_a_huge_write_is_refused_and_skipped_as_it_arrives(ro_server, server_image,
                                                          bystander):
    """A write over 64 MiB (nbdkit's limit) gets EINVAL once its payload has
    been thrown away, piece by piece, and the session goes on in step."""
    with ro_server.connect_raw() as s:
        raw_handshake(s)
        length = P.MAX_ACCEPTED + MiB
        s.sendall(raw_request(P.CMD_WRITE, 0, length, handle=1))
        chunk = bytes(MiB)
        for _ in range(length // MiB):
            s.sendall(chunk)
        s.sendall(raw_request(P.CMD_READ, 0, 512, handle=2))
        assert raw_simple_reply(s) == (P.NBD_EINVAL, 1, b"")
        assert raw_simple_reply(s, 512) == (0, 2, read_at(server_image.path, 0, 512))
    still_serves(ro_server, server_image.path, bystander)


def test_bad_request_magic_closes_after_answering_what_came_before(ro_server, server_image,
                                                                   bystander):
    with ro_server.connect_raw() as s:
        raw_handshake(s)
        bad = struct.pack(">IHHQQI", 0xBADC0FFE, 0, P.CMD_READ, 2, 0, 512)
        s.sendall(raw_request(P.CMD_READ, 0, 512, handle=1) + bad)
        err, handle, data = raw_simple_reply(s, 512)
        assert (err, handle) == (0, 1) and data == read_at(server_image.path, 0, 512)
        assert recv_until_closed(s) == b""
    still_serves(ro_server, server_image.path, bystander)


def test_truncated_request_header_then_eof(ro_server, server_image, bystander):
    with ro_server.connect_raw() as s:
        raw_handshake(s)
        s.sendall(raw_request(P.CMD_READ, 0, 512)[:13])
        s.shutdown(socket.SHUT_WR)
        assert recv_until_closed(s) == b""
    still_serves(ro_server, server_image.path, bystander)


def test_disconnect_mid_write_payload(rw_server, rw_image, server_image):
    h = nbd_handle(rw_server.uri)
    with rw_server.connect_raw() as s:
        raw_handshake(s)
        s.sendall(raw_request(P.CMD_WRITE, 0, 2 * MiB, handle=1) + b"\xee" * MiB)
    # the write never completed: nothing of it reached the image
    rw_server.events.wait_for(lambda log: len(log.closed_connections()) == 1)
    assert read_at(rw_image, 0, 4096) == read_at(server_image.path, 0, 4096)
    still_serves(rw_server, rw_image, h)
    h.shutdown()


def test_disconnect_with_replies_pending(ro_server, server_image, bystander):
    """Many big reads, then a reset before reading any reply."""
    s = ro_server.connect_raw()
    raw_handshake(s)
    s.sendall(b"".join(raw_request(P.CMD_READ, RANDOM[0], 4 * MiB, handle=i) for i in range(32)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    ro_server.events.wait_for(lambda log: len(log.closed_connections()) >= 1)
    still_serves(ro_server, server_image.path, bystander)


def test_requests_after_disc_are_ignored(ro_server, server_image):
    with ro_server.connect_raw() as s:
        raw_handshake(s)
        s.sendall(raw_request(P.CMD_DISC, 0, 0, handle=1) + raw_request(P.CMD_READ, 0, 512, 2))
        assert recv_until_closed(s) == b""  # DISC has no reply, and nothing after it runs
    ro_server.events.wait_for(lambda log: len(log.closed_connections()) == 1)
    assert [r.command for r in ro_server.events.requests] == [P.CMD_DISC]


# --- malformed handshakes ------------------------------------------------------------

def greeted(served) -> socket.socket:
    s = served.connect_raw()
    assert recv_exact(s, 18)[:16] == b"NBDMAGICIHAVEOPT"
    return s


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not NBD at all
    b"\xff\xff\xff\xff",  # unknown client flags
    struct.pack(">I", 3) + b"\x00" * 16,  # bad option magic
    struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, 0xFFFFFFFF),  # huge option
    struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 4) + b"nope",
])
def test_malformed_handshake_closes_that_connection(ro_server, server_image, bystander,
                                                    garbage):
    with greeted(ro_server) as s:
        s.sendall(garbage)
        assert recv_until_closed(s) == b""
    still_serves(ro_server, server_image.path, bystander)


def test_truncated_option_then_eof(ro_server, server_image, bystander):
    with greeted(ro_server) as s:
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, 100) + b"ab")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_closed(s) == b""
    still_serves(ro_server, server_image.path, bystander)


def test_eof_right_after_the_greeting(ro_server, server_image, bystander):
    with greeted(ro_server) as s:
        s.shutdown(socket.SHUT_WR)
        assert recv_until_closed(s) == b""
    still_serves(ro_server, server_image.path, bystander)


def test_abort_is_acknowledged(ro_server):
    with greeted(ro_server) as s:
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.OPT_ABORT, 0))
        data = recv_until_closed(s)
        assert struct.unpack(">QIII", data) == (P.OPT_REPLY_MAGIC, P.OPT_ABORT, P.REP_ACK, 0)


def test_unknown_option_then_go_works(ro_server, server_image):
    with greeted(ro_server) as s:
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, 1234, 3) + b"abc")
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        assert (opt, rtype) == (1234, P.REP_ERR_UNSUP)
        recv_exact(s, length)
        s.sendall(struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 0))
        size, _flags = struct.unpack(">QH", recv_exact(s, 10))  # no zeroes: we asked
        assert size == IMAGE_SIZE
        s.sendall(raw_request(P.CMD_READ, RANDOM[0], 4096, handle=5))
        assert raw_simple_reply(s, 4096) == (0, 5, read_at(server_image.path, RANDOM[0], 4096))


def test_many_broken_connections_in_a_row(ro_server, server_image, bystander):
    for i in range(50):
        with greeted(ro_server) as s:
            if i % 2:
                s.sendall(b"\x00\x00\x00\x03" + bytes(range(i)))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    still_serves(ro_server, server_image.path, bystander)
    # only the bystander is left (closes are seen when the loop next polls)
    wait_until(lambda: ro_server.running.server.connections == 1, what="connections to close")


def test_a_client_that_does_not_read_its_replies_is_paused(ro_server, server_image, bystander):
    """Back-pressure: requests pile up, replies cannot go out, the server stops
    reading that connection (memory bounded) and resumes once it drains."""
    n, size = 1500, 256 * 1024
    server = ro_server.running.server
    with ro_server.connect_raw(timeout=20) as s:
        raw_handshake(s)
        reqs = b"".join(raw_request(P.CMD_READ, (i * size) % (IMAGE_SIZE - size), size, handle=i)
                        for i in range(n))
        s.setblocking(False)
        sent = 0
        while sent < len(reqs):  # send until the server stops taking requests
            try:
                sent += s.send(reqs[sent:])
            except BlockingIOError:
                break
        wait_until(lambda: any(c.paused for c in list(server._conns.values())),
                   what="the connection to be paused")
        still_serves(ro_server, server_image.path, bystander)  # the others go on
        s.settimeout(20)
        s.sendall(reqs[sent:])
        for i in range(n):
            err, handle, data = raw_simple_reply(s, size)
            assert err == 0 and handle == i
            off = (i * size) % (IMAGE_SIZE - size)
            if i % 100 == 0:
                assert data == read_at(server_image.path, off, size)
