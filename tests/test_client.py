"""
Unit tests of the ESMTP/LMTP client (twisted_mta.smtp.client): the reply
parser, EHLO parsing, dot-stuffing, and the conversation over an
in-memory transport with a fake clock.
"""

from __future__ import annotations

import base64
import random

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from twisted_mta.smtp import client
from twisted_mta.smtp.client import (
    DEFERRED, DELIVERED, FAILED, ChunksSource, ClientProtocol, Credentials, DotStuffer,
    Extensions, HopError, MalformedReply, ReplyParser, Session, StaleConnection, Timeouts,
    dot_stuff, mail_command, parse_ehlo, reply_text,
)

PEER = "mx.example.test[192.0.2.1]"


# --- pure functions -----------------------------------------------------------


class ReplyParserTests(unittest.TestCase):
    def test_single_line(self):
        [r] = ReplyParser().feed(b"250 2.1.0 Ok\r\n")
        self.assertEqual((r.code, r.enhanced, r.lines), (250, "2.1.0", ("Ok",)))

    def test_multi_line_with_enhanced_codes(self):
        p = ReplyParser()
        self.assertEqual(p.feed(b"550-5.1.1 first\r\n550-5.1.1 second\r\n"), [])
        [r] = p.feed(b"550 5.1.1 third\r\n")
        self.assertEqual((r.code, r.enhanced), (550, "5.1.1"))
        self.assertEqual(r.lines, ("first", "second", "third"))
        self.assertEqual(reply_text(r), "550 5.1.1 first second third")

    def test_enhanced_code_class_must_agree(self):
        [r] = ReplyParser().feed(b"550 2.0.0 odd\r\n")
        self.assertIsNone(r.enhanced)
        self.assertEqual(r.lines, ("2.0.0 odd",))

    def test_no_enhanced_code(self):
        [r] = ReplyParser().feed(b"220 mx.example.test ESMTP\r\n")
        self.assertIsNone(r.enhanced)
        self.assertEqual(reply_text(r), "220 mx.example.test ESMTP")

    def test_code_only_and_bare_lf(self):
        replies = ReplyParser().feed(b"250\n354 go\n")
        self.assertEqual([r.code for r in replies], [250, 354])
        self.assertEqual(replies[0].lines, ("",))

    def test_split_across_feeds(self):
        p = ReplyParser()
        self.assertEqual(p.feed(b"25"), [])
        self.assertEqual(p.feed(b"0-a\r"), [])
        [r] = p.feed(b"\n250 b\r\n")
        self.assertEqual(r.lines, ("a", "b"))

    def test_several_replies_in_one_read(self):
        replies = ReplyParser().feed(b"250 a\r\n250 b\r\n550 c\r\n")
        self.assertEqual([r.code for r in replies], [250, 250, 550])

    def test_malformed(self):
        for data in (b"hello\r\n", b"25\r\n", b"250x\r\n", b"650 no\r\n", b"abc def\r\n",
                     b"150 no\r\n"):
            self.assertRaises(MalformedReply, ReplyParser().feed, data)

    def test_codes_disagree(self):
        self.assertRaises(MalformedReply, ReplyParser().feed, b"250-a\r\n550 b\r\n")

    def test_overlong_line_is_bounded(self):
        p = ReplyParser(max_line=100)
        self.assertRaises(MalformedReply, p.feed, b"250 " + b"x" * 200)  # no line end yet
        p = ReplyParser(max_line=100)
        self.assertRaises(MalformedReply, p.feed, b"250 " + b"x" * 200 + b"\r\n")

    def test_too_many_lines(self):
        p = ReplyParser(max_lines=10)
        self.assertRaises(MalformedReply, p.feed, b"250-x\r\n" * 11)

    def test_control_characters_and_bad_utf8_are_replaced(self):
        [r] = ReplyParser().feed(b"550 bad\x1b[0m \xff text\r\n")
        self.assertNotIn("\x1b", r.lines[0])
        self.assertIn("\ufffd", r.lines[0])

    def test_reply_text_bounded(self):
        [r] = ReplyParser().feed(b"550-" + b"x" * 900 + b"\r\n550 " + b"y" * 900 + b"\r\n")
        self.assertLessEqual(len(reply_text(r)), client.MAX_OUTCOME_TEXT)


