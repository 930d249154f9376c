"""
The ESMTP and LMTP client: what the delivery agents speak to a next hop.

Three layers, from the bottom:

  - Pure functions and small state machines with no I/O: L{ReplyParser}
    (multi-line replies, RFC 3463 enhanced codes, malformed and overlong
    input refused with L{MalformedReply}), L{parse_ehlo} (the extensions a
    server offers), L{DotStuffer} (RFC 5321 4.5.2 transparency over a
    stream of chunks) and L{mail_command} / L{rcpt_command}.
  - L{ClientProtocol}, a Twisted protocol that writes command lines and
    matches the replies that come back, in order, to the Deferreds of the
    commands that asked for them (so a pipelined group is just several
    lines in one write).  Every wait for a reply is bounded by a timeout;
    a lost connection, a timeout or a malformed reply fails every reply
    still awaited with an L{SMTPClientError} naming the stage.
  - L{Session}, the conversation over one connection, written as
    coroutines: L{Session.open} (greeting, EHLO with HELO fallback or
    LHLO, STARTTLS by policy, AUTH) and L{Session.send} (one mail
    transaction with per-recipient L{Result}s).  A session can carry
    several transactions (connection reuse): L{Session.reset} ends one
    with RSET, which goes in the same write as the next transaction's
    MAIL when the server offers PIPELINING.

Reply classes, as Postfix applies them: 2xx delivered; 4xx deferred; 5xx
failed, per recipient for RCPT; a 5xx to MAIL fails every recipient and a
4xx defers them; the reply to DATA and to the end of data applies to every
accepted recipient (LMTP: one reply per accepted recipient); a lost
connection, a timeout or a malformed reply defers whatever is not final
yet.  A 421 is a 4xx like any other, and the connection is not used again.

The texts of the replies we make ourselves (a timeout, a lost connection,
a refusal before the transaction) start with a 4xx or 5xx code and an
enhanced code, like a server's, so logs and DSNs read the same.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.smtp.replies import Reply

log = Logger()

DELIVERED, DEFERRED, FAILED = "delivered", "deferred", "failed"

# A reply line may be 512 octets (RFC 5321 4.5.3.1.5); real servers exceed
# it a little.  Beyond these bounds the reply is refused as malformed, so a
# hostile server cannot make us buffer without end.
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 200

# What we keep of a reply's text in an outcome (logs, DSNs, the spool).
MAX_OUTCOME_TEXT = 1000


# --- replies (no I/O) -------------------------------------------------------


class MalformedReply(ValueError):
    """The server sent something that is not an SMTP reply (the text says what)."""


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """
    One reply line without its line end: (code, whether it is the last
    line, text).  Raises L{MalformedReply}.
    """
    if len(line) > MAX_REPLY_LINE:
        raise MalformedReply(f"reply line longer than {MAX_REPLY_LINE} octets")
    code = line[:3]
    if len(code) != 3 or not code.isdigit() or code[:1] not in b"2345":
        raise MalformedReply(f"not a reply line: {_show(line)}")
    sep = line[3:4]
    if sep not in (b"", b" ", b"-"):
        raise MalformedReply(f"not a reply line: {_show(line)}")
    raw = line[4:]
    if raw.isascii():
        # The usual case, without a regex: for ASCII, the characters
        # isprintable refuses are exactly those _CONTROL replaces.
        text = raw.decode("ascii")
        if not text.isprintable():
            text = _CONTROL.sub("?", text)
    else:
        text = _CONTROL.sub("?", raw.decode("utf-8", "replace"))
    return int(code), sep != b"-", text


def _show(line: bytes) -> str:
    text = _CONTROL.sub("?", line[:60].decode("utf-8", "replace"))
    return repr(text + ("..." if len(line) > 60 else ""))


def make_reply(code: int, lines: list[str]) -> Reply:
    """
    A L{Reply} from a code and the text of its lines, with the RFC 3463
    enhanced status code taken off the front of the lines when the first
    one has one whose class agrees with the code.
    """
    enhanced = None
    m = _ENHANCED.match(lines[0]) if lines else None
    if m and m.group(1) == str(code)[0]:
        enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        stripped = []
        for line in lines:
            if line.startswith(enhanced) and line[len(enhanced):len(enhanced) + 1] in ("", " "):
                line = line[len(enhanced) + 1:]
            stripped.append(line)
        lines = stripped
    return Reply(code, enhanced, tuple(lines))


class ReplyParser:
    """
    Turns the bytes a server sends into L{Reply}s.  Lines may end in CRLF
    or a bare LF.  L{feed} raises L{MalformedReply} for a line that is not
    a reply line, a multi-line reply whose lines disagree on the code, a
    line longer than C{max_line} or a reply of more than C{max_lines}
    lines; after that the parser is of no further use.
    """

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES):
        self.max_line, self.max_lines = max_line, max_lines
        self._buffer = b""
        self._code: int | None = None
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[Reply]:
        buffer = self._buffer + data if self._buffer else data
        *lines, rest = buffer.split(b"\n")
        replies = []
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if len(line) > self.max_line:
                raise MalformedReply(f"reply line longer than {self.max_line} octets")
            code, last, text = parse_reply_line(line)
            if self._code is not None and code != self._code:
                raise MalformedReply(f"reply lines disagree on the code: {self._code} then {code}")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > self.max_lines:
                raise MalformedReply(f"reply longer than {self.max_lines} lines")
            if last:
                replies.append(make_reply(code, self._lines))
                self._code, self._lines = None, []
        self._buffer = rest
        if len(self._buffer) > self.max_line:
            raise MalformedReply(f"reply line longer than {self.max_line} octets")
        return replies


def reply_text(reply: Reply) -> str:
    """
    A reply as one line for outcomes, logs and DSNs:
    C{550 5.1.1 <u@example.test>: Recipient address rejected}; the lines
    of a multi-line reply joined by spaces; bounded in length.
    """
    head = f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} "
    body = " ".join(line.strip() for line in reply.lines if line.strip())
    text = head + body
    if len(text) > MAX_OUTCOME_TEXT:
        text = text[:MAX_OUTCOME_TEXT - 3] + "..."
    return text.rstrip()


# --- EHLO (no I/O) ----------------------------------------------------------


@dataclass(frozen=True)
class Extensions:
    """
    What a server offered in its EHLO (or LHLO) reply: C{keywords} maps
    each upper-case keyword to its parameters (text, maybe empty).
    C{esmtp} is false after a HELO fallback (no extensions at all).
    """

    esmtp: bool = False
    keywords: Mapping[str, str] = field(default_factory=dict)

    def __contains__(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    @property
    def size(self) -> int | None:
        """The SIZE limit, or C{None} (SIZE not offered, or offered without a limit: C{SIZE} or C{SIZE 0})."""
        if "SIZE" not in self.keywords:
            return None
        value = self.keywords["SIZE"].strip()
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def offers_size(self) -> bool:
        return "SIZE" in self.keywords

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords

    @property
    def enhancedstatuscodes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.keywords

    @property
    def auth(self) -> frozenset[str]:
        """The SASL mechanisms offered (upper case)."""
        return frozenset(self.keywords.get("AUTH", "").upper().split())


_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


def parse_ehlo(reply: Reply) -> Extensions:
    """
    The extensions in a positive EHLO/LHLO reply.  The first line is the
    server's name; each further line is a keyword and its parameters.
    Lines that are not keywords are ignored; C{AUTH=MECH ...} (the old
    form some servers still send) counts as C{AUTH}.
    """
    keywords: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, params = line.strip().partition(" ")
        if word.upper().startswith("AUTH="):
            params = word[5:] + " " + params
            word = "AUTH"
        if not _KEYWORD.match(word):
            continue
        key = word.upper()
        if key == "AUTH" and key in keywords:
            params = keywords[key] + " " + params
        keywords[key] = params.strip()
    return Extensions(True, keywords)


# --- the transaction's commands (no I/O) ------------------------------------


def needs_smtputf8(address: str) -> bool:
    return not address.isascii()


def ascii_address(address: str) -> str | None:
    """
    C{address} as it may be sent without SMTPUTF8: as it is when ASCII;
    with its domain in A-labels (IDNA, C{xn--...}) when only the domain is
    not ASCII; C{None} when the local part is not ASCII (or the domain is
    no valid IDN).
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        import idna
        alabels = idna.encode(domain, uts46=True).decode("ascii")
    except Exception:
        try:
            alabels = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return f"{local}@{alabels}"


