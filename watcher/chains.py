"""The contract between the core and chain plugins.

A plugin provides :class:`ChainFamily` objects (through the ``watcher_chain_families`` hook).
A family checks config and addresses and derives addresses from public keys; for each
configured chain it opens a :class:`ChainClient`, which answers questions about that chain.
Neither ever touches the store: the core decides what is watched, what is credited and when.

Transfer indexes: a transfer is identified by ``(chain, txid, index)``. Families choose the
index scheme for their chain and must keep it stable; the EVM family uses the log index
(>= 0) for token transfers, -1 for the value of the transaction itself and -(2 + n) for the
n-th internal value transfer found by tracing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry  # noqa: F401

    from .config import AssetConfig, ChainConfig, ConfigTable
    from .jsonrpc import JsonRpc

AddressFilter = Callable[[Iterable[str]], set[str]]
"""Given canonical addresses, return the subset watched on this chain. Cheap, synchronous,
safe to call with thousands of addresses at once (the core answers it from an index)."""

TransferKind = Literal["native", "token", "internal"]


@dataclass(frozen=True, slots=True)
class Transfer:
    """A value movement to a watched address, as found on chain."""

    txid: str
    index: int
    kind: TransferKind
    asset: str  # the asset's symbol in this chain's config
    to: str  # canonical address
    sender: str  # canonical address ("" if the chain has no single sender)
    amount: int  # base units, > 0


@dataclass(frozen=True, slots=True)
class Block:
    """One block of the canonical chain as the node sees it, with the transfers in it that
    pay watched addresses."""

    number: int
    hash: str
    parent_hash: str
    timestamp: int
    transfers: tuple[Transfer, ...] = ()


@dataclass(frozen=True, slots=True)
class TxLookup:
    """Where a transaction stands, as answered by :meth:`ChainClient.lookup_tx`."""

    txid: str
    status: Literal["unknown", "pending", "failed", "included"]
    block: Block | None = None  # for "included": the block, carrying the transfers of this tx


@dataclass(frozen=True, slots=True)
class FeeQuote:
    """What to pay per unit of gas. EIP-1559 chains set ``priority_fee``; legacy ones leave it
    None and ``max_fee`` is the gas price."""

    max_fee: int
    priority_fee: int | None = None

    def bumped(self, ppm: int, floor: FeeQuote | None = None) -> FeeQuote:
        """At least ``ppm`` parts per million more than self on every field (what a node asks
        of a replacement), and never below ``floor`` (the current market)."""

        def up(x: int) -> int:
            return x + max(1, -(-x * ppm // 1_000_000))

        max_fee = up(self.max_fee)
        prio = None if self.priority_fee is None else up(self.priority_fee)
        if floor is not None:
            max_fee = max(max_fee, floor.max_fee)
            if prio is not None and floor.priority_fee is not None:
                prio = max(prio, floor.priority_fee)
        if prio is not None:
            prio = min(prio, max_fee)
        return FeeQuote(max_fee=max_fee, priority_fee=prio)


@dataclass(frozen=True, slots=True)
class SignedTx:
    raw: str  # hex, ready for broadcast
    txid: str
    nonce: int
    gas_limit: int
    fees: FeeQuote

    @property
    def max_cost(self) -> int:
        """The most this transaction can cost in fees (base units of the native coin)."""
        return self.gas_limit * self.fees.max_fee


@dataclass(frozen=True, slots=True)
class TxStatus:
    """Where a transaction we sent stands."""

    txid: str
    state: Literal["unknown", "pending", "mined"]
    success: bool = False
    block_number: int | None = None
    block_hash: str | None = None
    fee_paid: int | None = None  # gas used x effective price, base units of the native coin
    error: str | None = None  # revert reason when not successful


class BroadcastRejected(Exception):
    """The node refused a transaction. ``permanent`` means sending the same bytes again
    cannot help (invalid signature, insufficient funds for this exact transaction...)."""

    def __init__(self, message: str, *, permanent: bool):
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@dataclass
class ChainContext:
    """What the core gives a family when it opens a client for one configured chain."""

    config: ChainConfig
    jsonrpc: Callable[..., JsonRpc]  # jsonrpc(concurrency=, max_batch=): a transport to config.rpc_url
    extra: dict[str, Any] = field(default_factory=dict)


class ChainClient:
    """Talks to one chain's node. Every method may raise :class:`watcher.errors.NodeError`
    (the core retries with backoff) or :class:`watcher.errors.InconsistentData` (the node
    changed its mind mid-request; the core asks again)."""

    async def __aenter__(self) -> ChainClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release connections."""

    async def check(self) -> dict[str, Any]:
        """Called when the chain starts: verify the node serves the configured chain (raise
        :class:`watcher.errors.ChainMismatch` if not) and return facts for logs and
        ``/v1/chains`` (e.g. ``{"chain_id": 1}``)."""
        return {}

    async def head(self) -> int:
        """The number of the newest block the node has."""
        raise NotImplementedError

    async def block_hashes(self, numbers: list[int]) -> dict[int, tuple[str, str]]:
        """``{number: (hash, parent_hash)}`` for each number the node has; missing numbers
        are left out. Used to find the common ancestor after a reorg."""
        raise NotImplementedError

    async def fetch_blocks(self, start: int, end: int, watched: AddressFilter) -> list[Block]:
        """Blocks ``start..end`` (inclusive), in order, each with the transfers to addresses
        for which ``watched`` says yes. Failed transactions are never reported. May return
        fewer blocks than asked (a prefix) if the node does not have them all yet."""
        raise NotImplementedError

    async def lookup_tx(self, txid: str, watched: AddressFilter) -> TxLookup:
        """Find one transaction (for ``submit-tx``): is it unknown, pending, failed or
        included, and if included, in which block and with which watched transfers."""
        raise NotImplementedError

    # --- sending (sweeps and payouts) ---------------------------------------------------

    async def fee_quote(self) -> FeeQuote:
        """What a transaction should pay per gas to be included soon."""
        raise NotImplementedError

    async def nonce(self, address: str, *, pending: bool = True) -> int:
        """The account's next nonce, counting mempool transactions if ``pending``."""
        raise NotImplementedError

    async def balance(self, address: str, asset: AssetConfig, block: int | None = None) -> int:
        """Balance in base units, at ``block`` (None: the latest block)."""
        raise NotImplementedError

    async def estimate_gas(self, sender: str, to: str, asset: AssetConfig, amount: int) -> int:
        """Gas a transfer of ``amount`` of ``asset`` from ``sender`` to ``to`` needs."""
        raise NotImplementedError

    async def broadcast(self, tx: SignedTx) -> None:
        """Send a signed transaction. Sending one the node already has, or that is already
        mined, succeeds quietly; a refusal raises :class:`BroadcastRejected`."""
        raise NotImplementedError

    async def tx_status(self, txid: str) -> TxStatus:
        """Whether a transaction is unknown, pending or mined (and how it went)."""
        raise NotImplementedError


