"""A real webhook receiver: an HTTP server on 127.0.0.1 (Hypercorn under Trio, in the test's
own loop, so it also runs under MockClock). It records every request and answers with what
``behavior`` says; it verifies nothing itself: tests verify signatures as an app would, with
the ``standardwebhooks`` library."""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # trio.current_time()
    wall: float = 0.0  # time.time() on arrival

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


# behavior(received) -> status, or (status, headers); may be async (e.g. to hang)
Behavior = Callable[[Received], int | tuple[int, dict[str, str]] | Awaitable[Any]]


@dataclass
class Receiver:
    behavior: Behavior = lambda r: 200
    requests: list[Received] = field(default_factory=list)
    url: str = ""

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        rec = Received(headers={k.decode().lower(): v.decode() for k, v in scope["headers"]}, body=body,
                       at=trio.current_time(), wall=time.time())
        self.requests.append(rec)
        result = self.behavior(rec)
        if inspect.isawaitable(result):
            result = await result
        status, headers = result if isinstance(result, tuple) else (result, {})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": b"ok"})

    def unique(self, *, ok_only: bool = True) -> dict[str, Received]:
        """Requests deduplicated on webhook-id (what an app would do), last answer wins."""
        out: dict[str, Received] = {}
        for r in self.requests:
            out.setdefault(r.webhook_id, r)
        return out

    def types(self) -> list[str]:
        return [r.json["type"] for r in self.requests]


@contextlib.asynccontextmanager
async def receiving(behavior: Behavior | None = None) -> AsyncIterator[Receiver]:
    rec = Receiver(behavior) if behavior else Receiver()
    cfg = Config()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = 0.1
    async with trio.open_nursery() as nursery:
        app: Any = rec.app  # an ASGI app; hypercorn's types want its scope and events typed
        binds = await nursery.start(lambda task_status: serve(app, cfg, task_status=task_status))
        rec.url = binds[0] + "/hook"
        yield rec
        nursery.cancel_scope.cancel()
