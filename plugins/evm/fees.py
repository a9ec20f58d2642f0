"""EVM fees: what to pay per unit of gas, how a replacement must pay more, and the cap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FeeQuote:
    """What to pay per unit of gas. EIP-1559 chains set ``priority_fee``; legacy ones leave it
    None and ``max_fee`` is the gas price."""

    max_fee: int
    priority_fee: int | None = None

    def bumped(self, ppm: int, floor: FeeQuote | None = None) -> FeeQuote:
        """At least ``ppm`` parts per million more than self on every field (what a node asks
        of a replacement), and never below ``floor`` (the current market)."""

        def up(x: int) -> int:
            return x + max(1, -(-x * ppm // 1_000_000))

        max_fee = up(self.max_fee)
        prio = None if self.priority_fee is None else up(self.priority_fee)
        if floor is not None:
            max_fee = max(max_fee, floor.max_fee)
            if prio is not None and floor.priority_fee is not None:
                prio = max(prio, floor.priority_fee)
        if prio is not None:
            prio = min(prio, max_fee)
        return FeeQuote(max_fee=max_fee, priority_fee=prio)

    def capped(self, cap: int | None) -> FeeQuote:
        """Never more than ``cap`` per gas unit (``[chains.payouts] max_fee_per_gas``)."""
        if cap is None or self.max_fee <= cap:
            return self
        prio = None if self.priority_fee is None else min(self.priority_fee, cap)
        return FeeQuote(max_fee=cap, priority_fee=prio)

    def within(self, budget: int) -> FeeQuote | None:
        """This quote lowered to ``budget`` per gas, if that still gets into a block soon: at
        least the next base fee up by a quarter plus the tip (EIP-1559, where ``max_fee`` is
        twice the base fee plus the tip), or the gas price (legacy, ``max_fee`` its 110 %);
        None if it does not."""
        if budget >= self.max_fee:
            return self
        if self.priority_fee is not None:
            base = (self.max_fee - self.priority_fee) // 2
            floor = base + base // 4 + self.priority_fee
        else:
            floor = self.max_fee * 10 // 11
        if budget < floor:
            return None
        return FeeQuote(max_fee=budget, priority_fee=None if self.priority_fee is None
                        else min(self.priority_fee, budget))

    def as_details(self) -> dict[str, Any]:
        return {"max_fee": self.max_fee, "priority_fee": self.priority_fee}

    @classmethod
    def from_details(cls, details: Mapping[str, Any]) -> FeeQuote:
        prio = details.get("priority_fee")
        return cls(max_fee=int(details["max_fee"]), priority_fee=None if prio is None else int(prio))
