"""TLS for the NBD server, as nbdkit and qemu-nbd do it.

``--tls=on`` lets a client upgrade with ``NBD_OPT_STARTTLS`` (and serves
plain clients too: the spec's SELECTIVETLS with no TLS-only export);
``--tls=require`` is FORCEDTLS: every option but STARTTLS and ABORT gets
``NBD_REP_ERR_TLS_REQD``, and ``NBD_OPT_EXPORT_NAME`` before TLS ends the
session. Credentials: ``--tls-certificates DIR`` in nbdkit's and qemu's
layout (``server-cert.pem``, ``server-key.pem``, and ``ca-cert.pem`` to
check client certificates with ``--tls-verify-peer``), or ``--tls-psk FILE``
in psktool's format (``username:hexkey`` lines).

The protocol stays sans-IO and the transport stays an epoll loop: once the
STARTTLS acknowledgement is sent, the connection's socket is replaced by a
``TLSSocket`` with the same two calls the transport makes (``recv_into``,
``sendmsg``) over an ``ssl.SSLObject`` and two ``MemoryBIO``s. The handshake
is driven by those calls, never blocking; decrypted bytes go straight into
the connection's receive buffer; replies are encrypted in pieces of at most
``SEND_CHUNK`` bytes, so at most that much ciphertext waits per connection
(read data from an mmap is copied once, by the encryption).

Big replies are encrypted off the loop's thread: a send of at least
OFFLOAD_MIN of plaintext (a 256 KiB read's reply) is handed to one of the
server's encryption threads (``Encryptor``; OpenSSL releases the GIL while
it encrypts), so the loop serves other connections meanwhile, and several
connections are encrypted at once on several cores, as nbdkit's threads
do. An SSL object must not be used by two threads at once: while its job
runs (``encrypting``) the socket is neither read (the transport stops
watching it) nor written through, and the job's end, back on the loop,
says so (``on_encrypted``). The loop sends one job's ciphertext while the
next job encrypts. Smaller sends (a 4 KiB read's reply) are encrypted on
the loop: handing them over would cost more than encrypting them.

What the loop cannot see: plaintext or ciphertext TLS already holds in
memory (a socket read can bring several records; the receive buffer may fill
before they are all decrypted). ``buffered`` says so, and the transport asks
for another read itself.

PSK: Python's ssl module has no PSK callbacks before 3.13. On older Pythons
``_set_psk_server_callback`` installs OpenSSL's ``SSL_CTX_set_psk_server_callback``
through ctypes on the context's ``SSL_CTX``, found in the ``PySSLContext``
object (its first field); the pointer is checked against the context's
options before anything uses it, and the libssl called is the one
``_ssl`` itself loaded.
"""

from __future__ import annotations

import ctypes
import os
import re
import ssl
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from ..errors import DiskwatchError

__all__ = ["Encryptor", "TLSConfig", "TLSError", "TLSSocket", "load_psk_file", "make_tls"]

TLS_MODES = ("off", "on", "require")
# Memory TLS adds to a connection, beyond the transport's own budget: at most
# SEND_CHUNK of ciphertext waiting for a client that does not read (nothing
# more is encrypted until it is sent), at most RECV_CHUNK of ciphertext read
# ahead, and OpenSSL's record buffers (~34 KiB): under 420 KiB. A big send
# encrypted off the loop (OFFLOAD_MIN) holds at most SEND_CHUNK of plaintext
# (out of the transport's count, which saw it leave) and its ciphertext, while
# at most one earlier SEND_CHUNK of ciphertext waits: under 950 KiB, so 128
# connections stay under 120 MiB however their clients behave.
SEND_CHUNK = 1 << 18  # plaintext encrypted per send call: bounds the ciphertext waiting
RECV_CHUNK = 1 << 17  # ciphertext read from the socket at once
COALESCE = 16 * 1024  # pieces up to this size are joined into one TLS record
#: sends of at least this much plaintext are encrypted in an Encryptor's thread
OFFLOAD_MIN = 128 * 1024
#: encryption threads of a server, shared by its TLS connections
ENCRYPT_THREADS = max(1, min(8, os.cpu_count() or 1))


class TLSError(DiskwatchError):
    """TLS cannot be set up as asked (missing or bad credentials)."""


@dataclass
class TLSConfig:
    mode: str  # "on" or "require"
    context: ssl.SSLContext
    description: str  # e.g. "certificates /etc/pki/nbd, client certificates checked"


