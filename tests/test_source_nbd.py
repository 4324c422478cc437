"""Issue 11: diskwatch as a transparent tap in front of an NBD server.

Upstreams are real servers: nbdkit's memory plugin and qemu-nbd on a qcow2.
Clients are nbdcopy, nbdinfo, fio (randrw with verify) and libnbd's Python
module. The upstream is killed under a client and brought back.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_server import wait_until

from diskwatch.events import Bus
from diskwatch.server import serve_in_thread
from diskwatch.sources.nbd import NbdSource

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))
MiB = 1024 * 1024
FLAGS = ("is_read_only", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
         "can_cache", "can_multi_conn", "export-size")


class Upstream:
    """A server diskwatch watches: started, killed and started again on the
    same unix socket."""

    def __init__(self, argv_for, sock: Path):
        self.argv_for = argv_for
        self.sock = sock
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> Upstream:
        if self.sock.exists():
            self.sock.unlink()  # a killed server leaves its socket behind
        self.proc = subprocess.Popen(self.argv_for(str(self.sock)), stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        # The socket file exists from bind(), before listen(): wait until a
        # connection is accepted.
        wait_until(lambda: self._accepts() or self.proc.poll() is not None,
                   what="the upstream's socket")
        assert self.proc.poll() is None, self.proc.stderr.read()
        return self

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nbdkit_memory(tmp_path):
    up = Upstream(lambda sock: ["nbdkit", "-f", "-U", sock, "memory", "64M"],
                  tmp_path / "nbdkit.sock").start()
    yield up
    up.kill()


@pytest.fixture
def qemu_nbd_qcow2(tmp_path):
    image = tmp_path / "up.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 3M", str(image)], check=True,
                   capture_output=True)
    up = Upstream(lambda sock: ["qemu-nbd", "-t", "-f", "qcow2", "-k", sock, "-e", "4",
                                "--discard=unmap", str(image)], tmp_path / "qemu-nbd.sock").start()
    up.image = image
    yield up
    up.stop()


def nbdinfo(uri: str) -> dict:
    r = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["exports"][0]


def diskwatch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DISKWATCH, *args], capture_output=True, text=True, timeout=timeout)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("upstream", ["nbdkit_memory", "qemu_nbd_qcow2"])
def test_the_tap_offers_what_the_upstream_offers(request, upstream):
    up = request.getfixturevalue(upstream)
    direct = nbdinfo(up.uri)
    r = diskwatch(up.uri, "--headless", "--no-trace", "--run", 'nbdinfo --json "$uri"')
    assert r.returncode == 0, r.stderr
    tapped = json.loads(r.stdout)["exports"][0]
    assert {k: tapped[k] for k in FLAGS} == {k: direct[k] for k in FLAGS}
    assert tapped["contexts"] == ["base:allocation"]


def test_nbdcopy_in_and_out_and_fio_verify_through_the_tap(nbdkit_memory, tmp_path):
    data = tmp_path / "in.img"
    data.write_bytes(os.urandom(8 * MiB) + bytes(24 * MiB) + os.urandom(32 * MiB))
    out = tmp_path / "out.img"
    fio = ("fio --name=dw --ioengine=nbd --uri=\"$uri\" --rw=randrw --bs=4k --size=8M "
           "--offset=8M --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 "
           "--verify_state_save=0 --randrepeat=1 --output-format=json >fio.json")
    r = subprocess.run([DISKWATCH, nbdkit_memory.uri, "--headless", "--no-trace", "--run",
                        f'nbdcopy {data} "$uri" && nbdcopy "$uri" {out} && {fio}'],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert md5(out) == md5(data)
    report = (tmp_path / "fio.json").read_text()
    job = json.loads(report[report.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
    assert "failed" not in r.stderr


def test_nbdcopy_out_of_qemu_nbd_matches_qemu_img_convert(qemu_nbd_qcow2, tmp_path):
    out = tmp_path / "out.raw"
    expected = tmp_path / "expected.raw"
    r = diskwatch(qemu_nbd_qcow2.uri, "-r", "--headless", "--no-trace",
                  "--run", f'nbdcopy "$uri" {out}')
    assert r.returncode == 0, r.stderr
    qemu_nbd_qcow2.stop()  # qemu-nbd holds the image's write lock
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qemu_nbd_qcow2.image),
                    str(expected)], check=True)
    assert md5(out) == md5(expected)


def test_upstream_killed_mid_run_is_eio_then_recovered(nbdkit_memory, caplog):
    nbd = pytest.importorskip("nbd")
    src = NbdSource(nbdkit_memory.uri)
    bus = Bus()
    try:
        with serve_in_thread({"": src}, bus) as running:
            h = nbd.NBD()
            h.connect_uri(running.uri)
            h.pwrite(b"before" * 100, 0)
            nbdkit_memory.kill()
            with pytest.raises(nbd.Error) as e:
                h.pread(600, 0)
            assert e.value.errnum == 5  # EIO, and the client's connection stays up
            nbdkit_memory.start()
            # Reconnection runs with backoff in the background: poll until a
            # read succeeds again (the new nbdkit's disk is empty).
            def readable() -> bool:
                try:
                    return h.pread(600, 0) == bytes(600)
                except nbd.Error:
                    return False
            wait_until(readable, timeout=20, what="reads through the tap again")
            h.pwrite(b"after", 0)
            assert h.pread(5, 0) == b"after"
            h.shutdown()
    finally:
        src.close()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("connection lost" in m for m in messages) == 1, messages
    assert any("reconnected" in m for m in messages)


def test_an_unreachable_upstream_is_one_line(tmp_path):
    r = diskwatch(f"nbd+unix:///?socket={tmp_path}/nothing.sock", "--headless", "--run", "true")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "cannot connect" in r.stderr, r.stderr


def test_an_upstream_that_takes_one_client_at_a_time_is_one_line(tmp_path):
    """qemu-nbd without --shared serves one client; diskwatch needs two
    connections to it. It used to hang without a word on the second."""
    image = tmp_path / "one.img"
    image.write_bytes(bytes(1024 * 1024))
    up = Upstream(lambda sock: ["qemu-nbd", "-t", "-f", "raw", "-k", sock, str(image)],
                  tmp_path / "one.sock").start()
    try:
        r = diskwatch(up.uri, "--timeout", "2", "--headless", "--run", "true", timeout=60)
    finally:
        up.stop()
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "NBD handshake" in r.stderr and "--shared" in r.stderr, r.stderr


def test_an_nbds_upstream_with_tls_psk(tmp_path):
    """nbds://: libnbd speaks TLS to the upstream (its URI's tls-psk-file is
    the person's own file); clients reach diskwatch on its private socket."""
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + os.urandom(32).hex() + "\n")
    keys.chmod(0o600)
    up = Upstream(lambda sock: ["nbdkit", "-f", "--tls=require", f"--tls-psk={keys}", "-U", sock,
                                "memory", "8M"], tmp_path / "tls.sock").start()
    data = tmp_path / "in.img"
    data.write_bytes(os.urandom(8 * MiB))
    out = tmp_path / "out.img"
    try:
        uri = f"nbds+unix://alice@/?socket={up.sock}&tls-psk-file={keys}"
        r = diskwatch(uri, "--headless", "--no-trace",
                      "--run", f'nbdcopy {data} "$uri" && nbdcopy "$uri" {out}')
        assert r.returncode == 0, r.stderr
        assert md5(out) == md5(data)
        r = diskwatch(up.uri, "--headless", "--run", "true")  # nbd:// to a TLS-only server
        assert r.returncode == 1 and "requires TLS" in r.stderr, r.stderr
    finally:
        up.kill()


