"""A fault-injecting JSON-RPC proxy: HTTP/1.1 (h11 over Trio streams) on 127.0.0.1 in front
of a real node, run as a task in the test's own Trio loop (so it also runs under MockClock).

Everything it does is switched at run time by the test:

- ``random_faults(rate, mix)``: each HTTP request gets a fault with probability ``rate``, the
  kind drawn from ``mix`` (weights) by a seeded ``random.Random``;
- ``inject(kind, times)``: the next ``times`` requests get ``kind`` (before any random fault);
- ``lagging(k, share)``: a share of the requests (1.0: all) is answered as a replica ``k``
  blocks behind would answer (batches included): ``eth_blockNumber`` is head - k, and blocks,
  logs, receipts and transactions above that height do not exist;
- ``go_down(refuse=...)`` / ``come_up()``: the node is gone: connections are refused (the
  listener is closed) or accepted and closed without an answer.

Fault kinds: ``latency`` (a delay, then the real answer), ``stall`` (longer than the client
waits), ``drop`` (forwarded, then the connection closed without an answer), ``drop_mid`` (the
answer cut off mid-body), ``http_500``/``http_502``/``http_503``, ``http_429`` (with
Retry-After), ``truncated`` (HTTP 200, the JSON cut short), ``malformed`` (HTTP 200 with
garbage: not JSON, HTML, JSON of the wrong shape, wrong or unusable ids, a batch answer with
an element missing: ``self.malformed``), ``rpc_error`` (HTTP 200, a JSON-RPC error object for
each call: ``self.rpc_error``); and, not in the default mix, ``bad_result`` (results of the
wrong type or shape, ``self.bad_results``: a broken node rather than an unreachable one) and
``no_result`` (every result ``null``: a replica that does not have the block yet).

``recent`` holds the calls of each recent HTTP request (how a client batches). ``injected``
counts every fault by kind (``lag`` per request served by the lagging view,
``lag_hidden`` per result it hid, clamped or refused, ``down`` per connection closed while
down), ``variants`` the malformed answers and bad results by variant, ``methods`` the calls
seen: tests assert that the faults really happened.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import h11
import httpx
import orjson
import trio

DEFAULT_MIX: dict[str, float] = {
    "latency": 4, "stall": 0.5, "drop": 2, "drop_mid": 1.5, "http_500": 1, "http_502": 1, "http_503": 1,
    "http_429": 1, "truncated": 2, "malformed": 3, "rpc_error": 1,
}
# not in the default mix: answers from a node that is broken rather than unreachable
EXTRA_KINDS = ("bad_result", "no_result")
KINDS = (*DEFAULT_MIX, *EXTRA_KINDS, "lag", "lag_hidden", "down")

# state-reading methods whose block tag is the parameter at this index
_STATE_TAG = {"eth_getBalance": 1, "eth_call": 1, "eth_getTransactionCount": 1, "eth_getCode": 1,
              "eth_getStorageAt": 2}
_HTTP_STATUS = {"http_500": 500, "http_502": 502, "http_503": 503, "http_429": 429}
# wrong types and shapes only: a well-formed wrong value (another chain id, an empty list of
# logs) is a lying node, which no client can tell from the truth
BAD_RESULTS: tuple[Any, ...] = ("0xzz", "0x", "garbage", 12345, True, {"number": "0x1"}, [None])
# what a "malformed" answer can be: raw bodies, and rewrites of the real answer
_RAW_GARBAGE = {
    "binary": b"\x00\xff\xfe garbage \x81",
    "html": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
    "null": b"null", "object": b"{}", "array": b"[]", "string": b'"ok"', "number": b"42",
    "envelope": b'{"jsonrpc": "2.0"}',
}
MALFORMED = (*_RAW_GARBAGE, "other_ids", "unhashable_ids", "no_result", "batch_short")


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    cut: int | None = None  # send only this many body bytes (of a full Content-Length), then close
    close: bool = False  # close without answering


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0):
        self.upstream = upstream
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.requests = 0  # HTTP requests received (and not refused)
        self.methods: Counter[str] = Counter()  # JSON-RPC calls seen, by method
        self.recent: deque[tuple[str, ...]] = deque(maxlen=2000)  # the calls of each recent HTTP request
        self.url = ""
        self.port = 0
        # random faults
        self.rate = 0.0
        self.mix: dict[str, float] = dict(DEFAULT_MIX)
        self.latency = (0.02, 0.3)  # seconds, uniform
        self.stall = 3.0  # seconds; make it longer than the client's timeout
        self.retry_after = "1"
        self.rpc_error = (-32603, "internal error")  # (code, message) of "rpc_error" answers
        self.malformed: tuple[str, ...] = MALFORMED  # the variants "malformed" picks from
        self.bad_results: tuple[Any, ...] = BAD_RESULTS  # the values "bad_result" picks from
        self.variants: Counter[str] = Counter()  # which malformed variants / bad results were sent
        # (kind, only for this method, only for a body holding this text, the (code, message)
        # of an injected rpc_error)
        self._forced: deque[tuple[str, str | None, bytes | None, tuple[int, str] | None]] = deque()
        # lagging replica
        self.lag: int | None = None
        self.lag_share = 1.0
        self.lag_range_error = False
        self.lag_only: tuple[str, ...] | None = None
        # down
        self.down = False
        self.refuse = False
        self._changed = trio.Event()
        self._client: httpx.AsyncClient | None = None
        self._ids = 0

    # --- switches (call from the test) ------------------------------------------------------

    def random_faults(self, rate: float, mix: dict[str, float] | None = None) -> None:
        """Give each request a fault with probability ``rate`` (0 turns random faults off)."""
        assert 0.0 <= rate <= 1.0
        unknown = set(mix or ()) - {*DEFAULT_MIX, *EXTRA_KINDS}
        assert not unknown, f"unknown fault kinds {unknown}"
        self.rate = rate
        if mix is not None:
            self.mix = dict(mix)

    def inject(self, kind: str, times: int = 1, *, method: str | None = None, holding: str | None = None,
               error: tuple[int, str] | None = None) -> None:
        """The next ``times`` requests (with ``method``: that call them; with ``holding``:
        whose body holds that text, e.g. one signed transaction) get ``kind``; an
        ``rpc_error`` with ``error`` answers that (code, message) instead of ``self.rpc_error``."""
        assert kind in DEFAULT_MIX or kind in EXTRA_KINDS, kind
        assert error is None or kind == "rpc_error"
        self._forced.extend([(kind, method, None if holding is None else holding.encode(), error)] * times)

    def clear(self) -> None:
        """No more faults of any kind: random, forced, lagging, down."""
        self.rate = 0.0
        self._forced.clear()
        self.lagging(None)
        self.come_up()

    def lagging(self, blocks: int | None, share: float = 1.0, *, range_error: bool = False,
                only: tuple[str, ...] | None = None) -> None:
        """Answer ``share`` of the requests as a node ``blocks`` behind would (None: never);
        with ``only``, just the requests for those methods. eth_getLogs from above its head
        gets ``[]``, or with ``range_error`` the error anvil gives ("BlockOutOfRangeError",
        code -32602)."""
        assert blocks is None or blocks > 0
        self.lag, self.lag_share, self.lag_range_error, self.lag_only = blocks, share, range_error, only

    def go_down(self, *, refuse: bool = True) -> None:
        """The node is gone: refuse connections (listener closed) or close each one unanswered."""
        self.down, self.refuse = True, refuse
        self._notify()

    def come_up(self) -> None:
        self.down = self.refuse = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await self._changed.wait()

    # --- serving ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(120.0), trust_env=False,
                                         headers={"content-type": "application/json"})
        try:
            started = False
            while True:
                # the same port every time, so the daemon's configured URL stays valid
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                self.port = listeners[0].socket.getsockname()[1]
                self.url = f"http://127.0.0.1:{self.port}"
                async with trio.open_nursery() as serving:
                    serving.start_soon(trio.serve_listeners, self._handle, listeners)
                    if not started:
                        task_status.started()
                        started = True
                    await self._until(lambda: self.down and self.refuse)
                    serving.cancel_scope.cancel()  # closes the listener and every open connection
                await self._until(lambda: not (self.down and self.refuse))
        finally:
            with trio.CancelScope(shield=True):
                await self._client.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                got = await _read_request(stream, conn)
                if got is None:
                    return
                if self.down:
                    self.injected["down"] += 1
                    return
                self.requests += 1
                reply = await self._reply(got)
                if reply.close:
                    return
                headers = [("content-type", "application/json"), ("content-length", str(len(reply.body))),
                           *reply.headers]
                data = conn.send(h11.Response(status_code=reply.status, headers=headers))
                if reply.cut is not None:
                    await stream.send_all(data + reply.body[:reply.cut])
                    return
                data += conn.send(h11.Data(data=reply.body)) + conn.send(h11.EndOfMessage())
                await stream.send_all(data)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    def _pick(self, methods: set[str], body: bytes) -> tuple[str | None, tuple[int, str] | None]:
        for forced in self._forced:
            if (forced[1] is None or forced[1] in methods) and (forced[2] is None or forced[2] in body):
                self._forced.remove(forced)
                return forced[0], forced[3]
        if self.rate and self.rng.random() < self.rate:
            kinds = list(self.mix)
            return self.rng.choices(kinds, weights=[self.mix[k] for k in kinds])[0], None
        return None, None

    async def _reply(self, body: bytes) -> _Reply:
        kind, error = self._pick(self._count_methods(body), body)
        if kind is not None:
            self.injected[kind] += 1
        if kind in _HTTP_STATUS:
            headers = (("retry-after", self.retry_after),) if kind == "http_429" else ()
            return _Reply(_HTTP_STATUS[kind], b"injected fault: " + kind.encode(), headers)
        if kind == "rpc_error":
            return _Reply(200, self._rpc_errors(body, error or self.rpc_error))
        if kind == "latency":
            await trio.sleep(self.rng.uniform(*self.latency))
        elif kind == "stall":
            await trio.sleep(self.stall)
        status, content = await self._answer(body)
        if kind == "drop":
            return _Reply(close=True)  # the node did the work; the answer is lost
        if kind == "drop_mid" and len(content) > 1:
            return _Reply(status, content, cut=self.rng.randint(0, len(content) - 1))
        if kind == "truncated" and len(content) > 1:
            return _Reply(200, content[:self.rng.randint(1, len(content) - 1)])
        if kind == "malformed":
            return _Reply(200, self._garbage(content))
        if kind == "bad_result":
            return _Reply(200, self._bad_results(content))
        if kind == "no_result":
            return _Reply(200, self._no_results(content))
        return _Reply(status, content)

    def _count_methods(self, body: bytes) -> set[str]:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            return set()
        methods = [str(c.get("method")) for c in (req if isinstance(req, list) else [req]) if isinstance(c, dict)]
        self.methods.update(methods)
        self.recent.append(tuple(methods))
        return set(methods)

    def _garbage(self, real: bytes) -> bytes:
        """A 200 answer no client should believe: not JSON, or JSON that does not answer
        (one of ``self.malformed``, those that fit this answer)."""
        try:
            data = orjson.loads(real)
        except orjson.JSONDecodeError:
            data = None
        items = data if isinstance(data, list) else [data]

        def reshape(fn: Callable[[dict[str, Any]], Any]) -> bytes:
            out = [fn(i) for i in items]
            return orjson.dumps(out if isinstance(data, list) else out[0])

        makers: dict[str, Callable[[], bytes]] = {k: partial(bytes, g) for k, g in _RAW_GARBAGE.items()}
        if items and all(isinstance(i, dict) and "id" in i for i in items):
            makers.update({
                # answers to other requests' ids
                "other_ids": lambda: reshape(lambda i: {**i, "id": i["id"] + 10**6 if isinstance(i["id"], int)
                                                        else "x"}),
                "unhashable_ids": lambda: reshape(lambda i: {**i, "id": [i["id"]]}),  # no dict can hold it
                "no_result": lambda: reshape(lambda i: {"jsonrpc": "2.0", "id": i["id"]}),
            })
            if isinstance(data, list) and len(data) > 1:
                makers["batch_short"] = lambda: orjson.dumps(data[:-1])  # the last answer missing
        names = [k for k in self.malformed if k in makers] or list(_RAW_GARBAGE)
        name = self.rng.choice(names)
        self.variants[name] += 1
        return makers[name]()

    def _rpc_errors(self, body: bytes, error: tuple[int, str]) -> bytes:
        """A JSON-RPC error object for every call of the request (the node is not asked)."""
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            req = None
        code, message = error
        calls = req if isinstance(req, list) else [req]
        out = [{"jsonrpc": "2.0", "id": c.get("id") if isinstance(c, dict) else None,
                "error": {"code": code, "message": message}} for c in calls]
        return orjson.dumps(out if isinstance(req, list) else out[0])

    def _no_results(self, real: bytes) -> bytes:
        """Every result ``null``: what a replica that does not have the block yet answers to
        ``trace_block`` (and ``eth_getBlockByNumber``)."""
        try:
            data = orjson.loads(real)
        except orjson.JSONDecodeError:
            return real
        items = data if isinstance(data, list) else [data]
        out = [{**i, "result": None} if isinstance(i, dict) and "result" in i else i for i in items]
        return orjson.dumps(out if isinstance(data, list) else out[0])

    def _bad_results(self, real: bytes) -> bytes:
        """A well-formed JSON-RPC answer whose results are of the wrong type or shape."""
        try:
            data = orjson.loads(real)
        except orjson.JSONDecodeError:
            return real
        items = data if isinstance(data, list) else [data]
        out = []
        for i in items:
            if isinstance(i, dict) and "result" in i:
                value = self.rng.choice(self.bad_results)
                self.variants[f"bad_result={value!r}"] += 1
                i = {**i, "result": value}
            out.append(i)
        return orjson.dumps(out if isinstance(data, list) else out[0])

    # --- upstream -----------------------------------------------------------------------------

    async def _forward(self, body: bytes) -> tuple[int, bytes]:
        assert self._client is not None
        try:
            r = await self._client.post(self.upstream, content=body)
        except httpx.HTTPError as e:
            return 502, f"upstream: {type(e).__name__}".encode()
        return r.status_code, r.content

    async def _upstream(self, method: str, *params: Any) -> Any:
        self._ids += 1
        status, content = await self._forward(orjson.dumps(
            {"jsonrpc": "2.0", "id": self._ids, "method": method, "params": list(params)}))
        if status != 200:
            raise RuntimeError(f"upstream {method}: HTTP {status}")
        return orjson.loads(content).get("result")

    async def _answer(self, body: bytes) -> tuple[int, bytes]:
        if self.lag is not None and self.rng.random() < self.lag_share:
            try:
                req = orjson.loads(body)
            except orjson.JSONDecodeError:
                req = None
            calls = req if isinstance(req, list) else [req]
            if isinstance(req, dict | list) and (self.lag_only is None or any(
                    isinstance(c, dict) and c.get("method") in self.lag_only for c in calls)):
                self.injected["lag"] += 1
                return await self._lagging(req, self.lag)
        return await self._forward(body)

    # --- the lagging replica --------------------------------------------------------------------

    async def _lagging(self, req: Any, lag: int) -> tuple[int, bytes]:
        """Answer as a node ``lag`` blocks behind the real one: requests for what it would not
        have yet are answered with null/empty (or the error such a node gives), "latest" means
        its own head, and results above its head are hidden."""
        tip = max(0, int(await self._upstream("eth_blockNumber"), 16) - lag)
        calls = req if isinstance(req, list) else [req]
        local: dict[int, dict[str, Any]] = {}  # position -> the answer, not forwarded
        fixes: dict[int, Callable[[Any], Any]] = {}  # position -> rewrite of the real result
        sent: list[tuple[int, dict[str, Any]]] = []
        for pos, call in enumerate(calls):
            if not isinstance(call, dict):
                sent.append((pos, call))
                continue
            call, answer, fix = await self._lag_rewrite(call, tip)
            if answer is not None:
                local[pos] = answer
            else:
                sent.append((pos, call))
                if fix is not None:
                    fixes[pos] = fix
        answers: dict[int, Any] = {}
        if sent:
            batch = [c for _, c in sent]
            status, content = await self._forward(orjson.dumps(batch))
            if status != 200:
                return status, content
            data = orjson.loads(content)
            by_id = {i.get("id"): i for i in data if isinstance(i, dict)} if isinstance(data, list) else {}
            for pos, c in sent:
                item = by_id.get(c.get("id")) if isinstance(c, dict) else None
                if item is None:
                    continue
                if pos in fixes and "result" in item:
                    new = fixes[pos](item["result"])
                    if new != item["result"]:
                        self.injected["lag_hidden"] += 1
                    item = {**item, "result": new}
                answers[pos] = item
        for pos, answer in local.items():
            self.injected["lag_hidden"] += 1
            answers[pos] = answer
        out = [answers[p] for p in range(len(calls)) if p in answers]
        return 200, orjson.dumps(out if isinstance(req, list) else (out[0] if out else None))

    async def _lag_rewrite(self, call: dict[str, Any], tip: int) -> tuple[
            dict[str, Any], dict[str, Any] | None, Callable[[Any], Any] | None]:
        """(call to forward, local answer or None, rewrite of the forwarded call's result)."""
        method = call.get("method")
        params = list(call.get("params") or [])
        rid = call.get("id")

        def result(value: Any) -> dict[str, Any]:
            return {"jsonrpc": "2.0", "id": rid, "result": value}

        def error(message: str, code: int = -32000) -> dict[str, Any]:
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}

        def above(tag: Any) -> bool:
            return isinstance(tag, str) and tag.startswith("0x") and int(tag, 16) > tip

        def with_params(p: list[Any]) -> dict[str, Any]:
            return {**call, "params": p}

        def hide_if_above(r: Any) -> Any:
            return None if isinstance(r, dict) and above(r.get("blockNumber") or r.get("number")) else r

        if method == "eth_blockNumber":
            return call, result(hex(tip)), None
        if method in ("eth_getBlockByNumber", "eth_getBlockReceipts", "trace_block") and params:
            if params[0] in ("latest", "pending"):
                return with_params([hex(tip), *params[1:]]), None, None
            if above(params[0]):
                return call, result(None), None
            return call, None, None
        if method in ("eth_getBlockByHash", "eth_getTransactionReceipt", "eth_getTransactionByHash"):
            return call, None, hide_if_above
        if method == "eth_getLogs" and params and isinstance(params[0], dict):
            flt = dict(params[0])
            if "blockHash" in flt:
                block = await self._upstream("eth_getBlockByHash", flt["blockHash"], False)
                if block is not None and above(block["number"]):
                    return call, error("unknown block"), None
                return call, None, None
            if flt.get("toBlock") in (None, "latest", "pending") or above(flt.get("toBlock")):
                flt["toBlock"] = hex(tip)
            if flt.get("fromBlock") in ("latest", "pending"):
                flt["fromBlock"] = hex(tip)
            if above(flt.get("fromBlock")):
                if self.lag_range_error:
                    return call, error(f"BlockOutOfRangeError: block height is {tip} but requested was "
                                       f"{int(flt['fromBlock'], 16)}", -32602), None
                return call, result([]), None
            return with_params([flt]), None, (lambda logs: [x for x in logs if not above(x.get("blockNumber"))]
                                              if isinstance(logs, list) else logs)
        if method in _STATE_TAG:
            i = _STATE_TAG[method]
            if len(params) > i:
                if params[i] == "latest":
                    return with_params([*params[:i], hex(tip), *params[i + 1:]]), None, None
                if above(params[i]):
                    return call, error("header not found"), None
        return call, None, None


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> bytes | None:
    """The body of the next request on this connection, or None when the client closed it."""
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


@contextlib.asynccontextmanager
async def fault_proxy(upstream: str, *, seed: int = 0) -> AsyncIterator[FaultProxy]:
    """``async with fault_proxy(anvil.url) as proxy:`` -> ``proxy.url`` forwards to ``upstream``."""
    proxy = FaultProxy(upstream, seed=seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()
