"""The request path: one way from a parsed request to its reply and its
event, whatever the source.

    protocol.parse_requests -> dispatch() -> an Engine carries it out
                                          -> conn.complete(): reply (protocol) + event

``dispatch`` does what is the same for every source, once: a request the
protocol refused is answered at once (nbdkit, too, answers those outside
its request lock), DISC ends the connection's requests, a read the source
can hand over as a buffer (``view_for``: an mmap, a qcow2's plain cluster)
is answered without calling it, and what an engine holds past ``take`` (a
read's or a write's bytes) is charged to the memory budget until it
completes. ``completion`` makes the one place a reply and an event are made, and a
source's error becomes a wire error (``wire.wire_error``): each
connection's ``complete``.

An ``Engine`` is how a source is called; each connection has one, chosen
by its export when the server is made:

- ``InlineEngine``: on the loop's one thread, for sources that never block
  (a file, memory); a big zero, trim or cache goes to the workers;
- ``WorkerEngine``: in a pool of threads, for sources that may block
  (network, decompression), with the turns of a serialising thread model;
- ``AsyncEngine``: the source's asynchronous way in (``source.aio``: an
  upstream NBD server, a URL), driven by the loop, at most ASYNC_WINDOW
  requests in flight per connection.

Thread models (``sources/base.py``): each export is served under the most
serialised model of its stack, as nbdkit does, decided once when the
server is made:

- parallel: nothing taken or checked per request;
- serialize_requests: a connection has at most one request in a worker
  thread; the others wait, parsed, in its queue (``Turns``), and
  connections run side by side;
- serialize_all_requests: one ``Turns`` for the export: one request in a
  worker at a time, whichever connection it comes from, connections taking
  turns request by request;
- serialize_connections: a connection that finishes its handshake while
  another is served waits, not read from, until that one has gone
  (nbdkit accepts it and serialises; its requests then take turns as
  under serialize_all_requests). The transport keeps that queue.

A request waiting its turn holds no worker (nbdkit's threads block on a
lock; here the pool is shared by every export, so a waiting request stays
in the loop's queue instead). Inline sources run on the loop's one thread,
so their requests never overlap anyway; under a serialising model their
big zero, trim and cache requests stay inline too, and a stack that
serialises is never driven through an asynchronous engine (whose point is
many requests in flight) nor read from a view outside its turn.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ..events import make_request
from ..sources.base import EXTENT_ZERO, Source
from . import protocol as P
from .connection import Connection, Turns

log = logging.getLogger("diskwatch.server")

#: reads this long of a structured connection to an inline source that knows
#: its extents are sent in pieces, holes as hole chunks (no payload)
HOLE_SCAN_MIN = 64 * 1024
#: zero, trim and cache requests longer than this run in a worker thread
INLINE_MAX = 4 * 1024 * 1024
_OFFLOADED = (P.CMD_TRIM, P.CMD_WRITE_ZEROES, P.CMD_CACHE)
#: NBD_CMD_CACHE prefetches at most this much of its range (it is a hint)
CACHE_MAX = 64 * 1024 * 1024
ASYNC_WINDOW = 64  # requests in flight per connection to an asynchronous source
_NEVER = 1 << 62
monotonic = time.monotonic


class Engine(Protocol):
    """How a connection's requests reach its source (see the module
    docstring). Called from the loop's thread only."""

    #: requests outlive ``take`` (in a worker, or upstream): their read and
    #: write bytes are charged to the budget until they complete, and a
    #: write's payload is copied out of the receive buffer
    deferred: bool

    def bind(self, conn: Connection) -> None:
        """Transmission starts: set what dispatch reads per connection
        (``view_for``, ``scan_from``); ``conn.turns`` is set already."""

    def take(self, conn: Connection, req: P.Request, now: float) -> None:
        """Carry out a valid request (not DISC, not a read a view answered);
        ``conn.complete`` it, now or later."""

    def issue(self, conn: Connection) -> bool:
        """Start what waits (after a batch, a completion, a write to the
        socket); whether requests still wait, so the connection is not read
        from until they are issued."""


class Transport(Protocol):
    """What a deferred engine needs of the transport."""

    loop: Any

    def ready(self, conn: Connection) -> None:
        """A deferred request of ``conn`` completed: its reply and event wait."""

    def flush(self) -> None:
        """Send and publish what the connections made ready have waiting."""


# --- the one path ---------------------------------------------------------------

