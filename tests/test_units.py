"""diskwatch.units: sizes, counts and durations, parsed and formatted once."""

from __future__ import annotations

import pytest

from diskwatch import text
from diskwatch.sources import parse_size as sources_parse_size
from diskwatch.sources.xz import _human as xz_size
from diskwatch.units import (
    GiB,
    KiB,
    MiB,
    count,
    format_bytes,
    format_bytes_compact,
    format_count_compact,
    format_duration,
    format_duration_compact,
    parse_size,
)


def test_format_bytes():
    assert format_bytes(0) == "0 B" and format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1 KiB" and format_bytes(1536) == "1.5 KiB"
    assert format_bytes(16 * MiB) == "16 MiB" and format_bytes(3 * GiB + 512 * MiB) == "3.5 GiB"
    assert format_bytes(2048 * 1024 * GiB) == "2048 TiB"  # TiB is the largest unit
    # in a sentence, xz says bytes
    assert xz_size(512) == "512 bytes" and xz_size(1536) == "1.5 KiB"


def test_format_bytes_compact():
    assert format_bytes_compact(0) == "0B" and format_bytes_compact(1536) == "1.5K"
    assert format_bytes_compact(64 * MiB) == "64M" and format_bytes_compact(10 * KiB) == "10K"
    assert format_bytes_compact(1023.7) == "1023B"
    for n in (0, 1000, 9.9 * KiB, 999 * MiB, 5000 * GiB):
        assert len(format_bytes_compact(n)) <= 5  # the UI's narrow columns


@pytest.mark.parametrize("n", [0, 1, 512, 1023, 1024, 1536, 4096, 65536, 10 * MiB,
                               1536 * MiB, 3 << 40])
def test_formatted_sizes_parse_back(n):
    assert parse_size(format_bytes(n).replace(" ", "")) == n
    assert parse_size(format_bytes(n)) == n


def test_parse_size():
    assert parse_size("512") == 512 and parse_size("64K") == 64 * KiB
    assert parse_size("1.5G") == 1536 * MiB and parse_size("2GiB") == 2 * GiB
    assert parse_size(" 3 mb ") == 3 * MiB
    for bad in ("", "K", "-1", "1.5.2", "12X", "1 KiBs"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    assert sources_parse_size is parse_size


def test_counts():
    assert count(1, "file") == "1 file" and count(0, "file") == "0 files"
    assert count(2, "directory", "directories") == "2 directories"
    assert text.count is count
    assert format_count_compact(9999) == "9999" and format_count_compact(12345) == "12.3k"
    assert format_count_compact(123_456_789) == "123M"
    assert format_count_compact(5 * 10**11) == "500G"


def test_durations():
    assert format_duration_compact(None) == "-" and format_duration_compact(45e-6) == "45µs"
    assert format_duration_compact(0.0123) == "12.3ms" and format_duration_compact(2) == "2.00s"
    assert format_duration(45e-6) == "45 µs" and format_duration(0.0123) == "12.3 ms"
    assert format_duration(2) == "2.00 s"
    # the two styles differ only by the space
    for s in (0, 1e-7, 9.9e-4, 1e-3, 0.5, 0.9999, 1, 75.25):
        assert format_duration(s).replace(" ", "") == format_duration_compact(s)


def test_the_old_formatters_are_gone():
    from diskwatch.sinks import stats, summary
    from diskwatch.sinks import text_trace as trace
    for module in (stats, trace, summary):
        assert not hasattr(module, "human_bytes"), module
