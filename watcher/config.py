"""Loading and checking ``watcher.toml``.

Every mistake is reported as a :class:`ConfigError` whose message starts with the key path
(``chains[0].rpc_url: ...``), says what is wrong, and suggests the nearest known key for a
misspelt one. Relative paths are resolved against the directory of the config file, so the
daemon behaves the same whatever its working directory.

Chain families add their own per-chain keys: the core reads the keys every chain has, then
hands the same :class:`ConfigTable` to the family's ``parse_options``; whatever neither of
them took is an unknown key.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .auth import APP_SCOPES, CONFIG_ID_PREFIX, SCOPES, Principal, Rate, check_scopes, parse_rate
from .errors import ConfigError, InvalidAddress
from .forwarding import Network, parse_networks
from .policy import PayoutPolicy, SweepConfig, parse_paused, parse_payouts, parse_sweep

if TYPE_CHECKING:
    from .chains import ChainFamily, ChainSpec

_MISSING: Any = object()
CHAIN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SYMBOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,15}$")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigTable:
    """A TOML table being read: ``take`` each known key, then ``done`` rejects the rest."""

    def __init__(self, raw: Any, where: str):
        if not isinstance(raw, Mapping):
            raise ConfigError(where, f"must be a table, got {_kind(raw)}")
        self.raw = dict(raw)
        self.where = where
        self._taken: set[str] = set()
        self._tables: dict[str, ConfigTable] = {}

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def has(self, name: str) -> bool:
        return name in self.raw

    def take(
        self,
        name: str,
        kind: type | tuple[type, ...],
        default: Any = _MISSING,
        *,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        """Return ``raw[name]`` after checking its type and, if given, ``check(value)``, which
        returns a problem description or None."""
        self._taken.add(name)
        if name not in self.raw:
            if default is _MISSING:
                raise ConfigError(self.key(name), "is required")
            return default
        value = self.raw[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML ints are acceptable where floats are expected; bools are never ints here.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(self.key(name), f"must be {_names(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(self.key(name), f"must be {_names(kinds)}, got {_kind(value)}")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(self.key(name), problem)
        return value

    def table(self, name: str, *, required: bool = False) -> ConfigTable:
        """The sub-table ``name`` (empty if absent). The same object every time, so a chain
        family and the core can each take their own keys of ``[chains.payouts]``."""
        self._taken.add(name)
        if name not in self._tables:
            if name not in self.raw:
                if required:
                    raise ConfigError(self.key(name), "is required")
                self._tables[name] = ConfigTable({}, self.key(name))
            else:
                self._tables[name] = ConfigTable(self.raw[name], self.key(name))
        return self._tables[name]

    def array_of_tables(self, name: str) -> list[ConfigTable]:
        self._taken.add(name)
        value = self.raw.get(name, [])
        header = re.sub(r"\[\d+\]", "", self.key(name))  # chains[0].assets -> [[chains.assets]]
        if isinstance(value, Mapping):
            raise ConfigError(self.key(name), f"must be an array of tables: write [[{header}]] (double brackets), "
                                              f"not [{header}]")
        if not isinstance(value, list):
            raise ConfigError(self.key(name), f"must be an array of tables ([[{header}]]), got {_kind(value)}")
        return [ConfigTable(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def done(self) -> None:
        for name in self.raw:
            if name not in self._taken:
                hint = difflib.get_close_matches(name, sorted(self._taken), n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(self.key(name), f"unknown key{suffix}")


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", datetime.datetime: "a date-time", datetime.date: "a date",
            datetime.time: "a time"}.get(type(value), type(value).__name__)


def _names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "an array", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


# --- checks, each returning a problem or None ------------------------------------------------


def positive(v: float) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v}"


def non_negative(v: int) -> str | None:
    return None if v >= 0 else f"must be 0 or more, got {v}"


def between(lo: float, hi: float) -> Callable[[float], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}"


def http_url(v: str) -> str | None:
    """Why ``v`` is not an http(s) URL with a host, or None. The URL is shown only as
    :func:`shown_url` shows it: a node's URL may carry a password or an API key (in its user
    info, path or query), and this message goes to the terminal and the journal."""
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        return f"{shown_url(v)} is not a valid URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{shown_url(v)} is not an http(s) URL with a host"
    if any(c.isspace() or ord(c) < 0x20 for c in v):
        return f"{shown_url(v)} contains whitespace or control characters"
    return None


def ws_url(v: str) -> str | None:
    problem = http_url(v.replace("ws://", "http://", 1).replace("wss://", "https://", 1))
    if problem or not v.startswith(("ws://", "wss://")):
        return f"{shown_url(v)} is not a ws(s):// URL with a host"
    return None


def shown_url(v: str) -> str:
    """What a config error may show of a URL: all of it if it has no user info, path, query or
    fragment (where a password or an API key would be), else its scheme and host."""
    try:
        path = urlsplit(v).path if "://" in v else ("/" if "/" in v else "")
    except ValueError:
        path = "?"
    if not any(c in v for c in "@?#") and path.rstrip() in ("", "/"):
        return repr(v)
    try:
        return repr(redacted_url(v.strip()) + "/...")
    except ValueError:
        return "the URL"


def redacted_url(url: str) -> str:
    """``scheme://host[:port]`` of a URL: what may be shown of a node's address."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}, got {v!r}"


