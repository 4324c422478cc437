"""Issue 11, speed: reads of a read-only image in a qemu format go straight to
its files where ``qemu-img map`` says the bytes are (sources/hostmap.py).

The images are made by qemu-img and qemu-io: a three-deep chain (qcow2 over
qcow2 over raw) with data at every depth, zero clusters, compressed clusters
(which must still come from qemu) and reads that cross every kind of
boundary. Every byte read through diskwatch by libnbd must equal
``qemu-img convert -O raw`` of the same chain.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from fixtures_server import nbd_handle

from diskwatch.server import serve_in_thread
from diskwatch.sources import SourceOptions, hostmap, open_source
from diskwatch.sources.hostmap import ASK, FILE, ZERO, layer_files
from diskwatch.sources.qemu import QemuSource, qemu_img_info

MiB = 1 << 20
SIZE = 16 * MiB


def run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> tuple[Path, bytes]:
    """(top.qcow2, the disk's bytes as qemu-img converts them)."""
    work = tmp_path_factory.mktemp("hostmap")
    base, mid, top = work / "base.raw", work / "mid.qcow2", work / "top.qcow2"
    base.write_bytes(random.Random(7).randbytes(SIZE))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(mid))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 2M 1M", "-c", "write -z 5M 256k",
        "-c", "write -c -P 0x33 8M 128k", "-c", "write -P 0x44 14M 64k", str(mid))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 2624k 64k", "-c", "write -P 0x66 9M 512k",
        "-c", "write -z 12M 1M", "-c", "write -c -P 0x77 13M 64k", str(top))
    raw = work / "expected.raw"
    run("qemu-img", "convert", "-O", "raw", str(top), str(raw))
    return top, raw.read_bytes()


def serve(src):
    return serve_in_thread({"": src})


def read_all(uri: str, reads: list[tuple[int, int]]) -> list[bytes]:
    h = nbd_handle(uri)
    try:
        return [h.pread(n, off) for off, n in reads]
    finally:
        h.shutdown()


def ranges(seed: int, count: int) -> list[tuple[int, int]]:
    """Whole-disk 1 MiB reads, then reads of any size at any offset, many
    across the boundaries of the chain's extents."""
    rng = random.Random(seed)
    out = [(off, MiB) for off in range(0, SIZE, MiB)]
    for _ in range(count):
        n = rng.choice((1, 512, 4096, 65536, 300_000, 2 * MiB))
        out.append((rng.randrange(0, SIZE - n), n))
    for edge in (2 * MiB, 2624 * 1024, 5 * MiB, 8 * MiB, 9 * MiB, 12 * MiB, 13 * MiB, 14 * MiB):
        out += [(edge - 4096, 8192), (edge - 1, 2), (edge, 4096)]
    return out


def test_a_read_only_chain_is_read_from_its_files_and_every_byte_is_qemus(chain):
    top, expected = chain
    src = QemuSource(str(top), "qcow2", readonly=True)
    try:
        assert src.hostmap.done.wait(30)
        m = src.hostmap.map
        assert m is not None, src.hostmap.failure
        kinds = set(m.kinds[:-1])
        # data in each of the three files, zeroes, and the compressed
        # clusters that only qemu can read
        assert {FILE, FILE + 1, FILE + 2, ZERO, ASK} <= kinds
        truth = json.loads(subprocess.run(
            ["qemu-img", "map", "--output=json", "-U", str(top)],
            capture_output=True, check=True, text=True).stdout)
        compressed = [e for e in truth if e["data"] and "offset" not in e]
        assert compressed, "the fixture has compressed clusters"
        running = serve(src)
        try:
            reads = ranges(1, 400)
            reads += [(e["start"], e["length"]) for e in compressed]
            for (off, n), got in zip(reads, read_all(running.uri, reads), strict=True):
                assert got == expected[off:off + n], f"read {n} at {off}"
        finally:
            running.stop()
        assert m.served > 100  # most reads never reached the daemon
        assert isinstance(src.view_for(0, 4096), memoryview)  # read-only: zero-copy
    finally:
        src.close()


