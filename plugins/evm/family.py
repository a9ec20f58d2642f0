"""The EVM chain family: Ethereum, BSC, Polygon, Base, a local devnet... one family, one set
of per-chain options."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from watcher.chains import ChainClient, ChainContext, ChainFamily, FeeQuote, SignedTx
from watcher.config import between, one_of
from watcher.errors import BadRequest, InvalidAddress

if TYPE_CHECKING:
    from watcher.config import AssetConfig, ChainConfig, ConfigTable

_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_TXID = re.compile(r"^0x[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class EvmOptions:
    chain_id: int | None = None  # expected eth_chainId; checked at start-up when set
    trace_internal: bool = False  # find internal ETH transfers with trace_block
    rpc_concurrency: int = 4  # HTTP requests in flight to the node
    rpc_batch_size: int = 50  # JSON-RPC calls per HTTP request
    logs_block_range: int = 2000  # widest eth_getLogs range tried first
    fee_mode: str = "auto"  # "auto", "eip1559" or "legacy" (gasPrice)
    watch_native: bool = True  # False: a token-only chain, scanned from logs and headers alone


class EvmFamily(ChainFamily):
    name = "evm"
    bip44_coin = 60
    native_decimals = 18
    default_native_symbol = "ETH"
    default_confirmations = 12
    default_finality_depth = 64

    def parse_options(self, table: ConfigTable) -> EvmOptions:
        return EvmOptions(
            chain_id=table.take("chain_id", int, None, check=between(1, 2**53)),
            trace_internal=table.take("trace_internal", bool, False),
            rpc_concurrency=table.take("rpc_concurrency", int, 4, check=between(1, 64)),
            rpc_batch_size=table.take("rpc_batch_size", int, 50, check=between(1, 1000)),
            logs_block_range=table.take("logs_block_range", int, 2000, check=between(1, 1_000_000)),
            fee_mode=table.take("fee_mode", str, "auto", check=one_of("auto", "eip1559", "legacy")),
            watch_native=table.take("watch_native", bool, True),
        )

    def validate_address(self, text: str) -> str:
        if not isinstance(text, str) or not _HEX_ADDRESS.match(text.strip()):
            raise InvalidAddress("not an EVM address (0x followed by 40 hex digits)")
        text = text.strip()
        body = text[2:]
        if body != body.lower() and body != body.upper():
            from eth_utils import to_checksum_address

            if to_checksum_address(text) != text:
                raise InvalidAddress("EVM address has a bad EIP-55 checksum (mixed case that does not match)")
        return "0x" + body.lower()

    def validate_txid(self, text: object) -> str:
        if not isinstance(text, str) or not _TXID.match(text):
            raise BadRequest("txid must be 0x followed by 64 hex digits", code="invalid_txid")
        return text.lower()

    def display_address(self, canonical: str) -> str:
        return _checksummed(canonical)

    def address_from_public_key(self, public_key: bytes) -> str:
        from coincurve import PublicKey
        from eth_utils import keccak

        uncompressed = PublicKey(public_key).format(compressed=False)
        return "0x" + keccak(uncompressed[1:])[-20:].hex()

    def payment_uri(self, config: ChainConfig, address: str, asset: str, amount: int,
                    node_info: dict[str, Any]) -> str | None:
        """EIP-681: ``ethereum:<to>@<chainId>?value=<wei>`` for the native coin,
        ``ethereum:<token>@<chainId>/transfer?address=<to>&uint256=<units>`` for tokens."""
        a = config.asset(asset)
        if a is None:
            return None
        chain_id = config.options.chain_id if config.options and config.options.chain_id else chain_id_of(node_info)
        chain_part = f"@{chain_id}" if chain_id else ""
        to = self.display_address(address)
        if a.contract is None:
            return f"ethereum:{to}{chain_part}?value={amount}"
        return f"ethereum:{self.display_address(a.contract)}{chain_part}/transfer?address={to}&uint256={amount}"

    def sign_transfer(self, private_key: bytes, *, node_info: dict[str, Any], to: str, asset: AssetConfig,
                      amount: int, nonce: int, gas_limit: int, fees: FeeQuote) -> SignedTx:
        from .send import sign_transfer

        return sign_transfer(private_key, chain_id=chain_id_of(node_info), to=to, asset=asset, amount=amount,
                             nonce=nonce, gas_limit=gas_limit, fees=fees)

    def open_client(self, ctx: ChainContext) -> ChainClient:
        from .client import EvmClient

        return EvmClient(ctx)


@functools.lru_cache(maxsize=65536)
def _checksummed(address: str) -> str:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


def chain_id_of(info: dict[str, Any]) -> int | None:
    value = info.get("chain_id")
    return value if isinstance(value, int) else None
