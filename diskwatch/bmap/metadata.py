"""Block maps from filesystem metadata: partition tables and filesystem
structures read directly through a Source, with The Sleuth Kit (pytsk3).

Why this and not the watch method (``generate.py``) first: it is exact (a
file's ranges are its runs, as the filesystem records them, not the reads an
appliance happened to make), needs no appliance (a map in a second or two
instead of a 15-40 s launch under TCG), and it can name what no file read
ever shows: the filesystem's own metadata.

pytsk3 is the PyPI wheel (it bundles a current TSK, 4.15, and installs in any
venv, so the method works without Debian's modules); the image is read
through diskwatch's own ``Source`` (``_VolumeImg`` is a TSK external image
whose reads call ``Source.pread``), so an xz image, a URL, a snapshot overlay
or the live served source are mapped the same way, with no copy.

What is named (all as ``f`` lines, so every virt-bmap-format reader keeps
working):

- every regular file and directory, under its path; a file with hard links
  under the smallest of its paths (the same one every run);
- NTFS: the filesystem's own system files under their own names (``/$MFT``,
  ``/$MFTMirr``, ``/$LogFile``, ``/$Bitmap``, ``/$Boot``, ``/$Secure``,
  ``/$UpCase``, ``/$Extend/$UsnJrnl``...). A named data stream (an
  alternate data stream) is its own object ``PATH:STREAM``
  (``/$Extend/$UsnJrnl:$J``, ``/$Secure:$SDS``, ``/doc.txt:Zone.Identifier``);
  the other attributes of a file (index allocation, attribute list, bitmap)
  belong to the file itself. A resident file (its data inside its MFT
  record) maps to the bytes of that record; a sparse file to its allocated
  runs only; a compressed file to its allocated clusters.
- ext2/3/4: diskwatch's names, ``$`` first, in the root (none of them exists
  as a real file there in practice): ``/$Superblock`` (the primary, with
  blocks over 1 KiB the whole of block 0 that holds it, and every
  backup), ``/$GroupDescriptors`` (with the reserved GDT blocks),
  ``/$BlockBitmap``, ``/$InodeBitmap``, ``/$InodeTable``, ``/$Journal``
  (inode 8, or the journal inode the superblock names). A file's extent-tree
  or indirect blocks are ``PATH:$extents`` (the file's data stays exactly its
  data, as debugfs lists it). Inline data maps to the bytes of the inode.
- FAT12/16/32, exFAT: ``/$BootSector`` (the reserved sectors: boot sector,
  FSInfo, backup), ``/$FAT1``, ``/$FAT2``...; the root directory (FAT12/16's
  fixed region, FAT32's cluster chain) is the directory ``/``.

Object names of files are what the filesystem holds (UTF-8, undecodable
bytes kept with surrogateescape); a name may hold any character but a
newline, which the format cannot carry (such a file is skipped and counted).

The mapper is a function of the source as it is now: ``map_metadata(source)``
returns entries and touches nothing else, so it can run again on a live
source at any time. A filesystem that cannot be read (corrupt, caught
mid-update by a live remap, truncated) gives what could be read and a
one-line warning naming the volume; it never raises.
"""

from __future__ import annotations

import struct
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DiskwatchError
from ..events import Bus, Progress
from ..sources.base import Source
from .format import BmapEntry, is_structure_path, merge_ranges
from .jbd2 import JournalScan, JournalView, scan_journal
from .volumes import (
    NO_FILESYSTEM,
    Volume,
    VolumeSource,
    disk_structures,
    find_volumes,
    read_at,
)

__all__ = [
    "FilesystemReport",
    "MetadataError",
    "MetadataResult",
    "map_metadata",
    "probe_signature",
]

PROGRESS_INTERVAL = 0.05  # at most 20 Progress events a second
#: filesystems (from their signature) the watch method may read where TSK cannot
WATCH_ONLY = frozenset({"xfs", "btrfs", "f2fs", "jfs", "reiserfs", "nilfs2", "bcachefs", "ufs2"})
#: not filesystems: nothing to map inside
NOT_FILESYSTEMS = frozenset({"swap", "LVM2_member", "crypto_LUKS", "extended"})


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


