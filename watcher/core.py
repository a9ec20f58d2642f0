"""What every watcher command needs, and nothing that runs: the plugins, the config, the keys,
the database and the views of its objects. The CLI opens a :class:`Core` to print an address
or pause payouts without starting a scanner, a sender or the API; the daemon
(``watcher.daemon.Daemon``) is a Core plus its tasks.

``Core.open`` does everything that can fail fast and synchronously (plugins, config, keys,
database, migrations, the seed check), so a mistake stops any command before it does anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pluggy
from prometheus_client import CollectorRegistry

from .chains import ChainClient, ChainFamily
from .clock import Clock
from .config import Config, load_config
from .keys import Keyring
from .metrics import Metrics
from .plugins import chain_families, config_sections, invoice_links, make_plugin_manager, rate_kinds
from .rates import Rates
from .store import Store
from .views import Views


@dataclass
class Core:
    config: Config
    pm: pluggy.PluginManager
    families: Mapping[str, ChainFamily]
    keyring: Keyring
    store: Store
    metrics: Metrics
    clock: Clock
    views: Views
    rates: Rates

    @classmethod
    def open(cls, config: Config | str | Path, *, pm: pluggy.PluginManager | None = None,
             registry: CollectorRegistry | None = None, clock: Clock | None = None) -> Core:
        pm = pm or make_plugin_manager()
        families = chain_families(pm)
        if not isinstance(config, Config):
            config = load_config(config, families, config_sections(pm))
        config = dataclasses.replace(config, invoice_links=invoice_links(pm, config))
        rates = Rates.from_config(config, rate_kinds(pm))  # a bad [[rates.sources]] stops any command
        keyring = Keyring.from_config(config.keys)
        metrics = Metrics(registry)
        clock = clock or Clock()
        store = Store.open(config, keyring=keyring, metrics=metrics, clock=clock)
        if rates.sources:
            store.valuer = rates.value_of  # each transfer's worth in [rates] reference, when detected
        metrics.watch_store(store)
        return cls(config=config, pm=pm, families=families, keyring=keyring, store=store, metrics=metrics,
                   clock=clock, views=Views(store), rates=rates)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Core:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def open_client(self, chain: str) -> ChainClient:
        """A client for one chain's node (enter it as an async context), for commands that ask
        the node something once (``watcher status``, ``watcher reconcile``)."""
        from .scanner import ChainWatcher

        return ChainWatcher(self.store.chain_config(chain), self.store, self.metrics).open_client()
