"""The scanner's edges: pruning old block hashes, catch-up progress, reorgs deeper than the
finality depth, a node that serves another chain."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import trio

from tests.support.daemon import chain_entry, free_port, running, wait_until, write_config
from tests.support.evm import Anvil
from watcher.errors import ChainMismatch
from watcher.scanner import ProgressMeter


async def test_block_hashes_older_than_finality_are_pruned(tmp_path, anvil: Anvil):
    anvil.mine(120)
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, confirmations=3, finality_depth=20, batch_size=16)])
    with trio.fail_after(60):
        async with running(cfg) as d:
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
            anvil.mine(30)
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
            kept = d.store.chains.recent_blocks("devnet")
            tip = anvil.head()
            assert max(kept) == tip
            # contiguous: the finality window and its parent (the ancestor of a reorg of exactly 20)
            assert min(kept) == tip - 20 and len(kept) == 21


async def test_catch_up_logs_progress_with_rate_and_eta(tmp_path, anvil: Anvil, caplog):
    anvil.mine(600)
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, batch_size=10)])
    caplog.set_level(logging.INFO, logger="watcher.scanner")
    with trio.fail_after(60):
        async with running(cfg) as d:
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
            await trio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "watcher.scanner"]
    assert any("caught up at block 600" in line and "blocks/s" in line for line in lines), lines


def test_progress_meter_reports_rate_and_eta():
    m = ProgressMeter(every=5)
    assert m.update(100, 1.0, 10_000, 100, far=True, now=1.0) is None  # first line after `every` seconds
    line = m.update(100, 1.0, 10_000, 200, far=True, now=6.0)
    assert line == "catching up: block 200 of 10000 (33 blocks/s, 9800 behind, ETA 4m54s)"
    assert m.update(100, 1.0, 10_000, 300, far=True, now=7.0) is None
    assert m.update(9600, 1.0, 10_000, 9_900, far=False, now=8.0) is None  # close, not there yet
    done = m.update(100, 1.0, 10_000, 10_000, far=False, now=20.0)
    assert done.startswith("caught up at block 10000: 10000 blocks in 20.0s")
    assert m.update(1, 0.1, 10_001, 10_001, far=False, now=21.0) is None  # following the head: silent


async def test_reorg_deeper_than_finality_halts_only_that_chain(tmp_path, anvil: Anvil):
    other = Anvil(chain_id=31338)
    other.start()
    try:
        cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, confirmations=2, finality_depth=4),
                                      chain_entry("other", other.url)])
        with trio.fail_after(60):
            async with running(cfg, api=False) as d:
                anvil.mine(20)
                await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
                anvil.reorg(10, [])
                await wait_until(lambda: d.watchers["devnet"].status.halted, what="halt")
                assert "finality depth 4" in d.watchers["devnet"].status.halted
                assert d.metrics.registry.get_sample_value("watcher_chain_halted", {"chain": "devnet"}) == 1
                # nothing was rolled back on a guess
                assert d.store.chains.scanned_number("devnet") == 20
                # the other chain goes on
                w, _ = d.store.addresses.deposit_address("other", "alice")
                tx = other.send(other.accounts[1], w.address, 5)
                other.mine(2)
                await wait_until(lambda: d.views.transfers(chain="other")[0], what="other chain deposit")
                assert d.views.transfers(chain="other")[0][0]["txid"] == tx
    finally:
        other.close()


def test_node_of_another_chain_stops_startup(tmp_path, anvil: Anvil):
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, chain_id=1)])
    r = subprocess.run([sys.executable, "-m", "watcher", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "serves chain id 31337, config says chain_id = 1" in r.stderr


async def test_database_refuses_a_node_of_another_chain_later(tmp_path, anvil: Anvil):
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)])
    with trio.fail_after(30):
        async with running(cfg, api=False) as d:
            await wait_until(lambda: d.watchers["devnet"].status.node_up)
    other = Anvil(chain_id=5)
    other.start()
    try:
        cfg = write_config(tmp_path, [chain_entry("devnet", other.url)])
        with pytest.raises(BaseExceptionGroup) as exc, trio.fail_after(30):
            async with running(cfg, api=False):
                pass
        assert "reports chain_id = 5" in repr(exc.value) and "chain_id = 31337" in repr(exc.value)
    finally:
        other.close()


async def test_a_node_of_another_chain_found_after_start_up_halts_the_chain_with_the_same_message(tmp_path,
                                                                                                anvil: Anvil):
    """The node was down at start-up (preflight only warned) and comes back serving another
    chain: the scanner's check halts the chain with the message preflight gives (one check,
    naming the node)."""
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)])
    with trio.fail_after(30):
        async with running(cfg, api=False) as d:
            await wait_until(lambda: d.watchers["devnet"].status.node_up)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = write_config(tmp_path, [chain_entry("devnet", url)])
    with trio.fail_after(60):
        async with running(cfg, api=False) as d:
            assert d.watchers["devnet"].status.halted is None
            other = Anvil(chain_id=5, port=port)
            other.start()
            try:
                halted = await wait_until(lambda: d.watchers["devnet"].status.halted, what="the chain halted")
                assert f"the node at {url} reports chain_id = 5" in halted and "chain_id = 31337" in halted
                with pytest.RaisesGroup(pytest.RaisesExc(ChainMismatch, check=lambda e: str(e) == halted)):
                    await d.preflight()
            finally:
                other.close()


async def test_reorg_of_exactly_the_finality_depth_is_followed(tmp_path, anvil: Anvil):
    """finality_depth 4: a reorg replacing the last 4 blocks is the deepest we promise to follow;
    its common ancestor sits just below the window and must still be kept (found by the
    crash-and-reorg soak: the scanner halted as if the reorg were deeper)."""
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, confirmations=2, finality_depth=4)])
    with trio.fail_after(60):
        async with running(cfg, api=False) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            anvil.automine(False)
            anvil.mine(20)
            tx = anvil.send(anvil.accounts[1], alice.address, 5)
            anvil.mine(4)
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
            assert d.views.transfers()[0][0]["status"] == "confirmed"
            anvil.reorg(4)  # replaces the deposit's block and the 3 after it
            await wait_until(lambda: d.views.transfers()[0][0]["status"] == "orphaned", what="orphaned")
            anvil.mine(2)
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
            assert d.watchers["devnet"].status.halted is None
            assert anvil.receipt(tx) is None
