# ruff: noqa: RUF001 - the look-alike characters are the point
"""Hostile input against a running daemon: oversized and lying bodies, deep nesting, exotic
numbers, broken and unusual Unicode, SQL-looking strings, duplicate keys, wrong content
types, unknown query parameters, traversal-looking ids; and a database that cannot be
written (disk full, locked by another process). Every bad input gets a 4xx with the error
shape and changes nothing; valid Unicode round-trips byte-exact; nothing is ever a 5xx or a
traceback in the log; a storage fault is a 503 that writes nothing, and the same request
succeeds once the fault is gone."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import httpx
import pytest
import trio

from tests.support.daemon import API_TOKEN, chain_entry, free_port, running, write_config
from tests.test_api import AUTH, DEAD_NODE, TOKEN_ADDR, dump

MAX_BODY = 1024 * 1024  # large enough that 100k levels of nesting reach the JSON parser
INVOICE = {"chain": "devnet", "asset": "USDT", "amount": "12.5"}
PAYOUT_TO = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


@pytest.fixture
def cfg(tmp_path):
    port = free_port()
    path = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE, tokens=[("USDT", TOKEN_ADDR, 6)])],
                        api_port=port, extra={"api": {"max_body_bytes": MAX_BODY},
                                              "webhooks": {"allowed_hosts": ["127.0.0.1", "localhost"]}})
    return path, port


@pytest.fixture
def no_tracebacks(caplog):
    """Fails the test if anything logged an error or a traceback (the API, hypercorn, any task)."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="watcher")
    yield caplog
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR or "Traceback" in r.getMessage()]
    assert not bad, [f"{r.name}: {r.getMessage()[:300]}" for r in bad]


def nested(n: int, leaf: str = "1") -> str:
    return '{"a":' * n + leaf + "}" * n


def invoice_with(**fields) -> bytes:
    return json.dumps({**INVOICE, **fields}).encode()


def raw_invoice(field: str, raw_value: str) -> bytes:
    """An invoice body with one field's JSON text given literally (NaN, 1e400, ...)."""
    rest = json.dumps({k: v for k, v in INVOICE.items() if k != field})
    return (rest[:-1] + ', "' + field + '": ' + raw_value + "}").encode()


