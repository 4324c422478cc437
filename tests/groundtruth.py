"""Ground truth for block maps: where each file of an ext4 filesystem lives on the disk.

debugfs (e2fsprogs) reads the filesystem straight from the image file, at the
partition's byte offset (``'IMAGE?offset=N'``), so no mount is needed. All
commands for one question go to one debugfs process (``-f CMDFILE``): 10,000
files cost a few debugfs runs, not 10,000.

Ranges are absolute byte ranges on the whole disk, ``(start, end)`` with END
exclusive, in **whole filesystem blocks**: a file's last, partial block is
kept whole, because the reader (the kernel, libguestfs) reads whole blocks.
They come from the extent list (or block map) that debugfs ``stat`` prints,
in the file's own (logical) order, so reading them in turn gives the file's
bytes; physically adjacent pieces are merged. Only data blocks are listed:
extent-tree index blocks (``ETB``) and indirect blocks are metadata and are
left out unless ``index_blocks=True``. Empty files, inline data and fast
symlinks have no blocks and map to an empty list.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "Ext4Entry",
    "ext4_block_size",
    "ext4_file_ranges",
    "ext4_list",
    "fat_file_ranges",
    "merge_blocks",
]


@dataclass(frozen=True)
class Ext4Entry:
    inode: int
    kind: str  # "f" regular file, "d" directory, "l" symlink, "o" other
    size: int  # bytes; directories report 0 (debugfs ls -p leaves it blank)


def _spec(image: str | os.PathLike[str], partition_offset: int) -> str:
    image = os.fspath(image)
    if "?" in image:
        raise ValueError(f"debugfs cannot open an image whose path holds '?': {image}")
    return f"{image}?offset={partition_offset}"


def _debugfs(
    image: str | os.PathLike[str], partition_offset: int, commands: list[str]
) -> list[tuple[str, list[str]]]:
    """Run ``commands`` in one debugfs process; return (command, output lines) for each.

    debugfs echoes each command as ``debugfs: CMD`` on stdout before its
    output; errors go to stderr, so a failed command simply has no output.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs", delete=False) as f:
        f.write("\n".join(commands) + "\n")
        cmdfile = f.name
    try:
        proc = subprocess.run(
            ["debugfs", "-c", "-f", cmdfile, _spec(image, partition_offset)],
            capture_output=True,
            text=True,
            errors="surrogateescape",
        )
    finally:
        os.unlink(cmdfile)
    if proc.returncode != 0 or not proc.stdout.startswith("debugfs: "):
        raise RuntimeError(f"debugfs failed on {image}: {proc.stderr.strip()[-300:]}")
    results: list[tuple[str, list[str]]] = []
    for line in proc.stdout.splitlines():
        if line.startswith("debugfs: "):
            results.append((line[len("debugfs: ") :], []))
        elif results:
            results[-1][1].append(line)
    if len(results) != len(commands):
        raise RuntimeError(f"debugfs answered {len(results)} of {len(commands)} commands")
    return results


def _quote(path: str) -> str:
    if '"' in path or "\n" in path:
        raise ValueError(f"debugfs cannot quote this path: {path!r}")
    return f'"{path}"'


def ext4_block_size(image: str | os.PathLike[str], partition_offset: int) -> int:
    ((_, lines),) = _debugfs(image, partition_offset, ["stats"])
    for line in lines:
        m = re.match(r"Block size:\s+(\d+)", line)
        if m:
            return int(m.group(1))
    raise RuntimeError(f"debugfs stats of {image} shows no block size")


_KINDS = {0o040000: "d", 0o100000: "f", 0o120000: "l"}


def ext4_list(image: str | os.PathLike[str], partition_offset: int) -> dict[str, Ext4Entry]:
    """Every object of the filesystem (path -> Ext4Entry), "/" included; one debugfs run per level."""
    entries = {"/": Ext4Entry(2, "d", 0)}
    level = ["/"]
    while level:
        answers = _debugfs(image, partition_offset, [f"ls -p <{entries[d].inode}>" for d in level])
        next_level = []
        for directory, (_, lines) in zip(level, answers, strict=True):
            for line in lines:
                if not line.startswith("/"):
                    continue
                fields = line[1:-1].split("/")
                if len(fields) != 6:
                    raise RuntimeError(f"unexpected debugfs ls -p line: {line!r}")
                ino, mode, _, _, name, size = fields
                if name in (".", ".."):
                    continue
                kind = _KINDS.get(int(mode, 8) & 0o170000, "o")
                path = directory.rstrip("/") + "/" + name
                entries[path] = Ext4Entry(int(ino), kind, int(size) if size else 0)
                if kind == "d":
                    next_level.append(path)
        level = next_level
    return entries


