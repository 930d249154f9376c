"""
Tests for L{twisted_mta.smtp.auth} (SMTP AUTH: PLAIN, LOGIN, the errors,
the failure delay and the lockout) and L{twisted_mta.builtins.senders},
with the server protocol on in-memory transports and a L{Clock}.

Connections here are "under TLS" through a transport that provides
L{ISSLTransport} (the server then reports a generic TLS session); real
TLS is in L{tests.test_e2e_auth}.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from types import SimpleNamespace

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import directlyProvides, implementer

from twisted_mta.builtins.senders import SenderLogin, read_map, sender_allowed
from twisted_mta.interfaces import IAuthFilter
from twisted_mta.pipeline import LoadedPlugin, Pipeline
from twisted_mta.smtp.auth import Authenticator, FailureTracker, SubmitterRealm
from twisted_mta.smtp.grammar import Address
from twisted_mta.smtp.replies import Reply
from twisted_mta.smtp.server import ESMTPFactory
from twisted_mta.users import UsersFileChecker, UsersFileError, hash_password
from twisted_mta.values import Envelope, Session, Verdict

from tests.support import FakeContext, make_config

CLIENT_IP = "198.51.100.7"  # not in the test config's relay networks
OTHER_IP = "198.51.100.8"
SERVER_ADDR = IPv4Address("TCP", "192.0.2.1", 587)
PASSWORD = "correct horse battery staple"
# Cheap scrypt parameters: the unit tests check the logic, not the cost.
FAST = {"n": 16, "r": 1, "p": 1}


def b64(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def plain(user: str, password: str = PASSWORD, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


def inline(f, *args, **kwargs):
    """A checker's C{run} that calls at once (tests: no threads)."""
    return maybeDeferred(f, *args, **kwargs)


def write_users(path: Path, users: dict[str, str], senders: dict[str, str] | None = None) -> Path:
    lines = ["# test users"]
    for name, password in users.items():
        line = f"{name}:{hash_password(password, **FAST)}"
        if senders and name in senders:
            line += ":" + senders[name]
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return path


