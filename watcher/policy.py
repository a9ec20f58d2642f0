"""Per-chain money-moving policy from config: where sweeps go and when, and the limits every
payout must pass. Amounts are given in asset units in TOML (``{ USDT = "1000" }``) and held
in base units here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .auth import parse_rate
from .errors import ConfigError, InvalidAddress, InvalidAmount
from .money import parse_amount

if TYPE_CHECKING:
    from .chains import ChainSpec
    from .config import AssetConfig, ConfigTable

PAUSE_SCOPES = ("payouts", "sweeps")


@dataclass(frozen=True)
class SweepConfig:
    to: str | None = None  # treasury (canonical); None: sweeping is off for the chain
    min_amount: dict[str, int] = field(default_factory=dict)  # only assets listed here are swept
    interval: float = 600.0  # seconds between automatic runs; 0: only POST /v1/sweeps/run
    batch_size: int = 20  # candidates looked at per run
    funding_confirmations: int = 1  # confirmations of a funding step (a top-up) before the transfer

    @property
    def enabled(self) -> bool:
        return self.to is not None


@dataclass(frozen=True)
class PayoutPolicy:
    approval_above: dict[str, int] = field(default_factory=dict)
    max_amount: dict[str, int] = field(default_factory=dict)
    daily_limit: dict[str, int] = field(default_factory=dict)
    label_daily_limit: dict[str, int] = field(default_factory=dict)
    label_rate: tuple[int, int] | None = None  # (payouts, per seconds)
    deny: frozenset[str] = frozenset()
    stuck_after: float = 180.0  # seconds before an unmined transaction is replaced
    fee_bump_ppm: int = 200_000  # each replacement pays at least this much more (fraction, ppm)


def _amounts(t: ConfigTable, name: str, assets: tuple[AssetConfig, ...]) -> dict[str, int]:
    table = t.table(name)
    out = {}
    for symbol in list(table.raw):
        asset = next((a for a in assets if a.symbol == symbol), None)
        if asset is None:
            raise ConfigError(table.key(symbol), f"unknown asset (configured: {', '.join(a.symbol for a in assets)})")
        raw = table.take(symbol, str)
        try:
            out[symbol] = parse_amount(raw, asset.decimals, allow_zero=True, what=symbol)
        except InvalidAmount as e:
            raise ConfigError(table.key(symbol), e.message) from None
    table.done()
    return out


def _address(spec: ChainSpec, t: ConfigTable, key: str, value: str) -> str:
    try:
        return spec.validate_address(value)
    except InvalidAddress as e:
        raise ConfigError(t.key(key), e.message) from None


def parse_sweep(t: ConfigTable, spec: ChainSpec, assets: tuple[AssetConfig, ...]) -> SweepConfig:
    from .config import between

    if not t.raw:
        return SweepConfig()
    to = _address(spec, t, "to", t.take("to", str))
    cfg = SweepConfig(
        to=to,
        min_amount=_amounts(t, "min_amount", assets),
        interval=t.take("interval", float, 600.0, check=between(0, 7 * 86400)),
        batch_size=t.take("batch_size", int, 20, check=between(1, 10_000)),
        funding_confirmations=t.take("funding_confirmations", int, 1, check=between(1, 1000)),
    )
    t.done()
    return cfg


def parse_payouts(t: ConfigTable, spec: ChainSpec, assets: tuple[AssetConfig, ...]) -> PayoutPolicy:
    from .config import between, fraction

    rate = t.take("label_rate", str, None)
    label_rate = None
    if rate is not None:  # the one rate syntax, as [api] rate_limit
        try:
            parsed = parse_rate(rate)
        except ValueError as e:
            raise ConfigError(t.key("label_rate"), str(e)) from None
        label_rate = (parsed.count, parsed.period)
    deny_raw = t.take("deny", list, [], check=lambda v: None if all(isinstance(x, str) for x in v)
                      else "must be a list of addresses")
    policy = PayoutPolicy(
        approval_above=_amounts(t, "approval_above", assets),
        max_amount=_amounts(t, "max_amount", assets),
        daily_limit=_amounts(t, "daily_limit", assets),
        label_daily_limit=_amounts(t, "label_daily_limit", assets),
        label_rate=label_rate,
        deny=frozenset(_address(spec, t, "deny", a) for a in deny_raw),
        stuck_after=t.take("stuck_after", float, 180.0, check=between(1, 7 * 86400)),
        fee_bump_ppm=fraction(t, "fee_bump", "0.2", 100_000, 10_000_000),
    )
    t.done()
    return policy


def parse_paused(t: ConfigTable) -> frozenset[str]:
    paused = t.take("paused", list, [], check=lambda v: None if all(x in (*PAUSE_SCOPES, "all") for x in v)
                    else f"must list scopes among {', '.join(PAUSE_SCOPES)}, all")
    t.done()
    return frozenset(PAUSE_SCOPES if "all" in paused else paused)
