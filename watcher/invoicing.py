"""How an invoice's status follows from its payments and the clock: one pure function.

Statuses: ``awaiting_payment`` → ``awaiting_confirmation`` (live payments reach the amount
less the tolerance) → ``completed`` (the confirmed payments alone reach it); ``expired``
(not fully paid by ``expires_at``); ``failed`` (paid but not confirmed by the end of the
monitoring window, unless it completed once: see below); ``refunded`` follows the refunds. Flags: ``partial`` (something but not
enough arrived), ``overpaid`` (sale mode: more than the amount), ``late`` (the payment that
made it enough arrived after ``expires_at``, within the monitoring window).

A reorg that orphans a payment is just a recomputation with fewer payments: the invoice moves
back (``completed`` → ``awaiting_confirmation`` or ``awaiting_payment``/``expired``). An
invoice that completed once (``confirmed_once``) had its payment confirmed in time: a reorg
that moves that payment, even past ``monitor_until``, never fails it; found again, it waits
for its confirmations and completes again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

STATUSES = ("awaiting_payment", "awaiting_confirmation", "completed", "expired", "failed", "refunded")
TERMINAL = frozenset({"failed", "refunded"})
MODES = ("sale", "deposit")


@dataclass(frozen=True)
class Payment:
    amount: int
    confirmed: bool
    detected_at: int  # ms


@dataclass(frozen=True)
class InvoiceTerms:
    mode: str
    amount: int | None  # None: any amount (deposit mode)
    tolerance_ppm: int
    expires_at: int  # ms
    monitor_until: int  # ms

    @property
    def required(self) -> int:
        """Base units that make the invoice paid: the amount less the tolerance (at least 1)."""
        if self.amount is None:
            return 1
        return max(1, self.amount - self.amount * self.tolerance_ppm // 1_000_000)


@dataclass(frozen=True)
class Outcome:
    status: str
    received: int
    confirmed: int
    partial: bool
    overpaid: bool
    late: bool
    paid_at: int | None  # ms: when the payments first reached the required amount


def decide(terms: InvoiceTerms, current: str, payments: Iterable[Payment], now: int, *,
           confirmed_once: bool = False) -> Outcome:
    """The invoice's status and flags given its live (not orphaned) payments that arrived
    within the monitoring window, at time ``now`` (ms). ``confirmed_once``: it was
    ``completed`` before (a reorg moved its payment since)."""
    ordered = sorted(payments, key=lambda p: p.detected_at)
    received = sum(p.amount for p in ordered)
    confirmed = sum(p.amount for p in ordered if p.confirmed)
    required = terms.required
    paid_at = None
    running = 0
    for p in ordered:
        running += p.amount
        if running >= required:
            paid_at = p.detected_at
            break
    paid = paid_at is not None
    late = paid_at is not None and paid_at > terms.expires_at
    partial = 0 < received < required
    overpaid = terms.mode == "sale" and terms.amount is not None and received > terms.amount

    if current in TERMINAL:
        status = current
    elif not paid:
        status = "expired" if now >= terms.expires_at else "awaiting_payment"
    elif confirmed >= required:
        # the confirmed payments alone cover it: a further payment still unconfirmed (a dust
        # transfer from anyone, the address is public; a low-fee one stuck in a mempool)
        # neither holds it back nor fails it at monitor_until
        status = "completed"
    elif current == "completed" or confirmed_once:
        status = "awaiting_confirmation"  # the confirmed payments no longer cover it (a reorg)
    elif now >= terms.monitor_until:
        status = "failed"
    else:
        status = "awaiting_confirmation"
    return Outcome(status=status, received=received, confirmed=confirmed, partial=partial,
                   overpaid=overpaid, late=late, paid_at=paid_at)


def timed_status(terms: InvoiceTerms, current: str, now: int, *, confirmed_once: bool = False) -> str | None:
    """The status the clock alone moves an invoice to at ``now``, or None: an unpaid invoice
    expires at ``expires_at``; a paid, unconfirmed one fails at ``monitor_until`` unless it
    completed once (its payment, moved by a reorg, confirmed in time)."""
    if current == "awaiting_payment" and now >= terms.expires_at:
        return "expired"
    if current == "awaiting_confirmation" and now >= terms.monitor_until and not confirmed_once:
        return "failed"
    return None
