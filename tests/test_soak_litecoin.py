"""The crash-and-reorg soak of tests/test_soak.py for the Bitcoin family, on a real Litecoin
Core regtest node (``litecoind``, tests/conformance/bitcoin.py): a mixed workload (deposits
to labelled addresses, invoices paid exactly, in two parts, partly or not at all, payouts
with their idempotency keys sent again, sweep runs) through the real daemon (a subprocess)
while it is killed with SIGKILL at random moments and restarted, and reorgs of 1 to
``finality_depth - 1`` blocks drop payments for good or put them back in a new block.
Afterwards, with every block mined and settled, judged against the node:

- every deposit payment on the node's main chain is one confirmed transfer with its exact
  amount (looked up by txid and output); a dropped one is not confirmed; nothing twice;
- every invoice holds exactly its canonical payments and is completed iff they reach its amount;
- every idempotency key made one payout; a completed payout's fresh recipient holds exactly
  its amount, a failed one's nothing;
- every confirmed sweep is on the main chain, spends exactly the deposit outputs it covers
  (but those it leaves as dust), and the treasury holds exactly the sum of their amounts; no
  deposit is covered by two sweeps that did not fail; a confirmed sweep a reorg undid (a
  deposit it spent double-spent) is failed and its deposits planned again;
- every event reached the webhook receiver; ``watcher reconcile`` reports ok; no error logged.

``make test`` runs a short version (60 operations, 2 kills, 2 reorgs); ``make soak`` a long one
(``WATCHER_SOAK_OPS``, ``WATCHER_SOAK_KILLS``, ``WATCHER_SOAK_REORGS``, ``WATCHER_SOAK_SEED``,
the variables of tests/test_soak.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conformance.bitcoin import LitecoinHarness
from tests.support.daemon import DaemonProcess, free_port, write_config
from tests.support.litecoin import COIN, RpcFailure
from tests.support.receiver import receiving
from tests.test_soak import ADMIN, ADMIN_TOKEN, Api, db_rows, settle
from watcher.money import format_amount

OPS = int(os.environ.get("WATCHER_SOAK_OPS", "60"))
KILLS = int(os.environ.get("WATCHER_SOAK_KILLS", "2"))
REORGS = int(os.environ.get("WATCHER_SOAK_REORGS", "2"))
SEED = int(os.environ.get("WATCHER_SOAK_SEED", "7"))

CHAIN = "bitcoin"
CONFIRMATIONS, FINALITY = 2, 6
HOT_FUNDING = [4 * COIN] * 5  # 20 LTC in five coins, so that payouts do not all wait for one change
NO_SUCH_TX = -5
COINBASE_MATURITY = 100

#: How a sweep that failed but is planned again at the next run starts its reason (store.sweeps.failed(replan=True)).
REPLANNED = ("the node refused it", "a conflicting transaction", "its transaction left the chain")


class Payer(LitecoinHarness):
    """The conformance harness with two changes for long runs.

    It pays only from coins deeper than any reorg of the soak, and from coinbase outputs only
    once no reorg can make them immature again. The harness picks any confirmed coin, so a
    payment may spend the change of one a reorg then drops (the harness's conflicting spend
    of the dropped one also takes the other out of the mempool, and its own conflicting spend
    of that change fails), or a coinbase output that the reorg makes immature (the node takes
    the payment out of its mempool: it can neither be kept nor conflicted).

    The blocks of a reorg pay their coinbase to a new address of the payer. Blocks mined
    many a second get the timestamp median-time-past + 1, a function of the chain; a new
    block with the same parent, coinbase and transactions as one the reorg invalidated (an
    empty one) is that block again, and the node refuses it ("block not accepted")."""

    def reorg(self, depth: int, keep: Sequence[str] = ()) -> None:
        self.ltc._payer = self.ltc.rpc("getnewaddress", "", "bech32", wallet="payer")
        super().reorg(depth, keep)

    def _coin(self) -> tuple[str, int, int]:
        for u in self.ltc.rpc("listunspent", FINALITY, 9_999_999, wallet="payer"):
            key = (u["txid"], u["vout"])
            if key in self._used or not u["spendable"] or u["amount"] < 1:
                continue
            if u["confirmations"] < COINBASE_MATURITY + FINALITY and (self.ltc.rpc(
                    "gettxout", u["txid"], u["vout"]) or {"coinbase": True})["coinbase"]:
                continue  # a reorg could make it immature: its spend would leave the mempool
            self._used.add(key)
            return u["txid"], u["vout"], int(u["amount"] * COIN)
        raise RuntimeError("the payer has no free coin deeper than a reorg left")


def on_chain(h: LitecoinHarness, txid: str) -> dict[str, Any] | None:
    """The transaction if it is in a block of the node's main chain (the node has -txindex)."""
    try:
        tx = h.ltc.rpc("getrawtransaction", txid, True)
    except RpcFailure as e:
        if e.code == NO_SUCH_TX:
            return None
        raise
    return tx if int(tx.get("confirmations") or 0) > 0 else None


