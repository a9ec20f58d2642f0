"""Metrics: every one documented, served on /metrics, and scraped by a real Prometheus."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.daemon import chain_entry, free_port, running, wait_until, write_config
from tests.support.evm import Anvil, Token

ROOT = Path(__file__).resolve().parents[1]


async def test_every_metric_is_documented_and_served(tmp_path, anvil: Anvil, token: Token):
    port = free_port()
    cfg = write_config(tmp_path, [chain_entry("devnet", anvil.url, tokens=[("USDT", token.address, 6)])],
                       api_port=port)
    docs = (ROOT / "docs" / "metrics.md").read_text()
    with trio.fail_after(30):
        async with running(cfg, api=True) as d:
            alice, _ = d.store.addresses.deposit_address("devnet", "alice")
            anvil.send(anvil.accounts[1], alice.address, 10**18)
            anvil.mine(2)
            await wait_until(lambda: d.views.transfers(status="confirmed")[0])
            names = {m.name for m in d.metrics.registry.collect()}
            async with httpx.AsyncClient(trust_env=False) as http:
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    missing = [n for n in names if f"`{n}`" not in docs and f"`{n}_total`" not in docs]
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"
    assert 'watcher_transfers_total{asset="ETH",chain="devnet",status="confirmed"} 1.0' in text
    assert 'watcher_received_total{asset="ETH",chain="devnet"} 1.0' in text
    assert 'watcher_received_base_units_total{asset="ETH",chain="devnet"} 1e+18' in text
    assert re.search(r'watcher_chain_scanned_block\{chain="devnet"\} [1-9]', text)
    assert "watcher_detection_latency_seconds_count" in text


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


# `make test` installs Prometheus and sets WATCHER_REQUIRE_PROMETHEUS: there these never skip
_NO_PROMETHEUS = not prometheus_binary() and not os.environ.get("WATCHER_REQUIRE_PROMETHEUS")


@pytest.mark.skipif(_NO_PROMETHEUS, reason="the prometheus server is installed by `make deps`")
def test_real_prometheus_scrapes_the_daemon(tmp_path, anvil: Anvil):
    from tests.support.daemon import DaemonProcess, wait_http

    api_port = free_port()
    cfg = write_config(tmp_path / "w", [chain_entry("devnet", anvil.url)], api_port=api_port)
    daemon = DaemonProcess(cfg).start()
    prom_port = free_port()
    prom_dir = Path(tempfile.mkdtemp(prefix="prom-", dir=tmp_path))
    scrape = (ROOT / "deploy" / "prometheus.yml").read_text()
    scrape = scrape.replace("127.0.0.1:8420", f"127.0.0.1:{api_port}").replace("scrape_interval: 15s",
                                                                                 "scrape_interval: 1s")
    (prom_dir / "prometheus.yml").write_text(scrape)
    shutil.copy(ROOT / "deploy" / "alerts.yml", prom_dir / "alerts.yml")
    prom = subprocess.Popen([prometheus_binary(), f"--config.file={prom_dir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={prom_dir / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{api_port}/healthz")
        anvil.mine(5)
        base = f"http://127.0.0.1:{prom_port}/api/v1"
        deadline = time.monotonic() + 60
        result = []
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{base}/query", params={"query": 'watcher_chain_scanned_block{chain="devnet"}'},
                              trust_env=False, timeout=5).json()
                result = r["data"]["result"]
                if result and float(result[0]["value"][1]) >= 5:
                    break
            except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.5)
        assert result and float(result[0]["value"][1]) >= 5, result
        up = httpx.get(f"{base}/query", params={"query": 'up{job="watcher"}'}, trust_env=False).json()
        assert up["data"]["result"][0]["value"][1] == "1"
        lag = httpx.get(f"{base}/query", params={"query": "watcher_chain_lag_blocks"}, trust_env=False).json()
        assert lag["data"]["result"][0]["metric"]["chain"] == "devnet"
        rules = httpx.get(f"{base}/rules", trust_env=False).json()["data"]["groups"]
        assert any(r["name"] == "WatcherChainStalled" for g in rules for r in g["rules"])
    finally:
        prom.terminate()
        prom.wait(timeout=15)
        daemon.stop()


@pytest.mark.skipif(_NO_PROMETHEUS, reason="promtool comes with the prometheus package")
def test_alert_rules_pass_promtool():
    r = subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy" / "alerts.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_grafana_dashboard_uses_only_real_metrics():
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for expr in exprs:
        for name in re.findall(r"\bwatcher_[a-z_]+", expr):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert f"`{base}`" in docs, f"dashboard uses undocumented {name}"


