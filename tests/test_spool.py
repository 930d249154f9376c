"""
The spool: commit records, recovery after a crash at any point, state
saves, removal, reading a message back with header changes.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.spool.store import Spool, new_queue_id

MESSAGE = b"Received: x\r\nSubject: hi\r\nX-Drop: a\r\n  folded\r\nTo: u@example.test\r\n\r\nbody\r\n"


def entry_for(incoming, **kw) -> QueueEntry:
    return QueueEntry(id=incoming.id, sender="s@example.test",
                      recipients=[RecipientState("u@example.test")], arrival=1.0,
                      size=incoming.size, **kw)


class SpoolTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        self.spool = Spool(self.path, inline=True)
        self.assertEqual(self.spool.prepare(), [])

    def receive(self, data=MESSAGE, **kw) -> QueueEntry:
        incoming = self.spool.new_message()
        incoming.write(data)
        entry = entry_for(incoming, **kw)
        self.successResultOf(self.spool.commit(incoming, entry))
        return entry

    def test_committed_entry_is_recovered(self):
        entry = self.receive()
        recovered = Spool(self.path, inline=True).prepare()
        self.assertEqual([e.id for e in recovered], [entry.id])
        self.assertEqual(recovered[0].size, len(MESSAGE))
        self.assertEqual(recovered[0].recipients, entry.recipients)

    def test_uncommitted_message_removed_at_start(self):
        incoming = self.spool.new_message()
        incoming.write(MESSAGE)
        incoming.flush()
        self.assertEqual(Spool(self.path, inline=True).prepare(), [])
        self.assertFalse(incoming.path.exists())

    def test_torn_commit_record_is_not_a_commit(self):
        entry = self.receive()
        path = self.spool.message_path(entry.id)
        data = path.read_bytes()
        for cut in (1, 5, 20, len(entry.to_json()) // 2):
            path.write_bytes(data[:-cut])
            self.assertEqual(Spool(self.path, inline=True).prepare(), [], cut)
            path.write_bytes(data)  # prepare() removed it; put it back

    def test_body_bytes_that_look_like_a_trailer_do_not_commit(self):
        incoming = self.spool.new_message()
        incoming.write(b"Subject: x\r\n\r\n" + b"\nTMTA1 0000000002 00000000\n")
        incoming.flush()
        self.assertEqual(Spool(self.path, inline=True).prepare(), [])

    def test_forged_envelope_in_body_is_not_a_commit(self):
        forged = self.receive()  # a real commit, copied into another message's body
        incoming = self.spool.new_message()
        incoming.write(self.spool.message_path(forged.id).read_bytes())
        incoming.flush()
        self.assertEqual([e.id for e in Spool(self.path, inline=True).prepare()], [forged.id])

    def test_saved_state_wins_and_orphans_are_cleaned(self):
        entry = self.receive()
        entry.recipients[0].state = "deferred"
        entry.recipients[0].attempts = 2
        self.successResultOf(self.spool.save(entry))
        (self.spool.queue / "ghost.state").write_bytes(b"{}")
        (self.spool.queue / "x.state.tmp").write_bytes(b"{")
        recovered = Spool(self.path, inline=True).prepare()
        self.assertEqual(recovered[0].recipients[0].attempts, 2)
        self.assertEqual(sorted(os.listdir(self.spool.queue)), sorted([entry.id, entry.id + ".state"]))

    def test_unreadable_entry_is_quarantined_not_deleted(self):
        entry = self.receive()
        (self.spool.queue / (entry.id + ".state")).write_bytes(b"not json")
        self.assertEqual(Spool(self.path, inline=True).prepare(), [])
        self.assertTrue((self.spool.corrupt / entry.id).exists())
        self.flushLoggedErrors()

    def test_remove(self):
        entry = self.receive()
        self.successResultOf(self.spool.save(entry))
        self.successResultOf(self.spool.remove(entry.id))
        self.assertEqual(os.listdir(self.spool.queue), [])

    def test_read_message_applies_header_changes(self):
        entry = self.receive(add_headers=[["X-Added", "yes"]], remove_headers=["x-drop"])
        data = b"".join(self.spool.read_message(entry, chunk_size=7))
        self.assertEqual(data, b"X-Added: yes\r\nReceived: x\r\nSubject: hi\r\nTo: u@example.test\r\n\r\nbody\r\n")

    def test_read_message_plain_is_byte_for_byte(self):
        body = bytes(range(256)) * 100 + b"\r\n"
        entry = self.receive(data=b"Subject: bin\r\n\r\n" + body)
        self.assertEqual(b"".join(self.spool.read_message(entry, chunk_size=1000)),
                         b"Subject: bin\r\n\r\n" + body)

    def test_abort_leaves_nothing(self):
        incoming = self.spool.new_message()
        incoming.write(MESSAGE)
        incoming.abort()
        self.assertEqual(os.listdir(self.spool.queue), [])

    def test_ids_sort_by_arrival_and_are_unique(self):
        ids = [new_queue_id(1_700_000_000 + i) for i in range(50)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(new_queue_id(5.0) for _ in range(1000))), 1000)


class ThreadedSpoolTests(unittest.TestCase):
    """The real thing: syncs in threads, batched."""

    @defer.inlineCallbacks
    def test_concurrent_commits_all_durable(self):
        path = Path(self.mktemp())
        spool = Spool(path)
        self.addCleanup(spool.stop)
        spool.prepare()
        commits = []
        for i in range(50):
            incoming = spool.new_message()
            incoming.write(MESSAGE + b"%d\r\n" % i)
            commits.append(spool.commit(incoming, entry_for(incoming)))
        yield defer.gatherResults(commits)
        self.assertEqual(len(Spool(path).prepare()), 50)

    @defer.inlineCallbacks
    def test_failed_sync_fails_the_commit_and_removes_the_file(self):
        path = Path(self.mktemp())
        spool = Spool(path)
        self.addCleanup(spool.stop)
        spool.prepare()
        incoming = spool.new_message()
        incoming.write(MESSAGE)
        entry = entry_for(incoming)
        import twisted_mta.spool.store as store
        real = store.os.fdatasync

        def broken(fd):
            raise OSError(5, "Input/output error")
        store.os.fdatasync = broken
        self.addCleanup(setattr, store.os, "fdatasync", real)
        with self.assertRaises(OSError):
            yield spool.commit(incoming, entry)
        self.assertFalse(incoming.path.exists())
        self.flushLoggedErrors(OSError)


class DropFieldsTests(unittest.SynchronousTestCase):
    HEAD = (b"Received: from a by internal.example.test\r\n\tid 1\r\n"
            b"Received: from b by mx.example.test\r\nSubject: s\r\n\r\n")

    def test_by_name(self):
        from twisted_mta.spool.store import _drop_fields
        self.assertEqual(_drop_fields(self.HEAD, ["received"]), b"Subject: s\r\n\r\n")

    def test_by_pattern_on_unfolded_value(self):
        from twisted_mta.spool.store import _drop_fields
        self.assertEqual(_drop_fields(self.HEAD, [["Received", r"internal\.example\.test\s+id 1"]]),
                         b"Received: from b by mx.example.test\r\nSubject: s\r\n\r\n")
