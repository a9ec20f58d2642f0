"""Exchange rates: exact arithmetic, cross rates through the reference currency, staleness,
and fiat-priced invoices quoted from Chainlink's own MockV3Aggregator deployed on anvil."""

from __future__ import annotations

import math
import time
from fractions import Fraction

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
from tests.support.evm import Anvil, calldata, compile_contracts, deploy
from watcher.errors import ConfigError
from watcher.rates import (
    FixedSource,
    Rate,
    Rates,
    RateUnavailable,
    UnknownPair,
    amount_for_price,
    decimal_text,
)

# anvil's gas estimate for the mock's round updates can come out exactly at the cost, and the
# mined transaction then runs out of gas (status 0, the feed unchanged): give them room
FEED_GAS = 300_000


def test_decimal_text_and_rounding_up():
    assert decimal_text(Fraction(300012345678, 10**8)) == "3000.12345678"
    assert decimal_text(Fraction(1, 3)) == "0.333333333333333333"  # 18 places, half-even
    assert decimal_text(Fraction(2, 3)) == "0.666666666666666667"
    assert decimal_text(Fraction(5)) == "5" and decimal_text(Fraction(1, 8)) == "0.125"
    rate = Rate("ETH", "USD", Fraction(300012345678, 10**8), "t", 0)
    wei = amount_for_price(Fraction(50), rate, 18)
    assert wei == math.ceil(Fraction(50 * 10**18) / Fraction(300012345678, 10**8))
    assert Fraction(wei, 10**18) * rate.value >= 50 > Fraction(wei - 1, 10**18) * rate.value  # never underpaid
    exact = Rate("USDT", "USD", Fraction(1), "t", 0)
    assert amount_for_price(Fraction("49.90"), exact, 6) == 49_900_000  # exact stays exact


async def test_cross_rates_through_the_reference_and_staleness():
    now = time.time()
    rates = Rates(reference="USD", max_age=3600, refresh=0, sources=[
        FixedSource(("ETH", "USD"), Fraction("3000")), FixedSource(("EUR", "USD"), Fraction("1.25")),
        FixedSource(("USDT", "USD"), Fraction(1))], wall=lambda: now)
    eth_eur = await rates.get(None, "ETH", "EUR")  # type: ignore[arg-type]
    assert eth_eur.value == Fraction(2400) and eth_eur.source == "fixed+fixed"
    usd_eth = await rates.get(None, "USD", "ETH")  # type: ignore[arg-type]
    assert usd_eth.value == Fraction(1, 3000)
    assert (await rates.get(None, "ETH", "USDT")).value == 3000  # type: ignore[arg-type]
    with pytest.raises(UnknownPair, match="no source gives BTC/USD"):  # a 422: asking again will not help
        await rates.get(None, "BTC", "EUR")  # type: ignore[arg-type]

    class Old:
        name = "old"
        pairs = (("ETH", "USD"),)

        async def read(self, daemon):
            return [Rate("ETH", "USD", Fraction(2000), "old", int(now) - 3601)]

    stale = Rates(reference="USD", max_age=3600, refresh=0, sources=[Old()], wall=lambda: now)
    with pytest.raises(RateUnavailable, match=r"ETH/USD from old is 3601 s old"):
        await stale.get(None, "ETH", "USD")  # type: ignore[arg-type]


def test_rate_sources_are_checked_with_their_key(tmp_path):
    from tests.test_config import base, load
    from watcher.plugins import chain_families, make_plugin_manager, rate_kinds

    pm = make_plugin_manager()
    families, kinds = chain_families(pm), rate_kinds(pm)
    assert {"fixed", "chainlink"} <= set(kinds)
    for source, message in (
        ({"kind": "oracle"}, "rates.sources[0].kind: unknown rate source kind 'oracle'"),
        ({"kind": "fixed", "pair": "USDTUSD", "rate": "1"}, "rates.sources[0].pair: 'USDTUSD' is not a pair"),
        ({"kind": "fixed", "pair": "USDT/USD", "rate": "-1"}, "rates.sources[0].rate: rate must be a positive"),
        ({"kind": "chainlink", "chain": "nope", "pair": "ETH/USD", "feed": "0x" + "11" * 20},
         "rates.sources[0].chain: 'nope' is not an EVM chain"),
        ({"kind": "chainlink", "chain": "devnet", "pair": "ETH/USD", "feed": "0x12"}, "rates.sources[0].feed"),
        ({"kind": "fixed", "pair": "USDT/USD", "rate": "1", "extra": 1}, "rates.sources[0].extra: unknown key"),
    ):
        raw = base()
        raw["rates"] = {"sources": [source]}
        cfg = load(tmp_path, raw, families)
        with pytest.raises(ConfigError) as e:
            Rates.from_config(cfg, kinds)
        assert message in str(e.value), (source, str(e.value))


