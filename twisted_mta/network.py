"""
The one place where a client's address text becomes an address, and is
matched against networks: plugins and the relay rules all use these, so
an IPv4 client reaching an IPv6 socket (C{::ffff:192.0.2.1}) is treated
as the IPv4 client it is, everywhere alike.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# Cached: the relay rules ask for every RCPT, and parsing was ~7% of the
# server's CPU per message (the same few clients send most of the mail).
@functools.lru_cache(maxsize=4096)
def client_address(text: str) -> Address | None:
    """
    C{text} (a session's C{client_ip}) as an address: an IPv4-mapped IPv6
    address as IPv4, a scope (C{%eth0}) dropped; C{None} if it is not an
    IP address (a UNIX socket client).
    """
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except (ValueError, AttributeError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(text: str, networks: Iterable[Network]) -> bool:
    """Whether the client address C{text} is in one of C{networks}."""
    ip = client_address(text)
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)
