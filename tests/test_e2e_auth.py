"""
End-to-end tests of submission (issue 5): the real service in this
process, with a port-587 style listener (require-starttls, auth require)
and a port-465 style one (implicit TLS, auth require) on loopback, a users
file made like C{twisted-mta passwd} makes it, and Python's smtplib as the
client (in a thread).

Relayed mail goes to a smart host that nobody listens on, so it is
accepted and stays queued.
"""

from __future__ import annotations

import base64
import smtplib

from twisted.internet import defer
from twisted.trial import unittest

from tests import e2e_support as e2e
from tests.e2e_support import Site, in_thread, queue_id, wait_for

USERS = {
    "alice@example.test": ("alice-Passw0rd", None),
    "scanner": ("scanner-Passw0rd", "scans@example.test,*@dept.example.test"),
}
FOREIGN = "someone@elsewhere.example"


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def plain(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


def closed_port() -> int:
    """A loopback port nothing listens on (the smart host that never answers)."""
    return e2e.free_port("127.0.0.1")


class SubmissionSite(Site):
    """A site with a 587-style and a 465-style listener, both auth = require, and users."""

    def __init__(self, folder, auth: dict | None = None):
        # The sender rule ([auth] sender_rule = "senders") is on by default.
        auth_table = {"users": "users", **(auth or {})}
        extra = e2e.toml_table("[auth]", auth_table)
        super().__init__(folder, {"submission": "require-starttls", "smtps": "implicit"},
                         relay_route=("127.0.0.1", closed_port()),
                         delivery={"min_backoff": 3600, "max_backoff": 3600},
                         extra=extra, fixed_ports=False)
        text = self.config_path.read_text()
        for mode in ("require-starttls", "implicit"):
            text = text.replace(f'tls = "{mode}"\n', f'tls = "{mode}"\nauth = "require"\n')
        self.config_path.write_text(text)
        self.users_path = self.folder / "users"
        self.write_users(USERS)

    def write_users(self, users: dict) -> None:
        from twisted_mta.users import hash_password
        lines = [f"{name}:{hash_password(pw)}" + (f":{senders}" if senders else "")
                 for name, (pw, senders) in users.items()]
        self.users_path.write_text("\n".join(lines) + "\n")
        self.users_path.chmod(0o600)


def start(testcase, site: Site, failure_delay: float = 0.01):
    """
    Start the service for C{site} in this process, with its
    L{Authenticator}'s failure delay set to C{failure_delay}.
    """
    from twisted_mta import config as configmod
    from twisted_mta.service import MTAService

    mta = MTAService(configmod.load(site.config_path))
    mta.prepare()
    mta.auth.failure_delay = failure_delay
    mta.startService()
    testcase.addCleanup(e2e.stop_in_process, mta)
    for name, port in zip(site.ports, mta.ports):
        site.ports[name] = port.getHost().port
    return mta


class Client:
    """smtplib, connected to the 587 listener (after STARTTLS) or the 465 one."""

    def __init__(self, site: SubmissionSite, implicit: bool = False, starttls: bool = True):
        ctx = site.client_context()
        if implicit:
            self.smtp = smtplib.SMTP_SSL(local_hostname="client.example.net", timeout=60,
                                         context=ctx)
            port = site.port("smtps")
        else:
            self.smtp = smtplib.SMTP(local_hostname="client.example.net", timeout=60)
            port = site.port("submission")
        self.smtp._host = site.hostname  # what the certificate is checked against
        self.smtp.connect(site.host, port)
        self.smtp.ehlo()
        if starttls and not implicit:
            self.smtp.starttls(context=ctx)
            self.smtp.ehlo()

    @property
    def features(self) -> dict:
        return {k.upper(): v for k, v in self.smtp.esmtp_features.items()}

    def cmd(self, line: str) -> tuple[int, str]:
        verb, _, rest = line.partition(" ")
        code, text = self.smtp.docmd(verb, rest)
        return code, text.decode("ascii", "replace")

    def submit(self, sender: str, rcpt: str) -> tuple[int, str]:
        code, text = self.smtp.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = self.smtp.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = self.smtp.data(e2e.message("auth@client.example.net", sender=sender, to=rcpt))
        return code, text.decode()

    def close(self) -> None:
        try:
            self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            self.smtp.close()


def session(site, f, implicit=False, starttls=True):
    """Run C{f(client)} with a fresh client in a thread; fires with its result."""

    def run():
        client = Client(site, implicit, starttls)
        try:
            return f(client)
        finally:
            client.close()

    return in_thread(run)


class SubmissionTests(unittest.TestCase):
    def setUp(self):
        self.site = SubmissionSite(self.mktemp())
        self.mta = start(self, self.site)

    @defer.inlineCallbacks
    def test_starttls_login_and_relay(self):
        """
        On the 587 listener: no AUTH before STARTTLS; after it, AUTH PLAIN
        LOGIN; smtplib logs in (PLAIN) and relays to a foreign domain, which
        is accepted and stays queued (its smart host does not answer), with
        a Received header saying ESMTPSA and not naming the user.
        """
        def run(client):
            features = client.features
            client.smtp.login("alice@example.test", USERS["alice@example.test"][0])
            return features, client.submit("alice@example.test", FOREIGN)

        features, (code, text) = yield session(self.site, run)
        self.assertEqual(features["AUTH"].split(), ["PLAIN", "LOGIN"])
        self.assertEqual(code, 250, text)
        qid = queue_id(text.encode())
        yield wait_for(lambda: qid in self.site.queued_ids(), "the message in the queue")
        stored = (self.site.queue / qid).read_bytes()
        self.assertIn(b"with ESMTPSA id", stored)
        self.assertNotIn(b"Authenticated sender", stored)

    @defer.inlineCallbacks
    def test_implicit_tls_login(self):
        """On the 465 listener: LOGIN (with an initial response, as smtplib sends it) and relay."""
        def run(client):
            features = client.features
            user, password = "scanner", USERS["scanner"][0]
            client.smtp.user, client.smtp.password = user, password
            code, text = client.smtp.auth("LOGIN", client.smtp.auth_login)
            return features, code, client.submit("scans@example.test", FOREIGN)

        features, code, (data_code, text) = yield session(self.site, run, implicit=True)
        self.assertIn("PLAIN", features["AUTH"].split())
        self.assertEqual(code, 235)
        self.assertEqual(data_code, 250, text)
        yield wait_for(lambda: queue_id(text.encode()) in self.site.queued_ids(), "queued")

    @defer.inlineCallbacks
    def test_login_prompts(self):
        """LOGIN step by step: the base64 prompts Username: and Password:."""
        def run(client):
            return [client.cmd("AUTH LOGIN"), client.cmd(b64("scanner")),
                    client.cmd(b64(USERS["scanner"][0]))]

        replies = yield session(self.site, run, implicit=True)
        self.assertEqual(replies, [(334, "VXNlcm5hbWU6"), (334, "UGFzc3dvcmQ6"),
                                   (235, "2.7.0 Authentication successful")])

    @defer.inlineCallbacks
    def test_bad_password(self):
        def run(client):
            try:
                client.smtp.login("alice@example.test", "wrong")
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code, e.smtp_error.decode()

        code, text = yield session(self.site, run)
        self.assertEqual((code, text), (535, "5.7.8 Error: authentication failed"))

    @defer.inlineCallbacks
    def test_plaintext_refused(self):
        """
        Before STARTTLS, AUTH is neither advertised nor accepted (503 5.5.1,
        as Postfix with smtpd_tls_auth_only), and MAIL needs STARTTLS.
        """
        def run(client):
            return (client.features, client.cmd(f"AUTH PLAIN {plain('scanner', USERS['scanner'][0])}"),
                    client.cmd("MAIL FROM:<scans@example.test>"))

        features, auth, mail = yield session(self.site, run, starttls=False)
        self.assertNotIn("AUTH", features)
        self.assertIn("STARTTLS", features)
        self.assertEqual(auth, (503, "5.5.1 Error: authentication not enabled"))
        self.assertEqual(mail[0], 530)

    @defer.inlineCallbacks
    def test_errors(self):
        """Each 5xx of the issue, over TLS."""
        good = plain("scanner", USERS["scanner"][0])

        def run(client):
            out = {}
            out["mail before auth"] = client.cmd("MAIL FROM:<scans@example.test>")
            out["unknown mechanism"] = client.cmd("AUTH CRAM-MD5")
            out["bad base64"] = client.cmd("AUTH PLAIN %%%not-base64")
            client.cmd("AUTH PLAIN")
            out["cancel"] = client.cmd("*")
            out["login"] = client.cmd(f"AUTH PLAIN {good}")
            out["second auth"] = client.cmd(f"AUTH PLAIN {good}")
            return out

        out = yield session(self.site, run)
        self.assertEqual(out["mail before auth"], (530, "5.7.0 Authentication required"))
        self.assertEqual(out["unknown mechanism"][0:1], (504,))
        self.assertTrue(out["unknown mechanism"][1].startswith("5.5.4"))
        self.assertEqual(out["bad base64"], (501, "5.5.2 Cannot decode response"))
        self.assertEqual(out["cancel"], (501, "5.7.0 Authentication aborted"))
        self.assertEqual(out["login"], (235, "2.7.0 Authentication successful"))
        self.assertEqual(out["second auth"], (503, "5.5.1 Error: already authenticated"))

        def in_transaction(client):
            client.cmd(f"AUTH PLAIN {good}")
            client.cmd("MAIL FROM:<scans@example.test>")
            return client.cmd(f"AUTH PLAIN {good}")

        in_txn = yield session(self.site, in_transaction, implicit=True)
        self.assertEqual(in_txn, (503, "5.5.1 Error: MAIL transaction in progress"))

        def raw_before_ehlo():
            raw = e2e.RawClient(self.site.host, self.site.port("smtps"))
            raw.file.close()
            raw.sock = self.site.client_context().wrap_socket(
                raw.sock, server_hostname=self.site.hostname)
            raw.file = raw.sock.makefile("rb")
            try:
                raw.reply()
                raw.send(f"AUTH PLAIN {good}\r\n".encode())
                return raw.reply()
            finally:
                raw.close()

        code, lines = yield in_thread(raw_before_ehlo)
        # Before EHLO replies carry no enhanced code on the wire (RFC 2034).
        self.assertEqual((code, lines), (503, [b"Error: send EHLO first"]))

    @defer.inlineCallbacks
    def test_sender_mismatch(self):
        """A user may only use its own senders (the default sender rule): 553 5.7.1."""
        def run(client):
            client.smtp.login("scanner", USERS["scanner"][0])
            refused = client.smtp.mail("boss@example.test")
            client.smtp.rset()
            pattern = client.smtp.mail("printer-3@dept.example.test")
            return refused, pattern

        (code, text), (ok, _) = yield session(self.site, run)
        self.assertEqual(code, 553)
        self.assertEqual(text.decode(), "5.7.1 <boss@example.test>: Sender address rejected: "
                                        "not owned by user scanner")
        self.assertEqual(ok, 250)

    @defer.inlineCallbacks
    def test_users_reload(self):
        """
        A user added to the users file can log in after a reload (the
        service's reload, which reads it through the authenticator); a bad
        line makes the reload fail with file:line and the old users stay.
        """
        from twisted_mta.service import ReloadError
        from twisted_mta.users import set_password, hash_password

        set_password(self.site.users_path, "carol", hash_password("carol-Passw0rd"))

        def login(user, password):
            def run(client):
                try:
                    return client.smtp.login(user, password)[0]
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code
            return session(self.site, run, implicit=True)

        self.assertEqual((yield login("carol", "carol-Passw0rd")), 535)
        yield self.mta.reload()
        self.assertEqual((yield login("carol", "carol-Passw0rd")), 235)

        with open(self.site.users_path, "a") as f:
            f.write("dave:plaintext-password\n")
        with self.assertRaises(ReloadError) as e:
            yield self.mta.reload()
        self.assertIn(f"{self.site.users_path}:4: user 'dave'", str(e.exception))
        self.assertNotIn("plaintext-password", str(e.exception))
        self.assertEqual((yield login("carol", "carol-Passw0rd")), 235)


class LockoutTests(unittest.TestCase):
    def setUp(self):
        self.site = SubmissionSite(self.mktemp(), auth={"failure_limit": 3, "lockout": 600})
        self.mta = start(self, self.site)

    @defer.inlineCallbacks
    def test_lockout(self):
        """
        Three failures from 127.0.0.1 lock it out: the next AUTH, on any
        connection and even with the right password, is 421 4.7.0 and the
        server closes the connection.
        """
        good = plain("scanner", USERS["scanner"][0])

        def run(client):
            codes = [client.cmd(f"AUTH PLAIN {plain('scanner', f'guess{i}')}")[0] for i in range(3)]
            codes.append(client.cmd(f"AUTH PLAIN {good}"))
            client.smtp.sock.settimeout(10)
            try:
                client.smtp.docmd("NOOP")
                still_open = True
            except (smtplib.SMTPServerDisconnected, OSError):
                still_open = False
            return codes, still_open

        codes, still_open = yield session(self.site, run)
        self.assertEqual(codes[:3], [535, 535, 535])
        self.assertEqual(codes[3][0], 421)
        self.assertIn("4.7.0", codes[3][1])
        self.assertFalse(still_open)

        def again(client):
            return client.cmd(f"AUTH PLAIN {good}")

        code, _ = yield session(self.site, again, implicit=True)
        self.assertEqual(code, 421)
