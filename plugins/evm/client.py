"""Reading an EVM chain over JSON-RPC: blocks, native and ERC-20 transfers, internal
transfers from ``trace_block``. A token-only chain (``watch_native = false``) fetches block
headers (for the hash chain) and ``Transfer`` logs only, never full blocks.

What is credited:
- native: a transaction with value > 0 to a watched address whose receipt has status 1;
- ERC-20: a ``Transfer(address,address,uint256)`` log of a configured token contract with a
  non-zero amount to a watched address (logs exist only for successful transactions);
- internal (``trace_internal = true``): a ``call`` (not delegate/static) with value, a
  ``create`` with value or a ``suicide`` refund to a watched address, inside a successful
  transaction and under no reverted frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import orjson
import trio
from eth_utils import keccak

from watcher.chains import (
    AddressFilter,
    Block,
    BroadcastRejected,
    ChainClient,
    ChainContext,
    SignedTx,
    Transfer,
    TxLookup,
    TxStatus,
    node_data,
)
from watcher.config import AssetConfig
from watcher.errors import ChainMismatch, InconsistentData, NodeError, RpcError
from watcher.jsonrpc import TOO_LARGE_RPC_CODES
from watcher.tasks import fan_out

from .erc20 import (
    TRANSFER_TOPIC,
    balance_of_calldata,
    decode_uint,
    match_transfer,
    transfer_calldata,
)
from .family import EvmOptions
from .fees import FeeQuote
from .send import NATIVE_TRANSFER_GAS

GWEI = 10**9
# eth_sendRawTransaction answers that mean "the node already has exactly this transaction"
_ALREADY_KNOWN = ("already known", "known transaction", "already imported", "alreadyknown")

_MAX_TRACE_INDEX = 10**6
_LOGS_RANGE_PROBE_EVERY = 32  # eth_getLogs calls between tries of the full range after a split


_T = TypeVar("_T")
_P = ParamSpec("_P")




def _int(x: str | None) -> int:
    return int(x, 16) if x else 0


def _bloom_bits(item: bytes) -> tuple[tuple[int, int], ...]:
    """The three (byte index, mask) pairs that ``item`` sets in a 2048-bit logs bloom."""
    h = keccak(item)
    bits = (((h[i] << 8) | h[i + 1]) & 2047 for i in (0, 2, 4))
    return tuple((255 - b // 8, 1 << (b % 8)) for b in bits)


def _bloom_has(bloom: bytes, bits: tuple[tuple[int, int], ...]) -> bool:
    return all(bloom[i] & mask for i, mask in bits)


_TRANSFER_BITS = _bloom_bits(bytes.fromhex(TRANSFER_TOPIC[2:]))


class EvmClient(ChainClient):
    def __init__(self, ctx: ChainContext, options: EvmOptions):
        self.ctx = ctx
        self.cfg = ctx.config
        self.opts = options
        self.rpc = ctx.jsonrpc(concurrency=self.opts.rpc_concurrency, max_batch=self.opts.rpc_batch_size,
                               head_call=("eth_blockNumber", ()))
        self.tokens = {a.contract: a for a in self.cfg.tokens if a.contract is not None}
        self._token_bits = [_bloom_bits(bytes.fromhex(c[2:])) for c in self.tokens]
        self.native = self.cfg.native.symbol
        self.chain_id: int | None = None
        self._logs_range = self.opts.logs_block_range
        self._logs_calls = 0

    async def aclose(self) -> None:
        await self.rpc.aclose()

    async def subscribe_heads(self, ws_url: str, on_head: Callable[[int], None], *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """``eth_subscribe("newHeads")`` over a WebSocket (trio-websocket): ``on_head(number)``
        for every head the node pushes, until the connection drops (then ``NodeError``)."""
        from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

        cid = self.cfg.id
        timeout = self.cfg.rpc_timeout
        try:
            async with open_websocket_url(ws_url, connect_timeout=timeout, disconnect_timeout=1.0,
                                          max_message_size=1 << 20) as ws:
                await ws.send_message(orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe",
                                                    "params": ["newHeads"]}).decode())
                with trio.fail_after(timeout):
                    reply = orjson.loads(await ws.get_message())
                subscription = reply.get("result") if isinstance(reply, dict) else None
                if not isinstance(subscription, str):
                    raise NodeError(f"{cid}: eth_subscribe newHeads was refused: {str(reply)[:200]}")
                task_status.started()
                while True:
                    msg = orjson.loads(await ws.get_message())
                    params = msg.get("params") if isinstance(msg, dict) else None
                    if isinstance(params, dict) and params.get("subscription") == subscription:
                        head = params.get("result")
                        if isinstance(head, dict) and isinstance(head.get("number"), str):
                            on_head(int(head["number"], 16))
        except (ConnectionClosed, HandshakeError, OSError, trio.TooSlowError) as e:
            raise NodeError(f"{cid}: head subscription: {type(e).__name__}") from None
        except (orjson.JSONDecodeError, ValueError) as e:
            raise NodeError(f"{cid}: head subscription: the node sent something that is not JSON-RPC ({e})") from None

    @node_data
    async def check(self) -> dict[str, Any]:
        chain_id = _int(await self.rpc.call("eth_chainId"))
        if self.opts.chain_id is not None and chain_id != self.opts.chain_id:
            raise ChainMismatch(
                f"{self.cfg.id}: node at {self.cfg.node} serves chain id {chain_id}, config says chain_id = {self.opts.chain_id}")
        self.chain_id = chain_id
        return {"chain_id": chain_id}

    @node_data
    async def head(self) -> int:
        return _int(await self.rpc.call("eth_blockNumber"))

    @node_data
    async def block_hashes(self, numbers: list[int]) -> dict[int, tuple[str, str]]:
        results = await self.rpc.batch([("eth_getBlockByNumber", (hex(n), False)) for n in numbers])
        return {n: (b["hash"], b["parentHash"]) for n, b in zip(numbers, results, strict=True) if b}

    # --- scanning ------------------------------------------------------------------------

    @node_data
    async def fetch_blocks(self, start: int, end: int, watched: AddressFilter) -> list[Block]:
        raw_blocks: list[dict[str, Any]] = []
        logs: list[dict[str, Any]] = []
        traces: dict[int, list[dict[str, Any]]] = {}

        full = self.opts.watch_native  # a token-only chain needs headers only

        async def get_blocks() -> None:
            results = await self.rpc.batch(
                [("eth_getBlockByNumber", (hex(n), full)) for n in range(start, end + 1)])
            for b in results:
                if not b:
                    break  # the node does not have it (yet): return the prefix we have
                raw_blocks.append(b)

        async def get_logs() -> None:
            if self.tokens:
                logs.extend(await self._logs(start, end))

        async def get_traces() -> None:
            if self.opts.trace_internal and full:
                nums = list(range(start, end + 1))
                results = await self.rpc.batch_outcomes([("trace_block", (hex(n),)) for n in nums])
                for n, r in zip(nums, results, strict=True):
                    if isinstance(r, Exception):
                        raise r
                    if r is None:  # a replica without the block yet (blocks may come from another)
                        raise InconsistentData(f"{self.cfg.id}: the node has no trace of block {n} yet")
                    traces[n] = r

        async with fan_out() as nursery:
            nursery.start_soon(get_blocks)
            nursery.start_soon(get_logs)
            nursery.start_soon(get_traces)

        if not raw_blocks:
            return []
        by_number = {_int(b["number"]): b for b in raw_blocks}
        for i in range(1, len(raw_blocks)):
            if raw_blocks[i]["parentHash"] != raw_blocks[i - 1]["hash"]:
                raise InconsistentData(f"{self.cfg.id}: blocks changed while being fetched (reorg in progress)")
        if self.tokens:
            logs.extend(await self._missing_logs(raw_blocks, logs))

        # 1. candidates: every recipient, asked to the core's watched-address index at once
        native_cands: list[tuple[int, dict[str, Any]]] = []
        token_cands: list[tuple[dict[str, Any], str, str, int]] = []
        internal_cands: list[tuple[int, Transfer]] = []
        recipients: set[str] = set()
        for b in raw_blocks if full else ():
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
            moved = match_transfer(log)
            if moved is not None:
                token_cands.append((log, *moved))
                recipients.add(moved[1])
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
        for log, sender, to, amount in token_cands:
            if to in hits:
                token = self.tokens[log["address"].lower()]
                found[_int(log["blockNumber"])].append(Transfer(
                    txid=log["transactionHash"], index=_int(log["logIndex"]), kind="token", asset=token.symbol,
                    to=to, sender=sender, amount=amount))
        # 4. internal
        for n, t in internal_cands:
            if t.to in hits:
                found[n].append(t)
        return [self._block(b, found[_int(b["number"])]) for b in raw_blocks]

    def _block(self, b: dict[str, Any], transfers: list[Transfer]) -> Block:
        transfers.sort(key=lambda t: (t.txid, t.index))
        return Block(number=_int(b["number"]), hash=b["hash"], parent_hash=b["parentHash"],
                     timestamp=_int(b["timestamp"]), transfers=tuple(transfers))

    async def _missing_logs(self, raw_blocks: list[dict[str, Any]], logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Token logs of blocks whose bloom says they may have some but the range query gave
        none. Behind a load balancer the blocks and the logs may come from different nodes;
        one lagging a few blocks answers eth_getLogs for blocks it does not have yet with
        nothing, and those deposits would never be seen. Asked by block hash (EIP-234), a node
        that lacks the block answers with an error instead, and the batch is fetched again.
        A bloom false positive costs one request that finds nothing."""
        with_logs = {_int(log.get("blockNumber")) for log in logs}
        suspects = [b for b in raw_blocks if _int(b["number"]) not in with_logs and self._bloom_may_match(b)]
        if not suspects:
            return []
        flt = {"address": list(self.tokens), "topics": [TRANSFER_TOPIC]}
        results = await self.rpc.batch_outcomes([("eth_getLogs", ({**flt, "blockHash": b["hash"]},)) for b in suspects])
        found: list[dict[str, Any]] = []
        for b, r in zip(suspects, results, strict=True):
            if isinstance(r, RpcError) and not r.retryable:  # a node without blockHash filters
                r = await self._logs(_int(b["number"]), _int(b["number"]))
            if isinstance(r, Exception) or not isinstance(r, list):
                raise InconsistentData(f"{self.cfg.id}: the node has no logs for block {_int(b['number'])} "
                                       f"although it gave the block ({getattr(r, 'message', r)})")
            found.extend(r)
        return found

    def _bloom_may_match(self, block: dict[str, Any]) -> bool:
        """May this block hold a Transfer log of a configured token? (True when it has no bloom.)"""
        try:
            bloom = bytes.fromhex(block["logsBloom"][2:])
        except (KeyError, TypeError, ValueError):
            return True
        if len(bloom) != 256:
            return True
        return _bloom_has(bloom, _TRANSFER_BITS) and any(_bloom_has(bloom, bits) for bits in self._token_bits)

    async def _logs(self, start: int, end: int) -> list[dict[str, Any]]:
        """eth_getLogs over [start, end] for the configured tokens, splitting the range when
        the node refuses it as too large (and remembering the width that worked)."""
        out: list[dict[str, Any]] = []
        lo, width = start, self._logs_range
        self._logs_calls += 1
        if width < self.opts.logs_block_range and self._logs_calls % _LOGS_RANGE_PROBE_EVERY == 0:
            # Now and then the full width again: a narrower one is learnt from an error that
            # may not have been about the width at all (behind a load balancer, a replica that
            # lags refuses a range beyond its head, and the halves then go to a fresh one).
            width = self.opts.logs_block_range
        while lo <= end:
            hi = min(end, lo + width - 1)
            flt = {"fromBlock": hex(lo), "toBlock": hex(hi), "address": list(self.tokens),
                   "topics": [TRANSFER_TOPIC]}
            try:
                out.extend(await self.rpc.call("eth_getLogs", flt))
            except RpcError as e:
                if hi > lo and (e.rpc_code in TOO_LARGE_RPC_CODES or "range" in e.message.lower()
                                or "too many" in e.message.lower() or "limit" in e.message.lower()):
                    width = max(1, (hi - lo + 1) // 2)
                    continue
                raise
            self._logs_range = width  # the width that worked
            lo = hi + 1
        return out

    def _internal_transfers(self, block_traces: Iterable[dict[str, Any]], block_hash: str) -> list[Transfer]:
        """Value transfers below the top-level call, in successful frames only."""
        by_tx: dict[str, list[dict[str, Any]]] = {}
        for tr in block_traces:
            if tr.get("blockHash", block_hash) != block_hash:  # a node on another fork: not "none"
                raise InconsistentData(f"a trace of another block ({tr.get('blockHash')}) for block {block_hash}")
            if tr.get("transactionHash"):
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

    @node_data
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
            token = self.tokens.get((log.get("address") or "").lower())
            moved = match_transfer(log) if token else None
            if token and moved:
                sender, to, amount = moved
                transfers.append(Transfer(txid=txid, index=_int(log["logIndex"]), kind="token", asset=token.symbol,
                                          to=to, sender=sender, amount=amount))
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

    # --- reading for the wallet ------------------------------------------------------------

    @node_data
    async def balance(self, address: str, asset: AssetConfig, block: int | None = None) -> int:
        tag = "latest" if block is None else hex(block)
        if asset.contract is None:
            return _int(await self.rpc.call("eth_getBalance", address, tag))
        result = await self.rpc.call("eth_call", {"to": asset.contract, "data": balance_of_calldata(address)}, tag)
        if not isinstance(result, str) or len(result) < 66:
            raise NodeError(f"{self.cfg.id}: {asset.symbol} contract {asset.contract} answered balanceOf with "
                            f"{str(result)[:20]!r}; is it deployed on this chain?", retryable=False)
        return decode_uint(result)

    @node_data
    async def fee_quote(self) -> FeeQuote:
        """What a transaction should pay per gas to be included soon."""
        mode = self.opts.fee_mode
        if mode != "legacy":
            hist, tip = await self.rpc.batch_outcomes([("eth_feeHistory", (hex(5), "latest", [50])),
                                                       ("eth_maxPriorityFeePerGas", ())])
            base_fees = hist.get("baseFeePerGas") if isinstance(hist, dict) else None
            if base_fees and (mode == "eip1559" or _int(base_fees[-1]) > 0):
                base = _int(base_fees[-1])  # the next block's base fee
                if isinstance(tip, Exception):
                    rewards = sorted(_int(r[0]) for r in hist.get("reward") or [] if r)
                    tip = rewards[len(rewards) // 2] if rewards else GWEI
                else:
                    tip = _int(tip)
                return FeeQuote(max_fee=2 * base + tip, priority_fee=tip)
            if mode == "eip1559":
                raise NodeError(f"{self.cfg.id}: the node gives no EIP-1559 fee history (set fee_mode = \"legacy\")")
        price = _int(await self.rpc.call("eth_gasPrice"))
        return FeeQuote(max_fee=price + price // 10)

    @node_data
    async def nonce(self, address: str, *, pending: bool = True) -> int:
        """The account's next nonce, counting mempool transactions if ``pending``."""
        return _int(await self.rpc.call("eth_getTransactionCount", address, "pending" if pending else "latest"))

    @node_data
    async def mined_nonces(self, addresses: list[str]) -> dict[str, int]:
        """Each account's count of mined transactions (its next nonce at ``latest``), one batch."""
        results = await self.rpc.batch([("eth_getTransactionCount", (a, "latest")) for a in addresses])
        return {a: _int(r) for a, r in zip(addresses, results, strict=True)}

    @node_data
    async def estimate_gas(self, sender: str, to: str, asset: AssetConfig, amount: int) -> int:
        """Gas a transfer of ``amount`` of ``asset`` from ``sender`` to ``to`` needs."""
        if asset.contract is None:
            code = await self.rpc.call("eth_getCode", to, "latest")
            if code in (None, "0x", "0x0"):
                return NATIVE_TRANSFER_GAS  # to an account without code: always exactly this
            call = {"from": sender, "to": to, "value": hex(amount)}
        else:
            call = {"from": sender, "to": asset.contract, "data": transfer_calldata(to, amount)}
        return _int(await self.rpc.call("eth_estimateGas", call))

    async def send_raw(self, tx: SignedTx) -> None:
        """eth_sendRawTransaction; a node that already has exactly this transaction, or
        mined it, is a success; a refusal raises :class:`BroadcastRejected`."""
        try:
            await self.rpc.broadcast("eth_sendRawTransaction", tx.raw)  # every healthy node
        except RpcError as e:
            msg = e.message.lower()
            if any(k in msg for k in _ALREADY_KNOWN):
                return
            if "nonce too low" in msg or "nonce is too low" in msg:
                status = (await self.tx_statuses([tx.txid]))[tx.txid]
                if status.state != "unknown":
                    return  # it is this very transaction that used the nonce
            permanent = not any(k in msg for k in ("insufficient funds", "underpriced", "base fee", "fee cap",
                                                    "temporarily", "try again", "busy"))
            raise BroadcastRejected(e.message, permanent=permanent) from None

    @node_data
    async def tx_statuses(self, txids: list[str]) -> dict[str, TxStatus]:
        """Receipts and transactions of every txid in one JSON-RPC batch."""
        if not txids:
            return {}
        calls = [c for txid in txids for c in (("eth_getTransactionReceipt", (txid,)),
                                                ("eth_getTransactionByHash", (txid,)))]
        results = await self.rpc.batch(calls)
        out: dict[str, TxStatus] = {}
        for i, txid in enumerate(txids):
            rc, tx = results[2 * i], results[2 * i + 1]
            if rc is None:
                out[txid] = TxStatus(txid=txid, state="pending" if tx else "unknown")
                continue
            ok = _int(rc.get("status")) == 1
            fee = _int(rc.get("gasUsed")) * _int(rc.get("effectiveGasPrice") or (tx or {}).get("gasPrice"))
            error = None if ok else await self._revert_reason(tx, _int(rc["blockNumber"]))
            out[txid] = TxStatus(txid=txid, state="mined", success=ok, block_number=_int(rc["blockNumber"]),
                                 block_hash=rc["blockHash"], fee_paid=fee, error=error)
        return out

    async def _revert_reason(self, tx: dict[str, Any] | None, block: int) -> str:
        """Replay the call to read the revert reason: at the block's own state first (what
        made it revert is usually still true there), then at the state before it."""
        if not tx:
            return "reverted"
        call = {"from": tx["from"], "to": tx.get("to"), "data": tx.get("input", "0x"), "value": tx.get("value", "0x0"),
                "gas": tx.get("gas")}
        for at in (block, max(0, block - 1)):
            try:
                await self.rpc.call("eth_call", call, hex(at))
            except RpcError as e:
                msg = e.message.split(": ", 2)[-1]
                msg = msg.rsplit(" (code", 1)[0]
                if "execution reverted" in msg:
                    msg = msg.split("execution reverted", 1)[1].lstrip(": ") or "execution reverted"
                return msg[:200]
            except NodeError:
                break
        return "reverted"
