"""Chain families and what they tell the core about each configured chain.

A plugin provides :class:`ChainFamily` objects (through the ``watcher_chain_families``
hook). For every ``[[chains]]`` entry of its kind, the family reads its own keys
(``configure``) and returns a :class:`ChainSpec`: the chain's address format, its key scheme,
defaults, and the factories of its :class:`~watcher.chains.scan.ChainClient` (reading) and
:class:`~watcher.chains.wallet.Wallet` (sending).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from ..config import AssetConfig, ChainConfig, ConfigTable
    from ..nodes import NodePool
    from .scan import ChainClient
    from .wallet import StoredTx, Wallet, WalletContext

Account = Literal["deposit", "hot"]


@dataclass(frozen=True, slots=True)
class KeyScheme:
    """Where a chain's keys live in the BIP32 tree of the seed.

    Deposit addresses are ``m/purpose'/coin'/deposit_account'/0/index``; the hot wallet
    (payouts, gas top-ups) is ``m/purpose'/coin'/hot_account'/0/0``, and its change, for
    families that make change, ``.../hot_account'/1/i``. A label's index is allocated once
    per deposit account (purpose and coin type): chains that share an account share the
    label's index, hence its address (every EVM chain; BTC and LTC test networks, which
    share coin type 1)."""

    purpose: int  # BIP43 purpose: 44 (BIP44), 49, 84 (native SegWit), 86 (Taproot)
    coin_type: int  # SLIP-44 coin type (60 ETH, 0 BTC, 2 LTC, 1 every test network)
    deposit_account: int = 0
    hot_account: int = 1
    change: bool = False  # the hot wallet makes change to .../1/i

    def account_path(self, account: Account) -> str:
        number = self.deposit_account if account == "deposit" else self.hot_account
        return f"m/{self.purpose}'/{self.coin_type}'/{number}'"

    @property
    def deposit_path(self) -> str:
        return self.account_path("deposit")

    @property
    def hot_path(self) -> str:
        return self.account_path("hot")


class ChainKeys:
    """One chain's keys as a wallet sees them (the core implements it over the seed and the
    watched addresses): public derivation always, private keys unless watch-only."""

    scheme: KeyScheme
    hot_address: str | None  # None when watch-only

    def address(self, account: Account, change: int, index: int) -> str:
        """The canonical address at ``account/change/index``."""
        raise NotImplementedError

    def public_key(self, account: Account, change: int, index: int) -> bytes:
        """33-byte compressed secp256k1 public key at ``account/change/index``."""
        raise NotImplementedError

    def private_key(self, account: Account, change: int, index: int) -> bytes:
        """32-byte private key; raises :class:`watcher.errors.WatchOnlyError` without a seed."""
        raise NotImplementedError

    def private_key_for(self, address: str) -> bytes:
        """The private key of one of our addresses: a derived deposit address or the hot
        wallet. Raises :class:`watcher.errors.KeyMaterialError` for any other."""
        raise NotImplementedError


@dataclass
class ChainContext:
    """What the core gives a family when it opens a client for one configured chain."""

    config: ChainConfig
    # jsonrpc(concurrency=, max_batch=, final_codes=, credentials=, head_call=, unhex=, lean_http=): the transport to
    # the chain's nodes (a NodePool: used like one JsonRpc; head_call is how it asks a node for
    # its head, e.g. ("eth_blockNumber", ())); credentials(node) gives, per NodeConfig, where
    # that node's HTTP basic-auth credentials are read from (or None); unhex(text) how hex
    # results (batch_hex) become bytes, binascii.unhexlify unless the family has a faster one;
    # lean_http: http:// nodes through watcher.wire instead of httpx (large answers)
    jsonrpc: Callable[..., NodePool]


class ChainSpec:
    """Everything about one configured chain that depends on its family: made by
    :meth:`ChainFamily.configure`, kept as ``ChainConfig.spec``."""

    family: str
    keys: KeyScheme
    native_symbol: str = "ETH"  # defaults for the chain's core keys
    native_decimals: int = 18
    confirmations: int = 12
    finality_depth: int = 64

    def validate_address(self, text: str) -> str:
        """The canonical form of an address (what the store keeps and the client reports),
        or raise :class:`watcher.errors.InvalidAddress`."""
        raise NotImplementedError

    def display_address(self, canonical: str) -> str:
        """How an address is shown to people and apps (e.g. EIP-55 checksum case)."""
        return canonical

    def is_burn_address(self, canonical: str) -> bool:
        """An address nobody can spend from (the zero address, an all-zero hash): payouts
        to it are refused."""
        return False

    def validate_txid(self, text: object) -> str:
        """The canonical form of a transaction id, or raise :class:`watcher.errors.BadRequest`."""
        from ..errors import BadRequest

        if not isinstance(text, str) or not 1 <= len(text) <= 128 or not text.isprintable():
            raise BadRequest("txid must be a transaction id", code="invalid_txid")
        return text

    def address_from_public_key(self, public_key: bytes) -> str:
        """The canonical deposit address of a 33-byte compressed secp256k1 public key."""
        raise NotImplementedError

    def payment_uri(self, config: ChainConfig, address: str, asset: AssetConfig, amount: int,
                    node_info: Mapping[str, Any]) -> str | None:
        """A wallet link for paying ``amount`` of ``asset`` to ``address`` (EIP-681, BIP21);
        ``node_info`` is what the client's ``check()`` returned (e.g. the chain id)."""
        return None

    #: False for a family that only reads (no wallet yet): payouts and sweeps are refused
    sends: ClassVar[bool] = True
    # the family's client can be pushed new heads (ChainClient.subscribe_heads; a node's ws_url)
    push: ClassVar[bool] = False

    #: True when the wallet finds its coins among transfers to the hot wallet's address (a
    #: UTXO family): the core watches that address (kind ``hot``: not swept, not an invoice)
    #: and hands the wallet its confirmed transfers (``WalletContext.hot_coins``)
    watches_hot_wallet: ClassVar[bool] = False

    #: True when the client looks watched addresses up by :meth:`match_key` instead of by the
    #: canonical address (the ``AddressFilter`` it is given then takes match keys)
    matches_by_key: ClassVar[bool] = False

    def match_key(self, address: str) -> bytes:
        """What the client finds in a block without encoding an address, for a family with
        ``matches_by_key`` (a UTXO family: the output script). The store keeps its hex with
        each watched address and indexes it; the ``AddressFilter`` takes and gives the bytes."""
        return address.encode()

    #: JSON schemas of the fields ``tx_fields`` and ``payout_fields`` add (for /openapi.json)
    tx_schema: ClassVar[dict[str, Any]] = {}
    payout_schema: ClassVar[dict[str, Any]] = {}

    def tx_fields(self, details: Mapping[str, Any]) -> dict[str, Any]:
        """Family fields shown with each transaction of a payout or sweep in the API and
        events, from what the wallet stored in ``SignedTx.details`` (EVM: ``nonce``,
        ``max_fee_per_gas``, ``priority_fee_per_gas``)."""
        return {}

    def payout_fields(self, txs: Sequence[StoredTx]) -> dict[str, Any]:
        """Family fields shown on a payout, from its transactions (EVM: ``nonce``)."""
        return {}

    def open_client(self, ctx: ChainContext) -> ChainClient:
        """A client for this chain; the core enters it as an async context."""
        raise NotImplementedError

    def open_wallet(self, ctx: WalletContext) -> Wallet | None:
        """This chain's wallet, or None if the family cannot send (watch-only families)."""
        return None


class ChainFamily:
    """A kind of chain (``evm``, later ``bitcoin``, ``tron``, ``solana``). One instance
    serves every configured chain of its kind."""

    name: ClassVar[str]

    def configure(self, table: ConfigTable) -> ChainSpec:
        """Read this family's own keys of one ``[[chains]]`` entry with ``table.take(...)``
        (its ``[chains.sweep]`` and ``[chains.payouts]`` sub-tables are
        ``table.table("sweep")`` and ``table.table("payouts")``) and return the chain's spec.
        Raise :class:`watcher.errors.ConfigError` (with ``table.key(name)``) on bad values.
        Keys taken by neither the family nor the core are reported as unknown."""
        raise NotImplementedError

    def node_options(self, table: ConfigTable) -> Mapping[str, Any]:
        """Read this family's own keys of one ``[[chains.nodes]]`` table (beside the core's
        ``url`` and ``ws_url``), e.g. a node's credentials file; they reach the client as
        ``NodeConfig.options``. The default takes none, so any other key is unknown."""
        return {}
