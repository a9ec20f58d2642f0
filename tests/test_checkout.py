"""The checkout plugin over HTTP: its own listener, the page and its headers, the live-status
stream (Server-Sent Events) against a real anvil, its 404s, languages and limits. The same page
in a real browser: tests/test_checkout_browser.py."""

from __future__ import annotations

import html
import json
import re

import httpx
import pytest
import trio

from tests.support.daemon import (
    AUTH,
    chain_entry,
    free_port,
    running,
    wait_until,
    write_config,
)
from tests.support.evm import Anvil, Token
from watcher_checkout import CSP, CheckoutConfig, parse_listen
from watcher_checkout.catalog import CATALOG, pick_language


def checkout_config(tmp_path, anvil: Anvil, token: Token | None = None, **checkout):
    api_port, pay_port = free_port(), free_port()
    tokens = [("USDT", token.address, 6)] if token else []
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=tokens, confirmations=2, chain_id=31337)],
                       api_port=api_port,
                       extra={"checkout": {"listen": f"127.0.0.1:{pay_port}",
                                           "public_url": f"http://127.0.0.1:{pay_port}", **checkout}})
    return cfg, api_port, pay_port


def clients(api_port: int, pay_port: int) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    return (httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", headers=AUTH, trust_env=False, timeout=10),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{pay_port}", trust_env=False, timeout=10))


async def sse_states(response: httpx.Response, until, *, timeout: float = 8.0):
    """The ``state`` messages of a live stream, until ``until(states)`` holds or it ends
    (True: it ended with ``event: end``). Read it again for the next ones. The bound is
    generous (the page follows in ~10 ms, bench 9) yet below the stream's 15 s keep-alive,
    so a change that did not wake the stream fails the test."""
    if not hasattr(response, "_lines"):
        response._lines = response.aiter_lines()  # type: ignore[attr-defined]
    states: list[dict] = []
    event = None
    with trio.fail_after(timeout):
        async for line in response._lines:  # type: ignore[attr-defined]
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "state":
                states.append(json.loads(line[6:]))
                if until(states):
                    return states, False
            elif line.startswith("data: ") and event == "end":
                return states, True
    return states, False


def test_listen_and_language_parsing():
    assert parse_listen("0.0.0.0:8421") == ("0.0.0.0", 8421)
    assert parse_listen("[::]:8421") == ("::", 8421)
    assert parse_listen("8421") is None and parse_listen("host:99999") is None
    assert pick_language("de-CH, de;q=0.9, en;q=0.8") == "de"
    assert pick_language("fr, en;q=0.5, de;q=0.7") == "de"
    assert pick_language("fr, *;q=0.1") == "en"
    assert pick_language("de;q=0, en") == "en"
    assert pick_language(None) == "en" and pick_language("en", "de") == "de" and pick_language("de", "xx") == "de"


def test_every_language_has_every_string_with_the_same_placeholders():
    english = CATALOG["en"]
    for lang, strings in CATALOG.items():
        assert set(strings) == set(english), lang
        for key, value in strings.items():
            assert set(re.findall(r"{(\w+)}", value)) == set(re.findall(r"{(\w+)}", english[key])), (lang, key)


async def test_checkout_is_off_without_its_table(tmp_path, anvil: Anvil):
    api_port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)], api_port=api_port)
    async with running(cfg, api=True) as d, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{api_port}", headers=AUTH, trust_env=False) as api:
        assert "checkout" not in d.config.sections and d.listener_urls == {}
        r = await api.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "0.01"})
        assert r.status_code == 201 and r.json()["checkout_url"] is None
        assert (await api.get(f"/pay/{r.json()['id']}")).status_code == 404


