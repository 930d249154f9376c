"""
End to end, the delivery engine of issue 3 through the whole service:
mail accepted over SMTP leaves by the routes of the configuration, to
peers on loopback (L{tests.smtp_sink} sinks in this process, the
loopback DNS server of L{tests.dns_support}).

  - Crash safety: C{twistd -n mta} in a subprocess is killed with
    SIGKILL while its deliveries wait in the DATA phase, and again after
    the sink took a message but before the server could record it; after
    a restart every message is delivered at least once and the spool
    ends empty.
  - Queue lifetime: a recipient that keeps getting 4xx yields a delay
    notice, then, once the (shortened) lifetime is over, a failure DSN.
  - MX routes with the service's own resolver on C{[delivery]
    nameservers}: the first MX refuses connections, the second takes
    the mail over verified STARTTLS; a null MX bounces.
  - LMTP over a UNIX socket, one reply per recipient.

The waits have generous deadlines only so that a broken server cannot
hang the run; nothing asserts how long anything takes.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import signal
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.dns_support import DNSServer
from tests.e2e_support import Site, in_thread, queue_id, send, wait_for
from tests.smtp_sink import Received, SinkFactory, SinkProtocol, make_pki

ALICE = "alice@example.test"


def short_folder(case: unittest.TestCase, prefix: str) -> Path:
    """A folder with a short path (UNIX socket addresses are short)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    case.addCleanup(shutil.rmtree, folder, True)
    return folder


def message_ids(messages) -> list[str]:
    """The Message-ID of each message a sink took."""
    out = []
    for m in messages:
        parsed = email.message_from_bytes(m.data, policy=email.policy.compat32)
        out.append(parsed["Message-ID"])
    return out


def dsn_parts(path: Path):
    """A DSN file: (the message, its human part's text, its status part's text, unfolded)."""
    dsn = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report", dsn.get_content_type()
    human, status = dsn.get_payload()[:2]
    unfold = lambda text: "\n".join(" ".join(line.split()) for line in
                                    text.replace("\n ", " ").replace("\n\t", " ").split("\n"))
    return dsn, unfold(human.get_content()), unfold(status.as_string())


class HoldingProtocol(SinkProtocol):
    def _end_of_data(self):
        f = self.factory
        if f.on_end_of_data is not None:
            message = Received(self.sender, list(self.recipients),
                               b"".join(x + b"\r\n" for x in self.data), self.params)
            if f.on_end_of_data(self, message):
                self.data = []
                self.reset()
                return
        super()._end_of_data()


class HoldingSink(SinkFactory):
    """
    A sink whose C{on_end_of_data(protocol, message)} is asked first at
    each end of data; when it returns true, the sink neither answers
    nor keeps the message (the hook does what it likes).
    """

    def __post_init__(self):
        super().__post_init__()
        self.on_end_of_data = None

    def buildProtocol(self, addr):
        p = HoldingProtocol()
        p.factory = self
        return p


def listen(case: unittest.TestCase, factory, interface: str = "127.0.0.1") -> int:
    port = reactor.listenTCP(0, factory, interface=interface)
    case.addCleanup(port.stopListening)
    return port.getHost().port


def close_all(factory: SinkFactory) -> defer.Deferred:
    """Drop every connection of a sink; fires once they are gone."""
    for p in factory.protocols:
        if p.transport is not None and p.transport.connected:
            p.transport.abortConnection()
    return factory.all_closed()


