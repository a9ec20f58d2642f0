"""The sending half of the chain contract: a family's wallet.

The core says *what* should happen (pay this amount of this asset to this address from the
hot wallet; sweep these confirmed deposits to the treasury); the family's :class:`Wallet`
decides *how* on its chain: which transactions, from which keys, with which fees, nonces,
inputs, change or gas top-ups; it signs them, broadcasts them, reports their status and
replaces a stuck one with a higher fee.

The core keeps what is the same on every chain: the durable life of each transaction
(planned, signed and stored, broadcast, mined, final; reopened and sent again by a reorg),
idempotency keys, limits, payout checks, approval, the kill switch, the finality guard,
events and audit. What a family needs to remember about a transaction it made is
``SignedTx.details`` (a JSON object the core stores and hands back untouched), and what it
needs to remember across transactions is its :data:`WalletState`.

Every answer that sends something is stored (transactions and the new wallet state in one
SQLite transaction) *before* anything is broadcast, so a crash at any moment leads to the
same stored bytes being sent again, never to a second transfer. One task per chain drives
the wallet: calls never overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ..config import AssetConfig, ChainConfig
    from .family import ChainKeys
    from .scan import ChainClient

WalletState = dict[str, Any]
"""What a wallet remembers between transactions (e.g. the hot wallet's next nonce), as a
JSON object. The core stores it per chain and hands it back on every call; a wallet never
changes it in place but returns a new one with the transactions it belongs to."""

Purpose = Literal["payout", "sweep", "topup", "filler", "bump"]
"""What a stored transaction is for: a payout; a sweep's transfer; a ``topup`` that funds a
deposit address so that its sweep can pay its own fee (gas on EVM, energy on Tron, rent on
Solana); a ``filler`` that takes the place of a refused transaction whose slot later
transactions depend on (an EVM nonce); a ``bump``: a child that spends a stuck transaction's
own output with a fee high enough for both (CPFP, on UTXO chains), see :class:`Child`."""


@dataclass(frozen=True, slots=True)
class SignedTx:
    """A transaction ready for broadcast, as a wallet made it."""

    txid: str
    raw: str  # what broadcast sends (hex)
    sender: str  # canonical address that signs and pays the fee ("" if several)
    to: str  # canonical destination ("" if several)
    asset: str  # symbol of the asset moved
    amount: int  # base units of ``asset`` moved to ``to``
    fee_limit: int  # the most it can cost in fees, base units of the native coin
    conflict: str  # transactions that share it exclude each other: at most one is mined
    details: Mapping[str, Any] = field(default_factory=dict)  # the family's own facts (JSON)


TxState = Literal["open", "mined", "failed", "replaced"]


@dataclass(frozen=True, slots=True)
class StoredTx:
    """A transaction as the core keeps it: what the wallet signed, plus where it stands.

    ``status``: ``open`` (not mined, or mined less deep than the core has checked),
    ``mined``, ``failed`` (mined but reverted, or refused by the node for good: then
    ``block_number`` is None), ``replaced`` (another transaction of its conflict group
    was mined)."""

    id: int
    chain: str
    purpose: Purpose
    ref_id: str  # the payout or sweep it serves
    txid: str
    raw: str
    sender: str
    to: str
    asset: str
    amount: int
    fee_limit: int
    conflict: str
    details: Mapping[str, Any]
    status: TxState
    block_number: int | None
    fee_paid: int | None
    error: str | None
    created_at: int  # ms
    broadcast_at: int | None  # ms, first accepted broadcast

    def signed(self) -> SignedTx:
        return SignedTx(txid=self.txid, raw=self.raw, sender=self.sender, to=self.to, asset=self.asset,
                        amount=self.amount, fee_limit=self.fee_limit, conflict=self.conflict, details=self.details)


@dataclass(frozen=True, slots=True)
class TxStatus:
    """Where a transaction we sent stands, as the node sees it."""

    txid: str
    state: Literal["unknown", "pending", "mined"]
    success: bool = False
    block_number: int | None = None
    block_hash: str | None = None
    fee_paid: int | None = None  # base units of the native coin
    error: str | None = None  # revert reason when not successful


class BroadcastRejected(Exception):
    """The node refused a transaction. ``permanent`` means sending the same bytes again
    cannot help (invalid signature, a slot another transaction already took...); a
    transient refusal (fee below what the node accepts right now) is tried again later."""

    def __init__(self, message: str, *, permanent: bool):
        super().__init__(message)
        self.message = message
        self.permanent = permanent


# --- what the core asks -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PayoutIntent:
    """Pay ``amount`` of ``asset`` to ``to`` from the hot wallet."""

    id: str
    asset: AssetConfig
    amount: int
    to: str


@dataclass(frozen=True, slots=True)
class Deposit:
    """A confirmed transfer to one of our deposit addresses, not yet covered by a sweep."""

    transfer_id: str
    address: str
    txid: str
    index: int
    amount: int
    block_number: int


@dataclass(frozen=True, slots=True)
class SweepCandidate:
    """An (address, asset) that received confirmed deposits since it was last swept."""

    address: str
    asset: AssetConfig
    deposits: tuple[Deposit, ...]


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """One sweep a wallet wants: move ``amount`` of ``asset`` from ``addresses`` to the
    treasury, covering ``deposits`` (transfer ids). An account family plans one per
    address; a UTXO family one consolidating transaction of many inputs."""

    asset: str
    addresses: tuple[str, ...]
    amount: int
    deposits: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SweepIntent:
    """A planned sweep and every transaction it has sent so far (oldest first)."""

    id: str
    asset: AssetConfig
    addresses: tuple[str, ...]
    to: str
    amount: int
    deposits: tuple[Deposit, ...]
    txs: tuple[StoredTx, ...]


# --- what a wallet answers ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing can be sent now; ``reason`` is shown on the payout or sweep (e.g. the hot
    wallet's balance is short). Asked again at the next round."""

    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    """This payout or sweep can never be carried out as asked; ``reason`` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class Send:
    """Store these transactions (and the new wallet state) in one SQLite transaction, then
    broadcast them in order. ``phase`` (sweeps): ``funding`` sends top-ups the sweep waits
    for (``funding_confirmations`` deep), ``transfer`` moves the money. ``amount``: what the
    sweep moves when it differs from the plan (a native-coin sweep pays its fee out of it)."""

    txs: tuple[SignedTx, ...]
    state: WalletState | None = None
    phase: Literal["funding", "transfer"] = "transfer"
    amount: int | None = None


@dataclass(frozen=True, slots=True)
class Done:
    """The sweep is complete; ``dust`` is native coin that stayed at its address(es)."""

    dust: int | None = None


@dataclass(frozen=True, slots=True)
class Child:
    """The answer of :meth:`Wallet.replace` when the stuck transaction is not replaced but
    pulled along (CPFP: child pays for parent): ``tx`` spends one of the stuck transaction's
    outputs and pays a fee that lifts both. It is in its own conflict group (it excludes
    nothing of the parent's), stored with purpose ``bump`` for the same payout or sweep,
    broadcast, and then followed like a filler until it is final; the parent's group stays
    as it is and is followed as before. ``state``: the wallet state it uses, if any."""

    tx: SignedTx
    state: WalletState | None = None


@dataclass(frozen=True, slots=True)
class Later:
    """Part of the answer of :meth:`Wallet.plan_sweeps`: candidates worth sweeping that this
    run has no room for (a UTXO family's ``max_inputs``). They stay candidates and the next
    round plans again, so more runs sweep more."""

    asset: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Release:
    """What a refused transaction's slot needs: a new wallet ``state`` (e.g. the nonce given
    back because nothing later took it), and/or a ``filler`` transaction that takes the slot
    so that later transactions can go (a zero-value self-transfer at that nonce)."""

    state: WalletState | None = None
    filler: SignedTx | None = None
    note: str = ""  # what happened, for logs and the wallet.gap_filled event


@dataclass
class WalletContext:
    """What the core gives a family when it opens a wallet for one configured chain."""

    config: ChainConfig
    client: ChainClient  # this chain's client (the family's own class), opened and checked
    keys: ChainKeys
    in_flight: Callable[[], Sequence[StoredTx]]  # the chain's open transactions, newest per conflict group
    # transfers in a block to the hot wallet's own address (a UTXO family's coins; for a spec
    # with ``watches_hot_wallet``, whose hot address the core watches), as Deposits
    hot_coins: Callable[[], Sequence[Deposit]] = lambda: ()


class Wallet:
    """Sends from one chain's keys. Every method may raise :class:`watcher.errors.NodeError`
    (the core retries the round with backoff); a non-retryable one from ``sweep_step``
    fails that sweep (the node refuses it for good)."""

    async def sync(self, state: WalletState) -> WalletState:
        """Called once when the chain's sender starts: bring the remembered state in line
        with the node (EVM: next nonce = the larger of ours and the node's pending count)."""
        return state

    async def pay(self, intent: PayoutIntent, state: WalletState) -> Wait | Fail | Send:
        """Plan and sign a payout from the hot wallet."""
        raise NotImplementedError

    async def plan_sweeps(self, candidates: Sequence[SweepCandidate], *, confirmed_block: int,
                          min_amount: Mapping[str, int]) -> list[SweepPlan | Later]:
        """Which sweeps to make of these candidates (none of their addresses has a sweep in
        progress). ``confirmed_block``: only what is that deep may be swept. ``min_amount``
        per asset symbol: smaller sweeps are not worth their fee. Candidates no plan covers
        are forgotten until their next confirmed deposit, unless a :class:`Later` names
        them."""
        raise NotImplementedError

    async def sweep_step(self, intent: SweepIntent, state: WalletState) -> Wait | Fail | Send | Done:
        """The next step of a sweep. Called when none of its transactions is in flight:
        each earlier step's transactions are mined deep enough (and did not revert)."""
        raise NotImplementedError

    async def statuses(self, txs: Sequence[StoredTx]) -> dict[str, TxStatus]:
        """The status of each transaction (by txid), asked of the node in as few requests as
        the family can (one batch)."""
        raise NotImplementedError

    async def broadcast(self, tx: SignedTx) -> None:
        """Send a signed transaction. Sending one the node already has, or that is already
        mined, succeeds quietly; a refusal raises :class:`BroadcastRejected`."""
        raise NotImplementedError

    async def replace(self, txs: Sequence[StoredTx], *, bump_ppm: int, state: WalletState) -> SignedTx | Child | Wait:
        """The newest of ``txs`` (one conflict group: the original and earlier
        replacements) has waited too long: sign a replacement in the same group paying at
        least ``bump_ppm`` parts per million more, or a :class:`Child` that pulls it along
        (CPFP; e.g. when the node says it would refuse a replacement). :class:`Wait` when it
        must not be bumped now (fees at the configured cap, not enough balance to pay more, a
        child already in flight)."""
        raise NotImplementedError

    async def balance(self, asset: AssetConfig, state: WalletState) -> int | None:
        """What the hot wallet holds of ``asset`` (for metrics), or None to have the core ask
        the client for the hot address's balance (an account chain). A UTXO wallet answers
        from its own coins: a scan of the node's UTXO set every 30 s would be too dear."""
        return None

    async def release(self, tx: StoredTx, state: WalletState) -> Release:
        """The node refused ``tx`` for good (``BroadcastRejected(permanent=True)``) and no
        other transaction of its group is in flight: free what it held."""
        return Release()
