#!/usr/bin/env python3
"""A qcow2 through diskwatch vs qemu-nbd directly, side by side, in one run.

fio's nbd engine over a unix socket reads the same qcow2 (random data,
converted from raw by qemu-img) from:
  - qemu-nbd -r -f qcow2 (the reference: the guest talking to qemu directly)
  - diskwatch IMAGE.qcow2 -r --headless --no-trace (read-only: plain data
    clusters are read from the file where ``qemu-img map`` says they are,
    the rest from diskwatch's private qemu-storage-daemon read with libnbd's
    asynchronous calls; sources/hostmap.py)
  - diskwatch nbd+unix://qemu-nbd -r --headless --no-trace (the tap in front
    of a running qemu-nbd: two servers in the path)
  - with --kinds ...,nbdkit-tap: nbdkit's nbd plugin in front of the same
    qemu-nbd (the reference for the tap: another server in the path)
  - with --kinds ...,snapshot: the same with --snapshot instead of -r (a
    blocking layer: mapped reads on the loop, the rest in worker threads)
  - with --kinds ...,writable: the image opened for writing (no map: every
    read goes through the daemon)
  - with --kinds ...,threads: diskwatch IMAGE.qcow2 --filter delay:read=0, a
    pass-through layer that hides the asynchronous way in, so requests go
    through the server's 8 worker threads and a pool of 4 blocking libnbd
    handles (the alternative the asynchronous engine was measured against)
Jobs: 4 KiB random reads at queue depth 16, 256 KiB sequential reads at
depth 8. Servers alternate so machine noise hits all; medians compared.

    .venv/bin/python benchmarks/bench_formats.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_server import (  # noqa: E402
    JOBS,
    cpu_seconds,
    diskwatch_cmd,
    make_image,
    print_ratios,
    run_fio,
    stop_server,
    wait_for_socket,
)

KINDS = ("qemu-nbd", "diskwatch", "tap")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants (diskwatch's private
    qemu-storage-daemon is its child: its work is part of the path)."""
    total = cpu_seconds(pid)
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = f.read().split()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        total += sum(tree_cpu(int(child)) for child in children)
    return total
ALL_KINDS = (*KINDS, "nbdkit-tap", "snapshot", "writable", "threads")


def start(kind: str, image: str, sock: str, tmp: str) -> list[subprocess.Popen]:
    """The servers for one kind; the last one is what fio talks to."""
    procs = []
    qsock = sock + ".qemu"
    if kind in ("qemu-nbd", "tap", "nbdkit-tap"):
        qemu = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "0", "-f", "qcow2",
                                 "-k", sock if kind == "qemu-nbd" else qsock, image],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(sock if kind == "qemu-nbd" else qsock, qemu)
        procs.append(qemu)
    if kind == "nbdkit-tap":
        tap = subprocess.Popen(["nbdkit", "-f", "-r", "-U", sock, "nbd", f"socket={qsock}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(sock, tap)
        procs.append(tap)
    elif kind != "qemu-nbd":
        src = f"nbd+unix:///?socket={qsock}" if kind == "tap" else image
        mode = {"snapshot": ["--snapshot"], "writable": []}.get(kind, ["-r"])
        if kind == "threads":
            mode += ["--filter", "delay:read=0"]
        dw = subprocess.Popen(diskwatch_cmd() + [src, *mode, "-U", sock, "--headless",
                                                 "--no-trace"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(sock, dw)
        procs.append(dw)
    return procs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--kinds", default=",".join(KINDS))
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown or "qemu-nbd" not in kinds:
        raise SystemExit(f"--kinds: qemu-nbd and any of {', '.join(ALL_KINDS[1:])}")
    for tool in ("fio", "qemu-nbd", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install fio qemu-utils "
                             "qemu-system-common")
    tmp = tempfile.mkdtemp(prefix="diskwatch-bench-formats-")
    try:
        raw = os.path.join(tmp, "disk.img")
        make_image(raw, args.size_mb << 20)
        image = os.path.join(tmp, "disk.qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image],
                       check=True)
        os.unlink(raw)
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        size = args.size_mb << 20
        results: dict = {}
        for jobname in args.jobs.split(","):
            job = JOBS[jobname]
            for rnd in range(args.rounds):
                order = kinds if rnd % 2 == 0 else kinds[::-1]
                for kind in order:
                    sock = os.path.join(tmp, f"{kind}-{jobname}-{rnd}.sock")
                    procs = start(kind, image, sock, tmp)
                    try:
                        cpu0 = sum(tree_cpu(p.pid) for p in procs)
                        r = run_fio(f"nbd+unix:///?socket={sock}", job, args.seconds, size)
                        ios = r["iops"] * args.seconds
                        r["cpu_us"] = (sum(tree_cpu(p.pid) for p in procs) - cpu0) / ios * 1e6
                    finally:
                        for p in reversed(procs):
                            stop_server(p)
                    results.setdefault(jobname, {}).setdefault(kind, []).append(r)
                    print(f"  {jobname:18} round {rnd + 1} {kind:10} "
                          f"{r['iops'] / 1000:7.1f}k IOPS {r['bw'] / 1e9:6.2f} GB/s "
                          f"{r['cpu_us']:6.2f} servers' CPU us/request", flush=True)
        print_ratios(results, kinds, "qemu-nbd", "servers'")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
