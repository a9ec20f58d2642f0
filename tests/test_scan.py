"""Deposits on a real anvil node: detected, confirmed, exact amounts, nothing extra."""

from __future__ import annotations

import trio

from tests.support.daemon import chain_entry, running, wait_until, write_config
from tests.support.evm import Anvil, Token


def transfers(daemon, **kw):
    items, _ = daemon.views.transfers(limit=1000, **kw)
    return items


async def test_native_and_token_deposits_are_detected_and_confirmed(tmp_path, anvil: Anvil, token: Token):
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)])])
    payer, stranger = anvil.accounts[1], anvil.accounts[2]
    token.mint(payer, 10**12)
    with trio.fail_after(60):
        async with running(cfg) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            bob, _ = d.store.addresses.deposit_address("devnet", "bob")
            anvil.automine(False)
            anvil.send(payer, alice.address, 1_234_567_890_123_456_789)
            token.transfer(payer, bob.address, 12_500_000)
            anvil.send(payer, stranger, 10**18)  # not ours
            token.transfer(payer, stranger, 7)  # not ours
            anvil.mine(1)
            await wait_until(lambda: len(transfers(d)) == 2, what="two detected transfers")
            assert {t["status"] for t in transfers(d)} == {"detected"}
            anvil.mine(1)
            await wait_until(lambda: all(t["status"] == "confirmed" for t in transfers(d)), what="confirmations")
            items = {t["label"]: t for t in transfers(d)}
            assert items["alice"]["asset"] == "ETH"
            assert items["alice"]["base_units"] == "1234567890123456789"
            assert items["alice"]["amount"] == "1.234567890123456789"
            assert items["alice"]["kind"] == "native"
            assert items["bob"]["asset"] == "USDT"
            assert items["bob"]["amount"] == "12.5"
            assert items["bob"]["from"].lower() == payer.lower()
            assert items["bob"]["confirmations"] >= 2
            types = [e.type for e in d.store.events.list(limit=100)]
            assert sorted(types) == ["transfer.confirmed"] * 2 + ["transfer.detected"] * 2


async def test_reverted_transaction_with_value_is_not_credited(tmp_path, anvil: Anvil, token: Token):
    # The token contract has no receive(): a plain ETH transfer to it reverts (status 0).
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)])
    payer = anvil.accounts[1]
    with trio.fail_after(60):
        async with running(cfg) as d:
            d.store.addresses.watch_external("devnet", token.address.lower(), "token-contract")
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            bad = anvil.send(payer, token.address, 10**18, gas=100_000)
            assert int(anvil.wait_receipt(bad)["status"], 16) == 0
            good = anvil.send(payer, alice.address, 5)
            anvil.mine(3)
            await wait_until(lambda: any(t["txid"] == good for t in transfers(d)), what="the good transfer")
            await wait_until(lambda: d.store.chains.scanned_number("devnet") >= anvil.head())
            assert [t["txid"] for t in transfers(d)] == [good]
