"""Following our own transactions, one conflict group at a time, for every family alike.

A conflict group is a transaction and its replacements (they exclude each other: on EVM they
share a sender and a nonce), so at most one of them can ever be mined. Each round, with the
statuses of every followed transaction asked of the wallet in one batch:

- if one is mined: settle it (the others are ``replaced``) and report its depth;
- if one we had settled left the chain (a reorg): open them all again;
- if the node does not know the newest (never sent, or dropped): broadcast it again;
- if the newest has waited longer than ``stuck_after``: the wallet signs a replacement in the
  same group with a higher fee (or a child that pays for it: CPFP, in a group of its own,
  followed by the finality guard); it is stored, then sent;
- if the node refuses the group's last live transaction for good, the group is dead: its
  transactions are ``failed`` and the wallet releases what they held (gives a nonce back, or
  fills the slot with a filler transaction so that later ones can go; ``wallet.gap_filled``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .chains import BroadcastRejected, Child, SignedTx, StoredTx, TxStatus, Wait, Wallet
from .failpoints import failpoint
from .store.chaintx import StaleWalletState

if TYPE_CHECKING:
    from .config import ChainConfig
    from .metrics import Metrics
    from .store import Store

log = logging.getLogger(__name__)
_FRESH_TRIES = 3  # reads of a group's statuses, while the scan rolls back between them


class Statuses(dict[str, TxStatus]):
    """The statuses of one batch by txid, and how many rollbacks the scan had made when they
    were asked (``ChainState.rollbacks``). A round may follow its groups a second after it
    asked: a status read before a reorg the scan has since followed may name a block of the
    dead fork, and once the scan has pruned that height's hash nothing can tell (the soak's
    stuck hot wallet: nonces settled in dropped blocks, never sent again)."""

    def __init__(self, found: dict[str, TxStatus], rollbacks: int):
        super().__init__(found)
        self.rollbacks = rollbacks


@dataclass(frozen=True)
class Tracked:
    state: Literal["pending", "mined", "dead"]  # dead: refused for good, or a rival was mined
    tx: StoredTx | None = None  # the mined one
    status: TxStatus | None = None
    confirmations: int = 0
    error: str | None = None  # why it is dead
    stale: bool = False  # nothing decided: every answer was read before a rollback of the scan


def live(group: Sequence[StoredTx]) -> list[StoredTx]:
    """The transactions of a group that can still be (or are) on chain."""
    return [t for t in group if t.status in ("open", "mined") or (t.status == "failed" and t.block_number is not None)]


def groups(txs: Sequence[StoredTx]) -> list[list[StoredTx]]:
    """Transactions split into conflict groups, in the order of each group's first one."""
    out: dict[str, list[StoredTx]] = {}
    for t in txs:
        out.setdefault(t.conflict, []).append(t)
    return list(out.values())


