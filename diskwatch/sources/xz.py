"""XzSource: serve the uncompressed content of an .xz file, read-only.

An xz file is one or more streams, each a list of independently compressed
blocks followed by an index that records every block's compressed and
uncompressed size. Random access is therefore possible at block granularity:
to read a byte we find its block through the index, decompress that whole
block and keep it in an LRU cache (nbdkit's xz filter does the same, with
``xz-max-block`` and ``xz-max-depth``).

python-xz (``import xz``) is used for the container format: its ``xz.common``
helpers parse the stream header/footer/index and rebuild a one-block stream
around a block so that ``lzma`` can decompress (and verify) it on its own.
We do not read through ``xz.XZFile`` itself: it keeps one shared file
position and one running decompressor per block (its
``RollingBlockReadStrategy`` keeps up to 8 decompressors alive, but caches no
decompressed data), which is neither thread-safe nor cheap for random reads
that go backwards within a block. Here every block is read with ``os.pread``
and decompressed in one ``lzma`` call, which releases the GIL, so parallel
requests for different blocks decompress in parallel; parallel requests for
the same block wait for one decompression.

Sequential reads (nbdcopy, a guest copying a file) keep every request in
flight inside one or two blocks when blocks are large: a 16 MiB block is 64
of nbdcopy's 256 KiB requests, so all the server's worker threads wait for
the same decompression and the other cores idle. So when a read is in the
first block or follows on from the previous one, the blocks after it are
decompressed in the background by a small pool, as long as fewer than
``readahead`` (one per CPU) decompressions are in progress: while the client
waits for block i, block i+1 is being made on the other core. nbdkit's xz
filter serializes requests and decompresses one block at a time; python's
``lzma`` releases the GIL while it decompresses (measured: calling liblzma's
one-shot decoder through ctypes instead was no faster end to end).
"""

from __future__ import annotations

import bisect
import errno
import logging
import lzma
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from xz.common import (
    XZError,
    create_xz_header,
    create_xz_index_footer,
    parse_xz_footer,
    parse_xz_header,
    parse_xz_index,
    round_up,
)

from ..units import MiB, format_bytes
from .base import Source, SourceError, check_range

log = logging.getLogger(__name__)


RECOMPRESS_HINT = "xz --block-size=16MiB"


@dataclass(frozen=True, slots=True)
class XzBlock:
    """One xz block: where its bytes are in the file and in the image."""

    offset: int  # uncompressed offset in the image
    size: int  # uncompressed size
    file_offset: int  # offset of the block (its header) in the .xz file
    unpadded_size: int  # block header + compressed data + check, as in the index
    check: int  # the stream's check type (needed to rebuild a stream around it)


def _human(n: int) -> str:
    """1536 -> '1.5 KiB', 16777216 -> '16 MiB'; 512 -> '512 bytes' (in a sentence)."""
    return f"{n} bytes" if n < 1024 else format_bytes(n)


def parse_xz_blocks(fd: int, file_size: int) -> list[XzBlock]:
    """Walk the streams of an xz file backwards from its end (the index of
    each stream is just before its footer) and list its blocks in order."""
    streams: list[list[tuple[int, int, int, int]]] = []  # per stream: (file_off, unpadded, size, check)
    end = file_size
    while end > 0:
        if end % 4:
            raise XZError("file size is not a multiple of 4")
        if end < 12:
            raise XZError("truncated stream")
        if os.pread(fd, 4, end - 4) == b"\0\0\0\0":  # stream padding
            end -= 4
            continue
        check, backward_size = parse_xz_footer(os.pread(fd, 12, end - 12))
        index_start = end - 12 - backward_size
        if index_start < 12:
            raise XZError("index points before the start of the file")
        records = parse_xz_index(os.pread(fd, backward_size, index_start))
        blocks_len = sum(round_up(unpadded) for unpadded, _ in records)
        stream_start = index_start - blocks_len - 12
        if stream_start < 0:
            raise XZError("blocks extend before the start of the file")
        if parse_xz_header(os.pread(fd, 12, stream_start)) != check:
            raise XZError("stream header and footer disagree on the check type")
        pos = stream_start + 12
        stream = []
        for unpadded, usize in records:
            stream.append((pos, unpadded, usize, check))
            pos += round_up(unpadded)
        streams.append(stream)
        end = stream_start
    blocks = []
    offset = 0
    for stream in reversed(streams):
        for file_offset, unpadded, usize, check in stream:
            blocks.append(XzBlock(offset, usize, file_offset, unpadded, check))
            offset += usize
    return blocks


