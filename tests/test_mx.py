"""
MX resolution (L{twisted_mta.delivery.mx}) against the test DNS server
(L{tests.dns_support}) over real UDP and TCP on loopback, and the test
DNS server itself.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.names import dns, error
from twisted.trial import unittest

from tests.dns_support import DNSServer, reverse_name
from twisted_mta.delivery.mx import DNSError, Hop, MXResolver, make_resolver, parse_nameserver

ZONES = {
    "example.test": {"MX": [(20, "mx3.example.test"), (10, "mx1.example.test"),
                            (10, "mx2.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.2"]},
    "mx3.example.test": {"AAAA": ["2001:db8::3"]},
    "implicit.test": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"], "TXT": ["hello"]},
    "noaddress.test": {"TXT": ["no mail here"]},
    "nullmx.test": {"MX": [(0, ".")], "A": ["192.0.2.20"]},
    "alias.test": {"CNAME": "example.test"},
    "cnamemx.test": {"MX": [(10, "mail.cnamemx.test")]},
    "mail.cnamemx.test": {"CNAME": "real.elsewhere.test"},
    "real.elsewhere.test": {"CNAME": "host.elsewhere.test"},
    "host.elsewhere.test": {"A": ["192.0.2.30"], "AAAA": ["2001:db8::30"]},
    "halfbroken.test": {"MX": [(10, "gone.halfbroken.test"), (20, "ok.halfbroken.test")]},
    "ok.halfbroken.test": {"A": ["192.0.2.40"]},
    "allbroken.test": {"MX": [(10, "gone.allbroken.test"), (20, "fails.allbroken.test")]},
    "fails.allbroken.test": {"A": ["192.0.2.41"]},
    "v6fails.test": {"MX": [(10, "mx.v6fails.test")]},
    "mx.v6fails.test": {"A": ["192.0.2.50"], "AAAA": ["2001:db8::50"]},
    "slowmx.test": {"MX": [(10, "mx.slowmx.test")]},
    "mx.slowmx.test": {"A": ["192.0.2.60"]},
    "xn--bcher-kva.test": {"MX": [(10, "mx.xn--bcher-kva.test")]},
    "mx.xn--bcher-kva.test": {"A": ["192.0.2.70"]},
    "smtp.provider.test": {"A": ["192.0.2.80"], "AAAA": ["2001:db8::80"]},
}


class Recorder:
    """A shuffle that reverses each group, and remembers what it was given."""

    def __init__(self):
        self.groups = []

    def __call__(self, items):
        self.groups.append([str(r.name) for r in items])
        items.reverse()


class MXTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.dns = DNSServer.started(
            self, ZONES,
            servfail={"broken.test", ("mx.v6fails.test", "AAAA"), "fails.allbroken.test"},
            timeout={"slow.test", "mx.slowmx.test"},
            refused={"refused.test"})
        self.shuffle = Recorder()
        self.mx = MXResolver(self.dns.resolver(timeout=(0.2, 0.2)), reactor, shuffle=self.shuffle)

    async def failure(self, d) -> DNSError:
        try:
            result = await d
        except DNSError as e:
            return e
        self.fail(f"expected a DNSError, got {result!r}")

    # --- MX ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_order_and_shuffle(self):
        """By preference; the equal ones (only they) go through the shuffle; IPv6 before IPv4."""
        hops = yield self.mx.hops("example.test")
        self.assertEqual(hops, [
            Hop("mx2.example.test", "127.0.0.2", 25, 10),
            Hop("mx1.example.test", "::1", 25, 10),
            Hop("mx1.example.test", "127.0.0.1", 25, 10),
            Hop("mx3.example.test", "2001:db8::3", 25, 20),
        ])
        self.assertEqual(self.shuffle.groups, [["mx1.example.test", "mx2.example.test"]])
        # AAAA and A of each exchange were asked for, over UDP.
        asked = {(n, t) for n, t, proto in self.dns.queries if proto == "udp"}
        self.assertTrue({("mx1.example.test", "AAAA"), ("mx1.example.test", "A"),
                         ("mx2.example.test", "AAAA"), ("mx3.example.test", "A")} <= asked)

    @defer.inlineCallbacks
    def test_real_shuffle_keeps_preference(self):
        mx = MXResolver(self.dns.resolver(), reactor)  # random.shuffle
        seen = set()
        for _ in range(12):
            hops = yield mx.hops("example.test")
            self.assertEqual([h.preference for h in hops], [10, 10, 10, 20])
            self.assertEqual(hops[-1].name, "mx3.example.test")
            seen.add(hops[0].name)
        self.assertEqual(seen, {"mx1.example.test", "mx2.example.test"})  # 2**-11 to fail

    @defer.inlineCallbacks
    def test_port_and_case(self):
        hops = yield self.mx.hops("Example.TEST.", 2525)
        self.assertEqual({h.port for h in hops}, {2525})
        self.assertEqual(len(hops), 4)

    @defer.inlineCallbacks
    def test_implicit_mx(self):
        hops = yield self.mx.hops("implicit.test")
        self.assertEqual(hops, [Hop("implicit.test", "2001:db8::10", 25, 0),
                                Hop("implicit.test", "192.0.2.10", 25, 0)])

    async def test_no_mx_no_address_is_permanent(self):
        e = await self.failure(self.mx.hops("noaddress.test"))
        self.assertTrue(e.permanent)
        self.assertTrue(e.reply.startswith("550 5.1.2 noaddress.test: "), e.reply)

    async def test_null_mx_is_permanent(self):
        e = await self.failure(self.mx.hops("nullmx.test"))
        self.assertTrue(e.permanent)
        self.assertEqual(e.reply, "550 5.1.10 nullmx.test: null MX: domain accepts no mail (RFC 7505)")
        # Not even the A record was looked at.
        self.assertNotIn(("nullmx.test", "A"), [(n, t) for n, t, _ in self.dns.queries])

    async def test_nxdomain_is_permanent(self):
        e = await self.failure(self.mx.hops("nowhere.test"))
        self.assertTrue(e.permanent)
        self.assertTrue(e.reply.startswith("550 5.1.2 nowhere.test: Host or domain name not found"),
                        e.reply)

    async def test_servfail_is_temporary(self):
        e = await self.failure(self.mx.hops("broken.test"))
        self.assertFalse(e.permanent)
        self.assertTrue(e.reply.startswith("451 4.4.3 broken.test: DNS server failure"), e.reply)

    async def test_refused_is_temporary(self):
        e = await self.failure(self.mx.hops("refused.test"))
        self.assertFalse(e.permanent)
        self.assertIn("REFUSED", e.reply)

    async def test_timeout_is_temporary(self):
        start = reactor.seconds()
        e = await self.failure(self.mx.hops("slow.test"))
        self.assertFalse(e.permanent)
        self.assertTrue(e.reply.startswith("451 4.4.3 slow.test: DNS lookup timed out"), e.reply)
        self.assertLess(reactor.seconds() - start, 5)
        # Asked, and asked again after the first timeout.
        self.assertEqual([q for q in self.dns.queries if q[0] == "slow.test"],
                         [("slow.test", "MX", "udp")] * 2)

    @defer.inlineCallbacks
    def test_literals(self):
        self.assertEqual((yield self.mx.hops("[192.0.2.1]", 26)), [Hop("192.0.2.1", "192.0.2.1", 26, 0)])
        self.assertEqual((yield self.mx.hops("[IPv6:2001:DB8:0::1]")),
                         [Hop("2001:db8::1", "2001:db8::1", 25, 0)])
        self.assertEqual(self.dns.queries, [])

    async def test_bad_literal_is_permanent(self):
        for literal in ("[300.1.1.1]", "[IPv6:nonsense]", "[tag:whatever]", "[2001:db8::1]"):
            e = await self.failure(self.mx.hops(literal))
            self.assertTrue(e.permanent, literal)
            self.assertTrue(e.reply.startswith("550 5.1.2 "), e.reply)

    async def test_bad_domain_is_permanent(self):
        for domain in ("", ".", "a..b.test", "x" * 64 + ".test", "a." * 130 + "test"):
            e = await self.failure(self.mx.hops(domain))
            self.assertTrue(e.permanent, domain)
            self.assertTrue(e.reply.startswith("550 5.1.2 "), e.reply)
        self.assertEqual(self.dns.queries, [])

    @defer.inlineCallbacks
    def test_cname_domain(self):
        """A domain that is a CNAME: the MX of its target."""
        hops = yield self.mx.hops("alias.test")
        self.assertEqual([h.name for h in hops],
                         ["mx2.example.test", "mx1.example.test", "mx1.example.test", "mx3.example.test"])

    @defer.inlineCallbacks
    def test_cname_chain_exchange(self):
        """An exchange behind two CNAMEs keeps the exchange's name (for TLS)."""
        hops = yield self.mx.hops("cnamemx.test")
        self.assertEqual(hops, [Hop("mail.cnamemx.test", "2001:db8::30", 25, 10),
                                Hop("mail.cnamemx.test", "192.0.2.30", 25, 10)])

    @defer.inlineCallbacks
    def test_cname_not_chased_by_server(self):
        """A server that answers only the CNAME: the resolver asks for the target itself."""
        self.dns.chase_cnames = False
        hops = yield self.mx.hops("cnamemx.test")
        self.assertEqual([h.address for h in hops], ["2001:db8::30", "192.0.2.30"])
        self.assertIn(("host.elsewhere.test", "A", "udp"), self.dns.queries)
        hops = yield self.mx.hops("alias.test")
        self.assertEqual(len(hops), 4)

    async def test_cname_loop_is_temporary(self):
        self.dns.update({"loop1.test": {"CNAME": "loop2.test"}, "loop2.test": {"CNAME": "loop1.test"}})
        e = await self.failure(self.mx.hops("loop1.test"))
        self.assertFalse(e.permanent)
        self.assertIn("CNAME", e.reply)

    @defer.inlineCallbacks
    def test_unresolvable_exchange_skipped(self):
        hops = yield self.mx.hops("halfbroken.test")
        self.assertEqual(hops, [Hop("ok.halfbroken.test", "192.0.2.40", 25, 20)])

    async def test_no_exchange_resolves_is_temporary(self):
        e = await self.failure(self.mx.hops("allbroken.test"))
        self.assertFalse(e.permanent)
        self.assertTrue(e.reply.startswith("451 4.4.3 allbroken.test: no MX host has an address"), e.reply)
        self.assertIn("gone.allbroken.test", e.reply)
        self.assertIn("fails.allbroken.test", e.reply)

    @defer.inlineCallbacks
    def test_one_family_failing(self):
        """AAAA fails with SERVFAIL, A works: the IPv4 address is used."""
        hops = yield self.mx.hops("v6fails.test")
        self.assertEqual(hops, [Hop("mx.v6fails.test", "192.0.2.50", 25, 10)])

    async def test_exchange_timeout_is_temporary(self):
        e = await self.failure(self.mx.hops("slowmx.test"))
        self.assertFalse(e.permanent)
        self.assertIn("timed out", e.reply)

    @defer.inlineCallbacks
    def test_bounded_and_unique(self):
        self.dns.set("many.test", "MX", [(i, f"mx{i}.many.test") for i in range(40)])
        for i in range(40):
            self.dns.set(f"mx{i}.many.test", "A", f"192.0.2.{i % 30 + 1}")
        hops = yield self.mx.hops("many.test")
        self.assertEqual(len(hops), 20)
        self.assertEqual(len({h.address for h in hops}), 20)
        self.assertEqual([h.name for h in hops], [f"mx{i}.many.test" for i in range(20)])

    @defer.inlineCallbacks
    def test_international_domain(self):
        hops = yield self.mx.hops("bücher.test")
        self.assertEqual(hops, [Hop("mx.xn--bcher-kva.test", "192.0.2.70", 25, 10)])

    @defer.inlineCallbacks
    def test_records_change_while_running(self):
        self.assertEqual(len((yield self.mx.hops("example.test"))), 4)
        self.dns.set("example.test", "MX", [(5, "mx2.example.test")])
        self.assertEqual((yield self.mx.hops("example.test")),
                         [Hop("mx2.example.test", "127.0.0.2", 25, 5)])
        self.dns.remove("example.test")
        e = yield defer.Deferred.fromCoroutine(self.failure(self.mx.hops("example.test")))
        self.assertTrue(e.permanent)

    # --- smart host -------------------------------------------------------

    @defer.inlineCallbacks
    def test_host(self):
        self.assertEqual((yield self.mx.host("smtp.provider.test", 587)),
                         [Hop("smtp.provider.test", "2001:db8::80", 587, 0),
                          Hop("smtp.provider.test", "192.0.2.80", 587, 0)])
        self.assertEqual((yield self.mx.host("[smtp.provider.test]", 25))[1],
                         Hop("smtp.provider.test", "192.0.2.80", 25, 0))
        self.assertEqual([q[1] for q in self.dns.queries if q[0] == "smtp.provider.test"].count("MX"), 0)

    @defer.inlineCallbacks
    def test_host_addresses(self):
        for text, address in (("192.0.2.9", "192.0.2.9"), ("[192.0.2.9]", "192.0.2.9"),
                              ("::1", "::1"), ("[IPv6:::1]", "::1")):
            self.assertEqual((yield self.mx.host(text, 25)), [Hop(address, address, 25, 0)])
        self.assertEqual(self.dns.queries, [])

    async def test_host_not_found(self):
        e = await self.failure(self.mx.host("nowhere.test", 25))
        self.assertTrue(e.permanent)
        self.assertTrue(e.reply.startswith("451 4.4.3 nowhere.test: "), e.reply)
        e = await self.failure(self.mx.host("broken.test", 25))
        self.assertFalse(e.permanent)
        self.assertTrue(e.reply.startswith("451 4.4.3 broken.test: "), e.reply)


