"""The store: the only code that writes the SQLite file.

``Store`` ties the database to what the domain code needs around it (config, with each
chain's spec for address formatting, the keyring for public derivation, metrics, the clock) and exposes
one object per table group: ``chains``, ``addresses``, ``transfers``, ``invoices``,
``events`` (the outbox), ``webhooks`` (endpoints and deliveries), ``audit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..clock import Clock
from ..errors import NotFound
from ..metrics import Metrics
from ..secretbox import SecretBox
from .addresses import Addresses, WatchedAddress
from .apikeys import ApiKeys
from .audit import AuditLog
from .chainstate import ChainState, Cursor, ScanResult
from .chaintx import ChainTxs
from .db import Database, StorageError
from .events import Event, Outbox
from .invoices import Invoices
from .payouts import Payouts
from .sweeps import Sweeps
from .transfers import Transfers
from .webhooks import Webhooks

if TYPE_CHECKING:
    from ..chains import ChainSpec
    from ..config import ChainConfig, Config
    from ..keys import Keyring

__all__ = ["Cursor", "Database", "Event", "ScanResult", "StorageError", "Store", "WatchedAddress"]


class Store:
    def __init__(
        self,
        db: Database,
        *,
        config: Config,
        keyring: Keyring,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        secrets: SecretBox | None = None,
    ):
        """``secrets``: seals webhook secrets and signed API keys (by default the box of
        ``[keys] secrets_key_file``, created if missing)."""
        self.db = db
        self.config = config
        self.keyring = keyring
        self.metrics = metrics or Metrics()
        self.clock = clock or Clock()
        if secrets is None:
            from .. import secretbox

            assert config.keys.secrets_key_file is not None, "parse_config sets keys.secrets_key_file"
            secrets = secretbox.load(config.keys.secrets_key_file)
        self.secrets = secrets
        # services register callbacks here to be woken after a commit that concerns them
        self.wakers: dict[str, list[Callable[[], None]]] = {}
        self.events = Outbox(self)
        self.chains = ChainState(self)
        self.addresses = Addresses(self)
        self.transfers = Transfers(self)
        self.invoices = Invoices(self)
        self.webhooks = Webhooks(self)
        self.audit = AuditLog(self)
        self.chaintxs = ChainTxs(self)
        self.payouts = Payouts(self)
        self.sweeps = Sweeps(self)
        self.apikeys = ApiKeys(self)
        # (symbol, base units, decimals) -> {"currency", "amount", "rate", "source"} or None:
        # a transfer's reference value when it is first seen (watcher.rates.Rates.value_of)
        self.valuer: Callable[[str, int, int], dict[str, Any] | None] | None = None
        self._hot: dict[str, str | None] = {}

    def on_wake(self, topic: str, fn: Callable[[], None]) -> None:
        self.wakers.setdefault(topic, []).append(fn)

    def wake_after_commit(self, topic: str) -> None:
        """Wake the services listening on ``topic`` once the current transaction commits."""

        def wake() -> None:
            for fn in self.wakers.get(topic, ()):
                fn()

        self.db.after_commit(wake)

    @classmethod
    def open(cls, config: Config, *, keyring: Keyring, metrics: Metrics | None = None,
             clock: Clock | None = None) -> Store:
        db = Database(config.storage.path, synchronous=config.storage.synchronous)
        db.migrate()
        store = cls(db, config=config, keyring=keyring, metrics=metrics, clock=clock)
        store.check_keyring()
        store.webhooks.check_sealed()
        store.webhooks.seal_all()
        for chain in config.chains:
            store.addresses.fill_match_keys(chain.id)
            hot = store.hot_wallet(chain.id) if chain.spec.watches_hot_wallet else None
            if hot is not None:
                store.addresses.watch_hot(chain.id, hot)
        return store

    def close(self) -> None:
        self.db.close()

    def chain_config(self, chain: str) -> ChainConfig:
        cfg = self.config.chain(chain)
        if cfg is None:
            raise NotFound(f"unknown chain {chain!r}", code="unknown_chain")
        return cfg

    def spec(self, chain: str) -> ChainSpec:
        """What the chain's family made of its config (address format, keys)."""
        return self.chain_config(chain).spec

    # --- the hot wallet and the kill switch ------------------------------------------------

    def hot_wallet(self, chain: str) -> str | None:
        """The chain's hot wallet address (``<hot account>/0/0`` of its key scheme), None when
        watch-only."""
        if chain not in self._hot:
            spec = self.spec(chain)
            if self.keyring.watch_only:
                self._hot[chain] = None
            else:
                pub = self.keyring.public_key(spec.keys.hot_path, 0)
                self._hot[chain] = spec.address_from_public_key(pub)
        return self._hot[chain]

    def status_counts(self) -> dict[str, list[tuple[str, str, int]]]:
        """``(chain, status, count)`` of invoices, payouts and sweeps (the metrics' gauges)."""
        return {table: [(r[0], r[1], r[2]) for r in self.db.query(
            f"SELECT chain, status, COUNT(*) FROM {table} GROUP BY chain, status")]
            for table in ("invoices", "payouts", "sweeps")}

    def paused(self) -> frozenset[str]:
        """Scopes held right now: by config (``[admin] paused``) or by pause commands."""
        import json

        raw = self.db.get_meta("paused")
        return self.config.paused | frozenset(json.loads(raw) if raw else ())

    def set_paused(self, scopes: set[str], *, paused: bool) -> frozenset[str]:
        import json

        with self.db.transaction():
            raw = self.db.get_meta("paused")
            current = set(json.loads(raw) if raw else ())
            current = current | scopes if paused else current - scopes
            self.db.set_meta("paused", json.dumps(sorted(current)))
            self.wake_after_commit("sender")
        return self.paused()

    def check_keyring(self) -> None:
        """Refuse to run with a different seed than the one this database was made with:
        every stored address would belong to someone else's keys. Watch-only keys must cover
        the deposit account of every chain."""
        from ..errors import KeyMaterialError

        # per deposit account: the public key of its first address (older databases hold
        # that address itself, as the chain's family formats it)
        first: dict[str, tuple[str, set[str]]] = {}
        for chain in self.config.chains:
            account = chain.spec.keys.deposit_path
            if not self.keyring.has_account(account):
                raise KeyMaterialError(f"chain {chain.id!r} derives its addresses from account {account}: "
                                       f"watch-only, it needs keys.accounts = {{ \"{account}\" = \"<its xpub>\" }}")
            pub = self.keyring.public_key(account, 0)
            _, shown = first.setdefault(account, (pub.hex(), set()))
            shown.add(chain.spec.address_from_public_key(pub))
        with self.db.transaction():
            for account, (value, addresses) in first.items():
                key = f"keyring.{account}"
                known = self.db.get_meta(key)
                if known is None or (known != value and known in addresses):
                    self.db.set_meta(key, value)
                elif known != value:
                    raise StorageError(
                        f"the configured keys do not match this database (its addresses of {account} were derived "
                        f"from another seed or account key; first key {known[:16]}..., the configured keys give "
                        f"{value[:16]}...). Point storage.path at the right database or restore the right seed."
                    )
