"""Webhook delivery: signatures, at-least-once with retries, ordering numbers, isolation of
slow endpoints, 410, rotation, redelivery. Receivers are real HTTP servers on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import httpx
import pytest
import trio
from standardwebhooks import Webhook
from trio.testing import MockClock

from tests.support.daemon import (
    AUTH,
    chain_entry,
    free_port,
    running,
    wait_until,
    write_config,
)
from tests.support.receiver import receiving
from watcher import netguard
from watcher.clock import TrioClock
from watcher.dispatch import next_delay, parse_retry_after, sign

DEAD_NODE = "http://127.0.0.1:9"  # these tests need no chain: events come from invoices and test sends


def config(tmp_path, schedule=(0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2), **webhooks):
    return write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)],
                        extra={"webhooks": {"schedule": list(schedule), **webhooks}})


def new_invoice(d, n=0):
    row = d.store.invoices.create(chain="devnet", asset="ETH", amount=10**18 + n, mode="sale", expires_in=3600,
                                  tolerance_ppm=0, order_id=f"o{n}", metadata={}, actor="test")
    return d.views.invoice(row.id)


def verify_by_hand(secret: str, req) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg = f"{req.headers['webhook-id']}.{req.headers['webhook-timestamp']}.".encode() + req.body
    expected = base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode()
    return any(s == f"v1,{expected}" for s in req.headers["webhook-signature"].split())


def test_signature_matches_the_standard_webhooks_library():
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"type":"invoice.completed"}'
    ts = int(time.time())
    sig = sign(secret, "evt_1", ts, body)
    Webhook(secret).verify(body, {"webhook-id": "evt_1", "webhook-timestamp": str(ts), "webhook-signature": sig})
    with pytest.raises(Exception):  # noqa: B017 - the library's own verification error
        Webhook(secret).verify(body + b" ", {"webhook-id": "evt_1", "webhook-timestamp": str(ts),
                                             "webhook-signature": sig})


def test_retry_after_and_schedule_helpers():
    import random

    rng = random.Random(1)
    sched = (0, 5, 300)
    assert 4.5 <= next_delay(sched, 1, None, rng) <= 5.5
    assert next_delay(sched, 1, 120.0, rng) == 120.0  # never sooner than Retry-After
    assert 270 <= next_delay(sched, 2, 10.0, rng) <= 330  # the schedule wins when it is later
    assert next_delay(sched, 3, None, rng) is None
    assert parse_retry_after("30", 0) == 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480 - 60) == 60
    assert parse_retry_after("soon", 0) is None and parse_retry_after("9999999", 0) == 86400


async def test_failing_receiver_gets_every_event_once_after_dedupe_across_a_restart(tmp_path):
    answered: list[int] = []

    def behavior(r) -> int:  # an outage for the first 8 requests, however long start-up takes
        answered.append(500 if len(answered) < 8 else 200)
        return answered[-1]

    async with receiving(behavior) as rx:
        # ten attempts per delivery, well past the outage, so no delivery runs out of attempts
        cfg = config(tmp_path, schedule=(0, 0.3, 0.3, 0.3, 0.5, 0.5, 0.5, 1, 1, 1))
        with trio.fail_after(60):
            async with running(cfg) as d:
                _, secret = d.store.webhooks.create(rx.url, ["invoice.*"], None)
                invoices = [new_invoice(d, i) for i in range(5)]
                await wait_until(lambda: len(rx.requests) >= 5, what="first (failing) attempts")
            # restarted: what was pending in the outbox is sent by the new process
            async with running(cfg) as d:
                invoices += [new_invoice(d, i) for i in range(5, 10)]
                await wait_until(lambda: d.store.webhooks.backlog() == 0, what="backlog drained")
                event_ids = {e.id for e in d.store.events.list(limit=1000, types=("invoice.created",))}
        assert len(event_ids) == 10
        delivered_ok = {r.webhook_id for r, status in zip(rx.requests, answered, strict=True) if status == 200}
        assert delivered_ok == event_ids  # every event arrived with a 200 (after dedupe on webhook-id)
        assert len(rx.requests) > 10  # there were retries
        wh = Webhook(secret)
        by_id = {}
        for r in rx.requests:
            payload = wh.verify(r.body, r.headers)
            by_id.setdefault(r.webhook_id, set()).add((payload["sequence"], payload["data"]["id"]))
        assert all(len(v) == 1 for v in by_id.values())  # retries carry the same body
        seqs = sorted(next(iter(v))[0] for v in by_id.values())
        assert seqs == list(range(1, 11))  # a per-endpoint sequence number, one per event
        assert {next(iter(v))[1] for v in by_id.values()} == {i["id"] for i in invoices}


async def test_one_event_that_keeps_failing_does_not_block_later_ones(tmp_path):
    poisoned: list[str] = []

    def behavior(r):
        if not poisoned:
            poisoned.append(r.webhook_id)
        return 500 if r.webhook_id == poisoned[0] else 200

    async with receiving(behavior) as rx:
        with trio.fail_after(30):
            async with running(config(tmp_path, schedule=(0, 0.5, 0.5, 0.5, 0.5, 0.5))) as d:
                d.store.webhooks.create(rx.url, ["invoice.created"], None)
                for i in range(6):
                    new_invoice(d, i)
                await wait_until(lambda: len({r.webhook_id for r in rx.requests}) == 6, what="all six events")
                ok = [r for r in rx.requests if r.webhook_id != poisoned[0]]
                assert len({r.webhook_id for r in ok}) == 5
                first_ok_at = min(r.at for r in ok)
                assert first_ok_at - rx.requests[0].at < 0.5  # later events went out while the first failed
                await wait_until(lambda: d.store.webhooks.backlog() == 0, what="the poisoned one gives up")
                hook = d.views.webhooks()[0][0]
                assert hook["deliveries"] == {"pending": 0, "delivered": 5, "failed": 1, "cancelled": 0}


async def test_slow_endpoint_never_delays_the_others(tmp_path):
    async def hang(r):
        await trio.sleep_forever()

    async with receiving(hang) as slow, receiving() as fast:
        with trio.fail_after(30):
            async with running(config(tmp_path, timeout=3.0, per_endpoint_concurrency=2)) as d:
                d.store.webhooks.create(slow.url, ["invoice.*"], None)
                d.store.webhooks.create(fast.url, ["invoice.*"], None)
                t0 = trio.current_time()
                for i in range(30):
                    new_invoice(d, i)
                await wait_until(lambda: len(fast.requests) == 30, what="fast endpoint gets all 30")
                assert trio.current_time() - t0 < 2.0  # long before the slow one's first timeout
                assert len(slow.requests) == 2  # only its own two slots are taken


async def test_any_number_of_dead_endpoints_never_delay_a_healthy_one(tmp_path):
    """20 endpoints that accept connections and never answer, 4 attempts in flight each (80,
    more than the 64 shared slots that used to be all there was): the healthy endpoint gets
    every event long before the first dead attempt times out (it used to wait ~8 s)."""
    async def hang(r):
        await trio.sleep_forever()

    async with receiving(hang) as dead, receiving() as healthy:
        with trio.fail_after(60):
            async with running(config(tmp_path, timeout=10.0)) as d:
                for i in range(20):
                    d.store.webhooks.create(f"{dead.url}/{i}", ["invoice.*"], None)
                d.store.webhooks.create(healthy.url, ["invoice.*"], None)
                t0 = trio.current_time()
                for i in range(30):
                    new_invoice(d, i)
                await wait_until(lambda: len(healthy.requests) == 30, what="the healthy endpoint gets all 30")
                took = trio.current_time() - t0
                assert took < 5.0, took  # the dead ones' first attempts time out at 10 s
                await wait_until(lambda: len(dead.requests) >= 80, what="the dead ones hold their own slots")
                assert len(dead.requests) == 80


async def test_410_disables_the_endpoint(tmp_path):
    async with receiving(lambda r: 410) as rx:
        with trio.fail_after(30):
            async with running(config(tmp_path)) as d:
                view = d.views.render_webhook(d.store.webhooks.create(rx.url, ["invoice.*"], None)[0])
                new_invoice(d, 1)
                await wait_until(lambda: d.views.webhook(view["id"])["status"] == "disabled", what="disabled")
                new_invoice(d, 2)
                await trio.sleep(0.5)
                assert len(rx.requests) == 1
                got = d.views.webhook(view["id"])
                assert got["disabled_reason"] == "endpoint answered 410 Gone"
                # the 410'd delivery is cancelled; a disabled endpoint collects nothing new
                assert got["deliveries"]["cancelled"] == 1 and not any(
                    n for status, n in got["deliveries"].items() if status != "cancelled"), got["deliveries"]


@pytest.fixture
def mock_clock():
    return MockClock(autojump_threshold=0.02)


async def test_retry_schedule_spans_days_then_redeliver(tmp_path, mock_clock, anvil):
    """The default schedule (immediately, 5 s, 5 min, ... 24 h) with a receiver that is down
    for three days, then back: ten attempts, `failed`, and a redelivery that arrives."""
    state = {"up": False, "first": True}

    def behavior(r):
        if state["first"]:
            state["first"] = False
            return 429, {"retry-after": "120"}  # honoured: the 2nd attempt waits 120 s, not 5 s
        return 200 if state["up"] else 503

    port = free_port()
    # a live node polled hourly: few clock jumps over four days (a dead one would be retried every 30 s)
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, poll_interval=3600)], api_port=port)
    async with receiving(behavior) as rx, running(cfg, api=True, clock=TrioClock(anchor=time.time())) as d:
        row, secret = d.store.webhooks.create(rx.url, ["invoice.created"], None)
        view = d.views.render_webhook(row)
        new_invoice(d)
        await trio.sleep(4 * 86400)
        assert len(rx.requests) == 10
        gaps = [b.at - a.at for a, b in zip(rx.requests, rx.requests[1:], strict=False)]
        expected = [120, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
        for gap, want in zip(gaps, expected, strict=True):
            assert want * 0.9 - 1 <= gap <= want * 1.1 + 1, (gaps, expected)
        assert all(verify_by_hand(secret, r) for r in rx.requests)
        assert len({r.webhook_id for r in rx.requests}) == 1
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, trust_env=False) as http:
            items = (await http.get(f"/v1/webhooks/{view['id']}/deliveries")).json()["items"]
            assert len(items) == 1 and items[0]["status"] == "failed" and items[0]["attempts"] == 10
            log = items[0]["attempt_log"]
            assert [a["status_code"] for a in log] == [429] + [503] * 9
            assert all(a["latency_ms"] is not None for a in log)
            state["up"] = True
            r = await http.post(f"/v1/deliveries/{items[0]['id']}/redeliver")
            assert r.status_code == 202
            await wait_until(lambda: d.store.webhooks.backlog() == 0, interval=1.0, what="redelivered")
            assert rx.requests[-1].webhook_id == rx.requests[0].webhook_id  # same webhook-id: apps dedupe
            assert d.views.webhook(view["id"])["deliveries"]["delivered"] == 1
            again = await http.post(f"/v1/deliveries/{items[0]['id']}/redeliver")
            assert again.status_code == 202


async def test_receiver_down_for_a_day_gets_everything_soon_after_it_returns(tmp_path, mock_clock, anvil):
    """Forty events spread over 20 hours while the receiver answers 503 (MockClock: the
    default schedule's retries are hours apart by then). When it answers again, the waiting
    deliveries are due at once: all forty arrive within minutes, not at their next retry."""
    state = {"up": False}
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, poll_interval=3600)], api_port=port)
    async with receiving(lambda r: 200 if state["up"] else 503) as rx, \
            running(cfg, api=True, clock=TrioClock(anchor=time.time())) as d:
        d.store.webhooks.create(rx.url, ["invoice.created"], None)
        for n in range(40):
            new_invoice(d, n)
            await trio.sleep(1800)  # one every half hour
        assert rx.requests and all(r.json["type"] == "invoice.created" for r in rx.requests)
        assert d.store.webhooks.backlog() == 40  # nothing given up yet: the schedule spans days
        state["up"] = True
        back = trio.current_time()
        new_invoice(d, 40)  # the next event succeeds at once and pulls the others forward
        await wait_until(lambda: d.store.webhooks.backlog() == 0, timeout=600, interval=1.0, what="all delivered")
        assert trio.current_time() - back < 600  # minutes, where the schedule alone means hours
        ok = {r.webhook_id for r in rx.requests if r.at >= back}
        assert len(ok) == 41 and len(rx.unique()) == 41


async def test_a_success_pulls_forward_the_retries_of_an_outage_only(tmp_path, mock_clock, anvil):
    """A 2xx pulls forward the retries of deliveries that found the receiver unavailable; it
    used to pull every waiting retry: an event the receiver answers 500 (its bug with that
    event) was retried at each success of the others and used up its ten attempts in a minute
    instead of days, and a 503 with ``Retry-After: 3600`` was retried within seconds."""
    ids: list[str] = []

    def behavior(r):
        if r.webhook_id not in ids and len(ids) < 2:
            ids.append(r.webhook_id)
        if r.webhook_id == ids[0]:
            return 500
        if len(ids) > 1 and r.webhook_id == ids[1]:
            return 503, {"retry-after": "3600"}
        return 200

    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, poll_interval=3600)])
    async with receiving(behavior) as rx, running(cfg, clock=TrioClock(anchor=time.time())) as d:
        d.store.webhooks.create(rx.url, ["invoice.created"], None)
        for n in range(14):  # one every 5 s: 12 successes after the two that fail
            new_invoice(d, n)
            await trio.sleep(5)
        assert len(rx.unique()) == 14
        tries = {i: sum(r.webhook_id == i for r in rx.requests) for i in ids}
        # the default schedule: at once, 5 s, then 5 min; the hour the receiver asked for
        assert tries == {ids[0]: 2, ids[1]: 1}, tries
        assert d.store.webhooks.backlog() == 2


async def test_a_deleted_endpoint_gets_nothing_more_and_nothing_unsigned(tmp_path):
    """120 events queued for a slow receiver (0.3 s an answer, four at a time), then the
    endpoint is deleted. Only the attempts already in flight may still arrive, all signed;
    the workers used to go on through their queue, unsigned once the secrets were erased."""
    async def slow(r):
        await trio.sleep(0.3)
        return 200

    async with receiving(slow) as rx:
        with trio.fail_after(30):
            async with running(config(tmp_path)) as d:
                row, _ = d.store.webhooks.create(rx.url, ["invoice.created"], None)
                for n in range(120):  # more than a refill's low mark (64): the queue is not read again soon
                    new_invoice(d, n)
                await wait_until(lambda: len(rx.requests) >= 4, what="the first answers")
                d.store.webhooks.delete(row.id)
                at_delete = len(rx.requests)
                await trio.sleep(2.0)
                after = rx.requests[at_delete:]
                assert len(after) <= 4, len(after)  # those in flight at the delete, at most
                assert all(r.headers["webhook-signature"] for r in rx.requests)


async def test_a_delivery_waiting_for_the_slow_lane_is_not_sent_once_its_endpoint_is_deleted(tmp_path):
    """A failing endpoint's attempts wait for the slow lane (``concurrency`` of them for every
    failing endpoint). A delivery taken from B's queue waited there while another failing
    endpoint held the lane, and B was deleted meanwhile: once let through it went out all the
    same, with an empty ``webhook-signature`` (B's secrets were gone). After the wait the
    endpoint is asked again: deleted (or moved to another URL), nothing is sent."""
    async def slow_failure(r):
        await trio.sleep(4.0)
        return 500

    async with receiving(slow_failure) as a, receiving(lambda r: 500) as b:
        with trio.fail_after(40):
            async with running(config(tmp_path, schedule=[0] + [0.5] * 19, concurrency=1,
                                      per_endpoint_concurrency=1)) as d:
                d.store.webhooks.create(a.url, ["invoice.created"], None)
                hook_b, _ = d.store.webhooks.create(b.url, ["invoice.created"], None)
                new_invoice(d)
                # A failed once (4 s) and now holds the slow lane for its retry (4 s more); B,
                # failing since its first answer and retried every 0.5 s, waits for it
                await wait_until(lambda: len(a.requests) >= 2, timeout=15, what="A in the slow lane")
                await trio.sleep(1.0)
                d.store.webhooks.delete(hook_b.id)
                at_delete = len(b.requests)
                await wait_until(lambda: len(a.requests) >= 3, timeout=15, what="the lane free again")
                await trio.sleep(0.5)
                assert len(b.requests) == at_delete, [r.headers.get("webhook-signature") for r in b.requests]
                assert all(r.headers["webhook-signature"] for r in (*a.requests, *b.requests))


async def test_idle_connections_stay_bounded_however_many_origins():
    """A key with the webhooks scope may point its endpoint at one origin after another. Each
    left an idle keep-alive connection behind for the life of the daemon (a file descriptor
    each, unbounded); the client now keeps at most ``max_idle`` in all, closing the oldest."""
    import contextlib

    from watcher.httpclient import WebhookClient

    client = WebhookClient(max_idle_per_origin=2, max_idle=5)
    async with contextlib.AsyncExitStack() as stack:
        receivers = [await stack.enter_async_context(receiving()) for _ in range(12)]
        seen = []
        for rx in receivers:
            answer = await client.post(rx.url, b"{}", {"content-type": "application/json"})
            assert answer.status == 200
            seen.append(client.idle_connections)
        assert max(seen) <= 5 and seen[-1] == 5, seen  # was 1, 2, ... 12: one more per origin
        # the newest are kept: the last origin's is there to be reused, the first's was closed
        assert client._idle[("http", "127.0.0.1", int(receivers[-1].url.split(":")[2].split("/")[0]))]
        assert ("http", "127.0.0.1", int(receivers[0].url.split(":")[2].split("/")[0])) not in client._idle
        await client.aclose()


async def test_rotation_signs_with_both_secrets_during_grace(tmp_path):
    async with receiving() as rx:
        with trio.fail_after(30):
            async with running(config(tmp_path)) as d:
                row, old = d.store.webhooks.create(rx.url, ["*"], None)
                view = d.views.render_webhook(row)
                _, new = d.store.webhooks.rotate_secret(view["id"])
                assert new != old and new.startswith("whsec_")
                d.store.webhooks.send_test(view["id"])
                await wait_until(lambda: len(rx.requests) == 1)
                req = rx.requests[0]
                assert len(req.headers["webhook-signature"].split()) == 2
                Webhook(new).verify(req.body, req.headers)
                Webhook(old).verify(req.body, req.headers)  # apps that have not switched yet still verify
                assert req.json["type"] == "webhook.test"


async def test_update_of_a_deleted_endpoint_writes_nothing(tmp_path):
    async with running(config(tmp_path)) as d:
        row, _ = d.store.webhooks.create("http://127.0.0.1:1/hook", ["invoice.completed"], "shop")
        d.store.webhooks.delete(row.id)
        before = dict(d.store.db.one("SELECT * FROM webhooks WHERE id = ?", (row.id,)))
        assert d.store.webhooks.update(row.id, url="http://127.0.0.1:2/moved", description="moved",
                                       enabled=True) is None
        assert d.store.webhooks.update("wh_unknown", description="x") is None
        assert dict(d.store.db.one("SELECT * FROM webhooks WHERE id = ?", (row.id,))) == before


async def test_patch_racing_a_delete_answers_404_and_writes_nothing(tmp_path, monkeypatch):
    """PATCH with a url checks its host (a DNS lookup, seconds at worst) after finding the
    endpoint and before writing; a DELETE answered in between made the write fail on the
    missing row: 500. Here the lookup is held until the DELETE has answered."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port)
    real_vetted = netguard.vetted
    looking_up, deleted = trio.Event(), trio.Event()

    async def vetted_after_the_delete(host, port, allowed):
        looking_up.set()
        await deleted.wait()
        return await real_vetted(host, port, allowed)

    async with receiving() as rx, running(cfg, api=True) as d:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, trust_env=False) as http:
            r = await http.post("/v1/webhooks", json={"url": rx.url, "events": ["invoice.completed"]})
            assert r.status_code == 201, r.text
            hook = r.json()
            monkeypatch.setattr(netguard, "vetted", vetted_after_the_delete)
            answers = {}

            async def patch():
                answers["patch"] = await http.patch(f"/v1/webhooks/{hook['id']}",
                                                    json={"url": rx.url + "/moved", "description": "moved"})

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(patch)
                    await looking_up.wait()
                    assert (await http.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
                    deleted.set()
            r = answers["patch"]
            assert (r.status_code, r.json()["error"]["code"]) == (404, "unknown_webhook"), r.text
            assert d.store.webhooks.row(hook["id"]) is None
            stored = d.store.db.one("SELECT url, description, deleted_at FROM webhooks WHERE id = ?", (hook["id"],))
            assert (stored["url"], stored["description"]) == (rx.url, None) and stored["deleted_at"]
            audit = (await http.get("/v1/audit", params={"object_id": hook["id"]})).json()["items"]
            assert [a["action"] for a in audit] == ["webhook.create", "webhook.delete"]


async def test_webhook_api(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port)
    async with receiving() as rx, running(cfg, api=True) as d:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, trust_env=False) as http:
            r = await http.post("/v1/webhooks", json={"url": rx.url, "events": ["transfer.confirmed", "invoice.*"],
                                                      "description": "shop"})
            assert r.status_code == 201
            hook = r.json()
            listed = (await http.get("/v1/webhooks")).json()["items"]
            assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
            r = await http.post(f"/v1/webhooks/{hook['id']}/test")
            assert r.status_code == 202
            await wait_until(lambda: len(rx.requests) == 1)
            Webhook(hook["secret"]).verify(rx.requests[0].body, rx.requests[0].headers)
            r = await http.post(f"/v1/webhooks/{hook['id']}/rotate-secret")
            assert r.status_code == 200 and r.json()["secret"] != hook["secret"]
            r = await http.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": False})
            assert r.json()["status"] == "disabled"
            before = d.store.db.scalar("SELECT COUNT(*) FROM deliveries")
            new_invoice(d, 2)  # a disabled endpoint collects nothing (it used to queue, never to send)
            await trio.sleep(0.3)
            assert len(rx.requests) == 1 and d.store.db.scalar("SELECT COUNT(*) FROM deliveries") == before
            r = await http.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": True})
            new_invoice(d, 1)
            await wait_until(lambda: len(rx.requests) == 2, what="the next event sent after re-enabling")
            assert rx.requests[1].json["type"] == "invoice.created"
            for body, code in [
                ({"url": "ftp://x", "events": ["*"]}, "invalid_url"),
                ({"url": rx.url, "events": []}, "invalid_events"),
                ({"url": rx.url, "events": ["payout.sent"]}, "invalid_events"),
                ({"url": f"http://127.0.0.1:{port}/hook", "events": ["*"]}, "webhook_loop"),
                ({"url": f"http://localhost:{port}/x", "events": ["*"]}, "webhook_loop"),
                ({"url": f"http://127.1:{port}/x", "events": ["*"]}, "webhook_loop"),
                ({"url": f"http://2130706433:{port}/x", "events": ["*"]}, "webhook_loop"),
                ({"url": f"http://0.0.0.0:{port}/x", "events": ["*"]}, "webhook_loop"),
                ({"url": f"http://[::1]:{port}/x", "events": ["*"]}, "webhook_loop"),
                ({"url": f"http://[::ffff:127.0.0.1]:{port}/x", "events": ["*"]}, "webhook_loop"),
                ({"url": f"http://LOCALHOST:{port}/x", "events": ["*"]}, "webhook_loop"),
                ({"url": rx.url, "events": ["*"], "x": 1}, "unknown_field"),
            ]:
                r = await http.post("/v1/webhooks", json=body)
                assert (r.status_code, r.json()["error"]["code"]) == (400, code), body
            r = await http.delete(f"/v1/webhooks/{hook['id']}")
            assert r.status_code == 204
            assert (await http.get(f"/v1/webhooks/{hook['id']}")).status_code == 404
            assert (await http.get("/v1/webhooks")).json()["items"] == []
            audit = (await http.get("/v1/audit", params={"object_id": hook["id"]})).json()["items"]
            assert [a["action"] for a in audit] == ["webhook.create", "webhook.test", "webhook.rotate_secret",
                                                    "webhook.update", "webhook.update", "webhook.delete"]
            assert {a["actor"] for a in audit} == {"default"}
            events = (await http.get("/v1/events", params={"type": "invoice.created"})).json()
            assert len(events["items"]) == 2 and {e["type"] for e in events["items"]} == {"invoice.created"}


