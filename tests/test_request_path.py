"""Issue 19, item 1: one request path. The same requests, valid, refused by
the protocol and failed by the source, sent to a source served inline, to
one that blocks (worker threads) and to an upstream NBD server driven by the
loop (asynchronous) get the same replies and the same events: both are made
in one place (server/dispatch.py, ``complete``), errors mapped once."""

from __future__ import annotations

import errno
import random

import pytest
from fixtures_server import nbd_handle, wait_until

from diskwatch.events import Bus, ConnectionEvent
from diskwatch.server import serve_in_thread
from diskwatch.sources.base import Layer
from diskwatch.sources.file import FileSource
from diskwatch.sources.nbd import NbdSource

nbd = pytest.importorskip("nbd")

KiB = 1024
SIZE = 1024 * KiB
READ_FAILS = 64 * KiB  # a read here fails in the source (ENOENT: EIO on the wire)
WRITE_FAILS = 128 * KiB  # a write here fails in the source (EROFS: EPERM on the wire)


class FailAt(Layer):
    """Fails a read and a write at fixed offsets, as a disk might; reads
    elsewhere are handed over from the file's mmap as usual."""

    def pread(self, offset, length):
        if offset == READ_FAILS:
            raise OSError(errno.ENOENT, "gone")
        return self.next.pread(offset, length)

    def view_for(self, offset, length):
        return None if offset == READ_FAILS else self.next.view_for(offset, length)

    def pwrite(self, offset, data, fua=False):
        if offset == WRITE_FAILS:
            raise OSError(errno.EROFS, "read-only here")
        self.next.pwrite(offset, data, fua)


class Blocking(Layer):
    """The same stack, called from worker threads, every read a call."""

    blocking = True

    def view_for(self, offset, length):
        return None


def image(tmp_path, name: str):
    path = tmp_path / name
    path.write_bytes(random.Random(19).randbytes(SIZE))
    return str(path)


def requests(h) -> list:
    """What the client sees of each request: its data or its error."""
    out = []

    def do(fn, *args):
        try:
            out.append(("ok", fn(*args)))
        except nbd.Error as e:
            out.append(("error", e.errno))  # libnbd names it: "EIO"

    do(h.pread, 4 * KiB, 0)
    do(h.pwrite, b"w" * 4 * KiB, 8 * KiB)
    do(h.pread, 4 * KiB, 8 * KiB)
    do(h.pread, 256 * KiB, 256 * KiB)
    do(h.pread, 4 * KiB, READ_FAILS)
    do(h.pwrite, b"x" * 512, WRITE_FAILS)
    do(h.pread, 512, SIZE)  # past the end: the protocol refuses it
    do(h.pwrite, b"y" * 512, SIZE)
    do(h.flush)
    do(h.zero, 4 * KiB, 16 * KiB)
    do(h.pread, 4 * KiB, 16 * KiB)
    do(h.trim, 4 * KiB, 32 * KiB)
    do(h.cache, 4 * KiB, 0)
    return out


def served_through(kind: str, tmp_path):
    """Run ``requests`` against a stack served ``kind``; what the client
    saw, the events published, and the running server."""
    upstream = None
    stack = FailAt(FileSource(image(tmp_path, f"{kind}.img")))
    if kind == "worker":
        stack = Blocking(stack)
    elif kind == "async":
        upstream = serve_in_thread({"": stack})
        stack = NbdSource(upstream.uri)
    bus = Bus()
    events: list = []
    closed: list = []
    bus.on_requests(events.extend)
    bus.on_event(lambda e: closed.append(e) if isinstance(e, ConnectionEvent)
                 and not e.opened else None)
    running = serve_in_thread({"": stack}, bus)
    try:
        h = nbd_handle(running.uri, strict=False)
        seen = requests(h)
        h.shutdown()
        wait_until(lambda: closed, 10, "the connection closed")
        engines = (running.server._workers._pool is not None, bool(running.server._async))
    finally:
        running.stop()
        stack.close()
        if upstream is not None:
            upstream.stop()
    return seen, [(e.command, e.offset, e.length, e.flags, e.error) for e in events], engines


def test_inline_worker_and_async_sources_answer_alike(tmp_path):
    inline, inline_events, engines = served_through("inline", tmp_path)
    assert engines == (False, False)
    worker, worker_events, engines = served_through("worker", tmp_path)
    assert engines == (True, False)
    upstream, upstream_events, engines = served_through("async", tmp_path)
    assert engines == (False, True)
    assert [kind for kind, _ in inline] == ["ok"] * 4 + ["error"] * 4 + ["ok"] * 5
    assert [err for kind, err in inline if kind == "error"] == ["EIO", "EPERM", "EINVAL",
                                                                "ENOSPC"]
    assert inline[2] == ("ok", b"w" * 4 * KiB) and inline[10] == ("ok", bytes(4 * KiB))
    assert worker == inline
    assert upstream == inline
    assert worker_events == inline_events
    assert upstream_events == inline_events
    # one event per request (and DISC), each error the one the client got
    assert len(inline_events) == len(inline) + 1
    assert [e[4] for e in inline_events if e[4]] == [5, 1, 22, 28]
