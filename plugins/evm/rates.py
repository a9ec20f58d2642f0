"""The ``chainlink`` rate kind: a Chainlink price feed (``AggregatorV3Interface``) read with
``eth_call`` through a configured EVM chain's own node, so no third party is asked.

```toml
[[rates.sources]]
kind = "chainlink"
chain = "devnet"      # an EVM chain of this config: its node answers the eth_call
pair = "ETH/USD"      # what the feed's answer prices: 1 ETH in USD
feed = "0x..."        # the aggregator (or proxy) address
```

``latestRoundData()`` gives the answer and ``updatedAt``; ``decimals()`` (read once) scales
it. A round older than ``[rates] max_age`` is stale and never used, a zero or negative
answer is refused, and so is a round the feed says is not complete (``answeredInRound <
roundId``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from eth_abi import decode
from eth_utils import function_signature_to_4byte_selector

from watcher.errors import ConfigError, InvalidAddress, NodeError
from watcher.rates import Rate, RateSource, split_pair

if TYPE_CHECKING:
    from watcher.config import Config, ConfigTable
    from watcher.daemon import Daemon

LATEST_ROUND_DATA = "0x" + function_signature_to_4byte_selector("latestRoundData()").hex()
DECIMALS = "0x" + function_signature_to_4byte_selector("decimals()").hex()


@dataclass
class ChainlinkSource:
    chain: str
    pair_: tuple[str, str]
    feed: str
    _decimals: int | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"chainlink:{self.chain}"

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return (self.pair_,)

    async def read(self, daemon: Daemon) -> Sequence[Rate]:
        watcher = daemon.watchers.get(self.chain)
        client: Any = getattr(watcher, "client", None)
        if client is None:
            raise NodeError(f"{self.chain}: the chain's client is not open")
        if self._decimals is None:
            raw = await client.rpc.call("eth_call", {"to": self.feed, "data": DECIMALS}, "latest")
            (self._decimals,) = decode(["uint8"], bytes.fromhex(raw[2:]))
        raw = await client.rpc.call("eth_call", {"to": self.feed, "data": LATEST_ROUND_DATA}, "latest")
        round_id, answer, _started, updated_at, answered_in = decode(
            ["uint80", "int256", "uint256", "uint256", "uint80"], bytes.fromhex(raw[2:]))
        if answer <= 0:
            raise ValueError(f"feed {self.feed} answered {answer} (not a price)")
        if answered_in < round_id:
            raise ValueError(f"feed {self.feed}: round {round_id} is not complete")
        assert self._decimals is not None
        value = Fraction(answer, 10**self._decimals)
        return [Rate(self.pair_[0], self.pair_[1], value, self.name, int(updated_at))]


class ChainlinkKind:
    name = "chainlink"

    def configure(self, table: ConfigTable, config: Config) -> RateSource:
        chain_id = table.take("chain", str)
        chain = config.chain(chain_id)
        if chain is None or chain.family != "evm":
            evm = ", ".join(c.id for c in config.chains if c.family == "evm") or "none"
            raise ConfigError(table.key("chain"), f"{chain_id!r} is not an EVM chain of this config (EVM chains: {evm})")
        try:
            pair = split_pair(table.take("pair", str))
        except ValueError as e:
            raise ConfigError(table.key("pair"), str(e)) from None
        try:
            feed = chain.spec.validate_address(table.take("feed", str))
        except InvalidAddress as e:
            raise ConfigError(table.key("feed"), e.message) from None
        return ChainlinkSource(chain.id, pair, feed)
