"""Operating a Bitcoin-family chain: ``watcher status`` shows the hot wallet's coins, and
``watcher reconcile`` compares, output by output, the confirmed deposits no sweep spent with
the node's UTXO set, and finds a deposit someone else spent with the key (here: the test,
signing with the seed's key outside watcher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from tests.support.daemon import TEST_MNEMONIC, running, wait_until, write_config
from tests.support.litecoin import COIN, Litecoind
from watcher.keys import Keyring
from watcher_bitcoin import tx as btx
from watcher_bitcoin.address import to_script
from watcher_bitcoin.networks import NETWORKS

LTC = NETWORKS["ltc-regtest"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcher", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


async def test_reconcile_compares_unspent_outputs_and_finds_a_deposit_spent_outside(tmp_path, litecoind: Litecoind):
    node = litecoind
    node.payer  # noqa: B018
    entry = {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": node.url, "confirmations": 2,
             "start_block": node.head() + 1, "poll_interval": 0.1, "mempool": False}
    cfg = write_config(tmp_path, [entry])
    with trio.fail_after(90):
        async with running(cfg) as d:
            alice, _ = d.store.addresses.deposit_address("ltc", "alice")
            bob, _ = d.store.addresses.deposit_address("ltc", "bob")
            node.send(d.store.hot_wallet("ltc"), 7 * COIN)  # the hot wallet's funding
            first = node.send(alice.address, COIN)
            node.send(alice.address, 2 * COIN)
            node.send(bob.address, 3 * COIN)
            node.mine(3)
            await wait_until(lambda: d.store.db.scalar("SELECT count(*) FROM transfers WHERE status = 'confirmed'")
                             == 4, what="three confirmed deposits and the hot wallet's funding")
    r = await trio.to_thread.run_sync(lambda: cli("reconcile", "--json", "-c", str(cfg), cwd=tmp_path))
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"], r.stdout
    lines = {line["label"]: line for line in report["lines"]}
    assert (lines["alice"]["expected"], lines["alice"]["actual"], lines["alice"]["status"]) == ("3", "3", "ok")
    assert (lines["bob"]["expected"], lines["bob"]["status"]) == ("3", "ok")

    # status: the hot wallet's balance is its own coins (no UTXO-set scan), the node is up
    r = await trio.to_thread.run_sync(lambda: cli("status", "--json", "-c", str(cfg), cwd=tmp_path))
    ltc = json.loads(r.stdout)["chains"]["ltc"]
    assert r.returncode == 0 and ltc["hot_wallet"]["balances"] == {"LTC": "7"}, r.stdout

    # someone with the key spends alice's first deposit without watcher
    vout = next(o["n"] for o in node.rpc("getrawtransaction", first, True)["vout"]
                if o["scriptPubKey"]["hex"] == to_script(LTC, alice.address).hex())
    secret = Keyring.from_mnemonic(TEST_MNEMONIC).private_key("m/84'/1'/0'", alice.derivation_index)
    coin = btx.Coin(txid=first, vout=vout, value=COIN, script=to_script(LTC, alice.address))
    away = to_script(LTC, node.rpc("getnewaddress", "", "bech32", wallet="payer"))
    spent = node.rpc("sendrawtransaction", btx.sign(btx.build([coin], [btx.Output(away, COIN - 10_000)]),
                                                     [secret]).hex())
    node.mine(3)
    assert node.rpc("getrawtransaction", spent, True)["confirmations"] == 3
    r = await trio.to_thread.run_sync(lambda: cli("reconcile", "-c", str(cfg), cwd=tmp_path))
    assert r.returncode == 1, r.stdout
    assert "mismatch" in r.stdout and "difference -1" in r.stdout and "(alice)" in r.stdout
    assert "1 balance(s) match, 1 problem(s)" in r.stdout
