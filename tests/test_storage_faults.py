"""SQLite trouble while the daemon works: the file locked by another process, the disk full.
The daemon keeps running, says so in /readyz and the metrics, writes nothing half-way, and
once the trouble is gone ends with exactly the transfers and events of an untroubled run."""

from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio

from tests.support.daemon import (
    AUTH,
    chain_entry,
    free_port,
    running,
    wait_until,
    write_config,
)
from tests.support.evm import Anvil, Token
from tests.support.receiver import receiving


def confirmed(d) -> dict[tuple[str, int], int]:
    items, _ = d.views.transfers(limit=1000, status="confirmed")
    return {(t["txid"], t["index"]): int(t["base_units"]) for t in items}


def storage_errors(d, kind: str) -> float:
    return d.metrics.registry.get_sample_value("watcher_storage_errors_total", {"kind": kind}) or 0.0


def new_addresses(d, n: int, tag: str) -> list[str]:
    return [d.store.addresses.deposit_address("devnet", f"{tag}-{i}")[0].address for i in range(n)]


async def deposits(anvil: Anvil, token: Token, addrs: list[str]) -> dict[tuple[str, int], int]:
    """A native and a token deposit to each address; returns what the chain holds."""
    payer = anvil.accounts[1]
    expected = {}
    for i, a in enumerate(addrs):
        tx = anvil.send(payer, a, 10**15 + i)
        expected[(tx, -1)] = 10**15 + i
        tx = token.transfer(payer, a, 1_000_000 + i)
        log_index = int(anvil.wait_receipt(tx)["logs"][0]["logIndex"], 16)
        expected[(tx, log_index)] = 1_000_000 + i
    return expected


async def check_end_state(d, rx, expected: dict[tuple[str, int], int], anvil: Anvil) -> None:
    anvil.mine(3)
    d.watchers["devnet"].poke()
    await wait_until(lambda: confirmed(d) == expected, timeout=40, what="exactly the expected transfers confirmed")
    types = Counter(e.type for e in d.store.events.list(limit=10_000))
    assert types == {"transfer.detected": len(expected), "transfer.confirmed": len(expected)}, types
    await wait_until(lambda: d.store.webhooks.backlog() == 0, timeout=30, what="every event delivered")
    got = Counter(r.json["type"] for r in rx.unique().values())  # deduped on webhook-id, as an app does
    assert got == types, got


@contextlib.asynccontextmanager
async def daemon_with_receiver(tmp_path, anvil: Anvil, token: Token) -> AsyncIterator[tuple[Any, Any, httpx.AsyncClient]]:
    """The daemon in-process with its API, a webhook receiver subscribed to transfers, a
    funded payer; yields (daemon, receiver, API client)."""
    token.mint(anvil.accounts[1], 10**12)
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)])],
                       api_port=port, extra={"webhooks": {"schedule": [0, 0.2, 0.5, 1, 1, 1, 1, 1, 1]}})
    with trio.fail_after(120):
        async with receiving() as rx, running(cfg, api=True) as d, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            d.store.webhooks.create(rx.url, ["transfer.*"], None)
            yield d, rx, http


