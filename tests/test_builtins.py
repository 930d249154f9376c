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


class GreylistMoreTests(Loaded):
    """Pruning while running, the allow list, what a restart keeps."""

    def setUp(self):
        super().setUp()
        self.plugin = self.load("greylist", delay=300, window=3600, lifetime=86400,
                                allow=["198.51.100.0/24", "2001:db8:aa::/48"])

    def rcpt(self, ip="203.0.113.7", sender="s@far.test", rcpt="u@example.test", plugin=None):
        return self.run_hook(plugin or self.plugin, "rcpt", testing.session(client_ip=ip),
                             testing.envelope(sender), testing.address(rcpt))

    def test_expired_pending_triplets_pruned_while_running(self):
        for i in range(50):
            self.rcpt(sender=f"s{i}@far.test")
        store = self.plugin.plugin.store
        self.assertEqual(len(store.entries), 50)
        self.clock.advance(3601)
        self.rcpt(sender="new@far.test")  # any lookup prunes what is due
        self.assertEqual(list(store.entries), ["203.0.113.0/24 new@far.test u@example.test"])

    def test_passed_triplets_live_a_lifetime_from_their_last_message(self):
        store = self.plugin.plugin.store
        self.rcpt()
        self.clock.advance(300)
        self.assertEqual(self.rcpt().action, Action.CONTINUE)
        self.clock.advance(80000)
        self.assertEqual(self.rcpt().action, Action.CONTINUE)  # renews: another lifetime
        self.clock.advance(80000)
        self.rcpt(sender="other@far.test")
        self.assertEqual(len(store.entries), 2)
        self.clock.advance(86401)
        self.rcpt(sender="third@far.test")
        self.assertEqual(len(store.entries), 1)
        self.assertEqual(self.rcpt().action, Action.TEMPFAIL)  # forgotten: greylisted again

    def test_compaction_rewrites_the_log_without_the_dead(self):
        store = self.plugin.plugin.store
        for i in range(5):
            self.rcpt(sender=f"s{i}@far.test")
        self.clock.advance(3601)
        self.rcpt(sender="live@far.test")
        self.assertEqual(len(store.path.read_text().splitlines()), 6)
        store.compact(self.clock.seconds())
        self.assertEqual(len(store.path.read_text().splitlines()), 1)

    def test_allow_list(self):
        self.assertEqual(self.rcpt(ip="198.51.100.77").action, Action.CONTINUE)
        self.assertEqual(self.rcpt(ip="::ffff:198.51.100.77").action, Action.CONTINUE)
        self.assertEqual(self.rcpt(ip="2001:db8:aa:1::5").action, Action.CONTINUE)
        self.assertEqual(self.rcpt(ip="2001:db8:ab::5").action, Action.TEMPFAIL)
        self.assertEqual(self.plugin.plugin.store.entries.keys(),
                         {"2001:db8:ab::/64 s@far.test u@example.test"})

    def test_pending_triplet_keeps_first_seen_across_restart(self):
        self.rcpt()
        self.clock.advance(200)
        self.shared = SharedState()
        restarted = self.load("greylist", delay=300, window=3600, lifetime=86400)
        self.assertEqual(self.rcpt(plugin=restarted).action, Action.TEMPFAIL)
        self.clock.advance(100)
        self.assertEqual(self.rcpt(plugin=restarted).action, Action.CONTINUE)

    def test_torn_last_line_is_ignored(self):
        self.rcpt()
        path = self.plugin.plugin.store.path
        with open(path, "a") as f:
            f.write('["203.0.113.0/24 x@far.test u@exa')
        self.shared = SharedState()
        restarted = self.load("greylist", delay=300, window=3600, lifetime=86400)
        self.assertEqual(len(restarted.plugin.store.entries), 1)

    def test_bad_options_name_the_option(self):
        for options, where in (({"allow": ["nonsense"]}, "allow[1]"),
                               ({"allow": "10.0.0.0/8"}, "allow"),
                               ({"delay": 600, "window": 300}, "window"),
                               ({"delay": -1}, "delay"),
                               ({"lifetime": "a month"}, "lifetime")):
            with self.assertRaises(PluginError) as e:
                self.load("greylist", **options)
            self.assertIn(f"{where}:", str(e.exception))


