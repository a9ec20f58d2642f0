"""Money going out: payouts, sweeps, and the admin kill switch."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from ..checks import DailyLimits, PayoutRequest, Veto, counted_again
from ..errors import BadRequest, Conflict, Forbidden, NotFound, WatcherError, WatchOnlyError
from ..policy import PAUSE_SCOPES
from ..store.payouts import STATUSES as PAYOUT_STATUSES
from ..store.sweeps import STATUSES as SWEEP_STATUSES
from .core_routes import (
    api_amount,
    canonical_address,
    chain_param,
    optional_label,
    reject_unknown_fields,
)
from .invoice_routes import MAX_METADATA_BYTES, check_metadata
from .routing import ApiRequest, Endpoints

if TYPE_CHECKING:
    from ..config import AssetConfig, ChainConfig

log = logging.getLogger(__name__)
endpoints = Endpoints()

KEY_RE = re.compile(r"[\x21-\x7e]{1,128}")  # fullmatch
_payout = {"$ref": "#/components/schemas/Payout"}
_sweep = {"$ref": "#/components/schemas/Sweep"}
_scope = {"type": "string", "enum": [*PAUSE_SCOPES, "all"]}
_list_query = ({"name": "chain", "in": "query", "required": False, "schema": {"$ref": "#/components/schemas/ChainId"}},
               {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
               {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}})


class PayoutRejected(WatcherError):
    """A payout check vetoed the payout."""

    status = 422
    code = "payout_rejected"


class PayoutCheckFailed(WatcherError):
    """A payout check raised: the payout is refused (fail closed)."""

    status = 503
    code = "payout_check_failed"


@endpoints.add(
    "POST", "/v1/payouts", scope="payouts", moves_money=True, summary="Request a payout (withdrawal) from the hot wallet; idempotent on idempotency_key.",
    tag="payouts", errors=(400, 409, 422, 503),
    body={"type": "object", "required": ["chain", "asset", "amount", "to", "idempotency_key"],
          "additionalProperties": False, "properties": {
              "chain": {"$ref": "#/components/schemas/ChainId"},
              "asset": {"$ref": "#/components/schemas/AssetSymbol"},
              "amount": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
              "to": {"type": "string", "minLength": 1},
              "idempotency_key": {"type": "string", "pattern": r"^[\x21-\x7e]{1,128}$"},
              "label": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f]+$"},
              "metadata": {"type": "object", "description": f"any JSON object up to {MAX_METADATA_BYTES} bytes"}}},
    responses={202: _payout})
async def create_payout(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"chain", "asset", "amount", "to", "idempotency_key", "label", "metadata"})
    cfg = chain_param(req, body.get("chain"))
    asset_name = body.get("asset")
    asset = cfg.asset(asset_name) if isinstance(asset_name, str) else None
    if asset is None:
        shown = repr(asset_name[:32]) if isinstance(asset_name, str) else f"of type {type(asset_name).__name__}"
        raise BadRequest(f"unknown asset {shown} on chain {cfg.id!r}", code="unknown_asset")
    amount = api_amount(body.get("amount"), asset.decimals)
    to = canonical_address(req, cfg.id, body.get("to"))
    label = optional_label(body.get("label"))
    metadata = check_metadata(body.get("metadata", {}))
    return await make_payout(req, cfg, asset, amount, to, body.get("idempotency_key"), label, metadata)


async def make_payout(req: ApiRequest, cfg: ChainConfig, asset: AssetConfig, amount: int, to: str, key: Any,
                      label: str | None, metadata: dict[str, Any], *, invoice_id: str | None = None,
                      before_write: Callable[[], None] | None = None) -> Any:
    """A payout (or a refund: ``invoice_id``) through every check, limit, approval rule and
    the kill switch; ``before_write`` runs inside the transaction before it is written."""
    store = req.daemon.store
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise BadRequest("idempotency_key must be 1-128 printable ASCII characters without spaces",
                         code="invalid_idempotency_key")
    if store.hot_wallet(cfg.id) is None:
        raise WatchOnlyError("watcher runs watch-only (keys.xpub): payouts need the seed")
    if not cfg.spec.sends:
        raise BadRequest(f"chain {cfg.id!r}: the {cfg.family} family cannot send yet", code="cannot_send",
                         status=409)
    existing = store.payouts.by_key(key)
    request = PayoutRequest(chain=cfg.id, asset=asset.symbol, amount=amount, to=to, label=label,
                            decimals=asset.decimals, metadata=metadata)
    if existing is None:  # checks judge new payouts only: a replay must not count itself twice
        veto = await run_checks(req, request)
        if veto is not None:
            raise PayoutRejected(veto.reason, code=veto.code if veto.code != "payout_rejected" else None)
    threshold = cfg.payouts.approval_above.get(asset.symbol)
    with store.db.transaction():
        if store.payouts.by_key(key) is None:  # (another request may have written it meanwhile)
            veto = counted_again(request, req.daemon)
            if veto is not None:
                raise PayoutRejected(veto.reason, code=veto.code)
            if before_write is not None:
                before_write()
        row, created = store.payouts.create(chain=cfg.id, asset=asset.symbol, amount=amount, to=to,
                                            idempotency_key=key, label=label, metadata=metadata, actor=req.actor,
                                            needs_approval=threshold is not None and amount > threshold,
                                            invoice_id=invoice_id)
        view = store.payouts.render(row)
        if created:
            store.audit.record(req.actor, "invoice.refund" if invoice_id else "payout.create", invoice_id or row.id,
                               {"chain": cfg.id, "asset": asset.symbol, "amount": view["amount"], "to": view["to"],
                                **({"payout_id": row.id} if invoice_id else {})})
    headers = {} if created else {"idempotent-replayed": "true"}
    return JSONResponse(view, status_code=202, headers=headers)


@endpoints.add(
    "POST", "/v1/invoices/{id}/refund", scope="payouts", moves_money=True, tag="invoices", errors=(400, 404, 409, 422, 503),
    summary="Refund an invoice: a payout linked to it (every payout check, limit, approval rule and the kill switch "
            "apply); amount omitted: an overpaid invoice's excess, else everything confirmed not yet refunded.",
    body={"type": "object", "required": ["to", "idempotency_key"], "additionalProperties": False, "properties": {
        "to": {"type": "string", "minLength": 1},
        "amount": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
        "idempotency_key": {"type": "string", "pattern": r"^[\x21-\x7e]{1,128}$"},
        "metadata": {"type": "object"}}},
    responses={202: _payout})
async def refund_invoice(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"to", "amount", "idempotency_key", "metadata"})
    store = req.daemon.store
    inv = store.invoices.row(req.path_params["id"])
    if inv is None:
        raise NotFound(f"no invoice {req.path_params['id'][:64]!r}", code="unknown_invoice")
    cfg = store.chain_config(inv.chain)
    asset = cfg.asset(inv.asset)
    assert asset is not None
    to = canonical_address(req, cfg.id, body.get("to"))
    metadata = check_metadata(body.get("metadata", {}))
    key = body.get("idempotency_key")
    earlier = store.payouts.by_key(key) if isinstance(key, str) else None
    if earlier is not None and earlier.invoice_id == inv.id:
        # a retry: answered with the refund it made, whatever was refunded since (an amount
        # left out means the one worked out then; a different one is a reused key)
        amount = api_amount(body["amount"], asset.decimals) if body.get("amount") is not None else earlier.amount
        return await make_payout(req, cfg, asset, amount, to, key, None, {**metadata, "refund_of": inv.id},
                                 invoice_id=inv.id)
    left = store.invoices.refundable(inv)
    if body.get("amount") is not None:
        amount = api_amount(body["amount"], asset.decimals)
    elif inv.overpaid and inv.amount is not None:
        # the excess, to the base unit, less every refund made or under way (a second
        # "refund the excess" has nothing left to pay, not the excess again)
        amount = left - inv.amount
    else:
        amount = left
    if amount <= 0:
        raise Conflict(f"invoice {inv.id} has nothing confirmed left to refund", code="nothing_to_refund")

    def within_what_was_received() -> None:  # checked again where it is written
        fresh = store.invoices.row(inv.id)
        assert fresh is not None
        left = store.invoices.refundable(fresh)
        if amount > left:
            raise Conflict(f"a refund of {asset.symbol} base units {amount} is more than invoice {inv.id} received "
                           f"and has not refunded yet ({left})", code="refund_exceeds_received")

    within_what_was_received()
    return await make_payout(req, cfg, asset, amount, to, body.get("idempotency_key"), None,
                             {**metadata, "refund_of": inv.id}, invoice_id=inv.id, before_write=within_what_was_received)


async def run_checks(req: ApiRequest, request: PayoutRequest) -> Veto | None:
    """Every ``watcher_payout_check``, one at a time in pluggy's order, until one vetoes."""
    for impl in req.daemon.payout_checks:
        try:
            result = await impl.call(payout=request, daemon=req.daemon)
        except Exception:
            log.exception("payout check %s failed", impl.plugin_name)
            raise PayoutCheckFailed(f"payout check {impl.plugin_name!r} failed; the payout was refused") from None
        if result is not None:
            return result
    return None


