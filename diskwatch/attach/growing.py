"""A qcow2 image file served as QEMU's qcow2 node's ``file`` child: it grows.

QEMU's qcow2 driver allocates clusters past the end of its file and simply
writes there (a file node grows). An NBD export has a size fixed at the
handshake, and QEMU's nbd client cannot grow a node (``Cannot grow NBD
nodes``), so a write past the size would be an error the guest sees.
``GrowingFile`` therefore offers a size with room to grow (``ceiling``):
reads past the file's end are zeros (what a file node reads there too),
writes there extend the file, as they would through QEMU's own file node.
The watchdog serves the same file with the same size (QEMU's client
expects the size it had when it reconnects).
"""

from __future__ import annotations

import os

from ..sources.file import FileSource

#: room to grow past what the guest's disk and its tables can take
SLACK = 256 * 1024 * 1024
ALIGN = 2 * 1024 * 1024


def ceiling(file_size: int, virtual_size: int, cluster_size: int) -> int:
    """The size to offer: the file, plus every guest cluster allocated anew,
    plus the L2 tables and refcount blocks that would need (one of each per
    cluster_size / 8 and / 2 clusters), plus slack; 2 MiB aligned."""
    clusters = -(-virtual_size // cluster_size)
    tables = (clusters // (cluster_size // 8) + 1 + clusters // (cluster_size // 2) + 1)
    size = file_size + virtual_size + tables * cluster_size + SLACK
    return -(-size // ALIGN) * ALIGN


class GrowingFile(FileSource):
    """``FileSource`` of a file that grows, offered as ``size`` bytes."""

    def __init__(self, path: str, size: int, readonly: bool = False):
        super().__init__(path, readonly=readonly)
        self.mapped = self.size  # the mmap covers the file as it was when opened
        self.size = max(size, self.size)
        self.description = f"file {path} (qcow2, served as its file)"
        self.can_extents = False  # past the end the file is a hole; not worth the calls

    def view_for(self, offset: int, length: int):
        if offset + length > self.mapped:
            return None
        return super().view_for(offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))  # past the file's end: zeros, as QEMU's file node
        return data

    def extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        return [(offset, length, 0)]


__all__ = ["GrowingFile", "ceiling"]
