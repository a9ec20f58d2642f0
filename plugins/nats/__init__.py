"""Every event into a NATS JetStream stream (built-in plugin, entry point ``nats``; on when
``[nats]`` is in the config): watcher's way out of one machine. docs/scaling.md.

```toml
[nats]
url = "nats://127.0.0.1:4222"     # or ["nats://a:4222", "nats://b:4222"] for a cluster
stream = "WATCHER"                # created if missing, subjects "<subject_prefix>.>", file storage
subject_prefix = "watcher"        # <prefix>.<chain>.<event type>; "_" for events without a chain
duplicate_window = "10m"          # JetStream de-duplication window of the stream it creates
start = "new"                     # "new": events from the plugin's first run on; "all": the whole outbox once
# credentials_file = "/etc/watcher/nats.creds"   # NATS user JWT + seed
# tls_ca_file = "/etc/watcher/nats-ca.pem"      # with tls:// URLs; tls_cert_file + tls_key_file for mTLS
# max_behind = 10000              # /readyz is unready while more events than this wait
# timeout = 5.0                   # seconds for a batch's acknowledgements
```

Each message's body is the event exactly as ``GET /v1/events`` shows it; its ``Nats-Msg-Id``
header is the event id, so JetStream drops a message published again after a crash (within the
duplicate window). Publishing goes through ``watcher_event_batch``: up to 500 events are
published without waiting, their acknowledgements awaited together, and only then does the
plugin's cursor move (one SQLite commit a batch). NATS being down or slow holds up only this
plugin: the batch is retried with backoff, ``watcher_nats_*`` metrics and ``/readyz`` say so.

nats-py is asyncio-only: it runs on an asyncio loop in a thread of its own
(:class:`AsyncioThread`), which the Trio side calls into and awaits without blocking.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from prometheus_client import Counter, Gauge

from watcher import views
from watcher.config import ConfigSection, ConfigTable
from watcher.errors import ConfigError
from watcher.hookspecs import hookimpl

if TYPE_CHECKING:
    from watcher.daemon import Daemon
    from watcher.store import Event

__all__ = ["AsyncioThread", "NatsConfig", "subject_for"]

log = logging.getLogger(__name__)
PLUGIN = "nats"  # the entry point's name: the sink cursor's name
T = TypeVar("T")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class NatsConfig:
    servers: tuple[str, ...]
    stream: str = "WATCHER"
    subject_prefix: str = "watcher"
    duplicate_window: float = 600.0  # seconds
    start: str = "new"
    credentials_file: Path | None = None
    tls_ca_file: Path | None = None  # the CA that signed the servers' certificates (tls:// URLs)
    tls_cert_file: Path | None = None  # a client certificate, if the servers ask for one
    tls_key_file: Path | None = None
    max_behind: int = 10_000
    timeout: float = 5.0


def parse_duration(text: str) -> float | None:
    m = re.fullmatch(r"(\d{1,7})(ms|s|m|h)", text.strip())
    if not m:
        return None
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_nats(t: ConfigTable, resolve: Callable[[str], Path]) -> NatsConfig:
    raw = t.take("url", (str, list), "nats://127.0.0.1:4222")
    servers = (raw,) if isinstance(raw, str) else tuple(raw)
    if not servers or len(servers) > 32 or not all(
            isinstance(u, str) and re.fullmatch(r"(nats|tls)://[^\s/]+", u) for u in servers):
        raise ConfigError(t.key("url"), "must be a nats:// or tls:// URL (host:port), or a list of 1-32 of them")
    stream = t.take("stream", str, "WATCHER", check=lambda v: None if _TOKEN_RE.match(v) else
                    "must be 1-64 of A-Z a-z 0-9 _ -")
    prefix = t.take("subject_prefix", str, "watcher", check=lambda v: None if re.fullmatch(
        r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}", v) else "must be subject tokens (a-z 0-9 _ -) joined by dots")
    window_text = t.take("duplicate_window", str, "10m")
    window = parse_duration(window_text)
    if window is None or not 1 <= window <= 7 * 86400:
        raise ConfigError(t.key("duplicate_window"), "must be a duration such as \"10m\", \"90s\" or \"2h\" (1 s to 7 days)")
    start = t.take("start", str, "new", check=lambda v: None if v in ("new", "all") else "must be \"new\" or \"all\"")
    creds = t.take("credentials_file", str, None)
    tls = {k: t.take(k, str, None) for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")}
    if (tls["tls_cert_file"] is None) != (tls["tls_key_file"] is None):
        raise ConfigError(t.key("tls_cert_file"), "tls_cert_file and tls_key_file go together")
    max_behind = t.take("max_behind", int, 10_000, check=lambda v: None if 1 <= v <= 100_000_000 else
                        "must be between 1 and 100000000")
    timeout = t.take("timeout", float, 5.0, check=lambda v: None if 0.1 <= v <= 300 else "must be 0.1-300 seconds")
    return NatsConfig(servers=servers, stream=stream, subject_prefix=prefix, duplicate_window=window, start=start,
                      credentials_file=resolve(creds) if creds else None, max_behind=max_behind, timeout=timeout,
                      **{k: resolve(v) if v else None for k, v in tls.items()})


def subject_for(cfg: NatsConfig, event: Event) -> str:
    """``<prefix>.<chain>.<event type>``: e.g. ``watcher.devnet.transfer.confirmed``."""
    return f"{cfg.subject_prefix}.{event.chain or '_'}.{event.type}"


_HEADROOM = 1024  # the server's max_payload counts the headers (Nats-Msg-Id) too


def shortened(body: bytes, limit: int) -> bytes:
    """An event too big for the server's ``max_payload`` (an invoice with thousands of dust
    payments: anyone can send them to its address), without the lists and objects of its
    data: ``truncated`` names them, ``size`` is the whole event's length, and the whole event
    stays in ``GET /v1/events``. Refused every time, it held up every event after it."""
    event = json.loads(body)
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    dropped = sorted(k for k, v in data.items() if isinstance(v, list | dict))
    event["data"] = {k: v for k, v in data.items() if k not in dropped}
    event["truncated"], event["size"] = dropped, len(body)
    out = json.dumps(event, separators=(",", ":")).encode()
    if len(out) > limit:  # long strings even so: the envelope alone
        event["data"], event["truncated"] = {}, sorted(data)
        out = json.dumps(event, separators=(",", ":")).encode()
    log.warning("nats: event %s is %d bytes, over the server's max_payload; published without %s",
                event.get("id"), len(body), ", ".join(event["truncated"]) or "nothing")
    return out


class AsyncioThread:
    """An asyncio event loop in a daemon thread, for an asyncio-only library (nats-py) inside
    a Trio program: :meth:`run` schedules a coroutine there and waits for it without blocking
    Trio (the result comes back through the Trio token); cancelling the wait cancels it."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    async def run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: Any) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        fut = asyncio.run_coroutine_threadsafe(make(), self.loop)
        fut.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            fut.cancel()
            raise
        return fut.result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()


