"""
The LMTP delivery agent (twisted_mta.delivery.lmtp) over real TCP and
UNIX sockets, against the test sink in LMTP mode: one reply per
recipient after the data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from tests.smtp_sink import SinkFactory, close_at_end
from tests.support import make_config
from twisted_mta.delivery.agent import DEFERRED, DELIVERED, FAILED
from twisted_mta.delivery.lmtp import LMTPAgent
from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.spool.store import Spool
from twisted_mta.values import Route

MESSAGE = b"From: s@example.test\r\nSubject: hi\r\n\r\n.dot\r\nHello.\r\n"


class LMTPAgentTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.config = make_config(self.folder, delivery={
            "connect_timeout": 5, "greeting_timeout": 10, "command_timeout": 10, "data_timeout": 10})
        self.spool = Spool(self.folder / "spool", reactor)
        self.spool.prepare()
        self.addCleanup(self.spool.stop)
        self.agent = LMTPAgent(self.spool, lambda: self.config, reactor)
        self.addCleanup(self.agent.stop)

    def _cleanup(self, factory, port):
        close_at_end(self, factory, port)

    def tcp_sink(self, **kw) -> tuple[SinkFactory, str]:
        factory = SinkFactory(lmtp=True, **kw)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self._cleanup(factory, port)
        return factory, f"tcp:127.0.0.1:{port.getHost().port}"

    def unix_sink(self, **kw) -> tuple[SinkFactory, str]:
        # A short path: UNIX socket paths are limited to about 100 bytes.
        folder = tempfile.mkdtemp(prefix="lmtp")
        self.addCleanup(os.rmdir, folder)
        path = os.path.join(folder, "s")
        factory = SinkFactory(lmtp=True, **kw)
        port = reactor.listenUNIX(path, factory)
        self._cleanup(factory, port)
        return factory, f"unix:{path}"

    async def queue(self, *recipients, message=MESSAGE) -> QueueEntry:
        incoming = self.spool.new_message()
        incoming.write(message)
        entry = QueueEntry(id=incoming.id, sender="s@example.test",
                           recipients=[RecipientState(r) for r in recipients],
                           arrival=reactor.seconds(), size=incoming.size)
        await self.spool.commit(incoming, entry)
        return entry

    async def deliver(self, entry, endpoint):
        return await self.agent.deliver(entry, Route(via="lmtp", endpoint=endpoint), entry.recipients)

    async def test_per_recipient_replies_over_tcp(self):
        sink, endpoint = self.tcp_sink(
            rcpt_replies={"nobody@example.test": "550 5.1.1 <nobody@example.test> User doesn't exist"},
            lmtp_replies={"full@example.test": "452 4.2.2 <full@example.test> Mailbox is full",
                          "quota@example.test": "552 5.2.2 <quota@example.test> Quota exceeded"})
        entry = await self.queue("a@example.test", "nobody@example.test", "full@example.test",
                                 "quota@example.test", "b@example.test")
        outcomes = await self.deliver(entry, endpoint)
        self.assertEqual([(o.recipient, o.status) for o in outcomes], [
            ("a@example.test", DELIVERED), ("nobody@example.test", FAILED),
            ("full@example.test", DEFERRED), ("quota@example.test", FAILED), ("b@example.test", DELIVERED)])
        self.assertEqual(outcomes[0].reply, "250 2.0.0 <a@example.test> Saved")
        self.assertEqual(outcomes[2].reply, "452 4.2.2 <full@example.test> Mailbox is full")
        self.assertEqual(outcomes[0].remote, endpoint)
        [m] = sink.messages
        self.assertEqual(m.recipients, ["a@example.test", "b@example.test"])
        self.assertEqual(m.data, MESSAGE)
        self.assertIn(b"LHLO mx.example.test", sink.transcripts[0])

    async def test_over_unix_socket(self):
        sink, endpoint = self.unix_sink()
        entry = await self.queue("a@example.test", "b@example.test")
        outcomes = await self.deliver(entry, endpoint)
        self.assertEqual([o.status for o in outcomes], [DELIVERED, DELIVERED], outcomes)
        self.assertEqual(sink.messages[0].data, MESSAGE)

    async def test_connection_reuse(self):
        sink, endpoint = self.unix_sink()
        for i in range(4):
            entry = await self.queue(f"u{i}@example.test")
            [o] = await self.deliver(entry, endpoint)
            self.assertEqual(o.status, DELIVERED)
        self.assertEqual(sink.connections, 1)
        self.assertEqual(len(sink.messages), 4)

    async def test_unreachable_defers(self):
        path = os.path.join(tempfile.mkdtemp(prefix="lmtp"), "none")
        self.addCleanup(os.rmdir, os.path.dirname(path))
        entry = await self.queue("a@example.test")
        [o] = await self.deliver(entry, f"unix:{path}")
        self.assertEqual(o.status, DEFERRED)
        self.assertTrue(o.reply.startswith(f"451 4.4.1 connect to unix:{path}:"), o.reply)

    async def test_lhlo_refused_defers(self):
        sink, endpoint = self.tcp_sink(ehlo_reply="500 5.5.1 go away")
        entry = await self.queue("a@example.test")
        [o] = await self.deliver(entry, endpoint)
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("refused LHLO", o.reply)

    async def test_connection_lost_after_data_defers(self):
        sink, endpoint = self.tcp_sink(close_after_data=True)
        entry = await self.queue("a@example.test", "b@example.test")
        outcomes = await self.deliver(entry, endpoint)
        self.assertEqual([o.status for o in outcomes], [DEFERRED, DEFERRED])
        self.assertIn("lost connection", outcomes[0].reply)

    async def test_bad_endpoint_defers(self):
        entry = await self.queue("a@example.test")
        [o] = await self.deliver(entry, "nonsense:foo")
        self.assertEqual(o.status, DEFERRED)
        self.assertIn("bad LMTP endpoint", o.reply)
