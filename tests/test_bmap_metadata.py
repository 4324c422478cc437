"""Block maps from filesystem metadata (issue 10): real images, checked against
what other tools read from them (ntfsinfo, debugfs, mtools), never against
diskwatch's own output.

One metadata map per image per session: mapping is fast (tens of ms), the
images are the shared session fixtures. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest
from fixtures_images import (
    NTFS_ADS,
    NTFS_COMPRESSED,
    NTFS_FRAGMENTED,
    NTFS_RESIDENT,
    NTFS_SPARSE,
    DiskImage,
)
from groundtruth import (
    _debugfs,
    ext4_block_size,
    ext4_file_ranges,
    fat_file_ranges,
    ntfs_object_ranges,
    overlap,
)

from diskwatch.bmap.format import BmapEntry
from diskwatch.bmap.metadata import MetadataResult, map_metadata
from diskwatch.events import Bus, Progress
from diskwatch.sources.file import FileSource


class Mapped:
    """A metadata map of an image, indexed by object."""

    def __init__(self, image: DiskImage | None, path: str | os.PathLike[str] | None = None):
        self.image = image
        self.events: list[object] = []
        bus = Bus()
        bus.on_event(self.events.append)
        with FileSource(str(path or image.path), readonly=True) as src:
            self.result: MetadataResult = map_metadata(src, bus=bus)
        self.by_object: dict[tuple[str, str, str | None], list[tuple[int, int]]] = defaultdict(list)
        for e in self.result.entries:
            self.by_object[(e.type, e.device, e.path)].append((e.start, e.end))
        name = os.path.basename(str(path or image.path))
        print(f"\n{name}: {self.result.summary()}")

    def ranges(self, device: str, path: str, kind: str = "f") -> list[tuple[int, int]]:
        return sorted(self.by_object.get((kind, device, path), []))


@pytest.fixture(scope="session")
def ntfs_meta(ntfs_image):
    return Mapped(ntfs_image)


@pytest.fixture(scope="session")
def ext4_meta(ext4_mbr_image):
    return Mapped(ext4_mbr_image)


@pytest.fixture(scope="session")
def gpt_meta(gpt_fat_image):
    return Mapped(gpt_fat_image)


@pytest.fixture(scope="session")
def lvm_meta(lvm_image):
    return Mapped(lvm_image)


def size_of(ranges: list[tuple[int, int]]) -> int:
    return sum(e - s for s, e in ranges)


def accuracy(mapped: Mapped, device: str, truth: dict[str, list[tuple[int, int]]]):
    """(byte precision, byte recall, objects missing, lines for imperfect objects)
    over all objects of ``truth``."""
    hit = got_total = want_total = 0
    missing, report = [], []
    for path, want in truth.items():
        got = mapped.ranges(device, path)
        if want and not got:
            missing.append(path)
        h = overlap(got, want)
        hit += h
        got_total += size_of(got)
        want_total += size_of(want)
        if h != size_of(got) or h != size_of(want):
            report.append(f"{device} {path}: got {size_of(got)} want {size_of(want)} hit {h}")
    p = hit / got_total if got_total else 1.0
    r = hit / want_total if want_total else 1.0
    return p, r, missing, report


def check(mapped: Mapped, device: str, truth: dict[str, list[tuple[int, int]]], what: str):
    p, r, missing, report = accuracy(mapped, device, truth)
    print(f"\n{what} {device}: {len(truth)} objects, byte precision {p:.4f}, recall {r:.4f}")
    for line in report[:20]:
        print("  " + line)
    assert not missing, f"not mapped: {missing}"
    assert p >= 0.999 and r >= 0.999, report


# --------------------------------------------------------------------------
# NTFS against ntfsinfo


@pytest.fixture(scope="session")
def ntfs_truth(ntfs_image):
    truth = {}
    for device, files in ntfs_image.files.items():
        vol = ntfs_image.volume(device)
        truth[device] = ntfs_object_ranges(ntfs_image.partition_images[device], vol.offset, files)
    return truth


@pytest.mark.parametrize("device", ["/dev/sda1", "/dev/sda2"])
def test_ntfs_files_match_ntfsinfo(ntfs_meta, ntfs_truth, device):
    check(ntfs_meta, device, ntfs_truth[device], "ntfs")


def test_ntfs_every_file_kind(ntfs_meta, ntfs_truth, ntfs_image):
    truth = ntfs_truth["/dev/sda2"]
    c = ntfs_image.volume("/dev/sda2")
    # The fixture really made what it says (else this test proves nothing).
    for p in NTFS_FRAGMENTED:
        assert len(truth[p]) >= 3, f"{p} is not fragmented: {truth[p]}"
    assert size_of(truth[NTFS_SPARSE]) == 8192  # two 4 KiB runs around a hole
    assert 0 < size_of(truth[NTFS_COMPRESSED]) < ntfs_image.files["/dev/sda2"][NTFS_COMPRESSED] // 2
    assert size_of(truth[NTFS_RESIDENT]) == 1024  # its MFT record
    ads = f"{NTFS_ADS[0]}:{NTFS_ADS[1]}"
    assert size_of(truth[ads]) >= 6000
    # ... and the map has each, exactly.
    for p in [*NTFS_FRAGMENTED, NTFS_SPARSE, NTFS_COMPRESSED, NTFS_RESIDENT, ads, NTFS_ADS[0]]:
        got = ntfs_meta.ranges("/dev/sda2", p)
        assert got == sorted(truth[p]) or overlap(got, truth[p]) == size_of(truth[p]) == size_of(
            got), (p, got, truth[p])
        assert all(c.offset <= s < e <= c.offset + c.length for s, e in got)
    # Unicode names are the filesystem's, not mangled.
    assert ntfs_meta.ranges("/dev/sda2", "/Users/Public/日本語のファイル.txt")


def test_ntfs_system_files_are_named(ntfs_meta, ntfs_image):
    for device in ("/dev/sda1", "/dev/sda2"):
        vol = ntfs_image.volume(device)
        truth = ntfs_object_ranges(ntfs_image.partition_images[device], vol.offset,
                                   ["/$MFT", "/$MFTMirr", "/$LogFile", "/$Bitmap", "/$Boot"])
        sds = ntfs_object_ranges(ntfs_image.partition_images[device], vol.offset, ["/$Secure"])
        truth["/$Secure:$SDS"] = sds["/$Secure:$SDS"]
        check(ntfs_meta, device, truth, "ntfs system files")
        assert ntfs_meta.ranges(device, "/", "d")


def test_ntfs_directories_are_mapped(ntfs_meta, ntfs_image):
    for device, dirs in ntfs_image.dirs.items():
        for d in ["/", *dirs]:
            assert ntfs_meta.ranges(device, d, "d"), f"{device} {d}: directory not mapped"


# --------------------------------------------------------------------------
# ext4 against debugfs, FAT against mtools, LVM


@pytest.mark.parametrize(
    "which, device",
    [("ext4_meta", "/dev/sda1"), ("gpt_meta", "/dev/sda1"),
     # the LVM image is built with libguestfs (a launch): slow
     pytest.param("lvm_meta", "/dev/vg0/data", marks=pytest.mark.slow),
     pytest.param("lvm_meta", "/dev/vg0/logs", marks=pytest.mark.slow)],
)
def test_ext4_files_match_debugfs(request, which, device):
    mapped = request.getfixturevalue(which)
    vol = mapped.image.volume(device)
    truth = ext4_file_ranges(mapped.image.path, vol.offset, list(mapped.image.files[device]))
    with_blocks = {p: r for p, r in truth.items() if r}
    # (files without blocks are left out; none at all would check nothing)
    assert len(with_blocks) >= len(truth) // 2, f"debugfs found no blocks: {truth}"
    check(mapped, device, with_blocks, "ext4 " + which)


def test_ext4_fragmented_file_and_its_extent_tree(ext4_meta):
    device, path = ext4_meta.image.fragmented
    vol = ext4_meta.image.volume(device)
    data = ext4_file_ranges(ext4_meta.image.path, vol.offset, [path])[path]
    every = ext4_file_ranges(ext4_meta.image.path, vol.offset, [path], index_blocks=True)[path]
    assert len(data) >= 5
    assert ext4_meta.ranges(device, path) == sorted(data)
    index = sorted(set(every) - set(data))  # the extent-tree block(s)
    assert index and overlap(ext4_meta.ranges(device, path + ":$extents"), index) == size_of(index)


def test_fat_files_match_mtools(gpt_meta):
    image = gpt_meta.image
    vol = image.volume("/dev/sda2")
    truth = fat_file_ranges(image.path, vol.offset, list(image.files["/dev/sda2"]))
    check(gpt_meta, "/dev/sda2", truth, "fat")


@pytest.mark.parametrize("which", ["ext4_meta", "gpt_meta", "ntfs_meta",
                                   pytest.param("lvm_meta", marks=pytest.mark.slow)])
def test_every_file_directory_and_volume_is_mapped(request, which):
    mapped = request.getfixturevalue(which)
    image = mapped.image
    assert mapped.ranges("/dev/sda", None, "v") == [(0, image.size)]
    for vol in image.partitions:
        got = sorted(mapped.by_object.get((vol.kind, vol.device, None), []))
        assert got == [(vol.offset, vol.offset + vol.length)], vol
    for device, path, size in image.all_files():
        ranges = mapped.ranges(device, path)
        vol = image.volume(device)
        if size:
            assert ranges, f"{device} {path}: not mapped"
        assert all(vol.offset <= s < e <= vol.offset + vol.length for s, e in ranges)
    for device, dirs in image.dirs.items():
        for d in ["/", *dirs]:
            assert mapped.ranges(device, d, "d"), f"{device} {d}: directory not mapped"
    assert not mapped.result.warnings
    by_device = {f.device: f for f in mapped.result.filesystems}
    for device, files in image.files.items():
        assert by_device[device].method == "metadata"
        assert by_device[device].files >= len(files)


def test_progress_is_published(ntfs_meta):
    progress = [e for e in ntfs_meta.events if isinstance(e, Progress)]
    assert progress[0].phase == "devices" and progress[-1].phase == "done"
    assert progress[-1].summary and progress[-1].done == ntfs_meta.result.objects
    assert any(p.phase == "files" and p.current.startswith("/dev/sda") for p in progress)


def test_maps_without_libguestfs(monkeypatch, gpt_fat_image):
    monkeypatch.setitem(sys.modules, "guestfs", None)  # import guestfs -> ImportError
    mapped = Mapped(gpt_fat_image)
    assert mapped.ranges("/dev/sda2", "/readme.txt")


# --------------------------------------------------------------------------
# Filesystem structures (item 4) against debugfs / the boot sector


def test_ext4_structures_are_named(ext4_meta):
    image = ext4_meta.image
    vol = image.volume("/dev/sda1")
    bs = ext4_block_size(image.path, vol.offset)
    ((_, journal),) = _debugfs(image.path, vol.offset, ["stat <8>"])
    from groundtruth import _parse_stat_blocks, merge_blocks
    want = merge_blocks(_parse_stat_blocks(journal, False), bs, vol.offset)
    assert want and ext4_meta.ranges("/dev/sda1", "/$Journal") == sorted(want)
    ((_, stats),) = _debugfs(image.path, vol.offset, ["stats"])
    text = "\n".join(stats)
    per_group = int(re.search(r"Inode blocks per group:\s+(\d+)", text).group(1))
    groups = re.findall(r"block bitmap at (\d+).*?inode bitmap at (\d+).*?inode table at (\d+)",
                        text)
    assert groups

    def blocks(first: int, count: int = 1) -> tuple[int, int]:
        return (vol.offset + first * bs, vol.offset + (first + count) * bs)

    for name, want in (
        ("/$BlockBitmap", [blocks(int(g[0])) for g in groups]),
        ("/$InodeBitmap", [blocks(int(g[1])) for g in groups]),
        ("/$InodeTable", [blocks(int(g[2]), per_group) for g in groups]),
    ):
        got = ext4_meta.ranges("/dev/sda1", name)
        assert overlap(got, want) == size_of(want) == size_of(got), name
    # 4 KiB blocks: the superblock's block (block 0, written whole by the kernel)
    assert bs == 4096
    assert ext4_meta.ranges("/dev/sda1", "/$Superblock")[0] == (vol.offset, vol.offset + bs)
    assert ext4_meta.ranges("/dev/sda1", "/$GroupDescriptors")


def test_fat_tables_and_root_are_named(gpt_meta):
    import struct
    vol = gpt_meta.image.volume("/dev/sda2")
    with open(gpt_meta.image.path, "rb") as f:
        bpb = os.pread(f.fileno(), 64, vol.offset)
    bps, _, reserved, nfats, root_entries, fat16 = struct.unpack_from("<HBHBHxxxH", bpb, 11)
    fat = (fat16 or struct.unpack_from("<I", bpb, 0x24)[0]) * bps
    first = vol.offset + reserved * bps
    assert gpt_meta.ranges("/dev/sda2", "/$BootSector") == [(vol.offset, first)]
    assert gpt_meta.ranges("/dev/sda2", "/$FAT1") == [(first, first + fat)]
    assert gpt_meta.ranges("/dev/sda2", "/$FAT2") == [(first + fat, first + 2 * fat)]
    root = first + nfats * fat
    assert (root, root + root_entries * 32) in gpt_meta.ranges("/dev/sda2", "/", "d")


# --------------------------------------------------------------------------
# Corrupt and truncated input


def test_zeroed_superblock_warns_and_maps_the_rest(gpt_fat_image, tmp_path):
    bad = tmp_path / "zeroed.img"
    shutil.copyfile(gpt_fat_image.path, bad)
    ext4 = gpt_fat_image.volume("/dev/sda1")
    with open(bad, "r+b") as f:
        os.pwrite(f.fileno(), bytes(1024), ext4.offset + 1024)
    mapped = Mapped(gpt_fat_image, bad)
    warnings = mapped.result.warnings
    assert len(warnings) == 1 and warnings[0].startswith("/dev/sda1: ") and "\n" not in warnings[0]
    assert mapped.ranges("/dev/sda2", "/readme.txt")
    assert not [k for k in mapped.by_object if k[1] == "/dev/sda1" and k[0] in "df"]


def test_truncated_image_warns_and_maps_the_rest(ext4_mbr_image, tmp_path):
    bad = tmp_path / "truncated.img"
    shutil.copyfile(ext4_mbr_image.path, bad)
    vol = ext4_mbr_image.volume("/dev/sda1")
    os.truncate(bad, vol.offset + vol.length // 2)
    mapped = Mapped(ext4_mbr_image, bad)  # must not raise
    assert mapped.ranges("/dev/sda", None, "v") == [(0, vol.offset + vol.length // 2)]
    warnings = mapped.result.warnings
    assert warnings and all(w.startswith("/dev/sda1: ") and "\n" not in w for w in warnings)
    assert mapped.ranges("/dev/sda1", "/", "d")


def test_garbage_is_not_a_disk(tmp_path):
    img = tmp_path / "garbage.img"
    img.write_bytes(os.urandom(4 << 20))
    mapped = Mapped(None, img)
    assert mapped.result.entries == [BmapEntry(1, 0, 4 << 20, "v", "/dev/sda")]
    assert not mapped.result.warnings


def test_whole_disk_filesystem_without_partition_table(tmp_path):
    img = tmp_path / "fat.img"
    subprocess.run(["mkfs.vfat", "-C", str(img), "8192"], check=True, capture_output=True)
    subprocess.run(["mcopy", "-i", str(img), "/etc/hostname", "::host.txt"], check=True,
                   capture_output=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    mapped = Mapped(None, img)
    assert mapped.ranges("/dev/sda", "/HOST.TXT") or mapped.ranges("/dev/sda", "/host.txt")


# --------------------------------------------------------------------------
# The command line: --method, the header, and what happens without libguestfs


def test_cli_bmap_maps_ntfs_by_metadata_by_default(ntfs_image, tmp_path):
    from fixtures_server import run_diskwatch

    from diskwatch.bmap.index import BlockMap

    out = tmp_path / "ntfs.bmap"
    proc = run_diskwatch(["bmap", ntfs_image.path, "-o", out])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    head = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any(line.startswith("# /dev/sda2 ntfs: metadata") for line in head), head
    bm = BlockMap.load(out)
    c = ntfs_image.volume("/dev/sda2")
    hosts = Mapped(ntfs_image).ranges("/dev/sda2", "/Windows/System32/drivers/etc/hosts")
    assert [str(o) for _, _, o in bm.lookup(hosts[0][0], 1)] == [
        "f /dev/sda2 /Windows/System32/drivers/etc/hosts"]
    assert c.offset < hosts[0][0] < c.offset + c.length


@pytest.fixture
def fat_and_xfs_disk(tmp_path):
    """p1 FAT with one file, p2 holding only an XFS superblock magic (a
    filesystem The Sleuth Kit cannot read)."""
    from diskwatch.demo.guest import make_partition_table

    img = tmp_path / "fat-xfs.img"
    with open(img, "wb") as f:
        f.truncate(48 << 20)
    (p1, l1), (p2, _) = make_partition_table(img, "dos", [(16 << 20, "c"), (None, "83")])
    subprocess.run(["mkfs.vfat", "--offset", str(p1 // 512), str(img), str(l1 // 1024)],
                   check=True, capture_output=True)
    subprocess.run(["mcopy", "-i", f"{img}@@{p1}", "/etc/hostname", "::hostname"], check=True,
                   capture_output=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    with open(img, "r+b") as f:
        os.pwrite(f.fileno(), b"XFSB", p2)
    return img


def test_cli_metadata_method_says_what_it_left(fat_and_xfs_disk, tmp_path):
    from fixtures_server import run_diskwatch

    out = tmp_path / "m.bmap"
    proc = run_diskwatch(["bmap", fat_and_xfs_disk, "-o", out, "--method", "metadata"])
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "# /dev/sda2 xfs: not mapped: the metadata method cannot read it" in text
    assert " f /dev/sda1 /HOSTNAME" in text or " f /dev/sda1 /hostname" in text
    assert "/dev/sda2 xfs: not mapped" in proc.stderr


def test_cli_auto_without_libguestfs_maps_the_rest_and_says_why(fat_and_xfs_disk, tmp_path):
    """A venv that cannot see Debian's guestfs module (item 8): the metadata
    method maps, and the xfs partition's line says exactly what is wrong."""
    from fixtures_server import SUBPROCESS_ENV, run_diskwatch

    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "guestfs.py").write_text("raise ImportError('hidden by the test', name='guestfs')\n")
    env = {**SUBPROCESS_ENV, "PYTHONPATH": os.pathsep.join(
        [str(hide), SUBPROCESS_ENV.get("PYTHONPATH", "")])}
    out = tmp_path / "a.bmap"
    proc = run_diskwatch(["bmap", fat_and_xfs_disk, "-o", out], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    line = [x for x in out.read_text().splitlines() if x.startswith("# /dev/sda2")]
    assert line and "the watch method needs libguestfs: python3-guestfs is" in line[0], line
    assert "/dev/sda1 metadata" in proc.stderr


# --------------------------------------------------------------------------
# ext4 file kinds: hard links, inline data (a whole-disk filesystem)


def test_ext4_hard_links_and_inline_data(tmp_path):
    tree = tmp_path / "tree"
    (tree / "b").mkdir(parents=True)
    (tree / "a").mkdir()
    (tree / "b" / "second name").write_bytes(os.urandom(9000))
    os.link(tree / "b" / "second name", tree / "a" / "first name")
    (tree / "tiny.txt").write_bytes(b"tiny\n")
    img = tmp_path / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "inline_data", "-d", str(tree), str(img), "8M"],
                   check=True, capture_output=True)
    mapped = Mapped(None, img)
    # One path per range, the same one every run: the smallest.
    assert mapped.ranges("/dev/sda", "/a/first name")
    assert not mapped.ranges("/dev/sda", "/b/second name")
    assert Mapped(None, img).ranges("/dev/sda", "/a/first name") == mapped.ranges(
        "/dev/sda", "/a/first name")
    # Inline data: the file is the bytes of its inode (debugfs says where).
    ((_, lines),) = _debugfs(img, 0, ["imap /tiny.txt"])
    m = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", "\n".join(lines))
    bs = ext4_block_size(img, 0)
    ((_, stats),) = _debugfs(img, 0, ["stats"])
    inode_size = int(re.search(r"Inode size:\s+(\d+)", "\n".join(stats)).group(1))
    start = int(m.group(1)) * bs + int(m.group(2), 16)
    assert mapped.ranges("/dev/sda", "/tiny.txt") == [(start, start + inode_size)]


