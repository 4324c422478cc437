"""Live remapping (issue 10, item 6): does a guest's throughput hold while
the disk is remapped in the background?

One MBR disk, /dev/sda1 ext4 with 10,000 files (the test suite's many-files
tree). diskwatch's server serves it (the session's pump running at 10 Hz, as
headless does, with the block map looked up per request). A libnbd client
does 4 KiB random reads and writes, queue depth 16, for ``--seconds`` in
three phases, in one run:

1. quiet: no remap;
2. remapping: the metadata mapper walks the served disk back to back in a
   thread (a worst case: the automatic remap runs at most every 5 s and
   never more than a fifth of the time);
3. quiet again (the machine's load may have changed).

Printed: requests/s of each phase, the ratio remapping/quiet (medians of
the quiet phases), and how long one remap of this disk takes.

    .venv/bin/python benchmarks/bench_remap.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from diskwatch.bmap.index import BlockMap  # noqa: E402
from diskwatch.events import Bus  # noqa: E402
from diskwatch.remap import remap  # noqa: E402
from diskwatch.server import serve_in_thread  # noqa: E402
from diskwatch.session import Session  # noqa: E402
from diskwatch.sources.file import FileSource  # noqa: E402


def client_rate(uri: str, size: int, seconds: float) -> float:
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(1)
    buf = nbd.Buffer(4096)
    wbuf = nbd.Buffer.from_bytearray(bytearray(4096))
    done = 0
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        cookies = []
        for _ in range(16):
            off = rng.randrange(size // 4096) * 4096
            if rng.random() < 0.5:
                cookies.append(h.aio_pread(buf, off))
            else:
                cookies.append(h.aio_pwrite(wbuf, off))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            h.aio_command_completed(c)
        done += 16
    rate = done / (time.monotonic() - t0)
    h.shutdown()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    sys.setswitchinterval(0.0002)  # as the runner sets it (runner.py)
    from fixtures_images import build_many_files_image, make_map
    with tempfile.TemporaryDirectory(prefix="bench-remap-") as tmp:
        work = Path(tmp)
        disk = build_many_files_image(work / "many.img", work)
        bmap = make_map(disk.path, work / "many.bmap")
        source = FileSource(str(disk.path))
        bus = Bus()
        running = serve_in_thread({"": source}, bus)
        session = Session(bus=bus, size=source.size, description="many",
                          blockmap=BlockMap.load(bmap))
        stop = threading.Event()

        def pump() -> None:
            while not stop.wait(0.1):
                session.pump.run_once(time.monotonic())
        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        remaps: list[float] = []
        remapping = threading.Event()

        def remapper() -> None:
            while not stop.is_set():
                if not remapping.wait(0.1):
                    continue
                r = remap(source, session.blockmap, why="bench")
                remaps.append(r.elapsed)
                if r.blockmap is not None:
                    session.blockmap = r.blockmap
        threading.Thread(target=remapper, daemon=True).start()
        try:
            quiet1 = client_rate(running.uri, source.size, args.seconds)
            remapping.set()
            busy = client_rate(running.uri, source.size, args.seconds)
            remapping.clear()
            quiet2 = client_rate(running.uri, source.size, args.seconds)
        finally:
            stop.set()
            pumper.join()
            running.stop()
            source.close()
        quiet = (quiet1 + quiet2) / 2
        objects = len({o for _, _, o in session.blockmap.entries()})
        print(f"disk: {disk.path.name}, {objects} objects in the map")
        print(f"4 KiB random r/w, QD16: quiet {quiet1:.0f}/s, remapping {busy:.0f}/s, "
              f"quiet {quiet2:.0f}/s")
        print(f"remapping/quiet: {busy / quiet:.2f}; {len(remaps)} remaps back to back, "
              f"median {sorted(remaps)[len(remaps) // 2]:.2f} s each"
              if remaps else "no remap finished")


if __name__ == "__main__":
    main()
