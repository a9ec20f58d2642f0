"""Invoices (pay orders): create, read, list, and point at a payment (submit-tx)."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from ..errors import BadRequest, Conflict, InvalidAmount, NodeError, NotFound, WatcherError
from ..invoicing import MODES, STATUSES
from ..rates import amount_for_price, decimal_text, split_pair
from .core_routes import PLAIN_DECIMAL_RE, api_amount, chain_param, reject_unknown_fields
from .routing import ApiRequest, Endpoints

endpoints = Endpoints()

ORDER_ID_RE = re.compile(r"[^\x00-\x1f\x7f]{1,128}")  # fullmatch
MAX_METADATA_BYTES = 8192
MAX_METADATA_DEPTH = 8
MAX_REDIRECT_URL = 2048

_invoice = {"$ref": "#/components/schemas/Invoice"}


class NodeUnavailable(WatcherError):
    """The chain's node cannot be asked right now."""

    status = 503
    code = "node_unavailable"


async def _priced(req: ApiRequest, chain: str, symbol: str, decimals: int, price: tuple[Fraction, str]
                  ) -> tuple[int, dict[str, Any]]:
    """Base units for the price at the current rate (rounded up), and the pricing to keep."""
    value, currency = price
    rate = await req.daemon.rates.get(req.daemon, symbol, currency)
    amount = amount_for_price(value, rate, decimals)
    if amount <= 0:
        raise BadRequest("the price is worth less than the asset's smallest unit", code="invalid_price")
    return amount, {"price": {"amount": decimal_text(value), "currency": currency}, "rate": rate.locked()}


def _usable_quote(req: ApiRequest, quote_id: Any, chain: str, asset: str) -> dict[str, Any]:
    quote = req.daemon.store.invoices.quote(quote_id) if isinstance(quote_id, str) and len(quote_id) < 80 else None
    if quote is None or not req.actor.owns(quote["owner"]):  # another key's quote: not there for this one
        raise NotFound(f"no quote {str(quote_id)[:64]!r}", code="unknown_quote")
    if (quote["chain"], quote["asset"]) != (chain, asset):
        raise BadRequest(f"quote {quote['id']} is for {quote['asset']} on {quote['chain']}", code="invalid_quote")
    if quote["used_by"] is not None:
        raise Conflict(f"quote {quote['id']} was already used by invoice {quote['used_by']}", code="quote_used")
    if quote["expires_at"] <= req.daemon.store.clock.now_ms():
        raise Conflict(f"quote {quote['id']} expired; ask for a new one", code="quote_expired")
    return quote


def check_redirect_url(value: Any) -> str | None:
    """An absolute http(s) URL without credentials, spaces or control characters: the checkout
    page shows it as a link, so ``javascript:`` and friends never get there."""
    if value is None:
        return None
    problem = "redirect_url must be an absolute http or https URL of at most 2048 characters"
    if not isinstance(value, str) or len(value) > MAX_REDIRECT_URL or re.search(r"[\x00-\x20\x7f]", value):
        raise BadRequest(problem, code="invalid_redirect_url")
    try:
        parts = urlsplit(value)
    except ValueError:  # "http://[::1" and the like
        raise BadRequest(problem, code="invalid_redirect_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise BadRequest(problem + " (with a host and no user:password@)", code="invalid_redirect_url")
    return value


def check_price(price: Any) -> tuple[Fraction, str]:
    """``{"amount": "50", "currency": "USD"}`` -> (50, "USD")."""
    if not isinstance(price, dict) or set(price) != {"amount", "currency"}:
        raise BadRequest("price must be {\"amount\": \"50\", \"currency\": \"USD\"}", code="invalid_price")
    amount, currency = price["amount"], price["currency"]
    if not isinstance(amount, str) or not PLAIN_DECIMAL_RE.fullmatch(amount) or len(amount) > 40:
        raise BadRequest("price.amount must be a plain decimal string such as \"49.90\"", code="invalid_price")
    value = Fraction(amount)
    if value <= 0:
        raise BadRequest("price.amount must be above zero", code="invalid_price")
    if not isinstance(currency, str) or not 1 <= len(currency) <= 16 or not currency.isascii() \
            or not currency.isalnum():
        raise BadRequest("price.currency must be a currency code such as \"USD\"", code="invalid_price")
    return value, currency.upper()


def check_metadata(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise BadRequest("metadata must be a JSON object", code="invalid_metadata")
    if len(json.dumps(metadata, ensure_ascii=False).encode()) > MAX_METADATA_BYTES or _depth(metadata) > MAX_METADATA_DEPTH:
        raise BadRequest(f"metadata must be at most {MAX_METADATA_BYTES} bytes and {MAX_METADATA_DEPTH} levels deep",
                         code="invalid_metadata")
    return metadata


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_METADATA_DEPTH:
        return level
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()] or [level + 1])
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value] or [level + 1])
    return level


