"""JSON-RPC 2.0 over HTTP with httpx: batching, bounded concurrency, timeouts, retries.

Chain plugins use this instead of web3's providers (web3's async provider is asyncio-only;
watcher runs on Trio). One :class:`JsonRpc` per configured chain; every exchange is counted
in the metrics with the chain id and method.
"""

from __future__ import annotations

import binascii
import collections
import itertools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import httpcore
import httpx
import orjson
import trio

from .errors import NodeError, RpcError
from .httpclient import parse_retry_after
from .metrics import Metrics
from .tasks import fan_out
from .wire import WireTransport

log = logging.getLogger(__name__)

# JSON-RPC error codes that mean "do not ask again, the answer will be the same".
_FINAL_RPC_CODES = {-32600, -32601, -32602, 3}
# Codes providers use for "too much at once": the caller should split the request.
TOO_LARGE_RPC_CODES = {-32005, -32602, -32011}

Call = tuple[str, Sequence[Any]]
MAX_RETRY_AFTER = 60.0  # a node's Retry-After is honoured up to this many seconds


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries per call before the error reaches the caller
    # tries of a call that timed out: a hung node shows as down after about 2 x rpc_timeout
    timeout_attempts: int = 2
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter: attempt 1 waits up to base_delay, ..."""
        cap = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return random.uniform(cap / 2, cap)


# httpcore reads a response 64 KiB at a time, and each read goes through trio, h11 and httpx
# again: a catch-up receives tens of megabytes a second, where that per-read work was half of
# the client's CPU. Reads of up to 1 MiB (what the socket holds; a small answer still costs
# one small read) took receiving 1,000 serialized Litecoin blocks from 0.21 to 0.13 ms of CPU
# a block (docs/performance.md). The size is httpcore's class attribute, so it holds for
# every httpx connection of the process: JSON-RPC and the rates plugin's fetches (webhooks
# go out through watcher.httpclient)
READ_BYTES = 1 << 20
if getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", READ_BYTES) < READ_BYTES:
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_BYTES


class JsonRpc:
    """A JSON-RPC client for one node URL."""

    def __init__(
        self,
        url: str,
        *,
        chain: str,
        metrics: Metrics,
        timeout: float = 10.0,
        concurrency: int = 8,
        max_batch: int = 100,
        retry: RetryPolicy | None = None,
        final_codes: frozenset[int] = frozenset(),
        credentials: Callable[[], tuple[str, str]] | None = None,
        unhex: Callable[[memoryview], bytes] = binascii.unhexlify,
        lean_http: bool = False,
    ):
        """``final_codes``: the node's own JSON-RPC error codes that mean "asking again gives
        the same answer" (beyond JSON-RPC's), e.g. Bitcoin Core's -5 and -8. ``credentials``:
        where HTTP basic-auth credentials come from (e.g. Bitcoin Core's ``.cookie``, rewritten
        at each start of the node): read at the first request and again after a 401.
        ``unhex``: how :meth:`batch_hex` turns a result's hex text into bytes (a family may
        have a faster one than ``binascii``'s; it raises ``ValueError`` on text that is not
        hex). ``lean_http``: httpx sends to an ``http://`` node through
        :class:`watcher.wire.WireTransport` (each answer read into one buffer) instead of
        httpcore; for a family whose answers are large (serialized blocks)."""
        self._unhex = unhex
        self.url = url
        self._credentials = credentials
        self._auth: tuple[str, str] | None = None
        self.final_codes = _FINAL_RPC_CODES | final_codes
        self.chain = chain
        self.metrics = metrics
        self.timeout = timeout
        self.max_batch = max_batch
        self.retry = retry or RetryPolicy()
        self._limiter = trio.CapacityLimiter(concurrency)
        self._ids = itertools.count(1)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            headers={"content-type": "application/json"},
            trust_env=False,
            # loading the CA bundle costs ~30 ms a client; a plain-http node has no use for it
            verify=url.startswith("https:"),
            transport=WireTransport(max_connections=concurrency) if lean_http and url.startswith("http://") else None,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call_exact(self, method: str, *params: Any) -> Any:
        """Like :meth:`call`, but numbers with a fraction are parsed as exact ``Decimal``s
        (Bitcoin Core writes amounts as JSON numbers of coins: a float can lose a satoshi of a
        large one). Slower than :meth:`call`; for the rare answer that needs it."""
        (result,) = await self._send_with_retry([(method, params)], decode="exact")
        if isinstance(result, Exception):
            raise result
        return result

    async def probe(self, method: str, *params: Any) -> Any:
        """One call, tried once (no retry): how a node's health is checked."""
        (result,) = await self._send([(method, params)])
        if isinstance(result, Exception):
            raise result
        return result

    async def broadcast(self, method: str, *params: Any) -> Any:
        """A call every node should see (a signed transaction): with one node, :meth:`call`
        (a :class:`~watcher.nodes.NodePool` sends it to all of its nodes)."""
        return await self.call(method, *params)

    async def call(self, method: str, *params: Any) -> Any:
        """One call; returns its ``result`` or raises :class:`RpcError` / :class:`NodeError`."""
        (result,) = await self.batch([(method, params)])
        return result

    async def batch(self, calls: Sequence[Call], *, decode: Decode = "json") -> list[Any]:
        """Many calls, sent as JSON-RPC batches of at most ``max_batch`` calls, concurrently.
        Returns the results in order; raises on the first call that failed."""
        results = await self.batch_outcomes(calls, decode=decode)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    async def batch_hex(self, calls: Sequence[Call]) -> list[bytes]:
        """Like :meth:`batch`, for calls whose results are hex strings (a serialized block or
        transaction): the results as bytes. A node's answer laid out as Bitcoin Core writes it
        is read without a JSON parser (:func:`_hex_results`: for blocks of 120 transactions,
        ~0.05 ms a block instead of ~0.135 to parse the JSON and then the hex); any other
        answer is parsed as JSON, and a result that is not hex is a :class:`NodeError`."""
        return await self.batch(calls, decode="hex")

    async def batch_outcomes(self, calls: Sequence[Call], *, decode: Decode = "json") -> list[Any]:
        """Like :meth:`batch`, but a call that failed with a JSON-RPC error gives its
        :class:`RpcError` in place of a result instead of raising (transport failures still
        raise once retries are spent)."""
        if not calls:
            return []
        chunks = [list(calls[i:i + self.max_batch]) for i in range(0, len(calls), self.max_batch)]
        if len(chunks) == 1:
            return await self._send_with_retry(chunks[0], decode=decode)
        out: list[list[Any]] = [[] for _ in chunks]

        async def run(i: int) -> None:
            out[i] = await self._send_with_retry(chunks[i], decode=decode)

        async with fan_out() as nursery:
            for i in range(len(chunks)):
                nursery.start_soon(run, i)
        return [r for chunk in out for r in chunk]

    async def _send_with_retry(self, calls: list[Call], attempt: int = 0, *, decode: Decode = "json") -> list[Any]:
        while True:
            attempt += 1
            try:
                results = await self._send(calls, decode=decode)
            except NodeError as e:
                if not e.retryable or attempt >= (self.retry.timeout_attempts if e.timed_out else self.retry.attempts):
                    raise
                delay = e.retry_after or self.retry.delay(attempt)
                await trio.sleep(delay)
                continue
            # Retry only the calls whose error is transient (e.g. a rate-limit per call).
            retry_idx = [i for i, r in enumerate(results) if isinstance(r, RpcError) and r.retryable]
            if not retry_idx or attempt >= self.retry.attempts:
                return results
            await trio.sleep(self.retry.delay(attempt))
            again = await self._send_with_retry([calls[i] for i in retry_idx], attempt, decode=decode)
            for i, r in zip(retry_idx, again, strict=True):
                results[i] = r
            return results

    async def _send(self, calls: list[Call], *, decode: Decode = "json") -> list[Any]:
        first = calls[0][0]
        label = first if len(calls) == 1 else ("batch:" + first if all(c[0] == first for c in calls) else "batch")
        ids = [next(self._ids) for _ in calls]
        payload = [
            {"jsonrpc": "2.0", "id": i, "method": m, "params": list(p)} for i, (m, p) in zip(ids, calls, strict=True)
        ]
        body = orjson.dumps(payload if len(calls) > 1 else payload[0])
        for m, n in collections.Counter(m for m, _ in calls).items():  # a batch is mostly one method
            self.metrics.child(self.metrics.rpc_requests, self.chain, m).inc(n)
        async with self._limiter:
            t0 = time.perf_counter()
            try:
                with trio.fail_after(self.timeout + 1):
                    resp = await self._post(body)
            except (httpx.TimeoutException, trio.TooSlowError):
                self._error(label, "timeout")
                raise NodeError(f"{self.chain}: {label} timed out after {self.timeout}s", timed_out=True) from None
            except httpx.TransportError as e:
                self._error(label, "connect")
                raise NodeError(f"{self.chain}: cannot reach node: {type(e).__name__}") from None
            finally:
                self.metrics.child(self.metrics.rpc_latency, self.chain, label).observe(time.perf_counter() - t0)
        data = _parse(resp.content, decode=decode, unhex=self._unhex)
        if resp.status_code != 200 and not _is_rpc_error(data):
            self._error(label, "http")
            raise NodeError(f"{self.chain}: node answered HTTP {resp.status_code} to {label}",
                            retryable=resp.status_code in (408, 425, 429) or resp.status_code >= 500,
                            retry_after=parse_retry_after(resp.headers.get("retry-after"), time.time(),
                                                          cap=MAX_RETRY_AFTER))
        # (a JSON-RPC error answered with an HTTP error status, as Bitcoin Core does for a single
        # call, is the node's answer like any other: its code says what went wrong)
        if data is _NOT_JSON:
            self._error(label, "decode")
            raise NodeError(f"{self.chain}: node sent a response that is not JSON to {label}")
        results = self._match(calls, ids, data, label)
        if decode == "hex":
            results = [self._hex(method, r) for (method, _), r in zip(calls, results, strict=True)]
        return results

    def _hex(self, method: str, result: Any) -> Any:
        """A result that must be a hex string, as bytes (read by :func:`_hex_results`, or
        here after a JSON parse); an error stays what it is."""
        if isinstance(result, bytes | RpcError):
            return result
        if isinstance(result, str):
            try:
                return bytes.fromhex(result)
            except ValueError:
                pass
        self._error(method, "decode")
        raise NodeError(f"{self.chain}: {method}: the node's answer is not a hex string")

    async def _post(self, body: bytes) -> httpx.Response:
        if self._credentials is None:
            return await self._client.post(self.url, content=body)
        if self._auth is None:
            self._auth = self._read_credentials()
        resp = await self._client.post(self.url, content=body, auth=self._auth)
        if resp.status_code == 401:  # the node restarted and wrote new credentials
            self._auth = self._read_credentials()
            resp = await self._client.post(self.url, content=body, auth=self._auth)
        return resp

    def _read_credentials(self) -> tuple[str, str]:
        assert self._credentials is not None
        try:
            return self._credentials()
        except OSError as e:  # never say what is in the file, only that it cannot be read
            raise NodeError(f"{self.chain}: cannot read the node's credentials: {e.strerror or type(e).__name__}") from None

    def _match(self, calls: list[Call], ids: list[int], data: Any, label: str) -> list[Any]:
        items = data if isinstance(data, list) else [data]
        by_id: dict[Any, Any] = {}
        for item in items:
            # An id that is a JSON array or object answers none of our (integer) ids; hashing it
            # would raise TypeError and crash the caller's task instead of failing this exchange.
            if isinstance(item, dict) and "id" in item and not isinstance(item["id"], list | dict):
                by_id[item["id"]] = item
            elif isinstance(item, dict) and "error" in item and len(calls) == 1:
                # a node may answer a whole request with one error object without an id
                by_id[ids[0]] = item
        results: list[Any] = []
        for rid, (method, _) in zip(ids, calls, strict=True):
            item = by_id.get(rid)
            if item is None:
                self._error(method, "decode")
                raise NodeError(f"{self.chain}: node left {method} (id {rid}) unanswered in {label}")
            if "error" in item and item["error"] is not None:
                e = item["error"] if isinstance(item["error"], dict) else {"message": str(item["error"])}
                raw_code = e.get("code")
                code = raw_code if isinstance(raw_code, int) else None
                msg = str(e.get("message", "error"))[:300]
                self._error(method, "rpc")
                results.append(RpcError(f"{self.chain}: {method}: {msg} (code {code})",
                                        retryable=code not in self.final_codes and not _looks_final(msg),
                                        rpc_code=code))
            elif "result" in item:
                results.append(item["result"])
            else:
                self._error(method, "decode")
                raise NodeError(f"{self.chain}: {method}: response has neither result nor error")
        return results

    def _error(self, method: str, kind: str) -> None:
        self.metrics.rpc_errors.labels(self.chain, method, kind).inc()