def test_under_snapshot_writes_win_over_the_map(chain, tmp_path):
    top, expected = chain
    before = top.read_bytes()
    src = open_source(str(top), SourceOptions(snapshot=True, format="qcow2"))
    try:
        qemu = src.inner
        assert qemu.hostmap.done.wait(30) and qemu.hostmap.map is not None
        running = serve(src)
        try:
            h = nbd_handle(running.uri)
            model = bytearray(expected)
            rng = random.Random(3)
            for _ in range(60):
                n = rng.choice((512, 4096, 100_000))
                off = rng.randrange(0, SIZE - n)
                data = rng.randbytes(n)
                h.pwrite(data, off)
                model[off:off + n] = data
                off2 = max(0, off - rng.randrange(0, 70_000))
                assert h.pread(min(200_000, SIZE - off2), off2) == \
                    bytes(model[off2:off2 + min(200_000, SIZE - off2)])
            for off in range(0, SIZE, 2 * MiB):
                assert h.pread(2 * MiB, off) == bytes(model[off:off + 2 * MiB])
            h.shutdown()
        finally:
            running.stop()
    finally:
        src.close()
    assert top.read_bytes() == before


@pytest.mark.parametrize("writes_before_the_map", [False, True])
def test_what_the_guest_writes_is_read_back_through_qemu(chain, tmp_path, monkeypatch,
                                                         writes_before_the_map):
    """A writable image: every write, zero and trim (also those sent while
    the map is still being made) sends later reads of its range to qemu,
    and what lands in the image is what qemu-img reads back."""
    top, expected = chain
    work = tmp_path / "rw.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2", str(work))
    gate = threading.Event()
    if writes_before_the_map:
        run_map = hostmap.HostMapper._run
        monkeypatch.setattr(hostmap.HostMapper, "_run", lambda self: (gate.wait(30),
                                                                      run_map(self)))
    else:
        gate.set()
    src = QemuSource(str(work), "qcow2")
    model = bytearray(expected)
    try:
        running = serve(src)
        try:
            h = nbd_handle(running.uri)
            rng = random.Random(5)

            def churn(rounds: int) -> None:
                for _ in range(rounds):
                    n = rng.choice((512, 4096, 65536, 100_000))
                    off = rng.randrange(0, SIZE - n)
                    what = rng.random()
                    if what < 0.6:
                        data = rng.randbytes(n)
                        h.pwrite(data, off)
                        model[off:off + n] = data
                    else:
                        h.zero(n, off)
                        model[off:off + n] = bytes(n)
                    off2 = max(0, off - rng.randrange(0, 70_000))
                    n2 = min(200_000, SIZE - off2)
                    assert h.pread(n2, off2) == bytes(model[off2:off2 + n2])

            churn(40)
            gate.set()
            assert src.hostmap.done.wait(30) and src.hostmap.map is not None
            churn(40)
            for off in range(0, SIZE, 65536):
                assert h.pread(65536, off) == bytes(model[off:off + 65536])
            # the ranges not written were still read from the files
            assert src.hostmap.map.served > 100
            # as copies: a view queued behind a trim could show the data of
            # another range that reuses the cluster
            # (zeroes may stay views: they are no file's)
            answers = [a for a in (src.view_for(off, 4096) for off in range(0, SIZE, 65536))
                       if a is not None]
            assert any(isinstance(a, bytes) for a in answers)
            assert all(isinstance(a, bytes) or not any(a) for a in answers)
            h.flush()
            h.shutdown()
        finally:
            running.stop()
    finally:
        src.close()
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-O", "raw", str(work), str(out))
    assert out.read_bytes() == bytes(model)


