"""
Interoperation with a real Postfix (Debian's package; issue 3): a private
instance on a loopback port (L{tests.postfix_support}) and twisted-mta's
real service started in this process, each the other's peer.

  - twisted-mta relays through Postfix as its smart host, over STARTTLS
    verified against Postfix's test CA (C{tls = "verify"}, the route's
    host C{127.0.0.1}, which Postfix's certificate names as an IP
    address), with AUTH PLAIN (Cyrus SASL at Postfix).
  - Postfix's refusals at RCPT: 550 5.1.1 bounces (a DSN in the sender's
    Maildir at twisted-mta, quoting Postfix), 450 defers (the reply kept
    in the spool for that recipient).
  - Postfix relays into twisted-mta (C{relayhost}) over STARTTLS at
    Postfix's C{secure} level (chain and name C{mx.example.test}
    verified); Postfix's queue ends empty.
  - swaks sends an 8-bit message through Postfix into twisted-mta, and an
    SMTPUTF8 message goes through twisted-mta into Postfix.

Without Postfix (or without root) these tests skip, except under
C{TWISTED_MTA_CI=1}, where they fail.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests import postfix_support
from tests.e2e_support import Site, in_thread, queue_id, send, wait_for
from tests.processes import RequireTestsMixin, wait_files
from tests.postfix_support import DOMAIN, Postfix

ALICE = "alice@example.test"
BOB = "bob@example.test"
CAROL = f"carol@{DOMAIN}"
NOBODY = f"nobody@{DOMAIN}"
LATER = f"later@{DOMAIN}"

# A body that exercises transparency and line handling: leading dots, a
# line that is only a dot, trailing blanks, an empty line, a long line.
BODY = (b"Hello Carol,\r\n"
        b".leading dot\r\n"
        b".\r\n"
        b"..two dots\r\n"
        b"trailing blanks   \r\n"
        b"\r\n"
        + b"x" * 900 + b"\r\n"
        b"-- \r\n"
        b"Alice\r\n")


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """Header and body of a stored message, with either line end."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        if sep in data:
            head, _, body = data.partition(sep)
            return head, body
    return data, b""


def unfold(text: str) -> str:
    """Header text with folded lines joined and runs of blanks made one space."""
    text = re.sub(r"\r?\n[ \t]+", " ", text.replace("\r\n", "\n"))
    return "\n".join(" ".join(line.split()) for line in text.split("\n"))


def received_fields(head: bytes) -> list[str]:
    """The Received fields of a header, unfolded, top first."""
    lines = unfold(head.decode("utf-8", "replace")).split("\n")
    return [line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("received:")]


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


class PostfixTestCase(unittest.TestCase):
    """A twisted-mta site and a Postfix instance, each pointed at the other."""

    def setUp(self):
        postfix_support.require(self)

    def peers(self, *, sasl: bool = False, recipient_access=None, mailboxes=("carol",),
              tls: str = "verify") -> tuple[Site, Postfix]:
        """
        A site for example.test whose other mail goes to Postfix (route
        C{tls}), and a Postfix for postfix.test relaying the rest to the
        site; both configured, neither started.
        """
        pf = Postfix(mailboxes=mailboxes, recipient_access=recipient_access,
                     sasl_users={"relay": "relay-secret"} if sasl else None)
        self.addCleanup(pf.cleanup)
        folder = self.mktemp()
        os.makedirs(folder)
        route = {"domains": ["*"], "via": "smtp", "host": "127.0.0.1", "port": pf.port, "tls": tls}
        if sasl:
            with open(os.path.join(folder, "smarthost.secret"), "w") as f:
                f.write("relay-secret\n")
            route.update(username=f"relay@{DOMAIN}", password_file="smarthost.secret")
        extra = (e2e.toml_table("[[route]]", {"domains": ["example.test"], "via": "maildir",
                                              "path": "mail"})
                 + e2e.toml_table("[[route]]", route))
        site = Site(folder, {"smtp": "starttls"}, networks=("127.0.0.0/8",),
                    delivery={"ca_file": str(pf.ca)}, extra=extra)
        pf.relay_port, pf.relay_ca = site.port(), site.ca
        return site, pf

    @defer.inlineCallbacks
    def start(self, site: Site, pf: Postfix):
        try:
            yield in_thread(pf.start)
        except RuntimeError as e:
            self.fail(str(e))
        mta = e2e.start_in_process(self, site)
        return mta

    def send_to_mta(self, site: Site, sender: str, recipients, message: bytes, **kw):
        return in_thread(send, site.host, site.port(), sender, recipients, message,
                         starttls=site.client_context(), server_hostname="mx.example.test", **kw)

    def send_to_postfix(self, pf: Postfix, sender: str, recipients, message: bytes):
        import ssl
        ctx = ssl.create_default_context(cafile=str(pf.ca))
        return in_thread(send, pf.host, pf.port, sender, recipients, message, starttls=ctx)

    def wait_postfix(self, pf: Postfix, user: str, n: int = 1):
        return wait_files(self, lambda: pf.delivered(user), n,
                          f"{n} message(s) for {user}@{DOMAIN} at Postfix", pf.log_tail)

    def wait_mta(self, site: Site, address: str, n: int = 1):
        return wait_files(self, lambda: site.delivered(address), n,
                          f"{n} message(s) for {address} at twisted-mta")