async def test_page_fields_headers_and_a_live_stream_to_paid(tmp_path, anvil: Anvil):
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil, title="Example shop")
    api, pay = clients(api_port, pay_port)
    anvil.automine(False)
    async with running(cfg, api=True) as d, api, pay:
        assert isinstance(d.config.sections["checkout"], CheckoutConfig)
        r = await api.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "0.0123",
                                                 "redirect_url": "https://shop.example/orders/42"})
        assert r.status_code == 201, r.text
        inv = r.json()
        assert inv["checkout_url"] == f"http://127.0.0.1:{pay_port}/pay/{inv['id']}"
        assert inv["redirect_url"] == "https://shop.example/orders/42"

        page = await pay.get(f"/pay/{inv['id']}")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
        text = page.text
        assert re.search(r'data-field="amount">0\.0123<', text) and 'data-field="asset">ETH<' in text
        assert f'data-field="address">{inv["address"]}<' in text
        assert f'data-field="payment-uri" href="{inv["payment_uri"]}"' in text
        assert 'data-status="awaiting_payment"' in text and "Example shop" in text
        assert "<svg" in text and "style=" not in text  # the QR code inline, nothing the CSP would block
        # nothing from anywhere else: every src/href is the daemon's own or the wallet link
        for url in re.findall(r'(?:src|href)="([^"]+)"', text):
            assert url.startswith("/pay/") or url == inv["payment_uri"], url
        for asset in re.findall(r'(?:src|href)="(/pay/static/[^"]+)"', text):
            r = await pay.get(asset)
            assert r.status_code == 200 and r.headers["content-type"].split(";")[0] in (
                "text/css", "text/javascript", "image/svg+xml")

        async with pay.stream("GET", f"/pay/{inv['id']}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            first, _ = await sse_states(stream, lambda s: len(s) >= 1)
            assert first[0]["state"] == "awaiting" and first[0]["status"] == "awaiting_payment"
            anvil.send(anvil.accounts[1], inv["address"], 12_300_000_000_000_000)
            anvil.mine(1)
            seen, _ = await sse_states(stream, lambda s: s[-1]["state"] != "awaiting")
            assert seen[-1]["state"] in ("confirming", "seen") and seen[-1]["status"] == "awaiting_confirmation"
            anvil.mine(1)
            rest, ended = await sse_states(stream, lambda s: False)
            assert rest[-1]["state"] == "paid" and rest[-1]["status"] == "completed" and ended
            assert rest[-1]["redirect_url"] == "https://shop.example/orders/42"
        page = await pay.get(f"/pay/{inv['id']}")
        assert 'data-status="completed"' in page.text and 'href="https://shop.example/orders/42"' in page.text
        assert "http-equiv=\"refresh\"" not in page.text  # a final page does not refresh itself


async def test_checkout_listener_serves_nothing_else(tmp_path, anvil: Anvil):
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil)
    api, pay = clients(api_port, pay_port)
    async with running(cfg, api=True) as d, api, pay:
        inv = (await api.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "1"})).json()
        for path in ("/v1/invoices", f"/v1/invoices/{inv['id']}", "/metrics", "/openapi.json", "/v1/health",
                     "/healthz", "/", "/pay/static/../../watcher.toml", "/pay/static/seed.txt"):
            r = await pay.get(path, headers=AUTH)
            assert r.status_code == 404, path
            assert r.headers["content-type"].startswith("text/html") and inv["id"] not in r.text
        # unknown and malformed ids: the same plain 404 page
        for bad in ("inv_00000000000000000000000000", "nope", "inv_" + "a" * 300, "%3Cscript%3E"):
            r = await pay.get(f"/pay/{bad}")
            assert r.status_code == 404 and "<script" not in r.text.lower()
            assert (await pay.get(f"/pay/{bad}/events")).status_code == 404
        assert (await pay.post(f"/pay/{inv['id']}")).status_code == 405
        # another Host: refused (DNS rebinding, or a request meant for another site)
        r = await pay.get(f"/pay/{inv['id']}", headers={"host": "evil.example"})
        assert r.status_code == 421
        # the control API does not serve the page either
        assert (await api.get(f"/pay/{inv['id']}")).status_code == 404
        assert d.listener_urls["checkout"]


