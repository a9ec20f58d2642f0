"""Who may call the API and how often: scopes, principals (an API key or a config token),
request signatures and token-bucket rate limits.

A **principal** is what a request authenticated as: an API key from the database (``key_...``,
created with ``watcher keys create`` or ``POST /v1/keys``) or a token from the config
(``config:<name>``). Each holds a set of **scopes**; every route declares the one it needs.

Bearer keys are stored as their SHA-256 only (a key is 256 random bits, so a slow hash adds
nothing). A key created ``signed`` never travels: the client signs each request with it
(:func:`signature`), so the daemon must be able to read it back; it is kept sealed with the
secrets key (:mod:`.secretbox`) and its bearer form is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

#: Every scope, in the order the docs list them.
SCOPES = ("read", "addresses", "invoices", "payouts", "approve", "webhooks", "sweeps", "admin")
#: What the config's app tokens (``[api] token`` and plain ``[api.tokens]`` entries) hold.
APP_SCOPES = frozenset(SCOPES) - {"admin"}
SCOPE_TEXT = {
    "read": "every GET under /v1 except keys and admin",
    "addresses": "create deposit addresses and watch addresses",
    "invoices": "create invoices, submit a transaction for an invoice",
    "payouts": "create and cancel payouts",
    "approve": "approve payouts waiting for approval",
    "webhooks": "create, change, delete and test webhook endpoints; redeliver",
    "sweeps": "run sweeps now",
    "admin": "kill switch, status, API keys; act on what other keys created",
}

KEY_PREFIX = "wk_"
KEY_ID_PREFIX = "key_"
CONFIG_ID_PREFIX = "config:"
#: Seconds a signed request's timestamp may be away from the daemon's clock, either way.
SIGNATURE_WINDOW = 300
_KEY_RE = re.compile(r"^wk_[A-Za-z0-9_-]{43}$")
_RATE_RE = re.compile(r"^\s*([0-9]{1,9})\s*/\s*(s|sec|m|min|h|hour|d|day)\s*$")
_PERIODS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``period`` seconds (a bucket of ``count``, refilled evenly)."""

    count: int
    period: int

    def __str__(self) -> str:
        unit = {1: "s", 60: "min", 3600: "h", 86400: "d"}.get(self.period)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period}s"


def parse_rate(text: str) -> Rate:
    """``N/s``, ``N/min`` (or ``N/m``), ``N/h``, ``N/d``; raises ValueError saying what is wrong."""
    m = _RATE_RE.match(text)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"{text[:40]!r} is not a rate: write N/s, N/min, N/h or N/d with N >= 1 (e.g. \"3/h\")")
    return Rate(int(m.group(1)), _PERIODS[m.group(2)])


@dataclass(frozen=True)
class Principal:
    """What a request authenticated as."""

    id: str  # key_... or config:<name>
    name: str
    scopes: frozenset[str]
    signed: bool = False
    rate_limit: Rate | None = None
    payout_rate_limit: Rate | None = None

    def __str__(self) -> str:  # in logs: never a secret
        return f"{self.name} ({self.id})"

    def has(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def owns(self, owner: str | None) -> bool:
        """May act on an object created by ``owner`` (a principal id): its creator, or any
        ``admin``. Objects from before keys existed (no owner) belong to the config's tokens."""
        if self.admin:
            return True
        if owner is None:
            return self.id.startswith(CONFIG_ID_PREFIX)
        return owner == self.id


def check_scopes(scopes: list[str] | tuple[str, ...]) -> frozenset[str]:
    """A scope list as given by an operator; raises ValueError naming an unknown one."""
    out = set()
    for s in scopes:
        s = s.strip()
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s[:32]!r} (scopes: {', '.join(SCOPES)})")
        out.add(s)
    if not out:
        raise ValueError(f"a key needs at least one scope (scopes: {', '.join(SCOPES)})")
    return frozenset(out)


def new_key() -> tuple[str, str]:
    """A new (id, key): the id is public (it names the key in lists, logs and the audit
    log, and signed requests carry it), the key is the secret."""
    return KEY_ID_PREFIX + secrets.token_hex(8), KEY_PREFIX + secrets.token_urlsafe(32)


def looks_like_key(value: str) -> bool:
    return bool(_KEY_RE.match(value))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()


def signature(key: str, timestamp: str, method: str, target: str, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256(key, "<timestamp>\\n<METHOD>\\n<target>\\n<hex SHA-256 of body>")>``:
    what a signed request carries in ``X-Watcher-Signature``. ``target`` is the path and, if
    there is one, ``?`` and the raw query string, exactly as sent."""
    message = f"{timestamp}\n{method.upper()}\n{target}\n{hashlib.sha256(body).hexdigest()}".encode()
    return "v1=" + hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


# --- rate limits ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the bucket is full again
    retry_after: int  # seconds until one more request is allowed (0 if allowed)

    def headers(self) -> dict[str, str]:
        out = {"ratelimit-limit": str(self.limit), "ratelimit-remaining": str(self.remaining),
               "ratelimit-reset": str(self.reset)}
        if not self.allowed:
            out["retry-after"] = str(self.retry_after)
        return out


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """Token buckets by name (a key id, a client address), at most ``max_buckets`` of them
    (the least recently used goes first, so a flood of client addresses cannot grow it)."""

    max_buckets: int = 10_000
    _buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    def take(self, name: str, rate: Rate, now: float, *, cost: float = 1.0) -> Verdict:
        per_token = rate.period / rate.count
        b = self._buckets.get(name)
        if b is None:
            b = self._buckets[name] = _Bucket(float(rate.count), now)
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(name)
            b.tokens = min(float(rate.count), b.tokens + max(0.0, now - b.at) / per_token)
            b.at = now
        allowed = b.tokens >= cost
        if allowed:
            b.tokens -= cost
        retry = 0 if allowed else math.ceil((cost - b.tokens) * per_token)
        return Verdict(allowed=allowed, limit=rate.count, remaining=int(b.tokens),
                       reset=math.ceil((rate.count - b.tokens) * per_token), retry_after=max(retry, 0 if allowed else 1))
