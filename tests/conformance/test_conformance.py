"""The conformance suite: every chain family, against its own real node, judged against the chain.

derive → watch → pay → detect → confirm → reorg → orphan → invoice → sweep → payout → fee
bump, and a kill -9 at each money-moving step (the fail points of watcher/failpoints.py).
watcher is driven and read only through its HTTP API (docs/api.md, docs/events.md), never
through the store's Python API; money is judged by balances read from the node (each payout
goes to a fresh address, each sweep test to a fresh treasury, so a balance tells how often
something was paid).

Plugging in a new family
------------------------
1. Write ``tests/conformance/<family>.py`` with a subclass of
   :class:`tests.conformance.harness.FamilyHarness` (its docstrings are the contract): start
   and stop your real node by PID on loopback, ``chain_entry`` (the ``[[chains]]`` entry,
   your family's own keys included), ``assets`` (native first, then tokens if any),
   ``decimals``, ``fresh_address``, ``pay`` (from a funded test payer, into the mempool),
   ``fund`` (mined), ``balance``, ``head``, ``mine``, ``reorg(depth, keep)``,
   ``hold_fees``/``release_fees``, and ``failpoints`` (leave out the points your wallet never
   reaches, e.g. ``topup.*`` without gas top-ups).
2. Add the class to ``HARNESSES`` in ``tests/conformance/conftest.py``. Every test of
   this directory takes the ``harness`` fixture and so runs for it; the test ids carry the
   family name (``test_pay_detect_confirm[bitcoin]``), so
   ``pytest tests/conformance -k bitcoin`` runs yours alone.
3. Find what fails. A real bug in watcher is written down (steps, observed, expected) in
   the harness's ``known_bugs``, which runs that test as ``xfail(strict=True)`` for that
   family only, until it is fixed.

The EVM family runs it on anvil as part of ``make test``.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.daemon import (
    API_TOKEN,
    TEST_MNEMONIC,
    DaemonProcess,
    free_port,
    running,
    write_config,
)
from watcher import failpoints
from watcher.config import load_config
from watcher.keys import Keyring
from watcher.money import format_amount, parse_amount
from watcher.plugins import chain_families, make_plugin_manager

from .harness import ALL_FAILPOINTS, FamilyHarness

ADMIN_TOKEN = "admin-token-0123456789"
APP = {"authorization": f"Bearer {API_TOKEN}"}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
NEVER_STUCK = 3600.0  # stuck_after where no replacement is wanted


# --- helpers: config, the API, waiting ---------------------------------------------------------


def configure(h: FamilyHarness, tmp_path: Path, **chain: Any) -> tuple[Path, int]:
    port = free_port()
    cfg = write_config(tmp_path / "watcher", [h.chain_entry(**chain)], api_port=port,
                       extra={"api": {"admin_token": ADMIN_TOKEN}})
    return cfg, port


def sweep_config(h: FamilyHarness, treasury: str) -> dict[str, Any]:
    return {"to": treasury, "min_amount": {a: "0.01" for a in h.assets}, "interval": 0,
            "funding_confirmations": 1}


class Api:
    """watcher as an app sees it: its HTTP API on loopback."""

    def __init__(self, port: int, chain: str):
        self.chain = chain
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=APP, trust_env=False, timeout=10)

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def get(self, path: str, **params: Any) -> Any:
        r = await self.http.get(path, params=params)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    async def post(self, path: str, body: dict[str, Any], *, admin: bool = False) -> httpx.Response:
        r = await self.http.post(path, json=body, headers=ADMIN if admin else APP)
        assert r.status_code in (200, 201, 202), f"POST {path}: {r.status_code} {r.text}"
        return r

    async def up(self, timeout: float = 30.0) -> None:
        """Wait until the daemon answers (a subprocess that is starting)."""
        with trio.fail_after(timeout):
            while True:
                try:
                    if (await self.http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)

    async def address(self, label: str) -> dict[str, Any]:
        return (await self.post("/v1/addresses", {"chain": self.chain, "label": label})).json()

    async def hot_wallet(self) -> str:
        r = await self.http.get("/v1/admin/status", headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json()["hot_wallets"][self.chain]

    async def transfers(self, **params: Any) -> list[dict[str, Any]]:
        return (await self.get("/v1/transfers", chain=self.chain, limit=1000, **params))["items"]

    async def sweeps(self) -> list[dict[str, Any]]:
        return (await self.get("/v1/sweeps", chain=self.chain, limit=1000))["items"]

    async def scanned(self) -> int | None:
        return (await self.get("/v1/chains"))["items"][0]["scanned"]

    async def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = 0
        for _ in range(100):  # bounded: 100,000 events is far more than any test makes
            page = await self.get("/v1/events", after=after, limit=1000)
            if not page["items"]:
                return out
            out += page["items"]
            after = page["last_seq"]
        raise AssertionError("more than 100,000 events")

    async def history(self, subject: str) -> list[str]:
        """The event types about one object (a transfer, invoice, payout or sweep), in order."""
        return [e["type"] for e in await self.events() if e["data"].get("id") == subject]

    async def payout(self, to: str, asset: str, amount: int, decimals: int, key: str) -> httpx.Response:
        return await self.post("/v1/payouts", {"chain": self.chain, "asset": asset, "to": to, "idempotency_key": key,
                                               "amount": format_amount(amount, decimals)})


async def until(check: Callable[[], Awaitable[Any]], *, mine: FamilyHarness | None = None, timeout: float = 30.0,
                interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy, mining a block between polls if
    ``mine`` is given; fail after ``timeout`` seconds."""
    deadline = trio.current_time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if trio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        if mine is not None:
            mine.mine(1)
        await trio.sleep(interval)


