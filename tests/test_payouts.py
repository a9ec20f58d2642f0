"""Payouts on anvil: idempotency, approval, limits, cancel, pause, insufficient funds,
reverts, stuck transactions replaced, and no second send after a crash."""

from __future__ import annotations

import contextlib
import json
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
from watcher.checks import Veto
from watcher.hookspecs import hookimpl
from watcher.money import format_amount
from watcher.plugins import make_plugin_manager

ADMIN_TOKEN = "admin-token-0123456789"
APP = {"authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
GWEI = 10**9


def config(tmp_path, anvil: Anvil, token: Token, port: int, *, payouts=None, confirmations=1, finality_depth=None,
           **extra):
    depth = {} if finality_depth is None else {"finality_depth": finality_depth}
    return write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                               confirmations=confirmations, chain_id=31337, **depth,
                                               payouts={"stuck_after": 2.0, **(payouts or {})})],
                        api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}, **extra})


def fund(anvil: Anvil, token: Token, address: str, eth: int = 10**18, usdt: int = 10**9) -> None:
    anvil.wait_receipt(anvil.send(anvil.accounts[0], address, eth))
    anvil.wait_receipt(token.mint(address, usdt))


def client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=APP, trust_env=False, timeout=10)


def payout_body(to: str, key: str, amount="5", asset="USDT", **kw):
    return {"chain": "devnet", "asset": asset, "amount": amount, "to": to, "idempotency_key": key, **kw}


async def until_status(d, pid: str, status: str, timeout: float = 20):
    return await wait_until(lambda: (p := d.views.payout(pid))["status"] == status and p, timeout=timeout,
                            what=f"payout {status}")


async def mined_until_completed(d, http: httpx.AsyncClient, anvil: Anvil, body: dict) -> dict:
    """Create the payout and mine a block at a time (automine off) until it completes."""
    pid = (await http.post("/v1/payouts", json=body)).json()["id"]
    return await wait_until(lambda: ((v := d.views.payout(pid))["status"] == "completed" and v) or anvil.mine(1),
                            interval=0.2, what="payout completed")


def sent_from(d, address: str) -> int:
    return d.store.db.scalar("SELECT COUNT(*) FROM chain_txs WHERE sender = ?", (address,))


async def test_payouts_complete_once_and_idempotency_keys_never_send_twice(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port)
    bob = anvil.accounts[5]
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            hot = d.store.hot_wallet("devnet")
            fund(anvil, token, hot)
            usdt0, eth0 = token.balance(bob), anvil.balance(bob)
            r1 = await http.post("/v1/payouts", json=payout_body(bob, "w-1", "12.5", label="bob"))
            r2 = await http.post("/v1/payouts", json=payout_body(bob, "w-1", "12.5", label="bob"))
            assert r1.status_code == r2.status_code == 202
            assert r1.json()["id"] == r2.json()["id"] and r2.headers["idempotent-replayed"] == "true"
            r3 = await http.post("/v1/payouts", json=payout_body(bob, "w-1", "13", label="bob"))
            assert r3.status_code == 409 and r3.json()["error"]["code"] == "idempotency_key_reused"
            native = (await http.post("/v1/payouts", json=payout_body(bob, "w-2", "0.25", asset="ETH"))).json()
            done = await until_status(d, r1.json()["id"], "completed")
            await until_status(d, native["id"], "completed")
            # and again after completion: still the same payout, nothing new sent
            r4 = await http.post("/v1/payouts", json=payout_body(bob, "w-1", "12.5", label="bob"))
            assert r4.json()["id"] == done["id"] and r4.json()["status"] == "completed"
            await trio.sleep(0.5)
            assert token.balance(bob) - usdt0 == 12_500_000
            assert anvil.balance(bob) - eth0 == 25 * 10**16
            assert sent_from(d, hot) == 2
            assert done["fee_paid"] and done["transactions"][0]["status"] == "mined"
            assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 2
            events = [e.type for e in d.store.events.list(subject=done["id"], limit=20)]
            assert events == ["payout.pending", "payout.broadcast", "payout.completed"]
            listed = (await http.get("/v1/payouts", params={"label": "bob"})).json()["items"]
            assert [p["id"] for p in listed] == [done["id"]]
            chains = (await http.get("/v1/chains")).json()["items"][0]
            assert chains["hot_wallet"]["address"].lower() == hot and chains["hot_wallet"]["balances"]["USDT"] == "987.5"


async def test_approval_above_threshold_needs_another_key(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, payouts={"approval_above": {"USDT": "100"}})
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            fund(anvil, token, d.store.hot_wallet("devnet"))
            small = (await http.post("/v1/payouts", json=payout_body(anvil.accounts[5], "s", "100"))).json()
            big = (await http.post("/v1/payouts", json=payout_body(anvil.accounts[5], "b", "100.000001"))).json()
            assert small["status"] == "pending" and big["status"] == "awaiting_approval"
            await until_status(d, small["id"], "completed")
            await trio.sleep(0.3)
            assert d.views.payout(big["id"])["status"] == "awaiting_approval"  # not sent on its own
            r = await http.post(f"/v1/payouts/{big['id']}/approve")  # four eyes: not the key that created it
            assert r.status_code == 403 and r.json()["error"]["code"] == "approval_by_creator"
            r = await http.post(f"/v1/payouts/{big['id']}/approve", headers=ADMIN)
            assert r.status_code == 200 and r.json()["approved_by"] == "admin"
            await until_status(d, big["id"], "completed")
            again = await http.post(f"/v1/payouts/{big['id']}/approve", headers=ADMIN)
            assert again.status_code == 409


