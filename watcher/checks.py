"""Checks every payout must pass, as ``watcher_payout_check`` implementations: the built-in
ones below read the chain's ``[chains.payouts]`` policy; an operator's own plugin (a KYC
lookup, a sanctions list) plugs in the same way. They are ``tryfirst``: these cheap local
checks run before an operator's own (which may ask a service), as pluggy orders them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import NotFound
from .hookspecs import hookimpl
from .money import format_amount

if TYPE_CHECKING:
    from .daemon import Daemon
    from .policy import PayoutPolicy

DAY_MS = 86_400_000


@dataclass(frozen=True)
class PayoutRequest:
    """A payout as the checks see it, before it exists."""

    chain: str
    asset: str
    amount: int  # base units
    to: str  # canonical address
    label: str | None
    decimals: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def show(self, units: int) -> str:
        return f"{format_amount(units, self.decimals)} {self.asset}"


@dataclass(frozen=True)
class Veto:
    reason: str
    code: str = "payout_rejected"


def _policy(daemon: Daemon, chain: str) -> PayoutPolicy:
    """The chain's ``[chains.payouts]`` policy. The API only asks about configured chains; for
    any other the check raises, and a check that raises refuses the payout."""
    cfg = daemon.config.chain(chain)
    if cfg is None:
        raise NotFound(f"unknown chain {chain!r}", code="unknown_chain")
    return cfg.payouts


class MaxAmount:
    """``max_amount``: no single payout above it."""

    @hookimpl(tryfirst=True)
    def watcher_payout_check(self, payout: PayoutRequest, daemon: Daemon) -> Veto | None:
        limit = _policy(daemon, payout.chain).max_amount.get(payout.asset)
        if limit is not None and payout.amount > limit:
            return Veto(f"amount {payout.show(payout.amount)} is above the per-payout maximum {payout.show(limit)}",
                        "amount_above_maximum")
        return None


class DailyLimits:
    """``daily_limit`` (all payouts of the asset) and ``label_daily_limit`` (per label; payouts
    without a label share one bucket, so leaving the label out does not skip the limit), over
    the last 24 hours, counting every payout that is pending, sent or completed (one waiting
    for approval counts from its approval, when it is checked again)."""

    @hookimpl(tryfirst=True)
    def watcher_payout_check(self, payout: PayoutRequest, daemon: Daemon) -> Veto | None:
        policy = _policy(daemon, payout.chain)
        since = daemon.clock.now_ms() - DAY_MS
        limit = policy.daily_limit.get(payout.asset)
        if limit is not None:
            used = daemon.store.payouts.total_since(payout.chain, payout.asset, since)
            if used + payout.amount > limit:
                return Veto(f"daily limit {payout.show(limit)} would be exceeded ({payout.show(used)} paid out in "
                            "the last 24 h)", "daily_limit_exceeded")
        limit = policy.label_daily_limit.get(payout.asset)
        if limit is not None:
            used = daemon.store.payouts.total_since(payout.chain, payout.asset, since, label=payout.label,
                                                    by_label=True)
            if used + payout.amount > limit:
                who = f"label {payout.label!r}" if payout.label is not None else "payouts without a label"
                return Veto(f"daily limit {payout.show(limit)} for {who} would be exceeded "
                            f"({payout.show(used)} in the last 24 h)", "label_daily_limit_exceeded")
        return None


class LabelRate:
    """``label_rate = "N/h"``: at most N payouts per label per period (payouts without a label
    share one bucket)."""

    @hookimpl(tryfirst=True)
    def watcher_payout_check(self, payout: PayoutRequest, daemon: Daemon) -> Veto | None:
        rate = _policy(daemon, payout.chain).label_rate
        if rate is None:
            return None
        count, period = rate
        recent = daemon.store.payouts.count_since(payout.label, daemon.clock.now_ms() - period * 1000)
        if recent >= count:
            who = f"label {payout.label!r}" if payout.label is not None else "payouts without a label"
            return Veto(f"{who} already had {recent} payout(s) in the last {period} s (at most {count})",
                        "rate_limited")
        return None


class Destination:
    """The destination must not be denied, and must not be one of watcher's own addresses
    (a deposit address or the hot wallet): that would be money going in circles."""

    @hookimpl(tryfirst=True)
    def watcher_payout_check(self, payout: PayoutRequest, daemon: Daemon) -> Veto | None:
        policy = _policy(daemon, payout.chain)
        if payout.to in policy.deny:
            return Veto("the destination address is on the deny-list", "destination_denied")
        cfg = daemon.config.chain(payout.chain)
        if cfg is not None and cfg.spec.is_burn_address(payout.to):
            return Veto("the destination is a burn address (nobody holds its key): the money would be lost",
                        "destination_burn")
        if payout.to == daemon.store.hot_wallet(payout.chain):
            return Veto("the destination is watcher's own hot wallet", "destination_is_own")
        own = daemon.store.addresses.get(payout.chain, payout.to)
        if own is not None and own.derivation_index is not None:
            return Veto("the destination is one of watcher's own deposit addresses", "destination_is_own")
        return None


def counted_again(payout: PayoutRequest, daemon: Daemon) -> Veto | None:
    """The built-in checks whose answer depends on the other payouts (the daily limits, the
    label rate), asked again inside the transaction that writes ``payout``: the checks before
    it may await (a plugin's), and two requests that passed them side by side must not both
    get through a limit that has room for one."""
    for check in (DailyLimits(), LabelRate()):
        veto = check.watcher_payout_check(payout, daemon)
        if veto is not None:
            return veto
    return None


BUILTIN = {"max_amount": MaxAmount, "daily_limits": DailyLimits, "label_rate": LabelRate,
           "destination": Destination}
