"""The minimal API of the core: health, chains, addresses and transfers, behind a token."""

from __future__ import annotations

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


async def test_health_transfers_and_auth(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)])], api_port=port)
    payer = anvil.accounts[1]
    token.mint(payer, 10**9)
    base = f"http://127.0.0.1:{port}"
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=base, trust_env=False) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            await wait_until(lambda: d.watchers["devnet"].status.node_up)
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["chains"]["devnet"]["ready"]

            assert (await http.get("/v1/transfers")).status_code == 401
            bad = await http.get("/v1/transfers", headers={"authorization": "Bearer wrong-token-xyz"})
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"

            r = await http.post("/v1/addresses", json={"chain": "devnet", "label": "alice"}, headers=AUTH)
            assert r.status_code == 201
            alice = r.json()["address"]
            r2 = await http.post("/v1/addresses", json={"chain": "devnet", "label": "alice"}, headers=AUTH)
            assert r2.status_code == 200 and r2.json()["address"] == alice
            assert r.json()["derivation_path"] == "m/44'/60'/0'/0/0"

            anvil.send(payer, alice, 3 * 10**17)
            token.transfer(payer, alice, 4_000_000)
            anvil.mine(2)
            await wait_until(lambda: len(d.views.transfers(status="confirmed")[0]) == 2, what="confirmed")

            page = (await http.get("/v1/transfers", params={"chain": "devnet", "address": alice, "limit": 1},
                                   headers=AUTH)).json()
            assert len(page["items"]) == 1 and page["next_cursor"]
            page2 = (await http.get("/v1/transfers", params={"chain": "devnet", "address": alice.lower(), "limit": 1,
                                                             "cursor": page["next_cursor"]}, headers=AUTH)).json()
            both = page["items"] + page2["items"]
            assert {(t["asset"], t["amount"]) for t in both} == {("ETH", "0.3"), ("USDT", "4")}
            assert page2["next_cursor"] is None
            assert all(t["address"] == alice for t in both)

            info = (await http.get(f"/v1/addresses/devnet/{alice}", headers=AUTH)).json()
            assert info["totals"]["USDT"] == {"confirmed": "4", "pending": "0", "transfers": 1}

            chains = (await http.get("/v1/chains", headers=AUTH)).json()["items"]
            assert chains[0]["id"] == "devnet" and chains[0]["node"]["chain_id"] == 31337
            assert chains[0]["scanned"] <= chains[0]["head"]

            for params, status, code in [
                ({"chain": "nope"}, 400, "unknown_chain"),
                ({"chain": "devnet", "address": "0x1234"}, 400, "invalid_address"),
                ({"chain": "devnet", "address": alice[:-1] + ("a" if alice[-1] != "a" else "b")}, 400, "invalid_address"),
                ({"status": "weird"}, 400, "invalid_status"),
                ({"limit": "0"}, 400, "invalid_parameter"),
                ({"since": "yesterday"}, 400, "invalid_parameter"),
                ({"address": alice}, 400, "invalid_parameter"),
            ]:
                r = await http.get("/v1/transfers", params=params, headers=AUTH)
                assert (r.status_code, r.json()["error"]["code"]) == (status, code), params

            n_addresses = d.store.addresses.count("devnet")
            for body, status, code in [
                (b"{not json", 400, "malformed_json"),
                (b"[1, 2]", 400, "malformed_json"),
                (b'{"chain": "devnet"}', 400, "invalid_label"),
                (b'{"chain": "nope", "label": "x"}', 400, "unknown_chain"),
                (b'{"chain": "devnet", "label": "x", "extra": 1}', 400, "unknown_field"),
                (b'{"chain": "devnet", "label": "' + b"x" * 70_000 + b'"}', 413, "payload_too_large"),
            ]:
                r = await http.post("/v1/addresses", content=body, headers=AUTH)
                assert (r.status_code, r.json()["error"]["code"]) == (status, code), body[:40]
            assert d.store.addresses.count("devnet") == n_addresses  # nothing written

            r = await http.get("/v1/nothing-here", headers=AUTH)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