async def test_checks_veto_with_reasons_and_write_nothing(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    denied = anvil.accounts[7]
    cfg = config(tmp_path, anvil, token, port, payouts={
        "max_amount": {"USDT": "50"}, "daily_limit": {"USDT": "100"}, "label_daily_limit": {"USDT": "30"},
        "label_rate": "2/h", "deny": [denied]})
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            fund(anvil, token, d.store.hot_wallet("devnet"))
            own, _ = d.store.addresses.deposit_address("devnet", "someone")
            to = anvil.accounts[5]

            async def veto(body, code, text):
                before = d.store.db.scalar("SELECT COUNT(*) FROM payouts")
                r = await http.post("/v1/payouts", json=body)
                assert r.status_code == 422, r.text
                assert r.json()["error"]["code"] == code and text in r.json()["error"]["message"], r.text
                assert d.store.db.scalar("SELECT COUNT(*) FROM payouts") == before

            await veto(payout_body(to, "a", "50.01"), "amount_above_maximum", "above the per-payout maximum 50 USDT")
            await veto(payout_body(denied, "b", "1"), "destination_denied", "deny-list")
            await veto(payout_body(own.address, "c", "1"), "destination_is_own", "deposit addresses")
            await veto(payout_body(d.store.hot_wallet("devnet"), "c2", "1"), "destination_is_own", "hot wallet")
            assert (await http.post("/v1/payouts", json=payout_body(to, "d", "20", label="carol"))).status_code == 202
            await veto(payout_body(to, "e", "20", label="carol"), "label_daily_limit_exceeded", "for label 'carol'")
            assert (await http.post("/v1/payouts", json=payout_body(to, "f", "5", label="carol"))).status_code == 202
            await veto(payout_body(to, "g", "1", label="carol"), "rate_limited", "already had 2 payout(s)")
            # payouts without a label share one bucket (leaving the label out used to skip the limit)
            await veto(payout_body(to, "h0", "31"), "label_daily_limit_exceeded", "for payouts without a label")
            for key, amount in (("h", "25"), ("h2", "5")):
                r = await http.post("/v1/payouts", json=payout_body(to, key, amount))
                assert r.status_code == 202, r.text
            assert (await http.post("/v1/payouts", json=payout_body(to, "i", "30", label="erin"))).status_code == 202
            await veto(payout_body(to, "i2", "20", label="frank"), "daily_limit_exceeded", "85 USDT paid out")
            # bad input is a 400 before any check
            r = await http.post("/v1/payouts", json=payout_body(to[:-1] + "x", "j", "1"))
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_address"
            r = await http.post("/v1/payouts", json=payout_body(to, "k k", "1"))
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"


async def test_operator_checks_get_the_arguments_they_name_and_a_crash_is_named(tmp_path, anvil: Anvil):
    """Payout checks are called one at a time through pluggy: each gets only the arguments it
    names, in pluggy's order (the built-in checks first, then the plugin registered last); the
    first veto stops the others, and a check that raises refuses the payout naming its plugin."""
    calls: list[str] = []

    class Counting:  # takes no arguments at all
        @hookimpl
        def watcher_payout_check(self):
            calls.append("counting")

    class Kyc:  # only the payout, async
        @hookimpl
        async def watcher_payout_check(self, payout):
            calls.append("kyc")
            await trio.sleep(0)
            return Veto(f"user {payout.label} has not passed KYC", "kyc_required") if payout.label == "mallory" else None

    class Sanctions:  # both, in another order than the spec
        @hookimpl
        def watcher_payout_check(self, daemon, payout):
            calls.append("sanctions")
            if payout.label == "crash":
                raise RuntimeError("sanctions list unreachable")

    pm = make_plugin_manager(extra=(Counting(), Kyc()))
    pm.register(Sanctions(), "sanctions")
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, payouts={"max_amount": {"ETH": "1"}})],
                       api_port=port)
    to = anvil.accounts[5]
    with trio.fail_after(30):
        async with running(cfg, api=True, pm=pm) as d, client(port) as http:
            def body(key, label, amount="0.5"):
                return payout_body(to, key, amount, asset="ETH", label=label)

            r = await http.post("/v1/payouts", json=body("a", "bob"))
            assert r.status_code == 202, r.text
            assert calls == ["sanctions", "kyc", "counting"]
            calls.clear()
            r = await http.post("/v1/payouts", json=body("b", "mallory"))
            assert r.status_code == 422 and r.json()["error"]["code"] == "kyc_required", r.text
            assert "mallory has not passed KYC" in r.json()["error"]["message"]
            assert calls == ["sanctions", "kyc"]  # the first veto stops the others
            calls.clear()
            r = await http.post("/v1/payouts", json=body("c", "crash"))
            assert r.status_code == 503 and r.json()["error"]["code"] == "payout_check_failed", r.text
            assert "'sanctions'" in r.json()["error"]["message"]
            assert calls == ["sanctions"]
            calls.clear()
            r = await http.post("/v1/payouts", json=body("d", "crash", amount="2"))  # a built-in vetoes first
            assert r.status_code == 422 and r.json()["error"]["code"] == "amount_above_maximum", r.text
            assert calls == []
            assert d.store.db.scalar("SELECT COUNT(*) FROM payouts") == 1


