"""Invoice expiry, late payment and the monitoring window, driven by Trio's MockClock (hours
pass in milliseconds); the chain is a real anvil node."""

from __future__ import annotations

import time

import pytest
import trio
from trio.testing import MockClock

from tests.support.daemon import chain_entry, running, wait_until, write_config
from tests.support.evm import Anvil, Token
from watcher.clock import TrioClock


@pytest.fixture
def clock():
    # jump only after 20 ms of real idleness, so real I/O with anvil is never cut short
    return MockClock(autojump_threshold=0.02)


@pytest.fixture
def cfg(tmp_path, anvil: Anvil, token: Token):
    token.mint(anvil.accounts[1], 10**12)
    anvil.automine(False)
    return write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)],
                                               confirmations=3, poll_interval=120)],
                        extra={"invoices": {"monitoring_window": 3600}})


def create(d, expires_in=600):
    row = d.store.invoices.create(chain="devnet", asset="USDT", amount=10_000_000, mode="sale", expires_in=expires_in,
                                  tolerance_ppm=0, order_id=None, metadata={}, actor="t")
    return d.views.invoice(row.id)


def events(d, inv):
    return [e.type for e in d.store.events.list(subject=inv["id"], limit=100)]


async def pay(anvil, token, d, inv, units=10_000_000, blocks=1):
    token.transfer(anvil.accounts[1], inv["address"], units)
    anvil.mine(blocks)
    d.watchers["devnet"].poke()
    await wait_until_mock(lambda: d.store.chains.scanned_number("devnet") == anvil.head(), what="scan")


async def wait_until_mock(predicate, *, timeout=20.0, what="condition"):
    # checks once a (mock) second: every clock jump costs a little real idleness
    return await wait_until(predicate, timeout=timeout, interval=1.0, what=what)


def status(d, inv):
    return d.views.invoice(inv["id"])["status"]


async def test_unpaid_invoice_expires_on_time(cfg, clock):
    async with running(cfg, clock=TrioClock(anchor=time.time())) as d:
        inv = create(d, expires_in=600)
        t0 = trio.current_time()
        await trio.sleep(599)
        assert status(d, inv) == "awaiting_payment"
        await wait_until_mock(lambda: status(d, inv) == "expired", timeout=5, what="expired")
        assert 600 <= trio.current_time() - t0 <= 601
        assert events(d, inv) == ["invoice.created", "invoice.expired"]


async def test_late_payment_completes_flagged_late(cfg, clock, anvil, token):
    async with running(cfg, clock=TrioClock(anchor=time.time())) as d:
        inv = create(d, expires_in=600)
        await trio.sleep(900)
        assert status(d, inv) == "expired"
        await pay(anvil, token, d, inv)
        v = d.views.invoice(inv["id"])
        assert v["status"] == "awaiting_confirmation" and v["late"]
        anvil.mine(2)
        d.watchers["devnet"].poke()
        await wait_until_mock(lambda: status(d, inv) == "completed", what="completed")
        assert d.views.invoice(inv["id"])["late"]
        assert events(d, inv) == ["invoice.created", "invoice.expired", "invoice.awaiting_confirmation",
                                  "invoice.completed"]


async def test_paid_but_unconfirmed_fails_at_end_of_monitoring_window(cfg, clock, anvil, token):
    async with running(cfg, clock=TrioClock(anchor=time.time())) as d:
        inv = create(d, expires_in=600)
        await pay(anvil, token, d, inv)  # 1 confirmation of 3, and no more blocks come
        assert status(d, inv) == "awaiting_confirmation"
        await trio.sleep(600 + 3600 - 5)
        assert status(d, inv) == "awaiting_confirmation"
        await wait_until_mock(lambda: status(d, inv) == "failed", timeout=10, what="failed")
        # confirmations arriving after the window change nothing: failed is final
        anvil.mine(5)
        d.watchers["devnet"].poke()
        await wait_until_mock(lambda: d.views.transfers()[0][0]["status"] == "confirmed", what="transfer confirmed")
        assert status(d, inv) == "failed"
        assert events(d, inv) == ["invoice.created", "invoice.awaiting_confirmation", "invoice.failed"]


