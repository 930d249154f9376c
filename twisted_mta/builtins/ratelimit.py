"""
C{ratelimit}: limits per client IP, envelope sender, authenticated user
or recipient domain, over sliding windows.

    [[filter]]
    use = "ratelimit"

    [[filter.rules]]
    key = "ip"               # ip | sender | user | recipient_domain
    count = "connections"    # connections | messages | recipients
    limit = 60
    window = 60              # seconds (default: 60 for connections, 3600 otherwise)

    [[filter.rules]]
    key = "user"
    count = "recipients"
    limit = 2000

What is counted where: connections at connect (key C{ip} only), messages
at MAIL, recipients at each RCPT.  Over a limit, a connection gets
C{421} and is closed; a message or recipient gets C{451 4.7.1 Rate limit
exceeded: too many ...}, so well-behaved clients retry later.  Refused
attempts are not counted.  C{ip} rules skip authenticated sessions
(users often share an address: C{user} rules limit them); C{sender} and
C{recipient_domain} rules count every session.

Windows slide: the count is the current fixed window's plus the previous
one's weighted by how much of it still overlaps (the usual sliding-window
counter), two numbers per key, so a flood of distinct keys costs little.
Counters live in memory and are kept across reloads (not restarts).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.interfaces import IConnectFilter, IMailFilter, IRcptFilter
from twisted_mta.values import Verdict

log = Logger()
KEYS = ("ip", "sender", "user", "recipient_domain")
COUNTS = ("connections", "messages", "recipients")
#: The window of a rule that names none: connections per minute, the rest per hour.
DEFAULT_WINDOW = {"connections": 60, "messages": 3600, "recipients": 3600}
MAX_KEYS = 200_000  # per rule; beyond it, the least recently seen go first


@dataclass(frozen=True)
class Rule:
    key: str
    count: str
    limit: int
    window: float

    @property
    def id(self) -> tuple:
        return (self.key, self.count, self.window)


def _rule(table, i: int) -> Rule:
    where = f"rules[{i}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table")
    table = dict(table)
    key, count = table.pop("key", None), table.pop("count", None)
    if key not in KEYS:
        raise ValueError(f"{where}.key: expected one of {', '.join(KEYS)}, got {key!r}")
    if count not in COUNTS:
        raise ValueError(f"{where}.count: expected one of {', '.join(COUNTS)}, got {count!r}")
    if count == "connections" and key != "ip":
        raise ValueError(f"{where}: connections can only be counted per ip")
    if count == "messages" and key == "recipient_domain":
        raise ValueError(f"{where}: messages are counted at MAIL, before any recipient; "
                         "count recipients per recipient_domain")
    limit = table.pop("limit", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"{where}.limit: expected a positive whole number, got {limit!r}")
    window = table.pop("window", DEFAULT_WINDOW[count])
    if isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0:
        raise ValueError(f"{where}.window: expected a positive number of seconds, got {window!r}")
    for extra in table:
        raise ValueError(f"{where}.{extra}: unknown key")
    return Rule(key, count, int(limit), float(window))


class SlidingCounter:
    """Counts per key over a sliding window of C{window} seconds."""

    def __init__(self, window: float):
        self.window = window
        self.slots: dict[str, list[float]] = {}  # key -> [window start, current, previous]

    def value(self, key: str, now: float) -> float:
        slot = self._slot(key, now)
        elapsed = (now - slot[0]) / self.window
        return slot[1] + slot[2] * max(0.0, 1.0 - elapsed)

    def add(self, key: str, now: float) -> None:
        self._slot(key, now)[1] += 1

    def _slot(self, key: str, now: float) -> list[float]:
        start = now - (now % self.window)
        slot = self.slots.pop(key, None)  # re-inserted last: dicts keep insertion order
        if slot is None:
            slot = [start, 0.0, 0.0]
        elif slot[0] != start:
            previous = slot[1] if start - slot[0] == self.window else 0.0
            slot = [start, 0.0, previous]
        self.slots[key] = slot
        if len(self.slots) > MAX_KEYS:
            del self.slots[next(iter(self.slots))]
        return slot


@implementer(IConnectFilter, IMailFilter, IRcptFilter)
class RateLimit:
    def __init__(self, rules=(), context=None):
        self.rules = tuple(_rule(r, i) for i, r in enumerate(rules, 1))
        if not self.rules:
            raise ValueError("rules: give at least one [[filter.rules]] table")
        reactor = context.reactor if context is not None else None
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        shared = context.shared if context is not None else None
        self.counters = {
            rule.id: (shared.get(("ratelimit",) + rule.id, lambda w=rule.window: SlidingCounter(w))
                      if shared is not None else SlidingCounter(rule.window))
            for rule in self.rules
        }

    def _key(self, rule: Rule, session, envelope=None, recipient=None) -> str | None:
        if rule.key == "user":
            return session.user.lower() if session.user else None
        if rule.key == "ip":
            # Authenticated users often share an address (a NAT, a
            # webmail host): their own limits are the user rules.
            return None if session.user else session.client_ip
        if rule.key == "sender":
            return str(envelope.sender or "").lower() if envelope is not None else None
        return recipient.domain_key if recipient is not None else None

    def _check(self, count: str, session, envelope=None, recipient=None):
        """
        Count one C{count} for every rule it falls under, unless one of
        them is over its limit: then nothing is counted and the answer is
        that rule and key.  Rules that share a counter (same key, count
        and window) count once.
        """
        now = self.reactor.seconds()
        hits = {}
        for rule in self.rules:
            if rule.count != count:
                continue
            key = self._key(rule, session, envelope, recipient)
            if key is None:
                continue
            counter = self.counters[rule.id]
            if counter.value(key, now) + 1 > rule.limit:
                log.info("ratelimit: {count} per {what} {key} over {limit} in {window:.0f} s "
                         "session={sid}", count=count, what=rule.key, key=key or "<>",
                         limit=rule.limit, window=rule.window, sid=session.id)
                return rule, key
            hits[(rule.id, key)] = counter
        for (_, key), counter in hits.items():
            counter.add(key, now)
        return None

    @staticmethod
    def _text(rule: Rule, key: str) -> str:
        whose = {"ip": f"from {key}", "sender": f"from <{key}>", "user": f"from user {key}",
                 "recipient_domain": f"to {key}"}[rule.key]
        return f"Rate limit exceeded: too many {rule.count} {whose}, try again later"

    def connect(self, session):
        over = self._check("connections", session)
        if over:
            return Verdict.tempfail(f"Too many connections from {session.client_ip}, "
                                    "try again later", "4.7.0")
        return None

    def mail(self, session, envelope):
        over = self._check("messages", session, envelope)
        if over:
            return Verdict.tempfail(self._text(*over), "4.7.1")
        return None

    def rcpt(self, session, envelope, recipient):
        over = self._check("recipients", session, envelope, recipient)
        if over:
            return Verdict.tempfail(self._text(*over), "4.7.1")
        return None