# (method, url, body: bytes | dict | None, extra headers, status, code)
BAD_REQUESTS: list[tuple[str, str, object, dict, int, str]] = [
    # --- deep nesting: a clean 400, never a RecursionError or a hang -----------------------
    ("POST", "/v1/invoices", ('{"chain":"devnet","asset":"USDT","amount":"1","metadata":' + nested(100_000) + "}")
     .encode(), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", b"[" * 100_000 + b"]" * 100_000, {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", b"{" * 100_000, {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", nested(900)), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", nested(40)), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", nested(9)), {}, 400, "invalid_metadata"),
    # asset was put through str() for the message: 900 levels were a RecursionError (500)
    ("POST", "/v1/invoices", ('{"chain":"devnet","amount":"1","asset":' + "[" * 900 + "]" * 900 + "}").encode(), {},
     400, "malformed_json"),
    ("POST", "/v1/invoices", {**INVOICE, "asset": [[["USDT"]]]}, {}, 400, "unknown_asset"),
    ("POST", "/v1/payouts", {"chain": "devnet", "asset": {"x": [1]}, "amount": "1", "to": PAYOUT_TO,
                             "idempotency_key": "k1"}, {}, 400, "unknown_asset"),
    ("POST", "/v1/addresses", ('{"chain":"devnet","label":' + "[" * 5000 + "]" * 5000 + "}").encode(), {}, 400,
     "malformed_json"),
    # --- numbers: amounts are plain ASCII decimal strings, nothing else ---------------------
    *[("POST", "/v1/invoices", {**INVOICE, "amount": a}, {}, 400, "invalid_amount") for a in [
        "1e400", "NaN", "nan", "Infinity", "-Infinity", "-0", "-1", "+1", "0x10", "0b1", " 1", "1 ", "1\n", "\t1",
        "１", "١", "1e-30", "1E3", "0.000000000000000000000000000001", ".5", "5.", "1,5", "1_000", "", "0",
        "0.0", "00", "1" * 101, "9" * 90, "1.2.3", "1/2", "½",
    ]],
    *[("POST", "/v1/invoices", raw_invoice("amount", v), {}, 400, "malformed_json") for v in [
        "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 5000, "0x10", "+1", ".5", "01",
    ]],
    *[("POST", "/v1/invoices", raw_invoice("amount", v), {}, 400, "invalid_amount") for v in [
        "12.5", "1e-30", "-0", "10" + "0" * 100, "true", "null", "[]", "{}",
    ]],
    ("POST", "/v1/invoices", raw_invoice("expires_in", "1e400"), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("expires_in", "9" * 4000), {}, 400, "invalid_expires_in"),
    ("POST", "/v1/invoices", raw_invoice("expires_in", "3600.0"), {}, 400, "invalid_expires_in"),
    ("POST", "/v1/invoices", raw_invoice("expires_in", "true"), {}, 400, "invalid_expires_in"),
    ("POST", "/v1/invoices", raw_invoice("expires_in", "-0"), {}, 400, "invalid_expires_in"),
    ("POST", "/v1/invoices", raw_invoice("metadata", '{"x": NaN}'), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", '{"x": 1e400}'), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", '{"x": -Infinity}'), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", '{"x": %s}' % ("7" * 4301)), {}, 400, "malformed_json"),
    *[("POST", "/v1/invoices", {**INVOICE, "tolerance": t}, {}, 400, "invalid_tolerance") for t in
      ["0.1 ", "１", "-0", "1e-2", "NaN", "0.5000001", 0.1]],
    *[("POST", "/v1/payouts", {"chain": "devnet", "asset": "USDT", "amount": a, "to": PAYOUT_TO,
                               "idempotency_key": "k1"}, {}, 400, "invalid_amount") for a in ["１", " 1", "1e3"]],
    *[("GET", f"/v1/invoices?limit={quote(v)}", None, {}, 400, "invalid_parameter") for v in
      ["１", " 1", "1 ", "1_0", "1e2", "+1", "0x10", "9" * 30, "", "-1", "1.0"]],
    ("GET", "/v1/events?after=" + quote("１"), None, {}, 400, "invalid_parameter"),
    ("GET", "/v1/transfers?since=1e3", None, {}, 400, "invalid_parameter"),
    # --- invalid UTF-8 and broken Unicode ---------------------------------------------------
    ("POST", "/v1/addresses", b"\xff\xfe", {}, 400, "malformed_json"),
    ("POST", "/v1/addresses", b'{"chain": "devnet", "label": "\xc3\x28"}', {}, 400, "malformed_json"),
    ("POST", "/v1/addresses", b'{"chain": "devnet", "label": "\xc0\xaf"}', {}, 400, "malformed_json"),  # overlong
    ("POST", "/v1/addresses", b'{"chain": "devnet", "label": "\xed\xa0\x80"}', {}, 400, "malformed_json"),  # CESU
    ("POST", "/v1/addresses", b'{"chain": "devnet", "label": "\xf4\x90\x80\x80"}', {}, 400, "malformed_json"),
    ("POST", "/v1/addresses", '{"chain": "devnet", "label": "utf16"}'.encode("utf-16"), {}, 400, "malformed_json"),
    ("POST", "/v1/addresses", '{"chain": "devnet", "label": "utf32"}'.encode("utf-32-le"), {}, 400,
     "malformed_json"),
    ("POST", "/v1/addresses", b'\xef\xbb\xbf{"chain": "devnet", "label": "bom"}', {}, 400, "malformed_json"),
    *[("POST", "/v1/addresses", ('{"chain": "devnet", "label": "' + s + '"}').encode(), {}, 400, "malformed_json")
      for s in ["\\ud800", "a\\udfffb", "\\udc00\\ud800", "\\ud83d", "x\\ude00"]],
    ("POST", "/v1/invoices", raw_invoice("metadata", '{"k": "\\ud800"}'), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", '{"\\udfff": 1}'), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", '{"k": [[["\\ud800"]]]}'), {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("order_id", '"\\udbff"'), {}, 400, "malformed_json"),
    ("POST", "/v1/webhooks", b'{"url": "http://127.0.0.1:1/h", "events": ["*"], "description": "\\ud800"}', {},
     400, "malformed_json"),
    ("POST", "/v1/payouts", ('{"chain": "devnet", "asset": "USDT", "amount": "1", "to": "' + PAYOUT_TO + '", '
                             '"idempotency_key": "k1", "metadata": {"x": "\\udc80"}}').encode(), {},
     400, "malformed_json"),
    # control characters where printable text is required; "$" used to match before a final "\n"
    *[("POST", "/v1/addresses", {"chain": "devnet", "label": s}, {}, 400, "invalid_label") for s in
      ["\x00", "a\x00b", "alice\n", "\nalice", "a\rb", "tab\t", "del\x7f", "x" * 129, "🦊" * 129, ""]],
    *[("POST", "/v1/invoices", {**INVOICE, "order_id": s}, {}, 400, "invalid_order_id") for s in
      ["o\x00", "order-42\n", "x" * 129, "", 42]],
    *[("POST", "/v1/payouts", {"chain": "devnet", "asset": "USDT", "amount": "1", "to": PAYOUT_TO,
                               "idempotency_key": k}, {}, 400, "invalid_idempotency_key") for k in
      ["key\n", "key one", "ключ", "k" * 129, ""]],
    ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:1/h", "events": ["*"], "description": "x" * 501}, {}, 400,
     "invalid_description"),
    ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:1/\u202eh", "events": ["*"]}, {}, 400, "invalid_url"),
    ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:1/h\x00", "events": ["*"]}, {}, 400, "invalid_url"),
    # --- duplicate keys: which one would count? -----------------------------------------------
    ("POST", "/v1/addresses", b'{"chain": "devnet", "label": "a", "label": "b"}', {}, 400, "malformed_json"),
    ("POST", "/v1/invoices", b'{"chain": "devnet", "asset": "USDT", "amount": "1", "amount": "1000"}', {}, 400,
     "malformed_json"),
    ("POST", "/v1/invoices", raw_invoice("metadata", '{"x": {"y": 1, "y": 2}}'), {}, 400, "malformed_json"),
    # --- not a JSON object, or not JSON at all --------------------------------------------------
    *[("POST", "/v1/addresses", body, {}, 400, "malformed_json") for body in
      [b"", b"   ", b"null", b"[]", b'"x"', b"42", b"true", b'{"chain": "devnet",}', b"{'chain': 'devnet'}",
       b'{"chain": "devnet"} {"chain": "devnet"}', b'{"chain": "devnet"', b"\x00", b'{"a":1}\x00']],
    ("POST", "/v1/addresses", b"chain=devnet&label=alice", {"content-type": "application/x-www-form-urlencoded"},
     400, "malformed_json"),
    ("POST", "/v1/addresses", b'--b\r\nContent-Disposition: form-data; name="chain"\r\n\r\ndevnet\r\n--b--\r\n',
     {"content-type": "multipart/form-data; boundary=b"}, 400, "malformed_json"),
    ("POST", "/v1/addresses", b"<chain>devnet</chain>", {"content-type": "application/xml"}, 400, "malformed_json"),
    ("POST", "/v1/addresses", '{"chain": "devnet", "label": "l"}'.encode("utf-16"),
     {"content-type": "application/json; charset=utf-16"}, 415, "unsupported_media_type"),
    ("POST", "/v1/addresses", b'{"chain": "devnet", "label": "l"}',
     {"content-type": "application/json; charset=latin-1"}, 415, "unsupported_media_type"),
    ("POST", "/v1/payouts/po_nothing/cancel", b"[", {}, 404, "unknown_payout"),  # a body it does not read
    ("POST", "/v1/admin/pause", {"scope": "all"}, {}, 403, "insufficient_scope"),
    # --- unknown and repeated query parameters ------------------------------------------------
    ("GET", "/v1/invoices?stauts=paid", None, {}, 400, "unknown_parameter"),
    ("GET", "/v1/invoices?status=expired&status=completed", None, {}, 400, "invalid_parameter"),
    ("GET", "/v1/chains?verbose=1", None, {}, 400, "unknown_parameter"),
    ("GET", "/v1/transfers?chain=devnet&chain=moon", None, {}, 400, "invalid_parameter"),
    ("POST", "/v1/invoices?amount=1000", INVOICE, {}, 400, "unknown_parameter"),  # nothing written
    ("POST", "/v1/addresses?" + "x=1&" * 500, {"chain": "devnet", "label": "q"}, {}, 400, "unknown_parameter"),
    # --- SQL-looking and wildcard filters are literal values ----------------------------------
    *[("GET", f"/v1/invoices?status={quote(s)}", None, {}, 400, "invalid_status") for s in
      ["%", "_", "' OR '1'='1", "expired' --", "expired%"]],
    ("GET", "/v1/transfers?status=%25", None, {}, 400, "invalid_status"),
    ("GET", "/v1/payouts?status=_", None, {}, 400, "invalid_status"),
    ("GET", "/v1/invoices?chain=" + quote("devnet' OR 1=1 --"), None, {}, 400, "unknown_chain"),
    # --- traversal-looking and very long ids ----------------------------------------------------
    ("GET", "/v1/invoices/%2e%2e", None, {}, 404, "unknown_invoice"),
    ("GET", "/v1/invoices/..%2F..%2Fetc%2Fpasswd", None, {}, 404, "not_found"),
    ("GET", "/v1/invoices/%2e%2e%2f%2e%2e%2fetc%2fpasswd", None, {}, 404, "not_found"),
    ("GET", "/v1/invoices/..%5C..%5Cwindows", None, {}, 404, "unknown_invoice"),
    ("GET", "/v1/invoices/%00", None, {}, 404, "unknown_invoice"),
    ("GET", "/v1/invoices/" + quote("'; DROP TABLE invoices; --"), None, {}, 404, "unknown_invoice"),
    ("GET", "/v1/invoices/" + "a" * 8000, None, {}, 404, "unknown_invoice"),
    ("GET", "/v1/invoices/%ff%fe", None, {}, 404, "unknown_invoice"),
    ("GET", "/v1/addresses/devnet/..%2F..", None, {}, 404, "not_found"),
    ("GET", "/v1/addresses/%2e%2e/" + PAYOUT_TO, None, {}, 404, "unknown_chain"),
    ("GET", "/v1/addresses/devnet/" + "0" * 5000, None, {}, 400, "invalid_address"),
    ("DELETE", "/v1/webhooks/%2e%2e", None, {}, 404, "unknown_webhook"),
    ("PATCH", "/v1/webhooks/" + "w" * 8000, {"enabled": False}, {}, 404, "unknown_webhook"),
    ("POST", "/v1/deliveries/%2e%2e%2f/redeliver", None, {}, 404, "not_found"),
    ("POST", "/v1/invoices/%2e%2e/submit-tx", {"txid": "0x" + "a" * 64}, {}, 404, "unknown_invoice"),
    ("GET", "/v1/payouts/" + quote("../../../../etc/passwd", safe=""), None, {}, 404, "not_found"),
    ("GET", "/v1/webhooks/%2e%2e/deliveries", None, {}, 404, "unknown_webhook"),
]


