"""CurlSource: a remote image over http, https, ftp, ftps or sftp, read-only.

Every read is a ranged transfer (HTTP ``Range:``, FTP ``REST``, an SFTP
seek) done by libcurl through pycurl. A pool of ``connections`` easy handles
makes parallel NBD requests parallel transfers: each pread borrows a handle
from a queue (waiting when all are busy) and libcurl keeps each handle's
connection alive between reads. pycurl releases the GIL during a transfer.

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

    __slots__ = ("status", "content_range", "total", "view", "pos", "overflow", "ranged")

    def __init__(self, buf: bytearray | None, ranged: bool):
        self.status = 0
        self.content_range: tuple[int, int] | None = None
        self.total: int | None = None
        self.view = memoryview(buf) if buf is not None else None
        self.pos = 0
        self.overflow = False  # the server sent more than we asked for
        self.ranged = ranged

    def header(self, line: bytes) -> None:
        first = line[:1]
        if first not in b"HCc" or not first:  # only status lines and Content-Range matter
            return
        if line.startswith(b"HTTP/"):
            # a new response (after a redirect or a 100 Continue): start over
            fields = line.split(None, 2)
            self.status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
            self.content_range = None
            self.total = None
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
        n = len(chunk)
        view = self.view
        if view is None or (self.status and not 200 <= self.status < 300):
            return None  # no body wanted, or an error page: the status says it all
        if (self.ranged and self.status == 200) or self.pos + n > len(view):
            # 200 to a range request: the server is sending the whole file.
            self.overflow = True
            return 0  # != n: libcurl aborts the transfer (CURLE_WRITE_ERROR)
        view[self.pos:self.pos + n] = chunk
        self.pos += n
        return None


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
        c.setopt(pycurl.NOBODY, 1 if nobody else 0)
        if not nobody:
            c.setopt(pycurl.HTTPGET, 1)
        c.setopt(pycurl.RANGE, byte_range)  # None clears it
        c.setopt(pycurl.HEADERFUNCTION, t.header)
        c.setopt(pycurl.WRITEFUNCTION, t.write)
        with self._counter_lock:
            self.requests += 1
        try:
            c.perform()
        except pycurl.error as e:
            code = e.args[0]
            if t.overflow:
                if t.ranged and t.status == 200:
                    raise SourceError(errno.EIO, self._no_range_message()) from None
                raise _Retry(f"{redact(self.url)}: the server sent more bytes than "
                             f"requested") from None
            self._raise_curl_error(code, e.args[1] if len(e.args) > 1 else "")
        finally:
            # drop the references to this transfer's callbacks
            c.setopt(pycurl.HEADERFUNCTION, _ignore)
            c.setopt(pycurl.WRITEFUNCTION, _ignore)
        if self.is_http:
            t.status = c.getinfo(pycurl.RESPONSE_CODE) or t.status
            self._check_http_status(t.status)

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
        where = redact(self.url)
        if 200 <= status < 300:
            return
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
                    tries = f"{attempt + 1} attempt" + ("s" if attempt else "")
                    raise SourceError(errno.EIO, f"{r.message} (gave up after {tries}; "
                                      "see --retries and --timeout)") from None
            finally:
                self._pool.put(c)
            with self._counter_lock:
                self.retried += 1
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
            attempt += 1

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
            if self.is_http:
                if t.status != 206:
                    raise SourceError(errno.EIO, self._no_range_message())
                if t.content_range is not None and t.content_range[0] != offset:
                    raise SourceError(errno.EIO, f"{redact(self.url)}: asked for bytes from "
                                      f"{offset}, the server sent from {t.content_range[0]}")
            if t.pos != length:
                raise _Retry(f"{redact(self.url)}: short read at {offset}: got {t.pos} of "
                             f"{length} bytes (has the remote file changed?)")
            return buf

        return bytes(self._with_retries(fetch))

    def close(self) -> None:
        handles, self._handles = self._handles, []
        for c in handles:
            c.close()


def _content_length(c: pycurl.Curl) -> int:
    """Content-Length of the last transfer, -1 when the server gave none."""
    # CONTENT_LENGTH_DOWNLOAD_T (an integer) needs pycurl >= 7.45.2; the older
    # CONTENT_LENGTH_DOWNLOAD is a double, exact up to 2**53 bytes.
    info = getattr(pycurl, "CONTENT_LENGTH_DOWNLOAD_T", pycurl.CONTENT_LENGTH_DOWNLOAD)
    return int(c.getinfo(info))


def _ignore(data: bytes) -> None:
    return None
