"""The API's plumbing: one table of endpoints (which also produces the OpenAPI document), each
declaring the scope it needs (:mod:`.security` authenticates and limits), JSON bodies with a
size limit, and one error shape:
``{"error": {"code": "<machine_code>", "message": "<human text>"}}``.

Hostile input stops here, before any handler sees it: a body must be strict UTF-8 JSON
(no NaN/Infinity, no number that overflows, no duplicate keys, no lone surrogates, at most
:data:`MAX_JSON_DEPTH` levels deep); ``/v1`` routes refuse query parameters they do not
know or that are given twice. A database that cannot be written right now (locked by
another process, disk full, I/O error) is a ``503 storage_unavailable`` with
``Retry-After``; the transaction has rolled back, so nothing was half-written."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..auth import SCOPES, Principal, Rate
from ..errors import BadRequest, TooManyRequests, Unauthorized, WatcherError
from ..forwarding import Network
from ..tasks import record_storage_trouble

if TYPE_CHECKING:
    from ..daemon import Daemon
    from .security import Authenticator

log = logging.getLogger(__name__)


class PayloadTooLarge(WatcherError):
    """The request body is larger than ``api.max_body_bytes``."""

    status = 413
    code = "payload_too_large"


class RequestTimeout(WatcherError):
    """The body did not arrive in time (``api.body_timeout``)."""

    status = 408
    code = "request_timeout"


class UnsupportedMediaType(WatcherError):
    """The body declares a character set other than UTF-8."""

    status = 415
    code = "unsupported_media_type"


#: Nesting levels a request body may have (metadata allows 8 below the body's own level).
MAX_JSON_DEPTH = 32
#: Seconds a client is asked to wait after ``503 storage_unavailable``.
STORAGE_RETRY_AFTER = 5


class _BadJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _BadJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJson(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _BadJson(f"duplicate key {k[:64]!r}")
            seen.add(k)
    return out


_JSON_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def _nested_too_deep(text: str) -> bool:
    """More than :data:`MAX_JSON_DEPTH` levels of arrays and objects, told without parsing.
    The parser recurses once per level and must never see such a body: a library that raises
    the interpreter's recursion limit (py_ecc, under eth-account, sets 100,000) would let it
    overflow the C stack and end the process instead of raising RecursionError."""
    depth = 0
    for m in _JSON_BRACKETS.finditer(_JSON_STRINGS.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        else:
            depth -= 1
    return False


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, finite numbers, unique keys, valid Unicode, bounded depth.
    Raises :class:`BadRequest` (``malformed_json``) saying what is wrong."""
    try:
        text = raw.decode("utf-8")  # strict: no UTF-16, no encoded surrogates
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (bad byte at offset {e.start})",
                         code="malformed_json") from None
    if _nested_too_deep(text):
        raise BadRequest(f"request body is nested more than {MAX_JSON_DEPTH} levels deep", code="malformed_json")
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                           object_pairs_hook=_unique_keys)
    except RecursionError:
        raise BadRequest(f"request body is nested more than {MAX_JSON_DEPTH} levels deep",
                         code="malformed_json") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                         code="malformed_json") from None
    except _BadJson as e:
        raise BadRequest(f"request body is not valid JSON: {e}", code="malformed_json") from None
    except ValueError:  # an integer with more digits than Python converts
        raise BadRequest("request body is not valid JSON: a number is too long", code="malformed_json") from None
    _check_tree(value, check_unicode="\\u" in text)
    return value


