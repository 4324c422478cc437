"""The Source interface: what the NBD server asks of whatever holds the bytes.

Modelled on nbdkit's plugin/filter calls. A source knows nothing of NBD: it
answers size, pread, pwrite, flush, trim, zero, extents and cache, and says
what it can do through the ``can_*`` attributes. Errors are raised as
``OSError`` with an errno (``SourceError`` adds a message a person can read);
the server turns the errno into the NBD error code.

A ``Layer`` wraps the ``next`` source (nbdkit's filter over its next
plugin or filter) and passes every call of the interface through; read-only
and snapshot are layers, so is anything that wants to watch or alter calls.
``stack(top)`` lists a stack from its top layer down to the source.

Every source and every layer declares a **thread model**, nbdkit's four
(nbdkit-plugin(3), "Threads"), from the most serialised to the least:

``serialize_connections``
    one connection at a time: a second client is accepted, and its requests
    wait until the first one has gone; that one's requests come one at a
    time.
``serialize_all_requests``
    many connections, but one request at a time in the whole stack,
    whichever connection it comes from (for code that is not thread-safe
    at all). ``serialize_all`` is an older name for it.
``serialize_requests``
    one request at a time per connection; requests of different
    connections may run at once (for state kept per connection, or a
    handle that takes one call at a time).
``parallel``
    requests may run at once, from one connection or several, and be
    answered in any order (the default: the code is thread-safe).

The server applies the most serialised model of the whole stack (nbdkit
takes the strictest of the plugin and all its filters); see
``Server`` in ``server/server.py`` for how.
"""

from __future__ import annotations

import errno

# Extent flags, the same bits as NBD's base:allocation context.
EXTENT_HOLE = 1
EXTENT_ZERO = 2

# The thread models (see the module docstring), most serialised first.
SERIALIZE_CONNECTIONS = "serialize_connections"
SERIALIZE_ALL_REQUESTS = "serialize_all_requests"
SERIALIZE_REQUESTS = "serialize_requests"
PARALLEL = "parallel"
THREAD_MODELS = (SERIALIZE_CONNECTIONS, SERIALIZE_ALL_REQUESTS, SERIALIZE_REQUESTS, PARALLEL)
_OLD_NAMES = {"serialize_all": SERIALIZE_ALL_REQUESTS}  # tests/plugins/memory_source.py


