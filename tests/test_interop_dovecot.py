"""
Interoperation with a real Dovecot over LMTP (RFC 2033; issue 3): a
private Dovecot 2.3 from Debian's packages on a loopback port
(L{tests.dovecot_support}) and twisted-mta's real service started in this
process, with a C{[[route]]} sending C{dovecot.test} there C{via = "lmtp"}
(and C{example.test} to its own Maildirs, where the DSNs land).

  - One message for two of Dovecot's users reaches both Maildirs, its
    body byte for byte (Dovecot stores LF line ends); the spool empties.
  - A known and an unknown user: Dovecot's own per-recipient 550 5.1.1
    fails the unknown one, with one DSN to the sender quoting it; the
    known one gets the message.
  - Dovecot stopped: the recipient is deferred (connection refused) and
    stays queued; Dovecot started again and the queue flushed, it is
    delivered.

Without Dovecot (or without root) these tests skip, except under
C{TWISTED_MTA_CI=1}, where they fail.
"""

from __future__ import annotations

import email
import email.policy
import re

from twisted.internet import defer
from twisted.trial import unittest

from tests import dovecot_support
from tests import e2e_support as e2e
from tests.dovecot_support import DOMAIN, Dovecot
from tests.e2e_support import Site, in_thread, queue_id, send, wait_for
from tests.processes import RequireTestsMixin, wait_files
from tests.test_interop_postfix import BODY, lf, received_fields, split_message, unfold

ALICE = "alice@example.test"
CAROL = f"carol@{DOMAIN}"
DAVE = f"dave@{DOMAIN}"
NOBODY = f"nobody@{DOMAIN}"


class DovecotTestCase(unittest.TestCase):
    timeout = 120

    def peers(self, users=("carol", "dave")) -> tuple[Site, Dovecot]:
        """A site routing dovecot.test to a private Dovecot (not yet started)."""
        dovecot_support.require(self)
        dc = Dovecot(users=users)
        self.addCleanup(dc.cleanup)
        routes = (e2e.toml_table("[[route]]", {"domains": ["example.test"], "via": "maildir",
                                               "path": "mail"})
                  + e2e.toml_table("[[route]]", {"domains": [DOMAIN], "via": "lmtp",
                                                 "endpoint": dc.endpoint}))
        site = Site(self.mktemp(), {"smtp": "none"}, tls=False,
                    local_domains=("example.test", DOMAIN), fixed_ports=False, extra=routes,
                    delivery={"connect_timeout": 10, "greeting_timeout": 30,
                              "command_timeout": 30, "data_timeout": 30})
        return site, dc

    @defer.inlineCallbacks
    def start(self, site: Site, dc: Dovecot):
        try:
            yield in_thread(dc.start)
        except RuntimeError as e:
            self.fail(str(e))
        return e2e.start_in_process(self, site)

    def send(self, site: Site, recipients, msgid: str, body: bytes = BODY):
        message = e2e.message(msgid, "to Dovecot", body, sender=ALICE, to=recipients[0])
        return message, in_thread(send, site.host, site.port(), ALICE, recipients, message)

    def wait_dovecot(self, dc: Dovecot, user: str, n: int = 1):
        return wait_files(self, lambda: dc.delivered(user), n,
                          f"{n} message(s) for {user}@{DOMAIN} at Dovecot", dc.log_tail)

    def wait_mta(self, site: Site, address: str, n: int = 1):
        return wait_files(self, lambda: site.delivered(address), n,
                          f"{n} message(s) for {address} at twisted-mta")

    def check_stored(self, path, message: bytes, user: str, qid: str, alone: bool = True) -> None:
        """
        A message as Dovecot stored it: our header and body intact, with
        LF line ends, under Dovecot's Return-Path and Received.  Only when
        the transaction had one recipient (C{alone}) does Dovecot name it
        (Delivered-To, and "for <address>" in its Received field).
        """
        head, body = split_message(path.read_bytes())
        self.assertEqual(body, lf(split_message(message)[1]))
        self.assertIn(lf(split_message(message)[0]), head)
        self.assertNotIn(b"\r\n", head)
        self.assertTrue(head.startswith(f"Return-Path: <{ALICE}>\n".encode()), head)
        received = received_fields(head)
        # Dovecot's own field on top, then twisted-mta's.
        self.assertRegex(received[0], r"^from mx\.example\.test \(\[127\.0\.0\.1\]\) "
                                      rf"by dovecot\.test with LMTP id \S+ \(envelope-from <{ALICE}>\)")
        address = f"{user}@{DOMAIN}"
        if alone:
            self.assertIn(f"Delivered-To: {address}".encode(), head)
            self.assertIn(f"for <{address}>", received[0])
        else:
            self.assertNotIn(b"Delivered-To:", head)
            self.assertNotIn(" for <", received[0])
        self.assertRegex(received[1], rf"by mx\.example\.test \(twisted-mta\) with E?SMTP id {qid}")


