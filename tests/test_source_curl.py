"""CurlSource against real servers on loopback: nginx (Range support, TLS),
Python's http.server (no Range support), a small ranged server that fails on
purpose (retries, HEAD refused, parallelism), and a private sshd for sftp."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pycurl
import pytest
from fixtures_server import wait_until

from diskwatch.events import Bus
from diskwatch.server import serve_in_thread
from diskwatch.sources.base import SourceError
from diskwatch.sources.curl import CurlSource, redact

MiB = 1 << 20
IMAGE_SIZE = 8 * MiB + 4096 + 17  # not a multiple of anything, on purpose


@pytest.fixture(scope="module")
def www(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("www")
    (d / "disk.img").write_bytes(random.Random(2).randbytes(IMAGE_SIZE))
    (d / "empty.img").write_bytes(b"")
    (d / "secret").mkdir()
    (d / "secret" / "disk.img").write_bytes(b"x" * 1024)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_listen(proc: subprocess.Popen, port: int, what: str, log: Path,
                    deadline: float = 20.0) -> bool:
    """Poll a TCP connect until PROC listens on PORT; False if PROC exited."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            # not listening yet: wait for the process a moment (returns at once if it dies)
            try:
                proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
    proc.kill()
    proc.wait()
    raise AssertionError(f"{what} did not listen on {port}: {log.read_text()[-2000:]}")


def start_nginx(tmp: Path, root: Path, *, tls: tuple[Path, Path] | None = None,
                port: int | None = None):
    """nginx serving ROOT on 127.0.0.1:PORT (default: ephemeral); returns (proc, port)."""
    fixed = port
    for _ in range(5):  # another process may grab the free port first: try again
        port = fixed or free_port()
        listen = f"127.0.0.1:{port}" + (" ssl" if tls else "")
        ssl = (f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else "")
        conf = tmp / "nginx.conf"
        conf.write_text(f"""
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
worker_processes 2;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {listen};
        {ssl}
        root {root};
        location /secret/ {{ return 403; }}
        location /moved/ {{ rewrite ^/moved/(.*)$ /$1 redirect; }}
    }}
}}
""")
        log = tmp / "nginx.stderr"
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)],
                                stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        if wait_for_listen(proc, port, "nginx", log):
            return proc, port
        if fixed or "Address already in use" not in (log.read_text()
                                                     + (tmp / "error.log").read_text()):
            raise AssertionError(f"nginx failed: {log.read_text()}")
    raise AssertionError("nginx: no free port after 5 tries")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def nginx(www, tmp_path_factory):
    if not shutil.which("nginx"):
        pytest.fail("nginx is needed (Debian package nginx-light)")
    tmp = tmp_path_factory.mktemp("nginx")
    proc, port = start_nginx(tmp, www)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def nginx_tls(www, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nginx-tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    proc, port = start_nginx(tmp, www, tls=(cert, key))
    yield f"https://127.0.0.1:{port}"
    stop(proc)


class QuietHTTPServer(http.server.ThreadingHTTPServer):
    """A client that hangs up mid-answer is expected here (diskwatch closes a
    200 it does not want whole, or a transfer it no longer needs): not a
    traceback on stderr. Every other error still prints one."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.lock = threading.Lock()
        self.finished = 0  # requests done with, errors handled: a test can wait for them

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)

    def shutdown_request(self, request):
        super().shutdown_request(request)
        with self.lock:
            self.finished += 1


class ThreadedServer:
    """An http.server in a thread, stopped by the fixture that made it."""

    def __init__(self, handler):
        self.httpd = QuietHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def plain_handler(www):
    return type("H", (http.server.SimpleHTTPRequestHandler,), {
        "log_message": lambda self, *a: None,
        "__init__": lambda self, *a, **kw: http.server.SimpleHTTPRequestHandler.__init__(
            self, *a, directory=str(www), **kw),
    })


@pytest.fixture
def plain_http(www):
    """Python's http.server: no Range support (answers 200 with the whole file)."""
    server = ThreadedServer(plain_handler(www))
    yield server.url
    server.stop()


class RangedHandler(http.server.BaseHTTPRequestHandler):
    """A small ranged file server with knobs, for the failure paths:
    /nohead/...   HEAD answers 405 (like a URL signed for GET only)
    /flaky/...    the first FAILURES[0] requests get 503
    /reset/...    the first request's connection is closed without an answer
    /barrier/...  each GET waits until BARRIER.parties GETs are in flight at once
    and on any path, by the GET's number (the size probe is GET 1):
    state["fail"]   answered 503
    state["cut"]    the connection is closed half-way through the body
    state["stall"]  the headers, then nothing until state["release"] is set
    state["whole"]  answered 200 with the whole file, as a server without ranges
    state["nolength"]  206 without Content-Length: the body ends where the connection does
    """

    protocol_version = "HTTP/1.1"
    data = b""
    state: dict = {}

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.state["heads"] = self.state.get("heads", 0) + 1
        if self.path.startswith("/nohead/"):
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()

    def do_GET(self):
        with self.state["lock"]:
            self.state["gets"] = self.state.get("gets", 0) + 1
            n = self.state["gets"]
        if self.path.startswith("/flaky/") and n <= self.state.get("failures", 0):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/reset/") and n == 1:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if n in self.state.get("fail", ()):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if n in self.state.get("whole", ()):
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.data)))
            self.end_headers()
            self.wfile.write(self.data)
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if not m:
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = int(m[1]), min(int(m[2]), len(self.data) - 1)
        if self.path.startswith("/barrier/"):
            self.state["barrier"].wait(timeout=20)  # raises if not all arrive
        body = self.data[start:end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.data)}")
        if n in self.state.get("nolength", ()):
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if n in self.state.get("stall", ()):
            # Headers only: with bytes of the body already in, libcurl's
            # low-speed check (an average over some seconds) takes longer.
            self.wfile.flush()
            self.state["stalled"].set()
            self.state["release"].wait(timeout=30)
            self.close_connection = True
            return
        if n in self.state.get("cut", ()):
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def ranged(www):
    state = {"lock": threading.Lock(), "stalled": threading.Event(),
             "release": threading.Event()}
    handler = type("R", (RangedHandler,), {"data": (www / "disk.img").read_bytes(),
                                           "state": state})
    server = ThreadedServer(handler)
    server.state = state
    yield server
    state["release"].set()  # a stalled answer gives up now, not in 30 s
    server.stop()