def test_block_status_in_flight_with_reads_matches_qemu_img_map(qemu_nbd_qcow2):
    """The tap's loop handle reads with simple replies; block status goes
    to a structured handle in a helper thread. Both in flight at once, on
    one client connection: every read has its bytes, every block status the
    qcow2's allocation as qemu-img map says."""
    nbd = pytest.importorskip("nbd")
    src = NbdSource(qemu_nbd_qcow2.uri, readonly=True)
    maps: list[list[int]] = []
    try:
        with serve_in_thread({"": src}, Bus()) as running:
            h = nbd.NBD()
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.connect_uri(running.uri)
            _reads_and_block_status(nbd, h, maps)
            h.shutdown()
    finally:
        src.close()
    qemu_nbd_qcow2.stop()
    truth = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(qemu_nbd_qcow2.image)],
        capture_output=True, text=True, check=True).stdout)
    allocated = [(e["start"], e["length"]) for e in truth if e["data"] and e["start"] < 8 * MiB]
    assert len(maps) == 8
    for entries in maps:
        assert entries[0] == 0
        pos, data = 0, []
        for length, flags in zip(entries[1::2], entries[2::2], strict=True):
            if not flags & nbd.STATE_HOLE:
                data.append((pos, length))
            pos += length
        assert _merged(data) == _merged(allocated)


def _reads_and_block_status(nbd, h, maps: list[list[int]]) -> None:
    """Eight reads and eight block status requests, all in flight at once."""
    def collect(meta, offset, entries, err):
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            maps.append([offset, *entries])
        return 0
    cookies = []
    bufs = []
    for i in range(8):
        buf = nbd.Buffer(64 * 1024)
        bufs.append((i * MiB // 2, buf))
        cookies.append(h.aio_pread(buf, i * MiB // 2))
        cookies.append(h.aio_block_status(8 * MiB, 0, collect))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    for offset, buf in bufs:
        want = b"\7" * len(buf) if 1 * MiB <= offset < 4 * MiB else bytes(len(buf))
        assert buf.to_bytearray() == want, offset


def _merged(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in extents:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out
