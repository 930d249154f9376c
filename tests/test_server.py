"""
Tests for L{twisted_mta.smtp.server}: the ESMTP server protocol, driven
through Twisted's in-memory transports.

Most tests talk to one L{ESMTPServer} over a L{StringTransport}; every
reply the server sends is recorded as a L{Reply} (so the code and the
enhanced code can be checked even where the wire shows no enhanced code,
before EHLO) and the wire bytes are checked where their form matters.
STARTTLS tests connect a small client over L{twisted.test.iosim} with
real TLS (L{twisted.protocols.tls}) on both ends.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from twisted.internet import ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import directlyProvides, implementer

from twisted_mta.interfaces import (
    IConnectFilter, IDataFilter, IHeloFilter, IMailFilter, IRcptFilter,
)
from twisted_mta.pipeline import LoadedPlugin, Pipeline
from twisted_mta.smtp import grammar
from twisted_mta.smtp.replies import Reply
from twisted_mta.smtp.server import HELD_INPUT, REPLIES_HELD, ESMTPFactory
from twisted_mta.smtp.tls import self_signed, server_options
from twisted_mta.values import AddHeader, RemoveHeader, Verdict

from tests.support import FakeContext, make_config

TRUSTED_IP = "192.0.2.5"  # inside the test config's networks
UNTRUSTED_IP = "198.51.100.7"
SERVER_ADDR = IPv4Address("TCP", "192.0.2.1", 25)

EHLO_KEYWORDS = ["PIPELINING", "SIZE 52428800", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES", "CHUNKING"]

_tls_options = None


def tls_options():
    """Server TLS options with a self-signed certificate (made once per run)."""
    global _tls_options
    if _tls_options is None:
        _tls_options = server_options(*self_signed("mx.example.test"))
    return _tls_options


# --- a client over a StringTransport ---------------------------------------------


class Conn:
    """
    One server protocol on a L{StringTransport}.  L{send} feeds it bytes;
    L{take} returns the replies it has sent since the last call.
    """

    def __init__(self, factory: ESMTPFactory, ip: str = TRUSTED_IP, transport=None):
        if transport is None:
            transport = StringTransport(hostAddress=SERVER_ADDR,
                                        peerAddress=IPv4Address("TCP", ip, 40000))
        self.transport = transport
        self.proto = factory.buildProtocol(transport.getPeer())
        self.sent: list[Reply] = []
        send = self.proto._send

        def record(reply: Reply) -> None:
            if not self.proto._closed:
                self.sent.append(reply)
            send(reply)

        # Every reply goes through _send: record the values as well as
        # the bytes, so enhanced codes can be checked before EHLO too.
        self.proto._send = record
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.proto.dataReceived(data)

    def take(self) -> list[Reply]:
        """The replies sent since the last call."""
        replies, self.sent = self.sent, []
        return replies

    def wire(self) -> bytes:
        """The bytes written since the last call."""
        value = self.transport.value()
        self.transport.clear()
        return value

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def holding(self) -> bool:
        """
        Whether a command waits and what comes is held, not acted on (the
        transport still reads, up to HELD_INPUT).
        """
        return self.proto._busy and self.transport.producerState == "producing"

    def lose(self) -> None:
        """The connection is gone (as the reactor would report it)."""
        self.proto.connectionLost(None)


class ServerTestCase(unittest.TestCase):
    """Builds a context and connections; asserts on replies."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir(parents=True)
        self.ctx = self.context()

    def context(self, tls=None, **sections) -> FakeContext:
        config = make_config(self.folder, **sections)
        return FakeContext(self.folder, config=config, tls_options=tls)

    def factory(self, ctx=None, **listen) -> ESMTPFactory:
        ctx = ctx if ctx is not None else self.ctx
        return ESMTPFactory(ctx, dataclasses.replace(ctx.config.listen[0], **listen))

    def connect(self, ip: str = TRUSTED_IP, factory=None, greet=True, **listen) -> Conn:
        conn = Conn(factory if factory is not None else self.factory(**listen), ip)
        if greet:
            self.assertReply(conn.take(), 220)
            conn.wire()
        return conn

    def use_filters(self, *plugins, timeout: float = 30.0) -> None:
        """Make C{plugins} the context's filters (after the configured relay rules)."""
        old = self.ctx.pipeline
        self.ctx.pipeline = Pipeline(
            old.generation + 1, old.relay, old.router,
            [LoadedPlugin(type(p).__name__, p, "test", timeout) for p in plugins],
            reactor=self.ctx.reactor)

    def assertReply(self, replies, code: int, enhanced: str | None = None,
                    text: str | None = None) -> Reply:
        """C{replies} is one reply with C{code} and C{enhanced} (and C{text} in it)."""
        self.assertEqual(len(replies), 1, f"expected one reply, got {[str(r) for r in replies]}")
        return self.assertIsReply(replies[0], code, enhanced, text)

    def assertIsReply(self, reply: Reply, code: int, enhanced: str | None = None,
                      text: str | None = None) -> Reply:
        self.assertEqual((reply.code, reply.enhanced), (code, enhanced), str(reply))
        if text is not None:
            self.assertIn(text, "\n".join(reply.lines))
        return reply

    def assertReplies(self, replies, expected) -> None:
        """C{replies} are, in order, the (code, enhanced) pairs C{expected}."""
        self.assertEqual([(r.code, r.enhanced) for r in replies], list(expected),
                         [str(r) for r in replies])

    def cmd(self, conn: Conn, line: str | bytes, code: int, enhanced: str | None = None,
            text: str | None = None) -> Reply:
        """Send one command line; it gets exactly one reply, as given."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        conn.wire()
        conn.send(line + b"\r\n")
        return self.assertReply(conn.take(), code, enhanced, text)

    def ready(self, ip: str = TRUSTED_IP, conn=None, **listen) -> Conn:
        """A connection that has said EHLO."""
        conn = conn if conn is not None else self.connect(ip, **listen)
        self.cmd(conn, "EHLO client.example.test", 250)
        conn.wire()
        return conn

    def envelope(self, conn: Conn, *rcpts: str, sender: str = "sender@example.org") -> None:
        self.cmd(conn, f"MAIL FROM:<{sender}>", 250, "2.1.0")
        for rcpt in rcpts or ("rcpt@example.test",):
            self.cmd(conn, f"RCPT TO:<{rcpt}>", 250, "2.1.5")

    def send_message(self, conn: Conn, body: bytes, *rcpts: str, **kw) -> Reply:
        """A whole DATA transaction; returns the final reply."""
        self.envelope(conn, *rcpts, **kw)
        self.cmd(conn, "DATA", 354)
        conn.send(body + b".\r\n")
        replies = conn.take()
        self.assertEqual(len(replies), 1, [str(r) for r in replies])
        return replies[0]

    def stored(self, entry) -> bytes:
        """The message of a queued entry, as it would be delivered."""
        return b"".join(self.ctx.spool.read_message(entry))

    def stored_file(self, entry) -> bytes:
        """The message part of a queued entry's spool file (what was received)."""
        return self.ctx.spool.message_path(entry.id).read_bytes()[: entry.size]

    def received_body(self, entry) -> bytes:
        """The stored message without our Received header (its first field)."""
        data = self.stored_file(entry)
        self.assertTrue(data.startswith(b"Received: "), data[:60])
        # The Received field is folded: it ends at the first line that
        # does not start with white space.
        lines = data.split(b"\r\n")
        i = 1
        while lines[i][:1] in (b"\t", b" "):
            i += 1
        return b"\r\n".join(lines[i:])


# --- greeting, EHLO and the simple commands ----------------------------------------


