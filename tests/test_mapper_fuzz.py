"""Fuzzing the mapper (issue 18): filesystems a guest wrote, mutated where
the parsers look (partition tables, superblocks, inode tables, directories,
the journal, the MFT, the FAT, the ISO's directory records), walked by the
mapper process. Each walk answers a map that passes ``from_flat``'s checks or
fails in one line; the server's process never dies, hangs past the limits or
raises anything else.

Structure-aware where it matters: NTFS records keep their update-sequence
fixups valid (the last two bytes of every 512-byte sector of ``$MFT`` are
never touched, so a mutation reaches the attribute parsers instead of being
refused at the fixup check); ext4's checksums are not recomputed, which is
no obstacle: The Sleuth Kit does not verify them.

The same mutations are also fed to **updates** (incremental remaps): one
kept mapper process walks the image, then each round's mutated bytes are
"written" (they stay, round after round, as a guest's writes do) and
handed to an update as the written ranges; each update answers a patch
the server applies, falls back to the whole walk, or fails in one line.

``FUZZ_MAPPER`` walks (and updates) per image (CI's share: 12; ``make
fuzz``: 300). The seed of each walk is in the failure message:
``FUZZ_MAPPER_SEED`` replays it.
"""

from __future__ import annotations

import os
import random
import zlib
from collections import Counter

import pytest
from fixtures_images import DiskImage
from test_bmap_more_filesystems import iso  # noqa: F401 - the fixture (session scope)

from diskwatch.bmap.format import merge_ranges
from diskwatch.bmap.index import BlockMap
from diskwatch.bmap.metadata import map_metadata
from diskwatch.bmap.worker import MapperFailed, MapperLimits, MapperSession, run_mapper
from diskwatch.remap import remap
from diskwatch.sources.base import Layer
from diskwatch.sources.file import FileSource

WALKS = int(os.environ.get("FUZZ_MAPPER", "12"))
LIMITS = MapperLimits(memory=2 << 30, cpu=60, wall=60.0, idle=15.0)
#: what the mutations aim at: names of the structures a walk parses
TARGETS = ("/$MFT", "/$MFTMirr", "/$InodeTable", "/$GroupDescriptors", "/$Superblock",
           "/$Journal", "/$FAT1", "/$BootSector", "/$VolumeDescriptors", "/$PathTable")

pytestmark = pytest.mark.slow


class Mutated(Layer):
    """The disk with some bytes changed (a dict: offset -> byte), read only."""

    def __init__(self, inner, changes: dict[int, int]):
        super().__init__(inner)
        self.changes = changes
        self.sorted = sorted(changes)

    def pread(self, offset: int, length: int) -> bytes:
        data = self.inner.pread(offset, length)
        import bisect
        i = bisect.bisect_left(self.sorted, offset)
        if i == len(self.sorted) or self.sorted[i] >= offset + length:
            return data
        out = bytearray(data)
        while i < len(self.sorted) and self.sorted[i] < offset + length:
            at = self.sorted[i]
            out[at - offset] = self.changes[at]
            i += 1
        return bytes(out)


def _targets(path) -> list[tuple[int, int, bool]]:
    """(start, end, is the MFT) of what to mutate: the named structures, the
    directories, and the first MiB (partition tables, boot sectors)."""
    with FileSource(str(path), readonly=True) as src:
        meta = map_metadata(src, done_event=False)
    ranges = [(0, 1 << 20, False)]
    for e in meta.entries:
        if e.type == "d" or (e.type == "f" and e.path in TARGETS):
            ranges.append((e.start, e.end, e.path in ("/$MFT", "/$MFTMirr")))
    return ranges


def _mutation(rng: random.Random, targets, size: int) -> dict[int, int]:
    changes: dict[int, int] = {}
    for _ in range(rng.choice((1, 4, 16, 64))):
        start, end, mft = rng.choice(targets)
        end = min(end, size)
        if end <= start:
            continue
        at = rng.randrange(start, end)
        if mft and at % 512 >= 510:
            continue  # the fixup: kept, so the record is parsed
        changes[at] = rng.choice((0, 0xFF, rng.randrange(256), 0x80, 0x7F))
    return changes


