"""
twisted_mta.logs: the observer given to twistd writes the same lines as
twistd's own (C{textFileLogObserver}), where twistd would have written
them.
"""

from __future__ import annotations

import ast
import io
import os
import signal
import string
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.application import service
from twisted.logger import (FileLogObserver, ILogObserver, LogLevel, LogPublisher, eventAsJSON,
                            eventFromJSON, formatTime, timeFormatRFC3339)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial import unittest

from tests import e2e_support as e2e
from twisted_mta import logs

T = 1795950941.25  # a time in the middle of a second


def event(fmt, **fields):
    """An event as C{Logger().info(fmt, **fields)} makes it."""
    fields.setdefault("log_level", LogLevel.info)
    fields.setdefault("log_namespace", "twisted_mta.test")
    fields.setdefault("log_time", T)
    fields.setdefault("log_source", None)
    fields["log_format"] = fmt
    return fields


class Formats:
    """Values with each way formatting them can go."""

    class Raises:
        def __format__(self, spec):
            raise ValueError("no format")

        def __repr__(self):
            raise ValueError("no repr")

        __str__ = __repr__

    class Attr:
        x = "attribute"

        def __str__(self):
            return "str of Attr"


class FormatEventTests(unittest.TestCase):
    """L{logs.format_event} gives what Twisted's own formatting gives."""

    def same(self, e):
        # Each its own copy: formatting must not depend on what the other did.
        expected = logs.classic_format(dict(e))
        self.assertEqual(logs.format_event(dict(e)), expected)
        return expected

    def test_plain(self):
        line = self.same(event("connect from [{ip}]:{port} session={sid}",
                               ip="127.0.0.1", port=4000, sid=7))
        self.assertEqual(line, formatTime(T, timeFormatRFC3339) + " [twisted_mta.test#info] "
                         "connect from [127.0.0.1]:4000 session=7\n")

    def test_conversions_and_specs(self):
        for fmt in ("{x!r}", "{x!s}", "{x!a}", "{x:>12}", "{x!r:>30}", "{n:.0f} s", "{n:5}",
                    "{{literal}} {x}", "{x}{x}", "ünïcödé {x}"):
            self.same(event(fmt, x="é\x00'\"", n=2.5))

    def test_what_goes_to_twisted(self):
        """Calls, attributes, indexes, positional and nested fields, errors."""
        def f():
            return "called"
        for fmt in ("{f()}", "{a.x}", "{l[0]}", "{d[k]}", "{0}", "{}", "{x:{w}}", "{", "}",
                    "{missing}", "{bad}", "{bad!r}", "{x!z}", "{a.__class__}"):
            self.same(event(fmt, f=f, a=Formats.Attr(), l=["zero"], d={"k": "v"}, x="x", w=5,
                            bad=Formats.Raises()))

    def test_format_types(self):
        for fmt in (b"bytes {x}", None, "", 42, "é".encode()):
            self.same(event(fmt, x="x"))
        self.assertIsNone(logs.format_event(event("")))
        self.assertIsNone(logs.format_event(event(None)))

    def test_newlines(self):
        line = self.same(event("one\ntwo {x}", x="three\nfour"))
        self.assertEqual(line.count("\n\t"), 2)

    def test_system(self):
        self.same(event("{x}", x=1, log_system="receiver-1"))
        self.same(event("{x}", x=1, log_system=12))
        self.same(event("{x}", x=1, log_system=Formats.Raises()))
        self.same(event("{x}", x=1, log_system=None))
        e = event("{x}", x=1)
        del e["log_level"], e["log_namespace"]
        self.same(e)

    def test_failure(self):
        try:
            1 / 0
        except ZeroDivisionError:
            f = Failure()
        self.assertIn("ZeroDivisionError", self.same(event("it failed: {x}", x=1, log_failure=f)))

    def test_flattened(self):
        """An event that went through JSON (as jsonFileLogObserver writes it)."""
        e = eventFromJSON(eventAsJSON(event("{x} and {y!r}", x=1, y="two")))
        self.assertIn("log_flattened", e)
        self.same(e)

    def test_legacy(self):
        """An event of twisted.python.log.msg, as twistd's observers get it."""
        got = []
        new = LogPublisher(got.append)
        publisher = legacy_log.LogPublisher(observerPublisher=new, publishPublisher=new)
        publisher.msg("(TCP Port 25 Closed)", system="-")
        publisher.msg("two", "parts")
        self.assertEqual(len(got), 2)
        for e in got:
            self.same(e)

    def test_times(self):
        """Around second boundaries, and without a time."""
        for when in (T, 0.0, 1.0, 1.9999994, 1.9999995, 1.9999999, 2.0, 1795950941,
                     1795950941.9999996, None, -1.5):
            with self.subTest(when=when):
                self.same(event("{x}", x=1, log_time=when))

    def test_times_across_an_offset_change(self):
        """Each second's text is right where the local UTC offset changes."""
        old = os.environ.get("TZ")

        def restore():
            if old is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = old
            time.tzset()
        self.addCleanup(restore)
        if not Path("/usr/share/zoneinfo/Europe/Paris").exists():
            raise unittest.SkipTest("no time zone data")
        os.environ["TZ"] = "Europe/Paris"
        time.tzset()
        change = 1806195600  # 2027-03-28T01:00:00Z: Paris goes from +0100 to +0200
        self.assertNotEqual(formatTime(change - 1)[-5:], formatTime(change)[-5:])
        for when in (change - 1.5, change - 0.5, change - 0.0000001, change, change + 0.5):
            self.same(event("{x}", x=1, log_time=when))

    def test_every_format_of_the_server(self):
        """
        Each log format in twisted_mta gives Twisted's line, with text,
        numbers and None for its fields.
        """
        formats = set()
        package = Path(logs.__file__).parent
        for path in package.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("debug", "info", "warn", "error", "critical",
                                               "failure", "emit")
                        and node.args):
                    arg = node.args[1] if node.func.attr == "emit" and len(node.args) > 1 \
                        else node.args[0]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        formats.add(arg.value)
        self.assertGreater(len(formats), 40)
        for fmt in sorted(formats):
            names = [(name, spec) for _, name, spec, _ in string.Formatter().parse(fmt)
                     if name is not None]
            for value in ("text ü", 3, None):
                fields = {name: (2.5 if spec else value) for name, spec in names}
                with self.subTest(fmt=fmt, value=value):
                    self.same(event(fmt, **fields))

    def test_plain_formats_are_cached(self):
        logs._plain.cache_clear()
        for i in range(3):
            logs.format_event(event("{x}", x=i))
        self.assertEqual(logs._plain.cache_info().hits, 2)


