"""A listener of a plugin's own (hook ``watcher_routes`` with a :class:`Listener`): a page
that faces the internet while the control API stays on loopback.

Only the plugin's routes are there: no token is taken (the routes are ``auth=False``), the
``Host`` header must be one the listener answers (DNS rebinding, and a request for another
site), each client address has its own token bucket (behind a reverse proxy, listed in the
listener's ``trusted_proxies``, the address its ``X-Forwarded-For`` names), unknown paths are a plain 404 page, and
an error never shows more than its status line and message."""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..auth import RateLimiter
from ..errors import WatcherError
from ..forwarding import client_address
from .routing import ApiRequest, Endpoint, Listener, RouteSet, by_method

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)

#: Headers every answer of a public listener carries.
BASE_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def plain_page(status: int, message: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    """A minimal HTML page for an error: its status and one line, nothing else."""
    title = {404: "Not found", 405: "Method not allowed", 421: "Misdirected request",
             429: "Too many requests"}.get(status, "Error")
    body = (f"<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>{status} {title}</title>"
            f"<h1>{status} {title}</h1><p>{html.escape(message)}</p></html>")
    return HTMLResponse(body, status_code=status, headers={
        **BASE_HEADERS, "content-security-policy": "default-src 'none'", "cache-control": "no-store",
        **(headers or {})})


def host_allowed(listener: Listener, host: str) -> bool:
    host = host.strip().lower()
    if not listener.hosts:
        return True
    if host in listener.hosts:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in listener.hosts


def create_public_app(daemon: Daemon, routes: RouteSet) -> Starlette:
    listener = routes.listener
    assert listener is not None
    limiter = RateLimiter()

    def wrap(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
        async def asgi_endpoint(request: Request) -> Response:
            if not host_allowed(listener, request.headers.get("host", "")):
                return plain_page(421, "this server does not answer for that host name")
            client = client_address(request, listener.trusted_proxies)
            verdict = limiter.take(client, listener.rate_limit, time.monotonic())
            if not verdict.allowed:
                daemon.metrics.api_refusals.labels("", "rate_limited").inc()
                return plain_page(429, "too many requests; try again in a moment",
                                  {"retry-after": str(verdict.retry_after)})
            try:
                result = await endpoint.handler(ApiRequest(request, daemon, None))
            except WatcherError as e:
                return plain_page(e.status, e.message)
            except Exception:
                log.exception("%s listener: %s %s failed", listener.name, endpoint.method, endpoint.path)
                daemon.metrics.errors.labels("api").inc()
                return plain_page(500, "internal error")
            response = result if isinstance(result, Response) else JSONResponse(result)
            for k, v in BASE_HEADERS.items():
                response.headers.setdefault(k, v)
            return response

        return asgi_endpoint

    by_path: dict[str, dict[str, Any]] = {}
    for e in routes.endpoints:
        by_path.setdefault(e.path, {})[e.method] = wrap(e)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return plain_page(exc.status_code, "there is no such page" if exc.status_code == 404 else str(exc.detail),
                          dict(exc.headers or {}))

    return Starlette(routes=[Route(p, by_method(h), methods=list(h)) for p, h in by_path.items()],
                     exception_handlers={HTTPException: http_error})