def dispatch(conn: Connection, reqs: list) -> bool:
    """Carry out requests parsed from ``conn``'s receive buffer, in order;
    replies and events queue in ``conn.out`` and ``conn.events``. Returns
    whether some still wait to be issued (see ``Engine.issue``)."""
    now = monotonic()
    conn.requests += len(reqs)
    engine = conn.engine
    deferred = engine.deferred
    take = engine.take
    complete = conn.complete
    view_for = conn.view_for
    scan_from = conn.scan_from
    for req in reqs:
        cmd = req[0]
        if req[6]:
            complete(req, now, None, None)
        elif cmd == P.CMD_READ:  # the hot path
            length = req[4]
            if length < scan_from or req[1] & P.CMD_FLAG_DF:
                data = view_for(req[3], length)
                if data is not None:
                    complete(req, now, data, None)
                    continue
            if deferred:
                conn.executing += length  # released by finished()
            take(conn, req, now)
        elif cmd == P.CMD_DISC:
            # Never answered (the spec allows no reply); nothing after it is
            # carried out, what came before is.
            conn.closing = True
            complete(req, now, None, None, now)
            break
        else:
            if deferred and cmd == P.CMD_WRITE:
                conn.executing += req[4]
            take(conn, req, now)
    return engine.issue(conn)


def completion(conn: Connection) -> Callable[..., None]:
    """The completion of ``conn``'s requests (``conn.complete``): the one
    place a reply and an event are made, and a source's error becomes a wire
    error. Made once per connection (``start``), so the hot path finds what
    it needs in the closure instead of looking it up per request."""
    proto = conn.proto
    out = conn.out
    append = out.append
    read_header = proto.read_data_header
    cid = conn.cid
    export = conn.export_name
    new_event = make_request

    def complete(req: P.Request, start: float, result, error: BaseException | None,
                 end: float = 0.0) -> None:
        """``req`` is done: queue its reply and its event. ``result``: a
        read's data (or ``(length, data or None)`` pieces from
        ``read_pieces``), block status's extents as the source gave them,
        None for the rest; ``error``: what the source raised, or None.
        ``end``: when it finished, if not now."""
        cmd = req[0]
        err = req[6]
        if error is None and not err:
            if cmd == P.CMD_READ:
                if result.__class__ is list:
                    out.extend(proto.read_chunks(req[2], req[3], result))
                else:
                    append(read_header(req[2], req[3], req[4]))
                    append(result)
            elif cmd == P.CMD_BLOCK_STATUS:
                try:
                    append(proto.reply_block_status(req[2], P.clip_extents(
                        result, req[3], min(req[4], P.BLOCK_STATUS_MAX),
                        bool(req[1] & P.CMD_FLAG_REQ_ONE))))
                except Exception as e:  # noqa: BLE001 - extents the source made up
                    error = e
            elif cmd != P.CMD_DISC:
                append(proto.reply_header(req[2]))
        if error is not None:
            if isinstance(error, OSError):
                err = P.wire_error(error.errno)
            else:
                log.error("connection %d: unexpected error", cid, exc_info=error)
                err = P.NBD_EIO
            append(proto.reply_error(req[2], err, str(error)))
        elif err:
            append(proto.reply_refused(req[2], err))
        conn.events.append(new_event((cid, export, cmd, req[3], req[4], req[1], start,
                                      (end or monotonic()) - start, err)))

    return complete


def start(conn: Connection, engine: Engine) -> None:
    """``conn`` enters transmission, its requests carried out by ``engine``
    (``conn.turns`` is set already)."""
    conn.engine = engine
    engine.bind(conn)
    if conn.tls is not None:
        # TLS encrypts in user space: a view of an mmap'd file, read there,
        # raises SIGBUS if the file shrank (sendmsg says EFAULT instead). A
        # pread costs the same here (bench_tls: server CPU per GiB within
        # its noise) and an error is that request's.
        conn.view_for = _no_view
    conn.complete = completion(conn)


def finished(transport: Transport, conn: Connection, req: P.Request, start: float, result,
             error: BaseException | None, end: float = 0.0) -> None:
    """A deferred request is done (from the loop's thread): its bytes leave
    the budget, and its reply and event wait for ``transport.flush``."""
    conn.inflight -= 1
    if req[0] <= P.CMD_WRITE:
        conn.executing -= req[4]
    if conn.closed:
        return
    conn.complete(req, start, result, error, end)
    transport.ready(conn)


