"""Health, chains, addresses and transfers."""

from __future__ import annotations

import re
import time
from typing import Any

import trio
from starlette.responses import JSONResponse

from ..errors import (
    BadRequest,
    Forbidden,
    InvalidAddress,
    InvalidAmount,
    NotFound,
    Unauthorized,
    WatcherError,
)
from ..forwarding import is_local
from ..labels import label_problem, normalize_label
from ..money import format_amount, parse_amount
from .routing import ApiRequest, Endpoints, read_body

endpoints = Endpoints()

# fullmatch, not match + "$": "$" also matches before a trailing newline
PLAIN_DECIMAL_RE = re.compile(r"[0-9]+(\.[0-9]+)?")

_error = {"$ref": "#/components/schemas/Error"}
_chain_ref = {"$ref": "#/components/schemas/ChainId"}
_label = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f]+$"}
_chain_param = {"name": "chain", "in": "query", "required": False, "schema": _chain_ref}
_limit_param = {"name": "limit", "in": "query", "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}
_cursor_param = {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
                 "description": "next_cursor of the previous page"}


def chain_param(req: ApiRequest, chain_id: Any, *, in_path: bool = False) -> Any:
    """The configured chain named by a parameter: 400 unknown_chain for a query or body
    field, 404 for a path segment."""
    if not isinstance(chain_id, str) or not chain_id:
        raise BadRequest("chain is required", code="invalid_chain")
    cfg = req.daemon.config.chain(chain_id)
    if cfg is None:
        cls = NotFound if in_path else BadRequest
        raise cls(f"unknown chain {chain_id[:64]!r}", code="unknown_chain")
    return cfg


def reject_unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:64]!r}", code="unknown_field")


def canonical_address(req: ApiRequest, chain_id: str, text: Any) -> str:
    if not isinstance(text, str):
        raise InvalidAddress("address must be a string")
    return req.daemon.store.spec(chain_id).validate_address(text)


def check_label(label: Any) -> str:
    problem = label_problem(label)
    if problem is not None:
        raise BadRequest(f"label {problem}", code="invalid_label")
    return normalize_label(label)


def optional_label(label: Any) -> str | None:
    return None if label is None else check_label(label)


def api_amount(value: Any, decimals: int, *, what: str = "amount", allow_zero: bool = False) -> int:
    """An amount from a request: exactly what the OpenAPI pattern says, ASCII digits with an
    optional fraction; no sign, exponent, spaces or non-ASCII digits (fullwidth ones, say)."""
    if isinstance(value, str) and not PLAIN_DECIMAL_RE.fullmatch(value):
        raise InvalidAmount(f"{what} {value[:40]!r} is not a plain decimal string such as \"12.5\" "
                            "(ASCII digits and one optional point; no sign, exponent or spaces)")
    return parse_amount(value, decimals, allow_zero=allow_zero, what=what)


# --- health ------------------------------------------------------------------------------------


@endpoints.add("GET", "/healthz", summary="Liveness: the process is up and its event loop answers.",
               auth=False, tag="health", responses={200: {"type": "object"}})
async def healthz(req: ApiRequest) -> Any:
    return {"status": "ok"}


@endpoints.add("GET", "/readyz", summary="Readiness: every chain's node answers and is within its lag threshold, "
               "and database writes go through.",
               auth=False, tag="health", responses={200: {"type": "object"}, 503: {"type": "object"}})
