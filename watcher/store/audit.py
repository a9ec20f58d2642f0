"""The audit log: who (the API key or config token, by id and name, or 'cli') did what to
which object, and when. Written in the transaction of the change it records, so a change
never exists without its entry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..auth import Principal

if TYPE_CHECKING:
    from . import Store

_SECRET_KEYS = {"secret", "token", "mnemonic", "private_key", "password"}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: int
    actor: str  # the key's name, or 'cli'
    key_id: str | None  # key_... or config:<name>; None for the CLI
    action: str
    object_id: str | None
    details: dict[str, Any]


class AuditLog:
    def __init__(self, store: Store):
        self.store = store

    def record(self, actor: Principal | str | None, action: str, object_id: str | None,
               details: dict[str, Any] | None = None) -> None:
        """``actor``: the principal of an API request; a string (or None: 'cli') otherwise."""
        clean = {k: ("<redacted>" if k in _SECRET_KEYS else v) for k, v in (details or {}).items()}
        if isinstance(actor, Principal):
            name, key_id = actor.name, actor.id
        else:
            name, key_id = actor or "cli", None
        with self.store.db.transaction() as conn:
            conn.execute("INSERT INTO audit_log (at, actor, key_id, action, object_id, details)"
                         " VALUES (?, ?, ?, ?, ?, ?)",
                         (self.store.clock.now_ms(), name, key_id, action, object_id,
                          json.dumps(clean, separators=(",", ":"), ensure_ascii=False, default=str)))

    def entries(self, *, object_id: str | None = None, key_id: str | None = None, after: int = 0,
                limit: int = 100) -> list[AuditEntry]:
        sql = "SELECT * FROM audit_log WHERE id > ?"
        params: list[Any] = [after]
        if object_id is not None:
            sql += " AND object_id = ?"
            params.append(object_id)
        if key_id is not None:
            sql += " AND key_id = ?"
            params.append(key_id)
        rows = self.store.db.query(sql + " ORDER BY id LIMIT ?", [*params, limit])
        return [AuditEntry(id=r["id"], at=r["at"], actor=r["actor"], key_id=r["key_id"], action=r["action"],
                           object_id=r["object_id"], details=json.loads(r["details"])) for r in rows]
