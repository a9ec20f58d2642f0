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
    """Backoff for a background task whose step failed. The failed transaction has rolled
    back (every step is stored before it acts), so the task only has to wait and do the
    same step again:

    - storage trouble (locked by another process, disk full, I/O error: see
      :func:`watcher.store.db.storage_trouble`) is a condition of the file: a warning,
      ``storage_errors`` and /readyz say so;
    - anything else (a constraint, bad SQL, a plugin's bug) is a bug of that step: logged
      with its traceback and counted as ``errors{type="<bug_label>"}``, and ``bug`` names
      it until a step gets through. It must not stop the rest of the daemon (the other
      chains, deposits, webhooks), so it is retried like the rest.

    The wait doubles from 0.5 s to 30 s and starts over once a step gets through
    (:meth:`ok`)."""

    def __init__(self, db: Database, metrics: Metrics, where: str, bug_label: str):
        self.db = db
        self.metrics = metrics
        self.where = where
        self.bug_label = bug_label
        self.failures = 0
        self.bug: str | None = None  # the exception type of the last failed step, while failing

    def ok(self) -> None:
        self.failures = 0
        self.bug = None

    async def wait(self, e: Exception) -> None:
        self.failures += 1
        delay = min(30.0, 0.5 * 2 ** (self.failures - 1))
        kind = record_storage_trouble(self.db, self.metrics, e)
        if kind is not None:
            log.warning("%s: database %s (%s); nothing was written, retrying in %.1f s", self.where, kind, e,
                        delay, extra={"storage_error": kind})
        else:
            self.bug = type(e).__name__
            self.metrics.errors.labels(self.bug_label).inc()
            log.error("%s: a step failed (a bug: %s); nothing was written, retrying in %.1f s", self.where,
                      self.bug, delay, exc_info=e)
        await trio.sleep(delay)
