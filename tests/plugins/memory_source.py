"""A source from outside diskwatch, in one small file: a RAM disk (nbdkit's
memory plugin). Served with

    PYTHONPATH=tests/plugins diskwatch --plugin memory_source:MemorySource memory:64M

Writes live in 64 KiB pages allocated on first write; unwritten bytes read
as --memory-fill. It declares serialize_all, so diskwatch calls it one call
at a time and it needs no lock of its own.
"""

from __future__ import annotations

import errno

from diskwatch.sources import Option, Source, SourceError, parse_size
from diskwatch.sources.base import EXTENT_HOLE, EXTENT_ZERO, check_range

PAGE = 64 * 1024


def _byte(text: str) -> int:
    value = int(text, 0)
    if not 0 <= value <= 255:
        raise ValueError("a byte is 0 to 255")
    return value


class MemorySource(Source):
    """a RAM disk of SIZE bytes: memory:SIZE"""

    plugin_name = "memory"
    schemes = ("memory:",)
    options = (Option("--memory-fill", "value of bytes never written (default 0)",
                      type=_byte, default=0, metavar="BYTE"),)
    thread_model = "serialize_all"

    def __init__(self, spec: str, options):
        try:
            self.size = parse_size(spec.partition(":")[2])
        except ValueError as e:
            raise SourceError(errno.EINVAL, f"{spec}: {e}") from None
        self.fill = options.get("memory_fill") or 0
        self.pages: dict[int, bytearray] = {}
        self.description = f"memory disk of {self.size} bytes"
        self.can_write = self.can_flush = self.can_zero = self.can_trim = True
        self.can_extents = True

    def pread(self, offset, length):
        check_range(self, offset, length)
        out = bytearray()
        while length:
            page, at = divmod(offset, PAGE)
            n = min(length, PAGE - at)
            data = self.pages.get(page)
            out += data[at:at + n] if data is not None else bytes([self.fill]) * n
            offset += n
            length -= n
        return bytes(out)

    def pwrite(self, offset, data, fua=False):
        check_range(self, offset, len(data))
        view = memoryview(data)
        while view:
            page, at = divmod(offset, PAGE)
            n = min(len(view), PAGE - at)
            buf = self.pages.setdefault(page, bytearray([self.fill]) * PAGE)
            buf[at:at + n] = view[:n]
            view = view[n:]
            offset += n

    def trim(self, offset, length, fua=False):
        self.zero(offset, length)

    def zero(self, offset, length, may_trim=False, fua=False, fast=False):
        self.pwrite(offset, bytes(length))

    def extents(self, offset, length):
        out = []
        end = min(offset + length, self.size)
        while offset < end:
            page = offset // PAGE
            n = min(end, (page + 1) * PAGE) - offset
            flags = 0 if page in self.pages or self.fill else EXTENT_HOLE | EXTENT_ZERO
            out.append((offset, n, flags))
            offset += n
        return out