class Publisher:
    """One daemon's connection to NATS: connects (and creates the stream) on first use,
    publishes batches, and is dropped and made again after an error."""

    def __init__(self, daemon: Daemon, cfg: NatsConfig):
        self.cfg = cfg
        self.daemon = daemon
        self.thread = AsyncioThread("watcher-nats")
        self.nc: Any = None
        self.js: Any = None
        reg = daemon.metrics.registry
        self.published = Counter("watcher_nats_published_total", "Events JetStream acknowledged (duplicates "
                                 "it dropped included).", registry=reg)
        self.duplicates = Counter("watcher_nats_duplicates_total", "Events JetStream acknowledged as duplicates "
                                  "(published again after a crash).", registry=reg)
        self.failures = Counter("watcher_nats_failures_total", "Batches that failed to publish (retried).",
                                registry=reg)
        self.behind = Gauge("watcher_nats_events_behind", "Events written that are not in JetStream yet.",
                            registry=reg)
        self.connected = Gauge("watcher_nats_connected", "1 while connected to NATS.", registry=reg)

    async def _connect(self) -> None:
        import nats
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        cfg = self.cfg
        async def quiet(e: Exception) -> None:  # the failed batch is logged (once) by the sink
            log.debug("nats: %s", e)

        options: dict[str, Any] = {"servers": list(cfg.servers), "connect_timeout": cfg.timeout,
                                   "max_reconnect_attempts": 0, "allow_reconnect": False, "name": "watcher",
                                   "error_cb": quiet}
        if cfg.credentials_file is not None:
            options["user_credentials"] = str(cfg.credentials_file)
        if cfg.tls_ca_file or cfg.tls_cert_file or any(s.startswith("tls://") for s in cfg.servers):
            import ssl

            ctx = ssl.create_default_context(cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
            if cfg.tls_cert_file and cfg.tls_key_file:
                ctx.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file))
            options["tls"] = ctx
        # nats-py retries a first connection that is refused for ever: bound it ourselves
        try:
            nc = await asyncio.wait_for(nats.connect(**options), timeout=cfg.timeout * 2)
        except TimeoutError:
            raise ConnectionError(f"cannot connect to {', '.join(cfg.servers)} within {cfg.timeout * 2:g} s") from None
        js = nc.jetstream(timeout=cfg.timeout)
        try:
            await js.stream_info(cfg.stream)
        except NotFoundError:
            await js.add_stream(StreamConfig(name=cfg.stream, subjects=[f"{cfg.subject_prefix}.>"],
                                             storage=StorageType.FILE, duplicate_window=cfg.duplicate_window))
            log.info("nats: created stream %s (subjects %s.>)", cfg.stream, cfg.subject_prefix)
        self.nc, self.js = nc, js

    async def _publish(self, messages: list[tuple[str, bytes, str]]) -> tuple[int, int]:
        if self.nc is None or self.nc.is_closed:
            await self._connect()
        limit = self.nc.max_payload - _HEADROOM
        messages = [(subject, body if len(body) <= limit else shortened(body, limit), msg_id)
                    for subject, body, msg_id in messages]
        futures = [await self.js.publish_async(subject, body, headers={"Nats-Msg-Id": msg_id},
                                               stream=self.cfg.stream) for subject, body, msg_id in messages]
        acks = await asyncio.wait_for(asyncio.gather(*futures), timeout=self.cfg.timeout)
        return len(acks), sum(1 for a in acks if getattr(a, "duplicate", False))

    async def _close(self) -> None:
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.close(), timeout=2)
            except Exception:  # already broken: nothing to close cleanly
                pass

    async def publish(self, events: list[Event]) -> None:
        messages = [(subject_for(self.cfg, e), views.event_json(e), e.id) for e in events]
        try:
            acked, dups = await self.thread.run(lambda: self._publish(messages))
        except BaseException as e:
            self.failures.inc()
            self.connected.set(0)
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                await self.thread.run(self._close)
            if isinstance(e, Exception):
                raise NatsUnavailable(f"nats: publishing {len(events)} events failed: {type(e).__name__}: {e}") from None
            raise
        self.connected.set(1)
        self.published.inc(acked)
        self.duplicates.inc(dups)

    async def close(self) -> None:
        with trio.move_on_after(3):
            await self.thread.run(self._close)
        self.thread.close()


