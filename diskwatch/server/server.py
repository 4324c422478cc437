"""The NBD transport: non-blocking unix and TCP sockets, many connections.

The protocol (``protocol.py``) owns all framing and the request path
(``dispatch.py``) calls sources and makes replies and events; this module
moves bytes. It is written for speed: sockets are non-blocking and driven
with ``add_reader``, each wake-up reads everything available with one
``recv_into`` into a per-connection buffer, parses every complete request in
it, hands them to the request path, and sends all the replies with one
``sendmsg`` (read data of a raw image goes out straight from its mmap, never
copied through Python). Events are published once per wake-up, after the
replies are on their way. Requests that complete later (in a worker thread,
upstream) make their connection ready; ``flush`` sends and publishes for
every ready connection at once.

Sources that may block (network, decompression) run in worker threads so
other requests, and other connections, go on; their replies go out in
whatever order they finish, as NBD allows. Thread models are applied by the
request path (see ``dispatch.py``), but for serialize_connections, whose
queue of connections waiting for the one served is kept here (``_Admission``).

Memory budget (a client never decides how much memory the server uses):

- per connection, a receive buffer of RECV_BUFFER (HANDSHAKE_BUFFER until
  the handshake is over); it grows to hold one write of up to
  MAX_ACCEPTED (64 MiB) and shrinks back once the write is done;
- bytes in flight, i.e. replies queued and not yet sent (handshake replies
  included), read data being fetched and write payloads held by worker or
  asynchronous requests: a connection with CONN_BUDGET in flight is not
  parsed or read from until it drains; all connections together stop at
  TOTAL_BUDGET (a connection over it waits, starved, until others drain).
  Requests are parsed against that budget, so one recv full of requests
  cannot start more than the budget allows. A connection with nothing in
  flight may always start one request (up to 64 MiB), so the bound is
  TOTAL_BUDGET plus one request;
- receive buffers grown beyond RECV_BUFFER count against TOTAL_BUDGET too,
  and wait when it is spent;
- at most ``max_connections`` (default MAX_CONNECTIONS) connections: more
  are closed at once (nbdkit's limit filter); a handshake not finished in
  ``handshake_timeout`` seconds, and with ``idle_timeout`` a connection
  silent that long with nothing in flight, are closed;
- NBD_CMD_CACHE prefetches at most dispatch.CACHE_MAX, the source's cheap way.

Together: 128 connections x 256 KiB + 96 MiB + 64 MiB, plus the
interpreter (about 50 MiB): under 256 MiB whatever the clients send
(benchmarks/bench_hostile.py measures the hostile cases).

Why this module is over 800 lines: it does one job, the transport
(accepting, reading into and growing buffers, the handshake's bytes, the
memory budget, sending, timeouts), and every part of it keeps the same
counters of the one Server and calls the others (a send resumes a paused
read, a close wakes a starved connection). What could stand alone has
its own module: framing (protocol.py), the request path (dispatch.py),
connection state (connection.py), listening sockets (listen.py), the loop
(loop.py), TLS (tls.py).
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from ..events import Bus, ConnectionEvent
from ..sources.base import (
    PARALLEL,
    SERIALIZE_ALL_REQUESTS,
    SERIALIZE_CONNECTIONS,
    Source,
    stack,
    stack_thread_model,
)
from ..sources.watch import Watch
from . import protocol as P
from .connection import HANDSHAKE_BUFFER as HANDSHAKE_BUFFER
from .connection import RECV_BUFFER, Connection, Turns
from .dispatch import AsyncEngine, Engine, InlineEngine, WorkerEngine, dispatch, start
from .listen import listen_tcp, listen_unix
from .loop import EpollLoop

log = logging.getLogger("diskwatch.server")

CONN_BUDGET = 32 * 1024 * 1024  # bytes in flight per connection
TOTAL_BUDGET = 96 * 1024 * 1024  # bytes in flight (and grown buffers), all connections
HANDSHAKE_OUT_MAX = 256 * 1024  # option replies queued before a handshake is not read
MAX_CONNECTIONS = 128
HANDSHAKE_TIMEOUT = 10.0
SWEEP_INTERVAL = 1.0  # how often timeouts are checked
IOV_MAX = 1024
monotonic = time.monotonic


def export_info(name: str, src: Source, description: str | None = None) -> P.Export:
    readonly = not src.can_write
    mn, pref, mx = src.block_size
    return P.Export(
        name=name, size=src.size, description=description or src.description,
        readonly=readonly, can_flush=src.can_flush, can_fua=src.can_fua,
        can_trim=src.can_trim, can_fast_zero=src.can_fast_zero, can_cache=True,
        can_multi_conn=src.can_multi_conn,
        block_size=(mn, pref, min(mx, P.MAX_PAYLOAD)),
    )


class Server:
    """Serves one or more exports (name -> Source) to NBD clients."""

    def __init__(self, exports: dict[str, Source], bus: Bus | None = None, *,
                 default_export: str | None = None, workers: int = 8, tls=None,
                 max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
                 idle_timeout: float | None = None,
                 conn_budget: int | None = CONN_BUDGET,
                 total_budget: int | None = TOTAL_BUDGET):
        if not exports:
            raise ValueError("no exports")
        self.sources = exports
        self.bus = bus or Bus()
        self.tls = tls  # a tls.TLSConfig, or None
        self.default_export = default_export if default_export is not None else next(iter(exports))
        self.export_infos = {n: export_info(n, s) for n, s in exports.items()}
        self.loop = None  # an EpollLoop, or an asyncio loop: anything with add_reader & co
        self._listeners: list[socket.socket] = []
        self._conns: dict[int, Connection] = {}
        self._next_cid = 1
        # The thread model of each export's stack (see dispatch.py).
        self.thread_models = {name: stack_thread_model(s) for name, s in exports.items()}
        self._export_turns = {name: Turns() for name, m in self.thread_models.items()
                              if m in (SERIALIZE_ALL_REQUESTS, SERIALIZE_CONNECTIONS)}
        self._admissions = {name: _Admission() for name, m in self.thread_models.items()
                            if m == SERIALIZE_CONNECTIONS}
        # How each export's requests reach its source (dispatch.py): the
        # workers' pool is shared; a source the loop drives asynchronously
        # (an upstream NBD server, a URL) has one engine, its ``aio`` asked
        # for once here (a source may make a new one for each server) and
        # attached with the loop. A stack that serialises is called through
        # its plain methods instead.
        self._workers = WorkerEngine(self, workers)
        inline = InlineEngine(self._workers)
        self._async: dict[int, AsyncEngine] = {}
        self._engines: dict[str, Engine] = {}
        for name, src in exports.items():
            aio = src.aio if self.thread_models[name] == PARALLEL else None
            if aio is not None:
                engine = self._async.setdefault(id(aio), AsyncEngine(self, aio))
            else:
                engine = self._workers if src.blocking else inline
            self._engines[name] = engine
        self._ready: dict[int, Connection] = {}  # connections with replies to send
        self._encryptor = None  # a tls.Encryptor, made with the loop when TLS is on
        # Watch layers (sources/watch.py) in the stacks: what they saw is
        # published after each batch of the server's own requests.
        self._watchers = [layer for s in exports.values() for layer in stack(s)
                          if isinstance(layer, Watch)]
        self.max_connections = max_connections
        # None: no budget (the bmap generator's private server: its one
        # client is the libguestfs appliance; see bmap/generate.py)
        self.conn_budget = conn_budget or 1 << 62
        self.total_budget = total_budget or 1 << 62
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.refused = 0  # connections closed at once: over max_connections
        self.timed_out = 0  # connections closed by a timeout
        # The memory budget (see the module docstring).
        self.inflight_bytes = 0  # sum of every connection's queued + executing
        self.buffer_bytes = 0  # sum of every connection's grown receive buffer
        self.peak_bytes = 0  # highest inflight_bytes + buffer_bytes seen
        self._starved: dict[int, Connection] = {}

    # --- listening ---------------------------------------------------------

    def listen_unix(self, path: str) -> None:
        """Listen at ``path`` (see listen.listen_unix)."""
        self.add_listener(listen_unix(path))

    def listen_tcp(self, host: str, port: int) -> int:
        """Listen on ``host``:``port``; returns the port (0 picks one)."""
        sock = listen_tcp(host, port)
        self.add_listener(sock)
        return sock.getsockname()[1]

    def add_listener(self, sock: socket.socket) -> None:
        """Serve on a socket that already listens (one given by socket activation)."""
        sock.setblocking(False)
        self._listeners.append(sock)
        if self.loop is not None:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def attach(self, loop) -> None:
        """Start serving on ``loop``: an EpollLoop or an asyncio loop (call
        before the loop runs, or from its thread)."""
        self.loop = loop
        _tune_malloc()
        if self.tls is not None:
            from .tls import Encryptor
            self._encryptor = Encryptor(loop)
        if self.handshake_timeout or self.idle_timeout:
            loop.call_later(SWEEP_INTERVAL, self._sweep)
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        for engine in self._async.values():
            engine.attach(loop)

    def close(self) -> None:
        """Stop listening and drop every connection (from the loop's thread)."""
        for sock in self._listeners:
            if self.loop is not None:
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        for conn in list(self._conns.values()):
            try:
                self._refuse_pending(conn)
            except Exception:  # noqa: BLE001 - closing goes on whatever happens
                log.exception("connection %d: error while shutting down", conn.cid)
            self._close(conn)
        self._workers.close()
        if self._encryptor is not None:
            self._encryptor.close()

    def _refuse_pending(self, conn: Connection) -> None:
        """At shutdown: requests received but not started get NBD_ESHUTDOWN
        (proto.md), sent as far as the socket takes them without waiting.
        Requests already running cannot be answered: the socket closes."""
        if conn.closed or conn.source is None:
            return
        proto = conn.proto
        handles = []
        for fut, (req, _now) in list(conn.futures.items()):
            if fut.cancel():
                handles.append(req.handle)
        handles.extend(req.handle for req, _payload, _now in conn.waiting)
        conn.waiting.clear()
        if not conn.closing:
            reqs: list = []
            try:
                proto.parse_requests(conn.buf, conn.start, conn.end, reqs)
            except P.ProtocolError:
                pass
            handles.extend(r[2] for r in reqs if r[0] != P.CMD_DISC)
        if not handles:
            return
        for handle in handles:
            conn.out.append(proto.reply_refused(handle, P.NBD_ESHUTDOWN))
        try:
            while conn.out:
                n = conn.sock.sendmsg([conn.out[0]])  # a TLSSocket has no send
                if n < len(conn.out[0]):
                    break  # the peer is not reading: what is left is lost
                conn.out.popleft()
        except OSError:
            pass
        conn.out.clear()

    @property
    def connections(self) -> int:
        return len(self._conns)

    # --- connections -------------------------------------------------------

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}"
            else:
                peer = "unix"
            if len(self._conns) >= self.max_connections:
                # nbdkit's limit filter: over the limit, a connection is
                # closed at once (the client sees EOF before the greeting).
                self.refused += 1
                if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                    log.warning("%d connection(s) refused: already %d (--max-connections)",
                                self.refused, self.max_connections)
                sock.close()
                continue
            cid = self._next_cid
            self._next_cid += 1
            conn = Connection(sock, cid, peer, P.ServerConnection(
                self.export_infos, default_export=self.default_export,
                tls=self.tls.mode if self.tls else "off"))
            self._conns[cid] = conn
            # Registered before the greeting is sent: a peer already gone
            # makes _send close the connection, which then unregisters it.
            self.loop.add_reader(conn.fd, self._on_readable, conn)
            conn.out.append(conn.proto.data_to_send())
            self._send(conn)

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        loop = self.loop
        if conn.reading:
            loop.remove_reader(conn.fd)
        if conn.writing:
            loop.remove_writer(conn.fd)
        conn.sock.close()
        self._conns.pop(conn.cid, None)
        self._starved.pop(conn.cid, None)
        conn.queued = conn.executing = 0
        conn.out.clear()
        self._recharge(conn)
        if conn.extra:
            self.buffer_bytes -= conn.extra
            conn.extra = 0
        self._wake_starved()
        if conn.source is not None and conn.export_name in self._admissions:
            self._admit_next(conn)
        if conn.events:
            self.bus.publish_requests(conn.events)
            conn.events = []
        if self._watchers:
            self._publish_watched()
        if conn.export_name or conn.source is not None:
            self.bus.publish(ConnectionEvent(conn.cid, False, conn.peer, conn.export_name,
                                             conn.requests))

    def _on_readable(self, conn: Connection) -> None:
        try:
            self._readable(conn)
        except Exception:  # noqa: BLE001 - a bug in one connection closes that one
            self._crashed(conn)

    def _crashed(self, conn: Connection) -> None:
        """An unexpected exception while serving ``conn``: log it and close
        the socket, so the peer sees the end instead of waiting forever."""
        log.exception("connection %d: internal error: closing it", conn.cid)
        conn.out.clear()
        try:
            self._close(conn)
        except Exception:  # noqa: BLE001 - a failing subscriber must not keep it open
            log.exception("connection %d: error while closing", conn.cid)
            conn.sock.close()

    def _readable(self, conn: Connection) -> None:
        end = conn.end
        if end == len(conn.buf):
            if not self._make_room(conn):
                return  # waits for the total budget
            end = conn.end
        try:
            n = conn.sock.recv_into(conn.view[end:])
        except (BlockingIOError, InterruptedError):
            if conn.tls is not None and conn.tls.pending:
                self._send(conn)  # a handshake message the socket did not take at once
            return
        except OSError as e:
            if conn.tls is not None:
                log.info("connection %d: TLS: %s", conn.cid, e)
            self._close(conn)
            return
        if n == 0:
            # The peer closed (without DISC, or after it): finish what is in
            # flight, then close.
            conn.closing = True
            self._stop_reading(conn)
            self._maybe_close(conn)
            return
        conn.end = end + n
        conn.active = monotonic()
        if conn.source is None:
            self._handshake(conn)
        else:
            self._transmission(conn)
        if conn.tls is not None:
            self._read_tls_buffered(conn)

    def _read_tls_buffered(self, conn: Connection) -> None:
        """TLS may hold decrypted input the loop cannot see (a full receive
        buffer stopped the read): read it as if the socket were readable."""
        if (conn.tls.buffered and conn.reading and not conn.paused and not conn.held
                and not conn.benched and not conn.closed):
            self.loop.call_soon_threadsafe(self._on_readable_if_open, conn)

    def _on_encrypted(self, conn: Connection) -> None:
        """A big send was encrypted off the loop: send it, go on sending, and
        read again (not while the SSL object was busy)."""
        if conn.closed:
            return
        try:
            self._send(conn)
            if not conn.closed:
                self._apply_reading(conn)
                self._maybe_close(conn)
        except Exception:  # noqa: BLE001
            self._crashed(conn)

    def _on_readable_if_open(self, conn: Connection) -> None:
        if (not conn.closed and conn.reading and not conn.paused and not conn.held
                and not conn.benched):
            self._on_readable(conn)

    def _make_room(self, conn: Connection) -> bool:
        """Room at the end of the receive buffer; False when growing it must
        wait for the total budget (the connection is then starved)."""
        start, end = conn.start, conn.end
        if start > 0:
            conn.buf[:end - start] = conn.view[start:end]
            conn.start, conn.end = 0, end - start
        else:
            # A request larger than the buffer (a big write): grow to hold
            # exactly it (doubling made a 64 MiB write cost 128 MiB); the
            # buffer shrinks back once it is done (_shrink). A bytearray
            # cannot resize while a memoryview of it exists, so the view goes
            # first (it raised BufferError on every 2 MiB write).
            need = len(conn.buf) * 2
            length = P.write_payload_at(conn.buf, start, end)
            if length >= 0:
                need = P.REQUEST_SIZE + length
            need = min(need, P.REQUEST_SIZE + P.MAX_ACCEPTED + RECV_BUFFER)
            if need <= len(conn.buf):
                raise RuntimeError("receive buffer full of unparsed requests")  # a bug
            growth = need - len(conn.buf)
            if (conn.extra and self.inflight_bytes + self.buffer_bytes + growth
                    > self.total_budget) or (not conn.extra and self.buffer_bytes + growth
                                             > self.total_budget):
                self._starve(conn)
                return False
            conn.view.release()
            conn.buf.extend(bytes(growth))
            conn.view = memoryview(conn.buf)
            extra = max(0, len(conn.buf) - RECV_BUFFER)
            self.buffer_bytes += extra - conn.extra
            conn.extra = extra
            self._note_peak()
        return True

    def _shrink(self, conn: Connection) -> None:
        """Give back a buffer grown for a big write once it is done."""
        left = conn.end - conn.start
        if left > RECV_BUFFER // 2:
            return
        buf = bytearray(RECV_BUFFER)
        buf[:left] = conn.view[conn.start:conn.end]
        conn.view.release()
        conn.buf = buf
        conn.view = memoryview(buf)
        conn.start, conn.end = 0, left
        self.buffer_bytes -= conn.extra
        conn.extra = 0
        self._wake_starved()

    def _apply_reading(self, conn: Connection) -> None:
        """Watch the socket for requests unless closing, paused or held."""
        if (conn.reading and not conn.paused and not conn.held and not conn.starved
                and not conn.benched and not (conn.tls is not None and conn.tls.encrypting)):
            self.loop.add_reader(conn.fd, self._on_readable, conn)
            if conn.tls is not None:
                self._read_tls_buffered(conn)
        else:
            self.loop.remove_reader(conn.fd)

    def _stop_reading(self, conn: Connection) -> None:
        if conn.reading:
            conn.reading = False
            self.loop.remove_reader(conn.fd)

    def _handshake(self, conn: Connection) -> None:
        proto = conn.proto
        proto.receive_data(bytes(conn.view[conn.start:conn.end]))
        conn.start = conn.end = 0
        data = proto.data_to_send()
        if data:
            conn.out.append(data)
        # The machine stops after MAX_PENDING_OUTPUT of replies: send them,
        # and go on while the client reads (else wait, paused, in _send).
        while proto.stalled and proto.phase == P.OPTIONS:
            self._send(conn)
            if conn.closed or conn.paused:
                return
            proto.receive_data(b"")
            data = proto.data_to_send()
            if data:
                conn.out.append(data)
        if proto.starttls:
            self._start_tls(conn)
            return
        if proto.phase == P.CLOSED:
            if proto.close_reason:
                log.info("connection %d: %s", conn.cid, proto.close_reason)
            conn.closing = True
            self._stop_reading(conn)
            self._send(conn)
            self._maybe_close(conn)
            return
        if proto.phase == P.TRANSMISSION:
            name = conn.export_name = proto.export.name
            conn.source = self.sources[name]
            self._take_model(conn)
            start(conn, self._engines[name])
            self.bus.publish(ConnectionEvent(conn.cid, True, conn.peer, conn.export_name))
            left = proto.take_leftover()
            conn.view.release()
            conn.buf = bytearray(max(RECV_BUFFER, len(left)))
            conn.view = memoryview(conn.buf)
            if left:
                conn.buf[:len(left)] = left
                conn.end = len(left)
            self._send(conn)
            if conn.end and not conn.benched:
                self._transmission(conn)
            return
        self._send(conn)

    # --- thread models ------------------------------------------------------

    def _take_model(self, conn: Connection) -> None:
        """A connection enters transmission: its turns, and under
        serialize_connections its place in the queue for the export."""
        name = conn.export_name
        model = self.thread_models[name]
        if model == PARALLEL:
            return
        conn.turns = self._export_turns.get(name) or Turns()
        admission = self._admissions.get(name)
        if admission is None:
            return
        if admission.serving is None:
            admission.serving = conn
        else:
            # nbdkit accepts the second client and keeps it waiting: its
            # handshake is done, its requests are not read until its turn.
            conn.benched = True
            admission.queue.append(conn)
            self._apply_reading(conn)
            log.info("connection %d: export %r serves one connection at a time "
                     "(serialize_connections): waiting for connection %d to end",
                     conn.cid, name, admission.serving.cid)

    def _admit_next(self, conn: Connection) -> None:
        """A connection to a serialize_connections export has closed: the
        next one waiting, if any, is served."""
        admission = self._admissions[conn.export_name]
        if admission.serving is not conn:
            return  # one that waited and went
        admission.serving = None
        while admission.queue:
            nxt = admission.queue.popleft()
            if not nxt.closed:
                admission.serving = nxt
                nxt.benched = False
                self.loop.call_soon_threadsafe(self._resume, nxt)
                return

    def _start_tls(self, conn: Connection) -> None:
        """STARTTLS was acknowledged: the ACK goes out in the clear, then the
        connection speaks TLS (the handshake is driven by the next reads)."""
        from .tls import TLSSocket
        self._send(conn)
        if conn.closed:
            return
        if conn.out:
            # 20 bytes that a fresh socket did not take: the client is not
            # reading its replies. It cannot be switched half-way: close.
            log.info("connection %d: STARTTLS: the client does not read the replies", conn.cid)
            self._close(conn)
            return
        received = conn.proto.start_tls()
        conn.sock = conn.tls = TLSSocket(conn.sock, self.tls.context, received, self._encryptor,
                                         lambda: self._on_encrypted(conn))
        if received:
            self.loop.call_soon_threadsafe(self._on_readable_if_open, conn)

    def _transmission(self, conn: Connection) -> None:
        """Parse and carry out the requests in the receive buffer, as many
        as the memory budget allows; the rest wait for replies to drain."""
        proto = conn.proto
        while True:
            budget = self.conn_budget - conn.queued - conn.executing
            room = self.total_budget - self.inflight_bytes
            if room < budget:
                budget = room
            if budget <= 0:
                if conn.queued or conn.executing:
                    self._pause(conn)  # resumed by _send once its replies drain
                else:
                    self._starve(conn)  # resumed once other connections drain
                return
            reqs: list = []
            try:
                conn.start = proto.parse_requests(conn.buf, conn.start, conn.end, reqs, budget)
            except P.ProtocolError as e:
                log.info("connection %d: %s: closing it", conn.cid, e)
                # Carry out what was parsed before the bad request, then close.
                conn.closing = True
            self._hold(conn, dispatch(conn, reqs))
            if conn.closing:  # after DISC, or a bad request: nothing more is read
                self._stop_reading(conn)
            if conn.start == conn.end:
                conn.start = conn.end = 0
            if len(conn.buf) > RECV_BUFFER:
                self._shrink(conn)
            self._send(conn)
            if conn.events:
                events, conn.events = conn.events, []
                self.bus.publish_requests(events)
            if self._watchers:
                self._publish_watched()
            self._maybe_close(conn)
            if conn.closed or conn.closing or not self._backlog(conn):
                return
            # The budget stopped the parse: go on if the replies went out.

    def _backlog(self, conn: Connection) -> bool:
        """Whether a complete request waits in the receive buffer."""
        start, end = conn.start, conn.end
        if end - start < P.REQUEST_SIZE:
            return False
        length = P.write_payload_at(conn.buf, start, end)
        return length < 0 or end - start >= P.REQUEST_SIZE + length

    # --- the memory budget --------------------------------------------------

    def _recharge(self, conn: Connection) -> None:
        new = conn.queued + conn.executing
        self.inflight_bytes += new - conn.charged
        conn.charged = new
        self._note_peak()

    def _note_peak(self) -> None:
        total = self.inflight_bytes + self.buffer_bytes
        if total > self.peak_bytes:
            self.peak_bytes = total

    def _pause(self, conn: Connection) -> None:
        if not conn.paused:
            conn.paused = True
            self._apply_reading(conn)

    def _starve(self, conn: Connection) -> None:
        if not conn.starved:
            conn.starved = True
            self._starved[conn.cid] = conn
            self._apply_reading(conn)

    def _wake_starved(self) -> None:
        if self._starved and (self.inflight_bytes + self.buffer_bytes
                              < self.total_budget * 3 // 4):
            starved, self._starved = self._starved, {}
            for conn in starved.values():
                conn.starved = False
                self.loop.call_soon_threadsafe(self._resume, conn)

    def _resume(self, conn: Connection) -> None:
        """Carry on with a connection that waited for the budget: what is
        in its buffer first, then reading."""
        if conn.closed or conn.paused or conn.starved or conn.benched:
            return
        try:
            if conn.source is None:
                if conn.proto.stalled:
                    self._handshake(conn)
            elif self._backlog(conn):
                self._transmission(conn)
            if not conn.closed:
                self._apply_reading(conn)
        except Exception:  # noqa: BLE001
            self._crashed(conn)

    # --- sweeping timeouts --------------------------------------------------

    def _sweep(self) -> None:
        """Close handshakes that take too long and, with an idle timeout,
        connections silent that long with nothing in flight."""
        if self.loop is None or not self._listeners and not self._conns:
            return
        now = monotonic()
        hs, idle = self.handshake_timeout, self.idle_timeout
        for conn in list(self._conns.values()):
            if conn.closed:
                continue
            why = None
            if hs and conn.source is None and now - conn.born > hs:
                why = f"handshake not finished in {hs:g}s"
            elif (idle and conn.source is not None and now - conn.active > idle
                  and not conn.out and not conn.inflight and not conn.waiting
                  and not conn.benched):  # waiting for its turn is not its silence
                why = f"idle for {idle:g}s"
            elif conn.closing and conn.out and now - conn.active > (hs or HANDSHAKE_TIMEOUT):
                # After DISC or EOF, replies the client does not read would
                # hold the connection (and its budget) for ever.
                why = "disconnected and not reading its last replies"
            if why:
                log.info("connection %d: %s: closing it", conn.cid, why)
                self.timed_out += 1
                self._crashed_quietly(conn)
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _crashed_quietly(self, conn: Connection) -> None:
        conn.out.clear()
        try:
            self._close(conn)
        except Exception:  # noqa: BLE001
            log.exception("connection %d: error while closing", conn.cid)

    # --- requests that complete later (dispatch.Transport) -----------------

    def ready(self, conn: Connection) -> None:
        self._ready[conn.cid] = conn

    def flush(self) -> None:
        """After completions: send the replies, publish the events, issue
        what waited."""
        ready, self._ready = self._ready, {}
        for conn in ready.values():
            if conn.closed:
                continue
            try:
                if conn.waiting:
                    self._hold(conn, conn.engine.issue(conn))
                self._send(conn)
                if conn.events:
                    events, conn.events = conn.events, []
                    self.bus.publish_requests(events)
                self._maybe_close(conn)
            except Exception:  # noqa: BLE001
                self._crashed(conn)
        if self._watchers:
            self._publish_watched()

    def _hold(self, conn: Connection, held: bool) -> None:
        """Not read from while parsed requests wait to be issued; read again
        once they are."""
        if held != conn.held:
            conn.held = held
            self._apply_reading(conn)

    def _publish_watched(self) -> None:
        for layer in self._watchers:
            events = layer.take_events()
            if events:
                self.bus.publish_requests(events)

    # --- sending -----------------------------------------------------------

    def _send(self, conn: Connection) -> None:
        out = conn.out
        sock = conn.sock
        tls = conn.tls
        try:
            if tls is not None:
                tls.flush()  # ciphertext left from the handshake or an earlier send
            while out:
                iov = list(itertools.islice(out, IOV_MAX))
                n = sock.sendmsg(iov)
                for it in iov:
                    ln = len(it)
                    if n >= ln:
                        out.popleft()
                        n -= ln
                    else:
                        out[0] = memoryview(it)[n:]
                        break
                else:
                    continue
                break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.info("connection %d: send failed: %s", conn.cid, e)
            out.clear()
            self._close(conn)
            return
        if tls is None:
            busy = bool(out)
        elif tls.encrypting:
            # The SSL object is the encryptor's until on_encrypted: not read
            # from, and written to only to push ciphertext already made.
            busy = tls.pending
            if conn.reading:
                self.loop.remove_reader(conn.fd)
        else:
            busy = bool(out) or tls.pending
        if busy and not conn.writing:
            conn.writing = True
            self.loop.add_writer(conn.fd, self._on_writable, conn)
        elif not busy and conn.writing:
            conn.writing = False
            self.loop.remove_writer(conn.fd)
        # Back-pressure (the memory budget): bytes queued are counted; a
        # connection over its budget is not parsed or read from until they
        # drain to half of it.
        queued = sum(map(len, out)) if out else 0
        if queued != conn.queued:
            conn.queued = queued
            self._recharge(conn)
        limit = HANDSHAKE_OUT_MAX if conn.source is None else self.conn_budget
        if conn.paused:
            if queued + conn.executing <= limit // 2:
                conn.paused = False
                self.loop.call_soon_threadsafe(self._resume, conn)
        elif queued + conn.executing > limit and conn.reading:
            self._pause(conn)
        if self._starved:
            self._wake_starved()

    def _on_writable(self, conn: Connection) -> None:
        try:
            self._writable(conn)
        except Exception:  # noqa: BLE001
            self._crashed(conn)

    def _writable(self, conn: Connection) -> None:
        conn.active = monotonic()  # the client reads: it is not idle
        self._send(conn)
        if conn.waiting and not conn.closed:
            self._hold(conn, conn.engine.issue(conn))
            self._send(conn)
        self._maybe_close(conn)

    def _maybe_close(self, conn: Connection) -> None:
        if (conn.closing and not conn.closed and not conn.out and conn.inflight == 0
                and not conn.waiting and not (conn.tls is not None
                                              and (conn.tls.pending or conn.tls.encrypting))):
            self._close(conn)


# glibc's allocator, for a server that makes a buffer for every read it
# answers (a source's read, often 256 KiB) and frees it once sent. By default
# blocks over 128 KiB are mmap'd (and the threshold then moves with what was
# freed), and the heap is given back to the kernel whenever 2x that is free
# at its top: the buffers of a copy kept coming back as fresh pages, faulted
# in and zeroed by the kernel again (perf: a third of diskwatch's page faults
# during a copy over http; curl source 128 MiB nbdcopy, medians of 10: 229 ->
# 206 ms). Blocks up to 4 MiB come from the heap, and up to 16 MiB freed at
# its top is kept for the next buffers: bounded, next to the server's memory
# budget (TOTAL_BUDGET).
_MALLOC_TUNED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def _tune_malloc() -> None:
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc: its own defaults
    mallopt(_M_MMAP_THRESHOLD, 4 << 20)
    mallopt(_M_TRIM_THRESHOLD, 16 << 20)



class _Admission:
    """serialize_connections: the connection served, and those waiting for
    it to end (in the order they finished their handshakes)."""

    __slots__ = ("serving", "queue")

    def __init__(self) -> None:
        self.serving: Connection | None = None
        self.queue: deque[Connection] = deque()


@dataclass
class ServerThread:
    """Runs a Server on its own loop (an ``EpollLoop``) in a daemon thread,
    so the caller's thread (the UI, a test, the bmap generator) stays free."""

    server: Server
    thread: threading.Thread | None = None
    loop: EpollLoop | None = None

    def start(self) -> ServerThread:
        self.loop = EpollLoop()

        def run() -> None:
            try:
                self.loop.run_forever()
            finally:
                self.server.close()
                self.loop.close()

        self.server.attach(self.loop)
        self.thread = threading.Thread(target=run, name="diskwatch-server", daemon=True)
        self.thread.start()
        return self

    def call(self, fn, *args):
        """Run fn(*args) on the server's loop and wait for its result."""
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)
        self.loop.call_soon_threadsafe(run)
        return fut.result()

    def stop(self) -> None:
        if self.loop is not None and self.thread is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
