"""ERC-20 as the EVM family uses it: the ABI (calls are encoded and decoded with web3's ABI
tools) and the one matcher of ``Transfer`` logs used by both scanning and ``submit-tx``."""

from __future__ import annotations

import functools
from typing import Any

from eth_utils.abi import event_abi_to_log_topic

ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "transfer", "stateMutability": "nonpayable",
     "inputs": [{"name": "to", "type": "address"}, {"name": "value", "type": "uint256"}],
     "outputs": [{"name": "", "type": "bool"}]},
    {"type": "function", "name": "balanceOf", "stateMutability": "view",
     "inputs": [{"name": "owner", "type": "address"}], "outputs": [{"name": "", "type": "uint256"}]},
    {"type": "event", "name": "Transfer", "anonymous": False,
     "inputs": [{"name": "from", "type": "address", "indexed": True},
                {"name": "to", "type": "address", "indexed": True},
                {"name": "value", "type": "uint256", "indexed": False}]},
]

# the ABI is plain JSON-shaped dicts; eth-utils types its argument as eth-typing's ABIEvent TypedDict
TRANSFER_TOPIC = "0x" + event_abi_to_log_topic(ABI[2]).hex()  # type: ignore[arg-type]


@functools.cache
def _contract() -> Any:
    """web3's contract object for the ABI (no provider: used to encode calls only). web3 and
    eth-account take seconds to import: the wallet loads them when it opens, at start-up
    (``load_abi``); a process that only reads (``watcher reconcile``) loads them on first use."""
    from web3 import Web3

    return Web3().eth.contract(abi=ABI)


def load_abi() -> None:
    """Import web3 and eth-account now rather than on the first call that needs them."""
    import eth_account  # noqa: F401 - signing; imported here for its import time

    _contract()


def transfer_calldata(to: str, amount: int) -> str:
    from eth_utils import to_checksum_address

    return str(_contract().encode_abi("transfer", args=[to_checksum_address(to), amount]))


def balance_of_calldata(owner: str) -> str:
    from eth_utils import to_checksum_address

    return str(_contract().encode_abi("balanceOf", args=[to_checksum_address(owner)]))


def decode_uint(result: str) -> int:
    """The uint256 a call such as ``balanceOf`` returned (hex)."""
    from eth_abi import decode

    (value,) = decode(["uint256"], bytes.fromhex(result.removeprefix("0x")[:64]))
    return int(value)


def _addr_from_topic(topic: str) -> str:
    return "0x" + topic[-40:].lower()


def match_transfer(log: dict[str, Any]) -> tuple[str, str, int] | None:
    """``(from, to, amount)`` of an ERC-20 ``Transfer`` log with a non-zero amount, else None
    (ERC-721 indexes the token id as a fourth topic and carries no data: not a match)."""
    topics = log.get("topics") or []
    data = log.get("data", "")
    if len(topics) != 3 or topics[0] != TRANSFER_TOPIC or not isinstance(data, str) or len(data) != 66:
        return None
    amount = int(data, 16)
    if amount == 0:
        return None
    return _addr_from_topic(topics[1]), _addr_from_topic(topics[2]), amount
