"""watcher's built-in EVM chain plugin (Ethereum, BSC, Polygon, Base, any EVM chain; native
coin and ERC-20 tokens). Loaded through the ``watcher.plugins`` entry point ``evm``; the core
never imports it."""

from __future__ import annotations

from watcher.hookspecs import hookimpl

from .family import EvmFamily, EvmOptions
from .rates import ChainlinkKind

__all__ = ["EvmFamily", "EvmOptions"]


@hookimpl
def watcher_chain_families() -> list[EvmFamily]:
    return [EvmFamily()]


@hookimpl
def watcher_rate_kinds() -> list[ChainlinkKind]:
    return [ChainlinkKind()]
