"""
The ESMTP server protocol (RFC 5321), with PIPELINING (RFC 2920), SIZE
(RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), ENHANCEDSTATUSCODES
(RFC 2034), CHUNKING (RFC 3030) and STARTTLS (RFC 3207).

One L{ESMTPServer} per connection.  Commands are parsed by
L{twisted_mta.smtp.grammar} and answered strictly in the order they came,
one at a time: while a command waits on a plugin, the protocol stops
reading from the transport, so a pipelining client can make it buffer no
more than one read.  Bodies are streamed to the spool as they arrive,
through the sans-IO readers of L{twisted_mta.smtp.data}.

The protocol sees the rest of the server only through its factory's
C{context} (see L{ServerContext}): the configuration, the current
pipeline, the spool, the TLS options and whom to tell of a queued message.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import interfaces as ti
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta.config import Config, ListenConfig
from twisted_mta.smtp import grammar, replies as R
from twisted_mta.smtp.data import ChunkReader, DataReader, NewlineFilter
from twisted_mta.smtp.grammar import Address, GrammarError
from twisted_mta.smtp.replies import Reply, refusal_reply
from twisted_mta.smtp.tls import tls_info
from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.values import (
    CONTINUE, Action, AddHeader, Envelope, Message, RemoveHeader, RewriteRecipient,
    RewriteSender, Session, SetRoute, Verdict, parse_headers,
)
from twisted_mta.writenow import write_now

log = Logger()

#: Replies held while a pipeline is handled, at most (then written).
REPLIES_HELD = 16

#: Input read and held while a command waits on a Deferred (a slow filter,
#: a message's commit), at most, in bytes: beyond, the transport is paused.
#: Pausing at once cost two epoll_ctl calls and a reactor event for every
#: message committed, while a client that waits for its reply sends nothing.
HELD_INPUT = 16384

HEADER_CAPTURE_LIMIT = 65536  # header bytes kept in memory for data filters
_date_cache: tuple[int, str] = (-1, "")


def _date_now() -> str:
    """RFC 5322 date of this second, for Received (formatted once a second)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, localtime=True))
    return _date_cache[1]


_session_counter = 0
#: Put before every session id of this process: a receiver's number and a
#: dot (twisted_mta.receiver), so that ids are unique across processes.
session_id_prefix = ""


def _then(result: Any, callback: Callable[[Any], Any]) -> Any:
    """
    C{callback(result)} now if C{result} is a value, or when it fires if it
    is a Deferred: for the pipeline's answers (L{Pipeline.ask_now}), which
    are plain values whenever no plugin had to be waited for.
    """
    if isinstance(result, Deferred):
        return result.addCallback(callback)
    return callback(result)


def _next_session_id() -> str:
    global _session_counter
    _session_counter += 1
    return f"{session_id_prefix}{_session_counter:x}"


class ServerContext:
    """
    What a server protocol needs from the rest of the MTA.  The service
    provides one; tests build their own.

    @ivar config: the current L{Config}.
    @ivar pipeline: the current L{Pipeline}.
    @ivar spool: the L{Spool}.
    @ivar tls_options: server TLS options, or C{None} when TLS is off.
    @ivar reactor: the reactor (for timeouts).
    @ivar auth: C{None}, or the SMTP AUTH side, which the protocol asks:
        C{ehlo_lines(proto)} (extra EHLO lines, e.g. C{AUTH PLAIN LOGIN}),
        C{check_mail(proto)} (a refusal L{Reply} for MAIL, or C{None}),
        C{mail_params(proto)} (MAIL parameters it takes, e.g. C{{"AUTH"}})
        and C{command(proto, argument)} (handles AUTH like a handler; it
        may set C{proto.line_hook} to read the client's next lines).
    """

    config: Config
    pipeline: Any
    spool: Any
    tls_options: Any
    reactor: Any
    auth: Any = None

    def queued(self, entry: QueueEntry) -> None:
        """A message was accepted: C{entry} is durable in the spool."""


@dataclass
class Transaction:
    """The mail transaction in progress (from MAIL to the end of the body)."""

    pipeline: Any
    envelope: Envelope
    routes: dict[str, dict] = field(default_factory=dict)
    originals: dict[str, str] = field(default_factory=dict)
    discarded: set[str] = field(default_factory=set)
    incoming: Any = None
    newlines: NewlineFilter | None = None
    size: int = 0
    too_big: bool = False
    head: bytes = b""
    head_done: bool = False
    received: bytes = b""  # our Received field, written before the message
    bdat: bool = False
    failed: Reply | None = None  # set when a BDAT chunk went wrong

    def abort(self) -> None:
        if self.incoming is not None:
            self.incoming.abort()
            self.incoming = None


