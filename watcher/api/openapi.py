"""The OpenAPI 3.1 document, built from the same endpoint table that builds the routes, so
the two cannot disagree (a test checks it anyway)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .. import __version__
from .routing import Endpoint

if TYPE_CHECKING:
    from ..config import Config

_nullable_str = {"type": ["string", "null"]}
_time = {"type": ["string", "null"], "format": "date-time"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"],
                                 "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
    },
    "Address": {
        "type": "object", "required": ["chain", "address", "kind"],
        "properties": {
            "chain": {"type": "string"}, "address": {"type": "string"},
            "kind": {"type": "string", "enum": ["deposit", "invoice", "external"]},
            "label": _nullable_str, "invoice_id": _nullable_str, "derivation_path": _nullable_str,
            "totals": {"type": "object", "additionalProperties": {
                "type": "object", "properties": {"confirmed": {"type": "string"}, "pending": {"type": "string"},
                                                 "transfers": {"type": "integer"}}}},
        },
    },
    "Transfer": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "chain": {"type": "string"}, "txid": {"type": "string"},
            "index": {"type": "integer"}, "kind": {"type": "string", "enum": ["native", "token", "internal"]},
            "asset": {"type": "string"}, "contract": _nullable_str, "amount": {"type": "string"},
            "base_units": {"type": "string"}, "decimals": {"type": "integer"}, "address": {"type": "string"},
            "label": _nullable_str, "invoice_id": _nullable_str, "order_id": _nullable_str, "from": _nullable_str,
            # null while the transaction is only in the node's mempool (0 confirmations)
            "block_number": {"type": ["integer", "null"]}, "block_hash": _nullable_str, "block_time": _time,
            "status": {"type": "string", "enum": ["detected", "confirmed", "orphaned"]},
            "confirmations": {"type": "integer"}, "required_confirmations": {"type": ["integer", "null"]},
            "detected_at": _time, "confirmed_at": _time, "orphaned_at": _time,
            "value": {"type": ["object", "null"], "description": "worth in [rates] reference at the rate of its "
                      "detection; null when there was no rate", "properties": {
                          "currency": {"type": "string"}, "amount": {"type": "string"}, "rate": {"type": "string"},
                          "source": {"type": "string"}}},
        },
    },
    "Invoice": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "chain": {"type": "string"}, "asset": {"type": "string"},
            "contract": _nullable_str, "decimals": {"type": "integer"},
            "mode": {"type": "string", "enum": ["sale", "deposit"]}, "amount": _nullable_str,
            "base_units": _nullable_str, "tolerance": {"type": "string"}, "address": {"type": "string"},
            "payment_uri": _nullable_str,
            "status": {"type": "string", "enum": ["awaiting_payment", "awaiting_confirmation", "completed", "expired",
                                                  "failed", "refunded"]},
            "partial": {"type": "boolean"}, "overpaid": {"type": "boolean"}, "late": {"type": "boolean"},
            "received": {"type": "string"}, "confirmed": {"type": "string"}, "due": {"type": "string"},
            "required_confirmations": {"type": "integer"}, "order_id": _nullable_str, "metadata": {"type": "object"},
            "price": {"type": ["object", "null"], "properties": {"amount": {"type": "string"},
                                                                  "currency": {"type": "string"}}},
            "rate": {"type": ["object", "null"], "properties": {
                "pair": {"type": "string"}, "value": {"type": "string"}, "source": {"type": "string"},
                "updated_at": {"type": "string", "format": "date-time"}}},
            "received_value": {"type": ["object", "null"], "description": "what the live payments were worth in "
                               "[rates] reference when each arrived"},
            "refunded_amount": {"type": "string"}, "partially_refunded": {"type": "boolean"},
            "refunds": {"type": "array", "items": {"type": "object"}},
            "payments": {"type": "array", "items": {"type": "object"}},
            "created_at": _time, "expires_at": _time, "monitor_until": _time, "paid_at": _time, "completed_at": _time,
            "redirect_url": _nullable_str,
            "checkout_url": {"type": ["string", "null"], "description": "the customer's payment page (null unless "
                             "the checkout plugin is on: [checkout])"},
        },
    },
    "Webhook": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "url": {"type": "string"}, "events": {"type": "array", "items": {"type": "string"}},
            "description": _nullable_str, "status": {"type": "string", "enum": ["active", "disabled"]},
            "disabled_reason": _nullable_str, "last_sequence": {"type": "integer"},
            "deliveries": {"type": "object", "additionalProperties": {"type": "integer"}},
            "secret_rotating_until": _time, "created_at": _time,
            "secret": {"type": "string", "description": "only in the answers of create and rotate-secret"},
        },
    },
    "Payout": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "chain": {"type": "string"}, "asset": {"type": "string"},
            "amount": {"type": "string"}, "base_units": {"type": "string"}, "decimals": {"type": "integer"},
            "to": {"type": "string"}, "label": _nullable_str, "idempotency_key": {"type": "string"},
            "metadata": {"type": "object"},
            "status": {"type": "string", "enum": ["pending", "awaiting_approval", "broadcast", "completed", "failed",
                                                  "cancelled"]},
            "reason": _nullable_str, "txid": _nullable_str,
            "block_number": {"type": ["integer", "null"]}, "fee_paid": _nullable_str,
            "transactions": {"type": "array", "items": {"$ref": "#/components/schemas/Transaction"}},
            "created_by": _nullable_str, "approved_by": _nullable_str,
            "invoice_id": {"type": ["string", "null"], "description": "a refund: the invoice it pays back"},
            "created_at": _time, "approved_at": _time, "broadcast_at": _time, "completed_at": _time,
        },
    },
    "Sweep": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "chain": {"type": "string"}, "asset": {"type": "string"},
            "address": {**_nullable_str, "description": "null when the sweep spends several addresses at once"},
            "addresses": {"type": "array", "items": {"type": "string"}}, "to": {"type": "string"},
            "amount": {"type": "string"}, "base_units": {"type": "string"},
            "status": {"type": "string", "enum": ["planned", "funding", "broadcast", "confirmed", "failed"]},
            "reason": _nullable_str, "txid": _nullable_str, "topup_amount": _nullable_str, "topup_txid": _nullable_str,
            "fee_paid": _nullable_str, "topup_fee_paid": _nullable_str, "dust": _nullable_str,
            "deposits": {"type": "array", "items": {"type": "string"}, "description": "ids of the transfers it covers"},
            "transactions": {"type": "array", "items": {"$ref": "#/components/schemas/Transaction"}},
            "created_at": _time, "confirmed_at": _time,
        },
    },
    "Transaction": {
        "type": "object",
        "description": "one of watcher's own transactions; chain families add their own fields",
        "properties": {
            "txid": {"type": "string"}, "purpose": {"type": "string", "enum": ["payout", "sweep", "topup", "filler"]},
            "status": {"type": "string", "enum": ["open", "mined", "replaced", "failed"]},
            "block_number": {"type": ["integer", "null"]}, "fee_paid": _nullable_str, "error": _nullable_str,
            "created_at": _time, "broadcast_at": _time,
        },
    },
    "Delivery": {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "webhook_id": {"type": "string"}, "event_id": {"type": "string"},
            "event_type": _nullable_str, "sequence": {"type": "integer"},
            "status": {"type": "string", "enum": ["pending", "delivered", "failed", "cancelled"]},
            "attempts": {"type": "integer"}, "next_attempt_at": _time, "last_status_code": {"type": ["integer", "null"]},
            "last_error": _nullable_str, "created_at": _time, "delivered_at": _time,
            "attempt_log": {"type": "array", "items": {"type": "object"}},
        },
    },
}

_ERROR_TEXT = {400: "bad input", 401: "missing or invalid key, or a bad signature (the code says which)",
               403: "the key lacks the route's scope (insufficient_scope), or the object is another key's (not_owner)",
               404: "no such object", 409: "conflict", 429: "over a rate limit (see Retry-After and RateLimit-*)",
               413: "request body too large", 415: "request body not in UTF-8", 422: "valid but unusable input",
               503: "the chain's node or the database is unavailable (storage_unavailable: see Retry-After)"}


def build(endpoints: list[Endpoint], config: Config | None = None) -> dict[str, Any]:
    """The document for these endpoints; with a config, chain ids and asset symbols are
    enumerated (the API accepts nothing else)."""
    schemas = dict(SCHEMAS)
    for c in config.chains if config else ():  # the families' own fields (EVM: nonce, fees)
        for name, extra in (("Payout", c.spec.payout_schema), ("Transaction", c.spec.tx_schema)):
            schemas[name] = {**schemas[name], "properties": {**schemas[name]["properties"], **extra}}
    chains = [c.id for c in config.chains] if config else []
    assets = sorted({a.symbol for c in config.chains for a in c.assets}) if config else []
    schemas["ChainId"] = {"type": "string", "enum": chains} if chains else {"type": "string", "minLength": 1}
    schemas["AssetSymbol"] = {"type": "string", "enum": assets} if assets else {"type": "string", "minLength": 1}
    paths: dict[str, Any] = {}
    for e in endpoints:
        op: dict[str, Any] = {"summary": e.summary, "operationId": e.handler.__name__, "tags": [e.tag]}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"{(\w+)}", e.path)]
        params += list(e.query)
        if params:
            op["parameters"] = params
        if e.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": e.body}}}
        responses: dict[str, Any] = {}
        for status, schema in (e.responses or {200: {}}).items():
            entry: dict[str, Any] = {"description": "OK" if status < 300 else "see body"}
            if status != 204:
                media = "text/plain" if schema.get("type") == "string" else "application/json"
                entry["content"] = {media: {"schema": schema or {"type": "object"}}}
            responses[str(status)] = entry
        errors = set(e.errors)
        if "{" in e.path:
            errors.add(404)
        if e.query or e.path.startswith("/v1/"):
            errors.add(400)  # /v1 routes refuse unknown query parameters
        if e.auth:
            # 503 storage_unavailable: the database cannot be written right now
            errors |= {401, 403, 429, 503}
            op["description"] = f"Needs the `{e.scope}` scope."
            op["x-watcher-scope"] = e.scope
        if e.body is not None:
            errors |= {400, 413, 415}
        for status in sorted(errors):
            responses[str(status)] = {"description": _ERROR_TEXT.get(status, "error"),
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        op["responses"] = responses
        if e.auth:
            op["security"] = [{"bearer": [e.scope]},
                              {"keyId": [e.scope], "timestamp": [e.scope], "signature": [e.scope]}]
        paths.setdefault(e.path, {})[e.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "watcher", "version": __version__,
                 "description": "Local control API of the watcher payment daemon. Amounts are decimal strings in "
                                "asset units. Errors are {\"error\": {\"code\", \"message\"}}."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {
                           "bearer": {"type": "http", "scheme": "bearer",
                                      "description": "an API key (wk_...) or a config token"},
                           "keyId": {"type": "apiKey", "in": "header", "name": "X-Watcher-Key-Id",
                                     "description": "a signed key's id; with X-Watcher-Timestamp and "
                                                    "X-Watcher-Signature (docs/api.md, Signed requests)"},
                           "timestamp": {"type": "apiKey", "in": "header", "name": "X-Watcher-Timestamp"},
                           "signature": {"type": "apiKey", "in": "header", "name": "X-Watcher-Signature"}}},
    }
