"""
Delivery status notifications (L{twisted_mta.delivery.bounce}): their
RFC 3464 form, read back with the email package, and their way into the
spool.
"""

from __future__ import annotations

import email
import re
import email.policy
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.support import make_config
from twisted_mta import loader
from twisted_mta.delivery.agent import Outcome
from twisted_mta.delivery.bounce import Bouncer, build_dsn, header_block, parse_reply, status_code
from twisted_mta.delivery.manager import DeliveryManager
from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.spool.store import Spool

MESSAGE = (b"Received: from client.example.net by mx.example.test\r\n"
           b"From: Sender <s@client.example.net>\r\n"
           b"Subject: hello\r\n"
           b"Message-ID: <m1@client.example.net>\r\n"
           b"\r\n"
           b"the body, which must not come back\r\n")


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


class BouncerTests(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.config = make_config(self.folder)
        self.spool = Spool(self.folder / "spool", reactor)
        self.spool.prepare()
        self.addCleanup(self.spool.stop)
        self.queued = []
        self.loaded_at_enqueue = []
        self.bouncer = Bouncer(self.spool, self.enqueue, lambda: self.config, reactor)

    def enqueue(self, entry):
        # Durable (committed) before the manager hears of it.
        self.loaded_at_enqueue.append(self.spool.load(entry.id))
        self.queued.append(entry)

    async def original(self, *recipients, sender="s@client.example.net", message=MESSAGE, **kw):
        incoming = self.spool.new_message()
        incoming.write(message)
        rcpts = [r if isinstance(r, RecipientState) else RecipientState(r) for r in recipients]
        entry = QueueEntry(id=incoming.id, sender=sender, recipients=rcpts,
                           arrival=reactor.seconds() - 3600, size=incoming.size, **kw)
        await self.spool.commit(incoming, entry)
        return entry

    def read(self, dsn: QueueEntry) -> bytes:
        loaded = self.spool.load(dsn.id)
        return b"".join(self.spool.read_message(loaded))

    def files(self):
        return sorted(p.name for p in self.spool.queue.iterdir())

    async def test_bounce(self):
        a = RecipientState("a@far.test", state="failed", attempts=1,
                           last_reply="550 5.1.1 <a@far.test>: Recipient address rejected: User unknown")
        a.remote = "mx.far.test[192.0.2.7]:25"
        b = RecipientState("b@far.test", state="failed", attempts=3, original="alias@example.test",
                           last_reply="554 5.7.1 spam")
        entry = await self.original(a, b, RecipientState("c@far.test", state="delivered"))
        dsn = await self.bouncer.bounce(entry, [a, b])

        self.assertEqual(self.queued, [dsn])
        self.assertEqual(len(self.loaded_at_enqueue), 1)
        loaded = self.spool.load(dsn.id)
        self.assertEqual((loaded.sender, [r.address for r in loaded.recipients], loaded.bounce),
                         ("", ["s@client.example.net"], True))
        self.assertEqual((dsn.sender, dsn.bounce, dsn.smtputf8, dsn.body), ("", True, False, "7BIT"))

        data = self.read(dsn)
        self.assertEqual(data.count(b"\n"), data.count(b"\r\n"))
        self.assertTrue(data.isascii())
        msg = parse(data)
        self.assertEqual(msg["From"], "Mail Delivery System <MAILER-DAEMON@mx.example.test>")
        self.assertEqual(msg["To"], "s@client.example.net")
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg["Message-ID"], f"<{dsn.id}@mx.example.test>")
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        text, status, headers = msg.iter_parts()
        self.assertEqual(
            [p.get_content_type() for p in (text, status, headers)],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"])

        body = re.sub(r"\r?\n    ", " ", text.get_content())  # unwrapped
        self.assertLessEqual(max(len(line) for line in text.get_content().splitlines()), 78)
        self.assertIn("This is the mail system at host mx.example.test.", body)
        self.assertIn("<a@far.test>: host mx.far.test[192.0.2.7]:25 said: 550 5.1.1 <a@far.test>: "
                      "Recipient address rejected: User unknown", body)
        self.assertIn("<b@far.test> (expanded from <alias@example.test>): 554 5.7.1 spam", body)
        self.assertNotIn("c@far.test", body)

        per_message, first, second = status.get_payload()
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.example.test")
        self.assertEqual(per_message["X-Twisted-MTA-Queue-ID"], entry.id)
        self.assertTrue(per_message["Arrival-Date"])
        self.assertEqual(first["Final-Recipient"], "rfc822; a@far.test")
        self.assertIsNone(first["Original-Recipient"])
        self.assertEqual(first["Action"], "failed")
        self.assertEqual(first["Status"], "5.1.1")
        self.assertEqual(first["Remote-MTA"], "dns; mx.far.test")
        self.assertEqual(first["Diagnostic-Code"], "smtp; 550 5.1.1 <a@far.test>: Recipient "
                                                   "address rejected: User unknown")
        self.assertTrue(first["Last-Attempt-Date"])
        self.assertIsNone(first["Will-Retry-Until"])
        self.assertEqual(second["Final-Recipient"], "rfc822; b@far.test")
        self.assertEqual(second["Original-Recipient"], "rfc822; alias@example.test")
        self.assertEqual(second["Status"], "5.7.1")
        self.assertIsNone(second["Remote-MTA"])

        returned = headers.get_content()
        self.assertIn("Subject: hello", returned)
        self.assertIn("Message-ID: <m1@client.example.net>", returned)
        self.assertNotIn("the body", returned)
        self.assertNotIn(b"the body", data)

    async def test_delay(self):
        r = RecipientState("a@far.test", state="deferred", attempts=4,
                           last_reply="451 4.7.1 greylisted, try later")
        entry = await self.original(r)
        dsn = await self.bouncer.delay(entry, [r])
        msg = parse(self.read(dsn))
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        text, status, headers = msg.iter_parts()
        self.assertIn("THIS IS A WARNING ONLY", text.get_content())
        self.assertIn("more than 4 hour(s)", text.get_content())
        self.assertIn("until it is 5 day(s) old", text.get_content())
        _, block = status.get_payload()
        self.assertEqual(block["Action"], "delayed")
        self.assertEqual(block["Status"], "4.7.1")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 451 4.7.1 greylisted, try later")
        self.assertTrue(block["Will-Retry-Until"])
        self.assertTrue(self.spool.load(dsn.id).bounce)

    async def test_expired(self):
        r = RecipientState("a@far.test", state="failed", attempts=40,
                           last_reply="message expired after 5 days in the queue: "
                                      "451 4.4.1 connection refused")
        entry = await self.original(r)
        dsn = await self.bouncer.bounce(entry, [r])
        _, status, _ = parse(self.read(dsn)).iter_parts()
        block = status.get_payload()[1]
        self.assertEqual(block["Status"], "5.4.7")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 451 4.4.1 connection refused")

    async def test_local_reason(self):
        r = RecipientState("a@far.test", state="failed", last_reply="mailbox folder is not writable")
        entry = await self.original(r)
        dsn = await self.bouncer.bounce(entry, [r])
        block = list(parse(self.read(dsn)).iter_parts())[1].get_payload()[1]
        self.assertEqual(block["Status"], "5.0.0")
        self.assertEqual(block["Diagnostic-Code"], "X-twisted-mta; mailbox folder is not writable")

    async def test_never_to_null_sender(self):
        r = RecipientState("a@far.test", state="failed", last_reply="550 5.1.1 no")
        entry = await self.original(r, sender="")
        before = self.files()
        self.assertIsNone(await self.bouncer.bounce(entry, [r]))
        self.assertIsNone(await self.bouncer.delay(entry, [r]))
        self.assertEqual(self.queued, [])
        self.assertEqual(self.files(), before)

    async def test_never_about_a_bounce(self):
        r = RecipientState("s@client.example.net", state="failed", last_reply="550 5.1.1 no")
        entry = await self.original(r, sender="other@example.test", bounce=True)
        before = self.files()
        self.assertIsNone(await self.bouncer.bounce(entry, [r]))
        self.assertIsNone(await self.bouncer.delay(entry, [r]))
        self.assertEqual(self.queued, [])
        self.assertEqual(self.files(), before)

    async def test_smtputf8(self):
        message = "From: jörg@bücher.test\r\nSubject: grüße\r\n\r\nbody\r\n".encode()
        r = RecipientState("用户@例子.test", state="failed", original="ö@bücher.test",
                           last_reply="550 5.1.1 unbekannt: ü")
        entry = await self.original(r, sender="jörg@bücher.test", message=message, smtputf8=True,
                                    body="8BITMIME")
        dsn = await self.bouncer.bounce(entry, [r])
        self.assertTrue(dsn.smtputf8)
        self.assertEqual(dsn.body, "8BITMIME")
        self.assertEqual(self.spool.load(dsn.id).recipients[0].address, "jörg@bücher.test")
        data = self.read(dsn)
        msg = parse(data)
        self.assertEqual(msg["To"], "jörg@bücher.test")
        text, status, headers = msg.iter_parts()
        self.assertEqual(status.get_content_type(), "message/global-delivery-status")
        self.assertEqual(headers.get_content_type(), "message/global-headers")
        self.assertIn("Final-Recipient: utf-8; 用户@例子.test".encode(), data)
        self.assertIn("Original-Recipient: utf-8; ö@bücher.test".encode(), data)
        self.assertIn("Diagnostic-Code: smtp; 550 5.1.1 unbekannt: ü".encode(), data)
        self.assertIn("Subject: grüße".encode(), data)
        self.assertIn("<用户@例子.test> (expanded from <ö@bücher.test>): 550 5.1.1 unbekannt: ü",
                      text.get_content())

    async def test_eight_bit_header_kept(self):
        message = b"Subject: caf\xe9 latin-1\r\nX-Junk: \xff\x00\r\n\r\nbody\r\n"
        r = RecipientState("a@far.test", state="failed", last_reply="550 5.1.1 no")
        entry = await self.original(r, message=message)
        dsn = await self.bouncer.bounce(entry, [r])
        self.assertFalse(dsn.smtputf8)
        self.assertEqual(dsn.body, "8BITMIME")
        data = self.read(dsn)
        self.assertIn(b"Subject: caf\xe9 latin-1\r\n", data)
        self.assertEqual(parse(data).get_content_type(), "multipart/report")

    async def test_changed_headers(self):
        """The header as it is delivered: fields a filter added, not those it removed."""
        r = RecipientState("a@far.test", state="failed", last_reply="550 5.1.1 no")
        entry = await self.original(r, add_headers=[["X-Spam-Score", "9"]],
                                    remove_headers=[["Received", None]])
        dsn = await self.bouncer.bounce(entry, [r])
        returned = list(parse(self.read(dsn)).iter_parts())[2].get_content()
        self.assertTrue(returned.startswith("X-Spam-Score: 9\r\nFrom: Sender"), returned)
        self.assertNotIn("Received:", returned)

    async def test_header_bounded(self):
        big = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 100) for i in range(2000))
        r = RecipientState("a@far.test", state="failed", last_reply="550 5.1.1 no")
        entry = await self.original(r, message=big + b"\r\nbody\r\n")
        dsn = await self.bouncer.bounce(entry, [r])
        part = list(parse(self.read(dsn)).iter_parts())[2].get_content()
        self.assertLessEqual(len(part), Bouncer.header_limit)
        self.assertGreater(len(part), Bouncer.header_limit - 200)
        self.assertTrue(part.endswith("\r\n") or part.endswith("\n"))

    async def test_message_file_gone(self):
        """The notification still goes, without the header part."""
        r = RecipientState("a@far.test", state="failed", last_reply="550 5.1.1 no")
        entry = await self.original(r)
        self.spool.message_path(entry.id).unlink()
        dsn = await self.bouncer.bounce(entry, [r])
        msg = parse(self.read(dsn))
        self.assertEqual([p.get_content_type() for p in msg.iter_parts()],
                         ["text/plain", "message/delivery-status"])

    async def test_commit_failure_fails(self):
        """If the notification cannot be made durable, the caller hears of it and nothing is queued."""
        r = RecipientState("a@far.test", state="failed", last_reply="550 5.1.1 no")
        entry = await self.original(r)

        def broken(incoming, dsn):
            incoming.abort()
            return defer.fail(OSError("disk full"))

        self.spool.commit = broken
        before = self.files()
        with self.assertRaises(OSError):
            await self.bouncer.bounce(entry, [r])
        self.assertEqual(self.queued, [])
        self.assertEqual(self.files(), before)


