"""Plugins: discovery through entry points, the hook contract, and its documentation."""

from __future__ import annotations

import inspect
import re
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.support.daemon import chain_entry, write_config
from tests.support.evm import Anvil
from watcher import hookspecs
from watcher.config import load_config
from watcher.errors import ConfigError
from watcher.hookspecs import hookimpl
from watcher.plugins import PluginError, chain_families, make_plugin_manager
from watcher_evm import EvmFamily

ROOT = Path(__file__).resolve().parents[1]


def hook_names() -> list[str]:
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("watcher_")]


def test_every_hook_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    missing = [n for n in hook_names() if not re.search(rf"^### `?{n}", docs, re.M)]
    assert not missing, f"hooks missing from docs/plugins.md: {missing}"


def test_every_hookspec_has_a_docstring_saying_what_happens_on_error():
    for name in hook_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "rais" in doc or "error" in doc.lower(), f"{name}: say what happens if it raises"


def test_core_never_imports_a_plugin():
    for path in (ROOT / "watcher").rglob("*.py"):
        text = path.read_text()
        for plugin in ("watcher_evm", "watcher_bitcoin", "watcher_checkout", "watcher_rates_http"):
            assert plugin not in text, f"{path} imports the plugin {plugin}"


def test_evm_family_comes_from_the_entry_point(monkeypatch):
    pm = make_plugin_manager()
    assert pm.get_plugin("evm") is not None  # registered under its entry-point name
    assert isinstance(chain_families(pm)["evm"], EvmFamily)
    monkeypatch.setenv("WATCHER_PLUGINS", "")
    assert dict(chain_families(make_plugin_manager())) == {}


def test_config_names_the_missing_family_when_the_plugin_is_not_loaded(tmp_path, monkeypatch):
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")])
    monkeypatch.setenv("WATCHER_PLUGINS", "")
    with pytest.raises(ConfigError, match=r"chains\[0\].family: unknown chain family 'evm' \(available: none"):
        load_config(cfg, chain_families(make_plugin_manager()))


def test_two_plugins_may_not_provide_the_same_family():
    class Again:
        @hookimpl
        def watcher_chain_families(self):
            return [EvmFamily()]

    with pytest.raises(PluginError, match="provided by both"):
        chain_families(make_plugin_manager(extra=(Again(),)))


def test_a_plugin_returning_garbage_is_named():
    class Broken:
        @hookimpl
        def watcher_chain_families(self):
            return ["evm"]

    with pytest.raises(PluginError, match="not a ChainFamily"):
        chain_families(make_plugin_manager(extra=(Broken(),)))


def test_a_plugin_returning_one_family_instead_of_a_list_is_named():
    class One:
        @hookimpl
        def watcher_chain_families(self):
            return EvmFamily()

    with pytest.raises(PluginError, match=r"plugin '\d+': watcher_chain_families returned .*EvmFamily.*, not a list"):
        chain_families(make_plugin_manager(load_entry_points=False, extra=(One(),)))


async def test_startup_and_shutdown_hooks_may_be_async(tmp_path, anvil: Anvil):
    calls = []

    class Lifecycle:
        @hookimpl
        async def watcher_startup(self, daemon):
            await trio.sleep(0)
            calls.append(("startup", sorted(daemon.watchers)))

        @hookimpl
        def watcher_shutdown(self, daemon):
            calls.append(("shutdown", None))

    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)])
    from prometheus_client import CollectorRegistry

    from watcher.daemon import Daemon

    d = Daemon.open(cfg, pm=make_plugin_manager(extra=(Lifecycle(),)), registry=CollectorRegistry())
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: d.run(api=False, task_status=task_status))
                assert calls == [("startup", ["devnet"])]
                nursery.cancel_scope.cancel()
    finally:
        d.close()
    assert calls[-1] == ("shutdown", None)


