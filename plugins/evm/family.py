"""The EVM chain family: Ethereum, BSC, Polygon, Base, a local devnet... one family, one set
of per-chain options, one key scheme (``m/44'/60'/...``) shared by every EVM chain."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from watcher.chains import ChainClient, ChainContext, ChainFamily, ChainSpec, KeyScheme, StoredTx
from watcher.config import between, fraction, one_of
from watcher.errors import BadRequest, InvalidAddress

if TYPE_CHECKING:
    from watcher.chains import Wallet, WalletContext
    from watcher.config import AssetConfig, ChainConfig, ConfigTable

_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_TXID = re.compile(r"^0x[0-9a-fA-F]{64}$")

#: Every EVM chain derives from one account: a label has the same address on all of them.
EVM_KEYS = KeyScheme(purpose=44, coin_type=60)


@dataclass(frozen=True)
class EvmOptions:
    chain_id: int | None = None  # expected eth_chainId; checked at start-up when set
    trace_internal: bool = False  # find internal ETH transfers with trace_block
    rpc_concurrency: int = 4  # HTTP requests in flight to the node
    rpc_batch_size: int = 50  # JSON-RPC calls per HTTP request
    logs_block_range: int = 2000  # widest eth_getLogs range tried first
    fee_mode: str = "auto"  # "auto", "eip1559" or "legacy" (gasPrice)
    watch_native: bool = True  # False: a token-only chain, scanned from logs and headers alone
    max_fee_per_gas: int | None = None  # [chains.payouts]: never pay more per gas unit (wei)
    gas_margin_ppm: int = 200_000  # [chains.sweep] gas_margin: extra gas bought for token sweeps


class EvmFamily(ChainFamily):
    name = "evm"

    def configure(self, table: ConfigTable) -> EvmSpec:
        payouts, sweep = table.table("payouts"), table.table("sweep")
        return EvmSpec(EvmOptions(
            chain_id=table.take("chain_id", int, None, check=between(1, 2**53)),
            trace_internal=table.take("trace_internal", bool, False),
            rpc_concurrency=table.take("rpc_concurrency", int, 4, check=between(1, 64)),
            rpc_batch_size=table.take("rpc_batch_size", int, 50, check=between(1, 1000)),
            logs_block_range=table.take("logs_block_range", int, 2000, check=between(1, 1_000_000)),
            fee_mode=table.take("fee_mode", str, "auto", check=one_of("auto", "eip1559", "legacy")),
            watch_native=table.take("watch_native", bool, True),
            max_fee_per_gas=payouts.take("max_fee_per_gas", int, None, check=between(1, 10**30)),
            gas_margin_ppm=fraction(sweep, "gas_margin", "0.2", 0, 5_000_000) if sweep.raw else 200_000,
        ))


_BURN = frozenset({"0x" + "0" * 40, "0x000000000000000000000000000000000000dead"})


class EvmSpec(ChainSpec):
    push = True  # eth_subscribe("newHeads") at a node's ws_url
    family = "evm"
    keys = EVM_KEYS
    native_symbol = "ETH"
    native_decimals = 18
    confirmations = 12
    finality_depth = 64

    def __init__(self, options: EvmOptions):
        self.options = options

    def validate_address(self, text: str) -> str:
        if not isinstance(text, str) or not _HEX_ADDRESS.match(text.strip()):
            raise InvalidAddress("not an EVM address (0x followed by 40 hex digits)")
        text = text.strip()
        body = text[2:]
        if body != body.lower() and body != body.upper() and _checksummed("0x" + body.lower()) != text:
            raise InvalidAddress("EVM address has a bad EIP-55 checksum (mixed case that does not match)")
        return "0x" + body.lower()

    def validate_txid(self, text: object) -> str:
        if not isinstance(text, str) or not _TXID.match(text):
            raise BadRequest("txid must be 0x followed by 64 hex digits", code="invalid_txid")
        return text.lower()

    def display_address(self, canonical: str) -> str:
        return _checksummed(canonical)

    def is_burn_address(self, canonical: str) -> bool:
        """The zero address and the conventional 0x...dEaD: no key spends from either."""
        return canonical in _BURN

    def address_from_public_key(self, public_key: bytes) -> str:
        from coincurve import PublicKey
        from eth_utils import keccak

        uncompressed = PublicKey(public_key).format(compressed=False)
        return "0x" + keccak(uncompressed[1:])[-20:].hex()

    def payment_uri(self, config: ChainConfig, address: str, asset: AssetConfig, amount: int,
                    node_info: Mapping[str, Any]) -> str | None:
        """EIP-681: ``ethereum:<to>@<chainId>?value=<wei>`` for the native coin,
        ``ethereum:<token>@<chainId>/transfer?address=<to>&uint256=<units>`` for tokens."""
        chain_id = self.options.chain_id or chain_id_of(node_info)
        chain_part = f"@{chain_id}" if chain_id else ""
        to = self.display_address(address)
        if asset.contract is None:
            return f"ethereum:{to}{chain_part}?value={amount}"
        return f"ethereum:{self.display_address(asset.contract)}{chain_part}/transfer?address={to}&uint256={amount}"

    tx_schema: ClassVar[dict[str, Any]] = {
        "nonce": {"type": ["integer", "null"]},
        "max_fee_per_gas": {"type": ["string", "null"], "description": "wei per gas unit (the gas price, legacy)"},
        "priority_fee_per_gas": {"type": ["string", "null"], "description": "wei per gas unit (EIP-1559)"}}
    payout_schema: ClassVar[dict[str, Any]] = {"nonce": {"type": ["integer", "null"]}}

    def tx_fields(self, details: Mapping[str, Any]) -> dict[str, Any]:
        prio = details.get("priority_fee")
        return {"nonce": details.get("nonce"),
                "max_fee_per_gas": None if details.get("max_fee") is None else str(details["max_fee"]),
                "priority_fee_per_gas": None if prio is None else str(prio)}

    def payout_fields(self, txs: Sequence[StoredTx]) -> dict[str, Any]:
        return {"nonce": txs[0].details.get("nonce") if txs else None}

    def open_client(self, ctx: ChainContext) -> ChainClient:
        from .client import EvmClient

        return EvmClient(ctx, self.options)

    def open_wallet(self, ctx: WalletContext) -> Wallet | None:
        from .client import EvmClient
        from .wallet import EvmWallet

        assert isinstance(ctx.client, EvmClient)
        return EvmWallet(ctx, ctx.client, self.options)


@functools.lru_cache(maxsize=65536)
def _checksummed(address: str) -> str:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


def chain_id_of(info: Mapping[str, Any]) -> int | None:
    value = info.get("chain_id")
    return value if isinstance(value, int) else None
