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
_MAX_BACKOFF = 60.0


class EventSinks:
    def __init__(self, daemon: Daemon, pm: pluggy.PluginManager, store: Store, metrics: Metrics):
        self.daemon = daemon
        self.store = store
        self.metrics = metrics
        self._storage = StorageRetry(store.db, metrics, "event plugins")
        self.impls = implementations(pm, "watcher_event")
        self._wakes: list[trio.Event] = []
        store.events.on_commit(lambda _event: self._wake_all())

    def _wake_all(self) -> None:
        for ev in self._wakes:
            ev.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # before anything new is written
        cursors = [self.store.events.sink_cursor(impl.plugin_name) for impl in self.impls]
        async with trio.open_nursery() as nursery:
            for i, impl in enumerate(self.impls):
                self._wakes.append(trio.Event())
                nursery.start_soon(self._sink, i, impl, cursors[i])
            task_status.started()

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
                cursor = event.seq
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