async def test_languages_and_states_partial_expired(tmp_path, anvil: Anvil, token: Token):
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil, token)
    token.mint(anvil.accounts[1], 10**12)
    api, pay = clients(api_port, pay_port)
    async with running(cfg, api=True) as d, api, pay:
        inv = (await api.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "10"})).json()
        de = await pay.get(f"/pay/{inv['id']}", headers={"accept-language": "de-DE,de;q=0.9,en;q=0.5"})
        assert '<html lang="de">' in de.text and "Warten auf Zahlung" in de.text
        assert de.headers["content-language"] == "de" and "Accept-Language" in de.headers["vary"]
        en = await pay.get(f"/pay/{inv['id']}", headers={"accept-language": "fr"})
        assert '<html lang="en">' in en.text and "Awaiting payment" in en.text

        token.transfer(anvil.accounts[1], inv["address"], 4_000_000)
        anvil.mine(3)
        await wait_until(lambda: d.views.invoice(inv["id"])["partial"], what="partial payment")
        page = (await pay.get(f"/pay/{inv['id']}?lang=de")).text
        assert 'data-state="partial"' in page and "restlichen 6 USDT" in page
        # the headline asks for the rest too ("Send exactly 10" would have the customer pay 14)
        assert re.search(r'data-field="lead">Senden Sie genau</p>\s*<p class="amount"><span data-field="amount">6<',
                         page), page
        # the payment request (link and QR code) asks for the rest, not the whole amount again
        rest = inv["payment_uri"].replace("uint256=10000000", "uint256=6000000")
        assert rest != inv["payment_uri"] and f'data-field="payment-uri" href="{html.escape(rest)}"' in page

        # an invoice that expired unpaid (created through the store: the API's minimum is 60 s)
        row = d.store.invoices.create(chain="devnet", asset="USDT", amount=5_000_000, mode="sale", expires_in=1,
                                      tolerance_ppm=0, order_id=None, metadata={}, actor="t")
        await wait_until(lambda: d.views.invoice(row.id)["status"] == "expired", timeout=30, what="expiry")
        page = (await pay.get(f"/pay/{row.id}")).text
        assert 'data-status="expired"' in page and "has expired" in page
        assert re.search(r'<section class="pay" data-field="pay" hidden>', page)


async def test_live_streams_stay_within_their_limits_however_many_arrive_at_once(tmp_path, anvil: Anvil):
    """Streams were counted only once they started, after the route had let them in: 60
    requests at once for one invoice all passed its limit of 20. And one client could hold
    every stream (20 per invoice, over as many invoices as it liked), leaving every other
    customer's page without live updates. Both limits now hold, checked where a stream is
    counted; one over them is told to come back in 30 s."""
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil, max_streams_per_client=25)
    api, _ = clients(api_port, pay_port)
    pay = httpx.AsyncClient(base_url=f"http://127.0.0.1:{pay_port}", trust_env=False, timeout=20,
                            limits=httpx.Limits(max_connections=200, max_keepalive_connections=0))
    async with running(cfg, api=True) as d, api, pay:
        invs = [(await api.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "1"})).json()["id"]
                for _ in range(3)]

        async def opened(ids: list[str]) -> list[str]:
            """Open a stream to each of ``ids`` at once; what each got first (``state``,
            ``busy`` or its HTTP status), once all have, while the streams are still open."""
            got: list[str] = []

            async def one(inv_id: str) -> None:
                async with pay.stream("GET", f"/pay/{inv_id}/events") as r:
                    if r.status_code != 200:
                        got.append(str(r.status_code))
                        return
                    seen = False
                    async for line in r.aiter_lines():  # read on: leaving it would close the stream
                        if line.startswith("event: ") and not seen:
                            got.append(line.removeprefix("event: "))
                            seen = True

            with trio.fail_after(30):
                async with trio.open_nursery() as n:
                    for inv_id in ids:
                        n.start_soon(one, inv_id)
                    while len(got) < len(ids):
                        await trio.sleep(0.05)
                    n.cancel_scope.cancel()
            return got

        first = await opened([invs[0]] * 60)
        assert first.count("state") == 20 and len(first) == 60, sorted(first)
        await wait_until(lambda: d.metrics.registry.get_sample_value("watcher_checkout_streams") == 0,
                         what="the streams closed")
        second = await opened([invs[1]] * 20 + [invs[2]] * 20)
        assert second.count("state") == 25 and len(second) == 40, sorted(second)


