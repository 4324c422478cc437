"""CurlSource: a remote image over http, https, ftp, ftps or sftp, read-only.

Every read is a ranged transfer (HTTP ``Range:``, FTP ``REST``, an SFTP
seek) done by libcurl through pycurl. Two ways in, one set of checks:

- ``aio`` (``CurlAio``): the server's loop drives a curl multi handle with
  ``connections`` easy handles; NBD reads become transfers as they are
  parsed, without a thread per request. This is how the server reads.
- the plain ``pread``: a pool of ``connections`` easy handles, each read
  borrowing one from a queue (waiting when all are busy), for callers in
  other threads (a layer such as --snapshot runs in the server's worker
  threads; the map maker reads directly). pycurl releases the GIL during a
  transfer.

libcurl keeps each connection alive between reads.

The size comes from a HEAD (Content-Length) or, when the server refuses HEAD
(pre-signed URLs often do), from the Content-Range of a ``Range: bytes=0-0``
probe. That probe is always made for http(s), because a server that answers
a range request with ``200`` and the whole body cannot serve a disk: such a
server is refused at open with a clear error rather than discovered later.

Transient failures (connection reset or refused, timeouts, HTTP 5xx, 408,
429, short bodies) are retried ``retries`` times with exponential backoff;
everything else fails at once with a one-line message a person can act on.
``timeout`` bounds connecting and any stall of a transfer (less than one
byte per second for ``timeout`` seconds), not the length of a large read.
"""

from __future__ import annotations

import errno
import math
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pycurl

from .base import Source, SourceError, check_range

SCHEMES = ("http", "https", "ftp", "ftps", "sftp")

