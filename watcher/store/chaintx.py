"""Signed transactions and the hot wallet's nonce.

Every transaction watcher signs is stored here (with its raw bytes) in the same transaction
that moves its payout or sweep on, before anything is broadcast. Broadcasting is therefore
always "send these stored bytes", which is idempotent: a crash before, during or after it
leads to the same bytes being sent again, never to a second transfer. A replacement (fee
bump) is a new row with the same sender and nonce; at most one of them can be mined.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from ..chains import FeeQuote, SignedTx

if TYPE_CHECKING:
    from . import Store


class ChainTxs:
    def __init__(self, store: Store):
        self.store = store

    # --- the hot wallet's nonce ----------------------------------------------------------

    def sync_nonce(self, chain: str, address: str, node_nonce: int) -> int:
        """Start from the larger of our counter and the node's pending count."""
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            row = conn.execute("SELECT next_nonce FROM hot_wallets WHERE chain = ?", (chain,)).fetchone()
            nonce = max(node_nonce, row[0] if row else 0)
            conn.execute("INSERT INTO hot_wallets (chain, address, next_nonce, updated_at) VALUES (?, ?, ?, ?)"
                         " ON CONFLICT(chain) DO UPDATE SET address = excluded.address,"
                         " next_nonce = excluded.next_nonce, updated_at = excluded.updated_at",
                         (chain, address, nonce, now))
        return nonce

    def take_nonce(self, chain: str) -> int:
        """Allocate the hot wallet's next nonce (inside the transaction that stores its tx)."""
        assert self.store.db.in_transaction
        conn = self.store.db.conn
        nonce = conn.execute("UPDATE hot_wallets SET next_nonce = next_nonce + 1, updated_at = ? WHERE chain = ?"
                             " RETURNING next_nonce - 1", (self.store.clock.now_ms(), chain)).fetchone()
        if nonce is None:
            raise RuntimeError(f"{chain}: the hot wallet's nonce was never synced")
        return nonce[0]

    # --- transactions ----------------------------------------------------------------------

    def add(self, chain: str, *, purpose: str, ref_id: str, sender: str, asset: str, amount: int, tx: SignedTx) -> None:
        assert self.store.db.in_transaction
        now = self.store.clock.now_ms()
        self.store.db.conn.execute(
            "INSERT INTO chain_txs (chain, purpose, ref_id, sender, nonce, txid, raw, amount, asset, gas_limit, max_fee,"
            " priority_fee, status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?)",
            (chain, purpose, ref_id, sender, tx.nonce, tx.txid, tx.raw, str(amount), asset, tx.gas_limit,
             str(tx.fees.max_fee), None if tx.fees.priority_fee is None else str(tx.fees.priority_fee), now, now))

    def for_ref(self, ref_id: str, purpose: str) -> list[sqlite3.Row]:
        """The transactions of one payout/sweep step, oldest first."""
        return self.store.db.query("SELECT * FROM chain_txs WHERE ref_id = ? AND purpose = ? ORDER BY id",
                                   (ref_id, purpose))

    def open_for_sender(self, chain: str, sender: str) -> list[sqlite3.Row]:
        """Unmined transactions of a sender, the newest per nonce (what is still in flight)."""
        rows = self.store.db.query(
            "SELECT * FROM chain_txs WHERE chain = ? AND sender = ? AND status = 'open' ORDER BY nonce, id",
            (chain, sender))
        latest: dict[int, sqlite3.Row] = {}
        for r in rows:
            latest[r["nonce"]] = r
        return list(latest.values())

    def mark_broadcast(self, txid: str) -> None:
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE chain_txs SET broadcast_at = COALESCE(broadcast_at, ?), updated_at = ? WHERE txid = ?",
                         (now, now, txid))

    def settle(self, mined_txid: str, *, block_number: int, fee_paid: int | None, ok: bool, error: str | None) -> None:
        """One transaction of a nonce was mined: it is ``mined`` or ``failed``, its siblings
        (same sender and nonce) are ``replaced``. Call inside a transaction."""
        conn = self.store.db.conn
        row = conn.execute("SELECT chain, sender, nonce FROM chain_txs WHERE txid = ?", (mined_txid,)).fetchone()
        now = self.store.clock.now_ms()
        conn.execute("UPDATE chain_txs SET status = ?, block_number = ?, fee_paid = ?, error = ?, updated_at = ?"
                     " WHERE txid = ?", ("mined" if ok else "failed", block_number,
                                         None if fee_paid is None else str(fee_paid), error, now, mined_txid))
        conn.execute("UPDATE chain_txs SET status = 'replaced', updated_at = ? WHERE chain = ? AND sender = ?"
                     " AND nonce = ? AND txid != ? AND status = 'open'",
                     (now, row["chain"], row["sender"], row["nonce"], mined_txid))

    def unsettle(self, txid: str) -> None:
        """A mined transaction left the chain (reorg): it and its siblings are open again."""
        conn = self.store.db.conn
        row = conn.execute("SELECT chain, sender, nonce FROM chain_txs WHERE txid = ?", (txid,)).fetchone()
        conn.execute("UPDATE chain_txs SET status = 'open', block_number = NULL, fee_paid = NULL, error = NULL,"
                     " updated_at = ? WHERE chain = ? AND sender = ? AND nonce = ?",
                     (self.store.clock.now_ms(), row["chain"], row["sender"], row["nonce"]))

    @staticmethod
    def fees(row: sqlite3.Row) -> FeeQuote:
        return FeeQuote(max_fee=int(row["max_fee"]),
                        priority_fee=None if row["priority_fee"] is None else int(row["priority_fee"]))

    @staticmethod
    def signed(row: sqlite3.Row) -> SignedTx:
        return SignedTx(raw=row["raw"], txid=row["txid"], nonce=row["nonce"], gas_limit=row["gas_limit"],
                        fees=ChainTxs.fees(row))

    def view(self, row: sqlite3.Row) -> dict[str, Any]:
        from .events import iso_ms

        return {"txid": row["txid"], "purpose": row["purpose"], "nonce": row["nonce"], "status": row["status"],
                "block_number": row["block_number"], "fee_paid": row["fee_paid"], "error": row["error"],
                "max_fee_per_gas": row["max_fee"], "priority_fee_per_gas": row["priority_fee"],
                "created_at": iso_ms(row["created_at"]), "broadcast_at": iso_ms(row["broadcast_at"])}
