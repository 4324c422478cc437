"""LUKS containers, named as one object: there is no key to read inside.

A LUKS1 or LUKS2 volume is its header (the partition's own bytes: key
slots, and LUKS2's JSON metadata) and its encrypted payload, which is named
``/dev/mapper/luks-UUID`` (type ``l``), as systemd and udisks name the
opened device. A request into the payload then says "the encrypted data of
this container", not just the partition.

- LUKS1 (big-endian): magic ``LUKS\\xba\\xbe``, version 1 at 6,
  ``payloadOffset`` (sectors) at 104, ``uuid`` (40 bytes of text) at 168.
- LUKS2: the same magic and uuid, version 2, ``hdr_size`` (u64) at 8; the
  JSON metadata from 4 KiB to ``hdr_size``; its ``segments`` give each
  encrypted segment's ``offset`` and ``size`` (bytes, or "dynamic": to the
  volume's end).

The header is the guest's: sizes are bounded (``MAX_JSON``), offsets checked
against the volume, and the UUID kept only when it has a UUID's shape.
"""

from __future__ import annotations

import json
import re
import struct

from ..sources.base import Source
from .segments import SECTOR, Volume, VolumeSource, read_at, through

__all__ = ["MAX_JSON", "luks_volumes"]

_MAGIC = b"LUKS\xba\xbe"
#: LUKS2's header is at most 4 MiB (its JSON area a little less)
MAX_JSON = 4 << 20
_UUID = re.compile(r"[0-9A-Fa-f-]{8,40}")
#: payload segments of one container read at most
MAX_SEGMENTS = 64


def _payload(src: Source, size: int) -> list[tuple[int, int]] | str:
    """(offset, length) of the encrypted payload's segments, or what is wrong."""
    head = read_at(src, 0, 512)
    (version,) = struct.unpack_from(">H", head, 6)
    if version == 1:
        (payload,) = struct.unpack_from(">I", head, 104)
        if not 0 < payload * SECTOR < size:
            return f"a payload at sector {payload}"
        return [(payload * SECTOR, size - payload * SECTOR)]
    if version != 2:
        return f"version {version}"
    (hdr_size,) = struct.unpack_from(">Q", head, 8)
    if not 4096 < hdr_size <= MAX_JSON or hdr_size > size:
        return f"a header of {hdr_size} bytes"
    text = read_at(src, 4096, hdr_size - 4096).split(b"\0", 1)[0]
    try:
        meta = json.loads(text)
        segments = meta["segments"]
        out = []
        for _, seg in sorted(segments.items())[:MAX_SEGMENTS]:
            start = int(seg["offset"])
            length = size - start if seg.get("size") == "dynamic" else int(seg["size"])
            if not 0 < start < size or length <= 0:
                return f"a segment at {start} of {length} bytes"
            out.append((start, min(length, size - start)))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return f"its JSON metadata cannot be read ({type(e).__name__})"
    return out or "no segment"


def luks_volumes(source: Source, volumes: list[Volume], warnings: list[str]) -> list[Volume]:
    """The encrypted payload of each LUKS container among ``volumes``."""
    out = []
    for v in volumes:
        src = VolumeSource(source, v)
        try:
            head = read_at(src, 0, 512)
        except OSError:
            continue
        if head[:6] != _MAGIC or len(head) < 208:
            continue
        try:
            pieces = _payload(src, v.size)
        except OSError as e:
            pieces = f"it cannot be read ({e})"
        if isinstance(pieces, str):
            warnings.append(f"{v.device}: LUKS container with {pieces}: its payload is not "
                            "named"[:200])
            continue
        uuid = head[168:208].split(b"\0", 1)[0].decode("ascii", "replace")
        name = f"/dev/mapper/luks-{uuid}" if _UUID.fullmatch(uuid) else \
            f"/dev/mapper/luks-{v.device.rsplit('/', 1)[-1]}"
        own, mirrors = through(v, [(o, o, n) for o, n in pieces])
        # the volume's offsets are the container's: the payload starts at its own 0
        base = pieces[0][0]
        out.append(Volume(name, "l", [(o - base, d, n) for o, d, n in own], "luks-payload",
                          [f"LUKS payload of {v.device} (encrypted)"],
                          mirrors=[[(o - base, d, n) for o, d, n in m] for m in mirrors]))
    return out