def mail_command(sender: str, extensions: Extensions, size: int | None = None,
                 body: str = "7BIT", smtputf8: bool = False) -> bytes:
    """
    C{MAIL FROM:<sender>} with the parameters the server offers: C{SIZE=}
    (when it offers SIZE and C{size} is known), C{BODY=8BITMIME} (for an
    8BITMIME body, when it offers 8BITMIME) and C{SMTPUTF8} (when asked
    for and offered).  C{sender} is C{""} for the null sender.
    """
    params = []
    if size is not None and extensions.offers_size:
        params.append(f"SIZE={size}")
    if body == "8BITMIME" and extensions.eightbitmime:
        params.append("BODY=8BITMIME")
    if smtputf8 and extensions.smtputf8:
        params.append("SMTPUTF8")
    line = f"MAIL FROM:<{sender}>" + "".join(" " + p for p in params)
    return line.encode("utf-8")


def rcpt_command(recipient: str) -> bytes:
    return f"RCPT TO:<{recipient}>".encode("utf-8")


# --- dot-stuffing (no I/O) --------------------------------------------------


class DotStuffer:
    """
    RFC 5321 4.5.2 transparency for a message given in chunks: every line
    that begins with a dot gets one more, and L{end} gives the CRLF (if the
    message does not end with one) and the final C{.CRLF}.

    Each chunk is handled with one C{bytes.replace} (no loop over lines).
    A line begins after any LF, so a line that begins a chunk is stuffed
    when the previous chunk ended with LF; and a bare LF followed by a dot
    is stuffed too, so no receiver can read C{LF . CRLF} as the end of the
    data (the "SMTP smuggling" confusion).
    """

    def __init__(self) -> None:
        self._tail = b"\n"  # the start of the message is the start of a line

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if chunk[:1] == b"." and self._tail[-1:] == b"\n":
            out = b"." + out
        self._tail = (self._tail + chunk)[-2:] if len(chunk) < 2 else chunk[-2:]
        return out

    def end(self) -> bytes:
        return (b"" if self._tail == b"\r\n" else b"\r\n") + b".\r\n"