@dataclass
class MetadataResult:
    entries: list[BmapEntry] = field(default_factory=list)
    #: ext3/4: which file or directory each journal block of the current log
    #: carries metadata of (disk ranges of the journal's copies; ``jbd2.py``)
    journal: list[BmapEntry] = field(default_factory=list)
    volumes: list[Volume] = field(default_factory=list)
    filesystems: list[FilesystemReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def objects(self) -> int:
        return 1 + len(self.volumes) + sum(
            f.files + f.directories + f.metadata_objects for f in self.filesystems
        )

    def for_watch(self) -> list[FilesystemReport]:
        return [f for f in self.filesystems if f.method == "watch"]

    def summary(self) -> str:
        mapped = [f for f in self.filesystems if f.method == "metadata"]
        files = sum(f.files for f in mapped)
        dirs = sum(f.directories for f in mapped)
        rate = self.objects / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"{len(self.volumes)} volumes, {len(mapped)} filesystems by metadata, "
            f"{dirs} directories, {files} files in {self.elapsed:.2f} s ({rate:.0f} objects/s)"
        )


# --------------------------------------------------------------------------
# Signatures (what a volume holds when TSK cannot say)


def probe_signature(vol: Source) -> str:
    """The filesystem (or other content) a volume's signature names; "" if none."""
    head = read_at(vol, 0, 70 * 1024)
    if len(head) < 512:
        return ""

    def at(off: int, magic: bytes) -> bool:
        return head[off : off + len(magic)] == magic

    if at(3, b"NTFS    "):
        return "ntfs"
    if at(3, b"EXFAT   "):
        return "exfat"
    if at(1024 + 56, b"\x53\xef"):
        return "ext4"
    if at(0, b"XFSB"):
        return "xfs"
    if at(65536 + 64, b"_BHRfS_M"):
        return "btrfs"
    if at(1024, b"\x10\x20\xf5\xf2"):
        return "f2fs"
    if at(32768, b"JFS1"):
        return "jfs"
    if at(65536 + 52, b"ReIsEr"):
        return "reiserfs"
    if at(4096 - 10, b"SWAPSPACE2") or at(4096 - 10, b"SWAP-SPACE"):
        return "swap"
    if at(0, b"LUKS\xba\xbe"):
        return "crypto_LUKS"
    if at(1024, b"H+") or at(1024, b"HX"):
        return "hfsplus"
    if at(32769, b"CD001"):
        return "iso9660"
    if at(54, b"FAT1") or at(82, b"FAT32   "):
        return "vfat"
    return ""


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
        self.shift: int | None = segs[0][1] if len(segs) == 1 and segs[0][0] == 0 else None
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


# --------------------------------------------------------------------------
# ISO 9660 layout: descriptors, path tables, each tree's directories

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


# --------------------------------------------------------------------------
# ext2/3/4 layout (TSK does not expose the group descriptors)


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


# --------------------------------------------------------------------------
# The whole disk


class _Cancelled(Exception):
    pass


def map_metadata(
    source: Source,
    *,
    disk: str = "/dev/sda",
    bus: Bus | None = None,
    cancelled: Callable[[], bool] | None = None,
    done_event: bool = True,
    keep: dict | None = None,
) -> MetadataResult:
    """Map ``source`` (a whole disk) from its partition tables and filesystem
    metadata. Returns the entries (whole disk, partitions, LVs, directories,
    files, filesystem structures) and a report per volume; volumes whose
    filesystem TSK cannot read but whose signature names one are marked
    ``method="watch"`` (the caller decides). Publishes ``Progress`` on
    ``bus`` (phase "files", current directory, objects done, rate).
    ``cancelled`` is polled between directories: when it returns True the
    walk stops and ``MetadataError`` is raised. Never raises for bad
    metadata: the volume's report and ``warnings`` say what could not be read.
    ``done_event``: publish the final Progress (phase "done", with the
    summary); a caller that goes on working after this says False.
    ``keep``: a dict that gets, by device, each walked volume's
    ``WalkedVolume`` (what an incremental remap reads again, ``incremental.py``).
    """
    pytsk3 = _import_tsk()
    t0 = time.monotonic()
    progress = _Publisher(bus, t0)
    cancelled = cancelled or (lambda: False)
    result = MetadataResult()
    progress.publish("devices", disk, force=True)
    result.entries.append(BmapEntry(1, 0, source.size, "v", disk))
    volumes, warnings = find_volumes(source, disk)
    result.volumes = volumes
    result.warnings += warnings
    for name, ranges in disk_structures(source, volumes).items():
        result.entries += [BmapEntry(1, s, e, "f", disk, name) for s, e in ranges]
    for v in volumes:
        if v.kind != "v":
            for s, e in v.disk_ranges():
                result.entries.append(BmapEntry(1, s, e, v.kind, v.device))
        if any(d + n > source.size for _, d, n in v.segments):
            result.warnings.append(
                f"{v.device}: ends past the end of the disk ({source.size} bytes; a truncated "
                "image?): what lies beyond cannot be read")
    progress.done = 1 + len(volumes)
    # Every TSK object is made here and used by this call only: calls in
    # several threads at once share nothing.
    for v in volumes:
        report = _map_volume(pytsk3, source, v, result.entries, progress, cancelled,
                             result.journal, keep)
        result.filesystems.append(report)
        if report.warning:
            result.warnings.append(report.warning)
    result.elapsed = time.monotonic() - t0
    if done_event:
        progress.publish("done", "", force=True, summary=result.summary())
    return result


