"""virt-bmap's block-map text format: reading, writing, and the error messages."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from diskwatch.bmap.format import (
    TYPE_RANK,
    BmapEntry,
    BmapFormatError,
    format_entry,
    parse_bmap,
    read_bmap,
    write_bmap,
)

# Verbatim from the virt-bmap announcement (seeds/): what real files look like.
VIRT_BMAP_SAMPLE = b"""\
1 541000 541400 d /dev/sda1 /
1 541400 544400 d /dev/sda1 /lost+found
1 941000 941400 f /dev/sda1 /.vmlinuz-3.11.10-301.fc20.x86_64.hmac
1 941400 961800 f /dev/sda1 /config-3.11.10-301.fc20.x86_64
1 961800 995400 f /dev/sda1 /initrd-plymouth.img
1 b00400 ef1c00 f /dev/sda1 /grub2/themes/system/background.png
1 f00400 12f1c00 f /dev/sda1 /grub2/themes/system/fireworks.png
1 1300400 1590400 f /dev/sda1 /System.map-3.11.10-301.fc20.x86_64
"""

WINDOWS_PATH = "/Program Files (x86)/McAfee/Real Time/log0.txt"


def test_virt_bmap_output_loads_unchanged(tmp_path: Path) -> None:
    p = tmp_path / "fedora.bmap"
    p.write_bytes(VIRT_BMAP_SAMPLE)
    entries = read_bmap(p)
    assert len(entries) == 8
    assert entries[0] == BmapEntry(1, 0x541000, 0x541400, "d", "/dev/sda1", "/")
    assert entries[5] == BmapEntry(
        1, 0xB00400, 0xEF1C00, "f", "/dev/sda1", "/grub2/themes/system/background.png"
    )
    # and written back byte for byte (it is already sorted by start)
    out = io.BytesIO()
    write_bmap(out, entries)
    assert out.getvalue() == VIRT_BMAP_SAMPLE


def test_device_and_partition_lines_have_no_path() -> None:
    entries = parse_bmap([b"1 0 40000000 v /dev/sda\n", b"1 100000 200000 p /dev/sda1\n"])
    assert entries == [
        BmapEntry(1, 0, 0x40000000, "v", "/dev/sda", None),
        BmapEntry(1, 0x100000, 0x200000, "p", "/dev/sda1", None),
    ]


def test_hex_with_0x_prefix_and_upper_case_accepted() -> None:
    (e,) = parse_bmap([b"1 0x100000 0X2000AB l /dev/vg/lv"])
    assert (e.start, e.end, e.type, e.device) == (0x100000, 0x2000AB, "l", "/dev/vg/lv")


def test_old_examiner_lvm_lv_type_reads_as_l() -> None:
    # virt-bmap's examiner wrote LVs as "lvm_lv /dev/vg/lv"
    (e,) = parse_bmap([b"1 0 1000 lvm_lv /dev/fedora/root"])
    assert e == BmapEntry(1, 0, 0x1000, "l", "/dev/fedora/root", None)
    assert format_entry(e) == b"1 0 1000 l /dev/fedora/root\n"


def test_windows_path_with_spaces_round_trips(tmp_path: Path) -> None:
    e = BmapEntry(1, 0x7E5D000, 0x7E5F000, "f", "/dev/sda2", WINDOWS_PATH)
    p = tmp_path / "win.bmap"
    write_bmap(p, [e])
    assert p.read_bytes() == f"1 7e5d000 7e5f000 f /dev/sda2 {WINDOWS_PATH}\n".encode()
    assert read_bmap(p) == [e]


def test_non_utf8_bytes_and_trailing_spaces_round_trip(tmp_path: Path) -> None:
    # Latin-1 "café" as an old filesystem might store it, then two spaces,
    # a tab and a CR: all are path bytes, none may be lost or "cleaned up".
    raw_path = b"/data/caf\xe9 \xff\xfe dir/report  \t\r  "
    line = b"1 a000 b000 f /dev/sdb1 " + raw_path + b"\n"
    p = tmp_path / "latin1.bmap"
    p.write_bytes(line)
    (e,) = read_bmap(p)
    assert e.path is not None
    assert e.path.encode("utf-8", "surrogateescape") == raw_path
    assert e.path.endswith("  \t\r  ")
    out = tmp_path / "again.bmap"
    write_bmap(out, [e])
    assert out.read_bytes() == line


def test_path_keeps_leading_space_and_multiple_inner_spaces() -> None:
    # only one space separates DEVICE from PATH; the rest belongs to PATH
    (e,) = parse_bmap([b"1 0 10 d /dev/sda1  /odd  dir \n"])
    assert e.path == " /odd  dir "


def test_comments_and_blank_lines_skipped_and_line_numbers_still_count() -> None:
    lines = [
        b"# virt-bmap map of win7.img\n",
        b"\n",
        b"1 0 1000 v /dev/sda\n",
        b"   \n",
        b"#1 0 1000 f /dev/sda1 /commented-out\n",
        b"1 0 zz p /dev/sda1\n",
    ]
    with pytest.raises(BmapFormatError) as exc:
        parse_bmap(lines, "map.bmap")
    assert str(exc.value).startswith("map.bmap:6: ")
    assert parse_bmap(lines[:5]) == [BmapEntry(1, 0, 0x1000, "v", "/dev/sda", None)]


def test_str_lines_accepted() -> None:
    assert parse_bmap(["1 0 10 f /dev/sda1 /x y\n"]) == [
        BmapEntry(1, 0, 0x10, "f", "/dev/sda1", "/x y")
    ]


@pytest.mark.parametrize(
    "line, fragment",
    [
        (b"1 zz 100 f /dev/sda1 /a", "bad START 'zz'"),
        (b"1 0 1g0 f /dev/sda1 /a", "bad END '1g0'"),
        (b"1 -10 100 f /dev/sda1 /a", "bad START '-10'"),
        (b"1 1_0 100 f /dev/sda1 /a", "bad START '1_0'"),
        (b"1 0x 100 f /dev/sda1 /a", "bad START '0x'"),
        (b"x 0 100 f /dev/sda1 /a", "bad DISK 'x'"),
        (b"0 0 100 f /dev/sda1 /a", "disks are numbered from 1"),
        (b"1 200 100 f /dev/sda1 /a", "END 100 <= START 200"),
        (b"1 100 100 p /dev/sda1", "END 100 <= START 100"),
        (b"1 0 100 q /dev/sda1 /a", "unknown TYPE 'q'"),
        (b"1 0 100 F /dev/sda1 /a", "unknown TYPE 'F'"),
        (b"1 0 100", "missing field(s) TYPE DEVICE"),
        (b"1 0 100 f", "missing field(s) DEVICE"),
        (b"1", "missing field(s) START END TYPE DEVICE"),
        (b"1 0 100 f /dev/sda1", "missing PATH after DEVICE on a 'f' line"),
        (b"1 0 100 d /dev/sda1 ", "missing PATH after DEVICE on a 'd' line"),
        (b"1 0 100 p /dev/sda1 /boot", "unexpected text after DEVICE on a 'p' line: '/boot'"),
        (b"1 0 100 v /dev/sda ", "unexpected text after DEVICE on a 'v' line"),
        (b"1 0 100 l /dev/vg/lv extra", "unexpected text after DEVICE on a 'l' line"),
        (b"1  0 100 v /dev/sda", "empty START field"),
        (b"1 0 100 f  /a", "empty DEVICE field"),
    ],
)
def test_malformed_line_names_file_line_and_problem(
    tmp_path: Path, line: bytes, fragment: str
) -> None:
    p = tmp_path / "bad.bmap"
    p.write_bytes(b"# header\n1 0 1000 v /dev/sda\n" + line + b"\n1 0 10 p /dev/sda1\n")
    with pytest.raises(BmapFormatError) as exc:
        read_bmap(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:3: "), msg
    assert fragment in msg, msg
    assert "\n" not in msg
    assert exc.value.lineno == 3
    assert isinstance(exc.value, ValueError)


def test_error_message_stays_one_line_for_control_bytes() -> None:
    with pytest.raises(BmapFormatError) as exc:
        parse_bmap([b"1 0 10 \x1b[2J\r p /dev/sda1"], "m")
    assert "\n" not in str(exc.value) and "\x1b" not in str(exc.value)


def test_write_sorts_by_start_then_type_specificity() -> None:
    entries = [
        BmapEntry(1, 0x1000, 0x2000, "f", "/dev/sda1", "/a"),
        BmapEntry(1, 0x1000, 0x8000, "d", "/dev/sda1", "/"),
        BmapEntry(1, 0, 0x10000, "v", "/dev/sda", None),
        BmapEntry(1, 0x1000, 0x9000, "p", "/dev/sda1", None),
        BmapEntry(1, 0x800, 0x1000, "f", "/dev/sda1", "/b"),
    ]
    out = io.BytesIO()
    write_bmap(out, entries)
    assert out.getvalue().splitlines() == [
        b"1 0 10000 v /dev/sda",
        b"1 800 1000 f /dev/sda1 /b",
        b"1 1000 9000 p /dev/sda1",
        b"1 1000 8000 d /dev/sda1 /",
        b"1 1000 2000 f /dev/sda1 /a",
    ]
    assert sorted(TYPE_RANK, key=TYPE_RANK.__getitem__) == ["v", "p", "l", "d", "f"]


def test_write_to_text_stream() -> None:
    out = io.StringIO()
    write_bmap(out, [BmapEntry(1, 0, 0xABC, "f", "/dev/sda1", WINDOWS_PATH)])
    assert out.getvalue() == f"1 0 abc f /dev/sda1 {WINDOWS_PATH}\n"


@pytest.mark.parametrize(
    "entry",
    [
        BmapEntry(1, 0, 10, "f", "/dev/sda1", "/a\nb"),  # would split the line
        BmapEntry(1, 0, 10, "f", "/dev/sda1", None),
        BmapEntry(1, 0, 10, "p", "/dev/sda1", "/x"),
        BmapEntry(1, 0, 10, "f", "/dev/sd a1", "/x"),
        BmapEntry(1, 10, 10, "v", "/dev/sda", None),
        BmapEntry(1, 0, 10, "x", "/dev/sda", None),
        BmapEntry(0, 0, 10, "v", "/dev/sda", None),
    ],
)
def test_write_refuses_entries_it_could_not_read_back(entry: BmapEntry) -> None:
    with pytest.raises(ValueError):
        write_bmap(io.BytesIO(), [entry])


def test_entry_is_frozen_and_slotted() -> None:
    e = BmapEntry(1, 0, 10, "v", "/dev/sda", None)
    with pytest.raises(AttributeError):
        e.start = 5  # type: ignore[misc]
    assert not hasattr(e, "__dict__")
