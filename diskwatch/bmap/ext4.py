"""ext2/3/4 layout: superblock and group descriptors, where the per-group
structures lie (The Sleuth Kit does not expose the group descriptors).
Used by the metadata walk (``tsk.py``), the journal scan and the
incremental updates (``incremental.py``).
"""

from __future__ import annotations

import struct

from ..sources.base import Source
from .volumes import read_at


class Ext4Layout:
    """Superblock and group descriptors: where the per-group structures lie."""

    def __init__(self, vol: Source):
        sb = read_at(vol, 1024, 1024)
        if len(sb) < 1024 or sb[56:58] != b"\x53\xef":
            raise ValueError("no ext2/3/4 superblock")
        (self.inodes_count, blocks_lo, _, _, _, self.first_data_block, log_bs, _,
         self.blocks_per_group, _, self.inodes_per_group) = struct.unpack_from("<11I", sb, 0)
        self.block = 1024 << log_bs
        (self.inode_size,) = struct.unpack_from("<H", sb, 88)
        self.compat, self.incompat, self.ro_compat = struct.unpack_from("<III", sb, 92)
        (self.reserved_gdt,) = struct.unpack_from("<H", sb, 206)
        (desc_size,) = struct.unpack_from("<H", sb, 254)
        (self.first_meta_bg,) = struct.unpack_from("<I", sb, 260)
        (blocks_hi,) = struct.unpack_from("<I", sb, 336)
        self.backup_bgs = struct.unpack_from("<II", sb, 0x24C)
        self.is64 = bool(self.incompat & 0x80)
        self.desc_size = desc_size if self.is64 and desc_size >= 64 else 32
        self.blocks = blocks_lo | (blocks_hi << 32 if self.is64 else 0)
        if self.inode_size == 0 or self.blocks_per_group == 0 or self.inodes_per_group == 0:
            raise ValueError("ext superblock with zero sizes")
        self.groups = -(-(self.blocks - self.first_data_block) // self.blocks_per_group)
        self.vol = vol
        self._descs: bytes | None = None

    def has_super(self, g: int) -> bool:
        if g == 0:
            return True
        if self.compat & 0x200:  # sparse_super2
            return g in self.backup_bgs
        if not self.ro_compat & 0x1:  # no sparse_super: every group
            return True
        for base in (3, 5, 7):
            n = base
            while n < g:
                n *= base
            if n == g:
                return True
        return g == 1

    def group_start(self, g: int) -> int:
        return self.first_data_block + g * self.blocks_per_group

    def desc_blocks(self) -> list[int]:
        """Block numbers of the primary group descriptor table, in order."""
        per_block = self.block // self.desc_size
        count = -(-self.groups // per_block)
        if not self.incompat & 0x10:  # no meta_bg
            return [self.first_data_block + 1 + i for i in range(count)]
        out = [self.first_data_block + 1 + i for i in range(min(count, self.first_meta_bg))]
        for m in range(self.first_meta_bg, count):
            g = m * per_block
            out.append(self.group_start(g) + (1 if self.has_super(g) else 0))
        return out

    def descriptors(self) -> bytes:
        if self._descs is None:
            data = bytearray()
            for b in self.desc_blocks():
                data += read_at(self.vol, b * self.block, self.block)
            self._descs = bytes(data)
        return self._descs

    def group_desc(self, g: int) -> tuple[int, int, int]:
        """(block bitmap, inode bitmap, inode table) block numbers of group g."""
        d = self.descriptors()
        off = g * self.desc_size
        bb, ib, it = struct.unpack_from("<III", d, off)
        if self.desc_size >= 64:
            bbh, ibh, ith = struct.unpack_from("<III", d, off + 0x20)
            bb, ib, it = bb | bbh << 32, ib | ibh << 32, it | ith << 32
        return bb, ib, it

    def inode_offset(self, inode: int) -> int:
        g, index = divmod(inode - 1, self.inodes_per_group)
        return self.group_desc(g)[2] * self.block + index * self.inode_size

    def structures(self) -> dict[str, list[tuple[int, int]]]:
        bs = self.block
        # With blocks over 1 KiB the primary superblock shares block 0 with
        # the boot area, and the kernel writes that block whole: name it all.
        sb: list[tuple[int, int]] = [(1024, 2048)] if bs == 1024 else [(0, bs)]
        gdt: list[tuple[int, int]] = []
        bbm: list[tuple[int, int]] = []
        ibm: list[tuple[int, int]] = []
        itab: list[tuple[int, int]] = []
        per_block = bs // self.desc_size
        gdt_count = -(-self.groups // per_block)
        meta_bg = bool(self.incompat & 0x10)
        table_blocks = -(-self.inodes_per_group * self.inode_size // bs)
        descs = self.descriptors()
        for b in self.desc_blocks():
            gdt.append((b * bs, (b + 1) * bs))
        if not meta_bg and self.reserved_gdt:
            first = self.first_data_block + 1 + gdt_count
            gdt.append((first * bs, (first + self.reserved_gdt) * bs))
        for g in range(self.groups):
            start = self.group_start(g)
            if g and self.has_super(g):
                sb.append((start * bs, start * bs + max(bs, 1024)))
                if not meta_bg:
                    n = gdt_count + self.reserved_gdt
                    gdt.append(((start + 1) * bs, (start + 1 + n) * bs))
            if (g + 1) * self.desc_size > len(descs):
                break
            bb, ib, it = self.group_desc(g)
            if bb:
                bbm.append((bb * bs, (bb + 1) * bs))
            if ib:
                ibm.append((ib * bs, (ib + 1) * bs))
            if it:
                itab.append((it * bs, (it + table_blocks) * bs))
        if meta_bg:
            for m in range(self.first_meta_bg, gdt_count):
                for g in (m * per_block + 1, (m + 1) * per_block - 1):
                    if g < self.groups:
                        b = self.group_start(g) + (1 if self.has_super(g) else 0)
                        gdt.append((b * bs, (b + 1) * bs))
        return {"/$Superblock": sb, "/$GroupDescriptors": gdt, "/$BlockBitmap": bbm,
                "/$InodeBitmap": ibm, "/$InodeTable": itab}