class FakeReactor:
    def callFromThread(self, f, *args):
        f(*args)


class ObserverForTwistdTests(unittest.TestCase):
    """Where twistd would log, and where the choice is left to twistd."""

    def setUp(self):
        self.reactor = FakeReactor()
        old = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, old)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir()

    def options(self, **kw):
        base = {"logfile": None, "logger": None, "syslog": False, "prefix": "twisted",
                "nodaemon": False, "debug": False}
        base.update(kw)
        return base

    def make(self, **kw):
        observer = logs.observer_for_twistd(self.options(**kw), self.reactor)
        if observer is not None:
            self.assertIsInstance(observer, FileLogObserver)
            self.assertIs(observer.formatEvent, logs.format_event)
            if isinstance(observer._outFile, LogFile):
                self.addCleanup(observer._outFile.close)
        return observer

    def test_left_to_twistd(self):
        for kw in ({"logger": "some.module.observer"}, {"syslog": True}, {"debug": True},
                   {"logfile": "-"}, {"logger": "x", "logfile": "f", "nodaemon": True}):
            with self.subTest(**kw):
                self.assertIsNone(self.make(**kw))
        self.assertIsNone(logs.observer_for_twistd(None, self.reactor))
        self.patch(logs.platform, "getType", lambda: "win32")
        self.assertIsNone(self.make(logfile=str(self.folder / "f.log")))

    def test_stdout(self):
        for kw in ({"nodaemon": True}, {"nodaemon": True, "logfile": "-"}):
            with self.subTest(**kw):
                self.assertIs(self.make(**kw)._outFile, sys.stdout)
        self.assertIs(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)

    def test_logfile(self):
        path = self.folder / "mta.log"
        observer = self.make(logfile=str(path), nodaemon=True)
        self.assertIsInstance(observer._outFile, LogFile)
        self.assertEqual(observer._outFile.path, str(path))
        observer(event("line {i}", i=0))
        self.assertEqual(path.read_text(), logs.classic_format(event("line {i}", i=0)))

    def test_daemon_default(self):
        """A daemon without --logfile logs to twistd.log in its folder."""
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.folder)
        observer = self.make()
        self.assertEqual(observer._outFile.path, str(self.folder / "twistd.log"))

    def test_sigusr1(self):
        """SIGUSR1 rotates the file, as twistd's; unless SIGUSR1 had a handler."""
        observer = self.make(logfile=str(self.folder / "mta.log"))
        observer(event("line {i}", i=0))
        os.kill(os.getpid(), signal.SIGUSR1)
        self.assertEqual((self.folder / "mta.log.1").read_text(),
                         logs.classic_format(event("line {i}", i=0)))

        def mine(signum, frame):
            pass
        signal.signal(signal.SIGUSR1, mine)
        self.make(logfile=str(self.folder / "other.log"))
        self.assertIs(signal.getsignal(signal.SIGUSR1), mine)


