"""
C{spool_sync = "filesystem"}: one syncfs(2) per batch instead of an
fdatasync per file and a folder fsync.
"""

from __future__ import annotations

import os
import smtplib
import tomllib
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests.e2e_support import LOCAL_DOMAIN, Site, in_thread, start_in_process, wait_for
from twisted_mta import config as configmod
from twisted_mta.spool import store
from twisted_mta.spool.entry import QueueEntry, RecipientState
from twisted_mta.spool.store import Spool


def _entry(incoming) -> QueueEntry:
    return QueueEntry(incoming.id, "a@example.org", [RecipientState("b@example.org")], 0.0)


class SyncModeTests(unittest.TestCase):
    def setUp(self):
        self.calls = []
        real_syncfs = store.syncfs
        self.patch(store, "syncfs", lambda fd: (self.calls.append("syncfs"), real_syncfs(fd)))
        real_fdatasync = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (self.calls.append("fdatasync"),
                                                real_fdatasync(fd)))

    def spool(self, sync: str) -> Spool:
        spool = Spool(self.mktemp(), inline=True, sync=sync)
        spool.prepare()
        self.addCleanup(spool.stop)
        return spool

    def commit_and_save(self, spool: Spool) -> QueueEntry:
        incoming = spool.new_message()
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        entry = _entry(incoming)
        self.successResultOf(spool.commit(incoming, entry))
        entry.recipients[0].attempts = 1
        self.successResultOf(spool.save(entry))
        return entry

    def test_filesystem_mode_one_syncfs_per_batch(self):
        spool = self.spool("filesystem")
        entry = self.commit_and_save(spool)
        self.assertEqual(self.calls, ["syncfs", "syncfs"])  # the commit's batch, the save's
        self.assertEqual(spool.load(entry.id).recipients[0].attempts, 1)

    def test_filesystem_mode_jobs_all_in_the_batch_thread(self):
        """No sync of their own to overlap: a batch's jobs are not handed to other threads."""
        from tests.test_spool import record_submits
        spool = self.spool("filesystem")
        handed = record_submits(spool._sync._workers)
        sync = spool._sync
        sync._running = True  # five jobs in one batch
        commits = []
        for _ in range(5):
            incoming = spool.new_message()
            incoming.write(b"Subject: x\r\n\r\nbody\r\n")
            commits.append(spool.commit(incoming, _entry(incoming)))
        sync._running = False
        sync._start()
        for d in commits:
            self.successResultOf(d)
        self.assertEqual(handed, [])
        self.assertEqual(self.calls, ["syncfs"])

    def test_file_mode_fdatasync_per_file(self):
        self.commit_and_save(self.spool("file"))
        self.assertEqual(self.calls, ["fdatasync", "fdatasync"])

    def test_a_failed_syncfs_fails_the_commit(self):
        def broken(fd):
            raise OSError(5, "Input/output error")
        self.patch(store, "syncfs", broken)
        spool = self.spool("filesystem")
        incoming = spool.new_message()
        incoming.write(b"x\r\n")
        failure = self.failureResultOf(spool.commit(incoming, _entry(incoming)), OSError)
        self.assertIn("Input/output error", str(failure.value))
        self.flushLoggedErrors(OSError)

    def test_bad_mode(self):
        with self.assertRaises(ValueError):
            Spool(self.mktemp(), inline=True, sync="sometimes")

    def test_syncfs_really_runs(self):
        if not store.syncfs_available():
            raise unittest.SkipTest("no syncfs(2) here")
        fd = os.open(".", os.O_RDONLY)
        try:
            store.syncfs(fd)  # raises OSError if the call fails
        finally:
            os.close(fd)


class ConfigTests(unittest.TestCase):
    def parse(self, text: str):
        return configmod.parse(tomllib.loads(text + '\n[[listen]]\nendpoint = "tcp:2525"\n'),
                               "mta.toml", Path("/tmp"))

    def test_default_and_value(self):
        self.assertEqual(self.parse("").spool_sync, "file")
        if store.syncfs_available():
            self.assertEqual(self.parse('spool_sync = "filesystem"').spool_sync, "filesystem")

    def test_bad_value(self):
        with self.assertRaises(configmod.ConfigError) as e:
            self.parse('spool_sync = "always"')
        self.assertIn('mta.toml: spool_sync: expected one of file, filesystem, got "always"',
                      str(e.exception))

    def test_without_syncfs(self):
        self.patch(store, "_syncfs", None)
        with self.assertRaises(configmod.ConfigError) as e:
            self.parse('spool_sync = "filesystem"')
        self.assertIn("spool_sync: syncfs(2) is not available", str(e.exception))


class EndToEndTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_mail_accepted_and_delivered(self):
        if not store.syncfs_available():
            raise unittest.SkipTest("no syncfs(2) here")
        site = Site(self.mktemp())
        site.config_path.write_text('spool_sync = "filesystem"\n' + site.config_path.read_text())
        mta = start_in_process(self, site)
        self.assertEqual(mta.config.spool_sync, "filesystem")
        rcpt = f"joe@{LOCAL_DOMAIN}"

        def send():
            with smtplib.SMTP("127.0.0.1", site.port(), timeout=30) as client:
                client.starttls(context=site.client_context())
                for i in range(5):
                    client.sendmail("a@example.org", [rcpt], b"Subject: %d\r\n\r\nhi\r\n" % i)

        yield in_thread(send)
        yield wait_for(lambda: len(site.delivered(rcpt)) == 5, "5 deliveries")
