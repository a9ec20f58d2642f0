"""Object ids: a short prefix naming the kind, then a time-ordered random part (ULID-like,
Crockford base32, 26 chars), so ids sort by creation time and never collide."""

from __future__ import annotations

import base64
import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# RFC 4648 base32 digits, in value order, to Crockford's: base64.b32encode does the encoding
_FROM_RFC4648 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET)


def _b32(n: int, length: int) -> str:
    out = []
    for _ in range(length):
        n, r = divmod(n, 32)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


_last_ms: tuple[int, str] = (-1, "")  # the time part of the last id (ids of one transaction share it)


def new_id(prefix: str, *, now_ms: int | None = None) -> str:
    """``new_id("evt")`` → ``"evt_01JD3…"``: 48 bits of milliseconds, 80 random bits."""
    global _last_ms
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    if _last_ms[0] != ms:
        _last_ms = (ms, _b32(ms, 10))
    rand = base64.b32encode(os.urandom(10)).decode().translate(_FROM_RFC4648)  # 80 bits: 16 digits
    return f"{prefix}_{_last_ms[1]}{rand}"
