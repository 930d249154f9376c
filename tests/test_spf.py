"""
The C{spf} built-in (twisted_mta.builtins.spf) and its evaluator
(twisted_mta.builtins.spf_eval).

  - L{RFC7208Suite}: the openspf.org RFC 7208 test suite (as pyspf ships
    it; see tests/data/spf/README), one test per case: the scenario's
    zone data is served by a loopback L{DNSServer} and the evaluator asks
    it over real UDP (and TCP for long answers) through twisted.names.
  - Unit tests of the parser, the macros and the limits, driven by
    L{spf_eval.run} with records given as Python data (no DNS).
  - The plugin: options, who is skipped, the verdicts and their texts,
    the header fields, one check per transaction, the time limit.
  - End to end: an in-process MTA with C{[[filter]] use = "spf"} and the
    DNS server as its nameserver, driven with smtplib.
"""

from __future__ import annotations

import ipaddress
import json
import re
import smtplib
from pathlib import Path
from types import SimpleNamespace

from twisted.internet import defer, task
from twisted.names import dns
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.dns_support import DNSServer
from twisted_mta.builtins import spf_eval
from twisted_mta.builtins.spf import SPF, evaluate
from twisted_mta.builtins.spf_eval import Answer, Check, Query
from twisted_mta.smtp.grammar import Address
from twisted_mta.smtp.replies import refusal_reply
from twisted_mta.values import (
    Action, Envelope, Message, PluginContext, RemoveHeader, Session, SharedState, Verdict,
)

DATA = Path(__file__).resolve().parent / "data" / "spf"
HOST = "mx.example.test"

# The types a check asks for, and those the suite's zones hold.
TYPES = ("TXT", "A", "AAAA", "MX", "PTR", "CNAME", "SPF")

#: Cases of the suite not run, with the reason (also in tests/data/spf/README).
NOT_APPLICABLE: dict[str, str] = {}


# --- the RFC 7208 suite -----------------------------------------------------------


def load_suite() -> list[dict]:
    with open(DATA / "rfc7208-tests.json", encoding="ascii") as f:
        return json.load(f)


def _txt(value) -> tuple:
    """A TXT (or SPF) value of the suite as the strings of one record."""
    return (value,) if isinstance(value, str) else tuple(value)


def zone_for(zonedata: dict) -> tuple[dict, set]:
    """
    The suite's C{zonedata} as L{DNSServer} zones and its timeout set, the
    way the suite's reference driver (pyspf's testspf.py) reads it:

      - C{SPF} records are served as type SPF (99), and also as TXT when
        the name has no C{TXT} entry of its own (the suite's "auto-magic
        duplication"); C{TXT: NONE} means no TXT record.
      - A bare C{TIMEOUT} entry: every type not given a record before it
        gets no answer at all (a timeout); a record value C{TIMEOUT}: that
        type times out.
      - C{MX: [pref, ""]} is a null MX; names keep their odd characters.
    """
    zones: dict = {}
    timeout: set = set()
    for name, entries in zonedata.items():
        records: dict[str, list] = {}
        explicit_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        answered: set = set()
        for entry in entries:
            if entry == "TIMEOUT":
                for rtype in TYPES:
                    if rtype not in answered:
                        timeout.add((name, rtype))
                continue
            [(rtype, value)] = entry.items()
            if value == "TIMEOUT":
                timeout.add((name, rtype))
                continue
            if rtype in ("TXT", "SPF") and value == "NONE":
                continue
            answered.add(rtype)
            if rtype == "SPF":
                records.setdefault("SPF", []).append(
                    dns.Record_SPF(*[s.encode("utf-8") for s in _txt(value)], ttl=300))
                if not explicit_txt:
                    records.setdefault("TXT", []).append(_txt(value))
                    answered.add("TXT")
            elif rtype == "TXT":
                records.setdefault("TXT", []).append(_txt(value))
            elif rtype == "MX":
                records.setdefault("MX", []).append(tuple(value))
            elif rtype == "CNAME":
                records["CNAME"] = value
            else:
                records.setdefault(rtype, []).append(value)
        zones[name] = records
    return zones, timeout


def _test_name(scenario: str, case: str) -> str:
    return "test_" + re.sub(r"[^a-z0-9]+", "_", f"{scenario}__{case}".lower()).strip("_")


class RFC7208Suite(unittest.TestCase):
    """
    One test per case of tests/data/spf/rfc7208-tests.json.  The result
    must be one of those listed; where the case gives an explanation, it
    must be it (C{DEFAULT}: the domain gave none, ours applies).
    """

    async def run_case(self, scenario: dict, name: str) -> None:
        case = scenario["tests"][name]
        zones, timeout = zone_for(scenario["zonedata"])
        server = DNSServer.started(self, zones, timeout=timeout)
        resolver = server.resolver(timeout=(0.5,))
        check = Check(case["host"], case["mailfrom"], case["helo"], receiver=HOST)
        result = await evaluate(check, resolver)
        expected = case["result"]
        expected = [expected] if isinstance(expected, str) else expected
        self.assertIn(result.result, expected,
                      f"{name} ({case['spec']}): {result}\n{case.get('description', '')}")
        if "explanation" in case:
            self.assertEqual(result.explanation or "DEFAULT", case["explanation"], result)
        # RFC 7208 4.4: only TXT; the type SPF records served are never asked for.
        self.assertEqual([q for q in server.queries if q[1] == "SPF"], [])


