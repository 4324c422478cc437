"""NTFS that The Sleuth Kit refuses: clusters over 64 KiB.

Windows 10 (since 1709) formats NTFS with clusters up to 2 MiB; the TSK in
the pytsk3 wheel refuses more than 128 sectors per cluster ("Cannot
determine file system type"), and the partition was a bare ``p /dev/sda1``.
For those, the tree comes from libyal's libfsntfs (``pyfsntfs``, from
PyPI's libfsntfs-python: names, directories, hard links as the filesystem
holds them), and each object's ranges from its own MFT record, read here:
every non-resident attribute's runlist, as TSK's walk gives them
(``metadata.py``): the unnamed data and the other attributes (index
allocation, bitmap) under the path, a named data stream as ``PATH:NAME``, a
resident one as the bytes of its record. Records are read through
``$MFT``'s own runlist, with their update-sequence fixups applied.

Everything here parses what a guest wrote and runs in the mapper's process
(``worker.py``); it is bounded all the same: at most ``MAX_OBJECTS``
objects, runlists of at most ``MAX_RUNS`` runs, each directory once (a
directory that is its own ancestor is not walked again). Attribute lists
(a file whose attributes do not fit in one record) are read only as far as
the base record goes: said in the report's warning.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .format import is_structure_path

__all__ = ["MAX_OBJECTS", "NtfsLayout", "map_ntfs"]

MAX_OBJECTS = 2_000_000
MAX_RUNS = 65_536

DATA, INDEX_ROOT, ATTRIBUTE_LIST, END = 0x80, 0x90, 0x20, 0xFFFFFFFF


class NtfsLayout:
    """The boot sector's geometry and ``$MFT``'s runlist."""

    def __init__(self, read: Callable[[int, int], bytes]):
        self.read = read
        boot = read(0, 512)
        if boot[3:11] != b"NTFS    ":
            raise ValueError("no NTFS boot sector")
        bps = struct.unpack_from("<H", boot, 0x0B)[0]
        spc = boot[0x0D]
        spc = 1 << (256 - spc) if spc > 0x80 else spc
        self.cluster = bps * spc
        if not (bps in (512, 1024, 2048, 4096) and 512 <= self.cluster <= 2 << 20):
            raise ValueError(f"NTFS geometry out of range ({bps} bytes a sector, {spc} a cluster)")
        (mft_lcn,) = struct.unpack_from("<Q", boot, 0x30)
        cpr = struct.unpack_from("<b", boot, 0x40)[0]
        self.record = 1 << -cpr if cpr < 0 else cpr * self.cluster
        self.sector = bps
        if not 512 <= self.record <= 65536:
            raise ValueError(f"NTFS record size {self.record} out of range")
        # Record 0 ($MFT) is where the boot sector says; its data's runlist
        # then says where every other record is.
        self.mft_runs = [(mft_lcn, 1 << 40)]
        first = self.record_at(0)
        runs = [r for a in attributes(first) if a[0] == DATA and not a[1] and a[2]
                for r in a[3]]
        if not runs:
            raise ValueError("$MFT has no data runs")
        self.mft_runs = runs

    def record_offset(self, n: int) -> int:
        pos = n * self.record
        for lcn, count in self.mft_runs:
            size = count * self.cluster
            if pos < size:
                return lcn * self.cluster + pos
            pos -= size
        raise ValueError(f"MFT record {n} lies beyond $MFT")

    def record_at(self, n: int) -> bytes:
        data = bytearray(self.read(self.record_offset(n), self.record))
        if data[0:4] != b"FILE":
            raise ValueError(f"MFT record {n}: no FILE signature")
        usa, count = struct.unpack_from("<HH", data, 4)
        if usa + 2 * count > len(data) or count == 0:
            raise ValueError(f"MFT record {n}: bad update sequence")
        check = data[usa:usa + 2]
        for k in range(1, count):
            end = k * self.sector
            if end > len(data) or data[end - 2:end] != check:
                raise ValueError(f"MFT record {n}: fixup mismatch")
            data[end - 2:end] = data[usa + 2 * k:usa + 2 * k + 2]
        return bytes(data)


def attributes(record: bytes) -> list[tuple[int, str, bool, list[tuple[int, int]]]]:
    """(type, name, non-resident, runs as (first cluster, count)) of each
    attribute of a record; sparse runs are left out."""
    out = []
    (pos,) = struct.unpack_from("<H", record, 0x14)
    while 0 < pos <= len(record) - 16:
        atype, length = struct.unpack_from("<II", record, pos)
        if atype == END or length < 16 or pos + length > len(record):
            break
        nonres = record[pos + 8]
        name_len, name_off = record[pos + 9], struct.unpack_from("<H", record, pos + 10)[0]
        name = record[pos + name_off:pos + name_off + 2 * name_len].decode(
            "utf-16-le", "surrogatepass") if name_len else ""
        runs: list[tuple[int, int]] = []
        if nonres and length >= 0x40:
            (runs_off,) = struct.unpack_from("<H", record, pos + 0x20)
            runs = _runlist(record[pos + runs_off:pos + length])
        out.append((atype, name, bool(nonres), runs))
        pos += length
    return out


def _runlist(data: bytes) -> list[tuple[int, int]]:
    runs = []
    lcn = 0
    i = 0
    while i < len(data) and data[i] and len(runs) < MAX_RUNS:
        head = data[i]
        nlen, olen = head & 0x0F, head >> 4
        if nlen == 0 or nlen > 8 or olen > 8 or i + 1 + nlen + olen > len(data):
            break
        count = int.from_bytes(data[i + 1:i + 1 + nlen], "little")
        if olen:  # else sparse: no clusters
            lcn += int.from_bytes(data[i + 1 + nlen:i + 1 + nlen + olen], "little", signed=True)
            if lcn >= 0 and count:
                runs.append((lcn, count))
        i += 1 + nlen + olen
    return runs


class _FileObject:
    """A volume as libfsntfs reads it: a file-like object over ``read``."""

    def __init__(self, read: Callable[[int, int], bytes], size: int):
        self._read, self._size, self._pos = read, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        data = self._read(self._pos, n) if n > 0 else b""
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else \
            self._size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def get_size(self) -> int:
        return self._size


def map_ntfs(read: Callable[[int, int], bytes], size: int,
             add: Callable[[str, list[tuple[int, int]], str], None],
             cancelled: Callable[[], bool] = lambda: False,
             on_object: Callable[[str], None] = lambda path: None) -> tuple[int, int, int, str]:
    """Walk one NTFS volume (``read(offset, length)`` of the volume) and
    ``add(path, volume byte ranges, "f" | "d")`` each object. Returns
    (directories, files, system files, warning)."""
    import pyfsntfs  # libfsntfs-python
    layout = NtfsLayout(read)
    volume = pyfsntfs.volume()
    volume.open_file_object(_FileObject(read, size))
    cluster, record = layout.cluster, layout.record
    counts = [0, 0, 0]
    lists = 0
    seen_dirs: set[int] = set()
    named: dict[int, str] = {}  # entry -> the smallest path (hard links)
    objects: list[tuple[int, str, bool]] = []
    root = volume.get_root_directory()
    stack = [(root, "")]
    seen_dirs.add(root.file_reference & 0xFFFFFFFFFFFF)
    objects.append((root.file_reference & 0xFFFFFFFFFFFF, "/", True))
    while stack and len(objects) < MAX_OBJECTS:
        if cancelled():
            raise InterruptedError("cancelled")
        directory, path = stack.pop()
        on_object(path or "/")
        for i in range(directory.number_of_sub_file_entries):
            entry = directory.get_sub_file_entry(i)
            name = entry.name
            if not name or name in (".", ".."):
                continue
            n = entry.file_reference & 0xFFFFFFFFFFFF
            child = f"{path}/{name}"
            is_dir = entry.has_directory_entries_index()
            if is_dir:
                if n in seen_dirs:
                    continue
                seen_dirs.add(n)
                stack.append((entry, child))
                objects.append((n, child, True))
            elif n not in named or child < named[n]:
                named[n] = child
    objects += [(n, p, False) for n, p in named.items()]
    for n, path, is_dir in objects:
        try:
            rec = layout.record_at(n)
            attrs = attributes(rec)
        except (ValueError, struct.error):
            continue
        at = layout.record_offset(n)
        own: list[tuple[int, int]] = []
        streams: dict[str, list[tuple[int, int]]] = {}
        resident_data = False
        for atype, aname, nonres, runs in attrs:
            if atype == ATTRIBUTE_LIST:
                lists += 1
            ranges = [(lcn * cluster, (lcn + count) * cluster) for lcn, count in runs]
            if atype == DATA and aname:
                streams.setdefault(aname, []).extend(ranges if nonres else [(at, at + record)])
            elif nonres:
                own.extend(ranges)
            elif atype == DATA or (is_dir and atype == INDEX_ROOT):
                resident_data = True
        if resident_data and (not is_dir or not own):
            own.append((at, at + record))
        add(path, own, "d" if is_dir else "f")
        for aname, ranges in streams.items():
            add(f"{path}:{aname}", ranges, "f")
        counts[0 if is_dir else 2 if is_structure_path(path) else 1] += 1
    warning = (f"{lists} files with attribute lists mapped from their base records only"
               if lists else "")
    if len(objects) >= MAX_OBJECTS:
        warning = "; ".join(filter(None, (warning, f"stopped at {MAX_OBJECTS} objects")))
    return counts[0], counts[1], counts[2], warning