def _map_volume(pytsk3, source: Source, v: Volume, entries: list[BmapEntry],
                progress: _Publisher, cancelled: Callable[[], bool],
                journal: list[BmapEntry] | None = None,
                keep: dict | None = None) -> FilesystemReport:
    if not v.segments:
        return FilesystemReport(v.device, "", "watch" if v.kind == "l" else "none",
                                warning="; ".join(v.notes))
    vsrc = VolumeSource(source, v)
    try:
        signature = probe_signature(vsrc)
    except OSError as e:
        return FilesystemReport(v.device, "", "none", warning=f"{v.device}: cannot be read ({e})")
    if v.type_hint == "LVM2_member" or signature in NOT_FILESYSTEMS:
        return FilesystemReport(v.device, v.type_hint or signature, "none")
    if not signature and v.type_hint in NO_FILESYSTEM:
        return FilesystemReport(v.device, v.type_hint, "none")  # BIOS boot, MS reserved
    if signature in WATCH_ONLY:
        return FilesystemReport(v.device, signature, "watch")
    report = FilesystemReport(v.device, signature, "metadata")
    scan = None
    raw = vsrc
    if signature == "ext4":
        # The walk reads the volume as its committed transactions leave it
        # (jbd2.py): files whose metadata is only in the journal are named.
        scan, copies = ext_journal(pytsk3, vsrc)
        if scan is not None:
            report.journal = scan.summary()
        if copies:
            vsrc = JournalView(vsrc, scan.block_size, copies)
    try:
        img = _volume_img(pytsk3, vsrc)
        fs = pytsk3.FS_Info(img, offset=0)
    except OSError as e:
        if signature == "ntfs":
            fallback = _map_ntfs_without_tsk(v, vsrc, report, entries, progress, cancelled)
            if fallback is not None:
                return fallback
        if not signature:
            report.method = "none"  # nothing there we know of (empty, or unknown)
            if v.kind == "v":
                return report
            report.warning = f"{v.device}: no filesystem TSK can read (and no known signature)"
            return report
        report.method = "none"
        report.warning = f"{v.device}: {signature} filesystem cannot be read: " + (
            str(e).replace("\n", " ").strip()[:160])
        return report
    report.fstype = _tsk_name(pytsk3, int(fs.info.ftype)) or signature
    progress.publish("files", f"{v.device} /", force=True)
    walker = _Filesystem(pytsk3, fs, v, vsrc, report, entries, progress, cancelled)
    if scan is not None and scan.offset_of is not None:
        walker.journal_where = scan.offset_of
    start = len(entries)
    if walker.is_ext or walker.is_fat:
        # A partition bigger than its filesystem: the rest is no one's, and
        # named so (a filesystem grown later, a probe reading the end).
        end = int(fs.info.block_count) * walker.block
        if 0 < end < v.size:
            walker.add("/$BeyondFilesystem", [(end, v.size)])
    try:
        walker.map()
    except _Cancelled:
        del entries[start:]
        raise MetadataError("block-map generation cancelled") from None
    except Exception as e:  # noqa: BLE001 - TSK on bad metadata: keep what was mapped
        walker.error("walk", e)
    if walker.errors:
        report.warning = (f"{v.device}: {report.fstype} partly mapped: {walker.errors} objects "
                          f"could not be read (first: {walker.first_error})")
    if journal is not None and scan is not None and scan.transactions:
        try:
            journal += _journal_owners(scan, raw, v, walker, entries[start:])
        except (OSError, ValueError, IndexError, struct.error) as e:
            report.journal += f"; what it carries not read ({e})"[:160]
    if keep is not None:
        keep[v.device] = WalkedVolume(v, raw, signature, walker, scan,
                                      copies if signature == "ext4" else {})
    return report