async def readyz(req: ApiRequest) -> Any:
    chains, ready = {}, True
    for cid, w in req.daemon.watchers.items():
        s = w.status
        problem = None
        if s.halted:
            problem = "halted"
        elif w.pool is not None and all(n.state == "down" for n in w.pool.nodes):
            # found by the pool's probes too: a hung node is noticed while the scanner waits
            problem = "node unreachable" if len(w.pool.nodes) == 1 else "every node is unreachable"
        elif w.failing:
            problem = f"scanning fails ({w.failing}: a bug, see the log); retrying"
        elif not s.node_up:
            problem = "node unreachable" if s.error else "starting"
        elif s.lag is not None and s.lag > w.config.max_lag:
            problem = f"lagging {s.lag} blocks (max_lag {w.config.max_lag})"
        elif s.head is not None and s.scanned is not None and s.scanned - s.head > w.config.max_lag:
            # the node went back in height (a replica behind a load balancer that lags):
            # nothing new is seen until it catches up with what we already scanned
            problem = f"node is {s.scanned - s.head} blocks behind the scanned tip (max_lag {w.config.max_lag})"
        chains[cid] = {"ready": problem is None, "problem": problem, "lag": s.lag}
        ready = ready and problem is None
    body: dict[str, Any] = {"status": "ready" if ready else "unready", "chains": chains}
    plugins: dict[str, str | None] = {}
    for impl in req.daemon.ready_checks:
        try:
            plugins[impl.plugin_name] = await impl.call(daemon=req.daemon)
        except Exception as e:
            plugins[impl.plugin_name] = f"readiness check failed: {type(e).__name__}: {e}"[:300]
    if plugins:
        body["plugins"] = plugins
        ready = ready and not any(plugins.values())
    trouble = req.daemon.store.db.trouble  # a write failed (locked, disk full) and is being retried
    body["storage"] = {"ready": trouble is None, "problem": trouble}
    ready = ready and trouble is None
    body["status"] = "ready" if ready else "unready"
    return JSONResponse(body, status_code=200 if ready else 503)


@endpoints.add("GET", "/metrics", summary="Prometheus metrics (text format); needs a key with the read scope if "
               "api.metrics_auth, if the API listens beyond loopback, if the config names a reverse proxy "
               "(api.trusted_proxies, or a non-loopback name in api.hosts), or for a request that came through "
               "a reverse proxy (a forwarding header, or a Host other than a loopback name).", auth=False, tag="health",
               responses={200: {"type": "string"}})
