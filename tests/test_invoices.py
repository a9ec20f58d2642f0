"""Invoices end to end on anvil: status changes, flags, webhooks verified as an app would."""

from __future__ import annotations

import httpx
import pytest
import trio
from standardwebhooks import Webhook

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


async def api_client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, trust_env=False, timeout=10)


async def test_full_flow_invoice_paid_and_webhooks_verified(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                              confirmations=2, chain_id=31337)], api_port=port)
    payer = anvil.accounts[1]
    token.mint(payer, 10**12)
    with trio.fail_after(60):
        async with receiving() as rx, running(cfg, api=True) as d, await api_client(port) as http:
            r = await http.post("/v1/webhooks", json={"url": rx.url, "events": ["invoice.*"]})
            assert r.status_code == 201
            secret = r.json()["secret"]
            assert secret.startswith("whsec_")
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "12.5",
                                                      "order_id": "order-42", "metadata": {"cart": [1, 2]}})
            assert r.status_code == 201, r.text
            inv = r.json()
            assert inv["status"] == "awaiting_payment" and inv["amount"] == "12.5" and inv["due"] == "12.5"
            assert inv["payment_uri"] == (f"ethereum:{token.address}@31337/transfer?address={inv['address']}"
                                          f"&uint256=12500000")
            anvil.automine(False)
            txid = token.transfer(payer, inv["address"], 12_500_000)
            anvil.mine(1)
            await wait_until(lambda: "invoice.awaiting_confirmation" in rx.types(), what="awaiting_confirmation hook")
            anvil.mine(1)
            await wait_until(lambda: "invoice.completed" in rx.types(), what="completed hook")

            wh = Webhook(secret)
            seen = []
            for req in rx.requests:
                payload = wh.verify(req.body, req.headers)  # raises if the signature is wrong
                seen.append(payload["type"])
                assert payload["data"]["id"] == inv["id"]
                assert payload["data"]["order_id"] == "order-42"
                assert req.headers["webhook-id"].startswith("evt_")
            assert seen == ["invoice.created", "invoice.awaiting_confirmation", "invoice.completed"]
            done = rx.requests[-1].json["data"]
            assert done["status"] == "completed" and done["received"] == "12.5" and done["confirmed"] == "12.5"
            assert done["payments"][0]["txid"] == txid and done["payments"][0]["confirmations"] >= 2
            assert [r.json["sequence"] for r in rx.requests] == [1, 2, 3]

            got = (await http.get(f"/v1/invoices/{inv['id']}")).json()
            assert got["status"] == "completed" and got["completed_at"] and got["metadata"] == {"cart": [1, 2]}
            listed = (await http.get("/v1/invoices", params={"order_id": "order-42"})).json()["items"]
            assert [i["id"] for i in listed] == [inv["id"]]
            assert (await http.get("/v1/invoices", params={"status": "awaiting_payment"})).json()["items"] == []
            # the transfer knows its invoice and order too
            t = d.views.transfers(chain="devnet")[0][0]
            assert t["invoice_id"] == inv["id"] and t["order_id"] == "order-42"


async def pay_and_wait(anvil, token, d, inv, units, status, *, mine=1):
    token.transfer(anvil.accounts[1], inv["address"], units)
    anvil.mine(mine)
    return await wait_until(lambda: (v := d.views.invoice(inv["id"]))["status"] == status and v,
                            what=f"invoice {status}")


@pytest.fixture
def setup(tmp_path, anvil: Anvil, token: Token):
    token.mint(anvil.accounts[1], 10**12)
    anvil.automine(False)
    return write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                               confirmations=2)])


def create(d, amount="12.5", **kw):
    defaults = {"chain": "devnet", "asset": "USDT", "amount": None if amount is None else int(float(amount) * 10**6),
                "mode": "sale", "expires_in": 3600, "tolerance_ppm": 0, "order_id": None, "metadata": {}, "actor": "t"}
    defaults.update(kw)
    return d.views.invoice(d.store.invoices.create(**defaults).id)


def invoice_events(d, inv):
    return [e.type for e in d.store.events.list(subject=inv["id"], limit=100)]