def _add_suite_tests() -> None:
    for scenario in load_suite():
        for name in scenario["tests"]:
            method = _test_name(scenario["description"], name)
            if name in NOT_APPLICABLE:
                continue

            async def test(self, scenario=scenario, name=name):
                await self.run_case(scenario, name)

            test.__name__ = method
            test.__doc__ = f"RFC 7208 suite: {scenario['description']}: {name}"
            setattr(RFC7208Suite, method, test)


_add_suite_tests()


class SuiteDataTests(unittest.TestCase):
    def test_json_is_the_yaml(self):
        """
        The JSON is the YAML, converted once (PyYAML is no dependency): the
        same cases, in the same scenarios.  Checked on the YAML's text.
        """
        yaml_text = (DATA / "rfc7208-tests.yml").read_text(encoding="utf-8")
        suite = load_suite()
        self.assertEqual(yaml_text.count("\n---\n"), len(suite))
        for scenario in suite:
            self.assertIn(f"description: {scenario['description']}\n", yaml_text)
            for name, case in scenario["tests"].items():
                self.assertIn(f"\n  {name}:\n", yaml_text)
        self.assertEqual(sum(len(s["tests"]) for s in suite), 203)

    def test_every_case_runs(self):
        """Each case is a test, or listed as not applicable with its reason."""
        names = [n for s in load_suite() for n in s["tests"]]
        run = [n for n in dir(RFC7208Suite) if n.startswith("test_")]
        self.assertEqual(len(run) + len(NOT_APPLICABLE), len(names))
        readme = (DATA / "README").read_text()
        for name, reason in NOT_APPLICABLE.items():
            self.assertIn(name, readme)


# --- the evaluator, without DNS ---------------------------------------------------


def resolver_for(zone: dict, errors: dict | None = None):
    """
    A function answering L{Query}s from C{zone} ({name: {type: [records]}};
    TXT records as str) and C{errors} ({name: error text}), recording the
    questions in its C{asked} list.
    """
    asked: list = []

    def resolve(query: Query) -> Answer:
        asked.append((query.name, query.type))
        name = query.name.lower()
        if errors and name in errors:
            return Answer(error=errors[name])
        if name not in zone:
            return Answer(nxdomain=True)
        records = zone[name].get(query.type, [])
        if query.type == "TXT":
            records = [r.encode("latin-1") for r in records]
        return Answer(tuple(records))

    resolve.asked = asked
    return resolve


def check(record: str | None, ip: str = "192.0.2.3", sender: str = "strong-bad@email.example.com",
          helo: str = "mx.example.org", zone: dict | None = None, errors=None, **kwargs):
    zone = dict(zone or {})
    if record is not None:
        zone.setdefault(sender.rpartition("@")[2].lower(), {})["TXT"] = [record]
    resolve = resolver_for(zone, errors)
    result = spf_eval.run(Check(ip, sender, helo, **kwargs), resolve)
    object.__setattr__(result, "asked", resolve.asked)  # for the tests' eyes only
    return result


def expand(spec: str, ip: str = "192.0.2.3", sender: str = "strong-bad@email.example.com",
           explain: bool = False, **kwargs) -> str:
    c = Check(ip, sender, "mx.example.org", **kwargs)
    letters = spf_eval.EXPLAIN_LETTERS if explain else spf_eval.DOMAIN_LETTERS
    tokens = spf_eval.parse_macro_string(spec, letters, spaces=explain)
    gen = c.expand(tokens, c.domain)
    try:
        query = gen.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError(f"asked {query}")