@contextlib.asynccontextmanager
async def funded(tmp_path, anvil: Anvil, token: Token, **config_kw):
    """The daemon with its API on the devnet (``config``), its hot wallet funded with 1 ETH and
    1,000 USDT: yields (daemon, app client, hot address)."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, **config_kw)
    async with running(cfg, api=True) as d, client(port) as http:
        hot = d.store.hot_wallet("devnet")
        fund(anvil, token, hot)
        yield d, http, hot


async def test_cancel_before_broadcast_and_pause_holds_payouts(tmp_path, anvil: Anvil, token: Token):
    with trio.fail_after(60):
        async with funded(tmp_path, anvil, token) as (d, http, hot):
            r = await http.post("/v1/admin/pause", json={"scope": "payouts"})
            assert r.status_code == 403
            r = await http.post("/v1/admin/pause", json={"scope": "payouts"}, headers=ADMIN)
            assert r.json()["paused"] == ["payouts"]
            held = (await http.post("/v1/payouts", json=payout_body(anvil.accounts[5], "h1", "1"))).json()
            dropped = (await http.post("/v1/payouts", json=payout_body(anvil.accounts[5], "h2", "2"))).json()
            anvil.mine(3)
            await trio.sleep(0.5)
            assert d.views.payout(held["id"])["status"] == "pending" and sent_from(d, hot) == 0
            r = await http.post(f"/v1/payouts/{dropped['id']}/cancel")
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            r = await http.post("/v1/admin/resume", json={"scope": "all"}, headers=ADMIN)
            assert r.json()["paused"] == []
            await until_status(d, held["id"], "completed")
            await trio.sleep(0.5)
            assert d.views.payout(dropped["id"])["status"] == "cancelled" and sent_from(d, hot) == 1
            r = await http.post(f"/v1/payouts/{held['id']}/cancel")
            assert r.status_code == 409 and r.json()["error"]["code"] == "not_cancellable"
            actions = [a["action"] for a in d.views.audit()]
            assert "admin.pause" in actions and "admin.resume" in actions and "payout.cancel" in actions


@pytest.mark.parametrize("change", ["cancelled", "paused"])
async def test_a_payout_cancelled_or_paused_while_the_wallet_signs_it_is_never_sent(tmp_path, anvil: Anvil,
                                                                                    token: Token, change):
    """The wallet takes node calls (fees, gas, balances) to sign a payout. A cancel (answered
    200 "cancelled") or a pause of payouts in that time used to be overwritten: the sender
    stored the signed transaction as ``broadcast`` and sent it. Now what was signed is dropped
    (the nonce is not used), and a paused payout goes once payouts resume."""
    from tests.support.faultproxy import fault_proxy

    port = free_port()
    with trio.fail_after(60):
        async with fault_proxy(anvil.url) as proxy:
            cfg = write_config(tmp_path, [chain_entry("devnet", proxy.url, tokens=[("USDT", token.address, 6)],
                                                      confirmations=1, chain_id=31337)],
                               api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
            async with running(cfg, api=True) as d, client(port) as http:
                hot = d.store.hot_wallet("devnet")
                fund(anvil, token, hot)
                proxy.latency = (1.5, 1.5)
                proxy.inject("latency", method="eth_estimateGas")  # the wallet is signing for 1.5 s
                pid = (await http.post("/v1/payouts", json=payout_body(anvil.accounts[5], "p1", "1"))).json()["id"]
                await wait_until(lambda: proxy.injected["latency"] == 1, what="the wallet asking for gas")
                if change == "cancelled":
                    r = await http.post(f"/v1/payouts/{pid}/cancel")
                    assert r.status_code == 200 and r.json()["status"] == "cancelled"
                else:
                    r = await http.post("/v1/admin/pause", json={"scope": "payouts"}, headers=ADMIN)
                    assert r.json()["paused"] == ["payouts"]
                await trio.sleep(2.5)  # the held call answered; the sender's round has ended
                anvil.mine(2)
                await trio.sleep(0.5)
                assert d.views.payout(pid)["status"] == ("cancelled" if change == "cancelled" else "pending")
                assert sent_from(d, hot) == 0 and anvil.rpc("eth_getTransactionCount", hot, "latest") == "0x0"
                assert "payout.broadcast" not in [t for t, _ in payout_events(d, pid)]
                if change == "paused":
                    await http.post("/v1/admin/resume", json={"scope": "all"}, headers=ADMIN)
                    await until_status(d, pid, "completed")
                    assert sent_from(d, hot) == 1  # the same nonce the dropped signature had


async def test_a_transaction_sent_from_the_hot_key_outside_watcher_does_not_stop_payouts(tmp_path, anvil: Anvil,
                                                                                        token: Token):
    """An operator moves funds from the hot wallet by hand (a wallet app with the same seed)
    while the daemon runs. Its nonce was the one watcher would sign next: every payout was
    then refused "nonce too low", failed, and gave the nonce back for the next one to fail
    the same way, until a restart. The node's nonce is now taken when it is ahead."""
    with trio.fail_after(60):
        async with funded(tmp_path, anvil, token) as (d, http, hot):
            first = await mined_until_completed(d, http, anvil, payout_body(anvil.accounts[5], "before", "1"))
            assert first["nonce"] == 0
            anvil.rpc("anvil_impersonateAccount", hot)  # the operator's wallet app, with the hot key
            anvil.wait_receipt(anvil.rpc("eth_sendTransaction", {"from": hot, "to": anvil.accounts[6], "value": "0x1"}))
            anvil.rpc("anvil_stopImpersonatingAccount", hot)
            ids = [(await http.post("/v1/payouts", json=payout_body(anvil.accounts[5], f"after{i}", "1"))).json()["id"]
                   for i in range(3)]
            done = [await until_status(d, pid, "completed") for pid in ids]
            assert sorted(p["nonce"] for p in done) == [2, 3, 4]  # nonce 1 was the operator's


async def test_insufficient_hot_wallet_balance_waits_then_goes(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port)
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            hot = d.store.hot_wallet("devnet")
            p = (await http.post("/v1/payouts", json=payout_body(anvil.accounts[5], "x", "10"))).json()
            v = await wait_until(lambda: (v := d.views.payout(p["id"]))["reason"] and v, what="a reason")
            assert v["status"] == "pending" and v["reason"].startswith("insufficient hot wallet balance")
            assert "USDT needed" in v["reason"] and "ETH needed" in v["reason"]
            blocked = d.metrics.registry.get_sample_value("watcher_payouts_blocked", {"chain": "devnet"})
            assert blocked == 1
            fund(anvil, token, hot)
            await until_status(d, p["id"], "completed")
            assert token.balance(anvil.accounts[5]) >= 10 * 10**6


async def reverted_payout(d, http: httpx.AsyncClient, anvil: Anvil, token: Token, victim: str,
                          key: str) -> tuple[dict, dict, str]:
    """Fund the hot wallet, turn automine off, pay ``victim`` 3 USDT, and have the token's
    owner block the recipient in the same block, ahead of the payout: it reverts. Returns the
    failed payout, its transaction and the blocking transaction's hash."""
    fund(anvil, token, d.store.hot_wallet("devnet"))
    anvil.automine(False)
    p = (await http.post("/v1/payouts", json=payout_body(victim, key, "3"))).json()
    first = (await until_status(d, p["id"], "broadcast"))["transactions"][0]
    block = anvil.rpc("eth_sendTransaction", {
        "from": anvil.accounts[0], "to": token.address, "data": calldata("setBlocked(address,bool)", victim, True),
        "maxPriorityFeePerGas": hex(50 * GWEI), "maxFeePerGas": hex(100 * GWEI)})
    anvil.mine(1)
    return await until_status(d, p["id"], "failed"), first, block


async def test_reverted_payout_fails_with_the_reason(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port)
    victim = anvil.accounts[6]
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            v, _, _ = await reverted_payout(d, http, anvil, token, victim, "r")
            assert "recipient blocked" in v["reason"], v["reason"]
            assert token.balance(victim) == 0


