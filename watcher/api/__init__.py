"""The HTTP control API: Starlette app served by Hypercorn's Trio worker inside the daemon's
nursery. Routes live in the ``*_routes`` modules, each a table of :class:`Endpoint`; plugins
add theirs through ``watcher_routes`` (:func:`plugin_routes`): to the control API, or on a
listener of their own (:mod:`.public`).

On shutdown the daemon fires ``serve``'s ``shutdown_trigger`` first (``Daemon.drain``):
hypercorn closes the listeners (new connections are refused) and gives the requests in
flight ``GRACEFUL_TIMEOUT`` seconds to finish while the rest of the daemon still runs; only
then is the daemon's nursery cancelled."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..plugins import PluginError, implementations
from . import core_routes, invoice_routes, key_routes, money_routes, openapi, webhook_routes
from .routing import (
    ApiRequest,
    Endpoint,
    Endpoints,
    Listener,
    RouteSet,
    by_method,
    error_response,
    wrap,
)
from .security import Authenticator

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)

__all__ = ["ApiRequest", "Endpoint", "Endpoints", "Listener", "RouteSet", "all_endpoints", "create_app",
           "plugin_routes", "serve"]

docs_endpoints = Endpoints()

# seconds the requests in flight get to finish once shutdown begins (hypercorn's graceful_timeout)
GRACEFUL_TIMEOUT = 2.0


@docs_endpoints.add("GET", "/openapi.json", summary="This API's OpenAPI 3.1 document.", auth=False, tag="docs",
                    responses={200: {"type": "object"}})
async def openapi_document(req: ApiRequest) -> dict:
    return openapi.build(req.request.app.state.endpoints, req.daemon.config)


ROUTE_MODULES = (core_routes, invoice_routes, money_routes, webhook_routes, key_routes)


def all_endpoints(extra: Sequence[Endpoint] = ()) -> list[Endpoint]:
    """The control API's endpoints: the core's, then ``extra`` (the plugins')."""
    return [e for m in ROUTE_MODULES for e in m.endpoints.items] + docs_endpoints.items + list(extra)


def plugin_routes(pm: pluggy.PluginManager, config: Any) -> tuple[list[Endpoint], list[RouteSet]]:
    """Every plugin's ``watcher_routes``: the endpoints that join the control API, and the
    route sets served on listeners of their own. Refuses (naming the plugin) a route that
    clashes with another on the same listener, an API route on a path the core serves, and
    a public route that asks for auth."""
    core = {(e.method, e.path) for e in all_endpoints()}
    api: list[Endpoint] = []
    listeners: dict[str, RouteSet] = {}
    owners: dict[tuple[str, str, str], str] = {}
    for impl in implementations(pm, "watcher_routes"):
        try:
            provided = impl(config=config) or []
        except Exception as exc:
            raise PluginError(f"plugin {impl.plugin_name!r}: watcher_routes raised {type(exc).__name__}: {exc}") from exc
        for rs in provided:
            if not isinstance(rs, RouteSet) or not all(isinstance(e, Endpoint) for e in rs.endpoints):
                raise PluginError(f"plugin {impl.plugin_name!r}: watcher_routes returned {rs!r}, not a RouteSet")
            where = rs.listener.name if rs.listener else "api"
            if rs.listener is not None:
                if where == "api" or (where in listeners and listeners[where].listener != rs.listener):
                    raise PluginError(f"plugin {impl.plugin_name!r}: listener {where!r} is already taken")
                listeners.setdefault(where, RouteSet([], rs.listener))
            for e in rs.endpoints:
                key = (where, e.method, e.path)
                if key in owners:
                    raise PluginError(f"plugin {impl.plugin_name!r}: route {e.method} {e.path} on {where} is "
                                      f"already served by {owners[key]!r}")
                if where == "api" and (e.method, e.path) in core:
                    raise PluginError(f"plugin {impl.plugin_name!r}: route {e.method} {e.path} is the core's")
                if rs.listener is not None and e.auth:
                    raise PluginError(f"plugin {impl.plugin_name!r}: route {e.method} {e.path} on listener "
                                      f"{where!r} asks for auth; a listener of its own takes no token (auth=False)")
                owners[key] = impl.plugin_name
                (api if rs.listener is None else listeners[where].endpoints).append(e)
    return api, list(listeners.values())


def create_app(daemon: Daemon, extra: Sequence[Endpoint] = ()) -> Starlette:
    by_path: dict[str, dict[str, Any]] = {}
    auth = Authenticator(daemon)
    endpoints = all_endpoints(extra)
    for e in endpoints:
        by_path.setdefault(e.path, {})[e.method] = wrap(e, daemon, auth)
    # one Route per path, so a 405 names every method the path has in its Allow header
    routes = [Route(path, by_method(handlers), methods=list(handlers)) for path, handlers in by_path.items()]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.endpoints = endpoints
    return app


def _hypercorn_config(host: str, port: int, name: str) -> HypercornConfig:
    hc = HypercornConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger(f"watcher.api.{name}")
    hc.graceful_timeout = GRACEFUL_TIMEOUT
    hc.keep_alive_timeout = 30.0
    hc.read_timeout = 30  # an idle connection (headers or body never finished) is closed
    hc.server_names = []
    hc.include_server_header = False
    return hc


async def serve(daemon: Daemon, *, shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control API and every plugin listener until ``shutdown_trigger`` returns
    (then all drain gracefully together and this returns) or until cancelled (which cuts the
    requests in flight). Started: the control API's URLs (``daemon.listener_urls`` has each
    plugin listener's)."""
    from .public import create_public_app

    api = daemon.config.api
    extra, listeners = plugin_routes(daemon.pm, daemon.config)
    async with trio.open_nursery() as nursery:
        for rs in listeners:
            assert rs.listener is not None
            hc = _hypercorn_config(rs.listener.host, rs.listener.port, rs.listener.name)
            # Starlette types its ASGI callable with its own Scope/Receive/Send aliases, which
            # mypy cannot match to hypercorn's event unions; it is a plain ASGI 3 app
            app: Any = create_public_app(daemon, rs)
            urls = await nursery.start(lambda task_status, app=app, hc=hc: hypercorn_serve(
                app, hc, shutdown_trigger=shutdown_trigger, task_status=task_status))
            daemon.listener_urls[rs.listener.name] = urls
            log.info("%s listening on %s", rs.listener.name, ", ".join(urls))
        control: Any = create_app(daemon, extra)
        hc = _hypercorn_config(api.host, api.port, "server")
        task_status.started(await nursery.start(lambda task_status: hypercorn_serve(
            control, hc, shutdown_trigger=shutdown_trigger, task_status=task_status)))