def left_unswept(db: Path, expected: dict[tuple[str, int], int], by_sweeps: set[tuple[str, int]],
                 dust: set[tuple[str, int]]) -> int:
    """After the last sweep runs, each canonical deposit no confirmed sweep spent must have a
    reason to be left: a confirmed sweep left it as dust (not worth its fee), a sweep covering
    it failed for good (its address waits for its next deposit, docs/chains.md), or all of them
    together are not worth a sweep (min_amount). How many are left."""
    rows = {(r["txid"], r["idx"]): r for r in db_rows(
        db, "SELECT id, txid, idx, address FROM transfers WHERE chain = ? AND status = 'confirmed'", (CHAIN,))}
    plans = db_rows(db, "SELECT s.id, s.status, s.reason, d.transfer_id FROM sweeps s"
                        " JOIN sweep_deposits d ON d.sweep_id = s.id WHERE s.chain = ?", (CHAIN,))
    left = [k for k in expected if k not in by_sweeps]
    unexplained = []
    for k in left:
        if k in dust:
            continue
        covering = [p for p in plans if p["transfer_id"] == rows[k]["id"]]
        assert all(p["status"] == "failed" for p in covering), (k, [dict(p) for p in covering])
        if any(not (p["reason"] or "").startswith(REPLANNED) for p in covering):
            continue
        unexplained.append(k)
    worth = sum(expected[k] for k in unexplained)
    assert worth < 1_100_000, ("canonical deposits left unswept for no reason", [rows[k]["id"] for k in unexplained])
    return len(left)


def output_to(tx: dict[str, Any], address: str, amount: int) -> int:
    """The index of ``tx``'s output paying ``amount`` to ``address``."""
    for out in tx["vout"]:
        spk = out["scriptPubKey"]
        if address in spk.get("addresses", [spk.get("address")]) and int(Decimal(out["value"]) * COIN) == amount:
            return int(out["n"])
    raise AssertionError(f"{tx['txid']} pays no {amount} to {address}")