async def test_a_reverted_payout_that_succeeds_after_a_reorg_completes(tmp_path, anvil: Anvil, token: Token):
    """The payout reverted (the recipient was blocked in the same block, ahead of it) and
    failed; a reorg then takes that block, and the new chain holds neither. Its transaction
    was followed by nothing: the hot wallet's nonce stayed unused (every later payout stuck
    behind it), and a node that puts it back in its pool (geth does) would mine it where it
    now succeeds, paying while the payout says failed (an app retrying pays twice). The
    finality guard follows it like a completed payout's: sent again, it pays, and the payout
    says ``completed``."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, finality_depth=6, payouts={"stuck_after": 600})
    victim = anvil.accounts[6]
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            failed, first, block = await reverted_payout(d, http, anvil, token, victim, "r-again")
            n = failed["block_number"]
            assert "recipient blocked" in failed["reason"] and token.balance(victim) == 0
            anvil.mine(1)
            anvil.reorg(anvil.head() - n + 1)  # empty blocks in place of the payout's and the next
            for txid in (block, first["txid"]):  # and the node forgets both (anvil puts them back in its pool)
                anvil.rpc("anvil_dropTransaction", txid)
            assert anvil.receipt(first["txid"]) is None and anvil.receipt(block) is None
            d.watchers["devnet"].poke()
            d.senders["devnet"].wake()
            v = await wait_until(lambda: ((v := d.views.payout(failed["id"]))["status"] == "completed" and v)
                                 or (anvil.mine(1) and None), interval=0.3, timeout=30, what="the payout completed")
            landed = anvil.receipt(first["txid"])
            assert int(landed["status"], 16) == 1 and v["block_number"] == int(landed["blockNumber"], 16) > n
            assert v["txid"] == first["txid"] and token.balance(victim) == 3_000_000  # paid once, same bytes
            assert [t for t, _ in payout_events(d, failed["id"])] == ["payout.pending", "payout.broadcast",
                                                                   "payout.failed", "payout.completed"]
            assert int(anvil.rpc("eth_getTransactionCount", d.store.hot_wallet("devnet"), "latest"), 16) == 1
            redone = d.metrics.registry.get_sample_value("watcher_errors_total", {"kind": "settled_tx_redone"})
            assert redone == 1


async def stuck_payout(d, http: httpx.AsyncClient, anvil: Anvil, token: Token, body: dict) -> tuple[dict, dict]:
    """Fund the hot wallet, turn automine off, ask for the payout, then make fees jump far
    above what its transaction offered for three blocks: it cannot get into one. Returns the
    payout and its first transaction."""
    fund(anvil, token, d.store.hot_wallet("devnet"))
    anvil.automine(False)
    p = (await http.post("/v1/payouts", json=body)).json()
    first = (await until_status(d, p["id"], "broadcast"))["transactions"][0]
    for _ in range(3):
        anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(500 * GWEI))
        anvil.mine(1)
        await trio.sleep(0.5)
    return p, first


async def test_stuck_payout_is_replaced_and_completes_once(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, payouts={"stuck_after": 1.0, "fee_bump": "0.2"})
    bob = anvil.accounts[5]
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            hot = d.store.hot_wallet("devnet")
            before = anvil.balance(bob)
            p, first = await stuck_payout(d, http, anvil, token, payout_body(bob, "stuck", "0.5", asset="ETH"))
            assert anvil.receipt(first["txid"]) is None
            v = await wait_until(lambda: len((v := d.views.payout(p["id"]))["transactions"]) >= 2 and v,
                                 what="a replacement")
            second = v["transactions"][-1]
            assert second["nonce"] == first["nonce"] and int(second["max_fee_per_gas"]) > 500 * GWEI
            anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(500 * GWEI))
            anvil.mine(2)
            # under load the replacement may reach the node after those blocks: keep mining
            for _ in range(80):
                if d.views.payout(p["id"])["status"] == "completed":
                    break
                anvil.mine(1)
                await trio.sleep(0.5)
            v = await until_status(d, p["id"], "completed")
            mined = [t for t in v["transactions"] if t["status"] == "mined"]
            assert len(mined) == 1 and v["txid"] == mined[0]["txid"]
            assert {t["status"] for t in v["transactions"]} <= {"mined", "replaced"}
            assert anvil.balance(bob) - before == 5 * 10**17  # paid exactly once
            assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 1


@pytest.mark.parametrize("landing", ["sent-again", "in-the-new-blocks"])
async def test_completed_payout_taken_off_the_chain_by_a_deep_reorg(tmp_path, anvil: Anvil, token: Token, landing):
    """confirmations = 1, finality 6: a reorg after the payout completed in block n replaces
    every block from n on. ``sent-again``: the new blocks are empty; the same signed bytes go
    out again and land once, nothing is signed anew. ``in-the-new-blocks``: the new chain holds
    the same transaction two blocks later (anvil_reorg puts its bytes there). Either way the
    payout's ``block_number`` and ``fee_paid`` follow it and ``payout.remined`` says so; it
    stays completed, paid once."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, finality_depth=6, payouts={"stuck_after": 600})
    carol = anvil.accounts[7]
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            hot = d.store.hot_wallet("devnet")
            fund(anvil, token, hot)
            anvil.automine(False)
            before = token.balance(carol)
            done = await mined_until_completed(d, http, anvil, payout_body(carol, "deep", "7"))
            assert token.balance(carol) - before == 7_000_000
            n, raw = done["block_number"], anvil.raw_tx(done["txid"])
            assert n == int(anvil.receipt(done["txid"])["blockNumber"], 16)
            anvil.mine(2)  # the reorg below goes deeper than the payout's block
            if landing == "sent-again":
                anvil.reorg(anvil.head() - n + 1)
                assert anvil.receipt(done["txid"]) is None and token.balance(carol) == before
            else:
                anvil.reorg(anvil.head() - n + 1, [(raw, 2)])
                assert int(anvil.receipt(done["txid"])["blockNumber"], 16) == n + 2
            d.watchers["devnet"].poke()
            d.senders["devnet"].wake()
            await wait_until(lambda: anvil.receipt(done["txid"]) is not None or anvil.mine(1), timeout=30,
                             what="the same transaction mined again")
            landed = anvil.receipt(done["txid"])
            at = int(landed["blockNumber"], 16)
            assert at > n and token.balance(carol) - before == 7_000_000  # paid again, exactly once
            v = await wait_until(lambda: ((v := d.views.payout(done["id"]))["block_number"] == at and v)
                                 or (anvil.mine(1) and None), interval=0.3, what="the payout's new block")
            assert v["status"] == "completed" and [t["txid"] for t in v["transactions"]] == [done["txid"]]
            assert v["fee_paid"] == format_amount(int(landed["gasUsed"], 16) * int(landed["effectiveGasPrice"], 16), 18)
            events = payout_events(d, done["id"])
            assert [t for t, _ in events] == ["payout.pending", "payout.broadcast", "payout.completed",
                                              "payout.remined"]
            assert events[2][1]["block_number"] == n and events[3][1]["block_number"] == at
            assert token.balance(carol) - before == 7_000_000
            assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 1
            if landing == "sent-again":
                errors = d.metrics.registry.get_sample_value("watcher_errors_total", {"kind": "settled_tx_reorged"})
                assert errors == 1