def carry_out(src: Source, req: P.Request, payload):
    """Call the source for one request (on the loop's thread or in a
    worker); returns what ``conn.complete`` takes as its result. ``payload``: a
    write's bytes."""
    cmd, flags, _handle, offset, length, _pstart, _err = req
    if cmd == P.CMD_READ:
        data = src.pread(offset, length)
        if len(data) != length:
            raise _short_read(offset, length, data)
        return data
    fua = bool(flags & P.CMD_FLAG_FUA)
    if cmd == P.CMD_WRITE:
        src.pwrite(offset, payload, fua)
    elif cmd == P.CMD_FLUSH:
        src.flush()
    elif cmd == P.CMD_TRIM:
        src.trim(offset, length, fua)
    elif cmd == P.CMD_WRITE_ZEROES:
        src.zero(offset, length, may_trim=not flags & P.CMD_FLAG_NO_HOLE, fua=fua,
                 fast=bool(flags & P.CMD_FLAG_FAST_ZERO))
    elif cmd == P.CMD_CACHE:
        # Advisory: a bounded prefetch of the start is all a source does.
        src.cache(offset, min(length, CACHE_MAX))
    elif cmd == P.CMD_BLOCK_STATUS:
        want = min(length, P.BLOCK_STATUS_MAX)
        return src.extents(offset, want) if src.can_extents else [(offset, want, 0)]
    else:
        raise OSError(errno.EINVAL, "unknown command")
    return None


def read_pieces(src: Source, offset: int, length: int, *, views: bool = True) -> list:
    """A read in pieces (``(length, data)``, data None where the disk reads
    as zeroes), for a structured reply that leaves holes out.

    Every piece is read before anything is queued: once a chunk header is
    out its payload must follow (proto.md: the server "MUST still complete
    the transmission of any current chunk"), so a read that fails half-way
    must leave nothing behind but the error reply. ``views``: the data
    pieces may be the source's views (not under TLS: see ``start``)."""
    pieces = []
    pos = offset
    for n, f in P.clip_extents(src.extents(offset, length), offset, length, False, fill=True):
        if f & EXTENT_ZERO:
            pieces.append((n, None))
        else:
            data = src.view_for(pos, n) if views else None
            if data is None:
                data = src.pread(pos, n)
                if len(data) != n:
                    raise _short_read(pos, n, data)
            pieces.append((n, data))
        pos += n
    return pieces


def _short_read(offset: int, length: int, data) -> OSError:
    """A source that returned fewer bytes than asked: an EIO for that read
    (sending them would put the reply stream out of step)."""
    return OSError(errno.EIO, f"source returned {len(data)} of {length} bytes at {offset}")


def _no_view(offset: int, length: int) -> None:
    """``view_for`` of a stack that serialises: every read is a call in turn."""
    return None


def _payload(conn: Connection, req: P.Request, copy: bool):
    """A write's payload: its place in the receive buffer, or (``copy``, for
    a request that outlives this batch: the buffer is reused) its bytes."""
    pstart = req[5]
    if pstart < 0:
        return None
    view = conn.view[pstart:pstart + req[4]]
    return bytes(view) if copy else view


# --- the engines ------------------------------------------------------------------

class InlineEngine:
    """Sources that never block: carried out at once, on the loop's thread."""

    deferred = False

    def __init__(self, workers: WorkerEngine):
        self.workers = workers

    def bind(self, conn: Connection) -> None:
        src = conn.source
        conn.view_for = src.view_for
        if conn.proto.structured and src.can_extents:
            conn.scan_from = HOLE_SCAN_MIN

    def take(self, conn: Connection, req: P.Request, now: float) -> None:
        cmd = req[0]
        if cmd in _OFFLOADED and req[4] > INLINE_MAX and conn.turns is None:
            # A big zero, trim or cache may be thousands of writes (a block
            # device with no fast zeroing): done in a worker so the loop, and
            # every other connection, go on. Not under a serialising model:
            # it would overlap what runs here.
            self.workers.take(conn, req, now)
            return
        try:
            if cmd == P.CMD_READ and req[4] >= conn.scan_from and not req[1] & P.CMD_FLAG_DF:
                result = read_pieces(conn.source, req[3], req[4], views=conn.tls is None)
            else:
                result = carry_out(conn.source, req, _payload(conn, req, False))
        except Exception as e:  # noqa: BLE001 - any failure is this request's error
            conn.complete(req, now, None, e)
            return
        conn.complete(req, now, result, None)

    def issue(self, conn: Connection) -> bool:
        return False


