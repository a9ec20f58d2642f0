"""``watcher status``: per chain, what the node says (head, hot wallet balances) next to what
the database says (scanned block, watched addresses, pending work)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from .daemon import chain_keys
from .errors import NodeError
from .money import format_amount
from .sender import open_wallet
from .tasks import fan_out

if TYPE_CHECKING:
    from .config import ChainConfig
    from .core import Core


async def _node_facts(core: Core, cfg: ChainConfig) -> dict[str, Any]:
    store = core.store
    from .scanner import ChainWatcher

    facts: dict[str, Any] = {"head": None, "node": "down", "hot_wallet_balances": {}, "nodes": []}
    w = ChainWatcher(store.chain_config(cfg.id), store, core.metrics)
    try:
        with trio.fail_after(min(cfg.rpc_timeout, 5)):
            async with w.open_client() as client:
                assert w.pool is not None
                await w.pool.probe()  # every node's head, and which one requests go to
                facts["nodes"] = w.pool.view()
                facts["head"] = await client.head()
                facts["node"] = "up"
                hot = store.hot_wallet(cfg.id)
                # a UTXO wallet counts its own coins (the node would scan its whole UTXO set)
                wallet = open_wallet(cfg, store, client, chain_keys(cfg, store)) if hot is not None else None
                state, _ = store.chaintxs.wallet_state(cfg.id)
                for a in cfg.assets if hot is not None else ():
                    assert hot is not None
                    own = await wallet.balance(a, state) if wallet is not None else None
                    units = own if own is not None else await client.balance(hot, a)
                    facts["hot_wallet_balances"][a.symbol] = format_amount(units, a.decimals)
    except (NodeError, trio.TooSlowError) as e:
        facts["error"] = getattr(e, "message", "timed out")
    return facts


def status_report(core: Core) -> dict[str, Any]:
    """Ask every node (concurrently, 5 s at most) and read the database; no daemon needed."""
    store = core.store

    async def gather() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}

        async def one(cfg: ChainConfig) -> None:
            out[cfg.id] = await _node_facts(core, cfg)

        async with fan_out() as nursery:
            for cfg in core.config.chains:
                nursery.start_soon(one, cfg)
        return out

    facts = trio.run(gather)
    report: dict[str, Any] = {"paused": sorted(store.paused()), "webhook_backlog": store.webhooks.backlog(),
                              "chains": {}}
    for cfg in core.config.chains:
        cid, spec = cfg.id, cfg.spec
        scanned = store.chains.scanned_number(cid)
        f = facts[cid]
        hot = store.hot_wallet(cid)

        report["chains"][cid] = {
            "node": f["node"], "error": f.get("error"), "head": f["head"], "nodes": f["nodes"],
            "scanned": scanned if scanned >= 0 else None,
            "lag": None if f["head"] is None or scanned < 0 else max(0, f["head"] - scanned),
            "watched_addresses": store.addresses.count(cid),
            **store.chains.pending_work(cid),
            "hot_wallet": None if hot is None else {"address": spec.display_address(hot),
                                                    "balances": f["hot_wallet_balances"]},
            # refused transactions whose slot (an EVM nonce) a filler took so later ones could go
            "fillers": [{"txid": t.txid, "for": t.ref_id, "status": t.status, **spec.tx_fields(t.details)}
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
        if len(c["nodes"]) > 1:
            for n in c["nodes"]:
                print(f"  node {n['node']}: {n['state']}{' (in use)' if n['active'] else ''}  head {n['head']}"
                      + (f"  ({n['error']})" if n["error"] else ""))
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
            facts = ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("txid", "for", "status") and v is not None)
            print(f"  gap filled for {f['for']} (a transaction the node refused): {f['txid']} {f['status']}"
                  + (f" ({facts})" if facts else ""))
