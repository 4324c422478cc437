"""Fixtures that start diskwatch servers (see fixtures_images for disk images).

``server_image`` is a 32 MiB raw image built once per session: an ext4
filesystem made with ``mkfs.ext4 -d`` from a small directory tree (16 MiB,
itself sparse), a hole, 4 MiB of random data, and a hole to the end. Tests
that write get their own sparse copy (``rw_image``). ``serve`` starts an
in-process server (``serve_in_thread``) on a private unix socket or an
ephemeral TCP port and records every event published on its bus; everything
it starts is stopped at teardown.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from diskwatch.events import Bus, ConnectionEvent, Request
from diskwatch.server import RunningServer, serve_in_thread
from diskwatch.sources.base import ReadOnly
from diskwatch.sources.file import FileSource
from diskwatch.sources.snapshot import Snapshot

MiB = 1024 * 1024
IMAGE_SIZE = 32 * MiB
FS_SIZE = 16 * MiB
#: layout of ``server_image``: (offset, length, what)
HOLE1 = (16 * MiB, 4 * MiB)
RANDOM = (20 * MiB, 4 * MiB)
HOLE2 = (24 * MiB, 8 * MiB)
RANDOM_SEED = 20240611

#: Debian's interpreter: the one with libnbd's ``nbd`` module (for nbdsh).
SYSTEM_PYTHON = "/usr/bin/python3"
#: the installed console script, next to the interpreter running the tests
DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))
#: PATH for subprocesses: Debian's tools and python3 first (nbdsh's shebang)
SUBPROCESS_ENV = {**os.environ, "PATH": "/usr/bin:/bin:" + os.environ.get("PATH", "")}


def md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_at(path: str | Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def pattern(seed: int, length: int) -> bytes:
    """Deterministic non-zero-ish bytes for writes that tests check back."""
    return random.Random(seed).randbytes(length)


@dataclass
class ServerImage:
    path: Path
    size: int
    md5: str
    files: dict[str, bytes] = field(default_factory=dict)


def _build_server_image(work: Path) -> ServerImage:
    for tool in ("mkfs.ext4",):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            pytest.skip(f"{tool} is not installed (apt-get install e2fsprogs)")
    tree = work / "tree"
    files: dict[str, bytes] = {}
    rng = random.Random(1)
    for rel, size in {"etc/hostname": 9, "etc/motd": 300, "boot/vmlinuz": 900_000,
                      "var/log/syslog": 123_456, "home/user/notes.txt": 5000,
                      "home/user/photo.raw": 2 * MiB}.items():
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size)
        p.write_bytes(data)
        files["/" + rel] = data
    fs = work / "fs.img"
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    subprocess.run([mkfs, "-q", "-F", "-E", "root_owner=0:0", "-d", str(tree), str(fs),
                    str(FS_SIZE // 1024)], check=True, capture_output=True)
    image = work / "server.img"
    # Copy the (sparse) filesystem keeping its holes, then extend.
    subprocess.run(["cp", "--sparse=always", str(fs), str(image)], check=True)
    with open(image, "r+b") as f:
        f.truncate(IMAGE_SIZE)
        f.seek(RANDOM[0])
        f.write(random.Random(RANDOM_SEED).randbytes(RANDOM[1]))
    return ServerImage(image, IMAGE_SIZE, md5(image), files)


@pytest.fixture
def no_loop_errors(caplog):
    """An exception escaping a callback of the server's loop is a bug even if
    the client saw nothing (the loop logs it and carries on). Server test
    modules use it for every test (``pytest.mark.usefixtures``)."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    caplog.set_level(logging.ERROR, logger="diskwatch.server")
    yield
    bad = [r for r in caplog.records if r.name in ("asyncio", "diskwatch.server")
           and r.levelno >= logging.ERROR]
    assert not bad, bad[0].getMessage()


@pytest.fixture(scope="session")
def server_image(tmp_path_factory: pytest.TempPathFactory) -> ServerImage:
    """The shared 32 MiB image. Never write to it: use ``rw_image``."""
    img = _build_server_image(tmp_path_factory.mktemp("server-image"))
    os.chmod(img.path, 0o444)
    return img


