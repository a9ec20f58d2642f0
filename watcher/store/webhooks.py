"""Webhook endpoints, their deliveries and every attempt.

Fan-out happens in the transaction that writes the event: each endpoint whose patterns match
gets a ``pending`` delivery with the endpoint's next sequence number. A disabled endpoint
(by the API, or after answering 410) keeps queueing; nothing is sent to it until it is
enabled again, and then everything that waited goes out. The
dispatcher (``watcher.dispatch``) sends due deliveries and records each attempt here.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ..errors import Conflict
from ..ids import new_id
from ..secretbox import SealError, is_sealed
from .common import page
from .events import Event

if TYPE_CHECKING:
    from . import Store

EVENT_TYPES = (
    "transfer.detected", "transfer.confirmed", "transfer.orphaned",
    "invoice.created", "invoice.awaiting_payment", "invoice.awaiting_confirmation", "invoice.completed",
    "invoice.expired", "invoice.failed", "invoice.refund_requested", "invoice.refunded",
    "payout.pending", "payout.awaiting_approval", "payout.broadcast", "payout.completed", "payout.failed",
    "payout.cancelled", "payout.remined",
    "sweep.planned", "sweep.funding", "sweep.broadcast", "sweep.confirmed", "sweep.failed", "sweep.remined",
    "wallet.gap_filled", "wallet.bumped", "webhook.test",
)
DELIVERY_STATUSES = ("pending", "delivered", "failed", "cancelled")
_RESPONSE_EXCERPT = 500


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@dataclass(frozen=True, slots=True)
class WebhookRow:
    id: str
    url: str
    events: tuple[str, ...]
    description: str | None
    status: str
    disabled_reason: str | None
    last_seq: int
    rotating: bool  # an old secret still signs
    old_secret_until: int | None
    created_at: int
    owner: str | None  # the principal id that created it (None: before API keys existed)

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> WebhookRow:
        return cls(id=r["id"], url=r["url"], events=tuple(json.loads(r["events"])), description=r["description"],
                   status=r["status"], disabled_reason=r["disabled_reason"], last_seq=r["last_seq"],
                   rotating=bool(r["old_secret"]), old_secret_until=r["old_secret_until"], created_at=r["created_at"],
                   owner=r["owner"])


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: str
    webhook_id: str
    event_id: str
    seq: int
    status: str
    attempts: int
    next_attempt_at: int | None
    last_status: int | None
    last_error: str | None
    created_at: int
    delivered_at: int | None

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> DeliveryRow:
        return cls(id=r["id"], webhook_id=r["webhook_id"], event_id=r["event_id"], seq=r["seq"], status=r["status"],
                   attempts=r["attempts"], next_attempt_at=r["next_attempt_at"], last_status=r["last_status"],
                   last_error=r["last_error"], created_at=r["created_at"], delivered_at=r["delivered_at"])


@dataclass(frozen=True, slots=True)
class AttemptRow:
    attempt: int
    at: int
    status_code: int | None
    latency_ms: int | None
    error: str | None
    response: str | None


class Webhooks:
    def __init__(self, store: Store):
        self.store = store
        # the active endpoints and their event patterns, read once a transaction (a scan's
        # transaction writes an event for each of its transfers); every write here drops it
        self._active: tuple[int, list[tuple[str, list[str]]]] | None = None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A transaction that writes endpoints: ``fan_out`` reads them again afterwards."""
        with self.store.db.transaction() as conn:
            self._active = None
            try:
                yield conn
            finally:
                self._active = None

    # --- endpoints ------------------------------------------------------------------------

    def create(self, url: str, patterns: list[str], description: str | None, *, owner: str | None = None
               ) -> tuple[WebhookRow, str]:
        now = self.store.clock.now_ms()
        wid = new_id("wh", now_ms=now)
        secret = new_secret()
        with self._writing() as conn:
            conn.execute(
                "INSERT INTO webhooks (id, url, events, description, secret, status, created_at, updated_at, owner)"
                " VALUES (?, ?, ?, ?, ?, 'active', ?, ?, ?)",
                (wid, url, json.dumps(patterns), description, self._seal(wid, secret), now, now, owner))
        return self._row(wid), secret

    # secrets are sealed at rest with the secrets key (watcher.secretbox), bound to the endpoint
    def _seal(self, webhook_id: str, secret: str) -> str:
        return self.store.secrets.seal(secret, f"webhook:{webhook_id}")

    def _open(self, webhook_id: str, stored: str) -> str:
        return self.store.secrets.open(stored, f"webhook:{webhook_id}") if is_sealed(stored) else stored

    def check_sealed(self) -> None:
        """Fail at start, not at the first delivery, if the secrets key is not the one that
        sealed this database's secrets."""
        r = self.store.db.one("SELECT id, secret FROM webhooks WHERE deleted_at IS NULL AND secret LIKE 'sealed:%'"
                              " LIMIT 1")
        if r is not None:
            try:
                self._open(r["id"], r["secret"])
            except SealError as e:
                from ..errors import ConfigError

                raise ConfigError("keys.secrets_key_file", f"{e}: is it the key file this database was used "
                                                           "with?") from None

    def seal_all(self) -> int:
        """Seal the secrets stored before they were sealed, and erase those of deleted endpoints
        (run when the store opens); returns how many rows changed."""
        changed = 0
        with self._writing() as conn:
            changed += conn.execute("UPDATE webhooks SET secret = '', old_secret = NULL, old_secret_until = NULL"
                                    " WHERE deleted_at IS NOT NULL AND (secret != '' OR old_secret IS NOT NULL)"
                                    ).rowcount
            for r in conn.execute("SELECT id, secret, old_secret FROM webhooks WHERE deleted_at IS NULL").fetchall():
                plain = [v for v in (r["secret"], r["old_secret"]) if v and not is_sealed(v)]
                if plain:
                    conn.execute("UPDATE webhooks SET secret = ?, old_secret = ? WHERE id = ?",
                                 (self._seal(r["id"], self._open(r["id"], r["secret"])),
                                  self._seal(r["id"], self._open(r["id"], r["old_secret"])) if r["old_secret"]
                                  else None, r["id"]))
                    changed += 1
        return changed

    def _raw(self, webhook_id: str) -> sqlite3.Row | None:
        return self.store.db.one("SELECT * FROM webhooks WHERE id = ? AND deleted_at IS NULL", (webhook_id,))

    def row(self, webhook_id: str) -> WebhookRow | None:
        """An endpoint that was not deleted, or None."""
        r = self._raw(webhook_id)
        return WebhookRow.from_row(r) if r else None

    def _row(self, webhook_id: str) -> WebhookRow:
        row = self.row(webhook_id)
        assert row is not None, webhook_id
        return row

    def rows(self) -> list[WebhookRow]:
        return [WebhookRow.from_row(r) for r in self.store.db.query(
            "SELECT * FROM webhooks WHERE deleted_at IS NULL ORDER BY id")]

    def page(self, *, after: str | None, limit: int) -> tuple[list[WebhookRow], str | None]:
        return page(self.store, "webhooks", {}, after=after, limit=limit, row=WebhookRow.from_row,
                    select="SELECT * FROM (SELECT * FROM webhooks WHERE deleted_at IS NULL)")

    def count(self) -> int:
        return self.store.db.scalar("SELECT COUNT(*) FROM webhooks WHERE deleted_at IS NULL") or 0

    def delivery_counts(self, webhook_id: str) -> dict[str, int]:
        return {r[0]: r[1] for r in self.store.db.query(
            "SELECT status, COUNT(*) FROM deliveries WHERE webhook_id = ? GROUP BY status", (webhook_id,))}

    def update(self, webhook_id: str, *, url: str | None = None, patterns: list[str] | None = None,
               enabled: bool | None = None, description: str | None = None) -> WebhookRow | None:
        """The changed endpoint, or None if there is none (deleted, perhaps while the caller
        awaited something): then nothing is written."""
        now = self.store.clock.now_ms()
        with self._writing() as conn:
            row = self.row(webhook_id)  # in the transaction that writes
            if row is None:
                return None
            if url is not None:
                conn.execute("UPDATE webhooks SET url = ? WHERE id = ?", (url, webhook_id))
            if patterns is not None:
                conn.execute("UPDATE webhooks SET events = ? WHERE id = ?", (json.dumps(patterns), webhook_id))
            if description is not None:
                conn.execute("UPDATE webhooks SET description = ? WHERE id = ?", (description, webhook_id))
            if enabled is not None and enabled != (row.status == "active"):
                conn.execute("UPDATE webhooks SET status = ?, disabled_reason = ? WHERE id = ?",
                             ("active" if enabled else "disabled", None if enabled else "disabled by API", webhook_id))
                if enabled:  # what waited while it was off goes out now
                    conn.execute("UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE webhook_id = ?"
                                 " AND status = 'pending'", (now, now, webhook_id))
            conn.execute("UPDATE webhooks SET updated_at = ? WHERE id = ?", (now, webhook_id))
            self.store.wake_after_commit("webhooks")
        return self._row(webhook_id)

    def delete(self, webhook_id: str) -> None:
        self._row(webhook_id)
        now = self.store.clock.now_ms()
        with self._writing() as conn:
            # the secrets go with it: nothing can be signed for a deleted endpoint again
            conn.execute("UPDATE webhooks SET deleted_at = ?, status = 'disabled', disabled_reason = 'deleted',"
                         " secret = '', old_secret = NULL, old_secret_until = NULL, updated_at = ? WHERE id = ?",
                         (now, now, webhook_id))
            conn.execute("UPDATE deliveries SET status = 'cancelled', next_attempt_at = NULL, updated_at = ?"
                         " WHERE webhook_id = ? AND status = 'pending'", (now, webhook_id))
            self.store.wake_after_commit("webhooks")  # the dispatcher drops its queue for it now

    def rotate_secret(self, webhook_id: str) -> tuple[WebhookRow, str]:
        """A new secret; the previous one keeps signing (both signatures sent) for the grace."""
        row = self._raw(webhook_id)
        assert row is not None, webhook_id
        now = self.store.clock.now_ms()
        secret = new_secret()
        grace = self.store.config.webhooks.rotation_grace * 1000
        with self._writing() as conn:
            conn.execute("UPDATE webhooks SET secret = ?, old_secret = ?, old_secret_until = ?, updated_at = ?"
                         " WHERE id = ?", (self._seal(webhook_id, secret), row["secret"] if grace else None,
                                           now + grace if grace else None, now, webhook_id))
        return self._row(webhook_id), secret

    def secrets(self, webhook_id: str) -> list[str]:
        """The secrets to sign with now: the current one, then the previous one during rotation."""
        row = self.store.db.one("SELECT secret, old_secret, old_secret_until FROM webhooks WHERE id = ?"
                                " AND deleted_at IS NULL", (webhook_id,))
        if row is None or not row["secret"]:
            return []
        out = [self._open(webhook_id, row["secret"])]
        if row["old_secret"] and (row["old_secret_until"] or 0) > self.store.clock.now_ms():
            out.append(self._open(webhook_id, row["old_secret"]))
        return out

    # --- fan-out (inside the event's transaction) -----------------------------------------

    def fan_out(self, event: Event, only: str | None = None) -> int:
        conn = self.store.db.conn
        if only is not None:
            targets = [only]
        else:
            # only active endpoints: a disabled one would collect deliveries nobody sends (an app
            # back from being disabled catches up with GET /v1/events)
            serial = self.store.db.tx_serial
            if self._active is None or self._active[0] != serial:
                self._active = (serial, [(r["id"], json.loads(r["events"])) for r in conn.execute(
                    "SELECT id, events FROM webhooks WHERE deleted_at IS NULL AND status = 'active'")])
            targets = [wid for wid, patterns in self._active[1] if any(fnmatchcase(event.type, p) for p in patterns)]
        now = event.created_at
        for wid in targets:
            seq = conn.execute("UPDATE webhooks SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq",
                               (wid,)).fetchone()[0]
            conn.execute(
                "INSERT INTO deliveries (id, webhook_id, event_id, seq, status, next_attempt_at, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                (new_id("dlv", now_ms=now), wid, event.id, seq, now, now, now))
        if targets:
            self.store.wake_after_commit("webhooks")
        return len(targets)

    def send_test(self, webhook_id: str) -> DeliveryRow:
        with self.store.db.transaction():
            event = self.store.events.emit("webhook.test", {"webhook_id": webhook_id, "message": "test event"},
                                           subject=webhook_id, webhooks_only=webhook_id)
            delivery = self.store.db.one("SELECT * FROM deliveries WHERE event_id = ? AND webhook_id = ?",
                                         (event.id, webhook_id))
        assert delivery is not None
        return DeliveryRow.from_row(delivery)

    # --- deliveries -------------------------------------------------------------------------

    def active_endpoints(self) -> list[sqlite3.Row]:
        return self.store.db.query("SELECT id, url FROM webhooks WHERE status = 'active'")

    def due(self, webhook_id: str, now: int, limit: int, exclude: set[str]) -> list[sqlite3.Row]:
        rows = self.store.db.query(
            "SELECT d.*, e.type, e.created_at AS event_created_at, e.data, e.seq AS event_seq"
            " FROM deliveries d JOIN events e ON e.id = d.event_id"
            " WHERE d.webhook_id = ? AND d.status = 'pending' AND d.next_attempt_at <= ?"
            " ORDER BY d.next_attempt_at, d.seq LIMIT ?", (webhook_id, now, limit + len(exclude)))
        return [r for r in rows if r["id"] not in exclude][:limit]

    def next_retry(self, webhook_ids: Iterable[str], now: int) -> int | None:
        """The earliest attempt after ``now`` scheduled for any of these endpoints: one
        index lookup each (a dead endpoint's backlog of thousands is never sorted)."""
        times = [self.store.db.scalar(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE webhook_id = ? AND status = 'pending'"
            " AND next_attempt_at > ?", (wid, now)) for wid in webhook_ids]
        return min((t for t in times if t is not None), default=None)

    def record_attempt(self, delivery_id: str, *, attempt: int, status_code: int | None, latency_ms: int,
                       error: str | None, response: str | None, next_attempt_at: int | None,
                       disable_endpoint: str | None = None, not_before: int | None = None) -> str:
        """Store one attempt and move the delivery on: delivered (2xx), pending again at
        ``next_attempt_at`` (never before ``not_before``: what the receiver's ``Retry-After``
        asked), or failed (no more attempts). Returns the new status."""
        now = self.store.clock.now_ms()
        ok = status_code is not None and 200 <= status_code < 300
        if ok:
            status = "delivered"
        elif disable_endpoint is not None:
            status = "cancelled"
        else:
            status = "pending" if next_attempt_at is not None else "failed"
        with self._writing() as conn:
            row = conn.execute("SELECT webhook_id, status FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
            if row is None or row["status"] != "pending":
                return row["status"] if row else "cancelled"  # deleted or redelivered meanwhile
            conn.execute(
                "INSERT INTO delivery_attempts (delivery_id, attempt, at, status_code, latency_ms, error, response)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (delivery_id, attempt, now, status_code, latency_ms, error,
                 response[:_RESPONSE_EXCERPT] if response else None))
            conn.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, next_attempt_at = ?, last_status = ?, last_error = ?,"
                " delivered_at = ?, not_before = ?, updated_at = ? WHERE id = ?",
                (status, attempt, next_attempt_at if status == "pending" else None, status_code, error,
                 now if ok else None, not_before, now, delivery_id))
            if disable_endpoint is not None:
                conn.execute("UPDATE webhooks SET status = 'disabled', disabled_reason = ?, updated_at = ?"
                             " WHERE id = ?", (disable_endpoint, now, row["webhook_id"]))
        return status

    def expedite(self, webhook_id: str) -> int:
        """The endpoint answered 2xx again: its deliveries waiting for a retry because it was
        unreachable or unavailable (no answer, 502, 503, 504) are due now instead of hours
        later (the schedule's gaps grow to a day). Not one that the receiver answered otherwise
        (a 500 or 4xx for that event: retried on schedule, or a failing event would use up its
        attempts at the pace of the others' successes), nor one before its ``Retry-After``.
        Deliveries that already gave up stay ``failed`` (redeliver them). Returns how many
        were moved."""
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            return conn.execute(
                "UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE webhook_id = ? AND status = 'pending'"
                " AND attempts > 0 AND next_attempt_at > ? AND (last_status IS NULL OR last_status IN (502, 503, 504))"
                " AND COALESCE(not_before, 0) <= ?", (now, now, webhook_id, now, now)).rowcount

    def delivery(self, delivery_id: str) -> DeliveryRow | None:
        r = self.store.db.one("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return DeliveryRow.from_row(r) if r else None

    def attempts(self, delivery_id: str) -> list[AttemptRow]:
        return [AttemptRow(attempt=a["attempt"], at=a["at"], status_code=a["status_code"], latency_ms=a["latency_ms"],
                           error=a["error"], response=a["response"]) for a in self.store.db.query(
            "SELECT * FROM delivery_attempts WHERE delivery_id = ? ORDER BY attempt, id", (delivery_id,))]

    def deliveries(self, webhook_id: str, *, status: str | None = None, after: str | None = None,
                   limit: int = 100) -> tuple[list[DeliveryRow], str | None]:
        return page(self.store, "deliveries", {"webhook_id": webhook_id, "status": status}, after=after,
                    limit=limit, row=DeliveryRow.from_row)

    def redeliver(self, old: DeliveryRow) -> DeliveryRow | None:
        """Send the delivery's event to its endpoint again, as a new delivery with the same
        event id (receivers dedupe on it) and sequence number. None if its webhook was deleted."""
        hook = self.store.db.one("SELECT status, deleted_at FROM webhooks WHERE id = ?", (old.webhook_id,))
        if hook is None or hook["deleted_at"] is not None:
            return None
        if old.status == "pending":
            raise Conflict("this delivery is still pending; it will be attempted on schedule",
                           code="delivery_pending")
        now = self.store.clock.now_ms()
        new = new_id("dlv", now_ms=now)
        with self.store.db.transaction() as conn:
            conn.execute(
                "INSERT INTO deliveries (id, webhook_id, event_id, seq, status, next_attempt_at, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                (new, old.webhook_id, old.event_id, old.seq, now, now, now))
            self.store.wake_after_commit("webhooks")
        return self.delivery(new)

    def deliveries_by_endpoint(self, status: str) -> list[tuple[str, int]]:
        """``(webhook id, count)`` of the deliveries in ``status``."""
        return [(r[0], r[1]) for r in self.store.db.query(
            "SELECT webhook_id, COUNT(*) FROM deliveries WHERE status = ? GROUP BY webhook_id", (status,))]

    def backlog(self) -> int:
        return self.store.db.scalar("SELECT COUNT(*) FROM deliveries WHERE status = 'pending'") or 0