class CrashTests(unittest.TestCase):
    """kill -9 of twistd during delivery loses nothing (issue 3, part 8)."""

    def site(self, sink_port: int) -> Site:
        # Every domain but example.test goes to the sink.
        return Site(short_folder(self, "mta-kill-"), {"smtp": "none"}, tls=False,
                    networks=("127.0.0.0/8",), relay_route=("127.0.0.1", sink_port))

    def send_all(self, site: Site, n: int, tag: str) -> defer.Deferred:
        def run():
            ids = {}
            for i in range(n):
                msgid = f"<{tag}{i}@example.test>"
                code, text = send(site.host, site.port(), ALICE, [f"r{i}@remote.test"],
                                  e2e.message(msgid[1:-1], f"{tag} {i}", sender=ALICE,
                                              to=f"r{i}@remote.test"))
                assert code == 250, (code, text)
                ids[queue_id(text)] = msgid
            return ids
        return in_thread(run)

    @defer.inlineCallbacks
    def test_kill_during_data_then_restart(self):
        """
        Five messages wait for the sink's reply to their data when twistd
        is killed: all five stay in the spool; after a restart each
        reaches the sink (the ones cut off count as not delivered), and
        the spool ends empty.
        """
        sink = HoldingSink()
        held: list[Received] = []
        sink.on_end_of_data = lambda proto, message: held.append(message) or True
        site = self.site(listen(self, sink))
        server = e2e.start_process(self, site)
        ids = yield self.send_all(site, 5, "stall")
        yield wait_for(lambda: len(held) == 5, "five deliveries stalled after their data")
        self.assertEqual(sink.messages, [])
        server.kill()
        self.assertEqual(site.queued_ids(), set(ids))
        yield close_all(sink)

        sink.on_end_of_data = None
        server.start()
        yield wait_for(lambda: not site.queued_ids(), "the spool to empty after the restart")
        got = message_ids(sink.messages)
        self.assertEqual(sorted(set(got)), sorted(ids.values()))
        self.assertIn("spool: 5 queued messages recovered", site.log_path.read_text())
        # In a thread: twistd says QUIT to the sink, which answers from this reactor.
        status = yield in_thread(server.stop)
        self.assertEqual(status, 0, server.output())

    @defer.inlineCallbacks
    def test_kill_after_the_peer_took_it(self):
        """
        The sink keeps the message and the server is killed before it can
        read the 250 (stopped, then killed): after a restart the message
        is delivered again, a duplicate rather than a loss, and the spool
        ends empty.
        """
        sink = HoldingSink()
        site = self.site(listen(self, sink))
        server = e2e.start_process(self, site)

        def took_it(proto, message):
            # Freeze the server, answer, then kill it: it never sees the 250.
            os.kill(server.proc.pid, signal.SIGSTOP)
            sink.messages.append(message)
            proto.send("250 2.0.0 Ok: queued as TAKEN")
            reactor.callLater(0.05, server.kill)
            sink.on_end_of_data = None
            return True

        sink.on_end_of_data = took_it
        ids = yield self.send_all(site, 1, "taken")
        yield wait_for(lambda: not server.running, "the server killed by the sink")
        self.assertEqual(site.queued_ids(), set(ids))
        yield close_all(sink)

        server.start()
        yield wait_for(lambda: not site.queued_ids(), "the spool to empty after the restart")
        self.assertEqual(message_ids(sink.messages), ["<taken0@example.test>"] * 2)
        # In a thread: twistd says QUIT to the sink, which answers from this reactor.
        status = yield in_thread(server.stop)
        self.assertEqual(status, 0, server.output())


class InProcessMixin:
    def start(self, site: Site):
        return e2e.start_in_process(self, site)

    def send(self, site: Site, sender: str, recipients, msgid: str, **kw):
        return in_thread(send, site.host, site.port(), sender, recipients,
                         e2e.message(msgid, sender=sender, to=recipients[0]), **kw)

    def mail_for(self, site: Site, address: str, n: int = 1):
        def check():
            files = site.delivered(address)
            return files if len(files) >= n else None
        return wait_for(check, f"{n} message(s) in {address}'s Maildir")


