"""Hardening: a failing source never puts a wrong byte on the wire, spec
corners the review found, and hangs that must not happen. Real clients
(libnbd's ``nbd``) where they can send it, raw sockets where they cannot;
every socket read has a timeout and every test a pytest timeout."""

from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest
from fixtures_server import (
    HOLE1,
    RANDOM,
    EventLog,
    MiB,
    Served,
    nbd_handle,
    raw_handshake,
    raw_request,
    raw_simple_reply,
    read_at,
    recv_exact,
    recv_until_closed,
    wait_until,
)

from diskwatch.events import Bus
from diskwatch.server import protocol as P
from diskwatch.server import serve_in_thread
from diskwatch.sources.base import Layer, ReadOnly, Source
from diskwatch.sources.errors import ErrorInjection, ErrorRule, parse_error_rule
from diskwatch.sources.file import FileSource

nbd = pytest.importorskip("nbd")
# libnbd blocks in C, where a signal cannot stop it: the thread method ends the run instead
pytestmark = [pytest.mark.timeout(60, method="thread"), pytest.mark.usefixtures("no_loop_errors")]

KiB = 1024


class Blocking(Layer):
    """Declares the source blocking, so the server runs its calls in worker
    threads (the path network and xz sources take)."""

    blocking = True  # type: ignore[assignment]


@pytest.fixture
def serve_source(tmp_path):
    """Factory: ``serve_source(source)`` -> Served, for sources tests build."""
    started = []

    def start(source: Source, **kw) -> Served:
        bus = Bus()
        events = EventLog(bus)
        running = serve_in_thread({"": source}, bus,
                                  unix_path=str(tmp_path / f"h{len(started)}.sock"), **kw)
        served = Served(running, events)
        started.append((served, source))
        return served

    yield start
    for served, source in started:
        served.running.stop()
        source.close()


