"""The ``http`` rate kind (an optional plugin, entry point ``rates_http``): prices from an HTTP
API answering in CoinGecko's ``/simple/price`` format, for assets no node of yours prices.

```toml
[[rates.sources]]
kind = "http"
url = "https://api.coingecko.com/api/v3/simple/price"
ids = { ETH = "ethereum", USDT = "tether" }   # asset symbol -> the API's coin id
vs = "USD"                                      # the currency they are priced in
# api_key_header = "x-cg-demo-api-key"         # and api_key_file: a key kept out of the config
# api_key_file = "coingecko.key"
timeout = 10.0
```

One ``GET <url>?ids=ethereum,tether&vs_currencies=usd&include_last_updated_at=true`` a
read; the answer ``{"ethereum": {"usd": 3021.5, "last_updated_at": 1764100000}, ...}`` gives
``ETH/USD = 3021.5`` as of ``last_updated_at`` (the read's time if absent). Numbers are read
as the exact decimals written, never through floats. A coin missing from the answer, a
non-positive price or a non-JSON answer makes that pair unavailable; the key never reaches a
log or an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import httpx

from watcher.errors import ConfigError
from watcher.hookspecs import hookimpl
from watcher.rates import Rate, RateSource

if TYPE_CHECKING:
    from watcher.config import Config, ConfigTable
    from watcher.daemon import Daemon

__all__ = ["HttpKind", "HttpSource"]


@dataclass
class HttpSource:
    url: str
    ids: dict[str, str]  # symbol -> coin id
    vs: str
    timeout: float = 10.0
    key_header: str | None = None
    key_file: Path | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return "http:" + httpx.URL(self.url).host

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((symbol, self.vs) for symbol in self.ids)

    async def read(self, daemon: Daemon) -> Sequence[Rate]:
        headers = {"accept": "application/json"}
        if self.key_header and self.key_file:
            headers[self.key_header] = self.key_file.read_text(encoding="utf-8").strip()
        params = {"ids": ",".join(self.ids.values()), "vs_currencies": self.vs.lower(),
                  "include_last_updated_at": "true"}
        async with httpx.AsyncClient(timeout=self.timeout, trust_env=False, follow_redirects=False) as client:
            async with client.stream("GET", self.url, params=params, headers=headers) as resp:
                if resp.status_code != 200:
                    raise ValueError(f"{self.name} answered HTTP {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise ValueError(f"{self.name} answered more than {MAX_ANSWER} bytes")
        try:
            data = json.loads(bytes(body), parse_float=Decimal, parse_int=Decimal)
        except ValueError:
            raise ValueError(f"{self.name} answered something that is not JSON") from None
        now = int(time.time())
        out = []
        for symbol, coin in self.ids.items():
            entry = data.get(coin) if isinstance(data, dict) else None
            price = entry.get(self.vs.lower()) if isinstance(entry, dict) else None
            if not _plain(price) or price <= 0:
                continue  # that pair is unavailable; the others are fine
            stamp = entry.get("last_updated_at") if isinstance(entry, dict) else None
            updated = int(stamp) if _plain(stamp) and 0 < stamp < 10**12 else now
            out.append(Rate(symbol, self.vs, Fraction(price), self.name, updated))
        return out


MAX_ANSWER = 1 << 20  # bytes: a price list of a few coins is a few hundred


def _plain(number: object) -> TypeGuard[Decimal]:
    """A finite decimal of reasonable size: ``1e7000000`` is 15 bytes of JSON, and turning
    it into a fraction (or an integer) takes seconds to minutes of CPU in the daemon's one
    thread; no price or timestamp needs more than 40 digits or an exponent beyond 40."""
    return (isinstance(number, Decimal) and number.is_finite() and abs(number.adjusted()) <= 40
            and len(number.as_tuple().digits) <= 40)


class HttpKind:
    name = "http"

    def configure(self, table: ConfigTable, config: Config) -> RateSource:
        url = table.take("url", str)
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(table.key("url"), "must be an http(s) URL")
        ids_table = table.table("ids", required=True)
        ids = {}
        for symbol in list(ids_table.raw):
            ids[symbol.upper()] = ids_table.take(symbol, str)
        ids_table.done()
        if not ids:
            raise ConfigError(table.key("ids"), "names at least one asset: { ETH = \"ethereum\" }")
        vs = table.take("vs", str, "USD").upper()
        timeout = table.take("timeout", float, 10.0)
        key_header = table.take("api_key_header", str, None)
        key_file = table.take("api_key_file", str, None)
        if bool(key_header) != bool(key_file):
            raise ConfigError(table.key("api_key_header"), "set api_key_header and api_key_file together")
        base = config.path.parent if config.path else Path.cwd()
        path = None if key_file is None else (Path(key_file) if Path(key_file).is_absolute() else base / key_file)
        return HttpSource(url=url, ids=ids, vs=vs, timeout=timeout, key_header=key_header, key_file=path)


@hookimpl
def watcher_rate_kinds() -> list[HttpKind]:
    return [HttpKind()]
