"""The ext3/ext4 journal (jbd2), read as it is written: the filesystem as
it will be once its committed transactions are checkpointed.

ext4 writes a new file's inode, its directory entry and the bitmaps to the
journal first, and to their home blocks only at the next checkpoint,
seconds or minutes later (data=ordered writes the file's data home before
the commit). A walk of the home blocks alone does not see the file until
then: a guest's log created at boot stayed ``p /dev/sda1``. So the mapper
reads the journal the way recovery would (``fs/jbd2/recovery.c``,
``Documentation/filesystems/ext4/journal.rst``) and walks a **view** of the
volume in which each block logged by a committed transaction reads as its
newest logged copy (``JournalView``). Nothing is written: the view lives in
the mapper's process for one walk.

The log, in the journal's own blocks (``s_first`` to ``s_maxlen``, less the
fast-commit area, circular), from ``s_start`` with sequence ``s_sequence``::

    [descriptor: tags, one per logged block: home block, flags]
    [copy][copy]...                   the logged blocks, in tag order
    [revoke: home blocks whose older copies must not be replayed]
    [commit]                          the transaction is complete

A block of the log whose magic or sequence is not what comes next ends it,
as in recovery. A transaction without its commit block (being written
right now) is not used. A copy is used unless a revoke of its block in the
same or a later transaction cancels it. A copy whose first four bytes were
the magic is *escaped* (stored with them zeroed): the view puts the magic
back.

Bounds (a guest writes all of this): the scan reads at most the journal's
``s_maxlen`` blocks once each, and at most ``MAX_JOURNAL_BLOCKS`` of them;
tags and revokes are parsed within their block. Fast commits (ext4's
``fast_commit``: logical records, not blocks) are not read: said in the
result.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["JournalScan", "JournalView", "scan_journal"]

MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SUPERBLOCK_V1, SUPERBLOCK_V2, REVOKE = 1, 2, 3, 4, 5
FLAG_ESCAPE, FLAG_SAME_UUID, FLAG_DELETED, FLAG_LAST_TAG = 1, 2, 4, 8
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_ASYNC_COMMIT = 0x1, 0x2, 0x4
INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3, INCOMPAT_FAST_COMMIT = 0x8, 0x10, 0x20
#: journal blocks a scan reads, at most (a 1 GiB journal of 4 KiB blocks)
MAX_JOURNAL_BLOCKS = 1 << 18
#: the fast-commit area when the superblock gives none (the kernel's default)
DEFAULT_FC_BLOCKS = 256

_HEADER = struct.Struct(">III")


@dataclass
class Transaction:
    """One committed transaction: its sequence and what it logged."""

    sequence: int
    #: (home block, journal block of the copy, flags), in the log's order
    blocks: list[tuple[int, int, int]] = field(default_factory=list)
    revoked: list[int] = field(default_factory=list)
    #: journal blocks of the transaction's own descriptor, revoke and commit blocks
    control: list[int] = field(default_factory=list)


@dataclass
class JournalScan:
    """What the log holds now."""

    block_size: int = 0
    start: int = 0  # s_start: 0 when the journal is empty (clean)
    first_sequence: int = 0
    transactions: list[Transaction] = field(default_factory=list)
    #: home block -> (journal block of its newest committed copy, escaped)
    replay: dict[int, tuple[int, bool]] = field(default_factory=dict)
    #: why the scan stopped where it did, or what it could not read
    note: str = ""
    #: journal block -> its byte offset in the volume (set by the caller)
    offset_of: Callable[[int], int] | None = None

    def summary(self) -> str:
        if not self.transactions:
            return "journal: nothing committed past the last checkpoint" + (
                f" ({self.note})" if self.note else "")
        seqs = [t.sequence for t in self.transactions]
        return (f"journal: {len(seqs)} transactions ({seqs[0]}-{seqs[-1]}) read, "
                f"{len(self.replay)} blocks seen as logged" + (f"; {self.note}" if self.note else ""))


def scan_journal(read_block: Callable[[int], bytes], maxlen_hint: int) -> JournalScan:
    """Scan the log of one jbd2 journal. ``read_block(n)`` reads block
    ``n`` of the journal (its own numbering: block 0 is its superblock);
    ``maxlen_hint``: how many blocks the journal file has (the superblock
    may claim more; the smaller is believed)."""
    scan = JournalScan()
    sb = read_block(0)
    magic, btype, _ = _HEADER.unpack_from(sb, 0)
    if magic != MAGIC or btype not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
        scan.note = "no journal superblock"
        return scan
    block_size, maxlen, first, sequence, start = struct.unpack_from(">IIIII", sb, 12)
    incompat = struct.unpack_from(">I", sb, 0x28)[0] if btype == SUPERBLOCK_V2 else 0
    scan.block_size, scan.start, scan.first_sequence = block_size, start, sequence
    if block_size != len(sb) or not 1024 <= block_size <= 65536:
        scan.note = f"journal block size {block_size} is not the filesystem's"
        return scan
    last = min(maxlen, maxlen_hint)
    if incompat & INCOMPAT_FAST_COMMIT:
        fc = struct.unpack_from(">I", sb, 0x54)[0] or DEFAULT_FC_BLOCKS
        last = max(first, last - fc)
        scan.note = "fast commits are not read"
    if start == 0:
        return scan  # clean: everything logged is home already
    if not (1 <= first < last and first <= start < last):
        scan.note = f"journal superblock out of range (first {first}, start {start}, end {last})"
        return scan
    csum3 = bool(incompat & INCOMPAT_CSUM_V3)
    tail = 4 if incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) else 0
    if csum3:
        tag_size = 16
    else:
        tag_size = 8 + (2 if incompat & INCOMPAT_CSUM_V2 else 0) + (
            4 if incompat & INCOMPAT_64BIT else 0)
    wide_revoke = bool(incompat & INCOMPAT_64BIT)

    def wrap(n: int) -> int:
        return first + (n - first) % (last - first)

    budget = min(last - first, MAX_JOURNAL_BLOCKS)
    block = start
    expected = sequence
    pending = Transaction(expected)
    read = 0
    while read < budget:
        data = read_block(block)
        read += 1
        magic, btype, seq = _HEADER.unpack_from(data, 0)
        if magic != MAGIC or seq != expected:
            break
        if btype == DESCRIPTOR:
            pending.control.append(block)
            tags = _tags(data, tag_size, csum3, tail, bool(incompat & INCOMPAT_64BIT))
            if read + len(tags) > budget:
                scan.note = "the log is longer than the journal"
                break
            for home, flags in tags:
                block = wrap(block + 1)
                pending.blocks.append((home, block, flags))
            read += len(tags)
        elif btype == REVOKE:
            pending.control.append(block)
            pending.revoked += _revokes(data, wide_revoke, tail)
        elif btype == COMMIT:
            pending.control.append(block)
            scan.transactions.append(pending)
            expected = (expected + 1) & 0xFFFFFFFF
            pending = Transaction(expected)
        else:
            break  # a superblock or garbage where the log goes on: its end
        block = wrap(block + 1)
    else:
        scan.note = "the log went round the whole journal"
    scan.replay = _replay(scan.transactions)
    return scan


def _tags(data: bytes, tag_size: int, csum3: bool, tail: int, wide: bool) -> list[tuple[int, int]]:
    """(home block, flags) of each tag of a descriptor block."""
    tags = []
    pos = 12
    end = len(data) - tail
    while pos + tag_size <= end:
        if csum3:
            low, flags, high = struct.unpack_from(">III", data, pos)
        else:
            low, flags = struct.unpack_from(">I2xH", data, pos)
            high = struct.unpack_from(">I", data, pos + 8)[0] if wide else 0
        home = low | (high << 32 if wide else 0)
        pos += tag_size
        if not flags & FLAG_SAME_UUID:
            pos += 16
        if not flags & FLAG_DELETED:
            tags.append((home, flags))
        else:
            tags.append((-1, flags))  # a copy still follows, of nothing to replay
        if flags & FLAG_LAST_TAG:
            break
    return tags


def _revokes(data: bytes, wide: bool, tail: int) -> list[int]:
    (count,) = struct.unpack_from(">I", data, 12)
    end = min(count, len(data) - tail)
    size = 8 if wide else 4
    fmt = ">Q" if wide else ">I"
    return [struct.unpack_from(fmt, data, pos)[0] for pos in range(16, end - size + 1, size)]


def _replay(transactions: list[Transaction]) -> dict[int, tuple[int, bool]]:
    """Home block -> its newest copy that no revoke cancels (recovery's rule:
    a copy in transaction S is replayed unless its block is revoked in a
    transaction >= S)."""
    revoked: dict[int, int] = {}  # block -> the last sequence that revoked it
    for k, t in enumerate(transactions):
        for b in t.revoked:
            revoked[b] = k
    replay: dict[int, tuple[int, bool]] = {}
    for k, t in enumerate(transactions):
        for home, jblock, flags in t.blocks:
            if home < 0 or revoked.get(home, -1) >= k:
                continue
            replay[home] = (jblock, bool(flags & FLAG_ESCAPE))
    return replay


class JournalView:
    """A volume as its walk sees it: blocks logged by committed transactions
    read as their newest copy. ``inner``: the volume (a Source);
    ``copies``: home block -> (byte offset of the copy in ``inner``, escaped)."""

    def __init__(self, inner, block_size: int, copies: dict[int, tuple[int, bool]]):
        self.inner = inner
        self.size = inner.size
        self.description = getattr(inner, "description", "")
        self.block_size = block_size
        self._homes = sorted(copies)
        self._copies = copies

    def pread(self, offset: int, length: int) -> bytes:
        data = self.inner.pread(offset, length)
        bs = self.block_size
        homes = self._homes
        i = bisect_left(homes, offset // bs)
        if i == len(homes) or homes[i] * bs >= offset + length:
            return data  # the common case: nothing logged in the range
        out = bytearray(data)
        while i < len(homes) and homes[i] * bs < offset + length:
            home = homes[i]
            at, escaped = self._copies[home]
            copy = bytearray(self.inner.pread(at, bs))
            if escaped:
                copy[0:4] = MAGIC.to_bytes(4, "big")
            lo = max(home * bs, offset)
            hi = min(home * bs + bs, offset + length)
            out[lo - offset:hi - offset] = copy[lo - home * bs:hi - home * bs]
            i += 1
        return bytes(out)