async def synced(api: Api, h: FamilyHarness) -> None:
    """Wait until watcher has scanned the node's newest block."""
    head = h.head()
    await until(lambda: _ge(api.scanned(), head), what=f"scan to block {head}")


async def _ge(value: Awaitable[int | None], target: int) -> bool:
    v = await value
    return v is not None and v >= target


def in_status(api: Api, path: str, *statuses: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
    """A check for :func:`until`: the object at ``path`` once its status is one of ``statuses``."""

    async def check() -> dict[str, Any] | None:
        obj = await api.get(path)
        return obj if obj["status"] in statuses else None

    return check


def native_units(h: FamilyHarness, text: str | None) -> int:
    return 0 if text is None else parse_amount(text, h.decimals(h.native), allow_zero=True)


def mined(txs: list[dict[str, Any]], purpose: str) -> list[dict[str, Any]]:
    return [t for t in txs if t["purpose"] == purpose and t["status"] == "mined"]


# --- derive, watch ------------------------------------------------------------------------------


async def test_derive_and_watch(harness: FamilyHarness, tmp_path: Path):
    """Deposit addresses are the ones the family derives from the seed at the chain's key
    scheme, one per label and stable; the hot wallet is ``<hot account>/0/0``; an address
    watcher did not derive is watched and its incoming transfer recorded and confirmed."""
    h = harness
    cfg, port = configure(h, tmp_path)
    spec = load_config(cfg, chain_families(make_plugin_manager())).chain(h.chain_id).spec
    keyring = Keyring.from_mnemonic(TEST_MNEMONIC)

    def derived(account: str, index: int) -> str:
        return spec.display_address(spec.address_from_public_key(keyring.public_key(account, index)))

    with trio.fail_after(60):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            first = await api.post("/v1/addresses", {"chain": h.chain_id, "label": "alice"})
            second = await api.post("/v1/addresses", {"chain": h.chain_id, "label": "bob"})
            again = await api.post("/v1/addresses", {"chain": h.chain_id, "label": "alice"})
            assert (first.status_code, second.status_code, again.status_code) == (201, 201, 200)
            assert again.json() == first.json()
            for i, r in enumerate((first, second)):
                a = r.json()
                assert a["kind"] == "deposit" and a["derivation_path"] == f"{spec.keys.deposit_path}/0/{i}"
                assert a["address"] == derived(spec.keys.deposit_path, i)
                assert spec.display_address(spec.validate_address(a["address"])) == a["address"]
            assert await api.hot_wallet() == derived(spec.keys.hot_path, 0)

            cold = h.fresh_address()
            r = await api.post("/v1/watch", {"chain": h.chain_id, "address": cold, "label": "cold"})
            assert r.status_code == 201 and r.json()["kind"] == "external" and r.json()["derivation_path"] is None
            amount = h.units(h.native, "0.75") + 11
            txid = h.pay(cold, h.native, amount)
            t = (await until(lambda: api.transfers(status="confirmed"), mine=h, what="the watched transfer"))
            assert [(x["txid"], x["address"], x["label"], x["base_units"]) for x in t] == [
                (txid, cold, "cold", str(amount))]
            totals = (await api.get(f"/v1/addresses/{h.chain_id}/{cold}"))["totals"]
            assert totals == {h.native: {"confirmed": format_amount(amount, h.decimals(h.native)), "pending": "0",
                                         "transfers": 1}}


# --- pay, detect, confirm --------------------------------------------------------------------


async def test_pay_detect_confirm(harness: FamilyHarness, tmp_path: Path):
    """A payment of each asset to a deposit address is one transfer with the exact base
    units: ``detected`` at 1 confirmation, ``confirmed`` at the chain's confirmations, each
    event exactly once, confirmations counted on from the canonical head."""
    h = harness
    cfg, port = configure(h, tmp_path, confirmations=2)
    with trio.fail_after(60):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            paid = {}
            for i, asset in enumerate(h.assets):
                address = (await api.address(f"user-{asset}"))["address"]
                amount = h.units(asset, "1.25") + 3 + i
                paid[h.pay(address, asset, amount)] = (asset, address, amount)
            h.mine(1)
            await synced(api, h)
            detected = await api.transfers()
            assert {t["txid"] for t in detected} == set(paid) and len(detected) == len(paid)
            for t in detected:
                asset, address, amount = paid[t["txid"]]
                assert (t["asset"], t["address"], t["base_units"], t["decimals"]) == (
                    asset, address, str(amount), h.decimals(asset))
                assert t["status"] == "detected" and t["confirmations"] == 1 and t["label"] == f"user-{asset}"
            h.mine(1)
            await synced(api, h)
            confirmed = await until(lambda: _all(api.transfers(), "confirmed", len(paid)), what="confirmed")
            assert all(t["confirmations"] == 2 for t in confirmed)
            h.mine(3)
            await synced(api, h)
            for t in await api.transfers():
                assert t["status"] == "confirmed" and t["confirmations"] == 5
                assert await api.history(t["id"]) == ["transfer.detected", "transfer.confirmed"]


async def _all(items: Awaitable[list[dict[str, Any]]], status: str, count: int) -> list[dict[str, Any]] | None:
    got = await items
    return got if len(got) == count and all(t["status"] == status for t in got) else None


# --- reorg, orphan ----------------------------------------------------------------------------


async def test_reorg_orphans_dropped_and_confirms_reincluded_once(harness: FamilyHarness, tmp_path: Path):
    """Two payments in one block, two blocks deep (fewer than the 3 confirmations); the two
    blocks are replaced and only one payment is in the new chain. The dropped one is
    ``orphaned``; the kept one is detected again and confirmed once; nothing is credited
    twice, and the address totals match the balances on the node."""
    h = harness
    cfg, port = configure(h, tmp_path, confirmations=3)
    with trio.fail_after(60):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            gone = (await api.address("reorg-dropped"))["address"]
            kept = (await api.address("reorg-kept"))["address"]
            kept_asset = h.assets[-1]  # a token where the family has one
            gone_amount, kept_amount = h.units(h.native, "0.5") + 1, h.units(kept_asset, "3") + 2
            gone_tx = h.pay(gone, h.native, gone_amount)
            kept_tx = h.pay(kept, kept_asset, kept_amount)
            h.mine(2)
            await synced(api, h)
            before = {t["txid"]: t for t in await api.transfers()}
            assert set(before) == {gone_tx, kept_tx} and {t["status"] for t in before.values()} == {"detected"}

            h.reorg(2, keep=[kept_tx])
            by_tx = await until(lambda: _reorged(api, gone_tx, kept_tx), what="the reorg handled")
            assert by_tx[gone_tx]["id"] == before[gone_tx]["id"] and by_tx[kept_tx]["id"] == before[kept_tx]["id"]
            h.mine(3)
            await synced(api, h)
            by_tx = {t["txid"]: t for t in await api.transfers()}
            assert by_tx[kept_tx]["status"] == "confirmed" and by_tx[kept_tx]["base_units"] == str(kept_amount)
            assert by_tx[gone_tx]["status"] == "orphaned" and by_tx[gone_tx]["confirmations"] == 0
            assert len(by_tx) == 2
            assert await api.history(by_tx[gone_tx]["id"]) == ["transfer.detected", "transfer.orphaned"]
            assert await api.history(by_tx[kept_tx]["id"]) == [
                "transfer.detected", "transfer.orphaned", "transfer.detected", "transfer.confirmed"]
            # credited once, and only what the chain holds
            assert h.balance(gone, h.native) == 0 and h.balance(kept, kept_asset) == kept_amount
            assert (await api.get(f"/v1/addresses/{h.chain_id}/{gone}"))["totals"] == {}
            totals = (await api.get(f"/v1/addresses/{h.chain_id}/{kept}"))["totals"]
            assert totals == {kept_asset: {"confirmed": format_amount(kept_amount, h.decimals(kept_asset)),
                                           "pending": "0", "transfers": 1}}


async def _reorged(api: Api, gone: str, kept: str) -> dict[str, dict[str, Any]] | None:
    by_tx = {t["txid"]: t for t in await api.transfers()}
    if by_tx[gone]["status"] != "orphaned" or by_tx[kept]["status"] != "detected":
        return None
    return by_tx if "transfer.orphaned" in await api.history(by_tx[kept]["id"]) else None


# --- invoices ---------------------------------------------------------------------------------


async def test_invoice_paid_exactly_completes_and_underpaid_is_partial(harness: FamilyHarness, tmp_path: Path):
    """For each asset: a sale invoice paid exactly goes ``awaiting_payment`` →
    ``awaiting_confirmation`` → ``completed``; one paid half stays ``awaiting_payment``
    with the ``partial`` flag and the right ``due``."""
    h = harness
    cfg, port = configure(h, tmp_path, confirmations=2)
    with trio.fail_after(60):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            cases = []
            for asset in h.assets:
                d = h.decimals(asset)
                price = h.units(asset, "2.5") + 9
                exact, part = [(await api.post("/v1/invoices", {
                    "chain": h.chain_id, "asset": asset, "amount": format_amount(price, d), "order_id": f"{kind}-{asset}",
                    "expires_in": 3600})).json() for kind in ("exact", "partial")]
                assert exact["status"] == part["status"] == "awaiting_payment"
                assert exact["address"] != part["address"]
                h.pay(exact["address"], asset, price)
                h.pay(part["address"], asset, price // 2)
                cases.append((d, price, exact, part))
            h.mine(1)

            async def done() -> bool:
                statuses = [(await api.get(f"/v1/invoices/{c[2]['id']}"))["status"] for c in cases]
                return statuses == ["completed"] * len(cases)

            await until(done, mine=h, what="invoices completed")
            h.mine(1)
            await synced(api, h)
            for d, price, exact, part in cases:
                e = await api.get(f"/v1/invoices/{exact['id']}")
                assert (e["received"], e["confirmed"], e["due"]) == (format_amount(price, d), format_amount(price, d), "0")
                assert not (e["partial"] or e["overpaid"] or e["late"]) and len(e["payments"]) == 1
                assert await api.history(exact["id"]) == [
                    "invoice.created", "invoice.awaiting_confirmation", "invoice.completed"]
                p = await api.get(f"/v1/invoices/{part['id']}")
                assert p["status"] == "awaiting_payment" and p["partial"] and not p["overpaid"]
                assert p["received"] == format_amount(price // 2, d) and p["due"] == format_amount(price - price // 2, d)
                assert await api.history(part["id"]) == ["invoice.created"]


async def test_invoice_moved_back_by_a_reorg_then_completed_once(harness: FamilyHarness, tmp_path: Path):
    """A reorg that drops an invoice's only payment (before it is confirmed) moves the invoice
    back to ``awaiting_payment``; a new payment completes it, counting only what the chain
    holds."""
    h = harness
    asset = h.assets[-1]
    cfg, port = configure(h, tmp_path, confirmations=3)
    with trio.fail_after(60):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            d = h.decimals(asset)
            price = h.units(asset, "5") + 1
            inv = (await api.post("/v1/invoices", {"chain": h.chain_id, "asset": asset, "expires_in": 3600,
                                                   "amount": format_amount(price, d)})).json()
            path = f"/v1/invoices/{inv['id']}"
            h.pay(inv["address"], asset, price)
            h.mine(2)
            await until(in_status(api, path, "awaiting_confirmation"), what="awaiting_confirmation")
            h.reorg(2)
            back = await until(in_status(api, path, "awaiting_payment"), what="moved back")
            assert back["received"] == "0" and not back["partial"]
            second = h.pay(inv["address"], asset, price)
            done = await until(in_status(api, path, "completed"), mine=h, what="completed")
            assert done["received"] == done["confirmed"] == format_amount(price, d) and not done["overpaid"]
            assert [(p["txid"], p["counted"]) for p in done["payments"] if p["status"] != "orphaned"] == [(second, True)]
            assert h.balance(inv["address"], asset) == price
            assert await api.history(inv["id"]) == [
                "invoice.created", "invoice.awaiting_confirmation", "invoice.awaiting_payment",
                "invoice.awaiting_confirmation", "invoice.completed"]


# --- sweeps ------------------------------------------------------------------------------------


async def test_sweeps_reach_the_treasury_exactly(harness: FamilyHarness, tmp_path: Path):
    """Confirmed deposits of every asset (two to one address per asset) are swept to a fresh
    treasury: each sweep ``confirmed`` once, every deposit covered by exactly one sweep, and
    the treasury's balance on the node is exactly the sum of the sweeps' amounts (the whole
    deposits for tokens; for the native coin what is left after the fee). What stays at a
    deposit address is the sweep's ``dust``. A second run sweeps nothing again."""
    h = harness
    treasury = h.fresh_address()
    cfg, port = configure(h, tmp_path, confirmations=2, sweep=sweep_config(h, treasury))
    with trio.fail_after(90):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            h.fund(await api.hot_wallet(), h.native, h.units(h.native, "10"))  # gas top-ups, where needed
            deposited: dict[str, int] = {}
            for asset in h.assets:
                address = (await api.address(f"sweep-{asset}"))["address"]
                amounts = [h.units(asset, "1.5") + 1, h.units(asset, "0.25") + 2]
                for amount in amounts:
                    h.pay(address, asset, amount)
                deposited[asset] = sum(amounts)
            count = 2 * len(h.assets)
            deposits = await until(lambda: _all(api.transfers(), "confirmed", count), mine=h, what="deposits")
            assert (await api.post("/v1/sweeps/run", {}, admin=True)).status_code == 202
            sweeps = await until(lambda: _swept(api, h.assets), mine=h, timeout=60, what="sweeps confirmed")

            covered = [tid for s in sweeps for tid in s["deposits"]]
            assert sorted(covered) == sorted(t["id"] for t in deposits)  # each deposit, exactly once
            for asset in h.assets:
                mine_ = [s for s in sweeps if s["asset"] == asset]
                swept = sum(int(s["base_units"]) for s in mine_)
                assert h.balance(treasury, asset) == swept, asset
                if asset == h.native:
                    assert 0 < swept <= deposited[asset]
                else:
                    assert swept == deposited[asset]
                for s in mine_:
                    assert len(mined(s["transactions"], "sweep")) == 1
                    funding = ["sweep.funding"] if s["topup_txid"] else []
                    assert await api.history(s["id"]) == ["sweep.planned", *funding, "sweep.broadcast",
                                                          "sweep.confirmed"]
                    left = sum(h.balance(a, h.native) for a in s["addresses"])
                    assert left == native_units(h, s["dust"]), s
                    if asset != h.native:
                        assert all(h.balance(a, asset) == 0 for a in s["addresses"])

            # the same deposits are never swept twice
            assert (await api.post("/v1/sweeps/run", {}, admin=True)).status_code == 202
            for _ in range(4):
                h.mine(1)
                await trio.sleep(0.15)
            assert len(await api.sweeps()) == len(sweeps)


async def _swept(api: Api, assets: tuple[str, ...]) -> list[dict[str, Any]] | None:
    sweeps = await api.sweeps()
    failed = [s for s in sweeps if s["status"] == "failed"]
    assert not failed, failed
    if {s["asset"] for s in sweeps} == set(assets) and all(s["status"] == "confirmed" for s in sweeps):
        return sweeps
    return None


# --- payouts, fee bump -------------------------------------------------------------------------


async def test_payout_completes_once_and_idempotency_replays(harness: FamilyHarness, tmp_path: Path):
    """A payout of each asset from the funded hot wallet to a fresh address is ``completed``
    with one mined transaction, and the recipient's balance on the node is exactly the
    amount; the same idempotency key returns the same payout, before and after completion."""
    h = harness
    cfg, port = configure(h, tmp_path, confirmations=2, payouts={"stuck_after": NEVER_STUCK})
    with trio.fail_after(60):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            hot = await api.hot_wallet()
            for asset in h.assets:
                h.fund(hot, asset, h.units(asset, "10"))
            sent = []
            for asset in h.assets:
                to, amount = h.fresh_address(), h.units(asset, "0.3") + 5
                r1 = await api.payout(to, asset, amount, h.decimals(asset), f"pay-{asset}")
                r2 = await api.payout(to, asset, amount, h.decimals(asset), f"pay-{asset}")
                assert r1.json()["id"] == r2.json()["id"] and r2.headers.get("idempotent-replayed") == "true"
                sent.append((asset, to, amount, r1.json()["id"]))

            async def completed() -> bool:
                statuses = [(await api.get(f"/v1/payouts/{p[3]}"))["status"] for p in sent]
                return statuses == ["completed"] * len(sent)

            await until(completed, mine=h, what="payouts completed")
            h.mine(2)
            await trio.sleep(0.3)
            for asset, to, amount, pid in sent:
                p = await api.get(f"/v1/payouts/{pid}")
                assert p["status"] == "completed" and p["base_units"] == str(amount) and p["fee_paid"] is not None
                assert [t["txid"] for t in mined(p["transactions"], "payout")] == [p["txid"]]
                assert len(p["transactions"]) == 1
                assert h.balance(to, asset) == amount, asset
                again = await api.payout(to, asset, amount, h.decimals(asset), f"pay-{asset}")
                assert again.json()["id"] == pid and again.json()["status"] == "completed"
                assert await api.history(pid) == ["payout.pending", "payout.broadcast", "payout.completed"]
            assert len((await api.get("/v1/payouts", chain=h.chain_id))["items"]) == len(sent)


async def test_stuck_payout_is_replaced_and_completes_once(harness: FamilyHarness, tmp_path: Path):
    """While fees are held the payout's transaction cannot be mined; after ``stuck_after``
    watcher replaces it. Once blocks take it again, exactly one transaction of the group is
    mined, the others are ``replaced``, the payout's ``txid`` is the mined one, and the
    recipient received the amount exactly once."""
    h = harness
    cfg, port = configure(h, tmp_path, confirmations=2, payouts={"stuck_after": 1.0, "fee_bump": "0.2"})
    with trio.fail_after(60):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            h.fund(await api.hot_wallet(), h.native, h.units(h.native, "10"))
            to, amount = h.fresh_address(), h.units(h.native, "0.5") + 1
            pid = (await api.payout(to, h.native, amount, h.decimals(h.native), "stuck")).json()["id"]
            await until(in_status(api, f"/v1/payouts/{pid}", "broadcast"), what="the payout broadcast")
            h.hold_fees()
            try:
                async def replaced() -> dict[str, Any] | None:
                    p = await api.get(f"/v1/payouts/{pid}")
                    return p if len(p["transactions"]) >= 2 else None

                await until(replaced, mine=h, interval=0.3, what="a replacement")
                assert h.balance(to, h.native) in (0, amount)
            finally:
                h.release_fees()
            await until(in_status(api, f"/v1/payouts/{pid}", "completed"), mine=h, what="payout completed")
            h.mine(2)
            await trio.sleep(0.3)
            p = await api.get(f"/v1/payouts/{pid}")
            won = mined(p["transactions"], "payout")
            assert len(won) == 1 and p["txid"] == won[0]["txid"] and p["status"] == "completed"
            assert {t["status"] for t in p["transactions"]} == {"mined", "replaced"}
            assert h.balance(to, h.native) == amount  # paid exactly once
            assert await api.history(pid) == ["payout.pending", "payout.broadcast", "payout.completed"]


async def test_completed_payout_taken_off_the_chain_is_sent_again_once(harness: FamilyHarness, tmp_path: Path):
    """The finality guard: a reorg deeper than ``confirmations`` drops a completed payout's
    transaction; watcher sends the same transaction again (never a new one), the payout
    stays ``completed`` with the block it landed in now (``payout.remined``), and the
    recipient ends up paid exactly once."""
    h = harness
    cfg, port = configure(h, tmp_path, confirmations=1, finality_depth=8, payouts={"stuck_after": NEVER_STUCK})
    with trio.fail_after(60):
        async with running(cfg, api=True), Api(port, h.chain_id) as api:
            h.fund(await api.hot_wallet(), h.native, h.units(h.native, "10"))
            to, amount = h.fresh_address(), h.units(h.native, "0.4") + 3
            pid = (await api.payout(to, h.native, amount, h.decimals(h.native), "reorged")).json()["id"]
            done = await until(in_status(api, f"/v1/payouts/{pid}", "completed"), mine=h, what="payout completed")
            assert h.balance(to, h.native) == amount
            h.mine(1)
            h.reorg(h.head() - done["block_number"] + 1)  # the payout's block and every later one
            assert h.balance(to, h.native) == 0

            async def paid_again() -> bool:
                return h.balance(to, h.native) == amount

            await until(paid_again, mine=h, interval=0.2, what="the payout mined again")
            h.mine(8)  # past finality_depth: the guard stops following it

            async def remined() -> bool:
                return "payout.remined" in await api.history(pid)

            await until(remined, what="payout.remined")
            p = await api.get(f"/v1/payouts/{pid}")
            assert p["status"] == "completed" and [t["txid"] for t in p["transactions"]] == [done["txid"]]
            assert p["transactions"][0]["status"] == "mined"
            # the reorg replaced every block from the payout's on: it landed after them
            assert p["block_number"] == p["transactions"][0]["block_number"] > done["block_number"]
            assert h.balance(to, h.native) == amount  # paid exactly once
            assert await api.history(pid) == ["payout.pending", "payout.broadcast", "payout.completed",
                                              "payout.remined"]


# --- kill -9 at each money-moving step ------------------------------------------------------------


@dataclass
class Work:
    """One payout or one sweep, started before the kill and judged after the restart."""

    purpose: str  # payout, sweep or topup (a token sweep that needs a gas top-up)
    asset: str
    amount: int
    to: str = ""  # the payout's recipient
    payout: tuple[Any, ...] = ()  # the payout request, to send again after the restart
    ref: str = ""  # the payout's id
    deposit: str = ""  # the address swept
    treasury: str = ""


async def start_work(api: Api, h: FamilyHarness, purpose: str, treasury: str) -> Work:
    hot = await api.hot_wallet()
    if purpose in ("payout", "topup"):
        h.fund(hot, h.native, h.units(h.native, "10"))
    if purpose == "payout":
        w = Work(purpose, h.native, h.units(h.native, "0.3") + 7, to=h.fresh_address())
        w.payout = (w.to, w.asset, w.amount, h.decimals(w.asset), "kill-once")
        w.ref = (await api.payout(*w.payout)).json()["id"]
        return w
    asset = h.native if purpose == "sweep" else h.tokens[0]
    w = Work(purpose, asset, h.units(asset, "2.5") + 7, deposit=(await api.address("to-sweep"))["address"],
             treasury=treasury)
    h.pay(w.deposit, asset, w.amount)
    await until(lambda: _all(api.transfers(), "confirmed", 1), mine=h, what="the deposit confirmed")
    await api.post("/v1/sweeps/run", {}, admin=True)
    return w


async def judge_work(api: Api, h: FamilyHarness, w: Work) -> None:
    """Finish the work after the restart and judge it against the chain."""
    if w.purpose == "payout":
        again = await api.payout(*w.payout)  # the app retries: still the one payout
        assert again.json()["id"] == w.ref

        await until(in_status(api, f"/v1/payouts/{w.ref}", "completed", "failed"), mine=h,
                    what="the payout completed")
        h.mine(3)  # a second transaction, if one went out, would be mined now
        await trio.sleep(0.3)
        p = await api.get(f"/v1/payouts/{w.ref}")
        assert p["status"] == "completed", p
        assert len(p["transactions"]) == 1 and len(mined(p["transactions"], "payout")) == 1, p
        assert h.balance(w.to, w.asset) == w.amount  # paid exactly once
        assert len((await api.get("/v1/payouts"))["items"]) == 1
        return

    await api.post("/v1/sweeps/run", {}, admin=True)  # nothing new to plan

    async def done_sweeps() -> list[dict[str, Any]] | None:
        sweeps = await api.sweeps()
        return sweeps if sweeps and all(s["status"] in ("confirmed", "failed") for s in sweeps) else None

    await until(done_sweeps, mine=h, what="the sweep confirmed")
    h.mine(3)
    await trio.sleep(0.3)
    sweeps = await api.sweeps()
    assert [s["status"] for s in sweeps] == ["confirmed"], sweeps
    s = sweeps[0]
    assert s["deposits"] == [t["id"] for t in await api.transfers() if t["address"] == w.deposit]
    assert len(mined(s["transactions"], "sweep")) == 1, s
    assert h.balance(w.treasury, w.asset) == int(s["base_units"])  # swept exactly once
    assert 0 < int(s["base_units"]) <= w.amount
    assert h.balance(w.deposit, h.native) == native_units(h, s["dust"])
    if w.purpose == "topup":
        assert int(s["base_units"]) == w.amount and h.balance(w.deposit, w.asset) == 0
        assert len(mined(s["transactions"], "topup")) == 1, s  # gas sent once
        assert native_units(h, s["topup_amount"]) == native_units(h, s["fee_paid"]) + native_units(h, s["dust"])


@pytest.mark.parametrize("point", ALL_FAILPOINTS)
async def test_killed_at_failpoint_moves_money_exactly_once(harness: FamilyHarness, tmp_path: Path, point: str):
    """The daemon runs as a real subprocess with one fail point and SIGKILLs itself there
    (``payout.*``: one payout; ``sweep.*``: one native sweep; ``topup.*``: one token sweep
    that needs a gas top-up). Restarted on the same database without it, the payout
    completes or the sweep confirms, and the chain shows the money moved exactly once: the
    recipient's or the treasury's balance is exactly the amount, one transaction of the step
    is mined, the app's retry of the payout gets the same payout.

    The restart runs in this test's process (a real daemon on the same files, started in
    ~0.1 s instead of ~2 s for a new interpreter): the fail points, read from the environment
    when watcher is imported, are off here."""
    h = harness
    if point not in h.failpoints:
        pytest.skip(f"the {h.family} family never reaches {point}")
    assert not failpoints._ACTIVE, "WATCHER_FAILPOINTS is set for the test process itself: it would kill pytest"
    treasury = h.fresh_address()
    cfg, port = configure(h, tmp_path, confirmations=2, payouts={"stuck_after": NEVER_STUCK},
                          sweep=sweep_config(h, treasury))
    proc = DaemonProcess(cfg, log_path=tmp_path / "killed.log", env={"WATCHER_FAILPOINTS": point})
    try:
        with trio.fail_after(60):
            async with Api(port, h.chain_id) as api:
                proc.start()
                await api.up()
                work = await start_work(api, h, point.split(".")[0], treasury)
                deadline = trio.current_time() + 20
                while proc.alive():  # drive the work until the daemon kills itself at the point
                    assert trio.current_time() < deadline, f"{point} never reached:\n{proc.log()[-3000:]}"
                    h.mine(1)
                    await trio.sleep(0.1)
                assert proc.proc is not None and proc.proc.wait() == -signal.SIGKILL
                log = proc.log()
                assert f"fail point {point} reached" in log
                assert '"level":"error"' not in log and "Traceback" not in log, log[-4000:]
                async with running(cfg, api=True):
                    await judge_work(api, h, work)
    finally:
        proc.stop()

