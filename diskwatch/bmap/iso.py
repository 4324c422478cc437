"""ISO 9660 layout: where a volume's own structures are (the volume
descriptors, the path tables, each tree's directory records, Rock Ridge
names, Joliet's UCS-2 tree), read directly and bounded. Used by the
metadata method (``tsk.py`` walks the files; this names the rest).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ..sources.base import Source
from .volumes import read_at

ISO_SECTOR = 2048


class IsoLayout:
    """Where an ISO 9660 volume's own structures are: the volume
    descriptors (sector 16 on), the path tables, and each tree's directory
    records (the primary one with its Rock Ridge names, Joliet's in UCS-2).
    Bounded: at most MAX_OBJECTS records, each directory read once, at most
    64 MiB of one directory and MAX_DIRECTORY_BYTES of them all (records
    are the image's word: a hostile one may claim huge, overlapping
    directories), MAX_PATH_BYTES of paths (a path grows with its depth: a
    chain of directories with long names would hold its square). ``cut``
    says which bound stopped a walk."""

    MAX_OBJECTS = 2_000_000
    MAX_DIRECTORY_BYTES = 512 << 20  # a real ISO's directories are a few MiB
    MAX_PATH_BYTES = 128 << 20  # a DVD's 100 000 paths are 8 MB

    def __init__(self, vol: Source):
        self.vol = vol
        self.primary: tuple[int, int] | None = None  # root directory extent (bytes)
        self.joliet: list[tuple[int, int]] = []
        self.path_tables: list[tuple[int, int]] = []
        self.rock_ridge = False  # learnt by walk()
        self.budget = self.MAX_DIRECTORY_BYTES  # what walks may still read
        self.cut = ""  # why a walk stopped before its end
        sector = 16
        while True:
            d = read_at(vol, sector * ISO_SECTOR, ISO_SECTOR)
            if len(d) < ISO_SECTOR or d[1:6] != b"CD001":
                raise ValueError(f"no ISO 9660 volume descriptor at sector {sector}")
            kind = d[0]
            if kind in (1, 2):  # primary, supplementary (Joliet)
                (size,) = struct.unpack_from("<I", d, 132)
                l_table, l_opt = struct.unpack_from("<II", d, 140)
                m_table, m_opt = struct.unpack_from(">II", d, 148)
                for lba in (l_table, l_opt, m_table, m_opt):
                    if lba:
                        self.path_tables.append((lba * ISO_SECTOR,
                                                 lba * ISO_SECTOR + _sectors(size)))
                lba, length = struct.unpack_from("<I4xI", d, 156 + 2)
                root = (lba * ISO_SECTOR, length)
                if kind == 1 and self.primary is None:
                    self.primary = root
                elif kind == 2 and d[88:90] == b"%/" and d[90:91] in (b"@", b"C", b"E"):
                    self.joliet.append(root)
            sector += 1
            if kind == 255 or sector > 16 + 64:
                break
        self.descriptors = (16 * ISO_SECTOR, sector * ISO_SECTOR)

    def walk(self, root: tuple[int, int], joliet: bool
             ) -> list[tuple[str, bool, list[tuple[int, int]]]]:
        """(path, is a directory, byte ranges) of a tree's objects; a file
        in several extents (over 4 GiB) has them all."""
        files: dict[str, list[tuple[int, int]]] = {}
        out: list[tuple[str, bool, list[tuple[int, int]]]] = []
        seen: set[int] = set()
        todo = [("/", *root)]
        count = 0
        path_bytes = 0
        while todo:
            if count >= self.MAX_OBJECTS:
                self.cut = f"over {self.MAX_OBJECTS} directory records"
                break
            if self.budget <= 0:
                self.cut = f"over {self.MAX_DIRECTORY_BYTES >> 20} MiB of directory records"
                break
            if path_bytes >= self.MAX_PATH_BYTES:
                self.cut = f"over {self.MAX_PATH_BYTES >> 20} MiB of paths"
                break
            path, start, length = todo.pop()
            if start in seen or length <= 0:
                continue
            seen.add(start)
            out.append((path, True, [(start, start + _sectors(length))]))
            data = self._read(start, min(length, 64 << 20))
            prefix = path if path.endswith("/") else path + "/"
            for name, lba, size, is_dir, rr in _iso_records(data, joliet, self._read):
                count += 1
                self.rock_ridge |= rr
                if name in (".", "..") or "/" in name or not name:
                    continue
                child = prefix + name
                path_bytes += len(child)
                if is_dir:
                    todo.append((child, lba * ISO_SECTOR, size))
                else:
                    ranges = files.setdefault(child, [])
                    if size:
                        ranges.append((lba * ISO_SECTOR, lba * ISO_SECTOR + _sectors(size)))
        out += [(path, False, ranges) for path, ranges in files.items()]
        return out

    def _read(self, offset: int, length: int) -> bytes:
        data = read_at(self.vol, offset, min(length, max(self.budget, 0)))
        self.budget -= max(len(data), 1)
        return data


def _sectors(n: int) -> int:
    """n bytes, read as whole sectors."""
    return -(-n // ISO_SECTOR) * ISO_SECTOR


def _iso_records(data: bytes, joliet: bool,
                 read: Callable[[int, int], bytes] | None = None):
    """(name, extent lba, data length, is a directory, has a Rock Ridge
    name) of each directory record; "." and ".." for the first two. A
    Rock Ridge NM name wins over the ISO name (which loses its ";1").
    With ``read`` (offset, length -> bytes of the volume), Rock Ridge is
    followed as Linux reads it: names that go on in continuation areas,
    a relocated directory (RE) left out of /rr_moved and shown where its
    child link (CL) is."""
    pos = 0
    n = len(data)
    while pos < n:
        rlen = data[pos]
        if rlen == 0:  # records do not cross sectors: go to the next one
            pos = (pos // ISO_SECTOR + 1) * ISO_SECTOR
            continue
        if rlen < 34 or pos + rlen > n:
            return
        rec = data[pos:pos + rlen]
        pos += rlen
        lba, size = struct.unpack_from("<I4xI", rec, 2)
        is_dir = bool(rec[25] & 2)
        id_len = rec[32]
        ident = rec[33:33 + id_len]
        nm = None
        if ident == b"\x00":
            name = "."
        elif ident == b"\x01":
            name = ".."
        elif joliet:
            name = ident.decode("utf-16-be", "replace").split(";")[0]
        else:
            nm, child, relocated = _rock_ridge(rec[33 + id_len + (1 - id_len % 2):], read)
            if relocated and read is not None:
                continue  # shown where its CL link is
            if child is not None and read is not None:
                # the placeholder of a relocated directory: its "." record
                # says how long the directory is
                head = read(child * ISO_SECTOR, 34)
                if len(head) < 34 or head[0] < 34:
                    continue
                lba, is_dir = child, True
                (size,) = struct.unpack_from("<I", head, 10)
            name = nm if nm is not None else ident.decode("latin-1").split(";")[0].rstrip(".")
        yield name, lba, size, is_dir, nm is not None


MAX_CONTINUATIONS = 8  # a name of 255 bytes needs one; more is a loop
NAME_MAX = 255  # bytes of a Rock Ridge name, as Linux reads them


def _rock_ridge(susp: bytes, read: Callable[[int, int], bytes] | None
                ) -> tuple[str | None, int | None, bool]:
    """From a record's system use area (SUSP), and with ``read`` its
    continuation areas (CE): the Rock Ridge NM name, the extent a CL child
    link points to (a directory deeper than ISO 9660's eight levels, moved
    to /rr_moved), and whether RE marks the record as that moved directory."""
    parts = []
    size = 0
    name_done = False
    child = None
    relocated = False
    for _ in range(MAX_CONTINUATIONS + 1):
        pos = 0
        more = None
        while pos + 4 <= len(susp):
            sig, ln = susp[pos:pos + 2], susp[pos + 2]
            if ln < 4 or sig == b"ST":
                break
            if sig == b"NM" and ln >= 5 and not name_done:
                parts.append(susp[pos + 5:pos + ln])
                name_done = not susp[pos + 4] & 1  # no CONTINUE flag: complete
                size += ln - 5
                if size >= NAME_MAX:  # Linux cuts a name there too
                    name_done = True
            elif sig == b"CE" and ln >= 28:
                more = struct.unpack_from("<I4xI4xI", susp, pos + 4)
            elif sig == b"CL" and ln >= 12:
                (child,) = struct.unpack_from("<I", susp, pos + 4)
            elif sig == b"RE":
                relocated = True
            pos += ln
        if more is None or read is None:
            break
        block, offset, length = more
        susp = read(block * ISO_SECTOR + offset, min(length, ISO_SECTOR))
    name = b"".join(parts)[:NAME_MAX].decode("utf-8", "surrogateescape") if parts else None
    return name, child, relocated
