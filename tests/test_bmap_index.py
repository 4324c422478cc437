"""BlockMap: flattening overlapping ranges and naming the pieces of a request."""

from __future__ import annotations

import random
from bisect import bisect_right
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diskwatch.bmap.format import TYPE_RANK, BmapEntry, BmapFormatError, write_bmap
from diskwatch.bmap.index import BlockMap, BmapObject

KiB = 1024
MiB = 1024 * KiB

V = BmapObject("v", "/dev/sda")
P1 = BmapObject("p", "/dev/sda1")
ROOT = BmapObject("d", "/dev/sda1", "/")
BOOT = BmapObject("d", "/dev/sda1", "/Boot")


def entry(start: int, end: int, obj: BmapObject, disk: int = 1) -> BmapEntry:
    return BmapEntry(disk, start, end, obj.type, obj.device, obj.path)


def f(path: str, device: str = "/dev/sda1") -> BmapObject:
    return BmapObject("f", device, path)


def small_disk() -> list[BmapEntry]:
    """A 64 MiB disk: one partition from 1 MiB, a directory, three small files."""
    return [
        entry(0, 64 * MiB, V),
        entry(1 * MiB, 63 * MiB, P1),
        entry(2 * MiB, 2 * MiB + 4 * KiB, ROOT),
        entry(2 * MiB + 4 * KiB, 2 * MiB + 8 * KiB, BOOT),
        # three small files back to back, then a gap (free space) in the partition
        entry(3 * MiB, 3 * MiB + 40 * KiB, f("/Boot/BCD")),
        entry(3 * MiB + 40 * KiB, 3 * MiB + 80 * KiB, f("/Boot/bootmgr.exe.mui")),
        entry(3 * MiB + 80 * KiB, 3 * MiB + 120 * KiB, f("/Boot/BOOTSTAT.DAT")),
    ]


def test_object_str_is_bmaplogger_spelling() -> None:
    assert str(f("/Boot/BCD")) == "f /dev/sda1 /Boot/BCD"
    assert str(P1) == "p /dev/sda1"
    assert str(BmapObject("f", "/dev/sda2", "/Program Files (x86)/a b.txt")) == (
        "f /dev/sda2 /Program Files (x86)/a b.txt"
    )
    assert {f("/x"), f("/x")} == {f("/x")}  # hashable, equal by value


def test_128k_readahead_spanning_three_small_files_names_all_three() -> None:
    m = BlockMap(small_disk())
    start = 3 * MiB + 4 * KiB
    pieces = m.lookup(start, 128 * KiB)
    assert pieces == [
        (start, 3 * MiB + 40 * KiB, f("/Boot/BCD")),
        (3 * MiB + 40 * KiB, 3 * MiB + 80 * KiB, f("/Boot/bootmgr.exe.mui")),
        (3 * MiB + 80 * KiB, 3 * MiB + 120 * KiB, f("/Boot/BOOTSTAT.DAT")),
        (3 * MiB + 120 * KiB, start + 128 * KiB, P1),
    ]
    assert m.objects(start, 128 * KiB) == [
        f("/Boot/BCD"),
        f("/Boot/bootmgr.exe.mui"),
        f("/Boot/BOOTSTAT.DAT"),
        P1,
    ]
    assert m.first(start, 128 * KiB) == f("/Boot/BCD")
    assert m.most_specific(3 * MiB + 120 * KiB - 1, 2) == f("/Boot/BOOTSTAT.DAT")


def test_uncovered_bytes_are_reported_as_none() -> None:
    entries = [entry(0x1000, 0x2000, f("/a")), entry(0x3000, 0x4000, f("/b"))]
    m = BlockMap(entries)
    assert m.lookup(0, 0x5000) == [
        (0, 0x1000, None),
        (0x1000, 0x2000, f("/a")),
        (0x2000, 0x3000, None),
        (0x3000, 0x4000, f("/b")),
        (0x4000, 0x5000, None),
    ]
    assert m.lookup(0x10_0000_0000, 512) == [(0x10_0000_0000, 0x10_0000_0200, None)]
    assert m.first(0, 0x800) is None
    assert m.first(0, 0x1800) == f("/a")  # first piece that has an object
    assert m.first(0x2000, 0x1000) is None
    assert m.objects(0x1800, 0x2000) == [f("/a"), f("/b")]
    assert m.lookup(0x1000, 0) == [] and m.objects(0x1000, 0) == []


