"""Scoped API keys, signed requests, rate limits, ownership and the audit trail, against a
running daemon (real HTTP on loopback, real SQLite).

The route x scope test is built from the route table itself: a route added later is covered
without editing this file."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.support.daemon import (
    API_TOKEN,
    chain_entry,
    free_port,
    running,
    wait_until,
    write_config,
)
from tests.support.evm import Anvil, Token
from tests.test_api import DEAD_NODE, TOKEN_ADDR
from watcher.api import all_endpoints
from watcher.auth import SCOPES, Rate, RateLimiter, parse_rate, signature

ADMIN_TOKEN = "admin-token-0123456789"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
PAYOUT_TO = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def config(tmp_path, port: int, node: str = DEAD_NODE, token: str = TOKEN_ADDR, **api: Any):
    return write_config(tmp_path, [chain_entry("devnet", node, tokens=[("USDT", token, 6)],
                                               payouts={"approval_above": {"USDT": "100"}},
                                               sweep={"to": PAYOUT_TO, "min_amount": {"USDT": "1"}})],
                        api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN, **api},
                                              "webhooks": {"allowed_hosts": ["127.0.0.1"]},
                                              "rates": {"sources": [{"kind": "fixed", "pair": "USDT/USD",
                                                                     "rate": "1"}]}})


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def make_key(http: httpx.AsyncClient, name: str, scopes: list[str], **extra: Any) -> dict[str, Any]:
    r = await http.post("/v1/keys", json={"name": name, "scopes": scopes, **extra}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def payout_body(key: str, amount: str = "1") -> dict[str, Any]:
    return {"chain": "devnet", "asset": "USDT", "amount": amount, "to": PAYOUT_TO, "idempotency_key": key}


# --- units ---------------------------------------------------------------------------------


def test_rates_parse_and_buckets_refill():
    assert parse_rate("5/s") == Rate(5, 1) and parse_rate("3/h") == Rate(3, 3600)
    assert parse_rate("10/min") == parse_rate("10/m") == Rate(10, 60)
    for bad in ("0/s", "5", "5/week", "-1/s", "1.5/s", "", "5/s/s"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    limiter = RateLimiter()
    rate = Rate(5, 1)
    verdicts = [limiter.take("k", rate, 100.0) for _ in range(7)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False] * 2
    assert verdicts[5].retry_after == 1 and verdicts[5].remaining == 0 and verdicts[5].limit == 5
    assert verdicts[5].headers()["retry-after"] == "1"
    assert limiter.take("k", rate, 100.2).allowed  # one token back after 0.2 s
    assert not limiter.take("k", rate, 100.2).allowed
    assert limiter.take("k", rate, 101.5).remaining == 4  # full again (5), one taken
    small = RateLimiter(max_buckets=3)
    for i in range(10):
        small.take(f"addr{i}", rate, 0.0)
    assert len(small._buckets) == 3  # a flood of client addresses cannot grow it


def test_signature_is_the_documented_formula():
    body = b'{"a":1}'
    msg = b"1700000000\nPOST\n/v1/invoices?x=1\n" + hashlib.sha256(body).hexdigest().encode()
    want = "v1=" + hmac.new(b"wk_secret", msg, hashlib.sha256).hexdigest()
    assert signature("wk_secret", "1700000000", "post", "/v1/invoices?x=1", body) == want
    empty = signature("k", "1", "GET", "/v1/chains", b"")
    assert empty == "v1=" + hmac.new(b"k", b"1\nGET\n/v1/chains\n" + hashlib.sha256(b"").hexdigest().encode(),
                                     hashlib.sha256).hexdigest()


# --- every route with every scope ----------------------------------------------------------


async def _fixtures(http: httpx.AsyncClient, owner: dict[str, str]) -> dict[str, str]:
    """Objects for the routes' path parameters, created by ``owner`` (a key with every scope)."""
    addr = (await http.post("/v1/addresses", json={"chain": "devnet", "label": "fx"}, headers=owner)).json()
    inv = (await http.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "5"},
                           headers=owner)).json()
    big = (await http.post("/v1/payouts", json=payout_body("fx-big", "500"), headers=owner)).json()
    assert big["status"] == "awaiting_approval", big
    hook = (await http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["*"]},
                            headers=owner)).json()
    delivery = (await http.post(f"/v1/webhooks/{hook['id']}/test", headers=owner)).json()
    return {"chain": "devnet", "address": addr["address"], "invoice": inv["id"], "payout": big["id"],
            "webhook": hook["id"], "delivery": delivery["id"]}


