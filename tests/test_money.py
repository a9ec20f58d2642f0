"""Amounts: decimal strings in asset units <-> integers in base units, never floats."""

from __future__ import annotations

import pytest

from watcher.errors import InvalidAmount
from watcher.money import MAX_UINT256, format_amount, parse_amount


@pytest.mark.parametrize("text,decimals,units", [
    ("12.5", 6, 12_500_000),
    ("0.000001", 6, 1),
    ("1", 18, 10**18),
    ("1.234567890123456789", 18, 1234567890123456789),
    ("007.10", 2, 710),
    ("5", 0, 5),
    ("115792089237316195423570985008687907853269984665640564039457.584007913129639935", 18, MAX_UINT256),
])
def test_parse_and_format_round_trip(text, decimals, units):
    assert parse_amount(text, decimals) == units
    assert parse_amount(format_amount(units, decimals), decimals) == units


@pytest.mark.parametrize("value,problem", [
    ("0", "greater than zero"), ("0.000", "greater than zero"), ("-1", "not a non-negative"),
    ("1.0000001", "more than 6 decimal places"), ("1e3", "not a non-negative"), ("", "not a non-negative"),
    (" ", "not a non-negative"), (" 1", "not a non-negative"), ("1\n", "not a non-negative"),
    ("\uff11", "not a non-negative"), ("\u0661", "not a non-negative"), ("NaN", "not a non-negative"), ("1,5", "not a non-negative"), (".5", "not a non-negative"),
    (1.5, "decimal string"), (5, "decimal string"), (True, "decimal string"), (None, "decimal string"),
    ("1" * 80, "too large"),
])
def test_bad_amounts(value, problem):
    with pytest.raises(InvalidAmount, match=problem):
        parse_amount(value, 6)


def test_format():
    assert format_amount(12_500_000, 6) == "12.5"
    assert format_amount(0, 18) == "0"
    assert format_amount(10**18, 18) == "1"
    assert format_amount(-5, 2) == "-0.05"
    with pytest.raises(TypeError):
        format_amount(1.5, 6)  # type: ignore[arg-type]


@pytest.mark.parametrize("ms", [0, 1, 999, 1000, 59_999, 951_782_399_999, 1_764_000_000_123, 4_102_444_799_999])
def test_iso_ms_is_rfc3339_utc_with_milliseconds(ms):
    import datetime

    from watcher.views import iso_ms

    expected = datetime.datetime.fromtimestamp(ms // 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert iso_ms(ms) == f"{expected}.{ms % 1000:03d}Z"
    assert iso_ms(None) is None
