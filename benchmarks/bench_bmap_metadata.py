"""Block maps by metadata vs by watching (issue 10): objects/s end to end,
beside the watch method in the same run, accuracy against the ground-truth
tools, and memory.

Builds one MBR disk: /dev/sda1 ext4 with 10,000 files (the test suite's
many-files tree) and /dev/sda2 NTFS with 2,000 files (made with mkntfs and
ntfs-3g). Then:

1. ``diskwatch bmap --method metadata`` in-process (``make_bmap``: partition
   table, both filesystems, writing the map file), a few times; median
   objects/s. Goal >= 20,000 objects/s.
2. ``--method watch`` (``generate_bmap``: a libguestfs appliance) on the same
   disk, once (it refuses the NTFS partition; its objects/s counts what it
   mapped); the ratio.
3. Accuracy of the metadata map: every ext4 file against debugfs, a sample
   of NTFS files against ntfsinfo (byte precision/recall).
4. Memory: tracemalloc peak of mapping this disk per object, and of a
   1,000,000-object map (entries as the mapper makes them, then the map
   file loaded into the lookup index).

    .venv/bin/python benchmarks/bench_bmap_metadata.py [--no-watch] [--runs 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from diskwatch.bmap.format import BmapEntry, read_bmap, write_bmap  # noqa: E402
from diskwatch.bmap.index import BlockMap  # noqa: E402
from diskwatch.bmap.make import make_bmap  # noqa: E402
from diskwatch.bmap.metadata import map_metadata  # noqa: E402
from diskwatch.sources.file import FileSource  # noqa: E402

GOAL = 20_000.0
MiB = 1 << 20


def build_disk(work: Path, ext4_files: int, ntfs_files: int):
    from fixtures_images import (
        MBR_LINUX,
        _copy_into,
        _fill_ntfs,
        _make_image_file,
        _ntfs_partition,
        build_many_files_image,
        content,
    )

    from diskwatch.demo.guest import make_partition_table

    # The ext4 tree of the many-files image, rebuilt here into partition 1.
    many = build_many_files_image(work / "many.img", work, ext4_files)
    ext4_len = many.partitions[0].length
    path = work / "disk.img"
    size = ext4_len + 256 * MiB + 2 * MiB
    _make_image_file(path, size)
    (p1, l1), (p2, l2) = make_partition_table(path, "dos", [(ext4_len, MBR_LINUX), (None, "7")])
    # Copy the ext4 filesystem made by build_many_files_image into partition 1.
    _copy_into_offset(many.path, many.partitions[0].offset, ext4_len, path, p1)
    os.unlink(many.path)

    rng = random.Random(7)
    ntfs_tree = {}
    for i in range(ntfs_files):
        r = rng.random()
        n = rng.randint(0, 600) if r < 0.2 else rng.randint(600, 16384) if r < 0.95 else \
            rng.randint(16384, 512 * 1024)
        ntfs_tree[f"/Windows/dir{i % 40:02d}/sub{i % 7}/file {i:05d}.dll"] = n
    part = work / "c.ntfs"
    _ntfs_partition(part, l2, "Windows", p2 // 512)

    def fill(root: Path) -> None:
        for p, n in ntfs_tree.items():
            f = root / p.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(content(p, n))

    _fill_ntfs(part, work / "mnt", fill)
    _copy_into(path, part, p2)
    return path, (p1, l1), (p2, l2), part, many, ntfs_tree


def _copy_into_offset(src: Path, src_off: int, length: int, dst: Path, dst_off: int) -> None:
    chunk = 4 * MiB
    zero = bytes(chunk)
    with open(src, "rb") as s, open(dst, "r+b") as d:
        pos = 0
        while pos < length:
            data = os.pread(s.fileno(), min(chunk, length - pos), src_off + pos)
            if not data:
                break
            if data != zero[: len(data)]:
                os.pwrite(d.fileno(), data, dst_off + pos)
            pos += len(data)


def accuracy(entries, truth: dict[str, list[tuple[int, int]]], device: str):
    got: dict[str, list[tuple[int, int]]] = {}
    for e in entries:
        if e.type == "f" and e.device == device:
            got.setdefault(e.path, []).append((e.start, e.end))
    hit = got_total = want_total = missing = 0
    for path, want in truth.items():
        mine = got.get(path, [])
        if want and not mine:
            missing += 1
        for s1, e1 in mine:
            for s2, e2 in want:
                hit += max(0, min(e1, e2) - max(s1, s2))
        got_total += sum(e - s for s, e in mine)
        want_total += sum(e - s for s, e in want)
    return hit / max(got_total, 1), hit / max(want_total, 1), missing


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_of_a_million(work: Path) -> None:
    """Resident memory (tracemalloc would slow a million allocations tenfold)."""
    n = 1_000_000
    gc.collect()
    before = _rss()
    entries = [BmapEntry(1, i * 8192, i * 8192 + 4096, "f", "/dev/sda2",
                         f"/Windows/WinSxS/amd64_component_{i // 50:05d}/file{i:07d}.dll")
               for i in range(n)]
    held = _rss() - before
    print(f"memory, 1,000,000 entries as the mapper holds them: {held / MiB:.0f} MiB "
          f"({held / n:.0f} B/object)")
    out = work / "million.bmap"
    t = time.monotonic()
    write_bmap(out, entries)
    write_s = time.monotonic() - t
    del entries
    gc.collect()
    before = _rss()
    t = time.monotonic()
    bm = BlockMap.load(out)
    load_s = time.monotonic() - t
    held = _rss() - before
    print(f"memory, the 1,000,000-object map loaded for lookups: {held / MiB:.0f} MiB "
          f"({held / n:.0f} B/object); written in {write_s:.1f} s, loaded in {load_s:.1f} s; "
          f"map file {out.stat().st_size / MiB:.0f} MiB")
    del bm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ext4-files", type=int, default=10_000)
    ap.add_argument("--ntfs-files", type=int, default=2_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-watch", action="store_true", help="skip the watch method")
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-meta-") as tmp:
        work = Path(tmp)
        t = time.monotonic()
        path, (p1, _), (p2, _), ntfs_part, many, ntfs_tree = build_disk(
            work, args.ext4_files, args.ntfs_files)
        print(f"built {path.name}: {path.stat().st_size / MiB:.0f} MiB, {args.ext4_files} ext4 "
              f"files + {args.ntfs_files} NTFS files, in {time.monotonic() - t:.0f} s")

        rates, times = [], []
        out = work / "meta.bmap"
        for _ in range(args.runs):
            with FileSource(str(path), readonly=True) as src:
                res = make_bmap(src, out, method="metadata")
            rates.append(res.objects / res.elapsed)
            times.append(res.elapsed)
        meta_rate = statistics.median(rates)
        print(f"metadata: {res.objects} objects, {res.entries} ranges, median "
              f"{statistics.median(times):.2f} s end to end (map file written): "
              f"{meta_rate:,.0f} objects/s (goal >= {GOAL:,.0f})")

        gc.collect()
        tracemalloc.start()
        with FileSource(str(path), readonly=True) as src:
            mres = map_metadata(src)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"memory, mapping this disk: peak {peak / MiB:.1f} MiB "
              f"({peak / mres.objects:.0f} B/object)")

        entries = read_bmap(out)
        from groundtruth import ext4_file_ranges, ntfs_object_ranges
        truth = ext4_file_ranges(path, p1)
        p, r, miss = accuracy(entries, {k: v for k, v in truth.items() if v}, "/dev/sda1")
        print(f"accuracy ext4 vs debugfs ({len(truth)} files): precision {p:.4f}, recall {r:.4f}, "
              f"{miss} not mapped")
        sample = random.Random(3).sample(sorted(ntfs_tree), min(200, len(ntfs_tree)))
        truth = ntfs_object_ranges(ntfs_part, p2, sample)
        p, r, miss = accuracy(entries, truth, "/dev/sda2")
        print(f"accuracy NTFS vs ntfsinfo ({len(sample)} sampled files): precision {p:.4f}, "
              f"recall {r:.4f}, {miss} not mapped")

        if not args.no_watch:
            from diskwatch.bmap.generate import generate_bmap
            with FileSource(str(path), readonly=True) as src:
                wres = generate_bmap(src, work / "watch.bmap", accel=args.accel)
            watch_rate = wres.objects_per_second
            print(f"watch:    {wres.objects} objects in {wres.elapsed:.1f} s ({wres.accel}): "
                  f"{watch_rate:,.0f} objects/s (NTFS refused: "
                  f"{any(s.device == '/dev/sda2' for s in wres.skipped)})")
            print(f"ratio:    metadata is {meta_rate / max(watch_rate, 1e-9):,.0f}x the watch "
                  "method's objects/s")
        memory_of_a_million(work)
        print("PASS" if meta_rate >= GOAL else "BELOW GOAL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
