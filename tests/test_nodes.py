"""Several nodes per chain, a hung node, and heads pushed over a WebSocket, against a real anvil.

The "primary" node is a TCP forwarder in front of the same anvil (tests/support/tcpproxy.py):
the same chain through another endpoint, which the test stops (connections refused), freezes
with SIGSTOP (connections accepted, never answered: a hung node), or cuts (a dropped
WebSocket). The backup is anvil itself. A lagging node is the fault proxy's replica view."""

from __future__ import annotations

import time
from collections import Counter

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
from tests.support.evm import Anvil
from tests.support.faultproxy import fault_proxy
from tests.support.tcpproxy import TcpProxyProcess, tcp_proxy

ETH = 10**18


def node_config(tmp_path, anvil: Anvil, urls: list[str], **extra):
    api_port = free_port()
    entry = chain_entry("devnet", anvil.url, confirmations=2, chain_id=31337, rpc_timeout=1.0, **extra)
    del entry["rpc_url"]
    entry["rpc_urls"] = urls
    return write_config(tmp_path, [entry], api_port=api_port), api_port


def confirmed_once(d, txids: list[str]) -> bool:
    rows = d.views.transfers(chain="devnet", limit=1000)[0]
    counts = Counter(t["txid"] for t in rows if t["txid"] in txids)
    return all(counts[t] == 1 for t in txids) and all(
        t["status"] == "confirmed" for t in rows if t["txid"] in txids)


async def deposits_survive(tmp_path, anvil: Anvil, fail) -> dict:
    """Pay deposit addresses while the primary node fails (``fail(primary)``); every deposit
    must be confirmed exactly once through the backup, and /v1/chains must show the switch."""
    with TcpProxyProcess(anvil.port) as primary:
        cfg, api_port = node_config(tmp_path, anvil, [primary.url, anvil.url])
        async with running(cfg, api=True) as d, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api_port}", headers=AUTH, trust_env=False, timeout=10) as http:
            chain = (await http.get("/v1/chains")).json()["items"][0]
            assert [n["node"] for n in chain["nodes"]] == [primary.url, anvil.url]
            assert chain["nodes"][0]["active"] and chain["node"]["url"] == primary.url
            txids, addresses = [], []
            for i in range(6):
                addr = (await http.post("/v1/addresses", json={"chain": "devnet", "label": f"user{i}"})).json()
                addresses.append(addr["address"])
            for i, addr in enumerate(addresses):
                if i == 2:
                    fail(primary)
                txids.append(anvil.send(anvil.accounts[1], addr, ETH + i))
                await trio.sleep(0.2)
            anvil.mine(2)
            with trio.fail_after(60):
                await wait_until(lambda: confirmed_once(d, txids), timeout=60, what="every deposit confirmed once")
            events = [e for e in d.store.events.list(limit=1000) if e.type == "transfer.confirmed"]
            assert Counter(e.data["txid"] for e in events) == Counter(txids)  # once each, none lost
            chain = (await http.get("/v1/chains")).json()["items"][0]
            by_url = {n["node"]: n for n in chain["nodes"]}
            assert by_url[primary.url]["state"] == "down" and not by_url[primary.url]["active"]
            assert by_url[anvil.url]["state"] == "up" and by_url[anvil.url]["active"]
            assert chain["node"]["url"] == anvil.url and chain["node"]["status"] == "up"
            metrics = d.metrics.registry
            assert metrics.get_sample_value("watcher_node_switches_total", {"chain": "devnet"}) >= 1
            assert metrics.get_sample_value("watcher_node_up", {"chain": "devnet", "node": primary.url}) == 0
            assert metrics.get_sample_value("watcher_node_active", {"chain": "devnet", "node": anvil.url}) == 1
            r = await http.get("/readyz")
            assert r.status_code == 200, r.text  # one node is enough
            return chain


async def test_primary_stopped_every_deposit_confirmed_once_through_the_backup(tmp_path, anvil: Anvil):
    await deposits_survive(tmp_path, anvil, lambda primary: primary.stop())


async def test_primary_frozen_every_deposit_confirmed_once_through_the_backup(tmp_path, anvil: Anvil):
    await deposits_survive(tmp_path, anvil, lambda primary: primary.freeze())


