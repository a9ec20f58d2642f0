"""Benchmark 5: webhook deliveries per second (signing included) to a receiver that answers at
once, against the same receiver's rate for plain POSTs from a bare HTTP client; and the same
with a second receiver that never answers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio
from prometheus_client import CollectorRegistry

from tests.support.daemon import DaemonProcess, chain_entry, free_port, write_config
from watcher.daemon import Daemon

DEAD_NODE = "http://127.0.0.1:9"


def start_receiver(mode: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.servers", mode, str(port)])
    deadline = time.monotonic() + 10
    while True:
        try:
            with httpx.Client(trust_env=False, timeout=0.5) as c:
                if mode == "fast":
                    c.post(f"http://127.0.0.1:{port}/", content=b"{}")
                else:
                    import socket

                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except (httpx.HTTPError, OSError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/hook"


async def raw_posts(url: str, n: int, concurrency: int, body: bytes) -> float:
    """Deliveries/s a bare client reaches against the receiver (the ceiling)."""
    limiter = trio.CapacityLimiter(concurrency)
    async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one() -> None:
            async with limiter:
                r = await client.post(url, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 204

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
        return n / (time.perf_counter() - t0)


def prepare(workdir: Path, urls: list[str], n: int) -> tuple[Path, list[str]]:
    """A database holding ``n`` events, each fanned out to every url; returns the webhook ids."""
    cfg = write_config(workdir, [chain_entry("bench", DEAD_NODE)], extra={"log": {"level": "warning"}})
    d = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        ids = [d.store.webhooks.create(u, ["invoice.created"], None)[0].id for u in urls]
        with d.store.db.transaction():
            for i in range(n):
                d.store.invoices.create(chain="bench", asset="ETH", amount=10**18 + i, mode="sale", expires_in=3600,
                                        tolerance_ppm=0, order_id=f"o{i}", metadata={"i": i}, actor="bench")
    finally:
        d.close()
    return cfg, ids


def drain(cfg: Path, webhook_id: str, n: int) -> float:
    """Start the daemon on the prepared database and wait until the endpoint's backlog is 0;
    deliveries/s between the first and the last delivery (the daemon's start-up, which
    benchmark 2 measures, stays out of it)."""
    db = cfg.parent / "watcher.db"
    proc = DaemonProcess(cfg).start()
    try:
        started = time.perf_counter()
        t0 = done0 = None  # when the first recorded deliveries showed up, and how many
        while True:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
                left = c.execute("SELECT COUNT(*) FROM deliveries WHERE webhook_id = ? AND status != 'delivered'",
                                 (webhook_id,)).fetchone()[0]
            now = time.perf_counter()
            if t0 is None and left < n:
                t0, done0 = now, n - left
            if left == 0:
                assert t0 is not None and done0 is not None
                return (n - done0) / max(0.001, now - t0)
            assert proc.alive(), proc.log()[-2000:]
            assert now - started < 300
            time.sleep(0.005)
    finally:
        proc.stop()


def run(workdir: Path, n: int = 10_000) -> dict[str, float]:
    fast, fast_url = start_receiver("fast")
    hang, hang_url = start_receiver("hang")
    try:
        body = b'{"type":"invoice.created","timestamp":"2026-11-22T00:00:00.000Z","data":{"id":"inv_x"},"sequence":1}'
        baseline = alone = with_hang = 0.0
        for r in range(2):  # interleaved rounds, best of each: one slow moment of the machine
            baseline = max(baseline, trio.run(raw_posts, fast_url, n, 4, body))
            cfg, (fid,) = prepare(workdir / f"one{r}", [fast_url], n)
            alone = max(alone, drain(cfg, fid, n))
            cfg, (fid, _hid) = prepare(workdir / f"two{r}", [fast_url, hang_url], n)
            with_hang = max(with_hang, drain(cfg, fid, n))
    finally:
        for p in (fast, hang):
            p.terminate()
            p.wait(timeout=10)
    return {"deliveries_per_s": alone, "raw_posts_per_s": baseline, "ratio": alone / baseline,
            "with_hanging_receiver_per_s": with_hang, "hanging_ratio": with_hang / alone}


if __name__ == "__main__":
    import json
    import tempfile

    print(json.dumps(run(Path(tempfile.mkdtemp())), indent=2))
