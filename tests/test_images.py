"""The image fixtures are what they claim: partition tables, files, extents, ground truth, boot."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from fixtures_images import GUESTFS_ENV, DiskImage, content
from groundtruth import ext4_file_ranges, ext4_list, fat_file_ranges

from diskwatch.demo.guest import MissingToolError, build_guest_image, find_kernel, probe_kvm


def sfdisk_table(path: Path) -> dict:
    out = subprocess.run(["sfdisk", "--json", os.fspath(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["partitiontable"]


def read_ranges(path: Path, ranges: list[tuple[int, int]]) -> bytes:
    with open(path, "rb") as f:
        return b"".join(os.pread(f.fileno(), end - start, start) for start, end in ranges)


def assert_ext4_matches(image: DiskImage, device: str, *, check_content: bool = True) -> None:
    """debugfs sees exactly the fixture's files, dirs and symlinks; ground truth reads back."""
    volume = image.volume(device)
    listing = ext4_list(image.path, volume.offset)
    files = {p: e.size for p, e in listing.items() if e.kind == "f"}
    assert files == image.files[device]
    assert sorted(p for p, e in listing.items() if e.kind == "d" and p != "/") == sorted(
        image.dirs[device]
    )
    assert {p for p, e in listing.items() if e.kind == "l"} == set(image.symlinks.get(device, {}))
    truth = ext4_file_ranges(image.path, volume.offset)
    assert set(truth) == set(files)
    spans = sorted(r for ranges in truth.values() for r in ranges)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, "two files share a block"
    for path, size in files.items():
        ranges = truth[path]
        assert all(volume.offset <= s < e <= volume.offset + volume.length for s, e in ranges)
        assert sum(e - s for s, e in ranges) >= size
        if check_content:
            assert read_ranges(image.path, ranges)[:size] == content(
                _content_key(image, device, path), size
            ), path


def _content_key(image: DiskImage, device: str, path: str) -> str:
    # LVM fixture files are seeded with device + path (two filesystems, same names possible)
    return device + path if device.startswith("/dev/vg") else path


# --------------------------------------------------------------------------
# ext4 on MBR


def test_ext4_mbr_partition_table(ext4_mbr_image: DiskImage) -> None:
    table = sfdisk_table(ext4_mbr_image.path)
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    (volume,) = ext4_mbr_image.partitions
    assert (part["start"] * 512, part["size"] * 512, part["type"]) == (
        volume.offset,
        volume.length,
        "83",
    )
    assert os.path.getsize(ext4_mbr_image.path) == ext4_mbr_image.size


def test_ext4_mbr_files_and_ground_truth(ext4_mbr_image: DiskImage) -> None:
    files = ext4_mbr_image.files["/dev/sda1"]
    assert files["/big/three-mib.bin"] == 3 * 1024 * 1024
    assert "/Program Files (x86)/Real Time/log 0.txt" in files
    assert "/deep/level 1/level2/level3/level4/leaf.txt" in files
    assert_ext4_matches(ext4_mbr_image, "/dev/sda1")


def test_fragmented_file_has_many_extents(ext4_mbr_image: DiskImage) -> None:
    assert ext4_mbr_image.fragmented is not None
    device, path = ext4_mbr_image.fragmented
    volume = ext4_mbr_image.volume(device)
    (ranges,) = ext4_file_ranges(ext4_mbr_image.path, volume.offset, [path]).values()
    assert len(ranges) > 5
    stat = subprocess.run(
        ["debugfs", "-c", "-R", f"stat {path}", f"{ext4_mbr_image.path}?offset={volume.offset}"],
        capture_output=True,
        text=True,
    ).stdout
    extents = stat.split("EXTENTS:", 1)[1]
    assert extents.count(":") - extents.count("(ETB") > 5, extents


def test_ground_truth_named_paths_and_missing(ext4_mbr_image: DiskImage) -> None:
    volume = ext4_mbr_image.partitions[0]
    named = ["/one-byte", "/empty", "/Program Files (x86)/Real Time/read me now.txt"]
    truth = ext4_file_ranges(ext4_mbr_image.path, volume.offset, named)
    assert truth["/empty"] == []
    assert len(truth["/one-byte"]) == 1
    start, end = truth["/one-byte"][0]
    assert end - start == 4096 and (start - volume.offset) % 4096 == 0  # whole block kept
    with pytest.raises(KeyError, match="/no/such/file"):
        ext4_file_ranges(ext4_mbr_image.path, volume.offset, ["/no/such/file"])
    dirs = ext4_file_ranges(ext4_mbr_image.path, volume.offset, include_dirs=True)
    assert "/deep/level 1" in dirs and "/" in dirs and len(dirs["/small"]) == 1


# --------------------------------------------------------------------------
# GPT: ext4 + FAT


