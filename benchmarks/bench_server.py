#!/usr/bin/env python3
"""diskwatch vs nbdkit, side by side, in the same run.

fio's nbd engine over a unix socket, on the same image, against:
  - diskwatch IMAGE -r --headless: events on, the text trace (a line per
    request that is not adjacent to the last) written to /dev/null
  - diskwatch IMAGE -r --headless --no-trace: events on, aggregated into the
    exit summary (what the UI and --headless --no-trace consume)
  - diskwatch IMAGE -r --headless --no-trace --record FILE: the same, and
    every request recorded (diskwatch/recording/writer.py); its ratio to the one
    above is what recording costs, and the recording is read back to count
    the requests it holds against fio's and the drops it reports
  - Debian's nbdkit file plugin (nbdkit -r -U SOCK file IMAGE)
Jobs: 4 KiB random reads at queue depth 16, 256 KiB sequential reads at
depth 8. Servers alternate (A B A B ...) so machine noise hits both; the
median of the rounds is compared. Prints both figures and the ratio.

    .venv/bin/python benchmarks/bench_server.py [--rounds 3] [--seconds 5]
        [--kinds diskwatch,dw-summary,dw-record,nbdkit]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
JOBS = {
    "randread-4k-qd16": dict(rw="randread", bs="4k", iodepth=16),
    "seqread-256k-qd8": dict(rw="read", bs="256k", iodepth=8),
}


def diskwatch_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "diskwatch")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "diskwatch.cli"]


def wait_for_socket(path: str, proc: subprocess.Popen, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        if time.monotonic() > end:
            raise RuntimeError(f"server did not create {path}")
        time.sleep(0.02)


KINDS = ("diskwatch", "dw-summary", "dw-record", "nbdkit")


def start_server(kind: str, image: str, sock: str) -> subprocess.Popen:
    if kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-r", "-U", sock, "file", image]
    else:
        cmd = diskwatch_cmd() + [image, "-r", "-U", sock, "--headless"]
        if kind in ("dw-summary", "dw-record"):
            cmd.append("--no-trace")
        if kind == "dw-record":
            cmd += ["--record", sock + ".rec"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, proc)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads (children excluded)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(uri: str, job: dict, seconds: int, size: int) -> dict:
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={job['rw']}",
           f"--bs={job['bs']}", f"--iodepth={job['iodepth']}", f"--runtime={seconds}",
           "--time_based", f"--size={size}", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return {"iops": r["iops"], "bw": r["bw_bytes"], "ios": r["total_ios"]}


def read_back(path: str) -> dict:
    """What a recording holds: reads recorded, drops reported, bytes a request."""
    sys.path.insert(0, os.path.dirname(HERE))
    from diskwatch.recording.reader import open_recording
    rec = open_recording(path)
    cols = rec.columns()
    reads = cols.command.tolist().count(0)
    size = os.path.getsize(path)
    os.unlink(path)
    return {"recorded": reads, "dropped": rec.header.dropped, "complete": rec.complete,
            "bytes_per_request": size / max(1, len(cols))}


def make_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)


def print_ratios(results: dict, kinds: list[str], ref: str, who: str) -> None:
    """The summary table: per job and server, the median throughput, its
    ratio to ``ref``'s and the CPU per request (``who``: whose CPU)."""
    print()
    print(f"{'job':18} {'server':12} {'median':>14} {'ratio to ' + ref:>18}   "
          f"{who} CPU per request")
    for jobname, by in results.items():
        key = "iops" if "4k" in jobname else "bw"
        rv = statistics.median(r[key] for r in by[ref])
        rc = statistics.median(r["cpu_us"] for r in by[ref])
        for kind in kinds:
            v = statistics.median(r[key] for r in by[kind])
            c = statistics.median(r["cpu_us"] for r in by[kind])
            shown = f"{v / 1000:.1f}k IOPS" if key == "iops" else f"{v / 1e9:.2f} GB/s"
            print(f"{jobname:18} {kind:12} {shown:>14} {v / rv:17.2f}x   "
                  f"{c:.2f} us ({c / rc:.2f}x {ref}'s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--image", help="use this image instead of a fresh random one")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--kinds", default=",".join(KINDS), help="servers to run (nbdkit always)")
    args = ap.parse_args()
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install {tool}")
    tmp = tempfile.mkdtemp(prefix="diskwatch-bench-")
    try:
        image = args.image or os.path.join(tmp, "disk.img")
        if not args.image:
            make_image(image, args.size_mb << 20)
        size = os.path.getsize(image)
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        results: dict = {}
        kinds = tuple(k for k in KINDS if k in args.kinds.split(",") or k == "nbdkit")
        for jobname in args.jobs.split(","):
            job = JOBS[jobname]
            for rnd in range(args.rounds):
                order = kinds if rnd % 2 == 0 else kinds[::-1]
                for kind in order:
                    sock = os.path.join(tmp, f"{kind}-{jobname}-{rnd}.sock")
                    proc = start_server(kind, image, sock)
                    try:
                        cpu0 = cpu_seconds(proc.pid)
                        r = run_fio(f"nbd+unix:///?socket={sock}", job, args.seconds, size)
                        ios = r["iops"] * args.seconds
                        r["cpu_us"] = (cpu_seconds(proc.pid) - cpu0) / ios * 1e6
                    finally:
                        stop_server(proc)
                    if kind == "dw-record":
                        r.update(read_back(sock + ".rec"))
                    results.setdefault(jobname, {}).setdefault(kind, []).append(r)
                    print(f"  {jobname:18} round {rnd + 1} {kind:10} "
                          f"{r['iops'] / 1000:7.1f}k IOPS {r['bw'] / 1e9:6.2f} GB/s "
                          f"{r['cpu_us']:6.2f} server CPU us/request", flush=True)
        print_ratios(results, kinds, "nbdkit", "server")
        if "dw-record" in kinds and "dw-summary" in kinds:
            print()
            print("recording (--record vs the same run without it):")
            for jobname, by in results.items():
                key = "iops" if "4k" in jobname else "bw"
                ratio = (statistics.median(r[key] for r in by["dw-record"])
                         / statistics.median(r[key] for r in by["dw-summary"]))
                lost = sum(r["ios"] - r["recorded"] for r in by["dw-record"])
                dropped = sum(r["dropped"] or 0 for r in by["dw-record"])
                per = statistics.median(r["bytes_per_request"] for r in by["dw-record"])
                print(f"{jobname:18} throughput {ratio:.2f}x without; dropped {dropped}; "
                      f"fio's reads not in the recording {lost}; {per:.1f} bytes a request; "
                      f"closed cleanly {all(r['complete'] for r in by['dw-record'])}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