async def test_partial_then_full_payment(setup, anvil, token):
    with trio.fail_after(60):
        async with running(setup) as d:
            inv = create(d)
            token.transfer(anvil.accounts[1], inv["address"], 5_000_000)
            anvil.mine(2)
            v = await wait_until(lambda: (v := d.views.invoice(inv["id"]))["received"] == "5" and v)
            assert v["status"] == "awaiting_payment" and v["partial"] and v["due"] == "7.5"
            v = await pay_and_wait(anvil, token, d, inv, 7_500_000, "awaiting_confirmation")
            assert not v["partial"] and v["received"] == "12.5"
            anvil.mine(1)
            v = await wait_until(lambda: (v := d.views.invoice(inv["id"]))["status"] == "completed" and v)
            assert v["confirmed"] == "12.5" and len(v["payments"]) == 2
            assert invoice_events(d, inv) == ["invoice.created", "invoice.awaiting_confirmation", "invoice.completed"]


async def test_overpayment_completes_flagged(setup, anvil, token):
    with trio.fail_after(60):
        async with running(setup) as d:
            inv = create(d)
            v = await pay_and_wait(anvil, token, d, inv, 20_000_000, "completed", mine=2)
            assert v["overpaid"] and v["received"] == "20" and v["due"] == "0"


async def test_tolerance_accepts_small_underpayment(setup, anvil, token):
    with trio.fail_after(60):
        async with running(setup) as d:
            inv = create(d, tolerance_ppm=10_000)  # 1 %
            v = await pay_and_wait(anvil, token, d, inv, 12_400_000, "completed", mine=2)
            assert not v["overpaid"] and v["received"] == "12.4" and v["tolerance"] == "0.01"
            short = create(d, tolerance_ppm=10_000)
            assert short["due"] == "12.5"  # the tolerance is accepted underpayment, not a discount asked for
            token.transfer(anvil.accounts[1], short["address"], 12_370_000)  # below 12.375
            anvil.mine(2)
            v = await wait_until(lambda: (v := d.views.invoice(short["id"]))["received"] == "12.37" and v)
            assert v["status"] == "awaiting_payment" and v["partial"]
            assert v["due"] == "0.13"  # the rest of the amount (12.375 - 12.37 before: the tolerance given away)


async def test_deposit_mode_takes_any_amount(setup, anvil, token):
    with trio.fail_after(60):
        async with running(setup) as d:
            inv = create(d, amount=None, mode="deposit")
            assert inv["amount"] is None and inv["payment_uri"] is None
            v = await pay_and_wait(anvil, token, d, inv, 3_000_000, "completed", mine=2)
            assert v["received"] == "3" and not v["overpaid"]


async def test_reorg_of_paying_transfer_moves_invoice_back(setup, anvil, token):
    with trio.fail_after(60):
        async with running(setup) as d:
            inv = create(d)
            v = await pay_and_wait(anvil, token, d, inv, 12_500_000, "awaiting_confirmation")
            anvil.reorg(1, [])  # the payment's block is replaced; the payment is gone
            v = await wait_until(lambda: (v := d.views.invoice(inv["id"]))["status"] == "awaiting_payment" and v,
                                 what="back to awaiting_payment")
            assert v["received"] == "0" and v["payments"][0]["status"] == "orphaned"
            assert invoice_events(d, inv) == ["invoice.created", "invoice.awaiting_confirmation",
                                              "invoice.awaiting_payment"]
            # paid again, it completes
            await pay_and_wait(anvil, token, d, inv, 12_500_000, "completed", mine=2)


