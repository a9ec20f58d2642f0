"""One sender per chain: sends payouts from the hot wallet and drives sweeps, through the
chain family's wallet.

Everything that spends goes through this one task per chain, so the wallet is driven by one
caller at a time. A round: follow what is in flight (``txtrack``), keep the transactions of
finished payouts and sweeps on chain until they are final (the finality guard), then, unless
paused, send pending payouts and move sweeps on. Each payout's transaction is signed by the
wallet and stored (with the wallet's new state) in one SQLite transaction, and only then
broadcast; after a crash the stored bytes are sent again, so a payout can never go out twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .chains import (
    BroadcastRejected,
    Fail,
    PayoutIntent,
    Send,
    SignedTx,
    StoredTx,
    TxStatus,
    Wait,
    Wallet,
    WalletContext,
)
from .errors import NodeError, WatcherError
from .failpoints import failpoint
from .store.chaintx import StaleWalletState
from .store.common import Withdrawn
from .sweeper import Sweeper
from .tasks import StorageRetry
from .txtrack import Tracker, groups

if TYPE_CHECKING:
    from .chains import ChainClient, ChainKeys
    from .config import ChainConfig
    from .keys import ChainKeyring
    from .metrics import Metrics
    from .scanner import ChainWatcher
    from .store import Store
    from .store.payouts import PayoutRow

log = logging.getLogger(__name__)

_BALANCE_METRIC_EVERY = 30.0


def open_wallet(cfg: ChainConfig, store: Store, client: ChainClient, keys: ChainKeys) -> Wallet | None:
    """The family's wallet for one chain (None if the family has none), on an open client."""
    hot, native = keys.hot_address, cfg.native.symbol
    ctx = WalletContext(config=cfg, client=client, keys=keys, in_flight=lambda: store.chaintxs.in_flight(cfg.id),
                        hot_coins=lambda: store.transfers.coins_of(cfg.id, hot, native) if hot else [])
    return cfg.spec.open_wallet(ctx)


