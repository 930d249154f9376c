"""
A DNS server for tests: authoritative answers from zones given as plain
Python data, on loopback, over UDP and TCP on the same port.

    server = DNSServer.started(self, {
        "example.test": {"MX": [(10, "mx1.example.test")], "TXT": ["v=spf1 -all"]},
        "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "www.example.test": {"CNAME": "mx1.example.test"},
    }, servfail={"broken.test"}, timeout={"slow.test"})
    resolver = server.resolver(timeout=(0.2,))

Record values, by type (a type's value is a list, or one value):

  - C{A}, C{AAAA}: address text.
  - C{MX}: C{(preference, exchange)}; the exchange C{"."} (or C{""}) makes
    a null MX (RFC 7505).
  - C{TXT}: a str is one record, cut into strings of at most 255 bytes
    (UTF-8) as DNS requires, so a long DKIM key or SPF record is given
    whole; a tuple or list gives the record's strings explicitly (each at
    most 255 bytes).
  - C{PTR}, C{CNAME}, C{NS}: a host name (see L{reverse_name} for PTR
    owners).
  - C{SRV}: C{(priority, weight, port, target)}.
  - Anything else: a twisted.names C{Record_*} instance, as it is.

Behaviour:

  - A name not in the zones is NXDOMAIN, unless some name below it is
    (an empty non-terminal: NODATA) or a wildcard (C{"*.bl.test"})
    covers it.  A name with no record of the asked type is NODATA.
  - CNAMEs are followed through the zones, as a server authoritative for
    all of them would, unless C{chase_cnames=False} (then only the CNAME
    is answered, and the client must ask for the target itself).
  - C{servfail}, C{refused}, C{timeout}: names (each also covers the names
    below it) or C{(name, type)} pairs that answer SERVFAIL, REFUSED, or
    nothing at all.  They are sets, changeable while the server runs.
  - A UDP answer longer than C{udp_size} (512: the client does not use
    EDNS) is sent empty with the TC bit, so the client asks again over TCP.
  - Every query is recorded in L{DNSServer.queries} as C{(name, type,
    "udp" | "tcp")}.

L{DNSServer.set}, L{DNSServer.add}, L{DNSServer.remove} and
L{DNSServer.update} change the records while it runs; nothing is cached.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable

from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.names import dns, server

from twisted_mta.delivery.mx import make_resolver

__all__ = ["DNSServer", "reverse_name", "txt_strings"]


def reverse_name(ip: str) -> str:
    """The PTR owner name of an address: C{4.3.2.1.in-addr.arpa} and the like."""
    return ipaddress.ip_address(ip).reverse_pointer


def _name(text: str | bytes) -> str:
    if isinstance(text, dns.Name):
        text = text.name
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.rstrip(".").lower()
    if not text.isascii():
        text = text.encode("idna").decode("ascii")
    return text


def _wire(text: str) -> bytes:
    return _name(text).encode("ascii")


def txt_strings(value: str | bytes | tuple | list) -> list[bytes]:
    """The character-strings of one TXT record (see the module docstring)."""
    if isinstance(value, (tuple, list)):
        parts = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
        for part in parts:
            if len(part) > 255:
                raise ValueError(f"TXT string longer than 255 bytes: {part[:40]!r}...")
        return parts
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _record(rtype: str, value: Any, ttl: int):
    if not isinstance(value, (str, bytes, tuple, list, int)):
        return value  # a twisted.names record, as it is
    if rtype == "A":
        return dns.Record_A(value, ttl)
    if rtype == "AAAA":
        return dns.Record_AAAA(value, ttl)
    if rtype == "MX":
        preference, exchange = value
        return dns.Record_MX(preference, _wire(exchange), ttl)
    if rtype == "TXT":
        return dns.Record_TXT(*txt_strings(value), ttl=ttl)
    if rtype == "PTR":
        return dns.Record_PTR(_wire(value), ttl)
    if rtype == "CNAME":
        return dns.Record_CNAME(_wire(value), ttl)
    if rtype == "NS":
        return dns.Record_NS(_wire(value), ttl)
    if rtype == "SRV":
        priority, weight, port, target = value
        return dns.Record_SRV(priority, weight, port, _wire(target), ttl)
    raise ValueError(f"record type {rtype} needs a twisted.names Record_{rtype} value")


def _values(value: Any) -> list:
    if isinstance(value, list):
        return list(value)
    return [value]


class _Factory(server.DNSServerFactory):
    def __init__(self, owner: "DNSServer"):
        super().__init__()
        self.owner = owner

    def handleQuery(self, message, protocol, address):
        self.owner._handle(self, message, protocol, address)


class DNSServer:
    """See the module docstring."""

    def __init__(self, zones: dict | None = None, *, servfail: Iterable = (),
                 timeout: Iterable = (), refused: Iterable = (), ttl: int = 300,
                 udp_size: int = 512, chase_cnames: bool = True,
                 interface: str = "127.0.0.1", reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.servfail = set(servfail)
        self.timeout = set(timeout)
        self.refused = set(refused)
        self.ttl = ttl
        self.udp_size = udp_size
        self.chase_cnames = chase_cnames
        self.zones: dict[str, dict[str, list]] = {}
        self.update(zones or {})
        self.interface = interface
        self.port: int | None = None
        self.queries: list[tuple[str, str, str]] = []
        self._factory = _Factory(self)
        self._udp = self._tcp = None
        self._resolvers: list = []

    # --- running ------------------------------------------------------------

    @classmethod
    def started(cls, testcase, zones: dict | None = None, **kwargs) -> "DNSServer":
        """A server, started, and stopped when C{testcase}'s test is over."""
        dns_server = cls(zones, **kwargs)
        dns_server.start()
        testcase.addCleanup(dns_server.stop)
        return dns_server

    def start(self) -> int:
        """Listen on UDP and TCP, on one free port of C{interface}; returns the port."""
        for _ in range(50):
            udp = self.reactor.listenUDP(0, dns.DNSDatagramProtocol(self._factory),
                                         interface=self.interface)
            port = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(port, self._factory, interface=self.interface)
            except CannotListenError:
                udp.stopListening()
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            return port
        raise RuntimeError("no free port for both UDP and TCP")

    @property
    def address(self) -> str:
        """The server as L{make_resolver} takes it: C{127.0.0.1:port} or C{[::1]:port}."""
        host = f"[{self.interface}]" if ":" in self.interface else self.interface
        return f"{host}:{self.port}"

    def resolver(self, timeout=(1, 3)):
        """A twisted.names resolver asking this server only (closed with it)."""
        resolver = make_resolver((self.address,), reactor=self.reactor, timeout=timeout)
        self._resolvers.append(resolver)
        return resolver

    async def _stop(self) -> None:
        for protocol in list(self._factory.connections):
            protocol.transport.loseConnection()
        for resolver in self._resolvers:
            for protocol in list(resolver.connections):
                protocol.transport.loseConnection()
        for port in (self._udp, self._tcp):
            if port is not None:
                await defer.maybeDeferred(port.stopListening)
        self._udp = self._tcp = None
        # Both ends of the TCP connections are in this reactor: wait until
        # they are gone, so that a trial test ends with a clean reactor.
        for _ in range(400):
            if not self._factory.connections and not any(r.connections for r in self._resolvers):
                break
            await task.deferLater(self.reactor, 0.005, lambda: None)

    def stop(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop())

    # --- the records ----------------------------------------------------------

    def update(self, zones: dict) -> None:
        """Set every type given for every name given (other records stay)."""
        for name, types in zones.items():
            for rtype, value in types.items():
                self.set(name, rtype, value)

    def set(self, name: str, rtype: str, value: Any) -> None:
        """Replace C{name}'s records of C{rtype} (an empty list removes them)."""
        values = _values(value)
        for v in values:
            _record(rtype.upper(), v, self.ttl)  # refuse bad data now, not at query time
        records = self.zones.setdefault(_name(name), {})
        if values:
            records[rtype.upper()] = values
        else:
            records.pop(rtype.upper(), None)

    def add(self, name: str, rtype: str, value: Any) -> None:
        """Add one record."""
        _record(rtype.upper(), value, self.ttl)
        self.zones.setdefault(_name(name), {}).setdefault(rtype.upper(), []).append(value)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Remove C{name}'s records of C{rtype}, or the whole name (then NXDOMAIN)."""
        if rtype is None:
            self.zones.pop(_name(name), None)
        else:
            self.zones.get(_name(name), {}).pop(rtype.upper(), None)

    # --- answering ------------------------------------------------------------

    def _node(self, name: str) -> dict | None:
        """C{name}'s records; {} for a name that exists without any; None: NXDOMAIN."""
        if name in self.zones:
            return self.zones[name]
        if any(key.endswith("." + name) for key in self.zones):
            return {}
        labels = name.split(".")
        for i in range(1, len(labels)):
            wildcard = "*." + ".".join(labels[i:])
            if wildcard in self.zones:
                return self.zones[wildcard]
        return None

    @staticmethod
    def _matches(entries: set, name: str, rtype: str) -> bool:
        for entry in entries:
            if isinstance(entry, tuple):
                if _name(entry[0]) == name and entry[1].upper() == rtype:
                    return True
            else:
                entry = _name(entry)
                if name == entry or name.endswith("." + entry):
                    return True
        return False

    def _rrs(self, owner: str, rtype: str, values: list) -> list:
        return [dns.RRHeader(owner.encode("ascii"), dns.REV_TYPES[rtype], dns.IN, self.ttl,
                             _record(rtype, v, self.ttl), auth=True) for v in values]

    def answer(self, name: str, qtype: int) -> tuple[int, list]:
        """(rcode, answer records) for a query."""
        rtype = dns.QUERY_TYPES.get(qtype, "")
        answers: list = []
        current, seen = name, {name}
        while True:
            node = self._node(current)
            if node is None:
                return dns.ENAME, answers
            if qtype == dns.ALL_RECORDS:
                for t, values in node.items():
                    answers.extend(self._rrs(current, t, values))
                return dns.OK, answers
            if rtype in node or rtype == "CNAME":
                answers.extend(self._rrs(current, rtype, node.get(rtype, [])))
                return dns.OK, answers
            if "CNAME" not in node:
                return dns.OK, answers
            cname = node["CNAME"]
            answers.extend(self._rrs(current, "CNAME", cname))
            target = _name(_values(cname)[0])
            if not self.chase_cnames or target in seen or len(seen) > 8:
                return dns.OK, answers
            seen.add(target)
            current = target

    def _handle(self, factory, message, protocol, address) -> None:
        query = message.queries[0]
        name = _name(query.name.name)
        rtype = dns.QUERY_TYPES.get(query.type, str(query.type))
        self.queries.append((name, rtype, "udp" if address is not None else "tcp"))
        if self._matches(self.timeout, name, rtype):
            return
        if self._matches(self.servfail, name, rtype):
            rcode, answers = dns.ESERVER, []
        elif self._matches(self.refused, name, rtype):
            rcode, answers = dns.EREFUSED, []
        else:
            rcode, answers = self.answer(name, query.type)
        response = factory._responseFromMessage(message, rCode=rcode, answers=answers)
        response.auth = 1
        if address is not None and len(response.toStr()) > self.udp_size:
            response.answers = []
            response.trunc = 1
        factory.sendReply(protocol, response, address)
