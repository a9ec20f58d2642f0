"""Sweeps, as steps of the chain's sender round, for every family alike.

Planning: every ``interval`` (or on ``POST /v1/sweeps/run``) the candidates (addresses with
new confirmed deposits) go to the wallet, which says which sweeps to make (one per address
on an account chain, one consolidating transaction on a UTXO chain) or that they are not worth
their fee. One sweep per address at a time.

Stepping: a sweep's current step is the conflict group of its newest transaction. While it is
in flight it is followed (``txtrack``); once it is mined deep enough (``funding_confirmations``
for a top-up, ``confirmations`` for the transfer) the wallet is asked for the next step: more
funding, the transfer, or done. Every transaction is stored before it is broadcast; a crash at
any step resumes the same step with the same stored bytes, never a second transfer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .chains import (
    Done,
    Fail,
    Later,
    Send,
    SignedTx,
    StoredTx,
    SweepCandidate,
    SweepIntent,
    Wait,
)
from .errors import NodeError
from .money import format_amount
from .store.chaintx import StaleWalletState
from .store.common import Withdrawn
from .store.db import storage_trouble
from .txtrack import Statuses, Tracked

if TYPE_CHECKING:
    from .sender import Sender
    from .store.sweeps import SweepRow

log = logging.getLogger(__name__)


class Sweeper:
    def __init__(self, sender: Sender):
        self.s = sender
        self.store = sender.store
        self.cfg = sender.cfg
        self.chain = sender.chain
        self._last_plan: float | None = None  # trio time of the last run (set in the first round)
        self.requested = False
        self._bugs: set[str] = set()  # sweeps in flight whose step failed for a bug (logged once each)

    def seconds_to_next_run(self) -> float:
        interval = self.cfg.sweep.interval
        if not self.cfg.sweep.enabled or interval <= 0:
            return float("inf")
        if self._last_plan is None:
            self._last_plan = trio.current_time()
        return max(0.0, self._last_plan + interval - trio.current_time())

    def request(self) -> None:
        """Plan a sweep run at the next round (POST /v1/sweeps/run)."""
        self.requested = True
        self.s.wake()

    async def round(self, head: int) -> None:
        sweep = self.cfg.sweep
        if not sweep.enabled:
            return
        assert self.s.tracker is not None
        active = [(row, self.store.chaintxs.for_ref(row.id, "topup", "sweep")) for row in self.store.sweeps.active(self.chain)]
        in_flight = [t for _, txs in active for t in _current(txs)]
        statuses = await self.s.tracker.statuses(in_flight)
        for row, txs in active:
            try:
                await self._step(row, txs, statuses, head)
            except NodeError as e:
                if e.retryable:
                    raise
                # the node refuses this sweep for good (e.g. estimateGas reverts: a reorg took
                # the deposit it was planned for): fail it, so it stops holding up the round;
                # what is really there is planned again by the next run
                log.warning("%s: sweep %s failed: %s", self.chain, row.id, e.message, extra={"chain": self.chain})
                self.store.sweeps.failed(row.id, f"the node refused it: {e.message[:300]}", replan=True)
            except StaleWalletState:
                raise
            except Exception as e:  # one bad sweep must not stop the others
                if storage_trouble(e):
                    raise  # the file, not this sweep: the sender's round backs off and retries
                if txs:
                    # signed, perhaps broadcast or mined: money may be moving, and a sweep
                    # marked failed would no longer follow it (its deposits planned again, the
                    # treasury paid with no record). Kept as it is and tried again each round.
                    self.s.metrics.errors.labels("sweeper_bug").inc()
                    if row.id not in self._bugs:
                        self._bugs.add(row.id)
                        log.exception("%s: sweep %s: a step failed (a bug); its transactions are in flight, so "
                                      "it stays %s and is tried again each round", self.chain, row.id, row.status,
                                      extra={"chain": self.chain, "sweep_id": row.id})
                    continue
                log.exception("%s: sweep %s failed", self.chain, row.id)
                self.store.sweeps.failed(row.id, f"{type(e).__name__}: {e}")
                continue
            self._bugs.discard(row.id)
        if self._last_plan is None:
            self._last_plan = trio.current_time()
        due = sweep.interval > 0 and trio.current_time() - self._last_plan >= sweep.interval
        if self.requested or due:
            self._last_plan = trio.current_time()
            # a requested run continues while candidates wait for their address's other sweep
            planned, deferred = await self.plan()
            self.requested = deferred > 0
            if planned:
                self.s.wake()  # their first step goes now, not at the next block or tick

    async def plan(self) -> tuple[int, int]:
        """Plan sweeps for candidates the wallet finds worth sweeping; returns how many were
        planned and how many candidates were deferred (their address already has a sweep in
        progress)."""
        sweep = self.cfg.sweep
        assert sweep.to is not None and self.s.wallet is not None
        confirmed_block = self.store.chains.scanned_number(self.chain) - self.cfg.confirmations + 1
        deferred = 0
        read_at = self.store.clock.now_ms()  # a deposit confirmed after this keeps its candidate
        busy = self.store.sweeps.busy_addresses(self.chain)
        chosen: dict[str, SweepCandidate] = {}
        for c in self.store.sweeps.candidates(self.chain, sweep.batch_size):
            if c.address in busy or c.address in chosen:
                deferred += 1  # one sweep per address at a time; a later run takes this one
                continue
            asset = self.cfg.asset(c.asset)
            if asset is None:
                self.store.sweeps.drop_candidate(self.chain, c.address, c.asset)
                continue
            chosen[c.address] = SweepCandidate(c.address, asset, tuple(
                self.store.sweeps.uncovered(self.chain, c.address, c.asset)))
        if not chosen:
            return 0, deferred
        confirmed_block = max(0, confirmed_block)
        # a deposit confirmed above the depth sweeps may take (a reorg rolled the scan back
        # under it; it was not orphaned): the wallet leaves it out of this run, which must not
        # read as "not worth a sweep", or the candidate is dropped and the deposit, already
        # confirmed, never makes it a candidate again
        shallow = [a for a, c in chosen.items() if any(d.block_number > confirmed_block for d in c.deposits)]
        deferred += len(shallow)
        plans = await self.s.wallet.plan_sweeps(list(chosen.values()), confirmed_block=confirmed_block,
                                                min_amount=sweep.min_amount)
        covered: set[tuple[str, str]] = set()
        for p in plans:
            if isinstance(p, Later):  # worth it, but no room in this run: planned again next round
                covered.update((a, p.asset) for a in p.addresses)
                deferred += len(p.addresses)
                continue
            sid = self.store.sweeps.plan(self.chain, p, sweep.to, read_at=read_at)
            covered.update((a, p.asset) for a in p.addresses)
            asset = self.cfg.asset(p.asset)
            log.info("%s: sweep %s planned: %s %s from %s", self.chain, sid,
                     format_amount(p.amount, asset.decimals if asset else 0), p.asset, ", ".join(p.addresses),
                     extra={"chain": self.chain, "sweep_id": sid})
        for p in plans:  # no room this run (even for part of an address a plan takes): kept
            if isinstance(p, Later):
                for address in p.addresses:
                    self.store.sweeps.keep_candidate(self.chain, address, p.asset)
        for address in shallow:  # kept, also when a plan took what it has deep enough
            self.store.sweeps.keep_candidate(self.chain, address, chosen[address].asset.symbol)
        for chose in chosen.values():  # not worth a sweep (yet): forgotten until the next deposit
            if (chose.address, chose.asset.symbol) not in covered and chose.address not in shallow:
                self.store.sweeps.drop_candidate(self.chain, chose.address, chose.asset.symbol, read_at=read_at)
        return sum(not isinstance(p, Later) for p in plans), deferred

    async def _step(self, row: SweepRow, txs: list[StoredTx], statuses: Statuses, head: int) -> None:
        asset = self.cfg.asset(row.asset)
        if asset is None:
            self.store.sweeps.failed(row.id, f"asset {row.asset} is no longer configured")
            return
        current = _current(txs)
        if current and row.status in ("funding", "broadcast"):
            if await self._follow(row, current, statuses, head) is None:
                return  # still in flight, or the sweep failed
            txs = self.store.chaintxs.for_ref(row.id, "topup", "sweep")  # as settled
        assert self.s.wallet is not None
        intent = SweepIntent(id=row.id, asset=asset, addresses=self.store.sweeps.addresses_of(row), to=row.to_address,
                             amount=row.amount, deposits=tuple(self.store.sweeps.deposits(row.id)), txs=tuple(txs))
        state, version = self.store.chaintxs.wallet_state(self.chain)
        answer = await self.s.wallet.sweep_step(intent, state)
        if isinstance(answer, Wait):
            if row.reason != answer.reason:
                log.warning("%s: sweep %s waits: %s", self.chain, row.id, answer.reason, extra={"chain": self.chain})
                self.store.sweeps.note(row.id, answer.reason)
        elif isinstance(answer, Fail):
            log.warning("%s: sweep %s failed: %s", self.chain, row.id, answer.reason, extra={"chain": self.chain})
            self.store.sweeps.failed(row.id, answer.reason)
        elif isinstance(answer, Done):
            mined = next((t for t in reversed(txs) if t.purpose == "sweep" and t.status == "mined"), None)
            self.store.sweeps.confirmed(row.id, txid=mined.txid if mined else row.txid,
                                        fee_paid=mined.fee_paid if mined else None, dust=answer.dust,
                                        amount=mined.amount if mined else None)
            log.info("%s: sweep %s confirmed (%s)", self.chain, row.id, mined.txid if mined else row.txid,
                     extra={"chain": self.chain, "sweep_id": row.id})
        else:
            await self._send(row, answer, version)

    async def _send(self, row: SweepRow, send: Send, version: int) -> None:
        purpose = "topup" if send.phase == "funding" else "sweep"
        try:
            self.s.store_send(send, version, purpose, lambda: self.store.sweeps.sent(
                row.id, send.txs, phase=send.phase, amount=send.amount))
        except Withdrawn as e:  # paused while the wallet signed: nothing kept or sent, the sweep waits
            log.info("%s: sweep %s not sent: %s; the transaction signed for it is dropped", self.chain, row.id, e,
                     extra={"chain": self.chain, "sweep_id": row.id})
            return
        what = f"{self.chain}: {'top-up for ' if send.phase == 'funding' else ''}sweep {row.id}"
        log.info("%s: %s signed (%s); broadcasting", what, ", ".join(t.txid for t in send.txs), send.phase,
                 extra={"chain": self.chain, "sweep_id": row.id})
        refused = await self.s.broadcast_new(send.txs, what, purpose)
        if refused is not None:
            self.store.sweeps.failed(row.id, f"the node refused it: {refused[:300]}", replan=True)

    async def _follow(self, row: SweepRow, group: list[StoredTx], statuses: Statuses,
                      head: int) -> Tracked | None:
        """Follow the sweep's step in flight; the result once it is mined deep enough and
        succeeded, else None (still in flight, or the sweep failed)."""
        assert self.s.tracker is not None
        purpose = group[0].purpose
        what = f"{self.chain}: {'top-up for ' if purpose == 'topup' else ''}sweep {row.id}"

        def replace(tx: SignedTx) -> None:
            self.store.sweeps.replaced(group[0], tx)

        def final(refusal: str) -> bool:
            # the node refuses the transfer, which it does not hold, and every deposit it
            # sweeps left the chain (a reorg): the money it would move is not there any more,
            # and nothing brings it back to this transaction (a deposit mined again is
            # planned again). Left to be sent again for ever, the sweep kept its address busy
            return purpose == "sweep" and self._deposits_gone(row)

        t = await self.s.tracker.follow(group, statuses, head=head, what=what, replace=replace, final=final)
        if t.state == "dead":  # it moved nothing: what is there is planned again by the next run
            if t.error is not None:
                self.store.sweeps.failed(row.id, f"the node refused it: {t.error[:300]}", replan=True)
            else:
                # another transaction of the address took its place (one of ours, sent again
                # after a reorg)
                self.store.sweeps.failed(row.id, "a conflicting transaction of the address was mined in its place",
                                         replan=True)
                log.warning("%s: sweep %s: a conflicting transaction was mined instead; sweep failed, to be "
                            "planned again", self.chain, row.id, extra={"chain": self.chain})
            return None
        depth = self.cfg.sweep.funding_confirmations if purpose == "topup" else self.cfg.confirmations
        if t.state != "mined" or t.confirmations < depth:
            return None
        assert t.status is not None
        if not t.status.success:
            # its addresses are candidates again (the candidate went when the sweep was planned;
            # a one-time invoice address gets no next deposit to bring it back), as when the
            # same revert is seen after the sweep was confirmed (the finality guard)
            self.store.sweeps.failed(row.id, f"{'top-up' if purpose == 'topup' else 'sweep transaction'} reverted: "
                                             f"{t.status.error}", replan=True)
            return None
        return t


    def _deposits_gone(self, row: SweepRow) -> bool:
        statuses = [self.store.transfers.status_of(d.transfer_id) for d in self.store.sweeps.deposits(row.id)]
        return bool(statuses) and all(s == "orphaned" for s in statuses)


def _current(txs: list[StoredTx]) -> list[StoredTx]:
    """The conflict group of the newest transaction: the step in flight."""
    return [t for t in txs if t.conflict == txs[-1].conflict] if txs else []