@endpoints.add("GET", "/v1/payouts/{id}", summary="One payout with its transactions.", tag="payouts", errors=(404,),
               responses={200: _payout})
async def get_payout(req: ApiRequest) -> Any:
    return req.daemon.views.payout(req.path_params["id"])


@endpoints.add("GET", "/v1/payouts", summary="Payouts, oldest first.", tag="payouts", errors=(400,),
               query=({"name": "status", "in": "query", "required": False,
                       "schema": {"type": "string", "enum": list(PAYOUT_STATUSES)}},
                      {"name": "label", "in": "query", "required": False, "schema": {"type": "string"}}, *_list_query),
               responses={200: {"type": "object"}})
async def list_payouts(req: ApiRequest) -> Any:
    chain = req.query("chain")
    if chain is not None:
        chain_param(req, chain)
    items, cursor = req.daemon.views.payouts(status=req.query("status"), label=req.query("label"), chain=chain,
                                                  after=req.query("cursor"),
                                                  limit=req.query_int("limit", 100, lo=1, hi=1000))
    return {"items": items, "next_cursor": cursor}


@endpoints.add("POST", "/v1/payouts/{id}/approve", scope="approve", summary="Approve a payout above the approval threshold.",
               tag="payouts", errors=(404, 409), responses={200: _payout})