class Conn:
    """One server protocol over a L{StringTransport}; L{take} returns the replies sent."""

    def __init__(self, factory: ESMTPFactory, ip: str, tls: bool):
        self.transport = StringTransport(hostAddress=SERVER_ADDR,
                                         peerAddress=IPv4Address("TCP", ip, 40000))
        if tls:
            directlyProvides(self.transport, ISSLTransport)
        self.proto = factory.buildProtocol(self.transport.getPeer())
        self.sent: list[Reply] = []
        send = self.proto._send

        def record(reply: Reply) -> None:
            if not self.proto._closed:
                self.sent.append(reply)
            send(reply)

        self.proto._send = record
        self.proto.makeConnection(self.transport)

    def send(self, line: str | bytes) -> None:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.proto.dataReceived(line + b"\r\n")

    def take(self) -> list[Reply]:
        replies, self.sent = self.sent, []
        return replies

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class AuthTestCase(unittest.TestCase):
    """A context with an L{Authenticator} over a users file, and connections to it."""

    listen = {"tls": "starttls", "auth": "require"}
    auth_config: dict = {}

    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir(parents=True)
        self.users_path = write_users(self.folder / "users", {
            "alice@example.test": PASSWORD, "scanner": "scan-pass", "bob": "bob-pass",
        }, senders={"scanner": "scans@example.test,*@dept.example.test"})
        self.config = self.make_config()
        self.checker = UsersFileChecker(self.users_path, run=inline)
        self.auth = Authenticator(self.config.auth, checker=self.checker,
                                  listen=self.config.listen)
        self.ctx = FakeContext(self.folder, config=self.config, auth=self.auth)
        self.clock = self.ctx.reactor
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def make_config(self, **extra):
        listen = [{"endpoint": "tcp:0:interface=127.0.0.1", **self.listen}]
        auth = {"users": "users", **self.auth_config}
        return make_config(self.folder, listen=listen, auth=auth, **extra)

    def connect(self, ip: str = CLIENT_IP, tls: bool = True, **listen) -> Conn:
        lc = dataclasses.replace(self.ctx.config.listen[0], **listen)
        conn = Conn(ESMTPFactory(self.ctx, lc), ip, tls)
        self.assertEqual(conn.take()[0].code, 220)
        return conn

    def ready(self, ip: str = CLIENT_IP, tls: bool = True, **listen) -> Conn:
        conn = self.connect(ip, tls, **listen)
        conn.send("EHLO client.example.net")
        self.ehlo = conn.take()[0]
        return conn

    def cmd(self, conn: Conn, line: str, code: int, enhanced: str | None = None,
            text: str | None = None) -> Reply:
        conn.send(line)
        replies = conn.take()
        self.assertEqual(len(replies), 1, [str(r) for r in replies])
        reply = replies[0]
        self.assertEqual((reply.code, reply.enhanced), (code, enhanced), str(reply))
        if text is not None:
            self.assertIn(text, "\n".join(reply.lines))
        return reply

    def login(self, conn: Conn, user: str = "alice@example.test", password: str = PASSWORD):
        self.cmd(conn, f"AUTH PLAIN {plain(user, password)}", 235, "2.7.0",
                 "Authentication successful")

    def fail_once(self, conn: Conn, user: str = "alice@example.test", advance: float = 60):
        """A wrong password: no reply until the delay has passed, then 535."""
        conn.send(f"AUTH PLAIN {plain(user, 'wrong')}")
        self.assertEqual(conn.take(), [])
        self.clock.advance(advance)
        replies = conn.take()
        self.assertEqual([(r.code, r.enhanced) for r in replies], [(535, "5.7.8")],
                         [str(r) for r in replies])

    def use_filters(self, *plugins) -> None:
        old = self.ctx.pipeline
        self.ctx.pipeline = Pipeline(
            old.generation + 1, old.relay, old.router,
            [LoadedPlugin(type(p).__name__, p, "test") for p in plugins],
            reactor=self.ctx.reactor)

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)


