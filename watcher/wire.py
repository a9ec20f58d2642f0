"""An httpx transport for JSON-RPC to a node over plain ``http://``: POSTs on kept-alive
connections, each answer read straight into one buffer of its announced length.

A catching-up Bitcoin-family scan receives ~60 MB of hex a thousand blocks. Through httpx's
own transport (httpcore and h11) each byte is copied four or five times (the socket's read
into a new 1 MiB ``bytes``, h11's receive buffer, the chunk it hands on, the join of the
chunks). Here the socket reads into the answer's own buffer (``recv_into``), copied once
into the response's ``bytes``: the JSON-RPC of serialized blocks went from 0.17 to 0.12 ms
of CPU a block, hex decoding included (docs/performance.md). httpx still builds the request
(authentication from the URL or given, headers) and the response; only the bytes on the
socket are this module's.

It does what JSON-RPC to a node needs and no more: ``Content-Length`` and chunked answers,
an answer ending with its connection (HTTP/1.0), keep-alive and ``Connection: close``, and
one new connection when a kept-alive one turns out to have been closed by the node before
any byte of the answer (the node's idle timeout). No TLS, no proxies, no HTTP/2: an
``https://`` node goes through httpx's own transport (:mod:`watcher.jsonrpc`). Timeouts are
the caller's (a cancelled exchange closes its connection). Failures are httpx's transport
errors, whose messages never hold the URL's credentials.
"""

from __future__ import annotations

import httpx
import trio

MAX_HEAD = 64 * 1024  # status line and headers
READ = 1 << 20  # bytes a read while the length is not known


class _Stale(httpx.ReadError):
    """A kept-alive connection the node had closed: nothing of the answer arrived."""


class WireTransport(httpx.AsyncBaseTransport):
    """Connections to ``http://`` hosts, at most ``max_connections`` kept idle per host."""

    def __init__(self, *, max_connections: int = 8):
        self.max_connections = max_connections
        self._idle: dict[tuple[str, int], list[trio.SocketStream]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{url.scheme}: this transport speaks plain http only")
        where = (url.host, url.port or 80)
        body = await request.aread()
        head = [f"{request.method} {url.raw_path.decode('ascii')} HTTP/1.1"]
        head += [f"{name.decode('latin-1')}: {value.decode('latin-1')}" for name, value in request.headers.raw]
        if "content-length" not in request.headers:
            head.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        idle = self._idle.setdefault(where, [])
        while True:
            reused = bool(idle)
            stream = idle.pop() if reused else await _connect(*where)
            try:
                status, headers, content, keep = await _exchange(stream, raw)
            except _Stale:
                _close(stream)
                if reused:
                    continue  # the node closed it while idle: a new one (each stale one is dropped)
                raise httpx.RemoteProtocolError("the node closed the connection without answering") from None
            except BaseException:
                _close(stream)  # cancelled or failed mid-exchange: its state is unknown
                raise
            if keep and len(idle) < self.max_connections:
                idle.append(stream)
            else:
                _close(stream)
            return httpx.Response(status, headers=headers, content=bytes(content), request=request)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for stream in streams:
                _close(stream)


async def _connect(host: str, port: int) -> trio.SocketStream:
    try:
        return await trio.open_tcp_stream(host, port)
    except OSError as e:
        raise httpx.ConnectError(f"cannot connect: {e.strerror or type(e).__name__}") from None


def _close(stream: trio.SocketStream) -> None:
    stream.socket.close()


class _Reader:
    """What a connection has received and not yet used, and reads for more."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = bytearray()

    async def more(self) -> bool:
        try:
            data = await self.stream.receive_some(READ)
        except (trio.BrokenResourceError, OSError) as e:
            raise httpx.ReadError(f"connection lost: {type(e).__name__}") from None
        self.buf += data
        return bool(data)

    async def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise httpx.RemoteProtocolError("an HTTP line too long")
            if not await self.more():
                raise httpx.RemoteProtocolError("connection closed mid-answer")
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    async def into(self, out: bytearray, start: int, end: int) -> None:
        """Fill ``out[start:end]``: what is buffered first, then straight from the socket."""
        take = min(len(self.buf), end - start)
        out[start:start + take] = self.buf[:take]
        del self.buf[:take]
        view = memoryview(out)
        at = start + take
        sock = self.stream.socket
        while at < end:
            try:
                got = await sock.recv_into(view[at:end])
            except OSError as e:
                raise httpx.ReadError(f"connection lost: {type(e).__name__}") from None
            if not got:
                raise httpx.RemoteProtocolError("connection closed mid-answer")
            at += got


async def _exchange(stream: trio.SocketStream, request: bytes,
                    ) -> tuple[int, list[tuple[str, str]], bytearray, bool]:
    """Send ``request``, read its answer: its status, headers and body, and whether the
    connection may be kept."""
    try:
        await stream.send_all(request)
    except (trio.BrokenResourceError, OSError):
        raise _Stale("stale") from None  # (a connection the node closed may fail here or at the first read)
    r = _Reader(stream)
    while (end := r.buf.find(b"\r\n\r\n")) < 0:
        if len(r.buf) > MAX_HEAD:
            raise httpx.RemoteProtocolError("HTTP headers too long")
        try:
            got = await r.more()
        except httpx.ReadError:
            if not r.buf:
                raise _Stale("stale") from None
            raise
        if not got:
            if not r.buf:
                raise _Stale("stale")
            raise httpx.RemoteProtocolError("connection closed mid-answer")
    lines = bytes(r.buf[:end]).decode("latin-1").split("\r\n")
    del r.buf[:end + 4]
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise httpx.RemoteProtocolError("the answer is not HTTP/1.x")
    status = int(code)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise httpx.RemoteProtocolError("a malformed HTTP header")
        headers.append((name.strip().lower(), value.strip()))
    named = dict(headers)
    connection = named.get("connection", "").lower()
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    if status < 200 or status in (204, 304):
        raise httpx.RemoteProtocolError(f"an HTTP {status} answer to a POST")
    if "chunked" in named.get("transfer-encoding", "").lower():
        content = await _chunked(r)
    elif "content-length" in named:
        value = named["content-length"]
        if not value.isdigit():
            raise httpx.RemoteProtocolError("a malformed Content-Length")
        content = bytearray(int(value))
        await r.into(content, 0, len(content))
    else:  # the answer ends with its connection
        while await r.more():
            pass
        content, keep = r.buf, False
    if r.buf and content is not r.buf:
        keep = False  # more than the answer: the connection is out of step
    return status, headers, content, keep


async def _chunked(r: _Reader) -> bytearray:
    out = bytearray()
    while True:
        size_text = (await r.line()).split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise httpx.RemoteProtocolError("a malformed chunk size") from None
        if size == 0:
            while await r.line():  # trailers, up to the empty line
                pass
            return out
        start = len(out)
        out.extend(bytes(size))
        await r.into(out, start, start + size)
        if await r.line():
            raise httpx.RemoteProtocolError("a chunk longer than its size")
