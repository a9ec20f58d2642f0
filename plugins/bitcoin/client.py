"""Reading a Bitcoin Core (or Litecoin Core) node over JSON-RPC: raw blocks, outputs matched
to watched scripts, one transaction, balances with ``scantxoutset``.

A transfer is ``(chain, txid, vout)``: every output to a watched address is its own transfer.
Blocks are read serialized (``getblock <hash> 0``, see :mod:`.rawblock`): the candidate
scripts of a part are looked up at once by match key (the output script, as bytes:
``BitcoinSpec.match_key``), and only a block holding a watched script is parsed in full.
Amounts are the serialized satoshis, exact; where the node's JSON is read instead (a
transaction the parser does not know), amounts are parsed as exact decimals.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import trio

from watcher.chains import (
    AddressFilter,
    Block,
    ChainClient,
    ChainContext,
    Mempool,
    Transfer,
    TxLookup,
    Unspent,
    key_prefixes,
    node_data,
    watched_keys,
)
from watcher.config import AssetConfig, NodeConfig
from watcher.errors import ChainMismatch, InconsistentData, NodeError, RpcError
from watcher.tasks import fan_out

from . import rawblock
from .address import from_script, to_script
from .family import BitcoinOptions

log = logging.getLogger(__name__)

COIN = 10**8
# Bitcoin Core's codes for "asking again gives the same answer": invalid address or no such
# transaction (-5), invalid parameter such as a height out of range (-8), wrong type (-3), and
# sendrawtransaction's refusals (-25 missing inputs, -26 rejected by policy, -27 already known),
# which the wallet classifies itself
FINAL_CODES = frozenset({-5, -8, -3, -25, -26, -27})
NO_BLOCK_YET = -8  # getblockhash above the tip
NO_SUCH_TX = -5
COINBASE_MATURITY = 100  # a coinbase output is spendable (and credited) 100 blocks deep
PART = 50  # blocks a request at most: a fetch's parts are parsed while the later ones download
# ...and about this much hex at most: a main network block is ~1.5 MB (3 MB of hex), up to
# 4 (8): parts of 50 would be answers of 150 MB, eight of them in flight
PART_HEX = 8 << 20
# hex a block is taken to hold before the node has sent any: main networks' size; regtest's
# (a test's or a benchmark's chain) a small one
FIRST_GUESS = {"regtest": 128 << 10}
FIRST_GUESS_OTHERS = 3 << 20
SMALL_CALLS = 2  # requests in flight beside the block parts (see BitcoinClient.__init__)
MEMPOOL_CHUNK = 500  # new mempool transactions read a batch


def sats(value: Any) -> int:
    """Coins as the node wrote them (an exact decimal: ``JsonRpc.call_exact``) to satoshis."""
    if not isinstance(value, int | Decimal) or isinstance(value, bool):
        raise TypeError(f"an exact amount of coins, not {type(value).__name__}")
    units = Decimal(value) * COIN
    if units != units.to_integral_value():
        raise ValueError(f"{value} coins is not a whole number of satoshis")
    return int(units)


def read_cookie(path: Path) -> tuple[str, str]:
    """``user:password`` of the ``.cookie`` file Bitcoin Core writes at each start."""
    user, _, password = path.read_text(encoding="ascii").strip().partition(":")
    return user, password


class BitcoinClient(ChainClient):
    def __init__(self, ctx: ChainContext, options: BitcoinOptions):
        if not rawblock.native():
            log.warning("%s: the C block scanner (watcher_bitcoin._rawscan) is not built: blocks are read in Python,"
                        " a catch-up takes more CPU (reinstall where a C compiler is present)", ctx.config.id,
                        extra={"chain": ctx.config.id})
        self.cfg = ctx.config
        self.opts = options
        self.network = options.network
        self.native = ctx.config.native.symbol
        self._pool: dict[str, tuple[Transfer, ...]] = {}  # mempool txid -> what it pays us
        # hex bytes a block, as the last parts were (see part_size)
        self._block_hex = FIRST_GUESS.get(options.network.node_chain, FIRST_GUESS_OTHERS)
        # the block parts take at most rpc_concurrency requests; the small calls (heads, hashes,
        # headers, the mempool) have two more of their own, so the next batch's hashes never
        # queue behind the parts already waiting (the node would run dry meanwhile)
        self._parts = trio.CapacityLimiter(options.rpc_concurrency)
        self.rpc = ctx.jsonrpc(concurrency=options.rpc_concurrency + SMALL_CALLS, max_batch=50,
                               final_codes=FINAL_CODES, credentials=self._credentials,
                               head_call=("getblockcount", ()), unhex=rawblock.unhex, lean_http=True)

    def _credentials(self, node: NodeConfig) -> Callable[[], tuple[str, str]] | None:
        """A node's own ``rpc_cookie_file`` ([[chains.nodes]]), else the chain's, else none
        (credentials in the URL, or none at all)."""
        cookie = node.options.get("rpc_cookie_file") or self.opts.rpc_cookie_file
        return None if cookie is None else lambda: read_cookie(cookie)

    async def aclose(self) -> None:
        await self.rpc.aclose()

    @node_data
    async def check(self) -> dict[str, Any]:
        info, net, genesis = await self.rpc.batch([("getblockchaininfo", ()), ("getnetworkinfo", ()),
                                                   ("getblockhash", (0,))])
        chain, agent = info["chain"], str(net.get("subversion", ""))
        coin = "LTC" if "litecoin" in agent.lower() else "BTC"
        if chain != self.network.node_chain or coin != self.network.symbol:
            raise ChainMismatch(f"{self.cfg.id}: the node at {self.cfg.node} serves {coin} {chain} ({agent}); "
                                f"config says network = {self.network.name!r}")
        return {"chain": chain, "genesis": genesis}

    @node_data
    async def head(self) -> int:
        return int(await self.rpc.call("getblockcount"))

    async def _hashes(self, numbers: list[int]) -> dict[int, str]:
        """Block hashes by height, leaving out heights the node does not have (yet)."""
        out: dict[int, str] = {}
        for n, r in zip(numbers, await self.rpc.batch_outcomes([("getblockhash", (n,)) for n in numbers]),
                        strict=True):
            if isinstance(r, RpcError) and r.rpc_code == NO_BLOCK_YET:
                continue
            if isinstance(r, Exception):
                raise r
            out[n] = str(r)
        return out

    @node_data
    async def block_hashes(self, numbers: list[int]) -> dict[int, tuple[str, str]]:
        hashes = await self._hashes(numbers)
        heights = sorted(hashes)
        headers = await self.rpc.batch([("getblockheader", (hashes[n],)) for n in heights])
        return {n: (hashes[n], h.get("previousblockhash", "0" * 64)) for n, h in zip(heights, headers, strict=True)}

    # --- scanning -------------------------------------------------------------------------

    @node_data
    async def fetch_blocks(self, start: int, end: int, watched: AddressFilter) -> list[Block]:
        # every hash first (small answers), then the blocks in parts, requested in order: the
        # node answers the first parts first, and each is read as it arrives (while the node
        # serves the later ones), so only the last part's work is left when the fetch ends
        hashes = await self._hashes(list(range(start, end + 1)))
        have = list(itertools.takewhile(lambda n: n in hashes, range(start, end + 1)))  # up to the first it lacks
        size = self.part_size()
        parts = [have[i:i + size] for i in range(0, len(have), size)]
        got: list[list[Block]] = [[] for _ in parts]
        async with fan_out() as nursery:
            for k, numbers in enumerate(parts):
                nursery.start_soon(self._fetch_part, numbers, hashes, watched, got[k])
        blocks = [b for part in got for b in part]
        for prev, b in itertools.pairwise(blocks):
            if b.parent_hash != prev.hash:
                raise InconsistentData(f"{self.cfg.id}: blocks changed while being fetched (reorg in progress)")
        return blocks

    def part_size(self) -> int:
        """Blocks a request of a fetch: up to PART, and about PART_HEX of hex, by the size of
        the blocks of the last parts (a larger one counts at once, smaller ones a quarter a
        part: a run of small blocks before a large one must not make a huge answer)."""
        return max(1, min(PART, PART_HEX // max(1, self._block_hex)))

    def _saw_blocks(self, raw: list[bytes]) -> None:
        hex_size = 2 * sum(len(b) for b in raw) // max(1, len(raw))
        self._block_hex = max(hex_size, self._block_hex - self._block_hex // 4)

    async def _fetch_part(self, numbers: list[int], hashes: dict[int, str], watched: AddressFilter,
                          into: list[Block]) -> None:
        """Blocks ``numbers`` (their ``hashes``) with their transfers. The watched set is read
        once the part is here: which shapes of script it holds (one range probe of the index
        each), then which of the part's candidate scripts it holds (one lookup for the part)."""
        async with self._parts:
            raw = await self.rpc.batch_hex([("getblock", (hashes[n], 0)) for n in numbers])
        self._saw_blocks(raw)
        shapes = key_prefixes(watched, rawblock.FINDERS)
        within = watched_keys(watched)  # (the filter still has the last word: hits below)
        heads = []
        for n, data in zip(numbers, raw, strict=True):
            head = rawblock.header(data)
            if head.hash != hashes[n]:
                raise NodeError(f"{self.cfg.id}: getblock {hashes[n]} answered block {head.hash}")
            heads.append(head)
        candidates = [rawblock.candidate_scripts(data, shapes, within) for data in raw]
        keys: set[bytes] = set().union(*candidates)
        hits = watched(keys) if keys else set()
        for n, data, head, found in zip(numbers, raw, heads, candidates, strict=True):
            mine = found & hits
            transfers = await self._transfers(data, head.hash, mine) if mine else ()
            into.append(Block(number=n, hash=head.hash, parent_hash=head.parent_hash, timestamp=head.timestamp,
                              transfers=transfers))

    async def _transfers(self, data: bytes, block_hash: str, keys: set[bytes]) -> tuple[Transfer, ...]:
        """The transfers of one raw block to the watched scripts ``keys``."""
        try:
            outputs = rawblock.outputs_to(data, keys)
        except rawblock.Unsupported:  # e.g. Litecoin's MWEB: the node decodes it for us
            return await self._verbose_transfers(block_hash, keys)
        found = [self._transfer(o) for o in outputs if o.value > 0]
        return tuple(sorted(found, key=lambda t: (t.txid, t.index)))

    def _transfer(self, o: rawblock.Output) -> Transfer:
        to = from_script(self.network, o.script)
        if to is None:  # only scripts of watched addresses get here, and those are standard
            raise ValueError(f"output {o.txid}:{o.vout} pays no standard address")
        return Transfer(txid=o.txid, index=o.vout, kind="native", asset=self.native, to=to, sender="",
                        amount=o.value, min_depth=COINBASE_MATURITY if o.coinbase else 0)

    async def _verbose_transfers(self, block_hash: str, keys: set[bytes] | None, *, txid: str | None = None,
                                 watched: AddressFilter | None = None) -> tuple[Transfer, ...]:
        """The same from the node's own decoding of the block (exact amounts): the outputs
        paying ``keys``, or those of transaction ``txid`` that ``watched`` says yes to."""
        block = await self.rpc.call_exact("getblock", block_hash, 2)
        outputs = [rawblock.Output(txid=tx["txid"], vout=out["n"], value=sats(out["value"]),
                                   script=bytes.fromhex(out["scriptPubKey"]["hex"]), coinbase=n == 0)
                   for n, tx in enumerate(block["tx"]) if txid is None or tx["txid"] == txid for out in tx["vout"]]
        if keys is None:
            assert watched is not None
            keys = watched({o.script for o in outputs})
        found = [self._transfer(o) for o in outputs if o.script in keys and o.value > 0]
        return tuple(sorted(found, key=lambda t: (t.txid, t.index)))

    # --- the mempool -----------------------------------------------------------------------

    @node_data
    async def mempool(self, watched: AddressFilter) -> Mempool | None:
        """The node's mempool: each transaction is read once (``getrawtransaction``, new
        txids only) and what it pays watched scripts is kept while it stays there, so a poll
        costs one ``getrawmempool`` and the new arrivals. The height is read after the list."""
        if not self.opts.mempool:
            return None
        txids: list[str] = await self.rpc.call("getrawmempool")
        height = int(await self.rpc.call("getblockcount"))
        now = frozenset(txids)
        for gone in self._pool.keys() - now:
            del self._pool[gone]
        new = [t for t in txids if t not in self._pool]
        for i in range(0, len(new), MEMPOOL_CHUNK):
            part = new[i:i + MEMPOOL_CHUNK]
            answers = await self.rpc.batch_outcomes([("getrawtransaction", (t, False)) for t in part], decode="hex")
            outputs: dict[str, list[rawblock.Output]] = {}
            for txid, r in zip(part, answers, strict=True):
                if isinstance(r, RpcError) and r.rpc_code == NO_SUCH_TX:
                    continue  # mined or evicted since the list: the next poll knows
                if isinstance(r, Exception):
                    raise r
                try:
                    outputs[txid] = rawblock.tx_outputs(r)
                except rawblock.Unsupported:  # an MWEB transaction: nothing standard to us
                    outputs[txid] = []
            hits = watched({o.script for outs in outputs.values() for o in outs})
            for txid, outs in outputs.items():
                self._pool[txid] = tuple(self._transfer(o) for o in outs if o.value > 0 and o.script in hits)
        transfers = tuple(t for found in self._pool.values() for t in found)
        return Mempool(transfers=transfers, txids=now, height=height)

    # --- one transaction (submit-tx) --------------------------------------------------------

    @node_data
    async def lookup_tx(self, txid: str, watched: AddressFilter) -> TxLookup:
        try:
            tx = await self.rpc.call("getrawtransaction", txid, True)
        except RpcError as e:
            if e.rpc_code == NO_SUCH_TX:
                return TxLookup(txid=txid, status="unknown")
            raise
        if not tx.get("blockhash") or not tx.get("confirmations"):
            return TxLookup(txid=txid, status="pending")
        header = await self.rpc.call("getblockheader", tx["blockhash"])
        if header.get("confirmations", -1) < 0:
            return TxLookup(txid=txid, status="pending")  # in a block that left the chain
        try:
            outputs = rawblock.tx_outputs(bytes.fromhex(tx["hex"]))
        except rawblock.Unsupported:
            transfers = await self._verbose_transfers(tx["blockhash"], None, txid=txid, watched=watched)
        else:
            hits = watched({o.script for o in outputs})
            transfers = tuple(self._transfer(o) for o in outputs if o.script in hits and o.value > 0)
        block = Block(number=header["height"], hash=header["hash"],
                      parent_hash=header.get("previousblockhash", "0" * 64), timestamp=int(header["time"]),
                      transfers=transfers)
        return TxLookup(txid=txid, status="included", block=block)

    # --- balances ---------------------------------------------------------------------------

    @node_data
    async def unspent(self, addresses: Sequence[str]) -> list[Unspent] | None:
        """One ``scantxoutset`` for every address (a scan of the whole UTXO set: seconds on a
        main network, whatever the number of addresses)."""
        if not addresses:
            return []
        by_script = {to_script(self.network, a).hex(): a for a in addresses}
        result = await self.rpc.call_exact("scantxoutset", "start", [f"addr({a})" for a in addresses])
        return [Unspent(address=by_script[u["scriptPubKey"]], txid=u["txid"], index=int(u["vout"]),
                        amount=sats(u["amount"]), height=int(u["height"]))
                for u in result["unspents"] if u["scriptPubKey"] in by_script]

    @node_data
    async def balance(self, address: str, asset: AssetConfig, block: int | None = None) -> int:
        """What ``address`` holds now, from a scan of the node's UTXO set (``scantxoutset``:
        seconds on a main network; one scan at a time per node). A past block cannot be
        asked."""
        if block is not None:
            raise NodeError(f"{self.cfg.id}: a Bitcoin node tells balances at its tip only", retryable=False)
        result = await self.rpc.call_exact("scantxoutset", "start", [f"addr({address})"])
        return sats(result["total_amount"])