@endpoints.add(
    "POST", "/v1/invoices", scope="invoices", summary="Create an invoice (pay order) with its own fresh address.", tag="invoices",
    errors=(400, 404, 409, 422, 503),  # 404 unknown_quote, 409 quote_used / quote_expired
    body={"type": "object", "required": ["chain", "asset"], "additionalProperties": False, "properties": {
        "chain": {"$ref": "#/components/schemas/ChainId"},
        "asset": {"$ref": "#/components/schemas/AssetSymbol"},
        "amount": {"type": ["string", "null"], "pattern": r"^[0-9]+(\.[0-9]+)?$",
                   "description": "in asset units, e.g. \"12.5\"; in sale mode, this or price (null: none)"},
        "price": {"type": "object", "required": ["amount", "currency"], "additionalProperties": False,
                  "description": "the price in a currency (e.g. USD): the amount is computed at the current rate, "
                                 "rounded up, and locked",
                  "properties": {"amount": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                 "currency": {"type": "string", "pattern": "^[A-Za-z0-9]{1,16}$"}}},
        "quote_id": {"type": "string", "description": "a quote from POST /v1/quotes: its locked amount, once"},
        "mode": {"type": "string", "enum": list(MODES), "default": "sale"},
        "expires_in": {"type": "integer", "minimum": 60, "description": "seconds until it expires unpaid"},
        "tolerance": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$", "description": "accepted underpayment as a fraction, e.g. \"0.01\""},
        "order_id": {"type": ["string", "null"], "minLength": 1, "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f]+$"},
        "metadata": {"type": "object", "description": f"any JSON object up to {MAX_METADATA_BYTES} bytes"},
        "redirect_url": {"type": ["string", "null"], "maxLength": MAX_REDIRECT_URL, "pattern": "^https?://[^\\x00-\\x20\\x7f]+$",
                         "description": "where the checkout page links the customer once paid (http or https)"},
    }},
    responses={201: _invoice})
async def create_invoice(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"chain", "asset", "amount", "price", "quote_id", "mode", "expires_in", "tolerance",
                                 "order_id", "metadata", "redirect_url"})
    daemon = req.daemon
    cfg = chain_param(req, body.get("chain"))
    asset_name = body.get("asset")
    if not isinstance(asset_name, str) or cfg.asset(asset_name) is None:
        shown = repr(asset_name[:32]) if isinstance(asset_name, str) else f"of type {type(asset_name).__name__}"
        raise BadRequest(f"unknown asset {shown} on chain {cfg.id!r} "
                         f"(configured: {', '.join(a.symbol for a in cfg.assets)})", code="unknown_asset")
    asset = cfg.asset(asset_name)
    mode = body.get("mode", "sale")
    if mode not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)}", code="invalid_mode")
    amount = None
    price = check_price(body["price"]) if "price" in body else None
    if price is not None and (body.get("amount") is not None or mode != "sale"):
        raise BadRequest("price is for a sale-mode invoice without an amount (give one or the other)",
                         code="invalid_price")
    quote = None
    if "quote_id" in body:
        if price is not None or body.get("amount") is not None or mode != "sale":
            raise BadRequest("quote_id is for a sale-mode invoice without amount or price (the quote has them)",
                             code="invalid_quote")
        quote = _usable_quote(req, body["quote_id"], cfg.id, asset.symbol)
    if body.get("amount") is not None:
        amount = api_amount(body["amount"], asset.decimals)
    elif mode == "sale" and price is None and quote is None:
        raise InvalidAmount("amount (or price, or quote_id) is required in sale mode")
    inv_cfg = daemon.config.invoices
    expires_in = body.get("expires_in", inv_cfg.default_expires_in)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or not 60 <= expires_in <= inv_cfg.max_expires_in:
        raise BadRequest(f"expires_in must be an integer number of seconds between 60 and {inv_cfg.max_expires_in}",
                         code="invalid_expires_in")
    tolerance = inv_cfg.default_tolerance_ppm
    if "tolerance" in body:
        try:
            tolerance = api_amount(body["tolerance"], 6, allow_zero=True, what="tolerance")
        except InvalidAmount as e:
            raise BadRequest(e.message, code="invalid_tolerance") from None
        if tolerance > 500_000:
            raise BadRequest("tolerance must be at most 0.5", code="invalid_tolerance")
    order_id = body.get("order_id")
    if order_id is not None and (not isinstance(order_id, str) or not ORDER_ID_RE.fullmatch(order_id)):
        raise BadRequest("order_id must be a string of 1-128 printable characters", code="invalid_order_id")
    metadata = check_metadata(body.get("metadata", {}))
    redirect_url = check_redirect_url(body.get("redirect_url"))
    pricing = None
    if price is not None:  # no rate, no invoice: RateUnavailable is a 503 before anything is written
        amount, pricing = await _priced(req, cfg.id, asset.symbol, asset.decimals, price)
    if quote is not None:
        amount, pricing = quote["amount"], quote["pricing"]
    store = daemon.store
    with store.db.transaction():
        row = store.invoices.create(chain=cfg.id, asset=asset.symbol, amount=amount, mode=mode, expires_in=expires_in,
                                     tolerance_ppm=tolerance, order_id=order_id, metadata=metadata, actor=req.actor.name,
                                     node_info=daemon.watchers[cfg.id].status.node_info, pricing=pricing,
                                     quote_id=quote["id"] if quote else None, redirect_url=redirect_url)
        view = store.invoices.render(row)
        store.audit.record(req.actor, "invoice.create", row.id,
                           {"chain": cfg.id, "asset": asset.symbol, "amount": view["amount"], "order_id": order_id})
    return 201, view


