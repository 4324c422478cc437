"""The qcow2 translation attach uses (diskwatch/attach/qcow2map.py), against
qemu's own tools: ``qemu-img map --output=json`` for where each guest range
lies in the file, ``qemu-img convert -O raw`` for the guest's bytes, and
images with absurd header values refused in one line. Fast: images made
with qemu-img and qemu-io, no guest."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time

import pytest

from diskwatch.attach import qcow2map
from diskwatch.attach.qcow2map import Qcow2Refused, read_file_layout
from diskwatch.bmap.format import BmapEntry, is_structure_path
from diskwatch.bmap.index import BlockMap

MiB = 1024 * 1024


def qemu_io(image, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run([*args, str(image)], capture_output=True, text=True)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr


def make_overlay(tmp_path, cluster_size=65536, size=24 * MiB):
    """A raw base with a pattern, a qcow2 over it with writes scattered (out of
    order, so host order differs from guest order), a zeroed range and a
    write straddling two L2 tables (small clusters: many L2 tables)."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
    qemu_io(base, f"write -P 0x11 0 {size}", fmt="raw")
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    "-o", f"cluster_size={cluster_size}", str(top), str(size)], check=True)
    l2_span = cluster_size * cluster_size // 8
    writes = [(20 * MiB, 300 * 1024, 0x21), (1 * MiB, 64 * 1024, 0x22),
              (7 * MiB + 4096, 5000, 0x23), (0, 4096, 0x24)]
    if l2_span < size:
        writes.append((l2_span - 8192, 16384, 0x25))
    qemu_io(top, *[f"write -P {p:#x} {o} {n}" for o, n, p in writes],
            "write -z 12M 1M")
    return base, top


