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
from twisted_mta.pipeline import PLUGIN_FAILURE, LoadedPlugin, Pipeline, call_hook
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
