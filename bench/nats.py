"""Benchmark 10: events/s into NATS JetStream. A real ``nats-server -js``; the daemon (in this
process) with ``[nats]`` has N events written to its outbox at once (invoices created through
the store), and the time until the plugin's cursor has passed the last one (JetStream
acknowledged all of them) gives events/s. Baseline, in the same run: nats-py alone publishing
the same N message bodies with ``publish_async`` into a second stream, acknowledgements
awaited per batch of 100, as the plugin does."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from tests.support.daemon import chain_entry, write_config
from tests.support.evm import Anvil
from tests.support.natsserver import nats_server
from watcher.daemon import Daemon


def raw_publish(url: str, bodies: list[bytes]) -> float:
    async def main() -> float:
        import nats
        from nats.js.api import StorageType, StreamConfig

        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="RAW", subjects=["raw.>"], storage=StorageType.FILE,
                                         duplicate_window=600))
        t0 = time.perf_counter()
        for i in range(0, len(bodies), 100):
            futs = [await js.publish_async("raw.devnet.invoice.created", b, headers={"Nats-Msg-Id": f"m{i + j}"})
                    for j, b in enumerate(bodies[i:i + 100])]
            await asyncio.gather(*futs)
        took = time.perf_counter() - t0
        await nc.close()
        return took

    return asyncio.run(main())


async def daemon_publish(cfg: Path, n: int) -> tuple[float, list[bytes]]:
    d = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: d.run(api=False, task_status=task_status))
            with d.store.db.transaction():  # N events at once: the sink then runs flat out
                for _ in range(n):
                    d.store.invoices.create(chain="devnet", asset="ETH", amount=10**18, mode="sale", expires_in=600,
                                            tolerance_ppm=0, order_id=None, metadata={}, actor="bench")
            t0 = time.perf_counter()
            while d.sinks.behind("nats"):
                await trio.sleep(0.002)
            took = time.perf_counter() - t0
            from watcher import views

            bodies = [json.dumps(views.event(e), separators=(",", ":")).encode() for e in d.store.events.list(limit=n)]
            nursery.cancel_scope.cancel()
    finally:
        d.close()
    return took, bodies


def run(workdir: Path, *, n: int = 5000) -> dict[str, Any]:
    with nats_server() as server, Anvil() as node:
        cfg = write_config(workdir, [chain_entry("devnet", node.url)],
                           extra={"log": {"level": "warning"}, "nats": {"url": server.url}})
        took, bodies = trio.run(daemon_publish, cfg, n)
        raw = raw_publish(server.url, bodies)
    return {"events": n, "watcher_events_per_s": n / took, "raw_publish_per_s": len(bodies) / raw,
            "ratio": (n / took) / (len(bodies) / raw)}


if __name__ == "__main__":
    import tempfile

    print(json.dumps(run(Path(tempfile.mkdtemp())), indent=2))
