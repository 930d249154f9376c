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

import json
import re
import smtplib
from pathlib import Path

from twisted.internet import defer, task
from twisted.names import dns
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.dns_support import DNSServer
from twisted_mta.builtins import spf_eval
from twisted_mta.builtins.spf import SPF, evaluate
from twisted_mta.builtins.spf_eval import Answer, Check, Query
from twisted_mta.smtp.grammar import Address
from twisted_mta.values import (
    Action, AddHeader, Envelope, Message, PluginContext, RemoveHeader, Session, SharedState,
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