async def test_submit_tx_answered_from_another_fork_leaves_a_scanned_payment_where_the_scan_found_it(
        tmp_path, anvil, token):
    """The node answering submit-tx (a failover node, another replica) may be on a fork where
    the payment the scan already holds in block n was mined in a block above the cursor. That
    answer moved the stored payment to the other fork's block: the scan then orphaned it
    there, while the block that really holds it was never scanned again (the invoice unpaid,
    the confirmed deposit un-credited). A payment the scan holds in a block of its own chain
    now stays there. (The other fork's answer is built here: anvil cannot serve two forks.)"""
    from watcher.chains import Block, Transfer

    token.mint(anvil.accounts[1], 10**12)
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                              confirmations=2)])
    with trio.fail_after(60):
        async with running(cfg) as d:
            inv = d.views.invoice(d.store.invoices.create(chain="devnet", asset="USDT", amount=1_000_000, mode="sale",
                                                          expires_in=600, tolerance_ppm=0, order_id=None, metadata={},
                                                          actor="t").id)
            token.transfer(anvil.accounts[1], inv["address"], 1_000_000)
            anvil.mine(2)
            await wait_until(lambda: d.views.invoice(inv["id"])["status"] == "completed", what="completed")
            (t,) = d.views.transfers()[0]
            cursor = d.store.chains.scanned_number("devnet")
            fork = Block(number=cursor + 2, hash="0x" + "bb" * 32, parent_hash="0x" + "cc" * 32, timestamp=0,
                         transfers=(Transfer(txid=t["txid"], index=t["index"], kind=t["kind"], asset=t["asset"],
                                             to=t["address"].lower(), sender=t["from"].lower(), amount=int(t["base_units"])),))
            assert d.store.chains.record_lookup(d.store.chain_config("devnet"), fork)
            anvil.mine(4)
            d.watchers["devnet"].poke()
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head(), what="scanned past it")
            (now,) = d.views.transfers()[0]
            assert (now["status"], now["block_number"], now["block_hash"]) == ("confirmed", t["block_number"],
                                                                                t["block_hash"])
            assert d.views.invoice(inv["id"])["status"] == "completed"


async def test_submit_tx_checks_a_payment_before_the_scanner(tmp_path, anvil, token):
    port = free_port()
    token.mint(anvil.accounts[1], 10**12)
    anvil.automine(False)
    # the scanner polls rarely: only submit-tx can make the invoice move quickly
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                              confirmations=2, poll_interval=30)], api_port=port)
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, await api_client(port) as http:
            await wait_until(lambda: d.watchers["devnet"].status.node_up)
            inv = (await http.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "1"})).json()
            txid = token.transfer(anvil.accounts[1], inv["address"], 1_000_000)
            r = await http.post(f"/v1/invoices/{inv['id']}/submit-tx", json={"txid": txid})
            assert r.status_code == 202 and r.json()["tx"]["status"] == "pending"  # still in the mempool
            anvil.mine(1)
            assert d.store.chains.scanned_number("devnet") < anvil.head()  # the scanner has not seen the block
            r = await http.post(f"/v1/invoices/{inv['id']}/submit-tx", json={"txid": txid})
            assert r.status_code == 200, r.text
            assert r.json()["tx"]["status"] == "included"
            assert r.json()["invoice"]["status"] == "awaiting_confirmation"
            # twice is harmless
            r = await http.post(f"/v1/invoices/{inv['id']}/submit-tx", json={"txid": txid})
            assert r.status_code == 200 and len(r.json()["invoice"]["payments"]) == 1
            # a transaction that pays someone else
            other = anvil.send(anvil.accounts[1], anvil.accounts[2], 5)
            anvil.mine(1)
            r = await http.post(f"/v1/invoices/{inv['id']}/submit-tx", json={"txid": other})
            assert r.status_code == 422 and r.json()["error"]["code"] == "tx_not_for_invoice"
            r = await http.post(f"/v1/invoices/{inv['id']}/submit-tx", json={"txid": "0x" + "ab" * 32})
            assert r.status_code == 202 and r.json()["tx"]["status"] == "unknown"
            r = await http.post(f"/v1/invoices/{inv['id']}/submit-tx", json={"txid": "0x1234"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_txid"
            # the scanner later agrees: confirmed once, no duplicate
            d.watchers["devnet"].poke()
            anvil.mine(1)
            d.watchers["devnet"].poke()
            await wait_until(lambda: d.views.invoice(inv["id"])["status"] == "completed", what="completed")
            assert len(d.views.transfers()[0]) == 1
