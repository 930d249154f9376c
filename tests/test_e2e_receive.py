"""
End-to-end tests of receiving (issue 2) over real sockets on loopback:
the real service, configured from a C{mta.toml} in a temporary folder,
and real clients (Python's smtplib, swaks).

Most tests start L{MTAService} in this process (fast) and run smtplib in
a thread; the ones about the process itself (its log, kill -9) run
C{twistd -n mta} in a subprocess.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import ssl
import subprocess
import threading

from twisted.internet import defer
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.e2e_support import LOCAL_DOMAIN, Site, in_thread, queue_id, send, wait_for
from tests.processes import children

SENDER = "alice@client.example.net"
BOB = f"bob@{LOCAL_DOMAIN}"
CAROL = f"carol@{LOCAL_DOMAIN}"


def ehlo_features(host, port, context=None, starttls=False):
    """The EHLO keywords the server advertises (after STARTTLS if asked)."""
    client = smtplib.SMTP(host, port, local_hostname="client.example.net", timeout=60)
    try:
        client.ehlo()
        if starttls:
            client.starttls(context=context)
            client.ehlo()
        return {k.upper(): v for k, v in client.esmtp_features.items()}
    finally:
        client.quit()


class InProcessTestsMixin:
    """Helpers for tests against an in-process L{MTAService}."""

    def site(self, listeners=None, **kwargs) -> Site:
        """A site whose listeners are on port 0 (see L{start})."""
        return Site(self.mktemp(), listeners, fixed_ports=False, **kwargs)

    def start(self, site: Site):
        return e2e.start_in_process(self, site)

    def delivered_one(self, site: Site, address: str):
        """Wait until C{address}'s Maildir has a message; its bytes."""
        return wait_for(lambda: site.delivered(address), f"delivery to {address}").addCallback(
            lambda files: files[0].read_bytes())


