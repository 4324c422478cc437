"""StreamSource: the client's writes, in order, become a byte stream.

``diskwatch --stream-to PATH --run 'qemu-img convert -n in.img -O raw $nbd'``
turns a conversion into a stream written to PATH (a pipe, a unix socket, a
file), as nbdkit's old streaming plugin did. Unlike that plugin it keeps a
sliding *window* of the most recent ``window`` bytes in memory (a ring
buffer), so a client may go back and re-read or rewrite anything inside the
window; only bytes that fall out of the window's back edge are sent to PATH.

Offsets and what they mean::

    0 .............. base ................. hwm ......... base+window ... size
    |  already sent  |  in memory (window)  | not written yet: reads zeroes |

* A write at or after ``base`` is accepted. A write that ends beyond
  ``base + window`` first slides the window forward, sending the bytes it
  leaves behind. A write that skips forward past ``hwm`` fills the gap with
  zeroes (qemu-img skips zero regions of a sparse image).
* A read or write before ``base`` is an error (EIO, with a message naming
  ``--window``): those bytes are gone down the pipe, and pretending otherwise
  would be silent corruption.
* Reads of anything not written yet return zeroes.
* Zero and trim are writes of zeroes. Fast zero is refused, on purpose: a
  client that zeroes the whole disk first "because it is fast" would push
  the whole disk through the pipe before writing the data.
* ``flush`` sends nothing: everything still in the window may yet be
  rewritten. What has left the window is already written (and fsync'd for a
  regular file at flush).
* ``close`` sends the rest of the window up to the highest offset written,
  then, when ``size`` was given, zeroes up to ``size``: so the stream of
  ``qemu-img convert -n IMAGE`` is byte-identical to IMAGE even when
  qemu-img skipped its trailing zero regions. Without an explicit size the
  stream ends at the highest offset written (what nbdkit-streaming did).

Size: without ``size`` the export is ``DEFAULT_SIZE`` (1 PiB) so that any
image fits, as nbdkit-streaming used a huge virtual size; the stream is not
padded to it.

Opening PATH: if it does not exist a FIFO is made there (and removed at
close). Opening a FIFO for writing blocks until a reader opens it, so it is
opened lazily, the first time bytes must leave the window (or at close), and
with O_NONBLOCK in a polling wait that ``abort()`` can stop: the server is
never stuck, only the request that needs the reader waits for one (the
source is ``blocking``, so it waits in a worker thread). A unix socket is
connected to; a regular file is truncated and written; anything else (a
character device such as /dev/null, an existing FIFO) is opened for writing.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading

from .base import FastZeroUnsupported, Source, SourceError

MiB = 1 << 20
#: export size when none is given: 1 PiB, larger than any disk one streams
DEFAULT_SIZE = 1 << 50
_ZEROES = bytes(MiB)


class StreamSource(Source):
    """Write-mostly source: writes become a stream to PATH through a window."""

    blocking = True  # writes to a pipe block when the reader is slow
    can_write = True
    can_flush = True
    can_fua = False
    can_trim = True
    can_zero = True
    can_fast_zero = False
    can_extents = False
    can_cache = False
    can_multi_conn = False  # one stream; a second writer would interleave
    # NBD_INFO_BLOCK_SIZE: minimum 512 so clients don't do read-modify-write below it
    block_size = (512, 64 * 1024, 32 * MiB)

    def __init__(self, path: str | os.PathLike, *, size: int | None = None,
                 window: int = 64 * MiB):
        if window < 4096:
            raise SourceError(errno.EINVAL, f"--window must be at least 4096 bytes (got {window})")
        if size is not None and size < 0:
            raise SourceError(errno.EINVAL, f"--size must not be negative (got {size})")
        self.path = os.fspath(path)
        self.explicit_size = size is not None
        self.size = size if size is not None else DEFAULT_SIZE
        self.window = window
        self.description = f"stream to {self.path}"
        self.warning: str | None = None
        self._ring = bytearray(window)
        self._base = 0  # stream offset of the first byte not yet sent
        self._hwm = 0  # highest offset written + 1
        self._lock = threading.Lock()
        self._aborted = threading.Event()
        self._closed = False
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._regular = False
        #: True while a write waits for a reader to open the FIFO
        self.waiting_for_reader = False
        self.bytes_sent = 0

        self._created_fifo = False
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            try:
                os.mkfifo(self.path, 0o600)
            except OSError as e:
                raise SourceError(e.errno or errno.EIO,
                                  f"cannot create FIFO {self.path}: {e.strerror}") from e
            self._created_fifo = True
            self._kind = "fifo"
        except OSError as e:
            raise SourceError(e.errno or errno.EIO, f"cannot use {self.path}: {e.strerror}") from e
        else:
            if stat.S_ISSOCK(st.st_mode):
                self._kind = "socket"
                self._connect_socket()
            elif stat.S_ISFIFO(st.st_mode):
                self._kind = "fifo"
            elif stat.S_ISREG(st.st_mode):
                # Truncated and overwritten: never through a link planted
                # where the person expected a file (as for --log, --record).
                if os.path.islink(self.path):
                    raise SourceError(errno.ELOOP, f"refusing to stream to {self.path}: it is "
                                      "a symbolic link to a file (give the file's real path, "
                                      "or remove the link)")
                self._kind = "file"
                self._open_file(os.O_TRUNC | os.O_NOFOLLOW)
                self._regular = True
            elif stat.S_ISCHR(st.st_mode):
                self._kind = "device"
                self._open_file(0)
            else:
                raise SourceError(errno.EINVAL, f"cannot stream to {self.path}: not a FIFO, "
                                  "unix socket, regular file or character device")

    # -- the other end -------------------------------------------------------

    def _open_file(self, extra: int) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC | extra)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SourceError(errno.ELOOP, f"refusing to stream to {self.path}: it became "
                                  "a symbolic link") from e
            raise SourceError(e.errno or errno.EIO, f"cannot open {self.path} for writing: "
                              f"{e.strerror}") from e
        self._check_kind(self._fd)

    def _check_kind(self, fd: int) -> None:
        """What was opened is what was looked at: a FIFO or device swapped
        for a link to a file between the two is not written."""
        mode = os.fstat(fd).st_mode
        want = {"file": stat.S_ISREG, "device": stat.S_ISCHR, "fifo": stat.S_ISFIFO}[self._kind]
        if not want(mode):
            os.close(fd)
            if self._fd == fd:
                self._fd = None
            raise SourceError(errno.EINVAL, f"refusing to stream to {self.path}: it changed "
                              f"while being opened (no longer a {self._kind})")

    def _connect_socket(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise SourceError(e.errno or errno.EIO, f"cannot connect to unix socket "
                              f"{self.path}: {e.strerror}; start the reader first") from e
        self._sock = s

    def _open_fifo(self) -> None:
        """Wait for a reader of the FIFO without hanging for ever: O_NONBLOCK
        opens fail with ENXIO until a reader is there; poll until one is, or
        until abort()."""
        delay = 0.001
        self.waiting_for_reader = True
        try:
            while True:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    break
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise SourceError(e.errno or errno.EIO, f"cannot open FIFO {self.path} "
                                          f"for writing: {e.strerror}") from e
                if self._aborted.wait(delay):
                    raise SourceError(errno.EIO, f"no reader ever opened FIFO {self.path}; "
                                      "the stream was abandoned")
                delay = min(delay * 2, 0.1)
        finally:
            self.waiting_for_reader = False
        self._check_kind(fd)
        os.set_blocking(fd, True)  # from now on writes wait for a slow reader
        self._fd = fd

    def _send(self, data: bytes | memoryview) -> None:
        """Send bytes to PATH (called with the lock held, in stream order)."""
        if not data:
            return
        if self._fd is None and self._sock is None:
            self._open_fifo()
        try:
            if self._sock is not None:
                self._sock.sendall(data)
            else:
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
        except BrokenPipeError as e:
            raise SourceError(errno.EIO, f"the reader of {self.path} went away (broken pipe) "
                              f"after {self.bytes_sent} bytes") from e
        except OSError as e:
            raise SourceError(e.errno or errno.EIO, f"writing to {self.path}: "
                              f"{e.strerror}") from e
        self.bytes_sent += len(data)

    def _send_zeroes(self, n: int) -> None:
        while n > 0:
            k = min(n, len(_ZEROES))
            self._send(memoryview(_ZEROES)[:k])
            n -= k

    # -- the window ---------------------------------------------------------

    def _ring_parts(self, start: int, end: int):
        """The ring slices holding stream bytes [start, end): one or two."""
        w = self.window
        a, b = start % w, end % w
        if end - start == 0:
            return []
        if a < b or b == 0:
            return [(a, b or w)]
        return [(a, w), (0, b)]

    def _ring_write(self, start: int, data: memoryview | None, length: int) -> None:
        """Put DATA (or zeroes when None) at stream offset START in the ring."""
        done = 0
        for a, b in self._ring_parts(start, start + length):
            n = b - a
            if data is None:
                self._ring[a:b] = _ZEROES[:n] if n <= len(_ZEROES) else bytes(n)
            else:
                self._ring[a:b] = data[done:done + n]
            done += n

    def _send_ring(self, start: int, end: int) -> None:
        ring = memoryview(self._ring)
        for a, b in self._ring_parts(start, end):
            self._send(ring[a:b])

    def _before_window(self, what: str, offset: int) -> SourceError:
        return SourceError(
            errno.EIO,
            f"{what} at offset {offset} is before the stream window (bytes before "
            f"{self._base} were already sent to {self.path}); the client went back more "
            f"than --window {self.window} bytes: run again with a larger --window")

    def _advance(self, new_base: int, offset: int, data: memoryview | None) -> None:
        """Send stream bytes [base, new_base), which leave the window. Each comes
        from the ring (old data below hwm), is a gap zero, or comes from the
        write being made at OFFSET (DATA, or zeroes when None)."""
        base, hwm = self._base, self._hwm
        # old data in the ring, up to where the new write or the gap starts
        old_end = min(new_base, hwm, offset)
        if old_end > base:
            self._send_ring(base, old_end)
        # a gap between what was written and the new write reads as zeroes
        gap_end = min(new_base, offset)
        gap_start = max(base, min(hwm, offset))
        if gap_end > gap_start:
            self._send_zeroes(gap_end - gap_start)
        # the front of the new write itself, when it is larger than the window
        if new_base > offset:
            n = new_base - max(offset, base)
            if data is None:
                self._send_zeroes(n)
            else:
                self._send(data[max(offset, base) - offset:new_base - offset])
        self._base = new_base

    def _write(self, offset: int, data: memoryview | None, length: int) -> None:
        end = offset + length
        if offset < 0 or end > self.size:
            raise SourceError(errno.ENOSPC if end > self.size else errno.EINVAL,
                              f"write {offset}+{length} outside the stream size {self.size}")
        with self._lock:
            if self._closed:
                raise SourceError(errno.EIO, f"stream to {self.path} is closed")
            if length == 0:
                return
            if offset < self._base:
                raise self._before_window("write", offset)
            new_base = max(self._base, end - self.window)
            old_hwm = self._hwm
            if new_base > self._base:
                self._advance(new_base, offset, data)
            # zero the ring where a gap opened inside the window: the ring may
            # still hold bytes from a lap ago there
            gap_start = max(old_hwm, self._base)
            if offset > gap_start:
                self._ring_write(gap_start, None, offset - gap_start)
            start = max(offset, self._base)
            if end > start:
                part = None if data is None else data[start - offset:]
                self._ring_write(start, part, end - start)
            self._hwm = max(old_hwm, end)

    # -- Source calls --------------------------------------------------------

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._write(offset, memoryview(data).cast("B"), len(data))

    def zero(self, offset: int, length: int, may_trim: bool = False,
             fua: bool = False, fast: bool = False) -> None:
        if fast:
            raise FastZeroUnsupported()
        self._write(offset, None, length)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        # trimmed bytes read back as zeroes here, so the stream carries zeroes
        self._write(offset, None, length)

    def pread(self, offset: int, length: int) -> bytes:
        end = offset + length
        if offset < 0 or length < 0 or end > self.size:
            raise SourceError(errno.EINVAL, f"read {offset}+{length} outside 0..{self.size}")
        with self._lock:
            if offset < self._base:
                raise self._before_window("read", offset)
            out = bytearray(length)
            valid_end = min(end, self._hwm)
            if valid_end > offset:
                ring = memoryview(self._ring)
                pos = 0
                for a, b in self._ring_parts(offset, valid_end):
                    out[pos:pos + b - a] = ring[a:b]
                    pos += b - a
            return bytes(out)

    def flush(self) -> None:
        with self._lock:
            if self._regular and self._fd is not None:
                os.fsync(self._fd)

    @property
    def window_start(self) -> int:
        """Stream offset of the oldest byte still in memory (all before it is sent)."""
        return self._base

    @property
    def written_end(self) -> int:
        """Highest offset written + 1."""
        return self._hwm

    @property
    def stream_length(self) -> int:
        """How long the stream will be once closed."""
        return self.size if self.explicit_size else self._hwm

    def abort(self) -> None:
        """Stop waiting for a FIFO reader (from another thread, e.g. on
        Ctrl-C); the waiting write or close fails with EIO."""
        self._aborted.set()

    def close(self) -> None:
        """Send the rest of the window and the zero padding, then close PATH.
        For a FIFO this waits for a reader if none has opened it yet (abort()
        stops that wait)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                final = self.stream_length
                if final > self._base:
                    self._send_ring(self._base, min(self._hwm, final))
                    self._send_zeroes(final - max(self._hwm, self._base))
                    self._base = final
                elif self._kind == "fifo" and self._fd is None:
                    # nothing to send, but a reader may be waiting for EOF
                    try:
                        self._fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK
                                           | os.O_CLOEXEC)
                    except OSError:
                        pass
                if self._regular and self._fd is not None:
                    os.fsync(self._fd)
            finally:
                if self._sock is not None:
                    try:
                        self._sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self._sock.close()
                    self._sock = None
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                if self._created_fifo:
                    try:
                        os.unlink(self.path)
                    except OSError:
                        pass