async def test_streams_end_cleanly_when_the_daemon_stops(tmp_path, anvil: Anvil):
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil)
    api, pay = clients(api_port, pay_port)
    async with running(cfg, api=True) as d, api, pay:
        inv = (await api.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "1"})).json()
        async with pay.stream("GET", f"/pay/{inv['id']}/events") as stream:
            await sse_states(stream, lambda s: len(s) >= 1)
            assert d.metrics.registry.get_sample_value("watcher_checkout_streams") == 1
            with trio.fail_after(10):
                async with trio.open_nursery() as n:
                    n.start_soon(d.drain)
                    rest = [line async for line in stream._lines]  # type: ignore[attr-defined]  # ends cleanly
            assert d.metrics.registry.get_sample_value("watcher_checkout_streams") == 0
            assert all(not line.startswith("event: end") for line in rest)  # not "final": the browser retries


async def test_rate_limited_per_client_address(tmp_path, anvil: Anvil):
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil, rate_limit="5/min")
    api, pay = clients(api_port, pay_port)
    async with running(cfg, api=True), api, pay:
        codes = [(await pay.get("/pay/inv_00000000000000000000000000")).status_code for _ in range(7)]
        assert codes[:5] == [404] * 5 and codes[5:] == [429, 429]
        r = await pay.get("/pay/inv_00000000000000000000000000")
        assert int(r.headers["retry-after"]) >= 1


@pytest.mark.parametrize("trusted", [["127.0.0.1"], []], ids=["behind-a-trusted-proxy", "no-proxy-trusted"])
async def test_rate_limited_per_customer_behind_a_reverse_proxy(tmp_path, anvil: Anvil, trusted):
    """Behind a proxy that is trusted, each customer (the rightmost X-Forwarded-For hop that is
    not a trusted proxy) has a bucket of their own, and a customer cannot pick another bucket
    by sending the header themselves. Without ``trusted_proxies`` the header counts for nothing."""
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil, rate_limit="2/min", trusted_proxies=trusted)
    api, pay = clients(api_port, pay_port)
    missing = "/pay/inv_00000000000000000000000000"

    async def code(forwarded_for: str) -> int:
        return (await pay.get(missing, headers={"x-forwarded-for": forwarded_for})).status_code

    async with running(cfg, api=True), api, pay:
        assert [await code("203.0.113.5") for _ in range(3)] == [404, 404, 429]
        # the customer's own claim to the left of what the proxy saw does not change the bucket
        assert await code("198.51.100.1, 203.0.113.5") == 429
        # a proxy in front of the trusted one (also trusted) passes the customer along
        assert await code("203.0.113.5, 127.0.0.1") == 429
        # another customer through the same proxy
        assert [await code("203.0.113.6") for _ in range(2)] == ([404, 404] if trusted else [429, 429])
        assert await code("2001:db8::6") == (404 if trusted else 429)


@pytest.mark.parametrize("bad", [{"listen": "8421"}, {"public_url": "ftp://x"}, {"public_url": "https://a/?q=1"},
                                 {"rate_limit": "lots"}, {"max_streams": 0}, {"colour": "red"},
                                 {"trusted_proxies": ["10.0.0.0/33"]}, {"trusted_proxies": "127.0.0.1"}])
def test_bad_checkout_config_is_refused(tmp_path, anvil: Anvil, bad):
    from watcher.core import Core
    from watcher.errors import ConfigError

    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)], extra={"checkout": bad})
    with pytest.raises(ConfigError) as e:
        Core.open(cfg)
    assert str(e.value).startswith("checkout.")


