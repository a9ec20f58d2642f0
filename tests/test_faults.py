"""The daemon behind an unreliable node: a fault-injecting JSON-RPC proxy (tests/support/
faultproxy.py) between watcher and a real anvil node. Latency, dropped connections, 5xx, 429,
truncated and malformed answers, a lagging replica, a node gone for minutes: the daemon
rides them out and ends with exactly the transfers and events of an untroubled run, which
the test computes from the transactions it sent itself, never from the daemon."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry
from trio.testing import MockClock

from tests.support.daemon import (
    AUTH,
    chain_entry,
    free_port,
    running,
    wait_until,
    write_config,
)
from tests.support.evm import Anvil, Token, calldata
from tests.support.faultproxy import BAD_RESULTS, DEFAULT_MIX, MALFORMED, FaultProxy, fault_proxy
from watcher.clock import TrioClock
from watcher.daemon import Daemon
from watcher.errors import NodeError
from watcher.jsonrpc import JsonRpc, RetryPolicy

NATIVE = "ETH"
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


class Ledger:
    """What the test itself sent: the transfers a correct watcher must end with."""

    def __init__(self, anvil: Anvil, token: Token):
        self.anvil = anvil
        self.token = token
        self.native: dict[str, tuple[str, int]] = {}  # txid -> (to, amount)
        self.tokens: dict[str, tuple[str, int]] = {}
        self.decoys: list[str] = []  # txs that must credit nothing

    def pay(self, sender: str, to: str, amount: int) -> None:
        self.native[self.anvil.send(sender, to, amount)] = (to.lower(), amount)

    def pay_token(self, sender: str, to: str, amount: int) -> None:
        self.tokens[self.token.transfer(sender, to, amount)] = (to.lower(), amount)

    def mint(self, to: str, amount: int) -> None:
        self.tokens[self.token.mint(to, amount)] = (to.lower(), amount)

    def decoy_reverted_token(self, sender: str, to: str) -> None:
        """A token transfer to a watched address that reverts (more than the sender holds):
        explicit gas, so the node includes it without estimating."""
        data = calldata("transfer(address,uint256)", to, 10**30)
        self.decoys.append(self.anvil.send(sender, self.token.address, 0, data, gas=100_000))

    def decoy(self, txid: str) -> None:
        self.decoys.append(txid)

    def expected(self) -> dict[tuple[str, int], tuple[str, str, int, str]]:
        """(txid, index) -> (address, asset, base units, status), from the node's receipts."""
        out: dict[tuple[str, int], tuple[str, str, int, str]] = {}
        for txid, (to, amount) in self.native.items():
            assert int(self.anvil.receipt(txid)["status"], 16) == 1
            out[(txid, -1)] = (to, NATIVE, amount, "confirmed")
        for txid, (to, amount) in self.tokens.items():
            logs = [lg for lg in self.anvil.receipt(txid)["logs"]
                    if lg["topics"][0] == TRANSFER_TOPIC and lg["topics"][2][-40:] == to[2:]]
            assert len(logs) == 1 and int(logs[0]["data"], 16) == amount
            out[(txid, int(logs[0]["logIndex"], 16))] = (to, "USDT", amount, "confirmed")
        for txid in self.decoys:
            assert self.anvil.receipt(txid) is not None  # mined, and still must credit nothing
        return out


def transfers(d) -> dict[tuple[str, int], tuple[str, str, int, str]]:
    items, _ = d.views.transfers(chain="devnet", limit=10_000)
    out = {(t["txid"], t["index"]): (t["address"].lower(), t["asset"], int(t["base_units"]), t["status"])
           for t in items}
    assert len(out) == len(items), "a transfer was stored twice"
    return out


def events_by_transfer(d) -> dict[tuple[str, int], list[str]]:
    items, _ = d.views.transfers(chain="devnet", limit=10_000)
    return {(t["txid"], t["index"]): [e.type for e in d.store.events.list(subject=t["id"], limit=100)]
            for t in items}