class MacroTests(unittest.TestCase):
    def test_rfc7208_examples(self):
        """The examples of RFC 7208 7.4."""
        examples = {
            "%{s}": "strong-bad@email.example.com",
            "%{o}": "email.example.com",
            "%{d}": "email.example.com",
            "%{d4}": "email.example.com",
            "%{d3}": "email.example.com",
            "%{d2}": "example.com",
            "%{d1}": "com",
            "%{dr}": "com.example.email",
            "%{d2r}": "example.email",
            "%{l}": "strong-bad",
            "%{l-}": "strong.bad",
            "%{lr}": "strong-bad",
            "%{lr-}": "bad.strong",
            "%{l1r-}": "strong",
            "%{ir}.%{v}._spf.%{d2}": "3.2.0.192.in-addr._spf.example.com",
            "%{lr-}.lp._spf.%{d2}": "bad.strong.lp._spf.example.com",
            "%{lr-}.lp.%{ir}.%{v}._spf.%{d2}": "bad.strong.lp.3.2.0.192.in-addr._spf.example.com",
            "%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}": "3.2.0.192.in-addr.strong.lp._spf.example.com",
            "%{d2}.trusted-domains.example.net": "example.com.trusted-domains.example.net",
        }
        for spec, want in examples.items():
            self.assertEqual(expand(spec), want, spec)
        self.assertEqual(expand("%{ir}.%{v}._spf.%{d2}", ip="2001:db8::cb01"),
                         "1.0.B.C.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.B.D.0.1.0.0.2"
                         ".ip6._spf.example.com")

    def test_escapes_and_upper_case(self):
        self.assertEqual(expand("a%%b%_c%-d"), "a%b c%20d")
        self.assertEqual(expand("%{L}", sender="~jack&jill=up@example.com"),
                         "~jack%26jill%3Dup")
        self.assertEqual(expand("%{l+=}", sender="a+b=c@example.com"), "a.b.c")

    def test_explanation_only_letters(self):
        """c, r and t are for explanations; elsewhere they are syntax errors."""
        text = expand("%{c} via %{r} at %{t}", ip="2001:DB8::1", explain=True,
                      receiver="mx.example.test", now=1700000000.5)
        self.assertEqual(text, "2001:db8::1 via mx.example.test at 1700000000")
        for spec in ("%{c}.example.com", "%{r}.example.com", "%{t}.example.com"):
            with self.assertRaises(spf_eval.PermError):
                spf_eval.parse_domain_spec(spec)

    def test_bad_macros(self):
        for spec in ("%{d0}", "%(d)", "%d", "100%", "%{x}", "%{d", "a\x01b", "caf\xe9"):
            with self.assertRaises(spf_eval.PermError, msg=spec):
                spf_eval.parse_macro_string(spec)

    def test_long_names_lose_left_labels(self):
        """7.3: an expanded name over 253 characters loses labels on its left."""
        label = "x" * 60
        r = check("v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.example.com -all",
                  sender=f"{label}@example.org")
        self.assertEqual(r.result, "fail")
        asked = [name for name, rtype in r.asked if rtype == "A"]
        self.assertEqual(asked, [".".join([label] * 3) + ".example.com"])


