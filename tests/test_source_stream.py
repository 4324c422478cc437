"""StreamSource: writes become a stream to a file, FIFO or unix socket."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from diskwatch.sources.base import FastZeroUnsupported, SourceError
from diskwatch.sources.stream import DEFAULT_SIZE, StreamSource

KiB = 1024
MiB = 1 << 20


@pytest.fixture
def target(tmp_path) -> Path:
    p = tmp_path / "out.raw"
    p.write_bytes(b"old content to be truncated")
    return p


class FifoReader:
    """Reads everything from a FIFO in a thread (opening it blocks until the
    writer opens it; reading ends at the writer's close)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = bytearray()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            with open(self.path, "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    self.data += chunk
        except BaseException as e:  # reported by result()
            self.error = e

    def result(self, timeout=60) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "reader still waiting"
        if self.error:
            raise self.error
        return bytes(self.data)


def test_sequential_writes_to_a_regular_file(target):
    data = random.Random(1).randbytes(3 * MiB + 100)
    with StreamSource(target, size=len(data), window=MiB) as src:
        assert target.stat().st_size == 0  # truncated at open
        for off in range(0, len(data), 64 * KiB):
            src.pwrite(off, data[off:off + 64 * KiB])
        assert src.window_start == len(data) - MiB
        assert target.stat().st_size == len(data) - MiB  # the window is still in memory
    assert target.read_bytes() == data


def test_fifo_is_created_read_by_a_reader_and_removed(tmp_path):
    path = tmp_path / "stream.fifo"
    data = random.Random(2).randbytes(5 * MiB)
    src = StreamSource(path, size=len(data), window=MiB)
    assert stat.S_ISFIFO(path.stat().st_mode)
    reader = FifoReader(path)
    for off in range(0, len(data), 256 * KiB):
        src.pwrite(off, data[off:off + 256 * KiB])
    src.close()
    assert hashlib.md5(reader.result()).hexdigest() == hashlib.md5(data).hexdigest()
    assert not path.exists()


def test_existing_fifo_is_kept(tmp_path):
    path = tmp_path / "mine.fifo"
    os.mkfifo(path)
    src = StreamSource(path, window=4096)
    reader = FifoReader(path)
    src.pwrite(0, b"hello")
    src.close()
    assert reader.result() == b"hello"  # no size given: exactly what was written
    assert path.exists()


def test_rewrite_and_reread_within_the_window(target):
    with StreamSource(target, size=8 * MiB, window=2 * MiB) as src:
        src.pwrite(0, b"A" * MiB)
        src.pwrite(MiB, b"B" * MiB)
        src.pwrite(512 * KiB, b"C" * 4096)  # go back and rewrite
        assert src.pread(512 * KiB - 1, 4098) == b"A" + b"C" * 4096 + b"A"
        assert src.pread(2 * MiB, 100) == bytes(100)  # not written yet: zeroes
        src.pwrite(2 * MiB, b"D" * MiB)  # slides the window: the first MiB is sent
        assert src.window_start == MiB
        assert src.pread(MiB, 10) == b"B" * 10
    out = target.read_bytes()
    assert len(out) == 8 * MiB
    assert out[:MiB] == b"A" * (512 * KiB) + b"C" * 4096 + b"A" * (512 * KiB - 4096)
    assert out[MiB:3 * MiB] == b"B" * MiB + b"D" * MiB
    assert out[3 * MiB:] == bytes(5 * MiB)


def test_before_the_window_is_an_error_never_silent(target):
    with StreamSource(target, window=64 * KiB) as src:
        src.pwrite(0, b"x" * (256 * KiB))
        assert src.window_start == 192 * KiB
        for call in (lambda: src.pwrite(100 * KiB, b"y"), lambda: src.pread(0, 512),
                     lambda: src.zero(191 * KiB, 2048)):
            with pytest.raises(SourceError) as e:
                call()
            assert e.value.errno == errno.EIO
            msg = str(e.value)
            assert "before the stream window" in msg and "--window" in msg
            assert "\n" not in msg
        # the window itself is still fine
        src.pwrite(192 * KiB, b"z")
        assert src.pread(192 * KiB, 2) == b"zx"
    out = target.read_bytes()
    assert out == b"x" * (192 * KiB) + b"z" + b"x" * (64 * KiB - 1)


def test_skipping_forward_fills_with_zeroes(target):
    with StreamSource(target, window=64 * KiB) as src:
        src.pwrite(0, b"a" * 1000)
        src.pwrite(10 * MiB, b"b" * 1000)  # a gap far larger than the window
        src.pwrite(10 * MiB + 5000, b"c" * 10)  # a small gap inside the window
        assert src.pread(10 * MiB + 999, 4002) == b"b" + bytes(4000) + b"c"
        assert src.stream_length == 10 * MiB + 5010
    out = target.read_bytes()
    assert len(out) == 10 * MiB + 5010
    assert out[:1000] == b"a" * 1000
    assert out[1000:10 * MiB] == bytes(10 * MiB - 1000)
    assert out[10 * MiB:] == b"b" * 1000 + bytes(4000) + b"c" * 10


def test_a_write_larger_than_the_window(target):
    data = random.Random(3).randbytes(300 * KiB)
    with StreamSource(target, window=64 * KiB) as src:
        src.pwrite(100, data)
        assert src.window_start == 100 + len(data) - 64 * KiB
        assert src.pread(src.window_start, 64 * KiB) == data[-64 * KiB:]
    assert target.read_bytes() == bytes(100) + data


def test_ring_wraps_without_stale_bytes(target):
    """After many laps of the ring, a gap inside the window must read as
    zeroes, not as what the ring held a lap ago."""
    with StreamSource(target, window=4096) as src:
        for i in range(10):
            src.pwrite(i * 1000, bytes([65 + i]) * 1000)
        src.pwrite(12_000, b"!")  # gap 10000..12000 inside the window
        assert src.pread(10_000, 2001) == bytes(2000) + b"!"
    out = target.read_bytes()
    assert out[10_000:] == bytes(2000) + b"!"


def test_random_operations_match_a_model(target):
    """Random writes, zeroes, trims and reads anywhere in the window (and past
    it), checked against a plain bytearray; the stream equals the model."""
    rng = random.Random(7)
    size, window = 4 * MiB, 96 * KiB
    model = bytearray(size)
    with StreamSource(target, size=size, window=window) as src:
        for _ in range(3000):
            base = src.window_start
            if base >= size - 1:
                break
            off = rng.randrange(base, min(size - 1, base + window + window // 2))
            n = min(rng.choice([1, 511, 4096, 20_000, 130_000]), size - off)
            op = rng.random()
            if op < 0.5:
                data = rng.randbytes(n)
                src.pwrite(off, data)
                model[off:off + n] = data
            elif op < 0.6:
                src.zero(off, n)
                model[off:off + n] = bytes(n)
            elif op < 0.65:
                src.trim(off, n)
                model[off:off + n] = bytes(n)
            else:
                n = min(n, size - off)
                assert src.pread(off, n) == bytes(model[off:off + n])
        assert src.stream_length == size
    assert target.read_bytes() == bytes(model)


def test_unix_socket_target(tmp_path):
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    received = bytearray()

    def serve():
        conn, _ = listener.accept()
        with conn:
            while chunk := conn.recv(MiB):
                received.extend(chunk)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        data = random.Random(4).randbytes(MiB)
        with StreamSource(path, size=2 * MiB, window=64 * KiB) as src:
            src.pwrite(0, data)
        t.join(30)
        assert not t.is_alive()
        assert bytes(received) == data + bytes(MiB)
    finally:
        listener.close()


def test_unix_socket_without_listener_is_a_clear_error(tmp_path):
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the socket file stays, nobody listens
    with pytest.raises(SourceError, match="start the reader first"):
        StreamSource(path)


def test_sizes_and_capabilities(target):
    with StreamSource(target) as src:
        assert src.size == DEFAULT_SIZE and src.size % 4096 == 0
        assert src.can_write and src.can_zero and src.can_trim and src.blocking
        assert not src.can_fast_zero and not src.can_multi_conn
        with pytest.raises(FastZeroUnsupported):
            src.zero(0, 4096, fast=True)
        src.pwrite(0, b"abc")
        assert src.stream_length == 3
    assert target.read_bytes() == b"abc"
    with StreamSource(target, size=4096) as src:
        with pytest.raises(SourceError) as e:
            src.pwrite(4000, bytes(200))
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(SourceError) as e:
            src.pread(4000, 200)
        assert e.value.errno == errno.EINVAL
    assert target.read_bytes() == bytes(4096)  # padded to the size given
    with pytest.raises(SourceError, match="--window"):
        StreamSource(target, window=100)


def test_no_reader_never_hangs(tmp_path):
    """A FIFO nobody reads: writes inside the window succeed; one that must
    send waits for a reader, and abort() ends that wait with EIO."""
    path = tmp_path / "lonely.fifo"
    src = StreamSource(path, window=4096)
    src.pwrite(0, b"a" * 4096)  # fits in the window: no reader needed
    errors = []

    def write_past_window():
        try:
            src.pwrite(4096, b"b" * 4096)
        except SourceError as e:
            errors.append(e)

    t = threading.Thread(target=write_past_window)
    t.start()
    src.abort()
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1 and errors[0].errno == errno.EIO
    assert "no reader" in str(errors[0])
    with pytest.raises(SourceError, match="no reader"):
        src.close()  # close after abort does not wait either
    assert not path.exists()


def test_reader_going_away_is_eio(tmp_path):
    path = tmp_path / "short.fifo"
    os.mkfifo(path)
    src = StreamSource(path, window=4096)
    reader_opened = threading.Event()

    def reader():
        with open(path, "rb", buffering=0) as f:
            reader_opened.set()
            f.read(1)

    t = threading.Thread(target=reader)
    t.start()
    src.pwrite(0, b"x" * 8192)  # sends 4096 bytes: opens the FIFO
    assert reader_opened.wait(30)
    t.join(30)  # the reader has closed its end
    with pytest.raises(SourceError) as e:
        for i in range(2, 200):  # fill the pipe buffer until the write fails
            src.pwrite(i * 4096, b"y" * 4096)
    assert e.value.errno == errno.EIO and "went away" in str(e.value)
    with pytest.raises(SourceError):
        src.close()


# -- through diskwatch: qemu-img convert -n into the stream ----------------------

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))


@pytest.fixture(scope="module")
def ext4_image(tmp_path_factory) -> Path:
    """A 40 MiB ext4 image: data at the start, in the middle and zero regions
    (which qemu-img may skip) up to the end."""
    d = tmp_path_factory.mktemp("stream-image")
    tree = d / "tree"
    rng = random.Random(9)
    for i in range(8):
        (tree / f"dir{i}").mkdir(parents=True)
        (tree / f"dir{i}" / "data.bin").write_bytes(rng.randbytes(rng.randrange(100_000, 2 * MiB)))
        (tree / f"dir{i}" / "notes.txt").write_text(f"file {i}\n" * 1000)
    image = d / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "40M"], check=True)
    return image


