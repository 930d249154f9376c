"""
C{greylist}: make unknown senders try again (RFC 6647).

    [[filter]]
    use = "greylist"
    delay = 300          # seconds a new triplet must wait before a retry passes
    window = 86400       # seconds within which the retry must come
    lifetime = 2592000   # seconds a triplet that passed stays known (a month)
    allow = ["198.51.100.0/24"]   # networks never greylisted (besides [relay] networks)

The triplet is the client's network (the /24 of an IPv4 address, the /64
of an IPv6 one), the envelope sender and the recipient, all in lower case.
The first attempt of a new triplet gets C{451 4.7.1 <rcpt>: Greylisted,
please try again later} at RCPT; a retry after C{delay} and within
C{window} passes and the triplet is then known for C{lifetime} (renewed
by each message).  Authenticated clients, clients in the relay networks
and in C{allow} are never greylisted.

Time is the reactor's (C{context.reactor.seconds()}), so tests move it.
State is kept in memory, shared across reloads, and appended to
C{<spool>/state/greylist.log} as it changes (a page-cache write, no
fsync: losing the last seconds of it in a power cut only greylists a
client once more), so it survives restarts.  Expired triplets (pending
past C{window}, passed past C{lifetime}) leave memory as soon as they
expire and the server next looks a triplet up (see L{GreylistStore});
they leave the log when it is compacted: at start-up, and when it has
grown far past the live state.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import os
from pathlib import Path

from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.network import client_address
from twisted_mta.interfaces import IRcptFilter
from twisted_mta.values import Verdict

log = Logger()
GREYLISTED = "Greylisted, please try again later"


def client_network(ip: str) -> str:
    """The network a client is greylisted by: /24 for IPv4, /64 for IPv6."""
    address = client_address(ip)
    if address is None:
        return ip
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class GreylistStore:
    """
    Triplets: key -> [first_seen, passed_until or 0].  Changes are appended
    to a log file; L{load} replays and compacts it.

    Expired triplets are pruned as time goes on, not only when looked up:
    every change also goes on a heap ordered by when the triplet will
    expire, and L{prune} (called at each lookup, cheap when nothing is
    due) pops what is due, so the memory held is the live triplets plus a
    bounded number of stale heap records.  The log is rewritten without
    the dead when it has grown well past the live state (L{compact}).
    """

    def __init__(self, path: Path, lifetime: float, window: float):
        self.path = path
        self.lifetime, self.window = lifetime, window
        self.entries: dict[str, list[float]] = {}
        self._heap: list[tuple[float, str]] = []  # (expires, key), possibly stale
        self._appended = 0

    def load(self, now: float) -> None:
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        key, first, passed = json.loads(line)
                        value = [float(first), float(passed)]
                    except (ValueError, TypeError):
                        continue  # a torn last line after a crash
                    self.entries[str(key)] = value
        self.compact(now)

    def _expires(self, value: list[float]) -> float:
        first, passed = value
        return passed if passed else first + self.window

    def _expired(self, value: list[float], now: float) -> bool:
        return self._expires(value) < now

    def prune(self, now: float) -> int:
        """Forget every triplet that has expired by C{now}; how many went."""
        heap, entries, pruned = self._heap, self.entries, 0
        while heap and heap[0][0] < now:
            _, key = heapq.heappop(heap)
            value = entries.get(key)
            if value is not None and self._expired(value, now):
                del entries[key]
                pruned += 1
        return pruned

    def compact(self, now: float) -> None:
        """Drop expired triplets and rewrite the log with what is live."""
        self.entries = {k: v for k, v in self.entries.items() if not self._expired(v, now)}
        self._heap = [(self._expires(v), k) for k, v in self.entries.items()]
        heapq.heapify(self._heap)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for key, (first, passed) in self.entries.items():
                f.write(json.dumps([key, first, passed]) + "\n")
        os.replace(tmp, self.path)
        self._appended = 0

    def retime(self, lifetime: float, window: float, now: float) -> None:
        """New times (a reload): expiries change, so the heap is rebuilt."""
        if (lifetime, window) != (self.lifetime, self.window):
            self.lifetime, self.window = lifetime, window
            self.compact(now)

    def get(self, key: str, now: float) -> list[float] | None:
        self.prune(now)
        value = self.entries.get(key)
        if value is not None and self._expired(value, now):
            del self.entries[key]
            return None
        return value

    def put(self, key: str, first: float, passed: float, now: float) -> None:
        value = [first, passed]
        self.entries[key] = value
        heapq.heappush(self._heap, (self._expires(value), key))
        # Opened for each line: changes are few (a new triplet, a pass, an
        # hourly renewal), and no file stays open when the server stops.
        with open(self.path, "a") as f:
            f.write(json.dumps([key, first, passed]) + "\n")
        self._appended += 1
        if self._appended > 4 * len(self.entries) + 10000:
            self.compact(now)


def _seconds(name: str, value, positive: bool = False) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or value < 0 or (positive and value == 0)):
        raise ValueError(f"{name}: expected a {'positive ' if positive else ''}"
                         f"number of seconds, got {value!r}")
    return float(value)


@implementer(IRcptFilter)
class Greylist:
    def __init__(self, delay: float = 300, window: float = 86400, lifetime: float = 30 * 86400,
                 allow=(), context=None):
        self.delay = _seconds("delay", delay)
        self.window = _seconds("window", window, positive=True)
        self.lifetime = _seconds("lifetime", lifetime, positive=True)
        if self.window <= self.delay:
            raise ValueError(f"window: must be longer than delay ({window!r} <= {delay!r})")
        if isinstance(allow, str) or not isinstance(allow, (list, tuple)):
            raise ValueError(f"allow: expected a list of networks, got {allow!r}")
        skip = []
        for i, text in enumerate(allow, 1):
            try:
                skip.append(ipaddress.ip_network(text, strict=False))
            except (ValueError, TypeError):
                raise ValueError(f"allow[{i}]: not a network (CIDR): {text!r}")
        if context is None:
            raise ValueError("greylist needs the server's context (a state folder)")
        self.reactor = context.reactor
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self.skip = tuple(skip)
        if context.config is not None:
            self.skip += tuple(context.config.relay.networks)
        path = Path(context.state_folder) / "greylist.log"

        def make_store() -> GreylistStore:
            store = GreylistStore(path, self.lifetime, self.window)
            store.load(self.reactor.seconds())
            return store

        # One store per server (kept across reloads); a reload may change
        # the times, which then apply to the triplets already known.
        self.store = context.shared.get(("greylist", str(path)), make_store)
        self.store.retime(self.lifetime, self.window, self.reactor.seconds())

    def _skipped(self, session) -> bool:
        if session.user:
            return True
        ip = client_address(session.client_ip)
        return ip is not None and any(ip.version == net.version and ip in net
                                      for net in self.skip)

    def triplet(self, session, envelope, recipient) -> str:
        """The key a delivery attempt is greylisted by: network, sender, recipient."""
        return " ".join((client_network(session.client_ip),
                         str(envelope.sender or "").lower(), recipient.key))

    def rcpt(self, session, envelope, recipient):
        if self._skipped(session):
            return None
        now = self.reactor.seconds()
        key = self.triplet(session, envelope, recipient)
        value = self.store.get(key, now)
        if value is None:
            self.store.put(key, now, 0.0, now)
            log.info("greylist: new triplet {key}", key=key)
            return Verdict.tempfail(GREYLISTED, "4.7.1")
        first, passed = value
        if passed or now - first >= self.delay:
            if not passed:
                log.info("greylist: triplet {key} passed after {s:.0f} s", key=key, s=now - first)
            # Known for a lifetime from now: renewed by each message, but
            # written at most once an hour per triplet.
            if not passed or passed - now < self.lifetime - 3600:
                self.store.put(key, first, now + self.lifetime, now)
            return None
        return Verdict.tempfail(GREYLISTED, "4.7.1")
