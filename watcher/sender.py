"""One sender per chain: sends payouts from the hot wallet and drives sweeps.

Everything that spends goes through this one task per chain, so the hot wallet's nonces are
handed out one at a time. A round: follow what is in flight (``txtrack``), then, unless
paused, send pending payouts and move sweeps on. Each payout is signed and stored (with its
nonce) in one transaction and only then broadcast; after a crash the stored bytes are sent
again, so a payout can never go out twice.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import TYPE_CHECKING

import trio

from .chains import BroadcastRejected, ChainClient, FeeQuote, SignedTx
from .errors import NodeError, RpcError, WatcherError
from .keys import HOT_WALLET_ACCOUNT
from .money import format_amount
from .sweeper import Sweeper
from .tasks import StorageRetry
from .txtrack import broadcast, cap_fees, track

if TYPE_CHECKING:
    import sqlite3

    from .daemon import Daemon
    from .scanner import ChainWatcher

log = logging.getLogger(__name__)

_BALANCE_METRIC_EVERY = 30.0


class Sender:
    def __init__(self, daemon: Daemon, watcher: ChainWatcher, *, tick: float | None = None):
        self.daemon = daemon
        self.watcher = watcher
        self.cfg = watcher.config
        self.chain = self.cfg.id
        self.family = watcher.family
        self.store = daemon.store
        self.metrics = daemon.metrics
        self._storage = StorageRetry(daemon.store.db, daemon.metrics, f"sender {watcher.config.id}")
        self.clock = daemon.clock
        self.hot = self.store.hot_wallet(self.chain)
        # rounds run when woken (a new block, a new or approved payout, a sweep request, a
        # pause change) and at least every tick (stuck transactions are a matter of time)
        self.tick = tick if tick is not None else 5.0
        self.sweeper = Sweeper(self)
        self._wake = trio.Event()
        self._synced = False
        self._balances_at = 0.0
        self.store.on_wake("sender", self.wake)
        watcher.on_new_blocks(self.wake)

    def wake(self) -> None:
        self._wake.set()

    def hot_key(self) -> bytes:
        return self.daemon.keyring.private_key(self.family.bip44_coin, 0, account=HOT_WALLET_ACCOUNT)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.hot is None:
            return  # watch-only: nothing can be sent
        while True:
            self._wake = trio.Event()
            client = self.watcher.client
            wait = self.tick
            if client is not None and self.watcher.status.node_up and not self.watcher.status.halted:
                try:
                    wait = self.idle_wait() if not self.busy() else self.tick
                    await self.round(client)
                    self._storage.ok()
                except (NodeError, BroadcastRejected) as e:
                    self.metrics.errors.labels("sender").inc()
                    log.warning("%s: sender round failed: %s", self.chain, getattr(e, "message", e),
                                extra={"chain": self.chain})
                except sqlite3.DatabaseError as e:
                    # locked or full: what the round was writing rolled back; every step is
                    # stored before it acts, so the next round picks up where this one was
                    await self._storage.wait(e)
                    continue
                except Exception:
                    # A bug in one round must not stop deposits, webhooks or the other chains:
                    # log it loudly, count it, and try again after a pause. Everything the
                    # sender does is stored before it acts, so a retried round is safe.
                    self.metrics.errors.labels("sender_bug").inc()
                    log.exception("%s: sender round crashed; retrying in 30 s", self.chain, extra={"chain": self.chain})
                    await trio.sleep(30)
            with trio.move_on_after(wait):
                await self._wake.wait()

    def busy(self) -> bool:
        """Is anything waiting to be sent or in flight (then rounds also run on a timer)?"""
        return bool(self.store.db.scalar(
            "SELECT EXISTS (SELECT 1 FROM payouts WHERE chain = ? AND status IN ('pending', 'broadcast'))"
            " OR EXISTS (SELECT 1 FROM sweeps WHERE chain = ? AND status IN ('planned', 'funding', 'broadcast'))",
            (self.chain, self.chain))) or self.sweeper.requested

    def idle_wait(self) -> float:
        """With nothing in flight, sleep until the next sweep run is due (or a wake-up)."""
        return self.sweeper.seconds_to_next_run()

    async def round(self, client: ChainClient) -> None:
        assert self.hot is not None
        if not self._synced:
            self.store.chaintxs.sync_nonce(self.chain, self.hot, await client.nonce(self.hot, pending=True))
            self._synced = True
        head = self.watcher.status.head or await client.head()
        await self._follow_payouts(client, head)
        await self._guard_settled(client, head)
        paused = self.store.paused()
        if "payouts" not in paused:
            await self._send_payouts(client)
        if "sweeps" not in paused:
            await self.sweeper.round(client, head)
        if time.monotonic() - self._balances_at > _BALANCE_METRIC_EVERY:
            await self._balance_metrics(client)

    # --- payouts ---------------------------------------------------------------------------

    async def fees(self, client: ChainClient) -> FeeQuote:
        return cap_fees(await client.fee_quote(), self.cfg.payouts.max_fee_per_gas)

    async def hot_available(self, client: ChainClient, asset_symbol: str) -> int:
        """The hot wallet's balance of an asset, less what its unmined transactions may spend."""
        assert self.hot is not None
        asset = self.cfg.asset(asset_symbol)
        assert asset is not None
        balance = await client.balance(self.hot, asset)
        reserved = 0
        for t in self.store.chaintxs.open_for_sender(self.chain, self.hot):
            if t["asset"] == asset_symbol:
                reserved += int(t["amount"])
            if asset.contract is None:
                reserved += t["gas_limit"] * int(t["max_fee"])
        return balance - reserved

    async def _send_payouts(self, client: ChainClient) -> None:
        blocked = 0
        for p in self.store.payouts.in_status(self.chain, "pending"):
            try:
                blocked += not await self._send_payout(client, p)
            except BroadcastRejected as e:
                self._release(p, e)
        self.metrics.payouts_blocked.labels(self.chain).set(blocked)

    async def _send_payout(self, client: ChainClient, p: sqlite3.Row) -> bool:
        """Sign, store and broadcast one payout; False if it has to wait (and why is stored)."""
        assert self.hot is not None
        asset = self.cfg.asset(p["asset"])
        if asset is None:
            self.store.payouts.failed(p["id"], f"asset {p['asset']} is no longer configured")
            return True
        amount = int(p["amount"])
        fees = await self.fees(client)
        try:
            gas = await client.estimate_gas(self.hot, p["to_address"], asset, amount)
        except RpcError as e:
            gas = None
            estimate_error = e.message
        native = self.cfg.native
        have_native = await self.hot_available(client, native.symbol)
        have_asset = have_native if asset.contract is None else await self.hot_available(client, asset.symbol)
        need_native = (gas or 100_000) * fees.max_fee + (amount if asset.contract is None else 0)
        short = []
        if have_native < need_native:
            short.append(f"{format_amount(need_native, native.decimals)} {native.symbol} needed for "
                         f"{'amount and ' if asset.contract is None else ''}fees, "
                         f"{format_amount(max(0, have_native), native.decimals)} available")
        if asset.contract is not None and have_asset < amount:
            short.append(f"{format_amount(amount, asset.decimals)} {asset.symbol} needed, "
                         f"{format_amount(max(0, have_asset), asset.decimals)} available")
        if short:
            reason = "insufficient hot wallet balance: " + "; ".join(short)
            if p["reason"] != reason:
                log.warning("%s: payout %s waits: %s", self.chain, p["id"], reason,
                            extra={"chain": self.chain, "payout_id": p["id"]})
                self.store.payouts.block(p["id"], reason)
            return False
        if gas is None:
            self.store.payouts.block(p["id"], f"gas estimate failed: {estimate_error}")
            return False
        key = self.hot_key()
        with self.store.db.transaction():
            nonce = self.store.chaintxs.take_nonce(self.chain)
            tx = self.family.sign_transfer(key, node_info=self.watcher.status.node_info, to=p["to_address"],
                                           asset=asset, amount=amount, nonce=nonce, gas_limit=gas, fees=fees)
            self.store.payouts.signed(p["id"], tx, self.hot)
        log.info("%s: payout %s signed (nonce %d, %s); broadcasting", self.chain, p["id"], nonce, tx.txid,
                 extra={"chain": self.chain, "payout_id": p["id"], "txid": tx.txid})
        await broadcast(self.store, client, tx, f"{self.chain}: payout {p['id']}")
        return True

    def _release(self, p: sqlite3.Row, e: BroadcastRejected) -> None:
        """The node refused a payout's bytes for good: fail it, and give its nonce back if no
        later transaction took one (otherwise the gap is filled by retrying in order)."""
        row = self.store.db.one("SELECT * FROM payouts WHERE id = ?", (p["id"],))
        with self.store.db.transaction() as conn:
            conn.execute("UPDATE chain_txs SET status = 'failed', error = ? WHERE ref_id = ? AND purpose = 'payout'",
                         (e.message[:300], p["id"]))
            conn.execute("UPDATE hot_wallets SET next_nonce = next_nonce - 1 WHERE chain = ? AND next_nonce = ?",
                         (self.chain, (row["nonce"] or -2) + 1))
            self.store.payouts.failed(p["id"], f"the node refused the transaction: {e.message[:300]}")

    async def _follow_payouts(self, client: ChainClient, head: int) -> None:
        policy = self.cfg.payouts
        for p in self.store.payouts.in_status(self.chain, "broadcast"):
            txs = self.store.chaintxs.for_ref(p["id"], "payout")
            asset = self.cfg.asset(p["asset"])

            async def resign(fees: FeeQuote, p: sqlite3.Row = p, txs: list = txs, asset=asset) -> SignedTx:
                first = txs[0]
                tx = self.family.sign_transfer(self.hot_key(), node_info=self.watcher.status.node_info,
                                               to=p["to_address"], asset=asset, amount=int(p["amount"]),
                                               nonce=first["nonce"], gas_limit=first["gas_limit"], fees=fees)
                self.store.payouts.replaced(p["id"], tx, self.hot)
                return tx

            t = await track(self.store, client, txs, head=head, stuck_after=policy.stuck_after,
                            fee_bump_ppm=policy.fee_bump_ppm, max_fee=policy.max_fee_per_gas,
                            resign=resign if asset is not None else None, what=f"{self.chain}: payout {p['id']}")
            if t.state != "mined" or t.confirmations < self.cfg.confirmations:
                continue
            s = t.status
            assert s is not None
            if s.success:
                self.store.payouts.completed(p["id"], txid=s.txid, block_number=s.block_number or 0,
                                             fee_paid=s.fee_paid)
                log.info("%s: payout %s completed in block %s", self.chain, p["id"], s.block_number,
                         extra={"chain": self.chain, "payout_id": p["id"], "txid": s.txid})
            else:
                self.store.payouts.failed(p["id"], f"transaction reverted: {s.error or 'reverted'}", txid=s.txid,
                                          block_number=s.block_number,
                                          fee_paid=None if s.fee_paid is None else str(s.fee_paid))
                log.warning("%s: payout %s failed: %s", self.chain, p["id"], s.error,
                            extra={"chain": self.chain, "payout_id": p["id"], "txid": s.txid})

    async def _guard_settled(self, client: ChainClient, head: int) -> None:
        """Transactions of completed payouts and sweeps, and gas top-ups no sweep follows any
        more (a sweep that topped up again, was re-planned or failed), stay followed until they
        are ``finality_depth`` deep: a reorg deeper than ``confirmations`` can take one off the
        chain after its payout completed, and a hot-wallet nonce left unsent stalls every
        later payout. Then its stored bytes are sent again (same nonce,
        so it can still only be mined once) and it is followed until it is back and final;
        the payout or sweep keeps its status, since the same transaction lands again."""
        rows = self.store.db.query(
            "SELECT c.* FROM chain_txs c"
            " LEFT JOIN payouts p ON c.purpose = 'payout' AND p.id = c.ref_id"
            " LEFT JOIN sweeps s ON c.purpose IN ('sweep', 'topup') AND s.id = c.ref_id"
            " WHERE c.chain = ? AND (c.status = 'open' OR (c.status IN ('mined', 'failed')"
            " AND c.block_number > ?)) AND ((c.purpose = 'payout' AND p.status = 'completed')"
            " OR (c.purpose = 'sweep' AND s.status = 'confirmed')"
            # every gas top-up but the one a funding sweep is following itself: a top-up holds
            # a hot-wallet nonce, and one left unsent would stall every later transaction
            " OR (c.purpose = 'topup' AND NOT (s.status = 'funding' AND c.nonce = (SELECT MAX(t.nonce)"
            " FROM chain_txs t WHERE t.ref_id = c.ref_id AND t.purpose = 'topup'))))"
            " ORDER BY c.nonce, c.id",
            # a block counts as final once both the node's head and our scan are finality_depth
            # past it (a scanner that is behind has not seen a reorg there yet)
            (self.chain, min(head, self.store.chains.scanned_number(self.chain)) - self.cfg.finality_depth))
        groups: dict[tuple[str, str, int], list[sqlite3.Row]] = {}
        for r in rows:  # one group per nonce: the original and its fee-bump replacements
            groups.setdefault((r["ref_id"], r["purpose"], r["nonce"]), []).append(r)
        for (ref, purpose, _), txs in groups.items():
            was_open = any(t["status"] == "open" for t in txs)
            try:
                t = await track(self.store, client, txs, head=head, stuck_after=self.cfg.payouts.stuck_after,
                                fee_bump_ppm=self.cfg.payouts.fee_bump_ppm, max_fee=None, resign=None,
                                what=f"{self.chain}: settled {purpose} {ref}")
            except BroadcastRejected:
                # e.g. a sweep whose gas top-up went with the same reorg: logged by track; the
                # rest of the round (new payouts) must not wait for it
                continue
            if t.state != "mined" and not was_open:
                self.metrics.errors.labels("settled_tx_reorged").inc()

    async def _balance_metrics(self, client: ChainClient) -> None:
        assert self.hot is not None
        self._balances_at = time.monotonic()
        for asset in self.cfg.assets:
            try:
                balance = await client.balance(self.hot, asset)
            except WatcherError:
                continue
            self.metrics.hot_wallet_balance.labels(self.chain, asset.symbol).set(balance / 10**asset.decimals)