class PlainAndTLSTests(InProcessTestsMixin, unittest.TestCase):
    """Plain SMTP, STARTTLS, implicit TLS and require-starttls."""

    @defer.inlineCallbacks
    def test_plain(self):
        """
        Without TLS a message is accepted with "250 2.0.0 Ok: queued as ID"
        and delivered into the local recipient's Maildir; EHLO advertises
        the extensions of the issue and no STARTTLS.
        """
        site = self.site({"smtp": "none"})
        self.start(site)
        features = yield in_thread(ehlo_features, site.host, site.port())
        for keyword in ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8",
                        "ENHANCEDSTATUSCODES", "CHUNKING"):
            self.assertIn(keyword, features)
        self.assertEqual(features["SIZE"], "52428800")
        self.assertNotIn("STARTTLS", features)

        msg = e2e.message("plain@client.example.net")
        code, text = yield in_thread(send, site.host, site.port(), SENDER, [BOB], msg)
        self.assertEqual(code, 250)
        qid = queue_id(text)
        stored = yield self.delivered_one(site, BOB)
        fields, rest = e2e.split_trace(stored)
        self.assertEqual(rest, msg)
        received = fields[2]
        self.assertTrue(received.startswith(b"Received: from client.example.net (unknown [127.0.0.1])"),
                        received)
        self.assertIn(b"by mx.example.test (twisted-mta) with ESMTP id " + qid.encode(), received)
        self.assertNotIn(b"using TLS", received)

    @defer.inlineCallbacks
    def test_starttls_verified(self):
        """
        STARTTLS with a client that trusts only the test CA and checks the
        host name (the IP address in the certificate): the handshake
        verifies, EHLO after it no longer offers STARTTLS, and the
        Received header names the TLS version and cipher (ESMTPS).
        """
        site = self.site({"smtp": "starttls"})
        self.start(site)
        ctx = site.client_context()
        before = yield in_thread(ehlo_features, site.host, site.port())
        self.assertIn("STARTTLS", before)
        after = yield in_thread(ehlo_features, site.host, site.port(), ctx, True)
        self.assertNotIn("STARTTLS", after)
        self.assertIn("PIPELINING", after)

        msg = e2e.message("starttls@client.example.net")
        code, text = yield in_thread(send, site.host, site.port(), SENDER, [BOB], msg,
                                     starttls=ctx)
        self.assertEqual(code, 250)
        qid = queue_id(text)
        stored = yield self.delivered_one(site, BOB)
        fields, rest = e2e.split_trace(stored)
        self.assertEqual(rest, msg)
        received = b"".join(fields[2:])
        self.assertRegex(received, rb"\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)")
        self.assertIn(b"with ESMTPS id " + qid.encode(), received)

    @defer.inlineCallbacks
    def test_starttls_server_name(self):
        """The certificate also verifies for the configured host name."""
        site = self.site({"smtp": "starttls"})
        self.start(site)
        code, text = yield in_thread(send, site.host, site.port(), SENDER, [BOB],
                                     e2e.message("name@client.example.net"),
                                     starttls=site.client_context(),
                                     server_hostname=e2e.HOSTNAME)
        self.assertEqual(code, 250)
        queue_id(text)

    @defer.inlineCallbacks
    def test_starttls_untrusted(self):
        """A client trusting another CA refuses the certificate."""
        site = self.site({"smtp": "starttls"})
        other = self.site({"x": "none"})  # only for its (different) CA
        self.start(site)
        yield self.assertFailure(
            in_thread(send, site.host, site.port(), SENDER, [BOB], e2e.message("x@y"),
                      starttls=site.client_context(other.ca)),
            ssl.SSLCertVerificationError)

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        """A tls = "implicit" listener speaks TLS from the first byte (smtplib.SMTP_SSL)."""
        site = self.site({"smtps": "implicit"})
        self.start(site)
        msg = e2e.message("implicit@client.example.net")
        code, text = yield in_thread(send, site.host, site.port("smtps"), SENDER, [BOB], msg,
                                     implicit=site.client_context())
        self.assertEqual(code, 250)
        qid = queue_id(text)
        stored = yield self.delivered_one(site, BOB)
        fields, rest = e2e.split_trace(stored)
        self.assertEqual(rest, msg)
        received = b"".join(fields[2:])
        self.assertIn(b"using TLSv1.", received)
        self.assertIn(b"with ESMTPS id " + qid.encode(), received)

    @defer.inlineCallbacks
    def test_implicit_tls_no_starttls(self):
        """An implicit-TLS listener does not offer STARTTLS again."""
        site = self.site({"smtps": "implicit"})
        self.start(site)

        def features():
            client = smtplib.SMTP_SSL(site.host, site.port("smtps"), timeout=60,
                                      context=site.client_context())
            try:
                client.ehlo()
                return set(client.esmtp_features)
            finally:
                client.quit()

        found = yield in_thread(features)
        self.assertNotIn("starttls", found)
        self.assertIn("pipelining", found)

    @defer.inlineCallbacks
    def test_require_starttls(self):
        """
        tls = "require-starttls": MAIL before STARTTLS gets 530 5.7.0; after
        STARTTLS the same transaction is accepted.
        """
        site = self.site({"submission": "require-starttls"})
        self.start(site)
        port = site.port("submission")

        def plain_mail():
            client = smtplib.SMTP(site.host, port, local_hostname="client.example.net", timeout=60)
            try:
                client.ehlo()
                starttls = client.has_extn("starttls")
                return starttls, client.mail(SENDER)
            finally:
                client.quit()

        offered, (code, text) = yield in_thread(plain_mail)
        self.assertTrue(offered)
        self.assertEqual(code, 530)
        self.assertTrue(text.startswith(b"5.7.0 "), text)
        self.assertIn(b"STARTTLS", text)
        yield self.assertFailure(
            in_thread(send, site.host, port, SENDER, [BOB], e2e.message("refused@x")),
            smtplib.SMTPSenderRefused)

        code, text = yield in_thread(send, site.host, port, SENDER, [BOB],
                                     e2e.message("required@client.example.net"),
                                     starttls=site.client_context())
        self.assertEqual(code, 250)
        queue_id(text)

    @defer.inlineCallbacks
    def test_ipv6_loopback(self):
        """A tcp6 listener on ::1 receives mail (relay networks include ::1/128)."""
        if not e2e.has_ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback (::1) on this machine")
        site = self.site({"smtp": "starttls"}, host="::1",
                         networks=["::1/128"], relay_route=("::1", e2e.free_port("::1")))
        self.start(site)
        code, text = yield in_thread(send, "::1", site.port(), SENDER, ["dave@elsewhere.example.net"],
                                     e2e.message("v6@client.example.net"),
                                     starttls=site.client_context())
        self.assertEqual(code, 250)
        self.assertIn(queue_id(text), site.queued_ids())