def test_queued_events_keep_the_order_of_the_calls_and_go_with_a_rollback(tmp_path):
    """``Outbox.queue`` (how transfer events are written: in one statement at the end of the
    transaction) numbers the events in the order of the calls, the emitted ones among them;
    each gets its webhook delivery and reaches the listeners once committed. A rolled back
    transaction's queued events are gone, and a queue is only for inside a transaction."""
    from prometheus_client import CollectorRegistry

    from watcher.core import Core

    core = Core.open(write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)]), registry=CollectorRegistry())
    try:
        store = core.store
        store.webhooks.create("http://127.0.0.1:9/hook", ["*"], None)
        heard: list[tuple[int, str]] = []
        store.events.on_commit(lambda e: heard.append((e.seq, e.subject)))
        with store.db.transaction():
            store.events.queue("transfer.detected", {"n": 1}, chain="devnet", subject="a")
            store.events.queue("transfer.detected", {"n": 2}, chain="devnet", subject="b")
            emitted = store.events.emit("invoice.paid", {"n": 3}, subject="c")
            store.events.queue("transfer.confirmed", {"n": 4, "text": "café"}, chain="devnet", subject="d")
            assert heard == []  # not before the commit
        events = store.events.list()
        assert [(e.subject, e.type, e.data) for e in events] == [
            ("a", "transfer.detected", {"n": 1}), ("b", "transfer.detected", {"n": 2}),
            ("c", "invoice.paid", {"n": 3}), ("d", "transfer.confirmed", {"n": 4, "text": "café"})]
        assert [e.seq for e in events] == [emitted.seq - 2, emitted.seq - 1, emitted.seq, emitted.seq + 1]
        assert heard == [(e.seq, e.subject) for e in events]
        deliveries = store.db.query("SELECT e.subject FROM deliveries d JOIN events e ON e.id = d.event_id"
                                    " ORDER BY d.seq")
        assert [r["subject"] for r in deliveries] == ["a", "b", "c", "d"]

        with pytest.raises(RuntimeError), store.db.transaction():
            store.events.queue("transfer.detected", {"n": 5}, subject="gone")
            raise RuntimeError("rolled back")
        with store.db.transaction():
            store.events.queue("transfer.detected", {"n": 6}, subject="f")
        assert [e.subject for e in store.events.list(after_seq=events[-1].seq)] == ["f"]
        assert [s for _, s in heard][4:] == ["f"]
        def counted(kind: str) -> float | None:
            return core.metrics.registry.get_sample_value("watcher_events_total", {"type": kind})
        assert (counted("transfer.detected"), counted("transfer.confirmed"), counted("invoice.paid")) == (3, 1, 1)
        with pytest.raises(AssertionError):
            store.events.queue("transfer.detected", {"n": 7}, subject="outside")
    finally:
        core.close()
