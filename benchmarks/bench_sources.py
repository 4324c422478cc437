#!/usr/bin/env python3
"""Read throughput of diskwatch's sources next to nbdkit's equivalents, same run.

Each case reads the whole export to nothing with ``nbdcopy "$uri" null:``,
run captive by each server:

  xz, 1/4/16 MiB blocks   diskwatch IMAGE.xz          nbdkit --filter=xz file IMAGE.xz
  http via nginx          diskwatch http://...        nbdkit curl http://...

Only the nbdcopy run is timed (the command times itself), so interpreter
start-up is not counted. Servers alternate (A B A B ...) and the best of the
rounds is kept for each. Prints MB/s for both and the ratio diskwatch/nbdkit.

    .venv/bin/python benchmarks/bench_sources.py [--size-mib 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20

# The captive command: time nbdcopy alone, in nanoseconds, into $TIMEFILE.
TIMED_COPY = ('t0=$(date +%s%N); nbdcopy "$uri" null: || exit 1; '
              't1=$(date +%s%N); echo $((t1 - t0)) > "$TIMEFILE"')


def diskwatch_cmd() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "diskwatch")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "diskwatch.cli"]


def make_image(path: str, size: int) -> None:
    """Half random (incompressible), half text-like: xz has real work to do."""
    rng = random.Random(1)
    words = [f"word{i:04d} ".encode() for i in range(4096)]
    with open(path, "wb") as f:
        written = 0
        while written < size:
            if (written // MiB) % 2:
                chunk = rng.randbytes(MiB)
            else:
                chunk = b"".join(rng.choice(words) for _ in range(MiB // 9 + 1))[:MiB]
            f.write(chunk)
            written += len(chunk)


def xz(src: str, dst: str, block: int) -> None:
    with open(dst, "wb") as out:
        subprocess.run(["xz", "-1", "-T2", f"--block-size={block}", "-c", src],
                       stdout=out, check=True)


def start_nginx(tmp: str, root: str, *, access_log: str = "off",
                server_extra: str = "") -> tuple[subprocess.Popen, int]:
    """nginx serving ``root``; ``server_extra``: more directives for its
    server block (bench_prefetch.py's ``limit_rate``)."""
    for _ in range(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""daemon off; user root; pid {tmp}/nginx.pid; error_log {tmp}/error.log;
worker_processes 2;
events {{ worker_connections 256; }}
http {{
    access_log {access_log};
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    server {{ listen 127.0.0.1:{port}; root {root}; {server_extra} }}
}}
""")
        proc = subprocess.Popen(["nginx", "-c", conf, "-p", tmp], stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while time.monotonic() < end and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, port
            except OSError:
                time.sleep(0.02)
        proc.kill()
        proc.wait()
    raise SystemExit("nginx did not start")


def timed(cmd: list[str], tmp: str) -> float:
    """Run a captive server command; seconds nbdcopy took."""
    timefile = os.path.join(tmp, "elapsed")
    if os.path.exists(timefile):
        os.unlink(timefile)
    r = subprocess.run(cmd, env={**os.environ, "TIMEFILE": timefile},
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    with open(timefile) as f:
        return int(f.read()) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=128, help="image size (default 128)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each server (best kept)")
    ap.add_argument("--only", choices=["xz", "http"], help="run one kind of case")
    args = ap.parse_args()
    for tool in ("nbdkit", "nbdcopy", "xz", "nginx"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed")
    size = args.size_mib * MiB
    dw = diskwatch_cmd()
    common = ["--headless", "--log", os.devnull, "--run", TIMED_COPY]
    with tempfile.TemporaryDirectory(prefix="bench-sources-") as tmp:
        image = os.path.join(tmp, "disk.img")
        make_image(image, size)
        cases: list[tuple[str, list[str], list[str]]] = []
        nginx = None
        if args.only in (None, "xz"):
            for block in (1, 4, 16):
                path = os.path.join(tmp, f"disk-{block}M.img.xz")
                xz(image, path, block * MiB)
                cases.append((f"xz {block} MiB blocks",
                              dw + [path] + common,
                              ["nbdkit", "-U", "-", "--filter=xz", "file", path,
                               "--run", TIMED_COPY]))
        if args.only in (None, "http"):
            nginx, port = start_nginx(tmp, tmp)
            url = f"http://127.0.0.1:{port}/disk.img"
            cases.append(("http via nginx", dw + [url] + common,
                          ["nbdkit", "-U", "-", "-r", "curl", url, "--run", TIMED_COPY]))
        try:
            print(f"whole-export read of a {args.size_mib} MiB image with nbdcopy to null:, "
                  f"best of {args.rounds}")
            print(f"{'case':<20} {'diskwatch MB/s':>15} {'nbdkit MB/s':>12} {'ratio':>7}")
            for name, dw_cmd, nbdkit_cmd in cases:
                best = {"dw": float("inf"), "nbdkit": float("inf")}
                for _ in range(args.rounds):
                    best["dw"] = min(best["dw"], timed(dw_cmd, tmp))
                    best["nbdkit"] = min(best["nbdkit"], timed(nbdkit_cmd, tmp))
                dw_rate, nk_rate = size / best["dw"] / 1e6, size / best["nbdkit"] / 1e6
                print(f"{name:<20} {dw_rate:>15.0f} {nk_rate:>12.0f} {dw_rate / nk_rate:>7.2f}",
                      flush=True)
        finally:
            if nginx is not None:
                nginx.terminate()
                nginx.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
