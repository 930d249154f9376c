"""
C{dnsbl}: refuse or tag mail from clients listed in DNS block lists.

    [[filter]]
    use = "dnsbl"
    zones = [
      {zone = "zen.spamhaus.org", codes = {"127.0.0.2-3" = 2, "127.0.0.4-7" = 2, "127.0.0.10-11" = 1}},
      {zone = "bl.spamcop.net", weight = 1},
      "b.barracudacentral.org",             # weight 1, any listing answer
    ]
    threshold = 2          # the score at which a client is refused (or tagged)
    action = "reject"      # reject | tag
    lookup_timeout = 10    # seconds for all the zones' answers
    allow = ["192.0.2.0/24", "2001:db8::/32"]
    header = "X-DNSBL"     # the header field tag adds

The client's address is looked up in every zone at once, as soon as it
connects: C{d.c.b.a.zone} for IPv4 C{a.b.c.d}, the 32 nibbles of the
whole address in reverse for IPv6 (an IPv4-mapped IPv6 address is looked
up as the IPv4 address).  An A answer in 127.0.0.0/8 is a listing; any
other answer, and 127.255.255.0/24 (the lists' error codes, such as
Spamhaus's 127.255.255.254 "query via a public resolver"), is logged and
never counted.  A zone without C{codes} adds its C{weight} (default 1)
when it lists the client; with C{codes}, a table of answer patterns
(C{127.0.0.2}, a range C{127.0.0.4-7} or C{127.0.0.4-127.0.0.7}, or a
network C{127.0.0.0/24}) to weights, each pattern that some answer matches
adds its weight once, and other answers do not count (a list of patterns
instead of a table gives each the zone's C{weight}).  Negative weights
are allowed (a DNS allow list lowers the score).

The verdict follows Postfix's C{reject_rbl_client}: lookups start at
connect and the greeting is not delayed; the refusal is given at each
RCPT (the hook waits on the connect's lookups, which are usually done by
then), so the client sees it in an ordinary transaction and the log has
the sender and recipient:

    RCPT TO:<bob@example.test>
    550 5.7.1 <bob@example.test>: Service unavailable; client [192.0.2.1] blocked using zen.example.test

(the code and the recipient prefix are the server's for a refusal at RCPT).  With C{action =
"tag"} nothing is refused; at DATA the message gets one header field per
zone that counted, C{X-DNSBL: zen.example.test=127.0.0.2}, and header
fields of that name the client sent are removed.

A zone that does not answer within C{lookup_timeout}, or answers SERVFAIL
or REFUSED, counts as not listing the client; that is logged.  Clients in
C{allow} are never looked up; authenticated sessions are never refused or
tagged (their lookups, started at connect, are not used).  Nothing else
is exempt: not loopback, not the C{[relay]} networks.

Answers are cached (in memory, shared across reloads) per query name:
listings for the A records' TTL, no listing (NXDOMAIN, no A record) for
the SOA's negative TTL (RFC 2308) or 300 s when the answer has no SOA,
errors and timeouts for 60 s; every time is kept between 60 s and an hour.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import re
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, error as dns_error
from zope.interface import alsoProvides, implementer

from twisted_mta.network import client_address
from twisted_mta.interfaces import IConnectFilter, IDataFilter, IRcptFilter
from twisted_mta.values import AddHeader, RemoveHeader, Verdict

__all__ = ["DNSBL", "query_name", "Zone", "Lookup", "LookupCache"]

log = Logger()

LISTINGS = ipaddress.ip_network("127.0.0.0/8")
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
MIN_TTL = 60            # seconds any answer is kept at least (a session's RCPTs share it)
MAX_TTL = 3600          # and at most
NEGATIVE_TTL = 300      # no listing, without an SOA to say for how long
ERROR_TTL = 60          # SERVFAIL, REFUSED, timeouts
CACHE_ENTRIES = 100_000  # query names kept; beyond it, the soonest to expire go first
ACTIONS = ("reject", "tag")
ZONE_KEYS = ("zone", "weight", "codes")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
# The longest reversed address is the IPv6 one: 32 nibbles and 32 dots.
_MAX_ZONE = 253 - 64


# --- the names ---------------------------------------------------------------


def query_name(ip, zone: str) -> str:
    """
    The name to look C{ip} (text or an ip_address) up by in C{zone}:
    C{2.0.0.127.zone} for 127.0.0.2; for IPv6, all 32 nibbles reversed.
    """
    address = client_address(str(ip))
    if address is None:
        raise ValueError(f"not an IP address: {ip!r}")
    if address.version == 4:
        reversed_ = ".".join(reversed(str(address).split(".")))
    else:
        reversed_ = ".".join(reversed(address.exploded.replace(":", "")))
    return f"{reversed_}.{zone}"


def _zone_name(where: str, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a zone name, got {value!r}")
    name = value.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise ValueError(f"{where}: not a valid zone name: {value!r}")
    labels = name.split(".")
    if len(name) > _MAX_ZONE or len(labels) < 2 or not all(_LABEL.match(l) for l in labels):
        raise ValueError(f"{where}: not a valid zone name: {value!r}")
    return name


def _number(where: str, value, positive: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or (positive and value <= 0)):
        kind = "a positive number" if positive else "a number"
        raise ValueError(f"{where}: expected {kind}, got {value!r}")
    return float(value)


# --- zones and their answer codes ----------------------------------------------


@dataclass(frozen=True)
class Code:
    """Answers from C{low} to C{high} (as integers) count C{weight}; C{text} as configured."""

    text: str
    low: int
    high: int
    weight: float

    def matches(self, answer: ipaddress.IPv4Address) -> bool:
        return self.low <= int(answer) <= self.high


def parse_code(where: str, text, weight: float) -> Code:
    """A pattern: C{127.0.0.2}, C{127.0.0.4-7}, C{127.0.0.4-127.0.0.7} or C{127.0.0.0/24}."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected an answer such as \"127.0.0.2\", got {text!r}")
    try:
        if "/" in text:
            net = ipaddress.IPv4Network(text, strict=False)
            low, high = net.network_address, net.broadcast_address
        elif "-" in text:
            first, _, last = text.partition("-")
            low = ipaddress.IPv4Address(first.strip())
            last = last.strip()
            if last.isdigit():
                last = ".".join(str(low).split(".")[:3] + [last])
            high = ipaddress.IPv4Address(last)
        else:
            low = high = ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise ValueError(f"{where}: not an answer, range or network of IPv4 addresses: {text!r}")
    if high < low:
        raise ValueError(f"{where}: empty range {text!r}")
    if low not in LISTINGS or high not in LISTINGS:
        raise ValueError(f"{where}: {text!r} is outside 127.0.0.0/8, never a listing")
    if low in ERROR_CODES:
        raise ValueError(f"{where}: {text!r} is in 127.255.255.0/24, the lists' error codes, "
                         f"never a listing")
    return Code(text, int(low), int(high), weight)