@endpoints.add("GET", "/v1/invoices/{id}", summary="One invoice with its payments.", tag="invoices", errors=(404,),
               responses={200: _invoice})
async def get_invoice(req: ApiRequest) -> Any:
    return req.daemon.views.invoice(req.path_params["id"])


@endpoints.add("GET", "/v1/invoices", summary="Invoices, oldest first, filtered by status and order id.",
               tag="invoices", errors=(400,),
               query=({"name": "status", "in": "query", "required": False, "schema": {"type": "string", "enum": list(STATUSES)}},
                      {"name": "order_id", "in": "query", "required": False, "schema": {"type": "string"}},
                      {"name": "chain", "in": "query", "required": False, "schema": {"$ref": "#/components/schemas/ChainId"}},
                      {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                      {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}}),
               responses={200: {"type": "object", "properties": {"items": {"type": "array", "items": _invoice},
                                                                 "next_cursor": {"type": ["string", "null"]}}}})
async def list_invoices(req: ApiRequest) -> Any:
    chain = req.query("chain")
    if chain is not None:
        chain_param(req, chain)
    items, cursor = req.daemon.views.invoices(
        status=req.query("status"), order_id=req.query("order_id"), chain=chain, after=req.query("cursor"),
        limit=req.query_int("limit", 100, lo=1, hi=1000))
    return {"items": items, "next_cursor": cursor}


@endpoints.add(
    "POST", "/v1/invoices/{id}/submit-tx", scope="invoices",
    summary="Point at the payment's transaction so it is checked now instead of when the scanner reaches it.",
    tag="invoices", errors=(400, 404, 422, 503),
    body={"type": "object", "required": ["txid"], "additionalProperties": False,
          "properties": {"txid": {"type": "string", "minLength": 1}}},
    responses={200: {"type": "object"}, 202: {"type": "object"}})
async def submit_tx(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"txid"})
    store = req.daemon.store
    invoice = req.daemon.views.invoice(req.path_params["id"])
    chain = invoice["chain"]
    spec = store.spec(chain)
    txid = spec.validate_txid(body.get("txid"))
    watcher = req.daemon.watchers[chain]
    client = watcher.client
    if client is None or not watcher.status.node_up:
        raise NodeUnavailable(f"the node of chain {chain!r} is not reachable right now; the scanner will find the "
                              "payment when it is")
    try:
        found = await client.lookup_tx(txid, lambda cands: store.addresses.watched(chain, cands))
    except NodeError as e:
        raise NodeUnavailable(f"asking the node failed: {e.message}") from None
    address = spec.validate_address(invoice["address"])
    if found.status == "failed":
        raise BadRequest("that transaction failed (reverted) on chain; it pays nothing", code="tx_failed", status=422)
    if found.status in ("unknown", "pending"):
        watcher.poke()
        return JSONResponse({"tx": {"txid": txid, "status": found.status}, "invoice": invoice}, status_code=202)
    assert found.block is not None
    mine = [t for t in found.block.transfers if t.to == address and t.asset == invoice["asset"]]
    if not mine:
        raise BadRequest(f"transaction {txid} does not pay {invoice['asset']} to this invoice's address",
                         code="tx_not_for_invoice", status=422)
    with store.db.transaction():  # the payment and its audit entry, or neither
        recorded = store.chains.record_lookup(store.chain_config(chain), found.block)
        if recorded:
            store.audit.record(req.actor, "invoice.submit_tx", invoice["id"], {"txid": txid})
    watcher.poke()
    status = "included" if recorded else "pending"
    return JSONResponse({"tx": {"txid": txid, "status": status, "block_number": found.block.number},
                         "invoice": req.daemon.views.invoice(invoice["id"])}, status_code=200 if recorded else 202)


