"""Building and signing EVM transactions (eth-account), for sweeps, payouts and fillers."""

from __future__ import annotations

from typing import Any

from watcher.chains import SignedTx
from watcher.config import AssetConfig
from watcher.errors import WatcherError

from .erc20 import transfer_calldata
from .fees import FeeQuote

NATIVE_TRANSFER_GAS = 21_000


def conflict_key(sender: str, nonce: int) -> str:
    """Transactions of one sender with one nonce exclude each other."""
    return f"{sender}/{nonce}"


def sign_transfer(private_key: bytes, *, chain_id: int | None, sender: str, to: str, asset: AssetConfig,
                  amount: int, nonce: int, gas_limit: int, fees: FeeQuote) -> SignedTx:
    """A transfer of ``amount`` of ``asset`` from ``sender`` (whose key is ``private_key``)."""
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
                    sender=sender, to=to, asset=asset.symbol, amount=amount, fee_limit=gas_limit * fees.max_fee,
                    conflict=conflict_key(sender, nonce),
                    details={"nonce": nonce, "gas_limit": gas_limit, **fees.as_details()})
