"""The control API as a contract: OpenAPI agrees with the routes, every /v1 route needs a
token, every bad input gets a 4xx and changes nothing, and a schemathesis run finds no 5xx."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.daemon import (
    API_TOKEN,
    AUTH,
    DaemonProcess,
    chain_entry,
    free_port,
    running,
    wait_http,
    write_config,
)
from tests.support.evm import Anvil
from watcher.api import all_endpoints, create_app
from watcher.auth import SCOPES

ROOT = Path(__file__).resolve().parents[1]
DEAD_NODE = "http://127.0.0.1:9"
TOKEN_ADDR = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def test_openapi_document_matches_the_routes():
    from watcher.api.openapi import build

    doc = build(all_endpoints())
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}

    class FakeDaemon:  # create_app only reads the endpoint table here
        config = None

    app = create_app(FakeDaemon())  # type: ignore[arg-type]
    served = {(m, r.path) for r in app.routes for m in r.methods if m != "HEAD"}
    assert served == documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (method, path)
            if path.startswith("/v1/"):
                assert "401" in op["responses"] and op["security"], (method, path)
                assert "403" in op["responses"] and "429" in op["responses"], (method, path)
                assert op["x-watcher-scope"] in SCOPES and op["security"][0]["bearer"] == [op["x-watcher-scope"]]


def test_api_docs_list_every_route_with_its_scope():
    docs = (ROOT / "docs" / "api.md").read_text()
    missing = [f"{e.method} {e.path}" for e in all_endpoints() if f"{e.method} {e.path}" not in docs]
    assert not missing, f"docs/api.md does not describe: {missing}"
    # the scope table: one row per route, "| `METHOD /path` | `scope` |"
    table = dict(re.findall(r"^\| `([A-Z]+ /[^`]*)` \| `?([a-z]+|none)`? \|", docs, re.M))
    wrong = {f"{e.method} {e.path}": (table.get(f"{e.method} {e.path}"), e.scope or "none")
             for e in all_endpoints() if table.get(f"{e.method} {e.path}") != (e.scope or "none")}
    assert not wrong, f"docs/api.md's scope table disagrees with the routes (docs, code): {wrong}"


@pytest.fixture
def cfg(tmp_path):
    port = free_port()
    path = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE, tokens=[("USDT", TOKEN_ADDR, 6)])],
                        api_port=port, extra={"api": {"tokens": {"shop": "shop-token-0123456789"},
                                                      # these tests fail authentication on purpose, often
                                                      "failed_auth_limit": "100000/min"},
                                              "webhooks": {"allowed_hosts": ["127.0.0.1", "localhost"]}})
    return path, port


async def test_every_v1_route_requires_a_token(cfg):
    path, port = cfg
    async with running(path, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        for e in all_endpoints():
            url = re.sub(r"{(\w+)}", "x", e.path)
            r = await http.request(e.method, url)
            if e.auth:
                assert r.status_code == 401, (e.method, e.path)
                assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
                r = await http.request(e.method, url, headers={"authorization": "Bearer nope-nope-nope"})
                assert r.status_code == 401
                r = await http.request(e.method, url, headers={"authorization": f"Basic {API_TOKEN}"})
                assert r.status_code == 401
            else:
                assert r.status_code in (200, 503), (e.method, e.path)
        r = await http.request("PUT", "/v1/invoices", headers=AUTH)
        assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def dump(d) -> str:
    return "\n".join(line for line in d.store.db.conn.iterdump())


async def test_bad_input_gets_4xx_and_changes_nothing(cfg):
    path, port = cfg
    good_invoice = {"chain": "devnet", "asset": "USDT", "amount": "12.5"}
    bad_checksum = TOKEN_ADDR[:-1] + "A"
    cases = [
        ("POST", "/v1/invoices", {**good_invoice, "chain": "moon"}, 400, "unknown_chain"),
        ("POST", "/v1/invoices", {**good_invoice, "asset": "DOGE"}, 400, "unknown_asset"),
        ("POST", "/v1/invoices", {**good_invoice, "amount": "-1"}, 400, "invalid_amount"),
        ("POST", "/v1/invoices", {**good_invoice, "amount": "0"}, 400, "invalid_amount"),
        ("POST", "/v1/invoices", {**good_invoice, "amount": "1.0000001"}, 400, "invalid_amount"),
        ("POST", "/v1/invoices", {**good_invoice, "amount": 12.5}, 400, "invalid_amount"),
        ("POST", "/v1/invoices", {**good_invoice, "amount": "1e3"}, 400, "invalid_amount"),
        ("POST", "/v1/invoices", {"chain": "devnet", "asset": "USDT"}, 400, "invalid_amount"),
        ("POST", "/v1/invoices", {**good_invoice, "mode": "gift"}, 400, "invalid_mode"),
        ("POST", "/v1/invoices", {**good_invoice, "expires_in": 5}, 400, "invalid_expires_in"),
        ("POST", "/v1/invoices", {**good_invoice, "expires_in": "60"}, 400, "invalid_expires_in"),
        ("POST", "/v1/invoices", {**good_invoice, "tolerance": "0.9"}, 400, "invalid_tolerance"),
        ("POST", "/v1/invoices", {**good_invoice, "tolerance": "abc"}, 400, "invalid_tolerance"),
        ("POST", "/v1/invoices", {**good_invoice, "order_id": "x" * 200}, 400, "invalid_order_id"),
        ("POST", "/v1/invoices", {**good_invoice, "metadata": [1]}, 400, "invalid_metadata"),
        ("POST", "/v1/invoices", {**good_invoice, "metadata": {"a": "x" * 9000}}, 400, "invalid_metadata"),
        ("POST", "/v1/invoices", {**good_invoice, "metadata": json.loads('{"a":' * 20 + "1" + "}" * 20)}, 400,
         "invalid_metadata"),
        ("POST", "/v1/invoices", {**good_invoice, "surprise": 1}, 400, "unknown_field"),
        ("POST", "/v1/invoices", b"{broken", 400, "malformed_json"),
        ("POST", "/v1/invoices", b"\xff\xfe", 400, "malformed_json"),
        ("POST", "/v1/invoices", b"[" * 100_000, 413, "payload_too_large"),
        ("POST", "/v1/invoices", b"[" * 5000 + b"]" * 5000, 400, "malformed_json"),
        ("POST", "/v1/watch", {"chain": "devnet", "address": bad_checksum}, 400, "invalid_address"),
        ("POST", "/v1/watch", {"chain": "devnet", "address": "0x12"}, 400, "invalid_address"),
        ("POST", "/v1/watch", {"chain": "devnet", "address": 5}, 400, "invalid_address"),
        ("POST", "/v1/addresses", {"chain": "devnet", "label": ""}, 400, "invalid_label"),
        ("POST", "/v1/addresses", {"chain": "devnet", "label": "a\nb"}, 400, "invalid_label"),
        ("GET", f"/v1/addresses/devnet/{bad_checksum}", None, 400, "invalid_address"),
        ("GET", "/v1/addresses/moon/x", None, 404, "unknown_chain"),
        ("GET", "/v1/invoices/inv_nothing", None, 404, "unknown_invoice"),
        ("GET", "/v1/invoices?status=paid", None, 400, "invalid_status"),
        ("POST", "/v1/invoices/inv_nothing/submit-tx", {"txid": "0x" + "a" * 64}, 404, "unknown_invoice"),
        ("POST", "/v1/webhooks", {"url": "http://example.com/x", "events": ["*"]}, 400, "webhook_host_not_allowed"),
        ("DELETE", "/v1/webhooks/wh_nothing", None, 404, "unknown_webhook"),
        ("POST", "/v1/deliveries/dlv_nothing/redeliver", None, 404, "unknown_delivery"),
    ]
    async with running(path, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH,
                                                              trust_env=False) as http:
        before = dump(d)
        for method, url, body, status, code in cases:
            kw = {"content": body} if isinstance(body, bytes) else ({"json": body} if body is not None else {})
            r = await http.request(method, url, **kw)
            got = (r.status_code, r.json().get("error", {}).get("code") if isinstance(r.json(), dict) else r.json())
            assert got == (status, code), (method, url, str(body)[:80], r.text[:300])
            assert set(r.json()["error"]) == {"code", "message"} and r.json()["error"]["message"]
        assert dump(d) == before  # nothing was written, not even an audit entry


async def test_audit_log_names_the_token(cfg):
    path, port = cfg
    async with running(path, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                              trust_env=False) as http:
        r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "1"},
                            headers={"authorization": "Bearer shop-token-0123456789"})
        assert r.status_code == 201
        r2 = await http.post("/v1/addresses", json={"chain": "devnet", "label": "alice"}, headers=AUTH)
        await http.post("/v1/addresses", json={"chain": "devnet", "label": "alice"}, headers=AUTH)  # not a change
        entries = d.views.audit()
        assert [(e["actor"], e["action"], e["object_id"]) for e in entries] == [
            ("shop", "invoice.create", r.json()["id"]),
            ("default", "address.create", r2.json()["address"].lower()),
        ]
        assert all(e["at"].endswith("Z") for e in entries)


#: examples per operation; `make test` keeps 20 (the app key; the admin key 20 too), `make soak` runs 120
SCHEMATHESIS_EXAMPLES = int(os.environ.get("WATCHER_SCHEMATHESIS_EXAMPLES", "20"))


@pytest.mark.slow
@pytest.mark.parametrize("who", ["app_token", "shop_key"])
def test_schemathesis_finds_no_server_errors(tmp_path, anvil: Anvil, who: str):
    """With the config's app token (every scope but admin), and with a key made by ``watcher
    keys create`` that can only run a shop (read, addresses, invoices: every other route is
    403)."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", TOKEN_ADDR, 6)])], api_port=port,
                       extra={"webhooks": {"allowed_hosts": ["127.0.0.1"], "timeout": 1.0},
                              # schemathesis checks every route without auth, many times
                              "api": {"failed_auth_limit": "100000/min"}})
    token = API_TOKEN
    if who == "shop_key":
        made = subprocess.run([sys.executable, "-m", "watcher", "keys", "create", "--name", "shop", "--scopes",
                               "read,addresses,invoices", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        token = json.loads(made.stdout.strip().splitlines()[-1])["key"]
    # the shop key gets 403 on most routes: a third of the examples cover it (the soak runs more)
    examples = SCHEMATHESIS_EXAMPLES if who == "app_token" else max(20, SCHEMATHESIS_EXAMPLES // 3)
    proc = DaemonProcess(cfg).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        r = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"http://127.0.0.1:{port}/openapi.json",
             "-H", f"Authorization: Bearer {token}", "--max-examples", str(examples), "--seed", "1",
             "--exclude-checks", "positive_data_acceptance", "--generation-database", "none", "--no-color",
             "--request-timeout", "20"],
            capture_output=True, text=True, timeout=max(600, SCHEMATHESIS_EXAMPLES * 20), cwd=tmp_path)
        assert proc.alive()
    finally:
        proc.stop()
    assert r.returncode == 0, r.stdout[-5000:]
    assert "Traceback" not in proc.log()
    summary = re.search(r"\d+ generated, \d+ passed.*", r.stdout)
    assert summary, r.stdout[-2000:]
    print(f"schemathesis ({who}), {examples} examples per operation: {summary.group(0)}")