def rpc_errors(d) -> Counter[str]:
    """watcher_rpc_errors_total for the chain, summed by kind."""
    out: Counter[str] = Counter()
    for metric in d.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "watcher_rpc_errors_total" and s.labels.get("chain") == "devnet":
                out[s.labels["kind"]] += int(s.value)
    return out


def metric(d, name: str, **labels: str) -> float:
    return d.metrics.registry.get_sample_value(name, {"chain": "devnet", **labels}) or 0.0


def scanned(d) -> int:
    return d.store.chains.scanned_number("devnet")


def config(tmp_path: Path, proxy: FaultProxy, token: Token, *, api_port: int | None = None, **extra: Any) -> Path:
    entry = chain_entry("devnet", proxy.url, tokens=[("USDT", token.address, 6)], confirmations=2, **extra)
    return write_config(tmp_path, [entry], api_port=api_port or free_port())


def derive(cfg: Path, n: int) -> list[str]:
    """Deposit addresses registered before the daemon first scans (so the history it catches
    up on already pays them)."""
    d = Daemon.open(cfg, registry=CollectorRegistry())
    try:
        return [d.store.addresses.deposit_address("devnet", f"user-{i}")[0].address for i in range(n)]
    finally:
        d.close()


async def ends_exactly(d, anvil: Anvil, ledger: Ledger, *, timeout: float) -> None:
    """Wait until the daemon holds exactly the transfers the test sent, all confirmed, at the
    node's head; then check them and their events against an untroubled run."""
    expected = ledger.expected()
    with trio.move_on_after(timeout):  # on timeout, the comparison below names what differs
        await wait_until(lambda: scanned(d) == anvil.head() and transfers(d) == expected, timeout=timeout + 1)
    got = transfers(d)
    missing = {k: v for k, v in expected.items() if got.get(k) != v}
    extra = {k: v for k, v in got.items() if k not in expected}
    assert not missing and not extra, f"missing or different: {missing}\nunexpected: {extra}"
    assert scanned(d) == anvil.head()
    # the events of an untroubled run: each transfer detected once, confirmed once, nothing else
    assert events_by_transfer(d) == {k: ["transfer.detected", "transfer.confirmed"] for k in expected}
    types = Counter(e.type for e in d.store.events.list(limit=100_000))
    assert types == {"transfer.detected": len(expected), "transfer.confirmed": len(expected)}, types
    assert metric(d, "watcher_reorgs_total") == 0


async def test_every_garbage_answer_is_a_node_error(tmp_path, anvil: Anvil, token: Token):
    """Each kind of malformed answer (not JSON, JSON that answers nothing, ids that are not
    ours or cannot be ids, a batch answer short of an element) fails the exchange with a
    NodeError, which callers retry and back off from; so does each result of the wrong type
    in each chain client call. Nothing else may escape: it would end the chain's task."""
    token.mint(anvil.accounts[1], 10**6)
    txid = anvil.send(anvil.accounts[1], anvil.accounts[2], 5)
    with trio.fail_after(60):
        async with fault_proxy(anvil.url, seed=5) as proxy:
            cfg = config(tmp_path, proxy, token)
            d = Daemon.open(cfg, registry=CollectorRegistry())
            try:
                rpc = JsonRpc(proxy.url, chain="devnet", metrics=d.metrics, retry=RetryPolicy(attempts=1))
                try:
                    for name in MALFORMED:
                        proxy.malformed = (name,)
                        proxy.inject("malformed")
                        with pytest.raises(NodeError):
                            await rpc.batch([("eth_blockNumber", ()), ("eth_chainId", ())])
                finally:
                    await rpc.aclose()
                assert set(proxy.variants) == set(MALFORMED)
                assert rpc_errors(d)["decode"] == len(MALFORMED)

                head, hot = anvil.head(), anvil.accounts[3]
                usdt = d.config.chain("devnet").asset("USDT")
                async with d.watchers["devnet"].open_client() as client:
                    calls = {
                        "check": client.check, "head": client.head,
                        "block_hashes": lambda: client.block_hashes([1, head]),
                        "fetch_blocks": lambda: client.fetch_blocks(1, head, set),  # every recipient watched
                        "lookup_tx": lambda: client.lookup_tx(txid, set), "tx_status": lambda: client.tx_statuses([txid]),
                        "nonce": lambda: client.nonce(hot), "balance": lambda: client.balance(hot, usdt),
                        "fee_quote": client.fee_quote,
                    }
                    failed = 0
                    for value in BAD_RESULTS:
                        proxy.bad_results = (value,)
                        for call in calls.values():
                            proxy.clear()
                            proxy.inject("bad_result", times=2)
                            # a call may get through (a fee history of the wrong shape is
                            # skipped for the gas price), but may fail with nothing else
                            try:
                                await call()
                            except NodeError:
                                failed += 1
                    assert failed >= 0.8 * len(BAD_RESULTS) * len(calls), failed
            finally:
                d.close()