class MechanismTests(AuthTestCase):
    """SASL PLAIN (RFC 4616) and LOGIN."""

    def test_advertised_under_tls(self):
        """EHLO under TLS lists AUTH PLAIN LOGIN."""
        self.ready()
        self.assertIn("AUTH PLAIN LOGIN", self.ehlo.lines)

    def test_plain_initial_response(self):
        """AUTH PLAIN with an initial response: 235 2.7.0, and the session has the user."""
        conn = self.ready()
        self.login(conn)
        self.assertEqual(conn.proto.session.user, "alice@example.test")

    def test_plain_challenge(self):
        """AUTH PLAIN without one: an empty 334 challenge, then the response."""
        conn = self.ready()
        self.cmd(conn, "AUTH PLAIN", 334)
        self.assertIn(b"334 \r\n", conn.transport.value())
        self.cmd(conn, plain("bob", "bob-pass"), 235, "2.7.0")
        self.assertEqual(conn.proto.session.user, "bob")

    def test_plain_mechanism_case_insensitive(self):
        conn = self.ready()
        self.cmd(conn, f"auth plain {plain('bob', 'bob-pass')}", 235, "2.7.0")

    def test_plain_authzid_same(self):
        """An authzid equal to the authcid is fine (some clients send both)."""
        conn = self.ready()
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass', authzid='bob')}", 235, "2.7.0")

    def test_plain_authzid_differs(self):
        """An authzid other than the authcid is refused, as Dovecot does: 535 5.7.8."""
        conn = self.ready()
        conn.send(f"AUTH PLAIN {plain('bob', 'bob-pass', authzid='alice@example.test')}")
        self.clock.advance(60)
        reply = conn.take()[0]
        self.assertEqual((reply.code, reply.enhanced), (535, "5.7.8"))
        self.assertIsNone(conn.proto.session.user)

    def test_plain_malformed(self):
        """Base64 that is not authzid NUL authcid NUL password: 535."""
        conn = self.ready()
        conn.send(f"AUTH PLAIN {b64('just-one-field')}")
        self.clock.advance(60)
        self.assertEqual(conn.take()[0].code, 535)

    def test_plain_empty_initial_response(self):
        """C{=} is an empty initial response (RFC 4954 4): a failed login, not a syntax error."""
        conn = self.ready()
        conn.send("AUTH PLAIN =")
        self.clock.advance(60)
        self.assertEqual(conn.take()[0].code, 535)

    def test_login(self):
        """AUTH LOGIN: 334 Username:, 334 Password: (base64), then 235."""
        conn = self.ready()
        self.cmd(conn, "AUTH LOGIN", 334)
        self.assertIn(b"334 VXNlcm5hbWU6\r\n", conn.transport.value())
        self.cmd(conn, b64("scanner"), 334)
        self.assertIn(b"334 UGFzc3dvcmQ6\r\n", conn.transport.value())
        self.cmd(conn, b64("scan-pass"), 235, "2.7.0", "Authentication successful")
        self.assertEqual(conn.proto.session.user, "scanner")

    def test_login_initial_response(self):
        """AUTH LOGIN with the user name as initial response: straight to the password."""
        conn = self.ready()
        conn.take()
        self.cmd(conn, f"AUTH LOGIN {b64('scanner')}", 334)
        self.assertIn(b"334 UGFzc3dvcmQ6\r\n", conn.transport.value())
        self.cmd(conn, b64("scan-pass"), 235, "2.7.0")

    def test_login_wrong_password(self):
        conn = self.ready()
        self.cmd(conn, "AUTH LOGIN", 334)
        self.cmd(conn, b64("scanner"), 334)
        conn.send(b64("nope"))
        self.assertEqual(conn.take(), [])
        self.clock.advance(60)
        reply = conn.take()[0]
        self.assertEqual((reply.code, reply.enhanced, reply.lines),
                         (535, "5.7.8", ("Error: authentication failed",)))

    def test_unknown_user(self):
        """A name not in the file fails like a wrong password."""
        conn = self.ready()
        self.fail_once(conn, user="mallory")

    def test_utf8_password(self):
        """Passwords are UTF-8, compared in NFKC form."""
        write_users(self.users_path, {"zoe": "caf\u00e9"})
        self.checker.reload()
        conn = self.ready()
        self.cmd(conn, f"AUTH PLAIN {plain('zoe', 'cafe' + chr(0x301))}", 235, "2.7.0")

    def test_mail_after_auth(self):
        """Once logged in, MAIL (with the RFC 4954 AUTH= parameter) is accepted."""
        conn = self.ready()
        self.login(conn)
        self.cmd(conn, "MAIL FROM:<alice@example.test> AUTH=<>", 250, "2.1.0")

    def test_authenticated_may_relay(self):
        """An authenticated client outside the relay networks may send to any domain."""
        conn = self.ready()
        self.login(conn)
        self.cmd(conn, "MAIL FROM:<alice@example.test>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<someone@elsewhere.example>", 250, "2.1.5")

    def test_other_portal(self):
        """Any twisted.cred checker of IUsernamePassword can stand in for the users file."""
        db = InMemoryUsernamePasswordDatabaseDontUse(carol=b"secret")
        self.ctx.auth = Authenticator(self.config.auth, Portal(SubmitterRealm(), [db]))
        conn = self.ready()
        self.cmd(conn, f"AUTH PLAIN {plain('carol', 'secret')}", 235, "2.7.0")
        self.assertEqual(conn.proto.session.user, "carol")

    def test_checker_error_is_temporary(self):
        """A checker that cannot answer (its database down): 454 4.7.0, not counted."""

        @implementer(ICredentialsChecker)
        class Broken:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials):
                return fail(ConnectionRefusedError("ldap down"))

        self.ctx.auth = Authenticator(self.config.auth, checker=Broken())
        conn = self.ready()
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 454, "4.7.0")
        self.assertEqual(len(self.ctx.auth.tracker), 0)
        self.flushLoggedErrors()

    def test_received_header_esmtpsa(self):
        """The Received header says ESMTPSA; the user only with show_user_in_received."""
        conn = self.ready()
        self.login(conn)
        self.cmd(conn, "MAIL FROM:<alice@example.test>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<bob@example.test>", 250, "2.1.5")
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: hi\r\n\r\nhello\r\n.")
        self.assertEqual(conn.take()[0].code, 250)
        entry = self.ctx.entries[0]
        self.assertEqual(entry.client["user"], "alice@example.test")
        stored = self.ctx.spool.message_path(entry.id).read_bytes()
        self.assertIn(b"with ESMTPSA id", stored)
        self.assertNotIn(b"alice", stored.split(b"\r\n\r\n")[0].split(b"Subject")[0])