def request_kwargs(body: object, headers: dict) -> dict:
    kw: dict = {"headers": headers}
    if isinstance(body, bytes):
        kw["content"] = body
    elif body is not None:
        kw["json"] = body
    return kw


def assert_error(r: httpx.Response, status: int, code: str, what: object) -> None:
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, (what, body)
    assert body["error"]["code"] == code and body["error"]["message"], (what, body)
    assert r.headers["content-type"].startswith("application/json")


@pytest.fixture
def deep_recursion() -> Iterator[None]:
    """The interpreter as it is in a daemon that has signed a transaction: eth-account's
    py_ecc raised the recursion limit to 100,000, so a parser that recursed once per level of
    a 100k-deep body would overflow the C stack (the process dies) before RecursionError."""
    import eth_account  # noqa: F401 - imported for its side effect, as the EVM wallet does

    assert sys.getrecursionlimit() >= 100_000
    yield


@pytest.fixture
async def api(cfg) -> AsyncIterator[tuple]:
    path, port = cfg
    async with running(path, api=True) as d, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=AUTH, trust_env=False, timeout=30) as http:
        yield d, http, port


async def test_hostile_requests_get_a_clean_4xx_and_change_nothing(no_tracebacks, api, deep_recursion):
    d, http, _ = api
    before = dump(d)
    with trio.fail_after(120):  # nothing hangs: 100k levels of nesting are refused at once
        for method, url, body, headers, status, code in BAD_REQUESTS:
            r = await http.request(method, url, **request_kwargs(body, headers))
            assert_error(r, status, code, (method, url[:80], str(body)[:80]))
    assert dump(d) == before  # nothing was written, not even an audit entry
    assert (await http.get("/healthz")).status_code == 200


