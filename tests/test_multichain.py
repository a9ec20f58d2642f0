"""Several chains at once: each has its own task; a dead or hung node never stalls another."""

from __future__ import annotations

import trio

from tests.support.daemon import chain_entry, running, wait_until, write_config
from tests.support.evm import Anvil


def statuses(d, chain):
    items, _ = d.views.transfers(chain=chain, limit=100)
    return {t["txid"]: t["status"] for t in items}


async def test_two_nodes_one_stopped_and_restarted(tmp_path):
    a = Anvil(chain_id=31337, state=tmp_path / "a-state.json")
    b = Anvil(chain_id=31338)
    a.start()
    b.start()
    try:
        cfg = write_config(tmp_path / "w", [
            chain_entry("alpha", a.url, chain_id=31337, rpc_timeout=1.0),
            chain_entry("beta", b.url, chain_id=31338, rpc_timeout=1.0),
        ])
        with trio.fail_after(120):
            async with running(cfg, api=False) as d:
                wa, _ = d.store.addresses.deposit_address("alpha", "alice")
                wb, _ = d.store.addresses.deposit_address("beta", "alice")
                assert wa.address == wb.address  # one label, one address on every EVM chain
                ta = a.send(a.accounts[1], wa.address, 11)
                tb = b.send(b.accounts[1], wb.address, 22)
                a.mine(2)
                b.mine(2)
                await wait_until(lambda: statuses(d, "alpha").get(ta) == "confirmed", what="alpha deposit")
                await wait_until(lambda: statuses(d, "beta").get(tb) == "confirmed", what="beta deposit")
                assert tb not in statuses(d, "alpha") and ta not in statuses(d, "beta")

                # 1. alpha hangs (SIGSTOP): beta keeps going
                a.pause()
                tb2 = b.send(b.accounts[1], wb.address, 33)
                b.mine(2)
                await wait_until(lambda: statuses(d, "beta").get(tb2) == "confirmed", what="beta while alpha hangs")
                await wait_until(lambda: not d.watchers["alpha"].status.node_up, what="alpha marked down")
                a.resume()
                await wait_until(lambda: d.watchers["alpha"].status.node_up, what="alpha back up")

                # 2. alpha stops (its state is saved) and comes back on the same port
                port = a.port
                a.stop()
                tb3 = b.send(b.accounts[1], wb.address, 44)
                b.mine(2)
                await wait_until(lambda: statuses(d, "beta").get(tb3) == "confirmed", what="beta while alpha is down")
                await wait_until(lambda: not d.watchers["alpha"].status.node_up, what="alpha marked down")
                assert d.watchers["alpha"].status.error
                errors = d.metrics.registry.get_sample_value(
                    "watcher_rpc_errors_total", {"chain": "alpha", "method": "eth_blockNumber", "kind": "connect"})
                assert errors and errors >= 1

                a.port = port
                a.start()
                ta2 = a.send(a.accounts[1], wa.address, 55)
                a.mine(2)
                await wait_until(lambda: statuses(d, "alpha").get(ta2) == "confirmed", timeout=40,
                                 what="alpha deposit after restart")
                assert d.watchers["alpha"].status.node_up and not d.watchers["alpha"].status.halted
                assert set(statuses(d, "alpha")) == {ta, ta2}
                assert set(statuses(d, "beta")) == {tb, tb2, tb3}
    finally:
        a.close()
        b.close()
