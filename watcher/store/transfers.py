"""Transfers to watched addresses and their life: ``detected`` → ``confirmed`` | ``orphaned``.

A transfer is stored once per ``(chain, txid, index)``. Seeing it again in the same block is a
no-op, so replaying blocks (a restart, a kill -9 mid-batch) never credits twice. A transfer
whose block was orphaned and that reappears in the new chain goes back to ``detected``, so
``transfer.confirmed`` is written at most once per inclusion that reaches the depth.
Every status change writes its event in the same transaction.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import views
from ..chains import Block, Deposit, Transfer
from ..config import ChainConfig
from ..ids import new_id
from .common import page

if TYPE_CHECKING:
    from . import Store

log = logging.getLogger(__name__)

STATUSES = ("detected", "confirmed", "orphaned")


class TransferRow(NamedTuple):
    """A stored transfer, with what its address says about it (label, invoice). A named
    tuple, immutable like a frozen dataclass and made in a tenth of its time (0.7 µs against
    7: a frozen dataclass sets each of its 24 fields through ``object.__setattr__``), as a
    catch-up makes two a transfer."""

    id: str
    chain: str
    txid: str
    index: int  # type: ignore[assignment]  # the field, not tuple.index (never called on a row)
    kind: str
    asset: str
    address: str  # canonical
    sender: str
    amount: int
    block_number: int | None  # None while only in the mempool
    block_hash: str | None
    block_time: int | None  # seconds
    status: str
    detected_at: int
    confirmed_at: int | None
    orphaned_at: int | None
    updated_at: int
    min_depth: int = 0  # confirmations needed at least (a coinbase output), beyond the chain's
    address_kind: str | None = None  # 'deposit', 'invoice', 'external', 'hot' (None: no longer watched)
    label: str | None = None
    invoice_id: str | None = None
    order_id: str | None = None
    value: dict[str, Any] | None = None  # its worth in [rates] reference when detected
    gone_at: int | None = None  # unmined and missing from the mempool since this height

    @property
    def counts(self) -> bool:
        """Live for what it pays: not orphaned, and not missing from the mempool unmined."""
        return self.status != "orphaned" and self.gone_at is None

    @classmethod
    def from_row(cls, r: sqlite3.Row, *, status: str | None = None, confirmed_at: int | None = None,
                 updated_at: int | None = None) -> TransferRow:
        """The row as read (``_SELECT``: with its address's label, kind and invoice; a column
        the query has not is None), or as it is once ``status``, ``confirmed_at`` and
        ``updated_at`` are written (given). Read by position: a name lookup in a
        ``sqlite3.Row`` compares names one by one, and took ~19 µs for a row's 24 fields."""
        keys = tuple(r.keys())
        places = _PLACES.get(keys)
        if places is None:
            where = {k: i for i, k in enumerate(keys)}
            places = _PLACES[keys] = tuple(where.get(c) for c in _COLUMNS)
        v: list[Any] = [None if i is None else r[i] for i in places]
        v[_AMOUNT] = int(v[_AMOUNT])
        v[_MIN_DEPTH] = v[_MIN_DEPTH] or 0
        if v[_VALUE]:
            v[_VALUE] = json.loads(v[_VALUE])
        if status:
            v[_STATUS] = status
        if confirmed_at:
            v[_CONFIRMED_AT] = confirmed_at
        if updated_at:
            v[_UPDATED_AT] = updated_at
        return cls(*v)


# TransferRow's fields in order, as the columns that hold them (``index`` is ``idx``), and where
# each is in the rows of a query (by its columns' names: a few queries, a few entries)
_COLUMNS = tuple("idx" if f == "index" else f for f in TransferRow._fields)
_PLACES: dict[tuple[str, ...], tuple[int | None, ...]] = {}
_AMOUNT, _MIN_DEPTH, _VALUE, _STATUS, _CONFIRMED_AT, _UPDATED_AT = (
    _COLUMNS.index(c) for c in ("amount", "min_depth", "value", "status", "confirmed_at", "updated_at"))


