"""One filesystem walked with The Sleuth Kit (pytsk3) through a Source.

``_Filesystem`` walks one volume's directories and files and appends block
map entries for its objects and structures; ``_volume_img`` is the TSK
external image whose reads go to ``Source.pread``; ``FilesystemReport`` is
what became of one volume. ``metadata.py`` walks the disk and calls this
per volume; ``iso.py`` and ``ext4.py`` name what TSK does not expose.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DiskwatchError
from ..events import Bus, Progress
from ..sources.base import Source
from .ext4 import Ext4Layout
from .format import BmapEntry, is_structure_path, merge_ranges
from .iso import IsoLayout, _iso_records
from .volumes import Volume, read_at

PROGRESS_INTERVAL = 0.05  # at most 20 Progress events a second


class MetadataError(DiskwatchError, RuntimeError):
    """The metadata method cannot run at all (pytsk3 missing)."""


def _import_tsk():
    global _RUN_SKIP, _ATTR_RES, _ATTR_NONRES, _DATA_TYPES, _INDEX_TYPES, _IDXROOT
    try:
        import pytsk3
    except ImportError as e:
        raise MetadataError(
            f"pytsk3 (The Sleuth Kit) cannot be imported ({e}): pip install pytsk3"
        ) from None
    # Plain ints, looked up once: the per-object loop compares them thousands of times.
    _RUN_SKIP = int(pytsk3.TSK_FS_ATTR_RUN_FLAG_SPARSE) | int(pytsk3.TSK_FS_ATTR_RUN_FLAG_FILLER)
    _ATTR_RES = int(pytsk3.TSK_FS_ATTR_RES)
    _ATTR_NONRES = int(pytsk3.TSK_FS_ATTR_NONRES)
    _DATA_TYPES = (int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_DATA), int(pytsk3.TSK_FS_ATTR_TYPE_DEFAULT))
    _INDEX_TYPES = (int(pytsk3.TSK_FS_ATTR_TYPE_UNIX_EXTENT),
                    int(pytsk3.TSK_FS_ATTR_TYPE_UNIX_INDIR))
    _IDXROOT = int(pytsk3.TSK_FS_ATTR_TYPE_NTFS_IDXROOT)
    return pytsk3


_RUN_SKIP = _ATTR_RES = _ATTR_NONRES = _IDXROOT = 0
_DATA_TYPES: tuple[int, ...] = ()
_INDEX_TYPES: tuple[int, ...] = ()


@dataclass
class FilesystemReport:
    """What became of one volume."""

    device: str
    fstype: str  # "ntfs", "ext4", "fat32", "xfs" (signature), "" unknown
    method: str  # "metadata", "watch" (to be done by it), "none"
    files: int = 0
    directories: int = 0
    metadata_objects: int = 0  # named filesystem structures
    skipped: int = 0  # objects that could not be named (newline in the name)
    warning: str = ""
    #: ext3/4: what its journal held that the walk read (``jbd2.py``)
    journal: str = ""
    #: the disks (from 1) its volume is on, when a VM's disks are mapped together
    disks: list[int] = field(default_factory=list)


class _Cancelled(Exception):
    pass



# --------------------------------------------------------------------------
# TSK over a Source


def _volume_img(pytsk3, source: Source):
    """A TSK image whose reads go to ``source.pread`` (short past its end)."""

    class _VolumeImg(pytsk3.Img_Info):
        def __init__(self, src: Source):
            self._src = src
            self._size = src.size
            super().__init__(url="", type=pytsk3.TSK_IMG_TYPE_EXTERNAL)

        def close(self) -> None:
            pass

        def read(self, offset: int, size: int) -> bytes:
            return read_at(self._src, offset, size)

        def get_size(self) -> int:
            return self._size

    return _VolumeImg(source)


class _Publisher:
    """Progress events, at most 20 a second (and the forced ones)."""

    def __init__(self, bus: Bus | None, t0: float):
        self.bus = bus
        self.t0 = t0
        self.last = 0.0
        self.done = 0
        self.total = 0

    def publish(self, phase: str, current: str = "", *, force: bool = False,
                summary: str = "") -> None:
        if self.bus is None:
            return
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        elapsed = now - self.t0
        self.bus.publish(Progress(phase, current, self.done, max(self.total, self.done),
                                  self.done / elapsed if elapsed > 0 else 0.0, elapsed, summary))


# --------------------------------------------------------------------------
# One filesystem


class _Filesystem:
    """Walks one filesystem with TSK; appends entries for its objects."""

    def __init__(self, pytsk3, fs, vol: Volume, vsrc: Source, report: FilesystemReport,
                 entries: list[BmapEntry], progress: _Publisher,
                 cancelled: Callable[[], bool]):
        self.tsk = pytsk3
        self.fs = fs
        self.vol = vol
        self.vsrc = vsrc
        self.report = report
        self.entries = entries
        self.progress = progress
        self.cancelled = cancelled
        self.block = fs.info.block_size
        self.device = vol.device
        segs = vol.segments
        #: volume offset -> disk offset, when that is one addition
        self.shift: int | None = (segs[0][1] if len(segs) == 1 and segs[0][0] == 0
                                  and not vol.mirrors else None)
        self.vol_size = vol.size
        ftype = int(fs.info.ftype)
        self.is_ntfs = bool(ftype & int(pytsk3.TSK_FS_TYPE_NTFS_DETECT))
        self.is_ext = bool(ftype & int(pytsk3.TSK_FS_TYPE_EXT_DETECT))
        self.is_fat = bool(ftype & int(pytsk3.TSK_FS_TYPE_FAT_DETECT)) or bool(
            ftype & int(pytsk3.TSK_FS_TYPE_EXFAT))
        self.is_iso = bool(ftype & int(pytsk3.TSK_FS_TYPE_ISO9660_DETECT))
        #: inode -> [smallest path so far, ranges by object suffix]
        self.files: dict[int, list] = {}
        #: inode -> path of each directory walked
        self.dir_paths: dict[int, str] = {}
        #: journal block -> volume offset of it (set for an ext journal)
        self.journal_where: Callable[[int], int] = lambda n: 0
        self._structures: set[str] = set()  # named before the walk: not again
        self.seen_dirs: set[int] = set()
        #: directory inode -> its entries as last listed (incremental remaps)
        self.children: dict[int, list[tuple[bytes, int, int]]] = {}
        self._name_alloc = int(pytsk3.TSK_FS_NAME_FLAG_ALLOC)
        self.errors = 0
        self.first_error = ""
        self._record_locator: Callable[[int], list[tuple[int, int]]] | None = None
        self._locator_ready = False

    # --- helpers ---

    def add(self, path: str, ranges: list[tuple[int, int]], kind: str = "f") -> None:
        """Volume byte ranges -> disk entries of ``path``."""
        if "\n" in path:
            self.report.skipped += 1
            return
        dev = self.device
        if len(ranges) > 1:
            ranges = merge_ranges(ranges)
        shift = self.shift
        if shift is not None:  # a partition: one segment (the common case, kept lean)
            size = self.vol_size  # what lies past the volume is not on it (corrupt metadata)
            self.entries += [BmapEntry(1, s + shift, min(e, size) + shift, kind, dev, path)
                             for s, e in ranges if min(e, size) > s]
            return
        out = self.entries
        for s, e in ranges:
            for ds, de in self.vol.to_disk(s, e):
                out.append(BmapEntry(1, ds, de, kind, dev, path))

    def error(self, what: str, e: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{what}: {e}".replace("\n", " ")[:200]

    def runs(self, attr) -> list[tuple[int, int]]:
        """Allocated runs of a non-resident attribute, as volume byte ranges."""
        bs, skip = self.block, _RUN_SKIP
        out = []
        for run in attr:
            if int(run.flags) & skip or run.len == 0:
                continue
            out.append((run.addr * bs, (run.addr + run.len) * bs))
        return out

    def record_bytes(self, inode: int) -> list[tuple[int, int]]:
        """Volume byte range of the MFT record / inode that holds ``inode``."""
        if not self._locator_ready:
            self._locator_ready = True
            try:
                self._record_locator = (
                    self._ntfs_locator() if self.is_ntfs else self._ext_locator() if self.is_ext
                    else None)
            except (OSError, ValueError, struct.error) as e:
                self.error("record locator", e)
        if self._record_locator is None:
            return []
        try:
            return self._record_locator(inode)
        except (OSError, ValueError, IndexError, struct.error) as e:
            self.error(f"record of inode {inode}", e)
            return []

    def _ntfs_locator(self) -> Callable[[int], list[tuple[int, int]]]:
        boot = read_at(self.vsrc, 0, 512)
        bps, spc = struct.unpack_from("<HB", boot, 11)
        (cpr,) = struct.unpack_from("<b", boot, 0x40)
        rec = cpr * bps * spc if cpr > 0 else 1 << -cpr
        mft = self.fs.open_meta(inode=0)
        runs: list[tuple[int, int]] = []  # $MFT's data, in file order
        for attr in mft:
            if int(attr.info.type) == int(self.tsk.TSK_FS_ATTR_TYPE_NTFS_DATA) and not attr.info.name:
                runs = [(r.addr * self.block, r.len * self.block) for r in attr]

        def locate(inode: int) -> list[tuple[int, int]]:
            pos = inode * rec
            for start, length in runs:
                if pos < length:
                    return [(start + pos, start + pos + rec)]
                pos -= length
            return []

        return locate

    def _ext_locator(self) -> Callable[[int], list[tuple[int, int]]]:
        sb = Ext4Layout(self.vsrc)

        def locate(inode: int) -> list[tuple[int, int]]:
            start = sb.inode_offset(inode)
            return [(start, start + sb.inode_size)]

        return locate

    # --- the walk ---

    def map(self) -> None:
        self.map_structures()
        if self.is_iso and self._iso_rock_ridge():
            try:
                self.map_iso_trees(tsk_walked=False)
            except (OSError, ValueError, struct.error) as e:
                self.error("ISO 9660 directories", e)
            return
        root = self.fs.info.root_inum
        try:
            self.add_object(root, "/", is_dir=True)
        except (OSError, RuntimeError) as e:
            self.error("/", e)
        self.seen_dirs.add(root)
        self.walk([(root, "/")])
        for path, pieces in self.files.values():
            for suffix, ranges in pieces:
                self.add(path + suffix, ranges)
        if self.is_iso:
            try:
                self.map_iso_trees(tsk_walked=True)
            except (OSError, ValueError, struct.error) as e:
                self.error("ISO 9660 directories", e)

    def list_dir(self, inode: int, path: str) -> list[tuple[bytes, int, int]] | None:
        """A directory's allocated entries ``(name, inode, TSK meta type)``
        ("." and ".." left out), also kept in ``children``; None if it
        cannot be read (counted as an error)."""
        name_alloc = self._name_alloc
        try:
            directory = self.fs.open_dir(inode=inode)
            listing = []
            dots = 0
            for entry in directory:
                info = entry.info
                meta = info.meta
                if meta is None:
                    continue
                name = info.name
                if not int(name.flags) & name_alloc:
                    continue
                raw = name.name
                if raw == b"." or raw == b"..":
                    dots += 1
                    continue
                listing.append((raw, meta.addr, int(meta.type)))
        except (OSError, RuntimeError) as e:
            self.error(path, e)
            return None
        if self.is_ext and not dots:
            # Every ext directory starts with "." and "..": a block without
            # them is garbage (torn by a write, or corrupt), not empty.
            self.error(path, OSError("directory block unreadable"))
        self.children[inode] = listing
        return listing

    def walk(self, stack: list[tuple[int, str]]) -> None:
        """Every directory below those on ``stack`` (inode, path), depth first:
        their files and directories added (``files``, ``dir_paths``)."""
        tsk = self.tsk
        dir_type = int(tsk.TSK_FS_META_TYPE_DIR)
        reg_type = int(tsk.TSK_FS_META_TYPE_REG)
        virt_type = int(tsk.TSK_FS_META_TYPE_VIRT)
        progress = self.progress
        while stack:
            if self.cancelled():
                raise _Cancelled
            inode, path = stack.pop()
            progress.publish("files", f"{self.device} {path}")
            listing = self.list_dir(inode, path)
            if listing is None:
                continue
            prefix = path if path.endswith("/") else path + "/"
            for raw, addr, mtype in listing:
                child = prefix + raw.decode("utf-8", "surrogateescape")
                if mtype == virt_type or (path == "/" and raw == b"$OrphanFiles"):
                    if self.is_fat and raw.startswith(b"$FAT"):
                        self.add_virtual(addr, child)
                    continue
                if mtype == dir_type:
                    if addr in self.seen_dirs:
                        continue  # a loop (corrupt) or a second name of a directory
                    self.seen_dirs.add(addr)
                    try:
                        self.add_object(addr, child, is_dir=True)
                    except (OSError, RuntimeError) as e:
                        self.error(child, e)
                    stack.append((addr, child))
                elif mtype == reg_type:
                    known = self.files.get(addr)
                    if known is not None:
                        if child < known[0]:
                            known[0] = child  # hard link: the smallest path names it
                        continue
                    try:
                        self.add_object(addr, child, is_dir=False)
                    except (OSError, RuntimeError) as e:
                        self.error(child, e)

    def _iso_rock_ridge(self) -> bool:
        """Whether the primary tree's root holds Rock Ridge names."""
        iso = getattr(self, "_iso", None)
        if iso is None or iso.primary is None:
            return False
        start, length = iso.primary
        data = read_at(self.vsrc, start, min(length, 64 << 20))
        return any(rr for *_, rr in _iso_records(data, joliet=False))

    def add_object(self, inode: int, path: str, is_dir: bool) -> None:
        """A file's or directory's ranges by attribute: the unnamed data (and
        every other attribute) under its path, named streams as PATH:NAME."""
        f = self.fs.open_meta(inode=inode)
        res, nonres, data_types, index_types, idxroot = _ATTR_RES, _ATTR_NONRES, _DATA_TYPES, \
            _INDEX_TYPES, _IDXROOT
        ntfs = self.is_ntfs
        pieces: dict[str, list[tuple[int, int]]] = {}
        own: list[tuple[int, int]] = []
        resident_data = False  # the unnamed data (a tiny directory's index) is in the record
        for attr in f:
            info = attr.info
            atype = int(info.type)
            flags = int(info.flags)
            name = info.name
            if ntfs and atype in data_types and name and name != b"$Data":
                # a named stream (TSK names ext4's inline data "DATA": not one)
                suffix = ":" + name.decode("utf-8", "surrogateescape")
            elif atype in index_types:
                suffix = ":$extents"
            else:
                suffix = ""
            if flags & nonres:
                ranges = self.runs(attr)
                if suffix:
                    pieces.setdefault(suffix, []).extend(ranges)
                else:
                    own.extend(ranges)
            elif flags & res and (atype in data_types or (is_dir and atype == idxroot)):
                # Data inside the MFT record / inode: those bytes are it.
                if suffix:
                    pieces.setdefault(suffix, []).extend(self.record_bytes(inode))
                else:
                    resident_data = True
        if resident_data and (not is_dir or not own):
            own += self.record_bytes(inode)
        if is_dir:
            self.report.directories += 1
            self.dir_paths[inode] = path
            self.add(path, own, "d")
            for suffix, ranges in pieces.items():
                self.add(path + suffix, ranges)
        else:
            if self.is_ntfs and is_structure_path(path):
                self.report.metadata_objects += 1  # NTFS's own system files
            else:
                self.report.files += 1
            self.files[inode] = [path, [("", own), *pieces.items()]]
        self.progress.done += 1

    def add_virtual(self, inode: int, path: str) -> None:
        """TSK's virtual FAT files ($FAT1, $FAT2): the FAT copies."""
        try:
            f = self.fs.open_meta(inode=inode)
            ranges = []
            for attr in f:
                if int(attr.info.flags) & int(self.tsk.TSK_FS_ATTR_NONRES):
                    ranges += self.runs(attr)
        except (OSError, RuntimeError) as e:
            self.error(path, e)
            return
        if ranges and path not in self._structures:  # exFAT's FAT: named already
            self.add(path, ranges)
            self.report.metadata_objects += 1

    # --- filesystem structures ---

    def map_structures(self) -> None:
        try:
            if self.is_ext:
                self.map_ext_structures()
            elif self.is_fat:
                self.map_fat_structures()
            elif self.is_iso:
                self.map_iso_structures()
        except (OSError, ValueError, struct.error, RuntimeError) as e:
            self.error("filesystem structures", e)

    def map_ext_structures(self) -> None:
        layout = Ext4Layout(self.vsrc)
        for name, ranges in layout.structures().items():
            if ranges:
                self.add(name, ranges)
                self.report.metadata_objects += 1
        journal = int(self.fs.info.journ_inum)
        if journal:
            f = self.fs.open_meta(inode=journal)
            ranges = []
            for attr in f:
                if int(attr.info.flags) & int(self.tsk.TSK_FS_ATTR_NONRES):
                    ranges += self.runs(attr)
            if ranges:
                self.add("/$Journal", ranges)
                self.report.metadata_objects += 1

    def map_fat_structures(self) -> None:
        boot = read_at(self.vsrc, 0, 512)
        if boot[3:11] == b"EXFAT   ":
            (fat_off, fat_len) = struct.unpack_from("<II", boot, 80)
            (shift,) = struct.unpack_from("<B", boot, 108)
            nfats = boot[110]
            sector = 1 << shift
            self.add("/$BootSector", [(0, 24 * sector)])
            for i in range(nfats):
                start = (fat_off + i * fat_len) * sector
                self.add(f"/$FAT{i + 1}", [(start, start + fat_len * sector)])
                self._structures.add(f"/$FAT{i + 1}")
            self.report.metadata_objects += 1 + nfats
            return
        bps, _, reserved, _ = struct.unpack_from("<HBHB", boot, 11)
        self.add("/$BootSector", [(0, reserved * bps)])
        self.report.metadata_objects += 1


    def map_iso_structures(self) -> None:
        """ISO 9660: the volume descriptors and the path tables."""
        iso = IsoLayout(self.vsrc)
        self.add("/$VolumeDescriptors", [iso.descriptors])
        tables = [r for r in iso.path_tables if r[1] > r[0]]
        if tables:
            self.add("/$PathTable", tables)
        self.report.metadata_objects += 1 + bool(tables)
        self._iso = iso

    def map_iso_trees(self, tsk_walked: bool) -> None:
        """ISO 9660's trees, which TSK only half reads: it walks one tree
        (Joliet when there is one: what Windows reads) and knows nothing of
        Rock Ridge, the names a Linux guest sees (without Joliet TSK gives
        8.3 names: /BOOT/VMLINUZ). So with Rock Ridge the primary tree is
        walked here, and its names are the files' names; every tree's
        directories are named (they are different sectors; files are shared
        by the trees). Without Rock Ridge TSK's walk stands, and only the
        directories it did not name are added."""
        iso = getattr(self, "_iso", None)
        if iso is None:
            return
        primary = iso.walk(iso.primary, joliet=False) if iso.primary else []
        trees = [(primary, iso.rock_ridge)]
        trees += [(iso.walk(root, joliet=True), False) for root in iso.joliet]
        if iso.cut:
            self.error("ISO 9660 directories", ValueError(f"{iso.cut}: the rest is not named"))
        named = {(e.start, e.end) for e in self.entries if e.type == "d"}
        shift = self.shift or 0
        for i, (objects, with_files) in enumerate(trees):
            # a directory is counted once, in the tree whose names are used
            counted = i == 0 and not tsk_walked
            for path, is_dir, ranges in objects:
                if is_dir:
                    ranges = [r for r in ranges if (r[0] + shift, r[1] + shift) not in named]
                    if ranges:
                        self.add(path, ranges, "d")
                        named.update((r[0] + shift, r[1] + shift) for r in ranges)
                        self.report.directories += counted
                elif with_files and not tsk_walked:
                    self.add(path, ranges)
                    self.report.files += 1
                self.progress.done += 1


def _tsk_name(pytsk3, ftype: int) -> str:
    for name in ("NTFS", "EXT2", "EXT3", "EXT4", "FAT12", "FAT16", "FAT32", "EXFAT", "HFS",
                 "ISO9660", "FFS1", "FFS1B", "FFS2", "APFS", "YAFFS2"):
        if ftype == int(getattr(pytsk3, "TSK_FS_TYPE_" + name)):
            return name.lower()
    return ""
