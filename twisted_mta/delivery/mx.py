"""
Where mail for a domain goes: MX resolution (RFC 5321 5.1, RFC 7505) on
twisted.names, never blocking the reactor.

L{MXResolver.hops} turns a recipient domain into the list of L{Hop}s to
try, in order:

  - An address literal (C{[192.0.2.1]}, C{[IPv6:2001:db8::1]}) is one hop,
    without DNS.
  - The MX records, by preference; records of equal preference in random
    order (the shuffle can be injected, for tests).  The exchange C{"."}
    is unusable; a domain whose only MX is C{"."} has a null MX (RFC
    7505) and accepts no mail: a permanent failure.
  - For each exchange, its AAAA and A records, looked up in parallel;
    IPv6 addresses first, then IPv4.  CNAME chains are followed, in the
    answer and, where the server left the chain unfinished, by asking for
    the target.  An exchange without an address is skipped; if no
    exchange has one, the failure is temporary (a broken MX host is
    usually fixed).
  - No MX record at all: the implicit MX, the domain's own AAAA and A
    records with preference 0.  No address either: permanent.
  - NXDOMAIN is permanent; SERVFAIL, REFUSED, a timeout or any other DNS
    trouble is temporary.
  - At most L{MXResolver.max_hops} hops, the same address only once.

Failures are L{DNSError}s, which carry an SMTP-style reply for the
recipient's state.  L{MXResolver.host} does the same for a smart host:
only its addresses, and every failure's reply is 4xx (a smart host that
cannot be found is a configuration problem, which must not bounce mail;
C{permanent} still says whether DNS said NXDOMAIN).

L{make_resolver} makes the twisted.names resolver: given name servers,
or the system's (C{/etc/resolv.conf}, reread when it changes).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
from dataclasses import dataclass
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.names import client, dns, error

log = Logger()

# Every query gets a fresh UDP port (against spoofing), and Twisted logs
# each one's start and stop: two lines per lookup drown the mail log.
dns.DNSDatagramProtocol.noisy = False

MAX_HOPS = 20
MAX_CNAME = 8  # links of a CNAME chain followed, in all


@dataclass(frozen=True)
class Hop:
    """
    One address to try.  C{name} is the exchange's (or smart host's) name,
    which TLS verifies the certificate against; for an address literal it
    is the address text.  C{address} is IPv6 or IPv4 text.
    """

    name: str
    address: str
    port: int
    preference: int


class DNSError(Exception):
    """
    The next hop could not be found.  C{permanent}: NXDOMAIN, a null MX,
    or no address at all for an implicit MX; otherwise it may work later.
    C{reply} is an SMTP-style line (code, enhanced code, text) for the
    recipient's state.
    """

    def __init__(self, reply: str, permanent: bool = False):
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent


# --- names and literals -----------------------------------------------------


def parse_literal(text: str) -> str | None:
    """
    The IP address text of an address literal (C{[192.0.2.1]},
    C{[IPv6:2001:db8::1]}), or None if C{text} is not in brackets.
    Raises L{DNSError} (permanent) for a literal that is not a valid
    IPv4 or IPv6 address.
    """
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise DNSError(f"550 5.1.2 {text}: not a valid address literal", permanent=True)


def _ascii_name(domain: str) -> str:
    """C{domain} in lower case, without a final dot, internationalised labels as A-labels."""
    name = domain.rstrip(".")
    if not name.isascii():
        try:
            import idna
            name = idna.encode(name, uts46=True).decode("ascii")
        except Exception:
            try:
                name = name.encode("idna").decode("ascii")
            except UnicodeError:
                name = ""
    if not name or len(name) > 253 or not all(0 < len(label) < 64 for label in name.split(".")):
        raise DNSError(f"550 5.1.2 {domain}: not a valid domain name", permanent=True)
    return name.lower()


def _text(name) -> str:
    """A L{dns.Name} (or bytes, or str) as lower-case text without a final dot."""
    if isinstance(name, dns.Name):
        name = name.name
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.lower().rstrip(".")


def _address(payload) -> str:
    if isinstance(payload, dns.Record_A):
        return payload.dottedQuad()
    return str(ipaddress.ip_address(payload.address))


_LOOKUPS = {dns.MX: "lookupMailExchange", dns.A: "lookupAddress", dns.AAAA: "lookupIPV6Address"}
_TYPE_NAMES = {dns.MX: "MX", dns.A: "A", dns.AAAA: "AAAA"}


class _CNAMELoop(Exception):
    pass


def _classify(e: BaseException) -> tuple[bool, str]:
    """(permanent, what happened) for an exception from a twisted.names lookup."""
    if isinstance(e, (error.DNSNameError, error.AuthoritativeDomainError)):
        return True, "Host or domain name not found (NXDOMAIN)"
    if isinstance(e, defer.TimeoutError):
        return False, "DNS lookup timed out"
    if isinstance(e, error.DNSServerError):
        return False, "DNS server failure (SERVFAIL)"
    if isinstance(e, error.DNSQueryRefusedError):
        return False, "DNS query refused (REFUSED)"
    if isinstance(e, error.DNSFormatError):
        return False, "DNS format error (FORMERR)"
    if isinstance(e, error.DNSNotImplementedError):
        return False, "DNS query not implemented (NOTIMP)"
    if isinstance(e, _CNAMELoop):
        return False, str(e)
    return False, f"DNS lookup failed: {e}"


# --- the resolver -----------------------------------------------------------


class MXResolver:
    """
    Next hops for a domain (L{hops}) or a smart host (L{host}), from an
    C{IResolver} (see L{make_resolver}).  C{shuffle} orders records of
    equal preference in place (C{random.shuffle}; tests inject their own).
    """

    max_hops = MAX_HOPS

    def __init__(self, resolver, reactor=None, shuffle: Callable[[list], None] = random.shuffle):
        if reactor is None:
            from twisted.internet import reactor
        self.resolver = resolver
        self.reactor = reactor
        self.shuffle = shuffle

    # --- the API ------------------------------------------------------------

    def hops(self, domain: str, port: int = 25) -> Deferred:
        """The hops for mail to C{domain}: a Deferred firing with a list of L{Hop}, or failing with L{DNSError}."""
        return Deferred.fromCoroutine(self._hops(domain, port))

    def host(self, name: str, port: int) -> Deferred:
        """
        The hops for a smart host C{name}: its AAAA and A records (C{[name]}
        is the same; an IP address or address literal is one hop).  Fires
        with a list of L{Hop} or fails with L{DNSError}, whose reply is 4xx.
        """
        return Deferred.fromCoroutine(self._host(name, port))

    # --- the work -----------------------------------------------------------

    async def _hops(self, domain: str, port: int) -> list[Hop]:
        literal = parse_literal(domain)
        if literal is not None:
            return [Hop(literal, literal, port, 0)]
        name = _ascii_name(domain)
        try:
            records = await self._records(name, dns.MX)
        except Exception as e:
            permanent, what = _classify(e)
            log.info("mx {domain}: MX lookup failed: {what}", domain=name, what=what)
            if permanent:
                raise DNSError(f"550 5.1.2 {domain}: {what}; name service error for "
                               f"name={name} type=MX", permanent=True) from None
            raise DNSError(f"451 4.4.3 {domain}: {what}; name service error for "
                           f"name={name} type=MX", permanent=False) from None

        if not records:
            # RFC 5321 5.1: the domain itself is the implicit MX.
            addresses, problem = await self._addresses(name)
            if addresses:
                hops = self._unique(Hop(name, a, port, 0) for a in addresses)
                log.debug("mx {domain}: no MX, implicit MX {hops}", domain=name, hops=hops)
                return hops
            if problem is not None and not problem[0]:
                log.info("mx {domain}: no MX, and its addresses: {what}", domain=name, what=problem[1])
                raise DNSError(f"451 4.4.3 {domain}: no MX record, and looking up its address "
                               f"failed: {problem[1]}", permanent=False)
            what = problem[1] if problem is not None else "no A or AAAA record"
            log.info("mx {domain}: no MX and no address: {what}", domain=name, what=what)
            raise DNSError(f"550 5.1.2 {domain}: no MX record and no address record for the "
                           f"domain ({what})", permanent=True)

        usable = [r for r in records if _text(r.name)]
        if not usable:
            log.info("mx {domain}: null MX", domain=name)
            raise DNSError(f"550 5.1.10 {domain}: null MX: domain accepts no mail (RFC 7505)",
                           permanent=True)
        ordered = self._order(usable)
        exchanges: list[tuple[str, int]] = []
        seen: set[str] = set()
        for record in ordered:
            exchange = _text(record.name)
            if exchange not in seen:
                seen.add(exchange)
                exchanges.append((exchange, record.preference))
        exchanges = exchanges[:self.max_hops]
        results = await defer.gatherResults(
            [Deferred.fromCoroutine(self._addresses(exchange)) for exchange, _ in exchanges])
        hops: list[Hop] = []
        problems = []
        for (exchange, preference), (addresses, problem) in zip(exchanges, results):
            if not addresses:
                what = problem[1] if problem is not None else "no A or AAAA record"
                log.info("mx {domain}: skipping MX host {exchange}: {what}",
                         domain=name, exchange=exchange, what=what)
                problems.append(f"{exchange}: {what}")
            hops.extend(Hop(exchange, a, port, preference) for a in addresses)
        hops = self._unique(hops)
        if not hops:
            raise DNSError(f"451 4.4.3 {domain}: no MX host has an address ("
                           + "; ".join(problems) + ")", permanent=False)
        log.debug("mx {domain}: {hops}", domain=name, hops=hops)
        return hops

    async def _host(self, name: str, port: int) -> list[Hop]:
        literal = None
        try:
            literal = parse_literal(name)  # None without brackets
            if literal is None:
                literal = str(ipaddress.ip_address(name))
        except (DNSError, ValueError):
            pass  # a host name, perhaps in brackets
        if literal is not None:
            return [Hop(literal, literal, port, 0)]
        bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        try:
            ascii_name = _ascii_name(bare)
        except DNSError as e:
            raise DNSError("451 4.4.3" + e.reply[len("550 5.1.2"):], permanent=True)
        addresses, problem = await self._addresses(ascii_name)
        if addresses:
            return self._unique(Hop(bare, a, port, 0) for a in addresses)
        permanent, what = problem if problem is not None else (True, "no A or AAAA record")
        log.info("smart host {name}: {what}", name=ascii_name, what=what)
        raise DNSError(f"451 4.4.3 {bare}: cannot find the smart host's address: {what}",
                       permanent=permanent)

    def _order(self, records: list) -> list:
        """By preference; each run of equal preference shuffled."""
        ordered = []
        for _, group in itertools.groupby(sorted(records, key=lambda r: r.preference),
                                          key=lambda r: r.preference):
            group = list(group)
            if len(group) > 1:
                self.shuffle(group)
            ordered.extend(group)
        return ordered

    def _unique(self, hops: Iterable[Hop]) -> list[Hop]:
        out, seen = [], set()
        for hop in hops:
            if hop.address not in seen:
                seen.add(hop.address)
                out.append(hop)
        return out[:self.max_hops]

    async def _addresses(self, name: str) -> tuple[list[str], tuple[bool, str] | None]:
        """
        AAAA then A addresses of C{name}, asked for in parallel, and the
        problem (permanent, what) if there was one and no address came back.
        A lookup that failed counts as temporary unless both said NXDOMAIN.
        """
        results = await defer.DeferredList(
            [Deferred.fromCoroutine(self._records(name, t)) for t in (dns.AAAA, dns.A)],
            consumeErrors=True)
        addresses: list[str] = []
        problems = []
        for (ok, value), kind in zip(results, ("AAAA", "A")):
            if ok:
                addresses.extend(_address(p) for p in value)
            else:
                permanent, what = _classify(value.value)
                problems.append((permanent, f"{what} for {name} type={kind}"))
        if addresses:
            return addresses, None
        if not problems:
            return [], None
        temporary = [what for permanent, what in problems if not permanent]
        if temporary:
            return [], (False, temporary[0])
        return [], (True, problems[0][1])

    async def _records(self, name: str, qtype: int) -> list:
        """
        The payloads of C{qtype} records for C{name}, following CNAMEs:
        through the answer, and by asking again for a target the answer
        leaves unresolved (as twisted.names' C{getHostByName} does).
        Raises what twisted.names raised.
        """
        current, seen = name, {name}
        for _ in range(MAX_CNAME + 1):
            queried = current
            answers, _authority, _additional = await getattr(self.resolver, _LOOKUPS[qtype])(current)
            while True:
                found = [rr.payload for rr in answers
                         if rr.type == qtype and _text(rr.name) == current]
                if found:
                    return found
                cname = next((rr.payload for rr in answers
                              if rr.type == dns.CNAME and _text(rr.name) == current), None)
                if cname is None:
                    break
                current = _text(cname.name)
                if current in seen:
                    raise _CNAMELoop(f"CNAME loop at {current}")
                seen.add(current)
            if current == queried:
                return []  # NODATA
        raise _CNAMELoop(f"CNAME chain too long at {current}")


# --- making a resolver ------------------------------------------------------


def parse_nameserver(text: str) -> tuple[str, int]:
    """
    C{"127.0.0.1:5353"}, C{"[::1]:53"}, C{"192.0.2.1"}, C{"::1"} as
    (address, port).  Raises ValueError for anything else.
    """
    host, port = text.strip(), dns.PORT
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError(f"name server {text!r}: missing ]")
        rest = host[end + 1:]
        host = host[1:end]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"name server {text!r}: expected :port after ]")
            port = _port(text, rest[1:])
    elif host.count(":") == 1:
        host, port_text = host.split(":")
        port = _port(text, port_text)
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"name server {text!r}: not an IP address") from None
    return host, port


def _port(text: str, value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"name server {text!r}: bad port {value!r}")
    return int(value)


class _SystemResolver(client.Resolver):
    """
    The name servers of a resolv.conf, reread when the file changes, checked
    at most once a minute and only when a query is made: unlike Twisted's
    own, it leaves no timer running (which keeps test reactors clean).
    """

    def maybeParseConfig(self):
        self._parseCall = None
        self._lastCheck = self._reactor.seconds()
        try:
            mtime = os.stat(self.resolv).st_mtime
        except OSError:
            mtime = None
        if mtime is not None and mtime == self._lastResolvTime:
            return
        self._lastResolvTime = mtime
        try:
            with open(self.resolv, "rb") as f:
                lines = f.readlines()
        except OSError:
            lines = []
        self.parseConfig(lines)

    def queryUDP(self, queries, timeout=None):
        if self._reactor.seconds() - self._lastCheck >= self._resolvReadInterval:
            self.maybeParseConfig()
        return super().queryUDP(queries, timeout)


def make_resolver(nameservers: tuple[str, ...] = (), reactor=None, timeout=(1, 3),
                  resolv_conf: str = "/etc/resolv.conf"):
    """
    A twisted.names C{IResolver} asking the given servers
    (C{"127.0.0.1:5353"}, C{"[::1]:53"}, C{"192.0.2.1"}) or, if none,
    those of the system's resolv.conf.  C{timeout}: the seconds to wait
    for each try (the query is sent again after each, and fails after
    the last).  Raises ValueError for a server that is not an IP address.
    """
    if reactor is None:
        from twisted.internet import reactor
    if nameservers:
        servers = [parse_nameserver(s) for s in nameservers]
        return client.Resolver(servers=servers, timeout=tuple(timeout), reactor=reactor)
    return _SystemResolver(resolv=resolv_conf, timeout=tuple(timeout), reactor=reactor)