async def test_litecoin_invoice_page_bip21_and_payment_seen_in_the_mempool(tmp_path, litecoind):
    from tests.support.litecoin import COIN, ltc_entry, mine

    node = litecoind
    node.payer  # noqa: B018 - a wallet with mature coins
    api_port, pay_port = free_port(), free_port()
    cfg = write_config(tmp_path, [ltc_entry(node)], api_port=api_port,
                       extra={"checkout": {"listen": f"127.0.0.1:{pay_port}",
                                           "public_url": f"http://127.0.0.1:{pay_port}"}})
    api, pay = clients(api_port, pay_port)
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, api, pay:
            inv = (await api.post("/v1/invoices", json={"chain": "ltc", "asset": "LTC", "amount": "0.5"})).json()
            assert inv["payment_uri"] == f"litecoin:{inv['address']}?amount=0.5"
            page = (await pay.get(f"/pay/{inv['id']}")).text
            assert f'data-field="payment-uri" href="{inv["payment_uri"]}"' in page
            assert f'data-field="address">{inv["address"]}<' in page
            async with pay.stream("GET", f"/pay/{inv['id']}/events") as stream:
                await sse_states(stream, lambda s: len(s) >= 1)
                node.send(inv["address"], COIN // 2)  # no block: seen in the mempool, 0 confirmations
                seen, _ = await sse_states(stream, lambda s: s[-1]["state"] != "awaiting")
                assert seen[-1]["state"] == "seen" and seen[-1]["confirmations"] == 0
                assert seen[-1]["label"] == "Payment seen, waiting for confirmation" and not seen[-1]["payable"]
                await mine(node, 1)
                conf, _ = await sse_states(stream, lambda s: s[-1]["state"] != "seen")
                assert conf[-1]["state"] == "confirming" and conf[-1]["label"] == "Payment seen: 1 of 2 confirmations"
                await mine(node, 1)
                rest, ended = await sse_states(stream, lambda s: False)
                assert rest[-1]["state"] == "paid" and ended
            assert d.views.invoice(inv["id"])["status"] == "completed"


async def test_priced_invoice_shows_its_price_and_a_page_without_javascript_refreshes(tmp_path, anvil: Anvil):
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil)
    text = cfg.read_text() + '\n[rates]\nreference = "USD"\n[[rates.sources]]\nkind = "fixed"\npair = "ETH/USD"\nrate = "2000"\n'
    cfg.write_text(text)
    api, pay = clients(api_port, pay_port)
    async with running(cfg, api=True), api, pay:
        r = await api.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH",
                                                 "price": {"amount": "50", "currency": "USD"}})
        assert r.status_code == 201, r.text
        inv = r.json()
        assert inv["amount"] == "0.025"
        page = (await pay.get(f"/pay/{inv['id']}")).text
        assert 'data-field="price">Price: 50 USD<' in page and 'data-field="amount">0.025<' in page
        assert '<noscript><meta http-equiv="refresh" content="15"></noscript>' in page


def _inv(**over):
    base = {"id": "inv_X", "chain": "devnet", "asset": "USDT", "status": "awaiting_payment", "partial": False,
            "payments": [], "required_confirmations": 3, "monitor_until": "2999-01-01T00:00:00.000Z", "due": "10",
            "received": "0", "amount": "10", "refunds": [], "refunded_amount": "0", "redirect_url": "https://s/x"}
    return {**base, **over}


@pytest.mark.parametrize(("over", "state", "label", "final"), [
    ({}, "awaiting", "Awaiting payment", False),
    ({"partial": True, "due": "4", "received": "6"}, "partial", "Partially paid: send the remaining 4 USDT", False),
    ({"status": "awaiting_confirmation", "payments": [{"counted": True, "confirmations": 0}]}, "seen",
     "Payment seen, waiting for confirmation", False),
    ({"status": "awaiting_confirmation", "payments": [{"counted": True, "confirmations": 2},
                                                      {"counted": False, "confirmations": 0}]},
     "confirming", "Payment seen: 2 of 3 confirmations", False),
    ({"status": "completed"}, "paid", "Paid. Thank you!", True),
    ({"status": "expired"}, "expired", "This payment request has expired", False),
    ({"status": "expired", "monitor_until": "2000-01-01T00:00:00.000Z"}, "expired",
     "This payment request has expired", True),
    ({"status": "failed"}, "failed", "The payment was not confirmed in time; please contact the shop", True),
    ({"status": "refunded"}, "refunded", "Refunded", True),
    ({"status": "completed", "refunds": [{"status": "completed"}], "refunded_amount": "10"}, "refunded",
     "Refunded", True),
])
def test_page_state_for_every_invoice_state(over, state, label, final):
    from watcher_checkout.page import page_state

    st = page_state(_inv(**over), "en", 1_800_000_000_000, "uri")
    assert (st["state"], st["label"], st["final"]) == (state, label, final)
    assert st["payable"] == (state in ("awaiting", "partial")) and (st["qr"] is not None) == st["payable"]
    assert st["redirect_url"] == ("https://s/x" if state == "paid" else None)
    assert st["amount_shown"] == ("4" if state == "partial" else "10")  # what to send, then the invoice's
