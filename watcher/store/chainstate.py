"""Per-chain scan state: the cursor (last scanned block and its hash) and the recent blocks
that new blocks must link to. ``apply_blocks`` and ``rollback`` are the two transactions the
scanner writes; each moves the cursor together with the transfers and events it implies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..chains import Block, Mempool, Transfer
from ..config import ChainConfig
from ..errors import InconsistentData
from .transfers import TransferChange

if TYPE_CHECKING:
    from . import Store


@dataclass(frozen=True)
class Cursor:
    chain: str
    start_block: int
    number: int  # last scanned block (start_block - 1 before the first)
    hash: str | None
    node_info: dict[str, Any]


@dataclass(frozen=True)
class ScanResult:
    tip: int
    detected: int
    confirmed: int


class ChainState:
    def __init__(self, store: Store):
        self.store = store
        self._rollbacks: dict[str, int] = {}  # chain -> rollbacks this process has made

    def rollbacks(self, chain: str) -> int:
        """How many times this process has rolled ``chain`` back (:meth:`rollback`): what a
        reader of the node's answers compares before and after, to tell an answer read
        before the scan followed a reorg (``watcher.txtrack.Statuses``)."""
        return self._rollbacks.get(chain, 0)

    def cursor(self, chain: str) -> Cursor | None:
        row = self.store.db.one("SELECT * FROM chains WHERE id = ?", (chain,))
        if row is None:
            return None
        return Cursor(chain=row["id"], start_block=row["start_block"], number=row["scanned_number"],
                      hash=row["scanned_hash"], node_info=json.loads(row["node_info"]))

    def scanned_number(self, chain: str) -> int:
        value = self.store.db.scalar("SELECT scanned_number FROM chains WHERE id = ?", (chain,))
        return -1 if value is None else value

    def holds_block(self, chain: str, number: int, block_hash: str) -> bool:
        """Does our scanned chain have block ``block_hash`` at height ``number``? False for a
        height the scan has not reached yet or holds another block at; True below the window
        of kept block hashes (final, as far as our chain can tell)."""
        cur = self.cursor(chain)
        if cur is None or number > cur.number:
            return False
        if number == cur.number:
            return cur.hash is None or cur.hash == block_hash
        ours = self.store.db.scalar("SELECT hash FROM blocks WHERE chain = ? AND number = ?", (chain, number))
        return ours is None or ours == block_hash

    def pending_work(self, chain: str) -> dict[str, int]:
        """What is waiting on ``chain`` (``watcher status``)."""
        row = self.store.db.one(
            "SELECT (SELECT COUNT(*) FROM transfers WHERE chain = :c AND status = 'detected') AS unconfirmed_transfers,"
            " (SELECT COUNT(*) FROM invoices WHERE chain = :c AND status IN ('awaiting_payment',"
            " 'awaiting_confirmation')) AS open_invoices,"
            " (SELECT COUNT(*) FROM payouts WHERE chain = :c AND status IN ('pending', 'awaiting_approval'))"
            " AS payouts_waiting,"
            " (SELECT COUNT(*) FROM payouts WHERE chain = :c AND status = 'broadcast') AS payouts_in_flight,"
            " (SELECT COUNT(*) FROM sweeps WHERE chain = :c AND status IN ('planned', 'funding', 'broadcast'))"
            " AS sweeps_in_progress", {"c": chain})
        assert row is not None
        return dict(row)

    def ensure(self, chain: ChainConfig, *, start_block: int, node_info: dict[str, Any]) -> Cursor:
        """Create the chain's cursor on first sight (scanning starts at ``start_block``)."""
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            conn.execute(
                "INSERT INTO chains (id, family, start_block, scanned_number, scanned_hash, node_info,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, NULL, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
                (chain.id, chain.family, start_block, start_block - 1, json.dumps(node_info, sort_keys=True), now, now),
            )
        cursor = self.cursor(chain.id)
        assert cursor is not None
        return cursor

    def recent_blocks(self, chain: str) -> dict[int, str]:
        return {r[0]: r[1] for r in self.store.db.query(
            "SELECT number, hash FROM blocks WHERE chain = ? ORDER BY number", (chain,))}

    def apply_blocks(self, chain: ChainConfig, blocks: list[Block], *, node_head: int) -> ScanResult:
        """Record a run of new blocks (they must continue the cursor) with their transfers,
        advance the cursor, confirm what is now deep enough, prune old block hashes; all in
        one transaction. Raises :class:`InconsistentData` if the blocks do not link."""
        if not blocks:
            raise ValueError("apply_blocks needs at least one block")
        db = self.store.db
        with db.transaction() as conn:
            cur = self.cursor(chain.id)
            assert cur is not None
            prev_number, prev_hash = cur.number, cur.hash
            for b in blocks:
                if b.number != prev_number + 1 or (prev_hash is not None and b.parent_hash != prev_hash):
                    raise InconsistentData(
                        f"{chain.id}: block {b.number} ({b.hash[:12]}) does not link to {prev_number}"
                        f" ({(prev_hash or '?')[:12]})")
                prev_number, prev_hash = b.number, b.hash
            tip = blocks[-1].number
            # keep the finality window *and* the block just below it: a reorg of exactly
            # finality_depth blocks replaces the whole window, and the walk back needs that
            # block as the common ancestor. Relative to the node's head, not only our tip: a
            # scanner that is still a few blocks behind must keep the ancestor of a reorg the
            # node sees at its head.
            keep_from = max(node_head, tip) - chain.finality_depth - 1
            detected = confirmed = 0
            # transfers recorded ahead of the scanner (submit-tx) must be in the blocks we now see
            ahead = self.store.transfers.max_block_above(chain.id, cur.number)
            for b in blocks:
                if ahead is not None and b.number <= ahead:
                    self._react(self.store.transfers.orphan_other_forks(chain, b, tip))
                if b.number > keep_from:
                    conn.execute(
                        "INSERT OR REPLACE INTO blocks (chain, number, hash, parent_hash, timestamp) VALUES (?, ?, ?, ?, ?)",
                        (chain.id, b.number, b.hash, b.parent_hash, b.timestamp),
                    )
                for t in b.transfers:
                    change = self.store.transfers.record(chain, b, t, tip)
                    if change is not None:
                        detected += 1
                        self._react([change])
            conn.execute(
                "UPDATE chains SET scanned_number = ?, scanned_hash = ?, updated_at = ? WHERE id = ?",
                (tip, blocks[-1].hash, self.store.clock.now_ms(), chain.id),
            )
            changes = self.store.transfers.confirm_upto(chain, tip)
            confirmed = len(changes)
            self._react(changes)
            conn.execute("DELETE FROM blocks WHERE chain = ? AND number < ?", (chain.id, tip - chain.finality_depth))
        return ScanResult(tip=tip, detected=detected, confirmed=confirmed)

    def apply_mempool(self, chain: ChainConfig, pool: Mempool) -> int:
        """Record what the node's mempool holds for us (``detected``, 0 confirmations, no
        block), note our unmined transfers whose transaction left it, and orphan those the
        scan has since passed without finding in a block. One transaction; returns the
        number of transfers that changed."""
        with self.store.db.transaction():
            cur = self.cursor(chain.id)
            assert cur is not None
            changes = [c for c in (self.store.transfers.record_unmined(chain, t, cur.number)
                                   for t in pool.transfers) if c is not None]
            present = {t.txid for t in pool.transfers} | pool.txids
            gone = [tid for tid, txid, _ in self.store.transfers.unmined(chain.id) if txid not in present]
            self.store.transfers.mark_gone(gone, pool.height)
            changes += self.store.transfers.orphan_gone(chain, cur.number, cur.number)
            self._react(changes)
        return len(changes)

    def unfollow_mempool(self, chain: ChainConfig) -> int:
        """The chain's mempool is no longer read (``mempool = false`` set while payments seen
        there wait for a block): each such payment is taken as gone at the next height, so it
        is orphaned once the scan passes that block without finding it (found in a block, it
        is detected there as usual). Returns the number of transfers that changed."""
        with self.store.db.transaction():
            cur = self.cursor(chain.id)
            assert cur is not None
            waiting = [tid for tid, _, gone in self.store.transfers.unmined(chain.id) if gone is None]
            self.store.transfers.mark_gone(waiting, cur.number + 1)
            changes = self.store.transfers.orphan_gone(chain, cur.number, cur.number)
            self._react(changes)
        return len(changes)

    def _react(self, changes: list[TransferChange]) -> None:
        """What transfer changes mean for the rest, in the same transaction: an invoice paid
        by one recomputes its status; a confirmed deposit makes its address a sweep candidate."""
        for c in changes:
            if c.invoice_id is not None:
                self.store.invoices.recompute(c.invoice_id)
            if c.new == "confirmed":
                self.store.sweeps.note_confirmed(c.chain, c.address, c.asset)

    def record_lookup(self, chain: ChainConfig, block: Block) -> bool:
        """Record the transfers of one transaction found by ``lookup_tx`` (submit-tx). A block
        above the cursor is recorded ahead of the scanner, which orphans the transfers if it
        finds another block at that height. Returns False (nothing recorded) if the block is
        at or below the cursor but not the one we scanned there (another fork)."""
        with self.store.db.transaction():
            cur = self.cursor(chain.id)
            assert cur is not None
            if block.number <= cur.number:
                ours = cur.hash if block.number == cur.number else self.recent_blocks(chain.id).get(block.number)
                if ours is not None and ours != block.hash:
                    return False
            # a payment the scan already holds in a block of its chain stays there: the node
            # that answered may be on another fork (a replica, a failover), and moved to that
            # fork's block above the cursor it would be orphaned there while the block that
            # really holds it is never scanned again
            fresh = [t for t in block.transfers if not self._held(chain.id, t)]
            changes = [self.store.transfers.record(chain, block, t, cur.number) for t in fresh]
            self._react([c for c in changes if c is not None])
        return True

    def _held(self, chain: str, t: Transfer) -> bool:
        """``t`` is stored, live, in a block our scanned chain holds."""
        row = self.store.transfers.by_key(chain, t.txid, t.index)
        return (row is not None and row["status"] != "orphaned" and row["block_number"] is not None
                and self.holds_block(chain, row["block_number"], row["block_hash"]))

    def rollback(self, chain: ChainConfig, ancestor: int, ancestor_hash: str | None) -> int:
        """Undo every block above ``ancestor`` (a reorg): orphan their transfers (with
        events), reopen our own transactions mined there (the sender checks them again and
        sends the same bytes if the new chain lacks them), and move the cursor back. Returns
        the number of orphaned transfers."""
        with self.store.db.transaction() as conn:
            orphaned = self.store.transfers.orphan_above(chain, ancestor, ancestor)
            self._react(orphaned)
            self.store.chaintxs.reopen_above(chain.id, ancestor)
            conn.execute("DELETE FROM blocks WHERE chain = ? AND number > ?", (chain.id, ancestor))
            conn.execute(
                "UPDATE chains SET scanned_number = ?, scanned_hash = ?, updated_at = ? WHERE id = ?",
                (ancestor, ancestor_hash, self.store.clock.now_ms(), chain.id),
            )
        self._rollbacks[chain.id] = self.rollbacks(chain.id) + 1
        return len(orphaned)