class GreetingTests(ServerTestCase):

    def test_greeting(self) -> None:
        conn = self.connect(greet=False)
        self.assertReply(conn.take(), 220, None, "mx.example.test ESMTP")
        self.assertEqual(conn.wire(), b"220 mx.example.test ESMTP twisted-mta\r\n")
        self.assertEqual(conn.transport.producerState, "producing")

    def test_ehlo_keywords(self) -> None:
        conn = self.connect()
        self.cmd(conn, "EHLO client.example.test", 250)
        lines = conn.wire().decode("ascii").split("\r\n")
        self.assertEqual(lines[-1], "")
        self.assertEqual(lines[:-1], ["250-mx.example.test"]
                         + [f"250-{k}" for k in EHLO_KEYWORDS[:-1]]
                         + [f"250 {EHLO_KEYWORDS[-1]}"])

    def test_ehlo_size_is_the_limit(self) -> None:
        self.ctx = self.context(limits={"message_size": 12345})
        conn = self.connect()
        reply = self.cmd(conn, "EHLO c", 250)
        self.assertIn("SIZE 12345", reply.lines)

    def test_ehlo_offers_starttls(self) -> None:
        self.ctx = self.context(tls=tls_options())
        conn = self.connect()
        reply = self.cmd(conn, "EHLO c", 250)
        self.assertEqual(list(reply.lines[1:]), EHLO_KEYWORDS + ["STARTTLS"])
        self.assertTrue(conn.wire().endswith(b"250-CHUNKING\r\n250 STARTTLS\r\n"))

    def test_no_starttls_without_certificate(self) -> None:
        conn = self.connect()
        reply = self.cmd(conn, "EHLO c", 250)
        self.assertNotIn("STARTTLS", reply.lines)
        self.cmd(conn, "STARTTLS", 502, "5.5.1")

    def test_no_starttls_on_tls_none_listener(self) -> None:
        self.ctx = self.context(tls=tls_options())
        conn = self.connect(tls="none")
        reply = self.cmd(conn, "EHLO c", 250)
        self.assertNotIn("STARTTLS", reply.lines)
        self.cmd(conn, "STARTTLS", 502, "5.5.1")
        self.assertEqual(conn.wire(), b"502 5.5.1 Error: command not implemented\r\n")

    def test_helo(self) -> None:
        conn = self.connect()
        self.cmd(conn, "HELO client.example.test", 250)
        self.assertEqual(conn.wire(), b"250 mx.example.test\r\n")
        self.assertEqual(conn.proto.session.helo, "client.example.test")
        self.assertFalse(conn.proto.session.esmtp)

    def test_helo_needs_a_name(self) -> None:
        conn = self.connect()
        self.cmd(conn, "HELO", 501, "5.5.4")
        self.cmd(conn, "EHLO", 501, "5.5.4")
        self.cmd(conn, "EHLO two words", 501, "5.5.4")

    def test_enhanced_codes_after_ehlo(self) -> None:
        conn = self.ready()
        self.cmd(conn, "NOOP", 250, "2.0.0")
        self.assertEqual(conn.wire(), b"250 2.0.0 Ok\r\n")
        self.cmd(conn, "FOO", 500, "5.5.1")
        self.assertEqual(conn.wire(), b"500 5.5.1 Error: command not recognized\r\n")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.assertEqual(conn.wire(), b"250 2.1.0 Ok\r\n")

    def test_no_enhanced_codes_after_helo(self) -> None:
        conn = self.connect()
        self.cmd(conn, "HELO c", 250)
        conn.wire()
        self.cmd(conn, "NOOP", 250, "2.0.0")
        self.assertEqual(conn.wire(), b"250 Ok\r\n")
        self.cmd(conn, "FOO", 500, "5.5.1")
        self.assertEqual(conn.wire(), b"500 Error: command not recognized\r\n")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.assertEqual(conn.wire(), b"250 Ok\r\n")

    def test_helo_after_ehlo_drops_enhanced_codes(self) -> None:
        conn = self.ready()
        self.cmd(conn, "HELO c", 250)
        conn.wire()
        self.cmd(conn, "NOOP", 250, "2.0.0")
        self.assertEqual(conn.wire(), b"250 Ok\r\n")

    def test_ehlo_resets_transaction(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "EHLO again", 250)
        self.cmd(conn, "DATA", 503, "5.5.1")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")

    def test_noop(self) -> None:
        conn = self.ready()
        self.cmd(conn, "NOOP", 250, "2.0.0")
        self.cmd(conn, "noop with an argument", 250, "2.0.0")

    def test_rset(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "RSET", 250, "2.0.0")
        self.cmd(conn, "DATA", 503, "5.5.1")
        self.cmd(conn, "RCPT TO:<a@example.test>", 503, "5.5.1")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")

    def test_rset_argument(self) -> None:
        conn = self.ready()
        self.cmd(conn, "RSET now", 501, "5.5.4")

    def test_vrfy(self) -> None:
        conn = self.ready()
        self.cmd(conn, "VRFY postmaster", 252, "2.0.0")
        self.cmd(conn, "VRFY", 501, "5.5.4")

    def test_help(self) -> None:
        conn = self.ready()
        reply = self.cmd(conn, "HELP", 214, "2.0.0")
        self.assertIn("EHLO", reply.lines[0])
        self.cmd(conn, "HELP MAIL", 214, "2.0.0")

    def test_quit(self) -> None:
        conn = self.ready()
        self.cmd(conn, "QUIT", 221, "2.0.0")
        self.assertEqual(conn.wire(), b"221 2.0.0 Bye\r\n")
        self.assertTrue(conn.closed)

    def test_quit_ends_reading(self) -> None:
        """Nothing pipelined behind QUIT is executed."""
        conn = self.ready()
        conn.send(b"QUIT\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n")
        self.assertReply(conn.take(), 221, "2.0.0")
        self.assertTrue(conn.closed)
        self.assertNotIn("MAIL", conn.proto.counts)

    def test_connection_lost_aborts_transaction(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: half\r\n")
        conn.lose()
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])

    def test_unknown_command(self) -> None:
        conn = self.ready()
        self.cmd(conn, "XYZZY", 500, "5.5.1")
        self.cmd(conn, "EXPN staff", 500, "5.5.1")
        self.cmd(conn, "AUTH PLAIN AAAA", 500, "5.5.1")
        self.cmd(conn, "", 500, "5.5.1")
        self.cmd(conn, "NOOP", 250, "2.0.0")

    def test_lower_case_verbs(self) -> None:
        conn = self.connect()
        self.cmd(conn, "ehlo c", 250)
        self.cmd(conn, "mail from:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "rcpt to:<b@example.test>", 250, "2.1.5")


# --- MAIL and RCPT ---------------------------------------------------------------


class EnvelopeTests(ServerTestCase):

    def test_mail_before_helo(self) -> None:
        conn = self.connect()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 503, "5.5.1", "send HELO/EHLO first")
        # Before EHLO the wire shows no enhanced code (RFC 2034).
        self.assertEqual(conn.wire(), b"503 Error: send HELO/EHLO first\r\n")

    def test_nested_mail(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "MAIL FROM:<b@example.org>", 503, "5.5.1", "nested MAIL")

    def test_rcpt_before_mail(self) -> None:
        conn = self.ready()
        self.cmd(conn, "RCPT TO:<a@example.test>", 503, "5.5.1", "need MAIL")

    def test_data_before_rcpt(self) -> None:
        conn = self.ready()
        self.cmd(conn, "DATA", 503, "5.5.1")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "DATA", 554, "5.5.1", "no valid recipients")

    def test_data_with_no_valid_recipients(self) -> None:
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<b@foreign.test>", 554, "5.7.1")
        self.cmd(conn, "DATA", 554, "5.5.1", "no valid recipients")
        # The transaction is still open: a good recipient makes it work.
        self.cmd(conn, "RCPT TO:<b@example.test>", 250, "2.1.5")
        self.cmd(conn, "DATA", 354)

    def test_null_sender(self) -> None:
        conn = self.ready()
        reply = self.send_message(conn, b"Subject: bounce\r\n\r\nhi\r\n", sender="")
        self.assertIsReply(reply, 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(entry.sender, "")

    def test_postmaster(self) -> None:
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<Postmaster>", 250, "2.1.5")
        self.cmd(conn, "RCPT TO:<POSTMASTER>", 250, "2.1.5")
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: hi\r\n\r\nhi\r\n.\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual([r.address for r in entry.recipients], ["postmaster@example.test"])

    def test_postmaster_without_local_domains(self) -> None:
        """A relay-only server (no local domains) still takes <Postmaster>."""
        self.ctx = self.context(relay={"local_domains": []})
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<Postmaster>", 250, "2.1.5")
        self.assertEqual([str(r) for r in conn.proto.txn.envelope.recipients],
                         ["postmaster@mx.example.test"])

    def test_postmaster_filtered(self) -> None:
        """Filters are still asked about <Postmaster>, canonicalised."""
        judge = Judge(rcpt=Verdict.tempfail())
        self.use_filters(judge)
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<Postmaster>", 451, "4.7.1")
        self.assertIn("rcpt:postmaster@example.test", judge.seen)

    def test_postmaster_with_a_domain_is_ordinary(self) -> None:
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<postmaster@foreign.test>", 554, "5.7.1")

    def test_bad_sender_syntax(self) -> None:
        conn = self.ready()
        for arg in ("<no domain>", "<a@@example.org>", "a@example.org", "<a@example.org",
                    "<a@-bad-.org>", '<"unterminated@example.org>'):
            self.cmd(conn, f"MAIL FROM:{arg}", 501, "5.1.7")
        self.cmd(conn, "MAIL FROM <a@example.org>", 501, "5.5.4")
        self.cmd(conn, "MAIL", 501, "5.5.4")

    def test_bad_recipient_syntax(self) -> None:
        self.ctx = self.context(limits={"bad_commands": 100})
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        for arg in ("<>", "<no domain>", "b@example.test", "<b@>", "<@example.test>"):
            self.cmd(conn, f"RCPT TO:{arg}", 501, "5.1.3")
        self.cmd(conn, "RCPT <b@example.test>", 501, "5.5.4")
        self.cmd(conn, "RCPT TO:<b@example.test>", 250, "2.1.5")

    def test_space_after_colon(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM: <a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO: <b@example.test>", 250, "2.1.5")

    def test_quoted_local_part(self) -> None:
        conn = self.ready()
        self.cmd(conn, 'MAIL FROM:<"john smith"@example.org>', 250, "2.1.0")
        self.cmd(conn, 'RCPT TO:<"x y"@example.test>', 250, "2.1.5")
        self.cmd(conn, "DATA", 354)
        conn.send(b"\r\n.\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(entry.sender, '"john smith"@example.org')
        self.assertEqual(entry.recipients[0].address, '"x y"@example.test')

    def test_size_over_limit(self) -> None:
        self.ctx = self.context(limits={"message_size": 1000})
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org> SIZE=1001", 552, "5.3.4")
        self.cmd(conn, "MAIL FROM:<a@example.org> SIZE=1000", 250, "2.1.0")

    def test_size_syntax(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org> SIZE=big", 501, "5.5.4")
        self.cmd(conn, "MAIL FROM:<a@example.org> SIZE", 501, "5.5.4")
        self.cmd(conn, "MAIL FROM:<a@example.org> SIZE=1 SIZE=2", 501, "5.5.4")

    def test_body_8bitmime(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=100", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<b@example.test>", 250, "2.1.5")
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: caf\xc3\xa9\r\n\r\n\xe9t\xe9\r\n.\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(entry.body, "8BITMIME")
        self.assertFalse(entry.smtputf8)

    def test_body_7bit_and_unknown(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org> BODY=BINARYMIME", 501, "5.5.4")
        self.cmd(conn, "MAIL FROM:<a@example.org> body=7bit", 250, "2.1.0")
        self.assertEqual(conn.proto.txn.envelope.body, "7BIT")

    def test_smtputf8(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<jos\u00e9@example.org> SMTPUTF8", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<\u00fcser@example.test>", 250, "2.1.5")
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: hi\r\n\r\nhi\r\n.\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertTrue(entry.smtputf8)
        self.assertEqual(entry.sender, "jos\u00e9@example.org")
        self.assertEqual(entry.recipients[0].address, "\u00fcser@example.test")
        self.assertIn(b"with UTF8SMTP id", self.stored_file(entry))

    def test_utf8_address_needs_smtputf8(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<jos\u00e9@example.org>", 553, "5.6.7")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<\u00fcser@example.test>", 553, "5.6.7")

    def test_smtputf8_needs_ehlo(self) -> None:
        conn = self.connect()
        self.cmd(conn, "HELO c", 250)
        self.cmd(conn, "MAIL FROM:<a@example.org> SMTPUTF8", 555, "5.5.4")
        self.cmd(conn, "MAIL FROM:<a@example.org> SIZE=10", 555, "5.5.4")

    def test_unknown_mail_parameter(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org> FOO=bar", 555, "5.5.4", "FOO")
        self.cmd(conn, "MAIL FROM:<a@example.org> RET=HDRS", 555, "5.5.4")
        self.cmd(conn, "MAIL FROM:<a@example.org> AUTH=<>", 555, "5.5.4")

    def test_rcpt_parameter(self) -> None:
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<b@example.test> NOTIFY=NEVER", 555, "5.5.4")
        self.cmd(conn, "RCPT TO:<b@example.test> FOO", 555, "5.5.4")
        self.cmd(conn, "RCPT TO:<b@example.test>", 250, "2.1.5")

    def test_source_route_ignored(self) -> None:
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<@relay.example.org:a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<@example.test:b@example.test>", 250, "2.1.5")
        self.assertEqual(str(conn.proto.txn.envelope.sender), "a@example.org")
        # ... and never opens a relay.
        self.cmd(conn, "RCPT TO:<@example.test:victim@foreign.test>", 554, "5.7.1")

    def test_duplicate_recipient(self) -> None:
        conn = self.ready()
        reply = self.send_message(conn, b"\r\n", "b@example.test", "B@example.test")
        self.assertIsReply(reply, 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(len(entry.recipients), 1)


# --- the command line --------------------------------------------------------------


class CommandLineTests(ServerTestCase):

    def test_nul_byte(self) -> None:
        conn = self.ready()
        self.cmd(conn, b"NOOP\x00", 500, "5.5.2")
        self.cmd(conn, b"MAIL FROM:<a\x00@example.org>", 500, "5.5.2")
        self.cmd(conn, b"\x00", 500, "5.5.2")
        self.assertIsNone(conn.proto.txn)

    def test_8bit_command(self) -> None:
        conn = self.ready()
        self.cmd(conn, "NOOP caf\u00e9", 500, "5.5.2")
        self.cmd(conn, "EHLO caf\u00e9.example", 500, "5.5.2")
        self.cmd(conn, "VRFY \u00fcser", 500, "5.5.2")
        self.cmd(conn, b"NOOP \xff\xfe", 500, "5.5.2")
        self.cmd(conn, b"MAIL FROM:<\xff@example.org> SMTPUTF8", 500, "5.5.2")
        self.cmd(conn, "MAIL FROM:<jos\u00e9@example.org>", 553, "5.6.7")

    def test_line_too_long(self) -> None:
        conn = self.ready()
        self.cmd(conn, "NOOP " + "x" * 600, 500, "5.5.2", "line too long")
        self.cmd(conn, "NOOP", 250, "2.0.0")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")

    def test_line_of_512_octets(self) -> None:
        conn = self.ready()
        line = "NOOP " + "x" * (512 - 2 - 5)
        self.cmd(conn, line, 250, "2.0.0")
        self.cmd(conn, line + "x", 500, "5.5.2")

    def test_long_line_does_not_run_a_command(self) -> None:
        """The tail of an overlong line is not a command."""
        conn = self.ready()
        conn.send(b"NOOP " + b"x" * 2000 + b" MAIL FROM:<a@example.org>\r\nNOOP\r\n")
        self.assertReplies(conn.take(), [(500, "5.5.2"), (250, "2.0.0")])
        self.assertIsNone(conn.proto.txn)

    def test_long_line_in_pieces(self) -> None:
        """A long line that comes in many pieces is answered once, in bounded memory."""
        conn = self.ready()
        conn.send(b"NOOP ")
        biggest = 0
        for i in range(20000):
            conn.send(b"abcdefghij")
            biggest = max(biggest, len(conn.proto._buffer))
            self.assertEqual(conn.take(), [])
        conn.send(b"\r\nNOOP\r\n")
        self.assertReplies(conn.take(), [(500, "5.5.2"), (250, "2.0.0")])
        self.assertLessEqual(biggest, grammar.MAX_MAIL_RCPT_LINE + 10)
        self.assertFalse(conn.closed)

    def test_long_line_counts_as_error_but_session_goes_on(self) -> None:
        conn = self.ready()
        for i in range(3):
            conn.send(b"x" * 5000)
            conn.send(b"\r\n")
        self.assertReplies(conn.take(), [(500, "5.5.2")] * 3)
        self.cmd(conn, "NOOP", 250, "2.0.0")

    def test_bare_lf_command(self) -> None:
        conn = self.ready()
        conn.send(b"NOOP\n")
        self.assertReply(conn.take(), 500, "5.5.2", "bare <LF>")
        conn.send(b"MAIL FROM:<a@example.org>\n")
        self.assertReply(conn.take(), 500, "5.5.2")
        self.assertIsNone(conn.proto.txn)
        self.cmd(conn, "NOOP", 250, "2.0.0")

    def test_bare_lf_command_normalize(self) -> None:
        self.ctx = self.context(limits={"bare_newline": "normalize"})
        conn = self.ready()
        conn.send(b"NOOP\n")
        self.assertReply(conn.take(), 250, "2.0.0")

    def test_bare_cr_in_command(self) -> None:
        """A bare CR is not a line end: no command hides behind one."""
        conn = self.ready()
        conn.send(b"NOOP\rMAIL FROM:<a@example.org>\r\n")
        self.assertReply(conn.take(), 500, "5.5.1")
        self.assertIsNone(conn.proto.txn)
        conn.send(b"NOOP x\rMAIL FROM:<a@example.org>\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        self.assertIsNone(conn.proto.txn)
        conn.send(b"RSET\rMAIL FROM:<a@example.org>\r\n")
        self.assertReply(conn.take(), 500, "5.5.1")
        self.assertIsNone(conn.proto.txn)

    def test_command_split_across_reads(self) -> None:
        conn = self.ready()
        for byte in b"MAIL FROM:<a@example.org>\r\n":
            conn.send(bytes([byte]))
        self.assertReply(conn.take(), 250, "2.1.0")

    def test_too_many_errors(self) -> None:
        conn = self.ready()
        for i in range(9):
            self.cmd(conn, "BOGUS", 500, "5.5.1")
        conn.send(b"BOGUS\r\nNOOP\r\n")
        self.assertReplies(conn.take(), [(500, "5.5.1"), (421, "4.7.0")])
        self.assertTrue(conn.closed)

    def test_error_kinds_all_count(self) -> None:
        conn = self.ready()
        for line in ["BOGUS", "RCPT TO:<a@example.test>", "DATA", "MAIL FROM:bad",
                     "MAIL FROM:<a@example.org> X=1", "STARTTLS", "VRFY", "HELO",
                     "NOOP\x00"]:
            conn.send(line.encode() + b"\r\n")
        self.assertEqual(len(conn.take()), 9)
        self.assertFalse(conn.closed)
        conn.send(b"x" * 600 + b"\r\n")
        self.assertReplies(conn.take(), [(500, "5.5.2"), (421, "4.7.0")])
        self.assertTrue(conn.closed)

    def test_errors_limit_from_config(self) -> None:
        self.ctx = self.context(limits={"bad_commands": 2})
        conn = self.ready()
        self.cmd(conn, "BOGUS", 500, "5.5.1")
        conn.send(b"BOGUS\r\n")
        self.assertReplies(conn.take(), [(500, "5.5.1"), (421, "4.7.0")])
        self.assertTrue(conn.closed)

    def test_talking_before_greeting(self) -> None:
        """A client that speaks before a (slow) greeting is dropped."""
        slow = SlowConnect()
        self.use_filters(slow)
        conn = self.connect(greet=False)
        self.assertEqual(conn.take(), [])
        self.assertEqual(conn.transport.producerState, "paused")
        conn.send(b"EHLO spam\r\n")
        self.assertReply(conn.take(), 554, "5.5.0")
        self.assertTrue(conn.closed)
        slow.d.callback(None)
        self.assertEqual(conn.take(), [])


@implementer(IConnectFilter)
class SlowConnect:
    """A connect filter that answers when the test says so."""

    def __init__(self):
        self.d = Deferred()

    def connect(self, session):
        return self.d


# --- relay rules -----------------------------------------------------------------


class RelayTests(ServerTestCase):

    def test_relay_denied(self) -> None:
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        reply = self.cmd(conn, "RCPT TO:<victim@foreign.test>", 554, "5.7.1")
        self.assertEqual(reply.lines, ("<victim@foreign.test>: Relay access denied",))
        self.assertEqual(conn.wire(),
                         b"554 5.7.1 <victim@foreign.test>: Relay access denied\r\n")
        self.cmd(conn, "RCPT TO:<user@example.test>", 250, "2.1.5")
        self.cmd(conn, "RCPT TO:<user@EXAMPLE.TEST>", 250, "2.1.5")

    def test_relay_allowed_from_networks(self) -> None:
        conn = self.ready(TRUSTED_IP)
        reply = self.send_message(conn, b"Subject: out\r\n\r\nhi\r\n", "friend@foreign.test")
        self.assertIsReply(reply, 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(entry.recipients[0].address, "friend@foreign.test")

    def test_relay_domains(self) -> None:
        self.ctx = self.context(relay={"relay_domains": ["backup.test"]})
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<b@backup.test>", 250, "2.1.5")
        self.cmd(conn, "RCPT TO:<b@other.test>", 554, "5.7.1")

    def test_routing_tricks_never_relay(self) -> None:
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        for rcpt in ("victim%foreign.test@example.test",
                     "foreign.test!victim@example.test",
                     '"victim@foreign.test"@example.test',
                     "victim@[203.0.113.9]",
                     "victim@[IPv6:2001:db8::1]",
                     "@example.test:victim@foreign.test",
                     "@example.test,@other.test:victim%foreign.test@example.test"):
            self.cmd(conn, f"RCPT TO:<{rcpt}>", 554, "5.7.1")
        self.assertEqual(conn.proto.txn.envelope.recipients, ())

    def test_ipv6_client(self) -> None:
        conn = Conn(self.factory(), transport=StringTransport(
            hostAddress=IPv6Address("TCP", "2001:db8::1", 25),
            peerAddress=IPv6Address("TCP", "2001:db8::5", 4000)))
        self.assertEqual(conn.proto.session.client_ip, "2001:db8::5")
        self.assertReply(conn.take(), 220)
        self.ready(conn=conn)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<b@foreign.test>", 554, "5.7.1")
        self.cmd(conn, "RCPT TO:<b@example.test>", 250, "2.1.5")


# --- limits -----------------------------------------------------------------------


class LimitTests(ServerTestCase):

    def test_too_many_recipients(self) -> None:
        self.ctx = self.context(limits={"recipients": 2})
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<r1@example.test>", 250, "2.1.5")
        self.cmd(conn, "RCPT TO:<r2@example.test>", 250, "2.1.5")
        self.cmd(conn, "RCPT TO:<r3@example.test>", 452, "4.5.3")
        self.cmd(conn, "RCPT TO:<r4@example.test>", 452, "4.5.3")
        self.cmd(conn, "DATA", 354)
        conn.send(b"\r\n.\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(len(entry.recipients), 2)
        self.assertFalse(conn.closed)

    def test_connection_limit_per_client(self) -> None:
        self.ctx = self.context(limits={"connections_per_client": 2})
        factory = self.factory()
        a = self.connect(factory=factory)
        b = self.connect(factory=factory)
        c = self.connect(factory=factory, greet=False)
        self.assertReply(c.take(), 421, "4.7.0", "too many connections")
        self.assertTrue(c.closed)
        self.assertEqual(c.wire(), b"421 mx.example.test Error: too many connections from "
                                   b"192.0.2.5\r\n")
        # Another client is still welcome.
        d = self.connect(UNTRUSTED_IP, factory=factory)
        self.assertFalse(d.closed)
        # Refused connections do not count once gone, nor do closed ones.
        c.lose()
        a.lose()
        e = self.connect(factory=factory)
        self.assertFalse(e.closed)
        self.assertFalse(b.closed)
        self.assertEqual(factory.counter.per_ip, {TRUSTED_IP: 2, UNTRUSTED_IP: 1})

    def test_connection_limit_in_all(self) -> None:
        self.ctx = self.context(limits={"connections": 3})
        factory = self.factory()
        conns = [self.connect(ip, factory=factory)
                 for ip in ("192.0.2.10", "192.0.2.11", "192.0.2.12")]
        extra = self.connect("192.0.2.13", factory=factory, greet=False)
        self.assertReply(extra.take(), 421, "4.7.0", "too many connections")
        self.assertTrue(extra.closed)
        extra.lose()
        conns[0].lose()
        again = self.connect("192.0.2.13", factory=factory)
        self.assertFalse(again.closed)
        self.assertEqual(factory.counter.total, 3)

    def test_counter_shared_between_factories(self) -> None:
        self.ctx = self.context(limits={"connections_per_client": 1})
        first = self.factory()
        second = ESMTPFactory(self.ctx, self.ctx.config.listen[0], first.counter)
        self.connect(factory=first)
        c = self.connect(factory=second, greet=False)
        self.assertReply(c.take(), 421, "4.7.0")

    def test_idle_timeout(self) -> None:
        self.ctx = self.context(limits={"command_timeout": 60})
        conn = self.ready()
        self.ctx.reactor.advance(59)
        self.cmd(conn, "NOOP", 250, "2.0.0")
        self.ctx.reactor.advance(59)
        self.assertFalse(conn.closed)
        conn.wire()
        self.ctx.reactor.advance(2)
        self.assertReply(conn.take(), 421, "4.4.2", "timeout exceeded")
        self.assertEqual(conn.wire(), b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")
        self.assertTrue(conn.closed)
        conn.lose()
        self.assertEqual(self.ctx.reactor.getDelayedCalls(), [])

    def test_idle_timeout_before_ehlo(self) -> None:
        conn = self.connect()
        self.ctx.reactor.advance(301)
        self.assertReply(conn.take(), 421, "4.4.2")
        self.assertTrue(conn.closed)

    def test_timeout_in_data(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: slow\r\n")
        self.ctx.reactor.advance(301)
        self.assertReply(conn.take(), 421, "4.4.2")
        self.assertTrue(conn.closed)
        conn.lose()
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])

    def test_timeout_cancelled_on_close(self) -> None:
        conn = self.ready()
        self.cmd(conn, "QUIT", 221, "2.0.0")
        conn.lose()
        self.assertEqual(self.ctx.reactor.getDelayedCalls(), [])


# --- filters: a test plugin -------------------------------------------------------


@implementer(IMailFilter, IRcptFilter, IDataFilter)
class Judge:
    """
    A filter whose answer at each stage is set by the test: a L{Verdict},
    an exception to raise, C{"never"} (a Deferred never fired) or
    C{"later"} (a Deferred the test fires, kept in L{waiting}).  Only
    recipients whose local part starts with C{only} are judged at rcpt.
    """

    def __init__(self, only: str = "", **answers):
        self.answers = answers
        self.only = only
        self.waiting: list[tuple[str, Deferred]] = []
        self.seen: list[str] = []

    def _answer(self, stage: str, what: str):
        self.seen.append(f"{stage}:{what}")
        answer = self.answers.get(stage)
        if isinstance(answer, Exception):
            raise answer
        if answer in ("never", "later"):
            d = Deferred()
            self.waiting.append((what, d))
            return d
        return answer

    def mail(self, session, envelope):
        return self._answer("mail", str(envelope.sender))

    def rcpt(self, session, envelope, recipient):
        if not recipient.local.startswith(self.only):
            return None
        return self._answer("rcpt", str(recipient))

    def data(self, session, envelope, message):
        return self._answer("data", str(message.size))


class FilterTests(ServerTestCase):

    def test_rcpt_filter_raises(self) -> None:
        self.use_filters(Judge(rcpt=RuntimeError("boom")))
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<b@example.test>", 451, "4.3.0")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.cmd(conn, "NOOP", 250, "2.0.0")
        self.cmd(conn, "RSET", 250, "2.0.0")
        self.assertFalse(conn.closed)

    def test_mail_filter_raises(self) -> None:
        self.use_filters(Judge(mail=RuntimeError("boom")))
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 451, "4.3.0")
        self.flushLoggedErrors(RuntimeError)
        self.assertIsNone(conn.proto.txn)
        self.cmd(conn, "NOOP", 250, "2.0.0")

    def test_data_filter_raises(self) -> None:
        self.use_filters(Judge(data=RuntimeError("boom")))
        conn = self.ready()
        reply = self.send_message(conn, b"Subject: x\r\n\r\nx\r\n")
        self.assertIsReply(reply, 451, "4.3.0")
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")

    def test_filter_returns_failed_deferred(self) -> None:
        judge = Judge(rcpt="later")
        self.use_filters(judge)
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        conn.send(b"RCPT TO:<b@example.test>\r\n")
        self.assertEqual(conn.take(), [])
        judge.waiting[0][1].errback(RuntimeError("async boom"))
        self.assertReply(conn.take(), 451, "4.3.0")
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(conn.transport.producerState, "producing")

    def test_filter_timeout(self) -> None:
        self.use_filters(Judge(rcpt="never"), timeout=5)
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        conn.send(b"RCPT TO:<b@example.test>\r\nNOOP\r\n")
        self.assertEqual(conn.take(), [])
        self.assertTrue(conn.holding())
        self.ctx.reactor.advance(4)
        self.assertEqual(conn.take(), [])
        self.ctx.reactor.advance(2)
        self.assertReplies(conn.take(), [(451, "4.3.0"), (250, "2.0.0")])
        self.flushLoggedErrors()
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertFalse(conn.closed)
        conn.send(b"RCPT TO:<ok@example.test>\r\n")
        self.ctx.reactor.advance(6)
        self.assertReply(conn.take(), 451, "4.3.0")
        self.flushLoggedErrors()

    def test_data_filter_timeout(self) -> None:
        self.use_filters(Judge(data="never"), timeout=5)
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        self.assertEqual(conn.take(), [])
        self.ctx.reactor.advance(6)
        self.assertReply(conn.take(), 451, "4.3.0")
        self.flushLoggedErrors()
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])
        # The session goes on (and the filter still never answers).
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: y\r\n\r\ny\r\n.\r\n")
        self.ctx.reactor.advance(6)
        self.assertReply(conn.take(), 451, "4.3.0")
        self.flushLoggedErrors()

    def test_verdicts(self) -> None:
        cases = [
            ("mail", Verdict.reject(), 550, "5.7.1"),
            ("mail", Verdict.reject("not yours", "5.7.1"), 553, "5.7.1"),
            ("mail", Verdict.reject("too big for you", "5.3.4"), 552, "5.3.4"),
            ("rcpt", Verdict.reject("full", "5.2.2"), 552, "5.2.2"),
            ("mail", Verdict.reject("Go away", "5.7.26"), 550, "5.7.26"),
            ("mail", Verdict.tempfail(), 451, "4.7.1"),
            ("rcpt", Verdict.reject(), 554, "5.7.1"),
            ("rcpt", Verdict.reject("No such user", "5.1.1"), 550, "5.1.1"),
            ("rcpt", Verdict.tempfail(), 451, "4.7.1"),
            ("rcpt", Verdict.tempfail("Greylisted", "4.7.10"), 451, "4.7.10"),
            ("data", Verdict.reject(), 554, "5.7.1"),
            ("data", Verdict.reject("Spam", "5.7.0"), 554, "5.7.0"),
            ("data", Verdict.tempfail(), 451, "4.7.1"),
        ]
        for stage, verdict, code, enhanced in cases:
            self.ctx = self.context()
            self.use_filters(Judge(**{stage: verdict}))
            conn = self.ready()
            if stage == "mail":
                reply = self.cmd(conn, "MAIL FROM:<a@example.org>", code, enhanced)
                self.assertIsNone(conn.proto.txn)
            elif stage == "rcpt":
                self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
                reply = self.cmd(conn, "RCPT TO:<b@example.test>", code, enhanced)
                self.assertIn("<b@example.test>", reply.lines[0])
                self.cmd(conn, "DATA", 554, "5.5.1")
            else:
                reply = self.send_message(conn, b"Subject: x\r\n\r\nx\r\n")
                self.assertIsReply(reply, code, enhanced)
                self.assertEqual(os.listdir(self.ctx.spool.queue), [])
            if verdict.text:
                self.assertIn(verdict.text, reply.lines[0])
            self.assertEqual(self.ctx.entries, [], (stage, verdict))
            self.assertFalse(conn.closed)

    def test_disconnect_verdict(self) -> None:
        self.use_filters(Judge(rcpt=Verdict.disconnect("Bye now")))
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        conn.send(b"RCPT TO:<b@example.test>\r\nNOOP\r\n")
        self.assertReply(conn.take(), 421, "4.7.0", "Bye now")
        self.assertTrue(conn.closed)

    def test_discard_at_mail(self) -> None:
        self.use_filters(Judge(mail=Verdict.discard()))
        conn = self.ready()
        reply = self.send_message(conn, b"Subject: x\r\n\r\nx\r\n")
        self.assertIsReply(reply, 250, "2.0.0", "queued as")
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])

    def test_discard_at_rcpt(self) -> None:
        self.use_filters(Judge(only="drop", rcpt=Verdict.discard()))
        conn = self.ready()
        reply = self.send_message(conn, b"Subject: x\r\n\r\nx\r\n",
                                  "drop@example.test", "keep@example.test")
        self.assertIsReply(reply, 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual([r.address for r in entry.recipients], ["keep@example.test"])

    def test_discard_every_rcpt(self) -> None:
        self.use_filters(Judge(rcpt=Verdict.discard()))
        conn = self.ready()
        reply = self.send_message(conn, b"Subject: x\r\n\r\nx\r\n")
        self.assertIsReply(reply, 250, "2.0.0")
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])

    def test_discard_at_data(self) -> None:
        self.use_filters(Judge(data=Verdict.discard()))
        conn = self.ready()
        reply = self.send_message(conn, b"Subject: x\r\n\r\nx\r\n")
        self.assertIsReply(reply, 250, "2.0.0")
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])

    def test_add_header(self) -> None:
        self.use_filters(Judge(data=Verdict.continue_(AddHeader("X-Checked", "yes"))))
        conn = self.ready()
        reply = self.send_message(conn, b"Subject: x\r\n\r\nbody\r\n")
        self.assertIsReply(reply, 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(entry.add_headers, [["X-Checked", "yes"]])
        data = self.stored(entry)
        self.assertTrue(data.startswith(b"X-Checked: yes\r\nReceived: "), data[:80])
        self.assertTrue(data.endswith(b"Subject: x\r\n\r\nbody\r\n"))

    def test_remove_header(self) -> None:
        self.use_filters(Judge(data=Verdict.continue_(
            RemoveHeader("X-Tag", "^bad"), RemoveHeader("X-Gone"))))
        conn = self.ready()
        reply = self.send_message(conn, b"X-Tag: good\r\nX-Tag: bad one\r\nX-Gone: 1\r\n"
                                        b"X-Gone: 2\r\n\tfolded\r\nSubject: x\r\n\r\nbody\r\n")
        self.assertIsReply(reply, 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(entry.remove_headers, [["X-Tag", "^bad"], ["X-Gone", None]])
        data = self.stored(entry)
        self.assertTrue(data.endswith(b"\r\nX-Tag: good\r\nSubject: x\r\n\r\nbody\r\n"), data)
        self.assertNotIn(b"bad one", data)
        self.assertNotIn(b"X-Gone", data)

    def test_data_filter_sees_message(self) -> None:
        seen = []

        @implementer(IDataFilter)
        class Look:
            def data(self, session, envelope, message):
                with message.open() as f:
                    seen.append((message.header("subject"), f.read(), envelope.recipients))

        self.use_filters(Look())
        conn = self.ready()
        self.send_message(conn, b"Subject: look\r\nTo: b\r\n\r\nbody\r\n")
        [(subject, text, rcpts)] = seen
        self.assertEqual(subject, ["look"])
        self.assertTrue(text.startswith(b"Received: "))
        self.assertTrue(text.endswith(b"Subject: look\r\nTo: b\r\n\r\nbody\r\n"))
        self.assertEqual([str(r) for r in rcpts], ["rcpt@example.test"])


# --- pipelining and flow control -------------------------------------------------


class PipeliningTests(ServerTestCase):

    def test_many_commands_in_one_read(self) -> None:
        conn = self.connect()
        conn.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
                  b"RCPT TO:<c@foreign.test>\r\nRCPT TO:<d@example.test>\r\nNOOP\r\nDATA\r\n")
        self.assertReplies(conn.take(), [(250, None), (250, "2.1.0"), (250, "2.1.5"),
                                         (250, "2.1.5"), (250, "2.1.5"), (250, "2.0.0"),
                                         (354, None)])
        conn.send(b"Subject: p\r\n\r\nhi\r\n.\r\nMAIL FROM:<e@example.org>\r\n"
                  b"RCPT TO:<f@example.test>\r\nDATA\r\n")
        self.assertReplies(conn.take(), [(250, "2.0.0"), (250, "2.1.0"), (250, "2.1.5"),
                                         (354, None)])
        conn.send(b"second\r\n.\r\nQUIT\r\n")
        self.assertReplies(conn.take(), [(250, "2.0.0"), (221, "2.0.0")])
        self.assertEqual(len(self.ctx.entries), 2)

    def test_many_transactions_in_one_read(self) -> None:
        """A long pipeline is handled without recursion (and without a stack overflow)."""
        conn = self.ready()
        one = (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
               b"BDAT 4 LAST\r\nhi\r\n")
        conn.send(one * 300 + b"NOOP\r\n" * 3000)
        replies = conn.take()
        self.assertEqual(len(replies), 3 * 300 + 3000)
        self.assertReplies(replies[:3], [(250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0")])
        self.assertEqual(len(self.ctx.entries), 300)
        self.assertEqual(conn.transport.producerState, "producing")

    def test_no_data_filter_no_header_parsing(self) -> None:
        """Without a data filter, a message's header is not parsed for one."""
        from twisted_mta.smtp import server as servermod
        parsed = []
        real = servermod.parse_headers
        self.patch(servermod, "parse_headers", lambda block: parsed.append(block) or real(block))
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        self.assertEqual(parsed, [])
        self.assertEqual(len(self.ctx.entries), 1)

    def test_no_pause_for_quick_answers(self) -> None:
        """The transport is not paused and resumed for commands that answer at once."""
        calls = []
        conn = self.ready()
        conn.transport.pauseProducing = lambda: calls.append("pause")
        self.envelope(conn)
        self.assertEqual(calls, [])

    def test_handler_deferreds(self) -> None:
        """
        A handler's Deferred that has fired is answered at once, in order,
        whatever it holds: a reply, None (it answered itself), a failure
        (a local error, logged); one waiting on another Deferred is waited
        for, and stops reading.
        """
        from twisted.internet.defer import succeed
        conn = self.ready()
        inner: Deferred = Deferred()
        answers = {
            "reply": lambda: succeed(Reply(250, "2.0.0", "fired")),
            "self": lambda: succeed(None).addCallback(
                lambda _: conn.proto._send(Reply(250, "2.0.0", "answered itself"))),
            "failed": lambda: fail(RuntimeError("broken handler")),
            "chained": lambda: succeed(None).addCallback(lambda _: inner),
        }
        conn.proto.smtp_XTEST = lambda argument: answers[argument]()
        conn.send(b"XTEST reply\r\nXTEST self\r\nXTEST failed\r\nXTEST chained\r\nNOOP\r\n")
        replies = conn.take()
        self.assertEqual([str(r) for r in replies], [
            "250 2.0.0 fired", "250 2.0.0 answered itself",
            "451 4.3.0 Error: local error in processing"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(conn.holding())
        inner.callback(Reply(250, "2.0.0", "later"))
        self.assertReplies(conn.take(), [(250, "2.0.0"), (250, "2.0.0")])
        self.assertEqual(conn.transport.producerState, "producing")

    def test_slow_rcpt_filter_stops_reading(self) -> None:
        judge = Judge(only="slow", rcpt="later")
        self.use_filters(judge)
        conn = self.ready()
        conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<slow1@example.test>\r\n"
                  b"RCPT TO:<fast1@example.test>\r\nRCPT TO:<slow2@example.test>\r\n"
                  b"RCPT TO:<fast2@example.test>\r\nRCPT TO:<slow3@example.test>\r\n"
                  b"DATA\r\n")
        self.assertReplies(conn.take(), [(250, "2.1.0")])
        self.assertEqual(conn.wire(), b"250 2.1.0 Ok\r\n")
        self.assertTrue(conn.holding())
        # More data (already on its way) is buffered, not acted on.
        conn.send(b"Subject: slow\r\n\r\nhello\r\n.\r\n")
        self.assertEqual(conn.take(), [])
        self.assertEqual(len(judge.waiting), 1)

        judge.waiting[0][1].callback(None)
        self.assertReplies(conn.take(), [(250, "2.1.5"), (250, "2.1.5")])
        self.assertTrue(conn.holding())
        self.assertEqual(len(judge.waiting), 2)

        judge.waiting[1][1].callback(Verdict.reject("Not today"))
        self.assertReplies(conn.take(), [(554, "5.7.1"), (250, "2.1.5")])
        self.assertTrue(conn.holding())

        judge.waiting[2][1].callback(None)
        self.assertReplies(conn.take(), [(250, "2.1.5"), (354, None), (250, "2.0.0")])
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertEqual([s for s in judge.seen if s.startswith("rcpt:")],
                         ["rcpt:slow1@example.test", "rcpt:slow2@example.test",
                          "rcpt:slow3@example.test"])
        [entry] = self.ctx.entries
        self.assertEqual([r.address for r in entry.recipients],
                         ["slow1@example.test", "fast1@example.test", "fast2@example.test",
                          "slow3@example.test"])

    def test_slow_mail_filter(self) -> None:
        judge = Judge(mail="later")
        self.use_filters(judge)
        conn = self.ready()
        conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nNOOP\r\n")
        self.assertEqual(conn.take(), [])
        self.assertTrue(conn.holding())
        judge.waiting[0][1].callback(Verdict.reject())
        self.assertReplies(conn.take(), [(550, "5.7.1"), (503, "5.5.1"), (250, "2.0.0")])
        self.assertEqual(conn.transport.producerState, "producing")

    def test_held_input_is_bounded(self) -> None:
        """
        While a command waits, what comes is held up to HELD_INPUT; beyond,
        the transport is paused, until the answer.
        """
        judge = Judge(mail="later")
        self.use_filters(judge)
        conn = self.ready()
        conn.send(b"MAIL FROM:<a@example.org>\r\n")
        conn.send(b"NOOP\r\n" * (HELD_INPUT // 6))
        self.assertTrue(conn.holding())
        conn.send(b"NOOP\r\n")
        self.assertEqual(conn.transport.producerState, "paused")
        self.assertEqual(conn.take(), [])
        judge.waiting[0][1].callback(None)
        self.assertReplies(conn.take(), [(250, "2.1.0")] + [(250, "2.0.0")] * (HELD_INPUT // 6 + 1))
        self.assertEqual(conn.transport.producerState, "producing")

    def test_slow_data_filter(self) -> None:
        judge = Judge(data="later")
        self.use_filters(judge)
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: x\r\n\r\nx\r\n.\r\nNOOP\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(conn.take(), [])
        self.assertTrue(conn.holding())
        judge.waiting[0][1].callback(None)
        self.assertReplies(conn.take(), [(250, "2.0.0"), (250, "2.0.0"), (250, "2.1.0")])
        self.assertEqual(len(self.ctx.entries), 1)

    def test_connection_lost_while_waiting(self) -> None:
        judge = Judge(rcpt="later")
        self.use_filters(judge)
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        conn.send(b"RCPT TO:<b@example.test>\r\n")
        conn.wire()
        conn.lose()
        judge.waiting[0][1].callback(None)
        self.assertEqual(conn.take(), [])
        self.assertEqual(conn.wire(), b"")

    def test_write_buffer_full(self) -> None:
        """When the transport's buffer is full, the server stops reading until it drains."""
        conn = self.ready()
        conn.proto.pauseProducing()
        self.assertEqual(conn.transport.producerState, "paused")
        conn.proto.resumeProducing()
        self.assertEqual(conn.transport.producerState, "producing")

    def test_write_buffer_fills_during_pipeline(self) -> None:
        """
        A transport that fills up while answering a pipeline stops the
        server there; the rest is answered when it drains.
        """
        conn = self.ready()
        real_write = conn.transport.write

        def write(data):
            real_write(data)
            conn.proto.pauseProducing()  # as a full transport would

        conn.transport.write = write
        held = REPLIES_HELD
        conn.send(b"NOOP\r\n" * (held + 1) + b"MAIL FROM:<a@example.org>\r\nNOOP\r\n")
        # Replies are written a pipelined group at a time: the first write
        # fills the transport, and the server stops there.
        self.assertReplies(conn.take(), [(250, "2.0.0")] * held)
        self.assertEqual(conn.transport.producerState, "paused")
        conn.transport.write = real_write
        conn.proto.resumeProducing()
        self.assertReplies(conn.take(), [(250, "2.0.0"), (250, "2.1.0"), (250, "2.0.0")])
        self.assertEqual(conn.transport.producerState, "producing")

    def test_write_pause_and_slow_filter(self) -> None:
        """Reading resumes only when neither the transport nor a filter holds it."""
        judge = Judge(rcpt="later")
        self.use_filters(judge)
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        conn.send(b"RCPT TO:<b@example.test>\r\n")
        conn.proto.pauseProducing()
        judge.waiting[0][1].callback(None)
        self.assertReplies(conn.take(), [(250, "2.1.5")])
        self.assertEqual(conn.transport.producerState, "paused")
        conn.proto.resumeProducing()
        self.assertEqual(conn.transport.producerState, "producing")


# --- DATA ------------------------------------------------------------------------


class DataTests(ServerTestCase):

    def test_message_queued(self) -> None:
        conn = self.ready()
        self.envelope(conn, "b@example.test", "c@example.test")
        reply = self.cmd(conn, "DATA", 354)
        self.assertEqual(conn.wire(), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        conn.send(b"Subject: hello\r\n\r\nHello.\r\n.\r\n")
        reply = self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(reply.lines, (f"Ok: queued as {entry.id}",))
        self.assertEqual(entry.sender, "sender@example.org")
        self.assertEqual([r.address for r in entry.recipients],
                         ["b@example.test", "c@example.test"])
        self.assertEqual(entry.client["ip"], TRUSTED_IP)
        self.assertEqual(entry.client["helo"], "client.example.test")
        self.assertIsNone(entry.client["tls"])
        self.assertEqual(self.received_body(entry), b"Subject: hello\r\n\r\nHello.\r\n")
        # ... and it is in the spool for good.
        [again] = list(self.ctx.spool.entries())
        self.assertEqual(again.id, entry.id)
        self.assertIsNone(conn.proto.txn)
        self.cmd(conn, "RCPT TO:<b@example.test>", 503, "5.5.1")

    def test_transaction_logged(self) -> None:
        # One event per transaction: the line log parsers read, with its
        # fields also in the event.
        from twisted.logger import formatEvent, globalLogPublisher
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        conn = self.ready()
        body = b"Subject: {x}\r\n\r\nHi.\r\n"
        reply = self.send_message(conn, body, "b@example.test", "c@example.test",
                                  sender="s{1}@example.org")
        [entry] = self.ctx.entries
        [event] = [e for e in events if "result" in e]
        sid = conn.proto.session.id
        self.assertEqual(
            formatEvent(event),
            f"{entry.id}: client=[{TRUSTED_IP}] session={sid} tls=none user=- "
            f"from=<s{{1}}@example.org> to=<b@example.test>,<c@example.test> "
            f"size={len(body)} result={reply}")
        self.assertEqual((event["id"], event["ip"], event["sid"], event["tls"], event["user"]),
                         (entry.id, TRUSTED_IP, sid, "none", "-"))
        self.assertEqual((str(event["sender"]), event["rcpts"], event["size"], event["result"]),
                         ("s{1}@example.org", "<b@example.test>,<c@example.test>",
                          len(body), str(reply)))

    def test_data_argument(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA now", 501, "5.5.4")
        self.cmd(conn, "DATA", 354)

    def test_received_header_first(self) -> None:
        conn = self.ready()
        self.send_message(conn, b"Received: from elsewhere\r\nSubject: x\r\n\r\nx\r\n")
        [entry] = self.ctx.entries
        data = self.stored_file(entry)
        first = data.split(b"\r\n\tby ")[0]
        self.assertEqual(first, b"Received: from client.example.test (unknown [192.0.2.5])")
        self.assertIn(f"by mx.example.test (twisted-mta) with ESMTP id {entry.id}\r\n"
                      "\tfor <rcpt@example.test>; ".encode(), data)
        self.assertEqual(self.received_body(entry),
                         b"Received: from elsewhere\r\nSubject: x\r\n\r\nx\r\n")

    def test_received_header_after_helo(self) -> None:
        conn = self.connect()
        self.cmd(conn, "HELO old.example", 250)
        self.send_message(conn, b"\r\n", "a@example.test", "b@example.test")
        [entry] = self.ctx.entries
        data = self.stored_file(entry)
        self.assertTrue(data.startswith(b"Received: from old.example (unknown [192.0.2.5])\r\n"
                                        b"\tby mx.example.test (twisted-mta) with SMTP id "))
        self.assertNotIn(b"\tfor <", data)

    def test_dot_unstuffing(self) -> None:
        conn = self.ready()
        body = b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\na line.\r\n. \r\n..\r\n"
        self.send_message(conn, body)
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry),
                         b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\na line.\r\n \r\n.\r\n")

    def test_dot_unstuffing_byte_by_byte(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        for byte in b"..a\r\n..\r\n.b.\r\n\r\n.\r\nNOOP\r\n":
            conn.send(bytes([byte]))
        self.assertReplies(conn.take(), [(250, "2.0.0"), (250, "2.0.0")])
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), b".a\r\n.\r\nb.\r\n\r\n")

    def test_empty_message(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b".\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), b"")

    def test_8bit_byte_for_byte(self) -> None:
        body = (b"Subject: =?utf-8?q?x?=\r\nX-Raw: \xff\xfe\x80\x00\x01\r\n\r\n"
                + bytes(range(1, 10)) + bytes(range(14, 256)) + b"\r\n"
                + b"caf\xc3\xa9 \xe9t\xe9\r\n")
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org> BODY=8BITMIME", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<b@example.test>", 250, "2.1.5")
        self.cmd(conn, "DATA", 354)
        conn.send(body + b".\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), body)
        self.assertTrue(self.stored(entry).endswith(body))

    def test_body_in_many_pieces(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        body = b"".join(b"line %d with some text\r\n" % i for i in range(5000))
        for i in range(0, len(body), 777):
            conn.send(body[i:i + 777])
        conn.send(b".\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), body)

    def test_message_too_big(self) -> None:
        self.ctx = self.context(limits={"message_size": 1000})
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: big\r\n\r\n")
        for i in range(50):
            conn.send(b"x" * 98 + b"\r\n")
            self.assertEqual(conn.take(), [])
        conn.send(b".\r\n")
        self.assertReply(conn.take(), 552, "5.3.4")
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])
        self.assertFalse(conn.closed)
        # The session goes on: the next transaction works.
        reply = self.send_message(conn, b"Subject: small\r\n\r\nsmall\r\n")
        self.assertIsReply(reply, 250, "2.0.0")
        self.assertEqual(len(self.ctx.entries), 1)

    def test_spool_stops_expecting_every_message_that_ends(self) -> None:
        """
        Every message begun is committed or aborted, whatever ends it: the
        spool's count of messages being received (which a commit batch
        waits on) goes back to 0.
        """
        self.ctx = self.context(limits={"message_size": 1000})
        spool = self.ctx.spool
        conn = self.ready()
        self.send_message(conn, b"Subject: ok\r\n\r\nok\r\n")
        self.send_message(conn, b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n")
        self.send_message(conn, b"Subject: bare\r\n\r\nbare\nLF\r\n")
        self.envelope(conn)
        conn.send(b"BDAT 10\r\n0123456789")
        self.assertReply(conn.take(), 250, "2.0.0")
        self.cmd(conn, "RSET", 250, "2.0.0")
        self.assertEqual(spool._receiving, 0)
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: cut\r\n")
        self.assertEqual(spool._receiving, 1)
        conn.lose()
        self.assertEqual(spool._receiving, 0)

    def test_message_at_the_limit(self) -> None:
        body = b"Subject: x\r\n\r\n" + b"y" * (1000 - 16) + b"\r\n"
        self.assertEqual(len(body), 1000)
        self.ctx = self.context(limits={"message_size": 1000})
        conn = self.ready()
        self.assertIsReply(self.send_message(conn, body), 250, "2.0.0")
        self.assertIsReply(self.send_message(conn, body + b"z\r\n"), 552, "5.3.4")

    def test_too_big_in_one_read_then_pipelined(self) -> None:
        self.ctx = self.context(limits={"message_size": 100})
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"x" * 5000 + b"\r\n.\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n")
        self.assertReplies(conn.take(), [(552, "5.3.4"), (250, "2.1.0"), (250, "2.0.0")])

    def test_pipelined_after_terminator(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: x\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\n")
        self.assertReplies(conn.take(), [(250, "2.0.0"), (250, "2.0.0"), (250, "2.0.0")])

    def test_commit_fails(self) -> None:
        conn = self.ready()

        def broken(incoming, entry):
            incoming.abort()
            return fail(OSError("disk full"))

        self.ctx.spool.commit = broken
        reply = self.send_message(conn, b"Subject: x\r\n\r\nx\r\n")
        self.assertIsReply(reply, 451, "4.3.0")
        self.flushLoggedErrors(OSError)
        self.assertEqual(self.ctx.entries, [])
        self.cmd(conn, "NOOP", 250, "2.0.0")

    def test_spool_file_cannot_be_made(self) -> None:
        conn = self.ready()

        def broken():
            raise OSError("no space")

        self.ctx.spool.new_message = broken
        self.envelope(conn)
        self.cmd(conn, "DATA", 451, "4.3.0")
        self.flushLoggedErrors(OSError)
        self.assertFalse(conn.closed)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 503, "5.5.1")
        self.cmd(conn, "RSET", 250, "2.0.0")

    def test_refused_data_ends_pipelining(self) -> None:
        """
        Commands pipelined behind a refused DATA never start a message:
        the refusal, then 554 5.5.0 and the connection closes.
        """
        conn = self.ready(UNTRUSTED_IP)
        conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<v@foreign.test>\r\nDATA\r\n"
                  b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@example.test>\r\nDATA\r\n"
                  b"Subject: smuggled\r\n\r\n.\r\n")
        self.assertReplies(conn.take(), [(250, "2.1.0"), (554, "5.7.1"), (554, "5.5.1"),
                                         (554, "5.5.0")])
        self.assertTrue(conn.closed)
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(conn.proto.counts, {"EHLO": 1, "MAIL": 1, "RCPT": 1, "DATA": 1})

    def test_refused_data_without_transaction_ends_pipelining(self) -> None:
        conn = self.ready()
        conn.send(b"DATA\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertReplies(conn.take(), [(503, "5.5.1"), (554, "5.5.0")])
        self.assertTrue(conn.closed)
        self.assertIsNone(conn.proto.txn)

    def test_refused_data_alone(self) -> None:
        """A client that waits for the DATA reply just gets it."""
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "DATA", 554, "5.5.1")
        self.assertFalse(conn.closed)


# --- BDAT ------------------------------------------------------------------------


class BdatTests(ServerTestCase):

    def test_chunks(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT 12\r\nSubject: x\r\n")
        self.assertReply(conn.take(), 250, "2.0.0", "12 bytes")
        conn.send(b"BDAT 7\r\n\r\nHello")
        self.assertReply(conn.take(), 250, "2.0.0", "19 bytes")
        conn.send(b"BDAT 8 LAST\r\n world\r\n")
        reply = self.assertReply(conn.take(), 250, "2.0.0", "queued as")
        [entry] = self.ctx.entries
        self.assertIn(entry.id, reply.lines[0])
        self.assertEqual(self.received_body(entry), b"Subject: x\r\n\r\nHello world\r\n")
        self.assertIsNone(conn.proto.txn)

    def test_chunks_then_empty_last(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT 14\r\nSubject: x\r\n\r\nBDAT 4\r\nab\r\n")
        self.assertReplies(conn.take(), [(250, "2.0.0"), (250, "2.0.0")])
        conn.send(b"BDAT 0 LAST\r\n")
        self.assertReply(conn.take(), 250, "2.0.0", "queued as")

    def test_bdat_0_last(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "BDAT 0 LAST", 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), b"")

    def test_bdat_0_then_more_commands(self) -> None:
        """After an empty chunk, what follows in the same read is commands."""
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT 0\r\nBDAT 3\r\nabcBDAT 0\r\nBDAT 2 LAST\r\nde"
                  b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
                  b"BDAT 0 LAST\r\nNOOP\r\nQUIT\r\n")
        self.assertReplies(conn.take(), [(250, "2.0.0")] * 4 + [(250, "2.1.0"), (250, "2.1.5"),
                                         (250, "2.0.0"), (250, "2.0.0"), (221, "2.0.0")])
        self.assertEqual([self.received_body(e) for e in self.ctx.entries], [b"abcde", b""])

    def test_bdat_last_lower_case(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"bdat 5 last\r\nx\r\n\r\n")
        self.assertReply(conn.take(), 250, "2.0.0", "queued as")

    def test_chunk_bytes_are_never_commands(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        chunk = (b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<evil@x.test>\r\n"
                 b"RCPT TO:<v@example.test>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n")
        conn.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        self.assertReply(conn.take(), 250, "2.0.0", "queued as")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), chunk)
        self.assertEqual(conn.proto.counts.get("MAIL"), 1)
        self.assertFalse(conn.closed)

    def test_chunk_in_pieces(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        chunk = b"".join(b"%05d\r\n" % i for i in range(1000))
        data = b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n"
        for i in range(0, len(data), 333):
            conn.send(data[i:i + 333])
        self.assertReplies(conn.take(), [(250, "2.0.0"), (250, "2.0.0")])
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), chunk)

    def test_bdat_kept_byte_for_byte(self) -> None:
        """BDAT data is never unstuffed: what comes is what is kept."""
        conn = self.ready()
        self.envelope(conn)
        chunk = b"Subject: x\r\n\r\n..dot\r\n.\r\n\x00\xff\x80\r\n"
        conn.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), chunk)

    def test_bdat_bare_newlines(self) -> None:
        """
        The bare-newline rule applies to BDAT too: such a message could
        still smuggle through a laxer server it is relayed to.
        """
        conn = self.ready()
        self.envelope(conn)
        chunk = b"Subject: x\r\n\r\nbare\n.\nMAIL FROM:<e@x.test>\r\n"
        conn.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        self.assertReply(conn.take(), 250, "2.0.0")
        conn.send(b"BDAT 0 LAST\r\n")
        self.assertReply(conn.take(), 550, "5.5.2")
        self.assertEqual(self.ctx.entries, [])

        self.ctx = self.context(limits={"bare_newline": "normalize"})
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry),
                         b"Subject: x\r\n\r\nbare\r\n.\r\nMAIL FROM:<e@x.test>\r\n")

    def test_bdat_without_mail(self) -> None:
        conn = self.ready()
        chunk = b"MAIL FROM:<evil@x.test>\r\nNOOP\r\n"
        conn.send(b"BDAT %d\r\n" % len(chunk) + chunk + b"NOOP\r\n")
        self.assertReplies(conn.take(), [(503, "5.5.1"), (250, "2.0.0")])
        self.assertNotIn("MAIL", conn.proto.counts)
        conn.send(b"BDAT 6 LAST\r\nQUIT\r\n")
        self.assertReply(conn.take(), 503, "5.5.1")
        self.assertFalse(conn.closed)

    def test_bdat_before_helo(self) -> None:
        conn = self.connect()
        conn.send(b"BDAT 6\r\nQUIT\r\n")
        self.assertReply(conn.take(), 503, "5.5.1")
        self.assertFalse(conn.closed)

    def test_bdat_without_recipients(self) -> None:
        conn = self.ready(UNTRUSTED_IP)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<v@foreign.test>", 554, "5.7.1")
        conn.send(b"BDAT 6\r\nQUIT\r\nRCPT TO:<b@example.test>\r\nBDAT 6 LAST\r\nQUIT\r\n")
        self.assertReplies(conn.take(), [(554, "5.5.1"), (503, "5.5.1"), (554, "5.5.1")])
        self.assertFalse(conn.closed)
        self.assertIsNone(conn.proto.txn)
        self.assertEqual(self.ctx.entries, [])

    def test_bdat_syntax(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "BDAT", 501, "5.5.4")
        self.cmd(conn, "BDAT x", 501, "5.5.4")
        self.cmd(conn, "BDAT -1", 501, "5.5.4")
        self.cmd(conn, "BDAT 0 LAST now", 501, "5.5.4")
        self.cmd(conn, "BDAT 0 LAST", 250, "2.0.0")

    def test_data_after_bdat(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT 3\r\nabc")
        self.assertReply(conn.take(), 250, "2.0.0")
        self.cmd(conn, "DATA", 503, "5.5.1")
        self.cmd(conn, "RCPT TO:<x@example.test>", 503, "5.5.1")
        conn.send(b"BDAT 2 LAST\r\n\r\n")
        self.assertReply(conn.take(), 250, "2.0.0", "queued as")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), b"abc\r\n")

    def test_bdat_after_data_refused(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"BDAT 3 LAST\r\n.\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), b"BDAT 3 LAST\r\n")

    def test_bdat_then_data_then_bdat(self) -> None:
        conn = self.ready()
        self.envelope(conn, "one@example.test")
        conn.send(b"BDAT 5 LAST\r\none\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        reply = self.send_message(conn, b"two\r\n", "two@example.test")
        self.assertIsReply(reply, 250, "2.0.0")
        self.envelope(conn, "three@example.test")
        conn.send(b"BDAT 7 LAST\r\nthree\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        bodies = [self.received_body(e) for e in self.ctx.entries]
        self.assertEqual(bodies, [b"one\r\n", b"two\r\n", b"three\r\n"])

    def test_bdat_pipelined_transactions(self) -> None:
        conn = self.ready()
        conn.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
                  b"BDAT 4\r\nab\r\nBDAT 3 LAST\r\nc\r\n"
                  b"MAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.test>\r\n"
                  b"BDAT 5 LAST\r\nxyz\r\n")
        self.assertReplies(conn.take(), [(250, "2.1.0"), (250, "2.1.5"), (250, "2.0.0"),
                                         (250, "2.0.0"), (250, "2.1.0"), (250, "2.1.5"),
                                         (250, "2.0.0")])

    def test_bdat_too_big(self) -> None:
        self.ctx = self.context(limits={"message_size": 1000})
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT 600\r\n" + b"x" * 600)
        self.assertReply(conn.take(), 250, "2.0.0")
        conn.send(b"BDAT 600 LAST\r\n" + b"x" * 600)
        self.assertReply(conn.take(), 552, "5.3.4")
        self.assertEqual(self.ctx.entries, [])
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])
        self.assertFalse(conn.closed)
        self.envelope(conn)
        conn.send(b"BDAT 5 LAST\r\nsmall")
        self.assertReply(conn.take(), 250, "2.0.0")
        self.assertEqual(len(self.ctx.entries), 1)

    def test_bdat_too_big_pipelined_chunks(self) -> None:
        """
        Chunks already pipelined behind the one that went over the limit
        are read and refused alike (RFC 3030 4.2), not taken as commands
        or counted as errors; then the session goes on.
        """
        self.ctx = self.context(limits={"message_size": 1000})
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT 2000\r\n" + b"x" * 2000)
        self.assertReply(conn.take(), 552, "5.3.4")
        for i in range(12):
            conn.send(b"BDAT 500\r\n" + b"MAIL FROM:<e@x.test>\r\n".ljust(500, b"y"))
        conn.send(b"BDAT 10 LAST\r\n" + b"z" * 10)
        replies = conn.take()
        self.assertEqual(len(replies), 13)
        for reply in replies:
            self.assertIsReply(reply, 552, "5.3.4")
        self.assertFalse(conn.closed)
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])
        self.envelope(conn)
        self.cmd(conn, "BDAT 0 LAST", 250, "2.0.0")

    def test_bdat_too_big_then_new_transaction(self) -> None:
        """A client that stops after the refused chunk can start again."""
        self.ctx = self.context(limits={"message_size": 1000})
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT 2000\r\n" + b"x" * 2000)
        self.assertReply(conn.take(), 552, "5.3.4")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        self.cmd(conn, "RCPT TO:<b@example.test>", 250, "2.1.5")
        self.cmd(conn, "BDAT 0 LAST", 250, "2.0.0")
        self.assertEqual(len(self.ctx.entries), 1)

    def test_bdat_timeout_mid_chunk(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        conn.send(b"BDAT 100\r\nabc")
        self.ctx.reactor.advance(301)
        self.assertReply(conn.take(), 421, "4.4.2")
        conn.lose()
        self.assertEqual(os.listdir(self.ctx.spool.queue), [])


# --- smuggling -------------------------------------------------------------------

SMUGGLE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"]


def smuggling_body(end: bytes) -> bytes:
    return (b"Subject: innocent\r\n\r\nHello" + end
            + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@example.test>\r\nDATA\r\n"
            + b"Subject: smuggled\r\n\r\nevil\r\n")


class SmugglingTests(ServerTestCase):

    def smuggle(self, end: bytes, byte_by_byte: bool = False) -> list[Reply]:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        data = smuggling_body(end) + b".\r\nNOOP\r\n"
        if byte_by_byte:
            for b in data:
                conn.send(bytes([b]))
        else:
            conn.send(data)
        self.assertEqual(conn.proto.counts.get("MAIL"), 1, end)
        self.assertEqual(conn.proto.counts.get("DATA"), 1, end)
        self.assertFalse(conn.closed)
        return conn.take()

    def test_reject(self) -> None:
        for end in SMUGGLE_ENDS:
            for pieces in (False, True):
                self.ctx = self.context()
                replies = self.smuggle(end, pieces)
                self.assertReplies(replies, [(550, "5.5.2"), (250, "2.0.0")])
                self.assertEqual(self.ctx.entries, [], end)
                self.assertEqual(os.listdir(self.ctx.spool.queue), [], end)

    def test_normalize(self) -> None:
        for end in SMUGGLE_ENDS:
            for pieces in (False, True):
                self.ctx = self.context(limits={"bare_newline": "normalize"})
                replies = self.smuggle(end, pieces)
                self.assertReplies(replies, [(250, "2.0.0"), (250, "2.0.0")])
                [entry] = self.ctx.entries
                body = self.received_body(entry)
                self.assertEqual(body.count(b"\r"), body.count(b"\r\n"), (end, body))
                self.assertEqual(body.count(b"\n"), body.count(b"\r\n"), (end, body))
                self.assertTrue(body.startswith(b"Subject: innocent\r\n\r\nHello\r\n"))
                self.assertTrue(body.endswith(b"\r\nevil\r\n"), body)

    def test_clean_message_in_reject_mode(self) -> None:
        conn = self.ready()
        reply = self.send_message(conn, b"Subject: ok\r\n\r\nline\r\n")
        self.assertIsReply(reply, 250, "2.0.0")

    def test_bare_cr_at_the_end(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: x\r\n\r\nend\r")
        conn.send(b"\r\n.\r\n")
        self.assertReply(conn.take(), 550, "5.5.2")

    def test_crlf_split_between_reads(self) -> None:
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        conn.send(b"Subject: x\r")
        conn.send(b"\n\r\nbody\r")
        conn.send(b"\n.\r")
        conn.send(b"\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        [entry] = self.ctx.entries
        self.assertEqual(self.received_body(entry), b"Subject: x\r\n\r\nbody\r\n")


# --- STARTTLS ----------------------------------------------------------------------


class _Bypass:
    """What the TLS layer writes to: the fake connection's raw side."""

    def __init__(self, connection: "TLSFakeTransport"):
        self._connection = connection

    def __getattr__(self, name):
        return getattr(self._connection, name)

    def write(self, data: bytes) -> None:
        iosim.FakeTransport.write(self._connection, data)

    def writeSequence(self, iovec) -> None:
        iosim.FakeTransport.write(self._connection, b"".join(iovec))

    def loseConnection(self) -> None:
        iosim.FakeTransport.loseConnection(self._connection)


class TLSFakeTransport(iosim.FakeTransport):
    """
    An iosim transport whose C{startTLS} is real TLS, layered the way
    Twisted's TCP transports do it (L{twisted.internet._newtls}): the
    protocol keeps its transport, which from then on provides
    L{ISSLTransport} and sends through a L{TLSMemoryBIOProtocol}.
    """

    TLS = False
    paused = False

    def __init__(self, protocol, isServer, clock, **kw):
        super().__init__(protocol, isServer, **kw)
        self.clock = clock

    def startTLS(self, contextFactory, normal=True):
        client = (not self.isServer) if normal else self.isServer
        factory = TLSMemoryBIOFactory(contextFactory, client, None, clock=self.clock)
        tls = TLSMemoryBIOProtocol(factory, self.protocol, False)
        self.protocol = tls
        self.getHandle = tls.getHandle
        directlyProvides(self, ISSLTransport)
        self.TLS = True
        tls.makeConnection(_Bypass(self))

    def write(self, data: bytes) -> None:
        if self.TLS:
            self.protocol.write(data)
        else:
            super().write(data)

    def loseConnection(self) -> None:
        if self.TLS and not self.disconnecting:
            self.protocol.loseConnection()
        else:
            super().loseConnection()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


class LineClient(Protocol):
    """The client side: collects what the server says."""

    def __init__(self):
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def take(self) -> bytes:
        data, self.received = self.received, b""
        return data


class StartTLSTests(ServerTestCase):

    def setUp(self) -> None:
        super().setUp()
        self.ctx = self.context(tls=tls_options())

    def tls_connect(self, ctx=None, **listen):
        ctx = ctx if ctx is not None else self.ctx
        factory = self.factory(ctx, **listen)
        peer = IPv4Address("TCP", UNTRUSTED_IP, 40000)
        server = factory.buildProtocol(peer)
        client = LineClient()
        self.server_io = TLSFakeTransport(server, True, ctx.reactor,
                                          hostAddress=SERVER_ADDR, peerAddress=peer)
        self.client_io = TLSFakeTransport(client, False, ctx.reactor,
                                          hostAddress=peer, peerAddress=SERVER_ADDR)
        self.pump = iosim.connect(server, self.server_io, client, self.client_io,
                                  clock=ctx.reactor)
        self.assertTrue(client.take().startswith(b"220 mx.example.test ESMTP"))
        return server, client

    def say(self, client: LineClient, data: bytes) -> bytes:
        client.transport.write(data)
        self.pump.flush()
        return client.take()

    def start_tls(self, server, client, extra: bytes = b"") -> None:
        reply = self.say(client, b"STARTTLS\r\n" + extra)
        self.assertIn(reply, (b"220 2.0.0 Ready to start TLS\r\n",  # after EHLO
                              b"220 Ready to start TLS\r\n"))
        self.client_io.startTLS(ssl.CertificateOptions())
        self.pump.flush()
        self.assertTrue(ISSLTransport.providedBy(server.transport))

    def test_starttls(self) -> None:
        server, client = self.tls_connect()
        reply = self.say(client, b"EHLO c\r\n")
        self.assertTrue(reply.endswith(b"250-CHUNKING\r\n250 STARTTLS\r\n"), reply)
        self.start_tls(server, client)
        # The session starts over: HELO is forgotten ...
        self.assertEqual(self.say(client, b"MAIL FROM:<a@example.org>\r\n"),
                         b"503 Error: send HELO/EHLO first\r\n")
        # ... and STARTTLS is no longer offered.
        reply = self.say(client, b"EHLO c\r\n")
        self.assertTrue(reply.endswith(b"250 CHUNKING\r\n"), reply)
        self.assertNotIn(b"STARTTLS", reply)
        self.assertEqual(self.say(client, b"STARTTLS\r\n"),
                         b"503 5.5.1 Error: TLS already active\r\n")
        self.assertEqual(self.say(client, b"MAIL FROM:<a@example.org>\r\n"
                                          b"RCPT TO:<b@example.test>\r\nDATA\r\n"),
                         b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        reply = self.say(client, b"Subject: secret\r\n\r\nhush\r\n.\r\n")
        self.assertTrue(reply.startswith(b"250 2.0.0 Ok: queued as "), reply)
        [entry] = self.ctx.entries
        self.assertTrue(entry.client["tls"].startswith("TLSv1."), entry.client)
        data = self.stored_file(entry)
        self.assertIn(b"\t(using TLSv1.", data.split(b"\r\n")[1])
        self.assertIn(b" with ESMTPS id ", data)
        self.assertIsNotNone(server.session.tls)
        self.assertEqual(self.say(client, b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")

    def test_plaintext_after_starttls_discarded(self) -> None:
        """CVE-2011-0411: commands pipelined in the clear behind STARTTLS are dropped."""
        server, client = self.tls_connect()
        self.say(client, b"EHLO c\r\n")
        self.start_tls(server, client, extra=b"MAIL FROM:<evil@x.test>\r\n"
                                             b"RCPT TO:<v@example.test>\r\n")
        self.assertNotIn("MAIL", server.counts)
        self.assertNotIn("RCPT", server.counts)
        self.assertIsNone(server.txn)
        self.assertEqual(client.take(), b"")
        self.assertEqual(self.say(client, b"EHLO c\r\n")[:4], b"250-")
        self.assertEqual(self.say(client, b"RCPT TO:<v@example.test>\r\n"),
                         b"503 5.5.1 Error: need MAIL command\r\n")

    def test_plaintext_in_next_packet_never_read_as_tls(self) -> None:
        """Clear text sent after STARTTLS but before the handshake breaks the handshake."""
        server, client = self.tls_connect()
        self.say(client, b"EHLO c\r\n")
        self.assertEqual(self.say(client, b"STARTTLS\r\n"), b"220 2.0.0 Ready to start TLS\r\n")
        iosim.FakeTransport.write(self.client_io, b"MAIL FROM:<evil@x.test>\r\n")
        self.pump.flush()
        self.assertNotIn("MAIL", server.counts)
        self.assertTrue(server._closed)

    def test_starttls_with_parameter(self) -> None:
        server, client = self.tls_connect()
        self.say(client, b"EHLO c\r\n")
        self.assertEqual(self.say(client, b"STARTTLS now\r\n"),
                         b"501 5.5.4 Syntax: STARTTLS\r\n")
        self.assertFalse(ISSLTransport.providedBy(server.transport))

    def test_starttls_in_transaction(self) -> None:
        server, client = self.tls_connect()
        self.say(client, b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.say(client, b"STARTTLS\r\n"),
                         b"503 5.5.1 Error: MAIL transaction in progress\r\n")
        self.assertFalse(ISSLTransport.providedBy(server.transport))

    def test_starttls_before_ehlo(self) -> None:
        server, client = self.tls_connect()
        self.start_tls(server, client)
        self.assertEqual(self.say(client, b"EHLO c\r\n")[:4], b"250-")

    def test_require_starttls(self) -> None:
        server, client = self.tls_connect(tls="require-starttls")
        reply = self.say(client, b"EHLO c\r\n")
        self.assertIn(b"250 STARTTLS\r\n", reply)
        self.assertEqual(self.say(client, b"MAIL FROM:<a@example.org>\r\n"),
                         b"530 5.7.0 Must issue a STARTTLS command first\r\n")
        self.start_tls(server, client)
        self.say(client, b"EHLO c\r\n")
        self.assertEqual(self.say(client, b"MAIL FROM:<a@example.org>\r\n"), b"250 2.1.0 Ok\r\n")

    def test_require_starttls_on_plain_transport(self) -> None:
        conn = self.ready(tls="require-starttls")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 530, "5.7.0")
        self.cmd(conn, "RCPT TO:<b@example.test>", 503, "5.5.1")

    def test_tls_none_listener(self) -> None:
        server, client = self.tls_connect(tls="none")
        reply = self.say(client, b"EHLO c\r\n")
        self.assertNotIn(b"STARTTLS", reply)
        self.assertEqual(self.say(client, b"STARTTLS\r\n"),
                         b"502 5.5.1 Error: command not implemented\r\n")
        self.assertFalse(ISSLTransport.providedBy(server.transport))

    def test_stop_reading_under_tls(self) -> None:
        """
        A slow filter pauses the (TLS) transport as it does a plain one,
        once more than HELD_INPUT came meanwhile.
        """
        judge = Judge(rcpt="later")
        self.use_filters(judge)
        server, client = self.tls_connect()
        self.start_tls(server, client)
        self.say(client, b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
        self.assertEqual(self.say(client, b"RCPT TO:<b@example.test>\r\nNOOP\r\n"), b"")
        self.assertFalse(self.server_io.paused)
        noops = HELD_INPUT // len(b"NOOP\r\n") + 1
        self.assertEqual(self.say(client, b"NOOP\r\n" * noops), b"")
        self.assertTrue(self.server_io.paused)
        judge.waiting[0][1].callback(None)
        self.pump.flush()
        self.assertEqual(client.take(), b"250 2.1.5 Ok\r\n" + b"250 2.0.0 Ok\r\n" * (1 + noops))
        self.assertFalse(self.server_io.paused)

    def test_implicit_tls(self) -> None:
        """An implicit-TLS listener: the session is under TLS from the start."""
        factory = TLSMemoryBIOFactory(tls_options(), False, self.factory(tls="implicit"),
                                      clock=self.ctx.reactor)
        peer = IPv4Address("TCP", UNTRUSTED_IP, 40000)
        server = factory.buildProtocol(peer)
        client = LineClient()
        server_io = iosim.FakeTransport(server, True, hostAddress=SERVER_ADDR, peerAddress=peer)
        self.client_io = TLSFakeTransport(client, False, self.ctx.reactor,
                                          hostAddress=peer, peerAddress=SERVER_ADDR)
        self.pump = iosim.connect(server, server_io, client, self.client_io,
                                  greet=False, clock=self.ctx.reactor)
        self.client_io.startTLS(ssl.CertificateOptions())
        self.pump.flush()
        self.assertTrue(client.take().startswith(b"220 mx.example.test ESMTP"))
        smtp = server.wrappedProtocol
        self.assertTrue(smtp.session.tls.version.startswith("TLSv1."), smtp.session.tls)
        self.assertTrue(smtp.session.tls.cipher)
        reply = self.say(client, b"EHLO c\r\n")
        self.assertNotIn(b"STARTTLS", reply)
        self.assertEqual(self.say(client, b"STARTTLS\r\n"),
                         b"503 5.5.1 Error: TLS already active\r\n")
        self.say(client, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n")
        reply = self.say(client, b"DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        self.assertIn(b"250 2.0.0 Ok: queued as", reply)
        [entry] = self.ctx.entries
        data = self.stored_file(entry)
        self.assertIn(b" with cipher ", data.split(b"\r\n")[1])
        self.assertNotIn(b"(0/0 bits)", data)
        self.assertIn(b" with ESMTPS id ", data)

    def test_helo_filter_sees_tls(self) -> None:
        """After STARTTLS, the session plugins see says TLS from EHLO on."""
        seen = []

        @implementer(IHeloFilter)
        class Look:
            def helo(self, session, hostname):
                seen.append(session.tls)

        self.use_filters(Look())
        server, client = self.tls_connect()
        self.say(client, b"EHLO c\r\n")
        self.start_tls(server, client)
        self.say(client, b"EHLO c\r\n")
        self.assertIsNone(seen[0])
        self.assertTrue(seen[1].version.startswith("TLSv1."), seen)


class TimeoutWhileBusyTests(ServerTestCase):

    def test_no_idle_timeout_while_the_client_waits_for_us(self) -> None:
        self.ctx = self.context(limits={"command_timeout": 60})
        judge = Judge(rcpt="later")
        self.use_filters(judge, timeout=600)
        conn = self.ready()
        self.cmd(conn, "MAIL FROM:<a@example.org>", 250, "2.1.0")
        conn.send(b"RCPT TO:<b@example.test>\r\n")
        self.ctx.reactor.advance(200)
        self.assertEqual(conn.take(), [])
        self.assertFalse(conn.closed)
        judge.waiting[0][1].callback(None)
        self.assertReply(conn.take(), 250, "2.1.5")
        # Idle again: the timeout applies from the answer on.
        self.ctx.reactor.advance(59)
        self.assertFalse(conn.closed)
        self.ctx.reactor.advance(2)
        self.assertReply(conn.take(), 421, "4.4.2")
        self.assertTrue(conn.closed)


@implementer(IConnectFilter, IHeloFilter)
class Doorman:
    """Answers the connect and helo stages with the verdicts given."""

    def __init__(self, connect=None, helo=None):
        self.answers = {"connect": connect, "helo": helo}

    def connect(self, session):
        return self.answers["connect"]

    def helo(self, session, hostname):
        return self.answers["helo"]


class SessionStageTests(ServerTestCase):

    def test_connect_reject(self) -> None:
        self.use_filters(Doorman(connect=Verdict.reject("Go away")))
        conn = self.connect(greet=False)
        self.assertReply(conn.take(), 554, None, "Go away")
        self.assertEqual(conn.wire(), b"554 mx.example.test Go away\r\n")
        self.assertFalse(conn.closed)
        self.cmd(conn, "EHLO c", 503, "5.5.1")
        self.cmd(conn, "MAIL FROM:<a@example.org>", 503, "5.5.1")
        self.cmd(conn, "QUIT", 221, "2.0.0")
        self.assertTrue(conn.closed)

    def test_connect_tempfail(self) -> None:
        self.use_filters(Doorman(connect=Verdict.tempfail("Busy")))
        conn = self.connect(greet=False)
        self.assertReply(conn.take(), 421, "4.7.0", "Busy")
        self.assertTrue(conn.closed)

    def test_connect_filter_fails(self) -> None:
        @implementer(IConnectFilter)
        class Broken:
            def connect(self, session):
                raise RuntimeError("broken")

        self.use_filters(Broken())
        conn = self.connect(greet=False)
        self.assertReply(conn.take(), 421, "4.7.0")
        self.assertTrue(conn.closed)
        self.flushLoggedErrors(RuntimeError)

    def test_slow_greeting(self) -> None:
        slow = SlowConnect()
        self.use_filters(slow)
        conn = self.connect(greet=False)
        self.assertEqual(conn.take(), [])
        self.assertEqual(conn.transport.producerState, "paused")
        slow.d.callback(None)
        self.assertReply(conn.take(), 220)
        self.assertEqual(conn.transport.producerState, "producing")

    def test_helo_reject(self) -> None:
        self.use_filters(Doorman(helo=Verdict.reject("Bad name")))
        conn = self.connect()
        self.cmd(conn, "EHLO c", 550, "5.7.1", "Bad name")
        self.assertIsNone(conn.proto.session.helo)
        self.cmd(conn, "MAIL FROM:<a@example.org>", 503, "5.5.1")

    def test_helo_tempfail(self) -> None:
        self.use_filters(Doorman(helo=Verdict.tempfail()))
        conn = self.connect()
        self.cmd(conn, "HELO c", 451, "4.7.1")
        self.assertIsNone(conn.proto.session.helo)


class HeaderCaptureTests(ServerTestCase):

    def headers_seen(self, pieces) -> list:
        seen = []

        @implementer(IDataFilter)
        class Look:
            def data(self, session, envelope, message):
                seen.append(message.headers)

        self.use_filters(Look())
        conn = self.ready()
        self.envelope(conn)
        self.cmd(conn, "DATA", 354)
        for piece in pieces:
            conn.send(piece)
        conn.send(b".\r\n")
        self.assertReply(conn.take(), 250, "2.0.0")
        # As stored: this server's Received field first, then the client's.
        [(name, value), *rest] = seen[0]
        self.assertEqual(name, "Received")
        self.assertIn("(twisted-mta) with ESMTP id", value)
        return tuple(rest)

    def test_headers_byte_by_byte(self) -> None:
        message = b"Subject: one\r\nX-Two: 2\r\n\tfolded\r\n\r\nBody: not a header\r\n"
        headers = self.headers_seen([bytes([b]) for b in message])
        self.assertEqual(headers, (("Subject", "one"), ("X-Two", "2\tfolded")))

    def test_empty_line_split_across_reads(self) -> None:
        for cut in range(1, 4):
            message = b"Subject: one\r\n\r\nBody: no\r\n"
            at = message.index(b"\r\n\r\n") + cut
            self.ctx = self.context()
            headers = self.headers_seen([message[:at], message[at:]])
            self.assertEqual(headers, (("Subject", "one"),), cut)

    def test_no_header(self) -> None:
        self.assertEqual(self.headers_seen([b"\r\nBody: no\r\n"]), ())
