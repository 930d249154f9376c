"""
A receiving process: C{python -m twisted_mta.receiver}, started by the
main process (L{twisted_mta.receivers.ReceiverPool}) when the
configuration says C{receivers = N}; never by hand.

It serves the SMTP sessions the main process accepts and hands to it
over a Unix socket (file descriptor 3; see L{twisted_mta.handoff}), runs
the same pipeline as a single process would, and commits messages to the
same spool.  It talks to the main process over its standard input and
output, one line per record:

    to the main process                    from the main process
    ready <generation>                     reload <generation>
    committing <id>                        (end of input: stop)
    queued <entry JSON>
    aborted <id>
    closed <client ip>    (a session ended)
    reloaded <generation> | refused <why>
    log <level> <text>

C{committing} comes before a message's commit begins and C{queued} after
it is durable (before the client's 250), so that if this process dies in
between, the main process knows which ids to look for in the spool.  Lines
are written together, up to L{REPORT_DELAY} after the first: one wake-up of
the main process for several (what a death leaves unsaid, the main
process's sweep of the spool finds).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from twisted.internet import defer, protocol, stdio
from twisted.logger import LogLevel, eventAsText, globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory

from twisted_mta import config as configmod
from twisted_mta.handoff import HandoffReceiver, peer_ip
from twisted_mta.logs import message_text
from twisted_mta.receiving import ReceivingService, ReloadError, StartupError
from twisted_mta.smtp.server import ConnectionCounter, ESMTPFactory
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
    are being committed, so none is lost if this process dies mid-commit,
    and then what was queued (before the client's 250).
    """

    def __init__(self, spool: Spool, channel: "MainChannel"):
        self._spool = spool
        self._channel = channel

    def __getattr__(self, name):
        return getattr(self._spool, name)

    def commit(self, incoming, entry):
        self._channel.send(b"committing " + incoming.id.encode("ascii"))
        envelope = entry.to_json()  # once, for the spool and the main process
        d = self._spool.commit(incoming, entry, envelope)

        def done(result):
            self._channel.send(b"queued " + envelope)
            return result

        def failed(failure):
            self._channel.send(b"aborted " + incoming.id.encode("ascii"))
            return failure

        return d.addCallbacks(done, failed)


class _ReportingCounter(ConnectionCounter):
    """Tells the main process when a session ends, so it knows this receiver's load."""

    def __init__(self, channel: "MainChannel"):
        super().__init__()
        self._channel = channel

    def remove(self, ip: str) -> None:
        super().remove(ip)
        self._channel.send(b"closed " + ip.encode("ascii", "replace"))


class _HandedOverFactory(ESMTPFactory):
    """
    An L{ESMTPFactory} that also heeds the main process's count of the
    connections open in all receivers: a connection it says is over a
    C{[limits]} limit gets the same 421 as one over this process's own.
    """

    #: what the main process said of the connection being adopted now
    over = 0

    def admit(self, proto):
        refusal = super().admit(proto)
        if refusal is None and self.over:
            refusal = self.refusal(proto, self.over, None)
        return refusal


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

    def __init__(self, config, channel: "MainChannel", handoff_fd: int, index: int,
                 reactor=None):
        super().__init__(config, reactor)
        self.channel = channel
        self.counter = _ReportingCounter(channel)
        self.handoff_fd = handoff_fd
        self.handoff = None
        self.factories: list = []
        self.index = index
        self.state_folder = state_folder(config.spool, index)
        self.raw_spool = Spool(config.spool, self.reactor, sync=config.spool_sync)
        self.spool = _ReportingSpool(self.raw_spool, channel)
        self.generated = _generated_from_environment()

    def queued(self, entry) -> None:
        """Nothing to do: L{_ReportingSpool.commit} has told the main process."""

    def take_connections(self) -> None:
        """Serve the connections the main process hands over the handoff socket."""
        self.factories = []
        for listen in self.config.listen:
            factory = _HandedOverFactory(self, listen, self.counter)
            self.factories.append((factory, TLSMemoryBIOFactory(self.tls_options, False, factory)
                                   if listen.tls == "implicit" else factory))
        self.handoff = HandoffReceiver(self._adopt, self._handoff_lost)
        self.reactor.adoptStreamConnection(
            self.handoff_fd, socket.AF_UNIX, _OneProtocol(self.handoff))
        os.close(self.handoff_fd)  # adoptStreamConnection made its own copy

    def _adopt(self, fd: int, listen_index: int, over: int) -> None:
        probe = socket.socket(fileno=fd)
        try:
            family, ip = probe.family, peer_ip(probe)
        finally:
            probe.detach()
        try:
            if listen_index >= len(self.factories):
                # The main process listens as its configuration said at its
                # start; ours was read later and has fewer [[listen]] tables.
                raise ValueError(f"a connection from [[listen]] number {listen_index + 1}, "
                                 f"but {self.config.file} has {len(self.factories)}")
            smtp, outer = self.factories[listen_index]
            smtp.over = over  # adoptStreamConnection calls admit() before it returns
            try:
                self.reactor.adoptStreamConnection(fd, family, outer)
            finally:
                smtp.over = 0
        except Exception:
            # It never became a session: the main process must not count it.
            self.channel.send(b"closed " + ip.encode("ascii", "replace"))
            raise

    def _handoff_lost(self) -> None:
        self.handoff = None

    def stop_listening(self) -> defer.Deferred:
        """Take no more connections: close our end of the handoff socket."""
        if self.handoff is not None and self.handoff.transport is not None:
            self.handoff.transport.loseConnection()
        return super().stop_listening()

    @defer.inlineCallbacks
    def stopService(self):
        yield self.stop_listening()
        yield super().stopService()
        self.raw_spool.stop()


