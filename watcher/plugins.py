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
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .chains import ChainFamily
from .errors import WatcherError

ENTRY_POINT_GROUP = "watcher.plugins"
# Built-in features that are plugins themselves: (name, "module:attribute"); a class is
# instantiated. An operator can unregister one by name (pm.unregister(name=...)).
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = tuple(
    (f"watcher.checks.{name}", f"watcher.checks:BUILTIN.{name}")
    for name in ("destination", "max_amount", "daily_limits", "label_rate")
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
    for impl in pm.hook.watcher_chain_families.get_hookimpls():
        try:
            provided = impl.function()
        except Exception as e:
            raise PluginError(f"plugin {impl.plugin_name!r}: watcher_chain_families raised {type(e).__name__}: {e}") from e
        for fam in provided or ():
            if not isinstance(fam, ChainFamily):
                raise PluginError(f"plugin {impl.plugin_name!r} returned {fam!r}, not a ChainFamily")
            if fam.name in families:
                raise PluginError(f"chain family {fam.name!r} is provided by both {owners[fam.name]!r} and {impl.plugin_name!r}")
            families[fam.name] = fam
            owners[fam.name] = impl.plugin_name
    return families


async def await_me_maybe(value: Any) -> Any:
    """Await ``value`` if a hook implementation returned an awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value
