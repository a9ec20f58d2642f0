"""Crash consistency under a reorg storm: a mixed workload (deposits, invoices and their
payments, payouts, sweeps) against a real anvil while the daemon (a real subprocess) is killed
with SIGKILL at random moments and restarted, and ``anvil_reorg`` replaces up to
``finality_depth`` blocks now and then. Afterwards, judged against the chain itself:

- every deposit transaction that is on the canonical chain is one confirmed transfer with its
  exact amount, nothing else is credited, nothing twice;
- every payout idempotency key made exactly one payout, and every completed payout's
  recipient holds exactly its amount (paid once);
- every mined sweep moved its amount once: the treasury holds exactly their sum;
- every event the database holds reached the webhook receiver (after dedupe on webhook-id);
- ``watcher reconcile`` finds every balance as expected.

``make test`` runs a short version; ``make soak`` runs it with 1,000 operations, 20 kills and
more reorgs (``WATCHER_SOAK_OPS``, ``WATCHER_SOAK_KILLS``, ``WATCHER_SOAK_REORGS``,
``WATCHER_SOAK_SEED``).
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio

from tests.support.daemon import API_TOKEN, DaemonProcess, chain_entry, free_port, write_config
from tests.support.evm import Anvil, Token
from tests.support.receiver import receiving

OPS = int(os.environ.get("WATCHER_SOAK_OPS", "120"))
KILLS = int(os.environ.get("WATCHER_SOAK_KILLS", "3"))
REORGS = int(os.environ.get("WATCHER_SOAK_REORGS", "3"))
SEED = int(os.environ.get("WATCHER_SOAK_SEED", "7"))

ADMIN_TOKEN = "admin-token-0123456789"
APP = {"authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
TREASURY = "0x000000000000000000000000000000000000bEEF"
CONFIRMATIONS, FINALITY = 2, 6


def recipient(i: int) -> str:
    """A fresh external address per payout, so its balance tells how often it was paid."""
    return "0x" + hashlib.sha256(f"payout-{SEED}-{i}".encode()).hexdigest()[:40]


class Api:
    """The app's side: every call survives the daemon being down (it waits for the restart);
    only idempotent requests are repeated blindly."""

    def __init__(self, port: int):
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10)

    async def call(self, method: str, path: str, *, headers: dict[str, str] = APP, **kw: Any) -> httpx.Response:
        for _ in range(300):  # bounded: 30 s of a daemon that does not come back fails the test
            try:
                r = await self.http.request(method, path, headers=headers, **kw)
            except httpx.TransportError:
                await trio.sleep(0.1)
                continue
            if r.status_code == 503 and "storage" not in r.text:
                await trio.sleep(0.1)
                continue
            return r
        raise AssertionError(f"{method} {path}: the daemon did not answer for 30 s")


class Workload:
    def __init__(self, anvil: Anvil, token: Token, api: Api, rng: random.Random):
        self.anvil, self.token, self.api, self.rng = anvil, token, api, rng
        self.payer = anvil.accounts[1]
        self.deposits: list[tuple[str, str, int]] = []  # (txid, kind, amount): what the test sent
        self.payout_keys: list[str] = []
        self.invoices: list[str] = []
        self.addresses: list[str] = []

    async def setup(self, labels: int) -> None:
        for i in range(labels):
            r = await self.api.call("POST", "/v1/addresses", json={"chain": "devnet", "label": f"user-{i}"})
            assert r.status_code in (200, 201), r.text
            self.addresses.append(r.json()["address"])

    def deposit(self, kind: str) -> None:
        to = self.rng.choice(self.addresses)
        if kind == "native":
            amount = self.rng.randrange(10**15, 10**17)
            self.deposits.append((self.anvil.send(self.payer, to, amount), "native", amount))
        else:
            amount = self.rng.randrange(1_000_000, 50_000_000)
            self.deposits.append((self.token.transfer(self.payer, to, amount), "token", amount))

    async def invoice(self, i: int) -> None:
        units = self.rng.randrange(1_000_000, 20_000_000)
        body = {"chain": "devnet", "asset": "USDT", "amount": f"{units // 10**6}.{units % 10**6:06d}",
                "order_id": f"order-{i}", "expires_in": 3600}
        r = await self.api.call("POST", "/v1/invoices", json=body)
        assert r.status_code == 201, r.text
        inv = r.json()
        self.invoices.append(inv["id"])
        if self.rng.random() < 0.8:
            self.deposits.append((self.token.transfer(self.payer, inv["address"], units), "token", units))

    async def payout(self, i: int) -> None:
        key = f"soak-{i}"
        asset, amount = ("ETH", "0.00" + str(self.rng.randrange(1, 10))) if self.rng.random() < 0.4 else \
            ("USDT", f"{self.rng.randrange(1, 9)}.{self.rng.randrange(0, 99):02d}")
        body = {"chain": "devnet", "asset": asset, "amount": amount, "to": recipient(i), "idempotency_key": key}
        r = await self.api.call("POST", "/v1/payouts", json=body)
        assert r.status_code == 202, r.text
        if self.rng.random() < 0.3:  # an app retrying after a timeout it thought it saw
            again = await self.api.call("POST", "/v1/payouts", json=body)
            assert again.status_code == 202 and again.json()["id"] == r.json()["id"], again.text
        self.payout_keys.append(key)

    async def sweep(self) -> None:
        r = await self.api.call("POST", "/v1/sweeps/run", json={}, headers=ADMIN)
        assert r.status_code == 202, r.text


def db_rows(db, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        c.row_factory = sqlite3.Row
        return c.execute(sql, params).fetchall()


def unsettled(db) -> list[tuple]:
    return [tuple(r) for r in db_rows(
        db, "SELECT 'transfer', id, status FROM transfers WHERE status = 'detected'"
            " UNION ALL SELECT 'payout', id, status || ' ' || COALESCE(reason, '') FROM payouts"
            " WHERE status IN ('pending', 'broadcast')"
            " UNION ALL SELECT 'sweep', id, status FROM sweeps WHERE status IN ('planned', 'funding', 'broadcast')"
            " UNION ALL SELECT 'chain_tx', txid, purpose || ' ' || ref_id FROM chain_txs WHERE status = 'open'"
            " UNION ALL SELECT 'delivery', id, status FROM deliveries WHERE status = 'pending'")]


@pytest.mark.slow
async def settle(mine: Callable[[], object], db: Any, proc: DaemonProcess, finality: int = FINALITY) -> None:
    """Mine a block at a time until nothing is unsettled and stays so while blocks pass
    finality (bounded: two minutes of blocks)."""
    quiet, left = 0, []
    for _ in range(400):
        mine()
        await trio.sleep(0.3)
        left = unsettled(db)
        quiet = 0 if left else quiet + 1
        if quiet >= finality + 2:
            return
    raise AssertionError(f"not settled: {left[:20]}\n{proc.log()[-3000:]}")


async def test_crash_and_reorg_soak(tmp_path, anvil: Anvil, token: Token):
    rng = random.Random(SEED)
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry(
        "devnet", anvil.url, tokens=[("USDT", token.address, 6)], confirmations=CONFIRMATIONS,
        finality_depth=FINALITY, chain_id=31337, poll_interval=0.2,
        payouts={"stuck_after": 3.0},
        sweep={"to": TREASURY, "min_amount": {"ETH": "0.05", "USDT": "10"}, "interval": 0,
               "funding_confirmations": 1})],
        api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN},
                              "webhooks": {"allowed_hosts": ["127.0.0.1"], "timeout": 2.0,
                                           "schedule": [0, 0.2, 0.5, 1, 1, 2, 2, 2, 2, 2, 5, 5, 5, 5, 5]}})
    db = tmp_path / "watcher.db"
    token.mint(anvil.accounts[1], 10**15)
    kills = sorted(rng.sample(range(5, OPS), min(KILLS, OPS - 5)))
    reorgs = set(rng.sample(range(10, OPS), min(REORGS, OPS - 10)))
    proc = DaemonProcess(cfg).start()
    api = Api(port)
    done_kills = 0
    reorged = []
    try:
        async with receiving() as rx:
            r = await api.call("POST", "/v1/webhooks", json={"url": rx.url, "events": ["*"]})
            assert r.status_code == 201, r.text
            hot = (await api.call("GET", "/v1/admin/status", headers=ADMIN)).json()["hot_wallets"]["devnet"]
            anvil.wait_receipt(anvil.send(anvil.accounts[0], hot, 100 * 10**18))
            anvil.wait_receipt(token.mint(hot, 10**12))
            anvil.automine(False)
            work = Workload(anvil, token, api, rng)
            await work.setup(labels=20)
            with trio.fail_after(60 + OPS * 1.5 + KILLS * 10):
                for i in range(OPS):
                    op = rng.choices(["native", "token", "invoice", "payout", "sweep"], [30, 30, 20, 15, 5])[0]
                    if op in ("native", "token"):
                        work.deposit(op)
                    elif op == "invoice":
                        await work.invoice(i)
                    elif op == "payout":
                        await work.payout(i)
                    else:
                        await work.sweep()
                    if rng.random() < 0.35:
                        anvil.mine(1)
                    if i in reorgs and anvil.head() > FINALITY + 2:
                        depth = rng.randint(1, FINALITY)
                        anvil.reorg(depth)
                        reorged.append(depth)
                    while done_kills < len(kills) and kills[done_kills] <= i:
                        await trio.sleep(rng.uniform(0, 0.5))  # somewhere in whatever it is doing
                        proc.kill()
                        done_kills += 1
                        proc = DaemonProcess(cfg).start()
                    await trio.sleep(0.01)
            assert done_kills == len(kills)
            # let everything settle: final sweeps, payouts, confirmations, deliveries
            await work.sweep()
            await settle(lambda: anvil.mine(1), db, proc)
            await trio.sleep(1)
            received = rx.unique()
    finally:
        await api.http.aclose()
        proc.stop()
    log = proc.log()

    # -- transfers: exactly the canonical deposits, each once, exact amounts
    expected: dict[tuple[str, int], int] = {}
    vanished = 0
    for txid, kind, amount in work.deposits:
        receipt = anvil.receipt(txid)
        if receipt is None or int(receipt["status"], 16) != 1:
            vanished += 1
            continue
        index = -1 if kind == "native" else int(receipt["logs"][0]["logIndex"], 16)
        expected[(txid, index)] = amount
    rows = db_rows(db, "SELECT txid, idx, amount, status, sender FROM transfers")
    got = {(r["txid"], r["idx"]): int(r["amount"]) for r in rows
           if r["status"] == "confirmed" and r["sender"].lower() != hot.lower()}  # not the gas top-ups
    assert got == expected, (len(got), len(expected), set(got) ^ set(expected))
    assert all(r["status"] in ("confirmed", "orphaned") for r in rows)
    assert not {(r["txid"], r["idx"]) for r in rows if r["status"] == "orphaned"} & set(expected)

    # -- payouts: one per key, each completed one paid exactly once
    payouts = db_rows(db, "SELECT * FROM payouts")
    assert Counter(p["idempotency_key"] for p in payouts) == Counter(set(work.payout_keys))
    completed = [p for p in payouts if p["status"] == "completed"]
    assert len(completed) >= len(payouts) * 0.9, Counter(p["status"] for p in payouts)
    for p in completed:
        if p["asset"] == "ETH":
            assert anvil.balance(p["to_address"]) == int(p["amount"]), p["id"]
        else:
            assert token.balance(p["to_address"]) == int(p["amount"]), p["id"]
    hot_txs = db_rows(db, "SELECT json_extract(details, '$.nonce') AS nonce FROM chain_txs WHERE lower(sender) = ?"
                          " AND status IN ('mined', 'failed') AND block_number IS NOT NULL", (hot.lower(),))
    nonces = [r["nonce"] for r in hot_txs]
    assert len(nonces) == len(set(nonces))  # one mined transaction per nonce
    assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == len(nonces)

    # -- sweeps: each mined once; the treasury holds exactly their sum
    sweeps = db_rows(db, "SELECT c.ref_id, c.asset, c.amount, c.txid, c.block_number FROM chain_txs c"
                         " WHERE c.purpose = 'sweep' AND c.status = 'mined'")
    assert len({s["ref_id"] for s in sweeps}) == len(sweeps)
    off_chain = [(s["txid"], s["block_number"], anvil.receipt(s["txid"])) for s in sweeps
                 if (anvil.receipt(s["txid"]) or {}).get("status") != "0x1"]
    assert not off_chain, (anvil.head(), off_chain)
    by_asset: dict[str, int] = defaultdict(int)
    for s in sweeps:
        by_asset[s["asset"]] += int(s["amount"])
    assert token.balance(TREASURY) == by_asset["USDT"]
    assert anvil.balance(TREASURY) == by_asset["ETH"]

    # -- webhooks: every event delivered (deduped on webhook-id)
    events = {r["id"] for r in db_rows(db, "SELECT id FROM events")}
    missing = events - set(received)
    assert not missing, f"{len(missing)} of {len(events)} events never reached the receiver"

    # -- the chain holds what the database says
    rec = subprocess.run([sys.executable, "-m", "watcher", "reconcile", "-c", str(cfg)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert rec.returncode == 0, rec.stdout[-3000:] + rec.stderr[-2000:]
    assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]
    print(f"\nsoak: {OPS} ops, {done_kills} kills, reorgs of depth {reorged}, {len(work.deposits)} deposits "
          f"({vanished} reorged away), {len(expected)} transfers, {len(payouts)} payouts "
          f"({len(completed)} completed), {len(sweeps)} sweeps, {len(events)} events, "
          f"{len(rx.requests)} webhook requests; {time.strftime('%H:%M:%S')}")