class ShowUserTests(AuthTestCase):
    auth_config = {"show_user_in_received": True}

    def test_user_in_received(self):
        conn = self.ready()
        self.login(conn)
        self.cmd(conn, "MAIL FROM:<alice@example.test>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<bob@example.test>", 250, "2.1.5")
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: hi\r\n\r\nhello\r\n.")
        self.assertEqual(conn.take()[0].code, 250)
        stored = self.ctx.spool.message_path(self.ctx.entries[0].id).read_bytes()
        self.assertIn(b"(Authenticated sender: alice@example.test)", stored)


class ErrorTests(AuthTestCase):
    """Each refusal, with the code Postfix gives."""

    def test_require_mail_before_auth(self):
        """auth = require: MAIL before AUTH is 530 5.7.0 Authentication required."""
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<alice@example.test>", 530, "5.7.0", "Authentication required")

    def test_offer_mail_without_auth(self):
        """auth = offer: MAIL without AUTH is fine, but relaying is not."""
        conn = self.ready(auth="offer")
        self.cmd(conn, "MAIL FROM:<x@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<someone@elsewhere.example>", 554, "5.7.1", "Relay access denied")

    def test_before_ehlo(self):
        conn = self.connect()
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 503, "5.5.1")

    def test_after_helo(self):
        """AUTH is an ESMTP extension: after HELO, 503."""
        conn = self.connect()
        self.cmd(conn, "HELO client.example.net", 250)
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 503, "5.5.1")

    def test_second_auth(self):
        conn = self.ready()
        self.login(conn)
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 503, "5.5.1",
                 "already authenticated")
        self.assertEqual(conn.proto.session.user, "alice@example.test")

    def test_during_transaction(self):
        conn = self.ready(auth="offer")
        self.cmd(conn, "MAIL FROM:<x@example.org>", 250, "2.1.0")
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 503, "5.5.1",
                 "MAIL transaction in progress")

    def test_unknown_mechanism(self):
        conn = self.ready()
        self.cmd(conn, "AUTH CRAM-MD5", 504, "5.5.4")

    def test_syntax(self):
        conn = self.ready()
        self.cmd(conn, "AUTH", 501, "5.5.4")
        self.cmd(conn, "AUTH PLAIN a b", 501, "5.5.4")

    def test_bad_base64_initial(self):
        conn = self.ready()
        self.cmd(conn, "AUTH PLAIN not*base64!", 501, "5.5.2", "Cannot decode response")
        self.assertIsNone(conn.proto.session.user)

    def test_bad_base64_response(self):
        conn = self.ready()
        self.cmd(conn, "AUTH LOGIN", 334)
        self.cmd(conn, "%%%", 501, "5.5.2")
        # The exchange is over: the next line is a command again.
        self.cmd(conn, "NOOP", 250, "2.0.0")

    def test_cancel_plain(self):
        """The client's * cancels: 501 5.7.0 Authentication aborted."""
        conn = self.ready()
        self.cmd(conn, "AUTH PLAIN", 334)
        self.cmd(conn, "*", 501, "5.7.0", "Authentication aborted")
        self.login(conn)

    def test_long_lines(self):
        """
        RFC 4954 4: AUTH lines may be 12288 octets (a long password
        passes); a longer line in the exchange ends it with 500 5.5.6, and
        the session goes on.
        """
        conn = self.ready()
        conn.send(f"AUTH PLAIN {plain('bob', 'p' * 4000)}")  # a wrong password, not a long line
        self.clock.advance(60)
        self.assertEqual([(r.code, r.enhanced) for r in conn.take()], [(535, "5.7.8")])
        self.cmd(conn, "AUTH LOGIN", 334)
        self.cmd(conn, "A" * 13000, 500, "5.5.6")
        self.cmd(conn, "NOOP", 250, "2.0.0")
        self.login(conn)

    def test_cancel_login(self):
        conn = self.ready()
        self.cmd(conn, "AUTH LOGIN", 334)
        self.cmd(conn, b64("bob"), 334)
        self.cmd(conn, "*", 501, "5.7.0")
        self.assertEqual(len(self.auth.tracker), 0)

    def test_not_advertised_without_tls(self):
        """Without TLS, AUTH is not advertised and is 503 5.5.1 authentication not enabled."""
        conn = self.ready(tls=False, auth="offer")
        self.assertFalse(any(line.startswith("AUTH") for line in self.ehlo.lines))
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 503, "5.5.1",
                 "authentication not enabled")
        # Nor is MAIL's AUTH= parameter taken there.
        self.cmd(conn, "MAIL FROM:<x@example.org> AUTH=<>", 555, "5.5.4")

    def test_listener_without_auth(self):
        """A listener with auth = none never offers it, TLS or not."""
        conn = self.ready(auth="none")
        self.assertFalse(any(line.startswith("AUTH") for line in self.ehlo.lines))
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 503, "5.5.1")
        self.cmd(conn, "MAIL FROM:<x@example.org>", 250, "2.1.0")

    def test_plaintext_allowed_loudly(self):
        """allow_plaintext_auth: offered without TLS, with a warning for every use."""
        conn = self.ready(tls=False, allow_plaintext_auth=True)
        self.assertIn("AUTH PLAIN LOGIN", self.ehlo.lines)
        self.login(conn)
        warnings = [formatEvent(e) for e in self.events if e.get("log_level").name == "warn"]
        self.assertTrue(any("plaintext" in w for w in warnings), warnings)

    def test_plaintext_warned_at_start(self):
        listen = [dataclasses.replace(self.config.listen[0], allow_plaintext_auth=True)]
        Authenticator(self.config.auth, checker=self.checker, listen=listen)
        self.assertIn("allow_plaintext_auth", self.logged())

    def test_auth_filter_rejects(self):
        """An IAuthFilter refusal: 535, the session stays unauthenticated."""

        @implementer(IAuthFilter)
        class NoBob:
            def auth(self, session, username):
                self.seen = (session.user, username)
                return Verdict.reject() if username == "bob" else None

        hook = NoBob()
        self.use_filters(hook)
        conn = self.ready()
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 535, "5.7.8")
        self.assertEqual(hook.seen, ("bob", "bob"))
        self.assertIsNone(conn.proto.session.user)
        self.cmd(conn, "MAIL FROM:<bob@example.test>", 530, "5.7.0")
        self.login(conn)

    def test_auth_filter_tempfails(self):
        @implementer(IAuthFilter)
        class Later:
            def auth(self, session, username):
                return Verdict.tempfail("try later", "4.7.0")

        self.use_filters(Later())
        conn = self.ready()
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 454, "4.7.0")
        self.assertIsNone(conn.proto.session.user)


