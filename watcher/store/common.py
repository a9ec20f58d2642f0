"""Small pieces the table modules share: filtered pages of typed rows, a status change with
its event, and a settled object's record following its transaction after a reorg."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import sqlite3

    from . import Store


class Withdrawn(Exception):
    """What the wallet signed may no longer be sent: while it signed (node calls, seconds), the
    payout was cancelled, or payouts or sweeps were paused. Raised inside the transaction
    that would store the signed transaction, so nothing of it is kept (the wallet's state,
    its nonce or coins, included) and nothing is broadcast."""


def still_sendable(store: Store, table: str, obj_id: str, statuses: tuple[str, ...], scope: str) -> None:
    """Raise :class:`Withdrawn` unless ``obj_id`` is still in one of ``statuses`` and
    ``scope`` is not paused; call inside the write transaction that stores what was signed
    (its ``BEGIN IMMEDIATE`` orders it after any cancel or pause, from any process)."""
    now = store.db.scalar(f"SELECT status FROM {table} WHERE id = ?", (obj_id,))
    if now not in statuses:
        raise Withdrawn(f"it is {now} now")
    if scope in store.paused():
        raise Withdrawn(f"{scope} were paused while it was signed")


class HasId(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=HasId)


def page(store: Store, table: str, filters: Mapping[str, Any], *, after: str | None, limit: int,
         row: Callable[[sqlite3.Row], R], select: str | None = None, id_column: str = "id") -> tuple[list[R], str | None]:
    """Rows of ``table`` (or of the ``select`` query, whose columns the filters name) matching
    ``filters`` (None values ignored; a key is a column, compared with ``=``, or a column and
    an operator: ``"updated_at >="``), oldest id first, after the cursor ``after``:
    ``(rows, next_cursor)``."""
    where, params = [], []
    for key, value in filters.items():
        if value is not None:
            col, _, op = key.partition(" ")
            where.append(f"{col} {op or '='} ?")
            params.append(value)
    if after is not None:
        where.append(f"{id_column} > ?")
        params.append(after)
    sql = (select or f"SELECT * FROM {table}") + (" WHERE " + " AND ".join(where) if where else "")
    rows = store.db.query(sql + f" ORDER BY {id_column} LIMIT ?", [*params, limit + 1])
    items = [row(r) for r in rows[:limit]]
    return items, (items[-1].id if len(rows) > limit else None)


def set_status(store: Store, table: str, kind: str, obj_id: str, status: str,
               render: Callable[[str], dict[str, Any]], **fields: Any) -> None:
    """Set ``status`` (and ``fields``) and write ``<kind>.<status>`` with the object's new
    shape, in one transaction."""
    cols = "".join(f"{k} = ?, " for k in fields)
    with store.db.transaction() as conn:
        conn.execute(f"UPDATE {table} SET status = ?, {cols}updated_at = ? WHERE id = ?",
                     (status, *fields.values(), store.clock.now_ms(), obj_id))
        data = render(obj_id)
        store.events.emit(f"{kind}.{status}", data, chain=data["chain"], subject=obj_id)


def remined(store: Store, table: str, kind: str, obj_id: str, render: Callable[[str], dict[str, Any]],
            **fields: Any) -> bool:
    """A settled object's transaction left the chain in a reorg and was mined again, and where
    the chain holds it now differs from the record (another block, the other transaction of
    its conflict group, another fee): the record follows and ``<kind>.remined`` reports it;
    the status stays. A None value is not known (kept as it is). False when nothing differs:
    the finality guard asks every round of a settled transaction's window, so that answer is
    a read, without a write transaction."""
    fields = {k: v for k, v in fields.items() if v is not None}
    now = store.db.one(f"SELECT {', '.join(fields)} FROM {table} WHERE id = ?", (obj_id,))
    if now is None or tuple(now) == tuple(fields.values()):
        return False
    cols = "".join(f"{k} = ?, " for k in fields)
    with store.db.transaction() as conn:
        conn.execute(f"UPDATE {table} SET {cols}updated_at = ? WHERE id = ?",
                     (*fields.values(), store.clock.now_ms(), obj_id))
        data = render(obj_id)
        store.events.emit(f"{kind}.remined", data, chain=data["chain"], subject=obj_id)
    return True