async def test_a_logs_range_learnt_from_a_refusal_is_tried_wide_again(tmp_path, anvil: Anvil, token: Token):
    """A node that refuses an eth_getLogs range as too large makes the client split it and
    remember the width that worked. The refusal may have come from one replica behind a load
    balancer, or a moment of trouble: the full width is tried again now and then, so one
    refusal does not leave every later request narrow for good."""
    anvil.mine(40)
    with trio.fail_after(60):
        async with fault_proxy(anvil.url) as proxy:
            d = Daemon.open(config(tmp_path, proxy, token), registry=CollectorRegistry())
            try:
                async with d.watchers["devnet"].open_client() as client:
                    proxy.rpc_error = (-32005, "query exceeds the max block range")
                    proxy.inject("rpc_error", RetryPolicy().attempts, method="eth_getLogs")  # each retry too
                    per_call = []
                    for _ in range(40):
                        before = proxy.methods["eth_getLogs"]
                        assert len(await client.fetch_blocks(1, 40, set)) == 40
                        per_call.append(proxy.methods["eth_getLogs"] - before)
            finally:
                d.close()
    assert per_call[0] == RetryPolicy().attempts + 2, per_call  # refused, then two halves
    assert per_call[1:4] == [2, 2, 2], per_call  # the width that worked is remembered...
    assert per_call[-4:] == [1, 1, 1, 1], per_call  # ...until the full width worked again


MIX = {**DEFAULT_MIX, "bad_result": 1.5}


