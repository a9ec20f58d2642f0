"""Webhook endpoints, their deliveries and every attempt.

Fan-out happens in the transaction that writes the event: each endpoint whose patterns match
gets a ``pending`` delivery with the endpoint's next sequence number. A disabled endpoint
(by the API, or after answering 410) keeps queueing; nothing is sent to it until it is
enabled again, and then everything that waited goes out. The
dispatcher (``watcher.dispatch``) sends due deliveries and records each attempt here.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest, Conflict, NotFound
from ..ids import new_id
from .events import Event, iso_ms

if TYPE_CHECKING:
    from . import Store

EVENT_TYPES = (
    "transfer.detected", "transfer.confirmed", "transfer.orphaned",
    "invoice.created", "invoice.awaiting_payment", "invoice.awaiting_confirmation", "invoice.completed",
    "invoice.expired", "invoice.failed", "invoice.refunded",
    "payout.pending", "payout.awaiting_approval", "payout.broadcast", "payout.completed", "payout.failed",
    "payout.cancelled",
    "sweep.planned", "sweep.funding", "sweep.broadcast", "sweep.confirmed", "sweep.failed",
    "wallet.gap_filled", "webhook.test",
)
DELIVERY_STATUSES = ("pending", "delivered", "failed", "cancelled")
_RESPONSE_EXCERPT = 500


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def check_patterns(patterns: Any) -> list[str]:
    """Event patterns: ``*``, ``invoice.*`` or an exact type; at least one, no unknown ones."""
    if not isinstance(patterns, list) or not patterns or len(patterns) > 50:
        raise BadRequest("events must be a non-empty list of event types or patterns such as \"invoice.*\"",
                         code="invalid_events")
    out = []
    for p in patterns:
        if not isinstance(p, str) or not p or len(p) > 64:
            raise BadRequest("each event pattern must be a non-empty string", code="invalid_events")
        if not any(fnmatchcase(t, p) for t in EVENT_TYPES):
            raise BadRequest(f"event pattern {p[:64]!r} matches no event type", code="invalid_events")
        if p not in out:
            out.append(p)
    return out


class Webhooks:
    def __init__(self, store: Store):
        self.store = store

    # --- endpoints ------------------------------------------------------------------------

    def create(self, url: str, patterns: list[str], description: str | None) -> tuple[dict[str, Any], str]:
        now = self.store.clock.now_ms()
        wid = new_id("wh", now_ms=now)
        secret = new_secret()
        with self.store.db.transaction() as conn:
            conn.execute(
                "INSERT INTO webhooks (id, url, events, description, secret, status, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'active', ?, ?)",
                (wid, url, json.dumps(patterns), description, secret, now, now))
        return self.get(wid), secret

    def _row(self, webhook_id: str) -> sqlite3.Row:
        row = self.store.db.one("SELECT * FROM webhooks WHERE id = ? AND deleted_at IS NULL", (webhook_id,))
        if row is None:
            raise NotFound(f"no webhook {webhook_id[:64]!r}", code="unknown_webhook")
        return row

    def get(self, webhook_id: str) -> dict[str, Any]:
        return self.view(self._row(webhook_id))

    def view(self, row: sqlite3.Row) -> dict[str, Any]:
        counts = {r[0]: r[1] for r in self.store.db.query(
            "SELECT status, COUNT(*) FROM deliveries WHERE webhook_id = ? GROUP BY status", (row["id"],))}
        return {
            "id": row["id"],
            "url": row["url"],
            "events": json.loads(row["events"]),
            "description": row["description"],
            "status": row["status"],
            "disabled_reason": row["disabled_reason"],
            "last_sequence": row["last_seq"],
            "deliveries": {s: counts.get(s, 0) for s in DELIVERY_STATUSES},
            "secret_rotating_until": iso_ms(row["old_secret_until"]) if row["old_secret"] else None,
            "created_at": iso_ms(row["created_at"]),
        }

    def list(self) -> list[dict[str, Any]]:
        return [self.view(r) for r in self.store.db.query(
            "SELECT * FROM webhooks WHERE deleted_at IS NULL ORDER BY id")]

    def update(self, webhook_id: str, *, url: str | None = None, patterns: list[str] | None = None,
               enabled: bool | None = None, description: str | None = None) -> dict[str, Any]:
        row = self._row(webhook_id)
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            if url is not None:
                conn.execute("UPDATE webhooks SET url = ? WHERE id = ?", (url, webhook_id))
            if patterns is not None:
                conn.execute("UPDATE webhooks SET events = ? WHERE id = ?", (json.dumps(patterns), webhook_id))
            if description is not None:
                conn.execute("UPDATE webhooks SET description = ? WHERE id = ?", (description, webhook_id))
            if enabled is not None and enabled != (row["status"] == "active"):
                conn.execute("UPDATE webhooks SET status = ?, disabled_reason = ? WHERE id = ?",
                             ("active" if enabled else "disabled", None if enabled else "disabled by API", webhook_id))
                if enabled:  # what waited while it was off goes out now
                    conn.execute("UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE webhook_id = ?"
                                 " AND status = 'pending'", (now, now, webhook_id))
            conn.execute("UPDATE webhooks SET updated_at = ? WHERE id = ?", (now, webhook_id))
            self.store.wake_after_commit("webhooks")
        return self.get(webhook_id)

    def delete(self, webhook_id: str) -> None:
        self._row(webhook_id)
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE webhooks SET deleted_at = ?, status = 'disabled', disabled_reason = 'deleted',"
                         " updated_at = ? WHERE id = ?", (now, now, webhook_id))
            conn.execute("UPDATE deliveries SET status = 'cancelled', next_attempt_at = NULL, updated_at = ?"
                         " WHERE webhook_id = ? AND status = 'pending'", (now, webhook_id))

    def rotate_secret(self, webhook_id: str) -> tuple[dict[str, Any], str]:
        """A new secret; the previous one keeps signing (both signatures sent) for the grace."""
        row = self._row(webhook_id)
        now = self.store.clock.now_ms()
        secret = new_secret()
        grace = self.store.config.webhooks.rotation_grace * 1000
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE webhooks SET secret = ?, old_secret = ?, old_secret_until = ?, updated_at = ?"
                         " WHERE id = ?", (secret, row["secret"] if grace else None, now + grace if grace else None,
                                           now, webhook_id))
        return self.get(webhook_id), secret

    def secrets(self, webhook_id: str) -> list[str]:
        """The secrets to sign with now: the current one, then the previous one during rotation."""
        row = self.store.db.one("SELECT secret, old_secret, old_secret_until FROM webhooks WHERE id = ?",
                                (webhook_id,))
        if row is None:
            return []
        out = [row["secret"]]
        if row["old_secret"] and (row["old_secret_until"] or 0) > self.store.clock.now_ms():
            out.append(row["old_secret"])
        return out

    # --- fan-out (inside the event's transaction) -----------------------------------------

    def fan_out(self, event: Event, only: str | None = None) -> int:
        conn = self.store.db.conn
        if only is not None:
            targets = [only]
        else:
            # disabled endpoints still queue (they are paused, not forgotten); deleted ones do not
            targets = [r["id"] for r in conn.execute("SELECT id, events FROM webhooks WHERE deleted_at IS NULL")
                       if any(fnmatchcase(event.type, p) for p in json.loads(r["events"]))]
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

    def send_test(self, webhook_id: str) -> dict[str, Any]:
        self._row(webhook_id)
        with self.store.db.transaction():
            event = self.store.events.emit("webhook.test", {"webhook_id": webhook_id, "message": "test event"},
                                           subject=webhook_id, webhooks_only=webhook_id)
            delivery = self.store.db.one("SELECT * FROM deliveries WHERE event_id = ? AND webhook_id = ?",
                                         (event.id, webhook_id))
        return self.delivery_view(delivery)

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
                       disable_endpoint: str | None = None) -> str:
        """Store one attempt and move the delivery on: delivered (2xx), pending again at
        ``next_attempt_at``, or failed (no more attempts). Returns the new status."""
        now = self.store.clock.now_ms()
        ok = status_code is not None and 200 <= status_code < 300
        if ok:
            status = "delivered"
        elif disable_endpoint is not None:
            status = "cancelled"
        else:
            status = "pending" if next_attempt_at is not None else "failed"
        with self.store.db.transaction() as conn:
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
                " delivered_at = ?, updated_at = ? WHERE id = ?",
                (status, attempt, next_attempt_at if status == "pending" else None, status_code, error,
                 now if ok else None, now, delivery_id))
            if disable_endpoint is not None:
                conn.execute("UPDATE webhooks SET status = 'disabled', disabled_reason = ?, updated_at = ?"
                             " WHERE id = ?", (disable_endpoint, now, row["webhook_id"]))
        return status

    def expedite(self, webhook_id: str) -> int:
        """The endpoint answered 2xx again: its deliveries waiting for a retry are due now
        instead of hours later (the schedule's gaps grow to a day). Deliveries that already
        gave up stay ``failed`` (redeliver them). Returns how many were moved."""
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            return conn.execute(
                "UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE webhook_id = ? AND status = 'pending'"
                " AND attempts > 0 AND next_attempt_at > ?", (now, now, webhook_id, now)).rowcount

    def delivery(self, delivery_id: str) -> sqlite3.Row:
        row = self.store.db.one("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        if row is None:
            raise NotFound(f"no delivery {delivery_id[:64]!r}", code="unknown_delivery")
        return row

    def delivery_view(self, row: sqlite3.Row, *, attempts: bool = False) -> dict[str, Any]:
        ev = self.store.db.one("SELECT type FROM events WHERE id = ?", (row["event_id"],))
        out: dict[str, Any] = {
            "id": row["id"],
            "webhook_id": row["webhook_id"],
            "event_id": row["event_id"],
            "event_type": ev["type"] if ev else None,
            "sequence": row["seq"],
            "status": row["status"],
            "attempts": row["attempts"],
            "next_attempt_at": iso_ms(row["next_attempt_at"]),
            "last_status_code": row["last_status"],
            "last_error": row["last_error"],
            "created_at": iso_ms(row["created_at"]),
            "delivered_at": iso_ms(row["delivered_at"]),
        }
        if attempts:
            out["attempt_log"] = [
                {"attempt": a["attempt"], "at": iso_ms(a["at"]), "status_code": a["status_code"],
                 "latency_ms": a["latency_ms"], "error": a["error"], "response": a["response"]}
                for a in self.store.db.query(
                    "SELECT * FROM delivery_attempts WHERE delivery_id = ? ORDER BY attempt, id", (row["id"],))]
        return out

    def deliveries(self, webhook_id: str, *, status: str | None = None, after: str | None = None,
                   limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        self._row(webhook_id)
        if status is not None and status not in DELIVERY_STATUSES:
            raise BadRequest(f"status must be one of {', '.join(DELIVERY_STATUSES)}", code="invalid_status")
        sql = "SELECT * FROM deliveries WHERE webhook_id = ?"
        params: list[Any] = [webhook_id]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        if after is not None:
            sql += " AND id > ?"
            params.append(after)
        rows = self.store.db.query(sql + " ORDER BY id LIMIT ?", [*params, limit + 1])
        items = [self.delivery_view(r, attempts=True) for r in rows[:limit]]
        return items, (items[-1]["id"] if len(rows) > limit else None)

    def redeliver(self, delivery_id: str) -> dict[str, Any]:
        """Send the delivery's event to its endpoint again, as a new delivery with the same
        event id (receivers dedupe on it) and sequence number."""
        old = self.delivery(delivery_id)
        hook = self.store.db.one("SELECT status, deleted_at FROM webhooks WHERE id = ?", (old["webhook_id"],))
        if hook is None or hook["deleted_at"] is not None:
            raise NotFound("the delivery's webhook was deleted", code="unknown_webhook")
        if old["status"] == "pending":
            raise Conflict("this delivery is still pending; it will be attempted on schedule",
                           code="delivery_pending")
        now = self.store.clock.now_ms()
        new = new_id("dlv", now_ms=now)
        with self.store.db.transaction() as conn:
            conn.execute(
                "INSERT INTO deliveries (id, webhook_id, event_id, seq, status, next_attempt_at, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
                (new, old["webhook_id"], old["event_id"], old["seq"], now, now, now))
            self.store.wake_after_commit("webhooks")
        return self.delivery_view(self.delivery(new))

    def backlog(self) -> int:
        return self.store.db.scalar("SELECT COUNT(*) FROM deliveries WHERE status = 'pending'") or 0
