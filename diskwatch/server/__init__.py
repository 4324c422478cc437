"""The NBD server: protocol.py (sans-IO, all framing), dispatch.py (the one
request path: engines for inline, worker-thread and asynchronous sources),
server.py (the transport) with connection.py, listen.py, loop.py (its epoll
loop) and tls.py; captive.py (--run) and activation.py (systemd sockets)."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field

from ..events import Bus
from ..sources.base import Source
from .server import Server, ServerThread


def nbd_uri(kind: str, addr, export: str = "", tls: bool = False) -> str:
    """The NBD URI (as qemu, libnbd and libguestfs take it) for an address;
    with ``tls``, the nbds scheme (as nbdkit's $uri under --tls)."""
    name = urllib.parse.quote(export)
    scheme = "nbds" if tls else "nbd"
    if kind == "unix":
        return f"{scheme}+unix:///{name}?socket={urllib.parse.quote(addr)}"
    host, port = addr
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}/{name}"


@dataclass
class RunningServer:
    """A Server serving from its own thread; what tests and the bmap
    generator use. ``stop()`` closes everything and removes a private socket."""

    server: Server
    thread: ServerThread
    socket_path: str | None = None
    port: int | None = None
    export: str = ""
    _private_dir: str | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        if self.socket_path:
            return nbd_uri("unix", self.socket_path, self.export, self.server.tls is not None)
        return nbd_uri("tcp", ("127.0.0.1", self.port), self.export, self.server.tls is not None)

    def uri_for(self, export: str) -> str:
        if self.socket_path:
            return nbd_uri("unix", self.socket_path, export, self.server.tls is not None)
        return nbd_uri("tcp", ("127.0.0.1", self.port), export, self.server.tls is not None)

    def stop(self) -> None:
        self.thread.stop()
        if self._private_dir:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def private_socket_path() -> tuple[str, str]:
    """A socket path in a new 0700 directory (``-U -``): (dir, path)."""
    d = tempfile.mkdtemp(prefix="diskwatch-")
    os.chmod(d, 0o700)
    return d, os.path.join(d, "nbd.sock")


def serve_in_thread(exports: dict[str, Source], bus: Bus | None = None, *,
                    unix_path: str | None = None, tcp_port: int | None = None,
                    tcp_host: str = "127.0.0.1", tls=None, **limits) -> RunningServer:
    """Start serving ``exports`` from a background thread. With neither
    ``unix_path`` nor ``tcp_port``, a private unix socket is made. ``tls``:
    a tls.TLSConfig (see make_tls). ``limits``: max_connections,
    handshake_timeout, idle_timeout (see Server)."""
    server = Server(exports, bus, tls=tls, **limits)
    private = None
    port = None
    if unix_path is None and tcp_port is None:
        private, unix_path = private_socket_path()
    if unix_path is not None:
        server.listen_unix(unix_path)
    if tcp_port is not None:
        port = server.listen_tcp(tcp_host, tcp_port)
    thread = ServerThread(server).start()
    return RunningServer(server, thread, unix_path, port, server.default_export, private)


__all__ = ["Server", "ServerThread", "RunningServer", "serve_in_thread", "nbd_uri",
           "private_socket_path"]
