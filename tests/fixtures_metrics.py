"""Fixtures for the metrics tests: diskwatch with --metrics as a subprocess,
scraping its endpoint, and a made-up block map to attribute bytes to."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from fixtures_server import DISKWATCH, SUBPROCESS_ENV, MiB

KiB = 1024


class Served:
    """``diskwatch IMAGE -U SOCK --headless --no-trace --metrics 0 ...`` as a
    subprocess; ``url`` is the endpoint it printed; stopped at teardown."""

    def __init__(self, args: list, tmp_path: Path, env: dict | None = None):
        self.sock = tmp_path / "dw.sock"
        self.proc = subprocess.Popen(
            [DISKWATCH, *map(str, args), "-U", str(self.sock), "--headless", "--no-trace"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env or SUBPROCESS_ENV,
            start_new_session=True)
        self.err = b""
        self.url = None
        if "--metrics" in args:
            m = self.wait_stderr(rb"metrics at (http://\S+/metrics)")
            self.url = m.group(1).decode()
        self.wait_stderr(rb"serving .* at ")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def wait_stderr(self, pattern: bytes, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        fd = self.proc.stderr.fileno()
        while (m := re.search(pattern, self.err)) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} from diskwatch in {timeout}s: {self.err!r}"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"diskwatch exited: {self.err!r}"
                self.err += chunk
        return m

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=30)
        self.err += err
        return self.proc.returncode, self.err.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def diskwatch_metrics(tmp_path):
    started: list[Served] = []

    def start(args: list, env: dict | None = None) -> Served:
        s = Served(args, tmp_path, env)
        started.append(s)
        return s
    yield start
    for s in started:
        s.kill()


def scrape(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels...): value} of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


def scrape_until(url: str, predicate, timeout: float = 20.0) -> dict:
    """Scrape until predicate(samples) holds (the pump counts at 10 Hz)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if predicate(samples):
            return samples
        assert time.monotonic() < deadline, "metrics never showed what the client did"
        time.sleep(0.1)


# --- a made-up block map: what the metrics attribute bytes to -------------------

P1 = (1 * MiB, 24 * MiB)  # /dev/sda1
P2 = (25 * MiB, 6 * MiB)  # /dev/sda2
FILES = {  # path -> (offset, length) in /dev/sda1
    "/var/log/app.log": (2 * MiB, 256 * KiB),
    "/var/lib/db/data": (3 * MiB, 4 * MiB),
    "/home/user/notes": (8 * MiB, 64 * KiB),
    "/vmlinuz": (9 * MiB, 1 * MiB),
}


def write_map(path: Path, files: dict = FILES, partitions=(("/dev/sda1", P1),
                                                           ("/dev/sda2", P2))) -> Path:
    lines = [f"1 0 {32 * MiB:x} v /dev/sda"]
    for dev, (off, ln) in partitions:
        lines.append(f"1 {off:x} {off + ln:x} p {dev}")
    dirs: dict[str, list[int]] = {}
    for p, (off, ln) in files.items():
        lines.append(f"1 {off:x} {off + ln:x} f /dev/sda1 {p}")
        top = "/" + p.split("/")[1] if p.count("/") > 1 else "/"
        d = dirs.setdefault(top, [off, off + ln])
        d[0], d[1] = min(d[0], off), max(d[1], off + ln)
    path.write_text("\n".join(lines) + "\n")
    return path


