"""Benchmarks 1, 2 and 7: catch-up scanning speed against the node's own speed.

The baseline is the fastest raw fetch of exactly the data the scanner needs (full blocks, the
token logs, the receipts of native transfers to watched addresses): the same JSON-RPC calls,
batched and concurrent, at several concurrency levels, reading every byte of every answer and
doing nothing with it. Then watcher scans the same range from an empty database (with 10, and
with 1,000,000 watched addresses), and must find exactly the transfers that were sent.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import httpcore
import httpx
import trio
from prometheus_client import CollectorRegistry

from tests.support.daemon import chain_entry, write_config
from watcher import jsonrpc
from watcher.daemon import Daemon, tune_gc

from .chain import BENCH_MNEMONIC, BenchChain


async def raw_fetch(url: str, calls: list[tuple[str, list[Any]]], *, concurrency: int, batch: int) -> float:
    """Seconds to send ``calls`` as JSON-RPC batches, ``concurrency`` requests in flight.
    httpx reads the answers as watcher's client does, up to 1 MiB a read (``watcher.jsonrpc``
    sets httpcore's read size for the process): the baseline gets the same cheaper receive."""
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == jsonrpc.READ_BYTES
    chunks = [calls[i:i + batch] for i in range(0, len(calls), batch)]
    limiter = trio.CapacityLimiter(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120, trust_env=False) as client:
        async def one(chunk: list[tuple[str, list[Any]]]) -> None:
            body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(chunk)]
            async with limiter:
                r = await client.post(url, json=body)
                assert r.status_code == 200 and len(r.content) > 0

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for chunk in chunks:
                nursery.start_soon(one, chunk)
        return time.perf_counter() - t0


def paired_median(raws: list[float], scans: list[float]) -> float:
    """The median of each round's watcher / raw (a round's two runs are seconds apart)."""
    return statistics.median(w / r for r, w in zip(raws, scans, strict=True))


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (like ``taskset -a -p``)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, PermissionError):
            pass


def scanner_calls(chain: BenchChain, first: int, last: int, *, logs_range: int, full_blocks: bool = True
                  ) -> list[tuple[str, list[Any]]]:
    """The JSON-RPC calls the scanner makes for [first, last]."""
    calls: list[tuple[str, list[Any]]] = [("eth_getBlockByNumber", [hex(n), full_blocks]) for n in range(first, last + 1)]
    for lo in range(first, last + 1, logs_range):
        hi = min(last, lo + logs_range - 1)
        calls.append(("eth_getLogs", [{"fromBlock": hex(lo), "toBlock": hex(hi), "address": [chain.token],
                                       "topics": ["0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"]}]))
    if full_blocks:
        watched = set(chain.watched)
        blocks = httpx.post(chain.anvil.url, json=[{"jsonrpc": "2.0", "id": n, "method": "eth_getBlockByNumber",
                                                    "params": [hex(n), True]} for n in range(first, last + 1)],
                            timeout=120, trust_env=False).json()
        for b in blocks:
            for tx in b["result"]["transactions"]:
                if tx.get("to") and tx["to"].lower() in watched and int(tx["value"], 16) > 0:
                    calls.append(("eth_getTransactionReceipt", [tx["hash"]]))
    return calls


async def best_raw(chain: BenchChain, calls: list[tuple[str, list[Any]]]) -> tuple[float, dict[str, int]]:
    best, how = float("inf"), {}
    for concurrency in (2, 4, 8):
        for batch in (25, 50, 100):
            took = await raw_fetch(chain.anvil.url, calls, concurrency=concurrency, batch=batch)
            if took < best:
                best, how = took, {"concurrency": concurrency, "batch": batch}
    return best, how


def add_watched(db_path: Path, chain_id: str, extra: int) -> None:
    """Fill the database with ``extra`` more watched addresses (random, as 'external' rows)."""
    conn = sqlite3.connect(db_path)
    rng = os.urandom
    now = int(time.time() * 1000)
    with conn:
        for start in range(0, extra, 100_000):
            n = min(100_000, extra - start)
            conn.executemany("INSERT OR IGNORE INTO addresses (chain, address, kind, label, invoice_id, derivation_index,"
                             " created_at) VALUES (?, ?, 'external', NULL, NULL, NULL, ?)",
                             (("chain", "0x" + rng(20).hex(), now) for _ in range(n)))
        conn.execute("UPDATE addresses SET chain = ? WHERE chain = 'chain'", (chain_id,))
    conn.close()


async def run_until_scanned(daemon: Daemon, chain: str, last: int, t_open: float) -> tuple[float, float]:
    """Run ``daemon`` (tuned as ``watcher run`` tunes it) until ``chain`` is scanned up to
    ``last``; returns (seconds from ``t_open`` until it started, seconds of scanning after). The
    scanner says when a batch committed: polling the database from here would take CPU from
    the daemon being measured."""
    tune_gc()
    done = trio.Event()
    daemon.watchers[chain].on_new_blocks(
        lambda: done.set() if daemon.store.chains.scanned_number(chain) >= last else None)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: daemon.run(api=False, task_status=task_status))
        started = time.perf_counter() - t_open
        t0 = time.perf_counter()
        await done.wait()
        took = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    assert daemon.store.chains.scanned_number(chain) >= last
    return started, took


async def scan_once(chain: BenchChain, workdir: Path, *, extra_addresses: int = 0, token_only: bool = False,
                    first: int, last: int, options: dict[str, Any]) -> dict[str, Any]:
    tokens = [("USDT", chain.token, 6)]
    entry = chain_entry("bench", chain.anvil.url, tokens=tokens, start_block=first, confirmations=1,
                        poll_interval=0.05, **options)
    if token_only:
        entry["watch_native"] = False
    cfg = write_config(workdir, [entry], mnemonic=BENCH_MNEMONIC, extra={"log": {"level": "warning"}})
    daemon = Daemon.open(cfg, registry=CollectorRegistry())
    for i in range(len(chain.watched)):
        daemon.store.addresses.deposit_address("bench", f"user{i}")
    daemon.close()
    if extra_addresses:
        add_watched(workdir / "watcher.db", "bench", extra_addresses)
    t_open = time.perf_counter()
    daemon = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        started, took = await run_until_scanned(daemon, "bench", last, t_open)
        found = daemon.store.db.scalar("SELECT COUNT(*) FROM transfers")
        native = daemon.store.db.scalar("SELECT COUNT(*) FROM transfers WHERE kind = 'native'")
    finally:
        daemon.close()
    return {"seconds": took, "blocks_per_s": (last - first + 1) / took, "transfers": found,
            "native_transfers": native, "startup_s": started,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
