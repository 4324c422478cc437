"""How soon a new file is named, live, on a big disk (issue 18).

The disk of ``bench_remap.py`` (MBR, one ext4 partition, ``--files`` small
files: 500,000 by default) is served by diskwatch's server with a session,
its pump at 10 Hz (as headless runs) and the automatic remapper (its first
walk made at the start). Then, ``--rounds`` times: debugfs makes a new file
in the image (as a guest's kernel would), and a libnbd client writes the
blocks that changed (the file's data, its inode's inode-table block, its
directory's blocks) through the server, as the guest's writes. Printed: the
whole walk's time, and for each new file the time from its last write to
the moment the live map names it (settling, the update, the swap), with
the update's own time; the median of those.

    .venv/bin/python benchmarks/bench_new_file.py [--files 500000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_remap import build_disk  # noqa: E402

from diskwatch.bmap.index import BlockMap, BmapObject  # noqa: E402
from diskwatch.bmap.volumes import find_volumes  # noqa: E402
from diskwatch.events import Bus  # noqa: E402
from diskwatch.remap import Remapper, remap  # noqa: E402
from diskwatch.server import serve_in_thread  # noqa: E402
from diskwatch.sources.file import FileSource  # noqa: E402

try:
    from diskwatch.pipeline.session import Session  # noqa: E402
except ImportError:  # before the pipeline package
    from diskwatch.session import Session  # noqa: E402

BS = 4096


def debugfs(spec: str, command: str, write: bool = False) -> str:
    return subprocess.run(["debugfs", *(["-w"] if write else []), "-R", command, spec],
                          capture_output=True, text=True, check=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=500_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()
    import nbd
    image = args.work / f"diskwatch-bench-{args.files}.img"
    if not image.exists():
        print(f"building {image} ({args.files} files)...", flush=True)
        build_disk(image, args.work, args.files)
    source = FileSource(str(image))
    (part,) = [v for v in find_volumes(source, "/dev/sda")[0] if v.device == "/dev/sda1"]
    offset = part.offset
    spec = f"{image}?offset={offset}"
    t0 = time.monotonic()
    first = remap(source, None, why="bench")
    walk = time.monotonic() - t0
    blockmap: BlockMap = first.blockmap
    print(f"{args.files} files: {len(blockmap.object_table())} objects, whole walk {walk:.2f} s")
    bus = Bus()
    running = serve_in_thread({"": source}, bus)
    session = Session(bus=bus, size=source.size, description=image.name, blockmap=blockmap)
    said: list[str] = []
    results: list = []

    def swap(result) -> None:
        results.append(result)
        session.swap_map(result.blockmap, "remap", result.journal_map)
    remapper = session.pump.add(Remapper(source, current=lambda: session.blockmap, swap=swap,
                                         say=lambda text, level: said.append(text)))
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(0.1):
            session.pump.run_once(time.monotonic())
    threading.Thread(target=pump, daemon=True).start()
    h = nbd.NBD()
    h.connect_uri(running.uri)
    latencies, updates = [], []
    try:
        deadline = time.monotonic() + 600
        while not (remapper.mapper is not None and remapper.mapper.has_state
                   and not remapper.running):
            assert time.monotonic() < deadline, "the first walk did not end"
            time.sleep(0.05)
        for k in range(args.rounds):
            name = f"/top0{k % 10}/new-{k}-{time.time_ns()}.txt"
            debugfs(spec, f"write /etc/hostname {name}", write=True)
            inode_block = int(re.search(r"located at block (\d+)",
                                        debugfs(spec, f"imap {name}")).group(1))
            blocks = [inode_block, *map(int, debugfs(spec, f"blocks {name}").split()),
                      *map(int, debugfs(spec, f"blocks {name.rsplit('/', 1)[0]}").split())]
            with open(image, "rb") as f:
                for b in blocks:  # the guest's writes: what debugfs wrote, through the server
                    f.seek(offset + b * BS)
                    h.pwrite(f.read(BS), offset + b * BS)
            h.flush()
            wrote = time.monotonic()
            target = BmapObject("f", "/dev/sda1", name)
            before = len(results)
            while target not in session.blockmap.object_table():
                assert time.monotonic() < wrote + 60, f"{name} never named: {said[-3:]}"
                time.sleep(0.01)
            latency = time.monotonic() - wrote
            update = next((r for r in results[before:] if target in r.added), None)
            latencies.append(latency)
            updates.append(update.elapsed if update else float("nan"))
            kind = "update" if update is not None and update.incremental is not None else "walk"
            print(f"  {name}: named {latency:.2f} s after its last write "
                  f"({kind} {updates[-1]:.2f} s)", flush=True)
    finally:
        stop.set()
        h.shutdown()
        remapper.close()
        running.stop()
        source.close()
    print(f"median: named {statistics.median(latencies):.2f} s after the write, "
          f"the update {statistics.median(updates):.2f} s, the whole walk {walk:.2f} s "
          f"({walk / statistics.median(updates):.0f}x)")


if __name__ == "__main__":
    main()
