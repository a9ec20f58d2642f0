"""Benchmark 9: from the event to the checkout page. A daemon with ``[checkout]`` on anvil;
for each sample an invoice's page is open in headless Chromium (a MutationObserver stamps
``Date.now()`` when the status element turns ``completed``), the invoice is paid and its block
mined. Latency = that stamp - the ``invoice.completed`` event's ``timestamp`` (its commit; wall
clock, same machine). Baseline, measured on the same events: the signed webhook's arrival at a
receiver on loopback (the fastest thing watcher does with an event)."""

from __future__ import annotations

import datetime
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support import browser as br
from tests.support.daemon import (
    API_TOKEN,
    DaemonProcess,
    chain_entry,
    free_port,
    wait_http,
    write_config,
)
from tests.support.evm import Anvil
from tests.support.receiver import receiving

OBSERVE = """
const status = document.querySelector('[data-field="status"]');
window.__paidAt = null;
new MutationObserver(() => {
  if (status.dataset.status === 'completed' && window.__paidAt === null) window.__paidAt = Date.now();
}).observe(status, {attributes: true, childList: true, characterData: true, subtree: true});
"""


def _ms(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


async def measure(node: Anvil, api_port: int, samples: int) -> tuple[list[float], list[float]]:
    page_ms: list[float] = []
    hook_ms: list[float] = []
    auth = {"authorization": f"Bearer {API_TOKEN}"}
    async with receiving() as rx, httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", headers=auth,
                                                    trust_env=False, timeout=10) as http:
        r = await http.post("/v1/webhooks", json={"url": rx.url, "events": ["invoice.completed"]})
        assert r.status_code == 201, r.text
        with br.browser() as driver:
            for i in range(samples):
                inv = (await http.post("/v1/invoices", json={"chain": "bench", "asset": "ETH",
                                                             "amount": f"0.001{i:03d}"})).json()
                await trio.to_thread.run_sync(driver.get, inv["checkout_url"])
                deadline = time.monotonic() + 20
                while driver.execute_script("return document.querySelector('main').dataset.updates") is None:
                    assert time.monotonic() < deadline, "the page's stream never sent its first state"
                    await trio.sleep(0.02)
                driver.execute_script(OBSERVE)
                node.send(node.accounts[1], inv["address"], int(inv["base_units"]))
                node.mine(1)
                deadline = time.monotonic() + 20
                while (paid_at := driver.execute_script("return window.__paidAt")) is None:
                    assert time.monotonic() < deadline, "the page never turned to paid"
                    await trio.sleep(0.01)
                while not (hooks := [q for q in rx.requests if q.json["data"]["id"] == inv["id"]]):
                    assert time.monotonic() < deadline, "the webhook never arrived"
                    await trio.sleep(0.01)
                event_ms = _ms(hooks[0].json["timestamp"])
                page_ms.append(paid_at - event_ms)
                hook_ms.append(hooks[0].wall * 1000 - event_ms)
    return page_ms, hook_ms


def run(workdir: Path, *, samples: int = 20) -> dict[str, Any]:
    why = br.available()
    if why is not None:
        return {"skipped": why}
    with Anvil() as node:
        node.automine(False)
        api_port, pay_port = free_port(), free_port()
        cfg = write_config(workdir, [chain_entry("bench", node.url, confirmations=1, poll_interval=0.5,
                                                 chain_id=31337)], api_port=api_port,
                           extra={"log": {"level": "warning"}, "webhooks": {"allowed_hosts": ["127.0.0.1"]},
                                  "checkout": {"listen": f"127.0.0.1:{pay_port}",
                                               "public_url": f"http://127.0.0.1:{pay_port}"}})
        proc = DaemonProcess(cfg).start()
        try:
            wait_http(f"http://127.0.0.1:{api_port}/healthz")
            page, hook = trio.run(measure, node, api_port, samples)
        finally:
            proc.stop()
    page.sort()
    hook.sort()
    p50, p99 = statistics.median(page), page[max(0, int(len(page) * 0.99) - 1)]
    h50 = statistics.median(hook)
    return {"samples": len(page), "p50_ms": p50, "p99_ms": p99, "max_ms": page[-1], "webhook_p50_ms": h50,
            "ratio_to_webhook": p50 / h50 if h50 > 0 else None, "target_ms": 1000.0,
            "p99_ratio_to_target": p99 / 1000.0}


if __name__ == "__main__":
    import json
    import tempfile

    print(json.dumps(run(Path(tempfile.mkdtemp())), indent=2))
