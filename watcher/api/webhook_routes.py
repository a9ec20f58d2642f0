"""Webhook endpoints, their deliveries, the event log and the audit log."""

from __future__ import annotations

import ipaddress
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import trio
from starlette.responses import Response

from .. import netguard, views
from ..errors import BadRequest, Conflict, Forbidden, NotFound
from ..store.webhooks import DELIVERY_STATUSES, EVENT_TYPES, WebhookRow
from .core_routes import reject_unknown_fields
from .routing import ApiRequest, Endpoints

endpoints = Endpoints()
RESOLVE_TIMEOUT = 5.0  # seconds to resolve a webhook's host when it is set


def check_patterns(patterns: Any) -> list[str]:
    """Event patterns: ``*``, ``invoice.*`` or an exact type; at least one, no unknown ones."""
    if not isinstance(patterns, list) or not patterns or len(patterns) > 50:
        raise BadRequest("events must be a non-empty list of event types or patterns such as \"invoice.*\"",
                         code="invalid_events")
    out = []
    for p in patterns:
        if not isinstance(p, str) or not p or len(p) > 64:
            raise BadRequest("each event pattern must be a non-empty string", code="invalid_events")
        if not any(fnmatchcase(t, p) for t in EVENT_TYPES):
            raise BadRequest(f"event pattern {p[:64]!r} matches no event type", code="invalid_events")
        if p not in out:
            out.append(p)
    return out


_webhook = {"$ref": "#/components/schemas/Webhook"}
_delivery = {"$ref": "#/components/schemas/Delivery"}
_id_param_doc = "the webhook's id"
_url_schema = {"type": "string", "format": "uri", "pattern": "^https?://", "maxLength": 2048}
_pattern_schema = {"type": "array", "minItems": 1, "maxItems": 50,
                   "items": {"type": "string", "enum": ["*", *sorted({t.split(".")[0] + ".*" for t in EVENT_TYPES}),
                                                         *EVENT_TYPES]},
                   "description": f"event types or patterns; known types: {', '.join(EVENT_TYPES)}"}


