"""
L{twisted_mta.handoff} and the receiver pool's choice of receiver: a
connection accepted by the main process reaches a receiver as a working
socket, with the index of its listener, and goes to the least loaded one.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from tests.e2e_support import wait_for
from twisted_mta.handoff import HandoffReceiver, ListeningSocketReader, handoff_pair, send_connection
from twisted_mta.receivers import ReceiverPool, ReceiverProcess
from twisted_mta.smtp.server import TOO_MANY_FROM_CLIENT, TOO_MANY_IN_ALL


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

        def adopt(fd, listen_index, over):
            self.adopted.append((socket.socket(fileno=socket.dup(fd)), listen_index, over))

        self.receiver = HandoffReceiver(adopt, lambda: self.lost.append(True))
        reactor.adoptStreamConnection(theirs.fileno(), socket.AF_UNIX, _OneProtocol(self.receiver))
        theirs.close()
        self.addCleanup(lambda: self.receiver.transport.loseConnection())
        self.reader = ListeningSocketReader(
            reactor, self.listener, 2, lambda conn, n: (send_connection(self.link, conn, n, 1),
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
        self.assertEqual({(n, over) for _, n, over in self.adopted}, {(2, 1)})
        # Each adopted socket is the server side of one client's connection.
        self.assertEqual(sorted(s.getpeername() for s, _, _ in self.adopted),
                         sorted(c.getsockname() for c in clients))
        for s, _, _ in self.adopted:
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

    def hand(self, connection, ip, listen_index, over):
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


def _mta(connections=100, per_client=100):
    limits = SimpleNamespace(connections=connections, connections_per_client=per_client)
    return SimpleNamespace(config=SimpleNamespace(limits=limits))


class _Reader:
    reading = False

    def start(self):
        self.reading = True

    def stop(self):
        self.reading = False


class DispatchTests(unittest.TestCase):
    """L{ReceiverPool.dispatch}: the least loaded receiver, ties in turn."""

    def pool(self, *procs):
        pool = ReceiverPool(_mta(), len(procs), Clock())
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

    def test_waits_while_nobody_can_take_it(self):
        """A burst faster than the receivers: connections wait, in order, and accepting stops."""
        from twisted_mta.receivers import HANDOFF_RETRY
        a = _Proc("a", full=True)
        pool = self.pool(a)
        reader = _Reader()
        pool.readers = [reader]
        first, second = _Conn(), _Conn()
        pool.dispatch(first, 0)
        pool.dispatch(second, 1)
        self.assertFalse(first.closed or second.closed)
        self.assertFalse(reader.reading)  # the rest wait in the listen queue
        pool.reactor.advance(HANDOFF_RETRY)
        self.assertEqual(a.got, [])  # still full: still waiting
        self.assertFalse(reader.reading)
        a.full = False
        pool.reactor.advance(HANDOFF_RETRY)
        self.assertEqual(a.got, [0, 1])
        self.assertTrue(first.closed and second.closed)
        self.assertTrue(reader.reading)
        self.assertEqual(pool.reactor.getDelayedCalls(), [])

    def test_stopping_closes_the_waiting(self):
        pool = self.pool(_Proc("a", full=True))
        conn = _Conn()
        pool.dispatch(conn, 0)
        pool.stop_accepting()
        self.assertTrue(conn.closed)
        self.assertEqual(pool.reactor.getDelayedCalls(), [])

class LimitTests(unittest.TestCase):
    """
    The main process counts the sessions open in all receivers and says
    with each connection whether it is over C{[limits]}: exact limits
    whatever the number of receivers.
    """

    def setUp(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.addCleanup(self.listener.close)

    def pool(self, **limits):
        pool = ReceiverPool(_mta(**limits), 2, Clock())
        self.ends = {}
        for index in (1, 2):
            proc = ReceiverProcess(pool, index)
            proc.link, self.ends[index] = handoff_pair()
            self.addCleanup(proc.link.close)
            self.addCleanup(self.ends[index].close)
            proc.accepting = True
            pool.processes[index] = proc
        return pool

    def connect(self, pool, n=1):
        for _ in range(n):
            client = socket.create_connection(self.listener.getsockname())
            self.addCleanup(client.close)
            server, _ = self.listener.accept()
            pool.dispatch(server, 0)
            self.assertEqual(server.fileno(), -1)  # handed over and closed here

    def said(self) -> list[int]:
        """What each receiver was told (the limit byte's top bits), in turn, and close the fds."""
        overs = []
        for end in self.ends.values():
            end.setblocking(False)
            while True:  # one message (byte and fd) per call
                try:
                    data, fds, _, _ = socket.recv_fds(end, 64, 64)
                except BlockingIOError:
                    break
                for fd in fds:
                    socket.socket(fileno=fd).close()
                overs += [b >> 6 for b in data]
        return sorted(overs)

    def test_per_client_over_all_receivers(self):
        pool = self.pool(per_client=3)
        self.connect(pool, 4)
        # Two each: neither receiver alone is over 3; the fourth is.
        self.assertEqual(sorted(p.sessions for p in pool.processes.values()), [2, 2])
        self.assertEqual(self.said(), [0, 0, 0, TOO_MANY_FROM_CLIENT])
        self.assertEqual(pool.counter.per_ip, {"127.0.0.1": 4})

    def test_in_all(self):
        pool = self.pool(connections=2)
        self.connect(pool, 3)
        self.assertEqual(self.said(), [0, 0, TOO_MANY_IN_ALL])

    def test_closed_sessions_free_their_places(self):
        pool = self.pool(per_client=2)
        self.connect(pool, 2)
        self.said()
        proc = pool.processes[1]
        proc.childDataReceived(1, b"closed 127.0.0.1\n")
        self.assertEqual(pool.counter.total, 1)
        self.connect(pool)
        self.assertEqual(self.said(), [0])
        proc.childDataReceived(1, b"closed 10.0.0.9\n")  # not one of its clients: ignored
        self.assertEqual(pool.counter.total, 2)

    def test_a_burst_waits_for_full_handoff_sockets(self):
        """More connections than the pairs hold: none is dropped; they go as room is made."""
        from twisted_mta.receivers import HANDOFF_RETRY
        self.listener.close()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(512)
        pool = self.pool()
        for proc in pool.processes.values():
            proc.link.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        clients = []
        for _ in range(300):
            clients.append(socket.create_connection(self.listener.getsockname()))
            self.addCleanup(clients[-1].close)
            server, _ = self.listener.accept()
            pool.dispatch(server, 0)
        self.assertTrue(pool._waiting)  # the pairs filled up
        handed = []
        while len(handed) < 300:
            handed += self.said()  # the receivers read what was sent...
            pool.reactor.advance(HANDOFF_RETRY)  # ...and the rest follows
        self.assertEqual(len(handed), 300)
        self.assertFalse(pool._waiting)

    def test_a_dead_receivers_sessions_are_gone(self):
        pool = self.pool(per_client=2)
        self.connect(pool, 2)
        self.said()
        pool.processes[1].forget_sessions()
        pool.processes[2].forget_sessions()
        self.assertEqual((pool.counter.total, pool.counter.per_ip), (0, {}))
        self.connect(pool)
        self.assertEqual(self.said(), [0])


class AdoptFailureTests(unittest.TestCase):
    """A handed-over connection the receiver cannot serve is not left counted."""

    def test_unknown_listener_reported_closed(self):
        from twisted_mta.receiver import ReceiverService
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)
        sent = []
        receiver = SimpleNamespace(factories=[], config=SimpleNamespace(file="mta.toml"),
                                   channel=SimpleNamespace(send=sent.append), reactor=reactor)
        with self.assertRaises(ValueError) as e:
            ReceiverService._adopt(receiver, server.fileno(), 1, 0)
        self.assertIn("[[listen]] number 2, but mta.toml has 0", str(e.exception))
        self.assertEqual(sent, [b"closed 127.0.0.1"])
