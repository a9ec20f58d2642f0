"""Sweeps on anvil: native and ERC-20 (with a gas top-up from the hot wallet), exact amounts
at the treasury, dust accounted for, pause, and a crash between top-up and token transfer."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import trio

from tests.support.daemon import (
    API_TOKEN,
    DaemonProcess,
    chain_entry,
    free_port,
    running,
    wait_http,
    wait_until,
    write_config,
)
from tests.support.evm import Anvil, Token, calldata
from watcher.money import parse_amount

ADMIN_TOKEN = "admin-token-0123456789"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
TREASURY = "0x000000000000000000000000000000000000bEEF"


def config(tmp_path, anvil: Anvil, token: Token, port: int, *, interval: float = 0, funding_confirmations: int = 1):
    return write_config(tmp_path, [chain_entry(
        "devnet", anvil.url, tokens=[("USDT", token.address, 6)], confirmations=2, chain_id=31337,
        sweep={"to": TREASURY, "min_amount": {"ETH": "0.01", "USDT": "1"}, "interval": interval,
               "funding_confirmations": funding_confirmations})],
        api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})


def transfer_logs_from(anvil: Anvil, token: Token, sender: str) -> list[dict]:
    topic = "0x" + sender.lower().removeprefix("0x").rjust(64, "0")
    return anvil.rpc("eth_getLogs", {"fromBlock": "0x0", "toBlock": "latest", "address": token.address,
                                     "topics": ["0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef",
                                                topic]})


async def mine_until(anvil: Anvil, predicate, *, timeout: float = 40, what: str = "condition"):
    deadline = trio.current_time() + timeout
    while not (value := predicate()):
        assert trio.current_time() < deadline, f"timed out waiting for {what}"
        anvil.mine(1)
        await trio.sleep(0.15)
    return value


async def test_native_and_token_sweeps_reach_the_treasury_exactly(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port)
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                  headers=ADMIN, trust_env=False) as http:
            hot = d.store.hot_wallet("devnet")
            anvil.wait_receipt(anvil.send(anvil.accounts[0], hot, 10**18))
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            bob, _ = d.store.addresses.deposit_address("devnet", "bob")
            anvil.wait_receipt(anvil.send(anvil.accounts[1], alice.address, 10**18))
            anvil.wait_receipt(token.mint(bob.address, 100_000_000))
            tiny, _ = d.store.addresses.deposit_address("devnet", "tiny")
            anvil.wait_receipt(token.mint(tiny.address, 500_000))  # below min_amount: stays
            await mine_until(anvil, lambda: len(d.views.transfers(status="confirmed")[0]) == 3, what="deposits")
            r = await http.post("/v1/sweeps/run", json={})
            assert r.status_code == 202 and r.json() == {"requested": ["devnet"]}
            sweeps = await mine_until(anvil, lambda: (s := d.views.sweeps()[0]) and len(s) == 2
                                      and all(x["status"] == "confirmed" for x in s) and s, what="sweeps confirmed")
            by_asset = {s["asset"]: s for s in sweeps}
            eth, usdt = by_asset["ETH"], by_asset["USDT"]

            # the treasury got exactly what the sweeps say
            assert token.balance(TREASURY) == 100_000_000 == int(usdt["base_units"])
            assert anvil.balance(TREASURY) == int(eth["base_units"])
            # native: every wei of the deposit is the amount swept, the fee, or recorded dust
            def units(v: str) -> int:
                return parse_amount(v, 18, allow_zero=True)

            assert int(eth["base_units"]) + units(eth["fee_paid"]) + units(eth["dust"]) == 10**18
            assert anvil.balance(alice.address) == units(eth["dust"])
            # token: the gas came from the hot wallet, exactly once, and is not a "deposit"
            assert usdt["topup_amount"] and usdt["topup_txid"]
            assert len(transfer_logs_from(anvil, token, bob.address)) == 1
            assert anvil.balance(bob.address) == units(usdt["dust"])
            assert units(usdt["topup_amount"]) == units(usdt["fee_paid"]) + units(usdt["dust"])
            assert [t["asset"] for t in d.views.transfers(chain="devnet")[0] if t["label"] == "bob"] == ["USDT"]
            events = [e.type for e in d.store.events.list(subject=usdt["id"], limit=20)]
            assert events == ["sweep.planned", "sweep.funding", "sweep.broadcast", "sweep.confirmed"]
            assert token.balance(tiny.address) == 500_000
            listed = (await http.get("/v1/sweeps", params={"status": "confirmed"})).json()["items"]
            assert {s["id"] for s in listed} == {eth["id"], usdt["id"]}
            # the same deposits are never swept twice
            await http.post("/v1/sweeps/run", json={})
            for _ in range(5):
                anvil.mine(1)
                await trio.sleep(0.1)
            assert len(d.views.sweeps()[0]) == 2


async def test_pause_holds_sweeps_and_resume_releases_them(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, interval=0.3)
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                  headers=ADMIN, trust_env=False) as http:
            r = await http.post("/v1/admin/pause", json={"scope": "sweeps"})
            assert r.json()["paused"] == ["sweeps"]
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            anvil.wait_receipt(anvil.send(anvil.accounts[1], alice.address, 10**18))
            anvil.mine(3)
            await trio.sleep(1.5)  # several sweep intervals pass while paused
            assert d.views.sweeps()[0] == []
            r = await http.post("/v1/sweeps/run", json={})
            assert r.status_code == 409 and r.json()["error"]["code"] == "paused"
            r = await http.post("/v1/admin/resume", json={"scope": "sweeps"})
            assert r.json()["paused"] == []
            await mine_until(anvil, lambda: [s for s in d.views.sweeps()[0] if s["status"] == "confirmed"],
                             what="sweep after resume")


@contextlib.asynccontextmanager
async def alice_deposited(cfg, port: int, anvil: Anvil):
    """The daemon running (its API with an admin client) and alice's 1 ETH deposit confirmed,
    a sweep candidate: yields (daemon, admin client, alice's address row)."""
    async with running(cfg, api=True) as d, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=ADMIN, trust_env=False) as http:
        alice, _ = d.store.addresses.deposit_address("devnet", "alice")
        anvil.wait_receipt(anvil.send(anvil.accounts[1], alice.address, 10**18))
        await mine_until(anvil, lambda: d.store.sweeps.candidates("devnet", 10), what="a candidate")
        yield d, http, alice


