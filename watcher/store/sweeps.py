"""Sweeps: moving confirmed deposits from deposit addresses to the chain's treasury.

``planned`` → (``funding``: the wallet first sends what the deposit address needs to pay its
own fee, e.g. gas on EVM) → ``broadcast`` → ``confirmed`` | ``failed``, with ``sweep.<status>``
events. A confirmed transfer to a derived address makes its (address, asset) a candidate; the
sweeper looks only at candidates, so a million quiet addresses cost nothing. A sweep lists the
deposits it covers (``sweep_deposits``): one address's on an account chain, many addresses'
on a UTXO chain.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import views
from ..chains import Deposit, SignedTx, StoredTx
from ..ids import new_id
from .common import page, remined, set_status, still_sendable

if TYPE_CHECKING:
    from ..chains import SweepPlan
    from . import Store

STATUSES = ("planned", "funding", "broadcast", "confirmed", "failed")
ACTIVE = ("planned", "funding", "broadcast")


@dataclass(frozen=True, slots=True)
class SweepRow:
    id: str
    chain: str
    asset: str
    address: str  # the (first) deposit address swept
    to_address: str
    amount: int
    status: str
    reason: str | None
    txid: str | None
    fee_paid: int | None
    dust: int | None
    created_at: int
    confirmed_at: int | None

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> SweepRow:
        return cls(id=r["id"], chain=r["chain"], asset=r["asset"], address=r["address"], to_address=r["to_address"],
                   amount=int(r["amount"]), status=r["status"], reason=r["reason"], txid=r["txid"],
                   fee_paid=None if r["fee_paid"] is None else int(r["fee_paid"]),
                   dust=None if r["dust"] is None else int(r["dust"]), created_at=r["created_at"],
                   confirmed_at=r["confirmed_at"])


@dataclass(frozen=True, slots=True)
class Candidate:
    chain: str
    address: str
    asset: str


class Sweeps:
    def __init__(self, store: Store):
        self.store = store

    # --- candidates ---------------------------------------------------------------------------

    def note_confirmed(self, chain: str, address: str, asset: str) -> None:
        """A confirmed deposit to ``address``: (address, asset) is a sweep candidate if the chain
        sweeps that asset and the address is one watcher derived (external addresses are
        watched, never swept). Call inside the transaction that confirmed it."""
        cfg = self.store.config.chain(chain)
        if cfg is None or not cfg.sweep.enabled or asset not in cfg.sweep.min_amount:
            return
        watched = self.store.addresses.get(chain, address)
        if watched is None or watched.derivation_index is None:
            return
        # ``since`` moves to the newest confirmation: a run that read the candidate before this
        # deposit confirmed must not drop it (``plan``, ``drop_candidate`` with ``read_at``)
        self.store.db.conn.execute(
            "INSERT INTO sweep_candidates (chain, address, asset, since) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (chain, address, asset) DO UPDATE SET since = MAX(since, excluded.since)",
            (chain, address, asset, self.store.clock.now_ms()))

    def candidates(self, chain: str, limit: int) -> list[Candidate]:
        """Candidates, the native coin last: sweeping it takes what the address's other
        sweeps need for their fees (the sweeper runs one sweep per address at a time)."""
        native = self.store.chain_config(chain).native_symbol
        return [Candidate(r["chain"], r["address"], r["asset"]) for r in self.store.db.query(
            "SELECT * FROM sweep_candidates WHERE chain = ? ORDER BY asset = ?, since LIMIT ?", (chain, native, limit))]

    def uncovered(self, chain: str, address: str, asset: str) -> list[Deposit]:
        """Confirmed deposits of ``asset`` to ``address`` that no active or confirmed sweep covers."""
        return [Deposit(transfer_id=r["id"], address=r["address"], txid=r["txid"], index=r["idx"],
                        amount=int(r["amount"]), block_number=r["block_number"]) for r in self.store.db.query(
            "SELECT t.id, t.address, t.txid, t.idx, t.amount, t.block_number FROM transfers t"
            " WHERE t.chain = ? AND t.address = ? AND t.asset = ? AND t.status = 'confirmed' AND NOT EXISTS ("
            " SELECT 1 FROM sweep_deposits d JOIN sweeps s ON s.id = d.sweep_id WHERE d.transfer_id = t.id"
            " AND s.status != 'failed') ORDER BY t.block_number, t.id", (chain, address, asset))]

    def busy_addresses(self, chain: str) -> set[str]:
        """Addresses not to plan a sweep for now: one is under way, or a transaction they
        sent is not settled (e.g. a confirmed sweep's transaction a reorg took off the chain,
        being sent again): a new sweep would conflict with it."""
        marks = ",".join("?" * len(ACTIVE))
        return {r[0] for r in self.store.db.query(
            f"SELECT address FROM sweeps WHERE chain = ? AND status IN ({marks})"
            f" UNION SELECT d.address FROM sweep_deposits d JOIN sweeps s ON s.id = d.sweep_id"
            f" WHERE s.chain = ? AND s.status IN ({marks})"
            " UNION SELECT sender FROM chain_txs WHERE chain = ? AND purpose = 'sweep' AND status = 'open'",
            (chain, *ACTIVE, chain, *ACTIVE, chain))}

    def keep_candidate(self, chain: str, address: str, asset: str) -> None:
        """(address, asset) stays a candidate (the wallet had no room for all of it)."""
        with self.store.db.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO sweep_candidates (chain, address, asset, since) VALUES (?, ?, ?, ?)",
                         (chain, address, asset, self.store.clock.now_ms()))

    def drop_candidate(self, chain: str, address: str, asset: str, *, read_at: int | None = None) -> None:
        """(address, asset) is no candidate any more, unless a deposit confirmed there after
        ``read_at`` (ms: when the run read the candidates)."""
        with self.store.db.transaction():
            self._uncandidate(chain, address, asset, read_at)

    def _uncandidate(self, chain: str, address: str, asset: str, read_at: int | None) -> None:
        self.store.db.conn.execute(
            "DELETE FROM sweep_candidates WHERE chain = ? AND address = ? AND asset = ? AND since < ?",
            (chain, address, asset, self.store.clock.now_ms() + 1 if read_at is None else read_at))

    # --- the sweeper's transitions ---------------------------------------------------------

    def plan(self, chain: str, plan: SweepPlan, to: str, *, read_at: int | None = None) -> str:
        """Store a planned sweep; its addresses stop being candidates unless a deposit
        confirmed there after ``read_at`` (ms: when the run read the candidates)."""
        now = self.store.clock.now_ms()
        sid = new_id("sw", now_ms=now)
        with self.store.db.transaction() as conn:
            for address in plan.addresses:
                self._uncandidate(chain, address, plan.asset, read_at)
            conn.execute("INSERT INTO sweeps (id, chain, asset, address, to_address, amount, status, created_at,"
                         " updated_at) VALUES (?, ?, ?, ?, ?, ?, 'planned', ?, ?)",
                         (sid, chain, plan.asset, plan.addresses[0], to, str(plan.amount), now, now))
            for tid in plan.deposits:
                conn.execute("INSERT OR IGNORE INTO sweep_deposits (sweep_id, transfer_id, address)"
                             " SELECT ?, id, address FROM transfers WHERE id = ?", (sid, tid))
            self._emit(sid)
        return sid

    def active(self, chain: str) -> list[SweepRow]:
        return [SweepRow.from_row(r) for r in self.store.db.query(
            f"SELECT * FROM sweeps WHERE chain = ? AND status IN ({','.join('?' * len(ACTIVE))}) ORDER BY id",
            (chain, *ACTIVE))]

    def busy(self, chain: str) -> bool:
        return bool(self.store.db.scalar(
            f"SELECT EXISTS (SELECT 1 FROM sweeps WHERE chain = ? AND status IN ({','.join('?' * len(ACTIVE))}))",
            (chain, *ACTIVE)))

    def covered_elsewhere(self, sweep_id: str) -> bool:
        """Whether another sweep, active or confirmed, covers one of this sweep's deposits."""
        return bool(self.store.db.scalar(
            "SELECT EXISTS (SELECT 1 FROM sweep_deposits d JOIN sweep_deposits o ON o.transfer_id = d.transfer_id"
            " AND o.sweep_id != d.sweep_id JOIN sweeps s ON s.id = o.sweep_id WHERE d.sweep_id = ?"
            " AND s.status != 'failed')", (sweep_id,)))

    def deposits(self, sweep_id: str) -> list[Deposit]:
        return [Deposit(transfer_id=r["id"], address=r["address"], txid=r["txid"], index=r["idx"],
                        amount=int(r["amount"]), block_number=r["block_number"]) for r in self.store.db.query(
            "SELECT t.id, t.address, t.txid, t.idx, t.amount, t.block_number FROM sweep_deposits d"
            " JOIN transfers t ON t.id = d.transfer_id WHERE d.sweep_id = ? ORDER BY t.block_number, t.id",
            (sweep_id,))]

    def addresses_of(self, row: SweepRow) -> tuple[str, ...]:
        found = [r[0] for r in self.store.db.query(
            "SELECT DISTINCT address FROM sweep_deposits WHERE sweep_id = ? ORDER BY address", (row.id,))]
        return tuple(dict.fromkeys([row.address, *found]))

    def sent(self, sweep_id: str, txs: Sequence[SignedTx], *, phase: str, amount: int | None) -> None:
        """Store a step's transactions and move on: ``funding`` (top-ups) or ``broadcast``
        (the transfer). Call inside the transaction that saves the wallet's state;
        :class:`~watcher.store.common.Withdrawn` if sweeps were paused while the wallet signed."""
        row = self._row(sweep_id)
        still_sendable(self.store, "sweeps", sweep_id, ACTIVE, "sweeps")
        for tx in txs:
            self.store.chaintxs.add(row.chain, purpose="topup" if phase == "funding" else "sweep", ref_id=sweep_id,
                                    tx=tx)
        if phase == "funding":
            self._set(sweep_id, "funding", reason=None)
        else:
            self._set(sweep_id, "broadcast", reason=None, txid=txs[-1].txid,
                      amount=str(amount if amount is not None else row.amount))

    def replaced(self, tx: StoredTx, new: SignedTx) -> None:
        """A replacement of one of the sweep's transactions (call inside a transaction); a
        transfer's replacement may move a different amount (a native sweep pays its higher fee
        out of the amount)."""
        self.store.chaintxs.add(tx.chain, purpose=tx.purpose, ref_id=tx.ref_id, tx=new)
        if tx.purpose == "sweep":
            self.store.db.conn.execute("UPDATE sweeps SET txid = ?, amount = ?, updated_at = ? WHERE id = ?",
                                       (new.txid, str(new.amount), self.store.clock.now_ms(), tx.ref_id))

    def note(self, sweep_id: str, reason: str | None) -> None:
        """Record why a sweep waits (no event: the status did not change)."""
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE sweeps SET reason = ?, updated_at = ? WHERE id = ?",
                         (reason, self.store.clock.now_ms(), sweep_id))

    def confirmed(self, sweep_id: str, *, txid: str | None, fee_paid: int | None, dust: int | None,
                  amount: int | None = None) -> None:
        """``amount``: what the mined transfer moved (a native sweep's replacement moves less
        than its original: whichever was mined decides)."""
        extra = {} if amount is None else {"amount": str(amount)}
        self._set(sweep_id, "confirmed", txid=txid, fee_paid=None if fee_paid is None else str(fee_paid),
                  dust=None if dust is None else str(dust), confirmed_at=self.store.clock.now_ms(), reason=None,
                  **extra)

    def remined(self, sweep_id: str, *, txid: str, fee_paid: int | None, amount: int | None = None) -> bool:
        """A confirmed sweep's transaction was mined again after a reorg, at another fee or as
        the other transaction of its group (which may move another ``amount``): ``sweep.remined``
        if the record changed."""
        return remined(self.store, "sweeps", "sweep", sweep_id, lambda sid: self.render(self._row(sid)),
                       txid=txid, fee_paid=None if fee_paid is None else str(fee_paid),
                       amount=None if amount is None else str(amount))

    def failed(self, sweep_id: str, reason: str, *, replan: bool = False) -> None:
        """The sweep is over without moving money. ``replan``: it failed for a reason that
        may not hold at the next run (the node refused it, a rival transaction took its
        place), so its addresses are candidates again; otherwise (the wallet found it not
        worth its fee) they wait for their next confirmed deposit."""
        with self.store.db.transaction() as conn:
            self._set(sweep_id, "failed", reason=reason[:500])
            if replan:
                row = self._row(sweep_id)
                now = self.store.clock.now_ms()
                for address in self.addresses_of(row):
                    conn.execute("INSERT OR IGNORE INTO sweep_candidates (chain, address, asset, since)"
                                 " VALUES (?, ?, ?, ?)", (row.chain, address, row.asset, now))

    def row(self, sweep_id: str) -> SweepRow | None:
        r = self.store.db.one("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
        return SweepRow.from_row(r) if r else None

    def _row(self, sweep_id: str) -> SweepRow:
        row = self.row(sweep_id)
        assert row is not None, sweep_id
        return row

    def _set(self, sweep_id: str, status: str, **fields: Any) -> None:
        set_status(self.store, "sweeps", "sweep", sweep_id, status, lambda sid: self.render(self._row(sid)), **fields)

    def _emit(self, sweep_id: str) -> None:
        row = self._row(sweep_id)
        self.store.events.emit(f"sweep.{row.status}", self.render(row), chain=row.chain, subject=sweep_id)

    # --- reading ----------------------------------------------------------------------------

    def render(self, row: SweepRow) -> dict[str, Any]:
        """The sweep as the API and its events show it (``watcher.views``)."""
        return views.sweep(self.store.chain_config(row.chain), row, self.store.chaintxs.for_ref(row.id, "topup", "sweep"),
                           [d.transfer_id for d in self.deposits(row.id)], self.addresses_of(row))

    def page(self, *, status: str | None = None, chain: str | None = None, after: str | None = None,
             limit: int = 100) -> tuple[list[SweepRow], str | None]:
        return page(self.store, "sweeps", {"status": status, "chain": chain}, after=after, limit=limit,
                    row=SweepRow.from_row)