@pytest.mark.parametrize(("seed", "rate"), [(7, 0.25), pytest.param(8, 0.4, marks=pytest.mark.slow)])
async def test_random_faults_end_exactly_like_a_clean_run(tmp_path, anvil: Anvil, token: Token, seed: int,
                                                          rate: float):
    """A quarter (or more) of all requests faulty, every kind at least once, through catch-up
    and head following, with a short outage on top: the end state is exactly the transfers
    sent, each detected and confirmed once."""
    payers = anvil.accounts[1:5]
    for p in payers:
        token.mint(p, 10**12)
    stranger = "0x" + "5e" * 20  # not watched
    with trio.fail_after(150):
        async with fault_proxy(anvil.url, seed=seed) as proxy:
            proxy.stall = 1.6  # longer than rpc_timeout: the client times out
            cfg = config(tmp_path, proxy, token, batch_size=10, rpc_timeout=1.0)
            users = derive(cfg, 8)
            ledger = Ledger(anvil, token)
            anvil.automine(False)
            # history the daemon catches up on (batches fetched ahead, under faults)
            for i in range(12):
                ledger.pay(payers[i % 4], users[i % 8], 10**15 * (i + 1) + i)
                ledger.pay_token(payers[(i + 1) % 4], users[(i + 3) % 8], 1_000_000 * (i + 1) + i)
                if i % 4 == 0:
                    ledger.mint(users[(i + 5) % 8], 777_000 + i)
                anvil.mine(1)
                anvil.mine(4)
            ledger.decoy(anvil.send(payers[0], stranger, 10**15))
            ledger.decoy(token.transfer(payers[1], stranger, 5))
            ledger.decoy(anvil.send(payers[2], users[0], 0))  # no value: not a deposit
            ledger.decoy_reverted_token(anvil.accounts[6], users[1])
            anvil.mine(1)
            assert int(anvil.receipt(ledger.decoys[-1])["status"], 16) == 0

            proxy.random_faults(rate, MIX)
            async with running(cfg) as d:
                kinds = list(MIX)  # and every kind at least once, whatever the dice say
                proxy.rng.shuffle(kinds)
                for k in kinds:
                    # a stall on a call made alone: the client must time out on it, not be
                    # cancelled because another part of a fetch failed first
                    proxy.inject(k, method="eth_blockNumber" if k == "stall" else None)
                await wait_until(lambda: scanned(d) == anvil.head(), timeout=60, what="catch-up under faults")
                # following the head, a block at a time
                for i in range(8):
                    ledger.pay(payers[i % 4], users[(i + 2) % 8], 3 * 10**15 + i)
                    ledger.pay_token(payers[(i + 2) % 4], users[(i + 6) % 8], 2_000_000 + i)
                    anvil.mine(1)
                    head = anvil.head()
                    await wait_until(lambda h=head: scanned(d) >= h, timeout=30, what=f"block {head} scanned")
                # a short outage: every connection closed unanswered
                proxy.go_down(refuse=False)
                ledger.pay(payers[3], users[7], 4 * 10**15)
                ledger.pay_token(payers[0], users[6], 4_000_000)
                anvil.mine(1)
                await wait_until(lambda: proxy.injected["down"] >= 3, what="requests refused while down")
                proxy.come_up()
                anvil.mine(2)
                assert len(ledger.native) + len(ledger.tokens) == 45
                await ends_exactly(d, anvil, ledger, timeout=60)

                # the faults really happened, and the daemon saw them
                injected = proxy.injected
                assert all(injected[k] >= 1 for k in MIX), injected
                assert sum(injected[k] for k in MIX) >= 0.6 * rate * proxy.requests, (injected, proxy.requests)
                errors = rpc_errors(d)
                print(f"\nrandom faults ({rate:.0%}): {proxy.requests} requests, injected {dict(injected)}, "
                      f"daemon RPC errors {dict(errors)}")
                # (a fault answered to a request the daemon had already given up on is not counted)
                assert 0 < errors["http"] <= sum(injected[k] for k in ("http_500", "http_502", "http_503", "http_429"))
                assert errors["connect"] >= 1 and errors["decode"] >= 1 and errors["timeout"] >= 1, errors
                assert metric(d, "watcher_chain_node_up") == 1