class LifetimeTests(InProcessMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_delay_notice_then_expiry_bounce(self):
        """
        With a short queue lifetime and delay warning, a recipient whose
        server keeps answering 451 gets the sender a delay notice (once),
        then a failure DSN saying the message expired, with the last
        reply; the message leaves the spool.
        """
        sink = SinkFactory(rcpt_replies={"slow@remote.test": "451 4.3.2 come back later"})
        port = listen(self, sink)
        site = Site(self.mktemp(), {"smtp": "none"}, tls=False, networks=("127.0.0.0/8",),
                    relay_route=("127.0.0.1", port), fixed_ports=False,
                    delivery={"min_backoff": 0.3, "max_backoff": 0.3, "delay_warning": 0.5,
                              "queue_lifetime": 2.5})
        self.start(site)
        code, text = yield self.send(site, ALICE, ["slow@remote.test"], "slow@example.test")
        self.assertEqual(code, 250, text)
        qid = queue_id(text)
        files = yield self.mail_for(site, ALICE, 2)
        yield wait_for(lambda: not site.queued_ids(), "the spool to empty")
        self.assertEqual(len(site.delivered(ALICE)), 2)

        notices = [dsn_parts(f) for f in files]
        delayed = [n for n in notices if "Action: delayed" in n[2]]
        failed = [n for n in notices if "Action: failed" in n[2]]
        self.assertEqual((len(delayed), len(failed)), (1, 1), [n[2] for n in notices])
        _, human, status = delayed[0]
        self.assertIn("Final-Recipient: rfc822; slow@remote.test", status)
        self.assertIn("Status: 4.3.2", status)
        self.assertIn("Will-Retry-Until:", status)
        self.assertIn("Diagnostic-Code: smtp; 451 4.3.2 come back later", status)
        _, human, status = failed[0]
        self.assertIn("Final-Recipient: rfc822; slow@remote.test", status)
        self.assertIn("Status: 5.4.7", status)
        self.assertIn("451 4.3.2 come back later", status)
        self.assertIn("expired", human)
        self.assertIn(f"X-Twisted-MTA-Queue-ID: {qid}", status)
        self.assertGreaterEqual(sum(1 for t in sink.transcripts for line in t
                                    if line.upper().startswith(b"RCPT")), 3)


class MXTests(InProcessMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_mx_through_the_service_resolver(self):
        """
        The service asks the DNS server of C{[delivery] nameservers}: the
        first MX (127.0.0.2) refuses the connection, the second
        (127.0.0.1) takes the mail over STARTTLS verified against its MX
        name; a domain with a null MX fails at once with a DSN.
        """
        pki = make_pki(names=("mx2.remote.test",))
        sink = SinkFactory(tls_options=pki.server_options)
        port = listen(self, sink)
        dns_server = DNSServer.started(self, {
            "remote.test": {"MX": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
            "mx1.remote.test": {"A": ["127.0.0.2"]},
            "mx2.remote.test": {"A": ["127.0.0.1"]},
            "null.test": {"MX": [(0, ".")]},
        })
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        (folder / "sink-ca.pem").write_bytes(pki.ca_pem)
        routes = (e2e.toml_table("[[route]]", {"domains": ["example.test"], "via": "maildir",
                                               "path": "mail"})
                  + e2e.toml_table("[[route]]", {"domains": ["*"], "via": "mx", "port": port,
                                                 "tls": "verify"}))
        site = Site(folder, {"smtp": "none"}, tls=False, networks=("127.0.0.0/8",),
                    fixed_ports=False, extra=routes,
                    delivery={"nameservers": [dns_server.address], "ca_file": "sink-ca.pem",
                              "connect_timeout": 5.0})
        self.start(site)
        code, text = yield self.send(site, ALICE, ["dave@remote.test", "erin@null.test"],
                                     "mx@example.test")
        self.assertEqual(code, 250, text)
        yield wait_for(lambda: sink.messages, "the message at the second MX")
        [got] = sink.messages
        self.assertEqual(got.recipients, ["dave@remote.test"])
        self.assertTrue(got.tls)
        self.assertIn(b"Message-ID: <mx@example.test>", got.data)
        [dsn_file] = yield self.mail_for(site, ALICE)
        _, human, status = dsn_parts(dsn_file)
        self.assertIn("Final-Recipient: rfc822; erin@null.test", status)
        self.assertIn("Action: failed", status)
        self.assertNotIn("dave@remote.test", status)
        yield wait_for(lambda: not site.queued_ids(), "the spool to empty")
        asked = {(name, kind) for name, kind, _ in dns_server.queries}
        self.assertIn(("remote.test", "MX"), asked)
        self.assertIn(("mx1.remote.test", "A"), asked)
        self.assertIn(("mx2.remote.test", "A"), asked)


class LMTPTests(InProcessMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_lmtp_over_a_unix_socket(self):
        """
        A route to an LMTP server on a UNIX socket: after the data, one
        reply per recipient decides each: 250 delivered, 550 bounced (a
        DSN to the sender quoting it), 452 deferred (its reply kept).
        """
        folder = short_folder(self, "mta-lmtp-")
        sink = SinkFactory(lmtp=True, lmtp_replies={
            "b@lmtp.test": "550 5.1.1 <b@lmtp.test>: no such mailbox",
            "c@lmtp.test": "452 4.2.2 <c@lmtp.test>: mailbox full"})
        socket_path = folder / "lmtp.sock"
        listening = reactor.listenUNIX(str(socket_path), sink)
        self.addCleanup(listening.stopListening)
        routes = (e2e.toml_table("[[route]]", {"domains": ["example.test"], "via": "maildir",
                                               "path": "mail"})
                  + e2e.toml_table("[[route]]", {"domains": ["lmtp.test"], "via": "lmtp",
                                                 "endpoint": f"unix:{socket_path}"}))
        site = Site(folder / "site", {"smtp": "none"}, tls=False, networks=("127.0.0.0/8",),
                    fixed_ports=False, extra=routes)
        mta = self.start(site)
        rcpts = ["a@lmtp.test", "b@lmtp.test", "c@lmtp.test"]
        code, text = yield self.send(site, ALICE, rcpts, "lmtp@example.test")
        self.assertEqual(code, 250, text)
        qid = queue_id(text)
        [dsn_file] = yield self.mail_for(site, ALICE)
        [got] = sink.messages
        self.assertEqual(got.recipients, ["a@lmtp.test"])
        self.assertIn(b"Message-ID: <lmtp@example.test>", got.data)
        self.assertIn(b"LHLO mx.example.test", sink.transcripts[0])
        _, human, status = dsn_parts(dsn_file)
        self.assertIn("Final-Recipient: rfc822; b@lmtp.test", status)
        self.assertIn("Diagnostic-Code: smtp; 550 5.1.1 <b@lmtp.test>: no such mailbox", status)
        self.assertNotIn("c@lmtp.test", status)

        def recorded():
            states = {r.address: r for r in mta.spool.load(qid).recipients}
            return states if states["c@lmtp.test"].attempts else None
        states = yield wait_for(recorded, "the deferral recorded in the spool")
        self.assertEqual(states["a@lmtp.test"].state, "delivered")
        self.assertEqual(states["b@lmtp.test"].state, "failed")
        self.assertEqual(states["c@lmtp.test"].state, "deferred")
        self.assertEqual(states["c@lmtp.test"].last_reply, "452 4.2.2 <c@lmtp.test>: mailbox full")
