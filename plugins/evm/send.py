"""Building and signing EVM transfers (eth-account), for sweeps and payouts."""

from __future__ import annotations

from typing import Any

from watcher.chains import FeeQuote, SignedTx
from watcher.config import AssetConfig
from watcher.errors import WatcherError

TRANSFER_SELECTOR = "a9059cbb"  # transfer(address,uint256)
NATIVE_TRANSFER_GAS = 21_000


def transfer_calldata(to: str, amount: int) -> str:
    return "0x" + TRANSFER_SELECTOR + to.lower().removeprefix("0x").rjust(64, "0") + f"{amount:064x}"


def sign_transfer(private_key: bytes, *, chain_id: int | None, to: str, asset: AssetConfig, amount: int, nonce: int,
                  gas_limit: int, fees: FeeQuote) -> SignedTx:
    from eth_account import Account
    from eth_utils import to_checksum_address

    if chain_id is None:
        raise WatcherError("the chain id is not known yet (the node has not answered); cannot sign")
    tx: dict[str, Any] = {"chainId": chain_id, "nonce": nonce, "gas": gas_limit}
    if asset.contract is None:
        tx.update(to=to_checksum_address(to), value=amount, data=b"")
    else:
        tx.update(to=to_checksum_address(asset.contract), value=0, data=transfer_calldata(to, amount))
    if fees.priority_fee is None:
        tx["gasPrice"] = fees.max_fee
    else:
        tx.update(type=2, maxFeePerGas=fees.max_fee, maxPriorityFeePerGas=fees.priority_fee)
    signed = Account.sign_transaction(tx, private_key)
    return SignedTx(raw="0x" + bytes(signed.raw_transaction).hex(), txid="0x" + bytes(signed.hash).hex(),
                    nonce=nonce, gas_limit=gas_limit, fees=fees)
