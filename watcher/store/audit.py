"""The audit log: who (API token name or 'cli') did what to which object, and when. Written in
the transaction of the change it records, so a change never exists without its entry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import Store

_SECRET_KEYS = {"secret", "token", "mnemonic", "private_key", "password"}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: int
    actor: str
    action: str
    object_id: str | None
    details: dict[str, Any]


class AuditLog:
    def __init__(self, store: Store):
        self.store = store

    def record(self, actor: str, action: str, object_id: str | None, details: dict[str, Any] | None = None) -> None:
        clean = {k: ("<redacted>" if k in _SECRET_KEYS else v) for k, v in (details or {}).items()}
        with self.store.db.transaction() as conn:
            conn.execute("INSERT INTO audit_log (at, actor, action, object_id, details) VALUES (?, ?, ?, ?, ?)",
                         (self.store.clock.now_ms(), actor, action, object_id,
                          json.dumps(clean, separators=(",", ":"), ensure_ascii=False, default=str)))

    def entries(self, *, object_id: str | None = None, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        sql = "SELECT * FROM audit_log WHERE id > ?"
        params: list[Any] = [after]
        if object_id is not None:
            sql += " AND object_id = ?"
            params.append(object_id)
        rows = self.store.db.query(sql + " ORDER BY id LIMIT ?", [*params, limit])
        return [AuditEntry(id=r["id"], at=r["at"], actor=r["actor"], action=r["action"], object_id=r["object_id"],
                           details=json.loads(r["details"])) for r in rows]
