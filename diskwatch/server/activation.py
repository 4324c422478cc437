"""Socket activation: listening sockets handed over by whoever started us.

systemd (a ``.socket`` unit) and libnbd (``nbdinfo -- [ diskwatch IMAGE ]``,
nbdcopy, nbdsh) start a server this way, as nbdkit and qemu-nbd accept it:

    LISTEN_PID=<our pid>  LISTEN_FDS=<n>  [LISTEN_FDNAMES=a:b:...]
    fds 3 .. 3+n-1 are listening sockets, already bound

The variables are for the process whose pid LISTEN_PID names: inherited by
anyone else (a child of ours, a shell in between) they are not meant for it,
so they are ignored when the pid differs and removed from our environment
either way, and the fds are made close-on-exec (sd_listen_fds(unset=1) does
the same), so a captive command does not inherit them.
"""

from __future__ import annotations

import os
import socket

from ..errors import DiskwatchError

SD_LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(DiskwatchError):
    """The socket-activation variables are set for us but unusable."""


def activated_sockets(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets passed to this process, in fd order; [] when not
    socket-activated. Consumes the variables (removes them from ``environ``,
    ``os.environ`` by default)."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in _VARIABLES:
        env.pop(name, None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for another process (we inherited it)
        n = int(count)
    except ValueError:
        raise ActivationError(f"socket activation: LISTEN_PID={pid!r} LISTEN_FDS={count!r} "
                              "are not numbers") from None
    if not 1 <= n <= 64:
        raise ActivationError(f"socket activation: LISTEN_FDS={count!r}: expected 1 to 64 fds")
    socks = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
            socks.append(_listening_socket(fd))
    except BaseException:
        for s in socks:
            s.detach()  # not ours to close on a failure: leave the fds as given
        raise
    return socks


def _listening_socket(fd: int) -> socket.socket:
    try:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)  # family and type from the fd itself
    except OSError as e:
        raise ActivationError(f"socket activation: fd {fd} is not a socket ({e.strerror})"
                              ) from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                              socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"socket activation: fd {fd} is not a listening stream socket "
                              "(a systemd .socket unit needs Accept=no)")
    return sock


def describe(sock: socket.socket) -> tuple[str, object]:
    """(kind, address) of a listening socket as ``nbd_uri`` and ``captive_env``
    take them: ("unix", path) or ("tcp", (host, port))."""
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(addr, bytes):  # an abstract socket: "\0name"
            addr = "@" + addr[1:].decode(errors="replace")
        return "unix", addr
    return "tcp", (addr[0], addr[1])