def test_empty_map() -> None:
    m = BlockMap([])
    assert len(m) == 0 and m.size_hint == 0
    assert m.lookup(123, 10) == [(123, 133, None)]
    assert m.first(123, 10) is None and m.partitions() == []


def test_precedence_f_over_d_over_l_over_p_over_v() -> None:
    lv = BmapObject("l", "/dev/vg/root")
    d = BmapObject("d", "/dev/vg/root", "/etc")
    file = BmapObject("f", "/dev/vg/root", "/etc/passwd")
    # each more specific object covers a smaller middle part of the last;
    # listed most specific first so entry order cannot be what decides
    m = BlockMap(
        [
            entry(40, 60, file),
            entry(30, 70, d),
            entry(20, 80, lv),
            entry(10, 90, P1),
            entry(0, 100, V),
        ]
    )
    assert [(s, e, o) for s, e, o in m.lookup(0, 100)] == [
        (0, 10, V),
        (10, 20, P1),
        (20, 30, lv),
        (30, 40, d),
        (40, 60, file),
        (60, 70, d),
        (70, 80, lv),
        (80, 90, P1),
        (90, 100, V),
    ]
    # a larger file still beats a small directory: type first, size second
    m2 = BlockMap([entry(0, 10, ROOT), entry(0, 1000, f("/big"))])
    assert m2.lookup(0, 10) == [(0, 10, f("/big"))]


def test_equal_types_smaller_range_wins_then_later_entry() -> None:
    m = BlockMap([entry(0, 100, f("/big")), entry(40, 50, f("/small")), entry(0, 100, f("/big2"))])
    assert m.lookup(0, 100) == [(0, 40, f("/big2")), (40, 50, f("/small")), (50, 100, f("/big2"))]


def test_adjacent_ranges_of_one_object_come_back_merged() -> None:
    # virt-bmap splits an object's ranges wherever other objects overlap it
    m = BlockMap(
        [entry(0, 0x100, P1), entry(0x100, 0x200, P1), entry(0x200, 0x300, P1), entry(0, 0x300, V)]
    )
    assert m.lookup(0x80, 0x200) == [(0x80, 0x280, P1)]
    assert m.segment_count == 2  # [0, 0x300) P1, then uncovered to the end
    assert m.ranges_of(P1) == [(0, 0x300)]


def test_partitions_ranges_of_len_and_size_hint() -> None:
    entries = small_disk() + [entry(5 * MiB, 5 * MiB + 4 * KiB, f("/Boot/BCD"))]
    m = BlockMap(entries)
    assert len(m) == len(entries)
    assert m.size_hint == 64 * MiB
    assert m.partitions() == [(0, 64 * MiB, V), (1 * MiB, 63 * MiB, P1)]
    assert m.ranges_of(f("/Boot/BCD")) == [
        (3 * MiB, 3 * MiB + 40 * KiB),
        (5 * MiB, 5 * MiB + 4 * KiB),
    ]
    assert m.ranges_of(f("/not/there")) == []


def test_other_disks_ignored_unless_chosen() -> None:
    entries = [entry(0, 100, V), entry(0, 50, f("/on-disk-2", "/dev/sdb1"), disk=2)]
    assert BlockMap(entries).lookup(0, 10) == [(0, 10, V)]
    assert BlockMap(entries, disk=2).lookup(0, 10) == [(0, 10, f("/on-disk-2", "/dev/sdb1"))]


def test_load_from_file_and_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "disk.bmap"
    write_bmap(p, small_disk())
    m = BlockMap.load(p)
    assert m.first(3 * MiB + 50 * KiB, 4 * KiB) == f("/Boot/bootmgr.exe.mui")
    # loading (plain tuples from the parser) indexes exactly like building from entries
    ref = BlockMap(small_disk())
    assert len(m) == len(ref) and m.partitions() == ref.partitions()
    assert m.lookup(0, 64 * MiB) == ref.lookup(0, 64 * MiB)
    bad = tmp_path / "bad.bmap"
    bad.write_bytes(b"1 0 1000 v /dev/sda\n1 0 1000 f /dev/sda1\n")
    with pytest.raises(BmapFormatError, match=r"bad\.bmap:2: missing PATH"):
        BlockMap.load(bad)


# -- property test against a brute-force, byte-by-byte reference --

DEVICES = ["/dev/sda", "/dev/sda1", "/dev/sda2", "/dev/vg/lv"]