def _request_for(method: str, path: str, fx: dict[str, str], victim_key: str) -> tuple[str, Any]:
    """A valid request for the route (so that with the right scope it succeeds)."""
    ids = {"/v1/invoices/{id}": fx["invoice"], "/v1/payouts/{id}": fx["payout"], "/v1/webhooks/{id}": fx["webhook"],
           "/v1/deliveries/{id}": fx["delivery"], "/v1/keys/{id}": victim_key}
    url = path.replace("{chain}", fx["chain"]).replace("{address}", fx["address"])
    for prefix, value in ids.items():
        if url.startswith(prefix):
            url = url.replace("{id}", value)
    bodies: dict[tuple[str, str], Any] = {
        ("POST", "/v1/addresses"): {"chain": "devnet", "label": "scoped"},
        ("POST", "/v1/watch"): {"chain": "devnet", "address": PAYOUT_TO},
        ("POST", "/v1/invoices"): {"chain": "devnet", "asset": "USDT", "amount": "1"},
        ("POST", "/v1/invoices/{id}/submit-tx"): {"txid": "0x" + "ab" * 32},
        ("POST", "/v1/payouts"): payout_body("scoped"),
        ("POST", "/v1/sweeps/run"): {},
        ("POST", "/v1/admin/pause"): {"scope": "sweeps"},
        ("POST", "/v1/admin/resume"): {"scope": "sweeps"},
        ("POST", "/v1/webhooks"): {"url": "http://127.0.0.1:9/other", "events": ["invoice.*"]},
        ("PATCH", "/v1/webhooks/{id}"): {"description": "changed"},
        ("POST", "/v1/keys"): {"name": "made", "scopes": ["read"]},
        ("POST", "/v1/quotes"): {"chain": "devnet", "asset": "USDT", "price": {"amount": "3", "currency": "USD"}},
        ("POST", "/v1/invoices/{id}/refund"): {"to": PAYOUT_TO, "idempotency_key": "refund-1"},
    }
    return url, bodies.get((method, path))


async def test_every_route_with_every_scope(tmp_path, anvil: Anvil, token: Token):
    """Each key holds one scope. A route refuses every key but the one with its scope (403
    insufficient_scope naming it, before the handler: nothing is written); with its scope it
    answers 2xx (or, for the objects another key made, 403 not_owner). Never a 5xx."""
    port = free_port()
    cfg = config(tmp_path, port, node=anvil.url, token=token.address)
    routes = [e for e in all_endpoints() if e.auth]
    assert {e.scope for e in routes} == set(SCOPES)
    with trio.fail_after(120):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                   trust_env=False, timeout=10) as http:
            keys = {s: await make_key(http, f"only-{s}", [s]) for s in SCOPES}
            everything = await make_key(http, "all", list(SCOPES))
            victim = await make_key(http, "victim", ["read"])
            fx = await _fixtures(http, bearer(everything["key"]))
            audit_before = len(d.store.audit.entries(limit=10_000))
            for e in routes:
                url, body = _request_for(e.method, e.path, fx, victim["id"])
                for scope, key in keys.items():
                    if scope == e.scope:
                        continue
                    r = await http.request(e.method, url, json=body, headers=bearer(key["key"]))
                    assert r.status_code == 403, (e.method, e.path, scope, r.status_code, r.text)
                    assert r.json()["error"]["code"] == "insufficient_scope"
                    assert f"'{e.scope}'" in r.json()["error"]["message"]
            assert len(d.store.audit.entries(limit=10_000)) == audit_before  # refused: nothing written
            # with the right scope: destructive routes last, so the others find their objects
            last = {("DELETE", "/v1/webhooks/{id}"), ("DELETE", "/v1/keys/{id}")}
            ordered = [e for e in routes if (e.method, e.path) not in last] + \
                      [e for e in routes if (e.method, e.path) in last]
            for e in ordered:
                url, body = _request_for(e.method, e.path, fx, victim["id"])
                key = keys[e.scope]["key"]
                r = await http.request(e.method, url, json=body, headers=bearer(key))
                assert r.status_code < 500, (e.method, e.path, r.status_code, r.text)
                if r.status_code == 403:  # another key made the object: ownership, not scope
                    assert r.json()["error"]["code"] in ("not_owner",), (e.method, e.path, r.text)
                    assert e.scope in ("payouts", "webhooks"), (e.method, e.path)
                else:
                    assert r.status_code != 401, (e.method, e.path, r.text)
                    if (e.method, e.path) == ("POST", "/v1/invoices/{id}/submit-tx"):  # a txid the node lacks
                        assert r.status_code == 404 or r.status_code < 300, r.text
                    elif (e.method, e.path) == ("POST", "/v1/invoices/{id}/refund"):  # an unpaid invoice
                        assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_refund", r.text
                    else:
                        assert r.status_code < 300, (e.method, e.path, r.status_code, r.text)
            # the audit log names the key of every change
            entries = d.store.audit.entries(limit=10_000)
            assert entries and all(x.key_id for x in entries), [x for x in entries if not x.key_id]
            by_key = {x.key_id for x in entries}
            assert keys["addresses"]["id"] in by_key and everything["id"] in by_key
            mine = (await http.get("/v1/audit", params={"key": keys["webhooks"]["id"]}, headers=ADMIN)).json()
            assert mine["items"] and {x["key_id"] for x in mine["items"]} == {keys["webhooks"]["id"]}
            assert {x["actor"] for x in mine["items"]} == {"only-webhooks"}


