"""
The MTA as a Twisted service: it owns the spool, the current pipeline, the
TLS options, the listeners and the delivery manager, and is the
L{ServerContext} every SMTP connection talks to.
"""

from __future__ import annotations

import signal
import threading

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_mta import loader
from twisted_mta import config as configmod
from twisted_mta.config import Config
from twisted_mta.control import ControlService, ControlStartupError
from twisted_mta.delivery.bounce import Bouncer
from twisted_mta.delivery.lmtp import LMTPAgent
from twisted_mta.delivery.maildir import MaildirAgent
from twisted_mta.delivery.manager import DeliveryManager
from twisted_mta.delivery.mx import MXResolver, make_resolver
from twisted_mta.delivery.smtp import SMTPAgent
from twisted_mta.smtp import tls as tlsmod
from twisted_mta.smtp.server import ConnectionCounter, ESMTPFactory, ServerContext
from twisted_mta.spool.store import Spool
from twisted_mta.values import SharedState

log = Logger()


def _reason(error: BaseException) -> str:
    """An error's text in one line, without the exception class noise."""
    text = getattr(error, "socketError", None) or error
    return " ".join(str(text).split()) or type(error).__name__


class StartupError(Exception):
    """The service cannot start; the text says why, in one line."""


class ReloadError(Exception):
    """A reload was refused; the text says why, in one line.  Nothing changed."""


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
        self.shared = SharedState()  # plugins' state, kept across reloads
        self.ports: list = []
        self._listened = False
        self.reload_notes: list[str] = []  # what the last reload could not apply
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

    def _mx_resolver(self, config: Config) -> MXResolver:
        return MXResolver(make_resolver(config.delivery.nameservers, self.reactor), self.reactor)

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

    def _tls_for(self, config: Config, old: Config | None = None):
        """The TLS options for C{config}; a generated certificate is kept across reloads."""
        if (old is not None and config.tls == old.tls and config.tls.certificate is None
                and config.hostname == old.hostname and self.tls_options is not None):
            return self.tls_options.options
        return self._load_tls(config)

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
        try:
            self.pipeline = loader.build_pipeline(self.config, generation=1, reactor=self.reactor,
                                                  shared=self.shared)
        except loader.PluginError as e:
            raise StartupError(str(e))
        self.tls_options = tlsmod.SwappableServerTLS(self._tls_for(self.config))
        if any(listen.auth != "none" for listen in self.config.listen):
            from twisted_mta.smtp.auth import Authenticator
            try:
                self.auth = Authenticator.from_config(self.config)
            except ValueError as e:
                raise StartupError(str(e))
        try:
            entries = self.spool.prepare()
        except OSError as e:
            raise StartupError(f"{self.config.file}: spool: cannot use {self.config.spool}: {e}")
        self.delivery.load(entries)
        if entries:
            log.info("spool: {n} queued messages recovered", n=len(entries))

    # --- reload -------------------------------------------------------------

    def reload(self) -> defer.Deferred:
        """
        Read the configuration file again, build a new pipeline (plugin code
        read afresh), new TLS options, and swap them in together, only if all
        of it built.  Fires with the new generation number, or fails with
        L{ReloadError} saying why; a failed reload changes nothing.
        Sessions keep the pipeline their transaction began with.
        """
        old = self.config
        try:
            if old.file == configmod.DEFAULT_FILE:
                new = configmod.default(old.folder)
            else:
                new = configmod.load(old.file)
            pipeline = loader.build_pipeline(new, self.pipeline.generation + 1, reactor=self.reactor,
                                              shared=self.shared)
            options = self._tls_for(new, old)
            if self.auth is not None and hasattr(self.auth, "reload"):
                self.auth.reload(new)
        except (configmod.ConfigError, loader.PluginError, StartupError, ValueError) as e:
            log.error("reload refused, generation {gen} keeps running: {why}",
                      gen=self.pipeline.generation, why=str(e))
            return defer.fail(ReloadError(str(e)))
        notes = self._unapplied(old, new)
        self.reload_notes = notes
        if new.delivery.nameservers != old.delivery.nameservers:
            self.smtp_agent.resolver = self._mx_resolver(new)
        self.config = new
        self.pipeline = pipeline
        self.tls_options.options = options
        for note in notes:
            log.warn("reload: {note}", note=note)
        log.info("reloaded: generation {gen} with filters {names}", gen=pipeline.generation,
                 names=[f.name for f in pipeline.filters] or "none")
        return defer.succeed(pipeline.generation)

    @staticmethod
    def _unapplied(old: Config, new: Config) -> list[str]:
        """What a reload cannot change while running: said, never silently ignored."""
        notes = []
        if old.listen != new.listen:
            notes.append("[[listen]] changed; listeners change only on restart")
        if old.spool != new.spool:
            notes.append("spool changed; the spool folder changes only on restart")
        if old.control != new.control:
            notes.append("control changed; the control endpoint changes only on restart")
        return notes

    def _sighup(self, signum, frame) -> None:
        self.reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        self.reload().addErrback(lambda f: None)  # reload() has logged why

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
        ports, self.ports = self.ports, []
        yield defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])
        self._listened = False
        yield super().stopService()
        yield defer.DeferredList([self.smtp_agent.stop(), self.lmtp_agent.stop()])
        self.spool.stop()
