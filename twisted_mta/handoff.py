"""
Handing accepted connections from the main process to the receivers
(C{receivers = N}).

The main process accepts on its listening sockets and passes each new
connection to the receiver with the fewest open sessions, over a Unix
socket pair per receiver: one byte with the connection's file descriptor
attached (C{SCM_RIGHTS}).  The byte says which C{[[listen]]} table it came
in on and whether it is over a connection limit of C{[limits]}, which the
main process counts across all receivers.  The receiver adopts it as if
it had accepted it (and answers 421 if it is over a limit).  Each
receiver says when a session it was handed ends (a C{closed <ip>} line on
its pipe to the main process), so the main process knows every
receiver's load and the connections open from each client.

Why not let every receiver accept on the shared listening socket: every
receiver is woken by a new connection and the one that gets to accept()
first takes it, so a burst of connections went to whichever receiver
happened to be running, often all ten sessions of a burst to one of two
receivers, which then did all the work on one core.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from typing import Callable

from twisted.internet import protocol
from twisted.internet.interfaces import IFileDescriptorReceiver, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

#: Accepted per readiness event of a listening socket (the rest wait for
#: the next turn of the reactor, so that delivery work is not starved).
ACCEPTS_PER_READ = 32
#: Seconds to stop accepting after the process ran out of file
#: descriptors or memory (the socket stays readable: no busy loop).
ACCEPT_PAUSE = 0.1

_RETRY_ACCEPT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}

#: [[listen]] tables a handed-over connection can name: the byte's low six
#: bits; the top two say which limit it is over (0: none).
MAX_LISTENERS = 64


def _byte(listen_index: int, over: int) -> bytes:
    if not 0 <= listen_index < MAX_LISTENERS or not 0 <= over < 4:
        raise ValueError(f"cannot hand over listener {listen_index}, limit {over}")
    return bytes((over << 6 | listen_index,))


def handoff_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair: the main process's end, the receiver's end."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mine.setblocking(False)
    return mine, theirs


def peer_ip(connection: socket.socket) -> str:
    """
    The client's address as both processes name it in their counts (the
    main process's C{[limits]} count and the receiver's C{closed} lines).
    """
    try:
        return str(connection.getpeername()[0])
    except OSError:
        return "?"  # already reset by the client


def send_connection(link: socket.socket, connection: socket.socket, listen_index: int,
                    over: int = 0) -> None:
    """
    Pass C{connection} (accepted on C{[[listen]]} number C{listen_index},
    from 0; over limit C{over}, as
    L{twisted_mta.smtp.server.ConnectionCounter.over} says) over C{link}.
    Raises C{BlockingIOError} if the receiver is not keeping up,
    C{OSError} if it is gone.
    """
    link.sendmsg([_byte(listen_index, over)],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [connection.fileno()]))])


@implementer(IReadDescriptor)
class ListeningSocketReader:
    """
    Accepts on one listening socket for the main process and gives each
    connection to C{dispatch(connection, listen_index)}, which owns it.
    """

    def __init__(self, reactor, sock: socket.socket, listen_index: int,
                 dispatch: Callable[[socket.socket, int], None]):
        self.reactor = reactor
        self.socket = sock
        self.listen_index = listen_index
        self.dispatch = dispatch
        self.reading = False
        self._paused = None

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "handoff"

    def start(self) -> None:
        if not self.reading and self._paused is None:
            self.reading = True
            self.reactor.addReader(self)

    def stop(self) -> None:
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
        self._paused = None
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)

    def _resume(self) -> None:
        self._paused = None
        self.start()

    def doRead(self) -> None:
        for _ in range(ACCEPTS_PER_READ):
            try:
                connection, _ = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _RETRY_ACCEPT:
                    continue
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection waits in
                # the kernel's backlog; try again shortly.
                log.error("cannot accept a connection: {why}; pausing for {t} s",
                          why=os.strerror(e.errno), t=ACCEPT_PAUSE)
                self.stop()
                self._paused = self.reactor.callLater(ACCEPT_PAUSE, self._resume)
                return
            self.dispatch(connection, self.listen_index)

    def connectionLost(self, reason) -> None:
        self.reading = False


@implementer(IFileDescriptorReceiver)
class HandoffReceiver(protocol.Protocol):
    """
    The receiver's end of the pair: adopts each connection it is handed
    with C{adopt(fd, listen_index, over)}, and calls C{lost()} when the
    main process closes the pair.
    """

    def __init__(self, adopt: Callable[[int, int, int], None], lost: Callable[[], None]):
        self.adopt = adopt
        self.lost = lost
        self._fds: list[int] = []

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        # One byte per descriptor, both in the order sent.
        for byte in data:
            if not self._fds:
                log.error("handoff: a listener index without a connection")
                continue
            fd = self._fds.pop(0)
            try:
                self.adopt(fd, byte & (MAX_LISTENERS - 1), byte >> 6)
            except Exception:
                log.failure("handoff: could not take a connection")
            finally:
                os.close(fd)

    def connectionLost(self, reason) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.lost()
