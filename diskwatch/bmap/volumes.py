"""Partitions (DOS, GPT) and LVM2 logical volumes, read straight from a Source.

No appliance and no kernel: the tables are parsed here, and every volume is
named the way Linux (and so libguestfs, and so the watch method) names it:

- DOS: primary partitions ``/dev/sda1``..``/dev/sda4`` by their slot in the
  MBR, logical partitions ``/dev/sda5``, ``/dev/sda6``... in the order of the
  extended partition's EBR chain. The extended partition itself is a
  container, not a volume: it gets no entry (its EBRs stay ``v``).
- GPT: ``/dev/sdaN`` where N is the entry's index in the partition array + 1
  (empty entries keep their number, as in Linux).
- LVM2: ``/dev/VG/LV``. The physical volume's label and its text metadata
  (the same text ``vgcfgbackup`` writes) say where each LV's segments lie;
  a linear LV (every segment one stripe on a PV found) is a list of
  pieces of the disks, anything else (striped, mirror, raid, thin, a PV on
  a disk not mapped) is reported as not linear. The PVs are found by their
  UUID on whichever disk holds them (partitions, whole disks, md arrays):
  mapped together (``vm.find_vm_volumes``), the disks of a VM are one
  address space, each disk at its own base (``vm.py``).
- md RAID (``md.py``): ``/dev/md/NAME``; RAID1 is its first member's data
  with the others as mirrors, RAID0/10 their chunks.
- LUKS (``luks.py``): the encrypted payload is one object,
  ``/dev/mapper/luks-UUID`` (there is no key to read inside).

A volume is a list of linear *segments* ``(volume offset, disk offset,
length)``; ``VolumeSource`` reads a volume through them, so a filesystem
inside an LV is read like one in a partition.

Measured (why the metadata and not libguestfs for LVM): the partition table,
PV label and metadata text of the LVM test image are read and parsed in
0.11 ms (median of 50), with nothing installed; the libguestfs way (the watch
method's ``lvs``/``dmsetup table`` and segment probes) first needs its
appliance, 28-77 s to launch under TCG on this loaded 2-core machine, then
8.7 s for its devices phase.
"""

from __future__ import annotations

import re
import struct
import zlib

from ..sources.base import Source
from .luks import luks_volumes
from .md import md_volumes
from .segments import SECTOR, Volume, VolumeSource, read_at, through

__all__ = ["NO_FILESYSTEM", "SECTOR", "Volume", "VolumeSource", "assemble", "find_partitions", "find_volumes",
           "lvm_assemble", "lvm_volumes", "read_at", "through"]

_EXTENDED = {0x05, 0x0F, 0x85}
_LVM_TYPES = {0x8E}
_GPT_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
#: GPT partition types that hold no filesystem: nothing to map, nothing to warn about
_GPT_NO_FS = {
    "21686148-6449-6E6F-744E-656564454649": "bios-boot",  # GRUB's core image
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "msr",  # Microsoft reserved (every Windows GPT disk)
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "swap",
}
#: type hints of volumes that hold no filesystem
NO_FILESYSTEM = frozenset({"bios-boot", "msr", "swap", "dos-82"})
_GPT_SIGNATURE = b"EFI PART"


# --------------------------------------------------------------------------
# DOS and GPT


