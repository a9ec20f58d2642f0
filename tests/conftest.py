"""Shared fixtures: real anvil nodes and a real ERC-20 (compiled from tests/contracts)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.evm import Anvil, Token
from tests.support.litecoin import Litecoind


@pytest.fixture
def anvil() -> Iterator[Anvil]:
    node = Anvil(chain_id=31337)
    node.start()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def token(anvil: Anvil) -> Token:
    return Token.deploy(anvil, "USDT", 6)


@pytest.fixture
def litecoind() -> Iterator[Litecoind]:
    node = Litecoind()
    node.start()
    try:
        yield node
    finally:
        node.close()
