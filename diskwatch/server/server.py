"""The NBD transport: non-blocking unix and TCP sockets, many connections.

The protocol logic lives in ``protocol.py``; this module moves bytes. It is
written for speed: sockets are non-blocking and driven with ``add_reader``,
each wake-up reads everything available with one ``recv_into`` into a
per-connection buffer, parses every complete request in it, carries them out,
and sends all the replies with one ``sendmsg`` (read data of a raw image goes
out straight from its mmap, never copied through Python). Events are
published once per wake-up, after the replies are on their way.

Sources that may block (network, decompression) run in worker threads so
other requests, and other connections, go on; their replies go out in
whatever order they finish, as NBD allows.

Thread models (``sources/base.py``): each export is served under the most
serialised model of its stack, as nbdkit does, decided once when the
server is made:

- parallel: as described above, nothing taken or checked per request;
- serialize_requests: a connection has at most one request in a worker
  thread; the others wait, parsed, in its queue (``_Turns``), and
  connections run side by side;
- serialize_all_requests: one ``_Turns`` for the export: one request in a
  worker at a time, whichever connection it comes from, connections taking
  turns request by request;
- serialize_connections: a connection that finishes its handshake while
  another is served waits, not read from, until that one has gone
  (nbdkit accepts it and serialises; its requests then take turns as
  under serialize_all_requests).

A request waiting its turn holds no worker (nbdkit's threads block on a
lock; here the pool is shared by every export, so a waiting request stays
in the loop's queue instead). Sources that do not block are served inline,
on the loop's one thread, so their requests never overlap anyway; under a
serialising model their big zero, trim and cache requests stay inline too,
and a stack that serialises is never driven through an asynchronous
engine (whose point is many requests in flight) nor read from a view
outside its turn.

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
- NBD_CMD_CACHE prefetches at most CACHE_MAX, the source's cheap way.

Together: 128 connections x 256 KiB + 96 MiB + 64 MiB, plus the
interpreter (about 50 MiB): under 256 MiB whatever the clients send
(benchmarks/bench_hostile.py measures the hostile cases).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..events import Bus, ConnectionEvent, make_request
from ..sources.base import (
    EXTENT_ZERO,
    PARALLEL,
    SERIALIZE_ALL_REQUESTS,
    SERIALIZE_CONNECTIONS,
    FastZeroUnsupported,
    Source,
    stack,
    stack_thread_model,
)
from ..sources.watch import Watch
from . import protocol as P
from .loop import EpollLoop

log = logging.getLogger("diskwatch.server")

RECV_BUFFER = 256 * 1024  # grows to hold one maximal write, then shrinks back
HANDSHAKE_BUFFER = 16 * 1024
CONN_BUDGET = 32 * 1024 * 1024  # bytes in flight per connection
TOTAL_BUDGET = 96 * 1024 * 1024  # bytes in flight (and grown buffers), all connections
HANDSHAKE_OUT_MAX = 256 * 1024  # option replies queued before a handshake is not read
MAX_CONNECTIONS = 128
HANDSHAKE_TIMEOUT = 10.0
SWEEP_INTERVAL = 1.0  # how often timeouts are checked
HOLE_SCAN_MIN = 64 * 1024  # structured reads this big are checked for holes
IOV_MAX = 1024
#: zero, trim and cache requests longer than this run in a worker thread
INLINE_MAX = 4 * 1024 * 1024
_OFFLOADED = (P.CMD_TRIM, P.CMD_WRITE_ZEROES, P.CMD_CACHE)
#: NBD_CMD_CACHE prefetches at most this much of its range (it is a hint)
CACHE_MAX = 64 * 1024 * 1024
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


class _Conn:
    """One client connection (transport state; protocol state is ``proto``)."""

    def __init__(self, server: Server, sock: socket.socket, cid: int, peer: str):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.cid = cid
        self.peer = peer
        self.proto = P.ServerConnection(server.export_infos, default_export=server.default_export,
                                        tls=server.tls.mode if server.tls else "off")
        self.tls = None  # the TLSSocket once STARTTLS is done (then also self.sock)
        self.buf = bytearray(HANDSHAKE_BUFFER)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.out: deque = deque()  # bytes and memoryviews, sent in order
        self.writing = False
        self.reading = True
        self.paused = False  # not read from while its replies drain (back-pressure)
        self.starved = False  # waits for the total budget (in Server._starved)
        self.queued = 0  # bytes in self.out (as of the last _send)
        self.executing = 0  # bytes held by requests in workers or asynchronous
        self.extra = 0  # receive buffer beyond RECV_BUFFER
        self.charged = 0  # queued + executing, as counted in Server.inflight_bytes
        self.born = self.active = monotonic()
        self.held = False  # not read from while parsed requests wait to be issued
        self.inflight = 0  # requests out in worker threads
        self.closing = False  # after DISC or EOF: close once replies are out
        self.closed = False
        self.requests = 0
        self.source: Source | None = None
        self.aio = None  # the source's asynchronous way in, when it has one
        self.waiting: deque = deque()  # parsed requests beyond the in-flight window
        self.futures: dict = {}  # requests in worker threads: future -> handle
        self.export_name = ""
        self.events: list = []
        #: the turns this connection's worker requests take (None: parallel)
        self.turns: _Turns | None = None
        self.in_turns = False  # in turns.ready, with requests in self.waiting
        self.benched = False  # serialize_connections: waits for the export's connection



def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # nothing there now: the error is not about its kind

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
        self._conns: dict[int, _Conn] = {}
        self._next_cid = 1
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers
        # The thread model of each export's stack (see the module docstring).
        self.thread_models = {name: stack_thread_model(s) for name, s in exports.items()}
        self._export_turns = {name: _Turns() for name, m in self.thread_models.items()
                              if m in (SERIALIZE_ALL_REQUESTS, SERIALIZE_CONNECTIONS)}
        self._admissions = {name: _Admission() for name, m in self.thread_models.items()
                            if m == SERIALIZE_CONNECTIONS}
        # Sources the loop drives asynchronously (an upstream NBD server, a
        # URL): one engine per source, asked for once here (a source may make
        # a new one for each server) and attached with the loop. A stack
        # that serialises is called through its plain methods instead.
        self._export_aios = {name: s.aio if self.thread_models[name] == PARALLEL else None
                             for name, s in exports.items()}
        self._aios = {id(a): a for a in self._export_aios.values() if a is not None}
        self._async_ready: dict[int, _Conn] = {}  # connections with replies to send
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
        self._starved: dict[int, _Conn] = {}
        self._resuming = False

    # --- listening ---------------------------------------------------------

    def listen_unix(self, path: str) -> None:
        """The socket appears at ``path`` already listening: it is bound
        under a temporary name beside it and linked into place (link(2)
        refuses an existing name, as bind does), so a client that waits for
        the path to exist is never refused."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        head, tail = os.path.split(path)
        temp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
        if len(os.fsencode(temp)) >= 108:  # sun_path: bind the name itself
            self._listen(sock, path, path)
            return
        try:
            os.unlink(temp)  # left by a killed process of our pid
        except OSError:
            pass
        self._listen(sock, temp, path)
        try:
            os.link(temp, path)
        except OSError as e:
            self._listeners.remove(sock)
            if self.loop is not None:
                self.loop.remove_reader(sock.fileno())
            sock.close()
            code = errno.EADDRINUSE if e.errno == errno.EEXIST else e.errno
            why = ("something that is not a socket is there (give a new path)"
                   if code == errno.EADDRINUSE and not _is_socket(path) else os.strerror(code))
            raise OSError(code, f"cannot listen on {path}: {why}") from None
        finally:
            try:
                os.unlink(temp)
            except OSError:
                pass

    def listen_tcp(self, host: str, port: int) -> int:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OSError(errno.EADDRNOTAVAIL,
                          f"cannot listen on {host}:{port}: {e.strerror}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen(sock, addr, f"{host}:{port}")
        return sock.getsockname()[1]

    def _listen(self, sock: socket.socket, addr, label: str) -> None:
        try:
            sock.bind(addr)
        except OSError as e:
            unix = sock.family == socket.AF_UNIX
            sock.close()
            why = e.strerror
            if e.errno == errno.EADDRINUSE and unix and not _is_socket(addr):
                why = "something that is not a socket is there (give a new path)"
            raise OSError(e.errno, f"cannot listen on {label}: {why}") from None
        if sock.family == socket.AF_UNIX:
            # Only our user may connect. Between bind and listen a connect is
            # refused, so there is no window with the umask's wider mode.
            os.chmod(addr, 0o600)
        sock.listen(128)
        self.add_listener(sock)

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
        if self.handshake_timeout or self.idle_timeout:
            loop.call_later(SWEEP_INTERVAL, self._sweep)
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        for aio in self._aios.values():
            aio.attach(loop, self._flush_async)

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
        if self._pool is not None:
            # Queued requests are dropped; running ones finish before the
            # sources are closed under them (a network read is bounded by its
            # timeout; a stream waiting for its reader by the caller's abort).
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _refuse_pending(self, conn: _Conn) -> None:
        """At shutdown: requests received but not started get NBD_ESHUTDOWN
        (proto.md), sent as far as the socket takes them without waiting.
        Requests already running cannot be answered: the socket closes."""
        if conn.closed or conn.source is None:
            return
        proto = conn.proto
        handles = []
        for fut, (handle, _cost) in list(conn.futures.items()):
            if fut.cancel():
                handles.append(handle)
        for (cmd, _flags, handle, *_rest), _now in conn.waiting:
            if cmd != P.CMD_DISC:
                handles.append(handle)
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
            conn.out.append(proto.reply_error(handle, P.NBD_ESHUTDOWN, "server is shutting down"))
        try:
            while conn.out:
                n = conn.sock.send(conn.out[0])
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
            conn = _Conn(self, sock, cid, peer)
            self._conns[cid] = conn
            # Registered before the greeting is sent: a peer already gone
            # makes _send close the connection, which then unregisters it.
            self.loop.add_reader(conn.fd, self._on_readable, conn)
            conn.out.append(conn.proto.data_to_send())
            self._send(conn)

    def _close(self, conn: _Conn) -> None:
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

    def _on_readable(self, conn: _Conn) -> None:
        try:
            self._readable(conn)
        except Exception:  # noqa: BLE001 - a bug in one connection closes that one
            self._crashed(conn)

    def _crashed(self, conn: _Conn) -> None:
        """An unexpected exception while serving ``conn``: log it and close
        the socket, so the peer sees the end instead of waiting forever."""
        log.exception("connection %d: internal error: closing it", conn.cid)
        conn.out.clear()
        try:
            self._close(conn)
        except Exception:  # noqa: BLE001 - a failing subscriber must not keep it open
            log.exception("connection %d: error while closing", conn.cid)
            conn.sock.close()

    def _readable(self, conn: _Conn) -> None:
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

    def _read_tls_buffered(self, conn: _Conn) -> None:
        """TLS may hold decrypted input the loop cannot see (a full receive
        buffer stopped the read): read it as if the socket were readable."""
        if (conn.tls.buffered and conn.reading and not conn.paused and not conn.held
                and not conn.benched and not conn.closed):
            self.loop.call_soon_threadsafe(self._on_readable_if_open, conn)

    def _on_readable_if_open(self, conn: _Conn) -> None:
        if (not conn.closed and conn.reading and not conn.paused and not conn.held
                and not conn.benched):
            self._on_readable(conn)

    def _make_room(self, conn: _Conn) -> bool:
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
            if end - start >= P.REQUEST_SIZE:
                magic, _f, cmd, _h, _o, length = P.REQUEST.unpack_from(conn.buf, start)
                if cmd == P.CMD_WRITE and length <= P.MAX_ACCEPTED:
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

    def _shrink(self, conn: _Conn) -> None:
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

    def _apply_reading(self, conn: _Conn) -> None:
        """Watch the socket for requests unless closing, paused or held."""
        if (conn.reading and not conn.paused and not conn.held and not conn.starved
                and not conn.benched):
            self.loop.add_reader(conn.fd, self._on_readable, conn)
            if conn.tls is not None:
                self._read_tls_buffered(conn)
        else:
            self.loop.remove_reader(conn.fd)

    def _stop_reading(self, conn: _Conn) -> None:
        if conn.reading:
            conn.reading = False
            self.loop.remove_reader(conn.fd)

    def _handshake(self, conn: _Conn) -> None:
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
            conn.aio = self._export_aios[name]
            self._take_model(conn)
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

    def _take_model(self, conn: _Conn) -> None:
        """A connection enters transmission: its turns, and under
        serialize_connections its place in the queue for the export."""
        name = conn.export_name
        model = self.thread_models[name]
        if model == PARALLEL:
            return
        conn.turns = self._export_turns.get(name) or _Turns()
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

    def _admit_next(self, conn: _Conn) -> None:
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

    def _take_turns(self, turns: _Turns) -> None:
        """Start the next waiting request of the connections sharing
        ``turns``, unless one is running: one connection after another."""
        ready = turns.ready
        while not turns.busy and ready:
            conn = ready.popleft()
            if conn.closed or not conn.waiting:
                conn.in_turns = False
                continue
            req, now = conn.waiting.popleft()
            if conn.waiting:
                ready.append(conn)
            else:
                conn.in_turns = False
            turns.busy = True
            cmd, length = req[0], req[4]
            self._submit(conn, req, req[5], now,
                         length if cmd <= P.CMD_WRITE and not req[6] else 0)

    def _start_tls(self, conn: _Conn) -> None:
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
        conn.sock = conn.tls = TLSSocket(conn.sock, self.tls.context, received)
        if received:
            self.loop.call_soon_threadsafe(self._on_readable_if_open, conn)

    def _transmission(self, conn: _Conn) -> None:
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
                self._stop_reading(conn)
                # Carry out what was parsed before the bad request, then close.
                conn.closing = True
            src = conn.source
            if conn.aio is not None:
                self._dispatch_async(conn, reqs)
            elif src.blocking:
                self._dispatch_blocking(conn, reqs)
            else:
                self._execute(conn, reqs)
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

    def _backlog(self, conn: _Conn) -> bool:
        """Whether a complete request waits in the receive buffer."""
        start, end = conn.start, conn.end
        if end - start < P.REQUEST_SIZE:
            return False
        cmd, length = P.REQUEST.unpack_from(conn.buf, start)[2::3]
        return cmd != P.CMD_WRITE or end - start >= P.REQUEST_SIZE + length \
            or length > P.MAX_ACCEPTED

    # --- the memory budget --------------------------------------------------

    def _recharge(self, conn: _Conn) -> None:
        new = conn.queued + conn.executing
        self.inflight_bytes += new - conn.charged
        conn.charged = new
        self._note_peak()

    def _note_peak(self) -> None:
        total = self.inflight_bytes + self.buffer_bytes
        if total > self.peak_bytes:
            self.peak_bytes = total

    def _pause(self, conn: _Conn) -> None:
        if not conn.paused:
            conn.paused = True
            self._apply_reading(conn)

    def _starve(self, conn: _Conn) -> None:
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

    def _resume(self, conn: _Conn) -> None:
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

    def _crashed_quietly(self, conn: _Conn) -> None:
        conn.out.clear()
        try:
            self._close(conn)
        except Exception:  # noqa: BLE001
            log.exception("connection %d: error while closing", conn.cid)

    # --- carrying out requests --------------------------------------------

    def _execute(self, conn: _Conn, reqs: list) -> None:
        """Carry out requests inline (fast sources) and queue their replies."""
        proto = conn.proto
        src = conn.source
        out = conn.out
        append = out.append
        events = conn.events
        eappend = events.append
        view = conn.view
        cid = conn.cid
        ename = conn.export_name
        structured = proto.structured
        simple_pack = P.SIMPLE_REPLY.pack
        data_pack = P.STRUCTURED_DATA.pack
        view_for = src.view_for
        scan_holes = structured and src.can_extents
        now = monotonic()
        conn.requests += len(reqs)
        for req in reqs:
            cmd, flags, handle, offset, length, pstart, err = req
            if err == 0 and cmd == 0:  # READ: the hot path
                try:
                    if scan_holes and length >= HOLE_SCAN_MIN and not flags & P.CMD_FLAG_DF:
                        self._read_chunks(conn, src, handle, offset, length)
                    else:
                        data = view_for(offset, length)
                        if data is None:
                            data = src.pread(offset, length)
                            if len(data) != length:
                                raise _short_read(offset, length, data)
                        if structured:
                            append(data_pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                             P.REPLY_TYPE_OFFSET_DATA, handle, length + 8, offset))
                        else:
                            append(simple_pack(P.SIMPLE_REPLY_MAGIC, 0, handle))
                        append(data)
                except Exception as e:  # noqa: BLE001 - any failure is this request's error
                    err = self._fail(conn, e)
                    append(proto.reply_error(handle, err, str(e)))
            elif err == 0:
                if cmd == P.CMD_DISC:
                    conn.closing = True
                    self._stop_reading(conn)
                    eappend(make_request((cid, ename, cmd, offset, length, flags, now, 0.0, 0)))
                    break
                if length > INLINE_MAX and cmd in _OFFLOADED and conn.turns is None:
                    # A big zero, trim or cache may be thousands of writes (a
                    # block device with no fast zeroing): done in a worker so
                    # the loop, and every other connection, go on. Not under
                    # a serialising model: it would overlap what runs here.
                    conn.requests -= 1  # counted again by the blocking path
                    self._dispatch_blocking(conn, [req])
                    continue
                try:
                    reply = self._other(conn, src, cmd, flags, handle, offset, length,
                                        view[pstart:pstart + length] if pstart >= 0 else None)
                except Exception as e:  # noqa: BLE001
                    err = self._fail(conn, e)
                    reply = proto.reply_error(handle, err, str(e))
                append(reply)
            else:
                append(proto.reply_error(handle, err, _ERROR_TEXT.get(err, "")))
            eappend(make_request((cid, ename, cmd, offset, length, flags, now,
                                  monotonic() - now, err)))

    def _fail(self, conn: _Conn, e: Exception) -> int:
        if isinstance(e, OSError):
            return P.wire_error(e.errno)
        log.exception("connection %d: unexpected error", conn.cid)
        return P.NBD_EIO

    def _read_chunks(self, conn, src, handle, offset, length) -> None:
        """A structured read: data chunks, and hole chunks for ranges that
        read as zeroes (so the client need not receive them).

        Every piece is read before anything is queued: once a chunk header
        is out its payload must follow (proto.md: the server "MUST still
        complete the transmission of any current chunk"), so a read that
        fails half-way must leave nothing behind but the error reply."""
        proto = conn.proto
        exts = src.extents(offset, length)
        pieces = P.clip_extents(exts, offset, length, False, fill=True)
        chunks = []
        append = chunks.append
        pos = offset
        last = len(pieces) - 1
        for i, (n, f) in enumerate(pieces):
            done = i == last
            if f & EXTENT_ZERO:
                append(proto.read_hole_chunk(handle, pos, n, done))
            else:
                data = src.view_for(pos, n)
                if data is None:
                    data = src.pread(pos, n)
                    if len(data) != n:
                        raise _short_read(pos, n, data)
                append(proto.read_data_header(handle, pos, n, done))
                append(data)
            pos += n
        conn.out.extend(chunks)

    def _other(self, conn, src, cmd, flags, handle, offset, length, payload) -> bytes:
        """Everything but READ and DISC; returns the reply bytes."""
        proto = conn.proto
        fua = bool(flags & P.CMD_FLAG_FUA)
        if cmd == P.CMD_WRITE:
            src.pwrite(offset, payload, fua)
        elif cmd == P.CMD_FLUSH:
            src.flush()
        elif cmd == P.CMD_TRIM:
            src.trim(offset, length, fua)
        elif cmd == P.CMD_WRITE_ZEROES:
            try:
                src.zero(offset, length, may_trim=not flags & P.CMD_FLAG_NO_HOLE, fua=fua,
                         fast=bool(flags & P.CMD_FLAG_FAST_ZERO))
            except FastZeroUnsupported:
                return proto.reply_error(handle, P.NBD_ENOTSUP, "fast zero not supported")
        elif cmd == P.CMD_CACHE:
            # Advisory: a bounded prefetch of the start is all a source does.
            src.cache(offset, min(length, CACHE_MAX))
        elif cmd == P.CMD_BLOCK_STATUS:
            # Ask for a bounded window: the client only needs the start.
            want = min(length, 1 << 30)
            exts = src.extents(offset, want) if src.can_extents else [(offset, want, 0)]
            return proto.reply_block_status(
                handle, P.clip_extents(exts, offset, want, bool(flags & P.CMD_FLAG_REQ_ONE)))
        return proto.reply_header(handle)

    def _dispatch_blocking(self, conn: _Conn, reqs: list) -> None:
        """Run requests of a blocking source in worker threads (one at a
        time, taking turns, under a serialising model)."""
        conn.requests += len(reqs)
        now = monotonic()
        turns = conn.turns
        view_for = conn.source.view_for if turns is None else _no_view
        for req in reqs:
            cmd, flags, handle, offset, length, pstart, err = req
            if cmd == P.CMD_READ and not err:
                # A blocking source may still hold some ranges in memory or
                # in a mapped file (a qcow2's plain clusters): no thread.
                data = view_for(offset, length)
                if data is not None:
                    self._read_inline(conn, handle, offset, length, flags, data, now)
                    continue
            if cmd == P.CMD_DISC and not err:
                conn.closing = True
                self._stop_reading(conn)
                conn.events.append(make_request((conn.cid, conn.export_name, cmd, offset,
                                                 length, flags, now, 0.0, 0)))
                break
            payload = bytes(conn.view[pstart:pstart + length]) if pstart >= 0 else None
            cost = length if cmd <= P.CMD_WRITE and not err else 0
            conn.executing += cost
            if turns is None:
                self._submit(conn, req, payload, now, cost)
                continue
            # Waits its turn, as an asynchronous source's requests wait (the
            # payload in the place of its offset in the receive buffer).
            conn.waiting.append(((cmd, flags, handle, offset, length, payload, err), now))
            if not conn.in_turns:
                conn.in_turns = True
                turns.ready.append(conn)
        if turns is not None:
            self._take_turns(turns)

    def _submit(self, conn: _Conn, req: tuple, payload, now: float, cost: int) -> None:
        """Hand one request to a worker thread (``cost``, the bytes it
        holds, is charged to conn.executing already)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="diskwatch-io")
        conn.inflight += 1
        fut = self._pool.submit(self._run_one, conn, req, payload, now)
        conn.futures[fut] = (req[2], cost)
        loop = self.loop
        fut.add_done_callback(
            lambda f, c=conn: loop.call_soon_threadsafe(self._finish_blocking, c, f))

    def _run_one(self, conn: _Conn, req: tuple, payload, now: float):
        """In a worker thread: carry out one request, return (replies, event)."""
        cmd, flags, handle, offset, length, pstart, err = req
        proto = conn.proto
        src = conn.source
        replies: list = []
        if not err:
            try:
                if cmd == P.CMD_READ:
                    data = src.pread(offset, length)
                    if len(data) != length:
                        raise _short_read(offset, length, data)
                    replies = [proto.read_data_header(handle, offset, length), data]
                else:
                    replies = [self._other(conn, src, cmd, flags, handle, offset, length,
                                           payload)]
            except Exception as e:  # noqa: BLE001
                err = self._fail(conn, e)
                replies = [proto.reply_error(handle, err, str(e))]
        else:
            replies = [proto.reply_error(handle, err, _ERROR_TEXT.get(err, ""))]
        event = make_request((conn.cid, conn.export_name, cmd, offset, length, flags, now,
                              monotonic() - now, err))
        return replies, event

    def _finish_blocking(self, conn: _Conn, fut) -> None:
        conn.inflight -= 1
        _handle, cost = conn.futures.pop(fut, (0, 0))
        conn.executing -= cost
        turns = conn.turns
        if turns is not None:
            turns.busy = False
            if not fut.cancelled():  # cancelled: the server is shutting down
                self._take_turns(turns)
        if conn.closed or fut.cancelled():
            return
        try:
            replies, event = fut.result()
            conn.out.extend(replies)
            self._send(conn)
            self.bus.publish_requests([event])
            if self._watchers:
                self._publish_watched()
            self._maybe_close(conn)
        except Exception:  # noqa: BLE001
            self._crashed(conn)

    # --- asynchronous sources (driven from this loop) -----------------------

    def _dispatch_async(self, conn: _Conn, reqs: list) -> None:
        """Issue requests to an asynchronous source. At most ASYNC_WINDOW per
        connection are in flight (so at most that many read buffers exist);
        the rest wait, parsed, and the connection is not read from until
        they are issued."""
        now = monotonic()
        conn.requests += len(reqs)
        waiting = conn.waiting
        view_for = conn.source.view_for
        for req in reqs:
            if req[6] == 0 and req[0] == P.CMD_READ:
                # Ranges the source can hand over at once (a read-only
                # qcow2's plain clusters, mapped) need no round trip.
                data = view_for(req[3], req[4])
                if data is not None:
                    self._read_inline(conn, req[2], req[3], req[4], req[1], data, now)
                    continue
            if req[6] == 0 and req[0] == P.CMD_WRITE:
                # The receive buffer is reused: a write keeps its own payload.
                pstart = req[5]
                req = (*req[:5], bytes(conn.view[pstart:pstart + req[4]]), 0)
            if req[6] == 0 and req[0] <= P.CMD_WRITE:
                conn.executing += req[4]  # released when its reply is queued
            waiting.append((req, now))
        self._issue_async(conn)

    def _read_inline(self, conn: _Conn, handle, offset, length, flags, data, now) -> None:
        """Queue the reply of a read a source answered with a buffer."""
        conn.out.append(conn.proto.read_data_header(handle, offset, length))
        conn.out.append(data)
        conn.events.append(make_request((conn.cid, conn.export_name, P.CMD_READ, offset,
                                         length, flags, now, monotonic() - now, 0)))

    def _issue_async(self, conn: _Conn) -> None:
        waiting = conn.waiting
        aio = conn.aio
        proto = conn.proto
        # Issued even while the connection is paused: a waiting request is
        # charged to the budget from its parse (conn.executing), so issuing
        # it adds nothing; holding it back could stall for good (paused
        # until executing drains, which waits for the issue).
        while waiting and conn.inflight < ASYNC_WINDOW:
            (cmd, flags, handle, offset, length, payload, err), now = waiting.popleft()
            if err:
                conn.out.append(proto.reply_error(handle, err, _ERROR_TEXT.get(err, "")))
                conn.events.append(make_request((conn.cid, conn.export_name, cmd, offset,
                                                 length, flags, now, monotonic() - now, err)))
                continue
            if cmd == P.CMD_DISC:
                conn.closing = True
                self._stop_reading(conn)
                waiting.clear()
                conn.events.append(make_request((conn.cid, conn.export_name, cmd, offset,
                                                 length, flags, now, 0.0, 0)))
                break
            conn.inflight += 1
            done = _AsyncReply(self, conn, cmd, flags, handle, offset, length, now)
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
                done.length = min(length, 1 << 30)
                aio.extents(offset, done.length, done)
            else:
                done(None, OSError(errno.EINVAL, "unknown command"))
        aio.issued()
        # Not read from while requests wait; read again once they are issued.
        held = bool(waiting)
        if held != conn.held:
            conn.held = held
            self._apply_reading(conn)

    def _flush_async(self) -> None:
        """After a batch of completions: send the replies, publish the events,
        issue what waited."""
        ready, self._async_ready = self._async_ready, {}
        for conn in ready.values():
            if conn.closed:
                continue
            try:
                if conn.waiting:
                    self._issue_async(conn)
                self._send(conn)
                if conn.events:
                    events, conn.events = conn.events, []
                    self.bus.publish_requests(events)
                self._maybe_close(conn)
            except Exception:  # noqa: BLE001
                self._crashed(conn)
        if self._watchers:
            self._publish_watched()

    def _publish_watched(self) -> None:
        for layer in self._watchers:
            events = layer.take_events()
            if events:
                self.bus.publish_requests(events)

    # --- sending -----------------------------------------------------------

    def _send(self, conn: _Conn) -> None:
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
        busy = bool(out) or (tls is not None and tls.pending)
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

    def _on_writable(self, conn: _Conn) -> None:
        try:
            self._writable(conn)
        except Exception:  # noqa: BLE001
            self._crashed(conn)

    def _writable(self, conn: _Conn) -> None:
        conn.active = monotonic()  # the client reads: it is not idle
        self._send(conn)
        if conn.waiting and conn.aio is not None and not conn.closed:
            self._issue_async(conn)
            self._send(conn)
        self._maybe_close(conn)

    def _maybe_close(self, conn: _Conn) -> None:
        if (conn.closing and not conn.closed and not conn.out and conn.inflight == 0
                and not conn.waiting and not (conn.tls is not None and conn.tls.pending)):
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


def _short_read(offset: int, length: int, data) -> OSError:
    """A source that returned fewer bytes than asked: an EIO for that read
    (sending them would put the reply stream out of step)."""
    return OSError(errno.EIO, f"source returned {len(data)} of {length} bytes at {offset}")


def _no_view(offset: int, length: int) -> None:
    """``view_for`` of a stack that serialises: every read is a call in turn."""
    return None


class _Turns:
    """One request at a time in worker threads for the connections that
    share it (one connection's own under serialize_requests, the export's
    under serialize_all_requests and serialize_connections). ``ready``:
    connections with requests waiting, each taking one turn and going to
    the back. Used from the loop's thread only."""

    __slots__ = ("busy", "ready")

    def __init__(self) -> None:
        self.busy = False
        self.ready: deque[_Conn] = deque()