def qemu_img_map(image) -> list[dict]:
    r = subprocess.run(["qemu-img", "map", "--output=json", str(image)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


@pytest.mark.parametrize("cluster_size", [65536, 4096, 512])
def test_the_mapping_agrees_with_qemu_img_map(tmp_path, cluster_size):
    _, top = make_overlay(tmp_path, cluster_size)
    lay = read_file_layout(str(top))
    cs = lay.cluster_size
    assert cs == cluster_size
    truth: dict[int, int] = {}  # host cluster -> guest offset, from qemu-img map
    zeros = set()
    for e in qemu_img_map(top):
        if e["depth"] != 0:
            continue
        if e["data"]:
            for k in range(0, e["length"], cs):
                truth[e["offset"] + k] = e["start"] + k
        elif e["zero"]:
            zeros.update(range(e["start"], e["start"] + e["length"], cs))
    assert truth, "qemu-img map shows no data in the overlay"
    ours = {h + k: g + k for h, g, n in lay.runs for k in range(0, n, cs)}
    assert ours == truth
    for host, guest in truth.items():
        assert lay.guest_of(host + 17) == guest + 17
    assert {g for t in lay.zeros.values() for g in t} == zeros
    # Nothing maps where the structures are, and they are named.
    names = {name for _, _, name in lay.structures()}
    assert {qcow2map.HEADER, qcow2map.L1, qcow2map.L2, qcow2map.REFCOUNTS} <= names
    for s, e, _ in lay.structures():
        assert not any(s <= h < e for h in truth)
    assert lay.guest_of(0) is None


def test_the_guest_view_reads_what_qemu_img_convert_reads(tmp_path):
    base, top = make_overlay(tmp_path, 4096)
    raw = tmp_path / "converted.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(raw)], check=True)
    lay = read_file_layout(str(top))
    view = qcow2map.GuestView(str(top), lay, backing=str(base))
    try:
        want = raw.read_bytes()
        assert view.size == len(want)
        for off in range(0, len(want), 3 * MiB + 12345):
            n = min(2 * MiB, len(want) - off)
            assert view.pread(off, n) == want[off:off + n], off
        assert view.pread(0, len(want)) == want
    finally:
        view.close()


def test_host_offsets_are_named_with_the_guest_maps_objects(tmp_path):
    _, top = make_overlay(tmp_path, 65536)
    lay = read_file_layout(str(top))
    guest = BlockMap([
        BmapEntry(1, 0, 24 * MiB, "v", "/dev/sda"),
        BmapEntry(1, 1 * MiB, 24 * MiB, "p", "/dev/sda1"),
        BmapEntry(1, 20 * MiB, 20 * MiB + 200 * 1024, "f", "/dev/sda1", "/var/log/demo.log"),
        BmapEntry(1, 1 * MiB, 1 * MiB + 4096, "f", "/dev/sda1", "/$Superblock"),
    ])
    hmap = qcow2map.host_map(lay, guest)
    for h, g, n in lay.runs:
        for off in range(h, h + n, 4096):
            want = guest.most_specific(g + off - h, 1)
            assert hmap.most_specific(off, 1) == want, (off, g + off - h)
    host_log = next(h + 20 * MiB - g for h, g, n in lay.runs if g <= 20 * MiB < g + n)
    assert str(hmap.most_specific(host_log, 512)) == "f /dev/sda1 /var/log/demo.log"
    # The file's partition is kept under it (the heatmap's partitions).
    assert any(str(obj) == "p /dev/sda1" for *_, obj in hmap.partitions())
    header = hmap.most_specific(0, 512)
    assert str(header) == "f /dev/sda /$qcow2-header" and header.is_structure
    l1 = hmap.most_specific(lay.l1_offset, 8)
    assert l1.path == "/$qcow2-L1" and l1.is_structure
    l2 = hmap.most_specific(next(o for o in lay.l1 if o), 8)
    assert l2.path == "/$qcow2-L2"
    rt = hmap.most_specific(lay.refcount_table_offset, 8)
    assert rt.path == "/$qcow2-refcounts"
    assert all(is_structure_path(p) for p in (qcow2map.HEADER, qcow2map.L1, qcow2map.L2,
                                              qcow2map.REFCOUNTS, qcow2map.SNAPSHOTS))


def test_allocations_are_followed_when_the_tables_are_read_again(tmp_path):
    _, top = make_overlay(tmp_path, 4096)
    lay = read_file_layout(str(top))
    before = len(lay.runs)
    qemu_io(top, "write -P 0x31 16M 8192", "write -P 0x32 23M 4096")
    fd = os.open(top, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        # Only the L2 tables that cover the new clusters (and the L1 table) are read again.
        idx = {(16 * MiB) // (4096 * 512), (23 * MiB) // (4096 * 512)}
        lay.reread(lambda o, n: os.pread(fd, n, o), size, idx)
    finally:
        os.close(fd)
    fresh = read_file_layout(str(top))
    assert lay.runs == fresh.runs and len(lay.runs) > before
    assert any(g <= 16 * MiB < g + n for _, g, n in lay.runs)


# --- hostile images: one line, nothing done ----------------------------------------------


def patched(tmp_path, top, offset: int, fmt: str, value) -> str:
    bad = tmp_path / f"bad-{offset}-{value}.qcow2"
    data = bytearray(top.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    bad.write_bytes(data)
    return str(bad)


@pytest.mark.parametrize("offset, fmt, value, says", [
    (0, ">I", 0x514649FC, "not a qcow2 image"),
    (4, ">I", 7, "version 7"),
    (20, ">I", 40, "cluster_bits 40"),
    (20, ">I", 2, "cluster_bits 2"),
    (24, ">Q", 1 << 62, "virtual size"),
    (32, ">I", 1, "encrypted"),
    (36, ">I", 0xFFFFFFFF, "L1 table of 4294967295 entries"),
    (36, ">I", 0, "fewer than"),
    (40, ">Q", 1 << 50, "L1 table"),
    (40, ">Q", 65536 + 8, "not cluster-aligned"),
    (48, ">Q", 1 << 60, "refcount table"),
    (56, ">I", 0xFFFFFF, "refcount table of 16777215 clusters"),
    (60, ">I", 1 << 30, "snapshots"),
    (72, ">Q", 1 << 4, "extended L2"),
    (72, ">Q", 1 << 2, "external data file"),
    (72, ">Q", 1 << 1, "corrupt"),
    (72, ">Q", 1 << 40, "unknown incompatible features"),
    (96, ">I", 9, "refcount order 9"),
    (100, ">I", 1 << 20, "header length"),
    (8, ">Q", 65530, "backing file name"),
])
def test_absurd_headers_are_refused_in_one_line(tmp_path, offset, fmt, value, says):
    _, top = make_overlay(tmp_path, 65536)
    with pytest.raises(Qcow2Refused) as e:
        read_file_layout(patched(tmp_path, top, offset, fmt, value))
    text = str(e.value)
    assert says in text and "\n" not in text and text.startswith("qcow2 image: ")


def test_absurd_tables_are_refused(tmp_path):
    _, top = make_overlay(tmp_path, 65536)
    lay = read_file_layout(str(top))
    # An L1 entry pointing past the file, then at the header.
    first = next(i for i, o in enumerate(lay.l1) if o)
    for target, says in [(1 << 40, "outside the file"), (0x1FF00, "not cluster-aligned")]:
        bad = patched(tmp_path, top, lay.l1_offset + 8 * first, ">Q", target | (1 << 63))
        with pytest.raises(Qcow2Refused, match=says):
            read_file_layout(bad)
    # A compressed L2 entry.
    l2 = lay.l1[first]
    bad = patched(tmp_path, top, l2, ">Q", (1 << 62) | 0x50000)
    with pytest.raises(Qcow2Refused, match="compressed clusters"):
        read_file_layout(bad)
    # Random headers: refused or mapped, never anything else (bounded time and memory).
    import random
    rng = random.Random(20)
    data = top.read_bytes()
    for _ in range(300):
        fuzzed = bytearray(data)
        for _flip in range(rng.randint(1, 6)):
            fuzzed[rng.randrange(4, 112)] = rng.randrange(256)
        path = tmp_path / "fuzzed.qcow2"
        path.write_bytes(fuzzed)
        try:
            read_file_layout(str(path))
        except Qcow2Refused as e:
            assert "\n" not in str(e)


def test_the_follower_reads_the_tables_again_after_an_allocation(tmp_path):
    """The sink of attach/follow.py: a write outside the known data clusters
    (here the data and the L2 table qemu-io wrote) has the tables read again
    and a host map naming the new cluster swapped in; a write inside known
    data or a read changes nothing."""
    from diskwatch.attach.follow import open_view
    from diskwatch.events import Request
    from diskwatch.wire import Command
    _, top = make_overlay(tmp_path, 65536)
    guest = BlockMap([BmapEntry(1, 0, 24 * MiB, "p", "/dev/sda1"),
                      BmapEntry(1, 16 * MiB, 17 * MiB, "f", "/dev/sda1", "/new.bin")])
    view = open_view(str(top), readonly=False)
    source = view.open_source()
    try:
        assert source.size > os.path.getsize(top)  # room to grow
        first, more = view.views(guest)
        assert more == []
        swaps = []
        follower = view.follower(lambda bm, why: swaps.append((bm, why)))
        follower.tick(0.0)  # the first round reads the tables again: nothing new
        assert swaps == [] and not follower.dirty
        h, g, n = view.layout.runs[0]

        def req(command, offset, length, t):
            return Request(1, "", int(command), offset, length, 0, t, 0.0, 0)

        follower.feed([req(Command.WRITE, h, 4096, 1.0), req(Command.READ, 1 << 30, 4096, 1.0)],
                      None)
        assert not follower.dirty
        qemu_io(top, "write -P 0x41 16M 64k")
        fresh = read_file_layout(str(top))
        (host,) = [hh + 16 * MiB - gg for hh, gg, nn in fresh.runs if gg <= 16 * MiB < gg + nn]
        assert first.most_specific(host, 4096) is None  # not known yet
        # The new cluster's data comes first: the L1 is read again, nothing named yet
        # (QEMU writes the L2 entry later, at the guest's flush).
        follower.feed([req(Command.WRITE, host, 65536, 2.0)], None)
        assert follower.dirty
        follower.tick(2.0)
        assert swaps == []
        # Then the L2 table's write: read again, the new cluster named.
        follower.feed([req(Command.WRITE, view.layout.l1[0], 512, 2.1)], None)
        follower.tick(2.1)
        assert swaps == [] and follower.dirty  # not twice within REREAD_EVERY
        follower.tick(2.3)
        assert len(swaps) == 1, swaps
        bm, why = swaps[0]
        assert str(bm.most_specific(host, 4096)) == "f /dev/sda1 /new.bin"
        assert "+1 data clusters" in why
        assert view.layout.runs == fresh.runs
    finally:
        source.close()


# --- the live remap of a qcow2 guest's files (attach/follow.py with remap.py) ------------


def _changed_clusters(a, b, cs: int) -> list[tuple[int, bytes]]:
    """(guest offset, bytes of b) of each cluster where images a and b differ."""
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while (x := fa.read(cs)) or fb.peek(1):
            y = fb.read(cs)
            if x != y:
                out.append((off, y))
            off += cs
    return out


def test_a_file_the_guest_makes_is_named_by_the_live_remap_through_the_tables(tmp_path):
    """The guest's view is remapped in the mapper process and its map
    translated with the tables: a file made in the qcow2 (by debugfs, the
    changed clusters written with qemu-io, as QEMU would write them: each
    new cluster's data, then the L2 table) is named at the host offsets
    qemu-img map and debugfs say, in the image file's map and (guest
    offsets) the backing's; the writes given to the remapper are in guest
    offsets, those of new clusters once the tables place them."""
    from groundtruth import ext4_file_ranges

    from diskwatch.attach.follow import open_view
    from diskwatch.demo.guest import make_partition_table, mkfs_ext4_at
    from diskwatch.events import Request
    from diskwatch.remap import Remapper, remap
    from diskwatch.wire import Command
    size = 24 * MiB
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(size)
    ((part, length),) = make_partition_table(base, "dos", [(None, "83")])
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("guest\n")
    mkfs_ext4_at(base, part, length, tree)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top)], check=True)
    # What the guest will write: base with a new file, made by debugfs.
    after = tmp_path / "after.raw"
    after.write_bytes(base.read_bytes())
    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(150_000))
    subprocess.run(["debugfs", "-w", "-R", f"write {local} /made-later.bin",
                    f"{after}?offset={part}"], check=True, capture_output=True)
    truth = ext4_file_ranges(after, part, ["/made-later.bin"])["/made-later.bin"]

    view = open_view(str(top), readonly=False, backing=str(base), backing_size=size)
    source = view.open_source()
    first = remap(view.map_source(), None, why="test").blockmap
    assert first is not None and first.most_specific(truth[0][0], 4096).type == "p"
    view.views(first)
    swaps, takes, backings, said = [], [], [], []
    follower = view.follower(lambda bm, why: swaps.append((bm, why)))
    guest = view.map_source()
    remapper = Remapper(guest, current=lambda: view.guest_map, swap=follower.take_remap,
                        say=lambda text, level: said.append(text), disk="/dev/sda")
    fed: list = []
    feed = remapper.feed

    def spy(batch, pieces):
        fed.extend(p for ps in pieces for p in ps)
        feed(batch, pieces)
    remapper.feed = spy
    follower.remap_with(remapper, guest, takes.append, lambda bm, why: backings.append(bm))
    try:
        follower.tick(time.monotonic())  # the first round: tables read, the first walk
        assert remapper.wait(60)
        follower.tick(time.monotonic())
        assert takes == [] and swaps == []  # the first walk is not swapped in
        cs = view.layout.cluster_size
        changed = _changed_clusters(base, after, cs)
        assert changed
        for k, (_, data) in enumerate(changed):
            (tmp_path / f"c{k}").write_bytes(data)
        qemu_io(top, *[f"write -s {tmp_path / f'c{k}'} {g} {cs}"
                       for k, (g, _) in enumerate(changed)])
        fresh = read_file_layout(str(top))

        def req(offset, length):
            return Request(1, "", int(Command.WRITE), offset, length, 0, time.monotonic(),
                           0.0, 0)
        # The new clusters' data first: no run holds it yet, nothing handed on.
        data = [req(h + k, cs) for h, _, n in fresh.runs for k in range(0, n, cs)]
        follower.feed(data, None)
        assert fed == [] and len(follower.pending) == len(data)
        # Then the L2 table (new too): the tables are read again and place them.
        follower.feed([req(fresh.l1[0], cs)], None)
        deadline = time.monotonic() + 60
        while not takes:
            assert time.monotonic() < deadline, (said, swaps, follower.pending)
            follower.tick(time.monotonic())
            remapper.wait(0.05)
        assert follower.pending == [] and follower.unknown == 0
        # What the remapper was told: guest offsets, the file's data among them.
        assert all(0 <= s < e <= size for s, e, _ in fed)
        assert any(s <= truth[0][0] < e for s, e, _ in fed)
        assert swaps and "qcow2 tables read again" in swaps[0][1]
        result = takes[-1]
        assert "/made-later.bin" in said[-1], said
        host_of = {e["start"] + k: e["offset"] + k
                   for e in qemu_img_map(top) if e["depth"] == 0 and e["data"]
                   for k in range(0, e["length"], 512)}
        for start, end in truth:
            for g in range(start, end, 4096):
                h = host_of[g]
                assert str(result.blockmap.most_specific(h, 4096)) == \
                    "f /dev/sda1 /made-later.bin", (g, h)
                # before the remap, the tables alone named it as the partition
                assert swaps[0][0].most_specific(h, 4096).type == "p"
                assert str(backings[-1].most_specific(g, 4096)) == "f /dev/sda1 /made-later.bin"
        assert view.guest_map is backings[-1] and view.host is result.blockmap
    finally:
        follower.close()
        source.close()


def test_host_ranges_split_into_guest_ones_bounded(tmp_path, monkeypatch):
    """``Layout.to_guest`` against qemu-img map (every data run's guest
    offset, the bytes no run holds), in at most ``most`` pieces; the
    follower keeps at most PENDING_KEPT writes the tables do not place yet
    (a guest writing everywhere past the file's end): the rest is told to the
    remapper as unknown (counted unnamed; its next remap the whole walk)."""
    from diskwatch.attach import follow
    from diskwatch.events import Request
    from diskwatch.remap import Remapper
    from diskwatch.wire import Command
    _, top = make_overlay(tmp_path, 4096)
    lay = read_file_layout(str(top))
    truth = {e["offset"] + k: e["start"] + k for e in qemu_img_map(top)
             if e["depth"] == 0 and e["data"] and "offset" in e
             for k in range(0, e["length"], 512)}
    end = os.path.getsize(top)
    guest, rest = lay.to_guest(0, end + 8192, most=1 << 20)
    placed = {h for h in range(0, end + 8192, 512)} - {
        h for s, e in rest for h in range(s, e, 512)}
    assert placed == set(truth)
    flat = [g for s, e in guest for g in range(s, e, 512)]
    assert flat == [truth[h] for h in sorted(truth)]
    assert lay.to_guest(0, end, most=2) is None
    assert lay.in_structure(0, 512) and lay.in_structure(lay.l1_offset, lay.l1_offset + 8)
    assert not lay.in_structure(*next((h, h + 512) for h in truth))

    view = follow.Qcow2View(str(top), lay, readonly=True)
    view.views(BlockMap([BmapEntry(1, 0, 24 * MiB, "p", "/dev/sda1")]))
    follower = view.follower(lambda bm, why: None)
    remapper = Remapper(None, current=lambda: view.guest_map, swap=follower.take_remap,
                        say=lambda text, level: None)
    follower.remap_with(remapper, view.map_source(), lambda result: None)
    try:
        far = end + (1 << 20)
        flood = [Request(1, "", int(Command.WRITE), far + k * 8192, 4096, 0, 1.0, 0.0, 0)
                 for k in range(follow.PENDING_KEPT + 10)]
        follower.feed(flood, None)
        assert len(follower.pending) == follow.PENDING_KEPT
        assert follower.unknown == 10 * 4096 and remapper.unnamed == 10 * 4096
        # A write over more runs than MAX_PIECES: unknown, whole.
        monkeypatch.setattr(follow, "MAX_PIECES", 2)
        follower.feed([Request(1, "", int(Command.WRITE), 0, end, 0, 1.0, 0.0, 0)], None)
        assert follower.unknown == 10 * 4096 + end
    finally:
        follower.close()