class Sender:
    def __init__(self, watcher: ChainWatcher, store: Store, keys: ChainKeyring, metrics: Metrics, *,
                 tick: float | None = None):
        self.watcher = watcher
        self.cfg = watcher.config
        self.chain = self.cfg.id
        self.store = store
        self.keys = keys
        self.metrics = metrics
        self._storage = StorageRetry(store.db, metrics, f"sender {self.chain}", "sender_bug")
        self.hot = keys.hot_address
        # rounds run when woken (a new block, a new or approved payout, a sweep request, a
        # pause change) and at least every tick (stuck transactions are a matter of time)
        self.tick = tick if tick is not None else 5.0
        self.sweeper = Sweeper(self)
        self.wallet: Wallet | None = None
        self.tracker: Tracker | None = None
        self._wake = trio.Event()
        self._synced = False
        self._balances_at = 0.0
        store.on_wake("sender", self.wake)
        watcher.on_new_blocks(self.wake)

    def wake(self) -> None:
        self._wake.set()

    def open_wallet(self, client: ChainClient) -> None:
        """Open the family's wallet for this chain on the daemon's (already open) client.
        Called before any task starts: a family loads its signing libraries here, not in the
        middle of a scan. Nothing to open when watch-only."""
        if self.hot is None:
            return
        self.wallet = open_wallet(self.cfg, self.store, client, self.keys)
        if self.wallet is not None:
            self.tracker = Tracker(self.cfg, self.store, self.wallet, self.metrics)

    async def run(self, client: ChainClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.hot is None:
            return  # watch-only: nothing can be sent
        if self.wallet is None:
            self.open_wallet(client)
        if self.wallet is None:
            log.info("%s: the %s family cannot send; payouts and sweeps wait", self.chain, self.cfg.family)
            return
        while True:
            self._wake = trio.Event()
            wait = self.tick
            if self.watcher.status.node_up and not self.watcher.status.halted:
                try:
                    wait = self.idle_wait() if not self.busy() else self.tick
                    await self.round(client)
                    self._storage.ok()
                except (NodeError, BroadcastRejected) as e:
                    self.metrics.errors.labels("sender").inc()
                    log.warning("%s: sender round failed: %s", self.chain, getattr(e, "message", e),
                                extra={"chain": self.chain})
                except StaleWalletState:
                    continue  # planned against an older state: plan again
                except Exception as e:
                    # locked, full, or a bug: what the round was writing rolled back; every
                    # step is stored before it acts, so the next round picks up where this
                    # one was. A bug in one round must not stop deposits, webhooks or the
                    # other chains: logged, counted (sender_bug) and tried again later.
                    await self._storage.wait(e)
                    continue
            with trio.move_on_after(wait):
                await self._wake.wait()

    def busy(self) -> bool:
        """Is anything waiting to be sent or in flight (then rounds also run on a timer)?"""
        return (self.store.payouts.busy(self.chain) or self.store.sweeps.busy(self.chain)
                or self.store.chaintxs.count_open(self.chain) > 0 or self.sweeper.requested)

    def idle_wait(self) -> float:
        """With nothing in flight, sleep until the next sweep run is due (or a wake-up)."""
        return self.sweeper.seconds_to_next_run()

    async def round(self, client: ChainClient) -> None:
        assert self.wallet is not None
        if not self._synced:
            state, version = self.store.chaintxs.wallet_state(self.chain)
            synced = await self.wallet.sync(state)
            if synced != state:
                with self.store.db.transaction():
                    self.store.chaintxs.put_wallet_state(self.chain, synced, version)
            self._synced = True
        head = self.watcher.status.head or await client.head()
        await self._follow_payouts(head)
        await self._guard_settled(head)
        paused = self.store.paused()
        if "payouts" not in paused:
            await self._send_payouts()
        if "sweeps" not in paused:
            await self.sweeper.round(head)
        if time.monotonic() - self._balances_at > _BALANCE_METRIC_EVERY:
            await self._balance_metrics(client)

    # --- storing what the wallet answered ----------------------------------------------------

    def store_send(self, send: Send, version: int, purpose: str, store_txs: Callable[[], None]) -> None:
        """Save the wallet's new state with what ``store_txs()`` writes, in one transaction."""
        with self.store.db.transaction():
            if send.state is not None:
                self.store.chaintxs.put_wallet_state(self.chain, send.state, version)
            store_txs()
        failpoint(f"{purpose}.stored")

    async def broadcast_new(self, txs: tuple[SignedTx, ...], what: str, purpose: str) -> str | None:
        """Broadcast freshly stored transactions in order; the reason if the node refused one
        for good (its group is then released), else None."""
        assert self.tracker is not None
        for tx in txs:
            try:
                await self.tracker.broadcast(tx, what, purpose)
            except BroadcastRejected as e:
                stored = self.store.chaintxs.get(tx.txid)
                if stored is not None:
                    await self.tracker.release([stored], e.message, what)
                return e.message
        return None

    # --- payouts ---------------------------------------------------------------------------

    async def _send_payouts(self) -> None:
        assert self.wallet is not None
        blocked = 0
        for p in self.store.payouts.in_status(self.chain, "pending"):
            if "payouts" in self.store.paused():  # paused during this round: the rest waits
                break
            blocked += not await self._send_payout(p)
        self.metrics.payouts_blocked.labels(self.chain).set(blocked)

    async def _send_payout(self, p: PayoutRow) -> bool:
        """Have the wallet sign one payout, store it, broadcast it; False if it has to wait
        (and why is stored)."""
        assert self.wallet is not None
        asset = self.cfg.asset(p.asset)
        if asset is None:
            self.store.payouts.failed(p.id, f"asset {p.asset} is no longer configured")
            return True
        state, version = self.store.chaintxs.wallet_state(self.chain)
        try:
            answer: Wait | Fail | Send = await self.wallet.pay(
                PayoutIntent(id=p.id, asset=asset, amount=p.amount, to=p.to_address), state)
        except NodeError as e:
            if e.retryable:
                raise
            # the node refuses something about this payout for good (e.g. the token contract
            # is not deployed): it waits with the reason; the payouts after it still go
            answer = Wait(f"the node refuses it: {e.message[:300]}")
        if isinstance(answer, Wait):
            if p.reason != answer.reason:
                log.warning("%s: payout %s waits: %s", self.chain, p.id, answer.reason,
                            extra={"chain": self.chain, "payout_id": p.id})
                self.store.payouts.block(p.id, answer.reason)
            return False
        if isinstance(answer, Fail):
            self.store.payouts.failed(p.id, answer.reason)
            return True
        try:
            self.store_send(answer, version, "payout", lambda: self.store.payouts.signed(p.id, answer.txs))
        except Withdrawn as e:  # cancelled or paused while the wallet signed: nothing kept or sent
            log.info("%s: payout %s not sent: %s; the transaction signed for it is dropped", self.chain, p.id, e,
                     extra={"chain": self.chain, "payout_id": p.id})
            return True
        tx = answer.txs[-1]
        log.info("%s: payout %s signed (%s); broadcasting", self.chain, p.id, tx.txid,
                 extra={"chain": self.chain, "payout_id": p.id, "txid": tx.txid})
        refused = await self.broadcast_new(answer.txs, f"{self.chain}: payout {p.id}", "payout")
        if refused is not None:
            self.store.payouts.failed(p.id, f"the node refused the transaction: {refused[:300]}")
        return True

    async def _follow_payouts(self, head: int) -> None:
        assert self.tracker is not None
        followed = [(p, self.store.chaintxs.for_ref(p.id, "payout"))
                    for p in self.store.payouts.in_status(self.chain, "broadcast")]
        statuses = await self.tracker.statuses([t for _, txs in followed for t in txs])
        for p, txs in followed:
            what = f"{self.chain}: payout {p.id}"

            def replace(tx: SignedTx, pid: str = p.id) -> None:
                self.store.payouts.replaced(pid, tx)

            t = await self.tracker.follow(txs, statuses, head=head, what=what,
                                          replace=replace if self.cfg.asset(p.asset) is not None else None)
            if t.state == "dead":
                self.store.payouts.failed(p.id, f"the node refused the transaction: {(t.error or '')[:300]}")
                continue
            if t.state != "mined" or t.confirmations < self.cfg.confirmations:
                continue
            s = t.status
            assert s is not None and t.tx is not None
            if s.success:
                self.store.payouts.completed(p.id, txid=s.txid, block_number=s.block_number or 0, fee_paid=s.fee_paid)
                log.info("%s: payout %s completed in block %s", self.chain, p.id, s.block_number,
                         extra={"chain": self.chain, "payout_id": p.id, "txid": s.txid})
            else:
                self.store.payouts.failed(p.id, f"transaction reverted: {s.error or 'reverted'}", txid=s.txid,
                                          block_number=s.block_number,
                                          fee_paid=None if s.fee_paid is None else str(s.fee_paid))
                log.warning("%s: payout %s failed: %s", self.chain, p.id, s.error,
                            extra={"chain": self.chain, "payout_id": p.id, "txid": s.txid})

    # --- the finality guard -----------------------------------------------------------------

    async def _guard_settled(self, head: int) -> None:
        """Transactions of completed payouts and confirmed sweeps, top-ups no sweep follows
        any more (a sweep that topped up again, was re-planned or failed), and fillers stay
        followed until they are ``finality_depth`` deep: a reorg deeper than
        ``confirmations`` can take one off the chain after its payout completed, and a
        hot-wallet slot left unsent (an EVM nonce) stalls every later payout. Then its stored
        bytes are sent again (same slot, so it can still only be mined once) and it is
        followed until it is back and final; the payout or sweep keeps its status, since the
        same transaction lands again. One status batch per round for all of them."""
        assert self.tracker is not None
        # a block counts as final once both the node's head and our scan are finality_depth
        # past it (a scanner that is behind has not seen a reorg there yet)
        final_below = min(head, self.store.chains.scanned_number(self.chain)) - self.cfg.finality_depth
        txs = self.store.chaintxs.to_guard(self.chain, final_below)
        if not txs:
            return
        statuses = await self.tracker.statuses(txs)
        for group in groups(txs):
            first = group[0]
            was_open = any(t.status == "open" for t in group)
            what = f"{self.chain}: settled {first.purpose} {first.ref_id}"

            def replace(tx: SignedTx, first: StoredTx = first) -> None:
                self.store.chaintxs.add(self.chain, purpose=first.purpose, ref_id=first.ref_id, tx=tx)

            t = await self.tracker.follow(group, statuses, head=head, what=what,
                                          replace=replace if first.purpose == "filler" else None)
            if t.state == "dead":
                self.metrics.errors.labels("settled_tx_refused").inc()
                log.error("%s: the node refuses it for good: %s", what, t.error, extra={"chain": self.chain})
                self._settled_undone(first, "its transaction left the chain in a reorg and can never be mined"
                                     f" again: {(t.error or 'refused')[:300]}")
            elif t.state != "mined":
                if not was_open and not t.stale:
                    self.metrics.errors.labels("settled_tx_reorged").inc()
            elif t.status is not None and t.confirmations >= self.cfg.confirmations:
                self._settled_again(first, t.status, t.tx)

    def _settled_again(self, tx: StoredTx, s: TxStatus, mined: StoredTx | None = None) -> None:
        """A settled transaction is mined and ``confirmations`` deep, which it already was
        unless a reorg took it off the chain and it was mined again: then it may sit in
        another block, at another fee (EVM: the block's base fee), as the other transaction
        of its group, reverted (EVM: the new chain's state differs, e.g. the deposit that
        funded it was dropped too), or, where it had reverted, succeeded (the state that made
        it revert, such as a blocked recipient, is gone with the old blocks). The record
        follows: ``payout.remined`` / ``sweep.remined``; reverted now, ``payout.failed`` /
        ``sweep.failed`` (the money never moved); succeeded now, ``payout.completed`` /
        ``sweep.confirmed`` (the money moved: an app must not pay it again)."""
        if tx.purpose not in ("payout", "sweep"):
            return
        row = self.store.payouts.row(tx.ref_id) if tx.purpose == "payout" else self.store.sweeps.row(tx.ref_id)
        if row is None:
            return
        if not s.success and row.status == "failed":
            return  # failed by this revert, and still reverted: nothing moved, nothing to say
        if not s.success:
            log.error("%s: settled %s %s reverted when mined again after a reorg: %s", self.chain, tx.purpose,
                      tx.ref_id, s.error, extra={"chain": self.chain, "txid": s.txid})
            self._settled_undone(tx, f"its transaction left the chain in a reorg and reverted when mined again"
                                     f" in block {s.block_number}: {(s.error or 'reverted')[:300]}",
                                 txid=s.txid, block_number=s.block_number,
                                 fee_paid=None if s.fee_paid is None else str(s.fee_paid))
        elif s.success and row.status == "failed":
            self._settled_redone(tx, s, mined)
        elif (self.store.payouts.remined(tx.ref_id, txid=s.txid, block_number=s.block_number, fee_paid=s.fee_paid)
              if tx.purpose == "payout" else self.store.sweeps.remined(
                  tx.ref_id, txid=s.txid, fee_paid=s.fee_paid,
                  amount=mined.amount if mined is not None and mined.purpose == "sweep" else None)):
            log.warning("%s: %s %s was mined again after a reorg: %s in block %s", self.chain, tx.purpose, tx.ref_id,
                        s.txid, s.block_number, extra={"chain": self.chain, "txid": s.txid})

    def _settled_redone(self, tx: StoredTx, s: TxStatus, mined: StoredTx | None) -> None:
        """A payout or sweep that failed because its transaction reverted: a reorg took that
        transaction off the chain and it succeeded when mined again, so the money moved. The
        record says so (``payout.completed``, ``sweep.confirmed``). A sweep whose deposits a
        later sweep covers meanwhile keeps ``failed`` (both cannot have moved them; the later
        one will revert or move less) until that one fails (asked again each round until
        final; the treasury has the money either way)."""
        if tx.purpose == "sweep" and self.store.sweeps.covered_elsewhere(tx.ref_id):
            return
        self.metrics.errors.labels("settled_tx_redone").inc()
        log.error("%s: %s %s had failed (its transaction reverted); a reorg took that block and the same transaction"
                  " succeeded in block %s: the money moved", self.chain, tx.purpose, tx.ref_id, s.block_number,
                  extra={"chain": self.chain, "txid": s.txid})
        if tx.purpose == "payout":
            self.store.payouts.completed(tx.ref_id, txid=s.txid, block_number=s.block_number or 0, fee_paid=s.fee_paid)
        else:
            self.store.sweeps.confirmed(tx.ref_id, txid=s.txid, fee_paid=s.fee_paid, dust=None,
                                        amount=mined.amount if mined is not None and mined.purpose == "sweep" else None)

    def _settled_undone(self, tx: StoredTx, reason: str, **payout_fields: Any) -> None:
        """A completed payout's or confirmed sweep's transaction left the chain in a reorg and
        the node refuses it for good (a UTXO input spent by a rival the new chain holds), or it
        reverted when mined again: the money never moved. The payout or sweep says so
        (``payout.failed`` / ``sweep.failed``); a sweep's deposits are uncovered and its
        addresses planned again."""
        if tx.purpose == "payout":
            row = self.store.payouts.row(tx.ref_id)
            if row is not None and row.status == "completed":
                self.store.payouts.failed(tx.ref_id, reason, **payout_fields)
        elif tx.purpose == "sweep":
            sweep = self.store.sweeps.row(tx.ref_id)
            if sweep is not None and sweep.status == "confirmed":
                self.store.sweeps.failed(tx.ref_id, reason, replan=True)

    async def _balance_metrics(self, client: ChainClient) -> None:
        assert self.hot is not None
        self._balances_at = time.monotonic()
        state, _ = self.store.chaintxs.wallet_state(self.chain)
        for asset in self.cfg.assets:
            try:
                own = await self.wallet.balance(asset, state) if self.wallet is not None else None
                balance = own if own is not None else await client.balance(self.hot, asset)
            except WatcherError:
                continue
            self.metrics.hot_wallet_balance.labels(self.chain, asset.symbol).set(balance / 10**asset.decimals)

