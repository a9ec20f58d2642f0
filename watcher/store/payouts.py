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

from ..chains import SignedTx
from ..errors import Conflict, NotFound
from ..ids import new_id
from ..money import format_amount
from .common import page, set_status
from .events import iso_ms

if TYPE_CHECKING:
    from . import Store

STATUSES = ("pending", "awaiting_approval", "broadcast", "completed", "failed", "cancelled")
LIVE = ("pending", "awaiting_approval", "broadcast", "completed")  # count towards limits


@dataclass(frozen=True, slots=True)
class PayoutRow:
    id: str
    chain: str
    asset: str
    amount: int
    to_address: str
    status: str
    reason: str | None
    label: str | None

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> PayoutRow:
        return cls(id=r["id"], chain=r["chain"], asset=r["asset"], amount=int(r["amount"]), to_address=r["to_address"],
                   status=r["status"], reason=r["reason"], label=r["label"])


def request_hash(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Payouts:
    def __init__(self, store: Store):
        self.store = store

    def _row(self, payout_id: str) -> sqlite3.Row:
        row = self.store.db.one("SELECT * FROM payouts WHERE id = ?", (payout_id,))
        if row is None:
            raise NotFound(f"no payout {payout_id[:64]!r}", code="unknown_payout")
        return row

    def by_key(self, key: str) -> sqlite3.Row | None:
        return self.store.db.one("SELECT * FROM payouts WHERE idempotency_key = ?", (key,))

    def create(self, *, chain: str, asset: str, amount: int, to: str, idempotency_key: str, label: str | None,
               metadata: dict[str, Any], actor: str, needs_approval: bool) -> tuple[dict[str, Any], bool]:
        """``(payout, created)``; an existing payout for the key is returned as it is."""
        digest = request_hash(chain=chain, asset=asset, amount=str(amount), to=to, label=label, metadata=metadata)
        existing = self.by_key(idempotency_key)
        if existing is not None:
            if existing["request_hash"] != digest:
                raise Conflict("this idempotency_key was used for a different payout", code="idempotency_key_reused")
            return self.view(existing), False
        now = self.store.clock.now_ms()
        pid = new_id("po", now_ms=now)
        status = "awaiting_approval" if needs_approval else "pending"
        with self.store.db.transaction() as conn:
            conn.execute(
                "INSERT INTO payouts (id, chain, asset, amount, to_address, idempotency_key, request_hash, label,"
                " metadata, status, created_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, chain, asset, str(amount), to, idempotency_key, digest, label,
                 json.dumps(metadata, separators=(",", ":"), ensure_ascii=False), status, actor, now, now))
            self._emit(pid)
            self.store.wake_after_commit("sender")
        return self.get(pid), True

    def approve(self, payout_id: str, actor: str) -> dict[str, Any]:
        row = self._row(payout_id)
        if row["status"] != "awaiting_approval":
            raise Conflict(f"payout is {row['status']}, not awaiting_approval", code="not_awaiting_approval")
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE payouts SET status = 'pending', approved_by = ?, approved_at = ?, updated_at = ?"
                         " WHERE id = ?", (actor, now, now, payout_id))
            self._emit(payout_id)
            self.store.wake_after_commit("sender")
        return self.get(payout_id)

    def cancel(self, payout_id: str) -> dict[str, Any]:
        row = self._row(payout_id)
        if row["status"] not in ("pending", "awaiting_approval"):
            raise Conflict(f"payout is {row['status']}; only pending or awaiting_approval payouts can be cancelled",
                           code="not_cancellable")
        self._set(payout_id, "cancelled", reason="cancelled")
        return self.get(payout_id)

    # --- the sender's transitions -----------------------------------------------------------

    def block(self, payout_id: str, reason: str | None) -> None:
        """Record why a pending payout waits (no event: the status did not change)."""
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE payouts SET reason = ? WHERE id = ? AND status = 'pending'", (reason, payout_id))

    def signed(self, payout_id: str, txs: Sequence[SignedTx]) -> None:
        """Store the signed transaction(s) and move to ``broadcast``, before broadcasting."""
        row = self._row(payout_id)
        with self.store.db.transaction():
            for tx in txs:
                self.store.chaintxs.add(row["chain"], purpose="payout", ref_id=payout_id, tx=tx)
            self._set(payout_id, "broadcast", reason=None, txid=txs[-1].txid, broadcast_at=self.store.clock.now_ms())

    def replaced(self, payout_id: str, tx: SignedTx) -> None:
        """A fee-bump replacement of the payout's transaction (call inside a transaction)."""
        row = self._row(payout_id)
        with self.store.db.transaction() as conn:
            self.store.chaintxs.add(row["chain"], purpose="payout", ref_id=payout_id, tx=tx)
            conn.execute("UPDATE payouts SET txid = ?, updated_at = ? WHERE id = ?",
                         (tx.txid, self.store.clock.now_ms(), payout_id))

    def completed(self, payout_id: str, *, txid: str, block_number: int, fee_paid: int | None) -> None:
        self._set(payout_id, "completed", reason=None, txid=txid, block_number=block_number,
                  fee_paid=None if fee_paid is None else str(fee_paid), completed_at=self.store.clock.now_ms())

    def failed(self, payout_id: str, reason: str, **fields: Any) -> None:
        self._set(payout_id, "failed", reason=reason, **fields)

    def _set(self, payout_id: str, status: str, **fields: Any) -> None:
        set_status(self.store, "payouts", "payout", payout_id, status, self.get, **fields)

    def _emit(self, payout_id: str) -> None:
        view = self.get(payout_id)
        self.store.events.emit(f"payout.{view['status']}", view, chain=view["chain"], subject=payout_id)

    # --- reading ----------------------------------------------------------------------------

    def in_status(self, chain: str, status: str) -> list[PayoutRow]:
        return [PayoutRow.from_row(r) for r in self.store.db.query(
            "SELECT * FROM payouts WHERE chain = ? AND status = ? ORDER BY created_at, id", (chain, status))]

    def busy(self, chain: str) -> bool:
        """Is a payout of the chain waiting to be sent or in flight?"""
        return bool(self.store.db.scalar(
            "SELECT EXISTS (SELECT 1 FROM payouts WHERE chain = ? AND status IN ('pending', 'broadcast'))", (chain,)))

    def total_since(self, chain: str, asset: str, since_ms: int, label: str | None = None) -> int:
        sql = ("SELECT amount FROM payouts WHERE chain = ? AND asset = ? AND created_at >= ?"
               f" AND status IN ({','.join('?' * len(LIVE))})")
        params: list[Any] = [chain, asset, since_ms, *LIVE]
        if label is not None:
            sql += " AND label = ?"
            params.append(label)
        return sum(int(r[0]) for r in self.store.db.query(sql, params))

    def count_since(self, label: str, since_ms: int) -> int:
        return self.store.db.scalar(
            f"SELECT COUNT(*) FROM payouts WHERE label = ? AND created_at >= ? AND status IN ({','.join('?' * len(LIVE))})",
            (label, since_ms, *LIVE)) or 0

    def get(self, payout_id: str) -> dict[str, Any]:
        return self.view(self._row(payout_id))

    def view(self, row: sqlite3.Row) -> dict[str, Any]:
        cfg = self.store.chain_config(row["chain"])
        spec = cfg.spec
        asset = cfg.asset(row["asset"])
        decimals = asset.decimals if asset else 0
        txs = self.store.chaintxs.for_ref(row["id"], "payout")
        return {
            "id": row["id"], "chain": row["chain"], "asset": row["asset"],
            "amount": format_amount(int(row["amount"]), decimals), "base_units": row["amount"], "decimals": decimals,
            "to": spec.display_address(row["to_address"]), "label": row["label"],
            "idempotency_key": row["idempotency_key"], "metadata": json.loads(row["metadata"]),
            "status": row["status"], "reason": row["reason"], "txid": row["txid"], **spec.payout_fields(txs),
            "block_number": row["block_number"],
            "fee_paid": None if row["fee_paid"] is None else format_amount(int(row["fee_paid"]), cfg.native_decimals),
            "transactions": [self.store.chaintxs.view(t) for t in txs],
            "created_by": row["created_by"], "approved_by": row["approved_by"],
            "created_at": iso_ms(row["created_at"]), "approved_at": iso_ms(row["approved_at"]),
            "broadcast_at": iso_ms(row["broadcast_at"]), "completed_at": iso_ms(row["completed_at"]),
        }

    def list(self, *, status: str | None = None, label: str | None = None, chain: str | None = None,
             after: str | None = None, limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        return page(self.store, "payouts", {"status": status, "label": label, "chain": chain}, after=after,
                    limit=limit, view=self.view, statuses=STATUSES)