def _check_tree(value: Any, *, check_unicode: bool) -> None:
    """Reject nesting deeper than :data:`MAX_JSON_DEPTH` (so no handler ever recurses deep)
    and strings with lone surrogates (``"\\ud800"``: valid JSON, but not text; SQLite and
    every answer would choke on them)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"request body is nested more than {MAX_JSON_DEPTH} levels deep",
                                 code="malformed_json")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend((x, depth + 1) for x in items if isinstance(x, dict | list) or check_unicode)
        elif check_unicode and isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("request body is not valid JSON: a string holds a lone UTF-16 surrogate "
                                 "(\\ud800-\\udfff without its pair)", code="malformed_json") from None


async def read_body(request: Request, limit: int, timeout: float = 30.0) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond), declared UTF-8 if it declares a
    character set (415 otherwise), whole within ``timeout`` seconds (408 otherwise: a body
    sent a byte a second must not hold a connection for ever)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    content_type = request.headers.get("content-type", "")
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in content_type.split(";")[1:]
                    if p.strip().lower().startswith("charset=")), None)
    if charset is not None and charset not in ("utf-8", "utf8", "us-ascii"):
        raise UnsupportedMediaType(f"request body must be UTF-8 JSON, not charset {charset[:32]!r}")
    chunks, size = [], 0
    with trio.move_on_after(timeout) as slow:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            chunks.append(chunk)
    if slow.cancelled_caught:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s")
    return b"".join(chunks)


@dataclass
class ApiRequest:
    """What a handler gets: the Starlette request, the daemon, who is calling (None on the
    routes without auth) and the authenticator (``/metrics`` asks it itself)."""

    request: Request
    daemon: Daemon
    principal: Principal | None
    auth: Authenticator | None = None
    raw_body: bytes | None = None  # already read (a signed request's body was, to check it)
    _body: Any = None

    @property
    def actor(self) -> Principal:
        """Who is calling, for the audit log and the objects it creates."""
        assert self.principal is not None, "a route without auth has no actor"
        return self.principal

    @property
    def path_params(self) -> Mapping[str, str]:
        return self.request.path_params

    def query(self, name: str, default: str | None = None) -> str | None:
        return self.request.query_params.get(name, default)

    def query_int(self, name: str, default: int, *, lo: int, hi: int) -> int:
        raw = self.request.query_params.get(name)
        if raw is None:
            return default
        if not re.fullmatch(r"-?[0-9]{1,20}", raw):  # int() would take " 1", "1_0", fullwidth digits
            raise BadRequest(f"query parameter {name} must be an integer", code="invalid_parameter")
        value = int(raw)
        if not lo <= value <= hi:
            raise BadRequest(f"query parameter {name} must be between {lo} and {hi}", code="invalid_parameter")
        return value

    async def json(self, *, optional: bool = False) -> dict[str, Any]:
        """The body as a JSON object (400 if malformed or not an object, 413 if too big,
        415 if it declares a character set other than UTF-8). ``optional``: an empty body
        is ``{}``."""
        if self._body is not None:
            return self._body
        api = self.daemon.config.api
        raw = self.raw_body if self.raw_body is not None else await read_body(
            self.request, api.max_body_bytes, api.body_timeout)
        if optional and not raw.strip():
            self._body = {}
            return self._body
        if not raw.strip():
            raise BadRequest("request body must be a JSON object", code="malformed_json")
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", code="malformed_json")
        self._body = body
        return body


Handler = Callable[[ApiRequest], Awaitable[Any]]


@dataclass
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    auth: bool = True
    tag: str = "misc"
    scope: str | None = None  # the scope a key needs (watcher.auth.SCOPES); None: no auth
    moves_money: bool = False  # also counts against the key's payout rate limit
    query: tuple[dict[str, Any], ...] = ()  # OpenAPI parameter objects (in: query)
    body: dict[str, Any] | None = None  # JSON schema of the request body
    responses: dict[int, dict[str, Any]] = field(default_factory=dict)  # status -> JSON schema
    errors: tuple[int, ...] = ()


class Endpoints:
    """The endpoint table; ``add`` is used as a decorator by the route modules. A GET needs
    ``read`` unless it says otherwise; every other method must name its scope."""

    def __init__(self) -> None:
        self.items: list[Endpoint] = []

    def add(self, method: str, path: str, *, summary: str, auth: bool = True, tag: str = "misc",
            scope: str | None = None, moves_money: bool = False, query: tuple[dict[str, Any], ...] = (),
            body: dict[str, Any] | None = None, responses: dict[int, dict[str, Any]] | None = None,
            errors: tuple[int, ...] = ()) -> Callable[[Handler], Handler]:
        if auth and scope is None:
            assert method == "GET", f"{method} {path} must declare its scope"
            scope = "read"
        assert scope is None or scope in SCOPES, f"{method} {path}: unknown scope {scope!r}"
        assert auth or scope is None, f"{method} {path}: a route without auth has no scope"

        def deco(fn: Handler) -> Handler:
            self.items.append(Endpoint(method, path, fn, summary, auth, tag, scope, moves_money, query, body,
                                       responses or {}, errors))
            return fn
        return deco


@dataclass(frozen=True)
class Listener:
    """A listener of a plugin's own (hook ``watcher_routes``), served next to the control API:
    ``host``/``port`` to bind (port 0: any free one), the ``Host`` header values it answers
    (``"name"`` or ``"name:port"``; empty: any), the requests each client address may make,
    and the reverse proxies whose ``X-Forwarded-For`` tells that address."""

    name: str
    host: str
    port: int
    hosts: frozenset[str] = frozenset()
    rate_limit: Rate = field(default_factory=lambda: Rate(300, 60))
    trusted_proxies: tuple[Network, ...] = ()


@dataclass
class RouteSet:
    """What a plugin's ``watcher_routes`` returns: endpoints for the control API
    (``listener=None``) or for a listener of its own."""

    endpoints: list[Endpoint]
    listener: Listener | None = None


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def check_host(request: Request, daemon: Daemon) -> None:
    """Only the ``Host`` values in ``[api] hosts``: a web page whose name an attacker makes
    resolve to 127.0.0.1 (DNS rebinding) sends its own name and is refused."""
    api = daemon.config.api
    host = request.headers.get("host", "").strip().lower()
    if host in api.hosts or (host and not re.search(r":\d+$", host) and f"{host}:{api.port}" in api.hosts):
        return  # (a Host without a port names the host; the port it reached is ours)
    raise BadRequest(f"Host {host[:64]!r} is not one this API answers to (add it to [api] hosts)",
                     code="host_not_allowed", status=421)


def check_query(request: Request, endpoint: Endpoint) -> None:
    """``/v1`` routes refuse query parameters they do not take (a typo such as ``?stauts=``
    must not silently list everything) and parameters given twice (which one would count?)."""
    known = {q["name"] for q in endpoint.query}
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in known:
            hint = f" (this route takes: {', '.join(sorted(known))})" if known else " (this route takes none)"
            raise BadRequest(f"unknown query parameter {name[:64]!r}{hint}", code="unknown_parameter")
        if name in seen:
            raise BadRequest(f"query parameter {name[:64]!r} is given more than once", code="invalid_parameter")
        seen.add(name)


def storage_unavailable(endpoint: Endpoint, kind: str, e: BaseException) -> Response:
    """The 503 for a database that cannot be used right now. The failed transaction rolled
    back (``Database.transaction``); the log names the route and SQLite's reason, never the
    request's data."""
    log.warning("API %s %s: database %s (%s); nothing was written, answered 503", endpoint.method, endpoint.path,
                kind, e, extra={"storage_error": kind})
    reason = {"locked": "the database is locked by another process",
              "full": "the disk (or the database's size limit) is full",
              "io": "the database file cannot be read or written"}.get(kind, "the database is unavailable")
    return error_response(503, "storage_unavailable", f"{reason}; nothing was written, try again later",
                          {"retry-after": str(STORAGE_RETRY_AFTER)})


