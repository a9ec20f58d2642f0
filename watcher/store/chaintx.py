"""Every transaction watcher signs, and each chain wallet's remembered state.

A transaction is stored here (with its raw bytes) in the same SQLite transaction that moves
its payout or sweep on and saves the wallet's new state, before anything is broadcast.
Broadcasting is therefore always "send these stored bytes", which is idempotent: a crash
before, during or after it leads to the same bytes being sent again, never to a second
transfer. Transactions that exclude each other (an original and its fee-bump replacements)
share a ``conflict`` key; at most one of them can be mined.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..chains import SignedTx, StoredTx, WalletState

if TYPE_CHECKING:
    from . import Store


def _tx(row: sqlite3.Row) -> StoredTx:
    return StoredTx(
        id=row["id"], chain=row["chain"], purpose=row["purpose"], ref_id=row["ref_id"], txid=row["txid"],
        raw=row["raw"], sender=row["sender"], to=row["to_address"], asset=row["asset"], amount=int(row["amount"]),
        fee_limit=int(row["fee_limit"]), conflict=row["conflict"], details=json.loads(row["details"]),
        status=row["status"], block_number=row["block_number"],
        fee_paid=None if row["fee_paid"] is None else int(row["fee_paid"]), error=row["error"],
        created_at=row["created_at"], broadcast_at=row["broadcast_at"])


class StaleWalletState(Exception):
    """The wallet state changed between reading it and writing the answer based on it."""


class ChainTxs:
    def __init__(self, store: Store):
        self.store = store

    # --- the wallet's state ------------------------------------------------------------------

    def wallet_state(self, chain: str) -> tuple[WalletState, int]:
        """``(state, version)``; an empty state at version 0 before the wallet's first answer."""
        row = self.store.db.one("SELECT state, version FROM wallet_state WHERE chain = ?", (chain,))
        return (json.loads(row["state"]), row["version"]) if row else ({}, 0)

    def put_wallet_state(self, chain: str, state: WalletState, version: int) -> None:
        """Save a wallet's new state, computed from the state at ``version`` (call inside the
        transaction that stores what the state belongs to). Raises :class:`StaleWalletState`
        if it moved on meanwhile, and nothing of the transaction is written."""
        assert self.store.db.in_transaction
        now = self.store.clock.now_ms()
        text = json.dumps(state, separators=(",", ":"), sort_keys=True)
        cur = self.store.db.conn.execute(
            "INSERT INTO wallet_state (chain, state, version, updated_at) VALUES (?, ?, 1, ?)"
            " ON CONFLICT(chain) DO UPDATE SET state = excluded.state, version = version + 1,"
            " updated_at = excluded.updated_at WHERE version = ?", (chain, text, now, version))
        if cur.rowcount != 1:
            raise StaleWalletState(f"{chain}: the wallet state changed while a step was planned")

    # --- transactions ------------------------------------------------------------------------

    def add(self, chain: str, *, purpose: str, ref_id: str, tx: SignedTx) -> None:
        """Store a signed transaction, ``open``. The same bytes made again for the same payout
        or sweep after the node refused them unmined are opened again, not stored twice: a
        fee bump is a fixed rule, so when the node refused a replacement because what it
        replaces had just been mined, and a reorg then took that block away, bumping the same
        transaction again makes the same replacement (found by the Litecoin soak: the sender
        crashed on the duplicate txid). The same txid for anything else is a bug: it raises."""
        assert self.store.db.in_transaction
        now = self.store.clock.now_ms()
        cur = self.store.db.conn.execute(
            "INSERT INTO chain_txs (chain, purpose, ref_id, sender, to_address, conflict, txid, raw, amount, asset,"
            " fee_limit, details, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?, ?)"
            " ON CONFLICT (txid) DO UPDATE SET status = 'open', error = NULL, updated_at = excluded.updated_at"
            " WHERE chain_txs.chain = excluded.chain AND chain_txs.purpose = excluded.purpose"
            " AND chain_txs.ref_id = excluded.ref_id AND chain_txs.status = 'failed' AND chain_txs.block_number IS NULL",
            (chain, purpose, ref_id, tx.sender, tx.to, tx.conflict, tx.txid, tx.raw, str(tx.amount), tx.asset,
             str(tx.fee_limit), json.dumps(dict(tx.details), separators=(",", ":"), sort_keys=True), now, now))
        if cur.rowcount != 1:
            raise ValueError(f"{chain}: transaction {tx.txid} is already stored for another purpose, or in flight")

    def get(self, txid: str) -> StoredTx | None:
        row = self.store.db.one("SELECT * FROM chain_txs WHERE txid = ?", (txid,))
        return _tx(row) if row else None

    def for_ref(self, ref_id: str, *purposes: str) -> list[StoredTx]:
        """The transactions of one payout or sweep (of the given purposes), oldest first."""
        sql = "SELECT * FROM chain_txs WHERE ref_id = ?"
        if purposes:
            sql += f" AND purpose IN ({','.join('?' * len(purposes))})"
        return [_tx(r) for r in self.store.db.query(sql + " ORDER BY id", (ref_id, *purposes))]

    def group(self, chain: str, conflict: str) -> list[StoredTx]:
        """Every transaction of a conflict group, oldest first."""
        return [_tx(r) for r in self.store.db.query(
            "SELECT * FROM chain_txs WHERE chain = ? AND conflict = ? ORDER BY id", (chain, conflict))]

    def in_flight(self, chain: str) -> list[StoredTx]:
        """Unmined transactions of a chain, the newest of each conflict group."""
        latest: dict[str, StoredTx] = {}
        for r in self.store.db.query("SELECT * FROM chain_txs WHERE chain = ? AND status = 'open' ORDER BY id",
                                     (chain,)):
            latest[r["conflict"]] = _tx(r)
        return list(latest.values())

    def to_guard(self, chain: str, final_below: int) -> list[StoredTx]:
        """Transactions whose payout completed or sweep confirmed, or failed because the
        transaction reverted (a reorg may take it off the chain: its nonce would be left
        unsent, and the same bytes may succeed in the new chain), top-ups no funding sweep
        follows any more, fillers and CPFP children (``bump``): open, or mined at or above
        ``final_below`` (not final yet). The finality guard follows them until they are final.
        A payout or sweep failed because the node refused it has no such transaction (its
        rows are ``failed`` without a block)."""
        return [_tx(r) for r in self.store.db.query(
            "SELECT c.* FROM chain_txs c"
            " LEFT JOIN payouts p ON c.purpose = 'payout' AND p.id = c.ref_id"
            " LEFT JOIN sweeps s ON c.purpose IN ('sweep', 'topup') AND s.id = c.ref_id"
            " WHERE c.chain = ? AND (c.status = 'open' OR (c.status IN ('mined', 'failed')"
            " AND c.block_number > ?)) AND ((c.purpose = 'payout' AND p.status IN ('completed', 'failed'))"
            " OR (c.purpose = 'sweep' AND s.status IN ('confirmed', 'failed')) OR c.purpose IN ('filler', 'bump')"
            # every top-up but the newest group of a sweep that is still funding (the sweep
            # follows that one itself)
            " OR (c.purpose = 'topup' AND NOT (s.status = 'funding' AND c.conflict = (SELECT t.conflict"
            " FROM chain_txs t WHERE t.ref_id = c.ref_id AND t.purpose = 'topup' ORDER BY t.id DESC LIMIT 1))))"
            " ORDER BY c.id", (chain, final_below))]

    def mark_broadcast(self, txid: str) -> None:
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE chain_txs SET broadcast_at = COALESCE(broadcast_at, ?), updated_at = ? WHERE txid = ?",
                         (now, now, txid))

    def settle(self, mined: StoredTx, *, block_number: int, fee_paid: int | None, ok: bool, error: str | None) -> None:
        """One transaction of a conflict group was mined: it is ``mined`` or ``failed``, the
        others of its group are ``replaced``. Call inside a transaction."""
        conn = self.store.db.conn
        now = self.store.clock.now_ms()
        conn.execute("UPDATE chain_txs SET status = ?, block_number = ?, fee_paid = ?, error = ?, updated_at = ?"
                     " WHERE txid = ?", ("mined" if ok else "failed", block_number,
                                         None if fee_paid is None else str(fee_paid), error, now, mined.txid))
        conn.execute("UPDATE chain_txs SET status = 'replaced', updated_at = ? WHERE chain = ? AND conflict = ?"
                     " AND txid != ? AND status = 'open'", (now, mined.chain, mined.conflict, mined.txid))

    def unsettle(self, tx: StoredTx) -> None:
        """A mined transaction left the chain (reorg): its whole group is open again."""
        self.store.db.conn.execute(
            "UPDATE chain_txs SET status = 'open', block_number = NULL, fee_paid = NULL, error = NULL,"
            " updated_at = ? WHERE chain = ? AND conflict = ? AND (status != 'failed' OR block_number IS NOT NULL)",
            (self.store.clock.now_ms(), tx.chain, tx.conflict))

    def refused(self, txs: Sequence[StoredTx], error: str) -> None:
        """The node refused these (unmined) transactions for good. Call inside a transaction."""
        now = self.store.clock.now_ms()
        for t in txs:
            self.store.db.conn.execute(
                "UPDATE chain_txs SET status = 'failed', error = ?, updated_at = ? WHERE txid = ? AND status = 'open'",
                (error[:300], now, t.txid))

    def reopen_above(self, chain: str, ancestor: int) -> None:
        """A reorg rolled the chain back to ``ancestor``: our transactions mined above it are
        open again (the sender checks them and sends the same bytes if the new chain lacks
        them). Their whole conflict group opens with them, as in :meth:`unsettle`: the new
        chain may hold another transaction of the group (the original a replacement had won
        against), and only an open row is followed. Call inside the rollback's transaction."""
        self.store.db.conn.execute(
            "UPDATE chain_txs SET status = 'open', block_number = NULL, fee_paid = NULL, error = NULL,"
            " updated_at = ? WHERE chain = ? AND (status IN ('mined', 'replaced') OR (status = 'failed'"
            " AND block_number IS NOT NULL)) AND conflict IN (SELECT conflict FROM chain_txs WHERE chain = ?"
            " AND status IN ('mined', 'failed') AND block_number > ?)",
            (self.store.clock.now_ms(), chain, chain, ancestor))

    def settled_upto(self, chain: str, block: int) -> list[StoredTx]:
        """Transactions mined (or mined and reverted) at or below ``block``."""
        return [_tx(r) for r in self.store.db.query(
            "SELECT * FROM chain_txs WHERE chain = ? AND status IN ('mined', 'failed') AND block_number IS NOT NULL"
            " AND block_number <= ? ORDER BY id", (chain, block))]

    def fillers(self, chain: str, limit: int = 10) -> list[StoredTx]:
        """The chain's most recent filler transactions, newest first."""
        return [_tx(r) for r in self.store.db.query(
            "SELECT * FROM chain_txs WHERE chain = ? AND purpose = 'filler' ORDER BY id DESC LIMIT ?", (chain, limit))]

    def count_open(self, chain: str) -> int:
        return self.store.db.scalar("SELECT COUNT(*) FROM chain_txs WHERE chain = ? AND status = 'open'", (chain,)) or 0
