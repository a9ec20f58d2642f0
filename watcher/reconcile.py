"""``watcher reconcile``: does the chain hold what the database says it should?

For every derived address that ever received something, and every asset, at the confirmed
block B (the scanned tip less the confirmations, so nothing in flight blurs it):

    expected = confirmed deposits
             + what watcher's own transactions brought in (top-ups from the hot wallet)
             - what watcher's own transactions sent out - the fees this address paid (native coin)

and the on-chain balance at B must equal it. On a UTXO chain (the client answers
``unspent``), output by output instead: the confirmed deposits no confirmed sweep spent must
be exactly the address's unspent outputs up to B. Addresses with a sweep under way are skipped
(reported as such). A difference means money arrived that watcher did not record (e.g.
internal transfers with ``trace_internal`` off, or deposits before ``start_block``) or left
without watcher (someone else holds the key): either needs an operator.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import trio

from .errors import NodeError
from .money import format_amount
from .tasks import fan_out

if TYPE_CHECKING:
    from .chains import ChainClient
    from .config import ChainConfig
    from .core import Core


@dataclass
class Line:
    chain: str
    address: str
    asset: str
    expected: str
    actual: str | None
    difference: str | None
    status: str  # 'ok', 'mismatch', 'in_flight', 'node_error'
    label: str | None = None


def _expected(core: Core, chain: str, block: int) -> dict[tuple[str, str], int]:
    """(address, asset) -> base units the database says the address holds at ``block``."""
    store = core.store
    native = store.chain_config(chain).native.symbol
    exp: dict[tuple[str, str], int] = defaultdict(int)
    for address, asset, amount in store.transfers.confirmed_deposits(chain, upto=block):
        exp[(address, asset)] += amount
    # what watcher itself moved (top-ups in; sweeps out, and the fees the address paid for
    # them: a reverted transaction still pays its fee), for our derived addresses
    settled = store.chaintxs.settled_upto(chain, block)
    ours = store.addresses.derived_among(chain, {a for t in settled for a in (t.sender, t.to)})
    for t in settled:
        if t.to in ours and t.status == "mined":
            exp[(t.to, t.asset)] += t.amount
        if t.sender in ours:
            if t.fee_paid is not None:
                exp[(t.sender, native)] -= t.fee_paid
            if t.status == "mined":
                exp[(t.sender, t.asset)] -= t.amount
    return exp


async def _chain_lines(core: Core, cfg: ChainConfig) -> list[Line]:
    store = core.store
    cid = cfg.id
    block = store.chains.scanned_number(cid) - cfg.confirmations + 1
    if block < 0:
        return []
    expected = _expected(core, cid, block)
    busy = store.sweeps.busy_addresses(cid)
    lines: list[Line] = []
    async with core.open_client(cid) as client:
        utxo = await _utxo_lines(core, cfg, client, block, busy)
        if utxo is not None:
            return utxo
        for (address, symbol), units in sorted(expected.items()):
            asset = cfg.asset(symbol)
            if asset is None:
                continue
            watched = store.addresses.get(cid, address)
            label = watched.label if watched else None
            shown = cfg.spec.display_address(address)
            exp_s = format_amount(units, asset.decimals)
            if address in busy:
                lines.append(Line(cid, shown, symbol, exp_s, None, None, "in_flight", label))
                continue
            try:
                actual = await client.balance(address, asset, block=block)
            except NodeError as e:
                lines.append(Line(cid, shown, symbol, exp_s, None, e.message, "node_error", label))
                continue
            diff = actual - units
            lines.append(Line(cid, shown, symbol, exp_s, format_amount(actual, asset.decimals),
                              format_amount(diff, asset.decimals), "ok" if diff == 0 else "mismatch", label))
    return lines


async def _utxo_lines(core: Core, cfg: ChainConfig, client: ChainClient, block: int,
                      busy: set[str]) -> list[Line] | None:
    """A UTXO chain, output by output: the confirmed deposits (at ``block``) no confirmed
    sweep spent must be exactly the unspent outputs the node's UTXO set holds at each
    address, up to ``block``. None for an account chain."""
    store = core.store
    cid = cfg.id
    expected: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)
    for t in store.transfers.unswept_upto(cid, block):
        expected[t.address][(t.txid, t.index)] = t.amount
    unspent = await client.unspent(sorted(expected))
    if unspent is None:
        return None
    actual: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)
    for u in unspent:
        if u.height <= block:
            actual[u.address][(u.txid, u.index)] = u.amount
    asset = cfg.native
    lines = []
    for address in sorted(expected):
        watched = store.addresses.get(cid, address)
        label = watched.label if watched else None
        shown = cfg.spec.display_address(address)
        want, have = sum(expected[address].values()), sum(actual[address].values())
        exp_s = format_amount(want, asset.decimals)
        if address in busy:
            lines.append(Line(cid, shown, asset.symbol, exp_s, None, None, "in_flight", label))
            continue
        same = expected[address] == actual[address]
        lines.append(Line(cid, shown, asset.symbol, exp_s, format_amount(have, asset.decimals),
                          format_amount(have - want, asset.decimals), "ok" if same else "mismatch", label))
    return lines


def reconcile(core: Core) -> list[Line]:
    async def run() -> list[Line]:
        out: list[Line] = []

        async def one(cfg: ChainConfig) -> None:
            try:
                with trio.fail_after(300):
                    out.extend(await _chain_lines(core, cfg))
            except (NodeError, trio.TooSlowError) as e:
                out.append(Line(cfg.id, "*", "*", "", None, getattr(e, "message", "timed out"), "node_error"))

        async with fan_out() as nursery:
            for cfg in core.config.chains:
                nursery.start_soon(one, cfg)
        return sorted(out, key=lambda line: (line.chain, line.address, line.asset))

    return trio.run(run)


def as_json(lines: list[Line]) -> list[dict[str, Any]]:
    return [asdict(line) for line in lines]
