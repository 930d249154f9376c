"""
A test SMTP/LMTP server for the delivery tests: it keeps what it is given
and answers as the test scripts it.

  - Replies are scriptable per recipient (L{SinkFactory.rcpt_replies},
    L{SinkFactory.lmtp_replies}) and per stage (greeting, EHLO, MAIL,
    DATA, the end of data); a reply may be a callable, asked each time.
  - STARTTLS is offered when C{tls_options} is given; AUTH PLAIN and
    LOGIN are offered (after TLS only, by default) when C{users} is given,
    and C{require_auth} refuses MAIL without it.
  - It counts connections (all, and at most at once) and keeps every
    command line it got (L{SinkFactory.transcripts}, one list per
    connection) and every message it accepted (L{SinkFactory.messages}).

Also a test PKI: L{make_pki} makes a CA and a server certificate with
cryptography.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, ssl
from twisted.internet.protocol import ServerFactory
from twisted.protocols.basic import LineReceiver


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    params: str = ""
    tls: bool = False
    user: str | None = None
    connection: int = 0


def _line(reply) -> bytes:
    if isinstance(reply, bytes):
        return reply if reply.endswith(b"\r\n") else reply + b"\r\n"
    return reply.encode("utf-8") + b"\r\n"


@dataclass(eq=False)
class SinkFactory(ServerFactory):
    lmtp: bool = False
    hostname: str = "sink.example.test"
    tls_options: object = None
    users: dict | None = None
    auth_requires_tls: bool = True
    require_auth: bool = False
    pipelining: bool = True
    size: int | None = 10_000_000
    smtputf8: bool = True
    eightbitmime: bool = True
    greeting: object = None                 # a reply; default 220
    ehlo_reply: object = None               # a reply instead of the extensions (e.g. "502 ...")
    starttls_reply: object = None           # a reply instead of 220 to STARTTLS
    mail_reply: object = None
    rcpt_replies: dict = field(default_factory=dict)   # address (lower case) -> reply
    data_reply: object = None               # the reply to DATA instead of 354
    final_reply: object = None              # after the data (SMTP); callable(Received) allowed
    lmtp_replies: dict = field(default_factory=dict)   # address -> reply after the data (LMTP)
    close_after_data: bool = False          # drop the connection instead of the final reply
    starttls_broken: bool = False           # say 220 to STARTTLS, then close instead of TLS

    def __post_init__(self):
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.messages: list[Received] = []
        self.transcripts: list[list[bytes]] = []
        self.protocols: list[SinkProtocol] = []
        self.auth_attempts: list[tuple[str, str]] = []
        self._lost_waiters: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        p = SinkProtocol()
        p.factory = self
        return p

    def reply(self, reply, *args) -> bytes:
        if callable(reply):
            reply = reply(*args)
        return _line(reply)

    def all_closed(self) -> defer.Deferred:
        """Fires once no connection is open."""
        d: defer.Deferred = defer.Deferred()
        if self.active == 0:
            d.callback(None)
        else:
            self._lost_waiters.append(d)
        return d

    def _closed(self) -> None:
        self.active -= 1
        if self.active == 0:
            waiters, self._lost_waiters = self._lost_waiters, []
            for d in waiters:
                d.callback(None)

    def extension_lines(self, tls: bool) -> list[str]:
        lines = [self.hostname]
        if self.pipelining:
            lines.append("PIPELINING")
        if self.size is not None:
            lines.append(f"SIZE {self.size}")
        if self.eightbitmime:
            lines.append("8BITMIME")
        if self.smtputf8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        if self.tls_options is not None and not tls:
            lines.append("STARTTLS")
        if self.users is not None and (tls or not self.auth_requires_tls):
            lines.append("AUTH PLAIN LOGIN")
        return lines


class SinkProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20
    factory: SinkFactory

    def connectionMade(self):
        f = self.factory
        f.connections += 1
        f.active += 1
        f.max_active = max(f.max_active, f.active)
        f.protocols.append(self)
        self.number = f.connections
        self.transcript: list[bytes] = []
        f.transcripts.append(self.transcript)
        self.tls = False
        self.user = None
        self.helo = False
        self.auth_state = None
        self.in_data = False
        self.data: list[bytes] = []
        self.reset()
        self.sendLine(f.reply(f.greeting or f"220 {f.hostname} ESMTP sink").rstrip(b"\r\n"))

    def connectionLost(self, reason):
        self.factory._closed()

    def handshakeCompleted(self):
        pass

    def reset(self):
        self.sender = None
        self.params = ""
        self.recipients: list[str] = []

    def send(self, reply) -> None:
        self.transport.write(self.factory.reply(reply))

    def lineReceived(self, line: bytes):
        f = self.factory
        if self.in_data:
            if line == b".":
                self.in_data = False
                self._end_of_data()
            else:
                self.data.append(line[1:] if line.startswith(b".") else line)
            return
        self.transcript.append(line)
        if self.auth_state is not None:
            self._auth_step(line)
            return
        text = line.decode("utf-8", "replace")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "LHLO", "HELO"):
            if (verb == "LHLO") != f.lmtp and verb != "HELO":
                return self.send("500 5.5.1 wrong greeting command")
            if f.ehlo_reply is not None and verb != "HELO":
                return self.send(f.ehlo_reply)
            self.helo = True
            self.reset()
            if verb == "HELO":
                return self.send(f"250 {f.hostname}")
            lines = f.extension_lines(self.tls)
            out = b"".join(f"250-{x}\r\n".encode() for x in lines[:-1]) + f"250 {lines[-1]}\r\n".encode()
            self.transport.write(out)
        elif verb == "STARTTLS":
            if f.tls_options is None or self.tls:
                return self.send("502 5.5.1 no")
            if f.starttls_reply is not None:
                return self.send(f.starttls_reply)
            self.send("220 2.0.0 Ready to start TLS")
            if f.starttls_broken:
                self.transport.loseConnection()
                return
            self.clearLineBuffer()
            self.transport.startTLS(f.tls_options)
            self.tls = True
            self.helo = False
            self.reset()
        elif verb == "AUTH":
            mech, _, initial = arg.partition(" ")
            mech = mech.upper()
            if f.users is None or (f.auth_requires_tls and not self.tls):
                return self.send("503 5.5.1 Error: authentication not enabled")
            if mech == "PLAIN":
                if initial:
                    self._auth_plain(initial.encode())
                else:
                    self.auth_state = ("PLAIN",)
                    self.send("334 ")
            elif mech == "LOGIN":
                self.auth_state = ("LOGIN-USER",)
                self.send("334 VXNlcm5hbWU6")
            else:
                self.send("504 5.5.4 unsupported mechanism")
        elif verb == "MAIL":
            if f.require_auth and self.user is None:
                return self.send("530 5.7.0 Authentication required")
            reply = f.mail_reply or "250 2.1.0 Ok"
            r = f.reply(reply, arg)
            if r.startswith(b"2"):
                path, _, params = arg[5:].partition(" ") if arg.upper().startswith("FROM:") else (arg, "", "")
                self.sender = path.strip("<>")
                self.params = params
            self.transport.write(r)
        elif verb == "RCPT":
            if self.sender is None:
                return self.send("503 5.5.1 Error: need MAIL command")
            address = arg[3:].strip().strip("<>") if arg.upper().startswith("TO:") else arg
            reply = f.rcpt_replies.get(address.lower(), "250 2.1.5 Ok")
            r = f.reply(reply, address)
            if r.startswith(b"2"):
                self.recipients.append(address)
            self.transport.write(r)
        elif verb == "DATA":
            if not self.recipients:
                return self.send("554 5.5.1 Error: no valid recipients")
            if f.data_reply is not None:
                return self.send(f.data_reply)
            self.in_data = True
            self.data = []
            self.send("354 End data with <CR><LF>.<CR><LF>")
        elif verb == "RSET":
            self.reset()
            self.send("250 2.0.0 Ok")
        elif verb == "NOOP":
            self.send("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.send("221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.send("502 5.5.2 Error: command not recognized")

    def _end_of_data(self):
        f = self.factory
        message = Received(self.sender, list(self.recipients), b"".join(x + b"\r\n" for x in self.data),
                           self.params, self.tls, self.user, self.number)
        self.data = []
        self.reset()
        if f.close_after_data:
            self.transport.loseConnection()
            return
        if f.lmtp:
            delivered = []
            for rcpt in message.recipients:
                r = f.reply(f.lmtp_replies.get(rcpt.lower(), "250 2.0.0 <%s> Saved" % rcpt), rcpt)
                if r.startswith(b"2"):
                    delivered.append(rcpt)
                self.transport.write(r)
            if delivered:
                message.recipients = delivered
                f.messages.append(message)
            return
        r = f.reply(f.final_reply or "250 2.0.0 Ok: queued as SINK%d" % (len(f.messages) + 1), message)
        if r.startswith(b"2"):
            f.messages.append(message)
        self.transport.write(r)

    def _auth_plain(self, token: bytes):
        self.auth_state = None
        try:
            _, user, password = base64.b64decode(token, validate=True).split(b"\0")
            self._check(user.decode(), password.decode())
        except ValueError:
            self.send("501 5.5.2 bad response")

    def _auth_step(self, line: bytes):
        state = self.auth_state[0]
        if line == b"*":
            self.auth_state = None
            return self.send("501 5.7.0 Authentication aborted")
        if state == "PLAIN":
            return self._auth_plain(line)
        try:
            value = base64.b64decode(line, validate=True).decode()
        except ValueError:
            self.auth_state = None
            return self.send("501 5.5.2 bad response")
        if state == "LOGIN-USER":
            self.auth_state = ("LOGIN-PASS", value)
            self.send("334 UGFzc3dvcmQ6")
        else:
            user = self.auth_state[1]
            self.auth_state = None
            self._check(user, value)

    def _check(self, user: str, password: str):
        self.factory.auth_attempts.append((user, password))
        if self.factory.users.get(user) == password:
            self.user = user
            self.send("235 2.7.0 Authentication successful")
        else:
            self.send("535 5.7.8 Error: authentication failed: bad credentials")


# --- a test PKI -----------------------------------------------------------------


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


@dataclass
class PKI:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    server_options: ssl.CertificateOptions


def make_pki(names=("localhost",), ips=("127.0.0.1", "::1")) -> PKI:
    """A test CA and a server certificate it signed for C{names} and C{ips}."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("sink test CA")).issuer_name(_name("sink test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0] if names else "server")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    options = ssl.CertificateOptions(privateKey=key, certificate=cert, extraCertChain=[ca])
    pem = serialization.Encoding.PEM
    return PKI(
        ca.public_bytes(pem),
        cert.public_bytes(pem) + ca.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        options,
    )


def close_at_end(testcase, factory: SinkFactory, port) -> None:
    """At the end of C{testcase}: stop C{port}, abort the sink's connections, wait for them."""
    async def cleanup():
        await port.stopListening()
        for p in factory.protocols:
            if p.transport is not None and p.transport.connected:
                p.transport.abortConnection()
        await factory.all_closed()

    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(cleanup()))


def listen_sink(testcase, interface: str = "127.0.0.1", **kw) -> tuple[SinkFactory, int]:
    """A L{SinkFactory} (made with C{kw}) on a free TCP port of C{interface}, closed at the end."""
    from twisted.internet import reactor

    factory = SinkFactory(**kw)
    port = reactor.listenTCP(0, factory, interface=interface)
    close_at_end(testcase, factory, port)
    return factory, port.getHost().port
