"""Invoices (pay orders): each has its own derived address; its status follows its payments
(``watcher.invoicing.decide``) inside the transaction of every transfer change, and the clock
(expiry, monitoring window) through ``apply_deadlines``. Every status change writes
``invoice.<status>`` in the same transaction."""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .. import views
from ..errors import Conflict
from ..ids import new_id
from ..invoicing import InvoiceTerms, Outcome, Payment, decide, timed_status
from .common import page
from .transfers import TransferRow

if TYPE_CHECKING:
    from . import Store

log = logging.getLogger(__name__)


def _terms(row: sqlite3.Row) -> InvoiceTerms:
    return InvoiceTerms(mode=row["mode"], amount=int(row["amount"]) if row["amount"] is not None else None,
                        tolerance_ppm=row["tolerance_ppm"], expires_at=row["expires_at"],
                        monitor_until=row["monitor_until"])


@dataclass(frozen=True, slots=True)
class InvoiceRow:
    id: str
    chain: str
    asset: str
    mode: str
    amount: int | None
    tolerance_ppm: int
    address: str  # canonical
    status: str
    partial: bool
    overpaid: bool
    late: bool
    received: int
    confirmed: int
    order_id: str | None
    metadata: dict[str, Any]
    payment_uri: str | None
    created_at: int
    expires_at: int
    monitor_until: int
    paid_at: int | None
    completed_at: int | None
    created_by: str | None
    terms: InvoiceTerms
    pricing: dict[str, Any] | None  # a fiat-priced invoice's price and locked rate
    refunded: int  # base units its completed refunds paid back
    redirect_url: str | None  # where the checkout page sends the customer once paid

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> InvoiceRow:
        return cls(id=r["id"], chain=r["chain"], asset=r["asset"], mode=r["mode"],
                   amount=None if r["amount"] is None else int(r["amount"]), tolerance_ppm=r["tolerance_ppm"],
                   address=r["address"], status=r["status"], partial=bool(r["partial"]), overpaid=bool(r["overpaid"]),
                   late=bool(r["late"]), received=int(r["received"]), confirmed=int(r["confirmed"]),
                   order_id=r["order_id"], metadata=json.loads(r["metadata"]), payment_uri=r["payment_uri"],
                   created_at=r["created_at"], expires_at=r["expires_at"], monitor_until=r["monitor_until"],
                   paid_at=r["paid_at"], completed_at=r["completed_at"], created_by=r["created_by"],
                   terms=_terms(r), pricing=json.loads(r["pricing"]) if r["pricing"] else None,
                   refunded=int(r["refunded"]), redirect_url=r["redirect_url"])