class SmartHostTests(PostfixTestCase):
    """twisted-mta → Postfix as the smart host."""

    @defer.inlineCallbacks
    def test_relay_over_verified_starttls_with_auth(self):
        """
        A message for carol@postfix.test sent to twisted-mta reaches
        Postfix's Maildir with its body byte for byte (Postfix stores LF
        line ends); Postfix's Received field shows TLS and AUTH (ESMTPSA)
        and its log the SASL user; twisted-mta's spool ends empty.
        """
        postfix_support.require(self, sasl=True)
        site, pf = self.peers(sasl=True)
        yield self.start(site, pf)
        message = e2e.message("smarthost@example.test", "through Postfix", BODY,
                              sender=ALICE, to=CAROL)
        code, text = yield self.send_to_mta(site, ALICE, [CAROL], message)
        self.assertEqual(code, 250, text)
        qid = queue_id(text)
        files = yield self.wait_postfix(pf, "carol")
        stored = files[0].read_bytes()
        head, body = split_message(stored)
        self.assertEqual(body, lf(BODY))
        self.assertIn(lf(split_message(message)[0]), head)
        received = received_fields(head)
        # Postfix's own field on top, then twisted-mta's.
        self.assertRegex(received[0], r"^from mx\.example\.test \(localhost \[127\.0\.0\.1\]\) "
                                      r"\(using TLSv1\.[23] with cipher ")
        self.assertRegex(received[0], r"by postfix\.test \(Postfix\) with ESMTPSA id ")
        self.assertRegex(received[1], rf"by mx\.example\.test \(twisted-mta\) with ESMTPS id {qid}")
        self.assertIn(f"sasl_method=PLAIN, sasl_username=relay@{DOMAIN}", pf.log())
        yield wait_for(lambda: not site.queued_ids(), "twisted-mta's spool to empty")

        # Two more, one after the other: the idle connection is used again
        # (RSET, MAIL...), so Postfix sees fewer TLS sessions than messages.
        for n in (2, 3):
            message = e2e.message(f"smarthost{n}@example.test", "again", BODY, sender=ALICE, to=CAROL)
            code, text = yield self.send_to_mta(site, ALICE, [CAROL], message)
            self.assertEqual(code, 250, text)
            yield self.wait_postfix(pf, "carol", n)
        sessions = pf.log().count("TLS connection established from localhost[127.0.0.1]")
        self.assertLess(sessions, 3, pf.log_tail(60))

    @defer.inlineCallbacks
    def test_postfix_refusals_bounce_and_defer(self):
        """
        One message for three recipients at Postfix: carol is delivered;
        Postfix's 550 5.1.1 for nobody makes one DSN in the sender's
        Maildir at twisted-mta, quoting Postfix's reply; Postfix's 450 for
        later defers that recipient, its reply kept in the spool entry.
        """
        site, pf = self.peers(recipient_access={LATER: "450 4.2.0 try again later"})
        mta = yield self.start(site, pf)
        message = e2e.message("refusals@example.test", "three recipients", BODY,
                              sender=ALICE, to=CAROL)
        code, text = yield self.send_to_mta(site, ALICE, [CAROL, NOBODY, LATER], message)
        self.assertEqual(code, 250, text)
        qid = queue_id(text)
        yield self.wait_postfix(pf, "carol")
        dsn_files = yield self.wait_mta(site, ALICE)
        dsn = email.message_from_bytes(dsn_files[0].read_bytes(), policy=email.policy.default)
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        self.assertEqual(dsn.get_param("report-type"), "delivery-status")
        human, status, original = dsn.get_payload()
        pf_reply = (f"550 5.1.1 <{NOBODY}>: Recipient address rejected: "
                    f"User unknown in virtual mailbox table")
        self.assertIn(f"<{NOBODY}>: host 127.0.0.1[127.0.0.1]:{pf.port} said: {pf_reply}",
                      " ".join(human.get_content().split()))
        self.assertNotIn(LATER, human.get_content())
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        fields = unfold(status.as_string())
        self.assertIn(f"Final-Recipient: rfc822; {NOBODY}", fields)
        self.assertIn("Action: failed", fields)
        self.assertIn("Status: 5.1.1", fields)
        self.assertIn(f"Diagnostic-Code: smtp; {pf_reply}", fields)
        self.assertIn("Remote-MTA: dns; 127.0.0.1", fields)
        self.assertNotIn(LATER, fields)
        self.assertIn("Message-ID: <refusals@example.test>", original.as_string())

        # The deferred recipient: its state and Postfix's reply, on disk.
        def recorded():
            entry = mta.spool.load(qid)
            states = {r.address: r for r in entry.recipients}
            return states if states[LATER].attempts else None
        states = yield wait_for(recorded, "the attempt recorded in the spool")
        self.assertEqual(states[CAROL].state, "delivered")
        self.assertEqual(states[NOBODY].state, "failed")
        later = states[LATER]
        self.assertEqual(later.state, "deferred")
        self.assertEqual(later.last_reply,
                         f"450 4.2.0 <{LATER}>: Recipient address rejected: try again later")
        self.assertGreater(later.next_try, entry_arrival(mta, qid))
        # The DSN, delivered, leaves the spool too (its unlink is not waited for).
        yield wait_for(lambda: site.queued_ids() == {qid}, "only the deferred message queued")
        self.assertEqual(len(pf.delivered("carol")), 1)