def fraction(t: ConfigTable, name: str, default: str, lo: int, hi: int) -> int:
    """A decimal fraction key (``"0.2"``) in parts per million, between ``lo`` and ``hi`` ppm."""
    from .errors import InvalidAmount
    from .money import parse_amount

    raw = t.take(name, str, default)
    try:
        ppm = parse_amount(raw, 6, allow_zero=True, what=name)
    except InvalidAmount as e:
        raise ConfigError(t.key(name), e.message) from None
    if not lo <= ppm <= hi:
        raise ConfigError(t.key(name), f"must be between {lo / 1e6:g} and {hi / 1e6:g}")
    return ppm


# --- the configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class AssetConfig:
    symbol: str
    decimals: int
    contract: str | None = None  # canonical form (the family's validate_address), None = native


@dataclass(frozen=True)
class NodeConfig:
    """One node of a chain: its JSON-RPC ``url``, where the family can be pushed new heads
    its ``ws_url``, and the family's own keys for it (``options``)."""

    url: str
    ws_url: str | None = None
    # the family's own keys of this node's [[chains.nodes]] table (ChainFamily.node_options),
    # e.g. the bitcoin family's rpc_cookie_file
    options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        """As logs, metrics and the API name it: scheme, host and port (never credentials)."""
        return redacted_url(self.url)


@dataclass(frozen=True)
class ChainConfig:
    id: str
    family: str
    rpc_url: str  # the first node's
    native_symbol: str
    native_decimals: int
    confirmations: int
    finality_depth: int
    start_block: int | None
    poll_interval: float
    batch_size: int
    max_lag: int
    rpc_timeout: float
    assets: tuple[AssetConfig, ...]
    spec: ChainSpec  # what the family made of the entry (its address format, keys, options)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    payouts: PayoutPolicy = field(default_factory=PayoutPolicy)
    nodes: tuple[NodeConfig, ...] = ()  # every node, in order of preference (rpc_url's first)

    def __post_init__(self) -> None:
        if not self.nodes:  # made in code with rpc_url only
            object.__setattr__(self, "nodes", (NodeConfig(self.rpc_url),))

    def asset(self, symbol: str) -> AssetConfig | None:
        for a in self.assets:
            if a.symbol == symbol:
                return a
        return None

    @property
    def node(self) -> str:
        """The node as logs and errors name it: scheme, host and port of ``rpc_url``, never
        its credentials (``user:pass@``) or its path and query (where providers put API keys)."""
        return redacted_url(self.rpc_url)

    @property
    def native(self) -> AssetConfig:
        return self.assets[0]

    @property
    def tokens(self) -> tuple[AssetConfig, ...]:
        return tuple(a for a in self.assets if a.contract is not None)


@dataclass(frozen=True)
class StorageConfig:
    path: Path
    synchronous: str = "full"
    # a chain watching at most this many addresses keeps them in memory for the scan's
    # lookups (see Addresses.watched); 0: always the index
    watched_in_memory: int = 250_000


