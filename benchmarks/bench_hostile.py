#!/usr/bin/env python3
"""Hostile clients against a running ``diskwatch`` (a subprocess), peak memory.

Each case starts a fresh server, runs one hostile client for a bounded
time, samples the server's memory every 20 ms (/proc/PID/status: VmRSS and
RssAnon; RssFile is the page cache of an mmap'd image, which the kernel
reclaims) and prints the peaks. Beside the hostile client a good libnbd
client keeps reading and verifying a range (``good reads``): it must see no
error. The cases are those of issue 9:

  cache-http     NBD_CMD_CACHE over a 2 GiB export served by nginx
  options        NBD_OPT_INFO pipelined for N seconds, replies never read
  handshakes     300 connections that never finish the handshake
  requests       4 KiB..1 MiB reads pipelined without reading the replies
                 (over --snapshot, so replies are bytes, not mmap views)
  writes-64m     64 MiB writes from 4 connections at once

    .venv/bin/python benchmarks/bench_hostile.py [--seconds 10] [--cases a,b]
    PYTHONPATH=OLD_TREE .venv/bin/python benchmarks/bench_hostile.py   # another tree
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20
REQUEST_MAGIC = 0x25609513
IHAVEOPT = 0x49484156454F5054
HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_PYTHON = "/usr/bin/python3"


def diskwatch_cmd() -> list[str]:
    return [sys.executable, "-m", "diskwatch.cli"]


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


class Sampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_rss = self.peak_anon = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss, anon = memory(self.pid)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            time.sleep(0.02)


class Server:
    def __init__(self, args: list[str], work: str):
        self.sock = os.path.join(work, f"nbd{random.randrange(1 << 30)}.sock")
        env = {**os.environ, "PATH": "/usr/bin:/bin:" + os.environ.get("PATH", "")}
        self.proc = subprocess.Popen(diskwatch_cmd() + args + ["-U", self.sock, "--headless",
                                                               "--no-trace"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        end = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.02)
        self.sampler = Sampler(self.proc.pid)
        self.sampler.start()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.sock)
        return s

    def stop(self) -> tuple[int, int, bool]:
        self.sampler.stop.set()
        self.sampler.join()
        alive = self.proc.poll() is None
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.sampler.peak_rss, self.sampler.peak_anon, alive


def handshake(s: socket.socket, structured: bool = False) -> None:
    """Fixed newstyle, NO_ZEROES, EXPORT_NAME "" (short and works anywhere)."""
    s.recv(18, socket.MSG_WAITALL)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 1, 0))
    s.recv(10, socket.MSG_WAITALL)


def request(cmd: int, offset: int, length: int, handle: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)


GOOD_CLIENT = r"""
import sys, time, nbd, hashlib
uri, seconds, offset, length = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD(); h.connect_uri(uri)
expect = h.pread(length, offset)
n = errors = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        if h.pread(length, offset) != expect:
            errors += 1
        n += 1
    except nbd.Error as e:
        errors += 1
