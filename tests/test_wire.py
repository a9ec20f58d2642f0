"""watcher.wire, the lean httpx transport for nodes over http://, against a real loopback
server that answers each request as a test scripts it: kept-alive connections, chunked and
close-delimited answers, a node closing an idle connection, answers cut short or not HTTP,
a cancelled exchange. (The same client talks to Litecoin Core in every Bitcoin-family test,
and tests/test_jsonrpc.py compares its reading of real blocks with httpx's.)"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio

from tests.support.daemon import free_port
from watcher.wire import WireTransport

Answer = Callable[[trio.SocketStream], Awaitable[bool]]  # sends an answer; False: close after it


def answer(raw: bytes, *, close: bool = False) -> Answer:
    async def send(stream: trio.SocketStream) -> bool:
        await stream.send_all(raw)
        return not close
    return send


def ok(body: bytes, *extra: str) -> bytes:
    head = "\r\n".join(["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}", *extra])
    return head.encode() + b"\r\n\r\n" + body


class Wire:
    """An httpx client on the transport, POSTing to one URL (as watcher.jsonrpc does)."""

    def __init__(self, url: str, max_connections: int = 8):
        self.url = url
        self.transport = WireTransport(max_connections=max_connections)
        self.client = httpx.AsyncClient(transport=self.transport, trust_env=False,
                                        headers={"content-type": "application/json"})

    async def post(self, body: bytes, *, auth: tuple[str, str] | None = None) -> httpx.Response:
        if auth is None:
            return await self.client.post(self.url, content=body)
        return await self.client.post(self.url, content=body, auth=auth)

    @property
    def idle(self) -> list[trio.SocketStream]:
        return [s for streams in self.transport._idle.values() for s in streams]

    async def aclose(self) -> None:
        await self.client.aclose()


class Server:
    """Answers the requests of every connection, in order, from ``answers``; records each
    request (head, body) and how many connections were made."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.requests: list[tuple[str, bytes]] = []
        self.connections = 0
        self.port = free_port()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.serve_tcp(self._connection, self.port, host="127.0.0.1", task_status=task_status)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = bytearray()
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                end = buf.index(b"\r\n\r\n")
                head = buf[:end].decode()
                length = int(next(line.split(":", 1)[1] for line in head.split("\r\n")
                                  if line.lower().startswith("content-length:")))
                del buf[:end + 4]
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                self.requests.append((head, bytes(buf[:length])))
                del buf[:length]
                if not await self.answers.pop(0)(stream):
                    return
        finally:
            await stream.aclose()


async def test_requests_on_one_kept_alive_connection_with_the_urls_credentials(nursery):
    server = Server()
    await nursery.start(server.serve)
    wire = Wire(f"http://us%40er:p%3Ass@127.0.0.1:{server.port}/wallet/w1?x=1", max_connections=2)  # (httpx's auth)
    big = b'{"result":"' + b"ab" * 300_000 + b'","error":null,"id":1}'  # many reads into one buffer
    server.answers = [answer(ok(b'{"result":1}')), answer(ok(big)), answer(ok(b"[]"))]
    first = await wire.post(b'{"method":"a"}')
    second = await wire.post(b'{"method":"b"}')
    third = await wire.post(b"[]", auth=("cookie", "secret"))
    assert (first.status_code, bytes(first.content)) == (200, b'{"result":1}')
    assert bytes(second.content) == big and first.headers["content-type"] == "application/json"
    assert bytes(third.content) == b"[]"
    assert server.connections == 1
    heads = [[line if n == 0 else line.split(": ", 1)[0].lower() + ": " + line.split(": ", 1)[1]
              for n, line in enumerate(h.split("\r\n"))] for h, _ in server.requests]
    assert [h[0] for h in heads] == ["POST /wallet/w1?x=1 HTTP/1.1"] * 3
    assert f"host: 127.0.0.1:{server.port}" in heads[0] and "content-length: 14" in heads[0]
    assert f"authorization: Basic {base64.b64encode(b'us@er:p:ss').decode()}" in heads[0]
    assert f"authorization: Basic {base64.b64encode(b'cookie:secret').decode()}" in heads[2]
    assert [b for _, b in server.requests] == [b'{"method":"a"}', b'{"method":"b"}', b"[]"]
    await wire.aclose()


