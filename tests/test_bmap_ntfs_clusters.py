"""NTFS with big clusters (issue 18): Windows 10 formats NTFS with clusters
up to 2 MiB, which The Sleuth Kit refuses; those are mapped through
libfsntfs and the MFT records (``bmap/ntfs.py``). Checked against ntfsinfo's
runlists (ground truth from ntfs-3g's tools, never diskwatch), with 2 MiB,
64 KiB and 4 KiB clusters, and the libfsntfs path also on the NTFS fixture
that TSK maps (fragmented, resident, sparse, compressed files, a named
stream, non-ASCII names).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from fixtures_images import _fill_ntfs, content
from groundtruth import ntfs_object_ranges, overlap

from diskwatch.bmap.index import BlockMap
from diskwatch.bmap.metadata import map_metadata
from diskwatch.bmap.ntfs import map_ntfs
from diskwatch.bmap.worker import run_mapper
from diskwatch.demo.guest import MiB
from diskwatch.sources.file import FileSource

pytest.importorskip("pyfsntfs")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("mkntfs") is None, reason="ntfs-3g")]

FILES = {"/Windows/System32/drivers/big.sys": 5 * MiB + 123,
         "/Windows/System32/config/SOFTWARE": 300_000,
         "/Windows/win.ini": 92,  # resident
         "/Program Files/Antivirus/scan.log": 70_000,
         "/Users/Public/Résumé.txt": 9_000}
STREAM = ("/Users/Public/Résumé.txt", "Zone.Identifier")


def _by_path(entries) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for e in entries:
        if e.path:
            out[e.path].append((e.start, e.end))
    return out


def _exact(got: dict, truth: dict) -> list[str]:
    bad = []
    for path, want in truth.items():
        g = sorted(got.get(path, []))
        size_g, size_w = sum(e - s for s, e in g), sum(e - s for s, e in want)
        if overlap(g, want) != size_w or size_g != size_w:
            bad.append(f"{path}: got {g[:4]} want {want[:4]}")
    return bad


@pytest.fixture(scope="module", params=[2 << 20, 64 << 10, 4 << 10], ids=["2M", "64K", "4K"])
def big_cluster_ntfs(request, tmp_path_factory):
    cluster = request.param
    work = tmp_path_factory.mktemp(f"ntfs-{cluster}")
    image = work / "ntfs.img"
    with open(image, "wb") as f:
        f.truncate(2048 * MiB)
    subprocess.run(["mkntfs", "-q", "-F", "-f", "-c", str(cluster), "-L", "C", str(image)],
                   check=True, capture_output=True, timeout=120)

    def fill(root: Path) -> None:
        for path, size in FILES.items():
            f = root / path.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(content(path, size))
        file, stream = STREAM
        os.setxattr(root / file.lstrip("/"), f"user.{stream}", content(stream, 6000))
    _fill_ntfs(image, work / "mnt", fill)
    return cluster, image


def test_big_clusters_are_mapped_as_ntfsinfo_lists_them(big_cluster_ntfs):
    cluster, image = big_cluster_ntfs
    with FileSource(str(image), readonly=True) as src:
        meta = map_metadata(src, done_event=False)
        answer = run_mapper(src, {})  # as diskwatch runs it: in the mapper process
    assert list(answer.blockmap.iter_entries()) == list(BlockMap(meta.entries).iter_entries())
    (fs,) = meta.filesystems
    assert fs.method == "metadata" and fs.fstype == "ntfs", fs
    assert ("libfsntfs" in fs.warning) == (cluster > 64 << 10), fs.warning
    paths = [*FILES, f"{STREAM[0]}:{STREAM[1]}", "/$MFT", "/$LogFile"]
    truth = ntfs_object_ranges(image, 0, [p for p in paths if ":" not in p])
    got = _by_path(meta.entries)
    assert _exact(got, truth) == []
    assert got[f"{STREAM[0]}:{STREAM[1]}"], sorted(got)[:20]
    # a directory is named (its index: in its record, or its index blocks)
    assert {e.path for e in meta.entries if e.type == "d"} >= {
        "/", "/Windows", "/Windows/System32", "/Program Files/Antivirus", "/Users/Public"}


def test_the_libfsntfs_path_matches_ntfsinfo_on_the_ntfs_fixture(ntfs_image):
    """The rich fixture (4 KiB clusters, TSK's own ground-truth test) walked
    by the libfsntfs path alone: the same ranges as ntfsinfo's."""
    for device, files in ntfs_image.files.items():
        vol = ntfs_image.volume(device)
        got: dict[str, list[tuple[int, int]]] = defaultdict(list)
        with open(ntfs_image.path, "rb") as f:
            def read(offset: int, length: int, f=f, base=vol.offset) -> bytes:
                return os.pread(f.fileno(), length, base + offset)

            def add(path: str, ranges, kind: str, got=got, base=vol.offset) -> None:
                got[path] += [(s + base, e + base) for s, e in ranges]
            map_ntfs(read, vol.length, add)
        truth = ntfs_object_ranges(ntfs_image.partition_images[device], vol.offset, files)
        merged = {p: sorted(r) for p, r in got.items()}
        assert _exact(merged, truth) == [], device
