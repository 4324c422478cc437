"""Make a block map by either method, or both: ``diskwatch bmap --method``.

- ``metadata``: partition tables, LVM metadata and filesystem structures
  read through the source (``metadata.py``). Exact, no appliance, a second or
  two. Filesystems The Sleuth Kit cannot read (xfs, btrfs, ...) are left
  unmapped, with a warning.
- ``watch``: virt-bmap's way (``generate.py``): a libguestfs appliance reads
  every object through diskwatch's own server. Refuses NTFS.
- ``auto`` (the default): metadata wherever it can, and the watch method for
  the filesystems it cannot read (and LVs that are not linear), in the same
  run. Without libguestfs those are left unmapped, with a warning saying why.

The map's header comment says which method mapped which filesystem.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..errors import DiskwatchError
from ..events import Bus, Message, Progress
from ..files import check_output_path, replace_atomically
from ..sources.base import Source
from ..units import count
from .format import BmapEntry, device_name, parse_bmap, write_bmap

__all__ = ["METHODS", "MakeResult", "make_bmap"]

METHODS = ("auto", "metadata", "watch")


@dataclass
class MakeResult:
    out_path: str
    method: str
    entries: int = 0
    #: device -> "metadata", "watch", "none (why)"
    methods: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    objects: int = 0
    directories: int = 0
    files: int = 0
    structures: int = 0  # named filesystem structures ($MFT, $Journal, $FAT1...)
    elapsed: float = 0.0
    summary: str = ""
    #: the map as written, indexed (None when the watch method added to it:
    #: then the file is the map)
    blockmap: object = None
    #: the other disks' maps (``make_bmap``'s ``more``), in order
    more: list = field(default_factory=list)


def _mapped_by_metadata(f, result: MakeResult, header: list[str]) -> None:
    """A filesystem the metadata walk mapped: counted, and said in the header."""
    result.methods[f.device] = "metadata"
    result.directories += f.directories
    result.files += f.files
    result.structures += f.metadata_objects
    header.append(f"{f.device} {f.fstype}: metadata (The Sleuth Kit): {f.directories} "
                  f"directories, {f.files} files, {f.metadata_objects} structures"
                  + (f"; {f.warning}" if f.warning else ""))


def _vm_job(source: Source, more: tuple, bus, limits):
    """The VM's disks mapped together, in one mapper process (``vm.py``):
    a volume group or an md array may span them. Its reads are served from
    the disks end to end (``DiskSet``); its answer has a map per disk."""
    from .vm import DiskSet
    from .worker import MapperFailed, run_mapper
    disks = DiskSet([source, *more])
    names = [device_name(k) for k in range(1, len(disks.disks) + 1)]
    job = {"kind": "vm", "disks": [[n, d.size] for n, d in zip(names, disks.disks, strict=True)],
           "text": True}
    try:
        return run_mapper(disks, job, bus=bus, limits=limits)
    except MapperFailed as e:
        raise DiskwatchError(f"block map of the VM's {len(names)} disks: {e}") from None


def make_bmap(
    source: Source,
    out_path: str | os.PathLike[str],
    *,
    method: str = "auto",
    bus: Bus | None = None,
    accel: str = "auto",
    verbose: bool = False,
    limits=None,
    more: tuple = (),
) -> MakeResult:
    """Map ``source`` (a whole disk) by ``method`` and write the map to
    ``out_path`` (whole, then renamed). Progress and warnings go to ``bus``.
    ``more``: the VM's other disks (/dev/sdb, ...), mapped by metadata with
    the first, together (an LVM volume group or an md array may span them:
    ``vm.py``), into the same file with their disk index (2, ...);
    ``result.more`` holds their maps."""
    if method not in METHODS:
        raise DiskwatchError(f"unknown block-map method {method!r}: use auto, metadata or watch")
    out_path = os.fspath(out_path)
    check_output_path(out_path)  # said now, not after the mapping
    t0 = time.monotonic()
    result = MakeResult(out_path, method)

    def say(text: str, level: str = "info") -> None:
        if bus is not None:
            bus.publish(Message(text, level=level))

    if method == "watch":
        from .generate import generate_bmap

        res = generate_bmap(source, out_path, bus=bus, accel=accel, verbose=verbose)
        result.entries, result.objects = res.entries, res.objects
        result.elapsed = time.monotonic() - t0
        result.summary = res.summary()
        return result

    from .metadata import FilesystemReport
    from .worker import MapperFailed, run_mapper

    # The walk runs in the mapper's own process (worker.py): it answers the
    # map resolved (a BlockMap for the session, no second parse) and its
    # lines (written to the file as they are, unless the watch method adds
    # entries).
    if more:
        answer = _vm_job(source, more, bus, limits)
    else:
        try:
            answer = run_mapper(source, {"disk": "/dev/sda", "text": True}, bus=bus,
                                limits=limits)
        except MapperFailed as e:
            raise DiskwatchError(f"block map of {source.description or 'the disk'}: {e}") from None
    info = answer.info
    if len(answer.more) != len(more):
        raise DiskwatchError("block map: the mapper's answer is malformed")
    try:
        filesystems = [FilesystemReport(**f) for f in info["filesystems"]]
        warnings = [str(w) for w in info["warnings"]]
        result.objects = int(info["objects"])
    except (KeyError, TypeError, ValueError):
        raise DiskwatchError("block map: the mapper's answer is malformed") from None
    body: bytes | None = answer.text
    entries: list[BmapEntry] = []
    result.warnings += warnings
    for w in warnings:
        say(f"bmap: {w}", "warning")
    header = [f"diskwatch block map of {source.description or 'a disk'} ({source.size} bytes), "
              f"method {method}"]
    for k, other in enumerate(more, 2):
        header.append(f"disk {k} {device_name(k)}: {other.description or 'a disk'} "
                      f"({other.size} bytes)")
    # The watch method serves the first disk only (its appliance names it
    # /dev/sda): a volume on another disk, or across disks, is not its.
    watch = {f.device: f for f in filesystems if f.method == "watch" and set(f.disks) <= {1}}
    for f in filesystems:
        if f.method == "watch" and f.device not in watch:
            why = (f"{f.device} {f.fstype or 'LV'}: not mapped: the watch method maps the "
                   "first disk only")
            result.methods[f.device] = "none"
            result.warnings.append(why)
            header.append(why)
            say(f"bmap: {why}", "warning")
    for f in filesystems:
        if f.method == "metadata":
            _mapped_by_metadata(f, result, header)
        elif f.method == "none" and f.fstype:
            result.methods[f.device] = f"none ({f.fstype})"
            header.append(f"{f.device} {f.fstype}: nothing to map"
                          + (f"; {f.warning}" if f.warning else ""))
        elif f.method == "none" and f.warning:
            result.methods[f.device] = "none"
            header.append(f"{f.device}: not mapped: {f.warning}")
    if watch and method == "metadata":
        for dev, f in watch.items():
            why = (f"{dev} {f.fstype or 'LV'}: not mapped: the metadata method cannot read it "
                   "(--method auto maps it with libguestfs)")
            result.methods[dev] = "none"
            result.warnings.append(why)
            header.append(why)
            say(f"bmap: {why}", "warning")
    elif watch:
        from .generate import GenerateError, guestfs_problem, watch_entries

        problem = guestfs_problem()
        if problem:
            for dev, f in watch.items():
                why = f"{dev} {f.fstype or 'LV'}: not mapped: the watch method needs libguestfs: {problem}"
                result.methods[dev] = "none"
                result.warnings.append(why)
                header.append(why)
                say(f"bmap: {why}", "warning")
        else:
            say("bmap: watch method for " + ", ".join(
                f"{d} ({f.fstype or 'LV'})" for d, f in watch.items()))
            try:
                watched, res = watch_entries(source, set(watch), bus=bus, accel=accel,
                                          verbose=verbose)
            except GenerateError as e:
                for dev in watch:
                    result.methods[dev] = "none"
                    header.append(f"{dev}: not mapped: the watch method failed: {e}")
                result.warnings.append(f"the watch method failed: {e}")
                say(f"bmap: the watch method failed: {e}", "warning")
            else:
                entries = parse_bmap(body.splitlines(keepends=True), "<mapper>") + watched
                body = None
                result.objects += res.directories + res.files
                result.directories += res.directories
                result.files += res.files
                skipped = {s.device for s in res.skipped if s.kind == "filesystem"}
                for dev, f in watch.items():
                    done = dev not in skipped
                    result.methods[dev] = "watch" if done else "none"
                    header.append(f"{dev} {f.fstype or 'LV'}: "
                                  + (f"watch (libguestfs appliance, {res.accel})" if done
                                     else "not mapped (the watch method could not mount it)"))
                for s in res.skipped:
                    result.warnings.append(f"skipped {s.kind} {s.device} {s.path}: {s.reason}")
    header.append("names starting with $ in a filesystem's root are its structures: NTFS's own "
                  "system files; for ext2/3/4 and FAT diskwatch's names ($Journal, $InodeTable, "
                  "$FAT1...); PATH:STREAM is a named data stream, PATH:$extents a file's "
                  "extent-tree blocks")
    # Whole, then renamed over the name, never through a planted link (files.py).
    with replace_atomically(out_path) as f:
        if body is not None:
            write_bmap(f, (), header=header)
            f.write(body)
            result.blockmap = answer.blockmap
            result.entries = len(answer.blockmap)
        else:
            write_bmap(f, entries, header=header)
            result.entries = len(entries)  # every disk's lines
    if more:
        result.more = list(answer.more)
        if body is not None:
            result.entries += sum(len(m) for m in answer.more)
    result.elapsed = time.monotonic() - t0
    rate = result.objects / result.elapsed if result.elapsed > 0 else 0.0
    by = ", ".join(f"{d} {m}" for d, m in result.methods.items())
    result.summary = (f"{count(result.directories, 'directory', 'directories')}, "
                      f"{count(result.files, 'file')}, "
                      f"{count(result.structures, 'filesystem structure')} "
                      f"({count(result.objects, 'object')}); "
                      f"{count(result.entries, 'range')} written to {out_path} in {result.elapsed:.2f} s "
                      f"({rate:.0f} objects/s; {by})")
    if bus is not None:
        bus.publish(Progress("done", "", result.objects, result.objects, rate, result.elapsed,
                             result.summary))
    return result