class EHLOTests(unittest.TestCase):
    def parse(self, data: bytes) -> Extensions:
        [r] = ReplyParser().feed(data)
        return parse_ehlo(r)

    def test_extensions(self):
        ext = self.parse(b"250-mx.example.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
                         b"250-8BITMIME\r\n250-smtputf8\r\n250-STARTTLS\r\n"
                         b"250-AUTH PLAIN LOGIN\r\n250-AUTH=LOGIN\r\n250 ENHANCEDSTATUSCODES\r\n")
        self.assertTrue(ext.esmtp and ext.pipelining and ext.eightbitmime and ext.smtputf8)
        self.assertTrue(ext.starttls and ext.enhancedstatuscodes)
        self.assertEqual(ext.size, 1000)
        self.assertEqual(ext.auth, frozenset({"PLAIN", "LOGIN"}))

    def test_nothing_offered(self):
        ext = self.parse(b"250 mx.example.test\r\n")
        self.assertFalse(ext.pipelining or ext.starttls or ext.offers_size)
        self.assertIsNone(ext.size)
        self.assertEqual(ext.auth, frozenset())

    def test_size_without_limit(self):
        ext = self.parse(b"250-mx\r\n250 SIZE\r\n")
        self.assertTrue(ext.offers_size)
        self.assertIsNone(ext.size)
        self.assertIsNone(self.parse(b"250-mx\r\n250 SIZE 0\r\n").size)

    def test_mail_command(self):
        ext = self.parse(b"250-mx\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
        self.assertEqual(mail_command("a@b.test", ext, 10, "8BITMIME", True),
                         b"MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME SMTPUTF8")
        self.assertEqual(mail_command("", Extensions(), 10, "8BITMIME", True), b"MAIL FROM:<>")
        self.assertEqual(mail_command("\u00e9@b.test", ext, None, "7BIT", True),
                         "MAIL FROM:<\u00e9@b.test> SMTPUTF8".encode())


def _reference_stuff(message: bytes) -> bytes:
    """Dot-stuffing the slow way, line by line."""
    lines = message.split(b"\n")
    out = b"\n".join((b"." + line) if line.startswith(b".") else line for line in lines)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


class DotStuffingTests(unittest.TestCase):
    def test_simple(self):
        self.assertEqual(dot_stuff([b"a\r\n.b\r\n..c\r\n.\r\n"]), b"a\r\n..b\r\n...c\r\n..\r\n.\r\n")

    def test_first_line(self):
        self.assertEqual(dot_stuff([b".a\r\n"]), b"..a\r\n.\r\n")

    def test_dot_at_chunk_start(self):
        self.assertEqual(dot_stuff([b"a\r\n", b".b\r\n"]), b"a\r\n..b\r\n.\r\n")
        self.assertEqual(dot_stuff([b"a\r", b"\n", b".", b"b\r\n"]), b"a\r\n..b\r\n.\r\n")

    def test_dot_not_at_line_start(self):
        self.assertEqual(dot_stuff([b"a", b".b\r\n"]), b"a.b\r\n.\r\n")
        self.assertEqual(dot_stuff([b"a\r", b".b\r\n"]), b"a\r.b\r\n.\r\n")

    def test_bare_lf_dot_is_stuffed(self):
        # A receiver that took LF as a line end must not see an end of data.
        self.assertEqual(dot_stuff([b"a\n.\r\nb\r\n"]), b"a\n..\r\nb\r\n.\r\n")

    def test_missing_final_crlf(self):
        self.assertEqual(dot_stuff([b"a\r\nb"]), b"a\r\nb\r\n.\r\n")
        self.assertEqual(dot_stuff([]), b"\r\n.\r\n")
        self.assertEqual(dot_stuff([b"a\r", b""]), b"a\r\r\n.\r\n")

    def test_random_chunking_matches_reference(self):
        rng = random.Random(5321)
        alphabet = [b".", b"\r\n", b"a", b"\n", b"\r", b".."]
        for _ in range(300):
            message = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
            cuts = sorted(rng.sample(range(len(message) + 1), min(len(message) + 1, rng.randint(0, 6))))
            chunks, last = [], 0
            for cut in cuts + [len(message)]:
                chunks.append(message[last:cut])
                last = cut
            self.assertEqual(dot_stuff(chunks), _reference_stuff(message), (message, chunks))

    def test_stuffer_keeps_state(self):
        s = DotStuffer()
        self.assertEqual(s.feed(b"x\r\n"), b"x\r\n")
        self.assertEqual(s.feed(b""), b"")
        self.assertEqual(s.feed(b".y"), b"..y")
        self.assertEqual(s.end(), b"\r\n.\r\n")


# --- the conversation -----------------------------------------------------------


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS (the handshake is the test's to complete)."""

    tls_options = None
    pause_on_write = False  # act like a full socket buffer while a producer is registered

    def startTLS(self, options):
        self.tls_options = options

    def write(self, data):
        super().write(data)
        if self.pause_on_write and self.producer is not None:
            self.producer.pauseProducing()


EHLO_FULL = (b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n"
             b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")
EHLO_PLAIN = b"250-mx.example.test\r\n250 ENHANCEDSTATUSCODES\r\n"
TIMEOUTS = Timeouts(connect=30, greeting=300, command=300, data=600)


class Harness:
    def __init__(self, lmtp=False):
        self.clock = Clock()
        self.proto = ClientProtocol(self.clock, TIMEOUTS.greeting)
        self.transport = TLSStringTransport()
        self.proto.makeConnection(self.transport)
        self.session = Session(self.proto, PEER, "relay.example.test", TIMEOUTS, lmtp=lmtp)

    def reply(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def lose(self, reason=None) -> None:
        self.proto.connectionLost(Failure(reason or ConnectionLost("gone")))

    def open(self, ehlo=EHLO_FULL, **kw) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(self.session.open(**kw))
        self.reply(b"220 mx.example.test ESMTP\r\n")
        verb = b"LHLO" if self.session.lmtp else b"EHLO"
        assert self.sent() == verb + b" relay.example.test\r\n"
        if ehlo is not None:
            self.reply(ehlo)
        return d

    def send(self, sender="s@example.test", rcpts=("a@x.test",), chunks=(b"Subject: t\r\n\r\nhi\r\n",),
             **kw) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(
            self.session.send(sender, list(rcpts), ChunksSource(chunks), **kw))


class SessionTests(unittest.TestCase):
    def result(self, d):
        return self.successResultOf(d)

    def test_pipelined_transaction(self):
        h = Harness()
        ext = self.result(h.open())
        self.assertTrue(ext.pipelining)
        d = h.send(rcpts=["a@x.test", "b@x.test", "c@x.test"], size=100)
        # MAIL, all RCPTs and DATA in one write.
        self.assertEqual(h.transport.io.getvalue(),
                         b"MAIL FROM:<s@example.test> SIZE=100\r\nRCPT TO:<a@x.test>\r\n"
                         b"RCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n")
        h.sent()
        h.reply(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <b@x.test>: Recipient address rejected\r\n"
                b"450 4.2.0 <c@x.test>: greylisted\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(h.sent(), b"Subject: t\r\n\r\nhi\r\n.\r\n")
        self.assertNoResult(d)
        h.reply(b"250 2.0.0 Ok: queued as ABC\r\n")
        a, b, c = self.result(d)
        self.assertEqual(a, client.Result(DELIVERED, "250 2.0.0 Ok: queued as ABC"))
        self.assertEqual(b, client.Result(FAILED, "550 5.1.1 <b@x.test>: Recipient address rejected"))
        self.assertEqual(c, client.Result(DEFERRED, "450 4.2.0 <c@x.test>: greylisted"))

    def test_without_pipelining_one_command_at_a_time(self):
        h = Harness()
        self.result(h.open(ehlo=EHLO_PLAIN))
        d = h.send(rcpts=["a@x.test", "b@x.test"], size=100)
        self.assertEqual(h.sent(), b"MAIL FROM:<s@example.test>\r\n")  # SIZE not offered
        h.reply(b"250 ok\r\n")
        self.assertEqual(h.sent(), b"RCPT TO:<a@x.test>\r\n")
        h.reply(b"550 no\r\n")
        self.assertEqual(h.sent(), b"RCPT TO:<b@x.test>\r\n")
        h.reply(b"250 ok\r\n")
        self.assertEqual(h.sent(), b"DATA\r\n")
        h.reply(b"354 go\r\n")
        self.assertEqual(h.sent(), b"Subject: t\r\n\r\nhi\r\n.\r\n")
        h.reply(b"250 queued\r\n")
        a, b = self.result(d)
        self.assertEqual((a.status, b.status), (FAILED, DELIVERED))

    def test_no_recipient_accepted_no_data(self):
        h = Harness()
        self.result(h.open(ehlo=EHLO_PLAIN))
        d = h.send(rcpts=["a@x.test"])
        h.sent()
        h.reply(b"250 ok\r\n")
        h.sent()
        h.reply(b"451 4.3.0 try later\r\n")
        [a] = self.result(d)
        self.assertEqual(a, client.Result(DEFERRED, "451 4.3.0 try later"))
        self.assertEqual(h.sent(), b"")  # no DATA

    def test_pipelined_354_without_recipients_sends_lone_dot(self):
        h = Harness()
        self.result(h.open())
        d = h.send(rcpts=["a@x.test"])
        h.sent()
        h.reply(b"250 ok\r\n550 no\r\n354 go\r\n")
        self.assertEqual(h.sent(), b".\r\n")
        h.reply(b"554 5.5.1 no valid recipients\r\n")
        [a] = self.result(d)
        self.assertEqual(a.status, FAILED)

    def test_helo_fallback(self):
        h = Harness()
        d = h.open(ehlo=b"502 5.5.2 Error: command not recognized\r\n")
        self.assertEqual(h.sent(), b"HELO relay.example.test\r\n")
        h.reply(b"250 mx.example.test\r\n")
        ext = self.result(d)
        self.assertFalse(ext.esmtp)
        d = h.send(size=100, body="8BITMIME")
        self.assertEqual(h.sent(), b"MAIL FROM:<s@example.test>\r\n")

    def test_helo_refused(self):
        h = Harness()
        d = h.open(ehlo=b"500 no\r\n")
        h.reply(b"550 go away\r\n")
        e = self.failureResultOf(d, HopError).value
        self.assertIn("refused HELO", e.reply)
        self.assertTrue(e.reply.startswith("451 4.4.0"))

    def test_ehlo_4xx_is_a_hop_error(self):
        h = Harness()
        d = h.open(ehlo=b"421 4.3.2 shutting down\r\n")
        self.assertEqual(self.failureResultOf(d, HopError).value.reply, "421 4.3.2 shutting down")

    def test_greeting_refused(self):
        for greeting, text in ((b"554 5.7.1 go away\r\n", "451 4.4.0 host %s refused to talk to me: "
                                "554 5.7.1 go away" % PEER),
                               (b"421 4.3.2 busy\r\n", "421 4.3.2 busy")):
            h = Harness()
            d = defer.Deferred.fromCoroutine(h.session.open())
            h.reply(greeting)
            e = self.failureResultOf(d, HopError).value
            self.assertEqual(e.reply, text)
            self.assertEqual(h.sent(), b"")

    def test_mail_5xx_fails_all(self):
        h = Harness()
        self.result(h.open())
        d = h.send(rcpts=["a@x.test", "b@x.test"])
        h.sent()
        h.reply(b"553 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
                b"503 5.5.1 need MAIL\r\n")
        results = self.result(d)
        self.assertEqual([r.status for r in results], [FAILED, FAILED])
        self.assertEqual(results[0].reply, "553 5.7.1 sender rejected")

    def test_mail_4xx_defers_all(self):
        h = Harness()
        self.result(h.open(ehlo=EHLO_PLAIN))
        d = h.send(rcpts=["a@x.test", "b@x.test"])
        h.reply(b"452 4.3.1 insufficient storage\r\n")
        results = self.result(d)
        self.assertEqual([r.status for r in results], [DEFERRED, DEFERRED])

    def test_data_replies(self):
        for code, status in ((b"451 4.3.0 later", DEFERRED), (b"554 5.7.1 spam", FAILED)):
            h = Harness()
            self.result(h.open())
            d = h.send(rcpts=["a@x.test", "b@x.test"])
            h.reply(b"250 ok\r\n250 ok\r\n550 no\r\n" + code + b"\r\n")
            a, b = self.result(d)
            self.assertEqual((a.status, a.reply), (status, code.decode()))
            self.assertEqual(b.status, FAILED)

    def test_final_replies(self):
        for code, status in ((b"250 2.0.0 ok", DELIVERED), (b"452 4.3.1 full", DEFERRED),
                             (b"554 5.6.0 bad content", FAILED)):
            h = Harness()
            self.result(h.open())
            d = h.send(rcpts=["a@x.test", "b@x.test"])
            h.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
            h.reply(code + b"\r\n")
            self.assertEqual([(r.status, r.reply) for r in self.result(d)], [(status, code.decode())] * 2)

    def test_421_then_close_defers(self):
        h = Harness()
        self.result(h.open())
        d = h.send(rcpts=["a@x.test", "b@x.test"])
        h.reply(b"250 ok\r\n421 4.3.2 shutting down\r\n")
        self.assertTrue(h.transport.disconnecting)  # we close too
        h.lose(ConnectionDone())
        a, b = self.result(d)
        self.assertEqual(a, client.Result(DEFERRED, "421 4.3.2 shutting down"))
        self.assertEqual(b.status, DEFERRED)
        self.assertIn("lost connection with %s while sending RCPT TO" % PEER, b.reply)
        self.assertFalse(h.session.usable)

    def test_connection_lost_after_data_defers_accepted_only(self):
        h = Harness()
        self.result(h.open())
        d = h.send(rcpts=["a@x.test", "b@x.test"])
        h.reply(b"250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n")
        h.lose()
        a, b = self.result(d)
        self.assertEqual(a.status, FAILED)
        self.assertEqual(b, client.Result(DEFERRED, f"451 4.4.2 lost connection with {PEER} while "
                                                    f"{client.END_OF_DATA_STAGE}"))

    def test_connection_lost_before_greeting(self):
        h = Harness()
        d = defer.Deferred.fromCoroutine(h.session.open())
        h.lose()
        e = self.failureResultOf(d, HopError).value
        self.assertIn("while receiving the initial server greeting", e.reply)
        self.assertFalse(e.answered)

    def test_malformed_reply_defers(self):
        h = Harness()
        self.result(h.open())
        d = h.send()
        h.reply(b"250 ok\r\nHTTP/1.1 400 Bad Request\r\n")
        [a] = self.result(d)
        self.assertEqual(a.status, DEFERRED)
        self.assertTrue(a.reply.startswith("451 4.5.0 malformed reply from " + PEER), a.reply)
        self.assertTrue(h.transport.disconnecting or h.proto.closed or h.transport.disconnected)

    def test_unexpected_reply_makes_connection_unusable(self):
        h = Harness()
        self.result(h.open())
        h.reply(b"421 4.4.2 idle too long\r\n")
        self.assertFalse(h.session.usable)
        self.assertTrue(h.transport.disconnecting)

    def test_dot_stuffing_across_chunks(self):
        h = Harness()
        self.result(h.open())
        d = h.send(chunks=[b"Subject: x\r\n\r\n", b".hidden\r\nline\r", b"\n", b"..two\r\n.", b"\r\n"])
        h.sent()
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(h.sent(), b"Subject: x\r\n\r\n..hidden\r\nline\r\n...two\r\n..\r\n.\r\n")
        h.reply(b"250 ok\r\n")
        self.assertEqual(self.result(d)[0].status, DELIVERED)

    def test_body_8bitmime_when_offered(self):
        h = Harness()
        self.result(h.open())
        h.send(body="8BITMIME")
        self.assertTrue(h.sent().startswith(b"MAIL FROM:<s@example.test> BODY=8BITMIME\r\n"))

    def test_size_exceeded_fails_without_mail(self):
        h = Harness()
        self.result(h.open())
        [a] = self.result(h.send(size=20000))
        self.assertEqual(a.status, FAILED)
        self.assertEqual(a.reply, f"552 5.3.4 message size 20000 exceeds size limit 10000 of server {PEER}")
        self.assertEqual(h.sent(), b"")

    def test_smtputf8_offered(self):
        h = Harness()
        self.result(h.open())
        d = h.send(rcpts=["\u00fc@x.test"])
        self.assertEqual(h.sent(), "MAIL FROM:<s@example.test> SMTPUTF8\r\nRCPT TO:<\u00fc@x.test>\r\n"
                                   "DATA\r\n".encode())
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        h.reply(b"250 ok\r\n")
        self.assertEqual(self.result(d)[0].status, DELIVERED)

    def test_smtputf8_flag_alone_is_sent_when_offered(self):
        h = Harness()
        self.result(h.open())
        h.send(smtputf8=True)
        self.assertTrue(h.sent().startswith(b"MAIL FROM:<s@example.test> SMTPUTF8\r\n"))

    def test_smtputf8_refused_recipient(self):
        h = Harness()
        self.result(h.open(ehlo=b"250-mx\r\n250 PIPELINING\r\n"))
        d = h.send(rcpts=["\u00fc@x.test", "a@x.test"])
        # Only the ASCII recipient is sent, without SMTPUTF8.
        self.assertEqual(h.sent(), b"MAIL FROM:<s@example.test>\r\nRCPT TO:<a@x.test>\r\nDATA\r\n")
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        h.sent()
        h.reply(b"250 ok\r\n")
        u, a = self.result(d)
        self.assertEqual(u.status, FAILED)
        self.assertTrue(u.reply.startswith(f"550 5.6.7 host {PEER} does not support SMTPUTF8"), u.reply)
        self.assertEqual(a.status, DELIVERED)

    def test_idn_domain_goes_as_alabels_without_smtputf8(self):
        h = Harness()
        self.result(h.open(ehlo=b"250-mx\r\n250 PIPELINING\r\n"))
        d = h.send(sender="s@b\u00fccher.test", rcpts=["a@m\u00fcller.test", "\u00fc@x.test"])
        self.assertEqual(h.sent(), b"MAIL FROM:<s@xn--bcher-kva.test>\r\nRCPT TO:<a@xn--mller-kva.test>\r\n"
                                   b"DATA\r\n")
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        h.reply(b"250 ok\r\n")
        a, u = self.result(d)
        self.assertEqual((a.status, u.status), (DELIVERED, FAILED))

    def test_ascii_address(self):
        self.assertEqual(client.ascii_address("a@b.test"), "a@b.test")
        self.assertEqual(client.ascii_address("a@B\u00fccher.test"), "a@xn--bcher-kva.test")
        self.assertIsNone(client.ascii_address("\u00fc@b.test"))
        self.assertEqual(client.ascii_address(""), "")

    def test_smtputf8_refused_sender_fails_all(self):
        h = Harness()
        self.result(h.open(ehlo=b"250-mx\r\n250 PIPELINING\r\n"))
        results = self.result(h.send(sender="j\u00f6rg@example.test", rcpts=["a@x.test", "b@x.test"]))
        self.assertEqual([r.status for r in results], [FAILED, FAILED])
        self.assertIn("does not support SMTPUTF8", results[0].reply)
        self.assertEqual(h.sent(), b"")

    # --- timeouts -------------------------------------------------------------

    def test_greeting_timeout(self):
        h = Harness()
        d = defer.Deferred.fromCoroutine(h.session.open())
        h.clock.advance(299)
        self.assertNoResult(d)
        h.clock.advance(1)
        e = self.failureResultOf(d, HopError).value
        self.assertEqual(e.reply, f"451 4.4.2 conversation with {PEER} timed out while receiving the "
                                  f"initial server greeting")
        self.assertTrue(h.transport.disconnecting or h.transport.disconnected)

    def test_command_timeout(self):
        h = Harness()
        self.result(h.open())
        d = h.send()
        h.reply(b"250 ok\r\n")
        h.clock.advance(299)
        h.reply(b"250 ok\r\n")  # each reply restarts the clock
        h.clock.advance(299)
        self.assertNoResult(d)
        h.clock.advance(1)
        [a] = self.result(d)
        self.assertEqual(a.reply, f"451 4.4.2 conversation with {PEER} timed out while sending DATA command")

    def test_one_timer_while_replies_come(self):
        h = Harness()
        self.result(h.open())
        self.assertEqual(h.clock.getDelayedCalls(), [])  # nothing awaited, no timer
        d = h.send(rcpts=["a@x.test", "b@x.test"])
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.clock.advance(100)
        h.reply(b"250 ok\r\n250 ok\r\n")  # two turns began; the timer was not remade
        [timer] = h.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 300)
        h.clock.advance(200)  # it goes off early, and sets itself for the rest
        [timer] = h.clock.getDelayedCalls()
        self.assertEqual(timer.getTime(), 400)
        h.clock.advance(99)
        self.assertNoResult(d)
        h.reply(b"250 ok\r\n354 go\r\n250 ok\r\n")
        self.assertEqual([r.status for r in self.result(d)], [DELIVERED, DELIVERED])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_shorter_timeout_moves_the_timer(self):
        clock = Clock()
        proto = ClientProtocol(clock, 600)
        proto.makeConnection(StringTransport())
        second = proto.expect(30, "waiting for the second")
        clock.advance(10)
        proto.dataReceived(b"220 hi\r\n")  # the greeting, within its 600 s
        self.assertEqual(self.result(proto.greeting).code, 220)
        clock.advance(29)
        self.assertNoResult(second)
        clock.advance(1)  # 30 s after its turn began, not 600 s after the first
        self.assertEqual(self.failureResultOf(second, client.ReplyTimeout).value.stage,
                         "waiting for the second")

    def test_data_timeout(self):
        h = Harness()
        self.result(h.open())
        d = h.send()
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        h.clock.advance(599)
        self.assertNoResult(d)
        h.clock.advance(1)
        [a] = self.result(d)
        self.assertEqual(a.status, DEFERRED)
        self.assertIn("timed out while sending end of data", a.reply)

    def test_body_stall_times_out(self):
        h = Harness()
        self.result(h.open())
        d = h.send(chunks=[b"a\r\n", b"b\r\n"])
        h.sent()
        h.transport.pause_on_write = True
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(h.sent(), b"a\r\n")
        h.clock.advance(300)
        [a] = self.result(d)
        self.assertIn("timed out while sending message body", a.reply)

    def test_body_flow_control(self):
        h = Harness()
        self.result(h.open())
        d = h.send(chunks=[b"a\r\n", b"b\r\n"])
        h.sent()
        h.transport.pause_on_write = True
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(h.sent(), b"a\r\n")
        h.transport.pause_on_write = False
        h.proto.resumeProducing()
        self.assertEqual(h.sent(), b"b\r\n.\r\n")
        h.reply(b"250 ok\r\n")
        self.assertEqual(self.result(d)[0].status, DELIVERED)
        self.assertIsNone(h.transport.producer)

    def test_source_error_aborts_and_defers(self):
        class Broken:
            def read(self):
                return defer.fail(OSError("disk on fire"))

            def close(self):
                pass

        h = Harness()
        self.result(h.open())
        d = defer.Deferred.fromCoroutine(h.session.send("s@example.test", ["a@x.test"], Broken()))
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        [a] = self.result(d)
        self.assertEqual(a.status, DEFERRED)
        self.assertIn("disk on fire", a.reply)
        self.assertTrue(h.transport.disconnecting or h.transport.disconnected)
        self.assertNotIn(b".\r\n", h.sent().split(b"DATA\r\n")[-1])

    # --- reuse --------------------------------------------------------------

    def test_reset_and_reuse(self):
        # With PIPELINING, the RSET goes in the same write as the next MAIL.
        h = Harness()
        self.result(h.open())
        d = h.send()
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        h.reply(b"250 ok\r\n")
        self.result(d)
        h.sent()
        h.session.reset()
        self.assertEqual(h.sent(), b"")
        d = h.send(rcpts=["b@x.test"])
        self.assertEqual(h.sent(), b"RSET\r\nMAIL FROM:<s@example.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        h.reply(b"250 2.0.0 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        h.reply(b"250 ok\r\n")
        self.assertEqual(self.result(d)[0].status, DELIVERED)
        # One RSET per reset: none owed for the transaction after.
        h.sent()
        d = h.send(rcpts=["c@x.test"])
        self.assertTrue(h.sent().startswith(b"MAIL FROM:"))

    def test_reset_and_reuse_without_pipelining(self):
        h = Harness()
        self.result(h.open(ehlo=EHLO_PLAIN))
        d = h.send()
        h.reply(b"250 ok\r\n")
        h.reply(b"250 ok\r\n")
        h.reply(b"354 go\r\n")
        h.reply(b"250 ok\r\n")
        self.result(d)
        h.sent()
        h.session.reset()
        self.assertEqual(h.sent(), b"RSET\r\n")
        d = h.send(rcpts=["b@x.test"])
        self.assertEqual(h.sent(), b"")  # waits for the RSET reply first
        h.reply(b"250 2.0.0 ok\r\n")
        self.assertTrue(h.sent().startswith(b"MAIL FROM:"))
        h.reply(b"250 ok\r\n")
        h.reply(b"250 ok\r\n")
        h.reply(b"354 go\r\n")
        h.reply(b"250 ok\r\n")
        self.assertEqual(self.result(d)[0].status, DELIVERED)

    def test_pipelined_rset_refused_is_stale(self):
        h = Harness()
        self.result(h.open())
        d = h.send()
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        self.result(d)
        h.session.reset()
        h.sent()
        d = h.send()
        self.assertTrue(h.sent().startswith(b"RSET\r\nMAIL FROM:"))
        h.reply(b"502 5.5.1 no RSET here\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.failureResultOf(d, StaleConnection)
        # Dropped before any message data: the server forgets the transaction.
        self.assertTrue(h.transport.disconnecting or h.transport.disconnected)
        self.assertEqual(h.sent(), b"")

    def test_pipelined_rset_on_a_dead_connection_is_stale(self):
        h = Harness()
        self.result(h.open())
        d = h.send()
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        self.result(d)
        h.session.reset()
        d = h.send()
        h.lose(ConnectionDone())
        self.failureResultOf(d, StaleConnection)

    def test_stale_connection(self):
        h = Harness()
        self.result(h.open())
        d = h.send()
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        self.result(d)
        h.session.reset()
        h.lose(ConnectionDone())
        self.failureResultOf(h.send(), StaleConnection)

    def test_stale_on_mail(self):
        h = Harness()
        self.result(h.open())
        d = h.send()
        h.reply(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        self.result(d)
        d = h.send()
        h.reply(b"421 4.4.2 timeout\r\n")
        h.lose(ConnectionDone())
        self.failureResultOf(d, StaleConnection)

    def test_quit(self):
        h = Harness()
        self.result(h.open())
        h.sent()
        d = h.session.quit()
        self.assertEqual(h.sent(), b"QUIT\r\n")
        h.reply(b"221 bye\r\n")
        self.assertTrue(h.transport.disconnecting)
        h.lose(ConnectionDone())
        self.result(d)

    def test_quit_times_out(self):
        h = Harness()
        self.result(h.open())
        d = h.session.quit()
        self.assertNoResult(d)
        h.clock.advance(10)
        h.lose()  # the StringTransport does not call connectionLost by itself
        self.result(d)

    # --- LMTP ---------------------------------------------------------------

    def test_lmtp_per_recipient_replies(self):
        h = Harness(lmtp=True)
        self.result(h.open(ehlo=b"250-lmtp.example.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"))
        d = h.send(rcpts=["a@x.test", "b@x.test", "c@x.test", "d@x.test"])
        self.assertEqual(h.sent(), b"MAIL FROM:<s@example.test>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
                                   b"RCPT TO:<c@x.test>\r\nRCPT TO:<d@x.test>\r\nDATA\r\n")
        h.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        h.sent()
        h.reply(b"250 2.0.0 <a@x.test> saved\r\n452 4.2.2 <c@x.test> mailbox full\r\n")
        self.assertNoResult(d)
        h.reply(b"552 5.2.2 <d@x.test> over quota\r\n")
        a, b, c, dd = self.result(d)
        self.assertEqual(a, client.Result(DELIVERED, "250 2.0.0 <a@x.test> saved"))
        self.assertEqual(b.status, FAILED)
        self.assertEqual(c, client.Result(DEFERRED, "452 4.2.2 <c@x.test> mailbox full"))
        self.assertEqual(dd, client.Result(FAILED, "552 5.2.2 <d@x.test> over quota"))

    def test_lmtp_connection_lost_between_replies(self):
        h = Harness(lmtp=True)
        self.result(h.open(ehlo=b"250 lmtp\r\n"))
        d = h.send(rcpts=["a@x.test", "b@x.test"])
        h.reply(b"250 ok\r\n")
        h.reply(b"250 ok\r\n")
        h.reply(b"250 ok\r\n")
        h.reply(b"354 go\r\n")
        h.reply(b"250 ok\r\n")
        h.lose()
        a, b = self.result(d)
        self.assertEqual((a.status, b.status), (DELIVERED, DEFERRED))

    def test_lmtp_lhlo_refused(self):
        h = Harness(lmtp=True)
        d = h.open(ehlo=b"500 5.5.1 unknown\r\n")
        self.assertIn("refused LHLO", self.failureResultOf(d, HopError).value.reply)
        self.assertEqual(h.sent(), b"")  # no HELO in LMTP


class TLSPolicyTests(unittest.TestCase):
    OFFER = b"250-mx.example.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
    AFTER = b"250-mx.example.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"

    def start(self, tls, ehlo=OFFER, **kw):
        h = Harness()
        options = object()
        d = h.open(ehlo=ehlo, tls=tls, tls_options=options, **kw)
        return h, d, options

    def test_opportunistic_uses_starttls(self):
        h, d, options = self.start("opportunistic")
        self.assertEqual(h.sent(), b"STARTTLS\r\n")
        h.reply(b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIs(h.transport.tls_options, options)
        self.assertEqual(h.sent(), b"EHLO relay.example.test\r\n")
        h.proto.handshakeCompleted()
        h.reply(self.AFTER)
        self.assertFalse(self.successResultOf(d).starttls)
        self.assertTrue(h.session.tls)

    def test_opportunistic_without_offer(self):
        h, d, _ = self.start("opportunistic", ehlo=EHLO_PLAIN)
        self.successResultOf(d)
        self.assertEqual(h.sent(), b"")
        self.assertFalse(h.session.tls)

    def test_opportunistic_starttls_refused_goes_on_in_plaintext(self):
        h, d, _ = self.start("opportunistic")
        h.sent()
        h.reply(b"454 4.7.0 TLS not available\r\n")
        self.successResultOf(d)
        self.assertIsNone(h.transport.tls_options)
        self.assertFalse(h.session.tls)

    def test_opportunistic_handshake_failure_asks_for_plaintext_retry(self):
        h, d, _ = self.start("opportunistic")
        h.sent()
        h.reply(b"220 go ahead\r\n")
        h.lose(SSL.Error([("SSL routines", "", "wrong version number")]))
        e = self.failureResultOf(d, HopError).value
        self.assertTrue(e.tls_failed)
        self.assertEqual(e.reply, f"451 4.7.5 TLS handshake with host {PEER} failed: wrong version number")

    def test_none_never_starttls(self):
        h, d, _ = self.start("none")
        self.successResultOf(d)
        self.assertEqual(h.sent(), b"")

    def test_require_without_offer(self):
        for mode in ("require", "verify"):
            h, d, _ = self.start(mode, ehlo=EHLO_PLAIN)
            e = self.failureResultOf(d, HopError).value
            self.assertEqual(e.reply, f"451 4.7.4 TLS is required, but was not offered by host {PEER}")
            self.assertFalse(e.tls_failed)

    def test_require_starttls_refused(self):
        h, d, _ = self.start("require")
        h.reply(b"454 4.7.0 no\r\n")
        e = self.failureResultOf(d, HopError).value
        self.assertIn("TLS is required, but host", e.reply)

    def test_verify_failure(self):
        h, d, _ = self.start("verify")
        h.reply(b"220 go ahead\r\n")
        h.lose(ValueError("hostname 'wrong.example.test' doesn't match 'mx.example.test'"))
        e = self.failureResultOf(d, HopError).value
        self.assertTrue(e.reply.startswith(f"451 4.7.5 Server certificate not verified: host {PEER}:"), e.reply)
        self.assertIn("doesn't match", e.reply)

    # --- AUTH ---------------------------------------------------------------

    def tls_session(self, after=AFTER, **kw):
        h, d, _ = self.start("require", credentials=Credentials("u\u00e9", "p@ss"), **kw)
        h.sent()
        h.reply(b"220 go ahead\r\n")
        h.proto.handshakeCompleted()
        h.sent()
        h.reply(after)
        return h, d

    def test_auth_plain(self):
        h, d = self.tls_session()
        token = base64.b64encode("\0u\u00e9\0p@ss".encode())
        self.assertEqual(h.sent(), b"AUTH PLAIN " + token + b"\r\n")
        h.reply(b"235 2.7.0 Authentication successful\r\n")
        self.successResultOf(d)
        self.assertTrue(h.session.authenticated)

    def test_auth_login(self):
        h, d = self.tls_session(after=b"250-mx\r\n250 AUTH LOGIN\r\n")
        self.assertEqual(h.sent(), b"AUTH LOGIN\r\n")
        h.reply(b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(h.sent(), base64.b64encode("u\u00e9".encode()) + b"\r\n")
        h.reply(b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(h.sent(), base64.b64encode(b"p@ss") + b"\r\n")
        h.reply(b"235 2.7.0 ok\r\n")
        self.successResultOf(d)

    def test_auth_failure_defers_naming_it(self):
        h, d = self.tls_session()
        h.reply(b"535 5.7.8 Error: authentication failed\r\n")
        e = self.failureResultOf(d, HopError).value
        self.assertEqual(e.reply, f"451 4.7.0 SASL authentication failed; server {PEER} said: "
                                  f"535 5.7.8 Error: authentication failed")

    def test_auth_no_mechanism(self):
        h, d = self.tls_session(after=b"250-mx\r\n250 AUTH CRAM-MD5\r\n")
        e = self.failureResultOf(d, HopError).value
        self.assertIn("offers no mechanism we use", e.reply)
        self.assertEqual(h.sent(), b"")

    def test_never_auth_without_tls(self):
        for tls, ehlo in (("none", self.OFFER), ("opportunistic", EHLO_PLAIN)):
            h = Harness()
            d = h.open(ehlo=ehlo, tls=tls, credentials=Credentials("u", "p"))
            e = self.failureResultOf(d, HopError).value
            self.assertIn("without TLS", e.reply)
            self.assertNotIn(b"AUTH", h.sent())
