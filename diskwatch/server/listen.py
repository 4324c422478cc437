"""Listening sockets for the server: unix (0600, appearing only once it
listens) and TCP, with errors a person can act on."""

from __future__ import annotations

import errno
import os
import socket
import stat


def listen_unix(path: str) -> socket.socket:
    """A socket listening at ``path``. It appears there already listening:
    it is bound under a temporary name beside it and linked into place
    (link(2) refuses an existing name, as bind does), so a client that waits
    for the path to exist is never refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    head, tail = os.path.split(path)
    temp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    if len(os.fsencode(temp)) >= 108:  # sun_path: bind the name itself
        _listen(sock, path, path)
        return sock
    try:
        os.unlink(temp)  # left by a killed process of our pid
    except OSError:
        pass
    _listen(sock, temp, path)
    try:
        os.link(temp, path)
    except OSError as e:
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
    return sock


def listen_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(errno.EADDRNOTAVAIL,
                      f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _listen(sock, addr, f"{host}:{port}")
    return sock


def _listen(sock: socket.socket, addr, label: str) -> None:
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


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # nothing there now: the error is not about its kind
