"""
Tests for L{twisted_mta.writenow}: over real loopback TCP connections,
since what it relies on is Twisted's TCP transport.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from twisted_mta.writenow import write_now


def pause(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


class _Held(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.made.callback(self)


class WriteNowTests(unittest.TestCase):

    @defer.inlineCallbacks
    def connect(self):
        """A server-side Twisted transport and the blocking client socket at its other end."""
        factory = protocol.Factory.forProtocol(_Held)
        factory.made = defer.Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.settimeout(5)
        server = yield factory.made
        self.addCleanup(server.transport.abortConnection)
        return server.transport, client

    def buffered(self, transport) -> int:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen

    @defer.inlineCallbacks
    def test_sent_before_returning(self) -> None:
        """With nothing buffered, the bytes are in the peer's socket when it returns."""
        transport, client = yield self.connect()
        write_now(transport, b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.buffered(transport), 0)
        self.assertEqual(client.recv(100), b"250 2.0.0 Ok\r\n")  # no reactor turn in between

    @defer.inlineCallbacks
    def test_after_buffered_bytes(self) -> None:
        """Bytes that Twisted still holds go first: the new ones wait behind them."""
        transport, client = yield self.connect()
        transport.write(b"first ")
        write_now(transport, b"second")
        self.assertEqual(self.buffered(transport), len(b"first second"))
        received = b""
        while len(received) < 12:
            yield pause(0.01)
            client.setblocking(False)
            try:
                received += client.recv(100)
            except BlockingIOError:
                pass
        self.assertEqual(received, b"first second")

    @defer.inlineCallbacks
    def test_rest_buffered_in_order(self) -> None:
        """What the socket does not take is written by Twisted, after what it took."""
        transport, client = yield self.connect()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers hold
        write_now(transport, data)
        self.assertGreater(self.buffered(transport), 0)
        client.setblocking(False)
        received = []
        total = 0
        while total < len(data):
            try:
                chunk = client.recv(1 << 16)
            except BlockingIOError:
                yield pause(0.001)
                continue
            received.append(chunk)
            total += len(chunk)
        self.assertEqual(b"".join(received), data)

    @defer.inlineCallbacks
    def test_closing_connection_left_to_twisted(self) -> None:
        """Once the connection is closing, nothing is sent directly."""
        transport, client = yield self.connect()
        transport.write(b"last")
        transport.loseConnection()
        write_now(transport, b" more")
        self.assertEqual(self.buffered(transport), len(b"last more"))

    def test_other_transports_written(self) -> None:
        """Any other transport (here an in-memory one) just gets write()."""
        transport = StringTransport()
        write_now(transport, b"220 ready\r\n")
        self.assertEqual(transport.value(), b"220 ready\r\n")