async def check_url(req: ApiRequest, url: Any) -> str:
    """An http(s) URL with a host, that does not point back at this daemon's API, and whose
    host is allowed (:mod:`watcher.netguard`: public, or listed; checked again at every
    delivery, since a name can resolve elsewhere later)."""
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise BadRequest("url must be an http(s) URL of at most 2048 characters", code="invalid_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadRequest("url is not a valid URL", code="invalid_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("url must be an http(s) URL with a host", code="invalid_url")
    if any(c.isspace() or c < " " or c == "\x7f" for c in url):  # could never be sent in a request line
        raise BadRequest("url must not contain spaces or control characters", code="invalid_url")
    if not url.isascii():
        raise BadRequest("url must be ASCII (write an international host name in punycode, xn--...)",
                         code="invalid_url")
    allowed = req.daemon.config.webhooks.allowed_hosts
    api = req.daemon.config.api
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname.lower()
    if port == api.port and (host in ("localhost", api.host.lower()) or _is_local(host)):
        raise BadRequest("url points at watcher's own API; webhooks would loop", code="webhook_loop")
    try:
        with trio.move_on_after(RESOLVE_TIMEOUT):
            await netguard.vetted(host, port, allowed)
    except netguard.Refused as e:
        raise BadRequest(str(e), code="webhook_host_not_allowed") from None
    except OSError:
        pass  # does not resolve right now: every delivery checks again
    return url


def _is_local(host: str) -> bool:
    ip = netguard.literal_ip(host)  # also the legacy spellings: 127.1, 2130706433, 0x7f.1, 0
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1
    return ip.is_loopback or ip.is_unspecified


def _description(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 500:
        raise BadRequest("description must be a string of at most 500 characters", code="invalid_description")
    return value


def _owned(req: ApiRequest, webhook_id: str) -> WebhookRow:
    """The endpoint, if the caller may change it: the key that created it, or an admin key."""
    row = req.daemon.views.webhook_row(webhook_id)
    if not req.actor.owns(row.owner):
        raise Forbidden(f"webhook {row.id} was created by another key; only it (or an admin key) may change it",
                        code="not_owner")
    return row


@endpoints.add("POST", "/v1/webhooks", scope="webhooks", summary="Add an endpoint; the answer holds its signing secret (whsec_...).",
               tag="webhooks", errors=(400,),
               body={"type": "object", "required": ["url", "events"], "additionalProperties": False,
                     "properties": {"url": _url_schema, "events": _pattern_schema,
                                    "description": {"type": ["string", "null"], "maxLength": 500}}},
               responses={201: _webhook})
async def create_webhook(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"url", "events", "description"})
    url = await check_url(req, body.get("url"))
    patterns = check_patterns(body.get("events"))
    description = _description(body.get("description"))
    store = req.daemon.store
    most = req.daemon.config.webhooks.max_endpoints
    with store.db.transaction():
        if store.webhooks.count() >= most:
            raise Conflict(f"there are already {most} webhook endpoints (webhooks.max_endpoints); delete one first",
                           code="too_many_webhooks")
        row, secret = store.webhooks.create(url, patterns, description, owner=req.actor.id)
        store.audit.record(req.actor, "webhook.create", row.id, {"url": url, "events": patterns})
    return 201, {**req.daemon.views.render_webhook(row), "secret": secret}


@endpoints.add("GET", "/v1/webhooks", summary="Webhook endpoints, oldest first (secrets are never shown again).",
               tag="webhooks", errors=(400,),
               query=({"name": "limit", "in": "query", "required": False,
                       "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                      {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}}),
               responses={200: {"type": "object", "properties": {"items": {"type": "array", "items": _webhook},
                                                                 "next_cursor": {"type": ["string", "null"]}}}})
async def list_webhooks(req: ApiRequest) -> Any:
    items, cursor = req.daemon.views.webhooks(after=req.query("cursor"),
                                              limit=req.query_int("limit", 100, lo=1, hi=1000))
    return {"items": items, "next_cursor": cursor}


@endpoints.add("GET", "/v1/webhooks/{id}", summary="One webhook endpoint with its delivery counts.", tag="webhooks",
               errors=(404,), responses={200: _webhook})
async def get_webhook(req: ApiRequest) -> Any:
    return req.daemon.views.webhook(req.path_params["id"])


@endpoints.add("PATCH", "/v1/webhooks/{id}", scope="webhooks", summary="Change an endpoint's url, events or description, or "
               "enable/disable it (disabled, it collects no new deliveries).", tag="webhooks", errors=(400, 404),
               body={"type": "object", "additionalProperties": False,
                     "properties": {"url": _url_schema, "events": _pattern_schema, "enabled": {"type": "boolean"},
                                    "description": {"type": ["string", "null"], "maxLength": 500}}},
               responses={200: _webhook})
async def update_webhook(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"url", "events", "enabled", "description"})
    store = req.daemon.store
    _owned(req, req.path_params["id"])
    url = await check_url(req, body["url"]) if "url" in body else None
    patterns = check_patterns(body["events"]) if "events" in body else None
    enabled = body.get("enabled")
    if "enabled" in body and not isinstance(enabled, bool):
        raise BadRequest("enabled must be true or false", code="invalid_enabled")
    description = _description(body.get("description"))
    with store.db.transaction():
        row = store.webhooks.update(req.path_params["id"], url=url, patterns=patterns, enabled=enabled,
                                    description=description)
        if row is None:  # deleted while check_url awaited its DNS answer: as for any unknown id
            raise NotFound(f"no webhook {req.path_params['id'][:64]!r}", code="unknown_webhook")
        store.audit.record(req.actor, "webhook.update", row.id, body)
    return req.daemon.views.render_webhook(row)


@endpoints.add("DELETE", "/v1/webhooks/{id}", scope="webhooks", summary="Remove an endpoint; its pending deliveries are cancelled.",
               tag="webhooks", errors=(404,), responses={204: {}})
async def delete_webhook(req: ApiRequest) -> Any:
    store = req.daemon.store
    _owned(req, req.path_params["id"])
    with store.db.transaction():
        store.webhooks.delete(req.path_params["id"])
        store.audit.record(req.actor, "webhook.delete", req.path_params["id"])
    return Response(status_code=204)


@endpoints.add("POST", "/v1/webhooks/{id}/rotate-secret", scope="webhooks", summary="A new signing secret; the previous one keeps "
               "signing alongside it (two signatures) for the rotation grace period.", tag="webhooks",
               errors=(404,), responses={200: _webhook})
async def rotate_secret(req: ApiRequest) -> Any:
    store = req.daemon.store
    _owned(req, req.path_params["id"])
    with store.db.transaction():
        row, secret = store.webhooks.rotate_secret(req.path_params["id"])
        store.audit.record(req.actor, "webhook.rotate_secret", row.id)
    return {**req.daemon.views.render_webhook(row), "secret": secret}


@endpoints.add("GET", "/v1/webhooks/{id}/deliveries", summary="Deliveries to an endpoint with every attempt "
               "(status code, latency, error).", tag="webhooks", errors=(400, 404),
               query=({"name": "status", "in": "query", "required": False,
                       "schema": {"type": "string", "enum": list(DELIVERY_STATUSES)}},
                      {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                      {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}}),
               responses={200: {"type": "object", "properties": {"items": {"type": "array", "items": _delivery},
                                                                 "next_cursor": {"type": ["string", "null"]}}}})
async def list_deliveries(req: ApiRequest) -> Any:
    items, cursor = req.daemon.views.deliveries(
        req.path_params["id"], status=req.query("status"), after=req.query("cursor"),
        limit=req.query_int("limit", 100, lo=1, hi=1000))
    return {"items": items, "next_cursor": cursor}


@endpoints.add("POST", "/v1/deliveries/{id}/redeliver", scope="webhooks", summary="Send a finished delivery's event again (same "
               "webhook-id, so receivers dedupe).", tag="webhooks", errors=(404, 409), responses={202: _delivery})
async def redeliver(req: ApiRequest) -> Any:
    store = req.daemon.store
    old = req.daemon.views.delivery_row(req.path_params["id"])
    hook = store.webhooks.row(old.webhook_id)
    if hook is not None and not req.actor.owns(hook.owner):
        raise Forbidden(f"delivery {old.id} belongs to webhook {hook.id}, which another key created; only it (or an "
                        "admin key) may redeliver", code="not_owner")
    with store.db.transaction():
        new = store.webhooks.redeliver(old)
        if new is None:
            raise NotFound("the delivery's webhook was deleted", code="unknown_webhook")
        store.audit.record(req.actor, "delivery.redeliver", req.path_params["id"], {"new_delivery": new.id})
    return 202, req.daemon.views.render_delivery(new)


@endpoints.add("POST", "/v1/webhooks/{id}/test", scope="webhooks", summary="Send a webhook.test event to this endpoint only.",
               tag="webhooks", errors=(404,), responses={202: _delivery})
async def test_webhook(req: ApiRequest) -> Any:
    store = req.daemon.store
    _owned(req, req.path_params["id"])
    with store.db.transaction():
        row = store.webhooks.send_test(req.path_params["id"])
        store.audit.record(req.actor, "webhook.test", req.path_params["id"])
    return 202, req.daemon.views.render_delivery(row)


@endpoints.add("GET", "/v1/events", summary="The event log, in order: for catching up without webhooks.",
               tag="events", errors=(400,),
               query=({"name": "after", "in": "query", "required": False,
                       "schema": {"type": "integer", "minimum": 0, "maximum": 2**62},
                       "description": "sequence number of the last event seen"},
                      {"name": "type", "in": "query", "required": False, "schema": {"type": "string"}},
                      {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}),
               responses={200: {"type": "object"}})
async def list_events(req: ApiRequest) -> Any:
    after = req.query_int("after", 0, lo=0, hi=2**62)
    types = tuple(t for t in (req.query("type") or "").split(",") if t)
    events = req.daemon.store.events.list(after_seq=after, types=types, limit=req.query_int("limit", 100, lo=1, hi=1000))
    return {"items": [views.event(e) for e in events], "last_seq": events[-1].seq if events else after}


@endpoints.add("GET", "/v1/audit", summary="The audit log of every change made through the API.", tag="events",
               errors=(400,),
               query=({"name": "object_id", "in": "query", "required": False, "schema": {"type": "string"}},
                      {"name": "key", "in": "query", "required": False, "schema": {"type": "string"},
                       "description": "only the changes made with this key (key_... or config:<name>)"},
                      {"name": "after", "in": "query", "required": False,
                       "schema": {"type": "integer", "minimum": 0, "maximum": 2**62}},
                      {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}),
               responses={200: {"type": "object"}})
async def list_audit(req: ApiRequest) -> Any:
    return {"items": req.daemon.views.audit(object_id=req.query("object_id"), key_id=req.query("key"),
                                            after=req.query_int("after", 0, lo=0, hi=2**62),
                                            limit=req.query_int("limit", 100, lo=1, hi=1000))}
