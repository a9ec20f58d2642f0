"""Hardening found by a probe of the daemon: file modes, secrets at rest, the Host header,
slow bodies, /metrics off loopback, credentials in logs."""

from __future__ import annotations

import io
import logging
import os
import stat

import httpx
import pytest
import trio

from tests.support.daemon import API_TOKEN, chain_entry, free_port, running, write_config
from tests.test_api import DEAD_NODE
from watcher.errors import ConfigError
from watcher.log import JsonFormatter, TextFormatter, setup_logging


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_the_database_is_private_whatever_the_umask(tmp_path):
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=free_port())
    old = os.umask(0o022)
    try:
        async with running(cfg) as d:
            d.store.webhooks.create("http://127.0.0.1:9/h", ["*"], None)  # a write: -wal exists
            db = d.config.storage.path
            for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                assert p.exists() and mode(p) == 0o600, (p, oct(mode(p)))
        # a database from before (0644) is made private at the next start
        db.chmod(0o644)
        async with running(cfg):
            assert mode(db) == 0o600
    finally:
        os.umask(old)
    assert mode(tmp_path / "secrets.key") == 0o600


async def test_webhook_secrets_are_sealed_at_rest_and_erased_with_their_endpoint(tmp_path):
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=free_port())
    async with running(cfg) as d:
        row, secret = d.store.webhooks.create("http://127.0.0.1:9/h", ["*"], None)
        gone, gone_secret = d.store.webhooks.create("http://127.0.0.1:9/g", ["*"], None)
        stored = d.store.db.scalar("SELECT secret FROM webhooks WHERE id = ?", (row.id,))
        assert stored.startswith("sealed:v1:") and secret not in stored
        assert d.store.webhooks.secrets(row.id) == [secret]  # what signs
        d.store.webhooks.delete(gone.id)
        assert d.store.db.one("SELECT secret, old_secret FROM webhooks WHERE id = ?", (gone.id,))[0] == ""
        # a plaintext secret from before sealing (and a deleted endpoint's) is dealt with at the next start
        d.store.db.conn.execute("UPDATE webhooks SET secret = 'whsec_b2xkLXBsYWludGV4dC1zZWNyZXQ=' WHERE id = ?",
                                (row.id,))
        d.store.db.conn.execute("UPDATE webhooks SET secret = 'whsec_ZGVsZXRlZC1idXQta2VwdA==' WHERE id = ?",
                                (gone.id,))
    async with running(cfg) as d:
        assert d.store.webhooks.secrets(row.id) == ["whsec_b2xkLXBsYWludGV4dC1zZWNyZXQ="]
        assert d.store.db.scalar("SELECT secret FROM webhooks WHERE id = ?", (row.id,)).startswith("sealed:v1:")
        assert d.store.db.scalar("SELECT secret FROM webhooks WHERE id = ?", (gone.id,)) == ""
        d.store.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = d.config.storage.path.read_bytes()
    for plain in (secret, gone_secret, "whsec_b2xkLXBsYWludGV4dC1zZWNyZXQ=", "whsec_ZGVsZXRlZC1idXQta2VwdA=="):
        assert plain.encode() not in raw
    # another key file does not open them: refused at start, not at the first delivery
    (tmp_path / "secrets.key").unlink()
    with pytest.raises(ConfigError, match=r"keys\.secrets_key_file"):
        async with running(cfg):
            pass


async def test_only_known_host_headers_and_slow_bodies_time_out(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port,
                       extra={"api": {"body_timeout": 1.0}})
    auth = {"authorization": f"Bearer {API_TOKEN}"}
    with trio.fail_after(30):
        async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                             trust_env=False) as http:
            assert (await http.get("/v1/chains", headers=auth)).status_code == 200
            for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}"):
                assert (await http.get("/v1/chains", headers={**auth, "host": host})).status_code == 200, host
            for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}", ""):
                for path in ("/v1/chains", "/metrics", "/healthz"):
                    r = await http.get(path, headers={**auth, "host": host})
                    assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", (host, path)
            # a body sent a byte at a time is cut off after body_timeout
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(f"POST /v1/addresses HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                  f"Authorization: Bearer {API_TOKEN}\r\nContent-Length: 200\r\n\r\n".encode())
            t0 = trio.current_time()
            answer = b""
            for _ in range(100):
                with trio.move_on_after(0.2):
                    answer += await stream.receive_some(4096)
                if answer:
                    break
                await stream.send_all(b" ")
            with trio.move_on_after(2):
                while chunk := await stream.receive_some(4096):
                    answer += chunk
            await stream.aclose()
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"request_timeout" in answer and trio.current_time() - t0 < 10


async def test_metrics_need_a_key_off_loopback(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port,
                       extra={"api": {"listen": f"0.0.0.0:{port}"}})
    with trio.fail_after(30):
        async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                             trust_env=False) as http:
            r = await http.get("/metrics")
            assert r.status_code == 401
            r = await http.get("/metrics", headers={"authorization": f"Bearer {API_TOKEN}"})
            assert r.status_code == 200 and "watcher_build_info" in r.text


