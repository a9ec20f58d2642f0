"""API keys in the database: created, listed, revoked and expired while the daemon runs (the
API reads the table at each request, so a new or revoked key counts at once), and the
signatures already used within the signature window."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..auth import SCOPES, Principal, Rate, key_hash, new_key, parse_rate
from ..errors import BadRequest, NotFound

if TYPE_CHECKING:
    from . import Store

#: last_used_at is written at most this often per key (ms): a GET must not cost a write.
TOUCH_EVERY_MS = 60_000
_NAME_MAX = 64
PURGE_EVERY_MS = 10_000  # used signatures past their window are deleted at most this often


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    id: str
    name: str
    scopes: tuple[str, ...]
    signed: bool
    rate_limit: str | None
    payout_rate_limit: str | None
    created_at: int
    created_by: str | None
    expires_at: int | None
    last_used_at: int | None
    revoked_at: int | None

    def status(self, now_ms: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now_ms:
            return "expired"
        return "active"

    def principal(self) -> Principal:
        return Principal(id=self.id, name=self.name, scopes=frozenset(self.scopes), signed=self.signed,
                         rate_limit=parse_rate(self.rate_limit) if self.rate_limit else None,
                         payout_rate_limit=parse_rate(self.payout_rate_limit) if self.payout_rate_limit else None)

    def public(self, now_ms: int) -> dict[str, Any]:
        """As the API and ``watcher keys list`` show it: never the key or its hash."""
        from ..views import iso_ms

        return {"id": self.id, "name": self.name, "scopes": list(self.scopes), "signed": self.signed,
                "rate_limit": self.rate_limit, "payout_rate_limit": self.payout_rate_limit,
                "status": self.status(now_ms), "created_at": iso_ms(self.created_at), "created_by": self.created_by,
                "expires_at": iso_ms(self.expires_at), "last_used_at": iso_ms(self.last_used_at),
                "revoked_at": iso_ms(self.revoked_at)}


def _row(r: Any) -> ApiKeyRow:
    return ApiKeyRow(id=r["id"], name=r["name"], scopes=tuple(json.loads(r["scopes"])), signed=bool(r["signed"]),
                     rate_limit=r["rate_limit"], payout_rate_limit=r["payout_rate_limit"], created_at=r["created_at"],
                     created_by=r["created_by"], expires_at=r["expires_at"], last_used_at=r["last_used_at"],
                     revoked_at=r["revoked_at"])


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("a key needs a name (what uses it, e.g. \"shop\")", code="invalid_name")
    name = name.strip()
    if len(name) > _NAME_MAX or any(not c.isprintable() for c in name):
        raise BadRequest(f"a key's name is 1-{_NAME_MAX} printable characters", code="invalid_name")
    return name


class ApiKeys:
    def __init__(self, store: Store):
        self.store = store
        self._touched: dict[str, int] = {}
        self._purged = 0

    def create(self, *, name: str, scopes: frozenset[str], signed: bool, rate_limit: Rate | None,
               payout_rate_limit: Rate | None, expires_in_days: int | None, actor: Principal | None
               ) -> tuple[ApiKeyRow, str]:
        """A new key; returns its row and the key itself (the only time it is shown)."""
        name = check_name(name)
        key_id, key = new_key()
        sealed = self.store.secrets.seal(key, f"apikey:{key_id}") if signed else None
        now = self.store.clock.now_ms()
        expires = now + expires_in_days * 86_400_000 if expires_in_days is not None else None
        ordered = [s for s in SCOPES if s in scopes]
        with self.store.db.transaction() as conn:
            conn.execute(
                "INSERT INTO api_keys (id, name, key_hash, sealed_key, scopes, signed, rate_limit, payout_rate_limit,"
                " created_at, created_by, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, name, key_hash(key), sealed, json.dumps(ordered), int(signed),
                 str(rate_limit) if rate_limit else None, str(payout_rate_limit) if payout_rate_limit else None,
                 now, actor.id if actor else "cli", expires))
            self.store.audit.record(actor, "key.create", key_id,
                                    {"name": name, "scopes": ordered, "signed": signed, "expires_at": expires})
        return self.get(key_id), key

    def get(self, key_id: str) -> ApiKeyRow:
        r = self.store.db.one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        if r is None:
            raise NotFound(f"no API key {key_id[:40]!r}", code="key_not_found")
        return _row(r)

    def list(self, *, include_revoked: bool = True) -> list[ApiKeyRow]:
        sql = "SELECT * FROM api_keys" + ("" if include_revoked else " WHERE revoked_at IS NULL")
        return [_row(r) for r in self.store.db.query(sql + " ORDER BY created_at, id")]

    def revoke(self, key_id: str, actor: Principal | None) -> ApiKeyRow:
        row = self.get(key_id)
        if row.revoked_at is None:
            now = self.store.clock.now_ms()
            with self.store.db.transaction() as conn:
                # the sealed key goes too: a revoked key is never needed again
                conn.execute("UPDATE api_keys SET revoked_at = ?, sealed_key = NULL WHERE id = ? AND revoked_at IS NULL",
                             (now, key_id))
                self.store.audit.record(actor, "key.revoke", key_id, {"name": row.name})
        return self.get(key_id)

    # --- authentication ---------------------------------------------------------------------

    def by_key(self, key: str) -> ApiKeyRow | None:
        """The live key whose hash this is (None if unknown, revoked or expired)."""
        r = self.store.db.one("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash(key),))
        return self._live(r)

    def live(self, key_id: str) -> tuple[ApiKeyRow, str | None] | None:
        """A live key by id with its secret (signed keys; None for bearer keys)."""
        r = self.store.db.one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        row = self._live(r)
        if r is None or row is None:
            return None
        secret = self.store.secrets.open(r["sealed_key"], f"apikey:{key_id}") if r["sealed_key"] else None
        return row, secret

    def _live(self, r: Any) -> ApiKeyRow | None:
        if r is None:
            return None
        row = _row(r)
        return row if row.status(self.store.clock.now_ms()) == "active" else None

    def touch(self, key_id: str) -> None:
        """Note that ``key_id`` was used now (written at most once a minute per key)."""
        now = self.store.clock.now_ms()
        if now - self._touched.get(key_id, -TOUCH_EVERY_MS) < TOUCH_EVERY_MS:
            return
        self._touched[key_id] = now
        try:
            with self.store.db.transaction() as conn:
                conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key_id))
        except sqlite3.DatabaseError:  # best effort: a read must not fail because this write did
            self._touched.pop(key_id, None)

    def use_signature(self, signature: str, keep_until_ms: int) -> bool:
        """Record a signature as used; False if it already was (a replay)."""
        now = self.store.clock.now_ms()
        with self.store.db.transaction() as conn:
            if now - self._purged > PURGE_EVERY_MS:
                conn.execute("DELETE FROM used_signatures WHERE expires_at < ?", (now,))
                self._purged = now
            cur = conn.execute("INSERT OR IGNORE INTO used_signatures (signature, expires_at) VALUES (?, ?)",
                               (signature, keep_until_ms))
            return cur.rowcount == 1

