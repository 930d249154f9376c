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
The first attempt of a new triplet gets C{451 4.7.1 Greylisted, please
try again later}; a retry after C{delay} and within C{window} passes and
the triplet is then known for C{lifetime} (renewed by each message).
Authenticated clients, clients in the relay networks and in C{allow}
are never greylisted.

State is kept in memory, shared across reloads, and appended to
C{<spool>/state/greylist.log} as it changes (a page-cache write, no
fsync: losing the last seconds of it in a power cut only greylists a
client once more), so it survives restarts; the log is compacted, and
expired entries pruned, when the state is loaded at start-up and when
the log has grown far past the live state.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.interfaces import IRcptFilter
from twisted_mta.values import Verdict

log = Logger()
GREYLISTED = "Greylisted, please try again later"


def client_network(ip: str) -> str:
    """The network a client is greylisted by: /24 for IPv4, /64 for IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class GreylistStore:
    """
    Triplets: key -> [first_seen, passed_until or 0].  Changes are appended
    to a log file; L{load} replays and compacts it.
    """

    def __init__(self, path: Path, lifetime: float, window: float):
        self.path = path
        self.lifetime, self.window = lifetime, window
        self.entries: dict[str, list[float]] = {}
        self._appended = 0
        self._file = None

    def load(self, now: float) -> None:
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        key, first, passed = json.loads(line)
                    except (ValueError, TypeError):
                        continue  # a torn last line after a crash
                    self.entries[key] = [first, passed]
        self.compact(now)

    def _expired(self, value: list[float], now: float) -> bool:
        first, passed = value
        return (passed < now) if passed else (first + self.window < now)

    def compact(self, now: float) -> None:
        """Drop expired triplets and rewrite the log with what is live."""
        self.entries = {k: v for k, v in self.entries.items() if not self._expired(v, now)}
        if self._file is not None:
            self._file.close()
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for key, (first, passed) in self.entries.items():
                f.write(json.dumps([key, first, passed]) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)
        self._appended = 0

    def get(self, key: str, now: float) -> list[float] | None:
        value = self.entries.get(key)
        if value is not None and self._expired(value, now):
            del self.entries[key]
            return None
        return value

    def put(self, key: str, first: float, passed: float, now: float) -> None:
        self.entries[key] = [first, passed]
        self._file.write(json.dumps([key, first, passed]) + "\n")
        self._appended += 1
        if self._appended > 4 * len(self.entries) + 10000:
            self.compact(now)


@implementer(IRcptFilter)
class Greylist:
    def __init__(self, delay: float = 300, window: float = 86400, lifetime: float = 30 * 86400,
                 allow=(), context=None):
        for name, value in (("delay", delay), ("window", window), ("lifetime", lifetime)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}: expected a number of seconds, got {value!r}")
        if window <= delay:
            raise ValueError("window must be longer than delay")
        self.delay, self.window, self.lifetime = float(delay), float(window), float(lifetime)
        if context is None:
            raise ValueError("greylist needs the server's context (a state folder)")
        self.reactor = context.reactor
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self.skip = tuple(ipaddress.ip_network(n, strict=False) for n in allow)
        if context.config is not None:
            self.skip += tuple(context.config.relay.networks)
        path = Path(context.state_folder) / "greylist.log"

        def make_store() -> GreylistStore:
            store = GreylistStore(path, self.lifetime, self.window)
            store.load(self.reactor.seconds())
            return store

        self.store = context.shared.get(("greylist", str(path)), make_store)
        self.store.lifetime, self.store.window = self.lifetime, self.window

    def _skipped(self, session) -> bool:
        if session.user:
            return True
        try:
            ip = ipaddress.ip_address(session.client_ip)
        except ValueError:
            return False
        return any(ip in net for net in self.skip)

    def rcpt(self, session, envelope, recipient):
        if self._skipped(session):
            return None
        now = self.reactor.seconds()
        key = " ".join((client_network(session.client_ip),
                        str(envelope.sender or "").lower(), recipient.key))
        value = self.store.get(key, now)
        if value is None:
            self.store.put(key, now, 0.0, now)
            log.info("greylist: new triplet {key}", key=key)
            return Verdict.tempfail(GREYLISTED, "4.7.1")
        first, passed = value
        if passed or now - first >= self.delay:
            if not passed or passed - now < self.lifetime - 3600:
                self.store.put(key, first, now + self.lifetime, now)
            return None
        return Verdict.tempfail(GREYLISTED, "4.7.1")