def test_a_map_too_large_is_dropped_and_qemu_serves_everything(chain, monkeypatch):
    top, expected = chain
    monkeypatch.setattr(hostmap, "MAX_EXTENTS", 3)
    src = QemuSource(str(top), "qcow2", readonly=True)
    try:
        assert src.hostmap.done.wait(30)
        assert src.hostmap.map is None
        assert "more than 3 extents" in src.hostmap.failure
        running = serve(src)
        try:
            reads = ranges(2, 50)
            for (off, n), got in zip(reads, read_all(running.uri, reads), strict=True):
                assert got == expected[off:off + n]
        finally:
            running.stop()
    finally:
        src.close()


def test_layers_that_are_not_plain_files_are_left_to_qemu(tmp_path):
    enc = tmp_path / "enc.qcow2"
    for _ in range(5):
        # LUKS times its key derivation first; on a busy machine qemu-img
        # sometimes measures nothing ("Unable to get accurate CPU usage")
        r = subprocess.run(["qemu-img", "create", "-q", "--object",
                            "secret,id=s0,data=diskwatch", "-f", "qcow2", "-o",
                            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50",
                            str(enc), "16M"], capture_output=True, text=True)
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr
    assert layer_files(qemu_img_info(str(enc), "qcow2", chain=True)) == [None]
    split = tmp_path / "split.vmdk"  # one file per 2 GiB: offsets are in other files
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
        str(split), "3G")
    assert layer_files(qemu_img_info(str(split), "vmdk", chain=True)) == [None]
    one = tmp_path / "one.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", str(one), "16M")
    assert layer_files(qemu_img_info(str(one), "vmdk", chain=True)) == [str(one)]
    ext = tmp_path / "ext.qcow2"  # the data in an external data file
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'ext.data'}",
        str(ext), "16M")
    assert layer_files(qemu_img_info(str(ext), "qcow2", chain=True)) == [None]


def test_fio_verifies_what_it_wrote_to_a_writable_qcow2(chain, tmp_path):
    """fio's nbd engine, 16 requests in flight, random writes of 4-64 KiB
    with checksums, then every block read back and checked: reads of what
    was written must reach qemu, never the map's stale copy."""
    if shutil.which("fio") is None:
        pytest.skip("fio is missing: apt-get install fio")
    top, _ = chain
    work = tmp_path / "fio.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2", str(work))
    src = QemuSource(str(work), "qcow2")
    try:
        assert src.hostmap.done.wait(30) and src.hostmap.map is not None
        running = serve(src)
        try:
            r = subprocess.run(
                ["fio", "--name=dw", "--ioengine=nbd", f"--uri={running.uri}", "--rw=randrw",
                 "--bsrange=4k-64k", f"--size={SIZE}", "--iodepth=16", "--verify=crc32c",
                 "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                 "--randrepeat=1", "--output-format=json"],
                capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-2000:]
            job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
            assert job["error"] == 0 and job["write"]["io_bytes"] > 0
        finally:
            running.stop()
        assert src.hostmap.map.served > 0  # its random reads of old data
    finally:
        src.close()


def test_an_image_replaced_while_it_is_served_is_not_read_from_the_new_file(tmp_path,
                                                                            monkeypatch):
    """qemu holds the image it opened; a file renamed over its path (a
    converted copy moved in place) is another inode, which the map must
    not read: reads stay qemu's."""
    image, other = tmp_path / "disk.qcow2", tmp_path / "new.qcow2"
    for path, pattern in ((image, "0x11"), (other, "0x22")):
        run("qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M")
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 4M", str(path))
    gate = threading.Event()
    run_map = hostmap.HostMapper._run
    monkeypatch.setattr(hostmap.HostMapper, "_run", lambda self: (gate.wait(30),
                                                                  run_map(self)))
    src = QemuSource(str(image), "qcow2", readonly=True)
    try:
        other.rename(image)  # after qemu opened the image, before the map
        gate.set()
        assert src.hostmap.done.wait(30)
        view = src.view_for(65536, 4096)
        got = bytes(view) if view is not None else src.pread(65536, 4096)
        assert got == b"\x11" * 4096
        assert src.pread(0, 3 * MiB) == b"\x11" * (3 * MiB)
    finally:
        src.close()