class RelayTests(InProcessTestsMixin, unittest.TestCase):
    """The built-in relay rules, seen from a client on loopback."""

    @defer.inlineCallbacks
    def test_relay_denied(self):
        """
        Loopback not in [relay] networks: RCPT for a foreign domain gets
        554 5.7.1 Relay access denied, while a local recipient in the same
        session is still accepted.
        """
        site = self.site({"smtp": "none"})  # networks = 192.0.2.0/24 only
        self.start(site)

        def attempt():
            client = smtplib.SMTP(site.host, site.port(), local_hostname="client.example.net",
                                  timeout=60)
            try:
                client.ehlo()
                self.assertEqual(client.mail(SENDER)[0], 250)
                foreign = client.rcpt("someone@elsewhere.example.net")
                local = client.rcpt(BOB)
                return foreign, local
            finally:
                client.quit()

        foreign, local = yield in_thread(attempt)
        self.assertEqual(foreign, (554, b"5.7.1 <someone@elsewhere.example.net>: Relay access denied"))
        self.assertEqual(local[0], 250)
        yield self.assertFailure(
            in_thread(send, site.host, site.port(), SENDER, ["someone@elsewhere.example.net"],
                      e2e.message("denied@x")),
            smtplib.SMTPRecipientsRefused)
        self.assertEqual(site.queued_ids(), set())

    @defer.inlineCallbacks
    def test_relay_tricks(self):
        """
        A source route (RFC 5321 4.1.1.3: the route is ignored) never opens a
        relay; percent-hack and bang-path addresses at a local domain are
        local recipients (or refused), never passed on: whatever is
        accepted is delivered into a local Maildir, nothing stays queued
        for the smart host route.
        """
        site = self.site({"smtp": "none"}, relay_route=("127.0.0.1", e2e.free_port()))
        mta = self.start(site)
        tricks = [
            "<@example.test:someone@elsewhere.example.net>",
            "<@example.test,@mx.example.test:someone@elsewhere.example.net>",
            "<someone%elsewhere.example.net@example.test>",
            "<elsewhere.example.net!someone@example.test>",
            "<someone@elsewhere.example.net@example.test>",
            "<@elsewhere.example.net:bob@example.test>",
        ]

        def attempt():
            client = smtplib.SMTP(site.host, site.port(), local_hostname="client.example.net",
                                  timeout=60)
            try:
                client.ehlo()
                self.assertEqual(client.mail(SENDER)[0], 250)
                answers = [client.docmd("RCPT", "TO:" + t) for t in tricks]
                data = None
                if any(code == 250 for code, _ in answers):
                    data = client.data(e2e.message("tricks@client.example.net"))
                return answers, data
            finally:
                client.quit()

        answers, data = yield in_thread(attempt)
        answers = dict(zip(tricks, answers))
        for trick in tricks[:2]:
            self.assertEqual(answers[trick],
                             (554, b"5.7.1 <someone@elsewhere.example.net>: Relay access denied"))
        for trick in tricks[2:]:
            code, text = answers[trick]
            self.assertIn(code, (250, 501, 550, 553, 554), (trick, text))
        self.assertEqual(answers[tricks[-1]][0], 250)
        self.assertEqual(data[0], 250, data)
        qid = queue_id(data[1])
        yield wait_for(lambda: qid not in mta.delivery.entries, "local delivery of every recipient")
        self.assertEqual(site.queued_ids(), set())
        self.assertIn(b"Message-ID: <tricks@client.example.net>", site.delivered(BOB)[0].read_bytes())

    @defer.inlineCallbacks
    def test_relay_allowed(self):
        """
        Loopback in [relay] networks: a message for a foreign domain is
        accepted and stays queued in spool/queue (delivery to other hosts
        is not part of receiving; its route here cannot succeed).
        """
        site = self.site({"smtp": "none"}, networks=["127.0.0.0/8", "::1/128"],
                         relay_route=("127.0.0.1", e2e.free_port()))
        mta = self.start(site)
        msg = e2e.message("relayed@client.example.net", to="dave@elsewhere.example.net")
        code, text = yield in_thread(send, site.host, site.port(), SENDER,
                                     ["dave@elsewhere.example.net"], msg)
        self.assertEqual(code, 250)
        qid = queue_id(text)
        self.assertIn(qid, site.queued_ids())
        self.assertIn(msg, (site.queue / qid).read_bytes())
        # Whatever the delivery attempt did, the message is still queued.
        yield wait_for(lambda: qid not in mta.delivery.active, "the delivery attempt")
        self.assertIn(qid, site.queued_ids())
        self.assertEqual(site.all_delivered(), [])


