"""A real ``nats-server -js`` (Debian's package) on 127.0.0.1, a free port and a temp store
directory; stopped by PID (``restart`` keeps the port and the store: the stream survives). And
``read_stream``: every message of a stream, read with nats-py in a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .daemon import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsServer:
    """``tls``: serve TLS with a fresh self-signed certificate for 127.0.0.1 (``ca_file``)."""

    def __init__(self, *, port: int | None = None, tls: bool = False) -> None:
        self.port = port or free_port()
        self.store = Path(tempfile.mkdtemp(prefix="watcher-nats-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls
        self.ca_file = self.store / "cert.pem"
        if tls:
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", str(self.store / "key.pem"), "-out", str(self.ca_file), "-days", "1",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, capture_output=True, timeout=30)

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        tls = ["--tls", "--tlscert", str(self.ca_file), "--tlskey", str(self.store / "key.pem")] if self.tls else []
        self.proc = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port),
                                      "-sd", str(self.store / "js"), *tls],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if s.recv(4).startswith(b"INFO"):
                    return self
            assert self.proc.poll() is None, "nats-server exited at start"
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)


@contextlib.contextmanager
def nats_server(*, port: int | None = None, tls: bool = False) -> Iterator[NatsServer]:
    server = NatsServer(port=port, tls=tls).start()
    try:
        yield server
    finally:
        server.close()


def read_stream(url: str, stream: str, subject: str = ">", *, ca_file: Path | None = None) -> list[dict[str, Any]]:
    """Every message of ``stream`` in stream order: ``{"seq", "subject", "msg_id", "body"}``.
    Blocking (run it in a thread from Trio)."""

    async def main() -> list[dict[str, Any]]:
        import nats

        tls = None
        if ca_file is not None:
            import ssl

            tls = ssl.create_default_context(cafile=str(ca_file))
        nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False, tls=tls)
        try:
            js = nc.jetstream()
            info = await js.stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                assert msg.data is not None
                out.append({"seq": msg.seq, "subject": msg.subject, "msg_id": (msg.headers or {}).get("Nats-Msg-Id"),
                            "body": json.loads(msg.data)})
            return out
        finally:
            await nc.close()

    return asyncio.run(main())