@dataclass(frozen=True)
class KeysConfig:
    mnemonic_file: Path | None = None
    passphrase_file: Path | None = None
    xpub: str | None = None  # shorthand for accounts = { "m/44'/60'/0'" = xpub }
    accounts: Mapping[str, str] = field(default_factory=dict)  # watch-only: account path -> extended public key
    # seals webhook secrets and signed API keys in the database (watcher.secretbox); parsing
    # defaults it to secrets.key beside the config file
    secrets_key_file: Path | None = None

    @property
    def watch_only(self) -> bool:
        return self.mnemonic_file is None


FAILED_AUTH_LIMIT = Rate(20, 60)  # a burst of 20, then one every 3 s


@dataclass(frozen=True)
class ApiToken:
    """A bearer token from the config (bootstrap): ``[api] token``, ``admin_token`` and the
    ``[api.tokens]`` entries. Its principal id is ``config:<name>``."""

    name: str
    token: str = field(repr=False)
    scopes: frozenset[str]

    def principal(self, api: ApiConfig) -> Principal:
        return Principal(id=CONFIG_ID_PREFIX + self.name, name=self.name, scopes=self.scopes,
                         rate_limit=api.rate_limit, payout_rate_limit=api.payout_rate_limit)


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8420
    tokens: Mapping[str, ApiToken] = field(default_factory=dict)  # by name
    metrics_auth: bool = False  # /metrics needs a bearer token too
    max_body_bytes: int = 64 * 1024
    rate_limit: Rate | None = None  # per key, unless the key has its own
    payout_rate_limit: Rate | None = None  # money-moving requests per key, unless the key has its own
    failed_auth_limit: Rate = FAILED_AUTH_LIMIT  # failed authentications per client address
    # Host header values accepted (DNS rebinding): "host:port"; parsing fills in the default
    hosts: frozenset[str] = frozenset()
    body_timeout: float = 30.0  # seconds to receive a whole request body
    # reverse proxies whose X-Forwarded-For names the client (watcher.forwarding)
    trusted_proxies: tuple[Network, ...] = ()

    @property
    def proxied(self) -> bool:
        """The config says a reverse proxy sits in front: ``trusted_proxies`` lists one, or
        ``hosts`` accepts a name other than a loopback one (the proxy's public name). Then a
        request that looks local may well be the proxy's (nginx's default ``proxy_pass``
        sends ``Host: 127.0.0.1:<port>`` and no forwarding header)."""
        if self.trusted_proxies:
            return True
        for host in self.hosts:
            name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name == "localhost":
                continue
            try:
                if ipaddress.ip_address(name).is_loopback:
                    continue
            except ValueError:
                pass
            if name != self.host:
                return True
        return False

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto: text on a TTY, JSON lines otherwise


@dataclass(frozen=True)
class InvoicesConfig:
    default_expires_in: int = 3600  # seconds an invoice waits for full payment
    max_expires_in: int = 30 * 86400
    monitoring_window: int = 86400  # seconds after expiry during which payments still count
    default_tolerance_ppm: int = 0  # underpayment accepted, parts per million


@dataclass(frozen=True)
class WebhooksConfig:
    timeout: float = 10.0  # seconds per delivery attempt
    concurrency: int = 64  # attempts in flight to failing endpoints together (the slow lane)
    per_endpoint_concurrency: int = 4  # attempts in flight to one endpoint
    # delay before each attempt, seconds: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h
    schedule: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    rotation_grace: int = 86400  # seconds the previous secret still signs after a rotation
    allowed_hosts: tuple[str, ...] = ()  # webhook URL hosts allowed ("*.example.com"); empty: any public
    max_endpoints: int = 100  # webhook endpoints at most (each may hold per_endpoint_concurrency connections)


@dataclass(frozen=True)
class RatesConfig:
    reference: str = "USD"  # the currency transfers' values are reported in
    max_age: int = 3600  # seconds: an older rate is never used
    refresh: float = 30.0  # seconds a source's answer is reused
    quote_ttl: int = 900  # seconds a quote holds its amount
    sources: tuple[Mapping[str, Any], ...] = ()  # [[rates.sources]], read by their kind (watcher.rates)