async def test_metrics_need_a_key_through_a_reverse_proxy(tmp_path):
    """The documented way to expose the API is a reverse proxy on the same machine in front of a
    loopback listener. The proxy connects from 127.0.0.1, so the listen address alone said
    "local" and /metrics (amounts received, keys' ids, hot wallet balances) was open to
    whoever reached the proxy. A request naming a public host or carrying a forwarding header
    now needs a key with ``read``; Prometheus scraping 127.0.0.1 directly still needs none."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port)
    auth = {"authorization": f"Bearer {API_TOKEN}"}
    with trio.fail_after(30):
        async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                             trust_env=False) as http:
            for local in ({}, {"host": f"localhost:{port}"}):
                r = await http.get("/metrics", headers=local)
                assert r.status_code == 200 and "watcher_build_info" in r.text, local
            proxied = [{"x-forwarded-for": "203.0.113.5"},
                       {"forwarded": "for=203.0.113.5;proto=https"}, {"x-real-ip": "203.0.113.5"}]
            for headers in proxied:
                r = await http.get("/metrics", headers=headers)
                assert r.status_code == 401, (headers, r.status_code)
                r = await http.get("/metrics", headers={**headers, **auth})
                assert r.status_code == 200 and "watcher_build_info" in r.text, headers


@pytest.mark.parametrize("api", [{"hosts": ["127.0.0.1", "localhost", "watcher.example.com"]},
                                 {"trusted_proxies": ["127.0.0.1"]}], ids=["public-host-listed", "proxy-trusted"])
async def test_metrics_need_a_key_when_the_config_names_a_reverse_proxy(tmp_path, api):
    """nginx's default ``proxy_pass http://127.0.0.1:8420`` connects from 127.0.0.1, sends
    ``Host: 127.0.0.1:8420`` and no forwarding header: the same request as Prometheus
    scraping locally, so /metrics was open through it. A config that names a proxy (its
    public name in ``hosts``, or ``trusted_proxies``) now needs a key for every scrape."""
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port, extra={"api": api})
    with trio.fail_after(30):
        async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                             trust_env=False) as http:
            assert (await http.get("/metrics")).status_code == 401  # what the proxy passes on
            r = await http.get("/metrics", headers={"authorization": f"Bearer {API_TOKEN}"})
            assert r.status_code == 200 and "watcher_build_info" in r.text


@pytest.mark.parametrize("trusted", [["127.0.0.0/8"], []], ids=["behind-a-trusted-proxy", "no-proxy-trusted"])
async def test_failed_authentications_are_counted_per_client_behind_a_trusted_proxy(tmp_path, trusted):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", DEAD_NODE)], api_port=port,
                       extra={"api": {"failed_auth_limit": "3/min", "trusted_proxies": trusted}})
    with trio.fail_after(30):
        async with running(cfg, api=True), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                                             trust_env=False) as http:

            async def code(client: str) -> int:
                r = await http.get("/v1/chains", headers={"authorization": "Bearer wrong-token-000000000000",
                                                          "x-forwarded-for": client})
                return r.status_code

            assert [await code("203.0.113.5") for _ in range(4)] == [401, 401, 401, 429]
            assert await code("203.0.113.5, 127.0.0.1") == 429  # the same client through two proxies
            # another client through the same proxy has a count of its own; untrusted, one count for all
            assert await code("203.0.113.6") == (401 if trusted else 429)


def test_the_client_behind_trusted_proxies_is_the_rightmost_untrusted_hop():
    from starlette.requests import Request

    from watcher.forwarding import client_address, is_local, parse_networks

    def request(peer: str, headers: dict[str, str]) -> Request:
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        return Request({"type": "http", "method": "GET", "path": "/", "headers": raw, "client": (peer, 5000)})

    trusted = parse_networks(["127.0.0.1", "10.0.0.0/8", "::1"])
    xff = "x-forwarded-for"
    assert client_address(request("127.0.0.1", {xff: "203.0.113.5"}), trusted) == "203.0.113.5"
    assert client_address(request("127.0.0.1", {xff: "203.0.113.5"}), ()) == "127.0.0.1"  # nothing trusted
    assert client_address(request("198.51.100.9", {xff: "203.0.113.5"}), trusted) == "198.51.100.9"  # not a proxy
    assert client_address(request("127.0.0.1", {xff: "1.2.3.4, 203.0.113.5, 10.1.2.3"}), trusted) == "203.0.113.5"
    assert client_address(request("::1", {xff: "[2001:db8::5]:443"}), trusted) == "2001:db8::5"
    assert client_address(request("::ffff:127.0.0.1", {xff: "203.0.113.5:51000"}), trusted) == "203.0.113.5"
    assert client_address(request("127.0.0.1", {}), trusted) == "127.0.0.1"  # no header: the proxy itself
    assert client_address(request("127.0.0.1", {xff: "junk, 10.0.0.2"}), trusted) == "10.0.0.2"  # last good hop
    assert client_address(request("127.0.0.1", {xff: "10.0.0.7"}), trusted) == "10.0.0.7"  # all trusted
    with pytest.raises(ValueError, match="not an IP address"):
        parse_networks(["10.0.0.0/8", "proxy.local"])
    assert is_local(request("127.0.0.1", {"host": "127.0.0.1:8420"}))
    assert is_local(request("::1", {"host": "[::1]:8420"}))
    assert not is_local(request("127.0.0.1", {"host": "pay.example.com"}))
    assert not is_local(request("127.0.0.1", {"host": "127.0.0.1:8420", "x-forwarded-proto": "https"}))
    assert not is_local(request("192.0.2.1", {"host": "127.0.0.1:8420"}))


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_credentials_in_urls_never_reach_the_log(formatter):
    stream = io.StringIO()
    setup_logging("debug", "json", stream)
    logger = logging.getLogger("some.library")
    record = logger.makeRecord("some.library", logging.WARNING, __file__, 1,
                               "request to %s failed", ("http://alice:hunter2secret@node.internal:8332/",), None)
    try:
        raise OSError("cannot connect to https://rpcuser:s3cr3tpass@10.0.0.5:8545/v1/KEY")
    except OSError:
        import sys

        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "hunter2secret" not in line and "s3cr3tpass" not in line and "rpcuser" not in line
    assert "http://***@node.internal:8332/" in line and "https://***@10.0.0.5:8545" in line
