"""Linux md RAID arrays, read from their members' superblocks (mdadm's formats).

Where each array's bytes lie on its members, with no kernel and no mdadm::

    member (a partition or a whole disk)
    | 1.1: superblock at 0 | 1.2: at 4 KiB | ... data_offset ... data ... | 1.0 / 0.90: at the end |
                                           ^ array byte 0 (RAID1)

- **1.x** (``struct mdp_superblock_1``, little-endian; 1.2 is mdadm's
  default): magic ``0xa92b4efc`` at 0, ``set_uuid`` at 16, ``set_name`` at
  32 ("host:name"), ``level`` at 72, ``layout`` 76, ``size`` 80 (sectors of
  each member the array uses), ``chunksize`` 88 (sectors), ``raid_disks``
  92, ``data_offset`` 128 and ``data_size`` 136 (sectors, this member's),
  ``dev_number`` 160, ``events`` 200, ``max_dev`` 220, and from 256 the
  role of each device (``dev_roles[dev_number]``: its slot in the array;
  0xffff spare, 0xfffe faulty). Superblock at 0 (1.1), 4 KiB (1.2) or
  ``((sectors - 16) & ~7) * 512`` (1.0).
- **0.90** (``mdp_super_t``, 4 KiB of 32-bit words, the host's byte order:
  little-endian here) at ``(size & ~64 KiB-1) - 64 KiB``: level word 7,
  size (KiB) 8, raid_disks 10, md_minor 11, uuid words 5, 13-15, events
  39-40, layout 64, chunk_size (bytes) 65, this disk's descriptor at word
  992 (its slot: word 995). Data from the member's byte 0.

Named as udev names them: ``/dev/md/NAME`` (1.x's set_name without its
host), ``/dev/mdN`` (0.90's preferred minor). Supported: RAID1 (the first
member's data is read, every other member's is a mirror: a file's ranges
are named on each member, shifted by that member's data_offset), RAID0 and
RAID10 in the "near" layout (their chunks). Anything else (RAID4/5/6,
linear, RAID10 far/offset, members missing where there is no copy) is one
warning and no volume. Every number is the guest's: each is checked
against the member it is read from before it is used.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..sources.base import Source
from .segments import SECTOR, Volume, VolumeSource, read_at, through

__all__ = ["MAX_CHUNKS", "MdMember", "md_volumes", "read_member"]

MD_MAGIC = 0xA92B4EFC
#: pieces (chunks x copies) an array is cut into at most (RAID0/10: one
#: segment each, ~100 bytes): past this an array is not mapped, with a warning
MAX_CHUNKS = 1 << 18
#: members of one array at most (md's own limit for 1.x is 1920 roles)
MAX_DEVICES = 256
_NAME = re.compile(r"[A-Za-z0-9_.+\-]{1,64}")


@dataclass
class MdMember:
    """What one member's superblock says."""

    volume: Volume
    version: str  # "1.2", "1.1", "1.0", "0.90"
    uuid: str
    name: str  # the array's device: /dev/md/NAME, /dev/mdN
    level: int
    layout: int
    chunk: int  # bytes
    raid_disks: int
    role: int  # its slot in the array; -1 spare or faulty
    data_offset: int  # bytes from the member's start
    data_size: int  # bytes of data on this member
    size: int  # bytes of each member the array uses (RAID1/10)
    events: int


