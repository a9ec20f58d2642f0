"""``watcher status``: per chain, what the node says (head, hot wallet balances) next to what
the database says (scanned block, watched addresses, pending work)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from .errors import NodeError
from .money import format_amount
from .tasks import fan_out

if TYPE_CHECKING:
    from .daemon import Daemon
    from .scanner import ChainWatcher


async def _node_facts(daemon: Daemon, w: ChainWatcher) -> dict[str, Any]:
    store = daemon.store
    facts: dict[str, Any] = {"head": None, "node": "down", "hot_wallet_balances": {}}
    try:
        with trio.fail_after(min(w.config.rpc_timeout, 5)):
            async with w.open_client() as client:
                facts["head"] = await client.head()
                facts["node"] = "up"
                hot = store.hot_wallet(w.config.id)
                for a in w.config.assets if hot else ():
                    facts["hot_wallet_balances"][a.symbol] = format_amount(await client.balance(hot, a), a.decimals)
    except (NodeError, trio.TooSlowError) as e:
        facts["error"] = getattr(e, "message", "timed out")
    return facts


def status_report(daemon: Daemon) -> dict[str, Any]:
    """Ask every node (concurrently, 5 s at most) and read the database; no daemon needed."""
    store = daemon.store

    async def gather() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}

        async def one(cid: str, w: ChainWatcher) -> None:
            out[cid] = await _node_facts(daemon, w)

        async with fan_out() as nursery:
            for cid, w in daemon.watchers.items():
                nursery.start_soon(one, cid, w)
        return out

    facts = trio.run(gather)
    db = store.db
    report: dict[str, Any] = {"paused": sorted(store.paused()), "webhook_backlog": store.webhooks.backlog(),
                              "chains": {}}
    for cid, w in daemon.watchers.items():
        scanned = store.chains.scanned_number(cid)
        f = facts[cid]
        hot = store.hot_wallet(cid)

        def count(sql: str, cid: str = cid) -> int:
            return db.scalar(sql, (cid,)) or 0

        report["chains"][cid] = {
            "node": f["node"], "error": f.get("error"), "head": f["head"],
            "scanned": scanned if scanned >= 0 else None,
            "lag": None if f["head"] is None or scanned < 0 else max(0, f["head"] - scanned),
            "watched_addresses": store.addresses.count(cid),
            "unconfirmed_transfers": count("SELECT COUNT(*) FROM transfers WHERE chain = ? AND status = 'detected'"),
            "open_invoices": count("SELECT COUNT(*) FROM invoices WHERE chain = ? AND status IN "
                                   "('awaiting_payment', 'awaiting_confirmation')"),
            "payouts_waiting": count("SELECT COUNT(*) FROM payouts WHERE chain = ? AND status IN "
                                     "('pending', 'awaiting_approval')"),
            "payouts_in_flight": count("SELECT COUNT(*) FROM payouts WHERE chain = ? AND status = 'broadcast'"),
            "sweeps_in_progress": count("SELECT COUNT(*) FROM sweeps WHERE chain = ? AND status IN "
                                        "('planned', 'funding', 'broadcast')"),
            "hot_wallet": None if hot is None else {"address": w.spec.display_address(hot),
                                                    "balances": f["hot_wallet_balances"]},
            # refused transactions whose slot (an EVM nonce) a filler took so later ones could go
            "fillers": [{"txid": t.txid, "for": t.ref_id, "status": t.status, **w.spec.tx_fields(t.details)}
                        for t in store.chaintxs.fillers(cid)],
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"paused: {', '.join(report['paused']) or 'nothing'}    webhook deliveries waiting: "
          f"{report['webhook_backlog']}")
    for cid, c in report["chains"].items():
        lag = "?" if c["lag"] is None else c["lag"]
        print(f"\n{cid}: node {c['node']}" + (f" ({c['error']})" if c["error"] else "")
              + f"  head {c['head']}  scanned {c['scanned']}  lag {lag}")
        print(f"  watched addresses {c['watched_addresses']}  unconfirmed transfers {c['unconfirmed_transfers']}"
              f"  open invoices {c['open_invoices']}")
        print(f"  payouts waiting {c['payouts_waiting']}  in flight {c['payouts_in_flight']}"
              f"  sweeps in progress {c['sweeps_in_progress']}")
        if c["hot_wallet"]:
            bal = ", ".join(f"{v} {k}" for k, v in c["hot_wallet"]["balances"].items()) or "unknown (node down)"
            print(f"  hot wallet {c['hot_wallet']['address']}: {bal}")
        else:
            print("  hot wallet: none (watch-only)")
        for f in c["fillers"]:
            slot = f" at nonce {f['nonce']}" if f.get("nonce") is not None else ""
            print(f"  gap filled{slot} for {f['for']} (a transaction the node refused): {f['txid']} {f['status']}")
