"""
C{receivers = N}: receiving processes on the main process's sockets.
The end-to-end tests start a real L{MTAService} in this process, which
starts real receiver processes; clients are smtplib over loopback, with
STARTTLS.
"""

from __future__ import annotations

import os
import signal
import smtplib
import time
from pathlib import Path
from types import SimpleNamespace

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.e2e_support import LOCAL_DOMAIN, Site, in_thread, start_in_process, wait_for
from tests.processes import alive
from twisted_mta import config as configmod
from twisted_mta.receiver import LogForwarder, state_folder
from twisted_mta.receivers import ReceiverPool, ReceiverProcess
from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.spool.store import Spool

RCPT = f"joe@{LOCAL_DOMAIN}"

REFUSER = '''
from zope.interface import implementer
from twisted_mta.interfaces import IMailFilter
from twisted_mta.values import Verdict

@implementer(IMailFilter)
class Refuser:
    def mail(self, session, envelope):
        if envelope.sender.local == "bad":
            return Verdict.reject("5.7.1", "not you")
        return Verdict.continue_()
'''


class ConfigTests(unittest.TestCase):
    def parse(self, text: str):
        import tomllib
        return configmod.parse(tomllib.loads(text), "mta.toml", Path("/tmp"))

    def test_default_is_none(self):
        self.assertEqual(self.parse('[[listen]]\nendpoint = "tcp:2525"').receivers, 0)

    def test_value(self):
        self.assertEqual(self.parse('receivers = 3\n[[listen]]\nendpoint = "tcp:2525"').receivers,
                         3)

    def test_bad_values(self):
        for value in ("-1", "65", '"two"', "1.5", "true"):
            with self.assertRaises(configmod.ConfigError) as e:
                self.parse(f'receivers = {value}\n[[listen]]\nendpoint = "tcp:2525"')
            self.assertIn("mta.toml: receivers: expected an integer from 0 to 64",
                          str(e.exception))

    def test_unix_listener_refused(self):
        with self.assertRaises(configmod.ConfigError) as e:
            self.parse('receivers = 2\n[[listen]]\nendpoint = "tcp:2525"\n'
                       '[[listen]]\nendpoint = "unix:/tmp/x.sock"')
        self.assertIn("listen[2].endpoint: receivers = 2 takes tcp: or tcp6: listeners only",
                      str(e.exception))

    def test_at_most_64_listeners(self):
        tables = "".join(f'[[listen]]\nendpoint = "tcp:{2000 + i}"\n' for i in range(65))
        with self.assertRaises(configmod.ConfigError) as e:
            self.parse("receivers = 2\n" + tables)
        self.assertIn("listen: receivers = 2 takes at most 64 listeners, got 65",
                      str(e.exception))
        self.assertEqual(len(self.parse("receivers = 2\n" + tables[:tables.rindex("[[")])
                             .listen), 64)

    def test_reload_says_receivers_and_spool_sync_wait_for_a_restart(self):
        from twisted_mta.receiving import ReceivingService
        old = self.parse('[[listen]]\nendpoint = "tcp:2525"')
        new = self.parse('receivers = 2\nspool_sync = "filesystem"\n[[listen]]\nendpoint = "tcp:2525"')
        self.assertEqual(ReceivingService._unapplied(old, new), [
            "spool_sync changed; it changes only on restart",
            "receivers changed; the number of receivers changes only on restart"])

    def test_state_folders(self):
        self.assertIsNone(state_folder(Path("/s"), 1))
        self.assertEqual(state_folder(Path("/s"), 2), Path("/s/state/receiver-2"))


class _Channel:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)


class MainChannelTests(unittest.TestCase):
    """Lines to the main process go together, in order, within REPORT_DELAY."""

    def channel(self):
        from twisted.internet.testing import StringTransport
        from twisted_mta.receiver import MainChannel
        clock = Clock()
        channel = MainChannel(clock)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport, clock

    def test_lines_wait_and_go_together(self):
        from twisted_mta.receiver import REPORT_DELAY
        channel, transport, clock = self.channel()
        writes = []
        transport.write = writes.append
        channel.send(b"queued {}")
        LogForwarder(channel)({"log_format": "{id}: ok", "id": "x"})
        channel.send(b"closed 192.0.2.1")
        self.assertEqual(writes, [])
        clock.advance(REPORT_DELAY)
        self.assertEqual(writes, [b"queued {}\nlog info x: ok\nclosed 192.0.2.1\n"])
        channel.send(b"queued {}")
        self.assertEqual(len(writes), 1)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [2 * REPORT_DELAY])

    def test_at_stop_what_is_held_goes_and_the_rest_at_once(self):
        channel, transport, clock = self.channel()
        channel.send(b"queued {}")
        channel.stop_holding()
        self.assertEqual(transport.value(), b"queued {}\n")
        channel.send(b"closed 192.0.2.1")
        self.assertEqual(transport.value(), b"queued {}\nclosed 192.0.2.1\n")
        self.assertEqual(clock.getDelayedCalls(), [])