async def test_a_replaced_payout_whose_original_lands_after_a_reorg_stays_completed(tmp_path, anvil: Anvil,
                                                                                   token: Token):
    """A stuck payout A is replaced by B (same nonce, higher fee) and B completes; a reorg then
    takes B's block and the new chain holds A instead. Only B's row was opened again (A stayed
    ``replaced``), so B was sent again, refused "nonce too low", and the payout failed while
    A had paid the recipient: an app retrying it would pay twice."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, finality_depth=6, payouts={"stuck_after": 1.0, "fee_bump": "0.2"})
    bob = anvil.accounts[5]
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, client(port) as http:
            hot = d.store.hot_wallet("devnet")
            before = anvil.balance(bob)
            p, first = await stuck_payout(d, http, anvil, token, payout_body(bob, "swap", "0.5", asset="ETH"))
            raw_a = d.store.chaintxs.get(first["txid"]).raw
            await wait_until(lambda: len(d.views.payout(p["id"])["transactions"]) >= 2, what="a replacement")
            def b_completed() -> dict | None:  # blocks still too dear for A
                if (v := d.views.payout(p["id"]))["status"] == "completed":
                    return v
                anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(500 * GWEI))
                anvil.mine(1)
                return None

            done = await wait_until(b_completed, interval=0.5, what="B completed")
            assert done["txid"] != first["txid"]
            n = done["block_number"]
            anvil.rpc("anvil_setNextBlockBaseFeePerGas", hex(GWEI))  # A fits in the new chain
            anvil.reorg(anvil.head() - n + 1, [(raw_a, 0)])
            assert anvil.receipt(first["txid"]) is not None and anvil.receipt(done["txid"]) is None
            d.watchers["devnet"].poke()
            d.senders["devnet"].wake()
            v = await wait_until(lambda: ((v := d.views.payout(p["id"]))["txid"] == first["txid"] and v)
                                 or (anvil.mine(1) and None), interval=0.3, timeout=30, what="the payout on A")
            assert v["status"] == "completed" and v["block_number"] == int(anvil.receipt(first["txid"])["blockNumber"], 16)
            assert "payout.failed" not in [t for t, _ in payout_events(d, p["id"])]
            assert anvil.balance(bob) - before == 5 * 10**17  # paid once
            assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 1


def payout_events(d, pid: str) -> list[tuple[str, dict]]:
    return [(r["type"], json.loads(r["data"])) for r in d.store.db.query(
        "SELECT type, data FROM events WHERE subject = ? ORDER BY seq", (pid,))]


async def test_a_completed_payout_that_reverts_when_mined_again_fails(tmp_path, anvil: Anvil, token: Token):
    """The hot wallet's tokens came in a block a reorg also takes away; the new chain holds the
    payout's transaction but not that deposit, so it reverts there ("balance"): the recipient
    got nothing. The completed payout becomes ``failed`` with why, in which block and the fee
    it cost, instead of claiming money moved."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, finality_depth=8, payouts={"stuck_after": 600})
    carol = anvil.accounts[7]
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            hot = d.store.hot_wallet("devnet")
            anvil.wait_receipt(anvil.send(anvil.accounts[0], hot, 10**18))  # gas, in a block the reorg keeps
            anvil.automine(False)
            mint = token.mint(hot, 10**9)
            anvil.mine(1)
            funded_in = int(anvil.receipt(mint)["blockNumber"], 16)
            before = token.balance(carol)
            done = await mined_until_completed(d, http, anvil, payout_body(carol, "reverts", "4"))
            raw = anvil.raw_tx(done["txid"])
            anvil.reorg(anvil.head() - funded_in + 1, [(raw, 0)])  # the deposit is gone, the payout is not
            landed = anvil.receipt(done["txid"])
            assert int(landed["status"], 16) == 0 and int(landed["blockNumber"], 16) == funded_in
            assert token.balance(carol) == before and token.balance(hot) == 0
            d.watchers["devnet"].poke()
            d.senders["devnet"].wake()
            v = await wait_until(lambda: ((v := d.views.payout(done["id"]))["status"] == "failed" and v)
                                 or (anvil.mine(1) and None), interval=0.3, what="payout failed")
            assert "reverted when mined again" in v["reason"] and "balance" in v["reason"]
            assert v["txid"] == done["txid"] and v["block_number"] == funded_in
            fee = int(landed["gasUsed"], 16) * int(landed["effectiveGasPrice"], 16)
            assert v["fee_paid"] == format_amount(fee, 18)
            assert [t for t, _ in payout_events(d, done["id"])] == ["payout.pending", "payout.broadcast",
                                                                 "payout.completed", "payout.failed"]
            assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 1  # nothing sent again


