"""Every hook a watcher plugin can implement. Hooks are synchronous; an implementation may
return an awaitable, which the core awaits (``await_me_maybe``). docs/plugins.md documents
each hook; a test fails if one is missing there."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .chains import ChainFamily
    from .daemon import Daemon

hookspec = pluggy.HookspecMarker("watcher")
hookimpl = pluggy.HookimplMarker("watcher")


# --- registration ----------------------------------------------------------------------------


@hookspec
def watcher_chain_families() -> list[ChainFamily]:
    """Return the chain families this plugin provides (e.g. ``[EvmFamily()]``).

    Called once, when the daemon or a CLI command loads its configuration; the results of all
    plugins are merged, and each ``[[chains]]`` entry picks a family by its ``name``.
    Not firstresult. If two plugins provide the same family name, or an implementation
    raises, start-up fails with an error naming the plugin: the daemon never runs with a
    half-loaded set of chains.
    """


# --- lifecycle -------------------------------------------------------------------------------


@hookspec
def watcher_startup(daemon: Daemon) -> Any:
    """Called once the store is open and the chain clients are connected, before any task
    starts. ``daemon`` gives access to ``config``, ``store``, ``metrics`` and the chains.
    May return an awaitable. If it raises, the daemon does not start (the error is printed
    with the plugin's name)."""


@hookspec
def watcher_shutdown(daemon: Daemon) -> Any:
    """Called once on the way out, after every task has stopped and before the store is
    closed. May return an awaitable, which gets a few seconds. Errors are logged with the
    plugin's name and do not stop the other plugins' shutdown hooks."""
