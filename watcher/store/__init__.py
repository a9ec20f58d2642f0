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
from .db import Database, StorageError
from .events import Event, Outbox
from .invoices import Invoices
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
