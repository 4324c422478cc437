#!/usr/bin/env python3
"""Does the UI slow the guest? fio floods 4 KiB random reads at diskwatch
headless and at diskwatch with its Textual UI (in a detached tmux terminal),
alternating, in the same run; prints both and the ratio (target >= 0.8), and
the UI process's memory at the start and the end of the flood (bounded?).

    .venv/bin/python benchmarks/bench_ui.py [--rounds 3] [--seconds 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_server import diskwatch_cmd, make_image, run_fio, wait_for_socket  # noqa: E402


def rss_kib(pid: int) -> int:
    """Anonymous resident memory: the image's pages mapped from the page
    cache (diskwatch serves reads from an mmap) are not the process's own."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def flood(kind: str, image: str, tmp: str, seconds: int, tag: str) -> dict:
    sock = os.path.join(tmp, f"{kind}-{tag}.sock")
    job = dict(rw="randread", bs="4k", iodepth=16)
    if kind == "headless":
        proc = subprocess.Popen(diskwatch_cmd() + [image, "-r", "-U", sock, "--headless"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(sock, proc)
        pid = proc.pid
    else:
        session = f"diskwatch-bench-{os.getpid()}-{tag}"
        cmd = " ".join(diskwatch_cmd() + [image, "-r", "-U", sock])
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "48", cmd],
                       check=True)
        pid = int(subprocess.run(["tmux", "display", "-p", "-t", session, "#{pane_pid}"],
                                 capture_output=True, text=True, check=True).stdout)
        end = time.monotonic() + 20
        while not os.path.exists(sock):
            if time.monotonic() > end:
                raise RuntimeError("the UI did not start")
            time.sleep(0.05)
        proc = None
    try:
        rss0 = rss_kib(pid)
        r = run_fio(f"nbd+unix:///?socket={sock}", job, seconds, os.path.getsize(image))
        r["rss0"], r["rss1"] = rss0, rss_kib(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
        if proc is not None:
            proc.wait(10)
        else:
            end = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
                time.sleep(0.05)
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--size-mb", type=int, default=512)
    args = ap.parse_args()
    for tool in ("fio", "tmux"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install {tool}")
    tmp = tempfile.mkdtemp(prefix="diskwatch-bench-ui-")
    try:
        image = os.path.join(tmp, "disk.img")
        make_image(image, args.size_mb << 20)
        res: dict[str, list] = {"headless": [], "ui": []}
        for rnd in range(args.rounds):
            for kind in (("headless", "ui") if rnd % 2 == 0 else ("ui", "headless")):
                r = flood(kind, image, tmp, args.seconds, str(rnd))
                res[kind].append(r)
                print(f"  round {rnd + 1} {kind:8} {r['iops'] / 1000:7.1f}k IOPS  "
                      f"RSS {r['rss0'] // 1024} -> {r['rss1'] // 1024} MiB", flush=True)
        h = statistics.median(r["iops"] for r in res["headless"])
        u = statistics.median(r["iops"] for r in res["ui"])
        # each round's pair ran back to back: their ratio shows the noise
        pairs = sorted(ru["iops"] / rh["iops"] for rh, ru in zip(res["headless"], res["ui"],
                                                                   strict=True))
        print(f"\n4 KiB random reads, QD16: headless {h / 1000:.1f}k IOPS, "
              f"with the UI {u / 1000:.1f}k IOPS, ratio {u / h:.2f}x (target >= 0.8); "
              f"per round {' '.join(f'{p:.2f}' for p in pairs)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