async def test_a_single_hung_node_turns_readyz_unready_within_two_timeouts(tmp_path, anvil: Anvil, capsys):
    with TcpProxyProcess(anvil.port) as node:
        api_port = free_port()
        cfg = write_config(tmp_path, [chain_entry("devnet", node.url, rpc_timeout=1.0, poll_interval=0.5)],
                           api_port=api_port)
        async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}",
                                                             trust_env=False, timeout=10) as http:
            await wait_until(lambda: True, timeout=1)
            with trio.fail_after(20):
                while (await http.get("/readyz")).status_code != 200:
                    await trio.sleep(0.1)
            node.freeze()
            frozen = time.monotonic()
            with trio.fail_after(20):
                while (r := await http.get("/readyz")).status_code == 200:
                    await trio.sleep(0.05)
            took = time.monotonic() - frozen
            with capsys.disabled():
                print(f"\n[hung node] /readyz unready {took:.2f} s after the node froze (rpc_timeout 1.0 s)")
            assert r.json()["chains"]["devnet"]["problem"] == "node unreachable"
            assert took <= 2 * 1.0 + 1.0, f"{took:.2f} s"  # 2 x rpc_timeout, with a margin for the test
            node.thaw()
            with trio.fail_after(20):
                while (await http.get("/readyz")).status_code != 200:
                    await trio.sleep(0.1)


async def test_a_lagging_node_is_passed_over_and_comes_back(tmp_path, anvil: Anvil):
    anvil.mine(30)
    async with fault_proxy(anvil.url) as lagging:
        cfg, api_port = node_config(tmp_path, anvil, [lagging.url, anvil.url], max_lag=5)
        lagging.lagging(20)
        async with running(cfg, api=True) as d, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api_port}", headers=AUTH, trust_env=False, timeout=10) as http:
            async def nodes():
                return {n["node"]: n for n in (await http.get("/v1/chains")).json()["items"][0]["nodes"]}

            with trio.fail_after(30):
                while (n := await nodes())[lagging.url]["state"] != "lagging":
                    await trio.sleep(0.2)
            assert n[anvil.url]["active"] and n[lagging.url]["behind"] >= 20
            await wait_until(lambda: d.store.chains.scanned_number("devnet") >= anvil.head() - 1, timeout=30,
                             what="scanning through the backup to the real head")
            lagging.lagging(None)
            with trio.fail_after(30):
                while not (n := await nodes())[lagging.url]["active"]:
                    await trio.sleep(0.2)
            assert n[lagging.url]["state"] == "up"


async def test_pushed_heads_drive_the_scan_and_a_dropped_socket_misses_no_block(tmp_path, anvil: Anvil):
    async with tcp_proxy(anvil.port) as ws:
        api_port = free_port()
        # a 30 s poll: only the pushed heads can make the scan keep up within seconds
        cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, ws_url=ws.ws_url, poll_interval=30,
                                                  confirmations=1)], api_port=api_port)
        async with running(cfg, api=True) as d, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{api_port}", headers=AUTH, trust_env=False, timeout=10) as http:
            reg = d.metrics.registry
            labels = {"chain": "devnet", "node": anvil.url}
            await wait_until(lambda: reg.get_sample_value("watcher_push_connected", labels) == 1, timeout=20,
                             what="the head subscription")
            addr = (await http.post("/v1/addresses", json={"chain": "devnet", "label": "p"})).json()["address"]
            txids = []
            for i in range(3):  # automine: each payment is a new head, pushed
                txids.append(anvil.send(anvil.accounts[1], addr, ETH + i))
                await wait_until(lambda: confirmed_once(d, txids), timeout=8, what=f"pushed payment {i}")
            assert reg.get_sample_value("watcher_push_heads_total", labels) >= 3

            # the socket drops (and the node refuses new ones for a while): blocks keep coming
            ws.refuse = True
            assert ws.cut() >= 1
            await wait_until(lambda: reg.get_sample_value("watcher_push_connected", labels) == 0, timeout=10,
                             what="the subscription seen as dropped")
            for i in range(3):
                txids.append(anvil.send(anvil.accounts[1], addr, 2 * ETH + i))
            ws.refuse = False
            await wait_until(lambda: reg.get_sample_value("watcher_push_connected", labels) == 1, timeout=30,
                             what="the subscription back")
            txids.append(anvil.send(anvil.accounts[1], addr, 3 * ETH))  # a new head: the missed ones follow
            await wait_until(lambda: confirmed_once(d, txids), timeout=10, what="every payment, once")
            assert d.store.chains.scanned_number("devnet") == anvil.head()


