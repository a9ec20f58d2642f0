"""Where webhooks may go: public addresses only, unless the operator listed the host.

A webhook URL is chosen by whoever holds a key with the ``webhooks`` scope, and watcher
sends it requests from inside the operator's network: without a check, a key reads internal
services (a node's RPC, a cloud's metadata service at 169.254.169.254, an admin panel on
127.0.0.1). So the *resolved* addresses are checked, at delivery time, for every A/AAAA
record, and the connection goes to an address that passed (never a second lookup that
could answer differently). Refused: loopback, private (RFC 1918, unique local), link-local
(and with it the metadata service), shared (100.64/10), unspecified, multicast, reserved,
documentation ranges (``3fff::/20`` included), site-local ``fec0::/10``, and IPv6 forms that
carry such an IPv4 address (mapped, 6to4, NAT64).
Every spelling a resolver accepts (``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``,
``[::1]``, a hosts-file name) ends up as one of those addresses.

``[webhooks] allowed_hosts``: if set, webhook URLs must use one of these hosts (``*`` wildcards
as in ``*.example.com``), and a listed host may resolve to a private address (a receiver on
127.0.0.1 is allowed by listing ``127.0.0.1``). Empty: any public host, no private one.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from fnmatch import fnmatchcase

import trio

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
# ranges the running Python's tables may still call global: site-local (fec0::/10, deprecated
# by RFC 3879 but routed inside some networks) and the documentation range of RFC 9637
# (3fff::/20, Python 3.11's tables predate it); like 2001:db8::/32 they never reach the internet
_NOT_GLOBAL = (ipaddress.IPv6Network("fec0::/10"), ipaddress.IPv6Network("3fff::/20"))


class Refused(Exception):
    """The destination is not allowed; the message says why without any answer from it."""


def host_listed(host: str, allowed: Sequence[str]) -> bool:
    h = host.lower().strip("[]")
    return any(fnmatchcase(h, pattern.strip("[]")) for pattern in allowed)


def literal_ip(host: str) -> IP | None:
    """The address a host written as an IP literal stands for, in any spelling a resolver
    takes (``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``), else None."""
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h.split("%")[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(h))
    except OSError:
        return None


def is_public(ip: IP) -> bool:
    """A globally routable unicast address that is not a disguised private one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:  # a NAT64 gateway sends it to the IPv4 address inside
            return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _NAT64_LOCAL or any(ip in net for net in _NOT_GLOBAL):
            return False
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is not None and not is_public(embedded):
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


async def resolve(host: str, port: int) -> list[IP]:
    """Every address ``host`` resolves to (A and AAAA), in the resolver's order."""
    ip = literal_ip(host)
    if ip is not None:
        return [ip]
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise OSError(f"cannot resolve {host[:64]!r}: {e}") from None
    out: list[IP] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if addr not in out:
            out.append(addr)
    return out


async def vetted(host: str, port: int, allowed: Sequence[str]) -> tuple[list[IP], bool]:
    """The addresses to connect to for ``host`` and whether they are private (a listed host);
    raises :class:`Refused` for a destination that is not allowed."""
    listed = host_listed(host, allowed)
    if allowed and not listed:
        raise Refused(f"host {host[:64]!r} is not in webhooks.allowed_hosts")
    addresses = await resolve(host, port)
    if not addresses:
        raise OSError(f"{host[:64]!r} has no address")
    private = [a for a in addresses if not is_public(a)]
    if private and not listed:
        raise Refused(f"host {host[:64]!r} resolves to a non-public address ({private[0]}); list it in "
                      "webhooks.allowed_hosts to allow it")
    return addresses, bool(private)