class Workload:
    def __init__(self, h: LitecoinHarness, api: Api, rng: random.Random):
        self.h, self.api, self.rng = h, api, rng
        self.deposits: list[tuple[str, str, int]] = []  # (txid, address, sats): what the test paid
        self.addresses: list[str] = []
        self.invoices: dict[str, tuple[str, int, str]] = {}  # id -> (address, sats, how it was paid)
        self.payouts: dict[str, tuple[dict[str, Any], str]] = {}  # key -> (request, payout id)

    async def setup(self, labels: int) -> None:
        for i in range(labels):
            r = await self.api.call("POST", "/v1/addresses", json={"chain": CHAIN, "label": f"user-{i}"})
            assert r.status_code in (200, 201), r.text
            self.addresses.append(r.json()["address"])

    def pay(self, to: str, sats: int) -> None:
        self.deposits.append((self.h.pay(to, "LTC", sats), to, sats))

    def deposit(self) -> None:
        self.pay(self.rng.choice(self.addresses), self.rng.randrange(1_000_000, 50_000_000))

    async def invoice(self, i: int) -> None:
        sats = self.rng.randrange(1_000_000, 20_000_000)
        body = {"chain": CHAIN, "asset": "LTC", "amount": format_amount(sats, 8), "tolerance": "0",
                "order_id": f"ltc-order-{i}", "expires_in": 3600}
        r = await self.api.call("POST", "/v1/invoices", json=body)
        assert r.status_code == 201, r.text
        inv = r.json()
        how = self.rng.choices(["exact", "split", "partial", "unpaid"], [55, 15, 15, 15])[0]
        self.invoices[inv["id"]] = (inv["address"], sats, how)
        if how == "exact":
            self.pay(inv["address"], sats)
        elif how == "split":
            first = self.rng.randrange(sats // 4, sats * 3 // 4)
            self.pay(inv["address"], first)
            self.pay(inv["address"], sats - first)
        elif how == "partial":
            self.pay(inv["address"], sats // 2)

    async def payout(self, i: int) -> None:
        if self.payouts and self.rng.random() < 0.15:  # an app sending an old request again
            key = self.rng.choice(sorted(self.payouts))
            body, pid = self.payouts[key]
            again = await self.api.call("POST", "/v1/payouts", json=body)
            assert again.status_code == 202 and again.json()["id"] == pid, again.text
            return
        key = f"ltc-soak-{SEED}-{i}"
        body = {"chain": CHAIN, "asset": "LTC", "amount": format_amount(self.rng.randrange(100_000, 5_000_000), 8),
                "to": self.h.fresh_address(), "idempotency_key": key}
        r = await self.api.call("POST", "/v1/payouts", json=body)
        assert r.status_code == 202, r.text
        self.payouts[key] = (body, r.json()["id"])
        if self.rng.random() < 0.3:  # an app retrying after a timeout it thought it saw
            again = await self.api.call("POST", "/v1/payouts", json=body)
            assert again.status_code == 202 and again.json()["id"] == r.json()["id"], again.text

    async def sweep(self) -> None:
        r = await self.api.call("POST", "/v1/sweeps/run", json={}, headers=ADMIN)
        assert r.status_code == 202, r.text

    def reorg(self, depth: int) -> int:
        """Replace the last ``depth`` blocks: each of our payments in them is put back in the
        first new block or dropped for good, at random; the number dropped."""
        head = self.h.head()
        ours = {txid for txid, _, _ in self.deposits}
        dropped = [txid for n in range(head - depth + 1, head + 1)
                   for txid in self.h.ltc.rpc("getblock", self.h.ltc.rpc("getblockhash", n))["tx"][1:] if txid in ours]
        keep = [txid for txid in dropped if self.rng.random() < 0.5]
        self.h.reorg(depth, keep=keep)
        return len(dropped) - len(keep)


@pytest.mark.slow
async def test_litecoin_crash_and_reorg_soak(tmp_path: Path):
    h = Payer(tmp_path / "node")
    h.workdir.mkdir(parents=True, exist_ok=True)
    try:
        h.start()
        await soak(h, tmp_path)
    finally:
        h.stop()


async def soak(h: LitecoinHarness, tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    port = free_port()
    treasury = h.fresh_address()
    cfg = write_config(tmp_path / "watcher", [h.chain_entry(
        confirmations=CONFIRMATIONS, finality_depth=FINALITY, payouts={"stuck_after": 4.0},
        sweep={"to": treasury, "min_amount": {"LTC": "0.01"}, "interval": 0, "max_inputs": 5})],
        api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN},
                              "webhooks": {"allowed_hosts": ["127.0.0.1"], "timeout": 2.0,
                                           "schedule": [0, 0.2, 0.5, 1, 1, 2, 2, 2, 2, 2, 5, 5, 5, 5, 5]}})
    db = cfg.parent / "watcher.db"
    kills = sorted(rng.sample(range(5, OPS), min(KILLS, OPS - 5)))
    reorgs = set(rng.sample(range(10, OPS), min(REORGS, OPS - 10)))
    proc = DaemonProcess(cfg).start()
    api = Api(port)
    done_kills = 0
    reorged: list[int] = []
    dropped = 0
    try:
        async with receiving() as rx:
            r = await api.call("POST", "/v1/webhooks", json={"url": rx.url, "events": ["*"]})
            assert r.status_code == 201, r.text
            hot = (await api.call("GET", "/v1/admin/status", headers=ADMIN)).json()["hot_wallets"][CHAIN]
            for sats in HOT_FUNDING:
                h.fund(hot, "LTC", sats)
            h.mine(FINALITY)  # the funding is out of any reorg's reach
            work = Workload(h, api, rng)
            await work.setup(labels=12)
            with trio.fail_after(60 + OPS * 1.5 + KILLS * 10):
                for i in range(OPS):
                    op = rng.choices(["deposit", "invoice", "payout", "sweep"], [45, 25, 20, 10])[0]
                    if op == "deposit":
                        work.deposit()
                    elif op == "invoice":
                        await work.invoice(i)
                    elif op == "payout":
                        await work.payout(i)
                    else:
                        await work.sweep()
                    if rng.random() < 0.35:
                        h.mine(1)
                    if i in reorgs:
                        depth = rng.randint(1, FINALITY - 1)
                        dropped += work.reorg(depth)
                        reorged.append(depth)
                    while done_kills < len(kills) and kills[done_kills] <= i:
                        await trio.sleep(rng.uniform(0, 0.5))  # somewhere in whatever it is doing
                        proc.kill()
                        done_kills += 1
                        proc = DaemonProcess(cfg).start()
                    await trio.sleep(0.01)
            assert done_kills == len(kills)
            worked = time.monotonic()
            # let everything settle: payouts, confirmations, deliveries, and the last sweep runs:
            # at least two (the second for what the first left or what confirmed meanwhile), and
            # more while a sweep that failed during the previous one (the node refused it, a
            # rival took its place) left its addresses planned again (bounded: five runs)
            last_run_ms = int(time.time() * 1000)
            for run in range(5):
                await work.sweep()
                await settle(lambda: h.mine(1), db, proc, FINALITY)
                if run >= 1 and not db_rows(db, "SELECT 1 FROM sweeps WHERE chain = ? AND status = 'failed'"
                                                " AND updated_at > ?", (CHAIN, last_run_ms)):
                    break
                last_run_ms = int(time.time() * 1000)
            await trio.sleep(1)
            received = rx.unique()
            settled = time.monotonic()
    finally:
        await api.http.aclose()
        proc.stop()
    log = proc.log()

    # -- transfers: exactly the canonical deposit outputs, each once, exact amounts
    expected: dict[tuple[str, int], int] = {}
    paid_to: Counter[str] = Counter()  # address -> canonical sats
    for txid, address, sats in work.deposits:
        tx = on_chain(h, txid)
        if tx is not None:
            expected[(txid, output_to(tx, address, sats))] = sats
            paid_to[address] += sats
    rows = db_rows(db, "SELECT txid, idx, amount, status, address FROM transfers WHERE chain = ?", (CHAIN,))
    assert not [k for k, n in Counter((r["txid"], r["idx"]) for r in rows).items() if n > 1]
    assert all(r["status"] in ("confirmed", "orphaned") for r in rows), Counter(r["status"] for r in rows)
    deposits = [r for r in rows if r["address"] != hot]
    got = {(r["txid"], r["idx"]): int(r["amount"]) for r in deposits if r["status"] == "confirmed"}
    assert got == expected, (len(got), len(expected), set(got) ^ set(expected))
    funding = [int(r["amount"]) for r in rows if r["address"] == hot and r["status"] == "confirmed"]
    assert sorted(funding) == sorted(HOT_FUNDING)

    # -- invoices: their canonical payments, completed iff they reach the amount
    invoices = {r["id"]: r for r in db_rows(db, "SELECT * FROM invoices WHERE chain = ?", (CHAIN,))}
    for iid, (address, sats, how) in work.invoices.items():
        inv, paid = invoices[iid], paid_to[address]
        assert (int(inv["received"]), int(inv["confirmed"])) == (paid, paid), (iid, how, dict(inv), paid)
        assert inv["status"] == ("completed" if paid >= sats else "awaiting_payment"), (iid, how, dict(inv), paid)
        assert bool(inv["partial"]) == (0 < paid < sats), (iid, how, dict(inv), paid)

    # -- payouts: one per key, each completed one paid exactly once, on the main chain
    payouts = db_rows(db, "SELECT * FROM payouts WHERE chain = ?", (CHAIN,))
    assert Counter(p["idempotency_key"] for p in payouts) == Counter(list(work.payouts))
    assert {p["idempotency_key"]: p["id"] for p in payouts} == {k: pid for k, (_, pid) in work.payouts.items()}
    statuses = Counter(p["status"] for p in payouts)
    assert set(statuses) <= {"completed", "failed"}, statuses
    for p in payouts:
        paid = h.balance(p["to_address"], "LTC")
        assert paid == (int(p["amount"]) if p["status"] == "completed" else 0), (dict(p), paid)
        txs = db_rows(db, "SELECT txid FROM chain_txs WHERE ref_id = ? AND purpose = 'payout' AND status = 'mined'",
                      (p["id"],))
        assert len(txs) == (p["status"] == "completed"), (dict(p), [dict(t) for t in txs])
        assert all(on_chain(h, t["txid"]) for t in txs), (dict(p), [dict(t) for t in txs])
    failed_payouts = [(p["id"], p["reason"]) for p in payouts if p["status"] == "failed"]
    assert not failed_payouts, failed_payouts
    # every transaction watcher says is mined is in the main chain, one per conflict group
    mined = db_rows(db, "SELECT txid, conflict, purpose FROM chain_txs WHERE chain = ? AND status = 'mined'", (CHAIN,))
    assert not [t["txid"] for t in mined if on_chain(h, t["txid"]) is None]
    assert not [k for k, n in Counter(t["conflict"] for t in mined).items() if n > 1]

    # -- sweeps: each confirmed one mined once, spending only deposits it covers; the treasury
    # holds their sum; a canonical deposit no confirmed sweep spent is still at its address
    sweeps = db_rows(db, "SELECT * FROM sweeps WHERE chain = ?", (CHAIN,))
    confirmed = [s for s in sweeps if s["status"] == "confirmed"]
    covered = db_rows(db, "SELECT d.sweep_id, t.txid, t.idx FROM sweep_deposits d JOIN transfers t"
                          " ON t.id = d.transfer_id JOIN sweeps s ON s.id = d.sweep_id WHERE s.status != 'failed'")
    twice = db_rows(db, "SELECT d.transfer_id, COUNT(*) AS n FROM sweep_deposits d JOIN sweeps s ON s.id = d.sweep_id"
                        " WHERE s.status != 'failed' GROUP BY d.transfer_id HAVING n > 1")
    assert not twice, [tuple(r) for r in twice]
    swept = 0
    by_sweeps: set[tuple[str, int]] = set()
    dust: set[tuple[str, int]] = set()  # covered, left where they are: not worth their fee
    for s in confirmed:
        its = {(c["txid"], c["idx"]) for c in covered if c["sweep_id"] == s["id"]}
        txs = db_rows(db, "SELECT txid, status, details FROM chain_txs WHERE ref_id = ? AND purpose = 'sweep'",
                      (s["id"],))
        mined_txs = [t for t in txs if t["status"] == "mined"]
        assert len(mined_txs) == 1 and mined_txs[0]["txid"] == s["txid"], (dict(s), [dict(t) for t in txs])
        tx = on_chain(h, s["txid"])
        assert tx is not None, dict(s)
        spent = {(i["txid"], i["vout"]) for i in tx["vin"]}
        assert spent <= its and spent <= set(expected), (dict(s), spent - its, spent - set(expected))
        left = {(o[0], o[1]) for o in json.loads(mined_txs[0]["details"]).get("left", ())}
        assert its - spent <= left, (dict(s), its - spent - left)  # covered = spent or left as dust
        dust |= left
        swept += int(s["amount"])
        by_sweeps |= spent
    undone = [s for s in sweeps if s["status"] == "failed" and (s["reason"] or "").startswith(
        "its transaction left the chain")]
    assert h.balance(treasury, "LTC") == swept
    gone = [k for k in expected if k not in by_sweeps and h.ltc.rpc("gettxout", k[0], k[1]) is None]
    assert not gone, f"deposit outputs spent by no confirmed sweep: {gone}"
    unswept = left_unswept(db, expected, by_sweeps, dust)

    # -- webhooks: every event delivered (deduped on webhook-id)
    events = {r["id"] for r in db_rows(db, "SELECT id FROM events")}
    missing = events - set(received)
    assert not missing, f"{len(missing)} of {len(events)} events never reached the receiver"

    # -- the chain holds what the database says
    rec = subprocess.run([sys.executable, "-m", "watcher", "reconcile", "-c", str(cfg)], capture_output=True,
                         text=True, cwd=cfg.parent, timeout=120)
    assert rec.returncode == 0, rec.stdout[-3000:] + rec.stderr[-2000:]
    assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]
    # a confirmed sweep a reorg undid (a deposit it spent double-spent) is an error worth
    # an operator's look: logged, and the sweep failed
    errors = [line for line in log.splitlines() if '"level":"error"' in line and not any(
        f"settled sweep {s['id']}: the node refuses it for good" in line for s in undone)]
    assert not errors, "\n".join(errors[:20])
    print(f"\nlitecoin soak (seed {SEED}): {OPS} ops, {done_kills} kills, reorgs of depth {reorged} "
          f"({dropped} payments dropped for good), {len(work.deposits)} payments, {len(expected)} transfers, "
          f"{len(work.invoices)} invoices ({Counter(i['status'] for i in invoices.values())}), {len(payouts)} payouts "
          f"{dict(statuses)}, {len(sweeps)} sweeps ({len(confirmed)} confirmed, {unswept} canonical deposits left "
          f"unswept), {len(events)} events, "
          f"{len(rx.requests)} webhook requests; work {worked - started:.0f} s, settle {settled - worked:.0f} s, "
          f"{len(undone)} confirmed sweep(s) undone by a reorg")
