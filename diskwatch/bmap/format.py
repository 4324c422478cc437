"""Read and write block maps in virt-bmap's text format.

One line per range::

    DISK START END TYPE DEVICE [PATH]

``DISK`` is decimal (1 = first disk), ``START`` and ``END`` are hex (virt-bmap
prints them bare, ``1 541000 541400 d /dev/sda1 /``; a ``0x`` prefix is
accepted too), ``END`` is exclusive, ``TYPE`` is one of ``v p l d f`` and
``PATH`` (only for ``d`` and ``f``) is everything after ``DEVICE`` and its one
separating space, so it may hold spaces.

virt-bmap printed each line as ``"1 %" PRIx64 " %" PRIx64 " %s\\n"`` with the
object string already containing ``TYPE DEVICE [PATH]``, and it read ranges
back with ``sscanf`` the same way, so the fields before PATH are separated by
exactly one space. Its examiner wrote LVs as ``lvm_lv /dev/vg/lv``; that is
read as type ``l`` so its old maps load unchanged.

Paths are whatever bytes the guest filesystem holds, so files are handled as
bytes and decoded with utf-8 + surrogateescape: undecodable bytes survive a
read/write round trip when written back the same way (which ``write_bmap``
does).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

__all__ = [
    "STRUCTURE_NAMES",
    "TYPE_RANK",
    "BmapEntry",
    "BmapFormatError",
    "device_name",
    "Record",
    "format_entry",
    "is_structure_path",
    "iter_records",
    "parse_bmap",
    "read_bmap",
    "read_records",
    "write_bmap",
]

#: how specific each object type is; a higher rank wins where ranges overlap
TYPE_RANK: dict[str, int] = {"v": 0, "p": 1, "l": 2, "d": 3, "f": 4}

#: types whose lines carry a PATH after DEVICE
PATH_TYPES = frozenset("df")

#: Names (in a filesystem's root) of the structures the metadata method maps
#: as ``f`` lines (bmap/metadata.py): NTFS's own system files, and diskwatch's
#: names for those of ext2/3/4 and FAT. ``$Extend`` holds NTFS's newer ones.
STRUCTURE_NAMES = frozenset({
    "$MFT", "$MFTMirr", "$LogFile", "$Volume", "$AttrDef", "$Bitmap", "$Boot", "$BadClus",
    "$Secure", "$UpCase", "$Extend",
    "$Journal", "$Superblock", "$GroupDescriptors", "$BlockBitmap", "$InodeBitmap", "$InodeTable",
    "$BootSector", "$FAT1", "$FAT2", "$FAT3", "$FAT4",
    # the disk's own, outside every partition (volumes.disk_structures)
    "$MBR", "$GPTHeader", "$GPTEntries", "$GPTBackup", "$BootGap",
    # a partition's bytes past the end of its filesystem
    "$BeyondFilesystem",
    # a qcow2 image file's own (diskwatch attach to a qcow2 guest: attach/qcow2map.py)
    "$qcow2-header", "$qcow2-L1", "$qcow2-L2", "$qcow2-refcounts", "$qcow2-snapshots",
})


def is_structure_path(path: str | None) -> bool:
    """True for a filesystem's own structure (``/$MFT``, ``/$Journal``,
    ``/$Extend/$UsnJrnl:$J``) or a file's extent-tree blocks (``PATH:$extents``):
    named like files, but not what a person means by "files"."""
    if not path or not path.startswith("/"):
        return False
    if path.endswith(":$extents"):
        return True
    first = path[1:].split("/", 1)[0].split(":", 1)[0]
    return first in STRUCTURE_NAMES

# virt-bmap's examiner spelled the LV type out; accept it on input only.
_TYPE_ALIASES = {b"lvm_lv": "l"}
_TYPES = {t.encode(): t for t in TYPE_RANK} | _TYPE_ALIASES

# int(x, 16) alone would also take "+1", " 1", "1_0" and "0x"; the format
# allows none of those, so the shape is checked first.
_HEX = re.compile(rb"(?:0[xX])?[0-9a-fA-F]+")
_DEC = re.compile(rb"[0-9]+")
# Every well-formed line virt-bmap writes matches this; the rest (and the
# lines it matches that fail the END > START or PATH checks) go through
# _parse_line, which accepts rarer spellings (lvm_lv, DISK 01) and says
# exactly what is wrong. (Measured on a million lines: the regex saves
# little over split-and-check; skipping the frozen dataclass per line, as
# iter_records does, is what makes BlockMap.load fast.)
_FAST_LINE = re.compile(
    rb"([1-9][0-9]*) (?:0[xX])?([0-9a-fA-F]+) (?:0[xX])?([0-9a-fA-F]+) ([vpldf]) ([^ ]+)(?: (.+))?",
    re.DOTALL,
)

_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


class BmapFormatError(ValueError):
    """A malformed block-map line; the message is ``FILE:LINE: what is wrong``."""

    def __init__(self, filename: str, lineno: int, problem: str) -> None:
        super().__init__(f"{filename}:{lineno}: {problem}")
        self.filename = filename
        self.lineno = lineno
        self.problem = problem


#: a parsed line as a plain tuple: (disk, start, end, type, device, path)
Record = tuple[int, int, int, str, str, "str | None"]


@dataclass(frozen=True, slots=True)
class BmapEntry:
    """One line of a block map: bytes [start, end) of disk ``disk`` belong to an object."""

    disk: int
    start: int
    end: int
    type: str
    device: str
    path: str | None = None


def _show(field: bytes) -> str:
    # repr keeps the error message on one line whatever bytes the field holds
    return repr(field.decode(_ENCODING, _ERRORS))


def _parse_line(line: bytes, filename: str, lineno: int) -> Record:
    """The careful parse: accepts every valid spelling and names what is wrong."""

    def fail(problem: str) -> BmapFormatError:
        return BmapFormatError(filename, lineno, problem)

    # maxsplit=5 keeps PATH whole, spaces included
    fields = line.split(b" ", 5)
    if len(fields) < 5:
        names = ("DISK", "START", "END", "TYPE", "DEVICE")
        missing = " ".join(names[len(fields) :])
        raise fail(f"missing field(s) {missing}: expected 'DISK START END TYPE DEVICE [PATH]'")
    disk_f, start_f, end_f, type_f, device_f = fields[:5]
    for name, value in (
        ("DISK", disk_f),
        ("START", start_f),
        ("END", end_f),
        ("TYPE", type_f),
        ("DEVICE", device_f),
    ):
        if not value:
            raise fail(f"empty {name} field: fields must be separated by single spaces")

    if not _DEC.fullmatch(disk_f):
        raise fail(f"bad DISK {_show(disk_f)}: expected a decimal disk number (1 = first disk)")
    disk = int(disk_f)
    if disk < 1:
        raise fail(f"bad DISK {_show(disk_f)}: disks are numbered from 1")
    if not _HEX.fullmatch(start_f):
        raise fail(f"bad START {_show(start_f)}: expected a hex offset")
    if not _HEX.fullmatch(end_f):
        raise fail(f"bad END {_show(end_f)}: expected a hex offset")
    start = int(start_f, 16)
    end = int(end_f, 16)
    if end <= start:
        raise fail(
            f"END {end_f.decode()} <= START {start_f.decode()}: END is exclusive and must be greater"
        )

    type_ = _TYPES.get(type_f)
    if type_ is None:
        raise fail(f"unknown TYPE {_show(type_f)}: expected one of v p l d f")

    device = device_f.decode(_ENCODING, _ERRORS)
    if type_ in PATH_TYPES:
        if len(fields) < 6 or not fields[5]:
            raise fail(f"missing PATH after DEVICE on a '{type_}' line")
        path: str | None = fields[5].decode(_ENCODING, _ERRORS)
    else:
        if len(fields) == 6:
            raise fail(
                f"unexpected text after DEVICE on a '{type_}' line: "
                f"{_show(fields[5])} (only d and f lines have a PATH)"
            )
        path = None
    return (disk, start, end, type_, device, path)


def iter_records(lines: Iterable[bytes | str], filename: str = "<bmap>") -> Iterator[Record]:
    """Parse lines into plain tuples ``(disk, start, end, type, device, path)``.

    The lightweight form of ``parse_bmap`` for bulk loading (``BlockMap.load``
    on a million-line map): it skips building a dataclass per line.
    """
    fast = _FAST_LINE.fullmatch
    for lineno, line in enumerate(lines, 1):
        if isinstance(line, str):
            line = line.encode(_ENCODING, _ERRORS)
        # Only "\n" ends a line: "\r" or trailing spaces may be part of a path.
        if line.endswith(b"\n"):
            line = line[:-1]
        if not line or line.startswith(b"#") or line.isspace():
            continue
        m = fast(line)
        if m is not None:
            disk, start, end, type_b, device, path = m.groups()
            start = int(start, 16)
            end = int(end, 16)
            type_ = type_b.decode()
            if end > start and (path is None) != (type_ in PATH_TYPES):
                yield (
                    int(disk),
                    start,
                    end,
                    type_,
                    device.decode(_ENCODING, _ERRORS),
                    None if path is None else path.decode(_ENCODING, _ERRORS),
                )
                continue
        yield _parse_line(line, filename, lineno)


def parse_bmap(lines: Iterable[bytes | str], filename: str = "<bmap>") -> list[BmapEntry]:
    """Parse block-map lines (with or without their trailing newline).

    ``str`` lines are accepted too and encoded back with surrogateescape, so
    text that came from ``read_bmap``'s decoding parses identically.
    """
    return [BmapEntry(*r) for r in iter_records(lines, filename)]


def read_bmap(path: str | os.PathLike[str]) -> list[BmapEntry]:
    """Read a block-map file; raises ``BmapFormatError`` naming the file and line."""
    with open(path, "rb") as f:
        return parse_bmap(f, os.fspath(path))


def read_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Like ``read_bmap`` but yielding ``iter_records`` tuples as it reads."""
    with open(path, "rb") as f:
        yield from iter_records(f, os.fspath(path))