def dot_stuff(chunks) -> bytes:
    """The whole of C{chunks} stuffed and terminated (for tests and small messages)."""
    s = DotStuffer()
    return b"".join(s.feed(c) for c in chunks) + s.end()


# --- errors -----------------------------------------------------------------


class SMTPClientError(Exception):
    """The conversation broke down (not an SMTP reply): C{stage} says where."""

    def __init__(self, detail: str, stage: str):
        super().__init__(detail)
        self.detail, self.stage = detail, stage

    def text(self, peer: str) -> str:
        raise NotImplementedError


class ConnectionClosed(SMTPClientError):
    """The connection was lost (C{reason}: the Failure Twisted gave, if any)."""

    def __init__(self, detail: str, stage: str, reason=None):
        super().__init__(detail, stage)
        self.reason = reason

    def text(self, peer: str) -> str:
        return f"451 4.4.2 lost connection with {peer} while {self.stage}"


class ReplyTimeout(SMTPClientError):
    def text(self, peer: str) -> str:
        return f"451 4.4.2 conversation with {peer} timed out while {self.stage}"


class ProtocolError(SMTPClientError):
    def text(self, peer: str) -> str:
        return f"451 4.5.0 malformed reply from {peer} while {self.stage}: {self.detail}"


class SourceError(Exception):
    """The message could not be read from the queue (a local problem)."""


def _stage(line: bytes) -> str:
    verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
    return {
        b"MAIL": "sending MAIL FROM",
        b"RCPT": "sending RCPT TO",
        b"DATA": "sending DATA command",
        b"EHLO": "performing the EHLO handshake",
        b"HELO": "performing the HELO handshake",
        b"LHLO": "performing the LHLO handshake",
        b"STARTTLS": "sending STARTTLS",
        b"AUTH": "performing SASL authentication",
        b"RSET": "sending RSET",
        b"QUIT": "sending QUIT",
    }.get(verb, "sending a command")


END_OF_DATA_STAGE = "sending end of data -- message may be sent more than once"


# --- the protocol -----------------------------------------------------------


@dataclass
class _Expected:
    deferred: defer.Deferred
    timeout: float
    stage: str


