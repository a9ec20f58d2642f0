"""The checkout page (built-in plugin, entry point ``checkout``; on when ``[checkout]`` is in
the config): a page customers pay an invoice on, on a listener of its own, so it can face the
internet while the control API stays on loopback.

```toml
[checkout]
listen = "0.0.0.0:8421"                      # the page's own listener (no token: it serves nothing else)
public_url = "https://pay.example.com"       # what links use; its Host is the one the listener answers
# title = "Example shop"                     # shown at the top of the page
# rate_limit = "300/min"                     # requests per client address
# trusted_proxies = ["127.0.0.1"]            # reverse proxies whose X-Forwarded-For names the client
# max_streams = 1000                         # live-status streams open at once (per invoice: 20)
# max_streams_per_client = 20                # of them from one client address
```

Routes (all on the checkout listener): ``GET /pay/{invoice_id}`` (the page),
``GET /pay/{invoice_id}/events`` (its live status, Server-Sent Events), and
``GET /pay/static/{name}`` (its stylesheet and script). Every invoice gains ``checkout_url``.
docs/checkout.md describes the page, its ``data-field`` attributes and its security headers.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
from prometheus_client import Gauge
from starlette.responses import HTMLResponse, Response, StreamingResponse

from watcher.api import Endpoints, Listener, RouteSet
from watcher.api.routing import ApiRequest
from watcher.auth import Rate, parse_rate
from watcher.config import ConfigSection, ConfigTable, take_networks
from watcher.errors import ConfigError, NotFound
from watcher.forwarding import Network, client_address
from watcher.hookspecs import hookimpl

from .catalog import pick_language
from .page import STATIC, page_state, render_not_found, render_page

if TYPE_CHECKING:
    from watcher.config import Config
    from watcher.daemon import Daemon
    from watcher.store import Event

__all__ = ["CSP", "CheckoutConfig"]

log = logging.getLogger(__name__)

#: The page's Content-Security-Policy: nothing from anywhere but the daemon itself, no inline
#: script or style, no frames, no forms.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
INVOICE_ID_RE = re.compile(r"^inv_[0-9A-Z]{8,40}$")
#: Seconds between keep-alive comments on an idle stream (proxies close silent connections).
HEARTBEAT = 15.0
#: Milliseconds a browser waits before reconnecting a stream that ended without ``end``.
RETRY_MS = 3000
MAX_STREAMS_PER_INVOICE = 20
#: Milliseconds a browser waits before reconnecting a stream refused for room.
BUSY_RETRY_MS = 30_000
STATIC_TYPES = {"checkout.css": "text/css; charset=utf-8", "checkout.js": "text/javascript; charset=utf-8",
                "favicon.svg": "image/svg+xml"}


@dataclass(frozen=True)
class CheckoutConfig:
    host: str
    port: int
    public_url: str  # without a trailing slash
    hosts: frozenset[str]
    title: str | None = None
    rate_limit: Rate = field(default_factory=lambda: Rate(300, 60))
    max_streams: int = 1000
    max_streams_per_client: int = 20
    trusted_proxies: tuple[Network, ...] = ()  # whose X-Forwarded-For names the client (rate limit)


def parse_listen(value: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", value)
    if not m:
        return None
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return (host, int(port)) if int(port) <= 65535 else None


def parse_checkout(t: ConfigTable, resolve: Callable[[str], Path]) -> CheckoutConfig:
    listen = t.take("listen", str, "127.0.0.1:8421")
    hp = parse_listen(listen)
    if hp is None:
        raise ConfigError(t.key("listen"), f"must be host:port (e.g. \"0.0.0.0:8421\" or \"[::]:8421\"), got {listen!r}")

    def url_problem(v: str) -> str | None:
        try:
            p = urlsplit(v)
        except ValueError:
            return "must be an http or https URL"
        if p.scheme not in ("http", "https") or not p.hostname or p.query or p.fragment or "@" in p.netloc:
            return "must be an http or https URL with a host and no query (e.g. \"https://pay.example.com\")"
        return None

    public_url = t.take("public_url", str, f"http://{listen}", check=url_problem).rstrip("/")
    parts = urlsplit(public_url)
    hosts = {parts.netloc.lower()}
    if parts.port is None:
        assert parts.hostname is not None
        hosts.add(parts.hostname.lower())
    title = t.take("title", str, None, check=lambda v: None if 0 < len(v) <= 80 else "must be 1-80 characters")
    rate = t.take("rate_limit", str, "300/min")
    try:
        rate_limit = parse_rate(rate)
    except ValueError as e:
        raise ConfigError(t.key("rate_limit"), str(e)) from None
    max_streams = t.take("max_streams", int, 1000,
                         check=lambda v: None if 1 <= v <= 100_000 else "must be between 1 and 100000")
    per_client = t.take("max_streams_per_client", int, 20,
                        check=lambda v: None if 1 <= v <= 100_000 else "must be between 1 and 100000")
    trusted_proxies = take_networks(t, "trusted_proxies")
    return CheckoutConfig(host=hp[0], port=hp[1], public_url=public_url, hosts=frozenset(hosts), title=title,
                          rate_limit=rate_limit, max_streams=max_streams, max_streams_per_client=per_client,
                          trusted_proxies=trusted_proxies)


class Hub:
    """Who waits for which invoice: a change to the invoice (any event naming it, committed)
    or a new block on its chain (its confirmations) wakes its open streams at once."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.waiting: dict[str, set[trio.Event]] = {}
        self.chains: dict[str, set[str]] = {}  # chain -> invoices with open streams
        self.open = 0
        self.by_client: dict[str, int] = {}  # client address -> its open streams
        self.streams = Gauge("watcher_checkout_streams", "Checkout live-status streams open now.",
                             registry=daemon.metrics.registry)
        daemon.store.events.on_commit(self._on_event)
        for cid, w in daemon.watchers.items():
            w.on_new_blocks(functools.partial(self._on_blocks, cid))

    def _on_event(self, event: Event) -> None:
        for invoice_id in (event.subject, event.data.get("invoice_id")):
            if isinstance(invoice_id, str):
                self._wake(invoice_id)

    def _on_blocks(self, chain: str) -> None:
        for invoice_id in list(self.chains.get(chain, ())):
            self._wake(invoice_id)

    def _wake(self, invoice_id: str) -> None:
        for ev in self.waiting.get(invoice_id, ()):
            ev.set()

    def admits(self, settings: CheckoutConfig, invoice_id: str, client: str) -> bool:
        """Room for one more stream: in all, for this invoice, and for this client (one
        client holding every stream would leave the other customers' pages without live
        updates)."""
        return (self.open < settings.max_streams and len(self.waiting.get(invoice_id, ())) < MAX_STREAMS_PER_INVOICE
                and self.by_client.get(client, 0) < settings.max_streams_per_client)

    def subscribe(self, invoice_id: str, chain: str) -> trio.Event:
        ev = trio.Event()
        self.waiting.setdefault(invoice_id, set()).add(ev)
        self.chains.setdefault(chain, set()).add(invoice_id)
        return ev

    def unsubscribe(self, invoice_id: str, chain: str, ev: trio.Event) -> None:
        waiters = self.waiting.get(invoice_id)
        if waiters is not None:
            waiters.discard(ev)
            if not waiters:
                del self.waiting[invoice_id]
                self.chains.get(chain, set()).discard(invoice_id)