def make_tls(mode: str, certificates: str | None = None, psk: str | None = None,
             verify_peer: bool = False) -> TLSConfig | None:
    """The server's TLS setup from the command line's options (None: off)."""
    if mode not in TLS_MODES:
        raise TLSError(f"--tls={mode}: use off, on or require")
    if mode == "off":
        if certificates or psk or verify_peer:
            raise TLSError("--tls-certificates, --tls-psk and --tls-verify-peer need "
                           "--tls=on or --tls=require")
        return None
    if bool(certificates) == bool(psk):
        raise TLSError(f"--tls={mode} needs --tls-certificates DIR or --tls-psk FILE "
                       "(one of them)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # proto.md: 1.2 or later only
    ctx.options |= ssl.OP_NO_COMPRESSION
    if certificates:
        _load_certificates(ctx, certificates, verify_peer)
        what = f"certificates in {certificates}"
        if verify_peer:
            what += ", client certificates checked"
    else:
        if verify_peer:
            raise TLSError("--tls-verify-peer checks client certificates: it needs "
                           "--tls-certificates DIR, not --tls-psk")
        keys = load_psk_file(psk)
        _set_psk_server_callback(ctx, keys)
        what = f"pre-shared keys from {psk} ({len(keys)} user{'s' if len(keys) != 1 else ''})"
    return TLSConfig(mode, ctx, what)


def _load_certificates(ctx: ssl.SSLContext, directory: str, verify_peer: bool) -> None:
    def need(name: str) -> str:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise TLSError(f"--tls-certificates {directory}: no {name} there (nbdkit's and "
                           "qemu's layout: ca-cert.pem, server-cert.pem, server-key.pem)")
        return path

    cert, key = need("server-cert.pem"), need("server-key.pem")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TLSError(f"--tls-certificates {directory}: server-cert.pem and server-key.pem "
                       f"cannot be used: {e.reason or e}") from None
    if verify_peer:
        ca = need("ca-cert.pem")
        try:
            ctx.load_verify_locations(ca)
        except ssl.SSLError as e:
            raise TLSError(f"--tls-certificates {directory}: ca-cert.pem cannot be used: "
                           f"{e.reason or e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED


_PSK_LINE = re.compile(r"([^:\s]+):([0-9a-fA-F]+)")


def load_psk_file(path: str) -> dict[bytes, bytes]:
    """psktool's file: ``username:hexkey`` per line -> {username: key}."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TLSError(f"--tls-psk {path}: {e.strerror}") from None
    except UnicodeDecodeError:  # a binary file, or a key file given by mistake
        raise TLSError(f"--tls-psk {path}: not text (psktool's format: 'username:hexkey' "
                       "lines)") from None
    keys: dict[bytes, bytes] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        m = _PSK_LINE.fullmatch(line.strip())
        if m is None or len(m[2]) % 2:
            raise TLSError(f"--tls-psk {path}:{n}: not 'username:hexkey' (psktool's format)")
        keys[m[1].encode()] = bytes.fromhex(m[2])
    if not keys:
        raise TLSError(f"--tls-psk {path}: no keys in it (make one: psktool -u USER -p {path})")
    return keys


# --- PSK through OpenSSL's own callback ------------------------------------------

_PSK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                 ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)
_keep_alive: list = []  # ctypes callbacks must outlive the contexts that call them


def _libssl() -> ctypes.CDLL:
    """The libssl that ``_ssl`` loaded (the same instance: its SSL_CTX is ours)."""
    import _ssl  # noqa: F401 - loaded first, so its libssl is mapped
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if "/libssl.so" in path:
                return ctypes.CDLL(path)
    raise TLSError("--tls-psk: Python's ssl module does not use a shared libssl here "
                   "(use --tls-certificates, or Python 3.13 or later)")


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int:
    """The SSL_CTX* of an ssl.SSLContext: the first field after PyObject_HEAD,
    checked: OpenSSL must report the options Python set on it."""
    ptr = ctypes.c_void_p.from_address(id(ctx) + sys.getsizeof(object())).value
    get_options = lib.SSL_CTX_get_options
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    if not ptr or get_options(ptr) != ctx.options:
        raise TLSError("--tls-psk: cannot reach OpenSSL's context from this Python "
                       "(use --tls-certificates, or Python 3.13 or later)")
    return ptr


def _set_psk_server_callback(ctx: ssl.SSLContext, keys: dict[bytes, bytes]) -> None:
    def lookup(identity: bytes | None) -> bytes | None:
        return keys.get(identity or b"")

    if hasattr(ctx, "set_psk_server_callback"):  # Python 3.13+
        ctx.set_psk_server_callback(lambda identity: lookup(
            identity.encode() if isinstance(identity, str) else identity) or b"")
        ctx.set_ciphers("PSK:ECDHE-PSK:DHE-PSK")  # TLS 1.2 PSK suites; 1.3 takes the PSK as is
        return
    lib = _libssl()
    ptr = _ssl_ctx_pointer(ctx, lib)
    ctx.set_ciphers("PSK:ECDHE-PSK:DHE-PSK")

    def callback(ssl_ptr, identity, psk, max_len):
        key = lookup(identity)
        if key is None or len(key) > max_len:
            return 0  # unknown user: the handshake fails
        ctypes.memmove(psk, key, len(key))
        return len(key)

    cb = _PSK_CALLBACK(callback)
    _keep_alive.append(cb)
    setter = lib.SSL_CTX_set_psk_server_callback
    setter.restype = None
    setter.argtypes = [ctypes.c_void_p, _PSK_CALLBACK]
    setter(ptr, cb)


# --- the connection ---------------------------------------------------------------

class Encryptor:
    """The threads that encrypt big sends off the loop's thread, for every
    TLS connection of a server (each connection has one job at a time)."""

    def __init__(self, loop, threads: int = ENCRYPT_THREADS) -> None:
        self.loop = loop
        self.threads = threads
        self.jobs = 0  # jobs run (the tests look)
        self._pool: ThreadPoolExecutor | None = None

    def run(self, job: Callable[[], bytes], done: Callable) -> None:
        """``job()`` in a thread, then ``done(future)`` on the loop's thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="diskwatch-tls")
        self.jobs += 1
        loop = self.loop
        self._pool.submit(job).add_done_callback(
            lambda fut: loop.call_soon_threadsafe(done, fut))

    def close(self) -> None:
        """Wait for the jobs running (they only encrypt) and stop the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class TLSSocket:
    """A connected, non-blocking socket seen through TLS: ``recv_into`` and
    ``sendmsg`` as the transport uses them on a plain socket. With an
    ``encryptor``, big sends are encrypted in its threads and
    ``on_encrypted()`` is called on the loop's thread after each."""

    def __init__(self, sock, context: ssl.SSLContext, received: bytes = b"",
                 encryptor: Encryptor | None = None,
                 on_encrypted: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        if received:  # bytes read past STARTTLS: the start of the client's handshake
            self.incoming.write(received)
        self.handshake_done = False
        self.eof = False
        self._out: deque = deque()  # ciphertext the socket did not take yet
        self.encryptor = encryptor
        self.on_encrypted = on_encrypted
        #: a job of the encryptor uses the SSL object: nothing else may
        self.encrypting = False
        self._failed: BaseException | None = None  # what a job raised, for the next send

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def family(self):
        return self.sock.family

    @property
    def pending(self) -> bool:
        """Ciphertext waits for the socket (the transport watches for
        writability). Not a job encrypting: its end is said by on_encrypted."""
        return bool(self._out) or (not self.encrypting and self.outgoing.pending > 0)

    @property
    def buffered(self) -> bool:
        """TLS holds input the loop cannot see (the transport reads again)."""
        return (self.handshake_done and not self.encrypting
                and (self.obj.pending() > 0 or self.incoming.pending > 0))

    # --- reading ---------------------------------------------------------

    def _fill(self) -> bool:
        """Ciphertext from the socket into TLS; False if the socket had none."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:
            self.eof = True
            self.incoming.write_eof()
            return True
        self.incoming.write(data)
        return True

    def _handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                self.flush()
                if not self._fill():
                    raise BlockingIOError from None
                if self.eof and not self.incoming.pending:
                    raise ConnectionResetError("the client left during the TLS handshake") \
                        from None
                continue
            self.handshake_done = True
            self.flush()
            return

    def recv_into(self, view) -> int:
        """Decrypted bytes into ``view``; 0 at the end of the stream; raises
        BlockingIOError when nothing can be had without waiting."""
        if self.encrypting:
            raise BlockingIOError  # the transport reads again once the job is done
        if not self.handshake_done:
            self._handshake()
        want = len(view)
        total = 0
        ended = False
        read = self.obj.read
        while total < want:
            try:
                n = read(want - total, view[total:])
            except ssl.SSLWantReadError:
                # Some read already: hand it on rather than ask the socket
                # again (a recv that would only say EAGAIN, every round: the
                # loop is level-triggered and comes back for the rest).
                if total or not self._fill():
                    break
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True  # close_notify, or the socket closed under TLS
                break
            if n == 0:
                ended = True
                break
            total += n
        if self.outgoing.pending:  # TLS 1.3 answers some records (key updates)
            self.flush()
        if total == 0 and not ended:
            raise BlockingIOError
        return total

    # --- writing ---------------------------------------------------------

    def flush(self) -> bool:
        """Send waiting ciphertext; True if some is still waiting."""
        if self._failed is not None:
            failed, self._failed = self._failed, None
            if isinstance(failed, OSError):
                raise failed
            raise OSError(f"TLS encryption failed: {failed}")
        out = self._out
        if not self.encrypting and self.outgoing.pending:
            out.append(self.outgoing.read())
        while out:
            try:
                n = self.sock.sendmsg(out)  # pieces go out as they are: no joining copy
            except (BlockingIOError, InterruptedError):
                return True
            while n:
                first = out[0]
                if len(first) <= n:
                    n -= len(first)
                    out.popleft()
                else:
                    out[0] = memoryview(first)[n:]
                    n = 0
        return False

    def sendmsg(self, iov) -> int:
        """Encrypt from ``iov`` (at most SEND_CHUNK bytes) and send; returns the
        plaintext bytes taken. Raises BlockingIOError while a job encrypts,
        or while earlier ciphertext still waits for the socket (a big send
        is handed to the encryptor then, if none runs: the loop sends the
        one while the other encrypts)."""
        if self.encrypting:
            raise BlockingIOError
        waiting = self.flush()
        big = self.encryptor is not None and _at_least(iov, OFFLOAD_MIN)
        if waiting and not big:
            raise BlockingIOError
        records, taken = _records(iov)
        if big:
            self.encrypting = True
            self.encryptor.run(partial(self._encrypt, records), self._encrypted)
            return taken
        data = self._encrypt(records)
        try:
            n = self.sock.send(data)  # nothing waits (flush above): straight out
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            self._out.append(memoryview(data)[n:])
        return taken

    def _encrypt(self, records: list) -> bytes:
        """The ciphertext of ``records`` (in an encryptor's thread, or on the loop)."""
        write = self.obj.write
        for record in records:
            write(record)
        return self.outgoing.read()

    def _encrypted(self, fut) -> None:
        """On the loop's thread: a job is done; its ciphertext goes out next."""
        self.encrypting = False
        try:
            self._out.append(fut.result())
        except BaseException as e:  # noqa: BLE001 - raised by the next flush, on the loop
            self._failed = e
        if self.on_encrypted is not None:
            self.on_encrypted()

    def close(self) -> None:
        try:
            if self.handshake_done and not self.encrypting:  # (a job still uses obj)
                self.obj.unwrap()  # close_notify; the reply is not waited for
        except (ssl.SSLError, OSError):
            pass
        try:
            self.flush()
        except OSError:
            pass
        self.sock.close()


def _at_least(iov, n: int) -> bool:
    """Whether the pieces of ``iov`` hold ``n`` bytes or more."""
    total = 0
    for item in iov:
        total += len(item)
        if total >= n:
            return True
    return False


def _records(iov) -> tuple[list, int]:
    """What one send encrypts: the start of ``iov`` up to SEND_CHUNK bytes,
    small pieces (a reply header, a 4 KiB read) joined into one record (a
    record per piece costs a MAC and 22 bytes each); and how many bytes."""
    records: list = []
    taken = 0
    small: list = []
    small_len = 0
    for item in iov:
        n = len(item)
        if n == 0:
            continue
        if n <= COALESCE and taken + small_len + n <= SEND_CHUNK:
            small.append(item)
            small_len += n
            continue
        if small:
            records.append(b"".join(small))
            taken += small_len
            small.clear()
            small_len = 0
        room = SEND_CHUNK - taken
        if n > room:
            if room:
                records.append(memoryview(item)[:room])
                taken += room
            break
        records.append(item)
        taken += n
        if taken >= SEND_CHUNK:
            break
    if small:
        records.append(b"".join(small))
        taken += small_len
    return records, taken