_NOT_JSON: Any = object()
# how a response is read: JSON ("json"), JSON with exact decimals ("exact"), or results that
# are hex strings as bytes ("hex")
Decode = Literal["json", "exact", "hex"]


def _parse(content: bytes, *, decode: Decode, unhex: Callable[[memoryview], bytes] = binascii.unhexlify) -> Any:
    if decode == "hex":
        items = _hex_results(content, unhex)
        if items is not None:
            return items
    try:
        if decode == "exact":
            return json.loads(content, parse_float=Decimal)
        return orjson.loads(content)
    except (orjson.JSONDecodeError, ValueError):
        return _NOT_JSON


# Bitcoin Core's answers, byte for byte: {"result":"<hex>","error":null,"id":7} (JSON-RPC
# 1.0 replies), or {"jsonrpc":"2.0","result":"<hex>","id":7} (v28 and later, to a 2.0 request)
_HEX_HEAD = re.compile(rb'\{(?:"jsonrpc":"2\.0",)?"result":"')
_HEX_TAIL = re.compile(rb'"(?:,"error":null)?,"id":(\d{1,18})\}')


def _hex_results(body: bytes, unhex: Callable[[memoryview], bytes] = binascii.unhexlify,
                 ) -> list[dict[str, Any]] | dict[str, Any] | None:
    """An answer whose every result is a hex string, read as Bitcoin Core lays it out (no
    spaces; while catching up the node sends megabytes of hex a second): each result's bytes,
    found with one memchr for its closing quote and decoded straight from the body. A batch
    gives a list, a single call its one object. None when the answer is laid out in any other
    way, holds an error, or a result is not hex; the caller then parses it as JSON."""
    batch = body.startswith(b"[")
    view = memoryview(body)
    items: list[dict[str, Any]] = []
    pos = 1 if batch else 0
    while True:
        head = _HEX_HEAD.match(body, pos)
        if head is None:
            return None
        start = head.end()
        end = body.find(b'"', start)
        tail = _HEX_TAIL.match(body, end) if end >= 0 else None
        if tail is None:
            return None
        try:
            value = unhex(view[start:end])
        except ValueError:  # odd length or not hex (an escape, say): the JSON parser decides
            return None
        items.append({"id": int(tail[1]), "result": value, "error": None})
        pos = tail.end()
        if not batch:
            return items[0] if not body[pos:].strip() else None
        if body[pos:pos + 1] == b"]":
            return items if not body[pos + 1:].strip() else None
        if body[pos:pos + 1] != b",":
            return None
        pos += 1


def _is_rpc_error(data: Any) -> bool:
    """A JSON-RPC answer made of error objects (whatever HTTP status came with it)."""
    items = data if isinstance(data, list) else [data]
    return bool(items) and all(isinstance(i, dict) and isinstance(i.get("error"), dict) for i in items)


def _looks_final(message: str) -> bool:
    m = message.lower()
    return "revert" in m or "not supported" in m