class MaildirTests(InProcessTestsMixin, unittest.TestCase):
    """What lands in a Maildir, byte for byte."""

    # 8-bit text (UTF-8 and not), lines starting with dots (smtplib
    # dot-stuffs them; the server must unstuff), a line that is just a dot,
    # trailing spaces, a tab, a long line.
    BODY = (
        b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x80\x94 8-bit, UTF-8.\r\n"
        b"Latin-1 bytes: caf\xe9 \xff\xfe\x80\r\n"
        b".a line starting with a dot\r\n"
        b".\r\n"
        b"..two dots\r\n"
        b"trailing spaces   \r\n"
        b"\ttab first\r\n"
        b"\r\n"
        + b"x" * 990 + b"\r\n"
        b"last line\r\n"
    )

    @defer.inlineCallbacks
    def test_byte_for_byte(self):
        """
        A BODY=8BITMIME message with 8-bit bytes and dot-stuffed lines is
        stored in new/ as Return-Path + Delivered-To + Received + exactly
        the bytes sent.
        """
        site = self.site({"smtp": "starttls"})
        self.start(site)
        msg = e2e.message("bytes@client.example.net", body=self.BODY)
        code, text = yield in_thread(send, site.host, site.port(), SENDER, [BOB], msg,
                                     starttls=site.client_context(),
                                     mail_options=["BODY=8BITMIME"])
        self.assertEqual(code, 250)
        qid = queue_id(text)
        stored = yield self.delivered_one(site, BOB)
        fields, rest = e2e.split_trace(stored)
        self.assertEqual(fields[0], f"Return-Path: <{SENDER}>\r\n".encode())
        self.assertEqual(fields[1], f"Delivered-To: {BOB}\r\n".encode())
        self.assertEqual(len(fields), 3, fields)
        received = fields[2]
        self.assertTrue(received.startswith(b"Received: from client.example.net (unknown [127.0.0.1])\r\n"))
        self.assertIn(b"\tby mx.example.test (twisted-mta) with ESMTPS id " + qid.encode(), received)
        self.assertIn(f"\tfor <{BOB}>; ".encode(), received)
        self.assertEqual(rest, msg)
        self.assertEqual(stored, fields[0] + fields[1] + received + msg)
        # Only new/: nothing left in tmp/, nothing in cur/.
        self.assertEqual(os.listdir(site.maildir(BOB) / "tmp"), [])
        self.assertEqual(os.listdir(site.maildir(BOB) / "cur"), [])
        # Delivered, so the spool lets go of it.
        yield wait_for(lambda: qid not in site.queued_ids(), "the spool entry to go")

    @defer.inlineCallbacks
    def test_two_recipients(self):
        """Each local recipient gets its own copy, with its own Delivered-To."""
        site = self.site({"smtp": "none"})
        self.start(site)
        msg = e2e.message("two@client.example.net", body=self.BODY)
        code, text = yield in_thread(send, site.host, site.port(), SENDER, [BOB, CAROL], msg,
                                     mail_options=["BODY=8BITMIME"])
        self.assertEqual(code, 250)
        qid = queue_id(text)
        for rcpt in (BOB, CAROL):
            stored = yield self.delivered_one(site, rcpt)
            fields, rest = e2e.split_trace(stored)
            self.assertEqual(fields[1], f"Delivered-To: {rcpt}\r\n".encode())
            self.assertIn(b" id " + qid.encode(), fields[2])
            self.assertEqual(rest, msg)

    @defer.inlineCallbacks
    def test_null_sender_and_postmaster(self):
        """MAIL FROM:<> and RCPT TO:<Postmaster> (no domain) are accepted."""
        site = self.site({"smtp": "none"})
        self.start(site)
        code, text = yield in_thread(send, site.host, site.port(), "", ["Postmaster"],
                                     e2e.message("bounce@client.example.net"))
        self.assertEqual(code, 250)
        self.assertIn(queue_id(text), text.decode())


