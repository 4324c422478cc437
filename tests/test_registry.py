"""Issue 11: sources as plugins, layers as a stack.

A source defined outside the package (tests/plugins/memory_source.py) is
served through the CLI with --plugin and shows up in --help; layers stack in
the order given and the order matters; a watch layer under a snapshot shows
what reached the image beside what the client asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_server import EventLog, nbd_handle

from diskwatch.events import Bus, Command
from diskwatch.server import serve_in_thread
from diskwatch.sources import REGISTRY, SourceOptions, open_source
from diskwatch.sources.errors import ErrorInjection
from diskwatch.sources.registry import Serialized
from diskwatch.sources.snapshot import Snapshot
from diskwatch.sources.watch import Watch

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))
PLUGINS = Path(__file__).with_name("plugins")
MiB = 1024 * 1024


def diskwatch(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([DISKWATCH, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def test_a_source_from_outside_is_served_through_the_cli(tmp_path):
    data = tmp_path / "in.img"
    data.write_bytes(os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB))
    out, fresh = tmp_path / "out.img", tmp_path / "fresh.img"
    r = diskwatch("--plugin", "memory_source:MemorySource", "memory:8M", "--memory-fill", "0x41",
                  "--headless", "--no-trace",
                  "--run", f'nbdcopy "$uri" {fresh} && nbdcopy {data} "$uri" && '
                           f'nbdcopy "$uri" {out}')
    assert r.returncode == 0, r.stderr
    assert fresh.read_bytes() == b"A" * 8 * MiB  # its own option reached it
    assert hashlib.md5(out.read_bytes()).digest() == hashlib.md5(data.read_bytes()).digest()
    assert re.search(r"\d+ write \(6 MiB\)", r.stderr), r.stderr  # nbdcopy skips the zeroes


def test_the_plugin_options_are_in_help_and_bad_plugins_are_one_line():
    r = diskwatch("--plugin", "memory_source:MemorySource", "--help")
    assert r.returncode == 0
    assert "source: memory:" in r.stdout and "--memory-fill BYTE" in r.stdout
    for bad, words in (("memory_source", "MODULE:CLASS"), ("no_such_module:X", "cannot import"),
                       ("memory_source:Nope", "has no Nope"), ("os:path", "not a Source")):
        r = diskwatch("--plugin", bad, "memory:1M", "--run", "true")
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_thread_model_is_enforced():
    sys.path.insert(0, str(PLUGINS))
    try:
        REGISTRY.load_plugin("memory_source:MemorySource")
        src = open_source("memory:1M", SourceOptions())
        assert isinstance(src, Serialized) and src.thread_model == "serialize_all_requests"
        src.close()
    finally:
        REGISTRY.sources[:] = [p for p in REGISTRY.sources if p.name != "memory"]
        sys.path.remove(str(PLUGINS))


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


def test_layers_stack_in_the_order_given(image):
    rule = "errors:ops=pread,range=0-64K"
    under = open_source(str(image), SourceOptions(filters=[rule, "snapshot"]))
    over = open_source(str(image), SourceOptions(filters=["snapshot", rule]))
    try:
        assert isinstance(under, Snapshot) and isinstance(under.inner, ErrorInjection)
        assert isinstance(over, ErrorInjection) and isinstance(over.inner, Snapshot)
        for src in (under, over):
            src.pwrite(0, b"x" * 65536)
        # Errors under the snapshot: what was written comes from the overlay.
        assert under.pread(0, 4) == b"xxxx"
        # Errors over it: every read of the range fails.
        with pytest.raises(OSError):
            over.pread(0, 4)
    finally:
        under.close()
        over.close()


def test_watch_under_a_snapshot_shows_what_reached_the_image(image):
    src = open_source(str(image), SourceOptions(filters=["watch:image"], snapshot=True))
    assert isinstance(src, Snapshot) and isinstance(src.inner, Watch)
    bus = Bus()
    log = EventLog(bus)
    try:
        with serve_in_thread({"": src}, bus) as running:
            h = nbd_handle(running.uri)
            h.pwrite(b"w" * 65536, 1 * MiB)
            assert h.pread(65536, 1 * MiB) == b"w" * 65536  # from the overlay
            h.pread(4096, 3 * MiB)  # from the image
            h.shutdown()
            log.wait_for(lambda lg: any(r.command == Command.DISC for r in lg.requests))
    finally:
        src.close()
    client = [(r.command, r.offset) for r in log.requests if r.export == ""]
    image_side = [(r.command, r.offset) for r in log.requests if r.export == "@image"]
    assert (Command.WRITE, 1 * MiB) in client and (Command.READ, 1 * MiB) in client
    assert not [c for c, _ in image_side if c == Command.WRITE]  # the snapshot kept them
    assert (Command.READ, 1 * MiB) not in image_side
    assert (Command.READ, 3 * MiB) in image_side
    assert all(r.conn == 0 for r in log.requests if r.export == "@image")


def test_delay_layer_and_unknown_layer(image):
    src = open_source(str(image), SourceOptions(filters=["delay:read=1"]))
    assert src.blocking and src.pread(0, 4) == image.read_bytes()[:4]
    src.close()
    r = diskwatch(str(image), "--filter", "nosuch", "--run", "true")
    assert r.returncode == 1 and "no such layer" in r.stderr and "watch" in r.stderr


def test_a_layer_that_changes_reads_is_never_bypassed(server_image):
    """A layer from outside that overrides pread but says nothing of views:
    the server must not send the inner file's bytes from its mmap."""
    from fixtures_server import nbd_handle

    from diskwatch.server import serve_in_thread
    from diskwatch.sources.base import Layer
    from diskwatch.sources.file import FileSource

    class Inverted(Layer):
        def pread(self, offset, length):
            return bytes(b ^ 0xFF for b in self.inner.pread(offset, length))

    src = Inverted(FileSource(str(server_image.path), readonly=True))
    assert src.view_for(0, 4096) is None
    running = serve_in_thread({"": src})
    try:
        h = nbd_handle(running.uri)
        got = h.pread(4096, 8192)
        h.shutdown()
    finally:
        running.stop()
        src.close()
    with open(server_image.path, "rb") as f:
        f.seek(8192)
        assert got == bytes(b ^ 0xFF for b in f.read(4096))