async def test_event_hook_gets_every_event_in_order_at_least_once_with_retries(tmp_path):
    from prometheus_client import CollectorRegistry

    from watcher.daemon import Daemon

    class Ledger:
        def __init__(self):
            self.seen: list[str] = []
            self.failures = 2

        @hookimpl
        async def watcher_event(self, event):
            if event.type == "invoice.created" and self.failures:
                self.failures -= 1
                raise RuntimeError("ledger database is down")
            self.seen.append(event.id)

    ledger = Ledger()
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")])

    def make(n):
        return d.views.invoice(d.store.invoices.create(chain="devnet", asset="ETH", amount=10**18, mode="sale",
                                                       expires_in=3600, tolerance_ppm=0, order_id=f"o{n}", metadata={},
                                                       actor="t").id)

    for round_ in range(2):
        d = Daemon.open(cfg, pm=make_plugin_manager(extra=(ledger,)), registry=CollectorRegistry())
        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(d.run, api=False))
                    for n in range(3):
                        make(round_ * 3 + n)
                    want = [e.id for e in d.store.events.list(limit=100)]
                    while ledger.seen != want:
                        await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            if round_ == 0:
                assert d.metrics.registry.get_sample_value("watcher_errors_total", {"kind": "plugin_event"}) == 2
        finally:
            d.close()
    assert len(ledger.seen) == 6 == len(set(ledger.seen))  # the restart resumed from the cursor


async def test_hooks_may_take_fewer_arguments_than_the_spec(tmp_path, caplog):
    """pluggy passes an implementation only the arguments it names: lifecycle and event hooks
    written with no arguments (or only some) run, and a failing shutdown hook is logged with
    its plugin's name while the other plugins' shutdown hooks still run."""
    from prometheus_client import CollectorRegistry

    from watcher.daemon import Daemon

    calls: list[str] = []

    class Bare:
        @hookimpl
        def watcher_startup(self):
            calls.append("startup")

        @hookimpl
        async def watcher_shutdown(self):
            calls.append("shutdown")

        @hookimpl
        def watcher_event(self):
            calls.append("event")

    class EventOnly:
        @hookimpl
        async def watcher_event(self, event):
            calls.append(event.type)

    class FailingShutdown:
        @hookimpl
        def watcher_shutdown(self, daemon):
            raise RuntimeError("could not flush")

    pm = make_plugin_manager(extra=(Bare(), EventOnly()))
    pm.register(FailingShutdown(), "flaky")  # registered last: pluggy calls it first
    cfg = write_config(tmp_path, [chain_entry("devnet", "http://127.0.0.1:9")])
    d = Daemon.open(cfg, pm=pm, registry=CollectorRegistry())
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(d.run, api=False))
                assert calls == ["startup"]
                d.store.invoices.create(chain="devnet", asset="ETH", amount=10**18, mode="sale", expires_in=3600,
                                        tolerance_ppm=0, order_id="o1", metadata={}, actor="t")
                while not {"event", "invoice.created"} <= set(calls):
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
    finally:
        d.close()
    assert calls[-1] == "shutdown" and calls.count("shutdown") == 1
    failed = [r for r in caplog.records if "watcher_shutdown failed" in r.getMessage()]
    assert [r.getMessage() for r in failed] == ["plugin flaky: watcher_shutdown failed"]


async def test_startup_hook_can_use_the_chain_clients(tmp_path, anvil: Anvil):
    """watcher_startup runs after the chain clients are open: it can ask the node, with the
    very client the chain's tasks then use."""
    from prometheus_client import CollectorRegistry

    from watcher.daemon import Daemon

    seen = []

    class AsksTheNode:
        @hookimpl
        async def watcher_startup(self, daemon):
            client = daemon.watchers["devnet"].client
            seen.append((client, await client.head()))

    anvil.mine(3)
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)])
    d = Daemon.open(cfg, pm=make_plugin_manager(extra=(AsksTheNode(),)), registry=CollectorRegistry())
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(d.run, api=False))
                [(client, head)] = seen
                assert head == anvil.head() >= 3
                assert d.watchers["devnet"].client is client
                nursery.cancel_scope.cancel()
    finally:
        d.close()


