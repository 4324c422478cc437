"""Live remapping (issue 18): does a guest's disk hold while the disk is
remapped in the background?

For each disk (MBR, /dev/sda1 ext4 with ``--files`` files, comma-separated
counts: 10,000 and 100,000 by default), diskwatch's server serves it (the
session's pump at 10 Hz, as headless runs, the block map looked up per
request, the runner's switch interval). A libnbd client does 4 KiB random
reads and writes (the writes outside the filesystem) at queue depth 16
and counts completions in 0.25 s slots,
through five phases in one run:

1. quiet;
2. remapping **in a mapper process** (``remap``, what diskwatch does now),
   back to back: a worst case, the automatic remap runs at most every 5 s;
3. quiet;
4. remapping **in the server's process** (the walk in a thread, as
   diskwatch did before issue 18: the reference);
5. quiet.

Printed per disk: the quiet median (requests/s over 1 s windows of the
quiet phases), and for each way of remapping the median and the **worst
1 s window** as a ratio of the quiet median (the goal: >= 0.8 for the
mapper process), and the median time of one remap.

    .venv/bin/python benchmarks/bench_remap.py [--seconds 8] [--files 10000,100000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from diskwatch.bmap.index import BlockMap  # noqa: E402
from diskwatch.bmap.metadata import map_metadata  # noqa: E402
from diskwatch.events import Bus  # noqa: E402
from diskwatch.pipeline.session import Session  # noqa: E402
from diskwatch.remap import remap  # noqa: E402
from diskwatch.server import serve_in_thread  # noqa: E402
from diskwatch.sources.file import FileSource  # noqa: E402

MiB = 1 << 20
SLOT = 0.25
WRITE_AREA = 128 * MiB


def build_disk(path: Path, work: Path, count: int) -> None:
    """An MBR disk, one ext4 partition holding ``count`` small files
    (0-6 KiB) in 100 directories of 10 directories each; reads go
    anywhere, writes to the last ``WRITE_AREA`` of the disk, outside it."""
    from diskwatch.demo.guest import make_partition_table, mkfs_ext4_at
    rng = random.Random(count)
    tree = work / f"tree-{count}"
    blob = rng.randbytes(8192)
    for i in range(count):
        d = tree / f"top{i % 10:02d}" / f"mid{(i // 10) % 100:02d}"
        if i < 1000:
            d.mkdir(parents=True, exist_ok=True)
        n = rng.randint(0, 6144)
        (d / f"file{i:06d}.dat").write_bytes(blob[:n])
    size = max(1024, count // 40) * MiB
    with open(path, "wb") as f:
        f.truncate(size)
    # The partition leaves the disk's last WRITE_AREA to the client's writes:
    # random writes into the filesystem would turn it into garbage that no
    # remap then maps (and on which The Sleuth Kit may never return).
    ((offset, length),) = make_partition_table(path, "dos", [(size - 2 * WRITE_AREA, "83")])
    mkfs_ext4_at(path, offset, length, tree)


def client(uri: str, size: int, stop: threading.Event, slots: list[tuple[float, int]]) -> None:
    """4 KiB random r/w, QD16, until ``stop``; (time, completions) per slot."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(1)
    buf = nbd.Buffer(4096)
    wbuf = nbd.Buffer.from_bytearray(bytearray(4096))
    blocks = size // 4096
    first_writable = (size - WRITE_AREA) // 4096
    done = 0
    slot_end = time.monotonic() + SLOT
    while not stop.is_set():
        cookies = []
        for _ in range(16):
            if rng.random() < 0.5:
                cookies.append(h.aio_pread(buf, rng.randrange(blocks) * 4096))
            else:
                cookies.append(h.aio_pwrite(wbuf, rng.randrange(first_writable, blocks) * 4096))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            h.aio_command_completed(c)
        done += 16
        now = time.monotonic()
        if now >= slot_end:
            slots.append((now, done))
            done = 0
            slot_end = now + SLOT
    h.shutdown()


