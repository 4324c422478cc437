"""Files diskwatch writes (block maps, --log traces, --record files), never
through a symbolic link someone else planted.

A trace in a shared directory such as /tmp is the classic trap: another user
makes ``/tmp/trace.log`` a link to the victim's ``~/.bashrc`` and waits.
Two ways to write, both refusing a symbolic link with a one-line error:

``open_output(path)``
    For files written as they grow (a trace someone may ``tail -f``): opened
    with ``O_NOFOLLOW`` (the link itself is refused, atomically: no window
    between a check and the open), and without ``O_TRUNC`` until it is known
    to be a regular file; a FIFO or a device the person named is written as
    it is. A new file gets the usual mode (0666 less the umask).

``replace_atomically(path)``
    For files that must never be seen half-written (a block map: a map under
    its real name is taken as complete). Written to a new file made with
    ``O_EXCL`` in the same directory (mkstemp: nothing planted can be in the
    way), synced, then renamed over ``path``. A rename replaces a link, never
    writes through it; a ``path`` that is a link is refused all the same, so
    the person learns where their map did not go.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import IO

from .errors import DiskwatchError

__all__ = ["OutputFileError", "check_output_path", "open_output", "refuse_symlink", "replace_atomically"]


class OutputFileError(DiskwatchError):
    """A file diskwatch was asked to write cannot be written safely."""


def _refuse_link(path: str) -> OutputFileError:
    return OutputFileError(f"refusing to write {path}: it is a symbolic link "
                           "(give the file's real path, or remove the link)")


def refuse_symlink(path: str | os.PathLike[str]) -> None:
    """Raise ``OutputFileError`` if ``path`` is a symbolic link (a check made
    early, before long work whose result would go there)."""
    if os.path.islink(path):
        raise _refuse_link(os.fspath(path))


def check_output_path(path: str | os.PathLike[str]) -> None:
    """Raise ``OutputFileError`` now, with the name the person gave, if a
    file cannot be written at ``path``: a symbolic link, a directory, a
    directory that does not exist (not a temporary name's ENOENT later)."""
    path = os.fspath(path)
    refuse_symlink(path)
    if os.path.isdir(path):
        raise OutputFileError(f"cannot write {path}: it is a directory (give a file name)")
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise OutputFileError(f"cannot write {path}: there is no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputFileError(f"cannot write {path}: no permission to create files "
                              f"in {directory}")


def _umask() -> int:
    # os.umask() can only be read by setting it, which races with threads
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def open_output(path: str | os.PathLike[str], *, binary: bool = False, append: bool = False,
                buffering: int = 1 << 16) -> IO:
    """Open ``path`` for writing from its start (or at its end: ``append``),
    refusing a symbolic link."""
    path = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if append:
        flags |= os.O_APPEND
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse_link(path) from None
        if e.errno in (errno.ENOENT, errno.EISDIR, errno.EACCES):
            check_output_path(path)  # says why with the path given
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and not append:
            os.ftruncate(fd, 0)
        # O_NONBLOCK only kept a FIFO without a reader from blocking the open
        os.set_blocking(fd, True)
        mode = "a" if append else "w"
        if binary:
            return open(fd, mode + "b", buffering=buffering)
        return open(fd, mode, buffering=buffering, encoding="utf-8", errors="surrogateescape")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def replace_atomically(path: str | os.PathLike[str]) -> Iterator[io.BufferedWriter]:
    """``with replace_atomically(p) as f:`` write f; on success ``p`` is the new
    file, all at once; on failure ``p`` is untouched and nothing is left."""
    path = os.fspath(path)
    check_output_path(path)
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a map is an ordinary file
        with open(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