async def test_chunked_close_delimited_and_connection_close_answers(nursery):
    server = Server()
    await nursery.start(server.serve)
    wire = Wire(f"http://127.0.0.1:{server.port}/")
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\n{\"res\r\n" + b"a\r\nult\":[1,2]\r\n" + b"1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n")
    server.answers = [answer(chunked), answer(ok(b"{}", "Connection: close")),
                      answer(b"HTTP/1.0 200 OK\r\n\r\n{\"until\":\"the end\"}", close=True),
                      answer(ok(b"[1]"))]
    assert bytes((await wire.post(b"{}")).content) == b'{"result":[1,2]}'
    assert server.connections == 1  # kept after a chunked answer
    assert bytes((await wire.post(b"{}")).content) == b"{}"
    assert bytes((await wire.post(b"{}")).content) == b'{"until":"the end"}'
    assert bytes((await wire.post(b"{}")).content) == b"[1]"
    assert server.connections == 3  # a new one after "Connection: close" and after the HTTP/1.0 answer
    await wire.aclose()


async def test_an_idle_connection_the_node_closed_is_replaced_once_and_a_silent_new_one_fails(nursery):
    server = Server()
    await nursery.start(server.serve)
    wire = Wire(f"http://127.0.0.1:{server.port}/")
    # the first answer says nothing of closing, then the node drops the connection (its idle timeout)
    server.answers = [answer(ok(b"1"), close=True), answer(ok(b"2"))]
    assert bytes((await wire.post(b"{}")).content) == b"1"
    await trio.testing.wait_all_tasks_blocked()
    assert bytes((await wire.post(b"{}")).content) == b"2"
    assert server.connections == 2 and len(server.requests) == 2

    async def hang_up(stream: trio.SocketStream) -> bool:
        return False
    server.answers = [hang_up]
    wire2 = Wire(f"http://127.0.0.1:{server.port}/")
    with pytest.raises(httpx.TransportError, match="closed the connection without answering"):
        await wire2.post(b"{}")
    await wire.aclose()


@pytest.mark.parametrize("raw, error", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"cut\":", "closed mid-answer"),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not HTTP"),
    (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 70_000, "headers too long"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed HTTP header"),
])
async def test_an_answer_cut_short_or_not_http_is_a_wire_error(nursery, raw, error):
    server = Server()
    await nursery.start(server.serve)
    wire = Wire(f"http://127.0.0.1:{server.port}/")
    server.answers = [answer(raw, close=True)]
    with pytest.raises(httpx.TransportError, match=error):
        await wire.post(b"{}")
    assert wire.idle == []


async def test_a_cancelled_exchange_closes_its_connection_and_the_next_one_is_new(nursery):
    server = Server()
    await nursery.start(server.serve)
    wire = Wire(f"http://127.0.0.1:{server.port}/")
    half_sent, release = trio.Event(), trio.Event()

    async def slow(stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        half_sent.set()
        await release.wait()
        return False
    server.answers = [slow, answer(ok(b"fresh"))]
    with trio.CancelScope() as scope:
        async def cancel_once_half_read() -> None:
            await half_sent.wait()
            await trio.testing.wait_all_tasks_blocked()  # the client waits for the other 5 bytes
            scope.cancel()
        nursery.start_soon(cancel_once_half_read)
        await wire.post(b"{}")
    assert scope.cancelled_caught
    assert wire.idle == []  # half an answer read: never reused
    assert bytes((await wire.post(b"{}")).content) == b"fresh"
    assert server.connections == 2
    release.set()
    await wire.aclose()


async def test_no_node_listening_is_a_wire_error_that_keeps_the_credentials_to_itself():
    wire = Wire(f"http://watcher:hunter2@127.0.0.1:{free_port()}/")
    with pytest.raises(httpx.TransportError) as e:
        await wire.post(b"{}")
    assert "cannot connect" in str(e.value) and "hunter2" not in str(e.value)


async def test_only_plain_http_urls():
    wire = Wire(f"https://127.0.0.1:{free_port()}/")
    with pytest.raises(httpx.UnsupportedProtocol):
        await wire.post(b"{}")