def original(www) -> bytes:
    return (www / "disk.img").read_bytes()


# -- http via nginx -----------------------------------------------------------


def test_size_and_md5_of_everything(nginx, www):
    with CurlSource(f"{nginx}/disk.img") as src:
        assert src.size == IMAGE_SIZE
        assert not src.can_write and src.blocking
        h = hashlib.md5()
        for off in range(0, src.size, 3 * MiB):
            h.update(src.pread(off, min(3 * MiB, src.size - off)))
        assert h.hexdigest() == hashlib.md5(original(www)).hexdigest()


def test_random_reads(nginx, www):
    data = original(www)
    rng = random.Random(1)
    with CurlSource(f"{nginx}/disk.img", connections=2) as src:
        for _ in range(100):
            off = rng.randrange(src.size)
            n = min(rng.choice([1, 512, 4096, 65536, MiB + 1]), src.size - off)
            assert src.pread(off, n) == data[off:off + n]
        assert src.pread(src.size - 1, 1) == data[-1:]
        with pytest.raises(SourceError) as e:
            src.pread(src.size - 1, 2)
        assert e.value.errno == errno.EINVAL


def test_parallel_reads_through_the_pool(nginx, www):
    data = original(www)
    with CurlSource(f"{nginx}/disk.img", connections=4) as src:
        def read(i):
            off = (i * 99991) % (src.size - 65536)
            return off, src.pread(off, 65536)
        with ThreadPoolExecutor(16) as pool:
            for off, got in pool.map(read, range(300)):
                assert got == data[off:off + 65536]


def test_empty_file(nginx):
    with CurlSource(f"{nginx}/empty.img") as src:
        assert src.size == 0
        assert src.pread(0, 0) == b""


def test_redirect_is_followed(nginx, www):
    with CurlSource(f"{nginx}/moved/disk.img") as src:
        assert src.size == IMAGE_SIZE
        assert src.pread(4096, 100) == original(www)[4096:4196]


