"""
The C{twisted-mta} queue, reload and plugins commands, run as
subprocesses (C{python -m twisted_mta.cli}) against the real service
running in the test's reactor, and offline against a spool folder.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from twisted_mta import cli
from twisted_mta.spool.store import Spool
from tests.test_control import TAGGER, Server, short_folder, some_messages, write_config


class CLIMixin:
    def setUpFolder(self, filters=""):
        self.folder = short_folder(self)
        self.config = write_config(self.folder, filters=filters)
        self.entries = some_messages(self.folder / "spool")
        self.ids = [e.id for e in self.entries]

    @defer.inlineCallbacks
    def cli(self, *args, config=True):
        """Run the command; fires with (stdout, stderr, exit code) as text."""
        argv = ["-m", "twisted_mta.cli", *args]
        if config:
            argv += ["--config", str(self.config)]
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, argv, env=os.environ, path=str(self.folder))
        return out.decode(), err.decode(), code

    def assertFailedWith(self, result, line):
        out, err, code = result
        self.assertEqual((out, err, code), ("", f"twisted-mta: {line}\n", 1))


class LiveTests(CLIMixin, unittest.TestCase):
    """The server runs in this process; the command talks to it over the control socket."""

    def setUp(self):
        self.setUpFolder(filters='[[filter]]\nuse = "tagger:Tagger"')
        (self.folder / "plugins" / "tagger.py").write_text(TAGGER)
        self.server = Server(self, self.config)
        self.mta = self.server.mta

    @defer.inlineCallbacks
    def test_list(self):
        out, err, code = yield self.cli("queue", "list")
        self.assertEqual((err, code), ("", 0))
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("-Queue ID-"))
        self.assertEqual(lines[-1], "-- 1 Kbytes in 3 Requests.")
        self.assertTrue(lines[1].startswith(self.ids[0] + " "))
        self.assertIn("sender@example.test", lines[1])
        self.assertIn("user@remote.test  [pending]", lines[2])
        text = "\n".join(lines)
        self.assertIn("x@remote.test  [deferred, 2 attempts, next try ", text)
        self.assertIn("(451 4.7.1 try later)", text)
        self.assertIn(self.ids[2] + "!", text)  # held

    @defer.inlineCallbacks
    def test_list_json(self):
        out, err, code = yield self.cli("queue", "list", "--json")
        self.assertEqual((err, code), ("", 0))
        listed = json.loads(out)
        self.assertEqual([e["id"] for e in listed], self.ids)
        self.assertEqual(listed[1]["recipients"][0],
                         {"address": "x@remote.test", "state": "deferred", "attempts": 2,
                          "next_try": self.entries[1].recipients[0].next_try,
                          "last_reply": "451 4.7.1 try later"})
        self.assertEqual([e["held"] for e in listed], [False, False, True])

    @defer.inlineCallbacks
    def test_list_empty(self):
        for queue_id in self.ids:
            yield self.mta.delivery.delete(queue_id)
        out, err, code = yield self.cli("queue", "list")
        self.assertEqual((out, err, code), ("Mail queue is empty\n", "", 0))
        out, err, code = yield self.cli("queue", "list", "--json")
        self.assertEqual((json.loads(out), err, code), ([], "", 0))

    @defer.inlineCallbacks
    def test_show(self):
        out, err, code = yield self.cli("queue", "show", self.ids[1])
        self.assertEqual((err, code), ("", 0))
        self.assertIn(f"id:         {self.ids[1]}\n", out)
        self.assertIn("sender:     <>\n", out)
        self.assertIn("status:     queued\n", out)
        self.assertTrue(out.endswith("\nSubject: hello\nFrom: a@example.test\n"), out)
        out, err, code = yield self.cli("queue", "show", "--json", self.ids[2])
        shown = json.loads(out)
        self.assertEqual((shown["id"], shown["held"]), (self.ids[2], True))
        self.assertEqual(shown["headers"], "Subject: hello\nFrom: a@example.test\n")

    @defer.inlineCallbacks
    def test_show_unknown(self):
        self.assertFailedWith((yield self.cli("queue", "show", "NOSUCH")),
                              "no such message: NOSUCH")

    @defer.inlineCallbacks
    def test_flush(self):
        out, err, code = yield self.cli("queue", "flush", self.ids[1])
        self.assertEqual((out, err, code), (f"flushed: {self.ids[1]}\n", "", 0))
        self.assertEqual(self.mta.delivery.entries[self.ids[1]].recipients[0].next_try, 0.0)

    @defer.inlineCallbacks
    def test_flush_domain_and_all(self):
        out, err, code = yield self.cli("queue", "flush", "--domain", "remote.test")
        self.assertEqual((out, code), (f"flushed: {self.ids[0]}\nflushed: {self.ids[1]}\n", 0))
        out, err, code = yield self.cli("queue", "flush", "--domain", "nowhere.test")
        self.assertEqual((out, err, code), ("", "twisted-mta: nothing to flush\n", 0))
        out, err, code = yield self.cli("queue", "flush")
        self.assertEqual((out, code), (f"flushed: {self.ids[0]}\nflushed: {self.ids[1]}\n", 0))

    @defer.inlineCallbacks
    def test_flush_errors(self):
        self.assertFailedWith((yield self.cli("queue", "flush", "NOSUCH")),
                              "no such message: NOSUCH")
        self.assertFailedWith((yield self.cli("queue", "flush", self.ids[2])),
                              f"{self.ids[2]} is on hold; release it to deliver it")
        self.assertFailedWith((yield self.cli("queue", "flush", self.ids[0], "--domain", "x.test")),
                              "queue flush: give a message id or --domain, not both")

    @defer.inlineCallbacks
    def test_flush_leaves_held_messages_alone(self):
        """
        As C{postqueue -f} leaves the hold queue alone: a flush while a
        message is held does not make it due, so releasing it later keeps
        its retry time.
        """
        deferred = self.ids[1]
        next_try = self.mta.delivery.entries[deferred].next_try
        self.assertGreater(next_try, time.time())
        yield self.cli("queue", "hold", deferred)
        out, err, code = yield self.cli("queue", "flush", "--domain", "remote.test")
        self.assertEqual((out, code), (f"flushed: {self.ids[0]}\n", 0))
        out, err, code = yield self.cli("queue", "flush")
        self.assertEqual((out, code), (f"flushed: {self.ids[0]}\n", 0))
        yield self.cli("queue", "release", deferred)
        self.assertEqual(self.mta.delivery.entries[deferred].next_try, next_try)

    @defer.inlineCallbacks
    def test_delete(self):
        out, err, code = yield self.cli("queue", "delete", self.ids[0])
        self.assertEqual((out, err, code), (f"deleted: {self.ids[0]}\n", "", 0))
        self.assertNotIn(self.ids[0], self.mta.delivery.entries)
        self.assertFalse((self.folder / "spool" / "queue" / self.ids[0]).exists())
        self.assertFailedWith((yield self.cli("queue", "delete", self.ids[0])),
                              f"no such message: {self.ids[0]}")

    @defer.inlineCallbacks
    def test_hold_release(self):
        out, err, code = yield self.cli("queue", "hold", self.ids[0])
        self.assertEqual((out, err, code), (f"held: {self.ids[0]}\n", "", 0))
        self.assertTrue(Spool(self.folder / "spool", inline=True).load(self.ids[0]).held)
        out, err, code = yield self.cli("queue", "list", "--json")
        self.assertTrue(json.loads(out)[0]["held"])
        out, err, code = yield self.cli("queue", "release", self.ids[0])
        self.assertEqual((out, err, code), (f"released: {self.ids[0]}\n", "", 0))
        self.assertFalse(Spool(self.folder / "spool", inline=True).load(self.ids[0]).held)
        for command in ("hold", "release"):
            self.assertFailedWith((yield self.cli("queue", command, "NOSUCH")),
                                  "no such message: NOSUCH")

    @defer.inlineCallbacks
    def test_reload(self):
        out, err, code = yield self.cli("reload")
        self.assertEqual((out, err, code), ("reloaded: generation 2\n", "", 0))
        (self.folder / "plugins" / "tagger.py").write_text("def broken(:\n")
        out, err, code = yield self.cli("reload")
        self.assertEqual((out, code), ("", 1))
        self.assertTrue(err.startswith("twisted-mta: reload refused: "), err)
        self.assertIn("tagger", err)
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(self.mta.pipeline.generation, 2)

    @defer.inlineCallbacks
    def test_plugins(self):
        out, err, code = yield self.cli("plugins")
        self.assertEqual((err, code), ("", 0))
        self.assertEqual(out.splitlines()[0], "generation 1")
        self.assertIn("  1. tagger:Tagger  hooks: mail, data  timeout: 30 s\n", out)
        self.assertIn(f"     from {self.folder / 'plugins' / 'tagger.py'}\n", out)
        out, err, code = yield self.cli("plugins", "--json")
        self.assertEqual([f["name"] for f in json.loads(out)["filters"]], ["tagger:Tagger"])

    @defer.inlineCallbacks
    def test_config_before_the_subcommand(self):
        out, err, code = yield self.cli("--config", str(self.config), "queue", "list", "--json",
                                        config=False)
        self.assertEqual((len(json.loads(out)), err, code), (3, "", 0))

    @defer.inlineCallbacks
    def test_default_config_is_mta_toml_here(self):
        out, err, code = yield self.cli("queue", "list", "--json", config=False)
        self.assertEqual((len(json.loads(out)), err, code), (3, "", 0))


class OfflineTests(CLIMixin, unittest.TestCase):
    """No server: the queue is read from the spool folder; changes are refused."""

    def setUp(self):
        self.setUpFolder()
        self.socket = self.folder / "spool" / "control.sock"
        self.not_running = (f"the server is not running (control socket {self.socket}: "
                            "no such socket)")

    @defer.inlineCallbacks
    def test_list(self):
        out, err, code = yield self.cli("queue", "list")
        self.assertEqual(code, 0)
        self.assertEqual(err, f"twisted-mta: {self.not_running}; read the spool folder "
                              f"{self.folder / 'spool'} instead (read-only)\n")
        self.assertIn(self.ids[0] + " ", out)
        self.assertIn(self.ids[2] + "!", out)
        self.assertTrue(out.endswith("-- 1 Kbytes in 3 Requests.\n"))

    @defer.inlineCallbacks
    def test_list_json(self):
        out, err, code = yield self.cli("queue", "list", "--json")
        self.assertEqual(code, 0)
        listed = json.loads(out)
        self.assertEqual([e["id"] for e in listed], self.ids)
        self.assertEqual(listed[1]["last_reply"], "451 4.7.1 try later")
        self.assertEqual(err.count("\n"), 1)

    @defer.inlineCallbacks
    def test_list_with_a_stale_socket(self):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(self.socket))
        s.close()
        out, err, code = yield self.cli("queue", "list", "--json")
        self.assertEqual((len(json.loads(out)), code), (3, 0))
        self.assertIn(f"control socket {self.socket}: connection refused", err)

    @defer.inlineCallbacks
    def test_list_without_a_spool(self):
        import shutil
        shutil.rmtree(self.folder / "spool")
        out, err, code = yield self.cli("queue", "list")
        self.assertEqual((out, code), ("Mail queue is empty\n", 0))

    @defer.inlineCallbacks
    def test_show(self):
        out, err, code = yield self.cli("queue", "show", "--json", self.ids[1])
        self.assertEqual(code, 0)
        shown = json.loads(out)
        self.assertEqual((shown["id"], shown["sender"]), (self.ids[1], ""))
        self.assertEqual(shown["headers"], "Subject: hello\nFrom: a@example.test\n")
        self.assertEqual(err.count("\n"), 1)

    @defer.inlineCallbacks
    def test_show_unknown(self):
        self.assertFailedWith(
            (yield self.cli("queue", "show", "NOSUCH")),
            f"no such message: NOSUCH (the server is not running; looked in the spool folder "
            f"{self.folder / 'spool'})")
        self.assertFailedWith(
            (yield self.cli("queue", "show", "../mta.toml")),
            "no such message: ../mta.toml")

    @defer.inlineCallbacks
    def test_changes_need_the_server(self):
        for args in (("queue", "flush"), ("queue", "flush", self.ids[0]),
                     ("queue", "delete", self.ids[0]), ("queue", "hold", self.ids[0]),
                     ("queue", "release", self.ids[2]), ("reload",), ("plugins",)):
            self.assertFailedWith((yield self.cli(*args)), self.not_running)
        self.assertTrue((self.folder / "spool" / "queue" / self.ids[0]).exists())

    @defer.inlineCallbacks
    def test_missing_config(self):
        out, err, code = yield self.cli("queue", "list", "--config", "nope.toml", config=False)
        self.assertEqual((out, code), ("", 1))
        self.assertEqual(err, "twisted-mta: nope.toml: no such file\n")


class FormatTests(unittest.TestCase):
    def test_queue_marks(self):
        entry = {"id": "ABC", "sender": "", "size": 2048, "arrival": time.time(), "held": False,
                 "active": True, "recipients": [
                     {"address": "a@b.test", "state": "pending", "attempts": 0,
                      "next_try": None, "last_reply": None}]}
        text = cli.format_queue([entry])
        self.assertIn("ABC*", text)
        self.assertIn("  <>\n", text)
        self.assertTrue(text.endswith("-- 2 Kbytes in 1 Request.\n"))


class PasswdTests(unittest.TestCase):
    """C{passwd} is handed to C{twisted_mta.users.passwd}."""

    def test_wired(self):
        from twisted_mta import users

        calls = []
        self.patch(users, "passwd",
                   lambda config_path, name, stdin: calls.append((config_path, name, stdin)) or 0)
        self.assertEqual(cli.main(["passwd", "alice", "--stdin", "--config", "x.toml"]), 0)
        self.assertEqual(cli.main(["passwd", "bob"]), 0)
        self.assertEqual(calls, [("x.toml", "alice", True), ("mta.toml", "bob", False)])
