"""
The values plugins see: L{Session}, L{Envelope}, L{Message}, L{Route} and
the L{Verdict} a hook answers with.

They are plain frozen values.  None of them holds a transport, a protocol
or a spool object, so a plugin can keep one, compare one or build one in a
test without a server.  L{Address} (from the grammar) is the one address
type everywhere.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Iterator

from twisted_mta.smtp.grammar import Address

__all__ = [
    "Address", "TLSInfo", "Session", "Envelope", "Message", "Route", "Action",
    "Verdict", "AddHeader", "RemoveHeader", "RewriteSender", "RewriteRecipient",
    "SetRoute", "Change",
]


@dataclass(frozen=True)
class TLSInfo:
    """The TLS a session runs under: C{version} such as C{TLSv1.3}, the cipher, its bits."""

    version: str
    cipher: str
    bits: int


@dataclass(frozen=True)
class Session:
    """
    One SMTP connection as plugins see it.  A new value is made whenever
    something about the session changes (HELO, TLS, AUTH); hooks are given
    the value current at their stage.

    @ivar id: a short id for logs, unique in this server's lifetime.
    @ivar client_ip: the client's address as text (C{192.0.2.1}, C{2001:db8::1}).
    @ivar listener: the endpoint string of the listener it came in on.
    @ivar helo: the name given with HELO/EHLO, or C{None} before that.
    @ivar esmtp: whether the client said EHLO (not HELO).
    @ivar tls: L{TLSInfo} once TLS is active, else C{None}.
    @ivar user: the authenticated user's name, or C{None}.
    """

    id: str
    client_ip: str
    client_port: int = 0
    server_ip: str = ""
    server_port: int = 0
    listener: str = ""
    helo: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    user: str | None = None

    def evolve(self, **changes) -> "Session":
        return replace(self, **changes)


@dataclass(frozen=True)
class Envelope:
    """
    The envelope of the transaction so far.  C{sender} is C{None} for the
    null reverse-path C{<>}.  C{recipients} are those accepted so far (at
    the C{data} stage: all of them).
    """

    sender: Address | None
    recipients: tuple[Address, ...] = ()
    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False

    def evolve(self, **changes) -> "Envelope":
        return replace(self, **changes)


@dataclass(frozen=True)
class Message:
    """
    A received message, at the C{data} stage.  C{headers} are its header
    fields in order, as stored (this server's C{Received} field first),
    as (name, value) with folding removed; C{size} counts
    the bytes as received.  L{open} reads the whole message (headers and
    body, CRLF line ends) from its spool file; it is a blocking read of a
    local file, fine for small work, better done in a thread for much.
    """

    size: int
    headers: tuple[tuple[str, str], ...]
    path: str = ""

    def header(self, name: str) -> list[str]:
        """Every value of the header field C{name} (case-insensitive), in order."""
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def open(self) -> BinaryIO:
        return open(self.path, "rb")

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.headers)


def parse_headers(block: bytes) -> tuple[tuple[str, str], ...]:
    """
    The header fields of an RFC 5322 header block (up to the empty line), as
    (name, unfolded value).  Lines that are not fields are skipped.  Bytes
    are read as UTF-8 (RFC 6532), anything else replaced.
    """
    text = block.decode("utf-8", "replace")
    fields: list[list[str]] = []
    for line in text.split("\r\n"):
        if not line:
            break
        if line[0] in " \t":
            if fields:
                fields[-1][1] += line
            continue
        name, colon, value = line.partition(":")
        if colon and name and " " not in name:
            fields.append([name, value.lstrip(" \t")])
    return tuple((n, v) for n, v in fields)


@dataclass(frozen=True)
class Route:
    """
    Where a recipient goes next.  C{via} is one of C{maildir} (C{path}: the
    folder holding one Maildir per recipient), C{lmtp} (C{endpoint}: a
    client endpoint string), C{smtp} (a smart host: C{host}, C{port},
    C{tls}, C{username}, C{password_file}), C{mx} (the recipient domain's
    MX hosts; C{port}, C{tls}) or C{discard}.
    """

    via: str
    path: str | None = None
    endpoint: str | None = None
    host: str | None = None
    port: int = 25
    tls: str = "opportunistic"
    username: str | None = None
    password_file: str | None = None

    def nexthop(self, domain: str) -> str:
        """
        The destination this route delivers a recipient in C{domain} to:
        recipients with the same next hop may share a connection, and
        concurrency is capped per next hop.
        """
        if self.via == "mx":
            return f"mx:{domain.lower()}:{self.port}"
        if self.via == "smtp":
            return f"smtp:{self.host}:{self.port}"
        if self.via == "lmtp":
            return f"lmtp:{self.endpoint}"
        if self.via == "maildir":
            return f"maildir:{self.path}"
        return self.via

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "Route":
        return cls(**data)


class Action(enum.Enum):
    """What a hook answers.  See L{Verdict}."""

    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    DISCONNECT = "disconnect"


@dataclass(frozen=True)
class AddHeader:
    """
    Add a header field at the top of the message, above the Received
    field this server adds (as Postfix's milters and Haraka do), so that
    trace order stays right and signatures over the rest stay valid.
    """

    name: str
    value: str


@dataclass(frozen=True)
class RemoveHeader:
    """
    Remove every header field called C{name} (case-insensitive) or, with
    C{pattern}, those whose unfolded value matches that regular expression
    (C{re.search}).
    """

    name: str
    pattern: str | None = None


@dataclass(frozen=True)
class RewriteSender:
    """Replace the envelope sender (C{None}: the null sender)."""

    sender: Address | None


@dataclass(frozen=True)
class RewriteRecipient:
    """Replace recipient C{old} with C{new} (one or more addresses; none drops it)."""

    old: Address
    new: tuple[Address, ...]


@dataclass(frozen=True)
class SetRoute:
    """Send these recipients (all, if C{recipients} is empty) by C{route}."""

    route: Route
    recipients: tuple[Address, ...] = ()


Change = AddHeader | RemoveHeader | RewriteSender | RewriteRecipient | SetRoute


@dataclass(frozen=True)
class Verdict:
    """
    A hook's answer.  The server owns the reply codes; a verdict may give
    the text and the enhanced status code.

      - C{CONTINUE}: no objection; the next plugin is asked.
      - C{ACCEPT}: accept at this stage without asking the plugins after
        this one (the relay rules are still applied first).
      - C{REJECT}: a permanent refusal: 550 (554 at connect and data, and
        at rcpt with 5.7.1) with C{enhanced} (default 5.7.1).  Some enhanced codes choose another
        reply code: 5.3.4 (too big) and 5.2.2 (mailbox full) give 552;
        at MAIL, an explicit 5.7.1, 5.1.7 or 5.1.8 (this sender is not
        allowed) gives 553.
      - C{TEMPFAIL}: a temporary refusal: 451 (421 at connect) with
        C{enhanced} (default 4.7.1).
      - C{DISCARD}: accept, then drop the message silently (at rcpt:
        this recipient; elsewhere: the whole transaction).
      - C{DISCONNECT}: 421 and close the connection.

    C{changes} (see L{Change}) apply when the verdict does not refuse.
    """

    action: Action = Action.CONTINUE
    text: str | None = None
    enhanced: str | None = None
    changes: tuple = field(default=())

    @classmethod
    def continue_(cls, *changes: Change) -> "Verdict":
        return cls(Action.CONTINUE, changes=tuple(changes))

    @classmethod
    def accept(cls, *changes: Change) -> "Verdict":
        return cls(Action.ACCEPT, changes=tuple(changes))

    @classmethod
    def reject(cls, text: str | None = None, enhanced: str | None = None) -> "Verdict":
        return cls(Action.REJECT, text, enhanced)

    @classmethod
    def tempfail(cls, text: str | None = None, enhanced: str | None = None) -> "Verdict":
        return cls(Action.TEMPFAIL, text, enhanced)

    @classmethod
    def discard(cls, text: str | None = None) -> "Verdict":
        return cls(Action.DISCARD, text)

    @classmethod
    def disconnect(cls, text: str | None = None, enhanced: str = "4.7.0") -> "Verdict":
        return cls(Action.DISCONNECT, text, enhanced)

    @property
    def refuses(self) -> bool:
        return self.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCONNECT)


CONTINUE = Verdict()


class SharedState:
    """
    Values a plugin keeps across reloads (counters, caches): one store per
    server, handed to every generation.  L{get} returns the value stored
    under C{key}, making it with C{factory()} the first time.
    """

    def __init__(self) -> None:
        self._values: dict = {}

    def get(self, key, factory):
        if key not in self._values:
            self._values[key] = factory()
        return self._values[key]


@dataclass(frozen=True)
class PluginContext:
    """
    What the server offers a plugin when it builds it: a plugin whose
    constructor has a parameter named C{context} is given one.

    @ivar folder: the configuration file's folder; resolve relative paths
        from options against it.
    @ivar state_folder: a folder (under the spool) for files a plugin keeps
        across restarts; it exists.
    @ivar shared: a L{SharedState} kept across reloads.
    @ivar where: the table that configured the plugin, for messages
        (C{mta.toml: filter[2]}).
    @ivar config: the whole configuration being loaded.
    @ivar reactor: the reactor, for timers and DNS.
    @ivar resolver: (a property) a twisted.names C{IResolver} asking the
        C{[delivery] nameservers} (or the system's), one per server.
    """

    folder: object
    state_folder: object
    shared: SharedState
    where: str
    config: object = None
    reactor: object = None

    @property
    def resolver(self):
        from twisted_mta.delivery.mx import make_resolver
        servers = tuple(self.config.delivery.nameservers) if self.config is not None else ()
        return self.shared.get(("resolver", servers),
                               lambda: make_resolver(servers, self.reactor))