class DeliveryTests(DovecotTestCase):
    """twisted-mta → Dovecot's LMTP server."""

    @defer.inlineCallbacks
    def test_two_users_byte_for_byte(self):
        """
        One message for carol and dave at Dovecot reaches both Maildirs
        in one LMTP transaction (Dovecot logs two saves in one session),
        the body byte for byte (with LF line ends), the header under
        Dovecot's Received and Delivered-To; twisted-mta's spool empties
        and nothing bounces.
        """
        site, dc = self.peers()
        mta = yield self.start(site, dc)
        message, d = self.send(site, [CAROL, DAVE], "two@example.test")
        code, text = yield d
        self.assertEqual(code, 250, text)
        qid = queue_id(text)
        [carol] = yield self.wait_dovecot(dc, "carol")
        [dave] = yield self.wait_dovecot(dc, "dave")
        self.check_stored(carol, message, "carol", qid, alone=False)
        self.check_stored(dave, message, "dave", qid, alone=False)
        yield wait_for(lambda: not site.queued_ids(), "twisted-mta's spool to empty")
        self.assertEqual(site.all_delivered(), [])
        # Both saves in one LMTP session (Dovecot's session id, ":R2" for
        # the second recipient of the transaction).
        saves = re.findall(r"lmtp\((\S+)\)<\d+><([^>:]+)(?::R\d+)?>: Info: "
                           r"msgid=<two@example\.test>: saved mail to INBOX", dc.log())
        self.assertEqual(sorted(user for user, _ in saves), [CAROL, DAVE], dc.log_tail())
        self.assertEqual(len({session for _, session in saves}), 1, dc.log_tail())
        self.assertEqual(mta.delivery.entries, {})

    @defer.inlineCallbacks
    def test_unknown_user_bounces_with_dovecots_reply(self):
        """
        carol and nobody (not in Dovecot's userdb): carol gets the
        message; Dovecot's own 550 5.1.1 at RCPT fails nobody, and the
        sender gets one DSN quoting it; the spool empties.
        """
        site, dc = self.peers()
        mta = yield self.start(site, dc)
        message, d = self.send(site, [CAROL, NOBODY], "unknown@example.test")
        code, text = yield d
        self.assertEqual(code, 250, text)
        qid = queue_id(text)
        [carol] = yield self.wait_dovecot(dc, "carol")
        self.check_stored(carol, message, "carol", qid)
        [dsn_file] = yield self.wait_mta(site, ALICE)
        dsn = email.message_from_bytes(dsn_file.read_bytes(), policy=email.policy.default)
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        self.assertEqual(dsn.get_param("report-type"), "delivery-status")
        human, status, original = dsn.get_payload()
        reply = f"550 5.1.1 <{NOBODY}> User doesn't exist: {NOBODY}"
        self.assertIn(f"<{NOBODY}>: host {dc.endpoint} said: {reply}",
                      " ".join(human.get_content().split()))
        self.assertNotIn(CAROL, human.get_content())
        fields = unfold(status.as_string())
        self.assertIn(f"Final-Recipient: rfc822; {NOBODY}", fields)
        self.assertIn("Action: failed", fields)
        self.assertIn("Status: 5.1.1", fields)
        self.assertIn(f"Diagnostic-Code: smtp; {reply}", fields)
        self.assertNotIn(CAROL, fields)
        self.assertIn("Message-ID: <unknown@example.test>", original.as_string())
        yield wait_for(lambda: not site.queued_ids(), "twisted-mta's spool to empty")
        self.assertEqual(dc.delivered("nobody"), [])
        self.assertEqual(len(site.delivered(ALICE)), 1)
        self.assertEqual(mta.delivery.entries, {})

    @defer.inlineCallbacks
    def test_dovecot_down_defers_then_flush_delivers(self):
        """
        A first message is delivered (its LMTP connection kept).  Dovecot
        stops: the next message's recipient is deferred with "connection
        refused" (the kept connection is dead) and stays queued, nothing
        bounced.  Dovecot starts again on the same port; after a flush the
        message is delivered and the spool empties.
        """
        site, dc = self.peers()
        mta = yield self.start(site, dc)
        _, d = self.send(site, [CAROL], "first@example.test")
        code, text = yield d
        self.assertEqual(code, 250, text)
        yield self.wait_dovecot(dc, "carol")
        yield wait_for(lambda: not site.queued_ids(), "twisted-mta's spool to empty")

        yield in_thread(dc.stop)
        message, d = self.send(site, [CAROL], "later@example.test")
        code, text = yield d
        self.assertEqual(code, 250, text)
        qid = queue_id(text)

        def recorded():
            [r] = mta.spool.load(qid).recipients
            return r if r.attempts else None
        carol = yield wait_for(recorded, "the deferral recorded in the spool")
        self.assertEqual(carol.state, "deferred")
        self.assertEqual(carol.last_reply,
                         f"451 4.4.1 connect to {dc.endpoint}: Connection refused")
        self.assertGreater(carol.next_try, mta.spool.load(qid).arrival)
        self.assertEqual(site.queued_ids(), {qid})
        self.assertEqual(len(dc.delivered("carol")), 1)
        self.assertEqual(site.all_delivered(), [])

        yield in_thread(dc.start)
        self.assertEqual(mta.delivery.flush(), [qid])
        files = yield self.wait_dovecot(dc, "carol", 2)
        yield wait_for(lambda: not site.queued_ids(), "twisted-mta's spool to empty")
        later = [f for f in files if b"Message-ID: <later@example.test>" in f.read_bytes()]
        self.assertEqual(len(later), 1)
        self.check_stored(later[0], message, "carol", qid)
        self.assertEqual(site.all_delivered(), [])


class RequireTests(RequireTestsMixin, unittest.SynchronousTestCase):
    """Without a usable Dovecot the tests skip, saying why; under CI they fail."""

    support = dovecot_support
    peer = "dovecot"
