"""
The SMTP delivery agent (twisted_mta.delivery.smtp) end to end over real
loopback sockets, against the test sink (tests/smtp_sink.py): smart host
with AUTH over verified STARTTLS, MX hops in order, IPv4 and IPv6, reply
classes, retry after a 4xx, connection reuse, TLS policies.

DNS is a fake resolver with the API of L{twisted_mta.delivery.mx.MXResolver}.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.smtp_sink import SinkFactory, make_pki, listen_sink
from tests.support import make_config
from twisted_mta.delivery.agent import DEFERRED, DELIVERED, FAILED
from twisted_mta.delivery.smtp import SMTPAgent, SpoolSource
from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.spool.store import Spool
from twisted_mta.values import Route


@dataclass(frozen=True)
class Hop:
    name: str
    address: str
    port: int
    preference: int = 0


class DNSError(Exception):
    def __init__(self, reply: str, permanent: bool):
        super().__init__(reply)
        self.reply, self.permanent = reply, permanent


class FakeResolver:
    """C{hops} and C{host} answer from dicts: name -> list of Hop (or a DNSError to raise)."""

    def __init__(self, mx=None, hosts=None):
        self.mx = mx or {}
        self.hosts = hosts or {}
        self.asked = []

    def _answer(self, table, name, port):
        self.asked.append((name, port))
        value = table.get(name)
        if isinstance(value, Exception):
            return defer.fail(value)
        return defer.succeed([Hop(h.name, h.address, port if h.port is None else h.port, h.preference)
                              for h in value or []])

    def hops(self, domain, port=25):
        return self._answer(self.mx, domain, port)

    def host(self, name, port):
        return self._answer(self.hosts, name, port)


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


MESSAGE = (b"From: s@example.test\r\nTo: a@remote.test\r\nSubject: hello\r\n\r\n"
           b"Hello.\r\n.a line with a dot\r\n..two dots\r\n.\r\nend\r\n")


class AgentTestCase(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.pki = make_pki(("localhost", "mx1.remote.test", "mx2.remote.test"))
        (self.folder / "ca.pem").write_bytes(self.pki.ca_pem)
        (self.folder / "secret").write_text("s3cret pass\nignored\n")
        self.config = make_config(self.folder, delivery={
            "ca_file": "ca.pem", "connect_timeout": 5, "greeting_timeout": 10,
            "command_timeout": 10, "data_timeout": 10, "max_per_destination": 3})
        self.spool = Spool(self.folder / "spool", reactor)
        self.spool.prepare()
        self.addCleanup(self.spool.stop)
        self.resolver = FakeResolver()
        self.agent = self.make_agent()

    def make_agent(self):
        agent = SMTPAgent(self.spool, self.resolver, lambda: self.config, reactor)
        self.addCleanup(agent.stop)
        self.addCleanup(lambda: self.assertEqual(agent.busy, 0, "a session was not given back"))
        return agent

    def sink(self, interface="127.0.0.1", **kw) -> tuple[SinkFactory, int]:
        return listen_sink(self, interface, **kw)

    async def queue(self, *recipients, sender="s@example.test", message=MESSAGE, **kw) -> QueueEntry:
        incoming = self.spool.new_message()
        incoming.write(message)
        entry = QueueEntry(id=incoming.id, sender=sender,
                           recipients=[RecipientState(r) for r in recipients],
                           arrival=reactor.seconds(), size=incoming.size, **kw)
        await self.spool.commit(incoming, entry)
        return entry

    async def deliver(self, entry, route, agent=None):
        outcomes = await (agent or self.agent).deliver(entry, route, entry.recipients)
        self.assertEqual([o.recipient for o in outcomes], [r.address for r in entry.recipients])
        return outcomes

    def smarthost(self, port, **kw) -> Route:
        self.resolver.hosts.setdefault("localhost", [Hop("localhost", "127.0.0.1", None)])
        return Route(via="smtp", host=kw.pop("host", "localhost"), port=port, **kw)


class SmartHostTests(AgentTestCase):
    async def test_auth_over_verified_starttls(self):
        sink, port = self.sink(tls_options=self.pki.server_options, users={"relay": "s3cret pass"},
                               require_auth=True)
        route = self.smarthost(port, tls="verify", username="relay",
                               password_file=str(self.folder / "secret"))
        entry = await self.queue("a@remote.test", "b@other.test")
        outcomes = await self.deliver(entry, route)
        self.assertEqual([o.status for o in outcomes], [DELIVERED, DELIVERED], outcomes)
        self.assertEqual(outcomes[0].remote, f"localhost[127.0.0.1]:{port}")
        self.assertTrue(outcomes[0].reply.startswith("250 2.0.0 Ok: queued as SINK1"))
        [m] = sink.messages
        self.assertTrue(m.tls)
        self.assertEqual(m.user, "relay")
        self.assertEqual(m.sender, "s@example.test")
        self.assertEqual(m.recipients, ["a@remote.test", "b@other.test"])
        self.assertEqual(m.data, MESSAGE)
        self.assertIn(f"SIZE={len(MESSAGE)}", m.params)
        self.assertEqual(self.resolver.asked, [("localhost", port)])

    async def test_auth_login(self):
        sink, port = self.sink(tls_options=self.pki.server_options, users={"relay": "s3cret pass"})
        sink.extension_lines = lambda tls: ["sink", "STARTTLS"] if not tls else ["sink", "AUTH LOGIN"]
        route = self.smarthost(port, tls="verify", username="relay",
                               password_file=str(self.folder / "secret"))
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(sink.messages[0].user, "relay")
        self.assertIn(b"AUTH LOGIN", sink.transcripts[0])

    async def test_auth_failure_defers(self):
        sink, port = self.sink(tls_options=self.pki.server_options, users={"relay": "other"})
        route = self.smarthost(port, tls="require", username="relay",
                               password_file=str(self.folder / "secret"))
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("SASL authentication failed", o.reply)
        self.assertIn("535 5.7.8", o.reply)
        self.assertEqual(sink.messages, [])

    async def test_verify_refuses_wrong_name(self):
        sink, port = self.sink(tls_options=self.pki.server_options)
        self.resolver.hosts["wrong.example.test"] = [Hop("wrong.example.test", "127.0.0.1", None)]
        route = self.smarthost(port, host="wrong.example.test", tls="verify")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DEFERRED)
        self.assertEqual(o.reply, "451 4.7.5 Server certificate not verified: host "
                                  "wrong.example.test[127.0.0.1]: certificate name does not match "
                                  "wrong.example.test")
        self.assertEqual(sink.messages, [])
        self.assertEqual(sink.connections, 1)  # no plaintext fallback under verify

    async def test_verify_refuses_unknown_ca(self):
        sink, port = self.sink(tls_options=make_pki(("localhost",)).server_options)
        route = self.smarthost(port, tls="verify")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("Server certificate not verified", o.reply)
        self.assertIn("certificate verify failed", o.reply)

    async def test_require_does_not_verify(self):
        sink, port = self.sink(tls_options=make_pki(("elsewhere.test",)).server_options)
        route = self.smarthost(port, tls="require")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertTrue(sink.messages[0].tls)

    async def test_require_without_starttls_defers(self):
        sink, port = self.sink()
        route = self.smarthost(port, tls="require")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DEFERRED)
        self.assertEqual(o.reply, "451 4.7.4 TLS is required, but was not offered by host "
                                  "localhost[127.0.0.1]")

    async def test_opportunistic_falls_back_to_plaintext(self):
        sink, port = self.sink(tls_options=self.pki.server_options, starttls_broken=True)
        route = self.smarthost(port, tls="opportunistic")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(sink.connections, 2)
        self.assertFalse(sink.messages[0].tls)
        self.assertNotIn(b"STARTTLS", sink.transcripts[1])

    async def test_opportunistic_uses_tls(self):
        sink, port = self.sink(tls_options=make_pki(("elsewhere.test",)).server_options)
        route = self.smarthost(port, tls="opportunistic")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertTrue(sink.messages[0].tls)

    async def test_4xx_then_retry(self):
        sink, port = self.sink(final_reply="451 4.3.0 Error: queue file write error")
        route = self.smarthost(port, tls="none")
        entry = await self.queue("a@remote.test", "b@remote.test")
        outcomes = await self.deliver(entry, route)
        self.assertEqual([(o.status, o.reply) for o in outcomes],
                         [(DEFERRED, "451 4.3.0 Error: queue file write error")] * 2)
        sink.final_reply = None
        outcomes = await self.deliver(entry, route)
        self.assertEqual([o.status for o in outcomes], [DELIVERED, DELIVERED])
        self.assertEqual(len(sink.messages), 1)

    async def test_5xx(self):
        sink, port = self.sink(rcpt_replies={"bad@remote.test": "550 5.1.1 <bad@remote.test>: "
                                                                 "Recipient address rejected"})
        route = self.smarthost(port, tls="none")
        entry = await self.queue("bad@remote.test", "good@remote.test")
        bad, good = await self.deliver(entry, route)
        self.assertEqual((bad.status, bad.reply),
                         (FAILED, "550 5.1.1 <bad@remote.test>: Recipient address rejected"))
        self.assertEqual(good.status, DELIVERED)
        self.assertEqual(sink.messages[0].recipients, ["good@remote.test"])

    async def test_connection_refused_defers(self):
        self.resolver.hosts["localhost"] = [Hop("localhost", "127.0.0.1", None)]
        route = Route(via="smtp", host="localhost", port=closed_port(), tls="none")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("Connection refused", o.reply)
        self.assertTrue(o.reply.startswith("451 4.4.1 connect to localhost[127.0.0.1]:"), o.reply)

    async def test_smart_host_dns_failure_defers(self):
        self.resolver.hosts["gone.test"] = DNSError("550 5.1.2 Host or domain name not found", True)
        route = Route(via="smtp", host="gone.test", port=25, tls="none")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual((o.status, o.reply), (DEFERRED, "550 5.1.2 Host or domain name not found"))

    async def test_large_message_streams_intact(self):
        sink, port = self.sink(tls_options=self.pki.server_options)
        line = b"." + b"x" * 75 + b"\r\n"
        body = line * (3 * 1024 * 1024 // len(line))
        message = b"Subject: big\r\n\r\n" + body
        self.patch(SpoolSource, "batch", 100_000)  # many batches, boundaries anywhere
        route = self.smarthost(port, tls="require")
        entry = await self.queue("a@remote.test", message=message)
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(sink.messages[0].data, message)

    async def test_added_and_removed_headers(self):
        sink, port = self.sink()
        route = self.smarthost(port, tls="none")
        entry = await self.queue("a@remote.test", add_headers=[["X-Added", "yes"]],
                                 remove_headers=["To"])
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        data = sink.messages[0].data
        self.assertTrue(data.startswith(b"X-Added: yes\r\nFrom: s@example.test\r\nSubject"), data)

    async def test_8bitmime_and_smtputf8(self):
        sink, port = self.sink()
        route = self.smarthost(port, tls="none")
        entry = await self.queue("\u00fc@remote.test", body="8BITMIME", smtputf8=True)
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertIn("BODY=8BITMIME", sink.messages[0].params)
        self.assertIn("SMTPUTF8", sink.messages[0].params)

    async def test_smtputf8_refused(self):
        sink, port = self.sink(smtputf8=False)
        route = self.smarthost(port, tls="none")
        entry = await self.queue("\u00fc@remote.test", "a@remote.test")
        u, a = await self.deliver(entry, route)
        self.assertEqual(u.status, FAILED)
        self.assertIn("550 5.6.7", u.reply)
        self.assertIn("does not support SMTPUTF8", u.reply)
        self.assertEqual(a.status, DELIVERED)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReuseTests(AgentTestCase):
    async def test_sequential_messages_share_one_connection(self):
        sink, port = self.sink(tls_options=self.pki.server_options)
        route = self.smarthost(port, tls="verify")
        for i in range(5):
            entry = await self.queue(f"r{i}@remote.test")
            [o] = await self.deliver(entry, route)
            self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(len(sink.messages), 5)
        self.assertEqual(sink.connections, 1)
        self.assertEqual(self.agent.connections_made, 1)
        self.assertEqual(self.agent.idle_count(), 1)
        await self.agent.stop()
        await sink.all_closed()
        # Each later transaction starts with an RSET ending the one before
        # it (pipelined with its MAIL); QUIT needs none.
        lines = sink.transcripts[0]
        self.assertEqual(lines.count(b"RSET"), 4)
        self.assertTrue(all(lines[i + 1].startswith(b"MAIL FROM:")
                            for i, line in enumerate(lines) if line == b"RSET"))
        self.assertEqual(lines[-1], b"QUIT")

    async def test_concurrent_messages_over_fewer_connections(self):
        sink, port = self.sink()
        route = self.smarthost(port, tls="none")
        entries = [await self.queue(f"r{i}@remote.test") for i in range(12)]
        # Three at a time (the manager's cap per next hop), as the manager would.
        for k in range(0, 12, 3):
            outcomes = await defer.gatherResults(
                [defer.ensureDeferred(self.deliver(e, route)) for e in entries[k:k + 3]])
            self.assertEqual([o.status for os_ in outcomes for o in os_], [DELIVERED] * 3)
        self.assertEqual(len(sink.messages), 12)
        self.assertLessEqual(sink.connections, 3)
        self.assertLessEqual(sink.max_active, 3)
        self.assertLessEqual(self.agent.idle_count(), 3)

    async def test_idle_connection_closed_after_a_while(self):
        sink, port = self.sink()
        self.patch(SMTPAgent, "idle_timeout", 0.2)
        route = self.smarthost(port, tls="none")
        entry = await self.queue("a@remote.test")
        await self.deliver(entry, route)
        self.assertEqual(self.agent.idle_count(), 1)
        await sink.all_closed()
        self.assertEqual(self.agent.idle_count(), 0)
        self.assertEqual(sink.transcripts[0][-1], b"QUIT")

    async def test_stale_idle_connection_is_replaced(self):
        sink, port = self.sink()
        route = self.smarthost(port, tls="none")
        entry = await self.queue("a@remote.test")
        await self.deliver(entry, route)
        # The server drops the idle connection; the agent may not have noticed yet.
        for p in sink.protocols:
            p.transport.loseConnection()
        entry = await self.queue("b@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(sink.connections, 2)

    async def test_different_next_hops_do_not_share(self):
        sink, port = self.sink()
        self.resolver.mx["one.test"] = [Hop("mx.one.test", "127.0.0.1", port)]
        self.resolver.mx["two.test"] = [Hop("mx.two.test", "127.0.0.1", port)]
        route = Route(via="mx", port=port, tls="none")
        for domain in ("one.test", "two.test", "one.test"):
            entry = await self.queue(f"a@{domain}")
            [o] = await self.deliver(entry, route)
            self.assertEqual(o.status, DELIVERED)
        self.assertEqual(sink.connections, 2)

    async def test_no_reuse_after_stop(self):
        sink, port = self.sink()
        route = self.smarthost(port, tls="none")
        entry = await self.queue("a@remote.test")
        await self.deliver(entry, route)
        await self.agent.stop()
        self.assertEqual(self.agent.idle_count(), 0)
        await sink.all_closed()


class MXTests(AgentTestCase):
    async def test_ipv4(self):
        sink, port = self.sink()
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "127.0.0.1", None, 10)]
        route = Route(via="mx", port=port, tls="opportunistic")
        entry = await self.queue("a@remote.test", "b@remote.test")
        outcomes = await self.deliver(entry, route)
        self.assertEqual([o.status for o in outcomes], [DELIVERED, DELIVERED])
        self.assertEqual(outcomes[0].remote, f"mx1.remote.test[127.0.0.1]:{port}")
        self.assertEqual(self.resolver.asked, [("remote.test", port)])

    async def test_ipv6(self):
        if not has_ipv6():
            raise unittest.SkipTest("no IPv6 loopback")
        sink, port = self.sink(interface="::1", tls_options=self.pki.server_options)
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "::1", None, 10)]
        route = Route(via="mx", port=port, tls="verify")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(o.remote, f"mx1.remote.test[::1]:{port}")
        self.assertTrue(sink.messages[0].tls)

    async def test_next_hop_when_first_unreachable(self):
        sink, port = self.sink()
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "127.0.0.1", closed_port(), 10),
                                           Hop("mx2.remote.test", "127.0.0.1", port, 20)]
        route = Route(via="mx", port=25, tls="none")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(o.remote, f"mx2.remote.test[127.0.0.1]:{port}")

    async def test_next_hop_after_4xx_greeting(self):
        busy, busy_port = self.sink(greeting="421 4.3.2 busy")
        sink, port = self.sink()
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "127.0.0.1", busy_port, 10),
                                           Hop("mx2.remote.test", "127.0.0.1", port, 20)]
        route = Route(via="mx", port=25, tls="none")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(len(sink.messages), 1)

    async def test_5xx_is_final_no_next_hop(self):
        first, first_port = self.sink(rcpt_replies={"a@remote.test": "550 5.1.1 no such user"})
        second, second_port = self.sink()
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "127.0.0.1", first_port, 10),
                                           Hop("mx2.remote.test", "127.0.0.1", second_port, 20)]
        route = Route(via="mx", port=25, tls="none")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual((o.status, o.reply), (FAILED, "550 5.1.1 no such user"))
        self.assertEqual(second.connections, 0)

    async def test_4xx_recipient_offered_to_next_hop(self):
        first, first_port = self.sink(rcpt_replies={"a@remote.test": "450 4.2.0 greylisted"})
        second, second_port = self.sink()
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "127.0.0.1", first_port, 10),
                                           Hop("mx2.remote.test", "127.0.0.1", second_port, 20)]
        route = Route(via="mx", port=25, tls="none")
        entry = await self.queue("a@remote.test", "b@remote.test")
        a, b = await self.deliver(entry, route)
        self.assertEqual((a.status, b.status), (DELIVERED, DELIVERED))
        self.assertEqual(first.messages[0].recipients, ["b@remote.test"])
        self.assertEqual(second.messages[0].recipients, ["a@remote.test"])

    async def test_all_hops_fail_defers_with_last_error(self):
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "127.0.0.1", closed_port(), 10),
                                           Hop("mx2.remote.test", "127.0.0.1", closed_port(), 20)]
        route = Route(via="mx", port=25, tls="none")
        entry = await self.queue("a@remote.test")
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("connect to mx2.remote.test[127.0.0.1]", o.reply)
        self.assertIn("Connection refused", o.reply)

    async def test_permanent_dns_error_fails(self):
        self.resolver.mx["remote.test"] = DNSError("550 5.1.2 Host or domain name not found", True)
        self.resolver.mx["later.test"] = DNSError("451 4.4.3 Host or domain name lookup failed", False)
        route = Route(via="mx", port=25, tls="none")
        [o] = await self.deliver(await self.queue("a@remote.test"), route)
        self.assertEqual((o.status, o.reply), (FAILED, "550 5.1.2 Host or domain name not found"))
        [o] = await self.deliver(await self.queue("a@later.test"), route)
        self.assertEqual(o.status, DEFERRED)

    async def test_verify_against_the_mx_name(self):
        sink, port = self.sink(tls_options=self.pki.server_options)
        self.resolver.mx["remote.test"] = [Hop("mx9.remote.test", "127.0.0.1", None, 10)]
        route = Route(via="mx", port=port, tls="verify")
        [o] = await self.deliver(await self.queue("a@remote.test"), route)
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("Server certificate not verified: host mx9.remote.test[127.0.0.1]", o.reply)
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "127.0.0.1", None, 10)]
        [o] = await self.deliver(await self.queue("a@remote.test"), route)
        self.assertEqual(o.status, DELIVERED, o)


class NeverFailsTests(AgentTestCase):
    async def test_resolver_bug_is_a_deferral(self):
        class Broken:
            def hops(self, domain, port=25):
                raise RuntimeError("boom")

        agent = SMTPAgent(self.spool, Broken(), lambda: self.config, reactor)
        [o] = await self.deliver(await self.queue("a@remote.test"), Route(via="mx"), agent)
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("boom", o.reply)

    async def test_unreadable_message_defers(self):
        sink, port = self.sink()
        route = self.smarthost(port, tls="none")
        entry = await self.queue("a@remote.test")
        self.spool.message_path(entry.id).unlink()
        [o] = await self.deliver(entry, route)
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("cannot read the queued message", o.reply)
        self.assertEqual(sink.messages, [])


class LimitTests(AgentTestCase):
    async def test_idle_connections_make_room_under_max_connections(self):
        self.config = make_config(self.folder, delivery={"max_connections": 2, "max_per_destination": 2})
        sink, port = self.sink()
        route = Route(via="mx", port=port, tls="none")
        for domain in ("one.test", "two.test", "three.test"):
            self.resolver.mx[domain] = [Hop(f"mx.{domain}", "127.0.0.1", None)]
            [o] = await self.deliver(await self.queue(f"a@{domain}"), route)
            self.assertEqual(o.status, DELIVERED)
            self.assertEqual(self.agent.busy, 0)
            self.assertLessEqual(self.agent.idle_count(), 2)
        self.assertEqual(self.agent.idle_count(SMTPAgent._key(route, "one.test")), 0)
        self.assertEqual(self.agent.idle_count(SMTPAgent._key(route, "two.test")), 1)
        self.assertEqual(self.agent.idle_count(SMTPAgent._key(route, "three.test")), 1)

    async def test_idle_per_destination_cap(self):
        self.config = make_config(self.folder, delivery={"max_per_destination": 2})
        sink, port = self.sink()
        route = self.smarthost(port, tls="none")
        entries = [await self.queue(f"r{i}@remote.test") for i in range(3)]
        # More at once than the cap (the manager would not do this): the surplus is closed.
        await defer.gatherResults([defer.ensureDeferred(self.deliver(e, route)) for e in entries])
        self.assertEqual(self.agent.idle_count(), 2)
        self.assertEqual(self.agent.busy, 0)


class TimeoutTests(unittest.TestCase):
    """Connect and greeting timeouts, on a memory reactor with a fake clock."""

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.reactor = MemoryReactorClock()
        self.config = make_config(self.folder, delivery={"connect_timeout": 30, "greeting_timeout": 300})
        self.spool = Spool(self.folder / "spool", self.reactor, inline=True)
        self.spool.prepare()
        self.resolver = FakeResolver(mx={"remote.test": [Hop("mx1.remote.test", "192.0.2.1", None, 10),
                                                         Hop("mx2.remote.test", "2001:db8::2", None, 20)]})
        self.agent = SMTPAgent(self.spool, self.resolver, lambda: self.config, self.reactor,
                               threadpool=object())
        incoming = self.spool.new_message()
        incoming.write(MESSAGE)
        self.entry = QueueEntry(id=incoming.id, sender="s@example.test",
                                recipients=[RecipientState("a@remote.test")], arrival=0.0,
                                size=incoming.size)
        self.successResultOf(self.spool.commit(incoming, self.entry))

    def test_connect_timeout_then_next_hop_then_greeting_timeout(self):
        from twisted.internet.testing import StringTransport
        d = self.agent.deliver(self.entry, Route(via="mx", port=25, tls="none"), self.entry.recipients)
        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.1", 25, 30))
        self.reactor.advance(30)
        # The second hop, over IPv6.
        self.assertEqual(len(self.reactor.tcpClients), 2)
        host, port, factory, _, _ = self.reactor.tcpClients[1]
        self.assertEqual(host, "2001:db8::2")
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.reactor.advance(299)
        self.assertNoResult(d)
        self.reactor.advance(1)
        [o] = self.successResultOf(d)
        self.assertEqual(o.status, DEFERRED)
        self.assertEqual(o.reply, "451 4.4.2 conversation with mx2.remote.test[2001:db8::2] timed out "
                                  "while receiving the initial server greeting")
        self.assertEqual(o.remote, "mx2.remote.test[2001:db8::2]:25")
        self.assertEqual(self.agent.busy, 0)

    def test_connect_timeout_text(self):
        self.resolver.mx["remote.test"] = [Hop("mx1.remote.test", "192.0.2.1", None, 10)]
        d = self.agent.deliver(self.entry, Route(via="mx", port=25, tls="none"), self.entry.recipients)
        self.reactor.advance(30)
        [o] = self.successResultOf(d)
        self.assertEqual(o.reply, "451 4.4.1 connect to mx1.remote.test[192.0.2.1]:25: Connection timed out")


class RealDNSTests(AgentTestCase):
    """
    MX routes end to end with the real resolver (twisted_mta.delivery.mx)
    asking a DNS server on loopback (tests.dns_support), and sinks on
    127.0.0.1 and ::1 on the same port.
    """

    def setUp(self):
        super().setUp()
        from tests.dns_support import DNSServer
        from twisted_mta.delivery.mx import MXResolver

        self.dns = DNSServer.started(self, {
            "remote.test": {"MX": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
            "mx1.remote.test": {"AAAA": ["::1"]},
            "mx2.remote.test": {"A": ["127.0.0.1"]},
            "null.test": {"MX": [(0, ".")]},
            "implicit.test": {"A": ["127.0.0.1"]},
        }, servfail={"broken.test"})
        self.resolver = MXResolver(self.dns.resolver(timeout=(0.5,)), reactor)
        self.agent = self.make_agent()

    def two_sinks(self, **kw):
        sink4, port = self.sink(**kw)
        if not has_ipv6():
            raise unittest.SkipTest("no IPv6 loopback")
        factory = SinkFactory(**kw)
        listening = reactor.listenTCP(port, factory, interface="::1")
        self.addCleanup(listening.stopListening)
        return factory, sink4, port

    async def test_mx_preference_ipv6_then_ipv4(self):
        sink6, sink4, port = self.two_sinks(tls_options=self.pki.server_options)
        route = Route(via="mx", port=port, tls="verify")
        [o] = await self.deliver(await self.queue("a@remote.test"), route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(o.remote, f"mx1.remote.test[::1]:{port}")
        self.assertTrue(sink6.messages[0].tls)
        await self.agent.stop()
        # The first MX goes away: the second one, over IPv4, takes the mail.
        sink6.greeting = "421 4.3.2 going down"
        [o] = await self.deliver(await self.queue("b@remote.test"), route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(o.remote, f"mx2.remote.test[127.0.0.1]:{port}")
        self.assertEqual(sink4.messages[0].recipients, ["b@remote.test"])

    async def test_implicit_mx(self):
        sink, port = self.sink()
        route = Route(via="mx", port=port, tls="opportunistic")
        [o] = await self.deliver(await self.queue("a@implicit.test"), route)
        self.assertEqual(o.status, DELIVERED, o)
        self.assertEqual(o.remote, f"implicit.test[127.0.0.1]:{port}")

    async def test_null_mx_and_nxdomain_fail_servfail_defers(self):
        route = Route(via="mx", port=25, tls="none")
        [o] = await self.deliver(await self.queue("a@null.test"), route)
        self.assertEqual(o.status, FAILED, o)
        self.assertTrue(o.reply.startswith("5"), o.reply)
        [o] = await self.deliver(await self.queue("a@nowhere.test"), route)
        self.assertEqual(o.status, FAILED, o)
        [o] = await self.deliver(await self.queue("a@broken.test"), route)
        self.assertEqual(o.status, DEFERRED, o)
        self.assertTrue(o.reply.startswith("4"), o.reply)


class WithManagerTests(AgentTestCase):
    """The agent under the real delivery manager: the cap per next hop holds, connections are reused."""

    async def test_many_messages_few_connections_cap_respected(self):
        from twisted.internet import task

        from twisted_mta import loader
        from twisted_mta.delivery.manager import DeliveryManager

        sink, port = self.sink()
        self.resolver.hosts["localhost"] = [Hop("localhost", "127.0.0.1", None)]
        self.config = make_config(self.folder, delivery={"max_per_destination": 3},
                                  route=[{"domains": ["*"], "via": "smtp", "host": "localhost",
                                          "port": port, "tls": "none"}])
        pipeline = loader.build_pipeline(self.config, 1, reactor=reactor)
        manager = DeliveryManager(self.spool, lambda: pipeline, lambda: self.config,
                                  {"smtp": self.agent}, reactor)
        manager.startService()
        self.addCleanup(manager.stopService)
        for i in range(30):
            manager.enqueue(await self.queue(f"r{i}@remote{i % 2}.test"))
        for _ in range(1000):
            if not manager.entries:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(manager.entries, {})
        self.assertEqual(len(sink.messages), 30)
        self.assertLessEqual(sink.max_active, 3)
        self.assertLessEqual(sink.connections, 3)


class FakeReadSpool:
    """A spool whose I/O jobs wait until the test runs them (run_io), over a generator it watches."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.jobs: list[tuple[object, defer.Deferred]] = []
        self.closed = False
        self.opened = 0

    def read_message(self, entry):
        self.opened += 1
        try:
            yield from self.chunks
        finally:
            self.closed = True

    def run_io(self, job):
        d = defer.Deferred()
        self.jobs.append((job, d))
        return d

    def run_jobs(self):
        jobs, self.jobs = self.jobs, []
        for job, d in jobs:
            try:
                d.callback(job())
            except Exception as e:
                d.errback(e)



