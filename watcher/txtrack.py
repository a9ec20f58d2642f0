"""Following one nonce's transactions until one of them is mined deep enough.

The stored transactions of a payout or sweep step all share a sender and a nonce (the
original and any fee-bump replacements), so at most one can ever be mined. Each round:

- if one is mined: settle it (the others are ``replaced``) and report its depth;
- if one we had settled left the chain (a reorg): open them all again;
- if the node does not know the newest (never sent, or dropped): broadcast it again;
- if the newest has waited longer than ``stuck_after``: sign a replacement with the same
  nonce and fees at least ``fee_bump`` higher (and at least the market's), store it, send it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .chains import BroadcastRejected, ChainClient, FeeQuote, SignedTx, TxStatus
from .store import Store

log = logging.getLogger(__name__)

# resign(fees) signs a replacement with these fees and stores it; returns it (or None if it
# must not be replaced, e.g. a native sweep whose balance no longer covers a higher fee)
Resign = Callable[[FeeQuote], Awaitable[SignedTx | None]]


@dataclass(frozen=True)
class Tracked:
    state: str  # 'pending' or 'mined'
    status: TxStatus | None = None
    confirmations: int = 0


def cap_fees(fees: FeeQuote, cap: int | None) -> FeeQuote:
    if cap is None or fees.max_fee <= cap:
        return fees
    prio = None if fees.priority_fee is None else min(fees.priority_fee, cap)
    return FeeQuote(max_fee=cap, priority_fee=prio)


async def broadcast(store: Store, client: ChainClient, tx: SignedTx, what: str) -> bool:
    """Send stored bytes; a transient refusal (e.g. fees below the base fee) is logged and
    False is returned: the bytes are sent again, or replaced, in a later round."""
    try:
        await client.broadcast(tx)
    except BroadcastRejected as e:
        log.warning("%s: node refused %s (%s); %s", what, tx.txid, e.message,
                    "will not retry these bytes" if e.permanent else "trying again later")
        if e.permanent:
            raise
        return False
    store.chaintxs.mark_broadcast(tx.txid)
    return True


async def track(store: Store, client: ChainClient, txs: list[sqlite3.Row], *, head: int, stuck_after: float,
                fee_bump_ppm: int, max_fee: int | None, resign: Resign | None, what: str) -> Tracked:
    live = [t for t in txs if t["status"] in ("open", "mined", "failed")]
    if not live:
        return Tracked("pending")
    statuses = [await client.tx_status(t["txid"]) for t in live]
    mined = next((s for s in statuses if s.state == "mined"), None)
    if mined is not None:
        row = next(t for t in live if t["txid"] == mined.txid)
        if row["status"] == "open" or row["block_number"] != mined.block_number:
            with store.db.transaction():
                if row["status"] != "open":
                    store.chaintxs.unsettle(row["txid"])
                store.chaintxs.settle(mined.txid, block_number=mined.block_number or 0, fee_paid=mined.fee_paid,
                                      ok=mined.success, error=mined.error)
        return Tracked("mined", mined, max(0, head - (mined.block_number or head) + 1))
    if any(t["status"] != "open" for t in live):
        with store.db.transaction():  # a reorg took the mined one away: all are candidates again
            store.chaintxs.unsettle(live[0]["txid"])
        log.warning("%s: transaction left the chain in a reorg; following it again", what)
    newest = live[-1]
    tx = store.chaintxs.signed(newest)
    # The node does not have the newest (never sent, or dropped after a node restart): the
    # newest supersedes the others, so it is the one to send again. If the node refuses it
    # (fees below what it accepts now), it is replaced below once it is stuck_after old.
    if statuses[-1].state == "unknown" and await broadcast(store, client, tx, what):
        return Tracked("pending")
    since = newest["broadcast_at"] or newest["created_at"]
    if resign is not None and store.clock.now_ms() - since > stuck_after * 1000:
        market = await client.fee_quote()
        fees = cap_fees(tx.fees.bumped(fee_bump_ppm, floor=market), max_fee)
        if fees.max_fee <= tx.fees.max_fee:
            log.warning("%s: %s is stuck but fees are at the cap (max_fee_per_gas); waiting", what, tx.txid)
            return Tracked("pending")
        new = await resign(fees)
        if new is not None:
            log.info("%s: %s stuck for %.0fs; replaced by %s (max fee %d -> %d)", what, tx.txid,
                     (store.clock.now_ms() - since) / 1000, new.txid, tx.fees.max_fee, fees.max_fee)
            await broadcast(store, client, new, what)
    return Tracked("pending")
