"""A small HTTP/1.1 client for webhook deliveries: h11 over Trio streams, keep-alive
connections per origin, TLS with the system's certificates.

Why not httpx, which watcher uses for JSON-RPC? A delivery is one small POST whose answer is
mostly ignored, thousands of times a second: httpx spends about 0.7 ms of CPU per request
(measured in ``make bench``), this client about a tenth of that. It does exactly what a
webhook sender needs and nothing else: no redirects (a 3xx is an unsuccessful answer), no
cookies, no proxies, answers read up to ``max_body`` bytes.

``parse_retry_after`` is the one ``Retry-After`` parser: the dispatcher's and the JSON-RPC
client's, each with its own cap.
"""

from __future__ import annotations

import email.utils
import math
import ssl
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from urllib.parse import urlsplit

import h11
import trio

from . import netguard


def parse_retry_after(value: str | None, now: float, *, cap: float = 86400.0) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds, or an HTTP date read
    against ``now``, Unix seconds), between 0 and ``cap`` (a day unless told); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": an HTTP date is UTC anyway
            when = when.replace(tzinfo=UTC)
        secs = when.timestamp() - now
    if not math.isfinite(secs):
        return None
    return min(max(secs, 0.0), cap)


class DeliveryError(Exception):
    """The exchange failed before an answer arrived (connect, TLS, reset, malformed answer)."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    private: bool = False  # from a private address (a host the operator listed): never show the body


class _Conn:
    def __init__(self, stream: trio.abc.Stream, private: bool = False):
        self.stream = stream
        self.private = private
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0  # trio time it went back to the idle pool


#: Seconds a keep-alive connection may sit idle before it is closed (servers close theirs
#: after 5-75 s; ours would otherwise linger half-closed).
IDLE_SECONDS = 30.0


class WebhookClient:
    def __init__(self, *, max_idle_per_origin: int = 8, max_idle: int = 256, max_body: int = 64 * 1024,
                 ssl_context: ssl.SSLContext | None = None, allowed_hosts: Sequence[str] | None = None):
        """``allowed_hosts``: if given (even empty), every connection goes only where
        :func:`watcher.netguard.vetted` allows, to an address it checked. Idle keep-alive
        connections are at most ``max_idle_per_origin`` per origin and ``max_idle`` in all
        (the oldest closed first), and none stays idle longer than :data:`IDLE_SECONDS`: a
        key that may point webhooks anywhere cannot pile up open sockets by moving its URL
        from origin to origin."""
        self.max_idle_per_origin = max_idle_per_origin
        self.max_idle = max_idle
        self.max_body = max_body
        self.allowed_hosts = allowed_hosts
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = defaultdict(list)
        self.idle_connections = 0
        self._pruned_at = 0.0

    async def _prune(self) -> None:
        """Close idle connections past :data:`IDLE_SECONDS`, then the oldest beyond
        ``max_idle``."""
        now = trio.current_time()
        idle = sorted(((c.idle_since, origin, c) for origin, conns in self._idle.items() for c in conns),
                      key=lambda x: x[0])
        excess = len(idle) - self.max_idle
        for i, (since, origin, c) in enumerate(idle):
            if i >= excess and now - since <= IDLE_SECONDS:
                break
            self._idle[origin].remove(c)
            self.idle_connections -= 1
            await trio.aclose_forcefully(c.stream)
        for origin in [o for o, conns in self._idle.items() if not conns]:
            del self._idle[origin]
        self._pruned_at = now

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                await trio.aclose_forcefully(c.stream)
        self._idle.clear()
        self.idle_connections = 0

    async def _connect(self, scheme: str, host: str, port: int) -> _Conn:
        private = False
        try:
            if self.allowed_hosts is None:
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            else:
                addresses, private = await netguard.vetted(host, port, self.allowed_hosts)
                stream = await _connect_first(addresses, port)
            if scheme == "https":
                tls = trio.SSLStream(stream, self._ssl_context(), server_hostname=host, https_compatible=True)
                await tls.do_handshake()
                stream = tls
        except netguard.Refused as e:
            raise DeliveryError(f"refused: {e}") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise DeliveryError(f"cannot connect: {type(e).__name__}: {e}") from None
        return _Conn(stream, private)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Answer:
        """POST ``body``; the caller bounds the time (trio.fail_after). A reused keep-alive
        connection that turns out closed is retried once on a fresh one."""
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, host, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if parts.port is None else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            host_header = f"[{host}]" + ("" if parts.port is None else f":{port}")
        request_headers = [("host", host_header), ("content-length", str(len(body))), ("connection", "keep-alive"),
                           *headers.items()]
        for fresh in (False, True):
            idle = self._idle[origin]
            if idle and not fresh:
                conn = idle.pop()
                self.idle_connections -= 1
            else:
                conn = await self._connect(scheme, host, port)
            try:
                answer, reusable = await self._exchange(conn, target, request_headers, body)
            except DeliveryError:
                await trio.aclose_forcefully(conn.stream)
                if not fresh:
                    continue  # the idle connection had been closed by the server: once more
                raise
            except BaseException:
                await trio.aclose_forcefully(conn.stream)
                raise
            if reusable and len(self._idle[origin]) < self.max_idle_per_origin:
                conn.idle_since = trio.current_time()
                self._idle[origin].append(conn)
                self.idle_connections += 1
                if self.idle_connections > self.max_idle or conn.idle_since - self._pruned_at > 1.0:
                    await self._prune()
            else:
                await trio.aclose_forcefully(conn.stream)
            answer.private = conn.private
            return answer
        raise AssertionError("unreachable")

    async def _exchange(self, conn: _Conn, target: str, headers: list[tuple[str, str]],
                        body: bytes) -> tuple[Answer, bool]:
        c = conn.h11
        try:
            data = c.send(h11.Request(method="POST", target=target, headers=headers))
            data += c.send(h11.Data(data=body)) + c.send(h11.EndOfMessage())
            await conn.stream.send_all(data)
            response: h11.Response | None = None
            chunks: list[bytes] = []
            size = 0
            while True:
                event = c.next_event()
                if event is h11.NEED_DATA:
                    received = await conn.stream.receive_some(65536)
                    if not received and response is None:
                        raise DeliveryError("the server closed the connection without answering")
                    c.receive_data(bytes(received))  # an SSLStream gives a bytearray; h11 takes bytes
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > self.max_body:
                        raise _TooLong(response)
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    if response is None:
                        raise DeliveryError("the server closed the connection without answering")
                    break
        except _TooLong as e:
            assert e.response is not None
            return _answer(e.response, b"".join(chunks)), False
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as e:
            # h11's message quotes the bytes it choked on: what a private address (a listed
            # host) answered is never shown, not even through the error
            raise DeliveryError("malformed HTTP answer" + ("" if conn.private else f": {e}")) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as e:
            raise DeliveryError(f"connection failed: {type(e).__name__}") from None
        assert response is not None
        reusable = c.our_state is h11.DONE and c.their_state is h11.DONE
        if reusable:
            c.start_next_cycle()
        return _answer(response, b"".join(chunks)), reusable


async def _connect_first(addresses: list[netguard.IP], port: int) -> trio.SocketStream:
    """A connection to the first of ``addresses`` (already checked) that answers."""
    error: OSError | None = None
    for ip in addresses:
        try:
            return await trio.open_tcp_stream(str(ip), port)
        except OSError as e:
            error = e
    assert error is not None
    raise error


class _TooLong(Exception):
    def __init__(self, response: h11.Response | None):
        self.response = response


def _answer(r: h11.Response, body: bytes) -> Answer:
    return Answer(status=r.status_code,
                  headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in r.headers}, body=body)
