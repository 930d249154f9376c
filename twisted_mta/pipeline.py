"""
The active plugin set: filters in order, the relay policy and the router.

A L{Pipeline} is immutable once built.  The server asks the pipeline that
was current when a transaction began (MAIL) for every stage of that
transaction, so a reload never changes the rules halfway through one.

L{call_hook_now} (which L{call_hook} wraps) is the one place a plugin's
code is called: it accepts plain values, Deferreds and coroutines, bounds
the call with a timeout, turns an exception or a timeout into a tempfail
(451 4.3.0) logged with the plugin's name, and warns when a hook held the
reactor for more than 100 ms.  The C{_now} methods answer with the value
itself when no plugin has to be waited for; the server uses them on its
hot path, where a Deferred per hook per command cost measurable CPU.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from twisted_mta import interfaces
from twisted_mta.values import CONTINUE, Action, Verdict

log = Logger()

SLOW_HOOK = 0.1  # seconds a hook may run synchronously before a warning

#: The hook interface for each stage.
STAGES = {
    "connect": interfaces.IConnectFilter,
    "helo": interfaces.IHeloFilter,
    "auth": interfaces.IAuthFilter,
    "mail": interfaces.IMailFilter,
    "rcpt": interfaces.IRcptFilter,
    "data": interfaces.IDataFilter,
}

#: What the client is told when a plugin fails: the transaction is retried later.
PLUGIN_FAILURE = Verdict(Action.TEMPFAIL, "Error: internal filter error, try again later", "4.3.0")


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin object with the name it was configured by and where its code came from."""

    name: str
    plugin: Any
    origin: str = ""
    timeout: float = 30.0

    def hooks(self) -> list[str]:
        return [stage for stage, iface in STAGES.items() if iface.providedBy(self.plugin)]


def call_hook(reactor, loaded: LoadedPlugin, method: str, *args) -> Deferred:
    """
    Call C{loaded.plugin.<method>(*args)} and return a Deferred that fires
    with a L{Verdict} (or, for non-filter hooks, the value returned).  Never
    fails: a plugin's failure becomes L{PLUGIN_FAILURE}.
    """
    result = call_hook_now(reactor, loaded, method, *args)
    return result if isinstance(result, Deferred) else succeed(result)


def call_hook_now(reactor, loaded: LoadedPlugin, method: str, *args) -> Any:
    """
    L{call_hook}, but a hook that answers at once (a plain value, or an
    exception: L{PLUGIN_FAILURE}) is answered with that value itself, not
    a Deferred: most hooks are synchronous, and a Deferred per hook per
    command was a measurable share of the server's CPU.  A Deferred or a
    coroutine from the hook gives a Deferred, as from L{call_hook}.
    """
    started = time.perf_counter()
    try:
        result = getattr(loaded.plugin, method)(*args)
        if inspect.iscoroutine(result):
            result = Deferred.fromCoroutine(result)
    except Exception:
        log.failure("plugin {name}: {method} raised", name=loaded.name, method=method)
        return PLUGIN_FAILURE
    finally:
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_HOOK:
            log.warn(
                "plugin {name}: {method} held the reactor for {ms:.0f} ms; "
                "return a Deferred or use a thread for slow work",
                name=loaded.name, method=method, ms=elapsed * 1000,
            )
    if not isinstance(result, Deferred):
        return result
    result.addTimeout(loaded.timeout, reactor)

    def failed(failure):
        log.failure("plugin {name}: {method} failed", failure, name=loaded.name, method=method)
        return PLUGIN_FAILURE

    return result.addErrback(failed)


def _as_verdict(value: Any, loaded: LoadedPlugin, method: str) -> Verdict:
    if value is None:
        return CONTINUE
    if isinstance(value, Verdict):
        return value
    log.error("plugin {name}: {method} returned {value!r}, not a Verdict",
              name=loaded.name, method=method, value=value)
    return PLUGIN_FAILURE