class RateLimitMoreTests(Loaded):
    def test_default_windows(self):
        plugin = self.load("ratelimit", rules=[
            {"key": "ip", "count": "connections", "limit": 1},
            {"key": "sender", "count": "messages", "limit": 1}])
        self.assertEqual([r.window for r in plugin.plugin.rules], [60.0, 3600.0])

    def test_recipients_per_hour_per_domain_slide(self):
        plugin = self.load("ratelimit", rules=[
            {"key": "recipient_domain", "count": "recipients", "limit": 10}])
        env = testing.envelope("a@far.test")

        def rcpt(i, domain="big.test"):
            return self.run_hook(plugin, "rcpt", testing.session(client_ip=f"203.0.113.{i}"), env,
                                 testing.address(f"r{i}@{domain}"))

        self.assertEqual([rcpt(i).action for i in range(11)],
                         [Action.CONTINUE] * 10 + [Action.TEMPFAIL])
        refused = rcpt(11)
        self.assertEqual(refused.enhanced, "4.7.1")
        self.assertIn("too many recipients to big.test", refused.text)
        self.assertEqual(rcpt(12, "small.test").action, Action.CONTINUE)
        self.clock.advance(3600 - self.clock.seconds() % 3600)  # the next window starts
        self.assertEqual(rcpt(13).action, Action.TEMPFAIL)  # the last hour still counts fully
        self.clock.advance(1800)  # half of it has slid out: 10 * 0.5 + 1 <= 10
        self.assertEqual([rcpt(i).action for i in range(14, 20)],
                         [Action.CONTINUE] * 5 + [Action.TEMPFAIL])

    def test_sender_and_domain_limits_apply_to_authenticated_users_ip_ones_do_not(self):
        plugin = self.load("ratelimit", rules=[
            {"key": "ip", "count": "messages", "limit": 1},
            {"key": "sender", "count": "messages", "limit": 2}])
        session = testing.session(user="ann")
        env = testing.envelope("ann@example.test")
        actions = [self.run_hook(plugin, "mail", session, env).action for _ in range(3)]
        self.assertEqual(actions, [Action.CONTINUE, Action.CONTINUE, Action.TEMPFAIL])

    def test_rules_sharing_a_counter_count_once(self):
        plugin = self.load("ratelimit", rules=[
            {"key": "ip", "count": "messages", "limit": 3},
            {"key": "ip", "count": "messages", "limit": 5}])
        env = testing.envelope("a@far.test")
        actions = [self.run_hook(plugin, "mail", testing.session(), env).action for _ in range(4)]
        self.assertEqual(actions, [Action.CONTINUE] * 3 + [Action.TEMPFAIL])

    def test_refused_attempts_are_not_counted(self):
        plugin = self.load("ratelimit", rules=[
            {"key": "ip", "count": "messages", "limit": 2, "window": 100}])
        env = testing.envelope("a@far.test")
        for _ in range(10):
            self.run_hook(plugin, "mail", testing.session(), env)
        self.clock.advance(100 - self.clock.seconds() % 100 + 50)  # next window, half slid
        # 2 counted in the last window (not 10): 2 * 0.5 + 1 <= 2
        self.assertEqual(self.run_hook(plugin, "mail", testing.session(), env).action,
                         Action.CONTINUE)

    def test_connection_refusal(self):
        plugin = self.load("ratelimit", rules=[{"key": "ip", "count": "connections", "limit": 1}])
        self.run_hook(plugin, "connect", testing.session(client_ip="203.0.113.7"))
        verdict = self.run_hook(plugin, "connect", testing.session(client_ip="203.0.113.7"))
        self.assertEqual((verdict.action, verdict.enhanced), (Action.TEMPFAIL, "4.7.0"))

    def test_bad_limit_and_window(self):
        for rule, where in (({"key": "ip", "count": "messages", "limit": 1.5}, "rules[1].limit"),
                            ({"key": "ip", "count": "messages", "limit": 1, "window": "1h"},
                             "rules[1].window"),
                            ({"key": "ip", "count": "messages", "limit": 1, "per": 3},
                             "rules[1].per"),
                            ({"key": "recipient_domain", "count": "messages", "limit": 1},
                             "rules[1]: messages are counted at MAIL")):
            with self.assertRaises(PluginError) as e:
                self.load("ratelimit", rules=[rule])
            self.assertIn(where, str(e.exception))