async def test_amounts_at_the_edges_that_are_valid(no_tracebacks, api):
    _, http, _ = api
    for amount, base_units in [("0.000001", "1"), ("000012.500000", "12500000"), ("1" * 60, "1" * 60 + "000000")]:
        r = await http.post("/v1/invoices", json={**INVOICE, "amount": amount})
        assert r.status_code == 201, r.text
        assert r.json()["base_units"] == base_units
    r = await http.post("/v1/invoices", json={**INVOICE, "amount": "9" * 80})
    assert_error(r, 400, "invalid_amount", "above uint256")
    # a charset-less text/plain body (what curl -d sends is form-encoded) is still JSON to us
    r = await http.post("/v1/invoices", content=json.dumps(INVOICE), headers={"content-type": "text/plain"})
    assert r.status_code == 201
    r = await http.post("/v1/invoices", content=json.dumps(INVOICE),
                        headers={"content-type": "application/json; charset=UTF-8"})
    assert r.status_code == 201
    r = await http.post("/v1/invoices", content=json.dumps(INVOICE), headers={"content-type": ""})
    assert r.status_code == 201
    # big integers and tiny floats inside metadata are data, kept as given
    meta = {"big": 2**200, "neg": -(2**70), "tiny": 1e-30, "zero": -0.0, "deep": json.loads(nested(7))}
    r = await http.post("/v1/invoices", json={**INVOICE, "metadata": meta})
    assert r.status_code == 201, r.text
    got = (await http.get(f"/v1/invoices/{r.json()['id']}")).json()["metadata"]
    assert got == meta and got["big"] == 2**200