def test_404_is_one_clear_line(nginx):
    with pytest.raises(SourceError) as e:
        CurlSource(f"{nginx}/no-such.img")
    assert e.value.errno == errno.ENOENT
    assert "404" in str(e.value) and "check the URL" in str(e.value)
    assert "\n" not in str(e.value)


def test_403_says_what_to_check(nginx):
    with pytest.raises(SourceError) as e:
        CurlSource(f"{nginx}/secret/disk.img")
    assert e.value.errno == errno.EACCES
    assert "--user" in str(e.value)


def test_connection_refused_is_retried_then_eio():
    port = free_port()  # nothing listens there
    with pytest.raises(SourceError) as e:
        CurlSource(f"http://127.0.0.1:{port}/disk.img", retries=1, timeout=2)
    assert e.value.errno == errno.EIO
    assert "gave up after 2 attempts" in str(e.value)


def test_bad_arguments():
    with pytest.raises(SourceError, match="unsupported URL scheme"):
        CurlSource("gopher://example.com/x")
    with pytest.raises(SourceError, match="Name: value"):
        CurlSource("http://127.0.0.1:1/x", headers=["no colon"])
    assert redact("https://bob:pw@host:8443/a.img") == "https://bob:***@host:8443/a.img"


# -- TLS -------------------------------------------------------------------


def test_tls_failure_is_eio_with_a_message(nginx_tls, www):
    with pytest.raises(SourceError) as e:
        CurlSource(f"{nginx_tls}/disk.img", retries=0)
    assert e.value.errno == errno.EIO
    assert "TLS failure" in str(e.value) and "--insecure" in str(e.value)
    with CurlSource(f"{nginx_tls}/disk.img", insecure=True) as src:
        assert src.size == IMAGE_SIZE
        assert src.pread(MiB, 4096) == original(www)[MiB:MiB + 4096]


# -- servers that misbehave --------------------------------------------------


def test_server_without_range_support_is_refused(plain_http):
    with pytest.raises(SourceError) as e:
        CurlSource(f"{plain_http}/disk.img")
    assert e.value.errno == errno.EIO
    assert "does not support byte ranges" in str(e.value)
    assert "\n" not in str(e.value)


def test_hanging_up_on_a_whole_file_leaves_no_traceback(www, capfd):
    """The refusal above closes the 200 the server is still sending: the
    test server takes that quietly (it used to print a ConnectionResetError
    or BrokenPipeError traceback on stderr during the tests)."""
    server = ThreadedServer(plain_handler(www))
    try:
        with pytest.raises(SourceError):
            CurlSource(f"{server.url}/disk.img")
        deadline = time.monotonic() + 30
        while server.httpd.finished < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # polls the server's own count; not a guess at timing
        assert server.httpd.finished >= 1
    finally:
        server.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_size_from_range_probe_when_head_is_refused(ranged, www):
    with CurlSource(f"{ranged.url}/nohead/disk.img") as src:
        assert src.size == IMAGE_SIZE
        assert src.pread(100, 10) == original(www)[100:110]
    assert ranged.state["heads"] == 1


def test_5xx_is_retried_with_backoff(ranged, www):
    ranged.state["failures"] = 3  # the probe and the first two tries of the read fail
    with CurlSource(f"{ranged.url}/flaky/disk.img", retries=3) as src:
        assert src.retried == 3
        assert src.pread(5000, 10) == original(www)[5000:5010]
        assert src.retried == 3


def test_5xx_gives_up_after_the_retries(ranged):
    ranged.state["failures"] = 100
    with pytest.raises(SourceError) as e:
        CurlSource(f"{ranged.url}/flaky/disk.img", retries=2)
    assert "HTTP 503" in str(e.value) and "gave up after 3 attempts" in str(e.value)
    assert ranged.state["gets"] == 3


def test_connection_reset_is_retried(ranged, www):
    with CurlSource(f"{ranged.url}/reset/disk.img") as src:
        assert src.retried == 1
        assert src.pread(0, 512) == original(www)[:512]


