"""Reading an EVM chain over JSON-RPC: blocks, native and ERC-20 transfers, internal
transfers from ``trace_block``.

What is credited:
- native: a transaction with value > 0 to a watched address whose receipt has status 1;
- ERC-20: a ``Transfer(address,address,uint256)`` log of a configured token contract with a
  non-zero amount to a watched address (logs exist only for successful transactions);
- internal (``trace_internal = true``): a ``call`` (not delegate/static) with value, a
  ``create`` with value or a ``suicide`` refund to a watched address, inside a successful
  transaction and under no reverted frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import trio

from watcher.chains import AddressFilter, Block, ChainClient, ChainContext, Transfer, TxLookup
from watcher.errors import ChainMismatch, InconsistentData, NodeError, RpcError
from watcher.jsonrpc import TOO_LARGE_RPC_CODES

from .family import EvmOptions

TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
_MAX_TRACE_INDEX = 10**6


def _int(x: str | None) -> int:
    return int(x, 16) if x else 0


def _addr_from_topic(topic: str) -> str:
    return "0x" + topic[-40:].lower()


class EvmClient(ChainClient):
    def __init__(self, ctx: ChainContext):
        self.ctx = ctx
        self.cfg = ctx.config
        self.opts: EvmOptions = ctx.config.options or EvmOptions()
        self.rpc = ctx.jsonrpc(concurrency=self.opts.rpc_concurrency, max_batch=self.opts.rpc_batch_size)
        self.tokens = {a.contract: a for a in self.cfg.tokens}
        self.native = self.cfg.native.symbol
        self.chain_id: int | None = None
        self._logs_range = self.opts.logs_block_range

    async def aclose(self) -> None:
        await self.rpc.aclose()

    async def check(self) -> dict[str, Any]:
        chain_id = _int(await self.rpc.call("eth_chainId"))
        if self.opts.chain_id is not None and chain_id != self.opts.chain_id:
            raise ChainMismatch(
                f"{self.cfg.id}: node at {self.cfg.rpc_url} serves chain id {chain_id}, config says chain_id = {self.opts.chain_id}")
        self.chain_id = chain_id
        return {"chain_id": chain_id}

    async def head(self) -> int:
        return _int(await self.rpc.call("eth_blockNumber"))

    async def block_hashes(self, numbers: list[int]) -> dict[int, tuple[str, str]]:
        results = await self.rpc.batch([("eth_getBlockByNumber", (hex(n), False)) for n in numbers])
        return {n: (b["hash"], b["parentHash"]) for n, b in zip(numbers, results, strict=True) if b}

    # --- scanning ------------------------------------------------------------------------

    async def fetch_blocks(self, start: int, end: int, watched: AddressFilter) -> list[Block]:
        raw_blocks: list[dict[str, Any]] = []
        logs: list[dict[str, Any]] = []
        traces: dict[int, list[dict[str, Any]]] = {}

        async def get_blocks() -> None:
            results = await self.rpc.batch(
                [("eth_getBlockByNumber", (hex(n), True)) for n in range(start, end + 1)])
            for b in results:
                if not b:
                    break  # the node does not have it (yet): return the prefix we have
                raw_blocks.append(b)

        async def get_logs() -> None:
            if self.tokens:
                logs.extend(await self._logs(start, end))

        async def get_traces() -> None:
            if self.opts.trace_internal:
                nums = list(range(start, end + 1))
                results = await self.rpc.batch_outcomes([("trace_block", (hex(n),)) for n in nums])
                for n, r in zip(nums, results, strict=True):
                    if isinstance(r, Exception):
                        raise r
                    traces[n] = r or []

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_blocks)
            nursery.start_soon(get_logs)
            nursery.start_soon(get_traces)

        if not raw_blocks:
            return []
        by_number = {_int(b["number"]): b for b in raw_blocks}
        for i in range(1, len(raw_blocks)):
            if raw_blocks[i]["parentHash"] != raw_blocks[i - 1]["hash"]:
                raise InconsistentData(f"{self.cfg.id}: blocks changed while being fetched (reorg in progress)")

        # 1. candidates: every recipient, asked to the core's watched-address index at once
        native_cands: list[tuple[int, dict[str, Any]]] = []
        token_cands: list[dict[str, Any]] = []
        internal_cands: list[tuple[int, Transfer]] = []
        recipients: set[str] = set()
        for b in raw_blocks:
            number = _int(b["number"])
            for tx in b["transactions"]:
                if tx.get("to") and _int(tx.get("value")) > 0:
                    native_cands.append((number, tx))
                    recipients.add(tx["to"].lower())
        for log in logs:
            number = _int(log["blockNumber"])
            block = by_number.get(number)
            if block is None:
                continue  # beyond the blocks the node gave us; scanned next time
            if log.get("removed") or log["blockHash"] != block["hash"]:
                raise InconsistentData(f"{self.cfg.id}: log of block {number} is from another fork")
            topics = log.get("topics") or []
            if len(topics) != 3 or topics[0] != TRANSFER_TOPIC or len(log.get("data", "")) != 66:
                continue  # not an ERC-20 Transfer (ERC-721 indexes the id: 4 topics)
            if _int(log["data"]) == 0:
                continue
            token_cands.append(log)
            recipients.add(_addr_from_topic(topics[2]))
        for number, block_traces in traces.items():
            if number in by_number:
                for t in self._internal_transfers(block_traces, by_number[number]["hash"]):
                    internal_cands.append((number, t))
                    recipients.add(t.to)

        hits = watched(recipients) if recipients else set()
        if not hits:
            return [self._block(b, []) for b in raw_blocks]

        found: dict[int, list[Transfer]] = {n: [] for n in by_number}
        # 2. native: only successful transactions count
        native_hits = [(n, tx) for n, tx in native_cands if tx["to"].lower() in hits]
        if native_hits:
            receipts = await self.rpc.batch([("eth_getTransactionReceipt", (tx["hash"],)) for _, tx in native_hits])
            for (n, tx), rc in zip(native_hits, receipts, strict=True):
                if rc is None or rc["blockHash"] != by_number[n]["hash"]:
                    raise InconsistentData(f"{self.cfg.id}: receipt of {tx['hash']} is not in block {n} we fetched")
                if _int(rc.get("status")) != 1:
                    continue
                found[n].append(Transfer(txid=tx["hash"], index=-1, kind="native", asset=self.native,
                                         to=tx["to"].lower(), sender=tx["from"].lower(), amount=_int(tx["value"])))
        # 3. tokens
        for log in token_cands:
            to = _addr_from_topic(log["topics"][2])
            if to in hits:
                token = self.tokens[log["address"].lower()]
                found[_int(log["blockNumber"])].append(Transfer(
                    txid=log["transactionHash"], index=_int(log["logIndex"]), kind="token", asset=token.symbol,
                    to=to, sender=_addr_from_topic(log["topics"][1]), amount=_int(log["data"])))
        # 4. internal
        for n, t in internal_cands:
            if t.to in hits:
                found[n].append(t)
        return [self._block(b, found[_int(b["number"])]) for b in raw_blocks]

    def _block(self, b: dict[str, Any], transfers: list[Transfer]) -> Block:
        transfers.sort(key=lambda t: (t.txid, t.index))
        return Block(number=_int(b["number"]), hash=b["hash"], parent_hash=b["parentHash"],
                     timestamp=_int(b["timestamp"]), transfers=tuple(transfers))

    async def _logs(self, start: int, end: int) -> list[dict[str, Any]]:
        """eth_getLogs over [start, end] for the configured tokens, splitting the range when
        the node refuses it as too large (and remembering the width that worked)."""
        out: list[dict[str, Any]] = []
        lo = start
        while lo <= end:
            hi = min(end, lo + self._logs_range - 1)
            flt = {"fromBlock": hex(lo), "toBlock": hex(hi), "address": list(self.tokens),
                   "topics": [TRANSFER_TOPIC]}
            try:
                out.extend(await self.rpc.call("eth_getLogs", flt))
            except RpcError as e:
                if hi > lo and (e.rpc_code in TOO_LARGE_RPC_CODES or "range" in e.message.lower()
                                or "too many" in e.message.lower() or "limit" in e.message.lower()):
                    self._logs_range = max(1, (hi - lo + 1) // 2)
                    continue
                raise
            lo = hi + 1
        return out

    def _internal_transfers(self, block_traces: Iterable[dict[str, Any]], block_hash: str) -> list[Transfer]:
        """Value transfers below the top-level call, in successful frames only."""
        by_tx: dict[str, list[dict[str, Any]]] = {}
        for tr in block_traces:
            if tr.get("transactionHash") and tr.get("blockHash", block_hash) == block_hash:
                by_tx.setdefault(tr["transactionHash"], []).append(tr)
        out: list[Transfer] = []
        for txid, frames in by_tx.items():
            failed = [tuple(f.get("traceAddress") or ()) for f in frames if f.get("error")]
            for pos, f in enumerate(frames):
                path = tuple(f.get("traceAddress") or ())
                if not path:
                    continue  # the top-level call is the transaction's own value (native)
                if any(path[:len(p)] == p for p in failed):
                    continue  # this frame or one of its parents reverted
                action = f.get("action") or {}
                kind = f.get("type")
                if kind == "call" and action.get("callType", "call") == "call":
                    to, value = action.get("to"), _int(action.get("value"))
                elif kind == "create":
                    to, value = (f.get("result") or {}).get("address"), _int(action.get("value"))
                elif kind in ("suicide", "selfdestruct"):
                    to, value = action.get("refundAddress"), _int(action.get("balance"))
                else:
                    continue
                if not to or value <= 0:
                    continue
                sender = action.get("from") or action.get("address") or ""
                out.append(Transfer(txid=txid, index=-(2 + min(pos, _MAX_TRACE_INDEX)), kind="internal",
                                    asset=self.native, to=to.lower(), sender=sender.lower(), amount=value))
        return out

    # --- one transaction (submit-tx) --------------------------------------------------------

    async def lookup_tx(self, txid: str, watched: AddressFilter) -> TxLookup:
        tx, rc = await self.rpc.batch([("eth_getTransactionByHash", (txid,)), ("eth_getTransactionReceipt", (txid,))])
        if tx is None:
            return TxLookup(txid=txid, status="unknown")
        if tx.get("blockNumber") is None or rc is None:
            return TxLookup(txid=txid, status="pending")
        if _int(rc.get("status")) != 1:
            return TxLookup(txid=txid, status="failed")
        number = _int(rc["blockNumber"])
        header = await self.rpc.call("eth_getBlockByNumber", hex(number), False)
        if header is None or header["hash"] != rc["blockHash"]:
            return TxLookup(txid=txid, status="pending")  # being reorganised: look again later
        transfers: list[Transfer] = []
        if tx.get("to") and _int(tx.get("value")) > 0:
            transfers.append(Transfer(txid=txid, index=-1, kind="native", asset=self.native,
                                      to=tx["to"].lower(), sender=tx["from"].lower(), amount=_int(tx["value"])))
        for log in rc.get("logs") or []:
            topics = log.get("topics") or []
            token = self.tokens.get((log.get("address") or "").lower())
            if token and len(topics) == 3 and topics[0] == TRANSFER_TOPIC and len(log.get("data", "")) == 66 \
                    and _int(log["data"]) > 0:
                transfers.append(Transfer(txid=txid, index=_int(log["logIndex"]), kind="token", asset=token.symbol,
                                          to=_addr_from_topic(topics[2]), sender=_addr_from_topic(topics[1]),
                                          amount=_int(log["data"])))
        if self.opts.trace_internal:
            try:
                frames = await self.rpc.call("trace_transaction", txid)
            except NodeError:
                frames = []
            transfers.extend(self._internal_transfers(frames or [], header["hash"]))
        hits = watched({t.to for t in transfers})
        block = Block(number=number, hash=header["hash"], parent_hash=header["parentHash"],
                      timestamp=_int(header["timestamp"]), transfers=tuple(t for t in transfers if t.to in hits))
        return TxLookup(txid=txid, status="included", block=block)
