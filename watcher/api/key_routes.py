"""API keys over the API (the ``admin`` scope): create, list, revoke. ``watcher keys`` does the
same from the command line, also while the daemon runs."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from ..auth import SCOPES, Rate, check_scopes, parse_rate
from ..errors import BadRequest
from .core_routes import reject_unknown_fields
from .routing import ApiRequest, Endpoints

endpoints = Endpoints()

MAX_EXPIRES_DAYS = 3650
_rate_schema = {"type": ["string", "null"], "pattern": r"^\s*[0-9]{1,9}\s*/\s*(s|sec|m|min|h|hour|d|day)\s*$",
                "description": "N/s, N/min, N/h or N/d"}
_time = {"type": ["string", "null"], "format": "date-time"}
_key_properties: dict[str, Any] = {
    "id": {"type": "string"}, "name": {"type": "string"},
    "scopes": {"type": "array", "items": {"type": "string", "enum": list(SCOPES)}},
    "signed": {"type": "boolean"}, "rate_limit": {"type": ["string", "null"]},
    "payout_rate_limit": {"type": ["string", "null"]},
    "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
    "created_at": {"type": "string", "format": "date-time"}, "created_by": {"type": ["string", "null"]},
    "expires_at": _time, "last_used_at": _time, "revoked_at": _time,
}
_key = {"type": "object", "properties": _key_properties}


def rate_field(body: dict[str, Any], name: str) -> Rate | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string such as \"5/s\" or \"3/h\"", code="invalid_rate_limit")
    try:
        return parse_rate(value)
    except ValueError as e:
        raise BadRequest(f"{name}: {e}", code="invalid_rate_limit") from None


@endpoints.add("POST", "/v1/keys", scope="admin", tag="keys", errors=(400,),
               summary="Create an API key; the answer holds the key itself (shown this once, stored as a hash).",
               body={"type": "object", "required": ["name", "scopes"], "additionalProperties": False,
                     "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64},
                                    "scopes": {"type": "array", "minItems": 1,
                                               "items": {"type": "string", "enum": list(SCOPES)}},
                                    "signed": {"type": "boolean"}, "rate_limit": _rate_schema,
                                    "payout_rate_limit": _rate_schema,
                                    "expires_in_days": {"type": ["integer", "null"], "minimum": 1,
                                                        "maximum": MAX_EXPIRES_DAYS}}},
               responses={201: {"type": "object", "properties": {**_key_properties, "key": {"type": "string"}}}})
async def create_key(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"name", "scopes", "signed", "rate_limit", "payout_rate_limit", "expires_in_days"})
    scopes = body.get("scopes")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise BadRequest(f"scopes must be a list of: {', '.join(SCOPES)}", code="invalid_scopes")
    try:
        checked = check_scopes(scopes)
    except ValueError as e:
        raise BadRequest(str(e), code="invalid_scopes") from None
    signed = body.get("signed", False)
    if not isinstance(signed, bool):
        raise BadRequest("signed must be true or false", code="invalid_signed")
    days = body.get("expires_in_days")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool)
                             or not 1 <= days <= MAX_EXPIRES_DAYS):
        raise BadRequest(f"expires_in_days must be a whole number of days, 1-{MAX_EXPIRES_DAYS}",
                         code="invalid_expiry")
    store = req.daemon.store
    row, key = store.apikeys.create(name=body.get("name"), scopes=checked, signed=signed,  # type: ignore[arg-type]
                                    rate_limit=rate_field(body, "rate_limit"),
                                    payout_rate_limit=rate_field(body, "payout_rate_limit"),
                                    expires_in_days=days, actor=req.actor)
    return 201, {**row.public(store.clock.now_ms()), "key": key}


@endpoints.add("GET", "/v1/keys", scope="admin", tag="keys", summary="API keys (never the keys themselves).",
               responses={200: {"type": "object", "properties": {"items": {"type": "array", "items": _key}}}})
async def list_keys(req: ApiRequest) -> Any:
    store = req.daemon.store
    now = store.clock.now_ms()
    return {"items": [r.public(now) for r in store.apikeys.list()]}


@endpoints.add("GET", "/v1/keys/{id}", scope="admin", tag="keys", summary="One API key.", errors=(404,),
               responses={200: _key})
async def get_key(req: ApiRequest) -> Any:
    store = req.daemon.store
    return store.apikeys.get(req.path_params["id"]).public(store.clock.now_ms())


@endpoints.add("DELETE", "/v1/keys/{id}", scope="admin", tag="keys", errors=(404,), responses={204: {}},
               summary="Revoke an API key: refused from the next request on (revoking twice is harmless).")
async def revoke_key(req: ApiRequest) -> Any:
    req.daemon.store.apikeys.revoke(req.path_params["id"], req.actor)
    return Response(status_code=204)