async def test_lagging_replica_is_no_reorg(tmp_path, anvil: Anvil, token: Token):
    """The node appears to go back 5 blocks (a lagging replica answers); then a load balancer
    sends each request to a fresh or a lagging replica; then only the logs come from the lagging
    one, which refuses them; then it is fresh again. No reorg, nothing orphaned, the scanned
    height never goes down, no deposit is missed (blocks from the fresh replica with logs from
    the lagging one look like blocks without deposits), catching up afterwards is as fast as
    before, and every deposit ends confirmed exactly once."""
    lag = 5
    payers = anvil.accounts[1:5]
    for p in payers:
        token.mint(p, 10**12)
    port = free_port()
    with trio.fail_after(120):
        async with fault_proxy(anvil.url, seed=11) as proxy:
            cfg = config(tmp_path, proxy, token, api_port=port)
            async with running(cfg, api=True) as d, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http, \
                    trio.open_nursery() as nursery:
                users = [d.store.addresses.deposit_address("devnet", f"user-{i}")[0].address for i in range(6)]
                ledger = Ledger(anvil, token)
                anvil.automine(False)
                went_down: list[tuple[int, int]] = []

                async def watch_scanned() -> None:
                    last = scanned(d)
                    while True:
                        now = scanned(d)
                        if now < last:
                            went_down.append((last, now))
                        last = now
                        await trio.sleep(0.005)

                nursery.start_soon(watch_scanned)

                def deposit(i: int) -> None:
                    ledger.pay(payers[i % 4], users[i % 6], 10**15 + i)
                    ledger.pay_token(payers[(i + 1) % 4], users[(i + 2) % 6], 1_000_000 + i)
                    anvil.mine(1)

                for i in range(3):
                    deposit(i)
                await wait_until(lambda: scanned(d) == anvil.head(), what="scanned to the head")
                # 0. a replica further behind what we scanned than max_lag: /readyz says so
                max_lag = d.watchers["devnet"].config.max_lag
                anvil.mine(max_lag + 5)
                await wait_until(lambda: scanned(d) == anvil.head(), what="scanned to the head")
                proxy.lagging(max_lag + 2)
                await wait_until(lambda: d.watchers["devnet"].status.head == anvil.head() - max_lag - 2,
                                 what="node far behind us")
                r = await http.get("/readyz")
                assert r.status_code == 503, r.json()
                assert r.json()["chains"]["devnet"]["problem"].startswith(f"node is {max_lag + 2} blocks behind")
                proxy.clear()
                await wait_until(lambda: d.watchers["devnet"].status.head == anvil.head(), what="node back")
                assert (await http.get("/readyz")).status_code == 200
                top = scanned(d)

                # 1. the node goes back `lag` blocks: all requests answered by the lagging view
                proxy.lagging(lag)
                await wait_until(lambda: d.watchers["devnet"].status.head == top - lag, what="node behind us")
                for i in range(3, 10):
                    deposit(i)
                await wait_until(lambda: d.watchers["devnet"].status.head == anvil.head() - lag
                                 and scanned(d) == anvil.head() - lag, what="following the lagging node")
                r = await http.get("/readyz")  # behind by less than max_lag: still ready
                assert r.status_code == 200 and r.json()["chains"]["devnet"]["ready"], r.json()
                hidden = proxy.injected["lag_hidden"]
                assert hidden > 0

                # 2. a load balancer over a fresh and a lagging replica: each request either
                # (blocks from one, their logs from the other: the lagging one has none)
                for i in range(10, 18):
                    proxy.lagging(lag, share=0.5)
                    deposit(i)
                    head = anvil.head()
                    await wait_until(lambda h=head: scanned(d) >= h, timeout=30, what=f"block {head} scanned")
                assert proxy.injected["lag_hidden"] > hidden

                # 3. only eth_getLogs goes to the lagging replica, which refuses ranges beyond its
                # head as anvil does ("BlockOutOfRangeError", code -32602): nothing is scanned
                # past the blocks whose logs are missing, and nothing is learnt from the refusal
                stuck_at, hidden = scanned(d), proxy.injected["lag_hidden"]
                proxy.lagging(lag, range_error=True, only=("eth_getLogs",))
                deposit(18)
                deposit(19)
                await wait_until(lambda: proxy.injected["lag_hidden"] >= hidden + 4, what="logs refused")
                assert scanned(d) == stuck_at

                # 4. fresh again: catching up on 150 blocks takes one eth_getLogs, as before
                proxy.lagging(None)
                logs_before = proxy.methods["eth_getLogs"]
                anvil.mine(150)
                await wait_until(lambda: scanned(d) == anvil.head(), timeout=30, what="caught up")
                assert proxy.methods["eth_getLogs"] - logs_before <= 3, "eth_getLogs ranges stayed narrow"
                anvil.mine(2)
                await ends_exactly(d, anvil, ledger, timeout=30)
                assert not went_down, f"the scanned height went down: {went_down}"
                r = await http.get("/readyz")
                assert r.status_code == 200 and r.json()["chains"]["devnet"]["lag"] == 0, r.json()
                nursery.cancel_scope.cancel()
                print(f"\nlagging replica: {proxy.requests} requests, injected {dict(proxy.injected)}")


