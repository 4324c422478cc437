"""Block maps from metadata of the other filesystems a VM's disk may hold:
ISO 9660 (an installer's CD-ROM) and exFAT (a USB stick image).

Ground truth comes from elsewhere: isoinfo (genisoimage's reader) lists
each tree's directories and each file's extent; and the data itself, since
every file holds bytes unique to it: what the map names as a file, read
from the image, must be that file's content, and a directory's sectors must
hold its children's names as the filesystem encodes them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from fixtures_images import GUESTFS_ENV, content

from diskwatch.bmap.metadata import map_metadata
from diskwatch.sources.file import FileSource

MiB = 1 << 20
SECTOR = 2048

ISO_FILES = {
    "/boot/vmlinuz": 3 * MiB + 123,
    "/boot/grub/grub.cfg": 1500,
    "/empty": 0,
    "/one-byte": 1,
    "/exactly-a-sector": SECTOR,
    "/a sector and one": SECTOR + 1,
    "/pool/main/Überraschung ünïcode.deb": 70_000,
    "/pool/main/a-name-longer-than-sixty-four-characters-which-joliet-allows-with-a-flag.txt":
        5000,
    "/install/deep/er/still/file.txt": 10,
}


def by_object(entries) -> dict[tuple[str, str], list[tuple[int, int]]]:
    out: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for e in entries:
        out[(e.type, e.path)].append((e.start, e.end))
    return {k: sorted(v) for k, v in out.items()}


def read_ranges(image: Path, ranges: list[tuple[int, int]]) -> bytes:
    with open(image, "rb") as f:
        return b"".join(os.pread(f.fileno(), e - s, s) for s, e in ranges)


# --- ISO 9660 ---------------------------------------------------------------------

def isoinfo_listing(iso: Path, *how: str) -> dict[str, tuple[bool, int, int]]:
    """path -> (is a directory, extent LBA, size), as isoinfo lists a tree."""
    out = subprocess.run(["isoinfo", *how, "-l", "-i", str(iso)], capture_output=True,
                         check=True).stdout.decode("utf-8", "surrogateescape")
    listing: dict[str, tuple[bool, int, int]] = {}
    here = "/"
    for line in out.splitlines():
        m = re.match(r"Directory listing of (.*)$", line)
        if m:
            here = m[1]
            continue
        m = re.match(r"([d-])\S{9}\s+\d+\s+\d+\s+\d+\s+(\d+) .{11}\s+\[\s*(\d+) \d+\]  (.*?) ?$",
                     line)
        if m and m[4] not in (".", ".."):
            listing[here + m[4]] = (m[1] == "d", int(m[3]), int(m[2]))
    return listing


@pytest.fixture(scope="session")
def iso(tmp_path_factory) -> Path:
    if shutil.which("genisoimage") is None:
        pytest.fail("genisoimage is missing: apt-get install genisoimage")
    work = tmp_path_factory.mktemp("iso")
    tree = work / "tree"
    for path, size in ISO_FILES.items():
        p = tree / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content(path, size))
    image = work / "installer.iso"
    subprocess.run(["genisoimage", "-quiet", "-R", "-J", "-joliet-long", "-input-charset",
                    "utf-8", "-o", str(image), str(tree)], check=True)
    return image


@pytest.fixture(scope="session")
def iso_map(iso):
    with FileSource(str(iso), readonly=True) as src:
        result = map_metadata(src)
    assert not result.warnings, result.warnings
    return by_object(result.entries)


def test_iso_files_are_where_isoinfo_says_and_hold_their_bytes(iso, iso_map):
    truth = isoinfo_listing(iso, "-R")
    for path, size in ISO_FILES.items():
        is_dir, lba, listed = truth[path]
        assert not is_dir and listed == size, path
        mapped = iso_map.get(("f", path), [])
        expected = [(lba * SECTOR, lba * SECTOR + -(-size // SECTOR) * SECTOR)] if size else []
        assert mapped == expected, path
        assert read_ranges(iso, mapped)[:size] == content(path, size), path


@pytest.mark.parametrize("tree", ["-R", "-J"])
def test_iso_directories_of_both_trees_are_named(iso, iso_map, tree):
    """Rock Ridge's primary tree (what Linux reads) and Joliet's (what
    Windows reads) keep their directories in different sectors."""
    how = [tree] + (["-j", "iso8859-1"] if tree == "-J" else [])  # isoinfo has no utf-8
    dirs = {p: lba for p, (is_dir, lba, _) in isoinfo_listing(iso, *how).items() if is_dir}
    assert "/pool/main" in dirs and "/install/deep/er/still" in dirs
    for path, lba in dirs.items():
        extents = [s for s, _ in iso_map.get(("d", path), [])]
        assert lba * SECTOR in extents, (tree, path)


@pytest.mark.parametrize("rock_ridge", [True, False])
def test_an_iso_with_one_tree_names_each_object_once(iso, tmp_path, rock_ridge):
    """Rock Ridge alone (Linux's names, which TSK does not read), or plain
    ISO 9660 names (what TSK reads)."""
    plain = tmp_path / "plain.iso"
    how = ["-R"] if rock_ridge else []
    subprocess.run(["genisoimage", "-quiet", *how, "-o", str(plain),
                    str(iso.parent / "tree")], check=True)
    with FileSource(str(plain), readonly=True) as src:
        result = map_metadata(src)
    mapped = by_object(result.entries)
    listing = isoinfo_listing(plain, *how)
    for path, (is_dir, lba, size) in listing.items():
        if not rock_ridge and not is_dir:
            path = path.split(";")[0].rstrip(".")
        expected = [(lba * SECTOR, lba * SECTOR + -(-size // SECTOR) * SECTOR)] if size else []
        assert mapped.get(("d" if is_dir else "f", path), []) == expected, path
    assert result.filesystems[0].directories == sum(d for d, _, _ in listing.values()) + 1
    assert len(mapped[("f", "/$PathTable")]) == 2  # L and M, one tree


def test_iso_descriptors_and_path_tables_are_named(iso, iso_map):
    (descriptors,) = iso_map[("f", "/$VolumeDescriptors")]
    assert descriptors[0] == 16 * SECTOR
    with open(iso, "rb") as f:
        data = os.pread(f.fileno(), descriptors[1] - descriptors[0], descriptors[0])
    # primary, Joliet's supplementary, then the terminator, each "CD001"
    kinds = [data[i] for i in range(0, len(data), SECTOR) if data[i + 1:i + 6] == b"CD001"]
    assert kinds[0] == 1 and 2 in kinds and kinds[-1] == 255
    assert len(kinds) * SECTOR == len(data)
    assert len(iso_map[("f", "/$PathTable")]) == 4  # L and M, for each tree


def test_rock_ridge_long_names_and_relocated_directories(tmp_path):
    """A name too long for its directory record goes on in a continuation
    area (SUSP CE); a directory deeper than ISO 9660's eight levels is
    moved to /rr_moved and linked back (CL, RE). Both are named as Linux
    shows them: the whole name, the directory where it was made."""
    long = "/" + "a-long-rock-ridge-name-" * 9 + ".txt"  # 211 characters
    deep = "/" + "/".join(f"level{i}" for i in range(1, 11)) + "/deep.txt"
    files = {long: 3000, deep: 5000}
    tree = tmp_path / "tree"
    for path, size in files.items():
        p = tree / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content(path, size))
    image = tmp_path / "rr.iso"
    subprocess.run(["genisoimage", "-quiet", "-R", "-o", str(image), str(tree)], check=True)
    with FileSource(str(image), readonly=True) as src:
        result = map_metadata(src)
    mapped = by_object(result.entries)
    listing = isoinfo_listing(image, "-R")  # isoinfo leaves the relocation as it is
    moved = "/rr_moved/level8/level9/level10/deep.txt"
    for path, where in ((long, long), (deep, moved)):
        _, lba, size = listing[where]
        assert mapped.get(("f", path)) == [(lba * SECTOR, lba * SECTOR + -(-size // SECTOR)
                                            * SECTOR)], path
        assert read_ranges(image, mapped[("f", path)])[:size] == content(path, size)
    assert ("f", moved) not in mapped
    for depth in range(1, 11):
        path = "/" + "/".join(f"level{i}" for i in range(1, depth + 1))
        where = path if depth < 8 else "/rr_moved/" + path.split("/", 8)[8]
        _, lba, _ = listing[where]
        assert mapped.get(("d", path)) == [(lba * SECTOR, (lba + 1) * SECTOR)], path


class _CountingSource(FileSource):
    """Counts the bytes read; refuses to go on past a limit far above any
    bound the reader should keep (so a test fails rather than hangs)."""

    def __init__(self, path: str, limit: int):
        super().__init__(path, readonly=True)
        self.read_bytes, self.limit = 0, limit

    def pread(self, offset: int, length: int) -> bytes:
        self.read_bytes += length
        if self.read_bytes > self.limit:
            raise AssertionError(f"read {self.read_bytes} bytes of directories")
        return super().pread(offset, length)


def _iso_record(lba: int, size: int, ident: bytes, is_dir: bool) -> bytes:
    n = 33 + len(ident) + (1 - len(ident) % 2)
    rec = bytearray(n)
    rec[0] = n
    rec[2:10] = lba.to_bytes(4, "little") + lba.to_bytes(4, "big")
    rec[10:18] = size.to_bytes(4, "little") + size.to_bytes(4, "big")
    rec[25] = 2 if is_dir else 0
    rec[32] = len(ident)
    rec[33:33 + len(ident)] = ident
    return bytes(rec)


def test_a_hostile_iso_cannot_make_the_walk_read_without_end(tmp_path):
    """Directory records are the image's word: a hundred directories that
    each claim 60 MiB (overlapping) must not cost 6 GiB of reads."""
    image = tmp_path / "hostile.iso"
    root_lba, claimed = 18, 60 * MiB
    with open(image, "wb") as f:
        f.truncate(80 * MiB)
        pvd = bytearray(SECTOR)
        pvd[0:7] = b"\x01CD001\x01"
        pvd[156:190] = _iso_record(root_lba, 4 * SECTOR, b"\x00", True)
        f.seek(16 * SECTOR)
        f.write(bytes(pvd) + b"\xffCD001\x01".ljust(SECTOR, b"\x00"))
        records = [_iso_record(root_lba, 4 * SECTOR, b"\x00", True),
                   _iso_record(root_lba, 4 * SECTOR, b"\x01", True)]
        records += [_iso_record(40 + i, claimed, b"D%02d" % i, True) for i in range(100)]
        root = bytearray()
        for rec in records:  # records do not cross sectors
            if len(root) % SECTOR + len(rec) > SECTOR:
                root += bytes(SECTOR - len(root) % SECTOR)
            root += rec
        f.seek(root_lba * SECTOR)
        f.write(root)
    from diskwatch.bmap.iso import IsoLayout
    src = _CountingSource(str(image), limit=2 << 30)
    with src:
        layout = IsoLayout(src)
        objects = layout.walk(layout.primary, joliet=False)
    assert src.read_bytes <= IsoLayout.MAX_DIRECTORY_BYTES + 64 * MiB
    assert ("/", True, [(root_lba * SECTOR, (root_lba + 4) * SECTOR)]) in objects


def build_deep_iso(image: Path, depth: int = 1500) -> None:
    """A chain of ``depth`` directories, each with a name of 221 characters
    (paths that grow with depth: 1500 levels hold 250 MB of names)."""
    first = 18
    with open(image, "wb") as f:
        f.truncate((first + depth + 1) * SECTOR)
        pvd = bytearray(SECTOR)
        pvd[0:7] = b"\x01CD001\x01"
        pvd[156:190] = _iso_record(first, SECTOR, b"\x00", True)
        f.seek(16 * SECTOR)
        f.write(bytes(pvd) + b"\xffCD001\x01".ljust(SECTOR, b"\x00"))
        for k in range(depth):
            lba = first + k
            f.seek(lba * SECTOR)
            f.write(_iso_record(lba, SECTOR, b"\x00", True)
                    + _iso_record(lba - 1 if k else lba, SECTOR, b"\x01", True)
                    + _iso_record(lba + 1, SECTOR, b"%04d" % k + b"x" * 217, True))


def test_a_hostile_iso_cannot_make_paths_without_end(tmp_path):
    """The deep chain: the walk stops at its bound, and says why."""
    image = tmp_path / "deep.iso"
    build_deep_iso(image)
    from diskwatch.bmap.iso import IsoLayout
    with FileSource(str(image), readonly=True) as src:
        layout = IsoLayout(src)
        objects = layout.walk(layout.primary, joliet=False)
        assert sum(len(path) for path, _, _ in objects) <= IsoLayout.MAX_PATH_BYTES + (64 << 10)
        assert "paths" in layout.cut  # said in the map's warnings


def test_iso_through_the_cli_names_what_a_reader_reads(iso, tmp_path):
    """The whole path a person uses: diskwatch bmap, then nbdcopy through
    diskwatch with that map reading the ISO names the files."""
    bmap = tmp_path / "iso.bmap"
    diskwatch = str(Path(os.sys.executable).with_name("diskwatch"))
    r = subprocess.run([diskwatch, "bmap", str(iso), "-o", str(bmap)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([diskwatch, str(iso), "-r", "--bmap", str(bmap), "--headless",
                        "--run", 'nbdcopy "$uri" null:'], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "/boot/vmlinuz" in r.stdout and "/$VolumeDescriptors" in r.stdout


# --- exFAT (a USB stick's image) -------------------------------------------------------

EXFAT_FILES = {
    "/DCIM/100CANON/IMG_0001.JPG": 2 * MiB + 17,
    "/DCIM/100CANON/IMG_0002.JPG": 300_000,
    "/Documents/Überweisung März.pdf": 40_000,
    "/Documents/a name longer than fifteen characters, in three name entries.txt": 9000,
    "/empty.txt": 0,
    "/one-byte": 1,
}
FRAGMENTED = "/fragmented.log"  # written, then another file, then appended to
GONE = "/deleted.tmp"


@pytest.fixture(scope="session")
def exfat(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A whole-disk exFAT written by Linux's own exfat driver (through
    libguestfs: one appliance launch)."""
    if shutil.which("mkfs.exfat") is None:
        pytest.fail("mkfs.exfat is missing: apt-get install exfatprogs")
    os.environ.update(GUESTFS_ENV)
    import guestfs

    image = tmp_path_factory.mktemp("exfat") / "stick.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.exfat", "-L", "STICK", str(image)], check=True, capture_output=True)
    files = {p: content(p, n) for p, n in EXFAT_FILES.items()}
    files[FRAGMENTED] = content(FRAGMENTED, 3 * 4096 + 100)
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    try:
        g.add_drive_opts(str(image), format="raw", readonly=False)
        g.launch()
        g.mount("/dev/sda", "/")
        g.write(GONE, content(GONE, 50_000))
        g.write(FRAGMENTED, files[FRAGMENTED][:4096])
        g.write("/between.bin", content("/between.bin", 8192))
        g.write_append(FRAGMENTED, files[FRAGMENTED][4096:])
        files["/between.bin"] = content("/between.bin", 8192)
        for path, data in files.items():
            if path not in (FRAGMENTED, "/between.bin"):
                g.mkdir_p(os.path.dirname(path))
                g.write(path, data)
        g.rm(GONE)
        g.umount_all()
        g.shutdown()
    finally:
        g.close()
    return image, files