UNICODE_LABELS = [
    "🦊",
    "שלום",
    "é",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # astral plane
    "日本語ラベル",
    "'; DROP TABLE transfers; --",
    "%",
    "_",
    "a%b_c\\d",
    "non\u00a0breaking",  # a no-break space inside is a visible gap
    "🦊" * 128,  # 128 characters (512 bytes) is the limit
    "x" * 128,
]
# what a person cannot see or would read differently: refused (they used to be stored as sent)
INVISIBLE_LABELS = [
    "\u200fשלום\u200e",  # RTL and LTR marks
    "\u202eevil\u202c",  # a right-to-left override: "live" on screen
    "👩\u200d👩\u200d👧",  # zero-width joiners
    "a\u200bb",  # a zero-width space: looks like "ab"
    "a\ufeffb",  # a BOM inside
    "line\u2028sep",
    "\u00a0nbsp\u00a0",  # spaces at the ends: looks like "nbsp"
    " alice",
    "alice ",
    "\ue000private",  # private use
    "\U000e0041tag",  # a tag character
]


async def test_unicode_and_sql_looking_labels_round_trip_byte_exact(no_tracebacks, api):
    d, http, _ = api
    addresses = {}
    for label in UNICODE_LABELS:
        r = await http.post("/v1/addresses", json={"chain": "devnet", "label": label})
        assert r.status_code == 201, (label, r.text)
        assert r.json()["label"] == label
        addresses[label] = r.json()["address"]
        # sent as raw UTF-8 (not \\u escapes): the same label again is the same address
        r = await http.post("/v1/addresses", content=json.dumps({"chain": "devnet", "label": label},
                                                                 ensure_ascii=False).encode())
        assert r.status_code == 200 and r.json()["address"] == addresses[label], label
    assert len(set(addresses.values())) == len(UNICODE_LABELS)
    for label, address in addresses.items():
        r = await http.get(f"/v1/addresses/devnet/{address}")
        assert r.json()["label"] == label
        assert json.dumps(label, ensure_ascii=False).encode() in r.content  # the bytes, not just the value
    assert d.store.db.scalar("SELECT count(*) FROM sqlite_master WHERE name = 'transfers'") == 1
    # one name is one label: "e" + a combining acute is stored as "é" (NFC), the same address
    r = await http.post("/v1/addresses", json={"chain": "devnet", "label": "e\u0301"})
    assert r.status_code == 200 and r.json()["label"] == "é" and r.json()["address"] == addresses["é"]
    before = d.store.db.scalar("SELECT count(*) FROM addresses")
    for label in INVISIBLE_LABELS:
        r = await http.post("/v1/addresses", json={"chain": "devnet", "label": label})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_label", (label, r.text)
        r = await http.post("/v1/payouts", json={"chain": "devnet", "asset": "USDT", "amount": "1",
                                                 "to": PAYOUT_TO, "idempotency_key": "lbl", "label": label})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_label", (label, r.text)
    assert d.store.db.scalar("SELECT count(*) FROM addresses") == before


