"""Benchmark 4: invoice and address creation under concurrent load, from a load generator on
loopback, against the same generator's rate for GET /healthz on the same server (the
framework's floor: routing, HTTP, no work)."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.daemon import (
    API_TOKEN,
    DaemonProcess,
    chain_entry,
    free_port,
    wait_http,
    write_config,
)

AUTH = {"authorization": f"Bearer {API_TOKEN}"}


async def load(base: str, method: str, path: str, make_body: Any, n: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    counter = itertools.count()
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers=AUTH, limits=limits, timeout=30, trust_env=False) as http:
        async def worker() -> None:
            nonlocal errors
            while (i := next(counter)) < n:
                t0 = time.perf_counter()
                r = await http.request(method, path, json=make_body(i) if make_body else None)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code >= 400

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        took = time.perf_counter() - t0
    latencies.sort()
    return {"per_s": n / took, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000, "errors": errors}


def run(workdir: Path, anvil_url: str, *, n: int = 2000, concurrency: int = 16) -> dict[str, Any]:
    port = free_port()
    cfg = write_config(workdir, [chain_entry("bench", anvil_url, chain_id=31337)], api_port=port,
                       extra={"log": {"level": "warning"}})
    proc = DaemonProcess(cfg).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz")
        trio.run(load, base, "GET", "/healthz", None, 200, 4)  # warm up
        floor = trio.run(load, base, "GET", "/healthz", None, n, concurrency)
        invoices = trio.run(load, base, "POST", "/v1/invoices",
                            lambda i: {"chain": "bench", "asset": "ETH", "amount": "1.5", "order_id": f"o{i}"},
                            n, concurrency)
        addresses = trio.run(load, base, "POST", "/v1/addresses", lambda i: {"chain": "bench", "label": f"user{i}"},
                             n, concurrency)
    finally:
        proc.stop()
    return {"healthz": floor, "invoices": invoices, "addresses": addresses,
            "invoice_ratio": invoices["per_s"] / floor["per_s"], "concurrency": concurrency}


if __name__ == "__main__":
    import json
    import tempfile

    from tests.support.evm import Anvil

    with Anvil() as node:
        print(json.dumps(run(Path(tempfile.mkdtemp()), node.url), indent=2))
