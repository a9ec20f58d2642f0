"""The Bitcoin family's wallet against a real Litecoin Core regtest node and the real daemon:
payouts signed locally arrive exactly and their change pays the next one, consolidating
sweeps of several addresses land exactly (sum less fee) at a P2SH treasury with a dust
output left and counted and ``max_inputs`` splitting the run, a stuck payout replaced by
BIP125 on a node that takes replacements, and pulled along by a child (CPFP) on one that
does not. Judged by the node: what the payee and the treasury received, what the mempool
holds, which block mined what."""

from __future__ import annotations

import signal
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import coincurve
import httpx
import pytest
import trio

from tests.support.daemon import (
    TEST_MNEMONIC,
    DaemonProcess,
    free_port,
    running,
    wait_until,
    write_config,
)
from tests.support.litecoin import COIN, Litecoind, ltc_entry, mine
from watcher import failpoints
from watcher.chains import BroadcastRejected, SignedTx
from watcher.keys import Keyring
from watcher.money import format_amount
from watcher_bitcoin import tx as btx
from watcher_bitcoin.address import p2wpkh, to_script
from watcher_bitcoin.networks import NETWORKS
from watcher_bitcoin.tx import fee_for, tx_vsize

ADMIN_TOKEN = "admin-token-0123456789"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
LTC = NETWORKS["ltc-regtest"]
FALLBACK = 10_000  # sat per 1,000 vB: the family's default fee_rate_fallback (regtest has no estimate)



def config(tmp_path, node: Litecoind, port: int, **extra: Any):
    return write_config(tmp_path, [ltc_entry(node, confirmations=1, **extra)], api_port=port,
                        extra={"api": {"admin_token": ADMIN_TOKEN}})


def client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=ADMIN, trust_env=False, timeout=10)


def payee(node: Litecoind) -> str:
    return str(node.rpc("getnewaddress", "", "bech32", wallet="payer"))


def received(node: Litecoind, address: str) -> int:
    """Satoshis ``address`` (of the payer wallet) received, mempool included."""
    return int(Decimal(node.rpc("getreceivedbyaddress", address, 0, wallet="payer")) * COIN)


def change_address(index: int) -> str:
    return p2wpkh(LTC, Keyring.from_mnemonic(TEST_MNEMONIC).public_key("m/84'/1'/1'", index, change=1))


def onchain(node: Litecoind, txid: str) -> dict[str, Any]:
    """The node's view of a transaction: outpoints spent, outputs (address, sats), fee, vsize."""
    tx = node.rpc("getrawtransaction", txid, True)
    spent = [(i["txid"], i["vout"]) for i in tx["vin"]]
    prev = [node.rpc("getrawtransaction", t, True)["vout"][n]["value"] for t, n in spent]
    outputs = [(o["scriptPubKey"]["addresses"][0], int(o["value"] * COIN)) for o in tx["vout"]]
    return {"spent": spent, "outputs": outputs, "fee": int(sum(prev) * COIN) - sum(v for _, v in outputs),
            "vsize": tx["vsize"], "blockhash": tx.get("blockhash")}



async def mine_until(node: Litecoind, predicate: Callable[[], Any], *, what: str, timeout: float = 30) -> Any:
    """Mine a block at a time until ``predicate`` holds."""
    deadline = trio.current_time() + timeout
    while not (value := predicate()):
        assert trio.current_time() < deadline, f"timed out waiting for {what}"
        await mine(node)
        await trio.sleep(0.3)
    return value


def spend(coin: tuple[str, int, int], secret: bytes, to: str, *, fee: int) -> SignedTx:
    """One P2WPKH coin of ours, signed to ``to`` less ``fee`` (for the broadcast checks)."""
    txid, vout, value = coin
    script = to_script(LTC, p2wpkh(LTC, coincurve.PrivateKey(secret).public_key.format(compressed=True)))
    unsigned = btx.build([btx.Coin(txid, vout, value, script)], [btx.Output(to_script(LTC, to), value - fee)])
    return SignedTx(txid=unsigned.txid, raw=btx.sign(unsigned, [secret]).hex(), sender="", to=to, asset="LTC",
                    amount=value - fee, fee_limit=fee, conflict=f"{txid}:{vout}")


def payout_body(to: str, amount: str, key: str) -> dict[str, Any]:
    return {"chain": "ltc", "asset": "LTC", "amount": amount, "to": to, "idempotency_key": key}


def transfers_listed(d) -> list[dict[str, Any]]:
    return d.views.transfers(chain="ltc", limit=1000)[0]


