"""
The delivery manager: takes queued messages whose time has come, routes
each waiting recipient, groups them by next hop, hands each group to the
agent for its route, and records what happened, in the spool, before it
forgets anything.

Rules (Postfix's, where the issue is silent):
  - A recipient is tried when it is pending or its C{next_try} has come.
  - A C{deferred} outcome backs off exponentially: C{min_backoff}, then
    doubling up to C{max_backoff}.  A recipient still not delivered when
    the message is older than C{queue_lifetime} fails (C{bounce_lifetime}
    for bounces themselves).
  - Failures produce one DSN to the sender (never to C{<>}, never for a
    bounce); a message delayed past C{delay_warning} gets one delay DSN.
  - The DSN is made durable before the failure is recorded, and the
    outcome is recorded before the message leaves the spool, so a crash
    at any point repeats work rather than losing it (at-least-once).
    A state that only records deferrals is saved without a sync, and a
    message that leaves the spool is unlinked without one: a crash then
    only brings an attempt sooner or delivers again.
  - At most C{max_per_destination} deliveries run at once per next hop and
    C{max_connections} in all.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict, deque
from typing import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from twisted_mta.delivery.agent import DEFERRED, DELIVERED, FAILED, Outcome
from twisted_mta.pipeline import PLUGIN_FAILURE
from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.values import Envelope, Route

log = Logger()


class Limiter:
    """
    Slots per key and in all; L{acquire} fires when one is free.  Waiters
    are served oldest first among the keys that have a free slot.  They
    wait in one queue per key, so that a release looks at each waiting
    key once rather than at every waiter: with thousands of messages
    waiting for one busy next hop (a queue flushed, a restart), a scan of
    all of them at each release made the reactor's cost per message grow
    with the backlog.
    """

    def __init__(self, per_key: Callable[[], int], total: Callable[[], int]):
        self._per_key, self._total = per_key, total
        self.active: dict[str, int] = defaultdict(int)
        self.in_all = 0
        self._order = itertools.count()
        self._waiting: dict[str, deque[tuple[int, Deferred]]] = {}

    def acquire(self, key: str) -> Deferred:
        d: Deferred = Deferred()
        queue = self._waiting.get(key)
        if queue is None:
            queue = self._waiting[key] = deque()
        queue.append((next(self._order), d))
        self._pump()
        return d

    def release(self, key: str) -> None:
        self.active[key] -= 1
        if not self.active[key]:
            del self.active[key]
        self.in_all -= 1
        self._pump()

    def _pump(self) -> None:
        if not self._waiting:
            return
        total, per_key = self._total(), self._per_key()
        while self.in_all < total:
            # The oldest waiter whose key has room (the keys are few: the
            # next hops with deliveries waiting).
            best, best_seq = None, None
            for key, queue in self._waiting.items():
                if self.active.get(key, 0) < per_key and (best is None or queue[0][0] < best_seq):
                    best, best_seq = key, queue[0][0]
            if best is None:
                return
            queue = self._waiting[best]
            _, d = queue.popleft()
            if not queue:
                del self._waiting[best]
            self.active[best] += 1
            self.in_all += 1
            # Last: the callback may acquire or release (and pump) itself.
            d.callback(best)

    @property
    def waiting(self) -> int:
        """How many acquisitions wait for a slot."""
        return sum(len(q) for q in self._waiting.values())


class DeliveryManager(Service):
    """
    See the module docstring.  C{pipeline} and C{config} are callables
    giving the current ones (a reload changes them); C{agents} maps a
    route's C{via} to its L{IDeliveryAgent}; C{bouncer}, if given, makes
    DSNs (L{twisted_mta.delivery.bounce.Bouncer}).
    """

    def __init__(self, spool, pipeline: Callable, config: Callable, agents: dict,
                 reactor=None, bouncer=None, observers: Callable = lambda: ()):
        if reactor is None:
            from twisted.internet import reactor
        self.spool = spool
        self.pipeline = pipeline
        self.config = config
        self.agents = agents
        self.reactor = reactor
        self.bouncer = bouncer
        self.observers = observers
        self.entries: dict[str, QueueEntry] = {}
        self.active: dict[str, Deferred] = {}
        self._heap: list[tuple[float, str]] = []
        self._timer = None
        self._doomed: set[str] = set()
        self.limiter = Limiter(lambda: self.config().delivery.max_per_destination,
                               lambda: self.config().delivery.max_connections)

    # --- the queue ----------------------------------------------------------

    def load(self, entries) -> None:
        """Take over the entries found in the spool at start-up."""
        for entry in entries:
            self.entries[entry.id] = entry
            self._schedule(entry)

    def enqueue(self, entry: QueueEntry) -> None:
        """A newly accepted message: try it now."""
        self.entries[entry.id] = entry
        self._schedule(entry)

    def startService(self) -> None:
        super().startService()
        self._arm()

    def stopService(self):
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # Let attempts under way finish recording what they did.
        return DeferredList(list(self.active.values()))

    def _schedule(self, entry: QueueEntry) -> None:
        if entry.held or entry.done or entry.id in self.active:
            return
        heapq.heappush(self._heap, (entry.next_try, entry.id))
        self._arm()

    def _arm(self) -> None:
        if not self.running or not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.reactor.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        while self._heap and self._heap[0][0] <= now:
            when, queue_id = heapq.heappop(self._heap)
            entry = self.entries.get(queue_id)
            if entry is None or entry.held or queue_id in self.active:
                continue
            if entry.next_try > now:  # superseded by a later schedule
                continue
            self._start(entry)
        self._arm()

    def _start(self, entry: QueueEntry) -> None:
        d = Deferred.fromCoroutine(self._attempt(entry))
        self.active[entry.id] = d

        def done(result):
            self.active.pop(entry.id, None)
            if entry.id in self._doomed:
                self._doomed.discard(entry.id)
                self._delete_now(entry.id)
            elif entry.id in self.entries:
                self._schedule(entry)
            return None

        d.addErrback(lambda f: log.failure("delivery attempt for {id} failed", f, id=entry.id))
        d.addBoth(done)

    # --- an attempt ---------------------------------------------------------

    async def _attempt(self, entry: QueueEntry) -> None:
        now = self.reactor.seconds()
        due = [r for r in entry.recipients if not r.final and r.next_try <= now]
        if not due:
            return
        groups = await self._route(entry, due)
        outcomes: list[Outcome] = groups.pop(None, ([], []))[1]
        if len(groups) == 1:
            # The usual case: one next hop, nothing to run side by side.
            [(nexthop, (route, rcpts))] = groups.items()
            try:
                outcomes.extend(await self._deliver_group(entry, nexthop, route, rcpts))
            except Exception:  # its recipients are deferred below
                log.failure("delivery to {nexthop} failed for {id}", nexthop=nexthop, id=entry.id)
        elif groups:
            calls = [Deferred.fromCoroutine(self._deliver_group(entry, nexthop, route, rcpts))
                     for nexthop, (route, rcpts) in groups.items()]
            results = await DeferredList(calls, consumeErrors=True)
            for nexthop, (ok, value) in zip(groups, results):
                if ok:
                    outcomes.extend(value)
                else:
                    log.failure("delivery to {nexthop} failed for {id}", value,
                                nexthop=nexthop, id=entry.id)
        # A recipient left without an outcome (a delivery that broke) is
        # deferred like any other, not left due: that would retry it at
        # once, again and again.
        answered = {o.recipient for o in outcomes}
        outcomes.extend(Outcome(r.address, DEFERRED, "451 4.3.0 local error in delivery")
                        for r in due if r.address not in answered)
        await self._record(entry, outcomes, now)

    async def _route(self, entry: QueueEntry, due: list[RecipientState]) -> dict:
        """Group C{due} by next hop: {nexthop: (route, [rcpt])}, and None: ([], outcomes)."""
        pipeline = self.pipeline()
        envelope = Envelope(sender=entry.sender_address, body=entry.body, smtputf8=entry.smtputf8,
                            recipients=tuple(r.mailbox for r in entry.recipients))
        groups: dict = {None: ([], [])}
        cache: dict[str, object] = {}
        for r in due:
            address = r.mailbox
            if r.route:
                route = Route.from_dict(r.route)
            elif address.domain_key in cache:
                route = cache[address.domain_key]
            else:
                route = await pipeline.route(envelope, address)
                cache[address.domain_key] = route
            if route is PLUGIN_FAILURE or route is None:
                reason = "router failed" if route is not None else "no route for this domain"
                groups[None][1].append(Outcome(r.address, DEFERRED, f"451 4.3.5 {reason}"))
            elif route.via == "discard":
                groups[None][1].append(Outcome(r.address, DELIVERED, "250 2.0.0 discarded by route"))
            elif route.via not in self.agents:
                groups[None][1].append(Outcome(
                    r.address, DEFERRED, f"451 4.3.5 delivery by {route.via} is not available"))
            else:
                nexthop = route.nexthop(address.domain_key)
                groups.setdefault(nexthop, (route, []))[1].append(r)
        return groups

    async def _deliver_group(self, entry, nexthop: str, route: Route, rcpts):
        await self.limiter.acquire(nexthop)
        try:
            return await self.agents[route.via].deliver(entry, route, rcpts)
        except Exception as e:
            log.failure("agent {via} failed for {id}", id=entry.id, via=route.via)
            return [Outcome(r.address, DEFERRED, f"451 4.3.0 local error in delivery: {e}") for r in rcpts]
        finally:
            self.limiter.release(nexthop)

    def backoff(self, attempts: int) -> float:
        d = self.config().delivery
        return min(d.max_backoff, d.min_backoff * (2 ** max(0, attempts - 1)))

    async def _record(self, entry: QueueEntry, outcomes: list[Outcome], now: float) -> None:
        d = self.config().delivery
        by_address = {r.address: r for r in entry.recipients}
        failed, deferred = [], []
        lifetime = d.bounce_lifetime if entry.bounce else d.queue_lifetime
        expired = now - entry.arrival >= lifetime
        for outcome in outcomes:
            r = by_address.get(outcome.recipient)
            if r is None:
                continue
            r.attempts += 1
            r.last_reply = outcome.reply
            r.remote = getattr(outcome, "remote", None)
            status = outcome.status
            if status == DEFERRED and expired:
                status = FAILED
                r.last_reply = f"message expired after {lifetime / 86400:g} days in the queue: {outcome.reply}"
            r.state = status
            if status == DEFERRED:
                r.next_try = now + self.backoff(r.attempts)
                deferred.append(r)
            elif status == FAILED:
                failed.append(r)
            log.info("{id}: to=<{rcpt}> status={status} attempts={n} reply={reply!r}{remote}",
                     id=entry.id, rcpt=r.address, status=r.state, n=r.attempts,
                     reply=r.last_reply, remote=f" relay={outcome.remote}" if outcome.remote else "")
        if self.bouncer is not None:
            if failed:
                await self.bouncer.bounce(entry, failed)
            if (deferred and not entry.delay_warned and now - entry.arrival >= d.delay_warning):
                await self.bouncer.delay(entry, deferred)
                entry.delay_warned = True
        done = entry.done
        if done and entry.bounce and any(r.state == FAILED for r in entry.recipients):
            # A DSN that cannot be delivered is neither answered (no loop)
            # nor dropped: it stays, on hold, for the postmaster to see
            # ('queue show'), release (tried again) or delete.
            entry.held = True
            await self.spool.save(entry)
            log.warn("{id}: undeliverable delivery status notification kept on hold; "
                     "'twisted-mta queue release {id}' tries it again, "
                     "'twisted-mta queue delete {id}' drops it", id=entry.id)
        elif done:
            # No save first: the message leaves the spool, and the unlink
            # need not be synced (a crash that undoes it delivers again).
            await self.spool.remove(entry.id)
            self.entries.pop(entry.id, None)
            log.info("{id}: removed", id=entry.id)
        else:
            await self.spool.save(entry, sync=self._must_sync(entry))
        self._notify(entry, outcomes)

    @staticmethod
    def _must_sync(entry: QueueEntry) -> bool:
        """
        Whether C{entry}'s state must be durable before we go on.  Not when
        all it records is deferrals (attempts, next try, last reply): a
        crash that loses it only brings the next attempt sooner.  A final
        recipient (a delivery or a DSN not to repeat), a delay DSN sent or
        a hold must be: losing them would repeat what someone has seen.
        """
        return entry.held or entry.delay_warned or any(r.final for r in entry.recipients)

    def _notify(self, entry: QueueEntry, outcomes: list[Outcome]) -> None:
        observers = self.observers()
        if not observers:
            return
        from twisted_mta.pipeline import call_hook
        by_address = {r.address: r for r in entry.recipients}
        for outcome in outcomes:
            r = by_address.get(outcome.recipient)
            route = Route.from_dict(r.route) if r is not None and r.route else None
            for observer in observers:
                if r.state == DELIVERED:
                    call_hook(self.reactor, observer, "delivered", entry.id, r.mailbox, route, r.last_reply)
                elif r.state == DEFERRED:
                    call_hook(self.reactor, observer, "deferred", entry.id, r.mailbox, route,
                              r.last_reply, r.next_try)
                elif r.state == FAILED:
                    call_hook(self.reactor, observer, "bounced", entry.id, r.mailbox, route, r.last_reply)

    # --- queue control ------------------------------------------------------

    def flush(self, queue_id: str | None = None, domain: str | None = None) -> list[str]:
        """Make matching messages due now; returns their ids."""
        matched = []
        for entry in list(self.entries.values()):
            if queue_id is not None and entry.id != queue_id:
                continue
            if entry.held:  # as postqueue -f: held mail waits for a release
                continue
            rcpts = [r for r in entry.recipients if not r.final and (
                domain is None or r.mailbox.domain_key == domain.lower())]
            if not rcpts:
                continue
            for r in rcpts:
                r.next_try = 0.0
            matched.append(entry.id)
            self._schedule(entry)
        return matched

    def hold(self, queue_id: str) -> Deferred:
        entry = self.entries[queue_id]
        entry.held = True
        return self.spool.save(entry)

    def release(self, queue_id: str) -> Deferred:
        entry = self.entries[queue_id]
        entry.held = False
        if entry.done:
            # A DSN kept because it failed: released means tried again.
            for r in entry.recipients:
                if r.state == FAILED:
                    r.state, r.next_try = DEFERRED, 0.0
        d = self.spool.save(entry)
        d.addCallback(lambda _: self._schedule(entry))
        return d

    def delete(self, queue_id: str) -> Deferred:
        if queue_id not in self.entries:
            raise KeyError(queue_id)
        if queue_id in self.active:
            # It is being delivered: remove it once the attempt is recorded.
            self._doomed.add(queue_id)
            return succeed(None)
        return self._delete_now(queue_id)

    def _delete_now(self, queue_id: str) -> Deferred:
        self.entries.pop(queue_id, None)
        log.info("{id}: deleted by the administrator", id=queue_id)
        return self.spool.remove(queue_id)
