"""Schema migrations (sqlite-utils ``Migrations``; each one atomic, applied in order, never
edited once released: add a new one instead).

Conventions: amounts are TEXT holding a base-unit integer (they exceed 2^63); times are
INTEGER milliseconds since the epoch; ids are TEXT with a kind prefix (``tr_``, ``evt_``).
"""

from __future__ import annotations

import json

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
            kind TEXT NOT NULL,                   -- 'deposit', 'invoice', 'external' or 'hot'
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


@migrations()
def m002_invoices_webhooks_audit(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE invoices (
            id TEXT PRIMARY KEY,
            chain TEXT NOT NULL,
            asset TEXT NOT NULL,
            mode TEXT NOT NULL,                   -- 'sale' or 'deposit'
            amount TEXT,                          -- base units; NULL: any amount (deposit mode)
            tolerance_ppm INTEGER NOT NULL,       -- underpayment accepted, parts per million
            address TEXT NOT NULL,
            status TEXT NOT NULL,
            partial INTEGER NOT NULL DEFAULT 0,
            overpaid INTEGER NOT NULL DEFAULT 0,
            late INTEGER NOT NULL DEFAULT 0,
            received TEXT NOT NULL DEFAULT '0',   -- base units, every live payment
            confirmed TEXT NOT NULL DEFAULT '0',  -- base units, confirmed payments
            order_id TEXT,
            metadata TEXT NOT NULL DEFAULT '{}',
            payment_uri TEXT,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            monitor_until INTEGER NOT NULL,       -- after this, payments no longer change it
            paid_at INTEGER,
            completed_at INTEGER,
            updated_at INTEGER NOT NULL,
            created_by TEXT
        );
        CREATE INDEX invoices_status ON invoices (status, expires_at);
        CREATE INDEX invoices_monitor ON invoices (monitor_until);
        CREATE INDEX invoices_order ON invoices (order_id);
        CREATE UNIQUE INDEX invoices_address ON invoices (chain, address);

        CREATE TABLE webhooks (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            events TEXT NOT NULL,                 -- JSON array of patterns ("invoice.*")
            description TEXT,
            secret TEXT NOT NULL,                 -- whsec_...
            old_secret TEXT,                      -- still signed with until old_secret_until
            old_secret_until INTEGER,
            status TEXT NOT NULL,                 -- 'active' or 'disabled'
            disabled_reason TEXT,
            last_seq INTEGER NOT NULL DEFAULT 0,  -- per-endpoint event sequence
            created_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            deleted_at INTEGER
        );

        CREATE TABLE deliveries (
            id TEXT PRIMARY KEY,
            webhook_id TEXT NOT NULL REFERENCES webhooks (id),
            event_id TEXT NOT NULL,
            seq INTEGER NOT NULL,                 -- the endpoint's sequence number of the event
            status TEXT NOT NULL,                 -- 'pending', 'delivered', 'failed', 'cancelled'
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at INTEGER,
            last_status INTEGER,
            last_error TEXT,
            created_at INTEGER NOT NULL,
            delivered_at INTEGER,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX deliveries_due ON deliveries (webhook_id, status, next_attempt_at);
        CREATE INDEX deliveries_event ON deliveries (event_id);

        CREATE TABLE delivery_attempts (
            id INTEGER PRIMARY KEY,
            delivery_id TEXT NOT NULL REFERENCES deliveries (id),
            attempt INTEGER NOT NULL,
            at INTEGER NOT NULL,
            status_code INTEGER,
            latency_ms INTEGER,
            error TEXT,
            response TEXT                         -- first bytes of the body, for debugging
        );
        CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id, attempt);

        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            at INTEGER NOT NULL,
            actor TEXT NOT NULL,                  -- API token name, or 'cli'
            action TEXT NOT NULL,                 -- e.g. 'invoice.create'
            object_id TEXT,
            details TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_log_object ON audit_log (object_id);
        """
    )


@migrations()
def m003_event_sinks(db: Database) -> None:
    db.executescript(
        """
        -- how far each plugin's watcher_event implementation has processed the outbox
        CREATE TABLE sink_cursors (
            name TEXT PRIMARY KEY,
            last_seq INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );
        """
    )


@migrations()
def m004_payouts_sweeps(db: Database) -> None:
    db.executescript(
        """
        -- the local nonce of each chain's hot wallet (one sender per chain)
        CREATE TABLE hot_wallets (
            chain TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            next_nonce INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );

        -- every transaction watcher signs, stored BEFORE it is broadcast: after a crash the
        -- same bytes are sent again, never a second transfer
        CREATE TABLE chain_txs (
            id INTEGER PRIMARY KEY,
            chain TEXT NOT NULL,
            purpose TEXT NOT NULL,                -- 'payout', 'sweep', 'topup'
            ref_id TEXT NOT NULL,                 -- the payout or sweep it serves
            sender TEXT NOT NULL,
            nonce INTEGER NOT NULL,
            txid TEXT NOT NULL UNIQUE,
            raw TEXT NOT NULL,
            amount TEXT NOT NULL,                 -- value moved (base units of the asset)
            asset TEXT NOT NULL,
            gas_limit INTEGER NOT NULL,
            max_fee TEXT NOT NULL,
            priority_fee TEXT,
            status TEXT NOT NULL,                 -- 'open', 'mined', 'replaced', 'failed'
            block_number INTEGER,
            fee_paid TEXT,
            error TEXT,
            created_at INTEGER NOT NULL,
            broadcast_at INTEGER,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX chain_txs_ref ON chain_txs (ref_id, purpose, nonce);
        CREATE INDEX chain_txs_open ON chain_txs (chain, status);

        CREATE TABLE payouts (
            id TEXT PRIMARY KEY,
            chain TEXT NOT NULL,
            asset TEXT NOT NULL,
            amount TEXT NOT NULL,
            to_address TEXT NOT NULL,
            idempotency_key TEXT NOT NULL UNIQUE,
            request_hash TEXT NOT NULL,
            label TEXT,
            metadata TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL,
            reason TEXT,                          -- why it waits, or why it failed
            txid TEXT,
            nonce INTEGER,
            block_number INTEGER,
            fee_paid TEXT,
            created_by TEXT,
            approved_by TEXT,
            created_at INTEGER NOT NULL,
            approved_at INTEGER,
            broadcast_at INTEGER,
            completed_at INTEGER,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX payouts_status ON payouts (chain, status, created_at);
        CREATE INDEX payouts_label ON payouts (label, created_at);
        CREATE INDEX payouts_created ON payouts (chain, asset, created_at);

        CREATE TABLE sweeps (
            id TEXT PRIMARY KEY,
            chain TEXT NOT NULL,
            asset TEXT NOT NULL,
            address TEXT NOT NULL,                -- the deposit address swept
            to_address TEXT NOT NULL,             -- the treasury
            amount TEXT NOT NULL,                 -- planned; for native coin: set when signed
            status TEXT NOT NULL,                 -- planned, funding, broadcast, confirmed, failed
            topup_amount TEXT,
            topup_txid TEXT,
            txid TEXT,
            fee_paid TEXT,
            topup_fee_paid TEXT,
            dust TEXT,                            -- native coin left on the address afterwards
            reason TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            confirmed_at INTEGER,
            updated_at INTEGER NOT NULL
        );
        CREATE INDEX sweeps_status ON sweeps (chain, status);
        CREATE INDEX sweeps_address ON sweeps (chain, address, asset);

        -- (address, asset) pairs that received a confirmed deposit since they were last looked at
        CREATE TABLE sweep_candidates (
            chain TEXT NOT NULL,
            address TEXT NOT NULL,
            asset TEXT NOT NULL,
            since INTEGER NOT NULL,
            PRIMARY KEY (chain, address, asset)
        ) WITHOUT ROWID;
        """
    )


@migrations()
def m005_family_wallets(db: Database) -> None:
    """The wallet half of the chain contract: what a family remembers about a transaction it
    made is an opaque ``details`` object; transactions that exclude each other share a
    ``conflict`` key; each chain's wallet keeps its own ``state``. The EVM-specific columns of
    m004 (nonce, gas_limit, fees; the hot wallet's next nonce) move into those objects, and
    a sweep lists the deposits it covers."""
    db.executescript(
        """
        CREATE TABLE chain_txs_new (
            id INTEGER PRIMARY KEY,
            chain TEXT NOT NULL,
            purpose TEXT NOT NULL,                -- 'payout', 'sweep', 'topup', 'filler'
            ref_id TEXT NOT NULL,                 -- the payout or sweep it serves
            sender TEXT NOT NULL,                 -- '' when several addresses sign
            to_address TEXT NOT NULL,
            conflict TEXT NOT NULL,               -- transactions sharing it exclude each other
            txid TEXT NOT NULL UNIQUE,
            raw TEXT NOT NULL,
            amount TEXT NOT NULL,                 -- value moved (base units of the asset)
            asset TEXT NOT NULL,
            fee_limit TEXT NOT NULL,              -- the most it can pay in fees (native base units)
            details TEXT NOT NULL DEFAULT '{}',   -- the family's own facts (JSON), opaque to the core
            status TEXT NOT NULL,                 -- 'open', 'mined', 'replaced', 'failed'
            block_number INTEGER,
            fee_paid TEXT,
            error TEXT,
            created_at INTEGER NOT NULL,
            broadcast_at INTEGER,
            updated_at INTEGER NOT NULL
        );

        -- what each chain's wallet remembers between transactions (JSON), e.g. a next nonce
        CREATE TABLE wallet_state (
            chain TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        );

        -- the confirmed deposits a sweep covers (a UTXO sweep spends many of them at once)
        CREATE TABLE sweep_deposits (
            sweep_id TEXT NOT NULL,
            transfer_id TEXT NOT NULL,
            address TEXT NOT NULL,
            PRIMARY KEY (sweep_id, transfer_id)
        ) WITHOUT ROWID;
        CREATE INDEX sweep_deposits_transfer ON sweep_deposits (transfer_id);
        CREATE INDEX sweep_deposits_address ON sweep_deposits (address);
        """
    )
    conn = db.conn
    targets = {r[0]: r[1] for r in conn.execute("SELECT id, to_address FROM payouts")}
    sweeps = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, address, to_address FROM sweeps")}
    for r in conn.execute("SELECT * FROM chain_txs ORDER BY id").fetchall():
        (cid, chain, purpose, ref, sender, nonce, txid, raw, amount, asset, gas, max_fee, prio, status, block,
         fee_paid, error, created, broadcast, updated) = tuple(r)
        if purpose == "payout":
            to = targets.get(ref, "")
        else:
            to = sweeps.get(ref, ("", ""))[0 if purpose == "topup" else 1]
        details = {"nonce": nonce, "gas_limit": gas, "max_fee": int(max_fee),
                   "priority_fee": None if prio is None else int(prio)}
        conn.execute(
            "INSERT INTO chain_txs_new VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, chain, purpose, ref, sender, to, f"{sender}/{nonce}", txid, raw, amount, asset,
             str(gas * int(max_fee)), json.dumps(details, separators=(",", ":")), status, block, fee_paid, error,
             created, broadcast, updated))
    for chain, next_nonce, updated in conn.execute("SELECT chain, next_nonce, updated_at FROM hot_wallets"):
        conn.execute("INSERT INTO wallet_state (chain, state, version, updated_at) VALUES (?, ?, 1, ?)",
                     (chain, json.dumps({"next_nonce": next_nonce}), updated))
    db.executescript(
        """
        DROP TABLE chain_txs;
        ALTER TABLE chain_txs_new RENAME TO chain_txs;
        CREATE INDEX chain_txs_ref ON chain_txs (ref_id, purpose, id);
        CREATE INDEX chain_txs_open ON chain_txs (chain, status);
        CREATE INDEX chain_txs_conflict ON chain_txs (chain, conflict);
        DROP TABLE hot_wallets;
        ALTER TABLE payouts DROP COLUMN nonce;
        ALTER TABLE sweeps DROP COLUMN topup_amount;
        ALTER TABLE sweeps DROP COLUMN topup_txid;
        ALTER TABLE sweeps DROP COLUMN topup_fee_paid;
        ALTER TABLE sweeps DROP COLUMN attempts;
        """
    )


@migrations()
def m006_derivation_accounts(db: Database) -> None:
    """Derivation indexes are allocated per account path (``m/purpose'/coin'/account'``)
    instead of per SLIP-44 coin type: families differ in purpose (44, 84, 86) too. The
    seed check's fingerprints follow."""
    db.executescript(
        """
        CREATE TABLE derivations_new (
            account TEXT NOT NULL,                -- m/purpose'/coin'/account' of the chain's key scheme
            idx INTEGER NOT NULL,
            purpose TEXT NOT NULL,                -- 'label' or 'invoice'
            ref TEXT NOT NULL,                    -- the label, or the invoice id
            created_at INTEGER NOT NULL,
            PRIMARY KEY (account, idx),
            UNIQUE (account, purpose, ref)
        ) WITHOUT ROWID;
        INSERT INTO derivations_new (account, idx, purpose, ref, created_at)
            SELECT 'm/44''/' || coin || '''/0''', idx, purpose, ref, created_at FROM derivations;
        DROP TABLE derivations;
        ALTER TABLE derivations_new RENAME TO derivations;
        UPDATE meta SET key = 'keyring.m/44''/' || substr(key, 13) || '''/0'''
            WHERE key LIKE 'keyring.coin%';
        """
    )


@migrations()
def m007_address_match_keys(db: Database) -> None:
    """A family whose client finds outputs by script rather than by address (Bitcoin: a raw
    block holds scripts, and encoding every output as an address is the slow part of a
    scan) looks watched addresses up by a match key the family derives from the address.
    NULL for families that match by address; filled when the store opens."""
    db.executescript(
        """
        ALTER TABLE addresses ADD COLUMN match_key TEXT;
        CREATE INDEX addresses_match_key ON addresses (chain, match_key) WHERE match_key IS NOT NULL;
        """
    )


@migrations()
def m008_transfers_unmined_and_maturity(db: Database) -> None:
    """A transfer can be seen before it is mined (a UTXO node's mempool): its block columns
    are NULL until a block holds it, and ``gone_at`` is the node's height when its
    transaction was last found in neither the mempool nor a block (it is orphaned once the
    scan has passed that height without finding it). ``min_depth``: confirmations it needs
    beyond the chain's own (a coinbase output matures after 100 blocks). SQLite cannot relax
    NOT NULL in place, so the table is rebuilt."""
    db.executescript(
        """
        CREATE TABLE transfers_new (
            id TEXT PRIMARY KEY,
            chain TEXT NOT NULL,
            txid TEXT NOT NULL,
            idx INTEGER NOT NULL,                 -- see watcher.chains: log index, -1, -(2+n), vout
            kind TEXT NOT NULL,                   -- 'native', 'token', 'internal'
            asset TEXT NOT NULL,
            address TEXT NOT NULL,
            sender TEXT NOT NULL,
            amount TEXT NOT NULL,
            block_number INTEGER,                 -- NULL while only in the mempool
            block_hash TEXT,
            block_time INTEGER,                   -- seconds, from the block header
            status TEXT NOT NULL,                 -- 'detected', 'confirmed', 'orphaned'
            detected_at INTEGER NOT NULL,
            confirmed_at INTEGER,
            orphaned_at INTEGER,
            updated_at INTEGER NOT NULL,
            min_depth INTEGER,                    -- confirmations needed if more than the chain's
            gone_at INTEGER,                      -- unmined and missing from the mempool at this height
            UNIQUE (chain, txid, idx)
        );
        INSERT INTO transfers_new (id, chain, txid, idx, kind, asset, address, sender, amount, block_number,
            block_hash, block_time, status, detected_at, confirmed_at, orphaned_at, updated_at)
            SELECT id, chain, txid, idx, kind, asset, address, sender, amount, block_number, block_hash,
            block_time, status, detected_at, confirmed_at, orphaned_at, updated_at FROM transfers;
        DROP TABLE transfers;
        ALTER TABLE transfers_new RENAME TO transfers;
        CREATE INDEX transfers_address ON transfers (chain, address, status);
        CREATE INDEX transfers_status ON transfers (chain, status, block_number);
        CREATE INDEX transfers_updated ON transfers (updated_at);
        CREATE INDEX transfers_unmined ON transfers (chain) WHERE block_number IS NULL AND status = 'detected';
        """
    )


@migrations()
def m009_api_keys(db: Database) -> None:
    """API keys made while the daemon runs (``watcher keys``, ``/v1/keys``): the SHA-256 of
    the key (a bearer key is never stored), sealed with the secrets key for a key that signs
    its requests (the daemon needs it to check them). ``used_signatures``: signatures seen
    within the signature window, so a replay is refused even after a restart. The audit log
    names the key of each change; payouts and webhooks remember the key that made them (a
    key changes only its own, unless admin)."""
    db.executescript(
        """
        CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,                  -- key_<16 hex>: public
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,        -- hex SHA-256 of the key
            sealed_key TEXT,                      -- signed keys: the key, sealed (watcher.secretbox)
            scopes TEXT NOT NULL,                 -- JSON array
            signed INTEGER NOT NULL,
            rate_limit TEXT,                      -- "N/s", "N/min", "N/h"
            payout_rate_limit TEXT,
            created_at INTEGER NOT NULL,
            created_by TEXT,                      -- 'cli' or the key/token that made it
            expires_at INTEGER,
            last_used_at INTEGER,
            revoked_at INTEGER
        );
        CREATE TABLE used_signatures (
            signature TEXT PRIMARY KEY,
            expires_at INTEGER NOT NULL           -- ms; forgotten after (outside the window by then)
        ) WITHOUT ROWID;
        CREATE INDEX used_signatures_expiry ON used_signatures (expires_at);
        ALTER TABLE audit_log ADD COLUMN key_id TEXT;
        CREATE INDEX audit_log_key ON audit_log (key_id, id);
        ALTER TABLE payouts ADD COLUMN owner TEXT;  -- the principal id of its creator
        ALTER TABLE webhooks ADD COLUMN owner TEXT;
        UPDATE payouts SET owner = 'config:' || created_by WHERE created_by IS NOT NULL;
        """
    )


@migrations()
def m010_invoice_pricing(db: Database) -> None:
    """An invoice priced in a currency (``price``) keeps what priced it: the price, and the
    rate locked at creation (JSON: ``{"price": {"amount", "currency"}, "rate": {"pair",
    "value", "source", "updated_at"}}``); NULL for an invoice in asset units."""
    db.executescript("ALTER TABLE invoices ADD COLUMN pricing TEXT;")


@migrations()
def m011_transfer_values(db: Database) -> None:
    """A transfer's worth in ``[rates] reference`` at the rate of its detection (JSON:
    ``{"currency", "amount", "rate", "source"}``), NULL when no rate existed then."""
    db.executescript("ALTER TABLE transfers ADD COLUMN value TEXT;")


@migrations()
def m012_quotes(db: Database) -> None:
    """Quotes: an amount for a price, locked for ``[rates] quote_ttl``; an invoice created
    with one uses its amount (``used_by``: once)."""
    db.executescript(
        """
        CREATE TABLE quotes (
            id TEXT PRIMARY KEY,
            chain TEXT NOT NULL,
            asset TEXT NOT NULL,
            amount TEXT NOT NULL,                 -- base units
            pricing TEXT NOT NULL,                -- JSON: price and rate, as invoices.pricing
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            used_by TEXT,                         -- the invoice that used it
            owner TEXT                            -- the principal id that asked
        );
        """
    )


@migrations()
def m013_refunds(db: Database) -> None:
    """A refund is a payout linked to its invoice (``payouts.invoice_id``); the invoice keeps
    the base units its completed refunds paid back (``refunded``)."""
    db.executescript(
        """
        ALTER TABLE payouts ADD COLUMN invoice_id TEXT;
        CREATE INDEX payouts_invoice ON payouts (invoice_id) WHERE invoice_id IS NOT NULL;
        ALTER TABLE invoices ADD COLUMN refunded TEXT NOT NULL DEFAULT '0';
        """
    )


@migrations()
def m014_invoice_redirect(db: Database) -> None:
    """Where the checkout page sends the customer back once paid (``invoices.redirect_url``)."""
    db.executescript("ALTER TABLE invoices ADD COLUMN redirect_url TEXT;")


@migrations()
def m015_delivery_not_before(db: Database) -> None:
    """The earliest time a receiver's ``Retry-After`` allows the next attempt
    (``deliveries.not_before``, ms): a success of the endpoint does not pull a retry before it."""
    db.executescript("ALTER TABLE deliveries ADD COLUMN not_before INTEGER;")


@migrations()
def m016_invoice_confirmed_once(db: Database) -> None:
    """Whether an invoice was ever ``completed`` (``invoices.confirmed_once``): a reorg that
    moves its payment past ``monitor_until`` must not fail it (its payment was confirmed in
    time). Invoices completed now, or with an ``invoice.completed`` event on record, were."""
    db.executescript(
        """
        ALTER TABLE invoices ADD COLUMN confirmed_once INTEGER NOT NULL DEFAULT 0;
        UPDATE invoices SET confirmed_once = 1 WHERE completed_at IS NOT NULL OR id IN (
            SELECT subject FROM events WHERE type = 'invoice.completed');
        """
    )