class HelperTests(unittest.TestCase):
    def test_parse_reply(self):
        self.assertEqual(parse_reply("550 5.1.1 <a@b>: no such user"), (550, "5.1.1"))
        self.assertEqual(parse_reply("421-4.4.2 timeout"), (421, "4.4.2"))
        self.assertEqual(parse_reply("451 try later"), (451, None))
        self.assertEqual(parse_reply("550"), (550, None))
        self.assertEqual(parse_reply("550 4.1.1 mismatched class"), (550, None))
        self.assertEqual(parse_reply("250 2.0.0 Ok: queued as X"), (250, "2.0.0"))
        self.assertEqual(parse_reply("5.1.1 no code"), (None, None))
        self.assertEqual(parse_reply("mailbox full"), (None, None))
        self.assertEqual(parse_reply(""), (None, None))
        self.assertEqual(parse_reply(None), (None, None))

    def test_status_code(self):
        self.assertEqual(status_code("550 5.1.1 no", "failed"), "5.1.1")
        self.assertEqual(status_code("451 4.3.0 later", "failed"), "5.3.0")  # deferred made final
        self.assertEqual(status_code("550 5.1.2 not found", "delayed"), "4.1.2")
        self.assertEqual(status_code("451 later", "delayed"), "4.0.0")
        self.assertEqual(status_code(None, "failed"), "5.0.0")
        self.assertEqual(status_code("message expired after 5 days in the queue: 451 4.4.1 x",
                                     "failed"), "5.4.7")

    def test_long_replies_keep_lines_short(self):
        """No line over RFC 5322's 998 octets, whatever the reply; no control characters."""
        for sender in ("s@x.test", "ü@x.test"):
            for reply in ("550 5.7.1 " + "x" * 2000, "550 5.7.1 " + "ü" * 2000, "550 5.7.1 a\r\nb\x00c"):
                entry = QueueEntry("X", sender, [], 0)
                data, _ = build_dsn(entry, [RecipientState("a@b.test", last_reply=reply)], "failed",
                                    hostname="h.test", queue_id="Y", now=0, headers=None)
                self.assertLessEqual(max(len(line) for line in data.split(b"\r\n")), 998)
                self.assertNotIn(b"\x00", data)
                self.assertEqual(data.count(b"\n"), data.count(b"\r\n"))

    def test_header_block(self):
        self.assertEqual(header_block([b"A: 1\r\nB: 2\r\n\r\nbody"], 1000), b"A: 1\r\nB: 2\r\n")
        self.assertEqual(header_block([b"A: 1\r\n", b"B: 2\r", b"\n\r\nbody"], 1000),
                         b"A: 1\r\nB: 2\r\n")
        self.assertEqual(header_block([b"\r\nbody"], 1000), b"")
        self.assertEqual(header_block([b"A: 1\nB: 2\n\nbody"], 1000), b"A: 1\nB: 2\n")
        self.assertEqual(header_block([b"A: 1\r\nB: 2\r\n"], 1000), b"A: 1\r\nB: 2\r\n")  # no body
        self.assertEqual(header_block([b"A: 1\r\nB: 22222\r\nC: 3\r\n\r\n"], 12), b"A: 1\r\n")

        def endless():
            yield b"A: 1\r\n\r\n"
            raise AssertionError("read past the header")
        self.assertEqual(header_block(endless(), 1000), b"A: 1\r\n")


