"""The Bitcoin-family wallet: payouts from the hot wallet's coins, consolidating sweeps of
deposit outputs, and fee bumps by BIP125 replacement or by a child that pays for its parent
(CPFP). Everything is signed here (:mod:`.tx`); the node's own wallet is never used.

**Coins.** The hot wallet spends P2WPKH outputs of two kinds: transfers to the hot address
``m/84'/c'/1'/0/0`` (its funding, found by the core's scan: ``WalletContext.hot_coins``) and
the change of its own transactions, each at a fresh ``m/84'/c'/1'/1/i``, remembered in the
wallet state when signed::

    {"next_change": 3, "coins": [{"txid", "vout", "value", "change_index", "conflict"}, ...]}

Before anything is spent every candidate is asked of the node in one batch (``gettxout ...
true``, the mempool included): only confirmed, unspent coins that no transaction of ours in
flight spends are used; a CPFP child alone spends its parent's unconfirmed change. A
remembered coin the node no longer has is forgotten once its creator is mined and no longer
in flight. A BIP125 replacement keeps the change's index and output, but ``replace`` cannot
record the new txid (docs/chains.md, gap 5): while the replacement is in flight the coin
follows it, and if its creator is gone the change address is scanned (``scantxoutset``) and
what it holds is remembered instead.

**Payouts** take the largest coins first until amount, fee and change are covered. Change is
always made, worth at least its dust limit plus the fee of a child spending it, so that any
payout can be pulled along by CPFP. Every input signals BIP125.

**Sweeps** spend every planned deposit output worth more than the fee of spending it to the
treasury in one transaction, with no change: the fee comes out of the amount. Outputs not
worth their fee stay where they are; they are listed with the sweep and reported as its
``dust`` (``details["left"]``), and not planned again.

**Fee bumps.** ``fee_bump = "rbf"``: the same inputs and payee, the change (or a sweep's
amount) pays at least ``bump_ppm`` more and BIP125's incremental relay fee; a node that takes
no replacements (Litecoin Core's default) is found out by ``testmempoolaccept`` and the
payout is pulled along by a child instead. ``"cpfp"``: a child spends the stuck payout's
change (plus a confirmed coin if needed) with a fee that lifts both to the bumped rate.

Statuses need the node's ``-txindex`` (``getrawtransaction`` of our own transactions);
:meth:`BitcoinWallet.sync` refuses to start the sender without it.

``details`` of every transaction: ``inputs`` ([txid, vout, value, address, change index or
null]), ``outputs`` ([address, value], in order), ``change`` ({vout, value, index} or null),
``vsize`` (our estimate, never below the node's), ``fee`` and ``fee_rate`` (sat per 1,000 vB,
fee / vsize); a sweep's ``left`` (outputs not worth spending, as inputs are listed); a CPFP
child's ``parent`` (txid).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any, Literal

from watcher.chains import (
    BroadcastRejected,
    Child,
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
    node_data,
)
from watcher.errors import InvalidAddress, NodeError, RpcError
from watcher.money import format_amount

from . import tx
from .address import from_script, to_script
from .client import sats

if TYPE_CHECKING:
    from watcher.config import AssetConfig

    from .client import BitcoinClient
    from .family import BitcoinOptions

log = logging.getLogger(__name__)

CONF_TARGET = 2  # estimatesmartfee: blocks
COINBASE_MATURITY = 100
# Bitcoin Core's RPC error codes
NO_SUCH_TX = -5
METHOD_NOT_FOUND = -32601
DESERIALIZATION_ERROR = -22
VERIFY_ERROR = -25  # "Missing inputs" and other TransactionErrors
VERIFY_REJECTED = -26  # the mempool's policy said no: the reason follows
ALREADY_IN_CHAIN = -27

# what sendrawtransaction / testmempoolaccept answer, by what it means for the same bytes
_KNOWN = ("txn-already-in-mempool", "txn-already-known", "already in block chain")
_MISSING = ("missing inputs", "missingorspent", "missing-inputs")
_TRANSIENT = ("insufficient fee", "min relay fee not met", "mempool min fee not met", "mempool full",
              "too-long-mempool-chain", "non-bip68-final", "non-final")

Refusal = Literal["known", "missing", "transient", "permanent"]


def refusal(message: str) -> Refusal:
    """What a refusal of the node means for the same bytes: already ``known`` (in the mempool
    or a block), inputs ``missing`` (spent, or never seen: look the transaction up), a
    ``transient`` policy (a fee below the node's floor, a replacement paying too little, a
    full mempool), or ``permanent`` (a conflict the node will not replace, dust, a bad
    script...)."""
    m = message.lower()
    for kind, needles in (("known", _KNOWN), ("missing", _MISSING), ("transient", _TRANSIENT)):
        if any(n in m for n in needles):
            return kind  # type: ignore[return-value]
    return "permanent"


@dataclass(frozen=True, slots=True)
class Coin:
    """An output the wallet may spend: where its key is (``change`` index at
    ``m/84'/c'/1'/1/i``; None for the hot address and deposit addresses) and the conflict
    group of the transaction of ours that made it ("" for funding and deposits)."""

    txid: str
    vout: int
    value: int
    address: str
    change: int | None = None
    conflict: str = ""

    @property
    def outpoint(self) -> str:
        return f"{self.txid}:{self.vout}"

    def entry(self) -> dict[str, Any]:
        """As the wallet state remembers change."""
        return {"txid": self.txid, "vout": self.vout, "value": self.value, "change_index": self.change,
                "conflict": self.conflict}


@dataclass(frozen=True, slots=True)
class Fees:
    rate: int  # sat per 1,000 vB for a new transaction
    incremental: int  # the node's incremental relay fee (BIP125's rule 4), sat per 1,000 vB


def sat_per_kvb(coins_per_kvb: Any) -> int:
    """A fee rate as the node writes it (coins per 1,000 vB) in satoshis per 1,000 vB, rounded up."""
    if not isinstance(coins_per_kvb, int | float | Decimal) or isinstance(coins_per_kvb, bool):
        raise TypeError(f"a fee rate, not {type(coins_per_kvb).__name__}")
    return int((Decimal(str(coins_per_kvb)) * 10**8).to_integral_value(ROUND_CEILING))


def coins_spent(details: Mapping[str, Any]) -> list[Coin]:
    return [Coin(txid=i[0], vout=int(i[1]), value=int(i[2]), address=i[3], change=i[4]) for i in details["inputs"]]


def reserved(txs: Iterable[StoredTx]) -> set[str]:
    """The outpoints ``txs`` spend."""
    return {f"{i[0]}:{i[1]}" for t in txs for i in t.details.get("inputs", ())}


def select(coins: Sequence[Coin], amount: int, payee: bytes, change: bytes, rate: int,
           dust_relay_fee: int) -> tuple[list[Coin], int] | int:
    """The largest coins first until they pay ``amount`` to ``payee``, the fee at ``rate``
    and a change output to ``change`` worth at least its dust limit plus the fee of a child
    spending it (parent and child at ``rate``): the coins and the fee. If all of them cannot,
    what it would take (an int)."""
    child = tx.tx_vsize(1, [change])
    floor = tx.dust_threshold(change, dust_relay_fee)
    picked: list[Coin] = []
    total = need = 0
    for c in sorted(coins, key=lambda c: (-c.value, c.outpoint)):
        picked.append(c)
        total += c.value
        vsize = tx.tx_vsize(len(picked), [payee, change])
        fee = tx.fee_for(vsize, rate)
        need = amount + fee + floor + tx.fee_for(vsize + child, rate)
        if total >= need:
            return picked, fee
    if not picked:
        vsize = tx.tx_vsize(1, [payee, change])
        need = amount + tx.fee_for(vsize, rate) + floor + tx.fee_for(vsize + child, rate)
    return need


def bumped_fee(old_fee: int, vsize: int, *, bump_ppm: int, fees: Fees, max_rate: int) -> int | None:
    """The fee of a BIP125 replacement of ``vsize`` vB: at least ``bump_ppm`` more than
    ``old_fee``, the old fee plus the incremental relay fee for the new size (rules 3 and 4)
    and the market rate, capped at ``max_rate``; None if the cap does not leave enough."""
    floor = old_fee + tx.fee_for(vsize, fees.incremental)
    want = max(floor, old_fee + -(-old_fee * bump_ppm // 1_000_000), tx.fee_for(vsize, fees.rate))
    fee = min(want, tx.fee_for(vsize, max_rate))
    return fee if fee >= floor else None


class BitcoinWallet(Wallet):
    def __init__(self, ctx: WalletContext, client: BitcoinClient, options: BitcoinOptions):
        self.ctx = ctx
        self.cfg = ctx.config
        self.rpc = client.rpc
        self.opts = options
        self.network = options.network
        self.keys = ctx.keys
        assert ctx.keys.hot_address is not None  # the core opens no wallet watch-only
        self.hot: str = ctx.keys.hot_address
        self.native = ctx.config.native
        self.dust_relay_fee = tx.default_dust_relay_fee(self.network)

    # --- helpers ----------------------------------------------------------------------------

    def _show(self, units: int) -> str:
        return f"{format_amount(units, self.native.decimals)} {self.native.symbol}"

    def _script(self, address: str) -> bytes:
        return to_script(self.network, address)

    def _dust(self, address: str) -> int:
        return tx.dust_threshold(self._script(address), self.dust_relay_fee)

    def _secret(self, c: Coin) -> bytes:
        if c.change is not None:
            return self.keys.private_key("hot", 1, c.change)
        return self.keys.private_key_for(c.address)  # the hot address or a deposit address

    def _make(self, coins: Sequence[Coin], outputs: Sequence[tuple[str, int]], *, change: tuple[int, int] | None,
              sender: str, to: str, amount: int, **extra: Any) -> SignedTx:
        """Sign ``coins`` to ``outputs`` (address, value); ``change``: (vout, index) of the
        output that is the wallet's own change."""
        unsigned = tx.build([tx.Coin(c.txid, c.vout, c.value, self._script(c.address)) for c in coins],
                            [tx.Output(self._script(a), v) for a, v in outputs])
        raw = tx.sign(unsigned, [self._secret(c) for c in coins]).hex()
        vsize, fee = unsigned.vsize, unsigned.fee
        details = {
            "inputs": [[c.txid, c.vout, c.value, c.address, c.change] for c in coins],
            "outputs": [[a, v] for a, v in outputs],
            "change": None if change is None else {"vout": change[0], "value": outputs[change[0]][1], "index": change[1]},
            "vsize": vsize, "fee": fee, "fee_rate": fee * 1000 // vsize, **extra}
        return SignedTx(txid=unsigned.txid, raw=raw, sender=sender, to=to, asset=self.native.symbol, amount=amount,
                        fee_limit=fee, conflict=min(c.outpoint for c in coins), details=details)

    @node_data
    async def _fees(self) -> Fees:
        """The rate for a new transaction: ``estimatesmartfee`` (``fee_rate_fallback`` when
        the node has no estimate, as on regtest) within [``fee_rate_min``, ``fee_rate_max``]
        and not below the node's mempool floor (unless that is above the cap)."""
        estimate, pool, net = await self.rpc.batch([("estimatesmartfee", (CONF_TARGET,)), ("getmempoolinfo", ()),
                                                    ("getnetworkinfo", ())])
        feerate = estimate.get("feerate")
        rate = self.opts.fee_rate_fallback if feerate is None else sat_per_kvb(feerate)
        rate = max(rate, self.opts.fee_rate_min, sat_per_kvb(pool["mempoolminfee"]))
        return Fees(rate=min(rate, self.opts.fee_rate_max), incremental=sat_per_kvb(net["incrementalfee"]))

    @node_data
    async def _unspent(self, coins: Sequence[Coin]) -> dict[str, int]:
        """The confirmations of each of ``coins`` the node has unspent (mempool included: an
        output a mempool transaction spends is left out, one it makes has 0); a coinbase
        output counts as unconfirmed until it matures."""
        answers = await self.rpc.batch_outcomes([("gettxout", (c.txid, c.vout, True)) for c in coins])
        found: dict[str, int] = {}
        for c, r in zip(coins, answers, strict=True):
            if isinstance(r, Exception):
                raise r
            if r is None:
                continue
            # (the value is a JSON float: exact to the satoshi below ~67 million coins)
            if r["scriptPubKey"]["hex"] != self._script(c.address).hex() or abs(
                    Decimal(str(r["value"])) * 10**8 - c.value) >= 1:
                log.error("%s: output %s is not what the wallet expected (%s, %s); not spending it", self.cfg.id,
                          c.outpoint, c.address, c.value, extra={"chain": self.cfg.id})
                continue
            confirmations = int(r["confirmations"])
            found[c.outpoint] = 0 if r.get("coinbase") and confirmations < COINBASE_MATURITY else confirmations
        return found

    async def _coins(self, state: WalletState) -> tuple[list[Coin], WalletState]:
        """The hot wallet's spendable coins (confirmed, unspent, spent by nothing of ours in
        flight) and the state with its remembered change brought up to date."""
        flights = self.ctx.in_flight()
        held = reserved(flights)
        groups = {t.conflict: t for t in flights}
        remembered = [self._follow(Coin(txid=c["txid"], vout=int(c["vout"]), value=int(c["value"]),
                                        address=self.keys.address("hot", 1, int(c["change_index"])),
                                        change=int(c["change_index"]), conflict=c.get("conflict") or ""),
                                   groups.get(c.get("conflict") or ""))
                      for c in state.get("coins", ())]
        funding = [Coin(txid=d.txid, vout=d.index, value=d.amount, address=d.address) for d in self.ctx.hot_coins()]
        candidates = list({c.outpoint: c for c in (*funding, *remembered) if c.outpoint not in held}.values())
        found = await self._unspent(candidates)
        spendable = [c for c in candidates if found.get(c.outpoint, 0) >= 1]
        gone = [c for c in remembered if c.outpoint not in held and c.outpoint not in found and c.conflict not in groups]
        keep = [c for c in remembered if c not in gone]
        if gone:
            kept, found_again = await self._settle_gone(gone)
            keep += kept + found_again
            spendable += [c for c in found_again if c.outpoint not in held]
        unique = list({c.outpoint: c for c in keep}.values())
        spendable = list({c.outpoint: c for c in spendable}.values())
        return spendable, {**state, "coins": [c.entry() for c in unique], "next_change": int(state.get("next_change", 0))}

    @staticmethod
    def _follow(c: Coin, newest: StoredTx | None) -> Coin:
        """A remembered change coin whose creator was replaced (BIP125: same change index and
        output, new txid and value) by a transaction still in flight: the replacement's."""
        change = newest.details.get("change") if newest is not None else None
        if newest is None or not change or newest.txid == c.txid or change.get("index") != c.change:
            return c
        return dataclasses.replace(c, txid=newest.txid, vout=int(change["vout"]), value=int(change["value"]))

    @node_data
    async def _settle_gone(self, gone: Sequence[Coin]) -> tuple[list[Coin], list[Coin]]:
        """Remembered change the node no longer has, made by transactions no longer in flight:
        forgotten if its creator is mined (the coin was spent); kept if the creator is still
        with the node (in the mempool, or in a block a reorg took). If the node does not know
        the creator (it was replaced), what its change address holds now is found (confirmed
        coins). Returns (kept, found)."""
        txids = sorted({c.txid for c in gone})
        answers = dict(zip(txids, await self.rpc.batch_outcomes([("getrawtransaction", (t, True)) for t in txids]),
                           strict=True))
        keep: list[Coin] = []
        lost: dict[str, int] = {}
        for c in gone:
            r = answers[c.txid]
            if isinstance(r, RpcError) and r.rpc_code == NO_SUCH_TX:
                if c.change is not None:
                    lost[c.address] = c.change
            elif isinstance(r, Exception):
                raise r
            elif not (r.get("blockhash") and int(r.get("confirmations") or 0) > 0):
                keep.append(c)
        found: list[Coin] = []
        if lost:
            found = await self._scan(lost)
            log.warning("%s: change of replaced transactions found again by a UTXO scan: %s", self.cfg.id,
                        ", ".join(f"{c.outpoint} ({c.value})" for c in found) or "nothing", extra={"chain": self.cfg.id})
        return keep, found

    @node_data
    async def _scan(self, change: Mapping[str, int]) -> list[Coin]:
        """The unspent outputs of change addresses (address -> index), from a scan of the UTXO
        set (seconds on a main network; only after a replacement's change went unrecorded)."""
        result = await self.rpc.call_exact("scantxoutset", "start", [f"addr({a})" for a in change])
        found = []
        for u in result.get("unspents", ()):
            address = from_script(self.network, bytes.fromhex(u["scriptPubKey"]))
            if address is not None and address in change:
                found.append(Coin(txid=u["txid"], vout=int(u["vout"]), value=sats(u["amount"]), address=address,
                                  change=change[address]))
        return found

    async def _test(self, signed: SignedTx) -> str | None:
        """Why the node would refuse ``signed`` now (``testmempoolaccept``), or None."""
        (answer,) = await self.rpc.call("testmempoolaccept", [signed.raw])
        if answer.get("allowed"):
            return None
        return str(answer.get("reject-reason") or "refused")

    async def _known(self, txid: str) -> bool:
        """Is ``txid`` in the node's mempool or in its chain?"""
        try:
            r = await self.rpc.call("getrawtransaction", txid, True)
        except RpcError as e:
            if e.rpc_code == NO_SUCH_TX:
                return False
            raise
        return not r.get("blockhash") or int(r.get("confirmations") or 0) > 0

    def _child_of(self, parent: StoredTx) -> StoredTx | None:
        return next((t for t in self.ctx.in_flight() if t.purpose == "bump"
                     and any(i[0] == parent.txid for i in t.details.get("inputs", ()))), None)

    # --- the contract -------------------------------------------------------------------------

    async def sync(self, state: WalletState) -> WalletState:
        """Check that the node keeps a transaction index, then forget spent change."""
        try:
            indexes = await self.rpc.call("getindexinfo")
        except RpcError as e:
            if e.rpc_code != METHOD_NOT_FOUND:  # before 0.21 the node cannot say
                raise
        else:
            if "txindex" not in indexes:
                raise NodeError(f"{self.cfg.id}: the wallet needs the node's transaction index (-txindex=1) to follow "
                                "its transactions", retryable=False)
            if not indexes["txindex"].get("synced"):
                raise NodeError(f"{self.cfg.id}: the node's transaction index is still being built")
        _, synced = await self._coins(state)
        return synced

    async def pay(self, intent: PayoutIntent, state: WalletState) -> Wait | Fail | Send:
        if intent.asset.contract is not None:
            return Fail(f"the bitcoin family sends only {self.native.symbol}")
        try:
            payee = self._script(intent.to)
        except InvalidAddress as e:
            return Fail(f"not an address of {self.network.name}: {e}")
        dust = tx.dust_threshold(payee, self.dust_relay_fee)
        if intent.amount < dust:
            return Fail(f"{self._show(intent.amount)} is below the dust limit of this address ({self._show(dust)})")
        fees = await self._fees()
        coins, state = await self._coins(state)
        index = int(state["next_change"])
        change_address = self.keys.address("hot", 1, index)
        picked = select(coins, intent.amount, payee, self._script(change_address), fees.rate, self.dust_relay_fee)
        if isinstance(picked, int):
            return Wait(f"hot wallet has {self._show(sum(c.value for c in coins))} spendable (confirmed, not held by a "
                        f"transaction in flight), needs {self._show(picked)} (amount, fee and change)")
        inputs, fee = picked
        change = sum(c.value for c in inputs) - intent.amount - fee
        signed = self._make(inputs, [(intent.to, intent.amount), (change_address, change)], change=(1, index),
                            sender=self.hot, to=intent.to, amount=intent.amount)
        refused = await self._test(signed)
        if refused is not None:
            return Wait(f"the node would refuse it: {refused}")
        made = Coin(txid=signed.txid, vout=1, value=change, address=change_address, change=index,
                    conflict=signed.conflict)
        return Send((signed,), state={**state, "coins": [*state["coins"], made.entry()], "next_change": index + 1})

    async def plan_sweeps(self, candidates: Sequence[SweepCandidate], *, confirmed_block: int,
                          min_amount: Mapping[str, int]) -> list[SweepPlan | Later]:
        """One consolidating sweep of whole addresses, up to ``max_inputs`` outputs worth more
        than their fee (an address with more: its first ``max_inputs``); the addresses left
        out for room come back as :class:`Later`. Outputs not worth their fee are covered by
        the plan and stay (the sweep's dust). An address with a deposit we hold confirmed that
        the node has in no block right now (a reorg on the node our scan has not seen yet)
        comes back as :class:`Later` too, so that its candidate is not dropped."""
        symbol = self.native.symbol
        native = [c for c in candidates if c.asset.contract is None and c.asset.symbol == symbol]
        if not native or self.cfg.sweep.to is None:
            return []
        fees = await self._fees()
        cost = tx.fee_for(tx.P2WPKH_INPUT_VSIZE, fees.rate)  # what spending one output adds
        held = reserved(self.ctx.in_flight())
        outputs = {c.address: [Coin(txid=d.txid, vout=d.index, value=d.amount, address=d.address)
                               for d in c.deposits if d.block_number <= confirmed_block] for c in native}
        ids = {f"{d.txid}:{d.index}": d.transfer_id for c in native for d in c.deposits}
        unspent = await self._unspent([o for os in outputs.values() for o in os if o.outpoint not in held])
        room = self.opts.max_inputs
        taken: list[Coin] = []
        covered: list[str] = []
        addresses: list[str] = []
        later: list[str] = []
        waiting: list[str] = []  # addresses with a deposit the node has in no block now
        for c in native:
            # in a block of the node's chain now (a reorg may have put one back in the mempool)
            live = [o for o in outputs[c.address] if unspent.get(o.outpoint, 0) >= 1]
            # confirmed to us, not in a block of the node's chain now: a reorg under way on the
            # node that our scan has not seen yet (or a deposit about to be orphaned). Not "not
            # worth it": the address comes back next run, or its candidate would be dropped and
            # its deposits never swept (the scan may find the same block again and confirm nothing)
            unseen = any(o.outpoint not in held and unspent.get(o.outpoint, 0) < 1 for o in outputs[c.address])
            if unseen:
                waiting.append(c.address)
            worth = [o for o in live if o.value > cost]
            if not worth:
                continue
            if len(taken) + len(worth) > room:
                if taken:
                    later.append(c.address)
                    continue
                later.append(c.address)  # more than one sweep can take: its first max_inputs now
                worth = worth[:room]
            taken += worth
            addresses.append(c.address)
            covered += [ids[o.outpoint] for o in (*worth, *(o for o in live if o.value <= cost))]
        # an address with unseen deposits stays a candidate, also when planned with what it has
        keep: list[SweepPlan | Later] = [Later(asset=symbol, addresses=tuple(waiting))] if waiting else []
        if not taken:
            return keep
        total = sum(o.value for o in taken)
        fee = tx.fee_for(tx.tx_vsize(len(taken), [self._script(self.cfg.sweep.to)]), fees.rate)
        if total - fee < max(1, min_amount.get(symbol, 0)):
            return keep
        plan: list[SweepPlan | Later] = [SweepPlan(asset=symbol, addresses=tuple(addresses), amount=total,
                                                   deposits=tuple(covered))]
        if later or waiting:
            plan.append(Later(asset=symbol, addresses=tuple(dict.fromkeys([*later, *waiting]))))
        return plan

    async def sweep_step(self, intent: SweepIntent, state: WalletState) -> Wait | Fail | Send | Done:
        mined = next((t for t in reversed(intent.txs) if t.purpose == "sweep" and t.status == "mined"), None)
        if mined is not None:
            return Done(dust=sum(int(o[2]) for o in mined.details.get("left", ())) or None)
        if intent.asset.contract is not None:
            return Fail(f"the bitcoin family sweeps only {self.native.symbol}")
        fees = await self._fees()
        cost = tx.fee_for(tx.P2WPKH_INPUT_VSIZE, fees.rate)
        held = reserved(self.ctx.in_flight())
        outputs = [Coin(txid=d.txid, vout=d.index, value=d.amount, address=d.address) for d in intent.deposits]
        unspent = await self._unspent([o for o in outputs if o.outpoint not in held])
        live = [o for o in outputs if unspent.get(o.outpoint, 0) >= 1]
        gone = [o.outpoint for o in outputs if o not in live]
        if gone:  # a reorg took one since planning: a sweep covers exactly what it spends or leaves
            raise NodeError(f"{self.cfg.id}: deposit output(s) {', '.join(gone[:3])} no longer confirmed and "
                            "unspent at the node; planned again", retryable=False)
        # the largest first: if the rate fell since planning, outputs planned as dust are worth
        # spending now and may not all fit in max_inputs; cut, they are left (and counted as
        # dust, as planned), never the outputs the plan meant to spend, nor dropped silently
        worth = sorted((o for o in live if o.value > cost), key=lambda o: (-o.value, o.outpoint))
        spend = worth[:self.opts.max_inputs]
        left = [o for o in live if o not in spend]
        if not spend:
            return Fail("none of its deposit outputs is unspent and worth the fee of spending it")
        total = sum(o.value for o in spend)
        fee = tx.fee_for(tx.tx_vsize(len(spend), [self._script(intent.to)]), fees.rate)
        amount = total - fee
        floor = max(self._dust(intent.to), self.cfg.sweep.min_amount.get(intent.asset.symbol, 0))
        if amount < floor:
            return Fail(f"{self._show(total)} less the fee {self._show(fee)} is below min_amount or dust")
        senders = {o.address for o in spend}
        signed = self._make(spend, [(intent.to, amount)], change=None, sender=senders.pop() if len(senders) == 1 else "",
                            to=intent.to, amount=amount,
                            left=[[o.txid, o.vout, o.value, o.address, None] for o in left])
        refused = await self._test(signed)
        if refused is not None:
            if refusal(refused) == "transient":
                return Wait(f"the node would refuse it for now: {refused}")
            return Fail(f"the node would refuse it: {refused}")
        return Send((signed,), phase="transfer", amount=amount)

    @node_data
    async def statuses(self, txs: Sequence[StoredTx]) -> dict[str, TxStatus]:
        """``getrawtransaction <txid> true`` for all (one batch; needs -txindex), then
        ``getblockheader`` of the blocks they are in (a second): mined only in a block of the
        node's main chain; pending in the mempool; unknown otherwise."""
        answers = await self.rpc.batch_outcomes([("getrawtransaction", (t.txid, True)) for t in txs])
        out: dict[str, TxStatus] = {}
        mined: dict[str, tuple[StoredTx, str]] = {}
        for t, r in zip(txs, answers, strict=True):
            if isinstance(r, RpcError) and r.rpc_code == NO_SUCH_TX:
                continue
            if isinstance(r, Exception):
                raise r
            if not r.get("blockhash"):
                out[t.txid] = TxStatus(txid=t.txid, state="pending")
            elif int(r.get("confirmations") or 0) > 0:
                mined[t.txid] = (t, r["blockhash"])
            # else: in a block a reorg took, and not back in the mempool: unknown
        hashes = sorted({h for _, h in mined.values()})
        headers = dict(zip(hashes, await self.rpc.batch([("getblockheader", (h,)) for h in hashes]), strict=True))
        for txid, (t, h) in mined.items():
            header = headers[h]
            if int(header.get("confirmations", -1)) < 1:
                continue  # the block left the main chain between the two requests
            out[txid] = TxStatus(txid=txid, state="mined", success=True, block_number=int(header["height"]),
                                 block_hash=h, fee_paid=int(t.details["fee"]))
        return out

    async def broadcast(self, signed: SignedTx) -> None:
        """``sendrawtransaction``. Bytes the node has in its mempool or chain succeed quietly;
        "missing inputs" is success if the node knows this transaction (mined, its outputs
        spent since), else permanent; fee floors and a replacement paying too little are
        transient; every other policy or consensus refusal is permanent."""
        try:
            await self.rpc.broadcast("sendrawtransaction", signed.raw)
        except RpcError as e:
            kind = refusal(e.message)
            if kind == "known" or e.rpc_code == ALREADY_IN_CHAIN:
                return
            if kind == "missing":
                if await self._known(signed.txid):
                    return
                raise BroadcastRejected(e.message, permanent=True) from None
            if e.rpc_code in (VERIFY_REJECTED, VERIFY_ERROR, DESERIALIZATION_ERROR):
                raise BroadcastRejected(e.message, permanent=kind == "permanent") from None
            raise  # the node did not say (busy, warming up): outcome unknown

    async def replace(self, txs: Sequence[StoredTx], *, bump_ppm: int, state: WalletState) -> SignedTx | Child | Wait:
        live = [t for t in txs if t.status == "open"]
        if not live:
            return Wait("nothing of the group is in flight")
        current = live[-1]
        refused = any(t.status == "failed" and t.block_number is None for t in txs)
        if current.purpose == "sweep":
            if self.opts.fee_bump != "rbf" or refused:
                return Wait("a sweep has no change to pull it along and the node takes no replacement: it waits to "
                            "be mined")
            bumped = await self._rbf(current, bump_ppm)
            return Wait("the node takes no replacement: the sweep waits to be mined") if bumped is None else bumped
        if self._child_of(current) is not None:
            return Wait("a child paying for it is already in flight")
        if self.opts.fee_bump == "rbf" and not refused:
            bumped = await self._rbf(current, bump_ppm)
            if bumped is not None:
                return bumped
        return await self._cpfp(current, bump_ppm, state)

    async def _rbf(self, current: StoredTx, bump_ppm: int) -> SignedTx | Wait | None:
        """A BIP125 replacement of ``current``: the same inputs and outputs, the change (a
        sweep: its one output) paying the higher fee; None if the node takes no replacements."""
        d = current.details
        fees = await self._fees()
        fee = bumped_fee(int(d["fee"]), int(d["vsize"]), bump_ppm=bump_ppm, fees=fees, max_rate=self.opts.fee_rate_max)
        if fee is None:
            return Wait(f"fees are at the cap (fee_rate_max {format_amount(self.opts.fee_rate_max, 3)} sat/vB)")
        change = d.get("change")
        k = int(change["vout"]) if change else 0
        outputs = [(str(a), int(v)) for a, v in d["outputs"]]
        address, value = outputs[k]
        value -= fee - int(d["fee"])
        if value < self._dust(address):
            return Wait(f"{'the change' if change else 'the amount'} cannot pay a higher fee")
        outputs[k] = (address, value)
        signed = self._make(coins_spent(d), outputs, change=None if not change else (k, int(change["index"])),
                            sender=current.sender, to=current.to, amount=current.amount if change else value,
                            **({"left": d["left"]} if "left" in d else {}))  # a sweep's outputs left behind
        refused = await self._test(signed)
        if refused is None:
            return signed
        if "txn-mempool-conflict" in refused:
            return None
        return Wait(f"the node would refuse the replacement: {refused}")

    async def _cpfp(self, parent: StoredTx, bump_ppm: int, state: WalletState) -> Child | Wait:
        """A child spending ``parent``'s change (and a confirmed coin if that is not enough)
        to a new change address, with a fee that lifts parent and child to the parent's rate
        plus ``bump_ppm`` (at least the market rate, at most ``fee_rate_max``)."""
        d = parent.details
        change = d.get("change")
        if not change:
            return Wait("it has no output of ours to pull it along (CPFP)")
        spend = Coin(txid=parent.txid, vout=int(change["vout"]), value=int(change["value"]),
                     address=self.keys.address("hot", 1, int(change["index"])), change=int(change["index"]),
                     conflict=parent.conflict)
        if spend.outpoint not in await self._unspent([spend]):
            return Wait("its change is spent, or the node does not have it")
        fees = await self._fees()
        p_vsize, p_fee = int(d["vsize"]), int(d["fee"])
        p_rate = p_fee * 1000 // p_vsize
        target = min(max(-(-p_rate * (1_000_000 + bump_ppm) // 1_000_000), fees.rate), self.opts.fee_rate_max)
        if target <= p_rate:
            return Wait(f"fees are at the cap (fee_rate_max {format_amount(self.opts.fee_rate_max, 3)} sat/vB)")
        others, state = await self._coins(state)
        # the parent may have been mined since its status was read: its change is then a
        # confirmed coin too, and must not be added a second time
        others = sorted((c for c in others if c.outpoint != spend.outpoint), key=lambda c: (-c.value, c.outpoint))
        index = int(state["next_change"])
        to = self.keys.address("hot", 1, index)
        floor = self._dust(to)
        coins = [spend]
        while True:
            vsize = tx.tx_vsize(len(coins), [self._script(to)])
            fee = tx.fee_for(p_vsize + vsize, target) - p_fee
            value = sum(c.value for c in coins) - fee
            if value >= floor:
                break
            if not others:
                return Wait("its change cannot pay for a child and no other confirmed coin is free")
            coins.append(others.pop(0))
        child = self._make(coins, [(to, value)], change=(0, index), sender=self.hot, to=to, amount=0,
                           parent=parent.txid, package_rate=target)
        refused = await self._test(child)
        if refused is not None:
            return Wait(f"the node would refuse a child: {refused}")
        made = Coin(txid=child.txid, vout=0, value=value, address=to, change=index, conflict=child.conflict)
        return Child(child, state={**state, "coins": [*state["coins"], made.entry()], "next_change": index + 1})

    async def balance(self, asset: AssetConfig, state: WalletState) -> int | None:
        """The hot wallet's coins the node has unspent, the mempool's view included (change
        of a payout not mined yet counts, coins it spends do not): one ``gettxout`` batch."""
        coins = [Coin(txid=d.txid, vout=d.index, value=d.amount, address=d.address) for d in self.ctx.hot_coins()]
        coins += [Coin(txid=c["txid"], vout=int(c["vout"]), value=int(c["value"]),
                       address=self.keys.address("hot", 1, int(c["change_index"])), change=int(c["change_index"]))
                  for c in state.get("coins", ())]
        unique = list({c.outpoint: c for c in coins}.values())
        found = await self._unspent(unique) if unique else {}
        return sum(c.value for c in unique if c.outpoint in found)

    async def release(self, tx: StoredTx, state: WalletState) -> Release:
        """Nothing is held but the change the refused transaction would have made: it is
        forgotten (its inputs are free again once it is no longer in flight)."""
        coins = list(state.get("coins", ()))
        keep = [c for c in coins if c["txid"] != tx.txid and (c.get("conflict") or "") != tx.conflict]
        if len(keep) == len(coins):
            return Release()
        return Release(state={**state, "coins": keep}, note=f"the change {tx.txid} would have made is forgotten")
