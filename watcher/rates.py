"""Exchange rates: what one unit of an asset is worth in another currency, read from sources
the operator configures (``[[rates.sources]]``), never guessed.

A **rate kind** (``fixed`` here, ``chainlink`` in the EVM plugin, any plugin's through the
``watcher_rate_kinds`` hook) turns a ``[[rates.sources]]`` table into a **source** that
reads the pairs it provides. :class:`Rates` asks sources when a rate is needed (a read is
kept for ``refresh`` seconds), refuses a rate older than ``max_age`` (by the source's own
timestamp: a Chainlink round's ``updatedAt``), and derives cross rates through the
reference currency (ETH/EUR = ETH/USD / EUR/USD). Values are exact fractions; a rate is shown
as a decimal string.

Failure policy: a source that raises or answers nothing usable makes its pairs unavailable
(``RateUnavailable``, ``503 rate_unavailable`` naming the pair) and is logged; it never stops
the daemon, and a fiat invoice is then refused rather than priced from an old or made-up rate.
A pair no source gives at all is ``422 unknown_pair`` (asking again will not help).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError, WatcherError

if TYPE_CHECKING:
    from .config import Config, ConfigTable
    from .daemon import Daemon

log = logging.getLogger(__name__)

SHOWN_DECIMALS = 18  # a derived rate (a quotient) is shown to this many places, half-even
VALUE_DECIMALS = 8  # reference values (a transfer's worth in USD) are shown to 8 places, half-even


class RateUnavailable(WatcherError):
    """The sources that give a pair failed, gave nothing, or only a stale rate: try later."""

    status = 503
    code = "rate_unavailable"


class UnknownPair(WatcherError):
    """No configured source gives the pair, directly or through the reference currency: a
    request for it cannot succeed until the configuration changes."""

    status = 422
    code = "unknown_pair"


#: Rates outside 10^-30 .. 10^30 are no price (a broken or hostile source): no asset or
#: currency pair comes near, and beyond them the arithmetic of values and amounts breaks
RATE_RANGE = (Fraction(1, 10**30), Fraction(10**30))
#: How far ahead of ours a source's clock may run; a rate dated later would never go stale
CLOCK_SKEW = 300


def insane(rate: Rate, wall: float) -> str | None:
    """Why a rate a source gave is unusable (not a positive number in :data:`RATE_RANGE`,
    dated in the future), or None. A plugin's source is held to it like the built-in ones."""
    if not isinstance(rate.value, Fraction) or not RATE_RANGE[0] <= rate.value <= RATE_RANGE[1]:
        return f"is {rate.value!r:.40}: not a positive rate between 1e-30 and 1e30"
    if not isinstance(rate.updated_at, int) or rate.updated_at > wall + CLOCK_SKEW:
        return f"is dated {rate.updated_at!r:.40}, in the future"
    return None


@dataclass(frozen=True)
class Rate:
    """1 ``base`` is worth ``value`` ``quote``, as ``source`` said at ``updated_at`` (Unix s)."""

    base: str
    quote: str
    value: Fraction
    source: str
    updated_at: int

    @property
    def pair(self) -> str:
        return f"{self.base}/{self.quote}"

    def inverse(self) -> Rate:
        return Rate(self.quote, self.base, 1 / self.value, self.source, self.updated_at)

    def view(self) -> dict[str, Any]:
        """As ``GET /v1/rates`` shows it."""
        from .views import iso_ms

        return {"pair": self.pair, "rate": decimal_text(self.value), "source": self.source,
                "updated_at": iso_ms(self.updated_at * 1000)}

    def locked(self) -> dict[str, Any]:
        """As an invoice or quote keeps it: ``value`` is the rate."""
        view = self.view()
        return {"pair": view["pair"], "value": view["rate"], "source": view["source"], "updated_at": view["updated_at"]}