def _member_1x(vol: Volume, head: bytes, version: str, at: int) -> MdMember | str:
    if len(head) < 256:
        return "superblock cut short"
    (magic, major, _feat, _pad, uuid, name, _ctime, level, layout, size, chunk,
     raid_disks) = struct.unpack_from("<IIII16s32sQiIQII", head, 0)
    data_offset, data_size, _super = struct.unpack_from("<QQQ", head, 128)
    (dev_number,) = struct.unpack_from("<I", head, 160)
    (events,) = struct.unpack_from("<Q", head, 200)
    (max_dev,) = struct.unpack_from("<I", head, 220)
    if magic != MD_MAGIC or major != 1:
        return f"version {major} superblock"
    if not 1 <= raid_disks <= MAX_DEVICES or not 0 < max_dev <= (len(head) - 256) // 2 \
            or dev_number >= max_dev:
        return f"{raid_disks} devices, slot {dev_number} of {max_dev}"
    (role,) = struct.unpack_from("<H", head, 256 + 2 * dev_number)
    member_bytes = vol.size
    if data_offset * SECTOR >= member_bytes:
        return f"data offset {data_offset} sectors outside the member"
    text = name.split(b"\0", 1)[0].decode("ascii", "replace")
    short = text.rsplit(":", 1)[-1]
    device = f"/dev/md/{short}" if _NAME.fullmatch(short) else f"/dev/md/{uuid.hex()[:16]}"
    return MdMember(vol, version, uuid.hex(), device, level, layout, chunk * SECTOR, raid_disks,
                    role if role < raid_disks else -1, data_offset * SECTOR,
                    min(data_size * SECTOR, member_bytes - data_offset * SECTOR),
                    size * SECTOR, events)


def _member_090(vol: Volume, head: bytes) -> MdMember | str:
    if len(head) < 4096:
        return "superblock cut short"
    w = struct.unpack_from("<1024I", head, 0)
    if w[0] != MD_MAGIC or w[1] != 0 or w[2] != 90:
        return f"version {w[1]}.{w[2]} superblock"
    level = w[7] - (1 << 32) if w[7] >= 1 << 31 else w[7]
    raid_disks, minor, slot = w[10], w[11], w[995]
    if not 1 <= raid_disks <= 27 or minor > 1 << 20:
        return f"{raid_disks} devices, minor {minor}"
    uuid = struct.pack("<IIII", w[5], w[13], w[14], w[15]).hex()
    size = w[8] * 1024
    return MdMember(vol, "0.90", uuid, f"/dev/md{minor}", level, w[64], w[65], raid_disks,
                    slot if slot < raid_disks else -1, 0, min(size, vol.size), size,
                    (w[40] << 32) | w[39])


