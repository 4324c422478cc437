#!/usr/bin/env python3
"""A boot from a slow remote image store, with and without its prefetch
list, side by side in one run (issue 21, item 6).

The demo guest (busybox on ext4, Debian's kernel, under TCG) boots from an
http URL served by nginx behind a proxy that makes it a remote store:

- nginx's ``limit_rate`` bounds each connection's rate (``--rate``, default
  4 MiB/s), as an object store's per-connection throughput;
- the proxy (in this script) holds each request ``--latency`` ms (default
  30) before nginx sees it: a round trip to a store elsewhere.

First one boot from the local file is recorded and its prefetch list made
(``diskwatch report REC --prefetch-list LIST``). Then rounds alternate: a
boot from the URL without the list, one with ``--prefetch LIST``, both
``--snapshot --no-trace --headless``; each is timed from diskwatch's start
to the guest's poweroff (the captive command's exit). Prints each boot,
the medians and their ratio (with / without), and how many requests nginx
answered for each.

    .venv/bin/python benchmarks/bench_prefetch.py [--rounds 3] [--rate 4m] [--latency 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sources import diskwatch_cmd, start_nginx  # noqa: E402 - a sibling script

from diskwatch.demo.guest import build_guest_image  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diskwatch-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LatencyProxy:
    """127.0.0.1:port -> upstream, each chunk the client sends held
    ``latency`` seconds first (an HTTP request: one round trip)."""

    def __init__(self, upstream: int, latency: float) -> None:
        self.upstream, self.latency = upstream, latency
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def main():
            server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
            ready.set()
            async with server:
                await server.serve_forever()
        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    async def _client(self, reader, writer) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        async def forward(src, dst, delay: float):
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    dst.close()
                except OSError:
                    pass

        await asyncio.gather(forward(reader, up_w, self.latency), forward(up_r, writer, 0.0))

    def close(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            self.loop.call_soon_threadsafe(task.cancel)
        self.thread.join(5)


def boot(source: str, guest, extra: list[str], timeout: float = 900) -> float:
    command = guest.qemu_shell_command("$nbd", "tcg")
    t0 = time.monotonic()
    r = subprocess.run([*diskwatch_cmd(), source, "--snapshot", "--headless", "--no-trace",
                        *extra, "--run", command], capture_output=True, text=True,
                       timeout=timeout)
    elapsed = time.monotonic() - t0
    if r.returncode != 0 or guest.marker not in r.stdout + r.stderr:
        raise SystemExit(f"boot failed ({r.returncode}): {r.stderr[-2000:]}")
    return elapsed


def requests_since(log: Path, mark: int) -> tuple[int, int]:
    lines = log.read_text().splitlines() if log.exists() else []
    return len(lines) - mark, len(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", default="4m", help="nginx limit_rate per connection (4m)")
    ap.add_argument("--latency", type=float, default=30.0, help="ms added per request (30)")
    args = ap.parse_args()
    if not shutil.which("nginx"):
        raise SystemExit("nginx is needed (Debian package nginx-light)")
    CACHE.mkdir(parents=True, exist_ok=True)
    guest = build_guest_image(CACHE / "prefetch-guest.img")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="dw-prefetch-") as tmp_s:
        tmp = Path(tmp_s)
        root = tmp / "www"
        root.mkdir()
        shutil.copy(guest.path, root / "guest.img")
        rec, plist = tmp / "boot.dwrec", tmp / "boot.prefetch"
        local = boot(str(guest.path), guest, ["--record", str(rec)])
        r = subprocess.run([*diskwatch_cmd(), "report", str(rec), "--prefetch-list", str(plist)],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr)
        ranges = [ln for ln in plist.read_text().splitlines() if not ln.startswith("#")]
        listed = sum(int(ln.split()[1]) for ln in ranges)
        print(f"local boot (recorded): {local:.1f} s; prefetch list: {len(ranges)} ranges, "
              f"{listed / (1 << 20):.1f} MiB")
        nginx, port = start_nginx(str(tmp), str(root), access_log=f"{tmp}/access.log",
                                  server_extra=f"limit_rate {args.rate};")
        proxy = LatencyProxy(port, args.latency / 1000)
        url = f"http://127.0.0.1:{proxy.port}/guest.img"
        log = tmp / "access.log"
        print(f"store: nginx limit_rate {args.rate}, +{args.latency:.0f} ms a request")
        times: dict[str, list[float]] = {"without": [], "with": []}
        gets: dict[str, list[int]] = {"without": [], "with": []}
        mark = 0
        try:
            for i in range(args.rounds):
                for name, extra in (("without", []), ("with", ["--prefetch", str(plist)])):
                    t = boot(url, guest, extra)
                    n, mark = requests_since(log, mark)
                    times[name].append(t)
                    gets[name].append(n)
                    print(f"round {i + 1} {name:>7} the list: {t:6.1f} s, {n} http requests, "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            proxy.close()
            nginx.terminate()
            nginx.wait(10)
        without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
        print(f"\nmedian boot: without the list {without:.1f} s, with {with_:.1f} s: "
              f"{with_ / without:.2f}x the time ({without / with_:.2f}x faster); "
              f"local file {local:.1f} s")
        print(f"median http requests: without {statistics.median(gets['without']):.0f}, "
              f"with {statistics.median(gets['with']):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
