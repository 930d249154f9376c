"""
Writing to a plain TCP transport now, rather than on the reactor's next turn.

Twisted's C{transport.write} only buffers: it asks the reactor to watch the
socket for writability (an C{epoll_ctl}), the next C{epoll_wait} reports
it, C{doWrite} sends and stops watching (a second C{epoll_ctl}).  An SMTP
server writes twice per message (the replies to MAIL, RCPT and DATA, then
the one to the final dot), each time to a socket with room in its buffer;
those two extra system calls and reactor events per write were 5-6 % of a
receiving process's CPU per message (bench/RESULTS.md).

L{write_now} sends at once when nothing is buffered before it, and hands
what the socket did not take (or everything, when it cannot send now) to
C{transport.write}, so the order of bytes, the buffer's flow control and
the handling of a lost connection stay Twisted's.  Anything other than a
plain, open TCP connection (TLS, in-memory test transports, a connection
closing) just gets C{transport.write}.
"""

from __future__ import annotations

from twisted.internet import tcp


def write_now(transport, data: bytes) -> None:
    """
    Write C{data} to C{transport}: sent before returning as far as the
    socket takes it when C{transport} is a plain TCP connection with
    nothing buffered, the rest (or all of it, otherwise) by
    C{transport.write}.
    """
    if isinstance(transport, tcp.Connection) and _idle(transport):
        sent = transport.writeSomeData(data)
        if type(sent) is int:  # else the connection is lost: Twisted's write finds out
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)


def _idle(transport: tcp.Connection) -> bool:
    """
    Whether C{transport} is open, in the clear and holds nothing to send.
    Its buffers are Twisted's private attributes: should a Twisted release
    rename them, every write goes through C{transport.write} as before
    (tests/test_writenow.py then fails, and says so).
    """
    try:
        return bool(transport.connected and not transport.TLS and not transport.disconnecting
                    and not transport._writeDisconnecting and not transport._writeDisconnected
                    and not transport._tempDataBuffer
                    and transport.offset == len(transport.dataBuffer))
    except AttributeError:
        return False
