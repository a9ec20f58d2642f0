"""Authentication, scopes and rate limits for every API request, before its handler runs.

A request authenticates one of two ways:

- **Bearer**: ``Authorization: Bearer <key>``, a config token or an API key that was not
  created ``signed`` (a signed key's bearer form is refused: its secret must never travel).
- **Signed**: ``X-Watcher-Key-Id``, ``X-Watcher-Timestamp`` and ``X-Watcher-Signature``
  (:func:`watcher.auth.signature`), for keys created ``signed``. Refused with 401 and one code
  a reason: ``key_unknown``, ``signature_expired`` (more than
  :data:`~watcher.auth.SIGNATURE_WINDOW` seconds away), ``signature_invalid`` (wrong method,
  path, query, body or key) and ``signature_replayed`` (already used; the record is in the
  database, so it survives a restart).

Then the route's scope (403 ``insufficient_scope`` naming it), then the key's rate limits (429
with ``Retry-After`` and ``RateLimit-*``). Failed authentications are counted per client
address (read through ``[api] trusted_proxies``, :mod:`watcher.forwarding`): past ``[api]
failed_auth_limit`` (20/min) the client gets 429 instead of 401, but a request that does
authenticate is never refused by that count.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from starlette.requests import Request

from ..auth import SIGNATURE_WINDOW, Principal, RateLimiter, key_hash, signature
from ..errors import Forbidden, TooManyRequests, Unauthorized
from ..forwarding import client_address
from ..secretbox import SealError

if TYPE_CHECKING:
    from ..daemon import Daemon
    from .routing import Endpoint

log = logging.getLogger(__name__)


@dataclass
class Authenticated:
    principal: Principal
    body: bytes | None  # the body, read to check a signature (the handler reads it from here)
    rate_headers: dict[str, str]


class Authenticator:
    def __init__(self, daemon: Daemon, now: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.daemon = daemon
        self.now = now
        self.wall = wall
        self._by_hash: dict[str, Principal] | None = None
        self.limits = RateLimiter()
        self.failures = RateLimiter(max_buckets=50_000)

    # --- who is calling --------------------------------------------------------------------

    async def authenticate(self, request: Request, read_body: Callable[[], Awaitable[bytes]]
                           ) -> tuple[Principal, bytes | None]:
        if "x-watcher-key-id" in request.headers or "x-watcher-signature" in request.headers:
            return await self._signed(request, read_body)
        return self._bearer(request), None

    def _bearer(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("missing bearer token (Authorization: Bearer <token>), or a signed request's "
                               "X-Watcher-Key-Id, X-Watcher-Timestamp and X-Watcher-Signature", code="unauthorized")
        digest = key_hash(given)  # looked up by hash: timing says nothing about the token
        if self._by_hash is None:
            api = self.daemon.config.api
            self._by_hash = {key_hash(t.token): t.principal(api) for t in api.tokens.values()}
        principal = self._by_hash.get(digest)
        if principal is not None:
            return principal
        row = self.daemon.store.apikeys.by_key(given)
        if row is None:
            raise Unauthorized("invalid bearer token", code="unauthorized")
        if row.signed:
            raise Unauthorized(f"key {row.id} signs its requests: send X-Watcher-Key-Id, X-Watcher-Timestamp and "
                               "X-Watcher-Signature, never the key itself", code="signature_required")
        self.daemon.store.apikeys.touch(row.id)
        return self._defaults(row.principal())

    async def _signed(self, request: Request, read_body: Callable[[], Awaitable[bytes]]) -> tuple[Principal, bytes]:
        key_id = request.headers.get("x-watcher-key-id", "").strip()
        stamp = request.headers.get("x-watcher-timestamp", "").strip()
        given = request.headers.get("x-watcher-signature", "").strip()
        if not key_id or not stamp or not given:
            raise Unauthorized("a signed request needs X-Watcher-Key-Id, X-Watcher-Timestamp and X-Watcher-Signature",
                               code="signature_invalid")
        apikeys = self.daemon.store.apikeys
        try:
            found = apikeys.live(key_id[:64])
        except SealError:
            log.error("API key %s: its sealed secret does not open with keys.secrets_key_file", key_id[:64])
            found = None
        row, secret = found if found is not None else (None, None)
        if row is None or secret is None:
            raise Unauthorized("unknown, revoked or expired key, or a key that does not sign (use Bearer)",
                               code="key_unknown")
        if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
            raise Unauthorized("X-Watcher-Timestamp must be Unix seconds", code="signature_invalid")
        skew = int(stamp) - self.wall()
        if abs(skew) > SIGNATURE_WINDOW:
            raise Unauthorized(f"the timestamp is {abs(int(skew))} s {'ahead of' if skew > 0 else 'behind'} the "
                               f"daemon's clock (at most {SIGNATURE_WINDOW} s either way)", code="signature_expired")
        body = await read_body()
        target = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        query = request.scope.get("query_string", b"")
        if query:
            target += "?" + query.decode("latin-1")
        expected = signature(secret, stamp, request.method, target, body)
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise Unauthorized("the signature does not match this request (method, path and query as sent, body, "
                               "timestamp, key)", code="signature_invalid")
        keep_until = (int(stamp) + SIGNATURE_WINDOW + 1) * 1000
        if not apikeys.use_signature(hashlib.sha256(given.encode()).hexdigest(), keep_until):
            raise Unauthorized("this signature was already used: sign each request anew", code="signature_replayed")
        apikeys.touch(row.id)
        return self._defaults(row.principal()), body

    def _defaults(self, p: Principal) -> Principal:
        """A key without limits of its own gets the config's."""
        api = self.daemon.config.api
        return replace(p, rate_limit=p.rate_limit or api.rate_limit,
                       payout_rate_limit=p.payout_rate_limit or api.payout_rate_limit)

    def failed(self, request: Request, e: Unauthorized) -> Exception:
        """A failed authentication from this client: the 401, or a 429 once it has failed too
        often."""
        client = client_address(request, self.daemon.config.api.trusted_proxies)
        verdict = self.failures.take(client, self.daemon.config.api.failed_auth_limit, self.now())
        self.daemon.metrics.api_refusals.labels("", e.code).inc()
        if verdict.allowed:
            return e
        self.daemon.metrics.api_refusals.labels("", "too_many_failures").inc()
        return TooManyRequests(f"too many failed authentications from this address; try again in "
                               f"{verdict.retry_after} s", code="too_many_failures",
                               headers={"retry-after": str(verdict.retry_after)})

    # --- what it may do --------------------------------------------------------------------

    def authorize(self, principal: Principal, endpoint: Endpoint) -> dict[str, str]:
        """Scope and rate limits; returns the RateLimit-* headers to answer with."""
        metrics = self.daemon.metrics
        scope = endpoint.scope
        if scope is not None and not principal.has(scope):
            metrics.api_refusals.labels(principal.id, "insufficient_scope").inc()
            raise Forbidden(f"this route needs the {scope!r} scope; key {principal.id} has "
                            f"{', '.join(sorted(principal.scopes))}", code="insufficient_scope")
        headers: dict[str, str] = {}
        now = self.now()
        if principal.rate_limit is not None:
            verdict = self.limits.take(principal.id, principal.rate_limit, now)
            headers = verdict.headers()
            if not verdict.allowed:
                metrics.api_refusals.labels(principal.id, "rate_limited").inc()
                raise TooManyRequests(f"key {principal.id} is limited to {principal.rate_limit} requests; try again "
                                      f"in {verdict.retry_after} s", headers=headers)
        if endpoint.moves_money and principal.payout_rate_limit is not None:
            verdict = self.limits.take(principal.id + "#payouts", principal.payout_rate_limit, now)
            headers = verdict.headers()
            if not verdict.allowed:
                metrics.api_refusals.labels(principal.id, "payout_rate_limited").inc()
                raise TooManyRequests(f"key {principal.id} may move money {principal.payout_rate_limit}; try again "
                                      f"in {verdict.retry_after} s", code="payout_rate_limited", headers=headers)
        return headers
