#!/usr/bin/env python3
"""Load: many concurrent libnbd clients with mixed reads and writes against
``diskwatch IMAGE`` (a subprocess), for a bounded time.

Each client owns a region of the disk and keeps a model of it: every read
is checked against the model as it goes, and afterwards every region is
read back whole, and the image file itself compared once the server has
exited. Printed: operations, bytes verified, the spread of per-client
throughput (no client starved: min/median/max operations a second), and
the server's peak memory (VmRSS; RssAnon without the mmap'd image).

    .venv/bin/python benchmarks/bench_load.py [--clients 64] [--seconds 20]
        [--region-mb 8] [--write-share 0.3]

tests/test_load.py runs a lighter version of this (``run_load``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hostile import memory  # noqa: E402 - (VmRSS, RssAnon) of a pid

MiB = 1 << 20
BLOCK = 4096


class Client(threading.Thread):
    def __init__(self, uri: str, k: int, region: int, model: bytearray, seconds: float,
                 write_share: float, barrier: threading.Barrier):
        super().__init__(daemon=True)
        self.uri, self.k, self.region, self.model = uri, k, region, model
        self.seconds, self.write_share, self.barrier = seconds, write_share, barrier
        self.ops = self.reads = self.writes = self.verified = 0
        self.errors: list[str] = []

    def run(self) -> None:
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri)
        rng = random.Random(self.k)
        size = len(self.model)
        base = self.k * self.region
        self.barrier.wait()
        end = time.monotonic() + self.seconds
        try:
            while time.monotonic() < end:
                n = rng.choice((BLOCK, 4 * BLOCK, 16 * BLOCK))
                off = rng.randrange(0, size - n + 1, BLOCK)
                if rng.random() < self.write_share:
                    data = rng.randbytes(n)
                    h.pwrite(data, base + off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
                    self.model[off:off + n] = data
                    self.writes += 1
                else:
                    got = h.pread(n, base + off)
                    if got != self.model[off:off + n]:
                        self.errors.append(f"client {self.k}: wrong data at {off}")
                    self.verified += n
                    self.reads += 1
                self.ops += 1
            h.flush()
            # the whole region, read back
            for off in range(0, size, 4 * MiB):
                n = min(4 * MiB, size - off)
                if h.pread(n, base + off) != self.model[off:off + n]:
                    self.errors.append(f"client {self.k}: region differs at {off}")
                self.verified += n
            h.shutdown()
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            self.errors.append(f"client {self.k}: {e}")


def run_load(diskwatch: list[str], work: str, *, clients: int, seconds: float,
             region: int, write_share: float = 0.3) -> dict:
    """Serve a fresh image with ``diskwatch`` (argv prefix), run the clients,
    verify, and return the figures."""
    image = os.path.join(work, "load.img")
    rng = random.Random(0)
    models = []
    with open(image, "wb") as f:
        for _ in range(clients):
            data = rng.randbytes(region)
            f.write(data)
            models.append(bytearray(data))
    sock = os.path.join(work, "load.sock")
    proc = subprocess.Popen(diskwatch + [image, "-U", sock, "--headless", "--no-trace"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, anon = memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            time.sleep(0.02)

    try:
        end = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"diskwatch did not start: {proc.stderr.read()!r}")
            time.sleep(0.02)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        uri = f"nbd+unix:///?socket={sock}"
        barrier = threading.Barrier(clients)
        threads = [Client(uri, k, region, models[k], seconds, write_share, barrier)
                   for k in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)
        took = time.monotonic() - t0
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    errors = [e for t in threads for e in t.errors]
    # the file itself, once the server is gone
    with open(image, "rb") as f:
        for k in range(clients):
            if f.read(region) != models[k]:
                errors.append(f"image differs in client {k}'s region")
    rates = sorted(t.ops / seconds for t in threads)
    return dict(clients=clients, seconds=seconds, took=took, errors=errors,
                ops=sum(t.ops for t in threads), reads=sum(t.reads for t in threads),
                writes=sum(t.writes for t in threads),
                verified=sum(t.verified for t in threads) + clients * region,
                rate_min=rates[0], rate_median=statistics.median(rates), rate_max=rates[-1],
                peak_rss=peak[0], peak_anon=peak[1])


def report(r: dict) -> str:
    spread = r["rate_max"] / r["rate_min"] if r["rate_min"] else float("inf")
    return (f"{r['clients']} clients, {r['seconds']:.0f}s: {r['ops']} ops ({r['reads']} reads, "
            f"{r['writes']} writes), {r['verified'] / MiB:.0f} MiB verified, "
            f"{len(r['errors'])} errors\n"
            f"per-client ops/s: min {r['rate_min']:.0f}, median {r['rate_median']:.0f}, "
            f"max {r['rate_max']:.0f} (max/min {spread:.2f})\n"
            f"server peak memory: VmRSS {r['peak_rss'] / MiB:.0f} MiB, "
            f"RssAnon {r['peak_anon'] / MiB:.0f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--region-mb", type=int, default=8)
    ap.add_argument("--write-share", type=float, default=0.3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-load-")
    try:
        r = run_load([sys.executable, "-m", "diskwatch.cli"], work, clients=args.clients,
                     seconds=args.seconds, region=args.region_mb * MiB,
                     write_share=args.write_share)
        print(report(r))
        for e in r["errors"][:10]:
            print("  ", e)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
