"""Fuzzing the real server over real sockets: thousands of malformed
sessions (random bytes, mutated valid sessions, hostile requests after a
good handshake, option floods), each split at random points, while a good
libnbd client keeps reading and verifying data. The good client must see no
error, every malformed session must end with the server closing it (no
hang), and the server must log no internal error.

FUZZ_SESSIONS sets the count (``make fuzz`` raises it); the seed is fixed.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import struct
import threading
import time

import pytest
from fixtures_server import RANDOM, read_at
from test_fuzz_protocol import good_session, meta, name_and_infos, option, request

from diskwatch.events import Bus
from diskwatch.server import protocol as P
from diskwatch.server import serve_in_thread
from diskwatch.sources.base import ReadOnly
from diskwatch.sources.file import FileSource

nbd = pytest.importorskip("nbd")
SESSIONS = int(os.environ.get("FUZZ_SESSIONS", "1500"))
SEED = 20261129


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.randrange(4)
        pos = rng.randrange(max(1, len(buf)))
        if kind == 0 and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:
            del buf[pos:pos + rng.randint(1, 16)]
        elif kind == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            buf[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x80\0\0\0"])
    if rng.random() < 0.3:
        buf = buf[:rng.randrange(len(buf) + 1)]
    return bytes(buf)


def hostile_requests(rng: random.Random, export: bytes) -> bytes:
    hs = struct.pack(">I", 3)
    if rng.random() < 0.5:
        hs += option(P.OPT_STRUCTURED_REPLY) + option(
            P.OPT_SET_META_CONTEXT, meta(export, P.META_BASE_ALLOCATION.encode()))
    hs += option(P.OPT_GO, name_and_infos(export))
    reqs = []
    for i in range(rng.randint(1, 40)):
        cmd = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, rng.randrange(1 << 16)])
        flags = rng.choice([0, 1, 2, 4, 8, 16, rng.randrange(1 << 16)])
        offset = rng.choice([0, 512, RANDOM[0], (1 << 25) - 512, 1 << 25, rng.randrange(1 << 64)])
        length = rng.choice([0, 1, 512, 4096, 65536, 1 << 20, P.MAX_ACCEPTED + 1,
                             rng.randrange(1 << 32)])
        payload = b""
        if cmd == P.CMD_WRITE and length <= 1 << 20:
            payload = bytes(length) if rng.random() < 0.9 else b"x" * rng.randrange(length + 1)
        reqs.append(request(cmd, offset, length, i, flags, payload))
    return hs + b"".join(reqs)


def option_flood(rng: random.Random) -> bytes:
    opts = [option(rng.choice([P.OPT_LIST, P.OPT_INFO, P.OPT_LIST_META_CONTEXT, 99]),
                   name_and_infos(b"", 1, 3)) for _ in range(rng.randint(10, 500))]
    return struct.pack(">I", 3) + b"".join(opts)


def session_bytes(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["random", "mutated", "mutated", "requests", "requests-rw", "options"])
    if kind == "random":
        return kind, rng.randbytes(rng.randrange(1, 4096))
    if kind == "mutated":
        return kind, mutate(rng, good_session())
    if kind == "requests":
        return kind, hostile_requests(rng, b"")
    if kind == "requests-rw":
        return kind, hostile_requests(rng, b"rw")
    return kind, option_flood(rng)


def run_session(path: str, rng: random.Random, data: bytes) -> tuple[bool, int]:
    """Send ``data`` in random pieces while reading whatever comes back (a
    client that does not read may be paused by the server's budget: fine,
    but not what this measures), half-close, read until the server closes.
    Returns (closed by the server within 10 s, bytes received)."""
    import select
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    received = 0
    try:
        s.connect(path)
        s.setblocking(False)
        pos = 0
        half_closed = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            want_write = not half_closed
            r, w, _ = select.select([s], [s] if want_write else [], [], 0.5)
            if r:
                try:
                    chunk = s.recv(1 << 20)
                except ConnectionResetError:
                    return True, received
                except BlockingIOError:
                    continue
                if not chunk:
                    return True, received
                received += len(chunk)
            if w and not half_closed:
                if pos < len(data):
                    n = rng.randint(1, max(1, len(data) // 3 + 1))
                    try:
                        pos += s.send(data[pos:pos + n])
                    except BlockingIOError:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        pos = len(data)  # the server closed on bad input: fine
                else:
                    try:
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    half_closed = True
        return False, received
    finally:
        s.close()


class GoodClient(threading.Thread):
    def __init__(self, uri: str, image: str):
        super().__init__(daemon=True)
        self.uri = uri
        self.expect = read_at(image, RANDOM[0], RANDOM[1])
        self.stop = threading.Event()
        self.reads = 0
        self.bytes = 0
        self.errors: list[str] = []

    def run(self) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        rng = random.Random(1)
        while not self.stop.is_set():
            off = rng.randrange(0, RANDOM[1] - 65536, 512)
            n = rng.choice([512, 4096, 65536])
            try:
                if h.pread(n, RANDOM[0] + off) != self.expect[off:off + n]:
                    self.errors.append(f"wrong data at {off}")
            except nbd.Error as e:
                self.errors.append(str(e))
            self.reads += 1
            self.bytes += n
        h.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600, method="thread")
def test_malformed_sessions_while_a_good_client_reads(server_image, rw_image, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="diskwatch.server")
    sources = {"": ReadOnly(FileSource(str(server_image.path), readonly=True)),
               "rw": FileSource(str(rw_image))}
    path = str(tmp_path / "fuzz.sock")
    running = serve_in_thread(sources, Bus(), unix_path=path)
    good = GoodClient(running.uri, str(server_image.path))
    good.start()
    rng = random.Random(SEED)
    kinds: dict[str, int] = {}
    sent = received = hung = 0
    t0 = time.monotonic()
    try:
        for _ in range(SESSIONS):
            kind, data = session_bytes(rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            closed, n = run_session(path, rng, data)
            sent += len(data)
            received += n
            hung += not closed
    finally:
        good.stop.set()
        good.join(30)
        running.stop()
        for s in sources.values():
            s.close()
    took = time.monotonic() - t0
    print(f"\nfuzz: {SESSIONS} malformed sessions ({kinds}) in {took:.1f}s, "
          f"{sent} bytes sent, {received} received; good client: {good.reads} reads, "
          f"{good.bytes} bytes verified, {len(good.errors)} errors")
    assert hung == 0
    assert not good.errors, good.errors[:3]
    assert good.reads > 0
    bad = [r for r in caplog.records if r.name == "diskwatch.server"
           and r.levelno >= logging.ERROR]
    assert not bad, bad[0].getMessage()
