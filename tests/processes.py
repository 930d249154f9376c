"""
Processes as the tests see them (from /proc), and the rule for a test
peer (Postfix, Dovecot) that cannot run here: skip, but fail under CI.
"""

from __future__ import annotations

import os
import shutil


def tool(name: str) -> str:
    """A system program's path (Debian puts the mail daemons in /usr/sbin)."""
    return shutil.which(name) or f"/usr/sbin/{name}"


def installed(name: str) -> bool:
    """Whether the system program C{name} is there (see L{tool})."""
    return os.path.exists(tool(name))


def alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


def _parents() -> dict[int, int]:
    """Every live process's parent."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                # "pid (comm) state ppid ...": comm may hold spaces.
                fields = stat[stat.rindex(b")") + 2:].split()
                if fields[0] != b"Z":
                    out[int(entry)] = int(fields[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def children(pid: int) -> list[int]:
    """The live processes whose parent is C{pid}."""
    return [child for child, parent in _parents().items() if parent == pid]


def descendants(root: int) -> list[int]:
    """C{root}'s live descendants, not C{root}."""
    parents = _parents()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child, parent in parents.items():
            if parent == pid:
                found.append(child)
                todo.append(child)
    return found


class LocalPeer:
    """
    What the Postfix and Dovecot test peers share: a private instance in
    C{self.folder}, with C{start} (raising C{RuntimeError} saying why it
    did not start) and C{stop}.
    """

    folder = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def started(self, testcase):
        """C{start}, stopped and removed at the end of C{testcase}."""
        testcase.addCleanup(self.cleanup)
        try:
            return self.start()
        except RuntimeError as e:
            testcase.fail(str(e))


def wait_files(testcase, files, n: int, what: str, log_tail=None):
    """
    Wait (L{tests.e2e_support.wait_for}) until C{files()} lists at least
    C{n}, and fire with them; on timeout, fail C{testcase} saying C{what}
    and, if given, C{log_tail()} (the peer's log).
    """
    from tests.e2e_support import wait_for

    def check():
        found = files()
        return found if len(found) >= n else None
    d = wait_for(check, what)
    if log_tail is not None:
        d.addErrback(lambda f: testcase.fail(f"{f.getErrorMessage()}\n{log_tail()}"))
    return d


class RequireTestsMixin:
    """
    Tests of a peer support module's C{require}: without a usable peer
    the tests skip, saying why; under CI they fail.  Set C{support} (the
    module) and C{peer} (its program's name, as in its messages).
    """

    support = None
    peer = ""

    def setUp(self):
        self.why = f"{self.peer} is not installed (test)"
        self.patch(self.support, "problem", lambda: self.why)

    def test_skip_outside_ci(self):
        from twisted.trial.unittest import SkipTest
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "TWISTED_MTA_CI"})
        e = self.assertRaises(SkipTest, self.support.require, self)
        self.assertEqual(str(e), self.why)

    def test_fail_under_ci(self):
        self.patch(os, "environ", dict(os.environ, TWISTED_MTA_CI="1"))
        e = self.assertRaises(self.failureException, self.support.require, self)
        self.assertIn(self.why, str(e))


def require_peer(testcase, why: str | None, peer: str) -> None:
    """
    Skip C{testcase} saying C{why} (C{None}: the peer can run); under
    C{TWISTED_MTA_CI} fail instead, since CI installs the peer.
    """
    from twisted.trial.unittest import SkipTest

    if why is None:
        return
    if os.environ.get("TWISTED_MTA_CI"):
        testcase.fail(f"CI (.ci/run) should be able to run {peer} here, but: {why}")
    raise SkipTest(why)