class ResolverTests(unittest.TestCase):
    def test_parse_nameserver(self):
        self.assertEqual(parse_nameserver("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_nameserver("192.0.2.1"), ("192.0.2.1", 53))
        self.assertEqual(parse_nameserver("[::1]:53"), ("::1", 53))
        self.assertEqual(parse_nameserver("[::1]"), ("::1", 53))
        self.assertEqual(parse_nameserver("2001:db8::1"), ("2001:db8::1", 53))
        for bad in ("dns.example.test", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x", "1.2.3.4:70000"):
            self.assertRaises(ValueError, parse_nameserver, bad)

    def test_system_resolver_leaves_no_timer(self):
        conf = self.mktemp()
        with open(conf, "w") as f:
            f.write("search example.test\nnameserver 192.0.2.53\nnameserver ::1\n")
        before = len(reactor.getDelayedCalls())
        r = make_resolver((), reactor, resolv_conf=conf)
        self.assertEqual(r.dynServers, [("192.0.2.53", 53), ("::1", 53)])
        self.assertEqual(len(reactor.getDelayedCalls()), before)

    def test_missing_resolv_conf(self):
        r = make_resolver((), reactor, resolv_conf=self.mktemp())
        self.assertEqual(r.dynServers, [("127.0.0.1", 53)])

    def test_servers(self):
        r = make_resolver(("127.0.0.1:5353", "[::1]:53"), reactor, timeout=(0.5,))
        self.assertEqual(r.servers, [("127.0.0.1", 5353), ("::1", 53)])
        self.assertEqual(r.timeout, (0.5,))
        self.assertRaises(ValueError, make_resolver, ("dns.example.test",), reactor)


class DNSServerTests(unittest.TestCase):
    """The test DNS server, for what later tests (DNSBL, SPF, DKIM) need of it."""

    timeout = 30

    def setUp(self):
        self.dns = DNSServer.started(self, {
            "example.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all", ("two", "strings")],
                             "A": "192.0.2.1"},
            "sel._domainkey.example.test": {"TXT": "v=DKIM1; k=rsa; p=" + "A" * 600},
            reverse_name("192.0.2.1"): {"PTR": "mail.example.test"},
            "*.bl.test": {"A": "127.0.0.2", "TXT": "listed"},
            "a.b.deep.test": {"A": "192.0.2.99"},
        })
        self.resolver = self.dns.resolver(timeout=(0.3,))

    @defer.inlineCallbacks
    def test_txt(self):
        answers, _, _ = yield self.resolver.lookupText("example.test")
        self.assertEqual(sorted(tuple(rr.payload.data) for rr in answers),
                         [(b"two", b"strings"), (b"v=spf1 ip4:192.0.2.0/24 -all",)])

    @defer.inlineCallbacks
    def test_long_txt_split_and_over_tcp(self):
        answers, _, _ = yield self.resolver.lookupText("sel._domainkey.example.test")
        (rr,) = answers
        self.assertEqual([len(s) for s in rr.payload.data], [255, 255, 108])
        self.assertEqual(b"".join(rr.payload.data), b"v=DKIM1; k=rsa; p=" + b"A" * 600)
        # Too long for a 512-byte UDP answer: truncated, then asked over TCP.
        self.assertEqual([q[2] for q in self.dns.queries], ["udp", "tcp"])

    def test_txt_string_too_long(self):
        self.assertRaises(ValueError, self.dns.set, "x.test", "TXT", [("a" * 256,)])

    @defer.inlineCallbacks
    def test_ptr(self):
        answers, _, _ = yield self.resolver.lookupPointer("1.2.0.192.in-addr.arpa")
        self.assertEqual([str(rr.payload.name) for rr in answers], ["mail.example.test"])

    @defer.inlineCallbacks
    def test_wildcard_and_nodata(self):
        answers, _, _ = yield self.resolver.lookupAddress("2.0.0.127.bl.test")
        self.assertEqual([rr.payload.dottedQuad() for rr in answers], ["127.0.0.2"])
        answers, _, _ = yield self.resolver.lookupIPV6Address("example.test")
        self.assertEqual(answers, [])  # NODATA
        answers, _, _ = yield self.resolver.lookupAddress("b.deep.test")
        self.assertEqual(answers, [])  # an empty non-terminal exists
        yield self.assertFailure(self.resolver.lookupAddress("c.deep.test"), error.DNSNameError)

    @defer.inlineCallbacks
    def test_faults_change_while_running(self):
        self.dns.servfail.add("example.test")
        yield self.assertFailure(self.resolver.lookupAddress("example.test"), error.DNSServerError)
        self.dns.servfail.clear()
        self.dns.refused.add(("example.test", "A"))
        yield self.assertFailure(self.resolver.lookupAddress("example.test"), error.DNSQueryRefusedError)
        answers, _, _ = yield self.resolver.lookupText("example.test")
        self.assertEqual(len(answers), 2)
        self.dns.refused.clear()
        self.dns.timeout.add("example.test")
        yield self.assertFailure(self.resolver.lookupAddress("example.test"), defer.TimeoutError)

    @defer.inlineCallbacks
    def test_records_api(self):
        self.dns.add("new.test", "MX", (10, "mx.new.test"))
        self.dns.add("new.test", "MX", (20, "mx2.new.test"))
        answers, _, _ = yield self.resolver.lookupMailExchange("new.test")
        self.assertEqual(sorted((rr.payload.preference, str(rr.payload.name)) for rr in answers),
                         [(10, "mx.new.test"), (20, "mx2.new.test")])
        self.dns.set("new.test", "MX", [])
        answers, _, _ = yield self.resolver.lookupMailExchange("new.test")
        self.assertEqual(answers, [])
        self.dns.set("srv.test", "SRV", (0, 5, 5060, "sip.example.test"))
        self.dns.set("rec.test", "SPF", dns.Record_SPF(b"v=spf1 -all"))
        answers, _, _ = yield self.resolver.lookupService("srv.test")
        self.assertEqual(answers[0].payload.port, 5060)
        answers, _, _ = yield self.resolver.lookupSenderPolicy("rec.test")
        self.assertEqual(answers[0].payload.data, [b"v=spf1 -all"])


class IPv6ServerTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.bind(("::1", 0))
            s.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback")
        self.dns = DNSServer.started(self, ZONES, interface="::1")

    @defer.inlineCallbacks
    def test_over_ipv6(self):
        self.assertTrue(self.dns.address.startswith("[::1]:"))
        hops = yield MXResolver(self.dns.resolver(), reactor, shuffle=lambda g: None).hops("example.test")
        self.assertEqual(len(hops), 4)
