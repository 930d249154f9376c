"""
The MTA as a Twisted service: it owns the spool, the current pipeline, the
TLS options, the listeners and the delivery manager, and is the
L{ServerContext} every SMTP connection talks to.  With C{receivers = N}
in the configuration, N receiving processes (L{ReceiverPool}) take the
connections instead and hand it what they queue; it keeps the spool's
start-up, delivery, bounces and the control endpoint.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_mta import logs
from twisted_mta.config import Config
from twisted_mta.control import ControlService, ControlStartupError
from twisted_mta.delivery.bounce import Bouncer
from twisted_mta.delivery.lmtp import LMTPAgent
from twisted_mta.delivery.maildir import MaildirAgent
from twisted_mta.delivery.manager import DeliveryManager
from twisted_mta.delivery.mx import MXResolver, make_resolver
from twisted_mta.delivery.smtp import SMTPAgent
from twisted_mta.receivers import ReceiverPool
from twisted_mta.receiving import ReceivingService, ReloadError, StartupError
from twisted_mta.smtp.server import ESMTPFactory
from twisted_mta.spool.store import Spool

__all__ = ["MTAService", "StartupError", "ReloadError"]

log = Logger()


def _reason(error: BaseException) -> str:
    """An error's text in one line, without the exception class noise."""
    text = getattr(error, "socketError", None) or error
    return " ".join(str(text).split()) or type(error).__name__


class MTAService(ReceivingService):
    # twistd's own options, set by tap.makeService when twistd runs it
    twistd_options = None

    def __init__(self, config: Config, reactor=None):
        super().__init__(config, reactor)
        reactor = self.reactor
        if config.receivers:
            # The receivers' plugins use <spool>/state; the copies this
            # process builds (for routing and delivery observers) must not
            # write over their files.
            self.state_folder = Path(config.spool) / "state" / "main"
        self.spool = Spool(config.spool, reactor, sync=config.spool_sync)
        self._listened = False
        self.smtp_agent = SMTPAgent(self.spool, self._mx_resolver(config), lambda: self.config,
                                    reactor)
        self.lmtp_agent = LMTPAgent(self.spool, lambda: self.config, reactor)
        self.agents = {"maildir": MaildirAgent(self.spool, reactor), "smtp": self.smtp_agent,
                       "mx": self.smtp_agent, "lmtp": self.lmtp_agent}
        self.delivery = DeliveryManager(
            self.spool, lambda: self.pipeline, lambda: self.config, self.agents, reactor,
            observers=lambda: self.pipeline.observers if self.pipeline else ())
        self.delivery.bouncer = Bouncer(self.spool, self.delivery.enqueue, lambda: self.config,
                                        reactor)
        self.delivery.setServiceParent(self)
        self.control = ControlService(self, reactor)
        self.control.setServiceParent(self)
        self.receivers = None
        if config.receivers:
            self.receivers = ReceiverPool(self, config.receivers, reactor)
            self.receivers.setServiceParent(self)

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        # twistd gives us its application before it starts logging: a
        # cheaper observer for the same lines (twisted_mta.logs).
        logs.install(parent, self.twistd_options, self.reactor)

    def _mx_resolver(self, config: Config) -> MXResolver:
        return MXResolver(make_resolver(config.delivery.nameservers, self.reactor), self.reactor)

    # --- ServerContext ------------------------------------------------------

    def queued(self, entry) -> None:
        self.delivery.enqueue(entry)

    def received(self, entry) -> None:
        """
        A receiver queued C{entry} (or it was found after a receiver died):
        deliver it, unless it is known already.
        """
        if entry.id not in self.delivery.entries:
            self.delivery.enqueue(entry)

    # --- start and reload ---------------------------------------------------

    def prepare(self) -> None:
        """
        Everything that can fail before the server listens: the control
        socket (another server on this spool?), certificates, the users
        file, plugins, the spool.  Raises L{StartupError} with the reason.
        """
        try:
            self.control.prepare()
        except ControlStartupError as e:
            raise StartupError(str(e))
        self.prepare_receiving()
        try:
            entries = self.spool.prepare()
        except OSError as e:
            raise StartupError(f"{self.config.file}: spool: cannot use {self.config.spool}: {e}")
        self.delivery.load(entries)
        if entries:
            log.info("spool: {n} queued messages recovered", n=len(entries))

    def reload(self, generation: int | None = None) -> defer.Deferred:
        """
        L{ReceivingService.reload}; once this process has reloaded, the
        receivers are told to, to the same generation.
        """
        d = super().reload(generation)
        if self.receivers is not None:
            d.addCallback(self.receivers.reload)
        return d

    def _reconfigured(self, old: Config, new: Config) -> None:
        if new.delivery.nameservers != old.delivery.nameservers:
            self.smtp_agent.resolver = self._mx_resolver(new)

    def privilegedStartService(self) -> None:
        # twistd calls this before dropping privileges: listen here, so
        # ports below 1024 work, and so that a port that cannot be had
        # stops start-up with one line rather than a server without ears.
        if self.pipeline is None:
            self.prepare()
        try:
            self.listen()
        except StartupError as e:
            raise SystemExit(f"twisted-mta: {e}")
        super().privilegedStartService()

    def listen(self) -> None:
        """
        Listen on every C{[[listen]]} endpoint, in order (L{ports}).  Raises
        L{StartupError} naming the endpoint when one cannot listen, after
        closing those already open.
        """
        if self._listened:
            return
        self._listened = True
        for i, listen in enumerate(self.config.listen, 1):
            factory = ESMTPFactory(self, listen, self.counter)
            if listen.tls == "implicit":
                factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
            endpoint = endpoints.serverFromString(self.reactor, listen.endpoint)
            d = endpoint.listen(factory)
            if not d.called:  # an endpoint that listens later: log its outcome
                d.addCallbacks(self._listening, self._listen_failed,
                               callbackArgs=(listen,), errbackArgs=(listen,))
                continue
            result = []
            d.addBoth(result.append)
            if isinstance(result[0], Failure):
                for port in self.ports:
                    port.stopListening()
                self.ports = []
                raise StartupError(f"{self.config.file}: listen[{i}].endpoint: cannot listen on "
                                   f"{listen.endpoint}: {_reason(result[0].value)}")
            self._listening(result[0], listen)
        if self.receivers is not None:
            # The receiver pool accepts on these sockets and hands each
            # connection to a receiver; no session runs in this process.
            for port in self.ports:
                port.stopReading()

    def startService(self) -> None:
        if self.pipeline is None:
            self.prepare()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, self._sighup)
        self.listen()
        super().startService()

    def _listening(self, port, listen) -> None:
        self.ports.append(port)
        log.info("listening on {endpoint} (tls={tls}, auth={auth})",
                 endpoint=listen.endpoint, tls=listen.tls, auth=listen.auth)

    def _listen_failed(self, failure, listen) -> None:
        log.error("cannot listen on {endpoint}: {why}", endpoint=listen.endpoint,
                  why=_reason(failure.value))
        # Without its listeners the MTA is useless: stop, and say why.
        if self.reactor.running:
            self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        if self.receivers is not None:
            self.receivers.stop_accepting()  # before the sockets close
        yield self.stop_listening()
        self._listened = False
        yield super().stopService()
        yield defer.DeferredList([self.smtp_agent.stop(), self.lmtp_agent.stop()])
        self.spool.stop()