class NatsUnavailable(Exception):
    pass


_publishers: weakref.WeakKeyDictionary[Any, Publisher] = weakref.WeakKeyDictionary()


def _cfg(daemon: Daemon) -> NatsConfig | None:
    cfg = daemon.config.sections.get("nats")
    return cfg if isinstance(cfg, NatsConfig) else None


class NatsPlugin:
    def event_sink_enabled(self, daemon: Daemon) -> bool:
        """Off without [nats]: no cursor is made, so turning it on later with start = "all"
        still backfills."""
        return _cfg(daemon) is not None

    @hookimpl
    def watcher_config_sections(self) -> list[ConfigSection]:
        return [ConfigSection("nats", parse_nats)]

    @hookimpl
    def watcher_startup(self, daemon: Daemon) -> None:
        cfg = _cfg(daemon)
        if cfg is None:
            return
        if cfg.start == "all" and daemon.store.events.init_sink(PLUGIN, 0):
            log.info("nats: first run with start = \"all\": publishing the whole outbox (%d events)",
                     daemon.store.events.last_seq())
        _publishers[daemon] = Publisher(daemon, cfg)

    @hookimpl
    async def watcher_event_batch(self, events: list[Event], daemon: Daemon) -> None:
        publisher = _publishers[daemon]
        await publisher.publish(events)
        behind = daemon.sinks.behind(PLUGIN)
        publisher.behind.set(max(0, (behind or 0) - len(events)))

    @hookimpl
    def watcher_ready(self, daemon: Daemon) -> str | None:
        cfg = _cfg(daemon)
        if cfg is None:
            return None
        behind = daemon.sinks.behind(PLUGIN) or 0
        if behind > cfg.max_behind:
            return f"{behind} events not yet in JetStream (max_behind {cfg.max_behind})"
        return None

    @hookimpl
    async def watcher_shutdown(self, daemon: Daemon) -> None:
        publisher = _publishers.pop(daemon, None)
        if publisher is not None:
            await publisher.close()


plugin = NatsPlugin()
