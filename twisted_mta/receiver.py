"""
A receiving process: C{python -m twisted_mta.receiver}, started by the
main process (L{twisted_mta.receivers.ReceiverPool}) when the
configuration says C{receivers = N}; never by hand.

It accepts SMTP sessions on listening sockets it inherits (file
descriptors 3, 4, ... in C{[[listen]]} order), runs the same pipeline as
a single process would, and commits messages to the same spool.  It
talks to the main process over its standard input and output, one line
per record:

    to the main process                    from the main process
    ready <generation>                     reload <generation>
    committing <id>                        (end of input: stop)
    queued <entry JSON>
    aborted <id>
    reloaded <generation> | refused <why>
    log <level> <text>

C{committing} comes before a message's commit begins and C{queued} after
it is durable (before the client's 250), so that if this process dies in
between, the main process knows which ids to look for in the spool.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from twisted.internet import defer, stdio
from twisted.logger import LogLevel, eventAsText, globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_mta import config as configmod
from twisted_mta.logs import message_text
from twisted_mta.receiving import ReceivingService, ReloadError, StartupError
from twisted_mta.smtp.server import ESMTPFactory
from twisted_mta.spool.store import Spool


def state_folder(spool: Path, index: int) -> Path | None:
    """
    Receiver C{index}'s plugin state folder: the first uses C{<spool>/state}
    as a single process would (its state carries over both ways), the
    others their own, so that no two processes write one file.
    """
    return None if index == 1 else Path(spool) / "state" / f"receiver-{index}"


class _ReportingSpool:
    """
    The spool as the server sees it, saying to the main process which ids
    are being committed, so none is lost if this process dies mid-commit.
    """

    def __init__(self, spool: Spool, channel: "MainChannel"):
        self._spool = spool
        self._channel = channel

    def __getattr__(self, name):
        return getattr(self._spool, name)

    def commit(self, incoming, entry):
        self._channel.send(b"committing " + incoming.id.encode("ascii"))
        d = self._spool.commit(incoming, entry)

        def failed(failure):
            self._channel.send(b"aborted " + incoming.id.encode("ascii"))
            return failure

        return d.addErrback(failed)


def _generated_from_environment() -> tuple | None:
    """The main process's generated certificate, if it passed one (and forget it)."""
    from twisted_mta.receivers import GENERATED_TLS
    text = os.environ.pop(GENERATED_TLS, None)
    if not text:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    host, _, pem = text.partition("\n")
    data = pem.encode("ascii")
    return (host, serialization.load_pem_private_key(data, password=None),
            x509.load_pem_x509_certificates(data))


class ReceiverService(ReceivingService):
    """One receiving process's server context: queued mail is reported, not delivered."""

    def __init__(self, config, channel: "MainChannel", fds: list[int], index: int, reactor=None):
        super().__init__(config, reactor)
        self.channel = channel
        self.fds = fds
        self.index = index
        self.state_folder = state_folder(config.spool, index)
        self.raw_spool = Spool(config.spool, self.reactor, sync=config.spool_sync)
        self.spool = _ReportingSpool(self.raw_spool, channel)
        self.generated = _generated_from_environment()

    def queued(self, entry) -> None:
        self.channel.send(b"queued " + entry.to_json())

    def adopt(self) -> None:
        """Accept on the inherited listening sockets, one per C{[[listen]]}."""
        if len(self.fds) != len(self.config.listen):
            raise StartupError(f"{self.config.file}: given {len(self.fds)} listening sockets "
                               f"for {len(self.config.listen)} [[listen]] tables")
        for fd, listen in zip(self.fds, self.config.listen):
            probe = socket.socket(fileno=fd)
            family = probe.family
            probe.detach()
            factory = ESMTPFactory(self, listen, self.counter)
            if listen.tls == "implicit":
                factory = TLSMemoryBIOFactory(self.tls_options, False, factory)
            self.ports.append(self.reactor.adoptStreamPort(fd, family, factory))
            os.close(fd)  # adoptStreamPort made its own copy

    @defer.inlineCallbacks
    def stopService(self):
        yield self.stop_listening()
        yield super().stopService()
        self.raw_spool.stop()


class MainChannel(LineOnlyReceiver):
    """This process's side of the lines to and from the main process."""

    delimiter = b"\n"
    MAX_LENGTH = 65536
    service: ReceiverService | None = None

    def send(self, line: bytes) -> None:
        self.transport.write(line + b"\n")

    def lineReceived(self, line: bytes) -> None:
        verb, _, argument = line.decode("utf-8", "replace").partition(" ")
        if verb == "reload" and self.service is not None:
            generation = int(argument) if argument.isdigit() else None
            self.service.reload(generation).addCallbacks(
                lambda gen: self.send(b"reloaded %d" % gen),
                lambda failure: self.send(
                    b"refused " + str(failure.value).encode("utf-8", "replace"))
                if failure.check(ReloadError) else failure)

    def connectionLost(self, reason) -> None:
        # The main process is gone (or told us to stop): finish and exit.
        from twisted.internet import reactor
        if reactor.running:
            reactor.stop()


class LogForwarder:
    """
    A log observer sending each event to the main process as C{log} lines
    (one per line of text), which logs them under this receiver's name.
    """

    def __init__(self, channel: MainChannel):
        self.channel = channel

    def __call__(self, event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        text = message_text(event)  # the cheap way, for plain "{name}" formats
        if text is None:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        prefix = b"log " + level.name.encode("ascii") + b" "
        self.channel.transport.write(b"".join(
            prefix + line.encode("utf-8", "replace") + b"\n" for line in text.splitlines() or [""]))


def main(argv: list[str] | None = None, reactor=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twisted_mta.receiver")
    parser.add_argument("--config", help="the configuration file")
    parser.add_argument("--default-folder", help="run the embedded default with this folder")
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--fds", default="", help="listening sockets, in [[listen]] order")
    args = parser.parse_args(argv)
    if reactor is None:
        from twisted.internet import reactor
    try:
        cfg = (configmod.load(args.config) if args.config
               else configmod.default(args.default_folder))
    except configmod.ConfigError as e:
        print(f"twisted-mta receiver: {e}", file=sys.stderr)
        return 2
    channel = MainChannel()
    stdio.StandardIO(channel, reactor=reactor)
    globalLogBeginner.beginLoggingTo([LogForwarder(channel)], redirectStandardIO=False,
                                     discardBuffer=True)
    fds = [int(fd) for fd in args.fds.split(",") if fd]
    from twisted_mta.smtp import server as servermod
    servermod.session_id_prefix = f"{args.index}."
    svc = ReceiverService(cfg, channel, fds, args.index, reactor)
    try:
        svc.prepare_receiving(args.generation)
        svc.adopt()
    except StartupError as e:
        print(f"twisted-mta receiver: {e}", file=sys.stderr)
        return 2
    channel.service = svc
    # The main process stops us with SIGTERM (Twisted's handler stops the
    # reactor) or by closing our input, and reloads us by a line: a SIGHUP
    # or SIGINT (Ctrl-C) sent to the whole process group is the main
    # process's to act on.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    svc.startService()
    channel.send(b"ready %d" % svc.pipeline.generation)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