class BrokenReadSpool(FakeReadSpool):
    """A spool whose message file cannot be read."""

    def read_message(self, entry):
        raise OSError(2, "No such file or directory")
        yield

class SpoolSourceTests(unittest.SynchronousTestCase):
    def test_first_batch_is_read_ahead(self):
        spool = FakeReadSpool([b"a" * 10, b"b" * 10])
        source = SpoolSource(spool, entry=None)
        self.assertEqual(len(spool.jobs), 1)  # asked for at once, before any read()
        spool.run_jobs()
        self.assertEqual(self.successResultOf(source.read()), b"a" * 10 + b"b" * 10)
        self.assertEqual(self.successResultOf(source.read()), b"")
        source.close()
        self.assertEqual(spool.jobs, [])  # read to the end: nothing left to close

    def test_batches(self):
        self.patch(SpoolSource, "batch", 10)
        spool = FakeReadSpool([b"a" * 10, b"b" * 10, b"c" * 5])
        source = SpoolSource(spool, entry=None)
        got = []
        while True:
            d = source.read()
            spool.run_jobs()
            chunk = self.successResultOf(d)
            if not chunk:
                break
            got.append(chunk)
        self.assertEqual(got, [b"a" * 10, b"b" * 10, b"c" * 5])
        self.assertEqual(spool.opened, 1)

    def test_closed_before_the_read_ahead_is_taken(self):
        # The transaction ended before the data (a refused recipient): the
        # file is closed once the read ahead is over, in an I/O job.
        self.patch(SpoolSource, "batch", 10)
        spool = FakeReadSpool([b"a" * 10, b"b" * 10])
        source = SpoolSource(spool, entry=None)
        source.close()
        self.assertFalse(spool.closed)
        spool.run_jobs()  # the read ahead
        self.assertFalse(spool.closed)
        self.assertEqual(len(spool.jobs), 1)  # the close, in the I/O thread
        spool.run_jobs()
        self.assertTrue(spool.closed)
        self.assertEqual(self.successResultOf(source.read()), b"")

    def test_failed_read_ahead_not_taken_is_dropped(self):
        spool = BrokenReadSpool([])
        source = SpoolSource(spool, entry=None)
        source.close()
        spool.run_jobs()  # the read ahead fails: no error is left unhandled
        spool.run_jobs()  # (closing the generator that raised)
        self.assertEqual(spool.jobs, [])

    def test_failed_read_ahead_is_given_to_the_reader(self):
        spool = BrokenReadSpool([])
        source = SpoolSource(spool, entry=None)
        d = source.read()
        spool.run_jobs()
        self.failureResultOf(d, OSError)
        source.close()
