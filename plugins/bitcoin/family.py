"""The Bitcoin family: BTC and LTC on main, test and regtest networks, one set of per-chain
options. Deposit addresses are BIP84 native SegWit (P2WPKH) at ``m/84'/coin'/0'/0/i``; the hot
wallet is account 1 with change on ``.../1/i``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from watcher.chains import ChainFamily, ChainSpec, KeyScheme
from watcher.config import ConfigTable, between, one_of
from watcher.errors import BadRequest, ConfigError
from watcher.money import format_amount

from .address import canonical, p2wpkh, to_script
from .networks import NETWORKS, Network

if TYPE_CHECKING:
    from watcher.chains import ChainClient, ChainContext, StoredTx, Wallet, WalletContext
    from watcher.config import AssetConfig, ChainConfig

_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class BitcoinOptions:
    network: Network
    rpc_cookie_file: Path | None = None  # the node's .cookie, instead of credentials in rpc_url
    # HTTP requests in flight to the node: 8 keeps a node's 4 RPC threads (-rpcthreads) and two
    # cores busy while watcher parses (4 left a fifth of a core idle in a catch-up,
    # docs/performance.md), and stays well below its queue of 16 (-rpcworkqueue)
    rpc_concurrency: int = 8
    mempool: bool = True  # report payments from the mempool (0 confirmations)
    fee_rate_min: int = 1_000  # sat per 1,000 vB (1 sat/vB)
    fee_rate_max: int = 500_000  # sat per 1,000 vB
    fee_rate_fallback: int = 10_000  # when estimatesmartfee cannot estimate (regtest)
    fee_bump: str = "rbf"  # "rbf" (BIP125) or "cpfp"
    max_inputs: int = 100  # [chains.sweep]: inputs of one consolidating sweep


def _fee_rate(t: ConfigTable, name: str, default: str) -> int:
    """A fee rate in sat/vB (``2.5`` or ``"2.5"``), held in sat per 1,000 vB."""
    raw = t.take(name, (int, float, str), default)
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise ConfigError(t.key(name), f"{raw!r} is not a number of sat/vB") from None
    if not value.is_finite() or not Decimal("0.001") <= value <= 100_000 or value != value.quantize(Decimal("0.001")):
        raise ConfigError(t.key(name), "must be between 0.001 and 100000 sat/vB, with at most 3 decimals")
    return int(value * 1000)


def _cookie_file(table: ConfigTable) -> Path | None:
    """``rpc_cookie_file``: the ``.cookie`` Bitcoin Core writes at each start (an absolute path)."""
    cookie = table.take("rpc_cookie_file", str, None,
                        check=lambda v: None if Path(v).expanduser().is_absolute()
                        else "must be an absolute path (the node's datadir/.cookie)")
    return Path(cookie).expanduser() if cookie else None


class BitcoinFamily(ChainFamily):
    name = "bitcoin"

    def node_options(self, table: ConfigTable) -> dict[str, Any]:
        """A ``[[chains.nodes]]`` table may name that node's own ``rpc_cookie_file`` (each
        node writes its own cookie); without one, the chain's applies."""
        cookie = _cookie_file(table)
        return {"rpc_cookie_file": cookie} if cookie else {}

    def configure(self, table: ConfigTable) -> BitcoinSpec:
        name = table.take("network", str, check=one_of(*NETWORKS))
        network = NETWORKS[name]
        if table.has("assets"):
            raise ConfigError(table.key("assets"), "the bitcoin family has no tokens: only its native coin is watched")
        cookie = _cookie_file(table)
        sweep = table.table("sweep")
        fee_min = _fee_rate(table, "fee_rate_min", "1")
        fee_max = _fee_rate(table, "fee_rate_max", "500")
        if fee_max < fee_min:
            raise ConfigError(table.key("fee_rate_max"), "must be at least fee_rate_min")
        options = BitcoinOptions(
            network=network,
            rpc_cookie_file=cookie,
            rpc_concurrency=table.take("rpc_concurrency", int, 8, check=between(1, 64)),
            mempool=table.take("mempool", bool, True),
            fee_rate_min=fee_min,
            fee_rate_max=fee_max,
            fee_rate_fallback=_fee_rate(table, "fee_rate_fallback", "10"),
            # how a stuck transaction is bumped (the [chains.payouts] fee_bump fraction says by
            # how much); Litecoin nodes mostly refuse replacements (-mempoolreplacement is off)
            fee_bump=table.take("fee_bump", str, "rbf" if network.symbol == "BTC" else "cpfp",
                                check=one_of("rbf", "cpfp")),
            max_inputs=sweep.take("max_inputs", int, 100, check=between(1, 1000)),
        )
        return BitcoinSpec(options)