@pytest.mark.parametrize("qemu_args", [[], ["--target-is-zero"]],
                         ids=["writes-zeroes", "skips-zeroes"])
def test_qemu_img_convert_into_the_stream(ext4_image, tmp_path, qemu_args):
    """md5(stream) == md5(image), also when qemu-img skips the zero regions
    (--target-is-zero): the gaps and the tail are zero-filled."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    size = ext4_image.stat().st_size
    cmd = "qemu-img convert -n " + " ".join(qemu_args) + f' {ext4_image} -O raw "$nbd"'
    r = subprocess.run([DISKWATCH, "--stream-to", str(fifo), "--size", str(size),
                        "--window", "4M", "--headless", "--log", str(tmp_path / "trace"),
                        "--run", cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stream = reader.result()
    assert len(stream) == size
    assert hashlib.md5(stream).hexdigest() == hashlib.md5(ext4_image.read_bytes()).hexdigest()
    assert "write" in (tmp_path / "trace").read_text()


def test_stream_into_a_regular_file_without_size(ext4_image, tmp_path):
    """No --size: a huge virtual disk; the stream ends at the last byte written."""
    out = tmp_path / "out.raw"
    out.write_bytes(b"")
    r = subprocess.run([DISKWATCH, "--stream-to", str(out), "--headless", "--log", os.devnull,
                        "--run", f'nbdcopy {ext4_image} "$uri"'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    image = ext4_image.read_bytes()
    assert out.read_bytes() == image[:out.stat().st_size]
    assert image[out.stat().st_size:] == bytes(len(image) - out.stat().st_size)


def test_a_link_to_a_file_is_never_streamed_through(tmp_path):
    """A regular file is truncated and overwritten: not through a link
    planted where the person expected it (the rule of --log and --record)."""
    victim = tmp_path / "bashrc"
    victim.write_text("precious\n")
    planted = tmp_path / "out.raw"
    planted.symlink_to(victim)
    with pytest.raises(SourceError) as e:
        StreamSource(planted, window=4096)
    assert str(e.value) == (f"refusing to stream to {planted}: it is a symbolic link to a "
                            "file (give the file's real path, or remove the link)")
    assert victim.read_text() == "precious\n"


def test_a_link_to_a_fifo_is_followed(tmp_path):
    """/dev/stdout is a link (to /proc/self/fd/1): links to a FIFO, a device
    or a socket are what people give, and they work."""
    fifo = tmp_path / "real.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "stdout"
    link.symlink_to(fifo)
    src = StreamSource(link, window=4096)
    reader = FifoReader(fifo)
    src.pwrite(0, b"through the link")
    src.close()
    assert reader.result() == b"through the link"
