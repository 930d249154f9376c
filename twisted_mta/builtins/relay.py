"""
The built-in relay rules (C{[relay]}), an L{IRelayPolicy}.

A recipient in a local domain or a relay domain is accepted from anyone;
any other recipient only from a client in C{networks} or an authenticated
one.  Addresses that carry sender-specified routing (C{user%other@here},
C{other!user@here}, C{"user@other"@here}) are refused to untrusted clients
whatever their domain: honouring them is how relays used to be opened.
Source routes (C{@a:user@b}) never reach here: the grammar drops them.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from zope.interface import implementer

from twisted_mta.network import in_networks
from twisted_mta.interfaces import IRelayPolicy
from twisted_mta.values import Verdict

RELAY_DENIED = "Relay access denied"


class DomainSet:
    """Domains, each either exact or C{*.example.com} (any subdomain)."""

    def __init__(self, domains: Iterable[str]):
        self.exact = frozenset(d.lower() for d in domains if not d.startswith("*."))
        self.suffixes = tuple(d[1:].lower() for d in domains if d.startswith("*."))
        self.any = "*" in self.exact

    def __contains__(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        return self.any or domain in self.exact or domain.endswith(self.suffixes)


@implementer(IRelayPolicy)
class RelayRules:
    def __init__(self, local_domains: Iterable[str] = (), relay_domains: Iterable[str] = (),
                 networks: Iterable[str] = ("127.0.0.0/8", "::1/128")):
        self.local = DomainSet(local_domains)
        self.relay = DomainSet(relay_domains)
        self.networks = tuple(
            n if isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            else ipaddress.ip_network(n, strict=False)
            for n in networks
        )

    def trusted(self, session) -> bool:
        """Whether C{session} may relay anywhere: authenticated, or from C{networks}."""
        return bool(session.user) or in_networks(session.client_ip, self.networks)

    def is_local(self, domain: str) -> bool:
        return domain in self.local

    def check_recipient(self, session, envelope, recipient):
        if recipient.domain is None:  # <Postmaster>
            return Verdict.accept()
        trusted = self.trusted(session)
        if trusted:
            return Verdict.accept()
        if recipient.has_routing or recipient.is_literal:
            return Verdict.reject(RELAY_DENIED, "5.7.1")
        if recipient.domain in self.local or recipient.domain in self.relay:
            return Verdict.accept()
        return Verdict.reject(RELAY_DENIED, "5.7.1")
