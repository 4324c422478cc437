"""A real Prometheus (Debian's package) scrapes diskwatch every second; the
bytes a libnbd client read come back from a PromQL query through its HTTP
API, and every query of the Grafana dashboard is valid PromQL there."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from fixtures_metrics import FILES, scrape_until, value, write_map
from fixtures_server import MiB, nbd_handle
from test_contrib import dashboard_queries

KiB = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, tmp_path, target: str):
        exe = shutil.which("prometheus")
        assert exe, "prometheus is missing: apt-get install prometheus"
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: diskwatch\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        for _ in range(3):  # the port was free a moment ago; another may take it meanwhile
            self.port = free_port()
            self.proc = subprocess.Popen(
                [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=self.log, stderr=self.log)
            if self._ready():
                return
            self.stop()
        raise AssertionError((tmp_path / "prometheus.log").read_text()[-2000:])

    def _ready(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def query(self, promql: str) -> dict:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # a bad query is a 400 with a JSON body
            return json.load(e)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.slow
def test_prometheus_scrapes_the_bytes_the_client_read(rw_image, tmp_path, diskwatch_metrics):
    bmap = write_map(tmp_path / "disk.bmap")
    dw = diskwatch_metrics([rw_image, "--bmap", bmap, "--metrics", "0",
                            "--metrics-refresh", "1"])
    h = nbd_handle(dw.uri)
    db = FILES["/var/lib/db/data"][0]
    reads = [(db + i * 128 * KiB, 128 * KiB) for i in range(24)] + [(30 * MiB, 4 * KiB)]
    for off, ln in reads:
        h.pread(ln, off)
    for i in range(6):
        h.pwrite(b"p" * 4096, FILES["/var/log/app.log"][0] + i * 4096)
    read_bytes = sum(ln for _, ln in reads)
    scrape_until(dw.url, lambda s: value(s, "diskwatch_bytes_total", export="",
                                         command="read") == read_bytes)
    prom = Prometheus(tmp_path, dw.url.removeprefix("http://").removesuffix("/metrics"))
    try:
        promql = 'sum(diskwatch_bytes_total{job="diskwatch", command="read"})'
        deadline = time.monotonic() + 30
        while True:
            r = prom.query(promql)
            assert r["status"] == "success", r
            got = r["data"]["result"]
            if got and float(got[0]["value"][1]) == read_bytes:
                break
            assert time.monotonic() < deadline, f"Prometheus never had the read bytes: {r}"
            time.sleep(0.2)
        r = prom.query('diskwatch_partition_bytes_total{partition="/dev/sda1", op="write"}')
        assert float(r["data"]["result"][0]["value"][1]) == 6 * 4096
        # every query of the dashboard is valid PromQL (Grafana's variables filled in)
        for expr in dashboard_queries():
            if expr.startswith("label_values("):
                continue  # a Grafana function, not PromQL
            q = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            r = prom.query(q)
            assert r["status"] == "success", (expr, r)
        h.shutdown()
    finally:
        prom.stop()
        prom.log.close()
