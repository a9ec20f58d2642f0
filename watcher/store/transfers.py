"""Transfers to watched addresses and their life: ``detected`` → ``confirmed`` | ``orphaned``.

A transfer is stored once per ``(chain, txid, index)``. Seeing it again in the same block is a
no-op, so replaying blocks (a restart, a kill -9 mid-batch) never credits twice. A transfer
whose block was orphaned and that reappears in the new chain goes back to ``detected``, so
``transfer.confirmed`` is written at most once per inclusion that reaches the depth.
Every status change writes its event in the same transaction.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..chains import Block, Transfer
from ..config import ChainConfig
from ..errors import BadRequest, NotFound
from ..ids import new_id
from ..money import format_amount
from .events import iso_ms

if TYPE_CHECKING:
    from . import Store

log = logging.getLogger(__name__)

STATUSES = ("detected", "confirmed", "orphaned")


@dataclass(frozen=True, slots=True)
class TransferChange:
    """A transfer's status changed (``old`` is None for a new one); its event is written."""

    id: str
    chain: str
    address: str  # canonical
    asset: str
    invoice_id: str | None
    old: str | None
    new: str

_SELECT = (
    "SELECT t.*, a.label AS label, a.invoice_id AS invoice_id, a.kind AS address_kind, i.order_id AS order_id"
    " FROM transfers t LEFT JOIN addresses a ON a.chain = t.chain AND a.address = t.address"
    " LEFT JOIN invoices i ON i.id = a.invoice_id"
)