def _sort_key(e: BmapEntry) -> tuple[int, int, int]:
    # unknown types sort last here and are rejected by format_entry
    return (e.disk, e.start, TYPE_RANK.get(e.type, len(TYPE_RANK)))


def format_entry(e: BmapEntry) -> bytes:
    """One line (with its newline) as virt-bmap writes it: bare lower-case hex."""
    if e.type not in TYPE_RANK:
        raise ValueError(f"cannot write {e!r}: unknown type {e.type!r}")
    if e.disk < 1 or e.start < 0 or e.end <= e.start:
        raise ValueError(f"cannot write {e!r}: need disk >= 1 and 0 <= start < end")
    if not e.device or " " in e.device or "\n" in e.device:
        raise ValueError(
            f"cannot write {e!r}: DEVICE must be non-empty, without spaces or newlines"
        )
    head = f"{e.disk} {e.start:x} {e.end:x} {e.type} {e.device}"
    if e.type in PATH_TYPES:
        if not e.path or "\n" in e.path:
            raise ValueError(
                f"cannot write {e!r}: a '{e.type}' entry needs a PATH without newlines"
            )
        head = f"{head} {e.path}"
    elif e.path is not None:
        raise ValueError(f"cannot write {e!r}: only d and f entries have a PATH")
    return (head + "\n").encode(_ENCODING, _ERRORS)


