"""trace_block-based detection of internal ETH transfers (contract wallets paying out)."""

from __future__ import annotations

import trio

from tests.support.daemon import chain_entry, running, wait_until, write_config
from tests.support.evm import Anvil, calldata, compile_contracts, deploy


async def test_internal_transfers_found_by_tracing(tmp_path, anvil: Anvil):
    fwd = deploy(anvil, compile_contracts()["Forwarder"], [], [])
    payer = anvil.accounts[1]
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, trace_internal=True)])
    with trio.fail_after(60):
        async with running(cfg) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            bob, _ = d.store.addresses.deposit_address("devnet", "bob")
            carol, _ = d.store.addresses.deposit_address("devnet", "carol")
            anvil.automine(False)
            paid = anvil.send(payer, fwd, 30, calldata("forward(address[],uint256[])", [alice.address, bob.address], [10, 20]))
            reverted = anvil.send(payer, fwd, 5, calldata("forwardThenRevert(address)", carol.address), gas=200_000)
            inner = anvil.send(payer, fwd, 6, calldata("forwardInFailingFrame(address)", carol.address), gas=200_000)
            direct = anvil.send(payer, carol.address, 7)  # a plain transfer: native, not internal
            anvil.mine(3)
            assert int(anvil.receipt(reverted)["status"], 16) == 0
            assert int(anvil.receipt(inner)["status"], 16) == 1
            await wait_until(lambda: d.store.chains.scanned_number("devnet") >= anvil.head())
            items, _ = d.views.transfers(limit=100)
            got = sorted((t["label"], t["kind"], t["base_units"], t["txid"]) for t in items)
            assert got == sorted([
                ("alice", "internal", "10", paid),
                ("bob", "internal", "20", paid),
                ("carol", "native", "7", direct),
            ])
            assert all(t["index"] <= -2 for t in items if t["kind"] == "internal")


async def test_internal_transfers_ignored_when_tracing_is_off(tmp_path, anvil: Anvil):
    fwd = deploy(anvil, compile_contracts()["Forwarder"], [], [])
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)])
    with trio.fail_after(60):
        async with running(cfg) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            anvil.send(anvil.accounts[1], fwd, 10, calldata("forward(address[],uint256[])", [alice.address], [10]))
            anvil.mine(2)
            await wait_until(lambda: d.store.chains.scanned_number("devnet") >= anvil.head())
            assert d.views.transfers()[0] == []
            assert anvil.balance(alice.address) == 10  # it did arrive; watcher was told not to look
