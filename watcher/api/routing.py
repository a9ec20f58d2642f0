"""The API's plumbing: one table of endpoints (which also produces the OpenAPI document),
bearer-token auth, JSON bodies with a size limit, and one error shape:
``{"error": {"code": "<machine_code>", "message": "<human text>"}}``."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import BadRequest, Forbidden, Unauthorized, WatcherError

if TYPE_CHECKING:
    from ..daemon import Daemon

log = logging.getLogger(__name__)


class PayloadTooLarge(WatcherError):
    """The request body is larger than ``api.max_body_bytes``."""

    status = 413
    code = "payload_too_large"


@dataclass
class ApiRequest:
    """What a handler gets: the Starlette request, the daemon, and who is calling."""

    request: Request
    daemon: Daemon
    token_name: str | None
    _body: Any = None

    @property
    def actor(self) -> str:
        """Who is calling, for the audit log: the name of the API token used."""
        return self.token_name or "anonymous"

    @property
    def path_params(self) -> Mapping[str, str]:
        return self.request.path_params

    def query(self, name: str, default: str | None = None) -> str | None:
        return self.request.query_params.get(name, default)

    def query_int(self, name: str, default: int, *, lo: int, hi: int) -> int:
        raw = self.request.query_params.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"query parameter {name} must be an integer", code="invalid_parameter") from None
        if not lo <= value <= hi:
            raise BadRequest(f"query parameter {name} must be between {lo} and {hi}", code="invalid_parameter")
        return value

    async def json(self) -> dict[str, Any]:
        """The body as a JSON object (400 if malformed or not an object, 413 if too big)."""
        if self._body is not None:
            return self._body
        limit = self.daemon.config.api.max_body_bytes
        declared = self.request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks, size = [], 0
        async for chunk in self.request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise BadRequest("request body must be a JSON object", code="malformed_json")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise BadRequest("request body is not valid JSON", code="malformed_json") from None
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
    admin: bool = False  # needs an admin token ([api] admin_token)
    query: tuple[dict[str, Any], ...] = ()  # OpenAPI parameter objects (in: query)
    body: dict[str, Any] | None = None  # JSON schema of the request body
    responses: dict[int, dict[str, Any]] = field(default_factory=dict)  # status -> JSON schema
    errors: tuple[int, ...] = ()


class Endpoints:
    """The endpoint table; ``add`` is used as a decorator by the route modules."""

    def __init__(self) -> None:
        self.items: list[Endpoint] = []

    def add(self, method: str, path: str, *, summary: str, auth: bool = True, tag: str = "misc",
            admin: bool = False, query: tuple[dict[str, Any], ...] = (), body: dict[str, Any] | None = None,
            responses: dict[int, dict[str, Any]] | None = None, errors: tuple[int, ...] = ()
            ) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.items.append(Endpoint(method, path, fn, summary, auth, tag, admin, query, body, responses or {},
                                       errors))
            return fn
        return deco


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def authenticate(request: Request, tokens: Mapping[str, str]) -> str:
    """Return the name of the token the request carries, or raise :class:`Unauthorized`."""
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    given_b = given.strip().encode()
    found = None
    for name, token in tokens.items():
        # compare against every token so timing says nothing about which one was close
        if hmac.compare_digest(given_b, token.encode()):
            found = name
    if found is None:
        raise Unauthorized("invalid bearer token")
    return found


def wrap(endpoint: Endpoint, daemon: Daemon) -> Callable[[Request], Awaitable[Response]]:
    async def asgi_endpoint(request: Request) -> Response:
        try:
            token_name = authenticate(request, daemon.config.api.tokens) if endpoint.auth else None
            if endpoint.admin and token_name not in daemon.config.api.admin_tokens:
                raise Forbidden("this route needs the admin token ([api] admin_token)", code="admin_only")
            result = await endpoint.handler(ApiRequest(request, daemon, token_name))
        except WatcherError as e:
            headers = {"www-authenticate": "Bearer"} if e.status == 401 else None
            return error_response(e.status, e.code, e.message, headers)
        except Exception:
            log.exception("API %s %s failed", endpoint.method, endpoint.path)
            daemon.metrics.errors.labels("api").inc()
            return error_response(500, "internal_error", "internal error; see the daemon's log")
        if isinstance(result, Response):
            return result
        if isinstance(result, tuple):
            status, payload = result
            return JSONResponse(payload, status_code=status)
        return JSONResponse(result)

    return asgi_endpoint
