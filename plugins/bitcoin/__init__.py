"""watcher's Bitcoin family (BTC, LTC): BIP84 deposit addresses, every standard address type
watched. Work in progress (issue 11): not registered as an entry point until its client can
scan a node."""

from __future__ import annotations

from watcher.hookspecs import hookimpl

from .family import BitcoinFamily, BitcoinOptions, BitcoinSpec
from .networks import NETWORKS, Network

__all__ = ["NETWORKS", "BitcoinFamily", "BitcoinOptions", "BitcoinSpec", "Network"]


@hookimpl
def watcher_chain_families() -> list[BitcoinFamily]:
    return [BitcoinFamily()]