async def test_a_payout_arrives_exactly_and_its_change_pays_the_next(tmp_path, litecoind: Litecoind):
    node = litecoind
    node.payer  # noqa: B018 - funds the payer (101 blocks)
    port = free_port()
    with trio.fail_after(60):
        async with running(config(tmp_path, node, port), api=True) as d, client(port) as http:
            chain = (await http.get("/v1/chains")).json()["items"][0]
            hot = chain["hot_wallet"]["address"]
            assert hot == d.store.hot_wallet("ltc") == p2wpkh(LTC, Keyring.from_mnemonic(TEST_MNEMONIC).public_key(
                "m/84'/1'/1'", 0))
            funding = node.send(hot, COIN)
            alice = payee(node)
            r = await http.post("/v1/payouts", json=payout_body(alice, "0.12345678", "p-1"))
            assert r.status_code == 202, r.text
            first = r.json()["id"]
            # the funding is only in the mempool: nothing to spend yet
            waiting = await wait_until(lambda: (p := d.views.payout(first))["reason"] and p, what="payout waits")
            assert waiting["status"] == "pending" and "hot wallet has 0 LTC spendable" in waiting["reason"]
            done = await mine_until(node, lambda: (p := d.views.payout(first))["status"] == "completed" and p,
                                    what="first payout completed")
            assert received(node, alice) == 12_345_678
            tx1 = onchain(node, done["txid"])
            stored = d.store.chaintxs.get(done["txid"])
            assert stored is not None
            funding_vout = next(n for n, o in enumerate(node.rpc("getrawtransaction", funding, True)["vout"])
                                if o["scriptPubKey"]["addresses"] == [hot])
            assert tx1["spent"] == [(funding, funding_vout)]
            fee1 = stored.details["fee"]
            assert tx1["outputs"] == [(alice, 12_345_678), (change_address(0), COIN - 12_345_678 - fee1)]
            assert tx1["fee"] == fee1 == fee_for(stored.details["vsize"], FALLBACK)
            assert tx1["vsize"] <= stored.details["vsize"] <= tx1["vsize"] + 1  # the estimate never undershoots
            assert done["fee_paid"] == format_amount(fee1, 8) and done["fee_rate"] == "10"
            assert done["transactions"][0] | {"fee": str(fee1), "inputs": 1, "fee_rate": "10"} == done["transactions"][0]

            # the change of the first pays the second
            bob = payee(node)
            second = (await http.post("/v1/payouts", json=payout_body(bob, "0.5", "p-2"))).json()["id"]
            done2 = await mine_until(node, lambda: (p := d.views.payout(second))["status"] == "completed" and p,
                                     what="second payout completed")
            tx2 = onchain(node, done2["txid"])
            assert tx2["spent"] == [(done["txid"], 1)]
            fee2 = d.store.chaintxs.get(done2["txid"]).details["fee"]
            assert tx2["outputs"] == [(bob, COIN // 2), (change_address(1), COIN - 12_345_678 - fee1 - COIN // 2 - fee2)]
            assert received(node, bob) == COIN // 2 and received(node, alice) == 12_345_678
            state, _ = d.store.chaintxs.wallet_state("ltc")
            assert state["next_change"] == 2
            # change remembered as signed (what is spent is forgotten lazily, once the node says so)
            assert (done2["txid"], 1, 0) not in [(c["txid"], c["vout"], c["change_index"]) for c in state["coins"]]
            assert (done2["txid"], 1, 1) in [(c["txid"], c["vout"], c["change_index"]) for c in state["coins"]]
            events = [e.type for e in d.store.events.list(subject=first, limit=20)]
            assert events == ["payout.pending", "payout.broadcast", "payout.completed"]
            # the hot wallet's balance (metrics) is its coins, change included, without a UTXO-set scan
            left = COIN - 12_345_678 - fee1 - COIN // 2 - fee2
            assert await d.senders["ltc"].wallet.balance(d.config.chain("ltc").native, state) == left
            assert [t for t in transfers_listed(d) if t["address"] == hot] == []  # housekeeping, not a deposit

            # broadcast: mined bytes succeed quietly; spent inputs are a permanent refusal, a fee
            # below the relay floor a transient one
            wallet = d.senders["ltc"].wallet
            assert wallet is not None
            await wallet.broadcast(stored.signed())
            keyring = Keyring.from_mnemonic(TEST_MNEMONIC)
            double = spend((funding, funding_vout, COIN), keyring.private_key("m/84'/1'/1'", 0), alice, fee=2_000)
            with pytest.raises(BroadcastRejected) as refused:
                await wallet.broadcast(double)
            assert refused.value.permanent, refused.value.message
            change = state["coins"][-1]
            free = spend((change["txid"], change["vout"], change["value"]),
                         keyring.private_key("m/84'/1'/1'", 1, change=1), alice, fee=0)
            with pytest.raises(BroadcastRejected) as refused:
                await wallet.broadcast(free)
            assert not refused.value.permanent and "min relay fee not met" in refused.value.message


async def test_sweeps_consolidate_exactly_leave_dust_and_split_at_max_inputs(tmp_path, litecoind: Litecoind):
    node = litecoind
    node.payer  # noqa: B018
    treasury = str(node.rpc("getnewaddress", "", "p2sh-segwit", wallet="payer"))  # any address type
    port = free_port()
    rate = 50_000  # 50 sat/vB: spending a P2WPKH output (68 vB) costs 3,400 sat, more than the dust output
    cfg = config(tmp_path, node, port, fee_rate_fallback="50",
                 sweep={"to": treasury, "min_amount": {"LTC": "0.01"}, "interval": 0, "max_inputs": 2})
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            a, b, c = (d.store.addresses.deposit_address("ltc", label)[0].address for label in ("a", "b", "c"))
            paid = {node.send(a, 10_000_000): a, node.send(a, 20_000_000): a, node.send(b, 30_000_000): b,
                    node.send(c, 40_000_000): c}
            dust_txid = node.send(c, 3_000)  # above the relay's dust limit (2,940), below its spend cost
            await mine(node)
            deposits = await wait_until(lambda: len(t := d.views.transfers(chain="ltc", status="confirmed")[0]) == 5
                                        and t, what="five confirmed deposits")
            ids = {t["address"]: set() for t in deposits}
            for t in deposits:
                ids[t["address"]].add(t["id"])
            dust = next(t for t in deposits if t["txid"] == dust_txid)
            r = await http.post("/v1/sweeps/run", json={})
            assert r.status_code == 202, r.text
            sweeps = await mine_until(node, lambda: len(s := d.views.sweeps(chain="ltc")[0]) == 2
                                      and all(x["status"] == "confirmed" for x in s) and s, what="two sweeps confirmed")
            # max_inputs = 2: a's two deposits in one run, b and c in the next (c's dust left, not an input)
            first = next(s for s in sweeps if s["addresses"] == [a])
            second = next(s for s in sweeps if s is not first)
            assert first["addresses"] == [a] and set(first["deposits"]) == ids[a] and first["dust"] is None
            assert set(second["addresses"]) == {b, c} and set(second["deposits"]) == ids[b] | ids[c]
            assert second["dust"] == "0.00003"
            total = 0
            for s in (first, second):
                tx = onchain(node, s["txid"])
                assert tx["outputs"] == [(treasury, int(s["base_units"]))]
                assert len(tx["spent"]) == 2 and all(paid.get(t) for t, _ in tx["spent"])
                fee = fee_for(tx_vsize(2, [to_script(LTC, treasury)]), rate)
                assert tx["fee"] == fee and s["fee_paid"] == format_amount(fee, 8)
                assert s["transactions"][0]["inputs"] == 2 and s["transactions"][0]["fee_rate"] == "50"
                total += int(s["base_units"]) + fee
            # every economical satoshi is at the treasury or paid in fees
            assert total == 100_000_000
            assert received(node, treasury) == sum(int(s["base_units"]) for s in sweeps)
            assert node.rpc("gettxout", dust_txid, dust["index"], True) is not None  # left where it was
            # nothing is swept twice
            await http.post("/v1/sweeps/run", json={})
            for _ in range(3):
                await mine(node)
                await trio.sleep(0.2)
            assert len(d.views.sweeps(chain="ltc")[0]) == 2


async def test_a_sweep_cut_at_max_inputs_spends_its_largest_outputs_and_leaves_the_rest_on_record(
        tmp_path, litecoind: Litecoind):
    """A sweep's step may find more outputs worth spending than ``max_inputs`` (the fee rate
    fell since planning, and outputs planned as dust are worth it now). It used to cut them in
    deposit order: a big output planned to be spent fell out of the transaction and out of the
    record (neither spent nor left), and no later run swept it, since the sweep covered it.
    Now the largest are spent and the rest are left, on record as the sweep's dust. Its BIP125
    replacement (a stuck sweep, ``fee_bump = "rbf"``) keeps that record: it used to drop it, so
    a sweep whose replacement was mined reported no dust."""
    from watcher.chains import Send, SignedTx, StoredTx, SweepIntent

    node = litecoind
    node.payer  # noqa: B018
    treasury = payee(node)
    port = free_port()
    cfg = config(tmp_path, node, port, fee_rate_fallback="50", fee_bump="rbf",  # an input costs 3,400 sat
                 sweep={"to": treasury, "min_amount": {"LTC": "0.01"}, "interval": 0, "max_inputs": 2})
    with trio.fail_after(60):
        async with running(cfg) as d:
            a = d.store.addresses.deposit_address("ltc", "a")[0].address
            for value in (10_000, 30_000_000, 40_000_000):  # one block each: the small one first
                node.send(a, value)
                await mine(node)
            deposits = await wait_until(lambda: len(u := d.store.transfers.unswept_upto("ltc", node.head())) == 3
                                        and u, what="three confirmed deposits")
            wallet = d.senders["ltc"].wallet
            state, _ = d.store.chaintxs.wallet_state("ltc")
            intent = SweepIntent(id="sw_step", asset=d.config.chain("ltc").asset("LTC"), addresses=(a,), to=treasury,
                                 amount=sum(x.amount for x in deposits), deposits=tuple(deposits), txs=())
            answer = await wallet.sweep_step(intent, state)
            assert isinstance(answer, Send), answer
            details = answer.txs[0].details
            spent = sorted(int(i[2]) for i in details["inputs"])
            left = sorted(int(x[2]) for x in details["left"])
            assert spent == [30_000_000, 40_000_000] and left == [10_000], (spent, left)
            assert len(details["inputs"]) + len(details["left"]) == len(deposits)  # every covered output
            sent = answer.txs[0]
            stored = StoredTx(id=1, chain="ltc", purpose="sweep", ref_id="sw_step", txid=sent.txid, raw=sent.raw,
                              sender=sent.sender, to=sent.to, asset=sent.asset, amount=sent.amount,
                              fee_limit=sent.fee_limit, conflict=sent.conflict, details=sent.details, status="open",
                              block_number=None, fee_paid=None, error=None, created_at=0, broadcast_at=None)
            bumped = await wallet.replace([stored], bump_ppm=250_000, state=state)
            assert isinstance(bumped, SignedTx) and bumped.details["fee"] > details["fee"], bumped
            assert bumped.details["left"] == details["left"]


async def stuck_payout(node: Litecoind, d, http: httpx.AsyncClient, to: str) -> dict[str, Any]:
    """Fund the hot wallet, ask for a payout, mine the one block the funding needs; the payout
    is then broadcast and nothing more is mined."""
    node.send(d.store.hot_wallet("ltc"), COIN)
    pid = (await http.post("/v1/payouts", json=payout_body(to, "0.25", "stuck"))).json()["id"]
    await wait_until(lambda: d.views.payout(pid)["reason"], what="payout waits for funds")
    await mine(node)
    p = await wait_until(lambda: (p := d.views.payout(pid))["status"] == "broadcast" and p, what="broadcast")
    await wait_until(lambda: p["txid"] in node.rpc("getrawmempool"), what="the payout in the mempool")
    return p


async def test_a_stuck_payout_is_replaced_with_the_same_inputs_and_paid_once(tmp_path, litecoind: Litecoind):
    node = litecoind  # -mempoolreplacement=1
    node.payer  # noqa: B018
    port = free_port()
    cfg = config(tmp_path, node, port, fee_bump="rbf", payouts={"stuck_after": 1})
    carol = payee(node)
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, client(port) as http:
            p = await stuck_payout(node, d, http, carol)
            original = p["txid"]
            before = onchain(node, original)
            # the payout's txid moves to the replacement when it is stored, before it is sent
            replaced = await wait_until(lambda: (q := d.views.payout(p["id"]))["txid"] != original
                                        and q["txid"] in node.rpc("getrawmempool") and q, timeout=20,
                                        what="a replacement in the mempool")
            newest = replaced["txid"]
            assert len(replaced["transactions"]) >= 2 and original not in node.rpc("getrawmempool")
            after = onchain(node, newest)
            assert after["spent"] == before["spent"]  # the same inputs: one of the two can be mined
            assert after["outputs"][0] == before["outputs"][0] == (carol, COIN // 4)
            # BIP125 and bump_ppm (fee_bump 0.2): at least 20% more, and the incremental relay fee for its size
            assert after["fee"] >= before["fee"] * 12 // 10 and after["fee"] >= before["fee"] + after["vsize"]
            assert after["outputs"][1][1] == before["outputs"][1][1] - (after["fee"] - before["fee"])
            done = await mine_until(node, lambda: (q := d.views.payout(p["id"]))["status"] == "completed" and q,
                                    what="completed")
            mined = onchain(node, done["txid"])
            assert mined["blockhash"] and done["txid"] in [t["txid"] for t in done["transactions"]]
            assert {t["status"] for t in done["transactions"] if t["txid"] != done["txid"]} == {"replaced"}
            assert received(node, carol) == COIN // 4  # exactly once
            assert d.store.db.scalar("SELECT COUNT(*) FROM payouts") == 1


@pytest.mark.parametrize("fee_bump", ["cpfp", "rbf"])
async def test_a_stuck_payout_is_pulled_along_by_a_child_on_a_node_without_replacement(tmp_path, fee_bump: str):
    """``fee_bump = "cpfp"``, or ``"rbf"`` on a node that refuses replacements (found out by
    testmempoolaccept before anything is stored): a child spends the payout's change."""
    node = Litecoind(replacement=False)  # Litecoin Core's default: no BIP125 replacement
    node.start()
    try:
        node.payer  # noqa: B018
        port = free_port()
        cfg = config(tmp_path, node, port, fee_bump=fee_bump, payouts={"stuck_after": 1})
        dave = payee(node)
        with trio.fail_after(60):
            async with running(cfg, api=True) as d, client(port) as http:
                p = await stuck_payout(node, d, http, dave)
                parent = p["txid"]
                child = await wait_until(lambda: d.store.chaintxs.for_ref(p["id"], "bump"), timeout=20,
                                         what="a child")
                assert len(child) == 1
                (bumped,) = d.store.events.list(types=("wallet.bumped",), limit=10)
                assert (bumped.subject, bumped.data["txid"], bumped.data["parent_txid"]) == (p["id"], child[0].txid,
                                                                                              parent)
                await wait_until(lambda: child[0].txid in node.rpc("getrawmempool"), what="the child in the mempool")
                kid = onchain(node, child[0].txid)
                assert kid["spent"] == [(parent, 1)]  # the parent's change
                assert kid["outputs"] == [(change_address(1), child[0].details["outputs"][0][1])]
                entry = node.rpc("getmempoolentry", parent)
                assert entry["descendantcount"] == 2
                mother = onchain(node, parent)
                package = Decimal(mother["fee"] + kid["fee"]) / (mother["vsize"] + kid["vsize"])
                # the wallet prices by its vsize estimates (never below the node's: a signature
                # may come out a byte shorter), so the parent's rate is the one it was priced at;
                # the package, on the node's real sizes, pays at least that plus fee_bump 0.2
                (priced,) = [t for t in d.store.chaintxs.for_ref(p["id"]) if t.txid == parent]
                assert priced.details["fee"] == mother["fee"] and priced.details["vsize"] >= mother["vsize"]
                target = Decimal(child[0].details["package_rate"]) / 1000
                assert target >= Decimal(priced.details["fee"]) / priced.details["vsize"] * Decimal("1.2")
                assert package >= target
                await mine(node)
                done = await wait_until(lambda: (q := d.views.payout(p["id"]))["status"] == "completed" and q,
                                        what="completed")
                assert done["txid"] == parent and len(done["transactions"]) == 1
                assert onchain(node, parent)["blockhash"] == onchain(node, child[0].txid)["blockhash"] is not None
                assert received(node, dave) == COIN // 4
                state, _ = d.store.chaintxs.wallet_state("ltc")
                assert state["next_change"] == 2
    finally:
        node.close()


@pytest.mark.parametrize("point", ["bump.stored", "bump.sent"])
async def test_killed_while_pulling_a_payout_along_sends_one_child(tmp_path, point: str):
    """kill -9 right after the CPFP child is stored (not sent), or right after the node took
    it (the database does not know): restarted, watcher sends that same child (never a second
    one), both are mined together, and the payee is paid once."""
    assert not failpoints._ACTIVE
    node = Litecoind(replacement=False)
    node.start()
    proc: DaemonProcess | None = None
    try:
        node.payer  # noqa: B018
        port = free_port()
        cfg = config(tmp_path, node, port, fee_bump="cpfp", payouts={"stuck_after": 1})
        hot = p2wpkh(LTC, Keyring.from_mnemonic(TEST_MNEMONIC).public_key("m/84'/1'/1'", 0))
        erin = payee(node)
        proc = DaemonProcess(cfg, log_path=tmp_path / "killed.log", env={"WATCHER_FAILPOINTS": point}).start()
        with trio.fail_after(60):
            async with client(port) as http:
                await wait_http_up(http)
                node.send(hot, COIN)
                node.mine(1)
                pid = (await http.post("/v1/payouts", json=payout_body(erin, "0.25", "killed"))).json()["id"]
                deadline = trio.current_time() + 30
                while proc.alive():  # broadcast, stuck (nothing mined), bumped: killed there
                    assert trio.current_time() < deadline, proc.log()[-3000:]
                    await trio.sleep(0.1)
                assert proc.proc is not None and proc.proc.wait() == -signal.SIGKILL
                assert f"fail point {point} reached" in proc.log()
                async with running(cfg, api=True) as d:
                    child = await wait_until(lambda: d.store.chaintxs.for_ref(pid, "bump"), what="the child")
                    await wait_until(lambda: child[0].txid in node.rpc("getrawmempool"), what="the child sent")
                    await trio.sleep(2.5)  # stuck_after passes again: a child in flight means no second one
                    assert len(d.store.chaintxs.for_ref(pid, "bump")) == 1
                    assert len(node.rpc("getrawmempool")) == 2  # the payout and its one child
                    await mine(node)
                    done = await wait_until(lambda: (q := d.views.payout(pid))["status"] == "completed" and q,
                                            what="completed")
                    assert onchain(node, done["txid"])["blockhash"] == onchain(node, child[0].txid)["blockhash"]
                    assert received(node, erin) == COIN // 4
    finally:
        if proc is not None:
            proc.stop()
        node.close()


def sweep_runs(d) -> list[tuple[int, int]]:
    """What each sweep run of the daemon's ``ltc`` sweeper planned and deferred, as it runs."""
    sweeper = d.senders["ltc"].sweeper
    runs: list[tuple[int, int]] = []
    plan = sweeper.plan

    async def counted() -> tuple[int, int]:
        runs.append(await plan())
        return runs[-1]

    sweeper.plan = counted
    return runs


async def wait_http_up(http: httpx.AsyncClient) -> None:
    for _ in range(300):
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await trio.sleep(0.05)
    raise AssertionError("the daemon did not come up")


async def test_a_confirmed_sweep_a_reorg_undoes_fails_and_its_address_is_swept_again(tmp_path):
    """A reorg shallower than finality_depth takes a confirmed sweep off the chain together
    with the deposit it spent, and the new chain double-spends that deposit: the finality
    guard finds the sweep's bytes refused for good, so the sweep fails (``sweep.failed``, the
    treasury never got it) instead of staying confirmed, and its address is planned again."""
    from tests.conformance.bitcoin import LitecoinHarness
    from tests.conformance.test_conformance import Api, configure, sweep_config, until

    h = LitecoinHarness(tmp_path / "node")
    h.workdir.mkdir(parents=True)
    h.start()
    try:
        treasury = h.fresh_address()
        cfg, port = configure(h, tmp_path, confirmations=2, finality_depth=6, sweep=sweep_config(h, treasury))
        with trio.fail_after(90):
            async with running(cfg, api=True) as d, Api(port, "bitcoin") as api:
                a = (await api.address("a"))["address"]
                h.pay(a, "LTC", COIN // 2)
                h.mine(2)

                async def sweep_in(*statuses: str) -> dict[str, Any] | None:
                    found = [s for s in await api.sweeps() if s["status"] in statuses]
                    return found[-1] if found else None

                await until(lambda: api.transfers(status="confirmed"), what="the deposit confirmed")
                await api.post("/v1/sweeps/run", {}, admin=True)
                await until(lambda: sweep_in("broadcast"), what="the sweep sent")
                h.mine(2)  # the deposit's block and the sweep's are the newest four
                first = await until(lambda: sweep_in("confirmed"), what="the sweep confirmed")
                assert h.balance(treasury, "LTC") == int(first["base_units"])
                h.reorg(4)  # the deposit's block and the sweep's; the deposit is double-spent
                undone = await until(lambda: sweep_in("failed"), mine=h, what="the sweep undone")
                assert undone["id"] == first["id"] and undone["reason"].startswith("its transaction left the chain")
                assert h.balance(treasury, "LTC") == 0
                assert [e.type for e in d.store.events.list(subject=first["id"], limit=20)][-1] == "sweep.failed"
                # the address is a candidate again: its next deposit is swept (and only that one)
                second_deposit = h.pay(a, "LTC", COIN // 4)

                async def second_confirmed() -> bool:
                    return any(t["txid"] == second_deposit for t in await api.transfers(status="confirmed"))

                await until(second_confirmed, mine=h, what="the next deposit confirmed")
                await api.post("/v1/sweeps/run", {}, admin=True)
                second = await until(lambda: sweep_in("confirmed"), mine=h, timeout=40, what="a new sweep")
                assert second["id"] != first["id"]
                assert h.balance(treasury, "LTC") == int(second["base_units"]) <= COIN // 4
                covered = {t["txid"] for t in await api.transfers() if t["id"] in second["deposits"]}
                assert covered == {second_deposit}
    finally:
        h.stop()


async def test_a_sweep_covers_exactly_what_it_spends_when_a_reorg_unconfirms_a_deposit(tmp_path):
    """A sweep run planned while a deposit's block has just left the node's chain (its output
    back in the mempool; the scanner has not seen the reorg yet: a slow poll) does not cover
    that deposit: it covers exactly what it spends. The deposit, mined again, is swept by a
    later run (found by the Litecoin soak: it stayed covered by the first sweep, never swept,
    and invisible to reconcile)."""
    from tests.conformance.bitcoin import LitecoinHarness
    from tests.conformance.test_conformance import Api, configure, sweep_config, until

    h = LitecoinHarness(tmp_path / "node")
    h.workdir.mkdir(parents=True)
    h.start()
    try:
        treasury = h.fresh_address()
        cfg, port = configure(h, tmp_path, confirmations=2, finality_depth=6, poll_interval=3.0,
                              sweep=sweep_config(h, treasury))
        with trio.fail_after(90):
            async with running(cfg, api=True), Api(port, "bitcoin") as api:
                a, b = (await api.address("a"))["address"], (await api.address("b"))["address"]
                h.pay(a, "LTC", COIN // 2)
                h.mine(1)
                d2 = h.pay(b, "LTC", 3 * COIN // 10)
                h.mine(2)

                async def both_confirmed() -> bool:
                    confirmed = await api.transfers(status="confirmed")
                    return len(confirmed) == 2 and await api.scanned() == h.head()

                await until(both_confirmed, interval=0.05, what="both deposits confirmed")
                h.ltc.invalidate(2)  # d2's block and the one above: d2 is back in the mempool
                await api.post("/v1/sweeps/run", {}, admin=True)
                first = (await until(lambda: api.sweeps(), interval=0.05, what="a sweep planned"))[0]
                d2_id = next(t["id"] for t in await api.transfers() if t["txid"] == d2)
                assert d2_id not in first["deposits"] and len(first["deposits"]) == 1

                async def swept_both() -> list[dict[str, Any]] | None:
                    sweeps = await api.sweeps()
                    done = [s for s in sweeps if s["status"] == "confirmed"]
                    if not any(d2_id in s["deposits"] for s in sweeps):
                        await api.post("/v1/sweeps/run", {}, admin=True)
                    return done if len(done) == 2 else None

                done = await until(swept_both, mine=h, interval=0.6, timeout=60, what="both deposits swept")
                assert h.balance(treasury, "LTC") == sum(int(s["base_units"]) for s in done)
                assert h.balance(a, "LTC") == h.balance(b, "LTC") == 0
    finally:
        h.stop()


async def test_a_sweep_run_during_a_reorg_on_the_node_keeps_the_deposits_it_cannot_see(tmp_path, litecoind):
    """The Litecoin soak's lost sweep candidates (docs/reliability.md): a sweep run while the
    node is in the middle of a reorg that the scan has not seen (the deposit's block is
    disconnected, its transaction back in the mempool) must not drop the address; when the
    node goes back to the same block, the scan confirms nothing new, so a dropped candidate
    would leave the deposit unswept for good."""
    node = litecoind
    node.payer  # noqa: B018
    treasury = str(node.rpc("getnewaddress", "", "bech32", wallet="payer"))
    port = free_port()
    # polled hourly: the scan only runs when poked, so it does not see the reorg in between
    cfg = config(tmp_path, node, port, poll_interval=3600,
                 sweep={"to": treasury, "min_amount": {"LTC": "0.01"}, "interval": 0})
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, client(port) as http:
            w, runs = d.watchers["ltc"], sweep_runs(d)
            a = d.store.addresses.deposit_address("ltc", "a")[0].address
            txid = node.send(a, 20_000_000)
            await mine(node, 2)
            w.poke()
            await wait_until(lambda: d.views.transfers(chain="ltc", status="confirmed")[0], what="the deposit confirmed")
            block = node.rpc("gettransaction", txid, wallet="payer")["blockhash"]
            node.rpc("invalidateblock", block)  # the node reorgs; its transaction is back in the mempool
            vout = d.views.transfers(chain="ltc")[0][0]["index"]
            assert node.rpc("gettxout", txid, vout, True)["confirmations"] == 0
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
            await wait_until(lambda: runs, what="a sweep run")
            assert runs[0] == (0, 1)  # nothing it can see to sweep, and the address deferred, not dropped
            assert d.store.db.query("SELECT 1 FROM sweep_candidates WHERE address = ?", (a,))  # still a candidate
            node.rpc("reconsiderblock", block)  # back to the same chain: nothing new for the scan to confirm

            def swept() -> Any:
                node.mine(1)
                w.poke()
                return (s := d.views.sweeps(chain="ltc")[0]) and s[0]["status"] == "confirmed" and s

            sweeps = await wait_until(swept, interval=0.3, what="the deposit swept")
            assert sweeps[0]["addresses"] == [a] and len(sweeps[0]["deposits"]) == 1


async def test_a_sweep_run_while_a_reorg_left_a_deposit_too_shallow_keeps_its_address(tmp_path, litecoind):
    """The Litecoin soak's unswept deposit (docs/reliability.md): a reorg of the block above a
    confirmed deposit rolls the scan back under the sweeps' depth without orphaning the deposit
    (its own block stays). A sweep run then may not take it (too shallow), and must not read
    that as "not worth a sweep": a dropped candidate never comes back, because the deposit is
    already confirmed, so once deep enough again it would stay at its address for good."""
    node = litecoind
    node.payer  # noqa: B018
    treasury = str(node.rpc("getnewaddress", "", "bech32", wallet="payer"))
    port = free_port()
    cfg = write_config(tmp_path, [ltc_entry(node, confirmations=2, poll_interval=3600,
                                            sweep={"to": treasury, "min_amount": {"LTC": "0.01"}, "interval": 0})],
                       api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, client(port) as http:
            w, runs = d.watchers["ltc"], sweep_runs(d)
            # the scanner is held right after it rolls back (before it scans the new block),
            # the moment the soak's sweep run fell into
            rolled_back, release = trio.Event(), trio.Event()
            reorg = w._reorg

            async def held(*args: Any) -> None:
                await reorg(*args)
                rolled_back.set()
                await release.wait()

            w._reorg = held  # type: ignore[method-assign]
            a = d.store.addresses.deposit_address("ltc", "a")[0].address
            node.send(a, 20_000_000)
            deposit_block = (await trio.to_thread.run_sync(node.mine, 1))[0]
            above = (await trio.to_thread.run_sync(node.mine, 1))[0]
            w.poke()
            await wait_until(lambda: d.views.transfers(chain="ltc", status="confirmed")[0], what="the deposit confirmed")
            node.rpc("invalidateblock", above)  # a reorg of depth 1: the deposit's block stays
            # its replacement pays another address, or it would be the same block
            await trio.to_thread.run_sync(node.rpc, "generatetoaddress", 1, payee(node))
            w.poke()
            with trio.fail_after(20):
                await rolled_back.wait()
            assert d.store.chains.cursor("ltc").hash == deposit_block
            assert d.views.transfers(chain="ltc", status="confirmed")[0]  # its own block stayed: not orphaned
            assert (await http.post("/v1/sweeps/run", json={})).status_code == 202
            await wait_until(lambda: runs, what="a sweep run")
            assert runs[0] == (0, 1)  # too shallow to take now: deferred, not dropped
            assert d.store.db.query("SELECT 1 FROM sweep_candidates WHERE address = ?", (a,))
            release.set()

            def swept() -> Any:
                node.mine(1)  # a new block above: the deposit is deep enough again
                w.poke()
                return (s := d.views.sweeps(chain="ltc")[0]) and s[0]["status"] == "confirmed" and s

            sweeps = await wait_until(swept, interval=0.3, what="the deposit swept")
            assert sweeps[0]["addresses"] == [a] and len(sweeps[0]["deposits"]) == 1
            assert received(node, treasury) == int(sweeps[0]["base_units"])


def test_a_replacement_made_again_after_the_node_refused_it_is_opened_again(tmp_path):
    """Found by the Litecoin soak (the sender crashed on a duplicate txid and the daemon
    stopped): a payout's replacement B was refused because its original A had just been mined
    (B's inputs spent); a reorg then took A's block away, A was stuck again, and the same fee
    bump of A made the same B. Storing B again opens the refused row (the tracker then sends
    it); the same txid for another payout still raises."""
    from prometheus_client import CollectorRegistry

    from watcher.core import Core

    entry = {"id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": "http://127.0.0.1:9"}
    core = Core.open(write_config(tmp_path, [entry]), registry=CollectorRegistry())
    try:
        store = core.store
        to = change_address(7)

        def payout(key: str) -> str:
            return store.payouts.create(chain="ltc", asset="LTC", amount=50_000, to=to, idempotency_key=key,
                                        label=None, metadata={}, actor="test", needs_approval=False)[0].id

        def tx(txid: str) -> SignedTx:
            return SignedTx(txid=txid, raw="00", sender="", to=to, asset="LTC", amount=50_000, fee_limit=1_000,
                            conflict="aa" * 32 + ":0")

        pid = payout("k1")
        a, b = tx("a" * 64), tx("b" * 64)
        store.payouts.signed(pid, [a])
        store.payouts.replaced(pid, b)
        with store.db.transaction():
            store.chaintxs.refused([store.chaintxs.get(b.txid)], "bad-txns-inputs-missingorspent")
        assert store.chaintxs.get(b.txid).status == "failed"
        store.payouts.replaced(pid, b)  # the same bytes again
        again = store.chaintxs.get(b.txid)
        assert (again.status, again.error) == ("open", None)
        assert [t.txid for t in store.chaintxs.for_ref(pid)] == [a.txid, b.txid]
        assert store.payouts.row(pid).txid == b.txid
        with pytest.raises(ValueError, match="already stored"):  # in flight: not stored twice
            store.payouts.replaced(pid, b)
        with pytest.raises(ValueError, match="already stored"):  # another payout's txid
            store.payouts.signed(payout("k2"), [a])
    finally:
        core.close()
