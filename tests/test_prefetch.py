"""--prefetch: a boot's ranges read ahead from a real nginx, in list order, and
the list made from a real recording (diskwatch/prefetch.py, sources/prefetch.py)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from test_source_curl import start_nginx, stop

from diskwatch.prefetch import (
    GRANULE,
    PrefetchError,
    PrefetchRange,
    read_prefetch_list,
    write_prefetch_list,
)
from diskwatch.sources.curl import CurlSource
from diskwatch.sources.prefetch import Prefetch

SIZE = 8 << 20


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not shutil.which("nginx"):
        pytest.fail("nginx is needed (Debian package nginx-light)")
    root = tmp_path_factory.mktemp("www")
    data = random.Random(7).randbytes(SIZE)
    (root / "disk.img").write_bytes(data)
    tmp = tmp_path_factory.mktemp("nginx")
    proc, port = start_nginx(tmp, root)
    yield f"http://127.0.0.1:{port}/disk.img", data, tmp / "access.log"
    stop(proc)


def _requests(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_listed_ranges_are_answered_from_what_was_fetched(site, tmp_path):
    url, data, log = site
    ranges = [(3 << 20, 1 << 20), (0, 2 * GRANULE), (6 << 20, 3 * GRANULE)]
    src = Prefetch(CurlSource(url), ranges)
    try:
        assert src.done.wait(30)
        before = _requests(log)
        for off, n in ranges:  # the guest reads them in pieces, as a boot does
            for o in range(off, off + n, 16384):
                assert src.pread(o, 16384) == data[o:o + 16384]
        assert _requests(log) == before, "a listed range went to the network again"
        assert src.hits == sum(n for _, n in ranges) and src.misses == 0
        assert src.pread(5 << 20, 4096) == data[5 << 20:(5 << 20) + 4096]  # not listed
        assert src.misses == 4096
    finally:
        src.close()


def test_the_budget_bounds_what_is_held(site):
    url, data, _ = site
    src = Prefetch(CurlSource(url), [(0, SIZE)], budget=2 << 20)
    try:
        for o in range(0, SIZE, 1 << 20):  # reading frees the budget: the fetchers go on
            assert src._held <= 2 << 20
            assert src.pread(o, 1 << 20) == data[o:o + (1 << 20)]
        assert src.done.wait(30)
        assert src.hits + src.misses == SIZE and src.fetched <= SIZE
    finally:
        src.close()


def test_a_list_round_trips_and_bad_lists_are_one_line(tmp_path):
    path = tmp_path / "boot.prefetch"
    write_prefetch_list(str(path), [PrefetchRange(GRANULE, GRANULE, 0.5, "f /dev/sda1 /x"),
                                    PrefetchRange(0, GRANULE, 1.0)], "boot.dwrec")
    assert read_prefetch_list(str(path)) == [(GRANULE, GRANULE), (0, GRANULE)]
    assert read_prefetch_list(str(path), size=GRANULE + 10) == [(GRANULE, 10), (0, GRANULE)]
    bad = tmp_path / "bad"
    bad.write_text("# diskwatch prefetch list 1\n12 x\n")
    with pytest.raises(PrefetchError, match=r"bad:2: expected"):
        read_prefetch_list(str(bad))
    bad.write_text("hello\n")
    with pytest.raises(PrefetchError, match="not a diskwatch prefetch list"):
        read_prefetch_list(str(bad))


def test_the_list_follows_the_first_reads_of_a_real_session(tmp_path):
    """qemu-io reads through diskwatch --record; the list has its reads in
    their order, merged by GRANULE, without what it wrote first, and the
    disk's short last piece is cut at the end."""
    from fixtures_server import run_diskwatch

    if not shutil.which("qemu-io"):
        pytest.fail("qemu-io is needed (Debian package qemu-utils)")
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(3).randbytes(SIZE - 4096))
    rec = tmp_path / "boot.dwrec"
    reads = "-c 'write 1M 64k' -c 'read 4M 100k' -c 'read 0 4k' -c 'read 1M 128k' " \
            f"-c 'read {SIZE - 8192} 4k'"
    p = run_diskwatch([image, "--snapshot", "--headless", "--no-trace", "--record", rec,
                       "--run", f"qemu-io -f raw $uri {reads}"])
    assert p.returncode == 0, p.stderr
    out = tmp_path / "boot.prefetch"
    p = run_diskwatch(["report", rec, "--prefetch-list", out])
    assert p.returncode == 0, p.stderr
    G = GRANULE
    assert read_prefetch_list(str(out)) == [
        (4 << 20, 2 * G),                 # 100k from 4M: two granules, first
        (0, G),                           # then the start
        ((1 << 20) + G, G),               # 1M..1M+64k was written first: left out
        (SIZE - G, G - 4096),             # the last piece, cut at the disk's end
    ]