class Tracker:
    """Follows, rebroadcasts, replaces and releases one chain's transactions."""

    def __init__(self, config: ChainConfig, store: Store, wallet: Wallet, metrics: Metrics):
        self.cfg = config
        self.chain = config.id
        self.store = store
        self.wallet = wallet
        self.metrics = metrics

    async def statuses(self, txs: Sequence[StoredTx]) -> Statuses:
        """One batch for every live transaction of ``txs``, each checked against our scan as
        soon as it is read (:meth:`_ours`) and again when it is used: a block the scan holds
        now can only leave our chain through a rollback, which :meth:`follow` notices."""
        wanted = live(txs)
        rollbacks = self.store.chains.rollbacks(self.chain)
        found = await self.wallet.statuses(wanted) if wanted else {}
        return Statuses({txid: self._ours(s) for txid, s in found.items()}, rollbacks)

    def _ours(self, s: TxStatus) -> TxStatus:
        """A status that says mined in a block our scan does not hold (read before a reorg the
        scan has since followed, a node answering from another fork, or a block the scan has
        not reached yet) counts as pending: the transaction is settled only in a block of
        our own chain. Settled in a block of a dead fork, it would never be looked at again
        once that height passed finality: an EVM nonce left unsent, every later payout stuck."""
        if s.state != "mined" or s.block_number is None or s.block_hash is None:
            return s
        if self.store.chains.holds_block(self.chain, s.block_number, s.block_hash):
            return s
        return TxStatus(txid=s.txid, state="pending")

    async def broadcast(self, tx: SignedTx, what: str, purpose: str) -> bool:
        """Send stored bytes; a transient refusal is logged and False returned (they are sent
        again, or replaced, in a later round); a permanent one raises."""
        return await self._send(tx, what, purpose) is None

    async def _send(self, tx: SignedTx, what: str, purpose: str, *,
                    final: Callable[[str], bool] | None = None) -> str | None:
        """:meth:`broadcast`: None once sent, else the node's transient refusal; one that
        ``final`` says cannot pass any more is raised as permanent."""
        try:
            await self.wallet.broadcast(tx)
        except BroadcastRejected as e:
            permanent = e.permanent or (final is not None and final(e.message))
            log.warning("%s: node refused %s (%s); %s", what, tx.txid, e.message,
                        "will not retry these bytes" if permanent else "trying again later",
                        extra={"chain": self.chain, "txid": tx.txid})
            if permanent:
                raise BroadcastRejected(e.message, permanent=True) from None
            return e.message
        failpoint(f"{purpose}.sent")
        self.store.chaintxs.mark_broadcast(tx.txid)
        return None

    async def _rival_mined(self, newest: StoredTx, head: int) -> Tracked | None:
        """The newest of a group was refused as it went out again (an EVM "nonce too low": the
        slot is taken). Another transaction of the group, one that had lost to a replacement,
        may have won in the chain a reorg put in place (its status, read afresh: it may not
        have been followed when the round's statuses were read): then that one is settled
        (mined in a block of our scan) or waited for (the scan has not reached its block),
        instead of the group being given up while its money moved."""
        others = [t for t in self.store.chaintxs.group(self.chain, newest.conflict)
                  if t.txid != newest.txid and t.status in ("replaced", "open")]
        if not others:
            return None
        found = await self.wallet.statuses(others)
        for t in others:
            raw = found.get(t.txid)
            if raw is None or raw.state != "mined":
                continue
            s = self._ours(raw)
            if s.state != "mined":
                return Tracked("pending")  # mined in a block our scan does not hold yet
            log.warning("%s %s: its replacement left the chain in a reorg and the original %s was mined instead",
                        newest.purpose, newest.ref_id, t.txid, extra={"chain": self.chain, "txid": t.txid})
            return self._mined(t, s, head)
        return None

    def _mined(self, row: StoredTx, mined: TxStatus, head: int) -> Tracked:
        """``row`` is mined (``mined``, a block of our scan): settled there, the rest of its
        group ``replaced``, unless it already stood so."""
        if row.status == "open" or row.block_number != mined.block_number:
            with self.store.db.transaction():
                if row.status != "open":
                    self.store.chaintxs.unsettle(row)
                self.store.chaintxs.settle(row, block_number=mined.block_number or 0, fee_paid=mined.fee_paid,
                                           ok=mined.success, error=mined.error)
            failpoint(f"{row.purpose}.mined")
        return Tracked("mined", row, mined, max(0, head - (mined.block_number or head) + 1))

    async def follow(self, group: Sequence[StoredTx], statuses: Statuses, *, head: int, what: str,
                     replace: Callable[[SignedTx], None] | None,
                     final: Callable[[str], bool] | None = None) -> Tracked:
        """One round for one conflict group. ``replace`` stores a replacement (and moves its
        payout or sweep on); None: never replace (the group is only kept on chain).
        ``statuses`` asked before the scan's latest rollback are asked again for this group.
        ``final(refusal)``: whether the node's transient refusal of the newest, sent again,
        means it can no longer pass (the group is then given up like one refused for good)."""
        alive = live(group)
        if not alive:
            return Tracked("dead", error=next((t.error for t in reversed(group) if t.error), None))
        asked = 0
        while statuses.rollbacks != self.store.chains.rollbacks(self.chain):
            if asked == _FRESH_TRIES:  # the scan keeps rolling back: decide nothing on outdated answers
                return Tracked("pending", stale=True)
            statuses = await self.statuses(alive)
            asked += 1
        seen = [self._ours(statuses.get(t.txid) or TxStatus(txid=t.txid, state="unknown")) for t in alive]
        mined = next((s for s in seen if s.state == "mined"), None)
        if mined is not None:
            return self._mined(next(t for t in alive if t.txid == mined.txid), mined, head)
        if any(t.status != "open" for t in alive):
            with self.store.db.transaction():  # a reorg took the mined one away: all are candidates again
                self.store.chaintxs.unsettle(alive[0])
            log.warning("%s: transaction left the chain in a reorg; following it again", what,
                        extra={"chain": self.chain})
        newest = alive[-1]
        # The node does not have the newest (never sent, or dropped after a node restart): the
        # newest supersedes the others, so it is the one to send again. If the node refuses it
        # for now (fees below what it accepts), it is replaced below once it is stuck_after old.
        if seen[-1].state == "unknown":
            try:
                if await self._send(newest.signed(), what, newest.purpose, final=final) is None:
                    return Tracked("pending")
            except BroadcastRejected as e:
                rival = await self._rival_mined(newest, head)
                if rival is not None:
                    return rival
                others = [t for t, s in zip(alive[:-1], seen[:-1], strict=True) if s.state == "pending"]
                if others:  # an earlier one of the group is still with the node: only this one is out
                    with self.store.db.transaction():
                        self.store.chaintxs.refused([newest], e.message)
                    return Tracked("pending")
                await self.release(alive, e.message, what)
                return Tracked("dead", error=e.message)
        since = newest.broadcast_at or newest.created_at
        if replace is not None and self.store.clock.now_ms() - since > self.cfg.payouts.stuck_after * 1000:
            state, version = self.store.chaintxs.wallet_state(self.chain)
            new = await self.wallet.replace(alive, bump_ppm=self.cfg.payouts.fee_bump_ppm, state=state)
            if isinstance(new, Wait):
                log.warning("%s: %s is stuck but not replaced: %s", what, newest.txid, new.reason,
                            extra={"chain": self.chain})
                return Tracked("pending")
            if isinstance(new, Child):
                await self._pull(newest, new, version, what, since)
                return Tracked("pending")
            with self.store.db.transaction():
                replace(new)
            failpoint(f"{newest.purpose}.stored")
            log.info("%s: %s stuck for %.0fs; replaced by %s", what, newest.txid,
                     (self.store.clock.now_ms() - since) / 1000, new.txid, extra={"chain": self.chain})
            try:
                await self.broadcast(new, what, newest.purpose)
            except BroadcastRejected as e:  # the original may still be mined: only this one is out
                with self.store.db.transaction():
                    self.store.chaintxs.refused([self.store.chaintxs.get(new.txid) or newest], e.message)
        return Tracked("pending")

    async def _pull(self, parent: StoredTx, child: Child, version: int, what: str, since: int) -> None:
        """Store a CPFP child of a stuck ``parent`` (purpose ``bump``, its own conflict group,
        followed by the finality guard like a filler), then send it."""
        tx = child.tx
        try:
            with self.store.db.transaction():
                if child.state is not None:
                    self.store.chaintxs.put_wallet_state(self.chain, child.state, version)
                self.store.chaintxs.add(self.chain, purpose="bump", ref_id=parent.ref_id, tx=tx)
                self.store.events.emit("wallet.bumped", {
                    "chain": self.chain, "txid": tx.txid, "parent_txid": parent.txid, "for": parent.ref_id,
                    "purpose": parent.purpose, **self.store.spec(self.chain).tx_fields(tx.details)},
                    chain=self.chain, subject=parent.ref_id)
        except StaleWalletState:
            log.warning("%s: wallet state moved while bumping %s; trying again next round", what, parent.txid)
            raise
        failpoint("bump.stored")
        log.info("%s: %s stuck for %.0fs; child %s pays for it", what, parent.txid,
                 (self.store.clock.now_ms() - since) / 1000, tx.txid, extra={"chain": self.chain, "txid": tx.txid})
        try:
            await self.broadcast(tx, f"{what}: bump", "bump")
        except BroadcastRejected as e:
            stored = self.store.chaintxs.get(tx.txid)
            assert stored is not None
            with self.store.db.transaction():  # only the child is out; the parent is followed as before
                self.store.chaintxs.refused([stored], e.message)

    async def release(self, group: Sequence[StoredTx], error: str, what: str) -> None:
        """The node refused a group's last live transaction for good: mark the group failed
        and let the wallet free what it held (a nonce, or a slot a filler takes)."""
        state, version = self.store.chaintxs.wallet_state(self.chain)
        released = await self.wallet.release(group[-1], state)
        filler = released.filler
        try:
            with self.store.db.transaction():
                self.store.chaintxs.refused(group, error)
                if released.state is not None:
                    self.store.chaintxs.put_wallet_state(self.chain, released.state, version)
                if filler is not None:
                    self.store.chaintxs.add(self.chain, purpose="filler", ref_id=group[-1].ref_id, tx=filler)
                    self.store.events.emit("wallet.gap_filled", {
                        "chain": self.chain, "txid": filler.txid, "refused_txid": group[-1].txid, "reason": error,
                        "for": group[-1].ref_id, "note": released.note,
                        **self.store.spec(self.chain).tx_fields(filler.details)},
                        chain=self.chain, subject=group[-1].ref_id)
        except StaleWalletState:
            log.warning("%s: wallet state moved while releasing %s; trying again next round", what, group[-1].txid)
            raise
        if released.note:
            log.warning("%s: %s refused for good (%s); %s", what, group[-1].txid, error, released.note,
                        extra={"chain": self.chain, "txid": group[-1].txid})
        if filler is not None:
            self.metrics.errors.labels("wallet_gap_filled").inc()
            failpoint("filler.stored")
            try:
                await self.broadcast(filler, f"{what}: filler", "filler")
            except BroadcastRejected:
                pass  # logged; the finality guard sends it again (or replaces it) next round