async def test_a_shop_key_cannot_move_money_and_keys_act_only_on_their_own(tmp_path):
    port = free_port()
    cfg = config(tmp_path, port)
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                   trust_env=False, timeout=10) as http:
            shop = await make_key(http, "shop", ["invoices", "addresses", "read"])
            r = await http.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "3"},
                                headers=bearer(shop["key"]))
            assert r.status_code == 201
            for method, url, body, scope in (("POST", "/v1/payouts", payout_body("steal", "49"), "payouts"),
                                             ("POST", "/v1/sweeps/run", {}, "sweeps"),
                                             ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/x",
                                                                       "events": ["*"]}, "webhooks"),
                                             ("POST", "/v1/keys", {"name": "x", "scopes": ["payouts"]}, "admin"),
                                             ("POST", "/v1/admin/pause", {"scope": "all"}, "admin")):
                r = await http.request(method, url, json=body, headers=bearer(shop["key"]))
                assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", (url, r.text)
                assert f"'{scope}'" in r.json()["error"]["message"]
            assert d.store.db.scalar("SELECT COUNT(*) FROM payouts") == 0

            a = await make_key(http, "app-a", ["payouts", "webhooks", "approve", "read"])
            b = await make_key(http, "app-b", ["payouts", "webhooks", "approve", "read"])
            hook = (await http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/a", "events": ["*"]},
                                    headers=bearer(a["key"]))).json()
            for method, suffix, body in (("PATCH", "", {"url": "http://127.0.0.1:9/stolen"}),
                                         ("POST", "/rotate-secret", None), ("POST", "/test", None),
                                         ("DELETE", "", None)):
                r = await http.request(method, f"/v1/webhooks/{hook['id']}{suffix}", json=body,
                                       headers=bearer(b["key"]))
                assert r.status_code == 403 and r.json()["error"]["code"] == "not_owner", (suffix, r.text)
            assert d.views.webhook(hook["id"])["url"] == "http://127.0.0.1:9/a"
            r = await http.post(f"/v1/webhooks/{hook['id']}/rotate-secret", headers=bearer(a["key"]))
            assert r.status_code == 200
            r = await http.patch(f"/v1/webhooks/{hook['id']}", json={"description": "by admin"}, headers=ADMIN)
            assert r.status_code == 200  # admin acts on anything

            small = (await http.post("/v1/payouts", json=payout_body("a-1"), headers=bearer(a["key"]))).json()
            r = await http.post(f"/v1/payouts/{small['id']}/cancel", headers=bearer(b["key"]))
            assert r.status_code == 403 and r.json()["error"]["code"] == "not_owner"
            r = await http.post("/v1/payouts", json=payout_body("a-1"), headers=bearer(b["key"]))
            assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
            big = (await http.post("/v1/payouts", json=payout_body("a-big", "101"), headers=bearer(a["key"]))).json()
            assert big["status"] == "awaiting_approval"
            r = await http.post(f"/v1/payouts/{big['id']}/approve", headers=bearer(a["key"]))
            assert r.status_code == 403 and r.json()["error"]["code"] == "approval_by_creator"
            assert d.views.payout(big["id"])["status"] == "awaiting_approval"
            r = await http.post(f"/v1/payouts/{big['id']}/approve", headers=bearer(b["key"]))
            assert r.status_code == 200 and r.json()["approved_by"] == "app-b"
            r = await http.post(f"/v1/payouts/{small['id']}/cancel", headers=bearer(a["key"]))
            assert r.status_code == 200 and r.json()["status"] == "cancelled"


# --- signed requests -------------------------------------------------------------------------


def sign(key: dict[str, Any], method: str, target: str, body: bytes, ts: int | None = None,
         secret: str | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if ts is None else ts)
    return {"x-watcher-key-id": key["id"], "x-watcher-timestamp": stamp, "content-type": "application/json",
            "x-watcher-signature": signature(secret or key["key"], stamp, method, target, body)}