async def test_metadata_order_ids_and_descriptions_round_trip_byte_exact(no_tracebacks, api):
    d, http, _ = api
    metadata = {
        "emoji": "🦊💸", "rtl": "\u200fמספר הזמנה\u200e", "nul": "a\u0000b", "controls": "\t\n\r\x01\x1f\x7f",
        "combining": "Z\u0351\u0352\u0353", "zwj": "👩\u200d💻", "quote": "\"'\\", "sql": "'; DROP TABLE invoices; --",
        "long": "ü" * 3000, "keys": {"🦊": 1, "": 2, "\u0000": 3, "a\u202eb": 4}, "astral": "\U0001F600\U00010348",
        "noncharacter": "\ufffe\uffff", "replacement": "\ufffd",
    }
    order_ids = ["'; DROP TABLE transfers; --", "%", "_", "%%", "a_b", "🦊-42", "\u200f42", "x" * 128]
    ids = {}
    for order_id in order_ids:
        r = await http.post("/v1/invoices", json={**INVOICE, "order_id": order_id, "metadata": metadata})
        assert r.status_code == 201, (order_id, r.text)
        ids[order_id] = r.json()["id"]
    # a surrogate pair written as two escapes is one valid character, not a lone surrogate
    r = await http.post("/v1/invoices", content=b'{"chain": "devnet", "asset": "USDT", "amount": "1", '
                                                b'"order_id": "\\ud83e\\udd8a"}')
    assert r.status_code == 201 and r.json()["order_id"] == "🦊"
    ids["🦊"] = r.json()["id"]
    for order_id in order_ids:
        r = await http.get(f"/v1/invoices/{ids[order_id]}")
        got = r.json()
        assert got["order_id"] == order_id and got["metadata"] == metadata
        assert json.dumps(order_id, ensure_ascii=False).encode() in r.content
        assert json.dumps(metadata["long"], ensure_ascii=False).encode() in r.content
        # filters are exact: "%" and "_" are not wildcards, the SQL-looking one is just a string
        r = await http.get("/v1/invoices", params={"order_id": order_id})
        assert [i["id"] for i in r.json()["items"]] == [ids[order_id]], order_id
    r = await http.get("/v1/invoices", params={"order_id": "' OR '1'='1"})
    assert r.status_code == 200 and r.json()["items"] == []
    r = await http.get("/v1/invoices", params={"cursor": "' OR 1=1 --", "limit": 1})
    assert r.status_code == 200  # a cursor is compared, never spliced into SQL
    r = await http.get("/v1/audit", params={"object_id": "'; DROP TABLE audit_log; --"})
    assert r.status_code == 200 and r.json()["items"] == []
    r = await http.get("/v1/events", params={"type": "%,_,invoice.%"})
    assert r.status_code == 200 and r.json()["items"] == []
    r = await http.get("/v1/payouts", params={"label": "%"})
    assert r.status_code == 200 and r.json()["items"] == []
    # webhook descriptions (free text) keep NUL, controls and RTL marks exactly
    description = "shop \u200fחנות\u200e \u0000 🦊 \t end"
    r = await http.post("/v1/webhooks", json={"url": "http://127.0.0.1:1/h", "events": ["invoice.*"],
                                              "description": description})
    assert r.status_code == 201, r.text
    hook = r.json()["id"]
    assert (await http.get(f"/v1/webhooks/{hook}")).json()["description"] == description
    r = await http.patch(f"/v1/webhooks/{hook}", json={"description": "🦊" * 500})
    assert r.status_code == 200 and (await http.get(f"/v1/webhooks/{hook}")).json()["description"] == "🦊" * 500
    for table in ("transfers", "invoices", "audit_log", "events"):
        assert d.store.db.scalar("SELECT count(*) FROM sqlite_master WHERE name = ?", (table,)) == 1


# --- bodies on the wire: sizes and lengths that lie ------------------------------------------


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Send bytes as they are; return everything the server answers until it closes the
    connection (or the timeout passes)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = bytearray()
    async with stream:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server answered and closed before taking everything
        with trio.move_on_after(read_timeout):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not chunk:
                    break
                out += chunk
    return bytes(out)


def responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """The HTTP/1.1 responses in a byte stream (content-length framed)."""
    out = []
    while raw.startswith(b"HTTP/1.1 "):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        n = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:n]))
        raw = rest[n:]
    return out


def head(method: str, target: str, headers: dict[str, str]) -> bytes:
    headers = {"Connection": "close", **headers}
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {API_TOKEN}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def first_error(raw: bytes) -> tuple[int, str]:
    got = responses(raw)
    assert got, raw[:300]
    status, hdrs, body = got[0]
    if hdrs.get("content-type", "").startswith("application/json"):
        return status, json.loads(body)["error"]["code"]
    return status, ""


