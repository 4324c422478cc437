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

from ..events import Bus
from ..sources.base import Source
from . import tsk as _tsk
from .ext4 import Ext4Layout
from .format import BmapEntry, merge_ranges
from .jbd2 import JournalScan, JournalView, scan_journal
from .tsk import (
    FilesystemReport,
    MetadataError,
    _Cancelled,
    _Filesystem,
    _import_tsk,
    _Publisher,
    _tsk_name,
    _volume_img,
)
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
    "map_vm",
    "probe_signature",
]

#: filesystems (from their signature) the watch method may read where TSK cannot
WATCH_ONLY = frozenset({"xfs", "btrfs", "f2fs", "jfs", "reiserfs", "nilfs2", "bcachefs", "ufs2"})
#: not filesystems: nothing to map inside
NOT_FILESYSTEMS = frozenset({"swap", "LVM2_member", "crypto_LUKS", "extended"})




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
# The whole disk



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


def map_vm(
    source: Source,
    disks: list[tuple[str, int, int]],
    *,
    bus: Bus | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> MetadataResult:
    """The disks of a VM mapped together (``vm.py``): ``source`` is their
    ``DiskSet``, ``disks`` each one's (device, base, size) in it. As
    ``map_metadata``, but volumes may span disks (an LVM volume group, an
    md array), and the entries come back on their own disk (the first
    field, from 1) at that disk's offsets. Each report's ``disks`` says
    which disks its volume is on. Never raises for bad metadata."""
    from .vm import disk_of, find_vm_volumes, split_by_disk
    pytsk3 = _import_tsk()
    t0 = time.monotonic()
    progress = _Publisher(bus, t0)
    cancelled = cancelled or (lambda: False)
    result = MetadataResult()
    progress.publish("devices", ", ".join(d for d, _, _ in disks), force=True)
    entries = result.entries
    for device, base, size in disks:
        entries.append(BmapEntry(1, base, base + size, "v", device))
    volumes, warnings, structures = find_vm_volumes(source, disks)
    result.volumes = volumes
    result.warnings += warnings
    for (device, _, _), (base, found) in zip(disks, structures, strict=True):
        for name, ranges in found.items():
            entries += [BmapEntry(1, base + s, base + e, "f", device, name) for s, e in ranges]
    for v in volumes:
        if v.kind != "v":
            entries += [BmapEntry(1, s, e, v.kind, v.device) for s, e in v.disk_ranges()]
    progress.done = len(disks) + len(volumes)
    for v in volumes:
        report = _map_volume(pytsk3, source, v, entries, progress, cancelled, None, None)
        report.disks = disk_of(v, disks)
        result.filesystems.append(report)
        if report.warning:
            result.warnings.append(report.warning)
    result.entries = split_by_disk(entries, disks)
    result.elapsed = time.monotonic() - t0
    return result


def _map_volume(pytsk3, source: Source, v: Volume, entries: list[BmapEntry],
                progress: _Publisher, cancelled: Callable[[], bool],
                journal: list[BmapEntry] | None = None,
                keep: dict | None = None) -> FilesystemReport:
    if not v.segments:
        return FilesystemReport(v.device, "", "watch" if v.kind == "l" else "none",
                                warning="; ".join(v.notes))
    if v.type_hint == "luks-payload":
        return FilesystemReport(v.device, "encrypted (LUKS): no key, one object", "none")
    if v.type_hint == "linux_raid_member":
        return FilesystemReport(v.device, v.type_hint, "none")
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
            if int(attr.info.type) not in _tsk._DATA_TYPES:
                continue
            for run in attr:
                if not int(run.flags) & _tsk._RUN_SKIP and run.len:
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
