"""Reorgs on a real anvil node (anvil_reorg): orphaned deposits become `orphaned`, deposits
re-included in the new chain end `confirmed` exactly once, confirmations follow the
canonical chain only."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from tests.support.daemon import chain_entry, running, wait_until, write_config
from tests.support.evm import Anvil, Token


def by_txid(daemon) -> dict[str, dict]:
    items, _ = daemon.views.transfers(limit=1000)
    return {t["txid"]: t for t in items}


def event_types(daemon, subject: str) -> list[str]:
    return [e.type for e in daemon.store.events.list(subject=subject, limit=100)]


@pytest.mark.parametrize("depth", [1, 3, 10])
async def test_reorg_orphans_dropped_and_confirms_reincluded_once(tmp_path, anvil: Anvil, token: Token, depth: int):
    # More confirmations than the reorg depth: nothing in the replaced blocks is confirmed yet.
    conf = depth + 2
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                              confirmations=conf, finality_depth=64)])
    # one sender each: the dropped tx must not leave a nonce gap for the re-included ones
    payer, payer2, payer3 = anvil.accounts[1:4]
    token.mint(payer3, 10**12)
    with trio.fail_after(90):
        async with running(cfg) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            bob, _ = d.store.addresses.deposit_address("devnet", "bob")
            carol, _ = d.store.addresses.deposit_address("devnet", "carol")
            anvil.automine(False)
            dropped = anvil.send(payer, alice.address, 10**18)  # vanishes with its block
            kept = anvil.send(payer2, bob.address, 2 * 10**18)  # re-included in the new chain
            kept_token = token.transfer(payer3, carol.address, 3_000_000)  # re-included too
            anvil.mine(1)
            anvil.mine(depth - 1) if depth > 1 else None
            raw_kept, raw_token = anvil.raw_tx(kept), anvil.raw_tx(kept_token)
            head_before = anvil.head()
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == head_before, what="scan to head")
            assert {t["status"] for t in by_txid(d).values()} == {"detected"}
            old_block = by_txid(d)[kept]["block_hash"]

            anvil.reorg(depth, [(raw_kept, 0), (raw_token, depth - 1)])
            await wait_until(lambda: by_txid(d)[dropped]["status"] == "orphaned", what="orphaned deposit")
            anvil.mine(conf + 1)
            await wait_until(lambda: by_txid(d)[kept]["status"] == "confirmed"
                             and by_txid(d)[kept_token]["status"] == "confirmed", what="re-included confirmed")
            anvil.mine(3)
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())

            t = by_txid(d)
            assert len(t) == 3
            assert t[dropped]["status"] == "orphaned"
            assert t[dropped]["confirmations"] == 0
            assert t[kept]["block_hash"] != old_block
            assert t[kept]["block_hash"] == anvil.receipt(kept)["blockHash"]
            assert t[kept]["amount"] == "2" and t[kept_token]["amount"] == "3"
            assert event_types(d, t[dropped]["id"]) == ["transfer.detected", "transfer.orphaned"]
            for txid in (kept, kept_token):
                assert event_types(d, t[txid]["id"]) == [
                    "transfer.detected", "transfer.orphaned", "transfer.detected", "transfer.confirmed"]
            all_types = Counter(e.type for e in d.store.events.list(limit=1000))
            assert all_types["transfer.confirmed"] == 2
            assert d.metrics.registry.get_sample_value("watcher_reorgs_total", {"chain": "devnet"}) >= 1


async def test_a_batch_transfer_mined_again_at_other_log_indexes_credits_each_recipient_once(
        tmp_path, anvil: Anvil, token: Token):
    """A token transfer is keyed (txid, log index), and a log's index counts from the start of
    its block: one transaction paying alice then bob, mined first behind another token log
    (indexes 1 and 2) and again after a reorg at the head of a block (0 and 1). The row at
    index 1 was alice's; mined again it is bob's. The stored row kept alice and 100, so alice
    was credited twice and bob never. A row found again takes what the new block says."""
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                              confirmations=2, finality_depth=64)])
    payer, other = anvil.accounts[3], anvil.accounts[4]
    token.mint(payer, 10**12)
    token.mint(other, 10**12)
    with trio.fail_after(60):
        async with running(cfg) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            bob, _ = d.store.addresses.deposit_address("devnet", "bob")
            anvil.automine(False)
            token.transfer(other, anvil.accounts[9], 1)  # a log ahead of the batch in its first block
            batch = token.transfer_many(payer, [(alice.address, 100_000_000), (bob.address, 50_000_000)])
            anvil.mine(1)
            assert [int(lg["logIndex"], 16) for lg in anvil.receipt(batch)["logs"]] == [1, 2]
            await wait_until(lambda: len(d.views.transfers()[0]) == 2, what="both recorded")
            anvil.reorg(1, [(anvil.raw_tx(batch), 0)])
            assert [int(lg["logIndex"], 16) for lg in anvil.receipt(batch)["logs"]] == [0, 1]
            d.watchers["devnet"].poke()

            def credited() -> dict[str, list[str]] | None:
                anvil.mine(1)
                rows = d.views.transfers(status="confirmed")[0]
                got: dict[str, list[str]] = {}
                for r in rows:
                    got.setdefault(r["address"].lower(), []).append(r["amount"])
                return got if len(rows) >= 2 else None

            got = await wait_until(credited, interval=0.3, what="the batch confirmed again")
            assert got == {alice.address.lower(): ["100"], bob.address.lower(): ["50"]}, got
            assert sum(int(r["base_units"]) for r in d.views.transfers(status="confirmed")[0]) == 150_000_000


async def test_confirmed_deposit_orphaned_by_deeper_reorg(tmp_path, anvil: Anvil):
    """confirmations < depth: a confirmed transfer is orphaned (its event says so) and, once
    re-included, is confirmed again for the new inclusion."""
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, confirmations=2)])
    payer = anvil.accounts[1]
    with trio.fail_after(60):
        async with running(cfg) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            anvil.automine(False)
            txid = anvil.send(payer, alice.address, 7)
            anvil.mine(4)
            await wait_until(lambda: by_txid(d).get(txid, {}).get("status") == "confirmed", what="confirmed")
            raw = anvil.raw_tx(txid)
            anvil.reorg(4, [(raw, 2)])
            await wait_until(lambda: by_txid(d)[txid]["status"] == "orphaned"
                             or "transfer.orphaned" in event_types(d, by_txid(d)[txid]["id"]), what="orphaned")
            anvil.mine(3)
            await wait_until(lambda: by_txid(d)[txid]["status"] == "confirmed"
                             and by_txid(d)[txid]["block_hash"] == anvil.receipt(txid)["blockHash"], what="re-confirmed")
            assert event_types(d, by_txid(d)[txid]["id"]) == [
                "transfer.detected", "transfer.confirmed", "transfer.orphaned", "transfer.detected", "transfer.confirmed"]


async def test_confirmations_count_canonical_chain_only(tmp_path, anvil: Anvil):
    """A deposit in a block replaced by a same-height fork must not keep counting
    confirmations on blocks that are no longer canonical."""
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, confirmations=5)])
    payer = anvil.accounts[1]
    with trio.fail_after(60):
        async with running(cfg) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            anvil.automine(False)
            txid = anvil.send(payer, alice.address, 9)
            anvil.mine(3)  # 3 confirmations
            await wait_until(lambda: by_txid(d).get(txid, {}).get("confirmations") == 3, what="3 confirmations")
            anvil.reorg(3, [])  # same height, the deposit is gone
            await wait_until(lambda: by_txid(d)[txid]["status"] == "orphaned", what="orphaned")
            anvil.mine(10)
            await wait_until(lambda: d.store.chains.scanned_number("devnet") == anvil.head())
            t = by_txid(d)[txid]
            assert t["status"] == "orphaned" and t["confirmations"] == 0
            assert "transfer.confirmed" not in event_types(d, t["id"])
