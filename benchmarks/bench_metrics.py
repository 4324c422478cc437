#!/usr/bin/env python3
"""The cost of --metrics: a fio flood with and without it, side by side.

fio's nbd engine (4 KiB random reads, queue depth 16, unix socket) against:
  - headless      diskwatch IMAGE -r --headless --no-trace
  - metrics       the same with --metrics 127.0.0.1:0, scraped every second
  - map           headless with a block map (10,000 files over the image)
  - map+metrics   the map and --metrics (partitions, directories, top files),
                  scraped every second
  - nbdkit        Debian's nbdkit file plugin, the reference
Servers alternate (A B C ... then reversed) so machine noise hits all; the
median of the rounds is compared. The figure that matters is the ratio of
"metrics" to "headless" (and "map+metrics" to "map"): the goal is within 5%.
On a shared, loaded machine IOPS swing from round to round; the server's
CPU time per request (from /proc) is the steadier figure, printed beside.

    .venv/bin/python benchmarks/bench_metrics.py [--rounds 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_server import (  # noqa: E402 - the shared fio and server helpers
    cpu_seconds,
    diskwatch_cmd,
    make_image,
    run_fio,
    stop_server,
    wait_for_socket,
)

JOB = dict(rw="randread", bs="4k", iodepth=16)
KINDS = ("headless", "metrics", "map", "map+metrics", "nbdkit")


def make_map(path: str, size: int, files: int = 10_000) -> None:
    """A partition over the image, 100 top-level directories, ``files`` files
    tiling it (each request lands in a file, as in a busy guest)."""
    step = (size - (1 << 20)) // files
    with open(path, "w") as f:
        f.write(f"1 0 {size:x} v /dev/sda\n1 100000 {size:x} p /dev/sda1\n")
        for i in range(files):
            start = (1 << 20) + i * step
            f.write(f"1 {start:x} {start + step:x} f /dev/sda1 /d{i % 100:02d}/f{i:05d}\n")


class Scraper(threading.Thread):
    """GETs the endpoint every second, as Prometheus would."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.scrapes = 0
        self.seconds: list[float] = []
        self.size = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            t = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as r:
                self.size = len(r.read())
            self.seconds.append(time.perf_counter() - t)
            self.scrapes += 1


def start(kind: str, image: str, bmap: str, sock: str):
    if kind == "nbdkit":
        proc = subprocess.Popen(["nbdkit", "-f", "-r", "-U", sock, "file", image],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(sock, proc)
        return proc, None
    cmd = diskwatch_cmd() + [image, "-r", "-U", sock, "--headless", "--no-trace"]
    if "map" in kind:
        cmd += ["--bmap", bmap]
    if "metrics" in kind:
        cmd += ["--metrics", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    scraper = None
    if "metrics" in kind:
        err = b""
        deadline = time.monotonic() + 30
        while (m := re.search(rb"metrics at (\S+)", err)) is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"diskwatch did not say where its metrics are: {err!r}")
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if ready:
                err += os.read(proc.stderr.fileno(), 4096)
        scraper = Scraper(m.group(1).decode())
        scraper.start()
    wait_for_socket(sock, proc)
    return proc, scraper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install {tool}")
    tmp = tempfile.mkdtemp(prefix="diskwatch-bench-metrics-")
    try:
        image = os.path.join(tmp, "disk.img")
        make_image(image, args.size_mb << 20)
        size = os.path.getsize(image)
        bmap = os.path.join(tmp, "disk.bmap")
        make_map(bmap, size)
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for rnd in range(args.rounds):
            for kind in (kinds if rnd % 2 == 0 else kinds[::-1]):
                sock = os.path.join(tmp, f"{kind}-{rnd}.sock")
                proc, scraper = start(kind, image, bmap, sock)
                try:
                    cpu0 = cpu_seconds(proc.pid)
                    r = run_fio(f"nbd+unix:///?socket={sock}", JOB, args.seconds, size)
                    r["cpu_us"] = (cpu_seconds(proc.pid) - cpu0) / (r["iops"] * args.seconds) * 1e6
                finally:
                    if scraper is not None:
                        scraper.stop.set()
                        scraper.join()
                    stop_server(proc)
                extra = ""
                if scraper is not None:
                    r["scrapes"] = scraper.scrapes
                    r["scrape_ms"] = statistics.median(scraper.seconds) * 1e3 if scraper.seconds else 0
                    extra = (f"  {scraper.scrapes} scrapes, median {r['scrape_ms']:.1f} ms, "
                             f"{scraper.size} bytes")
                results[kind].append(r)
                print(f"  round {rnd + 1} {kind:12} {r['iops'] / 1000:7.1f}k IOPS "
                      f"{r['cpu_us']:6.2f} server CPU us/request{extra}", flush=True)
        med = {k: statistics.median(r["iops"] for r in v) for k, v in results.items()}
        cpu = {k: statistics.median(r["cpu_us"] for r in v) for k, v in results.items()}
        print()
        print(f"fio {JOB['rw']} {JOB['bs']} QD{JOB['iodepth']}, {args.rounds} rounds of "
              f"{args.seconds} s, medians (os.getloadavg: {os.getloadavg()[0]:.2f})")
        print(f"{'server':14} {'IOPS':>10} {'CPU us/req':>11}  ratios")
        for k in kinds:
            ratios = []
            base = {"metrics": "headless", "map+metrics": "map"}.get(k)
            if base in med:
                # Ratios within each round (the two ran next to each other, under
                # the same load), then their median: steadier on a busy machine.
                iops_r = statistics.median(a["iops"] / b["iops"]
                                           for a, b in zip(results[k], results[base], strict=True))
                cpu_r = statistics.median(a["cpu_us"] / b["cpu_us"]
                                          for a, b in zip(results[k], results[base], strict=True))
                ratios.append(f"{iops_r:.3f}x {base}'s IOPS, {cpu_r:.3f}x its CPU per request "
                              "(median of per-round ratios)")
            if k != "nbdkit" and "nbdkit" in med:
                ratios.append(f"{med[k] / med['nbdkit']:.2f}x nbdkit")
            print(f"{k:14} {med[k] / 1000:9.1f}k {cpu[k]:10.2f}   " + ", ".join(ratios))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
