"""A plain TCP forwarder on 127.0.0.1 in front of a node: a second "node" of the same chain
(HTTP and WebSocket alike, byte for byte), which a test can stop, freeze or cut.

- In the test's Trio loop: ``async with tcp_proxy(upstream_port) as p`` then ``p.cut()``
  closes every connection open now (a dropped WebSocket), ``p.url``/``p.ws_url``.
- As its own process (``TcpProxyProcess``): ``stop()`` (the node is gone: connections
  refused), ``freeze()``/``thaw()`` (SIGSTOP/SIGCONT: the kernel still accepts connections,
  nothing ever answers: a hung node). Stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import trio

from .daemon import ROOT, free_port


class TcpProxy:
    def __init__(self, upstream_port: int, port: int = 0):
        self.upstream_port = upstream_port
        self.port = port or free_port()
        self._scopes: set[trio.CancelScope] = set()
        self.connections = 0
        self.refuse = False  # True: a new connection is closed at once (the node is unreachable)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def cut(self) -> int:
        """Close every connection open now; returns how many."""
        n = len(self._scopes)
        for scope in list(self._scopes):
            scope.cancel()
        return n

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        if self.refuse:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            except OSError:
                await client.aclose()
                return
            async with client, upstream, trio.open_nursery() as nursery:
                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while data := await src.receive_some(65536):
                            await dst.send_all(data)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)
        self._scopes.discard(scope)


@contextlib.asynccontextmanager
async def tcp_proxy(upstream_port: int) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(upstream_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


class TcpProxyProcess:
    """The forwarder as a process of its own, so that it can be stopped and frozen."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxyProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.tcpproxy", str(self.upstream_port),
                                      str(self.port)], cwd=str(ROOT), stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once listening
        assert line.strip() == b"ready", line
        return self

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> TcpProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    upstream, port = int(sys.argv[1]), int(sys.argv[2])

    async def main() -> None:
        proxy = TcpProxy(upstream, port)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            print("ready", flush=True)

    trio.run(main)