def random_map(rng: random.Random, span: int) -> list[BmapEntry]:
    names = [BmapObject(t, rng.choice(DEVICES), None) for t in "vpl" for _ in range(2)]
    names += [BmapObject(t, "/dev/sda1", f"/{t}{i} x") for t in "df" for i in range(6)]
    entries = []
    for _ in range(rng.randint(0, 25)):
        obj = rng.choice(names)
        start = rng.randrange(span)
        # mostly small ranges, some large ones, like files inside partitions
        length = rng.randint(1, 6) if rng.random() < 0.6 else rng.randint(1, span)
        entries.append(entry(start, start + length, obj))
    # exact duplicates and back-to-back ranges of one object (fragments)
    if entries and rng.random() < 0.5:
        entries.append(rng.choice(entries))
    if entries and rng.random() < 0.5:
        e = rng.choice(entries)
        entries.append(BmapEntry(1, e.end, e.end + rng.randint(1, 5), e.type, e.device, e.path))
    return entries


def brute_force(entries: list[BmapEntry], offset: int, length: int) -> list:
    def winner(byte: int) -> BmapObject | None:
        best = None
        best_key: tuple[int, int, int] | None = None
        for i, e in enumerate(entries):
            if e.start <= byte < e.end:
                key = (TYPE_RANK[e.type], -(e.end - e.start), i)
                if best_key is None or key > best_key:
                    best, best_key = BmapObject(e.type, e.device, e.path), key
        return best

    pieces: list[list] = []
    for byte in range(offset, offset + length):
        obj = winner(byte)
        if pieces and pieces[-1][2] == obj:
            pieces[-1][1] = byte + 1
        else:
            pieces.append([byte, byte + 1, obj])
    return [tuple(p) for p in pieces]


def scaled(pieces: list, scale: int) -> list:
    return [(s * scale, e * scale, o) for s, e, o in pieces]


@pytest.mark.parametrize("scale", [1, 4096, 3 << 20])
def test_lookup_matches_brute_force_on_random_maps(scale: int) -> None:
    # The reference works byte by byte on small coordinates; with every
    # boundary a multiple of ``scale`` the answer is the same, scaled. Large
    # scales spread the map over many buckets of the index's coarse table.
    rng = random.Random(20140101 + scale)
    span = 60
    checked = 0
    for _ in range(300):
        units = random_map(rng, span)
        entries = [
            BmapEntry(1, e.start * scale, e.end * scale, e.type, e.device, e.path) for e in units
        ]
        m = BlockMap(entries)
        for _ in range(15):
            offset = rng.randrange(span + 10)
            length = rng.randint(1, span)
            expected = scaled(brute_force(units, offset, length), scale)
            got = m.lookup(offset * scale, length * scale)
            assert got == expected, (entries, offset * scale, length * scale)
            named = [o for _, _, o in expected if o is not None]
            assert m.first(offset * scale, length * scale) == (named[0] if named else None)
            assert m.objects(offset * scale, length * scale) == list(dict.fromkeys(named))
            best = max(named, key=lambda o: TYPE_RANK[o.type], default=None)
            assert m.most_specific(offset * scale, length * scale) == best
            checked += 1
    assert checked == 4500


def test_unaligned_requests_on_a_many_bucket_map() -> None:
    # requests that start and end inside segments, not on unit boundaries
    rng = random.Random(7)
    units = random_map(rng, 200) + [entry(i * 3, i * 3 + 2, f(f"/f{i}")) for i in range(60)]
    scale = 1 << 16
    entries = [
        BmapEntry(1, e.start * scale, e.end * scale, e.type, e.device, e.path) for e in units
    ]
    m = BlockMap(entries)
    for _ in range(2000):
        offset = rng.randrange(220 * scale)
        length = rng.randint(1, 8 * scale)
        got = m.lookup(offset, length)
        # check against the unit-level reference on the enclosing units
        lo, hi = offset // scale, -(-(offset + length) // scale)
        ref = scaled(brute_force(units, lo, hi - lo), scale)
        clipped = [
            (max(s, offset), min(e, offset + length), o)
            for s, e, o in ref
            if s < offset + length and e > offset
        ]
        assert got == clipped


# --- patches: what an incremental remap changes, at the cost of what changed ---

_DISK = 1 << 20


