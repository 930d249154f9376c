"""
The delivery manager, with a fake clock, an inline spool and fake agents.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from tests.support import make_config
from twisted_mta import loader
from twisted_mta.delivery.agent import Outcome
from twisted_mta.delivery.manager import DeliveryManager, Limiter
from twisted_mta.interfaces import IDeliveryObserver
from twisted_mta.pipeline import LoadedPlugin
from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.spool.store import Spool

ROUTES = [
    {"domains": ["example.test"], "via": "maildir", "path": "mail"},
    {"domains": ["void.test"], "via": "discard"},
    {"domains": ["*"], "via": "mx"},
]


class FakeAgent:
    """Answers each recipient with the status in `script` (by address), default delivered."""

    def __init__(self, script=None, hold=False):
        self.script = script or {}
        self.calls = []
        self.pending: list[defer.Deferred] = []
        self.hold = hold

    def deliver(self, entry, route, recipients):
        self.calls.append((entry.id, route, [r.address for r in recipients]))
        outcomes = [Outcome(r.address, *self.script.get(r.address, ("delivered", "250 2.0.0 ok")))
                    for r in recipients]
        if self.hold:
            d = defer.Deferred()
            self.pending.append(d)
            return d.addCallback(lambda _: outcomes)
        return defer.succeed(outcomes)


class FakeBouncer:
    def __init__(self, spool):
        self.spool = spool
        self.bounced, self.delayed = [], []

    def bounce(self, entry, failed):
        # The original must still be in the spool when the DSN is made.
        assert self.spool.message_path(entry.id).exists()
        self.bounced.append((entry.id, [r.address for r in failed]))
        return defer.succeed(None)

    def delay(self, entry, deferred):
        self.delayed.append((entry.id, [r.address for r in deferred]))
        return defer.succeed(None)


class ManagerTests(unittest.SynchronousTestCase):
    def setUp(self, **delivery):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.config = make_config(self.folder, route=ROUTES, delivery=delivery)
        self.pipeline = loader.build_pipeline(self.config, 1, reactor=self.clock)
        self.spool = Spool(self.folder / "spool", self.clock, inline=True)
        self.spool.prepare()
        self.maildir, self.mx = FakeAgent(), FakeAgent()
        self.bouncer = FakeBouncer(self.spool)
        self.observed = []
        self.manager = DeliveryManager(
            self.spool, lambda: self.pipeline, lambda: self.config,
            {"maildir": self.maildir, "mx": self.mx}, self.clock, self.bouncer,
            observers=lambda: self.observers())
        self.manager.startService()

    def observers(self):
        @implementer(IDeliveryObserver)
        class Observer:
            def delivered(o, qid, rcpt, route, reply):
                self.observed.append(("delivered", str(rcpt)))

            def deferred(o, qid, rcpt, route, reply, next_try):
                self.observed.append(("deferred", str(rcpt)))

            def bounced(o, qid, rcpt, route, reply):
                self.observed.append(("bounced", str(rcpt)))
        return (LoadedPlugin("observer", Observer()),)

    def queue(self, *recipients, sender="s@example.test", **kw) -> QueueEntry:
        incoming = self.spool.new_message()
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        entry = QueueEntry(id=incoming.id, sender=sender,
                           recipients=[RecipientState(r) for r in recipients],
                           arrival=self.clock.seconds(), size=incoming.size, **kw)
        self.successResultOf(self.spool.commit(incoming, entry))
        self.manager.enqueue(entry)
        return entry

    def states(self, entry):
        return [(r.address, r.state, r.attempts) for r in entry.recipients]

    def test_delivered_message_leaves_the_spool(self):
        entry = self.queue("a@example.test", "b@void.test")
        self.clock.advance(0)
        self.assertEqual(self.maildir.calls[0][2], ["a@example.test"])
        self.assertNotIn(entry.id, self.manager.entries)
        self.assertFalse(self.spool.message_path(entry.id).exists())
        self.assertEqual(sorted(self.observed), [("delivered", "a@example.test"), ("delivered", "b@void.test")])

    def spy_saves(self):
        """Record each save as (queue id, sync) and each removal as (queue id, 'remove')."""
        calls = []
        save, remove = self.spool.save, self.spool.remove

        def spy_save(entry, sync=True):
            calls.append((entry.id, sync))
            return save(entry, sync=sync)

        def spy_remove(queue_id):
            calls.append((queue_id, "remove"))
            return remove(queue_id)
        self.spool.save, self.spool.remove = spy_save, spy_remove
        return calls

    def test_delivered_message_is_removed_without_a_save(self):
        calls = self.spy_saves()
        entry = self.queue("a@example.test", "b@void.test")
        self.clock.advance(0)
        self.assertEqual(calls, [(entry.id, "remove")])

    def test_deferral_alone_is_saved_without_a_sync(self):
        calls = self.spy_saves()
        self.mx.script["b@far.test"] = ("deferred", "451 4.3.0 later")
        entry = self.queue("b@far.test")
        self.clock.advance(0)
        self.assertEqual(calls, [(entry.id, False)])
        self.assertEqual(self.spool.load(entry.id).recipients[0].attempts, 1)

    def test_final_recipient_hold_or_delay_dsn_is_saved_with_a_sync(self):
        calls = self.spy_saves()
        self.mx.script["b@far.test"] = ("deferred", "451 4.3.0 later")
        partly = self.queue("a@example.test", "b@far.test")
        self.clock.advance(0)
        self.assertEqual(calls, [(partly.id, True)])  # a@ is delivered: not to be repeated
        self.clock.advance(300)  # b@ deferred again; a@ stays delivered
        self.assertEqual(calls[-1], (partly.id, True))
        self.successResultOf(self.manager.hold(partly.id))
        self.assertEqual(calls[-1], (partly.id, True))
        del calls[:]
        self.config = make_config(self.folder, route=ROUTES, delivery={"delay_warning": 100})
        warned = self.queue("b@far.test")
        self.clock.advance(0)
        self.assertEqual(calls, [(warned.id, False)])
        self.clock.advance(300)  # the delay DSN goes out: not to be sent twice
        self.assertEqual(self.bouncer.delayed, [(warned.id, ["b@far.test"])])
        self.assertEqual(calls[-1], (warned.id, True))

    def test_a_delivery_that_breaks_is_logged(self):
        # An attempt with one next hop awaits its delivery directly: if
        # that raises (a bug: agents never fail), it is logged, and the
        # recipient is deferred (not left due, which retried it at once,
        # in a loop), as for a failed group of several.
        real, broke = self.manager._deliver_group, []

        async def broken_once(entry, nexthop, route, rcpts):
            if not broke:
                broke.append(entry.id)
                raise RuntimeError("bug")
            return await real(entry, nexthop, route, rcpts)
        self.manager._deliver_group = broken_once
        entry = self.queue("b@far.test")
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(broke, [entry.id])
        self.assertEqual(self.mx.calls, [])
        [r] = entry.recipients
        self.assertEqual((r.state, r.last_reply), ("deferred", "451 4.3.0 local error in delivery"))
        self.assertGreater(r.next_try, self.clock.seconds())
        self.clock.advance(r.next_try - self.clock.seconds())  # tried again when due
        self.assertEqual(len(self.mx.calls), 1)
        self.assertNotIn(entry.id, self.manager.entries)

    def test_one_of_several_next_hops_breaking_is_logged(self):
        # Next hops delivered side by side: the one whose delivery raises
        # is logged and its recipient deferred; the other is delivered.
        real = self.manager._deliver_group

        async def broken_for_far(entry, nexthop, route, rcpts):
            if rcpts[0].address.endswith("@far.test"):
                raise RuntimeError("bug")
            return await real(entry, nexthop, route, rcpts)
        self.manager._deliver_group = broken_for_far
        entry = self.queue("b@far.test", "d@other.test")
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        far, other = entry.recipients
        self.assertEqual((far.state, far.last_reply),
                         ("deferred", "451 4.3.0 local error in delivery"))
        self.assertGreater(far.next_try, self.clock.seconds())
        self.assertEqual(other.state, "delivered")

    def test_split_by_route_and_grouped_by_next_hop(self):
        self.queue("a@example.test", "b@far.test", "c@far.test", "d@other.test")
        self.clock.advance(0)
        self.assertEqual(sorted(c[2] for c in self.mx.calls), [["b@far.test", "c@far.test"], ["d@other.test"]])

    def test_deferred_backs_off_and_is_saved(self):
        self.mx.script["b@far.test"] = ("deferred", "451 4.3.0 try later")
        entry = self.queue("b@far.test")
        self.clock.advance(0)
        expected_gaps = [300, 600, 1200, 2400, 4000, 4000]
        for gap in expected_gaps:
            before = len(self.mx.calls)
            self.clock.advance(gap - 1)
            self.assertEqual(len(self.mx.calls), before)
            self.clock.advance(1)
            self.assertEqual(len(self.mx.calls), before + 1)
        saved = self.spool.load(entry.id)
        self.assertEqual(saved.recipients[0].state, "deferred")
        self.assertEqual(saved.recipients[0].last_reply, "451 4.3.0 try later")
        self.assertEqual(saved.recipients[0].attempts, len(expected_gaps) + 1)

    def test_failure_bounces_once_then_entry_removed(self):
        self.mx.script["b@far.test"] = ("failed", "550 5.1.1 no such user")
        entry = self.queue("a@example.test", "b@far.test")
        self.clock.advance(0)
        self.assertEqual(self.bouncer.bounced, [(entry.id, ["b@far.test"])])
        self.assertNotIn(entry.id, self.manager.entries)
        self.assertIn(("bounced", "b@far.test"), self.observed)

    def test_lifetime_expiry_fails_deferred_recipients(self):
        self.config = make_config(self.folder, route=ROUTES, delivery={"queue_lifetime": 1000})
        self.mx.script["b@far.test"] = ("deferred", "421 4.4.2 timeout")
        entry = self.queue("b@far.test")
        self.clock.advance(0)
        self.assertEqual(self.bouncer.bounced, [])
        self.clock.advance(300)
        self.clock.advance(600)
        self.clock.advance(1200)
        self.assertEqual(self.bouncer.bounced, [(entry.id, ["b@far.test"])])
        self.assertIn("expired", entry.recipients[0].last_reply)

    def test_delay_warning_once(self):
        self.config = make_config(self.folder, route=ROUTES, delivery={"delay_warning": 500})
        self.mx.script["b@far.test"] = ("deferred", "451 4.3.0 later")
        entry = self.queue("b@far.test")
        for gap in (0, 300, 600, 1200, 2400):
            self.clock.advance(gap)
        self.assertEqual(self.bouncer.delayed, [(entry.id, ["b@far.test"])])
        self.assertTrue(self.spool.load(entry.id).delay_warned)

    def test_no_route_defers(self):
        self.config = make_config(self.folder, route=[ROUTES[0]])
        self.pipeline = loader.build_pipeline(self.config, 2, reactor=self.clock)
        entry = self.queue("b@far.test")
        self.clock.advance(0)
        self.assertEqual(self.states(entry), [("b@far.test", "deferred", 1)])
        self.assertIn("no route", entry.recipients[0].last_reply)

    def test_route_chosen_by_filter_overrides_router(self):
        entry = self.queue("b@far.test")
        self.clock.advance(0)
        entry2 = self.queue("c@far.test")
        entry2.recipients[0].route = {"via": "maildir", "path": "elsewhere"}
        self.manager.flush(entry2.id)
        self.clock.advance(0)
        self.assertEqual(self.maildir.calls[-1][1].path, "elsewhere")
        self.assertEqual(len(self.mx.calls), 1)
        del entry

    def test_reload_reroutes_queued_mail_on_next_attempt(self):
        self.mx.script["b@far.test"] = ("deferred", "451 4.3.0 down")
        self.queue("b@far.test")
        self.clock.advance(0)
        self.config = make_config(self.folder, route=[{"domains": ["*"], "via": "maildir", "path": "m"}])
        self.pipeline = loader.build_pipeline(self.config, 2, reactor=self.clock)
        self.clock.advance(300)
        self.assertEqual(self.maildir.calls[-1][2], ["b@far.test"])

    def test_per_destination_cap(self):
        self.config = make_config(self.folder, route=ROUTES, delivery={"max_per_destination": 2})
        self.mx.hold = True
        for _ in range(5):
            self.queue("b@far.test")
        self.clock.advance(0)
        self.assertEqual(len(self.mx.calls), 2)
        self.mx.pending.pop(0).callback(None)
        self.assertEqual(len(self.mx.calls), 3)
        while self.mx.pending:
            self.mx.pending.pop(0).callback(None)
        self.assertEqual(len(self.mx.calls), 5)
        self.assertEqual(self.manager.entries, {})

    def test_hold_and_release(self):
        self.mx.script["b@far.test"] = ("deferred", "451 4.3.0 later")
        entry = self.queue("b@far.test")
        self.clock.advance(0)
        self.successResultOf(self.manager.hold(entry.id))
        self.clock.advance(10000)
        self.assertEqual(len(self.mx.calls), 1)
        self.assertTrue(self.spool.load(entry.id).held)
        del self.mx.script["b@far.test"]
        self.successResultOf(self.manager.release(entry.id))
        self.manager.flush(entry.id)
        self.clock.advance(0)
        self.assertEqual(len(self.mx.calls), 2)
        self.assertNotIn(entry.id, self.manager.entries)

    def test_flush_by_domain(self):
        self.mx.script = {"b@far.test": ("deferred", "451"), "c@near.test": ("deferred", "451")}
        self.queue("b@far.test")
        self.queue("c@near.test")
        self.clock.advance(0)
        self.assertEqual(len(self.manager.flush(domain="FAR.test")), 1)
        self.clock.advance(0)
        self.assertEqual([c[2] for c in self.mx.calls[2:]], [["b@far.test"]])

    def test_delete_while_delivering_waits_for_the_attempt(self):
        self.mx.hold = True
        entry = self.queue("b@far.test")
        self.clock.advance(0)
        self.successResultOf(self.manager.delete(entry.id))
        self.assertTrue(self.spool.message_path(entry.id).exists())
        self.mx.script["b@far.test"] = ("deferred", "451")
        self.mx.pending.pop().callback(None)
        self.assertNotIn(entry.id, self.manager.entries)
        self.assertFalse(self.spool.message_path(entry.id).exists())

    def test_recovered_entries_are_tried(self):
        entry = self.queue("a@example.test")
        self.manager.stopService()
        self.manager.entries.clear()
        manager = DeliveryManager(self.spool, lambda: self.pipeline, lambda: self.config,
                                  {"maildir": self.maildir, "mx": self.mx}, self.clock)
        manager.load(Spool(self.folder / "spool", self.clock, inline=True).prepare())
        manager.startService()
        self.clock.advance(0)
        self.assertEqual(self.maildir.calls[-1][0], entry.id)


class LimiterTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.per_key, self.total = 2, 3
        self.limiter = Limiter(lambda: self.per_key, lambda: self.total)
        self.got: list[str] = []

    def acquire(self, key):
        d = self.limiter.acquire(key)
        d.addCallback(self.got.append)
        return d

    def test_per_key_and_total(self):
        for key in ("a", "a", "a", "b", "b"):
            self.acquire(key)
        self.assertEqual(self.got, ["a", "a", "b"])  # a: 2 per key; then 3 in all
        self.assertEqual(self.limiter.waiting, 2)
        self.assertEqual(self.limiter.in_all, 3)
        self.assertEqual(dict(self.limiter.active), {"a": 2, "b": 1})

    def test_release_serves_the_oldest_waiter_with_room(self):
        for key in ("a", "a", "b", "a", "c", "b"):
            self.acquire(key)
        self.assertEqual(self.got, ["a", "a", "b"])
        # Waiting, oldest first: a (at its cap), c, b.
        self.limiter.release("b")
        self.assertEqual(self.got[3:], ["c"])
        self.limiter.release("a")
        self.assertEqual(self.got[4:], ["a"])  # older than b
        self.limiter.release("c")
        self.assertEqual(self.got[5:], ["b"])
        self.assertEqual(self.limiter.waiting, 0)
        self.assertEqual(dict(self.limiter.active), {"a": 2, "b": 1})

    def test_keys_at_their_cap_do_not_block_others(self):
        self.total = 10
        for key in ["a"] * 5 + ["b"]:
            self.acquire(key)
        self.assertEqual(self.got, ["a", "a", "b"])
        self.limiter.release("a")
        self.assertEqual(self.got, ["a", "a", "b", "a"])
        self.assertEqual(self.limiter.waiting, 2)

    def test_reentrant_release_in_a_callback(self):
        # A delivery that finishes at once releases its slot from within
        # the acquisition's callback: every waiter still gets its turn.
        self.per_key = self.total = 1
        for _ in range(5):
            self.limiter.acquire("a").addCallback(lambda key: (self.got.append(key),
                                                               self.limiter.release(key)))
        self.assertEqual(self.got, ["a"] * 5)
        self.assertEqual(self.limiter.in_all, 0)
        self.assertEqual(dict(self.limiter.active), {})
        self.assertEqual(self.limiter.waiting, 0)

    def test_many_waiters_for_one_key(self):
        self.per_key, self.total = 20, 100
        for _ in range(5000):
            self.acquire("a")
        for _ in range(5000):
            self.limiter.release("a")
        self.assertEqual(len(self.got), 5000)
        self.assertEqual(self.limiter.in_all, 0)


class MailboxTests(unittest.SynchronousTestCase):
    def test_parsed_once_and_shared(self):
        from twisted_mta.smtp.grammar import parse_mailbox
        from twisted_mta.spool.entry import parse_address
        a = parse_address("Someone@Example.TEST")
        self.assertEqual(a, parse_mailbox("Someone@Example.TEST", utf8=True))
        self.assertIs(parse_address("Someone@Example.TEST"), a)
        self.assertIs(RecipientState("Someone@Example.TEST").mailbox, a)
        with self.assertRaises(ValueError):
            parse_address("not an address")
