"""The HTTP control API: Starlette app served by Hypercorn's Trio worker inside the daemon's
nursery. Routes live in the ``*_routes`` modules, each a table of :class:`Endpoint`.

On shutdown the daemon fires ``serve``'s ``shutdown_trigger`` first (``Daemon.drain``):
hypercorn closes the listeners (new connections are refused) and gives the requests in
flight ``GRACEFUL_TIMEOUT`` seconds to finish while the rest of the daemon still runs; only
then is the daemon's nursery cancelled."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import core_routes, invoice_routes, key_routes, money_routes, openapi, webhook_routes
from .routing import ApiRequest, Endpoint, Endpoints, error_response, wrap
from .security import Authenticator

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)

docs_endpoints = Endpoints()

# seconds the requests in flight get to finish once shutdown begins (hypercorn's graceful_timeout)
GRACEFUL_TIMEOUT = 2.0


@docs_endpoints.add("GET", "/openapi.json", summary="This API's OpenAPI 3.1 document.", auth=False, tag="docs",
                    responses={200: {"type": "object"}})
async def openapi_document(req: ApiRequest) -> dict:
    return openapi.build(all_endpoints(), req.daemon.config)


ROUTE_MODULES = (core_routes, invoice_routes, money_routes, webhook_routes, key_routes)


def all_endpoints() -> list[Endpoint]:
    return [e for m in ROUTE_MODULES for e in m.endpoints.items] + docs_endpoints.items


def create_app(daemon: Daemon) -> Starlette:
    by_path: dict[str, dict[str, Any]] = {}
    auth = Authenticator(daemon)
    for e in all_endpoints():
        by_path.setdefault(e.path, {})[e.method] = wrap(e, daemon, auth)
    # one Route per path, so a 405 names every method the path has in its Allow header
    routes = [Route(path, _by_method(handlers), methods=list(handlers)) for path, handlers in by_path.items()]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _by_method(handlers: dict[str, Any]) -> Any:
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return endpoint


async def serve(daemon: Daemon, *, shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until ``shutdown_trigger`` returns (then drain gracefully and return) or until
    cancelled (which cuts the requests in flight)."""
    api = daemon.config.api
    hc = HypercornConfig()
    host = f"[{api.host}]" if ":" in api.host else api.host
    hc.bind = [f"{host}:{api.port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("watcher.api.server")
    hc.graceful_timeout = GRACEFUL_TIMEOUT
    hc.keep_alive_timeout = 30.0
    hc.read_timeout = 30  # an idle connection (headers or body never finished) is closed
    hc.server_names = []
    hc.include_server_header = False
    # Starlette types its ASGI callable with its own Scope/Receive/Send aliases, which mypy
    # cannot match to hypercorn's event unions; it is a plain ASGI 3 app
    await hypercorn_serve(create_app(daemon), hc, shutdown_trigger=shutdown_trigger,  # type: ignore[arg-type]
                          task_status=task_status)
