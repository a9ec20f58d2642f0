"""Concurrency helpers shared by the core and chain plugins."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


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
