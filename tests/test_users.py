"""
Tests for L{twisted_mta.users}: the scrypt hashes, the users file and its
errors, the twisted.cred checker, and C{twisted-mta passwd}.
"""

from __future__ import annotations

import io
import os
import stat
import sys
import threading
from pathlib import Path

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import maybeDeferred
from twisted.trial import unittest

from twisted_mta import users
from twisted_mta.users import (
    ScryptHash, UsersFileChecker, UsersFileError, hash_password, parse_users, passwd,
    read_users, verify_password,
)

FAST = {"n": 16, "r": 1, "p": 1}


def inline(f, *args, **kwargs):
    return maybeDeferred(f, *args, **kwargs)


class HashTests(unittest.TestCase):
    def test_round_trip(self):
        h = hash_password("s3cret")
        self.assertTrue(h.startswith("$scrypt$n=16384,r=8,p=1$"))
        self.assertTrue(verify_password("s3cret", h))
        self.assertFalse(verify_password("s3cret ", h))
        self.assertFalse(verify_password("", h))

    def test_salted(self):
        """The same password hashes differently each time (a random salt per user)."""
        a, b = hash_password("same", **FAST), hash_password("same", **FAST)
        self.assertNotEqual(a, b)
        self.assertNotEqual(ScryptHash.parse(a).salt, ScryptHash.parse(b).salt)
        self.assertEqual(len(ScryptHash.parse(a).salt), 16)

    def test_parameters_kept(self):
        """The cost parameters are read back from the hash, so they can change later."""
        h = hash_password("pw", n=32, r=2, p=3)
        parsed = ScryptHash.parse(h)
        self.assertEqual((parsed.n, parsed.r, parsed.p), (32, 2, 3))
        self.assertTrue(parsed.verify("pw"))

    def test_unicode_normalized(self):
        """NFKC: a composed and a decomposed e-acute are the same password."""
        h = hash_password("caf\u00e9", **FAST)
        self.assertTrue(verify_password("cafe\u0301", h))
        self.assertTrue(verify_password("caf\u00e9".encode("utf-8"), h))

    def test_bad_hashes(self):
        for text, reason in [
            ("plaintext", "not a password hash"),
            ("$scrypt$n=16,r=1,p=1$!!$AAAA", "malformed"),
            ("$scrypt$n=15,r=1,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "power of 2"),
            ("$scrypt$n=2097152,r=1,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "power of 2"),
            ("$scrypt$n=16,r=0,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "r must"),
            ("$scrypt$n=16,r=1,p=99$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "p must"),
            ("$scrypt$n=16,r=1,p=1$AAAA$AAAAAAAAAAAAAAAAAAAAAA==", "too short"),
        ]:
            with self.assertRaises(ValueError, msg=text) as e:
                ScryptHash.parse(text)
            self.assertIn(reason, str(e.exception))


class FileTests(unittest.TestCase):
    def setUp(self):
        self.h = hash_password("pw", **FAST)

    def test_parse(self):
        text = (f"# comment\n\n  alice@example.test:{self.h}\n"
                f"scanner:{self.h}:Scans@Example.test, *@dept.example.test\n"
                f"app:{self.h}:*\nempty:{self.h}:\n")
        u = parse_users(text, "users")
        self.assertEqual(list(u), ["alice@example.test", "scanner", "app", "empty"])
        self.assertIsNone(u["alice@example.test"].senders)
        self.assertEqual(u["scanner"].senders, ("scans@example.test", "*@dept.example.test"))
        self.assertEqual(u["app"].senders, ("*",))
        self.assertEqual(u["empty"].senders, ())
        self.assertEqual(u["scanner"].line, 4)

    def test_errors(self):
        """Each bad line is refused as file:line: reason, and the hash never shown."""
        h = self.h
        cases = [
            ("alice", "expected name:hash"),
            (f"alice:{h}:a@b:c", "too many ':'"),
            (f":{h}", "empty user name"),
            (f"al ice:{h}", "white space"),
            ("bob:hunter2", "user 'bob': not a password hash"),
            (f"bob:{h}:not-an-address", "senders: not an address"),
            (f"bob:{h}:a*@example.test", "only '*@domain'"),
            (f"bob:{h}:*@*.example.test", "no '*' in the domain"),
        ]
        for line, reason in cases:
            with self.assertRaises(UsersFileError, msg=line) as e:
                parse_users(f"# first\n{line}\n", "/etc/mta/users")
            self.assertTrue(str(e.exception).startswith("/etc/mta/users:2: "), str(e.exception))
            self.assertIn(reason, str(e.exception))
            self.assertNotIn("hunter2", str(e.exception))
        with self.assertRaises(UsersFileError) as e:
            parse_users(f"bob:{h}\nbob:{h}\n", "users")
        self.assertEqual(str(e.exception), "users:2: user 'bob' again (first on line 1)")

    def test_read_errors(self):
        folder = Path(self.mktemp())
        folder.mkdir()
        with self.assertRaises(UsersFileError) as e:
            read_users(folder / "missing")
        self.assertIn("no such file", str(e.exception))
        bad = folder / "latin1"
        bad.write_bytes(b"# ok\nb\xe9b:x\n")
        with self.assertRaises(UsersFileError) as e:
            read_users(bad)
        self.assertEqual(str(e.exception), f"{bad}:2: not UTF-8")


class CheckerTests(unittest.TestCase):
    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.path = self.folder / "users"
        self.path.write_text(f"alice:{hash_password('pw', **FAST)}:a@example.test\n")
        os.chmod(self.path, 0o600)

    def check(self, checker, name, password):
        return checker.requestAvatarId(UsernamePassword(name, password))

    def test_ok(self):
        checker = UsersFileChecker(self.path, run=inline)
        self.assertEqual(self.successResultOf(self.check(checker, b"alice", b"pw")), "alice")

    def test_wrong(self):
        checker = UsersFileChecker(self.path, run=inline)
        self.failureResultOf(self.check(checker, b"alice", b"nope"), UnauthorizedLogin)
        self.failureResultOf(self.check(checker, b"nobody", b"pw"), UnauthorizedLogin)
        self.failureResultOf(self.check(checker, b"\xff", b"pw"), UnauthorizedLogin)
        self.failureResultOf(self.check(checker, b"alice", b"x" * 2000), UnauthorizedLogin)

    def test_unknown_name_costs_the_same(self):
        """An unknown name still runs one scrypt (against a dummy hash), off the reactor."""
        calls = []

        def run(f):
            calls.append(f)
            return maybeDeferred(f)

        checker = UsersFileChecker(self.path, run=run)
        self.failureResultOf(self.check(checker, b"nobody", b"pw"), UnauthorizedLogin)
        self.assertEqual(len(calls), 1)
        # ... against a hash with the parameters the file's users have.
        self.assertEqual((checker.dummy.n, checker.dummy.r, checker.dummy.p), (16, 1, 1))

    def test_in_a_thread(self):
        """By default the hash is checked in the reactor's thread pool, not its thread."""
        seen = []
        real = users.ScryptHash.verify

        def verify(self, password):
            seen.append(threading.current_thread())
            return real(self, password)

        self.patch(users.ScryptHash, "verify", verify)
        checker = UsersFileChecker(self.path)
        d = self.check(checker, b"alice", b"pw")

        def done(name):
            self.assertEqual(name, "alice")
            self.assertIsNot(seen[0], threading.main_thread())

        return d.addCallback(done)

    def test_senders(self):
        checker = UsersFileChecker(self.path, run=inline)
        self.assertEqual(checker.senders("alice"), ("a@example.test",))
        self.assertIsNone(checker.senders("nobody"))

    def test_reload(self):
        checker = UsersFileChecker(self.path, run=inline)
        self.path.write_text(f"bob:{hash_password('pw2', **FAST)}\n")
        self.assertEqual(checker.reload(), 1)
        self.assertEqual(self.successResultOf(self.check(checker, b"bob", b"pw2")), "bob")
        self.failureResultOf(self.check(checker, b"alice", b"pw"), UnauthorizedLogin)

    def test_reload_error_keeps_users(self):
        checker = UsersFileChecker(self.path, run=inline)
        self.path.write_text("# x\n# y\nbob:plain\n")
        with self.assertRaises(UsersFileError) as e:
            checker.reload()
        self.assertTrue(str(e.exception).startswith(f"{self.path}:3: user 'bob': "))
        self.assertEqual(self.successResultOf(self.check(checker, b"alice", b"pw")), "alice")

    def test_world_readable_warned(self):
        from twisted.logger import formatEvent, globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        os.chmod(self.path, 0o644)
        read_users(self.path)
        self.assertTrue(any("readable by everyone" in formatEvent(e) for e in events))


class PasswdTests(unittest.TestCase):
    """C{twisted-mta passwd NAME [--stdin]}."""

    def setUp(self):
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.config = self.folder / "mta.toml"
        self.config.write_text('hostname = "mx.example.test"\n[auth]\nusers = "users"\n')
        self.users = self.folder / "users"
        self.out, self.err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", self.out)
        self.patch(sys, "stderr", self.err)
        self.patch(users, "SCRYPT_N", 16)
        self.patch(users, "SCRYPT_R", 1)

    def run_passwd(self, name, stdin_text=None, prompts=None):
        if stdin_text is not None:
            self.patch(sys, "stdin", io.StringIO(stdin_text))
        if prompts is not None:
            answers = iter(prompts)
            self.patch(users.getpass, "getpass", lambda prompt="": next(answers))
        return passwd(str(self.config), name, stdin_text is not None)

    def test_add_from_stdin(self):
        self.assertEqual(self.run_passwd("alice@example.test", "s3cret\n"), 0)
        text = self.users.read_text()
        self.assertNotIn("s3cret", text)
        u = read_users(self.users)
        self.assertTrue(u["alice@example.test"].hash.verify("s3cret"))
        self.assertEqual(stat.S_IMODE(os.stat(self.users).st_mode), 0o600)
        self.assertIn("added alice@example.test", self.out.getvalue())

    def test_change_keeps_the_rest(self):
        """Changing a password keeps comments, other users and the user's senders."""
        other = hash_password("x", **FAST)
        self.users.write_text(f"# our users\nbob:{other}\n"
                              f"alice:{hash_password('old', **FAST)}:a@example.test\n")
        os.chmod(self.users, 0o640)
        self.assertEqual(self.run_passwd("alice", "new\r\n"), 0)
        lines = self.users.read_text().splitlines()
        self.assertEqual(lines[:2], ["# our users", f"bob:{other}"])
        self.assertTrue(lines[2].startswith("alice:$scrypt$") and lines[2].endswith(":a@example.test"))
        u = read_users(self.users)
        self.assertTrue(u["alice"].hash.verify("new"))
        self.assertFalse(u["alice"].hash.verify("old"))
        # The mode is kept (never more than for the group).
        self.assertEqual(stat.S_IMODE(os.stat(self.users).st_mode), 0o640)
        self.assertEqual([p.name for p in self.folder.iterdir() if p.name.startswith(".users")], [])

    def test_prompts_twice(self):
        self.assertEqual(self.run_passwd("bob", prompts=["pw", "pw"]), 0)
        self.assertTrue(read_users(self.users)["bob"].hash.verify("pw"))

    def test_prompts_differ(self):
        self.assertEqual(self.run_passwd("bob", prompts=["pw", "wp"]), 1)
        self.assertIn("do not match", self.err.getvalue())
        self.assertFalse(self.users.exists())

    def test_empty_password(self):
        self.assertEqual(self.run_passwd("bob", "\n"), 1)
        self.assertIn("empty password", self.err.getvalue())

    def test_bad_name(self):
        self.assertEqual(self.run_passwd("bo:b", "pw\n"), 1)
        self.assertEqual(self.run_passwd("", "pw\n"), 1)
        self.assertFalse(self.users.exists())

    def test_bad_existing_file(self):
        """A users file with a bad line is not touched: fix it first."""
        self.users.write_text("bob:plaintext\n")
        self.assertEqual(self.run_passwd("alice", "pw\n"), 1)
        self.assertIn(f"{self.users}:1: ", self.err.getvalue())
        self.assertEqual(self.users.read_text(), "bob:plaintext\n")

    def test_no_users_setting(self):
        self.config.write_text('hostname = "mx.example.test"\n')
        self.assertEqual(self.run_passwd("alice", "pw\n"), 1)
        self.assertIn("auth.users: not set", self.err.getvalue())

    def test_bad_config(self):
        self.config.write_text("hostname = \n")
        self.assertEqual(self.run_passwd("alice", "pw\n"), 1)
        self.assertIn("mta.toml", self.err.getvalue())
        self.assertEqual(len(self.err.getvalue().strip().splitlines()), 1)

    def test_cli(self):
        """Through the twisted-mta command line."""
        from twisted_mta import cli
        self.patch(sys, "stdin", io.StringIO("pw\n"))
        rc = cli.main(["passwd", "--config", str(self.config), "carol", "--stdin"])
        self.assertEqual(rc, 0)
        self.assertTrue(read_users(self.users)["carol"].hash.verify("pw"))
