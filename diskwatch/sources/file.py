"""A raw image file (or block device) as a source."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat

from .base import EXTENT_HOLE, EXTENT_ZERO, FastZeroUnsupported, Source, SourceError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileSource(Source):
    """Serve a file: pread/pwrite, flush with fdatasync, trim and zero with
    fallocate where the filesystem allows, extents from SEEK_DATA/SEEK_HOLE."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.readonly = readonly
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(errno.ENOENT, f"{path}: no such file") from None
        except IsADirectoryError:
            raise SourceError(errno.EISDIR, f"{path}: is a directory, not a disk image") from None
        except PermissionError:
            how = "read" if readonly else "read and write (try -r for read-only)"
            raise SourceError(errno.EACCES, f"{path}: permission denied to {how}") from None
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (stat.S_ISREG(st.st_mode) or self.is_block):
            os.close(self.fd)
            raise SourceError(errno.EINVAL, f"{path}: not a regular file or block device")
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block else st.st_size
        self.description = f"file {path}"
        self.can_write = not readonly
        self.can_flush = True
        self.can_fua = not readonly
        self.can_cache = True
        self.can_extents = self._probe_seek_data()
        self.can_trim = self.can_zero = not readonly
        # Fast zero only when fallocate can do it; probed lazily, per file.
        self._fallocate_ok: dict[int, bool] = {}
        self.can_fast_zero = not readonly and not self.is_block
        self._map, self._view = self._mmap()

    def _mmap(self):
        """Map the image so replies are sent straight from the page cache
        (one copy, into the socket). Bytes are only ever handed to sendmsg,
        never touched in Python: if the file shrinks under us the kernel
        reports EFAULT for that send instead of a SIGBUS for the process."""
        if self.size == 0:
            return None, None
        try:
            m = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return None, None
        return m, memoryview(m)

    def view_for(self, offset: int, length: int):
        view = self._view
        return None if view is None else view[offset:offset + length]

    def _probe_seek_data(self) -> bool:
        if self.is_block or self.size == 0:
            return False
        try:
            os.lseek(self.fd, 0, os.SEEK_DATA)
            return True
        except OSError as e:
            # ENXIO: no data at all from 0 (an entirely sparse file): supported.
            return e.errno == errno.ENXIO

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise SourceError(errno.EIO, f"{self.path}: short read at {offset} (file truncated?)")
        return data

    def pwrite(self, offset: int, data, fua: bool = False) -> None:
        if self.readonly:
            raise SourceError(errno.EPERM, "export is read-only")
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        if fua:
            os.fdatasync(self.fd)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        if self._fallocate_ok.get(mode) is False or self.is_block:
            return False
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._fallocate_ok[mode] = False
                return False
            raise
        self._fallocate_ok[mode] = True
        return True

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.readonly:
            raise SourceError(errno.EPERM, "export is read-only")
        # Trim is advisory: when the filesystem cannot punch holes, do nothing.
        self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if fua:
            os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, may_trim: bool = False,
             fua: bool = False, fast: bool = False) -> None:
        if self.readonly:
            raise SourceError(errno.EPERM, "export is read-only")
        done = False
        if may_trim:
            done = self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if not done:
            done = self._try_fallocate(FALLOC_FL_ZERO_RANGE, offset, length)
        if not done:
            if fast:
                raise FastZeroUnsupported()
            super().zero(offset, length)
        if fua:
            os.fdatasync(self.fd)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        if not self.can_extents:
            return [(offset, length, 0)]
        end = offset + length
        out: list[tuple[int, int, int]] = []
        pos = offset
        fd = self.fd
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = self.size  # only a hole from here on
            if data > pos:
                n = min(data, end) - pos
                out.append((pos, n, EXTENT_HOLE | EXTENT_ZERO))
                pos += n
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            n = min(hole, end) - pos
            out.append((pos, n, 0))
            pos += n
        return out

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._view.release()
                self._map.close()
            except BufferError:
                pass  # a reply still holds a slice; the map goes with it
            self._map = self._view = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
