"""Every hook a watcher plugin can implement. Hooks are synchronous; an implementation may
return an awaitable, which the core awaits (``await_me_maybe``). Every call goes through
pluggy, so an implementation may take fewer arguments than its spec; the hooks the core drives
one implementation at a time use ``plugins.implementations``. docs/plugins.md documents each
hook; a test fails if one is missing there."""

# A spec has no body: pluggy reads only its signature (and mypy would want one that returns).
# mypy: disable-error-code="empty-body"

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .chains import ChainFamily
    from .checks import PayoutRequest, Veto
    from .daemon import Daemon
    from .store import Event

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


@hookspec
def watcher_rate_kinds() -> list[Any]:
    """Return the exchange-rate source kinds this plugin provides (``watcher.rates.RateKind``:
    a ``name``, the ``kind`` a ``[[rates.sources]]`` table names, and ``configure(table, config)``
    returning a source with the ``pairs`` it gives and ``async read(daemon)``). Built in:
    ``fixed`` (the core) and ``chainlink`` (the EVM plugin).

    Called once when a command opens its configuration. Not firstresult; a kind name may be
    provided once (start-up fails naming both plugins otherwise), and an implementation that
    raises stops start-up with the plugin's name. A source's ``read`` that raises makes its
    pairs unavailable (``503 rate_unavailable``, logged); it never stops the daemon.
    """


@hookspec
def watcher_config_sections() -> list[Any]:
    """Return the top-level config tables this plugin reads (``watcher.config.ConfigSection``:
    a table ``name`` such as ``"checkout"`` and ``parse(table, resolve)`` returning the parsed
    value, raising ``ConfigError`` for a bad key). The parsed value is ``config.sections[name]``
    when the table is present (absent table: no entry; a plugin is usually off then).

    Called when any command loads its configuration. Not firstresult; a table name may be
    claimed once, and never one the core reads (start-up fails naming the plugin). A key the
    parser did not ``take`` is an unknown key, as everywhere else.
    """


@hookspec
def watcher_routes(config: Any) -> list[Any]:
    """Return the HTTP routes this plugin serves (``watcher.api.RouteSet``s). A set without a
    ``listener`` joins the control API: its endpoints (``watcher.api.Endpoint``, each declaring
    ``auth`` and ``scope`` like the core's) are authenticated, rate limited and listed in
    ``/openapi.json`` exactly like the core's. A set with a ``listener`` (``watcher.api.Listener``:
    a name, an address to bind, the ``Host`` values it answers) is served on a listener of its
    own, next to the control API: nothing else is reachable there, its endpoints take no token
    (``auth=False``), each client address is rate limited, and unknown paths are a plain 404.

    Called once when the daemon starts serving. Not firstresult. A route that clashes with
    another (same method and path on the same listener), an API route under a path the core
    owns, a public route that asks for auth, or an implementation that raises stops start-up
    with the plugin's name. A handler that raises while serving is a 500 (logged with the
    route and counted as ``watcher_errors_total{kind="api"}``); the daemon keeps serving.
    On shutdown every listener drains together (``Daemon.stopping`` is set first: a long
    response such as an event stream ends itself then).
    """


@hookspec
def watcher_invoice_links(config: Any) -> dict[str, str]:
    """Return links every invoice gains, as URL templates with ``{id}`` (the invoice id), by
    field name; the known field is ``checkout_url`` (the checkout plugin's page). An invoice
    shows each known link field, null when no plugin provides it. Called once when the
    daemon or a command opens its configuration; a field provided twice, an unknown field or
    an implementation that raises stops start-up with the plugin's name.
    """


# --- lifecycle -------------------------------------------------------------------------------


@hookspec
def watcher_startup(daemon: Daemon) -> Any:
    """Called once the store is open, every node was asked who it is (one that could not be
    reached only got a warning) and every chain's client is open, before any task starts.
    ``daemon`` gives access to ``config``, ``store``, ``metrics`` and the chains:
    ``daemon.watchers[chain_id].client`` is the open client the chain's tasks then use (its
    calls raise ``NodeError`` while the node is down). May return an awaitable. If it raises,
    the daemon does not start (the error is printed with the plugin's name)."""


@hookspec
def watcher_shutdown(daemon: Daemon) -> Any:
    """Called once on the way out, after every task has stopped, while the chain clients are
    still open and before the store is closed; not called if start-up failed. May return an
    awaitable; all implementations together get a few seconds. Errors are logged with the
    plugin's name and do not stop the other plugins' shutdown hooks."""


# --- events ----------------------------------------------------------------------------------


@hookspec
def watcher_event(event: Event, daemon: Daemon) -> Any:
    """Called for every event in the outbox (``transfer.*``, ``invoice.*``, ...), after the
    transaction that wrote it committed: e.g. an app-specific ledger that credits an internal
    currency on ``transfer.confirmed``. May return an awaitable.

    Each implementation has its own durable cursor: events arrive in order and at least once
    (after a crash the last one may come again: dedupe on ``event.id``). A plugin installed
    later starts with the events written after it was first loaded. If the hook raises, the
    error is logged with the plugin's name and counted (``watcher_errors_total{kind=
    "plugin_event"}``), and the same event is retried with backoff (1 s doubling to 60 s); the
    plugin's later events wait, nothing else does. Not firstresult.
    """


@hookspec
def watcher_event_batch(events: list[Event], daemon: Daemon) -> Any:
    """Like ``watcher_event``, for a plugin that handles events in batches (e.g. publishing
    to a broker with one acknowledgement wait per batch): called with up to 500 events in
    outbox order; the plugin's durable cursor moves past all of them once the hook returned
    (one SQLite commit a batch). At least once: after a crash the last batch may come again
    (dedupe on ``event.id``). A plugin seen for the first time starts at the end of the outbox,
    unless it set its cursor itself in ``watcher_startup`` (``store.events.init_sink``). A
    plugin object with ``event_sink_enabled(daemon)`` returning False (e.g. its config table is
    absent) gets no cursor and no task.
    If the hook raises, the error is logged with the plugin's name and counted
    (``watcher_errors_total{kind="plugin_event"}``), and the same batch is retried with
    backoff (1 s doubling to 60 s); nothing else waits. Not firstresult.
    """


@hookspec
def watcher_ready(daemon: Daemon) -> str | None:
    """Return a problem that should make ``/readyz`` unready (e.g. "1,204 events behind"), or
    None. Called on every ``/readyz``; keep it cheap. ``/readyz`` lists each plugin's answer
    under ``plugins``. An implementation that raises counts as a problem (its error, named).
    """


# --- payouts ---------------------------------------------------------------------------------


@hookspec
def watcher_payout_check(payout: PayoutRequest, daemon: Daemon) -> Veto | None:
    """Called for every payout request before anything is written: return a ``Veto`` (with a
    reason the API shows the caller) to refuse it, or None to let it pass. May return an
    awaitable (e.g. a KYC lookup). The built-in limits, deny-list and destination checks are
    implementations of this hook too (``watcher.checks``).

    Implementations run one after another in pluggy's order (the built-in checks are
    ``tryfirst``); the first veto stops the payout (the API answers 422 ``payout_rejected``
    with its reason). If an implementation raises, the payout is
    refused too (fail closed: 503 ``payout_check_failed``, naming the plugin) and the error is
    logged. Not firstresult (every check runs until one vetoes).
    """
