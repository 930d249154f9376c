"""
Helpers for the end-to-end tests: a site (a temporary folder with its own
C{mta.toml}, a test CA and a server certificate signed by it), the real
service run by C{twistd} in a subprocess or started in this process, and
small SMTP client helpers.

Everything listens on loopback only (127.0.0.1 or ::1), on ports picked
free at the time.  Nothing here asserts how long anything takes: the
waits have generous deadlines only so that a broken server fails a test
instead of hanging the run.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor, task, threads

REPO = Path(__file__).resolve().parent.parent
HOSTNAME = "mx.example.test"
LOCAL_DOMAIN = "example.test"

# Deadlines for waits: only there so that a broken server cannot hang the
# suite; the tests never assert on timing.
START_DEADLINE = 60.0
WAIT_DEADLINE = 60.0

# twistd's own entry point; "python -m twisted.scripts.twistd" does nothing
# (the module has no __main__ block).
_TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

QUEUED = re.compile(rb"^2\.0\.0 Ok: queued as ([0-9A-Za-z]+)$")


# --- ports ------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on C{host} that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def endpoint_for(host: str, port: int) -> str:
    if ":" in host:
        return "tcp6:%d:interface=%s" % (port, host.replace(":", "\\:"))
    return "tcp:%d:interface=%s" % (port, host)


# --- certificates -----------------------------------------------------------


def _name(common: str):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twisted-mta tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common),
    ])


def make_ca(common: str = "twisted-mta test CA"):
    """A CA key and self-signed CA certificate (P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert, hostname: str = HOSTNAME):
    """A server key and certificate for C{hostname}, localhost, 127.0.0.1 and ::1."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(hostname), x509.DNSName("localhost"),
           x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
           x509.IPAddress(ipaddress.ip_address("::1"))]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_pki(folder: Path, hostname: str = HOSTNAME) -> dict[str, Path]:
    """
    Write C{ca.pem} (the test CA), C{mx.pem} (the server's certificate, then
    the CA's: a full chain) and C{mx.key} into C{folder}; returns their paths.
    """
    ca_key, ca_cert = make_ca()
    key, cert = make_server_cert(ca_key, ca_cert, hostname)
    paths = {"ca": folder / "ca.pem", "certificate": folder / "mx.pem", "key": folder / "mx.key"}
    paths["ca"].write_bytes(_pem_cert(ca_cert))
    paths["certificate"].write_bytes(_pem_cert(cert) + _pem_cert(ca_cert))
    paths["key"].write_bytes(_pem_key(key))
    os.chmod(paths["key"], 0o600)
    return paths


# --- configuration ----------------------------------------------------------


def toml_value(value) -> str:
    """A TOML literal for a str, bool, int, float or list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_table(header: str, values: dict) -> str:
    lines = [header]
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


class Site:
    """
    A self-contained MTA installation in C{folder}: C{mta.toml}, the test
    PKI, the spool and the Maildirs, all inside it.

    @param listeners: C{{name: tls mode}}; each gets a free port on C{host}
        (see L{port}), or with C{fixed_ports=False} port 0, the kernel's
        choice, which L{start_in_process} reads back from the service.
    @param networks: C{[relay] networks}; the default leaves loopback out,
        so relaying from the tests is denied.
    @param relay_route: if given, a C{(host, port)} to route every
        non-local domain to (a smart host), so that relayed mail has a
        definite route that cannot succeed and stays queued.
    """

    def __init__(self, folder, listeners=None, *, host: str = "127.0.0.1",
                 hostname: str = HOSTNAME, local_domains=(LOCAL_DOMAIN,),
                 networks=("192.0.2.0/24",), relay_route=None, tls: bool = True,
                 limits: dict | None = None, delivery: dict | None = None,
                 extra: str = "", fixed_ports: bool = True):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.hostname = hostname
        self.listeners = dict(listeners or {"smtp": "starttls"})
        self.ports = {name: free_port(host) if fixed_ports else 0 for name in self.listeners}
        self.pki = write_pki(self.folder, hostname) if tls else None
        parts = [toml_table("", {"hostname": hostname, "spool": "spool"}).lstrip("\n")]
        if self.pki:
            parts.append(toml_table("[tls]", {"certificate": "mx.pem", "key": "mx.key"}))
        for name, mode in self.listeners.items():
            parts.append(toml_table("[[listen]]", {
                "endpoint": endpoint_for(host, self.ports[name]), "tls": mode}))
        parts.append(toml_table("[relay]", {
            "local_domains": list(local_domains), "networks": list(networks)}))
        if limits:
            parts.append(toml_table("[limits]", limits))
        if delivery:
            parts.append(toml_table("[delivery]", delivery))
        if relay_route is not None:
            if local_domains:
                parts.append(toml_table("[[route]]", {
                    "domains": list(local_domains), "via": "maildir", "path": "mail"}))
            parts.append(toml_table("[[route]]", {
                "domains": ["*"], "via": "smtp", "host": relay_route[0],
                "port": relay_route[1], "tls": "none"}))
        if extra:
            parts.append(extra)
        self.config_path = self.folder / "mta.toml"
        self.config_path.write_text("\n".join(parts))
        self.log_path = self.folder / "twistd.log"
        self.pid_path = self.folder / "twistd.pid"

    def port(self, name: str = "smtp") -> int:
        return self.ports[name]

    @property
    def ca(self) -> Path:
        return self.pki["ca"]

    @property
    def queue(self) -> Path:
        return self.folder / "spool" / "queue"

    def maildir(self, address: str) -> Path:
        from twisted_mta.delivery.maildir import mailbox_folder
        return self.folder / "mail" / mailbox_folder(address)

    def delivered(self, address: str) -> list[Path]:
        """The files in C{address}'s Maildir new/, oldest name first."""
        new = self.maildir(address) / "new"
        return sorted(new.iterdir()) if new.is_dir() else []

    def all_delivered(self) -> list[Path]:
        """Every message file in every Maildir's new/ under mail/."""
        mail = self.folder / "mail"
        return sorted(mail.glob("*/new/*")) if mail.is_dir() else []

    def queued_ids(self) -> set[str]:
        """The ids of the message files in spool/queue (not state files)."""
        if not self.queue.is_dir():
            return set()
        return {n for n in os.listdir(self.queue) if "." not in n}

    def client_context(self, cafile: Path | None = None) -> ssl.SSLContext:
        """A client context trusting only the test CA, checking host names."""
        ctx = ssl.create_default_context(cafile=str(cafile or self.ca))
        assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
        return ctx


# --- the server in a subprocess ---------------------------------------------


class ServerProcess:
    """
    C{twistd -n mta --config <site>/mta.toml} in a subprocess, its working
    folder the site's, its log in C{twistd.log} there, its output in
    C{twistd.out}.  Use L{start}, then L{stop} (SIGTERM) or L{kill} (-9).
    """

    def __init__(self, site: Site, args=(), python: str | None = None, source_tree: bool = True):
        """
        @param python: the interpreter to run twistd with (default: this one).
        @param source_tree: put the repository on the child's PYTHONPATH
            (needed with the editable install; not for an installed package).
        """
        self.site = site
        self.args = list(args)
        self.python = python or sys.executable
        self.source_tree = source_tree
        self.proc: subprocess.Popen | None = None
        self.out_path = site.folder / "twistd.out"

    @staticmethod
    def environment(source_tree: bool = True) -> dict:
        env = dict(os.environ)
        env.pop("PYTHONWARNINGS", None)
        if not source_tree:
            env.pop("PYTHONPATH", None)
            return env
        # The twisted/plugins dropin of an editable install is only found
        # from the source tree.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def command(self) -> list[str]:
        return [self.python, "-c", _TWISTD, "-n",
                f"--pidfile={self.site.pid_path}", f"--logfile={self.site.log_path}",
                "mta", "--config", str(self.site.config_path), *self.args]

    def start(self, wait: bool = True) -> "ServerProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(self.command(), cwd=self.site.folder,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT,
                                         env=self.environment(self.source_tree))
        if wait:
            self.wait_listening()
        return self

    def output(self) -> str:
        text = []
        for path in (self.out_path, self.site.log_path):
            if path.exists():
                text.append(f"--- {path.name}:\n" + path.read_text(errors="replace")[-6000:])
        return "\n".join(text)

    def wait_listening(self) -> None:
        """Wait until every listener accepts connections (or the server died)."""
        deadline = time.monotonic() + START_DEADLINE
        for name, port in self.site.ports.items():
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"twistd exited with {self.proc.returncode} before listening:\n"
                        + self.output())
                try:
                    socket.create_connection((self.site.host, port), timeout=5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise AssertionError(f"twistd did not listen on {port}:\n" + self.output())
                    time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        """
        SIGTERM, and wait for it to exit.  Returns 0 if it shut down
        cleanly: twistd re-raises the signal after its shutdown, so a clean
        stop ends with -SIGTERM (or 0 on older Twisted), and the log says
        "Server Shut Down.".
        """
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(START_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("twistd did not stop on SIGTERM:\n" + self.output())
        rc = self.proc.returncode
        if rc in (0, -signal.SIGTERM) and "Server Shut Down." in self.site.log_path.read_text(
                errors="replace"):
            return 0
        return rc if rc else -1

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()


def start_process(testcase, site: Site, wait: bool = True) -> ServerProcess:
    """A L{ServerProcess} for C{site}, started, killed at the end of the test."""
    server = ServerProcess(site)
    testcase.addCleanup(server.cleanup)
    return server.start(wait)


# --- the server in this process ---------------------------------------------


def start_in_process(testcase, site: Site):
    """
    Load C{site}'s configuration, prepare and start an L{MTAService} in
    this process; at the end of the test it is stopped and the test waits
    for its connections to close (so trial finds a clean reactor).
    Returns the service.
    """
    from twisted_mta import config as configmod
    from twisted_mta.service import MTAService

    mta = MTAService(configmod.load(site.config_path))
    mta.prepare()
    mta.startService()
    testcase.addCleanup(stop_in_process, mta)
    # TCP endpoints listen at once, in the order of the [[listen]] tables.
    if len(mta.ports) != len(site.ports):
        raise AssertionError(f"listening on {len(mta.ports)} of {len(site.ports)} endpoints")
    for name, port in zip(site.ports, mta.ports):
        actual = port.getHost().port
        if site.ports[name] not in (0, actual):
            raise AssertionError(f"{name}: listening on {actual}, not {site.ports[name]}")
        site.ports[name] = actual
    return mta


@defer.inlineCallbacks
def stop_in_process(mta):
    if mta.running:
        yield mta.stopService()
    deadline = time.monotonic() + WAIT_DEADLINE
    while mta.counter.total and time.monotonic() < deadline:
        yield task.deferLater(reactor, 0.02, lambda: None)


@defer.inlineCallbacks
def wait_for(predicate, what: str = "condition", interval: float = 0.02):
    """
    Poll C{predicate} (in the reactor thread) until it is true; fail after
    a generous deadline.  For things the server does after its reply (a
    Maildir delivery), not for timing.
    """
    deadline = time.monotonic() + WAIT_DEADLINE
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        yield task.deferLater(reactor, interval, lambda: None)


def wait_for_blocking(predicate, what: str = "condition", interval: float = 0.02):
    """L{wait_for} for tests where the server is a subprocess."""
    deadline = time.monotonic() + WAIT_DEADLINE
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


def in_thread(f, *args, **kwargs):
    """Run blocking client code (smtplib) off the reactor thread."""
    return threads.deferToThread(f, *args, **kwargs)


# --- the client side --------------------------------------------------------


def queue_id(reply: bytes) -> str:
    """The id in a "250 2.0.0 Ok: queued as ID" reply text, or fail."""
    m = QUEUED.match(reply.strip())
    if m is None:
        raise AssertionError(f"not a 'queued as' reply: {reply!r}")
    return m.group(1).decode("ascii")


def send(host: str, port: int, sender: str, recipients, message: bytes, *,
         starttls: ssl.SSLContext | None = None, implicit: ssl.SSLContext | None = None,
         server_hostname: str | None = None, mail_options=(), helo: str = "client.example.net",
         timeout: float = 60) -> tuple[int, bytes]:
    """
    One transaction with smtplib (blocking): EHLO, STARTTLS if asked, MAIL,
    RCPT..., DATA.  Returns DATA's (code, text); raises on any refusal
    before DATA (smtplib's exceptions).  C{message} goes out as given
    (smtplib dot-stuffs it and ends it with CRLF.CRLF).

    @param server_hostname: the name to verify the certificate against
        (default: C{host}).
    """
    if implicit is not None:
        client = smtplib.SMTP_SSL(local_hostname=helo, timeout=timeout, context=implicit)
    else:
        client = smtplib.SMTP(local_hostname=helo, timeout=timeout)
    # What starttls() and SMTP_SSL verify the certificate against: smtplib
    # takes it from the constructor's host only, so set it for connect().
    client._host = server_hostname or host
    try:
        client.connect(host, port)
        client.ehlo()
        if starttls is not None:
            client.starttls(context=starttls)
            client.ehlo()
        code, text = client.mail(sender, list(mail_options))
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, text, sender)
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            if code not in (250, 251):
                raise smtplib.SMTPRecipientsRefused({rcpt: (code, text)})
        return client.data(message)
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def message(msgid: str, subject: str = "test", body: bytes = b"Hello.\r\n",
            sender: str = "alice@client.example.net", to: str = "bob@example.test") -> bytes:
    """A small RFC 5322 message with CRLF line ends and a Message-ID."""
    head = (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{msgid}>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            f"MIME-Version: 1.0\r\n\r\n").encode("ascii")
    return head + body


def split_trace(stored: bytes) -> tuple[list[bytes], bytes]:
    """
    Split a stored message into its leading trace header fields (each with
    its continuation lines, CRLF kept) and the rest.  Only the fields the
    MTA adds are taken: Return-Path, Delivered-To, Received.
    """
    fields: list[bytes] = []
    pos = 0
    names = (b"return-path:", b"delivered-to:", b"received:")
    while True:
        if not stored[pos:pos + 20].lower().startswith(names):
            break
        end = stored.index(b"\r\n", pos) + 2
        while stored[end:end + 1] in (b" ", b"\t"):
            end = stored.index(b"\r\n", end) + 2
        fields.append(stored[pos:end])
        pos = end
    return fields, stored[pos:]


class RawClient:
    """
    A blocking line-level SMTP client for what smtplib cannot do:
    pipelining whole transactions in one write, BDAT, plaintext sent
    behind STARTTLS.
    """

    def __init__(self, host: str, port: int, timeout: float = 60):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[bytes]]:
        """One reply: its code and its lines' texts (without code and CRLF)."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"connection closed; got so far {lines!r}")
            if not line.endswith(b"\r\n") or len(line) < 5 or line[3:4] not in (b" ", b"-"):
                raise AssertionError(f"bad reply line {line!r}")
            lines.append(line[4:-2])
            if line[3:4] == b" ":
                return int(line[:3]), lines

    def replies(self, n: int) -> list[tuple[int, bytes]]:
        """The next C{n} replies, each as (code, its last line)."""
        return [(code, lines[-1]) for code, lines in (self.reply() for _ in range(n))]

    def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Wrap the socket in TLS now (after the server's 220)."""
        self.file.close()
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()
