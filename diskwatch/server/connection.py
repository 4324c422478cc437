"""One client connection's state: what the transport (``server.py``) and
the request path (``dispatch.py``) share, and nothing that does I/O."""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import Any

from ..sources.base import Source
from . import protocol as P

RECV_BUFFER = 256 * 1024  # grows to hold one maximal write, then shrinks back
HANDSHAKE_BUFFER = 16 * 1024


class Turns:
    """One request at a time in worker threads for the connections that
    share it (one connection's own under serialize_requests, the export's
    under serialize_all_requests and serialize_connections). ``ready``:
    connections with requests waiting, each taking one turn and going to
    the back. Used from the loop's thread only."""

    __slots__ = ("busy", "ready")

    def __init__(self) -> None:
        self.busy = False
        self.ready: deque[Connection] = deque()


class Connection:
    """One client connection (transport state; protocol state is ``proto``)."""

    def __init__(self, sock: socket.socket, cid: int, peer: str, proto: P.ServerConnection):
        self.sock = sock
        self.fd = sock.fileno()
        self.cid = cid
        self.peer = peer
        self.proto = proto
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
        self.born = self.active = time.monotonic()
        self.held = False  # not read from while parsed requests wait to be issued
        self.inflight = 0  # requests out in worker threads or asynchronous
        self.closing = False  # after DISC or EOF: close once replies are out
        self.closed = False
        self.requests = 0
        self.source: Source | None = None
        self.export_name = ""
        self.events: list = []
        # --- the request path's (dispatch.py), set when transmission starts
        #: the dispatch.Engine that carries out this connection's requests
        self.engine: Any = None
        #: its requests' one completion (dispatch.completion)
        self.complete: Any = None
        #: the source's view_for, or one that never answers (a serialised stack)
        self.view_for: Any = None
        #: reads this long (and not DF) are read in pieces, holes left out
        self.scan_from = 1 << 62
        #: requests taken but not started (waiting their turn, or beyond the
        #: asynchronous window): (Request, payload, start time)
        self.waiting: deque = deque()
        self.futures: dict = {}  # requests in worker threads: future -> (Request, start)
        #: the turns this connection's worker requests take (None: parallel)
        self.turns: Turns | None = None
        self.in_turns = False  # in turns.ready, with requests in self.waiting
        self.benched = False  # serialize_connections: waits for the export's connection