def structured_chunk(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """(flags, type, handle, payload) of one structured reply chunk."""
    magic, flags, rtype, handle, length = struct.unpack(">IHHQI", recv_exact(sock, 20))
    assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
    return flags, rtype, handle, recv_exact(sock, length)


def structured_reply(sock: socket.socket) -> list[tuple[int, int, int, bytes]]:
    """Every chunk of one reply, up to the one with DONE."""
    chunks = []
    while True:
        chunk = structured_chunk(sock)
        chunks.append(chunk)
        if chunk[0] & P.REPLY_FLAG_DONE:
            return chunks


# --- 1. a read that fails half-way ------------------------------------------------

#: a read that starts in the hole before RANDOM and ends inside it: extents
#: say hole then data, so a structured read is split into chunks
SPLIT_READ = (RANDOM[0] - 64 * KiB, 192 * KiB)
FAILING = f"ops=pread,errno=EIO,range={RANDOM[0] + 64 * KiB}-{RANDOM[0] + 128 * KiB}"


def failing_source(image: str, *, blocking: bool = False) -> Source:
    src: Source = ReadOnly(FileSource(image, readonly=True))
    if blocking:
        src = Blocking(src)
    return ErrorInjection(src, [parse_error_rule(FAILING)])


def test_error_rule_parsing():
    r = parse_error_rule("rate=25%,errno=ENOSPC,ops=pwrite+zero,range=1M-2M,after=3")
    assert r == ErrorRule(rate=0.25, err=errno.ENOSPC, ops=frozenset({"pwrite", "zero"}),
                          start=1 << 20, end=2 << 20, after=3)
    assert r.covers("zero", (2 << 20) - 1, 1) and not r.covers("zero", 2 << 20, 4096)
    assert not r.covers("pread", 1 << 20, 1)
    for bad in ("rate=2", "errno=EWHAT", "ops=read", "range=2M-1M", "speed=1", "rate"):
        with pytest.raises(ValueError):
            parse_error_rule(bad)


@pytest.mark.parametrize("blocking", [False, True])
def test_failing_structured_read_sends_only_an_error(server_image, serve_source, blocking):
    """The bug: the OFFSET_DATA header went out before pread, the error
    chunk took the place of the payload. Now the reply is one error chunk,
    and the next request is answered in step."""
    served = serve_source(failing_source(str(server_image.path), blocking=blocking))
    s = served.connect_raw()
    raw_handshake(s, structured=True)
    s.sendall(raw_request(P.CMD_READ, *SPLIT_READ, handle=7)
              + raw_request(P.CMD_READ, RANDOM[0], 4096, handle=8))
    replies: dict[int, list] = {}
    while len(replies) < 2 or not all(c[-1][0] & P.REPLY_FLAG_DONE for c in replies.values()):
        flags, rtype, handle, payload = structured_chunk(s)
        replies.setdefault(handle, []).append((flags, rtype, handle, payload))
    failed = replies[7]
    assert [c[1] for c in failed] == [P.REPLY_TYPE_ERROR], failed
    assert struct.unpack_from(">I", failed[0][3])[0] == P.NBD_EIO
    assert [c[1] for c in replies[8]] == [P.REPLY_TYPE_OFFSET_DATA]
    assert replies[8][0][3][8:] == read_at(server_image.path, RANDOM[0], 4096)
    s.close()


@pytest.mark.parametrize("blocking", [False, True])
@pytest.mark.parametrize("structured", [True, False])
def test_libnbd_sees_eio_then_reads_on(server_image, serve_source, structured, blocking):
    served = serve_source(failing_source(str(server_image.path), blocking=blocking))
    h = nbd_handle(served.uri, structured=structured)
    with pytest.raises(nbd.Error) as e:
        h.pread(SPLIT_READ[1], SPLIT_READ[0])
    assert e.value.errnum == errno.EIO
    # around the failing range, everything reads right, holes included
    for off, n in ((HOLE1[0], 256 * KiB), (RANDOM[0], 64 * KiB),
                   (RANDOM[0] + 128 * KiB, 512 * KiB), (SPLIT_READ[0], 64 * KiB)):
        assert h.pread(n, off) == read_at(server_image.path, off, n)
    h.shutdown()


class ShortReads(Layer):
    """A broken source: pread returns one byte less than asked."""

    def pread(self, offset, length):
        return self.inner.pread(offset, length)[:-1]

    def view_for(self, offset, length):
        return None


@pytest.mark.parametrize("blocking", [False, True])
def test_short_read_from_a_source_is_eio_not_a_desync(server_image, serve_source, blocking):
    src: Source = ShortReads(ReadOnly(FileSource(str(server_image.path), readonly=True)))
    if blocking:
        src = Blocking(src)
    served = serve_source(src)
    s = served.connect_raw()
    raw_handshake(s)
    s.sendall(raw_request(P.CMD_READ, RANDOM[0], 4096, handle=3)
              + raw_request(P.CMD_FLUSH, 0, 0, handle=4))
    # Replies may come in any order (in worker threads the flush can finish
    # first); a desync would show as a success for 3, or garbage for 4.
    replies = {raw_simple_reply(s), raw_simple_reply(s)}
    assert replies == {(P.NBD_EIO, 3, b""), (0, 4, b"")}
    s.close()


# --- 2. hangs ---------------------------------------------------------------------

def test_disc_with_unknown_flags_gets_no_reply_and_closes(ro_server):
    s = ro_server.connect_raw()
    raw_handshake(s)
    s.sendall(raw_request(P.CMD_DISC, 0, 0, handle=5, flags=0x8000))
    assert recv_until_closed(s) == b""  # no reply, and the server closed
    s.close()


def test_a_failing_callback_closes_the_socket(serve_source, server_image, caplog):
    """A bug while serving one connection (here: a subscriber that raises on
    the connection event) closes that connection: the peer sees EOF instead
    of waiting forever, and other connections go on."""
    served = serve_source(ReadOnly(FileSource(str(server_image.path), readonly=True)))

    def broken(event):
        if getattr(event, "opened", False) and event.conn == 1:
            raise RuntimeError("subscriber bug")
    served.running.server.bus.on_event(broken)
    s = served.connect_raw()
    with pytest.raises((EOFError, AssertionError)):
        raw_handshake(s)  # the GO reply never completes: the socket closes
    s.close()
    h = nbd_handle(served.uri)  # connection 2 is served
    assert h.pread(4096, RANDOM[0]) == read_at(server_image.path, RANDOM[0], 4096)
    h.shutdown()
    assert any("internal error" in r.getMessage() for r in caplog.records)
    caplog.clear()  # the logged error is this test's point


class SlowZero(Layer):
    """zero() blocks until released (a block device zeroing gigabytes)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.release = threading.Event()
        self.entered = threading.Event()

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        self.entered.set()
        self.release.wait(20)
        return self.inner.zero(offset, length, may_trim, fua, fast)


@pytest.mark.parametrize("cmd", [P.CMD_WRITE_ZEROES, P.CMD_TRIM])
def test_a_big_zero_does_not_stall_other_connections(serve_source, rw_image, cmd):
    src = SlowZero(FileSource(str(rw_image)))
    if cmd == P.CMD_TRIM:
        src.trim = lambda offset, length, fua=False: src.zero(offset, length)
    served = serve_source(src)
    a = served.connect_raw()
    raw_handshake(a)
    a.sendall(raw_request(cmd, 0, 16 * MiB, handle=1))
    assert src.entered.wait(10)
    # while the zero runs, another connection is served (every read times out)
    b = served.connect_raw(timeout=5)
    raw_handshake(b)
    b.sendall(raw_request(P.CMD_READ, RANDOM[0], 4096, handle=2))
    assert raw_simple_reply(b, 4096) == (0, 2, read_at(rw_image, RANDOM[0], 4096))
    b.close()
    src.release.set()
    assert raw_simple_reply(a) == (0, 1, b"")
    assert read_at(rw_image, 0, 4096) == bytes(4096)
    a.close()


# --- 3. spec corners over real sockets ----------------------------------------------

class HeldReads(Layer):
    """A blocking source whose reads wait until released."""

    blocking = True  # type: ignore[assignment]

    def __init__(self, inner):
        super().__init__(inner)
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def pread(self, offset, length):
        self.entered.release()
        self.release.wait(20)
        return self.inner.pread(offset, length)

    def view_for(self, offset, length):
        return None


def test_requests_not_started_at_shutdown_get_eshutdown(serve_source, server_image):
    src = HeldReads(ReadOnly(FileSource(str(server_image.path), readonly=True)))
    served = serve_source(src)
    workers = 8  # Server's default pool
    s = served.connect_raw(timeout=10)
    raw_handshake(s)
    s.sendall(b"".join(raw_request(P.CMD_READ, i * 4096, 4096, handle=100 + i)
                       for i in range(workers + 4)))
    for _ in range(workers):
        assert src.entered.acquire(timeout=10)
    stopper = threading.Thread(target=served.running.stop)
    stopper.start()
    try:
        got = [raw_simple_reply(s) for _ in range(4)]
        assert sorted(got) == [(P.NBD_ESHUTDOWN, 100 + workers + i, b"") for i in range(4)]
        assert recv_until_closed(s) == b""  # the running ones cannot be answered
    finally:
        src.release.set()
        stopper.join(20)
    s.close()


def test_export_name_client_may_write_and_read_64_mib(serve, tmp_path):
    """A client that negotiated with NBD_OPT_EXPORT_NAME never saw the 32 MiB
    maximum; like nbdkit, requests up to 64 MiB are served."""
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(80 * MiB)
    served = serve(img)
    s = served.connect_raw(timeout=30)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
              + struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, 0))
    size, _tflags = struct.unpack(">QH", recv_exact(s, 10))
    assert size == 80 * MiB
    data = random_bytes(48 * MiB)
    s.sendall(raw_request(P.CMD_WRITE, 4096, len(data), handle=1, payload=data))
    assert raw_simple_reply(s) == (0, 1, b"")
    s.sendall(raw_request(P.CMD_READ, 4096, len(data), handle=2))
    assert raw_simple_reply(s, len(data)) == (0, 2, data)
    s.sendall(raw_request(P.CMD_READ, 0, P.MAX_ACCEPTED + 4096, handle=3))
    assert raw_simple_reply(s) == (P.NBD_EINVAL, 3, b"")
    s.close()
    assert read_at(img, 4096, len(data)) == data
    # the receive buffer went back to its usual size after the big write
    conns = served.running.server._conns
    assert all(len(c.buf) <= 1 << 20 for c in conns.values())


@pytest.mark.parametrize("structured", [True, False])
def test_libnbd_without_strictness_may_use_64_mib(serve, tmp_path, structured):
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(80 * MiB)
    served = serve(img)
    h = nbd_handle(served.uri, strict=False, structured=structured)
    data = random_bytes(P.MAX_ACCEPTED)
    h.pwrite(data, 0)
    assert h.pread(len(data), 0) == data
    h.shutdown()


def random_bytes(n: int) -> bytes:
    import random
    return random.Random(n).randbytes(n)


# --- 5. bounded memory ------------------------------------------------------------

def fill_without_reading(s: socket.socket, data: bytes, seconds: float = 3.0) -> int:
    """Send ``data`` over and over until the socket stays full; bytes sent."""
    import time
    s.setblocking(False)
    sent = 0
    last_progress = time.monotonic()
    view = memoryview(data)
    pos = 0
    while time.monotonic() - last_progress < 0.5 and time.monotonic() - last_progress < seconds:
        try:
            n = s.send(view[pos:])
        except BlockingIOError:
            select_wait(s)
            continue
        sent += n
        pos = (pos + n) % len(data)
        last_progress = time.monotonic()
    s.setblocking(True)
    s.settimeout(10)
    return sent


def select_wait(s: socket.socket) -> None:
    import select
    select.select([], [s], [], 0.05)


def test_pipelined_options_never_read_stay_bounded_and_are_all_answered(ro_server):
    """Options sent without reading the replies (which are larger): the
    server stops reading once HANDSHAKE_OUT_MAX is queued, and answers every
    one of them once the client reads."""
    from diskwatch.server import server as S
    s = ro_server.connect_raw(timeout=10)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
    info = struct.pack(">QII", P.IHAVEOPT, P.OPT_INFO, 6) + struct.pack(">IH", 0, 0)
    sent = fill_without_reading(s, info * 1024)
    ro_server.sync()
    server = ro_server.running.server
    (conn,) = server._conns.values()
    assert server.peak_bytes <= S.HANDSHAKE_OUT_MAX + 2 * P.MAX_PENDING_OUTPUT
    assert len(conn.proto._in) <= S.HANDSHAKE_BUFFER + len(info)
    # now read: every complete option gets its full answer (INFO, BLOCK_SIZE, ACK)
    options = sent // len(info)
    acks = 0
    while acks < options:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == P.OPT_REPLY_MAGIC
        recv_exact(s, length)
        acks += rtype == P.REP_ACK
    assert options > 5000, options  # the case was really hostile
    s.close()


def test_pipelined_reads_never_read_stay_within_the_budget(serve_source, server_image):
    """Reads of real bytes (no mmap: every reply is a pread) pipelined
    without reading: parsing stops at the connection's budget; once the
    client reads, every reply arrives, in step and right."""
    from diskwatch.server import server as S
    src = ErrorInjection(ReadOnly(FileSource(str(server_image.path), readonly=True)),
                         [ErrorRule(rate=0.0, ops=frozenset({"pread"}))])
    served = serve_source(src)
    s = served.connect_raw(timeout=10)
    raw_handshake(s)
    one = raw_request(P.CMD_READ, RANDOM[0], MiB, handle=1)
    sent = fill_without_reading(s, one * 64)
    served.sync()
    server = served.running.server
    assert server.peak_bytes <= S.CONN_BUDGET + P.MAX_ACCEPTED
    expect = read_at(server_image.path, RANDOM[0], MiB)
    for _ in range(sent // len(one)):
        assert raw_simple_reply(s, MiB) == (0, 1, expect)
    assert sent // len(one) > 64  # more than the budget holds: it was paused and resumed
    s.close()


def test_max_connections(serve_source, server_image):
    served = serve_source(ReadOnly(FileSource(str(server_image.path), readonly=True)),
                          max_connections=3)
    held = [served.connect_raw() for _ in range(3)]
    for s in held:
        recv_exact(s, 18)  # greeted
    extra = served.connect_raw()
    assert recv_until_closed(extra) == b""  # closed at once, no greeting
    assert served.running.server.refused == 1
    held.pop().close()
    served.sync()
    h = nbd_handle(served.uri)  # room again
    assert h.pread(512, 0) == read_at(server_image.path, 0, 512)
    h.shutdown()
    for s in held:
        s.close()


def test_handshake_and_idle_timeouts(serve_source, server_image):
    # Both connections at once, the handshake timeout well above what the
    # idle one's handshake takes on a loaded machine (0.5 s flaked there).
    served = serve_source(ReadOnly(FileSource(str(server_image.path), readonly=True)),
                          handshake_timeout=2.0, idle_timeout=1.0)
    slow = served.connect_raw(timeout=10)
    idle = served.connect_raw(timeout=10)
    raw_handshake(idle)
    idle.sendall(raw_request(P.CMD_READ, 0, 512, handle=1))
    assert raw_simple_reply(idle, 512)[0] == 0
    assert recv_until_closed(idle) == b""  # closed once idle
    assert len(recv_until_closed(slow)) == 18  # the greeting, then closed
    assert served.running.server.timed_out == 2


class CacheRecorder(Layer):
    def __init__(self, inner):
        super().__init__(inner)
        self.calls: list[tuple[int, int]] = []

    def cache(self, offset, length):
        self.calls.append((offset, length))


def test_cache_is_a_bounded_hint(serve_source, server_image):
    from diskwatch.server import dispatch as S
    assert Source().cache(0, 1 << 40) is None  # the default prefetches nothing
    src = CacheRecorder(ReadOnly(FileSource(str(server_image.path), readonly=True)))
    served = serve_source(src)
    s = served.connect_raw()
    raw_handshake(s)
    s.sendall(raw_request(P.CMD_CACHE, 0, 32 * MiB, handle=4))
    assert raw_simple_reply(s) == (0, 4, b"")
    assert all(n <= S.CACHE_MAX for _, n in src.calls) and src.calls
    s.close()


def test_a_client_that_disconnects_and_never_reads_is_dropped(serve_source, server_image):
    """DISC (or EOF) after requests whose replies the client never reads:
    the connection is closed after the handshake timeout, not held for ever."""
    served = serve_source(ReadOnly(FileSource(str(server_image.path), readonly=True)),
                          handshake_timeout=0.5)
    s = served.connect_raw(timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw_handshake(s)
    s.sendall(raw_request(P.CMD_READ, RANDOM[0], 4 * MiB, handle=1)
              + raw_request(P.CMD_DISC, 0, 0, handle=2))
    server = served.running.server
    wait_until(lambda: server.connections == 0, 10, "the connection dropped")
    assert server.timed_out == 1
    s.close()


@pytest.mark.parametrize("bad,needle", [
    ("rate=x", "rate 'x' is not between 0 and 1"),
    ("after=x", "after 'x' is not a number of calls"),
    ("range=a-b", "range 'a-b': not a size: 'a'"),
])
def test_error_rule_words_that_are_not_numbers(bad, needle):
    """Each says which word is wrong, not Python's float()/int() message."""
    with pytest.raises(ValueError) as e:
        parse_error_rule(bad)
    assert str(e.value).startswith("--inject-errors: ") and needle in str(e.value)


@pytest.mark.parametrize("bad", ["read=abc", "read=nan", "write=-1", "other=1e9"])
def test_delay_words_that_are_not_delays(bad):
    from diskwatch.sources.delay import parse_delays
    with pytest.raises(ValueError) as e:
        parse_delays(bad)
    assert str(e.value) == f"{bad!r}: a delay is a number of milliseconds, 0 to 60000"