# libcurl error codes (see libcurl-errors(3)); pycurl exports most as E_*.
_TLS_ERRORS = {35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98}
_TRANSIENT_CURL = {
    7,   # COULDNT_CONNECT (refused, e.g. a restarting server)
    16,  # HTTP2 framing
    18,  # PARTIAL_FILE
    28,  # OPERATION_TIMEDOUT
    52,  # GOT_NOTHING
    55,  # SEND_ERROR (connection reset while sending)
    56,  # RECV_ERROR (connection reset while receiving)
    92,  # HTTP2_STREAM
}
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_CONTENT_RANGE = re.compile(rb"^content-range:\s*bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)
_C, _R = (b"C", b"c"), (b"R", b"r")
_CONTENT_RANGE_UNSAT = re.compile(rb"^content-range:\s*bytes\s+\*/(\d+)", re.I)


def redact(url: str) -> str:
    """The URL without a password, for messages and the UI."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class _Transfer:
    """State of one request: what the headers said, where the body goes."""

    __slots__ = ("status", "content_range", "total", "view", "pos", "overflow", "ranged",
                 "refuse")

    def __init__(self, buf: bytearray | None, ranged: bool):
        self.status = 0
        self.content_range: tuple[int, int] | None = None
        self.total: int | None = None
        self.view = memoryview(buf) if buf is not None else None
        self.pos = 0
        self.overflow = False  # the server sent more than we asked for
        self.ranged = ranged
        # what the status line says about the body: None (take it), or why not
        self.refuse: str | None = None if buf is not None else "no body wanted"

    def header(self, line: bytes) -> None:
        # Called for every header line (ten or so per read): only status
        # lines and Content-Range matter, told apart by a byte or two.
        first = line[:1]
        if first == b"H" and line.startswith(b"HTTP/"):
            # a new response (after a redirect or a 100 Continue): start over
            fields = line.split(None, 2)
            self.status = status = (int(fields[1]) if len(fields) > 1 and fields[1].isdigit()
                                    else 0)
            self.content_range = None
            self.total = None
            if self.view is None:
                pass
            elif not 200 <= status < 300:
                self.refuse = "error page"  # the status says it all
            elif self.ranged and status == 200:
                self.refuse = "whole file"  # 200 to a range request
            else:
                self.refuse = None
            return
        if first not in _C or line[8:9] not in _R:  # not content-[Rr]ange
            return
        m = _CONTENT_RANGE.match(line)
        if m:
            self.content_range = (int(m[1]), int(m[2]))
            self.total = None if m[3] == b"*" else int(m[3])
            return
        m = _CONTENT_RANGE_UNSAT.match(line)
        if m:
            self.total = int(m[1])

    def write(self, chunk: bytes) -> int | None:
        # Called for every piece of the body (16 KiB at most, libcurl's
        # CURL_MAX_WRITE_SIZE, whatever CURLOPT_BUFFERSIZE says): kept short.
        pos = self.pos
        end = pos + len(chunk)
        if self.refuse is not None:
            if self.refuse == "whole file":
                self.overflow = True
                return 0  # != len(chunk): libcurl aborts the transfer (CURLE_WRITE_ERROR)
            return None
        if end > len(self.view):
            self.overflow = True
            return 0
        self.view[pos:end] = chunk
        self.pos = end
        return None

    def release(self) -> None:
        """Drop the buffer (a handle keeps its last callbacks until reused)."""
        if self.view is not None:
            self.view.release()
            self.view = None


class _Retry(Exception):
    """A transient failure: the message to give if retries run out."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class CurlSource(Source):
    """Read-only source: a remote image fetched with ranged requests."""

    blocking = True
    can_multi_conn = True
    # NBD_INFO_BLOCK_SIZE: small reads are expensive over a network; say so.
    block_size = (1, 64 * 1024, 32 * 1024 * 1024)

    def __init__(self, url: str, *, headers=(), user: str | None = None,
                 password: str | None = None, timeout: float = 30.0, retries: int = 3,
                 connections: int = 4, insecure: bool = False):
        self.url = url
        self.scheme = urlsplit(url).scheme.lower()
        if self.scheme not in SCHEMES:
            raise SourceError(errno.EINVAL, f"{redact(url)}: unsupported URL scheme "
                              f"{self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if self.scheme not in pycurl.version_info()[8]:
            raise SourceError(errno.ENOTSUP, f"{redact(url)}: this libcurl was built without "
                              f"{self.scheme} support")
        if connections < 1:
            raise SourceError(errno.EINVAL, f"--connections must be at least 1 (got {connections})")
        if retries < 0:
            raise SourceError(errno.EINVAL, f"--retries must not be negative (got {retries})")
        if not 0 < timeout <= 86400:  # also refuses nan, which would pass as 1 ms
            raise SourceError(errno.EINVAL, f"--timeout is seconds, more than 0 (got {timeout})")
        self.headers = [h if isinstance(h, str) else h.decode() for h in headers]
        for h in self.headers:
            if ":" not in h:
                raise SourceError(errno.EINVAL, f"--header {h!r} is not 'Name: value'")
        self.user = user
        self.password = password
        self.timeout = timeout
        self.retries = retries
        self.connections = connections
        self.insecure = insecure
        self.is_http = self.scheme in ("http", "https")
        self.description = f"{self.scheme} {redact(url)}"
        self.warning: str | None = None
        # counters for tests and the stats sink
        self.requests = 0
        self.retried = 0
        self._counter_lock = threading.Lock()
        self._engines: list[CurlAio] = []  # attached to a server's loop

        self._pool: queue.Queue[pycurl.Curl] = queue.Queue()
        self._handles = [self._new_handle() for _ in range(connections)]
        for h in self._handles:
            self._pool.put(h)
        try:
            self.size = self._probe_size()
        except BaseException:
            self.close()
            raise

    # -- handles -----------------------------------------------------------

    def _new_handle(self) -> pycurl.Curl:
        c = pycurl.Curl()
        c.setopt(pycurl.URL, self.url)
        c.setopt(pycurl.NOSIGNAL, 1)  # required when handles are used from threads
        protocols = 0
        for name in ("HTTP", "HTTPS", "FTP", "FTPS", "SFTP"):
            protocols |= getattr(pycurl, "PROTO_" + name)
        c.setopt(pycurl.PROTOCOLS, protocols)
        c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS
                 | pycurl.PROTO_FTP | pycurl.PROTO_FTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 1)
        c.setopt(pycurl.MAXREDIRS, 10)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(self.timeout * 1000)))
        c.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, math.ceil(self.timeout)))
        c.setopt(pycurl.TCP_KEEPALIVE, 1)
        # Fewer, larger write callbacks (each one takes the GIL): 16 KiB by
        # default, 1 MiB reads ~1.5x faster on loopback.
        c.setopt(pycurl.BUFFERSIZE, 1 << 20)
        if self.headers:
            c.setopt(pycurl.HTTPHEADER, self.headers)
        if self.user is not None:
            c.setopt(pycurl.USERNAME, self.user)
        if self.password is not None:
            c.setopt(pycurl.PASSWORD, self.password)
        if self.insecure:
            c.setopt(pycurl.SSL_VERIFYPEER, 0)
            c.setopt(pycurl.SSL_VERIFYHOST, 0)
        return c

    # -- one transfer, its errors, and retries ------------------------------

    def _perform(self, c: pycurl.Curl, t: _Transfer, *, nobody: bool,
                 byte_range: str | None) -> None:
        """Run one transfer; raise SourceError (final) or _Retry (transient)."""
        self._prepare(c, t, nobody, byte_range)
        code, message = 0, ""
        try:
            c.perform()
        except pycurl.error as e:
            code = e.args[0]
            message = e.args[1] if len(e.args) > 1 else ""
        finally:
            # drop the references to this transfer's callbacks
            c.setopt(pycurl.HEADERFUNCTION, _ignore)
            c.setopt(pycurl.WRITEFUNCTION, _ignore)
        self._outcome(c, t, code, message)

    def _prepare(self, c: pycurl.Curl, t: _Transfer, nobody: bool,
                 byte_range: str | None) -> None:
        c.setopt(pycurl.NOBODY, 1 if nobody else 0)
        if not nobody:
            c.setopt(pycurl.HTTPGET, 1)
        c.setopt(pycurl.RANGE, byte_range)  # None clears it
        c.setopt(pycurl.HEADERFUNCTION, t.header)
        c.setopt(pycurl.WRITEFUNCTION, t.write)
        with self._counter_lock:
            self.requests += 1

    def _outcome(self, c: pycurl.Curl, t: _Transfer, code: int, message: str) -> None:
        """After a transfer ended with libcurl's ``code``: raise SourceError
        (final) or _Retry (transient) if it failed."""
        if code:
            if t.overflow:
                if t.ranged and t.status == 200:
                    raise SourceError(errno.EIO, self._no_range_message())
                raise _Retry(f"{redact(self.url)}: the server sent more bytes than "
                             f"requested")
            self._raise_curl_error(code, message)
        if self.is_http:
            t.status = c.getinfo(pycurl.RESPONSE_CODE) or t.status
            self._check_http_status(t.status)

    def _check_read(self, t: _Transfer, offset: int, length: int) -> None:
        """After a read's transfer succeeded: did it bring the bytes asked for?"""
        if self.is_http:
            if t.status != 206:
                raise SourceError(errno.EIO, self._no_range_message())
            if t.content_range is not None and t.content_range[0] != offset:
                raise SourceError(errno.EIO, f"{redact(self.url)}: asked for bytes from "
                                  f"{offset}, the server sent from {t.content_range[0]}")
        if t.pos != length:
            raise _Retry(f"{redact(self.url)}: short read at {offset}: got {t.pos} of "
                         f"{length} bytes (has the remote file changed?)")

    def _raise_curl_error(self, code: int, message: str) -> None:
        where = redact(self.url)
        host = urlsplit(self.url).hostname
        if code in _TLS_ERRORS:
            raise SourceError(errno.EIO, f"{where}: TLS failure talking to {host} ({message}); "
                              "fix the server's certificate, or pass --insecure if you "
                              "trust the network") from None
        if code == 6:
            raise SourceError(errno.EIO, f"{where}: cannot resolve host {host}; check the URL")
        if code == 67:
            raise SourceError(errno.EACCES, f"{where}: login denied; check --user and "
                              "--password")
        if code == 78:
            raise SourceError(errno.ENOENT, f"{where}: no such file on the server; check "
                              "the URL")
        if code == 33:
            raise SourceError(errno.EIO, self._no_range_message())
        if code == 9:
            raise SourceError(errno.EACCES, f"{where}: access denied by the server ({message})")
        if code in _TRANSIENT_CURL:
            raise _Retry(f"{where}: {message or f'curl error {code}'}")
        raise SourceError(errno.EIO, f"{where}: {message or f'curl error {code}'}")

    def _check_http_status(self, status: int) -> None:
        if 200 <= status < 300:
            return
        where = redact(self.url)
        if status in (404, 410):
            raise SourceError(errno.ENOENT, f"{where}: HTTP {status} Not Found; check the URL")
        if status in (401, 403, 407):
            raise SourceError(errno.EACCES, f"{where}: HTTP {status} access denied; check "
                              "--user/--password or --header")
        if status in _TRANSIENT_HTTP:
            raise _Retry(f"{where}: HTTP {status} from the server")
        raise SourceError(errno.EIO, f"{where}: HTTP {status} from the server")

    def _no_range_message(self) -> str:
        return (f"{redact(self.url)}: the server does not support byte ranges (it answered a "
                "range request with the whole file), so it cannot serve a disk image; "
                "use a server with Range support, or download the image first")

    def _with_retries(self, run):
        """Call run(handle) with a borrowed handle, retrying transient errors."""
        attempt = 0
        while True:
            c = self._pool.get()
            try:
                return run(c)
            except _Retry as r:
                if attempt >= self.retries:
                    raise self._gave_up(r, attempt) from None
            finally:
                self._pool.put(c)
            with self._counter_lock:
                self.retried += 1
            time.sleep(_backoff(attempt))
            attempt += 1

    def _gave_up(self, r: _Retry, attempt: int) -> SourceError:
        tries = f"{attempt + 1} attempt" + ("s" if attempt else "")
        return SourceError(errno.EIO, f"{r.message} (gave up after {tries}; "
                           "see --retries and --timeout)")

    # -- size ----------------------------------------------------------------

    def _probe_size(self) -> int:
        if not self.is_http:
            def head(c):
                self._perform(c, _Transfer(None, False), nobody=True, byte_range=None)
                return _content_length(c)
            size = self._with_retries(head)
            if size < 0:
                raise SourceError(errno.EIO, f"{redact(self.url)}: the server did not say "
                                  "how big the file is")
            return int(size)

        def head(c):
            try:
                self._perform(c, _Transfer(None, False), nobody=True, byte_range=None)
            except SourceError as e:
                if e.errno == errno.ENOENT:
                    raise
                return -1  # HEAD refused (e.g. a URL signed for GET): probe instead
            return _content_length(c)

        head_size = self._with_retries(head)

        def probe(c):
            t = _Transfer(bytearray(1), True)
            try:
                self._perform(c, t, nobody=False, byte_range="0-0")
            except SourceError:
                if t.status == 416 and t.total is not None:
                    return t  # an empty file: "bytes */0"
                raise
            return t

        t = self._with_retries(probe)
        if t.status == 416:
            return t.total
        if t.status == 200 and t.pos == 0 and head_size == 0:
            return 0  # an empty file: some servers (nginx) answer 200 and no range
        if t.status != 206 or t.content_range != (0, 0):
            raise SourceError(errno.EIO, self._no_range_message())
        if t.total is not None:
            return t.total
        if head_size >= 0:
            return int(head_size)
        raise SourceError(errno.EIO, f"{redact(self.url)}: the server did not say how big "
                          "the file is (no Content-Length, no Content-Range total)")

    # -- Source calls --------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        if length == 0:
            return b""
        buf = bytearray(length)
        byte_range = f"{offset}-{offset + length - 1}"

        def fetch(c):
            t = _Transfer(buf, self.is_http)
            self._perform(c, t, nobody=False, byte_range=byte_range)
            self._check_read(t, offset, length)
            return buf

        return bytes(self._with_retries(fetch))

    # -- the loop's asynchronous engine ----------------------------------------

    @property
    def aio(self) -> CurlAio:  # type: ignore[override]
        """A new engine on each call: a server asks once per export and
        attaches it to its own loop, so two servers of one source (the map
        maker's private server under the UI's) never share a multi handle."""
        return CurlAio(self)

    def close(self) -> None:
        engines, self._engines = self._engines, []
        for engine in engines:
            engine.close()
        handles, self._handles = self._handles, []
        for c in handles:
            c.close()