@dataclass
class WalkedVolume:
    """One volume as a TSK walk left it: enough to read parts of it again."""

    volume: Volume
    raw: Source  # the volume as the disk holds it (no journal view)
    signature: str
    walker: _Filesystem
    scan: JournalScan | None
    #: home block -> journal copy, as the walk read them (ext3/4)
    copies: dict


def _journal_owners(scan: JournalScan, raw: Source, v: Volume, walker: _Filesystem,
                    walked: list[BmapEntry] | None,
                    owner: Callable[[int], tuple[str, str] | None] | None = None
                    ) -> list[BmapEntry]:
    """For each logged block of the log, whose metadata it carries: the
    journal copy's bytes as entries of its owners. A copy of an inode-table
    block belongs to the files and directories whose inodes it changes
    (compared with the block's previous version: the last copy before it,
    else the home block), split evenly; a directory block to that directory;
    a file's extent-tree block to the file. Bitmaps, descriptors and the
    superblock are no one's: they stay the journal's."""
    layout = Ext4Layout(raw)
    bs = layout.block
    isz = layout.inode_size
    per_block = bs // isz
    tables: dict[int, int] = {}  # first inode-table block -> its group
    table_blocks = -(-layout.inodes_per_group * isz // bs)
    for g in range(layout.groups):
        it = layout.group_desc(g)[2]
        if it:
            tables[it] = g
    firsts = sorted(tables)
    paths: dict[int, tuple[str, str]] = {i: ("f", p) for i, (p, _) in walker.files.items()}
    paths.update((i, ("d", p)) for i, p in walker.dir_paths.items())
    spans = sorted((e.start, e.end, e.type, e.path) for e in walked or () if e.type in "df")
    starts = [sp[0] for sp in spans]
    jruns = walker.journal_where
    previous: dict[int, bytes] = {}
    out: list[BmapEntry] = []

    def owner_at(disk: int) -> tuple[str, str] | None:
        if owner is not None:  # a map's lookup (an incremental remap's)
            return owner(disk)
        i = bisect_right(starts, disk) - 1
        if i >= 0 and spans[i][0] <= disk < spans[i][1] and spans[i][3]:
            return spans[i][2], spans[i][3]
        return None

    for t in scan.transactions:
        for home, jblock, flags in t.blocks:
            if home < 0:
                continue
            at = jruns(jblock)
            owners: list[tuple[str, str]] = []
            i = bisect_right(firsts, home) - 1
            if i >= 0 and home < firsts[i] + table_blocks:
                g = tables[firsts[i]]
                first = g * layout.inodes_per_group + (home - firsts[i]) * per_block + 1
                new = bytearray(read_at(raw, at, bs))
                if flags & 1:  # escaped: its magic back
                    new[0:4] = (0xC03B3998).to_bytes(4, "big")
                old = previous.get(home) or read_at(raw, home * bs, bs)
                previous[home] = bytes(new)
                for k in range(per_block):
                    if new[k * isz:(k + 1) * isz] != old[k * isz:(k + 1) * isz]:
                        who = paths.get(first + k)
                        if who is not None:
                            owners.append(who)
            else:
                disks = v.to_disk(home * bs, home * bs + bs)
                who = owner_at(disks[0][0]) if disks else None
                if who is not None:
                    owners.append(who)
            if not owners:
                continue
            share = bs // len(owners)
            for k, (kind, path) in enumerate(owners):
                lo = at + k * share
                hi = at + bs if k == len(owners) - 1 else lo + share
                for ds, de in v.to_disk(lo, hi):
                    out.append(BmapEntry(1, ds, de, kind, v.device, path))
    return out


def _map_ntfs_without_tsk(v: Volume, vsrc: Source, report: FilesystemReport,
                          entries: list[BmapEntry], progress: _Publisher,
                          cancelled: Callable[[], bool]) -> FilesystemReport | None:
    """An NTFS The Sleuth Kit cannot open (clusters over 64 KiB) through
    libfsntfs and its MFT records (``ntfs.py``); None if that cannot read
    it either (the caller says TSK's error)."""
    try:
        from .ntfs import NtfsLayout, map_ntfs
        layout = NtfsLayout(lambda o, n: read_at(vsrc, o, n))
    except (ImportError, OSError, ValueError, struct.error):
        return None
    start = len(entries)

    def add(path: str, ranges: list[tuple[int, int]], kind: str) -> None:
        if "\n" in path:
            report.skipped += 1
            return
        for s, e in merge_ranges(ranges):
            for ds, de in v.to_disk(s, e):
                entries.append(BmapEntry(1, ds, de, kind, v.device, path))
        progress.done += 1

    def on_object(path: str) -> None:
        progress.publish("files", f"{v.device} {path}")
    try:
        dirs, files, system, warning = map_ntfs(
            lambda o, n: read_at(vsrc, o, n), vsrc.size, add, cancelled, on_object)
    except InterruptedError:
        del entries[start:]
        raise MetadataError("block-map generation cancelled") from None
    except (OSError, ValueError, struct.error) as e:
        del entries[start:]
        report.method = "none"
        report.warning = f"{v.device}: ntfs cannot be read by libfsntfs either: {e}"[:200]
        return report
    report.fstype = "ntfs"
    report.directories, report.files, report.metadata_objects = dirs, files, system
    note = (f"{v.device}: ntfs with {layout.cluster >> 10} KiB clusters, mapped with libfsntfs "
            "(The Sleuth Kit reads clusters up to 64 KiB)")
    report.warning = "; ".join(filter(None, (note, warning)))
    return report


def ext_journal(pytsk3, vsrc: Source) -> tuple[JournalScan | None, dict[int, tuple[int, bool]]]:
    """The scan of an ext3/4 volume's internal journal, and the copies a
    walk reads instead of their home blocks (home block -> (volume offset of
    the copy, escaped)). (None, {}) without a journal, or one that cannot be
    read; never raises for what the volume holds."""
    try:
        layout = Ext4Layout(vsrc)
        if not layout.compat & 0x4:  # has_journal
            return None, {}
        (inum,) = struct.unpack_from("<I", read_at(vsrc, 1024, 1024), 0xE0)
        if inum == 0:
            return JournalScan(note="an external journal: not read"), {}
        bs = layout.block
        fs = pytsk3.FS_Info(_volume_img(pytsk3, vsrc), offset=0)
        journal = fs.open_meta(inode=inum)
        runs: list[tuple[int, int, int]] = []  # (first journal block, first volume block, count)
        for attr in journal:
            if int(attr.info.type) not in _DATA_TYPES:
                continue
            for run in attr:
                if not int(run.flags) & _RUN_SKIP and run.len:
                    runs.append((int(run.offset), int(run.addr), int(run.len)))
        runs.sort()
        firsts = [r[0] for r in runs]
        nblocks = int(journal.info.meta.size) // bs

        def where(n: int) -> int:
            i = bisect_right(firsts, n) - 1
            if i < 0 or n >= runs[i][0] + runs[i][2]:
                raise ValueError(f"journal block {n} is not allocated")
            return (runs[i][1] + n - runs[i][0]) * bs

        scan = scan_journal(lambda n: read_at(vsrc, where(n), bs), nblocks)
        scan.offset_of = where
        copies = {home: (where(jblock), escaped) for home, (jblock, escaped) in scan.replay.items()
                  if home < layout.blocks}
        return scan, copies
    except (OSError, ValueError, IndexError, struct.error) as e:
        return JournalScan(note=f"not read ({' '.join(str(e).split())[:120]})"), {}


def _tsk_name(pytsk3, ftype: int) -> str:
    for name in ("NTFS", "EXT2", "EXT3", "EXT4", "FAT12", "FAT16", "FAT32", "EXFAT", "HFS",
                 "ISO9660", "FFS1", "FFS1B", "FFS2", "APFS", "YAFFS2"):
        if ftype == int(getattr(pytsk3, "TSK_FS_TYPE_" + name)):
            return name.lower()
    return ""
