"""The plugin manager: built by a factory, never at import time.

Built-in features are plugins too (``DEFAULT_PLUGINS``). Chain plugins, the EVM one
included, come from the ``watcher.plugins`` entry-point group; set ``WATCHER_PLUGINS`` to a
comma-separated allow-list of entry-point names to load only those (``WATCHER_PLUGINS=""``
loads none).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .chains import ChainFamily
from .config import CORE_TABLES, ConfigSection
from .errors import WatcherError

ENTRY_POINT_GROUP = "watcher.plugins"
# Built-in features that are plugins themselves: (name, "module:attribute"); a class is
# instantiated. An operator can unregister one by name (pm.unregister(name=...)). pluggy calls
# the plugin registered last first: the payout checks run destination, max_amount, ...
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = tuple(
    (f"watcher.checks.{name}", f"watcher.checks:BUILTIN.{name}")
    for name in ("label_rate", "daily_limits", "max_amount", "destination")
)


class PluginError(WatcherError):
    """A plugin failed to load or gave something the core cannot use."""

    code = "plugin_error"


def make_plugin_manager(*, load_entry_points: bool = True, extra: tuple[object, ...] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("watcher")
    pm.add_hookspecs(hookspecs)
    for name, ref in DEFAULT_PLUGINS:
        pm.register(_load(ref), name)
    if load_entry_points:
        allow = os.environ.get("WATCHER_PLUGINS")
        allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as e:
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}") from e
            pm.register(plugin, ep.name)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


def _load(ref: str) -> object:
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj() if isinstance(obj, type) else obj


def chain_families(pm: pluggy.PluginManager) -> Mapping[str, ChainFamily]:
    """Collect ``watcher_chain_families`` from every plugin; a name may be provided once."""
    families: dict[str, ChainFamily] = {}
    owners: dict[str, str] = {}
    for impl in implementations(pm, "watcher_chain_families"):
        try:
            provided = impl()
        except Exception as e:
            raise PluginError(f"plugin {impl.plugin_name!r}: watcher_chain_families raised {type(e).__name__}: {e}") from e
        if not provided:
            continue
        if not isinstance(provided, Iterable):
            raise PluginError(f"plugin {impl.plugin_name!r}: watcher_chain_families returned {provided!r}, "
                              "not a list of ChainFamily")
        for fam in provided:
            if not isinstance(fam, ChainFamily):
                raise PluginError(f"plugin {impl.plugin_name!r} returned {fam!r}, not a ChainFamily")
            if fam.name in families:
                raise PluginError(f"chain family {fam.name!r} is provided by both {owners[fam.name]!r} and {impl.plugin_name!r}")
            families[fam.name] = fam
            owners[fam.name] = impl.plugin_name
    return families


def rate_kinds(pm: pluggy.PluginManager) -> Mapping[str, Any]:
    """The built-in rate kinds and every plugin's ``watcher_rate_kinds``; a name once."""
    from .rates import BUILTIN_KINDS

    kinds: dict[str, Any] = {k.name: k for k in BUILTIN_KINDS}
    owners = dict.fromkeys(kinds, "watcher")
    for impl in implementations(pm, "watcher_rate_kinds"):
        try:
            provided = impl() or []
        except Exception as e:
            raise PluginError(f"plugin {impl.plugin_name!r}: watcher_rate_kinds raised {type(e).__name__}: {e}") from e
        for kind in provided:
            name = getattr(kind, "name", None)
            if not isinstance(name, str) or not callable(getattr(kind, "configure", None)):
                raise PluginError(f"plugin {impl.plugin_name!r} returned {kind!r}, not a rate kind")
            if name in kinds:
                raise PluginError(f"rate kind {name!r} is provided by both {owners[name]!r} and {impl.plugin_name!r}")
            kinds[name] = kind
            owners[name] = impl.plugin_name
    return kinds


def config_sections(pm: pluggy.PluginManager) -> Mapping[str, ConfigSection]:
    """Every plugin's ``watcher_config_sections``: a table name once, never a core one."""
    sections: dict[str, ConfigSection] = {}
    owners: dict[str, str] = {}
    for impl in implementations(pm, "watcher_config_sections"):
        try:
            provided = impl() or []
        except Exception as e:
            raise PluginError(f"plugin {impl.plugin_name!r}: watcher_config_sections raised {type(e).__name__}: {e}") from e
        for section in provided:
            if not isinstance(section, ConfigSection):
                raise PluginError(f"plugin {impl.plugin_name!r} returned {section!r}, not a ConfigSection")
            if section.name in CORE_TABLES:
                raise PluginError(f"plugin {impl.plugin_name!r} claims [{section.name}], a table the core reads")
            if section.name in sections:
                raise PluginError(f"config table [{section.name}] is claimed by both {owners[section.name]!r} "
                                  f"and {impl.plugin_name!r}")
            sections[section.name] = section
            owners[section.name] = impl.plugin_name
    return sections


def invoice_links(pm: pluggy.PluginManager, config: Any) -> dict[str, str]:
    """Every plugin's ``watcher_invoice_links`` for this configuration: a known field
    (``views.INVOICE_LINKS``) once."""
    from .views import INVOICE_LINKS

    links: dict[str, str] = {}
    for impl in implementations(pm, "watcher_invoice_links"):
        try:
            provided = impl(config=config) or {}
        except Exception as e:
            raise PluginError(f"plugin {impl.plugin_name!r}: watcher_invoice_links raised {type(e).__name__}: {e}") from e
        for name, template in dict(provided).items():
            if name not in INVOICE_LINKS:
                raise PluginError(f"plugin {impl.plugin_name!r}: unknown invoice link {name!r} "
                                  f"(known: {', '.join(INVOICE_LINKS)})")
            if name in links:
                raise PluginError(f"invoice link {name!r} is provided twice (again by {impl.plugin_name!r})")
            if not isinstance(template, str) or "{id}" not in template:
                raise PluginError(f"plugin {impl.plugin_name!r}: invoice link {name!r} must be a URL template "
                                  "with {id}")
            links[name] = template
    return links


async def await_me_maybe(value: Any) -> Any:
    """Await ``value`` if a hook implementation returned an awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value


@dataclass(frozen=True)
class Implementation:
    """One plugin's implementation of one hook, called on its own through pluggy (which
    passes it only the arguments it names, so it may take fewer than the spec)."""

    plugin_name: str
    caller: pluggy.HookCaller

    def __call__(self, **kwargs: Any) -> Any:
        """Call it with the hook's arguments; what it returned (None if it returned None)."""
        results = self.caller(**kwargs)
        return results[0] if results else None

    async def call(self, **kwargs: Any) -> Any:
        """Call it with the hook's arguments; await what it returns if that is awaitable."""
        return await await_me_maybe(self(**kwargs))


def implementations(pm: pluggy.PluginManager, name: str) -> list[Implementation]:
    """The implementations of hook ``name``, one caller each, in the order pluggy calls them
    (``tryfirst`` ones first, then the plugin registered last, ..., ``trylast`` ones last).
    For hooks the core drives one implementation at a time: each with its own cursor
    (``watcher_event``), one after another until one vetoes (``watcher_payout_check``), or
    with each one's errors kept apart (``watcher_shutdown``). The caller keeps the list: it
    holds the plugins registered now (a plugin registered later would join every caller)."""
    impls = [i for i in getattr(pm.hook, name).get_hookimpls() if not (i.wrapper or i.hookwrapper)]
    plugins = [i.plugin for i in impls]
    return [Implementation(i.plugin_name, pm.subset_hook_caller(name, [p for p in plugins if p is not i.plugin]))
            for i in reversed(impls)]
