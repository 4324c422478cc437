"""Session-scoped fixtures that build real disk images.

Each image is built once per session, in its own tmp_path_factory directory,
only when a test asks for it. Every fixture returns a ``DiskImage``:

- ``path``, ``size`` (bytes), ``label`` (``dos``/``gpt``)
- ``partitions``: ``Volume(device, offset, length, fstype, kind)`` for every
  partition and logical volume, named as libguestfs names them (``/dev/sda1``,
  ``/dev/vg0/data``), offsets and lengths in bytes from the start of the disk;
  ``kind`` is the bmap TYPE (``p`` partition, ``l`` LV)
- ``files``: device -> {path inside the filesystem: size in bytes}, every
  regular file; ``dirs``: device -> directories (``/`` excluded, ext4's
  ``/lost+found`` included);
  ``symlinks``: device -> {path: target}
- ``fragmented``: (device, path) of a file deliberately split into many
  extents, when the image has one
- ``guest``: the ``GuestImage`` (boot command, files read/written) for the
  guest images

Ground truth for ext4 is in ``groundtruth.py``.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from diskwatch.demo.guest import (
    GuestImage,
    MiB,
    build_guest_image,
    make_partition_table,
    mkfs_ext4_at,
    require_tool,
)

GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
MBR_LINUX, MBR_LVM = "83", "8e"

# libguestfs under TCG: KVM hangs on these machines (see DESIGN.md).
GUESTFS_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


@dataclass(frozen=True)
class Volume:
    device: str  # as libguestfs names it: /dev/sda1, /dev/vg0/data
    offset: int  # bytes from the start of the disk
    length: int
    fstype: str  # ext4, vfat, LVM2_member
    kind: str = "p"  # bmap TYPE: p partition, l logical volume


@dataclass
class DiskImage:
    path: Path
    size: int
    label: str
    partitions: list[Volume]
    files: dict[str, dict[str, int]] = field(default_factory=dict)
    dirs: dict[str, list[str]] = field(default_factory=dict)
    symlinks: dict[str, dict[str, str]] = field(default_factory=dict)
    fragmented: tuple[str, str] | None = None
    guest: GuestImage | None = None
    #: device -> the partition made in a file of its own (NTFS: ntfsinfo reads it)
    partition_images: dict[str, Path] = field(default_factory=dict)

    def volume(self, device: str) -> Volume:
        for v in self.partitions:
            if v.device == device:
                return v
        raise KeyError(f"{device}: not a volume of {self.path}")

    def all_files(self) -> Iterator[tuple[str, str, int]]:
        """(device, path, size) of every regular file of every filesystem."""
        for device, files in self.files.items():
            for path, size in files.items():
                yield device, path, size


# --------------------------------------------------------------------------
# Trees


def content(seed: str, size: int) -> bytes:
    """Deterministic, incompressible bytes: a test can check what it read back."""
    return random.Random(seed).randbytes(size)


def write_tree(root: Path, files: dict[str, int]) -> None:
    for path, size in files.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content(path, size))


def scan_tree(root: Path) -> tuple[dict[str, int], list[str], dict[str, str]]:
    """(files -> size, directories, symlinks -> target) of a local tree, as absolute fs paths."""
    files, dirs, links = {}, [], {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = "/" + os.fspath(p.relative_to(root))
            if p.is_symlink():
                links[rel] = os.readlink(p)
            elif p.is_dir():
                dirs.append(rel)
            elif p.is_file():
                files[rel] = p.stat().st_size
    return dict(sorted(files.items())), sorted(dirs), links


EXT4_MBR_FILES = {
    "/one-byte": 1,
    "/empty": 0,
    "/small/hundred.txt": 100,
    "/small/block-minus-one.bin": 4095,
    "/small/block-plus-one.bin": 4097,
    "/small/ten-k.bin": 10 * 1024,
    "/big/three-mib.bin": 3 * MiB,
    "/deep/level 1/level2/level3/level4/leaf.txt": 777,
    "/Program Files (x86)/Real Time/log 0.txt": 5000,
    "/Program Files (x86)/Real Time/read me now.txt": 1234,
}


def _make_image_file(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # sparse


def build_ext4_mbr_image(path: Path, work: Path) -> DiskImage:
    """MBR disk, one ext4 partition from a tree, plus a file split into many extents.

    The fragmented file: the tree holds 40 filler files of 8 KiB laid out one
    after another; debugfs deletes every other one and then writes a 160 KiB
    file, which the allocator puts into the 2-block holes.
    """
    require_tool("debugfs")
    tree = work / "ext4-mbr-tree"
    write_tree(tree, EXT4_MBR_FILES)
    fillers = {f"/filler/f{i:03d}": 8192 for i in range(40)}
    write_tree(tree, fillers)
    (tree / "link-to-one-byte").symlink_to("one-byte")
    (tree / "deep/level 1/up").symlink_to("../small/hundred.txt")
    files, dirs, links = scan_tree(tree)

    size = 64 * MiB
    _make_image_file(path, size)
    ((offset, length),) = make_partition_table(path, "dos", [(None, MBR_LINUX)])
    mkfs_ext4_at(path, offset, length, tree, label="mbr-ext4")

    frag_path, frag_size = "/fragmented.bin", 160 * 1024
    frag_src = work / "fragmented.src"
    frag_src.write_bytes(content(frag_path, frag_size))
    deleted = [p for i, p in enumerate(fillers) if i % 2 == 1]
    commands = [f"rm {p}" for p in deleted] + [f"write {frag_src} {frag_path}"]
    cmdfile = work / "fragment.debugfs"
    cmdfile.write_text("\n".join(commands) + "\n")
    subprocess.run(
        ["debugfs", "-w", "-f", os.fspath(cmdfile), f"{path}?offset={offset}"],
        check=True,
        capture_output=True,
    )
    for p in deleted:
        del files[p]
    files[frag_path] = frag_size
    return DiskImage(
        path=path,
        size=size,
        label="dos",
        partitions=[Volume("/dev/sda1", offset, length, "ext4")],
        files={"/dev/sda1": dict(sorted(files.items()))},
        dirs={"/dev/sda1": sorted([*dirs, "/lost+found"])},
        symlinks={"/dev/sda1": links},
        fragmented=("/dev/sda1", frag_path),
    )


GPT_EXT4_FILES = {
    "/etc/config.txt": 300,
    "/data/a/b/c/nested.bin": 20000,
    "/data/with space/file name.txt": 2048,
    "/data/two-mib.bin": 2 * MiB,
}
GPT_FAT_FILES = {
    "/readme.txt": 1500,
    "/Docs/Read Me First.txt": 3000,
    "/Docs/Nested/Deeper/deepest.bin": 9000,
    "/Docs/Nested/other.dat": 70000,
    "/Pictures/large picture.bmp": 1536 * 1024,
}


def build_gpt_fat_image(path: Path, work: Path) -> DiskImage:
    """GPT disk: partition 1 ext4 (1 KiB blocks), partition 2 FAT (mkfs.vfat + mcopy)."""
    mkfs_vfat = require_tool("mkfs.vfat")
    mcopy, mmd = require_tool("mcopy"), require_tool("mmd")
    ext4_tree = work / "gpt-ext4-tree"
    write_tree(ext4_tree, GPT_EXT4_FILES)
    ext4_files, ext4_dirs, _ = scan_tree(ext4_tree)

    size = 96 * MiB
    _make_image_file(path, size)
    (p1, l1), (p2, l2) = make_partition_table(
        path, "gpt", [(40 * MiB, GPT_LINUX), (None, GPT_BASIC_DATA)]
    )
    mkfs_ext4_at(path, p1, l1, ext4_tree, block_size=1024, label="gpt-ext4")

    # mkfs.fat writes straight into the partition (offset in sectors, size in KiB).
    subprocess.run(
        [mkfs_vfat, "-n", "GPTFAT", "-i", "2a2b2c2d", "--offset", str(p2 // 512),
         "-h", str(p2 // 512), os.fspath(path), str(l2 // 1024)],
        check=True, capture_output=True,
    )  # fmt: skip
    fat_tree = work / "gpt-fat-tree"
    write_tree(fat_tree, GPT_FAT_FILES)
    fat_files, fat_dirs, _ = scan_tree(fat_tree)
    image = f"{path}@@{p2}"  # mtools: the filesystem starts p2 bytes into the file
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for d in fat_dirs:
        subprocess.run([mmd, "-i", image, "::" + d], check=True, capture_output=True, env=env)
    for f in fat_files:
        subprocess.run(
            [mcopy, "-i", image, os.fspath(fat_tree / f.lstrip("/")), "::" + f],
            check=True,
            capture_output=True,
            env=env,
        )
    return DiskImage(
        path=path,
        size=size,
        label="gpt",
        partitions=[
            Volume("/dev/sda1", p1, l1, "ext4"),
            Volume("/dev/sda2", p2, l2, "vfat"),
        ],
        files={"/dev/sda1": ext4_files, "/dev/sda2": fat_files},
        dirs={"/dev/sda1": sorted([*ext4_dirs, "/lost+found"]), "/dev/sda2": fat_dirs},
        symlinks={"/dev/sda1": {}, "/dev/sda2": {}},
    )


LVM_FILES = {
    "/dev/vg0/data": {
        "/hello.txt": 13,
        "/docs/report final.txt": 6000,
        "/docs/sub/dir/deep.bin": 50000,
        "/blob.bin": 1 * MiB,
    },
    "/dev/vg0/logs": {
        "/syslog": 20000,
        "/app/app.log": 4096,
        "/app/old/app.log.1": 8191,
    },
}
LVM_SIZES_MB = {"data": 24, "logs": 16}


def build_lvm_image(path: Path, work: Path) -> DiskImage:
    """MBR disk, one LVM PV partition, VG vg0 with two ext4 LVs; built through libguestfs."""
    os.environ.update(GUESTFS_ENV)
    try:
        import guestfs
    except ImportError:
        pytest.fail("python3-guestfs is missing: `apt-get install python3-guestfs`")

    size = 64 * MiB
    _make_image_file(path, size)
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    try:
        g.add_drive_opts(os.fspath(path), format="raw", readonly=False)
        g.launch()
        g.part_init("/dev/sda", "mbr")
        g.part_add("/dev/sda", "p", 2048, -2048)
        g.part_set_mbr_id("/dev/sda", 1, 0x8E)
        g.pvcreate("/dev/sda1")
        g.vgcreate("vg0", ["/dev/sda1"])
        for lv, mb in LVM_SIZES_MB.items():
            g.lvcreate(lv, "vg0", mb)
        for device, files in LVM_FILES.items():
            g.mkfs("ext4", device, blocksize=4096)
            g.mount(device, "/")
            for p, n in files.items():
                g.mkdir_p(os.path.dirname(p))
                g.write(p, content(device + p, n))
            g.umount("/")
        g.sync()
        # Where each LV sits on the disk: PV data start + first extent x extent size.
        report = g.debug(
            "sh",
            ["lvm lvs --noheadings --units b --nosuffix --separator : "
             "-o lv_name,vg_extent_size,seg_pe_ranges vg0"],
        )  # fmt: skip
        pe_start = g.pvs_full()[0]["pe_start"]
        part = {p["part_num"]: p for p in g.part_list("/dev/sda")}[1]
        g.shutdown()
    finally:
        g.close()

    part_offset, part_length = part["part_start"], part["part_size"]
    volumes = [Volume("/dev/sda1", part_offset, part_length, "LVM2_member")]
    for line in report.split():
        lv, extent, ranges = line.strip().split(":", 2)
        # seg_pe_ranges: /dev/sda1:FIRST-LAST (one linear segment: the LVs were made in turn)
        first, last = (int(x) for x in ranges.rsplit(":", 1)[1].split("-"))
        offset = part_offset + pe_start + first * int(extent)
        volumes.append(
            Volume(f"/dev/vg0/{lv}", offset, (last - first + 1) * int(extent), "ext4", "l")
        )
    dirs = {
        d: sorted({os.path.dirname(p) for p in files} - {"/"}) for d, files in LVM_FILES.items()
    }
    for d in dirs:  # parents of parents
        parents = {"/".join(x.split("/")[:i]) for x in dirs[d] for i in range(2, 10)}
        dirs[d] = sorted(parents - {""} | {"/lost+found"})
    return DiskImage(
        path=path,
        size=size,
        label="dos",
        partitions=volumes,
        files={d: dict(sorted(f.items())) for d, f in LVM_FILES.items()},
        dirs=dirs,
        symlinks={d: {} for d in LVM_FILES},
    )


def build_many_files_image(path: Path, work: Path, count: int = 10_000) -> DiskImage:
    """~1 GiB sparse MBR/ext4 image holding ``count`` files in a 3-level tree (~200 MB of data).

    Sizes are mostly small (a few KiB), some tens of KiB, a few up to 1 MiB.
    """
    rng = random.Random(1234)
    files: dict[str, int] = {}
    for i in range(count):
        top, mid = i % 10, (i // 10) % 10
        r = rng.random()
        if r < 0.80:
            size = rng.randint(0, 8 * 1024)
        elif r < 0.98:
            size = rng.randint(8 * 1024, 64 * 1024)
        else:
            size = rng.randint(64 * 1024, MiB)
        name = f"file {i:05d}.dat" if i % 7 == 0 else f"file{i:05d}.dat"
        files[f"/top{top:02d}/mid{mid:02d}/{name}"] = size
    tree = work / "many-files-tree"
    chunk = random.Random(99).randbytes(MiB + 4096)
    for p, n in files.items():
        f = tree / p.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        start = hash(p) % 4096
        f.write_bytes(chunk[start : start + n])
    files_found, dirs, _ = scan_tree(tree)
    size = 1024 * MiB
    _make_image_file(path, size)
    ((offset, length),) = make_partition_table(path, "dos", [(None, MBR_LINUX)])
    mkfs_ext4_at(path, offset, length, tree, label="many-files")
    shutil.rmtree(tree)
    return DiskImage(
        path=path,
        size=size,
        label="dos",
        partitions=[Volume("/dev/sda1", offset, length, "ext4")],
        files={"/dev/sda1": files_found},
        dirs={"/dev/sda1": sorted([*dirs, "/lost+found"])},
        symlinks={"/dev/sda1": {}},
    )


def guest_disk(guest: GuestImage) -> DiskImage:
    device = "/dev/sda1"
    return DiskImage(
        path=guest.path,
        size=guest.size,
        label="dos",
        partitions=[Volume(device, guest.partition_offset, guest.partition_length, "ext4")],
        files={device: dict(guest.files)},
        dirs={device: list(guest.dirs)},
        symlinks={device: dict(guest.symlinks)},
        guest=guest,
    )


# --------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def ext4_mbr_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    work = tmp_path_factory.mktemp("ext4-mbr")
    return build_ext4_mbr_image(work / "ext4-mbr.img", work)


@pytest.fixture(scope="session")
def gpt_fat_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    work = tmp_path_factory.mktemp("gpt-fat")
    return build_gpt_fat_image(work / "gpt-fat.img", work)


@pytest.fixture(scope="session")
def lvm_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    work = tmp_path_factory.mktemp("lvm")
    return build_lvm_image(work / "lvm.img", work)


@pytest.fixture(scope="session")
def many_files_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    work = tmp_path_factory.mktemp("many-files")
    return build_many_files_image(work / "many-files.img", work)


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    """The demo guest (reads a few files, writes /var/log/demo.log 5 times, powers off)."""
    work = tmp_path_factory.mktemp("guest")
    return guest_disk(build_guest_image(work / "guest.img"))


@pytest.fixture(scope="session")
def churn_guest_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    """The churn guest: also rewrites /var/log/av/*.log and re-reads a 4 MiB file, 30 passes."""
    work = tmp_path_factory.mktemp("churn-guest")
    return guest_disk(build_guest_image(work / "churn-guest.img", churn=True))


# --------------------------------------------------------------------------
# NTFS: a Windows-like disk (two NTFS partitions on MBR)

NTFS_SYSTEM_FILES = {
    "/bootmgr": 400 * 1024,
    "/Boot/BCD": 24 * 1024,
    "/Boot/en-US/bootmgr.exe.mui": 80 * 1024,
    "/Boot/Fonts/wgl4_boot.ttf": 45 * 1024,
}
NTFS_C_FILES = {
    "/pagefile.sys": 6 * MiB,
    "/Windows/System32/config/SYSTEM": 1536 * 1024,
    "/Windows/System32/config/SOFTWARE": 2 * MiB,
    "/Windows/System32/config/SAM": 256 * 1024,
    "/Windows/System32/config/SECURITY": 256 * 1024,
    "/Windows/System32/config/DEFAULT": 384 * 1024,
    "/Windows/System32/drivers/ntfs.sys": 1200 * 1024,
    "/Windows/System32/drivers/disk.sys": 60 * 1024,
    "/Windows/System32/drivers/etc/hosts": 824,
    "/Windows/System32/kernel32.dll": 700 * 1024,
    "/Windows/System32/ntdll.dll": 1300 * 1024,
    "/Windows/System32/user32.dll": 800 * 1024,
    "/Windows/System32/winload.exe": 500 * 1024,
    "/Windows/Logs/CBS/CBS.log": 90 * 1024,
    "/Windows/Logs/DISM/dism.log": 33 * 1024,
    "/Windows/Fonts/arial.ttf": 360 * 1024,
    "/Program Files/Common Files/System/ole db/oledb32.dll": 600 * 1024,
    "/Program Files/Internet Explorer/iexplore.exe": 700 * 1024,
    "/Users/Public/Documents/Résumé final.docx": 40 * 1024,
    "/Users/Public/Documents/Über Straße.txt": 9000,
    "/Users/Public/日本語のファイル.txt": 12000,
    "/ProgramData/Microsoft/Windows/Start Menu/desktop.ini": 1200,
}
#: written interleaved, 16 KiB at a time, so each is split into many runs
NTFS_FRAGMENTED = [f"/Windows/Temp/interleaved{i}.tmp" for i in range(4)]
NTFS_RESIDENT = "/Windows/win.ini"  # 92 bytes: stays in its MFT record
NTFS_SPARSE = "/Windows/sparse.dat"  # 4 KiB, a 4 MiB hole, 4 KiB
NTFS_COMPRESSED = "/Windows/Compressed/setup.log"  # in a directory with the compressed attribute
NTFS_ADS = ("/Users/Public/Documents/Résumé final.docx", "Zone.Identifier")


def _ntfs_partition(path: Path, size: int, label: str, start_sector: int) -> None:
    mkntfs = require_tool("mkntfs")
    _make_image_file(path, size)
    subprocess.run(
        [mkntfs, "-q", "-F", "-f", "-L", label, "-p", str(start_sector), "-H", "255", "-S", "63",
         os.fspath(path)], check=True, capture_output=True,
    )  # fmt: skip


def _fill_ntfs(part: Path, mnt: Path, fill) -> None:
    """Mount ``part`` with ntfs-3g (FUSE), run ``fill(mountpoint)``, unmount."""
    ntfs3g = require_tool("ntfs-3g")
    mnt.mkdir(exist_ok=True)
    proc = subprocess.run([ntfs3g, "-o", "compression", os.fspath(part), os.fspath(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"ntfs-3g cannot mount (is /dev/fuse usable?): {proc.stderr.strip()}")
    try:
        fill(mnt)
    finally:
        subprocess.run(["umount", os.fspath(mnt)], check=True, capture_output=True)


def _copy_into(disk: Path, part: Path, offset: int) -> None:
    """Copy a partition image into the disk image at ``offset``, keeping holes."""
    chunk = 1 << 20
    zero = bytes(chunk)
    with open(part, "rb") as src, open(disk, "r+b") as dst:
        pos = 0
        while True:
            data = src.read(chunk)
            if not data:
                break
            if data != zero[: len(data)]:
                os.pwrite(dst.fileno(), data, offset + pos)
            pos += len(data)


def build_ntfs_image(path: Path, work: Path) -> DiskImage:
    """MBR disk: /dev/sda1 "System Reserved" (NTFS, 24 MiB, boot files) and
    /dev/sda2 "C:" (NTFS) with a Windows-like tree, interleaved (fragmented)
    files, a resident file, a sparse file, a compressed file, an alternate
    data stream, and names with spaces, accents and Japanese. Each partition
    is made in its own file (kept: ``ntfsinfo`` reads them for the ground
    truth) and copied into the disk."""
    size = 96 * MiB
    _make_image_file(path, size)
    (p1, l1), (p2, l2) = make_partition_table(path, "dos", [(24 * MiB, "7"), (None, "7")])
    sysres, cdrive = work / "sysres.ntfs", work / "c.ntfs"
    _ntfs_partition(sysres, l1, "System Reserved", p1 // 512)
    _ntfs_partition(cdrive, l2, "Windows", p2 // 512)

    def fill_system(root: Path) -> None:
        write_tree(root, NTFS_SYSTEM_FILES)

    def fill_c(root: Path) -> None:
        write_tree(root, NTFS_C_FILES)
        (root / "Windows/Temp").mkdir(parents=True, exist_ok=True)
        handles = [open(root / p.lstrip("/"), "wb") for p in NTFS_FRAGMENTED]
        for i in range(24):
            for k, h in enumerate(handles):
                h.write(content(f"{NTFS_FRAGMENTED[k]}{i}", 16 * 1024))
                h.flush()
        for h in handles:
            h.close()
        (root / NTFS_RESIDENT.lstrip("/")).write_bytes(b"; for 16-bit app support\r\n" * 3 + b"\r\n")
        with open(root / NTFS_SPARSE.lstrip("/"), "wb") as f:
            f.write(content(NTFS_SPARSE, 4096))
            f.seek(4 * MiB + 4096)
            f.write(content(NTFS_SPARSE + "2", 4096))
        comp = root / os.path.dirname(NTFS_COMPRESSED).lstrip("/")
        comp.mkdir(parents=True)
        os.setxattr(comp, "system.ntfs_attrib_be", (0x800).to_bytes(4, "big"))
        (comp / os.path.basename(NTFS_COMPRESSED)).write_bytes(
            b"".join(b"%06d setup: installing component %d ... ok\n" % (i, i % 97)
                     for i in range(8000)))
        file, stream = NTFS_ADS
        os.setxattr(root / file.lstrip("/"), f"user.{stream}",
                    b"[ZoneTransfer]\r\nZoneId=3\r\n" + content(stream, 6000))

    _fill_ntfs(sysres, work / "mnt1", fill_system)
    _fill_ntfs(cdrive, work / "mnt2", fill_c)
    _copy_into(path, sysres, p1)
    _copy_into(path, cdrive, p2)
    c_files = dict(NTFS_C_FILES)
    for p in NTFS_FRAGMENTED:
        c_files[p] = 24 * 16 * 1024
    c_files[NTFS_RESIDENT] = 92
    c_files[NTFS_SPARSE] = 4 * MiB + 8192
    c_files[NTFS_COMPRESSED] = 8000 * 43
    c_dirs = sorted({"/".join(p.split("/")[:i]) for p in c_files for i in range(2, p.count("/") + 1)})
    s_dirs = sorted({"/".join(p.split("/")[:i]) for p in NTFS_SYSTEM_FILES
                     for i in range(2, p.count("/") + 1)})
    return DiskImage(
        path=path,
        size=size,
        label="dos",
        partitions=[Volume("/dev/sda1", p1, l1, "ntfs"), Volume("/dev/sda2", p2, l2, "ntfs")],
        files={"/dev/sda1": dict(sorted(NTFS_SYSTEM_FILES.items())),
               "/dev/sda2": dict(sorted(c_files.items()))},
        dirs={"/dev/sda1": s_dirs, "/dev/sda2": c_dirs},
        symlinks={"/dev/sda1": {}, "/dev/sda2": {}},
        fragmented=("/dev/sda2", NTFS_FRAGMENTED[0]),
        partition_images={"/dev/sda1": sysres, "/dev/sda2": cdrive},
    )


@pytest.fixture(scope="session")
def ntfs_image(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    work = tmp_path_factory.mktemp("ntfs")
    return build_ntfs_image(work / "ntfs.img", work)


def make_map(image: Path, out: Path) -> Path:
    """A block map of ``image`` made by ``diskwatch bmap`` (libguestfs through diskwatch)."""
    if not out.exists():
        diskwatch = str(Path(sys.executable).with_name("diskwatch"))
        r = subprocess.run([diskwatch, "bmap", str(image), "-o", str(out), "--accel", "tcg"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert "ranges written" in r.stderr  # the closing counts (either method's)
    return out


@pytest.fixture(scope="session")
def guest_map(guest_image: DiskImage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo guest's block map (shared by the boot and the attach tests)."""
    return make_map(guest_image.path, tmp_path_factory.mktemp("guest-map") / "guest.bmap")
