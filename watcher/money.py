"""Amounts are integers in base units (wei, sun, sat) everywhere inside watcher.

The API and config speak decimal strings in asset units ("12.5"). These two functions are the
only place where one becomes the other; floats are refused outright.
"""

from __future__ import annotations

import re

from .errors import InvalidAmount

# ASCII digits only (``\d`` would take fullwidth and other scripts' digits), no spaces, no sign
_DECIMAL = re.compile(r"(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]+))?")
MAX_UINT256 = 2**256 - 1


def parse_amount(text: object, decimals: int, *, allow_zero: bool = False, what: str = "amount") -> int:
    """Turn ``"12.5"`` into base units. Raises :class:`InvalidAmount` for anything that is
    not a plain non-negative decimal string with at most ``decimals`` fraction digits."""
    if isinstance(text, bool) or not isinstance(text, str):
        # ints are refused too: "is 5 five units or five wei?" must never be guessed
        raise InvalidAmount(f"{what} must be a decimal string such as \"12.5\", got {type(text).__name__}")
    s = text
    m = _DECIMAL.fullmatch(s)
    if not m or len(s) > 100:
        raise InvalidAmount(f"{what} {text[:40]!r} is not a non-negative decimal number")
    frac = (m.group("frac") or "").rstrip("0")
    if len(frac) > decimals:
        raise InvalidAmount(f"{what} {s!r} has more than {decimals} decimal places")
    units = int(m.group("int")) * 10**decimals + (int(frac.ljust(decimals, "0")) if frac else 0)
    if units == 0 and not allow_zero:
        raise InvalidAmount(f"{what} must be greater than zero")
    if units > MAX_UINT256:
        raise InvalidAmount(f"{what} {s!r} is too large")
    return units


def format_amount(units: int, decimals: int) -> str:
    """Base units to the shortest exact decimal string: ``format_amount(12500000, 6) == "12.5"``."""
    if not isinstance(units, int) or isinstance(units, bool):
        raise TypeError("amounts are ints in base units")
    sign = "-" if units < 0 else ""
    units = abs(units)
    if decimals == 0:
        return f"{sign}{units}"
    whole, frac = divmod(units, 10**decimals)
    frac_s = str(frac).rjust(decimals, "0").rstrip("0")
    return f"{sign}{whole}.{frac_s}" if frac_s else f"{sign}{whole}"