def write_bmap(
    dest: str | os.PathLike[str] | BinaryIO | TextIO,
    entries: Iterable[BmapEntry],
    header: Iterable[str] = (),
) -> None:
    """Write entries sorted by disk, start, then type (v before f), virt-bmap style.

    ``dest`` is a path, a binary file object, or a text file object (which
    then gets ``str`` lines; use errors="surrogateescape" on it if paths may
    hold non-UTF-8 bytes). The sort is stable, so entries with the same
    start and type (one range shared by hard links, say) keep their order,
    which matters because the index lets the later of two equal entries win.

    ``header`` lines are written first as ``# `` comments (readers skip
    lines starting with ``#``); a newline inside one is replaced by a space.
    """
    ordered = sorted(entries, key=_sort_key)
    head = [("# " + line.replace("\n", " ") + "\n").encode(_ENCODING, _ERRORS) for line in header]
    if isinstance(dest, (str, os.PathLike)):
        with open(dest, "wb") as f:
            f.writelines(head)
            f.writelines(format_entry(e) for e in ordered)
        return
    if isinstance(dest, io.TextIOBase):
        dest.writelines(h.decode(_ENCODING, _ERRORS) for h in head)
        dest.writelines(format_entry(e).decode(_ENCODING, _ERRORS) for e in ordered)
        return
    dest.writelines(head)  # type: ignore[arg-type]
    dest.writelines(format_entry(e) for e in ordered)  # type: ignore[arg-type]


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """(start, end) pairs -> sorted, with overlapping and adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def device_name(index: int) -> str:
    """The device disk ``index`` (from 1, the DISK column) is named by:
    /dev/sda, /dev/sdb... (as libguestfs names the disks it was given)."""
    if not 1 <= index <= 26:
        raise ValueError(f"disk {index}: disks are /dev/sda to /dev/sdz")
    return "/dev/sd" + chr(ord("a") + index - 1)
