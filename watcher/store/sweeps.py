"""Sweeps: moving confirmed deposits from deposit addresses to the chain's treasury.

``planned`` → (``funding``: the hot wallet tops up gas for a token sweep) → ``broadcast`` →
``confirmed`` | ``failed``, with ``sweep.<status>`` events. A confirmed transfer to a derived
address makes its (address, asset) a candidate; the sweeper looks only at candidates, so a
million quiet addresses cost nothing.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from ..chains import SignedTx
from ..errors import NotFound
from ..ids import new_id
from ..money import format_amount
from .common import page, set_status
from .events import iso_ms

if TYPE_CHECKING:
    from . import Store

STATUSES = ("planned", "funding", "broadcast", "confirmed", "failed")
ACTIVE = ("planned", "funding", "broadcast")


class Sweeps:
    def __init__(self, store: Store):
        self.store = store
        store.transfers.on_change(self._on_transfer)

    def _on_transfer(self, transfer: dict[str, Any], old: str | None, new: str) -> None:
        if new != "confirmed":
            return
        chain = transfer["chain"]
        cfg = self.store.config.chain(chain)
        if cfg is None or not cfg.sweep.enabled or transfer["asset"] not in cfg.sweep.min_amount:
            return
        address = self.store.family(chain).validate_address(transfer["address"])
        watched = self.store.addresses.get(chain, address)
        if watched is None or watched.derivation_index is None:
            return  # external addresses are watched, never swept
        self.store.db.conn.execute(
            "INSERT OR IGNORE INTO sweep_candidates (chain, address, asset, since) VALUES (?, ?, ?, ?)",
            (chain, address, transfer["asset"], self.store.clock.now_ms()))

    def candidates(self, chain: str, limit: int) -> list[sqlite3.Row]:
        """Candidates, tokens first, so that the native sweep of an address comes after its
        token sweeps and also collects what is left of their gas. (The sweeper runs one sweep
        per address at a time: a token sweep needs the gas a native sweep would take.)"""
        native = self.store.chain_config(chain).native_symbol
        return self.store.db.query("SELECT * FROM sweep_candidates WHERE chain = ? ORDER BY asset = ?, since LIMIT ?",
                                   (chain, native, limit))

    def busy_addresses(self, chain: str) -> set[str]:
        """Addresses not to plan a sweep for now: one is under way, or a transaction they
        sent is not settled (e.g. a confirmed sweep's transaction a reorg took off the chain,
        being sent again): a new sweep would take the same nonce."""
        return {r[0] for r in self.store.db.query(
            f"SELECT address FROM sweeps WHERE chain = ? AND status IN ({','.join('?' * len(ACTIVE))})"
            " UNION SELECT sender FROM chain_txs WHERE chain = ? AND purpose = 'sweep' AND status = 'open'",
            (chain, *ACTIVE, chain))}

    def drop_candidate(self, chain: str, address: str, asset: str) -> None:
        with self.store.db.transaction() as conn:
            conn.execute("DELETE FROM sweep_candidates WHERE chain = ? AND address = ? AND asset = ?",
                         (chain, address, asset))

    def plan(self, chain: str, address: str, asset: str, amount: int, to: str) -> str:
        now = self.store.clock.now_ms()
        sid = new_id("sw", now_ms=now)
        with self.store.db.transaction() as conn:
            conn.execute("DELETE FROM sweep_candidates WHERE chain = ? AND address = ? AND asset = ?",
                         (chain, address, asset))
            conn.execute("INSERT INTO sweeps (id, chain, asset, address, to_address, amount, status, created_at,"
                         " updated_at) VALUES (?, ?, ?, ?, ?, ?, 'planned', ?, ?)",
                         (sid, chain, asset, address, to, str(amount), now, now))
            self._emit(sid)
        return sid

    def active(self, chain: str) -> list[sqlite3.Row]:
        return self.store.db.query(
            f"SELECT * FROM sweeps WHERE chain = ? AND status IN ({','.join('?' * len(ACTIVE))}) ORDER BY id",
            (chain, *ACTIVE))

    def funding(self, sweep_id: str, tx: SignedTx, hot_wallet: str, topup: int, native: str) -> None:
        row = self._row(sweep_id)
        with self.store.db.transaction():
            self.store.chaintxs.add(row["chain"], purpose="topup", ref_id=sweep_id, sender=hot_wallet, asset=native,
                                    amount=topup, tx=tx)
            self._set(sweep_id, "funding", topup_amount=str(topup + int(row["topup_amount"] or 0)),
                      topup_txid=tx.txid, attempts=row["attempts"] + 1)

    def signed(self, sweep_id: str, tx: SignedTx, amount: int, *, replacement: bool = False) -> None:
        row = self._row(sweep_id)
        with self.store.db.transaction():
            self.store.chaintxs.add(row["chain"], purpose="sweep", ref_id=sweep_id, sender=row["address"],
                                    asset=row["asset"], amount=amount, tx=tx)
            if replacement:
                self.store.db.conn.execute("UPDATE sweeps SET txid = ?, amount = ?, updated_at = ? WHERE id = ?",
                                           (tx.txid, str(amount), self.store.clock.now_ms(), sweep_id))
            else:
                self._set(sweep_id, "broadcast", txid=tx.txid, amount=str(amount))

    def topup_fee(self, sweep_id: str, fee_paid: int | None) -> None:
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE sweeps SET topup_fee_paid = ? WHERE id = ?",
                         (None if fee_paid is None else str(fee_paid), sweep_id))

    def confirmed(self, sweep_id: str, *, txid: str, fee_paid: int | None, dust: int | None) -> None:
        self._set(sweep_id, "confirmed", txid=txid, fee_paid=None if fee_paid is None else str(fee_paid),
                  dust=None if dust is None else str(dust), confirmed_at=self.store.clock.now_ms(), reason=None)

    def failed(self, sweep_id: str, reason: str) -> None:
        self._set(sweep_id, "failed", reason=reason[:500])

    def replan(self, sweep_id: str, reason: str) -> None:
        """Back to ``planned`` (e.g. fees rose past the gas bought): the next run tops up again."""
        self._set(sweep_id, "planned", reason=reason[:500])

    def _row(self, sweep_id: str) -> sqlite3.Row:
        row = self.store.db.one("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
        if row is None:
            raise NotFound(f"no sweep {sweep_id[:64]!r}", code="unknown_sweep")
        return row

    def _set(self, sweep_id: str, status: str, **fields: Any) -> None:
        set_status(self.store, "sweeps", "sweep", sweep_id, status, self.get, **fields)

    def _emit(self, sweep_id: str) -> None:
        view = self.get(sweep_id)
        self.store.events.emit(f"sweep.{view['status']}", view, chain=view["chain"], subject=sweep_id)

    # --- reading ----------------------------------------------------------------------------

    def get(self, sweep_id: str) -> dict[str, Any]:
        return self.view(self._row(sweep_id))

    def view(self, row: sqlite3.Row) -> dict[str, Any]:
        cfg = self.store.chain_config(row["chain"])
        family = self.store.family(row["chain"])
        asset = cfg.asset(row["asset"])
        decimals = asset.decimals if asset else 0
        nd = cfg.native_decimals

        def native(v: str | None) -> str | None:
            return None if v is None else format_amount(int(v), nd)

        txs = self.store.chaintxs.for_ref(row["id"], "topup") + self.store.chaintxs.for_ref(row["id"], "sweep")
        return {
            "id": row["id"], "chain": row["chain"], "asset": row["asset"],
            "address": family.display_address(row["address"]), "to": family.display_address(row["to_address"]),
            "amount": format_amount(int(row["amount"]), decimals), "base_units": row["amount"],
            "status": row["status"], "reason": row["reason"], "txid": row["txid"],
            "topup_amount": native(row["topup_amount"]), "topup_txid": row["topup_txid"],
            "fee_paid": native(row["fee_paid"]), "topup_fee_paid": native(row["topup_fee_paid"]),
            "dust": native(row["dust"]), "transactions": [self.store.chaintxs.view(t) for t in txs],
            "created_at": iso_ms(row["created_at"]), "confirmed_at": iso_ms(row["confirmed_at"]),
        }

    def list(self, *, status: str | None = None, chain: str | None = None, after: str | None = None,
             limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        return page(self.store, "sweeps", {"status": status, "chain": chain}, after=after, limit=limit,
                    view=self.view, statuses=STATUSES)