def _dos_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sectors) of the four entries of an MBR/EBR."""
    return [
        struct.unpack_from("<4xB3xII", sector, 446 + 16 * i) for i in range(4)
    ]


def _parse_dos(source: Source, disk: str, mbr: bytes, warnings: list[str]) -> list[Volume]:
    volumes: list[Volume] = []
    extended = None
    for slot, (ptype, lba, count) in enumerate(_dos_entries(mbr)):
        if ptype == 0 or count == 0:
            continue
        if ptype in _EXTENDED:
            extended = (lba, count)
            continue
        hint = "lvm" if ptype in _LVM_TYPES else f"dos-{ptype:02x}"
        volumes.append(Volume(f"{disk}{slot + 1}", "p", [(0, lba * SECTOR, count * SECTOR)], hint))
    if extended is not None:
        number = 5
        ext_start = extended[0]
        ebr_lba = ext_start
        seen = set()
        while ebr_lba and ebr_lba not in seen and len(seen) < 256:
            seen.add(ebr_lba)
            ebr = read_at(source, ebr_lba * SECTOR, SECTOR)
            if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
                warnings.append(f"{disk}: extended partition: no boot record at sector {ebr_lba}")
                break
            next_lba = 0
            for ptype, lba, count in _dos_entries(ebr)[:2]:
                if ptype == 0 or count == 0:
                    continue
                if ptype in _EXTENDED:
                    next_lba = ext_start + lba
                else:
                    hint = "lvm" if ptype in _LVM_TYPES else f"dos-{ptype:02x}"
                    start = (ebr_lba + lba) * SECTOR
                    volumes.append(Volume(f"{disk}{number}", "p", [(0, start, count * SECTOR)], hint))
                    number += 1
            ebr_lba = next_lba
    return volumes


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08X}-{b:04X}-{c:04X}-{raw[8:10].hex().upper()}-{raw[10:16].hex().upper()}"


def _parse_gpt(source: Source, disk: str, warnings: list[str]) -> list[Volume] | None:
    for sector in (512, 4096):
        header = read_at(source, sector, 92)
        if header[:8] == _GPT_SIGNATURE:
            break
    else:
        return None
    (entries_lba, count, entry_size) = struct.unpack_from("<QII", header, 72)
    if entry_size < 128 or count > 4096:
        warnings.append(f"{disk}: GPT header has a bad partition array ({count} x {entry_size})")
        return []
    table = read_at(source, entries_lba * sector, count * entry_size)
    (crc,) = struct.unpack_from("<I", header, 88)
    if len(table) < count * entry_size or zlib.crc32(table) != crc:
        warnings.append(f"{disk}: the GPT partition array's checksum is wrong; using it anyway")
    volumes = []
    for i in range(len(table) // entry_size):
        e = table[i * entry_size : (i + 1) * entry_size]
        if e[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last < first:
            continue
        guid = _guid(e[:16])
        hint = "lvm" if guid == _GPT_LVM else _GPT_NO_FS.get(guid, "gpt")
        volumes.append(
            Volume(f"{disk}{i + 1}", "p", [(0, first * sector, (last - first + 1) * sector)], hint)
        )
    return volumes


def disk_structures(source: Source, volumes: list[Volume]) -> dict[str, list[tuple[int, int]]]:
    """The partition table's own bytes, as structures of the disk: the MBR
    (``/$MBR``, the protective one of a GPT disk too), the GPT header and its
    partition array (``/$GPTHeader``, ``/$GPTEntries``) and their backup at the
    disk's end (``/$GPTBackup``), and the gap between the table and the
    first partition (``/$BootGap``: GRUB's core.img lives there). Nothing for
    a disk without a partition table; never raises for a bad one."""
    parts = [v for v in volumes if v.kind == "p" and v.segments]
    if not parts or any(v.kind == "v" for v in volumes):
        return {}
    out: dict[str, list[tuple[int, int]]] = {"/$MBR": [(0, SECTOR)]}
    table_end = SECTOR
    for sector in (512, 4096):
        header = read_at(source, sector, 92)
        if header[:8] != _GPT_SIGNATURE:
            continue
        (alternate,) = struct.unpack_from("<Q", header, 32)
        (entries_lba, count, entry_size) = struct.unpack_from("<QII", header, 72)
        if entry_size < 128 or count > 4096:
            break
        array_len = -(-count * entry_size // sector) * sector
        out["/$GPTHeader"] = [(sector, 2 * sector)]
        out["/$GPTEntries"] = [(entries_lba * sector, entries_lba * sector + array_len)]
        table_end = max(2 * sector, entries_lba * sector + array_len)
        backup = alternate * sector
        if array_len < backup < source.size:
            out["/$GPTBackup"] = [(backup - array_len, backup + sector)]
        break
    first = min(v.offset for v in parts)
    if first > table_end:
        out["/$BootGap"] = [(table_end, first)]
    return {name: [(s, min(e, source.size)) for s, e in ranges if s < min(e, source.size)]
            for name, ranges in out.items()}


def find_partitions(source: Source, disk: str = "/dev/sda") -> tuple[list[Volume], list[str]]:
    """The partitions of the disk, or the disk itself (one ``v`` volume)
    when it has no partition table. Returns (volumes, warnings); never
    raises for bad tables."""
    warnings: list[str] = []
    mbr = read_at(source, 0, SECTOR)
    parts: list[Volume] | None = None
    if len(mbr) == SECTOR and mbr[510:512] == b"\x55\xaa":
        entries = _dos_entries(mbr)
        if any(t == 0xEE for t, _, _ in entries):
            parts = _parse_gpt(source, disk, warnings)
            if parts is None:
                warnings.append(f"{disk}: protective MBR but no GPT header")
                parts = []
        elif _plausible_dos(mbr, entries, source.size):
            parts = _parse_dos(source, disk, mbr, warnings)
    if parts is None:
        gpt = _parse_gpt(source, disk, warnings)  # a GPT whose protective MBR was wiped
        parts = gpt if gpt is not None else []
    if not parts:
        # No partition table: the whole disk may be one filesystem (or PV).
        parts = [Volume(disk, "v", [(0, 0, source.size)], "whole")]
    return parts, warnings


def assemble(source: Source, parts: list[Volume], warnings: list[str]) -> list[Volume]:
    """What ``parts`` (partitions and whole disks, of one disk or of every
    disk of a VM, their segments on ``source``) hold that is a volume of its
    own: md RAID arrays (``md.py``), LVM logical volumes (their physical
    volumes found by UUID on any of ``parts`` or on an md array), LUKS
    containers' encrypted payload (``luks.py``). The members are marked
    (``type_hint``) so that no one walks them as filesystems."""
    arrays = md_volumes(source, parts, warnings)
    candidates = [v for v in parts + arrays if v.segments and v.type_hint != "linux_raid_member"]
    pvs = [v for v in candidates if is_lvm_pv(VolumeSource(source, v))]
    for v in pvs:
        v.type_hint = "LVM2_member"
    if len(pvs) > MAX_CONTAINERS:
        # each PV's text is read and parsed (up to MAX_LVM_TEXT): a table of
        # 4,096 overlapping partitions must not cost 4,096 of them
        warnings.append(f"{len(pvs)} LVM physical volumes: the first {MAX_CONTAINERS} are read")
        pvs = pvs[:MAX_CONTAINERS]
    lvs = lvm_assemble(source, pvs, warnings)
    taken = {id(v) for v in pvs}
    plain = [v for v in candidates + [lv for lv in lvs if lv.segments] if id(v) not in taken
             and v.type_hint != "LVM2_member"]
    return arrays + lvs + luks_volumes(source, plain[:MAX_CONTAINERS], warnings)


#: physical volumes (and LUKS headers) read at most in one map
MAX_CONTAINERS = 256


def find_volumes(source: Source, disk: str = "/dev/sda") -> tuple[list[Volume], list[str]]:
    """The partitions of the disk (or the disk itself when it has no
    partition table), then the volumes inside them (``assemble``: md
    arrays, LVM logical volumes, LUKS payloads) whose members are on this
    disk. Returns (volumes, warnings); never raises for bad tables."""
    parts, warnings = find_partitions(source, disk)
    return parts + assemble(source, parts, warnings), warnings


def _plausible_dos(mbr: bytes, entries: list[tuple[int, int, int]], size: int) -> bool:
    """A FAT or NTFS boot sector also ends in 55 AA; its "entries" are code
    and BPB bytes. Real entries have a boot flag of 0 or 0x80 (Linux's test),
    types, and fit the disk (roughly)."""
    if any(mbr[446 + 16 * i] not in (0, 0x80) for i in range(4)):
        return False
    used = [(t, lba, n) for t, lba, n in entries if t and n]
    if not used:
        return False
    return all(lba >= 1 and lba * SECTOR < max(size, 1) * 2 for _, lba, _ in used)


# --------------------------------------------------------------------------
# LVM2


_LABEL = b"LABELONE"
_MDA_MAGIC = b"\x20\x4c\x56\x4d\x32\x20\x78\x5b\x35\x41\x25\x72\x30\x4e\x2a\x3e"  # " LVM2 x[5A%r0N*>"


def is_lvm_pv(vol: Source) -> bool:
    head = read_at(vol, 0, 4 * SECTOR)
    return any(
        head[i * SECTOR : i * SECTOR + 8] == _LABEL and head[i * SECTOR + 24 : i * SECTOR + 32] == b"LVM2 001"
        for i in range(len(head) // SECTOR)
    )


def _pv_metadata(vol: Source) -> tuple[str, str]:
    """(PV uuid, the current metadata text) of an LVM2 physical volume."""
    head = read_at(vol, 0, 4 * SECTOR)
    for i in range(4):
        if head[i * SECTOR : i * SECTOR + 8] == _LABEL:
            label = head[i * SECTOR : (i + 1) * SECTOR]
            break
    else:
        raise ValueError("no LVM2 label")
    (content,) = struct.unpack_from("<I", label, 20)
    pvh = label[content:]
    uuid = pvh[:32].decode("ascii", "replace")
    pos = 40  # uuid[32], device size u64; then data areas, 0-terminated, then metadata areas
    areas: list[list[tuple[int, int]]] = [[], []]
    for which in (0, 1):
        while pos + 16 <= len(pvh):
            off, size = struct.unpack_from("<QQ", pvh, pos)
            pos += 16
            if off == 0:
                break
            areas[which].append((off, size))
    for mda_off, _ in areas[1]:
        mda = read_at(vol, mda_off, SECTOR)
        if mda[4:20] != _MDA_MAGIC:
            continue
        loc_off, loc_size = struct.unpack_from("<QQ", mda, 40)
        if loc_size == 0:
            continue
        if loc_size > MAX_LVM_TEXT:
            raise ValueError(f"metadata of {loc_size} bytes, over {MAX_LVM_TEXT}")
        text = read_at(vol, mda_off + loc_off, loc_size)
        return _format_uuid(uuid), text.rstrip(b"\0").decode("utf-8", "replace")
    raise ValueError("no LVM2 metadata area with metadata")


def _format_uuid(u: str) -> str:
    # LVM prints PV uuids as 6-4-4-4-4-4-6
    parts = [6, 4, 4, 4, 4, 4, 6]
    out, i = [], 0
    for n in parts:
        out.append(u[i : i + n])
        i += n
    return "-".join(out)


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[A-Za-z0-9_.+\-]+|[{}\[\]=,]|#[^\n]*')


def parse_lvm_text(text: str) -> dict:
    """LVM2's metadata text (``name { key = value ... }``) as nested dicts;
    values are ints, strings, or lists of them."""
    tokens = [t for t in _TOKEN.findall(text) if not t.startswith("#")]
    pos = 0

    def value():
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "[":
            items = []
            while tokens[pos] != "]":
                if tokens[pos] == ",":
                    pos += 1
                    continue
                items.append(value())
            pos += 1
            return items
        if t.startswith('"'):
            return t[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        try:
            return int(t)
        except ValueError:
            return t

    def block() -> dict:
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != "}":
            key = tokens[pos]
            pos += 1
            if pos < len(tokens) and tokens[pos] == "{":
                pos += 1
                out[key] = block()
                pos += 1  # "}"
            elif pos < len(tokens) and tokens[pos] == "=":
                pos += 1
                out[key] = value()
        return out

    return block()


#: the metadata text read at most (LVM's default area is 1 MiB; the text a
#: few KiB): a guest's label saying more is not believed
MAX_LVM_TEXT = 4 << 20


def _pv_of(source: Source, pv: Volume) -> tuple[str, dict]:
    uuid, text = _pv_metadata(VolumeSource(source, pv))
    try:
        return uuid, parse_lvm_text(text)
    except RecursionError:
        raise ValueError("metadata nested too deep") from None


def lvm_volumes(source: Source, pv: Volume) -> tuple[list[Volume], list[str]]:
    """The logical volumes of the one PV ``pv`` (``lvm_assemble`` of it alone)."""
    warnings: list[str] = []
    return lvm_assemble(source, [pv], warnings), warnings


def lvm_assemble(source: Source, pvs: list[Volume], warnings: list[str]) -> list[Volume]:
    """The logical volumes of the volume groups whose physical volumes are
    ``pvs`` (found by their UUID, on whichever disk they are): a linear LV
    (every segment one stripe on a PV found) is its pieces of the disks, in
    order; the others are returned with no segments and a note (the caller
    maps them another way or not at all). A volume group's metadata is the
    newest (highest ``seqno``) its PVs hold."""
    found: dict[str, Volume] = {}
    groups: dict[str, tuple[int, str, dict]] = {}
    for pv in pvs:
        try:
            uuid, meta = _pv_of(source, pv)
        except (ValueError, IndexError, OSError) as e:
            warnings.append(f"{pv.device}: LVM physical volume whose metadata cannot be read ({e})")
            continue
        if uuid in found:
            warnings.append(f"{pv.device}: LVM physical volume {uuid} is also {found[uuid].device}"
                            ": the second is not used")
            continue
        found[uuid] = pv
        for name, vg in meta.items():
            if not isinstance(vg, dict) or "physical_volumes" not in vg:
                continue
            key = str(vg.get("id", name))
            seqno = vg.get("seqno", 0)
            seqno = seqno if isinstance(seqno, int) else 0
            if key not in groups or seqno > groups[key][0]:
                groups[key] = (seqno, name, vg)
    out: list[Volume] = []
    for _, vg_name, vg in groups.values():
        try:
            pvdict = vg.get("physical_volumes", {})
            here = {name: found[p["id"]] for name, p in pvdict.items()
                    if isinstance(p, dict) and p.get("id") in found}
            out += _vg_lvs(source, here, vg_name, vg, warnings)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
            warnings.append(f"volume group {vg_name} whose metadata cannot be "
                            f"read ({type(e).__name__}: {e})"[:200])
    return out


def _linear_lvs(source: Source, pv: Volume, uuid: str, vg_name: str, vg: dict,
                warnings: list[str]) -> list[Volume]:
    """The LVs of ``vg`` with the one PV ``pv`` (whose UUID is ``uuid``) found."""
    pvs = vg.get("physical_volumes", {})
    here = {name: pv for name, p in pvs.items() if isinstance(p, dict) and p.get("id") == uuid}
    return _vg_lvs(source, here, vg_name, vg, warnings)


def _vg_lvs(source: Source, here: dict[str, Volume], vg_name: str, vg: dict,
            warnings: list[str]) -> list[Volume]:
    """The LVs of ``vg``; ``here``: its PVs found, by their name in ``vg``."""
    out: list[Volume] = []
    extent = int(vg.get("extent_size", 0)) * SECTOR
    pvs = vg.get("physical_volumes", {})
    pe_start = {name: int(p.get("pe_start", 0)) * SECTOR for name, p in pvs.items()
                if isinstance(p, dict)}
    lvs = vg.get("logical_volumes", {})
    for lv_name, lv in (lvs.items() if isinstance(lvs, dict) else ()):
        if not isinstance(lv, dict) or "VISIBLE" not in lv.get("status", []):
            continue
        device = f"/dev/{vg_name}/{lv_name}"
        if not _SAFE_NAME.fullmatch(f"{vg_name}/{lv_name}"):
            warnings.append(f"{device!r}: an LV name LVM would not make: not mapped"[:200])
            continue
        segments: list[tuple[int, int, int]] | None = []
        mirrors: list[list[tuple[int, int, int]]] = []
        why = ""
        for _key, seg in sorted(
            ((k, s) for k, s in lv.items() if k.startswith("segment") and isinstance(s, dict)),
            key=lambda ks: int(ks[1].get("start_extent", 0)),
        ):
            stripes = seg.get("stripes", [])
            if seg.get("type") != "striped" or seg.get("stripe_count") != 1 or len(stripes) != 2:
                why = f"{seg.get('type')} segment"
                segments = None
                break
            pv_name, first_pe = stripes
            pv = here.get(pv_name)
            if pv is None:
                why = "a segment on another disk (its physical volume is not on the disks mapped)"
                segments = None
                break
            start = int(seg["start_extent"]) * extent
            length = int(seg["extent_count"]) * extent
            inside = pe_start[pv_name] + int(first_pe) * extent  # offset in the PV
            # The metadata is the guest's: a segment is kept only inside
            # its PV (numbers past it overflowed the map, failing the
            # whole walk: found by tests/test_mapper_fuzz.py).
            if min(start, length, inside) < 0 or inside >= pv.size or start >= 1 << 62:
                why = "a segment outside the disk"
                segments = None
                break
            own, copies = through(pv, [(start, inside, min(length, pv.size - inside))])
            segments += own
            for i, m in enumerate(copies):
                if i < len(mirrors):
                    mirrors[i] += m
                else:
                    mirrors.append(m)
        if segments is None:
            out.append(Volume(device, "l", [], "lvm-not-linear", [f"not linear: {why}"]))
            warnings.append(f"{device}: not a linear LV ({why})")
        elif segments:
            out.append(Volume(device, "l", segments, "lvm", mirrors=mirrors))
    return out


#: names LVM makes (letters, digits, + _ . -); a device name holds no space or newline
_SAFE_NAME = re.compile(r"[A-Za-z0-9+_.\-]{1,128}/[A-Za-z0-9+_.\-]{1,128}")