class TransferChange(NamedTuple):
    """A transfer's status changed (``old`` is None for a new one); its event is written."""

    id: str
    chain: str
    address: str  # canonical
    asset: str
    invoice_id: str | None
    old: str | None
    new: str


# what _SELECT joins to a transfer, for the address it pays
_ADDRESS_OF = ("SELECT a.kind, a.label, a.invoice_id, i.order_id FROM addresses a LEFT JOIN invoices i"
               " ON i.id = a.invoice_id WHERE a.chain = ? AND a.address = ?")
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

    def _value(self, chain: ChainConfig, t: Transfer) -> str | None:
        """The transfer's worth in the reference currency now (JSON), or None: no rate."""
        asset = chain.asset(t.asset)
        if self.store.valuer is None or asset is None:
            return None
        value = self.store.valuer(t.asset, t.amount, asset.decimals)
        return json.dumps(value, separators=(",", ":")) if value else None

    def record(self, chain: ChainConfig, block: Block, t: Transfer, tip: int) -> TransferChange | None:
        """Store a transfer seen in ``block``; returns the change if its status changed.
        Money from the chain's own hot wallet (top-ups for sweeps) is housekeeping, not a
        deposit. A transfer first seen in the mempool gets its block (same row, no event)."""
        if t.sender and t.sender == self.store.hot_wallet(chain.id):
            return None
        conn = self.store.db.conn
        now = self.store.clock.now_ms()
        tid = new_id("tr", now_ms=now)
        value = self._value(chain, t)
        # a new transfer is written at once (a catch-up finds hundreds a second); one already
        # stored (mined after the mempool, found again after a reorg) is read and updated below
        if conn.execute(
                "INSERT INTO transfers (id, chain, txid, idx, kind, asset, address, sender, amount,"
                " block_number, block_hash, block_time, status, detected_at, updated_at, min_depth, value)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'detected', ?, ?, ?, ?)"
                " ON CONFLICT (chain, txid, idx) DO NOTHING",
                (tid, chain.id, t.txid, t.index, t.kind, t.asset, t.to, t.sender, str(t.amount),
                 block.number, block.hash, block.timestamp, now, now, t.min_depth or None, value),
        ).rowcount == 1:
            # the row as just written, with what _SELECT joins to it (not read back: a scan
            # catching up writes hundreds a second)
            kind, label, invoice_id, order_id = conn.execute(_ADDRESS_OF, (chain.id, t.to)).fetchone() or (None,) * 4
            stored = TransferRow(id=tid, chain=chain.id, txid=t.txid, index=t.index, kind=t.kind, asset=t.asset,
                                 address=t.to, sender=t.sender, amount=t.amount, block_number=block.number,
                                 block_hash=block.hash, block_time=block.timestamp, status="detected", detected_at=now,
                                 confirmed_at=None, orphaned_at=None, updated_at=now, min_depth=t.min_depth or 0,
                                 address_kind=kind, label=label, invoice_id=invoice_id, order_id=order_id,
                                 value=json.loads(value) if value else None)
            change = self._changed(chain, tid, None, "detected", tip, row=stored)
            lag = max(0.0, now / 1000 - block.timestamp)
            metrics = self.store.metrics
            self.store.db.after_commit(
                lambda: metrics.child(metrics.detection_latency, chain.id).observe(lag))
            return change
        row = self.by_key(chain.id, t.txid, t.index)
        assert row is not None
        if row["block_hash"] == block.hash and row["status"] != "orphaned":
            return None  # replay of a block we already have
        # Mined after the mempool showed it, re-included after a reorg, or moved to another
        # block: detected (again) in this block, with what this block says it moved. An EVM
        # log's index counts from the start of its block, so the same transaction mined again
        # elsewhere can hold another of its payments at this index (a batch paying alice then
        # bob, one log earlier in the block: the row that was alice's is bob's now).
        moved = (t.kind, t.asset, t.to, t.sender, str(t.amount)) != (
            row["kind"], row["asset"], row["address"], row["sender"], row["amount"])
        conn.execute(
            "UPDATE transfers SET block_number = ?, block_hash = ?, block_time = ?, status = 'detected',"
            " kind = ?, asset = ?, address = ?, sender = ?, amount = ?, min_depth = ?, value = ?,"
            " confirmed_at = NULL, gone_at = NULL, updated_at = ? WHERE id = ?",
            (block.number, block.hash, block.timestamp, t.kind, t.asset, t.to, t.sender, str(t.amount),
             t.min_depth or None, value if moved else row["value"], now, row["id"]),
        )
        if moved and row["status"] != "orphaned" and row["address"] != t.to:
            # the address it paid before loses it (an orphaned one lost it with its block)
            before = conn.execute("SELECT invoice_id FROM addresses WHERE chain = ? AND address = ?",
                                  (chain.id, row["address"])).fetchone()
            if before is not None and before[0] is not None:
                self.store.invoices.recompute(before[0])
        if row["status"] == "detected" and not moved:
            return None  # same status, only the block changed: no new event
        return self._changed(chain, row["id"], row["status"], "detected", tip)

    def record_unmined(self, chain: ChainConfig, t: Transfer, tip: int) -> TransferChange | None:
        """Store a transfer of a transaction waiting in the node's mempool (no block yet):
        ``detected`` with 0 confirmations. A transfer already known is left alone, except one
        orphaned while unmined (dropped, then sent again) or still missing: it is back."""
        conn = self.store.db.conn
        now = self.store.clock.now_ms()
        row = self.by_key(chain.id, t.txid, t.index)
        if row is None:
            tid = new_id("tr", now_ms=now)
            conn.execute(
                "INSERT INTO transfers (id, chain, txid, idx, kind, asset, address, sender, amount,"
                " status, detected_at, updated_at, min_depth, value)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'detected', ?, ?, ?, ?)",
                (tid, chain.id, t.txid, t.index, t.kind, t.asset, t.to, t.sender, str(t.amount), now, now,
                 t.min_depth or None, self._value(chain, t)))
            return self._changed(chain, tid, None, "detected", tip)
        if row["status"] == "orphaned":  # back in the mempool (after a reorg, or sent again)
            conn.execute("UPDATE transfers SET block_number = NULL, block_hash = NULL, block_time = NULL,"
                         " status = 'detected', confirmed_at = NULL, gone_at = NULL, updated_at = ? WHERE id = ?",
                         (now, row["id"]))
            return self._changed(chain, row["id"], "orphaned", "detected", tip)
        if row["gone_at"] is not None:
            conn.execute("UPDATE transfers SET gone_at = NULL WHERE id = ?", (row["id"],))
        return None

    def unmined(self, chain: str) -> list[tuple[str, str, int | None]]:
        """``(id, txid, gone_at)`` of every live transfer not in a block yet."""
        return [(r[0], r[1], r[2]) for r in self.store.db.query(
            "SELECT id, txid, gone_at FROM transfers WHERE chain = ? AND block_number IS NULL"
            " AND status = 'detected'", (chain,))]

    def by_key(self, chain: str, txid: str, index: int) -> sqlite3.Row | None:
        """The stored row of transfer ``(chain, txid, index)``, if any."""
        return self.store.db.conn.execute("SELECT * FROM transfers WHERE chain = ? AND txid = ? AND idx = ?",
                                          (chain, txid, index)).fetchone()

    def has_unmined(self, chain: str) -> bool:
        """Whether a live transfer of ``chain`` waits for a block (a mempool payment)."""
        return bool(self.store.db.scalar(
            "SELECT EXISTS (SELECT 1 FROM transfers WHERE chain = ? AND block_number IS NULL AND status = 'detected')",
            (chain,)))

    def mark_gone(self, ids: list[str], height: int) -> None:
        """These unmined transfers' transaction is neither in the mempool nor in a block up
        to ``height`` (remembered once: the first height it was missing at)."""
        self.store.db.conn.executemany("UPDATE transfers SET gone_at = ? WHERE id = ? AND gone_at IS NULL",
                                       [(height, i) for i in ids])

    def orphan_gone(self, chain: ChainConfig, scanned: int, tip: int) -> list[TransferChange]:
        """Orphan unmined transfers whose transaction went missing at a height the scan has
        passed without finding it in a block: replaced, double-spent or dropped."""
        rows = self.store.db.conn.execute(
            "SELECT id, status FROM transfers WHERE chain = ? AND block_number IS NULL AND status = 'detected'"
            " AND gone_at IS NOT NULL AND gone_at <= ?", (chain.id, scanned)).fetchall()
        return self._orphan(chain, rows, tip)

    def confirm_upto(self, chain: ChainConfig, tip: int) -> list[TransferChange]:
        """Confirm every detected transfer with ``chain.confirmations`` blocks at ``tip`` (or
        its own ``min_depth``, if more: a coinbase output is credited once it matures)."""
        depth_block = tip - chain.confirmations + 1
        conn = self.store.db.conn
        # the rows with their address's label and invoice in the same query: each confirmation
        # is reported from the row as it is now updated, without reading it back
        now = self.store.clock.now_ms()
        rows = [TransferRow.from_row(r, status="confirmed", confirmed_at=now, updated_at=now) for r in conn.execute(
            _SELECT + " WHERE t.chain = ? AND t.status = 'detected' AND t.block_number <= ?"
            " AND (t.min_depth IS NULL OR t.block_number + t.min_depth - 1 <= ?)"
            " ORDER BY t.block_number, t.txid, t.idx", (chain.id, depth_block, tip))]
        conn.executemany("UPDATE transfers SET status = 'confirmed', confirmed_at = ?, updated_at = ? WHERE id = ?",
                         [(now, now, r.id) for r in rows])
        return [self._changed(chain, r.id, "detected", "confirmed", tip, row=r) for r in rows]

    def confirmed_deposits(self, chain: str, *, upto: int) -> list[tuple[str, str, int]]:
        """``(address, asset, amount)`` of every confirmed transfer to a derived address in a
        block at or below ``upto``."""
        return [(r[0], r[1], int(r[2])) for r in self.store.db.query(
            "SELECT t.address, t.asset, t.amount FROM transfers t JOIN addresses a ON a.chain = t.chain"
            " AND a.address = t.address WHERE t.chain = ? AND t.status = 'confirmed' AND t.block_number <= ?"
            " AND a.derivation_index IS NOT NULL", (chain, upto))]

    def unswept_upto(self, chain: str, block: int) -> list[Deposit]:
        """Confirmed transfers to derived addresses in blocks up to ``block`` that no
        confirmed sweep spent (a UTXO chain's deposits still at their addresses)."""
        return [Deposit(transfer_id=r["id"], address=r["address"], txid=r["txid"], index=r["idx"],
                        amount=int(r["amount"]), block_number=r["block_number"]) for r in self.store.db.query(
            "SELECT t.id, t.address, t.txid, t.idx, t.amount, t.block_number FROM transfers t JOIN addresses a"
            " ON a.chain = t.chain AND a.address = t.address WHERE t.chain = ? AND t.status = 'confirmed'"
            " AND t.block_number <= ? AND a.derivation_index IS NOT NULL AND NOT EXISTS (SELECT 1 FROM"
            " sweep_deposits d JOIN sweeps s ON s.id = d.sweep_id WHERE d.transfer_id = t.id"
            " AND s.status = 'confirmed') ORDER BY t.block_number, t.id", (chain, block))]

    def coins_of(self, chain: str, address: str, asset: str) -> list[Deposit]:
        """Live transfers of ``asset`` to ``address`` in a block (the hot wallet's coins on a
        UTXO chain; whether each is still unspent, and how deep, is the wallet's to ask the
        node)."""
        return [Deposit(transfer_id=r["id"], address=r["address"], txid=r["txid"], index=r["idx"],
                        amount=int(r["amount"]), block_number=r["block_number"]) for r in self.store.db.query(
            "SELECT id, address, txid, idx, amount, block_number FROM transfers WHERE chain = ? AND address = ?"
            " AND asset = ? AND status IN ('detected', 'confirmed') AND block_number IS NOT NULL"
            " ORDER BY block_number, id", (chain, address, asset))]

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

    def _changed(self, chain: ChainConfig, tid: str, old: str | None, new: str, tip: int, *,
                 row: TransferRow | None = None) -> TransferChange:
        """The change's event and counts; ``row`` is the transfer as now stored (read here if
        not given)."""
        if row is None:
            row = self.row(tid)
        assert row is not None
        change = TransferChange(id=tid, chain=chain.id, address=row.address, asset=row.asset,
                                invoice_id=row.invoice_id, old=old, new=new)
        if row.address_kind == "hot":  # the hot wallet's own coins (UTXO): housekeeping, not a deposit
            log.debug("hot wallet coin %s:%d %s", row.txid, row.index, new, extra={"chain": chain.id})
            return change
        view = views.transfer(chain, row, tip=tip)
        self.store.events.queue(f"transfer.{new}", view, chain=chain.id, subject=tid)
        metrics, db = self.store.metrics, self.store.db
        asset, amount = row.asset, row.amount
        db.count_after_commit(metrics.child(metrics.transfers, chain.id, asset, new))
        if new == "confirmed":
            db.count_after_commit(metrics.child(metrics.received, chain.id, asset), amount)
            cfg_asset = chain.asset(asset)
            decimals = cfg_asset.decimals if cfg_asset else 0
            db.count_after_commit(metrics.child(metrics.received_units, chain.id, asset), amount / 10**decimals)
        if log.isEnabledFor(logging.INFO):
            def logged() -> None:
                where = "in the mempool" if view["block_number"] is None else f"in block {view['block_number']}"
                log.info("transfer %s %s: %s %s to %s%s %s (%s)", tid, new, view["amount"], asset,
                         view["address"], f" ({view['label']})" if view["label"] else "", where, view["txid"],
                         extra={"chain": chain.id, "transfer_id": tid, "txid": view["txid"],
                                "invoice_id": view["invoice_id"], "status": new})

            db.after_commit(logged)
        return change

    # --- reading ------------------------------------------------------------------------

    def status_of(self, transfer_id: str) -> str | None:
        return self.store.db.scalar("SELECT status FROM transfers WHERE id = ?", (transfer_id,))

    def row(self, transfer_id: str) -> TransferRow | None:
        r = self.store.db.one(_SELECT + " WHERE t.id = ?", (transfer_id,))
        return TransferRow.from_row(r) if r else None

    def to_address(self, chain: str, address: str, asset: str) -> list[TransferRow]:
        """Every transfer of ``asset`` to ``address`` (an invoice's payments), oldest first."""
        return [TransferRow.from_row(r) for r in self.store.db.query(
            "SELECT * FROM transfers WHERE chain = ? AND address = ? AND asset = ? ORDER BY detected_at, id",
            (chain, address, asset))]

    def page(self, *, chain: str | None = None, address: str | None = None, status: str | None = None,
             since: int | None = None, after: str | None = None, limit: int = 100
             ) -> tuple[list[TransferRow], str | None]:
        """Transfers, oldest first, filtered; ``since`` is ms (updated at or after), ``after``
        the last id of the previous page."""
        filters = {"t.chain": chain, "t.address": address, "t.status": status, "t.updated_at >=": since,
                   # the hot wallet's own coins (UTXO chains) are listed only when asked for by address
                   "IFNULL(a.kind,'') !=": "hot" if address is None else None}
        return page(self.store, "transfers", filters, after=after, limit=limit, row=TransferRow.from_row,
                    select=_SELECT, id_column="t.id")