class RecordTests(unittest.TestCase):
    def test_syntax_errors(self):
        bad = [
            "v=spf1 -all moo", "v=spf1 a/33", "v=spf1 a//129", "v=spf1 a/24/64",
            "v=spf1 ip4:1.2.3.4/032", "v=spf1 ip4:1.2.3", "v=spf1 ip6::CAFE::BABE",
            "v=spf1 ip6:fe80::1%eth0", "v=spf1 include", "v=spf1 exists", "v=spf1 ptr/24",
            "v=spf1 include:example.com/24", "v=spf1 a:museum", "v=spf1 a:abc.123",
            "v=spf1 redirect=a.example redirect=b.example", "v=spf1 exp=", "v=spf1 =all",
            "v=spf1 all.", "v=spf1 a:example.com\rptr", "v=spf1 \u00e9all", "v=spf1 foo=%x",
        ]
        for text in bad:
            with self.assertRaises(spf_eval.PermError, msg=text):
                spf_eval.parse_record(text)

    def test_parsed(self):
        record = spf_eval.parse_record(
            "v=spf1 -a:mail.example.com/24//64 mx ?ptr ~ip4:192.0.2.0/24 ip6:2001:db8::/32 "
            "exists:%{ir}.bl.example  include:_spf.example.net unknown-mod=%{d} "
            "exp=explain.%{d} redirect=other.example")
        names = [(d.qualifier, d.name) for d in record.directives]
        self.assertEqual(names, [("-", "a"), ("+", "mx"), ("?", "ptr"), ("~", "ip4"),
                                 ("+", "ip6"), ("+", "exists"), ("+", "include")])
        a = record.directives[0]
        self.assertEqual((a.cidr4, a.cidr6), (24, 64))
        self.assertIsNotNone(record.redirect)
        self.assertIsNotNone(record.exp)

    def test_results_by_qualifier(self):
        for qualifier, result in (("", "pass"), ("+", "pass"), ("-", "fail"),
                                  ("~", "softfail"), ("?", "neutral")):
            r = check(f"v=spf1 {qualifier}ip4:192.0.2.0/24 -all")
            self.assertEqual((r.result, r.mechanism), (result, f"{qualifier}ip4:192.0.2.0/24"))
        self.assertEqual(check("v=spf1 ip4:198.51.100.1").mechanism, "default")

    def test_no_record_and_dns_errors(self):
        self.assertEqual(check(None).result, "none")
        self.assertEqual(check("not spf").result, "none")
        r = check(None, errors={"email.example.com": "SERVFAIL"})
        self.assertEqual(r.result, "temperror")
        self.assertIn("SERVFAIL", r.problem)
        r = check("v=spf1 a:broken.example -all", errors={"broken.example": "timeout"})
        self.assertEqual(r.result, "temperror")
        # 5.5: a DNS error on ptr's PTR lookup is no match, not an error.
        r = check("v=spf1 ptr -all", errors={"3.2.0.192.in-addr.arpa": "timeout"})
        self.assertEqual(r.result, "fail")

    def test_lookup_limit(self):
        """4.6.4: the 10th term causing a lookup is evaluated; the 11th is permerror."""
        zone = {f"h{i}.example": {"A": ["198.51.100.1"]} for i in range(12)}
        ten = " ".join(f"a:h{i}.example" for i in range(10))
        r = check(f"v=spf1 {ten} ip4:192.0.2.3 -all", zone=zone)
        self.assertEqual((r.result, r.lookups), ("pass", 10))
        r = check(f"v=spf1 {ten} a:h10.example ip4:192.0.2.3 -all", zone=zone)
        self.assertEqual(r.result, "permerror")
        self.assertIn("more than 10 DNS lookups", r.problem)
        # ip4, ip6 and all cost nothing; the first match ends the evaluation.
        r = check(f"v=spf1 ip4:192.0.2.3 {ten} {ten}", zone=zone)
        self.assertEqual((r.result, r.lookups), ("pass", 0))

    def test_void_lookup_limit(self):
        r = check("v=spf1 a:n1.example mx:n2.example ip4:192.0.2.3")
        self.assertEqual((r.result, r.voids), ("pass", 2))
        r = check("v=spf1 a:n1.example mx:n2.example exists:n3.example ip4:192.0.2.3")
        self.assertEqual(r.result, "permerror")
        self.assertIn("void", r.problem)

    def test_mx_limits(self):
        mx = [(i, f"mx{i}.example") for i in range(11)]
        zone = {"email.example.com": {"MX": mx}}
        zone.update({f"mx{i}.example": {"A": ["198.51.100.1"]} for i in range(11)})
        self.assertEqual(check("v=spf1 mx -all", zone=zone).result, "permerror")
        zone["email.example.com"]["MX"] = mx[:10]
        zone["mx9.example"]["A"] = ["192.0.2.3"]
        r = check("v=spf1 mx -all", zone=zone)
        self.assertEqual(r.result, "pass")
        # The exchanges' addresses were asked at once (one yield of ten queries).
        self.assertEqual(len([q for q in r.asked if q[1] == "A"]), 10)

    def test_ptr_validation(self):
        zone = {
            "3.2.0.192.in-addr.arpa": {"PTR": ["liar.email.example.com", "mx.email.example.com"]},
            "liar.email.example.com": {"A": ["198.51.100.7"]},
            "mx.email.example.com": {"A": ["192.0.2.3"]},
        }
        self.assertEqual(check("v=spf1 ptr -all", zone=zone).result, "pass")
        zone["mx.email.example.com"]["A"] = ["198.51.100.8"]
        self.assertEqual(check("v=spf1 ptr -all", zone=zone).result, "fail")

    def test_helo_identity(self):
        """The null sender: postmaster@<helo> is checked (RFC 7208 2.4)."""
        zone = {"mx.example.org": {"TXT": ["v=spf1 a -all"], "A": ["192.0.2.3"]}}
        r = check(None, sender="", helo="mx.example.org", zone=zone)
        self.assertEqual((r.result, r.identity, r.sender, r.domain),
                         ("pass", "helo", "postmaster@mx.example.org", "mx.example.org"))
        self.assertEqual(check(None, sender="", helo="[192.0.2.3]").result, "none")

    def test_ipv4_mapped_client(self):
        r = check("v=spf1 ip4:192.0.2.0/24 -all", ip="::ffff:192.0.2.3")
        self.assertEqual((r.result, r.ip), ("pass", "192.0.2.3"))

    def test_explanation(self):
        zone = {"why.email.example.com": {"TXT": ["%{i} is not one of %{d}'s servers"]}}
        r = check("v=spf1 -all exp=why.%{d}", zone=zone)
        self.assertEqual(r.explanation, "192.0.2.3 is not one of email.example.com's servers")
        # Only for fail, and never from an include.
        r = check("v=spf1 ~all exp=why.%{d}", zone=zone)
        self.assertEqual((r.result, r.explanation), ("softfail", None))
        self.assertNotIn(("why.email.example.com", "TXT"), r.asked)


# --- the twisted.names driver -------------------------------------------------------


class _Never:
    """A resolver whose lookups never answer (and say when they are cancelled)."""

    def __init__(self):
        self.cancelled = 0

    def _lookup(self, name, timeout=None):
        def cancel(d):
            self.cancelled += 1
        return defer.Deferred(cancel)

    lookupText = lookupAddress = lookupIPV6Address = lookupMailExchange = lookupPointer = _lookup