class RecipientsMoreTests(Loaded):
    def rcpt(self, plugin, address):
        return self.run_hook(plugin, "rcpt", testing.session(), testing.envelope(),
                             testing.address(address))

    def targets(self, verdict):
        [change] = verdict.changes
        return [str(a) for a in change.new]

    def test_alias_to_itself_and_others(self):
        plugin = self.load("recipients", addresses=[
            "ann@example.test -> ann@example.test, archive@example.test",
            "archive@example.test"])
        self.assertEqual(self.targets(self.rcpt(plugin, "ann@example.test")),
                         ["ann@example.test", "archive@example.test"])

    def test_loop_ends(self):
        plugin = self.load("recipients", addresses=[
            "a@example.test -> b@example.test", "b@example.test -> a@example.test, c@far.test"])
        self.assertEqual(self.targets(self.rcpt(plugin, "a@example.test")),
                         ["a@example.test", "c@far.test"])

    def test_aliases_in_unchecked_domains_expand_too(self):
        plugin = self.load("recipients", domains=["example.test"], addresses=[
            "ann@example.test", "info@relayed.test -> ann@example.test, x@far.test"])
        self.assertEqual(self.targets(self.rcpt(plugin, "Info@Relayed.test")),
                         ["ann@example.test", "x@far.test"])
        self.assertEqual(self.rcpt(plugin, "other@relayed.test").action, Action.CONTINUE)

    def test_unknown_alias_target_is_logged(self):
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.load("recipients", addresses=["sales@example.test -> nobody@example.test"])
        self.assertTrue(any("nobody@example.test" in str(e.get("target")) for e in events))

    def test_bad_options(self):
        for options, where in (({"addresses": "ann@example.test"}, "addresses"),
                               ({"addresses": [1]}, "addresses[1]"),
                               ({"addresses": ["x -> "]}, "addresses[1]"),
                               ({"domains": "example.test"}, "domains"),
                               ({"file": ""}, "file")):
            with self.assertRaises(PluginError) as e:
                self.load("recipients", **options)
            self.assertIn(f"{where}:", str(e.exception))


class HeadersMoreTests(Loaded):
    OWN = (b"Received: from pc.internal (unknown [10.1.2.3])\r\n"
           b"\tby mx.example.test (twisted-mta) id X\r\n")
    CLIENT = (b"Received: from laptop by pc.internal\r\nSubject: Re: [EXTERNAL] [EXTERNAL] hi\r\n"
              b"X-Mailer: Foo 1.0\r\nX-Mailer: Foo 1.0\r\n\r\nbody\r\n")

    def message(self):
        """As the server hands it over: its own Received first, in the file and the headers."""
        return testing.message(self.OWN + self.CLIENT, self.folder)

    def changes(self, rules, user="ann"):
        plugin = self.load("headers", rules=rules)
        verdict = self.run_hook(plugin, "data", testing.session(user=user), testing.envelope(),
                                self.message())
        return verdict.changes

    def test_remove_sees_this_servers_own_received(self):
        changes = self.changes([{"action": "remove", "name": "Received", "match": r"10\.1\.2\.3",
                                 "direction": "outbound"}])
        self.assertEqual(changes, (RemoveHeader("Received", r"10\.1\.2\.3"),))

    def test_rewrite(self):
        changes = self.changes([{"action": "rewrite", "name": "subject",
                                 "match": r"\[EXTERNAL\] ", "value": ""},
                                {"action": "rewrite", "name": "X-Mailer", "match": r"Foo (\d)",
                                 "value": r"Bar \1"}])
        self.assertEqual(changes, (
            RemoveHeader("subject", r"^Re:\ \[EXTERNAL\]\ \[EXTERNAL\]\ hi$"),
            AddHeader("subject", "Re: hi"),
            RemoveHeader("X-Mailer", r"^Foo\ 1\.0$"),
            AddHeader("X-Mailer", "Bar 1.0"), AddHeader("X-Mailer", "Bar 1.0"),
        ))

    def test_rewrite_that_changes_nothing_is_no_change(self):
        verdict_changes = self.changes([{"action": "rewrite", "name": "Subject",
                                         "match": "nothing here", "value": "x"}])
        self.assertEqual(verdict_changes, ())

    def test_direction(self):
        rules = [{"direction": "outbound", "action": "remove", "name": "Received"}]
        self.assertEqual(self.changes(rules, user="ann"), (RemoveHeader("Received", None),))
        # 192.0.2.1 is in the [relay] networks: outbound without AUTH too
        self.assertEqual(self.changes(rules, user=None), (RemoveHeader("Received", None),))
        plugin = self.load("headers", rules=rules)
        verdict = self.run_hook(plugin, "data", testing.session(client_ip="203.0.113.5"),
                                testing.envelope(), self.message())
        self.assertEqual(verdict.changes, ())

    def test_bad_options(self):
        for rule, where in (({"action": "rewrite", "name": "X", "match": "(a)", "value": r"\2"},
                             "rules[1].value"),
                            ({"action": "remove", "name": "X", "value": "y"}, "rules[1].value"),
                            ({"action": "add", "name": "X", "value": "a\r\nBcc: x"},
                             "rules[1].value"),
                            ({"action": "add", "name": "X:", "value": "v"}, "rules[1].name"),
                            ({"action": "add", "name": "X", "value": "v", "direction": "up"},
                             "rules[1].direction")):
            with self.assertRaises(PluginError) as e:
                self.load("headers", rules=[rule])
            self.assertIn(where, str(e.exception))
        with self.assertRaises(PluginError) as e:
            self.load("headers", networks=["10.0.0.0/33"])
        self.assertIn("networks[1]", str(e.exception))