class DelayAndLockoutTests(AuthTestCase):
    """The growing delay on a connection, and the lockout per client address."""

    auth_config = {"failure_limit": 3, "lockout": 600}

    def test_delay_grows(self):
        """The first 535 comes after 1 s, the second after 2 s, the third after 4 s."""
        self.auth.tracker.limit = 100
        conn = self.ready()
        for delay in (1, 2, 4):
            conn.send(f"AUTH PLAIN {plain('bob', 'wrong')}")
            self.clock.advance(delay - 0.01)
            self.assertEqual(conn.take(), [])
            self.clock.advance(0.01)
            self.assertEqual([r.code for r in conn.take()], [535])

    def test_delay_capped(self):
        self.auth.tracker.limit = 100
        conn = self.ready()
        for _ in range(8):
            self.fail_once(conn, "bob", advance=self.auth.max_failure_delay)

    def test_delay_per_connection(self):
        """Another connection starts at the first delay again."""
        self.auth.tracker.limit = 100
        conn = self.ready()
        self.fail_once(conn, "bob")
        self.fail_once(conn, "bob")
        other = self.ready()
        other.send(f"AUTH PLAIN {plain('bob', 'wrong')}")
        self.clock.advance(1)
        self.assertEqual([r.code for r in other.take()], [535])

    def test_commands_wait_for_the_delay(self):
        """A command pipelined behind a failed AUTH is answered after its 535."""
        self.auth.tracker.limit = 100
        conn = self.ready()
        conn.proto.dataReceived(f"AUTH PLAIN {plain('bob', 'wrong')}\r\nNOOP\r\n".encode())
        self.assertEqual(conn.take(), [])
        self.clock.advance(1)
        self.assertEqual([r.code for r in conn.take()], [535, 250])

    def test_lockout(self):
        """
        After failure_limit failures from one address, AUTH from it is 421
        4.7.0 and closes, on any connection, even with the right password,
        for lockout seconds; other addresses are not affected.
        """
        conn = self.ready()
        for _ in range(3):
            self.fail_once(conn, "bob")
        self.assertIn("locked out", self.logged())
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 421, "4.7.0")
        self.assertTrue(conn.closed)
        again = self.ready()
        self.cmd(again, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 421, "4.7.0")
        self.assertTrue(again.closed)
        other = self.ready(ip=OTHER_IP)
        self.login(other, "bob", "bob-pass")
        self.clock.advance(600)
        later = self.ready()
        self.login(later, "bob", "bob-pass")

    def test_failures_from_several_connections(self):
        """Failures add up across connections from the same address."""
        for _ in range(3):
            conn = self.ready()
            self.fail_once(conn, "bob")
        conn = self.ready()
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 421, "4.7.0")

    def test_failures_expire(self):
        """Failures older than the window do not count."""
        conn = self.ready()
        self.fail_once(conn, "bob")
        self.fail_once(conn, "bob")
        self.clock.advance(601)
        conn = self.ready()
        self.fail_once(conn, "bob")
        self.login(conn, "bob", "bob-pass")

    def test_success_forgets_failures(self):
        conn = self.ready()
        self.fail_once(conn, "bob")
        self.fail_once(conn, "bob")
        self.login(conn, "bob", "bob-pass")
        self.assertEqual(len(self.auth.tracker), 0)
        again = self.ready()
        self.fail_once(again, "bob")
        self.fail_once(again, "bob")
        self.login(again, "bob", "bob-pass")

    def test_reload_changes_limits(self):
        self.auth_config = {"failure_limit": 1, "lockout": 10}
        self.auth.reload(self.make_config())
        conn = self.ready()
        self.fail_once(conn, "bob", advance=1)
        self.cmd(conn, f"AUTH PLAIN {plain('bob', 'bob-pass')}", 421, "4.7.0")
        self.clock.advance(9)
        self.login(self.ready(), "bob", "bob-pass")


