"""
The pipeline: how hooks are called (values, Deferreds, coroutines,
errors, timeouts, slow hooks) and how verdicts and changes combine.
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from twisted_mta import testing
from twisted_mta.builtins.relay import RelayRules
from twisted_mta.builtins.routes import RouteTable
from twisted_mta.interfaces import IMailFilter, IRcptFilter
from twisted_mta.pipeline import PLUGIN_FAILURE, LoadedPlugin, Pipeline, call_hook, call_hook_now
from twisted_mta.values import Action, AddHeader, RewriteSender, Verdict


@implementer(IMailFilter)
class Answers:
    """A mail filter answering with whatever it was given (callables are called)."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def mail(self, session, envelope):
        self.calls += 1
        return self.answer() if callable(self.answer) else self.answer


def make_pipeline(clock, *plugins, timeout=30.0):
    loaded = [LoadedPlugin(f"p{i}", p, timeout=timeout) for i, p in enumerate(plugins)]
    return Pipeline(1, LoadedPlugin("relay", RelayRules()), LoadedPlugin("routes", RouteTable(())),
                    loaded, reactor=clock)


def ask(pipeline):
    results = []
    pipeline.ask("mail", testing.session(), testing.envelope()).addBoth(results.append)
    return results


class CallHookTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()

    def verdict(self, answer, timeout=30.0):
        results = ask(make_pipeline(self.clock, Answers(answer), timeout=timeout))
        return results

    def test_plain_value(self):
        self.assertEqual(self.verdict(Verdict.reject("no"))[0].action, Action.REJECT)

    def test_none_is_continue(self):
        self.assertEqual(self.verdict(None)[0].action, Action.CONTINUE)

    def test_deferred(self):
        d = defer.Deferred()
        results = self.verdict(d)
        self.assertEqual(results, [])
        d.callback(Verdict.tempfail("later"))
        self.assertEqual(results[0].action, Action.TEMPFAIL)

    def test_coroutine(self):
        d = defer.Deferred()

        async def hook():
            value = await d
            return Verdict.reject(value)

        results = self.verdict(hook)
        d.callback("from a coroutine")
        self.assertEqual(results[0].text, "from a coroutine")

    def test_exception_is_451_430(self):
        def boom():
            raise RuntimeError("plugin bug")
        results = self.verdict(boom)
        self.assertEqual(results[0], PLUGIN_FAILURE)
        self.assertEqual((results[0].action, results[0].enhanced), (Action.TEMPFAIL, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failed_deferred_is_451_430(self):
        results = self.verdict(lambda: defer.fail(ValueError("bad")))
        self.assertEqual(results[0], PLUGIN_FAILURE)
        self.flushLoggedErrors(ValueError)

    def test_timeout_is_451_430(self):
        results = self.verdict(defer.Deferred(), timeout=5)
        self.clock.advance(4.9)
        self.assertEqual(results, [])
        self.clock.advance(0.2)
        self.assertEqual(results[0], PLUGIN_FAILURE)
        self.flushLoggedErrors(defer.TimeoutError)

    def test_wrong_return_type_is_451_430(self):
        self.assertEqual(self.verdict("yes please")[0], PLUGIN_FAILURE)

    def test_slow_synchronous_hook_warns(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def slow():
            time.sleep(0.15)
        self.verdict(slow)
        warnings = [e for e in events if "held the reactor" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["name"], "p0")

    def test_call_hook_never_fails(self):
        loaded = LoadedPlugin("x", object())
        results = []
        call_hook(self.clock, loaded, "missing").addBoth(results.append)
        self.assertEqual(results, [PLUGIN_FAILURE])
        self.flushLoggedErrors(AttributeError)


class AskTests(unittest.SynchronousTestCase):
    def test_first_non_continue_decides_and_later_not_asked(self):
        first, second, third = Answers(None), Answers(Verdict.reject("no")), Answers(None)
        results = ask(make_pipeline(Clock(), first, second, third))
        self.assertEqual(results[0].action, Action.REJECT)
        self.assertEqual((first.calls, second.calls, third.calls), (1, 1, 0))

    def test_accept_stops_the_chain(self):
        later = Answers(Verdict.reject("no"))
        results = ask(make_pipeline(Clock(), Answers(Verdict.accept()), later))
        self.assertEqual((results[0].action, later.calls), (Action.ACCEPT, 0))

    def test_changes_accumulate_in_order(self):
        a = Answers(Verdict.continue_(AddHeader("A", "1")))
        b = Answers(Verdict.continue_(RewriteSender(None)))
        results = ask(make_pipeline(Clock(), a, b))
        self.assertEqual(results[0].changes, (AddHeader("A", "1"), RewriteSender(None)))

    def test_long_chain_of_synchronous_answers(self):
        plugins = [Answers(None) for _ in range(2000)]
        results = ask(make_pipeline(Clock(), *plugins))
        self.assertEqual(results[0].action, Action.CONTINUE)

    def test_only_filters_with_the_hook_are_asked(self):
        @implementer(IRcptFilter)
        class RcptOnly:
            def rcpt(self, session, envelope, recipient):
                raise AssertionError("not a mail hook")
        results = ask(make_pipeline(Clock(), RcptOnly()))
        self.assertEqual(results[0].action, Action.CONTINUE)


class AskNowTests(unittest.SynchronousTestCase):
    """ask_now, check_relay_now and call_hook_now: plain values when nothing waits."""

    def ask_now(self, *plugins):
        return make_pipeline(Clock(), *plugins).ask_now("mail", testing.session(), testing.envelope())

    def test_no_filter_is_continue_at_once(self):
        verdict = self.ask_now()
        self.assertIsInstance(verdict, Verdict)
        self.assertEqual((verdict.action, verdict.changes), (Action.CONTINUE, ()))

    def test_synchronous_filters_give_the_verdict(self):
        a = Answers(Verdict.continue_(AddHeader("A", "1")))
        b = Answers(Verdict.reject("no"))
        verdict = self.ask_now(a, b)
        self.assertIsInstance(verdict, Verdict)
        self.assertEqual((verdict.action, verdict.changes), (Action.REJECT, (AddHeader("A", "1"),)))

    def test_fired_deferred_and_exception_answer_at_once(self):
        verdict = self.ask_now(Answers(lambda: defer.succeed(None)), Answers(lambda: 1 / 0))
        self.assertIs(verdict, PLUGIN_FAILURE)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_waiting_filter_gives_a_deferred_and_the_rest_are_asked_after(self):
        d = defer.Deferred()
        first = Answers(Verdict.continue_(AddHeader("A", "1")))
        waits, last = Answers(d), Answers(Verdict.continue_(AddHeader("C", "3")))
        result = self.ask_now(first, waits, last)
        self.assertIsInstance(result, defer.Deferred)
        self.assertEqual(last.calls, 0)
        results = []
        result.addCallback(results.append)
        d.callback(Verdict.continue_(AddHeader("B", "2")))
        self.assertEqual(last.calls, 1)
        self.assertEqual(results[0].action, Action.CONTINUE)
        self.assertEqual(results[0].changes,
                         (AddHeader("A", "1"), AddHeader("B", "2"), AddHeader("C", "3")))

    def test_two_waiting_filters(self):
        d1, d2 = defer.Deferred(), defer.Deferred()
        result = self.ask_now(Answers(d1), Answers(d2))
        results = []
        result.addCallback(results.append)
        d1.callback(None)
        self.assertEqual(results, [])
        d2.callback(Verdict.tempfail("later"))
        self.assertEqual(results[0].action, Action.TEMPFAIL)

    def test_check_relay_now(self):
        pipeline = make_pipeline(Clock())
        rcpt = testing.envelope().sender
        verdict = pipeline.check_relay_now(testing.session(), testing.envelope(), rcpt)
        self.assertIsInstance(verdict, Verdict)
        results = []
        pipeline.check_relay(testing.session(), testing.envelope(), rcpt).addCallback(results.append)
        self.assertEqual(results, [verdict])

    def test_call_hook_now(self):
        plain = LoadedPlugin("x", Answers(Verdict.accept()))
        self.assertEqual(call_hook_now(Clock(), plain, "mail", None, None).action, Action.ACCEPT)
        d = defer.Deferred()
        waits = LoadedPlugin("y", Answers(d))
        self.assertIsInstance(call_hook_now(Clock(), waits, "mail", None, None), defer.Deferred)
        self.assertIs(call_hook_now(Clock(), LoadedPlugin("z", object()), "mail"), PLUGIN_FAILURE)
        self.flushLoggedErrors(AttributeError)