async def test_signed_requests(tmp_path):
    port = free_port()
    cfg = config(tmp_path, port)
    body = json.dumps({"chain": "devnet", "asset": "USDT", "amount": "2"}).encode()
    with trio.fail_after(60):
        async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                             trust_env=False, timeout=10) as http:
            key = await make_key(http, "signer", ["invoices", "read"], signed=True)
            assert key["signed"] is True and key["key"].startswith("wk_")

            async def send(method: str, target: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
                return await http.request(method, target, content=content, headers=headers)

            def code(r: httpx.Response) -> str:
                return r.json()["error"]["code"]

            ok = sign(key, "POST", "/v1/invoices", body)
            r = await send("POST", "/v1/invoices", body, ok)
            assert r.status_code == 201, r.text
            r = await send("POST", "/v1/invoices", body, ok)  # the same request again
            assert r.status_code == 401 and code(r) == "signature_replayed"
            # a query string is signed exactly as sent (the raw form, not decoded)
            target = "/v1/invoices?status=awaiting_payment&limit=5"
            r = await send("GET", target, b"", sign(key, "GET", target, b""))
            assert r.status_code == 200, r.text
            r = await send("GET", "/v1/invoices?limit=5&status=awaiting_payment", b"", sign(key, "GET", target, b""))
            assert code(r) == "signature_invalid"  # another query
            r = await send("GET", "/v1/chains", b"", sign(key, "GET", "/v1/chains", b""))
            assert r.status_code == 200

            now = int(time.time())
            cases = {
                "stale": (sign(key, "POST", "/v1/invoices", body, ts=now - 301), body, "signature_expired"),
                "future": (sign(key, "POST", "/v1/invoices", body, ts=now + 301), body, "signature_expired"),
                "body": (sign(key, "POST", "/v1/invoices", body), body.replace(b'"2"', b'"200"'), "signature_invalid"),
                "path": (sign(key, "POST", "/v1/addresses", body), body, "signature_invalid"),
                "method": (sign(key, "PUT", "/v1/invoices", body), body, "signature_invalid"),
                "secret": (sign(key, "POST", "/v1/invoices", body, secret="wk_" + "x" * 43), body, "signature_invalid"),
                "unknown": ({**sign(key, "POST", "/v1/invoices", body), "x-watcher-key-id": "key_00000000000000ff"},
                            body, "key_unknown"),
                # a latin-1 superscript two: a digit to str.isdigit, not to int() (was a 500)
                "superscript": ({**sign(key, "POST", "/v1/invoices", body), "x-watcher-timestamp": b"\xb2"},
                                body, "signature_invalid"),
            }
            for name, (headers, content, want) in cases.items():
                r = await send("POST", "/v1/invoices", content, headers)
                assert r.status_code == 401 and code(r) == want, (name, r.text)
            # the bearer form of a signed key: the secret must never travel
            r = await http.get("/v1/chains", headers=bearer(key["key"]))
            assert r.status_code == 401 and code(r) == "signature_required"
            # a signed key still needs the scope
            r = await send("POST", "/v1/payouts", b"{}", sign(key, "POST", "/v1/payouts", b"{}"))
            assert r.status_code == 403 and code(r) == "insufficient_scope"
            replay = sign(key, "POST", "/v1/invoices", body, ts=int(time.time()) - 7)  # not the first one's
            assert (await send("POST", "/v1/invoices", body, replay)).status_code == 201
        # a restart does not reopen a used signature
        async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                             trust_env=False, timeout=10) as http:
            r = await http.post("/v1/invoices", content=body, headers=replay)
            assert r.status_code == 401 and r.json()["error"]["code"] == "signature_replayed"
            r = await http.delete(f"/v1/keys/{key['id']}", headers=ADMIN)
            assert r.status_code == 204
            r = await http.post("/v1/invoices", content=body, headers=sign(key, "POST", "/v1/invoices", body))
            assert r.status_code == 401 and r.json()["error"]["code"] == "key_unknown"


# --- rate limits ------------------------------------------------------------------------------