def test_connections_are_parallel_transfers(ranged, www):
    """Each GET waits at a barrier for 4 GETs in flight: this only completes
    if the pool really runs 4 transfers at once."""
    data = original(www)
    with CurlSource(f"{ranged.url}/plain/disk.img", connections=4) as src:
        ranged.state["barrier"] = threading.Barrier(4)
        src.url = f"{ranged.url}/barrier/disk.img"
        for h in src._handles:
            h.setopt(pycurl.URL, src.url)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: src.pread(i * 4096, 4096), range(8)))
        assert results == [data[i * 4096:(i + 1) * 4096] for i in range(8)]


def test_headers_and_credentials_are_sent(ranged):
    seen = []
    orig = RangedHandler.do_HEAD

    def do_head(self):
        seen.append((self.headers.get("X-Token"), self.headers.get("Authorization")))
        orig(self)

    ranged.httpd.RequestHandlerClass.do_HEAD = do_head
    with CurlSource(f"{ranged.url}/disk.img", headers=["X-Token: abc"], user="bob",
                    password="pw"):
        pass
    assert seen == [("abc", "Basic Ym9iOnB3")]


# -- through the server's loop (CurlAio) ------------------------------------------
#
# The server drives the source's curl multi handle from its own loop: these
# read with libnbd through a real diskwatch server, many requests in flight.


@contextlib.contextmanager
def served(src: CurlSource):
    """A diskwatch server of SRC and a libnbd client connected to it."""
    nbd = pytest.importorskip("nbd")
    with serve_in_thread({"": src}, Bus()) as running:
        h = nbd.NBD()
        h.connect_uri(running.uri)
        try:
            yield running, h
        finally:
            h.shutdown()
        # every read went through the loop's engine: no worker thread was started
        assert running.server._workers._pool is None


def read_in_flight(h, ranges) -> list:
    """Issue every read at once; each one's bytes, or the nbd.Error it got."""
    nbd = sys.modules["nbd"]
    issued = []
    for off, n in ranges:
        buf = bytearray(n)
        issued.append((h.aio_pread(buf, off), buf))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    results = []
    for cookie, buf in issued:
        try:
            h.aio_command_completed(cookie)
            results.append(bytes(buf))
        except nbd.Error as e:
            results.append(e)
    return results


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_loop_serves_many_reads_in_flight(tls, request, www):
    base = request.getfixturevalue("nginx_tls" if tls else "nginx")
    data = original(www)
    rng = random.Random(5)
    ranges = []
    for _ in range(300):
        n = rng.choice([1, 512, 4096, 65536, 256 * 1024, MiB + 1])
        off = rng.randrange(len(data) - n + 1)
        ranges.append((off, n))
    ranges.append((len(data) - 17, 17))  # the odd tail
    with CurlSource(f"{base}/disk.img", connections=3, insecure=tls) as src:
        with served(src) as (running, h):
            got = read_in_flight(h, ranges)
            bad = [(o, n) for g, (o, n) in zip(got, ranges, strict=True) if g != data[o:o + n]]
            assert not bad
        assert src.requests >= len(ranges) and src.retried == 0


def test_loop_retries_a_transfer_cut_mid_body(ranged, www):
    data = original(www)
    ranged.state["cut"] = {2, 4}
    with CurlSource(f"{ranged.url}/disk.img", retries=3) as src:
        with served(src) as (running, h):
            got = read_in_flight(h, [(i * 100_000, 70_000) for i in range(6)])
            assert got == [data[i * 100_000:i * 100_000 + 70_000] for i in range(6)]
        assert src.retried == 2


def test_loop_gives_eio_after_the_retries_then_serves_on(ranged, www, caplog):
    nbd = pytest.importorskip("nbd")
    ranged.state["fail"] = {2, 3}  # one read and its one retry
    with CurlSource(f"{ranged.url}/disk.img", retries=1, connections=1) as src:
        with served(src) as (running, h):
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, 0)
            assert e.value.errnum == errno.EIO
            assert h.pread(4096, 8192) == original(www)[8192:12288]
        assert src.retried == 1


def test_loop_times_out_a_stalled_transfer_and_retries_it(ranged, www):
    """The stall is noticed by libcurl's low-speed check, which runs on the
    timers the engine keeps on the server's loop."""
    ranged.state["stall"] = {2}
    with CurlSource(f"{ranged.url}/disk.img", timeout=1, retries=2) as src:
        with served(src) as (running, h):
            t0 = time.monotonic()
            assert h.pread(65536, 4096) == original(www)[4096:4096 + 65536]
            assert time.monotonic() - t0 < 15
            assert ranged.state["stalled"].is_set()
        assert src.retried == 1