@contextlib.asynccontextmanager
async def a_deposit_behind_a_fault_proxy(tmp_path, anvil: Anvil, token: Token):
    """A daemon whose node is behind a fault proxy, sweeping on request, with alice's 1 ETH
    deposit confirmed and a sweep candidate: yields (daemon, admin client, proxy, alice)."""
    from tests.support.faultproxy import fault_proxy

    port = free_port()
    async with fault_proxy(anvil.url) as proxy:
        cfg = write_config(tmp_path, [chain_entry(
            "devnet", proxy.url, tokens=[("USDT", token.address, 6)], confirmations=2, chain_id=31337,
            sweep={"to": TREASURY, "min_amount": {"ETH": "0.01"}, "interval": 0})],
            api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
        async with alice_deposited(cfg, port, anvil) as (d, http, alice):
            yield d, http, proxy, alice


async def test_a_sweep_the_node_refused_is_planned_again_by_the_next_run(tmp_path, anvil: Anvil, token: Token):
    """The node refuses a sweep for good (a non-retryable error while it is being signed):
    the sweep fails without moving anything, and the next run plans the deposit again
    instead of forgetting it until the address's next deposit."""
    with trio.fail_after(60):
        async with a_deposit_behind_a_fault_proxy(tmp_path, anvil, token) as (d, http, proxy, _):
            before = anvil.balance(TREASURY)
            proxy.inject("rpc_error", method="eth_getCode", error=(-32602, "refused by policy"))
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
            failed = await mine_until(anvil, lambda: [s for s in d.views.sweeps()[0] if s["status"] == "failed"],
                                      what="the refused sweep")
            assert "refused by policy" in failed[0]["reason"] and proxy.injected["rpc_error"] == 1
            assert anvil.balance(TREASURY) == before
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202  # no new deposit
            done = await mine_until(anvil, lambda: [s for s in d.views.sweeps()[0]
                                                    if s["status"] == "confirmed"], what="the sweep planned again")
            assert anvil.balance(TREASURY) - before == int(done[0]["base_units"]) > 0
            assert done[0]["deposits"] == failed[0]["deposits"] and len(done[0]["deposits"]) == 1


async def test_a_bug_in_the_step_of_a_sweep_in_flight_never_marks_it_failed(tmp_path, anvil: Anvil, token: Token):
    """A step of a sweep whose transaction is out fails with an unexpected exception (a bug,
    not the node, not the file). Money is moving, so the sweep must keep following it: before
    the fix it was marked failed at once, while its transaction paid the treasury anyway."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port)
    with trio.fail_after(90):
        async with alice_deposited(cfg, port, anvil) as (d, http, _):
            wallet = await mine_until(anvil, lambda: d.senders["devnet"].wallet, what="the wallet")
            real, broken = wallet.sweep_step, [True]

            async def buggy(intent, state):
                if broken[0] and intent.txs:  # after the sweep was signed and sent
                    raise RuntimeError("a bug in a later step")
                return await real(intent, state)

            wallet.sweep_step = buggy
            before = anvil.balance(TREASURY)
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202

            def bugs() -> float:
                return d.metrics.registry.get_sample_value("watcher_errors_total", {"kind": "sweeper_bug"}) or 0

            await mine_until(anvil, lambda: bugs() >= 3, what="the step failing in three rounds")
            [sweep] = d.views.sweeps()[0]
            assert sweep["status"] == "broadcast" and sweep["reason"] is None, sweep
            assert anvil.balance(TREASURY) > before  # its transaction paid meanwhile
            broken[0] = False
            done = await mine_until(anvil, lambda: [s for s in d.views.sweeps()[0] if s["status"] == "confirmed"],
                                    what="the sweep confirmed once the step works")
            assert len(d.views.sweeps()[0]) == 1 and done[0]["id"] == sweep["id"]
            assert anvil.balance(TREASURY) - before == int(done[0]["base_units"])
            assert d.store.sweeps.candidates("devnet", 10) == []  # nothing left to sweep again


async def test_sweeps_paused_while_the_wallet_signs_one_send_nothing_until_resumed(tmp_path, anvil: Anvil,
                                                                                 token: Token):
    """The kill switch holds a sweep whose transaction the wallet is signing at that moment
    (node calls for gas and balance): what it signed is dropped, and the sweep goes after
    ``resume``. Before, the round stored and broadcast it."""
    with trio.fail_after(60):
        async with a_deposit_behind_a_fault_proxy(tmp_path, anvil, token) as (d, http, proxy, alice):
            before = anvil.balance(TREASURY)
            proxy.latency = (1.5, 1.5)
            proxy.inject("latency", method="eth_getCode")  # the wallet's gas question
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
            await mine_until(anvil, lambda: proxy.injected["latency"] == 1, what="the wallet asking for gas")
            r = await http.post("/v1/admin/pause", json={"scope": "sweeps"})
            assert r.json()["paused"] == ["sweeps"]
            await trio.sleep(2.5)
            anvil.mine(3)
            await trio.sleep(0.5)
            [sweep] = d.views.sweeps()[0]
            assert sweep["status"] == "planned" and sweep["txid"] is None, sweep
            assert anvil.rpc("eth_getTransactionCount", alice.address, "latest") == "0x0"
            assert anvil.balance(TREASURY) == before
            await http.post("/v1/admin/resume", json={"scope": "all"})
            done = await mine_until(anvil, lambda: [s for s in d.views.sweeps()[0] if s["status"] == "confirmed"],
                                    what="the sweep after resume")
            assert done[0]["id"] == sweep["id"] and anvil.balance(TREASURY) - before == int(done[0]["base_units"])


async def test_a_native_sweep_records_what_the_transaction_mined_moved(tmp_path, anvil: Anvil, token: Token):
    """A native sweep pays a replacement's higher fee out of its amount, so A and its
    replacement B move different amounts. The record took B's amount when B was signed and
    kept it when A was the one mined (a miner that had A; here anvil_reorg puts A in the new
    block): the treasury then received more than the sweep said."""
    gwei = 10**9
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry(
        "devnet", anvil.url, tokens=[("USDT", token.address, 6)], confirmations=1, chain_id=31337, finality_depth=6,
        sweep={"to": TREASURY, "min_amount": {"ETH": "0.01"}, "interval": 0},
        payouts={"stuck_after": 1.0, "fee_bump": "0.2"})], api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
    with trio.fail_after(90):
        async with alice_deposited(cfg, port, anvil) as (d, http, _):
            anvil.automine(False)
            before = anvil.balance(TREASURY)
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
            sweep = await wait_until(lambda: (s := d.views.sweeps()[0]) and s[0]["status"] == "broadcast" and s[0],
                                     what="the sweep out")
            first = d.store.chaintxs.get(sweep["txid"])
            assert first is not None
            for _ in range(3):  # fees far above what A offers: it cannot get into a block
                anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(500 * gwei))
                anvil.mine(1)
                await trio.sleep(0.5)
            replaced = await wait_until(lambda: (s := d.views.sweeps()[0][0])["txid"] != first.txid and s,
                                        what="a replacement")
            second = d.store.chaintxs.get(replaced["txid"])
            assert second is not None and second.amount < first.amount

            def confirmed() -> dict | None:
                if (s := d.views.sweeps()[0][0])["status"] == "confirmed":
                    return s
                anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(500 * gwei))
                anvil.mine(1)
                return None

            done = await wait_until(confirmed, interval=0.5, what="B confirmed")
            assert int(done["base_units"]) == second.amount
            n = int(anvil.receipt(second.txid)["blockNumber"], 16)
            anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(gwei))  # A fits in the new chain
            anvil.reorg(anvil.head() - n + 1, [(first.raw, 0)])
            assert anvil.receipt(first.txid) is not None and anvil.receipt(second.txid) is None
            d.watchers["devnet"].poke()
            d.senders["devnet"].wake()
            v = await wait_until(lambda: ((s := d.views.sweeps()[0][0])["txid"] == first.txid and s)
                                 or (anvil.mine(1) and None), interval=0.3, timeout=30, what="the sweep on A")
            assert v["status"] == "confirmed"
            assert anvil.balance(TREASURY) - before == first.amount == int(v["base_units"]), (v, first.amount)


@contextlib.asynccontextmanager
async def token_deposited(tmp_path, anvil: Anvil, token: Token):
    """The daemon running with gas in its hot wallet, 100 USDT to bob's deposit address
    confirmed, automine off: yields (daemon, admin client, bob's row)."""
    port = free_port()
    async with running(config(tmp_path, anvil, token, port), api=True) as d, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=ADMIN, trust_env=False) as http:
        anvil.wait_receipt(anvil.send(anvil.accounts[0], d.store.hot_wallet("devnet"), 10**18))
        bob, _ = d.store.addresses.deposit_address("devnet", "bob")
        anvil.wait_receipt(token.mint(bob.address, 100_000_000))
        await mine_until(anvil, lambda: d.views.transfers(status="confirmed")[0], what="the deposit")
        anvil.automine(False)
        yield d, http, bob


@contextlib.asynccontextmanager
async def token_sweep_sent(tmp_path, anvil: Anvil, token: Token):
    """:func:`token_deposited`, and a sweep run mined until its token transfer is sent:
    yields (daemon, the sweep, bob's row)."""
    async with token_deposited(tmp_path, anvil, token) as (d, http, bob):
        assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
        yield d, await mine_until(anvil, lambda: (s := d.views.sweeps()[0]) and s[0]["status"] == "broadcast"
                                  and s[0], what="the token transfer sent"), bob


async def test_a_reorg_that_takes_the_top_up_away_sends_it_again(tmp_path, anvil: Anvil, token: Token):
    """A token sweep past its funding (its transfer sent) whose top-up a reorg takes off the
    chain, and the node then forgets: the top-up is sent again (the settled transactions of a
    reorged block are followed again), mined, and the sweep completes once, the treasury paid
    exactly. (The EVM soak's seed 3 once left such a sweep broadcast for ever; this is the
    shape that works, see docs/reliability.md.)"""
    with trio.fail_after(90):
        async with token_sweep_sent(tmp_path, anvil, token) as (d, sweep, bob):
            topup = anvil.receipt(sweep["topup_txid"])
            assert topup is not None and anvil.balance(bob.address) > 0
            # the blocks from the top-up's on are replaced by empty ones: no gas at bob's any more
            anvil.reorg(anvil.head() - int(topup["blockNumber"], 16) + 1)
            # and the node forgets it (anvil puts a reorged transaction back in its pool; a real
            # node may drop it, or a rival of the hot wallet's nonce may win)
            anvil.rpc("anvil_dropTransaction", sweep["topup_txid"])
            assert anvil.balance(bob.address) == 0 and anvil.receipt(sweep["topup_txid"]) is None
            done = await mine_until(anvil, lambda: (s := d.views.sweeps()[0]) and s[0]["status"] == "confirmed"
                                    and s[0], what="the sweep completed after the top-up came back")
            assert anvil.receipt(sweep["topup_txid"]) is not None  # the same top-up, mined again
            assert token.balance(TREASURY) == 100_000_000 == int(done["base_units"])
            assert len(d.views.sweeps()[0]) == 1 and len(transfer_logs_from(anvil, token, bob.address)) == 1


async def test_a_reverted_sweep_that_succeeds_after_a_reorg_is_confirmed(tmp_path, anvil: Anvil, token: Token):
    """A token sweep's transfer reverts (the treasury was blocked in the same block, ahead of
    it) and the sweep fails; a reorg takes that block and the new chain holds neither, and the
    node forgets both. The sweep's transaction was followed by nothing: bob's nonce stayed
    unused and the tokens where they were, while a node that kept it would mine it where it
    now succeeds. The finality guard sends it again: it lands, the treasury is paid once, and
    the sweep says ``confirmed``."""
    with trio.fail_after(90):
        async with token_sweep_sent(tmp_path, anvil, token) as (d, sweep, bob):
            block = anvil.rpc("eth_sendTransaction", {
                "from": anvil.accounts[0], "to": token.address, "data": calldata("setBlocked(address,bool)", TREASURY,
                                                                                 True),
                "maxPriorityFeePerGas": hex(50 * 10**9), "maxFeePerGas": hex(100 * 10**9)})
            failed = await mine_until(anvil, lambda: (s := d.views.sweeps()[0]) and s[0]["status"] == "failed"
                                      and s[0], what="the sweep failed")
            assert "reverted" in failed["reason"] and token.balance(TREASURY) == 0
            txid = failed["txid"]
            n = int(anvil.receipt(txid)["blockNumber"], 16)
            anvil.reorg(anvil.head() - n + 1)  # empty blocks from the sweep's on
            for forgotten in (block, txid):
                anvil.rpc("anvil_dropTransaction", forgotten)
            assert anvil.receipt(txid) is None and anvil.receipt(block) is None
            d.watchers["devnet"].poke()
            done = await mine_until(anvil, lambda: (s := d.views.sweeps()[0]) and s[0]["status"] == "confirmed"
                                    and s[0], what="the sweep confirmed after the reorg")
            assert int(anvil.receipt(txid)["status"], 16) == 1 and done["txid"] == txid
            assert token.balance(TREASURY) == 100_000_000 == int(done["base_units"])
            assert len(d.views.sweeps()[0]) == 1 and len(transfer_logs_from(anvil, token, bob.address)) == 1
            assert [t for t, in d.store.db.query("SELECT type FROM events WHERE subject = ? ORDER BY seq",
                                                  (sweep["id"],))][-2:] == ["sweep.failed", "sweep.confirmed"]


async def test_a_sweep_that_reverted_leaves_its_address_to_the_next_run(tmp_path, anvil: Anvil, token: Token):
    """A token sweep's transfer reverted (the treasury blocked by the token for a while). The
    sweep failed and its address's candidate was gone (taken when the sweep was planned):
    nothing swept it again until a new deposit came, never for a one-time invoice address,
    while the same revert seen after the sweep was confirmed (a reorg) did plan it again.
    The next run now sweeps it."""
    def blocked(value: bool) -> str:
        return anvil.rpc("eth_sendTransaction", {
            "from": anvil.accounts[0], "to": token.address, "data": calldata("setBlocked(address,bool)", TREASURY,
                                                                             value),
            "maxPriorityFeePerGas": hex(50 * 10**9), "maxFeePerGas": hex(100 * 10**9)})

    with trio.fail_after(90):
        async with token_sweep_sent(tmp_path, anvil, token) as (d, sweep, _):
            blocked(True)  # in the same block, ahead of the transfer
            failed = await mine_until(anvil, lambda: (s := d.views.sweeps()[0]) and s[0]["status"] == "failed"
                                      and s[0], what="the sweep failed")
            assert "reverted" in failed["reason"] and token.balance(TREASURY) == 0
            blocked(False)
            anvil.mine(1)
            d.senders["devnet"].sweeper.request()
            done = await mine_until(anvil, lambda: next((x for x in d.views.sweeps()[0] if x["status"] == "confirmed"),
                                                        None), what="swept by the next run")
            assert done["id"] != sweep["id"] and token.balance(TREASURY) == 100_000_000 == int(done["base_units"])
            anvil.mine(3)  # the finality guard follows the reverted transaction: nothing to report of it
            await trio.sleep(0.5)
            kinds = [t for t, in d.store.db.query("SELECT type FROM events WHERE subject = ? ORDER BY seq",
                                                   (sweep["id"],))]
            assert kinds[-1] == "sweep.failed" and "sweep.remined" not in kinds, kinds


async def test_a_base_fee_creeping_up_does_not_top_up_a_token_sweeps_gas_again(tmp_path, anvil: Anvil, token: Token):
    """The gas sent was checked again at the fees of the moment once the top-up landed: a
    base fee up by a wei meant another top-up (each costing more than it moved), and after
    three the sweep failed and its address was never planned again (the tokens and the
    top-ups' ETH stranded). The gas already there is now used as long as it covers the next
    block's base fee with room, plus the tip; past three top-ups the sweep waits for fees
    to fall instead of failing. Here the base fee rises 10 % every block."""
    with trio.fail_after(90):
        async with token_deposited(tmp_path, anvil, token) as (d, http, _):
            fee = [10 * 10**9]

            def creep() -> None:  # the next block's base fee, 10 % above the last (seen by the wallet at once)
                fee[0] = fee[0] * 11 // 10
                anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(fee[0]))

            creep()
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
            deadline = trio.current_time() + 60
            while not ((s := d.views.sweeps()[0]) and s[0]["status"] in ("confirmed", "failed")):
                assert trio.current_time() < deadline, s
                anvil.mine(1)
                creep()
                await trio.sleep(0.3)
            sweep = s[0]
            topups = {t.conflict for t in d.store.chaintxs.for_ref(sweep["id"], "topup")}
            assert sweep["status"] == "confirmed" and len(topups) == 1, (sweep["status"], sweep["reason"], len(topups))
            assert token.balance(TREASURY) == 100_000_000