class LogForwarderTests(unittest.TestCase):
    def forward(self, **event):
        channel = _Channel()
        LogForwarder(channel)(event)
        return b"".join(channel.written)

    def test_plain_format(self):
        from twisted.logger import LogLevel
        self.assertEqual(self.forward(log_format="from [{ip}] n={n!r}", ip="192.0.2.1", n="x",
                                      log_level=LogLevel.warn),
                         b"log warn from [192.0.2.1] n='x'\n")

    def test_each_line_a_record(self):
        from twisted.logger import LogLevel
        from twisted.python.failure import Failure
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        out = self.forward(log_format="it broke", log_failure=failure, log_level=LogLevel.critical)
        lines = out.split(b"\n")
        self.assertEqual(lines[0], b"log critical it broke")
        self.assertTrue(all(line.startswith(b"log critical ") for line in lines[:-1]))
        self.assertIn(b"ZeroDivisionError", out)

    def test_format_it_cannot_do(self):
        # Twisted's formatter calls "{f()}"; str.format cannot: the fallback does.
        self.assertEqual(self.forward(log_format="{f()}", f=lambda: "called"),
                         b"log info called\n")


class _MTA:
    def __init__(self, spool):
        self.spool = spool
        self.got = []

    def received(self, entry):
        self.got.append(entry.id)


class RecoveryTests(unittest.TestCase):
    """A receiver that dies mid-commit: what reached the spool is delivered."""

    def test_committed_ids_recovered(self):
        spool = Spool(self.mktemp(), inline=True)
        spool.prepare()
        self.addCleanup(spool.stop)
        incoming = spool.new_message()
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        entry = QueueEntry(incoming.id, "a@example.org", [RecipientState("b@example.org")], 0.0)
        spool.commit(incoming, entry)
        mta = _MTA(spool)
        proc = ReceiverProcess(ReceiverPool(mta, 1, Clock()), 1)
        proc.committing = {incoming.id, "dZzzzzzzzzzzzz"}  # the second never reached the spool
        proc.pool._recover(proc)
        self.assertEqual(mta.got, [incoming.id])
        self.assertEqual(proc.committing, set())

    @defer.inlineCallbacks
    def test_sweep_finds_what_a_dead_receiver_never_reported(self):
        """Committed, old enough, known to nobody: delivered; the rest left alone."""
        spool = Spool(self.mktemp())
        spool.prepare()
        self.addCleanup(spool.stop)
        ids = []
        for n in range(4):
            incoming = spool.new_message()
            incoming.write(b"Subject: %d\r\n\r\nbody\r\n" % n)
            entry = QueueEntry(incoming.id, "a@example.org", [RecipientState("b@example.org")],
                               0.0)
            yield spool.commit(incoming, entry)
            ids.append(incoming.id)
        unknown, delivering, committing, fresh = ids
        old = time.time() - 60
        for queue_id in (unknown, delivering, committing):
            os.utime(spool.queue / queue_id, (old, old))
        uncommitted = spool.new_message()  # in incoming/: not looked at
        uncommitted.write(b"x")
        uncommitted.flush()
        self.addCleanup(uncommitted.abort)
        mta = _MTA(spool)
        mta.delivery = SimpleNamespace(entries={delivering: None})
        pool = ReceiverPool(mta, 1, Clock())
        live = ReceiverProcess(pool, 1)
        live.committing = {committing}
        pool.processes[1] = live
        yield pool.sweep()
        self.assertEqual(mta.got, [unknown])

    def test_a_receivers_death_schedules_a_sweep(self):
        from twisted_mta.receivers import SWEEP_AFTER
        clock = Clock()
        pool = ReceiverPool(_MTA(None), 1, clock)
        proc = ReceiverProcess(pool, 1)
        pool.processes[1] = proc
        pool.ended(proc, SimpleNamespace(value="killed by signal 9"))
        self.assertIn((SWEEP_AFTER, pool.sweep),
                      [(c.getTime(), c.func) for c in clock.getDelayedCalls()])

    def test_queued_record_ends_committing(self):
        mta = _MTA(None)
        proc = ReceiverProcess(ReceiverPool(mta, 1, Clock()), 1)
        entry = QueueEntry("dZaaaaaaaaaaaa", "a@example.org", [RecipientState("b@example.org")],
                           0.0)
        proc.childDataReceived(1, b"committing dZaaaaaaaaaaaa\nqueu")
        self.assertEqual(proc.committing, {"dZaaaaaaaaaaaa"})
        proc.childDataReceived(1, b"ed " + entry.to_json() + b"\ncommitting dZbbbbbbbbbbbb\n")
        proc.childDataReceived(1, b"aborted dZbbbbbbbbbbbb\n")
        self.assertEqual(mta.got, ["dZaaaaaaaaaaaa"])
        self.assertEqual(proc.committing, set())