def test_logical_partitions_are_named_as_linux_names_them(tmp_path):
    """DOS extended partition: logical partitions are /dev/sda5, /dev/sda6 in
    the order of the EBR chain (sfdisk's own numbering says where)."""
    import json

    img = tmp_path / "ext.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    layout = "label: dos\n,16M,c\n,,5\n,12M,c\n,,83\n"
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(img)], input=layout,
                   text=True, check=True, capture_output=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(img)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    want = {}
    for p in table["partitions"]:
        number = int(p["node"].rsplit("img", 1)[1])
        if p["type"] != "5":
            want[f"/dev/sda{number}"] = (p["start"] * 512, (p["start"] + p["size"]) * 512)
    assert set(want) == {"/dev/sda1", "/dev/sda5", "/dev/sda6"}
    s5, e5 = want["/dev/sda5"]
    subprocess.run(["mkfs.vfat", "--offset", str(s5 // 512), str(img), str((e5 - s5) // 1024)],
                   check=True, capture_output=True)
    subprocess.run(["mcopy", "-i", f"{img}@@{s5}", "/etc/hostname", "::in-logical.txt"],
                   check=True, capture_output=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    mapped = Mapped(None, img)
    got = {k[1]: sorted(v) for k, v in mapped.by_object.items() if k[0] == "p"}
    assert got == {dev: [r] for dev, r in want.items()}
    assert mapped.ranges("/dev/sda5", "/IN-LOGICAL.TXT") or mapped.ranges(
        "/dev/sda5", "/in-logical.txt")


# --------------------------------------------------------------------------
# auto: metadata where it can, the watch method (libguestfs) for the rest


@pytest.mark.slow
def test_auto_maps_xfs_by_watching_and_the_rest_by_metadata(tmp_path):
    from fixtures_images import GUESTFS_ENV, _copy_into, content

    from diskwatch.bmap.format import read_bmap
    from diskwatch.bmap.make import make_bmap
    from diskwatch.demo.guest import make_partition_table

    img = tmp_path / "fat-xfs.img"
    with open(img, "wb") as f:
        f.truncate(360 << 20)
    (p1, l1), (p2, l2) = make_partition_table(img, "dos", [(16 << 20, "c"), (None, "83")])
    subprocess.run(["mkfs.vfat", "--offset", str(p1 // 512), str(img), str(l1 // 1024)],
                   check=True, capture_output=True)
    subprocess.run(["mcopy", "-i", f"{img}@@{p1}", "/etc/hostname", "::hostname"], check=True,
                   capture_output=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    src = tmp_path / "notes.txt"
    src.write_bytes(content("xfs notes", 70000))
    proto = tmp_path / "proto"
    proto.write_text(f"boot\n0 0\nd--755 0 0\nnotes.txt ---644 0 0 {src}\n$\n")
    xfs = tmp_path / "p2.xfs"
    with open(xfs, "wb") as f:
        f.truncate(l2)
    subprocess.run(["mkfs.xfs", "-q", "-p", str(proto), str(xfs)], check=True, capture_output=True)
    _copy_into(img, xfs, p2)

    for k, v in GUESTFS_ENV.items():
        os.environ.setdefault(k, v)
    out = tmp_path / "auto.bmap"
    events: list[object] = []
    bus = Bus()
    bus.on_event(events.append)
    with FileSource(str(img), readonly=True) as source:
        res = make_bmap(source, out, method="auto", bus=bus, accel="tcg")
    print(f"\n{res.summary}")
    assert res.methods == {"/dev/sda1": "metadata", "/dev/sda2": "watch"}
    head = [x for x in out.read_text().splitlines() if x.startswith("#")]
    assert any(x.startswith("# /dev/sda1 fat") and "metadata" in x for x in head), head
    assert any(x.startswith("# /dev/sda2 xfs: watch") for x in head), head
    entries = read_bmap(out)
    notes = [(e.start, e.end) for e in entries if e.path == "/notes.txt"]
    assert notes and all(e.device == "/dev/sda2" for e in entries if e.path == "/notes.txt")
    assert sum(e - s for s, e in notes) >= 70000
    assert all(p2 <= s < e <= p2 + l2 for s, e in notes)
    # The partitions come once, from the metadata method.
    assert sorted((e.type, e.device) for e in entries if e.type in "vp") == [
        ("p", "/dev/sda1"), ("p", "/dev/sda2"), ("v", "/dev/sda")]
    assert [e for e in events if isinstance(e, Progress)][-1].phase == "done"


def test_a_directory_caught_mid_update_gives_a_partial_map(ext4_mbr_image, tmp_path):
    """A live remap may read a directory block the guest is rewriting: here
    it is garbage. That directory's subtree is lost, with a warning naming
    the partition; everything else is mapped."""
    bad = tmp_path / "torn.img"
    shutil.copyfile(ext4_mbr_image.path, bad)
    vol = ext4_mbr_image.volume("/dev/sda1")
    (block,) = ext4_file_ranges(bad, vol.offset, ["/small"])["/small"]
    with open(bad, "r+b") as f:
        os.pwrite(f.fileno(), os.urandom(block[1] - block[0]), block[0])
    mapped = Mapped(ext4_mbr_image, bad)
    assert mapped.ranges("/dev/sda1", "/big/three-mib.bin")
    assert not mapped.ranges("/dev/sda1", "/small/hundred.txt")
    (warning,) = mapped.result.warnings
    assert warning.startswith("/dev/sda1: ext4 partly mapped") and "/small" in warning


def test_cancelled_mapping_raises_and_publishes_nothing_half_done(ext4_mbr_image):
    from diskwatch.bmap.metadata import MetadataError

    with FileSource(str(ext4_mbr_image.path), readonly=True) as src:
        with pytest.raises(MetadataError, match="cancelled"):
            map_metadata(src, cancelled=lambda: True)


def test_partitions_without_a_filesystem_are_not_warned_about(tmp_path):
    """A GPT disk as Debian's installer makes it (a BIOS boot partition) and
    as Windows does (a Microsoft reserved one): nothing to map there, and no
    warning; an unformatted Linux partition is warned about."""
    from diskwatch.demo.guest import make_partition_table

    img = tmp_path / "gpt.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    make_partition_table(img, "gpt", [(1 << 20, "21686148-6449-6E6F-744E-656564454649"),
                                      (8 << 20, "E3C9E316-0B5C-4DB8-817D-F92DF00215AE"),
                                      (None, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")])
    mapped = Mapped(None, img)
    assert [w.split(":")[0] for w in mapped.result.warnings] == ["/dev/sda3"]
    assert {f.device: f.fstype for f in mapped.result.filesystems if f.method == "none"} == {
        "/dev/sda1": "bios-boot", "/dev/sda2": "msr", "/dev/sda3": ""}


def test_an_xz_image_maps_the_same_through_its_source(gpt_fat_image, tmp_path):
    """The mapper reads through diskwatch's Source: the xz source (random
    access by xz block) gives the same map as the raw file, with no copy."""
    from diskwatch.sources import SourceOptions, open_source

    xz = tmp_path / "gpt-fat.img.xz"
    with open(xz, "wb") as out:
        subprocess.run(["xz", "-0", "-T2", "--block-size=4MiB", "-c", str(gpt_fat_image.path)],
                       stdout=out, check=True)
    with open_source(str(xz), SourceOptions()) as src:
        from_xz = map_metadata(src).entries
    with FileSource(str(gpt_fat_image.path), readonly=True) as src:
        from_raw = map_metadata(src).entries
    assert from_xz == from_raw and len(from_raw) > 30


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_the_partition_table_and_the_gap_after_it_are_named(tmp_path, label):
    """The MBR, the GPT header, its partition array and their backup, and the
    gap before the first partition (GRUB's core.img) are structures of the
    disk, where ``fdisk -l -x`` (util-linux) says they lie."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(image)], check=True, text=True,
                   input=f"label: {label}\nstart=2048, size=20480, type=L\n")
    listing = subprocess.run(["fdisk", "-l", "-x", str(image)], check=True, text=True,
                             capture_output=True).stdout

    def field(name: str) -> int:
        return int(re.search(rf"^{name}:\s+(\d+)$", listing, re.M).group(1))
    with FileSource(str(image), readonly=True) as src:
        entries = map_metadata(src, done_event=False).entries
    named = {}
    for e in entries:
        if e.device == "/dev/sda" and e.type == "f":
            named.setdefault(e.path, []).append((e.start, e.end))
    start = 2048 * 512  # the partition, as given to sfdisk
    if label == "dos":
        assert named == {"/$MBR": [(0, 512)], "/$BootGap": [(512, start)]}
        return
    first, last = field("Partition entries starting LBA"), field("Partition entries ending LBA")
    alternate = field("Alternative LBA")
    backup_entries = alternate - (last - first + 1)
    assert named == {
        "/$MBR": [(0, 512)], "/$GPTHeader": [(512, 1024)],
        "/$GPTEntries": [(first * 512, (last + 1) * 512)],
        "/$GPTBackup": [(backup_entries * 512, (alternate + 1) * 512)],
        "/$BootGap": [((last + 1) * 512, start)]}


def test_a_partition_s_bytes_past_its_filesystem_are_named(tmp_path):
    """ext4 made smaller than its partition (mke2fs with a size): the rest of
    the partition is /$BeyondFilesystem, from where dumpe2fs says the
    filesystem ends to the partition's end (sfdisk)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(image)], check=True, text=True,
                   input="label: dos\nstart=2048, type=83\n")
    start = 2048 * 512
    part = tmp_path / "part.img"
    with open(part, "wb") as f:
        f.truncate((64 << 20) - start)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(part), "8192"], check=True)
    info = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True,
                          check=True).stdout
    blocks = int(re.search(r"^Block count:\s+(\d+)", info, re.M).group(1))
    size = int(re.search(r"^Block size:\s+(\d+)", info, re.M).group(1))
    with open(image, "r+b") as f:
        f.seek(start)
        f.write(part.read_bytes())
    with FileSource(str(image), readonly=True) as src:
        entries = map_metadata(src, done_event=False).entries
    beyond = [(e.start, e.end) for e in entries if e.path == "/$BeyondFilesystem"]
    assert beyond == [(start + blocks * size, 64 << 20)]
