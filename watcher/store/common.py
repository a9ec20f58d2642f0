"""Small pieces the table modules share: filtered pages, and a status change with its event."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest

if TYPE_CHECKING:
    import sqlite3

    from . import Store


def page(store: Store, table: str, filters: Mapping[str, Any], *, after: str | None, limit: int,
         view: Callable[[sqlite3.Row], dict[str, Any]], statuses: Sequence[str] = ()
         ) -> tuple[list[dict[str, Any]], str | None]:
    """Rows of ``table`` matching ``filters`` (None values ignored), oldest id first, after the
    cursor ``after``: ``(items, next_cursor)``. A ``status`` filter is checked against ``statuses``."""
    status = filters.get("status")
    if statuses and status is not None and status not in statuses:
        raise BadRequest(f"status must be one of {', '.join(statuses)}", code="invalid_status")
    where, params = [], []
    for col, value in filters.items():
        if value is not None:
            where.append(f"{col} = ?")
            params.append(value)
    if after is not None:
        where.append("id > ?")
        params.append(after)
    sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id LIMIT ?"
    rows = store.db.query(sql, [*params, limit + 1])
    items = [view(r) for r in rows[:limit]]
    return items, (items[-1]["id"] if len(rows) > limit else None)


def set_status(store: Store, table: str, kind: str, obj_id: str, status: str,
               get: Callable[[str], dict[str, Any]], **fields: Any) -> None:
    """Set ``status`` (and ``fields``) and write ``<kind>.<status>`` with the object's new view,
    in one transaction."""
    cols = "".join(f"{k} = ?, " for k in fields)
    with store.db.transaction() as conn:
        conn.execute(f"UPDATE {table} SET status = ?, {cols}updated_at = ? WHERE id = ?",
                     (status, *fields.values(), store.clock.now_ms(), obj_id))
        view = get(obj_id)
        store.events.emit(f"{kind}.{status}", view, chain=view["chain"], subject=obj_id)
