"""Block-map lookup speed on a 1,000,000-range map (issue 3, item 4).

Builds a synthetic map shaped like a real disk (one ``v`` for the whole
disk, a few ``p`` partitions, and inside each, directories and files packed
one after another, some files fragmented, with uncovered gaps for
filesystem metadata and free space), then reports:

- time to build the ``BlockMap`` index from entries (and, unless
  ``--no-file``, to write the map as a virt-bmap file and load it back);
- lookups per second for random 4 KiB and 128 KiB requests, through
  ``lookup`` and the ``first`` fast path, median of 5 runs.

The target is >= 500k lookups/s for typical small (4 KiB) requests.
Offsets are drawn before timing, so the loop measures only the call and the
loop around it (as a trace sink would have).

    .venv/bin/python benchmarks/bench_bmap_lookup.py [--ranges N] [--no-file]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

from diskwatch.bmap.format import BmapEntry, write_bmap
from diskwatch.bmap.index import BlockMap

KiB = 1024
MiB = 1024 * KiB
TARGET = 500_000
RUNS = 5
LOOKUPS_PER_RUN = 200_000


def synthetic_entries(n_ranges: int, seed: int = 1) -> list[BmapEntry]:
    """About ``n_ranges`` entries: v > 4 partitions > directories and files."""
    rng = random.Random(seed)
    n_parts = 4
    per_part = (n_ranges - 1 - n_parts) // n_parts
    entries: list[BmapEntry] = []
    pos = 1 * MiB  # partitions start at 1 MiB as fdisk puts them
    for p in range(1, n_parts + 1):
        dev = f"/dev/sda{p}"
        part_start = pos
        part_entries: list[BmapEntry] = []
        pos += 64 * KiB  # superblock, group descriptors: uncovered by d/f
        n_dir = n_file = 0
        directory = "/"
        while len(part_entries) < per_part:
            if n_file % 20 == 0:  # a new directory every 20 files
                n_dir += 1
                directory = f"/dir{n_dir // 100}/sub {n_dir}"
                part_entries.append(BmapEntry(1, pos, pos + 4 * KiB, "d", dev, directory))
                pos += 4 * KiB
            n_file += 1
            path = f"{directory}/file {n_file}.dat"
            # log-uniform sizes from 4 KiB to 1 MiB, as small files dominate
            size = 4 * KiB << rng.randrange(9)
            extents = 1 if rng.random() < 0.8 else rng.randint(2, 3)
            for _ in range(extents):
                ext = max(4 * KiB, (size // extents) & ~(4 * KiB - 1))
                part_entries.append(BmapEntry(1, pos, pos + ext, "f", dev, path))
                pos += ext
                if rng.random() < 0.1:  # free space or metadata between files
                    pos += 4 * KiB * rng.randint(1, 16)
        pos += 1 * MiB
        entries.append(BmapEntry(1, part_start, pos, "p", dev, None))
        entries.extend(part_entries)
    disk_size = pos + 1 * MiB
    entries.insert(0, BmapEntry(1, 0, disk_size, "v", "/dev/sda", None))
    return entries


def rate(fn: Callable[[int, int], object], offsets: list[int], length: int) -> tuple[float, float]:
    """Median lookups/s over RUNS runs of fn(offset, length), by wall and CPU time.

    CPU time is shown too because these machines are shared: when other
    processes take the cores, wall-clock rates drop while CPU rates hold.
    """
    wall, cpu = [], []
    for _ in range(RUNS):
        t0, c0 = time.perf_counter(), time.process_time()
        for off in offsets:
            fn(off, length)
        wall.append(len(offsets) / (time.perf_counter() - t0))
        cpu.append(len(offsets) / max(time.process_time() - c0, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranges", type=int, default=1_000_000)
    ap.add_argument("--no-file", action="store_true", help="skip the write/load round trip")
    args = ap.parse_args()

    t0 = time.perf_counter()
    entries = synthetic_entries(args.ranges)
    t_gen = time.perf_counter() - t0
    disk_size = entries[0].end

    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    bmap = BlockMap(entries)
    t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"map: {len(bmap):,} ranges, {bmap.segment_count:,} segments, "
        f"disk {disk_size / 2**30:.1f} GiB (generated in {t_gen:.1f} s)"
    )
    print(f"build BlockMap from entries: {t_build:.2f} s ({c_build:.2f} s CPU)")

    if not args.no_file:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "synthetic.bmap")
            t0 = time.perf_counter()
            write_bmap(path, entries)
            t_write = time.perf_counter() - t0
            mib = os.path.getsize(path) / MiB
            del entries, bmap
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            bmap = BlockMap.load(path)
            t_load, c_load = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"write {mib:.0f} MiB virt-bmap file: {t_write:.2f} s; "
            f"BlockMap.load (parse + build): {t_load:.2f} s ({c_load:.2f} s CPU)"
        )
    else:
        del entries

    rng = random.Random(2)
    offsets = [rng.randrange(disk_size // 512) * 512 for _ in range(LOOKUPS_PER_RUN)]
    results = {}
    for name, fn, length in (
        ("lookup 4 KiB", bmap.lookup, 4 * KiB),
        ("lookup 128 KiB", bmap.lookup, 128 * KiB),
        ("first 4 KiB", bmap.first, 4 * KiB),
        ("first 128 KiB", bmap.first, 128 * KiB),
    ):
        results[name] = r, rc = rate(fn, offsets, length)
        print(
            f"{name:>15}: {r:>10,.0f} lookups/s wall, {rc:>10,.0f} /s CPU "
            f"(median of {RUNS} x {len(offsets):,})"
        )
    pieces = sum(len(bmap.lookup(o, 128 * KiB)) for o in offsets[:20_000]) / 20_000
    print(f"   (a 128 KiB request averages {pieces:.2f} pieces on this map)")

    small, small_cpu = results["lookup 4 KiB"]
    verdict = "MET" if small >= TARGET else "NOT MET"
    print(
        f"RESULT: {small:,.0f} lookups/s for 4 KiB on {len(bmap):,} ranges "
        f"({small_cpu:,.0f}/s by CPU time; 128 KiB: {results['lookup 128 KiB'][0]:,.0f}/s), "
        f"build {t_build:.2f} s; target {TARGET:,}/s (wall clock) {verdict}"
    )


if __name__ == "__main__":
    main()