class Agent:
    """Fails every recipient."""

    def __init__(self):
        self.calls = []

    def deliver(self, entry, route, recipients):
        self.calls.append((entry.id, [r.address for r in recipients]))
        return defer.succeed([Outcome(r.address, "failed", "550 5.1.1 no such user",
                                      "mx.far.test[192.0.2.7]:25") for r in recipients])


class ManagerTests(unittest.SynchronousTestCase):
    """With the delivery manager: one DSN for a failure, none for the DSN's own failure."""

    def test_bounce_once_and_no_loop(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        clock = Clock()
        clock.advance(1_800_000_000)
        config = make_config(folder, route=[{"domains": ["*"], "via": "mx"}])
        pipeline = loader.build_pipeline(config, 1, reactor=clock)
        spool = Spool(folder / "spool", clock, inline=True)
        spool.prepare()
        agent = Agent()
        manager = DeliveryManager(spool, lambda: pipeline, lambda: config, {"mx": agent}, clock)
        made = []

        def enqueue(dsn):
            made.append((spool.load(dsn.id), b"".join(spool.read_message(dsn))))
            manager.enqueue(dsn)

        manager.bouncer = Bouncer(spool, enqueue, lambda: config, clock)
        manager.startService()

        incoming = spool.new_message()
        incoming.write(MESSAGE)
        entry = QueueEntry(id=incoming.id, sender="s@client.example.net",
                           recipients=[RecipientState("a@far.test"), RecipientState("b@far.test")],
                           arrival=clock.seconds(), size=incoming.size)
        self.successResultOf(spool.commit(incoming, entry))
        manager.enqueue(entry)
        clock.advance(0)
        clock.advance(0)

        # One DSN about both recipients was queued, in the spool...
        (dsn, data), = made
        self.assertNotEqual(dsn.id, entry.id)
        self.assertTrue(dsn.bounce)
        self.assertEqual(dsn.sender, "")
        self.assertEqual([r.address for r in dsn.recipients], ["s@client.example.net"])
        blocks = list(parse(data).iter_parts())[1].get_payload()
        self.assertEqual([(b["Final-Recipient"], b["Status"], b["Remote-MTA"]) for b in blocks[1:]],
                         [("rfc822; a@far.test", "5.1.1", "dns; mx.far.test"),
                          ("rfc822; b@far.test", "5.1.1", "dns; mx.far.test")])
        # ...and then failed too: it is not answered, and it is kept on hold.
        self.assertEqual([c[1] for c in agent.calls],
                         [["a@far.test", "b@far.test"], ["s@client.example.net"]])
        self.assertEqual(len(made), 1)
        [kept] = list(spool.entries())
        self.assertEqual((kept.id, kept.held, kept.bounce), (dsn.id, True, True))
        self.assertEqual([r.state for r in kept.recipients], ["failed"])
        # Released, it is tried again (and, failing again, held again).
        self.successResultOf(manager.release(dsn.id))
        clock.advance(0)
        clock.advance(0)
        self.assertEqual([c[1] for c in agent.calls][-1], ["s@client.example.net"])
        self.assertEqual(len(agent.calls), 3)
        self.assertEqual(len(made), 1)
        [kept] = list(spool.entries())
        self.assertTrue(kept.held)
        manager.stopService()