def _fuzz(image: DiskImage, name: str) -> Counter:
    path = getattr(image, "path", image)
    targets = _targets(path)
    seeds = ([int(os.environ["FUZZ_MAPPER_SEED"])] if "FUZZ_MAPPER_SEED" in os.environ
             else [zlib.crc32(f"{name} {k}".encode()) for k in range(WALKS)])
    outcomes: Counter = Counter()
    with FileSource(str(path), readonly=True) as base:
        for seed in seeds:
            rng = random.Random(seed)
            source = Mutated(base, _mutation(rng, targets, base.size))
            try:
                answer = run_mapper(source, {}, limits=LIMITS)
            except MapperFailed as e:
                assert "\n" not in str(e), (seed, str(e))
                outcomes["failed: " + str(e).split(" (")[0][:60]] += 1
                print(f"{name}: FUZZ_MAPPER_SEED={seed}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - the finding: said with its seed
                pytest.fail(f"{name}: FUZZ_MAPPER_SEED={seed}: {type(e).__name__}: {e}")
            assert isinstance(answer.blockmap, BlockMap)
            answer.blockmap.lookup(0, base.size)  # usable whole
            outcomes["mapped"] += 1
    print(f"\n{name}: {dict(outcomes)}")
    return outcomes


def _fuzz_updates(image: DiskImage, name: str) -> Counter:
    path = getattr(image, "path", image)
    targets = _targets(path)
    seeds = ([int(os.environ["FUZZ_MAPPER_SEED"])] if "FUZZ_MAPPER_SEED" in os.environ
             else [zlib.crc32(f"{name} update {k}".encode()) for k in range(WALKS)])
    outcomes: Counter = Counter()
    with FileSource(str(path), readonly=True) as base:
        source = Mutated(base, {})
        session = MapperSession(source, limits=LIMITS)
        try:
            first = remap(source, None, session=session)
            assert first.error == "", first.error
            current = first.blockmap
            for seed in seeds:
                rng = random.Random(seed)
                new = _mutation(rng, targets, base.size)
                source.changes.update(new)  # written: they stay
                source.sorted = sorted(source.changes)
                dirty = merge_ranges([(at & ~4095, (at & ~4095) + 4096) for at in new])
                try:
                    result = remap(source, current, session=session, dirty=dirty)
                except Exception as e:  # noqa: BLE001 - the finding: said with its seed
                    pytest.fail(f"{name}: FUZZ_MAPPER_SEED={seed}: {type(e).__name__}: {e}")
                if result.error:
                    assert "\n" not in result.error, (seed, result.error)
                    outcomes["failed: " + result.error.split(" (")[0][:60]] += 1
                    print(f"{name} update: FUZZ_MAPPER_SEED={seed}: {result.error}")
                    continue
                current = result.blockmap
                current.lookup(0, base.size)  # usable whole
                outcomes["updated" if result.incremental is not None else
                         "whole walk: " + result.full_because[:40]] += 1
        finally:
            session.close()
    print(f"\n{name} updates: {dict(outcomes)}")
    return outcomes


@pytest.mark.parametrize("which", ["ext4_mbr_image", "gpt_fat_image", "ntfs_image"])
def test_mutations_written_while_watched_never_hurt_the_server(request, which):
    """The guest writes the mutations while the map follows it: updates."""
    outcomes = _fuzz_updates(request.getfixturevalue(which), which)
    assert sum(outcomes.values()) == WALKS


def test_mutated_ext4_images_never_hurt_the_server(ext4_mbr_image):
    outcomes = _fuzz(ext4_mbr_image, "ext4")
    assert sum(outcomes.values()) == WALKS


def test_mutated_gpt_and_fat_images_never_hurt_the_server(gpt_fat_image):
    outcomes = _fuzz(gpt_fat_image, "gpt+fat")
    assert sum(outcomes.values()) == WALKS


def test_mutated_ntfs_images_never_hurt_the_server(ntfs_image):
    outcomes = _fuzz(ntfs_image, "ntfs")
    assert sum(outcomes.values()) == WALKS


def test_mutated_lvm_images_never_hurt_the_server(lvm_image):
    outcomes = _fuzz(lvm_image, "lvm")
    assert sum(outcomes.values()) == WALKS


def test_mutated_iso9660_images_never_hurt_the_server(iso):  # noqa: F811
    """Rock Ridge and Joliet trees, their directory records, path tables and
    descriptors mutated: the walker diskwatch has of its own, and TSK's."""
    outcomes = _fuzz(iso, "iso9660")
    assert sum(outcomes.values()) == WALKS


def test_lvm_segments_past_the_disk_are_not_mapped_and_fail_nothing():
    """What the fuzzing found: LVM metadata (the guest's) with numbers past
    the disk overflowed the map and failed the whole walk. Such an LV is
    now 'not linear' with a note; the others are mapped, clipped to the disk."""
    from diskwatch.bmap.volumes import Volume, _linear_lvs

    class Disk:
        size = 1 << 30
    pv = Volume("/dev/sda2", "p", [(0, 1 << 20, (1 << 30) - (1 << 20))])
    vg = {"extent_size": 8192, "physical_volumes": {"pv0": {"id": "U", "pe_start": 2048}},
          "logical_volumes": {
              "huge": {"status": ["VISIBLE"], "segment1": {
                  "start_extent": 0, "extent_count": 10 ** 30, "type": "striped",
                  "stripe_count": 1, "stripes": ["pv0", 10 ** 25]}},
              "long": {"status": ["VISIBLE"], "segment1": {
                  "start_extent": 0, "extent_count": 10 ** 6, "type": "striped",
                  "stripe_count": 1, "stripes": ["pv0", 0]}},
              "ok": {"status": ["VISIBLE"], "segment1": {
                  "start_extent": 0, "extent_count": 10, "type": "striped",
                  "stripe_count": 1, "stripes": ["pv0", 4]}}}}
    warnings: list[str] = []
    lvs = {v.device: v for v in _linear_lvs(Disk(), pv, "U", "vg", vg, warnings)}
    assert lvs["/dev/vg/huge"].segments == [] and "outside the disk" in warnings[0]
    ((_, disk, length),) = lvs["/dev/vg/long"].segments
    assert disk + length == Disk.size  # clipped to the disk
    assert lvs["/dev/vg/ok"].segments == [(0, (1 << 20) + 2048 * 512 + 4 * 8192 * 512,
                                           10 * 8192 * 512)]


def test_structures_said_to_lie_past_the_volume_are_not_mapped(gpt_fat_image):
    """A finding of ``make fuzz`` (gpt+fat, seed 3207878809): group
    descriptors mutated to name bitmaps 2^63 bytes in; the map held ranges
    past 2^64 and the walk failed. They are not on the volume: dropped."""
    rng = random.Random(3207878809)
    with FileSource(str(gpt_fat_image.path), readonly=True) as base:
        source = Mutated(base, _mutation(rng, _targets(gpt_fat_image.path), base.size))
        answer = run_mapper(source, {}, limits=LIMITS)
        vol = gpt_fat_image.volume("/dev/sda1")
        assert all(end <= vol.offset + vol.length for start, end, obj in
                   answer.blockmap.iter_entries() if obj.device == "/dev/sda1")