class FailureTrackerTests(unittest.TestCase):
    def test_bounded(self):
        tracker = FailureTracker(limit=5, window=60, lockout=60, max_entries=100)
        for i in range(1000):
            tracker.failed(f"10.0.{i // 256}.{i % 256}", 0)
        self.assertEqual(len(tracker), 100)

    def test_ipv6_by_prefix(self):
        """An IPv6 client is counted by its /64; an IPv4-mapped one as IPv4."""
        tracker = FailureTracker(limit=2, window=60, lockout=60)
        self.assertFalse(tracker.failed("2001:db8:1:2::1", 0))
        self.assertTrue(tracker.failed("2001:db8:1:2::ffff", 1))
        self.assertTrue(tracker.locked_for("2001:db8:1:2:3:4:5:6", 2))
        self.assertFalse(tracker.locked_for("2001:db8:1:3::1", 2))
        self.assertEqual(FailureTracker.key("::ffff:192.0.2.1"), "192.0.2.1")

    def test_lockout_ends(self):
        tracker = FailureTracker(limit=1, window=60, lockout=30)
        self.assertTrue(tracker.failed("192.0.2.1", 100))
        self.assertEqual(tracker.locked_for("192.0.2.1", 110), 20)
        self.assertEqual(tracker.locked_for("192.0.2.1", 130), 0)
        self.assertEqual(len(tracker), 0)