_hubs: weakref.WeakKeyDictionary[Any, Hub] = weakref.WeakKeyDictionary()


def hub_for(daemon: Daemon) -> Hub:
    hub = _hubs.get(daemon)
    if hub is None:
        hub = _hubs[daemon] = Hub(daemon)
    return hub


def _settings(daemon: Daemon) -> CheckoutConfig:
    cfg = daemon.config.sections["checkout"]
    assert isinstance(cfg, CheckoutConfig)
    return cfg


def _invoice(req: ApiRequest) -> dict[str, Any] | None:
    invoice_id = req.path_params["invoice_id"]
    if not INVOICE_ID_RE.fullmatch(invoice_id):
        return None
    try:
        return req.daemon.views.invoice(invoice_id)
    except NotFound:
        return None


def payable_uri(daemon: Daemon, inv: dict[str, Any]) -> str:
    """The payment request for what is due now: the invoice's own URI, or after a partial
    payment one for the rest (the chain family's ``payment_uri``); the bare address when the
    family has no URI for the asset (deposit mode: any amount)."""
    if inv["partial"] and inv["payment_uri"]:
        row = daemon.store.invoices.row(inv["id"])
        cfg = daemon.config.chain(inv["chain"])
        asset = cfg.asset(inv["asset"]) if cfg else None
        if row is not None and cfg is not None and asset is not None and row.amount is not None:
            due = row.amount - row.received  # the rest of the amount: the tolerance is no discount
            if due > 0:
                w = daemon.watchers.get(cfg.id)
                uri = cfg.spec.payment_uri(cfg, row.address, asset, due, w.status.node_info if w else {})
                if uri:
                    return uri
    return inv["payment_uri"] or inv["address"]


def _headers(lang: str | None = None) -> dict[str, str]:
    h = {"content-security-policy": CSP, "cache-control": "no-store", "permissions-policy": "camera=(), "
         "microphone=(), geolocation=(), payment=()"}
    if lang is not None:
        h["content-language"] = lang
        h["vary"] = "Accept-Language"
    return h


def _lang(req: ApiRequest) -> str:
    return pick_language(req.request.headers.get("accept-language"), req.query("lang"))


endpoints = Endpoints()


@endpoints.add("GET", "/pay/{invoice_id}", summary="The checkout page of an invoice.", auth=False, tag="checkout")
async def checkout_page(req: ApiRequest) -> Response:
    lang = _lang(req)
    inv = _invoice(req)
    if inv is None:
        return HTMLResponse(render_not_found(lang), status_code=404, headers=_headers(lang))
    body = render_page(inv, lang, req.daemon.clock.now_ms(), payable_uri(req.daemon, inv),
                       title=_settings(req.daemon).title)
    return HTMLResponse(body, headers=_headers(lang))