class SourceError(OSError):
    """An error with an errno (for the NBD reply) and a message (for the person)."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)

    def __str__(self) -> str:
        return self.strerror


class FastZeroUnsupported(SourceError):
    """zero(..., fast=True) cannot be done faster than writing zeroes."""

    def __init__(self) -> None:
        super().__init__(errno.ENOTSUP, "fast zero not supported")


class Source:
    """Base class. Subclasses set ``size`` and override what they support."""

    #: size of the export in bytes
    size: int = 0
    #: a short human description ("file win7.img", "xz disk.img.xz", ...)
    description: str = ""
    #: True when calls may block for long (network, decompression): the
    #: server then runs them in worker threads so other requests go on.
    blocking: bool = False
    #: preferred/minimum/maximum block sizes the source wants (NBD_INFO_BLOCK_SIZE)
    block_size: tuple[int, int, int] = (1, 4096, 32 * 1024 * 1024)

    can_write: bool = False
    can_flush: bool = False
    can_fua: bool = False
    can_trim: bool = False
    can_zero: bool = False
    can_fast_zero: bool = False
    can_extents: bool = False
    can_cache: bool = False
    #: several connections see one consistent disk (flush on one covers all)
    can_multi_conn: bool = True
    #: the disk is a spinning one (not passed to the export yet: the server
    #: never sets NBD_FLAG_ROTATIONAL)
    is_rotational: bool = False
    #: an asynchronous way in for the server's loop (``sources.nbd.NbdAio``:
    #: attach(loop, completed), pread(offset, length, done), ...), or None.
    #: A layer hides it unless it passes every call through unchanged, so a
    #: snapshot or error layer is never bypassed.
    aio = None
    #: said once to the person when the source is opened (e.g. "this raw image
    #: looks like a qcow2 inside"), or None
    warning: str | None = None
    #: this source's (or layer's) own thread model, one of THREAD_MODELS (see
    #: the module docstring); a layer declares its own, it is not its next's
    thread_model: str = PARALLEL
    #: what this one calls: the layer below, or None for a source
    next: Source | None = None

    def pread(self, offset: int, length: int) -> bytes:
        raise SourceError(errno.EIO, f"{type(self).__name__} cannot read")

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        raise SourceError(errno.EROFS, "source is read-only")

    def flush(self) -> None:
        pass

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        raise SourceError(errno.EOPNOTSUPP, "trim not supported")

    def zero(self, offset: int, length: int, may_trim: bool = False,
             fua: bool = False, fast: bool = False) -> None:
        """Write zeroes. With fast=True raise FastZeroUnsupported unless it is
        much faster than writing zeroes; the default writes them."""
        if fast:
            raise FastZeroUnsupported()
        chunk = 1 << 20
        zeroes = bytes(min(length, chunk))
        while length > 0:
            n = min(length, chunk)
            self.pwrite(offset, zeroes[:n], fua=False)
            offset += n
            length -= n
        if fua:
            self.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(offset, length, flags) covering at least [offset, offset+1).
        The default says: all data."""
        return [(offset, length, 0)]

    def cache(self, offset: int, length: int) -> None:
        """Prefetch, if the source has a cheap way to (posix_fadvise, its own
        block cache). CACHE is advisory; the default does nothing, since
        reading and discarding costs what the client's read would."""

    def view_for(self, offset: int, length: int):
        """A zero-copy buffer (memoryview) of [offset, offset+length), for
        replies sent straight from it; None when there is none."""
        return None

    def abort(self) -> None:
        """Stop waiting for anything outside (a stream's reader that never
        comes): called from another thread when diskwatch is interrupted or
        fails while starting, before close()."""

    def close(self) -> None:
        pass

    # Context manager so tests and the CLI release files and overlays.
    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Layer(Source):
    """Wraps the ``next`` source; every call and attribute of the Source
    interface passes through unless the subclass overrides it (nbdkit's
    filter model).

    Only the interface passes through. Anything else a particular source
    has (xz's cache counters, qemu's hostmap) is that source's: reach it
    through ``stack(top)``, not through the layers over it, so that a name
    a layer does not know is an AttributeError rather than a call that
    skips the layer."""

    def __init__(self, next: Source):
        self.next = next

    @property
    def inner(self) -> Source:
        """The older name of ``next``."""
        return self.next

    @inner.setter
    def inner(self, source: Source) -> None:
        self.next = source

    size = property(lambda self: self.next.size)  # type: ignore[assignment]
    description = property(lambda self: self.next.description)  # type: ignore[assignment]
    blocking = property(lambda self: self.next.blocking)  # type: ignore[assignment]
    block_size = property(lambda self: self.next.block_size)  # type: ignore[assignment]
    can_write = property(lambda self: self.next.can_write)  # type: ignore[assignment]
    can_flush = property(lambda self: self.next.can_flush)  # type: ignore[assignment]
    can_fua = property(lambda self: self.next.can_fua)  # type: ignore[assignment]
    can_trim = property(lambda self: self.next.can_trim)  # type: ignore[assignment]
    can_zero = property(lambda self: self.next.can_zero)  # type: ignore[assignment]
    can_fast_zero = property(lambda self: self.next.can_fast_zero)  # type: ignore[assignment]
    can_extents = property(lambda self: self.next.can_extents)  # type: ignore[assignment]
    can_cache = property(lambda self: self.next.can_cache)  # type: ignore[assignment]
    can_multi_conn = property(lambda self: self.next.can_multi_conn)  # type: ignore[assignment]
    is_rotational = property(lambda self: self.next.is_rotational)  # type: ignore[assignment]
    warning = property(lambda self: self.next.warning)  # type: ignore[assignment]

    def abort(self) -> None:
        self.next.abort()

    def pread(self, offset, length):
        return self.next.pread(offset, length)

    def pwrite(self, offset, data, fua=False):
        return self.next.pwrite(offset, data, fua)

    def flush(self):
        return self.next.flush()

    def trim(self, offset, length, fua=False):
        return self.next.trim(offset, length, fua)

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        return self.next.zero(offset, length, may_trim, fua, fast)

    def extents(self, offset, length):
        return self.next.extents(offset, length)

    def cache(self, offset, length):
        return self.next.cache(offset, length)

    def __init_subclass__(cls, **kwargs) -> None:
        # A layer that changes reads (its own pread) and says nothing of
        # views must not be bypassed by the next source's buffers: it gets
        # none, decided once here rather than on every read.
        super().__init_subclass__(**kwargs)
        if "pread" in cls.__dict__ and "view_for" not in cls.__dict__:
            cls.view_for = Source.view_for

    def view_for(self, offset, length):
        return self.next.view_for(offset, length)

    def close(self):
        self.next.close()


class ReadOnly(Layer):
    """-r: refuse every write with EPERM, advertise read-only."""

    can_write = False  # type: ignore[assignment]
    can_trim = False  # type: ignore[assignment]
    can_zero = False  # type: ignore[assignment]
    can_fast_zero = False  # type: ignore[assignment]
    can_fua = False  # type: ignore[assignment]
    # The server refuses writes to a read-only export before they reach a
    # source, so reads may take the next source's asynchronous way.
    aio = property(lambda self: self.next.aio)  # type: ignore[assignment]

    @property
    def description(self):  # type: ignore[override]
        return f"{self.next.description} (read-only)"

    def pwrite(self, offset, data, fua=False):
        raise SourceError(errno.EPERM, "export is read-only")

    def trim(self, offset, length, fua=False):
        raise SourceError(errno.EPERM, "export is read-only")

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        raise SourceError(errno.EPERM, "export is read-only")


def check_range(source: Source, offset: int, length: int) -> None:
    """Raise EINVAL for a range outside the source (helper for sources)."""
    if offset < 0 or length < 0 or offset + length > source.size:
        raise SourceError(errno.EINVAL, f"range {offset}+{length} outside 0..{source.size}")


def stack(top: Source) -> list[Source]:
    """The stack under ``top``: ``top``, each layer's ``next`` in turn, and
    the source last."""
    out = [top]
    while (top := top.next) is not None:
        out.append(top)
    return out


def thread_model(name: str) -> str:
    """A thread model's name as THREAD_MODELS spells it; ValueError if it
    is not one."""
    name = _OLD_NAMES.get(name, name)
    if name not in THREAD_MODELS:
        raise ValueError(f"thread model must be one of {', '.join(THREAD_MODELS)}, "
                         f"not {name!r}")
    return name


def stack_thread_model(top: Source) -> str:
    """The most serialised thread model of every layer and the source of
    the stack under ``top``: what the server applies (as nbdkit does)."""
    models = []
    for member in stack(top):
        try:
            models.append(THREAD_MODELS.index(thread_model(member.thread_model)))
        except ValueError as e:
            raise ValueError(f"{type(member).__name__}: {e}") from None
    return THREAD_MODELS[min(models)]
