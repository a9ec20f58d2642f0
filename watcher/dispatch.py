"""The webhook dispatcher: sends due deliveries from the outbox, signed per Standard Webhooks.

Headers: ``webhook-id`` (the event id, the same on every retry and redelivery),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``:
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the base64-decoded part
of the ``whsec_`` secret; during a secret rotation both signatures, space-separated.

Delivery is at least once: any 2xx is success; anything else (or a network error, or no
answer within ``timeout``) is retried after the next delay of the schedule, with ±10 %
jitter, never sooner than a ``Retry-After`` says; after the last one the delivery is
``failed`` (``POST /v1/deliveries/{id}/redeliver`` sends it again). 410 Gone disables the
endpoint. Each endpoint has its own small concurrency limit, so a slow or dead endpoint
only ever occupies its own slots: it never delays deliveries to the others.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx
import trio

from . import __version__
from .clock import Clock
from .config import WebhooksConfig
from .metrics import Metrics
from .store.events import iso_ms

if TYPE_CHECKING:
    import sqlite3

    from .store import Store

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 86400.0


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature: ``v1,<base64 HMAC-SHA256>``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def delivery_body(row: sqlite3.Row) -> bytes:
    """The JSON body: ``{"type", "timestamp", "data", "sequence"}``; identical on every retry."""
    body = {"type": row["type"], "timestamp": iso_ms(row["event_created_at"]), "data": json.loads(row["data"]),
            "sequence": row["seq"]}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def next_delay(schedule: Sequence[float], attempt: int, retry_after: float | None, rng: random.Random) -> float | None:
    """Seconds until attempt ``attempt + 1`` after attempt ``attempt`` failed (attempts count
    from 1), or None when the schedule is spent."""
    if attempt >= len(schedule):
        return None
    delay = schedule[attempt] * rng.uniform(0.9, 1.1)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After``: seconds, or an HTTP date; bounded to a day."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        secs = when.timestamp() - now
    if not math.isfinite(secs):
        return None
    return min(max(secs, 0.0), MAX_RETRY_AFTER)


class Dispatcher:
    def __init__(self, store: Store, config: WebhooksConfig, metrics: Metrics, clock: Clock,
                 *, rng: random.Random | None = None):
        self.store = store
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self._wake = trio.Event()
        self._inflight: set[str] = set()
        self._per_endpoint: Counter[str] = Counter()
        store.on_wake("webhooks", self.wake)

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limits = httpx.Limits(max_connections=self.config.concurrency,
                              max_keepalive_connections=min(self.config.concurrency, 32))
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout), limits=limits, trust_env=False,
                                     follow_redirects=False) as client, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._wake = trio.Event()
                self._start_due(client, nursery)
                next_due = self.store.webhooks.next_due()
                now = self.clock.now_ms()
                if next_due is None or next_due <= now:
                    # nothing scheduled, or everything due is in flight / waiting for a slot:
                    # an attempt finishing or a new delivery wakes us
                    await self._wake.wait()
                else:
                    with trio.move_on_after((next_due - now) / 1000):
                        await self._wake.wait()

    def _start_due(self, client: httpx.AsyncClient, nursery: trio.Nursery) -> None:
        now = self.clock.now_ms()
        for ep in self.store.webhooks.active_endpoints():
            free = min(self.config.per_endpoint_concurrency - self._per_endpoint[ep["id"]],
                       self.config.concurrency - len(self._inflight))
            if free <= 0:
                continue
            for d in self.store.webhooks.due(ep["id"], now, free, self._inflight):
                self._inflight.add(d["id"])
                self._per_endpoint[ep["id"]] += 1
                nursery.start_soon(self._attempt, client, ep["id"], ep["url"], d)

    async def _attempt(self, client: httpx.AsyncClient, webhook_id: str, url: str, d: sqlite3.Row) -> None:
        try:
            await self._send(client, webhook_id, url, d)
        finally:
            self._inflight.discard(d["id"])
            self._per_endpoint[webhook_id] -= 1
            self.wake()

    async def _send(self, client: httpx.AsyncClient, webhook_id: str, url: str, d: sqlite3.Row) -> None:
        attempt = d["attempts"] + 1
        body = delivery_body(d)
        ts = int(self.clock.now())
        signatures = " ".join(sign(s, d["event_id"], ts, body) for s in self.store.webhooks.secrets(webhook_id))
        headers = {
            "content-type": "application/json",
            "user-agent": f"watcher/{__version__}",
            "webhook-id": d["event_id"],
            "webhook-timestamp": str(ts),
            "webhook-signature": signatures,
            "watcher-delivery": d["id"],
            "watcher-sequence": str(d["seq"]),
            "watcher-attempt": str(attempt),
        }
        status: int | None = None
        error: str | None = None
        text: str | None = None
        retry_after: float | None = None
        t0 = time.perf_counter()
        try:
            with trio.fail_after(self.config.timeout + 1):
                resp = await client.post(url, content=body, headers=headers)
            status = resp.status_code
            text = resp.text[:500] if resp.content else None
            retry_after = parse_retry_after(resp.headers.get("retry-after"), self.clock.now())
        except (httpx.TimeoutException, trio.TooSlowError):
            error = f"no answer within {self.config.timeout}s"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {str(e)[:200]}" if str(e) else type(e).__name__
        latency = time.perf_counter() - t0
        ok = status is not None and 200 <= status < 300
        disable = None
        next_at = None
        if not ok:
            if status == 410:
                disable = "endpoint answered 410 Gone"
            else:
                if error is None:
                    error = f"HTTP {status}"
                delay = next_delay(self.config.schedule, attempt, retry_after, self.rng)
                if delay is not None:
                    next_at = self.clock.now_ms() + int(delay * 1000)
        outcome = self.store.webhooks.record_attempt(
            d["id"], attempt=attempt, status_code=status, latency_ms=int(latency * 1000), error=error,
            response=text, next_attempt_at=next_at, disable_endpoint=disable)
        self.metrics.webhook_attempts.labels("success" if ok else ("http_error" if status else "network_error")).inc()
        self.metrics.webhook_latency.observe(latency)
        if outcome in ("delivered", "failed"):
            self.metrics.webhook_deliveries.labels(outcome).inc()
        if ok:
            self.metrics.webhook_delivery_delay.observe(max(0.0, self.clock.now() - d["event_created_at"] / 1000))
        extra: dict[str, Any] = {"webhook_id": webhook_id, "delivery_id": d["id"], "event_id": d["event_id"],
                                 "attempt": attempt, "status_code": status}
        if disable:
            log.warning("webhook %s disabled: %s", webhook_id, disable, extra=extra)
        elif outcome == "failed":
            log.warning("delivery %s of %s to %s failed after %d attempts (%s)", d["id"], d["type"], webhook_id,
                        attempt, error, extra=extra)
        elif not ok:
            log.info("delivery %s of %s to %s: attempt %d failed (%s); next at %s", d["id"], d["type"], webhook_id,
                     attempt, error, iso_ms(next_at), extra=extra)
