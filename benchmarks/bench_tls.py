#!/usr/bin/env python3
"""TLS throughput: diskwatch vs nbdkit, both with TLS, same certificates, same run.

Certificates are made with certtool (gnutls-bin) in a temporary directory.
Each server serves the same image read-only on a unix socket with
``--tls=require``; the clients use ``nbds+unix://...&tls-certificates=DIR``:
  - nbdcopy of the whole image to /dev/null (sequential, multi-connection):
    MiB/s
  - fio's nbd engine, 4 KiB random reads at queue depth 16: IOPS
Plain (no TLS) runs of both servers are measured too, so the cost of TLS in
each server is shown beside the ratio between them, and the server's CPU
time per GiB copied (less sensitive to a loaded machine than the rates). Servers alternate
(A B A B ...) so machine noise hits both; medians of the rounds are compared.

    .venv/bin/python benchmarks/bench_tls.py [--rounds 3] [--size-mb 512] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_server import (  # noqa: E402 - a sibling script, not a package
    cpu_seconds,
    diskwatch_cmd,
    make_image,
    stop_server,
    wait_for_socket,
)

TEMPLATES = {
    "ca.info": "cn = bench CA\nca\ncert_signing_key\nexpiration_days = 2\n",
    "server.info": "cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\n"
                   "signing_key\nexpiration_days = 2\n",
}


def make_certificates(d: str) -> None:
    def certtool(*args: str) -> None:
        subprocess.run(["certtool", *args], cwd=d, check=True, capture_output=True)

    for name, text in TEMPLATES.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    certtool("--generate-privkey", "--outfile", "ca-key.pem")
    certtool("--generate-privkey", "--outfile", "server-key.pem")
    certtool("--generate-self-signed", "--load-privkey", "ca-key.pem", "--template", "ca.info",
             "--outfile", "ca-cert.pem")
    certtool("--generate-certificate", "--load-ca-certificate", "ca-cert.pem",
             "--load-ca-privkey", "ca-key.pem", "--load-privkey", "server-key.pem",
             "--template", "server.info", "--outfile", "server-cert.pem")


def start(kind: str, tls: bool, image: str, sock: str, certs: str) -> subprocess.Popen:
    if kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-r", "-U", sock]
        if tls:
            cmd += ["--tls=require", f"--tls-certificates={certs}"]
        cmd += ["file", image]
    else:
        cmd = diskwatch_cmd() + [image, "-r", "-U", sock, "--headless", "--no-trace"]
        if tls:
            cmd += ["--tls=require", "--tls-certificates", certs]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, proc)
    return proc


def fio_iops(uri: str, seconds: int, size: int, home: str) -> float:
    """fio's nbd engine refuses URIs naming local files (tls-certificates=):
    libnbd finds the CA in $HOME/.pki/libnbd instead."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
           "--bs=4k", "--iodepth=16", f"--runtime={seconds}", "--time_based", f"--size={size}",
           "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "HOME": home}).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


def copy_rate(uri: str, size: int) -> float:
    t = time.monotonic()
    subprocess.run(["nbdcopy", uri, "null:"], check=True, capture_output=True)
    return size / (time.monotonic() - t) / (1 << 20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--seconds", type=int, default=5, help="fio's run time")
    args = ap.parse_args()
    for tool, package in (("nbdkit", "nbdkit"), ("nbdcopy", "libnbd-bin"), ("fio", "fio"),
                          ("certtool", "gnutls-bin")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install {package}")
    tmp = tempfile.mkdtemp(prefix="diskwatch-bench-tls-")
    try:
        certs = os.path.join(tmp, "pki")
        os.mkdir(certs)
        make_certificates(certs)
        home = os.path.join(tmp, "home")  # for fio: $HOME/.pki/libnbd/ca-cert.pem
        os.makedirs(os.path.join(home, ".pki", "libnbd"))
        shutil.copy(os.path.join(certs, "ca-cert.pem"), os.path.join(home, ".pki", "libnbd"))
        image = os.path.join(tmp, "disk.img")
        make_image(image, args.size_mb << 20)
        size = os.path.getsize(image)
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        servers = [(k, tls) for tls in (True, False) for k in ("diskwatch", "nbdkit")]
        copy: dict = {s: [] for s in servers}
        cpu: dict = {s: [] for s in servers}  # server CPU seconds per GiB copied
        iops: dict = {s: [] for s in servers}
        for rnd in range(args.rounds):
            for kind, tls in servers if rnd % 2 == 0 else servers[::-1]:
                sock = os.path.join(tmp, f"{kind}-{tls}-{rnd}.sock")
                proc = start(kind, tls, image, sock, certs)
                uri = (f"nbds+unix:///?socket={sock}&tls-certificates={certs}" if tls
                       else f"nbd+unix:///?socket={sock}")
                try:
                    cpu0 = cpu_seconds(proc.pid)
                    copy[(kind, tls)].append(copy_rate(uri, size))
                    cpu[(kind, tls)].append((cpu_seconds(proc.pid) - cpu0) / (size / (1 << 30)))
                    fio_uri = uri.split("&tls-certificates=")[0]
                    iops[(kind, tls)].append(fio_iops(fio_uri, args.seconds, size, home))
                finally:
                    stop_server(proc)
        load = os.getloadavg()[0]
        print(f"TLS throughput, {args.size_mb} MiB image, median of {args.rounds} rounds "
              f"(load average {load:.1f})")
        print(f"{'':24}{'diskwatch':>12}{'nbdkit':>12}{'ratio':>8}")
        for name, table, fmt, unit in (("nbdcopy MiB/s", copy, ",.0f", ""),
                                       ("server CPU s/GiB", cpu, ".2f", "  (lower is better)"),
                                       ("fio 4k randread IOPS", iops, ",.0f", "")):
            for tls in (True, False):
                dw = statistics.median(table[("diskwatch", tls)])
                nk = statistics.median(table[("nbdkit", tls)])
                label = f"{name} {'TLS' if tls else 'plain'}"
                print(f"{label:<24}{dw:>12{fmt}}{nk:>12{fmt}}{dw / nk:>8.2f}{unit}")
        for kind in ("diskwatch", "nbdkit"):
            c = statistics.median(copy[(kind, True)]) / statistics.median(copy[(kind, False)])
            i = statistics.median(iops[(kind, True)]) / statistics.median(iops[(kind, False)])
            print(f"{kind}: TLS keeps {c:.0%} of its plain copy rate, {i:.0%} of its IOPS")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