async def test_rate_limits_and_failed_authentication(tmp_path):
    port = free_port()
    cfg = config(tmp_path, port, payout_rate_limit="3/h")
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                   trust_env=False, timeout=10) as http:
            limited = await make_key(http, "limited", ["read"], rate_limit="5/s")
            answers = [await http.get("/v1/chains", headers=bearer(limited["key"])) for _ in range(8)]
            codes = [r.status_code for r in answers]
            assert codes.count(200) >= 5 and 429 in codes, codes
            refused = next(r for r in answers if r.status_code == 429)
            assert refused.json()["error"]["code"] == "rate_limited"
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["ratelimit-limit"] == "5" and refused.headers["ratelimit-remaining"] == "0"
            assert int(refused.headers["ratelimit-reset"]) >= 1
            assert answers[0].headers["ratelimit-limit"] == "5"

            async def works_again() -> bool:
                return (await http.get("/v1/chains", headers=bearer(limited["key"]))).status_code == 200

            deadline = trio.current_time() + 5
            while not await works_again():  # the bucket refills: one request every 0.2 s
                assert trio.current_time() < deadline, "the key never worked again"
                await trio.sleep(0.1)
            # an unlimited key next to it is not slowed
            assert (await http.get("/v1/chains", headers=ADMIN)).status_code == 200

            # payouts: [api] payout_rate_limit = "3/h" for every key without its own
            payer = await make_key(http, "payer", ["payouts"])
            got = [(await http.post("/v1/payouts", json=payout_body(f"p{i}"), headers=bearer(payer["key"])))
                   for i in range(4)]
            assert [r.status_code for r in got] == [202, 202, 202, 429], [r.text for r in got]
            assert got[3].json()["error"]["code"] == "payout_rate_limited"
            assert int(got[3].headers["retry-after"]) > 600  # the next of 3 an hour: ~20 minutes
            assert d.store.db.scalar("SELECT COUNT(*) FROM payouts") == 3

            # 50 bad tokens from one address end in 429; a correct key from it still works
            bad = [await http.get("/v1/chains", headers=bearer(f"wrong-token-{i:04d}")) for i in range(50)]
            statuses = [r.status_code for r in bad]
            assert statuses[0] == 401 and statuses[-1] == 429, statuses
            assert bad[-1].json()["error"]["code"] == "too_many_failures" and "retry-after" in bad[-1].headers
            assert (await http.get("/v1/chains", headers=ADMIN)).status_code == 200
            metrics = (await http.get("/metrics")).text
            assert re.search(r'watcher_api_refusals_total\{key="",reason="too_many_failures"\} [1-9]', metrics)
            refused_line = 'watcher_api_refusals_total{key="' + limited["id"] + '",reason="rate_limited"}'
            assert re.search(re.escape(refused_line) + " [1-9]", metrics)
            assert re.search(r'watcher_api_requests_total\{key="config:admin",result="ok"\} [1-9]', metrics)
            assert limited["key"] not in metrics and ADMIN_TOKEN not in metrics


# --- keys from the CLI while the daemon runs ----------------------------------------------------


def cli(cfg, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watcher", "keys", *args, "-c", str(cfg)], capture_output=True,
                          text=True, timeout=60)


async def test_cli_keys_while_the_daemon_runs(tmp_path):
    port = free_port()
    cfg = config(tmp_path, port)
    with trio.fail_after(90):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                   trust_env=False, timeout=10) as http:
            made = await trio.to_thread.run_sync(lambda: cli(cfg, "create", "--name", "shop", "--scopes",
                                                             "invoices,addresses,read", "--expires", "30"))
            assert made.returncode == 0, made.stderr
            out = json.loads(made.stdout.strip().splitlines()[-1])
            assert set(out) == {"id", "name", "key", "scopes", "signed"}
            assert out["scopes"] == ["read", "addresses", "invoices"] and out["signed"] is False
            r = await http.post("/v1/addresses", json={"chain": "devnet", "label": "u1"}, headers=bearer(out["key"]))
            assert r.status_code == 201  # the running daemon knows the new key at once
            row = d.store.db.one("SELECT * FROM api_keys WHERE id = ?", (out["id"],))
            assert out["key"] not in json.dumps(dict(row)) and row["key_hash"] == hashlib.sha256(
                out["key"].encode()).hexdigest()
            listed = await trio.to_thread.run_sync(lambda: cli(cfg, "list", "--json"))
            shown = json.loads(listed.stdout)
            assert [k["id"] for k in shown] == [out["id"]] and shown[0]["status"] == "active"
            assert shown[0]["last_used_at"] and shown[0]["expires_at"] and out["key"] not in listed.stdout
            revoked = await trio.to_thread.run_sync(lambda: cli(cfg, "revoke", out["id"]))
            assert revoked.returncode == 0, revoked.stderr
            r = await http.get("/v1/chains", headers=bearer(out["key"]))
            assert r.status_code == 401  # refused from the next request
            for bad in (("create", "--name", "x", "--scopes", "read,root"), ("create", "--name", "x", "--scopes", ""),
                        ("create", "--name", "x", "--scopes", "read", "--rate-limit", "fast"),
                        ("revoke", "key_nope")):
                res = await trio.to_thread.run_sync(lambda bad=bad: cli(cfg, *bad))
                assert res.returncode != 0 and "watcher: error:" in res.stderr, (bad, res.stdout, res.stderr)
            assert d.store.db.scalar("SELECT COUNT(*) FROM api_keys") == 1
            audit = [(x.action, x.actor) for x in d.store.audit.entries()]
            assert ("key.create", "cli") in audit and ("key.revoke", "cli") in audit


# --- webhook SSRF ---------------------------------------------------------------------------------