class SubprocessTests(unittest.TestCase):
    """The real C{twistd -n mta} process."""

    def test_queue_id_in_log_and_spool(self):
        """
        The id in "250 2.0.0 Ok: queued as ID" is the spool entry's name and
        appears in twistd's log, for the transaction and for its delivery.
        """
        site = Site(self.mktemp(), {"smtp": "starttls"}, networks=["127.0.0.0/8"],
                    relay_route=("127.0.0.1", e2e.free_port()))
        server = e2e.start_process(self, site)
        ctx = site.client_context()
        code, text = send(site.host, site.port(), SENDER, ["dave@elsewhere.example.net"],
                          e2e.message("queued@client.example.net"), starttls=ctx)
        self.assertEqual(code, 250)
        relayed = queue_id(text)
        self.assertIn(relayed, site.queued_ids())
        code, text = send(site.host, site.port(), SENDER, [BOB],
                          e2e.message("local@client.example.net"), starttls=ctx)
        self.assertEqual(code, 250)
        local = queue_id(text)
        e2e.wait_for_blocking(lambda: site.delivered(BOB), "delivery")
        e2e.wait_for_blocking(lambda: local not in site.queued_ids(), "the spool entry to go")
        self.assertEqual(server.stop(), 0)

        log = site.log_path.read_text()
        for qid, rcpt in ((relayed, "dave@elsewhere.example.net"), (local, BOB)):
            lines = [line for line in log.splitlines() if qid in line]
            self.assertTrue(
                any(f"from=<{SENDER}>" in line and f"<{rcpt}>" in line
                    and f"queued as {qid}" in line for line in lines),
                f"no transaction line for {qid} in:\n{log}")
        # ... and one for its delivery attempt.
        self.assertTrue(any(local in line and BOB in line and "delivered" in line
                            and "queued as" not in line for line in log.splitlines()), log)
        # After a clean stop the relayed message is still there.
        self.assertIn(relayed, site.queued_ids())

    def test_kill9_during_burst(self):
        """
        Several clients send many messages; the server is killed with
        SIGKILL mid-burst and restarted on the same spool.  Every message
        that got "250 ... queued as ID" is afterwards either in
        spool/queue/ID or delivered into a Maildir (found by its unique
        Message-ID).
        """
        self.kill9_during_burst(receivers=0)

    test_kill9_during_burst.timeout = 300

    def test_kill9_during_burst_with_receivers(self):
        """
        The same with two receiving processes: the main process is killed,
        its receivers end by themselves (their input closes), and nothing
        they acknowledged is lost.
        """
        self.kill9_during_burst(receivers=2)

    test_kill9_during_burst_with_receivers.timeout = 300

    def kill9_during_burst(self, receivers: int):
        closed = e2e.free_port()
        site = Site(self.mktemp(), {"smtp": "starttls"}, networks=["127.0.0.0/8"],
                    relay_route=("127.0.0.1", closed))
        if receivers:
            site.config_path.write_text(f"receivers = {receivers}\n"
                                        + site.config_path.read_text())
        server = e2e.start_process(self, site)
        if receivers:
            receiver_pids = e2e.wait_for_blocking(
                lambda: len(children(server.proc.pid)) == receivers
                and children(server.proc.pid), "the receivers")
        port = site.port()
        ctx = site.client_context()
        acked: dict[str, tuple[str, bytes]] = {}   # Message-ID -> (queue id, message)
        lock = threading.Lock()
        killed = threading.Event()
        unexpected: list[BaseException] = []

        def client(n: int) -> None:
            i = 0
            while not killed.is_set():
                try:
                    c = smtplib.SMTP(site.host, port, local_hostname=f"c{n}.example.net", timeout=60)
                    c.ehlo()
                    if n == 0:
                        c.starttls(context=ctx)
                        c.ehlo()
                    for _ in range(10):  # ten messages per connection, then a new one
                        i += 1
                        msgid = f"burst-{n}-{i}@client.example.net"
                        rcpt = BOB if i % 3 else f"x{n}@elsewhere.example.net"
                        body = (f"message {i} from client {n}\r\n".encode()
                                + b"\xe2\x9c\x93 " * (i % 7 * 300) + b"\r\n")
                        c.mail(SENDER, ["BODY=8BITMIME"])
                        c.rcpt(rcpt)
                        msg = e2e.message(msgid, body=body, to=rcpt)
                        code, text = c.data(msg)
                        if code == 250:
                            with lock:
                                acked[msgid] = (queue_id(text), msg)
                        elif not killed.is_set():
                            raise AssertionError(f"unexpected reply {code} {text!r}")
                    c.quit()
                except (OSError, smtplib.SMTPException) as e:
                    if not killed.is_set():
                        unexpected.append(e)
                    return
                except BaseException as e:
                    unexpected.append(e)
                    return

        workers = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(5)]
        for w in workers:
            w.start()
        e2e.wait_for_blocking(lambda: len(acked) >= 300 or unexpected, "300 messages")
        killed.set()
        server.kill()
        if receivers:
            # Their input closed: they stop (and free the port) on their own.
            e2e.wait_for_blocking(lambda: not any(os.path.exists(f"/proc/{pid}")
                                                  for pid in receiver_pids),
                                  "the receivers to end")
        for w in workers:
            w.join(e2e.WAIT_DEADLINE)
            self.assertFalse(w.is_alive(), "a client thread hangs")
        self.assertEqual(unexpected, [])
        with lock:
            acked = dict(acked)

        server.start()
        # The restarted server works.
        code, text = send(site.host, port, SENDER, [CAROL], e2e.message("after@client.example.net"))
        self.assertEqual(code, 250)
        self.assertEqual(server.stop(), 0)

        queued = site.queued_ids()
        delivered: dict[str, bytes] = {}   # Message-ID -> the message after the trace fields
        for path in site.all_delivered():
            stored = path.read_bytes()
            m = re.search(rb"^Message-ID: <([^>]+)>\r$", stored, re.M)
            if m:
                delivered[m.group(1).decode()] = e2e.split_trace(stored)[1]
        if os.environ.get("E2E_DEBUG"):
            print(f"acked={len(acked)} queued={len(queued)} delivered={len(delivered)}")
        lost = []
        for msgid, (qid, msg) in sorted(acked.items()):
            if qid in queued:
                self.assertIn(msg, (site.queue / qid).read_bytes(), f"{qid} is damaged")
            elif msgid in delivered:
                self.assertEqual(delivered[msgid], msg, f"{msgid} was delivered damaged")
            else:
                lost.append((msgid, qid))
        self.assertEqual(lost, [], f"{len(lost)} of {len(acked)} acknowledged messages lost")
        after_queued = any(b"<after@client.example.net>" in (site.queue / q).read_bytes()
                           for q in queued)
        self.assertTrue("after@client.example.net" in delivered or after_queued)