class XzSource(Source):
    """Read-only source: the uncompressed content of an .xz file.

    ``max_block``: refuse files with a block larger than this (each cached
    block costs its uncompressed size in memory). ``cache_blocks``: how many
    decompressed blocks the LRU cache keeps (shared by all connections).
    ``readahead``: for sequential reads, up to this many blocks decompress
    at once, the read's own block and the ones after it (None: one per CPU,
    at most 4; 0: no read-ahead; never more than half the cache, so blocks
    read ahead cannot evict the one being read).

    Memory: at most ``cache_blocks`` decompressed blocks in the cache, plus
    one per decompression in progress (at most one per worker thread of the
    server and ``readahead`` read ahead), each at most ``max_block``: what
    clients ask for changes which blocks, never how many.
    """

    blocking = True  # decompressing a block takes from milliseconds to minutes
    can_cache = True
    can_multi_conn = True

    def __init__(self, path: str | os.PathLike, *, max_block: int = 512 * MiB,
                 cache_blocks: int = 8, readahead: int | None = None):
        if cache_blocks < 1:
            raise SourceError(errno.EINVAL, f"--xz-cache must be at least 1 (got {cache_blocks})")
        if readahead is not None and readahead < 0:
            raise SourceError(errno.EINVAL,
                              f"--xz-readahead must be 0 or more (got {readahead})")
        if readahead is None:
            readahead = min(4, len(os.sched_getaffinity(0)))
        self.readahead = min(readahead, cache_blocks // 2)
        self.path = os.fspath(path)
        self.max_block = max_block
        self.cache_blocks = cache_blocks
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(e.errno or errno.EIO, f"cannot open {self.path}: {e.strerror}") from e
        try:
            file_size = os.fstat(self._fd).st_size
            try:
                self.blocks = parse_xz_blocks(self._fd, file_size)
            except XZError as e:
                raise SourceError(errno.EINVAL, f"{self.path} is not a valid xz file ({e}); "
                                  "check it with 'xz --list'") from e
            self._starts = [b.offset for b in self.blocks]
            self.size = sum(b.size for b in self.blocks)
            self.largest_block = max((b.size for b in self.blocks), default=0)
            if self.largest_block > max_block:
                raise SourceError(
                    errno.EFBIG,
                    f"{self.path} has an xz block of {_human(self.largest_block)}, more than "
                    f"--xz-max-block {_human(max_block)}: raise --xz-max-block or recompress "
                    f"with '{RECOMPRESS_HINT}'")
        except BaseException:
            os.close(self._fd)
            raise
        self.description = f"xz {self.path}"
        #: said once, by whoever shows the source to the person (CLI, UI)
        self.warning: str | None = None
        if len(self.blocks) == 1 and self.size > 16 * MiB:
            self.warning = (
                f"{self.path} is one xz block of {_human(self.size)}: the first read "
                f"decompresses all of it and it stays in memory; for fast random access "
                f"recompress with '{RECOMPRESS_HINT}'")
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, threading.Event] = {}
        self._readahead_pool: ThreadPoolExecutor | None = None
        self._closed = False
        # counters, read by tests and the stats sink
        self.hits = 0
        self.misses = 0  # blocks decompressed because a read waited for them
        self.readaheads = 0  # blocks decompressed ahead of the reads
        self.evictions = 0

    # -- block cache -----------------------------------------------------

    def _decompress(self, block: XzBlock) -> bytes:
        compressed = os.pread(self._fd, round_up(block.unpadded_size), block.file_offset)
        # A one-block stream around it, so lzma checks the block's integrity
        # check and its sizes against the index.
        stream = b"".join((create_xz_header(block.check), compressed,
                           create_xz_index_footer(block.check,
                                                  [(block.unpadded_size, block.size)])))
        try:
            data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(stream)
        except lzma.LZMAError as e:
            raise SourceError(errno.EIO, f"{self.path}: xz block at file offset "
                              f"{block.file_offset} is corrupt ({e})") from e
        if len(data) != block.size:
            raise SourceError(errno.EIO, f"{self.path}: xz block at file offset "
                              f"{block.file_offset} gave {len(data)} bytes, index says {block.size}")
        return data

    def _block_data(self, index: int) -> bytes:
        while True:
            with self._lock:
                data = self._cache.get(index)
                if data is not None:
                    self._cache.move_to_end(index)
                    self.hits += 1
                    return data
                event = self._loading.get(index)
                if event is None:
                    event = self._loading[index] = threading.Event()
                    self.misses += 1
                    break
            # Another thread is decompressing this block: wait for it, then
            # look again (it may have failed, or already been evicted).
            event.wait()
        return self._load(index, event)

    def _load(self, index: int, event: threading.Event) -> bytes:
        """Decompress block ``index``, registered as loading with ``event``
        by the caller, into the cache; wake whoever waits for it."""
        data = None
        try:
            data = self._decompress(self.blocks[index])
        finally:
            with self._lock:
                # Cached in the same locked step that ends the loading, so a
                # waiter always finds the block (no second decompression).
                if data is not None and not self._closed:
                    self._cache[index] = data
                    self._cache.move_to_end(index)
                    while len(self._cache) > self.cache_blocks:
                        self._cache.popitem(last=False)
                        self.evictions += 1
                del self._loading[index]
            event.set()
        return data

    def _read_ahead(self, index: int) -> None:
        """A read touches block ``index``: if it is the first block or follows
        on from the block before (cached or loading), start decompressing
        the blocks after it, as long as fewer than ``readahead``
        decompressions (this read's own included) are in progress: more
        than there are cores would only slow down the block a client
        waits for."""
        if not self.readahead:
            return
        with self._lock:
            cache, loading = self._cache, self._loading
            if self._closed or (index > 0 and index - 1 not in cache
                                and index - 1 not in loading):
                return
            busy = len(loading) + (index not in cache and index not in loading)
            wanted = []
            for i in range(index + 1, min(index + 1 + self.readahead, len(self.blocks))):
                if busy >= self.readahead:
                    break
                if i not in cache and i not in loading:
                    loading[i] = threading.Event()
                    self.readaheads += 1
                    busy += 1
                    wanted.append(i)
            if not wanted:
                return
            if self._readahead_pool is None:
                self._readahead_pool = ThreadPoolExecutor(
                    self.readahead, thread_name_prefix="diskwatch-xz")
            for i in wanted:
                self._readahead_pool.submit(self._load_ahead, i, loading[i])

    def _load_ahead(self, index: int, event: threading.Event) -> None:
        if self._closed:  # closing: give the block up quickly
            with self._lock:
                del self._loading[index]
            event.set()
            return
        try:
            self._load(index, event)
        except Exception as e:  # noqa: BLE001
            # Nothing is cached: the read that needs this block decompresses
            # it again and gets the error itself.
            log.debug("xz read-ahead of block %d failed: %s", index, e)

    @property
    def cached_blocks(self) -> list[int]:
        """Indexes of the blocks in the cache, least recently used first."""
        with self._lock:
            return list(self._cache)

    # -- Source calls ------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length)
        if length == 0:
            return b""
        i = bisect.bisect_right(self._starts, offset) - 1
        block = self.blocks[i]
        rel = offset - block.offset
        if rel + length <= block.size:  # the common case: one block
            self._read_ahead(i)
            data = self._block_data(i)
            if rel == 0 and length == block.size:
                return data
            return data[rel:rel + length]
        parts = []
        end = offset + length
        while offset < end:
            self._read_ahead(i)
            block = self.blocks[i]
            rel = offset - block.offset
            n = min(end - offset, block.size - rel)
            parts.append(self._block_data(i)[rel:rel + n])
            offset += n
            i += 1
        return b"".join(parts)

    def view_for(self, offset: int, length: int) -> bytes | None:
        """A read inside one cached block, answered on the server's loop
        without a worker thread (most of a sequential reader's requests);
        None for the rest. A copy, not a view: a view would keep the whole
        block alive while its reply waits, outside the cache's bound."""
        if length == 0 or offset < 0 or offset + length > self.size:
            return None
        i = bisect.bisect_right(self._starts, offset) - 1
        block = self.blocks[i]
        rel = offset - block.offset
        if rel + length > block.size:
            return None
        with self._lock:
            data = self._cache.get(i)
            if data is None:
                return None
            self._cache.move_to_end(i)
            self.hits += 1
        self._read_ahead(i)
        return data[rel:rel + length]

    def cache(self, offset: int, length: int) -> None:
        check_range(self, offset, length)
        if length == 0:
            return
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + length
        while i < len(self.blocks) and self.blocks[i].offset < end:
            self._block_data(i)
            i += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._readahead_pool = self._readahead_pool, None
        if pool is not None:
            # before the fd goes: a read-ahead must not pread a reused fd
            pool.shutdown(wait=True)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        with self._lock:
            self._cache.clear()
