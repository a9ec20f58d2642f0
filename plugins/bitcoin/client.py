"""Reading a Bitcoin Core (or Litecoin Core) node over JSON-RPC: blocks with verbosity 2,
outputs matched to watched addresses, one transaction, balances with ``scantxoutset``.

A transfer is ``(chain, txid, vout)``: every output to a watched address is its own transfer.
Amounts arrive as JSON numbers of coins; they are turned into satoshis exactly (a number
below 10 million coins has at most 15 significant digits, which a double keeps; a block with a
larger output is fetched again with exact decimals).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from watcher.chains import (
    AddressFilter,
    Block,
    ChainClient,
    ChainContext,
    Transfer,
    TxLookup,
    node_data,
)
from watcher.config import AssetConfig
from watcher.errors import ChainMismatch, InconsistentData, NodeError, RpcError

from .address import from_script
from .family import BitcoinOptions

COIN = 10**8
# Bitcoin Core's codes for "asking again gives the same answer": invalid address or no such
# transaction (-5), invalid parameter such as a height out of range (-8), wrong type (-3)
FINAL_CODES = frozenset({-5, -8, -3})
NO_BLOCK_YET = -8  # getblockhash above the tip
NO_SUCH_TX = -5
_STANDARD = frozenset({"pubkeyhash", "scripthash", "witness_v0_keyhash", "witness_v0_scripthash",
                       "witness_v1_taproot"})
_EXACT_BELOW = 10**7  # coins: a float of fewer whole digits holds the 8 decimals exactly

P = ParamSpec("P")
T = TypeVar("T")


class _Inexact(Exception):
    """An amount too large for a float to hold to the satoshi."""


def sats(value: Any) -> int:
    """Coins as the node wrote them (a JSON number) to satoshis, exactly."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise TypeError(f"an amount of coins, not {type(value).__name__}")
    if isinstance(value, float):
        if not abs(value) < _EXACT_BELOW:
            raise _Inexact
        value = Decimal(repr(value))
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
        self.cfg = ctx.config
        self.opts = options
        self.network = options.network
        self.native = ctx.config.native.symbol
        cookie = options.rpc_cookie_file
        self.rpc = ctx.jsonrpc(concurrency=4, max_batch=50, final_codes=FINAL_CODES,
                               credentials=None if cookie is None else lambda: read_cookie(cookie))

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
        hashes = await self._hashes(list(range(start, end + 1)))
        prefix = []
        for n in range(start, end + 1):  # the blocks the node has, up to the first it lacks
            if n not in hashes:
                break
            prefix.append(hashes[n])
        if not prefix:
            return []
        raw: list[dict[str, Any]] = await self.rpc.batch([("getblock", (h, 2)) for h in prefix])
        for i, b in enumerate(raw):
            if b["hash"] != prefix[i] or b["height"] != start + i or (
                    i and b.get("previousblockhash") != raw[i - 1]["hash"]):
                raise InconsistentData(f"{self.cfg.id}: blocks changed while being fetched (reorg in progress)")
        outputs: list[tuple[int, str, int, str, Any]] = []  # (block index, txid, vout, address, value)
        for i, b in enumerate(raw):
            for tx in b["tx"]:
                if "coinbase" in tx["vin"][0]:
                    continue  # coinbase outputs are not credited (they mature after 100 blocks)
                for out in tx["vout"]:
                    address = self._address(out["scriptPubKey"])
                    if address is not None:
                        outputs.append((i, tx["txid"], out["n"], address, out["value"]))
        hits = watched({o[3] for o in outputs}) if outputs else set()
        found: list[list[Transfer]] = [[] for _ in raw]
        for i, txid, vout, address, value in outputs:
            if address in hits:
                try:
                    amount = sats(value)
                except _Inexact:  # an output of 10 million coins or more: read that block exactly
                    amount = await self._exact_value(prefix[i], txid, vout)
                if amount > 0:
                    found[i].append(Transfer(txid=txid, index=vout, kind="native", asset=self.native, to=address,
                                             sender="", amount=amount))
        return [Block(number=b["height"], hash=b["hash"], parent_hash=b.get("previousblockhash", "0" * 64),
                      timestamp=int(b["time"]), transfers=tuple(sorted(found[i], key=lambda t: (t.txid, t.index))))
                for i, b in enumerate(raw)]

    def _address(self, spk: dict[str, Any]) -> str | None:
        """The canonical address of a standard single-key/script output, or None. The node's
        own string is used where it is already canonical (bech32; base58 but an old-style
        Litecoin P2SH), else it is rebuilt from the script."""
        if spk.get("type") not in _STANDARD:
            return None
        node = spk.get("address") or (spk.get("addresses") or [None])[0]
        if isinstance(node, str) and (node.startswith(self.network.hrp + "1") or spk["type"] != "scripthash"):
            return node
        return from_script(self.network, bytes.fromhex(spk["hex"]))

    async def _exact_value(self, block_hash: str, txid: str, vout: int) -> int:
        block = await self.rpc.call_exact("getblock", block_hash, 2)
        tx = next(t for t in block["tx"] if t["txid"] == txid)
        return sats(tx["vout"][vout]["value"])

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
        candidates = [(out["n"], self._address(out["scriptPubKey"]), out["value"]) for out in tx["vout"]]
        hits = watched({a for _, a, _ in candidates if a})
        transfers = tuple(Transfer(txid=txid, index=n, kind="native", asset=self.native, to=a, sender="",
                                   amount=sats(v)) for n, a, v in candidates if a in hits and sats(v) > 0)
        block = Block(number=header["height"], hash=header["hash"],
                      parent_hash=header.get("previousblockhash", "0" * 64), timestamp=int(header["time"]),
                      transfers=transfers)
        return TxLookup(txid=txid, status="included", block=block)

    # --- balances ---------------------------------------------------------------------------

    @node_data
    async def balance(self, address: str, asset: AssetConfig, block: int | None = None) -> int:
        """What ``address`` holds now, from a scan of the node's UTXO set (``scantxoutset``:
        seconds on a main network; one scan at a time per node). A past block cannot be
        asked."""
        if block is not None:
            raise NodeError(f"{self.cfg.id}: a Bitcoin node tells balances at its tip only", retryable=False)
        result = await self.rpc.call_exact("scantxoutset", "start", [f"addr({address})"])
        return sats(result["total_amount"])