@dataclass(frozen=True)
class Zone:
    """
    One block list.  C{codes}: C{None} (any listing answer counts
    C{weight}) or the L{Code}s that count.
    """

    name: str
    weight: float = 1.0
    codes: tuple[Code, ...] | None = None

    def score(self, answers) -> tuple[float, tuple[str, ...]]:
        """
        The score of listing answers C{answers} (IPv4Address, all in
        127.0.0.0/8 outside the error codes), and the answers that counted.
        """
        if not answers:
            return 0.0, ()
        if self.codes is None:
            return self.weight, tuple(str(a) for a in answers)
        score, counted = 0.0, []
        for code in self.codes:
            hits = [a for a in answers if code.matches(a)]
            if hits:
                score += code.weight
                counted += [str(a) for a in hits if str(a) not in counted]
        return score, tuple(counted)


def parse_zone(where: str, value) -> Zone:
    if isinstance(value, str):
        return Zone(_zone_name(where, value))
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a zone name or a table "
                         f"{{zone = ..., weight = ..., codes = ...}}, got {value!r}")
    for key in value:
        if key not in ZONE_KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(ZONE_KEYS)})")
    if "zone" not in value:
        raise ValueError(f"{where}.zone: missing (the block list's DNS zone)")
    name = _zone_name(f"{where}.zone", value["zone"])
    codes = value.get("codes")
    if isinstance(codes, dict):
        if "weight" in value:
            raise ValueError(f"{where}.weight: not used when codes is a table of weights "
                             f"(give each code its weight there)")
        if not codes:
            raise ValueError(f"{where}.codes: empty")
        return Zone(name, 0.0, tuple(
            parse_code(f"{where}.codes", text, _number(f"{where}.codes.{text!r}", weight))
            for text, weight in codes.items()))
    weight = _number(f"{where}.weight", value.get("weight", 1))
    if codes is None:
        return Zone(name, weight)
    if isinstance(codes, str) or not isinstance(codes, (list, tuple)) or not codes:
        raise ValueError(f"{where}.codes: expected a table of answers to weights "
                         f"or a list of answers, got {codes!r}")
    return Zone(name, weight, tuple(
        parse_code(f"{where}.codes[{i}]", text, weight) for i, text in enumerate(codes, 1)))