class Invoices:
    def __init__(self, store: Store):
        self.store = store

    # --- writing ------------------------------------------------------------------------

    def create(self, *, chain: str, asset: str, amount: int | None, mode: str, expires_in: int,
               tolerance_ppm: int, order_id: str | None, metadata: dict[str, Any], actor: str | None,
               node_info: dict[str, Any] | None = None, pricing: dict[str, Any] | None = None,
               quote_id: str | None = None, redirect_url: str | None = None) -> InvoiceRow:
        cfg = self.store.chain_config(chain)
        spec = cfg.spec
        now = self.store.clock.now_ms()
        invoice_id = new_id("inv", now_ms=now)
        expires_at = now + expires_in * 1000
        monitor_until = expires_at + self.store.config.invoices.monitoring_window * 1000
        with self.store.db.transaction() as conn:
            addr = self.store.addresses.derived_for(chain, "invoice", invoice_id, kind="invoice", invoice_id=invoice_id)
            asset_cfg = cfg.asset(asset)
            uri = spec.payment_uri(cfg, addr.address, asset_cfg, amount, node_info or {}) \
                if amount and asset_cfg is not None else None
            conn.execute(
                "INSERT INTO invoices (id, chain, asset, mode, amount, tolerance_ppm, address, status, order_id,"
                " metadata, payment_uri, created_at, expires_at, monitor_until, updated_at, created_by, pricing,"
                " redirect_url) VALUES (?, ?, ?, ?, ?, ?, ?, 'awaiting_payment', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (invoice_id, chain, asset, mode, None if amount is None else str(amount), tolerance_ppm,
                 addr.address, order_id, json.dumps(metadata, separators=(",", ":"), ensure_ascii=False), uri,
                 now, expires_at, monitor_until, now, actor,
                 json.dumps(pricing, separators=(",", ":")) if pricing else None, redirect_url),
            )
            if quote_id is not None and not self.use_quote(quote_id, invoice_id):
                raise Conflict(f"quote {quote_id} was already used by another invoice", code="quote_used")
            row = self.row(invoice_id)
            assert row is not None
            self.store.events.emit("invoice.created", self.render(row), chain=chain, subject=invoice_id)
            self.store.wake_after_commit("invoices")
        return row

    # --- quotes -----------------------------------------------------------------------------

    def create_quote(self, *, chain: str, asset: str, amount: int, pricing: dict[str, Any], ttl_s: int,
                     owner: str | None) -> dict[str, Any]:
        now = self.store.clock.now_ms()
        quote_id = new_id("quo", now_ms=now)
        with self.store.db.transaction() as conn:
            conn.execute("INSERT INTO quotes (id, chain, asset, amount, pricing, created_at, expires_at, owner)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (quote_id, chain, asset, str(amount), json.dumps(pricing, separators=(",", ":")), now,
                          now + ttl_s * 1000, owner))
        quote = self.quote(quote_id)
        assert quote is not None
        return quote

    def quote(self, quote_id: str) -> dict[str, Any] | None:
        r = self.store.db.one("SELECT * FROM quotes WHERE id = ?", (quote_id,))
        if r is None:
            return None
        return {"id": r["id"], "chain": r["chain"], "asset": r["asset"], "amount": int(r["amount"]),
                "pricing": json.loads(r["pricing"]), "created_at": r["created_at"], "expires_at": r["expires_at"],
                "used_by": r["used_by"], "owner": r["owner"]}

    def use_quote(self, quote_id: str, invoice_id: str) -> bool:
        """Mark the quote used by ``invoice_id`` (inside the invoice's transaction); False if
        another invoice used it first."""
        cur = self.store.db.conn.execute("UPDATE quotes SET used_by = ? WHERE id = ? AND used_by IS NULL",
                                         (invoice_id, quote_id))
        return cur.rowcount == 1

    def recompute(self, invoice_id: str) -> str | None:
        """Re-derive status and totals from the invoice's payments and refunds (inside a
        transaction): fully refunded (completed refunds cover what was confirmed) is
        ``refunded``; a refund undone (a reorg took its transaction) re-derives the status
        from the payments."""
        row = self.store.db.one("SELECT * FROM invoices WHERE id = ?", (invoice_id,))
        if row is None:
            return None
        now = self.store.clock.now_ms()
        current = "awaiting_payment" if row["status"] == "refunded" else row["status"]
        outcome = decide(_terms(row), current, self._payments(row), now, confirmed_once=bool(row["confirmed_once"]))
        refunded = int(row["refunded"])
        if refunded > 0 and refunded >= outcome.confirmed:
            outcome = replace(outcome, status="refunded")
        return self._apply(row, outcome, now)

    # --- refunds (inside the payout's transaction) --------------------------------------------

    def refund_requested(self, invoice_id: str) -> None:
        self._emit(invoice_id, "refund_requested", log_it=False)

    def refunds_changed(self, invoice_id: str) -> None:
        """A refund payout changed status: ``refunded`` is what the completed ones paid back;
        ``invoice.refunded`` when it grows (the status moves to ``refunded`` once it covers
        what was confirmed)."""
        row = self.store.db.one("SELECT refunded FROM invoices WHERE id = ?", (invoice_id,))
        if row is None:
            return
        total = sum(p.amount for p in self.store.payouts.refunds(invoice_id) if p.status == "completed")
        before = int(row["refunded"])
        if total == before:
            return
        self.store.db.conn.execute("UPDATE invoices SET refunded = ?, updated_at = ? WHERE id = ?",
                                   (str(total), self.store.clock.now_ms(), invoice_id))
        moved = self.recompute(invoice_id)
        if total > before and moved != "refunded":  # a partial refund: the status stays, the event says so
            self._emit(invoice_id, "refunded", log_it=False)

    def refundable(self, inv: InvoiceRow) -> int:
        """Base units that may still be refunded: what was confirmed, less every refund that
        is not cancelled or failed."""
        asked = sum(p.amount for p in self.store.payouts.refunds(inv.id) if p.status not in ("cancelled", "failed"))
        return max(0, inv.confirmed - asked)

    def apply_deadlines(self) -> int:
        """Expire unpaid invoices past ``expires_at`` and fail paid, unconfirmed ones past
        ``monitor_until``; returns how many changed."""
        now = self.store.clock.now_ms()
        changed = 0
        with self.store.db.transaction():
            rows = self.store.db.query(
                "SELECT * FROM invoices WHERE (status = 'awaiting_payment' AND expires_at <= ?)"
                " OR (status = 'awaiting_confirmation' AND monitor_until <= ? AND confirmed_once = 0)"
                " ORDER BY expires_at", (now, now))
            for row in rows:
                new = timed_status(_terms(row), row["status"], now, confirmed_once=bool(row["confirmed_once"]))
                if new is not None:
                    self.store.db.conn.execute("UPDATE invoices SET status = ?, updated_at = ? WHERE id = ?",
                                               (new, now, row["id"]))
                    self._emit(row["id"], new)
                    changed += 1
        return changed

    def next_deadline(self) -> int | None:
        """The earliest time (ms) at which ``apply_deadlines`` has something to do."""
        return self.store.db.scalar(
            "SELECT MIN(t) FROM (SELECT MIN(expires_at) AS t FROM invoices WHERE status = 'awaiting_payment'"
            " UNION ALL SELECT MIN(monitor_until) FROM invoices WHERE status = 'awaiting_confirmation'"
            " AND confirmed_once = 0)")

    def _payments(self, row: sqlite3.Row) -> list[Payment]:
        rows = self.store.db.query(
            "SELECT amount, status, detected_at FROM transfers WHERE chain = ? AND address = ? AND asset = ?"
            " AND status != 'orphaned' AND gone_at IS NULL AND detected_at <= ?",
            (row["chain"], row["address"], row["asset"], row["monitor_until"]))
        return [Payment(amount=int(r["amount"]), confirmed=r["status"] == "confirmed", detected_at=r["detected_at"])
                for r in rows]

    def _apply(self, row: sqlite3.Row, o: Outcome, now: int) -> str | None:
        status_changed = o.status != row["status"]
        completed_at = row["completed_at"]
        if o.status == "completed" and status_changed:
            completed_at = now
        elif o.status != "completed":
            completed_at = None
        fields = (o.status, int(o.partial), int(o.overpaid), int(o.late), str(o.received), str(o.confirmed),
                  o.paid_at, completed_at)
        current = (row["status"], row["partial"], row["overpaid"], row["late"], row["received"], row["confirmed"],
                   row["paid_at"], row["completed_at"])
        if fields == current:
            return None
        self.store.db.conn.execute(
            "UPDATE invoices SET status = ?, partial = ?, overpaid = ?, late = ?, received = ?, confirmed = ?,"
            " paid_at = ?, completed_at = ?, confirmed_once = confirmed_once OR ?, updated_at = ? WHERE id = ?",
            (*fields, o.status == "completed", now, row["id"]))
        if status_changed:
            self._emit(row["id"], o.status)
            return o.status
        return None

    def _emit(self, invoice_id: str, status: str, *, log_it: bool = True) -> None:
        row = self.row(invoice_id)
        assert row is not None
        view = self.render(row)
        self.store.events.emit(f"invoice.{status}", view, chain=view["chain"], subject=invoice_id)
        self.store.wake_after_commit("invoices")
        if not log_it:
            return
        self.store.db.after_commit(lambda: log.info(
            "invoice %s %s: received %s of %s %s", invoice_id, status, view["received"], view["amount"] or "any",
            view["asset"], extra={"chain": view["chain"], "invoice_id": invoice_id, "order_id": view["order_id"],
                                  "status": status}))

    # --- reading ------------------------------------------------------------------------

    def row(self, invoice_id: str) -> InvoiceRow | None:
        r = self.store.db.one("SELECT * FROM invoices WHERE id = ?", (invoice_id,))
        return InvoiceRow.from_row(r) if r else None

    def payments(self, inv: InvoiceRow) -> list[TransferRow]:
        """Every transfer to the invoice's address in its asset, oldest first."""
        return self.store.transfers.to_address(inv.chain, inv.address, inv.asset)

    def render(self, inv: InvoiceRow) -> dict[str, Any]:
        """The invoice as the API and its events show it (``watcher.views``)."""
        return views.invoice(self.store.chain_config(inv.chain), inv, self.payments(inv),
                             tip=self.store.chains.scanned_number(inv.chain), links=self.store.config.invoice_links,
                             # only an invoice that received money can have refunds: no query for
                             # the unpaid ones (most renders: lists, invoice.created events)
                             refunds=self.store.payouts.refunds(inv.id)
                             if inv.received or inv.confirmed or inv.refunded else ())

    def page(self, *, status: str | None = None, order_id: str | None = None, chain: str | None = None,
             after: str | None = None, limit: int = 100) -> tuple[list[InvoiceRow], str | None]:
        return page(self.store, "invoices", {"status": status, "order_id": order_id, "chain": chain}, after=after,
                    limit=limit, row=InvoiceRow.from_row)