@implementer(ti.IPushProducer, ti.IHandshakeListener)
class ESMTPServer(Protocol):
    """
    One SMTP session.  See the module docstring.  Handlers are methods
    C{smtp_<VERB>(argument)} returning a L{Reply}, or a Deferred that fires
    with one, or C{None} when they have answered themselves.
    """

    def __init__(self, context: ServerContext, listen: ListenConfig):
        self.context = context
        self.listen = listen
        self._buffer = b""
        self._pos = 0
        self._discarding = False  # inside an overlong line
        self._reader: DataReader | ChunkReader | None = None
        self._busy = False  # a command is waiting on a Deferred
        self._processing = False  # inside _process
        #: replies made inside _process, sent together when it returns
        self._out: list[bytes] = []
        self._pauses: set[str] = set()
        self._transport_paused = False
        self._closed = False
        self._greeted = False
        self._rejected_connect = False
        self._chunk_last = False
        self._chunk_refusal: Reply | None = None
        self._errors = 0
        self._timeout = None
        self.txn: Transaction | None = None
        #: Set by a multi-line exchange (AUTH): called with the next raw
        #: line (bytes, without CRLF) instead of the command parser; it
        #: returns what a handler returns.
        self.line_hook: Callable[[bytes], Any] | None = None
        self.session: Session | None = None
        self.counts: dict[str, int] = {}
        self._tls_started = False
        self._awaiting_handshake = False

    # --- connection ---------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.context.config

    @property
    def hostname(self) -> str:
        return self.context.config.hostname

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        # On an implicit-TLS listener (RFC 8314) the handshake has not
        # happened yet: the connect stage and the greeting wait for it
        # (handshakeCompleted), so plugins, logs and the Received header
        # see the TLS the client really uses.
        self._awaiting_handshake = (self.listen.tls == "implicit"
                                    and ti.ISSLTransport.providedBy(self.transport))
        self.session = Session(
            id=_next_session_id(),
            client_ip=getattr(peer, "host", "") or "",
            client_port=getattr(peer, "port", 0) or 0,
            server_ip=getattr(host, "host", "") or "",
            server_port=getattr(host, "port", 0) or 0,
            listener=self.listen.endpoint,
            tls=None if self._awaiting_handshake else tls_info(self.transport),
        )
        self.transport.registerProducer(self, True)
        self._reset_timeout()
        log.info("connect from [{ip}]:{port} session={sid}",
                 ip=self.session.client_ip, port=self.session.client_port, sid=self.session.id)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._send(refusal)
            return self._close()
        if not self._awaiting_handshake:
            self._connect_stage()

    def handshakeCompleted(self) -> None:
        """
        IHandshakeListener: TLS is up, after STARTTLS or on an implicit-TLS
        listener.  From now on the session says which TLS it runs under.
        """
        if self._closed:
            return
        self.session = self.session.evolve(tls=tls_info(self.transport))
        if self._awaiting_handshake:
            self._awaiting_handshake = False
            self._connect_stage()

    def _connect_stage(self) -> None:
        """Ask the connect hooks, then greet; nothing is read until then."""
        self._pause("greeting")
        d = self.session_pipeline().ask("connect", self.session)
        d.addCallback(self._greet)
        d.addErrback(self._internal_error)

    def _greet(self, verdict: Verdict) -> None:
        if self._closed:
            return
        self._resume("greeting")
        self._greeted = True
        if verdict.action in (Action.TEMPFAIL, Action.DISCONNECT):
            self._send(Reply(421, "4.7.0", f"{self.hostname} {verdict.text or 'Service not available, closing transmission channel'}"))
            return self._close()
        if verdict.action is Action.REJECT:
            # RFC 5321 3.1: a 554 greeting, then only QUIT is accepted.
            self._rejected_connect = True
            self._send(Reply(554, None, f"{self.hostname} {verdict.text or 'Access denied'}"))
        else:
            self._send(Reply(220, None, f"{self.hostname} ESMTP twisted-mta"))
        self._process()

    def connectionLost(self, reason: Failure = None) -> None:
        self._closed = True
        self._cancel_timeout()
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self.factory.release(self)
        if self.session is not None:
            summary = " ".join(f"{k.lower()}={v}" for k, v in self.counts.items())
            log.info("disconnect from [{ip}] session={sid} {summary}",
                     ip=self.session.client_ip, sid=self.session.id, summary=summary)

    def session_pipeline(self):
        return self.txn.pipeline if self.txn is not None else self.context.pipeline

    # --- flow control -------------------------------------------------------

    def _pause(self, reason: str) -> None:
        """
        Stop handling input for C{reason}.  For a command waiting on a
        Deferred, input is still read and held, up to L{HELD_INPUT}
        (L{dataReceived} pauses the transport beyond); for any other
        reason the transport is paused now.
        """
        self._pauses.add(reason)
        if reason != "command":
            self._pause_transport()

    def _pause_transport(self) -> None:
        if not self._transport_paused and not self._closed:
            self._transport_paused = True
            self.transport.pauseProducing()

    def _resume(self, reason: str) -> None:
        self._pauses.discard(reason)
        if not self._pauses and self._transport_paused and not self._closed:
            self._transport_paused = False
            self.transport.resumeProducing()

    # IPushProducer: the transport tells us when its write buffer is full,
    # which happens when a client pipelines and never reads the replies.
    # Commands already buffered then wait too: answering them would only
    # fill the buffer further.
    def pauseProducing(self) -> None:
        self._pause("writes")

    def resumeProducing(self) -> None:
        self._resume("writes")
        self._process()

    def stopProducing(self) -> None:
        self._closed = True

    # --- timeouts -----------------------------------------------------------

    def _reset_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.reset(self.config.limits.command_timeout)
        else:
            self._timeout = self.context.reactor.callLater(
                self.config.limits.command_timeout, self._timed_out)

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def _timed_out(self) -> None:
        self._timeout = None
        if self._busy:
            # The client is waiting for us (a plugin, the spool), not idle:
            # those waits have bounds of their own.  The clock starts
            # again, from now.
            return self._reset_timeout()
        log.info("timeout after {what} from [{ip}] session={sid}",
                 what="DATA" if self._reader else "command",
                 ip=self.session.client_ip, sid=self.session.id)
        self._send(Reply(421, "4.4.2", f"{self.hostname} Error: timeout exceeded"))
        self._close()

    # --- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._reset_timeout()
        if not self._greeted:
            # Talking before the greeting: a pipelining violation that
            # only spam engines commit (Postfix postscreen's pregreet test).
            return self._sync_error(len(data))
        if self._pos:
            self._buffer = self._buffer[self._pos:] + data
            self._pos = 0
        elif self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        if self._pauses and len(self._buffer) - self._pos > HELD_INPUT:
            self._pause_transport()
        self._process()

    def _process(self) -> None:
        """
        Handle what is buffered, until it runs out, a command must wait or
        the transport cannot take more replies.  Never re-entered: a call
        made while it runs (a Deferred that fired at once, a resume) is
        left to the loop already running.
        """
        if self._processing:
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
            self._flush()

    def _process_buffer(self) -> None:
        while not self._pauses and not self._closed and self._greeted:
            if self._reader is not None:
                if self._pos >= len(self._buffer):
                    break
                data = self._buffer[self._pos:] if self._pos else self._buffer
                self._buffer, self._pos = b"", 0
                self._body(data)
                continue
            end = self._buffer.find(b"\n", self._pos)
            if end < 0:
                pending = len(self._buffer) - self._pos
                if pending > self._line_limit(self._buffer[self._pos:self._pos + 5]):
                    self._discarding = True
                    self._buffer, self._pos = b"", 0
                break
            line = self._buffer[self._pos:end + 1]
            self._pos = end + 1
            if self._pos == len(self._buffer):
                self._buffer, self._pos = b"", 0
            if self._discarding:
                self._discarding = False
                self._answer_overlong()
                continue
            self._line(line)

    def _line_limit(self, start: bytes) -> int:
        if self.line_hook is not None:
            return grammar.MAX_AUTH_LINE
        verb = start[:5].upper()
        if verb in (b"MAIL ", b"RCPT "):
            return grammar.MAX_MAIL_RCPT_LINE
        if verb == b"AUTH ":
            return grammar.MAX_AUTH_LINE
        return grammar.MAX_COMMAND_LINE

    def _answer_overlong(self) -> None:
        if self.line_hook is not None:
            # RFC 4954 4: the exchange is over; the session goes on.
            self.line_hook = None
            return self._answer(R.AUTH_LINE_TOO_LONG)
        self._answer(R.LINE_TOO_LONG)

    def _line(self, line: bytes) -> None:
        if len(line) > self._line_limit(line):
            return self._answer_overlong()
        if line.endswith(b"\r\n"):
            line = line[:-2]
        elif self.config.limits.bare_newline == "reject":
            log.info("bare <LF> in command from [{ip}] session={sid}",
                     ip=self.session.client_ip, sid=self.session.id)
            return self._answer(R.BARE_NEWLINE)
        else:
            line = line[:-1]
        if self.line_hook is not None:
            # A multi-line exchange (AUTH) wants this line, not the parser.
            hook, self.line_hook = self.line_hook, None
            return self._handle(lambda: hook(line), "AUTH")
        try:
            command = grammar.parse_command(line)
        except GrammarError as e:
            return self._answer(e.reply)
        verb = command.verb
        if self._rejected_connect and verb != "QUIT":
            # RFC 5321 3.1: after a 554 greeting, 503 to all but QUIT.
            return self._answer(R.BAD_SEQUENCE)
        if not command.argument.isascii() and verb not in ("MAIL", "RCPT"):
            return self._answer(R.EIGHT_BIT_COMMAND)
        handler = getattr(self, "smtp_" + verb, None)
        if handler is None:
            return self._answer(R.SYNTAX_UNKNOWN)
        self.counts[verb] = self.counts.get(verb, 0) + 1
        self._handle(lambda: handler(command.argument), verb)

    def _handle(self, call: Callable[[], Any], verb: str) -> None:
        """Run a command handler and answer what it returns, now or later."""
        try:
            result = call()
        except GrammarError as e:
            result = e.reply
        except Exception:
            log.failure("error handling {verb} session={sid}", verb=verb, sid=self.session.id)
            result = R.LOCAL_ERROR
        if isinstance(result, Deferred):
            self._answer_deferred(result, verb)
        elif result is not None:
            self._answer(result)

    def _answer_deferred(self, d: Deferred, verb: str) -> None:
        """
        Answer with what C{d} fires with (a L{Reply}, or C{None} when the
        handler answered itself).  If it has fired already, the answer goes
        now and reading goes on (most commands: no plugin waits), without
        recursing into L{_process}.  Otherwise the commands that follow wait
        until it fires, so replies keep the order of the commands; what
        comes meanwhile is held, and beyond L{HELD_INPUT} the transport is
        paused, so a pipelining client cannot make us buffer more.
        """
        d.addErrback(self._command_failed, verb)
        fired: list = []
        d.addCallback(fired.append)
        if fired:
            if fired[0] is not None:
                self._answer(fired[0])
            return
        self._busy = True
        self._pause("command")
        d.addCallback(lambda _: self._answer_later(fired[0]))

    def _command_failed(self, failure: Failure, verb: str) -> Reply:
        log.failure("error handling {verb} session={sid}", failure, verb=verb, sid=self.session.id)
        return R.LOCAL_ERROR

    def _answer_later(self, reply: Reply | None) -> None:
        """A command that waited has its answer: send it, read on."""
        self._busy = False
        self._resume("command")
        if reply is not None:
            self._answer(reply)
        if not self._closed:
            # The client was waiting on us: its idle time starts now.
            self._reset_timeout()
            self._process()

    def _answer(self, reply: Reply) -> None:
        """Send C{reply}, counting protocol errors toward the error limit."""
        self._send(reply)
        if reply.code in (500, 501, 502, 503, 504, 555):
            self._errors += 1
            if self._errors >= self.config.limits.bad_commands and not self._closed:
                log.info("too many errors from [{ip}] session={sid}",
                         ip=self.session.client_ip, sid=self.session.id)
                self._send(Reply(421, "4.7.0", f"{self.hostname} Error: too many errors"))
                self._close()

    def _send(self, reply: Reply) -> None:
        """
        Send C{reply}: inside L{_process}, with the other replies of the
        commands it handles (one write for a pipelined group, up to
        L{REPLIES_HELD}: a transport that fills up still stops a long
        pipeline part way), else now.
        """
        if not self._closed:
            self._out.append(reply.format(bool(self.session and self.session.esmtp)))
            if not self._processing or len(self._out) >= REPLIES_HELD:
                self._flush()

    def _flush(self) -> None:
        """Write the replies held, at once (L{write_now})."""
        if self._out:
            data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
            self._out = []
            write_now(self.transport, data)

    def _close(self) -> None:
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self._flush()
        self._closed = True
        self._cancel_timeout()
        # A registered producer (ourselves, for flow control) would keep a
        # TLS transport from ever closing: loseConnection waits for it.
        try:
            self.transport.unregisterProducer()
        except (RuntimeError, AttributeError):
            pass
        self.transport.loseConnection()

    def _sync_error(self, pending: int) -> None:
        log.info("protocol synchronization error ({n} bytes unexpected) from [{ip}] session={sid}",
                 n=pending, ip=self.session.client_ip, sid=self.session.id)
        self._send(R.SYNC_ERROR)
        self._close()

    def _internal_error(self, failure: Failure) -> None:
        log.failure("internal error session={sid}", failure, sid=self.session.id)
        self._send(Reply(421, "4.3.0", f"{self.hostname} Error: internal error"))
        self._close()

    # --- simple commands ----------------------------------------------------

    def _ehlo_lines(self) -> list[str]:
        lines = [self.hostname, "PIPELINING", f"SIZE {self.config.limits.message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"]
        if self._starttls_offered():
            lines.append("STARTTLS")
        if self.context.auth is not None:
            lines.extend(self.context.auth.ehlo_lines(self))
        return lines

    def _hello(self, argument: str, esmtp: bool):
        name = grammar.parse_helo(argument)
        self._reset_transaction()
        d = self.context.pipeline.ask("helo", self.session, name)

        def decided(verdict: Verdict):
            if verdict.refuses:
                return self._refusal(verdict, "helo")
            self.session = self.session.evolve(helo=name, esmtp=esmtp)
            if esmtp:
                return Reply(250, None, tuple(self._ehlo_lines()))
            return Reply(250, None, self.hostname)

        return d.addCallback(decided)

    def smtp_EHLO(self, argument: str):
        return self._hello(argument, esmtp=True)

    def smtp_HELO(self, argument: str):
        return self._hello(argument, esmtp=False)

    def smtp_NOOP(self, argument: str) -> Reply:
        return R.OK

    def smtp_RSET(self, argument: str) -> Reply:
        if argument.strip():
            return Reply(501, "5.5.4", "Syntax: RSET")
        self._reset_transaction()
        return R.OK

    def smtp_QUIT(self, argument: str) -> None:
        self._send(Reply(221, "2.0.0", "Bye"))
        self._close()

    def smtp_VRFY(self, argument: str) -> Reply:
        if not argument.strip():
            return Reply(501, "5.5.4", "Syntax: VRFY address")
        return R.VRFY

    def smtp_AUTH(self, argument: str):
        if self.context.auth is None:
            return R.SYNTAX_UNKNOWN
        return self.context.auth.command(self, argument)

    def smtp_HELP(self, argument: str) -> Reply:
        return Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS"
                     + (" AUTH" if self.context.auth is not None else ""))

    def _reset_transaction(self) -> None:
        if self.txn is not None:
            self.txn.abort()
            self.txn = None

    # --- STARTTLS -----------------------------------------------------------

    def _starttls_offered(self) -> bool:
        return (self.listen.tls in ("starttls", "require-starttls")
                and self.context.tls_options is not None and self.session.tls is None
                and not self._tls_started)

    def smtp_STARTTLS(self, argument: str):
        if argument.strip():
            return Reply(501, "5.5.4", "Syntax: STARTTLS")
        if self.session.tls is not None or self._tls_started:
            return Reply(503, "5.5.1", "Error: TLS already active")
        if not self._starttls_offered():
            return Reply(502, "5.5.1", "Error: command not implemented")
        if self.txn is not None:
            return Reply(503, "5.5.1", "Error: MAIL transaction in progress")
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        pending = len(self._buffer) - self._pos
        if pending:
            # CVE-2011-0411: what came in the clear behind STARTTLS must
            # never be read as if it came over TLS.
            log.info("discarded {n} bytes pipelined after STARTTLS from [{ip}] session={sid}",
                     n=pending, ip=self.session.client_ip, sid=self.session.id)
            self._buffer, self._pos = b"", 0
        self._flush()  # the 220 goes in the clear, before the handshake
        self.transport.startTLS(self.context.tls_options)
        self._tls_started = True
        # RFC 3207 4.2: the session starts over; the client must EHLO again.
        self.session = self.session.evolve(helo=None, esmtp=False, user=None)
        return None

    def _tls_now(self):
        if self._tls_started and self.session.tls is None:
            self.session = self.session.evolve(tls=tls_info(self.transport))
        return self.session.tls

    # --- the transaction ----------------------------------------------------

    def _refusal(self, verdict: Verdict, stage: str) -> Reply:
        """The reply for a refusing verdict at C{stage}: the server owns the codes."""
        action = verdict.action
        if action is Action.DISCONNECT:
            self._send(Reply(421, verdict.enhanced or "4.7.0",
                             f"{self.hostname} {verdict.text or 'Error: closing connection'}"))
            self._close()
            return None
        return refusal_reply(verdict, stage)

    def _check_may_mail(self) -> Reply | None:
        if self.session.helo is None:
            return R.NEED_HELO
        if self.txn is not None and self.txn.failed is None:
            return R.NESTED_MAIL
        if self.listen.tls == "require-starttls" and self._tls_now() is None:
            return R.NEED_TLS
        if self.context.auth is not None:
            return self.context.auth.check_mail(self)
        return None

    def smtp_MAIL(self, argument: str):
        refusal = self._check_may_mail()
        if refusal is not None:
            return refusal
        # A BDAT transaction with a refused chunk is over: RFC 3030 tells
        # the client to send no more of it, so it may well start anew.
        self._reset_transaction()
        extra = self.context.auth.mail_params(self) if self.context.auth is not None else frozenset()
        mail = grammar.parse_mail(argument, max_size=self.config.limits.message_size,
                                  extra_params=extra)
        if not self.session.esmtp and len(mail.params):
            return Reply(555, "5.5.4", "Error: MAIL parameters need EHLO")
        self._tls_now()
        pipeline = self.context.pipeline
        envelope = Envelope(sender=mail.sender, size=mail.size, body=mail.body,
                            smtputf8=mail.smtputf8)

        def decided(verdict: Verdict):
            if verdict.refuses:
                return self._refusal(verdict, "mail")
            env = envelope
            for change in verdict.changes:
                if isinstance(change, RewriteSender):
                    env = env.evolve(sender=change.sender)
            self.txn = Transaction(pipeline=pipeline, envelope=env)
            if verdict.action is Action.DISCARD:
                self.txn.discarded.add("*")
            return Reply(250, "2.1.0", "Ok")

        return _then(pipeline.ask_now("mail", self.session, envelope), decided)

    def _postmaster(self) -> Address:
        domains = [d for d in self.config.relay.local_domains if not d.startswith("*.")]
        return Address("postmaster", domains[0] if domains else self.hostname)

    def smtp_RCPT(self, argument: str):
        txn = self.txn
        if txn is None:
            return R.NEED_MAIL
        if txn.bdat:
            return R.BAD_SEQUENCE
        rcpt = grammar.parse_rcpt(argument, smtputf8=txn.envelope.smtputf8).recipient
        if len(txn.envelope.recipients) >= self.config.limits.recipients:
            return R.TOO_MANY_RCPT
        if rcpt.domain is None:
            # RFC 5321 4.5.1: <Postmaster> MUST be accepted.  It names this
            # server's own postmaster, never a relay, so the relay rules
            # are not asked (with no local domains they would refuse it).
            rcpt = self._postmaster()
            relay = Verdict.accept()
        else:
            relay = txn.pipeline.check_relay_now(self.session, txn.envelope, rcpt)

        def relay_decided(verdict: Verdict):
            if verdict.refuses:
                reply = self._refusal(verdict, "rcpt")
                if reply is not None and verdict.action is Action.REJECT:
                    reply = Reply(554, verdict.enhanced or "5.7.1",
                                  f"<{rcpt}>: {verdict.text or 'Relay access denied'}")
                self._log_reject("RCPT", reply, rcpt)
                return reply
            return _then(txn.pipeline.ask_now("rcpt", self.session, txn.envelope, rcpt),
                         filters_decided)

        def filters_decided(verdict: Verdict):
            if verdict.refuses:
                reply = self._refusal(verdict, "rcpt")
                if reply is not None:
                    reply = reply.with_text(f"<{rcpt}>: {reply.lines[0]}")
                self._log_reject("RCPT", reply, rcpt)
                return reply
            if self.txn is not txn:  # reset while we waited
                return R.NEED_MAIL
            targets = (rcpt,)
            route = None
            for change in verdict.changes:
                if isinstance(change, RewriteRecipient) and change.old.key == rcpt.key:
                    targets = change.new
                elif isinstance(change, SetRoute) and (not change.recipients or any(
                        r.key == rcpt.key for r in change.recipients)):
                    route = change.route.to_dict()
            known = {r.key for r in txn.envelope.recipients}
            added = tuple(t for t in targets if t.key not in known)
            for target in added:
                if target.key != rcpt.key:
                    txn.originals[target.key] = str(rcpt)
                if route is not None:
                    txn.routes[target.key] = route
                if verdict.action is Action.DISCARD:
                    txn.discarded.add(target.key)
            txn.envelope = txn.envelope.evolve(recipients=txn.envelope.recipients + added)
            return Reply(250, "2.1.5", "Ok")

        return _then(relay, relay_decided)

    def _log_reject(self, stage: str, reply: Reply | None, rcpt: Address | None = None) -> None:
        if reply is None:
            return
        txn = self.txn
        log.info("reject: {stage} from [{ip}] session={sid}: {reply}; from=<{sender}> to=<{rcpt}>",
                 stage=stage, ip=self.session.client_ip, sid=self.session.id, reply=str(reply),
                 sender=(txn.envelope.sender or "") if txn else "", rcpt=rcpt or "")

    def _start_body(self) -> Reply | None:
        """Open the spool file and write the Received header; None if ok."""
        txn = self.txn
        try:
            txn.incoming = self.context.spool.new_message()
            txn.received = self._received_header(txn)
            txn.incoming.write(txn.received)
        except OSError:
            log.failure("cannot create a spool file session={sid}", sid=self.session.id)
            txn.abort()
            return Reply(451, "4.3.0", "Error: queue file write error")
        txn.newlines = NewlineFilter(normalize=self.config.limits.bare_newline == "normalize")
        return None

    def smtp_DATA(self, argument: str):
        txn = self.txn
        if argument.strip():
            refusal = Reply(501, "5.5.4", "Syntax: DATA")
        elif txn is None:
            refusal = R.NEED_RCPT if self.session.helo else R.NEED_HELO
        elif txn.bdat:
            refusal = Reply(503, "5.5.1", "Error: DATA after BDAT")
        elif not txn.envelope.recipients:
            refusal = R.NO_VALID_RCPT
        else:
            refusal = self._start_body()
        if refusal is not None:
            if len(self._buffer) > self._pos:
                # The client sent its message without waiting for our 354:
                # those lines must never be read as commands.
                self._send(refusal)
                self._sync_error(len(self._buffer) - self._pos)
                return None
            return refusal
        self._send(Reply(354, None, "End data with <CR><LF>.<CR><LF>"))
        self._reader = DataReader()
        return None

    def smtp_BDAT(self, argument: str):
        size, last = grammar.parse_bdat(argument)
        txn = self.txn
        refusal = None
        if txn is None:
            refusal = R.NEED_MAIL if self.session.helo else R.NEED_HELO
        elif txn.failed is not None:
            refusal = txn.failed
        elif not txn.envelope.recipients:
            refusal = R.NO_VALID_RCPT
        elif not txn.bdat:
            refusal = self._start_body()
        if txn is not None:
            # From the first BDAT on, the transaction is BDAT's: no more
            # RCPT, no DATA.  Once a chunk is refused, every chunk after
            # it is refused alike until LAST (RFC 3030 2: the client may
            # have pipelined them; we read and drop them).
            txn.bdat = True
            if refusal is not None:
                txn.failed = refusal
        # The chunk is read whatever the answer (RFC 3030 2): its bytes
        # must never be taken for commands.
        self._chunk_last = last
        self._chunk_refusal = refusal
        reader = ChunkReader(size)
        if reader.done:  # BDAT 0: nothing to read, what follows is commands
            self._end_chunk()
        else:
            self._reader = reader
        return None

    # --- the body -----------------------------------------------------------

    def _body(self, data: bytes) -> None:
        reader = self._reader
        chunk = reader.feed(data)
        txn = self.txn
        if txn is not None and txn.incoming is not None and txn.failed is None:
            chunk = txn.newlines.feed(chunk)
            txn.size += len(chunk)
            if txn.size > self.config.limits.message_size:
                if not txn.too_big:
                    txn.too_big = True
                    txn.incoming.abort()
                    log.info("message over {limit} bytes from [{ip}] session={sid}",
                             limit=self.config.limits.message_size,
                             ip=self.session.client_ip, sid=self.session.id)
            else:
                if not txn.head_done:
                    self._capture_head(txn, chunk)
                txn.incoming.write(chunk)
        if reader.done:
            self._reader = None
            if reader.leftover:
                self._buffer, self._pos = reader.leftover, 0
            if isinstance(reader, DataReader):
                self._end_message()
            else:
                self._end_chunk()

    @staticmethod
    def _capture_head(txn: Transaction, chunk: bytes) -> None:
        """Keep the header block (to the empty line, bounded) for the data filters."""
        head = txn.head + chunk[:HEADER_CAPTURE_LIMIT]
        # Only the new bytes (and three before them, for an empty line
        # split between pieces) can hold the end: a client sending its
        # header a byte at a time must not make this quadratic.
        end = head.find(b"\r\n\r\n", max(len(txn.head) - 3, 0))
        if end >= 0 or head.startswith(b"\r\n"):
            txn.head = head[: end + 2] if end >= 0 else b""
            txn.head_done = True
        elif len(head) >= HEADER_CAPTURE_LIMIT:
            txn.head = head[:HEADER_CAPTURE_LIMIT]
            txn.head_done = True
        else:
            txn.head = head

    def _end_chunk(self) -> None:
        txn = self.txn
        refusal = self._chunk_refusal
        if refusal is None and txn is not None and txn.too_big:
            refusal = R.SIZE_EXCEEDED
        if refusal is not None:
            if txn is not None:
                txn.abort()
                txn.failed = refusal
            if self._chunk_last:
                self._reset_transaction()
            return self._answer(refusal)
        if not self._chunk_last:
            return self._answer(Reply(250, "2.0.0", f"Ok: {txn.size} bytes"))
        self._end_message()

    def _end_message(self) -> None:
        """The body is complete: check it, commit it, answer."""
        txn = self.txn
        self.txn = None
        if txn.incoming is None and not txn.too_big:  # could not open the spool file
            return self._answer(Reply(451, "4.3.0", "Error: queue file write error"))
        tail = txn.newlines.close()
        if txn.too_big:
            return self._answer(R.SIZE_EXCEEDED)
        if txn.newlines.bare and self.config.limits.bare_newline == "reject":
            txn.abort()
            log.info("bare <CR> or <LF> in message from [{ip}] session={sid}: rejected",
                     ip=self.session.client_ip, sid=self.session.id)
            return self._answer(Reply(550, "5.5.2", "Error: bare <LF> received"))
        if tail:
            txn.incoming.write(tail)
            txn.size += len(tail)
        d = maybeDeferred(self._check_and_commit, txn)
        d.addErrback(self._commit_failed, txn)
        self._answer_deferred(d, "DATA")

    def _check_and_commit(self, txn: Transaction) -> Reply | Deferred:
        if not txn.pipeline.has_hook("data"):
            # No filter looks at the message: its header is not parsed, and
            # what is still in memory goes to the file with the envelope,
            # in the commit's thread.
            return self._decided(txn, CONTINUE)
        incoming = txn.incoming
        incoming.flush()  # the filters may read the file
        # The fields as stored: our Received first, as Postfix's
        # header_checks see its own.
        message = Message(size=txn.size,
                          headers=parse_headers(txn.received) + parse_headers(txn.head),
                          path=str(incoming.path))
        return _then(txn.pipeline.ask_now("data", self.session, txn.envelope, message),
                     lambda verdict: self._decided(txn, verdict))

    def _decided(self, txn: Transaction, verdict: Verdict) -> Reply | Deferred:
        """The data stage's verdict: refuse, discard or commit the message."""
        incoming = txn.incoming
        if verdict.refuses:
            txn.abort()
            reply = self._refusal(verdict, "data")
            self._log_transaction(txn, None, reply)
            return reply
        entry = self._entry(txn, verdict)
        if verdict.action is Action.DISCARD or not entry.recipients:
            txn.abort()
            self._log_transaction(txn, incoming.id, "discarded")
            return Reply(250, "2.0.0", f"Ok: queued as {incoming.id}")
        return self.context.spool.commit(incoming, entry).addCallback(
            lambda _: self._committed(txn, entry))

    def _committed(self, txn: Transaction, entry: QueueEntry) -> Reply:
        reply = Reply(250, "2.0.0", f"Ok: queued as {entry.id}")
        txn.incoming = None
        self._log_transaction(txn, entry.id, reply)
        self.context.queued(entry)
        return reply

    def _commit_failed(self, failure: Failure, txn: Transaction) -> Reply:
        log.failure("could not queue a message session={sid}", failure, sid=self.session.id)
        txn.abort()
        return Reply(451, "4.3.0", "Error: queue file write error")

    def _entry(self, txn: Transaction, verdict: Verdict) -> QueueEntry:
        add, remove = [], []
        for change in verdict.changes:
            if isinstance(change, AddHeader):
                add.append([change.name, change.value])
            elif isinstance(change, RemoveHeader):
                remove.append([change.name, change.pattern])
        env = txn.envelope
        recipients = [
            RecipientState(address=str(r), route=txn.routes.get(r.key),
                           original=txn.originals.get(r.key))
            for r in env.recipients
            if r.key not in txn.discarded and "*" not in txn.discarded
        ]
        tls = self.session.tls
        return QueueEntry(
            id=txn.incoming.id,
            sender=str(env.sender) if env.sender else "",
            recipients=recipients,
            arrival=time.time(),
            size=txn.incoming.size,
            body=env.body,
            smtputf8=env.smtputf8,
            client={
                "ip": self.session.client_ip,
                "helo": self.session.helo,
                "tls": f"{tls.version} {tls.cipher}" if tls else None,
                "user": self.session.user,
            },
            add_headers=add,
            remove_headers=remove,
        )

    def _log_transaction(self, txn: Transaction, queue_id, result) -> None:
        env = txn.envelope
        tls = self.session.tls
        log.info(
            "{id}: client=[{ip}] session={sid} tls={tls} user={user} from=<{sender}> "
            "to={rcpts} size={size} result={result}",
            id=queue_id or "NOQUEUE", ip=self.session.client_ip, sid=self.session.id,
            tls=tls.version if tls else "none", user=self.session.user or "-",
            sender=env.sender or "", rcpts=",".join(f"<{r}>" for r in env.recipients),
            size=txn.size, result=str(result),
        )

    def _received_header(self, txn: Transaction) -> bytes:
        """RFC 5321 4.4 trace field, with RFC 3848 / RFC 6531 protocol names."""
        s = self.session
        tls = self._tls_now()
        proto = ("UTF8SMTP" if txn.envelope.smtputf8 else "ESMTP") if s.esmtp else "SMTP"
        if tls is not None:
            proto += "S"
        if s.user:
            proto += "A"
        lines = [f"Received: from {s.helo} (unknown [{s.client_ip}])"]
        if tls is not None:
            lines.append(f"\t(using {tls.version} with cipher {tls.cipher} ({tls.bits}/{tls.bits} bits))")
        if s.user and self.config.auth.show_user_in_received:
            lines.append(f"\t(Authenticated sender: {s.user})")
        lines.append(f"\tby {self.hostname} (twisted-mta) with {proto} id {txn.incoming.id}")
        rcpts = txn.envelope.recipients
        stamp = _date_now()
        if len(rcpts) == 1:
            lines.append(f"\tfor <{rcpts[0]}>; {stamp}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{stamp}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


#: Which C{[limits]} a connection is over (L{ConnectionCounter.over}).
TOO_MANY_IN_ALL, TOO_MANY_FROM_CLIENT = 1, 2


class ConnectionCounter:
    """Connections open now, in all and per client IP, for the limits."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: dict[str, int] = {}

    def add(self, ip: str) -> tuple[int, int]:
        self.total += 1
        count = self.per_ip.get(ip, 0) + 1
        self.per_ip[ip] = count
        return self.total, count

    @staticmethod
    def over(limits, total: int, mine: int) -> int:
        """
        Which of C{limits} (a C{[limits]} table) a connection is over, with
        C{total} open in all and C{mine} from its client, itself counted:
        0 for none.
        """
        if total > limits.connections:
            return TOO_MANY_IN_ALL
        if mine > limits.connections_per_client:
            return TOO_MANY_FROM_CLIENT
        return 0

    def remove(self, ip: str) -> None:
        self.total -= 1
        count = self.per_ip.get(ip, 1) - 1
        if count:
            self.per_ip[ip] = count
        else:
            self.per_ip.pop(ip, None)


class ESMTPFactory(Factory):
    """Makes an L{ESMTPServer} per connection on one listener."""

    noisy = False  # the service logs what it listens on, once, itself

    def __init__(self, context: ServerContext, listen: ListenConfig,
                 counter: ConnectionCounter | None = None):
        self.context = context
        self.listen = listen
        self.counter = counter if counter is not None else ConnectionCounter()

    def buildProtocol(self, addr) -> ESMTPServer:
        p = ESMTPServer(self.context, self.listen)
        p.factory = self
        return p

    def admit(self, proto: ESMTPServer) -> Reply | None:
        """Count a new connection; the refusal to send if it is over a limit."""
        ip = proto.session.client_ip
        total, mine = self.counter.add(ip)
        proto._counted = True
        kind = ConnectionCounter.over(proto.config.limits, total, mine)
        if kind:
            return self.refusal(proto, kind, total if kind == TOO_MANY_IN_ALL else mine)
        return None

    @staticmethod
    def refusal(proto: ESMTPServer, kind: int, n: int | None) -> Reply:
        """
        The 421 (logged) for a connection over limit C{kind}, the C{n}th
        open (None: counted by the main process, see L{twisted_mta.handoff}).
        """
        ip, host = proto.session.client_ip, proto.hostname
        count = "" if n is None else f" ({n})"
        if kind == TOO_MANY_IN_ALL:
            log.info("too many connections in all{count}; refused [{ip}]", count=count, ip=ip)
            return Reply(421, "4.7.0", f"{host} Error: too many connections")
        log.info("too many connections from [{ip}]{count}", ip=ip, count=count)
        return Reply(421, "4.7.0", f"{host} Error: too many connections from {ip}")

    def release(self, proto: ESMTPServer) -> None:
        if getattr(proto, "_counted", False):
            proto._counted = False
            self.counter.remove(proto.session.client_ip)