# --- lookups and their cache ---------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """
    What a zone said about one client: the listing answers (IPv4Address,
    in 127.0.0.0/8 outside the error codes; empty: not listed), the
    answers ignored (text), and C{error} when the zone did not answer.
    """

    answers: tuple = ()
    ignored: tuple[str, ...] = ()
    error: str | None = None


class LookupCache:
    """
    Lookups by query name, each until it expires; and the lookups under
    way, so that sessions from one client share them.  Expired entries
    are pruned as time passes (a heap by expiry), and the entries are
    bounded by C{limit}.
    """

    def __init__(self, limit: int = CACHE_ENTRIES):
        self.limit = limit
        self.entries: dict[str, tuple[float, Lookup]] = {}
        self.pending: dict[str, defer.Deferred] = {}
        self._heap: list[tuple[float, str]] = []

    def get(self, name: str, now: float) -> Lookup | None:
        self.prune(now)
        entry = self.entries.get(name)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def put(self, name: str, lookup: Lookup, ttl: float, now: float) -> None:
        expires = now + ttl
        self.entries[name] = (expires, lookup)
        heapq.heappush(self._heap, (expires, name))
        self.prune(now)
        while len(self.entries) > self.limit and self._heap:
            _, victim = heapq.heappop(self._heap)
            self.entries.pop(victim, None)

    def prune(self, now: float) -> None:
        heap, entries = self._heap, self.entries
        while heap and heap[0][0] <= now:
            expires, name = heapq.heappop(heap)
            entry = entries.get(name)
            if entry is not None and entry[0] <= now:
                del entries[name]
        if len(heap) > 2 * len(entries) + 1000:  # stale records of refreshed names
            self._heap = [(e, n) for n, (e, _) in entries.items()]
            heapq.heapify(self._heap)


def _bounded(ttl: float) -> float:
    return float(min(max(ttl, MIN_TTL), MAX_TTL))


def _negative_ttl(authority) -> float:
    """RFC 2308: the SOA's own TTL or its minimum field, whichever is less."""
    for rr in authority or ():
        if rr.type == dns.SOA:
            return _bounded(min(rr.ttl, rr.payload.minimum))
    return _bounded(NEGATIVE_TTL)


# --- the verdict ----------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """The lookups of one client: the score, and (zone, counted answers) of each zone that counted."""

    ip: str
    score: float
    listings: tuple[tuple[str, tuple[str, ...]], ...]
    threshold: float

    @property
    def blocked(self) -> bool:
        return self.score >= self.threshold

    @property
    def blocking_zones(self) -> list[str]:
        return [zone for zone, _ in self.listings]

    def describe(self) -> str:
        listed = " ".join(f"{z}={','.join(a)}" for z, a in self.listings) or "none"
        return f"score={self.score:g} threshold={self.threshold:g} listed: {listed}"


