"""One chain watcher per configured chain: follows the node's head, scans new blocks in
batches, links every block to its parent by hash, handles reorgs, counts confirmations.

Failure policy: node errors (timeouts, HTTP errors, JSON-RPC errors) are retried forever with
capped exponential backoff and jitter and show in ``status``, the metrics and ``/readyz``;
they never stop the daemon or another chain. A reorg deeper than the finality depth or a
node that turns out to serve another chain halts this chain only (``chain_halted`` = 1),
because both need an operator.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .chains import Block, ChainClient, ChainContext
from .chains.scan import K
from .config import ChainConfig, NodeConfig, redacted_url
from .errors import ChainMismatch, DeepReorg, InconsistentData, NodeError
from .jsonrpc import Call, JsonRpc, RetryPolicy
from .metrics import Metrics
from .nodes import NodePool
from .tasks import StorageRetry, fan_out

if TYPE_CHECKING:
    from .store import Cursor, Store

log = logging.getLogger(__name__)

_REORG_WINDOW = 64  # block hashes asked per request while looking for the common ancestor
_PROGRESS_EVERY = 5.0  # seconds between catch-up progress lines


def check_same_chain(config: ChainConfig, cursor: Cursor | None, info: dict[str, Any]) -> None:
    """Raise :class:`ChainMismatch` if the node (``info``: what its client's ``check()``
    returned) reports another value of a fact this database recorded when it first scanned
    the chain (``cursor.node_info``, e.g. the chain id). Start-up (``Daemon.preflight``) and
    the chain watcher both ask this, with the same message."""
    if cursor is None:
        return
    for k, v in cursor.node_info.items():
        if k in info and info[k] != v:
            raise ChainMismatch(
                f"{config.id}: the node at {config.node} reports {k} = {info[k]!r}, but this database holds "
                f"chain {config.id!r} scanned with {k} = {v!r}; refusing to mix chains")


@dataclass
class ChainStatus:
    """What the API and ``watcher status`` show about a chain (in memory, per process)."""

    chain: str
    family: str
    head: int | None = None
    scanned: int | None = None
    node_up: bool = False
    last_ok: float | None = None  # time.monotonic() of the last successful poll
    error: str | None = None
    halted: str | None = None
    catching_up: bool = False
    node_info: dict[str, Any] = field(default_factory=dict)

    @property
    def lag(self) -> int | None:
        if self.head is None or self.scanned is None:
            return None
        return max(0, self.head - self.scanned)


class _Pending:
    """The result of a fetch started ahead of time."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    async def run(self, coro: Any) -> None:
        try:
            self._value = await coro
        except Exception as e:  # handed to the consumer, which raises it in order
            self._error = e
        finally:
            self._done.set()

    async def result(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Watched:
    """The chain's ``AddressFilter``, answered by ``Addresses`` (from memory or the index):
    which candidates are watched, and which kinds of match key are (``chains.key_prefixes``)."""

    def __init__(self, store: Store, chain: str):
        self.store, self.chain = store, chain

    def __call__(self, candidates: Iterable[K], /) -> set[K]:
        return self.store.addresses.watched(self.chain, candidates)

    def prefixes(self, prefixes: Iterable[bytes]) -> set[bytes]:
        return self.store.addresses.key_prefixes(self.chain, prefixes)

    def in_memory(self) -> set[Any] | None:
        return self.store.addresses.in_memory(self.chain)


class ChainWatcher:
    prefetch = 2  # batches fetched ahead while catching up

    def __init__(self, config: ChainConfig, store: Store, metrics: Metrics):
        self.config = config
        self.spec = config.spec
        self.store = store
        self.metrics = metrics
        self._storage = StorageRetry(store.db, metrics, f"chain {config.id}", "scanner_bug")
        self.status = ChainStatus(chain=config.id, family=config.family)
        self.client: ChainClient | None = None
        self.pool: NodePool | None = None  # the nodes of the last client opened (the daemon's)
        self._poke = trio.Event()
        self._watched = _Watched(store, config.id)
        self._on_blocks: list[Callable[[], None]] = []
        self._backoff = 0
        self._node_back = trio.Event()  # set by the pool's probe when a node answers again
        self._meter = ProgressMeter()
        m = metrics
        cid = config.id
        self._m_head = m.chain_head.labels(cid)
        self._m_scanned = m.chain_scanned.labels(cid)
        self._m_lag = m.chain_lag.labels(cid)
        self._m_up = m.chain_up.labels(cid)
        self._m_halted = m.chain_halted.labels(cid)
        self._m_blocks = m.blocks_scanned.labels(cid)
        self._m_halted.set(0)
        self._m_up.set(0)

    @property
    def failing(self) -> str | None:
        """The exception type of a scan step that keeps failing for a bug (it is retried),
        or None."""
        return self._storage.bug

    def make_jsonrpc(self, *, concurrency: int = 4, max_batch: int = 50, final_codes: frozenset[int] = frozenset(),
                     credentials: Callable[[NodeConfig], Callable[[], tuple[str, str]] | None] | None = None,
                     head_call: Call | None = None,
                     unhex: Callable[[memoryview], bytes] = binascii.unhexlify, lean_http: bool = False) -> NodePool:
        """The transport to the chain's nodes (``ChainContext.jsonrpc``): one :class:`JsonRpc`
        per node behind a :class:`NodePool`. With several nodes a failed request moves to the
        next node at once instead of being retried on the same one. ``head_call``: how the
        pool asks a node for its head (e.g. ``("eth_blockNumber", ())``); ``credentials``: per
        node, where its HTTP basic-auth credentials come from (or None); ``unhex``: how hex
        results become bytes, ``lean_http``: ``http://`` nodes through :mod:`watcher.wire`
        (both: :class:`JsonRpc`)."""
        cfg = self.config
        several = len(cfg.nodes) > 1
        retry = RetryPolicy(attempts=1, timeout_attempts=1) if several else None
        members = [(node, JsonRpc(node.url, chain=cfg.id, metrics=self.metrics, timeout=cfg.rpc_timeout,
                                  concurrency=concurrency, max_batch=max_batch, final_codes=final_codes,
                                  credentials=credentials(node) if credentials else None, retry=retry,
                                  unhex=unhex, lean_http=lean_http))
                   for node in cfg.nodes]
        self.pool = NodePool(cfg.id, members, self.metrics, max_lag=cfg.max_lag, head_call=head_call,
                             # with the polls: a chain polled hourly is not asked every second
                             probe_interval=max(cfg.poll_interval, 1.0))
        self.pool.on_up.append(lambda: self._node_back.set())
        return self.pool

    def open_client(self) -> ChainClient:
        return self.spec.open_client(ChainContext(config=self.config, jsonrpc=self.make_jsonrpc))

    def on_new_blocks(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` whenever scanned blocks were committed (or rolled back)."""
        self._on_blocks.append(fn)

    def _blocks_changed(self) -> None:
        for fn in self._on_blocks:
            fn()

    def poke(self) -> None:
        """Poll the node now instead of at the end of the current interval."""
        self._poke.set()

    async def run(self, client: ChainClient | None = None, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the chain. With ``client`` given (the daemon's, which outlives every task
        that uses it, the sender included), that client is used and left open."""
        cid = self.config.id
        self.metrics.watched_addresses.labels(cid).set(self.store.addresses.count(cid))
        async with contextlib.AsyncExitStack() as stack:
            if client is None:
                client = await stack.enter_async_context(self.open_client())
            self.client = client
            pool = self.pool
            task_status.started()
            async with trio.open_nursery() as nursery:
                if pool is not None:
                    nursery.start_soon(pool.monitor)
                    for node in self.config.nodes:
                        if node.ws_url:
                            nursery.start_soon(self._push, client, node)
                try:
                    await self._connect(client)
                    await self._follow(client)
                except (ChainMismatch, DeepReorg) as e:
                    self._halt(e)
                    await trio.sleep_forever()

    async def _push(self, client: ChainClient, node: NodeConfig) -> None:
        """Keep the node's head subscription (``ws_url``) up: every pushed head starts a scan
        step at once. Polling goes on beside it, so a dropped subscription or a lost message
        costs at most a poll interval, never a block (the hash chain decides). Reconnects with
        backoff (1 s doubling to 30 s; back to 1 s once a head arrived)."""
        cid = self.config.id
        assert node.ws_url is not None
        url = node.ws_url
        connected = self.metrics.push_connected.labels(cid, node.name)
        heads = self.metrics.push_heads.labels(cid, node.name)
        delay = 1.0

        def on_head(number: int) -> None:
            nonlocal delay
            delay = 1.0
            heads.inc()
            self.poke()

        while True:
            problem = "the subscription ended"
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(partial(client.subscribe_heads, url, on_head))
                    connected.set(1)
                    log.info("%s: subscribed to new heads at %s", cid, redacted_url(url),
                             extra={"chain": cid})
            except* NodeError as group:
                problem = "; ".join(getattr(e, "message", str(e)) for e in group.exceptions)
            connected.set(0)
            log.warning("%s: head subscription at %s: %s; polling every %gs meanwhile, reconnecting in %.0fs", cid,
                        redacted_url(url), problem, self.config.poll_interval, delay,
                        extra={"chain": cid})
            self.poke()  # what the subscription may have missed
            await trio.sleep(delay)
            delay = min(30.0, delay * 2)

    def _halt(self, e: Exception) -> None:
        self.status.halted = str(e)
        self.status.node_up = False
        self._m_halted.set(1)
        self.metrics.errors.labels(type(e).__name__).inc()
        log.critical("%s: scanning halted: %s", self.config.id, e, extra={"chain": self.config.id})

    async def _connect(self, client: ChainClient) -> Cursor:
        """Check the node (retrying until it answers) and create or check the cursor."""
        while True:
            try:
                info = await client.check()
                head = await client.head()
                break
            except NodeError as e:
                await self._node_down(e)
        cursor = self.store.chains.cursor(self.config.id)
        while cursor is None:
            start = self.config.start_block if self.config.start_block is not None else head
            try:
                cursor = self.store.chains.ensure(self.config, start_block=start, node_info=info)
            except sqlite3.DatabaseError as e:
                await self._storage.wait(e)
                continue
            log.info("%s: first start, scanning from block %d (node head %d)", self.config.id, start, head,
                     extra={"chain": self.config.id})
        else:
            check_same_chain(self.config, cursor, info)
        self.status.node_info = info
        self._ok(head, cursor.number)
        return cursor

    async def _follow(self, client: ChainClient) -> None:
        while True:
            try:
                more = await self._step(client)
                if not more:  # at the head: what waits in the mempool (families that have one)
                    await self._mempool(client)
            except InconsistentData as e:
                self.metrics.errors.labels("inconsistent_node_data").inc()
                log.info("%s: %s; fetching again", self.config.id, e, extra={"chain": self.config.id})
                more = False
            except NodeError as e:
                await self._node_down(e)
                continue
            except (ChainMismatch, DeepReorg):
                raise  # for an operator: scanning halts
            except Exception as e:
                # locked, full, or a bug (a constraint, a family plugin's assertion): the batch rolled
                # back; this chain does it again later and the rest of the daemon goes on
                await self._storage.wait(e)
                continue
            self._storage.ok()
            if not more:
                with trio.move_on_after(self.config.poll_interval):
                    await self._poke.wait()
                self._poke = trio.Event()

    async def _step(self, client: ChainClient) -> bool:
        """One poll: returns True if there is more to scan right away."""
        cid = self.config.id
        head = await client.head()
        cur = self.store.chains.cursor(cid)
        assert cur is not None
        if head <= cur.number:
            # Nothing new. Make sure our tip is still the node's block at that height
            # (a same-height reorg, or a node that went back to a lower height).
            check_at = head if head < cur.number else cur.number
            ours = cur.hash if check_at == cur.number else self.store.chains.recent_blocks(cid).get(check_at)
            if ours is not None and check_at >= 0:
                theirs = (await client.block_hashes([check_at])).get(check_at)
                if theirs is not None and theirs[0] != ours:
                    await self._reorg(client, cur)
                    return True
            self._ok(head, cur.number)
            return False
        if head - cur.number > self.config.batch_size:
            await self._catch_up(client, head)
            return True
        end = min(head, cur.number + self.config.batch_size)
        t0 = time.monotonic()
        blocks = await client.fetch_blocks(cur.number + 1, end, self._watched)
        if not blocks:
            self._ok(head, cur.number)
            return False
        if cur.hash is not None and blocks[0].parent_hash != cur.hash:
            await self._reorg(client, cur)
            return True
        await self._mempool_first(client)
        return self._apply(blocks, head, t0) < head

    async def _catch_up(self, client: ChainClient, head: int) -> None:
        """Far behind the head: fetch the next batches while the current one is applied
        (``prefetch`` batches ahead), applying them strictly in order. Stops at the first
        batch that does not continue the cursor: the normal step then deals with it (a
        reorg, or a node that does not have the blocks yet)."""
        cid = self.config.id
        cur = self.store.chains.cursor(cid)
        assert cur is not None
        size = self.config.batch_size
        stop = head
        send, recv = trio.open_memory_channel[_Pending](self.prefetch)

        async def produce(nursery: trio.Nursery) -> None:
            async with send:
                start = cur.number + 1
                while start <= stop:
                    end = min(start + size - 1, stop)
                    pending = _Pending()
                    nursery.start_soon(pending.run, client.fetch_blocks(start, end, self._watched))
                    await send.send(pending)
                    start = end + 1

        async with fan_out() as nursery:
            nursery.start_soon(produce, nursery)
            async with recv:
                async for pending in recv:
                    t0 = time.monotonic()
                    blocks = await pending.result()
                    tip = self.store.chains.cursor(cid)
                    assert tip is not None
                    if not blocks or blocks[0].number != tip.number + 1 or (
                            tip.hash is not None and blocks[0].parent_hash != tip.hash):
                        nursery.cancel_scope.cancel()
                        return
                    await self._mempool_first(client)
                    self._apply(blocks, head, t0)

    async def _mempool_first(self, client: ChainClient) -> None:
        """Before fetched blocks are applied, while a payment seen in the mempool waits for a
        block: read the mempool again (read after the fetch, it no longer holds what those
        blocks hold, nor what they conflict with). A payment replaced by a fee bump that one
        of them holds is then marked gone and no longer counted next to its replacement
        (both counted, an invoice was completed ``overpaid`` with twice what it got)."""
        if self.store.transfers.has_unmined(self.config.id):
            await self._mempool(client)

    async def _mempool(self, client: ChainClient) -> None:
        pool = await client.mempool(self._watched)
        if pool is None:
            # no mempool read (``mempool = false`` now): payments seen there before can no
            # longer be seen to leave it; each one not found in the next block is orphaned
            if self.store.transfers.has_unmined(self.config.id) and self.store.chains.unfollow_mempool(self.config):
                self._blocks_changed()
            return
        if self.store.chains.apply_mempool(self.config, pool):
            self._blocks_changed()

    def _apply(self, blocks: list[Block], head: int, t0: float) -> int:
        """Store a batch that continues the cursor (one transaction) and report it; returns
        the new tip."""
        result = self.store.chains.apply_blocks(self.config, blocks, node_head=head)
        self._blocks_changed()
        self._m_blocks.inc(len(blocks))
        self._ok(head, result.tip)
        self._progress(len(blocks), time.monotonic() - t0, head, result.tip)
        return result.tip

    async def _reorg(self, client: ChainClient, cur: Cursor) -> None:
        cid = self.config.id
        stored = self.store.chains.recent_blocks(cid)
        if cur.hash is not None:
            stored[cur.number] = cur.hash
        numbers = sorted(stored, reverse=True)
        ancestor: int | None = None
        for i in range(0, len(numbers), _REORG_WINDOW):
            window = numbers[i:i + _REORG_WINDOW]
            theirs = await client.block_hashes(window)
            for n in window:
                if n in theirs and theirs[n][0] == stored[n]:
                    ancestor = n
                    break
            if ancestor is not None:
                break
        if ancestor is None:
            if numbers and numbers[-1] == cur.start_block:
                ancestor = cur.start_block - 1  # nothing older was ever scanned: start over
            else:
                oldest = numbers[-1] if numbers else cur.number
                raise DeepReorg(
                    f"{cid}: the node's chain differs from ours at every block we keep (down to {oldest}, "
                    f"finality depth {self.config.finality_depth}); a reorg this deep needs an operator")
        depth = cur.number - ancestor
        orphaned = self.store.chains.rollback(self.config, ancestor, stored.get(ancestor))
        self._blocks_changed()
        self.metrics.reorgs.labels(cid).inc()
        self.metrics.reorg_depth.labels(cid).observe(depth)
        log.warning("%s: reorg of depth %d: rolled back to block %d, %d transfer(s) orphaned",
                    cid, depth, ancestor, orphaned, extra={"chain": cid, "reorg_depth": depth})

    # --- status bookkeeping ---------------------------------------------------------------

    def _ok(self, head: int, scanned: int) -> None:
        s = self.status
        if not s.node_up and s.error is not None:
            log.info("%s: node is back (head %d)", self.config.id, head, extra={"chain": self.config.id})
        s.head, s.scanned, s.node_up, s.error = head, scanned, True, None
        s.last_ok = time.monotonic()
        s.catching_up = head - scanned > self.config.batch_size
        self._backoff = 0
        self._m_head.set(head)
        self._m_scanned.set(scanned)
        self._m_lag.set(max(0, head - scanned))
        self._m_up.set(1)

    async def _node_down(self, e: NodeError) -> None:
        s = self.status
        first = s.node_up or s.error is None
        s.node_up = False
        s.error = e.message
        self._m_up.set(0)
        self.metrics.errors.labels("node").inc()
        self._backoff = min(self._backoff + 1, 6)
        delay = min(30.0, 0.5 * 2 ** self._backoff) * random.uniform(0.75, 1.0)
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "%s: node error: %s; retrying in %.1fs", self.config.id, e.message, delay,
                extra={"chain": self.config.id})
        # or as soon as the pool's probe (every poll interval, at least 1 s) finds a node back
        self._node_back = trio.Event()
        with trio.move_on_after(delay):
            await self._node_back.wait()

    def _progress(self, n: int, took: float, head: int, tip: int) -> None:
        line = self._meter.update(n, took, head, tip, far=head - tip > self.config.batch_size)
        if line:
            log.info("%s: %s", self.config.id, line, extra={"chain": self.config.id, "head": head, "scanned": tip})


class ProgressMeter:
    """Catch-up progress: starts when a batch leaves us ``far`` behind; then a line every
    few seconds (blocks/s, ETA) and one when the head is reached. Silent while following."""

    def __init__(self, every: float = _PROGRESS_EVERY):
        self.every = every
        self.active = False
        self.blocks = 0
        self.started = 0.0
        self.last = 0.0

    def update(self, n: int, took: float, head: int, tip: int, *, far: bool, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        if not self.active:
            if not far:
                return None
            self.active, self.blocks, self.started, self.last = True, 0, now - took, now
        self.blocks += n
        rate = self.blocks / max(now - self.started, 1e-6)
        behind = head - tip
        if behind <= 0:
            self.active = False
            return f"caught up at block {tip}: {self.blocks} blocks in {now - self.started:.1f}s ({rate:.0f} blocks/s)"
        if now - self.last < self.every:
            return None
        self.last = now
        eta = behind / rate if rate > 0 else float("inf")
        return f"catching up: block {tip} of {head} ({rate:.0f} blocks/s, {behind} behind, ETA {_fmt_eta(eta)})"


def _fmt_eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