@pytest.mark.parametrize("pruned", [False, True], ids=["block-held", "block-pruned"])
async def test_a_status_read_before_a_reorg_does_not_settle_a_payout_in_a_dead_block(tmp_path, anvil: Anvil,
                                                                                     token: Token, pruned):
    """The soak's stuck hot wallet: the sender read "mined in block N" just before a reorg
    dropped block N, and settled the transaction after the scan had followed the reorg. The
    finality guard then saw a block long passed and never looked again: the nonce was never
    sent again and every later payout stalled. A status naming a block our scan does not hold
    is pending now; the fresh one (the node no longer knows it) sends the same bytes again.
    ``block-pruned``: the scan has gone on past the finality window and no longer keeps the
    hash of height N, so the block cannot tell the status is outdated (a soak settled nonces
    9-14 so, a second after it read them): a status read before the scan's rollback is read
    again."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, finality_depth=6, payouts={"stuck_after": 600})
    carol = anvil.accounts[7]
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            hot = d.store.hot_wallet("devnet")
            fund(anvil, token, hot)
            anvil.automine(False)
            before = token.balance(carol)
            p = (await http.post("/v1/payouts", json=payout_body(carol, "stale", "3"))).json()
            sent = await wait_until(lambda: ((v := d.views.payout(p["id"]))["transactions"] and
                                             anvil.rpc("eth_getTransactionByHash", v["transactions"][0]["txid"])
                                             and v), what="the payout with the node")
            txid = sent["transactions"][0]["txid"]
            tracker = d.senders["devnet"].tracker
            group = [t for t in d.store.chaintxs.for_ref(p["id"], "payout") if t.txid == txid]
            anvil.mine(1)
            mined_in = anvil.receipt(txid)
            n, old_hash = int(mined_in["blockNumber"], 16), mined_in["blockHash"]
            d.watchers["devnet"].poke()  # a status is read once the scan holds its block (else: pending)
            await wait_until(lambda: d.store.chains.holds_block("devnet", n, old_hash), what="the scan at block n")
            stale = await tracker.statuses(group)
            assert (stale[txid].state, stale[txid].block_number, stale[txid].block_hash) == ("mined", n, old_hash)
            anvil.mine(1)
            anvil.reorg(2)  # blocks n and n + 1 replaced by empty ones: the payout is off the chain
            assert anvil.receipt(txid) is None
            new_hash = anvil.rpc("eth_getBlockByNumber", hex(n), False)["hash"]
            d.watchers["devnet"].poke()
            await wait_until(lambda: d.store.chains.holds_block("devnet", n, new_hash), what="the scan on the new fork")
            if pruned:  # the scan goes on until height n's hash is no longer kept
                anvil.mine(8)
                d.watchers["devnet"].poke()
                await wait_until(lambda: n not in d.store.chains.recent_blocks("devnet")
                                 and d.store.chains.scanned_number("devnet") > n + 7, what="height n pruned")
                assert d.store.chains.holds_block("devnet", n, old_hash)  # the block cannot tell any more
            t = await tracker.follow(group, stale, head=anvil.head(), what="test", replace=None)
            receipt = anvil.receipt(txid)
            if t.state == "mined":  # sent again by the sender meanwhile and mined: in its new block
                assert t.status is not None and receipt is not None
                assert (t.status.block_number, t.status.block_hash) == (int(receipt["blockNumber"], 16),
                                                                        receipt["blockHash"])
            else:  # not "mined in block n": our chain has another block n
                assert t.state == "pending"
                assert d.store.chaintxs.get(txid).block_number != n or d.store.chaintxs.get(txid).status == "open"
            d.senders["devnet"].wake()
            await wait_until(lambda: anvil.receipt(txid) is not None or anvil.mine(1), timeout=30,
                             what="the same transaction mined again")
            done = await until_status(d, p["id"], "completed")
            assert token.balance(carol) - before == 3_000_000  # paid once
            assert done["txid"] == txid and int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 1
            # settled in the block that holds it now (the payout may have completed in block n
            # before the reorg: the finality guard then follows the same transaction back)
            landed = anvil.receipt(txid)
            await wait_until(lambda: (m := d.store.chaintxs.get(txid)) is not None and m.status == "mined"
                             and m.block_number == int(landed["blockNumber"], 16), what="settled where it landed")
            assert d.store.chains.holds_block("devnet", int(landed["blockNumber"], 16), landed["blockHash"])


async def test_a_receipt_the_senders_nonce_contradicts_is_not_mined(tmp_path, anvil: Anvil, token: Token):
    """A node that answers a receipt for a transaction its state does not hold (the soak's
    anvil after two quick reorgs: nonces 9-12 "mined" while nonce 8 was not): the sender's
    mined nonce count decides. Here the count is set back under the mined payout's nonce with
    anvil_setNonce: its receipt still says mined, the wallet says pending."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, payouts={"stuck_after": 600})
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            hot = d.store.hot_wallet("devnet")
            fund(anvil, token, hot)
            p = (await http.post("/v1/payouts", json=payout_body(anvil.accounts[7], "nonce", "2"))).json()
            done = await until_status(d, p["id"], "completed")
            group = [t for t in d.store.chaintxs.for_ref(p["id"], "payout") if t.txid == done["txid"]]
            wallet = d.senders["devnet"].wallet
            assert (await wallet.statuses(group))[done["txid"]].state == "mined"
            anvil.rpc("anvil_setNonce", hot, hex(int(group[0].details["nonce"])))
            assert anvil.receipt(done["txid"]) is not None  # the node still answers the receipt
            assert (await wallet.statuses(group))[done["txid"]].state == "pending"


async def test_watch_only_refuses_payouts_and_sweeps(tmp_path, anvil: Anvil, token: Token):
    from tests.support.daemon import TEST_MNEMONIC
    from watcher.keys import Keyring

    port = free_port()
    cfg = config(tmp_path, anvil, token, port)
    xpub = Keyring.from_mnemonic(TEST_MNEMONIC).account_xpub("m/44'/60'/0'")
    text = cfg.read_text().replace('mnemonic_file = "seed.txt"', f'xpub = "{xpub}"')
    cfg.write_text(text)
    with trio.fail_after(30):
        async with running(cfg, api=True), client(port) as http:
            r = await http.post("/v1/payouts", json=payout_body(anvil.accounts[5], "w", "1"))
            assert r.status_code == 409 and r.json()["error"]["code"] == "watch_only"
            r = await http.post("/v1/sweeps/run", json={}, headers=ADMIN)
            assert r.status_code == 409


@pytest.mark.slow
def test_killed_right_after_broadcast_does_not_send_again(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, payouts={"stuck_after": 3600})
    db = tmp_path / "watcher.db"
    proc = DaemonProcess(cfg).start()
    bob = anvil.accounts[5]
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        hot = httpx.get(f"http://127.0.0.1:{port}/v1/admin/status", headers=ADMIN).json()["hot_wallets"]["devnet"]
        anvil.wait_receipt(anvil.send(anvil.accounts[0], hot, 10**18))
        anvil.automine(False)
        before = anvil.balance(bob)
        pid = httpx.post(f"http://127.0.0.1:{port}/v1/payouts", headers=APP,
                         json=payout_body(bob, "once", "0.3", asset="ETH")).json()["id"]
        deadline = time.monotonic() + 20
        while True:
            with sqlite3.connect(db) as c:
                row = c.execute("SELECT status FROM payouts WHERE id = ?", (pid,)).fetchone()
            if row and row[0] == "broadcast":
                break
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.kill()  # the instant it is stored as broadcast: sent or not, we cannot know
        # the node forgets its mempool too, so on restart only our stored bytes exist
        anvil.rpc("anvil_dropAllTransactions")
        proc = DaemonProcess(cfg).start()
        wait_http(f"http://127.0.0.1:{port}/healthz")
        deadline = time.monotonic() + 30
        while True:
            anvil.mine(1)
            status = httpx.get(f"http://127.0.0.1:{port}/v1/payouts/{pid}", headers=APP).json()
            if status["status"] == "completed":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        anvil.mine(3)
        time.sleep(1)
        assert anvil.balance(bob) - before == 3 * 10**17
        assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 1
        assert len(status["transactions"]) == 1
    finally:
        proc.stop()