class ChainFamily:
    """A kind of chain (``evm``, later ``tron``, ``bitcoin``). One instance serves every
    configured chain of its kind."""

    name: ClassVar[str]
    bip44_coin: ClassVar[int]  # SLIP-44 coin type used for m/44'/coin'/account'/0/index
    native_decimals: ClassVar[int] = 18
    default_native_symbol: ClassVar[str] = "ETH"
    default_confirmations: ClassVar[int] = 12
    default_finality_depth: ClassVar[int] = 64

    def parse_options(self, table: ConfigTable) -> Any:
        """Take this family's own per-chain keys from ``table`` (``table.take(...)``) and
        return them in any form; the core stores it as ``ChainConfig.options``. Raise
        :class:`watcher.errors.ConfigError` (with ``table.key(name)``) on bad values. Keys
        not taken here or by the core are reported as unknown."""
        return None

    def validate_address(self, text: str) -> str:
        """Return the canonical form of an address of this family (what the store keeps and
        what the client reports), or raise :class:`watcher.errors.InvalidAddress`."""
        raise NotImplementedError

    def validate_txid(self, text: object) -> str:
        """The canonical form of a transaction id, or raise :class:`watcher.errors.BadRequest`."""
        from .errors import BadRequest

        if not isinstance(text, str) or not 1 <= len(text) <= 128 or not text.isprintable():
            raise BadRequest("txid must be a transaction id", code="invalid_txid")
        return text

    def display_address(self, canonical: str) -> str:
        """How an address is shown to people and apps (e.g. EIP-55 checksum case)."""
        return canonical

    def address_from_public_key(self, public_key: bytes) -> str:
        """Canonical address for a 33-byte compressed secp256k1 public key."""
        raise NotImplementedError

    def payment_uri(self, config: ChainConfig, address: str, asset: str, amount: int,
                    node_info: dict[str, Any]) -> str | None:
        """A wallet link for paying ``amount`` of ``asset`` to ``address`` (EIP-681 for EVM);
        ``node_info`` is what the client's ``check()`` returned (e.g. the chain id)."""
        return None

    def sign_transfer(self, private_key: bytes, *, node_info: dict[str, Any], to: str, asset: AssetConfig,
                      amount: int, nonce: int, gas_limit: int, fees: FeeQuote) -> SignedTx:
        """Build and sign a transfer of ``amount`` base units of ``asset`` to ``to``."""
        raise NotImplementedError

    def open_client(self, ctx: ChainContext) -> ChainClient:
        """A client for one configured chain; the core enters it as an async context."""
        raise NotImplementedError
