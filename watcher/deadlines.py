"""The task that moves invoices on when their time comes: unpaid ones expire at
``expires_at``, paid but unconfirmed ones fail at the end of the monitoring window. It sleeps
until the earliest deadline (on the daemon's Clock, so MockClock drives it in tests) and is
woken when an invoice is created or changes status."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .clock import Clock
from .metrics import Metrics
from .tasks import StorageRetry

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger(__name__)


class InvoiceDeadlines:
    def __init__(self, store: Store, clock: Clock, metrics: Metrics):
        self.store = store
        self.clock = clock
        self._storage = StorageRetry(store.db, metrics, "invoice deadlines", "deadlines_bug")
        self._wake = trio.Event()
        store.on_wake("invoices", self.wake)

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            try:
                changed = self.store.invoices.apply_deadlines()
            except Exception as e:  # locked, full, or a bug: nothing was written, try again later
                await self._storage.wait(e)
                continue
            self._storage.ok()
            if changed:
                log.info("%d invoice(s) reached a deadline (expired or failed)", changed)
            deadline = self.store.invoices.next_deadline()
            if deadline is None:
                await self._wake.wait()
                continue
            delay = (deadline - self.clock.now_ms()) / 1000
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._wake.wait()
            else:
                await trio.sleep(0)  # due already (clock granularity): apply on the next turn