def merge_blocks(
    runs: Iterable[tuple[int, int]], block_size: int, partition_offset: int
) -> list[tuple[int, int]]:
    """(first block, block count) runs, in order -> absolute byte ranges, adjacent ones merged."""
    ranges: list[tuple[int, int]] = []
    for first, count in runs:
        start = partition_offset + first * block_size
        end = start + count * block_size
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


# One piece of debugfs stat's EXTENTS/BLOCKS list: "(0-1):2832-2833", "(8):2848",
# "(ETB0):2849", "(IND):1234". Uninitialised extents carry " [uninit]".
_PIECE = re.compile(r"\(([^)]*)\):(\d+)(?:-(\d+))?")


def _parse_stat_blocks(lines: list[str], index_blocks: bool) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    in_list = False
    for line in lines:
        if line.startswith(("EXTENTS:", "BLOCKS:")):
            in_list = True
            line = line.split(":", 1)[1]
        elif not in_list:
            continue
        for logical, first, last in _PIECE.findall(line):
            if not logical[:1].isdigit() and not index_blocks:
                continue  # ETBn, IND, DIND, TIND: metadata, not the file's bytes
            runs.append((int(first), int(last or first) - int(first) + 1))
    return runs


def ext4_file_ranges(
    image: str | os.PathLike[str],
    partition_offset: int,
    paths: Iterable[str] | None = None,
    *,
    include_dirs: bool = False,
    index_blocks: bool = False,
) -> dict[str, list[tuple[int, int]]]:
    """Absolute byte ranges (whole blocks, file order) of each file on the disk image.

    ``paths`` are paths inside the filesystem; None means every regular file
    (and, with ``include_dirs``, every directory, "/" included). A path that
    does not exist raises KeyError naming it.
    """
    block_size = ext4_block_size(image, partition_offset)
    if paths is None:
        wanted = {"f", "d"} if include_dirs else {"f"}
        listing = ext4_list(image, partition_offset)
        targets = {p: f"<{e.inode}>" for p, e in listing.items() if e.kind in wanted}
    else:
        targets = {p: _quote(p) for p in paths}
    if not targets:
        return {}
    answers = _debugfs(image, partition_offset, [f"stat {ref}" for ref in targets.values()])
    result: dict[str, list[tuple[int, int]]] = {}
    for path, (_, lines) in zip(targets, answers, strict=True):
        if not lines:  # debugfs said "File not found" on stderr
            raise KeyError(f"{path}: not found in the ext4 filesystem of {image}")
        runs = _parse_stat_blocks(lines, index_blocks)
        result[path] = merge_blocks(runs, block_size, partition_offset)
    return result


def ext4_extent_count(image: str | os.PathLike[str], partition_offset: int, path: str) -> int:
    """How many separate runs of blocks ``path`` occupies (1 = contiguous)."""
    return len(ext4_file_ranges(image, partition_offset, [path])[path])


# --------------------------------------------------------------------------
# FAT (a bonus: mtools' mshowfat lists each file's cluster chain)

_CHAIN = re.compile(r"<(\d+)(?:-(\d+))?>")