@endpoints.add("GET", "/v1/rates", summary="The rate of a pair (1 BASE in QUOTE) from the configured sources; "
               "without pair, the reference currency and the configured pairs.", tag="rates", errors=(400, 422, 503),
               query=({"name": "pair", "in": "query", "required": False,
                       "schema": {"type": "string", "pattern": "^[A-Za-z0-9]{1,16}/[A-Za-z0-9]{1,16}$"},
                       "description": "e.g. ETH/USD; derived through the reference currency if not configured"},),
               responses={200: {"type": "object", "properties": {
                   "pair": {"type": "string"}, "rate": {"type": "string"}, "source": {"type": "string"},
                   "updated_at": {"type": "string", "format": "date-time"}}}})
async def get_rate(req: ApiRequest) -> Any:
    rates = req.daemon.rates
    pair = req.query("pair")
    if pair is None:
        return {"reference": rates.reference, "pairs": rates.pairs()}
    try:
        base, quote = split_pair(pair)
    except ValueError as e:
        raise BadRequest(str(e), code="invalid_pair") from None
    return (await rates.get(req.daemon, base, quote)).view()


@endpoints.add("POST", "/v1/quotes", scope="invoices", tag="rates", errors=(400, 422, 503),
               summary="Quote an amount of an asset for a price in a currency, locked for [rates] quote_ttl; an "
                       "invoice created with its quote_id uses that amount, once.",
               body={"type": "object", "required": ["chain", "asset", "price"], "additionalProperties": False,
                     "properties": {"chain": {"$ref": "#/components/schemas/ChainId"},
                                    "asset": {"$ref": "#/components/schemas/AssetSymbol"},
                                    "price": {"type": "object", "required": ["amount", "currency"],
                                              "properties": {"amount": {"type": "string"},
                                                             "currency": {"type": "string"}}}}},
               responses={201: {"type": "object", "properties": {
                   "id": {"type": "string"}, "chain": {"type": "string"}, "asset": {"type": "string"},
                   "amount": {"type": "string"}, "base_units": {"type": "string"}, "price": {"type": "object"},
                   "rate": {"type": "object"}, "expires_at": {"type": "string", "format": "date-time"}}}})
async def create_quote(req: ApiRequest) -> Any:
    from ..money import format_amount
    from ..views import iso_ms

    body = await req.json()
    reject_unknown_fields(body, {"chain", "asset", "price"})
    cfg = chain_param(req, body.get("chain"))
    asset_name = body.get("asset")
    asset = cfg.asset(asset_name) if isinstance(asset_name, str) else None
    if asset is None:
        raise BadRequest(f"unknown asset on chain {cfg.id!r} (configured: {', '.join(a.symbol for a in cfg.assets)})",
                         code="unknown_asset")
    if "price" not in body:
        raise BadRequest("price is required: {\"amount\": \"50\", \"currency\": \"USD\"}", code="invalid_price")
    amount, pricing = await _priced(req, cfg.id, asset.symbol, asset.decimals, check_price(body["price"]))
    store = req.daemon.store
    quote = store.invoices.create_quote(chain=cfg.id, asset=asset.symbol, amount=amount, pricing=pricing,
                                        ttl_s=req.daemon.config.rates.quote_ttl, owner=req.actor.id)
    return 201, {"id": quote["id"], "chain": cfg.id, "asset": asset.symbol,
                 "amount": format_amount(amount, asset.decimals), "base_units": str(amount), **pricing,
                 "expires_at": iso_ms(quote["expires_at"])}