@pytest.fixture
def rw_image(server_image: ServerImage, tmp_path: Path) -> Path:
    """A private sparse copy of ``server_image`` that a test may write."""
    dst = tmp_path / "rw.img"
    subprocess.run(["cp", "--sparse=always", str(server_image.path), str(dst)], check=True)
    os.chmod(dst, 0o644)
    return dst


class EventLog:
    """Subscribes to a bus and keeps every event; tests wait on it with a
    deadline instead of sleeping (events are published from the server's
    thread just after the replies go out)."""

    def __init__(self, bus: Bus):
        self.requests: list[Request] = []
        self.events: list[object] = []
        self._cond = threading.Condition()
        bus.on_requests(self._on_requests)
        bus.on_event(self._on_event)

    def _on_requests(self, batch) -> None:
        with self._cond:
            self.requests.extend(batch)
            self._cond.notify_all()

    def _on_event(self, event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0):
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"timed out waiting for events; have {self.requests!r}")

    def closed_connections(self) -> list[ConnectionEvent]:
        return [e for e in self.events if isinstance(e, ConnectionEvent) and not e.opened]

    def commands(self, command: int) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.command == command]


@dataclass
class Served:
    """A running server, its bus recorder, and where to reach it."""

    running: RunningServer
    events: EventLog
    path: Path | None = None

    @property
    def uri(self) -> str:
        return self.running.uri

    @property
    def socket_path(self) -> str:
        return self.running.socket_path

    def uri_for(self, export: str) -> str:
        return self.running.uri_for(export)

    def sync(self) -> None:
        """Return once every callback the loop had queued has run (so events
        of requests whose replies the client got are published)."""
        self.running.thread.call(lambda: None)

    def connect_raw(self, timeout: float = 5.0) -> socket.socket:
        """A raw client socket; every read on it times out."""
        if self.running.socket_path:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.running.socket_path)
        else:
            s = socket.create_connection(("127.0.0.1", self.running.port), timeout=timeout)
            s.settimeout(timeout)
        return s


@pytest.fixture
def serve(tmp_path: Path):
    """Factory: ``serve(path, readonly=False, snapshot=False, exports=None,
    tcp=False)`` -> Served. Stops every server and closes sources at the end."""
    started: list[tuple[Served, list]] = []

    def start(path=None, *, readonly=False, snapshot=False, exports=None, tcp=False,
              export_name="") -> Served:
        sources = {}
        if exports is None:
            exports = {export_name: path}
        for name, p in exports.items():
            src = FileSource(str(p), readonly=readonly or snapshot)
            if readonly:
                src = ReadOnly(src)
            elif snapshot:
                src = Snapshot(src, tmpdir=str(tmp_path))
            sources[name] = src
        bus = Bus()
        log = EventLog(bus)
        if tcp:
            running = serve_in_thread(sources, bus, tcp_port=0)
        else:
            running = serve_in_thread(sources, bus, unix_path=str(tmp_path / f"s{len(started)}.sock"))
        served = Served(running, log, Path(path) if path else None)
        started.append((served, list(sources.values())))
        return served

    yield start
    for served, sources in started:
        served.running.stop()
        for s in sources:
            s.close()


@pytest.fixture
def ro_server(serve, server_image: ServerImage) -> Served:
    """The shared image served read-only."""
    return serve(server_image.path, readonly=True)


@pytest.fixture
def rw_server(serve, rw_image: Path) -> Served:
    """A private copy served read-write."""
    return serve(rw_image)


