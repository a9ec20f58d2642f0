"""A worked example: credit an in-app currency from watcher's webhooks.

A game credits DGT, worth a tenth of a USDT: DGT = (a deposit's value in USDT) x 10. With
``[rates] reference = "USD"`` and a ``fixed`` source ``USDT/USD = 1``, a transfer's
``value.amount`` is its worth in USDT (any asset with a rate works: an ETH deposit is valued
at the rate of its detection). The app:

- verifies every webhook with the ``standardwebhooks`` library (the signing secret of the
  endpoint, ``whsec_...``);
- credits the label (the player) on ``transfer.confirmed``, **once per transfer id** (its own
  SQLite file: a redelivered or repeated event changes nothing);
- takes the credit back on ``transfer.orphaned`` (a reorg), and gives it again if the same
  transfer is confirmed again later; deliveries may arrive out of order, so an event older
  (by ``watcher-sequence``) than the last one applied to a transfer changes nothing;
- shows balances at ``GET /balances``.

Run it: ``WEBHOOK_SECRET=whsec_... python examples/dgt_credits.py --port 8500 --db dgt.db``,
then ``POST /v1/webhooks {"url": "http://127.0.0.1:8500/hook", "events": ["transfer.*"]}``
(list 127.0.0.1 in ``[webhooks] allowed_hosts``).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from decimal import Decimal
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DGT_PER_USDT = Decimal(10)


class Ledger:
    """Credits by transfer id: at most one live credit per transfer, whatever arrives twice."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode = WAL")
        # seq: the webhook's watcher-sequence (per endpoint, one per event): deliveries can arrive
        # out of order (retries, redeliveries), so only a newer event changes a transfer's credit
        self.db.execute("CREATE TABLE IF NOT EXISTS credits (transfer_id TEXT PRIMARY KEY, label TEXT NOT NULL,"
                        " dgt TEXT NOT NULL, live INTEGER NOT NULL, seq INTEGER NOT NULL)")

    def apply(self, transfer: dict[str, Any], *, live: bool, seq: int) -> bool:
        """Credit (``live``) or take back the transfer's DGT, unless a newer event already did."""
        value, label = transfer.get("value"), transfer.get("label")
        if not value or value.get("currency") != "USD" or not label:
            return False  # no rate when it arrived (never guess one), or not a player's address
        dgt = Decimal(value["amount"]) * DGT_PER_USDT
        cur = self.db.execute("INSERT INTO credits (transfer_id, label, dgt, live, seq) VALUES (?, ?, ?, ?, ?)"
                              " ON CONFLICT (transfer_id) DO UPDATE SET live = excluded.live, seq = excluded.seq"
                              " WHERE excluded.seq > credits.seq", (transfer["id"], label, str(dgt), int(live), seq))
        return cur.rowcount == 1

    def balances(self) -> dict[str, str]:
        out: dict[str, Decimal] = {}
        for label, dgt in self.db.execute("SELECT label, dgt FROM credits WHERE live = 1 ORDER BY transfer_id"):
            out[label] = out.get(label, Decimal(0)) + Decimal(dgt)
        return {label: format(total.normalize(), "f") for label, total in sorted(out.items())}


def create_app(secret: str, db_path: str) -> Starlette:
    webhook = Webhook(secret)
    ledger = Ledger(db_path)

    async def hook(request: Request) -> Response:
        body = await request.body()
        try:
            event = webhook.verify(body, dict(request.headers))
        except WebhookVerificationError:
            return Response(status_code=400)  # not from watcher (or stale): ignore it
        seq = int(request.headers.get("watcher-sequence", "0"))
        if event["type"] == "transfer.confirmed":
            ledger.apply(event["data"], live=True, seq=seq)
        elif event["type"] == "transfer.orphaned":
            ledger.apply(event["data"], live=False, seq=seq)
        return Response(status_code=204)  # any 2xx: watcher stops retrying

    async def balances(request: Request) -> Response:
        return JSONResponse(ledger.balances())

    return Starlette(routes=[Route("/hook", hook, methods=["POST"]), Route("/balances", balances)])


def main() -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    ap = argparse.ArgumentParser(description="Credit DGT (USDT value x 10) from watcher's webhooks.")
    ap.add_argument("--port", type=int, default=8500)
    ap.add_argument("--db", default="dgt.db")
    args = ap.parse_args()
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    trio.run(serve, create_app(os.environ["WEBHOOK_SECRET"], args.db), config)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