class _OneProtocol(protocol.Factory):
    """The factory C{adoptStreamConnection} wants, for one given protocol."""

    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto


#: How long the lines to the main process wait to go together (seconds).
#: Each write wakes the main process: ~75 us of this process's CPU on the
#: development VM, and a reactor turn there.  What waits is what the main
#: process learns late (a message to deliver, a log line, a session's
#: end); a death in between loses nothing (the main process's sweep).
REPORT_DELAY = 0.005


class MainChannel(LineOnlyReceiver):
    """
    This process's side of the lines to and from the main process.  Lines
    sent go together, up to L{REPORT_DELAY} after the first, in the order
    sent; L{flush} writes them now.
    """

    delimiter = b"\n"
    MAX_LENGTH = 65536
    service: ReceiverService | None = None

    def __init__(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._held: list[bytes] = []
        self._flush_call = None
        self._holding = True

    def send(self, line: bytes) -> None:
        self.write(line + b"\n")

    def write(self, data: bytes) -> None:
        """Write C{data} (whole lines) with the others held, within L{REPORT_DELAY}."""
        self._held.append(data)
        if self._flush_call is None:
            if self._holding:
                self._flush_call = self._reactor.callLater(REPORT_DELAY, self.flush)
            else:
                self.flush()

    def stop_holding(self) -> None:
        """From now on, write each line at once (and what is held now)."""
        self._holding = False
        self.flush()

    def flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._held and self.transport is not None:
            data, self._held = b"".join(self._held), []
            self.transport.write(data)

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
        self.channel.write(b"".join(
            prefix + line.encode("utf-8", "replace") + b"\n" for line in text.splitlines() or [""]))


def main(argv: list[str] | None = None, reactor=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twisted_mta.receiver")
    parser.add_argument("--config", help="the configuration file")
    parser.add_argument("--default-folder", help="run the embedded default with this folder")
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--handoff", type=int, default=3,
                        help="the Unix socket the main process hands connections over")
    args = parser.parse_args(argv)
    if reactor is None:
        from twisted.internet import reactor
    try:
        cfg = (configmod.load(args.config) if args.config
               else configmod.default(args.default_folder))
    except configmod.ConfigError as e:
        print(f"twisted-mta receiver: {e}", file=sys.stderr)
        return 2
    channel = MainChannel(reactor)
    stdio.StandardIO(channel, reactor=reactor)
    globalLogBeginner.beginLoggingTo([LogForwarder(channel)], redirectStandardIO=False,
                                     discardBuffer=True)
    from twisted_mta.smtp import server as servermod
    servermod.session_id_prefix = f"{args.index}."
    svc = ReceiverService(cfg, channel, args.handoff, args.index, reactor)
    try:
        svc.prepare_receiving(args.generation)
        svc.take_connections()
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
    # From the stop on, lines go at once: the last turns must not hold any.
    reactor.addSystemEventTrigger("before", "shutdown", channel.stop_holding)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
