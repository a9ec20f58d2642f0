"""The public JSON shape of every object: what the API answers and what events carry.

The store keeps and returns typed rows; this module alone turns them into the documented
shapes (amounts as decimal strings in asset units next to base units, addresses in display
form, times in RFC 3339). The render functions are pure (a row and the chain's config in, a
dict out), so an event written inside a transaction and the API's answer afterwards are the
same shape by construction. :class:`Views` reads rows from the store and renders them, and
raises the "not found" and "bad filter" errors the API answers with.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import BadRequest, NotFound
from .money import format_amount

if TYPE_CHECKING:
    from .chains import ChainSpec, StoredTx
    from .config import ChainConfig
    from .store import Store
    from .store.addresses import WatchedAddress
    from .store.audit import AuditEntry
    from .store.events import Event
    from .store.invoices import InvoiceRow
    from .store.payouts import PayoutRow
    from .store.sweeps import SweepRow
    from .store.transfers import TransferRow
    from .store.webhooks import AttemptRow, DeliveryRow, WebhookRow

Json = dict[str, Any]


def iso_ms(ms: int | None) -> str | None:
    """Milliseconds since the epoch to RFC 3339 UTC (``2026-11-22T02:40:35.123Z``)."""
    return None if ms is None else _iso_ms(ms)


def _iso_ms(ms: int) -> str:
    seconds, frac = divmod(ms, 1000)
    return f"{_iso_s(seconds)}.{_MILLIS[frac]}Z"


_MILLIS = [f"{n:03d}" for n in range(1000)]


@functools.lru_cache(maxsize=4096)  # a batch's events share their few seconds (its `now`, its blocks')
def _iso_s(seconds: int) -> str:
    t = time.gmtime(seconds)  # (half the cost of datetime + strftime; a few per event)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


def _decimals(cfg: ChainConfig | None, symbol: str) -> int:
    asset = cfg.asset(symbol) if cfg else None
    return asset.decimals if asset else 0


def _contract(cfg: ChainConfig | None, symbol: str) -> str | None:
    asset = cfg.asset(symbol) if cfg else None
    return cfg.spec.display_address(asset.contract) if cfg and asset and asset.contract else None


def _confirmations(status: str, block_number: int | None, tip: int) -> int:
    """0 when orphaned or not in a block yet (seen in the mempool)."""
    return 0 if status == "orphaned" or block_number is None else max(0, tip - block_number + 1)


# --- render: rows in, JSON out ------------------------------------------------------------------


def transfer(cfg: ChainConfig | None, t: TransferRow, *, tip: int) -> Json:
    decimals = _decimals(cfg, t.asset)
    spec = cfg.spec if cfg else None

    def shown(address: str) -> str:
        return spec.display_address(address) if spec else address

    return {
        "id": t.id, "chain": t.chain, "txid": t.txid, "index": t.index, "kind": t.kind, "asset": t.asset,
        "contract": _contract(cfg, t.asset),
        "amount": format_amount(t.amount, decimals), "base_units": str(t.amount), "decimals": decimals,
        "address": shown(t.address), "label": t.label, "invoice_id": t.invoice_id, "order_id": t.order_id,
        "from": shown(t.sender) if t.sender else None,
        "block_number": t.block_number, "block_hash": t.block_hash, "block_time": None if t.block_time is None else iso_ms(t.block_time * 1000),
        "status": t.status, "confirmations": _confirmations(t.status, t.block_number, tip),
        "required_confirmations": max(cfg.confirmations, t.min_depth) if cfg else None,
        "detected_at": iso_ms(t.detected_at), "confirmed_at": iso_ms(t.confirmed_at),
        "orphaned_at": iso_ms(t.orphaned_at),
        # its worth in [rates] reference at the rate of its detection; null: no rate then
        "value": t.value,
    }


def _received_value(inv: InvoiceRow, payments: Sequence[TransferRow]) -> Json | None:
    """What the live payments were worth in the reference currency when each arrived (the sum
    of their values); null when there are none, or one of them had no rate."""
    from decimal import Decimal

    live = [p for p in payments if p.counts and p.detected_at <= inv.monitor_until]
    if not live or any(p.value is None for p in live):
        return None
    currencies = {p.value["currency"] for p in live if p.value}
    if len(currencies) != 1:
        return None
    total = sum((Decimal(p.value["amount"]) for p in live if p.value), Decimal(0))
    text = format(total, "f")
    return {"currency": currencies.pop(), "amount": text.rstrip("0").rstrip(".") if "." in text else text}


#: The link fields every invoice shows (null unless a plugin provides it: watcher_invoice_links).
INVOICE_LINKS = ("checkout_url",)


def invoice(cfg: ChainConfig, inv: InvoiceRow, payments: Sequence[TransferRow], *, tip: int,
            refunds: Sequence[PayoutRow] = (), links: Mapping[str, str] | None = None) -> Json:
    decimals = _decimals(cfg, inv.asset)
    return {
        "id": inv.id, "chain": inv.chain, "asset": inv.asset, "contract": _contract(cfg, inv.asset),
        "decimals": decimals, "mode": inv.mode,
        "amount": None if inv.amount is None else format_amount(inv.amount, decimals),
        "base_units": None if inv.amount is None else str(inv.amount),
        "tolerance": format_amount(inv.tolerance_ppm, 6),
        "address": cfg.spec.display_address(inv.address), "payment_uri": inv.payment_uri,
        "status": inv.status, "partial": inv.partial, "overpaid": inv.overpaid, "late": inv.late,
        "received": format_amount(inv.received, decimals), "confirmed": format_amount(inv.confirmed, decimals),
        # what is left of the amount (the tolerance decides the status, it is no discount)
        "due": format_amount(max(0, inv.amount - inv.received) if inv.amount is not None else 0, decimals),
        "required_confirmations": cfg.confirmations, "order_id": inv.order_id, "metadata": inv.metadata,
        # priced in a currency: the price and the rate locked at creation (null in asset units)
        "price": inv.pricing["price"] if inv.pricing else None,
        "rate": inv.pricing["rate"] if inv.pricing else None,
        "received_value": _received_value(inv, payments),
        # refunds: payouts linked to the invoice; refunded_amount is what the completed ones paid
        "refunded_amount": format_amount(inv.refunded, decimals),
        "partially_refunded": 0 < inv.refunded < inv.confirmed,
        "refunds": [{"payout_id": r.id, "amount": format_amount(r.amount, decimals), "to": cfg.spec.display_address(
            r.to_address), "status": r.status, "txid": r.txid} for r in refunds],
        "payments": [{
            "transfer_id": p.id, "txid": p.txid, "index": p.index, "amount": format_amount(p.amount, decimals),
            "status": p.status, "block_number": p.block_number, "value": p.value,
            "confirmations": _confirmations(p.status, p.block_number, tip),
            "counted": p.counts and p.detected_at <= inv.monitor_until,
            "detected_at": iso_ms(p.detected_at)} for p in payments],
        "created_at": iso_ms(inv.created_at), "expires_at": iso_ms(inv.expires_at),
        "monitor_until": iso_ms(inv.monitor_until), "paid_at": iso_ms(inv.paid_at),
        "completed_at": iso_ms(inv.completed_at), "redirect_url": inv.redirect_url,
        **{name: (links or {})[name].replace("{id}", inv.id) if name in (links or {}) else None
           for name in INVOICE_LINKS},
    }


def tx(spec: ChainSpec, t: StoredTx) -> Json:
    """One of watcher's own transactions, with its family's fields (EVM: nonce and fees)."""
    return {"txid": t.txid, "purpose": t.purpose, **spec.tx_fields(t.details), "status": t.status,
            "block_number": t.block_number, "fee_paid": None if t.fee_paid is None else str(t.fee_paid),
            "error": t.error, "created_at": iso_ms(t.created_at), "broadcast_at": iso_ms(t.broadcast_at)}


def payout(cfg: ChainConfig, p: PayoutRow, txs: Sequence[StoredTx]) -> Json:
    decimals = _decimals(cfg, p.asset)
    spec = cfg.spec
    return {
        "id": p.id, "chain": p.chain, "asset": p.asset, "amount": format_amount(p.amount, decimals),
        "base_units": str(p.amount), "decimals": decimals, "to": spec.display_address(p.to_address),
        "label": p.label, "idempotency_key": p.idempotency_key, "metadata": p.metadata,
        "status": p.status, "reason": p.reason, "txid": p.txid, **spec.payout_fields(txs),
        "block_number": p.block_number,
        "fee_paid": None if p.fee_paid is None else format_amount(p.fee_paid, cfg.native_decimals),
        "transactions": [tx(spec, t) for t in txs],
        "created_by": p.created_by, "approved_by": p.approved_by, "invoice_id": p.invoice_id,
        "created_at": iso_ms(p.created_at), "approved_at": iso_ms(p.approved_at),
        "broadcast_at": iso_ms(p.broadcast_at), "completed_at": iso_ms(p.completed_at),
    }


def sweep(cfg: ChainConfig, s: SweepRow, txs: Sequence[StoredTx], deposits: Sequence[str],
          addresses: Sequence[str]) -> Json:
    spec = cfg.spec
    nd = cfg.native_decimals

    def native(v: int | None) -> str | None:
        return None if v is None else format_amount(v, nd)

    topups = [t for t in txs if t.purpose == "topup"]
    # one amount per conflict group (a replacement moves the same), refused ones left out
    topup_amount = sum({t.conflict: t.amount for t in topups if t.status != "failed" or t.block_number}.values())
    topup_fees = [t.fee_paid for t in topups if t.fee_paid is not None]
    return {
        "id": s.id, "chain": s.chain, "asset": s.asset,
        "address": spec.display_address(s.address) if len(addresses) == 1 else None,
        "addresses": [spec.display_address(a) for a in addresses], "to": spec.display_address(s.to_address),
        "amount": format_amount(s.amount, _decimals(cfg, s.asset)), "base_units": str(s.amount),
        "status": s.status, "reason": s.reason, "txid": s.txid,
        "topup_amount": native(topup_amount) if topups else None, "topup_txid": topups[-1].txid if topups else None,
        "fee_paid": native(s.fee_paid), "topup_fee_paid": native(sum(topup_fees)) if topup_fees else None,
        "dust": native(s.dust), "deposits": list(deposits), "transactions": [tx(spec, t) for t in txs],
        "created_at": iso_ms(s.created_at), "confirmed_at": iso_ms(s.confirmed_at),
    }


def address(spec: ChainSpec, a: WatchedAddress, cfg: ChainConfig | None = None,
            totals: Mapping[str, Mapping[str, int]] | None = None) -> Json:
    out: Json = {
        "chain": a.chain, "address": spec.display_address(a.address), "kind": a.kind, "label": a.label,
        "invoice_id": a.invoice_id,
        "derivation_path": None if a.derivation_index is None else f"{spec.keys.deposit_path}/0/{a.derivation_index}",
    }
    if totals is not None:
        out["totals"] = {
            sym: {"confirmed": format_amount(t["confirmed"], _decimals(cfg, sym)),
                  "pending": format_amount(t["pending"], _decimals(cfg, sym)), "transfers": t["count"]}
            for sym, t in totals.items()}
    return out


def webhook(w: WebhookRow, counts: Mapping[str, int], statuses: Sequence[str]) -> Json:
    return {
        "id": w.id, "url": w.url, "events": list(w.events), "description": w.description, "status": w.status,
        "disabled_reason": w.disabled_reason, "last_sequence": w.last_seq,
        "deliveries": {s: counts.get(s, 0) for s in statuses},
        "secret_rotating_until": iso_ms(w.old_secret_until) if w.rotating else None,
        "created_at": iso_ms(w.created_at),
    }


def delivery(d: DeliveryRow, event_type: str | None, attempts: Sequence[AttemptRow] | None = None) -> Json:
    out: Json = {
        "id": d.id, "webhook_id": d.webhook_id, "event_id": d.event_id, "event_type": event_type,
        "sequence": d.seq, "status": d.status, "attempts": d.attempts,
        "next_attempt_at": iso_ms(d.next_attempt_at), "last_status_code": d.last_status,
        "last_error": d.last_error, "created_at": iso_ms(d.created_at), "delivered_at": iso_ms(d.delivered_at),
    }
    if attempts is not None:
        out["attempt_log"] = [{"attempt": a.attempt, "at": iso_ms(a.at), "status_code": a.status_code,
                               "latency_ms": a.latency_ms, "error": a.error, "response": a.response}
                              for a in attempts]
    return out


def event(e: Event) -> Json:
    """An event as ``GET /v1/events`` lists it: its id and sequence number, then the body a
    webhook carries (``type``, ``timestamp``, ``data``)."""
    return {"id": e.id, "seq": e.seq, "type": e.type, "timestamp": iso_ms(e.created_at), "data": e.data}


def event_json(e: Event) -> bytes:
    """:func:`event` as compact JSON (ASCII, the data's keys sorted), with the data's stored
    text spliced in instead of parsed and rendered again: the same bytes as
    ``json.dumps(event(e), separators=(",", ":"))``, at a fraction of the cost."""
    head = json.dumps({"id": e.id, "seq": e.seq, "type": e.type, "timestamp": iso_ms(e.created_at)},
                      separators=(",", ":"))
    return f'{head[:-1]},"data":{e.data_json}}}'.encode()


def audit_entry(e: AuditEntry) -> Json:
    return {"id": e.id, "at": iso_ms(e.at), "actor": e.actor, "key_id": e.key_id, "action": e.action,
            "object_id": e.object_id, "details": e.details}


def check_status(status: str | None, statuses: Sequence[str]) -> None:
    if status is not None and status not in statuses:
        raise BadRequest(f"status must be one of {', '.join(statuses)}", code="invalid_status")


# --- reading and rendering ------------------------------------------------------------------------

T = TypeVar("T")


def _found(row: T | None, kind: str, ident: str) -> T:
    """The row, or ``NotFound`` (404, ``unknown_<kind>``) naming what was asked for."""
    if row is None:
        raise NotFound(f"no {kind} {ident[:64]!r}", code=f"unknown_{kind}")
    return row



class Views:
    """Objects by id and pages of them, as the API shows them. ``NotFound`` for an unknown id,
    ``BadRequest`` for an unknown status filter."""

    def __init__(self, store: Store):
        self.store = store
        self.config = store.config

    # transfers
    def transfer(self, transfer_id: str) -> Json:
        row = self.store.transfers.row(transfer_id)
        if row is None:
            raise NotFound(f"no transfer {transfer_id[:64]!r}")
        return transfer(self.config.chain(row.chain), row, tip=self.store.chains.scanned_number(row.chain))

    def transfers(self, *, chain: str | None = None, address: str | None = None, status: str | None = None,
                  since: int | None = None, after: str | None = None, limit: int = 100) -> tuple[list[Json], str | None]:
        from .store.transfers import STATUSES

        check_status(status, STATUSES)
        rows, cursor = self.store.transfers.page(chain=chain, address=address, status=status, since=since,
                                                 after=after, limit=limit)
        tips: dict[str, int] = {}
        for r in rows:
            if r.chain not in tips:
                tips[r.chain] = self.store.chains.scanned_number(r.chain)
        return [transfer(self.config.chain(r.chain), r, tip=tips[r.chain]) for r in rows], cursor

    # invoices
    def render_invoice(self, row: InvoiceRow) -> Json:
        return self.store.invoices.render(row)

    def invoice(self, invoice_id: str) -> Json:
        return self.render_invoice(_found(self.store.invoices.row(invoice_id), "invoice", invoice_id))

    def invoices(self, *, status: str | None = None, order_id: str | None = None, chain: str | None = None,
                 after: str | None = None, limit: int = 100) -> tuple[list[Json], str | None]:
        from .invoicing import STATUSES

        check_status(status, STATUSES)
        rows, cursor = self.store.invoices.page(status=status, order_id=order_id, chain=chain, after=after,
                                                limit=limit)
        return [self.render_invoice(r) for r in rows], cursor

    # payouts
    def render_payout(self, row: PayoutRow) -> Json:
        return self.store.payouts.render(row)

    def payout(self, payout_id: str) -> Json:
        return self.render_payout(_found(self.store.payouts.row(payout_id), "payout", payout_id))

    def payouts(self, *, status: str | None = None, label: str | None = None, chain: str | None = None,
                after: str | None = None, limit: int = 100) -> tuple[list[Json], str | None]:
        from .store.payouts import STATUSES

        check_status(status, STATUSES)
        rows, cursor = self.store.payouts.page(status=status, label=label, chain=chain, after=after, limit=limit)
        return [self.render_payout(r) for r in rows], cursor

    # sweeps
    def render_sweep(self, row: SweepRow) -> Json:
        return self.store.sweeps.render(row)

    def sweep(self, sweep_id: str) -> Json:
        return self.render_sweep(_found(self.store.sweeps.row(sweep_id), "sweep", sweep_id))

    def sweeps(self, *, status: str | None = None, chain: str | None = None, after: str | None = None,
               limit: int = 100) -> tuple[list[Json], str | None]:
        from .store.sweeps import STATUSES

        check_status(status, STATUSES)
        rows, cursor = self.store.sweeps.page(status=status, chain=chain, after=after, limit=limit)
        return [self.render_sweep(r) for r in rows], cursor

    # addresses
    def address(self, a: WatchedAddress, *, totals: bool = False) -> Json:
        cfg = self.store.chain_config(a.chain)
        return address(cfg.spec, a, cfg, self.store.addresses.totals(a.chain, a.address) if totals else None)

    # webhooks
    def webhook_row(self, webhook_id: str) -> WebhookRow:
        return _found(self.store.webhooks.row(webhook_id), "webhook", webhook_id)

    def render_webhook(self, row: WebhookRow) -> Json:
        from .store.webhooks import DELIVERY_STATUSES

        return webhook(row, self.store.webhooks.delivery_counts(row.id), DELIVERY_STATUSES)

    def webhook(self, webhook_id: str) -> Json:
        return self.render_webhook(self.webhook_row(webhook_id))

    def webhooks(self, *, after: str | None = None, limit: int = 100) -> tuple[list[Json], str | None]:
        rows, cursor = self.store.webhooks.page(after=after, limit=limit)
        return [self.render_webhook(r) for r in rows], cursor

    def render_delivery(self, row: DeliveryRow, *, attempts: bool = False) -> Json:
        return delivery(row, self.store.events.type_of(row.event_id),
                        self.store.webhooks.attempts(row.id) if attempts else None)

    def delivery_row(self, delivery_id: str) -> DeliveryRow:
        return _found(self.store.webhooks.delivery(delivery_id), "delivery", delivery_id)

    def deliveries(self, webhook_id: str, *, status: str | None = None, after: str | None = None,
                   limit: int = 100) -> tuple[list[Json], str | None]:
        from .store.webhooks import DELIVERY_STATUSES

        self.webhook_row(webhook_id)
        check_status(status, DELIVERY_STATUSES)
        rows, cursor = self.store.webhooks.deliveries(webhook_id, status=status, after=after, limit=limit)
        return [self.render_delivery(r, attempts=True) for r in rows], cursor

    # audit
    def audit(self, *, object_id: str | None = None, key_id: str | None = None, after: int = 0,
              limit: int = 100) -> list[Json]:
        return [audit_entry(e) for e in self.store.audit.entries(object_id=object_id, key_id=key_id, after=after,
                                                                 limit=limit)]