def _send(port: int, ctx, count: int, sender: str = "alice@example.org") -> list[str]:
    """C{count} messages in one STARTTLS session; returns the replies' queue ids."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=ctx)
        client.ehlo()
        for i in range(count):
            code, text = client.mail(sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, text, sender)
            client.rcpt(RCPT)
            code, text = client.data(b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))
            assert code == 250, (code, text)
            ids.append(text.decode().rsplit(" ", 1)[-1])
    return ids


class ReceiversEndToEndTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.site = Site(self.mktemp())
        # Top-level keys go before the first table.
        self.site.config_path.write_text('receivers = 2\nplugin_paths = ["plugins"]\n'
                                         + self.site.config_path.read_text())
        self.lines: list[str] = []

        def observe(event):
            if str(event.get("log_system", "")).startswith("receiver-"):
                self.lines.append(f"[{event['log_system']}] " + formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.mta = start_in_process(self, self.site)
        yield self.mta.receivers.whenReady()
        self.ctx = self.site.client_context()

    def logged(self) -> str:
        return "\n".join(self.lines)

    def pids(self) -> set[int]:
        return {p.pid for p in self.mta.receivers.processes.values()}

    @defer.inlineCallbacks
    def test_mail_flows_through_receivers(self):
        """Sessions are served by the receivers; the main process delivers each once."""
        self.assertEqual(len(self.pids()), 2)
        self.assertNotIn(os.getpid(), self.pids())
        results = yield defer.gatherResults(
            [in_thread(_send, self.site.port(), self.ctx, 5) for _ in range(4)])
        ids = {i for batch in results for i in batch}
        self.assertEqual(len(ids), 20)
        yield wait_for(lambda: len(self.site.delivered(RCPT)) == 20, "20 deliveries")
        yield wait_for(lambda: not self.site.queued_ids(), "an empty queue")
        bodies = sorted(p.read_bytes() for p in self.site.delivered(RCPT))
        self.assertEqual(len(set(bodies)), 20)
        self.assertTrue(all(b"Received: from " in b and b"TLS" in b for b in bodies))
        # The main process never accepted a session itself.
        self.assertEqual(self.mta.counter.total, 0)
        # The receivers' session ids name them: unique across processes.
        yield wait_for(lambda: "disconnect from" in self.logged(), "the receivers' log lines")
        self.assertRegex(self.logged(), r"\[receiver-[12]\] connect from \[127\.0\.0\.1\]:\d+ "
                                        r"session=[12]\.[0-9a-f]+")

    @defer.inlineCallbacks
    def test_sessions_spread_evenly(self):
        """Ten sessions opened at once: five on each receiver, whichever ran first."""
        def open_sessions():
            clients = []
            for _ in range(10):
                client = smtplib.SMTP("127.0.0.1", self.site.port(), timeout=30)
                client.ehlo()
                clients.append(client)
            return clients

        clients = yield in_thread(open_sessions)
        try:
            procs = list(self.mta.receivers.processes.values())
            self.assertEqual(sorted(p.sessions for p in procs), [5, 5])
            yield wait_for(lambda: self.logged().count("connect from [127.0.0.1]") == 10,
                           "ten connect lines")
            for index in (1, 2):
                self.assertEqual(self.logged().count(f"[receiver-{index}] connect from"), 5)
        finally:
            yield in_thread(lambda: [c.quit() for c in clients])
        # Each receiver says when a session ends: the counts go back to 0.
        yield wait_for(lambda: all(p.sessions == 0
                                   for p in self.mta.receivers.processes.values()),
                       "no sessions left")

    @defer.inlineCallbacks
    def test_reload_reaches_receivers(self):
        plugins = self.site.folder / "plugins"
        plugins.mkdir()
        (plugins / "refuser.py").write_text(REFUSER)
        with open(self.site.config_path, "a") as f:
            f.write('\n[[filter]]\nuse = "refuser:Refuser"\n')
        generation = yield self.mta.reload()
        self.assertEqual(generation, 2)
        yield wait_for(lambda: all(p.generation == 2
                                   for p in self.mta.receivers.processes.values()),
                       "both receivers at generation 2")
        for _ in range(4):  # whichever receiver takes the session
            with self.assertRaises(smtplib.SMTPSenderRefused) as e:
                yield in_thread(_send, self.site.port(), self.ctx, 1, "bad@example.org")
            self.assertEqual(e.exception.smtp_code, 550)
        yield in_thread(_send, self.site.port(), self.ctx, 1)

    @defer.inlineCallbacks
    def test_dead_receiver_restarted(self):
        victim = self.mta.receivers.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        yield victim.ended
        yield wait_for(lambda: 1 in self.mta.receivers.processes, "a new receiver-1")
        yield self.mta.receivers.whenReady()
        self.assertNotEqual(self.mta.receivers.processes[1].pid, victim.pid)
        results = yield defer.gatherResults(
            [in_thread(_send, self.site.port(), self.ctx, 2) for _ in range(4)])
        self.assertEqual(len({i for batch in results for i in batch}), 8)
        yield wait_for(lambda: len(self.site.delivered(RCPT)) == 8, "8 deliveries")

    @defer.inlineCallbacks
    def test_stop_ends_receivers(self):
        pids = self.pids()
        yield self.mta.stopService()
        self.assertEqual(self.mta.receivers.processes, {})
        self.assertFalse(any(alive(pid) for pid in pids))


class LimitsAcrossReceiversTests(unittest.TestCase):
    """[limits] count the sessions of all receivers (the main process counts)."""

    timeout = 120

    @defer.inlineCallbacks
    def test_per_client_limit_counts_every_receiver(self):
        site = Site(self.mktemp(), limits={"connections_per_client": 3})
        site.config_path.write_text("receivers = 2\n" + site.config_path.read_text())
        mta = start_in_process(self, site)
        yield mta.receivers.whenReady()

        def fourth_session_refused():
            clients = []
            try:
                for _ in range(3):  # two on one receiver, one on the other
                    clients.append(smtplib.SMTP("127.0.0.1", site.port(), timeout=30))
                with self.assertRaises(smtplib.SMTPConnectError) as e:
                    smtplib.SMTP("127.0.0.1", site.port(), timeout=30)
                return e.exception.smtp_code, e.exception.smtp_error
            finally:
                for client in clients:
                    client.quit()

        code, text = yield in_thread(fourth_session_refused)
        self.assertEqual(code, 421)
        self.assertIn(b"too many connections from 127.0.0.1", text)
        # The receivers report the sessions' ends: the places are free again.
        yield wait_for(lambda: mta.receivers.counter.total == 0, "every session counted out")
        yield in_thread(lambda: smtplib.SMTP("127.0.0.1", site.port(), timeout=30).quit())


class GeneratedCertificateTests(unittest.TestCase):
    """Without [tls], every receiver presents the main process's generated certificate."""

    timeout = 120

    @defer.inlineCallbacks
    def test_one_certificate(self):
        import ssl
        site = Site(self.mktemp(), tls=False)
        site.config_path.write_text("receivers = 2\n" + site.config_path.read_text())
        mta = start_in_process(self, site)
        yield mta.receivers.whenReady()

        def peer_certificate() -> bytes:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with smtplib.SMTP("127.0.0.1", site.port(), timeout=30) as client:
                client.starttls(context=ctx)
                return client.sock.getpeercert(binary_form=True)

        seen = set()
        for _ in range(8):  # the kernel spreads them over both receivers
            seen.add((yield in_thread(peer_certificate)))
        self.assertEqual(len(seen), 1)
        self.assertEqual(seen.pop(), mta.generated[2][0].public_bytes(Encoding.DER))


class ImplicitTLSTests(unittest.TestCase):
    """A receiver serves an implicit-TLS listener (port 465 style) too."""

    timeout = 120

    @defer.inlineCallbacks
    def test_implicit_tls_through_a_receiver(self):
        site = Site(self.mktemp(), {"smtp": "starttls", "smtps": "implicit"})
        site.config_path.write_text("receivers = 1\n" + site.config_path.read_text())
        mta = start_in_process(self, site)
        yield mta.receivers.whenReady()

        def send():
            with smtplib.SMTP_SSL("127.0.0.1", site.port("smtps"), timeout=30,
                                  context=site.client_context()) as client:
                client.sendmail("alice@example.org", [RCPT], b"Subject: 465\r\n\r\nover TLS\r\n")
                return client.sock.version()

        version = yield in_thread(send)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        [stored] = yield wait_for(lambda: site.delivered(RCPT), "the delivery")
        self.assertIn(b"(twisted-mta) with ESMTPS id", stored.read_bytes())
        self.assertEqual(mta.counter.total, 0)  # the receiver had the session
