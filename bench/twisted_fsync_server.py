"""The baseline of issue 2: a 20-line Twisted server (twisted.mail.smtp) that fsyncs each message.
Usage: python bench/twisted_fsync_server.py PORT SPOOLDIR   (one file per message, fsync'ed in a thread)"""
import os, sys, itertools
from twisted.internet import reactor, threads, protocol
from twisted.mail import smtp
from zope.interface import implementer
seq = itertools.count()
@implementer(smtp.IMessage)
class Message:
    def __init__(self): self.lines = []
    def lineReceived(self, line): self.lines.append(line)
    def eomReceived(self): return threads.deferToThread(self.store, b"\n".join(self.lines) + b"\n")
    def store(self, data):
        fd = os.open(os.path.join(sys.argv[2], "%d.%d" % (os.getpid(), next(seq))), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try: os.write(fd, data); os.fsync(fd)
        finally: os.close(fd)
    def connectionLost(self): self.lines = None
@implementer(smtp.IMessageDelivery)
class Delivery:
    def receivedHeader(self, helo, origin, recipients): return None
    def validateFrom(self, helo, origin): return origin
    def validateTo(self, user): return Message
class Factory(protocol.ServerFactory):
    def buildProtocol(self, addr): p = smtp.ESMTP(); p.delivery, p.factory = Delivery(), self; return p
reactor.listenTCP(int(sys.argv[1]), Factory(), backlog=1024, interface="127.0.0.1"); reactor.run()
