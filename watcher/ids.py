"""Object ids: a short prefix naming the kind, then a time-ordered random part (ULID-like,
Crockford base32, 26 chars), so ids sort by creation time and never collide."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # two digits by their 10 bits


def _b32(n: int, length: int) -> str:
    out = []
    for _ in range(length):
        n, r = divmod(n, 32)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


_last_ms: tuple[int, str] = (-1, "")  # the time part of the last id (ids of one transaction share it)


def new_id(prefix: str, *, now_ms: int | None = None) -> str:
    """``new_id("evt")`` → ``"evt_01JD3…"``: 48 bits of milliseconds, 80 random bits."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{prefix}_{_time_part(ms)}{_digits80(os.urandom(10))}"


def new_ids(prefix: str, times_ms: Sequence[int]) -> list[str]:
    """:func:`new_id` for each of ``times_ms``, their random parts read at once."""
    random = os.urandom(10 * len(times_ms))
    return [f"{prefix}_{_time_part(ms)}{_digits80(random[10 * i:10 * i + 10])}" for i, ms in enumerate(times_ms)]


def _time_part(ms: int) -> str:
    global _last_ms
    if _last_ms[0] != ms:
        p = _PAIRS  # 10 digits of 50 bits (the top 2 zero while ms < 2**48): a lookup per two
        _last_ms = (ms, p[(ms >> 40) & 1023] + p[(ms >> 30) & 1023] + p[(ms >> 20) & 1023] + p[(ms >> 10) & 1023]
                    + p[ms & 1023])
    return _last_ms[1]


def _digits80(data: bytes) -> str:
    """10 bytes as 16 Crockford digits, most significant first (as ``base64.b32encode``
    writes them, in Crockford's alphabet): two digits a lookup, half its time."""
    n, p = int.from_bytes(data, "big"), _PAIRS
    return (p[n >> 70] + p[(n >> 60) & 1023] + p[(n >> 50) & 1023] + p[(n >> 40) & 1023]
            + p[(n >> 30) & 1023] + p[(n >> 20) & 1023] + p[(n >> 10) & 1023] + p[n & 1023])
