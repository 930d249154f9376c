"""
The spool: commit records, recovery after a crash at any point, state
saves, removal, reading a message back with header changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.spool.store import LAZY_IO_DELAY, Spool, _trailer, new_queue_id

MESSAGE = b"Received: x\r\nSubject: hi\r\nX-Drop: a\r\n  folded\r\nTo: u@example.test\r\n\r\nbody\r\n"


def entry_for(incoming, **kw) -> QueueEntry:
    return QueueEntry(id=incoming.id, sender="s@example.test",
                      recipients=[RecipientState("u@example.test")], arrival=1.0,
                      size=incoming.size, **kw)



def record_submits(executor) -> list:
    """Have C{executor.submit} record each (function, arguments) it is handed, in a list."""
    handed = []
    real_submit = executor.submit

    def submit(fn, *args):
        handed.append((fn, args))
        return real_submit(fn, *args)
    executor.submit = submit
    return handed

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
        # Saves are appended to the message file: no state file of its own.
        self.assertEqual(sorted(os.listdir(self.spool.queue)), [entry.id])

    def test_unreadable_entry_is_quarantined_not_deleted(self):
        entry = self.receive()
        (self.spool.queue / (entry.id + ".state")).write_bytes(b"not json")
        self.assertEqual(Spool(self.path, inline=True).prepare(), [])
        self.assertTrue((self.spool.corrupt / entry.id).exists())
        self.flushLoggedErrors()

    def test_writes_to_one_entry_wait_their_turn(self):
        first, second = defer.Deferred(), defer.Deferred()
        started = []

        def start(n, d):
            def go():
                started.append(n)
                return d
            return go
        d1 = self.spool._in_order("x", start(1, first))
        d2 = self.spool._in_order("x", start(2, second))
        d3 = self.spool._in_order("y", start(3, defer.succeed("three")))
        self.assertEqual(started, [1, 3])  # another entry's write does not wait
        self.assertEqual(self.successResultOf(d3), "three")
        self.assertNoResult(d2)
        first.errback(OSError(5, "Input/output error"))  # a failed write does not stop the next
        self.failureResultOf(d1, OSError)
        self.assertEqual(started, [1, 3, 2])
        second.callback("two")
        self.assertEqual(self.successResultOf(d2), "two")
        self.assertEqual(self.spool._tails, {})

    def test_run_io_inline_runs_at_once(self):
        self.assertEqual(self.successResultOf(self.spool.run_io(lambda: 42)), 42)
        self.failureResultOf(self.spool.run_io(lambda: 1 / 0), ZeroDivisionError)

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

    def test_leftover_incoming_files_removed_at_start(self):
        # What a crash leaves in incoming/: files made ahead of need, a
        # message half received, and one whose commit record was written
        # but whose rename into queue/ never happened (never acknowledged).
        incoming = self.spool.incoming
        (incoming / "0123abcd").write_bytes(b"")
        (incoming / "4567abcd").write_bytes(MESSAGE[:20])
        env = QueueEntry(id="x", sender="", recipients=[RecipientState("u@example.test")],
                         arrival=1.0).to_json()
        (incoming / "89abcdef").write_bytes(MESSAGE + env + _trailer(env))
        self.assertEqual(Spool(self.path, inline=True).prepare(), [])
        self.assertEqual(os.listdir(incoming), [])
        self.assertEqual(os.listdir(self.spool.queue), [])

    def test_message_is_received_in_incoming_and_committed_into_queue(self):
        incoming = self.spool.new_message()
        self.assertEqual(incoming.path.parent, self.spool.incoming)
        incoming.write(MESSAGE)
        incoming.flush()
        self.assertEqual(incoming.path.read_bytes(), MESSAGE)  # data filters read it by path
        self.successResultOf(self.spool.commit(incoming, entry_for(incoming)))
        self.assertEqual(incoming.path, self.spool.message_path(incoming.id))
        self.assertEqual(os.listdir(self.spool.incoming), [])
        self.assertEqual(os.listdir(self.spool.queue), [incoming.id])

    def test_bytes_are_held_until_flush_or_a_megabyte(self):
        import twisted_mta.spool.store as store
        incoming = self.spool.new_message()
        incoming.write(b"a" * 1000)
        self.assertEqual(incoming.path.read_bytes(), b"")  # not written yet: one writev later
        incoming.flush()
        self.assertEqual(incoming.path.read_bytes(), b"a" * 1000)
        big = b"b" * store._WRITE_AHEAD
        incoming.write(big)  # over the limit: written at once
        self.assertEqual(incoming.path.stat().st_size, 1000 + len(big))
        self.assertEqual(incoming.size, 1000 + len(big))
        incoming.abort()

    def test_short_writes_are_continued(self):
        import twisted_mta.spool.store as store
        real = store.os.writev
        self.patch(store.os, "writev", lambda fd, pieces: real(fd, [bytes(pieces[0][:3])]))
        entry = self.receive(data=b"Subject: x\r\n\r\n" + b"0123456789" * 7)
        self.assertEqual(b"".join(self.spool.read_message(entry)),
                         b"Subject: x\r\n\r\n" + b"0123456789" * 7)
        self.assertEqual(Spool(self.path, inline=True).prepare()[0].id, entry.id)

    def save_attempts(self, entry, n, sync=False):
        entry.recipients[0].state = "deferred"
        entry.recipients[0].attempts = n
        self.successResultOf(self.spool.save(entry, sync=sync))

    def test_saves_are_appended_and_the_last_whole_one_counts(self):
        entry = self.receive()
        path = self.spool.message_path(entry.id)
        committed = path.stat().st_size
        for n in range(1, 31):
            self.save_attempts(entry, n, sync=n % 7 == 0)
        self.assertEqual(os.listdir(self.spool.queue), [entry.id])
        self.assertGreater(path.stat().st_size, committed)
        loaded = self.spool.load(entry.id)
        self.assertEqual((loaded.recipients[0].attempts, loaded.size), (30, len(MESSAGE)))
        self.assertEqual(b"".join(self.spool.read_message(loaded)), MESSAGE)

    def test_save_cut_short_is_ignored_and_cut_off_at_start(self):
        # A crash while a save was being written (an unsynced one: a
        # synced save is whole once acknowledged): the save before it
        # counts, or the envelope if there was none.
        entry = self.receive()
        path = self.spool.message_path(entry.id)
        committed = path.read_bytes()
        self.save_attempts(entry, 3)
        whole = path.read_bytes()
        self.save_attempts(entry, 4)
        four = path.read_bytes()[len(whole):]
        torn_saves = [four[:n] for n in (1, 10, len(four) // 2, len(four) - 1)]
        torn_saves += [b"\0" * 300, four.replace(b'"attempts":4', b'"attempts":5')]
        for before, attempts in ((whole, 3), (committed, 0)):
            for torn in torn_saves:
                path.write_bytes(before + torn)
                self.assertEqual(self.spool.load(entry.id).recipients[0].attempts, attempts, torn)
                recovered = Spool(self.path, inline=True).prepare()
                self.assertEqual([e.recipients[0].attempts for e in recovered], [attempts])
                self.assertEqual(path.read_bytes(), before)  # cut off
        # and saves go on from there
        self.save_attempts(entry, 6)
        self.assertEqual(self.spool.load(entry.id).recipients[0].attempts, 6)

    def test_a_later_whole_save_after_a_torn_one_counts(self):
        entry = self.receive()
        path = self.spool.message_path(entry.id)
        self.save_attempts(entry, 1)
        with open(path, "ab") as f:
            f.write(b'{"id":"torn-by-a-cra')
        self.save_attempts(entry, 2)
        self.assertEqual(self.spool.load(entry.id).recipients[0].attempts, 2)
        self.assertEqual(Spool(self.path, inline=True).prepare()[0].recipients[0].attempts, 2)

    def test_appended_save_wins_over_an_old_state_file(self):
        entry = self.receive()
        old = QueueEntry.from_json(entry.to_json())
        old.recipients[0].attempts = 9
        (self.spool.queue / (entry.id + ".state")).write_bytes(old.to_json())
        self.assertEqual(self.spool.load(entry.id).recipients[0].attempts, 9)
        self.save_attempts(entry, 10)
        self.assertEqual(self.spool.load(entry.id).recipients[0].attempts, 10)
        self.successResultOf(self.spool.remove(entry.id))
        self.assertEqual(os.listdir(self.spool.queue), [])

    def test_state_file_without_header_is_still_read(self):
        entry = self.receive()
        entry.recipients[0].attempts = 5
        (self.spool.queue / (entry.id + ".state")).write_bytes(entry.to_json())
        self.assertEqual(Spool(self.path, inline=True).prepare()[0].recipients[0].attempts, 5)

    def test_unsynced_save_is_read_back(self):
        entry = self.receive()
        entry.recipients[0].state = "deferred"
        entry.recipients[0].attempts = 1
        self.successResultOf(self.spool.save(entry, sync=False))
        self.assertEqual(Spool(self.path, inline=True).prepare()[0].recipients[0].attempts, 1)

    def test_new_ids_sort_after_recovered_ones(self):
        # The clock went back an hour between two runs.
        self.spool.new_id = lambda: new_queue_id(time.time() + 3600)
        future = self.receive()
        spool = Spool(self.path, inline=True)
        spool.prepare()
        ids = [spool.new_id() for _ in range(100)]
        self.assertEqual(len(set(ids)), 100)
        self.assertEqual(ids, sorted(ids))
        self.assertGreater(ids[0], future.id)

    def test_to_json_has_every_field(self):
        entry = QueueEntry(
            id="i", sender="s@example.test", arrival=2.5, size=7, body="8BITMIME", smtputf8=True,
            recipients=[RecipientState("u@example.test", "deferred", 2, 9.5, "451 x",
                                       {"via": "smtp", "host": "h"}, "o@example.test", "mx[1]")],
            client={"ip": "192.0.2.1", "helo": "h", "tls": None, "user": "ü"},
            add_headers=[["X-A", "b"]], remove_headers=[["x-drop", None]],
            held=True, delay_warned=True, bounce=True)
        self.assertEqual(entry.to_json(), json.dumps(asdict(entry), separators=(",", ":"),
                                                     ensure_ascii=False).encode("utf-8"))
        self.assertEqual(QueueEntry.from_json(entry.to_json()), entry)


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
    def test_messages_received_together_share_a_batch(self):
        """
        Commits of messages received side by side make one batch: the first
        waits for the others, which are still being received, instead of
        starting a batch of its own.
        """
        spool = Spool(Path(self.mktemp()))
        self.addCleanup(spool.stop)
        spool.prepare()
        batches = []
        real = spool._sync._run
        spool._sync._run = lambda batch: (batches.append(len(batch)), real(batch))[1]
        incomings = [spool.new_message() for _ in range(3)]
        commits = []
        for incoming in incomings:
            incoming.write(MESSAGE)
            commits.append(spool.commit(incoming, entry_for(incoming)))
        yield defer.gatherResults(commits)
        self.assertEqual(batches, [3])

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

    @defer.inlineCallbacks
    def test_files_are_made_ahead_and_removed_at_stop(self):
        path = Path(self.mktemp())
        spool = Spool(path, pool_size=8)
        spool.prepare()
        first = spool.new_message()  # the pool was empty: made on the spot
        spool._pool._refill.result()  # wait for the thread to fill it
        self.assertEqual(len(os.listdir(spool.incoming)), 1 + 8)
        second = spool.new_message()
        self.assertEqual(spool._pool.misses, 1)
        self.assertNotEqual(first.path, second.path)
        second.write(MESSAGE)
        yield spool.commit(second, entry_for(second))
        first.abort()
        spool.stop()
        self.assertEqual(os.listdir(spool.incoming), [])
        self.assertEqual(os.listdir(spool.queue), [second.id])

    @defer.inlineCallbacks
    def test_saves_and_removal_land_in_the_order_asked(self):
        path = Path(self.mktemp())
        spool = Spool(path)
        self.addCleanup(spool.stop)
        spool.prepare()
        incoming = spool.new_message()
        incoming.write(MESSAGE)
        entry = entry_for(incoming)
        yield spool.commit(incoming, entry)
        saves = []
        for attempts in range(1, 21):
            entry.recipients[0].attempts = attempts
            saves.append(spool.save(entry, sync=attempts % 3 == 0))
        yield defer.gatherResults(saves)
        self.assertEqual(spool.load(entry.id).recipients[0].attempts, 20)
        entry.recipients[0].attempts = 21
        last = [spool.save(entry, sync=False), spool.remove(entry.id)]
        yield defer.gatherResults(last)
        self.assertEqual(os.listdir(spool.queue), [])
        self.assertEqual(spool._tails, {})

    @defer.inlineCallbacks
    def test_run_io_jobs_of_one_turn_go_together_with_their_results(self):
        path = Path(self.mktemp())
        spool = Spool(path)
        self.addCleanup(spool.stop)
        spool.prepare()
        handed = record_submits(spool._io_threads)

        def boom():
            raise OSError(5, "Input/output error")
        ds = [spool.run_io(lambda: 1), spool.run_io(boom), spool.run_io(lambda: "three")]
        one, two, three = yield defer.DeferredList(ds, consumeErrors=True)
        self.assertEqual(one, (True, 1))
        self.assertFalse(two[0])
        self.assertIsInstance(two[1].value, OSError)
        self.assertEqual(three, (True, "three"))
        self.assertEqual(len(handed), 1)  # one hand-off for the three

    def test_lazy_jobs_wait_then_go_with_the_next_urgent_one(self):
        """Unlinks and unsynced saves wait up to LAZY_IO_DELAY; a job someone waits on does not."""
        clock = Clock()
        clock.callFromThread = lambda f, *a, **kw: None
        spool = Spool(self.mktemp(), reactor=clock)
        spool.prepare()
        self.addCleanup(spool.stop)
        groups = record_submits(spool._io_threads)
        spool.run_io(lambda: 1, soon=False)
        spool.run_io(lambda: 2, soon=False)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [LAZY_IO_DELAY])
        spool.run_io(lambda: 3)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [0])
        spool.run_io(lambda: 4, soon=False)  # does not put the urgent one off
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [0])
        clock.advance(0)
        self.assertEqual(len(groups), 1)
        run, _ = groups[0]
        self.assertEqual([value for _, value in run()], [1, 2, 3, 4])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_kill_9_recovers_exactly_the_acknowledged(self):
        """
        A real process commits messages with the threaded spool, saves a
        deferral without a sync, starts one more message, and is killed
        with SIGKILL: exactly the committed messages come back, with the
        saved state, and nothing is left in incoming/.
        """
        path = Path(self.mktemp()).absolute()
        child = textwrap.dedent(f"""
            import os, signal, sys
            from twisted.internet import defer, reactor
            from twisted_mta.spool.entry import QueueEntry, RecipientState
            from twisted_mta.spool.store import Spool
            spool = Spool({str(path)!r})
            spool.prepare()

            @defer.inlineCallbacks
            def run():
                entries = []
                for i in range(20):
                    incoming = spool.new_message()
                    incoming.write(b"Subject: %d\\r\\n\\r\\nbody\\r\\n" % i)
                    entry = QueueEntry(id=incoming.id, sender="s@example.test",
                                       recipients=[RecipientState("u@example.test")],
                                       arrival=1.0, size=incoming.size)
                    entries.append(entry)
                    yield spool.commit(incoming, entry)
                entries[0].recipients[0].state = "deferred"
                entries[0].recipients[0].attempts = 1
                yield spool.save(entries[0], sync=False)
                yield spool.remove(entries[1].id)
                half = spool.new_message()
                half.write(b"Subject: half\\r\\n\\r\\nno end")
                half.flush()
                print(" ".join(e.id for e in entries[2:]), entries[0].id, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            reactor.callWhenRunning(run)
            reactor.run()
        """)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, env=env,
                              cwd=str(Path(__file__).parent.parent), timeout=120)
        self.assertEqual(done.returncode, -9, done.stderr.decode())
        *committed, saved = done.stdout.decode().split()
        self.assertTrue(os.listdir(path / "incoming"))  # the half message, files made ahead
        recovered = {e.id: e for e in Spool(path, inline=True).prepare()}
        self.assertEqual(sorted(recovered), sorted(committed + [saved]))
        self.assertEqual(recovered[saved].recipients[0].attempts, 1)
        self.assertEqual(os.listdir(path / "incoming"), [])


class GroupSyncTests(unittest.SynchronousTestCase):
    def test_what_callbacks_submit_joins_one_next_batch(self):
        """
        Each session's next message is submitted from the callback of its
        last one: they must make one batch (one journal commit), not one
        batch each.
        """
        from twisted_mta.spool.store import _GroupSync
        folder = Path(self.mktemp())
        folder.mkdir()
        sync = _GroupSync(None, inline=True)
        self.addCleanup(sync.stop)
        batches = []
        real = sync._run
        sync._run = lambda batch: (batches.append(len(batch)), real(batch))[1]
        sessions, rounds = 10, 4

        def session(left):
            if left:
                sync.submit(lambda: None, folder).addCallback(lambda _: session(left - 1))

        sync._running = True  # as if a batch were under way: all ten queue up
        for _ in range(sessions):
            session(rounds)
        sync._running = False
        sync._start()
        self.assertEqual(batches, [sessions] * rounds)

    def test_jobs_share_threads_and_keep_their_outcomes(self):
        """Two jobs to a thread, this one doing the first two; each job's own error."""
        from twisted_mta.spool.store import JOBS_PER_THREAD, _GroupSync
        folder = Path(self.mktemp())
        folder.mkdir()
        sync = _GroupSync(None, inline=True)
        self.addCleanup(sync.stop)
        handed = record_submits(sync._workers)
        ran = []

        def job(n):
            def run():
                ran.append(n)
                if n == 3:
                    raise OSError(28, "No space left on device")
            return run
        sync._running = True
        ds = [sync.submit(job(n), folder) for n in range(5)]
        sync._running = False
        sync._start()
        self.assertEqual(JOBS_PER_THREAD, 2)
        self.assertEqual([len(jobs) for _, (jobs,) in handed], [2, 1])  # 2-3 and 4; 0-1 here
        self.assertEqual(sorted(ran), [0, 1, 2, 3, 4])
        for n, d in enumerate(ds):
            if n == 3:
                self.assertEqual(self.failureResultOf(d, OSError).value.errno, 28)
            else:
                self.assertIsNone(self.successResultOf(d))


class CommitWaitTests(unittest.SynchronousTestCase):
    """A batch waits, up to COMMIT_WAIT, for the messages still being received."""

    def setUp(self) -> None:
        from twisted_mta.spool.store import _GroupSync
        self.clock = Clock()
        self.expected = 0
        self.sync = _GroupSync(self.clock, expected=lambda: self.expected)
        self.addCleanup(self.sync.stop)
        self.started: list[int] = []

        def start():  # what would go to the batch thread, recorded instead
            self.started.append(len(self.sync._pending))
            self.sync._pending = []
        self.sync._start = start

    def submit(self) -> None:
        self.sync.submit(lambda: None, None)

    def test_nothing_expected_starts_at_once(self) -> None:
        self.submit()
        self.assertEqual(self.started, [1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waits_up_to_commit_wait(self) -> None:
        from twisted_mta.spool.store import COMMIT_WAIT
        self.expected = 1
        self.submit()
        self.assertEqual(self.started, [])
        self.clock.advance(COMMIT_WAIT * 0.9)
        self.assertEqual(self.started, [])
        self.clock.advance(COMMIT_WAIT * 0.1)
        self.assertEqual(self.started, [1])

    def test_starts_when_the_expected_have_come(self) -> None:
        self.expected = 2
        self.submit()
        self.expected = 1
        self.submit()
        self.assertEqual(self.started, [])
        self.expected = 0
        self.submit()
        self.assertEqual(self.started, [3])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_poke_when_one_expected_is_dropped(self) -> None:
        self.expected = 1
        self.submit()
        self.expected = 0
        self.sync.poke()
        self.assertEqual(self.started, [1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_wait_while_a_batch_runs(self) -> None:
        """What comes while a batch runs waits for that batch, not for the timer."""
        self.expected = 1
        self.sync._running = True
        self.submit()
        self.assertEqual((self.started, self.clock.getDelayedCalls()), ([], []))

    def test_stop_starts_the_waiting_batch(self) -> None:
        self.expected = 1
        self.submit()
        self.sync.stop()
        self.assertEqual(self.started, [1])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_spool_counts_the_messages_being_received(self) -> None:
        """Made by new_message, no longer awaited once committed or aborted."""
        clock = Clock()
        clock.callFromThread = lambda f, *a, **kw: None
        spool = Spool(self.mktemp(), reactor=clock)
        spool.prepare()
        self.addCleanup(spool.stop)
        started = []
        spool._sync._start = lambda: (started.append(len(spool._sync._pending)),
                                      setattr(spool._sync, "_pending", []))
        first, second, third = spool.new_message(), spool.new_message(), spool.new_message()
        self.assertEqual(spool._receiving, 3)
        spool.commit(first, entry_for(first))
        self.assertEqual((spool._receiving, started), (2, []))
        second.abort()
        self.assertEqual((spool._receiving, started), (1, []))
        spool.commit(third, entry_for(third))
        self.assertEqual((spool._receiving, started), (0, [2]))
        second.abort()  # twice: counted once
        self.assertEqual(spool._receiving, 0)


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
