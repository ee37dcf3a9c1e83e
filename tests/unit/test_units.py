"""Sizes and rates as operators type them, and as we print them."""

from __future__ import annotations

import pytest

from transfer.errors import InvalidArgument
from transfer.units import GiB, KiB, MiB, TiB, format_size, parse_size


@pytest.mark.parametrize("text, value", [
    ("512", 512),
    ("4M", 4 * MiB),
    ("4m", 4 * MiB),
    ("1.5G", 3 * GiB // 2),
    ("1.5GiB", 3 * GiB // 2),
    ("100M/s", 100 * MiB),
    ("100 MiB/s", 100 * MiB),
    ("10KiB", 10 * KiB),
    ("10kb", 10 * KiB),
    ("2T", 2 * TiB),
    ("64B", 64),
    (" 7 K ", 7 * KiB),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "M", "4X", "1e6", "4 M B", "1,5G", "4M/h"])
def test_unparsable_sizes_are_refused(text):
    with pytest.raises(InvalidArgument, match="suffix"):
        parse_size(text, what="bandwidth limit")


@pytest.mark.parametrize("text", ["0", "0M", "0.1"])
def test_zero_is_refused(text):
    with pytest.raises(InvalidArgument, match="greater than zero"):
        parse_size(text)


def test_error_names_what_was_parsed():
    with pytest.raises(InvalidArgument) as e:
        parse_size("abc", what="chunk size")
    assert "invalid chunk size: 'abc'" in str(e.value)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (5 * MiB, "5.0 MiB"),
    (3 * GiB // 2, "1.5 GiB"),
    (2 * TiB, "2.0 TiB"),
    (2048 * TiB, "2048.0 TiB"),  # no unit past TiB
    (12.5 * MiB, "12.5 MiB"),   # rates are floats
])
def test_format_size(n, text):
    assert format_size(n) == text


def test_format_then_parse_round_trips_exact_sizes():
    for n in (KiB, 7 * MiB, 3 * GiB, 2 * TiB):
        value, unit = format_size(n).split()
        assert parse_size(value + unit) == n
