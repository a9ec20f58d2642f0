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
from typing import TYPE_CHECKING, Any

from ..chains.scan import K
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
        # chain -> its watched keys (match keys as bytes, or canonical addresses), None above
        # the limit
        self._memory: dict[str, set[Any] | None] = {}
        self._data_version: int | None = None

    # --- reading ------------------------------------------------------------------------

    def watched(self, chain: str, candidates: Iterable[K]) -> set[K]:
        """The subset of ``candidates`` watched on ``chain``: canonical addresses, or match
        keys (bytes) for a family that matches by key (``ChainSpec.matches_by_key``). From
        memory while the chain watches at most ``[storage] watched_in_memory`` addresses (a
        set intersection: ~240 distinct scripts of a Bitcoin block in ~0.01 ms, where the
        index took ~0.1); above that, from the index, one lookup per 500 candidates, and
        nothing in memory (a million watched addresses would hold ~120 MB)."""
        keys = self._in_memory(chain)
        if keys is not None:
            return keys.intersection(candidates)
        if not self.store.spec(chain).matches_by_key:
            return self._among(chain, "address", set(candidates))
        by_hex: dict[str, K] = {}  # the index holds a key's hex
        for k in candidates:
            if isinstance(k, bytes):  # an address is no key
                by_hex[k.hex()] = k
        return {by_hex[h] for h in self._among(chain, "match_key", set(by_hex))}

    def _among(self, chain: str, column: str, unique: set[Any], *, derived: bool = False) -> set[Any]:
        """Which of ``unique`` the index holds in ``column`` for ``chain`` (only addresses
        watcher derived, if ``derived``)."""
        found: set[Any] = set()
        conn = self.store.db.conn
        values = list(unique)
        only = " AND derivation_index IS NOT NULL" if derived else ""
        for i in range(0, len(values), _CHUNK):
            part = values[i:i + _CHUNK]
            rows = conn.execute(
                f"SELECT {column} FROM addresses WHERE chain = ?{only} AND {column} IN ({','.join('?' * len(part))})",
                [chain, *part],
            )
            found.update(r[0] for r in rows)
        return found

    def _in_memory(self, chain: str) -> set[Any] | None:
        """The chain's watched keys, loaded on first use and kept up to date by this process's
        own inserts once they commit (:meth:`_added`); or None (the chain watches more than
        the limit). All are dropped, to be loaded again, whenever another connection has
        committed to the database (``PRAGMA data_version``): a ``watcher`` command run beside
        the daemon may have added addresses."""
        limit = self.store.config.storage.watched_in_memory
        if not limit:
            return None
        conn = self.store.db.conn
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._memory.clear()
            self._data_version = version
        if chain not in self._memory:
            self._memory[chain] = None
            if self.count(chain) <= limit:
                if self.store.spec(chain).matches_by_key:
                    self._memory[chain] = {bytes.fromhex(r[0]) for r in conn.execute(
                        "SELECT match_key FROM addresses WHERE chain = ? AND match_key IS NOT NULL", (chain,))}
                else:
                    self._memory[chain] = {r[0] for r in conn.execute(
                        "SELECT address FROM addresses WHERE chain = ?", (chain,))}
        return self._memory[chain]

    def in_memory(self, chain: str) -> set[Any] | None:
        """The chain's watched keys (or addresses) if it watches few enough to hold them in
        memory, else None: not to be changed by the caller."""
        return self._in_memory(chain)

    def _forget(self, chain: str) -> None:
        """Drop the chain's watched keys from memory (loaded again on next use)."""
        self._memory.pop(chain, None)

    def _added(self, chain: str, address: str, key: str | None) -> None:
        """An address inserted in the current transaction: counted, and in memory, once it
        commits (a rolled-back insert never reaches either)."""
        def added() -> None:
            self.store.metrics.watched_addresses.labels(chain).inc()
            keys = self._memory.get(chain)
            if keys is not None:
                keys.add(address if key is None else bytes.fromhex(key))
                if len(keys) > self.store.config.storage.watched_in_memory:
                    self._memory[chain] = None

        self.store.db.after_commit(added)

    def key_prefixes(self, chain: str, prefixes: Iterable[bytes]) -> set[bytes]:
        """Which of ``prefixes`` begin at least one match key watched on ``chain`` (a family
        that matches by key; none for one that does not): one range probe of the index each."""
        if not self.store.spec(chain).matches_by_key:
            return set()
        conn = self.store.db.conn

        def watched(prefix: str) -> bool:
            # the keys' hex from the prefix's up to the prefix's with its last digit one
            # higher: an index range (text compares by code point)
            return conn.execute("SELECT 1 FROM addresses WHERE chain = ? AND match_key >= ? AND match_key < ? LIMIT 1",
                                (chain, prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).fetchone() is not None

        return {p for p in prefixes if p and watched(p.hex())}

    def _match_key(self, chain: str, address: str) -> str | None:
        """The address's match key as the index keeps it (hex), for a family that matches by key."""
        spec = self.store.spec(chain)
        return spec.match_key(address).hex() if spec.matches_by_key else None

    def fill_match_keys(self, chain: str) -> int:
        """Give every watched address of ``chain`` its match key where it has none (rows
        written before the family matched by key, or by hand); the number filled."""
        spec = self.store.spec(chain)
        if not spec.matches_by_key:
            return 0
        rows = self.store.db.query("SELECT address FROM addresses WHERE chain = ? AND match_key IS NULL", (chain,))
        keys = [(spec.match_key(r[0]).hex(), chain, r[0]) for r in rows]
        if keys:
            with self.store.db.transaction() as conn:
                conn.executemany("UPDATE addresses SET match_key = ? WHERE chain = ? AND address = ?", keys)
                self.store.db.after_commit(lambda: self._forget(chain))
        return len(keys)

    def watch_hot(self, chain: str, address: str) -> None:
        """Watch the chain's hot wallet address (kind ``hot``: its transfers are the wallet's
        coins on a UTXO chain; never swept, never an invoice). Nothing if already watched."""
        key = self._match_key(chain, address)
        with self.store.db.transaction() as conn:
            added = conn.execute(
                "INSERT OR IGNORE INTO addresses (chain, address, kind, label, invoice_id, derivation_index,"
                " created_at, match_key) VALUES (?, ?, 'hot', NULL, NULL, NULL, ?, ?)",
                (chain, address, self.store.clock.now_ms(), key)).rowcount
            if added:
                self._added(chain, address, key)

    def derived_among(self, chain: str, candidates: Iterable[str]) -> set[str]:
        """The subset of ``candidates`` that are addresses watcher derived on ``chain``."""
        return self._among(chain, "address", {a for a in candidates if a}, derived=True)

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
            self._added(chain, address, key)
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
        self._added(chain, address, key)
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