async def test_refused_payout_after_a_later_nonce_is_filled_so_later_payouts_go(tmp_path, anvil: Anvil, token: Token):
    """Payout A is signed at nonce 0 and the node turns it away for now; B is signed at nonce
    1 and waits behind it; then the node refuses A's bytes for good. Without a filler, nonce 0
    would stay a gap and B (and every later payout) would wait forever."""
    from tests.support.faultproxy import fault_proxy

    port = free_port()
    with trio.fail_after(90):
        async with fault_proxy(anvil.url) as proxy:
            cfg = write_config(tmp_path, [chain_entry("devnet", proxy.url, tokens=[("USDT", token.address, 6)],
                                                      confirmations=1, chain_id=31337,
                                                      payouts={"stuck_after": 3600})],
                               api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
            async with running(cfg, api=True) as d, client(port) as http:
                hot = d.store.hot_wallet("devnet")
                fund(anvil, token, hot)
                alice, bob = anvil.accounts[6], anvil.accounts[7]
                before = anvil.balance(alice), anvil.balance(bob)
                assert (await http.post("/v1/admin/pause", json={"scope": "payouts"}, headers=ADMIN)).status_code == 200
                a = (await http.post("/v1/payouts", json=payout_body(alice, "gap-a", "0.1", asset="ETH"))).json()
                b = (await http.post("/v1/payouts", json=payout_body(bob, "gap-b", "0.2", asset="ETH"))).json()
                # A's first broadcast is turned away for now (a transient refusal), B's goes through
                proxy.inject("rpc_error", method="eth_sendRawTransaction", error=(-32602, "busy, try again later"))
                assert (await http.post("/v1/admin/resume", json={"scope": "payouts"}, headers=ADMIN)).status_code == 200
                await until_status(d, b["id"], "broadcast")  # stored; then sent:
                await wait_until(lambda: proxy.methods["eth_sendRawTransaction"] >= 2, what="B sent")
                assert d.views.payout(a["id"])["status"] == "broadcast" and proxy.injected["rpc_error"] == 1
                assert [d.views.payout(p["id"])["nonce"] for p in (a, b)] == [0, 1]
                # the next time A's bytes are sent, the node refuses them for good
                raw_a = d.store.chaintxs.for_ref(a["id"], "payout")[0].raw
                proxy.inject("rpc_error", method="eth_sendRawTransaction", holding=raw_a[2:],
                             error=(-32602, "transaction rejected"))
                d.senders["devnet"].wake()
                done_a = await until_status(d, a["id"], "failed", timeout=30)
                done_b = await until_status(d, b["id"], "completed", timeout=30)
                assert "transaction rejected" in done_a["reason"]
                assert anvil.balance(alice) == before[0] and anvil.balance(bob) - before[1] == 2 * 10**17
                assert int(anvil.rpc("eth_getTransactionCount", hot, "latest"), 16) == 2
                fillers = d.store.chaintxs.fillers("devnet")
                assert [(f.ref_id, f.details["nonce"], f.amount, f.to) for f in fillers] == [(a["id"], 0, 0, hot)]
                await wait_until(lambda: d.store.chaintxs.fillers("devnet")[0].status == "mined", what="filler mined")
                events = d.store.events.list(types=("wallet.gap_filled",), limit=10)
                assert len(events) == 1 and events[0].data["for"] == a["id"] and events[0].data["nonce"] == 0
                assert events[0].data["txid"] == fillers[0].txid and "rejected" in events[0].data["reason"]
                assert done_b["nonce"] == 1
                status = await trio.to_thread.run_sync(lambda: subprocess.run(
                    [sys.executable, "-m", "watcher", "status", "-c", str(cfg)], capture_output=True, text=True,
                    timeout=60))
                assert f"gap filled for {a['id']}" in status.stdout and "(nonce 0," in status.stdout, status.stdout


async def test_the_finality_guard_asks_the_status_of_all_its_transactions_in_one_request(tmp_path, anvil: Anvil,
                                                                                       token: Token):
    """Completed payouts' transactions are followed until they are final: every round asks
    the node about all of them in one JSON-RPC batch, not one request per transaction."""
    from tests.support.faultproxy import fault_proxy

    port = free_port()
    with trio.fail_after(60):
        async with fault_proxy(anvil.url) as proxy:
            cfg = write_config(tmp_path, [chain_entry("devnet", proxy.url, tokens=[("USDT", token.address, 6)],
                                                      confirmations=1, finality_depth=50, chain_id=31337)],
                               api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
            async with running(cfg, api=True) as d, client(port) as http:
                fund(anvil, token, d.store.hot_wallet("devnet"))
                ids = [(await http.post("/v1/payouts", json=payout_body(anvil.accounts[6 + i], f"g{i}", "1")))
                       .json()["id"] for i in range(3)]
                for pid in ids:
                    await until_status(d, pid, "completed")
                proxy.recent.clear()
                for _ in range(3):  # rounds: each new block wakes the sender
                    anvil.mine(1)
                    await wait_until(lambda: sum("eth_getTransactionReceipt" in r for r in proxy.recent) >= 1,
                                     what="a guard round")
                    seen = [r for r in proxy.recent if "eth_getTransactionReceipt" in r]
                    assert all(r.count("eth_getTransactionReceipt") == 3 for r in seen), seen
                    proxy.recent.clear()


async def test_refunds_pay_back_the_excess_to_the_wei_and_the_invoice_says_so(tmp_path, anvil: Anvil, token: Token):
    """An overpaid invoice refunds just the excess (amount omitted), to the exact base unit;
    the invoice shows refunded_amount, partially_refunded and its refunds, with
    invoice.refund_requested then invoice.refunded; more than was received is refused; a
    cancelled refund leaves the invoice as it was; a full refund moves it to refunded."""
    port = free_port()
    cfg = config(tmp_path, anvil, token, port, payouts={"approval_above": {"ETH": "5"}})
    carol = anvil.accounts[6]
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, client(port) as http:
            fund(anvil, token, d.store.hot_wallet("devnet"), eth=20 * 10**18)
            inv = (await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "1"})).json()
            paid = 10**18 + 300_000_000_000_000_123  # 1.300000000000000123 ETH
            anvil.send(anvil.accounts[1], inv["address"], paid)
            anvil.mine(2)
            await wait_until(lambda: d.views.invoice(inv["id"])["status"] == "completed", what="completed")
            assert d.views.invoice(inv["id"])["overpaid"]
            before = anvil.balance(carol)
            r = await http.post(f"/v1/invoices/{inv['id']}/refund", json={"to": carol, "idempotency_key": "rf-1"})
            assert r.status_code == 202, r.text
            refund = r.json()
            assert refund["base_units"] == str(paid - 10**18) and refund["invoice_id"] == inv["id"]
            await until_status(d, refund["id"], "completed")
            assert anvil.balance(carol) - before == paid - 10**18  # the excess, to the wei
            await wait_until(lambda: d.views.invoice(inv["id"])["refunded_amount"] != "0", what="refund recorded")
            view = d.views.invoice(inv["id"])
            assert view["refunded_amount"] == "0.300000000000000123" and view["partially_refunded"]
            assert view["status"] == "completed" and [x["payout_id"] for x in view["refunds"]] == [refund["id"]]
            types = [e.type for e in d.store.events.list(after_seq=0, types=("invoice.refund_requested",
                                                                              "invoice.refunded"), limit=50)]
            assert types == ["invoice.refund_requested", "invoice.refunded"]
            # "refund the excess" again, with another key: the excess was refunded, nothing is left
            # of it (before: a second 0.3 ETH went out, the shop kept 0.7 of a 1 ETH sale)
            count = d.store.db.scalar("SELECT COUNT(*) FROM payouts")
            r = await http.post(f"/v1/invoices/{inv['id']}/refund", json={"to": carol, "idempotency_key": "rf-1b"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_refund", r.text
            # more than is left is refused, nothing written
            r = await http.post(f"/v1/invoices/{inv['id']}/refund",
                                json={"to": carol, "amount": "1.000000000000000001", "idempotency_key": "rf-2"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "refund_exceeds_received", r.text
            assert d.store.db.scalar("SELECT COUNT(*) FROM payouts") == count
            # a refund that waits for approval and is cancelled leaves the invoice as it was
            big = (await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "6"})).json()
            anvil.send(anvil.accounts[1], big["address"], 6 * 10**18)
            anvil.mine(2)
            await wait_until(lambda: d.views.invoice(big["id"])["status"] == "completed", what="big completed")
            r = await http.post(f"/v1/invoices/{big['id']}/refund", json={"to": carol, "idempotency_key": "rf-3"})
            assert r.status_code == 202 and r.json()["status"] == "awaiting_approval", r.text
            cancelled = await http.post(f"/v1/payouts/{r.json()['id']}/cancel")
            assert cancelled.status_code == 200
            after = d.views.invoice(big["id"])
            assert after["status"] == "completed" and after["refunded_amount"] == "0" and not after["partially_refunded"]
            # a full refund (approved by another key) moves the invoice to refunded
            r = await http.post(f"/v1/invoices/{big['id']}/refund", json={"to": carol, "idempotency_key": "rf-4"})
            assert r.json()["base_units"] == str(6 * 10**18)
            ok = await http.post(f"/v1/payouts/{r.json()['id']}/approve", headers=ADMIN)
            assert ok.status_code == 200, ok.text
            await until_status(d, r.json()["id"], "completed")
            await wait_until(lambda: d.views.invoice(big["id"])["status"] == "refunded", what="refunded")
            assert d.views.invoice(big["id"])["refunded_amount"] == "6"
            assert not d.views.invoice(big["id"])["partially_refunded"]
            # a retry of that request (a lost answer) gets the refund it made, not 409 nothing_to_refund
            again = await http.post(f"/v1/invoices/{big['id']}/refund", json={"to": carol, "idempotency_key": "rf-4"})
            assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true", again.text
            assert again.json()["id"] == r.json()["id"] and again.json()["base_units"] == str(6 * 10**18)
            assert d.store.db.scalar("SELECT COUNT(*) FROM payouts WHERE invoice_id = ?", (big["id"],)) == 2
            r = await http.post(f"/v1/invoices/{big['id']}/refund", json={"to": carol, "idempotency_key": "rf-5"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_refund"


async def test_a_constraint_error_in_a_sender_round_is_a_bug_logged_not_a_stopped_daemon(tmp_path, anvil: Anvil,
                                                                                         token: Token):
    """The Litecoin soak's stopped daemon: a constraint error (an ``IntegrityError``, a
    ``DatabaseError`` but no trouble with the file) in a sender round escaped the round's bug
    handler and ended the daemon, so one payout's bug stopped every chain's scanning. It is a
    bug like any other: logged, counted (``sender_bug``), the round tried again later, and
    deposits are still detected meanwhile. A trigger makes the first round's write fail."""
    from prometheus_client import CollectorRegistry

    from watcher.core import Core

    port = free_port()
    cfg = config(tmp_path, anvil, token, port)
    Core.open(cfg, registry=CollectorRegistry()).close()  # the database, migrated
    with sqlite3.connect(cfg.parent / "watcher.db") as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON wallet_state BEGIN"
                   " SELECT RAISE(ABORT, 'a constraint this test adds'); END")
    with trio.fail_after(60):
        async with running(cfg, api=True) as d:
            bugs = d.metrics.errors.labels("sender_bug")
            await wait_until(lambda: bugs._value.get() >= 1, what="the sender round's bug counted")
            alice = d.store.addresses.deposit_address("devnet", "alice")[0].address
            anvil.send(anvil.accounts[1], alice, 10**15)
            anvil.mine(1)
            await wait_until(lambda: d.views.transfers(chain="devnet")[0], what="a deposit detected meanwhile")
            async with client(port) as http:
                assert (await http.get("/healthz")).status_code == 200
