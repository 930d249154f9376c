"""
L{twisted_mta.handoff} and the receiver pool's choice of receiver: a
connection accepted by the main process reaches a receiver as a working
socket, with the index of its listener, and goes to the least loaded one.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests.e2e_support import wait_for
from twisted_mta.handoff import HandoffReceiver, ListeningSocketReader, handoff_pair, send_connection
from twisted_mta.receivers import ReceiverPool


class _OneProtocol:
    def __init__(self, proto):
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto

    def doStart(self):
        pass

    def doStop(self):
        pass


class HandoffTests(unittest.TestCase):
    """Over real sockets on loopback: accept, hand over, adopt."""

    def setUp(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.addCleanup(self.listener.close)
        self.link, theirs = handoff_pair()
        self.addCleanup(self.link.close)
        self.adopted: list[tuple[socket.socket, int]] = []
        self.lost = []

        def adopt(fd, listen_index):
            self.adopted.append((socket.socket(fileno=socket.dup(fd)), listen_index))

        self.receiver = HandoffReceiver(adopt, lambda: self.lost.append(True))
        reactor.adoptStreamConnection(theirs.fileno(), socket.AF_UNIX, _OneProtocol(self.receiver))
        theirs.close()
        self.addCleanup(lambda: self.receiver.transport.loseConnection())
        self.reader = ListeningSocketReader(
            reactor, self.listener, 2, lambda conn, n: (send_connection(self.link, conn, n),
                                                        conn.close()))
        self.reader.start()
        self.addCleanup(self.reader.stop)

    @defer.inlineCallbacks
    def test_connections_arrive_working_with_their_listener(self):
        clients = []
        for _ in range(5):
            c = socket.create_connection(self.listener.getsockname())
            self.addCleanup(c.close)
            clients.append(c)
        yield wait_for(lambda: len(self.adopted) == 5, "five connections handed over")
        self.assertEqual({n for _, n in self.adopted}, {2})
        # Each adopted socket is the server side of one client's connection.
        self.assertEqual(sorted(s.getpeername() for s, _ in self.adopted),
                         sorted(c.getsockname() for c in clients))
        for s, _ in self.adopted:
            self.addCleanup(s.close)
            s.sendall(b"220 hello\r\n")
        for c in clients:
            self.assertEqual(c.recv(100), b"220 hello\r\n")

    @defer.inlineCallbacks
    def test_main_process_gone(self):
        self.reader.stop()
        self.link.close()
        yield wait_for(lambda: self.lost, "the receiver told the pair closed")

    def test_stopped_reader_accepts_nothing(self):
        self.reader.stop()
        c = socket.create_connection(self.listener.getsockname())
        self.addCleanup(c.close)
        self.reader.doRead()  # as if the reactor still called it: nothing breaks
        self.assertFalse(self.reader.reading)


class _Proc:
    def __init__(self, name, sessions=0, full=False):
        self.name = name
        self.sessions = sessions
        self.accepting = True
        self.full = full
        self.got = []

    def hand(self, connection, listen_index):
        if self.full:
            return False
        self.sessions += 1
        self.got.append(listen_index)
        return True


class _Conn:
    closed = False

    def close(self):
        self.closed = True

    def getpeername(self):
        return ("127.0.0.1", 1)


class DispatchTests(unittest.TestCase):
    """L{ReceiverPool.dispatch}: the least loaded receiver, ties in turn."""

    def pool(self, *procs):
        pool = ReceiverPool(None, len(procs), Clock())
        pool.processes = {i: p for i, p in enumerate(procs, 1)}
        return pool

    def test_least_loaded(self):
        a, b = _Proc("a", sessions=3), _Proc("b", sessions=1)
        pool = self.pool(a, b)
        for _ in range(4):
            conn = _Conn()
            pool.dispatch(conn, 0)
            self.assertTrue(conn.closed)  # the receiver has its own copy
        self.assertEqual((a.sessions, b.sessions), (4, 4))

    def test_ties_in_turn(self):
        a, b = _Proc("a"), _Proc("b")
        pool = self.pool(a, b)
        for _ in range(6):
            pool.dispatch(_Conn(), 1)
            a.sessions = b.sessions = 0  # each session ended before the next came
        self.assertEqual((len(a.got), len(b.got)), (3, 3))

    def test_full_receiver_skipped(self):
        a, b = _Proc("a", full=True), _Proc("b", sessions=5)
        pool = self.pool(a, b)
        pool.dispatch(_Conn(), 0)
        self.assertEqual(b.got, [0])

    def test_not_accepting_skipped(self):
        a, b = _Proc("a"), _Proc("b", sessions=5)
        a.accepting = False
        pool = self.pool(a, b)
        pool.dispatch(_Conn(), 0)
        self.assertEqual((a.got, b.got), ([], [0]))

    def test_nobody_can_take_it(self):
        pool = self.pool(_Proc("a", full=True))
        conn = _Conn()
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        pool.dispatch(conn, 0)
        self.assertTrue(conn.closed)
        self.assertIn("no receiver could take a connection from 127.0.0.1; closed it",
                      [formatEvent(e) for e in seen])