class BitcoinSpec(ChainSpec):
    family = "bitcoin"
    sends = True  # UTXO payouts and consolidating sweeps (wallet.py)
    watches_hot_wallet = True  # the hot wallet's coins are transfers to its address
    native_decimals = 8
    confirmations = 6
    finality_depth = 100
    matches_by_key = True  # the client finds output scripts in raw blocks

    def __init__(self, options: BitcoinOptions):
        self.options = options
        self.network = options.network
        self.keys = KeyScheme(purpose=84, coin_type=self.network.coin_type, change=True)
        self.native_symbol = self.network.symbol

    def validate_address(self, text: str) -> str:
        return canonical(self.network, text.strip() if isinstance(text, str) else text)

    def validate_txid(self, text: object) -> str:
        if not isinstance(text, str) or len(text) != 64 or not set(text.lower()) <= _HEX:
            raise BadRequest("txid must be 64 hex digits", code="invalid_txid")
        return text.lower()

    def address_from_public_key(self, public_key: bytes) -> str:
        return p2wpkh(self.network, public_key)

    def is_burn_address(self, canonical: str) -> bool:
        """An output script whose hash or witness program is all zeros (e.g. P2PKH
        1111111111111111111114oLvT2, bc1qqqqq...): no key or script hashes to it."""
        script = to_script(self.network, canonical)
        if script[:2] == b"\x76\xa9":  # P2PKH: OP_DUP OP_HASH160 <20> OP_EQUALVERIFY OP_CHECKSIG
            body = script[3:23]
        elif script[:1] == b"\xa9":  # P2SH: OP_HASH160 <20> OP_EQUAL
            body = script[2:22]
        else:  # SegWit v0/v1: OP_n <program>
            body = script[2:]
        return len(body) >= 20 and not any(body)

    def match_key(self, address: str) -> bytes:
        """The output script paying ``address``: what a raw block holds."""
        return to_script(self.network, address)

    def payment_uri(self, config: ChainConfig, address: str, asset: AssetConfig, amount: int,
                    node_info: Mapping[str, Any]) -> str | None:
        """BIP21: ``bitcoin:<address>?amount=<coins>`` (``litecoin:`` for LTC)."""
        if asset.contract is not None:
            return None
        return f"{self.network.uri_scheme}:{address}?amount={format_amount(amount, asset.decimals)}"

    tx_schema: ClassVar[dict[str, Any]] = {
        "fee": {"type": ["string", "null"], "description": "satoshis the transaction pays in fees"},
        "vsize": {"type": ["integer", "null"], "description": "virtual bytes (watcher's estimate: never below the "
                                                               "node's, at most a quarter of a vB an input above)"},
        "fee_rate": {"type": ["string", "null"], "description": "sat/vB (fee / vsize)"},
        "inputs": {"type": ["integer", "null"], "description": "outputs it spends"}}
    payout_schema: ClassVar[dict[str, Any]] = {
        "fee_rate": {"type": ["string", "null"], "description": "sat/vB of the payout's newest transaction"}}

    def tx_fields(self, details: Mapping[str, Any]) -> dict[str, Any]:
        fee, vsize = details.get("fee"), details.get("vsize")
        return {"fee": None if fee is None else str(fee), "vsize": vsize, "fee_rate": _rate(details),
                "inputs": len(details["inputs"]) if "inputs" in details else None}

    def payout_fields(self, txs: Sequence[StoredTx]) -> dict[str, Any]:
        sent = [t for t in txs if t.purpose == "payout" and (t.status != "failed" or t.block_number is not None)]
        return {"fee_rate": _rate(sent[-1].details) if sent else None}

    def open_client(self, ctx: ChainContext) -> ChainClient:
        from .client import BitcoinClient

        return BitcoinClient(ctx, self.options)

    def open_wallet(self, ctx: WalletContext) -> Wallet | None:
        from .client import BitcoinClient
        from .wallet import BitcoinWallet

        assert isinstance(ctx.client, BitcoinClient)
        return BitcoinWallet(ctx, ctx.client, self.options)


def _rate(details: Mapping[str, Any]) -> str | None:
    """A transaction's fee rate in sat/vB, as a decimal string (stored in sat per 1,000 vB)."""
    rate = details.get("fee_rate")
    return None if rate is None else format_amount(int(rate), 3)
