"""--snapshot: writes go to a temporary overlay, reads see them, the image is
never modified (md5 before and after)."""

from __future__ import annotations

import pytest
from fixtures_server import (
    HOLE1,
    IMAGE_SIZE,
    RANDOM,
    md5,
    nbd_handle,
    pattern,
    read_at,
    run_diskwatch,
)

from diskwatch.sources.snapshot import CLUSTER

nbd = pytest.importorskip("nbd")


@pytest.fixture
def snap(serve, rw_image):
    """The private copy served with --snapshot (the copy stays writable, so
    a write that leaked through would show)."""
    before = md5(rw_image)
    served = serve(rw_image, snapshot=True)
    yield served, rw_image
    served.running.stop()
    assert md5(rw_image) == before, "--snapshot modified the image"


def test_writes_are_seen_but_the_image_is_untouched(snap):
    served, image = snap
    h = nbd_handle(served.uri)
    assert not h.is_read_only()
    data = pattern(7, 100_000)
    h.pwrite(data, RANDOM[0] + 5, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(len(data), RANDOM[0] + 5) == data
    # bytes around the write come from the image
    assert h.pread(5, RANDOM[0]) == read_at(image, RANDOM[0], 5)
    end = RANDOM[0] + 5 + len(data)
    assert h.pread(CLUSTER, end) == read_at(image, end, CLUSTER)
    # a second connection sees the same overlay
    h2 = nbd_handle(served.uri)
    assert h2.pread(len(data), RANDOM[0] + 5) == data
    h2.shutdown()
    h.shutdown()
    assert read_at(image, RANDOM[0] + 5, 16) != data[:16]


@pytest.mark.parametrize("offset,length", [
    (CLUSTER - 1, 2),  # one byte each side of a boundary
    (3 * CLUSTER - 100, CLUSTER + 200),  # three clusters, partial at both ends
    (RANDOM[0] + 12345, 5 * CLUSTER + 7),
    (IMAGE_SIZE - 10, 10),  # the last bytes
    (HOLE1[0] - 17, 34),  # across the end of the filesystem into the hole
    (0, 1),
])
def test_unaligned_writes_across_clusters(snap, offset, length):
    served, image = snap
    h = nbd_handle(served.uri)
    data = pattern(offset, length)
    h.pwrite(data, offset)
    lo = max(0, (offset // CLUSTER - 1) * CLUSTER)
    hi = min(IMAGE_SIZE, ((offset + length) // CLUSTER + 2) * CLUSTER)
    expect = bytearray(read_at(image, lo, hi - lo))
    expect[offset - lo:offset - lo + length] = data
    assert h.pread(hi - lo, lo) == bytes(expect)
    h.shutdown()


def test_overlapping_writes_last_one_wins(snap):
    served, image = snap
    h = nbd_handle(served.uri)
    h.pwrite(b"A" * 3 * CLUSTER, CLUSTER // 2)
    h.pwrite(b"B" * 100, CLUSTER - 50)
    got = h.pread(4 * CLUSTER, 0)
    expect = bytearray(read_at(image, 0, 4 * CLUSTER))
    expect[CLUSTER // 2:CLUSTER // 2 + 3 * CLUSTER] = b"A" * 3 * CLUSTER
    expect[CLUSTER - 50:CLUSTER + 50] = b"B" * 100
    assert got == bytes(expect)
    h.shutdown()


def test_trim_and_zero_in_the_overlay(snap):
    served, image = snap
    h = nbd_handle(served.uri, meta=True)
    assert h.can_trim() and h.can_zero()
    h.trim(CLUSTER + 10, RANDOM[0] + 100)
    assert h.pread(CLUSTER + 10, RANDOM[0] + 100) == bytes(CLUSTER + 10)
    assert h.pread(100, RANDOM[0]) == read_at(image, RANDOM[0], 100)
    h.zero(3000, RANDOM[0] + 3 * CLUSTER + 1, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(3000, RANDOM[0] + 3 * CLUSTER + 1) == bytes(3000)
    h.zero(CLUSTER, RANDOM[0] + 6 * CLUSTER)
    assert h.pread(CLUSTER, RANDOM[0] + 6 * CLUSTER) == bytes(CLUSTER)
    # Writes into a hole of the image show up as data in block status.
    h.pwrite(b"x" * 10, HOLE1[0] + CLUSTER)
    got = []
    h.block_status(CLUSTER * 3, HOLE1[0],
                   lambda ctx, off, entries, err: got.extend(zip(entries[::2], entries[1::2],
                                                                 strict=True)))
    assert got[0] == (CLUSTER, 3)
    assert got[1][1] == 0  # the written cluster is data
    h.shutdown()


def test_write_past_end_in_snapshot(snap):
    served, _ = snap
    h = nbd_handle(served.uri, strict=False)
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 20, IMAGE_SIZE - 10)
    assert e.value.errnum == 28  # ENOSPC
    h.shutdown()


def test_cli_snapshot_leaves_the_image_byte_identical(rw_image, tmp_path):
    before = md5(rw_image)
    script = tmp_path / "writer.py"
    script.write_text(
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "data = bytes(range(256)) * 1000\n"
        "h.pwrite(data, 65536 - 1000)\n"
        "assert h.pread(len(data), 65536 - 1000) == data\n"
        "h.zero(1 << 20, 20 << 20)\n"
        "assert h.pread(1 << 20, 20 << 20) == bytes(1 << 20)\n"
        "h.trim(4096, 0)\n"
        "h.flush()\n"
        "print('writes seen')\n"
        "h.shutdown()\n")
    p = run_diskwatch([rw_image, "--snapshot", "--headless", "--run",
                       f'/usr/bin/python3 {script} "$uri"'])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "writes seen" in p.stdout
    assert md5(rw_image) == before


def test_zeroing_whole_clusters_writes_no_zeroes_to_the_overlay(tmp_path):
    """A guest discarding its disk must not fill /tmp with zeroes."""
    import os

    from diskwatch.sources.file import FileSource
    from diskwatch.sources.snapshot import Snapshot
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(64 * CLUSTER + 1000))  # a partial cluster at the end
    with Snapshot(FileSource(str(img), readonly=True), tmpdir=str(tmp_path)) as snap:
        offset, end = 100, snap.size  # unaligned start, up to the very end
        snap.zero(offset, end - offset, may_trim=True)
        assert snap.pread(0, offset) == img.read_bytes()[:offset]
        assert snap.pread(offset, end - offset) == bytes(end - offset)
        # Only the first, partial cluster was written; the rest are holes.
        assert os.fstat(snap.overlay_fd).st_blocks * 512 <= 2 * CLUSTER


def test_zeroing_with_no_hole_punches_no_hole(tmp_path):
    """NBD_CMD_FLAG_NO_HOLE (zero with may_trim false): the zeroed clusters
    stay allocated in the overlay (before: holes were punched anyway)."""
    import os

    from diskwatch.sources.file import FileSource
    from diskwatch.sources.snapshot import Snapshot
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(64 * CLUSTER))
    with Snapshot(FileSource(str(img), readonly=True), tmpdir=str(tmp_path)) as snap:
        snap.pwrite(0, os.urandom(32 * CLUSTER))
        allocated = os.fstat(snap.overlay_fd).st_blocks
        assert allocated * 512 >= 32 * CLUSTER
        snap.zero(0, 32 * CLUSTER, may_trim=False)
        assert snap.pread(0, 32 * CLUSTER) == bytes(32 * CLUSTER)
        assert os.fstat(snap.overlay_fd).st_blocks >= allocated
        snap.trim(0, 32 * CLUSTER)  # trim may punch
        assert os.fstat(snap.overlay_fd).st_blocks < allocated
        assert snap.pread(0, 32 * CLUSTER) == bytes(32 * CLUSTER)


def test_concurrent_writes_into_one_cluster_both_survive(tmp_path):
    """Over a blocking source requests run in worker threads: two copy-ups of
    the same cluster must not undo each other's write."""
    import os
    import threading

    from diskwatch.sources.file import FileSource
    from diskwatch.sources.snapshot import Snapshot
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(16 * CLUSTER))
    with Snapshot(FileSource(str(img), readonly=True), tmpdir=str(tmp_path)) as snap:
        for rnd in range(20):
            base = (rnd % 16) * CLUSTER
            barrier = threading.Barrier(8)

            def write(i, base=base, barrier=barrier):
                barrier.wait()
                snap.pwrite(base + i * 4096, bytes([i + 1]) * 4096)
            threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i in range(8):
                assert snap.pread(base + i * 4096, 4096) == bytes([i + 1]) * 4096, (rnd, i)