@pytest.fixture
def feed(anvil: Anvil) -> str:
    """Chainlink's MockV3Aggregator (tests/contracts/chainlink, from @chainlink/contracts
    1.5.0): 8 decimals, ETH/USD = 3000.12345678."""
    art = compile_contracts()["MockV3Aggregator"]
    return deploy(anvil, art, ["uint8", "int256"], [8, 300012345678])


async def test_a_usd_priced_invoice_is_quoted_from_chainlink_and_a_stale_feed_refuses_new_ones(tmp_path, anvil, feed):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)], api_port=port, extra={"rates": {
        "reference": "USD", "max_age": 3600, "refresh": 0,
        "sources": [{"kind": "chainlink", "chain": "devnet", "pair": "ETH/USD", "feed": feed},
                    {"kind": "fixed", "pair": "EUR/USD", "rate": "1.25"}]}})
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                                                   trust_env=False, timeout=10) as http:
            await wait_until(lambda: d.watchers["devnet"].status.node_up)
            r = await http.get("/v1/rates", params={"pair": "ETH/USD"})
            assert r.status_code == 200, r.text
            got = r.json()
            assert (got["pair"], got["rate"], got["source"]) == ("ETH/USD", "3000.12345678", "chainlink:devnet")
            eur = (await http.get("/v1/rates", params={"pair": "ETH/EUR"})).json()
            assert eur["rate"] == decimal_text(Fraction(300012345678, 10**8) / Fraction("1.25"))
            assert eur["source"] == "chainlink:devnet+fixed"
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH",
                                                      "price": {"amount": "50", "currency": "USD"}})
            assert r.status_code == 201, r.text
            inv = r.json()
            wei = math.ceil(Fraction(50 * 10**18) / Fraction(300012345678, 10**8))
            assert inv["base_units"] == str(wei) and inv["price"] == {"amount": "50", "currency": "USD"}
            assert inv["rate"]["pair"] == "ETH/USD" and inv["rate"]["value"] == "3000.12345678"
            assert inv["rate"]["source"] == "chainlink:devnet"
            # paid in full: completes like any invoice
            anvil.send(anvil.accounts[1], inv["address"], wei)
            anvil.mine(3)
            await wait_until(lambda: d.views.invoice(inv["id"])["status"] == "completed", what="completed")
            done = d.views.invoice(inv["id"])
            assert done["price"] == {"amount": "50", "currency": "USD"}  # locked, as created
            # the payment, its events and the invoice carry the USD value at the rate of detection
            usd = decimal_text(Fraction(wei, 10**18) * Fraction(300012345678, 10**8), 8)
            assert usd == "50"  # the amount was rounded up by less than a wei's worth
            want = {"currency": "USD", "amount": usd, "rate": "3000.12345678", "source": "chainlink:devnet"}
            assert done["payments"][0]["value"] == want and done["received_value"] == {"currency": "USD",
                                                                                       "amount": usd}
            events = [e for e in d.store.events.list(after_seq=0, types=("transfer.detected", "transfer.confirmed"),
                                                     limit=100)]
            assert {e.type for e in events} == {"transfer.detected", "transfer.confirmed"}
            assert all(e.data["value"] == want for e in events), [e.data["value"] for e in events]
            # an asset without a rate gets no value, never a guess
            assert d.rates.value_of("DOGE", 10**8, 8) is None

            # the feed goes stale (its last round two hours old): no new fiat invoice, nothing written
            head = anvil.rpc("eth_getBlockByNumber", "latest", False)
            old = int(head["timestamp"], 16) - 7200
            anvil.send(anvil.accounts[0], feed, 0, calldata("updateRoundData(uint80,int256,uint256,uint256)",
                                                            7, 310000000000, old, old), gas=FEED_GAS)
            anvil.mine(1)
            before = d.store.db.scalar("SELECT COUNT(*) FROM invoices")
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH",
                                                      "price": {"amount": "50", "currency": "USD"}})
            assert r.status_code == 503 and r.json()["error"]["code"] == "rate_unavailable", r.text
            assert "ETH/USD" in r.json()["error"]["message"] and "old" in r.json()["error"]["message"]
            assert d.store.db.scalar("SELECT COUNT(*) FROM invoices") == before
            r = await http.get("/v1/rates", params={"pair": "ETH/USD"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "rate_unavailable"
            # invoices in asset units work exactly as before, and bad prices are 400s
            assert (await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH",
                                                          "amount": "0.01"})).status_code == 201
            for bad in ({"amount": "-1", "currency": "USD"}, {"amount": "1"}, {"amount": "1e3", "currency": "USD"},
                        {"amount": "0", "currency": "USD"}, {"amount": "1", "currency": "US D"}, "50 USD"):
                r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "price": bad})
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_price", (bad, r.text)
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "1",
                                                      "price": {"amount": "1", "currency": "USD"}})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_price"
            listed = (await http.get("/v1/rates")).json()
            assert listed == {"reference": "USD", "pairs": ["ETH/USD", "EUR/USD"]}


