"""XzSource against real xz files of a real ext4 image."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from diskwatch.sources.base import SourceError
from diskwatch.sources.xz import XzSource

MiB = 1 << 20
IMAGE_SIZE = 24 * MiB


def make_ext4_image(path: Path, tree: Path, size: int) -> None:
    """An ext4 image built from a directory tree: part text (compressible),
    part random (not), so blocks differ in compressed size."""
    rng = random.Random(6)
    # enough of a Linux root for libguestfs inspection (virt-inspector)
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("diskwatch-xz\n")
    (tree / "etc" / "fstab").write_text("/dev/sda / ext4 defaults 0 1\n")
    (tree / "etc" / "os-release").write_text(
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
        'VERSION_ID="12"\nVERSION="12 (bookworm)"\nID=debian\n')
    (tree / "etc" / "debian_version").write_text("12.5\n")
    for d in ("bin", "sbin", "usr/bin", "lib", "tmp", "root", "var/lib/dpkg"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "bin" / "sh").write_bytes(b"\x7fELF" + bytes(1000))
    (tree / "var/lib/dpkg/status").write_text(
        "Package: diskwatch-demo\nStatus: install ok installed\nVersion: 1.0-1\n"
        "Architecture: amd64\nDescription: a package virt-inspector can list\n\n")
    docs = tree / "usr" / "share" / "doc"
    docs.mkdir(parents=True)
    for i in range(40):
        words = " ".join(f"word{rng.randrange(5000)}" for _ in range(20000))
        (docs / f"doc{i}.txt").write_text(words)
    data = tree / "var" / "data"
    data.mkdir(parents=True)
    for i in range(6):
        (data / f"blob{i}.bin").write_bytes(rng.randbytes(rng.randrange(300_000, 1_500_000)))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(tree),
                    str(path), str(size // 1024) + "K"], check=True)


def xz_compress(src: Path, dst: Path, *args: str) -> Path:
    with open(dst, "wb") as out:
        subprocess.run(["xz", "-T1", "-1", "-c", *args, str(src)], stdout=out, check=True)
    return dst


@pytest.fixture(scope="module")
def xz_images(tmp_path_factory):
    """(raw image, xz with 1 MiB blocks, xz as one block)."""
    if not shutil.which("xz") or not shutil.which("mkfs.ext4"):
        pytest.fail("xz and mkfs.ext4 are needed (xz-utils, e2fsprogs)")
    d = tmp_path_factory.mktemp("xz")
    raw = d / "disk.img"
    make_ext4_image(raw, d / "tree", IMAGE_SIZE)
    blocks = xz_compress(raw, d / "disk-1M.img.xz", "--block-size=1MiB")
    single = xz_compress(raw, d / "disk-single.img.xz")
    return raw, blocks, single


def md5_of_source(src, chunk: int) -> str:
    h = hashlib.md5()
    for off in range(0, src.size, chunk):
        h.update(src.pread(off, min(chunk, src.size - off)))
    return h.hexdigest()


def test_blocks_follow_the_index(xz_images):
    raw, blocks, single = xz_images
    with XzSource(blocks) as src:
        assert src.size == raw.stat().st_size
        assert len(src.blocks) == IMAGE_SIZE // MiB
        assert all(b.size == MiB for b in src.blocks)
        assert src.warning is None
        assert not src.can_write and src.blocking
    with XzSource(single) as src:
        assert len(src.blocks) == 1 and src.size == IMAGE_SIZE


@pytest.mark.parametrize("chunk", [4096, 65536 + 512, 3 * MiB + 7])
def test_md5_of_everything_read_is_the_original(xz_images, chunk):
    raw, blocks, _ = xz_images
    original = hashlib.md5(raw.read_bytes()).hexdigest()
    with XzSource(blocks) as src:
        assert md5_of_source(src, chunk) == original


def test_single_block_file_works_and_says_how_to_recompress(xz_images):
    raw, _, single = xz_images
    with XzSource(single) as src:
        assert src.warning is not None
        assert "xz --block-size=16MiB" in src.warning
        assert md5_of_source(src, 1 * MiB) == hashlib.md5(raw.read_bytes()).hexdigest()
        assert src.misses == 1  # decompressed once, then served from the cache


def test_random_reads_match_the_original(xz_images):
    raw, blocks, _ = xz_images
    original = raw.read_bytes()
    rng = random.Random(42)
    with XzSource(blocks, cache_blocks=4) as src:
        for _ in range(300):
            off = rng.randrange(src.size)
            length = min(rng.choice([1, 512, 4096, 65536, 2 * MiB + 3]), src.size - off)
            assert src.pread(off, length) == original[off:off + length]
        # reads at the very edges
        assert src.pread(src.size - 1, 1) == original[-1:]
        assert src.pread(MiB - 1, 2) == original[MiB - 1:MiB + 1]
        assert src.pread(0, 0) == b""


def test_parallel_reads_decompress_each_block_once(xz_images):
    raw, blocks, _ = xz_images
    original = raw.read_bytes()
    with XzSource(blocks, cache_blocks=64) as src:
        def read(i):
            off = (i * 37 * 4096) % (src.size - 65536)
            return off, src.pread(off, 65536)
        with ThreadPoolExecutor(8) as pool:
            for off, data in pool.map(read, range(400)):
                assert data == original[off:off + 65536]
        # no block was decompressed twice, even when threads asked at once
        # (each one by the read that needed it or ahead of the reads)
        assert src.misses + src.readaheads == len(src.cached_blocks) <= len(src.blocks)
        assert src.evictions == 0


def test_lru_eviction_counts(xz_images):
    _, blocks, _ = xz_images
    with XzSource(blocks, cache_blocks=3, readahead=0) as src:  # the LRU alone
        for b in (0, 1, 2):
            src.pread(b * MiB, 10)
        assert (src.hits, src.misses, src.evictions) == (0, 3, 0)
        src.pread(0 * MiB + 100, 10)  # block 0 becomes most recently used
        assert (src.hits, src.misses) == (1, 3)
        src.pread(3 * MiB, 10)  # evicts block 1, the least recently used
        assert src.cached_blocks == [2, 0, 3]
        assert src.evictions == 1
        src.pread(1 * MiB, 10)  # miss again, evicts 2
        assert (src.hits, src.misses, src.evictions) == (1, 5, 2)
        assert src.cached_blocks == [0, 3, 1]
        # a read across 5 blocks with a 3-block cache still returns every byte
        data = src.pread(5 * MiB + 10, 4 * MiB)
        assert len(data) == 4 * MiB
        assert len(src.cached_blocks) == 3


def test_cache_prefetches_blocks(xz_images):
    _, blocks, _ = xz_images
    with XzSource(blocks, cache_blocks=8, readahead=0) as src:
        assert src.can_cache
        src.cache(2 * MiB + 5, 2 * MiB)  # touches blocks 2, 3, 4
        assert src.cached_blocks == [2, 3, 4]
        src.pread(3 * MiB, 4096)
        assert src.hits == 1


def test_view_for_answers_only_from_the_cache(xz_images):
    """The server asks view_for on its loop before it hands a read to a
    worker thread: a cached block answers (a copy), anything else is None,
    never a decompression on the loop."""
    raw, blocks, _ = xz_images
    original = raw.read_bytes()
    with CountingXzSource(blocks, readahead=0) as src:
        assert src.view_for(2 * MiB + 5, 4096) is None  # not cached
        assert src.decompressed == []
        src.pread(2 * MiB, 1)
        data = src.view_for(2 * MiB + 5, 4096)
        assert isinstance(data, bytes) and data == original[2 * MiB + 5:2 * MiB + 5 + 4096]
        assert src.hits == 1
        assert src.view_for(3 * MiB - 10, 20) is None  # runs into block 3, not cached
        assert src.view_for(src.size - 1, 2) is None  # past the end: the worker says EINVAL
        assert src.decompressed == [2]


def test_max_block_refused_with_a_clear_error(xz_images):
    _, blocks, single = xz_images
    with pytest.raises(SourceError) as e:
        XzSource(blocks, max_block=512 * 1024)
    assert e.value.errno == errno.EFBIG
    msg = str(e.value)
    assert "--xz-max-block" in msg and "1 MiB" in msg and "512 KiB" in msg
    assert "xz --block-size=16MiB" in msg and "\n" not in msg
    with pytest.raises(SourceError, match="block of 24 MiB"):
        XzSource(single, max_block=16 * MiB)
    # exactly at the limit is fine
    XzSource(blocks, max_block=MiB).close()


def test_concatenated_streams(xz_images, tmp_path):
    raw, blocks, single = xz_images
    both = tmp_path / "two-streams.xz"
    # two streams and stream padding between them, as xz itself accepts
    both.write_bytes(blocks.read_bytes() + b"\0" * 8 + single.read_bytes())
    assert subprocess.run(["xz", "-t", str(both)]).returncode == 0
    original = raw.read_bytes()
    with XzSource(both) as src:
        assert src.size == 2 * len(original)
        assert len(src.blocks) == IMAGE_SIZE // MiB + 1
        assert src.pread(IMAGE_SIZE - 100, 200) == original[-100:] + original[:100]


def test_not_an_xz_file(tmp_path, xz_images):
    raw, blocks, _ = xz_images
    with pytest.raises(SourceError, match="not a valid xz file") as e:
        XzSource(raw)
    assert e.value.errno == errno.EINVAL
    truncated = tmp_path / "truncated.xz"
    truncated.write_bytes(blocks.read_bytes()[:-16])
    with pytest.raises(SourceError, match="not a valid xz file"):
        XzSource(truncated)
    with pytest.raises(SourceError, match="cannot open") as e:
        XzSource(tmp_path / "missing.xz")
    assert e.value.errno == errno.ENOENT


def test_corrupt_block_is_an_eio_not_wrong_data(xz_images, tmp_path):
    _, blocks, _ = xz_images
    data = bytearray(blocks.read_bytes())
    with XzSource(blocks) as src:
        b = src.blocks[3]
    data[b.file_offset + 200] ^= 0xFF
    bad = tmp_path / "corrupt.xz"
    bad.write_bytes(bytes(data))
    with XzSource(bad) as src:
        src.pread(0, 4096)
        with pytest.raises(SourceError, match="corrupt") as e:
            src.pread(3 * MiB, 4096)
        assert e.value.errno == errno.EIO


def test_read_only_and_range_checked(xz_images):
    _, blocks, _ = xz_images
    with XzSource(blocks) as src:
        with pytest.raises(OSError) as e:
            src.pwrite(0, b"x")
        assert e.value.errno == errno.EROFS
        with pytest.raises(SourceError) as e:
            src.pread(src.size - 1, 2)
        assert e.value.errno == errno.EINVAL
    assert os.path.exists(blocks)


# -- through diskwatch itself ---------------------------------------------------

DISKWATCH = str(Path(sys.executable).with_name("diskwatch"))
GUESTFS_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


def test_diskwatch_serves_the_uncompressed_image(xz_images, tmp_path):
    raw, blocks, _ = xz_images
    out = tmp_path / "copy.raw"
    r = subprocess.run([DISKWATCH, str(blocks), "--headless", "--log", str(tmp_path / "trace"),
                        "--run", f'nbdcopy "$uri" {out}'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert hashlib.md5(out.read_bytes()).hexdigest() == hashlib.md5(raw.read_bytes()).hexdigest()
    assert "read" in (tmp_path / "trace").read_text()


def test_diskwatch_reads_ahead_with_nbdcopys_parallel_requests(xz_images, tmp_path):
    """4 MiB blocks: nbdcopy's requests in flight land a few blocks at a
    time, with read-ahead running beside them; every byte still right."""
    raw, _, _ = xz_images
    big = xz_compress(raw, tmp_path / "disk-4M.img.xz", "--block-size=4MiB")
    out = tmp_path / "copy.raw"
    r = subprocess.run([DISKWATCH, str(big), "--headless", "--xz-readahead", "2",
                        "--run", f'nbdcopy "$uri" {out}'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert hashlib.md5(out.read_bytes()).hexdigest() == hashlib.md5(raw.read_bytes()).hexdigest()
    r = subprocess.run([DISKWATCH, str(big), "--xz-readahead", "-1", "--headless",
                        "--run", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--xz-readahead must be 0 or more" in r.stderr and "Traceback" not in r.stderr


def test_diskwatch_refuses_a_large_block_in_one_line(xz_images):
    _, blocks, _ = xz_images
    r = subprocess.run([DISKWATCH, str(blocks), "--xz-max-block", "512K", "--headless",
                        "--run", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--xz-max-block" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_virt_inspector_on_an_xz_image(xz_images, tmp_path):
    """The seed's tip, with diskwatch as the captive server: virt-inspector
    examines the xz image without it being uncompressed on disk.
    (libguestfs 1.48 does not parse nbd+unix:// URIs, hence nbd://?socket=.)"""
    if not shutil.which("virt-inspector"):
        pytest.fail("virt-inspector is needed (libguestfs-tools)")
    _, blocks, _ = xz_images
    trace = tmp_path / "trace"
    r = subprocess.run(
        [DISKWATCH, str(blocks), "--headless", "--log", str(trace), "--run",
         'virt-inspector --format=raw -a "nbd://?socket=$unixsocket"'],
        capture_output=True, text=True, timeout=600, env={**os.environ, **GUESTFS_ENV})
    assert r.returncode == 0, r.stderr
    xml = r.stdout
    assert "<name>linux</name>" in xml and "<distro>debian</distro>" in xml
    assert "<hostname>diskwatch-xz</hostname>" in xml
    assert "<name>diskwatch-demo</name>" in xml  # read from /var/lib/dpkg/status
    assert "read 0x0-" in trace.read_text()


# -- read-ahead: sequential reads keep the cores busy ----------------------------

class CountingXzSource(XzSource):
    """The real source, noting how many blocks decompress at once."""

    def __init__(self, *args, **kw):
        self.running = 0
        self.peak = 0
        self.decompressed: list[int] = []
        self._count_lock = threading.Lock()
        super().__init__(*args, **kw)

    def _decompress(self, block):
        with self._count_lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.decompressed.append(block.offset // MiB)
        try:
            return super()._decompress(block)
        finally:
            with self._count_lock:
                self.running -= 1


def test_sequential_reads_decompress_ahead_each_block_once(xz_images):
    raw, blocks, _ = xz_images
    with CountingXzSource(blocks, readahead=2) as src:
        assert md5_of_source(src, 256 * 1024) == hashlib.md5(raw.read_bytes()).hexdigest()
        n = len(src.blocks)
        # made ahead of the reads, not while a read waited; none twice
        assert src.readaheads >= n - 2 and src.misses + src.readaheads == n
        assert sorted(src.decompressed) == list(range(n))
        # never more at once than read-ahead allows (the cores, by default)
        assert src.peak <= 2
        assert len(src.cached_blocks) <= src.cache_blocks


def test_random_reads_do_not_read_ahead(xz_images):
    raw, blocks, _ = xz_images
    original = raw.read_bytes()
    with CountingXzSource(blocks, readahead=2) as src:
        for b in (5, 12, 9, 20, 16):  # no read follows on from the block before
            off = b * MiB + 1000
            assert src.pread(off, 4096) == original[off:off + 4096]
        assert src.readaheads == 0 and src.misses == 5
        assert sorted(src.decompressed) == [5, 9, 12, 16, 20]


def test_readahead_is_bounded_by_the_cache(xz_images):
    _, blocks, _ = xz_images
    with XzSource(blocks) as src:
        assert 1 <= src.readahead <= min(4, src.cache_blocks // 2)
    with XzSource(blocks, cache_blocks=3, readahead=4) as src:
        assert src.readahead == 1  # read-ahead never evicts the block being read
    with XzSource(blocks, cache_blocks=1) as src:
        assert src.readahead == 0
    with pytest.raises(SourceError, match="--xz-readahead must be 0 or more") as e:
        XzSource(blocks, readahead=-1)
    assert e.value.errno == errno.EINVAL


def test_corrupt_block_met_by_read_ahead_is_still_an_eio(xz_images, tmp_path):
    raw, blocks, _ = xz_images
    original = raw.read_bytes()
    data = bytearray(blocks.read_bytes())
    with XzSource(blocks) as src:
        b = src.blocks[3]
    data[b.file_offset + 200] ^= 0xFF
    bad = tmp_path / "corrupt.xz"
    bad.write_bytes(bytes(data))
    with CountingXzSource(bad, readahead=2) as src:
        for off in range(0, 3 * MiB, 256 * 1024):  # sequential: block 3 is read ahead
            assert src.pread(off, 256 * 1024) == original[off:off + 256 * 1024]
        for _ in range(2):  # the read itself gets the error, every time
            with pytest.raises(SourceError, match="corrupt") as e:
                src.pread(3 * MiB, 4096)
            assert e.value.errno == errno.EIO
        assert src.pread(4 * MiB, 4096) == original[4 * MiB:4 * MiB + 4096]
        assert 3 not in src.cached_blocks


def test_close_while_reading_ahead(xz_images):
    raw, blocks, _ = xz_images
    src = CountingXzSource(blocks, readahead=2)
    assert src.pread(0, 4096) == raw.read_bytes()[:4096]  # starts block 1 ahead
    src.close()  # waits for the read-ahead before the file is closed
    assert src.running == 0 and src._fd == -1
    src.close()