def entry_arrival(mta, qid: str) -> float:
    return mta.spool.load(qid).arrival


class IntoTwistedMTATests(PostfixTestCase):
    """Postfix → twisted-mta (Postfix's relayhost)."""

    @defer.inlineCallbacks
    def test_postfix_relays_over_verified_starttls(self):
        """
        A message handed to Postfix for bob@example.test is relayed to
        twisted-mta over STARTTLS that Postfix verified (level secure,
        match=mx.example.test) and lands in bob's Maildir, body intact;
        Postfix logs it sent and its queue is empty.
        """
        site, pf = self.peers()
        yield self.start(site, pf)
        message = e2e.message("into-mta@postfix.test", "from Postfix", BODY, sender=CAROL, to=BOB)
        code, text = yield self.send_to_postfix(pf, CAROL, [BOB], message)
        self.assertEqual(code, 250, text)
        files = yield self.wait_mta(site, BOB)
        stored = files[0].read_bytes()
        head, body = split_message(stored)
        self.assertEqual(body, BODY)
        received = received_fields(head)
        self.assertRegex(received[0], r"^from postfix\.test \(unknown \[127\.0\.0\.1\]\) "
                                      r"\(using TLSv1\.[23] with cipher ")
        self.assertRegex(received[0], r"by mx\.example\.test \(twisted-mta\) with ESMTPS id ")
        self.assertRegex(received[1], r"by postfix\.test \(Postfix\) with ESMTPS id ")

        def sent():
            log = pf.log()
            return "status=sent" in log and not pf.queue_list()
        yield wait_for(sent, "Postfix to log the message sent, its queue empty")
        log = pf.log()
        self.assertRegex(log, rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]"
                              rf":{site.port()}")
        self.assertRegex(log, rf"to=<{re.escape(BOB)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:"
                              rf"{site.port()}, .* status=sent \(250 2\.0\.0 Ok: queued as \w+\)")

    @defer.inlineCallbacks
    def test_8bit_and_smtputf8_both_ways(self):
        """
        swaks hands Postfix an 8-bit message (UTF-8 subject and body) for
        bob@example.test; Postfix relays it into twisted-mta, bytes intact.
        An SMTPUTF8 message from jürgen@example.test to dörte@postfix.test
        goes through twisted-mta into Postfix, which records it as
        received with UTF8SMTPS.
        """
        swaks = shutil.which("swaks")
        if swaks is None:
            if os.environ.get("TWISTED_MTA_CI"):
                self.fail("swaks is not installed, but CI (.ci/run) should have installed it")
            raise unittest.SkipTest("swaks is not installed (apt-get install swaks "
                                    "libnet-ssleay-perl; .ci/run does)")
        site, pf = self.peers(mailboxes=("carol", "dörte"))
        yield self.start(site, pf)

        body8 = "Grüße aus Köln – ½ € für dich.\r\n.Punkt\r\n".encode()
        data = (b"From: <carol@postfix.test>\r\nTo: <bob@example.test>\r\n"
                b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <swaks8@postfix.test>\r\n"
                b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body8)
        data_file = os.path.join(self.mktemp() + "-data")
        with open(data_file, "wb") as f:
            f.write(data + b".\r\n")  # the end of data, given so swaks adds no line
        argv = [swaks, "--server", pf.host, "--port", str(pf.port), "--ehlo", "swaks.postfix.test",
                "--from", CAROL, "--to", BOB, "--tls", "--tls-verify", "--tls-ca-path", str(pf.ca),
                "--data", "@" + data_file, "--timeout", "60"]
        result = yield in_thread(subprocess.run, argv, capture_output=True, timeout=120)
        out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        self.assertEqual(result.returncode, 0, out)
        self.assertIn("<~  250 2.0.0 Ok: queued as", out)
        files = yield self.wait_mta(site, BOB)
        head, body = split_message(files[0].read_bytes())
        self.assertEqual(body, body8)
        self.assertIn(b"Content-Transfer-Encoding: 8bit", head)

        jurgen, dorte = "jürgen@example.test", f"dörte@{DOMAIN}"
        message = ("From: Jürgen <jürgen@example.test>\r\nTo: <dörte@postfix.test>\r\n"
                   "Subject: Grüße\r\nMessage-ID: <utf8@example.test>\r\nMIME-Version: 1.0\r\n"
                   "Content-Type: text/plain; charset=utf-8\r\n"
                   "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + body8
        code, text = yield self.send_to_mta(site, jurgen, [dorte], message,
                                            mail_options=("SMTPUTF8", "BODY=8BITMIME"))
        self.assertEqual(code, 250, text)
        files = yield self.wait_postfix(pf, "dörte")
        head, body = split_message(files[0].read_bytes())
        self.assertEqual(body, lf(body8))
        self.assertIn("Subject: Grüße".encode(), head)
        received = received_fields(head)
        self.assertRegex(received[0], r"by postfix\.test \(Postfix\) with UTF8SMTPS id ")
        self.assertRegex(received[1], r"by mx\.example\.test \(twisted-mta\) with UTF8SMTPS id ")
        self.assertIn(f"to=<{dorte}>, relay=virtual", pf.log())


class RequireTests(RequireTestsMixin, unittest.SynchronousTestCase):
    """Without a usable Postfix the tests skip, saying why; under CI they fail."""

    support = postfix_support
    peer = "postfix"