def sweep_status(db) -> str | None:
    with sqlite3.connect(db) as c:
        row = c.execute("SELECT status FROM sweeps").fetchone()
    return row[0] if row else None


@pytest.mark.slow
def test_killed_between_topup_and_token_transfer_finishes_the_sweep_once(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, funding_confirmations=3)
    db = tmp_path / "watcher.db"
    out = subprocess.run([sys.executable, "-m", "watcher", "address", "new", "-c", str(cfg), "--chain", "devnet",
                          "--label", "bob"], capture_output=True, text=True, check=True)
    bob = out.stdout.strip()
    proc = DaemonProcess(cfg).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        hot = httpx.get(f"http://127.0.0.1:{port}/v1/admin/status", headers=ADMIN).json()["hot_wallets"]["devnet"]
        anvil.wait_receipt(anvil.send(anvil.accounts[0], hot, 10**18))
        anvil.wait_receipt(token.mint(bob, 42_000_000))
        anvil.mine(3)
        deadline = time.monotonic() + 20
        while not httpx.get(f"http://127.0.0.1:{port}/v1/transfers", params={"status": "confirmed"},
                            headers={"authorization": f"Bearer {API_TOKEN}"}).json()["items"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.post(f"http://127.0.0.1:{port}/v1/sweeps/run", json={}, headers=ADMIN).status_code == 202
        deadline = time.monotonic() + 20
        # the sweep row turns `funding` when the signed top-up is stored, just before it is broadcast:
        # wait for the top-up to be mined (automine) so the kill lands between top-up and token transfer
        while sweep_status(db) != "funding" or anvil.balance(bob) == 0:
            assert time.monotonic() < deadline, sweep_status(db)
            time.sleep(0.01)
        proc.kill()  # the token transfer is not out yet: it waits for 3 confirmations of the top-up
        assert token.balance(TREASURY) == 0
        anvil.mine(3)
        proc = DaemonProcess(cfg).start()
        wait_http(f"http://127.0.0.1:{port}/healthz")
        deadline = time.monotonic() + 40
        while sweep_status(db) != "confirmed":
            assert time.monotonic() < deadline, sweep_status(db)
            anvil.mine(1)
            time.sleep(0.2)
    finally:
        proc.stop()
    assert token.balance(TREASURY) == 42_000_000
    assert len(transfer_logs_from(anvil, token, bob)) == 1  # one token transfer, not two
    with sqlite3.connect(db) as c:
        purposes = [r[0] for r in c.execute("SELECT purpose FROM chain_txs ORDER BY id")]
    assert purposes == ["topup", "sweep"]  # one top-up, one sweep: nothing repeated
    assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 1


def test_a_deposit_confirmed_while_a_run_plans_its_address_keeps_the_candidate(tmp_path):
    """A sweep run reads the candidates, then waits on the node (the wallet plans); a deposit
    that confirms at that address meanwhile is not in the plan, so storing the plan must not
    drop the address's candidate (found by the Litecoin soak: the deposit then waited for the
    address's next one). One confirmed before the read is covered, and the candidate goes."""
    from prometheus_client import CollectorRegistry

    from watcher.chains import SweepPlan
    from watcher.clock import Clock
    from watcher.core import Core

    class Fixed(Clock):
        t = 1_800_000_000.0

        def now(self) -> float:
            return self.t

    clock = Fixed()
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9", confirmations=2, chain_id=31337,
                                              sweep={"to": TREASURY, "min_amount": {"ETH": "0.01"}})])
    core = Core.open(cfg, registry=CollectorRegistry(), clock=clock)
    try:
        sweeps = core.store.sweeps
        alice, bob = (core.store.addresses.deposit_address("devnet", who)[0].address for who in ("alice", "bob"))
        for address in (alice, bob):
            sweeps.note_confirmed("devnet", address, "ETH")
        clock.t += 1
        read_at = clock.now_ms()  # the run reads the candidates...
        clock.t += 1
        sweeps.note_confirmed("devnet", alice, "ETH")  # ...alice's next deposit confirms meanwhile
        plan = SweepPlan(asset="ETH", addresses=(alice,), amount=10**17, deposits=())
        sweeps.plan("devnet", plan, TREASURY, read_at=read_at)
        sweeps.plan("devnet", SweepPlan(asset="ETH", addresses=(bob,), amount=10**17, deposits=()), TREASURY,
                    read_at=read_at)
        assert [c.address for c in sweeps.candidates("devnet", 10)] == [alice]
        sweeps.drop_candidate("devnet", alice, "ETH", read_at=read_at)
        assert [c.address for c in sweeps.candidates("devnet", 10)] == [alice]
        sweeps.drop_candidate("devnet", alice, "ETH", read_at=clock.now_ms() + 1)
        assert sweeps.candidates("devnet", 10) == []
    finally:
        core.close()