class DriverTests(unittest.TestCase):
    def serve(self, zones, **kwargs):
        self.dns = DNSServer.started(self, zones, **kwargs)
        return self.dns.resolver(timeout=(0.5,))

    async def test_dns_errors(self):
        resolver = self.serve({"ok.example": {"TXT": "v=spf1 a:bad.example -all"}},
                              servfail={"sf.example", "bad.example"}, refused={"ref.example"})
        for domain, problem in (("sf.example", "SERVFAIL"), ("ref.example", "REFUSED"),
                                ("ok.example", "SERVFAIL")):
            r = await evaluate(Check("192.0.2.1", f"a@{domain}", "h.example"), resolver)
            self.assertEqual(r.result, "temperror", r)
            self.assertIn(problem, r.problem)

    async def test_long_record_over_tcp(self):
        """A record too long for a UDP answer: truncated, asked again over TCP."""
        record = ("v=spf1 " + " ".join(f"ip4:198.51.{i}.0/24" for i in range(40))
                  + " ip4:192.0.2.1 -all")
        resolver = self.serve({"long.example": {"TXT": record}})
        r = await evaluate(Check("192.0.2.1", "a@long.example", "h.example"), resolver)
        self.assertEqual(r.result, "pass")
        self.assertIn(("long.example", "TXT", "tcp"), self.dns.queries)

    async def test_cname_chain_followed(self):
        """A server that answers only the CNAME: its target is asked for."""
        resolver = self.serve({
            "alias.example": {"CNAME": "real.example"},
            "real.example": {"TXT": "v=spf1 a:host.example -all"},
            "host.example": {"CNAME": "addr.example"},
            "addr.example": {"A": "192.0.2.1"},
            "loop.example": {"CNAME": "loop.example"},
        }, chase_cnames=False)
        r = await evaluate(Check("192.0.2.1", "a@alias.example", "h.example"), resolver)
        self.assertEqual(r.result, "pass")
        r = await evaluate(Check("192.0.2.1", "a@loop.example", "h.example"), resolver)
        self.assertEqual(r.result, "none")

    def test_time_limit(self):
        """A check that takes too long is a temperror; its lookups are cancelled."""
        clock, never = task.Clock(), _Never()
        d = evaluate(Check("192.0.2.1", "a@slow.example", "h.example"), never, clock,
                     time_limit=20)
        clock.advance(19)
        self.assertNoResult(d)
        clock.advance(1)
        r = self.successResultOf(d)
        self.assertEqual(r.result, "temperror")
        self.assertIn("no result within 20 s", r.problem)
        self.assertEqual(never.cancelled, 1)


# --- the plugin ------------------------------------------------------------------


def context(tmp: str):
    """A plugin context whose configuration has what the plugin reads of it."""
    from twisted.internet import reactor
    config = SimpleNamespace(hostname=HOST, relay=SimpleNamespace(
        networks=(ipaddress.ip_network("192.0.2.0/24"),)))
    return PluginContext(folder=tmp, state_folder=tmp, shared=SharedState(), where="test",
                         config=config, reactor=reactor)


STRANGER = Session(id="s1", client_ip="203.0.113.5", helo="client.example.net")
ZONES = {
    "deny.example": {"TXT": "v=spf1 -all"},
    "explained.example": {"TXT": "v=spf1 -all exp=why.explained.example"},
    "why.explained.example": {"TXT": "%{i} may not send for %{d} (see https://why.example/)"},
    "soft.example": {"TXT": "v=spf1 ~all"},
    "ok.example": {"TXT": "v=spf1 ip4:203.0.113.0/24 ip6:2001:db8::/32 -all"},
    "broken.example": {"TXT": "v=spf1 ip4:203.0.113.0/33"},
    "client.example.net": {"TXT": "v=spf1 a -all", "A": "203.0.113.5"},
}


def env(sender: str | None) -> Envelope:
    if sender is None:
        return Envelope(sender=None)
    local, _, domain = sender.partition("@")
    return Envelope(sender=Address(local, domain))


BOB = Address("bob", "example.test")


