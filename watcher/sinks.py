"""Plugin event sinks: every event passes through each plugin's ``watcher_event``.

Each implementation gets its own task and its own durable cursor (``sink_cursors``): events
arrive in outbox order, at least once (the cursor moves only after the hook returned), and a
plugin whose hook raises is retried with backoff on the same event without holding up the
webhooks or the other plugins. A plugin seen for the first time starts at the end of the
outbox (it is not replayed the history).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

import pluggy
import trio

from .metrics import Metrics
from .plugins import Implementation, implementations
from .tasks import StorageRetry

if TYPE_CHECKING:
    from .daemon import Daemon
    from .store import Event, Store

log = logging.getLogger(__name__)

_BATCH = 100
_BIG_BATCH = 500  # watcher_event_batch: one commit (and one acknowledgement wait) per batch
_MAX_BACKOFF = 60.0


class EventSinks:
    def __init__(self, daemon: Daemon, pm: pluggy.PluginManager, store: Store, metrics: Metrics):
        self.daemon = daemon
        self.store = store
        self.metrics = metrics
        self._storage = StorageRetry(store.db, metrics, "event plugins", "sinks_bug")
        self.impls = implementations(pm, "watcher_event")
        # a plugin object may say it is off (e.g. its config table is absent): no cursor, no task
        self.batch_impls = [i for i in implementations(pm, "watcher_event_batch")
                            if getattr(pm.get_plugin(i.plugin_name), "event_sink_enabled", lambda d: True)(daemon)]
        self.cursors: dict[str, int] = {}  # plugin -> last event it processed (seq)
        self._wakes: list[trio.Event] = []
        store.events.on_commit(lambda _event: self._wake_all())

    def _wake_all(self) -> None:
        for ev in self._wakes:
            ev.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # before anything new is written
        cursors = [self.store.events.sink_cursor(impl.plugin_name) for impl in self.impls]
        batch_cursors = [self.store.events.sink_cursor(impl.plugin_name) for impl in self.batch_impls]
        async with trio.open_nursery() as nursery:
            for i, impl in enumerate(self.impls):
                self._wakes.append(trio.Event())
                self.cursors[impl.plugin_name] = cursors[i]
                nursery.start_soon(self._sink, i, impl, cursors[i])
            for j, impl in enumerate(self.batch_impls):
                self._wakes.append(trio.Event())
                self.cursors[impl.plugin_name] = batch_cursors[j]
                nursery.start_soon(self._batch_sink, len(self.impls) + j, impl, batch_cursors[j])
            task_status.started()

    def behind(self, plugin: str) -> int | None:
        """Events written that the plugin has not processed yet (None: no such sink)."""
        cursor = self.cursors.get(plugin)
        return None if cursor is None else max(0, self.store.events.last_seq() - cursor)

    async def _batch_sink(self, i: int, impl: Implementation, cursor: int) -> None:
        name = impl.plugin_name
        backoff = 0.0
        while True:
            self._wakes[i] = trio.Event()
            batch = self.store.events.list(after_seq=cursor, limit=_BIG_BATCH)
            if not batch:
                await self._wakes[i].wait()
                continue
            try:
                await impl.call(events=batch, daemon=self.daemon)
            except Exception:
                self.metrics.errors.labels("plugin_event").inc()
                log.exception("plugin %s: watcher_event_batch failed on %d events from %s; retrying", name,
                              len(batch), batch[0].id, extra={"plugin": name, "event_id": batch[0].id})
                backoff = min(_MAX_BACKOFF, max(1.0, backoff * 2))
                await trio.sleep(backoff)
                continue
            backoff = 0.0
            while True:
                try:
                    self.store.events.advance_sink(name, batch[-1].seq)
                    break
                except sqlite3.DatabaseError as e:  # the hook ran: a retry would run it twice
                    await self._storage.wait(e)
            self._storage.ok()
            cursor = self.cursors[name] = batch[-1].seq

    async def _sink(self, i: int, impl: Implementation, cursor: int) -> None:
        name = impl.plugin_name
        backoff = 0.0
        while True:
            self._wakes[i] = trio.Event()
            batch = self.store.events.list(after_seq=cursor, limit=_BATCH)
            for event in batch:
                if not await self._deliver(impl, event):
                    backoff = min(_MAX_BACKOFF, max(1.0, backoff * 2))
                    await trio.sleep(backoff)
                    break
                backoff = 0.0
                while True:
                    try:
                        self.store.events.advance_sink(name, event.seq)
                        break
                    except sqlite3.DatabaseError as e:  # the hook ran: a retry would run it twice
                        await self._storage.wait(e)
                self._storage.ok()
                cursor = self.cursors[name] = event.seq
            else:
                if len(batch) < _BATCH:
                    await self._wakes[i].wait()

    async def _deliver(self, impl: Implementation, event: Event) -> bool:
        try:
            await impl.call(event=event, daemon=self.daemon)
        except Exception:
            self.metrics.errors.labels("plugin_event").inc()
            log.exception("plugin %s: watcher_event failed on %s %s; retrying", impl.plugin_name, event.type,
                          event.id, extra={"plugin": impl.plugin_name, "event_id": event.id})
            return False
        return True