def test_gpt_partition_table(gpt_fat_image: DiskImage) -> None:
    table = sfdisk_table(gpt_fat_image.path)
    assert table["label"] == "gpt"
    got = [(p["start"] * 512, p["size"] * 512) for p in table["partitions"]]
    assert got == [(v.offset, v.length) for v in gpt_fat_image.partitions]
    verify = subprocess.run(
        ["sfdisk", "--verify", os.fspath(gpt_fat_image.path)], capture_output=True, text=True
    )
    assert verify.returncode == 0 and "No errors detected" in verify.stdout, verify.stdout


def test_gpt_ext4_partition(gpt_fat_image: DiskImage) -> None:
    assert_ext4_matches(gpt_fat_image, "/dev/sda1")
    volume = gpt_fat_image.volume("/dev/sda1")
    truth = ext4_file_ranges(gpt_fat_image.path, volume.offset, ["/etc/config.txt"])
    ((start, end),) = truth["/etc/config.txt"]
    assert end - start == 1024  # this filesystem has 1 KiB blocks


def test_gpt_fat_partition(gpt_fat_image: DiskImage) -> None:
    volume = gpt_fat_image.volume("/dev/sda2")
    assert volume.fstype == "vfat"
    image = f"{gpt_fat_image.path}@@{volume.offset}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    listing = subprocess.run(
        ["mdir", "-i", image, "-/", "-b", "::"], capture_output=True, text=True, env=env
    )
    assert listing.returncode == 0, listing.stderr
    names = {line.removeprefix("::").rstrip("/") for line in listing.stdout.splitlines()}
    assert set(gpt_fat_image.files["/dev/sda2"]) | set(gpt_fat_image.dirs["/dev/sda2"]) <= names
    for path, size in gpt_fat_image.files["/dev/sda2"].items():
        data = subprocess.run(
            ["mtype", "-i", image, "::" + path], capture_output=True, env=env
        ).stdout
        assert data == content(path, size), path


# --------------------------------------------------------------------------
# Bigger and slower fixtures


@pytest.mark.slow
def test_lvm_image(lvm_image: DiskImage) -> None:
    table = sfdisk_table(lvm_image.path)
    assert [p["type"] for p in table["partitions"]] == ["8e"]
    lvs = [v for v in lvm_image.partitions if v.kind == "l"]
    assert {v.device for v in lvs} == {"/dev/vg0/data", "/dev/vg0/logs"}
    with open(lvm_image.path, "rb") as f:
        for v in lvs:
            assert os.pread(f.fileno(), 2, v.offset + 1024 + 0x38) == b"\x53\xef", v
    for v in lvs:
        assert_ext4_matches(lvm_image, v.device)


@pytest.mark.slow
def test_libguestfs_sees_the_fixture_files(gpt_fat_image: DiskImage, lvm_image: DiskImage) -> None:
    """The names the fixtures promise are the names libguestfs (and so the bmap) will show."""
    os.environ.update(GUESTFS_ENV)
    guestfs = pytest.importorskip("guestfs")
    for image in (gpt_fat_image, lvm_image):
        g = guestfs.GuestFS(python_return_dict=True)
        try:
            g.add_drive_opts(os.fspath(image.path), format="raw", readonly=True)
            g.launch()
            assert set(g.list_filesystems()) >= {
                v.device for v in image.partitions if v.fstype != "LVM2_member"
            }
            for device, files in image.files.items():
                g.mount_ro(device, "/")
                found = {"/" + p for p in g.find("/")}
                assert set(files) <= found, device
                assert set(image.dirs[device]) <= found, device
                for path, size in files.items():
                    assert g.filesize(path) == size
                g.umount("/")
        finally:
            g.close()


@pytest.mark.slow
def test_many_files_image(many_files_image: DiskImage) -> None:
    image = many_files_image
    files = image.files["/dev/sda1"]
    assert 9_900 <= len(files) <= 10_100
    assert image.size >= 1024**3
    assert os.stat(image.path).st_blocks * 512 < image.size / 2, "image should be sparse"
    t0 = time.monotonic()
    truth = ext4_file_ranges(image.path, image.partitions[0].offset)
    elapsed = time.monotonic() - t0
    assert set(truth) == set(files)
    assert elapsed < 60, f"ground truth for {len(files)} files took {elapsed:.1f} s"


# --------------------------------------------------------------------------
# The demo guest