class Transfers:
    def __init__(self, store: Store):
        self.store = store

    # --- state changes (inside a transaction) ---------------------------------------------
    # Each returns the changes it made; the caller (the scan's transaction, see chainstate)
    # applies what they mean for invoices and sweeps.

    def record(self, chain: ChainConfig, block: Block, t: Transfer, tip: int) -> TransferChange | None:
        """Store a transfer seen in ``block``; returns the change if its status changed.
        Money from the chain's own hot wallet (top-ups for sweeps) is housekeeping, not a
        deposit."""
        if t.sender and t.sender == self.store.hot_wallet(chain.id):
            return None
        conn = self.store.db.conn
        now = self.store.clock.now_ms()
        row = conn.execute(
            "SELECT * FROM transfers WHERE chain = ? AND txid = ? AND idx = ?", (chain.id, t.txid, t.index)
        ).fetchone()
        if row is None:
            tid = new_id("tr", now_ms=now)
            conn.execute(
                "INSERT INTO transfers (id, chain, txid, idx, kind, asset, address, sender, amount,"
                " block_number, block_hash, block_time, status, detected_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'detected', ?, ?)",
                (tid, chain.id, t.txid, t.index, t.kind, t.asset, t.to, t.sender, str(t.amount),
                 block.number, block.hash, block.timestamp, now, now),
            )
            change = self._changed(chain, tid, None, "detected", tip)
            lag = max(0.0, now / 1000 - block.timestamp)
            self.store.db.after_commit(lambda: self.store.metrics.detection_latency.labels(chain.id).observe(lag))
            return change
        if row["block_hash"] == block.hash and row["status"] != "orphaned":
            return None  # replay of a block we already have
        # Re-included after a reorg (or moved to another block): back to detected.
        conn.execute(
            "UPDATE transfers SET block_number = ?, block_hash = ?, block_time = ?, status = 'detected',"
            " confirmed_at = NULL, updated_at = ? WHERE id = ?",
            (block.number, block.hash, block.timestamp, now, row["id"]),
        )
        if row["status"] == "detected":
            return None  # same status, only the block changed: no new event
        return self._changed(chain, row["id"], row["status"], "detected", tip)

    def confirm_upto(self, chain: ChainConfig, tip: int) -> list[TransferChange]:
        """Confirm every detected transfer with ``chain.confirmations`` blocks at ``tip``."""
        depth_block = tip - chain.confirmations + 1
        conn = self.store.db.conn
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM transfers WHERE chain = ? AND status = 'detected' AND block_number <= ?"
            " ORDER BY block_number, txid, idx", (chain.id, depth_block))]
        now = self.store.clock.now_ms()
        changes = []
        for tid in ids:
            conn.execute("UPDATE transfers SET status = 'confirmed', confirmed_at = ?, updated_at = ? WHERE id = ?",
                         (now, now, tid))
            changes.append(self._changed(chain, tid, "detected", "confirmed", tip))
        return changes

    def confirmed_deposits(self, chain: str, *, upto: int) -> list[tuple[str, str, int]]:
        """``(address, asset, amount)`` of every confirmed transfer to a derived address in a
        block at or below ``upto``."""
        return [(r[0], r[1], int(r[2])) for r in self.store.db.query(
            "SELECT t.address, t.asset, t.amount FROM transfers t JOIN addresses a ON a.chain = t.chain"
            " AND a.address = t.address WHERE t.chain = ? AND t.status = 'confirmed' AND t.block_number <= ?"
            " AND a.derivation_index IS NOT NULL", (chain, upto))]

    def max_block_above(self, chain: str, number: int) -> int | None:
        """The highest block of a live transfer above ``number`` (None if there is none)."""
        return self.store.db.scalar(
            "SELECT MAX(block_number) FROM transfers WHERE chain = ? AND status IN ('detected', 'confirmed')"
            " AND block_number > ?", (chain, number))

    def orphan_other_forks(self, chain: ChainConfig, block: Block, tip: int) -> list[TransferChange]:
        """Orphan live transfers recorded at ``block.number`` in another block (recorded
        ahead of the scanner, e.g. by submit-tx, in a block that lost a race)."""
        conn = self.store.db.conn
        rows = conn.execute(
            "SELECT id, status FROM transfers WHERE chain = ? AND status IN ('detected', 'confirmed')"
            " AND block_number = ? AND block_hash != ?", (chain.id, block.number, block.hash)).fetchall()
        return self._orphan(chain, rows, tip)

    def orphan_above(self, chain: ChainConfig, ancestor: int, tip: int) -> list[TransferChange]:
        """Orphan every live transfer in a block above ``ancestor`` (after a reorg)."""
        conn = self.store.db.conn
        rows = conn.execute(
            "SELECT id, status FROM transfers WHERE chain = ? AND status != 'orphaned' AND block_number > ?"
            " ORDER BY block_number DESC, txid, idx", (chain.id, ancestor)).fetchall()
        return self._orphan(chain, rows, tip)

    def _orphan(self, chain: ChainConfig, rows: list[sqlite3.Row], tip: int) -> list[TransferChange]:
        now = self.store.clock.now_ms()
        changes = []
        for r in rows:
            self.store.db.conn.execute(
                "UPDATE transfers SET status = 'orphaned', orphaned_at = ?, updated_at = ? WHERE id = ?",
                (now, now, r["id"]))
            changes.append(self._changed(chain, r["id"], r["status"], "orphaned", tip))
        return changes

    def _changed(self, chain: ChainConfig, tid: str, old: str | None, new: str, tip: int) -> TransferChange:
        row = self.store.db.conn.execute(_SELECT + " WHERE t.id = ?", (tid,)).fetchone()
        view = self.view(row, tip=tip)
        self.store.events.emit(f"transfer.{new}", view, chain=chain.id, subject=tid)
        metrics = self.store.metrics
        asset, amount = row["asset"], int(row["amount"])

        def count() -> None:
            log.info("transfer %s %s: %s %s to %s%s in block %d (%s)", tid, new, view["amount"], asset,
                     view["address"], f" ({view['label']})" if view["label"] else "", view["block_number"],
                     view["txid"], extra={"chain": chain.id, "transfer_id": tid, "txid": view["txid"],
                                          "invoice_id": view["invoice_id"], "status": new})
            metrics.transfers.labels(chain.id, asset, new).inc()
            if new == "confirmed":
                metrics.received.labels(chain.id, asset).inc(amount)
                decimals = chain.asset(asset).decimals if chain.asset(asset) else 0
                metrics.received_units.labels(chain.id, asset).inc(amount / 10**decimals)

        self.store.db.after_commit(count)
        return TransferChange(id=tid, chain=chain.id, address=row["address"], asset=asset,
                              invoice_id=row["invoice_id"], old=old, new=new)

    # --- reading ------------------------------------------------------------------------

    def view(self, row: sqlite3.Row, *, tip: int | None = None) -> dict[str, Any]:
        """The public JSON shape of a transfer (API responses and event payloads)."""
        chain = self.store.config.chain(row["chain"])
        spec = self.store.spec(row["chain"])
        asset = chain.asset(row["asset"]) if chain else None
        decimals = asset.decimals if asset else 0
        if tip is None:
            tip = self.store.chains.scanned_number(row["chain"])
        confirmations = 0 if row["status"] == "orphaned" else max(0, tip - row["block_number"] + 1)
        keys = row.keys()
        return {
            "id": row["id"],
            "chain": row["chain"],
            "txid": row["txid"],
            "index": row["idx"],
            "kind": row["kind"],
            "asset": row["asset"],
            "contract": spec.display_address(asset.contract) if asset and asset.contract else None,
            "amount": format_amount(int(row["amount"]), decimals),
            "base_units": row["amount"],
            "decimals": decimals,
            "address": spec.display_address(row["address"]),
            "label": row["label"] if "label" in keys else None,
            "invoice_id": row["invoice_id"] if "invoice_id" in keys else None,
            "order_id": row["order_id"] if "order_id" in keys else None,
            "from": spec.display_address(row["sender"]) if row["sender"] else None,
            "block_number": row["block_number"],
            "block_hash": row["block_hash"],
            "block_time": iso_ms(row["block_time"] * 1000),
            "status": row["status"],
            "confirmations": confirmations,
            "required_confirmations": chain.confirmations if chain else None,
            "detected_at": iso_ms(row["detected_at"]),
            "confirmed_at": iso_ms(row["confirmed_at"]),
            "orphaned_at": iso_ms(row["orphaned_at"]),
        }

    def get(self, transfer_id: str) -> dict[str, Any]:
        row = self.store.db.one(_SELECT + " WHERE t.id = ?", (transfer_id,))
        if row is None:
            raise NotFound(f"no transfer {transfer_id!r}")
        return self.view(row)

    def list(
        self,
        *,
        chain: str | None = None,
        address: str | None = None,
        status: str | None = None,
        since: int | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Transfers, oldest first, filtered; ``since`` is ms (updated at or after), ``after``
        the last id of the previous page. Returns ``(items, next_cursor)``."""
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}", code="invalid_status")
        where, params = [], []
        if chain is not None:
            where.append("t.chain = ?")
            params.append(chain)
        if address is not None:
            where.append("t.address = ?")
            params.append(address)
        if status is not None:
            where.append("t.status = ?")
            params.append(status)
        if since is not None:
            where.append("t.updated_at >= ?")
            params.append(since)
        if after is not None:
            where.append("t.id > ?")
            params.append(after)
        sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY t.id LIMIT ?"
        rows = self.store.db.query(sql, [*params, limit + 1])
        tips: dict[str, int] = {}
        items = []
        for row in rows[:limit]:
            if row["chain"] not in tips:
                tips[row["chain"]] = self.store.chains.scanned_number(row["chain"])
            items.append(self.view(row, tip=tips[row["chain"]]))
        next_cursor = items[-1]["id"] if len(rows) > limit else None
        return items, next_cursor