async def approve_payout(req: ApiRequest) -> Any:
    store = req.daemon.store
    waiting = store.payouts.row(req.path_params["id"])
    if waiting is not None and waiting.status == "awaiting_approval":
        # a payout waiting for approval did not count towards the daily limits: it does now
        cfg = store.chain_config(waiting.chain)
        asset = cfg.asset(waiting.asset)
        veto = DailyLimits().watcher_payout_check(PayoutRequest(
            chain=waiting.chain, asset=waiting.asset, amount=waiting.amount, to=waiting.to_address,
            label=waiting.label, decimals=asset.decimals if asset else 0), req.daemon)
        if veto is not None:
            raise PayoutRejected(f"cannot approve now: {veto.reason}", code=veto.code)
    with store.db.transaction():
        row = store.payouts.approve(req.path_params["id"], req.actor)
        if row is None:
            raise NotFound(f"no payout {req.path_params['id'][:64]!r}", code="unknown_payout")
        store.audit.record(req.actor, "payout.approve", row.id)
    return store.payouts.render(row)


@endpoints.add("POST", "/v1/payouts/{id}/cancel", scope="payouts", summary="Cancel a payout that has not been broadcast.",
               tag="payouts", errors=(404, 409), responses={200: _payout})
async def cancel_payout(req: ApiRequest) -> Any:
    store = req.daemon.store
    with store.db.transaction():
        existing = store.payouts.row(req.path_params["id"])
        if existing is not None and not req.actor.owns(existing.owner):
            raise Forbidden(f"payout {existing.id} was created by another key; only it (or an admin key) may cancel "
                            "it", code="not_owner")
        row = store.payouts.cancel(req.path_params["id"])
        if row is None:
            raise NotFound(f"no payout {req.path_params['id'][:64]!r}", code="unknown_payout")
        store.audit.record(req.actor, "payout.cancel", row.id)
    return store.payouts.render(row)


@endpoints.add("GET", "/v1/sweeps", summary="Sweeps to the treasury, with transactions and fees paid.",
               tag="sweeps", errors=(400,),
               query=({"name": "status", "in": "query", "required": False,
                       "schema": {"type": "string", "enum": list(SWEEP_STATUSES)}}, *_list_query),
               responses={200: {"type": "object"}})
