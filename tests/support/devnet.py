"""``make run``: a local devnet with a working example.

Starts anvil (a block a second) with a demo ERC-20 (USDT, 6 decimals) and a Litecoin Core
regtest node (``litecoind``, also a block a second), writes ``devnet/watcher.toml`` with a
fresh seed, starts ``watcher run``, then plays the part of an app: asks for alice's deposit
addresses, pays her ETH and USDT from an anvil account and LTC from the Litecoin node's own
payer wallet, and prints what watcher reports. Keeps running until Ctrl-C, then stops every
process it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import tomli_w

from tests.support.daemon import free_port, wait_http
from tests.support.evm import Anvil, Token
from tests.support.litecoin import COIN, Litecoind

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "devnet"


def say(text: str) -> None:
    print(f"\033[1;36m[devnet]\033[0m {text}", flush=True)


def main() -> int:
    from watcher.keys import new_mnemonic, write_secret_file

    DIR.mkdir(exist_ok=True)

    def stop(signum: int, frame: object) -> None:  # `kill`, or a supervisor, like Ctrl-C: clean up
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    node = Anvil(chain_id=31337, block_time=1, port=8545 if _port_free(8545) else 0)
    node.start()
    ltc = Litecoind()
    daemon: subprocess.Popen[bytes] | None = None
    stop_mining = threading.Event()
    try:
        say(f"anvil is up at {node.url} (chain id 31337, a block every second)")
        ltc.start()
        ltc.payer  # noqa: B018 - a wallet inside the node with mature coins, to pay alice from
        say(f"litecoind -regtest is up at 127.0.0.1:{ltc.rpc_port} (block {ltc.head()}; a block every second)")
        threading.Thread(target=_mine_every_second, args=(ltc, stop_mining), daemon=True).start()
        usdt = Token.deploy(node, "USDT", 6)
        say(f"deployed demo ERC-20 USDT at {usdt.address}")

        seed = DIR / "seed.txt"
        if seed.exists():
            seed.unlink()
        write_secret_file(seed, new_mnemonic() + "\n")
        db = DIR / "watcher.db"
        for p in (db, DIR / "watcher.db-wal", DIR / "watcher.db-shm"):
            p.unlink(missing_ok=True)  # a new anvil is a new chain: start from an empty database
        port = 8420 if _port_free(8420) else free_port()
        token = "devnet-token-" + os.urandom(6).hex()
        pay_port = 8421 if _port_free(8421) else free_port()
        config = {
            "storage": {"path": "watcher.db"},
            "keys": {"mnemonic_file": "seed.txt"},
            "api": {"listen": f"127.0.0.1:{port}", "token": token},
            "log": {"level": "info", "format": "text"},
            # the demo shop's webhook receiver runs on this machine: a private address, refused
            # unless its host is listed (docs/security.md)
            "webhooks": {"allowed_hosts": ["127.0.0.1"]},
            # the checkout page customers pay on (docs/checkout.md), on its own listener
            "checkout": {"listen": f"127.0.0.1:{pay_port}", "public_url": f"http://127.0.0.1:{pay_port}",
                         "title": "watcher devnet shop"},
            "chains": [{
                "id": "devnet", "family": "evm", "rpc_url": node.url, "native_symbol": "ETH",
                "confirmations": 2, "start_block": 0, "poll_interval": 0.5, "chain_id": 31337,
                "assets": [{"symbol": "USDT", "contract": usdt.address, "decimals": 6}],
            }, {
                "id": "ltc", "family": "bitcoin", "network": "ltc-regtest", "rpc_url": ltc.url,
                "confirmations": 2, "start_block": ltc.head(), "poll_interval": 0.5,
            }],
        }
        cfg_path = DIR / "watcher.toml"
        cfg_path.write_bytes(tomli_w.dumps(config).encode())
        say(f"wrote {cfg_path.relative_to(ROOT)} and a fresh seed in {seed.relative_to(ROOT)}")

        daemon = subprocess.Popen([sys.executable, "-m", "watcher", "run", "-c", str(cfg_path)], cwd=str(ROOT))
        api = f"http://127.0.0.1:{port}"
        wait_http(f"{api}/healthz", timeout=30)
        headers = {"authorization": f"Bearer {token}"}
        http = httpx.Client(base_url=api, headers=headers, timeout=10, trust_env=False)

        r = http.post("/v1/addresses", json={"chain": "devnet", "label": "alice"})
        r.raise_for_status()
        alice = r.json()["address"]
        say(f"POST /v1/addresses {{chain: devnet, label: alice}} -> {alice}")
        payer = node.accounts[1]
        node.wait_receipt(usdt.mint(payer, 1_000 * 10**6))
        node.send(payer, alice, 15 * 10**17)
        usdt.transfer(payer, alice, 25 * 10**6)
        say("paid alice 1.5 ETH and 25 USDT from an anvil account; waiting for 2 confirmations...")
        deadline = time.monotonic() + 60
        items: list[dict] = []
        while time.monotonic() < deadline:
            items = http.get("/v1/transfers", params={"chain": "devnet", "address": alice}).json()["items"]
            if len(items) == 2 and all(t["status"] == "confirmed" for t in items):
                break
            time.sleep(0.5)
        for t in items:
            say(f"  {t['status']}: {t['amount']} {t['asset']} to {t['label']} in block {t['block_number']} ({t['txid'][:18]}...)")
        totals = http.get(f"/v1/addresses/devnet/{alice}").json()["totals"]
        say(f"GET /v1/addresses/devnet/{alice} totals: {json.dumps(totals)}")

        # the same label on the Litecoin chain: a BIP84 address any wallet derives from the seed
        r = http.post("/v1/addresses", json={"chain": "ltc", "label": "alice"})
        r.raise_for_status()
        alice_ltc = r.json()
        say(f"POST /v1/addresses {{chain: ltc, label: alice}} -> {alice_ltc['address']} "
            f"({alice_ltc['derivation_path']})")
        ltc_txid = ltc.send(alice_ltc["address"], 75 * COIN // 100)
        say(f"paid alice 0.75 LTC from the node's payer wallet ({ltc_txid[:18]}...)")
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "confirmed" not in seen:
            for t in http.get("/v1/transfers", params={"chain": "ltc", "address": alice_ltc["address"]}).json()["items"]:
                if t["status"] not in seen:
                    seen.add(t["status"])
                    where = "in the mempool" if t["block_number"] is None else f"in block {t['block_number']}"
                    say(f"  {t['status']}: {t['amount']} {t['asset']} to {t['label']} {where}, "
                        f"{t['confirmations']} confirmation(s)")
            time.sleep(0.3)
        totals = http.get(f"/v1/addresses/ltc/{alice_ltc['address']}").json()["totals"]
        say(f"GET /v1/addresses/ltc/{alice_ltc['address']} totals: {json.dumps(totals)}")

        # a shop: a webhook endpoint (a tiny receiver here that verifies signatures) and an invoice
        hook_url, hooks = _start_receiver()
        r = http.post("/v1/webhooks", json={"url": hook_url, "events": ["invoice.*"], "description": "demo shop"})
        r.raise_for_status()
        hooks.secret = r.json()["secret"]
        say(f"POST /v1/webhooks -> {r.json()['id']} (events invoice.*, secret whsec_...)")
        inv = http.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "12.5",
                                              "order_id": "demo-order-1"}).json()
        say(f"POST /v1/invoices 12.5 USDT -> {inv['id']} pay to {inv['address']}")
        say(f"  payment_uri: {inv['payment_uri']}")
        usdt.transfer(payer, inv["address"], 12_500_000)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "invoice.completed" not in hooks.types:
            time.sleep(0.3)
        inv_id = inv["id"]
        say(f"GET /v1/invoices/{inv_id} -> {http.get(f'/v1/invoices/{inv_id}').json()['status']}")
        say(f"  its checkout page (paid): {inv['checkout_url']}")
        open_inv = http.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "0.05",
                                                   "order_id": "demo-order-2", "expires_in": 86400}).json()
        say("")
        say("watcher is running. Try it yourself:")
        pay_call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_sendTransaction", "params": [
            {"from": payer, "to": open_inv["address"], "value": hex(5 * 10**16)}]})
        say(f"  open {open_inv['checkout_url']} in a browser: a 0.05 ETH invoice waiting for payment;")
        say("  pay it from an anvil account and watch the page turn to paid without a reload:")
        say(f"  curl -s {node.url} -H 'content-type: application/json' -d '{pay_call}'")
        say(f"  curl -s -H 'Authorization: Bearer {token}' {api}/v1/chains")
        say(f"  curl -s -H 'Authorization: Bearer {token}' -X POST {api}/v1/addresses -d '{{\"chain\":\"devnet\",\"label\":\"bob\"}}'")
        say(f"  curl -s -H 'Authorization: Bearer {token}' '{api}/v1/transfers?chain=devnet'")
        say(f"  curl -s -H 'Authorization: Bearer {token}' '{api}/v1/transfers?chain=ltc'")
        say("Press Ctrl-C to stop.")
        while daemon.poll() is None:
            time.sleep(0.5)
        return daemon.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
        stop_mining.set()
        ltc.close()  # by PID; removes its datadir
        node.close()
        say("stopped watcher, litecoind and anvil")


def _mine_every_second(node: Litecoind, stop: threading.Event) -> None:
    """A Litecoin block a second (regtest mines only when asked), until ``stop``."""
    while not stop.wait(1.0):
        try:
            node.mine(1)
        except Exception:  # the node is stopping
            return


class _Hooks:
    secret = ""
    types: list[str] = []


def _start_receiver() -> tuple[str, _Hooks]:
    """A webhook receiver on 127.0.0.1 that verifies each delivery as an app would."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from standardwebhooks import Webhook

    hooks = _Hooks()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            try:
                payload = Webhook(hooks.secret).verify(body, dict(self.headers.items()))
            except Exception as e:
                say(f"  webhook REJECTED: {e}")
                self.send_response(400)
                self.end_headers()
                return
            hooks.types.append(payload["type"])
            data = payload["data"]
            say(f"  webhook (signature ok) #{payload['sequence']}: {payload['type']} {data['id']} "
                f"status={data['status']} received={data['received']}")
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/hook", hooks


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