@pytest.mark.slow
def test_exfat_files_hold_their_bytes_and_nothing_else(exfat):
    image, files = exfat
    with FileSource(str(image), readonly=True) as src:
        result = map_metadata(src)
    assert not result.warnings, result.warnings
    mapped = by_object(result.entries)
    cluster = 4096  # mkfs.exfat's default for 64 MiB
    for path, data in files.items():
        ranges = mapped.get(("f", path), [])
        assert sum(e - s for s, e in ranges) == -(-len(data) // cluster) * cluster, path
        assert read_ranges(image, ranges)[:len(data)] == data, path
    assert len(mapped[("f", FRAGMENTED)]) == 2  # really in two pieces
    assert ("f", GONE) not in mapped
    # the filesystem's own: named once each
    for name in ("/$BootSector", "/$FAT1", "/$ALLOC_BITMAP", "/$UPCASE_TABLE"):
        assert len(mapped[("f", name)]) == 1, name
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), 8, 3) == b"EXFAT   "[:8]
    # each directory's clusters hold its children's names (UTF-16, in name
    # entries of 15 characters)
    children: dict[str, set[str]] = defaultdict(set)
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            children["/".join(parts[:i]) or "/"].add(parts[i])
    for directory, names in children.items():
        raw = read_ranges(image, mapped[("d", directory)])
        for name in names:
            assert name[:15].encode("utf-16-le") in raw, (directory, name)