async def test_an_unconfirmed_extra_payment_neither_holds_back_nor_fails_a_confirmed_invoice(cfg, clock, anvil,
                                                                                          token):
    """The amount is paid and confirmed; one base unit more (from anyone: the address is
    public) arrives later and stays short of its confirmations. Before the fix the invoice
    waited for every payment, stayed awaiting_confirmation and failed at monitor_until with
    the whole amount confirmed."""
    async with running(cfg, clock=TrioClock(anchor=time.time())) as d:
        inv = create(d, expires_in=600)
        await pay(anvil, token, d, inv)  # block n, 1 confirmation of 3
        await pay(anvil, token, d, inv, units=1, blocks=2)  # the dust in n + 1; the payment has 3
        v = d.views.invoice(inv["id"])
        assert [p["confirmations"] for p in v["payments"]] == [3, 2] and v["overpaid"]
        assert v["status"] == "completed", v
        await trio.sleep(600 + 3600 + 10)  # past monitor_until, no block more
        await wait_until_mock(lambda: d.store.invoices.apply_deadlines() == 0, what="deadlines applied")
        assert status(d, inv) == "completed"
        assert events(d, inv) == ["invoice.created", "invoice.awaiting_confirmation", "invoice.completed"]


async def test_a_completed_invoice_whose_payment_a_reorg_moves_after_the_window_completes_again(cfg, clock, anvil,
                                                                                               token):
    """Paid and confirmed in time, completed; past ``monitor_until`` a reorg takes the
    payment's block and the new chain holds it again, two blocks later. The rollback moved the
    invoice to ``expired`` (no live payment for a moment); the payment found again was paid
    but unconfirmed past the window, so it ``failed``, for good, and stayed failed once
    confirmed. The clock fails only an invoice that never had its payment confirmed."""
    async with running(cfg, clock=TrioClock(anchor=time.time())) as d:
        inv = create(d, expires_in=600)
        await pay(anvil, token, d, inv, blocks=3)
        assert status(d, inv) == "completed"
        txid = d.views.invoice(inv["id"])["payments"][0]["txid"]
        await trio.sleep(600 + 3600 + 10)
        anvil.reorg(3, [(anvil.raw_tx(txid), 2)])  # 1 confirmation of 3 in the new chain
        d.watchers["devnet"].poke()
        await wait_until_mock(lambda: d.views.invoice(inv["id"])["payments"][0]["confirmations"] == 1
                              and d.store.chains.scanned_number("devnet") == anvil.head(), what="found again")
        assert status(d, inv) == "awaiting_confirmation"
        assert d.store.invoices.apply_deadlines() == 0 and status(d, inv) == "awaiting_confirmation"
        anvil.mine(2)
        d.watchers["devnet"].poke()
        await wait_until_mock(lambda: status(d, inv) == "completed", what="completed again")
        assert events(d, inv)[-3:] == ["invoice.expired", "invoice.awaiting_confirmation", "invoice.completed"]
        assert d.views.invoice(inv["id"])["confirmed"] == "10"


async def test_payment_after_monitoring_window_is_recorded_but_does_not_count(cfg, clock, anvil, token):
    async with running(cfg, clock=TrioClock(anchor=time.time())) as d:
        inv = create(d, expires_in=600)
        await trio.sleep(600 + 3600 + 10)
        await pay(anvil, token, d, inv, blocks=3)
        v = d.views.invoice(inv["id"])
        assert v["status"] == "expired" and v["received"] == "0"
        assert v["payments"][0]["counted"] is False and v["payments"][0]["status"] == "confirmed"
        assert d.views.transfers()[0][0]["invoice_id"] == inv["id"]  # the app still hears about it


async def test_deadlines_survive_a_restart(cfg, clock):
    anchor = time.time()
    async with running(cfg, clock=TrioClock(anchor=anchor)) as d:
        inv = create(d, expires_in=600)
        await trio.sleep(100)
    # down for a while; on start the overdue invoice expires at once
    async with running(cfg, clock=TrioClock(anchor=anchor + 1000)) as d:
        await wait_until_mock(lambda: status(d, inv) == "expired", timeout=1, what="expired after restart")