def fat_file_ranges(
    image: str | os.PathLike[str], partition_offset: int, paths: Iterable[str]
) -> dict[str, list[tuple[int, int]]]:
    """Absolute byte ranges (whole clusters, file order) of FAT files, from ``mshowfat``.

    Same conventions as ``ext4_file_ranges``: whole clusters, END exclusive,
    adjacent clusters merged. One mshowfat process for all paths.
    """
    import struct

    with open(image, "rb") as f:
        bpb = os.pread(f.fileno(), 64, partition_offset)
    bps, spc, reserved, nfats, root_entries, fat16_size = struct.unpack_from("<HBHBHxxxH", bpb, 11)
    fat_size = fat16_size or struct.unpack_from("<I", bpb, 0x24)[0]
    root_bytes = -(-root_entries * 32 // bps) * bps
    data_start = (reserved + nfats * fat_size) * bps + root_bytes
    cluster = spc * bps
    paths = list(paths)
    proc = subprocess.run(
        ["mshowfat", "-i", f"{os.fspath(image)}@@{partition_offset}"] + ["::" + p for p in paths],
        capture_output=True,
        text=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    )
    chains: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        head, sep, tail = line.partition(" <")
        chains[head.removeprefix("::").rstrip()] = sep + tail
    result: dict[str, list[tuple[int, int]]] = {}
    for path in paths:
        if path not in chains:
            raise KeyError(f"{path}: not found in the FAT filesystem of {image}")
        runs = [(int(a), int(b or a) - int(a) + 1) for a, b in _CHAIN.findall(chains[path])]
        result[path] = merge_blocks(
            ((first - 2, n) for first, n in runs), cluster, partition_offset + data_start
        )
    return result


# --------------------------------------------------------------------------
# NTFS: ntfsinfo (ntfs-3g) dumps every attribute of a file with its runlist

_NTFS_ATTR = re.compile(r"^Dumping attribute (\$\w+) \(0x[0-9a-f]+\) from mft record (\d+)")
_NTFS_RUN = re.compile(r"^\s+0x[0-9a-f]+\s+(0x[0-9a-f]+|<HOLE>)\s+(0x[0-9a-f]+)\s*$")


def _ntfsinfo(image: str | os.PathLike[str], *args: str) -> list[str]:
    proc = subprocess.run(["ntfsinfo", *args, os.fspath(image)], capture_output=True, text=True,
                          errors="surrogateescape")
    if proc.returncode != 0:
        raise RuntimeError(f"ntfsinfo {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout.splitlines()


def _ntfs_attributes(lines: list[str]) -> list[dict]:
    """Each attribute ntfsinfo -v dumped: type, record, name, resident, runs (LCN, count)."""
    attrs: list[dict] = []
    for line in lines:
        m = _NTFS_ATTR.match(line)
        if m:
            attrs.append({"type": m.group(1), "record": int(m.group(2)), "name": "",
                          "resident": None, "runs": []})
            continue
        if not attrs:
            continue
        a = attrs[-1]
        s = line.strip()
        if s.startswith("Resident:"):
            a["resident"] = s.split()[-1] == "Yes"
        elif s.startswith("Attribute name:"):
            a["name"] = s.split(":", 1)[1].strip().strip("'")
        else:
            r = _NTFS_RUN.match(line)
            if r and r.group(1) != "<HOLE>":
                a["runs"].append((int(r.group(1), 16), int(r.group(2), 16)))
    return attrs


def ntfs_object_ranges(
    image: str | os.PathLike[str], partition_offset: int, paths: Iterable[str]
) -> dict[str, list[tuple[int, int]]]:
    """Absolute byte ranges of NTFS files from ``ntfsinfo -v -F`` on the
    partition's own image, by object: ``PATH`` (its unnamed data and every
    other non-resident attribute; its MFT record when its data is resident)
    and ``PATH:STREAM`` for each named data stream. Sparse runs (holes) are
    not ranges; compressed files are their allocated clusters."""
    info = _ntfsinfo(image, "-m")
    cluster = record = 0
    for line in info:
        s = line.strip()
        if s.startswith("Cluster Size:"):
            cluster = int(s.split()[-1])
        elif s.startswith("MFT Record Size:"):
            record = int(s.split()[-1])
    mft_runs = [r for a in _ntfs_attributes(_ntfsinfo(image, "-v", "-i", "0"))
                if a["type"] == "$DATA" and not a["name"] for r in a["runs"]]

    def record_range(n: int) -> list[tuple[int, int]]:
        pos = n * record
        for lcn, count in mft_runs:
            if pos < count * cluster:
                start = partition_offset + lcn * cluster + pos
                return [(start, start + record)]
            pos -= count * cluster
        raise RuntimeError(f"MFT record {n} lies beyond $MFT's runs")

    result: dict[str, list[tuple[int, int]]] = {}
    for path in paths:
        attrs = _ntfs_attributes(_ntfsinfo(image, "-v", "-F", path))
        if not attrs:
            raise KeyError(f"{path}: not found in the NTFS filesystem of {image}")
        objects: dict[str, list[tuple[int, int]]] = {path: []}
        for a in attrs:
            key = f"{path}:{a['name']}" if a["type"] == "$DATA" and a["name"] else path
            if a["resident"]:
                if a["type"] == "$DATA":  # its bytes are in its MFT record
                    objects.setdefault(key, []).extend(record_range(a["record"]))
                continue
            objects.setdefault(key, []).extend(merge_blocks(a["runs"], cluster, partition_offset))
        for key, ranges in objects.items():
            result[key] = sorted(ranges)
    return result


def overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    """Bytes two lists of (start, end) ranges have in common (each list
    without overlaps of its own): precision and recall are made of it."""
    total = 0
    for s1, e1 in a:
        for s2, e2 in b:
            total += max(0, min(e1, e2) - max(s1, s2))
    return total