@implementer(IHandshakeListener, IPushProducer)
class ClientProtocol(Protocol):
    """
    The wire side of an SMTP/LMTP client: writes command lines and hands
    each reply that comes back to the Deferred of the command that awaits
    it (see the module docstring).  C{clock} runs the timeouts (a
    L{twisted.internet.task.Clock} in tests).

    The greeting is awaited from the moment the connection is made:
    L{greeting} fires with it.  L{lost} fires (with C{None}; the reason is
    in L{reason}) when the connection is gone.  L{handshake_done} becomes true when a TLS
    handshake started with L{start_tls} has completed.
    """

    def __init__(self, clock, greeting_timeout: float = 300.0):
        self.clock = clock
        self.greeting_timeout = greeting_timeout
        self.greeting: defer.Deferred | None = None
        self.lost: defer.Deferred = defer.Deferred()
        self.closed = False
        self.reason = None
        self.tls_started = False
        self.handshake_done = False
        self.unexpected: list[Reply] = []
        self.closing = False  # a 421 was received
        self._parser = ReplyParser()
        self._waiting: deque[_Expected] = deque()
        self._timer = None
        self._deadline: float | None = None  # for the reply awaited first (see _rearm)
        self._broken: SMTPClientError | None = None
        self._paused = False
        self._resumed: defer.Deferred | None = None

    # --- connection events --------------------------------------------------

    def connectionMade(self) -> None:
        self.greeting = self.expect(self.greeting_timeout, "receiving the initial server greeting")

    def dataReceived(self, data: bytes) -> None:
        if self._broken is not None:
            return
        try:
            replies = self._parser.feed(data)
        except MalformedReply as e:
            stage = self._waiting[0].stage if self._waiting else "waiting for a reply"
            self._break(ProtocolError(str(e), stage))
            return
        for reply in replies:
            if reply.code == 421:
                # The server is closing the connection (RFC 5321 3.8): this
                # reply answers its command; what follows fails as lost.
                self.closing = True
            if self._waiting:
                expected = self._waiting.popleft()
                self._rearm()
                expected.deferred.callback(reply)
            else:
                # Nothing asked for it: the server is out of step with us
                # (or says 421 before closing).  Do not use this connection.
                self.unexpected.append(reply)
                if self.transport is not None:
                    self.transport.loseConnection()
        if self.closing and not self.closed and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.closed = True
        self.reason = reason
        self._cancel_timer()
        detail = reason.getErrorMessage() if reason is not None else "connection lost"
        error = self._broken
        while self._waiting:
            expected = self._waiting.popleft()
            expected.deferred.errback(error if error is not None else
                                      ConnectionClosed(detail, expected.stage, reason))
        if self._resumed is not None:
            d, self._resumed = self._resumed, None
            d.errback(error if error is not None else
                      ConnectionClosed(detail, "sending message body", reason))
        if not self.lost.called:
            self.lost.callback(None)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    # --- flow control while sending a body (IPushProducer) ------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._resumed is not None:
            d, self._resumed = self._resumed, None
            d.callback(None)

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    # --- commands -------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not (self.closed or self.closing or self._broken is not None or self.unexpected)

    def expect(self, timeout: float, stage: str) -> defer.Deferred:
        """A Deferred for the next reply not yet asked for, within C{timeout} seconds of its turn."""
        d: defer.Deferred = defer.Deferred()
        if self.closed or self._broken is not None:
            d.errback(self._broken or ConnectionClosed("connection already closed", stage, self.reason))
            return d
        self._waiting.append(_Expected(d, timeout, stage))
        if len(self._waiting) == 1:
            self._rearm()
        return d

    def send(self, lines: list[bytes], timeout: float, stages: list[str] | None = None) -> list[defer.Deferred]:
        """
        Write C{lines} (each without CRLF) in one write and return one
        Deferred per line for its reply.  Used with one line, or with a
        pipelined group when the server offers PIPELINING.
        """
        stages = stages or [_stage(line) for line in lines]
        ds = [self.expect(timeout, stage) for stage in stages]
        if not self.closed and self._broken is None:
            self.transport.write(b"".join(line + b"\r\n" for line in lines))
        return ds

    def command(self, line: bytes, timeout: float, stage: str | None = None) -> defer.Deferred:
        return self.send([line], timeout, [stage] if stage else None)[0]

    def start_tls(self, options) -> None:
        """Start TLS now (after a 220 to STARTTLS); what is written next goes encrypted."""
        self.tls_started = True
        self.transport.startTLS(options)

    async def send_body(self, source, block_timeout: float, end_timeout: float) -> defer.Deferred:
        """
        Write the message from C{source} (a L{MessageSource}), dot-stuffed,
        and the final dot; returns the Deferred for the reply to the end of
        data (to be awaited within C{end_timeout}).  The writes follow the
        transport's flow control: while it asks us to pause, no more is
        read, and if it does not resume within C{block_timeout} the
        connection is aborted (RFC 5321 4.5.3.2.5, the data block
        timeout).  A failure to read the message aborts the connection, so
        the server never takes a truncated message for a whole one, and
        raises L{SourceError}.
        """
        stuffer = DotStuffer()
        self._paused = False
        self.transport.registerProducer(self, True)
        try:
            while True:
                try:
                    chunk = await source.read()
                except Exception as e:
                    self.abort()
                    raise SourceError(str(e)) from e
                self._check_open("sending message body")
                if not chunk:
                    break
                self.transport.write(stuffer.feed(chunk))
                if self._paused:
                    await self._wait_resumed(block_timeout)
            self._check_open("sending message body")
            self.transport.write(stuffer.end())
        finally:
            if not self.closed:
                self.transport.unregisterProducer()
        return self.expect(end_timeout, END_OF_DATA_STAGE)

    def _check_open(self, stage: str) -> None:
        if self._broken is not None:
            raise self._broken
        if self.closed:
            detail = self.reason.getErrorMessage() if self.reason is not None else "connection lost"
            raise ConnectionClosed(detail, stage, self.reason)

    async def _wait_resumed(self, timeout: float) -> None:
        d: defer.Deferred = defer.Deferred()
        self._resumed = d
        timer = self.clock.callLater(timeout, self._body_timed_out)
        try:
            await d
        finally:
            if timer.active():
                timer.cancel()

    def _body_timed_out(self) -> None:
        self._break(ReplyTimeout("no progress", "sending message body"))

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.loseConnection()

    # --- timers -------------------------------------------------------------
    #
    # The reply awaited first must come within its timeout of its turn,
    # and a turn begins with each reply: five or so per message.  Instead
    # of a timer cancelled and made anew each time, the deadline is kept
    # as a number, and one timer runs while replies are awaited: when it
    # goes off before the deadline (which has moved on since it was set),
    # it sets itself for the rest.  It is cancelled when nothing is
    # awaited, and moved when a deadline comes before it.

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _rearm(self) -> None:
        if not self._waiting:
            self._cancel_timer()
            return
        timeout = self._waiting[0].timeout
        self._deadline = self.clock.seconds() + timeout
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= self._deadline:
                return
            timer.cancel()
        self._timer = self.clock.callLater(timeout, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        left = self._deadline - self.clock.seconds()
        if left > 0:
            self._timer = self.clock.callLater(left, self._tick)
            return
        self._timed_out()

    def _timed_out(self) -> None:
        self._timer = self._deadline = None
        stage = self._waiting[0].stage if self._waiting else "waiting for a reply"
        self._break(ReplyTimeout("timed out", stage))

    def _break(self, error: SMTPClientError) -> None:
        """Fail everything awaited with C{error} and drop the connection."""
        self._broken = error
        self._cancel_timer()
        while self._waiting:
            self._waiting.popleft().deferred.errback(error)
        if self._resumed is not None:
            d, self._resumed = self._resumed, None
            d.errback(error)
        self.abort()


# --- the conversation ---------------------------------------------------------


class MessageSource(TypingProtocol):
    """Where L{Session.send} reads the message: chunks, C{b""} at the end."""

    def read(self) -> defer.Deferred: ...

    def close(self) -> None: ...


class ChunksSource:
    """A L{MessageSource} over chunks already in memory (tests, small messages)."""

    def __init__(self, chunks):
        self._chunks = deque(chunks)

    def read(self) -> defer.Deferred:
        return defer.succeed(self._chunks.popleft() if self._chunks else b"")

    def close(self) -> None:
        self._chunks.clear()


@dataclass(frozen=True)
class Timeouts:
    """Seconds (RFC 5321 4.5.3.2 by default): the data block timeout is C{command}."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    data: float = 600.0

    @classmethod
    def from_config(cls, delivery) -> "Timeouts":
        return cls(delivery.connect_timeout, delivery.greeting_timeout,
                   delivery.command_timeout, delivery.data_timeout)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class Result:
    """What became of one recipient in one transaction: C{status} and the reply text."""

    status: str
    reply: str


class HopError(Exception):
    """
    This next hop cannot take the mail now (before any transaction):
    C{reply} is the text for the recipients' outcomes.  C{permanent} is
    never true for hop errors today (a refusing hop is a reason to try the
    next one, and to defer).  C{tls_failed} says the STARTTLS handshake
    failed (for the opportunistic fallback to plaintext).  C{answered}
    says the server greeted us.
    """

    def __init__(self, reply: str, tls_failed: bool = False, answered: bool = False):
        super().__init__(reply)
        self.reply = reply
        self.tls_failed = tls_failed
        self.answered = answered


class StaleConnection(Exception):
    """A reused connection turned out dead before the transaction began: use a new one."""


class Session:
    """
    One SMTP or LMTP conversation over a connected L{ClientProtocol}.

    C{peer} names the server in texts (C{mx.example.test[192.0.2.1]}).
    C{hostname} is what we say in EHLO/LHLO.  C{lmtp} switches to LMTP
    (RFC 2033): LHLO (no HELO fallback) and one reply per accepted
    recipient after the data.
    """

    def __init__(self, protocol: ClientProtocol, peer: str, hostname: str,
                 timeouts: Timeouts = Timeouts(), lmtp: bool = False):
        self.protocol = protocol
        self.peer = peer
        self.hostname = hostname
        self.timeouts = timeouts
        self.lmtp = lmtp
        self.extensions = Extensions()
        self.tls = False
        self.authenticated = False
        self.transactions = 0
        self.remote: str | None = peer  # for outcomes; the agent may say more (the port)
        self.opened_at = 0.0  # when the connection was made (the agent's clock)
        self._answered = False
        self._reset: defer.Deferred | None = None  # an RSET sent, its reply not yet awaited
        self._rset_owed = False  # an RSET to pipeline before the next MAIL

    # --- helpers ------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.protocol.usable

    async def _await(self, d: defer.Deferred) -> Reply:
        """A reply, or L{HopError} if the conversation broke down."""
        try:
            return await d
        except SMTPClientError as e:
            raise HopError(e.text(self.peer), answered=self._answered)

    async def _command(self, line: bytes, stage: str | None = None, timeout: float | None = None) -> Reply:
        return await self._await(self.protocol.command(
            line, self.timeouts.command if timeout is None else timeout, stage))

    def _refused(self, reply: Reply, what: str) -> HopError:
        if reply.transient:
            return HopError(reply_text(reply), answered=True)
        return HopError(f"451 4.4.0 host {self.peer} {what}: {reply_text(reply)}", answered=True)

    # --- opening ------------------------------------------------------------

    async def open(self, tls: str = "none", tls_options=None,
                   credentials: Credentials | None = None) -> Extensions:
        """
        The greeting, EHLO (HELO after a 5xx to EHLO; LHLO for LMTP), then
        STARTTLS by the C{tls} policy and AUTH with C{credentials}.
        Raises L{HopError} when this hop cannot take mail now.

        TLS policies: C{none} never starts TLS; C{opportunistic} starts it
        when offered and goes on in plaintext on the same connection if
        the server answers STARTTLS with an error (RFC 3207 allows that);
        if the handshake itself fails the connection is gone, and this
        raises L{HopError} with C{tls_failed} set: the agent then connects
        again to the same hop with the C{none} policy, once.  C{require}
        and C{verify} refuse the hop (deferred, 4.7.x) without STARTTLS or
        when it fails; C{tls_options} (made by L{client_tls_options})
        decide whether the certificate is verified.  After TLS, EHLO is
        sent again, as RFC 3207 demands.

        AUTH is sent only under TLS: C{credentials} without TLS, a server
        that offers neither PLAIN nor LOGIN, or a refusal of the
        credentials, raise L{HopError} (deferred: Postfix defers on a SASL
        failure, as a password may be fixed without losing mail).
        """
        greeting = await self._await(self.protocol.greeting)
        self._answered = True
        if not greeting.positive:
            raise self._refused(greeting, "refused to talk to me")
        self.extensions = await self._hello()
        if tls != "none" and not self.lmtp:
            await self._starttls(tls, tls_options)
        if credentials is not None:
            await self._authenticate(credentials)
        return self.extensions

    async def _hello(self) -> Extensions:
        hostname = self.hostname.encode("idna") if not self.hostname.isascii() else self.hostname.encode()
        if self.lmtp:
            reply = await self._command(b"LHLO " + hostname)
            if not reply.positive:
                raise self._refused(reply, "refused LHLO")
            return parse_ehlo(reply)
        reply = await self._command(b"EHLO " + hostname)
        if reply.positive:
            return parse_ehlo(reply)
        if reply.transient:
            raise self._refused(reply, "refused EHLO")
        reply = await self._command(b"HELO " + hostname)
        if not reply.positive:
            raise self._refused(reply, "refused HELO")
        return Extensions(False, {})

    async def _starttls(self, tls: str, options) -> None:
        if not self.extensions.starttls:
            if tls == "opportunistic":
                return
            raise HopError(f"451 4.7.4 TLS is required, but was not offered by host {self.peer}",
                           answered=True)
        reply = await self._command(b"STARTTLS")
        if reply.code != 220:
            if tls == "opportunistic":
                log.info("STARTTLS refused by {peer} ({reply}); going on in plaintext",
                         peer=self.peer, reply=reply_text(reply))
                return
            raise HopError(f"451 4.7.4 TLS is required, but host {self.peer} refused to start TLS: "
                           f"{reply_text(reply)}", answered=True)
        self.protocol.start_tls(options)
        try:
            self.extensions = await self._hello()
        except HopError as e:
            if self.protocol.handshake_done:
                raise
            why = "connection lost"
            reason = self.protocol.reason
            if reason is not None:
                why = _tls_reason(reason)
            if tls == "verify":
                text = f"451 4.7.5 Server certificate not verified: host {self.peer}: {why}"
            else:
                text = f"451 4.7.5 TLS handshake with host {self.peer} failed: {why}"
            raise HopError(text, tls_failed=True, answered=True) from e
        self.tls = True

    async def _authenticate(self, credentials: Credentials) -> None:
        if not self.tls:
            raise HopError(f"451 4.7.0 not sending AUTH to host {self.peer} without TLS", answered=True)
        offered = self.extensions.auth
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if "PLAIN" in offered:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            reply = await self._command(b"AUTH PLAIN " + token)
        elif "LOGIN" in offered:
            reply = await self._command(b"AUTH LOGIN")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(user), "performing SASL authentication")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(password), "performing SASL authentication")
            if reply.code == 334:  # a server that wants more than LOGIN gives: stop it
                reply = await self._command(b"*", "performing SASL authentication")
        else:
            have = " ".join(sorted(offered)) or "none"
            raise HopError(f"451 4.7.0 SASL authentication failed: host {self.peer} offers no "
                           f"mechanism we use (PLAIN, LOGIN); it offers: {have}", answered=True)
        if reply.code != 235:
            raise HopError(f"451 4.7.0 SASL authentication failed; server {self.peer} said: "
                           f"{reply_text(reply)}", answered=True)
        self.authenticated = True

    # --- a transaction ------------------------------------------------------

    async def send(self, sender: str, recipients: list[str], source: MessageSource, *,
                   size: int | None = None, body: str = "7BIT", smtputf8: bool = False) -> list[Result]:
        """
        One mail transaction: C{sender} (C{""} for the null sender) to
        C{recipients}, the message read from C{source}.  Returns one
        L{Result} per recipient, in order.  Never raises for what the
        server says or for a broken connection (those are results), but
        raises L{StaleConnection} when this session was used before and
        died before the MAIL command got an answer (the caller tries a new
        connection).

        Before MAIL: a message larger than the server's SIZE fails (552
        5.3.4, as Postfix); when the server lacks SMTPUTF8, a sender or
        recipient with a non-ASCII local part fails (550 5.6.7) -- all
        recipients for such a sender, else only those recipients -- and
        one with only a non-ASCII domain is sent with the domain in
        A-labels (L{ascii_address}); the SMTPUTF8 parameter is sent when
        the server offers it and the message or an address needs it.  An
        8BITMIME body sent to a server without 8BITMIME goes as it is,
        without BODY= (Postfix does the same unless told to convert).
        """
        ext = self.extensions
        n = len(recipients)
        results: list[Result | None] = [None] * n
        reused = self.transactions > 0
        self.transactions += 1
        try:
            if self._reset is not None:
                d, self._reset = self._reset, None
                try:
                    reply = await d
                except SMTPClientError:
                    raise StaleConnection()
                if reply is None or not reply.positive:
                    raise StaleConnection()
            if reused and not self.usable:
                raise StaleConnection()
            utf8 = smtputf8 or needs_smtputf8(sender) or any(needs_smtputf8(r) for r in recipients)
            if utf8 and not ext.smtputf8:
                # Without SMTPUTF8, an address whose only non-ASCII part is
                # the domain goes with the domain in A-labels; any other
                # non-ASCII address cannot be sent.
                text = f"550 5.6.7 host {self.peer} does not support SMTPUTF8, which this message needs"
                ascii_sender = ascii_address(sender)
                converted = [ascii_address(r) for r in recipients]
                for i, r in enumerate(converted):
                    if ascii_sender is None:
                        results[i] = Result(FAILED, text + " for its sender")
                    elif r is None:
                        results[i] = Result(FAILED, text + " for this recipient")
                if ascii_sender is not None:
                    sender = ascii_sender
                    recipients = [r if r is not None else recipients[i] for i, r in enumerate(converted)]
            limit = ext.size
            if size is not None and limit is not None and size > limit:
                text = (f"552 5.3.4 message size {size} exceeds size limit {limit} of server {self.peer}")
                results = [r or Result(FAILED, text) for r in results]
            todo = [i for i in range(n) if results[i] is None]
            if not todo:
                return list(results)
            rset, self._rset_owed = self._rset_owed, False
            await self._transaction(sender, recipients, todo, results, source, size, body,
                                    utf8 and ext.smtputf8, reused, rset)
            return list(results)
        finally:
            source.close()

    async def _transaction(self, sender, recipients, todo, results, source, size, body, utf8, reused,
                           rset=False):
        proto = self.protocol
        ext = self.extensions
        peer = self.peer
        mail = mail_command(sender, ext, size, body, utf8)
        rcpts = [rcpt_command(recipients[i]) for i in todo]
        t = self.timeouts.command

        def broken(error: SMTPClientError) -> Result:
            return Result(DEFERRED, error.text(peer))

        # [RSET,] MAIL, RCPT..., DATA: one write with PIPELINING, else one
        # at a time.  (RSET is owed only with PIPELINING: see reset.)
        data_reply: Reply | SMTPClientError | None = None
        if ext.pipelining:
            lines = [mail, *rcpts, b"DATA"]
            if rset:
                lines.insert(0, b"RSET")
            replies = await _gather(proto.send(lines, t))
            if rset:
                rset_reply = replies.pop(0)
                if isinstance(rset_reply, Reply) and not rset_reply.positive:
                    # As when the RSET was sent on its own: this connection is
                    # not to be trusted; drop it (the server forgets the
                    # transaction) and let the caller use a new one.
                    proto.abort()
                    raise StaleConnection()
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            mail_reply = await _gather1(proto.command(mail, t))
            rcpt_replies = []
            if isinstance(mail_reply, Reply) and mail_reply.positive:
                for line in rcpts:
                    reply = await _gather1(proto.command(line, t))
                    rcpt_replies.append(reply)
                    if isinstance(reply, SMTPClientError):
                        break

        if reused and (isinstance(mail_reply, SMTPClientError) or mail_reply.code == 421):
            raise StaleConnection()

        if isinstance(mail_reply, SMTPClientError):
            for i in todo:
                results[i] = broken(mail_reply)
            return
        if not mail_reply.positive:
            status = DEFERRED if mail_reply.transient else FAILED
            for i in todo:
                results[i] = Result(status, reply_text(mail_reply))
            await self._discard_data(data_reply)
            return

        accepted = []
        for k, i in enumerate(todo):
            reply = rcpt_replies[k] if k < len(rcpt_replies) else None
            if reply is None:
                # Not sent: the connection broke on an earlier RCPT.
                results[i] = broken(rcpt_replies[-1])
            elif isinstance(reply, SMTPClientError):
                results[i] = broken(reply)
            elif reply.positive:
                accepted.append(i)
            else:
                results[i] = Result(DEFERRED if reply.transient else FAILED, reply_text(reply))
        if not accepted:
            await self._discard_data(data_reply)
            return

        if data_reply is None:
            data_reply = await _gather1(proto.command(b"DATA", t))
        if isinstance(data_reply, SMTPClientError):
            for i in accepted:
                results[i] = broken(data_reply)
            return
        if data_reply.code != 354:
            status = FAILED if data_reply.permanent else DEFERRED
            text = reply_text(data_reply)
            if data_reply.positive:  # 250 to DATA makes no sense: never call that delivered
                text = f"451 4.5.0 unexpected reply from {peer} to DATA: {text}"
                proto.close()
            for i in accepted:
                results[i] = Result(status, text)
            return

        try:
            end = await proto.send_body(source, self.timeouts.command, self.timeouts.data)
        except SourceError as e:
            for i in accepted:
                results[i] = Result(DEFERRED, f"451 4.3.0 local error: cannot read the queued message: {e}")
            return
        except SMTPClientError as e:
            for i in accepted:
                results[i] = broken(e)
            return
        if self.lmtp:
            ends = [end] + [proto.expect(self.timeouts.data, END_OF_DATA_STAGE) for _ in accepted[1:]]
            finals = await _gather(ends)
        else:
            final = await _gather1(end)
            finals = [final] * len(accepted)
        for i, reply in zip(accepted, finals):
            if isinstance(reply, SMTPClientError):
                results[i] = broken(reply)
            elif reply.positive:
                results[i] = Result(DELIVERED, reply_text(reply))
            else:
                results[i] = Result(DEFERRED if reply.transient else FAILED, reply_text(reply))

    async def _discard_data(self, data_reply) -> None:
        """
        DATA was pipelined and answered 354 though nothing can be sent
        (RFC 2920 3.1): send the lone dot and forget its reply.  In LMTP
        the number of replies to come is unclear: close instead.
        """
        if isinstance(data_reply, Reply) and data_reply.code == 354:
            if self.lmtp:
                self.protocol.close()
                return
            self.protocol.transport.write(b".\r\n")
            await _gather1(self.protocol.expect(self.timeouts.data, END_OF_DATA_STAGE))

    # --- between and after transactions -------------------------------------

    def reset(self) -> None:
        """
        End the transaction with RSET, without a round trip on the
        delivery's path.  With PIPELINING, the RSET goes in the same write
        as the next L{send}'s MAIL (a write and a reply to read fewer per
        message; a dead or refusing connection then shows there, and
        L{send} raises L{StaleConnection}).  Without, it is sent now and
        the next L{send} awaits its reply first, taking a failure as a
        stale connection.
        """
        if not self.usable:
            return
        if self.extensions.pipelining:
            self._rset_owed = True
            return
        self._reset = self.protocol.command(b"RSET", self.timeouts.command)
        self._reset.addErrback(lambda f: f.trap(SMTPClientError) and None)

    def quit(self, timeout: float = 10.0) -> defer.Deferred:
        """
        Say QUIT and close; the Deferred fires once the connection is gone
        (at most C{timeout} seconds later, then it is aborted).
        """
        proto = self.protocol
        if proto.closed:
            return defer.succeed(None)
        self._reset, self._rset_owed = None, False
        if proto.usable:
            d = proto.command(b"QUIT", timeout)
            d.addBoth(lambda _: proto.close())
        else:
            proto.close()
        timer = proto.clock.callLater(timeout, proto.abort)
        done: defer.Deferred = defer.Deferred()

        def gone(_):
            if timer.active():
                timer.cancel()
            done.callback(None)

        proto.lost.addBoth(gone)
        return done

    def abort(self) -> None:
        self.protocol.abort()


async def _gather(ds: list[defer.Deferred]) -> list:
    """
    Each Deferred's reply, or the L{SMTPClientError} it failed with; all
    are consumed.  The Deferreds are those of replies awaited in order
    (L{ClientProtocol.send}): they fire in that order, whether with
    replies or with the error that ends the connection, so once the last
    has fired, so have the others.  Waiting for it alone resumes the
    caller once for a pipelined group, not once per reply.
    """
    last = await _gather1(ds[-1])
    return [await _gather1(d) for d in ds[:-1]] + [last]


async def _gather1(d: defer.Deferred):
    try:
        return await d
    except SMTPClientError as e:
        return e


def _tls_reason(reason) -> str:
    """A short text for why a TLS handshake failed, from the Failure of the lost connection."""
    value = reason.value
    try:
        from OpenSSL import SSL
        if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
            parts = [e[2] if isinstance(e, tuple) and len(e) > 2 else str(e) for e in value.args[0]]
            return "; ".join(p for p in parts if p) or "TLS error"
    except ImportError:  # pragma: no cover
        pass
    errors = getattr(value, "errors", None)  # service_identity's VerificationError
    if isinstance(errors, list) and errors:
        names = []
        for e in errors:
            wanted = getattr(e, "mismatched_id", None)
            name = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
            if isinstance(name, bytes):
                name = name.decode("ascii", "replace")
            names.append(str(name) if name is not None else e.__class__.__name__)
        return "certificate name does not match " + ", ".join(names)
    text = str(value) or value.__class__.__name__
    return _CONTROL.sub(" ", text)[:300]


# --- TLS options ----------------------------------------------------------------


def client_tls_options(mode: str, hostname: str | None, trust_root=None):
    """
    The TLS options for the C{mode} of a route: for C{verify}, the chain
    is verified against C{trust_root} (an C{IOpenSSLTrustRoot}: see
    L{trust_root_from_pem}; C{None} for the platform's) and the name
    against C{hostname} with service_identity
    (L{twisted.internet.ssl.optionsForClientTLS}), TLS 1.2 and newer; for
    C{require} and C{opportunistic}, encryption without verification.
    """
    from twisted.internet import ssl

    if mode == "verify":
        name = hostname.rstrip(".") if hostname else hostname
        return ssl.optionsForClientTLS(
            name, trustRoot=trust_root if trust_root is not None else ssl.platformTrust(),
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2})
    return ssl.CertificateOptions(verify=False)


def trust_root_from_pem(data: bytes):
    """A trust root of every certificate in the PEM C{data} (a CA bundle). Raises ValueError."""
    from twisted.internet import ssl

    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)
    if not blocks:
        raise ValueError("no PEM certificate found")
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])

