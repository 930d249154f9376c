"""
The built-in policy plugins that need no DNS: recipients, size, headers,
greylist, ratelimit.  Hook-level tests through twisted_mta.testing with a
fake clock; end-to-end ones are in test_e2e_builtins.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.support import make_config
from twisted_mta import loader, testing
from twisted_mta.config import PluginConfig
from twisted_mta.loader import PluginError
from twisted_mta.values import Action, AddHeader, RemoveHeader, RewriteRecipient, SharedState


class Loaded(unittest.SynchronousTestCase):
    """Loads built-ins as the server does, with a context over a temp spool and a Clock."""

    def setUp(self):
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.shared = SharedState()
        self.config = make_config(self.folder)

    def load(self, use, **options):
        build = loader._Build(1, self.shared, self.clock)
        return loader.load(self.config, PluginConfig(use, options, "filter[1]"), build)

    def run_hook(self, plugin, stage, *args):
        return testing.run(plugin, stage, *args, reactor=self.clock)


class RecipientsTests(Loaded):
    def setUp(self):
        super().setUp()
        (self.folder / "recipients").write_text(
            "ann@example.test\n# comment\n\nsales@example.test -> ann@example.test, bob@other.test\n"
            "team@example.test -> sales@example.test, carl@example.test\n")
        self.plugin = self.load("recipients", file="recipients", addresses=["*@catchall.example.test"],
                                domains=["example.test", "catchall.example.test"])

    def rcpt(self, address):
        return self.run_hook(self.plugin, "rcpt", testing.session(), testing.envelope(),
                             testing.address(address))

    def test_known_unknown_and_other_domains(self):
        self.assertEqual(self.rcpt("Ann@Example.test").action, Action.CONTINUE)
        unknown = self.rcpt("nobody@example.test")
        self.assertEqual((unknown.action, unknown.enhanced), (Action.REJECT, "5.1.1"))
        self.assertIn("User unknown", unknown.text)
        self.assertEqual(self.rcpt("anyone@catchall.example.test").action, Action.CONTINUE)
        self.assertEqual(self.rcpt("x@elsewhere.test").action, Action.CONTINUE)

    def test_aliases_expand_recursively(self):
        verdict = self.rcpt("team@example.test")
        [change] = verdict.changes
        self.assertIsInstance(change, RewriteRecipient)
        self.assertEqual([str(a) for a in change.new],
                         ["ann@example.test", "bob@other.test", "carl@example.test"])

    def test_default_domains_are_the_local_ones(self):
        plugin = self.load("recipients", addresses=["ann@example.test"])
        self.assertEqual(plugin.plugin.domains, frozenset({"example.test"}))

    def test_bad_line_names_file_and_line(self):
        (self.folder / "bad").write_text("ann@example.test\nnot an address\n")
        with self.assertRaises(PluginError) as e:
            self.load("recipients", file="bad")
        self.assertIn(f"{self.folder / 'bad'}:2", str(e.exception))

    def test_missing_file(self):
        with self.assertRaises(PluginError) as e:
            self.load("recipients", file="nope")
        self.assertIn("cannot read", str(e.exception))


class SizeTests(Loaded):
    def setUp(self):
        super().setUp()
        self.plugin = self.load("size", senders={"example.test": 1000},
                                recipients={"small.test": 500}, users={"scanner": 5000})

    def test_declared_size_at_mail(self):
        env = testing.envelope("a@example.test", size=1001)
        verdict = self.run_hook(self.plugin, "mail", testing.session(), env)
        self.assertEqual((verdict.action, verdict.enhanced), (Action.REJECT, "5.3.4"))
        ok = self.run_hook(self.plugin, "mail", testing.session(), env.evolve(size=1000))
        self.assertEqual(ok.action, Action.CONTINUE)

    def test_user_limit_is_the_smaller(self):
        env = testing.envelope("a@other.test", size=4000)
        verdict = self.run_hook(self.plugin, "mail", testing.session(user="scanner"), env)
        self.assertEqual(verdict.action, Action.CONTINUE)

    def test_recipient_domain_at_rcpt_and_data(self):
        env = testing.envelope("a@other.test", [], size=600)
        verdict = self.run_hook(self.plugin, "rcpt", testing.session(), env, testing.address("x@small.test"))
        self.assertEqual(verdict.enhanced, "5.3.4")
        env = testing.envelope("a@other.test", ["x@small.test"])
        big = testing.message(b"Subject: x\r\n\r\n" + b"x" * 600 + b"\r\n", self.folder)
        verdict = self.run_hook(self.plugin, "data", testing.session(), env, big)
        self.assertEqual((verdict.action, verdict.enhanced), (Action.REJECT, "5.3.4"))

    def test_bad_option(self):
        with self.assertRaises(PluginError):
            self.load("size", senders={"example.test": "big"})


class HeadersTests(Loaded):
    MESSAGE = (b"Received: from pc by relay.internal.example.test\r\n"
               b"Received: from x by mx.example.test\r\nSubject: [EXTERNAL] hello\r\n\r\nbody\r\n")

    def setUp(self):
        super().setUp()
        self.plugin = self.load("headers", rules=[
            {"direction": "outbound", "action": "remove", "name": "Received",
             "match": r"by [^ ]+\.internal\.example\.test"},
            {"action": "replace", "name": "Subject", "match": r"^\[EXTERNAL\] ", "value": ""},
            {"direction": "inbound", "action": "add", "name": "X-Origin", "value": "internet"},
        ])

    def changes(self, session):
        return self.run_hook(self.plugin, "data", session, testing.envelope(),
                             testing.message(self.MESSAGE, self.folder)).changes

    def test_outbound(self):
        self.assertEqual(self.changes(testing.session(user="ann")), (
            RemoveHeader("Received", r"by [^ ]+\.internal\.example\.test"),
            RemoveHeader("Subject", r"^\[EXTERNAL\]\ hello$"),
            AddHeader("Subject", "hello"),
        ))

    def test_inbound(self):
        changes = self.changes(testing.session(client_ip="203.0.113.9"))
        self.assertEqual(changes[-1], AddHeader("X-Origin", "internet"))
        self.assertNotIn("Received", [c.name for c in changes])

    def test_bad_rules(self):
        for rule in ({"action": "explode", "name": "X"}, {"action": "add", "name": "X"},
                     {"action": "remove", "name": "X", "match": "("},
                     {"action": "remove", "name": "X", "colour": "red"}):
            with self.assertRaises(PluginError):
                self.load("headers", rules=[rule])


class GreylistTests(Loaded):
    def setUp(self):
        super().setUp()
        self.plugin = self.load("greylist", delay=300, window=3600, lifetime=86400)

    def rcpt(self, ip="203.0.113.7", sender="s@far.test", rcpt="u@example.test", user=None):
        return self.run_hook(self.plugin, "rcpt", testing.session(client_ip=ip, user=user),
                             testing.envelope(sender), testing.address(rcpt))

    def test_first_tempfails_then_passes_after_delay(self):
        first = self.rcpt()
        self.assertEqual((first.action, first.enhanced), (Action.TEMPFAIL, "4.7.1"))
        self.clock.advance(299)
        self.assertEqual(self.rcpt().action, Action.TEMPFAIL)
        self.clock.advance(1)
        self.assertEqual(self.rcpt().action, Action.CONTINUE)
        self.clock.advance(80000)  # known now: no delay, same /24
        self.assertEqual(self.rcpt(ip="203.0.113.200").action, Action.CONTINUE)

    def test_retry_after_window_starts_over(self):
        self.rcpt()
        self.clock.advance(3601)
        self.assertEqual(self.rcpt().action, Action.TEMPFAIL)

    def test_ipv6_by_64(self):
        self.rcpt(ip="2001:db8:1:2::1")
        self.clock.advance(300)
        self.assertEqual(self.rcpt(ip="2001:db8:1:2:ffff::9").action, Action.CONTINUE)
        self.assertEqual(self.rcpt(ip="2001:db8:1:3::1").action, Action.TEMPFAIL)

    def test_skipped_for_authenticated_and_relay_networks(self):
        self.assertEqual(self.rcpt(user="ann").action, Action.CONTINUE)
        self.assertEqual(self.rcpt(ip="192.0.2.9").action, Action.CONTINUE)  # [relay] networks

    def test_state_survives_reload_and_restart(self):
        self.rcpt()
        self.clock.advance(300)
        reloaded = self.load("greylist", delay=300, window=3600, lifetime=86400)
        self.assertIs(reloaded.plugin.store, self.plugin.plugin.store)
        self.shared = SharedState()  # a restart: nothing in memory
        restarted = self.load("greylist", delay=300, window=3600, lifetime=86400)
        self.assertIsNot(restarted.plugin.store, self.plugin.plugin.store)
        verdict = self.run_hook(restarted, "rcpt", testing.session(client_ip="203.0.113.7"),
                                testing.envelope("s@far.test"), testing.address("u@example.test"))
        self.assertEqual(verdict.action, Action.CONTINUE)

    def test_expired_entries_pruned_at_load(self):
        for i in range(10):
            self.rcpt(sender=f"s{i}@far.test")
        self.clock.advance(4000)
        self.shared = SharedState()
        restarted = self.load("greylist", delay=300, window=3600, lifetime=86400)
        self.assertEqual(restarted.plugin.store.entries, {})


class RateLimitTests(Loaded):
    def setUp(self):
        super().setUp()
        self.plugin = self.load("ratelimit", rules=[
            {"key": "ip", "count": "connections", "limit": 3, "window": 60},
            {"key": "sender", "count": "messages", "limit": 2, "window": 3600},
            {"key": "user", "count": "recipients", "limit": 5, "window": 3600},
            {"key": "recipient_domain", "count": "recipients", "limit": 4, "window": 3600},
        ])

    def connect(self, ip="203.0.113.7"):
        return self.run_hook(self.plugin, "connect", testing.session(client_ip=ip)).action

    def test_connections_per_ip_sliding(self):
        self.assertEqual([self.connect() for _ in range(4)],
                         [Action.CONTINUE] * 3 + [Action.TEMPFAIL])
        self.assertEqual(self.connect("203.0.113.8"), Action.CONTINUE)
        self.clock.advance(60)  # next window: the previous one still weighs fully
        self.assertEqual(self.connect(), Action.TEMPFAIL)
        self.clock.advance(30)  # half of it has slid out: 3 * 0.5 + 1 <= 3
        self.assertEqual(self.connect(), Action.CONTINUE)
        self.clock.advance(120)
        self.assertEqual(self.connect(), Action.CONTINUE)

    def test_messages_per_sender(self):
        env = testing.envelope("bulk@far.test")
        actions = [self.run_hook(self.plugin, "mail", testing.session(), env).action for _ in range(3)]
        self.assertEqual(actions, [Action.CONTINUE, Action.CONTINUE, Action.TEMPFAIL])
        verdict = self.run_hook(self.plugin, "mail", testing.session(), env)
        self.assertEqual(verdict.enhanced, "4.7.1")

    def test_recipients_per_user_and_domain(self):
        session = testing.session(user="ann")
        env = testing.envelope("ann@example.test")
        actions = [self.run_hook(self.plugin, "rcpt", session, env, testing.address(f"r{i}@d{i}.test")).action
                   for i in range(6)]
        self.assertEqual(actions, [Action.CONTINUE] * 5 + [Action.TEMPFAIL])
        anon = testing.session(client_ip="203.0.113.1")
        actions = [self.run_hook(self.plugin, "rcpt", anon, env, testing.address(f"r{i}@same.test")).action
                   for i in range(5)]
        self.assertEqual(actions, [Action.CONTINUE] * 4 + [Action.TEMPFAIL])

    def test_counters_survive_reload(self):
        for _ in range(3):
            self.connect()
        reloaded = self.load("ratelimit", rules=[{"key": "ip", "count": "connections", "limit": 3, "window": 60}])
        verdict = self.run_hook(reloaded, "connect", testing.session(client_ip="203.0.113.7"))
        self.assertEqual(verdict.action, Action.TEMPFAIL)

    def test_bad_rules(self):
        for rule in ({"key": "sender", "count": "connections", "limit": 1},
                     {"key": "ip", "count": "messages", "limit": 0},
                     {"key": "planet", "count": "messages", "limit": 1}):
            with self.assertRaises(PluginError):
                self.load("ratelimit", rules=[rule])
