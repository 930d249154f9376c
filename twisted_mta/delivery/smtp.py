"""
Delivery by SMTP: to the recipient domain's MX hosts (C{via = "mx"}) or
to a smart host (C{via = "smtp"}), with the client in
L{twisted_mta.smtp.client}.

How an attempt goes (Postfix's rules where the issue is silent):

  - An idle connection to the same next hop (as L{Route.nexthop} names
    it, with the same TLS policy and user) is used first.  If it turns out
    dead before the MAIL command is answered, a new one is made.
  - Otherwise the next hop's addresses are looked up: C{hops(domain,
    port)} for C{mx} (MX by preference, then A/AAAA; a permanent DNS
    failure, such as NXDOMAIN or a null MX, fails the recipients),
    C{host(name, port)} for a smart host (any DNS failure defers: a broken
    relay host setting must not bounce mail).
  - The addresses are tried in order, at most L{SMTPAgent.max_hops} of
    them.  A hop that cannot be reached, times out, greets with anything
    but 2xx or refuses EHLO/STARTTLS/AUTH is skipped.  A hop that answers
    decides each recipient it gives a final answer (2xx, 5xx); those it
    defers (4xx, or a connection lost) are offered to the next hop, up to
    L{SMTPAgent.max_sessions} hops that completed the handshake.  What is
    still deferred at the end carries the last reason.
  - C{tls = "opportunistic"}: when the TLS handshake itself fails (the
    connection is gone then), the same hop is tried once more, in
    plaintext (see L{Session.open}).
  - After a transaction the connection is kept (ended with an RSET, which
    goes with the next transaction's MAIL when the server offers
    PIPELINING: see L{Session.reset}) for L{SMTPAgent.idle_timeout}
    seconds for the next delivery to the same next hop; at most C{max_per_destination} idle connections
    per next hop (the manager already caps concurrent deliveries per next
    hop at the same number, and an idle connection is always taken before
    a new one is made, so the connections to one next hop never exceed
    it).  A connection is used for at most L{SMTPAgent.reuse_limit}
    transactions and L{SMTPAgent.reuse_time_limit} seconds.

The message is read from the spool in the spool's I/O thread, in batches
of about L{SpoolSource.batch} bytes, while the previous batch is on its
way (the first while the commands before the data are): never all of a
large message in memory, never a blocking read on the reactor thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, error as ierror
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.delivery.agent import DEFERRED, FAILED, IDeliveryAgent, Outcome
from twisted_mta.smtp.client import (
    ClientProtocol, Credentials, HopError, Result, Session, StaleConnection, Timeouts,
    client_tls_options, trust_root_from_pem,
)

log = Logger()


class SpoolSource:
    """
    A L{MessageSource} over L{Spool.read_message}: each L{read} pulls about
    L{batch} bytes from the spool's generator in the spool's I/O thread
    (L{Spool.run_io}).  The first batch is asked for as soon as the source
    is made: it is read while MAIL, RCPT and DATA are on their way, and
    the reads of the deliveries started in one reactor turn (the messages
    of one group commit) share one thread hand-off, which was a tenth of
    the reactor's time per relayed message when each had its own.
    """

    batch = 256 * 1024

    def __init__(self, spool, entry):
        self.spool, self.entry = spool, entry
        self._it = None
        self._done = False
        self._ahead: defer.Deferred | None = self.spool.run_io(self._read)

    def read(self) -> defer.Deferred:
        if self._ahead is not None:
            d, self._ahead = self._ahead, None
            return d
        if self._done:
            return defer.succeed(b"")
        return self.spool.run_io(self._read)

    def _read(self) -> bytes:
        if self._it is None:
            self._it = self.spool.read_message(self.entry)
        out, n = [], 0
        for chunk in self._it:
            out.append(chunk)
            n += len(chunk)
            if n >= self.batch:
                break
        else:
            self._done = True
        return b"".join(out)

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            self._close()
            return
        # The batch read ahead was not wanted (the transaction ended
        # before the data): close once that read is over.  Its error, if
        # any, concerns no one now.
        ahead.addBoth(lambda _: self._close())

    def _close(self) -> None:
        it, self._it = self._it, None
        if it is not None and not self._done:
            self.spool.run_io(it.close).addErrback(
                lambda f: log.failure("closing a queue file", f))
        self._done = True


def message_size(entry) -> int:
    """The size to announce with SIZE=: the message and the header fields added to it."""
    return entry.size + sum(len(f"{n}: {v}\r\n".encode("utf-8")) for n, v in entry.add_headers)


def connect_error(peer: str, port: int | None, e: BaseException) -> str:
    """Postfix-like text for a failed connection attempt."""
    if isinstance(e, ierror.ConnectionRefusedError):
        why = "Connection refused"
    elif isinstance(e, (ierror.TimeoutError, ierror.ConnectingCancelledError, defer.TimeoutError,
                        defer.CancelledError, TimeoutError)):
        why = "Connection timed out"
    elif isinstance(e, ierror.NoRouteError):
        why = "No route to host"
    else:
        why = str(e) or e.__class__.__name__
    where = peer if port is None else f"{peer}:{port}"
    return f"451 4.4.1 connect to {where}: {why}"


@dataclass(eq=False)
class _Idle:
    session: Session
    timer: object = None
    since: float = 0.0


class PooledAgent:
    """
    What the SMTP and LMTP agents share: the pool of idle connections per
    next hop, the transaction over a session, and L{stop}.
    """

    idle_timeout = 5.0
    reuse_limit = 1000
    reuse_time_limit = 300.0

    def __init__(self, spool, config, reactor=None, threadpool=None):
        if reactor is None:
            from twisted.internet import reactor
        self.spool = spool
        self.config = config
        self.reactor = reactor
        self.threadpool = threadpool or reactor.getThreadPool()
        self._idle: dict[tuple, list[_Idle]] = {}
        self._stopped = False
        self.connections_made = 0
        self.busy = 0  # sessions in use by a delivery (connecting, or in a transaction)

    # --- the agent ----------------------------------------------------------

    def deliver(self, entry, route, recipients) -> defer.Deferred:
        recipients = list(recipients)
        self._stopped = False
        d = defer.Deferred.fromCoroutine(self._deliver(entry, route, recipients))

        def oops(failure):
            log.failure("{id}: delivery by {via} failed", failure, id=entry.id, via=route.via)
            return [Outcome(r.address, DEFERRED, f"451 4.3.0 local error in delivery: "
                                                 f"{failure.getErrorMessage()}") for r in recipients]

        return d.addErrback(oops)

    async def _deliver(self, entry, route, recipients) -> list[Outcome]:
        raise NotImplementedError

    def stop(self) -> defer.Deferred:
        """Close the idle connections (QUIT); fires when they are gone."""
        self._stopped = True
        ds = []
        for items in self._idle.values():
            for item in items:
                if item.timer is not None and item.timer.active():
                    item.timer.cancel()
                ds.append(item.session.quit())
        self._idle.clear()
        return defer.DeferredList(ds)

    # --- the pool -----------------------------------------------------------

    def idle_count(self, key=None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def _take(self, key) -> Session | None:
        items = self._idle.get(key)
        while items:
            item = items.pop()
            if item.timer is not None and item.timer.active():
                item.timer.cancel()
            if not items:
                self._idle.pop(key, None)
            if item.session.usable:
                self.busy += 1
                return item.session
            item.session.abort()
        return None

    def _make_room(self) -> None:
        """
        Before a new connection: close the oldest idle connections (to other
        next hops) while the connections in use and idle would otherwise
        exceed C{max_connections}.
        """
        limit = self.config().delivery.max_connections
        while self._idle and self.busy + self.idle_count() >= limit:
            oldest_key, oldest = None, None
            for key, items in self._idle.items():
                if items and (oldest is None or items[0].since < oldest.since):
                    oldest_key, oldest = key, items[0]
            if oldest is None:
                break
            self._drop(oldest_key, oldest)
            oldest.session.quit()

    def _keep(self, key, session: Session) -> None:
        """Keep C{session} for the next delivery to C{key}, or say QUIT."""
        self.busy -= 1
        limit = self.config().delivery.max_per_destination
        items = self._idle.setdefault(key, [])
        if (self._stopped or not session.usable or session.transactions >= self.reuse_limit
                or self.reactor.seconds() - session.opened_at >= self.reuse_time_limit
                or len(items) >= limit):
            if not items:
                self._idle.pop(key, None)
            session.quit()
            return
        session.reset()
        item = _Idle(session, since=self.reactor.seconds())
        item.timer = self.reactor.callLater(self.idle_timeout, self._expire, key, item)
        items.append(item)
        if getattr(session, "_pool_item", None) is None:
            # One watcher per connection: whichever idle entry it has when it is lost goes.
            session.protocol.lost.addCallback(lambda _: self._drop(*session._pool_item)
                                              if session._pool_item else None)
        session._pool_item = (key, item)

    def _drop(self, key, item: _Idle) -> None:
        items = self._idle.get(key)
        if items and item in items:
            items.remove(item)
            if item.timer is not None and item.timer.active():
                item.timer.cancel()
            if not items:
                self._idle.pop(key, None)

    def _expire(self, key, item: _Idle) -> None:
        item.timer = None
        self._drop(key, item)
        item.session.quit()

    # --- a transaction --------------------------------------------------------

    def _source(self, entry) -> SpoolSource:
        return SpoolSource(self.spool, entry)

    async def _send(self, session: Session, entry, addresses: list[str]) -> list[Result]:
        return await session.send(entry.sender, addresses, self._source(entry), size=message_size(entry),
                                  body=entry.body, smtputf8=entry.smtputf8)

    async def _reuse(self, key, entry, addresses) -> tuple[list[Result], Session] | None:
        """The transaction over an idle connection to C{key}, if there is one that works."""
        while True:
            session = self._take(key)
            if session is None:
                return None
            try:
                results = await self._send(session, entry, addresses)
            except StaleConnection:
                self.busy -= 1
                session.abort()
                continue
            return results, session

    async def _connect(self, endpoint, timeouts: Timeouts, peer: str, port: int | None) -> ClientProtocol:
        """
        Connect (within the connect timeout); the caller owns a busy slot
        from now on and gives it back with L{_keep} or L{_release}, which
        C{_open} does when the session cannot be opened.
        """
        self._make_room()
        protocol = ClientProtocol(self.reactor, timeouts.greeting)
        d = endpoint.connect(_OneShot(protocol))
        d.addTimeout(timeouts.connect, self.reactor)
        try:
            await d
        except Exception as e:
            raise HopError(connect_error(peer, port, e))
        self.connections_made += 1
        self.busy += 1
        return protocol

    def _release(self, session: Session) -> None:
        """A session that will not be kept: QUIT, and give back its busy slot."""
        self.busy -= 1
        session.quit()



class _OneShot(Factory):
    """
    Hands out one protocol already made (as C{connectProtocol} does, but
    quietly, and without a new class per connection).
    """

    noisy = False

    def __init__(self, protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


@implementer(IDeliveryAgent)
class SMTPAgent(PooledAgent):
    """
    Delivers by SMTP to MX hosts and smart hosts; see the module docstring.
    C{resolver} is an L{twisted_mta.delivery.mx.MXResolver} (C{hops},
    C{host}); C{config} a callable giving the current L{Config}.
    """

    max_hops = 5       # Postfix: smtp_mx_address_limit
    max_sessions = 2   # Postfix: smtp_mx_session_limit

    def __init__(self, spool, resolver, config, reactor=None, threadpool=None):
        super().__init__(spool, config, reactor, threadpool)
        self.resolver = resolver
        self._trust = None  # (config, path, trust root)

    @staticmethod
    def _key(route, domain: str) -> tuple:
        return (route.nexthop(domain), route.tls, route.username)

    async def _deliver(self, entry, route, recipients) -> list[Outcome]:
        cfg = self.config()
        addresses = [r.address for r in recipients]
        n = len(addresses)
        domain = recipients[0].mailbox.domain_key
        key = self._key(route, domain)

        reused = await self._reuse(key, entry, addresses)
        if reused is not None:
            results, session = reused
            self._keep(key, session)
            remote = session.remote
            return [Outcome(a, r.status, r.reply, remote) for a, r in zip(addresses, results)]

        try:
            if route.via == "mx":
                hops = await self.resolver.hops(domain, route.port)
            else:
                hops = await self.resolver.host(route.host, route.port)
        except Exception as e:
            permanent = bool(getattr(e, "permanent", False)) and route.via == "mx"
            reply = getattr(e, "reply", None) or f"451 4.4.3 cannot find the next hop: {e}"
            return [Outcome(a, FAILED if permanent else DEFERRED, reply) for a in addresses]
        if not hops:
            name = domain if route.via == "mx" else route.host
            return [Outcome(a, DEFERRED, f"451 4.4.3 no address found for {name}") for a in addresses]

        results: list[Result | None] = [None] * n
        remotes: list[str | None] = [None] * n
        last = "451 4.4.1 no next hop could be reached"
        sessions = 0
        for hop in hops[:self.max_hops]:
            todo = [i for i in range(n) if results[i] is None or results[i].status == DEFERRED]
            if not todo:
                break
            remote = f"{hop.name}[{hop.address}]:{hop.port}"
            try:
                session = await self._open(hop, route, cfg)
            except HopError as e:
                log.info("{id}: {remote}: {reply}", id=entry.id, remote=remote, reply=e.reply)
                last = e.reply
                for i in todo:
                    results[i], remotes[i] = Result(DEFERRED, e.reply), remote
                if e.answered:
                    sessions += 1
                    if sessions >= self.max_sessions:
                        break
                continue
            sub = await self._send(session, entry, [addresses[i] for i in todo])
            for i, r in zip(todo, sub):
                results[i], remotes[i] = r, remote
                if r.status == DEFERRED:
                    last = r.reply
            self._keep(key, session)
            sessions += 1
            if sessions >= self.max_sessions:
                break
        return [Outcome(a, r.status, r.reply, rem) if r is not None else Outcome(a, DEFERRED, last)
                for a, r, rem in zip(addresses, results, remotes)]

    async def _open(self, hop, route, cfg) -> Session:
        """A session with C{hop}, greeted, with TLS and AUTH as the route says. Raises L{HopError}."""
        timeouts = Timeouts.from_config(cfg.delivery)
        peer = f"{hop.name}[{hop.address}]"
        credentials = None
        if route.username:
            credentials = Credentials(route.username, await self._password(route))
        tls = route.tls
        name = hop.name if route.via == "mx" else route.host
        while True:
            options = self._tls_options(tls, name, cfg) if tls != "none" else None
            endpoint = (TCP6ClientEndpoint if ":" in hop.address else TCP4ClientEndpoint)(
                self.reactor, hop.address, hop.port, timeout=timeouts.connect)
            protocol = await self._connect(endpoint, timeouts, peer, hop.port)
            session = Session(protocol, peer, cfg.hostname, timeouts)
            session.opened_at = self.reactor.seconds()
            session.remote = f"{peer}:{hop.port}"
            try:
                await session.open(tls, options, credentials)
            except HopError as e:
                self._release(session)
                if e.tls_failed and tls == "opportunistic":
                    log.info("{peer}: {reply}; trying again without TLS", peer=peer, reply=e.reply)
                    tls = "none"
                    continue
                raise
            return session

    async def _password(self, route) -> str:
        def read() -> str:
            with open(route.password_file, encoding="utf-8") as f:
                return f.readline().strip()

        try:
            return await deferToThreadPool(self.reactor, self.threadpool, read)
        except (OSError, UnicodeDecodeError) as e:
            raise HopError(f"451 4.7.0 cannot read the password for {route.host} from "
                           f"{route.password_file}: {getattr(e, 'strerror', None) or e}")

    def _tls_options(self, mode: str, name: str, cfg):
        trust = None
        if mode == "verify" and cfg.delivery.ca_file is not None:
            path = Path(cfg.delivery.ca_file)
            if self._trust is None or self._trust[0] is not cfg or self._trust[1] != path:
                try:
                    self._trust = (cfg, path, trust_root_from_pem(path.read_bytes()))
                except (OSError, ValueError) as e:
                    raise HopError(f"451 4.7.5 cannot read delivery.ca_file {path}: {e}")
            trust = self._trust[2]
        return client_tls_options(mode, name, trust)
