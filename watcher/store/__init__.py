"""The store: the only code that writes the SQLite file.

``Store`` ties the database to what the domain code needs around it (config, chain families
for address formatting, the keyring for public derivation, metrics, the clock) and exposes
one object per table group: ``chains``, ``addresses``, ``transfers``, ``invoices``,
``events`` (the outbox), ``webhooks`` (endpoints and deliveries), ``audit``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..clock import Clock
from ..errors import NotFound
from ..metrics import Metrics
from .addresses import Addresses, WatchedAddress
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
    from ..chains import ChainFamily
    from ..config import ChainConfig, Config
    from ..keys import Keyring

__all__ = ["Cursor", "Database", "Event", "ScanResult", "StorageError", "Store", "WatchedAddress"]


class Store:
    def __init__(
        self,
        db: Database,
        *,
        config: Config,
        families: Mapping[str, ChainFamily],
        keyring: Keyring,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
    ):
        self.db = db
        self.config = config
        self.families = families
        self.keyring = keyring
        self.metrics = metrics or Metrics()
        self.clock = clock or Clock()
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
    def open(cls, config: Config, *, families: Mapping[str, ChainFamily], keyring: Keyring,
             metrics: Metrics | None = None, clock: Clock | None = None) -> Store:
        db = Database(config.storage.path, synchronous=config.storage.synchronous)
        db.migrate()
        store = cls(db, config=config, families=families, keyring=keyring, metrics=metrics, clock=clock)
        store.check_keyring()
        return store

    def close(self) -> None:
        self.db.close()

    def chain_config(self, chain: str) -> ChainConfig:
        cfg = self.config.chain(chain)
        if cfg is None:
            raise NotFound(f"unknown chain {chain!r}", code="unknown_chain")
        return cfg

    def family(self, chain: str) -> ChainFamily:
        return self.families[self.chain_config(chain).family]

    # --- the hot wallet and the kill switch ------------------------------------------------

    def hot_wallet(self, chain: str) -> str | None:
        """The chain's hot wallet address (m/44'/coin'/1'/0/0), None when watch-only."""
        if chain not in self._hot:
            from ..keys import HOT_WALLET_ACCOUNT

            family = self.family(chain)
            if self.keyring.watch_only:
                self._hot[chain] = None
            else:
                pub = self.keyring.public_key(family.bip44_coin, 0, account=HOT_WALLET_ACCOUNT)
                self._hot[chain] = family.address_from_public_key(pub)
        return self._hot[chain]

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
        every stored address would belong to someone else's keys."""
        fingerprints = {}
        for fam in {f.bip44_coin: f for f in self.families.values()}.values():
            pub = self.keyring.public_key(fam.bip44_coin, 0)
            fingerprints[f"keyring.coin{fam.bip44_coin}"] = fam.address_from_public_key(pub)
        with self.db.transaction():
            for key, value in fingerprints.items():
                known = self.db.get_meta(key)
                if known is None:
                    self.db.set_meta(key, value)
                elif known != value:
                    raise StorageError(
                        f"the configured keys do not match this database (its addresses were derived from "
                        f"another seed or xpub; first address {known}, keys give {value}). "
                        "Point storage.path at the right database or restore the right seed."
                    )