print(n, errors)
"""


class GoodClient:
    """A libnbd client (Debian's python) reading and verifying while the case runs."""

    def __init__(self, server: Server, seconds: float, offset: int = 0, length: int = 65536):
        uri = f"nbd+unix:///?socket={server.sock}"
        self.proc = subprocess.Popen([SYSTEM_PYTHON, "-c", GOOD_CLIENT, uri, str(seconds),
                                      str(offset), str(length)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def result(self) -> tuple[int, int]:
        out, err = self.proc.communicate(timeout=120)
        try:
            n, errors = map(int, out.split())
        except ValueError:
            return 0, -1
        return n, errors


# --- the cases ----------------------------------------------------------------------

def case_options(work: str, image: str, seconds: float) -> dict:
    srv = Server([image, "-r"], work)
    good = GoodClient(srv, seconds)
    s = srv.connect()
    s.recv(18, socket.MSG_WAITALL)
    s.sendall(struct.pack(">I", 3))
    info = struct.pack(">QII", IHAVEOPT, 6, 6) + struct.pack(">IH", 0, 0)  # NBD_OPT_INFO ""
    batch = info * 4096
    sent = flood(s, batch, seconds)
    n, errors = good.result()
    s.close()
    rss, anon, alive = srv.stop()
    return dict(rss=rss, anon=anon, alive=alive, good=n, good_errors=errors,
                note=f"{sent // len(info)} options sent")


def flood(s: socket.socket, batch: bytes, seconds: float) -> int:
    """Send ``batch`` again and again for ``seconds`` without reading a
    reply (as far as the server lets us); the bytes sent."""
    s.setblocking(False)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sent += s.send(batch)
        except BlockingIOError:
            time.sleep(0.005)
        except OSError:
            break
    return sent


def case_handshakes(work: str, image: str, seconds: float) -> dict:
    srv = Server([image, "-r"], work)
    good = GoodClient(srv, seconds)
    time.sleep(1.0)  # the good client connects first: over the limit, new ones are refused
    socks = []
    for _ in range(300):
        try:
            s = srv.connect()
            s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 6, 100))  # half an option
            socks.append(s)
        except OSError:
            break
    time.sleep(seconds)
    # how many the server still holds open
    open_ = 0
    for s in socks:
        s.setblocking(False)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
    n, errors = good.result()
    for s in socks:
        s.close()
    rss, anon, alive = srv.stop()
    return dict(rss=rss, anon=anon, alive=alive, good=n, good_errors=errors,
                note=f"{len(socks)} connected, {open_} still open after {seconds:.0f}s")


def case_requests(work: str, image: str, seconds: float) -> dict:
    srv = Server([image, "--snapshot"], work)
    # make the first 64 MiB overlay-backed so replies are bytes read with pread
    prep = srv.connect()
    handshake(prep)
    for i in range(16):
        prep.sendall(request(1, i * 4 * MiB, 4 * MiB, handle=i) + bytes(4 * MiB))
        prep.recv(16, socket.MSG_WAITALL)
    prep.close()
    good = GoodClient(srv, seconds, offset=100 * MiB)
    s = srv.connect()
    handshake(s)
    rng = random.Random(1)
    batch = b"".join(request(0, rng.randrange(0, 60) * MiB, rng.choice((4096, 65536, MiB)),
                             handle=i) for i in range(2048))
    sent = flood(s, batch, seconds)
    n, errors = good.result()
    s.close()
    rss, anon, alive = srv.stop()
    return dict(rss=rss, anon=anon, alive=alive, good=n, good_errors=errors,
                note=f"{sent // 28} requests sent")


def case_writes(work: str, image: str, seconds: float) -> dict:
    rw = os.path.join(work, "rw.img")
    subprocess.run(["cp", "--sparse=always", image, rw], check=True)
    srv = Server([rw], work)
    good = GoodClient(srv, seconds, offset=512 * MiB)
    data = random.Random(2).randbytes(64 * MiB)
    results = []

    def writer(k: int) -> None:
        s = srv.connect()
        handshake(s)
        ok = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendall(request(1, k * 64 * MiB, len(data), handle=k) + data)
            reply = s.recv(16, socket.MSG_WAITALL)
            if len(reply) == 16 and struct.unpack(">IIQ", reply)[1] == 0:
                ok += 1
            else:
                break
        results.append(ok)
        s.close()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n, errors = good.result()
    rss, anon, alive = srv.stop()
    return dict(rss=rss, anon=anon, alive=alive, good=n, good_errors=errors,
                note=f"{sum(results)} writes of 64 MiB acknowledged")


def case_cache_http(work: str, image: str, seconds: float) -> dict:
    if not shutil.which("nginx"):
        return dict(skipped="nginx is not installed")
    root = os.path.join(work, "www")
    os.makedirs(root, exist_ok=True)
    big = os.path.join(root, "disk.img")
    with open(big, "wb") as f:
        f.truncate(2 << 30)
    nginx_dir = os.path.join(work, "nginx")
    os.makedirs(nginx_dir, exist_ok=True)
    with socket.socket() as t:
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
    conf = os.path.join(nginx_dir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off; user root; pid {nginx_dir}/nginx.pid; error_log {nginx_dir}/error.log;
worker_processes 1; events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {nginx_dir}/b; proxy_temp_path {nginx_dir}/p;
fastcgi_temp_path {nginx_dir}/f; uwsgi_temp_path {nginx_dir}/u; scgi_temp_path {nginx_dir}/s;
server {{ listen 127.0.0.1:{port}; root {root}; }} }}
""")
    nginx = subprocess.Popen(["nginx", "-c", conf, "-p", nginx_dir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > end:
                    return dict(skipped="nginx did not start")
                time.sleep(0.05)
        srv = Server([f"http://127.0.0.1:{port}/disk.img", "-r"], work)
        s = srv.connect()
        handshake(s)
        s.settimeout(seconds * 6)
        t0 = time.monotonic()
        s.sendall(request(5, 0, (2 << 30) - 4096, handle=9))
        try:
            reply = s.recv(16, socket.MSG_WAITALL)
            err = struct.unpack(">IIQ", reply)[1] if len(reply) == 16 else -1
        except TimeoutError:
            err = -2
        took = time.monotonic() - t0
        s.close()
        rss, anon, alive = srv.stop()
        return dict(rss=rss, anon=anon, alive=alive, good=0, good_errors=0,
                    note=f"CACHE of 2 GiB answered {err} in {took:.1f}s")
    finally:
        nginx.terminate()
        nginx.wait(10)


CASES = {"cache-http": case_cache_http, "options": case_options,
         "handshakes": case_handshakes, "requests": case_requests, "writes-64m": case_writes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--size-mb", type=int, default=1024)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-hostile-")
    try:
        image = os.path.join(work, "disk.img")
        with open(image, "wb") as f:
            f.truncate(args.size_mb * MiB)
            f.seek(0)
            f.write(random.Random(0).randbytes(128 * MiB))
            f.seek(512 * MiB)
            f.write(random.Random(1).randbytes(64 * MiB))
        print(f"{'case':12} {'peak RSS':>10} {'peak anon':>10}  alive  good reads (errors)  note")
        for name in args.cases.split(","):
            r = CASES[name](work, image, args.seconds)
            if "skipped" in r:
                print(f"{name:12} skipped: {r['skipped']}")
                continue
            print(f"{name:12} {r['rss'] / MiB:8.0f} MiB {r['anon'] / MiB:8.0f} MiB  "
                  f"{'yes' if r['alive'] else 'NO':5}  {r['good']:8} ({r['good_errors']})"
                  f"        {r['note']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
