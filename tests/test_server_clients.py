"""The server with real NBD clients over real sockets: qemu-img, nbdinfo,
nbdcopy, libnbd's Python module, fio; on a real image (ext4 made with
``mkfs.ext4 -d``, random data, holes; see fixtures_server)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from fixtures_server import (
    HOLE1,
    HOLE2,
    IMAGE_SIZE,
    RANDOM,
    SUBPROCESS_ENV,
    MiB,
    md5,
    nbd_handle,
    pattern,
    read_at,
)

from diskwatch.events import Command

nbd = pytest.importorskip("nbd")


def need(tool: str) -> str:
    path = shutil.which(tool, path=SUBPROCESS_ENV["PATH"])
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    need(cmd[0])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=SUBPROCESS_ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


# --- qemu-img -----------------------------------------------------------------

def test_qemu_img_info(ro_server):
    info = json.loads(run("qemu-img", "info", "--output=json", ro_server.uri).stdout)
    assert info["virtual-size"] == IMAGE_SIZE
    assert info["format"] == "raw"


def test_qemu_img_compare_identical(ro_server, server_image):
    out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(server_image.path),
              ro_server.uri)
    assert "Images are identical" in out.stdout


def test_qemu_img_compare_sees_a_difference(rw_server, server_image):
    h = nbd_handle(rw_server.uri)
    h.pwrite(b"\xff" * 512, RANDOM[0] + 4096)
    h.shutdown()
    p = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(server_image.path),
            rw_server.uri, check=False)
    assert p.returncode == 1
    assert str(RANDOM[0] + 4096) in p.stdout


def test_qemu_img_convert_into_the_server(serve, tmp_path, server_image):
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(IMAGE_SIZE)
    served = serve(target)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(server_image.path),
        served.uri)
    assert md5(target) == server_image.md5
    served.sync()
    writes = served.events.commands(Command.WRITE)
    assert writes and all(r.error == 0 for r in writes)


# --- nbdinfo -------------------------------------------------------------------

def test_nbdinfo_json_read_write(rw_server):
    info = json.loads(run("nbdinfo", "--json", rw_server.uri).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (exp,) = info["exports"]
    assert exp["export-size"] == IMAGE_SIZE
    assert exp["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_df",
                 "can_multi_conn"):
        assert exp[flag] is True, flag
    assert exp["contexts"] == ["base:allocation"]
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 32 * MiB


def test_nbdinfo_json_read_only(ro_server):
    (exp,) = json.loads(run("nbdinfo", "--json", ro_server.uri).stdout)["exports"]
    assert exp["is_read_only"] is True
    assert exp["can_trim"] is False and exp["can_zero"] is False and exp["can_fua"] is False
    assert exp["can_flush"] is True and exp["can_cache"] is True


def test_nbdinfo_list_with_export_names(serve, server_image):
    served = serve(exports={"disk-a": server_image.path, "disk b": server_image.path},
                   readonly=True)
    info = json.loads(run("nbdinfo", "--list", "--json", served.uri_for("disk-a")).stdout)
    names = sorted(e["export-name"] for e in info["exports"])
    assert names == ["disk b", "disk-a"]
    assert all(e["export-size"] == IMAGE_SIZE for e in info["exports"])


def test_nbdinfo_map_shows_holes(ro_server):
    entries = json.loads(run("nbdinfo", "--map", "--json", ro_server.uri).stdout)
    assert entries[0]["offset"] == 0
    assert sum(e["length"] for e in entries) == IMAGE_SIZE
    pos = 0
    for e in entries:  # contiguous
        assert e["offset"] == pos
        pos += e["length"]

    def kind_at(offset: int) -> int:
        for e in entries:
            if e["offset"] <= offset < e["offset"] + e["length"]:
                return e["type"]
        raise AssertionError(offset)

    for start, length in (HOLE1, HOLE2):
        assert kind_at(start) == 3 and kind_at(start + length - 1) == 3
    assert kind_at(RANDOM[0]) == 0 and kind_at(RANDOM[0] + RANDOM[1] - 1) == 0
    assert kind_at(0) == 0  # the ext4 superblock area has data
    assert any(e["description"] == "hole,zero" for e in entries)


def test_nbdinfo_size_via_export_name(serve, server_image):
    served = serve(exports={"named": server_image.path}, readonly=True)
    assert run("nbdinfo", "--size", served.uri_for("named")).stdout.strip() == str(IMAGE_SIZE)
    p = run("nbdinfo", "--size", served.uri_for("other"), check=False)
    assert p.returncode != 0


# --- nbdcopy -------------------------------------------------------------------

def test_nbdcopy_download_is_byte_identical(ro_server, server_image, tmp_path):
    out = tmp_path / "copy.img"
    run("nbdcopy", ro_server.uri, str(out))
    assert md5(out) == server_image.md5


def test_nbdcopy_upload_into_the_server(serve, server_image, tmp_path):
    target = tmp_path / "up.img"
    with open(target, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(b"\x55" * MiB)  # garbage where the image has data: must be overwritten
        f.seek(HOLE1[0])
        f.write(b"\x55" * MiB)  # and where it has a hole: must be zeroed
    served = serve(target)
    run("nbdcopy", str(server_image.path), served.uri)
    assert md5(target) == server_image.md5


def test_nbdcopy_server_to_server(ro_server, serve, server_image, tmp_path):
    target = tmp_path / "t.img"
    with open(target, "wb") as f:
        f.truncate(IMAGE_SIZE)
    dst = serve(target)
    run("nbdcopy", "--connections=2", "--requests=16", ro_server.uri, dst.uri)
    assert md5(target) == server_image.md5


# --- libnbd, command by command ---------------------------------------------------

def test_pread(ro_server, server_image):
    h = nbd_handle(ro_server.uri)
    assert h.get_size() == IMAGE_SIZE
    assert h.is_read_only()
    for offset, length in ((0, 512), (1024, 1024), (RANDOM[0] - 100, 200), (RANDOM[0], 4 * MiB),
                           (IMAGE_SIZE - 1, 1), (3, 70_000), (HOLE1[0], 128 * 1024)):
        assert h.pread(length, offset) == read_at(server_image.path, offset, length)
    h.shutdown()


def test_pread_simple_replies(ro_server, server_image):
    h = nbd_handle(ro_server.uri, structured=False)
    assert not h.get_structured_replies_negotiated()
    for offset, length in ((0, 4096), (RANDOM[0], 1 * MiB), (HOLE1[0], 256 * 1024), (5, 7)):
        assert h.pread(length, offset) == read_at(server_image.path, offset, length)
    h.shutdown()


def test_pwrite_with_and_without_fua(rw_server, rw_image):
    h = nbd_handle(rw_server.uri)
    assert not h.is_read_only() and h.can_fua()
    a, b = pattern(1, 4096), pattern(2, 100_000)
    h.pwrite(a, 8192)
    h.pwrite(b, RANDOM[0] + 13, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 8192) == a
    assert h.pread(len(b), RANDOM[0] + 13) == b
    h.flush()
    h.shutdown()
    assert read_at(rw_image, 8192, 4096) == a
    assert read_at(rw_image, RANDOM[0] + 13, len(b)) == b
    rw_server.events.wait_for(lambda log: len(log.closed_connections()) == 1)
    writes = rw_server.events.commands(Command.WRITE)
    assert [(r.offset, r.length, r.flags) for r in writes] == [
        (8192, 4096, 0), (RANDOM[0] + 13, len(b), nbd.CMD_FLAG_FUA)]


def test_flush(rw_server):
    h = nbd_handle(rw_server.uri)
    assert h.can_flush()
    h.flush()
    h.shutdown()
    rw_server.events.wait_for(lambda log: len(log.commands(Command.FLUSH)) == 1)


def test_trim_reads_back_zeroes_and_makes_a_hole(rw_server, rw_image):
    h = nbd_handle(rw_server.uri, meta=True)
    assert h.can_trim()
    offset, length = RANDOM[0] + MiB, MiB
    h.trim(length, offset)
    assert h.pread(length, offset) == bytes(length)
    assert read_at(rw_image, offset, length) == bytes(length)
    # block status now reports it as a hole
    got = []
    h.block_status(length, offset, lambda ctx, off, entries, err: got.append(entries))
    assert got[0][:2] == [length, 3] or (got[0][1] == 3 and got[0][0] >= length)
    h.shutdown()


@pytest.mark.parametrize("flags", [0, "NO_HOLE", "FUA"])
def test_zero(rw_server, rw_image, flags):
    flags = {0: 0, "NO_HOLE": nbd.CMD_FLAG_NO_HOLE, "FUA": nbd.CMD_FLAG_FUA}[flags]
    h = nbd_handle(rw_server.uri)
    assert h.can_zero()
    offset, length = RANDOM[0] + 12345, 300_000
    h.zero(length, offset, flags)
    assert h.pread(length, offset) == bytes(length)
    assert read_at(rw_image, offset - 1, 1) != b"" and read_at(rw_image, offset, length) == \
        bytes(length)
    h.shutdown()
    rw_server.events.wait_for(lambda log: log.commands(Command.WRITE_ZEROES))
    (ev,) = rw_server.events.commands(Command.WRITE_ZEROES)
    assert (ev.offset, ev.length, ev.flags, ev.error) == (offset, length, flags, 0)


def test_fast_zero(rw_server, rw_image):
    h = nbd_handle(rw_server.uri)
    assert h.can_fast_zero()
    offset, length = RANDOM[0], 64 * 1024
    try:
        h.zero(length, offset, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as e:
        # Allowed by the spec when zeroing would not be fast; nothing written.
        assert e.errnum == 95  # ENOTSUP
        assert read_at(rw_image, offset, 16) != bytes(16)
    else:
        assert h.pread(length, offset) == bytes(length)
    h.shutdown()


def test_cache(ro_server):
    h = nbd_handle(ro_server.uri)
    assert h.can_cache()
    h.cache(MiB, 0)
    h.shutdown()
    ro_server.events.wait_for(lambda log: log.commands(Command.CACHE))
    (ev,) = ro_server.events.commands(Command.CACHE)
    assert (ev.offset, ev.length, ev.error) == (0, MiB, 0)


def block_status(h, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    got = []

    def cb(ctx, off, entries, err):
        assert ctx == "base:allocation" and off == offset
        got.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, cb, flags)
    return got


def test_block_status_base_allocation(ro_server):
    h = nbd_handle(ro_server.uri, meta=True)
    assert h.can_meta_context("base:allocation")
    # From the end of the filesystem through the random data and the last hole.
    ext = block_status(h, HOLE1[1] + RANDOM[1] + HOLE2[1], HOLE1[0])
    assert sum(n for n, _ in ext) == HOLE1[1] + RANDOM[1] + HOLE2[1]
    assert ext == [(HOLE1[1], 3), (RANDOM[1], 0), (HOLE2[1], 3)]
    # REQ_ONE: a single extent
    one = block_status(h, HOLE1[1] + RANDOM[1], HOLE1[0], nbd.CMD_FLAG_REQ_ONE)
    assert one == [(HOLE1[1], 3)]
    # unaligned start inside the data
    assert block_status(h, 1000, RANDOM[0] + 17) == [(1000, 0)]
    h.shutdown()


def test_block_status_without_context_is_refused_by_the_server(ro_server):
    h = nbd_handle(ro_server.uri, strict=False)  # no add_meta_context
    with pytest.raises(nbd.Error):
        h.block_status(4096, 0, lambda *a: 0)
    assert h.pread(512, 0)  # the connection goes on
    h.shutdown()


def test_pread_structured_data_and_hole_chunks(ro_server, server_image):
    h = nbd_handle(ro_server.uri)
    assert h.get_structured_replies_negotiated()
    offset = RANDOM[0] + RANDOM[1] - MiB  # 1 MiB of data then 1 MiB of hole
    length = 2 * MiB
    chunks = []

    def cb(subbuf, off, status, err):
        chunks.append((off, len(subbuf), status))
        return 0

    data = h.pread_structured(length, offset, cb)
    assert data == read_at(server_image.path, offset, length)
    kinds = {status for _, _, status in chunks}
    assert nbd.READ_DATA in kinds and nbd.READ_HOLE in kinds
    assert sum(n for _, n, _ in chunks) == length
    holes = [(o, n) for o, n, s in chunks if s == nbd.READ_HOLE]
    assert holes == [(RANDOM[0] + RANDOM[1], MiB)]
    # With DF the read is one data chunk.
    chunks.clear()
    assert h.pread_structured(length, offset, cb, nbd.CMD_FLAG_DF) == data
    assert [s for _, _, s in chunks] == [nbd.READ_DATA]
    h.shutdown()


def test_pipelined_aio_reads_and_writes(rw_server, rw_image):
    h = nbd_handle(rw_server.uri)
    bufs = []
    for i in range(64):
        data = pattern(100 + i, 4096 + i)
        h.aio_pwrite(data, i * 65536)
        bufs.append(data)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    reads = []
    for i in range(64):
        b = nbd.Buffer(4096 + i)
        h.aio_pread(b, i * 65536)
        reads.append(b)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for data, b in zip(bufs, reads, strict=True):
        assert b.to_bytearray() == data
    h.shutdown()
    for i, data in enumerate(bufs):
        assert read_at(rw_image, i * 65536, len(data)) == data


# --- fio ----------------------------------------------------------------------

def test_fio_randrw_with_verify(serve, tmp_path):
    need("fio")
    target = tmp_path / "fio.img"
    with open(target, "wb") as f:
        f.truncate(16 * MiB)
    served = serve(target)
    p = run("fio", "--name=dw", "--ioengine=nbd", f"--uri={served.uri}", "--rw=randrw",
            "--bs=4k", "--size=8M", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
            "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=1", "--output-format=json", timeout=120)
    result = json.loads(p.stdout[p.stdout.index("{"):])
    job = result["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
    served.sync()
    assert served.events.commands(Command.WRITE)
    assert not [r for r in served.events.requests if r.error]


# --- several clients, TCP, export names ----------------------------------------

def test_several_clients_at_once(serve, rw_image, server_image):
    served = serve(rw_image)
    nworkers, region = 6, 2 * MiB
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            h = nbd_handle(served.uri)
            base = i * region
            for j in range(16):
                off = base + j * (region // 16)
                data = pattern(i * 1000 + j, 8192 + 512 * j)
                h.pwrite(data, off)
                assert h.pread(len(data), off) == data
                # and a read of untouched data elsewhere
                far = RANDOM[0] + (i * 4096 + j * 512)
                assert h.pread(512, far) == read_at(server_image.path, far, 512)
            h.flush()
            h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # Meanwhile a separate process downloads the image region that nobody writes.
    copier = subprocess.Popen(["nbdcopy", served.uri, "-"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=SUBPROCESS_ENV)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nworkers)]
    for t in threads:
        t.start()
    stdout, _ = copier.communicate(timeout=60)
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert not errors, errors
    assert copier.returncode == 0
    assert stdout[RANDOM[0]:RANDOM[0] + RANDOM[1]] == read_at(server_image.path, *RANDOM)
    for i in range(nworkers):
        for j in range(16):
            off = i * region + j * (region // 16)
            data = pattern(i * 1000 + j, 8192 + 512 * j)
            assert read_at(rw_image, off, len(data)) == data
    served.events.wait_for(lambda log: len(log.closed_connections()) == nworkers + 1)
    assert len({r.conn for r in served.events.requests}) == nworkers + 1


def test_tcp_listener_on_an_ephemeral_port(serve, server_image):
    served = serve(server_image.path, readonly=True, tcp=True)
    port = served.running.port
    assert port and port > 0
    assert served.uri == f"nbd://127.0.0.1:{port}/"
    h = nbd_handle(served.uri)
    assert h.pread(4096, RANDOM[0]) == read_at(server_image.path, RANDOM[0], 4096)
    h.shutdown()
    info = json.loads(run("nbdinfo", "--json", served.uri).stdout)
    assert info["exports"][0]["export-size"] == IMAGE_SIZE
    served.events.wait_for(lambda log: any(e.peer.startswith("127.0.0.1:")
                                           for e in log.closed_connections()))


def test_export_names(serve, server_image, rw_image):
    served = serve(exports={"ro-disk": server_image.path, "work": rw_image}, readonly=False)
    h = nbd_handle(served.uri_for("work"))
    assert h.get_export_name() == "work"
    h.pwrite(b"named", 0)
    h.shutdown()
    assert read_at(rw_image, 0, 5) == b"named"
    h = nbd_handle(served.uri_for("ro-disk"))
    assert h.pread(5, 0) == read_at(server_image.path, 0, 5)
    h.shutdown()
    with pytest.raises(nbd.Error):
        nbd_handle(served.uri_for("missing"))
    served.events.wait_for(lambda log: len(log.closed_connections()) == 2)
    assert {r.export for r in served.events.requests} == {"work", "ro-disk"}


# --- events --------------------------------------------------------------------

def test_events_match_what_the_client_did(rw_server):
    h = nbd_handle(rw_server.uri, meta=True)
    h.pread(4096, 0)
    h.pread(512, RANDOM[0] + 512)
    h.pwrite(b"x" * 1000, 65536, nbd.CMD_FLAG_FUA)
    h.trim(4096, 1 << 20)
    h.zero(8192, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    h.cache(4096, 0)
    block_status(h, 4096, 0)
    h.shutdown()
    rw_server.events.wait_for(lambda log: len(log.closed_connections()) == 1)
    got = [(r.command, r.offset, r.length, r.flags, r.error) for r in rw_server.events.requests]
    assert got == [
        (Command.READ, 0, 4096, 0, 0),
        (Command.READ, RANDOM[0] + 512, 512, 0, 0),
        (Command.WRITE, 65536, 1000, nbd.CMD_FLAG_FUA, 0),
        (Command.TRIM, 1 << 20, 4096, 0, 0),
        (Command.WRITE_ZEROES, 2 << 20, 8192, nbd.CMD_FLAG_NO_HOLE, 0),
        (Command.FLUSH, 0, 0, 0, 0),
        (Command.CACHE, 0, 4096, 0, 0),
        (Command.BLOCK_STATUS, 0, 4096, 0, 0),
        (Command.DISC, 0, 0, 0, 0),
    ]
    evs = rw_server.events.requests
    assert len({r.conn for r in evs}) == 1 and all(r.export == "" for r in evs)
    assert all(r.duration >= 0 for r in evs)
    (closed,) = rw_server.events.closed_connections()
    assert closed.requests == len(evs)
    opened = [e for e in rw_server.events.events if getattr(e, "opened", False)]
    assert len(opened) == 1 and opened[0].conn == evs[0].conn


def test_events_record_errors(ro_server):
    h = nbd_handle(ro_server.uri, strict=False)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x", 0)
    with pytest.raises(nbd.Error):
        h.pread(512, IMAGE_SIZE)
    h.shutdown()
    ro_server.events.wait_for(lambda log: len(log.closed_connections()) == 1)
    errs = [(r.command, r.error) for r in ro_server.events.requests if r.error]
    assert errs == [(Command.WRITE, 1), (Command.READ, 22)]


def test_qemu_img_convert_events_cover_the_image(serve, tmp_path, server_image):
    """Every byte qemu-img reads from the server is an event: the union of
    read ranges covers the data of the image."""
    served = serve(server_image.path, readonly=True)
    out = Path(tmp_path) / "out.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(out))
    assert md5(out) == server_image.md5
    served.events.wait_for(lambda log: log.closed_connections())
    reads = served.events.commands(Command.READ)
    covered = set()
    for r in reads:
        for mib in range(r.offset // MiB, (r.offset + r.length - 1) // MiB + 1):
            covered.add(mib)
    assert set(range(RANDOM[0] // MiB, (RANDOM[0] + RANDOM[1]) // MiB)) <= covered
