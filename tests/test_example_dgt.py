"""examples/dgt_credits.py against a real daemon on anvil: DGT = USDT value x 10, credited once
per transfer id, taken back on a reorg and given again when the transfer returns."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tests.support.daemon import (
    AUTH,
    chain_entry,
    free_port,
    running,
    wait_until,
    write_config,
)
from tests.support.evm import Anvil, Token

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from dgt_credits import create_app


async def test_the_example_credits_dgt_once_and_takes_it_back_on_a_reorg(tmp_path, anvil: Anvil, token: Token):
    port, app_port = free_port(), free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                              confirmations=2)], api_port=port,
                       extra={"rates": {"reference": "USD", "sources": [
                           {"kind": "fixed", "pair": "USDT/USD", "rate": "1"},
                           {"kind": "fixed", "pair": "ETH/USD", "rate": "2000"}]}})
    payer = anvil.accounts[1]
    token.mint(payer, 10**9)
    with trio.fail_after(120):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                                                   trust_env=False, timeout=10) as http:
            hook = (await http.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{app_port}/hook",
                                                          "events": ["transfer.*"]})).json()
            app_cfg = Config()
            app_cfg.bind = [f"127.0.0.1:{app_port}"]
            app_cfg.accesslog = None
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: serve(create_app(hook["secret"], str(tmp_path / "dgt.db")), app_cfg,
                                                 shutdown_trigger=stop.wait))
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app_port}", trust_env=False) as app:

                    async def balances() -> dict:
                        try:
                            return (await app.get("/balances")).json()
                        except httpx.TransportError:
                            return {}

                    alice = (await http.post("/v1/addresses", json={"chain": "devnet", "label": "alice"})).json()
                    bob = (await http.post("/v1/addresses", json={"chain": "devnet", "label": "bob"})).json()
                    carol = (await http.post("/v1/addresses", json={"chain": "devnet", "label": "carol"})).json()
                    anvil.automine(False)
                    token.transfer(payer, alice["address"], 12_500_000)  # 12.5 USDT -> 125 DGT
                    anvil.send(payer, carol["address"], 10**16)  # 0.01 ETH at 2000 -> 20 USD -> 200 DGT
                    anvil.mine(6)
                    await wait_until_async(balances, {"alice": "125", "carol": "200"})

                    bob_tx = token.transfer(payer, bob["address"], 3_000_000)  # 3 USDT -> 30 DGT
                    anvil.mine(3)
                    await wait_until_async(balances, {"alice": "125", "bob": "30", "carol": "200"})
                    raw = anvil.raw_tx(bob_tx)
                    # a reorg deeper than the confirmations drops bob's confirmed deposit: taken back
                    anvil.reorg(3)
                    anvil.mine(1)
                    await wait_until_async(balances, {"alice": "125", "carol": "200"})
                    # the same transaction mined again: the same transfer id, credited again (once)
                    anvil.rpc("eth_sendRawTransaction", raw)
                    anvil.mine(3)
                    await wait_until_async(balances, {"alice": "125", "bob": "30", "carol": "200"})

                    # every event again (a replayed backlog, redeliveries): nothing changes
                    items, _ = d.views.deliveries(hook["id"], limit=1000)
                    for item in items:
                        if item["status"] == "delivered":
                            assert (await http.post(f"/v1/deliveries/{item['id']}/redeliver")).status_code == 202
                    await wait_until(lambda: d.store.webhooks.backlog() == 0, what="redeliveries done")
                    assert await balances() == {"alice": "125", "bob": "30", "carol": "200"}
                    # a forged webhook is refused and changes nothing
                    forged = await app.post("/hook", content=b'{"type":"transfer.confirmed"}',
                                            headers={"webhook-id": "x", "webhook-timestamp": "1",
                                                     "webhook-signature": "v1,AAAA"})
                    assert forged.status_code == 400
                stop.set()


async def wait_until_async(read, want: dict, timeout: float = 30.0) -> None:
    deadline = trio.current_time() + timeout
    got = None
    while trio.current_time() < deadline:
        got = await read()
        if got == want:
            return
        await trio.sleep(0.1)
    raise AssertionError(f"balances {got}, wanted {want}")
