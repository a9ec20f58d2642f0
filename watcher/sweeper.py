"""Sweeps, as steps of the chain's sender round.

Native coin: send the confirmed balance less the exact fee (gas x max fee per gas), so
nothing but the unspent part of the fee budget stays behind (recorded as ``dust``).

Token: if the deposit address lacks gas, the hot wallet first sends exactly the gas the
token transfer needs at current fees plus ``gas_margin`` (``funding``), waits for
``funding_confirmations``, then the token transfer is signed and sent (``broadcast``). Every
transaction is stored before it is broadcast; a crash at any step resumes the same step with
the same stored bytes and nonce, never a second transfer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .chains import ChainClient, FeeQuote, SignedTx
from .errors import NodeError, RpcError
from .money import format_amount
from .store.db import storage_trouble
from .txtrack import broadcast, track

if TYPE_CHECKING:
    import sqlite3

    from .config import AssetConfig
    from .sender import Sender

log = logging.getLogger(__name__)

MAX_TOPUPS = 3


class Sweeper:
    def __init__(self, sender: Sender):
        self.s = sender
        self.store = sender.store
        self.cfg = sender.cfg
        self.chain = sender.chain
        self._last_plan: float | None = None  # trio time of the last run (set in the first round)
        self.requested = False

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

    async def round(self, client: ChainClient, head: int) -> None:
        sweep = self.cfg.sweep
        if not sweep.enabled:
            return
        for row in self.store.sweeps.active(self.chain):
            try:
                await self._step(client, head, row)
            except RpcError as e:
                if e.retryable:
                    raise
                # the node refuses this sweep for good (e.g. estimateGas reverts: a reorg took
                # the deposit it was planned for): fail it, so it stops holding up the round;
                # what is really there is planned again by the next run
                log.warning("%s: sweep %s failed: %s", self.chain, row["id"], e.message, extra={"chain": self.chain})
                self.store.sweeps.failed(row["id"], f"the node refused it: {e.message[:300]}")
            except NodeError:
                raise
            except Exception as e:  # one bad sweep must not stop the others: record it
                if storage_trouble(e):
                    raise  # the file, not this sweep: the sender's round backs off and retries
                log.exception("%s: sweep %s failed", self.chain, row["id"])
                self.store.sweeps.failed(row["id"], f"{type(e).__name__}: {e}")
        if self._last_plan is None:
            self._last_plan = trio.current_time()
        due = sweep.interval > 0 and trio.current_time() - self._last_plan >= sweep.interval
        if self.requested or due:
            self._last_plan = trio.current_time()
            # a requested run continues while candidates wait for their address's other sweep
            self.requested = await self.plan(client) > 0

    async def plan(self, client: ChainClient) -> int:
        """Plan sweeps for candidates whose confirmed balance reaches ``min_amount``; returns
        how many candidates were deferred (their address already has a sweep in progress)."""
        sweep = self.cfg.sweep
        assert sweep.to is not None
        confirmed_block = self.store.chains.scanned_number(self.chain) - self.cfg.confirmations + 1
        deferred = 0
        busy = self.store.sweeps.busy_addresses(self.chain)
        for c in self.store.sweeps.candidates(self.chain, sweep.batch_size):
            if c["address"] in busy:
                deferred += 1  # one sweep per address at a time; a later round takes this one
                continue
            asset = self.cfg.asset(c["asset"])
            if asset is None:
                self.store.sweeps.drop_candidate(self.chain, c["address"], c["asset"])
                continue
            try:  # the balance as of the confirmation depth: unconfirmed deposits are not swept
                balance = await client.balance(c["address"], asset, block=max(0, confirmed_block))
            except NodeError:
                balance = await client.balance(c["address"], asset)
            if balance < max(1, sweep.min_amount.get(asset.symbol, 0)):
                self.store.sweeps.drop_candidate(self.chain, c["address"], c["asset"])
                continue
            sid = self.store.sweeps.plan(self.chain, c["address"], asset.symbol, balance, sweep.to)
            busy.add(c["address"])
            log.info("%s: sweep %s planned: %s %s from %s", self.chain, sid, format_amount(balance, asset.decimals),
                     asset.symbol, c["address"], extra={"chain": self.chain, "sweep_id": sid})
        return deferred

    def _key(self, address: str) -> bytes:
        watched = self.store.addresses.get(self.chain, address)
        assert watched is not None and watched.derivation_index is not None
        return self.s.daemon.keyring.private_key(self.s.family.bip44_coin, watched.derivation_index)

    def _sign(self, row: sqlite3.Row, asset: AssetConfig, amount: int, nonce: int, gas: int, fees: FeeQuote) -> SignedTx:
        return self.s.family.sign_transfer(self._key(row["address"]), node_info=self.s.watcher.status.node_info,
                                           to=row["to_address"], asset=asset, amount=amount, nonce=nonce,
                                           gas_limit=gas, fees=fees)

    async def _step(self, client: ChainClient, head: int, row: sqlite3.Row) -> None:
        asset = self.cfg.asset(row["asset"])
        if asset is None:
            self.store.sweeps.failed(row["id"], f"asset {row['asset']} is no longer configured")
            return
        if row["status"] == "planned":
            await (self._send_native(client, row, asset) if asset.contract is None
                   else self._send_token(client, row, asset))
        elif row["status"] == "funding":
            await self._follow_funding(client, head, row, asset)
        elif row["status"] == "broadcast":
            await self._follow_sweep(client, head, row, asset)

    async def _send_native(self, client: ChainClient, row: sqlite3.Row, asset: AssetConfig) -> None:
        fees = await self.s.fees(client)
        gas = await client.estimate_gas(row["address"], row["to_address"], asset, 1)
        balance = await client.balance(row["address"], asset)
        amount = balance - gas * fees.max_fee
        if amount <= 0 or amount < self.cfg.sweep.min_amount.get(asset.symbol, 0):
            self.store.sweeps.failed(row["id"], f"balance {format_amount(balance, asset.decimals)} {asset.symbol} "
                                                "does not cover min_amount plus the fee")
            return
        nonce = await client.nonce(row["address"], pending=True)
        tx = self._sign(row, asset, amount, nonce, gas, fees)
        self.store.sweeps.signed(row["id"], tx, amount)
        await broadcast(self.store, client, tx, f"{self.chain}: sweep {row['id']}")

    async def _send_token(self, client: ChainClient, row: sqlite3.Row, asset: AssetConfig) -> None:
        """Send the token transfer if the address has the gas for it, else fund the gas."""
        amount = int(row["amount"])
        fees = await self.s.fees(client)
        estimate = await client.estimate_gas(row["address"], row["to_address"], asset, amount)
        gas = estimate + estimate * self.cfg.sweep.gas_margin_ppm // 1_000_000
        need = gas * fees.max_fee
        have = await client.balance(row["address"], self.cfg.native)
        if have >= need:
            nonce = await client.nonce(row["address"], pending=True)
            tx = self._sign(row, asset, amount, nonce, gas, fees)
            self.store.sweeps.signed(row["id"], tx, amount)
            await broadcast(self.store, client, tx, f"{self.chain}: sweep {row['id']}")
            return
        if row["attempts"] >= MAX_TOPUPS:
            self.store.sweeps.failed(row["id"], f"gas was topped up {MAX_TOPUPS} times and fees still outran it")
            return
        await self._fund(client, row, need - have, fees)

    async def _fund(self, client: ChainClient, row: sqlite3.Row, topup: int, fees: FeeQuote) -> None:
        hot = self.s.hot
        assert hot is not None
        native = self.cfg.native
        gas = await client.estimate_gas(hot, row["address"], native, topup)
        available = await self.s.hot_available(client, native.symbol)
        if available < topup + gas * fees.max_fee:
            reason = (f"hot wallet cannot fund gas: {format_amount(topup, native.decimals)} {native.symbol} plus fees "
                      f"needed, {format_amount(max(0, available), native.decimals)} available")
            if row["reason"] != reason:
                log.warning("%s: sweep %s waits: %s", self.chain, row["id"], reason, extra={"chain": self.chain})
                with self.store.db.transaction() as conn:
                    conn.execute("UPDATE sweeps SET reason = ? WHERE id = ?", (reason, row["id"]))
            return
        with self.store.db.transaction():
            nonce = self.store.chaintxs.take_nonce(self.chain)
            tx = self.s.family.sign_transfer(self.s.hot_key(), node_info=self.s.watcher.status.node_info,
                                             to=row["address"], asset=native, amount=topup, nonce=nonce,
                                             gas_limit=gas, fees=fees)
            self.store.sweeps.funding(row["id"], tx, hot, topup, native.symbol)
        log.info("%s: sweep %s: topping up %s %s of gas (%s)", self.chain, row["id"],
                 format_amount(topup, native.decimals), native.symbol, tx.txid,
                 extra={"chain": self.chain, "sweep_id": row["id"], "txid": tx.txid})
        await broadcast(self.store, client, tx, f"{self.chain}: gas top-up for sweep {row['id']}")

    async def _follow_funding(self, client: ChainClient, head: int, row: sqlite3.Row, asset: AssetConfig) -> None:
        txs = [t for t in self.store.chaintxs.for_ref(row["id"], "topup") if t["status"] != "replaced"]
        # only the newest top-up's nonce is still in play; earlier rounds are settled
        txs = [t for t in txs if t["nonce"] == txs[-1]["nonce"]] if txs else []
        native = self.cfg.native

        async def resign(fees: FeeQuote) -> SignedTx:
            first = txs[0]
            tx = self.s.family.sign_transfer(self.s.hot_key(), node_info=self.s.watcher.status.node_info,
                                             to=row["address"], asset=native, amount=int(first["amount"]),
                                             nonce=first["nonce"], gas_limit=first["gas_limit"], fees=fees)
            with self.store.db.transaction():
                self.store.chaintxs.add(self.chain, purpose="topup", ref_id=row["id"], sender=self.s.hot,
                                        asset=native.symbol, amount=int(first["amount"]), tx=tx)
            return tx

        policy = self.cfg.payouts
        t = await track(self.store, client, txs, head=head, stuck_after=policy.stuck_after,
                        fee_bump_ppm=policy.fee_bump_ppm, max_fee=policy.max_fee_per_gas, resign=resign,
                        what=f"{self.chain}: gas top-up for sweep {row['id']}")
        if t.state != "mined" or t.confirmations < self.cfg.sweep.funding_confirmations:
            return
        assert t.status is not None
        self.store.sweeps.topup_fee(row["id"], t.status.fee_paid)
        if not t.status.success:
            self.store.sweeps.failed(row["id"], f"gas top-up reverted: {t.status.error}")
            return
        await self._send_token(client, row, asset)  # funded: the token transfer goes now

    async def _follow_sweep(self, client: ChainClient, head: int, row: sqlite3.Row, asset: AssetConfig) -> None:
        txs = self.store.chaintxs.for_ref(row["id"], "sweep")

        async def resign(fees: FeeQuote) -> SignedTx | None:
            first = txs[0]
            amount = int(first["amount"])
            if asset.contract is None:  # a native sweep pays the higher fee out of the amount
                # the original is unmined, so the balance is whole; only this nonce spends from it
                balance = await client.balance(row["address"], asset)
                amount = balance - first["gas_limit"] * fees.max_fee
                if amount <= 0:
                    return None
            elif (await client.balance(row["address"], self.cfg.native)) < first["gas_limit"] * fees.max_fee:
                return None  # not enough gas for a higher fee: wait for the first one
            tx = self._sign(row, asset, amount, first["nonce"], first["gas_limit"], fees)
            self.store.sweeps.signed(row["id"], tx, amount, replacement=True)
            return tx

        policy = self.cfg.payouts
        if txs and all(t["status"] == "replaced" for t in txs):
            # another transaction of this address took the nonce (one of ours, sent again
            # after a reorg): this sweep moved nothing; what is left is planned again
            self.store.sweeps.failed(row["id"], "its nonce was used by another transaction of the address")
            log.warning("%s: sweep %s: nonce %s was used by another transaction; sweep failed, to be planned "
                        "again", self.chain, row["id"], txs[0]["nonce"], extra={"chain": self.chain})
            return
        t = await track(self.store, client, txs, head=head, stuck_after=policy.stuck_after,
                        fee_bump_ppm=policy.fee_bump_ppm, max_fee=policy.max_fee_per_gas, resign=resign,
                        what=f"{self.chain}: sweep {row['id']}")
        if t.state != "mined" or t.confirmations < self.cfg.confirmations:
            return
        s = t.status
        assert s is not None
        if not s.success:
            self.store.sweeps.failed(row["id"], f"sweep transaction reverted: {s.error}")
            return
        dust = await client.balance(row["address"], self.cfg.native)
        self.store.sweeps.confirmed(row["id"], txid=s.txid, fee_paid=s.fee_paid, dust=dust)
        log.info("%s: sweep %s confirmed (%s)", self.chain, row["id"], s.txid,
                 extra={"chain": self.chain, "sweep_id": row["id"], "txid": s.txid})
