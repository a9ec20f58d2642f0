"""The EVM wallet: payouts from the hot wallet with a local nonce, sweeps of deposit
addresses (a gas top-up from the hot wallet first where a token sweep needs it), EIP-1559 or
legacy fees under ``max_fee_per_gas``, replacements at the same nonce, and fillers for nonce
gaps.

State (kept by the core): ``{"next_nonce": n}``, the hot wallet's next nonce. It is handed
out with the transaction that uses it, so two transactions never share one; deposit
addresses send rarely and take their nonce from the node each time.

Native sweeps send the confirmed balance less the exact fee (gas x max fee per gas), so
nothing but the unspent part of the fee budget stays behind (reported as ``dust``). A token
sweep whose address lacks gas gets exactly the gas the transfer needs at current fees plus
``gas_margin`` from the hot wallet first (at most ``MAX_TOPUPS`` times). Once gas was sent,
the transfer goes out at a fee lowered to what the address holds while that still covers the
next base fee up by a quarter plus the tip (the base fee moves every block: a new top-up
per wei of it cost more than it moved); past ``MAX_TOPUPS`` the sweep waits for fees to fall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from watcher.chains import (
    Done,
    Fail,
    Later,
    PayoutIntent,
    Release,
    Send,
    SignedTx,
    StoredTx,
    SweepCandidate,
    SweepIntent,
    SweepPlan,
    TxStatus,
    Wait,
    Wallet,
    WalletContext,
    WalletState,
)
from watcher.config import AssetConfig
from watcher.errors import NodeError, RpcError
from watcher.money import format_amount

from .erc20 import load_abi
from .fees import FeeQuote
from .send import NATIVE_TRANSFER_GAS, sign_transfer

if TYPE_CHECKING:
    from .client import EvmClient
    from .family import EvmOptions

MAX_TOPUPS = 3
_GAS_GUESS = 100_000  # for the balance check when the estimate failed


class EvmWallet(Wallet):
    def __init__(self, ctx: WalletContext, client: EvmClient, options: EvmOptions):
        self.ctx = ctx
        self.cfg = ctx.config
        self.client = client
        self.opts = options
        self.keys = ctx.keys
        self.hot = ctx.keys.hot_address
        self.native = ctx.config.native
        load_abi()  # web3 and eth-account load now, at start-up, not in the middle of a scan

    # --- helpers ---------------------------------------------------------------------------

    @property
    def chain_id(self) -> int | None:
        return self.opts.chain_id or self.client.chain_id

    async def fees(self) -> FeeQuote:
        return (await self.client.fee_quote()).capped(self.opts.max_fee_per_gas)

    def _sign(self, sender: str, to: str, asset: AssetConfig, amount: int, nonce: int, gas: int,
              fees: FeeQuote) -> SignedTx:
        return sign_transfer(self.keys.private_key_for(sender), chain_id=self.chain_id, sender=sender, to=to,
                             asset=asset, amount=amount, nonce=nonce, gas_limit=gas, fees=fees)

    async def available(self, asset: AssetConfig) -> int:
        """The hot wallet's balance of an asset, less what its unmined transactions may spend
        (their amounts and, in the native coin, their most expensive fees)."""
        assert self.hot is not None
        balance = await self.client.balance(self.hot, asset)
        reserved = 0
        for t in self.ctx.in_flight():
            if t.sender != self.hot:
                continue
            if t.asset == asset.symbol:
                reserved += t.amount
            if asset.contract is None:
                reserved += t.fee_limit
        return balance - reserved

    def _show(self, units: int, asset: AssetConfig) -> str:
        return f"{format_amount(max(0, units), asset.decimals)} {asset.symbol}"

    # --- the contract ------------------------------------------------------------------------

    async def sync(self, state: WalletState) -> WalletState:
        assert self.hot is not None
        node = await self.client.nonce(self.hot, pending=True)
        return {**state, "next_nonce": max(node, int(state.get("next_nonce", 0)))}

    async def pay(self, intent: PayoutIntent, state: WalletState) -> Wait | Fail | Send:
        assert self.hot is not None
        asset, amount = intent.asset, intent.amount
        fees = await self.fees()
        gas: int | None
        try:
            gas = await self.client.estimate_gas(self.hot, intent.to, asset, amount)
        except RpcError as e:
            gas, estimate_error = None, e.message
        native = self.native
        have_native = await self.available(native)
        have_asset = have_native if asset.contract is None else await self.available(asset)
        need_native = (gas or _GAS_GUESS) * fees.max_fee + (amount if asset.contract is None else 0)
        short = []
        if have_native < need_native:
            short.append(f"{self._show(need_native, native)} needed for "
                         f"{'amount and ' if asset.contract is None else ''}fees, {self._show(have_native, native)} available")
        if asset.contract is not None and have_asset < amount:
            short.append(f"{self._show(amount, asset)} needed, {self._show(have_asset, asset)} available")
        if short:
            return Wait("insufficient hot wallet balance: " + "; ".join(short))
        if gas is None:
            return Wait(f"gas estimate failed: {estimate_error}")
        nonce = await self._next_nonce(state)
        tx = self._sign(self.hot, intent.to, asset, amount, nonce, gas, fees)
        return Send((tx,), state={**state, "next_nonce": nonce + 1})

    async def plan_sweeps(self, candidates: Sequence[SweepCandidate], *, confirmed_block: int,
                          min_amount: Mapping[str, int]) -> list[SweepPlan | Later]:
        plans: list[SweepPlan | Later] = []
        for c in candidates:
            try:  # the balance as of the confirmation depth: unconfirmed deposits are not swept
                balance = await self.client.balance(c.address, c.asset, block=confirmed_block)
            except NodeError:  # a node that keeps no state that old
                balance = await self.client.balance(c.address, c.asset)
            if balance >= max(1, min_amount.get(c.asset.symbol, 0)):
                plans.append(SweepPlan(asset=c.asset.symbol, addresses=(c.address,), amount=balance,
                                       deposits=tuple(d.transfer_id for d in c.deposits)))
        return plans

    async def sweep_step(self, intent: SweepIntent, state: WalletState) -> Wait | Fail | Send | Done:
        address = intent.addresses[0]
        if any(t.purpose == "sweep" and t.status == "mined" for t in intent.txs):
            return Done(dust=await self.client.balance(address, self.native))
        if intent.asset.contract is None:
            return await self._native_sweep(intent, address)
        return await self._token_sweep(intent, address, state)

    async def _native_sweep(self, intent: SweepIntent, address: str) -> Fail | Send:
        asset = intent.asset
        fees = await self.fees()
        gas = await self.client.estimate_gas(address, intent.to, asset, 1)
        balance = await self.client.balance(address, asset)
        amount = balance - gas * fees.max_fee
        if amount <= 0 or amount < self.cfg.sweep.min_amount.get(asset.symbol, 0):
            return Fail(f"balance {self._show(balance, asset)} does not cover min_amount plus the fee")
        nonce = await self.client.nonce(address, pending=True)
        return Send((self._sign(address, intent.to, asset, amount, nonce, gas, fees),), amount=amount)

    async def _token_sweep(self, intent: SweepIntent, address: str, state: WalletState) -> Wait | Fail | Send:
        """Send the token transfer if the address has the gas for it, else fund the gas."""
        asset, amount = intent.asset, intent.amount
        fees = await self.fees()
        estimate = await self.client.estimate_gas(address, intent.to, asset, amount)
        gas = estimate + estimate * self.opts.gas_margin_ppm // 1_000_000
        need = gas * fees.max_fee
        have = await self.client.balance(address, self.native)
        topups = {t.conflict for t in intent.txs if t.purpose == "topup"}
        # gas sent for it already: the fee of the moment may have crept up since (the base fee
        # moves every block); a top-up per wei of it cost more than it moved, and the sweep
        # failed after three. The gas there is used while it covers the next blocks' fee.
        usable = fees if have >= need else fees.within(have // gas) if topups else None
        if usable is not None:
            nonce = await self.client.nonce(address, pending=True)
            return Send((self._sign(address, intent.to, asset, amount, nonce, gas, usable),))
        if len(topups) >= MAX_TOPUPS:  # the address keeps its candidate: waiting, not failed
            return Wait(f"fees rose past the gas of {MAX_TOPUPS} top-ups ({self._show(have, self.native)} at the "
                        f"address, {self._show(need, self.native)} asked now); waiting for them to fall")
        return await self._fund(address, need - have, fees, state)

    async def _fund(self, address: str, topup: int, fees: FeeQuote, state: WalletState) -> Wait | Send:
        assert self.hot is not None
        native = self.native
        gas = await self.client.estimate_gas(self.hot, address, native, topup)
        available = await self.available(native)
        if available < topup + gas * fees.max_fee:
            return Wait(f"hot wallet cannot fund gas: {self._show(topup, native)} plus fees needed, "
                        f"{self._show(available, native)} available")
        nonce = await self._next_nonce(state)
        tx = self._sign(self.hot, address, native, topup, nonce, gas, fees)
        return Send((tx,), state={**state, "next_nonce": nonce + 1}, phase="funding")

    async def statuses(self, txs: Sequence[StoredTx]) -> dict[str, TxStatus]:
        """Receipts, checked against each sender's nonce: a transaction whose receipt says
        mined while its sender's mined nonce count (read after the receipts) does not pass
        its nonce is not in the node's state, whatever the receipt said (a receipt of a block
        a reorg dropped, as anvil has answered in the soak). It counts as pending; the next
        round decides again."""
        out = await self.client.tx_statuses([t.txid for t in txs])
        senders = sorted({t.sender for t in txs if out.get(t.txid) and out[t.txid].state == "mined"
                          and t.sender and "nonce" in t.details})
        if not senders:
            return out
        counts = await self.client.mined_nonces(senders)
        for t in txs:
            s = out.get(t.txid)
            if s is not None and s.state == "mined" and t.sender in counts and int(t.details["nonce"]) >= counts[t.sender]:
                out[t.txid] = TxStatus(txid=t.txid, state="pending")
        return out

    async def broadcast(self, tx: SignedTx) -> None:
        await self.client.send_raw(tx)

    async def replace(self, txs: Sequence[StoredTx], *, bump_ppm: int, state: WalletState) -> SignedTx | Wait:
        newest = txs[-1]
        old = FeeQuote.from_details(newest.details)
        fees = old.bumped(bump_ppm, floor=await self.client.fee_quote()).capped(self.opts.max_fee_per_gas)
        if fees.max_fee <= old.max_fee:
            return Wait("fees are at the cap (max_fee_per_gas)")
        asset = self.cfg.asset(newest.asset)
        if asset is None:
            return Wait(f"asset {newest.asset} is no longer configured")
        nonce, gas = int(newest.details["nonce"]), int(newest.details["gas_limit"])
        amount = newest.amount
        if newest.purpose == "sweep":
            if asset.contract is None:  # a native sweep pays the higher fee out of the amount
                # the original is unmined, so the balance is whole; only this nonce spends from it
                amount = await self.client.balance(newest.sender, asset) - gas * fees.max_fee
                if amount <= 0:
                    return Wait("the balance does not cover a higher fee")
            elif await self.client.balance(newest.sender, self.native) < gas * fees.max_fee:
                return Wait("not enough gas for a higher fee: waiting for the first one")
        return self._sign(newest.sender, newest.to, asset, amount, nonce, gas, fees)

    async def _next_nonce(self, state: WalletState) -> int:
        """The hot wallet's next nonce: ours, or the node's if it is ahead (a transaction sent
        from the hot key outside watcher, e.g. by hand from a wallet app: signing below it
        would be refused as "nonce too low", again and again)."""
        assert self.hot is not None
        return max(int(state["next_nonce"]), await self.client.nonce(self.hot, pending=True))

    async def release(self, tx: StoredTx, state: WalletState) -> Release:
        """A refused transaction of the hot wallet leaves its nonce unused. If nothing later
        took a nonce, it is given back; if the node already has a transaction at it, nothing
        is needed; otherwise every later transaction waits behind the gap, so a zero-value
        transfer to itself takes the nonce (a filler)."""
        if tx.sender != self.hot or "nonce" not in tx.details:
            return Release()  # deposit addresses take their nonce from the node each time
        nonce = int(tx.details["nonce"])
        if await self.client.nonce(self.hot, pending=False) > nonce:  # by a transaction from outside
            return Release(note=f"nonce {nonce} is already used on chain")
        if int(state.get("next_nonce", -1)) == nonce + 1:
            return Release(state={**state, "next_nonce": nonce}, note=f"nonce {nonce} given back")
        fees = await self.fees()
        filler = self._sign(self.hot, self.hot, self.native, 0, nonce, NATIVE_TRANSFER_GAS, fees)
        return Release(filler=filler, note=f"nonce {nonce} filled by a zero-value transfer to itself ({filler.txid}) "
                                            "so that later transactions can go")