@pytest.fixture
def clock():
    # jump only after 20 ms of real idleness, so real I/O with anvil is never cut short
    return MockClock(autojump_threshold=0.02)


async def test_node_gone_for_minutes(tmp_path, anvil: Anvil, token: Token, clock: MockClock):
    """The node refuses every connection for five (mock) minutes while deposits are made:
    /readyz says so, the node-up metric is 0, errors are counted; once it is back every
    deposit made during the outage is detected and confirmed, and /readyz is ready again."""
    payer = anvil.accounts[1]
    token.mint(payer, 10**12)
    port = free_port()
    wall0 = time.monotonic()
    with trio.fail_after(900):  # mock seconds
        async with fault_proxy(anvil.url, seed=3) as proxy:
            cfg = config(tmp_path, proxy, token, api_port=port, poll_interval=1.0, rpc_timeout=5.0)
            async with running(cfg, api=True, clock=TrioClock(anchor=time.time())) as d, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
                users = [d.store.addresses.deposit_address("devnet", f"user-{i}")[0].address for i in range(4)]
                ledger = Ledger(anvil, token)
                anvil.automine(False)
                ledger.pay(payer, users[0], 10**16)
                anvil.mine(3)
                await wait_until(lambda: scanned(d) == anvil.head(), interval=0.5, what="scanned")
                assert (await http.get("/readyz")).status_code == 200

                proxy.go_down(refuse=True)
                t0, before = trio.current_time(), rpc_errors(d)["connect"]
                for i in range(4):
                    ledger.pay(payer, users[i], 2 * 10**16 + i)
                    ledger.pay_token(payer, users[(i + 1) % 4], 5_000_000 + i)
                    anvil.mine(1)
                anvil.mine(3)
                await trio.sleep(60)
                r = await http.get("/readyz")
                assert r.status_code == 503, r.text
                assert r.json()["chains"]["devnet"]["problem"] == "node unreachable", r.json()
                assert metric(d, "watcher_chain_node_up") == 0
                chains = (await http.get("/v1/chains", headers=AUTH)).json()["items"]
                assert chains[0]["node"]["status"] == "down", chains
                assert "cannot reach node" in chains[0]["node"]["error"], chains
                await trio.sleep(240)
                assert trio.current_time() - t0 >= 300
                assert (await http.get("/readyz")).status_code == 503
                refused = rpc_errors(d)["connect"] - before
                assert refused >= 10, refused  # retried all along, with backoff (not thousands of times)
                assert refused < 500, refused
                assert scanned(d) < anvil.head()

                # back right after the scanner's latest failure: its backoff (22-30 s by now)
                # has only begun, and the pool's probe (every poll interval, 1 s) cuts it short
                node_errors = d.metrics.errors.labels("node")
                failures = node_errors._value.get()
                await wait_until(lambda: node_errors._value.get() > failures, timeout=60, interval=0.05,
                                 what="the scanner's next failed attempt")
                proxy.come_up()
                back = trio.current_time()
                await wait_until(lambda: metric(d, "watcher_chain_node_up") == 1, timeout=60, interval=0.1,
                                 what="node back up")
                resumed = trio.current_time() - back
                assert resumed < 5, f"the scanner waited out its backoff: {resumed:.1f} mock s"
                await ends_exactly(d, anvil, ledger, timeout=60)
                r = await http.get("/readyz")
                assert r.status_code == 200 and r.json()["chains"]["devnet"]["ready"], r.json()
                print(f"\nnode gone: {trio.current_time() - t0:.0f} mock seconds in {time.monotonic() - wall0:.1f} s, "
                      f"{refused} refused attempts; scanning again {resumed:.1f} mock s after the node came back")