def test_node_config_forms_and_mistakes(tmp_path):
    from pathlib import Path

    import pytest

    from watcher.config import load_config
    from watcher.errors import ConfigError
    from watcher.plugins import chain_families, make_plugin_manager

    families = chain_families(make_plugin_manager())

    def chain(**keys):
        entry = {"id": "c", "family": "evm", **keys}
        return load_config(write_config(tmp_path, [entry]), families).chains[0]

    one = chain(rpc_url="http://a:8545", ws_url="ws://a:8546")
    assert [(n.url, n.ws_url) for n in one.nodes] == [("http://a:8545", "ws://a:8546")] and one.rpc_url == "http://a:8545"
    two = chain(rpc_urls=["http://a:8545", "https://user:secret@b.example/rpc/KEY"])
    assert [n.url for n in two.nodes] == ["http://a:8545", "https://user:secret@b.example/rpc/KEY"]
    assert two.nodes[1].name == "https://b.example"  # never the credentials or the path's key
    full = chain(nodes=[{"url": "http://a:8545", "ws_url": "wss://a/ws"}, {"url": "http://b:8545"}])
    assert [(n.url, n.ws_url) for n in full.nodes] == [("http://a:8545", "wss://a/ws"), ("http://b:8545", None)]
    for keys, where in [({}, "chains[0].rpc_url"),
                        ({"rpc_url": "http://a", "rpc_urls": ["http://b"]}, "chains[0].rpc_url"),
                        ({"rpc_urls": ["http://a", "http://b"], "ws_url": "ws://a"}, "chains[0].ws_url"),
                        ({"rpc_urls": ["http://a", "ftp://b"]}, "chains[0].rpc_urls[1]"),
                        ({"rpc_urls": ["http://a", "http://a"]}, "chains[0].rpc_urls"),
                        ({"rpc_urls": []}, "chains[0].rpc_urls"),
                        ({"rpc_url": "http://a", "ws_url": "http://a"}, "chains[0].ws_url"),
                        ({"nodes": [{"url": "http://a", "colour": "red"}]}, "chains[0].nodes[0].colour")]:
        with pytest.raises(ConfigError) as e:
            chain(**keys)
        assert str(e.value).startswith(where), (keys, str(e.value))
    # the family's own per-node keys: a bitcoin node's rpc_cookie_file (absolute); evm has none
    def ltc(nodes):
        return load_config(write_config(tmp_path, [{"id": "l", "family": "bitcoin", "network": "ltc-regtest",
                                                    "nodes": nodes}]), families).chains[0]

    both = ltc([{"url": "http://a:1", "rpc_cookie_file": "/srv/a/.cookie"}, {"url": "http://b:1"}])
    assert [n.options for n in both.nodes] == [{"rpc_cookie_file": Path("/srv/a/.cookie")}, {}]
    with pytest.raises(ConfigError, match=r"^chains\[0\]\.nodes\[0\]\.rpc_cookie_file: must be an absolute path"):
        ltc([{"url": "http://a:1", "rpc_cookie_file": "a/.cookie"}])
    with pytest.raises(ConfigError, match=r"^chains\[0\]\.nodes\[0\]\.rpc_cookie_file: unknown key"):
        chain(nodes=[{"url": "http://a:8545", "rpc_cookie_file": "/srv/a/.cookie"}])
    # a family that cannot be pushed heads refuses ws_url
    with pytest.raises(ConfigError, match="cannot be pushed new heads"):
        load_config(write_config(tmp_path, [{"id": "l", "family": "bitcoin", "network": "ltc-regtest",
                                             "rpc_url": "http://a:1", "ws_url": "ws://a:2"}]), families)