def read_member(source: Source, vol: Volume) -> MdMember | str | None:
    """The md superblock of ``vol``: None if it has none, a string (what is
    wrong) if it has one this cannot believe."""
    src = VolumeSource(source, vol)
    n = vol.size
    for version, at in (("1.2", 4096), ("1.1", 0), ("1.0", ((n // SECTOR - 16) & ~7) * SECTOR)):
        if at < 0 or at + 512 > n:
            continue
        head = read_at(src, at, 4096)
        if head[:4] == struct.pack("<I", MD_MAGIC):
            return _member_1x(vol, head, version, at)
    at = (n & ~0xFFFF) - 0x10000
    if at >= 0:
        head = read_at(src, at, 4096)
        if head[:4] == struct.pack("<I", MD_MAGIC):
            return _member_090(vol, head)
    return None


def md_volumes(source: Source, parts: list[Volume], warnings: list[str]) -> list[Volume]:
    """The md arrays whose members are among ``parts`` (marked
    ``linux_raid_member``), as volumes on the members' disks."""
    arrays: dict[str, list[MdMember]] = {}
    for v in parts[:4 * MAX_DEVICES]:  # four 4 KiB reads each, at most
        if not v.segments:
            continue
        try:
            m = read_member(source, v)
        except OSError as e:
            warnings.append(f"{v.device}: cannot be read ({e})"[:200])
            continue
        if m is None:
            continue
        v.type_hint = "linux_raid_member"
        if isinstance(m, str):
            warnings.append(f"{v.device}: md RAID member whose superblock is not believed ({m}): "
                            "not mapped"[:200])
            continue
        arrays.setdefault(m.uuid, []).append(m)
    out = []
    for members in arrays.values():
        vol = _array(members, warnings)
        if vol is not None:
            out.append(vol)
    return out


def _array(members: list[MdMember], warnings: list[str]) -> Volume | None:
    ref = max(members, key=lambda m: m.events)  # the newest superblock says what the array is
    name = ref.name
    slots: dict[int, MdMember] = {}
    for m in sorted(members, key=lambda m: -m.events):
        if m.role < 0:
            continue
        if m.role in slots:
            warnings.append(f"{name}: {m.volume.device} and {slots[m.role].volume.device} are "
                            f"both member {m.role}: the older is not used")
            continue
        slots[m.role] = m
    n = ref.raid_disks
    if not slots:
        warnings.append(f"{name}: no active member found: not mapped")
        return None
    if ref.level == 1:
        size = min([ref.size] + [m.data_size for m in slots.values()])
        if size <= 0:
            warnings.append(f"{name}: RAID1 of {ref.size} bytes: not mapped")
            return None
        copies = [through(m.volume, [(0, m.data_offset, size)]) for _, m in sorted(slots.items())]
        own, mirrors = copies[0][0], list(copies[0][1])
        for o, ms in copies[1:]:
            mirrors += [o, *ms]
        return Volume(name, "l", own, "md", [f"md RAID1 ({ref.version}), "
                                              f"{len(slots)} of {n} members"], mirrors=mirrors)
    if ref.level in (0, 10):
        return _striped(ref, slots, warnings)
    what = {-1: "linear", 4: "RAID4", 5: "RAID5", 6: "RAID6", -4: "multipath"}.get(
        ref.level, f"level {ref.level}")
    warnings.append(f"{name}: md {what} array: not supported (RAID1, RAID0 and RAID10 are): "
                    "not mapped")
    return None


def _striped(ref: MdMember, slots: dict[int, MdMember], warnings: list[str]) -> Volume | None:
    name, n, chunk = ref.name, ref.raid_disks, ref.chunk
    if chunk < 4096 or chunk > 1 << 30 or chunk & (chunk - 1):
        warnings.append(f"{name}: chunks of {chunk} bytes: not mapped")
        return None
    if ref.level == 0:
        near, label = 1, "RAID0"
        if len(slots) < n:
            warnings.append(f"{name}: RAID0 with {len(slots)} of its {n} members on these disks: "
                            "not mapped")
            return None
        per = min(m.data_size for m in slots.values()) // chunk
        if len({m.data_size // chunk for m in slots.values()}) > 1:
            warnings.append(f"{name}: RAID0 of members of different sizes: mapped as far as "
                            "the smallest goes")
        chunks = per * n
    else:
        near, far, offset = ref.layout & 0xFF, (ref.layout >> 8) & 0xFF, ref.layout >> 16
        label = f"RAID10 near={near}"
        if far != 1 or offset or not 1 <= near <= n:
            warnings.append(f"{name}: md RAID10 layout {ref.layout:#x} (far or offset copies): "
                            "not supported, only near copies are: not mapped")
            return None
        per = min(ref.size, *(m.data_size for m in slots.values())) // chunk
        chunks = per * n // near
    if chunks <= 0 or chunks * near > MAX_CHUNKS:
        warnings.append(f"{name}: {chunks} chunks of {near} copies (at most {MAX_CHUNKS} "
                        "pieces are mapped): not mapped")
        return None
    # Array chunk k's copy j is "raw" chunk k * near + j: member raw % n, at
    # its chunk raw // n (md's raid10 near layout; RAID0 is near=1).
    copies: list[list[tuple[int, int, int]]] = [[] for _ in range(near)]
    for k in range(chunks):
        for j in range(near):
            raw = k * near + j
            m = slots.get(raw % n)
            if m is None:
                continue
            own, more = through(m.volume, [(k * chunk, m.data_offset + raw // n * chunk, chunk)])
            copies[j] += own
            for extra in more:
                copies[j] += extra
    # Reads need every chunk once: the first copy present of each.
    primary: list[tuple[int, int, int]] = []
    by_start = [{s[0]: s for s in c} for c in copies]
    for k in range(chunks):
        seg = next((c[k * chunk] for c in by_start if k * chunk in c), None)
        if seg is None:
            warnings.append(f"{name}: {label} with chunk {k} on no member here: not mapped")
            return None
        primary.append(seg)
    chosen = set(primary)
    mirrors = [[s for s in c if s not in chosen] for c in copies]
    return Volume(name, "l", primary, "md", [f"md {label} ({ref.version}), {len(slots)} of "
                                             f"{n} members"],
                  mirrors=[sorted(m) for m in mirrors if m])
