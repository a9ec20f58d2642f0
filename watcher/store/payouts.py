"""Payouts (withdrawals) from the hot wallet.

``pending`` → ``broadcast`` → ``completed`` | ``failed``; ``awaiting_approval`` first when the
amount is above the chain's ``approval_above``; ``cancelled`` only before broadcast. Each
status change writes ``payout.<status>`` in its transaction. The idempotency key makes a
retried request return the payout already made (never a second one); the same key with a
different request is refused.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import views
from ..auth import Principal
from ..chains import SignedTx
from ..errors import Conflict, Forbidden
from ..ids import new_id
from .common import page, remined, set_status, still_sendable

if TYPE_CHECKING:
    from . import Store

STATUSES = ("pending", "awaiting_approval", "broadcast", "completed", "failed", "cancelled")
LIVE = ("pending", "awaiting_approval", "broadcast", "completed")  # count towards rate limits
# count towards amount limits: a payout waiting for approval does not (it would let anyone
# block everyone's payouts with requests nobody approves); it is checked again when approved
COMMITTED = ("pending", "broadcast", "completed")


@dataclass(frozen=True, slots=True)
class PayoutRow:
    id: str
    chain: str
    asset: str
    amount: int
    to_address: str
    idempotency_key: str
    request_hash: str
    label: str | None
    metadata: dict[str, Any]
    status: str
    reason: str | None
    txid: str | None
    block_number: int | None
    fee_paid: int | None
    created_by: str | None  # the name of the key that created it
    owner: str | None  # its id (key_... or config:<name>)
    invoice_id: str | None  # a refund: the invoice it pays back
    approved_by: str | None
    created_at: int
    approved_at: int | None
    broadcast_at: int | None
    completed_at: int | None

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> PayoutRow:
        return cls(id=r["id"], chain=r["chain"], asset=r["asset"], amount=int(r["amount"]), to_address=r["to_address"],
                   idempotency_key=r["idempotency_key"], request_hash=r["request_hash"], label=r["label"],
                   metadata=json.loads(r["metadata"]), status=r["status"], reason=r["reason"], txid=r["txid"],
                   block_number=r["block_number"], fee_paid=None if r["fee_paid"] is None else int(r["fee_paid"]),
                   created_by=r["created_by"], owner=r["owner"], invoice_id=r["invoice_id"],
                   approved_by=r["approved_by"], created_at=r["created_at"],
                   approved_at=r["approved_at"], broadcast_at=r["broadcast_at"], completed_at=r["completed_at"])


def request_hash(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Payouts:
    def __init__(self, store: Store):
        self.store = store

    def row(self, payout_id: str) -> PayoutRow | None:
        r = self.store.db.one("SELECT * FROM payouts WHERE id = ?", (payout_id,))
        return PayoutRow.from_row(r) if r else None

    def by_key(self, key: str) -> PayoutRow | None:
        r = self.store.db.one("SELECT * FROM payouts WHERE idempotency_key = ?", (key,))
        return PayoutRow.from_row(r) if r else None

    def render(self, row: PayoutRow) -> dict[str, Any]:
        """The payout as the API and its events show it (``watcher.views``)."""
        return views.payout(self.store.chain_config(row.chain), row, self.store.chaintxs.for_ref(row.id, "payout"))

    def create(self, *, chain: str, asset: str, amount: int, to: str, idempotency_key: str, label: str | None,
               metadata: dict[str, Any], actor: Principal | str, needs_approval: bool,
               invoice_id: str | None = None) -> tuple[PayoutRow, bool]:
        """``(payout, created)``; an existing payout for the key is returned as it is (to the
        key that created it: another key's idempotency key is a conflict)."""
        digest = request_hash(chain=chain, asset=asset, amount=str(amount), to=to, label=label, metadata=metadata,
                              **({"invoice_id": invoice_id} if invoice_id else {}))
        name, owner = (actor.name, actor.id) if isinstance(actor, Principal) else (actor, None)
        existing = self.by_key(idempotency_key)
        if existing is not None:
            if isinstance(actor, Principal) and existing.owner != owner and not actor.admin:
                raise Conflict("this idempotency_key was used by another API key", code="idempotency_key_reused")
            if existing.request_hash != digest:
                raise Conflict("this idempotency_key was used for a different payout", code="idempotency_key_reused")
            return existing, False
        now = self.store.clock.now_ms()
        pid = new_id("po", now_ms=now)
        status = "awaiting_approval" if needs_approval else "pending"
        with self.store.db.transaction() as conn:
            conn.execute(
                "INSERT INTO payouts (id, chain, asset, amount, to_address, idempotency_key, request_hash, label,"
                " metadata, status, created_by, owner, created_at, updated_at, invoice_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, chain, asset, str(amount), to, idempotency_key, digest, label,
                 json.dumps(metadata, separators=(",", ":"), ensure_ascii=False), status, name, owner, now, now,
                 invoice_id))
            self._emit(pid)
            if invoice_id is not None:
                self.store.invoices.refund_requested(invoice_id)
            self.store.wake_after_commit("sender")
        return self._row(pid), True

    def approve(self, payout_id: str, actor: Principal | str) -> PayoutRow | None:
        """``awaiting_approval`` → ``pending``; None if there is no such payout. Four eyes: the
        key that created a payout cannot approve it."""
        row = self.row(payout_id)
        if row is None:
            return None
        if row.status != "awaiting_approval":
            raise Conflict(f"payout is {row.status}, not awaiting_approval", code="not_awaiting_approval")
        if isinstance(actor, Principal) and row.owner == actor.id:
            raise Forbidden(f"key {actor.id} created this payout and cannot approve it too: approve it with another "
                            "key (the approve scope)", code="approval_by_creator")
        actor = actor.name if isinstance(actor, Principal) else actor
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE payouts SET status = 'pending', approved_by = ?, approved_at = ?, updated_at = ?"
                         " WHERE id = ?", (actor, now, now, payout_id))
            self._emit(payout_id)
            self.store.wake_after_commit("sender")
        return self._row(payout_id)

    def cancel(self, payout_id: str) -> PayoutRow | None:
        """Only before broadcast; None if there is no such payout."""
        row = self.row(payout_id)
        if row is None:
            return None
        if row.status not in ("pending", "awaiting_approval"):
            raise Conflict(f"payout is {row.status}; only pending or awaiting_approval payouts can be cancelled",
                           code="not_cancellable")
        self._set(payout_id, "cancelled", reason="cancelled")
        return self._row(payout_id)

    # --- the sender's transitions -----------------------------------------------------------

    def block(self, payout_id: str, reason: str | None) -> None:
        """Record why a pending payout waits (no event: the status did not change)."""
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE payouts SET reason = ? WHERE id = ? AND status = 'pending'", (reason, payout_id))

    def signed(self, payout_id: str, txs: Sequence[SignedTx]) -> None:
        """Store the signed transaction(s) and move to ``broadcast``, before broadcasting;
        :class:`~watcher.store.common.Withdrawn` if the payout was cancelled, or payouts
        paused, while the wallet signed it."""
        row = self._row(payout_id)
        with self.store.db.transaction():
            still_sendable(self.store, "payouts", payout_id, ("pending",), "payouts")
            for tx in txs:
                self.store.chaintxs.add(row.chain, purpose="payout", ref_id=payout_id, tx=tx)
            self._set(payout_id, "broadcast", reason=None, txid=txs[-1].txid, broadcast_at=self.store.clock.now_ms())

    def replaced(self, payout_id: str, tx: SignedTx) -> None:
        """A fee-bump replacement of the payout's transaction (call inside a transaction)."""
        row = self._row(payout_id)
        with self.store.db.transaction() as conn:
            self.store.chaintxs.add(row.chain, purpose="payout", ref_id=payout_id, tx=tx)
            conn.execute("UPDATE payouts SET txid = ?, updated_at = ? WHERE id = ?",
                         (tx.txid, self.store.clock.now_ms(), payout_id))

    def completed(self, payout_id: str, *, txid: str, block_number: int, fee_paid: int | None) -> None:
        self._set(payout_id, "completed", reason=None, txid=txid, block_number=block_number,
                  fee_paid=None if fee_paid is None else str(fee_paid), completed_at=self.store.clock.now_ms())

    def failed(self, payout_id: str, reason: str, **fields: Any) -> None:
        self._set(payout_id, "failed", reason=reason, **fields)

    def remined(self, payout_id: str, *, txid: str, block_number: int | None, fee_paid: int | None) -> bool:
        """A completed payout's transaction is in another block now (after a reorg), or the
        other transaction of its group was mined: ``payout.remined`` if the record changed."""
        return remined(self.store, "payouts", "payout", payout_id, lambda pid: self.render(self._row(pid)),
                       txid=txid, block_number=block_number, fee_paid=None if fee_paid is None else str(fee_paid))

    def _row(self, payout_id: str) -> PayoutRow:
        row = self.row(payout_id)
        assert row is not None, payout_id
        return row

    def _set(self, payout_id: str, status: str, **fields: Any) -> None:
        with self.store.db.transaction():
            set_status(self.store, "payouts", "payout", payout_id, status, lambda pid: self.render(self._row(pid)),
                       **fields)
            row = self._row(payout_id)
            if row.invoice_id is not None:  # a refund settled, failed or was undone: its invoice follows
                self.store.invoices.refunds_changed(row.invoice_id)

    def refunds(self, invoice_id: str) -> list[PayoutRow]:
        return [PayoutRow.from_row(r) for r in self.store.db.query(
            "SELECT * FROM payouts WHERE invoice_id = ? ORDER BY created_at, id", (invoice_id,))]

    def _emit(self, payout_id: str) -> None:
        row = self._row(payout_id)
        self.store.events.emit(f"payout.{row.status}", self.render(row), chain=row.chain, subject=payout_id)

    # --- reading ----------------------------------------------------------------------------

    def in_status(self, chain: str, status: str) -> list[PayoutRow]:
        return [PayoutRow.from_row(r) for r in self.store.db.query(
            "SELECT * FROM payouts WHERE chain = ? AND status = ? ORDER BY created_at, id", (chain, status))]

    def busy(self, chain: str) -> bool:
        """Is a payout of the chain waiting to be sent or in flight?"""
        return bool(self.store.db.scalar(
            "SELECT EXISTS (SELECT 1 FROM payouts WHERE chain = ? AND status IN ('pending', 'broadcast'))", (chain,)))

    def total_since(self, chain: str, asset: str, since_ms: int, label: str | None = None, *,
                    by_label: bool = False) -> int:
        """Base units of the committed payouts (not awaiting approval, cancelled or failed)
        committed since ``since_ms``: created then, or approved then (one approved a day after
        it was asked for counts from its approval); ``by_label``: only those with ``label``
        (None: the unlabelled ones, which share one bucket)."""
        sql = ("SELECT amount FROM payouts WHERE chain = ? AND asset = ? AND COALESCE(approved_at, created_at) >= ?"
               f" AND status IN ({','.join('?' * len(COMMITTED))})")
        params: list[Any] = [chain, asset, since_ms, *COMMITTED]
        if by_label or label is not None:
            sql += " AND label IS ?"
            params.append(label)
        return sum(int(r[0]) for r in self.store.db.query(sql, params))

    def count_since(self, label: str | None, since_ms: int) -> int:
        """Payouts asked for with ``label`` (None: without one) since ``since_ms``."""
        return self.store.db.scalar(
            f"SELECT COUNT(*) FROM payouts WHERE label IS ? AND created_at >= ? AND status IN ({','.join('?' * len(LIVE))})",
            (label, since_ms, *LIVE)) or 0

    def page(self, *, status: str | None = None, label: str | None = None, chain: str | None = None,
             after: str | None = None, limit: int = 100) -> tuple[list[PayoutRow], str | None]:
        return page(self.store, "payouts", {"status": status, "label": label, "chain": chain}, after=after,
                    limit=limit, row=PayoutRow.from_row)