class PluginTests(unittest.TestCase):
    def setUp(self):
        self.dns = DNSServer.started(self, ZONES, servfail={"servfail.example"})

    def plugin(self, **options) -> SPF:
        plugin = SPF(context=context(self.mktemp()), **options)
        plugin.resolver = self.dns.resolver(timeout=(0.5,))
        return plugin

    async def transaction(self, plugin, sender, session=STRANGER, headers=()):
        """MAIL, RCPT, and (if RCPT passed) DATA: the verdicts of rcpt and data."""
        envelope = env(sender)
        self.assertIsNone(plugin.mail(session, envelope))
        rcpt = await defer.maybeDeferred(plugin.rcpt, session, envelope, BOB)
        if rcpt is not None:
            return rcpt, None
        message = Message(size=10, headers=tuple(headers))
        data = await defer.maybeDeferred(plugin.data, session, envelope.evolve(recipients=(BOB,)),
                                         message)
        return rcpt, data

    def test_options(self):
        tmp = self.mktemp()
        with self.assertRaisesRegex(TypeError, "unknown option 'fial'"):
            SPF(context=context(tmp), fial="reject")
        with self.assertRaisesRegex(ValueError, "fail: expected one of reject, tempfail, tag"):
            SPF(context=context(tmp), fail="bounce")
        with self.assertRaisesRegex(ValueError, "pass: expected one of tag"):
            SPF(context=context(tmp), **{"pass": "reject"})
        with self.assertRaisesRegex(ValueError, r"allow\[2\]: not a network"):
            SPF(context=context(tmp), allow=["192.0.2.0/24", "nonsense"])
        with self.assertRaisesRegex(ValueError, "allow: expected a list"):
            SPF(context=context(tmp), allow="192.0.2.0/24")
        with self.assertRaisesRegex(ValueError, "skip_relay_networks"):
            SPF(context=context(tmp), skip_relay_networks="yes")
        for bad in (0, -1, "20", True, 1000):
            with self.assertRaisesRegex(ValueError, "time_limit"):
                SPF(context=context(tmp), time_limit=bad)
        with self.assertRaisesRegex(ValueError, "authserv_id"):
            SPF()
        plugin = SPF(context=context(tmp), softfail="tempfail", permerror="reject",
                     none="reject", temperror="tag", time_limit=5.5)
        self.assertEqual(plugin.policy, {"pass": "tag", "fail": "reject", "softfail": "tempfail",
                                         "neutral": "tag", "none": "reject",
                                         "temperror": "tag", "permerror": "reject"})
        self.assertEqual((plugin.time_limit, plugin.authserv_id), (5.5, HOST))

    def test_through_the_loader(self):
        """Built from its [[filter]] table by name; a bad option names itself."""
        from twisted_mta import config as configmod
        from twisted_mta.loader import PluginError, build_pipeline

        site = e2e.Site(self.mktemp(), {"smtp": "none"}, tls=False,
                        extra='[[filter]]\nuse = "spf"\nsoftfail = "reject"\n')
        pipeline = build_pipeline(configmod.load(site.config_path), 1)
        [loaded] = pipeline.filters
        self.assertIsInstance(loaded.plugin, SPF)
        self.assertEqual(loaded.hooks(), ["mail", "rcpt", "data"])
        self.assertEqual(loaded.plugin.policy["softfail"], "reject")
        site = e2e.Site(self.mktemp(), {"smtp": "none"}, tls=False,
                        extra='[[filter]]\nuse = "spf"\nfail = "bounce"\n')
        with self.assertRaises(PluginError) as caught:
            build_pipeline(configmod.load(site.config_path), 1)
        self.assertIn("filter[1]", str(caught.exception))
        self.assertIn("fail: expected one of reject, tempfail, tag, got 'bounce'",
                      str(caught.exception))

    async def test_fail_rejected_at_rcpt(self):
        rcpt, _ = await self.transaction(self.plugin(), "alice@deny.example")
        self.assertEqual((rcpt.action, rcpt.enhanced), (Action.REJECT, "5.7.23"))
        self.assertEqual(rcpt.text, "Message rejected due to SPF fail: deny.example does not "
                                    "designate 203.0.113.5 as permitted sender")
        rcpt, _ = await self.transaction(self.plugin(), "alice@explained.example")
        self.assertEqual(rcpt.text, "Message rejected due to SPF fail: explained.example "
                                    "explains: 203.0.113.5 may not send for explained.example "
                                    "(see https://why.example/)")

    async def test_policies(self):
        plugin = self.plugin(softfail="tempfail", permerror="reject", fail="tag")
        rcpt, _ = await self.transaction(plugin, "alice@soft.example")
        self.assertEqual((rcpt.action, rcpt.enhanced), (Action.TEMPFAIL, "4.7.23"))
        self.assertTrue(rcpt.text.startswith("Message deferred due to SPF softfail: "), rcpt.text)
        rcpt, _ = await self.transaction(plugin, "alice@broken.example")
        self.assertEqual((rcpt.action, rcpt.enhanced), (Action.REJECT, "5.7.24"))
        self.assertEqual(rcpt.text, "Message rejected due to SPF permerror: error in the SPF "
                                    "record of broken.example: bad CIDR length /33")
        rcpt, data = await self.transaction(plugin, "alice@deny.example")
        self.assertIsNone(rcpt)
        self.assertIn("spf=fail", data.changes[-1].value)
        # The default: temperror is a tempfail (4.7.24).
        rcpt, _ = await self.transaction(self.plugin(), "alice@servfail.example")
        self.assertEqual((rcpt.action, rcpt.enhanced), (Action.TEMPFAIL, "4.7.24"))
        self.assertEqual(rcpt.text, "Message deferred due to SPF temperror: temporary error "
                                    "looking up the SPF record of servfail.example: DNS error "
                                    "looking up servfail.example TXT: SERVFAIL")
        # none, rejected if the site wants every sender to publish a record.
        rcpt, _ = await self.transaction(self.plugin(none="reject"), "alice@nothing.example")
        self.assertEqual(rcpt.text, "Message rejected due to SPF none: nothing.example "
                                    "publishes no SPF record")

    async def test_tags_at_data(self):
        """A passing message: Received-SPF and Authentication-Results; forged results go."""
        forged = ("Authentication-Results", f"{HOST}; spf=pass smtp.mailfrom=bank.example")
        other = ("Authentication-Results", "elsewhere.example; spf=fail")
        rcpt, data = await self.transaction(self.plugin(), "alice@ok.example",
                                            headers=[forged, other])
        self.assertIsNone(rcpt)
        self.assertEqual(data.action, Action.CONTINUE)
        remove, received, results = data.changes
        self.assertIsInstance(remove, RemoveHeader)
        self.assertTrue(re.search(remove.pattern, forged[1]))
        self.assertFalse(re.search(remove.pattern, other[1]))
        self.assertEqual((received.name, results.name), ("Received-SPF", "Authentication-Results"))
        self.assertEqual(received.value,
                         f"pass ({HOST}: domain of alice@ok.example designates 203.0.113.5 as "
                         f"permitted sender)\r\n\tclient-ip=203.0.113.5; "
                         f'envelope-from="alice@ok.example"; helo=client.example.net; '
                         f'receiver={HOST}; identity=mailfrom; mechanism="ip4:203.0.113.0/24";')
        self.assertEqual(results.value, f"{HOST}; spf=pass smtp.mailfrom=ok.example")

    async def test_ipv6_and_errors_in_fields(self):
        session = Session(id="s6", client_ip="2001:db8::25", helo="client.example.net")
        _, data = await self.transaction(self.plugin(), "alice@ok.example", session)
        self.assertIn('client-ip="2001:db8::25";', data.changes[0].value)
        _, data = await self.transaction(self.plugin(permerror="tag"), "alice@broken.example")
        received, results = data.changes
        self.assertTrue(received.value.startswith(
            f"permerror ({HOST}: permanent error in processing domain of alice@broken.example: "
            f"bad CIDR length /33)"), received.value)
        self.assertIn('problem="bad CIDR length /33";', received.value)
        self.assertEqual(results.value, f"{HOST}; spf=permerror smtp.mailfrom=broken.example")

    async def test_null_sender_checks_helo(self):
        rcpt, data = await self.transaction(self.plugin(), None)
        self.assertIsNone(rcpt)
        received, results = data.changes
        self.assertIn("identity=helo;", received.value)
        self.assertNotIn("envelope-from", received.value)
        self.assertIn("domain of postmaster@client.example.net designates", received.value)
        self.assertEqual(results.value, f"{HOST}; spf=pass smtp.helo=client.example.net")
        liar = Session(id="s2", client_ip="203.0.113.77", helo="client.example.net")
        rcpt, _ = await self.transaction(self.plugin(), None, liar)
        self.assertEqual(rcpt.text, "Message rejected due to SPF fail: client.example.net does "
                                    "not designate 203.0.113.77 as permitted sender")

    async def test_skipped(self):
        """Authenticated users, allowed and relay networks, non-IP clients: not checked."""
        plugin = self.plugin(allow=["198.51.100.0/24"])
        sessions = [
            Session(id="a", client_ip="203.0.113.5", helo="x.example", user="alice"),
            Session(id="b", client_ip="198.51.100.9", helo="x.example"),
            Session(id="c", client_ip="192.0.2.9", helo="x.example"),  # [relay] networks
            Session(id="d", client_ip="::ffff:192.0.2.9", helo="x.example"),
            Session(id="e", client_ip="", helo="x.example"),
        ]
        for session in sessions:
            self.assertEqual(await self.transaction(plugin, "alice@deny.example", session),
                             (None, None), session)
        self.assertEqual(self.dns.queries, [])
        plugin = self.plugin(skip_relay_networks=False)
        rcpt, _ = await self.transaction(plugin, "alice@deny.example", sessions[2])
        self.assertEqual(rcpt.action, Action.REJECT)

    async def test_one_check_per_transaction(self):
        """Started at MAIL, awaited at each RCPT and at DATA: one lookup; a new MAIL, a new one."""
        plugin = self.plugin()
        envelope = env("alice@ok.example")
        plugin.mail(STRANGER, envelope)
        verdicts = [await defer.maybeDeferred(plugin.rcpt, STRANGER, envelope, BOB)
                    for _ in range(3)]
        self.assertEqual(verdicts, [None] * 3)
        data = await plugin.data(STRANGER, envelope, Message(size=1, headers=()))
        self.assertIn("spf=pass", data.changes[-1].value)
        self.assertEqual(self.dns.queries, [("ok.example", "TXT", "udp")])
        envelope = env("alice@deny.example")
        plugin.mail(STRANGER, envelope)
        rcpt = await plugin.rcpt(STRANGER, envelope, BOB)
        self.assertEqual(rcpt.action, Action.REJECT)
        self.assertEqual(len(self.dns.queries), 2)

    async def test_data_without_mail(self):
        """An earlier filter accepted at MAIL and RCPT: the check is made at DATA, and only tags."""
        plugin = self.plugin()
        envelope = env("alice@deny.example").evolve(recipients=(BOB,))
        data = await plugin.data(STRANGER, envelope, Message(size=1, headers=()))
        self.assertEqual(data.action, Action.CONTINUE)
        self.assertIn("spf=fail", data.changes[-1].value)