@endpoints.add("GET", "/pay/{invoice_id}/events", summary="The checkout page's live status (Server-Sent Events).",
               auth=False, tag="checkout")
async def checkout_events(req: ApiRequest) -> Response:
    lang = _lang(req)
    inv = _invoice(req)
    if inv is None:
        return HTMLResponse(render_not_found(lang), status_code=404, headers=_headers(lang))
    daemon = req.daemon
    hub = hub_for(daemon)
    settings = _settings(daemon)
    client = client_address(req.request, settings.trusted_proxies)
    if not hub.admits(settings, inv["id"], client):
        return Response("too many open status streams; reload the page later", status_code=503,
                        headers={"retry-after": "30", "content-type": "text/plain; charset=utf-8"})
    return StreamingResponse(_stream(daemon, hub, inv["id"], inv["chain"], lang, client),
                             media_type="text/event-stream", headers={**_headers(lang), "x-accel-buffering": "no"})


async def _stream(daemon: Daemon, hub: Hub, invoice_id: str, chain: str, lang: str, client: str) -> AsyncIterator[str]:
    """The invoice's page state now, then every time it changes, until it cannot change any
    more (``event: end``: the browser closes) or the daemon stops (the stream just ends: the
    browser reconnects after ``retry`` ms, to the daemon that comes back).

    The limits are checked again here, where the stream is counted, with no wait between
    (many requests at once all passed the route's check before any of them was counted): a
    stream over them tells the browser to come back in 30 s and ends."""
    if not hub.admits(_settings(daemon), invoice_id, client):
        yield f"retry: {BUSY_RETRY_MS}\n\nevent: busy\ndata: {{}}\n\n"
        return
    hub.open += 1
    hub.by_client[client] = hub.by_client.get(client, 0) + 1
    hub.streams.inc()
    wake = hub.subscribe(invoice_id, chain)
    try:
        yield f"retry: {RETRY_MS}\n\n"
        last: dict[str, Any] | None = None
        while True:
            wake = _renew(hub, invoice_id, chain, wake)  # before reading: no change slips between
            inv = daemon.views.invoice(invoice_id)
            st = page_state(inv, lang, daemon.clock.now_ms(), payable_uri(daemon, inv))
            if st != last:
                yield f"event: state\ndata: {json.dumps(st, ensure_ascii=False, separators=(',', ':'))}\n\n"
                last = st
            if st["final"]:
                yield "event: end\ndata: {}\n\n"
                return
            woke = await _wait_any(wake, daemon.stopping, HEARTBEAT)
            if daemon.stopping.is_set():
                return
            if not woke:
                yield ": keep-alive\n\n"
    finally:
        hub.unsubscribe(invoice_id, chain, wake)
        hub.open -= 1
        if hub.by_client[client] <= 1:
            del hub.by_client[client]
        else:
            hub.by_client[client] -= 1
        hub.streams.dec()


def _renew(hub: Hub, invoice_id: str, chain: str, old: trio.Event) -> trio.Event:
    if not old.is_set():
        return old
    hub.unsubscribe(invoice_id, chain, old)
    return hub.subscribe(invoice_id, chain)


async def _wait_any(a: trio.Event, b: trio.Event, timeout: float) -> bool:
    """Wait until ``a`` or ``b`` is set, at most ``timeout`` seconds; True if one was."""
    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as nursery:
            async def wait(ev: trio.Event) -> None:
                await ev.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait, a)
            nursery.start_soon(wait, b)
    return not scope.cancelled_caught


@endpoints.add("GET", "/pay/static/{name}", summary="The checkout page's stylesheet and script.", auth=False,
               tag="checkout")
async def checkout_static(req: ApiRequest) -> Response:
    name = req.path_params["name"]
    if name not in STATIC_TYPES:
        raise NotFound("there is no such file")
    return Response((STATIC / name).read_bytes(), media_type=STATIC_TYPES[name],
                    headers={"cache-control": "public, max-age=86400", "content-security-policy": CSP})


class CheckoutPlugin:
    @hookimpl
    def watcher_config_sections(self) -> list[ConfigSection]:
        return [ConfigSection("checkout", parse_checkout)]

    @hookimpl
    def watcher_invoice_links(self, config: Config) -> dict[str, str]:
        cfg = config.sections.get("checkout")
        return {"checkout_url": f"{cfg.public_url}/pay/{{id}}"} if isinstance(cfg, CheckoutConfig) else {}

    @hookimpl
    def watcher_routes(self, config: Config) -> list[RouteSet]:
        cfg = config.sections.get("checkout")
        if not isinstance(cfg, CheckoutConfig):
            return []
        return [RouteSet(endpoints.items, Listener("checkout", cfg.host, cfg.port, cfg.hosts, cfg.rate_limit,
                                                  cfg.trusted_proxies))]

    @hookimpl
    def watcher_startup(self, daemon: Daemon) -> None:
        if isinstance(daemon.config.sections.get("checkout"), CheckoutConfig):
            hub_for(daemon)  # listens from the start: no change is missed by a stream opened later


plugin = CheckoutPlugin()
