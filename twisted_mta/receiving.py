"""
What every process that receives mail holds: the configuration, the
current pipeline, the TLS options, the AUTH side and the connection
counter, and how they are reloaded together.  L{MTAService} (the main
process) and L{twisted_mta.receiver.ReceiverService} (a receiving process
started by it) both build on L{ReceivingService}.
"""

from __future__ import annotations

from pathlib import Path

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta import config as configmod
from twisted_mta import loader
from twisted_mta.config import Config
from twisted_mta.smtp import tls as tlsmod
from twisted_mta.smtp.server import ConnectionCounter, ServerContext
from twisted_mta.values import SharedState

log = Logger()


class StartupError(Exception):
    """The service cannot start; the text says why, in one line."""


class ReloadError(Exception):
    """A reload was refused; the text says why, in one line.  Nothing changed."""


class ReceivingService(service.MultiService, ServerContext):
    """
    The receiving half of the MTA, as a L{ServerContext}.

    @ivar state_folder: the plugins' state folder in this process, or
        C{None} for C{<spool>/state}.
    """

    state_folder: Path | None = None
    #: (host name, key, chain) of the certificate generated when [tls] has none
    generated: tuple | None = None

    def __init__(self, config: Config, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.pipeline = None
        self.tls_options = None
        self.auth = None
        self.counter = ConnectionCounter()
        self.shared = SharedState()  # plugins' state, kept across reloads
        self.reload_notes: list[str] = []  # what the last reload could not apply
        self.ports: list = []  # the listening ports, in [[listen]] order

    # --- building -----------------------------------------------------------

    def _load_tls(self, config: Config):
        if config.tls.certificate is not None:
            try:
                key, chain = tlsmod.load_chain(config.tls.certificate, config.tls.key)
            except tlsmod.CertificateError as e:
                raise StartupError(f"{config.file}: tls: {e}")
        elif self.generated is not None and self.generated[0] == config.hostname:
            # One generated certificate for all processes of the server.
            _, key, chain = self.generated
        else:
            key, chain = tlsmod.self_signed(config.hostname)
            self.generated = (config.hostname, key, chain)
            log.warn("tls: no [tls] certificate configured; using a generated self-signed "
                     "certificate for {host}", host=config.hostname)
        return tlsmod.server_options(key, chain)

    def _tls_for(self, config: Config, old: Config | None = None):
        """The TLS options for C{config}; a generated certificate is kept across reloads."""
        if (old is not None and config.tls == old.tls and config.tls.certificate is None
                and config.hostname == old.hostname and self.tls_options is not None):
            return self.tls_options.options
        return self._load_tls(config)

    def _build_pipeline(self, config: Config, generation: int):
        return loader.build_pipeline(config, generation, reactor=self.reactor, shared=self.shared,
                                     state_folder=self.state_folder)

    def prepare_receiving(self, generation: int = 1) -> None:
        """
        Build the pipeline (generation C{generation}), the TLS options and
        the AUTH side.  Raises L{StartupError} with the reason.
        """
        try:
            self.pipeline = self._build_pipeline(self.config, generation)
        except loader.PluginError as e:
            raise StartupError(str(e))
        self.tls_options = tlsmod.SwappableServerTLS(self._tls_for(self.config))
        if any(listen.auth != "none" for listen in self.config.listen):
            from twisted_mta.smtp.auth import Authenticator
            try:
                self.auth = Authenticator.from_config(self.config)
            except ValueError as e:
                raise StartupError(str(e))

    def stop_listening(self) -> defer.Deferred:
        """Close every listening port; fires once all are closed."""
        ports, self.ports = self.ports, []
        return defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])

    # --- reload -------------------------------------------------------------

    def reload(self, generation: int | None = None) -> defer.Deferred:
        """
        Read the configuration file again, build a new pipeline (plugin code
        read afresh), new TLS options, and swap them in together, only if all
        of it built.  Fires with the new generation number (C{generation},
        or the next one), or fails with L{ReloadError} saying why; a failed
        reload changes nothing.  Sessions keep the pipeline their
        transaction began with.
        """
        old = self.config
        if generation is None:
            generation = self.pipeline.generation + 1
        try:
            if old.file == configmod.DEFAULT_FILE:
                new = configmod.default(old.folder)
            else:
                new = configmod.load(old.file)
            pipeline = self._build_pipeline(new, generation)
            options = self._tls_for(new, old)
            if self.auth is not None and hasattr(self.auth, "reload"):
                self.auth.reload(new)
        except (configmod.ConfigError, loader.PluginError, StartupError, ValueError) as e:
            log.error("reload refused, generation {gen} keeps running: {why}",
                      gen=self.pipeline.generation, why=str(e))
            return defer.fail(ReloadError(str(e)))
        notes = self._unapplied(old, new)
        self.reload_notes = notes
        self._reconfigured(old, new)
        self.config = new
        self.pipeline = pipeline
        self.tls_options.options = options
        for note in notes:
            log.warn("reload: {note}", note=note)
        log.info("reloaded: generation {gen} with filters {names}", gen=pipeline.generation,
                 names=[f.name for f in pipeline.filters] or "none")
        return defer.succeed(pipeline.generation)

    def _reconfigured(self, old: Config, new: Config) -> None:
        """A reload is about to swap C{new} in: adjust what depends on it."""

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
        if old.spool_sync != new.spool_sync:
            notes.append("spool_sync changed; it changes only on restart")
        if old.receivers != new.receivers:
            notes.append("receivers changed; the number of receivers changes only on restart")
        return notes

    def _sighup(self, signum, frame) -> None:
        self.reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        self.reload().addErrback(lambda f: None)  # reload() has logged why
