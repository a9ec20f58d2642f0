"""Payments seen in a real Litecoin Core node's mempool before any block holds them: detected
with 0 confirmations and no block, then the same transfer gets its block; a payment replaced
(BIP125), double-spent or dropped before it is mined is orphaned and nothing is credited;
``mempool = false`` waits for blocks; coinbase outputs are credited only once mature (100
blocks)."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

import coincurve
import httpx
import trio

from tests.support.daemon import AUTH, free_port, running, wait_until, write_config
from tests.support.litecoin import COIN, Litecoind, ltc_entry, mine
from watcher_bitcoin import tx as btx
from watcher_bitcoin.address import p2wpkh, to_script
from watcher_bitcoin.networks import NETWORKS

LTC = NETWORKS["ltc-regtest"]



def transfers(d) -> list[dict]:
    return d.views.transfers(chain="ltc", limit=1000)[0]


def events(d, kind: str) -> list[dict]:
    rows = d.store.db.query("SELECT data FROM events WHERE type = ? ORDER BY seq", (kind,))
    return [json.loads(r[0]) for r in rows]



async def test_a_payment_is_detected_from_the_mempool_then_mined_and_a_replaced_one_is_orphaned(
        tmp_path, litecoind: Litecoind):
    node = litecoind
    node.payer  # noqa: B018
    port = free_port()
    cfg = write_config(tmp_path, [ltc_entry(node)], api_port=port)
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                                                  trust_env=False) as http:
            inv = (await http.post("/v1/invoices", json={"chain": "ltc", "asset": "LTC", "amount": "0.5"})).json()
            head = node.head()
            txid = node.send(inv["address"], COIN // 2)
            # within a poll, with no block mined: detected, 0 confirmations, no block
            (seen,) = await wait_until(lambda: transfers(d), what="the mempool payment")
            assert node.head() == head
            assert (seen["txid"], seen["status"], seen["confirmations"], seen["block_number"], seen["block_hash"],
                    seen["block_time"]) == (txid, "detected", 0, None, None, None)
            assert d.views.invoice(inv["id"])["status"] == "awaiting_confirmation"
            (event,) = events(d, "transfer.detected")
            assert event["block_number"] is None and event["confirmations"] == 0
            # mined: the same transfer gets its block, then confirms
            (block_hash,) = node.mine(1)
            got = await wait_until(lambda: [t for t in transfers(d) if t["block_hash"] == block_hash],
                                   what="the payment's block")
            assert [t["id"] for t in got] == [seen["id"]] and got[0]["block_number"] == head + 1
            await mine(node, 1)
            await wait_until(lambda: d.views.invoice(inv["id"])["status"] == "completed", what="invoice completed")
            assert len(events(d, "transfer.detected")) == 1 and len(events(d, "transfer.confirmed")) == 1

            # a second invoice paid by a transaction its payer then replaces (BIP125, the
            # node runs with -mempoolreplacement=1) with one paying itself: orphaned, never credited
            inv2 = (await http.post("/v1/invoices", json={"chain": "ltc", "asset": "LTC", "amount": "0.25"})).json()
            coin = next(u for u in node.rpc("listunspent", 1, 9_999_999, wallet="payer") if u["amount"] >= 1)
            spend = [{"txid": coin["txid"], "vout": coin["vout"], "sequence": 0xFFFFFFFD}]
            change = node.rpc("getrawchangeaddress", "bech32", wallet="payer")
            rest = coin["amount"] - Decimal("0.25") - Decimal("0.0001")
            pay = node.rpc("createrawtransaction", spend, [{inv2["address"]: "0.25"}, {change: str(rest)}])
            first = node.rpc("sendrawtransaction", node.rpc("signrawtransactionwithwallet", pay, wallet="payer")["hex"])
            await wait_until(lambda: [t for t in transfers(d) if t["txid"] == first], what="the payment to replace")
            assert d.views.invoice(inv2["id"])["status"] == "awaiting_confirmation"
            back = node.rpc("createrawtransaction", spend, [{change: str(coin["amount"] - Decimal("0.001"))}])
            second = node.rpc("sendrawtransaction", node.rpc("signrawtransactionwithwallet", back, wallet="payer")["hex"])
            assert first not in node.rpc("getrawmempool") and second in node.rpc("getrawmempool")
            # orphaned once the scan has passed the height it went missing at (a block, here)
            await mine(node, 1)
            (gone,) = await wait_until(lambda: [t for t in transfers(d) if t["txid"] == first
                                                and t["status"] == "orphaned"], what="the replaced payment orphaned")
            assert gone["block_number"] is None
            inv2_now = d.views.invoice(inv2["id"])
            assert inv2_now["status"] == "awaiting_payment" and inv2_now["received"] == "0"
            await mine(node, 3)
            await trio.sleep(0.5)
            assert d.store.db.scalar("SELECT count(*) FROM transfers WHERE status = 'confirmed'") == 1


async def test_a_fee_bump_mined_before_the_mempool_is_polled_again_is_counted_once(tmp_path, litecoind: Litecoind):
    """X pays the invoice and is seen in the mempool; the payer bumps its fee (X', BIP125,
    the same payment) and X' is mined before watcher looks at the mempool again (here: a
    long poll interval; for real: a node unreachable, a restart, a scan behind). The block
    was applied with X still counted: ``invoice.completed`` said twice the amount was
    received and ``overpaid``, and an app refunding the excess would pay back money it never
    got. The mempool is now read before a block is applied while a payment waits there."""
    node = litecoind
    node.payer  # noqa: B018
    port = free_port()
    cfg = write_config(tmp_path, [ltc_entry(node, confirmations=1, poll_interval=60)], api_port=port)
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                                                  trust_env=False) as http:
            inv = (await http.post("/v1/invoices", json={"chain": "ltc", "asset": "LTC", "amount": "0.25"})).json()
            coin = next(u for u in node.rpc("listunspent", 1, 9_999_999, wallet="payer") if u["amount"] >= 1)
            spend = [{"txid": coin["txid"], "vout": coin["vout"], "sequence": 0xFFFFFFFD}]
            change = node.rpc("getrawchangeaddress", "bech32", wallet="payer")

            def paying(fee: str) -> str:
                raw = node.rpc("createrawtransaction", spend, [{inv["address"]: "0.25"},
                                                               {change: str(coin["amount"] - Decimal("0.25") - Decimal(fee))}])
                return str(node.rpc("sendrawtransaction",
                                    node.rpc("signrawtransactionwithwallet", raw, wallet="payer")["hex"]))

            first = paying("0.0001")
            d.watchers["ltc"].poke()
            await wait_until(lambda: [t for t in transfers(d) if t["txid"] == first], what="X in the mempool")
            bumped = paying("0.001")
            assert first not in node.rpc("getrawmempool")
            await mine(node, 1)
            d.watchers["ltc"].poke()
            await wait_until(lambda: d.views.invoice(inv["id"])["status"] == "completed", what="invoice completed")
            (done,) = [e for e in events(d, "invoice.completed") if e["id"] == inv["id"]]
            assert (done["received"], done["confirmed"], done["overpaid"]) == ("0.25", "0.25", False), done
            assert [t["txid"] for t in transfers(d) if t["status"] == "confirmed"] == [bumped]
            await wait_until(lambda: [t for t in transfers(d) if t["txid"] == first and t["status"] == "orphaned"],
                             what="X orphaned")
            assert d.views.invoice(inv["id"])["received"] == "0.25"


async def test_mempool_off_waits_for_blocks_and_coinbase_outputs_wait_for_maturity(tmp_path, litecoind: Litecoind):
    node = litecoind
    node.payer  # noqa: B018
    cfg = write_config(tmp_path, [ltc_entry(node, mempool=False, start_block=node.head() + 1)])
    with trio.fail_after(90):
        async with running(cfg) as d:
            alice = d.store.addresses.deposit_address("ltc", "alice")[0].address
            txid = node.send(alice, COIN)
            await trio.sleep(1.0)  # ten polls
            assert transfers(d) == []
            await mine(node, 1)
            await wait_until(lambda: [t for t in transfers(d) if t["txid"] == txid], what="the mined payment")
            # a block mined to alice: its coinbase output needs 100 confirmations, not 2
            (block_hash,) = node.rpc("generatetoaddress", 1, alice)
            coinbase = node.rpc("getblock", block_hash)["tx"][0]
            (cb,) = await wait_until(lambda: [t for t in transfers(d) if t["txid"] == coinbase], what="the coinbase")
            assert cb["required_confirmations"] == 100 and cb["status"] == "detected"
            await mine(node, 98)
            await wait_until(lambda: d.store.chains.scanned_number("ltc") == node.head(), what="scan at the head")
            cb = next(t for t in transfers(d) if t["txid"] == coinbase)
            assert (cb["status"], cb["confirmations"]) == ("detected", 99)
            assert next(t for t in transfers(d) if t["txid"] == txid)["status"] == "confirmed"
            await mine(node, 1)
            await wait_until(lambda: next(t for t in transfers(d) if t["txid"] == coinbase)["status"] == "confirmed",
                             what="the coinbase mature")


async def test_a_payment_dropped_from_the_mempool_is_orphaned(tmp_path, litecoind: Litecoind):
    """A payment signed outside any node wallet (nothing puts it back) is dropped when the node
    restarts without its saved mempool: once the scan passes the height it went missing at,
    its transfer is orphaned."""
    node = litecoind
    node.payer  # noqa: B018
    secret = hashlib.sha256(b"a customer's own key").digest()
    mine_ = to_script(LTC, p2wpkh(LTC, coincurve.PrivateKey(secret).public_key.format(compressed=True)))
    funding = node.rpc("sendtoaddress", p2wpkh(LTC, coincurve.PrivateKey(secret).public_key.format(compressed=True)),
                       "1", wallet="payer")
    node.mine(1)
    vout = next(o["n"] for o in node.rpc("getrawtransaction", funding, True)["vout"]
                if o["scriptPubKey"]["hex"] == mine_.hex())
    cfg = write_config(tmp_path, [ltc_entry(node, start_block=node.head() + 1)])
    with trio.fail_after(90):
        async with running(cfg) as d:
            alice = d.store.addresses.deposit_address("ltc", "alice")[0].address
            unsigned = btx.build([btx.Coin(funding, vout, COIN, mine_)], [btx.Output(to_script(LTC, alice), COIN - 5_000)])
            txid = node.rpc("sendrawtransaction", btx.sign(unsigned, [secret]).hex())
            (seen,) = await wait_until(lambda: transfers(d), what="the payment in the mempool")
            assert (seen["txid"], seen["status"], seen["block_number"]) == (txid, "detected", None)
            node.stop()
            node.extra = ("-persistmempool=0",)
            node.start()
            assert txid not in node.rpc("getrawmempool")
            await mine(node, 1)
            await wait_until(lambda: transfers(d)[0]["status"] == "orphaned", timeout=30,
                             what="the dropped payment orphaned")
            assert [e["txid"] for e in events(d, "transfer.orphaned")] == [txid]


async def test_payments_seen_in_the_mempool_before_it_was_turned_off_are_still_followed(tmp_path,
                                                                                        litecoind: Litecoind):
    """`mempool = false` set while payments seen in the mempool wait for a block: one that is
    mined is found in its block as usual; one that left the mempool (dropped here) can no
    longer be seen to go, and stayed `detected`, counted, for ever. It is now orphaned once the
    scan passes a block without finding it in one."""
    node = litecoind
    node.payer  # noqa: B018
    secret = hashlib.sha256(b"a customer's key, mempool off").digest()
    key = p2wpkh(LTC, coincurve.PrivateKey(secret).public_key.format(compressed=True))
    funding = node.rpc("sendtoaddress", key, "1", wallet="payer")
    node.mine(1)
    vout = next(o["n"] for o in node.rpc("getrawtransaction", funding, True)["vout"]
                if o["scriptPubKey"]["hex"] == to_script(LTC, key).hex())
    entry = ltc_entry(node, start_block=node.head() + 1)
    with trio.fail_after(120):
        async with running(write_config(tmp_path, [entry])) as d:
            alice = d.store.addresses.deposit_address("ltc", "alice")[0].address
            bob = d.store.addresses.deposit_address("ltc", "bob")[0].address
            unsigned = btx.build([btx.Coin(funding, vout, COIN, to_script(LTC, key))],
                                 [btx.Output(to_script(LTC, alice), COIN - 5_000)])
            dropped = node.rpc("sendrawtransaction", btx.sign(unsigned, [secret]).hex())
            mined = node.send(bob, COIN // 4)
            await wait_until(lambda: len(transfers(d)) == 2, what="both payments in the mempool")
        node.stop()
        node.extra = ("-persistmempool=0",)  # the signed one is gone; the wallet's comes back
        node.start()
        assert dropped not in node.rpc("getrawmempool")
        if mined not in node.rpc("getrawmempool"):
            node.rpc("resendwallettransactions", wallet="payer")
        async with running(write_config(tmp_path, [{**entry, "mempool": False}])) as d:
            await mine(node, 1)
            await wait_until(lambda: d.store.chains.scanned_number("ltc") == node.head(), what="the block scanned")
            await mine(node, 1)
            await wait_until(lambda: {t["txid"]: t["status"] for t in transfers(d)} == {
                dropped: "orphaned", mined: "confirmed"}, timeout=30, what="dropped orphaned, mined confirmed")
            assert [e["txid"] for e in events(d, "transfer.orphaned")] == [dropped]