def test_the_example_configs_rates_block_loads(tmp_path):
    from tests.test_config import example_with_tokens
    from watcher.config import load_config
    from watcher.plugins import chain_families, make_plugin_manager, rate_kinds

    text = example_with_tokens()
    start = text.index("# [rates]")
    block = text[start:text.index("\n\n", start)]
    text = text.replace(block, "\n".join(line[2:] if line.startswith("# ") and not line.startswith("#  ")
                                         else line for line in block.splitlines()))
    (tmp_path / "watcher.toml").write_text(text)
    pm = make_plugin_manager()
    cfg = load_config(tmp_path / "watcher.toml", chain_families(pm))
    rates = Rates.from_config(cfg, rate_kinds(pm))
    assert rates.reference == "USD" and rates.pairs() == ["BTC/USD", "ETH/USD", "USDT/USD"]
    assert [s.name for s in rates.sources] == ["chainlink:devnet", "fixed", "http:api.coingecko.com"]


async def test_quotes_lock_an_amount_for_one_invoice(tmp_path, anvil, feed):
    port = free_port()
    other_app = "other-app-0123456789abcdefgh"
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)], api_port=port, extra={"rates": {
        "refresh": 0, "quote_ttl": 900,
        "sources": [{"kind": "chainlink", "chain": "devnet", "pair": "ETH/USD", "feed": feed}]},
        "api": {"tokens": {"other": other_app}}})
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                                                   trust_env=False, timeout=10) as http:
            r = await http.post("/v1/quotes", json={"chain": "devnet", "asset": "ETH",
                                                    "price": {"amount": "19.99", "currency": "USD"}})
            assert r.status_code == 201, r.text
            quote = r.json()
            wei = math.ceil(Fraction("19.99") * 10**18 / Fraction(300012345678, 10**8))
            assert quote["base_units"] == str(wei) and quote["rate"]["value"] == "3000.12345678"
            # the feed moves; the quote's amount does not
            anvil.send(anvil.accounts[0], feed, 0, calldata("updateAnswer(int256)", 200000000000),
                       gas=FEED_GAS)
            anvil.mine(1)
            assert (await http.get("/v1/rates", params={"pair": "ETH/USD"})).json()["rate"] == "2000"
            # another app's key can neither use nor burn it
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "quote_id": quote["id"]},
                                headers={"authorization": f"Bearer {other_app}"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_quote", r.text
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "quote_id": quote["id"]})
            assert r.status_code == 201, r.text
            inv = r.json()
            assert inv["base_units"] == str(wei) and inv["price"] == {"amount": "19.99", "currency": "USD"}
            assert inv["rate"] == quote["rate"]
            again = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "quote_id": quote["id"]})
            assert again.status_code == 409 and again.json()["error"]["code"] == "quote_used"
            other = (await http.post("/v1/quotes", json={"chain": "devnet", "asset": "ETH",
                                                         "price": {"amount": "5", "currency": "USD"}})).json()
            assert other["base_units"] == str(math.ceil(Fraction(5 * 10**18, 2000)))  # today's rate
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "quote_id": other["id"],
                                                      "amount": "1"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_quote"
            d.store.db.conn.execute("UPDATE quotes SET expires_at = ? WHERE id = ?",
                                    (d.store.clock.now_ms() - 1, other["id"]))
            before = d.store.db.scalar("SELECT COUNT(*) FROM invoices")
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "quote_id": other["id"]})
            assert r.status_code == 409 and r.json()["error"]["code"] == "quote_expired"
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "quote_id": "quo_nope"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_quote"
            assert d.store.db.scalar("SELECT COUNT(*) FROM invoices") == before


# CoinGecko's documented /simple/price answer (include_last_updated_at=true), replayed
COINGECKO = (b'{"bitcoin":{"usd":97321.12345678,"last_updated_at":%d},'
             b'"tether":{"usd":0.99981,"last_updated_at":%d},"dogecoin":{"usd":-1}}')