class SwaksTests(InProcessTestsMixin, unittest.TestCase):
    """swaks, a widely used SMTP test client, as a real peer."""

    def swaks(self):
        path = shutil.which("swaks")
        if path is None:
            if os.environ.get("TWISTED_MTA_CI"):
                self.fail("swaks is not installed, but CI (.ci/run) should have installed it")
            raise unittest.SkipTest("swaks is not installed (apt-get install swaks "
                                    "libnet-ssleay-perl; .ci/run does)")
        return path

    @defer.inlineCallbacks
    def test_swaks_starttls(self):
        """swaks sends a message over STARTTLS, verifying the certificate, and gets 250."""
        swaks = self.swaks()
        site = self.site({"smtp": "starttls"})
        self.start(site)
        argv = [swaks, "--server", site.host, "--port", str(site.port()),
                "--ehlo", "swaks.example.net", "--from", SENDER, "--to", BOB,
                "--tls", "--tls-verify", "--tls-ca-path", str(site.ca),
                "--header", "Message-ID: <swaks@client.example.net>",
                "--body", "Sent by swaks.", "--timeout", "60"]
        result = yield in_thread(subprocess.run, argv, capture_output=True, timeout=120)
        out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        self.assertEqual(result.returncode, 0, out)
        self.assertIn("=== TLS started", out)
        m = re.search(r"<~  250 2\.0\.0 Ok: queued as (\w+)", out)
        self.assertIsNotNone(m, out)
        stored = yield self.delivered_one(site, BOB)
        self.assertIn(b"Message-ID: <swaks@client.example.net>", stored)
        self.assertIn(b"with ESMTPS id " + m.group(1).encode(), stored)


