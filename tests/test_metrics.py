"""``--metrics`` and ``--otlp`` with real clients: a libnbd client reads and
writes, the endpoint is scraped (and an OTLP receiver started here gets the
exports), and the numbers are exactly what the client did. Label cardinality
stays bounded with 100,000 distinct files touched."""

from __future__ import annotations

import http.server
import subprocess
import threading

import pytest
from fixtures_metrics import FILES, P2, KiB, scrape, scrape_until, value, write_map
from fixtures_server import DISKWATCH, SUBPROCESS_ENV, MiB, nbd_handle

from diskwatch.sinks.metrics import LATENCY_BOUNDS, series_bound


def delta(after: dict, before: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_scrape_shows_exactly_what_a_libnbd_client_did(rw_image, tmp_path, diskwatch_metrics):
    bmap = write_map(tmp_path / "disk.bmap")
    dw = diskwatch_metrics([rw_image, "--bmap", bmap, "--metrics", "0",
                            "--metrics-refresh", "0.2"])
    assert dw.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    h = nbd_handle(dw.uri, strict=False)
    db, log_off = FILES["/var/lib/db/data"][0], FILES["/var/log/app.log"][0]
    # Files and directories are top-N series: one touch each makes them
    # members (their series appear, at 0, at the next refresh); from then on
    # they count exactly. Partitions and exports count exactly from the start.
    h.pread(4096, db)
    h.pwrite(b"w" * 4096, log_off)
    key = ("diskwatch_file_requests_total", ("op", "write"), ("partition", "/dev/sda1"),
           ("path", "/var/log/app.log"))
    s0 = scrape_until(dw.url, lambda s: key in s)
    assert value(s0, "diskwatch_connections", export="") == 1
    assert value(s0, "diskwatch_requests_total", export="", command="read") == 1
    assert value(s0, "diskwatch_partition_bytes_total", partition="/dev/sda1",
                 op="write") == 4096

    reads = [(db + i * 64 * KiB, 64 * KiB) for i in range(40)]
    reads += [(FILES["/vmlinuz"][0], 512 * KiB), (P2[0], 4 * KiB), (0, 512)]
    for off, ln in reads:
        h.pread(ln, off)
    for i in range(25):  # log churn: 4 KiB appended, again and again
        h.pwrite(b"x" * 4096, log_off + i * 4096)
    h.flush()
    h.trim(64 * KiB, P2[0] + MiB)
    with pytest.raises(Exception):  # noqa: B017 - libnbd's error type; the errno is what counts
        h.pwrite(b"y" * 4096, 32 * MiB)  # past the end: ENOSPC from the server
    read_bytes = sum(ln for _, ln in reads)
    s = scrape_until(dw.url, lambda s: value(
        s, "diskwatch_requests_total", export="", command="trim") == 1)
    d = {name: lambda name=name, **kw: delta(s, s0, name, **kw) for name in (
        "diskwatch_requests_total", "diskwatch_bytes_total", "diskwatch_errors_total",
        "diskwatch_partition_bytes_total", "diskwatch_partition_requests_total",
        "diskwatch_directory_bytes_total", "diskwatch_directory_requests_total",
        "diskwatch_file_bytes_total", "diskwatch_file_requests_total",
        "diskwatch_request_duration_seconds_count")}
    assert d["diskwatch_requests_total"](export="", command="read") == len(reads)
    assert d["diskwatch_bytes_total"](export="", command="read") == read_bytes
    assert d["diskwatch_requests_total"](export="", command="write") == 26
    assert d["diskwatch_bytes_total"](export="", command="write") == 26 * 4096
    assert d["diskwatch_requests_total"](export="", command="flush") == 1
    assert d["diskwatch_bytes_total"](export="", command="trim") == 64 * KiB
    assert value(s, "diskwatch_errors_total", export="", command="write", errno="ENOSPC") == 1
    assert sum(v for k, v in s.items() if k[0] == "diskwatch_errors_total") == 1
    assert value(s, "diskwatch_request_duration_seconds_count", export="",
                 command="read") == len(reads) + 1
    assert value(s, "diskwatch_request_duration_seconds_bucket", export="", command="read",
                 le="+Inf") == len(reads) + 1
    assert len([k for k in s if k[0] == "diskwatch_request_duration_seconds_bucket"
                and ("command", "read") in k]) == len(LATENCY_BOUNDS) + 1
    assert value(s, "diskwatch_export_size_bytes", export="") == 32 * MiB
    # with the block map: per partition...
    assert d["diskwatch_partition_bytes_total"](partition="/dev/sda1",
                                                op="read") == read_bytes - 4 * KiB - 512
    assert d["diskwatch_partition_bytes_total"](partition="/dev/sda2", op="read") == 4 * KiB
    assert d["diskwatch_partition_requests_total"](partition="/dev/sda2", op="trim") == 1
    assert d["diskwatch_partition_bytes_total"](partition="/dev/sda1", op="write") == 25 * 4096
    # the 512 bytes at 0 are the partition table: the whole device's, no partition's
    assert d["diskwatch_partition_bytes_total"](partition="/dev/sda", op="read") == 512
    # ...per top-level directory...
    assert d["diskwatch_directory_bytes_total"](partition="/dev/sda1", directory="/var",
                                                op="read") == 40 * 64 * KiB
    assert d["diskwatch_directory_requests_total"](partition="/dev/sda1", directory="/var",
                                                   op="write") == 25
    # ...and per file
    assert d["diskwatch_file_requests_total"](partition="/dev/sda1", path="/var/log/app.log",
                                              op="write") == 25
    assert d["diskwatch_file_bytes_total"](partition="/dev/sda1", path="/var/lib/db/data",
                                           op="read") == 40 * 64 * KiB
    h.shutdown()
    s = scrape_until(dw.url, lambda s: value(s, "diskwatch_connections", export="") == 0)
    assert value(s, "diskwatch_connections_opened_total", export="") == 1
    status, err = dw.stop()
    assert status == 0 and "Traceback" not in err


def test_metrics_address_forms_and_bad_values(server_image, tmp_path, diskwatch_metrics):
    dw = diskwatch_metrics([server_image.path, "-r", "--metrics", "[::1]:0"])
    assert dw.url.startswith("http://[::1]:")
    assert scrape(dw.url)
    for bad in ("12x", "70000", "host.example:80"):
        r = subprocess.run([DISKWATCH, str(server_image.path), "-r", "--headless", "--metrics",
                            bad, "--run", "true"], capture_output=True, text=True, timeout=30,
                           env=SUBPROCESS_ENV)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--metrics" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_series_stay_bounded_with_100000_files_touched(tmp_path, diskwatch_metrics):
    """A generated map of 100,000 files and a client reading every one of them
    (and rewriting five logs over and over): the file series stay within the
    bound, the five logs are among them, and everything else is 'other'."""
    nbd = pytest.importorskip("nbd")
    count, top = 100_000, 20
    base = 1 * MiB
    image = tmp_path / "many.img"
    size = base + count * 4 * KiB + MiB
    with open(image, "wb") as f:
        f.truncate(size)
    paths = [f"/data/d{i // 1000:03d}/f{i:06d}" for i in range(count)]
    logs = [f"/var/log/churn{i}.log" for i in range(5)]
    lines = [f"1 0 {size:x} p /dev/sda1"]
    lines += [f"1 {base + i * 4096:x} {base + (i + 1) * 4096:x} f /dev/sda1 {p}"
              for i, p in enumerate(paths)]
    log_base = base + count * 4096
    lines += [f"1 {log_base + i * 4096:x} {log_base + (i + 1) * 4096:x} f /dev/sda1 {p}"
              for i, p in enumerate(logs)]
    bmap = tmp_path / "many.bmap"
    bmap.write_text("\n".join(lines) + "\n")
    dw = diskwatch_metrics([image, "--bmap", bmap, "--metrics", "0", "--metrics-top", str(top),
                            "--metrics-refresh", "0.5"])
    h = nbd.NBD()
    h.connect_uri(dw.uri)
    buf = nbd.Buffer(4096)
    zeros = nbd.Buffer.from_bytearray(bytearray(4096))

    def retire(error):
        return 1  # completed commands are retired at once
    for i in range(count):  # the files, each read once...
        h.aio_pread(buf, base + i * 4096, completion=retire)
        if i % 200 == 0:  # ...and the logs, rewritten all along
            for j in range(5):
                h.aio_pwrite(zeros, log_base + j * 4096, completion=retire)
        while h.aio_in_flight() >= 64:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    writes = 5 * (count // 200)

    def all_counted(s):
        return (value(s, "diskwatch_requests_total", export="", command="read") == count
                and value(s, "diskwatch_requests_total", export="", command="write") == writes)
    s = scrape_until(dw.url, all_counted, timeout=60)
    file_series = [k for k in s if k[0].startswith("diskwatch_file_")]
    dir_series = [k for k in s if k[0].startswith("diskwatch_directory_")]
    per_key = 2 * 4  # requests and bytes, per op
    assert len(file_series) <= (top + 1) * per_key, len(file_series)
    assert len(dir_series) <= (top + 1) * per_key, len(dir_series)
    assert len(s) <= series_bound(top), (len(s), series_bound(top))
    print(f"\n100,000 files touched: {len(file_series)} file series, {len(dir_series)} "
          f"directory series, {len(s)} in all (bound {series_bound(top)})")
    # the churned logs are found among 100,000 files read once each
    def log_series(s):
        return [("diskwatch_file_requests_total", ("op", "write"), ("partition", "/dev/sda1"),
                 ("path", p)) in s for p in logs]
    s = scrape_until(dw.url, lambda s: all(log_series(s)), timeout=30)
    assert value(s, "diskwatch_file_requests_total", partition="", path="other",
                 op="read") > count * 0.9
    # every request was counted once in the partition: exact
    assert value(s, "diskwatch_partition_requests_total", partition="/dev/sda1",
                 op="read") == count
    h.shutdown()
    status, err = dw.stop()
    assert status == 0, err


# --- OTLP ----------------------------------------------------------------------

class OtlpReceiver:
    """A minimal OTLP/HTTP receiver: decodes each ExportMetricsServiceRequest
    with the protobuf classes opentelemetry-proto ships."""

    def __init__(self):
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )
        self.requests: list = []
        self.paths: list[str] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportMetricsServiceRequest()
                req.ParseFromString(body)
                with receiver.cond:
                    receiver.requests.append(req)
                    receiver.paths.append(self.path)
                    receiver.cond.notify_all()
                out = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, predicate, timeout: float = 20.0):
        with self.cond:
            assert self.cond.wait_for(lambda: self.requests and predicate(self.requests[-1]),
                                      timeout), "no OTLP export showed it"
            return self.requests[-1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def otlp_points(req) -> dict[tuple, object]:
    """{(metric name, sorted attributes...): data point} of one export."""
    out = {}
    for rm in req.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                for p in getattr(m, kind).data_points:
                    attrs = sorted((a.key, a.value.string_value) for a in p.attributes)
                    out[(m.name, *attrs)] = p
    return out


def test_otlp_exports_the_same_metrics(rw_image, tmp_path, diskwatch_metrics):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    receiver = OtlpReceiver()
    try:
        env = {**SUBPROCESS_ENV, "OTEL_METRIC_EXPORT_INTERVAL": "300",
               "OTEL_RESOURCE_ATTRIBUTES": "host.name=hv1,guest=web1"}
        bmap = write_map(tmp_path / "disk.bmap")
        dw = diskwatch_metrics([rw_image, "--bmap", bmap, "--otlp", receiver.url], env=env)
        h = nbd_handle(dw.uri)
        for i in range(30):
            h.pread(64 * KiB, FILES["/var/lib/db/data"][0] + i * 64 * KiB)
        for i in range(7):
            h.pwrite(b"w" * 4096, FILES["/var/log/app.log"][0] + i * 4096)

        def reads_of(req):
            p = otlp_points(req).get(("diskwatch_requests", ("command", "read"), ("export", "")))
            return p.as_int if p is not None else -1
        # exported on the timer while diskwatch runs
        receiver.wait_for(lambda req: reads_of(req) == 30)
        h.shutdown()
        status, err = dw.stop()
        assert status == 0, err
        req = receiver.requests[-1]  # the final export, at exit
        assert receiver.paths[-1] == "/v1/metrics"
        pts = otlp_points(req)
        assert pts[("diskwatch_requests", ("command", "read"), ("export", ""))].as_int == 30
        assert pts[("diskwatch_bytes", ("command", "read"), ("export", ""))].as_int == 30 * 64 * KiB
        assert pts[("diskwatch_requests", ("command", "write"), ("export", ""))].as_int == 7
        hist = pts[("diskwatch_request_duration_seconds", ("command", "read"), ("export", ""))]
        assert hist.count == 30 and sum(hist.bucket_counts) == 30
        assert list(hist.explicit_bounds) == list(LATENCY_BOUNDS)
        assert pts[("diskwatch_partition_bytes", ("op", "write"),
                    ("partition", "/dev/sda1"))].as_int == 7 * 4096
        attrs = {a.key: a.value.string_value for a in req.resource_metrics[0].resource.attributes}
        assert attrs["service.name"] == "diskwatch"
        assert attrs["guest"] == "web1" and attrs["host.name"] == "hv1"
        # counters are cumulative and monotonic, as OTLP says they are
        for m in req.resource_metrics[0].scope_metrics[0].metrics:
            if m.WhichOneof("data") == "sum":
                assert m.sum.is_monotonic and m.sum.aggregation_temporality == 2
    finally:
        receiver.close()


def test_idle_connections_to_the_endpoint_are_bounded():
    """prometheus_client's own server starts a thread per connection and
    waits forever: connections that send nothing grew the process without
    limit. At most MAX_CLIENTS are served at once; the rest are closed as they
    come, and the endpoint answers again once the idle ones go."""
    import os
    import socket
    import time
    import urllib.request

    from diskwatch.sinks.metrics import MetricsSink
    from diskwatch.sinks.metrics.prometheus import MAX_CLIENTS, MetricsServer

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    endpoint = MetricsServer(MetricsSink({"": MiB}, top=5, refresh=1.0), "127.0.0.1", 0)
    idle: list[socket.socket] = []
    try:
        before = threads()
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", endpoint.port))
            idle.append(s)
        # The server's thread took all 100: the first MAX_CLIENTS each hold a
        # slot (a thread of their own), every later one is closed at once.
        refused = 0
        for s in idle[MAX_CLIENTS:]:
            s.settimeout(10)
            if s.recv(1) == b"":
                refused += 1
        assert refused == 100 - MAX_CLIENTS
        assert threads() - before <= MAX_CLIENTS
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 10
        while True:  # the closed ones free their slots as their threads see EOF
            try:
                with urllib.request.urlopen(endpoint.url, timeout=5) as r:
                    body = r.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert "diskwatch_requests_total" in body
    finally:
        for s in idle:
            s.close()
        endpoint.close()