class _Read:
    """One NBD read on its way through the multi handle."""

    __slots__ = ("offset", "length", "done", "attempt", "buf", "transfer")

    def __init__(self, offset: int, length: int, done):
        self.offset = offset
        self.length = length
        self.done = done
        self.attempt = 0
        self.buf: bytearray | None = None
        self.transfer: _Transfer | None = None


class CurlAio:
    """Reads as transfers on one curl multi handle that the server's loop
    drives (curl_multi_socket_action): libcurl says which sockets to watch
    and when to wake it, the loop says which socket is ready. No thread
    hand-off per request, and no worker threads contending for the GIL in
    the 16 KiB write callbacks (measured: the pool in threads used twice the
    CPU per byte; see benchmarks/bench_sources.py).

    Every method is called from the loop's thread; ``done(result, error)``
    too, and ``completed()`` after each batch of completions so the server
    sends their replies together. ``connections`` easy handles share the
    multi's connection cache; reads beyond them wait in order for a free
    handle (the server bounds how many: its ASYNC_WINDOW per connection,
    charged to the memory budget), and a read's buffer is made only when its
    transfer starts. Errors, retries with backoff and their messages are the
    blocking ``pread``'s (``CurlSource._outcome``, ``_check_read``)."""

    def __init__(self, source: CurlSource):
        self.source = source
        self.loop = None
        self.completed: Callable[[], None] = lambda: None
        self.multi: pycurl.CurlMulti | None = None
        self._handles: list[pycurl.Curl] = []
        self._free: list[pycurl.Curl] = []
        self._active: dict[pycurl.Curl, _Read] = {}
        self._waiting: deque[_Read] = deque()  # for a free handle
        self._backing_off: set[_Read] = set()  # retries waiting for their time
        self._fds: dict[int, int] = {}  # socket -> what the loop watches (POLL_IN/OUT bits)
        self._deadline: float | None = None  # when libcurl wants socket_action(TIMEOUT)
        self._alarms: set[float] = set()  # wake-ups asked of the loop, not yet run
        self._kick = False  # libcurl has work to start now (new handles, a 0 ms timer)
        self._acting = False
        self._finished = 0  # reads completed since the last completed()
        self._closed = False

    def attach(self, loop, completed: Callable[[], None]) -> None:
        src = self.source
        self.loop = loop
        self.completed = completed
        m = pycurl.CurlMulti()
        m.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        m.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        # Keep one idle connection per handle, not libcurl's default of
        # four times the handles added (which changes as they come and go).
        m.setopt(pycurl.M_MAXCONNECTS, src.connections)
        self.multi = m
        for _ in range(src.connections):
            c = src._new_handle()
            c.setopt(pycurl.HTTPGET, 1)
            self._handles.append(c)
        self._free = list(self._handles)
        src._engines.append(self)

    # --- requests --------------------------------------------------------------

    def pread(self, offset: int, length: int, done) -> None:
        if self.multi is None:
            done(None, SourceError(errno.EIO, f"{redact(self.source.url)}: closed"))
            return
        try:
            check_range(self.source, offset, length)
        except SourceError as e:
            done(None, e)
            return
        if length == 0:
            done(b"", None)
            return
        job = _Read(offset, length, done)
        if self._free:
            self._start(job)
        else:
            self._waiting.append(job)

    def _start(self, job: _Read) -> None:
        c = self._free.pop()
        src = self.source
        job.buf = bytearray(job.length)
        t = job.transfer = _Transfer(job.buf, src.is_http)
        c.setopt(pycurl.RANGE, f"{job.offset}-{job.offset + job.length - 1}")
        c.setopt(pycurl.HEADERFUNCTION, t.header)
        c.setopt(pycurl.WRITEFUNCTION, t.write)
        with src._counter_lock:
            src.requests += 1
        self._active[c] = job
        self.multi.add_handle(c)
        self._kick = True

    def issued(self) -> None:
        """After a batch of requests: start their transfers together."""
        if self._kick and not self._acting:
            self._act(pycurl.SOCKET_TIMEOUT, 0)
            if self._finished:  # failed at once (e.g. connection refused)
                self.loop.call_soon_threadsafe(self._report)

    def flush(self, done) -> None:
        done(None, None)  # read-only: nothing to write back

    def cache(self, offset: int, length: int, done) -> None:
        done(None, None)  # a hint; reading ahead costs what the client's read would

    def extents(self, offset: int, length: int, done) -> None:
        done([(offset, length, 0)], None)

    def pwrite(self, offset, data, fua, done) -> None:
        done(None, SourceError(errno.EROFS, "source is read-only"))

    def trim(self, offset, length, fua, done) -> None:
        done(None, SourceError(errno.EROFS, "source is read-only"))

    def zero(self, offset, length, may_trim, fua, fast, done) -> None:
        done(None, SourceError(errno.EROFS, "source is read-only"))

    # --- driving libcurl from the loop -------------------------------------------

    def _act(self, fd: int, mask: int) -> None:
        """socket_action, then retire what finished; again while libcurl
        asks to be called at once."""
        self._acting = True
        try:
            self._kick = False
            self.multi.socket_action(fd, mask)
            self._retire()
            while self._kick and self.multi is not None:
                self._kick = False
                self.multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
                self._retire()
        finally:
            self._acting = False

    def _report(self) -> None:
        if self._finished:
            self._finished = 0
            self.completed()

    def _on_ready(self, fd: int, mask: int) -> None:
        if self.multi is None:
            return
        self._act(fd, mask)
        self._report()

    def _on_socket(self, what: int, fd: int, multi, socketp) -> None:
        """libcurl's socket callback: what the loop should watch on ``fd``."""
        if self.multi is None:
            return  # closing: close() took the sockets off the loop
        loop = self.loop
        old = self._fds.get(fd, 0)
        new = 0 if what == pycurl.POLL_REMOVE else what & pycurl.POLL_INOUT
        if old & pycurl.POLL_IN and not new & pycurl.POLL_IN:
            loop.remove_reader(fd)
        if old & pycurl.POLL_OUT and not new & pycurl.POLL_OUT:
            loop.remove_writer(fd)
        if new & pycurl.POLL_IN and not old & pycurl.POLL_IN:
            loop.add_reader(fd, self._on_ready, fd, pycurl.CSELECT_IN)
        if new & pycurl.POLL_OUT and not old & pycurl.POLL_OUT:
            loop.add_writer(fd, self._on_ready, fd, pycurl.CSELECT_OUT)
        if new:
            self._fds[fd] = new
        else:
            self._fds.pop(fd, None)

    def _on_timer(self, ms: int) -> None:
        """libcurl's timer callback: call socket_action(TIMEOUT) in ``ms``
        (-1: never). 0 is done by whoever called libcurl, when it returns
        (socket_action must not be called from inside a callback)."""
        if ms < 0:
            self._deadline = None
        elif ms == 0:
            self._deadline = None
            self._kick = True
        else:
            self._deadline = when = time.monotonic() + ms / 1000
            self._arm(when)

    def _arm(self, when: float) -> None:
        # The loop's timers cannot be cancelled: one wake-up is asked for
        # only when none is due at or before ``when``; it checks the
        # deadline of the moment when it runs.
        for alarm in self._alarms:
            if alarm <= when:
                return
        self._alarms.add(when)
        self.loop.call_later(max(0.0, when - time.monotonic()), self._on_alarm, when)

    def _on_alarm(self, when: float) -> None:
        self._alarms.discard(when)
        deadline = self._deadline
        if self.multi is None or deadline is None:
            return
        if deadline > time.monotonic() + 0.001:
            self._arm(deadline)  # the deadline moved later meanwhile
            return
        self._deadline = None
        self._act(pycurl.SOCKET_TIMEOUT, 0)
        self._report()

    def _retire(self) -> None:
        """Hand the finished transfers to their reads."""
        multi = self.multi
        while True:
            queued, ok, failed = multi.info_read()
            for c in ok:
                self._ended(c, 0, "")
            for c, code, message in failed:
                self._ended(c, code, message)
            if not queued:
                return

    def _ended(self, c: pycurl.Curl, code: int, message: str) -> None:
        job = self._active.pop(c)
        self.multi.remove_handle(c)
        src = self.source
        t = job.transfer
        job.transfer = None
        error: Exception | None = None
        try:
            src._outcome(c, t, code, message)
            src._check_read(t, job.offset, job.length)
        except (SourceError, _Retry) as e:
            error = e
        t.release()
        self._free.append(c)
        if self._waiting:
            self._start(self._waiting.popleft())
        self._finished += 1
        if error is None:
            buf, job.buf = job.buf, None
            job.done(buf, None)
        elif isinstance(error, _Retry) and job.attempt < src.retries:
            job.buf = None
            with src._counter_lock:
                src.retried += 1
            self._backing_off.add(job)
            self.loop.call_later(_backoff(job.attempt), self._retry, job)
            job.attempt += 1
            self._finished -= 1  # not finished after all
        else:
            job.buf = None
            if isinstance(error, _Retry):
                error = src._gave_up(error, job.attempt)
            job.done(None, error)

    def _retry(self, job: _Read) -> None:
        if job not in self._backing_off:
            return  # closed meanwhile: failed already
        self._backing_off.discard(job)
        if self._free:
            self._start(job)
        else:
            self._waiting.appendleft(job)  # it waited its turn before
        if self._kick:
            self._act(pycurl.SOCKET_TIMEOUT, 0)
        self._report()

    def close(self) -> None:
        """From the loop's thread while it runs, or any thread after it stopped.
        Reads not done yet fail with EIO."""
        multi, self.multi = self.multi, None
        if multi is None:
            return
        if self.loop is not None:
            for fd, what in self._fds.items():
                try:
                    if what & pycurl.POLL_IN:
                        self.loop.remove_reader(fd)
                    if what & pycurl.POLL_OUT:
                        self.loop.remove_writer(fd)
                except (OSError, ValueError, RuntimeError):
                    pass  # the loop is closed already
        self._fds.clear()
        jobs = [*self._active.values(), *self._waiting, *self._backing_off]
        for c in self._active:
            multi.remove_handle(c)
        self._active.clear()
        self._waiting.clear()
        self._backing_off.clear()
        multi.close()
        for c in self._handles:
            c.close()
        self._handles = self._free = []
        error = SourceError(errno.EIO, f"{redact(self.source.url)}: closed")
        for job in jobs:
            job.done(None, error)
        if jobs and self.loop is not None:
            try:  # their replies go out from the loop's thread, if it still runs
                self.loop.call_soon_threadsafe(self.completed)
            except RuntimeError:
                pass  # an asyncio loop that is closed: nobody to answer
        if self in self.source._engines:
            self.source._engines.remove(self)


def _content_length(c: pycurl.Curl) -> int:
    """Content-Length of the last transfer, -1 when the server gave none."""
    # CONTENT_LENGTH_DOWNLOAD_T (an integer) needs pycurl >= 7.45.2; the older
    # CONTENT_LENGTH_DOWNLOAD is a double, exact up to 2**53 bytes.
    info = getattr(pycurl, "CONTENT_LENGTH_DOWNLOAD_T", pycurl.CONTENT_LENGTH_DOWNLOAD)
    return int(c.getinfo(info))


def _ignore(data: bytes) -> None:
    return None


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt + 1``."""
    return min(0.1 * 2 ** attempt, 2.0)
