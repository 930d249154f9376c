"""
SMTP AUTH (RFC 4954) for submission: SASL PLAIN (RFC 4616) and LOGIN,
checked through C{twisted.cred}.

An L{Authenticator} is the server's C{context.auth} (see
L{twisted_mta.smtp.server.ServerContext}); one serves every listener and
connection.  What it does, with the replies Postfix (with Dovecot SASL)
gives in the same case:

  - AUTH is advertised (C{AUTH PLAIN LOGIN}) and accepted only on a
    listener with C{auth = "offer"} or C{"require"}, and only under TLS
    unless the listener sets C{allow_plaintext_auth} (logged as a warning
    at start and at every use).  Otherwise C{503 5.5.1 Error:
    authentication not enabled}.
  - AUTH before EHLO, a second AUTH after success, or AUTH during a mail
    transaction: 503 5.5.1.  An unknown mechanism: 504 5.5.4.  A response
    that is not base64: 501 5.5.2.  The client's C{*}: 501 5.7.0.
  - An authorization identity (PLAIN's authzid) other than the
    authentication identity: refused like a wrong password (535 5.7.8),
    as Dovecot does for any user that is not a master user.
  - A failure answers C{535 5.7.8 Error: authentication failed} after a
    delay that doubles with each failure on the connection
    (L{Authenticator.failure_delay}, at most
    L{Authenticator.max_failure_delay}); after C{[auth] failure_limit}
    failures from one client address (an IPv6 client: its /64) within
    C{[auth] lockout} seconds, AUTH from it answers C{421 4.7.0} and the
    connection is closed, for C{lockout} seconds.
  - Success: C{235 2.7.0 Authentication successful}, once the pipeline's
    C{auth} hooks agree (a refusal there: 535, or 454 for a tempfail,
    and the session stays unauthenticated).  The session's C{user} is
    then the name the checker answered with.
  - With C{auth = "require"}, MAIL before AUTH is C{530 5.7.0
    Authentication required}.  MAIL's C{AUTH=} parameter (RFC 4954 5) is
    accepted wherever AUTH is offered, and ignored.

Passwords never reach the log: it has the mechanism, the user name (made
printable and cut short) and the client address.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import task
from twisted.logger import Logger
from zope.interface import Interface, implementer

from twisted_mta.smtp.replies import Reply
from twisted_mta.values import Action

log = Logger()

MECHANISMS = ("PLAIN", "LOGIN")

NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
CANNOT_DECODE = Reply(501, "5.5.2", "Cannot decode response")
ABORTED = Reply(501, "5.7.0", "Authentication aborted")
FAILED = Reply(535, "5.7.8", "Error: authentication failed")
TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
SUCCESS = Reply(235, "2.7.0", "Authentication successful")
REQUIRED = Reply(530, "5.7.0", "Authentication required")

USERNAME_PROMPT = "VXNlcm5hbWU6"  # base64 "Username:"
PASSWORD_PROMPT = "UGFzc3dvcmQ6"  # base64 "Password:"

MAX_TRACKED = 10000  # client addresses whose failures are remembered


class ISubmitter(Interface):
    """
    The avatar interface asked of the portal: an authenticated SMTP
    client.  The avatar is the user's name (text), which becomes
    C{Session.user}.
    """


@implementer(IRealm)
class SubmitterRealm:
    """The realm: the avatar of an avatar id is its name as text."""

    def requestAvatar(self, avatarId, mind, *interfaces):
        if ISubmitter not in interfaces:
            raise NotImplementedError("only ISubmitter")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        return ISubmitter, name, lambda: None


def _printable(text: str, limit: int = 64) -> str:
    """C{text} safe for a log line: control characters replaced, cut at C{limit}."""
    out = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


def _disconnect(proto, reply: Reply) -> None:
    """Send C{reply} (a 421) and close the connection."""
    proto._send(reply)
    # Under TLS, Twisted sends the close alert (and so closes) only once no
    # producer is registered; the protocol registers itself for the whole
    # connection, so a close it starts would wait for the client.
    if not proto._closed:
        proto.transport.unregisterProducer()
    proto._close()


class _Cancelled(Exception):
    """The client answered a challenge with C{*}."""


def _decode(data: bytes, initial: bool) -> bytes:
    """
    A client's base64 response.  C{=} is an empty initial response (RFC
    4954 4); C{*} cancels (L{_Cancelled}); anything not base64 is
    L{ValueError}.
    """
    data = data.strip(b" ")
    if data == b"*" and not initial:
        raise _Cancelled()
    if data == b"=" and initial:
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64")


# --- failures per client address ----------------------------------------------


@dataclass
class _Record:
    times: deque = field(default_factory=deque)
    locked_until: float = 0.0


class FailureTracker:
    """
    Authentication failures per client: C{limit} of them within C{window}
    seconds lock the client out for C{lockout} seconds.  An IPv6 client
    is counted by its /64 (one host usually has all of it).  At most
    C{max_entries} clients are remembered; the least recently seen go
    first.
    """

    def __init__(self, limit: int, window: float, lockout: float, max_entries: int = MAX_TRACKED):
        self.limit, self.window, self.lockout = limit, window, lockout
        self.max_entries = max_entries
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    @staticmethod
    def key(ip: str) -> str:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return ip
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.ip_network(f"{addr}/64", strict=False))
        return str(addr)

    def locked_for(self, ip: str, now: float) -> float:
        """How many more seconds C{ip} is locked out (0: it is not)."""
        key = self.key(ip)
        record = self._records.get(key)
        if record is None or not record.locked_until:
            return 0.0
        if record.locked_until > now:
            return record.locked_until - now
        del self._records[key]  # the lockout is over: a clean slate
        return 0.0

    def failed(self, ip: str, now: float) -> bool:
        """Count a failure from C{ip}; whether it is now locked out."""
        key = self.key(ip)
        record = self._records.pop(key, None) or _Record()
        self._records[key] = record
        while len(self._records) > self.max_entries:
            self._records.popitem(last=False)
        if record.locked_until > now:
            return True
        times = record.times
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        if len(times) >= self.limit:
            times.clear()
            record.locked_until = now + self.lockout
            return True
        return False

    def succeeded(self, ip: str) -> None:
        """A login from C{ip} worked: forget its failures (not a lockout)."""
        key = self.key(ip)
        record = self._records.get(key)
        if record is not None and not record.locked_until:
            del self._records[key]


# --- the authenticator ------------------------------------------------------------


@dataclass
class _Connection:
    failures: int = 0  # consecutive, on this connection


class Authenticator:
    """
    The server's SMTP AUTH side (see the module docstring).

    @param auth: the L{AuthConfig} (C{failure_limit}, C{lockout}).
    @param portal: a C{twisted.cred} portal whose checkers take
        C{IUsernamePassword} and whose realm gives L{ISubmitter} avatars;
        or give C{checker} and a portal is made with L{SubmitterRealm}.
    @param checker: the credentials checker; if it has a C{reload(path)}
        method (L{twisted_mta.users.UsersFileChecker}), L{reload} calls it
        with the new C{[auth] users} path.
    @param listen: the listener configurations, to warn about the risky ones.
    @ivar failure_delay: seconds before the first 535 on a connection;
        each further one waits twice as long, up to C{max_failure_delay}.
    """

    failure_delay = 1.0
    max_failure_delay = 16.0

    def __init__(self, auth, portal: Portal | None = None, *, checker=None,
                 listen: Iterable = (), failure_delay: float | None = None,
                 max_failure_delay: float | None = None, max_tracked: int = MAX_TRACKED):
        if portal is None:
            if checker is None:
                raise TypeError("Authenticator needs a portal or a checker")
            portal = Portal(SubmitterRealm(), [checker])
        self.portal = portal
        self.checker = checker
        self.auth = auth
        if failure_delay is not None:
            self.failure_delay = failure_delay
        if max_failure_delay is not None:
            self.max_failure_delay = max_failure_delay
        self.tracker = FailureTracker(auth.failure_limit, auth.lockout, auth.lockout, max_tracked)
        self._connections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.warn_listeners(listen)

    @classmethod
    def from_config(cls, config, **kwargs) -> "Authenticator":
        """
        The authenticator for C{config}: a L{UsersFileChecker} over
        C{[auth] users}.  Raises L{UsersFileError} (a ValueError) when that
        is not set or cannot be read.
        """
        from twisted_mta.users import UsersFileChecker, UsersFileError

        if config.auth.users is None:
            raise UsersFileError(f"{config.file}: auth.users: missing (a listener has auth = "
                                 "\"offer\" or \"require\"; create one with 'twisted-mta passwd NAME')")
        checker = UsersFileChecker(config.auth.users)
        log.info("auth: {n} users from {file}", n=len(checker.users), file=str(config.auth.users))
        return cls(config.auth, checker=checker, listen=config.listen, **kwargs)

    @staticmethod
    def warn_listeners(listen: Iterable) -> None:
        for lc in listen:
            if lc.auth == "none":
                continue
            if lc.allow_plaintext_auth and lc.tls != "implicit":
                log.warn("auth: listener {endpoint} has allow_plaintext_auth: passwords may "
                         "cross the network unencrypted", endpoint=lc.endpoint)
            elif lc.tls == "none":
                log.warn("auth: listener {endpoint} has auth = {auth} but tls = none: AUTH is "
                         "only offered under TLS, so never there", endpoint=lc.endpoint,
                         auth=lc.auth)

    def reload(self, config) -> None:
        """
        Take C{config}'s C{[auth]} settings and read the users file again
        (if the checker is the users file's).  Raises ValueError, changing
        nothing, if the file cannot be used.
        """
        if self.checker is not None and hasattr(self.checker, "reload"):
            if config.auth.users is None:
                from twisted_mta.users import UsersFileError
                raise UsersFileError(f"{config.file}: auth.users: missing; the running "
                                     "server authenticates from a users file")
            n = self.checker.reload(config.auth.users)
            log.info("auth: {n} users from {file}", n=n, file=str(config.auth.users))
        self.auth = config.auth
        self.tracker.limit = config.auth.failure_limit
        self.tracker.window = self.tracker.lockout = config.auth.lockout
        self.warn_listeners(config.listen)

    # --- what the server asks ---------------------------------------------------

    def _connection(self, proto) -> _Connection:
        state = self._connections.get(proto)
        if state is None:
            state = self._connections[proto] = _Connection()
        return state

    @staticmethod
    def _tls(proto) -> bool:
        return proto.session.tls is not None or proto._tls_now() is not None

    def offered(self, proto) -> bool:
        """Whether AUTH is offered to C{proto} now (its listener, its TLS)."""
        listen = proto.listen
        if listen.auth == "none":
            return False
        return listen.allow_plaintext_auth or self._tls(proto)

    def ehlo_lines(self, proto) -> list[str]:
        return ["AUTH " + " ".join(MECHANISMS)] if self.offered(proto) else []

    def mail_params(self, proto) -> frozenset[str]:
        return frozenset({"AUTH"}) if self.offered(proto) else frozenset()

    def check_mail(self, proto) -> Reply | None:
        if proto.listen.auth == "require" and not proto.session.user:
            return REQUIRED
        return None

    def command(self, proto, argument: str):
        """The AUTH command: a L{Reply}, a Deferred firing with one, or C{None}."""
        session = proto.session
        if not self.offered(proto):
            return NOT_ENABLED
        if session.helo is None or not session.esmtp:
            return NEED_EHLO
        if proto.txn is not None:  # before "already authenticated", as Postfix
            return IN_TRANSACTION
        if session.user:
            return ALREADY
        reactor = proto.context.reactor
        locked = self.tracker.locked_for(session.client_ip, reactor.seconds())
        if locked:
            log.info("auth: refused AUTH from locked-out [{ip}] session={sid} ({left:.0f} s left)",
                     ip=session.client_ip, sid=session.id, left=locked)
            _disconnect(proto, Reply(421, "4.7.0", f"{proto.hostname} Error: too many "
                                                    "authentication failures; try again later"))
            return None
        args = argument.split()
        if not 1 <= len(args) <= 2:
            return SYNTAX
        mechanism = args[0].upper()
        if mechanism not in MECHANISMS:
            return UNKNOWN_MECHANISM
        if not self._tls(proto):
            log.warn("auth: {mech} over plaintext (allow_plaintext_auth) from [{ip}] session={sid}",
                     mech=mechanism, ip=session.client_ip, sid=session.id)
        exchange = _Exchange(self, proto, mechanism)
        initial = args[1].encode("utf-8") if len(args) == 2 else None
        if mechanism == "PLAIN":
            if initial is None:
                return exchange.challenge("", exchange.plain)
            return exchange.respond(exchange.plain, initial, initial=True)
        if initial is None:
            return exchange.challenge(USERNAME_PROMPT, exchange.login_name)
        return exchange.respond(exchange.login_name, initial, initial=True)

    # --- checking -----------------------------------------------------------------

    def verify(self, proto, mechanism: str, name: str | None, password: bytes | None,
               why: str | None = None):
        """
        Check C{name} and C{password} (or fail at once with C{why}); a
        Deferred firing with the reply.
        """
        from twisted.internet.defer import fail

        if why is not None:
            d = fail(UnauthorizedLogin(why))
        else:
            creds = UsernamePassword(name.encode("utf-8"), password)
            d = self.portal.login(creds, None, ISubmitter)
            del creds, password
        d.addCallbacks(lambda result: self._authenticated(proto, mechanism, result[1]),
                       lambda failure: self._refused(proto, mechanism, name, failure))
        return d

    def _authenticated(self, proto, mechanism: str, user: str):
        session = proto.session
        candidate = session.evolve(user=user)
        d = proto.context.pipeline.ask("auth", candidate, user)

        def decided(verdict):
            s = proto.session
            if verdict.refuses:
                log.info("auth: {mech} login by {user} from [{ip}] session={sid} refused by a "
                         "filter: {action}", mech=mechanism, user=_printable(user),
                         ip=s.client_ip, sid=s.id, action=verdict.action.value)
                if verdict.action is Action.DISCONNECT:
                    _disconnect(proto, Reply(421, verdict.enhanced or "4.7.0", f"{proto.hostname} "
                                             f"{verdict.text or 'Error: closing connection'}"))
                    return None
                # IAuthFilter: 535 5.7.8 and 454 4.7.0, unless the plugin
                # gave an enhanced code other than Verdict's defaults.
                if verdict.action is Action.TEMPFAIL:
                    enhanced = verdict.enhanced if verdict.enhanced not in (None, "4.7.1") else "4.7.0"
                    return Reply(454, enhanced, verdict.text or TEMPORARY.text)
                enhanced = verdict.enhanced if verdict.enhanced not in (None, "5.7.1") else "5.7.8"
                return Reply(535, enhanced, verdict.text or FAILED.text)
            proto.session = s.evolve(user=user)
            self._connection(proto).failures = 0
            self.tracker.succeeded(s.client_ip)
            log.info("auth: {mech} login by {user} from [{ip}] session={sid} tls={tls}",
                     mech=mechanism, user=_printable(user), ip=s.client_ip, sid=s.id,
                     tls=s.tls.version if s.tls else "none")
            return SUCCESS

        return d.addCallback(decided)

    def _refused(self, proto, mechanism: str, name: str | None, failure):
        session = proto.session
        if not failure.check(UnauthorizedLogin, UnhandledCredentials):
            # The checker could not answer (a database down): not the
            # client's fault, and not counted against it.
            log.error("auth: {mech} check for {user} from [{ip}] session={sid} failed: "
                      "{kind}: {error}", mech=mechanism, user=_printable(name or ""),
                      ip=session.client_ip, sid=session.id, kind=failure.type.__name__,
                      error=_printable(str(failure.value), 200))
            return TEMPORARY
        reactor = proto.context.reactor
        state = self._connection(proto)
        state.failures += 1
        locked = self.tracker.failed(session.client_ip, reactor.seconds())
        reason = failure.value.args[0] if failure.value.args else "bad credentials"
        log.info("auth: {mech} authentication failed for {user} from [{ip}] session={sid}: "
                 "{reason}", mech=mechanism, user=_printable(name or ""), ip=session.client_ip,
                 sid=session.id, reason=_printable(str(reason), 100))
        if locked:
            log.warn("auth: [{ip}] locked out for {lockout:.0f} s after {n} failures",
                     ip=session.client_ip, lockout=self.tracker.lockout, n=self.tracker.limit)
        delay = min(self.failure_delay * 2 ** (state.failures - 1), self.max_failure_delay)
        return task.deferLater(reactor, delay, lambda: FAILED)


class _Exchange:
    """One AUTH command's challenges and responses."""

    def __init__(self, authenticator: Authenticator, proto, mechanism: str):
        self.auth = authenticator
        self.proto = proto
        self.mechanism = mechanism
        self.name: str | None = None

    def challenge(self, text: str, step) -> Reply:
        """Send the challenge C{text} (already base64); the next line goes to C{step}."""
        self.proto.line_hook = lambda line: self.respond(step, line, initial=False)
        return Reply(334, None, text)

    def respond(self, step, data: bytes, initial: bool):
        try:
            decoded = _decode(data, initial)
        except _Cancelled:
            s = self.proto.session
            log.info("auth: {mech} cancelled by [{ip}] session={sid}",
                     mech=self.mechanism, ip=s.client_ip, sid=s.id)
            return ABORTED
        except ValueError:
            return CANNOT_DECODE
        return step(decoded)

    def plain(self, message: bytes):
        """RFC 4616: [authzid] NUL authcid NUL passwd."""
        parts = message.split(b"\0")
        if len(parts) != 3:
            return self.auth.verify(self.proto, self.mechanism, None, None,
                                    why="malformed PLAIN response")
        authzid, authcid, password = parts
        try:
            name = authcid.decode("utf-8")
            zid = authzid.decode("utf-8")
        except UnicodeDecodeError:
            return self.auth.verify(self.proto, self.mechanism, None, None,
                                    why="user name not UTF-8")
        if not name or not password:
            return self.auth.verify(self.proto, self.mechanism, name, None,
                                    why="empty user name or password")
        if zid and zid != name:
            return self.auth.verify(self.proto, self.mechanism, name, None,
                                    why=f"may not act for {_printable(zid)}")
        return self.auth.verify(self.proto, self.mechanism, name, password)

    def login_name(self, data: bytes):
        try:
            self.name = data.decode("utf-8")
        except UnicodeDecodeError:
            self.name = None
        return self.challenge(PASSWORD_PROMPT, self.login_password)

    def login_password(self, password: bytes):
        name = self.name
        if name is None:
            return self.auth.verify(self.proto, self.mechanism, None, None,
                                    why="user name not UTF-8")
        if not name or not password:
            return self.auth.verify(self.proto, self.mechanism, name, None,
                                    why="empty user name or password")
        return self.auth.verify(self.proto, self.mechanism, name, password)