async def list_sweeps(req: ApiRequest) -> Any:
    chain = req.query("chain")
    if chain is not None:
        chain_param(req, chain)
    items, cursor = req.daemon.views.sweeps(status=req.query("status"), chain=chain, after=req.query("cursor"),
                                                 limit=req.query_int("limit", 100, lo=1, hi=1000))
    return {"items": items, "next_cursor": cursor}


@endpoints.add("POST", "/v1/sweeps/run", scope="sweeps", summary="Plan sweeps now (all chains, or one) instead of at the next interval.",
               tag="sweeps", errors=(400, 409),
               body={"type": "object", "additionalProperties": False,
                     "properties": {"chain": {"$ref": "#/components/schemas/ChainId"}}},
               responses={202: {"type": "object"}})
async def run_sweeps(req: ApiRequest) -> Any:
    body = await req.json(optional=True)
    reject_unknown_fields(body, {"chain"})
    daemon = req.daemon
    chains = [chain_param(req, body["chain"]).id] if "chain" in body else list(daemon.senders)
    if daemon.keyring.watch_only:
        raise WatchOnlyError("watcher runs watch-only (keys.xpub): sweeps need the seed")
    enabled = [c for c in chains if daemon.store.chain_config(c).sweep.enabled]
    if not enabled:
        raise BadRequest("no [chains.sweep] treasury is configured for " + ", ".join(chains), code="sweeps_off",
                         status=409)
    if "sweeps" in daemon.store.paused():
        raise BadRequest("sweeps are paused (POST /v1/admin/resume)", code="paused", status=409)
    for c in enabled:
        daemon.senders[c].sweeper.request()
    daemon.store.audit.record(req.actor, "sweeps.run", None, {"chains": enabled})
    return 202, {"requested": enabled}


def _scopes(body: dict[str, Any]) -> set[str]:
    reject_unknown_fields(body, {"scope"})
    scope = body.get("scope")
    if scope not in (*PAUSE_SCOPES, "all"):
        raise BadRequest(f"scope must be one of {', '.join((*PAUSE_SCOPES, 'all'))}", code="invalid_scope")
    return set(PAUSE_SCOPES) if scope == "all" else {scope}


@endpoints.add("POST", "/v1/admin/pause", scope="admin", summary="Kill switch: hold payouts, sweeps or all (nothing is dropped).",
               tag="admin", body={"type": "object", "required": ["scope"], "additionalProperties": False,
                                              "properties": {"scope": _scope}},
               responses={200: {"type": "object"}})
async def pause(req: ApiRequest) -> Any:
    scopes = _scopes(await req.json())
    store = req.daemon.store
    with store.db.transaction():
        paused = store.set_paused(scopes, paused=True)
        store.audit.record(req.actor, "admin.pause", None, {"scopes": sorted(scopes)})
    log.warning("paused %s by %s", ", ".join(sorted(scopes)), req.actor)
    return {"paused": sorted(paused)}


@endpoints.add("POST", "/v1/admin/resume", scope="admin", summary="Release what pause held.", tag="admin",
               errors=(409,), body={"type": "object", "required": ["scope"], "additionalProperties": False,
                                    "properties": {"scope": _scope}},
               responses={200: {"type": "object"}})
async def resume(req: ApiRequest) -> Any:
    scopes = _scopes(await req.json())
    store = req.daemon.store
    held = scopes & req.daemon.config.paused
    if held:
        raise BadRequest(f"{', '.join(sorted(held))} paused by the config file ([admin] paused); edit it and restart",
                         code="paused_by_config", status=409)
    with store.db.transaction():
        paused = store.set_paused(scopes, paused=False)
        store.audit.record(req.actor, "admin.resume", None, {"scopes": sorted(scopes)})
    log.warning("resumed %s by %s", ", ".join(sorted(scopes)), req.actor)
    return {"paused": sorted(paused)}


@endpoints.add("GET", "/v1/admin/status", scope="admin", summary="What is paused, and the hot wallets.", tag="admin",
               responses={200: {"type": "object"}})
async def admin_status(req: ApiRequest) -> Any:
    store = req.daemon.store
    hot = {c: store.hot_wallet(c) for c in req.daemon.senders}
    return {"paused": sorted(store.paused()), "paused_by_config": sorted(req.daemon.config.paused),
            "hot_wallets": {c: None if a is None else store.spec(c).display_address(a) for c, a in hot.items()}}