def test_public_addresses_only():
    from ipaddress import ip_address

    from watcher.netguard import is_public, literal_ip

    for spelled in ("127.0.0.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "127.1", "[::1]", "0.0.0.0", "0"):
        ip = literal_ip(spelled)
        assert ip is not None and not is_public(ip), spelled
    for private in ("10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "224.0.0.1",
                    "::ffff:127.0.0.1", "::ffff:10.1.2.3", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "fe80::1",
                    "fd00::1", "::", "255.255.255.255", "192.0.2.1", "fec0::1", "3fff::1", "2001:db8::1",
                    "::ffff:fec0:1"):
        assert not is_public(ip_address(private)), private
    for public in ("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "64:ff9b::808:808"):
        assert is_public(ip_address(public)), public
    assert literal_ip("example.com") is None


def _hosts_file_names() -> list[str]:
    """Names /etc/hosts gives a loopback address (at least localhost)."""
    names = {"localhost"}
    try:
        lines = Path("/etc/hosts").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split("#")[0].split()
        if len(fields) > 1 and (fields[0].startswith("127.") or fields[0] == "::1"):
            names.update(n for n in fields[1:] if "." not in n or n.endswith(".localdomain"))
    return sorted(names)


async def test_webhooks_never_reach_private_addresses(tmp_path):
    """With allowed_hosts empty, every spelling of a private address is refused when the
    endpoint is set, and a delivery to an endpoint whose host is private by the time it is
    sent (a name that resolves elsewhere later) is refused before connecting: the receiver
    gets nothing, the attempt says why, and no answer is shown."""
    from tests.support.receiver import receiving

    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port,
                       extra={"webhooks": {"allowed_hosts": [], "schedule": [0, 0.2]}})
    with trio.fail_after(60):
        async with receiving() as rx, running(cfg, api=True) as d, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10,
                headers={"authorization": f"Bearer {API_TOKEN}"}) as http:
            rport = rx.url.split(":")[2].split("/")[0]
            hosts = ["127.0.0.1", "0.0.0.0", "[::1]", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "127.1",
                     *_hosts_file_names(), "10.0.0.1", "169.254.169.254", "[::ffff:127.0.0.1]", "[fd00::1]"]
            for host in hosts:
                r = await http.post("/v1/webhooks", json={"url": f"http://{host}:{rport}/hook", "events": ["*"]})
                assert r.status_code == 400, (host, r.text)
                assert r.json()["error"]["code"] == "webhook_host_not_allowed", (host, r.text)
            assert d.store.db.scalar("SELECT COUNT(*) FROM webhooks") == 0
            # the name pointed elsewhere when the endpoint was set: the delivery checks again
            row, _ = d.store.webhooks.create(rx.url, ["*"], None)
            r = await http.post(f"/v1/webhooks/{row.id}/test")
            assert r.status_code == 202
            await wait_until(lambda: d.views.deliveries(row.id)[0][0]["attempts"] >= 2, what="two attempts")
            attempt = d.views.deliveries(row.id)[0][0]["attempt_log"][0]
            assert "refused" in attempt["error"] and "non-public" in attempt["error"], attempt
            assert attempt["status_code"] is None and not attempt.get("response")
            assert rx.requests == []


async def test_a_listed_private_host_is_delivered_to_without_showing_its_answer(tmp_path):
    from tests.support.receiver import receiving

    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port,
                       extra={"webhooks": {"allowed_hosts": ["127.0.0.1"]}})
    with trio.fail_after(60):
        async with receiving() as rx, running(cfg, api=True) as d, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10,
                headers={"authorization": f"Bearer {API_TOKEN}"}) as http:
            rport = rx.url.split(":")[2].split("/")[0]
            r = await http.post("/v1/webhooks", json={"url": f"http://localhost:{rport}/hook", "events": ["*"]})
            assert r.json()["error"]["code"] == "webhook_host_not_allowed"  # only the listed spelling
            hook = (await http.post("/v1/webhooks", json={"url": rx.url, "events": ["*"]})).json()
            await http.post(f"/v1/webhooks/{hook['id']}/test")
            await wait_until(lambda: rx.requests, what="delivered")
            await wait_until(lambda: d.views.deliveries(hook["id"])[0][0]["status"] == "delivered")
            attempt = d.views.deliveries(hook["id"])[0][0]["attempt_log"][0]
            assert attempt["status_code"] == 200 and not attempt.get("response")  # "ok" is not shown

            # nor through the error of an answer that is not HTTP (h11 quotes the bytes it refuses)
            async def not_http(stream: trio.SocketStream) -> None:
                with trio.move_on_after(5):
                    await stream.receive_some(65536)
                    await stream.send_all(b"db_password=hunter2\r\n\r\n")
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(functools.partial(trio.serve_tcp, not_http, 0, host="127.0.0.1"))
                leaky = listeners[0].socket.getsockname()[1]
                hook = (await http.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{leaky}/h",
                                                               "events": ["*"]})).json()
                await http.post(f"/v1/webhooks/{hook['id']}/test")
                first = await wait_until(lambda: (d.views.deliveries(hook["id"])[0] or [{}])[0].get("last_error"),
                                         what="the failed attempt")
                nursery.cancel_scope.cancel()
            shown = json.dumps(d.views.deliveries(hook["id"])[0])
            assert "malformed HTTP answer" in first and "hunter2" not in shown, shown