def test_loop_refuses_a_server_that_stops_serving_ranges(ranged, www):
    nbd = pytest.importorskip("nbd")
    ranged.state["whole"] = set(range(2, 100))
    with CurlSource(f"{ranged.url}/disk.img", retries=3) as src:
        with served(src) as (running, h):
            with pytest.raises(nbd.Error) as e:
                h.pread(4096, 0)
            assert e.value.errnum == errno.EIO
        assert src.retried == 0  # not transient: refused at once


def test_loop_follows_a_redirect(nginx, www):
    data = original(www)
    with CurlSource(f"{nginx}/moved/disk.img") as src:
        with served(src) as (running, h):
            ranges = [(i * 300_000, 200_000) for i in range(20)]
            assert read_in_flight(h, ranges) == [data[o:o + n] for o, n in ranges]


def test_loop_reads_answers_without_a_length(ranged, www):
    """A 206 without Content-Length: the body ends with the connection."""
    data = original(www)
    ranged.state["nolength"] = set(range(2, 100))
    with CurlSource(f"{ranged.url}/disk.img") as src:
        with served(src) as (running, h):
            ranges = [(i * 100_000, 70_000) for i in range(6)]
            assert read_in_flight(h, ranges) == [data[o:o + n] for o, n in ranges]
        assert src.retried == 0


def test_loop_rides_out_a_server_restart(www, tmp_path):
    """nginx goes away under the server and comes back on the same port: the
    read issued meanwhile is retried with backoff and completes."""
    data = original(www)
    proc, port = start_nginx(tmp_path, www)
    try:
        with CurlSource(f"http://127.0.0.1:{port}/disk.img", retries=8, timeout=5) as src:
            with served(src) as (running, h):
                assert h.pread(4096, 0) == data[:4096]
                stop(proc)
                buf = bytearray(MiB)
                cookie = h.aio_pread(buf, 3 * MiB)
                # the engine retries from the server's loop; wait for the first
                wait_until(lambda: (h.poll(0), src.retried)[1] >= 1, timeout=20,
                           what="a retry of the read")
                proc, _ = start_nginx(tmp_path, www, port=port)
                while h.aio_in_flight() > 0:
                    h.poll(-1)
                assert h.aio_command_completed(cookie)
                assert bytes(buf) == data[3 * MiB:4 * MiB]
    finally:
        stop(proc)


def test_loop_close_fails_reads_in_flight(ranged):
    nbd = pytest.importorskip("nbd")
    ranged.state["stall"] = {2}
    with CurlSource(f"{ranged.url}/disk.img") as src:
        with served(src) as (running, h):
            buf = bytearray(4096)
            cookie = h.aio_pread(buf, 0)
            wait_until(lambda: (h.poll(0), ranged.state["stalled"].is_set())[1],
                       what="the stalled transfer")
            engine, = running.server._async.values()
            running.thread.call(engine.aio.close)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            with pytest.raises(nbd.Error) as e:
                h.aio_command_completed(cookie)
            assert e.value.errnum == errno.EIO
            with pytest.raises(nbd.Error):
                h.pread(10, 0)  # closed for good, and said so
        assert not src._engines


# -- sftp through a private sshd ---------------------------------------------


