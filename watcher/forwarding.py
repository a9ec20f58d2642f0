"""Who sent a request, and whether it came through a reverse proxy.

A listener's per-client limits (the checkout page's ``rate_limit``, the control API's
``failed_auth_limit``) count by client address. Behind a reverse proxy the TCP peer is the
proxy, so every customer would share one bucket. With ``trusted_proxies`` (addresses or
networks) the address is read from ``X-Forwarded-For`` instead, as nginx's
``real_ip_recursive`` does: from the right, past every trusted hop, the first address that
is not a trusted proxy. Entries to the left of it are the client's own words and never
count, so a client cannot choose its bucket by sending the header itself.

Whether a request is *local* (``/metrics`` without a key) is told by more than the listen
address: a request that names a public host or carries a forwarding header came through a
proxy, whatever its TCP peer says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.requests import Request

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Headers a proxy adds (RFC 7239 and the de facto ones); one of them on a request means a proxy
#: passed it on.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip")


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """``["127.0.0.1", "10.0.0.0/8", "::1"]`` as networks; ValueError naming the bad entry."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or network (e.g. \"127.0.0.1\" or \"10.0.0.0/8\")") from None
    return tuple(out)


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.5:51234"
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _trusted(addr: Address, trusted: tuple[Network, ...]) -> bool:
    return any(addr.version == n.version and addr in n for n in trusted)


def client_address(request: Request, trusted: tuple[Network, ...] = ()) -> str:
    """The client's address: the TCP peer, or, when the peer is a trusted proxy, the
    rightmost ``X-Forwarded-For`` hop that is not one (the peer again if the header is
    missing or unreadable)."""
    peer = request.client.host if request.client else "unknown"
    addr = _address(peer)
    if not trusted or addr is None or not _trusted(addr, trusted):
        return peer
    hops = [h for value in request.headers.getlist("x-forwarded-for") for h in value.split(",")]
    client = str(addr)
    for hop in reversed(hops):
        found = _address(hop)
        if found is None:
            break  # not written by a proxy we trust: the last good hop stands
        client = str(found)
        if not _trusted(found, trusted):
            break
    return client


def is_local(request: Request) -> bool:
    """The request came from this machine, not through a proxy: its TCP peer is a loopback
    address, it names a loopback host (``localhost``, ``127.0.0.1``, ``[::1]``, any port),
    and it carries no forwarding header."""
    peer = _address(request.client.host) if request.client else None
    if peer is None or not peer.is_loopback:
        return False
    if any(h in request.headers for h in FORWARDING_HEADERS):
        return False
    host = request.headers.get("host", "").strip().lower()
    name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    if name == "localhost":
        return True
    named = _address(name)
    return named is not None and named.is_loopback
