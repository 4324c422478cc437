"""Incremental remaps: read again only what the guest's writes changed.

A remap that walks every directory costs what the disk holds (1.5 s for
100,000 files, several seconds for a Windows disk's 500,000), however
little the guest changed. The mapper process (``worker.py``) keeps what its
last walk found (``MapperState``: the walk's entries and, per volume, the
TSK walker's ``files``, ``dir_paths`` and directory listings) and the
session hands it the byte ranges the guest wrote to named structures since
the last remap. Those ranges say what to read again:

==========================  =============================================
written                     read again
==========================  =============================================
a directory's blocks        the directory: its entries are listed again,
                            new names are added (a new directory is walked
                            whole), gone names removed (a directory with
                            its subtree); its own inode
ext4 ``/$InodeTable``       the inodes in the written bytes that name a
                            file or directory already known (a new inode
                            is named by its directory's entry)
ext4 ``PATH:$extents``      the file whose extent tree it is
ext4 ``/$Journal``          the journal, scanned again: every home block a
                            committed transaction logged is taken as
                            written (the walk reads through the journal:
                            ``jbd2.py``), so a file is known before the
                            checkpoint writes its inode home
NTFS ``/$MFT``              the records in the written bytes (a directory's
                            record: the directory too, its small index is
                            resident)
ext4 ``/$Superblock``,      nothing, unless the geometry changed (a resize,
``/$GroupDescriptors``      a new filesystem): then the whole walk
file data, bitmaps, FATs    nothing (a FAT file's size and first cluster are
                            in its directory entry: its directory is
                            written too, and every file of a FAT directory
                            listed again is read again)
a partition's unnamed       nothing, unless the partition's signature
bytes                       changed (a new filesystem made on it): the
                            whole walk
partition tables, LVM       the whole walk
metadata, a disk's gaps
==========================  =============================================

Anything it cannot follow (a filesystem The Sleuth Kit did not walk, a
geometry change, a directory that cannot be listed twice in a row) makes
the whole walk, and the answer says why. A directory caught mid-update
(unreadable now) keeps its old entries and is read again next time.

What is not followed: a second name (hard link) of a file whose first
name is removed is named again only by a whole walk (``m``).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import compress

from .ext4 import Ext4Layout
from .format import BmapEntry, merge_ranges
from .index import BlockMap, BmapObject
from .jbd2 import JournalView
from .metadata import WalkedVolume, ext_journal, probe_signature
from .tsk import _volume_img

__all__ = ["MapperState", "NeedsFullWalk", "Update"]

#: directories that could not be listed, carried to the next update, at most
PENDING_KEPT = 4096
#: times a directory that cannot be listed is tried again at the next
#: updates, at most: one deleted since (its inode freed, its parent not
#: listed again yet) would be tried, and told, at every remap forever
PENDING_TRIES = 3
#: dirty ranges one update takes (the session keeps fewer)
DIRTY_KEPT = 1 << 16

_IGNORED_STRUCTURES = frozenset((
    "/$BlockBitmap", "/$InodeBitmap", "/$BootSector", "/$FAT1", "/$FAT2",
    "/$VolumeDescriptors", "/$PathTable"))


@dataclass
class Update:
    """What one incremental update did."""

    journal: list[BmapEntry]
    blockmap: BlockMap
    added: list = field(default_factory=list)  # objects (type, device, path)
    removed: list = field(default_factory=list)
    changed: int = 0
    dirs: int = 0  # directories listed again
    inodes: int = 0  # inodes / MFT records read again
    journals: int = 0  # journals scanned again
    warnings: list[str] = field(default_factory=list)
    #: the map is the one before (what the journal carries may differ)
    same: bool = False
    #: the patch: objects whose ranges went, ranges added (``BlockMap.patched``)
    gone: set = field(default_factory=set)
    fresh: list = field(default_factory=list)
    journal_changed: bool = False


class NeedsFullWalk(Exception):
    """The whole walk is needed: the reason."""


@dataclass
class _Work:
    dirs: set[int] = field(default_factory=set)
    inodes: set[int] = field(default_factory=set)
    journal: bool = False
    geometry: bool = False


class MapperState:
    """What the last walk found, kept in the mapper process for updates."""

    def __init__(self, pytsk3, source, meta, walked: dict[str, WalkedVolume],
                 blockmap: BlockMap) -> None:
        self.tsk = pytsk3
        self.source = source
        self.journal: list[BmapEntry] = meta.journal
        self.walked = walked
        self.blockmap = blockmap
        self.pvs = {f.device for f in meta.filesystems if f.fstype == "LVM2_member"}
        self.volumes = {v.device: v for v in meta.volumes}
        self.signatures = {f.device: f.fstype for f in meta.filesystems}
        self._probed: set[str] = set()  # this update's
        self._inode_of: dict[str, dict[str, int]] = {}
        self._records: dict[str, Callable[[int, int], range]] = {}
        self._geometry: dict[str, tuple] = {}
        for dev, w in walked.items():
            if w.walker.is_ext:
                try:
                    self._geometry[dev] = _ext_geometry(Ext4Layout(w.raw))
                except (OSError, ValueError, struct.error):
                    pass
        self.pending: dict[str, set[int]] = {}
        self._tries: dict[tuple[str, int], int] = {}  # (device, directory) -> tries failed

    # --- what the written bytes are ---

    def _classify(self, dirty: list[tuple[int, int]]) -> dict[str, _Work]:
        work: dict[str, _Work] = {}
        lookup = self.blockmap.lookup
        for s, e in merge_ranges(dirty):
            for ps, pe, obj in lookup(s, e - s):
                self._classify_piece(ps, pe, obj, work)
        for dev, dirs in self.pending.items():
            work.setdefault(dev, _Work()).dirs |= dirs
        self.pending = {}
        return work

    def _classify_piece(self, ps: int, pe: int, obj, work: dict[str, _Work]) -> None:
        if obj is None or (obj.type == "v" and obj.device not in self.walked):
            raise NeedsFullWalk("a write outside every partition (a partition table, a disk's gap)")
        dev = obj.device
        w = self.walked.get(dev)
        if obj.type in "vpl":
            if dev in self.pvs and obj.type == "p":
                raise NeedsFullWalk(f"LVM metadata on {dev} written")
            if w is None and dev not in self._probed:
                # A new filesystem made on a partition the walk found none
                # (or another method's) on: its signature says so.
                self._probed.add(dev)
                vol = self.volumes.get(dev)
                if vol is not None and vol.segments:
                    from .volumes import VolumeSource
                    try:
                        now = probe_signature(VolumeSource(self.source, vol))
                    except OSError:
                        now = ""
                    if now and now != self.signatures.get(dev, ""):
                        raise NeedsFullWalk(f"a new {now} filesystem on {dev}")
            return
        if obj.type == "f" and self.volumes.get(dev) is None and obj.is_structure:
            raise NeedsFullWalk("the partition table written")
        if w is None:
            if obj.type == "d" or obj.is_structure:
                raise NeedsFullWalk(f"{dev}'s structures written (not walked by The Sleuth Kit)")
            return
        path = obj.path or ""
        job = work.setdefault(dev, _Work())
        if obj.type == "d":
            inode = self._inode(dev, path, w)
            if inode is not None:
                job.dirs.add(inode)
            return
        if path.endswith(":$extents"):
            inode = self._inode(dev, path[:-len(":$extents")], w)
            if inode is not None:
                job.inodes.add(inode)
            return
        if path == "/$InodeTable" or (path == "/$MFT" and w.walker.is_ntfs):
            job.inodes.update(self._records_in(dev, w, ps, pe))
        elif path == "/$Journal" and w.walker.is_ext:
            job.journal = True
        elif path in ("/$Superblock", "/$GroupDescriptors"):
            job.geometry = True

    def _inode(self, dev: str, path: str, w: WalkedVolume) -> int | None:
        index = self._inode_of.get(dev)
        if index is None:
            index = {p: i for i, (p, _) in w.walker.files.items()}
            index.update((p, i) for i, p in w.walker.dir_paths.items())
            self._inode_of[dev] = index
        return index.get(path)

    def _records_in(self, dev: str, w: WalkedVolume, start: int, end: int) -> range:
        """Inode (or MFT record) numbers whose bytes lie in the disk range."""
        locate = self._records.get(dev)
        if locate is None:
            locate = self._records[dev] = _record_index(w)
        vol = w.volume
        out: list[int] = []
        for vs, ds, n in vol.all_segments():  # a mirror's copy too
            lo, hi = max(start, ds), min(end, ds + n)
            if lo < hi:
                out.extend(locate(lo - ds + vs, hi - ds + vs))
        return out  # type: ignore[return-value]

    # --- the update ---

    def update(self, dirty: list[tuple[int, int]], cancelled: Callable[[], bool]) -> Update:
        """Read again what ``dirty`` (disk byte ranges written) names; raises
        ``NeedsFullWalk`` (its text: why) when only the whole walk can follow."""
        self._probed = set()
        work = self._classify(dirty[:DIRTY_KEPT])
        up = Update([], self.blockmap)
        touched: set[tuple[str, str]] = set()
        fresh: list[BmapEntry] = []
        journals: dict[str, list[BmapEntry]] = {}
        for dev, job in work.items():
            if cancelled():
                raise NeedsFullWalk("cancelled")
            w = self.walked[dev]
            self._update_volume(dev, w, job, up, touched, fresh, journals)
        if not touched:
            up.same = True
            if journals:
                self._swap_journal(up, journals)
            else:
                up.journal = self.journal
            return up
        old = self.blockmap
        interned = old._interned
        gone = {o for dev, path in touched for t in "fd"
                if (o := interned.get((t, dev, path))) is not None}
        drop = list(map(gone.__contains__, old._entry_objs))
        old_ranges: dict = {}
        for s, e, o in compress(zip(old._entry_starts, old._entry_ends, old._entry_objs, strict=True),
                                drop):
            old_ranges.setdefault(o, []).append((s, e))
        new_ranges: dict = {}
        for e in fresh:
            new_ranges.setdefault((e.type, e.device, e.path), []).append((e.start, e.end))
        up.added = sorted(k for k in new_ranges if k not in interned)
        up.removed = sorted(tuple(o) for o in gone if tuple(o) not in new_ranges)
        up.changed = sum(1 for k, r in new_ranges.items()
                         if k in old_ranges and sorted(old_ranges[k]) != sorted(r))
        if journals:
            self._swap_journal(up, journals)
        else:
            up.journal = self.journal
        up.gone = gone
        up.fresh = [(e.start, e.end, BmapObject(e.type, e.device, e.path)) for e in fresh]
        up.blockmap = self.blockmap = old.patched(gone, up.fresh)
        return up

    def _swap_journal(self, up: Update, journals: dict) -> None:
        up.journal = [e for e in self.journal if e.device not in journals]
        for entries in journals.values():
            up.journal += entries
        up.journal_changed = up.journal != self.journal
        self.journal = up.journal

    def _update_volume(self, dev: str, w: WalkedVolume, job: _Work, up: Update,
                       touched: set, fresh: list, journals: dict) -> None:
        walker = w.walker
        if job.geometry and dev in self._geometry:
            try:
                now = _ext_geometry(Ext4Layout(w.raw))
            except (OSError, ValueError, struct.error):
                now = None
            if now != self._geometry[dev]:
                raise NeedsFullWalk(f"{dev}'s filesystem geometry changed")
        vsrc = w.raw
        if walker.is_ext and w.scan is not None:
            if job.journal or job.dirs or job.inodes:
                scan, copies = ext_journal(self.tsk, w.raw)
                up.journals += 1
                # Every home block whose latest committed copy is new: its
                # content changed (what the checkpoint will write home).
                for home, copy in copies.items():
                    if w.copies.get(home) != copy:
                        bs = scan.block_size
                        for ds, de in w.volume.to_disk(home * bs, home * bs + bs):
                            for ps, pe, obj in self.blockmap.lookup(ds, de - ds):
                                if obj is not None and obj.device == dev and obj.type in "fd":
                                    self._classify_piece(ps, pe, obj, {dev: job})
                w.scan, w.copies = scan, copies
                if copies and scan is not None:
                    vsrc = JournalView(w.raw, scan.block_size, copies)
            elif w.copies and w.scan is not None:
                vsrc = JournalView(w.raw, w.scan.block_size, w.copies)
        if not (job.dirs or job.inodes) and not job.journal:
            return
        # A fresh TSK handle: its caches hold the disk as it was.
        try:
            walker.fs = self.tsk.FS_Info(_volume_img(self.tsk, vsrc), offset=0)
        except OSError as e:
            raise NeedsFullWalk(
                f"{dev} cannot be opened again ({' '.join(str(e).split())[:100]})") from None
        walker.vsrc = vsrc
        walker._locator_ready = False
        walker.errors, walker.first_error = 0, ""
        walker.entries = out = []
        reread: set[int] = set()
        # A directory's inode or record written: its entries may have
        # changed (NTFS keeps a small index in the record), listed again.
        job.dirs |= {k for k in job.inodes if k in walker.dir_paths}
        dirs = [d for d in job.dirs if d in walker.dir_paths]
        listings: dict[int, list] = {}
        for d in dirs:
            if d not in walker.dir_paths:
                continue  # below a directory found deleted just now
            old = walker.children.get(d, [])
            new = walker.list_dir(d, walker.dir_paths[d])
            if new is None:
                walker.children[d] = old
                if len(self._tries) >= PENDING_KEPT:
                    self._tries.clear()
                tries = self._tries[dev, d] = self._tries.get((dev, d), 0) + 1
                if _unallocated(self.tsk, walker, d):
                    # Deleted (its inode is free): gone from the map with
                    # what was below it, not an error to tell at every remap
                    # (its parent, listed before it went, may not be again).
                    self._remove(walker, d, int(self.tsk.TSK_FS_META_TYPE_DIR),
                                 walker.dir_paths[d], touched, dev)
                    walker.errors = max(0, walker.errors - 1)
                    self._tries.pop((dev, d), None)
                    continue
                pending = self.pending.setdefault(dev, set())
                if len(pending) < PENDING_KEPT and tries <= PENDING_TRIES:
                    pending.add(d)
                continue
            self._tries.pop((dev, d), None)
            listings[d] = old
            up.dirs += 1
        # Removals first (a directory moved away and back is walked again).
        additions: list[tuple[int, str, bytes, int, int]] = []
        for d, old in listings.items():
            path = walker.dir_paths.get(d)
            if path is None:
                continue  # removed with a subtree meanwhile
            was = {raw: (addr, mtype) for raw, addr, mtype in old}
            now = {raw: (addr, mtype) for raw, addr, mtype in walker.children[d]}
            prefix = path if path.endswith("/") else path + "/"
            for raw, (addr, mtype) in was.items():
                if now.get(raw) != (addr, mtype):
                    self._remove(walker, addr, mtype, prefix + _name(raw), touched, dev)
            for raw, (addr, mtype) in now.items():
                if was.get(raw) != (addr, mtype):
                    additions.append((d, prefix + _name(raw), raw, addr, mtype))
            reread.add(d)
        tsk = self.tsk
        dir_type, reg_type = int(tsk.TSK_FS_META_TYPE_DIR), int(tsk.TSK_FS_META_TYPE_REG)
        for _, child, _raw, addr, mtype in additions:
            if mtype == dir_type and addr not in walker.seen_dirs:
                walker.seen_dirs.add(addr)
                try:
                    walker.add_object(addr, child, is_dir=True)
                except (OSError, RuntimeError) as e:
                    walker.error(child, e)
                    continue
                before, before_dirs = set(walker.files), set(walker.dir_paths)
                walker.walk([(addr, child)])
                for k in set(walker.files) - before:
                    self._emit_file(walker, k, touched, dev)
                    reread.add(k)
                for k in set(walker.dir_paths) - before_dirs:
                    touched.add((dev, walker.dir_paths[k]))
                    reread.add(k)
                touched.add((dev, child))
                reread.add(addr)
            elif mtype == reg_type:
                known = walker.files.get(addr)
                if known is not None and known[0] <= child:
                    continue  # a second name: the smallest path names it
                if known is not None:
                    self._drop_file(walker, addr, touched, dev)
                try:
                    walker.add_object(addr, child, is_dir=False)
                except (OSError, RuntimeError) as e:
                    walker.error(child, e)
                    continue
                self._emit_file(walker, addr, touched, dev)
                reread.add(addr)
        for d in list(listings):
            path = walker.dir_paths.get(d)
            if path is not None:
                self._reread_dir(walker, d, path, touched, dev)
        if walker.is_fat:
            # A FAT file's size and first cluster are in its directory entry,
            # which TSK's listing does not compare: every file of a directory
            # written is read again (FAT directories are small).
            for d in listings:
                for _raw, addr, mtype in walker.children.get(d, ()):
                    if mtype == reg_type and addr in walker.files:
                        job.inodes.add(addr)
        for k in job.inodes:
            if k in reread:
                continue
            reread.add(k)
            if k in walker.files:
                path = walker.files[k][0]
                old = walker.files[k]
                try:
                    walker.add_object(k, path, is_dir=False)
                except (OSError, RuntimeError) as e:
                    walker.files[k] = old
                    walker.error(path, e)
                    continue
                for suffix, _ in old[1]:
                    touched.add((dev, path + suffix))
                self._emit_file(walker, k, touched, dev)
                up.inodes += 1
        fresh += out
        index = self._inode_of.get(dev)
        if index is not None:  # names gone stay: their inodes are checked where used
            for k in reread:
                p = walker.dir_paths.get(k) or (walker.files.get(k) or (None,))[0]
                if p is not None:
                    index[p] = k
        if walker.errors:
            up.warnings.append(f"{dev}: {walker.errors} objects could not be read again "
                               f"(first: {walker.first_error}); they keep their old names")
        if walker.is_ext and w.scan is not None and w.scan.transactions:
            from .metadata import _journal_owners
            fresh_at = sorted((e.start, e.end, e.type, e.path) for e in out if e.type in "df")
            starts = [f[0] for f in fresh_at]
            first = self.blockmap.first

            def owner(disk: int) -> tuple[str, str] | None:
                i = bisect_right(starts, disk) - 1
                if i >= 0 and fresh_at[i][1] > disk:
                    return fresh_at[i][2], fresh_at[i][3]
                o = first(disk, 1)
                if o is None or o.type not in "df" or o.device != dev or not o.path \
                        or (dev, o.path) in touched:
                    return None
                return o.type, o.path
            try:
                journals[dev] = _journal_owners(w.scan, w.raw, w.volume, walker, None, owner)
            except (OSError, ValueError, IndexError, struct.error):
                pass

    def _reread_dir(self, walker, inode: int, path: str, touched: set, dev: str) -> None:
        start = len(walker.entries)
        try:
            walker.add_object(inode, path, is_dir=True)
        except (OSError, RuntimeError) as e:
            walker.error(path, e)
            return
        walker.report.directories -= 1  # counted once, by the walk
        touched.add((dev, path))
        touched.add((dev, path + ":$extents"))
        for e in walker.entries[start:]:
            touched.add((dev, e.path))

    def _emit_file(self, walker, inode: int, touched: set, dev: str) -> None:
        path, pieces = walker.files[inode]
        for suffix, ranges in pieces:
            touched.add((dev, path + suffix))
            walker.add(path + suffix, ranges)

    def _drop_file(self, walker, inode: int, touched: set, dev: str) -> None:
        known = walker.files.pop(inode, None)
        if known is not None:
            for suffix, _ in known[1]:
                touched.add((dev, known[0] + suffix))

    def _remove(self, walker, addr: int, mtype: int, path: str, touched: set, dev: str) -> None:
        """A name gone from its directory: its file, or a directory and everything below."""
        if mtype == int(self.tsk.TSK_FS_META_TYPE_DIR):
            if walker.dir_paths.get(addr) != path:
                return
            stack = [addr]
            while stack:
                d = stack.pop()
                dpath = walker.dir_paths.pop(d, None)
                walker.seen_dirs.discard(d)
                if dpath is not None:
                    touched.add((dev, dpath))
                    touched.add((dev, dpath + ":$extents"))
                for _raw, a, t in walker.children.pop(d, []):
                    if t == int(self.tsk.TSK_FS_META_TYPE_DIR):
                        stack.append(a)
                    elif a in walker.files and dpath is not None and \
                            walker.files[a][0].startswith(dpath.rstrip("/") + "/"):
                        self._drop_file(walker, a, touched, dev)
        elif addr in walker.files and walker.files[addr][0] == path:
            self._drop_file(walker, addr, touched, dev)


def _unallocated(tsk, walker, inode: int) -> bool:
    """The directory's inode (MFT record) is free now, or no directory any
    more (freed and used again): the directory was deleted."""
    try:
        meta = walker.fs.open_meta(inode=inode).info.meta
        return (meta is None or bool(int(meta.flags) & int(tsk.TSK_FS_META_FLAG_UNALLOC))
                or int(meta.type) != int(tsk.TSK_FS_META_TYPE_DIR))
    except (OSError, RuntimeError, AttributeError):
        return False


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _ext_geometry(layout: Ext4Layout) -> tuple:
    tables = tuple(layout.group_desc(g)[2] for g in range(layout.groups))
    return (layout.block, layout.blocks, layout.inodes_per_group, layout.inode_size,
            layout.groups, tables)


def _record_index(w: WalkedVolume) -> Callable[[int, int], list[int]]:
    """Volume byte range -> the inode (ext) or MFT record (NTFS) numbers in it."""
    walker = w.walker
    if walker.is_ext:
        layout = Ext4Layout(w.raw)
        bs, isz, ipg = layout.block, layout.inode_size, layout.inodes_per_group
        table_bytes = -(-ipg * isz // bs) * bs
        tables = sorted((layout.group_desc(g)[2] * bs, g) for g in range(layout.groups)
                        if layout.group_desc(g)[2])
        starts = [t for t, _ in tables]

        def ext(lo: int, hi: int) -> list[int]:
            out = []
            i = max(bisect_right(starts, lo) - 1, 0)
            while i < len(tables) and tables[i][0] < hi:
                t, g = tables[i]
                a, b = max(lo, t), min(hi, t + table_bytes)
                if a < b:
                    first, last = (a - t) // isz, min((b - 1 - t) // isz, ipg - 1)
                    out.extend(range(g * ipg + first + 1, g * ipg + last + 2))
                i += 1
            return out
        return ext
    if walker.is_ntfs:
        from .volumes import read_at
        boot = read_at(w.raw, 0, 512)
        bps, spc = struct.unpack_from("<HB", boot, 11)
        (cpr,) = struct.unpack_from("<b", boot, 0x40)
        rec = cpr * bps * spc if cpr > 0 else 1 << -cpr
        runs: list[tuple[int, int, int]] = []  # (volume start, length, first record byte)
        mft = walker.fs.open_meta(inode=0)
        pos = 0
        for attr in mft:
            if int(attr.info.type) == int(walker.tsk.TSK_FS_ATTR_TYPE_NTFS_DATA) \
                    and not attr.info.name:
                runs, pos = [], 0
                for r in attr:
                    runs.append((r.addr * walker.block, r.len * walker.block, pos))
                    pos += r.len * walker.block

        def ntfs(lo: int, hi: int) -> list[int]:
            out: list[int] = []
            for start, length, first in runs:
                a, b = max(lo, start), min(hi, start + length)
                if a < b:
                    out.extend(range((first + a - start) // rec, (first + b - 1 - start) // rec + 1))
            return out
        return ntfs
    return lambda lo, hi: []