def nbd_handle(uri: str, *, structured: bool = True, strict: bool = True, meta: bool = False):
    """A connected libnbd handle (Debian's Python ``nbd`` module)."""
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    if not structured:
        h.set_request_structured_replies(False)
    if not strict:
        h.set_strict_mode(0)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes (the socket has a timeout, so this cannot hang)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (bounded by the timeout)."""
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(buf)
        if not chunk:
            return bytes(buf)
        buf += chunk


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Bounded poll for things with no event to wait on (a file appearing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def raw_handshake(sock: socket.socket, export: str = "", structured: bool = False,
                  meta: bool = False) -> tuple[int, int]:
    """Fixed newstyle handshake by hand (NO_ZEROES, optional STRUCTURED_REPLY
    and base:allocation, then GO); returns (export size, transmission flags)."""
    import struct

    from diskwatch.server import protocol as P

    greeting = recv_exact(sock, 18)
    magic, ihaveopt, _hflags = struct.unpack(">QQH", greeting)
    assert (magic, ihaveopt) == (P.NBDMAGIC, P.IHAVEOPT)
    sock.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))

    def option(opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        sock.sendall(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            rmagic, ropt, rtype, rlen = struct.unpack(">QIII", recv_exact(sock, 20))
            assert rmagic == P.OPT_REPLY_MAGIC and ropt == opt
            replies.append((rtype, recv_exact(sock, rlen)))
            if rtype == P.REP_ACK or rtype & 0x80000000:
                return replies

    if structured:
        assert option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
    name = export.encode()
    if meta:
        ctx = P.META_BASE_ALLOCATION.encode()
        option(P.OPT_SET_META_CONTEXT, struct.pack(">I", len(name)) + name
               + struct.pack(">II", 1, len(ctx)) + ctx)
    replies = option(P.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    assert replies[-1][0] == P.REP_ACK, replies
    for rtype, data in replies:
        if rtype == P.REP_INFO and struct.unpack_from(">H", data)[0] == P.INFO_EXPORT:
            _, size, tflags = struct.unpack(">HQH", data)
            return size, tflags
    raise AssertionError("no NBD_INFO_EXPORT in the GO reply")


def raw_request(cmd: int, offset: int, length: int, handle: int = 1, flags: int = 0,
                payload: bytes = b"") -> bytes:
    import struct

    from diskwatch.server import protocol as P
    return struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


def raw_simple_reply(sock: socket.socket, read_length: int = 0) -> tuple[int, int, bytes]:
    """(error, handle, data) of a simple reply; data only when error is 0."""
    import struct

    from diskwatch.server import protocol as P
    magic, error, handle = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == P.SIMPLE_REPLY_MAGIC, hex(magic)
    data = recv_exact(sock, read_length) if read_length and not error else b""
    return error, handle, data


class Diskwatch:
    """``diskwatch`` (the installed console script) as a subprocess in its own
    process group; ``stop()`` (run at teardown) kills the group if it is
    still there. Output lines are read with a deadline."""

    def __init__(self, args: list[str], cwd: str | None = None, env: dict | None = None):
        import subprocess as sp
        self.proc = sp.Popen([DISKWATCH, *args], stdout=sp.PIPE, stderr=sp.PIPE, cwd=cwd,
                             env=env or SUBPROCESS_ENV, start_new_session=True)
        self._buf = b""

    def read_line(self, timeout: float = 20.0) -> str:
        """The next line of stdout (the captive command shares it)."""
        import select
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line from diskwatch within {timeout}s: {self._buf!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"diskwatch closed stdout: {self._buf!r} "
                                         f"{self.proc.stderr.read()!r}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def wait(self, timeout: float = 20.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, (self._buf + out).decode(), err.decode()

    def stop(self) -> None:
        import signal
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def diskwatch_proc():
    """Factory: ``diskwatch_proc(args)`` -> Diskwatch, stopped at teardown."""
    procs: list[Diskwatch] = []

    def start(args: list[str], **kw) -> Diskwatch:
        d = Diskwatch([str(a) for a in args], **kw)
        procs.append(d)
        return d

    yield start
    for d in procs:
        d.stop()


def run_diskwatch(args: list, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    """Run the console script to completion."""
    return subprocess.run([DISKWATCH, *[str(a) for a in args]], capture_output=True, text=True,
                          timeout=timeout, env=kw.pop("env", SUBPROCESS_ENV), **kw)
