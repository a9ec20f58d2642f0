"""Schema migrations (sqlite-utils ``Migrations``; each one atomic, applied in order, never
edited once released: add a new one instead).

Conventions: amounts are TEXT holding a base-unit integer (they exceed 2^63); times are
INTEGER milliseconds since the epoch; ids are TEXT with a kind prefix (``tr_``, ``evt_``).
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("watcher")


@migrations()
def m001_core(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );

        -- one row per configured chain: the scan cursor and what the node told us about itself
        CREATE TABLE chains (
            id TEXT PRIMARY KEY,
            family TEXT NOT NULL,
            start_block INTEGER NOT NULL,
            scanned_number INTEGER NOT NULL,      -- start_block - 1 until the first block is scanned
            scanned_hash TEXT,                    -- NULL until the first block is scanned
            node_info TEXT NOT NULL DEFAULT '{}', -- JSON facts from the first check (chain id)
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );

        -- recent canonical blocks (within the finality depth), to link new blocks by hash
        CREATE TABLE blocks (
            chain TEXT NOT NULL,
            number INTEGER NOT NULL,
            hash TEXT NOT NULL,
            parent_hash TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            PRIMARY KEY (chain, number)
        ) WITHOUT ROWID;

        -- derivation indexes, allocated per key space (SLIP-44 coin type), so one label gets
        -- one index, and so one address, on every chain of a family
        CREATE TABLE derivations (
            coin INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            purpose TEXT NOT NULL,                -- 'label' or 'invoice'
            ref TEXT NOT NULL,                    -- the label, or the invoice id
            created_at INTEGER NOT NULL,
            PRIMARY KEY (coin, idx),
            UNIQUE (coin, purpose, ref)
        ) WITHOUT ROWID;

        -- addresses watched per chain
        CREATE TABLE addresses (
            chain TEXT NOT NULL,
            address TEXT NOT NULL,                -- canonical form (the family's validate_address)
            kind TEXT NOT NULL,                   -- 'deposit', 'invoice' or 'external'
            label TEXT,
            invoice_id TEXT,
            derivation_index INTEGER,             -- NULL for external addresses
            created_at INTEGER NOT NULL,
            PRIMARY KEY (chain, address)
        ) WITHOUT ROWID;
        CREATE UNIQUE INDEX addresses_label ON addresses (chain, label) WHERE label IS NOT NULL;

        CREATE TABLE transfers (
            id TEXT PRIMARY KEY,
            chain TEXT NOT NULL,
            txid TEXT NOT NULL,
            idx INTEGER NOT NULL,                 -- see watcher.chains: log index, -1, -(2+n)
            kind TEXT NOT NULL,                   -- 'native', 'token', 'internal'
            asset TEXT NOT NULL,
            address TEXT NOT NULL,
            sender TEXT NOT NULL,
            amount TEXT NOT NULL,
            block_number INTEGER NOT NULL,
            block_hash TEXT NOT NULL,
            block_time INTEGER NOT NULL,          -- seconds, from the block header
            status TEXT NOT NULL,                 -- 'detected', 'confirmed', 'orphaned'
            detected_at INTEGER NOT NULL,
            confirmed_at INTEGER,
            orphaned_at INTEGER,
            updated_at INTEGER NOT NULL,
            UNIQUE (chain, txid, idx)
        );
        CREATE INDEX transfers_address ON transfers (chain, address, status);
        CREATE INDEX transfers_status ON transfers (chain, status, block_number);
        CREATE INDEX transfers_updated ON transfers (updated_at);

        -- the outbox: every state change writes its event here in the same transaction
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            chain TEXT,
            subject TEXT,                         -- id of the object the event is about
            data TEXT NOT NULL                    -- JSON snapshot of the object
        );
        CREATE INDEX events_subject ON events (subject, seq);
        CREATE INDEX events_type ON events (type, seq);
        """
    )