@implementer(IConnectFilter)
class DNSBL:
    """See the module docstring.  Also provides IRcptFilter (reject) or IDataFilter (tag)."""

    def __init__(self, zones=None, threshold: float = 1, action: str = "reject",
                 lookup_timeout: float = 10, allow=(), header: str = "X-DNSBL", context=None):
        if zones is None:
            raise ValueError("zones: missing (the block lists' DNS zones)")
        if isinstance(zones, (str, dict)) or not isinstance(zones, (list, tuple)) or not zones:
            raise ValueError(f"zones: expected a list of zones, got {zones!r}")
        self.zones = tuple(parse_zone(f"zones[{i}]", z) for i, z in enumerate(zones, 1))
        seen = set()
        for i, zone in enumerate(self.zones, 1):
            if zone.name in seen:
                raise ValueError(f"zones[{i}]: {zone.name} is listed twice "
                                 f"(give one zone several codes instead)")
            seen.add(zone.name)
        self.threshold = _number("threshold", threshold, positive=True)
        if action not in ACTIONS:
            raise ValueError(f"action: expected one of {', '.join(ACTIONS)}, got {action!r}")
        self.action = action
        self.lookup_timeout = _number("lookup_timeout", lookup_timeout, positive=True)
        if isinstance(allow, str) or not isinstance(allow, (list, tuple)):
            raise ValueError(f"allow: expected a list of networks, got {allow!r}")
        nets = []
        for i, text in enumerate(allow, 1):
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except (ValueError, TypeError):
                raise ValueError(f"allow[{i}]: not a network (CIDR): {text!r}")
        self.allow = tuple(nets)
        if not isinstance(header, str) or not _HEADER_NAME.match(header):
            raise ValueError(f"header: not a header field name: {header!r}")
        self.header = header
        if context is None:
            raise ValueError("dnsbl needs the server's context (a DNS resolver)")
        hook_timeout = _hook_timeout(context)
        if hook_timeout is not None and self.lookup_timeout >= hook_timeout:
            raise ValueError(f"lookup_timeout: must be shorter than the table's timeout "
                             f"({lookup_timeout!r} >= {hook_timeout:g} s), or every wait "
                             f"on a silent zone would be a 451")
        self.context = context
        self.reactor = context.reactor
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self.cache = context.shared.get(("dnsbl", "cache"), LookupCache)
        alsoProvides(self, IRcptFilter if action == "reject" else IDataFilter)

    @property
    def resolver(self):
        return self.context.resolver

    # --- looking up ---------------------------------------------------------

    def _skipped(self, ip) -> bool:
        return ip is None or any(ip.version == net.version and ip in net for net in self.allow)

    def _tries(self) -> tuple[float, ...]:
        """
        The resolver's per-try timeouts: two tries (a retransmission), all
        servers' worth within 90% of lookup_timeout, so the resolver is done
        with a silent zone before our own deadline.
        """
        resolver = self.resolver
        servers = len(getattr(resolver, "servers", ()) or ()) + len(
            getattr(resolver, "dynServers", ()) or ())
        share = self.lookup_timeout * 0.9 / max(servers, 1)
        return (share / 3, share * 2 / 3)

    def lookup(self, name: str) -> defer.Deferred:
        """A Deferred firing with the L{Lookup} for C{name}: cached, under way, or asked now."""
        now = self.reactor.seconds()
        cached = self.cache.get(name, now)
        if cached is not None:
            return defer.succeed(cached)
        pending = self.cache.pending.get(name)
        if pending is None:
            pending = self._ask(name)
            if pending.called:  # answered at once (a resolver with its own cache)
                return pending
            self.cache.pending[name] = pending
        waiter: defer.Deferred = defer.Deferred()

        def relay(lookup):
            waiter.callback(lookup)
            return lookup

        pending.addCallback(relay)
        return waiter

    def _ask(self, name: str) -> defer.Deferred:
        """Ask the resolver; a Deferred firing with the L{Lookup}, cached (never failing)."""
        try:
            d = self.resolver.lookupAddress(name, timeout=self._tries())
        except Exception as e:  # a resolver that raises instead of failing
            d = defer.fail(e)
        d.addTimeout(self.lookup_timeout, self.reactor)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(name,), errbackArgs=(name,))

        def broken(failure):
            log.failure("dnsbl: {name}: lookup failed", failure, name=name)
            return Lookup(error="internal error"), float(ERROR_TTL)

        def done(result):
            lookup, ttl = result
            self.cache.pending.pop(name, None)
            self.cache.put(name, lookup, ttl, self.reactor.seconds())
            return lookup

        return d.addErrback(broken).addCallback(done)

    def _answered(self, result, name: str) -> tuple[Lookup, float]:
        answers, authority, _ = result
        records = [rr for rr in answers if rr.type == dns.A]
        if not records:
            return Lookup(), _negative_ttl(authority)
        listed, ignored = [], []
        for rr in records:
            address = ipaddress.IPv4Address(rr.payload.address)
            if address in LISTINGS and address not in ERROR_CODES:
                if address not in listed:
                    listed.append(address)
            else:
                ignored.append(str(address))
        if ignored:
            log.warn("dnsbl: {name}: ignored answer {answers} (not a listing: outside "
                     "127.0.0.0/8 or one of the list's 127.255.255.x error codes)",
                     name=name, answers=",".join(ignored))
        return Lookup(tuple(listed), tuple(ignored)), _bounded(min(rr.ttl for rr in records))

    def _failed(self, failure, name: str) -> tuple[Lookup, float]:
        if failure.check(dns_error.DNSNameError):
            message = failure.value.args[0] if failure.value.args else None
            return Lookup(), _negative_ttl(getattr(message, "authority", ()))
        if failure.check(defer.TimeoutError, dns_error.DNSQueryTimeoutError, defer.CancelledError):
            why = "no answer"
        elif failure.check(dns_error.DNSServerError):
            why = "SERVFAIL"
        elif failure.check(dns_error.DNSQueryRefusedError):
            why = "REFUSED"
        else:
            why = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        log.warn("dnsbl: {name}: {why}; counted as not listed", name=name, why=why)
        return Lookup(error=why), float(ERROR_TTL)

    def check(self, client_ip: str) -> defer.Deferred:
        """
        Look C{client_ip} up in every zone at once; a Deferred firing with
        its L{Result} (never failing).
        """
        ip = client_address(client_ip)
        lookups = [self.lookup(query_name(ip, zone.name)) for zone in self.zones]
        d = defer.gatherResults(lookups, consumeErrors=True)
        d.addCallback(self._score, str(ip))
        return d

    def _score(self, lookups, ip: str) -> Result:
        total, listings = 0.0, []
        for zone, lookup in zip(self.zones, lookups):
            score, counted = zone.score(lookup.answers)
            total += score
            if score > 0:
                listings.append((zone.name, counted))
        return Result(ip, total, tuple(listings), self.threshold)

    # --- the hooks ----------------------------------------------------------

    def connect(self, session):
        ip = client_address(session.client_ip)
        if self._skipped(ip):
            return None
        d = self.check(session.client_ip)

        def report(result: Result):
            if result.listings:
                log.info("dnsbl: client [{ip}] session={sid} {what}{verdict}",
                         ip=result.ip, sid=session.id, what=result.describe(),
                         verdict=f" -> {self.action}" if result.blocked else "")

        d.addCallback(report)
        d.addErrback(lambda f: log.failure("dnsbl: lookup of [{ip}] failed", f,
                                           ip=session.client_ip))
        return None  # the greeting is not delayed

    def _result(self, session) -> defer.Deferred | None:
        if session.user:
            return None
        ip = client_address(session.client_ip)
        if self._skipped(ip):
            return None
        return self.check(session.client_ip)

    def rcpt(self, session, envelope, recipient):
        d = self._result(session)
        if d is None:
            return None

        def decide(result: Result):
            if not result.blocked:
                return None
            return Verdict.reject(
                f"Service unavailable; client [{result.ip}] blocked using "
                f"{', '.join(result.blocking_zones)}", "5.7.1")

        return d.addCallback(decide)

    def data(self, session, envelope, message):
        d = self._result(session)
        if d is None:
            return None

        def tag(result: Result):
            changes = [RemoveHeader(self.header)] if message.header(self.header) else []
            if result.blocked:
                changes += [AddHeader(self.header, f"{zone}={','.join(answers)}")
                            for zone, answers in result.listings]
            return Verdict.continue_(*changes) if changes else None

        return d.addCallback(tag)


def _hook_timeout(context) -> float | None:
    """The C{timeout} of the table that configures this plugin, if it can be found."""
    config = getattr(context, "config", None)
    for pc in getattr(config, "filters", ()) or ():
        if context.where == f"{config.file}: {pc.where}":
            return pc.timeout
    return None
