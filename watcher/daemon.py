"""The daemon: one Trio process, one root nursery that owns every task.

A daemon is a :class:`~watcher.core.Core` (``Daemon.open`` opens one: plugins, config, keys,
database, migrations, all failing fast) plus its tasks; ``Daemon.run`` starts them. Each task
gets the few parts it uses, not the daemon. ``run_until_signal`` is what
``watcher run`` calls: SIGINT/SIGTERM first drain the API (``Daemon.drain``: no new
connections, the requests in flight finish), then cancel the root nursery; since no
transaction ever spans an await, cancellation cannot leave anything half-written.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
from pathlib import Path

import pluggy
import trio
from prometheus_client import CollectorRegistry

from .chains import ChainClient
from .clock import Clock
from .config import ChainConfig, Config
from .core import Core
from .deadlines import InvoiceDeadlines
from .dispatch import Dispatcher
from .errors import NodeError
from .keys import ChainKeyring, Keyring
from .metrics import Metrics
from .plugins import await_me_maybe, implementations
from .rates import Rates
from .scanner import ChainWatcher, check_same_chain
from .sender import Sender
from .sinks import EventSinks
from .store import Store
from .views import Views

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5.0


class Daemon:
    def __init__(self, core: Core):
        self.core = core
        config, store, metrics, clock, pm = core.config, core.store, core.metrics, core.clock, core.pm
        self.watchers: dict[str, ChainWatcher] = {c.id: ChainWatcher(c, store, metrics) for c in config.chains}
        self.keys: dict[str, ChainKeyring] = {c.id: chain_keys(c, store) for c in config.chains}
        self.dispatcher = Dispatcher(store, config.webhooks, metrics, clock)
        self.deadlines = InvoiceDeadlines(store, clock, metrics)
        self.sinks = EventSinks(self, pm, store, metrics)
        self.senders: dict[str, Sender] = {
            cid: Sender(w, store, self.keys[cid], metrics) for cid, w in self.watchers.items()}
        self.payout_checks = implementations(pm, "watcher_payout_check")  # see api.money_routes.run_checks
        self.ready_checks = implementations(pm, "watcher_ready")  # /readyz asks each
        self.api_urls: list[str] = []
        self.listener_urls: dict[str, list[str]] = {}  # each plugin listener's (watcher_routes)
        self.started = trio.Event()
        # set: the API and every plugin listener stop accepting connections and drain; a long
        # response (an event stream) waits on it to end itself
        self.stopping = trio.Event()
        self._api_done: trio.Event | None = None  # while the API runs: set once it has returned

    # what plugins and the API reach through the daemon (hooks get ``daemon``)
    @property
    def config(self) -> Config:
        return self.core.config

    @property
    def pm(self) -> pluggy.PluginManager:
        return self.core.pm

    @property
    def keyring(self) -> Keyring:
        return self.core.keyring

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def metrics(self) -> Metrics:
        return self.core.metrics

    @property
    def clock(self) -> Clock:
        return self.core.clock

    @property
    def views(self) -> Views:
        return self.core.views

    @property
    def rates(self) -> Rates:
        return self.core.rates

    @classmethod
    def open(
        cls,
        config: Config | str | Path,
        *,
        pm: pluggy.PluginManager | None = None,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
    ) -> Daemon:
        return cls(Core.open(config, pm=pm, registry=registry, clock=clock))

    def close(self) -> None:
        self.core.close()

    async def preflight(self) -> None:
        """Ask every node who it is, concurrently and briefly. A node serving another chain
        than configured stops start-up; an unreachable one only gets a warning (its watcher
        keeps trying, the other chains start)."""

        async def check(w: ChainWatcher) -> None:
            try:
                with trio.fail_after(min(w.config.rpc_timeout, 10.0)):
                    async with w.open_client() as client:
                        info = await client.check()
            except (NodeError, trio.TooSlowError) as e:
                msg = getattr(e, "message", None) or "timed out"
                log.warning("%s: node %s is not reachable yet (%s); will keep trying",
                            w.config.id, w.config.node, msg, extra={"chain": w.config.id})
                return
            check_same_chain(w.config, self.store.chains.cursor(w.config.id), info)

        async with trio.open_nursery() as nursery:
            for w in self.watchers.values():
                nursery.start_soon(check, w)

    async def run(self, *, api: bool = True, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # a lock held by another process (sqlite3 shell, a backup tool) must not freeze every
        # task: statements give up quickly and the tasks back off (see tasks.StorageRetry)
        self.store.db.set_busy_timeout(250)
        await self.preflight()
        # the chain clients outlive the nursery: no task ever sees its client closed
        async with contextlib.AsyncExitStack() as clients:
            opened: dict[str, ChainClient] = {}
            for cid, w in self.watchers.items():
                w.client = opened[cid] = await clients.enter_async_context(w.open_client())
            for cid, sender in self.senders.items():  # signing libraries load now, not mid-scan
                sender.open_wallet(opened[cid])
            for result in self.pm.hook.watcher_startup(daemon=self):
                await await_me_maybe(result)
            try:
                async with trio.open_nursery() as nursery:
                    if self.rates.sources:  # read once before scanning: the first transfers get values
                        await nursery.start(lambda task_status: self.rates.run(self, task_status=task_status))
                    for cid, w in self.watchers.items():
                        await nursery.start(w.run, opened[cid])
                    await nursery.start(self.deadlines.run)
                    await nursery.start(self.dispatcher.run)
                    await nursery.start(self.sinks.run)
                    for cid, sender in self.senders.items():
                        await nursery.start(sender.run, opened[cid])
                    if api:
                        self._api_done = trio.Event()
                        self.api_urls = await nursery.start(self._serve_api)
                        log.info("API listening on %s", ", ".join(self.api_urls))
                    log.info("watcher started: %d chain(s): %s", len(self.watchers), ", ".join(self.watchers))
                    self.started.set()
                    task_status.started()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_GRACE):
                    for impl in implementations(self.pm, "watcher_shutdown"):  # one by one: errors stay apart
                        try:
                            await impl.call(daemon=self)
                        except Exception:
                            log.exception("plugin %s: watcher_shutdown failed", impl.plugin_name)

    async def _serve_api(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        from . import api as api_module

        assert self._api_done is not None
        try:
            await api_module.serve(self, shutdown_trigger=self.stopping.wait, task_status=task_status)
        finally:
            self._api_done.set()

    async def drain(self) -> None:
        """The first step of a graceful stop: the API refuses new connections and the requests
        in flight get ``api.GRACEFUL_TIMEOUT`` seconds to finish, while every other task still
        runs (a request may need them). Returns once the API has stopped; the caller then
        cancels the rest."""
        self.stopping.set()
        if self._api_done is not None:
            from .api import GRACEFUL_TIMEOUT

            with trio.move_on_after(GRACEFUL_TIMEOUT + 1.0):  # hypercorn keeps its own deadline
                await self._api_done.wait()


#: Allocations between two collections of the youngest generation (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """The garbage collector, set for a process that parses megabytes of JSON a second: what
    is alive once the daemon is open (modules, plugins, config) is frozen out of every later
    collection, and the youngest generation is collected after 20,000 allocations instead of
    700. A scan batch is a tree of dicts and lists that reference counting frees; the
    defaults made the collector walk it again and again (a quarter of the scanner's CPU in
    a catch-up, docs/performance.md). Only for the process that runs the daemon
    (``watcher run``): a freeze keeps whatever it freezes for the life of the process."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def chain_keys(chain: ChainConfig, store: Store) -> ChainKeyring:
    """The chain's keys for its wallet: the keyring along the chain's key scheme, and the
    derivation index of each of our deposit addresses from the store."""

    def index_of(address: str) -> int | None:
        watched = store.addresses.get(chain.id, address)
        return watched.derivation_index if watched is not None else None

    return ChainKeyring(store.keyring, chain.spec.keys, chain.spec.address_from_public_key, index_of)


async def run_until_signal(daemon: Daemon) -> None:
    """Run the daemon until SIGINT or SIGTERM: the first one drains the API, then cancels
    everything; a second one cancels at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop() -> None:
                await daemon.drain()
                nursery.cancel_scope.cancel()

            async def on_signal() -> None:
                draining = False
                async for sig in signals:
                    name = signal.Signals(sig).name
                    if draining:
                        log.info("received %s again, stopping now", name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("received %s, stopping (requests in flight may finish)", name)
                    draining = True
                    nursery.start_soon(stop)

            nursery.start_soon(on_signal)
            await daemon.run()
            nursery.cancel_scope.cancel()
    log.info("stopped")
