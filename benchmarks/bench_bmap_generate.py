"""Block-map generation speed (issue 3, item 8): objects/s on a ~1 GiB image
with ~10,000 files, and where the time goes.

Builds the test suite's many-files image (MBR, one ext4 partition, 10,000
files in 110 directories, ~200 MB of data; or ``--image`` an existing raw
disk), runs ``generate_bmap`` on it once and prints: objects mapped, total
time, objects/s over the whole run and over the walk alone (everything after
the appliance launch), and the time of each phase (probe, markers, launch,
devices, filesystems, metadata, directories, files, shutdown, write). With ``--check`` (the default
for the built image) it also measures accuracy against debugfs: worst
per-file byte precision and recall.

The target is >= 200 objects/s. For scale: the naive way (one
``debug bmap_file`` + ``debug bmap`` round trip per object) does about 4
objects/s under TCG here.

    .venv/bin/python benchmarks/bench_bmap_generate.py [--files N] [--image RAW] [--accel tcg]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from diskwatch.bmap.format import read_bmap
from diskwatch.bmap.generate import generate_bmap
from diskwatch.events import Bus, Message
from diskwatch.sources.file import FileSource

TARGET = 200.0
HERE = Path(__file__).resolve().parent


def accuracy(image, entries) -> tuple[float, float, int]:
    """Worst per-file precision and recall against debugfs, and how many files checked."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from groundtruth import ext4_file_ranges

    device = "/dev/sda1"
    vol = image.volume(device)
    truth = ext4_file_ranges(image.path, vol.offset)
    got: dict[str, list[tuple[int, int]]] = {}
    for e in entries:
        if e.type == "f" and e.device == device:
            got.setdefault(e.path, []).append((e.start, e.end))
    worst_p = worst_r = 1.0
    for path, want in truth.items():
        if not want:
            continue
        mine = sorted(got.get(path, []))
        hit = 0
        for s1, e1 in mine:
            for s2, e2 in want:
                hit += max(0, min(e1, e2) - max(s1, s2))
        got_bytes = sum(e - s for s, e in mine)
        worst_p = min(worst_p, hit / got_bytes if got_bytes else 0.0)
        worst_r = min(worst_r, hit / sum(e - s for s, e in want))
    return worst_p, worst_r, len(truth)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10_000, help="files in the built image")
    ap.add_argument("--image", help="map this raw disk image instead of building one")
    ap.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    ap.add_argument("--no-check", action="store_true", help="skip the debugfs accuracy check")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-bmap-") as work:
        image = None
        if args.image:
            path = args.image
        else:
            sys.path.insert(0, str(HERE.parent / "tests"))
            from fixtures_images import build_many_files_image

            t = time.monotonic()
            image = build_many_files_image(Path(work) / "many.img", Path(work), args.files)
            path = str(image.path)
            print(f"built {path}: {image.size >> 20} MiB, {args.files} files "
                  f"in {time.monotonic() - t:.1f} s")  # fmt: skip
        bus = Bus()
        bus.on_event(lambda e: print("  " + e.text) if isinstance(e, Message) else None)
        out = os.path.join(work, "out.bmap")
        with FileSource(path, readonly=True) as src:
            res = generate_bmap(src, out, bus=bus, accel=args.accel)
        walk = res.elapsed - sum(res.timings.get(k, 0.0) for k in ("probe", "markers", "launch"))
        print(f"\nobjects mapped:   {res.objects} ({res.files} files, {res.directories} dirs, "
              f"{res.partitions} partitions, {res.lvs} LVs, {res.devices} device)")  # fmt: skip
        print(f"ranges written:   {res.entries}")
        print(f"total time:       {res.elapsed:.1f} s  ({res.accel})")
        print(f"objects/s:        {res.objects_per_second:.0f} overall "
              f"(target >= {TARGET:.0f}), {res.objects / walk:.0f} after launch")  # fmt: skip
        print("time split:       " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()))
        print(f"diagnostics:      missed markers {res.missed_markers}, unattributed "
              f"{res.unattributed_bytes} B, metadata re-read {res.metadata_reread_bytes} B, "
              f"directories read alone {res.directories_alone}")  # fmt: skip
        print(f"files by extents: {res.files_by_extents} read many to a window, "
              f"{res.files_alone} read alone; unmatched {res.unmatched_bytes} B, "
              f"unseen {res.unseen_bytes} B")  # fmt: skip
        if image is not None and not args.no_check:
            p, r, n = accuracy(image, read_bmap(out))
            print(f"accuracy:         {n} files vs debugfs: worst precision {p:.4f}, "
                  f"worst recall {r:.4f}")  # fmt: skip
        print("PASS" if res.objects_per_second >= TARGET else "BELOW TARGET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
