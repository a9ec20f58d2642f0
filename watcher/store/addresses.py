"""Watched addresses and the derivation indexes behind them.

A label gets one derivation index per deposit account (``m/purpose'/coin'/account'`` of the
chain's key scheme), so the label ``alice`` has the same address on every chain that shares
the account (every EVM chain; BTC and LTC test networks): a user who pays on the wrong EVM
chain still pays an address the operator holds the key to. Indexes are never reused.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import Conflict

if TYPE_CHECKING:
    from . import Store

_CHUNK = 500  # SQLite host parameters per IN (...) query


@dataclass(frozen=True)
class WatchedAddress:
    chain: str
    address: str  # canonical
    kind: str  # 'deposit', 'invoice', 'external', 'hot'
    label: str | None
    invoice_id: str | None
    derivation_index: int | None
    created_at: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> WatchedAddress:
        return cls(chain=row["chain"], address=row["address"], kind=row["kind"], label=row["label"],
                   invoice_id=row["invoice_id"], derivation_index=row["derivation_index"],
                   created_at=row["created_at"])


class Addresses:
    def __init__(self, store: Store):
        self.store = store

    # --- reading ------------------------------------------------------------------------

    def watched(self, chain: str, candidates: Iterable[str]) -> set[str]:
        """The subset of ``candidates`` watched on ``chain``: canonical addresses, or match
        keys for a family that matches by key (``ChainSpec.matches_by_key``). One indexed
        lookup per 500 candidates, no copy of the watched set in memory (a million watched
        addresses cost nothing; an in-memory set would answer a scan's ~360 candidates a
        Bitcoin block ~0.3 ms sooner, measured, at ~150 bytes an address)."""
        column = "match_key" if self.store.spec(chain).matches_by_key else "address"
        unique = list(set(candidates))
        found: set[str] = set()
        conn = self.store.db.conn
        for i in range(0, len(unique), _CHUNK):
            part = unique[i:i + _CHUNK]
            rows = conn.execute(
                f"SELECT {column} FROM addresses WHERE chain = ? AND {column} IN ({','.join('?' * len(part))})",
                [chain, *part],
            )
            found.update(r[0] for r in rows)
        return found

    def key_prefixes(self, chain: str, prefixes: Iterable[str]) -> set[str]:
        """Which of ``prefixes`` begin at least one match key watched on ``chain`` (a family
        that matches by key; none for one that does not): one range probe of the index each."""
        if not self.store.spec(chain).matches_by_key:
            return set()
        conn = self.store.db.conn
        # the keys from the prefix up to the prefix with its last character one higher: an
        # index range (text compares by code point)
        return {p for p in prefixes if p and conn.execute(
            "SELECT 1 FROM addresses WHERE chain = ? AND match_key >= ? AND match_key < ? LIMIT 1",
            (chain, p, p[:-1] + chr(ord(p[-1]) + 1))).fetchone()}

    def _match_key(self, chain: str, address: str) -> str | None:
        spec = self.store.spec(chain)
        return spec.match_key(address) if spec.matches_by_key else None

    def fill_match_keys(self, chain: str) -> int:
        """Give every watched address of ``chain`` its match key where it has none (rows
        written before the family matched by key, or by hand); the number filled."""
        spec = self.store.spec(chain)
        if not spec.matches_by_key:
            return 0
        rows = self.store.db.query("SELECT address FROM addresses WHERE chain = ? AND match_key IS NULL", (chain,))
        keys = [(spec.match_key(r[0]), chain, r[0]) for r in rows]
        if keys:
            with self.store.db.transaction() as conn:
                conn.executemany("UPDATE addresses SET match_key = ? WHERE chain = ? AND address = ?", keys)
        return len(keys)

    def watch_hot(self, chain: str, address: str) -> None:
        """Watch the chain's hot wallet address (kind ``hot``: its transfers are the wallet's
        coins on a UTXO chain; never swept, never an invoice). Nothing if already watched."""
        with self.store.db.transaction() as conn:
            added = conn.execute(
                "INSERT OR IGNORE INTO addresses (chain, address, kind, label, invoice_id, derivation_index,"
                " created_at, match_key) VALUES (?, ?, 'hot', NULL, NULL, NULL, ?, ?)",
                (chain, address, self.store.clock.now_ms(), self._match_key(chain, address))).rowcount
            if added:
                self.store.db.after_commit(lambda: self.store.metrics.watched_addresses.labels(chain).inc())

    def derived_among(self, chain: str, candidates: Iterable[str]) -> set[str]:
        """The subset of ``candidates`` that are addresses watcher derived on ``chain``."""
        unique = [a for a in set(candidates) if a]
        found: set[str] = set()
        for i in range(0, len(unique), _CHUNK):
            part = unique[i:i + _CHUNK]
            found.update(r[0] for r in self.store.db.query(
                f"SELECT address FROM addresses WHERE chain = ? AND derivation_index IS NOT NULL"
                f" AND address IN ({','.join('?' * len(part))})", [chain, *part]))
        return found

    def get(self, chain: str, address: str) -> WatchedAddress | None:
        row = self.store.db.one("SELECT * FROM addresses WHERE chain = ? AND address = ?", (chain, address))
        return WatchedAddress.from_row(row) if row else None

    def by_label(self, chain: str, label: str) -> WatchedAddress | None:
        row = self.store.db.one("SELECT * FROM addresses WHERE chain = ? AND label = ?", (chain, label))
        return WatchedAddress.from_row(row) if row else None

    def count(self, chain: str) -> int:
        return self.store.db.scalar("SELECT COUNT(*) FROM addresses WHERE chain = ?", (chain,)) or 0

    def list(self, chain: str, *, after: str = "", limit: int = 100) -> list[WatchedAddress]:
        rows = self.store.db.query(
            "SELECT * FROM addresses WHERE chain = ? AND address > ? ORDER BY address LIMIT ?", (chain, after, limit)
        )
        return [WatchedAddress.from_row(r) for r in rows]

    # --- writing ------------------------------------------------------------------------

    def deposit_address(self, chain: str, label: str) -> tuple[WatchedAddress, bool]:
        """The static deposit address of ``label`` on ``chain``: ``(address, created)``.
        The same label always gets the same address."""
        existing = self.by_label(chain, label)
        if existing is not None:
            if existing.kind != "deposit":
                raise Conflict(f"label {label!r} on chain {chain!r} is already used by an {existing.kind} address")
            return existing, False
        with self.store.db.transaction():
            index = self._index_for(chain, "label", label)
            return self._insert_derived(chain, index, kind="deposit", label=label), True

    def derived_for(self, chain: str, purpose: str, ref: str, *, kind: str, label: str | None = None,
                    invoice_id: str | None = None) -> WatchedAddress:
        """A derived address for an object (e.g. an invoice); call inside a transaction."""
        index = self._index_for(chain, purpose, ref)
        return self._insert_derived(chain, index, kind=kind, label=label, invoice_id=invoice_id)

    def watch_external(self, chain: str, address: str, label: str | None) -> tuple[WatchedAddress, bool]:
        """Watch an address watcher did not derive (no sweeping possible)."""
        existing = self.get(chain, address)
        if existing is not None:
            if existing.label != label and label is not None:
                raise Conflict(f"address is already watched on {chain!r} with another label")
            return existing, False
        if label is not None and self.by_label(chain, label) is not None:
            raise Conflict(f"label {label!r} on chain {chain!r} is already used by another address")
        now = self.store.clock.now_ms()
        key = self._match_key(chain, address)
        with self.store.db.transaction() as conn:
            conn.execute(
                "INSERT INTO addresses (chain, address, kind, label, invoice_id, derivation_index, created_at,"
                " match_key) VALUES (?, ?, 'external', ?, NULL, NULL, ?, ?)",
                (chain, address, label, now, key),
            )
            self.store.db.after_commit(lambda: self.store.metrics.watched_addresses.labels(chain).inc())
        return WatchedAddress(chain, address, "external", label, None, None, now), True

    def _index_for(self, chain: str, purpose: str, ref: str) -> int:
        account = self.store.spec(chain).keys.deposit_path
        conn = self.store.db.conn
        row = conn.execute(
            "SELECT idx FROM derivations WHERE account = ? AND purpose = ? AND ref = ?", (account, purpose, ref)
        ).fetchone()
        if row is not None:
            return row[0]
        index = conn.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM derivations WHERE account = ?",
                             (account,)).fetchone()[0]
        conn.execute(
            "INSERT INTO derivations (account, idx, purpose, ref, created_at) VALUES (?, ?, ?, ?, ?)",
            (account, index, purpose, ref, self.store.clock.now_ms()),
        )
        return index

    def _insert_derived(self, chain: str, index: int, *, kind: str, label: str | None,
                        invoice_id: str | None = None) -> WatchedAddress:
        spec = self.store.spec(chain)
        address = spec.address_from_public_key(self.store.keyring.public_key(spec.keys.deposit_path, index))
        now = self.store.clock.now_ms()
        clash = self.get(chain, address)
        if clash is not None:
            # Only possible if someone watched one of our future addresses as external.
            raise Conflict(f"derived address #{index} is already watched on {chain!r} as {clash.kind}")
        key = self._match_key(chain, address)
        self.store.db.conn.execute(
            "INSERT INTO addresses (chain, address, kind, label, invoice_id, derivation_index, created_at, match_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (chain, address, kind, label, invoice_id, index, now, key),
        )
        self.store.db.after_commit(lambda: self.store.metrics.watched_addresses.labels(chain).inc())
        return WatchedAddress(chain, address, kind, label, invoice_id, index, now)

    def totals(self, chain: str, address: str) -> dict[str, dict[str, int]]:
        """Per asset: base units confirmed and still unconfirmed (orphaned ones excluded)."""
        out: dict[str, dict[str, int]] = {}
        for row in self.store.db.query(
            "SELECT asset, status, amount FROM transfers WHERE chain = ? AND address = ? AND status != 'orphaned'",
            (chain, address),
        ):
            bucket = out.setdefault(row["asset"], {"confirmed": 0, "pending": 0, "count": 0})
            bucket["confirmed" if row["status"] == "confirmed" else "pending"] += int(row["amount"])
            bucket["count"] += 1
        return out
