"""Helper processes for the benchmarks: a webhook receiver that answers 204 at once (or never),
started as its own process so it does not share a CPU core's time slices with the daemon
under test in the same interpreter.

    python -m bench.servers fast PORT
    python -m bench.servers hang PORT
"""

from __future__ import annotations

import socket
import sys
from functools import partial

import trio

RESPONSE = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


async def handle(stream: trio.abc.Stream, hang: bool) -> None:
    buf = b""
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                headers = buf[:head_end].decode("latin-1").lower()
                length = 0
                for line in headers.split("\r\n"):
                    if line.startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                if len(buf) < head_end + 4 + length:
                    break
                buf = buf[head_end + 4 + length:]
                if hang:
                    await trio.sleep_forever()
                await stream.send_all(RESPONSE)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionResetError):
        return


async def serve(mode: str, port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    await trio.serve_listeners(partial(handle, hang=mode == "hang"), listeners)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    trio.run(serve, sys.argv[1], int(sys.argv[2]))