# --- end to end ------------------------------------------------------------------


# The server owns the reply codes: what it answers for a 5.7.23 refusal at RCPT.
REJECT_CODE = refusal_reply(Verdict.reject("SPF", "5.7.23"), "rcpt").code


def fields_of(stored: bytes) -> list[tuple[str, str]]:
    """The header fields of a stored message, unfolded, in order."""
    from twisted_mta.values import parse_headers
    head = stored.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    return [(n, re.sub(r"\s+", " ", v)) for n, v in parse_headers(head)]


class EndToEndTests(unittest.TestCase):
    """An in-process MTA, [[filter]] use = "spf", its nameserver a loopback DNSServer."""

    BOB = "bob@example.test"
    ZONES = {
        "deny.example": {"TXT": "v=spf1 -all"},
        "ok.example": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"},
        "example.test": {"TXT": "v=spf1 -all"},
    }

    def site(self, listeners: dict, **kwargs) -> e2e.Site:
        self.dns = DNSServer.started(self, self.ZONES)
        return e2e.Site(self.mktemp(), listeners, hostname=HOST,
                        delivery={"nameservers": [self.dns.address]},
                        extra='[[filter]]\nuse = "spf"\nfail = "reject"\n',
                        fixed_ports=False, **kwargs)

    def refused(self, site, sender: str, port: int | None = None):
        """Send from C{sender}; the (code, text) RCPT was refused with."""
        def run():
            try:
                e2e.send(site.host, port or site.port(), sender, [self.BOB],
                         e2e.message("refused@client.example.net", sender=sender))
            except smtplib.SMTPRecipientsRefused as e:
                return e.recipients[self.BOB]
            raise AssertionError(f"{sender}: not refused")
        return e2e.in_thread(run)

    async def test_fail_refused_pass_tagged(self):
        site = self.site({"smtp": "none"}, tls=False)
        e2e.start_in_process(self, site)

        code, text = await self.refused(site, "alice@deny.example")
        self.assertEqual(code, REJECT_CODE, text)
        self.assertEqual(text.decode(), "5.7.23 <bob@example.test>: Message rejected due to SPF "
                                        "fail: deny.example does not designate 127.0.0.1 as "
                                        "permitted sender")

        code, reply = await e2e.in_thread(
            e2e.send, site.host, site.port(), "alice@ok.example", [self.BOB],
            e2e.message("pass@client.example.net", sender="alice@ok.example"))
        self.assertEqual(code, 250, reply)
        [path] = await e2e.wait_for(lambda: site.delivered(self.BOB), "delivery to Maildir")
        fields = fields_of(path.read_bytes())
        names = [n for n, _ in fields]
        self.assertEqual(names.index("Received-SPF"), names.index("Authentication-Results") - 1)
        self.assertLess(names.index("Authentication-Results"), names.index("Received"))
        received_spf = dict(fields)["Received-SPF"]
        self.assertEqual(received_spf,
                         f"pass ({HOST}: domain of alice@ok.example designates 127.0.0.1 as "
                         f"permitted sender) client-ip=127.0.0.1; "
                         f'envelope-from="alice@ok.example"; helo=client.example.net; '
                         f'receiver={HOST}; identity=mailfrom; mechanism="ip4:127.0.0.0/8";')
        self.assertEqual(dict(fields)["Authentication-Results"],
                         f"{HOST}; spf=pass smtp.mailfrom=ok.example")

    async def test_authenticated_session_skipped(self):
        site = self.site({"smtp": "none", "submission": "starttls"})
        text = site.config_path.read_text()
        site.config_path.write_text(
            text.replace('tls = "starttls"\n', 'tls = "starttls"\nauth = "offer"\n')
            + '\n[auth]\nusers = "users"\n')
        from twisted_mta.users import hash_password
        (site.folder / "users").write_text(f"alice@example.test:{hash_password('Passw0rd!')}\n")
        (site.folder / "users").chmod(0o600)
        e2e.start_in_process(self, site)

        # Unauthenticated, example.test's "-all" refuses alice@example.test ...
        code, _ = await self.refused(site, "alice@example.test")
        self.assertEqual(code, REJECT_CODE)
        asked = len(self.dns.queries)

        # ... but her own authenticated session is not checked.
        def submit():
            client = smtplib.SMTP(local_hostname="laptop.example.test", timeout=60)
            client._host = HOST
            try:
                client.connect(site.host, site.port("submission"))
                client.starttls(context=site.client_context())
                client.login("alice@example.test", "Passw0rd!")
                client.sendmail("alice@example.test", [self.BOB],
                                e2e.message("auth@example.test", sender="alice@example.test"))
            finally:
                client.quit()

        await e2e.in_thread(submit)
        [path] = await e2e.wait_for(lambda: site.delivered(self.BOB), "delivery to Maildir")
        names = [n for n, _ in fields_of(path.read_bytes())]
        self.assertNotIn("Received-SPF", names)
        self.assertNotIn("Authentication-Results", names)
        self.assertEqual(len(self.dns.queries), asked)