class InstallTests(unittest.TestCase):
    def setUp(self):
        old = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, old)
        self.reactor = FakeReactor()
        self.options = {"nodaemon": True, "logfile": None}

    def test_component(self):
        application = service.Application("mta")
        observer = logs.install(application, self.options, self.reactor)
        self.assertIsInstance(observer, FileLogObserver)
        self.assertIs(application.getComponent(ILogObserver), observer)

    def test_not_under_twistd(self):
        application = service.Application("mta")
        self.assertIsNone(logs.install(application, None, self.reactor))
        self.assertIsNone(application.getComponent(ILogObserver, None))
        self.assertIsNone(logs.install(service.MultiService(), self.options, self.reactor))

    def test_application_has_one(self):
        for interface in (ILogObserver, legacy_log.ILogObserver):
            application = service.Application("mta")
            theirs = FileLogObserver(io.StringIO(), logs.classic_format)
            application.setComponent(interface, theirs)
            self.assertIsNone(logs.install(application, self.options, self.reactor))
            self.assertIs(application.getComponent(interface), theirs)


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from twisted.application import service
    from twisted.internet import reactor
    from twisted.logger import Logger
    from twisted.python import log as legacy_log
    from twisted.python.failure import Failure
    from twisted.scripts._twistd_unix import ServerOptions, UnixAppLogger
    from twisted_mta import logs

    config = ServerOptions()
    config.parseOptions(sys.argv[2:])
    application = service.Application("mta")
    if sys.argv[1] == "ours":
        logs.install(application, config)
    applogger = UnixAppLogger(config)
    applogger.start(application)
    print("observer:", applogger._observer.formatEvent.__qualname__, file=sys.__stderr__)
    log = Logger(namespace="twisted_mta.smtp.server")

    def run():
        for i in range(3):
            log.info("{id}: to=<{rcpt}> reply={reply!r}", id=i, rcpt="b@example.test", reply="250 ok")
        legacy_log.msg("a legacy line")
        reactor.callLater(0, rotate)

    def rotate():
        log.info("before rotation")
        os.kill(os.getpid(), signal.SIGUSR1)
        reactor.callLater(0.05, end)

    def end():
        log.info("after rotation")
        log.failure("it failed", failure=Failure(ValueError("v")))
        reactor.callLater(0, reactor.stop)

    reactor.callWhenRunning(run)
    reactor.run()
    applogger.stop()
""")


class TwistdTests(unittest.TestCase):
    """
    twistd's own C{UnixAppLogger}, given the application, logs to ours,
    which writes the lines twistd's would, and rotates on SIGUSR1.
    """

    def run_logger(self, which, *options):
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT, which, *options, f"--logfile={folder / 'twistd.log'}"],
            cwd=folder, env=e2e.ServerProcess.environment(), capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        return folder, result.stderr.decode()

    @staticmethod
    def lines(path: Path) -> list[str]:
        # Without the time stamps, which differ between the two runs.
        return [line[25:] if line[:4].isdigit() else line
                for line in path.read_text().splitlines()]

    def test_same_lines(self):
        theirs, err = self.run_logger("twistd", "-n")
        self.assertIn("observer: textFileLogObserver.<locals>.formatEvent", err)
        ours, err = self.run_logger("ours", "-n")
        self.assertIn("observer: format_event", err)
        for name in ("twistd.log.1", "twistd.log"):
            with self.subTest(name=name):
                self.assertEqual(self.lines(ours / name), self.lines(theirs / name))
        self.assertIn("[twisted_mta.smtp.server#info] 0: to=<b@example.test> reply='250 ok'",
                      self.lines(ours / "twistd.log.1"))
        self.assertEqual(self.lines(ours / "twistd.log.1")[-1],
                         "[twisted_mta.smtp.server#info] before rotation")
        self.assertEqual(self.lines(ours / "twistd.log")[-1],
                         "[twisted.scripts._twistd_unix.UnixAppLogger#info] Server Shut Down.")