@pytest.fixture(scope="module")
def sftp_server(www, tmp_path_factory):
    if "sftp" not in pycurl.version_info()[8]:
        pytest.skip("this libcurl has no sftp support")
    sshd = "/usr/sbin/sshd"
    if not os.path.exists(sshd) or os.geteuid() != 0:
        pytest.skip("a private sshd needs /usr/sbin/sshd (openssh-server) and root")
    if not os.path.isdir("/run/sshd"):  # sshd's privilege separation directory
        try:
            os.mkdir("/run/sshd", 0o755)
        except OSError as e:
            pytest.skip(f"cannot create /run/sshd for sshd: {e}")
    tmp = tmp_path_factory.mktemp("sshd")
    host_key = tmp / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                   check=True)
    home = tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    # PEM RSA: the private key format libssh2 reads whatever its crypto backend
    client_key = home / ".ssh" / "id_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "",
                    "-f", str(client_key)], check=True)
    (tmp / "authorized_keys").write_text((home / ".ssh" / "id_rsa.pub").read_text())
    os.chmod(tmp / "authorized_keys", 0o600)
    for _ in range(5):
        port = free_port()
        conf = tmp / "sshd_config"
        conf.write_text(f"""
ListenAddress 127.0.0.1:{port}
HostKey {host_key}
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
# libssh2 1.10 signs with ssh-rsa (SHA-1) only, which OpenSSH 9 no longer accepts by default
PubkeyAcceptedAlgorithms +ssh-rsa
Subsystem sftp internal-sftp
""")
        log = tmp / "sshd.log"
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        if wait_for_listen(proc, port, "sshd", log):
            break
        if "Address already in use" not in log.read_text():
            pytest.skip(f"sshd refuses to start here: {log.read_text().strip()[-300:]}")
    else:
        pytest.skip("sshd: no free port after 5 tries")
    yield f"sftp://root@127.0.0.1:{port}{www}/disk.img", home
    stop(proc)


def test_sftp_size_and_reads(sftp_server, www, monkeypatch):
    url, home = sftp_server
    # libcurl takes the key from $HOME/.ssh/id_rsa when none is configured
    monkeypatch.setenv("HOME", str(home))
    data = original(www)
    with CurlSource(url, connections=2) as src:
        assert src.size == IMAGE_SIZE
        assert src.pread(0, 4096) == data[:4096]
        assert src.pread(IMAGE_SIZE - 5000, 5000) == data[-5000:]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda i: src.pread(i * MiB + 7, 65536), range(8)))
        assert got == [data[i * MiB + 7:i * MiB + 7 + 65536] for i in range(8)]


def test_sftp_through_the_loop(sftp_server, www, monkeypatch):
    url, home = sftp_server
    monkeypatch.setenv("HOME", str(home))
    data = original(www)
    ranges = [(i * MiB + 7, 65536) for i in range(8)] + [(IMAGE_SIZE - 100, 100)]
    with CurlSource(url, connections=2) as src:
        with served(src) as (running, h):
            assert read_in_flight(h, ranges) == [data[o:o + n] for o, n in ranges]


def test_sftp_missing_file(sftp_server, www, monkeypatch):
    url, home = sftp_server
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(SourceError) as e:
        CurlSource(url.replace("disk.img", "missing.img"))
    assert e.value.errno == errno.ENOENT
    assert "no such file" in str(e.value) and "\n" not in str(e.value)


# -- through diskwatch ------------------------------------------------------------

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))


def test_diskwatch_serves_a_url(nginx, www, tmp_path):
    out = tmp_path / "copy.raw"
    r = subprocess.run([DISKWATCH, f"{nginx}/disk.img", "--connections", "4", "--headless",
                        "--log", str(tmp_path / "trace"), "--run", f'nbdcopy "$uri" {out}'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == original(www)


def test_diskwatch_404_is_one_line(nginx):
    r = subprocess.run([DISKWATCH, f"{nginx}/nope.img", "--headless", "--run", "true"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "404" in r.stderr and "Traceback" not in r.stderr


def test_header_lines_that_matter():
    """Status lines and Content-Range (any case, as HTTP/2 sends them lower
    case); the other lines are passed over."""
    from diskwatch.sources.curl import _Transfer
    t = _Transfer(bytearray(10), True)
    for line in (b"HTTP/2 206\r\n", b"content-type: application/octet-stream\r\n",
                 b"content-range: bytes 5-14/100\r\n", b"Connection: keep-alive\r\n",
                 b"Host: HTTP/1.1\r\n", b"C\r\n", b"\r\n"):
        t.header(line)
    assert (t.status, t.content_range, t.total, t.refuse) == (206, (5, 14), 100, None)
    t.header(b"HTTP/1.1 416 Range Not Satisfiable\r\n")
    t.header(b"Content-Range: bytes */0\r\n")
    assert (t.status, t.content_range, t.total, t.refuse) == (416, None, 0, "error page")