# --- safe money defaults ------------------------------------------------------------------------


async def test_limits_cannot_be_dodged_or_blocked(tmp_path):
    """Leaving the label out does not skip per-label limits (unlabelled payouts share one
    bucket); payouts waiting for approval do not use up the daily limit for everyone else
    (they count once approved, and are checked then); burn addresses are refused."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE, tokens=[("USDT", TOKEN_ADDR, 6)], payouts={
        "approval_above": {"USDT": "30"}, "daily_limit": {"USDT": "100"}, "label_daily_limit": {"USDT": "50"},
        "label_rate": "3/h"})], api_port=port,
        extra={"api": {"admin_token": ADMIN_TOKEN}})
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                   trust_env=False, timeout=10) as http:
            a = await make_key(http, "a", ["payouts", "approve"])
            b = await make_key(http, "b", ["payouts", "approve"])

            async def pay(key, idem, amount, **extra):
                return await http.post("/v1/payouts", json={**payout_body(idem, amount), **extra},
                                       headers=bearer(key["key"]))

            # per-label limits apply to payouts without a label, together
            assert (await pay(a, "u1", "30")).status_code == 202
            r = await pay(b, "u2", "30")
            assert r.status_code == 422 and r.json()["error"]["code"] == "label_daily_limit_exceeded", r.text
            assert "without a label" in r.json()["error"]["message"]
            assert (await pay(b, "l1", "20", label="bob")).status_code == 202  # a label has its own bucket
            # a big payout waiting for approval does not block the others' daily limit
            big = await pay(a, "big", "45", label="carol")
            assert big.status_code == 202 and big.json()["status"] == "awaiting_approval", big.text
            assert (await pay(b, "l2", "25", label="dave")).status_code == 202  # 30+20+25 = 75 committed
            r = await http.post(f"/v1/payouts/{big.json()['id']}/approve", headers=bearer(b["key"]))
            assert r.status_code == 422 and r.json()["error"]["code"] == "daily_limit_exceeded", r.text
            assert d.views.payout(big.json()["id"])["status"] == "awaiting_approval"  # 75 + 45 > 100: not now
            # the label rate (3/h) counts unlabelled payouts together too: u1, r0, r1, then no more
            for i in range(2):
                assert (await pay(a if i else b, f"r{i}", "1")).status_code == 202
            r = await pay(a, "r9", "1")
            assert r.status_code == 422 and r.json()["error"]["code"] == "rate_limited", r.text
            for burn in ("0x0000000000000000000000000000000000000000", "0x000000000000000000000000000000000000dEaD"):
                r = await http.post("/v1/payouts", json={**payout_body("burn" + burn[-4:], "1"), "to": burn,
                                                         "label": "erin"}, headers=bearer(b["key"]))
                assert r.status_code == 422 and r.json()["error"]["code"] == "destination_burn", r.text


async def test_payouts_approved_a_day_after_they_were_asked_for_still_count_against_the_daily_limit(tmp_path):
    """A payout waiting for approval counts from its approval. The daily total was taken by
    creation time, so payouts asked for more than 24 h ago counted for nothing once approved:
    any number of them could be approved one after another, each within the limit alone."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE, tokens=[("USDT", TOKEN_ADDR, 6)], payouts={
        "approval_above": {"USDT": "10"}, "daily_limit": {"USDT": "100"}})], api_port=port,
        extra={"api": {"admin_token": ADMIN_TOKEN}})
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                   trust_env=False, timeout=10) as http:
            a = await make_key(http, "a", ["payouts"])
            b = await make_key(http, "b", ["approve"])
            ids = []
            for i in range(2):
                r = await http.post("/v1/payouts", json=payout_body(f"old{i}", "100"), headers=bearer(a["key"]))
                assert r.status_code == 202 and r.json()["status"] == "awaiting_approval", r.text
                ids.append(r.json()["id"])
            d.store.db.conn.execute("UPDATE payouts SET created_at = created_at - ?", (25 * 3600 * 1000,))
            r = await http.post(f"/v1/payouts/{ids[0]}/approve", headers=bearer(b["key"]))
            assert r.status_code == 200 and r.json()["status"] == "pending", r.text
            r = await http.post(f"/v1/payouts/{ids[1]}/approve", headers=bearer(b["key"]))
            assert r.status_code == 422 and r.json()["error"]["code"] == "daily_limit_exceeded", r.text
            assert d.views.payout(ids[1])["status"] == "awaiting_approval"