class SizeMoreTests(Loaded):
    def test_user_limit_overrides_the_sender_domain(self):
        plugin = self.load("size", senders={"example.test": 1000}, users={"scanner": 5000,
                                                                           "intern": 100})
        env = testing.envelope("scans@example.test", size=4000)
        self.assertEqual(self.run_hook(plugin, "mail", testing.session(user="Scanner"), env).action,
                         Action.CONTINUE)
        self.assertEqual(self.run_hook(plugin, "mail", testing.session(), env).action,
                         Action.REJECT)
        small = env.evolve(size=500)
        self.assertEqual(self.run_hook(plugin, "mail", testing.session(user="intern"),
                                       small).action, Action.REJECT)

    def test_without_declared_size_refused_at_data(self):
        plugin = self.load("size", recipients={"small.test": 500})
        env = testing.envelope("a@far.test", ["x@big.test"])
        self.assertEqual(self.run_hook(plugin, "rcpt", testing.session(), env,
                                       testing.address("x@small.test")).action, Action.CONTINUE)
        big = testing.message(b"Subject: x\r\n\r\n" + b"x" * 600 + b"\r\n", self.folder)
        self.assertEqual(self.run_hook(plugin, "data", testing.session(), env, big).action,
                         Action.CONTINUE)  # no recipient in small.test
        env = env.evolve(recipients=env.recipients + (testing.address("y@Small.Test"),))
        verdict = self.run_hook(plugin, "data", testing.session(), env, big)
        self.assertEqual((verdict.action, verdict.enhanced), (Action.REJECT, "5.3.4"))

    def test_bad_domain(self):
        with self.assertRaises(PluginError) as e:
            self.load("size", recipients={"not a domain": 5})
        self.assertIn("recipients.not a domain", str(e.exception))


class GreylistRetimeTests(Loaded):
    def test_reload_with_a_longer_window_keeps_pruning_right(self):
        first = self.load("greylist", delay=300, window=3600, lifetime=86400)
        self.run_hook(first, "rcpt", testing.session(client_ip="203.0.113.7"),
                      testing.envelope("s@far.test"), testing.address("u@example.test"))
        reloaded = self.load("greylist", delay=300, window=7200, lifetime=86400)
        store = reloaded.plugin.store
        self.assertIs(store, first.plugin.store)
        self.clock.advance(3601)  # past the old window, within the new one
        self.assertEqual(store.prune(self.clock.seconds()), 0)
        verdict = self.run_hook(reloaded, "rcpt", testing.session(client_ip="203.0.113.7"),
                                testing.envelope("s@far.test"), testing.address("u@example.test"))
        self.assertEqual(verdict.action, Action.CONTINUE)
        self.clock.advance(86401)
        self.assertEqual(store.prune(self.clock.seconds()), 1)
        self.assertEqual(store.entries, {})