class NoPasswordInLogsTests(AuthTestCase):
    """Passwords, in clear or base64, never reach a log event."""

    auth_config = {"failure_limit": 100}

    def test_no_password_logged(self):
        secrets = ["bob-pass", "wrong-Secret-1", "wrong-Secret-2", "wrong-Secret-3"]
        conn = self.ready()
        conn.send(f"AUTH PLAIN {plain('bob', 'wrong-Secret-1')}")
        self.clock.advance(60)
        conn.take()
        self.cmd(conn, "AUTH LOGIN", 334)
        self.cmd(conn, b64("bob"), 334)
        conn.send(b64("wrong-Secret-2"))
        self.clock.advance(60)
        conn.send(f"AUTH PLAIN {plain('bob', 'wrong-Secret-3', authzid='alice@example.test')}")
        self.clock.advance(60)
        self.assertEqual([r.code for r in conn.take()], [535, 535])
        self.cmd(conn, "AUTH PLAIN", 334)
        self.cmd(conn, plain("bob", "bob-pass"), 235, "2.7.0")
        conn.proto.connectionLost(None)
        text = self.logged() + "\n".join(repr(e) for e in self.events)
        self.assertIn("bob", text)
        self.assertIn("PLAIN", text)
        self.assertIn(CLIENT_IP, text)
        for secret in secrets:
            self.assertNotIn(secret, text)
            self.assertNotIn(b64(secret), text)
            self.assertNotIn(b64(secret)[:8], text)
        for blob in (plain("bob", "bob-pass"), plain("bob", "wrong-Secret-1")):
            self.assertNotIn(blob, text)


class ReloadTests(AuthTestCase):
    def test_reload_reads_users_again(self):
        write_users(self.users_path, {"dave": "dave-pass"})
        self.auth.reload(self.make_config())
        conn = self.ready()
        self.cmd(conn, f"AUTH PLAIN {plain('dave', 'dave-pass')}", 235, "2.7.0")
        self.fail_once(self.ready(ip=OTHER_IP), "bob")

    def test_bad_file_refused_and_kept(self):
        """A bad line makes the reload fail with file:line: reason; the old users stay."""
        self.users_path.write_text("# users\ndave:plaintext\n")
        with self.assertRaises(UsersFileError) as e:
            self.auth.reload(self.make_config())
        self.assertTrue(str(e.exception).startswith(f"{self.users_path}:2: "), str(e.exception))
        self.assertIsInstance(e.exception, ValueError)
        conn = self.ready()
        self.login(conn, "bob", "bob-pass")

    def test_from_config(self):
        auth = Authenticator.from_config(self.config)
        self.assertEqual(set(auth.checker.users), {"alice@example.test", "scanner", "bob"})
        no_users = dataclasses.replace(
            self.config, auth=dataclasses.replace(self.config.auth, users=None))
        with self.assertRaises(UsersFileError) as e:
            Authenticator.from_config(no_users)
        self.assertIn("auth.users: missing", str(e.exception))


# --- the senders rule ---------------------------------------------------------------


def session(user=None) -> Session:
    return Session(id="1", client_ip=CLIENT_IP, user=user)


def envelope(sender: str | None) -> Envelope:
    if sender is None:
        return Envelope(sender=None)
    local, _, domain = sender.rpartition("@")
    return Envelope(sender=Address(local, domain))


