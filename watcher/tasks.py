"""Concurrency helpers shared by the core and chain plugins."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .metrics import Metrics
    from .store.db import Database

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def fan_out() -> AsyncIterator[trio.Nursery]:
    """A nursery for the concurrent parts of *one* operation (the chunks of a JSON-RPC
    batch, the blocks/logs/traces of one fetch). Trio wraps whatever its children raise in
    an ``ExceptionGroup``; the callers of such an operation handle plain errors
    (``except NodeError``: back off and retry), so a failing part surfaces as its own first
    exception, with the group as its context. A group of nothing but cancellations is left
    alone for the cancel scope that caused it."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        first = _first_real(group)
        if first is None:
            raise
        raise first from group


def _first_real(group: BaseExceptionGroup) -> BaseException | None:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            inner = _first_real(e)
            if inner is not None:
                return inner
        elif not isinstance(e, trio.Cancelled):
            return e
    return None


def record_storage_trouble(db: Database, metrics: Metrics, e: BaseException) -> str | None:
    """If ``e`` is storage trouble (see :func:`watcher.store.db.storage_trouble`), note it
    for /readyz (cleared by the next commit) and count it; returns its kind, or None for an
    error that is a bug."""
    from .store.db import storage_trouble

    kind = storage_trouble(e)
    if kind is not None:
        db.trouble = f"{kind}: {e}"
        metrics.storage_errors.labels(kind).inc()
    return kind


class StorageRetry:
    """Backoff for a background task whose database write failed for a storage reason
    (locked by another process, disk full, I/O error: see
    :func:`watcher.store.db.storage_trouble`). The failed transaction has rolled back, so
    the task only has to wait and do the same step again; ``wait`` re-raises errors that
    are bugs rather than conditions of the file. The wait doubles from 0.5 s to 30 s and
    starts over once a step gets through (:meth:`ok`)."""

    def __init__(self, db: Database, metrics: Metrics, where: str):
        self.db = db
        self.metrics = metrics
        self.where = where
        self.failures = 0

    def ok(self) -> None:
        self.failures = 0

    async def wait(self, e: BaseException) -> None:
        kind = record_storage_trouble(self.db, self.metrics, e)
        if kind is None:
            raise e
        self.failures += 1
        delay = min(30.0, 0.5 * 2 ** (self.failures - 1))
        log.warning("%s: database %s (%s); nothing was written, retrying in %.1f s", self.where, kind, e, delay,
                    extra={"storage_error": kind})
        await trio.sleep(delay)
