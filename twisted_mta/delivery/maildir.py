"""
Delivery into Maildirs: one Maildir per recipient under a route's C{path}.

The message is written to C{tmp/}, fsync'ed, renamed into C{new/}, and
C{new/} fsync'ed, all in a thread; only then is the recipient delivered.
It is stored as received (CRLF line ends, bytes untouched), after a
C{Return-Path} (RFC 5321 4.4: final delivery adds it) and a
C{Delivered-To}.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.delivery.agent import IDeliveryAgent, Outcome
from twisted_mta.spool.entry import QueueEntry, RecipientState

log = Logger()

_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789._+-=@")
_counter = itertools.count()


def mailbox_folder(address: str) -> str:
    """
    The folder name for a recipient's Maildir: the address in lower case,
    every character outside a small safe set percent-encoded (so a local
    part such as C{"../x"} can never leave the route's folder), and a
    leading dot encoded too.
    """
    out = []
    for i, c in enumerate(address.lower()):
        if c in _SAFE and not (i == 0 and c == "."):
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode("utf-8"))
    return "".join(out)


def _unique_name() -> str:
    now = time.time()
    return (f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{next(_counter)}."
            f"{_host()}")


_hostname: tuple[float, str] = (0.0, "")


def _host() -> str:
    """The host name for file names (looked up at most once a minute)."""
    global _hostname
    now = time.monotonic()
    if not _hostname[1] or now - _hostname[0] > 60:
        _hostname = (now, socket.gethostname().replace("/", "_").replace(":", "_"))
    return _hostname[1]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_maildir(folder: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True)


@implementer(IDeliveryAgent)
class MaildirAgent:
    """Delivers to Maildirs; see the module docstring."""

    def __init__(self, spool, reactor=None, threadpool=None):
        if reactor is None:
            from twisted.internet import reactor
        self.spool = spool
        self.reactor = reactor
        self.threadpool = threadpool or reactor.getThreadPool()
        #: Maildirs known to exist (made or seen by us), so each delivery
        #: does not ask the file system again
        self._made: set[Path] = set()

    def deliver(self, entry: QueueEntry, route, recipients: list[RecipientState]):
        return deferToThreadPool(self.reactor, self.threadpool,
                                 self._deliver, entry, Path(route.path), list(recipients))

    def _deliver(self, entry: QueueEntry, base: Path, recipients) -> list[Outcome]:
        outcomes = []
        for rcpt in recipients:
            folder = base / mailbox_folder(rcpt.address)
            try:
                name = self._write(entry, folder, rcpt.address)
            except OSError as e:
                outcomes.append(Outcome(rcpt.address, "deferred",
                                        f"451 4.3.0 cannot write to maildir {folder}: {e.strerror or e}"))
                continue
            outcomes.append(Outcome(rcpt.address, "delivered", f"250 2.0.0 delivered to maildir as {name}"))
        return outcomes

    def _write(self, entry: QueueEntry, folder: Path, address: str) -> str:
        if folder not in self._made:
            ensure_maildir(folder)
            self._made.add(folder)
        try:
            return self._write_in(entry, folder, address)
        except FileNotFoundError:
            # Removed behind our back since we made it: make it again, once.
            self._made.discard(folder)
            ensure_maildir(folder)
            self._made.add(folder)
            return self._write_in(entry, folder, address)

    def _write_in(self, entry: QueueEntry, folder: Path, address: str) -> str:
        name = _unique_name()
        tmp = folder / "tmp" / name
        trace = f"Return-Path: <{entry.sender}>\r\nDelivered-To: {address}\r\n".encode("utf-8")
        try:
            with open(tmp, "xb") as f:
                f.write(trace)
                for chunk in self.spool.read_message(entry):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, folder / "new" / name)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        _fsync_dir(folder / "new")
        return name