async def test_the_http_kind_reads_coingeckos_format_from_a_local_replay(tmp_path):
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    seen: list[dict] = []
    now = int(time.time())
    stamps = {"fresh": now - 30}

    hostile: dict[str, bytes] = {}

    async def simple_price(request: Request) -> Response:
        seen.append({"query": dict(request.query_params), "key": request.headers.get("x-cg-demo-api-key")})
        t = stamps["fresh"]
        return Response(hostile.get("body") or COINGECKO % (t, t), media_type="application/json")

    port, api_port = free_port(), free_port()
    (tmp_path / "cg.key").write_text("demo-key-123\n")
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")], api_port=api_port,
                       extra={"rates": {"refresh": 0, "max_age": 600, "sources": [{
                           "kind": "http", "url": f"http://127.0.0.1:{port}/api/v3/simple/price",
                           "ids": {"BTC": "bitcoin", "USDT": "tether", "DOGE": "dogecoin"}, "vs": "USD",
                           "api_key_header": "x-cg-demo-api-key", "api_key_file": "cg.key"}]}})
    hc = HyperConfig()
    hc.bind = [f"127.0.0.1:{port}"]
    hc.accesslog = None
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve(Starlette(routes=[Route("/api/v3/simple/price", simple_price)]), hc,
                                             shutdown_trigger=stop.wait))
            async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}",
                                                                 headers=AUTH, trust_env=False) as http:
                got = (await http.get("/v1/rates", params={"pair": "BTC/USD"})).json()
                assert got["rate"] == "97321.12345678" and got["source"] == "http:127.0.0.1"  # exact, no float
                assert seen[-1] == {"query": {"ids": "bitcoin,tether,dogecoin", "vs_currencies": "usd",
                                              "include_last_updated_at": "true"}, "key": "demo-key-123"}
                cross = (await http.get("/v1/rates", params={"pair": "BTC/USDT"})).json()
                assert cross["rate"] == decimal_text(Fraction("97321.12345678") / Fraction("0.99981"))
                r = await http.get("/v1/rates", params={"pair": "DOGE/USD"})  # a negative price: none
                assert r.status_code == 503 and r.json()["error"]["code"] == "rate_unavailable"
                stamps["fresh"] = now - 601  # the API's own timestamp says it is old: never used
                r = await http.get("/v1/rates", params={"pair": "BTC/USD"})
                assert r.status_code == 503 and "old" in r.json()["error"]["message"]
                assert "demo-key-123" not in r.text
                # a broken or hostile answer: 1e7000000 took seconds of the daemon's one thread to
                # turn into a fraction (1e100000000: minutes); 1e95 was taken, and then every
                # transfer's value raised inside the scan; a date in the future never went stale
                hostile["body"] = (b'{"bitcoin":{"usd":1e700000,"last_updated_at":%d},'
                                   b'"tether":{"usd":1e95,"last_updated_at":%d},'
                                   b'"dogecoin":{"usd":0.1,"last_updated_at":%d}}' % (now, now, now + 10**6))
                for pair in ("BTC/USD", "USDT/USD", "DOGE/USD"):
                    with trio.fail_after(2):
                        r = await http.get("/v1/rates", params={"pair": pair})
                    assert r.status_code == 503 and r.json()["error"]["code"] == "rate_unavailable", (pair, r.text)
            stop.set()


async def test_a_sources_rate_that_is_no_price_makes_only_that_pair_unavailable():
    """The core took what a source gave: a rate of 0 divided by zero when an invoice was
    priced or a transfer valued (inside the scan: retried for ever, nothing credited), a
    negative one valued transfers below zero, one dated in the future never went stale. A
    plugin's source is now held to what the built-in ones check."""
    now = time.time()

    class Broken:
        name = "broken"
        pairs = (("ETH", "USD"), ("BTC", "USD"), ("LTC", "USD"), ("USDT", "USD"))

        async def read(self, daemon):
            return [Rate("ETH", "USD", Fraction(0), "broken", int(now)),
                    Rate("BTC", "USD", Fraction(-3000), "broken", int(now)),
                    Rate("LTC", "USD", Fraction(80), "broken", int(now) + 10**9),
                    Rate("USDT", "USD", Fraction(1), "broken", int(now))]

    rates = Rates(reference="USD", max_age=3600, refresh=0, sources=[Broken()], wall=lambda: now)
    for symbol in ("ETH", "BTC", "LTC"):
        with pytest.raises(RateUnavailable, match="gave none"):
            await rates.get(None, symbol, "USD")  # type: ignore[arg-type]
        assert rates.value_of(symbol, 10**18, 18) is None
    assert (await rates.get(None, "USDT", "USD")).value == 1  # type: ignore[arg-type]

