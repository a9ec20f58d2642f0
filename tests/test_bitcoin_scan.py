"""The Bitcoin family reading a real Litecoin Core regtest node: BIP84 deposit addresses, every
output to a watched address its own transfer, confirmations, reorgs by invalidateblock at
depths 1, 3 and 6, invoices paid through their BIP21 URI, external addresses of every type,
submit-tx, and a node of another network refused. (Sending: tests/test_bitcoin_wallet.py.)"""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
import trio

from tests.support.daemon import (
    AUTH,
    TEST_MNEMONIC,
    free_port,
    running,
    wait_until,
    write_config,
)
from tests.support.litecoin import COIN, Litecoind, ltc_entry, mine
from watcher.keys import Keyring
from watcher_bitcoin import BitcoinFamily
from watcher_bitcoin.family import BitcoinSpec


def transfers(d, **kw) -> list[dict]:
    return d.views.transfers(chain="ltc", limit=1000, **kw)[0]



async def test_deposits_confirm_and_survive_reorgs_of_depth_1_3_and_6(tmp_path, litecoind: Litecoind):
    node = litecoind
    node.payer  # noqa: B018 - funds the payer (101 blocks)
    port = free_port()
    cfg = write_config(tmp_path, [ltc_entry(node)], api_port=port)
    with trio.fail_after(120):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                                                  trust_env=False) as http:
            r = await http.post("/v1/addresses", json={"chain": "ltc", "label": "alice"})
            assert r.status_code == 201, r.text
            alice = r.json()
            spec = d.config.chain("ltc").spec
            assert isinstance(spec, BitcoinSpec)
            expected = spec.address_from_public_key(Keyring.from_mnemonic(TEST_MNEMONIC).public_key("m/84'/1'/0'", 0))
            assert alice["address"] == expected and alice["address"].startswith("rltc1q")
            assert alice["derivation_path"] == "m/84'/1'/0'/0/0"
            bob = (await http.post("/v1/addresses", json={"chain": "ltc", "label": "bob"})).json()["address"]
            # one transaction paying both: two transfers, one per output
            txid = node.rpc("sendmany", "", {alice["address"]: "0.5", bob: "0.25"}, wallet="payer")
            await mine(node)
            got = await wait_until(lambda: len(transfers(d)) == 2 and transfers(d), what="two transfers")
            assert {(t["txid"], t["address"], t["base_units"], t["status"]) for t in got} == {
                (txid, alice["address"], str(COIN // 2), "detected"), (txid, bob, str(COIN // 4), "detected")}
            outputs = node.rpc("getrawtransaction", txid, True)["vout"]
            assert {t["index"] for t in got} == {o["n"] for o in outputs if o["value"] in (Decimal("0.5"), Decimal("0.25"))}
            await mine(node)
            await wait_until(lambda: all(t["status"] == "confirmed" for t in transfers(d)), what="confirmed")
            for depth in (1, 3, 6):
                # a payment in the newest block, then the last `depth` blocks dropped
                pay = node.send(alice["address"], 10_000_000 + depth)
                await mine(node, depth)
                # (depth 1: seen in its block, not only in the mempool, or the reorg orphans nothing)
                await wait_until(lambda pay=pay, depth=depth: any(t["txid"] == pay and t["status"] == "confirmed" if depth > 1
                                                     else t["txid"] == pay and t["block_number"] is not None
                                                     for t in transfers(d)),
                                 what=f"payment before the reorg of {depth}")
                node.invalidate(depth)
                # as many blocks again without it (it waits in the mempool): the node's chain
                # differs from ours at our tip, the payment's block is gone
                await trio.to_thread.run_sync(node.mine_empty, depth)
                await wait_until(lambda pay=pay: [e for e in d.store.events.list(limit=1000, types=("transfer.orphaned",))
                                                  if e.data["txid"] == pay], what=f"orphaned by {depth}")
                # back in the node's mempool: detected again, unmined
                await wait_until(lambda pay=pay: [t for t in transfers(d) if t["txid"] == pay and t["status"] == "detected"
                                                  and t["block_number"] is None], what="back in the mempool")
                # mined again, it is the same transfer
                await mine(node, 2)
                again = await wait_until(lambda pay=pay: [t for t in transfers(d) if t["txid"] == pay
                                                          and t["status"] == "confirmed"], what="confirmed again")
                assert len(again) == 1
            events = [e.type for e in d.store.events.list(limit=1000, types=("transfer.confirmed",))]
            assert len(events) == 2 + 3 * 2 - 1  # depth 1 was dropped before it confirmed
            totals = (await http.get(f"/v1/addresses/ltc/{alice['address']}")).json()["totals"]["LTC"]
            onchain = sum(u["amount"] for u in node.rpc("scantxoutset", "start", [f"addr({alice['address']})"])["unspents"])
            assert Decimal(totals["confirmed"]) == onchain


async def test_invoices_external_addresses_and_submit_tx(tmp_path, litecoind: Litecoind):
    node = litecoind
    node.payer  # noqa: B018
    port = free_port()
    cfg = write_config(tmp_path, [ltc_entry(node)], api_port=port)
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                                                  trust_env=False) as http:
            inv = (await http.post("/v1/invoices", json={"chain": "ltc", "asset": "LTC", "amount": "0.12345678"})).json()
            uri = inv["payment_uri"]
            assert uri == f"litecoin:{inv['address']}?amount=0.12345678"
            # a wallet pays what the URI says
            txid = node.send(uri.split(":")[1].split("?")[0], int(Decimal(uri.split("amount=")[1]) * COIN))
            r = await http.post(f"/v1/invoices/{inv['id']}/submit-tx", json={"txid": txid})
            assert r.status_code == 202 and r.json()["tx"]["status"] == "pending"  # in the mempool
            await mine(node, 1)
            r = await http.post(f"/v1/invoices/{inv['id']}/submit-tx", json={"txid": txid.upper()})
            assert r.status_code == 200 and r.json()["tx"]["status"] == "included"
            await mine(node, 1)
            await wait_until(lambda: d.views.invoice(inv["id"])["status"] == "completed", what="invoice completed")
            # external addresses of the node's own wallet, legacy and P2SH-SegWit
            for kind in ("legacy", "p2sh-segwit", "bech32"):
                ext = node.rpc("getnewaddress", "", kind, wallet="payer")
                r = await http.post("/v1/watch", json={"chain": "ltc", "address": ext, "label": f"ext-{kind}"})
                assert r.status_code == 201, r.text
                pay = node.send(ext, 1_000_000)
                await mine(node, 2)
                await wait_until(lambda pay=pay: [t for t in transfers(d) if t["txid"] == pay
                                                  and t["status"] == "confirmed"], what=f"{kind} payment")
            r = await http.post("/v1/watch", json={"chain": "ltc", "address": "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_address"



async def test_a_node_of_another_network_is_refused(litecoind: Litecoind):
    from prometheus_client import CollectorRegistry

    from watcher.chains import ChainContext
    from watcher.config import ConfigTable
    from watcher.errors import ChainMismatch
    from watcher.jsonrpc import JsonRpc
    from watcher.metrics import Metrics
    from watcher_bitcoin.client import BitcoinClient

    metrics = Metrics(CollectorRegistry())
    for network, ok in (("ltc-regtest", True), ("btc-regtest", False), ("ltc", False)):
        spec = BitcoinFamily().configure(ConfigTable({"network": network}, "chains[0]"))
        cfg = type("Cfg", (), {"id": "x", "node": "http://127.0.0.1", "native": type("A", (), {"symbol": "LTC"})})()
        ctx = ChainContext(config=cfg, jsonrpc=lambda head_call=None, credentials=None, **kw: JsonRpc(  # one node
            litecoind.url, chain="x", metrics=metrics, **kw))
        client = BitcoinClient(ctx, spec.options)
        try:
            if ok:
                info = await client.check()
                assert info["chain"] == "regtest" and len(info["genesis"]) == 64
            else:
                with pytest.raises(ChainMismatch, match=f"network = '{network}'"):
                    await client.check()
        finally:
            await client.aclose()


async def test_cookie_authentication_survives_a_node_restart(tmp_path):
    """rpc_cookie_file instead of credentials in rpc_url: the node writes a new cookie at each
    start; watcher reads it again when the node answers 401."""
    node = Litecoind(cookie=True)
    node.start()
    try:
        node.payer  # noqa: B018
        cfg = write_config(tmp_path, [ltc_entry(node, rpc_cookie_file=str(node.cookie_file))])
        with trio.fail_after(90):
            async with running(cfg) as d:
                first = node.cookie_file.read_text()
                addr, _ = d.store.addresses.deposit_address("ltc", "carol")
                node.send(addr.address, 5_000_000)
                await mine(node, 2)
                await wait_until(lambda: [t for t in transfers(d) if t["status"] == "confirmed"], what="confirmed")
                await trio.to_thread.run_sync(node.stop)
                await trio.to_thread.run_sync(node.start)
                assert node.cookie_file.read_text() != first
                node.send(addr.address, 6_000_000)
                await mine(node, 2)
                await wait_until(lambda: len([t for t in transfers(d) if t["status"] == "confirmed"]) == 2,
                                 what="confirmed after the restart")
    finally:
        node.close()


async def test_each_node_of_a_chain_reads_its_own_cookie_file(tmp_path):
    """[[chains.nodes]] tables with a cookie file each (every node writes its own): each
    node of the pool authenticates with its own, the chain's rpc_cookie_file is the default,
    and the wrong cookie is refused by the node (so the per-node file is what made it work)."""
    from watcher.core import Core
    from watcher.errors import NodeError

    a, b = Litecoind(cookie=True), Litecoind(cookie=True)
    a.start()
    try:
        b.start()
        try:
            assert a.cookie_file.read_text() != b.cookie_file.read_text()
            entry = ltc_entry(a)
            del entry["rpc_url"]
            entry["nodes"] = [{"url": a.url, "rpc_cookie_file": str(a.cookie_file)},
                              {"url": b.url, "rpc_cookie_file": str(b.cookie_file)}]
            core = Core.open(write_config(tmp_path / "own", [entry]))
            try:
                assert [n.options for n in core.config.chains[0].nodes] == [
                    {"rpc_cookie_file": a.cookie_file}, {"rpc_cookie_file": b.cookie_file}]
                async with core.open_client("ltc") as client:
                    heads = [await n.rpc.probe("getblockcount") for n in client.rpc.nodes]
                    assert heads == [a.head(), b.head()]
            finally:
                core.close()
            # the chain's cookie for a node without its own: node b then presents a's cookie
            entry["rpc_cookie_file"] = str(a.cookie_file)
            entry["nodes"] = [{"url": a.url}, {"url": b.url}]
            core = Core.open(write_config(tmp_path / "chain", [entry]))
            try:
                async with core.open_client("ltc") as client:
                    assert await client.rpc.nodes[0].rpc.probe("getblockcount") == a.head()
                    with pytest.raises(NodeError, match="HTTP 401"):
                        await client.rpc.nodes[1].rpc.probe("getblockcount")
            finally:
                core.close()
        finally:
            b.close()
    finally:
        a.close()


def test_a_new_transfers_event_is_the_row_as_read_back(tmp_path):
    """A transfer found by the scan is reported from the values just written, with its
    address's kind, label, invoice and order id looked up (not read back: a catch-up writes
    hundreds a second). Its `transfer.detected` event must be what reading the row gives, for
    a labelled deposit address, an invoice's address (with its order id) and a watched one."""
    from prometheus_client import CollectorRegistry

    from watcher import views
    from watcher.chains import Block, Transfer
    from watcher.core import Core

    entry = {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": "http://127.0.0.1:9",
             "confirmations": 3}
    core = Core.open(write_config(tmp_path, [entry]), registry=CollectorRegistry())
    try:
        store = core.store
        chain = store.chain_config("ltc")
        store.chains.ensure(chain, start_block=10, node_info={"chain": "regtest", "genesis": "00" * 32})
        alice = store.addresses.deposit_address("ltc", "alice")[0].address
        invoice = store.invoices.create(chain="ltc", asset="LTC", amount=5 * COIN, mode="exact", expires_in=900,
                                        tolerance_ppm=0, order_id="order-7", metadata={}, actor=None)
        watched = "mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn"
        store.addresses.watch_external("ltc", watched, None)
        pays = [Transfer(txid=f"{n:064x}", index=n, kind="native", asset="LTC", to=to, sender="", amount=1000 + n)
                for n, to in enumerate([alice, invoice.address, watched])]
        cursor = store.chains.cursor("ltc")
        block = Block(number=cursor.number + 1, hash="ab" * 32, parent_hash=cursor.hash or "00" * 32,
                      timestamp=1_700_000_000, transfers=tuple(pays))
        store.chains.apply_blocks(chain, [block], node_head=block.number)
        events = [e for e in store.events.list(types=("transfer.detected",))]
        assert len(events) == 3
        for e in events:
            row = store.transfers.row(e.subject)
            assert e.data == views.transfer(chain, row, tip=block.number)
        assert {(e.data["label"], e.data["invoice_id"], e.data["order_id"]) for e in events} == {
            ("alice", None, None), (None, invoice.id, "order-7"), (None, None, None)}
    finally:
        core.close()