def decimal_text(value: Fraction, places: int = SHOWN_DECIMALS) -> str:
    """A fraction as a plain decimal string: exact when it terminates within ``places``,
    else rounded half-even to ``places``; no exponent, no trailing zeros."""
    with localcontext() as ctx:
        ctx.prec = 100
        d = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(Decimal(1).scaleb(-places),
                                                                              rounding=ROUND_HALF_EVEN)
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def parse_decimal(text: Any, what: str) -> Fraction:
    """A positive decimal string (``"1"``, ``"0.9998"``) as an exact fraction."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a decimal string such as \"1.05\"")
    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{what} {text[:40]!r} is not a decimal number") from None
    if not d.is_finite() or d <= 0:
        raise ValueError(f"{what} must be a positive number")
    return Fraction(d)


def split_pair(text: Any) -> tuple[str, str]:
    """``"ETH/USD"`` -> ``("ETH", "USD")``; symbols are 1-16 of A-Z 0-9."""
    if not isinstance(text, str) or text.count("/") != 1:
        raise ValueError(f"{str(text)[:40]!r} is not a pair such as \"ETH/USD\"")
    base, quote = (p.strip().upper() for p in text.split("/"))
    for s in (base, quote):
        if not (1 <= len(s) <= 16 and s.isascii() and s.isalnum()):
            raise ValueError(f"{text[:40]!r} is not a pair such as \"ETH/USD\"")
    if base == quote:
        raise ValueError(f"{text[:40]!r}: a pair needs two different currencies")
    return base, quote


class RateSource(Protocol):
    """What a rate kind makes of one ``[[rates.sources]]`` table."""

    @property
    def name(self) -> str:
        """Shown as the rate's ``source``, e.g. ``chainlink:devnet``."""

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """What it provides: (base, quote) pairs."""

    async def read(self, daemon: Daemon) -> Sequence[Rate]:
        """The current rates of its pairs (may raise: the pairs are then unavailable)."""


class RateKind(Protocol):
    name: str  # the ``kind`` key

    def configure(self, table: ConfigTable, config: Config) -> RateSource:
        """Read the table's keys (``table.take``), raising ConfigError naming a bad one;
        ``config`` is the rest of the configuration (e.g. to check a chain id)."""


# --- built in: fixed -------------------------------------------------------------------------


@dataclass
class FixedSource:
    pair_: tuple[str, str]
    value: Fraction
    name: str = "fixed"

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return (self.pair_,)

    async def read(self, daemon: Daemon) -> Sequence[Rate]:
        return [Rate(self.pair_[0], self.pair_[1], self.value, self.name, int(time.time()))]


class FixedKind:
    """``kind = "fixed"``, ``pair = "USDT/USD"``, ``rate = "1"``: a rate from the config (a
    stablecoin's peg); it is never stale."""

    name = "fixed"

    def configure(self, table: ConfigTable, config: Config) -> RateSource:
        try:
            pair = split_pair(table.take("pair", str))
        except ValueError as e:
            raise ConfigError(table.key("pair"), str(e)) from None
        try:
            value = parse_decimal(table.take("rate", str), "rate")
        except ValueError as e:
            raise ConfigError(table.key("rate"), str(e)) from None
        return FixedSource(pair, value)


BUILTIN_KINDS: tuple[RateKind, ...] = (FixedKind(),)


# --- the service ---------------------------------------------------------------------------------


@dataclass
class _Read:
    at: float  # monotonic
    rates: Mapping[tuple[str, str], Rate]