class WireTests(InProcessTestsMixin, unittest.TestCase):
    """What smtplib cannot show: pipelining, STARTTLS injection, BDAT, smuggling."""

    def raw(self, site: Site, port_name: str = "smtp") -> e2e.RawClient:
        client = e2e.RawClient(site.host, site.port(port_name))
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def test_pipelining_order(self):
        """
        Whole transactions in single writes (RFC 2920): the replies come in
        command order, the "queued as" after the fsync of one message before
        the replies to the next transaction's commands.
        """
        site = self.site({"smtp": "none"})
        self.start(site)
        body1 = e2e.message("pipe1@client.example.net")
        body2 = e2e.message("pipe2@client.example.net", body=b"second\r\n")

        def talk():
            c = self.raw(site)
            got = c.replies(1)
            c.send(b"EHLO client.example.net\r\n")
            code, lines = c.reply()
            got.append((code, lines[-1]))
            self.assertIn(b"PIPELINING", lines)
            c.send(b"MAIL FROM:<alice@client.example.net>\r\nRCPT TO:<bob@example.test>\r\n"
                   b"RCPT TO:<x@elsewhere.example.net>\r\nRCPT TO:<carol@example.test>\r\nDATA\r\n")
            got += c.replies(5)
            c.send(body1 + b".\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
            got += c.replies(4)
            c.send(body2 + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
            got += c.replies(4)
            return got

        got = yield in_thread(talk)
        self.assertEqual([code for code, _ in got], [220, 250, 250, 250, 554, 250, 354, 250, 250, 250, 354,
                                 250, 250, 250, 221])
        first, second = queue_id(got[7][1]), queue_id(got[11][1])
        self.assertNotEqual(first, second)
        yield wait_for(lambda: len(site.delivered(BOB)) == 2 and site.delivered(CAROL),
                       "three deliveries")
        stored = sorted(e2e.split_trace(p.read_bytes())[1] for p in site.delivered(BOB))
        self.assertEqual(stored, sorted([body1, body2]))

    @defer.inlineCallbacks
    def test_concurrent_messages_share_one_sync(self):
        """
        Messages whose ends arrive while the others are still being
        received are made durable together: one commit batch for three
        sessions (the batch waits for the messages under way, here for as
        long as it takes), and a lone message is not held by that wait.
        """
        from twisted_mta.spool import store
        self.patch(store, "COMMIT_WAIT", 30.0)  # only the messages under way end the wait
        site = self.site({"smtp": "none"})
        mta = self.start(site)
        sync = mta.spool._sync
        batches = []
        real_run = sync._run
        sync._run = lambda batch: (batches.append(len(batch)), real_run(batch))[1]

        def talk():
            clients = [self.raw(site) for _ in range(3)]
            for n, c in enumerate(clients):
                c.replies(1)
                c.send(b"EHLO client.example.net\r\n")
                c.reply()
                c.send(b"MAIL FROM:<alice@client.example.net>\r\nRCPT TO:<bob@example.test>\r\n"
                       b"DATA\r\n")
                self.assertEqual([code for code, _ in c.replies(3)], [250, 250, 354])
                c.send(e2e.message(f"share{n}@client.example.net"))  # no end yet
            for c in clients:
                c.send(b".\r\n")
            together = [c.replies(1)[0] for c in clients]
            # Alone now: nothing else is being received, so nothing to wait for.
            c = clients[0]
            c.sock.settimeout(10)
            c.send(b"MAIL FROM:<alice@client.example.net>\r\nRCPT TO:<bob@example.test>\r\n"
                   b"DATA\r\n")
            c.replies(3)
            c.send(e2e.message("alone@client.example.net") + b".\r\n")
            return together, c.replies(1)[0]

        together, alone = yield in_thread(talk)
        self.assertEqual([code for code, _ in together], [250, 250, 250])
        self.assertEqual(alone[0], 250)
        self.assertEqual(batches[0], 3)  # (then deliveries' and the lone message's)
        yield wait_for(lambda: len(site.delivered(BOB)) == 4, "four deliveries")

    @defer.inlineCallbacks
    def test_starttls_injection(self):
        """
        CVE-2011-0411: a command sent in the clear in the same packet as
        STARTTLS is discarded, never run inside the TLS session.
        """
        site = self.site({"smtp": "starttls"})
        self.start(site)

        def talk():
            c = self.raw(site)
            c.reply()
            c.send(b"EHLO client.example.net\r\n")
            c.reply()
            c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example.net>\r\n")
            started = c.reply()
            c.starttls(site.client_context(), site.host)
            c.send(b"EHLO client.example.net\r\n")
            ehlo = c.reply()
            c.send(b"RCPT TO:<bob@example.test>\r\n")
            rcpt = c.reply()
            c.send(b"QUIT\r\n")
            return started, ehlo, rcpt, c.reply()

        started, ehlo, rcpt, quit = yield in_thread(talk)
        self.assertEqual(started[0], 220)
        self.assertEqual(ehlo[0], 250)
        self.assertNotIn(b"STARTTLS", ehlo[1])
        # No MAIL was given inside TLS: the injected one did not count.
        self.assertEqual(rcpt[0], 503, rcpt)
        self.assertEqual(quit[0], 221)

    @defer.inlineCallbacks
    def test_bdat(self):
        """
        BDAT chunks (RFC 3030) are stored byte for byte, without
        dot-unstuffing: a CRLF.CRLF inside a chunk is just data.
        """
        site = self.site({"smtp": "none"})
        self.start(site)
        msg = e2e.message("bdat@client.example.net",
                          body=b"line one\r\n.\r\n..not stuffed\r\n\xc3\xa9\r\n")
        cut = len(msg) // 2

        def talk():
            c = self.raw(site)
            c.reply()
            c.send(b"EHLO client.example.net\r\n")
            self.assertIn(b"CHUNKING", c.reply()[1])
            c.send(b"MAIL FROM:<alice@client.example.net> BODY=8BITMIME\r\n"
                   b"RCPT TO:<bob@example.test>\r\n"
                   + b"BDAT %d\r\n" % cut + msg[:cut]
                   + b"BDAT %d LAST\r\n" % (len(msg) - cut) + msg[cut:] + b"QUIT\r\n")
            return c.replies(5)

        replies = yield in_thread(talk)
        self.assertEqual([code for code, _ in replies], [250, 250, 250, 250, 221])
        qid = queue_id(replies[3][1])
        stored = yield self.delivered_one(site, BOB)
        fields, rest = e2e.split_trace(stored)
        self.assertEqual(rest, msg)
        self.assertIn(b" id " + qid.encode(), fields[2])

    @defer.inlineCallbacks
    def test_smuggling_refused(self):
        """
        A bare-LF end of data followed by a smuggled transaction: the
        message ends only at CRLF.CRLF, is refused (550 5.5.2, bare_newline
        = "reject"), and the smuggled commands never run.
        """
        site = self.site({"smtp": "none"}, networks=["127.0.0.0/8"],
                         relay_route=("127.0.0.1", e2e.free_port()))
        self.start(site)

        def talk():
            c = self.raw(site)
            c.reply()
            c.send(b"EHLO client.example.net\r\n")
            c.reply()
            c.send(b"MAIL FROM:<alice@client.example.net>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
            first = c.replies(3)
            c.send(b"Subject: innocent\r\n\r\nhello\n.\n"
                   b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@elsewhere.example.net>\r\n"
                   b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n")
            end = c.reply()
            c.send(b"NOOP\r\nQUIT\r\n")
            return first, end, c.replies(2)

        first, end, after = yield in_thread(talk)
        self.assertEqual([code for code, _ in first], [250, 250, 354])
        self.assertEqual(end[0], 550)
        self.assertTrue(end[1][-1].startswith(b"5.5.2 "), end)
        self.assertEqual([code for code, _ in after], [250, 221])
        self.assertEqual(site.queued_ids(), set())
        self.assertEqual(site.all_delivered(), [])

    @defer.inlineCallbacks
    def test_size_limit(self):
        """
        SIZE from [limits]: advertised, a too big SIZE= is 552 5.3.4 at MAIL,
        a message growing past it is 552 5.3.4 after DATA, and the session
        goes on.
        """
        site = self.site({"smtp": "none"}, limits={"message_size": 2000})
        self.start(site)

        def talk():
            client = smtplib.SMTP(site.host, site.port(), local_hostname="client.example.net",
                                  timeout=60)
            try:
                client.ehlo()
                size = client.esmtp_features["size"]
                at_mail = client.mail(SENDER, ["SIZE=5000"])
                client.rset()
                client.mail(SENDER)
                client.rcpt(BOB)
                too_big = client.data(e2e.message("big@x", body=b"y" * 3000 + b"\r\n"))
                client.mail(SENDER)
                client.rcpt(BOB)
                small = client.data(e2e.message("small@client.example.net"))
                return size, at_mail, too_big, small
            finally:
                client.quit()

        size, at_mail, too_big, small = yield in_thread(talk)
        self.assertEqual(size, "2000")
        self.assertEqual(at_mail[0], 552)
        self.assertTrue(at_mail[1].startswith(b"5.3.4 "), at_mail)
        self.assertEqual(too_big[0], 552)
        self.assertTrue(too_big[1].startswith(b"5.3.4 "), too_big)
        self.assertEqual(small[0], 250)
        stored = yield self.delivered_one(site, BOB)
        self.assertIn(b"<small@client.example.net>", stored)
        self.assertEqual(len(site.delivered(BOB)), 1)