class WorkerEngine:
    """Sources that may block: each request in a worker thread (the pool is
    the server's, shared by every export), its completion back on the loop.
    Under a serialising model one at a time, taking turns."""

    deferred = True

    def __init__(self, transport: Transport, workers: int):
        self.transport = transport
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    def bind(self, conn: Connection) -> None:
        conn.view_for = conn.source.view_for if conn.turns is None else _no_view

    def take(self, conn: Connection, req: P.Request, now: float) -> None:
        payload = _payload(conn, req, True)
        turns = conn.turns
        if turns is None:
            self._submit(conn, req, payload, now)
            return
        conn.waiting.append((req, payload, now))
        if not conn.in_turns:
            conn.in_turns = True
            turns.ready.append(conn)

    def issue(self, conn: Connection) -> bool:
        if conn.turns is not None:
            self._take_turns(conn.turns)
        return False  # waiting for a turn is not a reason to stop reading

    def _take_turns(self, turns: Turns) -> None:
        """Start the next waiting request of the connections sharing
        ``turns``, unless one is running: one connection after another."""
        ready = turns.ready
        while not turns.busy and ready:
            conn = ready.popleft()
            if conn.closed or not conn.waiting:
                conn.in_turns = False
                continue
            req, payload, now = conn.waiting.popleft()
            if conn.waiting:
                ready.append(conn)
            else:
                conn.in_turns = False
            turns.busy = True
            self._submit(conn, req, payload, now)

    def _submit(self, conn: Connection, req: P.Request, payload, now: float) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="diskwatch-io")
        conn.inflight += 1
        fut = self._pool.submit(_run, conn.source, req, payload)
        conn.futures[fut] = (req, now)
        loop = self.transport.loop
        fut.add_done_callback(lambda f, c=conn: loop.call_soon_threadsafe(self._finished, c, f))

    def _finished(self, conn: Connection, fut) -> None:
        req, now = conn.futures.pop(fut)
        turns = conn.turns
        if turns is not None:
            turns.busy = False
            if not fut.cancelled():  # cancelled: the server is shutting down
                self._take_turns(turns)
        if fut.cancelled():  # never started; its connection is closing unanswered
            result, error, end = None, OSError(errno.ESHUTDOWN, "server is shutting down"), 0.0
        else:
            result, error, end = fut.result()
        finished(self.transport, conn, req, now, result, error, end)
        self.transport.flush()

    def close(self) -> None:
        """Queued requests are dropped; running ones finish before the
        sources are closed under them (a network read is bounded by its
        timeout; a stream waiting for its reader by the caller's abort)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _run(src: Source, req: P.Request, payload) -> tuple:
    """In a worker thread: (result, error, when it ended)."""
    try:
        result = carry_out(src, req, payload)
    except Exception as e:  # noqa: BLE001 - any failure is this request's error
        return None, e, monotonic()
    return result, None, monotonic()


class AsyncEngine:
    """A source's asynchronous way in (``source.aio``, e.g. sources/nbd.py's
    NbdAio): requests issued from the loop, completions called on it, at
    most ASYNC_WINDOW per connection in flight (so at most that many read
    buffers exist); the rest wait, parsed, and the connection is not read
    from until they are issued."""

    deferred = True

    def __init__(self, transport: Transport, aio):
        self.transport = transport
        self.aio = aio

    def attach(self, loop) -> None:
        self.aio.attach(loop, self.transport.flush)

    def bind(self, conn: Connection) -> None:
        conn.view_for = conn.source.view_for

    def take(self, conn: Connection, req: P.Request, now: float) -> None:
        conn.waiting.append((req, _payload(conn, req, True), now))

    def issue(self, conn: Connection) -> bool:
        # Issued even while the connection is paused: a waiting request is
        # charged to the budget from its parse (conn.executing), so issuing
        # it adds nothing; holding it back could stall for good (paused
        # until executing drains, which waits for the issue).
        waiting = conn.waiting
        aio = self.aio
        while waiting and conn.inflight < ASYNC_WINDOW:
            req, payload, now = waiting.popleft()
            cmd, flags, _handle, offset, length, _pstart, _err = req
            conn.inflight += 1
            done = _AsyncDone(self.transport, conn, req, now)
            fua = bool(flags & P.CMD_FLAG_FUA)
            if cmd == P.CMD_READ:
                aio.pread(offset, length, done)
            elif cmd == P.CMD_WRITE:
                aio.pwrite(offset, payload, fua, done)
            elif cmd == P.CMD_FLUSH:
                aio.flush(done)
            elif cmd == P.CMD_TRIM:
                aio.trim(offset, length, fua, done)
            elif cmd == P.CMD_WRITE_ZEROES:
                aio.zero(offset, length, not flags & P.CMD_FLAG_NO_HOLE, fua,
                         bool(flags & P.CMD_FLAG_FAST_ZERO), done)
            elif cmd == P.CMD_CACHE:
                aio.cache(offset, length, done)
            elif cmd == P.CMD_BLOCK_STATUS:
                aio.extents(offset, min(length, P.BLOCK_STATUS_MAX), done)
            else:
                done(None, OSError(errno.EINVAL, "unknown command"))
        aio.issued()
        return bool(waiting)


class _AsyncDone:
    """The ``done(result, error)`` of one request to an asynchronous source."""

    __slots__ = ("transport", "conn", "req", "start")

    def __init__(self, transport: Transport, conn: Connection, req: P.Request, start: float):
        self.transport = transport
        self.conn = conn
        self.req = req
        self.start = start

    def __call__(self, result, error) -> None:
        finished(self.transport, self.conn, self.req, self.start, result, error)
