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
import hashlib
import hmac
import json
import logging
import random
import sqlite3
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from . import __version__
from .clock import Clock
from .config import WebhooksConfig
from .httpclient import DeliveryError, WebhookClient, parse_retry_after
from .metrics import Metrics
from .tasks import StorageRetry
from .views import iso_ms

if TYPE_CHECKING:
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


@dataclass
class _Result:
    delivery: sqlite3.Row
    webhook_id: str
    attempt: int
    status: int | None
    latency: float
    error: str | None
    text: str | None
    next_at: int | None
    disable: str | None
    not_before: int | None = None  # ms: what a Retry-After asked for


class _Endpoint:
    """One endpoint's queue of due deliveries and its workers (at most
    ``per_endpoint_concurrency`` attempts in flight: a dead endpoint holds only these)."""

    def __init__(self, webhook_id: str, url: str):
        self.id = webhook_id
        self.url = url
        self.queue: deque[sqlite3.Row] = deque()
        self.ready = trio.Event()
        self.workers = 0
        self.gone = False
        self.failing = False  # its last attempt got no 2xx: it waits in the slow lane


class Dispatcher:
    """Reads due deliveries in bulk into per-endpoint queues, sends them with per-endpoint
    workers, and records the attempts in batched transactions (a crash before a batch is
    written means those deliveries are sent again: at least once)."""

    REFILL = 256  # due deliveries read per endpoint at a time
    FLUSH_EVERY = 0.02  # seconds between attempt-record commits
    FLUSH_MAX = 256  # ... or as soon as this many attempts wait to be recorded

    def __init__(self, store: Store, config: WebhooksConfig, metrics: Metrics, clock: Clock,
                 *, rng: random.Random | None = None):
        self.store = store
        self.config = config
        self.metrics = metrics
        self._storage = StorageRetry(store.db, metrics, "webhook dispatcher", "dispatcher_bug")
        self.clock = clock
        self.rng = rng or random.Random()
        self._wake = trio.Event()
        self._taken: dict[str, set[str]] = defaultdict(set)  # per endpoint: queued or in flight
        self._endpoints: dict[str, _Endpoint] = {}
        self._results: list[_Result] = []
        self._flush_now = trio.Event()
        self._have_results = trio.Event()
        # Only endpoints whose last attempt failed share these slots (``concurrency``): one that
        # answers is never held up by any number of dead ones (each already holds at most
        # per_endpoint_concurrency, and there are at most max_endpoints)
        self._slow_lane = trio.CapacityLimiter(config.concurrency)
        self._secrets: dict[str, tuple[float, list[str]]] = {}
        store.on_wake("webhooks", self.wake)

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # idle connections: what the endpoints there may be can use, however often URLs move
        client = WebhookClient(max_idle_per_origin=self.config.per_endpoint_concurrency,
                               max_idle=self.config.max_endpoints * self.config.per_endpoint_concurrency,
                               allowed_hosts=self.config.allowed_hosts)
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._flusher)
                    task_status.started()
                    while True:
                        self._wake = trio.Event()
                        active = self._refill(client, nursery)
                        now = self.clock.now_ms()
                        next_due = self.store.webhooks.next_retry(active, now)
                        if next_due is None or next_due <= now:
                            # nothing scheduled, or all that is due is queued: a finished
                            # attempt, a new delivery or a config change wakes us
                            await self._wake.wait()
                        else:
                            with trio.move_on_after((next_due - now) / 1000):
                                await self._wake.wait()
            finally:
                with trio.CancelScope(shield=True):
                    try:
                        self._flush()  # attempts already made are recorded on the way out
                    except sqlite3.DatabaseError as e:
                        # not recorded: those deliveries are sent again after a restart (same
                        # webhook-id, so receivers dedupe); at-least-once holds
                        log.warning("webhook attempts not recorded on shutdown: %s", e)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    def _refill(self, client: WebhookClient, nursery: trio.Nursery) -> list[str]:
        """Top up every active endpoint's queue with due deliveries (and start its workers);
        returns the active endpoints' ids."""
        now = self.clock.now_ms()
        endpoints: list[sqlite3.Row] = self.store.webhooks.active_endpoints()
        active = {r["id"]: r["url"] for r in endpoints}
        for wid, ep in list(self._endpoints.items()):
            if wid not in active or ep.url != active[wid]:
                ep.gone = True  # disabled, deleted or moved: its queued deliveries wait in the database
                for d in ep.queue:
                    self._taken[wid].discard(d["id"])
                ep.queue.clear()
                ep.ready.set()
                del self._endpoints[wid]
        for wid, url in active.items():
            if wid not in self._endpoints:
                self._endpoints[wid] = _Endpoint(wid, url)
            ep = self._endpoints[wid]
            if len(ep.queue) < self.REFILL // 2:
                taken = self._taken[wid]
                due: list[sqlite3.Row] = self.store.webhooks.due(wid, now, self.REFILL, taken)
                for d in due:
                    taken.add(d["id"])
                    ep.queue.append(d)
            while ep.queue and ep.workers < self.config.per_endpoint_concurrency:
                ep.workers += 1
                nursery.start_soon(self._worker, client, ep)
            if ep.queue:
                ep.ready.set()
        return list(active)

    async def _worker(self, client: WebhookClient, ep: _Endpoint) -> None:
        try:
            while ep.queue and not ep.gone:
                if not self._cached_secrets(ep.id):  # deleted (its secrets erased): nothing is sent unsigned
                    ep.gone = True
                    break
                d = ep.queue.popleft()
                if len(ep.queue) < self.REFILL // 4:
                    self.wake()  # ask for more before running dry
                try:
                    if ep.failing:
                        async with self._slow_lane:
                            # it may have waited long: deleted, disabled or moved meanwhile, the
                            # endpoint gets nothing (its delivery waits in the database)
                            result = await self._send(client, ep, d) if self._still_there(ep) else None
                    else:
                        result = await self._send(client, ep, d)
                    if result is None:
                        self._taken[ep.id].discard(d["id"])
                        break
                    ep.failing = not (result.status is not None and 200 <= result.status < 300)
                    # (not `self._results.append(await ...)`: that would bind the list the
                    # flusher may swap out while we wait, and the result would be lost)
                    self._results.append(result)
                    self._have_results.set()
                except BaseException:
                    self._taken[ep.id].discard(d["id"])
                    raise
                if len(self._results) >= self.FLUSH_MAX:
                    self._flush_now.set()
        finally:
            ep.workers -= 1

    def _still_there(self, ep: _Endpoint) -> bool:
        """The endpoint is still active at the URL its queue was taken for, with secrets to
        sign with (asked afresh, not from the cache)."""
        if ep.gone:
            return False
        secrets = self.store.webhooks.secrets(ep.id)
        self._secrets[ep.id] = (trio.current_time(), secrets)
        row = self.store.webhooks.row(ep.id)
        if not secrets or row is None or row.status != "active" or row.url != ep.url:
            ep.gone = True
            return False
        return True

    def _cached_secrets(self, webhook_id: str) -> list[str]:
        now = trio.current_time()
        hit = self._secrets.get(webhook_id)
        if hit is None or now - hit[0] > 1.0:  # a rotation is seen within a second
            hit = (now, self.store.webhooks.secrets(webhook_id))
            self._secrets[webhook_id] = hit
        return hit[1]

    async def _send(self, client: WebhookClient, ep: _Endpoint, d: sqlite3.Row) -> _Result:
        attempt = d["attempts"] + 1
        body = delivery_body(d)
        ts = int(self.clock.now())
        signatures = " ".join(sign(s, d["event_id"], ts, body) for s in self._cached_secrets(ep.id))
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
            with trio.fail_after(self.config.timeout):
                answer = await client.post(ep.url, body, headers)
            status = answer.status
            # what a private address (a listed host) answered is never shown through the API
            text = answer.body[:500].decode("utf-8", "replace") if answer.body and not answer.private else None
            retry_after = parse_retry_after(answer.headers.get("retry-after"), self.clock.now(),
                                            cap=MAX_RETRY_AFTER)
        except trio.TooSlowError:
            error = f"no answer within {self.config.timeout}s"
        except DeliveryError as e:
            error = str(e)[:300]
        latency = time.perf_counter() - t0
        ok = status is not None and 200 <= status < 300
        disable = next_at = None
        if not ok:
            if status == 410:
                disable = "endpoint answered 410 Gone"
                ep.gone = True
            else:
                if error is None:
                    error = f"HTTP {status}"
                delay = next_delay(self.config.schedule, attempt, retry_after, self.rng)
                if delay is not None:
                    next_at = self.clock.now_ms() + int(delay * 1000)
        not_before = None if retry_after is None else self.clock.now_ms() + int(retry_after * 1000)
        return _Result(d, ep.id, attempt, status, latency, error, text, next_at, disable, not_before)

    async def _flusher(self) -> None:
        # idle (no timer) until a result is waiting: a periodic wake-up would keep an idle
        # daemon busy and stall a MockClock that only jumps when every task is blocked
        while True:
            await self._have_results.wait()
            with trio.move_on_after(self.FLUSH_EVERY):
                await self._flush_now.wait()
            self._have_results = trio.Event()
            self._flush_now = trio.Event()
            if self._results:
                try:
                    self._flush()
                except sqlite3.DatabaseError as e:
                    self._have_results.set()  # the results were put back: try again after the wait
                    await self._storage.wait(e)
                    continue
                self._storage.ok()
                self.wake()

    def _flush(self) -> None:
        """Record every finished attempt in one transaction."""
        results, self._results = self._results, []
        if not results:
            return
        outcomes = []
        try:
            with self.store.db.transaction():
                for r in results:
                    outcomes.append(self.store.webhooks.record_attempt(
                        r.delivery["id"], attempt=r.attempt, status_code=r.status, latency_ms=int(r.latency * 1000),
                        error=r.error, response=r.text, next_attempt_at=r.next_at, disable_endpoint=r.disable,
                        not_before=r.not_before))
                # an endpoint that answers again gets its waiting retries now, not on schedule
                for wid in {r.webhook_id for r in results if r.status is not None and 200 <= r.status < 300}:
                    if self.store.webhooks.expedite(wid):
                        log.info("webhook %s answers again: its waiting deliveries are due now", wid,
                                 extra={"webhook_id": wid})
        except BaseException:
            self._results = results + self._results  # rolled back: keep them for the next flush
            raise
        for r, outcome in zip(results, outcomes, strict=True):
            self._taken[r.webhook_id].discard(r.delivery["id"])
            self._account(r, outcome)

    def _account(self, r: _Result, outcome: str) -> None:
        ok = r.status is not None and 200 <= r.status < 300
        d = r.delivery
        self.metrics.webhook_attempts.labels("success" if ok else ("http_error" if r.status else "network_error")).inc()
        self.metrics.webhook_latency.observe(r.latency)
        if outcome in ("delivered", "failed"):
            self.metrics.webhook_deliveries.labels(outcome).inc()
        if ok:
            self.metrics.webhook_delivery_delay.observe(max(0.0, self.clock.now() - d["event_created_at"] / 1000))
        extra: dict[str, Any] = {"webhook_id": r.webhook_id, "delivery_id": d["id"], "event_id": d["event_id"],
                                 "attempt": r.attempt, "status_code": r.status}
        if r.disable:
            log.warning("webhook %s disabled: %s", r.webhook_id, r.disable, extra=extra)
        elif outcome == "failed":
            log.warning("delivery %s of %s to %s failed after %d attempts (%s)", d["id"], d["type"], r.webhook_id,
                        r.attempt, r.error, extra=extra)
        elif not ok:
            log.info("delivery %s of %s to %s: attempt %d failed (%s); next at %s", d["id"], d["type"], r.webhook_id,
                     r.attempt, r.error, iso_ms(r.next_at), extra=extra)