@dataclass
class Rates:
    """The configured sources, read on demand and kept ``refresh`` seconds."""

    reference: str
    max_age: int
    refresh: float
    sources: list[RateSource]
    wall: Callable[[], float] = time.time
    _reads: dict[int, _Read] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any, kinds: Mapping[str, RateKind]) -> Rates:
        from .config import ConfigTable

        rc = config.rates
        sources = []
        for i, raw in enumerate(rc.sources):
            table = ConfigTable(raw, f"rates.sources[{i}]")
            kind_name = table.take("kind", str)
            kind = kinds.get(kind_name)
            if kind is None:
                raise ConfigError(table.key("kind"), f"unknown rate source kind {kind_name!r} "
                                                     f"(known: {', '.join(sorted(kinds))})")
            sources.append(kind.configure(table, config))
            table.done()
        return cls(reference=rc.reference, max_age=rc.max_age, refresh=rc.refresh, sources=sources)

    def pairs(self) -> list[str]:
        return sorted({f"{b}/{q}" for s in self.sources for b, q in s.pairs})

    async def _direct(self, daemon: Daemon, base: str, quote: str) -> Rate | None:
        """A configured pair (or its inverse), fresh; None if no source provides it."""
        for i, s in enumerate(self.sources):
            if (base, quote) in s.pairs or (quote, base) in s.pairs:
                rate = await self._read(daemon, i, s, (base, quote) if (base, quote) in s.pairs else (quote, base))
                return rate if rate.base == base else rate.inverse()
        return None

    async def _read(self, daemon: Daemon, i: int, source: RateSource, pair: tuple[str, str], *,
                    force: bool = False) -> Rate:
        now = time.monotonic()
        hit = self._reads.get(i)
        if force or hit is None or now - hit.at > self.refresh:
            try:
                got = await source.read(daemon)
            except Exception as e:
                log.warning("rate source %s failed: %s", source.name, e)
                raise RateUnavailable(f"no rate for {pair[0]}/{pair[1]}: source {source.name} failed "
                                      f"({type(e).__name__})") from None
            wall = self.wall()
            kept = {}
            for r in got:
                problem = insane(r, wall)
                if problem is None:
                    kept[(r.base, r.quote)] = r
                else:  # that pair is unavailable; the source's others stand
                    log.warning("rate source %s: %s/%s %s: not used", source.name, r.base, r.quote, problem)
            hit = self._reads[i] = _Read(now, kept)
        rate = hit.rates.get(pair)
        if rate is None:
            raise RateUnavailable(f"no rate for {pair[0]}/{pair[1]}: source {source.name} gave none")
        age = self.wall() - rate.updated_at
        if age > self.max_age:
            raise RateUnavailable(f"the rate for {pair[0]}/{pair[1]} from {source.name} is {int(age)} s old "
                                  f"(rates.max_age is {self.max_age} s): not used")
        return rate

    async def run(self, daemon: Daemon, *, task_status: Any = None) -> None:
        """Keep every source's answer fresh (every ``refresh`` seconds, at least one), so a
        transfer's value can be taken at the moment it is detected without waiting for a
        source. The first round is read before ``started``: the scan's first transfers get
        values. A source that fails is logged and tried again next round."""
        import trio

        period = max(self.refresh, 1.0)
        first = True
        while True:
            for i, s in enumerate(self.sources):
                if not s.pairs:
                    continue
                try:  # one read gives all of a source's pairs
                    await self._read(daemon, i, s, s.pairs[0], force=True)
                except RateUnavailable as e:
                    log.warning("%s", e.message)
            if first:
                first = False
                if task_status is not None:
                    task_status.started()
            await trio.sleep(period)

    def cached(self, base: str, quote: str) -> Rate | None:
        """The rate from the sources' last answers (no read), derived through the reference
        if need be; None when a leg is missing or older than ``max_age``."""
        base, quote = base.upper(), quote.upper()
        if base == quote:
            return Rate(base, quote, Fraction(1), "identity", int(self.wall()))

        def leg(b: str, q: str) -> Rate | None:
            for read in self._reads.values():
                for (rb, rq), rate in read.rates.items():
                    if {rb, rq} == {b, q} and self.wall() - rate.updated_at <= self.max_age:
                        return rate if rb == b else rate.inverse()
            return None

        direct = leg(base, quote)
        if direct is not None:
            return direct
        ref = self.reference
        legs = [None if s == ref else leg(s, ref) for s in (base, quote)]
        if any(x is None for s, x in zip((base, quote), legs, strict=True) if s != ref):
            return None
        return _cross(base, quote, legs[0], legs[1])

    def value_of(self, symbol: str, base_units: int, decimals: int) -> dict[str, Any] | None:
        """What ``base_units`` of ``symbol`` are worth in the reference currency at the cached
        rate: ``{"currency", "amount", "rate", "source"}`` (amount half-even to 8 places), or
        None when there is no fresh rate (never a guess)."""
        rate = self.cached(symbol, self.reference)
        if rate is None:
            return None
        worth = Fraction(base_units, 10**decimals) * rate.value
        return {"currency": self.reference, "amount": decimal_text(worth, VALUE_DECIMALS),
                "rate": decimal_text(rate.value), "source": rate.source}

    async def get(self, daemon: Daemon, base: str, quote: str) -> Rate:
        """1 ``base`` in ``quote``: a configured pair, its inverse, or derived through the
        reference currency; raises :class:`RateUnavailable` naming the pair."""
        base, quote = base.upper(), quote.upper()
        if base == quote:
            return Rate(base, quote, Fraction(1), "identity", int(self.wall()))
        direct = await self._direct(daemon, base, quote)
        if direct is not None:
            return direct
        ref = self.reference
        legs = []
        for sym in (base, quote):
            leg = None if sym == ref else await self._direct(daemon, sym, ref)
            if leg is None and sym != ref:
                raise UnknownPair(f"no rate for {base}/{quote}: no source gives {sym}/{ref} "
                                  f"(configured pairs: {', '.join(self.pairs()) or 'none'})")
            legs.append(leg)
        return _cross(base, quote, legs[0], legs[1])


def _cross(base: str, quote: str, b_leg: Rate | None, q_leg: Rate | None) -> Rate:
    """base/quote from base/ref and quote/ref (None: that side is the reference itself)."""
    used = [x for x in (b_leg, q_leg) if x is not None]
    value = (b_leg.value if b_leg else Fraction(1)) / (q_leg.value if q_leg else Fraction(1))
    return Rate(base, quote, value, "+".join(x.source for x in used), min(x.updated_at for x in used))


def amount_for_price(price: Fraction, rate: Rate, decimals: int) -> int:
    """Base units of the asset that pay ``price`` (in the rate's quote currency), rounded up:
    the customer never pays less than the price."""
    return math.ceil(price * 10**decimals / rate.value)