async def test_oversized_and_lying_bodies(no_tracebacks, api):
    d, http, port = api
    before = dump(d)
    big = b'{"chain": "devnet", "asset": "USDT", "amount": "1", "metadata": {"x": "' + b"a" * MAX_BODY + b'"}}'
    with trio.fail_after(120):
        # an honest Content-Length over the limit: refused before the body is read
        r = await http.post("/v1/invoices", content=big)
        assert_error(r, 413, "payload_too_large", "content-length")
        raw = await raw_exchange(port, head("POST", "/v1/invoices", {"Content-Length": str(10**15)}) + b"{}")
        assert first_error(raw) == (413, "payload_too_large"), raw[:300]
        raw = await raw_exchange(port, head("POST", "/v1/invoices", {"Content-Length": str(10**30)}) + b"{}")
        assert first_error(raw)[0] == 400, raw[:300]  # more digits than the HTTP layer (h11) reads

        # chunked, no Content-Length: counted while it streams
        async def chunks():
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]
        r = await http.post("/v1/invoices", content=chunks())
        assert_error(r, 413, "payload_too_large", "chunked")
        raw = await raw_exchange(port, head("POST", "/v1/invoices", {"Transfer-Encoding": "chunked"}) +
                                 b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [big[i:i + 500_000]
                                                                              for i in range(0, len(big), 500_000)])
                                 + b"0\r\n\r\n")
        assert first_error(raw) == (413, "payload_too_large")
        # a Content-Length just at the limit is read and judged as JSON
        exact = b" " * (MAX_BODY - 2) + b"{}"
        r = await http.post("/v1/addresses", content=exact)
        assert_error(r, 400, "invalid_chain", "exactly the limit")

        # Content-Length smaller than the body: the rest is not a request (the server says so)
        body = json.dumps(INVOICE).encode()
        raw = await raw_exchange(port, head("POST", "/v1/invoices", {"Content-Length": "10",
                                                                     "Connection": "keep-alive"})
                                 + body + b"\r\n\r\n")
        got = responses(raw)
        assert got and got[0][0] == 400 and json.loads(got[0][2])["error"]["code"] == "malformed_json", raw[:400]
        assert all(400 <= s < 500 for s, _, _ in got), raw[:400]
        # Content-Length larger than the body, then the client gives up: nothing is written
        raw = await raw_exchange(port, head("POST", "/v1/invoices", {"Content-Length": "5000"}) + body,
                                 read_timeout=0.5)
        assert raw == b"" or all(400 <= s < 500 for s, _, _ in responses(raw)), raw[:400]
        # neither Content-Length nor chunked: there is no body
        raw = await raw_exchange(port, head("POST", "/v1/invoices", {"Connection": "close"}))
        assert first_error(raw) == (400, "malformed_json")
        # both (a smuggling classic): refused by the HTTP layer or read as chunked, never both
        raw = await raw_exchange(port, head("POST", "/v1/invoices", {"Content-Length": "4",
                                                                     "Transfer-Encoding": "chunked"})
                                 + b"5\r\nhello\r\n0\r\n\r\n")
        assert 400 <= first_error(raw)[0] < 500, raw[:300]
        # malformed lengths and headers are the HTTP layer's 400
        for bad in ({"Content-Length": "-1"}, {"Content-Length": "abc"}, {"Content-Length": "1, 2"}):
            raw = await raw_exchange(port, head("POST", "/v1/invoices", bad) + b"{}")
            assert raw == b"" or 400 <= first_error(raw)[0] < 500, (bad, raw[:300])
        # a transfer coding it does not implement: 501, as RFC 9112 6.1 asks (h11 answers it)
        raw = await raw_exchange(port, head("POST", "/v1/invoices", {"Transfer-Encoding": "gzip"}) + b"{}")
        assert first_error(raw)[0] == 501, raw[:300]
        # a request line or header block over the HTTP layer's limit
        raw = await raw_exchange(port, head("GET", "/v1/invoices/" + "a" * 70_000, {}))
        assert raw == b"" or 400 <= first_error(raw)[0] < 500, raw[:300]
        raw = await raw_exchange(port, head("GET", "/v1/chains", {"X-Big": "b" * 70_000}))
        assert raw == b"" or 400 <= first_error(raw)[0] < 500, raw[:300]
        # raw non-ASCII bytes and traversal in the request target
        for target in (b"/v1/invoices/\xff\xfe", b"/v1/invoices/../../etc/passwd", b"/v1/../v1/chains",
                       b"/v1/invoices/%zz", b"//v1/chains", b"/v1/chains/."):
            raw = await raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                     + f"Authorization: Bearer {API_TOKEN}\r\n\r\n".encode())
            status = first_error(raw)[0] if raw else 400
            assert 400 <= status < 500 or (status == 200 and target == b"/v1/../v1/chains"), (target, raw[:300])
    assert dump(d) == before
    assert (await http.get("/healthz")).status_code == 200
    r = await http.post("/v1/invoices", json=INVOICE)  # and it still works
    assert r.status_code == 201


# --- the database cannot be written ---------------------------------------------------------


def assert_storage_unavailable(r: httpx.Response) -> None:
    assert_error(r, 503, "storage_unavailable", "storage")
    assert int(r.headers["retry-after"]) > 0


def counts(d) -> tuple[int, ...]:
    return tuple(d.store.db.scalar(f"SELECT count(*) FROM {t}")
                 for t in ("invoices", "addresses", "events", "audit_log", "webhooks", "deliveries"))