async def test_database_locked_by_another_process_is_waited_out(tmp_path, anvil: Anvil, token: Token):
    async with daemon_with_receiver(tmp_path, anvil, token) as (d, rx, http):
        expected = await deposits(anvil, token, new_addresses(d, 3, "before"))
        later = new_addresses(d, 3, "during")
        await wait_until(lambda: d.store.chains.scanned_number("devnet") >= anvil.head(), what="scanned")
        before = confirmed(d)
        # another process (a sqlite3 shell, a careless backup script) takes the write lock
        other = sqlite3.connect(tmp_path / "watcher.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            expected |= await deposits(anvil, token, later)
            anvil.mine(3)
            d.watchers["devnet"].poke()
            # several backoff rounds of the tasks, and the daemon keeps running
            await wait_until(lambda: storage_errors(d, "locked") >= 4, timeout=30, what="locked errors counted")
            r = await http.get("/readyz")
            assert r.status_code == 503
            assert r.json()["storage"]["ready"] is False and r.json()["storage"]["problem"].startswith("locked")
            assert confirmed(d) == before  # nothing got through, nothing half-way
        finally:
            other.execute("ROLLBACK")
            other.close()
        await check_end_state(d, rx, expected, anvil)
        r = await http.get("/readyz")
        assert r.status_code == 200 and r.json()["storage"] == {"ready": True, "problem": None}


async def test_disk_full_is_retried_and_nothing_is_half_applied(tmp_path, anvil: Anvil, token: Token):
    async with daemon_with_receiver(tmp_path, anvil, token) as (d, rx, http):
        conn = d.store.db.conn
        expected = {}
        addrs = new_addresses(d, 6, "full")
        # the file may not grow by a single page: a real SQLITE_FULL, as on a full disk
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        assert conn.execute(f"PRAGMA max_page_count = {pages}").fetchone()[0] == pages
        try:
            expected |= await deposits(anvil, token, addrs)
            anvil.mine(3)
            d.watchers["devnet"].poke()
            await wait_until(lambda: storage_errors(d, "full") >= 1, timeout=30, what="disk-full errors counted")
            r = await http.get("/readyz")
            assert r.status_code == 503 and r.json()["storage"]["problem"].startswith("full")
            # blocks are applied whole or not at all: the cursor never passed a block whose
            # transfers are missing
            scanned = d.store.chains.scanned_number("devnet")
            seen = {t["txid"] for t in d.views.transfers(limit=1000)[0]}
            for (txid, _), _ in expected.items():
                block = int(anvil.receipt(txid)["blockNumber"], 16)
                assert (txid in seen) == (block <= scanned), (txid, block, scanned)
        finally:
            conn.execute("PRAGMA max_page_count = 1073741823")
        await check_end_state(d, rx, expected, anvil)
        assert (await http.get("/readyz")).status_code == 200


async def test_a_scan_step_failing_for_a_bug_is_retried_and_shown_not_a_stopped_daemon(tmp_path, anvil: Anvil,
                                                                                        token: Token):
    """A scan step that fails for a bug rather than the file (here a constraint a trigger
    adds: an ``IntegrityError``; in life also an assertion in a family plugin; a malformed
    node answer is a node error already) ended the daemon: every chain's scanning, the API and webhooks stopped with one
    chain's bug. It is retried with backoff instead, counted (``scanner_bug``), and shown:
    /readyz is unready for that chain and /v1/chains names the error. Once the cause is gone
    the same blocks are applied, exactly once."""
    async with daemon_with_receiver(tmp_path, anvil, token) as (d, rx, http):
        await wait_until(lambda: d.store.chains.scanned_number("devnet") >= anvil.head(), what="scanned")
        other = sqlite3.connect(tmp_path / "watcher.db", isolation_level=None)
        try:
            other.execute("CREATE TRIGGER refuse BEFORE INSERT ON transfers BEGIN"
                          " SELECT RAISE(ABORT, 'a constraint this test adds'); END")
            expected = await deposits(anvil, token, new_addresses(d, 2, "bug"))
            bugs = d.metrics.errors.labels("scanner_bug")
            await wait_until(lambda: bugs._value.get() >= 2, timeout=30, what="the failing scan step retried")
            assert confirmed(d) == {} and d.store.events.list() == []  # nothing half-applied
            r = await http.get("/readyz")
            assert r.status_code == 503, r.text
            assert "IntegrityError" in r.json()["chains"]["devnet"]["problem"]
            chains = (await http.get("/v1/chains", headers=AUTH)).json()["items"]
            assert chains[0]["scan_error"] == "IntegrityError"
            assert (await http.get("/healthz")).status_code == 200  # the daemon is alive
            other.execute("DROP TRIGGER refuse")
        finally:
            other.close()
        d.watchers["devnet"].poke()
        await check_end_state(d, rx, expected, anvil)
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/v1/chains", headers=AUTH)).json()["items"][0]["scan_error"] is None
