"""
Delivery by LMTP (RFC 2033), to a local mail store such as Dovecot: the
route's C{endpoint} is a Twisted client endpoint string
(C{unix:/run/dovecot/lmtp}, C{tcp:127.0.0.1:24}).

LHLO, MAIL, one RCPT per recipient (pipelined when offered), DATA, and
one reply per accepted recipient after the data, each deciding its
recipient.  No STARTTLS and no AUTH: LMTP is spoken to a local server.
A connection that cannot be made or a refused LHLO defers every
recipient.  Connections are kept for the next delivery as the SMTP
agent does (see L{twisted_mta.delivery.smtp}).
"""

from __future__ import annotations

from twisted.internet.endpoints import clientFromString
from zope.interface import implementer

from twisted_mta.delivery.agent import DEFERRED, IDeliveryAgent, Outcome
from twisted_mta.delivery.smtp import PooledAgent
from twisted_mta.smtp.client import HopError, Session, Timeouts


@implementer(IDeliveryAgent)
class LMTPAgent(PooledAgent):
    """Delivers to an LMTP server; see the module docstring."""

    async def _deliver(self, entry, route, recipients) -> list[Outcome]:
        cfg = self.config()
        addresses = [r.address for r in recipients]
        key = ("lmtp", route.endpoint)
        remote = route.endpoint
        reused = await self._reuse(key, entry, addresses)
        if reused is not None:
            results, session = reused
        else:
            try:
                session = await self._open(route, cfg)
            except HopError as e:
                return [Outcome(a, DEFERRED, e.reply, remote) for a in addresses]
            results = await self._send(session, entry, addresses)
        self._keep(key, session)
        return [Outcome(a, r.status, r.reply, remote) for a, r in zip(addresses, results)]

    async def _open(self, route, cfg) -> Session:
        timeouts = Timeouts.from_config(cfg.delivery)
        peer = route.endpoint
        try:
            endpoint = clientFromString(self.reactor, route.endpoint)
        except Exception as e:
            raise HopError(f"451 4.3.5 bad LMTP endpoint {route.endpoint!r}: {e}")
        protocol = await self._connect(endpoint, timeouts, peer, None)
        session = Session(protocol, peer, cfg.hostname, timeouts, lmtp=True)
        session.opened_at = self.reactor.seconds()
        session.remote = peer
        try:
            await session.open()
        except HopError:
            self._release(session)
            raise
        return session