class _Admission:
    """serialize_connections: the connection served, and those waiting for
    it to end (in the order they finished their handshakes)."""

    __slots__ = ("serving", "queue")

    def __init__(self) -> None:
        self.serving: _Conn | None = None
        self.queue: deque[_Conn] = deque()


ASYNC_WINDOW = 64  # requests in flight per connection to an asynchronous source


class _AsyncReply:
    """The completion of one request to an asynchronous source: queues its
    reply and its event (sent by ``_flush_async`` after the batch)."""

    __slots__ = ("server", "conn", "cmd", "flags", "handle", "offset", "length", "start")

    def __init__(self, server, conn, cmd, flags, handle, offset, length, start):
        self.server = server
        self.conn = conn
        self.cmd = cmd
        self.flags = flags
        self.handle = handle
        self.offset = offset
        self.length = length
        self.start = start

    def __call__(self, result, error) -> None:
        conn = self.conn
        conn.inflight -= 1
        if self.cmd <= P.CMD_WRITE:
            conn.executing -= self.length
        if conn.closed:
            return
        proto = conn.proto
        cmd = self.cmd
        err = 0
        if error is not None:
            if isinstance(error, FastZeroUnsupported):
                err = P.NBD_ENOTSUP
            else:
                err = P.wire_error(error.errno) if isinstance(error, OSError) else P.NBD_EIO
            conn.out.append(proto.reply_error(self.handle, err, str(error)))
        elif cmd == P.CMD_READ:
            conn.out.append(proto.read_data_header(self.handle, self.offset, self.length))
            conn.out.append(result)
        elif cmd == P.CMD_BLOCK_STATUS:
            conn.out.append(proto.reply_block_status(self.handle, P.clip_extents(
                result, self.offset, self.length, bool(self.flags & P.CMD_FLAG_REQ_ONE))))
        else:
            conn.out.append(proto.reply_header(self.handle))
        now = monotonic()
        conn.events.append(make_request((conn.cid, conn.export_name, cmd, self.offset,
                                         self.length, self.flags, self.start,
                                         now - self.start, err)))
        self.server._async_ready[conn.cid] = conn


_ERROR_TEXT = {
    P.NBD_EINVAL: "invalid request (range, flags or length)",
    P.NBD_ENOSPC: "request goes past the end of the disk",
    P.NBD_EPERM: "export is read-only",
    P.NBD_EOVERFLOW: "request larger than the maximum payload",
    P.NBD_ENOTSUP: "not supported",
}


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