async def metrics(req: ApiRequest) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.responses import Response

    api = req.daemon.config.api
    # a proxy on this machine connects from loopback: what it passes on is not local
    if (api.metrics_auth or not api.loopback or api.proxied or not is_local(req.request)) and req.auth is not None:
        try:
            principal, _ = await req.auth.authenticate(req.request, lambda: read_body(req.request, 0))
        except Unauthorized as e:
            raise req.auth.failed(req.request, e) from None
        if not principal.has("read"):
            raise Forbidden(f"/metrics needs the 'read' scope; key {principal.id} has "
                            f"{', '.join(sorted(principal.scopes))}", code="insufficient_scope")
    return Response(generate_latest(req.daemon.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- chains ------------------------------------------------------------------------------------


@endpoints.add("GET", "/v1/chains", summary="Configured chains with their node's head, scan progress and status.",
               tag="chains", responses={200: {"type": "object"}})
async def list_chains(req: ApiRequest) -> Any:
    out = []
    for cid, w in req.daemon.watchers.items():
        s = w.status
        cfg = w.config
        out.append({
            "id": cid,
            "family": cfg.family,
            "node": {
                "status": "halted" if s.halted else ("up" if s.node_up else "down"),
                "error": s.halted or s.error,
                "last_ok_seconds_ago": None if s.last_ok is None else round(time.monotonic() - s.last_ok, 1),
                "url": w.pool.active.name if w.pool is not None else cfg.node,  # the node in use
                **s.node_info,
            },
            # every configured node, in order of preference; "node" above is the chain's view
            "nodes": w.pool.view() if w.pool is not None else [],
            "head": s.head,
            "scanned": s.scanned if s.scanned is not None else req.daemon.store.chains.scanned_number(cid),
            "lag": s.lag,
            "catching_up": s.catching_up,
            "scan_error": w.failing,  # a scan step that keeps failing for a bug (see the log)
            "confirmations": cfg.confirmations,
            "assets": [{"symbol": a.symbol, "decimals": a.decimals,
                        "contract": cfg.spec.display_address(a.contract) if a.contract else None}
                       for a in cfg.assets],
            "watched_addresses": req.daemon.store.addresses.count(cid),
            "hot_wallet": await hot_wallet_view(req, cid),
        })
    return {"items": out}


async def hot_wallet_view(req: ApiRequest, chain: str) -> dict[str, Any] | None:
    """The hot wallet's address and live balances (None when watch-only; balances null if the
    node does not answer within 3 s)."""
    store = req.daemon.store
    address = store.hot_wallet(chain)
    if address is None:
        return None
    w = req.daemon.watchers[chain]
    balances: dict[str, str | None] = {a.symbol: None for a in w.config.assets}
    if w.client is not None and w.status.node_up:
        with trio.move_on_after(3):
            for a in w.config.assets:
                try:
                    balances[a.symbol] = format_amount(await w.client.balance(address, a), a.decimals)
                except WatcherError:
                    pass
    return {"address": w.spec.display_address(address), "balances": balances}


# --- addresses ---------------------------------------------------------------------------------


@endpoints.add("POST", "/v1/addresses", scope="addresses", summary="Get the static deposit address of a label (created on first call).",
               tag="addresses", errors=(400, 404, 409),
               body={"type": "object", "required": ["chain", "label"], "additionalProperties": False,
                     "properties": {"chain": _chain_ref, "label": _label}},
               responses={200: {"$ref": "#/components/schemas/Address"}, 201: {"$ref": "#/components/schemas/Address"}})
async def create_address(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"chain", "label"})
    cfg = chain_param(req, body.get("chain"))
    label = check_label(body.get("label"))
    store = req.daemon.store
    with store.db.transaction():
        addr, created = store.addresses.deposit_address(cfg.id, label)
        if created:
            store.audit.record(req.actor, "address.create", addr.address, {"chain": cfg.id, "label": label})
    return (201 if created else 200), req.daemon.views.address(addr)


@endpoints.add("POST", "/v1/watch", scope="addresses", summary="Watch an address watcher did not derive (its transfers are recorded; it is never swept).",
               tag="addresses", errors=(400, 409),
               body={"type": "object", "required": ["chain", "address"], "additionalProperties": False,
                     "properties": {"chain": _chain_ref, "address": {"type": "string", "minLength": 1},
                                    "label": _label}},
               responses={200: {"$ref": "#/components/schemas/Address"}, 201: {"$ref": "#/components/schemas/Address"}})
async def watch_address(req: ApiRequest) -> Any:
    body = await req.json()
    reject_unknown_fields(body, {"chain", "address", "label"})
    cfg = chain_param(req, body.get("chain"))
    address = canonical_address(req, cfg.id, body.get("address"))
    label = optional_label(body.get("label"))
    store = req.daemon.store
    with store.db.transaction():
        addr, created = store.addresses.watch_external(cfg.id, address, label)
        if created:
            store.audit.record(req.actor, "address.watch", address, {"chain": cfg.id, "label": label})
    return (201 if created else 200), req.daemon.views.address(addr)


@endpoints.add("GET", "/v1/addresses/{chain}/{address}", summary="A watched address with totals received per asset.",
               tag="addresses", errors=(400, 404), responses={200: {"$ref": "#/components/schemas/Address"}})
async def get_address(req: ApiRequest) -> Any:
    cfg = chain_param(req, req.path_params["chain"], in_path=True)
    address = canonical_address(req, cfg.id, req.path_params["address"])
    watched = req.daemon.store.addresses.get(cfg.id, address)
    if watched is None:
        raise NotFound(f"address is not watched on chain {cfg.id!r}")
    return req.daemon.views.address(watched, totals=True)


# --- transfers ---------------------------------------------------------------------------------


@endpoints.add("GET", "/v1/transfers", summary="Transfers to watched addresses, oldest first, paginated.",
               tag="transfers", errors=(400, 404),
               query=(_chain_param,
                      {"name": "address", "in": "query", "required": False, "schema": {"type": "string"}},
                      {"name": "status", "in": "query", "required": False,
                       "schema": {"type": "string", "enum": ["detected", "confirmed", "orphaned"]}},
                      {"name": "since", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0, "maximum": 2**40},
                       "description": "only transfers changed at or after this Unix time (seconds)"},
                      _limit_param, _cursor_param),
               responses={200: {"type": "object"}})
async def list_transfers(req: ApiRequest) -> Any:
    chain_id = req.query("chain")
    address = req.query("address")
    if address is not None and chain_id is None:
        raise BadRequest("address needs chain", code="invalid_parameter")
    if chain_id is not None:
        chain_param(req, chain_id)
    canonical = canonical_address(req, chain_id, address) if chain_id is not None and address is not None else None
    since = req.query_int("since", -1, lo=0, hi=2**40)
    items, next_cursor = req.daemon.views.transfers(
        chain=chain_id, address=canonical, status=req.query("status"),
        since=since * 1000 if since >= 0 else None, after=req.query("cursor"),
        limit=req.query_int("limit", 100, lo=1, hi=1000))
    return {"items": items, "next_cursor": next_cursor}
