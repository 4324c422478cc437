"""--snapshot: writes go to a temporary sparse overlay, never to the image.

Like qemu's -snapshot. The overlay is a sparse temporary file of the image's
size, unlinked as soon as it is created (so it disappears at exit whatever
happens) plus a map of which clusters it holds. Reads take overlay clusters
from the overlay and the rest from the image below.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading

from .base import EXTENT_HOLE, EXTENT_ZERO, Layer, Source, SourceError

CLUSTER = 64 * 1024  # qcow2's default cluster: a 1 TiB disk needs a 16 MiB map


class Snapshot(Layer):
    def __init__(self, inner: Source, tmpdir: str | None = None):
        super().__init__(inner)
        fd, path = tempfile.mkstemp(prefix="diskwatch-snapshot-", dir=tmpdir)
        os.unlink(path)  # gone at exit, even after a crash
        self.overlay_fd = fd
        os.ftruncate(fd, inner.size)
        self.nclusters = (inner.size + CLUSTER - 1) // CLUSTER
        self.dirty = bytearray(self.nclusters)
        # Writes may come from several worker threads (over a blocking
        # source): two copy-ups of one cluster must not undo each other.
        self._lock = threading.Lock()

    # A snapshot accepts writes whatever the source below can do.
    can_write = True  # type: ignore[assignment]
    can_flush = True  # type: ignore[assignment]
    can_fua = True  # type: ignore[assignment]
    can_trim = True  # type: ignore[assignment]
    can_zero = True  # type: ignore[assignment]
    can_fast_zero = False  # type: ignore[assignment]
    can_extents = True  # type: ignore[assignment]
    can_multi_conn = True  # type: ignore[assignment]
    blocking = property(lambda self: self.next.blocking)  # type: ignore[assignment]

    @property
    def description(self):  # type: ignore[override]
        return f"{self.next.description} (snapshot: writes are discarded at exit)"

    def _runs(self, offset: int, length: int):
        """(start, end, dirty) runs of clusters covering the range."""
        end = offset + length
        c = offset // CLUSTER
        last = (end - 1) // CLUSTER
        pos = offset
        while pos < end:
            d = self.dirty[c]
            # Extend while the same kind; bytearray.find keeps this in C.
            nxt = self.dirty.find(0 if d else 1, c + 1, last + 1)
            c2 = last + 1 if nxt < 0 else nxt
            run_end = min(c2 * CLUSTER, end)
            yield pos, run_end, bool(d)
            pos = run_end
            c = c2

    def view_for(self, offset: int, length: int):
        first = offset // CLUSTER
        if self.dirty.find(1, first, (offset + length - 1) // CLUSTER + 1) < 0:
            return self.next.view_for(offset, length)
        return None

    def pread(self, offset: int, length: int) -> bytes:
        first = offset // CLUSTER
        if self.dirty.find(1, first, (offset + length - 1) // CLUSTER + 1) < 0:
            return self.next.pread(offset, length)
        parts = []
        for s, e, d in self._runs(offset, length):
            if d:
                parts.append(os.pread(self.overlay_fd, e - s, s))
            else:
                parts.append(self.next.pread(s, e - s))
        return b"".join(parts)

    def _ensure(self, offset: int, length: int) -> None:
        """Copy up the partly written clusters at the edges of a write."""
        for c in {offset // CLUSTER, (offset + length - 1) // CLUSTER}:
            if not self.dirty[c]:
                s = c * CLUSTER
                e = min(s + CLUSTER, self.next.size)
                if offset > s or offset + length < e:
                    os.pwrite(self.overlay_fd, self.next.pread(s, e - s), s)
                self.dirty[c] = 1

    def pwrite(self, offset: int, data, fua: bool = False) -> None:
        length = len(data)
        if offset + length > self.next.size:
            raise SourceError(errno.ENOSPC, "write past the end of the disk")
        with self._lock:
            self._write(offset, data)

    def _write(self, offset: int, data) -> None:
        length = len(data)
        self._ensure(offset, length)
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(self.overlay_fd, view, pos)
            view = view[n:]
            pos += n
        first, last = offset // CLUSTER, (offset + length - 1) // CLUSTER
        self.dirty[first:last + 1] = b"\x01" * (last - first + 1)

    def flush(self) -> None:
        pass  # the overlay is thrown away: nothing to make durable

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.zero(offset, length, may_trim=True)

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        """Whole clusters become holes in the overlay (a guest discarding its
        whole disk must not write gigabytes of zeroes to /tmp); the partial
        clusters at the edges get zeroes written. With NO_HOLE (``may_trim``
        false) the clusters stay allocated: zeroed with FALLOC_FL_ZERO_RANGE
        where the filesystem can, written with zeroes where it cannot."""
        from .file import (
            FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_PUNCH_HOLE,
            FALLOC_FL_ZERO_RANGE,
            fallocate,
        )
        end = offset + length
        if end > self.next.size:
            raise SourceError(errno.ENOSPC, "zero past the end of the disk")
        first_full = -(-offset // CLUSTER)
        last_full = end // CLUSTER if end < self.next.size else self.nclusters
        with self._lock:
            if first_full >= last_full:
                self._write_zeroes(offset, end)
                return
            hole_start = first_full * CLUSTER
            hole_end = min(last_full * CLUSTER, self.next.size)
            self._write_zeroes(offset, hole_start)
            mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_trim
                    else FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
            try:
                fallocate(self.overlay_fd, mode, hole_start, hole_end - hole_start)
                self.dirty[first_full:last_full] = b"\x01" * (last_full - first_full)
            except OSError:
                self._write_zeroes(hole_start, hole_end)  # no fallocate here
            self._write_zeroes(hole_end, end)

    def _write_zeroes(self, start: int, end: int) -> None:
        chunk = 1 << 20
        zeroes = bytes(min(chunk, max(end - start, 0)))
        while start < end:
            n = min(chunk, end - start)
            self._write(start, zeroes[:n])
            start += n

    def extents(self, offset: int, length: int):
        out = []
        for s, e, d in self._runs(offset, length):
            if d:
                out.append((s, e - s, 0))
            elif self.next.can_extents:
                out.extend(self.next.extents(s, e - s))
            else:
                out.append((s, e - s, 0))
        return out

    def close(self) -> None:
        if self.overlay_fd >= 0:
            os.close(self.overlay_fd)
            self.overlay_fd = -1
        self.next.close()


__all__ = ["Snapshot", "EXTENT_HOLE", "EXTENT_ZERO"]
