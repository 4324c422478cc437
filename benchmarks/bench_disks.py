#!/usr/bin/env python3
"""A session of two disks against a session of one, side by side (issue 20 item 5).

Two ext4 images with a file filling most of each, and their block maps:
  - one:        diskwatch A.img --bmap a.bmap, fio on its export
  - two-first:  diskwatch A.img B.img --bmap vm.bmap, fio on disk 1
  - two-second: the same session, fio on disk 2 (export sdb)
each headless, --no-trace (the summary names every request: a lookup each)
and with the trace written to /dev/null. fio's nbd engine, 4 KiB random
reads at depth 16 and 256 KiB sequential reads at depth 8; the kinds
alternate (A B C A B C ...) so machine noise hits all; medians compared,
ratios to ``one`` printed, with the diskwatch CPU per request.

    .venv/bin/python benchmarks/bench_disks.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from bench_server import JOBS, cpu_seconds, diskwatch_cmd, run_fio, stop_server, wait_for_socket

KINDS = ("one", "two-first", "two-second")
SIZE = 256 << 20


def make_disk(path: str, work: str, name: str) -> None:
    tree = os.path.join(work, name + "-tree")
    os.makedirs(tree)
    with open(os.path.join(tree, "big"), "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range((SIZE >> 20) - 40):
            f.write(block)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", tree, path, str(SIZE >> 10) + "k"],
                   check=True)


def make_map(images: list[str], out: str) -> None:
    subprocess.run(diskwatch_cmd() + [*images, "--bmap", out, "--headless", "--no-trace",
                                      "--run", "true"], check=True, capture_output=True)


def start(images: list[str], bmap: str, sock: str, trace: bool) -> subprocess.Popen:
    cmd = diskwatch_cmd() + [*images, "-r", "-U", sock, "--headless", "--bmap", bmap,
                             "--remap", "off"]
    if not trace:
        cmd.append("--no-trace")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, proc)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as work:
        a, b = os.path.join(work, "a.img"), os.path.join(work, "b.img")
        make_disk(a, work, "a")
        make_disk(b, work, "b")
        amap, vmmap = os.path.join(work, "a.bmap"), os.path.join(work, "vm.bmap")
        make_map([a], amap)
        make_map([a, b], vmmap)
        sock = os.path.join(work, "s.sock")
        for trace in (False, True):
            results: dict = {j: {k: [] for k in KINDS} for j in JOBS}
            for _ in range(args.rounds):
                for jobname, job in JOBS.items():
                    for kind in KINDS:
                        images, bmap = ([a], amap) if kind == "one" else ([a, b], vmmap)
                        proc = start(images, bmap, sock, trace)
                        try:
                            export = "sdb" if kind == "two-second" else ""
                            before = cpu_seconds(proc.pid)
                            r = run_fio(f"nbd+unix:///{export}?socket={sock}", job,
                                        args.seconds, SIZE)
                            r["cpu_us"] = (cpu_seconds(proc.pid) - before) * 1e6 / max(1, r["ios"])
                        finally:
                            stop_server(proc)
                        results[jobname][kind].append(r)
            print(f"\n{'trace to /dev/null' if trace else '--no-trace (summary)'}; "
                  f"load average now {os.getloadavg()[0]:.2f}")
            print(f"{'job':18} {'session':12} {'median':>14} {'ratio to one':>14}   CPU/request")
            for jobname, by in results.items():
                key = "iops" if "4k" in jobname else "bw"
                ref = statistics.median(r[key] for r in by["one"])
                for kind in KINDS:
                    v = statistics.median(r[key] for r in by[kind])
                    c = statistics.median(r["cpu_us"] for r in by[kind])
                    shown = f"{v / 1000:.1f}k IOPS" if key == "iops" else f"{v / 1e9:.2f} GB/s"
                    print(f"{jobname:18} {kind:12} {shown:>14} {v / ref:13.2f}x   {c:.1f} us")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
