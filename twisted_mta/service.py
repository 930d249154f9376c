"""
The MTA as a Twisted service: it owns the spool, the current pipeline, the
TLS options, the listeners and the delivery manager, and is the
L{ServerContext} every SMTP connection talks to.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_mta import loader
from twisted_mta.config import Config
from twisted_mta.delivery.maildir import MaildirAgent
from twisted_mta.delivery.manager import DeliveryManager
from twisted_mta.smtp import tls as tlsmod
from twisted_mta.smtp.server import ConnectionCounter, ESMTPFactory, ServerContext
from twisted_mta.spool.store import Spool

log = Logger()


class StartupError(Exception):
    """The service cannot start; the text says why, in one line."""


class MTAService(service.MultiService, ServerContext):
    def __init__(self, config: Config, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.spool = Spool(config.spool, reactor)
        self.pipeline = None
        self.tls_options = None
        self.auth = None
        self.counter = ConnectionCounter()
        self.ports: list = []
        self.agents = {"maildir": MaildirAgent(self.spool, reactor)}
        self.delivery = DeliveryManager(
            self.spool, lambda: self.pipeline, lambda: self.config, self.agents, reactor,
            observers=lambda: self.pipeline.observers if self.pipeline else ())
        self.delivery.setServiceParent(self)

    # --- ServerContext ------------------------------------------------------

    def queued(self, entry) -> None:
        self.delivery.enqueue(entry)

    # --- start and stop -----------------------------------------------------

    def _load_tls(self, config: Config):
        if config.tls.certificate is not None:
            try:
                key, chain = tlsmod.load_chain(config.tls.certificate, config.tls.key)
            except tlsmod.CertificateError as e:
                raise StartupError(f"{config.file}: tls: {e}")
        else:
            key, chain = tlsmod.self_signed(config.hostname)
            log.warn("tls: no [tls] certificate configured; using a generated self-signed "
                     "certificate for {host}", host=config.hostname)
        return tlsmod.server_options(key, chain)

    def prepare(self) -> None:
        """
        Everything that can fail before the server listens: certificates,
        plugins, the spool.  Raises L{StartupError} with the reason.
        """
        try:
            self.pipeline = loader.build_pipeline(self.config, generation=1, reactor=self.reactor)
        except loader.PluginError as e:
            raise StartupError(str(e))
        self.tls_options = self._load_tls(self.config)
        try:
            entries = self.spool.prepare()
        except OSError as e:
            raise StartupError(f"{self.config.file}: spool: cannot use {self.config.spool}: {e}")
        self.delivery.load(entries)
        if entries:
            log.info("spool: {n} queued messages recovered", n=len(entries))

    def startService(self) -> None:
        if self.pipeline is None:
            self.prepare()
        for listen in self.config.listen:
            factory = ESMTPFactory(self, listen, self.counter)
            if listen.tls == "implicit":
                factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
            endpoint = endpoints.serverFromString(self.reactor, listen.endpoint)
            d = endpoint.listen(factory)
            d.addCallback(self._listening, listen)
            d.addErrback(self._listen_failed, listen)
        super().startService()

    def _listening(self, port, listen) -> None:
        self.ports.append(port)
        log.info("listening on {endpoint} (tls={tls}, auth={auth})",
                 endpoint=listen.endpoint, tls=listen.tls, auth=listen.auth)

    def _listen_failed(self, failure, listen) -> None:
        log.failure("cannot listen on {endpoint}", failure, endpoint=listen.endpoint)
        # Without its listeners the MTA is useless: stop, and say why.
        if self.reactor.running:
            self.reactor.stop()

    @defer.inlineCallbacks
    def stopService(self):
        ports, self.ports = self.ports, []
        yield defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])
        yield super().stopService()
        self.spool.stop()