def test_qemu_command_keeps_nbd_for_the_shell(guest_image: DiskImage) -> None:
    guest = guest_image.guest
    assert guest is not None
    argv = guest.qemu_command("/tmp/x,y.img", "tcg")
    assert "file=/tmp/x,,y.img,format=raw,if=virtio" in argv
    assert "file:/tmp/c.log" in guest.qemu_command(console="file:/tmp/c.log")
    line = guest.qemu_shell_command("$nbd", "kvm")
    assert '"file=$nbd,format=raw,if=virtio"' in line and "-accel kvm" in line
    expanded = subprocess.run(
        ["sh", "-c", 'for a in "$@"; do echo "$a"; done', "sh"]
        + shlex.split(line.replace('"file=$nbd', '"file=nbd://x')),
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert "file=nbd://x,format=raw,if=virtio" in expanded
    assert set(guest.reads) <= set(guest.files) and set(guest.writes) <= set(guest.files)


def test_guest_image_contents(guest_image: DiskImage) -> None:
    assert_ext4_matches(guest_image, "/dev/sda1", check_content=False)
    assert guest_image.symlinks["/dev/sda1"]["/bin/sh"] == "busybox"


def test_missing_kernel_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(MissingToolError, match="apt-get install linux-image-amd64"):
        find_kernel(tmp_path)


def boot(image: DiskImage, tmp_path: Path, timeout: float) -> tuple[str, float, Path]:
    """Boot a sparse copy of the guest (the fixture stays pristine); return console, secs, copy."""
    assert image.guest is not None
    copy = tmp_path / image.path.name
    subprocess.run(["cp", "--sparse=always", os.fspath(image.path), os.fspath(copy)], check=True)
    t0 = time.monotonic()
    proc = subprocess.run(
        image.guest.qemu_command(copy, "tcg"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - t0
    console = proc.stdout.decode(errors="replace").replace("\r", "")
    assert proc.returncode == 0, console[-2000:] + proc.stderr.decode(errors="replace")
    return console, elapsed, copy


def debugfs_cat(image: Path, offset: int, path: str) -> str:
    return subprocess.run(
        ["debugfs", "-c", "-R", f"cat {path}", f"{image}?offset={offset}"],
        capture_output=True,
        text=True,
    ).stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_guest_boots_under_tcg(guest_image: DiskImage, tmp_path: Path) -> None:
    guest = guest_image.guest
    assert guest is not None
    console, elapsed, copy = boot(guest_image, tmp_path, timeout=200)
    assert guest.marker in console, console[-2000:]
    n = guest.write_counts["/var/log/demo.log"]
    for i in range(1, n + 1):
        assert f"wrote /var/log/demo.log record {i}" in console
    for path in guest.reads[3:]:
        assert f"read {path}" in console
    log = debugfs_cat(copy, guest.partition_offset, "/var/log/demo.log")
    assert [f"boot write {i} uptime" in log for i in range(1, n + 1)] == [True] * n
    assert len(log) == guest.files["/var/log/demo.log"], "writes must stay inside the file"
    print(f"guest booted and powered off in {elapsed:.1f} s under TCG")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_guest_with_minimal_initrd_boots(tmp_path: Path) -> None:
    from fixtures_images import guest_disk

    work = tmp_path / "build"
    work.mkdir()
    image = guest_disk(build_guest_image(work / "guest.img", initrd="minimal"))
    assert image.guest is not None and image.guest.initrd.parent == work
    console, elapsed, _ = boot(image, tmp_path, timeout=200)
    assert image.guest.marker in console, console[-2000:]
    assert "wrote /var/log/demo.log record 5" in console
    print(f"guest with the minimal initramfs powered off in {elapsed:.1f} s under TCG")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_churn_guest_boots_under_tcg(churn_guest_image: DiskImage, tmp_path: Path) -> None:
    guest = churn_guest_image.guest
    assert guest is not None and guest.big_file is not None
    console, elapsed, copy = boot(churn_guest_image, tmp_path, timeout=360)
    assert guest.marker in console, console[-2000:]
    passes = guest.write_counts["/var/log/av/events.log"]  # scan.log: the scan's records too
    assert f"churn pass {passes}" in console
    for log in ("/var/log/av/scan.log", "/var/log/av/events.log", "/var/log/av/quarantine.log"):
        text = debugfs_cat(copy, guest.partition_offset, log)
        assert f"scan pass {passes} uptime" in text and len(text) == guest.files[log]
    print(f"churn guest ran {passes} passes and powered off in {elapsed:.1f} s under TCG")


@pytest.mark.slow
def test_probe_kvm_answers_in_time() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 missing: `apt-get install qemu-system-x86`")
    t0 = time.monotonic()
    result = probe_kvm(timeout=8, use_cache=False)
    assert isinstance(result, bool)
    assert time.monotonic() - t0 < 15
    # The answer is kept for this boot of the host: the next call is instant.
    t1 = time.monotonic()
    assert probe_kvm(timeout=8) is result
    assert time.monotonic() - t1 < 1


def test_fat_ground_truth_reads_back(gpt_fat_image: DiskImage) -> None:
    volume = gpt_fat_image.volume("/dev/sda2")
    files = gpt_fat_image.files["/dev/sda2"]
    truth = fat_file_ranges(gpt_fat_image.path, volume.offset, files)
    for path, size in files.items():
        assert read_ranges(gpt_fat_image.path, truth[path])[:size] == content(path, size), path
    with pytest.raises(KeyError, match="/nope"):
        fat_file_ranges(gpt_fat_image.path, volume.offset, ["/nope"])