def wrap(endpoint: Endpoint, daemon: Daemon, auth: Authenticator) -> Callable[[Request], Awaitable[Response]]:
    strict_query = endpoint.path.startswith("/v1/")

    async def asgi_endpoint(request: Request) -> Response:
        principal: Principal | None = None
        rate_headers: dict[str, str] = {}
        try:
            check_host(request, daemon)
            body = None
            if endpoint.auth:
                try:
                    principal, body = await auth.authenticate(request, lambda: read_body(
                        request, daemon.config.api.max_body_bytes, daemon.config.api.body_timeout))
                except Unauthorized as e:
                    raise auth.failed(request, e) from None
                rate_headers = auth.authorize(principal, endpoint)
            if strict_query:
                check_query(request, endpoint)
            result = await endpoint.handler(ApiRequest(request, daemon, principal, auth, body))
            if principal is not None:
                daemon.metrics.api_requests.labels(principal.id, "ok").inc()
            if isinstance(result, Response):
                response = result
            elif isinstance(result, tuple):
                status, payload = result
                response = JSONResponse(payload, status_code=status)
            else:
                response = JSONResponse(result)
            response.headers.update(rate_headers)
            return response
        except WatcherError as e:
            headers = dict(rate_headers)
            if e.status == 401:
                headers["www-authenticate"] = "Bearer"
            if isinstance(e, TooManyRequests):
                headers.update(e.headers)
            if principal is not None:
                daemon.metrics.api_requests.labels(principal.id, e.code).inc()
            return error_response(e.status, e.code, e.message, headers)
        except ClientDisconnect:  # the client went away mid-body: nobody reads this answer
            log.debug("API %s %s: client disconnected before sending the whole body", endpoint.method, endpoint.path)
            return error_response(400, "client_disconnected", "the request body was cut short")
        except Exception as e:
            kind = record_storage_trouble(daemon.store.db, daemon.metrics, e)
            if kind is not None:  # locked, full: rolled back, the client may try again
                return storage_unavailable(endpoint, kind, e)
            log.exception("API %s %s failed", endpoint.method, endpoint.path)
            daemon.metrics.errors.labels("api").inc()
            return error_response(500, "internal_error", "internal error; see the daemon's log")

    return asgi_endpoint


def by_method(handlers: Mapping[str, Callable[[Request], Awaitable[Response]]]
              ) -> Callable[[Request], Awaitable[Response]]:
    """One Starlette endpoint for a path's handlers by HTTP method (HEAD is answered as GET),
    so that one Route per path names every method in a 405's Allow header."""

    async def endpoint(request: Request) -> Response:
        return await handlers["GET" if request.method == "HEAD" else request.method](request)

    return endpoint
