"""
The C{dnsbl} built-in: query names, options, scoring and code maps, the
cache (with a Clock and a resolver whose answers the test gives), and end
to end over real sockets: the in-process service asking a loopback
L{DNSServer}, driven with smtplib.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.dns_support import DNSServer
from tests.support import make_config
from twisted_mta import loader, testing
from twisted_mta.builtins import dnsbl
from twisted_mta.builtins.dnsbl import Zone, parse_code, parse_zone, query_name
from twisted_mta.config import PluginConfig
from twisted_mta.interfaces import IDataFilter, IRcptFilter
from twisted_mta.loader import PluginError
from twisted_mta.smtp.replies import refusal_reply
from twisted_mta.values import Action, AddHeader, RemoveHeader, SharedState, Verdict

IPV6_NIBBLES = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
LOOPBACK6_NIBBLES = ".".join(["1"] + ["0"] * 31)


# --- names, codes, scoring ------------------------------------------------------


class QueryNameTests(unittest.SynchronousTestCase):
    def test_ipv4_reversed_octets(self):
        self.assertEqual(query_name("192.0.2.1", "zen.example.test"), "1.2.0.192.zen.example.test")
        self.assertEqual(query_name("127.0.0.1", "zen.test"), "1.0.0.127.zen.test")

    def test_ipv6_every_nibble_reversed(self):
        self.assertEqual(query_name("2001:db8::1", "zen.test"), IPV6_NIBBLES + ".zen.test")
        self.assertEqual(query_name("::1", "zen.test"), LOOPBACK6_NIBBLES + ".zen.test")
        self.assertEqual(len(query_name("2001:db8::1", "z.test").split(".")), 32 + 2)

    def test_ipv4_mapped_ipv6_is_ipv4(self):
        self.assertEqual(query_name("::ffff:192.0.2.1", "zen.test"), "1.2.0.192.zen.test")

    def test_not_an_address(self):
        self.assertRaises(ValueError, query_name, "unix-socket", "zen.test")


class CodeTests(unittest.SynchronousTestCase):
    def covers(self, text):
        code = parse_code("c", text, 1)
        import ipaddress
        return [str(ipaddress.IPv4Address(n)) for n in range(code.low, code.high + 1)]

    def test_patterns(self):
        self.assertEqual(self.covers("127.0.0.2"), ["127.0.0.2"])
        self.assertEqual(self.covers("127.0.0.4-7"), ["127.0.0.4", "127.0.0.5", "127.0.0.6",
                                                      "127.0.0.7"])
        self.assertEqual(self.covers("127.0.0.10-127.0.0.11"), ["127.0.0.10", "127.0.0.11"])
        self.assertEqual(self.covers("127.0.1.0/30"), ["127.0.1.0", "127.0.1.1", "127.0.1.2",
                                                       "127.0.1.3"])

    def test_bad_patterns(self):
        for text, why in [("10.0.0.2", "outside 127.0.0.0/8"),
                          ("127.255.255.254", "error codes"),
                          ("127.0.0.7-4", "empty range"),
                          ("127.0.0.x", "not an answer"),
                          (2, "expected an answer")]:
            with self.assertRaises(ValueError) as caught:
                parse_code("zones[1].codes", text, 1)
            self.assertIn(why, str(caught.exception))
            self.assertIn("zones[1].codes", str(caught.exception))


def A(*addresses):
    import ipaddress
    return tuple(ipaddress.IPv4Address(a) for a in addresses)


class ScoreTests(unittest.SynchronousTestCase):
    def test_any_listing_counts_the_weight_once(self):
        zone = parse_zone("z", {"zone": "bl.test", "weight": 3})
        self.assertEqual(zone.score(A("127.0.0.2", "127.0.0.9")), (3.0, ("127.0.0.2", "127.0.0.9")))
        self.assertEqual(zone.score(()), (0.0, ()))
        self.assertEqual(parse_zone("z", "bl.test"), Zone("bl.test", 1.0))

    def test_code_table(self):
        """Spamhaus-like: SBL and XBL each count once, whatever answers match them."""
        zone = parse_zone("z", {"zone": "zen.test", "codes": {
            "127.0.0.2-3": 2, "127.0.0.4-7": 2, "127.0.0.10-11": 0.5}})
        self.assertEqual(zone.score(A("127.0.0.2")), (2.0, ("127.0.0.2",)))
        self.assertEqual(zone.score(A("127.0.0.2", "127.0.0.3")), (2.0, ("127.0.0.2", "127.0.0.3")))
        self.assertEqual(zone.score(A("127.0.0.3", "127.0.0.4")), (4.0, ("127.0.0.3", "127.0.0.4")))
        self.assertEqual(zone.score(A("127.0.0.11")), (0.5, ("127.0.0.11",)))
        # An answer no code names does not count.
        self.assertEqual(zone.score(A("127.0.0.9")), (0.0, ()))

    def test_code_list_uses_the_zone_weight(self):
        zone = parse_zone("z", {"zone": "zen.test", "weight": 2, "codes": ["127.0.0.2", "127.0.0.4-7"]})
        self.assertEqual(zone.score(A("127.0.0.5")), (2.0, ("127.0.0.5",)))
        self.assertEqual(zone.score(A("127.0.0.10")), (0.0, ()))

    def test_zone_errors(self):
        for value, why in [
            ({"zone": "zen.test", "weight": 2, "codes": {"127.0.0.2": 2}}, "zones[1].weight"),
            ({"zone": "zen.test", "weight": "2"}, "zones[1].weight: expected a number"),
            ({"zone": "zen.test", "weight": True}, "zones[1].weight"),
            ({"zone": "zen.test", "codes": {"127.0.0.2": "x"}}, "expected a number"),
            ({"zone": "zen.test", "codes": {}}, "zones[1].codes: empty"),
            ({"zone": "zen.test", "codes": "127.0.0.2"}, "zones[1].codes"),
            ({"zone": "zen.test", "wieght": 2}, "unknown key 'wieght'"),
            ({"weight": 2}, "zones[1].zone: missing"),
            ({"zone": "bad zone.test"}, "not a valid zone name"),
            ("nodots", "not a valid zone name"),
            ("a..test", "not a valid zone name"),
            ("x" * 64 + ".test", "not a valid zone name"),
            (7, "expected a zone name or a table"),
        ]:
            with self.assertRaises(ValueError, msg=repr(value)) as caught:
                parse_zone("zones[1]", value)
            self.assertIn(why, str(caught.exception))

    def test_zone_name_normalised(self):
        self.assertEqual(parse_zone("z", "ZEN.Example.Test.").name, "zen.example.test")


# --- the plugin with a resolver the test answers --------------------------------


class FakeResolver:
    """lookupAddress returns a Deferred the test fires; every query is kept."""

    servers = [("127.0.0.1", 53)]

    def __init__(self):
        self.asked: list[tuple[str, defer.Deferred]] = []
        self.timeouts = []

    def lookupAddress(self, name, timeout=None):
        d = defer.Deferred()
        self.asked.append((name, d))
        self.timeouts.append(timeout)
        return d

    def names(self):
        return [name for name, _ in self.asked]

    def pending(self, name):
        for asked, d in self.asked:
            if asked == name and not d.called:
                return d
        raise AssertionError(f"no pending query for {name}: {self.names()}")

    def answer(self, name, *addresses, ttl=300):
        answers = [dns.RRHeader(name.encode(), dns.A, dns.IN, ttl, dns.Record_A(a, ttl))
                   for a in addresses]
        self.pending(name).callback((answers, [], []))

    def nxdomain(self, name, soa=None):
        message = dns.Message(rCode=dns.ENAME)
        if soa is not None:
            ttl, minimum = soa
            message.authority = [dns.RRHeader(b"zen.test", dns.SOA, dns.IN, ttl, dns.Record_SOA(
                b"ns.zen.test", b"hostmaster.zen.test", minimum=minimum, ttl=ttl))]
        self.pending(name).errback(dns_error.DNSNameError(message))

    def fail(self, name, exc):
        self.pending(name).errback(exc)


class PluginTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.shared = SharedState()
        self.resolver = FakeResolver()
        # What PluginContext.resolver hands out without [delivery] nameservers.
        self.shared.get(("resolver", ()), lambda: self.resolver)
        self.config = make_config(self.folder)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def load(self, **options):
        options.setdefault("zones", ["zen.test", "bl.test"])
        build = loader._Build(1, self.shared, self.clock)
        return loader.load(self.config, PluginConfig("dnsbl", options, "filter[1]"), build)

    def hook(self, plugin, stage, *args):
        return testing.run(plugin, stage, *args, reactor=self.clock)

    def rcpt(self, plugin, ip="192.0.2.1", **session):
        return self.hook(plugin, "rcpt", testing.session(ip, **session), testing.envelope(),
                        testing.address("bob@example.test"))

    def logged(self, text):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if text in formatEvent(e)]

    # --- options ---

    def test_options_are_checked(self):
        for options, why in [
            ({"zones": []}, "zones: expected a list"),
            ({"zones": "zen.test"}, "zones: expected a list"),
            ({"zones": ["zen.test", "ZEN.test"]}, "zones[2]: zen.test is listed twice"),
            ({"threshold": 0}, "threshold: expected a positive number"),
            ({"threshold": "2"}, "threshold: expected a positive number"),
            ({"action": "drop"}, "action: expected one of reject, tag"),
            ({"lookup_timeout": 0}, "lookup_timeout: expected a positive number"),
            ({"allow": "192.0.2.0/24"}, "allow: expected a list"),
            ({"allow": ["192.0.2.0/24", "nonsense"]}, "allow[2]: not a network"),
            ({"header": "X DNSBL"}, "header: not a header field name"),
            ({"header": "X-DNSBL:"}, "header: not a header field name"),
        ]:
            with self.assertRaises(PluginError, msg=repr(options)) as caught:
                self.load(**options)
            self.assertIn(why, str(caught.exception))
        with self.assertRaises(PluginError) as caught:
            build = loader._Build(1, self.shared, self.clock)
            loader.load(self.config, PluginConfig("dnsbl", {}, "filter[1]"), build)
        self.assertIn("zones: missing", str(caught.exception))
        with self.assertRaises(PluginError) as caught:
            self.load(nonsense=1)
        self.assertIn("bad options for dnsbl", str(caught.exception))

    def test_lookup_timeout_shorter_than_the_hook_timeout(self):
        """The table's own timeout (the loader's) bounds the hook: lookup_timeout must be less."""
        config = make_config(self.folder, filter=[
            {"use": "dnsbl", "zones": ["zen.test"], "lookup_timeout": 10, "timeout": 5}])
        build = loader._Build(1, self.shared, self.clock)
        with self.assertRaises(PluginError) as caught:
            loader.load(config, config.filters[0], build)
        self.assertIn("lookup_timeout: must be shorter than the table's timeout", str(caught.exception))
        config = make_config(self.folder, filter=[
            {"use": "dnsbl", "zones": ["zen.test"], "lookup_timeout": 4, "timeout": 5}])
        loader.load(config, config.filters[0], build)

    def test_hooks_by_action(self):
        """Reject: refused at RCPT, no data hook; tag: header at DATA, no rcpt hook."""
        reject, tag = self.load(), self.load(action="tag")
        self.assertEqual(reject.hooks(), ["connect", "rcpt"])
        self.assertEqual(tag.hooks(), ["connect", "data"])
        self.assertFalse(IDataFilter.providedBy(reject.plugin))
        self.assertFalse(IRcptFilter.providedBy(tag.plugin))

    # --- lookups ---

    def test_connect_asks_every_zone_at_once_and_rcpt_waits(self):
        plugin = self.load()
        self.assertEqual(self.hook(plugin, "connect", testing.session("192.0.2.1")).action,
                         Action.CONTINUE)
        # Both asked before either answered: in parallel.
        self.assertEqual(self.resolver.names(), ["1.2.0.192.zen.test", "1.2.0.192.bl.test"])
        # The resolver's tries end within lookup_timeout (90% of 10 s, one server).
        self.assertAlmostEqual(sum(self.resolver.timeouts[0]), 9.0)
        d = self.rcpt(plugin)
        self.assertIsInstance(d, defer.Deferred)
        self.assertNoResult(d)
        self.assertEqual(len(self.resolver.asked), 2)  # the rcpt joined the connect's lookups
        self.resolver.answer("1.2.0.192.zen.test", "127.0.0.2")
        self.assertNoResult(d)
        self.resolver.nxdomain("1.2.0.192.bl.test")
        verdict = self.successResultOf(d)
        self.assertEqual((verdict.action, verdict.enhanced), (Action.REJECT, "5.7.1"))
        self.assertEqual(verdict.text,
                         "Service unavailable; client [192.0.2.1] blocked using zen.test")
        self.assertTrue(self.logged("dnsbl: client [192.0.2.1] session=test score=1"))
        # Cached: the next RCPT answers at once, without asking.
        self.assertEqual(self.rcpt(plugin).action, Action.REJECT)
        self.assertEqual(len(self.resolver.asked), 2)

    def test_several_zones_named(self):
        plugin = self.load()
        d = self.rcpt(plugin)
        self.resolver.answer("1.2.0.192.zen.test", "127.0.0.2")
        self.resolver.answer("1.2.0.192.bl.test", "127.0.0.4")
        self.assertEqual(self.successResultOf(d).text,
                         "Service unavailable; client [192.0.2.1] blocked using zen.test, bl.test")

    def test_threshold_and_weights(self):
        plugin = self.load(zones=[{"zone": "zen.test", "codes": {"127.0.0.2": 2, "127.0.0.10": 1}},
                                  {"zone": "bl.test", "weight": 1},
                                  {"zone": "wl.test", "weight": -2}], threshold=3)
        cases = [
            # zen, bl, wl answers -> refused?
            (("127.0.0.2",), ("127.0.0.2",), (), True),      # 2 + 1
            (("127.0.0.10",), ("127.0.0.2",), (), False),    # 1 + 1
            (("127.0.0.2",), (), (), False),                 # 2
            (("127.0.0.2", "127.0.0.10"), (), (), True),     # 2 + 1
            (("127.0.0.2",), ("127.0.0.2",), ("127.0.0.2",), False),  # 3 - 2
            (("127.0.0.99",), ("127.0.0.2",), (), False),    # 0 + 1: an answer no code names
        ]
        for n, (zen, bl, wl, refused) in enumerate(cases, 1):
            ip = f"198.51.100.{n}"
            d = self.rcpt(plugin, ip)
            for zone, answers in (("zen.test", zen), ("bl.test", bl), ("wl.test", wl)):
                name = query_name(ip, zone)
                if answers:
                    self.resolver.answer(name, *answers)
                else:
                    self.resolver.nxdomain(name)
            verdict = self.successResultOf(d)
            self.assertEqual(verdict.action is Action.REJECT, refused, (n, verdict))

    def test_error_codes_and_foreign_answers_ignored_and_logged(self):
        """127.255.255.254 ("query via public resolver") and non-127/8 answers never count."""
        plugin = self.load(zones=["zen.test"])
        d = self.rcpt(plugin)
        self.resolver.answer("1.2.0.192.zen.test", "127.255.255.254")
        self.assertEqual(self.successResultOf(d).action, Action.CONTINUE)
        self.assertTrue(self.logged("1.2.0.192.zen.test: ignored answer 127.255.255.254"))
        d = self.rcpt(plugin, "192.0.2.2")
        self.resolver.answer("2.2.0.192.zen.test", "198.51.100.7", "127.0.0.2")
        self.assertEqual(self.successResultOf(d).action, Action.REJECT)
        self.assertTrue(self.logged("2.2.0.192.zen.test: ignored answer 198.51.100.7"))

    def test_errors_count_as_not_listed_and_are_logged(self):
        plugin = self.load(zones=["zen.test", "bl.test", "x.test"], lookup_timeout=5)
        d = self.rcpt(plugin)
        self.resolver.fail("1.2.0.192.zen.test", dns_error.DNSServerError(dns.Message()))
        self.resolver.fail("1.2.0.192.bl.test", dns_error.DNSQueryRefusedError(dns.Message()))
        self.assertNoResult(d)
        self.clock.advance(5)  # x.test never answers
        self.assertEqual(self.successResultOf(d).action, Action.CONTINUE)
        self.assertTrue(self.logged("1.2.0.192.zen.test: SERVFAIL; counted as not listed"))
        self.assertTrue(self.logged("1.2.0.192.bl.test: REFUSED; counted as not listed"))
        self.assertTrue(self.logged("1.2.0.192.x.test: no answer; counted as not listed"))
        # Errors are kept 60 s: a session's later RCPTs do not wait again.
        self.assertEqual(self.rcpt(plugin).action, Action.CONTINUE)
        self.assertEqual(len(self.resolver.asked), 3)
        self.clock.advance(dnsbl.ERROR_TTL)
        self.assertNoResult(self.rcpt(plugin))
        self.assertEqual(len(self.resolver.asked), 6)

    def test_late_answer_after_timeout_is_ignored(self):
        plugin = self.load(zones=["zen.test"], lookup_timeout=2)
        d = self.rcpt(plugin)
        query = self.resolver.pending("1.2.0.192.zen.test")
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d).action, Action.CONTINUE)
        # The resolver's own Deferred was cancelled; an answer after that is dropped.
        self.assertTrue(query.called)
        query.callback(([dns.RRHeader(b"1.2.0.192.zen.test", dns.A, dns.IN, 300,
                                      dns.Record_A("127.0.0.2"))], [], []))
        self.assertEqual(self.rcpt(plugin).action, Action.CONTINUE)  # the cached "no answer"
        self.assertEqual(len(self.resolver.asked), 1)

    # --- the cache ---

    def cached_for(self, plugin, answer):
        """
        Ask about a new client through rcpt, answer with C{answer(name)},
        then find after how many seconds it is asked again.
        """
        self.clients = getattr(self, "clients", 0) + 1
        ip = f"198.51.100.{self.clients}"
        name = query_name(ip, "zen.test")
        d = self.rcpt(plugin, ip)
        answer(name)
        self.successResultOf(d)
        asked, waited = len(self.resolver.asked), 0
        while len(self.resolver.asked) == asked:
            self.clock.advance(1)
            waited += 1
            d = self.rcpt(plugin, ip)
            if waited > 10000:
                raise AssertionError("never asked again")
        self.resolver.nxdomain(name)
        self.successResultOf(d)
        return waited

    def test_listing_cached_for_its_ttl_bounded(self):
        plugin = self.load(zones=["zen.test"])
        answer = self.resolver.answer
        self.assertEqual(self.cached_for(plugin, lambda n: answer(n, "127.0.0.2", ttl=600)), 600)
        self.assertEqual(self.cached_for(plugin, lambda n: answer(n, "127.0.0.2", ttl=5)),
                         dnsbl.MIN_TTL)
        self.assertEqual(self.cached_for(plugin, lambda n: answer(n, "127.0.0.2", ttl=86400)),
                         dnsbl.MAX_TTL)

    def test_negative_cached_for_soa_minimum_or_five_minutes(self):
        plugin = self.load(zones=["zen.test"])
        nxdomain = self.resolver.nxdomain
        self.assertEqual(self.cached_for(plugin, lambda n: nxdomain(n, soa=(900, 120))), 120)
        self.assertEqual(self.cached_for(plugin, lambda n: nxdomain(n, soa=(100, 3600))), 100)
        self.assertEqual(self.cached_for(plugin, nxdomain), dnsbl.NEGATIVE_TTL)
        self.assertEqual(self.cached_for(plugin, self.resolver.answer),  # NODATA
                         dnsbl.NEGATIVE_TTL)

    def test_cache_shared_across_reloads(self):
        first = self.load(zones=["zen.test"])
        d = self.rcpt(first)
        self.resolver.answer("1.2.0.192.zen.test", "127.0.0.2")
        self.successResultOf(d)
        second = self.load(zones=["zen.test"], action="tag")
        message = testing.message(b"Subject: hi\r\n\r\nbody\r\n", self.folder)
        verdict = self.hook(second, "data", testing.session(), testing.envelope(), message)
        self.assertEqual(verdict.changes, (AddHeader("X-DNSBL", "zen.test=127.0.0.2"),))
        self.assertEqual(len(self.resolver.asked), 1)

    def test_cache_is_bounded(self):
        cache = dnsbl.LookupCache(limit=3)
        for n in range(10):
            cache.put(f"n{n}", dnsbl.Lookup(), 100 + n, 0)
        self.assertEqual(sorted(cache.entries), ["n7", "n8", "n9"])
        self.assertIsNone(cache.get("n8", 108))
        self.assertEqual(sorted(cache.entries), ["n9"])

    # --- who is looked up, and tagging ---

    def test_allow_list_and_authenticated_sessions_skip(self):
        plugin = self.load(allow=["192.0.2.0/24", "2001:db8::/32"])
        for ip in ("192.0.2.77", "2001:db8::5", "::ffff:192.0.2.9"):
            self.hook(plugin, "connect", testing.session(ip))
            self.assertEqual(self.rcpt(plugin, ip).action, Action.CONTINUE)
        self.assertEqual(self.resolver.asked, [])
        self.assertEqual(self.rcpt(plugin, "198.51.100.1", user="ann").action, Action.CONTINUE)
        self.assertEqual(self.resolver.asked, [])
        # Not exempt: loopback.
        self.assertNoResult(self.rcpt(plugin, "127.0.0.1"))
        self.assertEqual(self.resolver.names()[0], "1.0.0.127.zen.test")

    def test_ipv6_client(self):
        plugin = self.load(zones=["zen.test"])
        d = self.rcpt(plugin, "2001:db8::1")
        self.resolver.answer(IPV6_NIBBLES + ".zen.test", "127.0.0.3")
        self.assertEqual(self.successResultOf(d).text,
                         "Service unavailable; client [2001:db8::1] blocked using zen.test")

    def test_tag(self):
        plugin = self.load(action="tag", threshold=2,
                           zones=["zen.test", {"zone": "bl.test", "codes": ["127.0.0.2"]}])
        forged = testing.message(b"X-DNSBL: none\r\nSubject: hi\r\n\r\nbody\r\n", self.folder)
        self.hook(plugin, "connect", testing.session())
        self.resolver.answer("1.2.0.192.zen.test", "127.0.0.2", "127.0.0.4")
        self.resolver.answer("1.2.0.192.bl.test", "127.0.0.2")
        verdict = self.hook(plugin, "data", testing.session(), testing.envelope(), forged)
        self.assertEqual(verdict.action, Action.CONTINUE)
        self.assertEqual(verdict.changes, (
            RemoveHeader("X-DNSBL"),
            AddHeader("X-DNSBL", "zen.test=127.0.0.2,127.0.0.4"),
            AddHeader("X-DNSBL", "bl.test=127.0.0.2")))
        # Below the threshold: not tagged (a forged field still goes).
        d = self.hook(plugin, "data", testing.session("192.0.2.2"), testing.envelope(), forged)
        self.resolver.answer("2.2.0.192.zen.test", "127.0.0.2")
        self.resolver.nxdomain("2.2.0.192.bl.test")
        self.assertEqual(self.successResultOf(d).changes, (RemoveHeader("X-DNSBL"),))


# --- end to end -----------------------------------------------------------------

BOB = f"bob@{e2e.LOCAL_DOMAIN}"
SENDER = "alice@client.example.net"


def rcpt_exchange(host, port, recipient=BOB, message=None):
    """EHLO, MAIL, RCPT (and DATA if the RCPT passed and C{message}): the replies."""
    client = smtplib.SMTP(host, port, local_hostname="client.example.net", timeout=60)
    try:
        client.ehlo()
        replies = [client.mail(SENDER)]
        replies.append(client.rcpt(recipient))
        if message is not None and replies[-1][0] == 250:
            replies.append(client.data(message))
        return replies
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


class EndToEndTests(unittest.TestCase):
    """The in-process service with [[filter]] use = "dnsbl", asking a loopback DNS server."""

    def setUp(self):
        self.dns = DNSServer.started(self, {
            "1.0.0.127.zen.test": {"A": "127.0.0.2"},
            f"{LOOPBACK6_NIBBLES}.zen.test": {"A": "127.0.0.4"},
            "*.tag.test": {"A": "127.0.0.2"},
            "*.other.test": {"A": "127.0.0.3"},
        }, servfail={"broken.test"}, timeout={"silent.test"})

    def start(self, filter_toml: str, host: str = "127.0.0.1"):
        site = e2e.Site(self.mktemp(), {"smtp": "none"}, host=host, tls=False,
                        fixed_ports=False, delivery={"nameservers": [self.dns.address]},
                        extra='[[filter]]\nuse = "dnsbl"\n' + filter_toml)
        e2e.start_in_process(self, site)
        return site

    def assertRefused(self, reply, ip, zones):
        """The RCPT reply is the server's for a reject at RCPT, with the plugin's text."""
        text = f"Service unavailable; client [{ip}] blocked using {zones}"
        want = refusal_reply(Verdict.reject(text, "5.7.1"), "rcpt")
        code, line = reply
        self.assertEqual(code, want.code)
        self.assertTrue(line.startswith(want.enhanced.encode() + b" "), line)
        self.assertTrue(line.endswith(text.encode()), line)

    def asked(self, zone):
        return [q for q in self.dns.queries if q[0].endswith("." + zone)]

    @defer.inlineCallbacks
    def test_listed_ipv4_refused_at_rcpt_servfail_zone_ignored(self):
        site = self.start('zones = ["broken.test", "zen.test"]\n')
        replies = yield e2e.in_thread(rcpt_exchange, site.host, site.port())
        self.assertEqual(replies[0][0], 250)
        self.assertRefused(replies[1], "127.0.0.1", "zen.test")
        self.assertIn(("1.0.0.127.zen.test", "A", "udp"), self.dns.queries)
        self.assertIn(("1.0.0.127.broken.test", "A", "udp"), self.dns.queries)

    @defer.inlineCallbacks
    def test_listed_ipv6_nibbles(self):
        if not e2e.has_ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback")
        site = self.start('zones = ["zen.test"]\n', host="::1")
        replies = yield e2e.in_thread(rcpt_exchange, site.host, site.port())
        self.assertRefused(replies[1], "::1", "zen.test")
        self.assertIn((f"{LOOPBACK6_NIBBLES}.zen.test", "A", "udp"), self.dns.queries)

    @defer.inlineCallbacks
    def test_servfail_and_unlisted_zones_do_not_block(self):
        site = self.start('zones = ["broken.test", "other.test"]\nthreshold = 2\n')
        replies = yield e2e.in_thread(rcpt_exchange, site.host, site.port(),
                                      message=e2e.message("pass@client.example.net"))
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        yield e2e.wait_for(lambda: site.delivered(BOB), "delivery")
        self.assertTrue(self.asked("broken.test") and self.asked("other.test"))

    @defer.inlineCallbacks
    def test_tag_adds_the_header(self):
        site = self.start('zones = ["tag.test", "broken.test"]\naction = "tag"\n')
        msg = b"X-DNSBL: forged=127.0.0.9\r\n" + e2e.message("tag@client.example.net")
        replies = yield e2e.in_thread(rcpt_exchange, site.host, site.port(), message=msg)
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        files = yield e2e.wait_for(lambda: site.delivered(BOB), "delivery")
        stored = files[0].read_bytes()
        self.assertIn(b"\r\nX-DNSBL: tag.test=127.0.0.2\r\n", b"\r\n" + stored)
        self.assertNotIn(b"forged", stored)
        self.assertEqual(stored.count(b"X-DNSBL:"), 1)

    @defer.inlineCallbacks
    def test_allow_listed_network_passes_without_lookups(self):
        site = self.start('zones = ["zen.test"]\nallow = ["127.0.0.0/8", "::1/128"]\n')
        replies = yield e2e.in_thread(rcpt_exchange, site.host, site.port(),
                                      message=e2e.message("allow@client.example.net"))
        self.assertEqual([code for code, _ in replies], [250, 250, 250])
        self.assertEqual(self.asked("zen.test"), [])

    @defer.inlineCallbacks
    def test_silent_zone_bounded_by_lookup_timeout_queries_in_parallel(self):
        """
        A zone that never answers does not hold the session past
        lookup_timeout (far below the hook's own timeout, which would
        answer 451 4.3.0): the listing from the other zone still refuses.
        Both zones were asked before the silent one was asked again: the
        lookups run side by side, not one after the other.
        """
        site = self.start('zones = ["silent.test", "zen.test"]\nlookup_timeout = 1\n'
                          'timeout = 20\n')
        replies = yield e2e.in_thread(rcpt_exchange, site.host, site.port())
        self.assertRefused(replies[1], "127.0.0.1", "zen.test")
        names = [q[0] for q in self.dns.queries]
        self.assertEqual(set(names[:2]), {"1.0.0.127.silent.test", "1.0.0.127.zen.test"})
        self.assertGreater(names.count("1.0.0.127.silent.test"), 1)  # the resolver's retry