async def test_two_payouts_side_by_side_cannot_both_pass_a_limit_with_room_for_one(tmp_path):
    """An operator's check that awaits (a KYC service, here 0.3 s) let two requests pass the
    daily limit side by side before either was written: 60 + 60 against a limit of 100. The
    limits are now asked again in the transaction that writes the payout."""
    from watcher.hookspecs import hookimpl
    from watcher.plugins import make_plugin_manager

    class SlowKyc:
        @hookimpl
        async def watcher_payout_check(self, payout):
            await trio.sleep(0.3)

    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE, tokens=[("USDT", TOKEN_ADDR, 6)], payouts={
        "daily_limit": {"USDT": "100"}})], api_port=port, extra={"api": {"admin_token": ADMIN_TOKEN}})
    with trio.fail_after(60):
        async with running(cfg, api=True, pm=make_plugin_manager(extra=(SlowKyc(),))) as d, httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
            keys = [await make_key(http, name, ["payouts"]) for name in ("a", "b")]
            answers: list[httpx.Response] = []

            async def pay(i: int) -> None:
                answers.append(await http.post("/v1/payouts", json=payout_body(f"side{i}", "60"),
                                               headers=bearer(keys[i]["key"])))

            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(pay, i)
            assert sorted(r.status_code for r in answers) == [202, 422], [r.text for r in answers]
            refused = next(r for r in answers if r.status_code == 422)
            assert refused.json()["error"]["code"] == "daily_limit_exceeded"
            assert d.store.db.scalar("SELECT COUNT(*) FROM payouts") == 1


def test_burn_addresses_per_family():
    from watcher.config import ConfigTable
    from watcher_bitcoin.family import BitcoinFamily
    from watcher_evm.family import EvmFamily

    btc = BitcoinFamily().configure(ConfigTable({"network": "btc"}, "b"))
    for burn in ("1111111111111111111114oLvT2", "bc1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq9e75rs",
                 "31h1vYVSYuKP6AhS86fbRdMw9XHieotbST"):
        assert btc.is_burn_address(btc.validate_address(burn)), burn
    for real in ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy"):
        assert not btc.is_burn_address(btc.validate_address(real)), real
    evm = EvmFamily().configure(ConfigTable({}, "e"))
    assert evm.is_burn_address(evm.validate_address("0x" + "0" * 40))
    assert not evm.is_burn_address(evm.validate_address(PAYOUT_TO))


# --- the documented clients work, and keys expire ----------------------------------------------


def _doc_block(marker: str, lang: str) -> str:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    after = docs[docs.index(marker):]
    start = after.index(f"```{lang}\n") + len(lang) + 4
    return after[start:after.index("```", start)]


async def test_the_documented_signing_clients_work_and_keys_expire(tmp_path):
    port = free_port()
    cfg = config(tmp_path, port)
    body = '{"chain":"devnet","asset":"USDT","amount":"0.5"}'
    with trio.fail_after(60):
        async with running(cfg, api=True) as d, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                                   trust_env=False, timeout=10) as http:
            key = await make_key(http, "docs", ["invoices"], signed=True)
            shell = _doc_block("And in shell", "sh")
            shell = shell.replace("KEY_ID=key_0123456789abcdef KEY=wk_...", f"KEY_ID={key['id']} KEY={key['key']}")
            shell = shell.replace("""BODY='{"chain":"ltc","asset":"LTC","amount":"0.5"}'""", f"BODY='{body}'")
            shell = shell.replace("127.0.0.1:8420", f"127.0.0.1:{port}")
            done = await trio.run_process(["bash", "-c", shell], capture_stdout=True, capture_stderr=True, check=False)
            answer = json.loads(done.stdout)
            assert answer.get("status") == "awaiting_payment", (done.stdout, done.stderr)

            python = _doc_block("A client in Python", "python")
            namespace: dict[str, Any] = {}
            exec(python.split("\nsigned(")[0], namespace)  # the function, not the example call
            r = await trio.to_thread.run_sync(lambda: namespace["signed"](
                "POST", f"http://127.0.0.1:{port}/v1/invoices", key["id"], key["key"],
                body.replace("0.5", "0.6").encode()))  # the same request in the same second would be a replay
            assert r.status_code == 201, r.text

            # expiry: the key stops working once its expires_at has passed (no restart)
            short = await make_key(http, "short", ["read"], expires_in_days=1)
            assert (await http.get("/v1/chains", headers=bearer(short["key"]))).status_code == 200
            d.store.db.conn.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?",
                                    (d.store.clock.now_ms() - 1, short["id"]))
            r = await http.get("/v1/chains", headers=bearer(short["key"]))
            assert r.status_code == 401
            listed = {k["id"]: k for k in (await http.get("/v1/keys", headers=ADMIN)).json()["items"]}
            assert listed[short["id"]]["status"] == "expired" and listed[key["id"]]["status"] == "active"
            assert all("key" not in k for k in listed.values())