@st.composite
def _filesystem_map(draw):
    """A map shaped as a filesystem's: the disk, a partition, a structure
    (``/$MFT``) holding resident files' and directories' records, and files
    and directories elsewhere, no two of them sharing bytes."""
    mft_start = 4096 + draw(st.integers(1, 100)) * 512
    mft_end = mft_start + draw(st.integers(1, 50)) * 512
    entries = [BmapEntry(1, 0, _DISK, "v", "/dev/sda", None),
               BmapEntry(1, 4096, _DISK - 4096, "p", "/dev/sda1", None),
               BmapEntry(1, mft_start, mft_end, "f", "/dev/sda1", "/$MFT")]
    used: list[tuple[int, int]] = []
    objects = [("f", "/$MFT")]
    for k in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from("fd"))
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.booleans()):  # resident: one record inside /$MFT
                s = mft_start + draw(st.integers(0, (mft_end - mft_start) // 512 - 1)) * 512
                e = s + 512
            else:
                s = draw(st.integers(1, 1900)) * 512
                e = s + draw(st.integers(1, 8)) * 512
            if any(s < ue and e > us for us, ue in used):
                continue
            used.append((s, e))
            entries.append(BmapEntry(1, s, e, kind, "/dev/sda1", f"/o{k}"))
        objects.append((kind, f"/o{k}"))
    return entries, objects, used, (mft_start, mft_end)


@settings(max_examples=400, deadline=None)
@given(_filesystem_map(), st.data())
def test_a_patched_map_is_the_map_built_from_the_patched_entries(fs, data):
    """BlockMap.patched (incremental remaps) against a build of the same
    entries from scratch: segments, lookups and entries all equal."""
    entries, objects, used, (mft_start, mft_end) = fs
    blockmap = BlockMap(entries)
    gone = {BmapObject(t, "/dev/sda1", p) for t, p in data.draw(st.sets(st.sampled_from(objects)))}
    kept = [(s, e) for (s, e), x in zip(used, [x for x in entries[3:]], strict=False)
            if BmapObject(x.type, x.device, x.path) not in gone]
    fresh: list[tuple[int, int, BmapObject]] = []
    for k in range(data.draw(st.integers(0, 4))):
        if data.draw(st.booleans()):
            s = mft_start + data.draw(st.integers(0, (mft_end - mft_start) // 512 - 1)) * 512
            e = s + 512
        else:
            s = data.draw(st.integers(1, 1900)) * 512
            e = s + data.draw(st.integers(1, 8)) * 512
        if any(s < ue and e > us for us, ue in kept + [(f[0], f[1]) for f in fresh]):
            continue
        fresh.append((s, e, BmapObject(data.draw(st.sampled_from("fd")), "/dev/sda1", f"/new{k}")))
    patched = blockmap.patched(gone, fresh)
    built = BlockMap([x for x in entries if BmapObject(x.type, x.device, x.path) not in gone]
                     + [BmapEntry(1, s, e, o.type, o.device, o.path) for s, e, o in fresh])
    assert patched._bounds == built._bounds
    assert patched._seg_objs == built._seg_objs
    shift, bounds = patched._shift, patched._bounds
    covered = bounds[-2] if len(bounds) > 2 else 0
    assert list(patched._buckets) == [bisect_right(bounds, b << shift) - 1
                                      for b in range((covered >> shift) + 2)]
    for offset in range(0, _DISK, 2048):
        assert patched.lookup(offset, 4096) == built.lookup(offset, 4096)
    assert sorted(patched.iter_entries()) == sorted(built.iter_entries())
    assert patched.to_flat() == BlockMap.from_flat(patched.to_flat()).to_flat()
    # the map patched is left as it was
    assert blockmap.lookup(0, _DISK) == BlockMap(entries).lookup(0, _DISK)


def test_a_patch_cannot_add_what_a_map_cannot_hold():
    blockmap = BlockMap([BmapEntry(1, 0, _DISK, "v", "/dev/sda", None)])
    for bad in [(10, 10, BmapObject("f", "/dev/sda1", "/x")), (-1, 5, BmapObject("f", "/dev/sda1", "/x")),
                (0, 1 << 64, BmapObject("f", "/dev/sda1", "/x")), (0, 512, BmapObject("p", "/dev/sda1", None)),
                (0, 512, BmapObject("q", "/dev/sda1", "/x"))]:
        with pytest.raises(ValueError):
            blockmap.patched(set(), [bad])