class SenderRuleTests(AuthTestCase):
    """L{SenderLogin}: an authenticated user may only use its own senders."""

    def rule(self, **options) -> SenderLogin:
        context = SimpleNamespace(folder=self.folder, config=self.config)
        return SenderLogin(context=context, **options)

    def test_own_address(self):
        """A user whose name is an address owns it (any case)."""
        rule = self.rule()
        self.assertIsNone(rule.mail(session("alice@example.test"), envelope("Alice@Example.TEST")))

    def test_listed(self):
        rule = self.rule()
        self.assertIsNone(rule.mail(session("scanner"), envelope("scans@example.test")))
        self.assertIsNone(rule.mail(session("scanner"), envelope("anyone@dept.example.test")))

    def test_not_owned(self):
        rule = self.rule()
        verdict = rule.mail(session("scanner"), envelope("boss@example.test"))
        self.assertTrue(verdict.refuses)
        self.assertEqual(verdict.enhanced, "5.7.1")
        self.assertEqual(verdict.text,
                         "<boss@example.test>: Sender address rejected: not owned by user scanner")
        # A pattern covers exactly its domain, not subdomains.
        self.assertTrue(rule.mail(session("scanner"), envelope("x@sub.dept.example.test")).refuses)
        # A user without senders and not an address owns nothing.
        self.assertTrue(rule.mail(session("bob"), envelope("bob@example.test")).refuses)

    def test_unauthenticated_not_concerned(self):
        self.assertIsNone(self.rule().mail(session(None), envelope("boss@example.test")))

    def test_null_sender(self):
        """<> is allowed by default (bounces, receipts), refused with allow_null_sender = false."""
        self.assertIsNone(self.rule().mail(session("bob"), envelope(None)))
        self.assertTrue(self.rule(allow_null_sender=False).mail(session("bob"), envelope(None)).refuses)

    def test_star(self):
        self.assertTrue(sender_allowed(("*",), Address("x", "y.example")))

    def test_map_file(self):
        (self.folder / "senders").write_text("# map\nbob: bob@example.test, *@b.example\n")
        rule = self.rule(map="senders")
        self.assertIsNone(rule.mail(session("bob"), envelope("bob@example.test")))
        self.assertIsNone(rule.mail(session("bob"), envelope("x@b.example")))
        self.assertTrue(rule.mail(session("scanner"), envelope("scans@example.test")).refuses)

    def test_bad_map(self):
        path = self.folder / "senders"
        path.write_text("bob: ok@example.test\nbob no colon\n")
        with self.assertRaises(UsersFileError) as e:
            read_map(path)
        self.assertEqual(str(e.exception), f"{path}:2: expected name:sender,sender,...")

    def test_no_source(self):
        context = SimpleNamespace(folder=self.folder, config=SimpleNamespace(auth=SimpleNamespace(users=None)))
        self.assertRaises(ValueError, SenderLogin, context=context)

    def test_in_session(self):
        """Through the server: the refusal at MAIL (550 today, 553 with the server change)."""
        self.use_filters(self.rule())
        conn = self.ready()
        self.login(conn, "scanner", "scan-pass")
        conn.send("MAIL FROM:<boss@example.test>")
        [reply] = conn.take()
        self.assertIn(reply.code, (550, 553))  # 553 once the server maps it (see the report)
        self.assertEqual((reply.enhanced, reply.lines), ("5.7.1", (
            "<boss@example.test>: Sender address rejected: not owned by user scanner",)))
        self.cmd(conn, "MAIL FROM:<scans@example.test>", 250, "2.1.0")

    def test_loadable_by_name(self):
        """The loader finds it as module:Class (and as "senders" once it is a built-in)."""
        from twisted_mta import loader
        config = self.make_config(filter=[{"use": "twisted_mta.builtins.senders:SenderLogin"}])
        pipeline = loader.build_pipeline(config, 1, reactor=self.clock)
        self.assertTrue(pipeline.has_hook("mail"))
        if "senders" in loader.BUILTINS:
            config = self.make_config(filter=[{"use": "senders"}])
            self.assertTrue(loader.build_pipeline(config, 2, reactor=self.clock).has_hook("mail"))

