"""An NBD server upstream as a source: diskwatch as a transparent tap.

    client --NBD--> diskwatch server --libnbd--> upstream NBD server
                        (events)                 (nbdkit, qemu-nbd, nbd-server,
                                                  our private qemu-storage-daemon)

Two ways in, one upstream:

- ``aio``: the server's loop drives one libnbd handle without blocking.
  Requests are issued with libnbd's asynchronous calls as they are parsed,
  the handle's socket is watched by the loop, completions queue the replies.
  Many requests are in flight upstream at once, and no thread hand-off is
  paid per request (measured in benchmarks/bench_formats.py).
- the plain ``Source`` calls (``pread``...): a small pool of blocking
  handles, for callers in other threads (a layer such as --snapshot runs in
  the server's worker threads; the metadata mapper reads directly).

The bytes and the flags are the upstream's: size, read-only, flush, FUA,
trim, zero, fast zero, cache, multi-conn and block status (base:allocation)
are whatever it offers; what it lacks is not advertised.

Connection loss: requests fail with EIO and one message is logged; the
connection is made again with backoff (0.1 s doubling to 5 s), both for the
loop's handle (from a thread, so the loop never blocks on a connect) and for
the pool. An upstream that comes back with a different size or read-only
flag is refused (a different disk under a running guest).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .base import FastZeroUnsupported, Source, SourceError, check_range

log = logging.getLogger("diskwatch.sources.nbd")

POOL_HANDLES = 4  # blocking handles for other threads (the server has 8 workers)
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
ZERO_CHUNK = 1 << 20  # zeroes written per request when the upstream cannot zero
DISCONNECT_TIMEOUT = 1.0  # seconds an upstream has to close after NBD_CMD_DISC


def _import_nbd():
    try:
        import nbd
    except ImportError as e:
        raise SourceError(errno.ENOSYS, "the libnbd Python module is missing: apt-get install "
                          "python3-libnbd (and use a venv made with --system-site-packages)") from e
    return nbd


def _os_error(e, what: str) -> SourceError:
    """An nbd.Error as a SourceError with its errno (EIO when it has none)."""
    return SourceError(e.errnum or errno.EIO, f"{what}: {e.string}")


class _Outage:
    """When the upstream went away and when to try again (shared by the
    loop's handle and the pool). Logs once per outage."""

    def __init__(self, label: str, may_retry: Callable[[], bool], explain: Callable[[str], str]):
        self.label = label
        self.may_retry = may_retry
        self.explain = explain
        self.lock = threading.Lock()
        self.down = False
        self.reason = ""
        self.next_try = 0.0
        self.backoff = BACKOFF_FIRST

    def lost(self, reason: str) -> None:
        with self.lock:
            if not self.down:
                self.down = True
                self.reason = self.explain(reason)
                self.backoff = BACKOFF_FIRST
                self.next_try = time.monotonic() + self.backoff
                if self.may_retry():
                    log.warning("%s: connection lost (%s): requests fail with EIO until it "
                                "is back; reconnecting", self.label, self.reason)
                else:
                    log.error("%s: %s: requests fail with EIO", self.label, self.reason)

    def failed_again(self) -> None:
        with self.lock:
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            self.next_try = time.monotonic() + self.backoff

    def may_try(self) -> bool:
        return not self.down or time.monotonic() >= self.next_try

    def back(self) -> None:
        with self.lock:
            if self.down:
                self.down = False
                log.warning("%s: reconnected", self.label)

    def error(self) -> SourceError:
        retry = "; reconnecting" if self.may_retry() else ""
        return SourceError(errno.EIO, f"{self.label} is unreachable ({self.reason}){retry}")


class NbdSource(Source):
    """An upstream NBD server, given as an NBD URI (nbd://HOST[:PORT]/EXPORT,
    nbd+unix:///EXPORT?socket=PATH, nbds://... for TLS)."""

    blocking = True  # the pool's calls wait on the network
    aio_class: type = None  # type: ignore[assignment]  # NbdAio, set below the class

    def __init__(self, uri: str, *, description: str | None = None, readonly: bool = False,
                 connect_timeout: float = 30.0):
        self.nbd = _import_nbd()
        self.uri = uri
        self.connect_timeout = connect_timeout
        self.readonly = readonly
        self.label = description or f"NBD server {uri}"
        self.outage = _Outage(self.label, self.may_reconnect, self.explain_loss)
        self._pool: list = []
        self._pool_lock = threading.Lock()
        self._pool_free = threading.Semaphore(POOL_HANDLES)
        self._closed = False
        self._aio: NbdAio | None = None
        h = self._connect()
        try:
            self._learn(h)
        except BaseException:
            _close_handle(h)
            raise
        self._pool.append(h)
        self.description = self.label + (" (read-only)" if self.readonly else "")
        # The server's loop has a connection of its own: find out now, in one
        # line, if the upstream serves one client at a time (qemu-nbd without
        # --shared), rather than hang the first request.
        try:
            self._pool.append(self._connect())
        except BaseException:
            self.close()
            raise

    # --- connecting ----------------------------------------------------------

    def _new_handle(self, structured: bool = True):
        nbd = self.nbd
        h = nbd.NBD()
        if structured:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        else:
            # Simple replies: libnbd reads a reply in two recv calls (header,
            # then the data straight into our buffer) instead of four.
            h.set_request_structured_replies(False)
            # The loop's reads go into fresh zeroed bytearrays, sent only on
            # success: libnbd's own memset of each buffer is wasted work.
            h.set_pread_initialize(False)
        # The URI is the person's own (the command line), as for nbdinfo:
        # its tls-certificates and tls-psk-file may name local files.
        h.set_uri_allow_local_file(True)
        return h

    def _connect(self, structured: bool = True):
        """A connected handle; SourceError with the reason when it fails."""
        nbd = self.nbd
        h = self._new_handle(structured)
        try:
            if self.uri.lower().startswith(("nbds://", "nbds+")) and not h.supports_tls():
                raise SourceError(errno.ENOTSUP, f"{self.uri}: this libnbd was built without "
                                  "TLS support (nbds:// needs it)")
            self._open_handle(h)
        except nbd.Error as e:
            _close_handle(h)
            raise _os_error(e, f"cannot connect to {self.label}") from None
        except BaseException:
            _close_handle(h)
            raise
        return h

    def _open_handle(self, h) -> None:
        # Asynchronously, with a deadline: a server that accepts the TCP
        # connection but never greets (one client at a time, already taken)
        # would keep libnbd's connect_uri waiting forever.
        h.aio_connect_uri(self.uri)
        deadline = time.monotonic() + self.connect_timeout
        while h.aio_is_connecting():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SourceError(errno.ETIMEDOUT, (
                    f"{self.label} did not finish the NBD handshake in "
                    f"{self.connect_timeout:g} s (diskwatch needs two connections to it: a "
                    "server that takes one client at a time, like qemu-nbd without "
                    "--shared=N, cannot be watched; --timeout changes the wait)"))
            h.poll(max(1, int(min(left, 1.0) * 1000)))
        if not h.aio_is_ready():
            raise SourceError(errno.EIO, f"cannot connect to {self.label}")

    def _learn(self, h) -> None:
        """Size and flags, from the first connection."""
        nbd = self.nbd
        self.size = h.get_size()
        upstream_ro = bool(h.is_read_only())
        self.readonly = self.readonly or upstream_ro
        self.can_write = not self.readonly
        self.can_flush = bool(h.can_flush())
        self.can_fua = self.can_write and bool(h.can_fua())
        self.can_trim = self.can_write and bool(h.can_trim())
        self.upstream_zero = bool(h.can_zero())
        self.can_zero = self.can_write
        self.can_fast_zero = self.can_write and self.upstream_zero and bool(h.can_fast_zero())
        self.can_cache = bool(h.can_cache())
        self.can_multi_conn = bool(h.can_multi_conn())
        self.can_extents = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        sizes = []
        for which, default in ((nbd.SIZE_MINIMUM, 1), (nbd.SIZE_PREFERRED, 4096),
                               (nbd.SIZE_MAXIMUM, 32 * 1024 * 1024)):
            try:
                sizes.append(h.get_block_size(which) or default)
            except nbd.Error:
                sizes.append(default)
        self.block_size = (sizes[0], sizes[1], min(sizes[2], 32 * 1024 * 1024))
        self._identity = (self.size, upstream_ro)

    def check_same(self, h) -> None:
        """A reconnection must reach the same disk."""
        now = (h.get_size(), bool(h.is_read_only()))
        if now != self._identity:
            raise SourceError(errno.EIO, f"{self.label} came back as a different disk "
                              f"(size, read-only {now} instead of {self._identity}); not using it")

    def explain_loss(self, reason: str) -> str:
        """What to say about a lost connection (a daemon says why it died)."""
        return reason

    def may_reconnect(self) -> bool:
        """Asked before each reconnection attempt; a source whose upstream
        cannot come back (a dead private daemon) says no."""
        return not self._closed

    def reconnect(self, structured: bool = True):
        """A new connected handle for a reconnection (any thread); without
        structured replies (and so without block status) when asked."""
        h = self._connect(structured)
        try:
            self.check_same(h)
        except BaseException:
            _close_handle(h)
            raise
        return h

    # --- the pool of blocking handles ----------------------------------------

    def _call(self, what: str, fn: Callable):
        if self._closed:
            raise SourceError(errno.EIO, f"{self.label}: closed")
        nbd = self.nbd
        with self._pool_free:
            with self._pool_lock:
                h = self._pool.pop() if self._pool else None
            if h is None:
                if not self.outage.may_try():
                    raise self.outage.error()
                try:
                    h = self.reconnect()
                except SourceError as e:
                    self.outage.lost(e.strerror)
                    self.outage.failed_again()
                    raise self.outage.error() from None
                self.outage.back()
            try:
                result = fn(h)
            except nbd.Error as e:
                if h.aio_is_dead() or h.aio_is_closed():
                    self.outage.lost(e.string)
                    _close_handle(h)
                    raise self.outage.error() from None
                with self._pool_lock:
                    self._pool.append(h)
                raise _os_error(e, f"{self.label}: {what}") from None
            with self._pool_lock:
                self._pool.append(h)
            return result

    def pread(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        return self._call("read", lambda h: h.pread(length, offset))

    def pwrite(self, offset: int, data, fua: bool = False) -> None:
        if not self.can_write:
            raise SourceError(errno.EROFS, f"{self.label} is read-only")
        flags = self.nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
        self._call("write", lambda h: h.pwrite(bytes(data), offset, flags))

    def flush(self) -> None:
        if self.can_flush:
            self._call("flush", lambda h: h.flush())

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if not self.can_trim:
            raise SourceError(errno.EOPNOTSUPP, "the upstream cannot trim")
        flags = self.nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
        self._call("trim", lambda h: h.trim(length, offset, flags))

    def zero(self, offset, length, may_trim=False, fua=False, fast=False) -> None:
        if not self.upstream_zero:
            return Source.zero(self, offset, length, may_trim, fua, fast)
        self._call("zero", lambda h: h.zero(length, offset, self._zero_flags(may_trim, fua, fast)))

    def _zero_flags(self, may_trim: bool, fua: bool, fast: bool) -> int:
        nbd = self.nbd
        flags = 0 if may_trim else nbd.CMD_FLAG_NO_HOLE
        if fua and self.can_fua:
            flags |= nbd.CMD_FLAG_FUA
        if fast:
            if not self.can_fast_zero:
                raise FastZeroUnsupported()
            flags |= nbd.CMD_FLAG_FAST_ZERO
        return flags

    def cache(self, offset: int, length: int) -> None:
        if self.can_cache:
            self._call("cache", lambda h: h.cache(length, offset))

    def extents(self, offset: int, length: int):
        if not self.can_extents:
            return [(offset, length, 0)]
        out: list[tuple[int, int, int]] = []
        length = min(length, 1 << 31)

        def collect(meta, off, entries, err):
            if meta == "base:allocation":
                pos = off
                for i in range(0, len(entries) - 1, 2):
                    out.append((pos, entries[i], entries[i + 1]))
                    pos += entries[i]
            return 0
        self._call("block status", lambda h: h.block_status(length, offset, collect))
        return out or [(offset, length, 0)]

    # --- the loop's asynchronous handle ---------------------------------------

    @property
    def aio(self) -> NbdAio:  # type: ignore[override]
        if self._aio is None:
            self._aio = self.aio_class(self)
        return self._aio

    def close(self) -> None:
        self._closed = True
        if self._aio is not None:
            self._aio.close()
        with self._pool_lock:
            handles, self._pool = self._pool, []
        for h in handles:
            _disconnect(h, self.nbd)
            _close_handle(h)


class NbdAio:
    """Requests issued with libnbd's asynchronous calls on one handle whose
    socket the server's loop watches. Every method is called from the loop's
    thread; ``done(result, error)`` is called from it too (``error`` an
    OSError or None), and ``completed()`` after each batch of completions so
    the server sends their replies with one syscall.

    The handle asks for simple replies, not structured ones: libnbd then
    reads a read's reply with two recv calls instead of four (measured with
    strace -c on bench_formats' 4 KiB random reads: 5.4 instead of 7.3
    syscalls per request in diskwatch). Block status needs structured
    replies, so it goes to the pool of blocking handles in a helper thread
    (rare next to reads: nbdcopy asks once per 128 MiB or so)."""

    def __init__(self, source: NbdSource):
        self.source = source
        self.nbd = source.nbd
        self.h = None
        self.loop = None
        self.completed: Callable[[], None] = lambda: None
        self._fd = -1
        self._writing = False
        self._reconnecting = False
        self._closed = False
        # cookie -> (done, result) of the commands in flight; failed if the
        # handle is closed before they complete
        self._pending: dict[int, tuple] = {}
        # key -> done of the block status requests in the helper thread
        # (kept apart: libnbd's peek fails when none of its own is in flight)
        self._in_helper: dict[int, Callable] = {}
        self._next_key = 0
        self._helper: ThreadPoolExecutor | None = None

    def attach(self, loop, completed: Callable[[], None]) -> None:
        self.loop = loop
        self.completed = completed
        try:
            self._install(self.source.reconnect(structured=False))
        except SourceError as e:
            self.source.outage.lost(e.strerror)
            self._start_reconnect()

    def _install(self, h) -> None:
        self.h = h
        self._fd = h.aio_get_fd()
        self.loop.add_reader(self._fd, self._on_readable)
        self._writing = False
        self._update()

    def _update(self) -> None:
        """Watch for writability only while libnbd has bytes to send."""
        h = self.h
        if h is None:
            return
        if h.aio_is_dead() or h.aio_is_closed():
            self._lost("connection closed")
            return
        want = bool(h.aio_get_direction() & self.nbd.AIO_DIRECTION_WRITE)
        if want != self._writing:
            self._writing = want
            if want:
                self.loop.add_writer(self._fd, self._on_writable)
            else:
                self.loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        try:
            self.h.aio_notify_read()
            self._retire()
        except self.nbd.Error as e:
            self._lost(e.string)
        self._update()
        self.completed()

    def _on_writable(self) -> None:
        try:
            self.h.aio_notify_write()
            self._retire()
        except self.nbd.Error as e:
            self._lost(e.string)
        self._update()
        self.completed()

    def _lost(self, reason: str) -> None:
        h, self.h = self.h, None
        if h is None:
            return
        self.loop.remove_reader(self._fd)
        if self._writing:
            self.loop.remove_writer(self._fd)
            self._writing = False
        self.source.outage.lost(reason)
        _close_handle(h)
        self._fail_pending(self.source.outage.error())
        self.completed()
        self._start_reconnect()

    def _start_reconnect(self) -> None:
        if self._reconnecting or self._closed:
            return
        self._reconnecting = True
        threading.Thread(target=self._reconnect_loop, daemon=True,
                         name="diskwatch-nbd-reconnect").start()

    def _reconnect_loop(self) -> None:
        outage = self.source.outage
        while not self._closed and self.source.may_reconnect():
            time.sleep(max(0.0, outage.next_try - time.monotonic()))
            if self._closed:
                return
            try:
                h = self.source.reconnect(structured=False)
            except SourceError as e:
                log.debug("%s: reconnect failed: %s", self.source.label, e)
                outage.failed_again()
                continue
            self.loop.call_soon_threadsafe(self._reconnected, h)
            return

    def _reconnected(self, h) -> None:
        self._reconnecting = False
        if self._closed:
            _close_handle(h)
            return
        self.source.outage.back()
        self._install(h)

    # --- requests --------------------------------------------------------------

    def _down(self, done) -> bool:
        if self.h is None:
            done(None, self.source.outage.error() if not self._closed
                 else SourceError(errno.EIO, "closed"))
            return True
        return False

    def _fail_pending(self, error: OSError) -> None:
        pending, self._pending = self._pending, {}
        in_helper, self._in_helper = self._in_helper, {}
        for done, _ in pending.values():
            done(None, error)
        for done in in_helper.values():
            done(None, error)

    def _retire(self) -> None:
        """Hand the completed commands to their done callbacks. Commands are
        retired by cookie rather than with libnbd's completion callbacks:
        measured, a callback from C (with its ctypes error cell) costs a
        third more per request than asking which commands completed."""
        h = self.h
        pending = self._pending
        nbd_error = self.nbd.Error
        while pending:
            cookie = h.aio_peek_command_completed()
            if not cookie:
                return
            done, result = pending.pop(cookie)
            try:
                h.aio_command_completed(cookie)
            except nbd_error as e:
                done(None, OSError(e.errnum or errno.EIO, e.string))
                continue
            done(result() if callable(result) else result, None)

    def _issue(self, done, result, call) -> None:
        try:
            cookie = call(self.h)
        except self.nbd.Error as e:
            self._issue_failed(done, e)
            return
        self._pending[cookie] = (done, result)

    def _issue_failed(self, done, e) -> None:
        if self.h is not None and (self.h.aio_is_dead() or self.h.aio_is_closed()):
            self._lost(e.string)
            done(None, self.source.outage.error())
        else:
            done(None, _os_error(e, self.source.label))

    def issued(self) -> None:
        """After a batch of requests: watch for writability if libnbd could
        not send them all at once (asked once per batch, not per request)."""
        if not self._writing:
            self._update()

    def pread(self, offset: int, length: int, done) -> None:
        # The hot path: no wrapper, libnbd reads straight into a bytearray.
        h = self.h
        if h is None:
            self._down(done)
            return
        data = bytearray(length)
        try:
            cookie = h.aio_pread(data, offset)
        except self.nbd.Error as e:
            self._issue_failed(done, e)
            return
        self._pending[cookie] = (done, data)

    def pwrite(self, offset: int, data, fua: bool, done) -> None:
        if self._down(done):
            return
        buf = bytes(data)  # libnbd sends from it until the command completes
        flags = self.nbd.CMD_FLAG_FUA if fua and self.source.can_fua else 0
        self._issue(done, None, lambda h: h.aio_pwrite(buf, offset, flags=flags))

    def flush(self, done) -> None:
        if not self.source.can_flush:
            done(None, None)
            return
        if self._down(done):
            return
        self._issue(done, None, lambda h: h.aio_flush())

    def trim(self, offset: int, length: int, fua: bool, done) -> None:
        if not self.source.can_trim:
            done(None, SourceError(errno.EOPNOTSUPP, "the upstream cannot trim"))
            return
        if self._down(done):
            return
        flags = self.nbd.CMD_FLAG_FUA if fua and self.source.can_fua else 0
        self._issue(done, None, lambda h: h.aio_trim(length, offset, flags=flags))

    def zero(self, offset, length, may_trim, fua, fast, done) -> None:
        src = self.source
        if not src.upstream_zero:
            if fast:
                done(None, FastZeroUnsupported())
                return
            self._write_zeroes(offset, length, fua, done)
            return
        try:
            flags = src._zero_flags(may_trim, fua, fast)
        except FastZeroUnsupported as e:
            done(None, e)
            return
        if self._down(done):
            return
        self._issue(done, None, lambda h: h.aio_zero(length, offset, flags=flags))

    def _write_zeroes(self, offset: int, length: int, fua: bool, done) -> None:
        """Zero by writing zeroes, a chunk at a time (bounded memory)."""
        def step(result, error) -> None:
            nonlocal offset, length
            if error is not None or length == 0:
                done(None, error)
                return
            n = min(length, ZERO_CHUNK)
            offset += n
            length -= n
            self.pwrite(offset - n, bytes(n), fua and length == 0, step)
        step(None, None)

    def cache(self, offset: int, length: int, done) -> None:
        if not self.source.can_cache:
            done(None, None)  # a hint; nothing to do
            return
        if self._down(done):
            return
        self._issue(done, None, lambda h: h.aio_cache(length, offset))

    def extents(self, offset: int, length: int, done) -> None:
        if not self.source.can_extents:
            done([(offset, length, 0)], None)
            return
        if self._down(done):
            return
        self._next_key += 1
        key = self._next_key
        self._in_helper[key] = done
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="diskwatch-nbd-extents")
        self._helper.submit(self._extents_in_helper, key, offset, length)

    def _extents_in_helper(self, key: int, offset: int, length: int) -> None:
        try:
            result, error = self.source.extents(offset, length), None
        except Exception as e:  # noqa: BLE001 - handed to the request, as from libnbd
            result, error = None, e if isinstance(e, OSError) else OSError(errno.EIO, str(e))
        try:
            self.loop.call_soon_threadsafe(self._extents_done, key, result, error)
        except RuntimeError:
            pass  # the loop is closed: close() failed the request already

    def _extents_done(self, key: int, result, error) -> None:
        done = self._in_helper.pop(key, None)
        if done is None:
            return  # failed meanwhile (connection lost or closed)
        done(result, error)
        self.completed()

    def close(self) -> None:
        """From the loop's thread while it runs, or any thread after it stopped."""
        self._closed = True
        h, self.h = self.h, None
        idle = h is not None and not self._pending and not self._in_helper
        self._fail_pending(SourceError(errno.EIO, "closed"))
        if self._helper is not None:
            self._helper.shutdown(wait=False, cancel_futures=True)
        if h is not None:
            if self.loop is not None:
                try:
                    self.loop.remove_reader(self._fd)
                    if self._writing:
                        self.loop.remove_writer(self._fd)
                except (OSError, ValueError):
                    pass  # the loop is closed already
            if idle:
                _disconnect(h, self.nbd)
            _close_handle(h)


NbdSource.aio_class = NbdAio


def _disconnect(h, nbd, timeout: float = DISCONNECT_TIMEOUT) -> None:
    """NBD_CMD_DISC (and TLS's close) rather than a cut, but never waiting
    long for an upstream that does not answer (nbd.shutdown would wait)."""
    try:
        h.aio_disconnect()
        deadline = time.monotonic() + timeout
        while not (h.aio_is_closed() or h.aio_is_dead()) and time.monotonic() < deadline:
            h.poll(100)
    except nbd.Error:
        pass


def _close_handle(h) -> None:
    """Close a libnbd handle now (the Python binding closes it only when
    the object is collected)."""
    if hasattr(h, "_o"):
        h.__del__()
        del h._o


__all__ = ["NbdSource", "NbdAio"]