async def test_disk_full_is_503_and_writes_nothing(caplog, api):
    caplog.set_level(logging.INFO)
    d, http, _ = api
    conn = d.store.db.conn
    hook = (await http.post("/v1/webhooks", json={"url": "http://127.0.0.1:1/h", "events": ["invoice.*"]})).json()
    # disabled: its deliveries are still written with each event, but no attempt is recorded
    # meanwhile (the dispatcher's own write would race with the comparisons below)
    assert (await http.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": False})).status_code == 200
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    secret_order = "order-secret-0xdeadbeef"
    request = {**INVOICE, "order_id": secret_order, "metadata": {"blob": "m" * 7000}}  # needs new pages
    created = 0
    with trio.fail_after(60):
        for _ in range(100):  # free space inside the last pages may take a few invoices first
            before, before_counts = dump(d), counts(d)
            r = await http.post("/v1/invoices", json=request)
            if r.status_code == 503:
                break
            assert r.status_code == 201, r.text
            created += 1
        else:
            raise AssertionError("the database never filled up")
    assert_storage_unavailable(r)
    assert "full" in r.json()["error"]["message"]
    storage = (await http.get("/readyz")).json()["storage"]
    assert storage["ready"] is False and storage["problem"].startswith("full"), storage
    assert dump(d) == before and counts(d) == before_counts  # no invoice without its event or audit entry
    for method, url, body in [("POST", "/v1/invoices", request),
                              ("POST", "/v1/addresses", {"chain": "devnet", "label": "x" * 128}),
                              ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:1/h" + "x" * 1900,
                                                        "events": ["*"], "description": "d" * 500}),
                              ("POST", f"/v1/webhooks/{hook['id']}/test", None)]:
        r = await http.request(method, url, json=body)
        if r.status_code != 503:  # small rows may still fit into a page; they are whole, then
            assert r.status_code < 300, (url, r.text)
            before = dump(d)
            continue
        assert_storage_unavailable(r)
        assert dump(d) == before, url
    # reads still work while writes cannot
    assert (await http.get("/v1/invoices")).status_code == 200
    # the log says what and where, without a traceback and without the request's data
    logged = [r for r in caplog.records if "storage" in r.getMessage() or "database" in r.getMessage()]
    assert any("full" in r.getMessage() and "POST /v1/invoices" in r.getMessage() for r in logged), \
        [r.getMessage() for r in caplog.records][-20:]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert secret_order not in text and "m" * 100 not in text and API_TOKEN not in text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    # the fault is gone: the same request succeeds
    conn.execute("PRAGMA max_page_count = 1073741823")
    r = await http.post("/v1/invoices", json=request)
    assert r.status_code == 201, r.text
    assert (await http.get("/readyz")).json()["storage"] == {"ready": True, "problem": None}
    assert counts(d)[0] == created + 1
    assert d.store.db.scalar("SELECT count(*) FROM audit_log WHERE action = 'invoice.create'") == created + 1


async def test_database_locked_by_another_process_is_503_then_succeeds(caplog, api):
    caplog.set_level(logging.INFO)
    d, http, _ = api
    d.store.db.conn.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(str(d.store.db.path), isolation_level=None, timeout=0.1)
    try:
        other.execute("BEGIN EXCLUSIVE")
        before, before_counts = dump(d), counts(d)
        with trio.fail_after(30):
            for method, url, body in [("POST", "/v1/invoices", INVOICE),
                                      ("POST", "/v1/addresses", {"chain": "devnet", "label": "alice"}),
                                      ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:1/h", "events": ["*"]}),
                                      ("POST", "/v1/admin/pause", {"scope": "all"})]:
                r = await http.request(method, url, json=body)
                if "admin" in url:
                    assert_error(r, 403, "insufficient_scope", url)  # refused before touching the database
                    continue
                assert_storage_unavailable(r)
                assert "locked" in r.json()["error"]["message"], r.text
            assert (await http.get("/v1/invoices")).status_code == 200  # WAL: reads go on
        other.execute("ROLLBACK")
        assert dump(d) == before and counts(d) == before_counts
        assert any("locked" in r.getMessage() and "503" in r.getMessage() for r in caplog.records)
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        # the lock is gone: the same requests succeed
        r = await http.post("/v1/invoices", json=INVOICE)
        assert r.status_code == 201, r.text
        r = await http.post("/v1/addresses", json={"chain": "devnet", "label": "alice"})
        assert r.status_code == 201, r.text
    finally:
        other.close()
