"""Several nodes for one chain (``rpc_urls``, ``[[chains.nodes]]``): a :class:`NodePool` is
used like one :class:`~watcher.jsonrpc.JsonRpc` and sends each request to the first healthy
node in the configured order.

A node is ``up`` (it answers and is within ``max_lag`` blocks of the best head any node
reported), ``lagging``, ``down`` (a transport error or a timeout: it did not answer) or
``unknown`` (not asked yet). A request that fails on the node in use for a transport reason
moves at once to the next one (a JSON-RPC error is the node's answer and is returned as
such); traffic moves back to an earlier node as soon as it is up again. ``monitor`` asks every
node for its head each ``probe_interval`` (the chain's poll interval, at least 1 s; one try,
``rpc_timeout``): that is how a lagging
node, a recovered one, and a hung one that nobody was asking are found. Nodes that disagree
about a block are not a special case: the scanner's hash chain decides, as for any reorg.
Broadcasts (:meth:`NodePool.broadcast`: a signed transaction) go to every node that is not
down; the first acceptance wins, and only a refusal by all of them is an error."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .config import NodeConfig
from .errors import NodeError, RpcError
from .jsonrpc import Call, Decode, JsonRpc
from .metrics import Metrics
from .tasks import fan_out

log = logging.getLogger(__name__)

STATES = ("up", "lagging", "down", "unknown")
_RANK = {"up": 0, "unknown": 1, "lagging": 2, "down": 3}


@dataclass
class NodeState:
    config: NodeConfig
    rpc: JsonRpc
    state: str = "unknown"
    head: int | None = None
    error: str | None = None
    last_ok: float | None = None  # time.monotonic() of its last answer
    changed_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.config.name


class NodePool:
    def __init__(self, chain: str, nodes: Sequence[tuple[NodeConfig, JsonRpc]], metrics: Metrics, *,
                 max_lag: int, head_call: Call | None = None, probe_interval: float = 1.0):
        assert nodes, "a chain has at least one node"
        self.chain = chain
        self.nodes = [NodeState(cfg, rpc) for cfg, rpc in nodes]
        self.metrics = metrics
        self.max_lag = max_lag
        self.head_call = head_call
        self.probe_interval = probe_interval
        self._active: NodeState | None = None
        # called when a node that was down (or not yet known) answers again: the scanner,
        # backing off after node errors, tries again at once instead of after its backoff
        self.on_up: list[Callable[[], None]] = []
        for n in self.nodes:
            metrics.node_up.labels(chain, n.name).set(0)
            metrics.node_active.labels(chain, n.name).set(0)

    # --- what the clients use: the JsonRpc interface --------------------------------------

    @property
    def url(self) -> str:
        return self.active.rpc.url

    @property
    def timeout(self) -> float:
        return self.nodes[0].rpc.timeout

    @property
    def active(self) -> NodeState:
        """The node requests go to now: the first ``up`` one in the configured order (then
        ``unknown``, ``lagging``, and ``down`` ones, in that order, when none is up)."""
        best = min(self.nodes, key=lambda n: _RANK[n.state])  # min keeps the configured order on ties
        if best is not self._active:
            if self._active is not None:
                self.metrics.node_active.labels(self.chain, self._active.name).set(0)
                self.metrics.node_switches.labels(self.chain).inc()
                log.warning("%s: requests now go to node %s (%s is %s)", self.chain, best.name, self._active.name,
                            self._active.state, extra={"chain": self.chain})
            self.metrics.node_active.labels(self.chain, best.name).set(1)
            self._active = best
        return best

    async def aclose(self) -> None:
        for n in self.nodes:
            await n.rpc.aclose()

    async def call(self, method: str, *params: Any) -> Any:
        return await self._use(lambda rpc: rpc.call(method, *params))

    async def call_exact(self, method: str, *params: Any) -> Any:
        return await self._use(lambda rpc: rpc.call_exact(method, *params))

    async def batch(self, calls: Sequence[Call]) -> list[Any]:
        return await self._use(lambda rpc: rpc.batch(calls))

    async def batch_outcomes(self, calls: Sequence[Call], *, decode: Decode = "json") -> list[Any]:
        return await self._use(lambda rpc: rpc.batch_outcomes(calls, decode=decode))

    async def batch_hex(self, calls: Sequence[Call]) -> list[bytes]:
        return await self._use(lambda rpc: rpc.batch_hex(calls))

    async def broadcast(self, method: str, *params: Any) -> Any:
        """Send to every node that is not down (all of them if every one is), concurrently:
        the first result wins; raises only when every node failed (the first node's error,
        in the configured order: the one an operator expects to read)."""
        targets = [n for n in self.nodes if n.state != "down"] or list(self.nodes)
        outcomes: list[Any] = [None] * len(targets)

        async def send(i: int, n: NodeState) -> None:
            try:
                outcomes[i] = await n.rpc.call(method, *params)
                self._ok(n)
            except RpcError as e:  # the node answered: refused
                outcomes[i] = e
            except NodeError as e:
                outcomes[i] = e
                self._failed(n, e)

        async with fan_out() as nursery:
            for i, n in enumerate(targets):
                nursery.start_soon(send, i, n)
        for r in outcomes:
            if not isinstance(r, NodeError):
                return r
        raise outcomes[0]

    async def _use(self, fn: Callable[[JsonRpc], Awaitable[Any]]) -> Any:
        untried = list(self.nodes)
        last: NodeError | None = None
        while untried:
            # the best node not tried yet, judged afresh each time (a failure here, or another
            # task's, may have changed the states); the first is the active node
            n = min(untried, key=lambda m: _RANK[m.state])  # min keeps the configured order on ties
            untried.remove(n)
            try:
                result = await fn(n.rpc)
            except RpcError:
                self._ok(n)  # it answered
                raise
            except NodeError as e:
                self._failed(n, e)
                last = e
                continue
            self._ok(n)
            return result
        assert last is not None
        raise last

    # --- health ---------------------------------------------------------------------------

    def _ok(self, n: NodeState) -> None:
        n.last_ok = time.monotonic()
        n.error = None
        if n.state in ("down", "unknown"):
            self._set(n, "up")

    def _failed(self, n: NodeState, e: NodeError) -> None:
        n.error = e.message
        if n.state != "down":
            log.warning("%s: node %s is down: %s", self.chain, n.name, e.message, extra={"chain": self.chain})
            self._set(n, "down")

    def _set(self, n: NodeState, state: str) -> None:
        back = state == "up" and n.state in ("down", "unknown")
        n.state = state
        n.changed_at = time.monotonic()
        self.metrics.node_up.labels(self.chain, n.name).set(1 if state == "up" else 0)
        self.active  # noqa: B018 - moves traffic (and the metric) if the best node changed
        if back:
            for fn in self.on_up:
                fn()

    @property
    def any_up(self) -> bool:
        return any(n.state == "up" for n in self.nodes)

    async def probe(self) -> None:
        """Ask every node for its head once (one try each, ``rpc_timeout``), then judge them:
        no answer is ``down``; more than ``max_lag`` behind the best head is ``lagging``."""
        if self.head_call is None:
            return
        method, params = self.head_call

        async def ask(n: NodeState) -> None:
            try:
                n.head = _number(await n.rpc.probe(method, *params))
                n.last_ok = time.monotonic()
                n.error = None
                self.metrics.node_head.labels(self.chain, n.name).set(n.head)
            except NodeError as e:
                n.head = None
                self._failed(n, e)

        async with fan_out() as nursery:
            for n in self.nodes:
                nursery.start_soon(ask, n)
        heads = [n.head for n in self.nodes if n.head is not None]
        if not heads:
            return
        best = max(heads)
        for n in self.nodes:
            if n.head is None:
                continue
            state = "lagging" if best - n.head > self.max_lag else "up"
            if state != n.state:
                if state == "lagging":
                    log.warning("%s: node %s is %d blocks behind the best head (max_lag %d)", self.chain, n.name,
                                best - n.head, self.max_lag, extra={"chain": self.chain})
                elif n.state != "unknown":
                    log.info("%s: node %s is up again", self.chain, n.name, extra={"chain": self.chain})
                self._set(n, state)

    async def monitor(self) -> None:
        """Probe every ``probe_interval`` seconds, for ever."""
        while True:
            started = trio.current_time()
            await self.probe()
            await trio.sleep(max(0.0, self.probe_interval - (trio.current_time() - started)))

    def view(self) -> list[dict[str, Any]]:
        """Each node's state for ``/v1/chains`` and ``watcher status``."""
        active = self.active
        now = time.monotonic()
        best = max((n.head for n in self.nodes if n.head is not None), default=None)
        return [{"node": n.name, "state": n.state, "active": n is active, "head": n.head,
                 "behind": None if n.head is None or best is None else best - n.head,
                 "error": n.error,
                 "last_ok_seconds_ago": None if n.last_ok is None else round(now - n.last_ok, 1),
                 "ws": n.config.ws_url is not None} for n in self.nodes]


def _number(value: Any) -> int:
    try:
        if isinstance(value, str):
            return int(value, 16) if value.startswith("0x") else int(value)
    except ValueError:
        pass
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise NodeError(f"the node's head is not a block number: {str(value)[:40]!r}")
