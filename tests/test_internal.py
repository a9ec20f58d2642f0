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


async def test_a_trace_the_node_does_not_have_yet_is_fetched_again(tmp_path, anvil: Anvil):
    """Blocks, logs and traces are separate requests, which a pool or a load balancer may send
    to different replicas: one that has the block but not yet its trace answers
    ``trace_block`` with null. That was read as "no internal transfers", the block was
    stored and the cursor moved past it: the deposit was never credited. A missing trace is
    now inconsistent data, fetched again."""
    from tests.support.faultproxy import fault_proxy

    fwd = deploy(anvil, compile_contracts()["Forwarder"], [], [])
    with trio.fail_after(60):
        async with fault_proxy(anvil.url) as proxy:
            cfg = write_config(tmp_path, [chain_entry("devnet", proxy.url, trace_internal=True)])
            async with running(cfg) as d:
                alice, _ = d.store.addresses.deposit_address("devnet", "alice")
                await wait_until(lambda: d.store.chains.scanned_number("devnet") >= anvil.head(), what="at the head")
                proxy.inject("no_result", 1, method="trace_block")
                paid = anvil.send(anvil.accounts[1], fwd, 10, calldata("forward(address[],uint256[])",
                                                                       [alice.address], [10]))
                anvil.wait_receipt(paid)
                await wait_until(lambda: d.store.chains.scanned_number("devnet") >= anvil.head(), what="scanned")
                assert proxy.injected["no_result"] == 1
                items, _ = d.views.transfers(limit=10)
                assert [(t["kind"], t["base_units"], t["txid"]) for t in items] == [("internal", "10", paid)]


def test_trace_frames_of_another_block_are_inconsistent_not_empty():
    """A trace from a node on another fork names another block hash: its frames were left
    out without a word (the block stored without its internal transfers)."""
    import pytest

    from watcher.errors import InconsistentData
    from watcher_evm.client import EvmClient

    frame = {"transactionHash": "0x" + "11" * 32, "blockHash": "0x" + "bb" * 32, "traceAddress": [0],
             "type": "call", "action": {"callType": "call", "from": "0x" + "22" * 20, "to": "0x" + "33" * 20,
                                        "value": "0x5"}}
    with pytest.raises(InconsistentData, match="another block"):
        EvmClient._internal_transfers(object.__new__(EvmClient), [frame], "0x" + "aa" * 32)