def windows(slots: list[tuple[float, int]], t0: float, t1: float) -> list[float]:
    """Requests/s of every 1 s window (4 slots) wholly inside [t0, t1)."""
    inside = [n for t, n in slots if t0 + SLOT <= t < t1]
    k = int(1 / SLOT)
    return [sum(inside[i:i + k]) for i in range(len(inside) - k + 1)]


def remap_in_process(source, old) -> float:
    """The reference: the walk and the index built in the server's process
    (a thread), as before issue 18."""
    t0 = time.monotonic()
    meta = map_metadata(source, done_event=False)
    new = BlockMap(meta.entries)
    {o for _, _, o in new.iter_entries()} - {o for _, _, o in old.iter_entries()}  # the compare
    return time.monotonic() - t0


def run_disk(count: int, seconds: float, work: Path) -> None:
    disk = work / f"files-{count}.img"
    t = time.monotonic()
    build_disk(disk, work, count)
    os.sync()  # mkfs -d leaves GBs dirty: writeback would stall the first phase
    built = time.monotonic() - t
    source = FileSource(str(disk))
    first = remap(source, None, why="bench")
    assert first.blockmap is not None, first.error
    bus = Bus()
    running = serve_in_thread({"": source}, bus)
    session = Session(bus=bus, size=source.size, description=disk.name,
                      blockmap=first.blockmap)
    stop = threading.Event()

    def pump() -> None:
        while not stop.wait(0.1):
            session.pump.run_once(time.monotonic())
    threading.Thread(target=pump, daemon=True).start()
    mode = {"now": ""}
    working = threading.Event()  # a remap is under way
    times: dict[str, list[float]] = {"process": [], "in-process": []}

    def remapper() -> None:
        while not stop.is_set():
            working.set()
            if mode["now"] == "process":
                r = remap(source, session.blockmap, why="bench")
                assert r.blockmap is not None, r.error
                session.blockmap = r.blockmap
                times["process"].append(r.elapsed)
            elif mode["now"] == "in-process":
                times["in-process"].append(remap_in_process(source, session.blockmap))
            else:
                working.clear()
                time.sleep(0.05)
    threading.Thread(target=remapper, daemon=True).start()
    slots: list[tuple[float, int]] = []
    cstop = threading.Event()
    c = threading.Thread(target=client, args=(running.uri, source.size, cstop, slots))
    c.start()
    marks = []
    try:
        time.sleep(2)  # warm-up, not counted
        for phase in ("", "process", "", "in-process", ""):
            mode["now"] = ""
            while not phase and working.is_set():  # the last remap of a phase ends first
                time.sleep(0.05)
            start = time.monotonic()
            mode["now"] = phase
            while time.monotonic() < start + seconds:
                time.sleep(0.05)
            marks.append((phase, start, time.monotonic()))
        mode["now"] = ""
    finally:
        cstop.set()
        c.join()
        stop.set()
        running.stop()
        source.close()
    quiet = [w for phase, a, b in marks if not phase for w in windows(slots, a, b)]
    q = statistics.median(quiet)
    each = ", ".join(f"{statistics.median(windows(slots, a, b)):.0f}"
                     for phase, a, b in marks if not phase)
    objects = len(first.blockmap.object_table())
    print(f"disk: {count} files, {objects} objects in the map (image built in {built:.0f} s)")
    print(f"  quiet: median {q:.0f} req/s over {len(quiet)} 1 s windows (phases: {each})")
    for how in ("process", "in-process"):
        busy = [w for phase, a, b in marks if phase == how for w in windows(slots, a, b)]
        label = "mapper process" if how == "process" else "in the server's process (before)"
        took = times[how]
        print(f"  remapping {label}: median {statistics.median(busy) / q:.2f}x, worst 1 s "
              f"window {min(busy) / q:.2f}x of quiet; {len(took)} remaps, median "
              f"{statistics.median(took) if took else float('nan'):.2f} s each")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--files", default="10000,100000")
    args = ap.parse_args()
    sys.setswitchinterval(0.0002)  # as the runner sets it (runner.py)
    with tempfile.TemporaryDirectory(prefix="bench-remap-") as tmp:
        for count in map(int, args.files.split(",")):
            run_disk(count, args.seconds, Path(tmp))


if __name__ == "__main__":
    main()