class Greeter:
    """A plugin with a config table of its own, an API route (scoped) and a public listener."""

    def __init__(self, public_port: int = 0):
        self.public_port = public_port

    @hookimpl
    def watcher_config_sections(self):
        from watcher.config import ConfigSection

        def parse(t, resolve):
            return {"greeting": t.take("greeting", str, "hello")}

        return [ConfigSection("greeter", parse)]

    @hookimpl
    def watcher_routes(self, config):
        from watcher.api import Endpoints, Listener, RouteSet

        greeting = config.sections.get("greeter", {}).get("greeting", "hello")
        api, public = Endpoints(), Endpoints()

        @api.add("GET", "/v1/greeter/greeting", summary="The greeting.", tag="greeter",
                 responses={200: {"type": "object"}})
        async def get_greeting(req):
            return {"greeting": greeting, "by": req.actor.name}

        @api.add("POST", "/v1/greeter/greetings", summary="Greet someone.", tag="greeter", scope="admin",
                 responses={200: {"type": "object"}})
        async def post_greeting(req):
            return {"greeted": (await req.json()).get("name")}

        @public.add("GET", "/hello", summary="A public greeting.", auth=False)
        async def hello(req):
            from starlette.responses import PlainTextResponse

            return PlainTextResponse(greeting)

        return [RouteSet(api.items), RouteSet(public.items, Listener("greeter", "127.0.0.1", self.public_port,
                                                                      frozenset({f"127.0.0.1:{self.public_port}"})))]


async def test_plugin_routes_join_the_api_with_their_scopes_and_openapi(tmp_path, anvil: Anvil):
    import httpx

    from tests.support.daemon import API_TOKEN, free_port, running

    api_port, public_port = free_port(), free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url)], api_port=api_port,
                       extra={"greeter": {"greeting": "moin"}})
    pm = make_plugin_manager(extra=(Greeter(public_port),))
    async with running(cfg, api=True, pm=pm) as d, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{api_port}", trust_env=False) as http:
        assert d.config.sections["greeter"] == {"greeting": "moin"}
        auth = {"authorization": f"Bearer {API_TOKEN}"}
        assert (await http.get("/v1/greeter/greeting")).status_code == 401
        r = await http.get("/v1/greeter/greeting", headers=auth)
        assert r.status_code == 200 and r.json()["greeting"] == "moin"
        r = await http.post("/v1/greeter/greetings", headers=auth, json={"name": "x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
        doc = (await http.get("/openapi.json")).json()
        op = doc["paths"]["/v1/greeter/greetings"]["post"]
        assert op["x-watcher-scope"] == "admin" and op["security"][0]["bearer"] == ["admin"]
        assert "/hello" not in doc["paths"] and (await http.get("/hello")).status_code == 404
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{public_port}", trust_env=False) as pub:
            r = await pub.get("/hello")
            assert r.status_code == 200 and r.text == "moin"
            assert (await pub.get("/v1/greeter/greeting", headers=auth)).status_code == 404
            assert (await pub.get("/openapi.json")).status_code == 404
        assert d.listener_urls["greeter"] == [f"http://127.0.0.1:{public_port}"]


def test_plugin_route_and_section_mistakes_stop_start_up_naming_the_plugin(tmp_path, anvil: Anvil):
    from watcher.api import Endpoints, Listener, RouteSet, plugin_routes
    from watcher.config import ConfigSection
    from watcher.plugins import config_sections

    class ClaimsApi:
        @hookimpl
        def watcher_config_sections(self):
            return [ConfigSection("api", lambda t, r: None)]

    with pytest.raises(PluginError, match=r"claims \[api\]"):
        config_sections(make_plugin_manager(extra=(ClaimsApi(),)))

    def routes_of(*endpoints_and_listener):
        class Routes:
            @hookimpl
            def watcher_routes(self):
                return [RouteSet(list(e.items), lst) for e, lst in endpoints_and_listener]
        return Routes()

    core = Endpoints()

    @core.add("GET", "/v1/invoices", summary="Mine.")
    async def mine(req):
        return {}

    with pytest.raises(PluginError, match="GET /v1/invoices is the core's"):
        plugin_routes(make_plugin_manager(extra=(routes_of((core, None)),)), None)

    twice = Endpoints()

    @twice.add("GET", "/v1/twice", summary="Twice.")
    async def t(req):
        return {}

    with pytest.raises(PluginError, match="already served"):
        plugin_routes(make_plugin_manager(extra=(routes_of((twice, None), (twice, None)),)), None)

    authed = Endpoints()

    @authed.add("GET", "/secret", summary="Needs a token.")
    async def s(req):
        return {}

    with pytest.raises(PluginError, match="asks for auth"):
        plugin_routes(make_plugin_manager(extra=(routes_of((authed, Listener("pub", "127.0.0.1", 0))),)), None)

    class Raises:
        @hookimpl
        def watcher_routes(self):
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match="watcher_routes raised RuntimeError: boom"):
        plugin_routes(make_plugin_manager(extra=(Raises(),)), None)