class Pipeline:
    """
    One generation of the plugin set.

    @ivar generation: counts reloads, from 1.
    @ivar filters: L{LoadedPlugin}s in the configured order.
    @ivar relay: the L{LoadedPlugin} providing L{IRelayPolicy}.
    @ivar router: the L{LoadedPlugin} providing L{IRouter}.
    """

    def __init__(self, generation: int, relay: LoadedPlugin, router: LoadedPlugin,
                 filters: Sequence[LoadedPlugin] = (), observers: Sequence[LoadedPlugin] = (),
                 reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.generation = generation
        self.relay = relay
        self.router = router
        self.filters = tuple(filters)
        self.observers = tuple(observers)
        self._reactor = reactor
        self._by_stage = {
            stage: tuple(f for f in self.filters if iface.providedBy(f.plugin))
            for stage, iface in STAGES.items()
        }

    def has_hook(self, stage: str) -> bool:
        return bool(self._by_stage[stage])

    def ask(self, stage: str, *args) -> Deferred:
        """
        Ask each filter with a C{stage} hook, in order, until one answers
        other than continue.  Fires with the deciding L{Verdict}, carrying
        the changes of every filter asked (in order).
        """
        verdict = self.ask_now(stage, *args)
        return verdict if isinstance(verdict, Deferred) else succeed(verdict)

    def ask_now(self, stage: str, *args) -> Verdict | Deferred:
        """
        L{ask}, answered with the L{Verdict} itself when every filter asked
        answered at once (with no filter for C{stage}, the usual case:
        L{CONTINUE}); else a Deferred that fires with it.
        """
        filters = self._by_stage[stage]
        if not filters:
            return CONTINUE
        changes: list = []
        result: Deferred | None = None

        def step(i: int) -> Verdict | None:
            """Ask from filter C{i} on: the verdict, or None if one must be waited for."""
            nonlocal result
            while i < len(filters):
                value = call_hook_now(self._reactor, filters[i], stage, *args)
                if isinstance(value, Deferred):
                    if not value.called:
                        if result is None:
                            result = Deferred()
                        value.addCallback(lambda v, i=i: answered(i, v))
                        return None
                    value = value.result  # already fired: a loop, not recursion, for long chains
                verdict = _as_verdict(value, filters[i], stage)
                changes.extend(verdict.changes)
                if verdict.action is not Action.CONTINUE:
                    return finish(verdict)
                i += 1
            return finish(CONTINUE)

        def answered(i: int, value) -> None:
            verdict = _as_verdict(value, filters[i], stage)
            changes.extend(verdict.changes)
            if verdict.action is not Action.CONTINUE:
                verdict = finish(verdict)
            else:
                verdict = step(i + 1)
            if verdict is not None:
                result.callback(verdict)

        def finish(verdict: Verdict) -> Verdict:
            if changes != list(verdict.changes):
                verdict = Verdict(verdict.action, verdict.text, verdict.enhanced, tuple(changes))
            return verdict

        verdict = step(0)
        return result if verdict is None else verdict

    def check_relay(self, session, envelope, recipient) -> Deferred:
        """Ask the relay policy about C{recipient}; fires with a L{Verdict}."""
        verdict = self.check_relay_now(session, envelope, recipient)
        return verdict if isinstance(verdict, Deferred) else succeed(verdict)

    def check_relay_now(self, session, envelope, recipient) -> Verdict | Deferred:
        """L{check_relay}, answered with the L{Verdict} itself if the policy answered at once."""
        value = call_hook_now(self._reactor, self.relay, "check_recipient", session, envelope, recipient)
        if isinstance(value, Deferred):
            return value.addCallback(_as_verdict, self.relay, "check_recipient")
        return _as_verdict(value, self.relay, "check_recipient")

    def route(self, envelope, recipient) -> Deferred:
        """Ask the router; fires with a L{Route}, C{None}, or L{PLUGIN_FAILURE}."""
        return call_hook(self._reactor, self.router, "route", envelope, recipient)

    def is_local(self, domain: str) -> bool:
        try:
            return bool(self.relay.plugin.is_local(domain))
        except Exception:
            log.failure("plugin {name}: is_local raised", name=self.relay.name)
            return False