async def test_a_sweep_whose_deposit_a_reorg_took_away_fails_and_frees_its_address(tmp_path, anvil: Anvil,
                                                                                    token: Token):
    """A native sweep sent, not mined yet, when a reorg takes its deposit off the chain and the
    node forgets both (a real node may drop them). Sent again, the sweep is refused ("insufficient
    funds") each time: it stayed ``broadcast`` for ever, and its address, busy with it, was never
    swept again. Refused while every deposit it sweeps is orphaned, it fails (it moved nothing),
    and the address's next deposit is swept."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry(
        "devnet", anvil.url, tokens=[("USDT", token.address, 6)], confirmations=1, chain_id=31337, finality_depth=6,
        sweep={"to": TREASURY, "min_amount": {"ETH": "0.01"}, "interval": 0})],
        api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
    with trio.fail_after(120):
        async with alice_deposited(cfg, port, anvil) as (d, http, alice):
            (deposit,) = d.views.transfers()[0]
            anvil.automine(False)
            before = anvil.balance(TREASURY)
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
            sweep = await wait_until(lambda: (s := d.views.sweeps()[0]) and s[0]["status"] == "broadcast" and s[0],
                                     what="the sweep out")
            anvil.reorg(anvil.head() - deposit["block_number"] + 1)  # empty blocks from the deposit's on
            for txid in (deposit["txid"], sweep["txid"]):
                anvil.rpc("anvil_dropTransaction", txid)
            assert anvil.balance(alice.address) == 0
            failed = await mine_until(anvil, lambda: (s := d.views.sweeps()[0][0])["status"] == "failed" and s,
                                      what="the sweep failed")
            assert "insufficient funds" in failed["reason"].lower(), failed
            assert d.views.transfer(deposit["id"])["status"] == "orphaned"
            assert anvil.balance(TREASURY) == before
            # the address is free: its next deposit is swept
            anvil.automine(True)
            again = anvil.send(anvil.accounts[1], alice.address, 10**18)
            anvil.wait_receipt(again)
            await mine_until(anvil, lambda: any(t["txid"] == again and t["status"] == "confirmed"
                                                for t in d.views.transfers()[0]), what="the next deposit confirmed")
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
            done = await mine_until(anvil, lambda: next((s for s in d.views.sweeps()[0] if s["status"] == "confirmed"),
                                                        None), what="the next deposit swept")
            assert anvil.balance(TREASURY) - before == int(done["base_units"]) > 0
