"""Maps across disks (issue 20 item 2): LVM volume groups and md RAID over
the disks of one VM, mapped together.

The images are made by libguestfs in one appliance launch (six small raw
disks): an LVM volume group over a partition of disk A and the whole of
disk B, with an ext4 LV spanning both; and an md RAID1 (1.2 metadata) and
RAID0 over partitions of disks C and D, plus a RAID1 with 0.90 metadata
over E and F, and an LVM volume group on an md RAID1 over G and H.
The ground truth is LVM's own report of the LV's segments
(``lvs --segments``, ``pvs -o pe_start``) and mdadm's (``--examine``: the
data offset, the chunk, each member's role), run in the appliance,
combined with debugfs on the LV's or array's content downloaded to a file;
each file's bytes are also read back at the disk offsets the map names.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import time

import pytest
from fixtures_images import GUESTFS_ENV, content
from fixtures_server import SUBPROCESS_ENV, run_diskwatch
from groundtruth import ext4_file_ranges

from diskwatch.bmap.format import read_bmap
from diskwatch.bmap.make import make_bmap
from diskwatch.bmap.worker import run_mapper
from diskwatch.sources.file import FileSource

MiB = 1 << 20
#: files of the spanning LV: several MiB each, so that some cross from disk A's PV to disk B's
LV_FILES = {f"/big/f{i}": 3 * MiB + 4096 * i + 123 for i in range(9)} | {"/small.txt": 5000}
MD_FILES = {"/data/one": 300_000, "/data/two": 1_500_000, "/etc/conf": 900}

pytestmark = pytest.mark.skipif(shutil.which("debugfs") is None, reason="needs e2fsprogs")
#: the tests of the ``vm`` fixture: one libguestfs launch (50-80 s under TCG) for the module
slow = pytest.mark.slow


def _sh(g, cmd: str) -> str:
    return g.debug("sh", [cmd])


def _fill(g, device: str, files: dict[str, int], seed: str = "") -> None:
    g.mkfs("ext4", device, blocksize=4096)
    g.mount(device, "/")
    for p, n in files.items():
        g.mkdir_p(os.path.dirname(p))
        g.write(p, content((seed or device) + p, n))
    g.umount("/")


def _settle(g) -> None:
    """Wait for udev: under a loaded TCG appliance, a partition's device
    node (or an array's) may come after the call that made it returned."""
    _sh(g, "udevadm settle --timeout=60")


def _md_device(g, name: str) -> str:
    """The kernel's device of the array called ``name`` (udev's /dev/md/NAME
    link may not be there yet)."""
    _settle(g)
    for dev in g.list_md_devices():
        if g.md_detail(dev).get("name", "").rsplit(":", 1)[-1] in (name, name[-1:]):
            return dev
    raise AssertionError(f"no md array {name}: {g.list_md_devices()}")


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    """Six raw disks made in one libguestfs launch, and what LVM and mdadm
    say of them."""
    os.environ.update(GUESTFS_ENV)
    guestfs = pytest.importorskip("guestfs")
    d = tmp_path_factory.mktemp("vm-disks")
    sizes = {"a": 24, "b": 40, "c": 24, "d": 24, "e": 16, "f": 16, "g": 20, "h": 20}
    paths = {}
    for name, mb in sizes.items():
        paths[name] = d / f"{name}.img"
        with open(paths[name], "wb") as f:
            f.truncate(mb * MiB)
    t0 = time.monotonic()
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    try:
        for name in sizes:
            g.add_drive_opts(os.fspath(paths[name]), format="raw", readonly=False)
        g.launch()
        # LVM: /dev/sda1 (a partition) and /dev/sdb (a whole disk) in one VG
        g.part_init("/dev/sda", "mbr")
        g.part_add("/dev/sda", "p", 2048, -1)
        g.part_set_mbr_id("/dev/sda", 1, 0x8E)
        _settle(g)
        g.pvcreate("/dev/sda1")
        g.pvcreate("/dev/sdb")
        g.vgcreate("vgx", ["/dev/sda1", "/dev/sdb"])
        g.lvcreate("pad", "vgx", 8)  # the spanning LV starts inside the first PV
        g.lvcreate_free("span", "vgx", 100)
        _fill(g, "/dev/vgx/span", LV_FILES)
        segs = _sh(g, "lvm lvs --segments --noheadings --units b --nosuffix --separator : "
                      "-o lv_name,seg_start,seg_size,vg_extent_size,seg_pe_ranges vgx")
        pe_start = _sh(g, "lvm pvs --noheadings --units b --nosuffix --separator : "
                          "-o pv_name,pe_start")
        g.download("/dev/vgx/span", os.fspath(d / "span.lv"))
        # md: RAID1 (1.2) on sdc1+sdd1, RAID0 (1.2, 64 KiB chunks) on sdc2+sdd2
        for disk in ("/dev/sdc", "/dev/sdd"):
            g.part_init(disk, "mbr")
            g.part_add(disk, "p", 2048, 2048 + 10 * 2048 - 1)
            g.part_add(disk, "p", 2048 + 10 * 2048, -1)
        _settle(g)
        g.md_create("mirror", ["/dev/sdc1", "/dev/sdd1"], level="raid1")
        g.md_create("stripe", ["/dev/sdc2", "/dev/sdd2"], level="raid0", chunk=65536)
        _settle(g)
        examine = {p: _sh(g, f"mdadm --examine {p}")
                   for p in ("/dev/sdc1", "/dev/sdd1", "/dev/sdc2", "/dev/sdd2")}
        # 0.90 metadata (at the members' end) on sde1+sdf1
        for disk in ("/dev/sde", "/dev/sdf"):
            g.part_init(disk, "mbr")
            g.part_add(disk, "p", 2048, -1)
        _settle(g)
        _sh(g, "mdadm --create /dev/md9 --run --metadata=0.90 --level=1 --raid-devices=2 "
               "/dev/sde1 /dev/sdf1")
        # LVM on an md RAID1 over sdg1+sdh1 (a common server layout)
        for disk in ("/dev/sdg", "/dev/sdh"):
            g.part_init(disk, "mbr")
            g.part_add(disk, "p", 2048, -1)
        _settle(g)
        g.md_create("pvraid", ["/dev/sdg1", "/dev/sdh1"], level="raid1")
        pvraid = _md_device(g, "pvraid")
        g.pvcreate(pvraid)
        g.vgcreate("vgr", [pvraid])
        g.lvcreate_free("data", "vgr", 100)
        _fill(g, "/dev/vgr/data", MD_FILES)
        g.download("/dev/vgr/data", os.fspath(d / "data.lv"))
        examine.update((p, _sh(g, f"mdadm --examine {p}")) for p in ("/dev/sdg1", "/dev/sdh1"))
        raid_segs = _sh(g, "lvm lvs --segments --noheadings --units b --nosuffix --separator : "
                           "-o lv_name,seg_start,seg_size,vg_extent_size,seg_pe_ranges vgr")
        raid_pe = _sh(g, f"lvm pvs --noheadings --units b --nosuffix --separator : "
                         f"-o pv_name,pe_start {pvraid}")
        mds = {}
        for name, dev in (("mirror", "/dev/md/mirror"), ("stripe", "/dev/md/stripe"),
                          ("old", "/dev/md9")):
            kernel = dev if dev == "/dev/md9" else _md_device(g, dev.rsplit("/", 1)[-1])
            _fill(g, kernel, MD_FILES, seed=dev)
            g.download(kernel, os.fspath(d / f"{name}.md"))
            mds[name] = dev
        examine.update((p, _sh(g, f"mdadm --examine {p}"))
                       for p in ("/dev/sde1", "/dev/sdf1"))
        parts = {disk: {p["part_num"]: p["part_start"] for p in g.part_list(disk)}
                 for disk in ("/dev/sda", "/dev/sdc", "/dev/sdd", "/dev/sde", "/dev/sdf",
                              "/dev/sdg", "/dev/sdh")}
        g.sync()
        g.shutdown()
    finally:
        g.close()
    return {"dir": d, "paths": paths, "segs": segs, "pe_start": pe_start, "examine": examine,
            "parts": parts, "raid_segs": raid_segs, "raid_pe": raid_pe,
            "built": time.monotonic() - t0}


def _by_file(bmap) -> dict[tuple[str, str], list[tuple[int, int, int]]]:
    out: dict = {}
    for e in read_bmap(bmap):
        if e.type == "f":
            out.setdefault((e.device, e.path), []).append((e.disk, e.start, e.end))
    return out


def _lv_truth(vm) -> tuple[int, list[tuple[int, int, int, int]]]:
    """LVM's own word: the span LV's segments as (LV offset, length, disk
    index in the VM (a=1, b=2), disk offset)."""
    starts = {}
    for line in vm["pe_start"].split():
        name, pe = line.strip().split(":")
        starts[name] = int(pe)
    disk_of = {"/dev/sda1": 1, "/dev/sdb": 2}
    part = {"/dev/sda1": vm["parts"]["/dev/sda"][1], "/dev/sdb": 0}
    out = []
    for line in vm["segs"].split():
        lv, start, size, extent, ranges = line.strip().split(":", 4)
        if lv != "span":
            continue
        pv, pes = ranges.rsplit(":", 1)
        first = int(pes.split("-")[0])
        out.append((int(start), int(size), disk_of[pv],
                    part[pv] + starts[pv] + first * int(extent)))
    return len(out), sorted(out)


def _through(segments, ranges) -> list[tuple[int, int, int]]:
    """Volume byte ranges -> (disk, start, end) through (vol offset, length, disk, disk offset)."""
    out = []
    for s, e in ranges:
        for vs, n, disk, ds in segments:
            lo, hi = max(s, vs), min(e, vs + n)
            if lo < hi:
                out.append((disk, ds + lo - vs, ds + hi - vs))
    return out


def _merged(ranges) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for disk, s, e in sorted(ranges):
        if out and out[-1][0] == disk and out[-1][2] == s:
            out[-1][2] = e
        else:
            out.append([disk, s, e])
    return [tuple(r) for r in out]


def _read_back(images, ranges, size) -> bytes:
    """The bytes at (disk, start, end) of the images, in the order given, cut to ``size``."""
    data = b""
    for disk, s, e in ranges:
        with open(images[disk - 1], "rb") as f:
            f.seek(s)
            data += f.read(e - s)
    return data[:size]


@pytest.fixture(scope="module")
def lvm_map(vm):
    out = vm["dir"] / "lvm.bmap"
    a, b = vm["paths"]["a"], vm["paths"]["b"]
    t0 = time.monotonic()
    made = make_bmap(FileSource(a), out, method="metadata", more=(FileSource(b),))
    return {"path": out, "made": made, "elapsed": time.monotonic() - t0, "images": [a, b]}


@slow
def test_an_lv_spanning_two_disks_is_mapped_as_lvm_and_debugfs_say(vm, lvm_map):
    """Each file's ranges, on disk A (the PV in /dev/sda1) and disk B (the
    whole-disk PV), as LVM's segments and debugfs on the LV's content put
    them; some files cross from one disk to the other."""
    nsegs, segments = _lv_truth(vm)
    assert nsegs == 2 and {s[2] for s in segments} == {1, 2}, segments
    got = _by_file(lvm_map["path"])
    truth = ext4_file_ranges(vm["dir"] / "span.lv", 0, list(LV_FILES))
    crossing = 0
    for path, ranges in truth.items():
        want = _merged(_through(segments, ranges))
        assert _merged(got[("/dev/vgx/span", path)]) == want, path
        crossing += len({disk for disk, _, _ in want}) == 2
        in_order = _through(segments, ranges)  # file order (want is sorted)
        assert _read_back(lvm_map["images"], in_order, LV_FILES[path]) == \
            content("/dev/vgx/span" + path, LV_FILES[path]), path
    assert crossing >= 1
    lines = [ln for ln in open(lvm_map["path"]) if not ln.startswith("#")]
    lv_disks = {ln.split()[0] for ln in lines if " l /dev/vgx/span" in ln}
    assert lv_disks == {"1", "2"}
    assert lvm_map["made"].methods["/dev/vgx/span"] == "metadata"
    assert len(lvm_map["made"].more) == 1
    assert not [w for w in lvm_map["made"].warnings if "span" in w], lvm_map["made"].warnings


def _examine(text: str, field: str) -> str:
    m = re.search(rf"^\s*{field} : (.+)$", text, re.M)
    assert m, (field, text)
    return m.group(1).strip()


@pytest.fixture(scope="module")
def md_map(vm):
    out = vm["dir"] / "md.bmap"
    c, d = vm["paths"]["c"], vm["paths"]["d"]
    made = make_bmap(FileSource(c), out, method="metadata", more=(FileSource(d),))
    return {"path": out, "made": made, "images": [c, d]}


@slow
def test_md_raid1_files_are_named_on_both_members(vm, md_map):
    """RAID1 (mdadm 1.2): each file on each member at the member's data
    offset (mdadm --examine) plus debugfs's ranges in the array."""
    got = _by_file(md_map["path"])
    truth = ext4_file_ranges(vm["dir"] / "mirror.md", 0, list(MD_FILES))
    members = []
    for k, member in ((1, "/dev/sdc1"), (2, "/dev/sdd1")):
        text = vm["examine"][member]
        assert _examine(text, "Version") == "1.2"
        offset = int(_examine(text, "Data Offset").split()[0]) * 512
        members.append((k, vm["parts"][member[:-1]][1] + offset))
    for path, ranges in truth.items():
        want = []
        for k, base in members:
            mine = [(k, base + s, base + e) for s, e in ranges]
            want += mine
            assert _read_back(md_map["images"], mine, MD_FILES[path]) == \
                content("/dev/md/mirror" + path, MD_FILES[path]), path
        assert _merged(got[("/dev/md/mirror", path)]) == _merged(want), path
    assert md_map["made"].methods["/dev/md/mirror"] == "metadata"


@slow
def test_md_raid0_files_are_named_on_their_chunks(vm, md_map):
    """RAID0: array chunk k on member k % 2 at chunk k // 2 after its data
    offset (md's layout; mdadm --examine gives the chunk, the offsets and
    each member's role); and the bytes there are the file's."""
    got = _by_file(md_map["path"])
    truth = ext4_file_ranges(vm["dir"] / "stripe.md", 0, list(MD_FILES))
    role = {}
    for k, member in ((1, "/dev/sdc2"), (2, "/dev/sdd2")):
        text = vm["examine"][member]
        chunk = int(_examine(text, "Chunk Size").rstrip("K")) * 1024
        offset = int(_examine(text, "Data Offset").split()[0]) * 512
        slot = int(_examine(text, "Device Role").split()[-1])
        role[slot] = (k, vm["parts"][member[:-1]][2] + offset)
    assert chunk == 65536
    for path, ranges in truth.items():
        want = []
        for s, e in ranges:
            while s < e:
                k, within = divmod(s, chunk)
                n = min(e - s, chunk - within)
                disk, base = role[k % 2]
                want.append((disk, base + (k // 2) * chunk + within, base + (k // 2) * chunk
                             + within + n))
                s += n
        assert _merged(got[("/dev/md/stripe", path)]) == _merged(want), path
        assert _read_back(md_map["images"], want, MD_FILES[path]) == \
            content("/dev/md/stripe" + path, MD_FILES[path]), path


@slow
def test_md_090_metadata_at_the_end_of_the_members(vm, tmp_path):
    """0.90 metadata: the superblock at the members' end, data from their
    first byte (mdadm --examine says so); named /dev/md9 by its minor."""
    out = tmp_path / "old.bmap"
    e, f = vm["paths"]["e"], vm["paths"]["f"]
    make_bmap(FileSource(e), out, method="metadata", more=(FileSource(f),))
    got = _by_file(out)
    truth = ext4_file_ranges(vm["dir"] / "old.md", 0, list(MD_FILES))
    assert _examine(vm["examine"]["/dev/sde1"], "Version") == "0.90.00"
    for path, ranges in truth.items():
        want = []
        for k, disk in ((1, "/dev/sde"), (2, "/dev/sdf")):
            base = vm["parts"][disk][1]
            want += [(k, base + s, base + e) for s, e in ranges]
        assert _merged(got[("/dev/md9", path)]) == _merged(want), path


@slow
def test_lvm_on_an_md_raid1_across_two_disks(vm, tmp_path):
    """A PV on an md RAID1 whose members are on two disks: each file of its
    LV on both members, where LVM (the LV's segment on the array, its
    pe_start) and mdadm (each member's data offset) put it, with debugfs's
    ranges in the LV; and the bytes there are the file's."""
    out = tmp_path / "raidlvm.bmap"
    images = [vm["paths"]["g"], vm["paths"]["h"]]
    made = make_bmap(FileSource(images[0]), out, method="metadata",
                     more=(FileSource(images[1]),))
    assert made.methods["/dev/vgr/data"] == "metadata", made.warnings
    (line,) = [ln for ln in vm["raid_segs"].split() if ln.strip().startswith("data:")]
    _, start, size, extent, ranges = line.strip().split(":", 4)
    assert int(start) == 0
    first = int(ranges.rsplit(":", 1)[1].split("-")[0])
    (pe,) = [int(ln.split(":")[1]) for ln in vm["raid_pe"].split()]
    in_array = pe + first * int(extent)
    got = _by_file(out)
    for path, ranges in ext4_file_ranges(vm["dir"] / "data.lv", 0, list(MD_FILES)).items():
        want = []
        for k, disk in ((1, "/dev/sdg"), (2, "/dev/sdh")):
            offset = int(_examine(vm["examine"][disk + "1"], "Data Offset").split()[0]) * 512
            base = vm["parts"][disk][1] + offset + in_array
            mine = [(k, base + s, base + e) for s, e in ranges]
            assert _read_back(images, mine, MD_FILES[path]) == \
                content("/dev/vgr/data" + path, MD_FILES[path]), path
            want += mine
        assert _merged(got[("/dev/vgr/data", path)]) == _merged(want), path


@slow
def test_one_disk_alone_maps_its_own_raid1_member_and_says_the_lv_is_elsewhere(vm, lvm_map,
                                                                               tmp_path):
    """Mapped alone (a remap of one disk does this), disk C still names its
    RAID1 member's files (the array is readable from one mirror), and disk
    A's share of the spanning LV is said not mapped, in one line; a remap
    of disk A alone keeps the LV's files from the map made at start."""
    out = tmp_path / "c.bmap"
    make_bmap(FileSource(vm["paths"]["c"]), out, method="metadata")
    got = _by_file(out)
    assert all(disk == 1 for disk, _, _ in got[("/dev/md/mirror", "/data/two")])
    made = make_bmap(FileSource(vm["paths"]["a"]), tmp_path / "a.bmap", method="metadata")
    said = [w for w in made.warnings if "/dev/vgx/span" in w]
    assert said and "another disk" in said[0]
    start = lvm_map["made"].blockmap
    answer = run_mapper(FileSource(vm["paths"]["a"]), {"disk": "/dev/sda"},
                        old_flat=start.to_flat())
    span = [(s, e, o) for s, e, o in start.entries() if o.device == "/dev/vgx/span" and o.path]
    assert span and answer.info["kept"] > 0
    assert set(span) <= set(answer.blockmap.entries())


@slow
def test_the_trace_names_a_spanning_file_on_both_disks(vm, lvm_map):
    """End to end: diskwatch serves both disks; qemu-io reads a crossing
    file's piece on disk 1 through $nbd1 in one run, its piece on disk 2
    through $nbd2 in another, and each run's trace names the file."""
    _, segments = _lv_truth(vm)
    truth = ext4_file_ranges(vm["dir"] / "span.lv", 0, list(LV_FILES))
    path = next(p for p, r in truth.items()
                if len({k for k, _, _ in _through(segments, r)}) == 2)
    pieces = _merged(_through(segments, truth[path]))
    a, b = lvm_map["images"]
    for disk in (1, 2):
        s, e = next((s, e) for k, s, e in pieces if k == disk)
        done = run_diskwatch([a, b, "--bmap", lvm_map["path"], "--headless", "--remap", "off",
                              "--run", f"qemu-io -r -f raw -c 'read {s} {min(e - s, 65536)}' "
                              f"\"$nbd{disk}\" >/dev/null"], timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"read f /dev/vgx/span {path}" in done.stdout, (disk, done.stdout)


@slow
def test_the_trace_names_a_raid1_file_on_both_members(vm, md_map):
    """End to end, md RAID1: a read of a file's bytes on either member
    (through that disk's export) is named as the array's file."""
    truth = ext4_file_ranges(vm["dir"] / "mirror.md", 0, ["/data/two"])["/data/two"]
    c, d = md_map["images"]
    for disk, member in ((1, "/dev/sdc1"), (2, "/dev/sdd1")):
        offset = int(_examine(vm["examine"][member], "Data Offset").split()[0]) * 512
        at = vm["parts"][member[:-1]][1] + offset + truth[0][0]
        done = run_diskwatch([c, d, "--bmap", md_map["path"], "--headless", "--remap", "off",
                              "--run", f"qemu-io -r -f raw -c 'read {at} 65536' "
                              f"\"$nbd{disk}\" >/dev/null"], timeout=120)
        assert done.returncode == 0, done.stderr
        assert "read f /dev/md/mirror /data/two" in done.stdout, (disk, done.stdout)


def _flip(path, offset: int, data: bytes, out) -> None:
    shutil.copy(path, out)
    with open(out, "r+b") as f:
        f.seek(offset)
        f.write(data)


@slow
def test_absurd_pv_and_md_numbers_are_a_warning_not_a_crash(vm, tmp_path):
    """Hostile metadata: the PVs' text says extents are 10^15 sectors, an md
    superblock says its data starts past the member and another that it
    has 2^31 devices: each a warning, the rest of the disks mapped."""
    # the metadata text of both PVs (each holds the VG's): the extent size
    # written over the next line ("extent_size = 8192\nmax_lv = 0"): 10^15 sectors
    bad = []
    for name in ("a", "b"):
        raw = open(vm["paths"][name], "rb").read(4 * MiB)
        found = list(re.finditer(rb"extent_size = \d+\nmax_lv = \d+", raw))
        assert found
        bad.append(tmp_path / f"{name}-bad.img")
        shutil.copy(vm["paths"][name], bad[-1])
        with open(bad[-1], "r+b") as f:
            for m in found:
                f.seek(m.start())
                f.write(b"extent_size = " + b"9" * (m.end() - m.start() - 14))
    a, bad_b = bad
    made = make_bmap(FileSource(a), tmp_path / "bad-lvm.bmap", method="metadata",
                     more=(FileSource(bad_b),))
    assert any("/dev/vgx/span" in w and "not" in w for w in made.warnings), made.warnings
    # md: 1.2's data_offset (at 4 KiB + 128) past the member; raid_disks (at +92) absurd
    c, d = vm["paths"]["c"], vm["paths"]["d"]
    sdc1 = vm["parts"]["/dev/sdc"][1]
    sdd1 = vm["parts"]["/dev/sdd"][1]
    _flip(c, sdc1 + 4096 + 128, struct.pack("<Q", 1 << 60), tmp_path / "c-bad.img")
    _flip(d, sdd1 + 4096 + 92, struct.pack("<I", 1 << 31), tmp_path / "d-bad.img")
    made = make_bmap(FileSource(tmp_path / "c-bad.img"), tmp_path / "bad-md.bmap",
                     method="metadata", more=(FileSource(tmp_path / "d-bad.img"),))
    said = [w for w in made.warnings if "md RAID member" in w]
    assert len(said) == 2 and "data offset" in said[0] and "devices" in said[1], made.warnings
    assert made.methods.get("/dev/md/stripe") == "metadata"  # the other array is mapped


# --------------------------------------------------------------------------
# LUKS: no libguestfs, fast


@pytest.mark.skipif(shutil.which("cryptsetup") is None or shutil.which("sfdisk") is None,
                    reason="needs cryptsetup and sfdisk")
@pytest.mark.parametrize("kind", ["luks1", "luks2"])
def test_a_luks_container_is_one_object_its_payload(kind, tmp_path):
    """A LUKS container in a partition (no key): its encrypted payload is
    one object, /dev/mapper/luks-UUID, where cryptsetup luksDump says the
    data lies (LUKS1's payload offset, LUKS2's data segment); its header
    stays the partition's."""
    import subprocess
    part = tmp_path / "part"
    with open(part, "wb") as f:
        f.truncate(20 * MiB)
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", kind, "--pbkdf-force-iterations",
                    "1000", *(["--pbkdf", "pbkdf2"] if kind == "luks2" else []),
                    "--key-file=-", part], input=b"pw", check=True, timeout=120)
    dump = subprocess.run(["cryptsetup", "luksDump", part], capture_output=True, text=True,
                          check=True).stdout
    uuid = re.search(r"^UUID:\s+(\S+)", dump, re.M).group(1)
    if kind == "luks1":
        payload = int(re.search(r"^Payload offset:\s+(\d+)", dump, re.M).group(1)) * 512
    else:
        payload = int(re.search(r"Data segments:\s+0: crypt\s+offset: (\d+)", dump).group(1))
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(22 * MiB)
    subprocess.run(["sfdisk", "-q", disk], input=b"start=2048, size=40960, type=83\n", check=True)
    with open(disk, "r+b") as f, open(part, "rb") as p:
        f.seek(MiB)
        f.write(p.read())
    out = tmp_path / "luks.bmap"
    made = make_bmap(FileSource(disk), out, method="metadata")
    lines = [ln.split() for ln in open(out) if not ln.startswith("#")]
    assert [(int(s, 16), int(e, 16)) for _, s, e, t, dev, *_ in lines
            if dev == f"/dev/mapper/luks-{uuid}"] == [(MiB + payload, 21 * MiB)]
    assert ["1", "100000", "1500000", "p", "/dev/sda1"] in lines
    assert made.methods.get(f"/dev/mapper/luks-{uuid}", "").startswith("none")
    assert not [w for w in made.warnings if "luks" in w.lower()], made.warnings


# --------------------------------------------------------------------------
# RAID10 "near": the appliance has no raid10 personality, so its members
# are made here, by md(4)'s layout and the 1.2 superblock's fields (fast)


def _superblock_12(*, level: int, layout: int, chunk: int, disks: int, number: int,
                   data_offset: int, size: int, name: bytes) -> bytes:
    """mdadm 1.2's ``struct mdp_superblock_1`` (sizes in sectors)."""
    sb = bytearray(4096)
    struct.pack_into("<IIII16s32sQiIQII", sb, 0, 0xA92B4EFC, 1, 0, 0, name.ljust(16, b"U"),
                     b"host:" + name, 0, level, layout, size, chunk, disks)
    struct.pack_into("<QQQ", sb, 128, data_offset, size, 8)
    struct.pack_into("<I", sb, 160, number)
    struct.pack_into("<Q", sb, 200, 7)
    struct.pack_into("<I", sb, 220, disks)
    for k in range(min(disks, 1920)):
        struct.pack_into("<H", sb, 256 + 2 * k, k)
    return bytes(sb)


def test_md_raid10_near_copies_on_three_members(tmp_path):
    """RAID10, near=2 over three whole-disk members (md(4): array chunk k's
    copies are raw chunks 2k and 2k+1, raw chunk r on member r % 3 at its
    chunk r // 3): each file named on both copies, as debugfs on the
    array's content and that layout put it."""
    import subprocess
    chunk, offset, member = 64 * 1024, MiB, 8 * MiB
    per = (member - offset) // chunk
    array = per * 3 // 2 * chunk
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    for p, n in MD_FILES.items():
        (root / p.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / p.lstrip("/")).write_bytes(content(p, n))
    fs = tmp_path / "array.ext4"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-b", "4096", "-d", root, fs,
                    str(array // 1024) + "k"], check=True)
    data = open(fs, "rb").read()
    images = [tmp_path / f"m{k}.img" for k in range(3)]
    for k, path in enumerate(images):
        with open(path, "wb") as f:
            f.truncate(member)
            f.seek(4096)
            f.write(_superblock_12(level=10, layout=0x102, chunk=chunk // 512, disks=3,
                                   number=k, data_offset=offset // 512,
                                   size=(member - offset) // 512, name=b"ten"))
    for c in range(array // chunk):
        for raw in (2 * c, 2 * c + 1):
            with open(images[raw % 3], "r+b") as f:
                f.seek(offset + raw // 3 * chunk)
                f.write(data[c * chunk:(c + 1) * chunk])
    out = tmp_path / "ten.bmap"
    made = make_bmap(FileSource(images[0]), out, method="metadata",
                     more=(FileSource(images[1]), FileSource(images[2])))
    assert made.methods["/dev/md/ten"] == "metadata", made.warnings
    got = _by_file(out)
    for path, ranges in ext4_file_ranges(fs, 0, list(MD_FILES)).items():
        want = []
        for s, e in ranges:
            while s < e:
                c, within = divmod(s, chunk)
                n = min(e - s, chunk - within)
                for raw in (2 * c, 2 * c + 1):
                    at = offset + raw // 3 * chunk + within
                    want.append((raw % 3 + 1, at, at + n))
                s += n
        assert _merged(got[("/dev/md/ten", path)]) == _merged(want), path


def test_md_raid5_and_a_missing_raid0_member_are_one_warning_each(tmp_path):
    """Unsupported: a RAID5 array (one warning, no volume, its members not
    walked), and a RAID0 with one of its two members in the session."""
    paths = []
    for level, name in ((5, b"five"), (0, b"zero")):
        path = tmp_path / f"{name.decode()}.img"
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
            f.seek(4096)
            f.write(_superblock_12(level=level, layout=2, chunk=128, disks=3 if level else 2,
                                   number=0, data_offset=2048, size=6144, name=name))
        paths.append(path)
    made = make_bmap(FileSource(paths[0]), tmp_path / "x.bmap", method="metadata",
                     more=(FileSource(paths[1]),))
    assert [w for w in made.warnings if "/dev/md/" in w] == [
        "/dev/md/five: md RAID5 array: not supported (RAID1, RAID0 and RAID10 are): not mapped",
        "/dev/md/zero: RAID0 with 1 of its 2 members on these disks: not mapped"]
    assert "/dev/md/five" not in made.methods


@pytest.mark.parametrize("change, needle", [
    ({"disks": 0}, "0 devices"),
    ({"disks": 100_000}, "100000 devices"),
    ({"number": 5000}, "slot 5000"),
    ({"data_offset": 1 << 60}, "data offset"),
    ({"chunk": 0, "level": 0}, "chunks of 0 bytes"),
    ({"chunk": 3, "level": 10}, "chunks of 1536 bytes"),
    ({"layout": 0x201, "level": 10}, "far or offset copies"),
])
def test_absurd_md_superblocks_are_one_warning(change, needle, tmp_path):
    """Numbers a guest wrote in a 1.2 superblock, each absurd one a warning
    (and no volume), never a crash. (A size of 2^62 sectors is no danger:
    every size is cut to what the member holds.)"""
    fields = dict(level=1, layout=0, chunk=128, disks=2, number=0, data_offset=2048,
                  size=4096, name=b"bad") | change
    paths = []
    for k in range(2):
        path = tmp_path / f"m{k}.img"
        with open(path, "wb") as f:
            f.truncate(4 * MiB)
            f.seek(4096)
            f.write(_superblock_12(**(fields | {"number": fields["number"] or k})))
        paths.append(path)
    made = make_bmap(FileSource(paths[0]), tmp_path / "x.bmap", method="metadata",
                     more=(FileSource(paths[1]),))
    assert any(needle in w for w in made.warnings), made.warnings
    assert "/dev/md/bad" not in made.methods


# --------------------------------------------------------------------------
# Fuzzing the VM's metadata: PV labels, LVM text, md superblocks


def _vm_targets(path) -> list[tuple[int, int]]:
    """Where the volume metadata of a disk is: its first sector, LVM's label
    and text, md's 1.2 superblocks (and 0.90's at the end)."""
    raw = open(path, "rb").read()
    out = [(0, 512)]
    for m in re.finditer(rb"LABELONE", raw[:8 * MiB]):
        out.append((m.start(), m.start() + 512))
    for m in re.finditer(rb"vg[a-z]+ \{", raw[:8 * MiB]):
        end = raw.find(b"\0", m.start())
        out.append((m.start(), end if end > 0 else m.start() + 4096))
    for m in re.finditer(struct.pack("<I", 0xA92B4EFC), raw):
        if m.start() % 512 == 0:
            out.append((m.start(), m.start() + 1024))
    return out


@slow
@pytest.mark.parametrize("pair", ["ab", "cd", "ef", "gh"])
def test_mutated_volume_metadata_across_disks_never_hurts_the_server(vm, pair, tmp_path):
    """Random bytes in the PV labels, the LVM text and the md superblocks
    of a pair of disks, mapped together by the mapper process: each walk
    gives maps for both disks or fails in one line (``FUZZ_MAPPER`` walks,
    ``FUZZ_MAPPER_SEED`` replays one)."""
    import random
    import zlib

    from test_mapper_fuzz import LIMITS, WALKS, Mutated

    from diskwatch.bmap.index import BlockMap
    from diskwatch.errors import DiskwatchError
    paths = [vm["paths"][n] for n in pair]
    targets = [_vm_targets(p) for p in paths]
    seeds = ([int(os.environ["FUZZ_MAPPER_SEED"])] if "FUZZ_MAPPER_SEED" in os.environ
             else [zlib.crc32(f"vm {pair} {k}".encode()) for k in range(WALKS)])
    outcomes: dict[str, int] = {}
    bases = [FileSource(p, readonly=True) for p in paths]
    try:
        for seed in seeds:
            rng = random.Random(seed)
            sources = []
            for base, where in zip(bases, targets, strict=True):
                changes = {}
                for _ in range(rng.choice((1, 4, 16, 64))):
                    s, e = rng.choice(where)
                    changes[rng.randrange(s, e)] = rng.choice((0, 0xFF, 0x7F, rng.randrange(256)))
                sources.append(Mutated(base, changes))
            try:
                made = make_bmap(sources[0], tmp_path / "m.bmap", method="metadata",
                                 more=(sources[1],), limits=LIMITS)
            except DiskwatchError as e:
                assert "\n" not in str(e), (seed, str(e))
                outcomes["failed"] = outcomes.get("failed", 0) + 1
                continue
            except Exception as e:  # noqa: BLE001 - the finding: said with its seed
                pytest.fail(f"vm {pair}: FUZZ_MAPPER_SEED={seed}: {type(e).__name__}: {e}")
            assert isinstance(made.blockmap, BlockMap) and len(made.more) == 1
            for m, src in zip([made.blockmap, *made.more], sources, strict=True):
                m.lookup(0, src.size)
            outcomes["mapped"] = outcomes.get("mapped", 0) + 1
    finally:
        for b in bases:
            b.close()
    print(f"\nvm {pair}: {outcomes}")
    assert outcomes.get("mapped", 0) >= len(seeds) // 2


@slow
def test_auto_maps_disk_1_by_watching_and_the_others_together(tmp_path):
    """--method auto with three disks: disk 1's XFS by the watch method (its
    appliance sees disk 1), disk 2's ext4 by metadata with its disk index,
    disk 3's btrfs (only the watch method reads it) one warning; the map
    written from the mapper's lines and the watch method's entries. (The
    watch method names nothing in an empty XFS, one disk alone as well.)"""
    import subprocess
    pytest.importorskip("guestfs")
    os.environ.update(GUESTFS_ENV)
    xfs, ext, btr = tmp_path / "x.img", tmp_path / "e.img", tmp_path / "b.img"
    for p, n in ((xfs, 320), (btr, 128)):
        with open(p, "wb") as f:
            f.truncate(n * MiB)
    subprocess.run(["mkfs.xfs", "-q", xfs], check=True)
    subprocess.run(["mkfs.btrfs", "-q", btr], check=True)
    (tmp_path / "r/etc").mkdir(parents=True)
    (tmp_path / "r/etc/hello").write_bytes(b"hello" * 3000)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", tmp_path / "r", ext, "8M"], check=True)
    out = tmp_path / "auto.bmap"
    made = make_bmap(FileSource(xfs), out, method="auto", more=(FileSource(ext), FileSource(btr)))
    assert made.methods["/dev/sda"] == "watch", made.methods
    assert made.methods["/dev/sdb"] == "metadata" and made.methods["/dev/sdc"] == "none"
    assert "/dev/sdc btrfs: not mapped: the watch method maps the first disk only" in made.warnings
    lines = [ln.split(None, 5) for ln in open(out) if not ln.startswith("#")]
    truth = ext4_file_ranges(ext, 0, ["/etc/hello"])["/etc/hello"]
    assert [(int(s, 16), int(e, 16)) for d, s, e, t, dev, *p in lines
            if p and p[0].strip() == "/etc/hello"] == truth
    assert {d for d, *_, dev, _p in [ln for ln in lines if len(ln) == 6]
            if dev == "/dev/sdb"} == {"2"}
    assert [ln[:5] for ln in lines if ln[0] == "1"] == [["1", "0", "14000000", "v", "/dev/sda"]]
    assert len(made.more) == 2 and made.blockmap is None


WRITER = """
import os, sys, urllib.parse, guestfs
path, offsets = sys.argv[1], [int(o) for o in sys.argv[2:]]
g = guestfs.GuestFS(python_return_dict=True)
g.set_backend("direct")
g.set_backend_settings(["force_tcg"])
for k in (1, 2):
    u = urllib.parse.urlparse(os.environ[f"uri{k}"])
    socket = urllib.parse.parse_qs(u.query)["socket"][0]
    g.add_drive_opts(u.path.lstrip("/"), format="raw", protocol="nbd",
                     server=[f"unix:{socket}"])  # an NBD drive's "filename": its export
g.launch()
g.vg_activate_all(True)
g.mount("/dev/vgx/span", "/")
for n, offset in enumerate(offsets):  # a log's records, written in place
    g.pwrite(path, (f"log record {n} " * 300)[:4096].encode(), offset)
g.sync()
g.umount_all()
g.shutdown()
g.close()
"""


@slow
def test_a_guest_writes_a_log_on_the_lv_spanning_two_disks_named_on_both(vm, lvm_map,
                                                                         tmp_path):
    """A Linux guest (the libguestfs appliance, over diskwatch's two exports)
    activates the volume group, mounts the spanning LV and writes records in
    place into a file that crosses from disk 1 to disk 2: its writes are
    named on both disks, at the disk offsets LVM's segments and debugfs give
    for those bytes of the file."""
    _, segments = _lv_truth(vm)
    truth = ext4_file_ranges(vm["dir"] / "span.lv", 0, list(LV_FILES))
    path = next(p for p, r in truth.items()
                if len({k for k, _, _ in _through(segments, r)}) == 2)
    # a file offset on each disk: the file's blocks in file order, through the segments
    where: dict[int, tuple[int, int]] = {}  # disk -> (file offset, disk offset)
    pos = 0
    for s, e in truth[path]:
        for off in range(s, e, 4096):
            disk, start, _ = _through(segments, [(off, off + 4096)])[0]
            if pos + 4096 <= LV_FILES[path]:
                where.setdefault(disk, (pos, start))
            pos += 4096
    assert set(where) == {1, 2}, where
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    a, b = lvm_map["images"]
    before = [a.read_bytes(), b.read_bytes()]
    done = run_diskwatch([a, b, "--snapshot", "--bmap", lvm_map["path"], "--headless",
                          "--remap", "off", "--run",
                          f"/usr/bin/python3 {script} {path} {where[1][0]} {where[2][0]}"],
                         timeout=600, env={**SUBPROCESS_ENV, **GUESTFS_ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    assert [a.read_bytes(), b.read_bytes()] == before  # --snapshot: the images untouched
    for disk, device in ((1, "/dev/sda"), (2, "/dev/sdb")):
        # the LV's name does not say the disk: the line does
        lines = [ln for ln in done.stdout.splitlines()
                 if f"write f /dev/vgx/span {path} on {device}  [" in ln]
        assert any(_covers(ln, where[disk][1]) for ln in lines), \
            (disk, hex(where[disk][1]), done.stdout[-3000:])


def _covers(line: str, at: int) -> bool:
    """Whether a trace line's ranges ([0xS-0xE, ...]) hold the disk offset ``at``."""
    return any(int(s, 16) <= at < int(e, 16)
               for s, e in re.findall(r"0x([0-9a-f]+)-0x([0-9a-f]+)", line))