@dataclass(frozen=True)
class ConfigSection:
    """A top-level table a plugin reads (hook ``watcher_config_sections``): ``parse(table,
    resolve)`` takes its keys from the :class:`ConfigTable` (``resolve`` turns a relative path
    into one next to the config file) and returns what ``config.sections[name]`` holds."""

    name: str
    parse: Callable[[ConfigTable, Callable[[str], Path]], Any]


#: The top-level tables the core reads; no plugin may claim one.
CORE_TABLES = frozenset({"storage", "keys", "api", "log", "invoices", "admin", "webhooks", "rates", "chains"})


@dataclass(frozen=True)
class Config:
    path: Path | None
    storage: StorageConfig
    keys: KeysConfig
    api: ApiConfig
    log: LogConfig
    chains: tuple[ChainConfig, ...]
    invoices: InvoicesConfig = field(default_factory=InvoicesConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    paused: frozenset[str] = frozenset()  # [admin] paused: scopes held by config
    rates: RatesConfig = field(default_factory=RatesConfig)
    sections: Mapping[str, Any] = field(default_factory=dict)  # plugin tables present, parsed
    # links every invoice shows (hook watcher_invoice_links): field name -> URL template with {id}
    invoice_links: Mapping[str, str] = field(default_factory=dict)

    def chain(self, chain_id: str) -> ChainConfig | None:
        for c in self.chains:
            if c.id == chain_id:
                return c
        return None


def load_config(path: str | Path, families: Mapping[str, ChainFamily],
                sections: Mapping[str, ConfigSection] | None = None) -> Config:
    """Read and check the TOML file at ``path``. ``families`` maps family names to the chain
    families the loaded plugins provide, ``sections`` table names to the plugins' tables."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError("", f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError("", f"{path}: not valid TOML: the file is not UTF-8 (bad byte at line {line})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path}: not valid TOML: {e}") from None
    return parse_config(raw, families, base_dir=path.resolve().parent, path=path, sections=sections)


def parse_config(
    raw: Mapping[str, Any],
    families: Mapping[str, ChainFamily],
    *,
    base_dir: Path,
    path: Path | None = None,
    sections: Mapping[str, ConfigSection] | None = None,
) -> Config:
    top = ConfigTable(raw, "")

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base_dir / q

    st = top.table("storage", required=True)
    storage = StorageConfig(
        path=resolve(st.take("path", str, check=lambda v: None if v.strip() else "must not be empty")),
        synchronous=st.take("synchronous", str, "full", check=one_of("normal", "full", "extra")),
        watched_in_memory=st.take("watched_in_memory", int, 250_000, check=between(0, 100_000_000)),
    )
    st.done()
    problem = _storage_path_problem(storage.path)
    if problem:
        raise ConfigError(st.key("path"), problem)

    keys = _parse_keys(top.table("keys", required=True), resolve)
    api = _parse_api(top.table("api"))

    lg = top.table("log")
    log = LogConfig(
        level=lg.take("level", str, "info", check=one_of(*LOG_LEVELS)),
        format=lg.take("format", str, "auto", check=one_of("auto", "json", "text")),
    )
    lg.done()

    invoices = _parse_invoices(top.table("invoices"))
    paused = parse_paused(top.table("admin"))
    webhooks = _parse_webhooks(top.table("webhooks"))
    rates = _parse_rates(top.table("rates"))

    tables = top.array_of_tables("chains")
    if not tables:
        raise ConfigError("chains", "at least one [[chains]] entry is required")
    chains = []
    seen: set[str] = set()
    for t in tables:
        chain = _parse_chain(t, families)
        if chain.id in seen:
            raise ConfigError(t.key("id"), f"duplicate chain id {chain.id!r}")
        seen.add(chain.id)
        chains.append(chain)
    parsed: dict[str, Any] = {}
    for name, section in (sections or {}).items():
        if top.has(name):
            t = top.table(name)
            parsed[name] = section.parse(t, resolve)
            t.done()
    top.done()
    return Config(path=path, storage=storage, keys=keys, api=api, log=log, chains=tuple(chains),
                  invoices=invoices, webhooks=webhooks, paused=paused, rates=rates, sections=parsed)


def _storage_path_problem(path: Path) -> str | None:
    """What keeps the database file from being created or written, found without creating
    anything (the database itself is opened later)."""
    if path.is_dir():
        return f"{str(path)!r} is a directory; give the database file's path (e.g. \"data/watcher.db\")"
    if path.exists():  # its permissions are judged when it is opened (read-only tools may read it)
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{str(parent)!r} is not a directory, so {str(path)!r} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {str(path)!r}: directory {str(parent)!r} is not writable by this user"
    return None


def _parse_invoices(t: ConfigTable) -> InvoicesConfig:
    max_expires = t.take("max_expires_in", int, 30 * 86400, check=between(60, 365 * 86400))
    default_expires = t.take("default_expires_in", int, 3600, check=between(60, max_expires))
    window = t.take("monitoring_window", int, 86400, check=between(0, 365 * 86400))
    tol = fraction(t, "default_tolerance", "0", 0, 500_000)
    t.done()
    return InvoicesConfig(default_expires_in=default_expires, max_expires_in=max_expires,
                          monitoring_window=window, default_tolerance_ppm=tol)


def _parse_webhooks(t: ConfigTable) -> WebhooksConfig:
    schedule = t.take("schedule", list, list(WebhooksConfig.schedule),
                      check=lambda v: None if v and len(v) <= 50 and all(
                          isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 7 * 86400 for x in v)
                      else "must be 1-50 delays in seconds, each between 0 and 604800")
    cfg = WebhooksConfig(
        timeout=t.take("timeout", float, 10.0, check=between(0.1, 300)),
        concurrency=t.take("concurrency", int, 64, check=between(1, 10_000)),
        per_endpoint_concurrency=t.take("per_endpoint_concurrency", int, 4, check=between(1, 1000)),
        schedule=tuple(float(x) for x in schedule),
        rotation_grace=t.take("rotation_grace", int, 86400, check=between(0, 30 * 86400)),
        allowed_hosts=tuple(h.lower() for h in t.take(
            "allowed_hosts", list, [], check=lambda v: None if all(isinstance(h, str) and h for h in v)
            else "must be a list of host names or patterns such as \"*.example.com\"")),
        max_endpoints=t.take("max_endpoints", int, 100, check=between(1, 10_000)),
    )
    t.done()
    return cfg


def _parse_keys(t: ConfigTable, resolve: Callable[[str], Path]) -> KeysConfig:
    from .keys import check_account_path

    mnemonic = t.take("mnemonic_file", str, None)
    passphrase = t.take("passphrase_file", str, None)
    secrets_key = t.take("secrets_key_file", str, "secrets.key", check=lambda v: None if v.strip() else "is empty")
    xpub = t.take("xpub", str, None)
    at = t.table("accounts")
    accounts = {}
    for path in list(at.raw):
        problem = check_account_path(path)
        if problem:
            raise ConfigError(at.key(path), problem)
        accounts[path] = at.take(path, str).strip()
    at.done()
    t.done()
    if mnemonic and (xpub or accounts):
        raise ConfigError(t.key("xpub" if xpub else "accounts"),
                          f"set either mnemonic_file or {'xpub' if xpub else 'accounts'}, not both")
    if not mnemonic and not xpub and not accounts:
        raise ConfigError(t.key("mnemonic_file"), "is required (or, watch-only, xpub = \"xpub...\" or "
                                                  "accounts = { \"m/44'/60'/0'\" = \"xpub...\" })")
    if passphrase and not mnemonic:
        raise ConfigError(t.key("passphrase_file"), "only makes sense with mnemonic_file")
    return KeysConfig(
        mnemonic_file=resolve(mnemonic) if mnemonic else None,
        passphrase_file=resolve(passphrase) if passphrase else None,
        xpub=xpub.strip() if xpub else None,
        accounts=accounts,
        secrets_key_file=resolve(secrets_key),
    )


def _parse_listen(v: str) -> str | None:
    try:
        _split_listen(v)
    except ValueError as e:
        return str(e)
    return None


def _split_listen(v: str) -> tuple[str, int]:
    m = re.match(r"^\[(?P<h6>[0-9a-fA-F:.]+)\]:(?P<p6>\d+)$|^(?P<h>[^:\[\]]+):(?P<p>\d+)$", v)
    if not m:
        raise ValueError(f"{v!r} is not host:port (e.g. \"127.0.0.1:8420\" or \"[::1]:8420\")")
    host = m.group("h6") or m.group("h")
    port = int(m.group("p6") or m.group("p"))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return host, port


def _parse_rates(t: ConfigTable) -> RatesConfig:
    """``[rates]``; each ``[[rates.sources]]`` table is checked by its kind when the rate kinds
    are known (``watcher.rates.Rates.from_config``, at every command's start)."""
    reference = t.take("reference", str, "USD", check=lambda v: None if 1 <= len(v) <= 16 and v.isascii()
                       and v.isalnum() else "must be a currency code such as \"USD\"").upper()
    cfg = RatesConfig(
        reference=reference,
        max_age=t.take("max_age", int, 3600, check=between(1, 30 * 86400)),
        refresh=t.take("refresh", float, 30.0, check=between(0, 3600)),
        quote_ttl=t.take("quote_ttl", int, 900, check=between(10, 86400)),
        sources=tuple(s.raw for s in t.array_of_tables("sources")),
    )
    t.done()
    return cfg


def _parse_api(t: ConfigTable) -> ApiConfig:
    host, port = _split_listen(t.take("listen", str, "127.0.0.1:8420", check=_parse_listen))
    tokens: dict[str, ApiToken] = {}
    token = t.take("token", str, None, check=_token_check)
    if token:
        tokens["default"] = ApiToken("default", token, APP_SCOPES)
    admin = t.take("admin_token", str, None, check=_token_check)
    if admin:
        tokens["admin"] = ApiToken("admin", admin, frozenset(SCOPES))
    named = t.table("tokens")
    for name in list(named.raw):
        if not re.match(r"^[a-z0-9_-]{1,32}$", name):
            raise ConfigError(named.key(name), "token names are 1-32 of a-z 0-9 _ -")
        if name in tokens:
            what = "admin_token" if name == "admin" else "token"
            raise ConfigError(named.key(name), f"the name {name!r} is taken by [api] {what}; choose another name")
        if isinstance(named.raw[name], dict):
            entry = named.table(name)
            value = entry.take("token", str, check=_token_check)
            try:
                scopes = check_scopes(entry.take("scopes", list, check=lambda v: None if all(
                    isinstance(x, str) for x in v) else "must be a list of scope names"))
            except ValueError as e:
                raise ConfigError(entry.key("scopes"), str(e)) from None
            entry.done()
            tokens[name] = ApiToken(name, value, scopes)
        else:
            tokens[name] = ApiToken(name, named.take(name, str, check=_token_check), APP_SCOPES)
    named.done()
    if len({x.token for x in tokens.values()}) != len(tokens):
        raise ConfigError(t.key("admin_token" if admin else "tokens"),
                          "two token names share the same token (the admin token must differ from app tokens)")
    max_body = t.take("max_body_bytes", int, 64 * 1024, check=between(1024, 16 * 1024 * 1024))
    metrics_auth = t.take("metrics_auth", bool, False)
    rate_limit = _rate(t, "rate_limit")
    payout_rate_limit = _rate(t, "payout_rate_limit")
    failed_auth_limit = _rate(t, "failed_auth_limit") or FAILED_AUTH_LIMIT
    shown = f"[{host}]" if ":" in host else host
    names = t.take("hosts", list, [shown, "localhost", "127.0.0.1", "[::1]"], check=lambda v: None if all(
        isinstance(h, str) and h.strip() and not any(c.isspace() or c in "/@" for c in h) for h in v)
        else "must be a list of host names or host:port")
    hosts = frozenset(h.lower() if re.search(r":\d+$", h) and not h.endswith("]") else f"{h.lower()}:{port}"
                      for h in names)
    body_timeout = t.take("body_timeout", float, 30.0, check=between(1, 3600))
    trusted_proxies = take_networks(t, "trusted_proxies")
    t.done()
    api = ApiConfig(host=host, port=port, tokens=tokens, max_body_bytes=max_body, metrics_auth=metrics_auth,
                    rate_limit=rate_limit, payout_rate_limit=payout_rate_limit, failed_auth_limit=failed_auth_limit,
                    hosts=hosts, body_timeout=body_timeout, trusted_proxies=trusted_proxies)
    if not api.loopback and not tokens:
        raise ConfigError(t.key("listen"), f"{host!r} is not a loopback address: set api.token first")
    return api


def _rate(t: ConfigTable, key: str) -> Rate | None:
    raw = t.take(key, str, None)
    if raw is None:
        return None
    try:
        return parse_rate(raw)
    except ValueError as e:
        raise ConfigError(t.key(key), str(e)) from None


def take_networks(t: ConfigTable, key: str) -> tuple[Network, ...]:
    """A list of IP addresses or networks (``trusted_proxies``); empty if not given."""
    raw = t.take(key, list, [], check=lambda v: None if all(isinstance(x, str) for x in v)
                 else "must be a list of IP addresses or networks (e.g. [\"127.0.0.1\", \"10.0.0.0/8\"])")
    try:
        return parse_networks(raw)
    except ValueError as e:
        raise ConfigError(t.key(key), str(e)) from None


_PLACEHOLDER = re.compile(r"change[-_ ]?me|example|placeholder|password|secret|generate|replace|xxxx", re.I)
MIN_TOKEN_BITS = 80


def _token_check(v: str) -> str | None:
    """A token must be a real secret: no placeholder (the README's ``change-me``), at least 20
    characters, and ~80 bits by a generous estimate (length x log2 of distinct characters;
    ``openssl rand -hex 32`` gives 256)."""
    if v != v.strip() or any(c.isspace() for c in v):
        return "must not contain whitespace"
    if _PLACEHOLDER.search(v):
        return "looks like a placeholder: generate a token, e.g. `openssl rand -hex 32`"
    if len(v) < 20 or len(v) * math.log2(max(len(set(v)), 2)) < MIN_TOKEN_BITS:
        return (f"is too short or too repetitive to be guessed only by chance (at least 20 characters, "
                f"~{MIN_TOKEN_BITS} bits); generate one, e.g. `openssl rand -hex 32`")
    return None


def _parse_chain(t: ConfigTable, families: Mapping[str, ChainFamily]) -> ChainConfig:
    chain_id = t.take("id", str, check=lambda v: None if CHAIN_ID_RE.match(v) else
                      f"{v!r} must be 1-32 of a-z 0-9 _ - (starting with a letter or digit)")
    fam_name = t.take("family", str)
    family = families.get(fam_name)
    if family is None:
        available = ", ".join(sorted(families)) or "none: no chain plugin is loaded"
        raise ConfigError(t.key("family"), f"unknown chain family {fam_name!r} (available: {available})")
    nodes = _parse_nodes(t, family)
    rpc_url = nodes[0].url
    # the family's own keys first: its network decides the defaults and the address format
    spec = family.configure(t)
    if any(n.ws_url for n in nodes) and not spec.push:
        raise ConfigError(t.key("ws_url" if len(nodes) == 1 and t.has("ws_url") else "nodes"),
                          f"the {fam_name} family cannot be pushed new heads yet: no ws_url on this chain")
    native_symbol = t.take("native_symbol", str, spec.native_symbol,
                           check=lambda v: None if SYMBOL_RE.match(v) else f"{v!r} is not a valid symbol")
    native_decimals = t.take("native_decimals", int, spec.native_decimals, check=between(0, 77))
    confirmations = t.take("confirmations", int, spec.confirmations, check=between(1, 10_000))
    finality = t.take("finality_depth", int, max(spec.finality_depth, confirmations),
                      check=between(1, 100_000))
    if finality < confirmations:
        raise ConfigError(t.key("finality_depth"), f"must be at least confirmations ({confirmations})")
    start_block = t.take("start_block", int, None, check=non_negative)
    poll_interval = t.take("poll_interval", float, 2.0, check=between(0.05, 3600))
    batch_size = t.take("batch_size", int, 200, check=between(1, 10_000))
    max_lag = t.take("max_lag", int, max(10, confirmations * 3), check=between(1, 1_000_000))
    rpc_timeout = t.take("rpc_timeout", float, 10.0, check=between(0.1, 600))

    assets = [AssetConfig(symbol=native_symbol, decimals=native_decimals, contract=None)]
    for at in t.array_of_tables("assets"):
        symbol = at.take("symbol", str, check=lambda v: None if SYMBOL_RE.match(v) else f"{v!r} is not a valid symbol")
        if any(a.symbol == symbol for a in assets):
            raise ConfigError(at.key("symbol"), f"symbol {symbol!r} is already used on chain {chain_id!r}")
        raw_contract = at.take("contract", str)
        try:
            contract = spec.validate_address(raw_contract)
        except InvalidAddress as e:
            raise ConfigError(at.key("contract"), e.message) from None
        if any(a.contract == contract for a in assets):
            raise ConfigError(at.key("contract"), f"contract {raw_contract} is configured twice")
        decimals = at.take("decimals", int, check=between(0, 77))
        at.done()
        assets.append(AssetConfig(symbol=symbol, decimals=decimals, contract=contract))

    sweep = parse_sweep(t.table("sweep"), spec, tuple(assets))
    if sweep.enabled and not spec.sends:
        raise ConfigError(t.key("sweep"), f"the {fam_name} family cannot send yet: no sweeps on this chain")
    payouts = parse_payouts(t.table("payouts"), spec, tuple(assets))
    t.done()
    return ChainConfig(
        id=chain_id, family=fam_name, rpc_url=rpc_url, native_symbol=native_symbol,
        native_decimals=native_decimals, confirmations=confirmations, finality_depth=finality,
        start_block=start_block, poll_interval=poll_interval, batch_size=batch_size,
        max_lag=max_lag, rpc_timeout=rpc_timeout, assets=tuple(assets), spec=spec,
        sweep=sweep, payouts=payouts, nodes=nodes,
    )


def _parse_nodes(t: ConfigTable, family: ChainFamily) -> tuple[NodeConfig, ...]:
    """``rpc_url`` (one node, ``ws_url`` beside it), ``rpc_urls`` (several, in order of
    preference), or ``[[chains.nodes]]`` tables (``url``, ``ws_url`` and the family's own
    per-node keys each): exactly one of the three."""
    given = [k for k in ("rpc_url", "rpc_urls", "nodes") if t.has(k)]
    if len(given) != 1:
        raise ConfigError(t.key("rpc_url"), "is required (or rpc_urls = [...], or [[chains.nodes]] tables)"
                          if not given else f"give one of rpc_url, rpc_urls and [[chains.nodes]], not {given}")
    if given == ["rpc_url"]:
        url = t.take("rpc_url", str, check=http_url)
        return (NodeConfig(url, t.take("ws_url", str, None, check=ws_url)),)
    if t.has("ws_url"):
        raise ConfigError(t.key("ws_url"), "applies to a single node (rpc_url); with several, give each "
                                           "[[chains.nodes]] table its own ws_url")
    if given == ["rpc_urls"]:
        urls = t.take("rpc_urls", list, check=lambda v: None if 1 <= len(v) <= 16 and all(
            isinstance(u, str) for u in v) else "must be 1-16 URLs")
        for i, u in enumerate(urls):
            problem = http_url(u)
            if problem:
                raise ConfigError(f"{t.key('rpc_urls')}[{i}]", problem)
        nodes = tuple(NodeConfig(u) for u in urls)
    else:
        tables = t.array_of_tables("nodes")
        if not 1 <= len(tables) <= 16:
            raise ConfigError(t.key("nodes"), "must be 1-16 [[chains.nodes]] tables")
        out = []
        for nt in tables:
            url = nt.take("url", str, check=http_url)
            out.append(NodeConfig(url, nt.take("ws_url", str, None, check=ws_url), dict(family.node_options(nt))))
            nt.done()
        nodes = tuple(out)
    if len({n.url for n in nodes}) != len(nodes):
        raise ConfigError(t.key("rpc_urls" if given == ["rpc_urls"] else "nodes"), "a node is listed twice")
    return nodes
